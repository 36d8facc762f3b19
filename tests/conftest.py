"""Shared pytest setup: headless matplotlib, the --run-slow option, and small fixtures."""

import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg", force=True)
# Two threads match the 2-core machines the suite is budgeted for and avoid oversubscription.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
