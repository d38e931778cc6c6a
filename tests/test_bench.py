"""Smoke tests of the HVS overhead benchmark (bench/overhead.py): it runs and
writes a sane JSON, with the views, candidates and selector of the training
loop.  No timing assertions: timings depend on the machine."""
import json
import math

import pytest
import torch

from bench.overhead import METHODS, build_selector, first_candidates, main, multicrop_candidates, parse_args
from common.config import COMMON_SPEC, resolve
from dino.method import DINOMethod
from ibot.method import IBOTMethod


def test_first_candidates_takes_k_of_each_pool():
    assert first_candidates([(4, 2)], list("abcd")) == ["a", "b"]
    assert first_candidates([(2, 2), (3, 1)], list("abcde")) == ["a", "b", "c"]
    # DINO: global slot 1, global slot 2, then n_local of the local candidates
    assert first_candidates([(2, 1), (2, 1), (4, 2)], list("ABCDwxyz")) == ["A", "C", "w", "x"]


def check_rows(res, resolutions):
    assert [row["resolution"] for row in res["rows"]] == resolutions
    for row in res["rows"]:
        for key in ("factor", "hvs_step_s", "baseline_step_s", "selection_s"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_overhead_smoke(tmp_path):
    out = tmp_path / "sub" / "overhead.json"
    main(["--arch", "resnet18", "--cifar-stem", "--image-size", "16", "--batch-size", "4",
          "--repeats", "1", "--warmup", "0", "--resolutions", "1.0", "0.5", "--device", "cpu",
          "--output", str(out)])
    res = json.loads(out.read_text())
    check_rows(res, [1.0, 0.5])
    assert res["rows"][0]["paper_factor"] == 1.55
    assert res["pools"] == [[4, 2]] and res["combinations"] == 6
    assert all(row["teacher_reused"] is None for row in res["rows"])  # SimSiam has no teacher


def dino_args(*extra):
    return ["--method", "dino", "--image-size", "8", "--patch-size", "4", "--batch-size", "2",
            "--out-dim", "32", "--n-local", "4", "--local-candidates", "8", "--device", "cpu", *extra]


def test_dino_candidates_come_pool_after_pool_as_the_method_orders_them():
    args = parse_args(dino_args())
    assert args.arch == "vit_tiny" and args.local_size == 4  # per-method default, image-size // 2
    cfg = resolve({**COMMON_SPEC, **DINOMethod.spec}, None,
                  [*METHODS["dino"].overrides(args), f"train.batch_size={args.batch_size}"])
    pools = DINOMethod(cfg, torch.device("cpu")).pools()
    assert pools == [(2, 1), (2, 1), (8, 4)]
    cands = multicrop_candidates(cfg, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in cands] == [(2, 3, 8, 8)] * 4 + [(2, 3, 4, 4)] * 8
    assert cfg["optim"]["freeze_last_layer"] == 0  # the timed step trains the last layer


def test_dino_selector_is_built_as_the_training_loop_builds_it():
    args = parse_args(dino_args())
    cfg = resolve({**COMMON_SPEC, **DINOMethod.spec}, None, METHODS["dino"].overrides(args))
    method = DINOMethod(cfg, torch.device("cpu"))
    sel = build_selector(method, cfg, 0.5)
    assert sel.max_combinations == 128 == cfg["hvs"]["max_combinations"]
    assert sel.size_multiple == 4 == method.size_multiple
    assert sel.resolution == 0.5 and sel.pools == method.pools()
    assert len(sel.all_combos) == 2 * 2 * 70 and len(sel.combinations(torch.Generator())) == 128


def test_dino_overhead_smoke(tmp_path):
    out = tmp_path / "dino.json"
    main(dino_args("--repeats", "1", "--warmup", "0", "--resolutions", "1.0", "0.5", "--output", str(out)))
    res = json.loads(out.read_text())
    check_rows(res, [1.0, 0.5])
    assert res["arch"] == "vit_tiny/4" and res["method"] == "dino"
    assert [row["paper_factor"] for row in res["rows"]] == [2.15, 1.56]
    assert res["pools"] == [[2, 1], [2, 1], [8, 4]]
    assert res["combinations"] == 280 and res["max_combinations"] == 128
    # the selection's teacher outputs are reused only where exact: full-size selection
    assert [row["teacher_reused"] for row in res["rows"]] == [True, False]
    assert "augment.local_size=4" in res["overrides"] and "model.out_dim=32" in res["overrides"]


def test_dino_sizes_must_fit_the_patches():
    with pytest.raises(SystemExit):
        parse_args(["--method", "dino", "--image-size", "30", "--patch-size", "4"])


def ibot_args(*extra):
    return ["--method", "ibot", "--image-size", "8", "--patch-size", "4", "--batch-size", "2",
            "--out-dim", "32", "--n-local", "4", "--local-candidates", "8", "--device", "cpu", *extra]


def test_ibot_defaults_follow_its_recipe():
    args = parse_args(["--method", "ibot", "--image-size", "32", "--device", "cpu"])
    assert args.arch == "vit_tiny" and args.local_size == 16 and args.patch_size == 4
    assert args.n_local == 10 and args.out_dim == 4096  # iBOT's 10 local crops; small prototypes on CPU
    assert parse_args(["--method", "dino", "--device", "cpu"]).n_local == 8  # DINO keeps its 8
    assert METHODS["ibot"].cls is IBOTMethod and METHODS["ibot"].paper is None  # no iBOT row in Table 14
    assert "no iBOT factor" in METHODS["ibot"].paper_setting


def test_ibot_candidates_and_selector_are_the_training_loops():
    args = parse_args(ibot_args())
    cfg = resolve({**COMMON_SPEC, **IBOTMethod.spec}, None,
                  [*METHODS["ibot"].overrides(args), f"train.batch_size={args.batch_size}"])
    method = IBOTMethod(cfg, torch.device("cpu"))
    assert method.pools() == [(2, 1), (2, 1), (8, 4)]
    cands = multicrop_candidates(cfg, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in cands] == [(2, 3, 8, 8)] * 4 + [(2, 3, 4, 4)] * 8
    assert cfg["optim"]["freeze_last_layer"] == 0 and cfg["augment"]["global_scale"] == [0.25, 1.0]
    sel = build_selector(method, cfg, 0.5)
    assert sel.max_combinations == 128 and sel.size_multiple == 4 and sel.pools == method.pools()


def test_ibot_overhead_smoke(tmp_path, capsys):
    out = tmp_path / "ibot.json"
    main(ibot_args("--repeats", "1", "--warmup", "0", "--resolutions", "1.0", "0.5", "--output", str(out)))
    res = json.loads(out.read_text())
    check_rows(res, [1.0, 0.5])
    assert res["arch"] == "vit_tiny/4" and res["method"] == "ibot"
    assert [row["paper_factor"] for row in res["rows"]] == [None, None]  # Table 14 has no iBOT row
    assert res["pools"] == [[2, 1], [2, 1], [8, 4]]
    assert res["combinations"] == 280 and res["max_combinations"] == 128
    assert [row["teacher_reused"] for row in res["rows"]] == [True, False]
    assert "masks ratio" in res["setting"] and "model.out_dim=32" in res["overrides"]
    table = capsys.readouterr().out
    assert "ibot vit_tiny/4" in table and "no iBOT factor in the paper" in table


def test_ibot_needs_a_vit():
    with pytest.raises(SystemExit):
        parse_args(["--method", "ibot", "--arch", "resnet18"])
    with pytest.raises(SystemExit):
        parse_args(["--method", "ibot", "--image-size", "30", "--patch-size", "4"])


def test_gpu_default_out_dim_is_each_methods_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parse_args only: nothing runs on a GPU
    assert parse_args(["--method", "ibot", "--device", "cuda", "--image-size", "32"]).out_dim == 8192
    assert parse_args(["--method", "dino", "--device", "cuda", "--image-size", "32"]).out_dim == 65536
    parse_args(["--method", "simsiam", "--device", "cuda"])  # no prototypes: must not fail
