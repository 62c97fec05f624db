"""nf/: every line of the README's paper-to-code table against a reference written out here: the
couplings against their formulas, the log-determinant and log p(x) against autograd's Jacobian and
torch.distributions, masks, squeeze and the multi-scale layout against hand-written patterns, the
dequantisation's noise (also where training draws it), the logit transform and bits/dim on
hand-worked numbers, learning below a per-pixel Gaussian; then resume, NaN stop and errors."""
import collections
import copy
import csv
import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import flip_bit, import_folder, shipped_copy, write_idx
from torch.utils._python_dispatch import TorchDispatchMode

nf = import_folder("nf")
FlowConfig, RealNVP, Coupling = nf.model.FlowConfig, nf.model.RealNVP, nf.model.Coupling


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only waits for the first (and the machine is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomised(model, x, std=0.02):
    """A model whose couplings are not the identity: random last convs, actnorm set from data."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nf.model.ResNet):
            torch.nn.init.normal_(m.out.weight, std=std)
            torch.nn.init.normal_(m.out.bias, std=std)
    model.initialize(x)                                         # actnorm's data-dependent initialisation
    return model.eval()


def test_inverse_of_forward_returns_x_for_the_default_model_in_float32():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28)
    model = randomised(RealNVP(FlowConfig()), x)
    z, log_det = model(x)
    assert z.shape == x.shape and log_det.shape == (4,)
    couplings = [m for m in model.modules() if isinstance(m, Coupling)]
    weights = [m.st.out.weight.detach().clone() for m in couplings]
    with torch.no_grad():                                       # the couplings' s and t really depend on x
        for m in couplings:
            m.st.out.weight.zero_()
        z_constant_st, _ = model(x)
        for m, w in zip(couplings, weights):
            m.st.out.weight.copy_(w)
    assert (z - z_constant_st).abs().max() > 0.1
    torch.testing.assert_close(model.inverse(z), x, rtol=0, atol=1e-4)


@pytest.mark.parametrize("scales, n, side", [(0, 4, 4), (1, 5, 4), (2, 6, 8)])
def test_log_prob_is_the_change_of_variables_with_the_autograd_jacobian(scales, n, side):
    """Sec. 3.1: log p_X(x) = log N(f(x); 0, I) + log |det df/dx^T|, the determinant of the whole flow
    (logit, couplings, actnorm) taken by autograd, the Gaussian by torch.distributions."""
    torch.manual_seed(0)
    x = torch.rand(3, 1, side, side, dtype=torch.float64) * 0.9 + 0.05
    model = randomised(RealNVP(FlowConfig(side=side, n_couplings=n, scales=scales, hidden=8, blocks=1)).double(),
                       x, std=0.3)
    z, log_det = model(x)
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    for k in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 1, side, side))[0].flatten(), x[k].flatten())
        sign, logabsdet = torch.linalg.slogdet(J)               # (D, D)
        assert sign != 0
        torch.testing.assert_close(log_det[k], logabsdet)
        torch.testing.assert_close(model.log_prob(x[k:k + 1])[0], normal.log_prob(z[k]).sum() + logabsdet)


@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
@pytest.mark.parametrize("parity", [0, 1])
def test_couplings_match_the_papers_formulas_written_out(mask, parity):
    """Sec. 3.2-3.4 and 4.1: y = b x + (1 - b)(x exp(s(b x)) + t(b x)), s = lambda tanh(s_hat),
    log|det| = sum (1 - b) s; for the channel mask, y_1 = x_1, y_2 = x_2 exp(s(x_1)) + t(x_1)."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    layer = Coupling(4, 6, mask, parity, hidden=8, blocks=1).double()
    torch.nn.init.normal_(layer.st.out.weight, std=0.3)
    with torch.no_grad():
        layer.s_scale.copy_(torch.tensor([0.5, 1.5, 2.0, 0.7][:layer.s_scale.shape[1]]).view(1, -1, 1, 1))
    y, log_det = layer(x)
    if mask == "checkerboard":
        b = torch.tensor([[(i + j + parity) % 2 for j in range(6)] for i in range(6)], dtype=torch.float64)
        s_hat, t = layer.st(torch.cat([b * x, b.expand(2, 1, 6, 6)], 1)).chunk(2, 1)
        s = layer.s_scale * torch.tanh(s_hat)
        expected, expected_log_det = b * x + (1 - b) * (x * torch.exp(s) + t), ((1 - b) * s).sum((1, 2, 3))
    else:
        x_1, x_2 = (x[:, 2:], x[:, :2]) if parity else (x[:, :2], x[:, 2:])
        s_hat, t = layer.st(x_1).chunk(2, 1)
        s = layer.s_scale * torch.tanh(s_hat)
        y_2 = x_2 * torch.exp(s) + t
        expected, expected_log_det = torch.cat([y_2, x_1] if parity else [x_1, y_2], 1), s.sum((1, 2, 3))
    assert s.abs().max() > 0.1                                  # the coupling is far from the identity
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(log_det, expected_log_det)
    # Sec. 3.3: the inverse, both ways round
    torch.testing.assert_close(layer.inverse(y), x)
    y_other = torch.randn_like(x)
    torch.testing.assert_close(layer(layer.inverse(y_other))[0], y_other)


def test_masks_and_squeeze_match_hand_written_patterns():
    assert nf.model.checkerboard(3, 4, 0).tolist() == [[[[0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]]]
    assert nf.model.checkerboard(3, 4, 1).tolist() == [[[[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0]]]]
    # squeeze (Fig. 3): each 2x2 block becomes 4 channels, ordered (row, column) within the block
    x = torch.arange(16.).view(1, 1, 4, 4)
    assert nf.model.squeeze(x).tolist() == [[[[0, 2], [8, 10]], [[1, 3], [9, 11]],
                                             [[4, 6], [12, 14]], [[5, 7], [13, 15]]]]
    torch.testing.assert_close(nf.model.unsqueeze(nf.model.squeeze(x)), x, rtol=0, atol=0)
    # channel mask: parity 0 conditions on the first half of the channels, parity 1 on the second
    x = torch.arange(4.).view(1, 4, 1, 1)
    for parity, (x_1, x_2) in ((0, ([0, 1], [2, 3])), (1, ([2, 3], [0, 1]))):
        a, b = Coupling(4, 1, "channel", parity, 4, 1).split(x)
        assert (a.flatten().tolist(), b.flatten().tolist()) == (x_1, x_2)


def test_the_multi_scale_layout_and_factor_out_match_the_paper():
    """Sec. 3.5-3.6: per scale, alternating checkerboard couplings, a squeeze, alternating channel
    couplings, half of the variables factored out; the last scale only checkerboard couplings."""
    assert RealNVP.layout(16, 2) == (3, 4) and RealNVP.layout(30, 0) == (30, 30)
    torch.manual_seed(0)
    model = RealNVP(FlowConfig(side=8, n_couplings=16, scales=2, hidden=4, blocks=1))
    scale, seen = model.flow, []
    while scale is not None:
        seen.append([[(m.mask, m.parity, m.st.inp.in_channels) for m in layers if isinstance(m, Coupling)]
                     for layers in (scale.checker, scale.channel)])
        scale = scale.next
    checker = lambda c: [("checkerboard", p, c + 1) for p in (0, 1, 0)]    # the ResNet also reads b
    channel = lambda c: [("channel", p, c // 2) for p in (0, 1, 0)]
    assert seen == [[checker(1), channel(4)], [checker(2), channel(8)],
                    [[("checkerboard", p, 5) for p in (0, 1, 0, 1)], []]]

    x = torch.rand(2, 1, 8, 8)
    model = randomised(model, x, std=0.3)
    with torch.no_grad():
        z, _ = model(x)
        for p in model.flow.next.parameters():                  # change everything after the first factor-out
            p.add_(0.5)
        z_changed, _ = model(x)
    # the factored-out half (squeezed channels 2-3: the odd rows) went straight to z; the rest did not
    assert torch.equal(z[:, :, 1::2], z_changed[:, :, 1::2])
    assert (z[:, :, 0::2] - z_changed[:, :, 0::2]).abs().min() > 0
    # alternating masks (Sec. 3.5): two checkerboard couplings of opposite parity change every pixel
    h = torch.randn(2, 1, 8, 8)
    first, second = model.flow.checker[0], model.flow.checker[2]
    assert (first(h)[0] == h).float().mean() == 0.5 and (second(first(h)[0])[0] != h).all()


def test_actnorm_initialises_from_data_and_keeps_each_image_independent():
    """Sec. 3.7's batch norm replaced by actnorm: y = (x + bias) exp(log_scale), with bias and scale set so
    that the first batch has zero mean and unit variance per channel; log|det| = H W sum log_scale."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 5, 5) * torch.tensor([0.5, 2.0, 3.0]).view(1, 3, 1, 1) + torch.tensor([1., -2., 0.]).view(1, 3, 1, 1)
    layer = nf.model.ActNorm(3)
    layer.init_pending = True
    y, log_det = layer(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.std((0, 2, 3)), torch.ones(3), rtol=0, atol=1e-4)
    y_2, log_det_2 = layer(x[:5] * 2)                           # initialised once: now a fixed affine map
    torch.testing.assert_close(y_2, (x[:5] * 2 - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(log_det_2, (-25 * torch.log(x.std((0, 2, 3)))).sum().expand(5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.inverse(y_2), x[:5] * 2, rtol=1e-5, atol=1e-5)
    model = randomised(RealNVP(FlowConfig(side=8, n_couplings=5, scales=1, hidden=8, blocks=1)), torch.rand(16, 1, 8, 8))
    x = torch.rand(6, 1, 8, 8)
    torch.testing.assert_close(model.log_prob(x[:2]), model.log_prob(x)[:2])  # not a function of the batch


def test_dequantisation_adds_uniform_noise_to_each_pixel():
    """Sec. 4.1: x = (pixel + u) / 256, u ~ U[0, 1) per pixel, independent of the pixel. 60,000 draws
    per pixel value: the bounds are 10 or more standard errors wide, so they hold for any seed."""
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).repeat_interleave(60_000).view(-1, 1, 1, 1)
    x = nf.data.dequantize(pixels, torch.Generator().manual_seed(7))
    u = (x * 256 - pixels.float()).double().view(3, -1)
    assert x.dtype == torch.float32 and u.min() >= 0 and u.max() < 1 + 1e-4
    for v in u:                                                 # each pixel value: mean 1/2, variance 1/12
        assert abs(v.mean() - 0.5) < 0.012 and abs(v.var() - 1 / 12) < 0.004
        assert abs((v < 0.25).double().mean() - 0.25) < 0.02
    assert abs(torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1]) < 0.03   # neighbours independent
    torch.testing.assert_close(nf.data.dequantize(pixels[:9], torch.Generator().manual_seed(7)), x[:9])


def test_logit_transform_and_bits_per_dim_on_hand_worked_examples():
    """Sec. 4.1 with alpha = 0.05: p = alpha + (1 - 2 alpha) x and y = logit(p); at x = 0, 1/2, 1: p = 1/20,
    1/2, 19/20, y = -ln 19, 0, ln 19, dy/dx = 0.9 / (p (1 - p)) = 360/19, 3.6, 360/19."""
    model = RealNVP(FlowConfig(side=2, n_couplings=1, scales=0, hidden=4, blocks=1, alpha=0.05)).double()
    x = torch.tensor([0.0, 0.5, 1.0, 0.5], dtype=torch.float64).view(1, 1, 2, 2)
    y, log_det = model.preprocess(x)
    torch.testing.assert_close(y.flatten(), torch.tensor([-math.log(19), 0, math.log(19), 0], dtype=torch.float64))
    torch.testing.assert_close(log_det, torch.tensor([2 * math.log(360 / 19) + 2 * math.log(3.6)], dtype=torch.float64))
    torch.testing.assert_close(model.postprocess(y), x)
    # bits/dim of the discrete pixels: the uniform density on [0, 1]^D (log p = 0) costs log2 256 = 8 bits a
    # pixel; a density twice as high everywhere one bit less
    D = model.D
    bits = model.bits(torch.tensor([0.0, D * math.log(2), -D * math.log(2)], dtype=torch.float64))
    torch.testing.assert_close(bits, torch.tensor([8.0, 7.0, 9.0], dtype=torch.float64))


def test_bits_per_dim_of_the_identity_flow_on_uniform_noise_matches_the_hand_computation():
    # A fresh model is z = logit(alpha + (1 - 2 alpha) x): zero-initialised last convs make every
    # coupling the identity and actnorm is untouched until it sees training data.
    alpha = 0.1
    model = RealNVP(FlowConfig(side=8, n_couplings=5, scales=1, hidden=8, blocks=1, alpha=alpha)).eval()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    xs = x.double().numpy().reshape(5, -1)
    p = alpha + (1 - 2 * alpha) * xs
    z = np.log(p / (1 - p))
    log_px = (-0.5 * z ** 2 - 0.5 * np.log(2 * np.pi) + np.log((1 - 2 * alpha) / (p * (1 - p)))).sum(1)
    D = 64
    bpd = (-log_px + D * np.log(256)) / (D * np.log(2))
    torch.testing.assert_close(model.bits_per_dim(x).double(), torch.from_numpy(bpd), rtol=1e-5, atol=1e-5)


def test_sample_is_the_inverse_of_z_at_the_temperature_with_its_log_prob():
    torch.manual_seed(0)
    model = randomised(RealNVP(FlowConfig(side=8, n_couplings=5, scales=1, hidden=8, blocks=1)),
                       torch.rand(16, 1, 8, 8))
    torch.manual_seed(3)
    x, log_prob = model.sample(6, temperature=0.5, return_log_prob=True)
    torch.manual_seed(3)
    z = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(x, model.inverse(0.5 * z))     # z ~ N(0, T^2 I), x = f^-1(z)
    torch.testing.assert_close(log_prob, model.log_prob(x), rtol=1e-4, atol=1e-3)


def synthetic_mnist(root, n_train=256, n_test=64, seed=0):
    """28x28 images of a horizontal or vertical bar at a random place, on black."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28))
        for k, (r, c) in enumerate(rng.integers(4, 20, (n, 2))):
            if k % 2:
                images[k, r:r + 3, 4:24] = 255
            else:
                images[k, 4:24, c:c + 3] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(n))
    return root


def run_args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--device", "cpu", "--n-couplings", "5",
            "--hidden", "8", "--blocks", "1", "--batch-size", "32", "--warmup-steps", "5", "--lr", "3e-3",
            "--n-samples", "4", *extra]


def train(data_dir, out_dir, *extra):
    return nf.train.train(nf.main.parse_args(run_args(data_dir, out_dir, *extra)))


def test_training_steps_see_freshly_dequantised_batches(tmp_path, monkeypatch):
    """The call site of Sec. 4.1's dequantisation: every training loss is taken on (pixel + u) / 256 of
    a batch of training images, with new u every epoch; the test set's u is the same every epoch."""
    data = synthetic_mnist(tmp_path / "data", n_train=32, n_test=8)
    train_set = nf.data.load_images(data, "mnist", "train")
    dequantized, losses = [], []
    dequantize, bits_per_dim = nf.train.dequantize, RealNVP.bits_per_dim

    def dequantize_spy(pixels, generator=None):
        x = dequantize(pixels, generator)
        dequantized.append((pixels, x))
        return x

    def bits_per_dim_spy(model, x):
        losses.append((model.training, x))
        return bits_per_dim(model, x)

    monkeypatch.setattr(nf.train, "dequantize", dequantize_spy)
    monkeypatch.setattr(RealNVP, "bits_per_dim", bits_per_dim_spy)
    train(data, tmp_path / "run", "--epochs", "2")              # one step of 32 images per epoch
    steps = [x for training, x in losses if training]
    tests = [x for training, x in losses if not training]
    assert len(steps) == 2 and len(tests) == 2
    noise = []
    for x in steps:
        pixels = next(p for p, out in dequantized if out is x)  # the loss's input came from dequantize
        assert sorted(map(bytes, pixels.numpy())) == sorted(map(bytes, train_set.numpy()))  # a batch of them
        u = x * 256 - pixels.float()
        assert u.min() >= 0 and u.max() < 1 + 1e-4 and abs(u.mean() - 0.5) < 0.02
        noise.append({bytes(p.numpy()): v for p, v in zip(pixels, u)})
    assert all(not torch.equal(noise[0][k], noise[1][k]) for k in noise[0])  # fresh noise every epoch
    torch.testing.assert_close(tests[0], tests[1], rtol=0, atol=0)           # fixed noise for the test set


def per_pixel_gaussian_bpd(data, alpha):
    """The test bits/dim of the best model that treats pixels as independent Gaussians in logit space
    (fitted on the training images), with the same dequantisation, logit and 1/256 terms, in numpy."""
    rng = np.random.default_rng(0)
    images = {s: nf.data.load_images(data, "mnist", s).double().numpy().reshape(-1, 784) for s in ("train", "test")}

    def logit(pixels):
        p = alpha + (1 - 2 * alpha) * (pixels + rng.random(pixels.shape)) / 256
        return np.log(p / (1 - p)), np.log((1 - 2 * alpha) / (p * (1 - p)))

    y, _ = logit(images["train"])
    mu, var = y.mean(0), y.var(0)
    y, log_det = logit(images["test"])
    log_p = (-0.5 * (y - mu) ** 2 / var - 0.5 * np.log(2 * np.pi * var) + log_det).sum(1)
    return np.mean((-log_p + 784 * np.log(256)) / (784 * np.log(2)))


def test_training_beats_a_per_pixel_gaussian_and_the_figures_show_the_model(tmp_path, monkeypatch):
    """Learning: below the test bits/dim of independent per-pixel Gaussians, which only a model of how
    pixels go together can reach. The figures: samples ranked by bits/dim, interpolations that end at
    the test digits themselves (f^-1(f(x)) = x)."""
    data = synthetic_mnist(tmp_path / "data")
    out = tmp_path / "run"
    drawn = {}
    for name in ("ranked_samples", "interpolate"):
        def spy(*a, _f=getattr(nf.sample, name), _name=name, **kw):
            drawn[_name] = _f(*a, **kw)
            return drawn[_name]
        monkeypatch.setattr(nf.sample, name, spy)
    nf.main.main(run_args(data, out, "--epochs", "12", "--lr", "1e-2"))
    with open(out / "log.csv") as f:
        test_bpd = [float(r["test_bpd"]) for r in csv.DictReader(f)]
    baseline = per_pixel_gaussian_bpd(data, alpha=0.05)
    assert len(test_bpd) == 12 and test_bpd[-1] < baseline - 0.5, (test_bpd, baseline)
    assert math.isclose(json.loads((out / "metrics.json").read_text())["test_bpd"], test_bpd[-1], rel_tol=1e-6)

    x, bpd = drawn["ranked_samples"]
    assert x.shape == (4, 1, 28, 28) and torch.all(bpd[1:] >= bpd[:-1]) and torch.isfinite(bpd).all()
    ends = drawn["interpolate"][:, [0, -1]]                     # (pairs, 2, 1, 28, 28)
    test = nf.data.load_images(data, "mnist", "test")[:8]
    torch.testing.assert_close(ends, ((test.float() + 0.5) / 256).view(4, 2, 1, 28, 28), rtol=0, atol=1e-3)
    assert (drawn["interpolate"][:, 1:-1] - ends[:, :1]).abs().amax((2, 3, 4)).min() > 0.05  # the middle moves
    assert (out / "nf_mnist_samples.png").stat().st_size > 0


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = synthetic_mnist(tmp_path / "data", n_train=128, n_test=16)
    train(data, tmp_path / "straight", "--epochs", "3")

    calls = []
    evaluate = nf.train.evaluate

    def interrupted_in_epoch_2(*a, **kw):  # Ctrl-C after epoch 2's training, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **kw)

    monkeypatch.setattr(nf.train, "evaluate", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        train(data, tmp_path / "resumed", "--epochs", "3")
    assert e.value.code == 130
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(nf.train, "evaluate", evaluate)
    ckpt = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)  # Adam's moments as a CUDA run saves
    for state in ckpt["optimizer"]["state"].values():                    # them: channels_last, unlike the CPU's
        for k, v in state.items():
            if v.dim() == 4 and v.shape[1] > 1:
                state[k] = v.contiguous(memory_format=torch.channels_last)
    torch.save(ckpt, tmp_path / "resumed" / "ckpt.pt")
    nf.train.train(nf.main.parse_args(["--resume", "--out-dir", str(tmp_path / "resumed"), "--data-dir", str(data)]))

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0)
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 4  # header + 3 epochs, no duplicate


def test_a_nan_stops_the_run_with_its_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data = synthetic_mnist(tmp_path / "data", n_train=128, n_test=16)
    out = tmp_path / "run"
    train(data, out, "--epochs", "1")
    before = (out / "ckpt.pt").read_bytes()
    dequantize = nf.train.dequantize
    monkeypatch.setattr(nf.train, "dequantize", lambda *a: dequantize(*a) * float("nan"))
    with pytest.raises(SystemExit) as e:
        nf.train.train(nf.main.parse_args(["--resume", "--epochs", "2", "--out-dir", str(out), "--data-dir", str(data)]))
    msg = str(e.value.code)
    assert "the loss became non-finite (nan" in msg and "at step 4" in msg and "last good checkpoint" in msg, msg
    assert "--lr" in msg
    assert (out / "ckpt.pt").read_bytes() == before


def test_a_non_finite_test_bpd_stops_the_run_before_its_checkpoint(tmp_path, monkeypatch):
    data = synthetic_mnist(tmp_path / "data", n_train=32, n_test=8)
    monkeypatch.setattr(nf.train, "evaluate", lambda *a, **kw: float("nan"))
    with pytest.raises(SystemExit) as e:
        train(data, tmp_path / "run", "--epochs", "1")
    msg = str(e.value.code)
    assert "non-finite in epoch 1" in msg and "no checkpoint was written yet" in msg and "--lr" in msg, msg
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def one_line_error(capsys, *args):
    """nf/main.py's main(ARGS) in this process: it must stop with one line and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        nf.main.main([str(a) for a in args])
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--dataset", "cifar10"], "argument --dataset: invalid choice: 'cifar10' (choose from"),
    (["--n-couplings", "4", "--scales", "2"], "--n-couplings 4 is too few for --scales 2"),
    (["--scales", "3"], "argument --scales: '3': must be >= 0 and <= 2"),
    (["--alpha", "0.5"], "argument --alpha: '0.5': must be > 0 and <= 0.499"),
])
def test_bad_flags_get_one_line(args, says, capsys):
    assert says in one_line_error(capsys, *args)


def test_missing_data_names_the_files_and_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(nf.data, "download", lambda dataset, root: "the download failed (URLError: no network)")
    with pytest.raises(SystemExit) as e:
        nf.main.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run")])
    msg = str(e.value.code)
    assert f"{tmp_path}/MNIST/raw/train-images-idx3-ubyte[.gz]" in msg
    assert "--data-dir" in msg and "no network" in msg and "\n" not in msg and "shared" not in msg
    assert not (tmp_path / "run").exists()


def test_without_torchvision_the_missing_data_message_says_where_to_get_the_files(tmp_path, monkeypatch):
    """A torchvision that does not import (not installed, or built for another torch) downloads nothing;
    the IDX reader still works, so the message says which files to put where, and from where."""
    monkeypatch.setitem(sys.modules, "torchvision", None)       # `from torchvision import ...` now fails
    for dataset, url in (("mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
                         ("fashion", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")):
        with pytest.raises(SystemExit) as e:
            nf.data.load_images(tmp_path, dataset, "test")
        msg = str(e.value.code)
        assert "torchvision could not be imported (ModuleNotFoundError" in msg and "nothing was downloaded" in msg
        raw = f"{tmp_path}/{nf.data.DATASETS[dataset]}/raw/"
        assert f"from {url} into {raw}" in msg and "\n" not in msg, msg
        assert "train-images-idx3-ubyte.gz" in msg and "t10k-images-idx3-ubyte.gz" in msg
    synthetic_mnist(tmp_path, n_test=8)                         # once the files are there, they are read
    assert nf.data.load_images(tmp_path, "mnist", "test").shape == (8, 1, 28, 28)


def test_help_gives_the_readmes_cpu_result_commands(root):
    readme = (root / "nf" / "README.md").read_text()
    help_text = " ".join(subprocess.run([sys.executable, "nf/main.py", "--help"], cwd=root, capture_output=True,
                                        text=True).stdout.split())
    for heading in ("### CPU: the paper's layout", "### The seed's flat stack"):
        command = readme.split(heading)[1].split("```bash\n")[1].split("```")[0].split("#")[0]
        assert " ".join(command.split()) in help_text, command


def test_checkpoints_of_another_folder_or_model_are_refused(tmp_path, capsys):
    data = synthetic_mnist(tmp_path / "data", n_train=64, n_test=8)
    out = tmp_path / "run"
    train(data, out, "--epochs", "1")
    assert "holds a mnist run" in one_line_error(capsys, "--resume", "--out-dir", out, "--dataset", "fashion")
    assert "holds another model" in one_line_error(capsys, "--resume", "--out-dir", out, "--data-dir", data,
                                                   "--hidden", "16")
    assert "exists; pass --resume" in one_line_error(capsys, *run_args(data, out))
    torch.save({"folder": "gnns"}, out / "ckpt.pt")
    assert "is a checkpoint of gnns, not of nf/" in one_line_error(capsys, "--sample-only", "--out-dir", out)


def test_benchmark_json_against_the_quick_flow_counted_here(tmp_path, capsys):
    """--benchmark --quick: one JSON line whose params, batch size and training FLOPs are those of the
    --quick flow, counted here (parameters summed, FLOPs by FlopCounterMode over the bits/dim's forward
    and backward on the meta device), and whose rates agree with each other; on random data (no files)."""
    nf.main.main(["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2", "--data-dir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    q, batch = nf.main.QUICK, 64                                # --quick keeps the default batch size
    with torch.device("meta"):
        model = RealNVP(FlowConfig(n_couplings=q["n_couplings"], hidden=q["hidden"], blocks=q["blocks"]))
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            model.bits_per_dim(torch.zeros(batch, 1, 28, 28)).mean().backward()
    assert out["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert out["batch_size"] == batch and out["unit"] == "images" and out["data"] == "random"
    assert out["flops_per_sample"] == counter.get_total_flops() / batch > 0
    assert out["samples_per_s"] == pytest.approx(batch / (out["step_ms"] / 1000), rel=1e-6)
    assert out["tflops"] == pytest.approx(out["flops_per_sample"] * out["samples_per_s"] / 1e12, rel=1e-6)
    assert out["device"] == "cpu" and out["mfu"] is None and out["compile"] is False and out["peak_mem_mb"] > 0
    assert not (tmp_path / "MNIST").exists()                    # nothing downloaded, nothing written


def test_the_step_loop_syncs_with_the_host_only_at_log_steps(tmp_path, monkeypatch, log_interval=7):
    """20 training steps call Tensor.item / .cpu / .tolist once per --log-interval steps (the progress
    bar) plus twice at the epoch's end (train and test bits/dim), never per step."""
    data = synthetic_mnist(tmp_path / "data", n_train=80, n_test=8)
    calls = []
    for name in ("item", "cpu", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k: calls.append(_n) or
                            _f(self, *a, **k))
    train(data, tmp_path / "run", "--epochs", "1", "--batch-size", "4", "--log-interval", str(log_interval))
    assert len(calls) <= math.ceil(20 / log_interval) + 2, calls


class KernelOps(TorchDispatchMode):
    """Counts the aten ops that compute or copy, i.e. launch a kernel on a GPU (views and detach launch none)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket is not torch.ops.aten.detach:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def tiny_flow_and_adam():
    torch.manual_seed(0)
    model = RealNVP(FlowConfig(side=8, n_couplings=5, scales=1, hidden=4, blocks=1))
    x = torch.rand(4, 1, 8, 8)
    model.initialize(x)
    return model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True), x


def test_a_training_step_launches_only_the_ops_of_the_maths():
    """One optimiser step of a tiny flow (4 checkerboard couplings, 1 channel-wise, 5 actnorms, 55 parameter
    tensors): 317 kernel-launching ops with torch 2.14, 361 when every checkerboard coupling rebuilt its mask
    from arange and masked s and t apart; the budget keeps 9% slack for other torch versions (the named ops above are the sharp checks)."""
    model, adam, x = tiny_flow_and_adam()
    args = SimpleNamespace(grad_clip=100.0)
    nf.train.train_step(model, model.bits_per_dim, adam, x, 1e-3, args)  # Adam's state exists from here on
    with KernelOps() as counted:
        nf.train.train_step(model, model.bits_per_dim, adam, x, 1e-3, args)
    assert not {"arange", "remainder", "rsub", "_to_copy", "clone"} & set(counted.ops), counted.ops
    assert counted.ops["convolution"] == counted.ops["convolution_backward"] == 5 * 4  # 4 convs a coupling
    assert sum(counted.ops.values()) <= 345, counted.ops


def test_channels_last_weights_as_on_cuda_give_the_same_flow_and_gradients():
    """on_device puts the conv weights in channels_last on CUDA: nothing in the flow may assume NCHW memory."""
    model, _, x = tiny_flow_and_adam()
    for m in model.modules():
        if isinstance(m, nf.model.ResNet):
            torch.nn.init.normal_(m.out.weight, std=0.3)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert last.flow.checker[0].st.inp.weight.is_contiguous(memory_format=torch.channels_last)
    for flow in (model, last):
        flow.bits_per_dim(x).mean().backward()
    torch.testing.assert_close(last.bits_per_dim(x), model.bits_per_dim(x))
    for p, q in zip(model.parameters(), last.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(last.inverse(last(x)[0]), x, rtol=0, atol=1e-5)


def test_the_shipped_weights_load_into_todays_flow_and_reproduce_their_check():
    """pretrained/nf/mnist: it passes its SHA256SUMS line, every tensor fits today's flow (strict), and the
    bits/dim of the JSON's fixed input, built here from seed 0, are the ones the export measured."""
    meta = nf.pretrained.read_meta("mnist")
    assert (nf.pretrained.HERE / "mnist.safetensors").stat().st_size <= 4 * 2 ** 20 and meta["name"] == "mnist"
    model = RealNVP(FlowConfig(**meta["config"])).eval()
    model.load_state_dict(nf.pretrained.load_pretrained("mnist"))      # strict
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bpd = model.bits_per_dim(x)
    torch.testing.assert_close(bpd, torch.tensor(meta["check"]["bits_per_dim"]), rtol=1e-4, atol=1e-4)


def test_sample_only_with_the_shipped_weights_needs_no_data_and_writes_no_run(tmp_path, monkeypatch, capsys):
    """--sample-only --pretrained without test images: the shipped test bits/dim, the samples and temperature
    figures from the shipped weights, no interpolation (it needs test digits), nothing in --out-dir."""
    drawn = []
    ranked = nf.sample.ranked_samples
    monkeypatch.setattr(nf.sample, "ranked_samples", lambda model, *a: drawn.append(model.state_dict()) or ranked(model, *a))
    nf.main.main(["--sample-only", "--pretrained", "--device", "cpu", "--n-samples", "4", "--data-dir", str(tmp_path),
                  "--out-dir", str(tmp_path / "runs"), "--figures-dir", str(tmp_path / "fig")])
    shipped = nf.pretrained.load_pretrained("mnist")
    assert all(torch.equal(drawn[0][k], v) for k, v in shipped.items())
    assert f"{nf.pretrained.read_meta('mnist')['metric']['value']:.4f} bits/dim" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["nf_mnist_samples.png", "nf_mnist_temperatures.png"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "MNIST").exists()


def test_a_tampered_shipped_file_is_one_line_naming_it(root, tmp_path):
    """A copy of the folder and its shipped weights with one byte flipped: one line naming the file."""
    shutil.copytree(root / "nf", tmp_path / "nf", ignore=shutil.ignore_patterns("__pycache__"))
    flip_bit(shipped_copy("nf", tmp_path) / "nf" / "mnist.safetensors")
    r = subprocess.run([sys.executable, "nf/main.py", "--sample-only", "--pretrained", "--out-dir", "runs",
                        "--figures-dir", "fig"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip() == ("nf: pretrained/nf/mnist.safetensors does not match "
                                                      "pretrained/SHA256SUMS; restore it with git checkout"), r.stderr
    assert not (tmp_path / "fig").exists() and not (tmp_path / "runs").exists()
