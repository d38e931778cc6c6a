"""Wall-clock overhead of Hard View Selection per training step (paper Table 14, App. H).

Times, in one process and on the same model, a *baseline step* (the training
step of ``common/train.py`` without HVS, on the first candidate of every crop
slot) and an *HVS step* at every selection resolution (the same step preceded
by the selector's no-grad forward over all candidates).  The configurations
are interleaved: every repeat times each of them once, in an order rotated from
repeat to repeat, so that machine noise and drift hit all of them alike.
Reported per configuration: the median step time, the overhead factor
median(HVS step) / median(baseline step) and the median selection time alone.

    python -m bench.overhead --arch resnet18 --image-size 64 --batch-size 32
    python -m bench.overhead --method dino --image-size 32 --batch-size 16
    python -m bench.overhead --method ibot --image-size 32 --batch-size 16

SimSiam and SimCLR: N views of one size per image, all C(N, 2) pairs compared.
DINO and iBOT: multi-crop candidates (``hvs.global_candidates`` global crops of
``--image-size``, ``hvs.local_candidates`` local crops of ``--local-size``),
``hvs.max_combinations`` (128) combinations compared per step; iBOT also
block-masks the global candidates and scores the masked-patch loss.  The
paper's Table 14 has factors for SimSiam and DINO only (no SimCLR, no iBOT).

Inputs are seeded random tensors: data loading and augmentation are not timed
(the paper's factors measure the training step only).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from common.config import COMMON_SPEC, resolve
from common.hvs import HardViewSelector
from common.multicrop import multicrop_pools
from common.train import StepContext, amp_settings, seed_everything, train_step
from dino.method import DINOMethod
from ibot.method import IBOTMethod
from simclr.method import SimCLRMethod
from simsiam.method import SimSiamMethod


def image_candidates(cfg: dict, generator: torch.Generator) -> list:
    """N random views [B, 3, S, S] of one crop slot (SimSiam, SimCLR)."""
    B, S = int(cfg["train"]["batch_size"]), int(cfg["augment"]["size"])
    return [torch.randn(B, 3, S, S, generator=generator) for _ in range(int(cfg["hvs"]["n_views"]))]


def multicrop_candidates(cfg: dict, generator: torch.Generator) -> list:
    """Random multi-crop candidates [B, 3, S, S], pool after pool as
    :func:`common.multicrop.multicrop_pools` (``DINOMethod.pools``) orders them:
    the candidates of global slot 1 and of global slot 2 (``augment.global_size``),
    then the local candidates (``augment.local_size``)."""
    B, a = int(cfg["train"]["batch_size"]), cfg["augment"]
    sizes = [int(a["global_size"]), int(a["global_size"]), int(a["local_size"])]
    return [torch.randn(B, 3, size, size, generator=generator)
            for (n, _), size in zip(multicrop_pools(cfg), sizes) for _ in range(n)]


def pair_overrides(args) -> list:
    """Config overrides of a pair method (SimSiam, SimCLR) from the command line."""
    return [f"model.arch={args.arch}", f"model.cifar_stem={str(args.cifar_stem).lower()}",
            f"augment.size={args.image_size}", f"hvs.n_views={args.n_views}"]


def dino_overrides(args) -> list:
    """Config overrides of DINO (and iBOT) from the command line.  The last layer
    is not frozen: the step timed is a step after the first epoch, where it trains."""
    return [f"model.arch={args.arch}", f"model.cifar_stem={str(args.cifar_stem).lower()}",
            f"model.patch_size={args.patch_size}", f"model.out_dim={args.out_dim}",
            f"augment.global_size={args.image_size}", f"augment.local_size={args.local_size}",
            f"augment.n_local={args.n_local}", f"hvs.global_candidates={args.global_candidates}",
            f"hvs.local_candidates={args.local_candidates}", "optim.freeze_last_layer=0"]


def pair_setting(cfg: dict) -> str:
    return f"image {cfg['augment']['size']} px | n_views {cfg['hvs']['n_views']}"


def multicrop_setting(cfg: dict) -> str:
    a, h, m = cfg["augment"], cfg["hvs"], cfg["model"]
    return (f"crops 2 x {a['global_size']} px + {a['n_local']} x {a['local_size']} px | candidates "
            f"{h['global_candidates']} global + {h['local_candidates']} local | {h['max_combinations'] or 'all'} "
            f"combinations | out_dim {m['out_dim']}")


def ibot_setting(cfg: dict) -> str:
    k = cfg["mask"]
    return f"{multicrop_setting(cfg)} | masks ratio {k['ratio']} var {k['ratio_var']}"


class BenchMethod(NamedTuple):
    cls: type                  # the SSLMethod subclass
    paper: dict | None         # resolution -> overhead factor of the paper's Table 14 (None: not in it)
    candidates: Callable       # (cfg, generator) -> list of candidate tensors, pool after pool
    overrides: Callable        # (args) -> the method's config overrides ("key=value") from the command line
    setting: Callable          # (cfg) -> one line describing the views and candidates, for the header
    arch: str                  # default --arch
    paper_setting: str = ""    # what the paper's factors were measured on


#: Methods the benchmark knows.
METHODS = {
    "simsiam": BenchMethod(SimSiamMethod, {1.0: 1.55, 0.75: 1.45, 0.5: 1.24, 0.25: 1.16},
                           image_candidates, pair_overrides, pair_setting, "resnet18", "SimSiam RN50 GPU"),
    "simclr": BenchMethod(SimCLRMethod, None, image_candidates, pair_overrides, pair_setting, "resnet18",
                          "no SimCLR factor in the paper"),
    "dino": BenchMethod(DINOMethod, {1.0: 2.15, 0.75: 1.68, 0.5: 1.56, 0.25: 1.50},
                        multicrop_candidates, dino_overrides, multicrop_setting, "vit_tiny",
                        "DINO ViT-S/16 GPU, 4 global + 16 local candidates, 128 combinations"),
    "ibot": BenchMethod(IBOTMethod, None, multicrop_candidates, dino_overrides, ibot_setting, "vit_tiny",
                        "no iBOT factor in the paper: Table 14 has SimSiam and DINO only"),
}


def build_selector(method, cfg: dict, resolution: float) -> HardViewSelector:
    """The selector exactly as ``common.train.run`` builds it, at ``resolution``."""
    h = cfg["hvs"]
    return HardViewSelector(method.pools(), mode=h["mode"], max_combinations=h["max_combinations"],
                            resolution=resolution, bn_mode=h["bn_mode"], size_multiple=method.size_multiple)


def first_candidates(pools, candidates) -> list:
    """The baseline's views: the first k candidates of every pool (n, k)."""
    views, start = [], 0
    for n, k in pools:
        views += candidates[start:start + k]
        start += n
    return views


class Step:
    """One training step exactly as the loop runs it (``common.train.train_step``),
    timed with CUDA synchronisation on GPU."""

    def __init__(self, method, optimizer, autocast, scaler, device):
        self.method = method
        self.ctx = StepContext(method, method.model, method.model, optimizer, autocast, scaler, None, device)

    def teacher_reused(self, selector) -> bool | None:
        """Whether the training step reuses the selection's teacher outputs
        (DINO, iBOT: only after a full-size selection, where it is exact; None: the
        method has no teacher)."""
        reuse = getattr(self.method, "reuse_teacher", None)
        if reuse is None:
            return None
        return bool(reuse and selector is not None and selector.resolution == 1.0)

    def __call__(self, candidates, selector=None, generator=None):
        """Run one step; return (step seconds, selection seconds)."""
        self.ctx.selector = selector
        if selector is None:
            candidates = first_candidates(self.method.pools(), candidates)
        self.ctx.sync()
        t0 = time.perf_counter()
        self.method.schedule(self.ctx.optimizer, 0, 0, 1)
        _, _, _, t_sel = train_step(self.ctx, candidates, 0, 0, 1, generator, time_selection=True)
        self.ctx.sync()
        return time.perf_counter() - t0, t_sel


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return f"cpu ({platform.processor() or platform.machine()})"


def benchmark(args) -> dict:
    """Time the baseline and every resolution, interleaved; return the result dict."""
    entry = METHODS[args.method]
    device = torch.device(args.device)
    overrides = [f"method={args.method}", *entry.overrides(args), "hvs.enabled=true",
                 f"train.batch_size={args.batch_size}", f"train.amp='{args.amp}'", f"run.device={args.device}"]
    cfg = resolve({**COMMON_SPEC, **entry.cls.spec}, None, overrides)
    seed_everything(0)
    method = entry.cls(cfg, device)
    method.model.to(device).train()
    optimizer = method.build_optimizer(args.batch_size)
    autocast, scaler = amp_settings(cfg, device)
    step = Step(method, optimizer, autocast, scaler, device)
    candidates = [c.to(device) for c in entry.candidates(cfg, torch.Generator().manual_seed(0))]
    generator = torch.Generator().manual_seed(1)

    configs = [None] + [float(r) for r in args.resolutions]     # None: the baseline
    selectors = {r: build_selector(method, cfg, r) for r in configs if r is not None}
    times = {r: [] for r in configs}
    sel_times = {r: [] for r in configs}
    for rep in range(args.warmup + args.repeats):
        shift = rep % len(configs)
        for r in configs[shift:] + configs[:shift]:
            t_step, t_sel = step(candidates, selectors.get(r), generator)
            if rep >= args.warmup:
                times[r].append(t_step)
                sel_times[r].append(t_sel)

    base = statistics.median(times[None])
    rows = [{"resolution": r, "hvs_step_s": statistics.median(times[r]), "baseline_step_s": base,
             "factor": statistics.median(times[r]) / base, "selection_s": statistics.median(sel_times[r]),
             "paper_factor": (entry.paper or {}).get(r), "teacher_reused": step.teacher_reused(selectors[r]),
             "hvs_step_times": times[r], "selection_times": sel_times[r]}
            for r in configs if r is not None]
    any_selector = next(iter(selectors.values()), None)
    return {"device": device_name(device), "torch": torch.__version__, "method": args.method,
            "arch": method.arch(cfg), "cifar_stem": args.cifar_stem, "image_size": args.image_size,
            "batch_size": args.batch_size, "setting": entry.setting(cfg), "pools": method.pools(),
            "max_combinations": cfg["hvs"]["max_combinations"],
            "combinations": len(any_selector.all_combos) if any_selector else None,
            "amp": args.amp if device.type == "cuda" else "off", "paper_setting": entry.paper_setting,
            "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats,
            "baseline_step_s": base, "baseline_step_times": times[None], "rows": rows,
            "overrides": overrides, "command": "python -m bench.overhead " + " ".join(args.argv)}


def format_table(res: dict) -> str:
    stem = " (cifar stem)" if res["cifar_stem"] and res["arch"].startswith("resnet") else ""
    head = (f"device {res['device']} | torch {res['torch']} | {res['method']} {res['arch']}{stem} | "
            f"{res['setting']} | batch {res['batch_size']} | amp {res['amp']} | "
            f"threads {res['threads']} | median of {res['repeats']} (+{res['warmup']} warm-up)")
    lines = [head, "resolution | HVS step (s) | baseline step (s) | overhead factor | selection (s) "
                   f"| paper T14 factor ({res['paper_setting']})"]
    for row in res["rows"]:
        paper = f"{row['paper_factor']:.2f}" if row["paper_factor"] is not None else "—"
        lines.append(f"{row['resolution']:>10.0%} | {row['hvs_step_s']:>12.4f} | {row['baseline_step_s']:>17.4f} "
                     f"| {row['factor']:>15.2f} | {row['selection_s']:>13.4f} | {paper}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="simsiam", choices=sorted(METHODS))
    p.add_argument("--arch", default=None,
                   help="backbone (default: resnet18 for simsiam/simclr, vit_tiny for dino and ibot; "
                        "dino also takes resnet18/34/50/101, ibot only ViTs)")
    p.add_argument("--cifar-stem", default=True, action=argparse.BooleanOptionalAction,
                   help="ResNets: 3x3 stride-1 stem, no max-pool (for 32-64 px images)")
    p.add_argument("--image-size", type=int, default=64, help="view size; DINO, iBOT: the global crop size")
    p.add_argument("--batch-size", type=int, default=32)
    g = p.add_argument_group("simsiam, simclr")
    g.add_argument("--n-views", type=int, default=4, help="candidate views per image (paper: 4)")
    g = p.add_argument_group("dino, ibot")
    g.add_argument("--local-size", type=int, default=None, help="local crop size (default: --image-size // 2)")
    g.add_argument("--patch-size", type=int, default=4, help="ViT patch size (default 4; the paper's ViT-S/16: 16)")
    g.add_argument("--out-dim", type=int, default=None,
                   help="prototypes (default: 4096 on CPU; on GPU the method's own, DINO 65536, iBOT 8192)")
    g.add_argument("--n-local", type=int, default=None, help="local crops per image (default: DINO 8, iBOT 10)")
    g.add_argument("--global-candidates", type=int, default=4,
                   help="global candidates per image, split over the 2 global slots (paper: 4)")
    g.add_argument("--local-candidates", type=int, default=None,
                   help="local candidates per image (default: 2 per local crop: DINO 16 (the paper's), iBOT 20)")
    p.add_argument("--resolutions", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25],
                   help="fractions of the view size used by the selection forward")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds over all configurations")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds; medians are reported")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (GPU only)")
    p.add_argument("--output", default="results/overhead.json")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU visible")
    if args.arch is None:
        args.arch = METHODS[args.method].arch
    if args.local_size is None:
        args.local_size = args.image_size // 2
    # multi-crop defaults from the method's own recipe (SimSiam, SimCLR do not use them: DINO's)
    spec = {**DINOMethod.spec, **METHODS[args.method].cls.spec}
    if args.out_dim is None:
        args.out_dim = 4096 if args.device == "cpu" else spec["model.out_dim"]["default"]
    if args.n_local is None:
        args.n_local = spec["augment.n_local"]["default"]
    if args.local_candidates is None:
        args.local_candidates = 2 * args.n_local
    if args.method == "ibot" and not args.arch.startswith("vit"):
        p.error(f"--method ibot needs a ViT (patch tokens to mask), not --arch {args.arch}")
    if args.method in ("dino", "ibot") and args.arch.startswith("vit"):
        for name, size in (("--image-size", args.image_size), ("--local-size", args.local_size)):
            if size % args.patch_size:
                p.error(f"{name} {size} is not a multiple of --patch-size {args.patch_size}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    res = benchmark(args)
    print(format_table(res), flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"written {out}")
    return res


if __name__ == "__main__":
    main()
