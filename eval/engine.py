"""Supervised training on top of a pretrained backbone: the machinery shared by
the linear probe (``eval/linear.py``) and finetuning (``eval/finetune.py``).

Reads top to bottom:

  1. the configuration keys every evaluation has, and its command line
     (``--checkpoint``, ``--protocol``, ``--config``, ``key=value``)
  2. data: the evaluation dataset (any of ``common.views.data``), class-stratified
     subsets, training augmentations seeded per (seed, epoch, image) so that a
     resumed run is exact, batches of images or of cached feature tensors
  3. :class:`Trainer`: the explicit loop (forward, cross-entropy summed over
     the classifier heads, backward, step), evaluation of top-1 / top-5 after
     epochs, JSON-lines logs, console ETA, atomic checkpoints and resume; one
     process or torchrun (DDP: gloo on CPU, NCCL on GPU)
  4. the results file: the last epoch's accuracy, and the best epoch only
     beside it and labelled

An evaluation trains one or several classifier *heads* at once (the fast
linear mode sweeps learning rates with one head per rate); every forward
returns logits ``[H, B, C]``.
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from common.engine import checkpoint as ckpt_io
from common.engine import dist
from common.engine.config import (COMMON_SPEC, ConfigError, setting, build_parser, overrides_of, resolve,
                           stop_if_checking)
from common.views.augment import SeededDataset, eval_transform
from common.views.data import SUBSET_SEED, DataError, build_dataset, data_dir_or_default, num_classes, subset_indices
from common.engine.logs import JsonLog, Progress, fmt_time, read_rows
from common.engine.runtime import (Diverged, EpochSampler, amp_settings, exit_on_error, run_session, step_seed,
                            warn_config_changes)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EVAL_FORMAT = "hvs-eval-1"

# ---------------------------------------------------------------------------
# 1. configuration and command line
# ---------------------------------------------------------------------------
#: Keys of every evaluation (linear probe, finetuning); each adds its own.
EVAL_SPEC = {
    "eval.checkpoint": setting("", "pretraining checkpoint of any method of this repository (required)"),
    "eval.which": setting("auto", "weights to evaluate: auto (the teacher where the method has one, as DINO), teacher, student",
                        ["auto", "teacher", "student"]),
    "eval.protocol": setting("", "set by --protocol (the protocol's YAML in configs/ is the first config layer)"),
    "eval.output": setting("", "results JSON (default: <run.output_dir>/results.json)"),
    "run.output_dir": setting("", "folder for config.yaml, log.jsonl, checkpoint.pth and results.json "
                                "(default: <checkpoint folder>/eval/<evaluation>_<dataset>)"),
    "run.seed": setting(0, "seed of the head initialisation, data order and augmentations", range="[0, inf)"),
    "run.log_every": setting(50, "write a JSON line and a console progress line every K steps", range="[1, inf)"),
    "run.eval_every": setting(1, "test every K epochs (the last epoch always)", range="[1, inf)"),
    "data.dataset": setting("", "dataset to train and test on: cifar10, cifar100, tiny-imagenet-100, imagenet, imagefolder, "
                              "flowers102, food101, inat21, inat21-mini (default: the checkpoint's pretraining dataset)"),
    "data.data_dir": setting(None, "data root (default: env HVS_DATA_DIR, else the checkpoint's)"),
    "data.train_subset": setting(0, "train on a class-stratified subset: N images (int) or a fraction (float); 0: all", type="number", range="[0, inf)"),
    "data.test_subset": setting(0, "test on a class-stratified subset: N images or a fraction; 0: all", type="number", range="[0, inf)"),
    "data.image_size": setting(0, "input size of the backbone (0: the checkpoint's training crop size); images of "
                                "every dataset are resized to it", range="[0, inf)"),
    "data.num_workers": setting(2, "DataLoader worker processes per rank", range="[0, inf)"),
    "data.download": setting(False, "let torchvision download the dataset where a network exists"),
    "train.epochs": setting(100, "number of epochs", range="[1, inf)"),
    "train.batch_size": setting(256, "global batch size (split evenly over ranks)", range="[1, inf)"),
    # the same meaning as in pretraining: one declaration
    **{key: COMMON_SPEC[key] for key in ("run.device", "run.ckpt_every_steps", "run.stop_after_steps", "train.amp", "train.tf32")},
}

#: command-line flags that stand for config keys
SHORTCUTS = {"--checkpoint": "eval.checkpoint", "--which": "eval.which", "--dataset": "data.dataset",
             "--data-dir": "data.data_dir",
             "--output-dir": "run.output_dir", "--output": "eval.output"}


class EvalError(RuntimeError):
    """A problem the user can fix (bad value, wrong checkpoint); the message says which."""


def parse_eval_args(spec: dict, description: str, protocols: dict, auto_protocol: Callable[[dict], str],
                    argv=None) -> tuple[dict, nn.Module, dict]:
    """Command line of an evaluation.  The config is layered: ``spec``'s
    defaults <- the protocol's YAML (``protocols[name]``, chosen by
    ``--protocol`` or, with ``auto``, by ``auto_protocol(checkpoint)`` from the
    checkpoint's method and arch) <- each ``--config`` <- ``key=value``
    overrides.  Returns ``(cfg, backbone, info)`` (see
    :func:`common.engine.checkpoint.load_backbone`; a ViT gets the config's
    ``model.drop_path`` where there is one)."""
    parser = build_parser(spec, description, SHORTCUTS)
    parser.add_argument("--protocol", default="auto", choices=["auto", *protocols],
                        help="the protocol's YAML is the first config layer (auto: chosen from the checkpoint's "
                             "method and backbone; files: " + ", ".join(
                                 f"{k} = configs/{Path(v).name}" for k, v in protocols.items()) + ")")
    args = parser.parse_intermixed_args(argv)
    overrides = overrides_of(args, SHORTCUTS)
    try:
        path = resolve(spec, args.config, overrides)["eval"]["checkpoint"]
        if not path:
            raise ConfigError("no checkpoint given: pass --checkpoint PATH (a checkpoint.pth of this repository)")
        if not Path(path).exists():  # checked before a job is queued: the checkpoint may be written by then
            stop_if_checking()
        protocol = args.protocol if args.protocol != "auto" else auto_protocol(ckpt_io.load(path))
        cfg = resolve(spec, [protocols[protocol], *args.config], overrides)
        cfg["eval"]["protocol"] = protocol
        drop_path = cfg["model"]["drop_path"] if "model" in cfg else 0.0
        backbone, info = ckpt_io.load_backbone(path, which=cfg["eval"]["which"], drop_path=drop_path)
    except (ConfigError, ckpt_io.CheckpointError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    stop_if_checking()
    return cfg, backbone, info


def resolve_run(cfg: dict, info: dict, name: str) -> dict:
    """Fill the defaults that depend on the checkpoint: dataset, data root,
    image size, output folder (``<checkpoint folder>/eval/<name>_<dataset>``)."""
    d = cfg["data"]
    d["dataset"] = d["dataset"] or info["dataset"]
    d["data_dir"] = data_dir_or_default(d["data_dir"], info.get("data_dir"))
    d["image_size"] = int(d["image_size"] or info["image_size"])
    if not cfg["run"]["output_dir"]:
        cfg["run"]["output_dir"] = str(Path(cfg["eval"]["checkpoint"]).parent / "eval" / f"{name}_{d['dataset']}")
    if not cfg["eval"]["output"]:
        cfg["eval"]["output"] = str(Path(cfg["run"]["output_dir"]) / "results.json")
    return cfg


# ---------------------------------------------------------------------------
# 2. data
# ---------------------------------------------------------------------------
def targets_of(dataset) -> list:
    """Labels of a dataset or of a :class:`~torch.utils.data.Subset` of one."""
    if isinstance(dataset, Subset):
        inner = targets_of(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(dataset.targets)


def eval_datasets(cfg: dict, train_transform: Callable | None, test_transform: Callable):
    """``(train, test, number of classes)``: the training split (PIL images, or
    transformed by ``train_transform``) and the test split (``test_transform``),
    with the configured class-stratified subsets."""
    d = cfg["data"]
    train = build_dataset(d["dataset"], "train", d["data_dir"], transform=train_transform, download=d["download"])
    test = build_dataset(d["dataset"], "val", d["data_dir"], transform=test_transform, download=d["download"])
    classes = num_classes(train)
    if d["train_subset"]:
        train = Subset(train, subset_indices(targets_of(train), d["train_subset"], SUBSET_SEED))
    if d["test_subset"]:
        test = Subset(test, subset_indices(targets_of(test), d["test_subset"], SUBSET_SEED))
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"dataset {d['dataset']!r} under {d['data_dir']} has an empty train or test split")
    return train, test, classes


class ImageBatches:
    """Batches ``(images, labels)`` of a dataset.  ``shuffle``: the
    :class:`~common.engine.train.EpochSampler` order of the run's seed, split over the
    ranks, every sample seen (the last batch may be smaller); otherwise the
    rank's share ``rank::world`` in order (for testing: no sample twice)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0, pin: bool = False):
        self.dataset, self.bs, self.workers, self.pin = dataset, batch_size, num_workers, pin
        self.sampler = None
        if shuffle:
            self.sampler = EpochSampler(len(dataset), batch_size, seed, dist.rank(), dist.world(), drop_last=False)
        else:
            self.dataset = Subset(dataset, range(dist.rank(), len(dataset), dist.world()))
        self.batches = self.sampler.batches if shuffle else math.ceil(len(self.dataset) / batch_size)

    def epoch(self, epoch: int = 0, skip: int = 0):
        if self.sampler is not None:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            self.sampler.set_epoch(epoch, skip_batches=skip)
        return DataLoader(self.dataset, batch_size=self.bs, sampler=self.sampler, shuffle=False,
                          num_workers=self.workers, pin_memory=self.pin, drop_last=False)


def image_data(cfg: dict, train_transform: Callable, device: torch.device):
    """``(train batches, test batches, sizes)`` of the evaluation dataset: the
    training images augmented by ``train_transform`` seeded per (seed, epoch,
    image), the test images resized and centre-cropped; ``sizes`` holds
    n_train, n_test and num_classes."""
    seed, workers, pin = int(cfg["run"]["seed"]), cfg["data"]["num_workers"], device.type == "cuda"
    per_rank = cfg["train"]["batch_size"] // dist.world()
    train, test, classes = eval_datasets(cfg, None, eval_transform(cfg["data"]["image_size"]))
    train = SeededDataset(train, train_transform, seed)
    return (ImageBatches(train, per_rank, seed, True, workers, pin),
            ImageBatches(test, per_rank, shuffle=False, num_workers=workers, pin=pin),
            {"n_train": len(train), "n_test": len(test), "num_classes": classes})


class TensorBatches:
    """The same batches as :class:`ImageBatches`, from tensors already in memory
    (cached features): the same sample order for the same seed and size."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int = 0, shuffle: bool = True):
        self.x, self.y, self.bs = x, y, batch_size
        self.sampler = EpochSampler(len(x), batch_size, seed, drop_last=False) if shuffle else None
        self.batches = self.sampler.batches if shuffle else math.ceil(len(x) / batch_size)

    def epoch(self, epoch: int = 0, skip: int = 0):
        if self.sampler is None:
            order = torch.arange(len(self.x))
        else:
            self.sampler.set_epoch(epoch, skip_batches=skip)
            order = torch.tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(order), self.bs):
            idx = order[start:start + self.bs]
            yield self.x[idx], self.y[idx]


# ---------------------------------------------------------------------------
# 3. the loop
# ---------------------------------------------------------------------------
def heads_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(sum over heads of each head's mean cross-entropy, per-head means [H])``
    for logits ``[H, B, C]``: the sum gives every head the gradient of its own loss."""
    per_head = torch.stack([F.cross_entropy(h.float(), targets, label_smoothing=label_smoothing) for h in logits])
    return per_head.sum(), per_head.detach()


def topk_correct(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Per head, the number of samples whose class is first (top-1) and among
    the first ``min(5, C)`` (top-5): two ``[H]`` tensors, for logits ``[H, B, C]``."""
    k = min(5, logits.shape[-1])
    hits = logits.topk(k, dim=-1).indices == targets[None, :, None]  # [H, B, k]
    return hits[..., 0].sum(1), hits.any(-1).sum(1)


class Trainer:
    """Trains ``model`` (the parameters the optimizer holds: heads, or backbone
    and head) and tests it after epochs.

    ``forward(net, images) -> logits [H, B, C]`` where ``net`` is ``model``, or
    its DDP wrapper under torchrun.  ``schedule(optimizer, epoch, it, iters)``
    sets the learning rates of a step and returns values to log.  With
    ``out``, the run writes ``log.jsonl`` and ``checkpoint.pth`` there and a
    re-run resumes from it; ``identity`` (what is being evaluated: source
    checkpoint fingerprint, evaluation kind) must match to resume."""

    def __init__(self, cfg: dict, model: nn.Module, forward: Callable, optimizer: torch.optim.Optimizer,
                 schedule: Callable, device: torch.device, *, out: Path | None = None, identity: dict | None = None,
                 label_smoothing: float = 0.0, head_names: Sequence[str] | None = None, verbose: bool = True):
        self.cfg, self.model, self.forward, self.optimizer = cfg, model, forward, optimizer
        self.schedule, self.device, self.out = schedule, device, out
        self.identity, self.label_smoothing = identity or {}, label_smoothing
        self.head_names, self.verbose = head_names, verbose and dist.is_main()
        self.autocast, self.scaler = amp_settings(cfg, device)
        self.net = model
        if dist.is_dist() and any(p.requires_grad for p in model.parameters()):
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

    # --- testing -----------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, batches) -> list[dict]:
        """Top-1, top-5 (%) and mean loss of every head on all test batches (summed over ranks)."""
        self.model.eval()
        sums = None
        for images, targets in batches.epoch():
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.forward(self.model, images)
            losses = torch.stack([F.cross_entropy(h.float(), targets, reduction="sum") for h in logits])
            top1, top5 = topk_correct(logits, targets)
            batch = torch.stack([top1.double(), top5.double(), losses.double()])  # [3, H]
            batch = torch.cat([batch.flatten(), batch.new_tensor([len(targets)])])
            sums = batch if sums is None else sums + batch
        if sums is None:
            raise EvalError("the test set yielded no batch")
        if dist.is_dist():
            torch.distributed.all_reduce(sums)
        n, per = sums[-1].item(), sums[:-1].view(3, -1).cpu()
        return [{"top1": 100.0 * per[0, h].item() / n, "top5": 100.0 * per[1, h].item() / n,
                 "loss": per[2, h].item() / n} for h in range(per.shape[1])]

    # --- checkpoints --------------------------------------------------------------
    def _save(self, epoch: int, step: int, history: list, loop: dict) -> None:
        if dist.is_main():
            ckpt_io.save_atomic({
                "format": EVAL_FORMAT, **self.identity, "config": self.cfg, "epoch": epoch, "step": step,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": history, "loop": loop, "rng": ckpt_io.rng_state(),
            }, self.out / "checkpoint.pth")
        dist.barrier()

    def _resume(self) -> tuple[int, int, list, dict]:
        path = None if self.out is None else self.out / "checkpoint.pth"
        if path is None or not path.exists():
            return 0, 0, [], {}
        state = ckpt_io.load(path, fmt=EVAL_FORMAT)
        for key, value in self.identity.items():
            if state.get(key) != value:
                raise ckpt_io.CheckpointError(
                    f"{path} belongs to another evaluation ({key} {state.get(key)!r}, this run {value!r}): "
                    "use another run.output_dir, or delete that folder to start again")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        ckpt_io.set_rng_state(state["rng"])
        if self.verbose:
            print(f"resumed from {path}: epoch {state['epoch']}, step {state['step']}", file=sys.stderr, flush=True)
            warn_config_changes(state["config"], self.cfg)
        return state["epoch"], state["step"], list(state["history"]), dict(state.get("loop") or {})

    # --- training -------------------------------------------------------------------
    def fit(self, train, test, epochs: int) -> tuple[list, bool]:
        """Train for ``epochs`` (resuming if a checkpoint is there); returns
        ``(history, finished)``: one row per finished epoch (``train_loss``, and
        ``heads``: the test metrics of every head where tested), and whether the
        run reached its last epoch (False after ``run.stop_after_steps``)."""
        r = self.cfg["run"]
        seed, iters = int(r["seed"]), train.batches
        start_epoch, step, history, loop = self._resume()
        total = epochs * iters
        log = JsonLog(self.out / "log.jsonl", resume_step=step, enabled=dist.is_main()) if self.out else None
        progress = Progress(total, start=step, enabled=self.verbose)
        log_every, eval_every = max(1, int(r["log_every"])), max(1, int(r["eval_every"]))
        ckpt_every, stop_after = int(r["ckpt_every_steps"]), int(r["stop_after_steps"])
        for epoch in range(start_epoch, epochs):
            done = step - epoch * iters
            self.model.train()
            loss_sum = torch.zeros((), device=self.device) + (loop.get("loss_sum", 0.0) if done else 0.0)
            n, t_epoch = (int(loop.get("n", 0)) if done else 0), time.time()
            for it, (images, targets) in enumerate(train.epoch(epoch, done), start=done):
                sched = self.schedule(self.optimizer, epoch, it, iters)
                torch.manual_seed(step_seed(seed, step) + 1)  # stochastic depth, as the training loop
                images = images.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                with self.autocast():
                    logits = self.forward(self.net, images)
                loss, per_head = heads_cross_entropy(logits, targets, self.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    loss.backward()
                    self.optimizer.step()
                finite = torch.isfinite(per_head)  # in a sweep, a diverging rate leaves the other heads alone
                loss_sum += torch.where(finite, per_head, 0.0).sum() / finite.sum().clamp(min=1)  # no host sync
                n, step = n + 1, step + 1
                if step % log_every == 0 or it + 1 == iters:
                    if not finite.any():
                        raise Diverged(f"training diverged: the loss is {per_head.tolist()} at epoch {epoch} "
                                       f"step {step}; the last checkpoint in {self.out} is left as it was")
                    value = per_head[finite].mean().item()
                    extra = {"diverged_heads": int((~finite).sum())} if not finite.all() else {}
                    if log:
                        log.write(type="step", epoch=epoch, step=step, loss=value, **sched, **extra)
                    progress.print(step, f"epoch {epoch + 1}/{epochs} it {it + 1}/{iters} loss {value:.4f}")
                if self.out and it + 1 < iters and ((ckpt_every and step % ckpt_every == 0) or step == stop_after):
                    self._save(epoch, step, history, {"loss_sum": dist.all_reduce_mean(loss_sum).item(), "n": n})
                if step == stop_after:
                    break
            if step - epoch * iters < iters:  # stopped inside the epoch
                if self.verbose:
                    print(f"stopped after step {step} (run.stop_after_steps): re-run to resume", file=sys.stderr)
                return history, False
            row = {"epoch": epoch, "step": step, "train_loss": (dist.all_reduce_mean(loss_sum) / max(1, n)).item(),
                   "time": time.time() - t_epoch}
            if (epoch + 1) % eval_every == 0 or epoch + 1 == epochs:
                row["heads"] = self.evaluate(test)
            history.append(row)
            if log:
                log.write(type="epoch", **row)
            if self.verbose:
                print(f"epoch {epoch + 1}/{epochs} ({fmt_time(row['time'])}): train loss {row['train_loss']:.4f}"
                      + (f", test {describe(row['heads'], self.head_names)}" if "heads" in row else ""),
                      file=sys.stderr, flush=True)
            if self.out:
                self._save(epoch + 1, step, history, {})
            if step == stop_after and epoch + 1 < epochs:
                return history, False
        return history, True


def describe(heads: list, names: Sequence[str] | None = None) -> str:
    if len(heads) == 1:
        return f"top-1 {heads[0]['top1']:.2f} top-5 {heads[0]['top5']:.2f}"
    names = names or [str(h) for h in range(len(heads))]
    return ", ".join(f"{name}: top-1 {h['top1']:.2f}" for name, h in zip(names, heads))


# ---------------------------------------------------------------------------
# 4. results
# ---------------------------------------------------------------------------
def epoch_results(history: list, head: int = 0) -> dict:
    """The reported numbers of one head: the last epoch's top-1 / top-5, and
    beside them, labelled, the best tested epoch (what DINO's code reports;
    chosen on the test set, so not a fair number on its own)."""
    tested = [(row["epoch"], row["heads"][head]) for row in history if "heads" in row]
    if not tested:
        raise EvalError("no epoch was tested")
    last_epoch, last = tested[-1]
    best_epoch, best = max(tested, key=lambda t: (t[1]["top1"], -t[0]))
    return {"top1": last["top1"], "top5": last["top5"], "epoch": last_epoch + 1,
            "best_epoch": {"epoch": best_epoch + 1, "top1": best["top1"], "top5": best["top5"],
                           "note": "best epoch on the test set (DINO's code reports this); the reported "
                                   "numbers are the last epoch's"},
            "history": [{"epoch": e + 1, "top1": h["top1"], "top5": h["top5"]} for e, h in tested],
            "train_loss": [row["train_loss"] for row in history]}


def source_info(info: dict, cfg: dict) -> dict:
    """What a results file says about the evaluated checkpoint."""
    return {"checkpoint": cfg["eval"]["checkpoint"], "method": info["method"], "arch": info["arch"],
            "hvs": info["hvs"], "which": info["which"], "pretrain_dataset": info["dataset"],
            "pretrain_epochs": info["epoch"], "fingerprint": info["fingerprint"]}


def finish(cfg: dict, info: dict, history: list, sizes: dict, started: float, **fields) -> dict:
    """The results of a run (``{}`` if it stopped early, ``run.stop_after_steps``):
    what was evaluated, the settings, ``sizes`` (n_train, ...), ``fields``, and
    the accuracy (:func:`epoch_results`); written and printed."""
    if not sizes.pop("finished"):
        return {}
    results = {**fields, "protocol": cfg["eval"]["protocol"], **source_info(info, cfg),
               "dataset": cfg["data"]["dataset"], "image_size": cfg["data"]["image_size"],
               "batch_size": cfg["train"]["batch_size"], "epochs": cfg["train"]["epochs"], **sizes,
               **epoch_results(history), "time_s": round(time.time() - started, 1)}
    write_results(cfg, results)
    if dist.is_main():
        best = results["best_epoch"]
        print(f"top-1 {results['top1']:.2f}  top-5 {results['top5']:.2f} (last epoch; best epoch {best['epoch']}: "
              f"{best['top1']:.2f}) -> {cfg['eval']['output']}")
    return results


def write_results(cfg: dict, results: dict) -> None:
    """``results.json`` in the run folder, and the same at ``eval.output``."""
    if not dist.is_main():
        return
    text = json.dumps(results, indent=2)
    out = Path(cfg["run"]["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    for path in {out / "results.json", Path(cfg["eval"]["output"])}:
        ckpt_io.write_text_atomic(path, text)


@contextmanager
def eval_session(cfg: dict, info: dict):
    """Set up an evaluation run (:func:`common.engine.runtime.run_session`: process
    group, device, the locked run folder, seeds) and write its
    ``config.yaml``, after checking that a checkpoint already in the folder is
    an evaluation of the same weights.  Yields ``(device, run folder)``."""
    if cfg["train"]["batch_size"] % dist.world():
        raise EvalError(f"train.batch_size={cfg['train']['batch_size']} is not divisible by the {dist.world()} ranks")
    with run_session(cfg) as (device, run_dir):
        existing = run_dir.path / "checkpoint.pth"
        if existing.exists():
            state = ckpt_io.load(existing, fmt=EVAL_FORMAT)
            if state.get("source") != info["fingerprint"]:
                raise ckpt_io.CheckpointError(
                    f"{existing} is an evaluation of other weights than {cfg['eval']['checkpoint']}: "
                    "use another run.output_dir, or delete that folder to start again")
        if dist.is_main() and (run_dir.path / "log.jsonl").exists():
            read_rows(run_dir.path / "log.jsonl")  # a damaged log is refused before config.yaml is written
        run_dir.write_config(cfg)
        yield device, run_dir.path


def run_main(name: str, body: Callable[[], dict]) -> dict:
    """Run an evaluation's body; user-fixable errors end the process with
    status 2 and one line naming the problem (:func:`common.engine.runtime.exit_on_error`)."""
    return exit_on_error(name, body, (EvalError,))
