"""augment.device=model: the loader's workers crop, flip and resize to uint8 and
record every photometric parameter as before; common/views/photometric.py finishes
the views on the training device from those rows.  augment.device=model_crop:
the workers only decode and draw; common/views/resample.py crops, resizes and flips
on the device too.  Replayed against PIL (the loader path,
common.views.augment.render) operation by operation and view by view: the pixels
are equal (0 levels apart), and the normalised tensors too."""
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import functional as TF

from common.views import photometric as ph
from common.views import resample
from common.views.augment import (P, PARAM_NAMES, IoUPolicy, MultiViewDataset, MultiViewTransform, ViewRecipe, collate,
                            draw_colour, draw_finish, draw_geometry, record, sample_crop, to_uint8)
from common.engine.config import ConfigError
from common.views.multicrop import multicrop_transform
from common.views.pipeline import ViewPipeline
from tests.helpers import dino_cfg, read_log, tiny_cfg


def make_images(n=6, seed=0):
    """Images that reach every branch: smooth colour ramps, noise, saturated
    and grey patches, pure black/white, odd sizes."""
    g = np.random.default_rng(seed)
    out = []
    for k in range(n):
        h, w = int(g.integers(9, 41)), int(g.integers(9, 41))
        yy, xx = np.mgrid[0:h, 0:w]
        ramp = np.stack([xx * 255 / max(1, w - 1), yy * 255 / max(1, h - 1), (xx + yy) * 127 / (h + w)], -1)
        img = ramp + g.normal(0, 30 * (k % 3), (h, w, 3))
        img[: h // 3, : w // 3] = g.integers(0, 256)  # a grey patch (r = g = b)
        img[-2:, -3:] = [255, 0, 0] if k % 2 else [0, 0, 0]
        img[:2, -2:] = 255
        out.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
    return out


def levels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()


def factors(lo, hi, n, seed):
    """Drawn as the loader draws them (float64, what PIL gets); the device ops
    get them as float32, as the params rows hold them."""
    r = random.Random(seed)
    return [r.uniform(lo, hi) for _ in range(n)]


OPS = {  # name: (PIL of the loader path, device op of one factor, factors to replay)
    "brightness": (TF.adjust_brightness, lambda x, f: ph.adjust_brightness(x, torch.tensor([f])),
                   factors(0.0, 2.0, 12, 1) + [1.0, 0.0]),
    "contrast": (TF.adjust_contrast, lambda x, f: ph.adjust_contrast(x, torch.tensor([f])),
                 factors(0.0, 2.0, 12, 2) + [1.0]),
    "saturation": (TF.adjust_saturation, lambda x, f: ph.adjust_saturation(x, torch.tensor([f])),
                   factors(0.0, 2.0, 12, 3) + [1.0]),
    "hue": (TF.adjust_hue, lambda x, f: ph.adjust_hue(x, torch.tensor([f])), factors(-0.5, 0.5, 12, 4) + [0.0, -0.5]),
    "grayscale": (lambda im, f: im.convert("L").convert("RGB"), lambda x, f: ph.grayscale(x), [None]),
    "solarize": (lambda im, f: TF.solarize(im, 128), lambda x, f: ph.solarize(x), [None]),
    "blur": (lambda im, f: im.filter(ImageFilter.GaussianBlur(radius=f)), lambda x, f: ph.gaussian_blur(x, [f]),
             factors(0.1, 2.0, 10, 5) + [0.1, 2.0, 4.5, 11.0]),  # and radii wider than the smallest images
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_each_operation_replays_pil_exactly(name):
    pil_op, device_op, values = OPS[name]
    for image in make_images():
        for f in values:
            expected, got = levels(pil_op(image, f)), device_op(levels(image), f)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            assert torch.equal(got, expected), (name, image.size, f, (got - expected).abs().max().item())


def test_hue_replays_pil_on_a_cube_of_colours():
    """Every 5th level of R, G, B (52^3 colours, all hue branches and greys) at a few shifts."""
    k = np.arange(0, 256, 5, dtype=np.uint8)
    cube = np.stack(np.meshgrid(k, k, k, indexing="ij"), -1).reshape(len(k) ** 2, len(k), 3)
    image = Image.fromarray(cube)
    for f in (0.1, -0.37, 0.5, 0.0123):
        assert torch.equal(ph.adjust_hue(levels(image), torch.tensor([f])), levels(TF.adjust_hue(image, f)))


def test_blur_radius_and_weights_of_the_extended_box():
    """r(sigma) = l + a makes three passes of the extended box (weights 1 on
    |k| <= l, a on |k| = l + 1, over 2r + 1) a filter of variance sigma^2: one
    pass has variance ((2l+1) l (l+1) / 3 + 2a (l+1)^2) / (2r+1).  The
    fixed-point weights give the outer taps a times the inner weight and sum
    to 2^24 (less the odd unit of the halving)."""
    for sigma in (0.1, 0.5, 1.0, 1.7, 2.0, 5.0):
        r = ph.box_radius(sigma)
        l, a = int(r), r - int(r)
        var = ((2 * l + 1) * l * (l + 1) / 3 + 2 * a * (l + 1) ** 2) / (2 * r + 1)
        assert 3 * var == pytest.approx(sigma ** 2, rel=1e-4)
        whole, ww, fw = ph.box_weights(r)
        assert whole == l and 2 ** 24 - ((2 * whole + 1) * ww + 2 * fw) in (0, 1)
        assert fw / ww == pytest.approx(a, abs=1e-5)


def test_batched_rounds_follow_each_samples_recorded_order():
    """One batch, every sample with its own factors and jitter order, gray,
    blur, solarize: equal to PIL applying them one sample at a time."""
    rng = random.Random(0)
    recipe = ViewRecipe(size=24, solarize_p=0.4, jitter=(0.4, 0.4, 0.4, 0.1))
    transform = MultiViewTransform([(recipe, 8)], photometric="model")
    loader_path = MultiViewTransform([(recipe, 8)])
    for k, image in enumerate(make_images(4, seed=1)):
        seed = rng.randrange(1 << 30)
        views, rows = transform(image, random.Random(seed))
        expected, rows_loader = loader_path(image, random.Random(seed))
        assert torch.equal(rows, rows_loader)
        got = ph.apply_photometric(torch.stack(views), rows)
        mean, std = torch.tensor([recipe.mean] * 8), torch.tensor([recipe.std] * 8)
        assert torch.equal(ph.normalize(got, mean, std), torch.stack(expected))
        assert torch.equal(ph.apply_photometric(torch.stack(views), rows, chunk=3), got)  # the CPU's chunks


def batch(transform, images, seed=0):
    """The loader's collated batch of ``transform`` over ``images`` (sample k
    at training step k): (views, params)."""
    out = [transform(image, random.Random(seed + k), step=k) for k, image in enumerate(images)]
    views, params, _ = collate([(o[0], o[1], 0) for o in out])
    return views, params


def pil_views(images, boxes, flips, size, interpolation):
    resample_filter = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[interpolation]
    out = []
    for image, image_boxes, image_flips in zip(images, boxes, flips):
        for (x, y, w, h), flip in zip(image_boxes, image_flips):
            view = image.crop((x, y, x + w, y + h)).resize((size, size), resample_filter)
            out.append(levels(view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view)[0])
    return torch.stack(out)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [5, 16, 37])
def test_crop_resize_flip_replays_pil_exactly(interpolation, size):
    """Crops of every kind (shrunk, enlarged, one side kept, the whole image,
    tall and wide: both orders of PIL's passes), flipped or not, from images
    of different sizes zero-padded into one batch: PIL's pixels exactly."""
    g = np.random.default_rng(size)
    images = [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 23), (14, 70), (41, 41))]
    rng = random.Random(size)
    boxes, flips = [], []
    for image in images:
        W, H = image.size
        own = [sample_crop(rng, W, H, (0.05, 1.0), (0.3, 3.0)) for _ in range(5)]
        own += [(0, 0, W, H), (W - min(W, size), 0, min(W, size), H), (1, H - min(H, size), W - 1, min(H, size))]
        boxes.append(own)
        flips.append([rng.random() < 0.5 for _ in own])
    params = torch.zeros(len(images), len(boxes[0]), len(PARAM_NAMES))
    for b, (image_boxes, image_flips) in enumerate(zip(boxes, flips)):
        for v, ((x, y, w, h), flip) in enumerate(zip(image_boxes, image_flips)):
            params[b, v, [P["crop_x"], P["crop_y"], P["crop_w"], P["crop_h"], P["flip"]]] = torch.tensor(
                [x, y, w, h, float(flip)])
    first = resample.vertical_first(params[..., P["crop_w"]].numpy(), params[..., P["crop_h"]].numpy(), size)
    assert not resample.pillow_vertical_first() or (first.any() and not first.all())  # both orders are replayed
    packed, _ = collate([(to_uint8(im), 0) for im in images])
    assert [tuple(i.shape) for i in packed.images()] == [(3, im.size[1], im.size[0]) for im in images]
    expected = pil_views(images, boxes, flips, size, interpolation)
    got = resample.crop_resize_flip(packed.images(), params, size, interpolation)
    assert torch.equal(got.flatten(0, 1), expected)
    # one image per group (the smallest budget), and all three in one zero-padded group: the same pixels
    assert torch.equal(resample.crop_resize_flip(packed.images(), params, size, interpolation, max_values=1), got)
    padded = torch.zeros(3, 3, 90, 70, dtype=torch.uint8)
    for k, image in enumerate(packed.images()):
        padded[k, :, : image.shape[1], : image.shape[2]] = image
    assert torch.equal(resample.crop_resize_flip(padded, params, size, interpolation), got)
    # the packed batch itself (the training path): padded by one gather, the same pixels
    assert torch.equal(resample.crop_resize_flip(packed, params, size, interpolation), got)
    assert torch.equal(resample.crop_resize_flip(packed, params, size, interpolation, max_values=1), got)


def test_model_crop_kernels_do_not_grow_with_the_batch():
    """Crop, resize and flip of a packed batch launch as many kernels for 12
    images as for 3 (of the same sizes, in one group): none per image."""
    from bench.loader import kernel_launches

    g = np.random.default_rng(0)
    shapes = [(40, 30), (30, 40), (36, 36)]

    def launches(copies):
        images = [to_uint8(Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)))
                  for _ in range(copies) for h, w in shapes]
        packed, _ = collate([(image, 0) for image in images])
        params = torch.zeros(len(images), 2, len(PARAM_NAMES))
        params[..., P["crop_w"]], params[..., P["crop_h"]], params[..., P["flip"]] = 20.0, 20.0, 1.0
        params[:, 1, P["flip"]] = 0.0
        return kernel_launches(lambda: resample.crop_resize_flip(packed, params, 8, "bicubic"))

    assert launches(4) == launches(1)


def test_crop_outside_its_image_is_an_error():
    params = torch.zeros(2, 1, len(PARAM_NAMES))
    params[:, 0, [P["crop_x"], P["crop_w"], P["crop_h"]]] = torch.tensor([4.0, 8.0, 8.0])
    images = [torch.zeros(3, 20, 20, dtype=torch.uint8), torch.zeros(3, 10, 10, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="outside image 1 of the batch \\(10x10\\)"):
        resample.crop_resize_flip(images, params, 4, "bilinear")


@pytest.mark.parametrize("where", ["model", "model_crop"])
@pytest.mark.parametrize("kind", ["pair", "pair_static_colour", "pair_iou_policy", "multicrop"])
def test_device_path_gives_the_loader_paths_views_and_rows(kind, where, tmp_path):
    """The whole step: same images and seeds through both paths; the device
    path's normalised views (and the static-colour renderings) and param rows
    (with the IoU policy's redrawn crops) are equal to the loader path's, bit for bit."""
    def make():
        if kind == "multicrop":  # DINO's three recipes, 2 + 2 global candidates, 4 local candidates, two sizes
            return multicrop_transform(dino_cfg(tmp_path, tmp_path, "hvs.enabled=true", "augment.local_size=12"), True)
        recipe = ViewRecipe(size=20, solarize_p=0.3, interpolation="bicubic")
        policy = IoUPolicy(0.2, 0.5, total_steps=5) if kind == "pair_iou_policy" else None
        return MultiViewTransform([(recipe, 4)], static_color=kind == "pair_static_colour", policy=policy)

    loader, pipeline = make(), ViewPipeline.rendering(make(), where)
    device, step = pipeline.transform, pipeline.device_step
    assert device.photometric == where
    images = make_images(5, seed=2)
    views, params = batch(loader, images)
    raw, rows = batch(device, images)
    if where == "model":
        assert all(v.dtype == torch.uint8 for v in raw) and len(raw) == params.shape[1]
    else:  # the decoded images, packed
        assert all(torch.equal(a, levels(b)[0].to(torch.uint8)) for a, b in zip(raw.images(), images))
    assert rows.shape[1] == (2 if kind == "pair_static_colour" else 1) * params.shape[1]
    finished, kept = step(raw, rows)
    assert torch.equal(kept, params)
    assert len(finished) == len(views) and all(torch.equal(a, b) for a, b in zip(finished, views))
    if kind == "pair_iou_policy":
        assert (params[:, :2, P["draws"]] > 0).all()  # the policy drew the first two crops


def test_workers_only_crop_flip_and_resize():
    """The uint8 views of the model path are the geometric views (crop,
    resize, flip) of the loader path's draws, and the rows record the colour
    and finish drawn after each, in the same sequence."""
    recipe = ViewRecipe(size=16, solarize_p=0.5)
    image = make_images(1)[0]
    views, rows = MultiViewTransform([(recipe, 3)], photometric="model")(image, random.Random(3))
    rng = random.Random(3)
    for view, row in zip(views, rows):
        geometric, expected = draw_geometry(image, recipe, rng)
        record(expected, draw_colour(recipe, rng), draw_finish(recipe, rng))
        assert torch.equal(view, levels(geometric)[0].to(torch.uint8))
        assert torch.equal(row, torch.tensor(expected, dtype=torch.float32))


class CountingImages(torch.utils.data.Dataset):
    """A base dataset that counts how often each image is read (decoded)."""

    def __init__(self, images):
        self.images, self.reads = images, [0] * len(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        self.reads[index] += 1
        return self.images[index].copy(), 0


@pytest.mark.parametrize("photometric", ["loader", "model", "model_crop"])
def test_every_candidate_comes_from_one_decode_of_the_image(photometric, tmp_path):
    """MultiViewDataset reads each image once per sample, whatever the number
    of candidates; every candidate is cropped from that one decoded image."""
    images = make_images(3)
    for transform in (MultiViewTransform([(ViewRecipe(size=8), 8)], photometric=photometric),
                      multicrop_transform(dino_cfg(tmp_path, tmp_path, "hvs.enabled=true"), True)):
        transform = ViewPipeline.rendering(transform, photometric).transform
        base = CountingImages(images)
        dataset = MultiViewDataset(base, transform)
        for i in range(len(dataset)):
            views, params, _, _ = dataset[i]
            if photometric == "model_crop":  # the image itself, once, as the workers decoded it
                assert torch.equal(views, levels(images[i])[0].to(torch.uint8)) and params.shape[0] > 2
            else:
                assert len(views) == params.shape[0] > 2
        assert base.reads == [1] * len(images)


def test_device_option_is_in_every_method_and_checked(tmp_path):
    from common.engine.registry import get_method

    for name in ("simsiam", "simclr", "dino", "ibot", "dino_stn"):
        spec = get_method(name).spec
        assert spec["augment.device"]["default"] == "loader"
        assert spec["augment.device"]["choices"] == ["loader", "model", "model_crop"]
    from simsiam.method import SimSiamMethod

    with pytest.raises(ConfigError, match="augment.device"):
        tiny_cfg(SimSiamMethod, tmp_path, tmp_path, "augment.device=gpu")
    cfg = tiny_cfg(SimSiamMethod, tmp_path, tmp_path, "augment.device=model")
    method = SimSiamMethod(cfg, torch.device("cpu"))
    for where, step_type in (("model", ph.DevicePhotometric), ("loader", type(None)), ("model_crop", ph.DeviceViews)):
        pipeline = ViewPipeline.from_cfg({**cfg, "augment": {**cfg["augment"], "device": where}}, method)
        assert type(pipeline.device_step) is step_type and pipeline.transform.photometric == where
        assert pipeline.transform.slots == method.view_transform(False).slots
    step = pipeline.device_step
    with pytest.raises(ValueError, match="decoded images"):  # the views of model, not the images of model_crop
        step([torch.zeros(2, 3, 8, 8, dtype=torch.uint8)] * 2, torch.zeros(2, 2, len(PARAM_NAMES)))


# ----------------------------------------------------------------------------
# training runs: the device path trains on the same pixels, logs the same rows
# ----------------------------------------------------------------------------
def selection_arrays(out):
    files = sorted((out / "selection").glob("*.npz"))
    assert files
    arrays = [np.load(f) for f in files]
    return {k: np.concatenate([a[k] for a in arrays]) for k in ("params", "index", "choice", "scores")}


def assert_same_run(a, b):
    la, lb = read_log(a), read_log(b)
    assert [(r["step"], r["loss"]) for r in la] == [(r["step"], r["loss"]) for r in lb]
    sa, sb = selection_arrays(a), selection_arrays(b)
    for key in ("params", "index", "choice"):
        assert np.array_equal(sa[key], sb[key]), key
    assert np.array_equal(sa["scores"], sb["scores"], equal_nan=True)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["hvs.static_color=true"]])
def test_pair_method_trains_identically_with_the_device_path(tmp_path, image_root, extra):
    """SimSiam with HVS, 2 steps of 4 images: the same recorded params,
    choices, scores and losses with augment.device=model and model_crop as with loader (the
    pixels are equal, so the whole run is)."""
    from common.engine.train import run
    from simsiam.method import SimSiamMethod

    args = ["hvs.enabled=true", "train.epochs=1", "run.max_steps_per_epoch=2", "train.batch_size=4", "augment.blur_p=0.7",
            *extra]
    for device in ("loader", "model", "model_crop"):
        run(tiny_cfg(SimSiamMethod, tmp_path / device, image_root, *args, f"augment.device={device}"), SimSiamMethod)
    assert_same_run(tmp_path / "loader", tmp_path / "model")
    assert_same_run(tmp_path / "loader", tmp_path / "model_crop")


@pytest.mark.slow
def test_dino_trains_identically_with_the_device_path(tmp_path, image_root):
    """DINO with HVS (two crop sizes, solarisation on global crop 2), with a
    loader worker: same rows, choices, scores and losses on both paths."""
    from common.engine.train import run
    from dino.method import DINOMethod

    args = ["hvs.enabled=true", "train.epochs=1", "run.max_steps_per_epoch=2", "data.num_workers=1",
            "augment.solarize_p=[0.0,0.5,0.0]"]
    for device in ("loader", "model", "model_crop"):
        run(dino_cfg(tmp_path / device, image_root, *args, f"augment.device={device}"), DINOMethod)
    assert_same_run(tmp_path / "loader", tmp_path / "model")
    assert_same_run(tmp_path / "loader", tmp_path / "model_crop")
