"""bench/: the pieces the MNIST benchmarks add, and a smoke run of each with a tiny budget.

The benchmarks' numbers are measured by running them (BENCHMARKS.md); these tests only check
that the code computes what it claims and that each script runs end to end. The smoke runs use
a small fake MNIST written to a temporary folder, so they need no data set.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_mnist  # noqa: E402
import bench_samplers  # noqa: E402
import report  # noqa: E402

from common.modules import load_module  # noqa: E402

m09 = load_module("09")
sde_lib = load_module("08")


# -- the Colab baseline ------------------------------------------------------------------------
def test_colab_sde_variance_is_the_integral_of_g_squared():
    """sigma_t^2 = int_0^t sigma^(2s) ds, checked by the trapezoid rule; and time_of_std
    inverts std."""
    sde = bench_mnist.ColabSDE(25.0)
    for t in (0.01, 0.3, 1.0):
        s = torch.linspace(0, t, 20001, dtype=torch.float64)
        integral = torch.trapezoid(sde.diffusion(s) ** 2, s)
        assert sde.std(torch.tensor(t, dtype=torch.float64)) ** 2 == \
            pytest.approx(integral.item(), rel=1e-6)
    t = torch.tensor([1e-5, 1e-3, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(sde.time_of_std(sde.std(t)), t)
    assert sde.prior_std == pytest.approx(math.sqrt(624 / (2 * math.log(25))))


def test_colab_network_has_the_published_shape():
    """1.1 M trainable parameters (the Colab also counts its 128 fixed Fourier frequencies);
    28x28 in and out; the encoder shrinks 28 -> 26 -> 12 -> 5 -> 2."""
    net = bench_mnist.ColabScoreNet(bench_mnist.ColabSDE())
    assert sum(p.numel() for p in net.parameters()) == 1_115_297
    sizes, h = [], torch.zeros(2, 1, 28, 28)
    for conv in (net.conv1, net.conv2, net.conv3, net.conv4):
        h = conv(h)
        sizes.append(h.shape[-1])
    assert sizes == [26, 12, 5, 2]
    out = net(torch.randn(2, 1, 28, 28), torch.tensor([0.1, 0.9]))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


class _ExactScore(torch.nn.Module):
    """The exact score of data that is one fixed image x0: s(x, t) = -(x - x0) / sigma_t^2."""

    def __init__(self, sde, x0, scale: float = 1.0):
        super().__init__()
        self.sde, self.x0, self.scale = sde, x0, scale

    def forward(self, x, t):
        return -self.scale * (x - self.x0) / self.sde.std(t)[:, None, None, None] ** 2


def test_colab_loss_is_zero_for_the_exact_score_and_positive_otherwise(gen):
    """|sigma_t s + z|^2 vanishes for s = -(x - x0) / sigma_t^2, the score of one data point;
    a score off by a factor (a forgotten 1/sigma) does not."""
    sde = bench_mnist.ColabSDE()
    x0 = torch.rand(1, 1, 28, 28, generator=gen).expand(8, -1, -1, -1)
    exact = bench_mnist.colab_loss(_ExactScore(sde, x0), x0, torch.Generator().manual_seed(0))
    wrong = bench_mnist.colab_loss(_ExactScore(sde, x0, scale=0.5), x0,
                                   torch.Generator().manual_seed(0))
    assert exact.item() == pytest.approx(0.0, abs=1e-6)
    assert wrong.item() == pytest.approx(0.25 * 784, rel=0.1)  # E|z/2|^2 summed over pixels


def test_colab_denoiser_is_tweedie(gen):
    """D(x, s) = x + s^2 score(x, t(s)): module 09's denoiser_score reads the score back."""
    sde = bench_mnist.ColabSDE()
    x0 = torch.rand(1, 1, 28, 28, generator=gen)
    exact = _ExactScore(sde, x0)
    denoiser = bench_mnist.ColabDenoiser(exact)
    x = torch.randn(3, 1, 28, 28, generator=gen)
    sigma = torch.tensor([0.05, 1.0, 5.0])
    torch.testing.assert_close(m09.denoiser_score(denoiser, x, sigma),
                               exact(x, sde.time_of_std(sigma)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(denoiser(x, sigma), x0.expand(3, -1, -1, -1), rtol=1e-4,
                               atol=1e-4)  # one data point: the denoiser returns it


def test_colab_bits_per_dim_matches_a_gaussian_in_closed_form(gen):
    """Data N(m, s0^2 I) on [0, 1]-scaled pixels: p_t = N(m, (s0^2 + sigma_t^2) I) and the
    score is exact, so the probability-flow map is linear, x_T = m + k (u - m) with
    k = sqrt(var_T / var_eps), and the model's log density is log prior(x_T) + D ln k exactly
    (the Hutchinson estimate is exact for a Jacobian that is a multiple of I)."""
    sde, s0, m = bench_mnist.ColabSDE(), 0.3, 0.4

    class GaussianScore(torch.nn.Module):
        def forward(self, x, t):
            return -(x - m) / (s0**2 + sde.std(t)[:, None, None, None] ** 2)

    images = torch.randint(0, 256, (2, 1, 28, 28), generator=gen, dtype=torch.uint8)
    bpd, nfe = bench_mnist.colab_bits_per_dim({"net": GaussianScore(), "sde": sde}, images,
                                              tol=1e-6, seed=3)
    u = sde_lib.dequantize(images, generator=torch.Generator().manual_seed(3), scale=1.0,
                           shift=0.0)
    var_eps, var_T = (s0**2 + sde.std(torch.tensor(t)).item() ** 2 for t in (1e-5, 1.0))
    k = math.sqrt(var_T / var_eps)
    log_p = sde.prior_log_prob(m + k * (u - m)) + 784 * math.log(k)
    expected = -log_p / (784 * math.log(2)) + 8
    torch.testing.assert_close(bpd, expected, rtol=1e-3, atol=1e-3)
    assert nfe > 0


class _SpyScore(torch.nn.Module):
    """A zero score that remembers every time it was asked about."""

    def __init__(self, sde):
        super().__init__()
        self.sde, self.times = sde, []

    def forward(self, x, t):
        self.times.append(t.detach().clone())
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampler, settings, nfe", [
    ("euler_maruyama", {"steps": 7}, 7), ("pc", {"steps": 7}, 14),
    ("heun", {"heun_steps": 5}, 9)])
def test_colab_samplers_count_every_network_call(sampler, settings, nfe):
    """EM: one call per step; PC: corrector + predictor; Heun: 2 N - 1. And no call ever asks
    the network about a time outside its training range [1e-5, 1] (Heun's churn included)."""
    sde = bench_mnist.ColabSDE()
    spy = _SpyScore(sde)
    r = bench_mnist.sample_colab({"net": spy, "sde": sde}, sampler, 3, seed=0, device="cpu",
                                 **settings)
    assert r["nfe"] == nfe == len(spy.times)
    assert r["images"].shape == (3, 1, 28, 28) and r["images"].dtype == torch.uint8
    times = torch.cat(spy.times)
    assert times.max() <= 1 + 1e-6 and times.min() >= 1e-5


def test_cheapest_within_skips_the_reference_and_dearer_settings():
    def row(nfe, fd, conf):
        return {"nfe": nfe, "quality": {"frechet": fd, "confident": conf}}

    ref = row(1001, 40.0, 0.8)
    rows = [row(51, 80.0, 0.8), row(101, 43.0, 0.75), row(201, 41.0, 0.8), ref,
            row(1001, 30.0, 0.9)]
    assert bench_samplers.cheapest_within(rows, ref)["nfe"] == 101
    assert bench_samplers.cheapest_within([ref, row(2000, 30.0, 0.9)], ref) is None


def test_sampler_labels_name_the_setting():
    assert bench_mnist.sampler_label(("pc", {"steps": 500})) == "pc, 500 steps"
    assert bench_mnist.sampler_label(("ode", {"ode_tol": 1e-5})) == "ode, tol 1e-05"
    assert bench_mnist.sampler_label(("heun_guided", {})) == "heun_guided"


def test_within_ten_percent_needs_both_numbers():
    ref = {"frechet": 40.0, "confident": 0.8}
    assert bench_samplers.within({"frechet": 43.9, "confident": 0.73}, ref)
    assert not bench_samplers.within({"frechet": 44.5, "confident": 0.9}, ref)  # FD too high
    assert not bench_samplers.within({"frechet": 30.0, "confident": 0.7}, ref)  # too unsure


def test_write_section_replaces_only_its_own_block(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# B\n\n<!-- a:begin -->\nold a\n<!-- a:end -->\n\ntext\n")
    report.write_section("a", "new a", path)
    report.write_section("b", "first b", path)
    report.write_section("b", "second b", path)
    text = path.read_text()
    assert "old a" not in text and "new a" in text and "text" in text
    assert text.count("<!-- b:begin -->") == 1 and "second b" in text and "first b" not in text
    path.write_text("<!-- c:end -->\n<!-- c:begin -->\n")
    with pytest.raises(ValueError, match="broken c section"):
        report.write_section("c", "x", path)
    assert report.markdown_table(("x", "y"), [(1, 2)]).splitlines() == \
        ["| x | y |", "| --- | --- |", "| 1 | 2 |"]


# -- smoke runs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_mnist(tmp_path_factory):
    """A few hundred 'digits' in MNIST's IDX format: a bright bar whose position is the label."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in [("train", 400), ("t10k", 100)]:
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 4 + 2 * label: 6 + 2 * label, 4:24] = 255
        header = np.array([2051, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = np.array([2049, n], dtype=">i4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    return root


def test_bench_mnist_smoke(fake_mnist, tmp_path):
    out = bench_mnist.main(["--quick", "--data-dir", str(fake_mnist), "--outdir",
                            str(tmp_path), "--checkpoint-dir", str(tmp_path), "--threads", "1"])
    assert set(out["main"]) == {"project", "colab"}
    for model in out["main"]:
        for r in out["main"][model].values():
            assert r["images"].dtype == torch.uint8 and r["nfe"] > 0
            assert math.isfinite(r["quality"]["frechet"])
    assert all(math.isfinite(b["bpd"]) for b in out["bpd"].values())
    assert "| colab | pc, 3 steps |" in out["markdown"]
    assert (tmp_path / "bench" / "bench_mnist_samples.png").exists()
    assert (tmp_path / "bench" / "bench_mnist_quality_vs_nfe.png").exists()


def test_bench_samplers_smoke(fake_mnist, tmp_path):
    out = bench_samplers.main(["--quick", "--data-dir", str(fake_mnist), "--outdir",
                               str(tmp_path), "--checkpoint-dir", str(tmp_path), "--threads",
                               "1"])
    families = {bench_samplers.family(r["spec"]) for r in out["rows"]}
    assert families == {"euler_maruyama", "pc", "pc, no corrector", "ode", "heun",
                        "heun_guided"}
    assert out["reference"]["spec"] == bench_samplers.QUICK_REFERENCE
    if out["best"] is not None:  # the winner is checked at a second seed
        assert out["second_seed"]["best"]["spec"] == out["best"]["spec"]
        assert "second sample seed" in out["markdown"]
    assert "within 10%" in out["markdown"]
    assert (tmp_path / "bench" / "bench_samplers.png").exists()


@pytest.mark.parametrize("script, argv", [
    (bench_mnist, ["--budget", "-1"]), (bench_mnist, ["--n-samples", "0"]),
    (bench_samplers, ["--n-samples", "-5"]), (bench_mnist, ["--unknown-flag"]),
])
def test_bad_flags_exit_with_usage(script, argv, capsys):
    with pytest.raises(SystemExit) as err:
        script.main(argv)
    assert err.value.code == 2
    assert "error" in capsys.readouterr().err


def test_missing_mnist_says_what_to_place(tmp_path):
    with pytest.raises(SystemExit, match="(?s)MNIST is not under .*Place these four files"):
        bench_mnist.main(["--quick", "--data-dir", str(tmp_path), "--outdir", str(tmp_path)])
