"""Checks for the exercises of 09_image_generation.py (the mechanism: common/exercises.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.exercises import Exercise, assert_close, exercise_tests
from common.modules import load_module
from common.training import EMA

pytestmark = pytest.mark.ch09
m = load_module("09")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- 9.1 residual block ---------------------------------------------------------------------------
def check_residual_block(fn):
    torch.manual_seed(0)
    for c_in, c_out in ((8, 8), (8, 16)):  # identity skip and 1x1-conv skip
        block = m.ResidualBlock(c_in, c_out, emb_dim=12)
        x = torch.randn(3, c_in, 5, 5, generator=_gen(1))
        emb = torch.randn(3, 12, generator=_gen(2))
        with torch.no_grad():
            assert_close(fn(block, x, emb), block(x, emb),
                         what=f"residual block output ({c_in} -> {c_out} channels)",
                         hint="the embedding is added after conv1, before norm2; the skip path "
                              "is added at the end", rtol=1e-5, atol=1e-5)


def block_embedding_after_conv2(block, x, emb):
    h = block.conv1(F.silu(block.norm1(x)))
    h = block.conv2(F.silu(block.norm2(h))) + block.emb(emb)[:, :, None, None]
    return block.skip(x) + h


def block_without_skip(block, x, emb):
    h = block.conv1(F.silu(block.norm1(x))) + block.emb(emb)[:, :, None, None]
    return block.conv2(F.silu(block.norm2(h)))


# -- 9.2 one PC step -----------------------------------------------------------------------------
def _gaussian_score(var0):
    """Score of N(0, var0 I) blurred by sigma: -x / (var0 + sigma^2)."""
    return lambda x, sigma: -x / (var0 + sigma**2)


def _pc_by_hand(score, x, sigma, sigma_next, snr, z1, z2):
    s = score(x, sigma)
    s_norm = s.flatten(1).norm(dim=1).mean()
    z_norm = z1.flatten(1).norm(dim=1).mean()
    eps = 2 * (snr * z_norm / s_norm) ** 2
    x = x + eps * s + (2 * eps).sqrt() * z1
    g2 = sigma**2 - sigma_next**2
    return x + g2 * score(x, sigma) + math.sqrt(g2) * z2


def check_pc_step(fn):
    score = _gaussian_score(0.3)
    # the docstring's example: z = 0, so only the predictor acts
    x = torch.ones(2, 1, 2, 2, dtype=torch.float64)
    zero = torch.zeros_like(x)
    out = fn(score, x, 2.0, 1.0, 0.16, zero, zero)
    assert_close(out, x * (1 - 3.0 / 4.3), what="PC step with zero noise (predictor only)",
                 hint="predictor: x + (sigma^2 - sigma_next^2) score(x, sigma)", rtol=1e-10)
    g = _gen(3)
    x = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    z1 = torch.randn(x.shape, generator=g, dtype=torch.float64)
    z2 = torch.randn(x.shape, generator=g, dtype=torch.float64)
    assert_close(fn(score, x, 1.5, 0.9, 0.16, z1, z2),
                 _pc_by_hand(score, x, 1.5, 0.9, 0.16, z1, z2),
                 what="PC step (corrector then predictor)",
                 hint="eps = 2 (snr |z| / |s|)^2 with batch-mean norms; the predictor uses the "
                      "score at the corrected x", rtol=1e-10, atol=1e-12)


def pc_predictor_with_sigma_not_squared(score, x, sigma, sigma_next, snr, z1, z2):
    s = score(x, sigma)
    eps = 2 * (snr * z1.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()) ** 2
    x = x + eps * s + (2 * eps).sqrt() * z1
    g = sigma - sigma_next
    return x + g * score(x, sigma) + math.sqrt(g) * z2


def pc_corrector_without_factor_two(score, x, sigma, sigma_next, snr, z1, z2):
    s = score(x, sigma)
    eps = (snr * z1.flatten(1).norm(dim=1).mean() / s.flatten(1).norm(dim=1).mean()) ** 2
    x = x + eps * s + (2 * eps).sqrt() * z1
    g2 = sigma**2 - sigma_next**2
    return x + g2 * score(x, sigma) + math.sqrt(g2) * z2


# -- 9.3 bits per dimension ---------------------------------------------------------------------
def check_bits_per_dim(fn):
    D = 784
    uniform = torch.full((3,), -D * math.log(2), dtype=torch.float64)
    assert_close(fn(uniform, D, 2.0, 256), torch.full((3,), 8.0, dtype=torch.float64),
                 what="bpd of the uniform model on [-1, 1]^D (scale 2, 256 levels)",
                 hint="the uniform model spends exactly 8 bits per 8-bit pixel", rtol=1e-12)
    assert_close(fn(torch.zeros(2, dtype=torch.float64), 10, 1.0, 16),
                 torch.full((2,), 4.0, dtype=torch.float64),
                 what="bpd of the uniform model on [0, 1]^D with 16 levels",
                 hint="with scale 1 only the bin width counts: log2(16) = 4 bits", rtol=1e-12)
    m8 = load_module("08")
    log_p = torch.tensor([-500.0, 0.0, 1200.0], dtype=torch.float64)
    for scale, levels in ((2.0, 256), (1.0, 256), (0.5, 32), (255.0, 256)):
        assert_close(fn(log_p, D, scale, levels), m8.bits_per_dim(log_p, D, scale, levels),
                     what=f"bpd for scale {scale}, {levels} levels (module 08's bits_per_dim)",
                     hint="bpd = -(log p_y + D ln scale)/(D ln 2) + log2(n_levels)", rtol=1e-12)


def bpd_without_offset(log_p, n_dims, scale, n_levels):
    return -(log_p + n_dims * math.log(scale)) / (n_dims * math.log(2))


def bpd_without_jacobian(log_p, n_dims, scale, n_levels):
    return -log_p / (n_dims * math.log(2)) + math.log2(n_levels)


def bpd_jacobian_sign_flipped(log_p, n_dims, scale, n_levels):
    return -(log_p - n_dims * math.log(scale)) / (n_dims * math.log(2)) + math.log2(n_levels)


# -- 9.4 EMA update -----------------------------------------------------------------------------
def check_ema_update(fn):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.999, warmup=True)
    g = _gen(5)
    for k in range(25):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        shadow = {n: v.clone() for n, v in ema.shadow.items()}
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        before = {n: v.clone() for n, v in shadow.items()}
        out = fn(shadow, params, k, 0.999)
        ema.update(model)
        for name in shadow:
            assert_close(out[name], ema.shadow[name], what=f"EMA of {name!r} after update k={k}",
                         hint="d_k = min(decay, (1 + k) / (10 + k)); "
                              "new = d_k old + (1 - d_k) current", rtol=1e-6, atol=1e-7)
            assert torch.equal(shadow[name], before[name]), \
                "exercise_ema_update changed its input dict in place: return a new one"


def ema_weights_swapped(shadow, params, k, decay):
    d = min(decay, (1 + k) / (10 + k))
    return {n: (1 - d) * shadow[n] + d * params[n] for n in shadow}


def ema_without_warmup(shadow, params, k, decay):
    return {n: decay * shadow[n] + (1 - decay) * params[n] for n in shadow}


EXERCISES = [
    Exercise("exercise_residual_block", check_residual_block,
             [block_embedding_after_conv2, block_without_skip]),
    Exercise("exercise_pc_step", check_pc_step,
             [pc_predictor_with_sigma_not_squared, pc_corrector_without_factor_two]),
    Exercise("exercise_bits_per_dim", check_bits_per_dim,
             [bpd_without_offset, bpd_without_jacobian, bpd_jacobian_sign_flipped]),
    Exercise("exercise_ema_update", check_ema_update, [ema_weights_swapped, ema_without_warmup]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("09", EXERCISES)
