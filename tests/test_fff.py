"""fff/: soft mixture against Algorithm 1's recursion, hard routing, sparsity of the hard path,
learning on a tiny set, exact resume, clear errors."""
import json

import numpy as np
import pytest
import torch
from conftest import cli_error_line, import_folder, write_idx
from torch.distributions import Bernoulli

fff = import_folder("fff")


def tiny(depth=3, seed=0):
    torch.manual_seed(seed)
    return fff.model.FFF(in_dim=6, leaf_width=4, out_dim=3, depth=depth)


def forward_t(model, x, m=0, n=0):
    """Algorithm 1's FORWARD_T, recursively, for one sample x (I,)."""
    if m == model.depth:  # a leaf: <dim_I, l, dim_O>
        return torch.relu(x @ model.w1[n] + model.b1[n]) @ model.w2[n] + model.b2[n]
    i = 2 ** m - 1 + n
    c = torch.sigmoid(x @ model.node_weights[i] + model.node_biases[i])
    return c * forward_t(model, x, m + 1, 2 * n + 1) + (1 - c) * forward_t(model, x, m + 1, 2 * n)


def forward_i(model, x, m=0, n=0):
    """Algorithm 1's FORWARD_I, recursively: returns the leaf index reached."""
    if m == model.depth:
        return n
    i = 2 ** m - 1 + n
    c = torch.sigmoid(x @ model.node_weights[i] + model.node_biases[i])
    return forward_i(model, x, m + 1, 2 * n + 1 if c >= 0.5 else 2 * n)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_soft_mode_is_algorithm_1s_recursive_mixture(depth):
    model, x = tiny(depth), torch.randn(5, 6)
    y, H = model(x, mode="soft")
    torch.testing.assert_close(y, torch.stack([forward_t(model, s) for s in x]))
    assert H.shape == (5, 2 ** depth - 1)
    p = model.path_probabilities(torch.sigmoid(x @ model.node_weights.T + model.node_biases))
    torch.testing.assert_close(p.sum(1), torch.ones(5))


def test_hard_routing_follows_forward_i_and_picks_the_likeliest_leaf_once_hardened():
    model, x = tiny(depth=4), torch.randn(200, 6)
    leaf = model.route(x)
    assert leaf.tolist() == [forward_i(model, s) for s in x]

    for scale in (1, 10, 1e4):  # from soft to hardened decisions
        with torch.no_grad():
            model.node_weights *= scale
            model.node_biases *= scale
        p = model.path_probabilities(torch.sigmoid(x @ model.node_weights.T + model.node_biases))
        assert torch.equal(model.route(x), leaf)  # scaling w and b keeps every hyperplane
        # a leaf holding more than half the probability is the likeliest, and greedy descent finds it
        sure = p.gather(1, leaf[:, None])[:, 0] > 0.5
        assert torch.equal(leaf[sure], p.argmax(1)[sure])
    assert sure.all()  # hardened: every sample's path carries almost all the probability

    # With soft decisions the greedy descent can miss it: root c = 0.6 goes right, where the
    # leaves get 0.6 * 0.5 = 0.3 each, while the left-left leaf has 0.4 * 1.0 = 0.4.
    soft = fff.model.FFF(1, 1, 1, depth=2)
    with torch.no_grad():
        soft.node_weights.zero_()
        soft.node_biases.copy_(torch.tensor([0.6, 0.5, 0.5]).logit())
        soft.node_biases[1] = -100.0
    assert soft.route(torch.zeros(1, 1)).item() == 3 and likeliest_leaf(soft).item() == 0


def likeliest_leaf(m):
    return m.path_probabilities(torch.sigmoid(m.node_biases)[None]).argmax(1)


def test_saturated_decisions_make_soft_and_hard_outputs_equal():
    model, x = tiny(depth=3), torch.randn(64, 6)
    with torch.no_grad():  # the same hyperplanes, but steep: every c is 0 or 1 up to float precision
        model.node_weights *= 1e4
        model.node_biases *= 1e4
    soft, H = model(x, mode="soft")
    hard, _ = model(x, mode="hard")
    torch.testing.assert_close(soft, hard)
    assert H.median() < 1e-3  # nearly every decision is certain


def test_the_hard_path_touches_only_its_own_leaf():
    model, x = tiny(depth=3), torch.randn(16, 6)
    leaf = model.route(x)
    for b in range(len(x)):
        model.zero_grad()
        model(x[b:b + 1], mode="hard")[0].sum().backward()
        for name in ("w1", "b1", "w2", "b2"):
            grad = getattr(model, name).grad
            others = torch.arange(model.n_leaves) != leaf[b]
            assert grad[others].abs().sum() == 0, name
            assert grad[leaf[b]].abs().sum() > 0 or name == "b1", name
    # and the other leaves' values are never read: poisoning them changes nothing
    expected = model(x, mode="hard")[0]
    with torch.no_grad():
        for name in ("w1", "b1", "w2", "b2"):
            param = getattr(model, name)
            unused = torch.ones(model.n_leaves, dtype=torch.bool)
            unused[leaf.unique()] = False
            param[unused] = float("nan")
    torch.testing.assert_close(model(x, mode="hard")[0], expected)


def test_node_entropy_is_the_bernoulli_entropy():
    c = torch.rand(100)
    torch.testing.assert_close(fff.model.binary_entropy(c), Bernoulli(probs=c).entropy(), atol=1e-5, rtol=1e-5)


def test_unknown_mode_and_bad_depth_say_so():
    model = tiny()
    with pytest.raises(ValueError, match="unknown mode 'medium'; choose one of soft, hard"):
        model(torch.randn(2, 6), mode="medium")
    with pytest.raises(ValueError, match="depth 0 is outside"):
        fff.model.FFF(6, 4, 3, depth=0)


def synthetic_mnist(root, n_train=1200, n_test=300, seed=0):
    """Ten classes of 28x28 images: class c lights up its own 6x6 square, plus noise."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 80, (n, 28, 28))
        for i, c in enumerate(labels):
            r, col = 2 + 12 * (c // 5), 2 + 5 * (c % 5)
            images[i, r:r + 6, col:col + 6] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def run_args(data, out, *extra):
    return ["--data-dir", str(data), "--out-dir", str(out), "--val-size", "200", "--batch-size", "50",
            "--leaf-width", "8", "--depth", "2", *extra]


def test_the_loss_falls_and_every_model_learns_the_tiny_set(tmp_path):
    data = synthetic_mnist(tmp_path / "data")
    out = tmp_path / "run"
    fff.main.main(run_args(data, out, "--epochs", "4"))
    for name in ("fff", "ff_train", "ff_infer"):
        rows = (out / f"log_{name}.csv").read_text().splitlines()
        loss = [float(r.split(",")[1]) for r in rows[1:]]
        assert len(loss) == 4 and loss[-1] < 0.5 * loss[0], (name, loss)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fff"]["test_acc_hard"] > 0.9 and metrics["ff_train"]["test_acc"] > 0.9, metrics
    assert (out / "fff_leaves.png").stat().st_size > 0 and (out / "fff_curves.png").stat().st_size > 0


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = synthetic_mnist(tmp_path / "data", n_train=600)
    common = ["--epochs", "3", "--models", "fff", "--region-leak", "0.1"]
    fff.main.main(run_args(data, tmp_path / "straight", *common))

    calls, accuracy = [], fff.train.accuracy

    def interrupted_in_epoch_2(*a, **kw):  # Ctrl-C during epoch 2's validation, before its checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return accuracy(*a, **kw)

    monkeypatch.setattr(fff.train, "accuracy", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        fff.main.main(run_args(data, tmp_path / "resumed", *common))
    assert e.value.code == 130
    monkeypatch.setattr(fff.train, "accuracy", accuracy)
    assert torch.load(tmp_path / "resumed" / "ckpt_fff.pt", weights_only=True)["epoch"] == 1
    fff.main.main(["--resume", "--out-dir", str(tmp_path / "resumed"), "--data-dir", str(data)])
    a = torch.load(tmp_path / "straight" / "ckpt_fff.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "ckpt_fff.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
    assert (tmp_path / "resumed" / "log_fff.csv").read_text().count("\n") == 4  # header + 3 epochs
    assert not (tmp_path / "resumed" / "ckpt_ff_train.pt").exists()  # --models fff was resumed too


def test_speed_table_runs_and_reports_ratios(tmp_path):
    rows = fff.sample.speed(fff.main.parse_args(["--speed", "--speed-depths", "1,2", "--device", "cpu",
                                                 "--out-dir", str(tmp_path)]))
    assert [(r["depth"], r["batch"]) for r in rows] == [(1, 1), (1, 1024), (2, 1), (2, 1024)]
    assert all(r["speedup_vs_ff_train"] > 0 for r in rows)
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] == rows


def one_line_error(*args):
    return cli_error_line("fff", *args)


@pytest.mark.parametrize("args, says", [
    (["--depth", "0"], "depth 0: must be in 1..20"),
    (["--depth", "40"], "depth 40: must be in 1..20"),
    (["--depth", "18"], "needs 6,877,347,055 parameters"),           # refused before allocating
    (["--speed", "--speed-depths", "3,19"], "depth 19 with --leaf-width 32 needs"),
    (["--models", "fff,moe"], "a comma-separated subset of fff,ff_train,ff_infer"),
])
def test_bad_flags_get_one_line(args, says):
    assert says in one_line_error(*args)


def test_missing_data_and_foreign_checkpoints_get_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fff.data, "download", lambda dataset, root: "URLError: no network")
    with pytest.raises(SystemExit) as e:
        fff.main.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run")])
    assert "MNIST/raw/{train-images-idx3-ubyte,train-labels-idx1-ubyte}" in str(e.value.code)
    assert "--data-dir" in str(e.value.code)
    (tmp_path / "run").mkdir()
    torch.save({"folder": "vit"}, tmp_path / "run" / "ckpt_fff.pt")
    assert "is a checkpoint of vit, not of fff/" in one_line_error("--resume", "--out-dir", str(tmp_path / "run"))
