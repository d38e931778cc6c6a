"""bf16 autocast of the training step on a CPU (train.amp=bf16): on where the
CPU computes bf16 natively, with the loss within a stated tolerance of fp32;
fp32 (and a warning) elsewhere."""
import contextlib

import pytest
import torch

from common.hvs import cpu_has_bf16
from common.engine.method import StepInfo
from common.engine.runtime import amp_settings
from simclr.method import SimCLRMethod
from simsiam.method import SimSiamMethod
from tests.helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
#: SimSiam's loss is a negative cosine in [-1, 1]: bf16 keeps it within 0.01 (its 8-bit mantissa: ~0.4 % per
#: product, averaging over the batch); SimCLR's cross-entropy within 1 % of its value
TOLERANCE = {"simsiam": ("abs", 0.01), "simclr": ("rel", 0.01)}


@pytest.mark.skipif(not cpu_has_bf16(), reason="the CPU has neither AVX512-BF16 nor AMX")
@pytest.mark.parametrize("name, cls", [("simsiam", SimSiamMethod), ("simclr", SimCLRMethod)])
def test_bf16_loss_is_within_tolerance_of_fp32(tmp_path, image_root, name, cls):
    cfg = tiny_cfg(cls, tmp_path / name, image_root, "model.arch=resnet18_w16", "augment.size=32",
                   "train.amp=bf16")
    torch.manual_seed(0)
    method = cls(cfg, torch.device("cpu"))
    autocast, scaler = amp_settings(cfg, torch.device("cpu"))
    assert scaler is None and autocast is not contextlib.nullcontext
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(2)]
    step = StepInfo(0, 0, 1, {"lr": 0.1})
    state = {k: v.clone() for k, v in method.model.state_dict().items()}  # BatchNorm statistics: the same start
    fp32, _ = method.training_loss(method.model, views, None, step)
    method.model.load_state_dict(state)
    with autocast():
        low, _ = method.training_loss(method.model, views, None, step)
    assert low.isfinite()
    kind, tol = TOLERANCE[name]
    error = abs(low.float().item() - fp32.item())
    assert error <= (tol if kind == "abs" else tol * abs(fp32.item())), (fp32.item(), low.item())
    low.backward()  # the backward runs in bf16 too
    assert all(p.grad is None or p.grad.isfinite().all() for p in method.model.parameters())


def test_bf16_on_a_cpu_without_it_trains_in_fp32(monkeypatch, capsys, tmp_path, image_root):
    import common.hvs

    monkeypatch.setattr(common.hvs, "cpu_has_bf16", lambda: False)
    cfg = tiny_cfg(SimSiamMethod, tmp_path / "x", image_root, "train.amp=bf16")
    autocast, scaler = amp_settings(cfg, torch.device("cpu"))
    assert autocast is contextlib.nullcontext and scaler is None
    assert "neither AVX512-BF16 nor AMX" in capsys.readouterr().err
    for mode in ("auto", "fp16", "off"):  # only bf16 turns autocast on on a CPU
        cfg["train"]["amp"] = mode
        assert amp_settings(cfg, torch.device("cpu"))[0] is contextlib.nullcontext
