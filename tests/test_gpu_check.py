"""The one-command GPU check (bench/gpu_check.sh) runs end to end in its tiny
CPU form, so that it does not rot between the times a GPU is lent."""
import json
import subprocess

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_gpu_check_tiny_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--output", str(out),
                        "--work-dir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    sections = res["sections"]
    assert set(sections) == {"smoke", "overhead", "loader", "memory", "signal"}
    for name in ("smoke", "overhead", "loader", "signal"):
        assert sections[name]["ok"], sections[name].get("traceback")
        assert sections[name]["wall_s"] > 0
    assert res["environment"]["torch"] and res["environment"]["device"] == "cpu"
    assert res["commands"] and all(c["command"].startswith("python -m ") for c in res["commands"])

    smoke = sections["smoke"]
    for method in ("simsiam", "simclr", "dino", "ibot"):
        run = smoke[f"{method}/bf16"]
        assert run["ok"] is True, run.get("error")
        assert run["final_loss"] is not None and run["seconds"] > 0
        assert smoke[f"{method}/fp16"]["status"] == "skipped (CPU)"

    timed = [v for v in sections["overhead"].values() if isinstance(v, dict) and v.get("ok")]
    assert {v["command"].split("--method ")[1].split()[0] for v in timed} == {"simsiam", "dino"}
    assert all(f > 0 for v in timed for f in v["factors"].values())

    loader = sections["loader"]
    for key in ("N=2", "N=4", "model_crop N=2", "model_crop N=4"):  # augment.device loader and model_crop
        assert loader[key]["views_per_s"] > 0 and loader[key]["batches"] == 2
    assert sections["signal"]["augment_device"] == "model_crop"

    top1 = sections["signal"]["knn_top1"]
    assert set(top1) == {"hvs", "baseline"}
    assert all(isinstance(v, float) and 0 <= v <= 100 for v in top1.values())
    assert sections["memory"]["smoke"]  # a peak per subprocess


def test_every_section_and_subprocess_ends_by_its_deadline(tmp_path, monkeypatch):
    """The check fits --budget-seconds by construction: the sections' deadlines
    split the budget (the last one is its end), and a subprocess runs under a
    timeout that ends by its section's deadline, or is skipped."""
    import time

    from bench import gpu_check

    seen = {}

    def section(name):
        def run(self):
            seen[name] = self.deadline
            return {}
        return run

    for name in gpu_check.SECTIONS:
        monkeypatch.setattr(gpu_check.Check, name, section(name))
    start = time.monotonic()
    gpu_check.main(["--device", "cpu", "--budget-seconds", "100", "--output", str(tmp_path / "c.json"),
                    "--work-dir", str(tmp_path / "w")])
    deadlines = [seen[name] for name in gpu_check.SECTIONS]
    assert deadlines == sorted(deadlines) and start < deadlines[0]
    assert start + 100 <= deadlines[-1] <= time.monotonic() + 100  # the budget's end, measured from main's start

    timeouts = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, timeout, **k: timeouts.append(timeout)
                        or subprocess.CompletedProcess(a, 0, "", ""))
    check = gpu_check.Check(gpu_check.parse_args(["--device", "cpu", "--work-dir", str(tmp_path / "w")]))
    check.deadline = time.monotonic() + 60
    assert check.run("smoke", "a", "simsiam.main", [], timeout=300)["ok"] is True
    assert timeouts and timeouts[0] <= 60
    check.deadline = time.monotonic() + gpu_check.MIN_RUN_S / 2
    rec = check.run("smoke", "b", "simsiam.main", [], timeout=300)
    assert rec["ok"] is None and "skipped" in rec["status"] and len(timeouts) == 1
