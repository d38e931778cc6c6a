"""Backbones from torchvision, with the CIFAR stem for small images."""
from __future__ import annotations

import re

import torchvision
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
#: ``resnet18_w<W>`` / ``resnet34_w<W>``: the same network with W channels in the stem and the first stage
#: (W, 2W, 4W, 8W per stage; the standard network is W = 64), for CPU-sized runs
NARROW = re.compile(r"(resnet18|resnet34)_w(\d+)")


def is_resnet(arch: str) -> bool:
    """A torchvision ResNet name or its narrow variant ``resnet18_w<W>``."""
    return arch in RESNETS or NARROW.fullmatch(arch) is not None


def build_resnet(arch: str, cifar_stem: bool = False, zero_init_residual: bool = True) -> nn.Module:
    """A torchvision ResNet whose ``fc`` is the identity, so that it maps images
    to global-average-pooled features of size ``backbone.num_features``.

    ``cifar_stem`` replaces the 7x7/2 convolution and the max-pool by one 3x3/1
    convolution, the usual adaptation for 32-64 px images (SimSiam's CIFAR
    experiments).  ``resnet18_w<W>`` (and ``resnet34_w<W>``) is timm's ResNet
    with the torchvision layout and parameter names and W, 2W, 4W, 8W channels
    (:data:`NARROW`)."""
    narrow = NARROW.fullmatch(arch)
    if arch not in RESNETS and not narrow:
        raise ValueError(f"model.arch={arch!r} is not one of {RESNETS} or resnet18_w<W> / resnet34_w<W>")
    if narrow:
        width = int(narrow.group(2))
        if width < 1:
            raise ValueError(f"model.arch={arch!r}: the width must be at least 1")
        net = NarrowResNet((2, 2, 2, 2) if narrow.group(1) == "resnet18" else (3, 4, 6, 3), width,
                           zero_init_residual)
    else:
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    stem_width = net.conv1.out_channels
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.num_features = net.fc.in_features
    net.fc = nn.Identity()
    return net


class NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with BasicBlocks and ``width``, 2, 4, 8 x ``width``
    channels per stage (torchvision's is 64): its own stages (``_make_layer``),
    initialisation and forward, with the same parameter names."""

    def __init__(self, layers, width: int, zero_init_residual: bool = True):
        from torchvision.models.resnet import BasicBlock

        super().__init__(BasicBlock, [1, 1, 1, 1], zero_init_residual=zero_init_residual)  # then narrowed
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(BasicBlock, width, layers[0])
        self.layer2 = self._make_layer(BasicBlock, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, 8 * width, layers[3], stride=2)
        self.fc = nn.Linear(8 * width, 1000)
        for m in self.modules():  # torchvision's initialisation, for the new layers
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)


#: our names -> timm's ViT definitions (width, depth, heads); the patch size and
#: the image size are set per run
VITS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224",
        "vit_base": "vit_base_patch16_224"}


def build_vit(arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0,
              depth: int = 0) -> nn.Module:
    """A timm VisionTransformer mapping images to the normalised [CLS] token
    (``num_features`` wide), as DINO's ViT: qkv bias, LayerNorm eps 1e-6,
    stochastic depth ``drop_path_rate``.  Position embeddings are created for
    ``img_size`` and interpolated (bicubic) for other sizes, e.g. DINO's 96 px
    local crops; a size must be a multiple of ``patch_size``.  ``depth`` > 0
    overrides the number of blocks (12 for all three)."""
    if arch not in VITS:
        raise ValueError(f"model.arch={arch!r} is not one of {sorted(VITS) + list(RESNETS)}")
    import timm

    extra = {"depth": depth} if depth else {}
    return timm.create_model(VITS[arch], pretrained=False, num_classes=0, patch_size=patch_size,
                             img_size=img_size, drop_path_rate=drop_path_rate, dynamic_img_size=True, **extra)


def build_backbone(arch: str, *, cifar_stem: bool = False, patch_size: int = 16, img_size: int = 224,
                   drop_path_rate: float = 0.0, depth: int = 0, zero_init_residual: bool = False) -> nn.Module:
    """ResNet or ViT by name (see :data:`RESNETS`, :data:`VITS`); both expose
    ``num_features``."""
    if arch in VITS:
        return build_vit(arch, patch_size, img_size, drop_path_rate, depth)
    if is_resnet(arch):
        return build_resnet(arch, cifar_stem=cifar_stem, zero_init_residual=zero_init_residual)
    raise ValueError(f"model.arch={arch!r} is not one of {list(RESNETS) + sorted(VITS)} "
                     "or resnet18_w<W> / resnet34_w<W>")


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (its outputs then depend on the batch)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def is_vit(arch: str) -> bool:
    return arch in VITS


def arch_label(model_cfg: dict) -> str:
    """The architecture a checkpoint records: ``vit_small/16`` (with the patch
    size) for a ViT, the name for a ResNet."""
    arch = model_cfg["arch"]
    return f"{arch}/{model_cfg['patch_size']}" if is_vit(arch) else arch


def vit_tokens(vit: nn.Module, images, mask=None, mask_token=None):
    """All output tokens of a timm ViT built by :func:`build_vit`, [B, 1 + N, D]
    ([CLS] first, after the final norm; ``vit(images)`` is the [CLS] row).  With
    ``mask`` [B, h, w] (bool, on the patch grid), the embeddings of the masked
    patches are replaced by ``mask_token`` ([D] or [1, D]) before the position embeddings
    are added (BEiT's and iBOT's masked image modelling)."""
    import torch

    x = vit.patch_embed(images)  # [B, h, w, D]: dynamic_img_size keeps the grid
    if mask is not None:
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    return vit.norm(vit.blocks(x))


def load_prefixed(module: nn.Module, state: dict, prefix: str) -> nn.Module:
    """Load into ``module`` the entries of ``state`` whose keys start with
    ``prefix`` (``"student.backbone."``), with the prefix removed; returns ``module``."""
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return module
