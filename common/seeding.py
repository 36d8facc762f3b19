"""One call to make a run reproducible, and generators on the device where noise is drawn."""

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
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    random.seed(seed)
    # numpy's global seed takes 32 bits: larger seeds go in as two 32-bit words, so seeds that
    # differ only above bit 32 still give different streams (and seeds below 2**32 the same
    # stream as ever).
    np.random.seed(seed if seed < 2**32 else [seed & 0xFFFFFFFF, seed >> 32])
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs this workspace setting for reproducible matrix products on GPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def make_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (e.g. "cpu", "cuda", torch.device("cuda:1")), seeded.

    Random numbers must be drawn by a generator on the device where they are used
    (``torch.randn(shape, generator=g, device=x.device)``): drawing on the CPU and then moving
    them costs a host-to-device copy per draw. A CPU generator gives the same numbers as
    ``torch.Generator().manual_seed(seed)``; a CUDA generator gives different (but equally
    reproducible) numbers for the same seed.
    """
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64 - 1], got {seed!r}")
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def check_generator(generator: torch.Generator | None, device: str | torch.device) -> None:
    """Raise a ValueError unless ``generator`` is None or lives on ``device``.

    torch's own error for a mismatch ("Expected a 'cuda' device type for generator ...") comes
    from deep inside a sampling call; this one says which generator to make instead.
    """
    if generator is None:
        return
    want, have = torch.device(device), generator.device
    # "cuda" without an index means the current CUDA device: compare indices only when both
    # name one.
    same = want.type == have.type and (want.index is None or have.index is None
                                       or want.index == have.index)
    if not same:
        raise ValueError(f"the generator is on {have} but the tensor is on {want}: draw with a "
                         f"generator on the tensor's device, e.g. "
                         f"common.seeding.make_generator(seed, {str(want)!r})")
