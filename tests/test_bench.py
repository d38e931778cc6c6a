"""Smoke tests of the HVS overhead benchmark (bench/overhead.py): it runs and
writes a sane JSON, with the views, candidates and selector of the training
loop.  No timing assertions: timings depend on the machine."""
import json
import math
import time

import pytest
import torch

from bench import overhead
from bench.overhead import (METHODS, build_selector, first_candidates, main, method_config, multicrop_candidates,
                            parse_args)
from common.hvs import HardViewSelector
from dino.method import DINOMethod
from ibot.method import IBOTMethod
from tests.helpers import Hooks


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


@pytest.mark.slow
def test_overhead_smoke(tmp_path):
    out = tmp_path / "sub" / "overhead.json"
    main(["--arch", "resnet18", "model.cifar_stem=true", "--image-size", "16", "--batch-size", "4",
          "bench.repeats=1", "bench.warmup=0", "bench.resolutions=[1.0,0.5]", "--device", "cpu",
          "--output", str(out)])
    res = json.loads(out.read_text())
    check_rows(res, [1.0, 0.5])
    assert res["rows"][0]["paper_factor"] == 1.55
    assert res["pools"] == [[4, 2]] and res["combinations"] == 6
    assert all(row["teacher_reused"] is None for row in res["rows"])  # SimSiam has no teacher
    assert res["config"]["bench"]["resolutions"] == [1.0, 0.5] and "hvs.n_views=4" in res["overrides"]


def dino_args(*extra):
    return ["--method", "dino", "--image-size", "8", "model.patch_size=4", "--batch-size", "2",
            "model.out_dim=32", "augment.n_local=4", "hvs.local_candidates=8", "--device", "cpu", *extra]


SMOKE = ("bench.repeats=1", "bench.warmup=0", "bench.resolutions=[1.0,0.5]")


def test_dino_candidates_come_pool_after_pool_as_the_method_orders_them():
    bench = parse_args(dino_args())
    # per-method default, image size // 2
    assert bench["model"]["arch"] == "vit_tiny" and bench["augment"]["local_size"] == 4
    cfg, _ = method_config(bench)
    assert cfg["train"]["batch_size"] == 2
    pools = DINOMethod(cfg, torch.device("cpu")).pools()
    assert pools == [(2, 1), (2, 1), (8, 4)]
    cands = multicrop_candidates(cfg, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in cands] == [(2, 3, 8, 8)] * 4 + [(2, 3, 4, 4)] * 8
    assert cfg["optim"]["freeze_last_layer"] == 0  # the timed step trains the last layer


def test_dino_selector_is_built_as_the_training_loop_builds_it():
    cfg, _ = method_config(parse_args(dino_args()))
    method = DINOMethod(cfg, torch.device("cpu"))
    sel = build_selector(method, cfg, 0.5)
    assert sel.max_combinations == 128 == cfg["hvs"]["max_combinations"]
    assert sel.size_multiple == 4 == method.size_multiple
    assert sel.resolution == 0.5 and sel.pools == method.pools()
    assert len(sel.all_combos) == 2 * 2 * 70 and len(sel.combinations(torch.Generator())) == 128


@pytest.mark.slow
def test_dino_overhead_smoke(tmp_path):
    out = tmp_path / "dino.json"
    main(dino_args(*SMOKE, "--output", str(out)))
    res = json.loads(out.read_text())
    check_rows(res, [1.0, 0.5])
    assert res["arch"] == "vit_tiny/4" and res["method"] == "dino"
    assert [row["paper_factor"] for row in res["rows"]] == [2.15, 1.56]
    assert res["pools"] == [[2, 1], [2, 1], [8, 4]]
    assert res["combinations"] == 280 and res["max_combinations"] == 128
    # the selection's teacher outputs are reused only where exact: full-size selection
    assert [row["teacher_reused"] for row in res["rows"]] == [True, False]
    assert "augment.local_size=4" in res["overrides"] and "model.out_dim=32" in res["overrides"]


def refused(capsys, argv):
    """parse_args(argv) ends with status 2 and one error line; returns the line."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("bench.overhead: error:"), err
    return err[0]


def test_dino_sizes_must_fit_the_patches(capsys):
    assert "bench.image_size=30" in refused(capsys, ["--method", "dino", "--image-size", "30", "model.patch_size=4"])
    assert "augment.local_size=6" in refused(capsys, ["--method", "dino", "--image-size", "12",
                                                      "model.patch_size=4"])


@pytest.mark.parametrize("bad, key", [
    (["bench.resolutions=[0]"], "bench.resolutions"),
    (["bench.resolutions=[1.5,0.5]"], "bench.resolutions"),
    (["bench.resolutions=[]"], "bench.resolutions"),
    (["bench.repeats=0"], "bench.repeats"),
    (["bench.warmup=-1"], "bench.warmup"),
    (["--batch-size", "0"], "train.batch_size"),
    (["hvs.n_views=1"], "hvs.n_views"),
    (["--method", "moco"], "bench.method"),
    (["train.amp=fp8"], "train.amp"),
    (["--method", "dino", "hvs.global_candidates=3"], "hvs.global_candidates"),
    (["--method", "dino", "hvs.local_candidates=3"], "hvs.local_candidates"),
    (["bench.repeat=3"], "bench.repeat"),
])
def test_refuses_bad_values_before_building_a_model(bad, key, capsys, monkeypatch):
    monkeypatch.setattr(overhead, "benchmark", lambda cfg: pytest.fail("benchmark ran"))
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cpu", *bad])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("bench.overhead: error:") and key in err[0], err


def test_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key, spec in overhead.BENCH_SPEC.items():
        assert f"{key} = {spec['default']!r}" in out, key
    assert "--method" in out and "--image-size" in out


def ibot_args(*extra):
    return ["--method", "ibot", "--image-size", "8", "model.patch_size=4", "--batch-size", "2",
            "model.out_dim=32", "augment.n_local=4", "hvs.local_candidates=8", "--device", "cpu", *extra]


def test_ibot_defaults_follow_its_recipe():
    cfg = parse_args(["--method", "ibot", "--image-size", "32", "--device", "cpu"])
    assert cfg["model"]["arch"] == "vit_tiny" and cfg["augment"]["local_size"] == 16
    assert cfg["model"]["patch_size"] == 4 and cfg["hvs"]["local_candidates"] == 20
    # iBOT's 10 local crops; small prototypes on CPU
    assert cfg["augment"]["n_local"] == 10 and cfg["model"]["out_dim"] == 4096
    assert parse_args(["--method", "dino", "--device", "cpu"])["augment"]["n_local"] == 8  # DINO keeps its 8
    assert METHODS["ibot"].cls is IBOTMethod and METHODS["ibot"].paper is None  # no iBOT row in Table 14
    assert "no iBOT factor" in METHODS["ibot"].paper_setting


def test_ibot_candidates_and_selector_are_the_training_loops():
    cfg, _ = method_config(parse_args(ibot_args()))
    method = IBOTMethod(cfg, torch.device("cpu"))
    assert method.pools() == [(2, 1), (2, 1), (8, 4)]
    cands = multicrop_candidates(cfg, torch.Generator().manual_seed(0))
    assert [tuple(c.shape) for c in cands] == [(2, 3, 8, 8)] * 4 + [(2, 3, 4, 4)] * 8
    assert cfg["optim"]["freeze_last_layer"] == 0 and cfg["augment"]["global_scale"] == [0.25, 1.0]
    sel = build_selector(method, cfg, 0.5)
    assert sel.max_combinations == 128 and sel.size_multiple == 4 and sel.pools == method.pools()


@pytest.mark.slow
def test_ibot_overhead_smoke(tmp_path, capsys):
    out = tmp_path / "ibot.json"
    main(ibot_args(*SMOKE, "--output", str(out)))
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


def test_ibot_needs_a_vit(capsys):
    assert "model.arch=resnet18" in refused(capsys, ["--method", "ibot", "--arch", "resnet18"])
    assert "bench.image_size=30" in refused(capsys, ["--method", "ibot", "--image-size", "30"])


def test_gpu_default_out_dim_is_each_methods_own(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # parse_args only: nothing runs on a GPU
    assert parse_args(["--method", "ibot", "--device", "cuda", "--image-size", "32"])["model"]["out_dim"] == 8192
    assert parse_args(["--method", "dino", "--device", "cuda", "--image-size", "32"])["model"]["out_dim"] == 65536
    assert parse_args(["--method", "simsiam"])["run"]["device"] == "cuda"  # auto: the GPU
    parse_args(["--method", "simsiam", "--device", "cuda"])  # no prototypes: must not fail


def test_cuda_without_a_gpu_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "run.device=cuda" in refused(capsys, ["--device", "cuda"])
    assert parse_args([])["run"]["device"] == "cpu"


# --- issue 15, item 2: split of the HVS step, --precision, --compile ------------------------------------------------
def tiny_simsiam(*extra):
    return ["--arch", "resnet18", "--image-size", "8", "--batch-size", "4", "bench.repeats=2", "bench.warmup=0",
            "bench.resolutions=[1.0,0.5]", "--device", "cpu", *extra]


def test_precision_and_compile_flags_are_parsed():
    cfg = parse_args(["--device", "cpu"])
    assert cfg["bench"]["precision"] == "auto" and cfg["bench"]["compile"] is False  # SimSiam's hvs.precision
    assert parse_args(["--method", "dino", "--device", "cpu"])["bench"]["precision"] == "auto"  # DINO's default
    assert parse_args(["--method", "byol", "--device", "cpu"])["bench"]["precision"] == "fp32"  # not measured
    cfg = parse_args(["--device", "cpu", "--precision", "bf16", "--compile"])
    assert cfg["bench"]["precision"] == "bf16" and cfg["bench"]["compile"] is True
    assert cfg["bench"]["argv"] == ["--device", "cpu", "--precision", "bf16", "--compile"]
    assert parse_args(["--device", "cpu", "bench.compile=true"])["bench"]["compile"] is True
    mcfg, overrides = method_config(cfg)
    assert mcfg["hvs"]["precision"] == "bf16" and "hvs.precision=bf16" in overrides


@pytest.mark.parametrize("bad", [["--precision", "fp8"], ["--precision", "fp16", "--device", "cpu"]])
def test_bad_precision_is_refused(bad, capsys):
    assert "bench.precision" in refused(capsys, bad)


def test_precision_reaches_the_selectors():
    cfg, _ = method_config(parse_args(["--device", "cpu", "--precision", "bf16"]))
    method = METHODS["simsiam"].cls(cfg, torch.device("cpu"))
    assert build_selector(method, cfg, 0.5).precision == "bf16"
    assert build_selector(method, cfg, 0.5, "fp32").precision == "fp32"  # the agreement's reference


def test_split_selector_times_the_callables_and_changes_nothing():
    sel = HardViewSelector([(3, 2)])
    split = overhead.SplitSelector(sel, lambda: None)
    assert split.resolution == 1.0 and split.num_combinations == 3  # the selector's attributes
    cands = [torch.full((2, 1), float(i)) for i in range(3)]

    def outputs(c):
        time.sleep(0.01)
        return c

    def scores(out, combos):
        time.sleep(0.02)
        return torch.stack([(out[i] - out[j]).abs().sum(1) for i, j in combos.tolist()], 1)

    got = split(cands, Hooks(torch.nn.Identity(), outputs, scores))
    want = sel(cands, Hooks(torch.nn.Identity(), outputs, scores))
    assert torch.equal(got.choice, want.choice) and split.last is got
    assert 0.01 <= split.forward_s < 0.02 + 0.05 and 0.02 <= split.scoring_s < 0.02 + 0.05


def test_split_sums_to_the_hvs_step_and_bf16_agreement_is_reported(tmp_path, capsys):
    out = tmp_path / "split.json"
    main(tiny_simsiam("--precision", "bf16", "--output", str(out)))
    res = json.loads(out.read_text())
    check_rows(res, [1.0, 0.5])
    assert res["precision"] == "bf16" and res["selection_dtype"] == "bfloat16" and res["compile"] is False
    assert "hvs.precision=bf16" in res["overrides"]
    for row in res["rows"]:
        for key in ("forward_s", "scoring_s", "gather_s", "training_s"):
            assert row[key] >= 0, (key, row)
        assert 0.0 <= row["agreement"] <= 1.0
        for k in range(res["repeats"]):  # per repeat the parts are nested and add up to the step
            fwd, score, gather, train = (row[f"{part}_times"][k] for part in ("forward", "scoring", "gather", "training"))
            assert min(fwd, score, gather, train) >= 0
            assert fwd + score <= row["selection_times"][k] + 1e-6
            assert math.isclose(fwd + score + gather, row["selection_times"][k], rel_tol=1e-6, abs_tol=1e-6)
            assert math.isclose(fwd + score + gather + train, row["hvs_step_times"][k], rel_tol=1e-6, abs_tol=1e-6)
        assert row["forward_s"] + row["scoring_s"] <= row["selection_s"] * 1.5 + 1e-3  # medians: about
    table = capsys.readouterr().out
    assert "split of the HVS step" in table and "agreeing with fp32 (bfloat16)" in table


def test_fp32_selection_reports_no_agreement(tmp_path, capsys):
    out = tmp_path / "fp32.json"
    res = main(tiny_simsiam("--precision", "fp32", "bench.resolutions=[0.5]", "bench.repeats=1",
                            "--output", str(out)))
    assert res["selection_dtype"] == "float32" and res["rows"][0]["agreement"] is None
    assert "agreeing with fp32" not in capsys.readouterr().out


def test_agreement_compares_the_same_combinations_and_masks(tmp_path, monkeypatch):
    """iBOT (random masks, 128 of 280 combinations drawn per step): the fp32 reference call sees the
    combinations and masks of the timed call, so with an fp32 selector taken for a reduced one (the
    reference is built, the selection is not reduced) every sample agrees."""
    monkeypatch.setattr(overhead, "selection_dtype", lambda precision, device: torch.bfloat16)
    res = main(ibot_args("bench.repeats=2", "bench.warmup=0", "bench.resolutions=[1.0]", "--precision", "fp32",
                         "--output", str(tmp_path / "ibot.json")))
    assert res["rows"][0]["agreement"] == 1.0


def test_compile_is_recorded_and_applied(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    res = main(tiny_simsiam("--compile", "bench.resolutions=[0.5]", "bench.repeats=1",
                            "--output", str(tmp_path / "c.json")))
    assert res["compile"] is True and len(compiled) == 1
    assert json.loads((tmp_path / "c.json").read_text())["config"]["bench"]["compile"] is True


def test_compile_failure_is_one_line_and_status_2(tmp_path, monkeypatch, capsys):
    def broken(model):
        def run(*args, **kwargs):
            raise RuntimeError("backend exploded\nlong traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(SystemExit) as exc:
        main(tiny_simsiam("--compile", "--output", str(tmp_path / "c.json")))
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "torch.compile failed" in err[0] and "backend exploded" in err[0], err


@pytest.mark.parametrize("method", ["byol", "mocov3", "barlowtwins", "vicreg"])
def test_overhead_benchmark_knows_the_methods_beyond_the_paper(tmp_path, method, one_thread):
    """Each is timed with its two view recipes ((N/2)^2 = 4 pairs of one
    candidate per recipe), and a projector width set on the command line
    reaches the method (0 leaves the method's own)."""
    from bench.overhead import main as bench_main

    widths = ["model.proj_hidden=64", "model.dim=32"] if method != "mocov3" else []  # MoCo v3: mlp_hidden
    res = bench_main(["--method", method, "--image-size", "16", "--batch-size", "4", "bench.repeats=1",
                      "bench.warmup=0", "bench.resolutions=[1.0]", "--device", "cpu", *widths,
                      "--output", str(tmp_path / "overhead.json")])
    assert [list(p) for p in res["pools"]] == [[2, 1], [2, 1]] and res["combinations"] == 4 and res["rows"][0]["paper_factor"] is None
    assert math.isfinite(res["rows"][0]["factor"])
    assert [o for o in res["overrides"] if o.startswith(("model.proj_hidden", "model.dim"))] == widths
