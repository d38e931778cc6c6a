"""Every YAML in configs/ resolves under its method's keys and builds its method."""
from pathlib import Path

import pytest
import torch

from common.config import COMMON_SPEC, resolve
from common.registry import get_method

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_resolves_and_builds(path):
    method_cls = get_method(path.stem.split("_")[0])
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
