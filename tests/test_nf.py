"""nf/: inverse against forward, log-determinant against autograd, bits/dim of a known density
by hand, the samples' log-probability from the latent side, learning, exact resume, NaN stop,
errors."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import cli_error_line, import_folder, write_idx

nf = import_folder("nf")
FlowConfig, RealNVP = nf.model.FlowConfig, nf.model.RealNVP


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
    couplings = [m for m in model.modules() if isinstance(m, nf.model.Coupling)]
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
def test_log_det_equals_the_log_abs_det_of_the_autograd_jacobian(scales, n, side):
    torch.manual_seed(0)
    x = torch.rand(3, 1, side, side, dtype=torch.float64) * 0.9 + 0.05
    model = randomised(RealNVP(FlowConfig(side=side, n_couplings=n, scales=scales, hidden=8, blocks=1)).double(),
                       x, std=0.3)
    _, log_det = model(x)
    for k in range(len(x)):
        J = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 1, side, side))[0].flatten(), x[k].flatten())
        sign, logabsdet = torch.linalg.slogdet(J)                      # (D, D): the whole flow, logit included
        assert sign != 0
        torch.testing.assert_close(log_det[k], logabsdet)


def test_bits_per_dim_of_the_identity_flow_on_uniform_noise_matches_the_hand_computation():
    # A fresh model is z = logit(alpha + (1 - 2 alpha) x): zero-initialised last convs make every
    # coupling the identity and actnorm is untouched until it sees training data.
    alpha = 0.05
    model = RealNVP(FlowConfig(side=8, n_couplings=5, scales=1, hidden=8, blocks=1, alpha=alpha)).eval()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    xs = x.double().numpy().reshape(5, -1)
    p = alpha + (1 - 2 * alpha) * xs
    z = np.log(p / (1 - p))
    log_px = (-0.5 * z ** 2 - 0.5 * np.log(2 * np.pi) + np.log((1 - 2 * alpha) / (p * (1 - p)))).sum(1)
    D = 64
    bpd = (-log_px + D * np.log(256)) / (D * np.log(2))
    torch.testing.assert_close(model.bits_per_dim(x).double(), torch.from_numpy(bpd), rtol=1e-5, atol=1e-5)


def test_coupling_layers_leave_their_conditioning_half_unchanged_and_invert():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    for mask in ("checkerboard", "channel"):
        for parity in (0, 1):
            layer = nf.model.Coupling(4, mask, parity, hidden=8, blocks=1)
            torch.nn.init.normal_(layer.st.out.weight, std=0.3)
            y, _ = layer(x)
            if mask == "checkerboard":
                b = nf.model.checkerboard(6, 6, parity, "cpu").bool().expand_as(x)
            else:
                b = torch.zeros_like(x, dtype=torch.bool)
                b[:, (2 if parity else 0):(4 if parity else 2)] = True
            assert torch.equal(y[b], x[b]) and not torch.allclose(y[~b], x[~b])
            torch.testing.assert_close(layer.inverse(y), x)
    torch.testing.assert_close(nf.model.unsqueeze(nf.model.squeeze(x)), x, rtol=0, atol=0)


def test_samples_log_prob_from_the_latent_side_equals_log_prob_of_the_sample():
    torch.manual_seed(0)
    model = randomised(RealNVP(FlowConfig(side=8, n_couplings=5, scales=1, hidden=8, blocks=1)),
                       torch.rand(16, 1, 8, 8))
    x, log_prob = model.sample(6, temperature=0.5, return_log_prob=True)
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


def test_the_loss_falls_and_the_pipeline_writes_its_figures(tmp_path):
    data = synthetic_mnist(tmp_path / "data")
    out = tmp_path / "run"
    nf.main.main(run_args(data, out, "--epochs", "4"))
    with open(out / "log.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()]
    test_bpd = [float(r[rows[0].index("test_bpd")]) for r in rows[1:]]
    assert len(test_bpd) == 4 and test_bpd[-1] < test_bpd[0] - 1.0, test_bpd
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isclose(metrics["test_bpd"], test_bpd[-1], rel_tol=1e-5), metrics
    for name in ("samples", "temperatures", "interpolation", "curve"):
        assert (out / f"nf_mnist_{name}.png").stat().st_size > 0


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = synthetic_mnist(tmp_path / "data", n_train=128, n_test=16)
    nf.main.main(run_args(data, tmp_path / "straight", "--epochs", "3"))

    calls = []
    evaluate = nf.train.evaluate

    def interrupted_in_epoch_2(*a, **kw):  # Ctrl-C after epoch 2's training, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **kw)

    monkeypatch.setattr(nf.train, "evaluate", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        nf.main.main(run_args(data, tmp_path / "resumed", "--epochs", "3"))
    assert e.value.code == 130
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(nf.train, "evaluate", evaluate)
    nf.main.main(["--resume", "--out-dir", str(tmp_path / "resumed"), "--data-dir", str(data)])

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0)
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 4  # header + 3 epochs, no duplicate


def test_a_nan_stops_the_run_with_its_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    data = synthetic_mnist(tmp_path / "data", n_train=128, n_test=16)
    out = tmp_path / "run"
    nf.main.main(run_args(data, out, "--epochs", "1"))
    before = (out / "ckpt.pt").read_bytes()
    dequantize = nf.train.dequantize
    monkeypatch.setattr(nf.train, "dequantize", lambda *a: dequantize(*a) * float("nan"))
    with pytest.raises(SystemExit) as e:
        nf.main.main(["--resume", "--epochs", "2", "--out-dir", str(out), "--data-dir", str(data)])
    msg = str(e.value.code)
    assert "the loss became non-finite (nan" in msg and "at step 4" in msg and "last good checkpoint" in msg, msg
    assert "--lr" in msg
    assert (out / "ckpt.pt").read_bytes() == before


def one_line_error(*args):
    return cli_error_line("nf", *args)


@pytest.mark.parametrize("args, says", [
    (["--dataset", "cifar10"], "argument --dataset: invalid choice: 'cifar10' (choose from"),
    (["--n-couplings", "4", "--scales", "2"], "--n-couplings 4 is too few for --scales 2"),
    (["--scales", "3"], "argument --scales: '3': must be in [0, 3)"),
    (["--alpha", "0.5"], "argument --alpha: '0.5': must be in (0, 0.5)"),
])
def test_bad_flags_get_one_line(args, says):
    assert says in one_line_error(*args)


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


def test_checkpoints_of_another_folder_or_model_are_refused(tmp_path):
    data = synthetic_mnist(tmp_path / "data", n_train=64, n_test=8)
    out = tmp_path / "run"
    nf.main.main(run_args(data, out, "--epochs", "1"))
    assert "holds a mnist run" in one_line_error("--resume", "--out-dir", str(out), "--dataset", "fashion")
    assert "holds another model" in one_line_error("--resume", "--out-dir", str(out), "--data-dir", str(data),
                                                   "--hidden", "16")
    assert "exists; pass --resume" in one_line_error(*run_args(data, out))
    torch.save({"folder": "gnns"}, out / "ckpt.pt")
    assert "is a checkpoint of gnns, not of nf/" in one_line_error("--sample-only", "--out-dir", str(out))
