"""The view pipeline (common/views/pipeline.py): built once from the config,
never changed afterwards, and the typed batch it hands the training loop."""
import copy
import dataclasses

import pytest
import torch

from common.engine.config import ConfigError
from common.engine.runtime import EpochSampler
from common.engine.train import build_train_data
from common.views.augment import P, collate
from common.views.photometric import DevicePhotometric, DeviceViews
from common.views.pipeline import ViewBatch, ViewPipeline
from simsiam.method import SimSiamMethod
from tests.helpers import TINY, cli, dino_cfg, tiny_cfg

CPU = torch.device("cpu")


def simsiam(tmp_path, image_root, *overrides):
    cfg = tiny_cfg(SimSiamMethod, tmp_path, image_root, *overrides)
    return cfg, SimSiamMethod(cfg, CPU)


def loaded_batch(pipeline, image_root, n=3, step=None):
    """The first ``n`` images of the tiny training set, drawn (at training
    ``step``: the IoU policy's) and collated as the loader does."""
    from common.views.data import build_dataset

    dataset = pipeline.dataset(build_dataset("imagefolder", "train", str(image_root)), seed=0)
    return collate([dataset[i if step is None else (i, step)] for i in range(n)])


# ----------------------------------------------------------------------------
# built once, frozen
# ----------------------------------------------------------------------------
def test_the_pipeline_is_frozen(tmp_path, image_root):
    cfg, method = simsiam(tmp_path, image_root, "iou_policy.enabled=true", "augment.device=model")
    pipeline = ViewPipeline.from_cfg(cfg, method, total_steps=12)
    assert isinstance(pipeline.device_step, DevicePhotometric)
    for obj, name, value in ((pipeline, "device_step", None), (pipeline.transform, "static_color", True),
                             (pipeline.transform, "policy", None), (pipeline.transform, "photometric", "loader"),
                             (pipeline.policy, "total_steps", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)
    assert pipeline.policy.total_steps == 12 and pipeline.transform.photometric == "model"


def test_options_come_from_the_config_once(tmp_path, image_root):
    """static colour, the IoU policy (with its schedule length) and the device
    mode are the transform's from its construction; the method's slots are kept."""
    cfg, method = simsiam(tmp_path, image_root, "hvs.enabled=true", "hvs.static_color=true",
                          "augment.device=model_crop")
    pipeline = ViewPipeline.from_cfg(cfg, method)
    assert pipeline.static_color and pipeline.policy is None and isinstance(pipeline.device_step, DeviceViews)
    assert pipeline.transform.slots == method.view_transform(True).slots and pipeline.n_views == 4
    plain = ViewPipeline.from_cfg(tiny_cfg(SimSiamMethod, tmp_path, image_root), method)
    assert not plain.static_color and plain.policy is None and plain.device_step is None
    assert plain.transform == method.view_transform(False)  # loader, no options: the method's transform as it is


def test_a_run_builds_the_policy_with_its_steps_and_tags_the_samples(tmp_path, image_root):
    """The IoU policy's schedule covers epochs x steps per epoch (the cap of
    run.max_steps_per_epoch included), known before the dataset is made; the
    sampler tags the samples with those steps from its construction."""
    for extra, iters in (([], 4), (["run.max_steps_per_epoch=3"], 3)):
        cfg, method = simsiam(tmp_path, image_root, "iou_policy.enabled=true", "train.epochs=5", *extra)
        pipeline, dataset, sampler, got_iters = build_train_data(cfg, method, 8)
        assert got_iters == iters and pipeline.policy.total_steps == 5 * iters
        assert sampler.tag_steps and sampler.steps_per_epoch == iters
        assert dataset.transform is pipeline.transform
    cfg, method = simsiam(tmp_path, image_root)
    pipeline, _, sampler, _ = build_train_data(cfg, method, 8)
    assert pipeline.policy is None and not sampler.tag_steps


def test_drawing_batches_changes_nothing(tmp_path, image_root):
    cfg, method = simsiam(tmp_path, image_root, "iou_policy.enabled=true", "augment.device=model")
    pipeline = ViewPipeline.from_cfg(cfg, method, total_steps=8)
    transform, step = copy.deepcopy(pipeline.transform), pipeline.device_step
    views = pipeline.to_device(loaded_batch(pipeline, image_root, step=5), CPU)
    assert isinstance(views, ViewBatch) and views.renders is None and (views.params[:, :2, P["draws"]] >= 1).all()
    assert pipeline.transform == transform and pipeline.device_step is step


@pytest.mark.parametrize("drop_last", [True, False])
def test_the_batch_count_is_known_before_the_sampler(drop_last):
    for n, bs, world in ((32, 8, 1), (33, 8, 2), (7, 8, 1), (100, 3, 4)):
        sampler = EpochSampler(n, bs, seed=0, world=world, drop_last=drop_last)
        assert EpochSampler.count_batches(n, bs, world, drop_last) == sampler.batches
        assert sampler.steps_per_epoch == sampler.batches and not sampler.tag_steps


# ----------------------------------------------------------------------------
# the typed batch: static colour split by the pipeline, in every device mode
# ----------------------------------------------------------------------------
def test_static_colour_batches_come_split_in_every_device_mode(tmp_path, image_root):
    batches = {}
    for where in ("loader", "model", "model_crop"):
        cfg, method = simsiam(tmp_path, image_root, "hvs.enabled=true", "hvs.static_color=true",
                              f"augment.device={where}")
        pipeline = ViewPipeline.from_cfg(cfg, method)
        loaded = loaded_batch(pipeline, image_root)
        batch = pipeline.to_device(loaded, CPU)
        assert len(batch.candidates) == len(batch.renders) == 4 and batch.params.shape[:2] == (3, 4)
        assert torch.equal(batch.index, loaded[3]) and torch.equal(batch.labels, loaded[2])
        batches[where] = batch
    ref = batches["loader"]
    for where in ("model", "model_crop"):  # the same candidates, renderings and rows as the loader path
        b = batches[where]
        assert torch.equal(b.params, ref.params)
        assert all(torch.equal(x, y) for x, y in zip(b.candidates + b.renders, ref.candidates + ref.renders))
    # shared colour in the candidates, each rendering its own: the two halves differ
    assert any(not torch.equal(c, r) for c, r in zip(ref.candidates, ref.renders))


def test_multicrop_static_colour_is_split_at_the_transform_s_view_count(tmp_path, image_root):
    from dino.method import DINOMethod

    cfg = dino_cfg(tmp_path, image_root, "hvs.enabled=true", "hvs.static_color=true", "augment.device=model")
    pipeline = ViewPipeline.from_cfg(cfg, DINOMethod(cfg, CPU))
    batch = pipeline.to_device(loaded_batch(pipeline, image_root, n=2), CPU)
    assert pipeline.n_views == 8 and len(batch.candidates) == len(batch.renders) == 8
    assert [c.shape[-1] for c in batch.candidates] == [c.shape[-1] for c in batch.renders] == [16] * 4 + [8] * 4


def test_without_static_colour_there_are_no_renderings(tmp_path, image_root):
    for where in ("loader", "model_crop"):
        cfg, method = simsiam(tmp_path, image_root, "hvs.enabled=true", f"augment.device={where}")
        pipeline = ViewPipeline.from_cfg(cfg, method)
        batch = pipeline.to_device(loaded_batch(pipeline, image_root), CPU)
        assert batch.renders is None and len(batch.candidates) == 4 and batch.params.shape[1] == 4


# ----------------------------------------------------------------------------
# the configurations that cannot run
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["hvs.static_color=true"], "hvs.static_color=true .* needs hvs.enabled=true and hvs.mode hard or easy"),
    (["hvs.static_color=true", "hvs.enabled=true", "hvs.mode=random"], "hvs.static_color=true"),
    (["iou_policy.enabled=true", "hvs.enabled=true"], "iou_policy.enabled=true replaces .* set hvs.enabled=false"),
])
def test_impossible_options_are_config_errors(tmp_path, image_root, overrides, message):
    cfg, method = simsiam(tmp_path, image_root, *overrides)
    with pytest.raises(ConfigError, match=message):
        ViewPipeline.from_cfg(cfg, method)


def test_an_impossible_option_is_one_line_and_exit_status_2(tmp_path, image_root):
    out = tmp_path / "run"
    r = cli("-m", "simsiam.main", "--output-dir", str(out), "--data-dir", str(image_root), *TINY,
            "hvs.static_color=true")
    assert r.returncode == 2, r.stderr
    assert "hvs.static_color=true" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()


def test_an_unknown_device_mode_is_refused():
    from common.views.augment import MultiViewTransform

    with pytest.raises(ValueError, match="augment.device='gpu'"):
        ViewPipeline.rendering(MultiViewTransform(), "gpu")
