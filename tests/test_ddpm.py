"""ddpm/: the closed forms against iterating the chain and against Bayes' rule, DDIM with eta = 1
against DDPM, both samplers against a perfect noise predictor, the U-Net's shapes, FID against a
direct matrix square root, learning, exact resume, NaN stop, the whole pipeline, errors."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cli_error_line, import_folder, write_idx

ddpm = import_folder("ddpm")
Diffusion, UNet, UNetConfig = ddpm.model.Diffusion, ddpm.model.UNet, ddpm.model.UNetConfig


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

    # and by sampling: 20 steps of the chain against q_sample in one jump, 200,000 draws of one pixel
    g = torch.Generator().manual_seed(0)
    x_0 = torch.full((200_000, 1, 1, 1), 0.7)
    x = x_0.clone()
    for t in range(20):
        x = (1 - d.betas[t]).sqrt().float() * x + d.betas[t].sqrt().float() * torch.randn(x.shape, generator=g)
    jump = d.q_sample(x_0, torch.full((len(x_0),), 19), torch.randn(x_0.shape, generator=g))
    for y in (x, jump):
        assert abs(y.mean().item() - d.alpha_bar[19].sqrt().item() * 0.7) < 3e-3
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
    ab_prev, alpha, beta = (v[t].view(-1, 1, 1, 1) for v in (d.alpha_bar_prev, d.alphas, d.betas))
    precision = 1 / (1 - ab_prev) + alpha / beta
    torch.testing.assert_close(var.expand_as(x_0), (1 / precision).expand_as(x_0))
    torch.testing.assert_close(mean, (ab_prev.sqrt() * x_0 / (1 - ab_prev) + alpha.sqrt() * x_t / beta) / precision)
    # the first step (the paper's t = 1) returns x_0 itself, with no variance
    mean, var = d.posterior(x_0, x_t, torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(mean, x_0)
    assert torch.all(var == 0)


def test_ddpm_step_mean_is_eq_11():
    d = Diffusion(1000)
    torch.manual_seed(0)
    t = torch.tensor([1, 100, 500, 999])
    x_0, eps = torch.rand(4, 1, 6, 6, dtype=torch.float64) * 1.8 - 0.9, torch.randn(4, 1, 6, 6, dtype=torch.float64)
    x_t = d.q_sample(x_0, t, eps)                               # x_0 inside [-1, 1]: the clip changes nothing
    mean = d.ddpm_step(x_t, t, eps, noise=torch.zeros_like(x_t))
    alpha, beta, ab = (v[t].view(-1, 1, 1, 1) for v in (d.alphas, d.betas, d.alpha_bar))
    torch.testing.assert_close(mean, (x_t - beta / (1 - ab).sqrt() * eps) / alpha.sqrt())


def test_ddim_with_eta_1_over_all_T_steps_is_ddpm():
    d = Diffusion(1000)
    torch.manual_seed(0)
    x_t, eps, z = (torch.randn(8, 1, 5, 5, dtype=torch.float64) * 2 for _ in range(3))  # large: the clip acts too
    t = torch.tensor([0, 1, 2, 10, 300, 600, 998, 999])
    torch.testing.assert_close(d.ddim_step(x_t, t, t - 1, eps, eta=1.0, noise=z), d.ddpm_step(x_t, t, eps, noise=z))
    assert d.timesteps("ddim", 1000) == d.timesteps("ddpm", 1000)

    # and so whole chains agree: same noise, same network, T = 60
    d = Diffusion(60)
    net = UNet(UNetConfig(side=8, base=8, mults=(1, 2), res_blocks=1, attn_levels=(1,), dropout=0.0)).eval()
    torch.nn.init.normal_(net.out[-1].weight, std=0.05)
    ddpm_x = d.sample(net, (3, 1, 8, 8), "ddpm", generator=torch.Generator().manual_seed(5))
    ddim_x = d.sample(net, (3, 1, 8, 8), "ddim", 60, eta=1.0, generator=torch.Generator().manual_seed(5))
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
    _, frames = d.sample(ideal, (2, 1, 6, 6), sampler, steps, eta, frames=8)
    assert frames[0][0] == d.timesteps(sampler, steps or d.T)[0] + 1           # x_T (DDIM: x_tau_S) first
    assert frames[-1][0] == 0 and len(frames) <= 9


def test_ddim_timesteps_are_evenly_spaced_and_end_at_zero():
    d = Diffusion(1000)
    ts = d.timesteps("ddim", 50)
    assert ts[0] == 980 and ts[-1] == 0 and len(ts) == 50 and set(np.diff(ts)) == {-20}
    assert d.timesteps("ddim", 1) == [0]


@pytest.mark.parametrize("cfg", [UNetConfig(base=8, res_blocks=1),
                                 UNetConfig(side=32, base=8, mults=(1, 2, 2, 2), attn_levels=(2, 3)),
                                 UNetConfig(side=28, base=12, mults=(1, 2), attn_levels=())])
def test_unet_output_has_the_input_shape_and_depends_on_t(cfg):
    net = UNet(cfg).eval()
    for p in net.parameters():                                  # undo the zero-initialised identity shortcuts
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    for B in (1, 3, 8):
        x = torch.randn(B, cfg.channels, cfg.side, cfg.side)
        t = torch.randint(0, 1000, (B,))
        eps = net(x, t)
        assert eps.shape == x.shape
    assert not torch.allclose(net(x, t), net(x, (t + 500) % 1000), atol=1e-4)
    with pytest.raises(ValueError, match="not divisible"):
        UNet(UNetConfig(side=30, mults=(1, 2, 2)))


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


def test_the_loss_falls_on_a_tiny_set(tmp_path):
    data = synthetic(tmp_path / "data", n_train=100)
    args = ddpm.main.parse_args(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY,
                                 "--epochs", "15", "--T", "100"])
    ddpm.train.train(args)
    with open(tmp_path / "run" / "mnist" / "log.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()]
    train_loss = [float(r[rows[0].index("train_loss")]) for r in rows[1:]]
    assert train_loss[0] > 0.5 and np.mean(train_loss[-3:]) < 0.5 * train_loss[0], train_loss


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


def test_both_datasets_give_the_side_by_side_gif_and_the_evaluation(tmp_path, monkeypatch, capsys):
    data = synthetic(synthetic(tmp_path / "data"), "FashionMNIST")
    out = tmp_path / "runs"
    run(data, out, "--epochs", "1")
    assert not (out / "mnist" / "ddpm_both.gif").exists()
    run(data, out, "--epochs", "1", "--dataset", "fashion")
    for name in ("ddpm_fashion_samples.png", "ddpm_fashion.gif", "ddpm_fashion_loss.png", "ddpm_both.gif"):
        assert (out / "fashion" / name).stat().st_size > 0
    evaluate = ["--data-dir", str(data), "--out-dir", str(out), "--device", "cpu", "--evaluate",
                "--n-eval", "8", "--eval-batch", "8", "--sample-steps", "5", "--classifier-epochs", "1"]
    ctrl_c_while_the_classifier_trains(evaluate, out / "mnist", monkeypatch, capsys)
    ddpm.main.main(evaluate)
    metrics = json.loads((out / "mnist" / "eval.json").read_text())
    assert list(metrics["results"]) == ["real training images", "DDPM, 20 steps", "DDIM, 5 steps, eta 0"]
    for r in metrics["results"].values():
        assert sum(r["class_histogram"]) == 8 and 0 <= r["confident_share"] <= 1 and np.isfinite(r["fid"])
    assert (out / "mnist" / "classifier.pt").is_file() and (out / "mnist" / "ddpm_mnist_classes.png").is_file()


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


@pytest.mark.parametrize("args, says", [
    (["--dataset", "cifar10"], "argument --dataset: invalid choice: 'cifar10' (choose from"),
    (["--sample-steps", "2000"], "--sample-steps 2000 is larger than T = 1000; choose 1..1000"),
    (["--sample-steps", "0"], "argument --sample-steps: '0': must be in [1, inf)"),
    (["--T", "50", "--sample-steps", "60"], "--sample-steps 60 is larger than T = 50"),
    (["--attn-levels", "3"], "--attn-levels [3]: the U-Net has levels 0..2"),
    (["--base", "30"], "--base 30 is not a multiple of 4"),
])
def test_bad_flags_get_one_line(args, says):
    assert says in cli_error_line("ddpm", *args)


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


def test_checkpoints_of_the_other_dataset_another_model_or_folder_are_refused(tmp_path):
    data = synthetic(tmp_path / "data", n_train=40)
    out = tmp_path / "runs"
    ddpm.train.train(ddpm.main.parse_args(["--data-dir", str(data), "--out-dir", str(out), *TINY, "--epochs", "1"]))
    (out / "fashion").mkdir()
    shutil.copy(out / "mnist" / "ckpt.pt", out / "fashion" / "ckpt.pt")
    assert "was trained on mnist, not on fashion" in cli_error_line(
        "ddpm", "--sample-only", "--dataset", "fashion", "--out-dir", str(out))
    assert "holds another model" in cli_error_line("ddpm", "--resume", "--out-dir", str(out), "--data-dir", str(data),
                                                   "--base", "16")
    assert "exists; pass --resume" in cli_error_line("ddpm", "--data-dir", str(data), "--out-dir", str(out), *TINY)
    torch.save({"folder": "nf"}, out / "mnist" / "ckpt.pt")
    assert "holds a nf/ checkpoint, not a ddpm/ diffusion checkpoint" in cli_error_line(
        "ddpm", "--evaluate", "--out-dir", str(out))
