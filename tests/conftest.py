"""Shared pytest setup: headless matplotlib, the --run-slow option, and small fixtures."""

import io
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import matplotlib
import pytest
import torch

matplotlib.use("Agg", force=True)
# The tests work on small tensors (2D toys, tiny networks), where one thread is as fast as two
# and immune to the thread-synchronisation stalls of a busy machine.
torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end run: use --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    """A seeded local generator: tests never depend on global random state."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def real_mnist_root():
    """The data root holding the real MNIST (``SBGM_DATA_DIR``, else ./data); skips the test
    when its four files are not in ``<root>/MNIST/raw/`` (raw or .gz)."""
    from common.datasets import MNIST_FILES, resolve_data_root

    root = resolve_data_root(None)
    raw = root / "MNIST" / "raw"
    if not all((raw / f).exists() or (raw / f"{f}.gz").exists() for f in MNIST_FILES):
        pytest.skip(f"real MNIST not found under {raw} (set SBGM_DATA_DIR to a folder "
                    f"containing MNIST/raw/)")
    return root


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """``quick_run("03", *flags)``: chapter 03's ``main(["--quick", ..., *flags])``, run once
    per session.

    Several tests look at the same --quick run (a chapter's end-to-end test, the determinism and
    quiet-progress-bar checks), so it runs once and its result, stdout, stderr and output folder
    (``outdir / module name`` holds the figures) are shared: treat them as read-only.
    """
    from common.modules import load_module

    runs = {}

    def run(number: str, *flags: str) -> SimpleNamespace:
        key = (number, *flags)
        if key not in runs:
            outdir = tmp_path_factory.mktemp(f"quick_{number}")
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                result = load_module(number).main(["--quick", "--outdir", str(outdir), *flags])
            runs[key] = SimpleNamespace(result=result, out=out.getvalue(), err=err.getvalue(),
                                        outdir=outdir)
        return runs[key]

    return run
