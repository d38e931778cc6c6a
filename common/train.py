"""The shared training loop of every method, with and without HVS.

Runs as one process (CPU or GPU) or under torchrun (DDP: gloo on CPU, NCCL on
GPU, one or several nodes).  Reads top to bottom:

  1. set-up: distributed, seeds, output folder, resolved config
  2. data: multi-view dataset (N candidates per crop slot), per-epoch sampler
  3. model, optimizer, mixed precision, resume from ``checkpoint.pth``
  4. the loop: candidates -> selector -> method loss -> optimizer -> method hooks
  5. checkpoints (atomic) and logs (JSON lines, console ETA, selection log)
"""
from __future__ import annotations

import math
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from common import checkpoint as ckpt_io
from common import dist
from common.augment import PARAM_NAMES, MultiViewDataset, box_iou
from common.config import COMMON_SPEC, ConfigError, dump, flatten, parse_args
from common.data import DataError, build_dataset, subset_indices
from common.hvs import HardViewSelector
from common.logs import JsonLog, Progress, SelectionLog, fmt_time


# ----------------------------------------------------------------------------
# data order
# ----------------------------------------------------------------------------
class EpochSampler(Sampler):
    """A seeded permutation per epoch, split over ranks.  ``drop_last`` (the
    training default) keeps whole batches only; without it every sample is
    seen and the last batch of a rank may be smaller (the permutation is padded
    with its own start so that every rank gets as many samples).
    ``set_epoch(e, skip_batches=k)`` starts the epoch after its first k batches
    (resuming a run stopped inside an epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 drop_last: bool = True):
        self.n, self.bs, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.drop_last = drop_last
        if drop_last:
            self.batches = n // (batch_size * world)
            self.per_rank = self.batches * batch_size
        else:
            self.per_rank = math.ceil(n / world)
            self.batches = math.ceil(self.per_rank / batch_size)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        total = self.per_rank * self.world
        perm = perm[:total] if self.drop_last else torch.cat([perm, perm[: total - self.n]])
        mine = perm[self.rank:: self.world]
        return iter(mine[self.skip * self.bs:].tolist())

    def __len__(self) -> int:
        return max(0, self.per_rank - self.skip * self.bs)


def build_train_data(cfg: dict, method, per_rank_batch: int):
    d = cfg["data"]
    base = build_dataset(d["dataset"], "train", d["data_dir"], download=d["download"])
    if d["subset"]:
        base = torch.utils.data.Subset(base, subset_indices(base.targets, d["subset"], cfg["run"]["seed"]))
    dataset = MultiViewDataset(base, method.view_transform(cfg["hvs"]["enabled"]), seed=cfg["run"]["seed"])
    if len(dataset) < per_rank_batch * dist.world():
        raise ValueError(f"the training set has {len(dataset)} images, fewer than one global batch "
                         f"({per_rank_batch * dist.world()}): lower train.batch_size or data.subset")
    sampler = EpochSampler(len(dataset), per_rank_batch, cfg["run"]["seed"], dist.rank(), dist.world())
    return dataset, sampler


def make_loader(dataset, sampler, batch_size, num_workers, pin):
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=pin, persistent_workers=False)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def amp_settings(cfg, device):
    """(autocast context factory, GradScaler or None)."""
    mode = cfg["train"]["amp"]
    if device.type != "cuda" or mode == "off":
        return nullcontext, None
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def selection_stats(sel, params, baseline_row) -> dict:
    """Statistics of the chosen combinations for the step log (on CPU; logged
    steps only).  ``baseline_row`` [S] is the combination the baseline trains on
    (the first candidates of every pool: ``HardViewSelector.all_combos[0]``)."""
    indices, combos = sel.indices.cpu(), sel.combos.cpu()
    out = {"sel_changed": (indices != baseline_row).any(1).float().mean().item()}
    if sel.scores is not None:
        out["sel_score"] = sel.chosen_scores.mean().item()
        out["sel_score_all"] = sel.scores.mean().item()
    if indices.shape[1] >= 2:  # IoU of the first two slots (the pair; DINO's two global crops)
        rows = torch.arange(len(params))
        iou_chosen = box_iou(params[rows, indices[:, 0]], params[rows, indices[:, 1]])
        iou_all = box_iou(params[:, combos[:, 0]], params[:, combos[:, 1]])
        out["sel_iou"] = iou_chosen.mean().item()
        out["sel_iou_all"] = iou_all.mean().item()
        out["sel_lowest_iou"] = (iou_chosen <= iou_all.min(1).values).float().mean().item()
    return out


def setup_run(cfg: dict) -> tuple[torch.device, Path]:
    """Process group and device, the output folder with the resolved
    ``config.yaml`` (written by rank 0), and the global seeds."""
    device = dist.init(cfg["run"]["device"])
    out = Path(cfg["run"]["output_dir"])
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        dump(cfg, out / "config.yaml")
    dist.barrier()
    seed_everything(int(cfg["run"]["seed"]))
    return device, out


def step_seed(seed: int, step: int) -> int:
    """Seed of a step's randomness on this rank: a function of the step, so that
    a resumed run draws what an uninterrupted one draws."""
    return seed * 1_000_003 + step * 101 + dist.rank()


def warn_config_changes(old: dict, new: dict) -> None:
    """Tell a resumed run which config keys changed since its checkpoint."""
    changed = config_changes(old, new)
    if changed:
        print(f"warning: the config differs from the checkpoint's in {', '.join(changed)}: "
              "the resumed run follows the new values", file=sys.stderr, flush=True)


def config_changes(old: dict, new: dict, ignore=("run.stop_after_steps",)) -> list:
    """Keys whose values differ between two resolved configs, e.g. ``["train.epochs: 2 -> 4"]``."""
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k) != b.get(k)]


def save_checkpoint(path, method, model_state, optimizer, scaler, cfg, epoch, step, loop=None):
    """``loop``: the loop's running sums inside an epoch (for its mean loss)."""
    ckpt_io.save_atomic({
        "format": ckpt_io.FORMAT, "method": method.name, "arch": method.arch(cfg), "config": cfg,
        "epoch": epoch, "step": step, "model": model_state, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "method_state": method.state_dict(), "rng": ckpt_io.rng_state(), "loop": loop or {},
    }, path)


class StepContext:
    """Everything one training step needs besides the batch."""

    def __init__(self, method, model, ddp_model, optimizer, autocast, scaler, selector, device):
        self.method, self.model, self.ddp_model, self.optimizer = method, model, ddp_model, optimizer
        self.autocast, self.scaler, self.selector, self.device = autocast, scaler, selector, device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def train_step(ctx: StepContext, candidates, epoch, it, iters, generator=None, time_selection=False):
    """One optimisation step: [selection ->] the method's loss on the chosen views
    -> backward -> clip -> step -> method hooks.  Returns (loss, stats, selection,
    selection seconds); with ``time_selection`` the selection is timed between
    CUDA synchronisations (otherwise no synchronisation is added)."""
    method, model = ctx.method, ctx.model
    sel, sel_time = None, 0.0
    with ctx.autocast():
        views = candidates
        if ctx.selector is not None:
            if time_selection:
                ctx.sync()
            t0 = time.perf_counter()
            sel = ctx.selector(candidates, model, lambda c: method.candidate_outputs(model, c),
                               method.combination_scores, generator)
            if time_selection:
                ctx.sync()
            sel_time, views = time.perf_counter() - t0, sel.views
        loss, stats = method.training_loss(ctx.ddp_model, views, sel)
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.unscale_(ctx.optimizer)
    else:
        loss.backward()
    if method.clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), method.clip_grad)
    method.before_optimizer_step(model, epoch)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    method.after_step(epoch, it, iters)
    return loss, stats, sel, sel_time


# ----------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------
def run(cfg: dict, method_cls) -> Path:
    """Train (or resume) the run described by ``cfg``; returns the checkpoint path."""
    # 1. set-up ----------------------------------------------------------------
    device, out = setup_run(cfg)
    seed = int(cfg["run"]["seed"])
    main = dist.is_main()

    global_batch = int(cfg["train"]["batch_size"])
    if global_batch % dist.world():
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {dist.world()} ranks")
    per_rank = global_batch // dist.world()

    method = method_cls(cfg, device)

    # 2. data ------------------------------------------------------------------
    dataset, sampler = build_train_data(cfg, method, per_rank)
    iters = sampler.batches
    if cfg["run"]["max_steps_per_epoch"]:
        iters = min(iters, int(cfg["run"]["max_steps_per_epoch"]))
    epochs = int(cfg["train"]["epochs"])

    # 3. model, optimizer, precision, resume -------------------------------------
    model = method.model.to(device)
    if dist.is_dist() and device.type == "cuda" and cfg["train"]["sync_bn"]:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        method.model = model
    optimizer = method.build_optimizer(global_batch)
    autocast, scaler = amp_settings(cfg, device)
    ddp_model = model
    if dist.is_dist():
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    selector = None
    if cfg["hvs"]["enabled"]:
        h = cfg["hvs"]
        selector = HardViewSelector(method.pools(), mode=h["mode"], max_combinations=h["max_combinations"],
                                    resolution=h["resolution"], bn_mode=h["bn_mode"],
                                    size_multiple=method.size_multiple)

    ctx = StepContext(method, model, ddp_model, optimizer, autocast, scaler, selector, device)
    ckpt_path = out / "checkpoint.pth"
    start_epoch, step, loop_state = 0, 0, {}
    if ckpt_path.exists():
        state = ckpt_io.load(ckpt_path, expect_method=method.name, expect_arch=method.arch(cfg))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        method.load_state_dict(state["method_state"])
        ckpt_io.set_rng_state(state["rng"])
        start_epoch, step, loop_state = state["epoch"], state["step"], state.get("loop", {})
        if main:
            print(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}", flush=True)
            warn_config_changes(state["config"], cfg)

    log = JsonLog(out / "log.jsonl", resume_step=step, enabled=main)
    sel_log = SelectionLog(out / "selection", dist.rank(), PARAM_NAMES)
    total = epochs * iters
    progress = Progress(total, start=step, enabled=main)
    log_every = max(1, int(cfg["run"]["log_every"]))
    sel_every = int(cfg["run"]["selection_log_every"])
    ckpt_every = int(cfg["run"]["ckpt_every_steps"])
    stop_after = int(cfg["run"]["stop_after_steps"])

    def checkpoint(epoch_done, loop=None):
        sel_log.flush()
        if main:
            save_checkpoint(ckpt_path, method, model.state_dict(), optimizer, scaler, cfg, epoch_done, step, loop)
        dist.barrier()

    # 4. the loop ----------------------------------------------------------------
    model.train()
    t_interval, last_logged = time.time(), step
    for epoch in range(start_epoch, epochs):
        done_in_epoch = step - epoch * iters
        if done_in_epoch >= iters:
            continue
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip_batches=done_in_epoch)
        loader = make_loader(dataset, sampler, per_rank, int(cfg["data"]["num_workers"]), device.type == "cuda")
        epoch_loss, epoch_n, t_epoch = torch.zeros((), device=device), 0, time.time()
        if done_in_epoch and loop_state:  # resumed inside this epoch: the sums of its first steps
            epoch_loss += loop_state["epoch_loss"]
            epoch_n = int(loop_state["epoch_n"])
        for it, (candidates, params, _labels, index) in enumerate(loader, start=done_in_epoch):
            if it >= iters:
                break
            candidates = [c.to(device, non_blocking=True) for c in candidates]
            sched = method.schedule(optimizer, epoch, it, iters)
            timed = step % log_every == 0
            gen = torch.Generator().manual_seed(step_seed(seed, step))  # cap subset, random mode
            torch.manual_seed(step_seed(seed, step) + 1)  # stochastic depth etc.: resume is exact
            loss, stats, sel, sel_time = train_step(ctx, candidates, epoch, it, iters, gen, time_selection=timed)
            epoch_loss += loss.detach()
            epoch_n += 1
            step += 1

            # 5. logs and checkpoints ----------------------------------------------
            if sel is not None and sel_every and (step - 1) % sel_every == 0:
                sel_log.add(step - 1, index, params, sel)
            if timed:
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at epoch {epoch} step {step}: stopping")
                now = time.time()
                row = {"type": "step", "epoch": epoch, "step": step, "loss": loss_value,
                       "step_time": (now - t_interval) / (step - last_logged), **sched,
                       **{k: float(v) for k, v in stats.items()}}
                t_interval, last_logged = now, step
                if sel is not None:
                    row.update(sel_time=sel_time, **selection_stats(sel, params, selector.all_combos[0]))
                log.write(**row)
                progress.print(step, f"epoch {epoch + 1}/{epochs} it {it + 1}/{iters} loss {loss_value:.4f} "
                               f"lr {sched.get('lr', 0):.4g}" + (f" sel {sel_time:.3f}s" if sel else ""))
            if it + 1 < iters and ((ckpt_every and step % ckpt_every == 0) or step == stop_after):
                checkpoint(epoch, {"epoch_loss": dist.all_reduce_mean(epoch_loss).item(), "epoch_n": epoch_n})
            if step == stop_after:
                break
        if step - epoch * iters >= iters:  # the epoch is complete
            mean_loss = (dist.all_reduce_mean(epoch_loss) / max(1, epoch_n)).item()
            log.write(type="epoch", epoch=epoch, step=step, loss=mean_loss, time=time.time() - t_epoch)
            if main:
                print(f"epoch {epoch + 1}/{epochs} done: mean loss {mean_loss:.4f}, "
                      f"{fmt_time(time.time() - t_epoch)}", flush=True)
            checkpoint(epoch + 1)
        if step == stop_after:
            if main:
                print(f"stopped after step {step} (run.stop_after_steps): re-run to resume", flush=True)
            break
    dist.barrier()
    return ckpt_path


def main(method_cls, argv=None) -> None:
    spec = {**COMMON_SPEC, **method_cls.spec}
    cfg = parse_args(spec, method_cls.__doc__ or method_cls.name, argv)
    cfg["method"] = method_cls.name
    try:
        run(cfg, method_cls)
    except (DataError, ckpt_io.CheckpointError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        dist.cleanup()
