"""Choosing where tensors live."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The --device choices that work on this machine ("auto" and "cpu" always do)."""
    return [name for name, ok in (("auto", True), ("cpu", True),
                                  ("cuda", torch.cuda.is_available()), ("mps", _mps_available()))
            if ok]


def pick_device(name: str = "auto", verbose: bool = True) -> torch.device:
    """Return the torch device for ``name`` in {auto, cpu, cuda, mps}.

    ``auto`` prefers CUDA, then Apple's MPS, then the CPU. Asking for a device that this machine
    does not have raises ``RuntimeError`` saying so, rather than failing later inside torch.
    With ``verbose`` the choice is printed, so every run's log says where it ran.
    """
    if name not in DEVICE_CHOICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            device, why = torch.device("cuda"), torch.cuda.get_device_name(0)
        elif _mps_available():
            device, why = torch.device("mps"), "Apple GPU"
        else:
            device, why = torch.device("cpu"), "no CUDA or MPS device found"
    else:
        if name == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"cuda was requested but torch sees no CUDA device (choose one of "
                               f"{', '.join(available_devices())})")
        if name == "mps" and not _mps_available():
            raise RuntimeError(f"mps was requested but MPS is not available here (choose one of "
                               f"{', '.join(available_devices())})")
        device, why = torch.device(name), "requested"
    if verbose:
        print(f"Device: {device} ({why})")
    return device
