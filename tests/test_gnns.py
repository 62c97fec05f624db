"""gnns/: sparse = dense, GCN by hand, GAT written out node by node, the readout per graph,
attention sums, permutation symmetry, pixel graphs and batching, isolated nodes and empty graphs,
the speed table's counts, the flags at their call sites, learning, exact resume, errors."""
import json
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, count_syncs, flip_bit, import_folder, shipped_copy, unlist, write_idx
from torch.utils.flop_counter import FlopCounterMode

gnns = import_folder("gnns")
GNN, GNNConfig = gnns.model.GNN, gnns.model.GNNConfig


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: with two threads on a busy 2-core machine, the hand-offs between them
    cost several times the arithmetic. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_graphs(sizes, p=0.3, d=5, seed=0):
    """A disjoint batch of random directed graphs with the given node counts (0 allowed)."""
    g = torch.Generator().manual_seed(seed)
    x, edges, batch, offset = [], [], [], 0
    for k, n in enumerate(sizes):
        x.append(torch.randn(n, d, generator=g))
        a = (torch.rand(n, n, generator=g) < p) & ~torch.eye(n, dtype=torch.bool)
        i, j = a.nonzero(as_tuple=True)
        edges.append(torch.stack([j, i]) + offset)
        batch.append(torch.full((n,), k))
        offset += n
    return torch.cat(x), torch.cat(edges, 1), torch.cat(batch), len(sizes)


@pytest.mark.parametrize("model", ["gcn", "gat"])
def test_sparse_and_dense_layers_and_models_agree_on_random_graphs(model):
    torch.manual_seed(0)
    x, edge_index, batch, G = random_graphs([7, 1, 12, 4])     # the 1-node graph is an isolated node
    net = GNN(GNNConfig(model=model, in_dim=5, hidden=16, layers=3, heads=4)).eval()
    layer = net.convs[0]
    h = torch.randn(len(x), 16)
    sparse, _ = layer(h, edge_index)
    H, adj, mask = gnns.model.to_dense(h, edge_index, batch, G)
    dense, _ = layer.forward_dense(H, adj)
    torch.testing.assert_close(dense[mask], sparse)
    torch.testing.assert_close(net(x, edge_index, batch, G, dense=True), net(x, edge_index, batch, G))


def test_gcn_layer_on_a_three_node_path_matches_the_hand_computation():
    # 0 - 1 - 2: with self-loops the degrees are 2, 3, 2, so D^-1/2 (A + I) D^-1/2 is
    s6 = 1 / math.sqrt(6)
    A_hat = torch.tensor([[1 / 2, s6, 0], [s6, 1 / 3, s6], [0, s6, 1 / 2]])
    edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    layer = gnns.model.GCNLayer(3, 3)
    with torch.no_grad():
        layer.W.weight.copy_(torch.eye(3))                      # H' = A_hat H with H = I gives A_hat itself
    out, _ = layer(torch.eye(3), edge_index)
    torch.testing.assert_close(out, A_hat)
    H, adj, _ = gnns.model.to_dense(torch.eye(3), edge_index, torch.zeros(3, dtype=torch.long), 1)
    torch.testing.assert_close(layer.forward_dense(H, adj)[0][0], A_hat)
    torch.manual_seed(0)                                        # and eq. 2 in full: A_hat H W + b
    layer, h = gnns.model.GCNLayer(4, 5), torch.randn(3, 4)
    torch.nn.init.normal_(layer.b)
    torch.testing.assert_close(layer(h, edge_index)[0], A_hat @ h @ layer.W.weight.T + layer.b)


def test_gat_layer_is_equations_1_to_5_written_out_node_by_node():
    """Velickovic et al.: for each node i and head k, e_ij = LeakyReLU_0.2(a_k^T [W_k h_i || W_k h_j])
    for j in N(i) + {i}, alpha_ij = softmax over j, h_i' = ||_k sum_j alpha_ij W_k h_j (+ b)."""
    torch.manual_seed(0)
    x, edge_index, _, _ = random_graphs([6, 1], d=5)           # node 6 is isolated
    layer = gnns.model.GATLayer(5, 8, heads=2)
    torch.nn.init.normal_(layer.b)
    Wh = layer.W(x).reshape(len(x), 2, 4)                       # W_k h, (N, K, F)
    expected = torch.zeros(len(x), 8)
    for i in range(len(x)):
        N_i = [i] + edge_index[0, edge_index[1] == i].tolist()  # messages j -> i, and i itself
        for k in range(2):
            a = torch.cat([layer.a_dst[k], layer.a_src[k]])     # a_k, split as [for W h_i ; for W h_j]
            e = torch.stack([F.leaky_relu(a @ torch.cat([Wh[i, k], Wh[j, k]]), 0.2) for j in N_i])
            alpha = torch.softmax(e, 0)
            expected[i, 4 * k:4 * k + 4] = sum(alpha[n] * Wh[j, k] for n, j in enumerate(N_i))
    torch.testing.assert_close(layer(x, edge_index)[0], expected + layer.b)


def test_readout_is_the_mean_and_the_max_over_each_graphs_nodes():
    torch.manual_seed(0)
    x, edge_index, batch, G = random_graphs([4, 0, 7])          # graph 1 is empty
    net = GNN(GNNConfig(model="gcn", in_dim=5, hidden=8, layers=2)).eval()
    net.head = torch.nn.Identity()                              # the readout itself: [mean || max]
    h, _ = net.blocks(net.encoder(x), lambda layer, h: layer(h, edge_index))
    expected = torch.stack([torch.cat([h[batch == g].mean(0), h[batch == g].amax(0)]) if (batch == g).any()
                            else torch.zeros(16) for g in range(G)])
    torch.testing.assert_close(net(x, edge_index, batch, G), expected)
    torch.testing.assert_close(net(x, edge_index, batch, G, dense=True), expected)


def test_gat_attention_over_each_neighbourhood_sums_to_one():
    torch.manual_seed(0)
    x, edge_index, batch, G = random_graphs([9, 1, 5], d=8)
    layer = gnns.model.GATLayer(8, 8, heads=2)
    _, (edges, alpha) = layer(x, edge_index)
    assert alpha.shape == (edges.shape[1], 2) and (alpha > 0).all()
    sums = torch.zeros(len(x), 2).index_add_(0, edges[1], alpha)
    torch.testing.assert_close(sums, torch.ones(len(x), 2))
    assert alpha[(edges[1] == 9) & (edges[0] == 9)].eq(1).all()  # the isolated node attends only to itself
    H, adj, _ = gnns.model.to_dense(x, edge_index, batch, G)
    _, dense_alpha = layer.forward_dense(H, adj)
    torch.testing.assert_close(dense_alpha.sum(-1), torch.ones(G, 2, 9))
    assert (dense_alpha[adj[:, None].expand_as(dense_alpha) == 0] == 0).all()  # no weight off the graph


@pytest.mark.parametrize("model", ["gcn", "gat"])
def test_node_outputs_are_permutation_equivariant_and_the_pooled_output_invariant(model):
    torch.manual_seed(0)
    x, edge_index, batch, G = random_graphs([10, 6])
    net = GNN(GNNConfig(model=model, in_dim=5, hidden=16, layers=2, heads=2)).eval()
    perm = torch.randperm(len(x))                               # new node k is old node perm[k]
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(x))
    x_p, edge_index_p, batch_p = x[perm], inverse[edge_index], batch[perm]
    h, _ = net.blocks(net.encoder(x), lambda layer, h: layer(h, edge_index))
    h_p, _ = net.blocks(net.encoder(x_p), lambda layer, h: layer(h, edge_index_p))
    torch.testing.assert_close(h_p, h[perm])
    torch.testing.assert_close(net(x_p, edge_index_p, batch_p, G), net(x, edge_index, batch, G))


def test_isolated_nodes_and_empty_graphs_give_finite_outputs():
    torch.manual_seed(0)
    x, edge_index, batch, G = random_graphs([0, 1, 4, 0], p=0.0)  # no edges at all, two empty graphs
    for model in ("gcn", "gat"):
        net = GNN(GNNConfig(model=model, in_dim=5, hidden=8, layers=2, heads=2)).eval()
        sparse = net(x, edge_index, batch, G)
        assert sparse.shape == (4, 10) and torch.isfinite(sparse).all()
        torch.testing.assert_close(net(x, edge_index, batch, G, dense=True), sparse)
        torch.testing.assert_close(sparse[0], sparse[3])        # an empty graph pools to zeros
    loss = torch.nn.functional.cross_entropy(sparse, torch.arange(4))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_pixel_graph_of_a_small_image_by_hand():
    image = torch.tensor([[[0, 10, 0], [20, 30, 0], [0, 0, 40]]], dtype=torch.uint8)
    g = gnns.data.build_graphs(image, torch.tensor([3]), "drop")
    b = g.batch(torch.tensor([0]))
    # nodes in row-major order: (r0,c1)=10, (r1,c0)=20, (r1,c1)=30, (r2,c2)=40; features intensity, x, y
    torch.testing.assert_close(b.x, torch.tensor([[10, 1, 0], [20, 0, 1], [30, 1, 1], [40, 2, 2]]) /
                               torch.tensor([255.0, 2, 2]))
    pairs = {(j, i) for j, i in b.edge_index.t().tolist()}
    undirected = {(0, 1), (0, 2), (1, 2), (2, 3)}                 # 8-neighbours among the kept pixels
    assert pairs == undirected | {(i, j) for j, i in undirected}
    keep = gnns.data.build_graphs(image, torch.tensor([3]), "keep")
    assert keep.node_ptr[-1] == 9 and keep.edge_ptr[-1] == 2 * (2 * 3 * 2 + 2 * 2 * 2)  # 3x3 grid, 8-neighbour


def test_batching_offsets_each_graph_and_matches_graphs_built_one_by_one():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 3, (6, 5, 5)) * 100).to(torch.uint8)
    images[2] = 0                                               # an empty graph in the middle
    labels = torch.arange(6)
    graphs = gnns.data.build_graphs(images, labels)
    idx = torch.tensor([4, 2, 0, 5])
    b = graphs.batch(idx)
    assert b.num_graphs == 4 and torch.equal(b.y, labels[idx])
    start = 0
    for k, i in enumerate(idx.tolist()):
        one = gnns.data.build_graphs(images[i:i + 1], labels[i:i + 1]).batch(torch.tensor([0]))
        n = len(one.x)
        assert torch.equal(b.batch == k, torch.arange(len(b.x)).ge(start) & torch.arange(len(b.x)).lt(start + n))
        torch.testing.assert_close(b.x[start:start + n], one.x)
        mine = b.edge_index[:, b.batch[b.edge_index[1]] == k] - start
        assert sorted(map(tuple, mine.t().tolist())) == sorted(map(tuple, one.edge_index.t().tolist()))
        start += n
    sub = gnns.data.subset(graphs, torch.tensor([1, 3]))
    torch.testing.assert_close(sub.batch(torch.tensor([1])).x, graphs.batch(torch.tensor([3])).x)


def synthetic_mnist(root, n_train=600, n_test=100, seed=0):
    """Four classes of 28x28 images: a bar at the top, bottom, left or right, plus dropped pixels."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    templates = np.zeros((4, 28, 28))
    templates[0, 3:7, 4:24] = templates[1, 21:25, 4:24] = 1    # horizontal bars
    templates[2, 4:24, 3:7] = templates[3, 4:24, 21:25] = 1    # vertical bars
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 4, n)
        images = templates[labels] * rng.integers(150, 256, (n, 1, 1)) * (rng.random((n, 28, 28)) < 0.9)
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def run_args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--cache-dir", str(out_dir.parent / "cache"),
            "--device", "cpu", "--hidden", "16", "--layers", "2", "--heads", "2", "--val-size", "100",
            "--batch-size", "50", "--lr", "1e-2", *extra]


@pytest.mark.parametrize("model", ["gcn", "gat"])
def test_the_loss_falls_and_the_pipeline_writes_its_figures(tmp_path, model):
    data = synthetic_mnist(tmp_path / "data")
    out = tmp_path / "runs" / model
    gnns.main.main(run_args(data, out, "--model", model, "--epochs", "6"))
    rows = (out / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    loss = [float(r.split(",")[header.index("train_loss")]) for r in rows[1:]]
    assert len(loss) == 6 and loss[-1] < 0.5 * loss[0], loss
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_acc"] > 0.9 and metrics["model"] == model, metrics
    for name in (f"{model}_graph", "curves"):
        assert (out / f"gnns_mnist_{name}.png").stat().st_size > 0


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gnns.main, "sample", lambda args: None)  # the weights are compared, not the figures
    data = synthetic_mnist(tmp_path / "data", n_train=300)
    random = ["--model", "gat", "--epochs", "3", "--dropout", "0.1"]  # batch order and dropout replayed
    gnns.main.main(run_args(data, tmp_path / "straight", *random))

    calls = []
    evaluate = gnns.train.evaluate

    def interrupted_in_epoch_2(*a, **kw):  # Ctrl-C after epoch 2's training, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **kw)

    monkeypatch.setattr(gnns.train, "evaluate", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        gnns.main.main(run_args(data, tmp_path / "resumed", *random))
    assert e.value.code == 130
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(gnns.train, "evaluate", evaluate)
    gnns.main.main(["--resume", "--out-dir", str(tmp_path / "resumed"), "--data-dir", str(data),
                    "--cache-dir", str(tmp_path / "cache")])

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0)
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 4  # header + 3 epochs, no duplicate


def test_the_speed_table_counts_the_grid_edges_and_its_two_implementations_agree(tmp_path, monkeypatch):
    """What the table computes, with a stub timer of known answers (no timing is asserted): all pixels
    kept, a side x side digit is a graph of side^2 nodes and 4 s (s - 1) + 4 (s - 1)^2 directed
    8-neighbour edges; dense and sparse logits agree; ratios and epochs follow from the times."""
    data = synthetic_mnist(tmp_path / "data", n_train=20, n_test=10)
    monkeypatch.setattr(gnns.sample, "time_steps", lambda model, b, device, dense, steps: 0.012 if dense else 0.004)
    gnns.main.main(["--speed", "--data-dir", str(data), "--out-dir", str(tmp_path / "speed"), "--device", "cpu",
                    "--speed-sides", "4,8", "--speed-batch", "4", "--hidden", "8"])
    rows = json.loads((tmp_path / "speed" / "speed.json").read_text())["rows"]
    assert [(r["model"], r["nodes"]) for r in rows] == [("gcn", 16), ("gat", 16), ("gcn", 64), ("gat", 64)]
    for r in rows:
        s = math.isqrt(r["nodes"])
        assert r["edges_per_graph"] == 4 * s * (s - 1) + 4 * (s - 1) ** 2 and r["batch"] == 4
        assert r["max_logit_difference"] < 1e-4
        assert (r["sparse_ms"], r["dense_ms"], r["dense_over_sparse"]) == (4.0, 12.0, 3.0)
        assert (r["sparse_epoch_s"], r["dense_epoch_s"]) == (55, 165)             # 0.004 s x 55,000 / 4


def test_flags_reach_the_math_in_a_training_step(tmp_path, monkeypatch):
    """A real (short) GAT training with spies where the flags act: --heads reaches the attention
    softmax (K scores per edge), --dropout every dropout of a training step, --weight-decay AdamW,
    --grad-clip the clipping (the gradient then has that norm)."""
    data = synthetic_mnist(tmp_path / "data", n_train=300, n_test=20)
    seen = {"heads": [], "dropout": [], "clip": [], "opt": []}
    softmax, dropout, clip = gnns.model.segment_softmax, F.dropout, torch.nn.utils.clip_grad_norm_

    class SpyAdamW(torch.optim.AdamW):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["opt"].append(self)

    def spy_clip(params, max_norm, **kw):
        params = list(params)
        norm = clip(params, max_norm, **kw)
        seen["clip"].append((max_norm, norm, torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        return norm

    monkeypatch.setattr(gnns.model, "segment_softmax", lambda e, i, n: seen["heads"].append(e.shape[1]) or softmax(e, i, n))
    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, training=True, inplace=False:
                        seen["dropout"].append((p, training)) or dropout(x, p, training, inplace))
    monkeypatch.setattr(gnns.train.torch.optim, "AdamW", SpyAdamW)
    monkeypatch.setattr(gnns.train.torch.nn.utils, "clip_grad_norm_", spy_clip)
    monkeypatch.setattr(gnns.main, "sample", lambda args: None)                 # training only
    gnns.main.main(run_args(data, tmp_path / "runs" / "gat", "--model", "gat", "--epochs", "1", "--hidden", "16",
                            "--heads", "4", "--dropout", "0.3", "--weight-decay", "0.05", "--grad-clip", "0.01"))
    steps, layers = 200 // 50, 2
    assert seen["heads"][:steps * layers] == [4] * (steps * layers)               # training, then validation
    in_training = [p for p, training in seen["dropout"] if training]
    assert len(in_training) == steps * (layers + 1) and set(in_training) == {0.3}  # each block, and the head
    (opt,) = seen["opt"]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05]
    assert len(seen["clip"]) == steps
    for max_norm, norm, after in seen["clip"]:
        assert max_norm == 0.01 and norm > 0.01 and abs(after - 0.01) < 1e-4


def test_the_memory_estimate_counts_the_parameters_of_the_model_it_refuses(monkeypatch):
    for flags in (["--model", "gcn"], ["--model", "gat"], ["--model", "gat", "--hidden", "24", "--layers", "3",
                                                             "--heads", "3"]):
        args = gnns.main.parse_args(["--device", "cpu", *flags])
        params, need = gnns.main.memory_needed(args)
        assert params == GNN(gnns.train.model_config(args)).num_params() and need > 16 * params
    monkeypatch.setattr(gnns.main, "device_memory", lambda device: 2 ** 30)    # a 1 GiB device
    with pytest.raises(SystemExit):
        gnns.main.parse_args(["--device", "cpu", "--hidden", "2048"])           # ~17M parameters, big activations


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_a_non_finite_loss_or_gradient_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, what):
    data = synthetic_mnist(tmp_path / "data", n_train=300)
    out = tmp_path / "runs" / "gcn"
    gnns.main.main(run_args(data, out, "--epochs", "1"))
    before = (out / "ckpt.pt").read_bytes()
    if what == "loss":
        cross_entropy = gnns.train.F.cross_entropy
        monkeypatch.setattr(gnns.train.F, "cross_entropy", lambda *a, **kw: cross_entropy(*a, **kw) * float("nan"))
    else:  # a finite loss whose gradient overflows: clipping would turn it into NaN weights
        monkeypatch.setattr(gnns.train.torch.nn.utils, "clip_grad_norm_", lambda *a, **kw: torch.tensor(float("inf")))
    with pytest.raises(SystemExit) as e:
        gnns.main.main(["--resume", "--epochs", "2", "--out-dir", str(out), "--data-dir", str(data),
                        "--cache-dir", str(tmp_path / "runs" / "cache")])
    msg = str(e.value.code)
    assert ("non-finite (loss nan" if what == "loss" else "gradient norm inf) at step 4") in msg, msg
    assert "at step 4" in msg and "last good checkpoint" in msg
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.fixture
def one_line_error(capsys):
    """main(ARGS), in this process: it must stop with exactly one line (its exit message or stderr)."""
    def run(*args):
        capsys.readouterr()                                      # what earlier runs printed
        with pytest.raises(SystemExit) as e:
            gnns.main.main([str(a) for a in args])
        assert e.value.code not in (0, None)
        text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
        assert len(text.strip().splitlines()) == 1, text
        return text
    return run


@pytest.mark.parametrize("args, says", [
    (["--model", "gin"], "argument --model: invalid choice: 'gin' (choose from"),
    (["--model", "gat", "--hidden", "30", "--heads", "4"], "--hidden 30 is not divisible by --heads 4"),
    (["--speed-sides", "7,40"], "each side must be in [2, 28]"),
])
def test_bad_flags_get_one_line(args, says, one_line_error):
    assert says in one_line_error(*args)


def test_missing_data_names_the_files_and_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(gnns.data, "download", lambda dataset, root: "URLError: no network")
    with pytest.raises(SystemExit) as e:
        gnns.main.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"),
                        "--cache-dir", str(tmp_path / "cache")])
    msg = str(e.value.code)
    assert "MNIST/raw/{train-images-idx3-ubyte,train-labels-idx1-ubyte}" in msg
    assert "--data-dir" in msg and "no network" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_checkpoints_of_another_folder_or_model_are_refused(tmp_path, monkeypatch, one_line_error):
    monkeypatch.setattr(gnns.main, "sample", lambda args: None)
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=20)
    out = tmp_path / "runs" / "gcn"
    gnns.main.main(run_args(data, out, "--epochs", "1"))
    assert "holds a gcn run" in one_line_error("--resume", "--out-dir", str(out), "--model", "gat")
    assert "holds another model" in one_line_error("--resume", "--out-dir", str(out), "--data-dir", str(data),
                                                   "--cache-dir", str(tmp_path / "runs" / "cache"), "--hidden", "32")
    assert "exists; pass --resume" in one_line_error(*run_args(data, out))
    torch.save({"folder": "vit"}, out / "ckpt.pt")
    assert "is a checkpoint of vit, not of gnns/" in one_line_error("--resume", "--out-dir", str(out))


def test_missing_data_without_torchvision_says_so_and_where_the_files_come_from(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)                      # `import torchvision` fails
    with pytest.raises(SystemExit) as e:
        gnns.data.load_images(tmp_path, "mnist", "train")
    msg = str(e.value.code)
    assert "torchvision could not be imported" in msg and "nothing was downloaded" in msg, msg
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/" in msg and "../shared" not in msg
    assert f"{tmp_path}/MNIST/raw/" in msg and "\n" not in msg


# ---- --benchmark

def gnn_params(model, H, L, classes=10):
    """Encoder 3 -> H; per layer W (H x H), b, LayerNorm, and for GAT a_dst, a_src; head 2H -> H -> classes."""
    per_layer = H * H + H + 2 * H + (2 * H if model == "gat" else 0)
    return (3 * H + H) + L * per_layer + (2 * H * H + H) + (H * classes + classes)


def matmul_flops(H, L, n, classes=10):
    """Training matmul FLOPs per graph of n nodes: encoder (backward: the weights' gradient only, the pixel
    features need none), L transforms H x H per node, the head per graph (backward twice the forward)."""
    return 2 * (2 * n * 3 * H) + 3 * (2 * n * L * H * H + 2 * (2 * H * H + H * classes))


def test_benchmark_prints_one_json_line_of_the_quick_config(tmp_path, capsys):
    gnns.main.main(["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2", "--data-dir",
                    str(tmp_path / "nothing"), "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path / "run")])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row["folder"], row["device"], row["data"], row["unit"], row["model"]) == ("gnns", "cpu", "random", "graphs", "gcn")
    assert row["params"] == gnn_params("gcn", 32, 2) and row["batch_size"] == 64 and row["compile"] is False
    assert 100 < row["nodes_per_graph"] < 200                                   # blob images: about a digit's ink
    assert row["flops_per_sample"] == pytest.approx(matmul_flops(32, 2, row["nodes_per_graph"]), rel=1e-9)
    assert row["samples_per_s"] == pytest.approx(row["batch_size"] / (row["step_ms"] / 1000), rel=1e-6)
    assert row["tflops"] == pytest.approx(row["flops_per_sample"] * row["samples_per_s"] / 1e12, rel=1e-6)
    assert row["mfu"] is None and row["peak_mem_mb"] > 0
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()   # nothing written


@pytest.mark.parametrize("model", ["gcn", "gat"])
def test_the_benchmarks_flop_formula_is_what_flop_counter_mode_counts(model):
    x, edge_index, batch, G = random_graphs([5, 9, 0, 7], d=3)
    torch.manual_seed(0)
    cfg = GNNConfig(model=model, hidden=8, layers=3, heads=2)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(GNN(cfg)(x, edge_index, batch, G), torch.tensor([1, 2, 3, 4])).backward()
    assert gnns.train.training_flops(cfg, len(x) / G) * G == counter.get_total_flops() == matmul_flops(8, 3, len(x) / G) * G


def test_benchmark_draws_real_training_graphs_and_writes_no_cache(tmp_path, capsys):
    data = synthetic_mnist(tmp_path / "data")
    gnns.main.main(run_args(data, tmp_path / "run", "--benchmark", "--benchmark-steps", "1", "--model", "gat"))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["data"] == "real" and row["batch_size"] == 50 and row["params"] == gnn_params("gat", 16, 2)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_a_cache_built_from_other_images_is_rebuilt_not_used(tmp_path):
    """The cache records the images file it came from: a cache left by other digits (another --data-dir,
    a test's synthetic ones) in the same --cache-dir is not used for these."""
    args = [SimpleNamespace(data_dir=synthetic_mnist(tmp_path / name, n_train=30, n_test=10, seed=seed), dataset="mnist",
                            background="drop", cache_dir=tmp_path / "cache") for name, seed in (("a", 0), ("b", 1))]
    a = gnns.data.load_graphs(args[0], "test")
    b = gnns.data.load_graphs(args[1], "test")                                  # same cache file, other images
    images, labels = gnns.data.load_images(args[1].data_dir, "mnist", "test")
    expected = gnns.data.build_graphs(images, labels)
    assert torch.equal(b.y, labels) and torch.equal(b.nodes, expected.nodes) and not torch.equal(a.y, b.y)
    assert torch.equal(gnns.data.cached_graphs(args[1], "test").nodes, expected.nodes)   # and the cache now holds b
    assert gnns.data.cached_graphs(args[0], "test") is None


# ---- host-device synchronisation

@pytest.mark.parametrize("model, log_interval", [("gcn", 10), ("gat", 20)])
def test_twenty_steps_read_the_device_only_at_log_steps(model, log_interval, tmp_path, monkeypatch):
    """One epoch of 20 steps on the CPU with CUDA's schedule (divergence read at log steps only): the loop
    reads a tensor on the host twice per log step (the divergence flag, the loss for the progress bar),
    and per epoch the batches' offsets (two lists, read once) and the divergence flag at the end."""
    monkeypatch.setattr(gnns.main, "sample", lambda args: None)
    monkeypatch.setattr(gnns.train, "checks_every_step", lambda device: False)
    calls = count_syncs(monkeypatch, gnns.train, "gnns")
    data = synthetic_mnist(tmp_path / "data", n_train=300, n_test=10)
    gnns.main.main(run_args(data, tmp_path / "runs" / model, "--model", model, "--epochs", "1", "--train-size", "200",
                            "--batch-size", "10", "--log-interval", str(log_interval)))
    assert calls and len(calls) <= 2 * (20 // log_interval) + 3, calls        # the spies see them: not zero


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_an_epochs_batches_are_the_graphs_of_its_order_batched_one_by_one(chunk):
    images = gnns.data.random_images(23, torch.Generator().manual_seed(0))
    graphs = gnns.data.build_graphs(images, torch.arange(23) % 10)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1))
    batches = gnns.data.Batches(graphs, order, 5, chunk)                         # 4 batches of 5, one of 3
    assert len(batches) == 5
    for s in range(5):
        a, b = batches.batch(s), graphs.batch(order[5 * s:5 * s + 5])
        assert a.num_graphs == b.num_graphs == (3 if s == 4 else 5)
        for t, u in ((a.x, b.x), (a.edge_index, b.edge_index), (a.batch, b.batch), (a.y, b.y)):
            assert torch.equal(t, u)


# ---- the shipped weights (pretrained/gnns/)

@pytest.mark.parametrize("name", ["gcn", "gat"])
def test_the_shipped_weights_load_into_todays_model_and_reproduce_their_check(name):
    """The weights in pretrained/gnns/ load into the model code as it is now and give, on the JSON's
    fixed random pixel graphs, the logits recorded at export (the dense implementation too): a model
    change that forgets to re-export fails here."""
    model, meta = gnns.pretrained.load_model(name, "cpu")
    check = meta["check"]
    images = gnns.data.random_images(check["graphs"], torch.Generator().manual_seed(check["seed"]))
    b = gnns.data.build_graphs(images, torch.zeros(len(images), dtype=torch.long), check["background"]).batch(
        torch.arange(len(images)))
    with torch.no_grad():
        for dense in (False, True):
            logits = model(b.x, b.edge_index, b.batch, b.num_graphs, dense=dense)
            assert logits.sum().item() == pytest.approx(check["logits_sum"], rel=1e-3, abs=1e-3)
            assert logits.abs().sum().item() == pytest.approx(check["logits_abs_sum"], rel=1e-3)
            assert logits.argmax(-1).tolist() == check["argmax"]
    assert model.cfg.model == name and model.num_params() < 30_000
    images, labels = gnns.pretrained.decode_examples(meta)
    assert images.shape == (8, 28, 28) and images.dtype == torch.uint8 and len(labels) == 8


def test_a_tampered_shipped_file_is_refused_in_one_line_naming_it(tmp_path, monkeypatch):
    """A flipped byte in a shipped file, or a file missing from pretrained/SHA256SUMS: one line naming
    the file, before anything is loaded or written."""
    pretrained = shipped_copy("gnns", tmp_path)
    monkeypatch.setattr(gnns.pretrained, "ROOT", pretrained)
    flip_bit(pretrained / "gnns" / "gcn.safetensors")
    argv = ["--sample-only", "--pretrained", "--model", "gcn", "--device", "cpu",
            "--out-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nothing")]
    with pytest.raises(SystemExit) as e:
        gnns.main.main(argv)
    assert str(e.value.code) == ("gnns: pretrained/gnns/gcn.safetensors does not match pretrained/SHA256SUMS; "
                                 "restore it with git checkout")
    unlist(pretrained, "gnns/gcn.json")
    with pytest.raises(SystemExit) as e:
        gnns.main.main(argv)
    assert "pretrained/gnns/gcn.json does not match pretrained/SHA256SUMS" in str(e.value.code)
    assert not (tmp_path / "run").exists()


def test_pretrained_without_sample_only_fine_tunes_from_the_shipped_weights(tmp_path, monkeypatch):
    """--pretrained on a training command starts from the shipped weights (not from the seed's
    initialisation), at epoch 0, with the shipped model's sizes."""
    import safetensors.torch
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=10)
    seen, train_epoch = [], gnns.train.train_epoch

    def spy(epoch, model, *a, **kw):
        seen.append((epoch, {k: v.clone() for k, v in model.state_dict().items()}))
        return train_epoch(epoch, model, *a, **kw)
    monkeypatch.setattr(gnns.train, "train_epoch", spy)
    monkeypatch.setattr(gnns.main, "sample", lambda args: None)
    out = tmp_path / "run"
    gnns.main.main(["--data-dir", str(data), "--out-dir", str(out), "--cache-dir", str(tmp_path / "cache"),
                    "--device", "cpu", "--val-size", "100", "--batch-size", "50", "--epochs", "1",
                    "--pretrained", "--model", "gcn"])
    shipped = safetensors.torch.load_file(ROOT / "pretrained" / "gnns" / "gcn.safetensors")
    (epoch, state), = seen
    assert epoch == 0 and all(torch.equal(state[k], v) for k, v in shipped.items())
