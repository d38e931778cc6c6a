"""From which bank size does faiss pay for the k-NN neighbour search on the CPU?

Times the two backends of ``eval/knn.py`` (``knn.backend``) in one process, on
the same seeded random L2-normalised features, through the same function the
evaluation uses (``eval.knn.neighbour_search``) and with the evaluation's
chunking of the queries (``bench.chunk_size``, 256 as ``weighted_knn``):

- torch: ``(chunk @ bank.T).topk(k)`` for every chunk of queries;
- faiss: building an exact ``IndexFlatIP`` over the bank (timed separately,
  the ``build`` column) and ``index.search(chunk, k)`` for every chunk.

For every bank size x feature dimension the backends are timed alternately,
``bench.repeats`` times each (the order flipped from repeat to repeat), and the
medians are reported; ``faiss / torch`` is median(faiss build + search) /
median(torch), below 1 where faiss is faster.  ``same nbrs`` is the share of
queries of the first chunk with the same set of k neighbours in both backends
(random features in many dimensions have near-ties at the k-th neighbour,
which float32 rounding may break either way, so slightly under 100 % can
happen).  Both
libraries get ``bench.threads`` threads.

    python -m bench.knn_backends                                  # the defaults below
    python -m bench.knn_backends --sizes 10000 50000 --dims 384 bench.queries=2000 bench.repeats=5

The command line is that of every entry point (``common/engine/config.py``:
``--config YAML``, ``key=value`` overrides, ``--help`` lists every key);
``--sizes`` and ``--dims`` take several values.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common.engine.config import setting
from eval.knn import import_faiss, neighbour_search, parse_cli

SPEC = {
    "bench.sizes": setting([10_000, 50_000, 100_000, 500_000], "bank sizes (training features)", range="[1, inf)"),
    "bench.dims": setting([384, 2048], "feature dimensions (ViT-S/16: 384, ResNet-50: 2048)", range="[1, inf)"),
    "bench.queries": setting(10_000, "number of query (test) features", range="[1, inf)"),
    "bench.k": setting(200, "neighbours per query (eval.knn searches max(knn.ks), 200 by default)",
                       range="[1, inf)"),
    "bench.chunk_size": setting(256, "queries per search call (weighted_knn's chunk_size)", range="[1, inf)"),
    "bench.repeats": setting(3, "timings per backend and setting; the median is reported", range="[1, inf)"),
    "bench.threads": setting(2, "CPU threads of torch and of faiss (OpenMP)", range="[1, inf)"),
    "bench.seed": setting(0, "seed of the random features"),
    "bench.output": setting("", "also write the table and every timing to this JSON file"),
}
LISTS = {"--sizes": "bench.sizes", "--dims": "bench.dims"}


def parse_args(argv=None) -> dict:
    return parse_cli(SPEC, "bench.knn_backends", "Times the k-NN neighbour search of eval.knn with the torch "
                     "backend (matmul + topk) and the faiss backend (exact IndexFlatIP) on the CPU, for several "
                     "bank sizes and feature dimensions; prints a table.", {}, argv, lists=LISTS)


def timed_search(bank: torch.Tensor, queries: torch.Tensor, k: int, backend: str, chunk_size: int):
    """(build seconds, search seconds, indices of the first chunk) of one full
    search of ``queries`` against ``bank``, chunk after chunk."""
    t0 = time.perf_counter()
    search = neighbour_search(bank, k, backend)
    t1 = time.perf_counter()
    first = None
    for start in range(0, len(queries), chunk_size):
        _, idx = search(queries[start:start + chunk_size])
        if first is None:
            first = idx
    t2 = time.perf_counter()
    del search  # frees the faiss index (a copy of the bank) before the next timing
    return t1 - t0, t2 - t1, first


def run(cfg: dict) -> dict:
    b = cfg["bench"]
    faiss = import_faiss()
    torch.set_num_threads(b["threads"])
    faiss.omp_set_num_threads(b["threads"])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# cpu: {cpu} | torch {torch.__version__}, faiss {faiss.__version__} | {b['threads']} threads | "
          f"{b['queries']} queries, k={b['k']}, chunks of {b['chunk_size']} | median of {b['repeats']}",
          flush=True)
    header = ("| bank size | dim | torch (s) | faiss build (s) | faiss search (s) | faiss total (s) "
              "| faiss / torch | same nbrs |")
    print(header)
    print("|" + "---:|" * (header.count("|") - 1), flush=True)
    rows = []
    g = torch.Generator().manual_seed(b["seed"])
    for dim in b["dims"]:
        queries = F.normalize(torch.randn(b["queries"], dim, generator=g), dim=1)
        for size in b["sizes"]:
            bank = F.normalize(torch.randn(size, dim, generator=g), dim=1)
            k = min(b["k"], size)
            times = {"torch": [], "faiss_build": [], "faiss_search": []}
            for r in range(b["repeats"]):
                for backend in (("torch", "faiss") if r % 2 == 0 else ("faiss", "torch")):
                    build, search, idx = timed_search(bank, queries, k, backend, b["chunk_size"])
                    if backend == "torch":
                        times["torch"].append(build + search)
                        idx_torch = idx
                    else:
                        times["faiss_build"].append(build)
                        times["faiss_search"].append(search)
                        idx_faiss = idx
            med = {key: statistics.median(v) for key, v in times.items()}
            faiss_total = statistics.median([a + s for a, s in zip(times["faiss_build"], times["faiss_search"])])
            same = (idx_torch.sort(dim=1).values == idx_faiss.sort(dim=1).values).all(dim=1).float().mean().item()
            row = {"bank_size": size, "dim": dim, "torch_s": med["torch"], "faiss_build_s": med["faiss_build"],
                   "faiss_search_s": med["faiss_search"], "faiss_total_s": faiss_total,
                   "ratio": faiss_total / med["torch"], "same_neighbours": same, "times": times}
            rows.append(row)
            print(f"| {size:,} | {dim} | {med['torch']:.2f} | {med['faiss_build']:.2f} | {med['faiss_search']:.2f} "
                  f"| {faiss_total:.2f} | {row['ratio']:.2f} | {100 * same:.0f} % |", flush=True)
            del bank
    for dim in b["dims"]:
        ours = [r for r in rows if r["dim"] == dim]
        pays = next((r["bank_size"] for i, r in enumerate(ours) if all(o["ratio"] < 1 for o in ours[i:])), None)
        print(f"# dim {dim}: faiss faster " + (f"from a bank of {pays:,} on (of the sizes timed)" if pays
                                               else "at none of the sizes timed"))
    result = {"cpu": cpu, "torch": torch.__version__, "faiss": faiss.__version__, "config": cfg, "rows": rows}
    if b["output"]:
        os.makedirs(os.path.dirname(os.path.abspath(b["output"])), exist_ok=True)
        with open(b["output"], "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    try:
        return run(cfg)
    except ImportError as err:
        sys.exit(f"bench.knn_backends: error: {err}")


if __name__ == "__main__":
    main()
