"""fff/: soft mixture against Algorithm 1's recursion, hard routing and what it reads, the training
loss and the region leak against their formulas, sizes and multiply-adds against counts by hand,
the flags at their call sites, learning on a tiny set, exact resume, clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, count_syncs, flip_bit, import_folder, shipped_copy, unlist, write_idx
from torch.distributions import Bernoulli

fff = import_folder("fff")


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: with two threads on a busy 2-core machine, the hand-offs between them
    cost several times the arithmetic. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def path_nodes(leaf, depth):
    """Breadth-first indices of the d nodes on the path to `leaf`: at level m, node 2^m - 1 + (leaf >> (d - m))."""
    return [2 ** m - 1 + (leaf >> (depth - m)) for m in range(depth)]


def test_hard_routing_reads_only_the_d_nodes_on_its_path():
    """FORWARD_I evaluates d node neurons per sample: redrawing every other node's hyperplane at random
    changes no sample's leaf (a descent that read one of them would go astray about half the time)."""
    model, x = tiny(depth=5), torch.randn(64, 6)
    leaf = model.route(x)
    for b in range(len(x)):
        on_path = torch.zeros(model.n_nodes, dtype=torch.bool)
        on_path[path_nodes(leaf[b].item(), 5)] = True
        assert on_path.sum() == 5
        other = fff.model.FFF(6, 4, 3, depth=5)
        with torch.no_grad():
            other.node_weights[on_path] = model.node_weights[on_path]
            other.node_biases[on_path] = model.node_biases[on_path]
        assert other.route(x[b:b + 1]).item() == leaf[b]


def test_region_leak_transposes_children_in_training_only():
    """A leak of 1 swaps <1 - c, c> at every node and sample, which is the tree with every hyperplane
    flipped (sigmoid(-z) = 1 - c); in evaluation the leak is off."""
    model, x = tiny(depth=3), torch.randn(8, 6)
    flipped = tiny(depth=3)
    with torch.no_grad():
        flipped.node_weights.neg_()
        flipped.node_biases.neg_()
    torch.testing.assert_close(model.train()(x, leak=1.0)[0], flipped(x)[0])
    torch.testing.assert_close(model.eval()(x, leak=1.0)[0], model(x)[0])
    torch.manual_seed(0)                                       # a leak of 0.5: some samples' paths change
    assert not torch.allclose(model.train()(x, leak=0.5)[0], model(x, leak=0.0)[0])


def test_the_training_loss_is_cross_entropy_plus_h_times_the_summed_node_entropies():
    """§3: L = L_pred + h sum over the nodes of H(c_{m,n}(x)), written out with torch.distributions;
    both terms averaged over the batch."""
    torch.manual_seed(0)
    model, x, y = tiny(depth=3), torch.randn(5, 6), torch.randint(0, 3, (5,))
    logits, H = model(x, mode="soft")
    c = torch.sigmoid(x @ model.node_weights.T + model.node_biases)              # (B, 7) node decisions
    L_pred = -logits.log_softmax(-1)[torch.arange(5), y].mean()
    L_harden = Bernoulli(probs=c).entropy().sum(1).mean()
    L, got_pred, got_harden = fff.train.fff_loss(logits, y, H, 2.5)
    torch.testing.assert_close(got_pred, L_pred)
    torch.testing.assert_close(got_harden, L_harden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(L, L_pred + 2.5 * L_harden, rtol=1e-4, atol=1e-5)


def test_sizes_and_multiply_adds_are_the_papers_counts():
    """§4: the FFF has 2^d - 1 node neurons and 2^d leaves <I, l, O>; at inference it evaluates d node
    neurons and one leaf. The baselines have width l 2^d (training) and l (inference)."""
    I, l, O, d = 6, 4, 3, 3
    cfg = {"in_dim": I, "leaf_width": l, "out_dim": O, "depth": d}
    count = {n: sum(p.numel() for p in fff.train.build(n, cfg).parameters()) for n in fff.train.MODELS}
    assert count["fff"] == (2 ** d - 1) * (I + 1) + 2 ** d * (I * l + l + l * O + O)
    assert count["fff"] == fff.main.fff_parameters(d, l, I, O)                   # the memory check's count
    assert count["ff_train"] == I * l * 2 ** d + l * 2 ** d + l * 2 ** d * O + O
    assert count["ff_infer"] == I * l + l + l * O + O
    assert fff.train.build("fff", cfg).inference_flops() == d * I + I * l + l * O
    assert fff.train.build("ff_train", cfg).inference_flops() == I * l * 2 ** d + l * 2 ** d * O


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
    monkeypatch.setattr(fff.main, "sample", lambda args: None)  # the weights are compared, not the figures
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


def test_the_speed_table_times_fff_hard_and_reports_the_papers_multiply_adds(tmp_path, monkeypatch):
    """The table's arithmetic with a stub timer of known answers (no timing is asserted): the FFF is
    timed in hard mode only, each row's multiply-adds are d I + I l + l O (FFF-hard) and I l 2^d + l 2^d O
    (dense of equal training width), and the speed-up is the ratio of the two times."""
    modes = []

    def stub(fn, x, device):
        fn(x)
        if not isinstance(fn, torch.nn.Module):                                 # FFF-hard, through a lambda
            return 2e-6
        return 5e-6 if fn.fc1.out_features == 4 else 40e-6                      # dense of width l, or l 2^d

    forward_hard, forward_soft = fff.model.FFF.forward_hard, fff.model.FFF.forward_soft
    monkeypatch.setattr(fff.model.FFF, "forward_hard", lambda self, x: modes.append("hard") or forward_hard(self, x))
    monkeypatch.setattr(fff.model.FFF, "forward_soft", lambda self, *a: modes.append("soft") or forward_soft(self, *a))
    monkeypatch.setattr(fff.sample, "time_per_batch", stub)
    rows = fff.sample.speed(fff.main.parse_args(["--speed", "--speed-depths", "1,3", "--leaf-width", "4", "--device",
                                                 "cpu", "--out-dir", str(tmp_path)]))
    assert [(r["depth"], r["batch"]) for r in rows] == [(1, 1), (1, 1024), (3, 1), (3, 1024)]
    assert modes == ["hard"] * 4
    for r in rows:
        d, l, I, O = r["depth"], 4, 784, 10
        assert r["fff_hard_multiply_adds"] == d * I + I * l + l * O
        assert r["ff_train_multiply_adds"] == I * l * 2 ** d + l * 2 ** d * O
        assert r["ff_infer_multiply_adds"] == I * l + l * O and r["training_width"] == l * 2 ** d
        assert r["fff_hard_us"] == 2.0 and r["ff_infer_us"] == 5.0 and r["ff_train_us"] == 40.0
        assert r["speedup_vs_ff_train"] == 20.0
    assert json.loads((tmp_path / "speed.json").read_text())["rows"] == rows


def test_the_speed_command_writes_nothing_on_stderr(tmp_path):
    """With a CUDA build of torch on a machine without CUDA, importing torch.utils.benchmark printed a
    warning on stderr; no fff command may (here the real timer runs, for one depth)."""
    r = subprocess.run([sys.executable, "fff/main.py", "--speed", "--speed-depths", "1", "--device", "cpu",
                        "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TQDM_DISABLE": "1"})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["fff_hard_multiply_adds"] for r in rows] == [784 + 784 * 32 + 320] * 2


def test_flags_reach_the_math_in_a_training_step(tmp_path, monkeypatch):
    """A real (short) FFF training with spies where the flags act: --region-leak reaches the soft forward
    of every training step (and not the evaluations), --hardening and --hardening-ramp the loss, whose
    h follows h min(1, progress / ramp)."""
    data = synthetic_mnist(tmp_path / "data", n_train=300, n_test=20)
    seen = {"leak": [], "h": []}
    forward_soft, loss = fff.model.FFF.forward_soft, fff.train.fff_loss

    def spy_soft(self, x, leak=0.0):
        seen["leak"].append((leak, self.training))
        return forward_soft(self, x, leak)

    monkeypatch.setattr(fff.model.FFF, "forward_soft", spy_soft)
    monkeypatch.setattr(fff.train, "fff_loss", lambda logits, y, H, h: seen["h"].append(h) or loss(logits, y, H, h))
    monkeypatch.setattr(fff.main, "sample", lambda args: None)                  # training only
    fff.main.main(run_args(data, tmp_path / "run", "--epochs", "2", "--models", "fff", "--region-leak", "0.3",
                           "--hardening", "2.5", "--hardening-ramp", "0.5"))
    steps = 2 * 2                                                               # 100 training images, batches of 50
    assert [leak for leak, training in seen["leak"] if training] == [0.3] * steps
    assert [leak for leak, training in seen["leak"] if not training] == [0.0] * 2   # one validation per epoch
    torch.testing.assert_close(seen["h"], [2.5 * min(1.0, s / steps / 0.5) for s in range(steps)])


@pytest.fixture
def one_line_error(capsys):
    """main(ARGS), in this process: it must stop with exactly one line (its exit message or stderr)."""
    def run(*args):
        capsys.readouterr()                                      # what earlier runs printed
        with pytest.raises(SystemExit) as e:
            fff.main.main([str(a) for a in args])
        assert e.value.code not in (0, None)
        text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
        assert len(text.strip().splitlines()) == 1, text
        return text
    return run


@pytest.mark.parametrize("args, says", [
    (["--depth", "0"], "depth 0: must be in 1..20"),
    (["--depth", "40"], "depth 40: must be in 1..20"),
    (["--depth", "18"], "needs 6,877,347,055 parameters, about 102 GiB of memory"),   # refused before allocating
    (["--speed", "--speed-depths", "3,19"], "depth 19 with --leaf-width 32 needs"),
    (["--models", "fff,moe"], "a comma-separated subset of fff,ff_train,ff_infer"),
])
def test_bad_flags_get_one_line(args, says, one_line_error):
    assert says in one_line_error(*args)


def test_missing_data_and_foreign_checkpoints_get_one_line(tmp_path, monkeypatch, one_line_error):
    monkeypatch.setattr(fff.data, "download", lambda dataset, root: "URLError: no network")
    with pytest.raises(SystemExit) as e:
        fff.main.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run")])
    assert "MNIST/raw/{train-images-idx3-ubyte,train-labels-idx1-ubyte}" in str(e.value.code)
    assert "--data-dir" in str(e.value.code)
    (tmp_path / "run").mkdir()
    torch.save({"folder": "vit"}, tmp_path / "run" / "ckpt_fff.pt")
    assert "is a checkpoint of vit, not of fff/" in one_line_error("--resume", "--out-dir", str(tmp_path / "run"))


def test_missing_data_without_torchvision_says_so_and_where_the_files_come_from(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)                      # `import torchvision` fails
    with pytest.raises(SystemExit) as e:
        fff.data.load_split(tmp_path, "mnist", "test")
    msg = str(e.value.code)
    assert "torchvision could not be imported" in msg and "nothing was downloaded" in msg, msg
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in msg and "../shared" not in msg
    assert f"{tmp_path}/MNIST/raw/" in msg and "\n" not in msg


# ---- --benchmark

@pytest.mark.parametrize("name", ["fff", "ff_train"])
def test_benchmark_prints_one_json_line_of_the_quick_config(name, tmp_path, capsys):
    fff.main.main(["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2", "--models", name,
                   "--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run")])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    I, l, O, d, B = 784, 32, 10, 3, 256                                          # the default sizes, batch 256
    n, L = 2 ** d - 1, 2 ** d
    if name == "fff":   # node neurons, leaves <I, l, O>; soft mode runs every leaf and mixes them by p (B, L)
        params = n * (I + 1) + L * (I * l + l + l * O + O)
        first, second = 2 * (I * n + I * L * l), 2 * (L * l * O + L * O)        # matmuls on x, then on h and p
    else:               # dense I -> l 2^d -> O
        params = I * l * L + l * L + l * L * O + O
        first, second = 2 * I * l * L, 2 * l * L * O
    assert (row["folder"], row["device"], row["data"], row["unit"], row["model"]) == ("fff", "cpu", "random", "images", name)
    assert row["params"] == params and row["batch_size"] == B and row["compile"] is False
    # training FLOPs per image: forward, then backward twice the forward except for the matmuls on the
    # pixels, whose input needs no gradient (once: the weights' gradient)
    assert row["flops_per_sample"] == 2 * first + 3 * second
    assert row["samples_per_s"] == pytest.approx(row["batch_size"] / (row["step_ms"] / 1000), rel=1e-6)
    assert row["tflops"] == pytest.approx(row["flops_per_sample"] * row["samples_per_s"] / 1e12, rel=1e-6)
    assert row["mfu"] is None and row["peak_mem_mb"] > 0
    assert not (tmp_path / "run").exists()                                      # nothing written


def test_benchmark_uses_the_real_images_when_they_are_there(tmp_path, capsys):
    data = synthetic_mnist(tmp_path / "data", n_train=400, n_test=20)
    fff.main.main(run_args(data, tmp_path / "run", "--benchmark", "--benchmark-steps", "1", "--device", "cpu"))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["data"] == "real" and row["batch_size"] == 50 and row["params"] == 2 ** 2 * (784 * 8 + 8 + 80 + 10) + 3 * 785
    assert not (tmp_path / "run").exists()


# ---- host-device synchronisation

@pytest.mark.parametrize("log_interval", [5, 20])
def test_twenty_steps_of_each_model_read_the_device_only_at_log_steps(log_interval, tmp_path, monkeypatch):
    """One epoch of 20 steps for each of the three models on the CPU with CUDA's schedule (divergence read
    at log steps only): each model's loop reads a tensor on the host once per log step and once at the
    end of its epoch (the divergence flag); none per step."""
    monkeypatch.setattr(fff.main, "sample", lambda args: None)
    monkeypatch.setattr(fff.train, "checks_every_step", lambda device: False)
    calls = count_syncs(monkeypatch, fff.train, "fff")
    data = synthetic_mnist(tmp_path / "data", n_train=400, n_test=10)
    fff.main.main(run_args(data, tmp_path / "run", "--epochs", "1", "--train-size", "200", "--batch-size", "10",
                           "--log-interval", str(log_interval), "--device", "cpu"))
    assert calls and len(calls) <= 3 * (20 // log_interval + 1), calls        # the spies see them: not zero


def test_uint8_pixels_are_standardised_per_batch_exactly_as_the_cpu_standardises_them_once():
    """On a GPU the training pixels stay uint8 and each batch is standardised; on the CPU the set is
    standardised once. Both give the batch (x / 255 - mean) / std, bit for bit."""
    g = torch.Generator().manual_seed(0)
    pixels, y = torch.randint(0, 256, (30, 784), dtype=torch.uint8, generator=g), torch.arange(30) % 10
    args = fff.main.parse_args(["--batch-size", "8", "--device", "cpu"])
    order = torch.randperm(30, generator=g)
    x_gpu, y_gpu = fff.train.get_batch(pixels, y, order, 1, args)                              # as on a GPU
    x_cpu, y_cpu = fff.train.get_batch(fff.train.training_pixels(pixels, "mnist"), y, order, 1, args)
    expected = (pixels[order[8:16]].float() / 255 - 0.1307) / 0.3081
    assert torch.equal(x_gpu, expected) and torch.equal(x_cpu, expected) and torch.equal(y_gpu, y[order[8:16]])


# ---- the shipped weights (pretrained/fff/)

@pytest.mark.parametrize("name", ["fff", "ff_train", "ff_infer"])
def test_the_shipped_weights_load_into_todays_models_and_reproduce_their_check(name):
    """The weights in pretrained/fff/ load into the model code as it is now and give, on the JSON's fixed
    random inputs, the outputs recorded at export: a model change that forgets to re-export fails here."""
    import safetensors.torch
    model, meta = fff.pretrained.load_model(name, "cpu")
    check = meta["check"]
    x = torch.randn(*check["shape"], generator=torch.Generator().manual_seed(check["seed"]))
    with torch.no_grad():
        logits, _ = model(x, mode="soft")
    assert logits.sum().item() == pytest.approx(check["logits_sum"], rel=1e-3, abs=1e-3)
    assert logits.abs().sum().item() == pytest.approx(check["logits_abs_sum"], rel=1e-3)
    assert logits.argmax(-1).tolist() == check["argmax"]
    w = safetensors.torch.load_file(ROOT / "pretrained" / "fff" / f"{name}.safetensors")
    if name == "fff":   # the leaf reached is Algorithm 1's FORWARD_I on the file's tensors, written out
        assert model.route(x).tolist() == check["leaves"] == [forward_i(model, xi) for xi in x]
        assert model(x, mode="hard")[0].sum().item() == pytest.approx(check["hard_logits_sum"], rel=1e-3, abs=1e-3)
    else:               # a dense layer: W2 relu(W1 x + b1) + b2 from the file's tensors
        ref = torch.relu(x @ w["fc1.weight"].T + w["fc1.bias"]) @ w["fc2.weight"].T + w["fc2.bias"]
        torch.testing.assert_close(logits, ref)
    assert meta["config"] == {"in_dim": 784, "leaf_width": 32, "out_dim": 10, "depth": 3}


def test_a_tampered_shipped_file_is_refused_in_one_line_naming_it(tmp_path, monkeypatch):
    """A flipped byte in a shipped file, or a file missing from pretrained/SHA256SUMS: one line naming
    the file, before anything is loaded."""
    pretrained = shipped_copy("fff", tmp_path)
    monkeypatch.setattr(fff.pretrained, "ROOT", pretrained)
    flip_bit(pretrained / "fff" / "fff.safetensors")
    argv = ["--sample-only", "--pretrained", "--device", "cpu", "--out-dir", str(tmp_path / "run"),
            "--data-dir", str(tmp_path / "nothing")]
    with pytest.raises(SystemExit) as e:
        fff.main.main(argv)
    assert str(e.value.code) == ("fff: pretrained/fff/fff.safetensors does not match pretrained/SHA256SUMS; "
                                 "restore it with git checkout")
    unlist(pretrained, "fff/fff.json")
    with pytest.raises(SystemExit) as e:
        fff.main.main(argv)
    assert "pretrained/fff/fff.json does not match pretrained/SHA256SUMS" in str(e.value.code)
    assert not (tmp_path / "run").exists()


def test_pretrained_without_sample_only_fine_tunes_from_the_shipped_weights(tmp_path, monkeypatch, one_line_error):
    """--pretrained on a training command starts each model from its shipped weights (not from the seed's
    initialisation), at epoch 0; size flags that disagree with the shipped models are refused."""
    import safetensors.torch
    data = synthetic_mnist(tmp_path / "data", n_train=300, n_test=20)
    seen, train_epoch = {}, fff.train.train_epoch

    def spy(epoch, name, model, *a, **kw):
        seen.setdefault((name, epoch), {k: v.clone() for k, v in model.state_dict().items()})
        return train_epoch(epoch, name, model, *a, **kw)
    monkeypatch.setattr(fff.train, "train_epoch", spy)
    monkeypatch.setattr(fff.main, "sample", lambda args: None)
    fff.main.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), "--val-size", "100",
                   "--pretrained", "--epochs", "1", "--models", "fff", "--device", "cpu"])
    shipped = safetensors.torch.load_file(ROOT / "pretrained" / "fff" / "fff.safetensors")
    assert list(seen) == [("fff", 0)] and all(torch.equal(seen["fff", 0][k], v) for k, v in shipped.items())
    assert "leave out --depth" in one_line_error("--pretrained", "--depth", "2", "--out-dir", str(tmp_path / "r2"))
