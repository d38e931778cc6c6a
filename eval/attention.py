"""DINO-style self-attention maps of ViT checkpoints, side by side (HVS paper, Appendix J).

For every image, the last block's attention of the [CLS] token to the patch
tokens is drawn for every head, one row per checkpoint, so that a model trained
with Hard View Selection can be compared with its baseline on the same images
(the paper's Appendix J puts HVS on top and the baseline below: pass the HVS
checkpoint first).  The maps are those of DINO's ``visualize_attention.py``:
the [CLS] row of the softmax attention of the last block, per head, with the
[CLS]->[CLS] weight dropped (so a head's map sums to at most 1), on the patch
grid (``image_size / patch`` cells per side).

How to read the PNG (one matplotlib figure; one row per image and checkpoint)::

                     image 1: <name>   head 1   head 2   head 3
    <label A>        [image]           [map]    [map]    [map]     <- image 1, checkpoint A
    <label B>        [image]           [map]    [map]    [map]     <- image 1, checkpoint B
                     image 2: <name>   head 1   head 2   head 3
    <label A>        [image]           [map]    [map]    [map]
    ...

* The first column is the input image as the model saw it (resize, centre
  crop, de-normalised).  Every other column is one head.
* By default a head panel is its attention map coloured with matplotlib's
  viridis, one block per patch: strong attention yellow, weak green, weakest
  dark blue/purple.  Each panel is scaled by its own minimum and maximum (as
  DINO's ``plt.imsave``), so colours show *where* a head looks, not how
  strongly in absolute terms; compare heads and checkpoints by the entropies
  in the JSON.
* With ``attention.threshold=F`` a head panel is an overlay instead: the
  input image where the head's *kept mass* lies (the fewest patches, largest
  attention first, holding a fraction ``F`` of the head's attention; DINO uses
  0.6) and the image darkened to :data:`DIM` of its brightness elsewhere.
* The grid has ``n x R`` rows (``n`` images, ``R`` checkpoints; row
  ``i * R + j`` is image ``i`` under checkpoint ``j``) and ``1 + H`` columns
  (``H`` the largest number of heads); every panel is
  ``attention.panel_size`` pixels square.  Checkpoints may differ in patch
  size and number of heads: a row with fewer heads leaves its last panels
  empty, and the image size must be a multiple of every patch size.

Beside the PNG a JSON sidecar (``<output>.json`` unless ``attention.json``)
lists the checkpoints, labels, images, heads, the grid's shape, and per
checkpoint, image and head: the entropy (nats) of the map normalised to sum 1,
that entropy relative to the uniform map's ``log(h * w)``, the [CLS]->patch
mass, and with a threshold the fraction of patches kept; and per checkpoint
the means.

The command line is that of every entry point (``common/engine/config.py``:
``--config YAML``, ``key=value`` overrides, ``--help`` lists every key);
``--checkpoints`` and ``--labels`` take several values.  Example
(ImageNet-100 validation images, teacher weights)::

    python -m eval.attention \\
        --checkpoints runs/dino_hvs/checkpoint.pth runs/dino/checkpoint.pth \\
        --labels HVS baseline --dataset imagenet --n-images 4 \\
        --output results/attention_dino.png attention.threshold=0.6
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from common.views.augment import eval_transform
from common.engine.checkpoint import load_backbone
from common.engine.config import ConfigError, setting
from common.views.data import SUBSET_SEED, build_dataset, data_dir_or_default, load_rgb, subset_indices
from eval.engine import EVAL_SPEC, EvalError, run_main
from eval.knn import parse_cli, resolve_device

DIM = 0.25  # brightness of the dropped patches in the threshold overlay
COLORMAP = "viridis"
DPI = 100  # of the PNG: a panel of attention.panel_size P is P pixels square
FONTSIZE = 7  # points, of the captions


# ---------------------------------------------------------------------------
# Attention maps
# ---------------------------------------------------------------------------
def vit_patch_size(vit: nn.Module) -> int:
    """Patch size of a timm VisionTransformer; a TypeError for anything else
    (e.g. a ResNet), naming its class."""
    embed, blocks = getattr(vit, "patch_embed", None), getattr(vit, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    if embed is None or attn is None or not hasattr(attn, "attn_drop"):
        raise TypeError(f"attention maps need a timm VisionTransformer, got a {type(vit).__name__}")
    ph, pw = embed.patch_size
    if ph != pw:
        raise TypeError(f"attention maps need square patches, got {ph}x{pw}")
    return int(ph)


def vit_num_heads(vit: nn.Module) -> int:
    """Number of heads of the last block of a timm VisionTransformer."""
    vit_patch_size(vit)  # type check
    return int(vit.blocks[-1].attn.num_heads)


@torch.no_grad()
def cls_attention(vit: nn.Module, images: Tensor) -> Tensor:
    """Attention of the [CLS] token to the patch tokens in the last block of a
    timm ViT, per head, on the patch grid: ``[B, heads, H / p, W / p]``.

    ``images`` [B, 3, H, W] with H and W multiples of the patch size ``p``.  The
    ViT runs in eval mode (no dropout); the weights to the [CLS] token (and to
    any other prefix token) are dropped, so each map sums to at most 1.  The
    weights are read with timm's ``AttentionExtract`` (a forward hook on the
    last block's ``attn.attn_drop``), for which fused attention is switched
    off on that block only; the model's mode, fused-attention flag and hooks are
    restored afterwards.  No gradient is recorded.
    """
    from timm.utils import AttentionExtract

    p = vit_patch_size(vit)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, 3, H, W], got shape {tuple(images.shape)}")
    H, W = images.shape[-2:]
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
    name = f"blocks.{len(vit.blocks) - 1}.attn.attn_drop"
    attn_module = vit.blocks[-1].attn
    was_training, was_fused = vit.training, getattr(attn_module, "fused_attn", False)
    extractor = None
    try:
        attn_module.fused_attn = False
        extractor = AttentionExtract(vit, names=[name], method="hook")  # puts vit in eval mode
        weights = extractor(images)[name]  # [B, heads, T, T]
    finally:
        for handle in getattr(getattr(extractor, "hooks", None), "_handles", []):
            handle.remove()
        attn_module.fused_attn = was_fused
        vit.train(was_training)
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    return weights[:, :, 0, prefix:].reshape(len(images), weights.shape[1], H // p, W // p)


def keep_mass(attn: Tensor, fraction: float) -> Tensor:
    """Per map (the last two dimensions), the fewest cells of largest value whose
    sum reaches ``fraction`` of the map's sum: a bool tensor shaped as ``attn``.

    DINO's thresholding of attention maps (sort, cumulative sum, keep the top
    part).  ``attn`` must be non-negative; ties are broken by position (first
    cell first).  ``fraction = 1`` keeps exactly the nonzero cells; an all-zero
    map keeps nothing.  ``fraction`` must be in (0, 1].
    """
    try:
        ok = 0.0 < float(fraction) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"keep_mass: fraction={fraction!r} must be a number in (0, 1]")
    if attn.ndim < 2:
        raise ValueError(f"keep_mass: attn must have at least 2 dimensions, got shape {tuple(attn.shape)}")
    if float(fraction) == 1.0:
        return attn > 0  # rounding in the cumulative sum must not drop tiny cells
    flat = attn.detach().flatten(-2).double()
    values, order = flat.sort(dim=-1, descending=True, stable=True)
    cumulative = values.cumsum(dim=-1)
    before = cumulative - values  # mass of the larger cells
    keep_sorted = before < float(fraction) * cumulative[..., -1:]
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return keep.reshape(attn.shape)


def map_entropy(attn: Tensor) -> Tensor:
    """Entropy (nats) of every map (the last two dimensions) normalised to sum
    1; ``0 log 0 = 0``.  A uniform ``h x w`` map has ``log(h * w)``."""
    p = attn.detach().flatten(-2).double()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return -(p * p.clamp_min(1e-300).log()).sum(dim=-1)


# ---------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------
def image_array(image: Tensor) -> np.ndarray:
    """A normalised image [3, H, W] back to uint8 RGB [H, W, 3] (ImageNet mean
    and std undone): the image as the model saw it."""
    from common.views.augment import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = ((image.detach().cpu().float() * std + mean).clamp(0, 1) * 255).round().byte()
    return rgb.permute(1, 2, 0).numpy()


def mask_overlay(image: np.ndarray, mask: Tensor) -> np.ndarray:
    """The panel of ``attention.threshold``: ``image`` [H, W, 3] (uint8) where
    ``mask`` [h, w] is set, the image darkened to :data:`DIM` elsewhere; cell
    ``(r, c)`` of the mask covers the pixels ``(y, x)`` with ``y * h // H = r``
    and ``x * w // W = c`` (a patch, when ``H / h`` is the patch size)."""
    H, W = image.shape[:2]
    h, w = mask.shape[-2:]
    keep = mask.cpu().numpy()[np.arange(H) * h // H][:, np.arange(W) * w // W][..., None]
    return np.where(keep, image, (image * DIM).astype(np.uint8))


def _fit(text: str, inches: float, fontsize: float, keep: int = 0) -> str:
    """``text`` shortened to about ``inches`` at ``fontsize``: its end replaced
    by '..', or, where that leaves less than 3 characters after the first
    ``keep``, cut to those ``keep`` characters."""
    chars = int(inches * 72 / (0.6 * fontsize))
    if len(text) <= chars:
        return text
    return text[:chars - 2] + ".." if chars - 2 >= max(keep, 1) + 3 else text[:max(keep, chars)]


def render_grid(images: Sequence[np.ndarray], panels: Sequence[Sequence[Sequence[np.ndarray]]],
                labels: Sequence[str], image_names: Sequence[str], panel: int, dpi: int = DPI):
    """The grid as a matplotlib figure: one row per image and checkpoint
    (image-major: row ``i * len(labels) + j`` is image ``i`` under checkpoint
    ``j``), column 0 the image, column ``k`` head ``k``; row labels on the left,
    the image's name and the head numbers above the first row of every image.

    ``images[i]``: image ``i``, uint8 RGB [H, W, 3]; ``panels[j][i]``: the
    panels of checkpoint ``j`` on image ``i``, one per head: a 2-D attention map
    (drawn with viridis, scaled by its own minimum and maximum, each patch one
    block) or an RGB array (the threshold overlay).  A row with fewer heads
    than the widest leaves its last panels empty.  Every panel is ``panel``
    pixels square at ``dpi``.  Returns the :class:`matplotlib.figure.Figure`
    (no pyplot: nothing global is touched); ``fig.savefig(path)`` writes it."""
    from matplotlib.figure import Figure

    n, R = len(images), len(panels)
    rows, columns = n * R, 1 + max(len(heads) for per_image in panels for heads in per_image)
    side = panel / dpi  # inches
    gap, band, margin = 0.06, 0.2, 0.08  # inches: between panels, caption band above a row, border
    left = margin + 0.075 * FONTSIZE / 8 * max(len(label) for label in labels)
    width = left + columns * side + (columns - 1) * gap + margin
    height = margin + rows * (band + side) + margin
    width, height = round(width * dpi) / dpi, round(height * dpi) / dpi  # whole pixels
    fig = Figure(figsize=(width, height), dpi=dpi, facecolor="white")
    axes = fig.subplots(rows, columns, squeeze=False, gridspec_kw=dict(
        left=left / width, right=1 - margin / width, bottom=margin / height, top=1 - (margin + band) / height,
        wspace=gap / side, hspace=band / side))
    for i in range(n):
        for j in range(R):
            row = axes[i * R + j]
            for c, ax in enumerate(row):
                ax.set_xticks([])
                ax.set_yticks([])
                if c > len(panels[j][i]):
                    ax.set_axis_off()
                    continue
                data = images[i] if c == 0 else panels[j][i][c - 1]
                if data.ndim == 2:
                    ax.imshow(data, cmap=COLORMAP, interpolation="nearest")
                else:
                    ax.imshow(data, interpolation="antialiased")
                if j == 0:
                    title = _fit(f"image {i + 1}: {image_names[i]}", side + gap, FONTSIZE, len(f"image {i + 1}")) \
                        if c == 0 else _fit(f"head {c}", side + gap, FONTSIZE, len(f"head {c}"))
                    ax.set_title(title, fontsize=FONTSIZE, pad=2, loc="left" if c == 0 else "center")
            row[0].set_ylabel(labels[j], fontsize=FONTSIZE, rotation=0, ha="right", va="center")
    return fig


def geometry(fig, panel: int, rows_per_image: int, images: int) -> dict:
    """What the JSON sidecar says of the grid's shape."""
    rows, columns = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    width, height = (round(v) for v in fig.get_size_inches() * fig.dpi)
    return {"rows": rows, "columns": columns, "rows_per_image": rows_per_image, "images": images,
            "row_order": "image-major: row i * rows_per_image + j is image i under checkpoint j",
            "panel": panel, "dpi": fig.dpi, "width": width, "height": height}


# ---------------------------------------------------------------------------
# Command line: the config layer of every entry point (common/engine/config.py)
# ---------------------------------------------------------------------------
#: Keys of the attention maps.
ATTENTION_SPEC = {
    "attention.checkpoints": setting([], "DINO or iBOT checkpoints with a ViT, one row each in this order (the paper: "
                                         "HVS first, then the baseline); patch sizes and numbers of heads may differ",
                                     type="list"),
    "attention.labels": setting([], "one row label per checkpoint (default: '<method> HVS' or '<method> baseline')",
                                type="list"),
    "eval.which": EVAL_SPEC["eval.which"],
    "attention.images": setting([], "image files to draw (instead of dataset images)", type="list"),
    "data.dataset": setting("", "take the images from this dataset (cifar10 | cifar100 | tiny-imagenet-100 | imagenet | "
                                "imagefolder | ...; default without attention.images: the first checkpoint's)"),
    "data.data_dir": EVAL_SPEC["data.data_dir"],
    "data.split": setting("val", "dataset split", ["train", "val", "test"]),
    "attention.n_images": setting(4, "number of dataset images, drawn class-stratified and deterministically",
                                  range="[1, inf)"),
    "attention.indices": setting([], "dataset indices to draw, in this order (overrides attention.n_images)",
                                 type="list", items="int", range="[0, inf)"),
    "data.image_size": setting(0, "input size (resize + centre crop; 0: the first checkpoint's training crop size); "
                                  "rounded down to a multiple of every checkpoint's patch size", range="[0, inf)"),
    "attention.panel_size": setting(96, "side of every panel in pixels", range="[8, inf)"),
    "attention.threshold": setting(0.0, "0: the coloured maps; F in (0, 1]: show the image where a head keeps a "
                                        "fraction F of its attention (fewest patches, largest first) and darken the "
                                        f"rest to {DIM:g} (DINO: 0.6)", range="[0, 1]"),
    "run.device": EVAL_SPEC["run.device"],
    "eval.output": setting("", "the grid PNG to write (required)"),
    "attention.json": setting("", "the JSON sidecar (default: <output>.json)"),
}

#: one-value flags (as the other evaluations') and several-value flags
SHORTCUTS = {"--which": "eval.which", "--dataset": "data.dataset", "--data-dir": "data.data_dir",
             "--n-images": "attention.n_images", "--output": "eval.output"}
LIST_SHORTCUTS = {"--checkpoints": "attention.checkpoints", "--labels": "attention.labels"}


def _finish(cfg: dict) -> None:
    a = cfg["attention"]
    if not a["checkpoints"]:
        raise ConfigError("no checkpoints given: pass --checkpoints PATH [PATH ...] (DINO or iBOT, ViT)")
    if a["labels"] and len(a["labels"]) != len(a["checkpoints"]):
        raise ConfigError(f"config attention.labels: {len(a['labels'])} labels for "
                          f"{len(a['checkpoints'])} checkpoints")
    if a["images"] and cfg["data"]["dataset"]:
        raise ConfigError("config attention.images and data.dataset: give one of them (image files or a dataset)")
    a["checkpoints"], a["labels"], a["images"] = ([str(v) for v in a[k]] for k in ("checkpoints", "labels", "images"))
    if not cfg["eval"]["output"]:
        raise ConfigError("no output given: pass --output PNG")
    resolve_device(cfg)


def parse_attention_args(argv=None) -> dict:
    """The resolved configuration of ``python -m eval.attention``."""
    return parse_cli(
        ATTENTION_SPEC, "eval.attention",
        "DINO-style attention maps of the last block's [CLS] token, per head, for ViT checkpoints side by side "
        "on the same images (HVS paper, Appendix J). Writes one PNG (one row per image and checkpoint, columns: "
        "image, head 1, ...) and a JSON sidecar with the entropies of the maps.",
        SHORTCUTS, argv, lists=LIST_SHORTCUTS, finish=_finish)


def _load_vits(cfg: dict) -> list[tuple[nn.Module, dict]]:
    """(backbone, info) per checkpoint; only ViTs."""
    models = []
    for path in cfg["attention"]["checkpoints"]:
        backbone, info = load_backbone(path, which=cfg["eval"]["which"])
        try:
            info["patch_size"], info["heads"] = vit_patch_size(backbone), vit_num_heads(backbone)
        except TypeError:
            raise EvalError(f"checkpoint {path} holds a {info['arch']} backbone (method {info['method']}), "
                            f"not a ViT: attention maps need a DINO or iBOT checkpoint with model.arch=vit_*") from None
        models.append((backbone.to(cfg["run"]["device"]), info))
    return models


def _labels(cfg: dict, infos: list[dict]) -> list[str]:
    if cfg["attention"]["labels"]:
        return list(cfg["attention"]["labels"])
    labels = [f"{info['method']} {'HVS' if info['hvs'] else 'baseline'}" for info in infos]
    return [f"{label} #{j + 1}" if labels.count(label) > 1 else label for j, label in enumerate(labels)]


def _image_size(cfg: dict, infos: list[dict]) -> int:
    size = cfg["data"]["image_size"] or int(infos[0]["image_size"])
    multiple = math.lcm(*(info["patch_size"] for info in infos))
    if size % multiple:
        rounded = size // multiple * multiple
        if rounded == 0:
            raise EvalError(f"image size {size} is smaller than the patch size {multiple}")
        print(f"eval.attention: image size {size} is not a multiple of the patch size {multiple}; "
              f"using {rounded}", file=sys.stderr)
        size = rounded
    return size


def _load_images(cfg: dict, info: dict, size: int) -> tuple[Tensor, list[dict]]:
    """The normalised images [n, 3, size, size] and a description of each."""
    transform = eval_transform(size)
    files = cfg["attention"]["images"]
    if files:
        return (torch.stack([transform(load_rgb(f)) for f in files]),
                [{"path": str(f), "name": Path(f).name} for f in files])
    dataset, split = cfg["data"]["dataset"] or info["dataset"], cfg["data"]["split"]
    ds = build_dataset(dataset, split, data_dir=data_dir_or_default(cfg["data"]["data_dir"], info.get("data_dir")),
                       transform=transform)
    indices = cfg["attention"]["indices"] or subset_indices(ds.targets, cfg["attention"]["n_images"], SUBSET_SEED)
    bad = [i for i in indices if not 0 <= i < len(ds)]
    if bad:
        raise EvalError(f"config attention.indices: {bad} out of range for {dataset}/{split} ({len(ds)} images)")
    samples = getattr(ds, "samples", None)
    described, tensors = [], []
    for i in indices:
        image, target = ds[i]
        tensors.append(image)
        path = samples[i][0] if samples is not None else None
        name = "/".join(Path(path).parts[-2:]) if path else f"{dataset}/{split}[{i}]"
        described.append({"dataset": dataset, "split": split, "index": i, "path": path, "name": name,
                          "class": ds.classes[int(target)] if hasattr(ds, "classes") else int(target)})
    return torch.stack(tensors), described


def draw(cfg: dict) -> dict:
    """Draw the grid of a resolved configuration; returns the report (the JSON
    sidecar's content, plus ``json``: its path, and ``figure``: the figure)."""
    a, device = cfg["attention"], cfg["run"]["device"]
    threshold = a["threshold"] or None

    # ---- models and images ----
    models = _load_vits(cfg)
    infos = [info for _, info in models]
    labels = _labels(cfg, infos)
    size = _image_size(cfg, infos)
    images, described = _load_images(cfg, infos[0], size)

    # ---- maps, statistics and panels ----
    pictures = [image_array(im) for im in images]
    panels, stats, checkpoints = [], [], []
    for j, ((vit, info), label) in enumerate(zip(models, labels)):
        attn = cls_attention(vit, images.to(device)).cpu()  # [n, heads, h, w]
        entropy = map_entropy(attn)
        mask = keep_mass(attn, threshold) if threshold is not None else None
        rows = []
        for i in range(len(images)):
            rows.append([attn[i, k].double().numpy() if mask is None else mask_overlay(pictures[i], mask[i, k])
                         for k in range(attn.shape[1])])
            for k in range(attn.shape[1]):
                row = {"checkpoint": j, "label": label, "image": i, "head": k + 1,
                       "entropy": float(entropy[i, k]),
                       "relative_entropy": float(entropy[i, k]) / math.log(attn[i, k].numel()),
                       "cls_to_patches": float(attn[i, k].sum())}
                if mask is not None:
                    row["kept_fraction"] = float(mask[i, k].double().mean())
                stats.append(row)
        panels.append(rows)
        mine = [s for s in stats if s["checkpoint"] == j]
        checkpoints.append({"path": a["checkpoints"][j], "label": label, "which": cfg["eval"]["which"],
                            "grid": list(attn.shape[-2:]), "mean_entropy": float(entropy.mean()),
                            **{k: info.get(k) for k in ("method", "arch", "hvs", "epoch", "dataset",
                                                        "patch_size", "heads")},
                            **({"mean_kept_fraction": sum(s["kept_fraction"] for s in mine) / len(mine)}
                               if mask is not None else {})})

    # ---- PNG and JSON ----
    fig = render_grid(pictures, panels, labels, [d["name"] for d in described], a["panel_size"])
    out = Path(cfg["eval"]["output"])
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=fig.dpi)
    geo = geometry(fig, a["panel_size"], len(models), len(images))
    report = {"output": str(out), "image_size": size, "threshold": threshold, "colormap": COLORMAP,
              "checkpoints": checkpoints, "labels": labels, "images": described,
              "heads": [info["heads"] for info in infos], "geometry": geo, "maps": stats, "config": cfg}
    json_path = Path(a["json"]) if a["json"] else out.with_name(out.name + ".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    report.update(json=str(json_path), figure=fig)
    for c in checkpoints:
        print(f"{c['label']}: {c['arch']}, {c['heads']} heads, mean entropy {c['mean_entropy']:.3f} nats")
    print(f"wrote {out} ({geo['width']}x{geo['height']}, {geo['rows']} x {geo['columns']} panels) and {json_path}")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    cfg = parse_attention_args(argv)
    return run_main("eval.attention", lambda: draw(cfg))


if __name__ == "__main__":
    main()
