"""Small training helpers that several modules share.

- ``expand_to(v, x)``: a per-sample quantity (a noise level sigma, a time t, a step size eps),
  one number per sample, reshaped to (N, 1, ..., 1) so that ``v * x`` broadcasts for x of any
  shape (N, ...): 2D points (N, D) and images (N, C, H, W) alike. Modules 03 (Langevin step
  sizes), 04 (noise levels), 06 and 07 (output scaling by 1/sigma) and 08 (SDE coefficients)
  use it.
- ``EMA``: the exponential moving average of a model's weights that module 06 introduces,

      theta_bar <- d_k theta_bar + (1 - d_k) theta      after update k = 0, 1, 2, ...

  with d_k = d (the classic form) or, with ``warmup=True``, d_k = min(d, (1 + k) / (10 + k)):
  the average then forgets the random initial weights quickly (d_0 = 0.1, d_10 = 0.55,
  d_100 = 0.92) and only later settles on the slow decay d. Unrolled without warm-up,
  theta_bar_n = d^n theta_0 + (1 - d) sum_{k=1}^{n} d^(n-k) theta_k: an average over roughly
  the last 1/(1 - d) iterates. Modules 06, 07 and 08 train with it. The warm-up is the one of
  TensorFlow's ExponentialMovingAverage(num_updates=...) and of score_sde's ema.py; it matters
  for long runs with d = 0.999 or 0.9999, whose window would otherwise remember the
  initialisation for thousands of steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

Tensor = torch.Tensor


def expand_to(v, x: Tensor) -> Tensor:
    """Reshape a per-sample v: (N,) or () to (N, 1, ..., 1) with x.ndim axes, so v * x broadcasts.

    A plain number becomes a tensor of x's dtype on x's device first. A tensor keeps its own
    dtype and device: this is a reshape, not a cast. A 0-d tensor becomes (1, 1, ..., 1), which
    broadcasts like the scalar it is.

    Example: v = sigma (N,), x = images (N, C, H, W): expand_to(v, x) is (N, 1, 1, 1).
    """
    if not isinstance(v, Tensor):
        v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim > 1:
        raise ValueError(f"expected one value per sample, shape (N,) or (), got {tuple(v.shape)}")
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class EMA:
    """Exponential moving average of a model's parameters.

    update(model):   theta_bar <- d_k theta_bar + (1 - d_k) theta   (every parameter), where
                     d_k = decay, or min(decay, (1 + k) / (10 + k)) with ``warmup=True``
                     (k = num_updates before this update: 0, 1, 2, ...).
    copy_to(model):  write theta_bar into the model's parameters.
    averaged(model): a frozen copy of ``model`` carrying theta_bar (for evaluation / sampling).
    state_dict() / load_state_dict(): for checkpoints.
    Buffers (e.g. fixed Fourier frequencies) are not averaged; they are copied as they are.

    decay must lie in [0, 1): d = 1 would never move from the initial weights, and d = 0 simply
    tracks the latest weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1) (1 never moves from the initial "
                             f"weights), got {decay}")
        self.decay = decay
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {name: p.detach().clone() for name, p in model.named_parameters()}

    def current_decay(self) -> float:
        """d_k, the decay the next update uses: decay, or min(decay, (1 + k) / (10 + k))."""
        if not self.warmup:
            return self.decay
        k = self.num_updates
        return min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        shadow = [self.shadow[name] for name, _ in model.named_parameters()]
        params = [p.detach() for p in model.parameters()]
        # theta_bar = d theta_bar + (1 - d) theta, in place, all tensors in one call each
        torch._foreach_mul_(shadow, d)
        torch._foreach_add_(shadow, params, alpha=1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])

    def averaged(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` in eval mode with the averaged weights, gradients off."""
        ema_model = copy.deepcopy(model).eval()
        self.copy_to(ema_model)
        return ema_model.requires_grad_(False)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from ``state_dict()`` (states saved before ``warmup`` existed load as
        warmup=False)."""
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("EMA state does not match this model's parameters")
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        self.warmup = bool(state.get("warmup", False))
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
