"""Throughput of the multi-view loader (issue 15, item 4): views per second of
our loader (``common.augment.MultiViewDataset``: N candidates per image,
parameters recorded) for N = 2, 4, 8 at several sizes, beside a plain
torchvision pipeline of the same recipe (random resized crop, flip, colour
jitter, grayscale, blur: the authors' kind of loader) drawing the same number
of views, in the same process, alternating.

    python -m bench.loader --data-dir ../shared/data --sizes 32 64 224 --views 2 4 8 --images 256

Reported per (size, N): images and views per second of both, and the cost per
image relative to N = 2 (the goal at 224 px with N = 4: at most x1.35).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from common.augment import IMAGENET_MEAN, IMAGENET_STD, MultiViewDataset, MultiViewTransform, ViewRecipe
from common.checkpoint import write_json_atomic
from common.data import DataError, build_dataset


class PILBlur:
    """Gaussian blur of a PIL image with sigma uniform in 0.1-2 (MoCo v2's, which SimSiam's code uses)."""

    def __call__(self, image):
        from PIL import ImageFilter

        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class TorchvisionViews(Dataset):
    """N views of each image through a torchvision ``Compose`` of the recipe
    (SimSiam's: crop scale 0.2-1, flip, jitter 0.4/0.4/0.4/0.1 p 0.8, gray 0.2, PIL blur p 0.5)."""

    def __init__(self, base, size: int, n: int):
        from torchvision import transforms as T

        self.base, self.n = base, n
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=(0.2, 1.0)), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
            T.RandomApply([PILBlur()], p=0.5),
            T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self):
        return len(self.base)

    def __getitem__(self, index):
        image, label = self.base[index]
        image = image.convert("RGB")
        return [self.transform(image) for _ in range(self.n)], label


def ours(base, size: int, n: int) -> Dataset:
    return MultiViewDataset(base, MultiViewTransform([(ViewRecipe(size=size), n)]), seed=0)


def images_per_second(dataset, batch_size: int, workers: int) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False, drop_last=False)
    t0, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch[-1] if isinstance(batch[-1], torch.Tensor) else batch[1])
    return count / (time.perf_counter() - t0)


def benchmark(base, sizes, views, images: int, batch_size: int, workers: int, repeats: int) -> list:
    base = Subset(base, list(range(min(images, len(base)))))
    rows = []
    for size in sizes:
        for n in views:
            rates = {"ours": [], "torchvision": []}
            for r in range(repeats):
                order = ("ours", "torchvision") if r % 2 == 0 else ("torchvision", "ours")
                for name in order:
                    ds = ours(base, size, n) if name == "ours" else TorchvisionViews(base, size, n)
                    rates[name].append(images_per_second(ds, batch_size, workers))
            row = {"size": size, "n_views": n}
            for name, values in rates.items():
                ips = statistics.median(values)
                row[name] = {"images_per_s": ips, "views_per_s": ips * n}
            rows.append(row)
    for row in rows:  # cost per image relative to N = 2 of the same size and loader
        ref = next((r for r in rows if r["size"] == row["size"] and r["n_views"] == 2), None)
        for name in ("ours", "torchvision"):
            row[name]["cost_vs_n2"] = ref[name]["images_per_s"] / row[name]["images_per_s"] if ref else None
    return rows


def main(argv=None) -> list:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="data root (default: HVS_DATA_DIR)")
    p.add_argument("--dataset", default="tiny-imagenet-100", help="training set to read (default tiny-imagenet-100)")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 224], help="view sizes in pixels")
    p.add_argument("--views", type=int, nargs="+", default=[2, 4, 8], help="views per image (N)")
    p.add_argument("--images", type=int, default=256, help="images read per measurement (default 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--repeats", type=int, default=2, help="alternating measurements per row; the median (default 2)")
    p.add_argument("--output", type=Path, default=None, help="also write the rows as JSON")
    args = p.parse_args(argv)
    random.seed(0)
    torch.manual_seed(0)
    try:
        base = build_dataset(args.dataset, "train", args.data_dir, download=False)
    except DataError as err:
        print(f"python -m bench.loader: error: {err}", file=sys.stderr)
        sys.exit(2)
    rows = benchmark(base, args.sizes, args.views, args.images, args.batch_size, args.workers, args.repeats)
    print(f"{args.dataset}, {args.images} images, batch {args.batch_size}, {args.workers} workers, "
          f"median of {args.repeats}")
    print("size | N | ours img/s | ours views/s | ours cost vs N=2 | torchvision img/s | views/s | cost vs N=2")
    for r in rows:
        o, t = r["ours"], r["torchvision"]
        print(f"{r['size']:4d} | {r['n_views']} | {o['images_per_s']:10.1f} | {o['views_per_s']:12.1f} | "
              f"x{o['cost_vs_n2']:.2f} | {t['images_per_s']:17.1f} | {t['views_per_s']:7.1f} | x{t['cost_vs_n2']:.2f}")
    if args.output:
        write_json_atomic(args.output, rows)
    return rows


if __name__ == "__main__":
    main()
