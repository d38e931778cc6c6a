"""DINO-style self-attention maps of ViT checkpoints, side by side (HVS paper, Appendix J).

For every image, the last block's attention of the [CLS] token to the patch
tokens is drawn for every head, one row per checkpoint, so that a model trained
with Hard View Selection can be compared with its baseline on the same images
(the paper's Appendix J puts HVS on top and the baseline below: pass the HVS
checkpoint first).  The maps are those of DINO's ``visualize_attention.py``:
the [CLS] row of the softmax attention of the last block, per head, with the
[CLS]->[CLS] weight dropped (so a head's map sums to at most 1), on the patch
grid (``image_size / patch`` cells per side).

How to read the PNG (one file, all images stacked top to bottom)::

    image 1: <name>                                 <- image band
    <label A>   head 1    head 2    head 3          <- row band
    [image]     [map]     [map]     [map]           <- checkpoint A
    <label B>   head 1    head 2    head 3
    [image]     [map]     [map]     [map]           <- checkpoint B
    image 2: <name>
    ...

* The first column is the input image as the model saw it (resize, centre
  crop, de-normalised).  Every other column is one head.
* Without ``--threshold`` a head panel is its attention map coloured with
  matplotlib's viridis: strong attention yellow, weak green, weakest dark
  blue/purple.  Each panel is scaled by its own minimum and maximum (as DINO's
  ``plt.imsave``), so colours show *where* a head looks, not how strongly in
  absolute terms; compare heads and checkpoints by the entropies in the JSON.
* With ``--threshold F`` a head panel is an overlay instead: the input image
  where the head's *kept mass* lies (the fewest patches, largest attention
  first, holding a fraction ``F`` of the head's attention; DINO uses 0.6) and
  the image darkened to :data:`DIM` of its brightness elsewhere.
* Pixel ``(y, x)`` of a head panel shows patch ``(y * h // P, x * w // P)`` of
  the ``h x w`` grid (nearest-neighbour upsampling to the panel size ``P``).

Geometry (pixels; ``P`` = ``--panel-size``, ``G`` = :data:`GAP`, ``B`` =
:data:`BAND`, ``C`` = 1 + the largest number of heads, ``R`` = the number of
checkpoints, ``n`` = the number of images)::

    width  = G + C * (P + G)
    height = G + n * (B + R * (B + P + G))
    panel (image i, checkpoint j, column c) has its top-left corner at
        x = G + c * (P + G)
        y = G + i * (B + R * (B + P + G)) + B + j * (B + P + G) + B

Column 0 is the image, column ``k`` head ``k``.  Checkpoints may differ in
patch size and number of heads: a row with fewer heads leaves the remaining
panels blank (background).  The image size must then be a multiple of every
patch size.  The background is white and the captions, drawn with PIL's default
font, are black.

Beside the PNG a JSON sidecar (``<output>.json`` unless ``--json``) lists the
checkpoints, labels, images, heads, the geometry, and per checkpoint, image and
head: the entropy (nats) of the map normalised to sum 1, that entropy relative
to the uniform map's ``log(h * w)``, the [CLS]->patch mass, and with
``--threshold`` the fraction of patches kept; and per checkpoint the means.

Example (ImageNet-100 validation images, teacher weights)::

    python -m eval.attention \\
        --checkpoints runs/dino_hvs/checkpoint.pth runs/dino/checkpoint.pth \\
        --labels HVS baseline --dataset imagenet --split val --n-images 4 \\
        --output results/attention_dino.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from eval.knn import _positive_int

GAP = 4  # px between panels and around the grid
BAND = 14  # px of the caption band above every row and every image
DIM = 0.25  # brightness of the dropped patches in the --threshold overlay
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
COLORMAP = "viridis"
SUBSET_SEED = 0  # seed of the class-stratified draw of --n-images


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
def _colormap():
    """matplotlib's viridis, imported lazily (only the colormap registry is used;
    the Agg backend is selected unless pyplot is already in use)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    return matplotlib.colormaps[COLORMAP]


def upsample_nearest(grid: np.ndarray, size: int) -> np.ndarray:
    """``grid`` [h, w, ...] to [size, size, ...]: pixel (y, x) takes cell
    (y * h // size, x * w // size)."""
    h, w = grid.shape[:2]
    rows, cols = np.arange(size) * h // size, np.arange(size) * w // size
    return grid[rows][:, cols]


def color_panel(attn_map: Tensor, size: int) -> np.ndarray:
    """One head's map [h, w] as a uint8 RGB panel [size, size, 3]: scaled by its
    own minimum and maximum (a constant map is all 0), coloured with viridis,
    upsampled (nearest) to ``size``."""
    a = attn_map.detach().double().cpu().numpy()
    lo, hi = a.min(), a.max()
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    rgb = _colormap()(scaled, bytes=True)[..., :3]
    return upsample_nearest(rgb, size)


def mask_panel(image_panel: np.ndarray, mask: Tensor) -> np.ndarray:
    """The overlay of ``--threshold``: ``image_panel`` where ``mask`` [h, w] is
    set, the image darkened to :data:`DIM` elsewhere."""
    keep = upsample_nearest(mask.cpu().numpy(), image_panel.shape[0])[..., None]
    return np.where(keep, image_panel, (image_panel * DIM).astype(np.uint8))


def image_panel(image: Tensor, size: int) -> np.ndarray:
    """A normalised image [3, H, W] back to uint8 RGB [size, size, 3] (ImageNet
    mean and std undone, bicubic resize)."""
    from PIL import Image

    from common.augment import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    rgb = ((image.detach().cpu().float() * std + mean).clamp(0, 1) * 255).round().byte()
    pil = Image.fromarray(rgb.permute(1, 2, 0).numpy())
    return np.asarray(pil.resize((size, size), Image.BICUBIC))


@dataclass(frozen=True)
class Geometry:
    """Pixel geometry of the grid (see the module docstring)."""

    panel: int
    columns: int  # 1 + the largest number of heads
    rows: int  # checkpoints per image
    images: int
    gap: int = GAP
    band: int = BAND

    @property
    def row_height(self) -> int:
        return self.band + self.panel + self.gap

    @property
    def block_height(self) -> int:
        return self.band + self.rows * self.row_height

    @property
    def width(self) -> int:
        return self.gap + self.columns * (self.panel + self.gap)

    @property
    def height(self) -> int:
        return self.gap + self.images * self.block_height

    def block_y(self, image: int) -> int:
        return self.gap + image * self.block_height

    def row_y(self, image: int, row: int) -> int:
        """Top of the caption band of a row."""
        return self.block_y(image) + self.band + row * self.row_height

    def panel_xy(self, image: int, row: int, column: int) -> tuple[int, int]:
        """Top-left corner (x, y) of a panel."""
        return self.gap + column * (self.panel + self.gap), self.row_y(image, row) + self.band

    def as_dict(self) -> dict:
        return {"width": self.width, "height": self.height, "panel": self.panel, "gap": self.gap,
                "band": self.band, "columns": self.columns, "rows_per_image": self.rows,
                "images": self.images, "row_height": self.row_height, "block_height": self.block_height,
                "panel_x": [self.panel_xy(0, 0, c)[0] for c in range(self.columns)],
                "panel_y": [[self.panel_xy(i, j, 0)[1] for j in range(self.rows)] for i in range(self.images)]}


def _fit(draw, text: str, width: int) -> str:
    """``text`` shortened (ending in '..') to fit ``width`` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "..") > width:
        text = text[:-1]
    return text + ".."


def render_grid(images: Sequence[np.ndarray], panels: Sequence[Sequence[Sequence[np.ndarray]]],
                labels: Sequence[str], image_names: Sequence[str], panel: int):
    """Compose the grid: ``images[i]`` the image panel of image ``i`` and
    ``panels[j][i]`` the head panels of checkpoint ``j`` on image ``i`` (uint8
    [panel, panel, 3] each).  Returns ``(PIL image, Geometry)``."""
    from PIL import Image, ImageDraw

    columns = 1 + max(len(heads) for rows in panels for heads in rows)
    geo = Geometry(panel=panel, columns=columns, rows=len(panels), images=len(images))
    canvas = np.full((geo.height, geo.width, 3), BACKGROUND, dtype=np.uint8)
    for i, img in enumerate(images):
        for j, row in enumerate(panels):
            for c, pix in enumerate([img, *row[i]]):
                x, y = geo.panel_xy(i, j, c)
                canvas[y:y + panel, x:x + panel] = pix
    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    for i, name in enumerate(image_names):
        draw.text((geo.gap, geo.block_y(i) + 1), _fit(draw, f"image {i + 1}: {name}", geo.width - 2 * geo.gap),
                  fill=TEXT)
        for j, label in enumerate(labels):
            y = geo.row_y(i, j) + 1
            for c in range(1 + len(panels[j][i])):
                text = label if c == 0 else f"head {c}"
                draw.text((geo.panel_xy(i, j, c)[0], y), _fit(draw, text, panel), fill=TEXT)
    return out, geo


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "eval.attention",
        description="DINO-style attention maps of the last block's [CLS] token, per head, for ViT "
                    "checkpoints side by side on the same images (HVS paper, Appendix J). Writes one "
                    "PNG (all images stacked; one row per checkpoint, columns: image, head 1, ...) and a "
                    "JSON sidecar with the entropies of the maps.")
    p.add_argument("--checkpoints", required=True, nargs="+", metavar="PATH",
                   help="DINO or iBOT checkpoints with a ViT, one row each in this order (the paper: HVS first, "
                        "then the baseline); patch sizes and numbers of heads may differ")
    p.add_argument("--labels", nargs="+", default=None, metavar="TEXT",
                   help="one row label per checkpoint (default: '<method> HVS' or '<method> baseline')")
    p.add_argument("--which", default="auto", choices=["auto", "teacher", "student"],
                   help="which weights to draw (auto: the teacher for DINO/iBOT; default: auto)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", nargs="+", default=None, metavar="FILE",
                     help="image files to draw (instead of --dataset)")
    src.add_argument("--dataset", default=None, metavar="NAME",
                     help="take the images from this dataset (cifar10 | cifar100 | tiny-imagenet-100 | imagenet | "
                          "imagefolder | ...; default without --images: the first checkpoint's dataset)")
    p.add_argument("--data-dir", default=None, metavar="PATH",
                   help="data root (default: $HVS_DATA_DIR, else the first checkpoint's data directory)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="dataset split (default: val)")
    p.add_argument("--n-images", type=_positive_int, default=4, metavar="N",
                   help="number of dataset images, drawn class-stratified and deterministically (default: 4)")
    p.add_argument("--indices", type=int, nargs="+", default=None, metavar="I",
                   help="dataset indices to draw, in this order (overrides --n-images)")
    p.add_argument("--image-size", type=_positive_int, default=None, metavar="PX",
                   help="input size (resize + centre crop; default: the first checkpoint's training crop size); "
                        "rounded down to a multiple of every checkpoint's patch size")
    p.add_argument("--panel-size", type=_positive_int, default=96, metavar="PX",
                   help="side of every panel; images and maps are resized to it (default: 96)")
    p.add_argument("--threshold", type=_fraction, default=None, metavar="F",
                   help="instead of the coloured map, show the image where a head keeps a fraction F of its "
                        f"attention (fewest patches, largest first) and darken the rest to {DIM:g} (DINO: 0.6)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the forward passes (default: cuda if available, else cpu)")
    p.add_argument("--output", required=True, metavar="PNG", help="the grid PNG to write (required)")
    p.add_argument("--json", default=None, metavar="PATH", help="the JSON sidecar (default: <output>.json)")
    return p


def _load_vits(args) -> list[tuple[nn.Module, dict]]:
    """(backbone, info) per checkpoint; only ViTs (exits otherwise)."""
    from common.checkpoint import CheckpointError, load_backbone

    models = []
    for path in args.checkpoints:
        try:
            backbone, info = load_backbone(path, which=args.which)
        except CheckpointError as e:
            sys.exit(f"eval.attention: {e}")
        try:
            info["patch_size"], info["heads"] = vit_patch_size(backbone), vit_num_heads(backbone)
        except TypeError:
            sys.exit(f"eval.attention: checkpoint {path} holds a {info['arch']} backbone (method "
                     f"{info['method']}), not a ViT: attention maps need a DINO or iBOT checkpoint "
                     f"with model.arch=vit_*")
        models.append((backbone.to(args.device), info))
    return models


def _labels(args, infos: list[dict]) -> list[str]:
    if args.labels is not None:
        if len(args.labels) != len(infos):
            sys.exit(f"eval.attention: {len(args.labels)} --labels for {len(infos)} --checkpoints")
        return list(args.labels)
    labels = [f"{info['method']} {'HVS' if info['hvs'] else 'baseline'}" for info in infos]
    return [f"{label} #{j + 1}" if labels.count(label) > 1 else label for j, label in enumerate(labels)]


def _image_size(args, infos: list[dict]) -> int:
    size = args.image_size or int(infos[0]["image_size"])
    multiple = math.lcm(*(info["patch_size"] for info in infos))
    if size % multiple:
        rounded = size // multiple * multiple
        if rounded == 0:
            sys.exit(f"eval.attention: image size {size} is smaller than the patch size {multiple}")
        print(f"eval.attention: image size {size} is not a multiple of the patch size {multiple}; "
              f"using {rounded}", file=sys.stderr)
        size = rounded
    return size


def _load_images(args, info: dict, size: int) -> tuple[Tensor, list[dict]]:
    """The normalised images [n, 3, size, size] and a description of each."""
    from common.augment import eval_transform
    from common.data import DataError, build_dataset, load_rgb, subset_indices

    transform = eval_transform(size)
    try:
        if args.images:
            return (torch.stack([transform(load_rgb(f)) for f in args.images]),
                    [{"path": str(f), "name": Path(f).name} for f in args.images])
        dataset = args.dataset or info["dataset"]
        data_dir = args.data_dir or os.environ.get("HVS_DATA_DIR") or info.get("data_dir")
        ds = build_dataset(dataset, args.split, data_dir=data_dir, transform=transform)
    except DataError as e:
        sys.exit(f"eval.attention: {e}")
    indices = args.indices if args.indices is not None else subset_indices(ds.targets, args.n_images, SUBSET_SEED)
    bad = [i for i in indices if not 0 <= i < len(ds)]
    if bad:
        sys.exit(f"eval.attention: --indices {bad} out of range for {dataset}/{args.split} ({len(ds)} images)")
    samples = getattr(ds, "samples", None)
    described, tensors = [], []
    for i in indices:
        image, target = ds[i]
        tensors.append(image)
        path = samples[i][0] if samples is not None else None
        name = "/".join(Path(path).parts[-2:]) if path else f"{dataset}/{args.split}[{i}]"
        described.append({"dataset": dataset, "split": args.split, "index": i, "path": path, "name": name,
                          "class": ds.classes[int(target)] if hasattr(ds, "classes") else int(target)})
    return torch.stack(tensors), described


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)

    # ---- models and images ----
    models = _load_vits(args)
    infos = [info for _, info in models]
    labels = _labels(args, infos)
    size = _image_size(args, infos)
    images, described = _load_images(args, infos[0], size)

    # ---- maps, statistics and panels ----
    img_panels = [image_panel(im, args.panel_size) for im in images]
    panels, stats, checkpoints = [], [], []
    for j, ((vit, info), label) in enumerate(zip(models, labels)):
        attn = cls_attention(vit, images.to(args.device)).cpu()  # [n, heads, h, w]
        entropy = map_entropy(attn)
        mask = keep_mass(attn, args.threshold) if args.threshold is not None else None
        rows = []
        for i in range(len(images)):
            rows.append([color_panel(attn[i, k], args.panel_size) if mask is None
                         else mask_panel(img_panels[i], mask[i, k]) for k in range(attn.shape[1])])
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
        checkpoints.append({"path": str(args.checkpoints[j]), "label": label, "which": args.which,
                            "grid": list(attn.shape[-2:]), "mean_entropy": float(entropy.mean()),
                            **{k: info.get(k) for k in ("method", "arch", "hvs", "epoch", "dataset",
                                                        "patch_size", "heads")},
                            **({"mean_kept_fraction": sum(s["kept_fraction"] for s in mine) / len(mine)}
                               if mask is not None else {})})

    # ---- PNG and JSON ----
    grid, geo = render_grid(img_panels, panels, labels, [d["name"] for d in described], args.panel_size)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    report = {"output": str(out), "image_size": size, "threshold": args.threshold, "colormap": COLORMAP,
              "checkpoints": checkpoints, "labels": labels, "images": described,
              "heads": [info["heads"] for info in infos], "geometry": geo.as_dict(), "maps": stats}
    json_path = Path(args.json) if args.json else out.with_name(out.name + ".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
    report["json"] = str(json_path)
    for c in checkpoints:
        print(f"{c['label']}: {c['arch']}, {c['heads']} heads, mean entropy {c['mean_entropy']:.3f} nats")
    print(f"wrote {out} ({geo.width}x{geo.height}) and {json_path}")
    return report


if __name__ == "__main__":
    main()
