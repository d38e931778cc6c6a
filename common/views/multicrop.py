"""Multi-crop (Caron et al. 2020; DINO 2021): two global crops and several small
local crops of every image, and the network wrapper that takes them.  Shared by
DINO and iBOT.

The DINO recipe (global crops 224 px, scale 0.4-1; local crops 96 px, scale
0.05-0.4, bicubic resize): flip p 0.5, colour jitter (0.4, 0.4, 0.2, 0.1) with
p 0.8, grayscale p 0.2, then

- global crop 1: Gaussian blur always (p 1.0);
- global crop 2: blur p 0.1, solarisation p 0.2;
- every local crop: blur p 0.5.

With HVS the loader draws several candidates for every slot: ``G/2`` for each
of the two global slots (``hvs.global_candidates = G``, default 4) and ``L``
local candidates (``hvs.local_candidates``, default 16) for the local slots.
A combination picks one candidate per global slot (so each global view keeps
its slot's recipe) and a set of local candidates: pools
``[(G/2, 1), (G/2, 1), (L, n_local)]``.  The paper counts C(4,2) x C(16,8)
combinations (any two of the four global candidates); we keep the two global
recipes apart, which gives 2 x 2 x C(16,8) = 51,480, and compare a random
subset of 128 per step (``hvs.max_combinations``) as the paper.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from common.views.augment import MultiViewTransform, ViewRecipe, device_spec
from common.engine.config import setting

N_GLOBAL = 2  # global crops per image (the teacher's views)


def multicrop_spec(global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), n_local=8, global_size=224,
                   local_size=96) -> dict:
    """Config keys ``augment.*`` and the candidate counts ``hvs.*`` of multi-crop."""
    return {
        **device_spec(),
        "augment.global_size": setting(global_size, "global crop size in pixels", range="[1, inf)"),
        "augment.local_size": setting(local_size, "local crop size in pixels", range="[1, inf)"),
        "augment.global_scale": setting(list(global_scale), "random-resized-crop area range of the global crops", range="(0, 1]", length=2),
        "augment.local_scale": setting(list(local_scale), "random-resized-crop area range of the local crops", range="(0, 1]", length=2),
        "augment.n_local": setting(n_local, "local crops per image (0: global crops only)", range="[0, inf)"),
        "augment.jitter": setting([0.4, 0.4, 0.2, 0.1], "colour jitter brightness, contrast, saturation, hue", range="[0, inf)", length=4),
        "augment.jitter_p": setting(0.8, "probability of colour jitter", range="[0, 1]"),
        "augment.gray_p": setting(0.2, "probability of grayscale", range="[0, 1]"),
        "augment.flip_p": setting(0.5, "probability of a horizontal flip", range="[0, 1]"),
        "augment.blur_sigma": setting([0.1, 2.0], "blur sigma range", range="(0, inf)", length=2),
        "augment.blur_p": setting([1.0, 0.1, 0.5], "blur probability of global crop 1, global crop 2, local crops", range="[0, 1]", length=3),
        "augment.solarize_p": setting([0.0, 0.2, 0.0], "solarisation probability of global crop 1, global crop 2, local crops", range="[0, 1]", length=3),
        "augment.interpolation": setting("bicubic", "crop resize interpolation", ["bicubic", "bilinear"]),
        "hvs.global_candidates": setting(4, "global candidates per image with HVS, split evenly over the 2 global slots (paper: 4)", range="[2, inf)"),
        "hvs.local_candidates": setting(16, "local candidates per image with HVS, from which augment.n_local are chosen (paper: 16)", range="[0, inf)"),
        "hvs.max_combinations": setting(128, "compare at most K combinations, a random subset each step (paper: 128; 0: all)", range="[0, inf)"),
    }


def multicrop_recipes(a: dict) -> list:
    """The three recipes (global 1, global 2, local) of an ``augment`` section."""
    for key in ("blur_p", "solarize_p"):
        if len(a[key]) != 3:
            raise ValueError(f"augment.{key}={a[key]} must list 3 probabilities: global 1, global 2, local")
    common = dict(flip_p=a["flip_p"], jitter=a["jitter"], jitter_p=a["jitter_p"], gray_p=a["gray_p"],
                  blur_sigma=a["blur_sigma"], interpolation=a["interpolation"])
    g = dict(size=a["global_size"], scale=a["global_scale"], **common)
    return [ViewRecipe(blur_p=a["blur_p"][0], solarize_p=a["solarize_p"][0], **g),
            ViewRecipe(blur_p=a["blur_p"][1], solarize_p=a["solarize_p"][1], **g),
            ViewRecipe(size=a["local_size"], scale=a["local_scale"], blur_p=a["blur_p"][2],
                       solarize_p=a["solarize_p"][2], **common)]


def candidate_counts(cfg: dict) -> tuple:
    """(candidates per global slot, local candidates) with HVS; checked."""
    h, n_local = cfg["hvs"], int(cfg["augment"]["n_local"])
    g, loc = int(h["global_candidates"]), int(h["local_candidates"])
    if g < N_GLOBAL or g % N_GLOBAL:
        raise ValueError(f"hvs.global_candidates={g} must be a positive multiple of {N_GLOBAL} "
                         "(the candidates are split evenly over the two global slots)")
    if n_local and loc < n_local:
        raise ValueError(f"hvs.local_candidates={loc} must be at least augment.n_local={n_local}")
    return g // N_GLOBAL, (loc if n_local else 0)


def multicrop_transform(cfg: dict, hvs_on: bool) -> MultiViewTransform:
    """Views slot by slot: global 1, global 2, locals (candidates of each slot
    together when HVS is on)."""
    g1, g2, local = multicrop_recipes(cfg["augment"])
    n_local = int(cfg["augment"]["n_local"])
    per_slot, loc = candidate_counts(cfg) if hvs_on else (1, n_local)
    slots = [(g1, per_slot), (g2, per_slot)]
    if n_local:
        slots.append((local, loc))
    return MultiViewTransform(slots)


def multicrop_pools(cfg: dict) -> list:
    """Selector pools: one candidate per global slot, ``n_local`` of the local candidates."""
    per_slot, loc = candidate_counts(cfg)
    pools = [(per_slot, 1), (per_slot, 1)]
    if int(cfg["augment"]["n_local"]):
        pools.append((loc, int(cfg["augment"]["n_local"])))
    return pools


class MultiCropNet(nn.Module):
    """Backbone + head over a list of crop batches.  Consecutive batches of the
    same image size go through the backbone together (one call per size, as
    DINO's multi-crop wrapper); the head takes all features at once.  Returns
    the head's output for the crops concatenated in order, ``[sum B_i, ...]``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        out, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape[-2:] == crops[i].shape[-2:]:
                j += 1
            out.append(self.backbone(torch.cat(list(crops[i:j]))))
            i = j
        return torch.cat(out)

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.head(self.features(crops))

