"""Tests of the transfer datasets of common/views/data.py (Flowers102, Food101, iNat21)
on tiny fake roots written in tmp_path in each layout that build_dataset accepts."""
from __future__ import annotations

import json
import pickle
import re
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from scipy.io import savemat
from torch.utils.data import Subset
from torchvision import datasets
from torchvision.transforms import functional as TF

from common.views.data import DATASETS, DataError, archive_key, build_dataset, num_classes, subset_indices


def write_image(path: Path, level: int, mode: str = "RGB") -> None:
    """An 8x8 image of one grey level (kept apart by 20, so JPEG cannot blur them together)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (8, 8), color=level if mode == "L" else (level,) * 3).save(path)


def level_of(image: Image.Image) -> int:
    return round(image.getpixel((4, 4))[0] / 20)


def check(ds, targets: list[int], n_classes: int, root: Path) -> None:
    """Length, labels, classes, root, the images, a transform and a subset of ``ds``."""
    assert len(ds) == len(targets) and ds.targets == targets
    assert len(ds.classes) == n_classes == num_classes(ds)
    assert ds.root == str(root)
    image, label = ds[len(ds) - 1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert label == targets[-1] and isinstance(label, int)
    ds.transform = TF.to_tensor
    tensor, label = ds[0]
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 8, 8) and label == targets[0]
    ds.transform = None
    sub = subset_indices(ds.targets, len(set(targets)), seed=0)
    assert sorted(targets[i] for i in sub) == sorted(set(targets))  # one image of each class
    assert num_classes(Subset(ds, sub)) == n_classes


# --- Flowers102 --------------------------------------------------------------------------

FLOWER_LABELS = [1, 1, 2, 2, 3, 3, 1, 2, 3, 1, 2, 3]  # 1-based, as in imagelabels.mat
FLOWER_SPLITS = {"trnid": [1, 3, 5], "valid": [2, 4, 6], "tstid": [7, 8, 9, 10, 11, 12]}


def make_flowers(base: Path) -> None:
    folder = base / "flowers-102"
    for i, label in enumerate(FLOWER_LABELS, 1):
        write_image(folder / "jpg" / f"image_{i:05d}.jpg", 20 * i, mode="L" if i % 2 else "RGB")
    savemat(folder / "imagelabels.mat", {"labels": FLOWER_LABELS})
    savemat(folder / "setid.mat", FLOWER_SPLITS)


@pytest.fixture
def fake_mat_ok(monkeypatch):
    # torchvision checks the md5 of the real imagelabels.mat and setid.mat; our fake
    # ones cannot match it, so only require the files the real check looks at to exist.
    def exists_only(self):
        return self._images_folder.is_dir() and all(
            (self._base_folder / name).is_file() for name in ("imagelabels.mat", "setid.mat"))

    monkeypatch.setattr(datasets.Flowers102, "_check_integrity", exists_only)


@pytest.mark.parametrize("sub", ["", "flowers102"], ids=["under-root", "under-name"])
def test_flowers102_train_is_train_plus_val(tmp_path, fake_mat_ok, sub):
    make_flowers(tmp_path / sub)
    train = build_dataset("flowers102", "train", str(tmp_path))
    val = build_dataset("flowers102", "test", str(tmp_path))
    for ds, ids in ((train, FLOWER_SPLITS["trnid"] + FLOWER_SPLITS["valid"]),
                    (val, FLOWER_SPLITS["tstid"])):
        check(ds, [FLOWER_LABELS[i - 1] - 1 for i in ids], 102, tmp_path / sub)
        assert [level_of(ds[k][0]) for k in range(len(ds))] == ids  # the right image files
    assert train[-1][1] == train.targets[-1] and level_of(train[-3][0]) == 2  # first val image


def test_flowers102_bad_mat_files(tmp_path):
    make_flowers(tmp_path)  # fake .mat files: torchvision's md5 check rejects them
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'flowers-102'} is incomplete")):
        build_dataset("flowers102", "train", str(tmp_path))


# --- Food101 -----------------------------------------------------------------------------

FOOD = {"train": {"waffles": ["waffles/1", "waffles/2"],
                  "apple_pie": ["apple_pie/3", "apple_pie/4"]},
        "test": {"waffles": ["waffles/5"], "apple_pie": ["apple_pie/6"]}}


def make_food(base: Path) -> None:
    folder = base / "food-101"
    (folder / "meta").mkdir(parents=True)
    for split, meta in FOOD.items():
        (folder / "meta" / f"{split}.json").write_text(json.dumps(meta))
        for files in meta.values():
            for f in files:
                write_image(folder / "images" / f"{f}.jpg", 20 * int(f.split("/")[1]))


def test_food101(tmp_path):
    make_food(tmp_path / "food101")
    for split, tv_split in (("train", "train"), ("val", "test")):
        ds = build_dataset("food101", split, str(tmp_path))
        files = [f for fs in FOOD[tv_split].values() for f in fs]
        check(ds, [int(f.startswith("waffles")) for f in files], 2, tmp_path / "food101")
        assert ds.classes == ["apple_pie", "waffles"]
        assert [level_of(ds[k][0]) for k in range(len(ds))] == [int(f.split("/")[1]) for f in files]
    assert len(pickle.loads(pickle.dumps(ds))) == 2  # DataLoader workers get a copy


def test_food101_corrupt_image(tmp_path):
    make_food(tmp_path)
    bad = tmp_path / "food-101" / "images" / "apple_pie" / "6.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = build_dataset("food101", "val", str(tmp_path))
    assert ds[0][1] == 1
    with pytest.raises(DataError, match=re.escape(str(bad))):
        ds[1]
    with pytest.raises(IndexError):
        ds[2]


def test_torchvision_layout_in_archive(tmp_path):
    make_food(tmp_path / "src")
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    with tarfile.open(root / "food101.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "food-101", arcname="food-101")
    ds = build_dataset("food101", "train", str(root), cache_dir=str(cache))
    check(ds, [1, 1, 0, 0], 2, cache / f"food101-{archive_key(root / 'food101.tar.gz')[:16]}")


def test_download_goes_under_name(tmp_path, monkeypatch):
    import torchvision.datasets.food101 as food101

    def fake_download(url, download_root, **kwargs):
        make_food(Path(download_root))

    monkeypatch.setattr(food101, "download_and_extract_archive", fake_download)
    ds = build_dataset("food101", "val", str(tmp_path), download=True)
    check(ds, [1, 0], 2, tmp_path / "food101")
    assert (tmp_path / "food101" / "food-101" / "meta" / "test.json").is_file()

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(food101, "download_and_extract_archive", no_network)
    (tmp_path / "other").mkdir()
    target = tmp_path / "other" / "food101"
    with pytest.raises(DataError, match=re.escape(f"into {target} failed: no network")):
        build_dataset("food101", "train", str(tmp_path / "other"), download=True)


# --- iNaturalist 2021 ----------------------------------------------------------------------

SPECIES = ["00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
           "00001_Animalia_Arthropoda_Insecta_Coleoptera_Cleridae_Trichodes_apiarius",
           "00002_Plantae_Tracheophyta_Magnoliopsida_Rosales_Rosaceae_Rosa_canina"]


def make_inat(base: Path, version: str, per_class: int) -> list[int]:
    """``per_class`` images per species, image k (in (species, file name) order) of
    grey level 20 * k, written in reverse name order; returns the labels in that order."""
    for c, species in enumerate(SPECIES):
        for i in reversed(range(per_class)):
            write_image(base / version / species / f"{i:02d}.jpg", 20 * (c * per_class + i))
    return [c for c in range(len(SPECIES)) for _ in range(per_class)]


@pytest.mark.parametrize("name,train_version,sub", [
    ("inat21", "2021_train", ""), ("inat21-mini", "2021_train_mini", "inat21-mini")])
def test_inat21(tmp_path, name, train_version, sub):
    train_labels = make_inat(tmp_path / sub, train_version, 3)
    val_labels = make_inat(tmp_path / sub, "2021_valid", 1)
    train = build_dataset(name, "train", str(tmp_path))
    check(train, train_labels, 3, tmp_path / sub / train_version)
    assert train.classes == SPECIES
    assert [level_of(train[k][0]) for k in range(len(train))] == list(range(9))  # sorted by name
    check(build_dataset(name, "val", str(tmp_path)), val_labels, 3, tmp_path / sub / "2021_valid")


def test_inat21_bad_category_folder(tmp_path):
    make_inat(tmp_path, "2021_valid", 1)
    (tmp_path / "2021_valid" / "not_a_species").mkdir()
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / '2021_valid'} is incomplete")):
        build_dataset("inat21", "val", str(tmp_path))


# --- ImageFolder trees and errors ----------------------------------------------------------

@pytest.mark.parametrize("name", ["cifar100", "food101"])
def test_imagefolder_tree_comes_first(tmp_path, name):
    for split, n in (("train", 2), ("val", 1)):
        for c, cls in enumerate(("b", "a")):
            for i in range(n):
                write_image(tmp_path / name / split / cls / f"{i}.png", 20 * c)
    make_food(tmp_path)  # ignored: the ImageFolder tree wins
    check(build_dataset(name, "train", str(tmp_path)), [0, 0, 1, 1], 2, tmp_path / name / "train")
    check(build_dataset(name, "test", str(tmp_path)), [0, 1], 2, tmp_path / name / "val")


def test_new_names_listed():
    assert {"cifar100", "flowers102", "food101", "inat21", "inat21-mini"} <= set(DATASETS)


@pytest.mark.parametrize("name,folder", [("flowers102", "flowers-102"), ("food101", "food-101"),
                                         ("inat21", "2021_valid"), ("inat21-mini", "2021_valid")])
def test_not_found(tmp_path, name, folder):
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "missing"))):
        build_dataset(name, "val", str(tmp_path / "missing"))
    with pytest.raises(DataError) as err:
        build_dataset(name, "val", str(tmp_path))
    message = str(err.value)
    assert f"dataset {name!r}" in message and "download=True" in message
    for path in (tmp_path / name / "val", tmp_path / name / "test", tmp_path / folder,
                 tmp_path / name / folder, tmp_path / f"{name}.tar.gz"):
        assert str(path) in message


def test_num_classes_from_targets():
    class Bare:
        targets = [0, 4, 2]

    assert num_classes(Subset(Bare(), [0])) == 5
