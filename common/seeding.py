"""One call to make a run reproducible."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed Python's ``random``, numpy and torch (CPU and every GPU) with ``seed``.

    Returns a fresh ``torch.Generator`` seeded with the same value. Passing it explicitly to
    sampling code (``torch.randn(..., generator=g)``) keeps one part of a script from shifting
    the random numbers of another when you edit it.

    ``deterministic=True`` additionally asks torch for deterministic kernels (slower on GPU; an
    operation without a deterministic implementation then raises instead of silently varying).
    On the CPU almost everything is deterministic already.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs this workspace setting for reproducible matrix products on GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)
