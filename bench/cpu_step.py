"""Images per second of CPU training, with every speed option on and off side
by side: the loader alone and the whole training step (loading, selection,
step) of the medium profile's configs, baseline and HVS.

    python -m bench.cpu_step --data-dir ../shared/data --output bench/cpu_step.json
    python -m bench.cpu_step --tiny --output /tmp/cpu_step.json      # under a minute, synthetic images

Two parts, for every config (default ``configs/simsiam_medium.yaml`` and
``configs/simclr_medium.yaml``) and both arms (baseline: the method's views;
HVS: ``hvs.enabled=true``, N candidates):

1. **Loader alone**: the training loop's loader (``common.engine.train.make_loader``:
   persistent workers, its prefetch, the loop's collate) over the config's
   multi-view dataset, for ``data.num_workers`` in ``--workers`` (default 0 1
   2) and the images read from their files or decoded once into memory
   (``data.in_memory`` false / true), alternating.  Images per second from the
   first batch to the last of ``--loader-batches`` batches (the workers' start
   is reported apart, ``startup_s``).  Also the one-off cost of decoding into
   memory, per image and extrapolated to the whole training set.
2. **Training step**: the real training loop (``common.engine.train.run``, a
   fresh run folder under ``--workdir`` each time) of the config as it is (the
   *reference*) and of one variant per option, each differing from the
   reference in that option alone:

   - ``amp``: ``train.amp`` bf16 against off (the bf16 autocast of the step);
   - ``channels_last``: ``train.channels_last`` true against the reference's layout;
   - ``in_memory``: ``data.in_memory`` true against false;
   - ``workers``: ``data.num_workers`` in ``--workers``;
   - ``batch``: ``train.batch_size`` in ``--batch-sizes`` (images per second; a
     larger batch also changes the training: the learning rate follows it).

   Every run trains ``--warmup`` + ``--steps`` steps with a log line per step;
   a step's time is the wall-clock time between two log lines (loading wait,
   selection, step, logging: ``step_time`` in ``log.jsonl``), the warm-up steps
   left out.  Each run reads a class-stratified subset of exactly the images
   its steps need (``data.subset``), so that decoding into memory costs the run
   only those; the decoding of the whole set is part 1's figure.  The cells run
   ``--rounds`` times, in an order reversed from round to round, so that a
   drift of the machine hits all alike; reported: the median step time over
   all timed steps, images per second (batch / median), and per variant the
   ratio of its images per second over the reference's.

Timings mean something only on otherwise idle cores: the JSON records the
load average before and after (and is rewritten after every part, so that an
interrupted measurement keeps what it finished; ``complete`` says whether all
parts ran).  The defaults take about 8 to 9 minutes on two idle cores;
``--configs`` and ``--options`` measure a part of it.  ``--tiny``: a synthetic
image folder, 16 px, batch 8, one round of few steps, on one thread (for the
tests; the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.end_to_end import method_of, step_times
from common.engine.checkpoint import write_json_atomic
from common.engine.config import COMMON_SPEC, resolve
from common.engine.registry import get_method
from common.engine.runtime import USER_ERRORS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "simsiam_medium.yaml", ROOT / "configs" / "simclr_medium.yaml"]
ARMS = ("baseline", "hvs")
OPTIONS = ("amp", "channels_last", "in_memory", "workers", "batch")
#: the tiny mode's settings: synthetic images, small steps, one round
TINY = ["augment.size=16", "train.batch_size=8", "data.dataset=imagefolder"]


def environment() -> dict:
    from common.hvs import cpu_has_bf16

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "native_bf16": cpu_has_bf16(), "load_average": list(os.getloadavg())}


def config_of(config: Path, overrides: list) -> tuple:
    """(method class, resolved config) of a config file with overrides."""
    cls = get_method(method_of(config))
    cfg = resolve({**COMMON_SPEC, **cls.spec}, [config], overrides)
    cfg["method"] = cls.name
    return cls, cfg


# ----------------------------------------------------------------------------
# 1. the loader alone
# ----------------------------------------------------------------------------
def loader_rate(dataset, sampler, batch: int, workers: int, batches: int) -> dict:
    """Images per second of the loop's loader from its first batch to its last."""
    from common.engine.train import make_loader

    t0 = time.perf_counter()
    loader = make_loader(dataset, sampler, batch, workers, pin=False)
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    for _ in range(batches - 1):
        next(it)
    t2 = time.perf_counter()
    del it, loader  # the persistent workers end here
    return {"images_per_s": batch * (batches - 1) / (t2 - t1), "startup_s": t1 - t0}


def loader_part(config: Path, overrides: list, workers: list, batches: int, rounds: int) -> dict:
    from common.engine.runtime import EpochSampler
    from common.views.pipeline import ViewPipeline
    from common.views.data import DataError, DecodedImages, build_dataset, subset_indices

    cls, cfg = config_of(config, overrides)
    d, batch, seed = cfg["data"], int(cfg["train"]["batch_size"]), int(cfg["run"]["seed"])
    full = build_dataset(d["dataset"], "train", d["data_dir"])
    files = torch.utils.data.Subset(full, subset_indices(full.targets, batch * batches, seed))
    if len(files) < 2 * batch:
        raise DataError(f"{d['dataset']} has {len(files)} images: the loader part needs two batches of {batch}")
    t0 = time.perf_counter()
    decoded = DecodedImages(files)
    decode_s = (time.perf_counter() - t0) / len(files)
    sources = {"files": files, "in_memory": decoded}
    cells = [(arm, source, w) for arm in ARMS for source in sources for w in workers]
    rates: dict = {cell: [] for cell in cells}
    for r in range(rounds):
        for arm, source, w in (cells if r % 2 == 0 else cells[::-1]):
            arm_cfg = {**cfg, "hvs": {**cfg["hvs"], "enabled": arm == "hvs"}}
            method = cls(arm_cfg, torch.device("cpu"))
            dataset = ViewPipeline.from_cfg(arm_cfg, method).dataset(sources[source], seed=seed)
            sampler = EpochSampler(len(dataset), batch, seed, 0, 1)
            rates[(arm, source, w)].append(loader_rate(dataset, sampler, batch, w, min(batches, sampler.batches)))
    rows = [{"config": config.name, "arm": arm, "source": source, "num_workers": w,
             "images_per_s": statistics.median(m["images_per_s"] for m in rates[(arm, source, w)]),
             "startup_s": statistics.median(m["startup_s"] for m in rates[(arm, source, w)]),
             "runs": len(rates[(arm, source, w)])} for arm, source, w in cells]
    for row in rows:  # in memory over files, same arm and workers
        if row["source"] == "in_memory":
            ref = next(x for x in rows if x["arm"] == row["arm"] and x["num_workers"] == row["num_workers"]
                       and x["source"] == "files")
            row["ratio_vs_files"] = row["images_per_s"] / ref["images_per_s"]
    decode = {"config": config.name, "images": len(files), "s_per_image": decode_s,
              "full_set_images": len(full), "full_set_s": decode_s * len(full)}
    return {"rows": rows, "decode": decode}


# ----------------------------------------------------------------------------
# 2. the training step
# ----------------------------------------------------------------------------
#: the config key of every option; the other value of each on/off option
SETTING = {"amp": "train.amp", "channels_last": "train.channels_last", "in_memory": "data.in_memory",
           "workers": "data.num_workers", "batch": "train.batch_size"}
OTHER = {"bf16": "off", "off": "bf16", "true": "false", "false": "true"}


def reference_values(cfg: dict) -> dict:
    """What each option is in ``cfg`` on this CPU (``auto`` resolved), as the variants spell it."""
    from common.engine.memory_format import use_channels_last
    from common.views.data import wants_in_memory

    t, d = cfg["train"], cfg["data"]
    layout = use_channels_last(t["channels_last"], torch.device("cpu"), torch.nn.Module(), t["amp"])
    return {"amp": "bf16" if t["amp"] == "bf16" else "off", "channels_last": str(layout).lower(),
            "in_memory": str(wants_in_memory(d["in_memory"], d["dataset"])).lower(),
            "workers": str(d["num_workers"]), "batch": str(t["batch_size"])}


def variants(cfg: dict, workers: list, batch_sizes: list, options=OPTIONS) -> list:
    """``(option, value)``: the reference (``("reference", "")``), then one
    variant per option value that differs from the reference's."""
    ref = reference_values(cfg)
    values = {"workers": [str(w) for w in workers], "batch": [str(b) for b in batch_sizes]}
    out = [("reference", "")]
    for option in options:
        others = values[option] if option in values else [OTHER[ref[option]]]
        out += [(option, v) for v in others if v != ref[option]]
    return out


def one_run(cls, config: Path, overrides: list, out: Path, steps: int, warmup: int) -> list:
    """Step times of one short run of the real loop (the warm-up steps left out)."""
    from common.engine.train import run

    total = steps + warmup
    probe = resolve({**COMMON_SPEC, **cls.spec}, [config], overrides)
    batch = int(probe["train"]["batch_size"])
    shutil.rmtree(out, ignore_errors=True)
    cfg = resolve({**COMMON_SPEC, **cls.spec}, [config], [
        *overrides, f"run.output_dir={out}", "run.log_every=1", f"run.stop_after_steps={total}",
        "run.ckpt_every_steps=0", f"train.epochs={total}", f"data.subset={batch * total}"])
    cfg["method"] = cls.name
    lines = io.StringIO()
    with contextlib.redirect_stdout(lines), contextlib.redirect_stderr(lines):  # the loop's progress lines
        run(cfg, cls)
    times = step_times(out, warmup)
    shutil.rmtree(out, ignore_errors=True)
    return times


def step_part(config: Path, overrides: list, workers: list, batch_sizes: list, steps: int, warmup: int,
              rounds: int, workdir: Path, options=OPTIONS) -> dict:
    cls, cfg = config_of(config, overrides)
    ref = reference_values(cfg)
    cells = [(arm, option, value) for arm in ARMS for option, value in variants(cfg, workers, batch_sizes, options)]
    times: dict = {cell: [] for cell in cells}
    for r in range(rounds):
        for arm, option, value in (cells if r % 2 == 0 else cells[::-1]):
            extra = [] if option == "reference" else [f"{SETTING[option]}={value}"]
            times[(arm, option, value)] += one_run(cls, config, [*overrides, *extra, f"hvs.enabled={arm == 'hvs'}"],
                                                   workdir / f"{arm}_{option}_{value}", steps, warmup)
    rows = []
    for arm, option, value in cells:
        measured = times[(arm, option, value)]
        batch = int(value if option == "batch" else ref["batch"])
        median = statistics.median(measured)
        rows.append({"config": config.name, "arm": arm, "option": option, "value": value or "config",
                     "batch_size": batch, "median_step_s": median, "images_per_s": batch / median,
                     "step_times": measured})
    comparisons = []
    for arm in ARMS:
        base = next(x for x in rows if x["arm"] == arm and x["option"] == "reference")
        for row in (x for x in rows if x["arm"] == arm and x["option"] != "reference"):
            comparisons.append({"config": config.name, "arm": arm, "option": row["option"],
                                "reference": {"value": ref[row["option"]], "images_per_s": base["images_per_s"]},
                                "variant": {"value": row["value"], "images_per_s": row["images_per_s"]},
                                "ratio_variant_over_reference": row["images_per_s"] / base["images_per_s"]})
    return {"rows": rows, "comparisons": comparisons}


# ----------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------
def benchmark(configs: list, overrides: list, workers: list, batch_sizes: list, steps: int, warmup: int,
              rounds: int, loader_batches: int, workdir: Path, options=OPTIONS, progress=None) -> dict:
    """Both parts for every config; ``progress(result so far)`` after each
    part (the command writes its JSON there, so that an interrupted
    measurement leaves what it finished)."""
    t0 = time.perf_counter()
    res = {"environment": environment(), "configs": [str(c) for c in configs], "overrides": overrides,
           "settings": {"workers": workers, "batch_sizes": batch_sizes, "steps": steps, "warmup": warmup,
                        "rounds": rounds, "loader_batches": loader_batches, "options": list(options)},
           "loader": [], "decode": [], "step": [], "comparisons": [], "complete": False}

    def done_part():
        res["environment"]["load_average_after"] = list(os.getloadavg())
        res["seconds"] = time.perf_counter() - t0
        if progress is not None:
            progress(res)

    for config in configs:
        part = loader_part(config, overrides, workers, loader_batches, rounds)
        res["loader"] += part["rows"]
        res["decode"].append(part["decode"])
        done_part()
    for config in configs:
        part = step_part(config, overrides, workers, batch_sizes, steps, warmup, rounds, workdir, options)
        res["step"] += part["rows"]
        res["comparisons"] += part["comparisons"]
        res["complete"] = config == configs[-1]
        done_part()
    return res


def report(res: dict) -> str:
    lines = [f"load average before {res['environment']['load_average'][0]:.2f}, after "
             f"{res['environment']['load_average_after'][0]:.2f} on {res['environment']['cores']} cores; "
             f"{res['seconds']:.0f} s"]
    lines.append("loader alone, images/s (files | in memory, ratio):")
    for row in (r for r in res["loader"] if r["source"] == "in_memory"):
        files = next(r for r in res["loader"] if r["source"] == "files" and r["config"] == row["config"]
                     and r["arm"] == row["arm"] and r["num_workers"] == row["num_workers"])
        lines.append(f"  {row['config']} {row['arm']:8s} workers {row['num_workers']}: {files['images_per_s']:8.0f} | "
                     f"{row['images_per_s']:8.0f}  x{row['ratio_vs_files']:.2f}")
    for d in res["decode"]:
        lines.append(f"  decoding into memory: {d['s_per_image'] * 1e3:.3f} ms an image, about {d['full_set_s']:.0f} s "
                     f"for the {d['full_set_images']} images of {d['config']}'s training set")
    lines.append("training step, images/s (reference -> variant, ratio):")
    for c in res["comparisons"]:
        lines.append(f"  {c['config']} {c['arm']:8s} {c['option']:13s} {c['reference']['value']:>5s} "
                     f"{c['reference']['images_per_s']:7.1f} -> {c['variant']['value']:>5s} "
                     f"{c['variant']['images_per_s']:7.1f}  x{c['ratio_variant_over_reference']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_step", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", type=Path, default=None,
                   help="pretraining configs (default: the medium profile's SimSiam and SimCLR)")
    p.add_argument("--data-dir", default=None, help="data root (default: HVS_DATA_DIR)")
    p.add_argument("--workers", type=int, nargs="+", default=None, help="data.num_workers values (default 0 1 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="train.batch_size values of the step part (default 128 256)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed first steps per run (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="rounds over all cells, alternating (default 2)")
    p.add_argument("--loader-batches", type=int, default=None, help="batches read per loader measurement (default 8)")
    p.add_argument("--options", nargs="+", choices=OPTIONS, default=list(OPTIONS),
                   help="options of the step part (default all)")
    p.add_argument("--workdir", type=Path, default=None, help="folder for the short runs (default: a temporary one)")
    p.add_argument("--output", type=Path, default=None, help="also write the result as JSON")
    p.add_argument("--tiny", action="store_true", help="a quick check on synthetic images (numbers mean nothing)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = p.parse_args(argv)
    lows = {"steps": 1, "warmup": 0, "rounds": 1, "loader_batches": 2, "workers": 0, "batch_sizes": 1}
    for name, low in lows.items():
        value = getattr(args, name)
        if value is not None and min(value if isinstance(value, list) else [value]) < low:
            p.exit(2, f"{p.prog}: error: --{name.replace('_', '-')} {value}: must be at least {low}\n")
    tiny = {"workers": [0, 1], "batch_sizes": [8, 16], "steps": 2, "warmup": 1, "rounds": 1, "loader_batches": 3}
    full = {"workers": [0, 1, 2], "batch_sizes": [128, 256], "steps": 3, "warmup": 1, "rounds": 2, "loader_batches": 8}
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v
                for k, v in (tiny if args.tiny else full).items()}
    configs = args.configs or CONFIGS
    for config in configs:
        if not config.is_file():
            p.exit(2, f"{p.prog}: error: config {config} does not exist\n")
    threads = torch.get_num_threads()
    if args.tiny:  # tiny models run faster on one thread, and more steadily on shared cores
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = list(args.overrides)
        if args.tiny:
            from common.views.data import make_image_folder

            images = make_image_folder(Path(tmp) / "images", classes=4, per_class=8)
            overrides = [*TINY, f"data.data_dir={images}", *overrides]
        elif args.data_dir:
            overrides = [f"data.data_dir={args.data_dir}", *overrides]
        try:
            res = benchmark(configs, overrides, settings["workers"], settings["batch_sizes"], settings["steps"],
                            settings["warmup"], settings["rounds"], settings["loader_batches"],
                            args.workdir or Path(tmp) / "runs", args.options,
                            progress=lambda r: args.output and write_json_atomic(args.output, {**r, "tiny": args.tiny}))
        except USER_ERRORS as err:
            print(f"{p.prog}: error: {err}", file=sys.stderr)
            sys.exit(2)
        finally:
            torch.set_num_threads(threads)
    res["tiny"] = args.tiny
    print(report(res))
    return res


if __name__ == "__main__":
    main()
