"""Static checks of the notebooks in ``notebooks/`` and a coverage test: the test command executes every one.

The notebooks themselves run under nbmake (``addopts = "--nbmake"``, ``testpaths`` includes ``notebooks``), in
smoke mode (``notebooks/conftest.py`` sets ``CI``). These tests only read the files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ("01_quickstart", "02_weight_transformation", "03_guides_and_priors", "04_relaxed_invariance",
            "05_diagnostics_arviz", "06_filter_banks")
SMOKE_SWITCH = 'smoke_test = "CI" in os.environ'
PATH_HACKS = re.compile(r"sys\.path|os\.chdir|PYTHONPATH|site\.addsitedir|%cd\b|importlib\.util\.spec_from_file")


def read(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return nb


def code_cells(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_the_walkthroughs_exist():
    names = {path.stem for path in NOTEBOOKS}
    assert set(EXPECTED) <= names, f"missing notebooks: {sorted(set(EXPECTED) - names)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_sets_up_smoke_mode(path):
    first = code_cells(read(path))[0]
    assert SMOKE_SWITCH in first, f"the first code cell must define `{SMOKE_SWITCH}`"
    assert "pyro.set_rng_seed(0)" in first
    assert 'assert Version(pyro.__version__) >= Version("1.9")' in first, "a version check the next release passes"
    assert "%matplotlib inline" in first
    assert 'os.environ.get("INVW_DATA_DIR"' in first, "the data root must be overridable with $INVW_DATA_DIR"
    assert "shared/data" not in first, "no data folder that exists only beside this repository"
    assert re.search(r"^download = ", first, flags=re.M), "a download switch, as the CLI's --download"
    source = "\n".join(code_cells(read(path)))
    assert source.count("DataConfig(") == source.count("allow_download="), "every data set honours `download`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_markdown_led_and_imports_the_installed_packages(path):
    nb = read(path)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert sum(cell.cell_type == "markdown" for cell in nb.cells) >= len(code_cells(nb)) // 2, "too little narrative"
    source = "\n".join(code_cells(nb))
    assert re.search(r"^from (models|guides|inference)[. ]", source, flags=re.M), "import the project's packages"
    assert not PATH_HACKS.search(source), "no path hacks: the project is installed (pip install -e .)"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped(path):
    for i, cell in enumerate(read(path).cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has stored outputs (strip them before committing)"
            assert cell.execution_count is None, f"cell {i} has an execution count"
        assert "attachments" not in cell, f"cell {i} has attachments"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_loops_shrink_in_smoke_mode(path):
    source = "\n".join(code_cells(read(path)))
    assert re.search(r"if smoke_test else", source), "sizes and steps should read `small if smoke_test else full`"


def test_configured_test_command_runs_the_notebooks():
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks" in options["testpaths"]
    assert "--nbmake" in options["addopts"].split()
    assert "nbmake" in " ".join(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                                ["optional-dependencies"]["notebooks"])


def test_every_notebook_is_collected_by_the_test_command():
    """Coverage: `python -m pytest` with no arguments (the README's command) collects every notebook."""
    pytest.importorskip("nbmake")
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if line.endswith(".ipynb")}
    expected = {path.relative_to(ROOT).as_posix() for path in NOTEBOOKS}
    assert expected <= collected, f"notebooks the test command does not run: {sorted(expected - collected)}"
