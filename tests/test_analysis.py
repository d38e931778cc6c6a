"""The analysis package (analysis/): reading selection logs, pair metrics, the
IoU analysis, the fANOVA importance table, the selected-pair predictor and the
three command lines, on small synthetic logs written here in the format of
``common.engine.logs.SelectionLog``."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from analysis import importance, iou, predict
from analysis.logs import AnalysisError, load_selection
from analysis.metrics import PAIR_METRICS, iou as pair_iou, pair_metrics
from common.views.augment import P, PARAM_NAMES, box_iou

ROOT = Path(__file__).resolve().parents[1]


# --- synthetic logs ---------------------------------------------------------------

def view_row(box=(0, 0, 10, 10), img=(100, 100), flip=0, jitter=None, gray=0, blur=0.0, solarize=0):
    """One parameter row: crop box (x, y, w, h) in original pixels, jitter
    (brightness, contrast, saturation, hue) or None (neutral, not applied)."""
    row = np.zeros(len(PARAM_NAMES), np.float32)
    row[[P["img_w"], P["img_h"]]] = img
    row[[P["crop_x"], P["crop_y"], P["crop_w"], P["crop_h"]]] = box
    row[P["flip"]], row[P["gray"]], row[P["blur_sigma"]], row[P["solarize"]] = flip, gray, blur, solarize
    row[[P["brightness"], P["contrast"], P["saturation"], P["hue"]]] = jitter if jitter is not None else (1, 1, 1, 0)
    row[P["jitter"]] = jitter is not None
    row[[P[f"order{k}"] for k in range(4)]] = (0, 1, 2, 3) if jitter is not None else (-1,) * 4
    return row


def random_params(rng, shape):
    """Rows [*shape, P] drawn like a random resized crop (scale 0.2-1) with
    random flips, jitter, grayscale and blur; the image size is per sample."""
    params = np.zeros((*shape, len(PARAM_NAMES)), np.float32)
    W = rng.integers(60, 140, shape[:1]).astype(np.float32)[:, None] * np.ones(shape, np.float32)
    H = rng.integers(60, 140, shape[:1]).astype(np.float32)[:, None] * np.ones(shape, np.float32)
    area = rng.uniform(0.2, 1.0, shape) * W * H
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), shape))
    w, h = np.minimum(W, np.sqrt(area * ratio)), np.minimum(H, np.sqrt(area / ratio))
    jitter = rng.random(shape) < 0.8
    for name, value in {"img_w": W, "img_h": H, "crop_w": w, "crop_h": h, "crop_x": rng.random(shape) * (W - w),
                        "crop_y": rng.random(shape) * (H - h), "flip": rng.random(shape) < 0.5, "jitter": jitter,
                        "brightness": np.where(jitter, rng.uniform(0.6, 1.4, shape), 1),
                        "contrast": np.where(jitter, rng.uniform(0.6, 1.4, shape), 1),
                        "saturation": np.where(jitter, rng.uniform(0.6, 1.4, shape), 1),
                        "hue": np.where(jitter, rng.uniform(-0.1, 0.1, shape), 0),
                        "gray": rng.random(shape) < 0.2,
                        "blur_sigma": np.where(rng.random(shape) < 0.5, rng.uniform(0.1, 2, shape), 0)}.items():
        params[..., P[name]] = value
    return params


def write_log(run_dir, step, params, combos, scores, choice, rank=0, index=None, config=None):
    """``run_dir/selection/rank{r}_steps{a}-{b}.npz`` as SelectionLog writes it."""
    folder = Path(run_dir) / "selection"
    folder.mkdir(parents=True, exist_ok=True)
    step = np.asarray(step, np.int64)
    n, B = params.shape[:2]
    index = np.arange(n * B).reshape(n, B) if index is None else index
    path = folder / f"rank{rank}_steps{step[0]:08d}-{step[-1]:08d}.npz"
    np.savez_compressed(path, param_names=np.array(PARAM_NAMES), step=step, index=index,
                        params=params.astype(np.float32), combos=np.asarray(combos, np.int64),
                        scores=np.asarray(scores, np.float32), choice=np.asarray(choice, np.int64))
    if config is not None:
        (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def chosen_by(rule, ious, rng):
    """Choice [n, B] from the pair IoUs [n, B, C]: the lowest-IoU pair or random."""
    if rule == "lowest_iou":
        return ious.argmin(-1)
    return rng.integers(0, ious.shape[-1], ious.shape[:-1])


def pair_run(run_dir, rule="lowest_iou", steps=4, B=64, N=4, seed=0, ranks=1, method="simsiam"):
    """A SimSiam-like HVS run: N views, all C(N, 2) pairs compared; score =
    1 - IoU + 0.2 |brightness difference| + noise; ``rule`` lowest_iou (the
    choice is the lowest-IoU pair) or random (scores NaN, as hvs.mode=random)."""
    rng = np.random.default_rng(seed)
    combos = np.array(list(itertools.combinations(range(N), 2)))
    for r in range(ranks):
        params = random_params(rng, (steps * B, N)).reshape(steps, B, N, -1)
        a, b = params[:, :, combos[:, 0]], params[:, :, combos[:, 1]]
        ious = pair_iou(a, b)
        scores = 1 - ious + 0.2 * pair_metrics(a, b, ["brightness"])["brightness"] + rng.normal(0, 0.02, ious.shape)
        if rule == "random":
            scores = np.full(ious.shape, np.nan)
        write_log(run_dir, np.arange(steps) * 10, params, np.broadcast_to(combos, (steps, *combos.shape)),
                  scores, chosen_by(rule, ious, rng), rank=r,
                  config={"method": method, "hvs": {"enabled": True, "mode": "random" if rule == "random" else "hard"}})
    return Path(run_dir)


def baseline_run(run_dir, steps=4, B=64, seed=1):
    """No HVS: 2 views, one pair [[0, 1]], choice 0, scores NaN."""
    rng = np.random.default_rng(seed)
    params = random_params(rng, (steps * B, 2)).reshape(steps, B, 2, -1)
    return write_log(run_dir, np.arange(steps) * 10, params, np.zeros((steps, 1, 2), np.int64) + [0, 1],
                     np.full((steps, B, 1), np.nan), np.zeros((steps, B), np.int64),
                     config={"method": "simsiam", "hvs": {"enabled": False, "mode": "hard"}}).parent.parent


def dino_run(run_dir, steps=3, B=16, g=2, L=6, n_local=2, max_combos=24, seed=2):
    """A DINO-like HVS run: candidates [g global-1, g global-2, L local], each
    step a random subset of the combinations (1 + 1 global, n_local locals);
    score = 1 - IoU of the two global crops + noise, choice = argmax."""
    rng = np.random.default_rng(seed)
    every = np.array([(a, g + b, *(2 * g + np.array(loc))) for a in range(g) for b in range(g)
                      for loc in itertools.combinations(range(L), n_local)])
    combos = np.stack([every[np.sort(rng.choice(len(every), max_combos, replace=False))] for _ in range(steps)])
    params = random_params(rng, (steps * B, 2 * g + L)).reshape(steps, B, 2 * g + L, -1)
    rows = np.arange(B)[:, None]
    ious = np.stack([pair_iou(params[s][rows, combos[s, :, 0]], params[s][rows, combos[s, :, 1]])
                     for s in range(steps)])
    scores = 1 - ious + rng.normal(0, 0.01, ious.shape)
    return write_log(run_dir, np.arange(steps), params, combos, scores, scores.argmax(-1),
                     config={"method": "dino", "hvs": {"enabled": True, "mode": "hard"}}).parent.parent


# --- pair metrics -------------------------------------------------------------------

def test_pair_metrics_by_hand():
    a = view_row((0, 0, 50, 50), jitter=(1.2, 0.8, 1.0, 0.1), gray=1, blur=1.5)
    b = view_row((25, 25, 50, 50))
    m = pair_metrics(a, b)
    assert set(m) == set(PAIR_METRICS)
    assert m["iou"] == pytest.approx(625 / (2500 + 2500 - 625))  # 25 x 25 overlap
    assert m["centre_distance"] == pytest.approx(np.hypot(25, 25) / np.hypot(100, 100))  # = 0.25
    assert m["colour_distance"] == pytest.approx(np.sqrt(0.2 ** 2 + 0.2 ** 2 + 0 + 0.1 ** 2), abs=1e-6)
    assert (m["brightness"], m["contrast"], m["saturation"]) == pytest.approx((0.2, 0.2, 0.0), abs=1e-6)
    assert m["hue"] == pytest.approx(0.1, abs=1e-6)
    assert (m["gray"], m["blur_sigma"], m["flip"], m["solarize"], m["area_ratio"]) == pytest.approx((1, 1.5, 0, 0, 1))
    # a flipped view has the same box: same IoU and centre distance, and the flip metric says it differs
    flipped = pair_metrics(a, view_row((25, 25, 50, 50), flip=1))
    assert (float(flipped["iou"]), float(flipped["centre_distance"]), float(flipped["flip"])) == pytest.approx((float(m["iou"]), 0.25, 1))
    # disjoint, identical, nested boxes; a non-square image's diagonal
    assert pair_metrics(view_row((0, 0, 40, 40)), view_row((50, 50, 40, 40)))["iou"] == 0
    assert pair_metrics(a, a)["iou"] == 1 and pair_metrics(a, a)["centre_distance"] == 0
    nested = pair_metrics(view_row((0, 0, 50, 50)), view_row((10, 10, 20, 25)))
    assert (nested["iou"], nested["area_ratio"]) == pytest.approx((500 / 2500, 500 / 2500))
    wide = pair_metrics(view_row((0, 0, 10, 10), img=(300, 400)), view_row((30, 40, 10, 10), img=(300, 400)))
    assert wide["centre_distance"] == pytest.approx(50 / 500)


def test_pair_metrics_vectorise_and_agree_with_box_iou():
    params = random_params(np.random.default_rng(0), (5, 3))
    m = pair_metrics(params[:, :, None], params[:, None, :])  # all pairs of views of every sample
    assert m["iou"].shape == (5, 3, 3) and np.allclose(np.diagonal(m["iou"], axis1=1, axis2=2), 1)
    expected = box_iou(torch.from_numpy(params[:, :, None]).double(), torch.from_numpy(params[:, None, :]).double())
    assert np.allclose(m["iou"], expected.numpy())
    one = pair_metrics(params[2, 0], params[2, 1])
    assert all(np.isclose(one[k], m[k][2, 0, 1]) for k in PAIR_METRICS)
    with pytest.raises(ValueError, match="unknown pair metrics"):
        pair_metrics(params[0, 0], params[0, 1], ["iou", "zoom"])


# --- reading the logs ------------------------------------------------------------

def test_load_concatenates_ranks_and_files(tmp_path):
    run = pair_run(tmp_path / "run", steps=4, B=8, ranks=2)
    data = load_selection(run)
    assert data.n_samples == 2 * 4 * 8 and data.n_views == 4 and data.combos.shape == (4, 6, 2)
    assert list(data.step) == [0, 10, 20, 30] and np.bincount(data.block).tolist() == [16] * 4
    assert data.pairs.shape == (4, 6, 2) and (data.combo_pair == np.arange(6)).all()
    assert (data.method, data.selection, data.layout, data.has_scores) == ("simsiam", "hard", "pair", True)
    assert "slots 0 and 1" in data.pair_definition
    # a later file of the same steps (a run resumed from an older checkpoint) replaces the earlier one
    before = load_selection(run)
    again = pair_run(tmp_path / "again", steps=2, B=8, seed=5)
    f = next((again / "selection").glob("*.npz"))
    target = run / "selection" / "rank0_steps00000000-00000010.npz"
    target.write_bytes(f.read_bytes())
    after = load_selection(run)
    assert after.n_samples == before.n_samples
    assert np.array_equal(after.params[after.sample_step == 0][:8], load_selection(again).params[:8])


def test_load_reorders_parameter_columns(tmp_path):
    run = pair_run(tmp_path / "run", steps=1, B=4)
    path = next((run / "selection").glob("*.npz"))
    z = dict(np.load(path))
    order = np.arange(len(PARAM_NAMES))[::-1]
    z["params"], z["param_names"] = z["params"][..., order], z["param_names"][order]
    np.savez_compressed(path, **z)
    data = load_selection(run)
    assert np.array_equal(data.params, np.load(path)["params"][0][..., order])
    # a column the metrics do not read may be missing (an older log): NaN; one they read may not
    for name, error in (("order0", None), ("crop_w", "lacks the parameter columns")):
        keep = [i for i, n in enumerate(PARAM_NAMES) if n != name]
        np.savez_compressed(path, **{**z, "params": data.params[None][..., keep],
                                     "param_names": np.array(PARAM_NAMES)[keep]})
        if error:
            with pytest.raises(AnalysisError, match=error):
                load_selection(run)
        else:
            assert np.isnan(load_selection(run).params[..., P[name]]).all()


def test_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match=r"empty has no selection/\*\.npz: train with run.selection_log_every > 0"):
        load_selection(tmp_path / "empty")
    with pytest.raises(AnalysisError, match="does not exist"):
        load_selection(tmp_path / "missing")
    run = pair_run(tmp_path / "run", steps=2, B=4)
    path = next((run / "selection").glob("*.npz"))
    path.write_bytes(path.read_bytes()[:200])  # cut short
    with pytest.raises(AnalysisError, match=f"{path.name} is damaged"):
        load_selection(run)
    np.savez_compressed(path, step=np.arange(2))
    with pytest.raises(AnalysisError, match="not a selection log"):
        load_selection(run)


def test_dino_pairs_are_the_global_crops(tmp_path):
    data = load_selection(dino_run(tmp_path / "dino"))
    assert (data.layout, data.method, data.combos.shape[2]) == ("multicrop", "dino", 4)
    assert "global crops" in data.pair_definition
    for b in range(len(data.step)):
        pairs = data.pairs[b][data.pairs[b, :, 0] >= 0]
        assert sorted(map(tuple, pairs.tolist())) == sorted(set(map(tuple, data.combos[b, :, :2].tolist())))
        assert (pairs[data.combo_pair[b]] == data.combos[b, :, :2]).all()
    assert set(map(tuple, data.pairs.reshape(-1, 2).tolist())) <= {(0, 2), (0, 3), (1, 2), (1, 3), (-1, -1)}
    # a rank that compared other combinations at the same steps: blocks of their own, same step
    other = dino_run(tmp_path / "other", seed=7)
    next((other / "selection").glob("*.npz")).rename(tmp_path / "dino" / "selection" / "rank1_steps0-2.npz")
    both = load_selection(tmp_path / "dino")
    assert list(both.step) == [0, 0, 1, 1, 2, 2] and both.n_samples == 2 * data.n_samples
    assert np.array_equal(both.combos[0], data.combos[0]) and not np.array_equal(both.combos[1], data.combos[0])


# --- IoU analysis -------------------------------------------------------------------

def test_lowest_iou_fraction_by_hand(tmp_path):
    """Three views per sample, pairs (0,1), (0,2), (1,2); the IoUs are set by hand."""
    left, mid, right = (0, 0, 40, 40), (20, 0, 40, 40), (60, 0, 40, 40)  # IoU(left, mid) = 1/3, others 0 or 1/3
    boxes = [[left, mid, right],   # IoUs (1/3, 0, 0): ties at 0 for pairs 1 and 2
             [left, mid, mid],     # IoUs (1/3, 1/3, 1): lowest pairs 0 and 1
             [left, left, mid],    # IoUs (1, 1/3, 1/3): lowest pairs 1 and 2
             [left, mid, left]]    # IoUs (1/3, 1, 1/3)
    choice = [2, 2, 0, 0]          # lowest (tie), not, not, lowest (tie)
    params = np.array([[view_row(b) for b in sample] for sample in boxes])[None]
    run = tmp_path / "run"
    write_log(run, [0], params, [[[0, 1], [0, 2], [1, 2]]], np.zeros((1, 4, 3)), [choice])
    per = iou.sample_iou(load_selection(run))
    assert per["chosen"] == pytest.approx([0, 1, 1, 1 / 3])
    assert per["lowest"].tolist() == [True, False, False, True]
    assert per["n_lowest"].tolist() == [2, 2, 2, 2] and per["n_pairs"].tolist() == [3] * 4
    result = iou.analyse(load_selection(run))
    low = result["lowest_iou_fraction"]
    assert (low["overall"], low["chance"], low["chance_with_ties"]) == pytest.approx((0.5, 1 / 3, 2 / 3))
    assert result["compared_iou"]["mean"] == pytest.approx(np.mean([1 / 9, 5 / 9, 5 / 9, 5 / 9]))
    assert result["chosen_iou"]["fit"] is None  # one logged step: no line


def test_iou_analysis_hvs_vs_baseline(tmp_path):
    hvs = load_selection(pair_run(tmp_path / "hvs", rule="lowest_iou"))
    base = load_selection(baseline_run(tmp_path / "base"))
    result = iou.analyse(hvs, base)
    assert result["lowest_iou_fraction"]["overall"] == 1.0
    assert result["lowest_iou_fraction"]["chance"] == pytest.approx(1 / 6)
    assert result["chosen_iou"]["mean"] < result["compared_iou"]["mean"]
    assert result["chosen_iou"]["mean"] < result["baseline"]["iou"]["mean"]
    assert result["baseline"]["selection"] == "baseline" and result["selection"] == "hard"
    fit = result["chosen_iou"]["fit"]
    assert (fit["first_step"], fit["last_step"]) == (0, 30)
    assert fit["at_last_step"] == pytest.approx(fit["intercept"] + 30 * fit["slope"])
    assert sum(result["histogram"]["chosen"]) == hvs.n_samples
    assert sum(result["histogram"]["reference"]) == base.n_samples
    # a random-mode run: the choice hits the lowest pair about 1/6 of the time
    rand = iou.analyse(load_selection(pair_run(tmp_path / "rand", rule="random", B=256)))
    assert abs(rand["lowest_iou_fraction"]["overall"] - 1 / 6) < 0.05 and rand["selection"] == "random"


def test_iou_analysis_dino(tmp_path):
    result = iou.analyse(load_selection(dino_run(tmp_path / "dino")))
    assert result["lowest_iou_fraction"]["chance"] == pytest.approx(1 / 4, abs=0.02)
    assert result["lowest_iou_fraction"]["overall"] > 0.9  # the score is 1 - IoU of the global crops
    assert "global crops" in result["pair_definition"]


def test_linear_fit():
    fit = iou.linear_fit(np.array([0, 10, 20]), np.array([0.30, 0.325, 0.35]))
    assert (fit["at_first_step"], fit["at_last_step"], fit["slope"]) == pytest.approx((0.30, 0.35, 0.0025))


# --- importance table ----------------------------------------------------------------

def test_importance_table_and_ranking(tmp_path):
    data = load_selection(pair_run(tmp_path / "run", steps=4, B=128))
    X, y, available = importance.pair_table(data, ["iou", "brightness"], max_rows=500, seed=0)
    assert X.shape == (500, 2) and available == 4 * 128 * 6
    full_X, full_y, _ = importance.pair_table(data, ["iou", "brightness"], max_rows=10 ** 9)
    m = 7 * 6 + 3  # sample 7, combination 3
    pair_a, pair_b = data.params[7, data.combos[0, 3, 0]], data.params[7, data.combos[0, 3, 1]]
    expected = pair_metrics(pair_a, pair_b)
    assert full_X[m] == pytest.approx([float(expected["iou"]), float(expected["brightness"])])
    assert full_y[m] == pytest.approx(data.scores[7, 3])
    _, centred, _ = importance.pair_table(data, ["iou"], max_rows=10 ** 9, target="centred")
    assert np.allclose(centred.reshape(-1, 6).sum(axis=1), 0, atol=1e-5)
    result = importance.analyse(data, importance.parse_metrics("paper"), max_rows=2000, trees=8, threads=1)
    assert result["ranking"][:2] == ["iou", "brightness"] and result["importance"]["iou"] > 0.5
    assert 0 < result["sum_first_order"] <= 1 + 1e-9 and result["target"] == "raw"


def test_importance_needs_scores(tmp_path):
    for run in (baseline_run(tmp_path / "base"), pair_run(tmp_path / "rand", rule="random")):
        with pytest.raises(AnalysisError, match="has no scores"):
            importance.analyse(load_selection(run))
    with pytest.raises(AnalysisError, match="unknown"):
        importance.parse_metrics("iou,zoom")


def test_importance_dino_uses_global_pair_and_combination_score(tmp_path):
    data = load_selection(dino_run(tmp_path / "dino"))
    X, y, available = importance.pair_table(data, ["iou"], max_rows=10 ** 9)
    assert available == data.n_samples * data.combos.shape[1]
    assert np.allclose(y, 1 - X[:, 0], atol=0.06)  # the synthetic score is 1 - IoU(global pair) + noise


# --- predicting the selected pair ---------------------------------------------------

def test_predict_learns_a_known_rule_and_not_a_random_one(tmp_path):
    fit = dict(folds=3, max_iter=6, learning_rate=0.3, threads=1)  # one thread: 2 shared cores oversubscribe
    learnable = [load_selection(pair_run(tmp_path / f"low{s}", rule="lowest_iou", steps=5, B=80, seed=s))
                 for s in range(3)]
    result = predict.analyse(learnable, **fit)
    assert result["cross_validation"]["accuracy"] > 0.8
    assert len(result["held_out_runs"]) == 3 and result["held_out_accuracy"] > 0.8
    assert result["chance"]["uniform"] == pytest.approx(1 / 6)
    assert [tuple(c) for c in result["classes"]] == list(itertools.combinations(range(4), 2))
    # random choices: about chance (1/6); 1200 test predictions, so +-0.06 is over 5 standard errors
    noise = [load_selection(pair_run(tmp_path / f"rand{s}", rule="random", steps=5, B=80, seed=s)) for s in range(3)]
    result = predict.analyse(noise, **fit)
    assert abs(result["cross_validation"]["accuracy"] - 1 / 6) < 0.06
    assert abs(result["held_out_accuracy"] - 1 / 6) < 0.06


def test_predict_refuses_a_baseline_and_mixed_runs(tmp_path):
    with pytest.raises(AnalysisError, match="single pair"):
        predict.analyse([load_selection(baseline_run(tmp_path / "base"))])
    with pytest.raises(AnalysisError, match="different numbers of candidate views"):
        predict.analyse([load_selection(pair_run(tmp_path / "a", N=4)), load_selection(pair_run(tmp_path / "b", N=3))])


def test_predict_dino_classes_are_global_pairs(tmp_path):
    data = load_selection(dino_run(tmp_path / "dino", steps=4, B=32))
    X, y, names = predict.features(data, predict.pair_classes([data]))
    assert [tuple(c) for c in predict.pair_classes([data])] == [(0, 2), (0, 3), (1, 2), (1, 3)]
    assert X.shape == (data.n_samples, len(names)) and "view3.crop_w" in names and "view4.crop_w" not in names
    assert "pair1-3.iou" in names and "pair1-3.compared" in names and y.max() <= 3


# --- command lines --------------------------------------------------------------------

def test_command_lines_end_to_end(tmp_path, capsys):
    hvs, base = pair_run(tmp_path / "hvs", steps=3, B=32), baseline_run(tmp_path / "base", steps=3, B=32)
    out = tmp_path / "out"
    assert iou.main(["--run", str(hvs), "--baseline", str(base), "--output", str(out)]) == 0
    assert importance.main(["--run", str(hvs), "--output", str(out), "--trees", "4", "--max-rows", "300",
                            "--threads", "1"]) == 0
    runs = [str(pair_run(tmp_path / f"s{s}", steps=2, B=16, seed=s)) for s in range(3)]
    assert predict.main(["--run", *runs, "--output", str(out), "--folds", "2", "--max-iter", "5",
                         "--threads", "1", "--max-rows", "20"]) == 0
    printed = capsys.readouterr().out
    assert "lowest-IoU pair in 100.0% of samples" in printed and "held out" in printed
    for name, keys in {"iou": ["chosen_iou", "compared_iou", "lowest_iou_fraction", "histogram", "baseline",
                               "pair_definition", "paper", "figures"],
                       "importance": ["importance", "importance_std", "ranking", "target", "n_rows", "paper",
                                      "pair_definition", "figures"],
                       "predict": ["cross_validation", "held_out_runs", "chance", "classes", "classifier",
                                   "pair_definition", "paper", "figures"]}.items():
        result = json.loads((out / f"{name}.json").read_text())
        assert set(keys) <= set(result), name
        assert result["figures"] and all(Path(f).is_file() and Path(f).name.startswith(name)
                                         for f in result["figures"])
    assert json.loads((out / "predict.json").read_text())["n_samples"] == 3 * 20  # --max-rows per run
    assert json.loads((out / "importance.json").read_text())["n_rows"] == 300
    assert sorted(p.name for p in out.glob("*.png")) == [
        "importance.png", "iou_histogram.png", "iou_lowest_fraction.png", "iou_over_training.png",
        "predict_accuracy.png"]
    # user errors: one line, exit code 2
    (tmp_path / "nologs").mkdir()
    assert importance.main(["--run", str(base), "--output", str(out)]) == 2
    assert predict.main(["--run", str(tmp_path / "nologs"), "--output", str(out)]) == 2
    assert predict.main(["--run", runs[0], runs[0], "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[0].startswith("error: ") and "selection_log_every" in err[1]
    assert "given twice" in err[2]
    with pytest.raises(SystemExit) as exit_info:
        iou.main(["--help"])
    assert exit_info.value.code == 0 and "--baseline" in capsys.readouterr().out


def test_command_line_process_exit_code(tmp_path):
    (tmp_path / "nologs").mkdir()
    done = subprocess.run([sys.executable, "-m", "analysis.iou", "--run", str(tmp_path / "nologs"), "--output",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "has no selection/*.npz: train with run.selection_log_every > 0" in done.stderr


# --- uncertainty -----------------------------------------------------------------------

def test_lowest_iou_fraction_per_epoch_with_interval(tmp_path):
    """Epochs come from the run's log.jsonl; each epoch's fraction has its
    Wilson interval and chance; the last epoch is compared with chance."""
    from scipy import stats as sps

    run = pair_run(tmp_path / "run", rule="random", steps=4, B=64)  # logged steps 0, 10, 20, 30
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"type": "step", "step": 1}, {"type": "epoch", "epoch": 0, "step": 20},
        {"type": "epoch", "epoch": 1, "step": 40}]) + "\n")
    data = load_selection(run)
    result = iou.analyse(data)
    per = iou.sample_iou(data)
    low = result["lowest_iou_fraction"]
    epochs = low["by_epoch"]
    assert epochs["epoch"].tolist() == [1, 2] and epochs["n"].tolist() == [128, 128]
    first = per["lowest"][data.sample_step < 20]
    assert epochs["k"][0] == first.sum()
    ci = sps.binomtest(int(first.sum()), 128).proportion_ci(method="wilson")
    assert (epochs["low"][0], epochs["high"][0]) == pytest.approx((ci.low, ci.high))
    assert low["last_epoch"]["epoch"] == 2 and low["last_epoch"]["n"] == 128
    assert low["interval"]["n"] == data.n_samples and low["interval"]["low"] < low["overall"] < low["interval"]["high"]
    assert not low["interval"]["above_chance"]  # a random choice is at chance
    hard = iou.analyse(load_selection(pair_run(tmp_path / "hard", rule="lowest_iou")))
    assert hard["lowest_iou_fraction"]["interval"]["above_chance"]
    assert hard["lowest_iou_fraction"]["by_epoch"] is None  # no log.jsonl: no epochs
    (tmp_path / "fig").mkdir()
    paths = iou.plot(result, tmp_path / "fig")
    assert Path(paths[0]).name == "iou_lowest_fraction.png" and Path(paths[0]).stat().st_size > 0


def test_importance_null_marks_the_metric_the_loss_depends_on(tmp_path):
    """The synthetic loss is 1 - IoU + 0.2 |brightness difference| + noise:
    IoU is above the null, hue and saturation (not in the loss) are not."""
    data = load_selection(pair_run(tmp_path / "run", steps=4, B=64))
    result = importance.analyse(data, ["iou", "hue", "saturation"], max_rows=600, trees=4, threads=1,
                                min_samples_leaf=5, null_shuffles=9)
    null = result["null"]
    assert null["shuffles"] == 9 and len(null["importances"]["iou"]) == 9
    assert null["above_null"] == {"iou": True, "hue": False, "saturation": False}
    assert result["importance"]["hue"] > 0  # the forest gives noise some importance: the null is needed
    assert importance.analyse(data, ["iou"], max_rows=200, trees=2, threads=1, null_shuffles=0)["null"] is None
    assert importance.main(["--run", str(tmp_path / "run"), "--output", str(tmp_path), "--null-shuffles", "-1"]) == 2
