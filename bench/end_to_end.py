"""End-to-end cost of HVS: the real training loop (loader workers, selection,
step, logging), baseline and HVS of the same configuration in one command
(issue 15, item 5).

    python -m bench.end_to_end --config configs/simsiam_small.yaml --steps 20
    python -m bench.end_to_end --config configs/dino_small.yaml --steps 12 hvs.resolution=0.5

Each variant is trained for ``--steps`` steps with ``run.log_every=1`` in a
fresh folder under ``--workdir``, and ``--rounds`` times, alternating baseline
and HVS (so that machine drift hits both alike); the time of a step is the
wall-clock time between two log lines (``step_time`` in ``log.jsonl``:
loading, augmentation, selection, the step and logging), the first
``--skip`` steps of a run (worker start-up, warm-up) left out.  Reported: the
median step time of each variant and the end-to-end factor HVS / baseline,
to compare with the step factor of ``bench/overhead.py`` (which times the
step alone on tensors).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

from common.engine.checkpoint import write_json_atomic
from common.engine.config import COMMON_SPEC, ConfigError, resolve
from common.engine.logs import read_rows
from common.engine.registry import get_method
from common.engine.runtime import USER_ERRORS


def method_of(config: Path) -> str:
    from common.engine.config import load_yaml

    name = load_yaml(config).get("method") or ""
    if name:
        return name
    from common.engine.registry import METHODS

    stem = config.stem
    matches = [m for m in METHODS if stem.startswith(m + "_")]
    if not matches:
        raise ConfigError(f"{config}: cannot tell the method from its name; pass --method")
    return max(matches, key=len)


def step_times(run_dir: Path, skip: int) -> list:
    rows = [r for r in read_rows(run_dir / "log.jsonl") if r.get("type") == "step"]
    return [r["step_time"] for r in rows[skip:]]


def benchmark(method_name: str, config: Path, steps: int, rounds: int, skip: int, workdir: Path,
              overrides: list) -> dict:
    from common.engine.train import run

    cls = get_method(method_name)
    spec = {**COMMON_SPEC, **cls.spec}
    times = {"baseline": [], "hvs": []}
    walls = {"baseline": [], "hvs": []}
    for r in range(rounds):
        order = ("baseline", "hvs") if r % 2 == 0 else ("hvs", "baseline")
        for variant in order:
            out = workdir / f"{variant}_{r}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = resolve(spec, [config], [*overrides, f"run.output_dir={out}", "run.log_every=1",
                                           f"run.stop_after_steps={steps}", "run.ckpt_every_steps=0",
                                           f"hvs.enabled={'true' if variant == 'hvs' else 'false'}"])
            cfg["method"] = cls.name
            t0 = time.perf_counter()
            run(cfg, cls)
            walls[variant].append(time.perf_counter() - t0)
            times[variant].extend(step_times(out, skip))
    if not times["baseline"] or not times["hvs"]:
        raise ConfigError(f"--steps {steps} leaves no timed step after --skip {skip}")
    base, hvs = statistics.median(times["baseline"]), statistics.median(times["hvs"])
    return {"method": cls.name, "config": str(config), "overrides": overrides, "steps": steps, "rounds": rounds,
            "skip": skip, "median_step_seconds": {"baseline": base, "hvs": hvs}, "factor": hvs / base,
            "timed_steps": {k: len(v) for k, v in times.items()}, "run_seconds": walls}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.end_to_end", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="a pretraining config (configs/<method>_<profile>.yaml)")
    p.add_argument("--method", default=None, help="method name (default: from the config's name)")
    p.add_argument("--steps", type=int, default=20, help="training steps per run (default 20)")
    p.add_argument("--rounds", type=int, default=1, help="baseline/HVS pairs of runs, alternating (default 1)")
    p.add_argument("--skip", type=int, default=3, help="first steps of a run not timed (default 3)")
    p.add_argument("--workdir", type=Path, default=Path("runs/bench_end_to_end"), help="folder for the runs")
    p.add_argument("--output", type=Path, default=None, help="also write the result as JSON")
    p.add_argument("overrides", nargs="*", help="key=value config overrides for both variants")
    args = p.parse_args(argv)
    try:
        result = benchmark(args.method or method_of(args.config), args.config, args.steps, args.rounds, args.skip,
                           args.workdir, args.overrides)
    except USER_ERRORS as err:
        print(f"python -m bench.end_to_end: error: {err}", file=sys.stderr)
        sys.exit(2)
    m = result["median_step_seconds"]
    print(f"{result['method']}: end-to-end step {m['baseline']:.3f} s (baseline) / {m['hvs']:.3f} s (HVS): "
          f"x{result['factor']:.2f} over {result['timed_steps']['hvs']} HVS steps")
    if args.output:
        write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()
