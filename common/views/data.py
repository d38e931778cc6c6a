"""Finding and loading the image datasets, with errors that say how to fix them.

A *data root* ``R`` comes from ``--data-dir`` or the ``HVS_DATA_DIR`` variable
(:func:`resolve_data_dir`).  :func:`build_dataset` looks for dataset ``X``
under it, in this order:

1. ``R/X/<split>/``: an extracted ImageFolder tree (``<split>/<class>/<image>``);
   this works for every name, so any dataset can be given as an ImageFolder tree;
2. torchvision's own layout, directly under ``R`` or under ``R/X/``:

   - ``cifar10`` / ``cifar100``: ``cifar-10-batches-py`` / ``cifar-100-python``
     (directly under ``R`` only);
   - ``flowers102``: ``flowers-102/`` (``jpg/``, ``imagelabels.mat``,
     ``setid.mat``; torchvision checks the md5 of the two ``.mat`` files);
   - ``food101``: ``food-101/`` (``images/<class>/<id>.jpg``,
     ``meta/{train,test}.json``);
   - ``inat21``: ``2021_train/`` and ``2021_valid/`` (category folders such as
     ``00000_Animalia_...``; 10,000 species, the label is the full species);
   - ``inat21-mini``: ``2021_train_mini/`` and ``2021_valid/``;

3. an archive ``R/X.tar.gz`` holding ``X/train`` and ``X/test`` (or ``X/val``),
   or torchvision's layout of step 2, extracted once into ``cache_root()/X-<key>``,
   ``key`` the archive's identity (size, first and last MiB), checked on every
   use (atomically, safe for several ranks);
4. for ``imagefolder`` and ``imagenet``, ``R/<split>/`` itself;
5. with ``download=True`` (and a network), torchvision's download: CIFAR into
   ``R``, the transfer datasets into ``R/X``.  Beware that iNat21 is very large
   (the full 2021 train split is about 224 GB, train_mini about 42 GB, valid 8 GB).

Splits are ``train`` and ``val`` (``test`` is a synonym of ``val``).  For the
transfer datasets they map onto torchvision's splits as in the usual transfer
protocol: Flowers102 ``train`` is torchvision's ``train`` + ``val`` (1,020 +
1,020 images) and ``val`` is its ``test`` (6,149 images); Food101 ``train`` /
``val`` are its ``train`` / ``test``; iNat21 ``train`` / ``val`` are the
versions ``2021_train`` (or ``2021_train_mini``) / ``2021_valid``.

Every dataset has ``.targets``, ``.classes`` and ``.root``.  Every problem a
user can fix (no root, dataset missing, empty folder, corrupt image or archive)
raises :class:`DataError` naming the path concerned.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import random
import shutil
import sys
import tarfile
import zlib
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets

DATASETS = ("cifar10", "cifar100", "tiny-imagenet-100", "imagenet", "imagefolder",
            "flowers102", "food101", "inat21", "inat21-mini")
SPLITS = ("train", "val", "test")  # 'test' is a synonym for 'val'

# Folder names accepted for each split, tried in this order.
_SPLIT_FOLDERS = {"train": ("train",), "val": ("val", "test")}
_CIFAR = {  # name -> (torchvision class, folder torchvision reads from)
    "cifar10": (datasets.CIFAR10, "cifar-10-batches-py"),
    "cifar100": (datasets.CIFAR100, "cifar-100-python"),
}


class _TV(NamedTuple):
    """A torchvision dataset class and how our splits map onto it."""
    cls: type
    # our split -> (folder torchvision reads under its root, kwargs of each part;
    #               several parts are concatenated in that order)
    splits: dict[str, tuple[str, tuple[dict[str, Any], ...]]]


def _inat(train_version: str) -> _TV:
    return _TV(datasets.INaturalist, {
        split: (version, ({"version": version, "target_type": "full"},))
        for split, version in (("train", train_version), ("val", "2021_valid"))})


_TORCHVISION = {
    "flowers102": _TV(datasets.Flowers102, {
        "train": ("flowers-102", ({"split": "train"}, {"split": "val"})),
        "val": ("flowers-102", ({"split": "test"},))}),
    "food101": _TV(datasets.Food101, {
        "train": ("food-101", ({"split": "train"},)),
        "val": ("food-101", ({"split": "test"},))}),
    "inat21": _inat("2021_train"),
    "inat21-mini": _inat("2021_train_mini"),
}
_HOW = ("Point --data-dir / HVS_DATA_DIR at a folder holding {x}/train/<class>/<image> "
        "(and {x}/val or {x}/test), the archive {x}.tar.gz")


#: Seed of the class-stratified subsets that the evaluations draw (k-NN, linear,
#: finetuning, attention maps): the same images for every run and checkpoint.
SUBSET_SEED = 0


class DataError(RuntimeError):
    """A data problem the user can fix; the message names the path involved."""


def data_dir_or_default(data_dir: str | None, fallback: str | None = None) -> str | None:
    """The data root of an evaluation: ``data_dir`` if given, else
    ``$HVS_DATA_DIR``, else ``fallback`` (the checkpoint's pretraining root)."""
    return data_dir or os.environ.get("HVS_DATA_DIR") or fallback


def resolve_data_dir(data_dir: str | None) -> Path:
    """Return the data root: ``data_dir`` if given, else ``$HVS_DATA_DIR``."""
    source = "--data-dir"
    if not data_dir:
        data_dir, source = os.environ.get("HVS_DATA_DIR"), "HVS_DATA_DIR"
    if not data_dir:
        raise DataError("No data directory given: pass --data-dir PATH or set "
                        "HVS_DATA_DIR=PATH (a folder holding the datasets).")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise DataError(f"data directory {path} (from {source}) {what}: pass "
                        f"--data-dir PATH or set HVS_DATA_DIR=PATH to an existing folder.")
    return path


def cache_root(cache_dir: str | None = None) -> Path:
    """Where archives are extracted: ``cache_dir``, ``$HVS_CACHE_DIR`` or ``~/.cache/hvs``."""
    root = cache_dir or os.environ.get("HVS_CACHE_DIR") or "~/.cache/hvs"
    return Path(root).expanduser()


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB; a corrupt or unreadable file raises :class:`DataError`.

    Module level so that it pickles into DataLoader worker processes.
    """
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ...
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}. "
                        f"Replace or delete the file.") from e


def _image_folder(folder: Path, split: str, transform: Callable | None) -> Dataset:
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=load_rgb)
    except FileNotFoundError as e:  # no class folders, or a class without images
        raise DataError(f"{folder} is empty: expected {split}/<class>/<image> files "
                        f"({e})") from e


class TorchvisionSplit(Dataset):
    """One split of a torchvision dataset class, with our uniform interface.

    ``parts`` are instances of the class (built without a transform), read one
    after the other: Flowers102's ``train`` is its ``train`` and ``val`` parts.
    Exposes ``targets`` (ints), ``classes``, ``root`` (the folder given to
    torchvision: the one holding ``flowers-102``/``food-101``, or iNat's
    version folder) and applies ``transform`` to the image.
    """

    def __init__(self, parts: Sequence[Dataset], transform: Callable | None = None) -> None:
        self.parts = list(parts)
        self.transform = transform
        self.root = str(self.parts[0].root)
        self.targets = [int(t) for part in self.parts for t in _part_labels(part)]
        self.classes = list(getattr(self.parts[0], "classes", None)
                            or getattr(self.parts[0], "all_categories", None)
                            or map(str, range(max(self.targets, default=-1) + 1)))
        self._ends = list(itertools.accumulate(len(part) for part in self.parts))

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        k = bisect.bisect_right(self._ends, index)
        image, label = self.parts[k][index - (self._ends[k - 1] if k else 0)]
        return (self.transform(image) if self.transform else image), int(label)

    def __repr__(self) -> str:
        name = type(self.parts[0]).__name__
        return f"{type(self).__name__}({name}, root={self.root}, n={len(self)})"


def _part_labels(part: Any) -> list[int]:
    """Labels of a torchvision dataset that keeps them privately (no ``targets``)."""
    if hasattr(part, "_labels"):  # Flowers102, Food101
        return part._labels
    part.index.sort()  # INaturalist: (category id, file name) in listdir order; make it stable
    return [category for category, _ in part.index]


#: ``data.in_memory=auto`` decodes these training sets into memory when they come as image files
IN_MEMORY_AUTO = ("cifar10", "cifar100")
IN_MEMORY_CHOICES = ("auto", "true", "false")


class DecodedImages(Dataset):
    """Every image of ``dataset`` decoded once, held as uint8 pixels in one
    buffer: ``(PIL RGB image, label)`` per index, as ``dataset`` gives them,
    without reading or decoding a file again (``data.in_memory``).

    The pixels are one numpy array made in the process that builds the
    dataset; forked loader workers share its pages (nothing writes to them),
    so neither a new epoch nor a worker start reads or decodes the files
    again.  Images of any sizes are packed one after the other (``offsets``,
    ``shapes``).  An image comes back as ``Image.fromarray`` of its pixels:
    the same pixels as the file decoded (``load_rgb``), so every view drawn from
    it is the same bit for bit.  Decoding uses ``threads`` threads (PIL
    releases the GIL while it decodes); more than ``max_bytes`` of pixels is a
    :class:`DataError`."""

    def __init__(self, dataset: Dataset, threads: int | None = None, max_bytes: int | None = None) -> None:
        import numpy as np
        from concurrent.futures import ThreadPoolExecutor

        inner = dataset
        while isinstance(inner, Subset):
            inner = inner.dataset
        self.root = str(getattr(inner, "root", "?"))
        self.classes = list(getattr(inner, "classes", []) or [])
        limit = max_bytes if max_bytes is not None else memory_bytes() // 2
        n = len(dataset)
        chunks = [range(i, min(n, i + 256)) for i in range(0, n, 256)]
        arrays, self.targets, total = [], [], 0

        def decode(chunk):
            out = []
            for i in chunk:
                image, label = dataset[i]
                out.append((np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8),
                            int(label)))
            return out

        with ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1)) as pool:
            for part in pool.map(decode, chunks):
                for array, label in part:
                    total += array.nbytes
                    if total > limit:
                        raise DataError(f"data.in_memory: the decoded images under {self.root} need more than "
                                        f"{limit / 2**30:.1f} GiB (half of this machine's memory): set "
                                        "data.in_memory=false to read them from their files")
                    arrays.append(array)
                    self.targets.append(label)
        self.shapes = np.array([a.shape[:2] for a in arrays], dtype=np.int64).reshape(-1, 2)
        self.offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([a.size for a in arrays], out=self.offsets[1:])
        self.pixels = np.empty(int(self.offsets[-1]), dtype=np.uint8)
        for k in range(n):  # packed, then the separate arrays are dropped
            self.pixels[self.offsets[k]:self.offsets[k + 1]] = arrays[k].reshape(-1)
            arrays[k] = None
        self.pixels.flags.writeable = False

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        if index < 0:
            index += len(self)
        h, w = self.shapes[index]
        pixels = self.pixels[self.offsets[index]:self.offsets[index + 1]].reshape(int(h), int(w), 3)
        return Image.fromarray(pixels, "RGB"), self.targets[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root}, n={len(self)}, {self.pixels.nbytes / 2**20:.0f} MiB)"


def memory_bytes() -> int:
    """Physical memory of this machine in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def holds_decoded(dataset: Dataset) -> bool:
    """Whether ``dataset`` already keeps its images decoded in memory: ours
    (:class:`DecodedImages`), or torchvision's CIFAR classes, which read the
    pickled batches into one uint8 array once and only wrap a row in a PIL
    image per sample."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, (DecodedImages, datasets.CIFAR10))  # CIFAR100 is a CIFAR10


def in_memory(dataset: Dataset, mode: str, name: str, threads: int | None = None) -> Dataset:
    """``dataset`` as ``data.in_memory`` says: ``auto`` decodes CIFAR-10/100
    read from image files (:data:`IN_MEMORY_AUTO`), ``true`` any dataset,
    ``false`` none; a dataset already held decoded (:func:`holds_decoded`)
    stays as it is.  The images given are the same pixels either way."""
    if not wants_in_memory(mode, name) or holds_decoded(dataset):
        return dataset
    return DecodedImages(dataset, threads)


def wants_in_memory(mode: str, name: str) -> bool:
    """Whether ``data.in_memory=mode`` asks for training set ``name`` decoded into memory."""
    if mode not in IN_MEMORY_CHOICES:
        raise ValueError(f"data.in_memory={mode!r} must be one of {IN_MEMORY_CHOICES}")
    return mode == "true" or (mode == "auto" and name in IN_MEMORY_AUTO)


def num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset from :func:`build_dataset` (or a Subset of one)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else int(max(dataset.targets)) + 1


def _torchvision(name: str, split: str, base: Path, transform: Callable | None,
                 download: bool = False) -> Dataset:
    """Build ``split`` of ``name`` from torchvision's layout under ``base``."""
    spec = _TORCHVISION[name]
    folder, kwargs = spec.splits[split]
    try:
        parts = [spec.cls(str(base), download=download, loader=load_rgb, **kw) for kw in kwargs]
    except (RuntimeError, OSError, ValueError, KeyError) as e:  # "not found or corrupted", bad meta
        if download:
            raise DataError(f"downloading {name} into {base} failed: {e}") from e
        raise DataError(f"{base / folder} is incomplete or corrupt ({type(e).__name__}: {e}). "
                        f"Replace it, or delete it and pass download=True.") from e
    return TorchvisionSplit(parts, transform)


def _find_torchvision(name: str, split: str, bases: Sequence[Path], tried: list[Path],
                      transform: Callable | None) -> Dataset | None:
    """The torchvision layout of ``name`` under the first base holding it, if any."""
    if name not in _TORCHVISION:
        return None
    folder = _TORCHVISION[name].splits[split][0]
    for base in bases:
        tried.append(base / folder)
        if tried[-1].is_dir():
            return _torchvision(name, split, base, transform)
    return None


def _split_folder(base: Path, split: str, tried: list[Path]) -> Path | None:
    """First existing ``base/<folder>`` for ``split``; records what was tried."""
    for name in _SPLIT_FOLDERS[split]:
        tried.append(base / name)
        if tried[-1].is_dir():
            return tried[-1]
    return None


ARCHIVE_MARKER = ".hvs-archive.json"


def archive_key(archive: Path, sample: int = 2**20) -> str:
    """The identity of an archive: SHA-256 of its size, its first and its last
    ``sample`` bytes (a gzip file ends with the CRC-32 and the length of its
    content, so another or a truncated archive gets another key) without
    reading all of a large file."""
    size = archive.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(archive, "rb") as f:
        digest.update(f.read(sample))
        f.seek(max(0, size - sample))
        digest.update(f.read(sample))
    return digest.hexdigest()


def extract_once(archive: Path, name: str, cache: Path) -> Path:
    """Extract ``archive`` into ``cache/<name>-<key>`` unless already there;
    return that folder.  ``key`` is the archive's identity
    (:func:`archive_key`): another archive of the same name (another data
    root, a newer copy, a truncated one) is extracted anew, never mistaken for
    the first.  The folder holds a marker naming the key, checked on every use.

    Extraction goes to a temporary folder in ``cache`` which is then renamed into
    place, so concurrent processes never see a half-extracted tree; a process
    losing the race uses the winner's copy.
    """
    try:
        key = archive_key(archive)
    except OSError as e:
        raise DataError(f"cannot read {archive}: {e.strerror or e}") from None
    final = cache / f"{name}-{key[:16]}"
    if final.is_dir():
        return _checked_extraction(final, archive, key)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=cache))
    try:
        print(f"extracting {archive} into {final} (once)", file=sys.stderr, flush=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        # The archive normally holds one top-level folder 'name'; accept a bare tree too.
        src = tmp / name if (tmp / name).is_dir() else tmp
        (src / ARCHIVE_MARKER).write_text(json.dumps({"archive": str(archive), "key": key}) + "\n")
        try:
            os.rename(src, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
    except (EOFError, zlib.error) as e:  # gzip stream cut short or damaged
        raise DataError(f"cannot extract {archive}: the archive is truncated or corrupt ({e or type(e).__name__}). "
                        f"Download or copy it again.") from e
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot extract {archive} into {cache}: {e}. Check the archive, "
                        f"or set HVS_CACHE_DIR to a writable folder.") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _checked_extraction(final, archive, key)


def _checked_extraction(folder: Path, archive: Path, key: str) -> Path:
    """``folder`` if its marker names the archive's ``key``; a :class:`DataError` otherwise."""
    try:
        marked = json.loads((folder / ARCHIVE_MARKER).read_text()).get("key")
    except (OSError, ValueError, AttributeError):
        marked = None
    if marked != key:
        raise DataError(f"the cache folder {folder} was not extracted from {archive} (its marker "
                        f"{ARCHIVE_MARKER} is missing or names another archive): delete that folder to "
                        "extract the archive again")
    return folder


def build_dataset(name: str, split: str, data_dir: str | None = None,
                  transform: Callable | None = None, download: bool = False,
                  cache_dir: str | None = None) -> Dataset:
    """Dataset of ``(image, label)`` with ``.targets``, ``.classes`` and ``.root``.

    ``image`` is a PIL RGB image, or ``transform(image)``.  See the module
    docstring for where the data is looked for.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    split = "val" if split == "test" else split
    root = resolve_data_dir(data_dir)
    tried: list[Path] = []

    # 1. An extracted ImageFolder tree R/X/<split>.
    if folder := _split_folder(root / name, split, tried):
        return _image_folder(folder, split, transform)

    # 2. torchvision's own layout: CIFAR folders in R; the others in R or R/X.
    if name in _CIFAR:
        cls, sub = _CIFAR[name]
        tried.append(root / sub)
        if (root / sub).is_dir():
            try:
                return cls(str(root), train=split == "train", transform=transform)
            except RuntimeError as e:  # "Dataset not found or corrupted"
                raise DataError(f"{root / sub} is incomplete or corrupt ({e}). Replace it, "
                                f"or delete it and pass download=True.") from e
    if ds := _find_torchvision(name, split, (root, root / name), tried, transform):
        return ds

    # 3. An archive R/X.tar.gz, extracted once into the cache.
    archive = root / f"{name}.tar.gz"
    tried.append(archive)
    if archive.is_file():
        extracted = extract_once(archive, name, cache_root(cache_dir))
        if folder := _split_folder(extracted, split, tried):
            return _image_folder(folder, split, transform)
        if ds := _find_torchvision(name, split, (extracted,), tried, transform):
            return ds

    # 4. R itself is the dataset folder (ImageNet layout R/train, R/val).
    if name in ("imagefolder", "imagenet"):
        if folder := _split_folder(root, split, tried):
            return _image_folder(folder, split, transform)

    # 5. Download with torchvision: CIFAR into R, the others into R/X.
    if name in _CIFAR and download:
        try:
            return _CIFAR[name][0](str(root), train=split == "train",
                                   transform=transform, download=True)
        except (OSError, RuntimeError) as e:
            raise DataError(f"downloading {name} into {root} failed: {e}") from e
    if name in _TORCHVISION and download:
        return _torchvision(name, split, root / name, transform, download=True)

    raise DataError(f"dataset {name!r} (split {split!r}) not found under {root}: looked for "
                    f"{', '.join(map(str, tried))}. {_how(name, split)}.")


def _how(name: str, split: str) -> str:
    """How to provide dataset ``name``, for the not-found message."""
    how = _HOW.format(x=name)
    if name in _CIFAR:
        return how + ", or torchvision's CIFAR root (or pass download=True)"
    if name in ("imagenet", "imagefolder"):
        return how + ", or at the dataset folder itself (train/, val/)"
    if name in _TORCHVISION:
        folder = _TORCHVISION[name].splits[split][0]
        big = " (very large)" if name.startswith("inat") else ""
        return (how + f", or torchvision's {_TORCHVISION[name].cls.__name__} folder {folder}/ "
                f"directly there or under {name}/ (or pass download=True to download it{big} "
                f"into {name}/)")
    return how


def subset_indices(targets: Sequence[int], n: int | float, seed: int) -> list[int]:
    """Deterministic class-stratified subset of ``range(len(targets))``, sorted.

    An integer ``n >= 1`` is the total number of images, split as evenly as
    possible over the classes (the remainder going to the lowest labels; a class
    too small to fill its share passes the rest on to the others).  A float
    ``0 < n < 1`` keeps that fraction of every class (rounded, at least one).
    ``n`` at least the dataset size gives all indices.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_class[int(t)].append(i)
    labels = sorted(by_class)
    size = {c: len(by_class[c]) for c in labels}

    if isinstance(n, float) and 0 < n < 1:
        take = {c: max(1, round(n * size[c])) for c in labels}
    elif n >= 1 and n == int(n):
        take, left, open_ = dict.fromkeys(labels, 0), int(n), list(labels)
        while left > 0 and open_:  # even shares; full classes drop out
            share, extra = divmod(left, len(open_))
            for k, c in enumerate(open_):
                got = min(share + (k < extra), size[c] - take[c])
                take[c] += got
                left -= got
            open_ = [c for c in open_ if take[c] < size[c]]
    else:
        raise ValueError(f"subset size must be an integer >= 1 or a fraction in (0, 1), got {n!r}")

    rng = random.Random(seed)
    return sorted(i for c in labels for i in rng.sample(by_class[c], take[c]))


def make_image_folder(root, classes=4, per_class=8, size=20, seed=0):
    """ImageFolder tree root/{train,val}/<class>/<i>.png of coloured noise, one
    mean colour per class so that a k-NN on pixels can tell them apart (the
    tests' data, and the GPU check's without a data root)."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", max(2, per_class // 2))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, 3)
            for i in range(n):
                arr = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i}.png")
    return root
