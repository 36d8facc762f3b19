"""Learned scores against the exact score on 2D data (issue 13, part 1).

For four 2D data sets we train the score models of three chapters, each for a fixed budget of
wall time, sample them with the chapter's samplers, and put every result beside the same
sampler, with the same settings and the same random numbers, driven by the *exact* score:

    module 04  one MLP s_theta(x) ~ grad log p_sigma(x) at a single sigma (DSM)
               -> plain Langevin (module 03's ULA) from a uniform start, then one Tweedie step
    module 07  a noise-conditional net s_theta(x, sigma_i) on a 20-level geometric ladder
               -> annealed Langevin (Song and Ermon 2019, with the final denoising step)
    module 08  a time-conditional net s_theta(x, t) of the VE SDE
               -> Euler-Maruyama (EM), predictor-corrector (PC) and the probability-flow ODE

The exact score exists when the noised density has a closed form:

    Gaussian mixture: x_t = a x_0 + s z  ~  sum_k w_k N(a mu_k, a^2 C_k + s^2 I)
    checkerboard:     p_t(x) = 1/8 sum_k prod_d [Phi(u_kd) - Phi(v_kd)] / a,
                      u_kd = (x_d - a lo_kd) / s,  v_kd = (x_d - a hi_kd) / s
                      (the k-th dark unit square is [lo_k1, hi_k1] x [lo_k2, hi_k2])
    Swiss roll:       none (its columns say "-").

Quality against a fresh data set ``reference`` of the same size n:
    MMD  sqrt of the plug-in RBF MMD^2 with a fixed bandwidth per data set (a distance, so
         ratios are defined; module 08's definition)
    SW   sliced Wasserstein-2 distance, 256 fixed directions
    off  the share of samples off the data (see ``off_mode_rule``): SW alone hides mass
         put between the modes.
The floor is the mean of each measure over pairs of independent data sets of size n
(``common.metrics.distance_floor``): what a perfect sampler scores. The headline is the
ratio learned / exact per sampler; the goal is 1.2 or less.

Usage:
    python bench/bench_2d.py                  # 4 data sets x 3 models x 60 s, ~13 min
    python bench/bench_2d.py --budget 20      # 20 s of training per model
    python bench/bench_2d.py --quick          # smoke run, a few seconds, numbers meaningless
    python bench/bench_2d.py --write-report   # also write the tables into BENCHMARKS.md
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import numpy as np
import report  # first of the project imports: it puts the repository root on sys.path
import torch
from torch.special import log_ndtr

from common.cli import make_parser, positive_float, positive_int, print_table, start_run
from common.datasets import checkerboard, swiss_roll
from common.metrics import distance_floor, mmd_rbf, off_mode_mask, sliced_wasserstein
from common.modules import load_module

m03, m04, m06 = load_module("03"), load_module("04"), load_module("06")
m07, m08 = load_module("07"), load_module("08")

Tensor = torch.Tensor
F64 = torch.float64
NAME = "bench_2d"
GOAL = 1.2  # the target for learned / exact
DATASETS = ("mixture", "separated", "swiss_roll", "checkerboard")
QUICK_DATASETS = ("mixture", "checkerboard")


# ----------------------------------------------------------------------------------------------
# The checkerboard's exact noised density and score
# ----------------------------------------------------------------------------------------------
def log_ndtr_diff(u: Tensor, v: Tensor) -> Tensor:
    """log(Phi(u) - Phi(v)) for u > v, accurate in both tails.

    Phi(u) - Phi(v) = Phi(-v) - Phi(-u): for v > 0 the second form avoids 1 - 1 cancellation.
    Then log(Phi(a) - Phi(b)) = log Phi(a) + log1p(-exp(log Phi(b) - log Phi(a))), a > b.
    """
    flip = v > 0
    a, b = torch.where(flip, -v, u), torch.where(flip, -u, v)
    log_a = log_ndtr(a)
    return log_a + torch.log1p(-torch.exp(log_ndtr(b) - log_a))


class NoisedCheckerboard:
    """Law of x_t = a x_0 + s z, x_0 uniform on unit squares with lower corners ``lower`` (K, 2).

    Per square and axis, with u = (x_d - a lo) / s and v = (x_d - a hi) / s (hi = lo + 1):
        p(x_d | k) = [Phi(u) - Phi(v)] / a,   d/dx_d log p(x_d | k) = (phi(u) - phi(v)) / (s D),
    D = Phi(u) - Phi(v); the squares are equally likely, so
        score(x) = sum_k r_k(x) grad log p(x | k),   r_k = softmax_k log p(x | k).
    Computed in float64, returned in x's dtype.
    """

    def __init__(self, lower: Tensor, sigma: float, scale: float = 1.0):
        if sigma <= 0 or scale <= 0:
            raise ValueError(f"need sigma > 0 and scale > 0, got {sigma}, {scale}")
        self.lower, self.sigma, self.scale = lower.to(F64), float(sigma), float(scale)

    def _terms(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u, v (N, K, 2) and log D (N, K, 2)."""
        a, s = self.scale, self.sigma
        xd = x.to(F64)[:, None, :]
        u, v = (xd - a * self.lower) / s, (xd - a * (self.lower + 1)) / s
        return u, v, log_ndtr_diff(u, v)

    def _component_log_probs(self, log_d: Tensor) -> Tensor:
        """log (1/K) + sum_d log(D_kd / a), shape (N, K)."""
        K = self.lower.shape[0]
        return log_d.sum(2) - 2 * math.log(self.scale) - math.log(K)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p_t(x), shape (N,)."""
        *_, log_d = self._terms(x)
        return torch.logsumexp(self._component_log_probs(log_d), 1).to(x.dtype)

    def score(self, x: Tensor) -> Tensor:
        """grad log p_t(x), shape (N, 2)."""
        u, v, log_d = self._terms(x)
        log_phi = lambda w: -0.5 * w.square() - 0.5 * math.log(2 * math.pi)
        # (phi(u) - phi(v)) / D, both ratios formed in log space so neither tail overflows
        grad = (torch.exp(log_phi(u) - log_d) - torch.exp(log_phi(v) - log_d)) / self.sigma
        r = torch.softmax(self._component_log_probs(log_d), 1)  # (N, K)
        return (r[:, :, None] * grad).sum(1).to(x.dtype)


class Checkerboard:
    """``common.datasets.checkerboard`` as an object with the GaussianMixture methods that the
    modules' exact-score helpers call: ``sample``, ``dim``, ``perturbed``, ``perturbed_score``."""

    dim = 2
    # dark squares [i, i+1] x [j, j+1] of [-2, 2]^2 with i - j even (checkerboard()'s layout)
    lower = torch.tensor([[i, j] for i in range(-2, 2) for j in range(-2, 2) if (i - j) % 2 == 0],
                         dtype=F64)

    def sample(self, n: int, generator=None, dtype=None, device=None) -> Tensor:
        return checkerboard(n, generator).to(dtype=dtype or torch.get_default_dtype(),
                                             device=device)

    def perturbed(self, sigma: float, scale: float = 1.0) -> NoisedCheckerboard:
        return NoisedCheckerboard(self.lower, sigma, scale)

    def perturbed_score(self, x: Tensor, sigma: float, scale: float = 1.0) -> Tensor:
        return self.perturbed(sigma, scale).score(x)

    def off_mask(self, x: Tensor) -> Tensor:
        """(N,) bool: the point lies in none of the dark squares."""
        xd = x.detach().to(F64)[:, None, :]
        inside = ((xd >= self.lower) & (xd <= self.lower + 1)).all(2).any(1)
        return ~inside


class SwissRoll:
    """``common.datasets.swiss_roll`` with a ``sample`` method; no exact score."""

    dim = 2

    def sample(self, n: int, generator=None, dtype=None, device=None) -> Tensor:
        return swiss_roll(n, generator).to(dtype=dtype or torch.get_default_dtype(),
                                           device=device)


# ----------------------------------------------------------------------------------------------
# Data sets and what "off the data" means for each
# ----------------------------------------------------------------------------------------------
@dataclass
class Target:
    """One data set: the data object, its "off the data" rule, and per-data-set settings."""

    name: str
    data: object  # .sample(n, generator, dtype); .perturbed(sigma, scale) when exact
    off_mask: Callable[[Tensor], Tensor]  # (N, 2) -> (N,) bool
    off_rule: str  # says what off_mask counts
    sigma_04: float  # module 04's single noise level
    bandwidth: float  # MMD kernel width h
    lim: tuple[float, float]  # plotting box

    @property
    def exact(self) -> bool:
        return hasattr(self.data, "perturbed")


def nearest_distance(x: Tensor, cloud: Tensor, chunk: int = 1000) -> Tensor:
    """min_j |x_i - cloud_j| for every point of x (N, 2), in chunks to bound memory."""
    return torch.cat([torch.cdist(x[i:i + chunk].float(), cloud.float()).min(1).values
                      for i in range(0, len(x), chunk)])


def roll_off_mask(n_cloud: int, n_cal: int, seed: int) -> tuple[Callable, str]:
    """Off the Swiss roll: nearest-neighbour distance to a dense data cloud above r_99, the 99%
    quantile of the same distance for fresh data points (so data itself scores 1%)."""
    gen = torch.Generator().manual_seed(seed)
    cloud = swiss_roll(n_cloud, gen)
    r99 = torch.quantile(nearest_distance(swiss_roll(n_cal, gen), cloud), 0.99).item()
    rule = (f"nearest-neighbour distance to {n_cloud} data points > {r99:.3f} "
            f"(its 99% quantile for data)")
    return (lambda x: nearest_distance(x.detach(), cloud) > r99), rule


def make_target(name: str, seed: int, quick: bool) -> Target:
    """The data set ``name`` with its settings (see DATASETS)."""
    if name in ("mixture", "separated"):
        mix = m04.triangle_mixture_2d() if name == "mixture" else m07.separated_modes_data()
        off = lambda x: off_mode_mask(x, mix.means, mix.precisions, 3.0)
        rule = "Mahalanobis distance > 3 from every component (data: about 1.1%)"
        if name == "mixture":  # module 04's 0.45/0.35/0.2 tilted Gaussians
            return Target(name, mix, off, rule, 0.1, 0.3, (-3.5, 3.5))
        # module 07's 0.8 N((-5,-5), I) + 0.2 N((5,5), I); MMD bandwidth 1 as module 07
        return Target(name, mix, off, rule, 0.25, 1.0, (-9.0, 9.0))
    if name == "checkerboard":
        board = Checkerboard()
        return Target(name, board, board.off_mask, "outside every dark square (data: 0%)",
                      0.1, 0.3, (-2.5, 2.5))
    off, rule = roll_off_mask(2000 if quick else 20_000, 500 if quick else 5000, seed + 99)
    return Target(name, SwissRoll(), off, rule, 0.1, 0.3, (-3.2, 3.6))


def mmd_distance(x: Tensor, reference: Tensor, bandwidth: float) -> float:
    """sqrt of the plug-in RBF MMD^2 (module 08's MMD): a distance, so ratios are defined."""
    return math.sqrt(mmd_rbf(x, reference, bandwidth, biased=True))


def sw_distance(x: Tensor, reference: Tensor, seed: int) -> float:
    """Sliced Wasserstein-2 with 256 directions fixed by ``seed`` (the same for every sampler)."""
    return sliced_wasserstein(x, reference, 256, torch.Generator().manual_seed(seed))


def quality(x: Tensor, reference: Tensor, target: Target, seed: int) -> dict[str, float]:
    """MMD, SW and the off-data share of samples x (N, 2) against ``reference``.

    Chains that diverged (non-finite) count as off the data and are left out of MMD and SW,
    which would otherwise be infinite and say nothing about the other chains.
    """
    finite = torch.isfinite(x).all(1)
    diverged = int((~finite).sum())
    x = x[finite]
    off = (target.off_mask(x).double().sum().item() + diverged) / len(finite)
    if len(x) < 2:
        return {"mmd": math.inf, "sw": math.inf, "off": off, "diverged": diverged}
    return {"mmd": mmd_distance(x, reference, target.bandwidth),
            "sw": sw_distance(x, reference, seed), "off": off, "diverged": diverged}


def floor(target: Target, n: int, n_pairs: int, seed: int) -> dict[str, float]:
    """Each measure between two independent data sets of size n, averaged over n_pairs pairs."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: target.data.sample(n, gen, dtype=F64)
    mmd, _ = distance_floor(draw, lambda a, b: mmd_distance(a, b, target.bandwidth), n_pairs)
    sw, _ = distance_floor(draw, lambda a, b: sw_distance(a, b, seed), n_pairs)
    off = float(np.mean([target.off_mask(draw()).double().mean().item()
                         for _ in range(n_pairs)]))
    return {"mmd": mmd, "sw": sw, "off": off}


# ----------------------------------------------------------------------------------------------
# Training for a budget of wall time
# ----------------------------------------------------------------------------------------------
def budgeted(train: Callable[[int], object], budget: float, probe_steps: int):
    """Train for about ``budget`` seconds with a trainer that takes a step count.

    The modules' trainers run a given number of steps, and their schedules (04's cosine decay,
    08's warm-up) depend on it, so stopping one early would not be the module's recipe. A
    warm-up probe of k steps pays the one-time costs (first calls, lazy initialisation, which
    on the first model of a run take longer than the steps); a second probe of 2k steps then
    times a step, tau = t_2k / 2k (its small fixed cost makes tau an overestimate, so the
    budget errs on the short side); then a run from scratch of
        n = 0.9 (budget - t_k - t_2k) / tau
    steps (the 2k-step model is kept if n would not exceed 2k). The machine's load can change
    during the run, so the caller reports the wall time actually spent, probes included.
    Returns (model, steps, seconds).
    """
    start = time.perf_counter()
    train(probe_steps)
    t_k = time.perf_counter() - start
    model = train(2 * probe_steps)
    t_2k = time.perf_counter() - start - t_k
    tau = t_2k / (2 * probe_steps)
    steps = int(0.9 * (budget - t_k - t_2k) / tau)
    if steps > 2 * probe_steps:
        model = train(steps)
    else:
        steps = 2 * probe_steps
    return model, steps, time.perf_counter() - start


def train_04(target: Target, cfg, seed: int) -> Callable[[int], object]:
    """steps -> module 04's MLP trained by DSM at target.sigma_04 (fresh data every step)."""
    def train(steps: int):
        gen = torch.Generator().manual_seed(seed)
        net = m04.seeded_mlp_score_net(2, cfg.hidden, gen)
        sample = lambda n: target.data.sample(n, gen, dtype=torch.float32)
        m04.train_dsm(net, sample, target.sigma_04, replace(cfg, steps=steps), gen, "04")
        return net
    return train


def train_07(target: Target, cfg, sigmas: Tensor, run) -> Callable[[int], object]:
    """steps -> module 07's noise-conditional net (EMA weights) on the ladder ``sigmas``."""
    return lambda steps: m07.train_ncsn(run, replace(cfg, train_steps=steps), target.data,
                                        sigmas)["model"]


def train_08(target: Target, cfg, sde, seed: int) -> Callable[[int], object]:
    """steps -> module 08's time-conditional net (EMA weights) for ``sde``."""
    def train(steps: int):
        gen = torch.Generator().manual_seed(seed)
        return m08.train_score_net(sde, target.data, replace(cfg, train_steps=steps), gen,
                                   "08")[0]
    return train


# ----------------------------------------------------------------------------------------------
# The samplers, each run with a learned and (where it exists) the exact score
# ----------------------------------------------------------------------------------------------
def sample_04(score_fn, target: Target, cfg, n: int, seed: int) -> Tensor:
    """Module 03's ULA on p_sigma from U(box)^2, module 04's step eps = 0.5 sigma^2 and total time
    T = steps x eps, then Tweedie's x + sigma^2 s(x) (module 04) to undo the sigma blur."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = target.lim
    x = lo + (hi - lo) * torch.rand(n, 2, generator=gen, dtype=F64)
    step_size, n_steps = m04.langevin_steps_for(target.sigma_04, cfg)
    chain = m03.langevin(score_fn, x, step_size, n_steps, gen)
    for state in chain:  # keep only the last state: the whole chain would not fit in memory
        x = state
    return m04.tweedie_denoise(score_fn, x, target.sigma_04)


def sample_07(score_fn, sigmas: Tensor, cfg, n: int, seed: int) -> Tensor:
    """Module 07's annealed Langevin from sigma_1 N(0, I), epsilon = r sigma_L^2 (its exact_run
    and demo_learned use the same start, step and seeds)."""
    start = m07.prior_sample(n, (2,), sigmas[0].item(), torch.Generator().manual_seed(seed + 4))
    *_, x = m07.annealed_langevin_states(score_fn, start, sigmas,
                                         step_size=cfg.step_ratio * sigmas[-1].item() ** 2,
                                         n_steps=cfg.steps_per_level,
                                         generator=torch.Generator().manual_seed(seed + 5))
    return x


def sample_08(score_fn, sde, cfg, seed: int) -> dict[str, Tensor]:
    """Module 08's run_samplers: EM, PC (reverse diffusion + 1 corrector step), RK45 ODE."""
    out = m08.run_samplers(sde, score_fn, cfg, torch.Generator().manual_seed(seed))
    return {name: x for name, (x, _) in out.items()}


# ----------------------------------------------------------------------------------------------
# One data set: train, sample, measure
# ----------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """The modules' own configurations with the benchmark's sizes."""

    n: int
    budget: float
    probe_steps: int
    n_pairs: int
    cfg04: object
    cfg07: object
    cfg08: object


def make_settings(args) -> Settings:
    quick = args.quick
    n = args.n_samples or (300 if quick else 2000)
    budget = args.budget or (0.4 if quick else 60.0)
    cfg04 = m04.Config.quick() if quick else m04.Config()
    cfg07 = m07.Config.quick() if quick else m07.Config()
    cfg08 = m08.Config.quick() if quick else m08.Config()
    # quick: module 04's ULA for T = 1 instead of 6 (200 steps at sigma = 0.1)
    cfg04 = replace(cfg04, chains=n, langevin_time=1.0 if quick else cfg04.langevin_time)
    cfg07 = replace(cfg07, n_samples=n, steps_per_level=args.steps_per_level
                    or cfg07.steps_per_level)
    cfg08 = replace(cfg08, n_samples=n, sampler_steps=args.sampler_steps or cfg08.sampler_steps)
    return Settings(n, budget, 5 if quick else 50, 2 if quick else 5, cfg04, cfg07, cfg08)


def evaluate_target(target: Target, st: Settings, run, seed: int) -> dict:
    """Train the three models on ``target``, run every sampler with the learned and the exact
    score, and measure all against one fresh reference draw. Returns rows and samples."""
    data_gen = torch.Generator().manual_seed(seed)
    reference = target.data.sample(st.n, data_gen, dtype=F64)
    # module 07's rule sigma_1 = the largest distance between data points; the VE SDE's
    # sigma_max at least that too (module 08 uses 10 for data 4.3 across)
    d_max = m07.max_pairwise_distance(target.data.sample(st.cfg07.n_maxdist, data_gen, dtype=F64))
    sigmas = m07.make_ladder(d_max, st.cfg07)
    sde = m08.make_sde("ve", sigma_max=max(10.0, d_max))
    models = {
        "04": budgeted(train_04(target, st.cfg04, seed + 1), st.budget, st.probe_steps),
        "07": budgeted(train_07(target, st.cfg07, sigmas, run), st.budget, st.probe_steps),
        "08": budgeted(train_08(target, st.cfg08, sde, seed + 3), st.budget, st.probe_steps),
    }
    learned = {"04": m04.as_score_fn_no_grad(models["04"][0]),
               "07": m07.learned_score_fn(models["07"][0]),
               "08": m08.as_score_fn(models["08"][0])}
    exact = None
    if target.exact:
        exact = {"04": target.data.perturbed(target.sigma_04).score,
                 "07": m06.exact_noise_score_fn(target.data),
                 "08": m08.exact_score_fn(target.data, sde)}

    def run_all(scores) -> dict[tuple[str, str], Tensor]:
        out = {("04", "Langevin"): sample_04(scores["04"], target, st.cfg04, st.n, seed + 11),
               ("07", "annealed Langevin"): sample_07(scores["07"], sigmas, st.cfg07, st.n,
                                                      seed + 12)}
        out.update({("08", k): x for k, x in sample_08(scores["08"], sde, st.cfg08,
                                                      seed + 13).items()})
        return out

    samples = {"learned": run_all(learned), "exact": run_all(exact) if exact else None}
    q = {kind: {key: quality(x, reference, target, seed + 21) for key, x in s.items()}
         for kind, s in samples.items() if s is not None}
    return {"target": target, "reference": reference, "samples": samples, "quality": q,
            "floor": floor(target, st.n, st.n_pairs, seed + 31),
            "training": {k: (steps, secs) for k, (_, steps, secs) in models.items()},
            "sigmas": sigmas, "sde": sde}


# ----------------------------------------------------------------------------------------------
# Tables, figure, report
# ----------------------------------------------------------------------------------------------
def fmt(v: float, digits: int = 4) -> str:
    return "inf" if math.isinf(v) else f"{v:.{digits}f}"


def fmt_off(q: dict) -> str:
    """The off-data share, with the number of diverged chains when there are any."""
    return f"{q['off']:.1%}" + (f" ({q['diverged']} diverged)" if q.get("diverged") else "")


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def result_rows(results: list[dict]) -> tuple[list, list]:
    """(detail rows, headline rows)."""
    detail, headline = [], []
    for r in results:
        fl, name = r["floor"], r["target"].name
        for (model, sampler), ql in r["quality"]["learned"].items():
            qe = r["quality"].get("exact", {}).get((model, sampler))
            cells = [name, model, sampler, fmt(ql["mmd"]), fmt(ql["sw"]), fmt_off(ql)]
            if qe is None:
                cells += ["-"] * 5
                headline.append([name, sampler, model, "-", "-", "no exact score"])
            else:
                rm, rs = ratio(ql["mmd"], qe["mmd"]), ratio(ql["sw"], qe["sw"])
                cells += [fmt(qe["mmd"]), fmt(qe["sw"]), fmt_off(qe),
                          f"{rm:.2f}", f"{rs:.2f}"]
                meets = "yes" if max(rm, rs) <= GOAL else "no"
                headline.append([name, sampler, model, f"{rm:.2f}", f"{rs:.2f}", meets])
            detail.append(cells + [fmt(fl["mmd"]), fmt(fl["sw"]), f"{fl['off']:.1%}"])
    return detail, headline


DETAIL_HEADER = ("data set", "model", "sampler", "MMD learned", "SW learned", "off learned",
                 "MMD exact", "SW exact", "off exact", "MMD ratio", "SW ratio",
                 "MMD floor", "SW floor", "off floor")
HEADLINE_HEADER = ("data set", "sampler", "model", "MMD learned/exact", "SW learned/exact",
                   f"both <= {GOAL}")
TRAIN_HEADER = ("data set", "model", "training steps", "wall time (s)")


def training_rows(results: list[dict]) -> list:
    return [[r["target"].name, model, steps, f"{secs:.1f}"]
            for r in results for model, (steps, secs) in r["training"].items()]


def legend_lines(results: list[dict], st: Settings) -> list[str]:
    """What the columns mean, per data set where it differs."""
    c4, c7, c8 = st.cfg04, st.cfg07, st.cfg08
    lines = [
        f"n = {st.n} samples per sampler, against one fresh data set of n points. "
        f"Training: {st.budget:g} s of wall time per model, spent on a warm-up run of "
        f"{st.probe_steps} steps, a run of {2 * st.probe_steps} steps that times a step, then "
        f"the module's "
        f"own trainer for the steps that fit (the wall-time column includes the probes; the "
        f"machine is shared, so it can exceed the budget a little).",
        f"Samplers: 04 = ULA (module 03) on p_sigma for T = {c4.langevin_time:g} with "
        f"eps = {c4.langevin_factor:g} sigma^2 from a uniform start on the plotting box, then "
        f"one Tweedie step; 07 = annealed Langevin, {c7.n_levels} levels from the data's largest "
        f"pairwise distance to {c7.sigma_min:g}, {c7.steps_per_level} steps per level, "
        f"r = {c7.step_ratio:g}; 08 = VE SDE (sigma_max = max(10, largest distance)), "
        f"EM {c8.sampler_steps} steps, PC {c8.sampler_steps} steps + "
        f"{c8.corrector_steps} corrector (snr {c8.snr:g}), ODE RK45 rtol = atol = 1e-5. "
        f"Learned and exact runs share start points and noise.",
        "MMD: sqrt of the plug-in RBF MMD^2 (bandwidth per data set below); SW: sliced "
        "Wasserstein-2, 256 directions; off: share of samples off the data (rule below); "
        "ratio: learned / exact; floor: the same measure between two independent data sets "
        f"of n points (mean of {st.n_pairs} pairs). Goal: ratio <= {GOAL}. Chains that "
        "diverged count as off the data and are left out of MMD and SW.",
        "A ratio below 1 means the learned score did better than the exact one with that "
        "sampler: the sampler itself is biased (plain Langevin gets mode weights wrong even "
        "with the exact score, module 03), and the learned score's errors partly offset it.",
    ]
    for r in results:
        t = r["target"]
        lines.append(f"{t.name}: module 04 sigma = {t.sigma_04:g}, MMD bandwidth "
                     f"{t.bandwidth:g}, 07 sigma_1 = {r['sigmas'][0].item():.2f}, "
                     f"VE sigma_max = {r['sde'].sigma_max:.2f}; off = {t.off_rule}.")
    return lines


def plot_samples(results: list[dict], run) -> object:
    """One row per data set: the data, then exact and learned samples of every sampler."""
    keys = list(results[0]["samples"]["learned"])
    n_cols = 1 + 2 * len(keys)
    fig, axes = plt.subplots(len(results), n_cols, figsize=(1.9 * n_cols, 2.2 * len(results)),
                             squeeze=False)
    for row, r in zip(axes, results):
        t, ref = r["target"], r["reference"][:1000]
        panels = [("data", ref, None)]
        for key in keys:
            for kind in ("exact", "learned"):
                s = r["samples"][kind]
                panels.append((f"{key[0]} {key[1]}\n{kind}", None if s is None else s[key][:1000],
                               r["quality"].get(kind, {}).get(key)))
        for ax, (title, x, q) in zip(row, panels):
            ax.scatter(*ref.T.numpy(), s=1, c="0.75", linewidths=0)
            if x is None:
                ax.text(0.5, 0.5, "no exact\nscore", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9)
            elif q is not None:
                ax.scatter(*x.detach().T.numpy(), s=1, c="tab:red", linewidths=0)
                title += f"\nMMD {q['mmd']:.3f} SW {q['sw']:.2f}\noff {fmt_off(q)}"
            ax.set_title(title, fontsize=7)
            ax.set(xlim=t.lim, ylim=t.lim, xticks=[], yticks=[], aspect="equal")
        row[0].set_ylabel(t.name, fontsize=9)
    fig.suptitle("Samples (red) over fresh data (grey); off = share off the data", fontsize=10)
    return run.save(fig, "bench_2d_samples")


def report_markdown(argv, tables: list[tuple[str, tuple, list]], legend: list[str],
                    figure, elapsed: float) -> str:
    command = " ".join(["python bench/bench_2d.py", *argv])
    parts = [f"Command: `{command}`  ", f"Machine: {report.machine_line()}  ",
             f"Total wall time: {elapsed / 60:.1f} min. Figure: `{figure}`.", ""]
    parts += [f"- {line}" for line in legend]
    anchors = ("bench_2d-training", "bench_2d-detail", "bench_2d-headline")  # README links
    for anchor, (title, header, rows) in zip(anchors, tables):
        parts += ["", f'<a id="{anchor}"></a>**{title}**', "", report.markdown_table(header, rows)]
    return "\n".join(parts)


def make_bench_parser():
    parser = make_parser("Benchmark: learned scores of modules 04, 07, 08 against the exact "
                         "score on 2D data.")
    group = parser.add_argument_group("bench_2d")
    group.add_argument("--budget", type=positive_float, default=None, metavar="SECONDS",
                       help="wall time of training per model (default 60, or 0.4 with --quick)")
    group.add_argument("--n-samples", type=positive_int, default=None,
                       help="samples per sampler and reference size (default 2000, quick 300)")
    group.add_argument("--datasets", nargs="+", choices=DATASETS, default=None,
                       help=f"data sets (default: all; quick: {' '.join(QUICK_DATASETS)})")
    group.add_argument("--steps-per-level", type=positive_int, default=None,
                       help="07's annealed Langevin steps per level (default 100, quick 10)")
    group.add_argument("--sampler-steps", type=positive_int, default=None,
                       help="08's EM / PC steps (default 300, quick 30)")
    group.add_argument("--write-report", action="store_true",
                       help="write the tables into BENCHMARKS.md (section bench_2d)")
    return parser


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    run = start_run(make_bench_parser(), "bench", argv)
    args, start = run.args, time.perf_counter()
    st = make_settings(args)
    names = args.datasets or (QUICK_DATASETS if args.quick else DATASETS)
    print(f"Machine: {report.machine_line()}")
    results = []
    for i, name in enumerate(names):
        seed = args.seed + 1000 * i
        print(f"[{time.perf_counter() - start:6.0f} s] {name}: training 3 models x "
              f"{st.budget:g} s, then sampling", flush=True)
        results.append(evaluate_target(make_target(name, seed, args.quick), st, run, seed))
    detail, headline = result_rows(results)
    tables = [("Training (steps each model got in its budget)", TRAIN_HEADER,
               training_rows(results)),
              ("Every sampler, learned and exact score", DETAIL_HEADER, detail),
              (f"Headline: learned / exact (goal <= {GOAL})", HEADLINE_HEADER, headline)]
    figure = plot_samples(results, run)
    legend = legend_lines(results, st)
    for title, header, rows in tables:
        print_table(title, rows, header)
    met = [h for h in headline if h[-1] == "yes"]
    comparable = [h for h in headline if h[-1] != "no exact score"]
    summary = f"{len(met)} of {len(comparable)} sampler rows meet learned/exact <= {GOAL}"
    elapsed = time.perf_counter() - start
    print("\n" + "\n".join(legend) + f"\n{summary}.\nFigure: {figure}\n"
          f"Total wall time {elapsed / 60:.1f} min")
    if args.write_report:
        md = report_markdown(argv, tables, legend + [summary + "."], figure, elapsed)
        print(f"Wrote section {NAME} of {report.write_section(NAME, md)}")
    return {"results": results, "detail": detail, "headline": headline, "figure": figure,
            "training": training_rows(results)}


if __name__ == "__main__":
    main()
