"""One-command GPU check for a lent GPU: ``bash bench/gpu_check.sh`` (issue 15, item 8).

Runs five sections and writes ONE JSON (default ``bench/gpu_check.json`` on GPU,
``bench/gpu_check_cpu.json`` on CPU; ``--output``):

1. ``smoke``: 3 steps of every method (SimSiam, SimCLR, DINO, iBOT; HVS on)
   through the real entry points (``python -m <method>.main --config
   configs/<method>_cifar10_gpu.yaml ...``), with AMP bf16 and fp16 (the
   GradScaler), one plain process each (no torchrun, no NCCL: one process on
   one GPU); per run ok/failed, seconds and the last loss of ``log.jsonl``.
2. ``overhead``: the paper's Table 14 factors at 224 px (``python -m
   bench.overhead``: SimSiam ResNet-50; DINO ViT-S/16 with 4 global + 16 local
   candidates, 128 combinations) at ``hvs.precision`` fp32 and bf16 (where
   ``bench.overhead`` takes that key; otherwise recorded as not run).
3. ``loader``: views per second of the training loader (``MultiViewDataset`` +
   ``DataLoader``) at 224 px, N = 2 and 4 views per image, with
   ``augment.device=loader`` and with ``model_crop`` (its device step on the
   GPU timed in).
4. ``memory``: peak ``torch.cuda.max_memory_allocated`` (and peak RSS) of every
   subprocess of the other sections, measured by a small in-process shim
   (``python -m bench.gpu_check --child MEMFILE MODULE ARGS...`` runs the module
   as ``python -m MODULE ARGS...`` would and records its peaks at exit).
5. ``signal``: SimSiam on the full CIFAR-10 training set, baseline and HVS with
   the same seed and the same number of steps (as many as fit in the section's
   time, from the whole wall time of a probe run: start-up, loader workers and
   checkpoints included), with ``augment.device=model_crop``, then
   ``python -m eval.knn`` on both checkpoints; k-NN top-1 of both.

The whole check is bounded by ``--budget-seconds`` (default 450 s: it fits 8
minutes on one GPU) by construction: each section has a share of it
(:data:`SHARES`; time a section leaves unused passes to the next), every
subprocess runs under a timeout that ends by its section's deadline (a run that
no longer fits is recorded as skipped), and the loader section stops timing at
its deadline.

``--tiny`` makes every section tiny (small models, 16 px images, a synthetic
image folder unless ``--data-dir`` is given); with ``--device cpu`` it runs
in a minute or two (``tests/test_gpu_check.py``).  Every section catches its
own failure (the error is recorded, the next section runs).  On CPU, AMP does
not apply: fp16 entries read "skipped (CPU)" and the bf16 entries run in fp32
(``common/engine/runtime.py:amp_settings`` turns AMP off on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import runpy
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common.engine.checkpoint import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
AMPS = ("bf16", "fp16")


def smoke_methods() -> list:
    """The registered methods the smoke section runs (``gpu_smoke`` in :mod:`common.engine.registry`)."""
    from common.engine.registry import method_classes

    return [name for name, cls in method_classes().items() if cls.gpu_smoke]
SECTIONS = ("smoke", "overhead", "loader", "signal")
#: each section's share of ``--budget-seconds`` (the sections run in this order)
SHARES = {"smoke": 0.30, "overhead": 0.27, "loader": 0.08, "signal": 0.35}
#: a subprocess is not started with less than this many seconds left in its section
MIN_RUN_S = 5.0


# ---------------------------------------------------------------------------
# child shim: run a module as ``python -m`` would, then record its peaks
# ---------------------------------------------------------------------------
def child(argv: list) -> None:
    memfile, module, args = argv[0], argv[1], argv[2:]
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    finally:
        peaks = {"max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            peaks["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            peaks["cuda_max_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
        Path(memfile).write_text(json.dumps(peaks))
    sys.exit(code)


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------
class Check:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.cuda = args.device == "cuda"
        self.tiny = args.tiny
        self.work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.commands: list = []
        self.memory: dict = {}
        self._synthetic = None
        self.deadline = float("inf")  # time.monotonic() by which the running section must end

    def remaining(self) -> float:
        """Seconds left in the running section."""
        return self.deadline - time.monotonic()

    # --- data ------------------------------------------------------------------
    def synthetic(self) -> Path:
        """A synthetic ImageFolder (root/{train,val}/classK/i.png): coloured noise."""
        if self._synthetic is None:
            from common.views.data import make_image_folder

            classes, per_class, size = (4, 8, 20) if self.tiny else (10, 60, 32)
            root = make_image_folder(self.work / "synthetic", classes, per_class, size, seed=0)
            self._synthetic = root
        return self._synthetic

    def data(self) -> tuple:
        """(dataset, data_dir, description) every section trains on."""
        if self.args.data_dir:
            return self.args.dataset, self.args.data_dir, f"{self.args.dataset} under {self.args.data_dir}"
        return "imagefolder", str(self.synthetic()), "synthetic image folder (no --data-dir)"

    # --- subprocesses ----------------------------------------------------------
    def run(self, section: str, name: str, module: str, args: list, timeout: float) -> dict:
        """Run ``python -m module args`` through the memory shim; a record of it.
        The run is killed at ``timeout`` seconds or at the section's deadline,
        whichever comes first; it is skipped if fewer than :data:`MIN_RUN_S` are left."""
        timeout = min(timeout, self.remaining())
        if timeout < MIN_RUN_S:
            return {"ok": None, "status": "skipped: the section's time budget is spent", "seconds": 0.0}
        memfile = self.work / "mem" / f"{section}_{name}.json"
        memfile.parent.mkdir(parents=True, exist_ok=True)
        command = "python -m " + module + " " + " ".join(shlex.quote(a) for a in args)
        self.commands.append({"section": section, "name": name, "command": command})
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.tiny and not self.cuda:  # tiny models: one thread each, no oversubscription on a shared CPU
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        t0 = time.perf_counter()
        try:
            p = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--child", str(memfile), module, *args],
                               cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", _text(e.stdout), _text(e.stderr) + f"\ntimed out after {timeout:.0f} s"
        seconds = time.perf_counter() - t0
        peaks = json.loads(memfile.read_text()) if memfile.exists() else {}
        self.memory.setdefault(section, {})[name] = peaks
        rec = {"ok": rc == 0, "returncode": rc, "seconds": round(seconds, 2), "command": command}
        if rc != 0:
            rec["error"] = (err or out)[-2000:]
        return rec

    # --- 1. smoke --------------------------------------------------------------
    def method_overrides(self, method: str) -> list:
        """Config file and overrides of a smoke run of ``method``."""
        from common.engine.config import COMMON_SPEC
        from common.engine.registry import get_method

        spec = {**COMMON_SPEC, **get_method(method).spec}
        dataset, data_dir, _ = self.data()
        common = [f"data.dataset={dataset}", f"data.data_dir={data_dir}", "hvs.enabled=true", "run.log_every=1",
                  f"run.device={self.device}"]
        if not self.tiny:
            subset = [] if dataset == "imagefolder" else ["data.subset=2048"]
            return ["--config", f"configs/{method}_cifar10_gpu.yaml", *common, *subset,
                    f"data.num_workers={min(8, os.cpu_count() or 1)}"]
        if "augment.size" in spec:  # one crop size: a pair method
            tiny = ["model.arch=resnet18", "model.cifar_stem=true", "model.proj_hidden=64", "model.dim=64",
                    "model.pred_dim=16", "augment.size=16", "augment.blur_p=0.5"]
        else:
            tiny = ["model.arch=vit_tiny", "model.patch_size=4", "model.depth=2", "model.out_dim=32",
                    "model.head_hidden=32", "model.head_bottleneck=16", "augment.global_size=16",
                    "augment.local_size=8", "augment.n_local=2", "hvs.local_candidates=4",
                    "optim.warmup_epochs=0", "optim.momentum_teacher=0.9"]
        tiny = [o for o in tiny if o.split("=")[0] in spec]  # e.g. SimCLR has no predictor
        return [*common, *tiny, "train.batch_size=8", "data.num_workers=0", "run.selection_log_every=1"]

    def smoke(self) -> dict:
        steps = self.args.smoke_steps
        out = {"steps": steps, "note": "single plain process per run (no torchrun): NCCL is not exercised"}
        for method in smoke_methods():
            for amp in AMPS:
                key = f"{method}/{amp}"
                if not self.cuda and amp == "fp16":
                    out[key] = {"ok": None, "status": "skipped (CPU)"}
                    continue
                run_dir = self.work / "smoke" / f"{method}_{amp}"
                args = [*self.method_overrides(method), f"run.output_dir={run_dir}",
                        f"run.stop_after_steps={steps}", f"train.amp={amp}"]
                rec = self.run("smoke", key, f"{method}.main", args, timeout=180 if self.cuda else 300)
                if rec["ok"] is None:
                    out[key] = rec
                    continue
                if not self.cuda:
                    rec["note"] = "AMP off on CPU: this run is fp32"
                rows = _log_rows(run_dir)
                rec["steps_logged"] = len(rows)
                rec["final_loss"] = rows[-1]["loss"] if rows else None
                if rows and "step_time" in rows[-1]:
                    rec["last_step_s"] = rows[-1]["step_time"]
                if rec["ok"] and (not rows or rows[-1]["step"] < steps):
                    rec["ok"] = False
                    rec["error"] = f"log.jsonl has {len(rows)} step rows, expected {steps}"
                out[key] = rec
        return out

    # --- 2. overhead -------------------------------------------------------------
    def overhead(self) -> dict:
        from bench import overhead as ov

        # the selection's precision: bench.precision (the benchmark's own key) or hvs.precision, where it exists
        precision_key = next((k for k in ("bench.precision", "hvs.precision") if k in ov.BENCH_SPEC), None)
        out = {"precision_key": precision_key}
        if self.tiny:
            runs = {"simsiam": ["--method", "simsiam", "--arch", "resnet18", "model.cifar_stem=true",
                                "--image-size", "16", "--batch-size", "4"],
                    "dino": ["--method", "dino", "--image-size", "8", "model.patch_size=4", "--batch-size", "2",
                             "model.out_dim=32", "augment.n_local=2", "hvs.local_candidates=4"]}
            timing = ["bench.repeats=1", "bench.warmup=0", "bench.resolutions=[1.0,0.5]"]
        else:
            runs = {"simsiam": ["--method", "simsiam", "--arch", "resnet50", "model.cifar_stem=false",
                                "--image-size", "224", "--batch-size", str(self.args.overhead_batch)],
                    "dino": ["--method", "dino", "--arch", "vit_small", "model.patch_size=16", "--image-size", "224",
                             "augment.local_size=96", "--batch-size", str(self.args.overhead_batch),
                             "hvs.global_candidates=4", "hvs.local_candidates=16", "augment.n_local=8"]}
            timing = [f"bench.repeats={self.args.overhead_repeats}", "bench.warmup=1"]
            if self.cuda:
                timing.append("train.amp=bf16")
        for method, base in runs.items():
            # DINO's fp32 selection once more without TF32 and cuDNN autotuning (train.tf32=false): what they buy
            for prec in ("fp32", "bf16", *(["fp32_no_tf32"] if method == "dino" else [])):
                key = f"{method}/{prec}"
                if prec == "fp32_no_tf32":
                    if not self.cuda:
                        out[key] = {"ok": None, "status": "skipped (CPU: TF32 and cuDNN autotuning are GPU settings)"}
                        continue
                    base, prec = [*base, "train.tf32=false"], "fp32"
                if not precision_key:
                    out[key] = {"ok": None, "status": "not run: bench.overhead has no precision key "
                                                      "(selection runs in the training step's precision)"}
                    if prec == "fp32":  # still time the default selection once
                        key = f"{method}/default"
                    else:
                        continue
                result = self.work / "overhead" / f"{key.replace('/', '_')}.json"
                args = [*base, *timing, "--device", self.device, "--output", str(result)]
                if precision_key:
                    args.append(f"{precision_key}={prec}")
                rec = self.run("overhead", key, "bench.overhead", args, timeout=300)
                if result.exists():
                    res = json.loads(result.read_text())
                    rec.update(setting=res.get("setting"), combinations=res.get("combinations"),
                               baseline_step_s=res.get("baseline_step_s"), amp=res.get("amp"), tf32=res.get("tf32"),
                               factors={str(r["resolution"]): r["factor"] for r in res["rows"]},
                               agreement={str(r["resolution"]): r.get("agreement") for r in res["rows"]},
                               selection_s={str(r["resolution"]): r["selection_s"] for r in res["rows"]},
                               paper_factors={str(r["resolution"]): r["paper_factor"] for r in res["rows"]})
                out[key] = rec
        return out

    # --- 3. loader -----------------------------------------------------------------
    def loader(self) -> dict:
        """Views per second, N = 2 and 4, of the loader with ``augment.device``
        ``loader`` (all in PIL in the workers) and ``model_crop`` (the workers
        decode; crop, resize, flip and colour on this device, timed in)."""
        import torch
        from torch.utils.data import DataLoader

        from common.views.augment import MultiViewTransform, ViewRecipe, collate
        from common.views.data import build_dataset
        from common.views.pipeline import ViewPipeline

        dataset, data_dir, what = self.data()
        base = build_dataset(dataset, "train", data_dir)
        size, batch = (32, 4) if self.tiny else (224, self.args.loader_batch)
        workers = 0 if self.tiny else min(self.args.loader_workers, os.cpu_count() or 1)
        batches = 2 if self.tiny else self.args.loader_batches
        out = {"data": what, "image_size": size, "batch_size": batch, "num_workers": workers,
               "cpu_count": os.cpu_count()}
        for where in ("loader", "model_crop"):
            for n in (2, 4):
                key = f"N={n}" if where == "loader" else f"{where} N={n}"
                if self.remaining() < MIN_RUN_S:
                    out[key] = {"ok": None, "status": "skipped: the section's time budget is spent"}
                    continue
                pipeline = ViewPipeline.rendering(MultiViewTransform(slots=[(ViewRecipe(size=size), n)]), where)
                ds = pipeline.dataset(base, seed=0)
                loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                    pin_memory=self.cuda, persistent_workers=False, collate_fn=collate,
                                    generator=torch.Generator().manual_seed(0))
                it = iter(loader)
                next(it)  # worker start-up and the first batch: not timed
                t0, done = time.perf_counter(), 0
                for _ in range(batches):
                    if self.remaining() <= 0:  # the section's deadline: stop timing here
                        break
                    try:
                        loaded = next(it)
                    except StopIteration:
                        break
                    pipeline.to_device(loaded, self.device)  # the views on the device (model_crop: made there)
                    done += 1
                if self.cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                del it
                out[key] = {"batches": done, "seconds": round(dt, 3),
                            "images_per_s": done * batch / dt if done else None,
                            "views_per_s": done * batch * n / dt if done else None}
        return out

    # --- 5. signal -------------------------------------------------------------------
    def signal(self) -> dict:
        dataset, data_dir, what = self.data()
        out = {"data": what, "seed": 0}
        if self.tiny:
            common = [*self.method_overrides("simsiam"), "data.subset=0", "run.seed=0"]
            common = [a for a in common if not a.startswith("hvs.enabled")]
        else:
            common = ["--config", "configs/simsiam_cifar10_gpu.yaml", f"data.dataset={dataset}",
                      f"data.data_dir={data_dir}", f"run.device={self.device}", "run.seed=0",
                      f"data.num_workers={min(8, os.cpu_count() or 1)}", "run.log_every=10",
                      "train.amp=bf16" if self.cuda else "train.amp=off"]
        common.append("augment.device=model_crop")  # device-side augmentation (the same pixels as the loader's)
        out["augment_device"] = "model_crop"
        arms = {"hvs": "hvs.enabled=true", "baseline": "hvs.enabled=false"}
        if self.tiny:
            steps = self.args.signal_steps or 3
        elif self.args.signal_steps:
            steps = self.args.signal_steps
        else:
            # probe: the HVS arm's first steps (resumed below, so not wasted) give its step time
            probe = 30
            run_dir = self.work / "signal" / "hvs"
            rec = self.run("signal", "hvs_probe", "simsiam.main",
                           [*common, arms["hvs"], f"run.output_dir={run_dir}", f"run.stop_after_steps={probe}"],
                           timeout=self.remaining() / 3)
            if not rec["ok"]:
                raise RuntimeError(f"signal probe failed: {rec.get('error', rec.get('status', ''))}")
            # the probe's whole wall time per step (start-up, loader workers, checkpoint included), an upper
            # bound of a step's cost; a quarter of what is left is kept for the two k-NN evaluations
            per_step = rec["seconds"] / probe
            train_s = 0.75 * self.remaining()
            steps = max(probe, int((train_s + probe * per_step) / (2 * per_step)))
            out["probe"] = {**rec, "steps": probe, "wall_per_step_s": per_step}
        out["steps"] = steps
        for k, (arm, flag) in enumerate(arms.items()):
            run_dir = self.work / "signal" / arm
            left = 2 * (len(arms) - k)  # training runs and k-NN evaluations still to run, this one included
            rec = self.run("signal", arm, "simsiam.main",
                           [*common, flag, f"run.output_dir={run_dir}", f"run.stop_after_steps={steps}"],
                           timeout=self.remaining() * (0.5 if k == 0 else 0.75))
            rows = _log_rows(run_dir)
            rec["final_loss"] = rows[-1]["loss"] if rows else None
            rec["epochs_done"] = rows[-1]["epoch"] + 1 if rows else None
            ckpt = run_dir / "checkpoint.pth"
            knn_json = self.work / "signal" / f"knn_{arm}.json"
            knn_args = ["--checkpoint", str(ckpt), "--output", str(knn_json), f"run.device={self.device}",
                        f"data.num_workers={0 if self.tiny else min(8, os.cpu_count() or 1)}"]
            if self.tiny:
                knn_args.append("knn.ks=[1,3]")
            knn = self.run("signal", f"knn_{arm}", "eval.knn", knn_args,
                           timeout=self.remaining() / (left - 1))
            if knn_json.exists():
                res = json.loads(knn_json.read_text())
                ks = res["knn"]
                k = "20" if "20" in ks else sorted(ks, key=int)[-1]
                knn.update(k=int(k), top1=ks[k]["top1"], all=ks, n_train=res.get("n_train"),
                           n_test=res.get("n_test"))
            rec["knn"] = knn
            out[arm] = rec
        out["knn_top1"] = {arm: out[arm]["knn"].get("top1") for arm in arms}
        return out


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _log_rows(run_dir: Path) -> list:
    log = Path(run_dir) / "log.jsonl"
    if not log.exists():
        return []
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("type") == "step" and "loss" in r]


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": device, "host_cpus": os.cpu_count(), "platform": platform.platform()}
    if device == "cuda" and torch.cuda.is_available():
        env.update(device_name=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported(),
                   total_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    except OSError:
        pass
    return env


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    p.add_argument("--tiny", action="store_true", help="tiny models and data: a CPU smoke test of this script")
    p.add_argument("--output", default=None, help="JSON written (default bench/gpu_check.json on GPU, "
                                                  "bench/gpu_check_cpu.json on CPU)")
    p.add_argument("--data-dir", default=None, help="data root holding --dataset (default: a synthetic folder)")
    p.add_argument("--dataset", default="cifar10", help="dataset under --data-dir (default cifar10)")
    p.add_argument("--work-dir", default=None, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--smoke-steps", type=int, default=3)
    p.add_argument("--overhead-batch", type=int, default=64)
    p.add_argument("--overhead-repeats", type=int, default=3)
    p.add_argument("--loader-batch", type=int, default=128)
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--loader-workers", type=int, default=8)
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="wall time of the whole check, shared by the sections (default 450: within 8 minutes; "
                        "with --tiny 1200, a CPU self-test on a shared machine)")
    p.add_argument("--signal-steps", type=int, default=0, help="fixed steps per arm instead of the time box")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.budget_seconds is None:
        args.budget_seconds = 1200.0 if args.tiny else 450.0
    if args.output is None:
        args.output = str(ROOT / "bench" / ("gpu_check.json" if args.device == "cuda" else "gpu_check_cpu.json"))
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--child"]:
        child(argv[1:])
    args = parse_args(argv)
    t_start = time.perf_counter()
    check = Check(args)
    result = {"argv": argv, "tiny": args.tiny,
              "threads": "OMP_NUM_THREADS=1 in every subprocess (tiny CPU run)" if args.tiny and args.device == "cpu"
              else "default", "work_dir": str(check.work), "environment": environment(args.device),
              "sections": {}}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    shares = {name: SHARES[name] for name in args.sections}
    start, used = time.monotonic(), 0.0
    for name in args.sections:
        used += shares[name] / sum(shares.values())
        check.deadline = start + used * args.budget_seconds  # what an earlier section left passes on
        print(f"[gpu_check] section {name} ({check.remaining():.0f} s) ...", flush=True)
        t0 = time.perf_counter()
        try:
            section = {"ok": True, **getattr(check, name)()}
        except Exception as err:  # every section records its own failure and the next one runs
            section = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        section["wall_s"] = round(time.perf_counter() - t0, 2)
        result["sections"][name] = section
        print(f"[gpu_check] section {name}: {'ok' if section['ok'] else 'FAILED'} in {section['wall_s']} s",
              flush=True)
        write_json_atomic(out, result, default=str)  # partial results survive a kill
    result["sections"]["memory"] = {
        "ok": True, "unit": "MiB",
        "note": ("peak torch.cuda.max_memory_allocated / max_memory_reserved and peak RSS of every subprocess"
                 if args.device == "cuda" else "CPU run: no GPU memory; peak RSS of every subprocess"),
        **check.memory}
    result["commands"] = check.commands
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    write_json_atomic(out, result, default=str)
    print(f"[gpu_check] written {out} ({result['wall_s']} s)", flush=True)
    return result


if __name__ == "__main__":
    main()
