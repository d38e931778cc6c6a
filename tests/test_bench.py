"""Smoke test of the HVS overhead benchmark (bench/overhead.py): it runs and
writes a sane JSON.  No timing assertions: timings depend on the machine."""
import json
import math

from bench.overhead import first_candidates, main


def test_first_candidates_takes_k_of_each_pool():
    assert first_candidates([(4, 2)], list("abcd")) == ["a", "b"]
    assert first_candidates([(2, 2), (3, 1)], list("abcde")) == ["a", "b", "c"]


def test_overhead_smoke(tmp_path):
    out = tmp_path / "sub" / "overhead.json"
    main(["--arch", "resnet18", "--cifar-stem", "--image-size", "16", "--batch-size", "4",
          "--repeats", "1", "--warmup", "0", "--resolutions", "1.0", "0.5", "--device", "cpu",
          "--output", str(out)])
    res = json.loads(out.read_text())
    assert [row["resolution"] for row in res["rows"]] == [1.0, 0.5]
    for row in res["rows"]:
        for key in ("factor", "hvs_step_s", "baseline_step_s", "selection_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
    assert res["rows"][0]["paper_factor"] == 1.55
