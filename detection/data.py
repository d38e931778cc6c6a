"""Detection datasets for Detectron2: Pascal-VOC-layout sets read with checks
that name the faulty file, and COCO 2017.

Dataset names are ``<set>_<split>``; the set names its folder under the data
root (``--data-dir`` or ``$HVS_DATA_DIR``):

=============  ======================================  ==========================
set            folder under the data root              classes
=============  ======================================  ==========================
``voc_2007``   ``VOC2007/`` or ``VOCdevkit/VOC2007/``  the 20 VOC classes
``voc_2012``   ``VOC2012/`` or ``VOCdevkit/VOC2012/``  the 20 VOC classes
``raccoon``    ``raccoon-voc/``                        ``raccoon``
``coco_2017``  ``coco/{train2017,val2017,annotations}``  COCO's 80 (from the json)
=============  ======================================  ==========================

A VOC set may also be an archive ``<folder>.tar.gz`` in the data root (e.g.
``../shared/data/raccoon-voc.tar.gz``), extracted once into the cache
(``$HVS_CACHE_DIR``, default ``~/.cache/hvs``).  A VOC folder holds
``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg`` and
``ImageSets/Main/<split>.txt``.  To add your own VOC-layout set, add a line to
:data:`VOC_SETS`.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from common.views.data import DataError, cache_root, extract_once, resolve_data_dir

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")

#: VOC-layout set -> (folder under the data root, classes, year for the evaluator: 2007 = VOC07's
#: 11-point AP, anything else the area under the precision-recall curve)
VOC_SETS = {
    "voc_2007": ("VOC2007", VOC_CLASSES, 2007),
    "voc_2012": ("VOC2012", VOC_CLASSES, 2012),
    "raccoon": ("raccoon-voc", ("raccoon",), 2012),
}
#: COCO split -> (image folder, annotation file) under <data root>/coco
COCO_SPLITS = {"coco_2017_train": ("train2017", "annotations/instances_train2017.json"),
               "coco_2017_val": ("val2017", "annotations/instances_val2017.json")}


def split_name(name: str) -> tuple[str, str]:
    """``voc_2007_trainval`` -> (``voc_2007``, ``trainval``)."""
    for key in VOC_SETS:
        if name.startswith(key + "_"):
            return key, name[len(key) + 1:]
    raise DataError(f"unknown detection dataset {name!r}: a VOC-layout set is <set>_<split> with <set> one of "
                    f"{', '.join(VOC_SETS)}; COCO is one of {', '.join(COCO_SPLITS)}")


def voc_root(key: str, data_dir: str | None) -> Path:
    """The folder of VOC-layout set ``key``: extracted, inside ``VOCdevkit``, or
    an archive extracted once into the cache."""
    folder = VOC_SETS[key][0]
    root = resolve_data_dir(data_dir)
    candidates = [root / folder, root / "VOCdevkit" / folder]
    for path in candidates:
        if (path / "Annotations").is_dir():
            return path
    archive = root / f"{folder}.tar.gz"
    if archive.is_file():
        return extract_once(archive, folder, cache_root())
    raise DataError(f"detection set {key!r} not found under {root}: looked for "
                    f"{', '.join(str(p) for p in candidates)} (each with Annotations/, JPEGImages/ and "
                    f"ImageSets/Main/) and {archive}")


def _text(node: ET.Element, path: str, xml: Path) -> str:
    found = node.find(path)
    if found is None or found.text is None or not found.text.strip():
        raise DataError(f"{xml}: <{path}> is missing or empty")
    return found.text.strip()


def _number(node: ET.Element, path: str, xml: Path) -> float:
    text = _text(node, path, xml)
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{xml}: <{path}> is {text!r}, not a number") from None


def load_voc(root: Path, split: str, classes: tuple[str, ...]) -> list[dict]:
    """Detectron2's dataset dicts of one split of a VOC-layout folder.  Every
    problem is a :class:`DataError` naming the file: a missing split list,
    image or annotation, malformed XML, a class not in ``classes``, a box that
    is not inside its image.  Boxes are VOC's 1-based inclusive pixel indices
    turned into coordinates (``xmin - 1``, as Detectron2's own reader);
    "difficult" objects are kept for training (the VOC evaluator ignores them)."""
    from detectron2.structures import BoxMode

    ids_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        have = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
        raise DataError(f"{ids_file} does not exist: split {split!r} of {root} needs it (one image id per line; "
                        f"splits there: {', '.join(have) or 'none'})")
    ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{ids_file} lists no images")
    dicts = []
    for image_id in ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        image = root / "JPEGImages" / f"{image_id}.jpg"
        if not xml.is_file():
            raise DataError(f"{xml} does not exist (image {image_id!r} is listed in {ids_file})")
        if not image.is_file():
            raise DataError(f"{image} does not exist (image {image_id!r} is listed in {ids_file})")
        try:
            tree = ET.parse(xml)
        except ET.ParseError as err:
            raise DataError(f"{xml} is not valid XML: {err}") from None
        width, height = _number(tree, "size/width", xml), _number(tree, "size/height", xml)
        annotations = []
        for obj in tree.findall("object"):
            cls = _text(obj, "name", xml)
            if cls not in classes:
                raise DataError(f"{xml}: object class {cls!r} is not one of this dataset's classes "
                                f"({', '.join(classes)})")
            box = [_number(obj, f"bndbox/{k}", xml) for k in ("xmin", "ymin", "xmax", "ymax")]
            box[0] -= 1.0
            box[1] -= 1.0
            if not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
                raise DataError(f"{xml}: box {box} of a {cls!r} is empty or outside the {width:.0f}x{height:.0f} "
                                f"image")
            annotations.append({"category_id": classes.index(cls), "bbox": box, "bbox_mode": BoxMode.XYXY_ABS})
        dicts.append({"file_name": str(image), "image_id": image_id, "height": int(height), "width": int(width),
                      "annotations": annotations})
    return dicts


def _reregister(name: str, loader, **metadata) -> None:
    """Register ``name`` with Detectron2, replacing a built-in entry of the same
    name (Detectron2 registers VOC and COCO relative to ``./datasets``)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register(name: str, data_dir: str | None) -> None:
    """Register dataset ``name`` (see the module docstring) with Detectron2,
    its files found under ``data_dir``."""
    if name in COCO_SPLITS:
        from detectron2.data.datasets.coco import load_coco_json

        images, annotations = (resolve_data_dir(data_dir) / "coco" / p for p in COCO_SPLITS[name])
        for path in (images, annotations):
            if not path.exists():
                raise DataError(f"{path} does not exist: COCO 2017 goes in <data root>/coco/ "
                                "(train2017/, val2017/, annotations/instances_{train,val}2017.json)")
        _reregister(name, lambda: load_coco_json(str(annotations), str(images), name),
                    json_file=str(annotations), image_root=str(images), evaluator_type="coco")
        return
    key, split = split_name(name)
    root = voc_root(key, data_dir)
    _, classes, year = VOC_SETS[key]
    _reregister(name, lambda: load_voc(root, split, classes), thing_classes=list(classes), dirname=str(root),
                year=year, split=split, evaluator_type="pascal_voc")


def register_all(names, data_dir: str | None) -> None:
    """Register every dataset of a config and read it once, so that a bad file
    is reported before training starts, not at the first evaluation."""
    from detectron2.data import DatasetCatalog

    for name in dict.fromkeys(names):
        register(name, data_dir)
        if not DatasetCatalog.get(name):
            raise DataError(f"detection dataset {name!r} is empty")

