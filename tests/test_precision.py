"""Reduced-precision selection (``hvs.precision``): the selection forward under
autocast, scores compared in fp32, fp32 exactly as before."""
import pytest
import torch
from torch import nn

from common import hvs
from common.engine.config import ConfigError
from common.hvs import HardViewSelector, selection_dtype
from common.engine.train import run
from simsiam.method import SimSiamMethod
from tests.helpers import Hooks, tiny_cfg

CPU = torch.device("cpu")


class Probe(nn.Module):
    """A linear map that records the dtype it computed in."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.dtypes = []

    def forward(self, x):
        y = self.fc(x)
        self.dtypes.append(y.dtype)
        return y


def select(precision, candidates, model):
    selector = HardViewSelector([(len(candidates), 2)], precision=precision)

    def scores(outputs, combos):  # negative cosine of every pair, per sample
        z = torch.nn.functional.normalize(torch.stack(outputs), dim=-1)
        return -(z[combos[:, 0]] * z[combos[:, 1]]).sum(-1).T

    return selector(candidates, Hooks(model, lambda c: [model(v) for v in c], scores))


def test_bf16_selection_runs_in_bf16_and_scores_in_fp32():
    torch.manual_seed(0)
    model, candidates = Probe(), [torch.randn(16, 8) for _ in range(4)]
    ref = select("fp32", candidates, model)
    assert set(model.dtypes) == {torch.float32}
    model.dtypes.clear()
    low = select("bf16", candidates, model)
    assert set(model.dtypes) == {torch.bfloat16} and low.scores.dtype == torch.float32
    # well-separated scores: the same choices; the scores within bf16 rounding
    assert (low.choice == ref.choice).float().mean() >= 0.9
    torch.testing.assert_close(low.scores, ref.scores, atol=0.05, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(ref.views, select("fp32", candidates, model).views))


def test_fp32_selection_leaves_training_autocast():
    """hvs.precision=fp32 is fp32 even inside the training step's autocast."""
    model, candidates = Probe(), [torch.randn(4, 8) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        select("fp32", candidates, model)
    assert set(model.dtypes) == {torch.float32}


def test_auto_is_bf16_only_where_native(monkeypatch):
    monkeypatch.setattr(hvs, "native_bf16", lambda device: False)
    assert selection_dtype("auto", CPU) is None
    monkeypatch.setattr(hvs, "native_bf16", lambda device: True)
    assert selection_dtype("auto", CPU) is torch.bfloat16
    assert selection_dtype("fp32", CPU) is None and selection_dtype("bf16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        selection_dtype("fp16", CPU)
    with pytest.raises(ValueError, match="hvs.precision"):
        HardViewSelector(precision="int8")


def test_fp16_on_cpu_is_a_config_error(tmp_path, image_root):
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        run(tiny_cfg(SimSiamMethod, tmp_path / "x", image_root, "hvs.enabled=true", "hvs.precision=fp16"),
            SimSiamMethod)


@pytest.mark.slow
def test_precision_bench_on_a_checkpoint(tmp_path, tiny_checkpoints, image_root):
    from bench.precision import main

    result = main(["--checkpoint", str(tiny_checkpoints["dino_hvs"]), "--batches", "2", "--batch-size", "4",
                   "--data-dir", str(image_root), "--output", str(tmp_path / "p.json")])
    assert result["method"] == "dino" and result["samples"] == 8
    assert 0 <= result["agreement"] <= 1 and result["loss_gap"] >= -1e-6
    assert (tmp_path / "p.json").is_file()


def test_train_compile_compiles_the_backbones_in_place(tmp_path, image_root, monkeypatch):
    """train.compile=true compiles every backbone (student and teacher for DINO) for the training step and
    the selection forward, keeping the state-dict keys (checkpoints unchanged)."""
    from common.engine import checkpoint as ckpt_io
    from common.engine.runtime import compile_backbones
    from dino.method import DINOMethod
    from tests.helpers import dino_cfg

    calls = []

    def fake_compile(fn, *args, **kwargs):  # stands in for inductor (minutes on a CPU); records what is compiled
        calls.append(getattr(fn, "__self__", fn))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    method = DINOMethod(dino_cfg(tmp_path / "d", image_root), CPU)
    keys = list(method.model.state_dict())
    assert compile_backbones(method.model) == ["student.backbone", "teacher.backbone"]
    assert calls == [method.model.student.backbone, method.model.teacher.backbone]
    assert list(method.model.state_dict()) == keys

    calls.clear()
    out = tmp_path / "s"
    run(tiny_cfg(SimSiamMethod, out, image_root, "train.epochs=1", "hvs.enabled=true", "train.compile=true"),
        SimSiamMethod)
    assert len(calls) == 1 and all(k.startswith(("backbone.", "projector.", "predictor."))
                                   for k in ckpt_io.load(out / "checkpoint.pth")["model"])


# --- the selection's autocast inside the training step's autocast --------------------
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_step(method_name, amp, precision, monkeypatch):
    """One training step (``common.engine.train.train_step``) of a tiny SimSiam or DINO
    under CPU autocast ``amp`` with the selection in ``precision`` (fp16 allowed
    on the CPU here: CPU autocast computes it); returns (loss, gradients)."""
    from common.engine.method import StepInfo
    from common.engine.train import StepContext, train_step
    from dino.method import DINOMethod
    from tests.helpers import dino_cfg, multicrop_candidates

    real = hvs.selection_dtype
    monkeypatch.setattr(hvs, "selection_dtype", lambda p, d: torch.float16 if p == "fp16" else real(p, d))
    torch.manual_seed(0)
    if method_name == "simsiam":
        m = SimSiamMethod(tiny_cfg(SimSiamMethod, "unused", "unused", "hvs.enabled=true"), CPU)
        candidates = [torch.randn(4, 3, 16, 16) for _ in range(4)]
    else:
        m = DINOMethod(dino_cfg("unused", "unused", "hvs.enabled=true"), CPU)
        candidates = multicrop_candidates(m, B=4)
    optimizer = m.build_optimizer(8)
    dtype = AMP[amp]
    autocast = (lambda: torch.autocast("cpu", enabled=False)) if dtype is None else \
        (lambda: torch.autocast("cpu", dtype=dtype))
    selector = HardViewSelector(m.pools(), precision=precision, size_multiple=m.size_multiple)
    ctx = StepContext(method=m, ddp_model=m.model, optimizer=optimizer, autocast=autocast, scaler=None,
                      selector=selector, device=CPU)
    loss, _, sel, _ = train_step(ctx, candidates, StepInfo(0, 0, 1, m.schedule(optimizer, StepInfo(0, 0, 1))))
    assert sel.dtype is hvs.DTYPES.get(precision)
    return loss, {name: p.grad for name, p in m.model.named_parameters()}


# fp16 is emulated on a CPU: the cases in fp16 run in the slow tier, except the two that crashed
# (a bf16 selection inside fp16 training, an fp16 selection inside bf16 training), in the fast tier
# for DINO and for SimSiam's fp16 selection (SimSiam's bf16 selection in fp16 training takes 12 s)
def _amp_case(precision, amp, method_name):
    crashed = {precision, amp} == {"bf16", "fp16"}
    fast = "fp16" not in (precision, amp) or (crashed and (method_name, precision) != ("simsiam", "bf16"))
    return pytest.param(precision, amp, method_name, marks=() if fast else pytest.mark.slow,
                        id=f"{precision}-{amp}-{method_name}")


AMP_CASES = [_amp_case(precision, amp, method_name) for precision in ("fp32", "bf16", "fp16") for amp in AMP
             for method_name in ("simsiam", "dino")]


@pytest.mark.parametrize("precision, amp, method_name", AMP_CASES)
def test_every_training_amp_with_every_selection_precision(method_name, amp, precision, monkeypatch, one_thread):
    """A bf16 selection inside fp16 training (or fp16 inside bf16) used to hand the
    training forward the selection's cached low-precision weights and crash; now
    every combination trains, with the gradients of the fp32 step present and finite."""
    loss, grads = amp_step(method_name, amp, precision, monkeypatch)
    _, reference = amp_step(method_name, "off", "fp32", monkeypatch)
    assert torch.isfinite(loss)
    assert [k for k, g in grads.items() if g is not None] == [k for k, g in reference.items() if g is not None]
    assert any(g is not None for g in grads.values())
    for name, g in grads.items():
        if g is not None:
            assert torch.isfinite(g).all(), name
            assert bool(g.any()) == bool(reference[name].any()), name  # the same gradients are non-zero


def test_outputs_are_reused_only_in_their_own_precision():
    model, candidates = Probe(), [torch.randn(4, 8) for _ in range(3)]
    for precision, reused_in in (("fp32", (None, torch.bfloat16, torch.float16)), ("bf16", (torch.bfloat16,))):
        sel = select(precision, candidates, model)
        for dtype in (None, torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                assert sel.reusable() == (dtype in reused_in), (precision, dtype)
    sel.resolution = 0.5
    assert not sel.reusable()
