"""Tests of common/views/data.py on tiny synthetic image trees built in tmp_path."""
from __future__ import annotations

import os
import pickle
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from common.views import data
from common.views.data import DataError, build_dataset, cache_root, resolve_data_dir, subset_indices

CLASSES = ("cat", "dog", "frog")


def make_tree(split_dir: Path, per_class: int = 2, ext: str = "png") -> None:
    """Write ``per_class`` 8x8 images per class under ``split_dir/<class>/``."""
    for c, name in enumerate(CLASSES):
        (split_dir / name).mkdir(parents=True)
        for i in range(per_class):
            mode = "L" if i % 2 else "RGB"  # a grayscale image must come out RGB
            Image.new(mode, (8, 8), color=40 * c + i).save(split_dir / name / f"{i}.{ext}")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("HVS_DATA_DIR", raising=False)
    monkeypatch.setenv("HVS_CACHE_DIR", str(tmp_path / "default-cache"))


def check(ds, n: int, root: Path) -> None:
    assert len(ds) == n and ds.root == str(root)
    assert ds.classes == list(CLASSES)
    assert ds.targets == sorted(ds.targets) and Counter(ds.targets) == {0: n // 3, 1: n // 3, 2: n // 3}
    for i in range(len(ds)):
        img, label = ds[i]
        assert isinstance(label, int) and label == ds.targets[i]
        assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 8)


def test_imagefolder_at_root(tmp_path):
    make_tree(tmp_path / "train", 2)
    make_tree(tmp_path / "val", 1, ext="jpg")
    check(build_dataset("imagefolder", "train", str(tmp_path)), 6, tmp_path / "train")
    check(build_dataset("imagenet", "test", str(tmp_path)), 3, tmp_path / "val")


def test_named_folder_and_transform(tmp_path):
    make_tree(tmp_path / "cifar10" / "train", 2)
    make_tree(tmp_path / "cifar10" / "test", 1)
    check(build_dataset("cifar10", "train", str(tmp_path)), 6, tmp_path / "cifar10" / "train")
    check(build_dataset("cifar10", "val", str(tmp_path)), 3, tmp_path / "cifar10" / "test")
    ds = build_dataset("cifar10", "train", str(tmp_path), transform=lambda im: im.size)
    assert ds[0] == ((8, 8), 0)


def test_archive_extracted_once(tmp_path, monkeypatch, capsys):
    src, root, cache = tmp_path / "src", tmp_path / "root", tmp_path / "cache"
    make_tree(src / "cifar10" / "train", 2)
    make_tree(src / "cifar10" / "test", 1)
    root.mkdir()
    with tarfile.open(root / "cifar10.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar10", arcname="cifar10")

    ds = build_dataset("cifar10", "val", str(root), cache_dir=str(cache))
    folder = cache / f"cifar10-{data.archive_key(root / 'cifar10.tar.gz')[:16]}"
    check(ds, 3, folder / "test")
    assert "extracting" in capsys.readouterr().err
    assert [p.name for p in cache.iterdir()] == [folder.name]  # temporary folder gone

    def no_open(*args, **kwargs):
        raise AssertionError("archive extracted twice")

    monkeypatch.setattr(data.tarfile, "open", no_open)
    check(build_dataset("cifar10", "train", str(root), cache_dir=str(cache)), 6, folder / "train")
    assert capsys.readouterr().err == ""


def test_the_archive_cache_is_keyed_by_the_archive(tmp_path, capsys):
    """Another archive of the same name under another data root is extracted anew (not
    mistaken for the first one's extraction); a truncated one is refused, naming it."""
    cache = tmp_path / "cache"
    roots = {}
    for tag, per_class in (("a", 2), ("b", 3)):
        src, root = tmp_path / f"src{tag}", tmp_path / f"root{tag}"
        make_tree(src / "cifar10" / "train", per_class)
        make_tree(src / "cifar10" / "test", 1)
        root.mkdir()
        with tarfile.open(root / "cifar10.tar.gz", "w:gz") as tar:
            tar.add(src / "cifar10", arcname="cifar10")
        roots[tag] = root
    assert len(build_dataset("cifar10", "train", str(roots["a"]), cache_dir=str(cache))) == 6
    assert len(build_dataset("cifar10", "train", str(roots["b"]), cache_dir=str(cache))) == 9
    assert len(build_dataset("cifar10", "train", str(roots["a"]), cache_dir=str(cache))) == 6
    cut = tmp_path / "rootc"
    cut.mkdir()
    whole = (roots["b"] / "cifar10.tar.gz").read_bytes()
    (cut / "cifar10.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        build_dataset("cifar10", "train", str(cut), cache_dir=str(cache))
    # a cache folder whose marker names another archive is refused, not used
    folder = cache / f"cifar10-{data.archive_key(roots['a'] / 'cifar10.tar.gz')[:16]}"
    (folder / data.ARCHIVE_MARKER).write_text('{"key": "another"}')
    with pytest.raises(DataError, match=f"{folder}.*delete that folder"):
        build_dataset("cifar10", "train", str(roots["a"]), cache_dir=str(cache))


def test_lost_extraction_race_uses_winner(tmp_path, monkeypatch):
    """If another process renames its copy into place first, ours is discarded."""
    src, cache = tmp_path / "src", tmp_path / "cache"
    make_tree(src / "train", 1)
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="tiny")
    real_rename = os.rename

    def rename_after_winner(a, b):  # the other process wins, with the same archive
        make_tree(Path(b) / "train", 1)
        (Path(b) / data.ARCHIVE_MARKER).write_text((Path(a) / data.ARCHIVE_MARKER).read_text())
        real_rename(a, b)

    monkeypatch.setattr(data.os, "rename", rename_after_winner)
    final = cache / f"tiny-{data.archive_key(archive)[:16]}"
    assert data.extract_once(archive, "tiny", cache) == final
    assert [p.name for p in cache.iterdir()] == [final.name]


def test_env_var_and_missing_root(tmp_path, monkeypatch):
    make_tree(tmp_path / "train", 1)
    with pytest.raises(DataError, match="HVS_DATA_DIR"):
        resolve_data_dir(None)
    monkeypatch.setenv("HVS_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert len(build_dataset("imagefolder", "train")) == 3
    with pytest.raises(DataError, match="nope"):
        resolve_data_dir(str(tmp_path / "nope"))


def test_cache_root(tmp_path, monkeypatch):
    assert cache_root(str(tmp_path)) == tmp_path
    assert cache_root() == tmp_path / "default-cache"
    monkeypatch.delenv("HVS_CACHE_DIR")
    assert cache_root() == Path.home() / ".cache" / "hvs"


def test_errors(tmp_path):
    with pytest.raises(DataError, match="cifar100.*tiny-imagenet-100"):
        build_dataset("mnist", "train", str(tmp_path))
    with pytest.raises(DataError, match="train, val, test"):
        build_dataset("cifar10", "dev", str(tmp_path))
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "cifar10.tar.gz"))):
        build_dataset("cifar10", "train", str(tmp_path))
    (tmp_path / "tiny-imagenet-100" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'tiny-imagenet-100' / 'train'} is empty")):
        build_dataset("tiny-imagenet-100", "train", str(tmp_path))


def test_corrupt_image(tmp_path):
    make_tree(tmp_path / "train", 1)
    bad = tmp_path / "train" / "cat" / "x.jpg"
    bad.write_bytes(b"not an image at all")
    ds = build_dataset("imagefolder", "train", str(tmp_path))
    pickle.dumps(ds.loader)  # DataLoader workers need a picklable loader
    with pytest.raises(DataError, match=re.escape(str(bad))):
        [ds[i] for i in range(len(ds))]


def test_subset_indices():
    targets = [0] * 10 + [1] * 10 + [2] * 3
    sub = subset_indices(targets, 10, seed=0)
    assert sub == sorted(sub) and len(set(sub)) == 10
    assert Counter(targets[i] for i in sub) == {0: 4, 1: 3, 2: 3}
    assert sub == subset_indices(targets, 10, seed=0) != subset_indices(targets, 10, seed=1)
    # Class 2 holds only 3 images: its share passes to the others.
    assert Counter(targets[i] for i in subset_indices(targets, 20, seed=0)) == {0: 9, 1: 8, 2: 3}
    assert Counter(targets[i] for i in subset_indices(targets, 0.5, seed=0)) == {0: 5, 1: 5, 2: 2}
    assert subset_indices(targets, 100, seed=0) == list(range(len(targets)))
    with pytest.raises(ValueError):
        subset_indices(targets, 0, seed=0)
