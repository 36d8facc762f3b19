"""Unit tests of the shared helpers in common/ (small synthetic tensors only)."""

import argparse
import math
import re

import numpy as np
import pytest
import torch

from common import cli, datasets, device, exercises, metrics, modules, plotting, seeding, training
from common.datasets import GaussianMixture

pytestmark = pytest.mark.common


# -- seeding ------------------------------------------------------------------------------------
def test_seed_everything_reproduces_all_generators():
    g1 = seeding.seed_everything(7)
    a = (torch.rand(3), np.random.rand(3), torch.rand(3, generator=g1))
    g2 = seeding.seed_everything(7)
    b = (torch.rand(3), np.random.rand(3), torch.rand(3, generator=g2))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2])


def test_seed_everything_rejects_seeds_torch_cannot_take():
    for seed in (-1, 2**64):
        with pytest.raises(ValueError, match=r"in \[0, 2\*\*64 - 1\]"):
            seeding.seed_everything(seed)


def test_seeds_above_32_bits_give_their_own_numpy_stream():
    """numpy's global seed takes 32 bits; seeds that differ only above them (seed % 2**32 was
    what numpy got before) must not share a stream, and the largest seed works."""
    draws = []
    for seed in (5, 5 + 2**32, 2**64 - 1):
        seeding.seed_everything(seed)
        draws.append(np.random.rand(3))
    assert not np.array_equal(draws[0], draws[1]) and not np.array_equal(draws[1], draws[2])


def test_seeds_derived_from_the_largest_seed_stay_valid():
    """Chapters derive seeds as seed + k and 1000 * seed + j: they wrap around 2**64."""
    seed = cli.SeedCount(0, cli.SEED_MAX)(str(cli.SEED_MAX))
    assert seed + 1 == 0 and 1000 * seed + 7 == (1000 * cli.SEED_MAX + 7) % 2**64
    torch.Generator().manual_seed(seed + 9)  # an overflow here was a traceback before
    assert seed + 0.5 == cli.SEED_MAX + 0.5  # only integer arithmetic wraps


def test_deterministic_mode_switches_torch_flag():
    try:
        seeding.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


class _FakeGenerator:
    """Only the .device attribute, to test device checks without a GPU."""

    def __init__(self, device):
        self.device = torch.device(device)


def test_make_generator_on_the_cpu_matches_a_plain_generator():
    g = seeding.make_generator(5, "cpu")
    assert isinstance(g, torch.Generator) and g.device.type == "cpu"
    torch.testing.assert_close(torch.randn(4, generator=g),
                               torch.randn(4, generator=torch.Generator().manual_seed(5)))
    assert seeding.make_generator(5).device.type == "cpu"
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*64 - 1\]"):
        seeding.make_generator(-2, "cpu")
    if torch.cuda.is_available():
        assert seeding.make_generator(5, "cuda").device.type == "cuda"


def test_check_generator_names_the_mismatch():
    seeding.check_generator(None, "cpu")
    seeding.check_generator(torch.Generator(), torch.device("cpu"))
    seeding.check_generator(_FakeGenerator("cuda:0"), "cuda")  # "cuda" = the current device
    seeding.check_generator(_FakeGenerator("cuda"), "cuda:1")
    with pytest.raises(ValueError, match="generator is on cuda:0 but the tensor is on cpu"):
        seeding.check_generator(_FakeGenerator("cuda:0"), "cpu")
    with pytest.raises(ValueError, match="make_generator\\(seed, 'cuda:0'\\)"):
        seeding.check_generator(torch.Generator(), "cuda:0")
    with pytest.raises(ValueError, match="cuda:1"):
        seeding.check_generator(_FakeGenerator("cuda:1"), "cuda:0")


# -- device -------------------------------------------------------------------------------------
def test_pick_device_auto_and_cpu(capsys):
    assert device.pick_device("cpu").type == "cpu"
    auto = device.pick_device("auto")
    mps = device._mps_available()
    expected = "cuda" if torch.cuda.is_available() else ("mps" if mps else "cpu")
    assert auto.type == expected
    assert "Device:" in capsys.readouterr().out


def test_pick_device_errors():
    with pytest.raises(ValueError, match="unknown device"):
        device.pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            device.pick_device("cuda")


# -- cli ----------------------------------------------------------------------------------------
def test_cli_defaults_and_run(tmp_path):
    parser = cli.make_parser("test")
    parser.add_argument("--steps", type=cli.positive_int, default=5)
    run = cli.start_run(parser, "99_test", ["--quick", "--outdir", str(tmp_path), "--seed", "3"])
    assert run.quick and run.args.steps == 5 and run.device.type in {"cpu", "cuda", "mps"}
    assert run.outdir == tmp_path / "99_test" and run.outdir.is_dir()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    path = run.save(fig, "line")
    assert path.exists() and run.figures == [path]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "-3"], "argument --steps: must be an integer from 1 to"),
        (["--steps", "abc"], "must be an integer from 1 to"),
        (["--seed", "-1"], "must be an integer from 0 to 18,446,744,073,709,551,615, got -1"),
        (["--seed", str(2**64)], "must be an integer from 0 to 18,446,744,073,709,551,615"),
        (["--threads", str(2**31)], "must be an integer from 1 to 1,024"),
        (["--device", "tpu"], "invalid choice"),
        (["--no-such-flag"], "unrecognized arguments"),
        (["--rate", "0"], "must be a number > 0, got 0"),
        (["--rate", "nan"], "must be a number > 0, got nan"),
        (["--frac", "1.5"], "must be a number in [0, 1], got 1.5"),
        (["--count", "3"], "must be an integer from 10 to"),
        (["--outdir", "/proc/no/such/place"], "argument --outdir: cannot create"),
    ],
)
def test_cli_rejects_bad_values_with_clear_message(argv, message, capsys):
    parser = cli.make_parser("test")
    parser.add_argument("--steps", type=cli.positive_int, default=5)
    parser.add_argument("--rate", type=cli.positive_float, default=1.0)
    parser.add_argument("--frac", type=cli.Real(0, 1), default=0.5)
    parser.add_argument("--count", type=cli.int_at_least(10), default=10)
    with pytest.raises(SystemExit) as info:
        cli.start_run(parser, "99_test", argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_turns_scientific_notation_into_integers():
    assert cli.positive_int("1e6") == 1_000_000 and cli.positive_int("2.5e3") == 2500
    for text in ("1.5", "1e-3", "nan", "1e400x"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer"):
            cli.positive_int(text)


def test_a_size_that_cannot_fit_in_memory_is_refused_with_the_estimate(monkeypatch):
    monkeypatch.setattr(cli, "machine_memory", lambda: 8e9)
    samples = cli.Count(1, bytes_each=1000, unit="sample")
    assert samples.upper() == 8_000_000 and samples("8e6") == 8_000_000
    with pytest.raises(argparse.ArgumentTypeError) as info:
        samples("1e7")
    assert str(info.value) == ("must be an integer from 1 to 8,000,000: 1e7 samples would need "
                               "about 10 GB of memory and this machine has 8 GB")
    monkeypatch.setattr(cli, "machine_memory", lambda: None)  # e.g. Windows: no memory bound
    assert samples.upper() == cli.INT64_MAX


def test_weeks_are_refused_and_hours_warned_about():
    parser = cli.make_parser("test")
    parser.add_argument("--steps", type=cli.Count(1, seconds_each=1.0, unit="step"))
    assert cli.warn_if_slow(parser, parser.parse_args(["--steps", "3600"])) is None
    warning = cli.warn_if_slow(parser, parser.parse_args(["--steps", "7200"]))
    assert warning == ("warning: --steps 7200 would take about 2 h of CPU time (a rough "
                       "estimate); Ctrl-C stops the run")
    with pytest.raises(argparse.ArgumentTypeError, match="1e7 steps would take about 2,778 h"):
        parser._option_string_actions["--steps"].type("1e7")


def test_validate_runs_before_anything_is_written(tmp_path, capsys):
    parser = cli.make_parser("test")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli.start_run(parser, "99_test", ["--outdir", str(out)],
                      validate=lambda args: "argument --seed: must be odd, got 0")
    assert info.value.code == 2 and not out.exists()
    assert capsys.readouterr().err.splitlines()[-1].endswith("argument --seed: must be odd, got 0")
    cli.start_run(parser, "99_test", ["--outdir", str(out)], validate=lambda args: None)
    assert (out / "99_test").is_dir()


def test_timing_rows_are_tagged(capsys):
    cli.print_table("T", [("steps", "40", "40"), cli.timing_row("time per step", "3 ms", "-")])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines[5:7]] == ["steps", f"time per step "
                                                            f"{cli.TIMING_TAG}"]


def test_cli_validators_directly():
    assert cli.nonnegative_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_float("nan")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.positive_float("inf")


# -- plotting -----------------------------------------------------------------------------------
def test_plot_helpers_draw_something(tmp_path):
    import matplotlib.pyplot as plt

    plotting.setup_matplotlib(show=False)
    gm = GaussianMixture.eight_gaussians()
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    plotting.plot_density(axes[0], gm.log_prob)
    plotting.plot_score_field(axes[0], gm.score)
    assert len(axes[0].collections) > 1  # contours and arrows
    plotting.plot_samples_over_density(axes[1], gm.sample(100), gm.log_prob)
    x = torch.linspace(-3, 3, 50)
    ax_d, ax_s = axes[2], axes[3]
    plotting.plot_density_and_score_1d(ax_d, ax_s, x, torch.exp(-x**2 / 2), -x, label="N(0,1)")
    assert len(ax_d.lines) == 1 and len(ax_s.lines) == 2  # curve + zero line
    path = plotting.save_figure(fig, tmp_path, "helpers")
    assert path.stat().st_size > 1000


def test_score_field_clips_long_arrows():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    q = plotting.plot_score_field(ax, lambda x: -x * 100, xlim=(-4, 4), ylim=(-4, 4), n_arrows=11)
    lengths = np.hypot(q.U, q.V)
    # directions kept: arrows point to the origin; lengths clipped at the 90% quantile
    assert lengths.max() <= np.quantile(100 * np.hypot(q.X, q.Y), 0.9) + 1e-9
    plt.close(fig)


def test_image_grid_shapes():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    plotting.image_grid(ax, torch.rand(6, 1, 8, 8), nrow=3)
    plotting.image_grid(ax, torch.rand(6, 3, 8, 8), nrow=3)
    with pytest.raises(ValueError, match="expects"):
        plotting.image_grid(ax, torch.rand(6, 8, 8))
    plt.close(fig)


# -- datasets: Gaussian mixture -----------------------------------------------------------------
def _random_mixture(gen, K=3, D=2):
    A = torch.randn(K, D, D, generator=gen, dtype=torch.float64)
    covs = A @ A.transpose(1, 2) + 0.3 * torch.eye(D, dtype=torch.float64)
    means = 2 * torch.randn(K, D, generator=gen, dtype=torch.float64)
    w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.2
    return GaussianMixture(w / w.sum(), means, covs)


def test_mixture_log_prob_matches_torch_distributions(gen):
    gm = _random_mixture(gen)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=gm.weights),
        torch.distributions.MultivariateNormal(gm.means, covariance_matrix=gm.covs),
    )
    x = 3 * torch.randn(50, 2, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(gm.log_prob(x), ref.log_prob(x))


def test_mixture_score_matches_autograd(gen):
    gm = _random_mixture(gen, K=4, D=3)
    x = 2 * torch.randn(40, 3, generator=gen, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(gm.log_prob(x).sum(), x)
    torch.testing.assert_close(gm.score(x.detach()), grad)


def test_mixture_float32_input_gives_float32(gen):
    gm = _random_mixture(gen)
    x = torch.randn(5, 2)
    assert gm.score(x).dtype == torch.float32 and gm.log_prob(x).dtype == torch.float32


def test_mixture_sample_moments(gen):
    gm = _random_mixture(gen)
    n = 200_000
    x = gm.sample(n, gen, dtype=torch.float64)
    # Standard error of each coordinate mean is sqrt(var/n); allow 5 of them.
    se = (gm.covariance().diagonal() / n).sqrt()
    assert ((x.mean(0) - gm.mean()).abs() < 5 * se).all()
    torch.testing.assert_close(torch.cov(x.T), gm.covariance(), rtol=0.03, atol=0.03)


def test_perturbed_mixture_matches_simulation(gen):
    gm = _random_mixture(gen)
    sigma, scale = 0.7, 0.6
    x0 = gm.sample(200_000, gen, dtype=torch.float64)
    xt = scale * x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    noisy = gm.perturbed(sigma, scale)
    torch.testing.assert_close(xt.mean(0), noisy.mean(), atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(xt.T), noisy.covariance(), rtol=0.03, atol=0.03)


def test_posterior_mean_is_tweedie(gen):
    """Gaussian conditioning and Tweedie's formula (x + sigma^2 score)/a must agree."""
    gm = _random_mixture(gen)
    sigma, a = 0.8, 0.9
    x = 2 * torch.randn(30, 2, generator=gen, dtype=torch.float64)
    tweedie = (x + sigma**2 * gm.perturbed_score(x, sigma, a)) / a
    torch.testing.assert_close(gm.posterior_mean(x, sigma, a), tweedie)


def test_posterior_mean_by_monte_carlo(gen):
    """Average x_0 over simulated pairs whose x_t falls near a point: close to posterior_mean."""
    gm = GaussianMixture.isotropic([0.5, 0.5], [[-1.0, 0.0], [1.0, 0.0]], 0.5)
    sigma = 1.0
    x0 = gm.sample(400_000, gen, dtype=torch.float64)
    xt = x0 + sigma * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    point = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    near = (xt - point).norm(dim=1) < 0.1
    mc = x0[near].mean(0)
    se = x0[near].std(0) / near.sum().sqrt()
    assert ((mc - gm.posterior_mean(point, sigma)[0]).abs() < 5 * se + 0.01).all()


def test_mixture_validation_errors():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture.isotropic([0.5, 0.6], [[0.0, 0.0], [1.0, 1.0]], 1.0)
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="covs must be"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[1.0]])
    with pytest.raises(ValueError, match="shape"):
        GaussianMixture.eight_gaussians().score(torch.zeros(3, 3))


def test_named_mixtures():
    eight = GaussianMixture.eight_gaussians(radius=2.0)
    assert eight.n_components == 8
    torch.testing.assert_close(eight.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))
    sep = GaussianMixture.separated_modes()
    torch.testing.assert_close(sep.weights, torch.tensor([0.8, 0.2], dtype=torch.float64))


# -- datasets: toys and images ------------------------------------------------------------------
@pytest.mark.parametrize("toy", [datasets.swiss_roll, datasets.checkerboard])
def test_toys_shape_range_and_reproducibility(toy):
    a = toy(500, torch.Generator().manual_seed(0))
    b = toy(500, torch.Generator().manual_seed(0))
    assert a.shape == (500, 2) and a.dtype == torch.float64
    torch.testing.assert_close(a, b)
    assert a.abs().max() < 4.5 and a.std(0).min() > 0.3


def test_checkerboard_occupies_dark_squares_only():
    x = datasets.checkerboard(5000, torch.Generator().manual_seed(0))
    cells = torch.floor(x + 2).long()  # cell indices 0..3
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()


def test_data_root_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("SBGM_DATA_DIR", str(tmp_path))
    assert datasets.resolve_data_root(None) == tmp_path
    assert datasets.resolve_data_root("elsewhere") == datasets.Path("elsewhere")
    monkeypatch.delenv("SBGM_DATA_DIR")
    assert datasets.resolve_data_root(None) == datasets.Path("data")


# An offline stand-in for the MNIST and CIFAR-10 servers: port 9 on this machine refuses at once.
UNREACHABLE = "http://127.0.0.1:9/"


def write_tiny_mnist(raw, counts=(("train", 5), ("t10k", 3)), gz=False) -> dict:
    """The four MNIST files in the real IDX format (big-endian magic 2051/2049, counts, rows,
    cols, then bytes) with a few random 28x28 digits; ``gz``: only the .gz originals.
    Returns the images per split, to compare with what the loader reads."""
    import gzip

    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for prefix, n in counts:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        files = {f"{prefix}-images-idx3-ubyte": np.array([2051, n, 28, 28], ">i4").tobytes()
                 + images.tobytes(),
                 f"{prefix}-labels-idx1-ubyte": np.array([2049, n], ">i4").tobytes()
                 + labels.tobytes()}
        for name, data in files.items():
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (raw / name).write_bytes(data)
        written[prefix] = (images, labels)
    return written


def test_missing_mnist_says_which_files_to_place(tmp_path):
    """An empty data root: all four files named, each in the folder where it belongs."""
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.load_mnist(tmp_path, download=False)
    message, raw = str(info.value), tmp_path / "MNIST" / "raw"
    assert not isinstance(info.value, datasets.DataCorruptError) and info.value.can_download
    for name in datasets.MNIST_FILES:
        line = rf"^    {re.escape(str(raw / name))} +\(missing\)$"
        assert re.search(line, message, re.M), message
    marks = [line.index("(missing)") for line in message.splitlines() if "(missing)" in line]
    assert len(set(marks)) == 1, "the (missing) marks stand in one column"
    assert not (tmp_path / "MNIST").exists()  # looking creates nothing


def test_one_missing_mnist_file_is_the_one_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_tiny_mnist(raw)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(datasets.DataNotFoundError, match="t10k-labels-idx1-ubyte is missing"):
        datasets.load_mnist(tmp_path, download=False)


def test_mnist_loader_reads_idx_files(tmp_path):
    """A tiny MNIST in the IDX format, read back through the loader."""
    written = write_tiny_mnist(tmp_path / "MNIST" / "raw")
    train = datasets.load_mnist(tmp_path, train=True, download=False)
    img, label = train[0]
    assert len(train) == 5 and img.shape == (1, 28, 28) and 0 <= img.min() <= img.max() <= 1
    assert label == written["train"][1][0]
    assert len(datasets.load_mnist(tmp_path, train=False, download=False)) == 3


def test_gz_only_mnist_works_offline(tmp_path, monkeypatch):
    """Only the .gz originals: decompressed beside them, without trying the network."""
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", [UNREACHABLE])
    written = write_tiny_mnist(tmp_path / "MNIST" / "raw", gz=True)
    for download in (False, True):
        test = datasets.load_mnist(tmp_path, train=False, download=download)
        assert torch.equal(test.data, torch.from_numpy(written["t10k"][0]))
        assert torch.equal(test.targets, torch.from_numpy(written["t10k"][1]).long())
    assert not list((tmp_path / "MNIST" / "raw").glob("*.part"))


@pytest.mark.parametrize("download", [False, True])
def test_truncated_mnist_file_is_named_with_its_sizes(tmp_path, download):
    """A cut file is reported as damaged (which file, expected and actual size, what to do),
    not as missing, and with download=True no download hides it."""
    raw = tmp_path / "MNIST" / "raw"
    write_tiny_mnist(raw)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(datasets.DataCorruptError) as info:
        datasets.load_mnist(tmp_path, download=download)
    message = str(info.value)
    assert str(path) in message and "truncated" in message
    assert f"{16 + 5 * 28 * 28:,} bytes" in message and "has 1,000" in message
    assert "Delete it and place a complete copy" in message


def test_mnist_file_with_a_wrong_magic_number_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_tiny_mnist(raw)
    images, labels = raw / "t10k-images-idx3-ubyte", raw / "t10k-labels-idx1-ubyte"
    images.write_bytes(labels.read_bytes())  # a labels file where the images belong
    with pytest.raises(datasets.DataCorruptError, match="magic number 2049, expected 2051"):
        datasets.load_mnist(tmp_path, download=False)


def test_truncated_gz_original_is_named(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_tiny_mnist(raw, gz=True)
    path = raw / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(datasets.DataCorruptError, match="not a complete gzip file") as info:
        datasets.load_mnist(tmp_path, download=False)
    assert str(path) in str(info.value)
    assert not (raw / "train-labels-idx1-ubyte").exists()  # no half-written file left behind
    assert not (raw / "train-labels-idx1-ubyte.part").exists()


def test_failed_mnist_download_leaves_nothing_and_gives_the_manual_route(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", [UNREACHABLE])
    root = tmp_path / "data"
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.load_mnist(root, download=True)
    message = str(info.value)
    assert "downloading it failed" in message and "127.0.0.1" in message
    assert "Place these four files" in message and not info.value.can_download
    assert len(message.splitlines()) == 7  # the cause on one line, not torchvision's pages
    assert not root.exists()


def test_missing_cifar_says_what_to_place(tmp_path):
    with pytest.raises(datasets.DataNotFoundError, match="cifar-10-batches-py") as info:
        datasets.load_cifar10(tmp_path, download=False)
    assert info.value.can_download and not (tmp_path / "cifar-10-batches-py").exists()


def test_failed_cifar_download_leaves_nothing(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "url", UNREACHABLE + CIFAR10.filename)
    root = tmp_path / "data"
    with pytest.raises(datasets.DataNotFoundError, match="downloading it failed") as info:
        datasets.load_cifar10(root, download=True)
    assert not info.value.can_download and not root.exists()


def test_damaged_cifar_folder_names_the_file(tmp_path):
    """A folder whose files are all there but one is not the published one: that file is named
    (torchvision alone says only "not found or corrupted"); a missing one is named as missing."""
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, _ in CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], ""]]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(datasets.DataCorruptError, match="data_batch_1 is damaged"):
        datasets.load_cifar10(tmp_path, download=False)
    (folder / "test_batch").unlink()
    with pytest.raises(datasets.DataNotFoundError, match="test_batch missing"):
        datasets.load_cifar10(tmp_path, download=False)


def test_cifar_subset_fallback(tmp_path, capsys):
    path = tmp_path / datasets.CIFAR10_SUBSET
    path.parent.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(4, dtype=np.uint8), classes=np.array(["a"] * 10))
    ds = datasets.load_cifar10(tmp_path, train=True, download=False)
    img, label = ds[2]
    assert len(ds) == 4 and img.shape == (3, 32, 32) and label == 2
    torch.testing.assert_close(img[:, 5, 7], torch.from_numpy(images[2, 5, 7]).float() / 255)
    assert "subset" in capsys.readouterr().out


def test_truncated_cifar_subset_is_named(tmp_path):
    path = tmp_path / datasets.CIFAR10_SUBSET
    path.parent.mkdir(parents=True)
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=images, labels=np.arange(4, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(datasets.DataCorruptError, match="not a readable image archive") as info:
        datasets.load_cifar10(tmp_path, train=True, download=False)
    assert str(path) in str(info.value)


def test_real_mnist_when_present(real_mnist_root):
    train = datasets.load_mnist(real_mnist_root, train=True, download=False)
    test = datasets.load_mnist(real_mnist_root, train=False, download=False)
    assert len(train) == 60_000 and len(test) == 10_000


# -- metrics ------------------------------------------------------------------------------------
def test_mmd_closed_form_for_two_gaussians(gen):
    """For N(m1, s^2 I) vs N(m2, s^2 I) and bandwidth h, with c = (h^2 / (h^2 + 2 s^2))^(D/2):
    MMD^2 = 2 c (1 - exp(-|m1 - m2|^2 / (2 (h^2 + 2 s^2))))."""
    D, s, h, n = 2, 1.0, 1.5, 3000
    shift = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = s * torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = shift + s * torch.randn(n, D, generator=gen, dtype=torch.float64)
    c = (h**2 / (h**2 + 2 * s**2)) ** (D / 2)
    exact = 2 * c * (1 - math.exp(-shift.square().sum().item() / (2 * (h**2 + 2 * s**2))))
    estimate = metrics.mmd_rbf(x, y, bandwidth=h)
    assert abs(estimate - exact) < 0.01, (estimate, exact)
    same = metrics.mmd_rbf(x, s * torch.randn(n, D, generator=gen, dtype=torch.float64), h)
    assert abs(same) < 0.003


def test_mmd_median_bandwidth_and_errors(gen):
    x = torch.randn(100, 2, generator=gen)
    assert metrics.median_bandwidth(x, x) > 0
    assert metrics.mmd_rbf(x, x + 3) > metrics.mmd_rbf(x, x + 1) > 0
    with pytest.raises(ValueError, match="expected x"):
        metrics.mmd_rbf(x, torch.randn(100, 3))


def test_biased_mmd_is_the_plug_in_estimate(gen):
    """biased=True keeps the diagonal: MMD_b^2 = mean k(x, x) + mean k(y, y) - 2 mean k(x, y),
    which differs from the unbiased value by (1 - kxx_u) / N + (1 - kyy_u) / M (k(a, a) = 1)."""
    h = 0.7
    x = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    y = 0.3 + torch.randn(40, 2, generator=gen, dtype=torch.float64)
    k = lambda a, b: torch.exp(-torch.cdist(a, b).square() / (2 * h * h))
    by_hand = (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).item()
    assert metrics.mmd_rbf(x, y, h, biased=True) == pytest.approx(by_hand, rel=1e-12)
    kxx_u = (k(x, x).sum() - 50) / (50 * 49)
    kyy_u = (k(y, y).sum() - 40) / (40 * 39)
    unbiased = metrics.mmd_rbf(x, y, h)
    correction = ((1 - kxx_u) / 50 + (1 - kyy_u) / 40).item()
    assert by_hand == pytest.approx(unbiased + correction, rel=1e-10)
    assert unbiased != pytest.approx(by_hand, rel=1e-3)  # the two really differ
    # never negative, even for two draws of one distribution where the unbiased one can be
    for _ in range(5):
        a, b = torch.randn(2, 30, 2, generator=gen, dtype=torch.float64)
        assert metrics.mmd_rbf(a, b, h, biased=True) >= 0


def test_off_mode_fraction_of_a_gaussian_is_the_chi2_tail(gen):
    """Draws of N(mu, C) lie beyond Mahalanobis distance r with probability P(chi2_D > r^2);
    for D = 2 that is exp(-r^2 / 2) (1.1% at r = 3). Tolerance: 5 binomial standard errors."""
    assert metrics.chi2_tail(2, 3.0) == pytest.approx(math.exp(-4.5), rel=1e-12)
    assert metrics.chi2_tail(1, 2.0) == pytest.approx(math.erfc(2 / math.sqrt(2)), rel=1e-10)
    mu = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    cov = torch.tensor([[[0.5, 0.3], [0.3, 0.4]]], dtype=torch.float64)
    n = 200_000
    x = mu + torch.randn(n, 2, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov[0]).T
    for r in (1.0, 2.0, 3.0):
        p = metrics.chi2_tail(2, r)
        got = metrics.off_mode_fraction(x, mu, torch.linalg.inv(cov), r)
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n), (r, got, p)
    # the check can fail: the covariance passed where the precision belongs
    wrong = metrics.off_mode_fraction(x, mu, cov, 3.0)
    assert abs(wrong - metrics.chi2_tail(2, 3.0)) > 0.005, wrong


def test_off_mode_fraction_takes_the_nearest_component():
    """Hand-placed points, two unit components at (0, 0) and (10, 0), r = 3: a point counts as
    off only if it is farther than 3 from both."""
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    prec = torch.eye(2).expand(2, 2, 2)
    x = torch.tensor([[2.9, 0.0], [3.1, 0.0], [7.5, 0.0], [5.0, 0.0], [10.0, 2.0]])
    assert metrics.off_mode_fraction(x, means, prec) == pytest.approx(2 / 5)  # 3.1 and 5.0
    assert metrics.off_mode_fraction(x, means, 4 * prec) == 1.0  # std 0.5: radius 1.5
    assert metrics.off_mode_fraction(x, means, prec / 4) == 0.0  # std 2: radius 6
    with pytest.raises(ValueError, match="precisions"):
        metrics.off_mode_fraction(x, means, torch.eye(2))


def test_sliced_wasserstein_known_answers(gen):
    x = torch.randn(2000, 1, generator=gen, dtype=torch.float64)
    # In 1D the only directions are +-1: SW_2 of a shift is exactly the shift.
    assert metrics.sliced_wasserstein(x, x + 0.7, 8, gen) == pytest.approx(0.7, abs=1e-9)
    assert metrics.sliced_wasserstein(x, x, 8, gen) == 0.0
    # In D dims, a shift d gives SW_2^2 = E[(theta . d)^2] = |d|^2 / D.
    D = 4
    z = torch.randn(1000, D, generator=gen, dtype=torch.float64)
    d = torch.tensor([1.0, 2.0, 0.0, -2.0], dtype=torch.float64)
    sw = metrics.sliced_wasserstein(z, z + d, 4000, gen)
    assert sw == pytest.approx(d.norm().item() / math.sqrt(D), rel=0.05)


def test_sliced_wasserstein_unequal_sizes(gen):
    # N(0, 1) vs N(0, 2^2) in 1D: W_2 = |1 - 2| = 1.
    x = torch.randn(4000, 1, generator=gen, dtype=torch.float64)
    y = 2 * torch.randn(3000, 1, generator=gen, dtype=torch.float64)
    assert metrics.sliced_wasserstein(x, y, 4, gen) == pytest.approx(1.0, abs=0.08)


def test_distance_floor_equals_the_hand_written_loop():
    """Same draw order (a then b, pair after pair) and the same numbers as the explicit loop."""
    def run(floor_fn):
        g = torch.Generator().manual_seed(4)
        draw = lambda: torch.randn(200, 2, generator=g, dtype=torch.float64)
        distance = lambda a, b: metrics.sliced_wasserstein(a, b, 64, g)
        return floor_fn(draw, distance)

    by_hand = run(lambda draw, dist: np.array([dist(draw(), draw()) for _ in range(6)]))
    mean, sd = run(lambda draw, dist: metrics.distance_floor(draw, dist, 6))
    assert mean == by_hand.mean() and sd == by_hand.std(ddof=1)  # ddof=1: the sample std
    assert sd != pytest.approx(by_hand.std(ddof=0), rel=1e-6)


def test_distance_floor_draws_in_pairs_and_validates():
    counter = iter(range(100))
    pairs = []

    def draw():
        return torch.tensor(float(next(counter)))

    def distance(a, b):
        pairs.append((int(a), int(b)))
        return float(b - a)

    assert metrics.distance_floor(draw, distance, 3) == (1.0, 0.0)
    assert pairs == [(0, 1), (2, 3), (4, 5)]
    with pytest.raises(ValueError, match="n_pairs"):
        metrics.distance_floor(draw, distance, 1)


def test_distance_floor_of_gaussian_scalars(gen):
    """|a - b| for a, b ~ N(0, 1): mean 2 / sqrt(pi), std sqrt(2 - 4 / pi)."""
    n = 4000
    mean, sd = metrics.distance_floor(lambda: torch.randn((), generator=gen, dtype=torch.float64),
                                      lambda a, b: abs(a - b).item(), n)
    true_sd = math.sqrt(2 - 4 / math.pi)
    assert abs(mean - 2 / math.sqrt(math.pi)) < 5 * true_sd / math.sqrt(n)
    assert sd == pytest.approx(true_sd, rel=0.05)


# -- training helpers ---------------------------------------------------------------------------
def test_expand_to_broadcasts_a_per_sample_value_over_any_shape():
    v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    for shape in ((3, 2), (3, 1, 4, 4), (3,)):
        x = torch.ones(shape, dtype=torch.float64)
        out = training.expand_to(v, x)
        assert out.shape == (3,) + (1,) * (len(shape) - 1)
        torch.testing.assert_close((out * x).flatten(1).sum(1) if x.ndim > 1 else out * x,
                                   v * (x[0].numel()))
    scalar = training.expand_to(torch.tensor(2.0), torch.ones(3, 2, 2))
    assert scalar.shape == (1, 1, 1)
    num = training.expand_to(0.5, torch.ones(3, 2, dtype=torch.float64))
    assert num.dtype == torch.float64 and num.shape == (1, 1)  # a number takes x's dtype
    kept = training.expand_to(v, torch.ones(3, 2, dtype=torch.float32))
    assert kept.dtype == torch.float64  # a tensor is reshaped, not cast
    with pytest.raises(ValueError, match="one value per sample"):
        training.expand_to(torch.ones(3, 2), torch.ones(3, 2))


def _scalar_model(value: float) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def test_ema_update_matches_its_formula_with_and_without_warmup():
    """theta_bar <- d_k theta_bar + (1 - d_k) theta, d_k = d or min(d, (1 + k) / (10 + k))."""
    thetas = [float(k % 7) - 2.5 for k in range(1, 150)]
    for warmup in (False, True):
        model = _scalar_model(1.0)
        ema = training.EMA(model, decay=0.9, warmup=warmup)
        expected = 1.0
        for k, theta in enumerate(thetas):
            d = min(0.9, (1 + k) / (10 + k)) if warmup else 0.9
            assert ema.current_decay() == d
            with torch.no_grad():
                model.weight.fill_(theta)
            ema.update(model)
            expected = d * expected + (1 - d) * theta
            assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
        assert ema.num_updates == len(thetas)
    # the warm-up's decays quoted in common/training.py; capped at d once (1+k)/(10+k) > d
    slow = training.EMA(_scalar_model(0.0), decay=0.999, warmup=True)
    decays = {}
    for k in range(101):
        decays[k] = slow.current_decay()
        slow.update(_scalar_model(0.0))
    assert (decays[0], decays[10]) == (0.1, 0.55) and decays[100] == pytest.approx(0.918, abs=1e-3)
    # the check can fail: with warm-up, one update from theta_0 = 1 to theta = 0 leaves 0.1
    warm = training.EMA(_scalar_model(1.0), decay=0.9, warmup=True)
    warm.update(_scalar_model(0.0))
    assert warm.shadow["weight"].item() == pytest.approx(0.1)  # without warm-up: 0.9


def test_ema_rejects_decays_outside_the_unit_interval():
    model = _scalar_model(1.0)
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="decay must lie in \\[0, 1\\)"):
            training.EMA(model, decay=bad)
    training.EMA(model, decay=0.0)  # 0 is allowed: the average is the latest weights


def test_ema_state_dict_round_trip_copy_and_averaged():
    model = _scalar_model(2.0)
    ema = training.EMA(model, decay=0.5, warmup=True)
    ema.update(_scalar_model(4.0))  # d_0 = 0.1: 0.1 * 2 + 0.9 * 4 = 3.8
    state = ema.state_dict()
    fresh = training.EMA(_scalar_model(0.0), decay=0.9)
    fresh.load_state_dict(state)
    assert (fresh.decay, fresh.warmup, fresh.num_updates) == (0.5, True, 1)
    assert fresh.shadow["weight"].item() == pytest.approx(3.8)
    old_state = {k: v for k, v in state.items() if k != "warmup"}  # saved before warm-up existed
    older = training.EMA(_scalar_model(0.0), decay=0.9, warmup=True)
    older.load_state_dict(old_state)
    assert older.warmup is False
    averaged = ema.averaged(model)
    assert averaged.weight.item() == pytest.approx(3.8) and not averaged.weight.requires_grad
    assert model.weight.item() == 2.0  # the original is untouched
    ema.copy_to(model)
    assert model.weight.item() == pytest.approx(3.8)
    with pytest.raises(ValueError, match="does not match"):
        training.EMA(torch.nn.Linear(2, 2)).load_state_dict(state)


def test_common_docstring_lists_every_submodule():
    import common

    names = {p.stem for p in modules.ROOT.joinpath("common").glob("*.py")} - {"__init__"}
    for name in names:
        assert f"``{name}``" in common.__doc__, f"common/__init__.py does not list {name}"


# -- module loading and exercise machinery ------------------------------------------------------
def test_load_module_by_number():
    m = modules.load_module("01")
    assert m is modules.load_module(1)
    assert modules.module_path("01").name == "01_score_functions_basics.py"
    assert modules.load_solutions("01").__name__.startswith("solutions_")
    with pytest.raises(FileNotFoundError, match="no file 77_"):
        modules.load_module("77")


def test_assert_close_messages():
    exercises.assert_close(torch.ones(3), torch.ones(3), what="ones")
    with pytest.raises(AssertionError, match="expected shape"):
        exercises.assert_close(torch.ones(3), torch.ones(3, 1), what="shape")
    with pytest.raises(AssertionError, match="largest error 2 at index \\(1,\\)"):
        exercises.assert_close(torch.tensor([1.0, 3.0]), torch.ones(2), what="x", hint="h")
    with pytest.raises(AssertionError, match="NaN"):
        exercises.assert_close(torch.tensor([float("nan")]), torch.ones(1), what="nan")
    with pytest.raises(AssertionError, match="expected a tensor"):
        exercises.assert_close(None, torch.ones(1), what="none")
    # A scalar is shown as a number, without "(shape ())" or "index ()".
    with pytest.raises(AssertionError) as info:
        exercises.assert_close(1.5, 2.0, what="scalar")
    assert "expected: 2\n" in str(info.value) and "()" not in str(info.value)


def test_assert_close_shows_the_worst_entries_not_the_first():
    """A long result that is right at its start and wrong in the middle (exercise 1.4's density
    on 2,001 grid points) shows the entries that are wrong, with their indices."""
    expected = torch.zeros(2001)
    actual = expected.clone()
    actual[1200], actual[1500] = 0.3, -0.1
    with pytest.raises(AssertionError) as info:
        exercises.assert_close(actual, expected, what="density")
    message = str(info.value)
    assert "index (1200,): expected 0, got 0.3" in message
    assert message.index("(1200,)") < message.index("(1500,)")  # worst first
    assert "the 5 worst of 2001 entries" in message


def test_hints_come_in_steps(monkeypatch):
    """What is wrong (a known mistake), then the idea; the formula only on request."""
    kwargs = dict(what="v", hint="the idea", formula="v = a^(2k)",
                  mistakes=[(torch.tensor([3.0]), "the exponent is k, not 2k")])
    monkeypatch.delenv(exercises.SHOW_SOLUTION, raising=False)
    with pytest.raises(AssertionError) as info:
        exercises.assert_close(torch.tensor([3.0]), torch.tensor([9.0]), **kwargs)
    message = str(info.value)
    assert "what is wrong: the exponent is k, not 2k" in message and "the idea" in message
    assert "a^(2k)" not in message and "SBGM_SHOW_SOLUTION=1" in message
    with pytest.raises(AssertionError) as info:  # an unknown mistake: no diagnosis
        exercises.assert_close(torch.tensor([4.0]), torch.tensor([9.0]), **kwargs)
    assert "what is wrong" not in str(info.value)
    monkeypatch.setenv(exercises.SHOW_SOLUTION, "1")
    with pytest.raises(AssertionError, match=r"formula: v = a\^\(2k\)"):
        exercises.assert_close(torch.tensor([3.0]), torch.tensor([9.0]), **kwargs)


def test_call_checked_turns_a_shape_error_into_a_message():
    def transposed(x, A):
        return x @ A  # (N, D) @ (D + 1, D) fails
    x, A = torch.ones(4, 2), torch.ones(3, 2)
    with pytest.raises(AssertionError, match=r"raised RuntimeError.*\n.*shapes \(4, 2\), \(3, 2\)"):
        exercises.call_checked(transposed, x, A, what="f")
    def not_attempted(x, A):
        raise NotImplementedError
    with pytest.raises(NotImplementedError):
        exercises.call_checked(not_attempted, x, A, what="f")
    assert exercises.call_checked(lambda x, A: x.sum(), x, A, what="f") == 8


def test_list_exercises_in_source_order():
    ns = {}
    source = "def exercise_b():\n    'B first line.'\n\ndef exercise_a():\n    'A.'\n"
    exec(source + "\ndef helper(): pass", ns)
    assert exercises.list_exercises(ns) == [("exercise_b", "B first line."), ("exercise_a", "A.")]


def test_exercise_requires_a_wrong_answer():
    with pytest.raises(ValueError, match="wrong answer"):
        exercises.Exercise("exercise_x", lambda fn: None, [])


def test_completeness_check_names_unchecked_and_stale_exercises():
    """exercise_tests' fourth test passes for the real list of chapter 01 and fails, naming the
    function, when an exercise has no check or a check names a function the module lacks."""
    names = [name for name, _ in exercises.list_exercises(vars(modules.load_module("01")))]
    entry = lambda name: exercises.Exercise(name, lambda fn: None, [lambda: 0])
    exercises.exercise_tests("01", [entry(n) for n in names])[3]()
    with pytest.raises(AssertionError, match=f"without a check \\['{names[0]}'\\]"):
        exercises.exercise_tests("01", [entry(n) for n in names[1:]])[3]()
    with pytest.raises(AssertionError, match="does not define \\['exercise_gone'\\]"):
        exercises.exercise_tests("01", [entry(n) for n in names + ["exercise_gone"]])[3]()


def test_print_table_aligns_columns(capsys):
    cli.print_table("T", [("a", 1.5, "2"), ("longer name", "x", "")])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "T" and out[3].startswith("quantity") and out[6] == "longer name  x"


def test_print_table_with_its_own_header(capsys):
    cli.print_table("T", [("VE", "EM", "1.2%"), ("sub-VP", "ODE", "10.5%")], header=("a", "b", "c"))
    out = capsys.readouterr().out.splitlines()
    assert out[3] == "a       b    c" and out[6] == "sub-VP  ODE  10.5%"
    cli.print_table("T", [("1", "2", "3", "4")], header=("w", "x", "y", "z"))
    assert capsys.readouterr().out.splitlines()[5] == "1  2  3  4"
    with pytest.raises(ValueError, match="every row needs 3 cells"):
        cli.print_table("T", [("too", "short")])


def test_threads_flag_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        argv = ["--outdir", str(tmp_path), "--threads", "2"]
        cli.start_run(cli.make_parser("t"), "99_test", argv)
        assert torch.get_num_threads() == 2
        cli.start_run(cli.make_parser("t"), "99_test", ["--outdir", str(tmp_path)])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- Frechet distance ---------------------------------------------------------------------------
def test_frechet_distance_matches_scipy_sqrtm_and_is_zero_for_equal_sets():
    """d_F^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 sqrtm(S_a S_b)), against scipy's sqrtm."""
    import numpy as np
    import scipy.linalg

    from common.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g, dtype=torch.float64) @ \
        torch.randn(8, 8, generator=g, dtype=torch.float64)
    b = 2 * torch.randn(300, 8, generator=g, dtype=torch.float64) + 1
    s_a, s_b = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = (a.mean(0) - b.mean(0)).square().sum().item() + np.trace(
        s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real)
    assert abs(frechet_distance(a, b) - expected) < 1e-8 * expected
    assert abs(frechet_distance(a, b) - frechet_distance(b, a)) < 1e-8 * expected
    assert abs(frechet_distance(a, a)) < 1e-8
    with pytest.raises(ValueError, match="features"):
        frechet_distance(a, b[:, :3])


@pytest.mark.parametrize("flags, noted", [(["--quick"], True), ([], False)])
def test_a_quick_run_says_its_numbers_are_noise(flags, noted, tmp_path, capsys):
    from common.cli import make_parser, start_run

    run = start_run(make_parser("x"), "m", [*flags, "--outdir", str(tmp_path)])
    run.finish([("a quantity", "1.0", "1")], {}, "01")
    assert ("these numbers are noise" in capsys.readouterr().out) == noted


def test_a_data_dir_that_is_the_mnist_raw_folder_itself_is_pointed_out(tmp_path):
    """The likeliest slip, --data-dir .../MNIST/raw: the message names the right root."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.load_mnist(raw, download=False)
    assert f"--data-dir should name the folder that contains MNIST/raw/, here {tmp_path}." in \
        str(info.value)
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.load_mnist(tmp_path / "elsewhere", download=False)
    assert "should name" not in str(info.value) and "found in" not in str(info.value)
