"""CUDA code paths checked on a CPU with stand-ins: the TF32 and cuDNN flags a
GPU run sets, the host synchronisations of a training step (counted by
wrapping the calls that synchronise), and SyncBatchNorm in the selection
forward (two gloo ranks)."""
import pytest
import torch

from common.runtime import amp_settings

FLAGS = ("torch.backends.cuda.matmul.allow_tf32", "torch.backends.cudnn.allow_tf32", "torch.backends.cudnn.benchmark")


@pytest.fixture
def cuda_flags():
    """The three process-wide flags, all false for the test and restored after it."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                   torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_tf32_and_cudnn_autotuning_on_cuda_by_default(cuda_flags):
    from common.config import COMMON_SPEC

    assert COMMON_SPEC["train.tf32"]["default"] is True
    amp_settings({"train": {"amp": "off"}}, torch.device("cpu"))
    assert cuda_flags() == (False, False, False)  # a CPU run changes nothing
    amp_settings({"train": {"amp": "off", "tf32": True}}, torch.device("cuda", 0))
    assert cuda_flags() == (True, True, True), FLAGS
    amp_settings({"train": {"amp": "off", "tf32": False}}, torch.device("cuda", 0))
    assert cuda_flags() == (False, False, False), FLAGS
    amp_settings({"train": {"amp": "off"}}, torch.device("cuda"))  # an evaluation's config without the key: on
    assert cuda_flags() == (True, True, True), FLAGS
