"""Checkpoints: written atomically, loaded with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values only::

    {"format": "hvs-ckpt-1", "method": "simsiam", "arch": "resnet18", "config": {...},
     "epoch": e, "step": s, "model": state_dict, "optimizer": ..., "scaler": ...,
     "method_state": {...}, "rng": {...}}

``epoch`` is the number of finished epochs and ``step`` the number of optimizer
steps taken, so a resumed run starts at step ``step`` of epoch ``epoch``.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

FORMAT = "hvs-ckpt-1"


class CheckpointError(RuntimeError):
    pass


def _disk_full(err: BaseException) -> bool:
    """Whether ``err`` comes from a full disk or an exhausted quota: an
    ``OSError`` with ENOSPC/EDQUOT anywhere in its chain.  torch.save's zip
    writer turns the failed write into a RuntimeError ("unexpected pos ...")
    raised while the OSError is handled, so the errno is only found in the
    exception's ``__context__``."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        err = err.__cause__ or err.__context__
    return False


#: signals held back while a file is written: the preemption (USR2) and termination
#: signals whose Python handlers (submitit's requeue) raise SystemExit wherever the
#: program is, which inside torch.save's zip writer became a write error
DEFERRED_SIGNALS = {signal.SIGUSR2, signal.SIGTERM} if hasattr(signal, "SIGUSR2") else set()


@contextmanager
def signals_deferred():
    """Hold :data:`DEFERRED_SIGNALS` back until the block is done: their
    handlers are swapped for a recorder (a signal mask would not do: the
    signal goes to any thread that does not block it, e.g. torch's), and what
    arrived is handed to the original handlers afterwards (the default action
    re-raised), so a requeued run finds a whole checkpoint.  Main thread only;
    elsewhere nothing changes."""
    if not DEFERRED_SIGNALS or threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived = []
    # a handler installed outside Python (getsignal: None) could not be put back: left alone
    held = [s for s in DEFERRED_SIGNALS if signal.getsignal(s) is not None]
    old = {s: signal.signal(s, lambda signum, frame: arrived.append((signum, frame))) for s in held}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for signum, frame in arrived:
            handler = old[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def save_atomic(obj, path, dump=None) -> None:
    """Write ``obj`` with ``dump(obj, file)`` (default ``torch.save``) to a
    temporary file in the same folder, fsync, then rename over ``path``: a
    crash leaves either the old or the new checkpoint, never half.  A full disk
    is reported as such (:class:`CheckpointError`), the old file left in place.
    A preemption signal arriving during the write is handled after it
    (:func:`signals_deferred`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with signals_deferred():
            with os.fdopen(fd, "wb") as f:
                (dump or torch.save)(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _disk_full(err):
            free = shutil.disk_usage(path.parent).free
            raise CheckpointError(f"the disk is full: could not write {path} ({free / 2**20:.0f} MiB free on "
                                  f"its file system); the previous {path.name} is left as it was. "
                                  "Free some space and re-run to resume") from None
        raise


def write_text_atomic(path, text: str) -> None:
    """Write a small text file (a results JSON, a pointer to the last
    checkpoint) through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path, obj, default=None) -> None:
    """``obj`` as indented JSON through :func:`write_text_atomic` (the results
    files of the evaluations, analyses and benchmarks)."""
    import json

    write_text_atomic(path, json.dumps(obj, indent=2, default=default) + "\n")


def torch_load_safely(path, what: str = "checkpoint", require_zip: bool = True):
    """``torch.load(path, weights_only=True)`` on the CPU, every problem of the
    file (missing, a folder, empty, not a zip archive, truncated, objects other
    than tensors and plain values) a :class:`CheckpointError` naming it;
    ``what`` names the file in the message (e.g. "MODEL.WEIGHTS").
    ``require_zip=False`` also reads the format of torch before 1.6."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a folder, not a file: pass the checkpoint.pth inside it")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} {path} is empty (0 bytes): an interrupted copy or write?")
    with open(path, "rb") as f:
        if require_zip and f.read(4) != b"PK\x03\x04":
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive; "
                                  "this file is something else)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling problem is the user's file
        raise CheckpointError(f"cannot read {what} {path} with weights_only=True: {_load_failure(err)}") from None


def _load_failure(err: Exception) -> str:
    """One line of why ``torch.load(weights_only=True)`` failed."""
    import re

    text = str(err).strip()
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:  # torch's text is a page of advice on loading it anyway
        return (f"it holds an object of {refused.group(1)}, not only tensors and plain values; "
                "refusing to unpickle it (it could run code)")
    reason = text.splitlines()[0] if text else type(err).__name__
    if "zip archive" in reason:  # torch's own text goes on about miniz internals
        reason = "its zip archive is truncated or damaged"
    return reason


#: what every pretraining checkpoint holds, with the type of each
PRETRAINING_ENTRIES = {"method": str, "arch": str, "config": dict, "epoch": int, "step": int, "model": dict}


def check_pretraining_entries(path, ckpt: dict) -> None:
    """A pretraining checkpoint has every entry of :data:`PRETRAINING_ENTRIES`
    and a method of this repository."""
    from common.engine.registry import METHODS

    for key, kind in PRETRAINING_ENTRIES.items():
        if not isinstance(ckpt.get(key), kind):
            found = "missing" if key not in ckpt else f"a {type(ckpt[key]).__name__}"
            raise CheckpointError(f"{path} is damaged: its entry {key!r} is {found}, not a {kind.__name__}")
    if ckpt["method"] not in METHODS:
        raise CheckpointError(f"{path} was trained by method {ckpt['method']!r}, which this repository does not "
                              f"know (methods: {', '.join(sorted(METHODS))})")


def load(path, expect_method: str | None = None, expect_arch: str | None = None, fmt: str = FORMAT) -> dict:
    """Load a checkpoint safely (``weights_only=True``); refuse a file of another
    format (``fmt``: pretraining or evaluation checkpoints), method or
    architecture."""
    path = Path(path)
    ckpt = torch_load_safely(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        kind = "an evaluation" if fmt != FORMAT else "a pretraining"
        raise CheckpointError(f"{path} is not {kind} checkpoint of this repository (format {fmt!r} expected)")
    if fmt == FORMAT:
        check_pretraining_entries(path, ckpt)
    if expect_method is not None and ckpt["method"] != expect_method:
        raise CheckpointError(f"{path} is a {ckpt['method']!r} checkpoint, but this run trains "
                              f"{expect_method!r}: use another run.output_dir")
    if expect_arch is not None and ckpt["arch"] != expect_arch:
        raise CheckpointError(f"{path} holds architecture {ckpt['arch']!r}, but this run builds "
                              f"{expect_arch!r}: use another run.output_dir or model.arch={ckpt['arch']}")
    return ckpt


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": torch.from_numpy(np.random.get_state()[1].astype("int64")),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators of :func:`rng_state`.  The CUDA generators are
    restored per device that exists here and was saved: a run resumed with
    another number of visible GPUs (8 under torchrun, 1 per task under a
    cluster's GPU binding) restores the first ones and leaves the others."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype("uint32"), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        for index in range(min(len(state["cuda"]), torch.cuda.device_count())):
            torch.cuda.set_rng_state(state["cuda"][index], index)


def identity(ckpt: dict) -> str:
    """What tells two copies of a checkpoint apart: its ``id`` (a random token
    written with it), or for a checkpoint without one, a hash of its weights."""
    return str(ckpt.get("id") or state_fingerprint(ckpt["model"]))


def load_backbone(path, which: str = "auto", drop_path: float = 0.0):
    """Backbone of any checkpoint of this repository, ready for feature
    extraction: returns ``(backbone, info)`` where ``backbone(images) -> [B, D]``
    and ``info`` has method, arch, dataset, image_size, data_dir, epoch, step,
    hvs, which (the weights taken) and fingerprint (a hash of the backbone's
    weights).  ``which``: auto (teacher if the method has one), teacher or
    student.  ``drop_path``: stochastic depth of a ViT (finetuning)."""
    from common.engine.registry import get_method

    ckpt = load(path)
    method_cls = get_method(ckpt["method"])
    if which == "auto":
        which = "teacher" if method_cls.has_teacher else "student"
    try:
        backbone = method_cls.backbone_from_state(ckpt["config"], ckpt["model"], which, drop_path=drop_path)
    except ValueError as err:  # e.g. --which teacher for a method without one
        raise CheckpointError(f"{path}: {err}") from err
    except (RuntimeError, KeyError) as err:  # a model dictionary with tensors missing or of other shapes
        raise CheckpointError(f"{path}: its model dictionary does not fit the {ckpt['arch']} of "
                              f"{ckpt['method']}: {_state_mismatch(err)}") from None
    backbone.eval()
    cfg = ckpt["config"]
    info = {"method": ckpt["method"], "arch": ckpt["arch"], "dataset": cfg["data"]["dataset"],
            "image_size": method_cls.image_size(cfg), "data_dir": cfg["data"].get("data_dir"),
            "epoch": ckpt["epoch"], "step": ckpt["step"], "hvs": cfg["hvs"]["enabled"], "which": which,
            "fingerprint": fingerprint(backbone)}
    return backbone, info


def _state_mismatch(err: Exception) -> str:
    """One line of a failed ``load_state_dict`` (or a missing entry)."""
    import re

    if isinstance(err, KeyError):
        return f"no entry {err.args[0]!r}"
    text = str(err)
    parts = []
    for label in ("Missing key(s)", "Unexpected key(s)"):
        m = re.search(label + r" in state_dict: (.*)", text)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {label.split()[0].lower()} tensor(s), e.g. {keys[0]}" if keys else label)
    m = re.search(r"size mismatch for ([^:]+): (.*?)\.?$", text, re.M)
    if m:
        parts.append(f"{m.group(1)} of another shape ({m.group(2)})")
    return "; ".join(parts) or (text.strip().splitlines() or [type(err).__name__])[0]


def fingerprint(module) -> str:
    """SHA-256 of a module's parameters and buffers (names, shapes, dtypes and
    bytes), to recognise the same weights (e.g. that a frozen backbone did not
    change, or that an evaluation resumes on the checkpoint it started from)."""
    return state_fingerprint(module.state_dict())


def state_fingerprint(state: dict) -> str:
    """SHA-256 of a state dict's tensors (names, shapes, dtypes and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
