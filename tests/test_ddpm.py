"""ddpm/: every line of the README's paper-to-code table against a reference written out here: the
schedules and alpha_bar as the formulas and a running product, q(x_t | x_0) against iterating the
chain, the posterior against Bayes' rule, the loss against stub noise predictors with known answers,
Algorithm 2's and DDIM's steps as the equations with a fixed z, attention and the time embedding by
hand; spies check that the flags reach the EMA, the clip and the schedule in a real step; learning
beats the best per-pixel Gaussian denoiser; the pipeline's figures and evaluation hold what they
should; then resume, NaN stop and errors."""
import csv
import json
import math
import shutil
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import flip_bit, import_folder, shipped_copy, write_idx

ddpm = import_folder("ddpm")
Diffusion, UNet, UNetConfig = ddpm.model.Diffusion, ddpm.model.UNet, ddpm.model.UNetConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits for the first (and the machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def written_out(schedule, T):
    """beta_t (Sec. 4: linear from 1e-4 to 0.02; Nichol & Dhariwal eq. 17: 1 - f(t)/f(t-1), at most 0.999),
    alpha_bar_t = prod_{s <= t} (1 - beta_s) as a running product, in plain Python floats."""
    if schedule == "linear":
        betas = [1e-4 + (0.02 - 1e-4) * t / (T - 1) for t in range(T)]
    else:
        f = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
        betas = [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    alpha_bar, product = [], 1.0
    for beta in betas:
        product *= 1 - beta
        alpha_bar.append(product)
    return torch.tensor(betas, dtype=torch.float64), torch.tensor(alpha_bar, dtype=torch.float64)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_betas_and_alpha_bar_against_the_formulas_written_out(schedule):
    d = Diffusion(1000, schedule)
    betas, alpha_bar = written_out(schedule, 1000)
    torch.testing.assert_close(d.betas, betas, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d.alphas, 1 - betas, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(d.alpha_bar, alpha_bar, rtol=1e-10, atol=1e-15)
    alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])   # alpha_bar_0 = 1
    torch.testing.assert_close(d.beta_tilde, (1 - alpha_bar_prev) / (1 - alpha_bar) * betas, rtol=1e-10, atol=1e-15)
    # eq. 4 in one jump: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps
    torch.manual_seed(0)
    t = torch.tensor([0, 1, 499, 999])
    x_0, eps = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.randn(4, 1, 3, 3, dtype=torch.float64)
    a = alpha_bar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x_0, t, eps), a.sqrt() * x_0 + (1 - a).sqrt() * eps)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_q_xt_given_x0_matches_iterating_q_xt_given_xt_minus_1(schedule):
    d = Diffusion(1000, schedule)
    # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I): x_t = a x_0 + noise of variance v, iterated
    a, v = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    means, variances = [], []
    for beta in d.betas:
        a, v = (1 - beta).sqrt() * a, (1 - beta) * v + beta
        means.append(a)
        variances.append(v)
    torch.testing.assert_close(torch.stack(means), d.alpha_bar.sqrt(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack(variances), 1 - d.alpha_bar, rtol=1e-10, atol=1e-12)

    # and by sampling: 20 steps of the chain against q_sample in one jump, 200,000 draws of one pixel; the
    # bounds are 30 standard errors (mean) and 6 (variance) wide, so they hold for any seed
    g = torch.Generator().manual_seed(0)
    x_0 = torch.full((200_000, 1, 1, 1), 0.7)
    x = x_0.clone()
    for t in range(20):
        x = (1 - d.betas[t]).sqrt().float() * x + d.betas[t].sqrt().float() * torch.randn(x.shape, generator=g)
    jump = d.q_sample(x_0, torch.full((len(x_0),), 19), torch.randn(x_0.shape, generator=g))
    for y in (x, jump):
        assert abs(y.mean().item() - d.alpha_bar[19].sqrt().item() * 0.7) < 30 * (1 - d.alpha_bar[19]).sqrt() / 447
        assert abs(y.var().item() - (1 - d.alpha_bar[19]).item()) < 0.02 * (1 - d.alpha_bar[19]).item()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_mean_and_variance_match_bayes_rule(schedule):
    d = Diffusion(1000, schedule)
    torch.manual_seed(0)
    t = torch.tensor([1, 2, 10, 250, 500, 999])
    x_0, x_t = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 1, 4, 4, dtype=torch.float64)
    mean, var = d.posterior(x_0, x_t, t)
    # q(x_{t-1} | x_0) = N(sqrt(ab_{t-1}) x_0, 1 - ab_{t-1}) times q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t):
    # precisions add, and the mean is the precision-weighted mean
    betas, alpha_bar = written_out(schedule, 1000)
    ab_prev, alpha, beta = (v.view(-1, 1, 1, 1) for v in (alpha_bar[t - 1], 1 - betas[t], betas[t]))
    precision = 1 / (1 - ab_prev) + alpha / beta
    torch.testing.assert_close(var.expand_as(x_0), (1 / precision).expand_as(x_0))
    torch.testing.assert_close(mean, (ab_prev.sqrt() * x_0 / (1 - ab_prev) + alpha.sqrt() * x_t / beta) / precision)
    # the first step (the paper's t = 1) returns x_0 itself, with no variance
    mean, var = d.posterior(x_0, x_t, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(mean, x_0)
    assert torch.all(var == 0)


def test_the_loss_is_zero_for_the_true_noise_and_the_mse_of_a_wrong_one():
    """Algorithm 1 with stub noise predictors: one that recovers the true eps from x_t (it knows x_0 and
    the written-out alpha_bar) has loss 0; eps + 0.3 has loss 0.09; 2 eps has loss mean(eps^2); and t is
    uniform on the T steps (20,000 draws: bounds of 7 standard errors)."""
    T = 10
    d = Diffusion(T)
    alpha_bar = written_out("linear", T)[1].float()
    torch.manual_seed(0)
    x_0 = torch.rand(1000, 1, 2, 2) * 2 - 1
    seen = {"t": []}

    def true_eps(x_t, t):
        a = alpha_bar[t].view(-1, 1, 1, 1)
        seen["t"].append(t)
        seen["eps"] = (x_t - a.sqrt() * x_0) / (1 - a).sqrt()
        return seen["eps"]

    assert d.loss(true_eps, x_0).item() < 1e-6
    assert abs(d.loss(lambda x_t, t: true_eps(x_t, t) + 0.3, x_0).item() - 0.09) < 1e-4
    loss = d.loss(lambda x_t, t: 2 * true_eps(x_t, t), x_0).item()
    assert abs(loss - (seen["eps"] ** 2).mean().item()) < 1e-4 and abs(loss - 1) < 0.1   # eps ~ N(0, I)
    for _ in range(17):
        d.loss(true_eps, x_0)
    counts = torch.bincount(torch.cat(seen["t"]), minlength=T + 1)
    assert counts[T] == 0 and (counts[:T] / counts.sum() - 1 / T).abs().max() < 0.015, counts


def test_ddpm_step_is_algorithm_2_written_out():
    """Algorithm 2, line 4 with a fixed z: x_{t-1} = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)
    + sigma_t z, sigma_t^2 = beta_tilde_t (eq. 7) or beta_t, and no z at the last step (the paper's t = 1)."""
    d = Diffusion(1000)
    betas, alpha_bar = written_out("linear", 1000)
    torch.manual_seed(0)
    t = torch.tensor([0, 1, 100, 500, 999])
    x_0 = torch.rand(5, 1, 6, 6, dtype=torch.float64) * 1.8 - 0.9     # inside [-1, 1]: the clip changes nothing
    eps, z = torch.randn(5, 1, 6, 6, dtype=torch.float64), torch.randn(5, 1, 6, 6, dtype=torch.float64)
    ab, beta = alpha_bar[t].view(-1, 1, 1, 1), betas[t].view(-1, 1, 1, 1)
    ab_prev = torch.where(t > 0, alpha_bar[t - 1], 1.0).view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x_0 + (1 - ab).sqrt() * eps
    mean = (x_t - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt()               # eq. 11
    last = (t == 0).view(-1, 1, 1, 1)
    for variance, sigma2 in (("beta_tilde", (1 - ab_prev) / (1 - ab) * beta), ("beta", beta)):
        expected = mean + torch.where(last, 0.0, sigma2.sqrt() * z)
        torch.testing.assert_close(d.ddpm_step(x_t, t, eps, variance, noise=z), expected)
    # x_0 predicted by eq. 4 solved for it, clipped to the data range
    x_t = torch.tensor([3.0, -3.0, 0.5, -0.2], dtype=torch.float64).view(4, 1, 1, 1)
    eps = torch.tensor([0.0, 0.0, 0.3, -1.0], dtype=torch.float64).view(4, 1, 1, 1)
    t = torch.tensor([999, 10, 500, 30])
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(d.predict_x0(x_t, t, eps), ((x_t - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1))
    assert d.predict_x0(x_t, t, eps)[:2].flatten().tolist() == [1.0, -1.0]


def test_ddim_step_is_eq_12_written_out_deterministic_at_eta_0_and_ddpms_variance_at_eta_1():
    """DDIM eq. 12 and 16 with a fixed z, on steps that skip (t -> t_prev) and on the last one (t_prev = -1):
    x_prev = sqrt(ab_prev) x_0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)."""
    d = Diffusion(1000)
    betas, alpha_bar = written_out("linear", 1000)
    torch.manual_seed(0)
    t, t_prev = torch.tensor([999, 500, 20, 0]), torch.tensor([979, 480, 0, -1])
    ab = alpha_bar[t].view(-1, 1, 1, 1)
    ab_prev = torch.where(t_prev >= 0, alpha_bar[t_prev.clamp(min=0)], 1.0).view(-1, 1, 1, 1)
    x_0 = torch.rand(4, 1, 5, 5, dtype=torch.float64) * 1.8 - 0.9
    eps, z, z_other = (torch.randn(4, 1, 5, 5, dtype=torch.float64) for _ in range(3))
    x_t = ab.sqrt() * x_0 + (1 - ab).sqrt() * eps
    step = d.ddim_step(x_t, t, t_prev, eps, eta=0.0, noise=z)
    torch.testing.assert_close(step, d.ddim_step(x_t, t, t_prev, eps, eta=0.0, noise=z_other), rtol=0, atol=0)
    torch.testing.assert_close(step, ab_prev.sqrt() * x_0 + (1 - ab_prev).sqrt() * eps)  # the closed form at t_prev
    for eta in (0.5, 1.0):
        sigma = eta * ((1 - ab_prev) / (1 - ab)).sqrt() * (1 - ab / ab_prev).sqrt()
        expected = ab_prev.sqrt() * x_0 + (1 - ab_prev - sigma ** 2).sqrt() * eps + sigma * z
        torch.testing.assert_close(d.ddim_step(x_t, t, t_prev, eps, eta=eta, noise=z), expected)
    # eta = 1 on consecutive steps: sigma^2 is DDPM's beta_tilde (eq. 7)
    t = torch.arange(1, 1000)
    noise = torch.ones(999, 1, 1, 1, dtype=torch.float64)
    zero = torch.zeros(999, 1, 1, 1, dtype=torch.float64)
    sigma = d.ddim_step(zero, t, t - 1, zero, eta=1.0, noise=noise) - d.ddim_step(zero, t, t - 1, zero, eta=1.0, noise=zero)
    beta_tilde = (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * betas[t]
    torch.testing.assert_close(sigma.flatten() ** 2, beta_tilde)


def test_ddim_with_eta_1_over_all_T_steps_is_ddpm():
    d = Diffusion(1000)
    torch.manual_seed(0)
    x_t, eps, z = (torch.randn(8, 1, 5, 5, dtype=torch.float64) * 2 for _ in range(3))  # large: the clip acts too
    t = torch.tensor([0, 1, 2, 10, 300, 600, 998, 999])
    torch.testing.assert_close(d.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=z), d.ddpm_step(x_t, t, eps, noise=z))
    assert d.timesteps("ddim", 1000) == d.timesteps("ddpm", 1000)

    # and so whole chains agree: same noise, same network, T = 30
    d = Diffusion(30)
    net = UNet(UNetConfig(side=8, base=8, mults=(1, 2), res_blocks=1, attn_levels=(1,), dropout=0.0)).eval()
    torch.nn.init.normal_(net.out[-1].weight, std=0.05)
    ddpm_x = d.sample(net, (3, 1, 8, 8), "ddpm", generator=torch.Generator().manual_seed(5))
    ddim_x = d.sample(net, (3, 1, 8, 8), "ddim", 30, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim_x, ddpm_x, rtol=0, atol=1e-4)
    assert ddpm_x.std() > 0.1                                   # not a trivial chain


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 10, 0.0), ("ddim", 7, 0.5)])
def test_samplers_recover_the_only_training_image_with_the_ideal_noise_predictor(sampler, steps, eta):
    # With one training image x*, the best eps_theta is exact: eps = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t).
    d = Diffusion(200)
    x_star = torch.rand(1, 1, 6, 6, dtype=torch.float64) * 1.6 - 0.8

    def ideal(x_t, t):
        ab = d.alpha_bar[t].view(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * x_star) / (1 - ab).sqrt()

    x = d.sample(ideal, (4, 1, 6, 6), sampler, steps, eta, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.double(), x_star.expand(4, -1, -1, -1), rtol=0, atol=1e-5)
    frames = list(d.reverse(ideal, (2, 1, 6, 6), sampler, steps, eta))
    ts = d.timesteps(sampler, steps or d.T)
    assert [t for t, _ in frames] == [t + 1 for t in ts] + [0]                 # x_T (DDIM: x_tau_S) first, x_0 last


def test_ddim_timesteps_are_evenly_spaced_and_end_at_zero():
    d = Diffusion(1000)
    ts = d.timesteps("ddim", 50)
    assert ts[0] == 980 and ts[-1] == 0 and len(ts) == 50 and set(np.diff(ts)) == {-20}
    assert d.timesteps("ddim", 1) == [0]


def test_timestep_embedding_is_the_transformer_sinusoid():
    """Sec. 4: sin and cos of t at the frequencies 10000^(-i / (dim/2)), i = 0 .. dim/2 - 1."""
    t = [0, 1, 17, 999]
    expected = [[math.sin(s / 10_000 ** (i / 4)) for i in range(4)] + [math.cos(s / 10_000 ** (i / 4)) for i in range(4)]
                for s in t]
    torch.testing.assert_close(ddpm.model.timestep_embedding(torch.tensor(t), 8), torch.tensor(expected),
                               rtol=1e-5, atol=1e-4)


def test_attention_is_softmax_of_q_k_over_sqrt_d_times_v_written_out():
    """The U-Net's self-attention over the H W positions, per head, with a residual."""
    torch.manual_seed(0)
    layer = ddpm.model.Attention(16, heads=4)
    torch.nn.init.normal_(layer.out.weight, std=0.3)
    x = torch.randn(2, 16, 3, 5)
    qkv = layer.qkv(layer.norm(x)).flatten(2)                   # (B, 3 C, H W): q, k, v, each heads x d channels
    heads = []
    for n in range(4):
        q, k, v = (qkv[:, part * 16 + n * 4:part * 16 + (n + 1) * 4].transpose(1, 2) for part in range(3))  # (B, HW, d)
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4), -1) @ v)
    h = torch.cat(heads, 2).transpose(1, 2).reshape(2, 16, 3, 5)
    torch.testing.assert_close(layer(x), x + layer.out(h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [UNetConfig(base=8, res_blocks=1),
                                 UNetConfig(side=32, base=8, mults=(1, 2, 2, 2), attn_levels=(2, 3)),
                                 UNetConfig(side=28, base=12, mults=(1, 2), attn_levels=())])
def test_unet_output_has_the_input_shape_and_depends_on_t(cfg):
    net = UNet(cfg).eval()
    for p in net.parameters():                                  # undo the zero-initialised identity shortcuts
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    for B in (1, 3):
        x = torch.randn(B, cfg.channels, cfg.side, cfg.side)
        t = torch.randint(0, 1000, (B,))
        eps = net(x, t)
        assert eps.shape == x.shape
    assert not torch.allclose(net(x, t), net(x, (t + 500) % 1000), atol=1e-4)
    with pytest.raises(ValueError, match="not divisible"):
        UNet(UNetConfig(side=30, mults=(1, 2, 2)))


def test_warmup_then_cosine_learning_rate_on_hand_worked_steps():
    lrs = [ddpm.train.get_lr(step, 110, 10, 2.0) for step in (0, 4, 9, 10, 60, 110)]
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor([0.2, 1.0, 2.0, 2.0, 1.0, 0.0]))


def test_frechet_distance_matches_a_direct_matrix_square_root():
    rng = np.random.default_rng(0)
    f_1 = torch.from_numpy(rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)))
    f_2 = torch.from_numpy(rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3)
    s_1, s_2 = np.cov(f_1.numpy().T), np.cov(f_2.numpy().T)
    w, v = np.linalg.eigh(s_1)
    root_1 = v @ np.diag(np.sqrt(w)) @ v.T                      # S_1^(1/2)
    w = np.linalg.eigvalsh(root_1 @ s_2 @ root_1)
    expected = (np.sum((f_1.numpy().mean(0) - f_2.numpy().mean(0)) ** 2)
                + np.trace(s_1) + np.trace(s_2) - 2 * np.sqrt(np.clip(w, 0, None)).sum())
    assert abs(ddpm.evaluate.frechet_distance(f_1, f_2) - expected) < 1e-8
    assert abs(ddpm.evaluate.frechet_distance(f_1, f_1)) < 1e-8


def synthetic(root, dataset="MNIST", n_train=200, n_test=40, seed=0):
    """28x28 images of ten classes: a bright square at one of ten places on black."""
    rng = np.random.default_rng(seed)
    raw = root / dataset / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = np.zeros((n, 28, 28))
        for k, c in enumerate(labels):
            r, col = 2 + 12 * (c // 5), 2 + 5 * (c % 5)
            images[k, r:r + 10, col:col + 5] = 255 if dataset == "MNIST" else 128
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


TINY = ["--device", "cpu", "--base", "8", "--res-blocks", "1", "--dropout", "0", "--T", "20", "--batch-size", "20",
        "--warmup-steps", "2", "--lr", "2e-3", "--n-samples", "4", "--n-eval", "8", "--eval-batch", "8",
        "--sample-steps", "5", "--classifier-epochs", "1", "--ema-decay", "0.9"]


def run(data, out, *extra):
    ddpm.main.main(["--data-dir", str(data), "--out-dir", str(out), *TINY, *extra])


def test_training_beats_the_best_per_pixel_gaussian_denoiser(tmp_path):
    """Learning: the EMA model's test loss ends far below that of the best noise predictor for pixels that
    are independent Gaussians (mean mu, variance v fitted on the training images),
    E[eps | x_t] = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t v + 1 - ab_t), on the same test images, t
    and eps. Only a model of how pixels go together gets below it."""
    data = synthetic(tmp_path / "data", n_train=100)
    ddpm.train.train(ddpm.main.parse_args(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY,
                                           "--epochs", "8", "--lr", "5e-3"]))
    with open(tmp_path / "run" / "mnist" / "log.csv") as f:
        test_loss = [float(r["test_loss"]) for r in csv.DictReader(f)]
    d = Diffusion(20)
    x_train = ddpm.data.to_model_range(ddpm.data.load_split(data, "mnist", "train")[0]).double()
    mu, v = x_train.mean(0), x_train.var(0)

    def per_pixel_gaussian(x_t, t):
        ab = d.alpha_bar[t].view(-1, 1, 1, 1)
        return ((1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * v + 1 - ab)).float()

    x_test = ddpm.data.to_model_range(ddpm.data.load_split(data, "mnist", "test")[0])
    baseline = ddpm.train.test_loss(per_pixel_gaussian, d, x_test, "cpu")
    assert len(test_loss) == 8 and test_loss[-1] < 0.6 * baseline < 0.6, (test_loss, baseline)


def test_training_steps_hand_the_flags_to_the_ema_the_clip_and_the_schedule(tmp_path, monkeypatch):
    """Spies in two real steps: each epoch's batches are the training images; --ema-decay reaches the EMA
    update, which makes theta_ema <- d theta_ema + (1 - d) theta from the weights after the optimiser step,
    d = min(decay, (1 + step) / (10 + step)); --grad-clip reaches the clip; --lr and --warmup-steps reach
    the schedule; the checkpoint holds the last weights and their average."""
    data = synthetic(tmp_path / "data", n_train=40, n_test=4)
    calls, clips, schedule, batches = [], [], [], []
    ema_update, clip, get_lr, loss = ddpm.train.ema_update, torch.nn.utils.clip_grad_norm_, ddpm.train.get_lr, Diffusion.loss

    def ema_spy(ema, model, step, decay):
        before = {k: p.detach().clone() for k, p in ema.named_parameters()}
        ema_update(ema, model, step, decay)
        calls.append((step, decay, before, {k: p.detach().clone() for k, p in model.named_parameters()},
                      {k: p.detach().clone() for k, p in ema.named_parameters()}))

    monkeypatch.setattr(ddpm.train, "ema_update", ema_spy)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: clips.append(max_norm)
                        or clip(params, max_norm))
    monkeypatch.setattr(ddpm.train, "get_lr", lambda *a: schedule.append(a) or get_lr(*a))
    monkeypatch.setattr(Diffusion, "loss", lambda self, eps_theta, x_0: batches.append(x_0) or loss(self, eps_theta, x_0))
    out = tmp_path / "run"
    ddpm.train.train(ddpm.main.parse_args(["--data-dir", str(data), "--out-dir", str(out), *TINY, "--epochs", "1",
                                           "--ema-decay", "0.05", "--grad-clip", "0.7", "--lr", "3e-3",
                                           "--warmup-steps", "4"]))    # 40 images, batch 20: two steps
    images = ddpm.data.to_model_range(ddpm.data.load_split(data, "mnist", "train")[0])
    assert sorted(map(bytes, torch.cat(batches).numpy())) == sorted(map(bytes, images.numpy()))
    assert [(step, decay) for step, decay, *_ in calls] == [(0, 0.05), (1, 0.05)]
    assert clips == [0.7, 0.7] and schedule == [(0, 2, 4, 3e-3), (1, 2, 4, 3e-3)]
    for step, (_, _, before, model, after) in enumerate(calls):  # d = min(0.05, (1 + step) / (10 + step)) = 0.05
        assert any(not torch.equal(before[k], model[k]) for k in model)
        for k in model:
            torch.testing.assert_close(after[k], 0.05 * before[k] + 0.95 * model[k])
    assert all(torch.equal(calls[1][2][k], calls[0][4][k]) for k in model)   # one average, carried on
    ckpt = torch.load(out / "mnist" / "ckpt.pt", weights_only=True)
    assert all(torch.equal(ckpt["ema"][k], after[k]) and torch.equal(ckpt["model"][k], model[k]) for k in model)
    # later, the warm-up of d: at step 90, d = min(0.9999, 91 / 100) = 0.91
    ema, net = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.91 * p_ema + 0.09 * p for p_ema, p in zip(ema.parameters(), net.parameters())]
    ema_update(ema, net, 90, 0.9999)
    for p, e in zip(ema.parameters(), expected):
        torch.testing.assert_close(p, e)


def ctrl_c_while_the_classifier_trains(argv, run_dir, monkeypatch, capsys):
    """Ctrl-C in the evaluation classifier's second batch: one line, exit 130, nothing half-written."""
    before = sorted(p.name for p in run_dir.iterdir())
    capsys.readouterr()

    def interrupted(batches, **kw):
        for k, b in enumerate(batches):
            if k == 1:
                raise KeyboardInterrupt
            yield b

    with monkeypatch.context() as m:
        m.setattr(ddpm.evaluate, "tqdm", interrupted)           # the classifier's batch loop
        with pytest.raises(SystemExit) as e:
            ddpm.main.main(argv)
    assert e.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted while sampling or evaluating" in err[0], err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no classifier.pt, eval.json or temporary file


def spy_on_draw(monkeypatch):
    """Every call of sample.draw (grid and GIF) and of evaluate's draw, with what it returned."""
    draws = []
    for module in (ddpm.sample, ddpm.evaluate):
        def spy(model, diffusion, args, n, seed, device, frames=0, desc="", _draw=module.draw):
            result = _draw(model, diffusion, args, n, seed, device, frames, desc)
            draws.append(dict(state=model.state_dict(), sampler=args.sampler, n=n, seed=seed, result=result))
            return result
        monkeypatch.setattr(module, "draw", spy)
    return draws


def gif_panel(frame, k):
    """Panel k (0: left) of a GIF frame, grey levels on [0, 1]: 4 x 4 images of 28 pixels, scaled by 2."""
    return torch.from_numpy(frame[22:22 + 224, k * 236:k * 236 + 224, 0] / 255.0)


def test_both_datasets_give_the_side_by_side_gif_and_the_evaluation(tmp_path, monkeypatch, capsys):
    """The pipeline on two tiny runs: samples come from the EMA weights; the side-by-side GIF runs from
    noise to the very samples drawn, FashionMNIST left, MNIST right; the evaluation draws both samplers
    from the same noise, and real images come out closer to the test set than a one-epoch model's
    samples; Ctrl-C while its classifier trains leaves nothing half-written."""
    data = synthetic(synthetic(tmp_path / "data"), "FashionMNIST")
    out = tmp_path / "runs"
    draws = spy_on_draw(monkeypatch)
    run(data, out, "--epochs", "1")
    assert not (out / "mnist" / "ddpm_both.gif").exists()
    del draws[:]
    run(data, out, "--epochs", "1", "--dataset", "fashion")
    ckpt = {ds: torch.load(out / ds / "ckpt.pt", weights_only=True) for ds in ("mnist", "fashion")}
    grid, gif_fashion, gif_mnist = draws                        # the grid, then the GIF's panels in name order
    for d, ds in ((grid, "fashion"), (gif_fashion, "fashion"), (gif_mnist, "mnist")):
        assert all(torch.equal(d["state"][k], ckpt[ds]["ema"][k]) for k in ckpt[ds]["ema"])
    assert any(not torch.equal(ckpt["fashion"]["ema"][k], ckpt["fashion"]["model"][k]) for k in ckpt["fashion"]["ema"])
    assert grid["n"] == 4 and gif_fashion["seed"] == gif_mnist["seed"]

    frames = imageio.mimread(out / "fashion" / "ddpm_both.gif")
    with PIL.Image.open(out / "fashion" / "ddpm_both.gif") as gif:   # the writer merges repeated frames
        ms = [gif.seek(k) or gif.info["duration"] for k in range(gif.n_frames)]
    snapshots = gif_fashion["result"][1]
    assert len(frames) == len(ms) <= len(snapshots) and frames[0].shape[:2] == (22 + 224, 2 * 224 + 12)
    assert ms[0] == 80 and ms[-1] >= 16 * 80 and sum(ms) == 80 * (len(snapshots) + 15)  # x_0 held 15 frames
    for k, d in enumerate((gif_fashion, gif_mnist)):
        x_0 = ddpm.data.to_pixels(d["result"][0])               # (16, 1, 28, 28) on [0, 1]
        expected = x_0[:, 0].reshape(4, 4, 28, 28).permute(0, 2, 1, 3).reshape(112, 112)
        expected = expected.repeat_interleave(2, 0).repeat_interleave(2, 1).double()
        assert (gif_panel(frames[-1], k) - expected).abs().max() < 1 / 31   # 32 grey levels
        assert gif_panel(frames[0], k).std() > 0.25                          # x_T: noise
    assert (gif_panel(frames[-1], 0) - gif_panel(frames[-1], 1)).abs().max() > 0.1

    evaluate = ["--data-dir", str(data), "--out-dir", str(out), "--device", "cpu", "--evaluate",
                "--n-eval", "8", "--eval-batch", "8", "--sample-steps", "5", "--classifier-epochs", "1"]
    ctrl_c_while_the_classifier_trains(evaluate, out / "mnist", monkeypatch, capsys)
    del draws[:]
    ddpm.main.main(evaluate)
    assert [(d["sampler"], d["n"]) for d in draws] == [("ddpm", 8), ("ddim", 8)] and draws[0]["seed"] == draws[1]["seed"]
    assert all(torch.equal(draws[0]["state"][k], ckpt["mnist"]["ema"][k]) for k in ckpt["mnist"]["ema"])
    metrics = json.loads((out / "mnist" / "eval.json").read_text())
    results = metrics["results"]
    assert list(results) == ["real training images", "DDPM, 20 steps", "DDIM, 5 steps, eta 0"]
    for r in results.values():
        assert sum(r["class_histogram"]) == 8 and 0 <= r["confident_share"] <= 1
    real, ddpm_fid, ddim_fid = (r["fid"] for r in results.values())
    assert 0 <= real < min(ddpm_fid, ddim_fid), results
    clf = torch.load(out / "mnist" / "classifier.pt", weights_only=True)
    assert metrics["classifier_test_accuracy"] == clf["test_accuracy"] and clf["epochs"] == 1


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = synthetic(tmp_path / "data", n_train=60)
    args = ["--data-dir", str(data), *TINY, "--epochs", "3"]
    ddpm.train.train(ddpm.main.parse_args([*args, "--out-dir", str(tmp_path / "straight")]))

    calls = []
    test_loss = ddpm.train.test_loss

    def interrupted_in_epoch_2(*a, **kw):  # Ctrl-C after epoch 2's training, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return test_loss(*a, **kw)

    monkeypatch.setattr(ddpm.train, "test_loss", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        ddpm.train.train(ddpm.main.parse_args([*args, "--out-dir", str(tmp_path / "resumed")]))
    assert e.value.code == 130
    run_dir = tmp_path / "resumed" / "mnist"
    assert torch.load(run_dir / "ckpt.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(ddpm.train, "test_loss", test_loss)
    ddpm.train.train(ddpm.main.parse_args(["--resume", "--out-dir", str(tmp_path / "resumed"), "--data-dir", str(data)]))

    a = torch.load(tmp_path / "straight" / "mnist" / "ckpt.pt", weights_only=True)
    b = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert b["epoch"] == 3
    for key in ("model", "ema"):
        for k in a[key]:
            torch.testing.assert_close(b[key][k], a[key][k], rtol=0, atol=0)
    assert (run_dir / "log.csv").read_text().count("\n") == 4  # header + 3 epochs, no duplicate


def test_a_nan_stops_the_run_with_its_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data = synthetic(tmp_path / "data", n_train=60)
    out = tmp_path / "run"
    ddpm.train.train(ddpm.main.parse_args(["--data-dir", str(data), "--out-dir", str(out), *TINY, "--epochs", "1"]))
    before = (out / "mnist" / "ckpt.pt").read_bytes()
    monkeypatch.setattr(ddpm.train, "to_model_range", lambda pixels: pixels.float() * float("nan"))
    with pytest.raises(SystemExit) as e:
        ddpm.train.train(ddpm.main.parse_args(["--resume", "--epochs", "2", "--out-dir", str(out),
                                               "--data-dir", str(data)]))
    msg = str(e.value.code)
    assert "the loss became non-finite (nan" in msg and "at step 3" in msg and "last good checkpoint" in msg, msg
    assert "--lr" in msg
    assert (out / "mnist" / "ckpt.pt").read_bytes() == before


def one_line_error(capsys, *args):
    """ddpm/main.py's main(ARGS) in this process: it must stop with one line and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ddpm.main.main([str(a) for a in args])
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_a_non_finite_test_loss_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    data = synthetic(tmp_path / "data", n_train=20, n_test=4)
    monkeypatch.setattr(ddpm.train, "test_loss", lambda *a, **kw: float("nan"))
    with pytest.raises(SystemExit) as e:
        ddpm.train.train(ddpm.main.parse_args(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY,
                                               "--epochs", "1"]))
    msg = str(e.value.code)
    assert "non-finite in epoch 1" in msg and "no checkpoint was written yet" in msg and "--lr" in msg, msg
    assert not (tmp_path / "run" / "mnist" / "ckpt.pt").exists()


@pytest.mark.parametrize("args, says", [
    (["--dataset", "cifar10"], "argument --dataset: invalid choice: 'cifar10' (choose from"),
    (["--sample-steps", "2000"], "--sample-steps 2000 is larger than T = 1000; choose 1..1000"),
    (["--sample-steps", "0"], "argument --sample-steps: '0': must be >= 1"),
    (["--T", "50", "--sample-steps", "60"], "--sample-steps 60 is larger than T = 50"),
    (["--attn-levels", "3"], "--attn-levels [3]: the U-Net has levels 0..2"),
    (["--base", "30"], "--base 30 is not a multiple of 4"),
])
def test_bad_flags_get_one_line(args, says, capsys):
    assert says in one_line_error(capsys, *args)


def test_missing_data_names_the_files_and_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(ddpm.data, "download", lambda dataset, root: "the download failed (URLError: no network)")
    with pytest.raises(SystemExit) as e:
        ddpm.main.main(["--dataset", "fashion", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run")])
    msg = str(e.value.code)
    assert f"{tmp_path}/FashionMNIST/raw/train-images-idx3-ubyte[.gz]" in msg
    assert "--data-dir" in msg and "no network" in msg and "\n" not in msg and "shared" not in msg
    assert not (tmp_path / "run").exists()


def test_without_torchvision_the_missing_data_message_says_where_to_get_the_files(tmp_path, monkeypatch):
    """A torchvision that does not import (not installed, or built for another torch) downloads nothing;
    the IDX readers still work, so the message says which files to put where, and from where."""
    monkeypatch.setitem(sys.modules, "torchvision", None)       # `from torchvision import ...` now fails
    for dataset, url in (("mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
                         ("fashion", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")):
        with pytest.raises(SystemExit) as e:
            ddpm.data.load_split(tmp_path, dataset, "train")
        msg = str(e.value.code)
        assert "torchvision could not be imported (ModuleNotFoundError" in msg and "nothing was downloaded" in msg, msg
        raw = f"{tmp_path}/{ddpm.data.DATASETS[dataset]}/raw/"
        assert f"from {url} into {raw}" in msg and "\n" not in msg, msg
        for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                     "t10k-labels-idx1-ubyte.gz"):
            assert name in msg
    synthetic(tmp_path)                                         # once the files are there, they are read
    images, labels = ddpm.data.load_split(tmp_path, "mnist", "test")
    assert images.shape == (40, 1, 28, 28) and labels.shape == (40,)


def test_help_gives_the_readmes_cpu_result_command(root):
    readme = (root / "ddpm" / "README.md").read_text()
    block = readme.split("### CPU: a smaller U-Net, 3 epochs per dataset")[1].split("```bash\n")[1].split("```")[0]
    command = " ".join(line.split("#")[0] for line in block.splitlines())
    help_text = subprocess.run([sys.executable, "ddpm/main.py", "--help"], cwd=root, capture_output=True,
                               text=True).stdout
    assert " ".join(command.split()) in " ".join(help_text.split())


def test_checkpoints_of_the_other_dataset_another_model_or_folder_are_refused(tmp_path, capsys):
    data = synthetic(tmp_path / "data", n_train=40)
    out = tmp_path / "runs"
    ddpm.train.train(ddpm.main.parse_args(["--data-dir", str(data), "--out-dir", str(out), *TINY, "--epochs", "1"]))
    (out / "fashion").mkdir()
    shutil.copy(out / "mnist" / "ckpt.pt", out / "fashion" / "ckpt.pt")
    assert "was trained on mnist, not on fashion" in one_line_error(
        capsys, "--sample-only", "--dataset", "fashion", "--out-dir", out)
    assert "holds another model" in one_line_error(capsys, "--resume", "--out-dir", out, "--data-dir", data,
                                                   "--base", "16")
    assert "exists; pass --resume" in one_line_error(capsys, "--data-dir", data, "--out-dir", out, *TINY)
    torch.save({"folder": "nf"}, out / "mnist" / "ckpt.pt")
    assert "holds a nf/ checkpoint, not a ddpm/ diffusion checkpoint" in one_line_error(
        capsys, "--evaluate", "--out-dir", out)


def test_benchmark_json_against_the_quick_model_counted_here(tmp_path, capsys):
    """--benchmark --quick: one JSON line whose params, batch size and training FLOPs are those of the
    --quick U-Net, counted here (parameters summed, FLOPs by FlopCounterMode over the loss's forward and
    backward on the meta device), and whose rates agree with each other; on random data (no files)."""
    ddpm.main.main(["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2", "--data-dir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    q = ddpm.main.QUICK
    cfg = UNetConfig(side=28, base=q["base"], mults=(1, 2, 2), res_blocks=q["res_blocks"], attn_levels=(2,), dropout=0.1)
    with torch.device("meta"):
        model = UNet(cfg)
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            Diffusion(q["T"]).loss(model, torch.zeros(q["batch_size"], 1, 28, 28)).backward()
    assert out["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert out["batch_size"] == q["batch_size"] and out["unit"] == "images" and out["data"] == "random"
    assert out["flops_per_sample"] == counter.get_total_flops() / q["batch_size"] > 0
    assert out["samples_per_s"] == pytest.approx(q["batch_size"] / (out["step_ms"] / 1000), rel=1e-6)
    assert out["tflops"] == pytest.approx(out["flops_per_sample"] * out["samples_per_s"] / 1e12, rel=1e-6)
    assert out["device"] == "cpu" and out["mfu"] is None and out["compile"] is False and out["peak_mem_mb"] > 0
    assert not (tmp_path / "MNIST").exists()                    # nothing downloaded, nothing written


def test_the_step_loop_syncs_with_the_host_only_at_log_steps(tmp_path, monkeypatch, log_interval=7):
    """20 training steps call Tensor.item / .cpu / .tolist once per --log-interval steps (the progress
    bar) plus twice at the epoch's end (train and test loss), never per step."""
    data = synthetic(tmp_path / "data", n_train=100)
    calls = []
    for name in ("item", "cpu", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: calls.append(_n) or
                            _f(self, *a, **k))
    ddpm.train.train(ddpm.main.parse_args(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY,
                                           "--epochs", "1", "--batch-size", "5", "--log-interval", str(log_interval)]))
    assert len(calls) <= math.ceil(20 / log_interval) + 2, calls


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_the_shipped_weights_load_into_todays_unet_and_reproduce_their_check(dataset):
    """pretrained/ddpm/<dataset>: it passes its SHA256SUMS line, every float16 tensor fits today's U-Net
    (strict: same keys and shapes), and eps_theta on the JSON's fixed input, built here from seed 0, gives
    the numbers the export measured: a model change that forgets to re-export fails here."""
    meta = ddpm.pretrained.read_meta(dataset)
    path = ddpm.pretrained.HERE / f"{dataset}.safetensors"
    assert path.stat().st_size <= 4 * 2 ** 20 and meta["name"] == dataset and meta["metric"]["split"] == "test"
    model = UNet(UNetConfig(**ddpm.pretrained.shipped_config(meta))).eval()
    model.load_state_dict(ddpm.pretrained.load_pretrained(dataset))     # strict
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(8, 1, 28, 28, generator=g)
    t = torch.randint(0, meta["flags"]["T"], (8,), generator=g)
    with torch.no_grad():
        eps = model(x_t, t)
    check = meta["check"]
    assert t.tolist() == check["t"]
    assert eps.abs().sum().item() == pytest.approx(check["eps_abs_sum"], rel=1e-4)
    assert eps.sum().item() == pytest.approx(check["eps_sum"], abs=1e-3 * check["eps_abs_sum"] / eps.numel() ** 0.5)
    torch.testing.assert_close(eps.flatten()[:8], torch.tensor(check["eps_first"]), rtol=1e-4, atol=1e-5)


def test_sample_only_with_the_shipped_weights_draws_both_panels_with_ddim(tmp_path, monkeypatch):
    """--sample-only --pretrained: no run folder, no data; the grid and the GIF's panels come from the shipped
    weights of each dataset (FashionMNIST's and MNIST's side by side) with DDIM unless --sampler says otherwise."""
    draws = spy_on_draw(monkeypatch)
    ddpm.main.main(["--dataset", "fashion", "--sample-only", "--pretrained", "--device", "cpu", "--sample-steps", "2",
                    "--n-samples", "4", "--out-dir", str(tmp_path / "runs"), "--figures-dir", str(tmp_path / "fig")])
    shipped = {ds: ddpm.pretrained.load_pretrained(ds) for ds in ("mnist", "fashion")}
    grid, gif_fashion, gif_mnist = draws
    for d, ds in ((grid, "fashion"), (gif_fashion, "fashion"), (gif_mnist, "mnist")):
        assert d["sampler"] == "ddim" and all(torch.equal(d["state"][k], v) for k, v in shipped[ds].items())
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["ddpm_both.gif", "ddpm_fashion_shipped_samples.png"]
    assert not (tmp_path / "runs").exists()


def test_a_tampered_shipped_file_is_one_line_naming_it(root, tmp_path):
    """A copy of the folder and its shipped weights with one byte flipped: one line naming the file, and
    nothing written."""
    shutil.copytree(root / "ddpm", tmp_path / "ddpm", ignore=shutil.ignore_patterns("__pycache__"))
    flip_bit(shipped_copy("ddpm", tmp_path) / "ddpm" / "fashion.safetensors")
    r = subprocess.run([sys.executable, "ddpm/main.py", "--dataset", "fashion", "--sample-only", "--pretrained",
                        "--out-dir", "runs", "--figures-dir", "fig"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip() == ("ddpm: pretrained/ddpm/fashion.safetensors does not match "
                                                      "pretrained/SHA256SUMS; restore it with git checkout"), r.stderr
    assert not (tmp_path / "fig").exists() and not (tmp_path / "runs").exists()


def test_checkpoints_from_before_the_middle_blocks_had_names_still_load():
    """A state dict with the old keys mid.0 / mid.1 / mid.2 (ResBlock, Attention, ResBlock) loads into
    today's U-Net with every tensor where it belongs."""
    net = UNet(UNetConfig(base=8, res_blocks=1))
    new = {"mid_res1.": "mid.0.", "mid_attn.": "mid.1.", "mid_res2.": "mid.2."}
    old = {next((o + k[len(n):] for n, o in new.items() if k.startswith(n)), k): v for k, v in net.state_dict().items()}
    assert sum(k.startswith("mid.") for k in old) == sum(k.startswith("mid_") for k in net.state_dict()) > 0
    fresh = UNet(UNetConfig(base=8, res_blocks=1))
    fresh.load_state_dict(ddpm.model.rename_old_keys(old))     # strict
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in net.state_dict().items())
