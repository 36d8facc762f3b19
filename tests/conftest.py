"""Shared pytest setup: headless matplotlib, the --run-slow option, and small fixtures."""

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
