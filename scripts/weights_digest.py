"""One SHA-256 per tiny training run of every method, baseline and with HVS.

A refactoring that must not change any computed value is checked by running
this before and after it and comparing the two outputs line by line:

    python scripts/weights_digest.py > before.txt
    # ... change the code ...
    python scripts/weights_digest.py > after.txt && diff before.txt after.txt

Each run trains three steps (three epochs of one step, one epoch of warm-up
where the method has one) at 16 px on a small synthetic image folder, on one
CPU thread.  The digest covers the checkpoint's model weights, the method's
state (centres, ...) and the optimizer's state and hyperparameters.  The digests
are comparable only on the same machine and torch build.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests.helpers import VIT, make_image_folder, tiny_cfg  # noqa: E402

STEPS = ["train.epochs=3", "run.max_steps_per_epoch=1"]
#: the HVS runs' extra settings (the pair methods draw 4 candidates, the multi-crop ones 4 locals)
HVS = ["hvs.enabled=true"]
DINO_LIKE = ["model.out_dim=32", "model.head_hidden=32", "model.head_bottleneck=16", "augment.global_size=16",
             "augment.local_size=8", "augment.n_local=2", "hvs.local_candidates=4", "optim.momentum_teacher=0.9",
             "augment.blur_p=[1.0,0.1,0.5]", "optim.warmup_epochs=1"]


def runs():
    """``(label, method class, overrides)`` of every run, in a fixed order."""
    from barlowtwins.method import BarlowTwinsMethod
    from byol.method import BYOLMethod
    from dino.method import DINOMethod
    from stn.method import STNDINOMethod
    from ibot.method import IBOTMethod
    from mocov3.method import MoCoV3Method
    from simclr.method import SimCLRMethod
    from simsiam.method import SimSiamMethod
    from vicreg.method import VICRegMethod

    two_recipes = ["augment.blur_p=[1.0,0.1]", "optim.warmup_epochs=1"]
    table = [
        ("simsiam", SimSiamMethod, []),
        ("simclr", SimCLRMethod, ["model.dim=16", "optim.warmup_epochs=1", "loss.temperature=0.5"]),
        ("byol", BYOLMethod, ["model.pred_hidden=32", "model.proj_hidden=32", "model.dim=16", *two_recipes]),
        ("mocov3_resnet", MoCoV3Method, ["augment.blur_p=[0.5,0.5]", "model.mlp_hidden=32", "model.dim=16",
                                         "optim.warmup_epochs=1", "optim.momentum_encoder=0.9"]),
        ("mocov3_vit", MoCoV3Method, ["augment.blur_p=[0.5,0.5]", "model.mlp_hidden=32", "model.dim=16",
                                      "optim.warmup_epochs=1", "optim.momentum_encoder=0.9", "model.arch=vit_tiny",
                                      "model.patch_size=4", "model.depth=1", "model.proj_layers=3",
                                      "model.pred_last_bn=true", "optim.name=adamw", "optim.lr=1.5e-4",
                                      "optim.weight_decay=0.1", "loss.temperature=0.2"]),
        ("barlowtwins", BarlowTwinsMethod, ["model.proj_hidden=64", "model.dim=32", *two_recipes]),
        ("vicreg", VICRegMethod, ["model.proj_hidden=64", "model.dim=32", *two_recipes]),
        ("dino", DINOMethod, [*VIT, *DINO_LIKE]),
        ("ibot", IBOTMethod, [*VIT, *DINO_LIKE]),
        ("dino_stn", STNDINOMethod, [*VIT, *DINO_LIKE, "stn.input_size=16", "stn.hidden=4"]),
    ]
    for label, cls, overrides in table:
        yield label, cls, overrides
        if label != "dino_stn":  # the STN adversary makes its crops itself: nothing to select
            yield f"{label}_hvs", cls, [*overrides, *HVS]


def tensor_digest(h, name: str, value) -> None:
    """Feed ``name`` and ``value`` (tensors, dicts, lists, plain values) into ``h``."""
    h.update(name.encode())
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            tensor_digest(h, f"{name}/{key}", value[key])
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            tensor_digest(h, f"{name}[{i}]", item)
    else:
        h.update(repr(value).encode())


def digest(checkpoint: Path) -> str:
    from common.engine import checkpoint as ckpt_io

    state = ckpt_io.load(checkpoint)
    h = hashlib.sha256()
    for key in ("step", "model", "method_state", "optimizer"):
        tensor_digest(h, key, state.get(key))
    return h.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, help="labels of the runs to make (default: all)")
    args = parser.parse_args(argv)
    from common.engine.train import run

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        images = make_image_folder(Path(tmp) / "images")
        for label, cls, overrides in runs():
            if args.only and label not in args.only:
                continue
            out = Path(tmp) / label
            cfg = tiny_cfg(cls, out, images, *overrides, *STEPS)
            with contextlib.redirect_stdout(sys.stderr):  # the loop's progress lines
                run(cfg, cls)
            print(f"{label:20s} {digest(out / 'checkpoint.pth')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
