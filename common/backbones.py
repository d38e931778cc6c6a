"""Backbones from torchvision, with the CIFAR stem for small images."""
from __future__ import annotations

import torchvision
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def build_resnet(arch: str, cifar_stem: bool = False, zero_init_residual: bool = True) -> nn.Module:
    """A torchvision ResNet whose ``fc`` is the identity, so that it maps images
    to global-average-pooled features of size ``backbone.num_features``.

    ``cifar_stem`` replaces the 7x7/2 convolution and the max-pool by one 3x3/1
    convolution, the usual adaptation for 32-64 px images (SimSiam's CIFAR
    experiments)."""
    if arch not in RESNETS:
        raise ValueError(f"model.arch={arch!r} is not one of {RESNETS}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    return net
