"""Multi-view augmentation: recorded parameters describe what was done."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from common.views.augment import (P, PARAM_NAMES, MultiViewDataset, MultiViewTransform, ViewRecipe, box_iou,
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


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_a_view_replays_through_torchvision_pixel_for_pixel(interpolation):
    """Every recorded parameter, replayed with torchvision's functional ops
    (crop, then resize; flip; jitter in the recorded order; grayscale; blur;
    solarize), gives the very same pixels."""
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(37, 53, 3, generator=g) * 255).byte().numpy())
    recipe = ViewRecipe(size=24, scale=(0.1, 0.6), blur_p=0.5, solarize_p=0.5, interpolation=interpolation,
                        mean=(0, 0, 0), std=(1, 1, 1))
    mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[interpolation]
    rng = random.Random(3)
    for _ in range(40):
        view, row = draw_view(img, recipe, rng)
        x, y, w, h = (int(row[P[k]]) for k in ("crop_x", "crop_y", "crop_w", "crop_h"))
        out = TF.resized_crop(img, y, x, h, w, [24, 24], interpolation=mode, antialias=True)
        if row[P["flip"]]:
            out = TF.hflip(out)
        ops = {0: TF.adjust_brightness, 1: TF.adjust_contrast, 2: TF.adjust_saturation, 3: TF.adjust_hue}
        factors = [row[P[k]] for k in ("brightness", "contrast", "saturation", "hue")]
        for k in range(4):
            op = int(row[P[f"order{k}"]])
            if op >= 0:
                out = ops[op](out, factors[op])
        if row[P["gray"]]:
            out = TF.rgb_to_grayscale(out, num_output_channels=3)
        if row[P["blur_sigma"]]:
            out = out.filter(ImageFilter.GaussianBlur(radius=row[P["blur_sigma"]]))
        if row[P["solarize"]]:
            out = TF.solarize(out, 128)
        assert torch.equal(view, TF.to_tensor(out))


def test_the_crop_uses_no_pixel_outside_its_box():
    img = Image.new("RGB", (40, 40), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 40, 10))  # black band above the crop box
    recipe = ViewRecipe(size=8, flip_p=0, jitter_p=0, gray_p=0, blur_p=0, mean=(0, 0, 0), std=(1, 1, 1))

    import common.views.augment as aug
    real = aug.sample_crop
    try:
        aug.sample_crop = lambda *a: (5, 10, 30, 30)  # starts right below the band
        view, _ = draw_view(img, recipe, random.Random(0))
    finally:
        aug.sample_crop = real
    assert torch.equal(view, torch.ones_like(view))  # not a grey pixel from the band


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
