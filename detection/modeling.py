"""Detectron2 pieces of MoCo's detection protocol, registered on import.

* :func:`build_hvs_resnet_backbone` (``MODEL.BACKBONE.NAME``): Detectron2's
  ResNet; with ``MODEL.RESNETS.CIFAR_STEM`` the stem is our CIFAR stem (3x3/1
  convolution, norm, ReLU, no max-pool), so that a backbone pretrained on small
  images keeps its first layer.  Feature strides are then 1 (stem, res2), 2
  (res3), 4 (res4) and 8 (res5) instead of 4, 4, 8, 16 and 32.
* :class:`Res5ROIHeadsExtraNorm` (``MODEL.ROI_HEADS.NAME``): the C4 head of
  MoCo, res5 followed by one extra norm layer; for ResNet-18/34 its res5 is
  made of basic blocks, so that their ``layer4`` loads into it.

Call :func:`add_hvs_config` on a config before merging files that use these keys.
"""
from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet, build_resnet_backbone
from detectron2.modeling.roi_heads import Res5ROIHeads
from fvcore.nn import weight_init
from torch import nn
from torch.nn import functional as F

#: blocks of each stage (res2..res5) per depth, as Detectron2 and torchvision have them
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def add_hvs_config(cfg: CfgNode) -> CfgNode:
    """Add ``MODEL.RESNETS.CIFAR_STEM`` (default False) to a Detectron2 config;
    a second call keeps the value already there."""
    if "CIFAR_STEM" not in cfg.MODEL.RESNETS:
        cfg.MODEL.RESNETS.CIFAR_STEM = False
    return cfg


class CifarStem(CNNBlockBase):
    """3x3 stride-1 convolution (no bias), norm and ReLU, without max-pool:
    :func:`common.backbones.build_resnet`'s ``cifar_stem`` as a Detectron2
    stem (same parameter names as ``BasicStem``)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm="BN"):
        super().__init__(in_channels, out_channels, 1)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False,
                            norm=get_norm(norm, out_channels))
        weight_init.c2_msra_fill(self.conv1)

    def forward(self, x):
        return F.relu_(self.conv1(x))


@BACKBONE_REGISTRY.register()
def build_hvs_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """Detectron2's ResNet (``build_resnet_backbone``: DEPTH, NORM, OUT_FEATURES,
    STRIDE_IN_1X1, STEM_OUT_CHANNELS, RES2_OUT_CHANNELS, FREEZE_AT, ...); with
    ``MODEL.RESNETS.CIFAR_STEM`` its stem is replaced by :class:`CifarStem` and
    the feature strides follow from the stem's stride 1."""
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in DEPTHS:
        raise ValueError(f"MODEL.RESNETS.DEPTH={depth} is not one of {sorted(DEPTHS)}")
    net = build_resnet_backbone(cfg, input_shape)
    if not cfg.MODEL.RESNETS.get("CIFAR_STEM", False):
        return net
    stem = CifarStem(input_shape.channels, cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, cfg.MODEL.RESNETS.NORM)
    # the same stages (already frozen as asked); ResNet recomputes every stride from the stem's
    return ResNet(stem, [list(stage.children()) for stage in net.stages], out_features=cfg.MODEL.RESNETS.OUT_FEATURES,
                  freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """The C4 ROI head of MoCo's detection recipe: res5, then one more norm
    layer (``MODEL.RESNETS.NORM``), the module ``res5.norm``.  For DEPTH 18/34
    res5 is 2 or 3 basic blocks (RES2_OUT_CHANNELS x 4 -> x 8 channels, the
    first of stride 2), as a torchvision ResNet's ``layer4``."""

    @classmethod
    def _build_res5_block(cls, cfg):
        depth = cfg.MODEL.RESNETS.DEPTH
        if depth >= 50:
            res5, out_channels = super()._build_res5_block(cfg)
        else:
            out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8
            n = DEPTHS[depth][3]
            res5 = nn.Sequential(*ResNet.make_stage(BasicBlock, n, stride_per_block=[2] + [1] * (n - 1),
                                                    in_channels=out_channels // 2, out_channels=out_channels,
                                                    norm=cfg.MODEL.RESNETS.NORM))
        res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return res5, out_channels
