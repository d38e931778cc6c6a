"""Tests of the weighted k-NN evaluation (eval/knn.py)."""
import json
import math
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from eval import knn
from eval.knn import extract_features, main, weighted_knn


def unit_2d(cosines):
    """2-D unit vectors whose cosine similarity to (1, 0) is given."""
    c = torch.tensor(cosines, dtype=torch.float32)
    return torch.stack([c, (1 - c ** 2).sqrt()], dim=1)


def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """Per-sample loop implementing the same formula, in float64."""
    train = [x / x.norm() for x in train_x.double()]
    top1 = top5 = 0
    for x, y in zip(test_x.double(), test_y.tolist()):
        x = x / x.norm()
        sims = [float(x @ t) for t in train]
        neighbours = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        votes = [0.0] * num_classes
        for j in neighbours:
            votes[int(train_y[j])] += math.exp(sims[j] / temperature)
        ranking = sorted(range(num_classes), key=lambda c: (-votes[c], c))
        top1 += ranking[0] == y
        top5 += y in ranking[:5]
    return {"top1": 100.0 * top1 / len(test_y), "top5": 100.0 * top5 / len(test_y)}


# ---------------------------------------------------------------------------
# weighted_knn: known answers
# ---------------------------------------------------------------------------
def test_separated_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.eye(4, 16)
    train_y, test_y = torch.arange(4).repeat(20), torch.arange(4).repeat(10)
    train_x = centres[train_y] + 0.1 * torch.randn(80, 16, generator=g)
    test_x = centres[test_y] + 0.1 * torch.randn(40, 16, generator=g)
    res = weighted_knn(train_x, train_y, test_x, test_y, ks=(1, 5, 20, 200))
    assert res == {k: {"top1": 100.0, "top5": 100.0} for k in (1, 5, 20, 200)}


def test_hand_computed_votes():
    # Test point (1, 0) of class 0; training points with cosine 1.0 (class 0),
    # 0.8 and 0.6 (class 1).  With all three neighbours, class 0 gets
    # exp(1/T) and class 1 gets exp(0.8/T) + exp(0.6/T):
    #   T = 0.07: 1.6e6 vs 9.6e4       -> class 0
    #   T = 1:    2.718 vs 2.226+1.822 -> class 1
    train_x, train_y = unit_2d([1.0, 0.8, 0.6]), torch.tensor([0, 1, 1])
    test_x, test_y = unit_2d([1.0]), torch.tensor([0])
    top1 = lambda res: {k: r["top1"] for k, r in res.items()}  # noqa: E731
    assert top1(weighted_knn(train_x, train_y, test_x, test_y, ks=(1, 2, 3), temperature=0.07)) == \
        {1: 100.0, 2: 100.0, 3: 100.0}
    assert top1(weighted_knn(train_x, train_y, test_x, test_y, ks=(1, 2, 3), temperature=1.0)) == \
        {1: 100.0, 2: 100.0, 3: 0.0}
    # k = 2 takes the two nearest points; moving the second class-1 point above
    # the class-0 point makes both neighbours vote for class 1.
    train_x = unit_2d([0.9, 0.8, 0.95])
    assert top1(weighted_knn(train_x, train_y, test_x, test_y, ks=(1, 2), temperature=0.07)) == {1: 0.0, 2: 0.0}
    train_x = unit_2d([0.9, 0.8, 0.85])
    assert top1(weighted_knn(train_x, train_y, test_x, test_y, ks=(1, 2), temperature=0.07)) == {1: 100.0, 2: 100.0}


def test_features_are_l2_normalised():
    # Scaling a feature vector must not change anything (cosine similarity).
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(30, 8, generator=g), torch.randn(10, 8, generator=g)
    train_y, test_y = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (10,), generator=g)
    scale = torch.rand(30, 1, generator=g) * 100 + 0.01
    assert weighted_knn(train_x, train_y, test_x, test_y, ks=(5,)) == \
        weighted_knn(train_x * scale, train_y, test_x * 7, test_y, ks=(5,))


# ---------------------------------------------------------------------------
# weighted_knn: agreement with a brute-force loop
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [5, 12])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_brute_force(num_classes, temperature):
    g = torch.Generator().manual_seed(num_classes)
    train_x, test_x = torch.randn(150, 24, generator=g), torch.randn(61, 24, generator=g)
    train_y = torch.randint(0, num_classes, (150,), generator=g)
    test_y = torch.randint(0, num_classes, (61,), generator=g)
    ks = (1, 3, 10, 20, 100, 400)
    res = weighted_knn(train_x, train_y, test_x, test_y, ks=ks, temperature=temperature,
                       num_classes=num_classes, chunk_size=16)
    for k in ks:
        assert res[k] == brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes), k
    # the chunk size changes nothing
    assert weighted_knn(train_x, train_y, test_x, test_y, ks=ks, temperature=temperature,
                        num_classes=num_classes, chunk_size=1000) == res


# ---------------------------------------------------------------------------
# weighted_knn: edge cases
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_test", [1, 7, 99, 101])
def test_any_test_set_size(n_test):
    g = torch.Generator().manual_seed(n_test)
    train_x, test_x = torch.randn(40, 8, generator=g), torch.randn(n_test, 8, generator=g)
    train_y, test_y = torch.randint(0, 10, (40,), generator=g), torch.randint(0, 10, (n_test,), generator=g)
    res = weighted_knn(train_x, train_y, test_x, test_y, ks=(1, 20), num_classes=10, chunk_size=32)
    for k in (1, 20):
        assert res[k] == brute_force_knn(train_x, train_y, test_x, test_y, k, 0.07, 10)
        assert res[k]["top1"] * n_test / 100 == pytest.approx(round(res[k]["top1"] * n_test / 100))


def test_k_larger_than_training_set_is_clamped():
    g = torch.Generator().manual_seed(2)
    train_x, test_x = torch.randn(6, 4, generator=g), torch.randn(9, 4, generator=g)
    train_y, test_y = torch.tensor([0, 1, 2, 3, 4, 5]), torch.randint(0, 6, (9,), generator=g)
    res = weighted_knn(train_x, train_y, test_x, test_y, ks=(6, 10, 200))
    assert set(res) == {6, 10, 200}
    assert res[6] == res[10] == res[200]


def test_fewer_than_five_classes_gives_full_top5():
    g = torch.Generator().manual_seed(3)
    train_x, test_x = torch.randn(50, 8, generator=g), torch.randn(20, 8, generator=g)
    train_y, test_y = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (20,), generator=g)
    res = weighted_knn(train_x, train_y, test_x, test_y, ks=(1, 10, 20))
    assert all(r["top5"] == 100.0 for r in res.values())
    assert all(r["top1"] < 100.0 for r in res.values())  # random features: not trivially perfect


def test_invalid_arguments():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError):
        weighted_knn(x, y, x, y, ks=(0,))
    with pytest.raises(ValueError):
        weighted_knn(x, y, x, y, temperature=0.0)
    with pytest.raises(ValueError):
        weighted_knn(x, y, x[:0], y[:0])


# ---------------------------------------------------------------------------
# extract_features
# ---------------------------------------------------------------------------
class TinyNet(nn.Module):
    """Images [B, 3, 4, 4] -> [B, 2, 3] (flattened to 6 by extract_features)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 6)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.fc(x.flatten(1))).view(-1, 2, 3)


def test_extract_features_shapes_labels_and_eval_mode(capsys):
    torch.manual_seed(0)
    model = TinyNet().train()
    images, labels = torch.randn(10, 3, 4, 4), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3], dtype=torch.int32)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4, shuffle=False)
    feats, labs = extract_features(model, loader, "cpu")
    assert not model.training and not model.drop.training
    assert feats.shape == (10, 6) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert labs.dtype == torch.int64 and labs.tolist() == labels.tolist()
    with torch.no_grad():
        assert torch.allclose(feats, model(images).flatten(1))  # dropout off: deterministic
    assert capsys.readouterr().err == ""  # short sets stay quiet


def test_extract_features_reports_progress(capsys):
    loader = DataLoader(TensorDataset(torch.randn(30, 3, 4, 4), torch.zeros(30, dtype=torch.long)), batch_size=1)
    feats, _ = extract_features(TinyNet(), loader, "cpu")
    assert feats.shape == (30, 6)
    err = capsys.readouterr().err
    assert "ETA" in err and "30/30" in err


# ---------------------------------------------------------------------------
# command line, with stand-ins for the checkpoint and the data
# ---------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    centres = 5 * torch.eye(3, 48)

    class Clusters(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.targets = [i % 3 for i in range(n)]
            self.x = centres[self.targets] + 0.1 * torch.randn(n, 48, generator=g)

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.x[i].view(3, 4, 4), self.targets[i]

    calls = {}

    def load_backbone(path, which="auto"):
        calls["which"] = which
        info = {"method": "simsiam", "arch": "tiny", "dataset": "cifar10", "image_size": 4, "data_dir": "/ckpt"}
        return nn.Flatten(), info

    def build_dataset(name, split, data_dir=None, transform=None, download=False):
        calls.setdefault("datasets", []).append((name, split, data_dir))
        return Clusters(60 if split == "train" else 21, seed=int(split == "train"))

    monkeypatch.setattr(knn, "load_backbone", load_backbone)
    monkeypatch.setattr(knn, "build_dataset", build_dataset)
    monkeypatch.setattr(knn, "subset_indices", lambda targets, n, seed: list(range(n)))
    monkeypatch.delenv("HVS_DATA_DIR", raising=False)

    out = tmp_path / "res" / "knn.json"
    main(["--checkpoint", "ckpt.pth", "--which", "teacher", "knn.ks=[1,5]", "data.test_subset=9",
          "run.device=cpu", "data.num_workers=0", "--output", str(out)])
    # no --data-dir and no HVS_DATA_DIR: the checkpoint's data root
    assert calls == {"which": "teacher", "datasets": [("cifar10", "train", "/ckpt"), ("cifar10", "val", "/ckpt")]}
    assert "k=5  top1 100.00  top5 100.00" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["checkpoint"] == "ckpt.pth" and report["dataset"] == "cifar10"
    assert (report["n_train"], report["n_test"], report["temperature"]) == (60, 9, 0.07)
    assert report["knn"] == {"1": {"top1": 100.0, "top5": 100.0}, "5": {"top1": 100.0, "top5": 100.0}}
    assert report["config"]["knn"]["ks"] == [1, 5] and report["config"]["run"]["device"] == "cpu"

    # a YAML layer, then key=value, then the shortcut flags; $HVS_DATA_DIR before the checkpoint's root
    (tmp_path / "knn.yaml").write_text("knn:\n  ks: [2]\n  temperature: 0.5\n")
    monkeypatch.setenv("HVS_DATA_DIR", "/env")
    calls.clear()
    report = main(["--config", str(tmp_path / "knn.yaml"), "--checkpoint", "ckpt.pth", "knn.ks=3",
                   "run.device=cpu", "data.num_workers=0"])
    assert calls["datasets"][0] == ("cifar10", "train", "/env")
    assert list(report["knn"]) == ["3"] and report["temperature"] == 0.5


@pytest.mark.parametrize("bad, key", [
    (["knn.ks=[0]"], "knn.ks"),
    (["knn.ks=[10,2.5]"], "knn.ks"),
    (["knn.ks=[]"], "knn.ks"),
    (["knn.temperature=-1"], "knn.temperature"),
    (["knn.batch_size=0"], "knn.batch_size"),
    (["--which", "best"], "eval.which"),
    (["knn.k=5"], "knn.k"),
])
def test_cli_refuses_bad_values_before_loading_anything(bad, key, monkeypatch, capsys):
    monkeypatch.setattr(knn, "load_backbone", lambda *a, **k: pytest.fail("loaded a checkpoint"))
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", "ckpt.pth", *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval.knn: error:") and key in err[0], err


def test_cli_needs_a_checkpoint(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["knn.ks=[1]"])
    assert exc.value.code == 2 and "--checkpoint" in capsys.readouterr().err


def test_cli_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for key, spec in knn.KNN_SPEC.items():
        assert f"{key} = {spec['default']!r}" in out, key
    assert "--checkpoint" in out and "--output" in out


@pytest.mark.parametrize("damage, message", [
    ("unknown_method", "was trained by method 'simsiam_v9', which this repository does not know"),
    ("half_the_model", "its model dictionary does not fit the resnet18 of simsiam: "),
    ("no_model", "is damaged: its entry 'model' is missing"),
])
def test_linear_and_knn_refuse_a_foreign_or_damaged_checkpoint(tiny_checkpoints, tmp_path, capsys, damage, message):
    """A checkpoint of an unknown method, or whose model dictionary lost tensors: one line, exit 2."""
    import torch

    from eval import linear

    ckpt = torch.load(tiny_checkpoints["simsiam"], weights_only=True)
    if damage == "unknown_method":
        ckpt["method"] = "simsiam_v9"
    elif damage == "half_the_model":
        keys = sorted(ckpt["model"])
        ckpt["model"] = {k: ckpt["model"][k] for k in keys[: len(keys) // 2]}
    else:
        del ckpt["model"]
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    for entry, prog in ((main, "eval.knn"), (linear.main, "eval.linear")):
        with pytest.raises(SystemExit) as exc:
            entry(["--checkpoint", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, (prog, err)
        assert f": error: {path}" in err[0] and message in err[0], (prog, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # nothing written
