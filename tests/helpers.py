"""Helpers that several test modules share (fixtures live in conftest.py):
tiny image folders and run configs, the command line, and the assertions that
DINO's and iBOT's tests both make."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from common.engine.config import COMMON_SPEC, resolve
from common.engine.method import StepInfo
from common.views.data import make_image_folder  # noqa: F401  (re-exported for the tests)
from dino.method import DINOMethod

ROOT = Path(__file__).resolve().parents[1]


class Hooks:
    """A method as the selector sees it (:class:`common.hvs.SelectionHooks`) made of
    a model and two plain functions, ``outputs(candidates)`` and
    ``scores(outputs, combos)`` (the step is not used)."""

    def __init__(self, model, outputs, scores):
        self.model, self.outputs, self.scores = model, outputs, scores

    def candidate_outputs(self, model, candidates, step):
        return self.outputs(candidates)

    def combination_scores(self, outputs, combos, step):
        return self.scores(outputs, combos)


def read_log(out) -> list:
    """The rows of a run folder's ``log.jsonl``."""
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def cli(*args, env=None, cwd=ROOT, timeout=600):
    """Run ``python *args`` in the repository root; the completed process."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


TINY = [
    "model.arch=resnet18", "model.cifar_stem=true", "model.proj_hidden=64", "model.dim=64",
    "model.pred_dim=16", "augment.size=16", "augment.blur_p=0.5", "train.batch_size=8",
    "data.num_workers=0", "data.dataset=imagefolder", "run.log_every=1", "run.selection_log_every=1",
]


def tiny_cfg(method_cls, out, data_dir, *overrides):
    spec = {**COMMON_SPEC, **method_cls.spec}
    tiny = [o for o in TINY if o.split("=")[0] in spec]  # e.g. SimCLR has no predictor
    cfg = resolve(spec, None, tiny + [f"run.output_dir={out}", f"data.data_dir={data_dir}", *overrides])
    cfg["method"] = method_cls.name
    return cfg


VIT = ["model.arch=vit_tiny", "model.patch_size=4", "model.drop_path=0.1", "model.depth=2"]


def dino_cfg(out, data_dir, *overrides, arch=VIT):
    return tiny_cfg(DINOMethod, out, data_dir, *arch, "model.out_dim=32", "model.head_hidden=32",
                    "model.head_bottleneck=16", "augment.global_size=16", "augment.local_size=8",
                    "augment.n_local=2", "hvs.local_candidates=4", "optim.warmup_epochs=0",
                    "optim.momentum_teacher=0.9", "augment.blur_p=[1.0,0.1,0.5]", *overrides)


def multicrop_candidates(method, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = method.cfg["augment"]
    n_global = method.cfg["hvs"]["global_candidates"]
    return ([torch.randn(B, 3, a["global_size"], a["global_size"], generator=g) for _ in range(n_global)]
            + [torch.randn(B, 3, a["local_size"], a["local_size"], generator=g)
               for _ in range(method.cfg["hvs"]["local_candidates"])])


def assert_state_round_trips(make_method, keys):
    """The method's state (the loss module's buffers ``keys``, what the loop
    checkpoints as ``method_state``) restores a fresh method's buffers exactly."""
    a, b = make_method(), make_method()
    g = torch.Generator().manual_seed(0)
    for key in keys:
        getattr(a.loss, key).copy_(torch.randn(getattr(a.loss, key).shape, generator=g))
    state = a.state_dict()
    assert sorted(state) == sorted(keys) == sorted(a.loss.state_dict())
    assert all(state[k].device.type == "cpu" and state[k] is not getattr(a.loss, k) for k in keys)
    buffers = {k: getattr(b.loss, k) for k in keys}
    b.load_state_dict(copy.deepcopy(state))
    for key in keys:
        assert getattr(b.loss, key) is buffers[key]  # loaded into the registered buffer
        assert torch.equal(getattr(b.loss, key), getattr(a.loss, key))
        assert torch.equal(b.state_dict()[key], state[key])


def assert_schedule_sets_no_attribute(method, epochs=3, iters=4):
    """``schedule`` returns the step's values and changes no attribute of the
    method (nor of its loss module, nor its centres); the optimizer is its to set."""
    optimizer = method.build_optimizer(8)
    before, loss_before = dict(vars(method)), dict(vars(method.loss))
    state = copy.deepcopy(method.state_dict())
    values = [method.schedule(optimizer, StepInfo(e, i, iters)) for e in range(epochs) for i in range(iters)]
    assert vars(method).keys() == before.keys() and all(vars(method)[k] is v for k, v in before.items())
    assert vars(method.loss).keys() == loss_before.keys()
    assert all(vars(method.loss)[k] is v for k, v in loss_before.items())
    assert all(torch.equal(v, state[k]) for k, v in method.state_dict().items())
    assert all("lr" in v and "momentum" in v and "teacher_temp" in v for v in values)
    return values


def assert_exact_resume(make_cfg, method_cls, tmp_path, args, stop, state_keys, steps=8):
    """A run stopped after ``stop`` steps and resumed ends bitwise equal to an
    uninterrupted run: weights, the method's state ``state_keys`` (non-zero) and
    the logged losses.  ``make_cfg(out, *overrides)`` builds the config."""
    from common.engine import checkpoint as ckpt_io
    from common.engine.train import run

    run(make_cfg(tmp_path / "a", *args), method_cls)
    b = tmp_path / "b"
    run(make_cfg(b, *args, f"run.stop_after_steps={stop}"), method_cls)
    run(make_cfg(b, *args), method_cls)
    sa, sb = ckpt_io.load(tmp_path / "a" / "checkpoint.pth"), ckpt_io.load(b / "checkpoint.pth")
    assert sa["step"] == sb["step"] == steps
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    for key in state_keys:
        assert torch.equal(sa["method_state"][key], sb["method_state"][key])
        assert sa["method_state"][key].abs().sum() > 0
    la, lb = (read_log(out) for out in (tmp_path / "a", b))
    assert [(r["step"], r["loss"]) for r in la] == [(r["step"], r["loss"]) for r in lb]


def assert_knn_evaluates(checkpoint, tmp_path):
    """``python -m eval.knn`` runs on the checkpoint and writes a sane result."""
    r = cli("-m", "eval.knn", "--checkpoint", str(checkpoint), "knn.ks=[1,3]", "data.num_workers=0",
            "--output", str(tmp_path / "knn.json"))
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "knn.json").read_text())
    assert res["n_train"] == 32 and 0 <= res["knn"]["3"]["top1"] <= 100
