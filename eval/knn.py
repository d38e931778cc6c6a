"""Weighted k-NN evaluation of a frozen backbone (DINO, Caron et al. 2021).

Features of the training and test images are extracted once with the frozen
backbone and L2-normalised.  Every test image takes its ``k`` most similar
training images (cosine similarity); each neighbour votes for its class with
weight ``exp(sim / T)`` and the classes are ranked by their summed votes.

Differences to DINO's ``eval_knn.py``, none of which change the predictions:
any test-set size and number of classes work, ``k`` may exceed the number of
training images (it is clamped), the top-k search is done once for the largest
``k``, and the weights are computed relative to the nearest neighbour
(``exp((sim - sim_max) / T)``), which scales all votes of a sample by the same
factor and so avoids overflow for small temperatures.

The neighbour search has two backends (``knn.backend``, ``--backend``), and
only the search differs between them (:func:`neighbour_search`): ``torch``, a
matmul of every chunk of test features against the whole bank and ``topk``;
``faiss``, an exact inner-product index (``faiss.IndexFlatIP``; on the GPU
where faiss-gpu is installed and the features are on a GPU, else on the CPU).
Both find the same neighbours (up to the order of exactly tied similarities)
and feed them to the same vote.  ``bench/knn_backends.py`` measures from which
bank size faiss pays: on a 2-core CPU (faiss-cpu 1.15.1, k = 200, chunks of
256 queries) it paid at none of 10k-500k bank features of 384 or 2048
dimensions (3-10x slower than torch), so torch stays the default.

Example (the configuration as every entry point's, ``common/engine/config.py``:
``--config YAML``, ``key=value`` overrides, ``--help`` lists every key)::

    python -m eval.knn --checkpoint runs/dino_cifar10/checkpoint.pth \\
        --output results/knn_dino_cifar10.json knn.ks=[10,20] data.train_subset=5000
    python -m eval.knn --checkpoint runs/dino_cifar10/checkpoint.pth --backend faiss   # pip install faiss-cpu
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.views.augment import eval_transform
from common.engine.checkpoint import load_backbone
from common.engine.config import ConfigError, build_parser, overrides_of, resolve, setting, stop_if_checking
from common.views.data import SUBSET_SEED, build_dataset, data_dir_or_default, subset_indices
from eval.engine import EVAL_SPEC, SHORTCUTS, run_main


# ---------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------
@torch.no_grad()
def extract_features(model: nn.Module, loader, device, verbose: bool = True) -> tuple[Tensor, Tensor]:
    """Run ``model`` (put in eval mode) over ``loader`` of ``(images, labels)``.

    Returns ``(features, labels)``: float32 ``[n, D]`` (outputs with more than
    two dimensions are flattened) and int64 ``[n]``, both on the CPU.  With
    ``verbose``, loaders of at least 20 batches report progress and an ETA
    about every 10% on stderr.
    """
    model.eval()
    device = torch.device(device)
    n_batches = len(loader) if hasattr(loader, "__len__") else 0
    every = max(1, n_batches // 10) if verbose and n_batches >= 20 else 0
    features, labels, start = [], [], time.time()
    for i, (images, targets) in enumerate(loader):
        out = model(images.to(device, non_blocking=True))
        features.append(out.flatten(1).float().cpu())
        labels.append(torch.as_tensor(targets).long().cpu().view(-1))
        if every and ((i + 1) % every == 0 or i + 1 == n_batches):
            elapsed = time.time() - start
            eta = elapsed / (i + 1) * (n_batches - i - 1)
            print(f"  features: {i + 1}/{n_batches} batches ({100 * (i + 1) / n_batches:.0f}%), "
                  f"elapsed {elapsed:.0f}s, ETA {eta:.0f}s", file=sys.stderr, flush=True)
    if not features:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)


# ---------------------------------------------------------------------------
# Neighbour search: the one thing the backends do differently
# ---------------------------------------------------------------------------
#: the neighbour-search backends of :func:`weighted_knn` (``knn.backend``)
BACKENDS = ("torch", "faiss")

#: faiss-gpu selects at most this many neighbours per query (GPU_MAX_SELECTION_K)
FAISS_GPU_MAX_K = 2048


def import_faiss():
    """The ``faiss`` module, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("k-NN backend 'faiss' needs the faiss package, which is not importable "
                          f"({err}): pip install faiss-cpu (or faiss-gpu on a CUDA machine), "
                          "or use the torch backend") from err
    return faiss


def neighbour_search(bank: Tensor, k: int, backend: str = "torch") -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """A function ``search(queries) -> (sims, idx)`` giving, for every row of
    ``queries`` [m, D], the ``k`` rows of ``bank`` [n, D] (``k <= n``) of
    highest inner product: both [m, k], most similar first, ``sims`` float32
    and ``idx`` int64 on ``bank.device``.  Rows are expected L2-normalised
    (inner product = cosine similarity).

    ``torch``: ``(queries @ bank.T).topk(k)``.  ``faiss``: an exact
    ``IndexFlatIP`` built once over the bank (a float32 copy of it), on the
    bank's GPU where faiss has GPU support and ``k <= FAISS_GPU_MAX_K``, else
    on the CPU; queries and results pass through host memory."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if not 1 <= k <= len(bank):
        raise ValueError(f"k={k} must lie in [1, {len(bank)}] (the bank's size)")
    if backend == "torch":
        return lambda queries: (queries @ bank.T).topk(k, dim=1)

    faiss = import_faiss()
    device = bank.device
    index = faiss.IndexFlatIP(bank.shape[1])
    if (device.type == "cuda" and k <= FAISS_GPU_MAX_K and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0):
        resources = faiss.StandardGpuResources()  # kept alive by the closure below, as long as the index
        index = faiss.index_cpu_to_gpu(resources, device.index if device.index is not None
                                       else torch.cuda.current_device(), index)
    index.add(bank.detach().float().cpu().contiguous().numpy())

    def search(queries: Tensor) -> tuple[Tensor, Tensor]:
        sims, idx = index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        return torch.from_numpy(sims).to(device), torch.from_numpy(idx).long().to(device)

    search.index = index  # the faiss index, for inspection
    return search


# ---------------------------------------------------------------------------
# Weighted k-NN classifier
# ---------------------------------------------------------------------------
@torch.no_grad()
def weighted_knn(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 256,
                 backend: str = "torch") -> dict[int, dict[str, float]]:
    """DINO's weighted k-NN classifier; returns ``{k: {"top1": %, "top5": %}}``.

    Both feature sets are L2-normalised; for every test sample the ``k``
    training samples of highest cosine similarity vote for their class with
    weight ``exp(sim / T)``, and classes are ranked by summed vote (ties in
    favour of the lower class index).  ``top5`` is top-``min(5, C)``.  A ``k``
    larger than the training set is clamped to it but reported under the
    requested ``k``.  The computation runs on ``train_features.device``, over
    chunks of ``chunk_size`` test samples.  ``num_classes`` defaults to the
    largest label (train or test) plus one.  ``backend`` (``torch`` or
    ``faiss``) is the neighbour search (:func:`neighbour_search`); the vote
    is the same for both.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={ks} must be a non-empty list of positive integers")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("weighted_knn needs at least one training and one test sample")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels must have the same number of rows")

    device = train_features.device
    train = F.normalize(train_features.float().flatten(1), dim=1)
    test = F.normalize(test_features.float().flatten(1).to(device), dim=1)
    train_labels = train_labels.long().to(device)
    test_labels = test_labels.long().to(device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    n_train, n_test = len(train), len(test)
    k_max = min(max(ks), n_train)
    top = min(5, num_classes)
    search = neighbour_search(train, k_max, backend)

    correct = {k: torch.zeros(2, dtype=torch.long, device=device) for k in ks}
    for start in range(0, n_test, chunk_size):
        chunk, target = test[start:start + chunk_size], test_labels[start:start + chunk_size]
        sims, idx = search(chunk)  # sorted, most similar first
        neighbour_labels = train_labels[idx]
        weights = ((sims - sims[:, :1]) / temperature).exp()  # exp(sim / T) up to a per-row factor
        for k in ks:
            kk = min(k, n_train)
            votes = torch.zeros(len(chunk), num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            ranking = votes.sort(dim=1, descending=True, stable=True).indices[:, :top]
            hits = ranking == target[:, None]
            correct[k][0] += hits[:, 0].sum()
            correct[k][1] += hits.any(dim=1).sum()
    return {k: {"top1": 100.0 * c[0].item() / n_test, "top5": 100.0 * c[1].item() / n_test}
            for k, c in correct.items()}


# ---------------------------------------------------------------------------
# Command line: the config layer of every entry point (common/engine/config.py)
# ---------------------------------------------------------------------------
#: Keys of the k-NN evaluation: the evaluations' own where they fit, and k-NN's.
KNN_SPEC = {
    **{key: EVAL_SPEC[key] for key in ("eval.checkpoint", "eval.which", "data.dataset", "data.data_dir",
                                       "data.train_subset", "data.test_subset", "data.image_size",
                                       "data.num_workers", "run.device")},
    "eval.output": setting("", 'results JSON: {"checkpoint", "dataset", "n_train", "n_test", "temperature", '
                               '"backend", "knn": {"<k>": {"top1", "top5"}}, ...} (default: printed only)'),
    "knn.ks": setting([10, 20, 100, 200], "numbers of neighbours k, each reported (a list of whole numbers)",
                      range="[1, inf)"),
    "knn.temperature": setting(0.07, "temperature T of the vote weights exp(sim / T)", range="(0, inf)"),
    "knn.batch_size": setting(256, "batch size of the feature extraction", range="[1, inf)"),
    "knn.backend": setting("torch", "neighbour search: torch (matmul + topk over the bank) or faiss (exact "
                                    "IndexFlatIP; GPU with faiss-gpu and run.device=cuda; pip install faiss-cpu); "
                                    "same neighbours, same vote", list(BACKENDS)),
}

#: the shortcut flags of the evaluations (eval/engine.py) that k-NN has keys for
KNN_SHORTCUTS = {**{flag: key for flag, key in SHORTCUTS.items() if key in KNN_SPEC}, "--backend": "knn.backend"}


def parse_cli(spec: dict, prog: str, description: str, shortcuts: dict, argv=None, lists: dict | None = None,
              finish: Callable[[dict], None] | None = None) -> dict:
    """The command line of an evaluation or benchmark: ``--config YAML``, the
    ``shortcuts`` flags (``--flag VALUE`` -> ``key=VALUE``), ``lists`` flags
    taking several values (``--flag A B`` -> ``key=[A, B]``; a ``key=value`` of
    ``spec`` caught among them counts as an override) and ``key=value``
    overrides.  ``finish(cfg)`` fills defaults and checks what the config layer
    cannot (values that depend on each other).  A bad value ends the process
    with status 2 and one line naming the key, before anything is loaded."""
    parser = build_parser(spec, description, shortcuts)
    parser.prog = prog
    lists = lists or {}
    for flag, key in lists.items():
        parser.add_argument(flag, nargs="+", default=None, metavar=flag[2:].rstrip("s").replace("-", "_").upper(),
                            help=f"shortcut for {key}=[...]: {spec[key]['help']}")
    args = parser.parse_intermixed_args(argv)
    overrides = overrides_of(args, shortcuts)
    for flag, key in lists.items():
        given = getattr(args, flag.lstrip("-").replace("-", "_"))
        if given is None:
            continue
        strays = [v for v in given if "=" in v and v.split("=", 1)[0] in spec]
        overrides[:0] = strays  # before the shortcuts, as the other overrides
        overrides.append(f"{key}={json.dumps([v for v in given if v not in strays])}")
    try:
        cfg = resolve(spec, args.config, overrides)
        if finish is not None:
            finish(cfg)
    except ConfigError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
    stop_if_checking()
    return cfg


def resolve_device(cfg: dict) -> None:
    """``run.device=auto``: cuda where a GPU is visible, else cpu; ``cuda``
    without a GPU is a :class:`ConfigError`."""
    device = cfg["run"]["device"]
    if device == "auto":
        cfg["run"]["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config run.device=cuda: no GPU visible")


def _finish_knn(cfg: dict) -> None:
    if not cfg["eval"]["checkpoint"]:
        raise ConfigError("no checkpoint given: pass --checkpoint PATH (a checkpoint.pth of this repository)")
    resolve_device(cfg)
    if cfg["knn"]["backend"] == "faiss":
        try:
            import_faiss()
        except ImportError as err:
            raise ConfigError(f"config knn.backend=faiss: {err}") from None


def parse_knn_args(argv=None) -> dict:
    """The resolved configuration of ``python -m eval.knn``."""
    return parse_cli(KNN_SPEC, "eval.knn", "Weighted k-NN evaluation (DINO) of the frozen backbone of a "
                     "checkpoint. Prints top-1 / top-5 accuracy (%) for every k.", KNN_SHORTCUTS, argv,
                     finish=_finish_knn)


def evaluate(cfg: dict) -> dict:
    """Run the k-NN evaluation of a resolved configuration; returns the report."""
    e, d, k = cfg["eval"], cfg["data"], cfg["knn"]
    device = cfg["run"]["device"]

    # ---- model ----
    backbone, info = load_backbone(e["checkpoint"], which=e["which"])
    backbone.to(device)
    dataset = d["dataset"] or info["dataset"]
    image_size = d["image_size"] or info["image_size"]
    data_dir = data_dir_or_default(d["data_dir"], info.get("data_dir"))
    print(f"{info.get('method')} / {info.get('arch')} ({info.get('which', e['which'])}) from {e['checkpoint']}; "
          f"k-NN on {dataset} at {image_size}px", file=sys.stderr)

    # ---- data ----
    transform = eval_transform(image_size)
    loaders = {}
    for split, n in (("train", d["train_subset"]), ("val", d["test_subset"])):
        ds = build_dataset(dataset, split, data_dir=data_dir, transform=transform)
        if n:
            ds = torch.utils.data.Subset(ds, subset_indices(ds.targets, n, SUBSET_SEED))
        loaders[split] = torch.utils.data.DataLoader(
            ds, batch_size=k["batch_size"], shuffle=False, num_workers=d["num_workers"],
            pin_memory=str(device).startswith("cuda"))

    # ---- features and k-NN ----
    train_x, train_y = extract_features(backbone, loaders["train"], device)
    test_x, test_y = extract_features(backbone, loaders["val"], device)
    print(f"features: train {tuple(train_x.shape)}, test {tuple(test_x.shape)}; neighbour search: {k['backend']}",
          file=sys.stderr)
    results = weighted_knn(train_x.to(device), train_y, test_x, test_y, ks=k["ks"], temperature=k["temperature"],
                           backend=k["backend"])
    for kk, r in results.items():
        print(f"k={kk}  top1 {r['top1']:.2f}  top5 {r['top5']:.2f}")

    report = {"eval": "knn", "checkpoint": e["checkpoint"], "dataset": dataset, "method": info.get("method"),
              "arch": info.get("arch"), "hvs": info.get("hvs"), "epoch": info.get("epoch"),
              "which": info.get("which", e["which"]), "image_size": image_size,
              "n_train": len(train_y), "n_test": len(test_y), "temperature": k["temperature"],
              "backend": k["backend"], "knn": {str(kk): r for kk, r in results.items()}, "config": cfg}
    if e["output"]:
        os.makedirs(os.path.dirname(os.path.abspath(e["output"])), exist_ok=True)
        with open(e["output"], "w") as f:
            json.dump(report, f, indent=2)
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_knn_args(argv)
    return run_main("eval.knn", lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
