"""Checks for the exercises of 05_sliced_score_matching.py.

Each check compares an implementation with ground truth (closed-form variances, autograd
Jacobians, the module's exact Fisher divergence) and explains what went wrong. Statistical checks
use tolerances derived from the sample size (standard errors). ``exercise_tests`` turns the
checks into three tests: the reference passes, every wrong answer below fails, and your answer
passes (or is skipped while it still raises NotImplementedError).
"""

import math

import pytest
import torch

from common.exercises import Exercise, assert_close, exercise_tests
from common.modules import load_module, load_solutions

pytestmark = pytest.mark.ch05
F64 = torch.float64
m = load_module("05")

# A fixed symmetric test matrix with a heavy diagonal: Gaussian, Rademacher and sphere probes all
# have clearly different variances on it.
S5 = torch.tensor([[4.0, 1.0, 0.0, 0.0, 0.0],
                   [1.0, 3.0, 0.5, 0.0, 0.0],
                   [0.0, 0.5, 2.0, 0.0, 0.0],
                   [0.0, 0.0, 0.0, 1.0, 0.3],
                   [0.0, 0.0, 0.0, 0.3, -1.0]], dtype=F64)


def _variance_z(values, expected):
    """(sample variance - expected) / its standard error sqrt((m4 - var^2) / n)."""
    n = len(values)
    var = values.var()
    m4 = (values - values.mean()).pow(4).mean()
    return ((var - expected) / ((m4 - var**2).clamp_min(1e-300) / n).sqrt()).item(), var.item()


# -- 5.1 sphere projections ---------------------------------------------------------------------
def check_sphere_projections(fn):
    n, D = 40_000, 5
    v = fn(n, D, torch.Generator().manual_seed(0))
    v_again = fn(n, D, torch.Generator().manual_seed(0))
    if tuple(v.shape) != (n, D):
        raise AssertionError(f"shape of the projections: expected {(n, D)}, got "
                             f"{tuple(v.shape)}\n  hint: one row per projection")
    v, v_again = torch.as_tensor(v).double(), torch.as_tensor(v_again).double()
    if not torch.equal(v, v_again):
        raise AssertionError(
            "two calls with identically seeded generators gave different projections\n"
            "  hint: pass `generator=generator` to every random call")
    assert_close(v.norm(dim=1), torch.full((n,), math.sqrt(D), dtype=F64),
                 what=f"norms of the projections (expected sqrt(D) = {math.sqrt(D):.4f})",
                 hint="normalise each row to norm 1, then multiply by sqrt(dim)", rtol=1e-6)
    outer = v[:, :, None] * v[:, None, :]
    se = (outer.std(0) / math.sqrt(n)).clamp_min(1e-12)  # 0 for an exact entry (e.g. +-1 draws)
    z = ((outer.mean(0) - torch.eye(D, dtype=F64)) / se).abs().max().item()
    if not z < 5:
        raise AssertionError(f"E[v v^T] is not the identity: largest deviation {z:.1f} standard "
                             f"errors\n  hint: the directions must be uniform (isotropic)")
    # Hutchinson's variance with sphere probes: 2 D/(D+2) (||S||_F^2 - (tr S)^2 / D).
    q = torch.einsum("nd,de,ne->n", v, S5, v)
    expected = 2 * D / (D + 2) * (S5.square().sum() - torch.trace(S5) ** 2 / D)
    z, var = _variance_z(q, expected)
    if not abs(z) < 5:
        raise AssertionError(
            f"the projections are not uniform on the sphere: Var(v^T S v) = {var:.3f}, expected "
            f"{expected.item():.3f} for uniform directions ({z:+.1f} standard errors)\n"
            f"  hint: normalised draws from a cube, or +-1 entries, are not uniform on the "
            f"sphere; which distribution has a density that depends only on |z|?")


def unit_sphere(n, dim, generator):
    z = torch.randn(n, dim, generator=generator, dtype=F64)
    return z / z.norm(dim=1, keepdim=True)


def normalised_cube(n, dim, generator):
    c = 2 * torch.rand(n, dim, generator=generator, dtype=F64) - 1
    return math.sqrt(dim) * c / c.norm(dim=1, keepdim=True)


def rademacher_instead(n, dim, generator):
    return (2 * torch.randint(0, 2, (n, dim), generator=generator) - 1).double()


# -- 5.2 matrix-free Frobenius norm -------------------------------------------------------------
A6 = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.5, 0.0],
                   [0.0, 1.5, -1.0, 0.0, 0.0, 0.0],
                   [0.3, 0.0, 1.0, 0.7, 0.0, 0.0],
                   [0.0, 0.0, 0.0, -2.0, 0.0, 1.0],
                   [0.0, 0.4, 0.0, 0.0, 1.0, 0.0],
                   [1.0, 0.0, 0.0, 0.0, 0.0, 0.5]], dtype=F64)


def check_frobenius_norm_estimate(fn):
    def matvec_of(A):
        return lambda V: V.to(A.dtype) @ A.T

    # A = 3 I: every Rademacher probe gives |A v|^2 = 9 D exactly.
    A = 3 * torch.eye(2, dtype=F64)
    got = torch.as_tensor(fn(matvec_of(A), 2, 5, torch.Generator().manual_seed(1))).double()
    assert_close(got, torch.tensor(18.0, dtype=F64), what="||3 I||_F^2 in D = 2 from 5 probes",
                 hint="use Rademacher probes (entries +-1): then |A v|^2 = 18 for every v; "
                      "return the MEAN of |A v|^2 over the probes")
    # A non-symmetric 6 x 6 matrix: unbiased, with Rademacher variance / n_probes.
    n_calls, n_probes = 3000, 4
    gen = torch.Generator().manual_seed(2)
    est = torch.stack([torch.as_tensor(fn(matvec_of(A6), 6, n_probes, gen)).double()
                       for _ in range(n_calls)])
    frob2 = A6.square().sum()
    z = ((est.mean() - frob2) / (est.std() / math.sqrt(n_calls))).item()
    if not abs(z) < 5:
        raise AssertionError(
        f"the estimate is biased: mean of {n_calls} calls {est.mean():.3f}, expected "
        f"||A||_F^2 = {frob2:.3f} ({z:+.1f} standard errors)\n"
        f"  hint: average |A v|^2 = sum_i (A v)_i^2 over the probes (not v^T A v)")
    expected_var = m.hutchinson_variance(A6.T @ A6, "rademacher") / n_probes
    z, var = _variance_z(est, expected_var)
    if not abs(z) < 5:
        raise AssertionError(
        f"variance of the estimate {var:.3f}, expected {expected_var.item():.3f} for the mean of "
        f"{n_probes} Rademacher probes ({z:+.1f} standard errors)\n"
        f"  hint: draw n_probes Rademacher vectors (not Gaussian), and average, do not sum")


def trace_instead(matvec, dim, n_probes, generator):
    v = m.sample_projections((n_probes, dim), "rademacher", generator, dtype=F64)
    return (v * matvec(v)).sum(1).mean()


def norm_not_squared(matvec, dim, n_probes, generator):
    v = m.sample_projections((n_probes, dim), "rademacher", generator, dtype=F64)
    return matvec(v).norm(dim=1).mean()


def gaussian_probes(matvec, dim, n_probes, generator):
    v = m.sample_projections((n_probes, dim), "gaussian", generator, dtype=F64)
    return matvec(v).square().sum(1).mean()


def summed_over_probes(matvec, dim, n_probes, generator):
    v = m.sample_projections((n_probes, dim), "rademacher", generator, dtype=F64)
    return matvec(v).square().sum()


# -- 5.3 forward-mode SSM -----------------------------------------------------------------------
def _small_score_net(D, gen):
    """s(x) = W2 tanh(W1 x + b1) + b2: a smooth score model with a non-symmetric Jacobian."""
    W1, W2 = torch.randn(8, D, generator=gen, dtype=F64), torch.randn(D, 8, generator=gen,
                                                                       dtype=F64)
    b1, b2 = torch.randn(8, generator=gen, dtype=F64), torch.randn(D, generator=gen, dtype=F64)
    return lambda x: torch.tanh(x @ W1.T + b1) @ W2.T + b2


def _close(a, b):
    a = torch.as_tensor(a).double()
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-7, atol=1e-9)


def _ssm_hint(got, K, s, v):
    """Name the mistake: compare with the usual wrong forms built from K = grad_x s."""
    vkv = torch.einsum("ni,nij,nj->n", v, K, v)
    vs2 = (v * s).sum(1).square()
    diagnoses = [
        (vkv + 0.5 * s.square().sum(1),
         "your values equal the variance-reduced form: you used 1/2 |s|^2 instead of "
         "1/2 (v^T s)^2"),
        (vkv + vs2, "your values equal v^T K v + (v^T s)^2: the factor 1/2 is missing"),
        (vkv, "your values equal v^T K v alone: the 1/2 (v^T s)^2 term is missing"),
        (0.5 * vs2, "your values equal 1/2 (v^T s)^2 alone: the v^T K v term is missing"),
        (-vkv + 0.5 * vs2, "your v^T K v term has the wrong sign"),
    ]
    for wrong, hint in diagnoses:
        if _close(got, wrong):
            return hint
    return ("torch.func.jvp returns the pair (s(x), K v); combine them with row-wise dot "
            "products with v (one value per row), and check the worked example of the docstring")


def check_ssm_forward_mode(fn):
    x0, v0 = torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64)
    got0 = fn(lambda x: -x, x0, v0)
    assert_close(got0, torch.tensor([-1.5], dtype=F64),
                 what="SSM integrand for s(x) = -x, x = (1, 0), v = (1, 1)",
                 hint=_ssm_hint(got0, -torch.eye(2, dtype=F64)[None], -x0, v0))
    gen = torch.Generator().manual_seed(3)
    D = 4
    score = _small_score_net(D, gen)
    x = torch.randn(6, D, generator=gen, dtype=F64)
    v = torch.randn(6, D, generator=gen, dtype=F64)
    K = torch.stack([torch.autograd.functional.jacobian(lambda z: score(z[None])[0], xi)
                     for xi in x])  # (N, D, D), one sample at a time: independent of the module
    s = score(x)
    expected = torch.einsum("ni,nij,nj->n", v, K, v) + 0.5 * (v * s).sum(1).square()
    got = fn(score, x, v)
    assert_close(got, expected,
                 what="SSM integrand v^T K v + 1/2 (v^T s)^2 for a tanh network (6 points, D = 4)",
                 hint=_ssm_hint(got, K, s, v), rtol=1e-8, atol=1e-10)


def variance_reduced_instead(score_fn, x, v):
    s, jv = torch.func.jvp(score_fn, (x,), (v,))
    return (v * jv).sum(1) + 0.5 * s.square().sum(1)


def missing_half(score_fn, x, v):
    s, jv = torch.func.jvp(score_fn, (x,), (v,))
    return (v * jv).sum(1) + (v * s).sum(1).square()


def trace_term_only(score_fn, x, v):
    _, jv = torch.func.jvp(score_fn, (x,), (v,))
    return (v * jv).sum(1)


# -- 5.4 which sigma gives a target floor --------------------------------------------------------
def _floor_of(target, sigma):
    """Ground truth, independent of eigenvalues: the module's exact Fisher divergence of DSM's
    minimiser (Section 2.6)."""
    W, b = m.dsm_optimal_linear_model(target, sigma)
    return m.linear_fisher_divergence(W, b, target.means[0], target.covs[0])


def _solve(f, value):
    """sigma with f(sigma) = value for increasing f, by bisection on log sigma."""
    lo, hi = 1e-6, 1e3
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if f(mid) < value else (lo, mid)
    return math.sqrt(lo * hi)


def _sigma_hint(got, cov, floor, f_got):
    """Name the mistake by comparing with the sigmas that common wrong formulas give."""
    lam = torch.linalg.eigvalsh(cov)
    truth = _solve(lambda s: (s**4 / (2 * lam * (lam + s**2) ** 2)).sum().item(), floor)
    diagnoses = [
        (truth**2, "your value is sigma^2 (the noise variance); return the standard deviation "
                   "sigma"),
        ((2 * floor / (1 / lam**3).sum().item()) ** 0.25,
         "your sigma solves the small-sigma approximation F_floor ~ sigma^4/2 sum_k "
         "lambda_k^-3, which is only accurate for tiny sigma: solve the exact equation"),
        (_solve(lambda s: (s**4 / (2 * (lam + s**2) ** 2 * lam**2)).sum().item(), floor),
         "your F_floor lacks the weight lambda_k: x - mu has variance lambda_k (not 1) along "
         "eigenvector k"),
        (_solve(lambda s: (s**4 / (lam * (lam + s**2) ** 2)).sum().item(), floor),
         "your F_floor is twice the right one: the Fisher divergence has a factor 1/2"),
        (_solve(lambda s: (s**2 / (2 * lam * (lam + s) ** 2)).sum().item(), floor),
         "your F_floor uses sigma where the covariance needs sigma^2 (Sigma + sigma^2 I)"),
    ]
    for wrong, hint in diagnoses:
        # A diagnosis names a mistake only where that mistake gives a *different* sigma: with
        # Sigma = I and floor 1/8 the true sigma is 1 = sigma^2, and an answer that is merely
        # imprecise (a loose root-finder) must not be told it returned a variance.
        if math.isclose(wrong, truth, rel_tol=1e-3):
            continue
        if math.isclose(got, wrong, rel_tol=1e-5):
            return hint
    side = "large" if f_got > floor else "small"
    return (f"F_floor(your sigma) = {f_got:.6g}, target {floor:.6g}: your sigma is too {side}. "
            f"Is your F_floor right (compare it with linear_fisher_divergence of "
            f"dsm_optimal_linear_model), and does your root-finder converge to 1e-9?")


def check_sigma_for_floor(fn):
    cases = [(torch.eye(1, dtype=F64), 0.125, "Sigma = I (D = 1)")]
    for seed, dim in ((4, 3), (5, 12)):
        target = m.gaussian_target(dim, torch.Generator().manual_seed(seed), eig_range=(0.2, 3.0))
        top = 0.5 * torch.trace(target.precisions[0]).item()  # the floor as sigma -> infinity
        for frac in (1e-6, 0.01, 0.3, 0.9):
            cases.append((target, frac * top, f"D = {dim}, floor = {frac:g} x 1/2 tr Sigma^-1"))
    for target, floor, what in cases:
        if isinstance(target, torch.Tensor):  # the worked example: Sigma = I in D = 1
            target = m.GaussianMixture([1.0], torch.zeros(1, 1, dtype=F64), target[None])
        cov = target.covs[0]
        got = fn(cov.clone(), floor)
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not (isinstance(got, float) and math.isfinite(got) and got > 0):
            raise AssertionError(f"sigma for {what}: expected a positive float, got {got!r}")
        f_got = _floor_of(target, got)
        if not math.isclose(f_got, floor, rel_tol=1e-7):
            raise AssertionError(
                f"sigma for {what}: you returned sigma = {got:.9g}, whose exact floor is "
                f"{f_got:.9g}, expected {floor:.9g}\n  hint: "
                f"{_sigma_hint(got, cov, floor, f_got)}")


def small_sigma_expansion(cov, floor):
    lam = torch.linalg.eigvalsh(cov)
    return (2 * floor / (1 / lam**3).sum().item()) ** 0.25


def variance_not_std(cov, floor):
    return load_solutions("05").exercise_sigma_for_floor(cov, floor) ** 2


def floor_unweighted(cov, floor):
    lam = torch.linalg.eigvalsh(cov)
    return _solve(lambda s: (s**4 / (2 * (lam + s**2) ** 2 * lam**2)).sum().item(), floor)


def floor_missing_half(cov, floor):
    lam = torch.linalg.eigvalsh(cov)
    return _solve(lambda s: (s**4 / (lam * (lam + s**2) ** 2)).sum().item(), floor)


def loose_root_finder(cov, floor):
    """The right equation, solved only to about 1e-5 relative: no sigma^2 mistake anywhere."""
    return load_solutions("05").exercise_sigma_for_floor(cov, floor) * (1 + 2e-6)


def too_few_bisection_steps(cov, floor):
    lam = torch.linalg.eigvalsh(cov)
    lo, hi = 1e-3, 1e2
    for _ in range(12):
        mid = math.sqrt(lo * hi)
        f = (mid**4 / (2 * lam * (lam + mid**2) ** 2)).sum().item()
        lo, hi = (mid, hi) if f < floor else (lo, mid)
    return math.sqrt(lo * hi)


EXERCISES = [
    Exercise("exercise_sphere_projections", check_sphere_projections,
             [unit_sphere, normalised_cube, rademacher_instead]),
    Exercise("exercise_frobenius_norm_estimate", check_frobenius_norm_estimate,
             [trace_instead, norm_not_squared, gaussian_probes, summed_over_probes]),
    Exercise("exercise_ssm_forward_mode", check_ssm_forward_mode,
             [variance_reduced_instead, missing_half, trace_term_only]),
    Exercise("exercise_sigma_for_floor", check_sigma_for_floor,
             [small_sigma_expansion, variance_not_std, floor_unweighted, floor_missing_half,
              too_few_bisection_steps, loose_root_finder]),
]

(test_reference_passes, test_wrong_answer_fails, test_your_answer,
 test_every_exercise_in_the_module_is_checked) = exercise_tests("05", EXERCISES)


def test_examples_in_docstrings_hold():
    """The worked examples quoted in the stubs' docstrings, computed with the reference."""
    sol = load_solutions("05")
    v = sol.exercise_sphere_projections(1000, 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(v.norm(dim=1), torch.full((1000,), 2.0, dtype=F64))
    est = sol.exercise_frobenius_norm_estimate(lambda V: 3 * V, 2, 3,
                                               torch.Generator().manual_seed(0))
    assert est.item() == pytest.approx(18.0)
    out = sol.exercise_ssm_forward_mode(lambda x: -x, torch.tensor([[1.0, 0.0]]),
                                        torch.tensor([[1.0, 1.0]]))
    assert out.item() == pytest.approx(-1.5)
    assert sol.exercise_sigma_for_floor(torch.eye(1, dtype=F64), 0.125) == pytest.approx(1.0)


def test_sigma_hint_names_only_mistakes_that_were_made():
    """5.4: at the worked example (Sigma = I, floor 1/8) the true sigma is 1 = sigma^2, so an
    imprecise but otherwise right answer used to be told it returned a variance. It is now told
    about convergence; a real variance-for-std answer (elsewhere) is still named."""
    with pytest.raises(AssertionError) as info:
        check_sigma_for_floor(loose_root_finder)
    message = str(info.value)
    assert "Sigma = I (D = 1)" in message, message  # it fails at the worked example
    assert "sigma^2 (the noise variance)" not in message and "root-finder" in message, message
    with pytest.raises(AssertionError) as info:
        check_sigma_for_floor(variance_not_std)
    assert "sigma^2 (the noise variance)" in str(info.value)
