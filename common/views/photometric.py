"""The photometric half of the view recipe, batched on the training device
(``augment.device=model``).

With ``augment.device=loader`` (the default) every candidate view is finished
in PIL in the loader workers (:func:`common.views.augment.render`).  With ``model``
the workers only crop, flip and resize, hand over ``uint8`` tensors, and still
draw and record every photometric parameter with the same random sequence; the
training loop then runs :class:`DevicePhotometric` over all candidates of the
batch, driven by those recorded rows (:data:`common.views.augment.PARAM_NAMES`):

1. colour jitter: brightness, contrast, saturation, hue with the recorded
   factors, in the recorded order (four rounds; in round ``k`` each sample runs
   the operation ``order_k`` it drew);
2. grayscale; 3. Gaussian blur with the recorded sigma; 4. solarisation;
5. to float in [0, 1] and normalisation with the recipe's mean and std.

With ``augment.device=model_crop`` the workers hand over the decoded images
instead, and :class:`DeviceViews` first crops, resizes and flips the
candidates on the device (:mod:`common.views.resample`), then does the same.

Every operation follows the integer arithmetic of the PIL operation it
replaces, rounding to ``uint8`` where PIL does, so that the pixels match the
loader path (tests/test_device_augment.py replays recorded rows through both):

- ``Image.blend(a, b, t)`` (brightness: ``a`` black; contrast: ``a`` the
  rounded mean luma; saturation: ``a`` the luma image) computes
  ``a + t (b - a)`` in float32 and truncates, clipped to [0, 255];
- luma ``L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`` (ITU-R 601-2 in 16-bit
  fixed point), which grayscale replicates to three channels;
- hue (torchvision's PIL path): RGB -> HSV in ``uint8``, ``h + trunc(255 f)``
  modulo 256, HSV -> RGB, with PIL's float and double steps;
- ``ImageFilter.GaussianBlur(sigma)``: three passes of an extended box filter
  of radius ``r(sigma)`` (Gwosdek et al. 2011) along x, then three along y,
  each in 24-bit fixed point with edge pixels repeated and rounded to ``uint8``;
- solarisation: ``p -> 255 - p`` for ``p >= 128``.

Working images are float32 tensors holding integers 0..255 (exact); the
fixed-point blur runs in int32 (its 24-bit weights split in 12-bit halves).
The replay is exact (0 levels apart) on the CPU, with one caveat: the rows
hold the factors as float32 and the loader path hands PIL the float64 draw.
PIL's blend and blur take float32 themselves, so only the hue shift
``trunc(255 f)`` can differ, by one hue level, when ``255 f`` lies within
about 4e-6 of an integer (a chance of about 1e-5 per jittered view).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from common.numerics import to_device
from common.views.augment import P
from common.views.resample import crop_resize_flip

ORDER_COLUMNS = [P[f"order{k}"] for k in range(4)]
FACTOR_COLUMNS = [P["brightness"], P["contrast"], P["saturation"], P["hue"]]
BLUR_PASSES = 3  # PIL's GaussianBlur: three box passes per direction


# ----------------------------------------------------------------------------
# the operations, on float32 images [n, 3, H, W] holding integers 0..255
# ----------------------------------------------------------------------------
def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def blend(a, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(a, b, t)``: ``a + t (b - a)`` in float32, truncated
    and clipped to [0, 255]; ``t`` [n] per sample (float32, as PIL takes it);
    ``a`` a tensor or 0."""
    t = _per_sample(t.to(torch.float32))
    if isinstance(a, torch.Tensor):
        out = (b - a).mul_(t).add_(a)
    else:  # a == 0: t * b exactly
        out = b * t
    return out.floor_().clamp_(0, 255)


def luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``, ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``:
    [n, 1, H, W].  Exact in float32: every partial sum is an integer below 2^24
    (elementwise, never a matmul that TF32 could round)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * 19595.0).add_(g, alpha=38470.0).add_(b, alpha=7471.0).add_(32768.0).div_(65536.0).floor_()


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend of black and the image."""
    return blend(0, x, f)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend of the image's mean luma (rounded half
    up; the mean in float64 as ImageStat's) and the image."""
    total = luma(x).sum(dim=(1, 2, 3), dtype=torch.float64)
    mean = torch.floor(total / (x.shape[-1] * x.shape[-2]) + 0.5).to(torch.float32)
    return blend(_per_sample(mean), x, f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color``: blend of the luma image and the image."""
    return blend(luma(x), x, f)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Round a float64 tensor to float32 and back (a C ``float`` variable)."""
    return x.to(torch.float32).to(torch.float64)


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    """C's ``round`` for x >= 0 (halves away from zero), exactly."""
    fl = torch.floor(x)
    return fl + (x - fl >= 0.5).to(x.dtype)


class HSVTables:
    """PIL's RGB <-> HSV conversions (``uint8`` channels), tabulated from
    their float/double arithmetic.

    RGB -> HSV: ``v = max``; ``s = trunc(255 f32(c / max))`` with ``c = max -
    min``: a table over (c, max); the hue depends on which channel is the
    maximum and on the other two channels' distances to it, ``d1, d2`` (``c =
    max(d1, d2)``): ``h = f32(d2/c) - f32(d1/c)`` (red), ``2 + f32(d1/c) -
    f32(d2/c)`` (green), ``4 + ...`` (blue), then ``trunc(255 fmod(h/6 + 1, 1))``:
    three tables over (d1, d2).

    HSV -> RGB: ``i = floor(6h/255)``, ``f = 6h/255 - i``, ``s' = s/255``;
    ``p, q, t = round(v (1 - s'))``, ``round(v (1 - f32(s' f)))``,
    ``round(v (1 - s'(1 - f)))``, and each sector of ``i`` sends three of
    (v, p, q, t) to (r, g, b): the factor of each channel is tabulated over
    (s, h), its product with v taken per pixel in float64 (as PIL's double)."""

    def __init__(self, device):
        k = torch.arange(256, dtype=torch.float64)
        d1, d2 = k.repeat_interleave(256), k.repeat(256)  # index d1 * 256 + d2
        c = torch.maximum(d1, d2)
        safe = torch.where(c == 0, 1.0, c)
        q1, q2 = _f32(d1 / safe), _f32(d2 / safe)
        hues = [_f32(q2 - q1), _f32(2.0 + q1 - q2), _f32(4.0 + q1 - q2)]
        self.hue = torch.cat([torch.where(c == 0, 0.0, torch.trunc(_f32(torch.fmod(h / 6.0 + 1.0, 1.0)) * 255.0))
                              for h in hues]).to(torch.float32)  # [3 * 65536]
        cr, mx = d1, torch.where(d2 == 0, 1.0, d2)  # index c * 256 + max
        sat = torch.trunc(_f32(cr / mx) * 255.0).clamp(0, 255)
        self.sat = torch.where((cr == 0) | (cr > d2), 0.0, sat).to(torch.float32)
        s, h = d1, d2  # index s * 256 + h
        h6 = h * 6.0 / 255.0
        i = torch.floor(h6)
        f, fs = _f32(h6 - i), _f32(s / 255.0)
        factors = torch.stack([torch.ones_like(fs), 1.0 - fs, 1.0 - _f32(fs * f), 1.0 - fs * (1.0 - f)])  # v, p, q, t
        # (r, g, b) of each sector (i mod 6) as indices into (v, p, q, t); grey (s = 0): v, v, v
        sectors = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
        pick = sectors[torch.remainder(i, 6).long()]  # [65536, 3]
        pick[s == 0] = 0
        self.channel = torch.gather(factors, 0, pick.T)  # [3, 65536] float64: channel = round(v * factor)
        self.hue, self.sat, self.channel = (to_device(t, device) for t in (self.hue, self.sat, self.channel))

    _cache: dict = {}

    @classmethod
    def on(cls, device) -> "HSVTables":
        key = str(torch.device(device))
        if key not in cls._cache:
            cls._cache[key] = cls(device)
        return cls._cache[key]

    def to_hsv(self, x: torch.Tensor):
        """[n, 3, H, W] levels -> h, s, v (float32 [n, H, W] levels)."""
        r, g, b = x.unbind(1)
        v = torch.maximum(r, torch.maximum(g, b))
        c = v - torch.minimum(r, torch.minimum(g, b))
        dr, dg, db = v - r, v - g, v - b
        red, green = r == v, g == v
        branch = torch.where(red, 0.0, torch.where(green, 1.0, 2.0))
        d1 = torch.where(red, dg, torch.where(green, dr, dg))
        d2 = torch.where(red, db, torch.where(green, db, dr))
        h = self.hue[(branch * 65536 + d1 * 256 + d2).long()]
        s = self.sat[(c * 256 + v).long()]
        return h, s, v

    def to_rgb(self, h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """h, s, v levels [n, H, W] -> [n, 3, H, W] levels."""
        idx = (s * 256 + h).long()
        vd = v.to(torch.float64)
        return torch.stack([_round_half_up(vd * self.channel[c][idx]).clamp_(0, 255).to(torch.float32)
                            for c in range(3)], 1)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """torchvision's PIL ``adjust_hue``: the HSV hue channel (``uint8``) shifted
    by ``trunc(255 f)`` modulo 256."""
    tables = HSVTables.on(x.device)
    h, s, v = tables.to_hsv(x)
    shift = torch.trunc(f.to(torch.float64) * 255.0).to(torch.float32).view(-1, 1, 1)
    return tables.to_rgb(torch.remainder(h + shift, 256.0), s, v)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``convert("L").convert("RGB")``."""
    return luma(x).expand(-1, 3, -1, -1).contiguous()


def solarize(x: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize(threshold=128)``: levels >= 128 are inverted."""
    return torch.where(x >= 128, 255 - x, x)


def box_radius(sigma: float) -> float:
    """The extended-box radius of PIL's GaussianBlur for ``sigma`` (three
    passes; Gwosdek et al. 2011, eqs. 7, 11, 14), in PIL's float/double steps."""
    f32, n = np.float32, BLUR_PASSES
    sigma = f32(sigma)
    sigma2 = f32(f32(sigma * sigma) / f32(n))
    big_l = f32(math.sqrt(12.0 * float(sigma2) + 1.0))
    l = f32(math.floor((float(big_l) - 1.0) / 2.0))
    a = f32(f32(f32(2) * l + f32(1)) * f32(l * f32(l + f32(1)) - f32(f32(3) * sigma2)))
    a = f32(a / f32(f32(6) * f32(sigma2 - f32(l + f32(1)) * f32(l + f32(1)))))
    return float(f32(l + a))


def box_weights(radius: float):
    """(integer radius, weight of the inner taps, weight of the two outer taps)
    of one extended-box pass, in 24-bit fixed point (the inner taps and the
    two fractional outer taps sum to at most 2^24)."""
    r = np.float32(radius)
    whole = int(r)
    if whole > 512:
        raise ValueError(f"blur radius {radius} is out of range")
    ww = int(np.float32(np.float32(1 << 24) / np.float32(r * np.float32(2) + np.float32(1))))
    fw = ((1 << 24) - (whole * 2 + 1) * ww) // 2
    return whole, ww, fw


def _box_pass(x: torch.Tensor, dim: int, whole: int, w: tuple) -> torch.Tensor:
    """One extended-box pass along ``dim`` of int32 levels, edges repeated:
    ``(ww * inner + fw * outer + 2^23) >> 24``, in int32 with the weights split
    into 12-bit halves (``w``: the per-sample tensors ww >> 12, ww & 4095,
    fw >> 12, fw & 4095)."""
    n, pad = x.shape[dim], whole + 1
    first, last = x.narrow(dim, 0, 1), x.narrow(dim, n - 1, 1)
    shape = list(x.shape)
    shape[dim] = pad
    xp = torch.cat([first.expand(shape), x, last.expand(shape)], dim)
    inner = xp.narrow(dim, 1, n).clone()
    for k in range(2, 2 * whole + 2):
        inner += xp.narrow(dim, k, n)
    outer = xp.narrow(dim, 0, n) + xp.narrow(dim, 2 * pad, n)
    wh, wl, fh, fl = w
    high = inner * wh + outer * fh
    low = (inner * wl).add_(outer * fl).add_(1 << 23)
    return high.add_(low >> 12) >> 12


def gaussian_blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """PIL's ``ImageFilter.GaussianBlur(radius=sigma)`` of every sample, each
    with its own sigma (a sequence of floats): three extended-box passes along
    x, then three along y, each rounded to uint8.  Samples are grouped by the
    integer part of their box radius; the weights are per sample."""
    weights = [box_weights(box_radius(s)) for s in sigma]
    out = x.to(torch.int32)
    for whole in sorted({w[0] for w in weights}):
        rows = [i for i, w in enumerate(weights) if w[0] == whole]
        ww = torch.tensor([weights[i][1] for i in rows], dtype=torch.int32)
        fw = torch.tensor([weights[i][2] for i in rows], dtype=torch.int32)
        w = tuple(_per_sample(to_device(t, x.device)) for t in (ww >> 12, ww & 4095, fw >> 12, fw & 4095))
        if len(rows) == len(weights):
            y = out
        else:
            idx = to_device(rows, x.device)
            y = out.index_select(0, idx)
        for dim in (-1, -2):
            for _ in range(BLUR_PASSES):
                y = _box_pass(y, dim, whole, w)
        if len(rows) == len(weights):
            out = y
        else:
            out.index_copy_(0, idx, y)
    return out.to(torch.float32)


# ----------------------------------------------------------------------------
# the recorded rows -> the finished views
# ----------------------------------------------------------------------------
def _apply(x: torch.Tensor, rows: list, op, *args) -> None:
    """x[rows] <- op(x[rows], *args) in place (``rows``: sample indices)."""
    if rows:
        idx = to_device(rows, x.device)
        x.index_copy_(0, idx, op(x.index_select(0, idx), *args))


#: On a CPU the batch is finished in chunks of about this many values (a few
#: hundred kB: the chunk stays in cache through the ~100 passes of its ops).
CPU_CHUNK_VALUES = 1 << 18


def apply_photometric(images: torch.Tensor, params: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The photometric part of :func:`common.views.augment.render`, batched: jitter
    (recorded factors and order), grayscale, blur (recorded sigma), solarise.
    ``images`` [n, 3, H, W] uint8 (any device), ``params`` [n, len(PARAM_NAMES)]
    on the CPU.  Returns float32 [n, 3, H, W] holding the uint8 levels.
    ``chunk``: at most this many samples at a time (None: all)."""
    if chunk is not None and len(images) > chunk:
        return torch.cat([apply_photometric(images[i: i + chunk], params[i: i + chunk])
                          for i in range(0, len(images), chunk)])
    x = images.to(torch.float32)
    p = params.detach().to("cpu", torch.float64)
    jitter = p[:, P["jitter"]] > 0
    factors = params.detach()[:, FACTOR_COLUMNS].to("cpu", torch.float32)  # selected on the host, then sent
    for k in range(4):  # round k: each jittered sample runs the operation it drew k-th
        for j, op in enumerate(JITTER_OPS):
            rows = torch.nonzero(jitter & (p[:, ORDER_COLUMNS[k]] == j)).flatten().tolist()
            if rows:
                _apply(x, rows, op, to_device(factors[rows, j], x.device))
    _apply(x, torch.nonzero(p[:, P["gray"]] > 0).flatten().tolist(), grayscale)
    blurred = torch.nonzero(p[:, P["blur_sigma"]] > 0).flatten().tolist()
    sigma32 = params.detach().to("cpu", torch.float32)[:, P["blur_sigma"]]
    _apply(x, blurred, gaussian_blur, [float(sigma32[i]) for i in blurred])
    _apply(x, torch.nonzero(p[:, P["solarize"]] > 0).flatten().tolist(), solarize)
    return x


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``to_tensor`` then ``normalize`` of levels 0..255, the float ops of
    torchvision's (so equal levels give equal floats); ``mean``/``std`` [n, 3]."""
    return x.div(255).sub_(mean[:, :, None, None]).div_(std[:, :, None, None])


class DevicePhotometric:
    """Finishes the loader's ``uint8`` candidates on the training device.

    ``recipes``: the recipe of every view the transform draws (for the mean
    and std).  Called with the batch as the loader gives it, moved to the
    device: ``candidates`` (V tensors [B, 3, S_v, S_v] uint8) and ``params``
    [B, V', len(PARAM_NAMES)] on the CPU.  ``V' = 2V`` with static colour
    (``hvs.static_color``): the rows of the shared-colour candidates, then
    those of their own-colour renderings of the same crops.  Returns
    ``(views, params)`` as the loader path gives them: V finished views (2V
    with static colour: the candidates, then the renderings) and the first V
    rows.  Views of the same size are finished together in one batch."""

    def __init__(self, recipes):
        self.recipes = list(recipes)

    def __call__(self, candidates, params: torch.Tensor):
        V = len(candidates)
        if V != len(self.recipes) or params.shape[1] not in (V, 2 * V):
            raise ValueError(f"device photometric: {V} candidates and {params.shape[1]} parameter rows for "
                             f"a transform of {len(self.recipes)} views")
        views = self.finish(candidates, params[:, :V])
        if params.shape[1] == 2 * V:
            views += self.finish(candidates, params[:, V:])
        return views, params[:, :V]

    def finish(self, candidates, params: torch.Tensor) -> list:
        B, out, v = params.shape[0], [], 0
        while v < len(candidates):  # consecutive views of one size: one batch
            w = v
            while w < len(candidates) and candidates[w].shape == candidates[v].shape:
                w += 1
            images = torch.cat(candidates[v:w])
            rows = params[:, v:w].transpose(0, 1).reshape(-1, params.shape[-1])  # view-major, as the cat
            chunk = None if images.device.type != "cpu" else max(1, CPU_CHUNK_VALUES // images[0].numel())
            levels = apply_photometric(images, rows, chunk)
            mean = to_device([self.recipes[u].mean for u in range(v, w) for _ in range(B)], images.device,
                             torch.float32)
            std = to_device([self.recipes[u].std for u in range(v, w) for _ in range(B)], images.device,
                            torch.float32)
            out.extend(normalize(levels, mean, std).split(B))
            v = w
        return out


class DeviceViews(DevicePhotometric):
    """:class:`DevicePhotometric` for ``augment.device=model_crop``: called
    with the decoded images of the batch (a :class:`common.views.augment.DecodedBatch`,
    or a list of uint8 [3, H, W]) in place of the candidates; crops, resizes
    and flips every candidate from its row (:func:`common.views.resample.crop_resize_flip`,
    consecutive views of one size and filter together), then finishes them as
    :class:`DevicePhotometric`."""

    def __call__(self, images, params: torch.Tensor):
        V = len(self.recipes)
        packed = hasattr(images, "pixels")  # a DecodedBatch: cropped without a kernel per image
        if isinstance(images, torch.Tensor) or len(images) != params.shape[0] or params.shape[1] not in (V, 2 * V) \
                or (not packed and any(image.dim() != 3 for image in images)):
            raise ValueError(f"device views: expected the {params.shape[0]} decoded images [3, H, W] of the batch "
                             f"and {V} or {2 * V} parameter rows per image, got {type(images).__name__} and "
                             f"{tuple(params.shape)}")
        candidates, v = [], 0
        while v < V:
            r, w = self.recipes[v], v
            while w < V and (self.recipes[w].size, self.recipes[w].interpolation) == (r.size, r.interpolation):
                w += 1
            candidates.extend(crop_resize_flip(images, params[:, v:w], r.size, r.interpolation).unbind(1))
            v = w
        return super().__call__(candidates, params)
