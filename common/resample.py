"""The geometric half of the view recipe on the training device
(``augment.device=model_crop``): crop, resize and flip, pixel for pixel as PIL.

With ``model_crop`` the loader workers only decode each image once and draw
(and record) every parameter; the crop boxes and flips of the candidates are
the rows' ``crop_*`` and ``flip`` columns (:data:`common.augment.PARAM_NAMES`).
This module turns a batch of decoded images into the candidates' ``uint8``
views, which :mod:`common.photometric` then finishes.

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

Here every pass of every view is a matrix whose columns hold those integer
weights, placed at the crop's offset in the decoded image (zero-padded to the
largest of a group of images of similar size), so that one batched matrix
product does the pass for all views of the group's images;
a horizontal flip reverses the columns of the horizontal matrix.  The products
run in float64, where the integer sums (below 2^31) are exact (on every
device: no TF32 in float64).  They are dense (every pixel of the padded image
times every output pixel): cheap on a GPU, slower than PIL on a CPU, where
``augment.device=loader`` stays the choice.
"""
from __future__ import annotations

import numpy as np
import torch

from common.augment import P

PRECISION_BITS = 22  # PIL: 32 - 8 - 2


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


def pass_matrix(n: int, size: int, offset: int, length: int, interpolation: str, flip: bool = False) -> np.ndarray:
    """[length, size] float64: one pass over pixels ``offset .. offset+n-1`` of
    an axis of ``length`` pixels, as a matrix (output column ``j`` takes
    ``sum_i M[i, j] p_i``); the identity (times 2^22) when ``n == size``, as
    PIL skips the pass.  ``flip`` reverses the outputs."""
    m = np.zeros((length, size))
    if n == size:
        m[offset + np.arange(size), np.arange(size)] = float(1 << PRECISION_BITS)
    else:
        xmin, fixed = pass_weights(n, size, interpolation)
        rows = offset + xmin[:, None] + np.arange(fixed.shape[1])[None, :]
        cols = np.broadcast_to(np.arange(size)[:, None], rows.shape)
        keep = fixed != 0
        m[rows[keep], cols[keep]] = fixed[keep]
    return m[:, ::-1] if flip else m


def _round_pass(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``clip8``: ``(sum + 2^21) >> 22`` clipped to [0, 255]."""
    return x.add_(float(1 << (PRECISION_BITS - 1))).div_(float(1 << PRECISION_BITS)).floor_().clamp_(0, 255)


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


_PILLOW_RULE: list = []


def pillow_vertical_first() -> bool:
    """Whether the installed Pillow runs the vertical pass first where the
    height shrinks much more than the width: probed once, on an image where
    the two orders round differently."""
    if not _PILLOW_RULE:
        from PIL import Image

        image = np.random.default_rng(0).integers(0, 256, (40, 12), dtype=np.uint8)
        got = np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC), dtype=np.float64)
        x = torch.from_numpy(image.astype(np.float64))
        mx = torch.from_numpy(pass_matrix(12, 16, 0, 12, "bicubic").copy())
        my = torch.from_numpy(pass_matrix(40, 16, 0, 40, "bicubic").T.copy())
        vh = _round_pass(_round_pass(my @ x) @ mx).numpy()
        hv = _round_pass(my @ _round_pass(x @ mx)).numpy()
        if not (np.array_equal(got, vh) or np.array_equal(got, hv)) or np.array_equal(vh, hv):
            raise RuntimeError("this Pillow's resize rounds unlike either known order of its passes: "
                               "augment.device=model_crop cannot replay it; use augment.device=model")
        _PILLOW_RULE.append(bool(np.array_equal(got, vh)))
    return _PILLOW_RULE[0]


def crop_resize_flip(images, params: torch.Tensor, size: int, interpolation: str,
                     max_values: int = 1 << 26) -> torch.Tensor:
    """The views of a batch: ``images`` the B decoded images (a list of uint8
    [3, H_i, W_i], any device, or a tensor [B, 3, H, W]), ``params`` [B, n,
    len(PARAM_NAMES)] (CPU) the rows of ``n`` views of each image, all of
    output ``size`` and ``interpolation``.  Returns [B, n, 3, size, size]
    float32 levels, equal to ``img.crop(box).resize((size, size), filter)``
    then maybe a flip (as :func:`common.augment.draw_geometry`).

    Images of similar size go together (sorted by area), zero-padded to the
    largest of their group, a group holding at most about ``max_values``
    float64 values per pass."""
    if isinstance(images, torch.Tensor):
        images = list(images.unbind(0))
    B, n = params.shape[:2]
    if len(images) != B:
        raise ValueError(f"{len(images)} images and parameter rows of {B}")
    p = params.detach().to("cpu", torch.float64).numpy()
    geometry = np.stack([p[..., P[k]] for k in ("crop_x", "crop_y", "crop_w", "crop_h", "flip")]).astype(np.int64)
    shapes = np.array([image.shape[-2:] for image in images]).reshape(B, 2)
    x0, y0, cw, ch, _ = geometry
    bad = ((x0 < 0) | (y0 < 0) | (cw < 1) | (ch < 1) | (x0 + cw > shapes[:, 1:2]) | (y0 + ch > shapes[:, 0:1])).any(1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"crop boxes outside image {i} of the batch ({shapes[i, 1]}x{shapes[i, 0]})")
    out = torch.empty(B, n, 3, size, size, dtype=torch.float32, device=images[0].device)
    group: list = []

    def flush():
        H, W = shapes[group].max(0)
        x = torch.zeros(len(group), 3, H, W, dtype=torch.float64, device=out.device)
        for j, i in enumerate(group):
            x[j, :, : shapes[i, 0], : shapes[i, 1]] = images[i]
        out[group] = _crop_resize_flip_padded(x, geometry[:, group], size, interpolation)
        group.clear()

    for i in np.argsort(shapes.prod(1), kind="stable"):
        H, W = np.maximum(shapes[group + [i]].max(0), n * size)
        if group and (len(group) + 1) * 3 * H * W > max_values:
            flush()
        group.append(int(i))
    flush()
    return out


def _crop_resize_flip_padded(x: torch.Tensor, geometry: np.ndarray, size: int, interpolation: str) -> torch.Tensor:
    """:func:`crop_resize_flip` of images zero-padded into one batch: ``x`` [B,
    3, H, W] float64, ``geometry`` [5, B, n] (crop x, y, w, h, flip)."""
    B, _, H, W = x.shape
    x0, y0, cw, ch, flip = geometry
    n, dev, S = geometry.shape[2], x.device, size
    out = torch.empty(B, n, 3, S, S, dtype=torch.float32, device=dev)
    first_v = vertical_first(cw, ch, S)
    for vfirst in (False, True):  # views of each order, padded to the most any image has (zero matrices)
        chosen = first_v == vfirst
        k = int(chosen.sum(1).max())
        if k == 0:
            continue
        slots = [[v for v in range(n) if chosen[b, v]] for b in range(B)]
        mx = np.zeros((B, k, W, S))
        my = np.zeros((B, k, S, H))
        for b, views in enumerate(slots):
            for j, v in enumerate(views):
                mx[b, j] = pass_matrix(cw[b, v], S, x0[b, v], W, interpolation, bool(flip[b, v]))
                my[b, j] = pass_matrix(ch[b, v], S, y0[b, v], H, interpolation).T
        mx, my = torch.from_numpy(mx).to(dev), torch.from_numpy(my).to(dev)
        if not vfirst:  # rows of the image through every view's horizontal matrix at once
            t = torch.bmm(x.reshape(B, 3 * H, W), mx.permute(0, 2, 1, 3).reshape(B, W, k * S))
            t = _round_pass(t).view(B, 3, H, k, S).permute(0, 3, 1, 2, 4).reshape(B * k, 3, H, S)
            views = _round_pass(torch.matmul(my.reshape(B * k, 1, S, H), t))
        else:  # columns of the image through every view's vertical matrix at once
            t = torch.bmm(my.reshape(B, k * S, H), x.permute(0, 2, 1, 3).reshape(B, H, 3 * W))
            t = _round_pass(t).view(B, k, S, 3, W).permute(0, 1, 3, 2, 4).reshape(B * k, 3, S, W)
            views = _round_pass(torch.matmul(t, mx.reshape(B * k, 1, W, S)))
        views = views.view(B, k, 3, S, S)
        for b, vs in enumerate(slots):
            if vs:
                out[b, vs] = views[b, : len(vs)].to(torch.float32)
    return out
