"""requirements.txt and environment.yml pin the same packages; the README's
test command is what CI runs."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_match_environment():
    req = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
           if l.strip() and not l.startswith("#")]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(req) == sorted(pip)


def test_ci_runs_the_readme_test_command():
    command = "pip install -r requirements.txt && python -m pytest -q tests"
    assert command in (ROOT / "README.md").read_text()
    assert command.replace("pip install", "pip install -q") in (ROOT / ".ci" / "run").read_text()
