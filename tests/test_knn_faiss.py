"""The faiss backend of the weighted k-NN evaluation (eval/knn.py,
``knn.backend=faiss``): the same neighbours and the same results as the torch
backend, a clear error where faiss is missing, and the command-line flag."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eval import knn
from eval.knn import main, neighbour_search, weighted_knn
from tests.test_knn import brute_force_knn

NEEDS_FAISS = "faiss is not installed (pip install faiss-cpu)"


@pytest.fixture
def faiss():
    return pytest.importorskip("faiss", reason=NEEDS_FAISS)


def untied(bank, queries, depth, gap=4e-6):
    """The rows of ``queries`` whose ``depth`` + 1 highest cosine similarities
    to ``bank`` (float64) are pairwise at least ``gap`` apart: for them the
    top-k neighbours, and their order, are unique for every k <= depth.  The
    gap is above the float32 rounding of either backend's inner products
    (at most ~ dim x 2^-24 = 2e-6 for unit vectors of 32 dimensions, ~1e-7
    in practice)."""
    sims = F.normalize(queries.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    top = sims.topk(min(depth + 1, len(bank)), dim=1).values
    keep = (top[:, :-1] - top[:, 1:]).min(dim=1).values >= gap
    assert keep.float().mean() > 0.5, "too many near-ties: change the data"
    return queries[keep]


def random_set(seed, n_train, n_test, dim, num_classes, depth):
    g = torch.Generator().manual_seed(seed)
    train_x = torch.randn(n_train, dim, generator=g)
    test_x = untied(train_x, torch.randn(n_test, dim, generator=g), depth)
    train_y = torch.randint(0, num_classes, (n_train,), generator=g)
    test_y = torch.randint(0, num_classes, (len(test_x),), generator=g)
    return train_x, train_y, test_x, test_y


# ---------------------------------------------------------------------------
# the neighbour search alone
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 5, 37, 120])
def test_faiss_finds_the_torch_neighbours(faiss, k):
    g = torch.Generator().manual_seed(k)
    bank = F.normalize(torch.randn(500, 32, generator=g), dim=1)
    queries = F.normalize(untied(bank, torch.randn(90, 32, generator=g), k), dim=1)
    sims_t, idx_t = neighbour_search(bank, k, "torch")(queries)
    search = neighbour_search(bank, k, "faiss")
    sims_f, idx_f = search(queries)
    assert isinstance(search.index, faiss.IndexFlatIP) and search.index.ntotal == 500  # exact, whole bank
    assert idx_f.dtype == torch.int64 and sims_f.dtype == torch.float32 and sims_f.shape == (len(queries), k)
    assert torch.equal(idx_f, idx_t)  # same neighbours in the same order
    torch.testing.assert_close(sims_f, sims_t, atol=1e-5, rtol=0)
    assert (sims_f[:, :-1] >= sims_f[:, 1:]).all()  # most similar first


def test_neighbour_search_refuses_bad_arguments():
    bank = torch.randn(10, 4)
    with pytest.raises(ValueError, match="backend"):
        neighbour_search(bank, 3, "annoy")
    with pytest.raises(ValueError, match="k=11"):
        neighbour_search(bank, 11, "torch")
    with pytest.raises(ValueError, match="backend"):
        weighted_knn(bank, torch.zeros(10), bank, torch.zeros(10), ks=(1,), backend="annoy")


# ---------------------------------------------------------------------------
# weighted_knn: identical results
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes, temperature", [(2, 0.07), (7, 0.07), (7, 0.5), (40, 0.1)])
def test_faiss_results_equal_torch_results(faiss, num_classes, temperature):
    ks = (1, 3, 10, 20, 50, 100)
    train_x, train_y, test_x, test_y = random_set(num_classes, 400, 120, 32, num_classes, max(ks))
    kw = dict(ks=ks, temperature=temperature, num_classes=num_classes)
    res_torch = weighted_knn(train_x, train_y, test_x, test_y, backend="torch", **kw)
    res_faiss = weighted_knn(train_x, train_y, test_x, test_y, backend="faiss", **kw)
    assert res_faiss == res_torch
    for k in (1, 20):
        assert res_faiss[k] == brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes)
    # the chunking of the test set changes nothing
    assert weighted_knn(train_x, train_y, test_x, test_y, backend="faiss", chunk_size=7, **kw) == res_torch
    assert len({r["top1"] for r in res_faiss.values()}) > 1  # the ks differ: not a trivial agreement


def test_faiss_clamps_k_as_torch_does(faiss):
    train_x, train_y, test_x, test_y = random_set(3, 60, 40, 16, 5, 60)
    ks = (1, 5, 60, 200)
    res = weighted_knn(train_x, train_y, test_x, test_y, ks=ks, backend="faiss")
    assert res == weighted_knn(train_x, train_y, test_x, test_y, ks=ks, backend="torch")
    assert set(res) == set(ks) and res[60] == res[200]


# ---------------------------------------------------------------------------
# faiss missing
# ---------------------------------------------------------------------------
def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    x, y = torch.randn(8, 4), torch.tensor([0, 1] * 4)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        weighted_knn(x, y, x, y, ks=(3,), backend="faiss")
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        neighbour_search(x, 3, "faiss")
    assert weighted_knn(x, y, x, y, ks=(3,)) == weighted_knn(x, y, x, y, ks=(3,), backend="torch")  # torch works


def test_missing_faiss_stops_the_cli_before_loading_anything(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setattr(knn, "load_backbone", lambda *a, **k: pytest.fail("loaded a checkpoint"))
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", "ckpt.pth", "--backend", "faiss", "run.device=cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval.knn: error:"), err
    assert "knn.backend" in err[0] and "pip install faiss-cpu" in err[0]


def test_cli_refuses_an_unknown_backend(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", "ckpt.pth", "--backend", "annoy"])
    assert exc.value.code == 2 and "knn.backend" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# command line: the flag reaches the search and the results JSON
# ---------------------------------------------------------------------------
def test_cli_backend_reaches_the_search_and_the_report(faiss, tmp_path, monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 48, generator=g)

    class Blobs(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            gen = torch.Generator().manual_seed(seed)
            self.targets = [i % 4 for i in range(n)]
            self.x = centres[self.targets] + 0.8 * torch.randn(n, 48, generator=gen)

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return self.x[i].view(3, 4, 4), self.targets[i]

    info = {"method": "dino", "arch": "tiny", "dataset": "cifar10", "image_size": 4, "data_dir": "/ckpt"}
    monkeypatch.setattr(knn, "load_backbone", lambda path, which="auto": (nn.Flatten(), info))
    monkeypatch.setattr(knn, "build_dataset", lambda name, split, data_dir=None, transform=None, download=False:
                        Blobs(80 if split == "train" else 30, seed=int(split == "train")))
    searched = []
    real_search = knn.neighbour_search
    monkeypatch.setattr(knn, "neighbour_search", lambda bank, k, backend="torch":
                        searched.append(backend) or real_search(bank, k, backend))

    reports = {}
    for args in (["--backend", "faiss"], ["knn.backend=faiss"], ["--backend", "torch"], []):
        out = tmp_path / f"knn{len(reports)}.json"
        main(["--checkpoint", "ckpt.pth", "knn.ks=[1,5,20]", "run.device=cpu", "data.num_workers=0",
              "--output", str(out), *args])
        report = json.loads(out.read_text())
        reports[" ".join(args)] = report
        assert report["backend"] == report["config"]["knn"]["backend"] == searched[-1]
    assert searched == ["faiss", "faiss", "torch", "torch"]  # default: torch
    assert "neighbour search: faiss" in capsys.readouterr().err
    knns = [r["knn"] for r in reports.values()]
    assert all(k == knns[0] for k in knns) and set(knns[0]) == {"1", "5", "20"}
