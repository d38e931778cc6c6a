"""The geometric half of the view recipe on the training device
(``augment.device=model_crop``): crop, resize and flip, pixel for pixel as PIL.

With ``model_crop`` the loader workers only decode each image once and draw
(and record) every parameter; the crop boxes and flips of the candidates are
the rows' ``crop_*`` and ``flip`` columns (:data:`common.views.augment.PARAM_NAMES`).
This module turns a batch of decoded images into the candidates' ``uint8``
views, which :mod:`common.views.photometric` then finishes.

PIL's ``Image.resize`` (``Resample.c``, 8 bits per channel) is separable: a
horizontal pass, then a vertical pass, each rounded to ``uint8``.  For output
pixel ``j`` of a pass over ``n`` input pixels to ``S`` outputs, with ``scale =
n / S`` and ``fs = max(scale, 1)``, it weighs input pixels ``xmin .. xmax-1``
around ``center = (j + 0.5) scale`` (``xmin = int(center - support fs + 0.5)``
clipped to 0, ``xmax`` likewise clipped to ``n``) by ``filter((i - center +
0.5) / fs)``, normalises the weights to sum 1 (in double), and stores them in
22-bit fixed point, rounded half away from zero.  A pass is then ``clip(
(sum_i w_i p_i + 2^21) >> 22, 0, 255)``.  Filters: bilinear (triangle, support
1) and bicubic (Keys, ``a = -0.5``, support 2).  Newer Pillows run the
vertical pass first where the height shrinks by much more than the width
(:func:`vertical_first`); the order is probed from the installed Pillow.

Here a pass runs for all views of a group of images of similar size at once
(zero-padded to the largest of them): for each of its K taps, one gather of
the input pixels the tap reads for every output pixel of every view (at the
crop's offset; a horizontal flip reverses the outputs' taps), times the tap's
integer weight, summed in int32 as PIL does, then rounded.  Integer
arithmetic throughout: exact on every device.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from common.numerics import to_device
from common.views.augment import P

PRECISION_BITS = 22  # PIL: 32 - 8 - 2
#: values a group's first pass holds at most, on a CPU and on an accelerator
CPU_MAX_VALUES, ACCELERATOR_MAX_VALUES = 1 << 24, 1 << 27


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic(x: np.ndarray) -> np.ndarray:
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


FILTERS = {"bilinear": (_bilinear, 1.0), "bicubic": (_bicubic, 2.0)}


def pass_weights(n: int, size: int, interpolation: str):
    """PIL's fixed-point weights of one pass from ``n`` pixels to ``size``:
    (``xmin`` [size] int, weights [size, K] int64, tap ``k`` at input pixel
    ``xmin + k``; taps past ``xmax`` are 0)."""
    fn, support = FILTERS[interpolation]
    scale = n / size
    fs = max(scale, 1.0)
    support = support * fs
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(size) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int): truncation, operands >= -0.5
    xmax = np.minimum((center + support + 0.5).astype(np.int64), n) - xmin
    taps = np.arange(ksize)
    w = fn(((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / fs))
    w = np.where(taps[None, :] < xmax[:, None], w, 0.0)
    total = np.zeros(size)
    for k in range(ksize):  # in tap order, as PIL sums
        total = total + w[:, k]
    w = np.where(total[:, None] != 0.0, w / np.where(total == 0.0, 1.0, total)[:, None], w)
    scaled = w * float(1 << PRECISION_BITS)
    fixed = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int64)
    return xmin, fixed


@functools.lru_cache(maxsize=4096)
def pass_taps(n: int, size: int, interpolation: str):
    """The taps of one pass from ``n`` pixels to ``size`` as PIL runs it:
    (input pixel of every tap [size, K], its int32 weight [size, K]), the
    identity (one tap of weight 2^22) where ``n == size`` (PIL skips that
    pass); taps past the filter's end weigh 0 (and point inside the input)."""
    if n == size:
        return np.arange(size)[:, None], np.full((size, 1), 1 << PRECISION_BITS, dtype=np.int32)
    xmin, fixed = pass_weights(n, size, interpolation)
    index = np.minimum(xmin[:, None] + np.arange(fixed.shape[1])[None, :], n - 1)
    return index, fixed.astype(np.int32)


def _taps(lengths, offsets, flips, size: int, interpolation: str, device):
    """Tap indices (int64, into the padded axis) and weights (int32), each
    [B, k, size, K], of the passes of ``k`` views of each of ``B`` images
    (``lengths``, ``offsets``, ``flips``: [B, k] crop lengths, offsets, flips
    along the axis; a length of 0 is an empty slot: all weights 0)."""
    B, k = lengths.shape
    found = {(b, v): pass_taps(int(lengths[b, v]), size, interpolation)
             for b in range(B) for v in range(k) if lengths[b, v] > 0}
    K = max(t[0].shape[1] for t in found.values())
    index = np.zeros((B, k, size, K), dtype=np.int64)
    weight = np.zeros((B, k, size, K), dtype=np.int32)
    for (b, v), (idx, w) in found.items():
        idx = idx + offsets[b, v]
        if flips[b, v]:
            idx, w = idx[::-1], w[::-1]
        index[b, v, :, : idx.shape[1]] = idx
        weight[b, v, :, : w.shape[1]] = w
    return to_device(index, device), to_device(weight, device)


def _round_pass(acc: torch.Tensor) -> torch.Tensor:
    """PIL's ``clip8``: ``(sum + 2^21) >> 22`` clipped to [0, 255] (int32)."""
    return ((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS).clamp_(0, 255)


def _pass(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, dim: int) -> torch.Tensor:
    """One pass along ``dim`` (3: rows, 4: columns) of ``x`` [B, k or 1, 3,
    H, W] int32 with taps ``index``/``weight`` [B, k, S, K]: sum of the
    weighted taps in int32, as PIL's ``int`` accumulator, then rounded."""
    B, k, S, K = index.shape
    shape = list(x.shape)
    shape[1], shape[dim] = k, S
    x = x.expand(B, k, *x.shape[2:])
    view = (B, k, 1, S, 1) if dim == 3 else (B, k, 1, 1, S)
    acc = torch.zeros(shape, dtype=torch.int32, device=x.device)
    for t in range(K):
        tap = torch.gather(x, dim, index[..., t].reshape(view).expand(shape))
        acc.add_(tap.mul_(weight[..., t].reshape(view)))
    return _round_pass(acc)


def _resize(x: torch.Tensor, geometry: np.ndarray, size: int, interpolation: str, vfirst: bool) -> torch.Tensor:
    """Crop, resize and flip ``k`` views of each image, all in one order of
    the passes: ``x`` [B, 3, H, W] int32 (zero-padded images), ``geometry``
    [5, B, k] (crop x, y, w, h, flip; w = 0: an empty slot).  Returns [B, k, 3,
    size, size] int32 levels."""
    x0, y0, cw, ch, flip = geometry
    none = np.zeros_like(flip)
    cols = _taps(cw, x0, flip, size, interpolation, x.device)
    rows = _taps(np.where(cw > 0, ch, 0), y0, none, size, interpolation, x.device)
    x = x[:, None]
    if vfirst:
        return _pass(_pass(x, *rows, dim=3), *cols, dim=4)
    return _pass(_pass(x, *cols, dim=4), *rows, dim=3)


def vertical_first(n_x, n_y, size: int):
    """Which crops PIL resizes vertical pass first (bool array over crops of
    ``n_x`` by ``n_y`` pixels to ``size``): newer Pillows do where the height
    shrinks by more than twice as many pixels as the width (``n_y - size > 0``
    and ``> 2 (n_x - size)``); older ones always start horizontally
    (:func:`pillow_vertical_first`).  The order changes the rounding between
    the passes, so it must be PIL's."""
    n_x, n_y = np.asarray(n_x), np.asarray(n_y)
    if not pillow_vertical_first():
        return np.zeros(np.broadcast(n_x, n_y).shape, dtype=bool)
    dy, dx = n_y - size, n_x - size
    return (dy > 0) & (dy > 2 * dx)


@functools.lru_cache(maxsize=None)
def pillow_vertical_first() -> bool:
    """Whether the installed Pillow runs the vertical pass first where the
    height shrinks much more than the width: probed once, on an image where
    the two orders round differently."""
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (40, 12, 3), dtype=np.uint8)
    got = torch.from_numpy(np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC)).copy()).int()
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].to(torch.int32)
    geometry = np.array([0, 0, 12, 40, 0]).reshape(5, 1, 1)
    vh, hv = (_resize(x, geometry, 16, "bicubic", order)[0, 0].permute(1, 2, 0) for order in (True, False))
    if not (torch.equal(got, vh) or torch.equal(got, hv)) or torch.equal(vh, hv):
        raise RuntimeError("this Pillow's resize rounds unlike either known order of its passes: "
                           "augment.device=model_crop cannot replay it; use augment.device=model")
    return torch.equal(got, vh)


def padded_group(pixels: torch.Tensor, starts: np.ndarray, shapes: np.ndarray, H: int, W: int) -> torch.Tensor:
    """Images of a packed batch (:class:`common.views.augment.DecodedBatch`: ``pixels``
    flat uint8, image g from ``starts[g]`` in [h, w, 3] order, ``shapes`` [G, 2]
    its (h, w)) zero-padded to [G, 3, H, W] int32 with one gather: a fixed
    number of kernels whatever the number of images."""
    device = pixels.device
    h, w, start = (to_device(a.astype(np.int64), device).view(-1, 1, 1, 1)
                   for a in (shapes[:, 0], shapes[:, 1], starts))
    y = torch.arange(H, device=device).view(1, 1, H, 1)
    x = torch.arange(W, device=device).view(1, 1, 1, W)
    c = torch.arange(3, device=device).view(1, 3, 1, 1)
    inside = (y < h) & (x < w)
    index = torch.where(inside, start + (y * w + x) * 3 + c, 0)
    return torch.where(inside, pixels[index].to(torch.int32), 0)


def crop_resize_flip(images, params: torch.Tensor, size: int, interpolation: str,
                     max_values: int | None = None) -> torch.Tensor:
    """The views of a batch: ``images`` the B decoded images (a
    :class:`common.views.augment.DecodedBatch`, or a list of uint8 [3, H_i, W_i],
    any device, or a tensor [B, 3, H, W]), ``params`` [B, n,
    len(PARAM_NAMES)] (CPU) the rows of ``n`` views of each image, all of
    output ``size`` and ``interpolation``.  Returns [B, n, 3, size, size]
    float32 levels, equal to ``img.crop(box).resize((size, size), filter)``
    then maybe a flip (as :func:`common.views.augment.draw_geometry`).

    Images of similar size go together (sorted by area), zero-padded to the
    largest of their group, a group's first pass holding at most about
    ``max_values`` values (default 2^24 on a CPU, 2^27 on an accelerator:
    fewer, larger groups).  A group's kernels do not depend on its number of
    images: a packed batch is padded with one gather, and the views are
    written to the output with one indexed copy per order of the passes."""
    packed = images if hasattr(images, "pixels") else None
    if isinstance(images, torch.Tensor):
        images = list(images.unbind(0))
    B, n = params.shape[:2]
    if len(images) != B:
        raise ValueError(f"{len(images)} images and parameter rows of {B}")
    if packed is not None:
        shapes = packed.shapes.numpy().astype(np.int64).reshape(B, 2)
        starts = np.concatenate([[0], np.cumsum(shapes.prod(1) * 3)[:-1]]).astype(np.int64)
    else:
        shapes = np.array([image.shape[-2:] for image in images]).reshape(B, 2)
    p = params.detach().to("cpu", torch.float64).numpy()
    geometry = np.stack([p[..., P[k]] for k in ("crop_x", "crop_y", "crop_w", "crop_h", "flip")]).astype(np.int64)
    x0, y0, cw, ch, _ = geometry
    bad = ((x0 < 0) | (y0 < 0) | (cw < 1) | (ch < 1) | (x0 + cw > shapes[:, 1:2]) | (y0 + ch > shapes[:, 0:1])).any(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"crop boxes outside image {i} of the batch ({shapes[i, 1]}x{shapes[i, 0]})")
    device = packed.pixels.device if packed is not None else images[0].device
    out = torch.empty(B, n, 3, size, size, dtype=torch.float32, device=device)
    if max_values is None:
        max_values = CPU_MAX_VALUES if out.device.type == "cpu" else ACCELERATOR_MAX_VALUES
    first_v = vertical_first(cw, ch, size)
    group: list = []

    def flush():
        H, W = shapes[group].max(0)
        if packed is not None:
            x = padded_group(packed.pixels, starts[group], shapes[group], int(H), int(W))
        else:
            x = torch.zeros(len(group), 3, H, W, dtype=torch.int32, device=out.device)
            for j, i in enumerate(group):
                x[j, :, : shapes[i, 0], : shapes[i, 1]] = images[i]
        for vfirst in (False, True):  # the views of each order, in slots padded to the most any image has
            chosen = first_v[group] == vfirst
            k = int(chosen.sum(1).max())
            if k == 0:
                continue
            slots = [np.flatnonzero(c) for c in chosen]
            sub = np.zeros((5, len(group), k), dtype=np.int64)
            for j, (i, views) in enumerate(zip(group, slots)):
                sub[:, j, : len(views)] = geometry[:, i, views]
            views = _resize(x, sub, size, interpolation, vfirst)
            # view v of image i is slot s of group member j: one indexed copy for all of them
            dst = np.concatenate([i * n + vs for i, vs in zip(group, slots)])
            src = np.concatenate([j * k + np.arange(len(vs)) for j, vs in enumerate(slots)])
            flat = views.reshape(len(group) * k, 3, size, size)
            out.view(B * n, 3, size, size).index_copy_(
                0, to_device(dst, out.device), flat.index_select(0, to_device(src, out.device)).to(torch.float32))
        group.clear()

    for i in np.argsort(shapes.prod(1), kind="stable"):
        H, W = np.maximum(shapes[group + [i]].max(0), size)
        if group and (len(group) + 1) * n * 3 * H * W > max_values:
            flush()
        group.append(int(i))
    flush()
    return out
