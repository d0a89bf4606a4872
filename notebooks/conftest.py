"""Run the notebooks in smoke mode under pytest (the README's test command, or ``pytest --nbmake notebooks/``).

nbmake executes every notebook in a fresh Jupyter kernel whose working directory is this folder and whose
environment is this process's. While a notebook runs, this file sets

* ``CI``: the notebooks' smoke-test switch (``smoke_test = "CI" in os.environ``), so data and steps shrink;
* ``OMP_NUM_THREADS=1``: the smoke-mode models are tiny, and threads only add synchronisation on a busy machine;
* ``INVW_DATA_DIR``: the data root of the tests (``$INVW_DATA_DIR``, else ``<repo>/../shared/data``) as an absolute
  path, so the notebooks find the data wherever pytest was started from (their own default is the repository's
  ``data/``, with ``download`` on).

``INVW_NOTEBOOKS_FULL=1`` leaves ``CI`` and the threads alone, so the notebooks run in full mode (unless ``CI`` is
already set); full mode takes minutes per notebook, so raise nbmake's per-cell limit, e.g.
``INVW_NOTEBOOKS_FULL=1 python -m pytest --nbmake-timeout 3600 notebooks``.
Like the data tests, the notebooks are skipped when MNIST is not under the data root.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _is_notebook(item: pytest.Item) -> bool:
    return item.path.suffix == ".ipynb"


def data_root() -> Path:
    """``$INVW_DATA_DIR`` (relative to the current directory) or ``<repo>/../shared/data``, the notebooks' default."""
    env = os.environ.get("INVW_DATA_DIR")
    return Path(env).expanduser().resolve() if env else (REPO_ROOT.parent / "shared" / "data").resolve()


def has_mnist(root: Path) -> bool:
    raw = root / "MNIST" / "raw"
    return all((raw / n).is_file() or (raw / f"{n}.gz").is_file() for n in MNIST_FILES)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _is_notebook(item) and not has_mnist(data_root()):
        pytest.skip(f"MNIST idx files not found under {data_root() / 'MNIST' / 'raw'} (set INVW_DATA_DIR)")


def notebook_environment() -> dict[str, str]:
    """The variables to set for a notebook's kernel (see the module docstring)."""
    env = {}
    if os.environ.get("INVW_NOTEBOOKS_FULL") != "1":
        env.update({name: value for name, value in (("CI", "true"), ("OMP_NUM_THREADS", "1"))
                    if name not in os.environ})
    env["INVW_DATA_DIR"] = str(data_root())
    return env


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    if not _is_notebook(item):
        return (yield)
    env = notebook_environment()
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return (yield)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
