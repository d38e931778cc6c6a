"""The view pipeline of a run: how the candidates of every image are drawn,
where they are rendered, and what the training loop receives.

:meth:`ViewPipeline.from_cfg` reads the configuration once: the method's
multi-view transform (:meth:`common.engine.method.SSLMethod.view_transform`),
the analyses' options (``hvs.static_color``, ``iou_policy.*``, checked
against HVS being on or off) and where the views are rendered
(``augment.device``: ``loader``, ``model`` or ``model_crop``).  It builds the
final, frozen :class:`common.views.augment.MultiViewTransform` that the loader
workers run and, for ``model`` and ``model_crop``, the step that finishes the
views on the training device (:class:`common.views.photometric.DevicePhotometric`,
:class:`common.views.photometric.DeviceViews`).  Nothing changes either
afterwards.

:meth:`ViewPipeline.to_device` turns a batch of the loader into a
:class:`ViewBatch` on the training device: the finished candidates, their
parameter rows, and with static colour the candidates' own-colour renderings,
split from the candidates.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from common.engine.config import ConfigError
from common.engine.memory_format import views_channels_last
from common.views.augment import DEVICE_CHOICES, IoUPolicy, MultiViewDataset, MultiViewTransform, views_to
from common.views.photometric import DevicePhotometric, DeviceViews


@dataclass(frozen=True)
class ViewBatch:
    """One training batch, on the training device.

    ``candidates``: V tensors [B, 3, S, S], the candidates of every crop slot in
    the transform's order; ``params`` [B, V, len(PARAM_NAMES)] (on the CPU)
    their recorded rows; ``renders``: with ``hvs.static_color`` the V
    own-colour renderings of the same crops, which the chosen views are
    trained on (None otherwise); ``labels`` and ``index`` [B]: the images'
    labels and dataset indices, as the loader gives them."""

    candidates: list
    params: torch.Tensor
    renders: list | None
    labels: torch.Tensor
    index: torch.Tensor


@dataclass(frozen=True)
class ViewPipeline:
    """The run's :class:`MultiViewTransform` and its device-side step (None
    with ``augment.device=loader``); build it with :meth:`from_cfg` (a run)
    or :meth:`rendering` (a transform of one's own)."""

    transform: MultiViewTransform
    device_step: DevicePhotometric | None = None

    @classmethod
    def rendering(cls, transform: MultiViewTransform, where: str = "loader") -> "ViewPipeline":
        """``transform`` with its views rendered as ``augment.device=where``:
        ``loader`` (in PIL, in the loader workers), ``model`` (the workers crop,
        flip and resize; colour on the device) or ``model_crop`` (the workers
        decode; everything else on the device)."""
        if where not in DEVICE_CHOICES:
            raise ValueError(f"augment.device={where!r} must be one of {DEVICE_CHOICES}")
        if transform.photometric != where:
            transform = dataclasses.replace(transform, photometric=where)
        if where == "loader":
            return cls(transform)
        return cls(transform, (DeviceViews if where == "model_crop" else DevicePhotometric)(transform.recipes()))

    @classmethod
    def from_cfg(cls, cfg: dict, method, total_steps: int = 1) -> "ViewPipeline":
        """The pipeline of a run: the method's transform for HVS on or off
        (``hvs.enabled``), with static colour (``hvs.static_color``; needs HVS
        in mode hard or easy), the IoU policy (``iou_policy.*``, its schedule
        over ``total_steps`` training steps; needs HVS off), rendered as
        ``augment.device``.  Raises :class:`ConfigError` for the combinations
        that cannot run."""
        hvs_on, p = cfg["hvs"]["enabled"], cfg["iou_policy"]
        options = {}
        if cfg["hvs"]["static_color"]:
            if not hvs_on or cfg["hvs"]["mode"] == "random":
                raise ConfigError("hvs.static_color=true shares the colour jitter of the candidates during the "
                                  "selection: it needs hvs.enabled=true and hvs.mode hard or easy")
            options["static_color"] = True
        if p["enabled"]:
            if hvs_on:
                raise ConfigError("iou_policy.enabled=true replaces hard view selection (paper Table 5): "
                                  "set hvs.enabled=false")
            options["policy"] = IoUPolicy(p["start"], p["end"], total_steps=int(total_steps),
                                          alternate=p["alternate"], max_draws=p["max_draws"])
        transform = dataclasses.replace(method.view_transform(hvs_on), **options)
        return cls.rendering(transform, cfg["augment"].get("device", "loader"))

    # --- what the run asks of it ------------------------------------------------------
    @property
    def policy(self) -> IoUPolicy | None:
        """The IoU policy of the run's views (None without)."""
        return self.transform.policy

    @property
    def static_color(self) -> bool:
        return self.transform.static_color

    @property
    def n_views(self) -> int:
        """Candidates per image (V), over all crop slots."""
        return sum(n for _, n in self.transform.slots)

    def dataset(self, base, seed: int) -> MultiViewDataset:
        """``base`` (PIL images and labels) as a :class:`MultiViewDataset` of this pipeline's views."""
        return MultiViewDataset(base, self.transform, seed=seed)

    def to_device(self, batch, device, channels_last: bool = False) -> ViewBatch:
        """A batch of the loader (``(views, params, labels, index)``, collated
        by :func:`common.views.augment.collate`) as a :class:`ViewBatch` on
        ``device``: the views moved (``model_crop``: the decoded images), the
        device step run (``model``, ``model_crop``), and with static colour the
        own-colour renderings split from the candidates.  ``channels_last``: the
        image tensors in that memory format (``train.channels_last``)."""
        views, params, labels, index = batch
        views = views_to(views, device)
        if self.device_step is not None:  # the views from the recorded params
            views, params = self.device_step(views, params)
        if channels_last:
            views = views_channels_last(views)
        renders = None
        if self.static_color:  # the candidates, then their own-colour renderings
            if len(views) != 2 * self.n_views:
                raise RuntimeError(f"static colour: {len(views)} views in a batch of a transform of "
                                   f"{self.n_views} candidates (expected the candidates and their renderings)")
            views, renders = views[: self.n_views], views[self.n_views:]
        return ViewBatch(views, params, renders, labels, index)
