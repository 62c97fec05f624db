"""vit/: patches, attention, permutation equivariance, rollout, learning, exact resume, clear errors."""
import json

import numpy as np
import pytest
import torch
from conftest import cli_error_line, import_folder, write_idx

vit = import_folder("vit")


def tiny(**kw):
    cfg = dict(image_size=8, channels=1, patch_size=2, dim=16, depth=2, heads=4, mlp_dim=32)
    model = vit.model.ViT(vit.model.ViTConfig(**{**cfg, **kw}))
    torch.nn.init.normal_(model.head[-1].weight)  # zero at init (as in the paper's code): make logits informative
    return model


@pytest.mark.parametrize("P, C", [(1, 1), (4, 1), (7, 3), (28, 2)])
def test_patchify_then_unpatchify_returns_the_image(P, C):
    x = torch.randn(2, C, 28, 28)
    x_p = vit.model.patchify(x, P)
    assert x_p.shape == (2, (28 // P) ** 2, P * P * C)
    # patch 1 is the top-left P x P square, patch 2 the one to its right (row-major order)
    torch.testing.assert_close(x_p[:, 0], x[:, :, :P, :P].permute(0, 2, 3, 1).reshape(2, -1))
    if P < 28:
        torch.testing.assert_close(x_p[:, 1], x[:, :, :P, P:2 * P].permute(0, 2, 3, 1).reshape(2, -1))
    assert torch.equal(vit.model.unpatchify(x_p, P, C), x)


def test_attention_rows_sum_to_one():
    torch.manual_seed(0)
    model = tiny()
    _, attentions = model(torch.randn(3, 1, 8, 8), return_attention=True)
    assert len(attentions) == 2
    for A in attentions:
        assert A.shape == (3, 4, 17, 17)  # (B, k, N+1, N+1)
        assert (A >= 0).all()
        torch.testing.assert_close(A.sum(-1), torch.ones(3, 4, 17))


def test_multi_head_self_attention_matches_torch():
    """Equations 5-8 against torch.nn.MultiheadAttention with the same weights."""
    torch.manual_seed(0)
    cfg = vit.model.ViTConfig(image_size=8, patch_size=2, dim=16, heads=4)
    msa = vit.model.MultiHeadSelfAttention(cfg)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(msa.U_qkv.weight)
        ref.in_proj_bias.copy_(msa.U_qkv.bias)
        ref.out_proj.weight.copy_(msa.U_msa.weight)
        ref.out_proj.bias.copy_(msa.U_msa.bias)
    z = torch.randn(2, 17, 16)
    out, A = msa(z)
    ref_out, ref_A = ref(z, z, z, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(A, ref_A)


def test_without_position_embeddings_the_encoder_is_permutation_equivariant_over_patches():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 1, 8, 8)
    perm = torch.randperm(16)
    x_perm = vit.model.unpatchify(vit.model.patchify(x, 2)[:, perm], 2, 1)  # the same patches, shuffled

    def outputs(m):
        z_L, _ = m.encode(m.embed(x))
        z_L_perm, _ = m.encode(m.embed(x_perm))
        return z_L, z_L_perm, m(x), m(x_perm)

    z_L, z_L_perm, logits, logits_perm = outputs(model)
    assert not torch.allclose(logits, logits_perm, atol=1e-4)  # positions make the order matter...
    with torch.no_grad():
        model.E_pos.zero_()                                      # ...without them it does not:
    z_L, z_L_perm, logits, logits_perm = outputs(model)
    torch.testing.assert_close(z_L_perm[:, 1:], z_L[:, 1:][:, perm])  # patch tokens permute with the input
    torch.testing.assert_close(z_L_perm[:, 0], z_L[:, 0])             # the class token does not move
    torch.testing.assert_close(logits_perm, logits)


def test_attention_rollout_of_one_layer_is_the_head_mean_mixed_with_the_residual():
    torch.manual_seed(0)
    A = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)  # (B, k, N+1, N+1): one layer, 3 heads, 4 patches
    # rows of mean(A) + I sum to 2, so rollout = (mean_k A + I) / 2; the class token's row, patches only
    expected = (A.mean(1) + torch.eye(5))[:, 0, 1:] / 2
    torch.testing.assert_close(vit.model.attention_rollout([A]), expected)
    two = vit.model.attention_rollout([A, A])
    torch.testing.assert_close(two, (((A.mean(1) + torch.eye(5)) / 2) @ ((A.mean(1) + torch.eye(5)) / 2))[:, 0, 1:])


def test_random_crop_shifts_each_image_within_the_padding():
    images = torch.zeros(50, 8, 8, dtype=torch.uint8)
    images[:, 3, 4] = 255
    shifted = vit.data.random_crop(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    pos = (shifted == 255).nonzero()[:, 1:]  # one bright pixel per image, moved by at most 2 each way
    assert len(pos) == 50 and ((pos - torch.tensor([3, 4])).abs() <= 2).all()
    assert len({tuple(p) for p in pos.tolist()}) > 5  # offsets differ between images


def synthetic_mnist(root, n_train=700, n_test=200, seed=0):
    """Ten classes of 28x28 images: class c is a fixed random binary pattern, plus noise. (Every
    patch carries the class, as strokes do in digits; a class told only by position would need the
    position embeddings learned first, which takes a ViT far more steps.)"""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    templates = rng.integers(0, 2, (10, 28, 28))
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = templates[labels] * 180 + rng.integers(0, 75, (n, 28, 28))
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def run_args(data_dir, out_dir, *extra):
    return ["--data-dir", str(data_dir), "--out-dir", str(out_dir), "--device", "cpu", "--patch-size", "7",
            "--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64", "--val-size", "100",
            "--batch-size", "50", "--lr", "3e-3", "--warmup-epochs", "0.5", "--num-examples", "4", "--crop-padding", "0",
            *extra]


def test_idx_reader_returns_what_was_written(tmp_path):
    synthetic_mnist(tmp_path, n_train=30, n_test=10)
    images, labels = vit.data.load_split(tmp_path, "mnist", "test")
    assert images.shape == (10, 28, 28) and images.dtype == torch.uint8 and labels.shape == (10,)
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10


def test_the_loss_falls_and_the_pipeline_writes_its_figures(tmp_path):
    data = synthetic_mnist(tmp_path / "data")
    out = tmp_path / "run"
    vit.main.main(run_args(data, out, "--epochs", "8"))
    rows = (out / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    loss = [float(r.split(",")[header.index("train_loss")]) for r in rows[1:]]
    assert len(loss) == 8 and loss[-1] < 0.5 * loss[0], loss
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_acc"] > 0.9, metrics
    for name in ("attention", "confusion", "curve"):
        assert (out / f"vit_mnist_{name}.png").stat().st_size > 0


def test_resume_after_an_interruption_matches_the_uninterrupted_run(tmp_path, monkeypatch):
    data = synthetic_mnist(tmp_path / "data", n_train=400)
    random = ["--epochs", "3", "--crop-padding", "2", "--dropout", "0.1"]  # crops and dropout replayed too
    vit.main.main(run_args(data, tmp_path / "straight", *random))

    calls = []
    evaluate = vit.train.evaluate

    def interrupted_in_epoch_2(*a, **kw):  # Ctrl-C after epoch 2's training, before its checkpoint
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **kw)

    monkeypatch.setattr(vit.train, "evaluate", interrupted_in_epoch_2)
    with pytest.raises(SystemExit) as e:
        vit.main.main(run_args(data, tmp_path / "resumed", *random))
    assert e.value.code == 130
    assert torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(vit.train, "evaluate", evaluate)
    vit.main.main(["--resume", "--out-dir", str(tmp_path / "resumed"), "--data-dir", str(data)])

    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert b["epoch"] == 3
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=0)
    assert (tmp_path / "resumed" / "log.csv").read_text().count("\n") == 4  # header + 3 epochs, no duplicate


def one_line_error(*args):
    return cli_error_line("vit", *args)


@pytest.mark.parametrize("args, says", [
    (["--patch-size", "5"], "does not divide the 28x28 images; choose 1, 2, 4, 7, 14, 28"),
    (["--dim", "30", "--heads", "4"], "--dim 30 is not divisible by --heads 4"),
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
])
def test_bad_flags_get_one_line(args, says):
    assert says in one_line_error(*args)


def test_missing_data_names_the_files_and_the_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vit.data, "download", lambda dataset, root: "URLError: no network")
    with pytest.raises(SystemExit) as e:
        vit.main.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), "--dataset", "fashion"])
    msg = str(e.value.code)
    assert "FashionMNIST/raw/{train-images-idx3-ubyte,train-labels-idx1-ubyte}" in msg
    assert "--data-dir" in msg and "no network" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_checkpoints_of_another_folder_or_dataset_are_refused(tmp_path):
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=20)
    out = tmp_path / "run"
    vit.main.main(run_args(data, out, "--epochs", "1", "--batch-size", "20"))
    assert "holds a mnist run" in one_line_error("--resume", "--out-dir", str(out), "--dataset", "fashion")
    assert "holds another model" in one_line_error("--resume", "--out-dir", str(out), "--data-dir", str(data),
                                                   "--dim", "48")
    assert "exists; pass --resume" in one_line_error(*run_args(data, out))
    torch.save({"folder": "gpt"}, out / "ckpt.pt")
    assert "is a checkpoint of gpt, not of vit/" in one_line_error("--resume", "--out-dir", str(out))
