"""requirements.txt and environment.yml pin the same packages; the README's
test command is what CI runs."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_match_environment():
    req = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
           if l.strip() and not l.startswith("#")]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(req) == sorted(pip)


def test_every_requirement_is_imported():
    """No package is listed that nothing imports (scikit-learn was)."""
    module = {"pillow": "PIL", "pyyaml": "yaml", "scikit-learn": "sklearn", "faiss-cpu": "faiss"}  # distribution name -> import name, where they differ
    sources = "\n".join(p.read_text(errors="ignore") for p in ROOT.rglob("*.py")  # the repository's own code
                         if not any(d.startswith(".") or d in ("venv", "site-packages")
                                    for d in p.relative_to(ROOT).parts))
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name = re.split(r"[<>=!~ ]", line.strip())[0].lower()
            mod = module.get(name, name.replace("-", "_"))
            assert re.search(rf"^\s*(import|from) {mod}\b", sources, re.M), f"{name} is listed but never imported"


def test_ci_runs_the_readme_test_command():
    command = "pip install -r requirements.txt && python -m pytest -q tests"
    assert command in (ROOT / "README.md").read_text()
    assert command.replace("pip install", "pip install -q") in (ROOT / ".ci" / "run").read_text()
