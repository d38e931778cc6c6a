"""common/engine/registry.py is the one list of methods: a method registered there (here
a toy one, registered only inside the test) reaches run_all.sh's tokens, the
linear probe's protocol, the summary's paper rows and both benchmarks."""
import csv
import os
import subprocess
import sys

import pytest

from common.engine import registry
from common.engine.method import BenchSettings
from simsiam.method import SimSiamMethod
from tests.helpers import ROOT, cli


class ToyMethod(SimSiamMethod):
    """SimSiam under another name, with two tokens of its own."""

    name = "toy"
    run_all_tokens = {"toy": "resnet", "toy_vit": "vit"}
    paper_name = "Toy"
    linear_protocols = {"resnet": "simsiam", "vit": "dino"}
    bench = BenchSettings("pair", "resnet34", paper_setting="a toy: no factor")
    gpu_smoke = True


@pytest.fixture
def toy(monkeypatch):
    """The registry with one more line: the toy method."""
    monkeypatch.setitem(registry.METHODS, "toy", f"{__name__}:ToyMethod")
    return ToyMethod


def test_a_registered_method_reaches_every_reader(toy, capsys):
    from bench import gpu_check, overhead
    from eval import linear, summary

    assert registry.get_method("toy") is toy and registry.method_classes()["toy"] is toy
    # run_all.sh's tokens, through the command line it reads
    assert registry.run_all_tokens()["toy_vit"] == (toy, "tests.main", "vit")
    assert registry.main(["--list", "tokens"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "toy tests.main resnet" in lines and "toy_vit tests.main vit" in lines
    assert "dino_resnet dino.main resnet" in lines
    # the linear probe's protocol, by the checkpoint's backbone family
    assert linear.auto_protocol({"method": "toy", "arch": "resnet18"}) == "simsiam"
    assert linear.auto_protocol({"method": "toy", "arch": "vit_tiny/4"}) == "dino"
    # the summary: the paper's name (its rows) and the family of a file without an architecture
    assert summary.paper_name("toy_vit") == "Toy" and summary.family(None, "toy_vit") == "vit"
    assert summary.family(None, "toy") == "resnet"
    # the benchmarks
    entry = overhead.bench_methods()["toy"]
    assert entry.cls is toy and entry.arch == "resnet34" and entry.paper is None
    assert entry.candidates is overhead.image_candidates and entry.paper_setting == "a toy: no factor"
    assert "toy" in gpu_check.smoke_methods()


def test_without_the_line_the_toy_is_nowhere():
    from bench import gpu_check, overhead

    assert "toy" not in registry.run_all_tokens() and "toy" not in overhead.bench_methods()
    assert "toy" not in gpu_check.smoke_methods()
    with pytest.raises(ValueError, match="unknown method 'toy'"):
        registry.get_method("toy")


class TwinMethod(ToyMethod):
    """A method that declares a token SimSiam has already."""

    name = "twin"
    run_all_tokens = {"simsiam": "resnet"}


def test_a_token_declared_twice_is_refused(monkeypatch):
    monkeypatch.setitem(registry.METHODS, "twin", f"{__name__}:TwinMethod")
    with pytest.raises(ValueError, match="token 'simsiam' is declared by both simsiam and twin"):
        registry.run_all_tokens()


def test_what_the_methods_declare_exists():
    """Every token has its small-profile config and entry point, every protocol
    its config, every paper name rows in the paper's table, every bench
    setting a known kind of views."""
    from bench.overhead import VIEWS

    tokens = registry.run_all_tokens()
    assert {"simsiam", "simclr", "dino", "dino_resnet", "ibot"} <= set(tokens)
    for token, (_, entry, _) in tokens.items():
        assert (ROOT / "configs" / f"{token}_small.yaml").is_file()
        assert (ROOT / entry.replace(".", "/")).with_suffix(".py").is_file()
    assert all((ROOT / "configs" / f"linear_{p}.yaml").is_file() for p in registry.linear_protocols())
    with open(ROOT / "configs" / "paper_numbers.csv") as f:
        in_paper = {r["method"] for r in csv.DictReader(f)}
    classes = registry.method_classes()
    assert in_paper <= {cls.paper_name for cls in classes.values()}
    assert all(cls.bench is None or cls.bench.views in VIEWS for cls in classes.values())


def test_the_command_line_lists_and_refuses_in_one_line():
    p = cli("-m", "common.engine.registry", "--list", "methods")
    assert p.returncode == 0 and p.stdout.split() == list(registry.METHODS)
    p = cli("-m", "common.engine.registry", "--list", "everything")
    assert p.returncode == 2 and "invalid choice: 'everything'" in p.stderr


def test_run_all_refuses_an_unknown_token_before_any_run(tmp_path):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--methods", "simsiam nosuch", "--seeds", "0",
                        "--data-dir", str(tmp_path), "--runs", str(tmp_path / "runs"),
                        "--results", str(tmp_path / "results")], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "unknown method token 'nosuch'" in p.stderr
    assert "dino_resnet" in p.stderr  # the tokens it knows, from the registry
    assert not (tmp_path / "runs").exists()
