"""Wall-clock overhead of Hard View Selection per training step (paper Table 14, App. H).

Times, in one process and on the same model, a *baseline step* (the training
step of ``common/engine/train.py`` without HVS, on the first candidate of every crop
slot) and an *HVS step* at every selection resolution (the same step preceded
by the selector's no-grad forward over all candidates).  The configurations
are interleaved: every repeat times each of them once, in an order rotated from
repeat to repeat, so that machine noise and drift hit all of them alike.
Reported per configuration: the median step time, the overhead factor
median(HVS step) / median(baseline step), the median selection time alone and
the split of the HVS step: selection forward (the selector's
``candidate_outputs`` call), scoring (``combination_scores``), gathering (the
rest of the selector call: resizing, drawing the compared combinations, the
argmax and assembling the chosen views) and the training step (the rest of the
step: loss, backward, optimizer, hooks).  The library is not changed for this:
the method's two selection functions are timed where the selector calls them.

``--precision`` (``bench.precision``) is the selectors' ``hvs.precision``; with
a reduced one the share of samples whose choice agrees with an fp32 selector's
on the same inputs and combinations is printed too (one untimed fp32 selector
call per timed repeat).  ``--compile`` (``bench.compile=true``) wraps the
method's model with ``torch.compile`` for the baseline and the HVS steps (exit
status 2 with one line if compiling fails).

    python -m bench.overhead --arch resnet18 --image-size 64 --batch-size 32
    python -m bench.overhead --method dino --image-size 32 --batch-size 16 bench.repeats=5
    python -m bench.overhead --method ibot --image-size 32 --batch-size 16 bench.resolutions=[1.0,0.5]
    python -m bench.overhead --method simsiam --image-size 32 --precision bf16 --compile

The command line is that of every entry point (``common/engine/config.py``:
``--config YAML``, ``key=value`` overrides, ``--help`` lists every key);
the flags above are shortcuts for ``bench.method``, ``model.arch``,
``bench.image_size``, ``train.batch_size``, ``bench.precision`` and
``bench.compile=true``.

SimSiam and SimCLR: N views of one size per image, all C(N, 2) pairs compared.
BYOL, MoCo v3, Barlow Twins and VICReg (ResNet): N views, N/2 of each view
recipe, the (N/2)^2 pairs of one view of each compared.
DINO and iBOT: multi-crop candidates (``hvs.global_candidates`` global crops of
``bench.image_size``, ``hvs.local_candidates`` local crops of ``augment.local_size``),
``hvs.max_combinations`` (128) combinations compared per step; iBOT also
block-masks the global candidates and scores the masked-patch loss.  The
paper's Table 14 has factors for SimSiam and DINO only (no SimCLR, no iBOT).

Inputs are seeded random tensors: data loading and augmentation are not timed
(the paper's factors measure the training step only).
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from common.engine.config import COMMON_SPEC, ConfigError, resolve, setting
from common.hvs import PRECISIONS, HardViewSelector, native_bf16, selection_dtype
from common.engine.method import StepInfo
from common.views.multicrop import multicrop_pools
from common.engine.runtime import amp_settings, compile_backbones, exact_fp32, seed_everything
from common.engine.train import StepContext, train_step
from common.engine import registry
from dino.method import DINOMethod
from eval.knn import parse_cli, resolve_device


def image_candidates(cfg: dict, generator: torch.Generator) -> list:
    """N random views [B, 3, S, S] of one crop slot (SimSiam, SimCLR)."""
    B, S = int(cfg["train"]["batch_size"]), int(cfg["augment"]["size"])
    return [torch.randn(B, 3, S, S, generator=generator) for _ in range(int(cfg["hvs"]["n_views"]))]


def multicrop_candidates(cfg: dict, generator: torch.Generator) -> list:
    """Random multi-crop candidates [B, 3, S, S], pool after pool as
    :func:`common.views.multicrop.multicrop_pools` (``DINOMethod.pools``) orders them:
    the candidates of global slot 1 and of global slot 2 (``augment.global_size``),
    then the local candidates (``augment.local_size``)."""
    B, a = int(cfg["train"]["batch_size"]), cfg["augment"]
    sizes = [int(a["global_size"]), int(a["global_size"]), int(a["local_size"])]
    return [torch.randn(B, 3, size, size, generator=generator)
            for (n, _), size in zip(multicrop_pools(cfg), sizes) for _ in range(n)]


def pair_overrides(cfg: dict) -> list:
    """The method's config overrides of a pair method (SimSiam, SimCLR) from the
    benchmark's configuration."""
    m = cfg["model"]
    widths = [f"model.{key}={m[key]}" for key in ("proj_hidden", "dim") if m[key]]  # 0: the method's own
    return [f"model.arch={m['arch']}", f"model.cifar_stem={str(m['cifar_stem']).lower()}",
            f"augment.size={cfg['bench']['image_size']}", f"hvs.n_views={cfg['hvs']['n_views']}", *widths]


def dino_overrides(cfg: dict) -> list:
    """The method's config overrides of DINO (and iBOT) from the benchmark's
    configuration.  The last layer is not frozen: the step timed is a step after
    the first epoch, where it trains."""
    m, a, h = cfg["model"], cfg["augment"], cfg["hvs"]
    return [f"model.arch={m['arch']}", f"model.cifar_stem={str(m['cifar_stem']).lower()}",
            f"model.patch_size={m['patch_size']}", f"model.out_dim={m['out_dim']}",
            f"augment.global_size={cfg['bench']['image_size']}", f"augment.local_size={a['local_size']}",
            f"augment.n_local={a['n_local']}", f"hvs.global_candidates={h['global_candidates']}",
            f"hvs.local_candidates={h['local_candidates']}", "optim.freeze_last_layer=0"]


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
    overrides: Callable        # (cfg) -> the method's config overrides ("key=value") from the benchmark's config
    setting: Callable          # (cfg) -> one line describing the views and candidates, for the header
    arch: str                  # default model.arch
    paper_setting: str = ""    # what the paper's factors were measured on


#: a method's ``bench.views`` -> how the benchmark draws its candidates, sets its config and describes it
VIEWS = {
    "pair": (image_candidates, pair_overrides, pair_setting),  # one recipe, or two with N/2 candidates each
    "multicrop": (multicrop_candidates, dino_overrides, multicrop_setting),
    "multicrop_masks": (multicrop_candidates, dino_overrides, ibot_setting),
}


def bench_methods() -> dict:
    """{name: BenchMethod} of every registered method that declares ``bench``
    settings (:class:`common.engine.method.BenchSettings`)."""
    return {name: BenchMethod(cls, cls.bench.paper, *VIEWS[cls.bench.views], cls.bench.arch,
                              cls.bench.paper_setting)
            for name, cls in registry.method_classes().items() if cls.bench is not None}


#: Methods the benchmark knows.
METHODS = bench_methods()


def build_selector(method, cfg: dict, resolution: float, precision: str | None = None) -> HardViewSelector:
    """The selector of a run (:meth:`HardViewSelector.from_cfg`, as the loop builds
    it) at ``resolution`` (and ``precision``: by default the config's ``hvs.precision``)."""
    return HardViewSelector.from_cfg(method, cfg["hvs"], resolution, precision)


class TimedHooks:
    """``method`` as the selector sees it (:class:`common.hvs.SelectionHooks`),
    its two selection functions timed into ``split``'s ``forward_s`` and ``scoring_s``."""

    def __init__(self, method, split: SplitSelector):
        self.model = method.model
        self.candidate_outputs = split.timed(method.candidate_outputs, "forward_s")
        self.combination_scores = split.timed(method.combination_scores, "scoring_s")


class SplitSelector:
    """A selector as the training step calls it, with the method's
    ``candidate_outputs`` and ``combination_scores`` timed (CUDA
    synchronisation around each on GPU; :class:`TimedHooks`); the selection
    itself is unchanged.  Every other attribute is the selector's."""

    def __init__(self, selector: HardViewSelector, sync: Callable):
        self.selector, self.sync = selector, sync
        self.forward_s = self.scoring_s = 0.0
        self.last = None  # the Selection of the last call

    def __getattr__(self, name):
        return getattr(self.__dict__["selector"], name)

    def timed(self, fn: Callable, attr: str) -> Callable:
        def run(*args):
            self.sync()
            t0 = time.perf_counter()
            out = fn(*args)
            self.sync()
            setattr(self, attr, getattr(self, attr) + time.perf_counter() - t0)
            return out
        return run

    def __call__(self, candidates, method, step=None, *, generator=None, renders=None):
        self.forward_s = self.scoring_s = 0.0
        self.last = self.selector(candidates, TimedHooks(method, self), step, generator=generator, renders=renders)
        return self.last


def first_candidates(pools, candidates) -> list:
    """The baseline's views: the first k candidates of every pool (n, k)."""
    views, start = [], 0
    for n, k in pools:
        views += candidates[start:start + k]
        start += n
    return views


class Step:
    """One training step exactly as the loop runs it (``common.engine.train.train_step``),
    timed with CUDA synchronisation on GPU."""

    def __init__(self, method, optimizer, autocast, scaler, device):
        self.method = method  # method.model: its backbones compiled in place with --compile
        self.ctx = StepContext(method=method, ddp_model=method.model, optimizer=optimizer, autocast=autocast,
                               scaler=scaler, selector=None, device=device)

    def teacher_reused(self, selector) -> bool | None:
        """Whether the training step reuses the selection's teacher outputs
        (DINO, iBOT: only after a full-size selection, where it is exact; None: the
        method has no teacher)."""
        reuse = getattr(self.method, "reuse_teacher", None)
        if reuse is None:
            return None
        return bool(reuse and selector is not None and selector.resolution == 1.0)

    def __call__(self, candidates, selector=None, generator=None):
        """Run one step; return (step seconds, selection seconds).  With a
        :class:`SplitSelector` its ``forward_s``, ``scoring_s`` and ``last``
        hold the split and the selection of this step."""
        self.ctx.selector = selector
        if selector is None:
            candidates = first_candidates(self.method.pools(), candidates)
        self.ctx.sync()
        t0 = time.perf_counter()
        step = StepInfo(0, 0, 1, self.method.schedule(self.ctx.optimizer, StepInfo(0, 0, 1)))
        _, _, _, t_sel = train_step(self.ctx, candidates, step, generator, time_selection=True)
        self.ctx.sync()
        return time.perf_counter() - t0, t_sel

    def reference_choice(self, candidates, selector, generator) -> torch.Tensor:
        """The per-sample choice of ``selector`` (the fp32 reference, without
        TF32) on the model as it is now, called as the training step calls it,
        without training; the global RNG (iBOT's masks) is restored afterwards,
        so the timed step that follows draws the same random parts."""
        step = StepInfo(0, 0, 1, self.method.schedule(self.ctx.optimizer, StepInfo(0, 0, 1)))
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), exact_fp32(), self.ctx.autocast():
            sel = selector(candidates, self.method, step, generator=generator)
        return sel.choice


class CompileError(RuntimeError):
    """``torch.compile`` is unavailable or failed on the method's model."""


def compile_model(model):
    """The model with its backbones compiled in place, as ``train.compile``
    does (:func:`common.engine.runtime.compile_backbones`); compilation itself
    happens at the first call."""
    try:
        compile_backbones(model)
    except Exception as err:  # noqa: BLE001 - any failure is reported in one line
        raise CompileError(error_head(err)) from err
    return model


def error_head(err: BaseException) -> str:
    """The type and the first line of ``err``'s message (a compiler's error runs to pages)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


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


def method_config(cfg: dict) -> tuple[dict, list]:
    """The method's configuration (its own spec, resolved as training resolves
    it) of the benchmark's configuration, and the overrides that made it."""
    entry = METHODS[cfg["bench"]["method"]]
    overrides = [f"method={cfg['bench']['method']}", *entry.overrides(cfg), "hvs.enabled=true",
                 f"train.batch_size={cfg['train']['batch_size']}", f"train.amp='{cfg['train']['amp']}'",
                 f"train.tf32={str(cfg['train']['tf32']).lower()}", f"run.device={cfg['run']['device']}"]
    if cfg["bench"]["precision"]:  # filled by parse_args; empty: the method's own default
        overrides.append(f"hvs.precision={cfg['bench']['precision']}")
    return resolve({**COMMON_SPEC, **entry.cls.spec}, None, overrides), overrides


def benchmark(cfg: dict) -> dict:
    """Time the baseline and every resolution, interleaved; return the result dict."""
    b = cfg["bench"]
    entry = METHODS[b["method"]]
    device = torch.device(cfg["run"]["device"])
    mcfg, overrides = method_config(cfg)
    batch_size = mcfg["train"]["batch_size"]
    seed_everything(0)
    method = entry.cls(mcfg, device)
    method.model.to(device).train()
    optimizer = method.build_optimizer(batch_size)
    autocast, scaler = amp_settings(mcfg, device)
    if b["compile"]:
        compile_model(method.model)
    step = Step(method, optimizer, autocast, scaler, device)
    candidates = [c.to(device) for c in entry.candidates(mcfg, torch.Generator().manual_seed(0))]
    generator = torch.Generator().manual_seed(1)

    precision = mcfg["hvs"]["precision"]
    dtype = selection_dtype(precision, device)    # None: the selection runs in fp32
    configs = [None] + list(b["resolutions"])     # None: the baseline
    selectors = {r: SplitSelector(build_selector(method, mcfg, r), step.ctx.sync) for r in configs if r is not None}
    # the choices of a reduced-precision selection, or of an fp32 one in TF32, against exact fp32 ones
    tf32 = device.type == "cuda" and bool(mcfg["train"]["tf32"])
    references = ({r: build_selector(method, mcfg, r, "fp32") for r in selectors}
                  if (dtype is not None or tf32) and mcfg["hvs"]["mode"] != "random" else {})
    times = {r: [] for r in configs}
    sel_times = {r: [] for r in configs}
    split = {r: {"forward": [], "scoring": [], "gather": [], "training": []} for r in selectors}
    agree = {r: [0, 0] for r in references}       # samples agreeing, samples compared
    for rep in range(b["warmup"] + b["repeats"]):
        shift = rep % len(configs)
        timed = rep >= b["warmup"]
        for r in configs[shift:] + configs[:shift]:
            selector = selectors.get(r)
            if timed and r in references:  # untimed fp32 call: same model, inputs, combinations and masks
                state = generator.get_state()
                ref = step.reference_choice(candidates, references[r], torch.Generator().set_state(state))
                generator.set_state(state)
            try:
                t_step, t_sel = step(candidates, selector, generator)
            except Exception as err:  # noqa: BLE001
                if b["compile"] and rep == 0:  # compilation happens at each configuration's first call
                    raise CompileError(error_head(err)) from err
                raise
            if timed:
                times[r].append(t_step)
                sel_times[r].append(t_sel)
                if selector is not None:
                    parts = split[r]
                    parts["forward"].append(selector.forward_s)
                    parts["scoring"].append(selector.scoring_s)
                    parts["gather"].append(max(0.0, t_sel - selector.forward_s - selector.scoring_s))
                    parts["training"].append(max(0.0, t_step - t_sel))
                if r in references:
                    agree[r][0] += int((ref == selector.last.choice).sum())
                    agree[r][1] += int(ref.numel())

    base = statistics.median(times[None])
    rows = [{"resolution": r, "hvs_step_s": statistics.median(times[r]), "baseline_step_s": base,
             "factor": statistics.median(times[r]) / base, "selection_s": statistics.median(sel_times[r]),
             "forward_s": statistics.median(split[r]["forward"]), "scoring_s": statistics.median(split[r]["scoring"]),
             "gather_s": statistics.median(split[r]["gather"]), "training_s": statistics.median(split[r]["training"]),
             "agreement": agree[r][0] / agree[r][1] if r in agree else None,
             "paper_factor": (entry.paper or {}).get(r), "teacher_reused": step.teacher_reused(selectors[r]),
             "hvs_step_times": times[r], "selection_times": sel_times[r],
             "forward_times": split[r]["forward"], "scoring_times": split[r]["scoring"],
             "gather_times": split[r]["gather"], "training_times": split[r]["training"]}
            for r in configs if r is not None]
    any_selector = next(iter(selectors.values()), None)
    return {"device": device_name(device), "torch": torch.__version__, "method": b["method"],
            "arch": method.arch(mcfg), "cifar_stem": cfg["model"]["cifar_stem"], "image_size": b["image_size"],
            "batch_size": batch_size, "setting": entry.setting(mcfg), "pools": method.pools(),
            "max_combinations": mcfg["hvs"]["max_combinations"],
            "combinations": any_selector.num_combinations if any_selector else None,
            "amp": cfg["train"]["amp"] if device.type == "cuda" else "off",
            "tf32": bool(cfg["train"]["tf32"]) and device.type == "cuda", "paper_setting": entry.paper_setting,
            "precision": precision, "selection_dtype": str(dtype or torch.float32).replace("torch.", ""),
            "native_bf16": native_bf16(device), "compile": bool(b["compile"]),
            "threads": torch.get_num_threads(), "warmup": b["warmup"], "repeats": b["repeats"],
            "baseline_step_s": base, "baseline_step_times": times[None], "rows": rows,
            "overrides": overrides, "config": cfg, "command": "python -m bench.overhead " + " ".join(b["argv"])}


def format_table(res: dict) -> str:
    stem = " (cifar stem)" if res["cifar_stem"] and res["arch"].startswith("resnet") else ""
    head = (f"device {res['device']} | torch {res['torch']} | {res['method']} {res['arch']}{stem} | "
            f"{res['setting']} | batch {res['batch_size']} | amp {res['amp']} | "
            f"selection {res['precision']} ({res['selection_dtype']}) | compile {str(res['compile']).lower()} | "
            f"threads {res['threads']} | median of {res['repeats']} (+{res['warmup']} warm-up)")
    lines = [head, "resolution | HVS step (s) | baseline step (s) | overhead factor | selection (s) "
                   f"| paper T14 factor ({res['paper_setting']})"]
    for row in res["rows"]:
        paper = f"{row['paper_factor']:.2f}" if row["paper_factor"] is not None else "—"
        lines.append(f"{row['resolution']:>10.0%} | {row['hvs_step_s']:>12.4f} | {row['baseline_step_s']:>17.4f} "
                     f"| {row['factor']:>15.2f} | {row['selection_s']:>13.4f} | {paper}")
    agreement = any(row["agreement"] is not None for row in res["rows"])
    lines += ["split of the HVS step (median s; medians need not add up exactly):",
              "resolution | sel. forward | scoring | gathering | training step"
              + (f" | choices agreeing with fp32 ({res['selection_dtype']})" if agreement else "")]
    for row in res["rows"]:
        line = (f"{row['resolution']:>10.0%} | {row['forward_s']:>12.4f} | {row['scoring_s']:>7.4f} "
                f"| {row['gather_s']:>9.4f} | {row['training_s']:>13.4f}")
        if agreement:
            line += f" | {row['agreement']:.1%}" if row["agreement"] is not None else " | —"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Command line: the config layer of every entry point (common/engine/config.py)
# ---------------------------------------------------------------------------
#: Keys of the benchmark: what it times (``bench.*``) and the method settings it
#: varies, under the method's own key names (a value 0 takes the default said).
BENCH_SPEC = {
    "bench.method": setting("simsiam", "method timed (the paper's Table 14 has SimSiam and DINO only)",
                            sorted(METHODS)),
    "model.arch": setting("", "backbone (default: resnet18 for simsiam and simclr, vit_tiny for dino and ibot; "
                              "dino also takes resnet18/34/50/101, ibot only ViTs)"),
    "model.cifar_stem": setting(True, "ResNets: 3x3 stride-1 stem, no max-pool (for 32-64 px images)"),
    "bench.image_size": setting(64, "view size; dino, ibot: the global crop size", range="[1, inf)"),
    "train.batch_size": setting(32, "images per step", range="[1, inf)"),
    "hvs.n_views": setting(4, "pair methods: candidate views per image (paper: 4; byol, mocov3, barlowtwins, "
                                 "vicreg: even, half per view recipe)", range="[2, inf)"),
    "model.proj_hidden": setting(0, "pair methods: projector hidden width (0: the method's; barlowtwins, vicreg "
                                    "8192, their small profiles 2048)", range="[0, inf)"),
    "model.dim": setting(0, "pair methods: projector output width (0: the method's)", range="[0, inf)"),
    "augment.local_size": setting(0, "dino, ibot: local crop size (0: bench.image_size // 2)", range="[0, inf)"),
    "model.patch_size": setting(4, "dino, ibot: ViT patch size (the paper's ViT-S/16: 16); crop sizes must be "
                                   "multiples of it", range="[1, inf)"),
    "model.out_dim": setting(0, "dino, ibot: prototypes (0: 4096 on CPU; on GPU the method's own, DINO 65536, "
                                "iBOT 8192)", range="[0, inf)"),
    "augment.n_local": setting(0, "dino, ibot: local crops per image (0: the method's, DINO 8, iBOT 10)",
                               range="[0, inf)"),
    "hvs.global_candidates": setting(4, "dino, ibot: global candidates per image, split over the 2 global slots "
                                        "(paper: 4)", range="[2, inf)"),
    "hvs.local_candidates": setting(0, "dino, ibot: local candidates per image (0: 2 per local crop, DINO 16 "
                                       "(the paper's), iBOT 20)", range="[0, inf)"),
    "bench.resolutions": setting([1.0, 0.75, 0.5, 0.25], "fractions of the view size used by the selection forward "
                                 "(a list)", range="(0, 1]"),
    "bench.warmup": setting(2, "untimed rounds over all configurations", range="[0, inf)"),
    "bench.repeats": setting(7, "timed rounds; medians are reported", range="[1, inf)"),
    "run.device": COMMON_SPEC["run.device"],
    "train.amp": setting("off", "mixed precision (GPU only)", ["off", "bf16", "fp16"]),
    "train.tf32": COMMON_SPEC["train.tf32"],
    "bench.output": setting("results/overhead.json", "the JSON file written"),
    "bench.precision": setting("", "precision of the HVS selectors (hvs.precision): fp32, bf16, fp16 (GPU) or auto "
                                   "(bf16 where native, else fp32); empty: the method's hvs.precision default; a "
                                   "reduced one (or fp32 in TF32 on a GPU) also reports the choices' agreement "
                                   "with exact fp32 selection",
                               ["", *PRECISIONS]),
    "bench.compile": setting(False, "wrap the method's model with torch.compile (baseline and HVS steps); "
                                    "exit status 2 if compiling fails"),
}

#: flags kept for the keys set most often
SHORTCUTS = {"--method": "bench.method", "--arch": "model.arch", "--image-size": "bench.image_size",
             "--batch-size": "train.batch_size", "--device": "run.device", "--output": "bench.output",
             "--precision": "bench.precision"}
#: flags without a value: flag -> the override it stands for
SWITCHES = {"--compile": "bench.compile=true"}


def _finish(cfg: dict) -> None:
    """Fill the defaults that depend on the method and the device, and check
    what depends on several keys; then resolve the method's own config, so
    that every bad value is refused before a model is built."""
    method, m, a, h = cfg["bench"]["method"], cfg["model"], cfg["augment"], cfg["hvs"]
    resolve_device(cfg)
    m["arch"] = m["arch"] or METHODS[method].arch
    a["local_size"] = a["local_size"] or cfg["bench"]["image_size"] // 2
    # multi-crop defaults from the method's own recipe (SimSiam, SimCLR do not use them: DINO's)
    spec = {**DINOMethod.spec, **METHODS[method].cls.spec}
    m["out_dim"] = m["out_dim"] or (4096 if cfg["run"]["device"] == "cpu" else spec["model.out_dim"]["default"])
    a["n_local"] = a["n_local"] or spec["augment.n_local"]["default"]
    h["local_candidates"] = h["local_candidates"] or 2 * a["n_local"]
    b = cfg["bench"]
    b["precision"] = b["precision"] or {**COMMON_SPEC, **METHODS[method].cls.spec}["hvs.precision"]["default"]
    try:  # fp16 on a CPU is refused here (auto is resolved at run time: it queries the device)
        if b["precision"] != "auto":
            selection_dtype(b["precision"], torch.device(cfg["run"]["device"]))
    except ValueError as err:
        raise ConfigError(f"config bench.precision={b['precision']}: {err}") from None
    views = METHODS[method].cls.bench.views
    if views == "multicrop_masks" and not m["arch"].startswith("vit"):
        raise ConfigError(f"config model.arch={m['arch']}: {method} needs a ViT (patch tokens to mask)")
    if views.startswith("multicrop"):
        if m["arch"].startswith("vit"):
            for key, size in (("bench.image_size", cfg["bench"]["image_size"]), ("augment.local_size", a["local_size"])):
                if size % m["patch_size"]:
                    raise ConfigError(f"config {key}={size}: not a multiple of model.patch_size={m['patch_size']}")
        if not a["local_size"]:
            raise ConfigError(f"config augment.local_size: 0 (bench.image_size={cfg['bench']['image_size']} // 2)")
    mcfg, _ = method_config(cfg)  # the method's own checks (e.g. its ranges), before anything is built
    if METHODS[method].candidates is multicrop_candidates:
        try:
            multicrop_pools(mcfg)  # candidate counts that fit the crop slots
        except ValueError as err:
            raise ConfigError(f"config {err}") from None


def parse_args(argv=None) -> dict:
    """The resolved configuration of ``python -m bench.overhead``; every
    default filled (``model.arch``, ``model.out_dim``, ...) and ``bench.argv``
    the command line."""
    given = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_cli(BENCH_SPEC, "bench.overhead", __doc__, SHORTCUTS, [SWITCHES.get(a, a) for a in given],
                    finish=_finish)
    cfg["bench"]["argv"] = given
    return cfg


def main(argv=None) -> dict:
    cfg = parse_args(argv)
    try:
        res = benchmark(cfg)
    except CompileError as err:
        print(f"bench.overhead: error: --compile: torch.compile failed: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_table(res), flush=True)
    out = Path(cfg["bench"]["output"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"written {out}")
    return res


if __name__ == "__main__":
    main()
