"""What every run of this repository shares: pretraining (``common/engine/train.py``),
the evaluations (``eval/engine.py``) and the benchmarks (``bench/``).

  1. the run folder: one run at a time (a lock), writable, no stale temporary
     files, ``config.yaml`` written only once the run is known to start, and
     left as it was when a run fails before it starts
  2. process group, device, mixed precision, seeds
  3. data order: a seeded permutation per epoch, split over ranks
  4. checkpoints: written atomically, never with non-finite weights, read back
     with ``weights_only=True`` and checked against the run (method, kind,
     layer shapes); the divergence guard that watches every step's loss
  5. user-facing errors: one line and exit status 2, no traceback
"""
from __future__ import annotations

import fcntl
import math
import os
import random
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from common.engine import checkpoint as ckpt_io
from common.engine import dist
from common.engine.config import ConfigError, dump, flatten
from common.views.data import DataError
from common.engine.logs import LogError


class RunError(RuntimeError):
    """A problem with the run folder the user can fix (in use, not writable)."""


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite; the message names the
    step and the last good checkpoint."""


#: exit status of a user-fixable error (bad value, missing data, foreign checkpoint, folder in use)
EXIT_USER = 2
#: exit status of a diverged run
EXIT_DIVERGED = 3


# ----------------------------------------------------------------------------
# 1. the run folder
# ----------------------------------------------------------------------------
class RunDir:
    """The output folder of one run, held by rank 0 for the life of the run.

    ``open()`` creates it if needed, takes an exclusive lock on ``.lock``
    (``fcntl.flock``: the operating system releases it when the process ends,
    however it ends, so a killed run never leaves a stale lock), checks that
    the folder is writable and removes temporary files that interrupted
    writes left behind (``.<name>.*.tmp``).  ``close(failed=True)`` removes a
    folder this run created and left empty, so a run that fails before it
    starts leaves nothing behind."""

    LOCK = ".lock"

    def __init__(self, path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._fd, self._created = None, False

    def open(self) -> "RunDir":
        if not self.enabled:
            return self
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunError(f"run.output_dir {path} exists and is not a folder")
        self._created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(path / self.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunError(f"cannot create the run folder {path}: {err.strerror or err}; "
                           "choose a writable run.output_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunError(f"the run folder {path} is in use by another run ({holder}); "
                           "wait for it to end, or choose another run.output_dir") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        self._check_writable()
        self._remove_stale_temporaries()
        return self

    def _check_writable(self) -> None:
        probe = self.path / f".write-test.{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"0")
        except OSError as err:
            self.close(failed=True)
            raise RunError(f"the run folder {self.path} is not writable ({err.strerror or err}): "
                           "choose another run.output_dir") from None
        finally:
            probe.unlink(missing_ok=True)

    def _remove_stale_temporaries(self) -> None:
        stale = [p for p in self.path.glob(".*.tmp") if p.is_file()]
        if stale:
            size = sum(p.stat().st_size for p in stale)
            for p in stale:
                p.unlink(missing_ok=True)
            print(f"removed {len(stale)} temporary file(s) ({size / 2**20:.1f} MiB) that interrupted "
                  f"writes left in {self.path}", file=sys.stderr, flush=True)

    def write_config(self, cfg: dict) -> None:
        """``config.yaml``: the resolved configuration (rank 0)."""
        if self.enabled:
            tmp = self.path / ".config.yaml.tmp"
            dump(cfg, tmp)
            os.replace(tmp, self.path / "config.yaml")

    def close(self, failed: bool = False) -> None:
        if self._fd is not None:
            if failed and self._created:
                (self.path / self.LOCK).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        if failed and self._created:
            try:
                self.path.rmdir()  # only if this run created it and left nothing in it
            except OSError:
                pass


# ----------------------------------------------------------------------------
# 2. processes, device, precision, seeds
# ----------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int) -> int:
    """Seed of a step's randomness on this rank: a function of the step, so that
    a resumed run draws what an uninterrupted one draws."""
    return seed * 1_000_003 + step * 101 + dist.rank()


def compile_backbones(model: "torch.nn.Module") -> list:
    """``torch.compile`` every backbone of ``model`` in place (the submodules
    named ``backbone``: SimSiam's and SimCLR's, DINO's and iBOT's student and
    teacher), so that the training step and the selection forward both run
    compiled code and the state-dict keys stay the same (checkpoints and
    evaluations are unchanged).  Compilation happens at the first call.
    Returns the names compiled."""
    if not hasattr(torch, "compile"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.compile")
    names = [name for name, _ in model.named_modules() if name.split(".")[-1] == "backbone"]
    for name in names:
        model.get_submodule(name).compile()
    return names


def cuda_math(device, tf32: bool = True) -> None:
    """On a GPU: TF32 for fp32 matrix products and convolutions, and cuDNN's
    autotuner (``cudnn.benchmark``: the fastest algorithm for each input shape,
    chosen at its first use), or neither with ``tf32=False``.  These are
    process-wide flags; on a CPU nothing changes."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    torch.backends.cudnn.benchmark = bool(tf32)


@contextmanager
def exact_fp32():
    """fp32 matrix products and convolutions without TF32 inside the block
    (a full-precision reference where :func:`cuda_math` turned TF32 on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def amp_settings(cfg, device):
    """(autocast context factory, GradScaler or None) of ``train.amp``; on a
    GPU also TF32 and cuDNN autotuning as ``train.tf32`` says (:func:`cuda_math`).
    On a CPU only ``bf16`` turns autocast on, and only where the CPU computes
    bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than
    fp32, and the step stays in fp32 (with a warning)."""
    cuda_math(device, cfg["train"].get("tf32", True))
    mode = cfg["train"]["amp"]
    if device.type == "cpu" and mode == "bf16":
        from common.hvs import cpu_has_bf16

        if cpu_has_bf16():
            return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None
        if dist.is_main():
            print("warning: train.amp=bf16: this CPU has neither AVX512-BF16 nor AMX; training in fp32",
                  file=sys.stderr, flush=True)
        return nullcontext, None
    if device.type != "cuda" or mode == "off":
        return nullcontext, None
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


@contextmanager
def run_session(cfg: dict):
    """Set up a run and hold it: ``with run_session(cfg) as (device, run_dir):``.

    Process group and device, the run folder (rank 0: lock, writability, stale
    temporaries), the global seeds.  Nothing is written besides the lock; the
    caller writes ``config.yaml`` (:meth:`RunDir.write_config`) once its
    checks passed.  If the body fails before that, a folder this run created
    is removed again."""
    device = dist.init(cfg["run"]["device"])
    run_dir = RunDir(cfg["run"]["output_dir"], enabled=dist.is_main()).open()
    dist.barrier()
    seed_everything(int(cfg["run"]["seed"]))
    failed = True
    try:
        yield device, run_dir
        failed = False
    finally:
        started = (run_dir.path / "config.yaml").exists()
        run_dir.close(failed=failed and not started)


def config_changes(old: dict, new: dict, ignore=("run.stop_after_steps",)) -> list:
    """Keys whose values differ between two resolved configs, e.g. ``["train.epochs: 2 -> 4"]``."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def warn_config_changes(old: dict, new: dict) -> None:
    """Tell a resumed run which config keys changed since its checkpoint."""
    changed = config_changes(old, new)
    if changed:
        print(f"warning: the config differs from the checkpoint's in {', '.join(changed)}: "
              "the resumed run follows the new values", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------
# 3. data order
# ----------------------------------------------------------------------------
class EpochSampler(Sampler):
    """A seeded permutation per epoch, split over ranks.  ``drop_last`` (the
    training default) keeps whole batches only; without it every sample is
    seen and the last batch of a rank may be smaller (the permutation is padded
    with its own start so that every rank gets as many samples).
    ``set_epoch(e, skip_batches=k)`` starts the epoch after its first k batches
    (resuming a run stopped inside an epoch).  With ``tag_steps`` it yields
    ``(index, training step)`` pairs, the step counted with ``steps_per_epoch``
    steps per epoch (default: its batches; for transforms that change over
    training).  With ``tag_epochs`` it yields ``(index, training step or None,
    epoch)``: the epoch travels with every index, so that loader workers that
    persist across epochs draw the views of the right epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 drop_last: bool = True, tag_steps: bool = False, steps_per_epoch: int | None = None):
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.drop_last = drop_last
        self.batches = self.count_batches(n, batch_size, world, drop_last)
        self.per_rank = self.batches * batch_size if drop_last else math.ceil(n / world)
        self.epoch, self.skip = 0, 0
        self.tag_steps = tag_steps
        self.steps_per_epoch = self.batches if steps_per_epoch is None else steps_per_epoch
        self.tag_epochs = False

    @staticmethod
    def count_batches(n: int, batch_size: int, world: int = 1, drop_last: bool = True) -> int:
        """Batches per rank and epoch of ``n`` samples (known before the dataset is made)."""
        if drop_last:
            return n // (batch_size * world)
        return math.ceil(math.ceil(n / world) / batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        total = self.per_rank * self.world
        perm = perm[:total] if self.drop_last else torch.cat([perm, perm[: total - self.n]])
        mine = perm[self.rank:: self.world][self.skip * self.bs:].tolist()
        if not self.tag_steps and not self.tag_epochs:
            return iter(mine)
        first = self.epoch * self.steps_per_epoch + self.skip
        steps = [first + k // self.bs if self.tag_steps else None for k in range(len(mine))]
        if self.tag_epochs:
            return iter(zip(mine, steps, [self.epoch] * len(mine)))
        return iter(zip(mine, steps))

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip * self.bs)


# ----------------------------------------------------------------------------
# 4. checkpoints and the divergence guard
# ----------------------------------------------------------------------------
def all_finite(tensors) -> bool:
    """Whether every floating-point tensor is finite (one host synchronisation)."""
    flags = [torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    if not flags:
        return True
    devices = {f.device for f in flags}
    flags = flags if len(devices) == 1 else [f.cpu() for f in flags]
    return bool(torch.stack(flags).all())  # one synchronisation, not one per tensor


class DivergenceGuard:
    """Watches every step's loss without a host synchronisation per step: a
    device tensor remembers the first step whose loss was not finite, and
    :meth:`check` (before every log line and checkpoint) raises
    :class:`Diverged` naming that step and the last good checkpoint."""

    def __init__(self, device, checkpoint_path: Path | None = None, last_good_step: int | None = None):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.path, self.last_good = checkpoint_path, last_good_step

    def update(self, loss: torch.Tensor, step: int) -> None:
        """``loss`` of the step numbered ``step`` (1-based, as logged)."""
        bad = ~torch.isfinite(loss.detach()).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def saved(self, step: int) -> None:
        self.last_good = step

    def _where(self) -> str:
        if self.path is None:
            return ""
        if self.last_good is None:
            return " No checkpoint was written before it."
        return (f" The last good checkpoint, {self.path} (step {self.last_good}), is left as it was: "
                "lower the learning rate (or fix the cause) and re-run to resume from it.")

    def check(self, weights=None) -> None:
        """Raise :class:`Diverged` if a loss so far was not finite (on any rank),
        or if ``weights`` (tensors about to be saved) are not all finite."""
        first = self.first_bad.clone()
        if dist.is_dist():  # the earliest bad step of any rank
            first = torch.where(first < 0, torch.full_like(first, 2**62), first)
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
            first = torch.where(first == 2**62, torch.full_like(first, -1), first)
        step = int(first)
        if step >= 0:
            raise Diverged(f"training diverged: the loss was not finite at step {step}.{self._where()}")
        if weights is not None and not all_finite(weights):
            raise Diverged(f"training diverged: the weights are no longer finite, so no checkpoint was "
                           f"written.{self._where()}")


def state_shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}


def check_same_shapes(path, saved: dict, built: dict, saved_cfg: dict, cfg: dict) -> None:
    """Refuse to resume a checkpoint whose layers differ from the model this
    run built (``model.dim``, ``model.cifar_stem``, ...): a clear error that
    names the first differing tensor and the model keys that changed."""
    a, b = state_shapes(saved), state_shapes(built)
    if a == b:
        return
    diff = sorted(set(a) ^ set(b)) or [k for k in sorted(a) if a[k] != b[k]]
    first = diff[0]
    what = (f"{first} has shape {list(a[first])} in the checkpoint and {list(b[first])} in this run"
            if first in a and first in b else
            f"{first} is only in {'the checkpoint' if first in a else 'this run'}")
    changed = [c for c in config_changes(saved_cfg, cfg) if c.startswith("model.")]
    hint = f" (changed: {', '.join(changed)})" if changed else ""
    raise ckpt_io.CheckpointError(f"{path} holds a model of other layer shapes than this run builds: {what}"
                                  f"{hint}; use the checkpoint's settings or another run.output_dir")


# ----------------------------------------------------------------------------
# 5. user-facing errors
# ----------------------------------------------------------------------------
USER_ERRORS = (DataError, ckpt_io.CheckpointError, ConfigError, RunError, LogError)


def one_line(err: Exception) -> str:
    """The message of ``err``; for an error raised in a DataLoader worker (which
    PyTorch re-raises with the worker's traceback in the message) the original
    message only."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    prefix = f"{type(err).__module__}.{type(err).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


def exit_on_error(name: str, body, extra_errors=()):
    """Run ``body()``; a user-fixable error ends the process with one line
    naming the problem (exit status 2), a divergence with status 3."""
    try:
        return body()
    except (*USER_ERRORS, *extra_errors) as err:
        print(f"{name}: error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER)
    except Diverged as err:
        print(f"{name}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_DIVERGED)
    finally:
        dist.cleanup()
