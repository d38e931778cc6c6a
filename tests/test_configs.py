"""Every YAML in configs/ resolves under its entry point's keys: a training
config builds its method; an evaluation config (``linear_*``, ``finetune_*``)
resolves on top of every protocol of its evaluation."""
from pathlib import Path

import pytest
import torch

from common.engine.config import COMMON_SPEC, resolve
from common.engine.registry import METHODS, get_method

ALL = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
EVALUATIONS = ("linear", "finetune")
CONFIGS = [p for p in ALL if p.stem.split("_")[0] not in EVALUATIONS]
EVAL_CONFIGS = [p for p in ALL if p.stem.split("_")[0] in EVALUATIONS]


def method_of(path: Path):
    """The method a config file is named after: the longest registered name
    that starts its name (``dino_stn_small`` -> dino_stn, ``dino_resnet_small`` -> dino)."""
    return get_method(max((m for m in METHODS if path.stem.startswith(m + "_")), key=len))


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=[p.stem for p in EVAL_CONFIGS])
def test_evaluation_config_resolves_on_every_protocol(path):
    import importlib

    module = importlib.import_module(f"eval.{path.stem.split('_')[0]}")
    spec = module.LINEAR_SPEC if path.stem.startswith("linear") else module.FINETUNE_SPEC
    for protocol in module.PROTOCOLS.values():
        cfg = resolve(spec, [protocol, path] if path != protocol else [path], [])
        assert cfg["train"]["batch_size"] >= 1 and cfg["optim"]["weight_decay"] >= 0


#: building the paper and GPU profiles' networks (ViT-S, ResNet-50) takes a while: the slow tier
BUILDS = [pytest.param(p, id=p.stem, marks=() if p.stem.endswith("_small") else pytest.mark.slow) for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_resolves(path):
    method_cls = method_of(path)
    cfg = resolve({**COMMON_SPEC, **method_cls.spec}, str(path), [])
    assert cfg["run"]["output_dir"].startswith("runs/") and cfg["train"]["batch_size"] >= 1


@pytest.mark.parametrize("path", BUILDS)
def test_config_resolves_and_builds(path):
    method_cls = method_of(path)
    cfg = resolve({**COMMON_SPEC, **method_cls.spec}, str(path), [])
    cfg["method"] = method_cls.name
    assert cfg["run"]["output_dir"].startswith("runs/")
    small = {"model": {**cfg["model"]}}
    if "out_dim" in cfg["model"]:  # DINO: keep the test light, the architecture as configured
        small["model"]["out_dim"] = 256
    method = method_cls({**cfg, **small}, torch.device("cpu"))
    assert method.arch(cfg) and method.image_size(cfg) > 0
    assert len(method.view_transform(True).slots) >= 1
    assert sum(k for _, k in method.pools()) >= 2


def test_off_and_on_keep_their_spelling_where_they_are_choices(tmp_path):
    """YAML reads ``off`` as false: train.amp=off (and ``amp: off`` in a file)
    is the choice 'off', not a refused boolean; a bool key stays a bool."""
    assert resolve(COMMON_SPEC, overrides=["train.amp=off"])["train"]["amp"] == "off"
    layer = tmp_path / "amp.yaml"
    layer.write_text("train:\n  amp: off\n")
    assert resolve(COMMON_SPEC, layer)["train"]["amp"] == "off"
    assert resolve(COMMON_SPEC, overrides=["hvs.enabled=on"])["hvs"]["enabled"] is True
