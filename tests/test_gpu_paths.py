"""CUDA code paths checked on a CPU with stand-ins: the TF32 and cuDNN flags a
GPU run sets, the host synchronisations of a training step (counted by
wrapping the calls that synchronise), and SyncBatchNorm in the selection
forward (two gloo ranks)."""
from contextlib import nullcontext

import pytest
import torch

from common.hvs import HardViewSelector
from common.engine.runtime import amp_settings

FLAGS = ("torch.backends.cuda.matmul.allow_tf32", "torch.backends.cudnn.allow_tf32", "torch.backends.cudnn.benchmark")


@pytest.fixture
def cuda_flags():
    """The three process-wide flags, all false for the test and restored after it."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    yield lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                   torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def test_tf32_and_cudnn_autotuning_on_cuda_by_default(cuda_flags):
    from common.engine.config import COMMON_SPEC

    assert COMMON_SPEC["train.tf32"]["default"] is True
    amp_settings({"train": {"amp": "off"}}, torch.device("cpu"))
    assert cuda_flags() == (False, False, False)  # a CPU run changes nothing
    amp_settings({"train": {"amp": "off", "tf32": True}}, torch.device("cuda", 0))
    assert cuda_flags() == (True, True, True), FLAGS
    amp_settings({"train": {"amp": "off", "tf32": False}}, torch.device("cuda", 0))
    assert cuda_flags() == (False, False, False), FLAGS
    amp_settings({"train": {"amp": "off"}}, torch.device("cuda"))  # an evaluation's config without the key: on
    assert cuda_flags() == (True, True, True), FLAGS


# --- host synchronisations of a training step ------------------------------------------------
class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts, on a CPU, what would synchronise the host with a GPU.

    Tensors are split into host and "device" tensors: the device tensors are
    the model's weights and buffers, the step's inputs (``mark``), the results
    of copies made with ``non_blocking=True`` (the code's host-to-device
    copies), tensors made with ``device=<a torch.device>``, and whatever is computed from a device tensor.  Counted: reading
    a device tensor on the host (``item``, ``tolist``, ``cpu``, ``numpy``,
    ``bool``/``float``/``int``, ``nonzero``, a copy ``.to("cpu")``), indexing
    a device tensor with a Python list or a host tensor (a blocking copy of the
    index), a blocking copy of a host tensor ``.to(torch.device)`` (device-ward
    copies name a ``torch.device``; host-ward ones use ``"cpu"`` or ``.cpu()``),
    and ``torch.cuda.synchronize``."""

    READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
             torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero}
    INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}

    def __init__(self, monkeypatch):
        super().__init__()
        self.device, self.syncs, self.where = {}, [], []  # id -> tensor (kept alive, so that no id is reused)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: self.syncs.append("torch.cuda.synchronize"))

    def mark(self, *tensors):
        for t in tensors:
            self.device[id(t)] = t

    def count(self, what: str) -> None:
        """One synchronisation, and the line of the repository's code that made it."""
        import traceback

        self.syncs.append(what)
        frames = [f for f in traceback.extract_stack() if "/tests/" not in f.filename and "torch" not in f.filename]
        self.where.append(f"{what} at {frames[-1].filename}:{frames[-1].lineno}" if frames else what)

    def on_device(self, x) -> bool:
        return isinstance(x, torch.Tensor) and id(x) in self.device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        from_device = any(self.on_device(x) for x in leaves)
        name = getattr(func, "__name__", str(func))
        if from_device and func in self.READS:
            self.count(name)
        elif from_device and func is torch.Tensor.to and "cpu" in [a for a in args[1:]] + [kwargs.get("device")]:
            self.count("to cpu")
        elif from_device and func in self.INDEXING:
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, list) or (isinstance(p, torch.Tensor) and not self.on_device(p)
                                            and p.dim() > 0) for p in parts):
                self.count(f"{name} with a host index")
        elif func is torch.Tensor.to and not from_device and not kwargs.get("non_blocking") \
                and any(isinstance(a, torch.device) for a in args[1:]):
            self.count("blocking host-to-device copy")
        out = func(*args, **kwargs)
        made_there = isinstance(kwargs.get("device"), torch.device)  # torch.arange(B, device=device)
        if from_device or made_there or (func in (torch.Tensor.to, torch.Tensor.copy_) and kwargs.get("non_blocking")):
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and func not in self.READS:
                    self.device[id(t)] = t
        return out


def counted_steps(monkeypatch, method_cls, cfg, steps=2, batch=4, fp16=False):
    """Host synchronisations of each of ``steps`` training steps on batches
    of the run's own dataset: the view pipeline's move to the device and its
    device step (``augment.device=model``, ``model_crop``: ``ViewPipeline.to_device``),
    ``common.engine.train.train_step`` and the divergence guard's update, as the loop
    runs them between logging steps.  ``fp16``: under fp16 autocast with a
    GradScaler (on the CPU)."""
    from common.views.augment import collate
    from common.engine.method import StepInfo
    from common.engine.runtime import DivergenceGuard
    from common.engine.train import StepContext, build_train_data, train_step

    cpu = torch.device("cpu")
    method = method_cls(cfg, cpu)
    pipeline, dataset, _, _ = build_train_data(cfg, method, batch)
    h = cfg["hvs"]
    selector = HardViewSelector(method.pools(), mode=h["mode"], max_combinations=h["max_combinations"],
                                precision=h["precision"], size_multiple=method.size_multiple)
    optimizer = method.build_optimizer(8)
    autocast, scaler = nullcontext, None
    if fp16:
        autocast, scaler = (lambda: torch.autocast("cpu", dtype=torch.float16)), torch.amp.GradScaler("cpu")
    ctx = StepContext(method=method, ddp_model=method.model, optimizer=optimizer, autocast=autocast, scaler=scaler,
                      selector=selector, device=cpu)
    guard = DivergenceGuard(cpu)
    counts, counter = [], SyncCounter(monkeypatch)
    counter.mark(*method.model.parameters(), *method.model.buffers(), guard.first_bad)
    if hasattr(method, "loss"):
        counter.mark(*method.loss.buffers())
    for k in range(steps):
        loaded = collate([dataset[i] for i in range(k * batch, (k + 1) * batch)])
        counter.where = []
        with counter:
            views = pipeline.to_device(loaded, cpu)  # its non-blocking copies make the device tensors
            step = StepInfo(0, k, steps, method.schedule(optimizer, StepInfo(0, k, steps)))
            loss, *_ = train_step(ctx, views.candidates, step, torch.Generator().manual_seed(k), renders=views.renders)
            guard.update(loss, k + 1)
        counts.append(counter.where)
    return counts


PATHS = {
    "simsiam": ("simsiam", ["hvs.enabled=true"]),
    "simsiam_random": ("simsiam", ["hvs.enabled=true", "hvs.mode=random"]),
    "dino": ("dino", ["hvs.enabled=true"]),
    "dino_capped": ("dino", ["hvs.enabled=true", "hvs.max_combinations=5"]),
    "dino_model": ("dino", ["hvs.enabled=true", "augment.device=model"]),
    "dino_model_crop": ("dino", ["hvs.enabled=true", "augment.device=model_crop"]),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_no_host_synchronisation_in_a_training_step(path, tmp_path, image_root, monkeypatch, one_thread):
    """Between logging steps a step never waits for the device: no device
    tensor read on the host, no index sent as a Python list, no blocking copy
    (the combination table and the photometric factors used to be)."""
    from dino.method import DINOMethod
    from simsiam.method import SimSiamMethod
    from tests.helpers import dino_cfg, tiny_cfg

    name, overrides = PATHS[path]
    if name == "simsiam":
        method_cls, cfg = SimSiamMethod, tiny_cfg(SimSiamMethod, tmp_path, image_root, *overrides)
    else:
        method_cls, cfg = DINOMethod, dino_cfg(tmp_path, image_root, *overrides)
    counts = counted_steps(monkeypatch, method_cls, cfg)
    assert counts == [[]] * len(counts)


@pytest.mark.slow  # fp16 on a CPU is slow
def test_one_host_synchronisation_per_step_under_fp16(tmp_path, image_root, monkeypatch, one_thread):
    """Under fp16 the GradScaler reads its found-infinity flag once a step
    (whether to skip the optimizer step), and nothing else synchronises."""
    from simsiam.method import SimSiamMethod
    from tests.helpers import tiny_cfg

    counts = counted_steps(monkeypatch, SimSiamMethod, tiny_cfg(SimSiamMethod, tmp_path, image_root,
                                                                 "hvs.enabled=true"), fp16=True)
    assert [[w.split(" at ")[0] for w in c] for c in counts] == [["item"]] * len(counts)
    assert all("common/engine/train.py" in c[0] for c in counts)  # the scaler.step of train_step


def test_the_counter_sees_a_synchronisation(monkeypatch):
    counter = SyncCounter(monkeypatch)
    x, host = torch.arange(6.0), torch.tensor([1, 2])
    counter.mark(x)
    with counter:
        y = (x * 2).sum()
        z = x.to(torch.device("cpu"), non_blocking=True)  # to the device, not waiting
        assert counter.syncs == []
        y.item()
        x[[0, 1]]
        x[host]
        float(y)
        host.to(torch.device("cpu"))
        torch.cuda.synchronize()
        x[z.long()[:2]]  # a device index: no synchronisation
    assert counter.syncs == ["item", "__getitem__ with a host index", "__getitem__ with a host index", "__float__",
                             "blocking host-to-device copy", "torch.cuda.synchronize"]


# --- SyncBatchNorm in the selection forward ---------------------------------------------------
def small_bn_net():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 8),
                               torch.nn.BatchNorm1d(8))


def pair_scores(outputs, combos):
    z = torch.nn.functional.normalize(torch.stack(outputs), dim=-1)
    return -(z[combos[:, 0]] * z[combos[:, 1]]).sum(-1).T


def sync_bn_worker(rank, out_dir):
    import copy

    import torch.distributed as dist

    from tests.helpers import Hooks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    collectives = []
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter_tensor"):
        real = getattr(dist, name)
        setattr(dist, name, lambda *a, _real=real, _name=name, **k: (collectives.append(_name), _real(*a, **k))[1])
    try:
        g = torch.Generator().manual_seed(10 + rank)  # each rank its own candidates
        candidates = [torch.randn(6, 3, 8, 8, generator=g) for _ in range(4)]
        out = {}
        for bn_mode in ("batch", "batch_update"):
            local = small_bn_net().train()
            synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(local)).train()
            results = []
            for model in (local, synced):
                hooks = Hooks(model, lambda c: [model(v) for v in c], pair_scores)  # noqa: B023 (called at once)
                sel = HardViewSelector([(4, 2)], bn_mode=bn_mode)(candidates, hooks)
                results.append((sel.scores, sel.choice, [b.clone() for b in model.buffers()]))
            out[bn_mode] = {"same_scores": torch.equal(results[0][0], results[1][0]),
                            "same_choice": torch.equal(results[0][1], results[1][1]),
                            "same_buffers": all(torch.equal(a, b) for a, b in zip(results[0][2], results[1][2])),
                            "sync_layers": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()),
                            "forward_restored": not any("forward" in vars(m) for m in synced.modules())}
        out["collectives"] = collectives
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_selection_uses_local_statistics_under_syncbatchnorm(tmp_path, monkeypatch):
    """Two gloo ranks with SyncBatchNorm layers: the selection forward computes
    each rank's own batch statistics (the scores, the choice and the running
    statistics are those of plain BatchNorm) and starts no collective, where
    SyncBatchNorm would all-gather in every layer (on a CPU it refuses to run)."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(sync_bn_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["collectives"] == []
        for bn_mode in ("batch", "batch_update"):
            assert out[bn_mode] == {"same_scores": True, "same_choice": True, "same_buffers": True, "sync_layers": 2,
                                    "forward_restored": True}, bn_mode


def test_exact_fp32_reference_turns_tf32_off_and_back(cuda_flags):
    """bench.overhead's fp32 reference choices run without TF32 (the agreement of
    a TF32 selection is measured against exact fp32), the flags restored after."""
    from common.engine.runtime import exact_fp32

    amp_settings({"train": {"amp": "off"}}, torch.device("cuda"))
    with exact_fp32():
        assert cuda_flags()[:2] == (False, False)
    assert cuda_flags() == (True, True, True)
