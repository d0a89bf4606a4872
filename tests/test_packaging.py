"""Repository hygiene: one source of truth for dependencies, and CI runs the README's test command."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse environment.yml")


def test_environment_yml_installs_the_project_through_pip():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert any(str(d).startswith("python=3.11") for d in deps)
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert pip_sections == [["-e .[dev,notebooks]"]], "environment.yml must only install the project via pip"
    # no dependency is pinned twice: only python and pip themselves are conda packages
    assert {str(d).split("=")[0] for d in deps if not isinstance(d, dict)} == {"python", "pip"}


def test_pyproject_declares_the_design_card_packages():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = {re.split(r"[<>=!~ \[]", d)[0] for d in meta["project"]["dependencies"]}
    assert {"torch", "torchvision", "pyro-ppl", "arviz", "matplotlib", "tqdm"} <= names
    assert {"dev", "notebooks"} <= set(meta["project"]["optional-dependencies"])
    assert "error" in meta["tool"]["pytest"]["ini_options"]["filterwarnings"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(python -m pip install .*)$", readme, flags=re.M)
    assert len(commands) == 2, "the README holds exactly two set-up commands"
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1 and test_command[0] in ci.splitlines()


def test_every_command_line_tool_has_a_console_script():
    """Each CLI module (``if __name__ == "__main__"`` in inference/) is installed as an ``invw-*`` command whose
    entry point is its ``cli`` function."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    clis = {p.stem for p in (root / "inference").glob("*.py") if 'if __name__ == "__main__"' in p.read_text()}
    assert {target.split(":")[0].removeprefix("inference.") for target in scripts.values()} == clis
    for name, target in scripts.items():
        module, func = target.split(":")
        assert name == f"invw-{module.removeprefix('inference.')}" and func == "cli"
        assert callable(getattr(importlib.import_module(module), func))
