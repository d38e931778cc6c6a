"""Multi-view augmentation with recorded parameters.

A *recipe* describes how one view is drawn (random resized crop, flip, colour
jitter, grayscale, blur, solarize).  A :class:`MultiViewTransform` draws a list
of views from one image: for every crop slot (e.g. SimSiam's one slot, DINO's
global and local slots) it draws ``n`` candidates.  Every view comes with a
row of parameters (see :data:`PARAM_NAMES`) so that the analyses of the paper
(IoU of selected views, fANOVA, predictability) can be run from the logs.

Where the photometric half of a view runs is ``augment.device``
(:func:`device_spec`): ``loader`` (default) renders every view in PIL here;
``model`` makes the workers stop after the crop, flip and resize (uint8
tensors) while drawing and recording the same parameters from the same random
sequence, and :mod:`common.views.photometric` finishes the views on the training
device from those rows, pixel for pixel as PIL would; ``model_crop`` makes the
workers only decode each image once and draw and record every parameter, and
the crop, resize and flip (:mod:`common.views.resample`) run on the device as well.

Randomness comes from an explicit :class:`random.Random` passed in, never from
the global generators: :class:`MultiViewDataset` seeds it from
``(seed, epoch, index)``, which makes the views of a sample independent of the
number of workers and processes, and makes resumed runs exact.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision.transforms import functional as TF

from common.engine.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Columns of the per-view parameter rows.  Crop boxes are in pixels of the
#: original image; colour-jitter factors are neutral (1, 1, 1, 0) and its order
#: is -1 when jitter was not applied; ``blur_sigma`` is 0 when not blurred;
#: ``draws`` counts the pairs the IoU policy drew (:class:`IoUPolicy`; 0 without).
PARAM_NAMES = (
    "img_w", "img_h", "crop_x", "crop_y", "crop_w", "crop_h", "flip",
    "jitter", "brightness", "contrast", "saturation", "hue",
    "order0", "order1", "order2", "order3", "gray", "blur_sigma", "solarize", "draws",
)
P = {name: i for i, name in enumerate(PARAM_NAMES)}
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
#: ``augment.device``: where the views are rendered (:func:`device_spec`).
DEVICE_CHOICES = ("loader", "model", "model_crop")


@dataclass
class ViewRecipe:
    """How one view is drawn.  Defaults are the SimSiam / MoCo-v2 recipe."""

    size: int = 224
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.5  # probability of *applying* blur
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0
    interpolation: str = "bilinear"  # of the crop resize: bilinear (torchvision's default) or bicubic (DINO)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augmentation {name}={p} must be a probability in [0, 1]")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"augmentation scale={self.scale} must satisfy 0 < min <= max <= 1")
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"augmentation interpolation={self.interpolation!r} is not one of {sorted(RESAMPLE)}")
        if self.size < 1:
            raise ValueError(f"augmentation size={self.size} must be positive")
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)
        self.jitter, self.blur_sigma = tuple(self.jitter), tuple(self.blur_sigma)


def sample_crop(rng: random.Random, width: int, height: int, scale, ratio):
    """Random-resized-crop box (x, y, w, h): area fraction uniform in ``scale``,
    log aspect ratio uniform in ``ratio``; ten tries, then a central crop with
    the ratio clamped (the Inception-style sampler torchvision also uses)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def device_spec() -> dict:
    """Config key ``augment.device``: where the photometric half of every view
    (jitter, grayscale, blur, solarisation) runs; every method has it."""
    from common.engine.config import setting

    return {"augment.device": setting(
        "loader", "where the views are rendered: loader (all in PIL, per view, in the loader workers), model "
        "(colour jitter, grayscale, blur and solarisation batched on the training device from the recorded "
        "parameters; the workers only crop, flip and resize, to uint8) or model_crop (the workers only decode "
        "each image once and draw the parameters; crop, resize and flip run on the training device too). All "
        "three give the same pixels", list(DEVICE_CHOICES))}


def augment_spec(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5, size=224) -> dict:
    """Config keys ``augment.*`` of a one-slot recipe, with a method's defaults."""
    from common.engine.config import setting

    return {
        **device_spec(),
        "augment.size": setting(size, "crop size in pixels", range="[1, inf)"),
        "augment.scale": setting(list(scale), "random-resized-crop area range", range="(0, 1]", length=2),
        "augment.jitter": setting(list(jitter), "colour jitter brightness, contrast, saturation, hue",
                                  range="[0, inf)", length=4),
        "augment.jitter_p": setting(0.8, "probability of colour jitter", range="[0, 1]"),
        "augment.gray_p": setting(0.2, "probability of grayscale", range="[0, 1]"),
        "augment.blur_p": setting(blur_p, "probability of applying Gaussian blur", range="[0, 1]"),
        "augment.blur_sigma": setting([0.1, 2.0], "blur sigma range", range="(0, inf)", length=2),
        "augment.flip_p": setting(0.5, "probability of a horizontal flip", range="[0, 1]"),
    }


def recipe_from_cfg(a: dict) -> ViewRecipe:
    """The :class:`ViewRecipe` of an ``augment`` config section (see :func:`augment_spec`)."""
    return ViewRecipe(size=a["size"], scale=a["scale"], flip_p=a["flip_p"], jitter=a["jitter"],
                      jitter_p=a["jitter_p"], gray_p=a["gray_p"], blur_p=a["blur_p"], blur_sigma=a["blur_sigma"])


def draw_box(size, recipe: ViewRecipe, rng: random.Random, box=None) -> list:
    """The geometry of one view of an image of ``size`` (W, H): a params row
    with the crop (``box`` = (x, y, w, h) in pixels, or a random-resized crop
    drawn here) and the flip."""
    row = [0.0] * len(PARAM_NAMES)
    W, H = size
    row[P["img_w"]], row[P["img_h"]] = W, H
    x, y, w, h = box if box is not None else sample_crop(rng, W, H, recipe.scale, recipe.ratio)
    row[P["crop_x"]], row[P["crop_y"]], row[P["crop_w"]], row[P["crop_h"]] = x, y, w, h
    row[P["flip"]] = int(rng.random() < recipe.flip_p)
    return row


def draw_geometry(img: Image.Image, recipe: ViewRecipe, rng: random.Random, box=None):
    """Crop (``box`` = (x, y, w, h) in pixels, or a random-resized crop drawn
    here), resize and maybe flip: (PIL view, params row with the geometry)."""
    row = draw_box(img.size, recipe, rng, box)
    x, y, w, h = (int(row[P[k]]) for k in ("crop_x", "crop_y", "crop_w", "crop_h"))
    # crop, then resize (torchvision's resized_crop): a box given to resize() would filter with pixels outside it
    out = img.crop((x, y, x + w, y + h)).resize((recipe.size, recipe.size), RESAMPLE[recipe.interpolation])
    if row[P["flip"]]:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out, row


def draw_colour(recipe: ViewRecipe, rng: random.Random):
    """The colour distortion of one view: ``(jitter, gray)``, ``jitter`` being
    ``(factors, order)`` (brightness, contrast, saturation, hue factors and the
    order the four operations run in) or None when not applied."""
    jitter = None
    if rng.random() < recipe.jitter_p:
        b, c, s, hue = recipe.jitter
        factors = [rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
                   rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-hue, hue)]
        order = list(range(4))
        rng.shuffle(order)
        jitter = (factors, order)
    return jitter, rng.random() < recipe.gray_p


def draw_finish(recipe: ViewRecipe, rng: random.Random):
    """Blur sigma (0: no blur) and solarisation flag of one view."""
    sigma = rng.uniform(*recipe.blur_sigma) if rng.random() < recipe.blur_p else 0.0
    return sigma, rng.random() < recipe.solarize_p


def record(row: list, colour, finish) -> None:
    """Write a drawn colour distortion and finish into ``row`` (in place): the
    jitter flag, factors and order, gray, blur sigma, solarisation."""
    jitter, gray = colour
    row[P["brightness"]], row[P["contrast"]], row[P["saturation"]], row[P["hue"]] = 1, 1, 1, 0
    for k in range(4):
        row[P[f"order{k}"]] = -1
    row[P["jitter"]] = 0
    if jitter is not None:
        factors, order = jitter
        for k, op_index in enumerate(order):
            row[P[f"order{k}"]] = op_index
        row[P["jitter"]] = 1
        row[P["brightness"]], row[P["contrast"]], row[P["saturation"]], row[P["hue"]] = factors
    row[P["gray"]] = int(gray)
    sigma, solarize = finish
    row[P["blur_sigma"]] = sigma
    row[P["solarize"]] = int(solarize)


def render(view: Image.Image, recipe: ViewRecipe, row: list, colour, finish) -> torch.Tensor:
    """Apply a drawn colour distortion and finish to a geometric view, record
    them in ``row`` (in place), return the normalised tensor [3, S, S]."""
    record(row, colour, finish)
    jitter, gray = colour
    if jitter is not None:
        factors, order = jitter
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op_index in order:
            view = ops[op_index](view, factors[op_index])
    if gray:
        view = view.convert("L").convert("RGB")
    sigma, solarize = finish
    if sigma:
        view = view.filter(ImageFilter.GaussianBlur(radius=sigma))
    if solarize:
        view = TF.solarize(view, 128)
    return TF.normalize(TF.to_tensor(view), recipe.mean, recipe.std)


def to_uint8(view: Image.Image) -> torch.Tensor:
    """A geometric view (``augment.device=model``) or the decoded image
    (``model_crop``) as it leaves the workers: uint8 [3, H, W]."""
    return torch.from_numpy(np.asarray(view, dtype=np.uint8).transpose(2, 0, 1).copy())


def draw_view(img: Image.Image, recipe: ViewRecipe, rng: random.Random, box=None):
    """Draw one augmented view (crop, flip, colour jitter, grayscale, blur,
    solarisation, in this order); return (normalised tensor [3,S,S], params row).
    ``box``: a crop box chosen beforehand (the IoU policy)."""
    view, row = draw_geometry(img, recipe, rng, box)
    tensor = render(view, recipe, row, draw_colour(recipe, rng), draw_finish(recipe, rng))
    return tensor, row


def pair_iou(a, b) -> float:
    """IoU of two crop boxes (x, y, w, h): :func:`box_iou` for one pair, in
    plain Python (the IoU policy calls it for every pair it draws)."""
    (ax, ay, aw, ah), (bx, by, bw, bh) = a, b
    inter = max(0, min(ax + aw, bx + bw) - max(ax, bx)) * max(0, min(ay + ah, by + bh) - max(ay, by))
    return inter / (aw * ah + bw * bh - inter)


class IoUPolicyError(ConfigError):
    """The IoU policy found no pair of views in its range within its draws."""


@dataclass(frozen=True)
class IoUPolicy:
    """The manual IoU policy of the paper's Section 5.2 (Table 5): the crops of
    the first two views (SimSiam's pair; DINO's two global crops) are drawn
    again, together, until their IoU is at most the threshold of the step, which
    goes linearly from ``start`` (first step) to ``end`` (last step): the paper
    fitted 0.30 -> 0.35 to the IoU HVS selects, and also ran 0.4 -> 0.6,
    0.1 -> 0.8 and the inverse schedule 1.0 -> 0.1.  With ``alternate`` the
    policy applies on even steps only and the standard augmentation on odd
    steps.  At most ``max_draws`` pairs are drawn per image; then
    :class:`IoUPolicyError`."""

    start: float = 0.3
    end: float = 0.35
    total_steps: int = 1
    alternate: bool = False
    max_draws: int = 1000

    def threshold(self, step: int) -> float:
        progress = min(1.0, step / max(1, self.total_steps - 1))
        return self.start + (self.end - self.start) * progress

    def active(self, step: int) -> bool:
        return not (self.alternate and step % 2 == 1)

    def draw_boxes(self, rng: random.Random, width: int, height: int, recipes, step: int):
        """Crop boxes of the first two views, and the number of pairs drawn."""
        limit = self.threshold(step)
        for draws in range(1, self.max_draws + 1):
            boxes = [sample_crop(rng, width, height, r.scale, r.ratio) for r in recipes]
            if pair_iou(*boxes) <= limit:
                return boxes, draws
        raise IoUPolicyError(
            f"IoU policy: no pair of crops (scales {recipes[0].scale} and {recipes[1].scale}) of a {width}x{height} "
            f"image with IoU <= {limit:.3f} (step {step}) in {self.max_draws} draws: the range cannot be reached; "
            "raise iou_policy.start/end or iou_policy.max_draws")


@dataclass(frozen=True)
class MultiViewTransform:
    """Draws ``n`` candidate views for every crop slot, in slot order.

    ``slots`` is a list of ``(recipe, n)``; SimSiam uses one slot with N
    candidates (N = 2 without HVS), DINO a global and a local slot.

    Options (the analyses of the paper's Section 5):

    - ``static_color`` (Fig. 4 right): one colour distortion (jitter and
      grayscale, drawn with the first slot's recipe) per image, shared by all
      candidates, which the selector scores; every candidate is also rendered
      with a colour distortion of its own, and those renderings are what the
      chosen views are trained on.  Returns ``2V`` views: the V shared-colour
      candidates, then the V own-colour renderings (same crops, flips, blur);
      the params rows are those of the shared-colour candidates.
    - ``policy``: an :class:`IoUPolicy` for the first two views; needs the step
      (``__call__(..., step=)``, see :class:`MultiViewDataset`).  Column
      ``draws`` of those two views records how many pairs were drawn (0 when
      the policy is off or skipped this step).
    - ``photometric``: ``"loader"`` (finish every view here, in PIL) or
      ``"model"`` (``augment.device=model``): return the geometric views as
      uint8 tensors [3, S, S], every photometric parameter still drawn from
      ``rng`` in the same sequence and recorded in the same rows; the training
      loop finishes them on its device (:class:`common.views.photometric.DevicePhotometric`).
      With static colour the V views come once and the rows twice ([2V, ...]):
      the shared-colour rows, then the own-colour rows of the renderings.
      ``"model_crop"``: as ``"model"``, but instead of the V views the decoded
      image itself, once (one uint8 tensor [3, H, W], not a list; :func:`collate`
      packs a batch of them), the crops and flips only drawn and recorded
      (:class:`common.views.photometric.DeviceViews` renders them).

    Frozen: the options are given when it is made; a run's transform, with
    its options from the config, is made by
    :meth:`common.views.pipeline.ViewPipeline.from_cfg`.
    """

    slots: Sequence = field(default_factory=lambda: [(ViewRecipe(), 2)])
    static_color: bool = False
    policy: IoUPolicy | None = None
    photometric: str = "loader"

    def recipes(self) -> list:
        """The recipe of every view, in order."""
        return [recipe for recipe, n in self.slots for _ in range(n)]

    def __call__(self, img: Image.Image, rng: random.Random, step: int | None = None):
        if img.mode != "RGB":
            img = img.convert("RGB")
        recipes = self.recipes()
        boxes, draws = {}, 0
        if self.policy is not None:
            if step is None:
                raise RuntimeError("the IoU policy needs the training step of every sample (EpochSampler.tag_steps)")
            if len(recipes) < 2:
                raise ValueError("the IoU policy needs at least two views per image")
            if self.policy.active(step):
                pair, draws = self.policy.draw_boxes(rng, *img.size, recipes[:2], step)
                boxes = dict(enumerate(pair))
        shared = draw_colour(recipes[0], rng) if self.static_color else None
        if self.photometric not in DEVICE_CHOICES:
            raise ValueError(f"photometric={self.photometric!r} must be one of {DEVICE_CHOICES}")
        on_device, crop_on_device = self.photometric != "loader", self.photometric == "model_crop"
        views, renders, rows, own_rows = [], [], [], []
        for k, recipe in enumerate(recipes):
            if crop_on_device:
                base, row = None, draw_box(img.size, recipe, rng, boxes.get(k))
            else:
                base, row = draw_geometry(img, recipe, rng, boxes.get(k))
            colour = draw_colour(recipe, rng)
            finish = draw_finish(recipe, rng)
            row[P["draws"]] = draws if k < 2 else 0
            if on_device:
                if shared is not None:
                    own_rows.append(list(row))
                    record(own_rows[-1], colour, finish)
                    colour = shared
                record(row, colour, finish)
                if base is not None:
                    views.append(to_uint8(base))
            else:
                if shared is not None:
                    renders.append(render(base.copy(), recipe, list(row), colour, finish))
                    colour = shared
                views.append(render(base, recipe, row, colour, finish))
            rows.append(row)
        params = torch.tensor(rows + own_rows, dtype=torch.float32)
        if crop_on_device:  # one copy of the decoded pixels, [3, H, W] as a view of them ([H, W, 3])
            return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1), params
        return views + renders, params


@dataclass
class DecodedBatch:
    """The decoded images of a batch (``augment.device=model_crop``), packed
    without padding: ``pixels`` uint8, image after image, each in [H, W, 3]
    order (as decoded); ``shapes`` [B, 2] their (H, W)."""

    pixels: torch.Tensor
    shapes: torch.Tensor

    def images(self) -> list:
        """The images as uint8 [3, H, W] views of ``pixels``."""
        sizes = (self.shapes[:, 0] * self.shapes[:, 1] * 3).tolist()
        return [flat.view(h, w, 3).permute(2, 0, 1)
                for flat, (h, w) in zip(self.pixels.split(sizes), self.shapes.tolist())]

    def to(self, device, non_blocking: bool = False) -> "DecodedBatch":
        return DecodedBatch(self.pixels.to(device, non_blocking=non_blocking), self.shapes)

    def pin_memory(self) -> "DecodedBatch":  # DataLoader(pin_memory=True) calls it
        return DecodedBatch(self.pixels.pin_memory(), self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def views_to(views, device):
    """A batch's views (a list of tensors, or a :class:`DecodedBatch`) on ``device``."""
    if isinstance(views, (list, tuple)):
        return [v.to(device, non_blocking=True) for v in views]
    return views.to(device, non_blocking=True)


def collate(batch):
    """The loader's ``collate_fn`` for :class:`MultiViewDataset`: PyTorch's
    default, except for decoded images (``augment.device=model_crop``, a
    [3, H, W] tensor in place of the list of views), which are packed into a
    :class:`DecodedBatch` (in a worker, straight into shared memory)."""
    from torch.utils.data import default_collate, get_worker_info

    if not isinstance(batch[0][0], torch.Tensor):
        return default_collate(batch)
    images, rest = [b[0] for b in batch], [b[1:] for b in batch]
    shapes = torch.tensor([tuple(image.shape[1:]) for image in images], dtype=torch.int64)
    pixels = torch.empty(sum(image.numel() for image in images), dtype=torch.uint8)
    if get_worker_info() is not None:
        pixels.share_memory_()
    torch.cat([image.permute(1, 2, 0).reshape(-1) for image in images], out=pixels)
    return (DecodedBatch(pixels, shapes), *default_collate(rest))


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic per-sample seed for (run seed, epoch, dataset index)."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2**63)


class EpochSeededDataset(Dataset):
    """Base of the datasets that draw random views of ``(PIL image, label)``
    samples with randomness seeded from (seed, epoch, index)
    (:func:`sample_seed`): the same views whatever the number of workers or
    ranks, and after a resume.  Call :meth:`set_epoch` before each epoch's
    loader is created."""

    def __init__(self, base: Dataset, transform, seed: int = 0):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)


class MultiViewDataset(EpochSeededDataset):
    """``(views, params [V, len(PARAM_NAMES)], label, index)`` drawn by a
    :class:`MultiViewTransform` from a :class:`random.Random` of the sample's seed.
    The key is an index, or ``(index, training step)`` where the transform
    depends on the step (an :class:`IoUPolicy`; see ``EpochSampler.tag_steps``),
    or ``(index, training step or None, epoch)`` (``EpochSampler.tag_epochs``:
    loader workers that persist across epochs)."""

    def __getitem__(self, key):
        index, step, epoch = (*key, self.epoch)[:3] if isinstance(key, tuple) else (key, None, self.epoch)
        img, label = self.base[index]
        rng = random.Random(sample_seed(self.seed, epoch, index))
        views, params = self.transform(img, rng, step=step)
        return views, params, label, index


class SeededDataset(EpochSeededDataset):
    """``(transform(image), label)`` for transforms that draw from the global
    generators (torchvision's, timm's: torch, ``random``, numpy): those are
    seeded with the sample's seed for the call and restored afterwards."""

    def __getitem__(self, index: int):
        import numpy as np

        image, label = self.base[index]
        seed = sample_seed(self.seed, self.epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            image = self.transform(image)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return image, label


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Deterministic evaluation transform: resize the shorter side (to
    size*256/224 for ImageNet-sized inputs, to ``size`` for small images), centre
    crop ``size``, normalise."""
    from torchvision import transforms as T

    resize = size if size < 96 else int(round(size * 256 / 224))
    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB") if im.mode != "RGB" else im),
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of crop boxes given as param rows (``crop_x, crop_y, crop_w, crop_h``
    columns), broadcasting over leading dimensions."""
    ax, ay, aw, ah = (a[..., P[k]] for k in ("crop_x", "crop_y", "crop_w", "crop_h"))
    bx, by, bw, bh = (b[..., P[k]] for k in ("crop_x", "crop_y", "crop_w", "crop_h"))
    iw = (torch.minimum(ax + aw, bx + bw) - torch.maximum(ax, bx)).clamp(min=0)
    ih = (torch.minimum(ay + ah, by + bh) - torch.maximum(ay, by)).clamp(min=0)
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)
