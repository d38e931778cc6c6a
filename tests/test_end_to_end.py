"""The end-to-end benchmark: the real training loop, baseline and HVS."""
import pytest


@pytest.mark.slow
def test_end_to_end_bench_times_both_variants(tmp_path, image_root):
    """bench.end_to_end trains baseline and HVS through the real loop and reports their step-time factor."""
    import yaml

    from bench.end_to_end import main as end_to_end
    from tests.helpers import TINY

    config = tmp_path / "simsiam_tiny.yaml"
    flat = dict(o.split("=", 1) for o in TINY)
    tree = {}
    for key, value in flat.items():
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    tree["data"]["data_dir"] = str(image_root)
    tree["train"] = {**tree.get("train", {}), "epochs": 3}
    config.write_text(yaml.safe_dump(tree))
    result = end_to_end(["--config", str(config), "--steps", "4", "--skip", "1", "--workdir", str(tmp_path / "w"),
                         "--output", str(tmp_path / "e2e.json")])
    assert result["method"] == "simsiam" and result["timed_steps"] == {"baseline": 3, "hvs": 3}
    assert result["factor"] > 0 and (tmp_path / "e2e.json").is_file()
