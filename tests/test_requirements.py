"""The lock: requirements.txt pins every package exactly, satisfies requirements.in,
is closed under the installed packages' own requirements, and environment.yml and
Detectron2's pins agree with it; the README's test command is what CI runs."""
import importlib.metadata as md
import re
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DETECTRON2_PINS = ROOT.parent / "shared" / "wheels" / "requirements-detectron2.txt"


def lines(path):
    return [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.lstrip().startswith("#")]


def lock():
    """name (canonical) -> version, from requirements.txt."""
    return {canonicalize_name(l.split("==")[0]): l.split("==")[1] for l in lines(ROOT / "requirements.txt")}


def test_lock_pins_every_package_exactly():
    for line in lines(ROOT / "requirements.txt"):
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", line), f"not an exact pin: {line}"
    names = [canonicalize_name(l.split("==")[0]) for l in lines(ROOT / "requirements.txt")]
    assert len(names) == len(set(names)), "a package is pinned twice"


def test_lock_satisfies_the_direct_dependencies():
    pinned = lock()
    for line in lines(ROOT / "requirements.in"):
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is in requirements.in but not in the lock"
        assert req.specifier.contains(pinned[name], prereleases=True), f"the lock's {req.name}=={pinned[name]} breaks {line}"


def test_lock_is_closed_under_the_installed_requirements():
    """Every requirement of a locked package (markers of this interpreter, no extras)
    is locked too: `pip install -r requirements.txt` brings nothing unpinned."""
    pinned = lock()
    checked = 0
    for name in pinned:
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # not installed here: nothing to read its requirements from
        checked += 1
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            assert canonicalize_name(req.name) in pinned, f"{name} requires {req.name}, which the lock does not pin"
    assert checked >= len(lines(ROOT / "requirements.in")), "the locked packages are not installed here"


def test_environment_yml_carries_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert "python=3.11" in env["dependencies"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pip == lines(ROOT / "requirements.txt")


@pytest.mark.skipif(not DETECTRON2_PINS.exists(), reason=f"{DETECTRON2_PINS} is not here")
def test_detectron2_pins_agree_with_the_lock():
    pinned = lock()
    for line in lines(DETECTRON2_PINS):
        name, version = line.split("==")
        name = canonicalize_name(name)
        if name in pinned:
            assert pinned[name] == version, f"Detectron2 pins {name}=={version}, the lock {pinned[name]}"


def test_every_requirement_is_imported():
    """No direct dependency is listed that nothing imports (scikit-learn was)."""
    module = {"pillow": "PIL", "pyyaml": "yaml", "scikit-learn": "sklearn", "faiss-cpu": "faiss"}  # distribution name -> import name, where they differ
    sources = "\n".join(p.read_text(errors="ignore") for p in ROOT.rglob("*.py")  # the repository's own code
                         if not any(d.startswith(".") or d in ("venv", "site-packages")
                                    for d in p.relative_to(ROOT).parts))
    for line in lines(ROOT / "requirements.in"):
        name = Requirement(line).name.lower()
        mod = module.get(name, name.replace("-", "_"))
        assert re.search(rf"^\s*(import|from) {mod}\b", sources, re.M), f"{name} is listed but never imported"


def test_ci_runs_the_readme_test_command():
    command = "pip install -r requirements.txt && python -m pytest -q tests"
    assert command in (ROOT / "README.md").read_text()
    assert command.replace("pip install", "pip install -q") in (ROOT / ".ci" / "run").read_text()
