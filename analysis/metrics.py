"""Metrics of a pair of views, computed from their logged parameter rows.

Every function takes parameter rows ``a`` and ``b`` (columns in the order of
:data:`common.views.augment.PARAM_NAMES`, as :func:`analysis.logs.load_selection`
returns them) and works over any leading dimensions.  The crop box ``(crop_x,
crop_y, crop_w, crop_h)`` is in pixels of the original image, before the
resize; the horizontal flip is applied after cropping, so it does not move the
box (a flipped view has the same box).  Colour-jitter factors are neutral
(brightness, contrast, saturation = 1, hue = 0) when jitter was not applied,
``blur_sigma`` is 0 without blur.

The metrics (:data:`PAIR_METRICS`; the first four are the paper's, Section 5.1
and Appendix D):
"""
from __future__ import annotations

import numpy as np
import torch

from common.views.augment import P, box_iou

#: name -> what it measures, in the order the analyses list them.
PAIR_METRICS = {
    "iou": "intersection over union of the two crop boxes (original pixels; 1 = same box)",
    "centre_distance": "distance between the two crop centres divided by the image diagonal "
                       "sqrt(img_w^2 + img_h^2) (0 = same centre, < 1 always)",
    "colour_distance": "Euclidean distance between the (brightness, contrast, saturation, hue) "
                       "jitter vectors of the two views",
    "brightness": "|difference| of the brightness factors",
    "contrast": "|difference| of the contrast factors",
    "saturation": "|difference| of the saturation factors",
    "hue": "|difference| of the hue shifts",
    "gray": "1 when exactly one view is grayscale, else 0",
    "blur_sigma": "|difference| of the Gaussian blur sigmas (0 = not blurred)",
    "flip": "1 when exactly one view is flipped, else 0",
    "solarize": "1 when exactly one view is solarized, else 0",
    "area_ratio": "smaller crop area / larger crop area (1 = same size; small = one view zooms in on the other)",
}
__doc__ += "".join(f"\n- ``{k}``: {v}" for k, v in PAIR_METRICS.items()) + "\n"

JITTER = ("brightness", "contrast", "saturation", "hue")
#: The parameter columns the metrics read (a log without one of them cannot be analysed).
COLUMNS_USED = ("img_w", "img_h", "crop_x", "crop_y", "crop_w", "crop_h", *JITTER, "gray", "blur_sigma", "flip",
                "solarize")


def _col(x: np.ndarray, name: str) -> np.ndarray:
    return x[..., P[name]].astype(np.float64)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of the crop boxes (:func:`common.views.augment.box_iou`, on float64)."""
    return box_iou(torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))).numpy()


def centre_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance between the crop centres, as a fraction of the image diagonal."""
    dx = (_col(a, "crop_x") + _col(a, "crop_w") / 2) - (_col(b, "crop_x") + _col(b, "crop_w") / 2)
    dy = (_col(a, "crop_y") + _col(a, "crop_h") / 2) - (_col(b, "crop_y") + _col(b, "crop_h") / 2)
    return np.hypot(dx, dy) / np.hypot(_col(a, "img_w"), _col(a, "img_h"))


def colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance between the four colour-jitter parameters."""
    return np.sqrt(sum((_col(a, k) - _col(b, k)) ** 2 for k in JITTER))


def area_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Smaller crop area over larger crop area, in (0, 1]."""
    area_a, area_b = _col(a, "crop_w") * _col(a, "crop_h"), _col(b, "crop_w") * _col(b, "crop_h")
    return np.minimum(area_a, area_b) / np.maximum(area_a, area_b)


def pair_metrics(a: np.ndarray, b: np.ndarray, names=None) -> dict:
    """``{name: array}`` of the metrics ``names`` (default: all of
    :data:`PAIR_METRICS`) of the view pairs (a, b); arrays have a's and b's
    broadcast leading shape."""
    names = list(PAIR_METRICS) if names is None else list(names)
    unknown = [n for n in names if n not in PAIR_METRICS]
    if unknown:
        raise ValueError(f"unknown pair metrics {unknown}; known: {list(PAIR_METRICS)}")
    special = {"iou": iou, "centre_distance": centre_distance, "colour_distance": colour_distance,
               "area_ratio": area_ratio}
    return {n: special[n](a, b) if n in special else np.abs(_col(a, n) - _col(b, n)) for n in names}


def sample_pair_metrics(data, names=None) -> dict:
    """``{name: [M, K]}``: the metrics of the K distinct compared pairs of every
    sample of a :class:`analysis.logs.SelectionData` (``data.sample_pairs``),
    NaN where a sample's block has fewer than K pairs.  Computed pair slot by
    pair slot, so memory stays at the size of the result."""
    pairs, rows = data.sample_pairs, np.arange(data.n_samples)
    out = None
    for k in range(pairs.shape[1]):
        first, second = pairs[:, k, 0], pairs[:, k, 1]
        valid = first >= 0
        values = pair_metrics(data.params[rows, np.maximum(first, 0)], data.params[rows, np.maximum(second, 0)], names)
        if out is None:
            out = {n: np.full(pairs.shape[:2], np.nan) for n in values}
        for n, v in values.items():
            out[n][:, k] = np.where(valid, v, np.nan)
    return out
