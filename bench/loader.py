"""Throughput of the multi-view loader (issue 15, item 4): views per second of
our loader (``common.views.augment.MultiViewDataset``: N candidates per image,
parameters recorded) for N = 2, 4, 8 at several sizes, beside a plain
torchvision pipeline of the same recipe (random resized crop, flip, colour
jitter, grayscale, blur: the authors' kind of loader) drawing the same number
of views, in the same process, alternating.  Four loaders:

- ``ours``: ``augment.device=loader``, every view finished in PIL in the workers;
- ``ours_model``: ``augment.device=model``, the workers only crop, flip and
  resize to uint8 (the photometric parameters still drawn and recorded); the
  photometric step (:class:`common.views.photometric.DevicePhotometric`) is timed
  apart on one collated batch, on ``--device`` (the CPU by default: one
  thread, in this process), and added per image: ``ours_model_total``;
- ``ours_model_crop``: ``augment.device=model_crop``, the workers only decode
  each image once and draw the parameters; its device step (crop, resize,
  flip and the photometric part, :class:`common.views.photometric.DeviceViews`) is
  timed the same way: ``ours_model_crop_total``;
- ``torchvision``: the authors' kind of pipeline.

    python -m bench.loader --data-dir ../shared/data --sizes 32 64 224 --views 2 4 8 --images 256

Reported per (size, N) and loader: images and views per second (wall clock,
worker start included), and the cost per image in CPU milliseconds: the CPU
time of this process and of its loader workers (``getrusage``, read after the
workers are joined) less that of an empty loader of as many items (worker
start-up and batching), over the images read.  CPU time stays steady on a
machine whose cores are shared, where the wall clock does not.  ``cost_vs_n2``:
the CPU cost per image over that of N = 2 of the same size and loader (the
goal at 224 px with N = 4: at most x1.35); ``wall_cost_vs_n2`` the same from
the wall clock.

``--paper-dino`` measures instead the three training paths (``augment.device``
loader, model, model_crop) at the paper's DINO setting with HVS
(``configs/dino_paper.yaml``: 4 global candidates of 224 px and 16 local ones
of 96 px per image): images per second per CPU core of the loader workers
(from their CPU time), the bytes per image they send to the training process,
and for the device paths their step's cost per image on ``--device`` and the
number of kernels it launches for one batch, counted with the profiler on a
CPU (every leaf ``aten::`` operation that computes or copies, not views)::

    python -m bench.loader --paper-dino --data-dir ../shared/data --dataset imagenet --batch-size 64
"""
from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from common.views.augment import (IMAGENET_MEAN, IMAGENET_STD, MultiViewTransform, ViewRecipe, collate,
                            views_to)
from common.engine.checkpoint import write_json_atomic
from common.views.data import DataError, build_dataset
from common.views.pipeline import ViewPipeline

LOADERS = ("ours", "ours_model", "ours_model_crop", "torchvision")
#: the training paths (augment.device) compared by ``--paper-dino``
DEVICE_PATHS = ("loader", "model", "model_crop")
#: augment.device of our loaders; those on the device have a timed device step and a ``<name>_total``
OURS = {"ours": "loader", "ours_model": "model", "ours_model_crop": "model_crop"}
ON_DEVICE = ("ours_model", "ours_model_crop")


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


def ours_pipeline(size: int, n: int, where: str = "loader") -> ViewPipeline:
    """SimSiam's recipe, ``n`` views of ``size`` px, rendered as ``augment.device=where``."""
    return ViewPipeline.rendering(MultiViewTransform([(ViewRecipe(size=size), n)]), where)


def ours(base, size: int, n: int, photometric: str = "loader") -> Dataset:
    return ours_pipeline(size, n, photometric).dataset(base, seed=0)


def make_loader(name: str, base, size: int, n: int) -> Dataset:
    if name == "torchvision":
        return TorchvisionViews(base, size, n)
    return ours(base, size, n, OURS[name])


def cpu_seconds() -> float:
    """CPU seconds of this process and of its joined children (the loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_all(dataset, batch_size: int, workers: int):
    """(wall seconds, CPU seconds, images) of one pass of a loader over ``dataset``."""
    t0, c0, count = time.perf_counter(), cpu_seconds(), 0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False, drop_last=False,
                        collate_fn=collate)
    for batch in loader:
        count += len(batch[-1] if isinstance(batch[-1], torch.Tensor) else batch[1])
    del loader, batch  # the workers are joined once the pass ends
    return time.perf_counter() - t0, cpu_seconds() - c0, count


class EmptyItems(Dataset):
    """As many items as the measured loaders read, each an integer: the loader's own cost."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return index, index


def device_seconds_per_image(base, size: int, n: int, batch_size: int, repeats: int, device: str,
                             where: str = "model") -> float:
    """Seconds per image of the device-side step of ``augment.device=where``
    (``model``: the photometric part; ``model_crop``: crop, resize, flip and
    the photometric part) on ``device``: the median over ``repeats`` runs
    (after one warm-up) on one collated batch of that loader.  On the CPU: CPU
    seconds with one thread, as a loader worker has; on a GPU: wall seconds
    between synchronisations."""
    pipeline = ours_pipeline(size, n, where)
    dataset, step = pipeline.dataset(base, seed=0), pipeline.device_step
    views, params, _, _ = next(iter(DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)))
    views = views_to(views, device)
    on_cpu = device == "cpu"
    clock = time.process_time if on_cpu else time.perf_counter

    def timed() -> float:
        t0 = clock()
        step(views, params)
        if not on_cpu and device.startswith("cuda"):
            torch.cuda.synchronize()
        return clock() - t0

    threads = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(1)
    try:
        timed()
        return statistics.median(timed() for _ in range(max(3, repeats))) / len(params)
    finally:
        torch.set_num_threads(threads)


def benchmark(base, sizes, views, images: int, batch_size: int, workers: int, repeats: int,
              loaders=LOADERS, device: str = "cpu") -> list:
    base = Subset(base, list(range(min(images, len(base)))))
    empty = statistics.median(read_all(EmptyItems(len(base)), batch_size, workers)[1] for _ in range(3))
    rows = []
    for size in sizes:
        for n in views:
            runs = {name: [] for name in loaders}
            for r in range(repeats):  # alternating, so that a load on the machine hits all loaders alike
                order = loaders if r % 2 == 0 else loaders[::-1]
                for name in order:
                    runs[name].append(read_all(make_loader(name, base, size, n), batch_size, workers))
            row = {"size": size, "n_views": n}
            for name, measured in runs.items():
                ips = statistics.median(count / wall for wall, _, count in measured)
                cpu = statistics.median(max(0.0, cpu - empty) / count for _, cpu, count in measured)
                row[name] = {"images_per_s": ips, "views_per_s": ips * n, "cpu_ms_per_image": cpu * 1e3}
            for name in (name for name in ON_DEVICE if name in loaders):
                seconds = device_seconds_per_image(base, size, n, batch_size, repeats, device, OURS[name])
                row[f"{name}_device_step"] = {"device": device, "s_per_image": seconds, "s_per_view": seconds / n}
                loader = row[name]
                ips = 1.0 / (1.0 / loader["images_per_s"] + seconds)
                row[f"{name}_total"] = {"images_per_s": ips, "views_per_s": ips * n,
                                        "cpu_ms_per_image": loader["cpu_ms_per_image"] + seconds * 1e3}
            rows.append(row)
    for row in rows:  # cost per image relative to N = 2 of the same size and loader
        ref = next((r for r in rows if r["size"] == row["size"] and r["n_views"] == 2), None)
        for name in [k for k in names_of(LOADERS) if k in row]:
            entry, base_entry = row[name], (ref or {}).get(name)
            entry["cost_vs_n2"] = (entry["cpu_ms_per_image"] / base_entry["cpu_ms_per_image"]
                                   if base_entry and base_entry["cpu_ms_per_image"] > 0 else None)
            entry["wall_cost_vs_n2"] = base_entry["images_per_s"] / entry["images_per_s"] if base_entry else None
    return rows


#: profiler events that launch no kernel on a GPU (views, metadata, allocation)
NO_KERNEL = {"aten::view", "aten::as_strided", "aten::empty", "aten::empty_strided", "aten::reshape", "aten::expand",
             "aten::narrow", "aten::slice", "aten::select", "aten::t", "aten::transpose", "aten::unsqueeze",
             "aten::squeeze", "aten::permute", "aten::detach", "aten::alias", "aten::_unsafe_view", "aten::unbind",
             "aten::split", "aten::lift_fresh", "aten::result_type", "aten::resolve_conj", "aten::resolve_neg",
             "aten::empty_like", "aten::split_with_sizes", "aten::chunk", "aten::expand_as", "aten::view_as",
             "aten::contiguous", "aten::to", "aten::_to_copy", "aten::is_nonzero", "aten::item",
             "aten::_local_scalar_dense", "aten::numpy_T", "aten::movedim", "aten::flatten"}


def kernel_launches(fn) -> int:
    """Kernels ``fn()`` launches, counted with ``torch.profiler`` on a CPU:
    the leaf ``aten::`` operations (those that call no other operation), less
    :data:`NO_KERNEL`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children
               and e.name not in NO_KERNEL)


def kernel_launches_as_on_gpu(fn) -> int:
    """:func:`kernel_launches` of a device step run on a CPU with the batch
    sizes of an accelerator (no CPU chunking of the photometric part, the
    accelerator's group size for crops), so that the count is a GPU's."""
    from common.views import photometric, resample

    saved = photometric.CPU_CHUNK_VALUES, resample.CPU_MAX_VALUES
    photometric.CPU_CHUNK_VALUES, resample.CPU_MAX_VALUES = 1 << 62, resample.ACCELERATOR_MAX_VALUES
    try:
        return kernel_launches(fn)
    finally:
        photometric.CPU_CHUNK_VALUES, resample.CPU_MAX_VALUES = saved


def paper_dino_pipeline(where: str) -> ViewPipeline:
    """DINO's multi-crop transform with HVS at the paper's setting, rendering
    as ``augment.device=where`` (its device step None for ``loader``)."""
    from common.engine.config import COMMON_SPEC, resolve
    from common.views.multicrop import multicrop_transform
    from dino.method import DINOMethod

    root = Path(__file__).resolve().parents[1]
    cfg = resolve({**COMMON_SPEC, **DINOMethod.spec}, root / "configs" / "dino_paper.yaml",
                  ["hvs.enabled=true", f"augment.device={where}"])
    return ViewPipeline.rendering(multicrop_transform(cfg, hvs_on=True), cfg["augment"]["device"])


def payload_bytes(views) -> int:
    """Bytes the loader sends for a batch (views, or the decoded images of model_crop)."""
    if isinstance(views, (list, tuple)):
        return sum(v.numel() * v.element_size() for v in views)
    return views.pixels.numel() * views.pixels.element_size()


def paper_dino(base, images: int, batch_size: int, workers: int, device: str = "cpu") -> dict:
    """Per ``augment.device``: images per second per core of the loader
    workers, bytes per image sent, and for the device paths the step's
    seconds per image on ``device`` and its kernel launches per batch
    (profiler, on a CPU)."""
    base = Subset(base, list(range(min(images, len(base)))))
    empty = read_all(EmptyItems(len(base)), batch_size, workers)[1]
    out = {"setting": "DINO paper, HVS: 4 global candidates 224 px + 16 local candidates 96 px per image",
           "images": len(base), "batch_size": batch_size, "workers": workers}
    for where in DEVICE_PATHS:
        pipeline = paper_dino_pipeline(where)
        dataset, step = pipeline.dataset(base, seed=0), pipeline.device_step
        wall, cpu, count = read_all(dataset, batch_size, workers)
        cpu_per_image = max(1e-9, cpu - empty) / count
        views, params, _, _ = next(iter(DataLoader(dataset, batch_size=min(batch_size, len(base)), shuffle=False,
                                                   collate_fn=collate)))
        row = {"images_per_s_per_core": 1.0 / cpu_per_image, "cpu_ms_per_image": cpu_per_image * 1e3,
               "wall_images_per_s": count / wall, "bytes_per_image": payload_bytes(views) / len(params)}
        if step is not None:
            moved = views_to(views, device)
            clock = time.process_time if device == "cpu" else time.perf_counter
            t0 = clock()
            step(moved, params)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            row["device_step_s_per_image"] = (clock() - t0) / len(params)
            row["kernel_launches_per_batch"] = kernel_launches_as_on_gpu(lambda: step(views_to(views, "cpu"), params))
            row["kernel_batch"] = len(params)
        out[where] = row
    return out


def names_of(loaders) -> list:
    """The loaders and, after each on the device, its total with the device step."""
    return [k for name in loaders for k in ((name, f"{name}_total") if name in ON_DEVICE else (name,))]


def goal(rows, size: int = 224, n: int = 4, key: str = "cost_vs_n2") -> dict:
    """The goal figure: cost per image with N = 4 over N = 2 at 224 px, per loader."""
    row = next((r for r in rows if r["size"] == size and r["n_views"] == n), {})
    return {name: row[name][key] for name in names_of(LOADERS) if name in row and row[name].get(key) is not None}


def fmt(entry) -> str:
    if entry is None:
        return "-"
    cost = "" if entry.get("cost_vs_n2") is None else f" x{entry['cost_vs_n2']:.2f}"
    return f"{entry['views_per_s']:6.0f} v/s {entry['cpu_ms_per_image']:6.2f} ms{cost}"


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
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS),
                   help="loaders to measure (default all): ours (augment.device=loader), ours_model "
                        "(augment.device=model, plus its device-side photometric step), ours_model_crop "
                        "(augment.device=model_crop, plus its device-side crop, resize, flip and photometric step), "
                        "torchvision")
    p.add_argument("--device", default="cpu", help="where the device-side steps are timed (default cpu)")
    p.add_argument("--output", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--paper-dino", action="store_true",
                   help="measure the three augment.device paths at the paper's DINO setting with HVS instead")
    args = p.parse_args(argv)
    random.seed(0)
    torch.manual_seed(0)
    try:
        base = build_dataset(args.dataset, "train", args.data_dir, download=False)
    except DataError as err:
        print(f"python -m bench.loader: error: {err}", file=sys.stderr)
        sys.exit(2)
    if args.paper_dino:
        res = paper_dino(base, args.images, args.batch_size, args.workers, args.device)
        print(res["setting"] + f"; {res['images']} images, batch {res['batch_size']}, {res['workers']} workers")
        for where in DEVICE_PATHS:
            r = res[where]
            step = (f", device step {r['device_step_s_per_image'] * 1e3:.2f} ms/image on {args.device}, "
                    f"{r['kernel_launches_per_batch']} kernels per batch of {r['kernel_batch']}"
                    if "kernel_launches_per_batch" in r else "")
            print(f"{where}: {r['images_per_s_per_core']:.1f} images/s per core, "
                  f"{r['bytes_per_image'] / 2**20:.2f} MiB per image{step}")
        if args.output:
            write_json_atomic(args.output, res)
        return res
    loaders = tuple(name for name in LOADERS if name in args.loaders)
    rows = benchmark(base, args.sizes, args.views, args.images, args.batch_size, args.workers, args.repeats,
                     loaders, args.device)
    print(f"{args.dataset}, {args.images} images, batch {args.batch_size}, {args.workers} workers, "
          f"median of {args.repeats}; per loader: views/s (wall), CPU ms per image, CPU cost per image vs N=2")
    names = names_of(loaders)
    steps = [name for name in ON_DEVICE if name in loaders]
    print("size | N | " + " | ".join(names) + "".join(f" | {name} step on {args.device}" for name in steps))
    for r in rows:
        print(f"{r['size']:4d} | {r['n_views']} | " + " | ".join(fmt(r.get(name)) for name in names)
              + "".join(f" | {r[name + '_device_step']['s_per_image'] * 1e3:.2f} ms/img" for name in steps))
    ratios = goal(rows)
    if ratios:
        wall = goal(rows, key="wall_cost_vs_n2")
        print("goal, loader cost per image at 224 px, N = 4 over N = 2 (at most x1.35), CPU (wall): "
              + ", ".join(f"{name} x{v:.2f} (x{wall[name]:.2f})" for name, v in ratios.items()))
    if args.output:
        write_json_atomic(args.output, {"rows": rows, "goal_224_n4_over_n2": ratios,
                                        "goal_224_n4_over_n2_wall": goal(rows, key="wall_cost_vs_n2")})
    return rows


if __name__ == "__main__":
    main()
