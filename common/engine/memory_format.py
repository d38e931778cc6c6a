"""``train.channels_last``: the memory format of the model and of its input views.

With ``channels_last`` every 4-d weight of the model and every view that
reaches the training device are stored NHWC (``torch.channels_last``), the
layout that oneDNN (CPU) and cuDNN (GPU, tensor cores under mixed precision)
compute convolutions in natively; with the default layout (NCHW) they
convert around every convolution.  The values are those of the same
computation in another order of memory, so float results may differ from the
default layout in the last bits (``tests/test_cpu_speed.py`` bounds the
difference of a SimSiam step's loss).

``auto`` turns it on for a convolutional network on a GPU under mixed
precision (``train.amp`` not ``off``), the usual choice there, and leaves it
off on a CPU, so that CPU runs of existing configs stay bitwise what they were;
a CPU run that gains from it (``python -m bench.cpu_step``) opts in with
``train.channels_last=true``.
"""
from __future__ import annotations

import torch
from torch import nn

CHOICES = ("auto", "true", "false")


def is_conv_net(model: nn.Module) -> bool:
    """A model whose work is convolutions: more than one ``Conv2d`` (a ViT has
    one, its patch embedding)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def use_channels_last(mode: str, device: torch.device, model: nn.Module, amp: str) -> bool:
    """Whether ``train.channels_last=mode`` puts ``model`` in channels_last on
    ``device`` (``amp``: the value of ``train.amp``)."""
    if mode not in CHOICES:
        raise ValueError(f"train.channels_last={mode!r} must be one of {CHOICES}")
    if mode != "auto":
        return mode == "true"
    return device.type == "cuda" and amp != "off" and is_conv_net(model)


def model_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with every 4-d parameter and buffer in channels_last, in place
    (the same Parameter objects: an optimizer built before or after sees them)."""
    return model.to(memory_format=torch.channels_last)


def views_channels_last(views: list) -> list:
    """The 4-d views of a batch in channels_last (others as they are)."""
    return [v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in views]
