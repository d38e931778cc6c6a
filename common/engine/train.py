"""The shared training loop of every method, with and without HVS.

Runs as one process (CPU or GPU) or under torchrun (DDP: gloo on CPU, NCCL on
GPU, one or several nodes).  Reads top to bottom:

  1. set-up (``common.engine.runtime``): process group, the locked run folder, seeds
  2. :func:`build`: the view pipeline (``common.views.pipeline``) and its
     multi-view dataset (N candidates per crop slot), sampler, model,
     optimizer, mixed precision, selector
  3. :func:`resume` from ``checkpoint.pth`` (checked against the run first)
  4. :func:`train_one_epoch`: candidates -> selector -> method loss ->
     optimizer -> method hooks (:func:`train_step`), every loss watched for
     divergence; logs (JSON lines, console ETA, selection log)
  5. :func:`checkpoint`: atomic, never of non-finite weights
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from common.engine import checkpoint as ckpt_io
from common.engine import dist
from common.views.augment import P, PARAM_NAMES, box_iou, collate
from common.engine.config import COMMON_SPEC, ConfigError, entry_point, parse_args
from common.views.data import DataError, build_dataset, in_memory, subset_indices
from common.hvs import HardViewSelector, selection_dtype
from common.engine.logs import JsonLog, Progress, SelectionLog, fmt_time
from common.engine.memory_format import model_channels_last, use_channels_last
from common.engine.method import SSLMethod, StepInfo
from common.views.pipeline import ViewBatch, ViewPipeline
from common.engine.runtime import (DivergenceGuard, EpochSampler, amp_settings, check_same_shapes, compile_backbones,
                            exit_on_error, run_session, step_seed, warn_config_changes)


def steps_per_epoch(cfg: dict, n_images: int, per_rank_batch: int) -> int:
    """Training steps of an epoch: the sampler's batches per rank, at most ``run.max_steps_per_epoch``."""
    iters = EpochSampler.count_batches(n_images, per_rank_batch, dist.world())
    if cfg["run"]["max_steps_per_epoch"]:
        iters = min(iters, int(cfg["run"]["max_steps_per_epoch"]))
    return iters


def build_train_data(cfg: dict, method, per_rank_batch: int):
    """``(pipeline, dataset, sampler, iters)``: the run's view pipeline, its
    multi-view dataset, the sampler and the training steps of an epoch."""
    d = cfg["data"]
    base = build_dataset(d["dataset"], "train", d["data_dir"], download=d["download"])
    if d["subset"]:
        base = torch.utils.data.Subset(base, subset_indices(base.targets, d["subset"], cfg["run"]["seed"]))
    iters = steps_per_epoch(cfg, len(base), per_rank_batch)
    # the IoU policy's schedule runs over the training steps, which the sampler tags the samples with
    pipeline = ViewPipeline.from_cfg(cfg, method, total_steps=int(cfg["train"]["epochs"]) * iters)
    if len(base) < per_rank_batch * dist.world():
        raise DataError(f"the training set ({d['dataset']} under {base_root(base)}) has {len(base)} images, "
                        f"fewer than one global batch of train.batch_size={per_rank_batch * dist.world()}: "
                        "lower train.batch_size or raise data.subset")
    # decoded once, here (data.in_memory), after every check of the config and the data's size
    dataset = pipeline.dataset(in_memory(base, d["in_memory"], d["dataset"]), seed=cfg["run"]["seed"])
    sampler = EpochSampler(len(dataset), per_rank_batch, cfg["run"]["seed"], dist.rank(), dist.world(),
                           tag_steps=pipeline.policy is not None, steps_per_epoch=iters)
    return pipeline, dataset, sampler, iters


def base_root(dataset) -> str:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return str(getattr(dataset, "root", "?"))


#: batches each loader worker prepares ahead of the training step
PREFETCH = 4


def make_loader(dataset, sampler, batch_size, num_workers, pin):
    """The run's loader, made once: its workers persist across epochs (not
    forked again every epoch; the sampler hands them the epoch with every
    index, ``EpochSampler.tag_epochs``) and keep :data:`PREFETCH` batches ready."""
    sampler.tag_epochs = True
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=pin, persistent_workers=num_workers > 0,
                      prefetch_factor=PREFETCH if num_workers > 0 else None, collate_fn=collate)


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------
def selection_stats(sel, params, baseline_row) -> dict:
    """Statistics of the chosen combinations for the step log (on CPU; logged
    steps only).  ``baseline_row`` [S] is the combination the baseline trains on
    (the first candidates of every pool: ``HardViewSelector.baseline_combo``)."""
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


def save_checkpoint(path, method, model_state, optimizer, scaler, cfg, epoch, step, loop=None):
    """``loop``: the loop's running sums inside an epoch (for its mean loss).
    The caller has checked that the weights are finite (:class:`DivergenceGuard`)."""
    ckpt_io.save_atomic({
        "format": ckpt_io.FORMAT, "method": method.name, "arch": method.arch(cfg), "config": cfg,
        "epoch": epoch, "step": step, "model": model_state, "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "method_state": method.state_dict(), "rng": ckpt_io.rng_state(), "loop": loop or {},
        "id": uuid.uuid4().hex,  # tells copies of checkpoints apart (ranks resuming from different ones)
    }, path)


@dataclass
class StepContext:
    """Everything one training step needs besides the batch."""

    method: SSLMethod  # its ``model`` is the run's network (SyncBatchNorm layers where converted)
    ddp_model: nn.Module  # what the training forward runs: method.model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    autocast: Callable  # a context manager of the run's mixed precision (runtime.amp_settings)
    scaler: Optional[torch.amp.GradScaler]  # fp16 loss scaling (None: off)
    selector: Optional[HardViewSelector]  # None: HVS off
    device: torch.device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def train_step(ctx: StepContext, candidates, step: StepInfo, generator=None, time_selection=False, renders=None):
    """One optimisation step: [selection ->] the method's loss on the chosen views
    -> backward -> clip -> step -> method hooks.  Returns (loss, stats, selection,
    selection seconds); with ``time_selection`` the selection is timed between
    CUDA synchronisations (otherwise no synchronisation is added).  ``renders``:
    the candidates' own-colour renderings, trained on (``hvs.static_color``)."""
    method = ctx.method
    sel, sel_time = None, 0.0
    with ctx.autocast():
        views = candidates
        if ctx.selector is not None:
            if time_selection:
                ctx.sync()
            t0 = time.perf_counter()
            sel = ctx.selector(candidates, method, step, generator=generator, renders=renders)
            if time_selection:
                ctx.sync()
            sel_time, views = time.perf_counter() - t0, sel.views
        loss, stats = method.training_loss(ctx.ddp_model, views, sel, step)
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        ctx.scaler.unscale_(ctx.optimizer)
    else:
        loss.backward()
    method.before_optimizer_step(method.model, step)
    if ctx.scaler is not None:
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        ctx.optimizer.step()
    method.after_step(step)
    return loss, stats, sel, sel_time


# ----------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------
@dataclass(eq=False)
class Run:
    """What :func:`build` makes (the first group) and :func:`run` adds: everything
    the loop of one run holds.  The method, its model, the optimizer, the
    scaler, the selector and the device are the training step's (``ctx``)."""

    cfg: dict
    ctx: StepContext
    dataset: MultiViewDataset
    sampler: EpochSampler
    pipeline: ViewPipeline  # the views: the method's transform with the run's options, and its device step
    per_rank: int  # batch size of one rank
    iters: int  # steps per epoch
    epochs: int
    out: Path  # the run folder
    ckpt_path: Path
    channels_last: bool = False  # the model and the views in channels_last (train.channels_last)
    # where the run stands (resume)
    epoch: int = 0
    step: int = 0
    loop_state: dict = field(default_factory=dict)  # the running sums of a checkpoint inside an epoch
    loader: Optional[DataLoader] = None  # made at the first epoch, kept (persistent workers)
    # logs and checks (set by run)
    log: Optional[JsonLog] = None
    sel_log: Optional[SelectionLog] = None
    progress: Optional[Progress] = None
    guard: Optional[DivergenceGuard] = None
    log_every: int = 0
    sel_every: int = 0
    ckpt_every: int = 0
    stop_after: int = 0
    t_interval: float = 0.0  # time of the last logged step
    last_logged: int = 0


def build(cfg: dict, method_cls, device: torch.device) -> Run:
    """Method, data, model, optimizer, precision and selector of a run."""
    global_batch = int(cfg["train"]["batch_size"])
    if global_batch % dist.world():
        raise ConfigError(f"train.batch_size={global_batch} is not divisible by the {dist.world()} ranks")
    per_rank = global_batch // dist.world()
    method = method_cls(cfg, device)
    pipeline, dataset, sampler, iters = build_train_data(cfg, method, per_rank)

    method.model = model = method.model.to(device)
    if dist.is_dist() and device.type == "cuda" and cfg["train"]["sync_bn"]:
        method.model = model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    channels_last = use_channels_last(cfg["train"]["channels_last"], device, model, cfg["train"]["amp"])
    if channels_last:
        model_channels_last(model)
    optimizer = method.build_optimizer(global_batch)
    autocast, scaler = amp_settings(cfg, device)
    if cfg["train"]["compile"]:
        compile_backbones(model)
    ddp_model = model
    if dist.is_dist():
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    selector = None
    if cfg["hvs"]["enabled"]:
        h = cfg["hvs"]
        try:
            selection_dtype(h["precision"], device)  # fp16 on a CPU is refused before anything runs
        except ValueError as err:
            raise ConfigError(str(err)) from None
        selector = HardViewSelector.from_cfg(method, h)
    out = Path(cfg["run"]["output_dir"])
    ctx = StepContext(method=method, ddp_model=ddp_model, optimizer=optimizer, autocast=autocast, scaler=scaler,
                      selector=selector, device=device)
    return Run(cfg=cfg, ctx=ctx, dataset=dataset, sampler=sampler, pipeline=pipeline, per_rank=per_rank,
               iters=iters, epochs=int(cfg["train"]["epochs"]), out=out, ckpt_path=out / "checkpoint.pth",
               channels_last=channels_last)


def existing_checkpoint(cfg: dict, method_cls) -> dict | None:
    """The run folder's checkpoint, if there is one, refused if it is of
    another method or architecture: read before anything is built or written."""
    path = Path(cfg["run"]["output_dir"]) / "checkpoint.pth"
    if not path.exists():
        return None
    return ckpt_io.load(path, expect_method=method_cls.name, expect_arch=method_cls.arch(cfg))


def agree_on_checkpoint(path, state: dict | None) -> None:
    """Every rank reads the run folder's checkpoint, only rank 0 writes it: on
    nodes without a shared file system they may find different ones (or none)
    and resume at different steps, then wait on each other for ever.  The ranks
    compare what they found with rank 0's (step and identity) and stop, all of
    them, with one line if any differs."""
    found = None if state is None else (int(state["step"]), ckpt_io.identity(state))
    seen = dist.all_gather_object(found)
    if all(f == seen[0] for f in seen):
        return

    def what(f):
        return "no checkpoint" if f is None else f"step {f[0]} (checkpoint {f[1][:12]})"

    other = next(r for r, f in enumerate(seen) if f != seen[0])
    raise ckpt_io.CheckpointError(
        f"the ranks do not see the same {path}: rank 0 finds {what(seen[0])}, rank {other} {what(seen[other])}; "
        "every node must read the checkpoint rank 0 writes (a shared run.output_dir, or a copy of it on every node)")


def resume(r: Run, state: dict | None) -> None:
    """Continue from ``state`` (the run folder's checkpoint, its layer shapes
    checked against the built model): weights, optimizer, method state
    (centres, ...), random generators, position."""
    if state is None:
        return
    c = r.ctx
    check_same_shapes(r.ckpt_path, state["model"], c.method.model.state_dict(), state["config"], r.cfg)
    c.method.model.load_state_dict(state["model"])
    c.optimizer.load_state_dict(state["optimizer"])
    if c.scaler is not None and state["scaler"] is not None:
        c.scaler.load_state_dict(state["scaler"])
    c.method.load_state_dict(state["method_state"])
    ckpt_io.set_rng_state(state["rng"])
    r.epoch, r.step, r.loop_state = state["epoch"], state["step"], state.get("loop", {})
    if dist.is_main():
        print(f"resumed from {r.ckpt_path}: epoch {r.epoch}, step {r.step}", flush=True)
        warn_config_changes(state["config"], r.cfg)


def checkpoint(r: Run, epoch_done: int, loop: dict | None = None) -> None:
    """Write ``checkpoint.pth`` (rank 0), unless a loss since the start or a
    weight is not finite: then :class:`common.engine.runtime.Diverged`, and the last
    good checkpoint stays as it was."""
    r.sel_log.flush()
    c = r.ctx
    state = c.method.model.state_dict()
    r.guard.check(weights=state.values())
    if dist.is_main():
        save_checkpoint(r.ckpt_path, c.method, state, c.optimizer, c.scaler, r.cfg, epoch_done, r.step, loop)
    r.guard.saved(r.step)
    dist.barrier()


def log_step(r: Run, epoch: int, it: int, loss, stats: dict, sched: dict, sel, sel_time: float,
             batch: ViewBatch) -> None:
    """One JSON line and one console line (logged steps only: they synchronise with the device)."""
    r.guard.check()
    params = batch.params
    loss_value = loss.item()
    now = time.time()
    row = {"type": "step", "epoch": epoch, "step": r.step, "loss": loss_value,
           "step_time": (now - r.t_interval) / (r.step - r.last_logged), **sched,
           **{k: float(v) for k, v in stats.items()}}
    r.t_interval, r.last_logged = now, r.step
    if sel is not None:
        row.update(sel_time=sel_time, **selection_stats(sel, params, r.ctx.selector.baseline_combo))
    policy = r.pipeline.policy
    if policy is not None:
        row.update(iou_threshold=policy.threshold(r.step - 1), iou_policy_on=policy.active(r.step - 1),
                   policy_draws=params[:, 0, P["draws"]].mean().item(),
                   policy_iou=box_iou(params[:, 0], params[:, 1]).mean().item())
    r.log.write(**row)
    r.progress.print(r.step, f"epoch {epoch + 1}/{r.epochs} it {it + 1}/{r.iters} loss {loss_value:.4f} "
                             f"lr {sched.get('lr', 0):.4g}" + (f" sel {sel_time:.3f}s" if sel else ""))


def train_one_epoch(r: Run, epoch: int) -> None:
    """The steps of ``epoch`` left to do (all of them, unless resumed inside
    it), up to ``run.stop_after_steps``; the epoch's log line and checkpoint
    once it is complete."""
    seed = int(r.cfg["run"]["seed"])
    done_in_epoch = r.step - epoch * r.iters
    r.dataset.set_epoch(epoch)
    r.sampler.set_epoch(epoch, skip_batches=done_in_epoch)
    if r.loader is None:
        r.loader = make_loader(r.dataset, r.sampler, r.per_rank, int(r.cfg["data"]["num_workers"]),
                               r.ctx.device.type == "cuda")
    loader = r.loader
    epoch_loss, epoch_n, t_epoch = torch.zeros((), device=r.ctx.device), 0, time.time()
    if done_in_epoch and r.loop_state:  # resumed inside this epoch: the sums of its first steps
        epoch_loss += r.loop_state["epoch_loss"]
        epoch_n = int(r.loop_state["epoch_n"])
    for it, loaded in enumerate(loader, start=done_in_epoch):
        if it >= r.iters:
            break
        # the finished candidates (static colour: and their renderings) on the device
        batch = r.pipeline.to_device(loaded, r.ctx.device, channels_last=r.channels_last)
        sched = r.ctx.method.schedule(r.ctx.optimizer, StepInfo(epoch, it, r.iters))
        timed = r.step % r.log_every == 0
        gen = torch.Generator().manual_seed(step_seed(seed, r.step))  # cap subset, random mode
        torch.manual_seed(step_seed(seed, r.step) + 1)  # stochastic depth etc.: resume is exact
        loss, stats, sel, sel_time = train_step(r.ctx, batch.candidates, StepInfo(epoch, it, r.iters, sched), gen,
                                                time_selection=timed, renders=batch.renders)
        r.step += 1
        r.guard.update(loss, r.step)  # no host synchronisation
        epoch_loss += loss.detach()
        epoch_n += 1

        if r.sel_every and (r.step - 1) % r.sel_every == 0:
            r.sel_log.add(r.step - 1, batch.index, batch.params, sel)
        if timed:
            log_step(r, epoch, it, loss, stats, sched, sel, sel_time, batch)
        if it + 1 < r.iters and ((r.ckpt_every and r.step % r.ckpt_every == 0) or r.step == r.stop_after):
            checkpoint(r, epoch, {"epoch_loss": dist.all_reduce_mean(epoch_loss).item(), "epoch_n": epoch_n})
        if r.step == r.stop_after:
            break
    if r.step - epoch * r.iters >= r.iters:  # the epoch is complete
        r.guard.check()
        mean_loss = (dist.all_reduce_mean(epoch_loss) / max(1, epoch_n)).item()
        r.log.write(type="epoch", epoch=epoch, step=r.step, loss=mean_loss, time=time.time() - t_epoch)
        if dist.is_main():
            print(f"epoch {epoch + 1}/{r.epochs} done: mean loss {mean_loss:.4f}, "
                  f"{fmt_time(time.time() - t_epoch)}", flush=True)
        checkpoint(r, epoch + 1)


def run(cfg: dict, method_cls) -> Path:
    """Train (or resume) the run described by ``cfg``; returns the checkpoint path."""
    with run_session(cfg) as (device, run_dir):
        state = existing_checkpoint(cfg, method_cls)
        agree_on_checkpoint(Path(cfg["run"]["output_dir"]) / "checkpoint.pth", state)
        r = build(cfg, method_cls, device)
        resume(r, state)
        main, rc = dist.is_main(), cfg["run"]
        # the log is the last resume check (a damaged line is refused): read it before anything is written
        r.log = JsonLog(r.out / "log.jsonl", resume_step=r.step, enabled=main)
        run_dir.write_config(cfg)  # the run starts: nothing was written before this

        r.sel_log = SelectionLog(r.out / "selection", dist.rank(), PARAM_NAMES)
        r.progress = Progress(r.epochs * r.iters, start=r.step, enabled=main)
        r.guard = DivergenceGuard(device, r.ckpt_path, r.step if state is not None else None)
        r.log_every, r.sel_every = int(rc["log_every"]), int(rc["selection_log_every"])
        r.ckpt_every, r.stop_after = int(rc["ckpt_every_steps"]), int(rc["stop_after_steps"])
        r.t_interval, r.last_logged = time.time(), r.step

        r.ctx.method.model.train()
        for epoch in range(r.epoch, r.epochs):
            if r.step - epoch * r.iters >= r.iters:
                continue
            train_one_epoch(r, epoch)
            if r.step == r.stop_after:
                if main:
                    print(f"stopped after step {r.step} (run.stop_after_steps): re-run to resume", flush=True)
                break
        dist.barrier()
    return r.ckpt_path


def main(method_cls, argv=None) -> None:
    spec = {**COMMON_SPEC, **method_cls.spec}
    cfg = parse_args(spec, method_cls.__doc__ or method_cls.name, argv)
    cfg["method"] = method_cls.name
    exit_on_error(entry_point() or f"python -m {method_cls.name}.main", lambda: run(cfg, method_cls))
