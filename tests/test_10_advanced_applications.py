"""Tests of module 10: guidance (classifier and classifier-free), measurement operators and the
projection / replacement steps, diffusion posterior sampling, Tweedie denoising, PSNR / SSIM,
the conditional .npz layout, checkpoints, and the program end to end.

Tiny U-Nets, exact Gaussian denoisers and synthetic images throughout; no real MNIST needed."""

import math

import numpy as np
import pytest
import torch

from common.modules import load_module

pytestmark = pytest.mark.ch10
m = load_module("10")
nine = load_module("09")
sde_lib = load_module("08")
F64 = torch.float64


def tiny_model(seed=0, image_size=8):
    mc = nine.ModelConfig(in_channels=1, image_size=image_size, channels=(8, 16), blocks=(1, 1),
                          emb_dim=16)
    torch.manual_seed(seed)
    den = nine.Denoiser(mc)
    torch.nn.init.normal_(den.net.out.weight, std=0.1)  # F != 0 (the output layer starts at 0)
    return den


class GaussianDenoiser(torch.nn.Module):
    """The exact posterior mean of data N(mu, v I): D = mu + v / (v + sigma^2) (x - mu)."""

    def __init__(self, mu=0.0, v=0.25):
        super().__init__()
        self.mu, self.v = mu, v

    def forward(self, x, sigma):
        s2 = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(len(x))[:, None, None,
                                                                                 None] ** 2
        return self.mu + self.v / (self.v + s2) * (x - self.mu)


# -- 1. classifier-free guidance ----------------------------------------------------------------
def test_zero_label_embedding_starts_as_the_unconditional_model(gen):
    base = tiny_model()
    cond = m.LabelConditionalDenoiser(base, n_classes=3)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    sigma = torch.tensor([0.1, 0.5, 2.0, 10.0])
    with torch.no_grad():
        for labels in (None, torch.tensor([0, 1, 2, 3])):
            assert torch.equal(cond(x, sigma, labels), base(x, sigma))


def test_labels_change_the_output_once_the_embedding_is_learned(gen):
    cond = m.LabelConditionalDenoiser(tiny_model(), n_classes=3)
    torch.nn.init.normal_(cond.label_embedding.weight)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    with torch.no_grad():
        a = cond(x, torch.tensor(0.5), torch.tensor([0, 0]))
        b = cond(x, torch.tensor(0.5), torch.tensor([1, 1]))
        u = cond(x, torch.tensor(0.5), None)
        u3 = cond(x, torch.tensor(0.5), torch.tensor([3, 3]))  # 3 = n_classes = "no label"
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(u, u3)


def test_cfg_is_one_plus_w_times_conditional_minus_w_times_unconditional(gen):
    cond = m.LabelConditionalDenoiser(tiny_model(), n_classes=3)
    torch.nn.init.normal_(cond.label_embedding.weight)
    x = torch.randn(3, 1, 8, 8, generator=gen)
    labels, sigma = torch.tensor([0, 2, 1]), torch.tensor(0.7)
    with torch.no_grad():
        d_c, d_u = cond(x, sigma, labels).double(), cond(x, sigma).double()
        for w in (0.0, 0.5, 3.0):
            got = m.cfg_denoiser(cond, labels, w)(x, sigma).double()
            torch.testing.assert_close(got, (1 + w) * d_c - w * d_u, rtol=1e-5, atol=1e-5)
            # and in score form: s_w = (1 + w) s(x, y) - w s(x)
            s = nine.denoiser_score(m.cfg_denoiser(cond, labels, w), x, sigma)
            s_c = nine.denoiser_score(m.WithLabels(cond, labels), x, sigma)
            s_u = nine.denoiser_score(m.WithLabels(cond, None), x, sigma)
            torch.testing.assert_close(s, (1 + w) * s_c - w * s_u, rtol=1e-4, atol=1e-4)


def test_drop_labels_replaces_the_right_fraction_by_the_null_label():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (20_000,), generator=g)
    dropped = m.drop_labels(labels, 0.1, 10, g)
    null = dropped == 10
    p = null.double().mean().item()
    assert abs(p - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(labels)), p
    assert torch.equal(dropped[~null], labels[~null])
    assert m.drop_labels(labels, 0.0, 10, g).equal(labels)


def test_conditional_fine_tuning_learns_the_labels_and_saves_atomically(tmp_path):
    """Two classes of 8x8 images (bright top half / bright bottom half): after a short
    fine-tune, the class-0 denoiser at a large sigma predicts a brighter top than class 1."""
    g = torch.Generator().manual_seed(0)
    n = 64
    labels = torch.arange(n) % 2
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    images[labels == 0, :, :4] = 255
    images[labels == 1, :, 4:] = 255
    images = (images.float() * (0.8 + 0.2 * torch.rand(n, 1, 1, 1, generator=g))).to(torch.uint8)
    cfg = m.AppConfig(cond_steps=60, cond_batch=16, warmup_steps=5)
    model = m.LabelConditionalDenoiser(tiny_model(), 2)
    loss = m.conditional_loss(0.1, 0.5, 1.2, 0.5)
    path = tmp_path / "cond.pt"
    ema_model, losses = m.train_network(model, loss, images, labels, cfg.cond_steps,
                                        cfg.cond_batch, 2e-3, cfg, 0, path, {"x": 1}, "test",
                                        save_every=25, lr_boost={"label_embedding": 20.0})
    assert path.exists() and not (tmp_path / "cond.pt.tmp").exists()
    assert nine.read_checkpoint(path)["step"] == 60
    x = torch.zeros(2, 1, 8, 8)
    with torch.no_grad():
        d = ema_model(x, torch.tensor(3.0), torch.tensor([0, 1]))
    top_minus_bottom = d[:, 0, :4].mean((1, 2)) - d[:, 0, 4:].mean((1, 2))
    assert top_minus_bottom[0] > top_minus_bottom[1] + 0.2, top_minus_bottom
    # a second call loads the finished run instead of training
    again, losses2 = m.train_network(m.LabelConditionalDenoiser(tiny_model(), 2), loss, images,
                                     labels, 60, 16, 2e-3, cfg, 0, path, {"x": 1}, "test",
                                     lr_boost={"label_embedding": 20.0})
    assert losses2 == losses
    with pytest.raises(nine.CheckpointError, match="other settings"):
        m.train_network(m.LabelConditionalDenoiser(tiny_model(), 2), loss, images, labels, 60,
                        16, 2e-3, cfg, 0, path, {"x": 2}, "test")


def test_an_interrupted_fine_tune_resumes_exactly(tmp_path):
    """Stopped after step 30 (checkpoints every 25), the next call resumes from step 25 and ends
    with the same weights and losses as a run that was never interrupted."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.randint(0, 256, (64, 1, 8, 8), generator=g, dtype=torch.uint8)
    cfg = m.AppConfig(warmup_steps=5)
    loss = m.conditional_loss(0.1, 0.5, 1.2, 0.5)
    calls = {"n": 0}

    def interrupted(model, x0, y, gen):
        calls["n"] += 1
        if calls["n"] > 30:
            raise KeyboardInterrupt
        return loss(model, x0, y, gen)

    def run(path, batch_loss):
        return m.train_network(m.LabelConditionalDenoiser(tiny_model(), 2), batch_loss, images,
                               labels, 40, 16, 2e-3, cfg, 0, path, {"x": 1}, "test",
                               save_every=25, lr_boost={"label_embedding": 10.0})

    straight, losses = run(tmp_path / "a.pt", loss)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", interrupted)
    assert nine.read_checkpoint(tmp_path / "b.pt")["step"] == 25
    resumed, resumed_losses = run(tmp_path / "b.pt", loss)
    assert resumed_losses == losses
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


# -- 2. classifier guidance ---------------------------------------------------------------------
def test_classifier_gradient_matches_finite_differences_and_works_under_no_grad(gen):
    torch.manual_seed(0)
    clf = m.NoisyClassifier(1, 4, channels=(8, 16), emb_dim=16)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    sigma, labels = torch.tensor(0.5), torch.tensor([1, 3])
    with torch.no_grad():
        grad = m.classifier_log_prob_grad(clf, x, sigma, labels)
    h = 1e-2  # float32 network: a larger step, a looser tolerance
    for n, idx in [(0, (0, 2, 3)), (1, (0, 5, 1))]:
        e = torch.zeros_like(x)
        e[(n, *idx)] = h
        lp = [clf(x + s * e, sigma).log_softmax(1)[n, labels[n]].item() for s in (1, -1)]
        assert grad[(n, *idx)].item() == pytest.approx((lp[0] - lp[1]) / (2 * h), rel=2e-2,
                                                       abs=1e-3)


def test_classifier_guidance_adds_scale_sigma2_times_the_gradient(gen):
    """D_guided - D = scale sigma^2 grad log p(y | x): the score gains + scale grad log p."""
    torch.manual_seed(0)
    clf = m.NoisyClassifier(1, 4, channels=(8, 16), emb_dim=16)
    den = GaussianDenoiser()
    x = torch.randn(3, 1, 8, 8, generator=gen)
    labels, sigma = torch.tensor([0, 1, 3]), torch.full((3,), 1.5)
    grad = m.classifier_log_prob_grad(clf, x, sigma, labels)
    assert grad.abs().max() > 0
    for scale in (0.0, 1.0, 4.0):
        guided = m.ClassifierGuidedDenoiser(den, clf, labels, scale)
        with torch.no_grad():
            torch.testing.assert_close(guided(x, sigma) - den(x, sigma), scale * 1.5**2 * grad)
            s_guided = nine.denoiser_score(guided, x, sigma)
            s = nine.denoiser_score(den, x, sigma)
        torch.testing.assert_close(s_guided, s + scale * grad, rtol=1e-4, atol=1e-5)
    # the sign: a small step along the guidance raises log p(y | x)
    with torch.no_grad():
        before = clf(x, sigma).log_softmax(1).gather(1, labels[:, None])
        after = clf(x + 1e-2 * grad, sigma).log_softmax(1).gather(1, labels[:, None])
    assert (after > before).all()


def test_noisy_classifier_loss_learns_a_separable_problem():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    images = torch.where(labels[:, None, None, None] == 0, 40, 215).to(torch.uint8) \
        .expand(64, 1, 8, 8).contiguous()
    torch.manual_seed(0)
    clf = m.NoisyClassifier(1, 2, channels=(8, 16), emb_dim=16)
    loss = m.noisy_classifier_loss(0.002, 0.05)  # little noise: the classes stay separable
    before = loss(clf, nine.to_model_space(images), labels, g).item()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    for _ in range(60):
        value = loss(clf, nine.to_model_space(images), labels, g)
        opt.zero_grad()
        value.backward()
        opt.step()
    assert value.item() < 0.3 * before, (before, value.item())


# -- 3. measurements: replacement, projection, blur ----------------------------------------------
def test_replacement_hook_puts_the_noised_observation_in_the_known_pixels(gen):
    """After the hook, known pixels = y + sigma_t z (z the hook's own draw), others unchanged."""
    sde = sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0)
    mask = (torch.rand(1, 1, 6, 6, generator=gen) < 0.5).float()
    op = m.Inpaint(mask)
    y = op.A(torch.randn(2, 1, 6, 6, generator=gen))
    x = torch.randn(2, 1, 6, 6, generator=gen)
    t = 0.4
    out = m.measurement_hook(op, y, sde, torch.Generator().manual_seed(7))(x.clone(), t, 0)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    sigma = sde.std(torch.tensor([t]))[0]
    known = mask.expand_as(x).bool()
    torch.testing.assert_close(out[known], (y + sigma * z)[known])
    torch.testing.assert_close(out[~known], x[~known])


@pytest.mark.parametrize("op", [m.Inpaint((torch.rand(1, 1, 8, 8,
                                                      generator=torch.Generator().manual_seed(1))
                                           < 0.3).float()),
                                m.Downsample(2), m.Downsample(4)])
def test_projection_satisfies_the_measurement_and_moves_x_the_least(op, gen):
    x = torch.randn(3, 1, 8, 8, generator=gen, dtype=F64)
    y = op.A(torch.randn(3, 1, 8, 8, generator=gen, dtype=F64))
    before = (op.A(x) - y).norm()
    p = m.project_onto_measurement(op, x, y)
    assert (op.A(p) - y).norm() < 1e-10 * max(1.0, before.item()) < before
    # nearest point: the correction x - p lies in the row space of A (orthogonal to the null
    # space); any other consistent point p + n (A n = 0) is farther from x
    n = torch.randn(3, 1, 8, 8, generator=gen, dtype=F64)
    n = n - op.pinv(op.A(n))  # project n onto the null space of A
    assert op.A(n).norm() < 1e-10
    assert ((x - p) * n).sum().abs() < 1e-10
    assert (x - (p + n)).norm() > (x - p).norm()


def test_downsample_pseudo_inverse_is_the_matrix_pseudo_inverse():
    op = m.Downsample(2)
    eye = torch.eye(16, dtype=F64).reshape(16, 1, 4, 4)
    A = op.A(eye).reshape(16, 4).T  # (4, 16): column j = A e_j
    P = op.pinv(torch.eye(4, dtype=F64).reshape(4, 1, 2, 2)).reshape(4, 16).T  # (16, 4)
    torch.testing.assert_close(P, torch.linalg.pinv(A))


def test_blur_is_a_circular_convolution_and_tikhonov_solves_the_normal_equations(gen):
    op = m.GaussianBlur(1.2, 8)
    x = torch.randn(2, 1, 8, 8, generator=gen, dtype=F64)
    # direct circular convolution with the same kernel
    r = torch.arange(8, dtype=F64)
    r = torch.minimum(r, 8 - r)
    k1 = torch.exp(-r**2 / (2 * 1.2**2))
    k = torch.outer(k1, k1) / torch.outer(k1, k1).sum()
    direct = torch.zeros_like(x)
    for i in range(8):
        for j in range(8):
            direct += k[i, j] * torch.roll(x, shifts=(i, j), dims=(-2, -1))
    torch.testing.assert_close(op.A(x), direct)
    # Tikhonov: A^T (A x - y) + lam (x - mean) = 0 at the solution (A symmetric here)
    y, mean, lam = op.A(x), torch.full((1, 1, 8, 8), -0.5, dtype=F64), 0.03
    sol = op.tikhonov(y, lam, mean)
    residual = op.A(op.A(sol) - y) + lam * (sol - mean)
    assert residual.abs().max() < 1e-10


def test_projection_sampling_keeps_known_pixels_and_the_measurement(gen):
    """Replacement PC sampling with the exact Gaussian denoiser: the output satisfies A x = y
    exactly (final projection), and the unknown pixels are not copies of the prior mean."""
    cfg9 = nine.Config.quick()
    mask = torch.ones(1, 1, 8, 8)
    mask[..., 4:, :] = 0
    op = m.Inpaint(mask)
    truth = 0.5 * torch.randn(4, 1, 8, 8, generator=gen)
    y = op.A(truth)
    draws, nfe = m.solve_by_projection(GaussianDenoiser(), op, y, truth.shape, cfg9, 20, 0,
                                       torch.device("cpu"), draws=3)
    assert draws.shape == (3, *truth.shape)
    assert nfe == 2 * 20 + 1  # 20 PC steps (corrector + predictor), the final Tweedie step
    for x in draws:
        torch.testing.assert_close(op.A(x), y.clamp(-1, 1))
    assert draws[..., 4:, :].std() > 0.1
    assert (draws[0] - draws[1])[..., 4:, :].abs().max() > 0.1  # independent draws differ


def test_dps_moves_samples_towards_the_measurement(gen):
    """DPS with zeta > 0 ends much closer to A x = y than the same sampler with zeta = 0 (which
    ignores y), for the exact Gaussian denoiser, and each step costs one network call."""
    cfg9 = nine.Config.quick()
    op = m.GaussianBlur(1.0, 8)
    truth = 0.5 * torch.randn(6, 1, 8, 8, generator=gen)
    y = op.A(truth) + 0.01 * torch.randn(truth.shape, generator=gen)
    res = {}
    for zeta in (0.0, 0.3):
        x, nfe = m.dps_sample(GaussianDenoiser(), op, y, truth.shape, 30, zeta, cfg9,
                              torch.Generator().manual_seed(3), torch.device("cpu"))
        res[zeta] = (op.A(x) - y).flatten(1).norm(dim=1).mean().item()
        assert nfe == 30
    assert res[0.3] < 0.5 * res[0.0], res


# -- 4. Tweedie and the posterior ---------------------------------------------------------------
def test_tweedie_denoise_equals_the_denoiser_and_module_08s_estimate(gen):
    den = tiny_model()
    x = torch.randn(3, 1, 8, 8, generator=gen)
    sde = sde_lib.VESDE(sigma_min=0.002, sigma_max=80.0)
    t = torch.full((3,), 0.6)
    sigma = sde.std(t)[0].item()
    with torch.no_grad():
        ours = m.tweedie_posterior_mean(den, x, sigma)
        torch.testing.assert_close(ours, den(x, torch.tensor(sigma)), rtol=1e-5, atol=1e-5)
        theirs = sde_lib.denoised_estimate(sde, nine.score_fn(den, sde), x, t)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_posterior_sample_has_twice_the_error_of_the_posterior_mean():
    """Exact Gaussian posterior: E|x' - x0|^2 = 2 E|E[x0|x] - x0|^2 (Section 2.6). The
    deterministic probability-flow ODE maps p_sigma onto p_0 too, but pairs x with
    x' = k x, k = sqrt(v / (v + sigma^2)): error 2 v (1 - k), not a posterior draw."""
    g = torch.Generator().manual_seed(0)
    v, sigma = 0.25, 0.8
    truth = math.sqrt(v) * torch.randn(400, 1, 8, 8, generator=g, dtype=F64)
    noisy = truth + sigma * torch.randn(truth.shape, generator=g, dtype=F64)
    den = GaussianDenoiser(0.0, v)
    mean = m.tweedie_posterior_mean(den, noisy, sigma)
    mmse = v * sigma**2 / (v + sigma**2)
    assert (mean - truth).square().mean().item() == pytest.approx(mmse, rel=0.03)
    sample = m.posterior_sample(den, noisy, sigma, g, n_steps=200)
    ratio = (sample - truth).square().mean() / (mean - truth).square().mean()
    assert ratio.item() == pytest.approx(2.0, rel=0.05)
    # the ODE (module 09's Heun without churn) from the same noisy images
    *_, (_, ode, _) = nine.heun_sample(den, noisy.shape, 30, 0.002, sigma, 0.0, g, x_T=noisy)
    k = math.sqrt(v / (v + sigma**2))
    assert (ode - truth).square().mean().item() == pytest.approx(2 * v * (1 - k), rel=0.03)


# -- 5. metrics and files ------------------------------------------------------------------------
def test_psnr_known_values():
    ref = torch.zeros(2, 1, 4, 4)
    x = ref.clone()
    x[0] += 0.1
    x[1, :, :1] += 0.2  # a quarter of the pixels: MSE 0.01
    torch.testing.assert_close(m.psnr(x, ref), torch.tensor([20.0, 20.0], dtype=F64))


def test_ssim_known_values(gen):
    x = torch.rand(3, 1, 16, 16, generator=gen, dtype=F64)
    torch.testing.assert_close(m.ssim(x, x), torch.ones(3, dtype=F64))
    # constant images a and b: SSIM = (2ab + C1) / (a^2 + b^2 + C1) (the contrast term is 1)
    a, b, c1 = 0.3, 0.7, 0.01**2
    got = m.ssim(torch.full((1, 1, 16, 16), a, dtype=F64), torch.full((1, 1, 16, 16), b,
                                                                      dtype=F64))
    assert got.item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    # symmetric, below 1 for a different image, and equal to the formula at one window by hand
    y = (x + 0.2 * torch.rand(3, 1, 16, 16, generator=gen, dtype=F64)).clamp(0, 1)
    torch.testing.assert_close(m.ssim(x, y), m.ssim(y, x))
    assert (m.ssim(x, y) < 1).all()
    w = m.gaussian_window(11, 1.5)
    px, py = x[0, 0, :11, :11], y[0, 0, :11, :11]
    mx, my = (w * px).sum(), (w * py).sum()
    vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
    cxy = (w * px * py).sum() - mx * my
    c2 = 0.03**2
    by_hand = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    full = m.ssim(x[:1, :, :11, :11], y[:1, :, :11, :11])  # an 11x11 image has one window
    assert full.item() == pytest.approx(by_hand.item(), rel=1e-10)


def test_conditional_npz_layout(tmp_path):
    images = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    path = m.save_conditional_npz(tmp_path / "guided_cfg_2.npz", images, labels)
    with np.load(path) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (6, 5, 5, 1)
        assert np.array_equal(f["arr_0"], images.permute(0, 2, 3, 1).numpy())
        assert f["arr_1"].dtype == np.int64 and f["arr_1"].tolist() == labels.tolist()


def test_label_agreement_counts_per_class():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 0 for dark images, 1 for bright ones
            return torch.stack([-x.mean((1, 2, 3)), x.mean((1, 2, 3))], 1)

    images = torch.tensor([0, 255, 255, 0], dtype=torch.uint8)[:, None, None, None] \
        .expand(4, 1, 2, 2)
    r = m.label_agreement(Fixed(), images, torch.tensor([0, 1, 0, 1]))
    assert r["overall"] == 0.5 and r["per_class"] == [0.5, 0.5]


# -- 6. the program ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """64 grey 28x28 images in two class folders: bright top half or bright bottom half."""
    from PIL import Image

    root = tmp_path_factory.mktemp("two_classes")
    g = torch.Generator().manual_seed(0)
    for i in range(64):
        img = np.zeros((28, 28), dtype=np.uint8)
        rows = slice(0, 14) if i % 2 == 0 else slice(14, 28)
        img[rows] = int(150 + 100 * torch.rand(1, generator=g).item())
        folder = root / f"class_{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return root


def _argv(folder, out, *extra):
    return ["--quick", "--dataset", "folder", "--data-dir", str(folder), "--image-size", "28",
            "--outdir", str(out), "--checkpoint-dir", str(out / "ck"), "--threads", "1", *extra]


def test_quick_run_end_to_end(labelled_folder, tmp_path, capsys):
    """--quick trains what is missing (09's model, the conditional denoiser, the noisy
    classifier), writes guided_<method>_<scale>.npz with the requested labels, every figure and
    the summary table; a second run loads all three networks."""
    r = m.main(_argv(labelled_folder, tmp_path))
    out = tmp_path / m.MODULE
    log = capsys.readouterr().out
    assert "training it now" in log
    for method, scales in (("cfg", m.AppConfig.quick().cfg_scales),
                           ("classifier", m.AppConfig.quick().cg_scales)):
        for s in scales:
            with np.load(out / f"guided_{method}_{s:g}.npz") as f:
                assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (4, 28, 28, 1)
                assert f["arr_1"].tolist() == [0, 1, 0, 1]
    figures = {p.name for p in out.glob("*.png")}
    assert {"guided_cfg.png", "guided_classifier.png", "guidance_sweep.png",
            "guidance_per_class.png", "noisy_classifier_accuracy.png", "super_resolution.png",
            "deblurring.png", "tweedie_denoising.png", "inpainting_top_half.png",
            "inpainting_centre_box.png", "inpainting_random_pixels.png"} <= figures, figures
    assert "super-resolution x4: PSNR / SSIM" in log and "Tikhonov" in log
    assert set(r["inpainting"]) == {"top half known", "centre box missing", "random 25% known"}
    ck = sorted(p.name for p in (tmp_path / "ck").glob("*.pt"))
    assert ck == ["09_folder_classifier_quick.pt", "09_folder_quick.pt",
                  "10_folder_conditional_quick.pt", "10_folder_noisy_classifier_quick.pt"], ck

    m.main(_argv(labelled_folder, tmp_path))
    log = capsys.readouterr().out
    assert "training it now" not in log
    assert log.count("Loaded ") >= 3, log


def test_a_corrupt_cached_network_is_a_clear_error(labelled_folder, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "10_folder_conditional_quick.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as info:
        m.main(_argv(labelled_folder, tmp_path))
    assert "10_folder_conditional_quick.pt" in str(info.value.code)
    assert "not a readable checkpoint" in str(info.value.code)


def test_unlabelled_data_is_refused_with_a_reason(tmp_path):
    from PIL import Image

    for i in range(40):
        Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(SystemExit) as info:
        m.main(_argv(tmp_path, tmp_path / "out"))
    assert "labels" in str(info.value.code)
