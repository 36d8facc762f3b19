"""bench/bench_2d.py: one smoke run with a tiny budget, the checkerboard's exact score, bad flags.

A benchmark is a script that prints and plots; this only shows that it runs end to end and
that the one closed form it adds (the noised checkerboard) is right.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def bench():
    """bench/bench_2d.py as a module (bench/ is not a package: its scripts import ``report``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if "bench_2d" in sys.modules:
        return sys.modules["bench_2d"]
    spec = importlib.util.spec_from_file_location("bench_2d", BENCH / "bench_2d.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_2d"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("sigma, scale", [(0.01, 1.0), (0.1, 1.0), (1.0, 1.0), (10.0, 1.0),
                                          (0.3, 0.7)])
def test_checkerboard_score_is_the_gradient_of_its_log_density(bench, sigma, scale):
    """The closed-form score equals autograd of log p_t, near and far from the squares."""
    gen = torch.Generator().manual_seed(0)
    x = (8 * torch.rand(400, 2, generator=gen, dtype=torch.float64) - 4).requires_grad_(True)
    noised = bench.Checkerboard().perturbed(sigma, scale)
    (auto,) = torch.autograd.grad(noised.log_prob(x).sum(), x)
    score = noised.score(x.detach())
    assert torch.isfinite(score).all()
    err = (score - auto).abs().max().item()
    assert err <= 1e-8 * (1 + auto.abs().max().item()), \
        f"closed-form score differs from autograd by {err:.3g} at sigma={sigma}, a={scale}"


def test_checkerboard_density_integrates_to_one_and_data_lies_on_the_squares(bench):
    board = bench.Checkerboard()
    h = 0.02
    xs = torch.arange(-6, 6, h, dtype=torch.float64) + h / 2
    grid = torch.cartesian_prod(xs, xs)
    for sigma in (0.05, 0.5):
        mass = board.perturbed(sigma).log_prob(grid).exp().sum().item() * h * h
        assert abs(mass - 1) < 1e-3, f"p_sigma integrates to {mass:.5f} at sigma={sigma}"
    x = board.sample(5000, torch.Generator().manual_seed(1), dtype=torch.float64)
    assert not board.off_mask(x).any(), "checkerboard() draws must lie on the dark squares"


def test_quick_run_prints_every_sampler_with_finite_numbers(bench, tmp_path, capsys):
    out = bench.main(["--quick", "--outdir", str(tmp_path), "--n-samples", "200",
                      "--datasets", "checkerboard", "swiss_roll"])
    samplers = ["Langevin", "annealed Langevin", "EM", "PC", "ODE"]
    assert [(r[0], r[1]) for r in out["headline"]] == \
        [(d, s) for d in ("checkerboard", "swiss_roll") for s in samplers]
    for row in out["detail"]:
        learned_and_floor = row[3:5] + row[11:13]
        assert all(math.isfinite(float(v)) for v in learned_and_floor), row
        if row[0] == "checkerboard":  # exact score: ratios are numbers
            assert all(math.isfinite(float(v)) for v in row[6:8] + row[9:11]), row
        else:  # Swiss roll: no exact score
            assert row[6:11] == ["-"] * 5, row
    assert [r[2] for r in out["training"]] and all(r[2] > 0 for r in out["training"])
    assert out["figure"].exists()
    assert "Headline: learned / exact" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--budget", "-1"], ["--budget", "0"],
                                   ["--n-samples", "0"], ["--datasets", "moons"]])
def test_bad_flags_exit_with_code_2(bench, flags, tmp_path):
    with pytest.raises(SystemExit) as info:
        bench.main([*flags, "--outdir", str(tmp_path)])
    assert info.value.code == 2
