"""The end of a run's training log, for the tables of Section 5: the loss and
the collapse measure every method logs (``out_std``: the standard deviation of
the L2-normalised outputs over the batch, averaged over channels; about
1/sqrt(d) for d-dimensional outputs spread over the sphere, 0 for a collapsed
network; :func:`common.numerics.collapse_std`).  Easy selection collapses in
the paper (Appendix F.2: 0.1 % linear accuracy).

    python -m analysis.collapse --run runs/small/simsiam_easy_s0 --output results/small/simsiam_easy_s0_train.json

Writes ``{"run", "method", "steps", "first": {...}, "last": {...}}``: ``first``
and ``last`` average the loss, ``out_std`` (and the IoU policy's
``policy_iou`` and ``policy_draws`` where logged) over the first and the last
``--window`` logged steps."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from analysis.logs import AnalysisError, run_cli, write_json
from common.engine.logs import LogError, read_rows

KEYS = ("loss", "out_std", "policy_iou", "policy_draws", "sel_iou", "sel_lowest_iou")


def window_means(rows: list, keys=KEYS) -> dict:
    """The mean of every key over ``rows`` (keys absent from them left out)."""
    out = {}
    for key in keys:
        values = [float(r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(float(r[key]))]
        if values:
            out[key] = sum(values) / len(values)
    return out


def summarise(run: Path, window: int = 3) -> dict:
    log = Path(run) / "log.jsonl"
    if not log.is_file():
        raise LogError(f"{log} does not exist: is {run} a training run folder?")
    steps = [r for r in read_rows(log) if r.get("type") == "step"]
    if not steps:
        raise LogError(f"{log} has no step rows yet")
    method = None
    config = Path(run) / "config.yaml"
    if config.is_file():
        import yaml

        method = (yaml.safe_load(config.read_text()) or {}).get("method")
    return {"run": str(run), "method": method, "steps": steps[-1]["step"],  # steps done at the last row
            "first": window_means(steps[:window]), "last": window_means(steps[-window:])}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis.collapse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a training run folder (holds log.jsonl)")
    parser.add_argument("--output", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--window", type=int, default=3, help="logged steps averaged at each end (default 3)")
    return parser


def _run(args) -> dict:
    try:
        result = summarise(args.run, args.window)
    except LogError as err:
        raise AnalysisError(str(err)) from None
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, result)
    last = result["last"]
    print(f"{args.run}: {result['steps']} steps, last loss {last.get('loss', float('nan')):.4f}, "
          f"out_std {last.get('out_std', float('nan')):.4f}")
    return result


def main(argv=None) -> int:
    return run_cli(build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
