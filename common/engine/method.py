"""What the shared training loop and the selector know of a method.

A method subclasses :class:`SSLMethod` and fills in a few functions; the loop
(`common/engine/train.py`) and the selector (`common/hvs.py`) know nothing else."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from common.views.augment import MultiViewTransform, recipe_from_cfg
from common.backbones import build_resnet, load_prefixed
from common.engine.config import setting
from common.hvs import precision_setting


@dataclass(frozen=True)
class StepInfo:
    """Where a step stands (``epoch``, ``it`` of ``iters`` steps per epoch) and
    the values the method's :meth:`SSLMethod.schedule` returned for it
    (``step["teacher_temp"]``).  The loop hands it to every per-step hook, so a
    method keeps no per-step attributes that one hook sets and another reads."""

    epoch: int
    it: int
    iters: int
    values: dict = field(default_factory=dict)

    @property
    def global_step(self) -> int:
        """Steps done before this one since the run began: ``epoch * iters + it``."""
        return self.epoch * self.iters + self.it

    def __getitem__(self, key: str):
        return self.values[key]


@dataclass(frozen=True, eq=False)
class BenchSettings:
    """How ``bench/overhead.py`` times a method's selection."""

    #: how the benchmark draws the candidates and sets the views: ``pair`` (one or two
    #: recipes of N views), ``multicrop`` (DINO's crops) or ``multicrop_masks`` (iBOT's)
    views: str
    #: default backbone of the benchmark
    arch: str
    #: resolution -> overhead factor of the paper's Table 14 (None: not in it)
    paper: dict | None = None
    #: what the paper's factors were measured on (or why there are none)
    paper_setting: str = ""


class SSLMethod:
    #: name written into checkpoints and used by :mod:`common.engine.registry`
    name: str = ""
    # --- what the scripts read through :mod:`common.engine.registry` (set on every registered class) ---
    #: run_all.sh's method tokens -> backbone family ("resnet" or "vit"); a token runs
    #: ``python -m <folder>.main --config configs/<token>_<profile>.yaml``; empty: not run by run_all.sh
    run_all_tokens: dict = {}
    #: the method's name in the paper's tables (the ``method`` column of configs/paper_numbers.csv)
    paper_name: str = ""
    #: the linear-probe protocol (configs/linear_<protocol>.yaml) by backbone family
    linear_protocols: dict = {"resnet": "simclr", "vit": "dino"}
    #: bench/overhead.py's settings (None: not benchmarked)
    bench: BenchSettings | None = None
    #: run by the smoke section of bench/gpu_check.py (needs configs/<name>_cifar10_gpu.yaml)
    gpu_smoke: bool = False
    #: extra config keys of the method, merged into :data:`common.engine.config.COMMON_SPEC`
    spec: dict = {}
    #: reduced selection sizes are rounded to a multiple of this (a ViT's patch size)
    size_multiple: int = 1
    #: whether evaluations take the teacher's backbone by default (``--which auto``), as DINO
    #: does; BYOL and MoCo v3 have an EMA teacher too (:class:`common.engine.teacher.TeacherMethod`)
    #: but are evaluated on the online network
    has_teacher: bool = False

    def __init__(self, cfg: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        self.model: nn.Module = nn.Identity()  # set by the subclass: all trainable weights

    # --- data ---------------------------------------------------------------
    def view_transform(self, hvs_on: bool) -> MultiViewTransform:
        """Candidate views per image, slot by slot (N per slot with HVS)."""
        raise NotImplementedError

    def pools(self) -> list:
        """``[(n_candidates, n_slots), ...]`` for the selector, in the order the
        transform draws the candidates."""
        raise NotImplementedError

    @classmethod
    def image_size(cls, cfg: dict) -> int:
        return int(cfg["augment"]["size"])

    @classmethod
    def arch(cls, cfg: dict) -> str:
        return str(cfg["model"]["arch"])

    # --- optimisation ---------------------------------------------------------
    def build_optimizer(self, global_batch: int) -> torch.optim.Optimizer:
        raise NotImplementedError

    def schedule(self, optimizer, step: StepInfo) -> dict:
        """Set the optimizer's lr (and the like) for the step ``step`` (its
        ``values`` are still empty) and return every
        scheduled value of the step (logged, and handed to the hooks below in
        :class:`StepInfo`).  Sets nothing else."""
        raise NotImplementedError

    def before_optimizer_step(self, model: nn.Module, step: StepInfo) -> None:
        """Hook after backward and unscaling, before the step (clipping, freezing a layer)."""

    def after_step(self, step: StepInfo) -> None:
        """Hook after the optimizer step (the EMA of :class:`common.engine.teacher.TeacherMethod`, ...)."""

    # --- hard view selection (called without gradient) -------------------------
    def candidate_outputs(self, module: nn.Module, candidates: Sequence[torch.Tensor], step: StepInfo) -> Any:
        """Outputs of every candidate view, one batched forward without gradient."""
        raise NotImplementedError

    def combination_scores(self, outputs: Any, combos: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """Per-sample score [B, C] of every combination [C, S]: the method's own
        per-sample training loss of those views.  Must not change any state."""
        raise NotImplementedError

    # --- training ---------------------------------------------------------------
    def training_loss(self, model: nn.Module, views: Sequence[torch.Tensor], selection, step: StepInfo):
        """Loss (scalar tensor) on the chosen views and a dict of tensors to log.
        ``selection`` is the selector's :class:`common.hvs.Selection` (None
        without HVS); a method may reuse its ``outputs`` where that is exact."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Extra state to checkpoint (loss centres, ...); tensors and plain values."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # --- evaluation ---------------------------------------------------------------
    @classmethod
    def backbone_from_state(cls, cfg: dict, model_state: dict, which: str,
                            drop_path: float = 0.0) -> nn.Module:
        """The pretrained backbone (``which``: teacher or student); a ViT
        is built with stochastic depth ``drop_path`` (for finetuning)."""
        raise NotImplementedError


class PairMethod(SSLMethod):
    """A method trained on two views of every image with a ResNet backbone
    (SimSiam, SimCLR).  With HVS the loader draws N candidates from one recipe
    into one pool, and the selector compares all C(N, 2) pairs."""

    spec = {
        "model.arch": setting("resnet50", "torchvision ResNet backbone (resnet18/34/50/101), or a narrow one: resnet18_w<W> / resnet34_w<W> with W, 2W, 4W, 8W channels per stage (64 = the standard width)"),
        "model.cifar_stem": setting(False, "3x3 stride-1 first convolution and no max-pool, for 32-64 px images"),
        "hvs.precision": precision_setting("auto", "Default auto: bf16 choices agreed with fp32 on 97.7 % "
                                           "(SimSiam) and 99.2 % (SimCLR) of samples (bench/precision.py)."),
        "hvs.n_views": setting(4, "candidate views per image with HVS; every pair of them is compared (paper: 4)",
                               range="[2, inf)"),
    }

    def build_backbone(self) -> nn.Module:
        m = self.cfg["model"]
        return build_resnet(m["arch"], cifar_stem=m["cifar_stem"], zero_init_residual=True)

    def view_transform(self, hvs_on):
        n = self.cfg["hvs"]["n_views"] if hvs_on else 2
        return MultiViewTransform([(recipe_from_cfg(self.cfg["augment"]), n)])

    def pools(self):
        return [(self.cfg["hvs"]["n_views"], 2)]

    @staticmethod
    def per_candidate(outputs, V: int, B: int):
        """Reshape outputs of one forward over the V concatenated candidate
        batches ([V*B, ...], or a tuple of them) to [V, B, ...]."""
        if isinstance(outputs, tuple):
            return tuple(o.view(V, B, *o.shape[1:]) for o in outputs)
        return outputs.view(V, B, *outputs.shape[1:])

    def candidate_outputs(self, module, candidates, step):
        """The model's ``embed`` of all candidates in one forward, as [V, B, ...]
        (SimSiam: a tuple (p, z); SimCLR: z)."""
        return self.per_candidate(module.embed(torch.cat(candidates)), len(candidates), len(candidates[0]))

    @classmethod
    def backbone_from_state(cls, cfg, model_state, which, drop_path=0.0):
        if which == "teacher":
            raise ValueError(f"{cls.name} has no teacher: use --which student (or auto)")
        return load_prefixed(build_resnet(cfg["model"]["arch"], cifar_stem=cfg["model"]["cifar_stem"]),
                             model_state, "backbone.")
