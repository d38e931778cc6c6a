"""Multi-view augmentation: recorded parameters describe what was done."""
import random

import numpy as np
import pytest
import torch
from PIL import Image

from common.augment import (P, PARAM_NAMES, MultiViewDataset, MultiViewTransform, ViewRecipe, box_iou,
                            draw_view, sample_crop)


def image(w=40, h=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_crop_boxes_lie_inside_the_image_and_follow_the_scale():
    rng = random.Random(0)
    for _ in range(500):
        x, y, w, h = sample_crop(rng, 40, 30, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x and 0 <= y and x + w <= 40 and y + h <= 30
        assert w * h >= 0.2 * 1200 * 0.8  # rounding and the ratio fallback aside


def test_recorded_crop_and_flip_reproduce_the_view():
    img = image()
    recipe = ViewRecipe(size=16, jitter_p=0, gray_p=0, blur_p=0, flip_p=0.5,
                        mean=(0, 0, 0), std=(1, 1, 1))
    rng = random.Random(3)
    for _ in range(10):
        view, row = draw_view(img, recipe, rng)
        x, y, w, h = (row[P[k]] for k in ("crop_x", "crop_y", "crop_w", "crop_h"))
        ref = img.resize((16, 16), Image.BILINEAR, box=(x, y, x + w, y + h))
        if row[P["flip"]]:
            ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
        assert torch.allclose(view, torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255, atol=1e-6)
        assert (row[P["img_w"]], row[P["img_h"]]) == (40, 30)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_blur_is_applied_with_probability_p(p):
    recipe = ViewRecipe(size=8, blur_p=p)
    rng, img = random.Random(1), image()
    sigmas = [draw_view(img, recipe, rng)[1][P["blur_sigma"]] for _ in range(400)]
    blurred = np.mean([s > 0 for s in sigmas])
    assert abs(blurred - p) < 0.08  # applied with p, not 1 - p
    assert all(s == 0 or 0.1 <= s <= 2.0 for s in sigmas)


def test_jitter_factors_and_order_are_recorded():
    recipe = ViewRecipe(size=8, jitter_p=1.0)
    row = draw_view(image(), recipe, random.Random(2))[1]
    assert row[P["jitter"]] == 1
    assert sorted(row[P[f"order{k}"]] for k in range(4)) == [0, 1, 2, 3]
    assert 0.6 <= row[P["brightness"]] <= 1.4 and -0.1 <= row[P["hue"]] <= 0.1
    off = draw_view(image(), ViewRecipe(size=8, jitter_p=0.0), random.Random(2))[1]
    assert off[P["jitter"]] == 0 and [off[P[f"order{k}"]] for k in range(4)] == [-1] * 4
    gray = draw_view(image(), ViewRecipe(size=8, gray_p=1.0, jitter_p=0, mean=(0, 0, 0), std=(1, 1, 1)),
                     random.Random(0))
    assert gray[1][P["gray"]] == 1 and torch.equal(gray[0][0], gray[0][1])


def test_multiview_dataset_is_deterministic_per_seed_epoch_index():
    base = [(image(seed=i), i % 2) for i in range(4)]
    ds = MultiViewDataset(base, MultiViewTransform([(ViewRecipe(size=8), 4)]), seed=5)
    views, params, label, index = ds[2]
    assert len(views) == 4 and views[0].shape == (3, 8, 8) and params.shape == (4, len(PARAM_NAMES))
    assert (label, index) == (0, 2)
    again = ds[2]
    assert all(torch.equal(a, b) for a, b in zip(views, again[0]))
    assert not torch.equal(views[0], views[1])  # the candidates differ
    ds.set_epoch(1)
    assert not torch.equal(ds[2][1], params)  # a new epoch draws new views


def test_box_iou():
    def row(x, y, w, h):
        r = torch.zeros(len(PARAM_NAMES))
        r[P["crop_x"]], r[P["crop_y"]], r[P["crop_w"]], r[P["crop_h"]] = x, y, w, h
        return r

    assert box_iou(row(0, 0, 10, 10), row(0, 0, 10, 10)).item() == 1.0
    assert box_iou(row(0, 0, 10, 10), row(5, 0, 10, 10)).item() == pytest.approx(50 / 150)
    assert box_iou(row(0, 0, 10, 10), row(20, 20, 5, 5)).item() == 0.0


def test_bad_recipe_values_are_refused():
    with pytest.raises(ValueError, match="blur_p"):
        ViewRecipe(blur_p=1.5)
    with pytest.raises(ValueError, match="scale"):
        ViewRecipe(scale=(0.0, 1.0))
