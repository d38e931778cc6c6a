"""Does reduced-precision selection choose what fp32 selection chooses?
(issue 15, item 1: ``hvs.precision``).

Loads a pretraining checkpoint (any method), draws the method's HVS
candidates from real training images with the run's own augmentation, and
runs the selector on the same candidates and the same compared combinations
twice: at fp32 and at ``--precision`` (bf16 by default).  Reported:

* ``agreement``: the share of samples whose reduced-precision choice is the
  fp32 choice;
* ``loss_gap``: the mean, over samples, of fp32 score of the fp32 choice
  minus fp32 score of the reduced-precision choice (0 where they agree, > 0
  where the reduced precision chose a combination the fp32 loss finds easier),
  and the same divided by the mean spread (max - min) of the sample's scores;
* the median time of the selection (forward + scoring) at both precisions,
  timed alternately in one process, and their ratio.

    python -m bench.precision --checkpoint runs/small/simsiam_hvs_s0/checkpoint.pth --batches 8
    python -m bench.precision --checkpoint runs/small/dino_hvs_s0/checkpoint.pth --precision bf16 --output p.json

The training state is that of the checkpoint (model, method state: DINO's
centre, ...), the images those of the run's dataset (``--data-dir`` or the
run's ``data.data_dir``/``HVS_DATA_DIR``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common.engine import checkpoint as ckpt_io
from common.views.augment import collate
from common.views.data import DataError, build_dataset
from common.hvs import PRECISIONS, HardViewSelector, selection_dtype
from common.engine.method import StepInfo
from common.engine.registry import get_method
from common.views.pipeline import ViewPipeline


def load_method(path: Path, device: torch.device):
    """The method of a checkpoint with its trained state, and the run's config."""
    state = ckpt_io.load(path)
    cfg = state["config"]
    cfg["hvs"]["enabled"] = True
    method = get_method(state["method"])(cfg, device)
    method.model.to(device).load_state_dict(state["model"])
    method.load_state_dict(state["method_state"])
    method.model.train()  # as in training: the selector handles BatchNorm and stochastic depth
    return method, cfg, state


def candidate_batches(cfg: dict, method, data_dir, batches: int, batch_size: int, seed: int):
    """``batches`` lists of candidate tensors drawn from the run's training
    set, made by the run's view pipeline (its ``augment.device`` step on the CPU)."""
    d = cfg["data"]
    base = build_dataset(d["dataset"], "train", data_dir or d["data_dir"], download=False)
    pipeline = ViewPipeline.from_cfg(cfg, method)
    dataset = pipeline.dataset(base, seed=seed)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    for b in range(batches):
        items = [dataset[int(i)] for i in order[b * batch_size:(b + 1) * batch_size]]
        yield pipeline.to_device(collate(items), "cpu").candidates


def measure(method, cfg: dict, batches, precision: str, seed: int = 0) -> dict:
    h = cfg["hvs"]
    device = next(method.model.parameters()).device
    if selection_dtype(precision, device) is None:
        raise ValueError(f"--precision {precision} is fp32 on {device}: nothing to compare")
    ref, low = (HardViewSelector.from_cfg(method, h, precision=p) for p in ("fp32", precision))
    optimizer = method.build_optimizer(int(cfg["train"]["batch_size"]))
    epochs = int(cfg["train"]["epochs"])
    values = method.schedule(optimizer, StepInfo(epochs - 1, 0, 1))  # the schedule at the run's last epoch
    step = StepInfo(epochs - 1, 0, 1, values)
    agree, gaps, rel_gaps, times = [], [], [], {"fp32": [], precision: []}
    for k, candidates in enumerate(batches):
        candidates = [c.to(device) for c in candidates]
        runs = {}
        for name, selector in (("fp32", ref), (precision, low)) if k % 2 == 0 else ((precision, low), ("fp32", ref)):
            torch.manual_seed(seed + k)  # the same random parts (iBOT's masks) for both precisions
            t0 = time.perf_counter()
            runs[name] = selector(candidates, method, step, generator=torch.Generator().manual_seed(seed + k))
            if k > 0:  # the first batch warms up both precisions' kernels
                times[name].append(time.perf_counter() - t0)
        a, b = runs["fp32"], runs[precision]
        if not torch.equal(a.combos, b.combos):
            raise RuntimeError("the two selections compared different combinations")
        s = a.scores
        best = s.gather(1, a.choice[:, None])[:, 0]
        theirs = s.gather(1, b.choice[:, None])[:, 0]
        spread = (s.max(1).values - s.min(1).values).clamp_min(1e-12)
        agree.append((a.choice == b.choice).float())
        gaps.append(best - theirs)
        rel_gaps.append((best - theirs) / spread)
    agree, gaps, rel_gaps = torch.cat(agree), torch.cat(gaps), torch.cat(rel_gaps)
    if not times["fp32"]:
        raise ValueError("--batches must be at least 2 (the first batch is not timed)")
    t32, tlow = statistics.median(times["fp32"]), statistics.median(times[precision])
    return {"precision": precision, "samples": len(agree), "agreement": agree.mean().item(),
            "loss_gap": gaps.mean().item(), "loss_gap_relative_to_spread": rel_gaps.mean().item(),
            "selection_seconds": {"fp32": t32, precision: tlow}, "time_ratio": tlow / t32}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="a pretraining checkpoint.pth (any method)")
    p.add_argument("--precision", default="bf16", choices=[x for x in PRECISIONS if x != "fp32"],
                   help="the reduced precision compared with fp32 (default bf16; fp16 needs a GPU)")
    p.add_argument("--batches", type=int, default=8, help="batches of candidates (default 8; the first is not timed)")
    p.add_argument("--batch-size", type=int, default=0, help="samples per batch (default: the run's batch size)")
    p.add_argument("--data-dir", default=None, help="data root (default: the run's data.data_dir or HVS_DATA_DIR)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, views and compared combinations")
    p.add_argument("--output", type=Path, default=None, help="also write the result as JSON")
    args = p.parse_args(argv)
    try:
        torch.manual_seed(args.seed)
        method, cfg, state = load_method(args.checkpoint, torch.device(args.device))
        bs = args.batch_size or int(cfg["train"]["batch_size"])
        batches = candidate_batches(cfg, method, args.data_dir, args.batches, bs, args.seed)
        result = {"checkpoint": str(args.checkpoint), "method": state["method"], "arch": state["arch"],
                  "step": state["step"], **measure(method, cfg, batches, args.precision, args.seed)}
    except (ckpt_io.CheckpointError, DataError, ValueError) as err:
        print(f"python -m bench.precision: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{result['method']} ({result['arch']}, step {result['step']}), {result['samples']} samples: "
          f"{args.precision} selection agrees with fp32 on {100 * result['agreement']:.1f} %; "
          f"mean fp32 loss gap {result['loss_gap']:.5f} ({100 * result['loss_gap_relative_to_spread']:.2f} % of "
          f"the spread of a sample's scores); selection time x{result['time_ratio']:.2f} of fp32")
    if args.output:
        ckpt_io.write_json_atomic(args.output, result)
    return result


if __name__ == "__main__":
    main()
