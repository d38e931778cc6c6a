"""Weighted k-NN evaluation of a frozen backbone (DINO, Caron et al. 2021).

Features of the training and test images are extracted once with the frozen
backbone and L2-normalised.  Every test image takes its ``k`` most similar
training images (cosine similarity); each neighbour votes for its class with
weight ``exp(sim / T)`` and the classes are ranked by their summed votes.

Differences to DINO's ``eval_knn.py``, none of which change the predictions:
any test-set size and number of classes work, ``k`` may exceed the number of
training images (it is clamped), the top-k search is done once for the largest
``k``, and the weights are computed relative to the nearest neighbour
(``exp((sim - sim_max) / T)``), which scales all votes of a sample by the same
factor and so avoids overflow for small temperatures.

Example::

    python -m eval.knn --checkpoint runs/dino_cifar10/checkpoint.pth \\
        --output results/knn_dino_cifar10.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUBSET_SEED = 0  # seed of the class-stratified --train-subset / --test-subset draws


# ---------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------
@torch.no_grad()
def extract_features(model: nn.Module, loader, device, verbose: bool = True) -> tuple[Tensor, Tensor]:
    """Run ``model`` (put in eval mode) over ``loader`` of ``(images, labels)``.

    Returns ``(features, labels)``: float32 ``[n, D]`` (outputs with more than
    two dimensions are flattened) and int64 ``[n]``, both on the CPU.  With
    ``verbose``, loaders of at least 20 batches report progress and an ETA
    about every 10% on stderr.
    """
    model.eval()
    device = torch.device(device)
    n_batches = len(loader) if hasattr(loader, "__len__") else 0
    every = max(1, n_batches // 10) if verbose and n_batches >= 20 else 0
    features, labels, start = [], [], time.time()
    for i, (images, targets) in enumerate(loader):
        out = model(images.to(device, non_blocking=True))
        features.append(out.flatten(1).float().cpu())
        labels.append(torch.as_tensor(targets).long().cpu().view(-1))
        if every and ((i + 1) % every == 0 or i + 1 == n_batches):
            elapsed = time.time() - start
            eta = elapsed / (i + 1) * (n_batches - i - 1)
            print(f"  features: {i + 1}/{n_batches} batches ({100 * (i + 1) / n_batches:.0f}%), "
                  f"elapsed {elapsed:.0f}s, ETA {eta:.0f}s", file=sys.stderr, flush=True)
    if not features:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(features), torch.cat(labels)


# ---------------------------------------------------------------------------
# Weighted k-NN classifier
# ---------------------------------------------------------------------------
@torch.no_grad()
def weighted_knn(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 256) -> dict[int, dict[str, float]]:
    """DINO's weighted k-NN classifier; returns ``{k: {"top1": %, "top5": %}}``.

    Both feature sets are L2-normalised; for every test sample the ``k``
    training samples of highest cosine similarity vote for their class with
    weight ``exp(sim / T)``, and classes are ranked by summed vote (ties in
    favour of the lower class index).  ``top5`` is top-``min(5, C)``.  A ``k``
    larger than the training set is clamped to it but reported under the
    requested ``k``.  The computation runs on ``train_features.device``, over
    chunks of ``chunk_size`` test samples.  ``num_classes`` defaults to the
    largest label (train or test) plus one.
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks={ks} must be a non-empty list of positive integers")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("weighted_knn needs at least one training and one test sample")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels must have the same number of rows")

    device = train_features.device
    train = F.normalize(train_features.float().flatten(1), dim=1)
    test = F.normalize(test_features.float().flatten(1).to(device), dim=1)
    train_labels = train_labels.long().to(device)
    test_labels = test_labels.long().to(device)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    n_train, n_test = len(train), len(test)
    k_max = min(max(ks), n_train)
    top = min(5, num_classes)

    correct = {k: torch.zeros(2, dtype=torch.long, device=device) for k in ks}
    for start in range(0, n_test, chunk_size):
        chunk, target = test[start:start + chunk_size], test_labels[start:start + chunk_size]
        sims, idx = (chunk @ train.T).topk(k_max, dim=1)  # sorted, most similar first
        neighbour_labels = train_labels[idx]
        weights = ((sims - sims[:, :1]) / temperature).exp()  # exp(sim / T) up to a per-row factor
        for k in ks:
            kk = min(k, n_train)
            votes = torch.zeros(len(chunk), num_classes, device=device)
            votes.scatter_add_(1, neighbour_labels[:, :kk], weights[:, :kk])
            ranking = votes.sort(dim=1, descending=True, stable=True).indices[:, :top]
            hits = ranking == target[:, None]
            correct[k][0] += hits[:, 0].sum()
            correct[k][1] += hits.any(dim=1).sum()
    return {k: {"top1": 100.0 * c[0].item() / n_test, "top5": 100.0 * c[1].item() / n_test}
            for k, c in correct.items()}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "eval.knn", description="Weighted k-NN evaluation (DINO) of the frozen backbone of a checkpoint. "
                                "Prints top-1 / top-5 accuracy (%) for every k.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint of any method of this repository (required)")
    p.add_argument("--which", default="auto", choices=["auto", "teacher", "student"],
                   help="which weights to evaluate (auto: the teacher if the checkpoint has one, "
                        "else the model; default: auto)")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="cifar10 | cifar100 | tiny-imagenet-100 | imagenet | imagefolder "
                        "(default: the dataset the checkpoint was trained on)")
    p.add_argument("--data-dir", default=None, metavar="PATH",
                   help="data root (default: $HVS_DATA_DIR, else the checkpoint's data directory)")
    p.add_argument("--image-size", type=_positive_int, default=None, metavar="INT",
                   help="evaluation crop size (default: the checkpoint's training crop size)")
    p.add_argument("--train-subset", type=_positive_int, default=None, metavar="N",
                   help="use only N training images (class-stratified, deterministic; default: all)")
    p.add_argument("--test-subset", type=_positive_int, default=None, metavar="N",
                   help="use only N test images (class-stratified, deterministic; default: all)")
    p.add_argument("--ks", type=_positive_int, nargs="+", default=[10, 20, 100, 200], metavar="K",
                   help="numbers of neighbours (default: 10 20 100 200)")
    p.add_argument("--temperature", type=float, default=0.07, metavar="T",
                   help="temperature of the vote weights exp(sim / T) (default: 0.07)")
    p.add_argument("--batch-size", type=_positive_int, default=256, metavar="INT",
                   help="batch size of the feature extraction (default: 256)")
    p.add_argument("--num-workers", type=int, default=2, metavar="INT", help="data-loading workers (default: 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device of the feature extraction and the k-NN search (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None, metavar="PATH",
                   help='write the results as JSON: {"checkpoint", "dataset", "n_train", "n_test", '
                        '"temperature", "knn": {"<k>": {"top1", "top5"}}, ...}')
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    # Imported here so that the functions above work without the data stack.
    from common.augment import eval_transform
    from common.checkpoint import CheckpointError, load_backbone
    from common.data import DataError, build_dataset, subset_indices

    # ---- model ----
    try:
        backbone, info = load_backbone(args.checkpoint, which=args.which)
    except CheckpointError as e:
        sys.exit(f"eval.knn: {e}")
    backbone.to(args.device)
    dataset = args.dataset or info["dataset"]
    image_size = args.image_size or info["image_size"]
    data_dir = args.data_dir or os.environ.get("HVS_DATA_DIR") or info.get("data_dir")
    print(f"{info.get('method')} / {info.get('arch')} ({info.get('which', args.which)}) from {args.checkpoint}; "
          f"k-NN on {dataset} at {image_size}px", file=sys.stderr)

    # ---- data ----
    transform = eval_transform(image_size)
    loaders = {}
    for split, n in (("train", args.train_subset), ("val", args.test_subset)):
        try:
            ds = build_dataset(dataset, split, data_dir=data_dir, transform=transform)
            if n is not None:
                ds = torch.utils.data.Subset(ds, subset_indices(ds.targets, n, SUBSET_SEED))
        except DataError as e:
            sys.exit(f"eval.knn: {e}")
        loaders[split] = torch.utils.data.DataLoader(
            ds, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
            pin_memory=str(args.device).startswith("cuda"))

    # ---- features and k-NN ----
    train_x, train_y = extract_features(backbone, loaders["train"], args.device)
    test_x, test_y = extract_features(backbone, loaders["val"], args.device)
    print(f"features: train {tuple(train_x.shape)}, test {tuple(test_x.shape)}", file=sys.stderr)
    results = weighted_knn(train_x.to(args.device), train_y, test_x, test_y,
                           ks=args.ks, temperature=args.temperature)
    for k, r in results.items():
        print(f"k={k}  top1 {r['top1']:.2f}  top5 {r['top5']:.2f}")

    report = {"eval": "knn", "checkpoint": args.checkpoint, "dataset": dataset, "method": info.get("method"),
              "arch": info.get("arch"), "hvs": info.get("hvs"), "epoch": info.get("epoch"), "which": info.get("which", args.which), "image_size": image_size,
              "n_train": len(train_y), "n_test": len(test_y), "temperature": args.temperature,
              "knn": {str(k): r for k, r in results.items()}}
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
