"""vit/: patches, attention and the whole encoder against written-out references, rollout, label
smoothing, augmentation, the flags at their call sites, learning, exact resume, clear errors."""
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, count_syncs, import_folder, write_idx

vit = import_folder("vit")


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: with two threads on a busy 2-core machine, the hand-offs between them
    cost several times the arithmetic. Restored after each test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def test_patch_embedding_is_an_unfold_then_E_with_the_class_token_and_positions_added():
    """Eq. 1, written out with F.unfold: patches in row-major order, each flattened as (row, column,
    channel) (the paper's reshape of H x W x C), projected by E; the class token first; E_pos added."""
    torch.manual_seed(0)
    model = tiny(image_size=8, channels=3, patch_size=4).eval()
    with torch.no_grad():
        model.x_class.normal_()                                   # zero at init: make it visible
    x = torch.randn(2, 3, 8, 8)
    cols = F.unfold(x, kernel_size=4, stride=4)                   # (B, C*P*P, N), channel-major, patches row-major
    x_p = cols.reshape(2, 3, 16, 4).permute(0, 3, 2, 1).reshape(2, 4, 48)   # (B, N, P*P*C), (row, col, channel)
    torch.testing.assert_close(vit.model.patchify(x, 4), x_p)
    z0 = torch.cat([model.x_class.expand(2, 1, 16), x_p @ model.E.weight.T + model.E.bias], 1) + model.E_pos
    torch.testing.assert_close(model.embed(x), z0)
    x2 = x.clone()
    x2[:, :, :4, :4] += 1                                         # only the first patch changes:
    changed = (model.embed(x2) - model.embed(x)).abs().amax(-1)[0]
    assert changed[1] > 0 and changed[[0, 2, 3, 4]].eq(0).all()   # the class token and the other patches keep


def test_the_hybrid_cuts_the_patches_from_a_two_conv_gelu_stems_feature_map():
    """Section 3.1's hybrid written out: two 3x3 convolutions (padding 1, full resolution) C -> S -> S, each
    followed by GELU; the (B, S, H, W) map cut by hand into P x P patches in row-major order, each flattened
    as (row, column, channel) like the pixels' patches; then E in R^{(P^2 S) x D}, the class token, E_pos."""
    torch.manual_seed(0)
    B, C, S, P, D = 3, 2, 5, 4, 16
    model = tiny(image_size=8, channels=C, patch_size=P, stem_channels=S).eval()
    conv1, conv2 = (m for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        for t in (model.x_class, conv1.bias, conv2.bias):
            t.normal_()                                           # zero at init: make them visible
    x = torch.randn(B, C, 8, 8)
    f = F.gelu(F.conv2d(F.gelu(F.conv2d(x, conv1.weight, conv1.bias, padding=1)), conv2.weight, conv2.bias, padding=1))
    assert conv1.weight.shape == (S, C, 3, 3) and conv2.weight.shape == (S, S, 3, 3) and f.shape == (B, S, 8, 8)
    x_p = f.reshape(B, S, 2, P, 2, P).permute(0, 2, 4, 3, 5, 1).reshape(B, 4, P * P * S)   # (B, N, P*P*S)
    z0 = torch.cat([model.x_class.expand(B, 1, D), x_p @ model.E.weight.T + model.E.bias], 1) + model.E_pos
    torch.testing.assert_close(model.embed(x), z0)
    x2 = x.clone()
    x2[:, :, 3, 3] += 1                         # a pixel at the first patch's corner reaches, through two 3x3
    changed = (model.embed(x2) - model.embed(x)).abs().amax(-1)[0]   # convolutions, all 4 patches (not the class token)
    assert changed[[1, 2, 3, 4]].gt(0).all() and changed[0] == 0


def test_the_stem_is_kaiming_normal_with_zero_biases():
    """He et al. (2015) with ReLU's gain: std sqrt(2 / fan_in), fan_in = 9 C_in (PyTorch's default would
    give 1 / sqrt(3 fan_in), about 0.4 of it), biases zero."""
    torch.manual_seed(0)
    model = vit.model.ViT(vit.model.ViTConfig(stem_channels=32, dim=32, depth=1, heads=2, mlp_dim=32))
    for conv, fan_in, tol in zip((m for m in model.stem.modules() if isinstance(m, torch.nn.Conv2d)), (9, 288), (0.2, 0.05)):
        assert abs(conv.weight.std().item() / math.sqrt(2 / fan_in) - 1) < tol and abs(conv.weight.mean()) < 0.1
        assert conv.bias.eq(0).all()


def test_weight_decay_reaches_the_stems_kernels_and_the_matrices_only():
    """AdamW's decayed group: the stem's two 3x3 kernels and the Linear weights; not the biases, LayerNorms,
    class token or E_pos."""
    import argparse
    model = tiny(stem_channels=3)
    decay, no_decay = vit.train.configure_optimizer(model, argparse.Namespace(weight_decay=0.1, lr=1e-3)).param_groups
    named = dict(model.named_parameters())
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {"stem.0.weight", "stem.2.weight"} | linear
    assert {id(named[n]) for n in expected} == {id(p) for p in decay["params"]} and decay["weight_decay"] == 0.1
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in named.items() if n not in expected}


def test_without_a_stem_the_model_has_exactly_the_parameters_it_had_before_the_hybrid():
    """--stem-channels 0 (the default) adds nothing: the names, order and shapes of the state dict written
    out as the code before the hybrid (304a5b0) gave them, so its checkpoints and shipped weights load; with
    S > 0 only the two convolutions (no normalisation layer, no buffers) are added and E widens to P^2 S."""
    D, M = 16, 32
    block = [("ln1.weight", (D,)), ("ln1.bias", (D,)), ("msa.U_qkv.weight", (3 * D, D)), ("msa.U_qkv.bias", (3 * D,)),
             ("msa.U_msa.weight", (D, D)), ("msa.U_msa.bias", (D,)), ("ln2.weight", (D,)), ("ln2.bias", (D,)),
             ("mlp.fc1.weight", (M, D)), ("mlp.fc1.bias", (M,)), ("mlp.fc2.weight", (D, M)), ("mlp.fc2.bias", (D,))]
    rest = ([(f"blocks.{i}.{n}", s) for i in range(2) for n, s in block]
            + [("ln.weight", (D,)), ("ln.bias", (D,)), ("head.0.weight", (D, D)), ("head.0.bias", (D,)),
               ("head.2.weight", (10, D)), ("head.2.bias", (10,))])
    before = [("x_class", (1, 1, D)), ("E_pos", (1, 17, D)), ("E.weight", (D, 4)), ("E.bias", (D,)), *rest]
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]
    assert shapes(tiny()) == shapes(tiny(stem_channels=0)) == before       # P = 2, C = 1: E in R^{4 x D}
    hybrid = [("x_class", (1, 1, D)), ("E_pos", (1, 17, D)), ("stem.0.weight", (6, 1, 3, 3)), ("stem.0.bias", (6,)),
              ("stem.2.weight", (6, 6, 3, 3)), ("stem.2.bias", (6,)), ("E.weight", (D, 4 * 6)), ("E.bias", (D,)), *rest]
    assert shapes(tiny(stem_channels=6)) == hybrid


def heads_of(msa, z):
    """q, k, v (B, k, T, D_h) from U_qkv's output laid out as [q | k | v], each [head 1 | head 2 | ...]."""
    B, T, D = z.shape
    qkv = (z @ msa.U_qkv.weight.T + msa.U_qkv.bias).reshape(B, T, 3, msa.heads, D // msa.heads)
    return qkv.permute(2, 0, 3, 1, 4)


def test_attention_is_scaled_dot_product_attention_with_scale_one_over_sqrt_D_h():
    """App. A eqs. 5-8 against F.scaled_dot_product_attention with the scale written out: 1/sqrt(D_h),
    D_h = D/k (with k = 4 heads a 1/sqrt(D) would be off by 2)."""
    torch.manual_seed(0)
    msa = vit.model.MultiHeadSelfAttention(vit.model.ViTConfig(image_size=8, patch_size=2, dim=16, heads=4))
    z = torch.randn(2, 17, 16)
    q, k, v = heads_of(msa, z)
    scale = 1 / math.sqrt(16 / 4)
    sa = F.scaled_dot_product_attention(q, k, v, scale=scale)     # (B, k, T, D_h)
    out, A = msa(z)
    torch.testing.assert_close(out, sa.transpose(1, 2).reshape(2, 17, 16) @ msa.U_msa.weight.T + msa.U_msa.bias)
    torch.testing.assert_close(A, torch.softmax(q @ k.transpose(-2, -1) * scale, -1))


def reference_logits(model, x):
    """Eqs. 1-4 written out with torch.nn.functional: pre-LN blocks, residuals, GELU MLP,
    y = LN(z_L^0), then the head (Linear, tanh, Linear)."""
    z = model.embed(x)                                            # eq. 1 (checked above)
    for blk in model.blocks:
        h = F.layer_norm(z, (z.shape[-1],), blk.ln1.weight, blk.ln1.bias)
        q, k, v = heads_of(blk.msa, h)
        sa = F.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5).transpose(1, 2).flatten(2)
        z = F.linear(sa, blk.msa.U_msa.weight, blk.msa.U_msa.bias) + z                       # eq. 2
        h = F.layer_norm(z, (z.shape[-1],), blk.ln2.weight, blk.ln2.bias)
        z = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight,
                     blk.mlp.fc2.bias) + z                                                   # eq. 3
    y = F.layer_norm(z[:, 0], (z.shape[-1],), model.ln.weight, model.ln.bias)               # eq. 4
    return F.linear(torch.tanh(F.linear(y, model.head[0].weight, model.head[0].bias)), model.head[2].weight,
                    model.head[2].bias)


def test_the_vit_is_equations_1_to_4_written_out():
    torch.manual_seed(0)
    model = tiny(depth=3).eval()
    for ln in [model.ln] + [m for b in model.blocks for m in (b.ln1, b.ln2)]:
        torch.nn.init.normal_(ln.weight)                          # (1, 0) at init: make a swapped LN visible
        torch.nn.init.normal_(ln.bias)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model(x), reference_logits(model, x))


def test_initialisation_follows_the_authors_code():
    """Xavier-uniform Linear weights (|w| <= sqrt(6 / (fan_in + fan_out)), and spread over that range),
    zero biases, the classifier and the class token zero, E_pos ~ N(0, 0.02)."""
    torch.manual_seed(0)
    model = vit.model.ViT(vit.model.ViTConfig(dim=64, depth=2, heads=4, mlp_dim=128))
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert m.bias.eq(0).all(), name
            if m is not model.head[-1]:
                bound = math.sqrt(6 / sum(m.weight.shape))
                assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
    assert model.head[-1].weight.eq(0).all() and model.x_class.eq(0).all()
    assert abs(model.E_pos.std().item() - 0.02) < 0.002 and abs(model.E_pos.mean().item()) < 0.002


def rollout_by_hand(maps):
    """Abnar & Zuidema (2020): A_hat = (A + I) / rowsum per layer (heads averaged first), and
    R = A_hat_L ... A_hat_2 A_hat_1: each layer mixes what the layers below it had mixed."""
    R = None
    for A in maps:                                                # layer order, (B, k, T, T)
        A_hat = A.mean(1) + torch.eye(A.shape[-1])
        A_hat = A_hat / A_hat.sum(-1, keepdim=True)
        R = A_hat if R is None else torch.einsum("bij,bjk->bik", A_hat, R)
    return R[:, 0, 1:]


def test_attention_rollout_is_the_product_of_the_residual_mixed_maps_in_layer_order():
    # A hand-worked case: a class token and two patches, one head, two layers with different maps.
    A1 = torch.tensor([[0., 1, 0], [0, 1, 0], [0, 0, 1]])[None, None]   # layer 1: class token reads patch 1
    A2 = torch.tensor([[0., 0, 1], [1, 0, 0], [0, 1, 0]])[None, None]   # layer 2: class token reads patch 2
    # A_hat = (A + I) / 2; row 0 of A_hat_2 A_hat_1 = 0.5 * [.5, .5, 0] + 0.5 * [0, 0, 1] = [.25, .25, .5]
    torch.testing.assert_close(vit.model.attention_rollout([A1, A2]), torch.tensor([[0.25, 0.5]]))
    # the other order (A_hat_1 A_hat_2) would give [.25, .25]: the test can tell the order
    torch.testing.assert_close(vit.model.attention_rollout([A2, A1]), torch.tensor([[0.25, 0.25]]))
    torch.manual_seed(0)
    maps = [torch.softmax(3 * torch.randn(2, 3, 5, 5), -1) for _ in range(3)]   # 3 layers, 3 heads, 4 patches
    torch.testing.assert_close(vit.model.attention_rollout(maps), rollout_by_hand(maps))


def test_label_smoothed_cross_entropy_is_the_formula():
    """Szegedy et al. (2016): target (1 - eps) one-hot + eps / K uniform, so
    L = (1 - eps) (-log p_y) + eps mean_k (-log p_k)."""
    torch.manual_seed(0)
    logits, y, eps = torch.randn(6, 10), torch.randint(0, 10, (6,)), 0.2
    log_p = logits.log_softmax(-1)
    expected = ((1 - eps) * -log_p[torch.arange(6), y] + eps * -log_p.mean(-1)).mean()
    torch.testing.assert_close(vit.train.smoothed_cross_entropy(logits, y, eps), expected)


def test_random_crop_is_the_padded_image_cut_at_a_random_offset():
    images = torch.randint(1, 256, (20, 6, 6), dtype=torch.uint8)           # no black pixel: padding shows
    shifted = vit.data.random_crop(images, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    padded = F.pad(images, (2, 2, 2, 2))                                     # (20, 10, 10), black border
    offsets = []
    for b in range(20):                                                      # exactly one window of the padded image
        found = [(i, j) for i in range(5) for j in range(5) if torch.equal(shifted[b], padded[b, i:i + 6, j:j + 6])]
        assert len(found) == 1, found
        offsets += found
    assert len(set(offsets)) > 5                                             # offsets differ between images
    assert {i for i, _ in offsets} >= {0, 4} or {j for _, j in offsets} >= {0, 4}   # up to the full padding
    torch.testing.assert_close(vit.data.random_crop(images, 2, torch.Generator().manual_seed(0)), shifted)


def within(count, n, p):
    """|count - n p| inside six standard deviations of a binomial count (plus one for p in {0, 1})."""
    return abs(count - n * p) <= 6 * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_hflip_is_torch_flip_on_exactly_the_chosen_images(p):
    n = 3000
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = vit.data.random_hflip(images, p, torch.Generator().manual_seed(1))
    chosen = (out != images).flatten(1).any(1)              # a random image is (almost surely) not its own mirror
    assert torch.equal(out[chosen], torch.flip(images[chosen], [-1]))
    assert torch.equal(out[~chosen], images[~chosen])       # the others untouched, bit for bit
    assert within(chosen.sum().item(), n, p), chosen.sum()


def erased_rectangles(images, p, seed):
    """Random Erasing of `images` and of their negatives with the same generator seed (its draws do not
    depend on the pixels): a pixel of I_e keeps its value in at most one of the two (v != 255 - v), so
    the erased pixels are exactly those changed in either. -> (outputs, erased-pixel masks (n, H, W))"""
    out = vit.data.random_erasing(images, p, torch.Generator().manual_seed(seed))
    out_neg = vit.data.random_erasing(255 - images, p, torch.Generator().manual_seed(seed))
    mask = (out != images) | (out_neg != 255 - images)
    assert torch.equal(out[mask], out_neg[mask])                             # the same fill in both
    return out, mask


@pytest.mark.parametrize("p", [0.0, 0.25, 1.0])
def test_random_erasing_fills_one_rectangle_of_the_papers_area_and_aspect_per_erased_image(p):
    """Zhong et al. 2020, Alg. 1: with probability p per image, one axis-aligned rectangle inside the
    image, S_e / S in [0.02, 0.4], H_e / W_e in [0.3, 1 / 0.3], of random values; the rest bit-identical."""
    n, H, W = 3000, 28, 28
    images = torch.randint(0, 256, (n, H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out, mask = erased_rectangles(images, p, seed=1)
    torch.testing.assert_close(out[~mask], images[~mask], rtol=0, atol=0)   # outside I_e: untouched
    erased = mask.flatten(1).any(1)
    # Alg. 1 redraws until I_e fits; here at most TRIES times: an image none fits (~0.7^TRIES) stays
    assert within(erased.sum().item(), n, p * (1 - 0.7 ** vit.data.TRIES)), erased.sum()
    rows, cols = mask.any(2), mask.any(1)                                    # (n, H), (n, W)
    assert torch.equal(mask, rows[:, :, None] & cols[:, None, :])            # the changed pixels fill a box...
    h, w = rows.sum(1)[erased], cols.sum(1)[erased]
    first_row, first_col = rows.int().argmax(1)[erased], cols.int().argmax(1)[erased]
    last_row = H - 1 - rows.flip(1).int().argmax(1)[erased]
    last_col = W - 1 - cols.flip(1).int().argmax(1)[erased]
    assert torch.equal(last_row - first_row + 1, h) and torch.equal(last_col - first_col + 1, w)  # ...one box
    area = (h * w).double() / (H * W)
    assert ((0.02 <= area) & (area <= 0.4)).all() and ((3 * w <= 10 * h) & (3 * h <= 10 * w)).all()
    if p == 0.25:                                            # the ranges are used, and the whole image
        aspect = h.double() / w
        assert area.min() < 0.04 and area.max() > 0.3 and aspect.min() < 0.4 and aspect.max() > 2.5
        assert (first_row == 0).any() and (last_row == H - 1).any() and (first_col == 0).any() and (last_col == W - 1).any()
    fill = out[mask].long()                                  # random values over [0, 255], about uniform
    if p:
        assert fill.min() < 5 and fill.max() > 250 and abs(fill.double().mean() - 127.5) < 3


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


def test_flags_reach_the_math_in_a_training_step(tmp_path, monkeypatch):
    """One real training run (two steps) with spies where the flags act: --label-smoothing reaches the
    loss (and the loss is the formula), --grad-clip the clipping (the gradient then has that norm),
    --weight-decay AdamW's matrices only, --crop-padding the augmentation, --dropout the model."""
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=10)
    seen = {"loss": [], "clip": [], "crop": [], "opt": [], "hflip": [], "erasing": []}
    loss_fn, clip, crop, configure = (vit.train.smoothed_cross_entropy, torch.nn.utils.clip_grad_norm_,
                                      vit.train.random_crop, vit.train.configure_optimizer)

    def spy_loss(logits, y, epsilon):
        seen["loss"].append((logits.detach(), y, epsilon, loss_fn(logits, y, epsilon)))
        return seen["loss"][-1][-1]

    def spy_clip(params, max_norm, **kw):
        params = list(params)
        norm = clip(params, max_norm, **kw)
        seen["clip"].append((max_norm, norm, torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))))
        return norm

    def spy_configure(model, args):
        seen["opt"].append((model, configure(model, args)))
        return seen["opt"][-1][1]

    monkeypatch.setattr(vit.train, "smoothed_cross_entropy", spy_loss)
    monkeypatch.setattr(vit.train.torch.nn.utils, "clip_grad_norm_", spy_clip)
    monkeypatch.setattr(vit.train, "random_crop", lambda x, padding, g: seen["crop"].append(padding) or crop(x, padding, g))
    monkeypatch.setattr(vit.train, "configure_optimizer", spy_configure)
    hflip, erasing = vit.train.random_hflip, vit.train.random_erasing
    monkeypatch.setattr(vit.train, "random_hflip", lambda x, p, g: seen["hflip"].append(p) or hflip(x, p, g))
    monkeypatch.setattr(vit.train, "random_erasing", lambda x, p, g: seen["erasing"].append(p) or erasing(x, p, g))
    monkeypatch.setattr(vit.main, "sample", lambda args: None)                 # training only
    vit.main.main(run_args(data, tmp_path / "run", "--epochs", "1", "--train-size", "100", "--label-smoothing", "0.3",
                           "--grad-clip", "0.01", "--weight-decay", "0.7", "--crop-padding", "3", "--dropout", "0.2",
                           "--hflip", "0.4", "--random-erasing", "0.6"))
    assert len(seen["loss"]) == 2 and seen["crop"] == [3, 3] and seen["hflip"] == [0.4, 0.4]
    assert seen["erasing"] == [0.6, 0.6]
    for logits, y, eps, loss in seen["loss"]:
        log_p = logits.log_softmax(-1)
        assert eps == 0.3
        torch.testing.assert_close(loss, (0.7 * -log_p[torch.arange(len(y)), y] - 0.3 * log_p.mean(-1)).mean())
    for max_norm, norm, after in seen["clip"]:
        assert max_norm == 0.01 and norm > 0.01 and abs(after - 0.01) < 1e-4     # clipped to --grad-clip
    (model, opt), = seen["opt"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.7 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.ndim == 2}
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(p == 0.2 for p in dropouts)


def test_the_memory_estimate_counts_the_parameters_of_the_model_it_refuses(monkeypatch):
    for flags in ([], ["--patch-size", "7", "--dim", "32", "--depth", "3", "--heads", "2", "--mlp-dim", "40"],
                  ["--stem-channels", "32"], ["--stem-channels", "1", "--patch-size", "2", "--dim", "24", "--heads", "3"],
                  ["--stem-channels", "7", "--patch-size", "14", "--dim", "40", "--depth", "2", "--mlp-dim", "16"]):
        args = vit.main.parse_args(["--device", "cpu", *flags])
        cfg = vit.model.ViTConfig(patch_size=args.patch_size, dim=args.dim, depth=args.depth, heads=args.heads,
                                  mlp_dim=args.mlp_dim, stem_channels=args.stem_channels)
        params, need = vit.main.memory_needed(args)
        assert params == vit.model.ViT(cfg).num_params() and need > 16 * params
    monkeypatch.setattr(vit.main, "device_memory", lambda device: 2 ** 30)     # a 1 GiB device
    with pytest.raises(SystemExit):
        vit.main.parse_args(["--device", "cpu", "--dim", "1024", "--depth", "12"])   # ~150M parameters


def test_missing_data_without_torchvision_says_so_and_where_the_files_come_from(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)                      # `import torchvision` fails
    with pytest.raises(SystemExit) as e:
        vit.data.load_split(tmp_path, "fashion", "train")
    msg = str(e.value.code)
    assert "torchvision could not be imported" in msg and "nothing was downloaded" in msg, msg
    assert "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/" in msg and "../shared" not in msg
    assert f"{tmp_path}/FashionMNIST/raw/" in msg and "\n" not in msg


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
    monkeypatch.setattr(vit.main, "sample", lambda args: None)  # the weights are compared, not the figures
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


def test_ema_after_k_steps_is_the_closed_form_of_the_recorded_weights(tmp_path, monkeypatch):
    """--ema D over k optimiser steps with weights theta_0 (initial), theta_1, ..., theta_k: theta_ema_k =
    prod_i d_i theta_0 + sum_i (1 - d_i) prod_{j > i} d_j theta_i, with d_i = min(D, (1 + t) / (10 + t)) at
    step t = i - 1 (the warm-up; for D = 0.5 it binds for i <= 8 and D after). Validation scores the EMA."""
    monkeypatch.setattr(vit.main, "sample", lambda args: None)
    data = synthetic_mnist(tmp_path / "data", n_train=700, n_test=10)
    thetas, train_step = [], vit.train.train_step

    def recording(model, *a, **kw):
        thetas.extend([] if thetas else [{k: v.detach().double().clone() for k, v in model.state_dict().items()}])
        out = train_step(model, *a, **kw)
        thetas.append({k: v.detach().double().clone() for k, v in model.state_dict().items()})
        return out
    monkeypatch.setattr(vit.train, "train_step", recording)
    vit.main.main(run_args(data, tmp_path / "run", "--epochs", "2", "--train-size", "300", "--ema", "0.5",
                           "--crop-padding", "1"))                          # 6 steps an epoch: t runs across epochs
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    k = len(thetas) - 1
    assert k == 2 * 300 // 50
    d = [min(0.5, i / (9 + i)) for i in range(1, k + 1)]                    # d_i, i = 1..k
    for name, ema in ckpt["ema"].items():
        expected = math.prod(d) * thetas[0][name] + sum((1 - d[i - 1]) * math.prod(d[i:]) * thetas[i][name]
                                                        for i in range(1, k + 1))
        torch.testing.assert_close(ema.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ckpt["model"][name].double(), thetas[-1][name], rtol=0, atol=0)
    without_warmup = sum(0.5 ** (k - i + 1) * thetas[i]["E.weight"] for i in range(1, k + 1)) + 0.5 ** k * thetas[0]["E.weight"]
    assert not torch.allclose(ckpt["ema"]["E.weight"].double(), without_warmup, rtol=1e-5, atol=1e-6)
    model = vit.model.ViT(vit.model.ViTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["ema"])
    val_x, val_y = (t[-100:] for t in vit.data.load_split(data, "mnist", "train"))   # --val-size 100
    with torch.no_grad():
        acc = (model.eval()(vit.data.normalize(val_x, "mnist")).argmax(-1) == val_y).float().mean().item()
    assert ckpt["val_acc"] == pytest.approx(acc)


def test_two_epochs_equal_one_then_resume_with_flip_erasing_and_ema(tmp_path, monkeypatch):
    """The recipe options replay on --resume (their draws seeded by (seed, epoch), the EMA in the
    checkpoint), and sample.py and --export-pretrained use the EMA weights; the export names the
    machine of each part of a resumed run (here a second one for the resumed epoch)."""
    monkeypatch.setattr(vit.main, "sample", lambda args: None)
    data = synthetic_mnist(tmp_path / "data", n_train=300, n_test=20)
    recipe = ["--epochs", "2", "--crop-padding", "1", "--hflip", "0.5", "--random-erasing", "0.5", "--ema", "0.9"]
    vit.main.main(run_args(data, tmp_path / "straight", *recipe))
    calls, evaluate = [], vit.train.evaluate

    def interrupted_in_epoch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **kw)
    monkeypatch.setattr(vit.train, "evaluate", interrupted_in_epoch_2)
    with pytest.raises(SystemExit):
        vit.main.main(run_args(data, tmp_path / "resumed", *recipe))
    monkeypatch.setattr(vit.train, "evaluate", evaluate)
    monkeypatch.setattr(vit.train, "hardware", lambda: "machine B")
    vit.main.main(["--resume", "--out-dir", str(tmp_path / "resumed"), "--data-dir", str(data)])   # the run's flags
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in ("straight", "resumed"))
    assert b["epoch"] == 2 and b["args"]["random_erasing"] == 0.5
    for part in ("model", "ema"):
        for name in a[part]:
            torch.testing.assert_close(b[part][name], a[part][name], rtol=0, atol=0)
    assert not torch.equal(a["ema"]["E.weight"], a["model"]["E.weight"])
    args = vit.main.parse_args(["--sample-only", "--out-dir", str(tmp_path / "straight"), "--device", "cpu"])
    model = vit.sample.load_for_sampling(args, "cpu")[0]
    assert all(torch.equal(v, a["ema"][k]) for k, v in model.state_dict().items())
    monkeypatch.setattr(vit.pretrained, "ROOT", tmp_path / "pretrained")
    vit.main.main(["--export-pretrained", str(tmp_path / "straight"), "--data-dir", str(data)])
    import safetensors.torch
    shipped = safetensors.torch.load_file(tmp_path / "pretrained" / "vit" / "mnist.safetensors")
    assert all(torch.equal(v, a["ema"][k].half()) for k, v in shipped.items())
    here = vit.pretrained.hardware()
    assert a["hardware"] == [here] and b["hardware"] == [here, "machine B"]
    vit.main.main(["--export-pretrained", str(tmp_path / "resumed"), "--data-dir", str(data)])
    card = json.loads((tmp_path / "pretrained" / "vit" / "mnist.json").read_text())
    assert card["hardware"] == f"{here}; then machine B"


def test_a_hybrid_run_resumes_samples_and_exports_as_the_hybrid_and_older_checkpoints_as_raw_patches(
        tmp_path, monkeypatch, one_line_error):
    """--stem-channels travels with the checkpoint (--resume and --sample-only rebuild the stem without the
    flag typed), the exported JSON (--pretrained) and is refused when typed against it; a checkpoint written
    before the field existed (no stem_channels in its config or flags) resumes as the raw-patch ViT it was."""
    monkeypatch.setattr(vit.main, "sample", lambda args: None)
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=20)
    out = tmp_path / "hybrid"
    vit.main.main(run_args(data, out, "--epochs", "1", "--stem-channels", "4"))
    first = torch.load(out / "ckpt.pt", weights_only=True)
    assert first["config"]["stem_channels"] == 4 and first["model"]["stem.2.weight"].shape == (4, 4, 3, 3)
    vit.main.main(["--resume", "--epochs", "2", "--out-dir", str(out), "--data-dir", str(data)])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["config"] == first["config"]
    assert not torch.equal(ckpt["model"]["stem.0.weight"], first["model"]["stem.0.weight"])   # trained on
    args = vit.main.parse_args(["--sample-only", "--out-dir", str(out), "--device", "cpu"])
    model = vit.sample.load_for_sampling(args, "cpu")[0]
    assert model.cfg.stem_channels == 4 and all(torch.equal(v, ckpt["model"][k]) for k, v in model.state_dict().items())
    assert "holds another model" in one_line_error("--resume", "--epochs", "3", "--out-dir", out, "--data-dir", data,
                                                   "--stem-channels", "0")
    monkeypatch.setattr(vit.pretrained, "ROOT", tmp_path / "pretrained")
    vit.main.main(["--export-pretrained", str(out), "--data-dir", str(data)])
    shipped, meta = vit.pretrained.load_model("mnist", "cpu")
    assert meta["config"]["stem_channels"] == 4 and "--stem-channels 4" in meta["command"]
    assert vit.main.parse_args(["--pretrained", "--sample-only", "--device", "cpu"]).stem_channels == 4

    old = tmp_path / "old"                                        # a raw-patch run, made to look older
    vit.main.main(run_args(data, old, "--epochs", "1"))
    ckpt = torch.load(old / "ckpt.pt", weights_only=True)
    del ckpt["config"]["stem_channels"], ckpt["args"]["stem_channels"]
    torch.save(ckpt, old / "ckpt.pt")
    vit.main.main(["--resume", "--epochs", "2", "--out-dir", str(old), "--data-dir", str(data)])
    resumed = torch.load(old / "ckpt.pt", weights_only=True)
    assert resumed["epoch"] == 2 and resumed["config"]["stem_channels"] == 0 and "stem.0.weight" not in resumed["model"]


@pytest.fixture
def one_line_error(capsys):
    """main(ARGS), in this process: it must stop with exactly one line (its exit message or stderr)."""
    def run(*args):
        capsys.readouterr()                                      # what earlier runs printed
        with pytest.raises(SystemExit) as e:
            vit.main.main([str(a) for a in args])
        assert e.value.code not in (0, None)
        text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
        assert len(text.strip().splitlines()) == 1, text
        return text
    return run


@pytest.mark.parametrize("args, says", [
    (["--patch-size", "5"], "does not divide the 28x28 images; choose 1, 2, 4, 7, 14, 28"),
    (["--dim", "30", "--heads", "4"], "--dim 30 is not divisible by --heads 4"),
    (["--dataset", "cifar"], "invalid choice: 'cifar'"),
    (["--hflip", "1.5"], "--hflip: '1.5': must be >= 0 and <= 1"),
    (["--ema", "1"], "--ema 1 would keep the initial weights for ever; choose a decay below 1"),
    (["--stem-channels", "-1"], "--stem-channels: '-1': must be >= 0"),
    (["--stem-channels", "100000"], "--stem-channels 100000 --batch-size 128: 90,103,709,098 parameters need about"),
])
def test_bad_flags_get_one_line(args, says, one_line_error):
    assert says in one_line_error(*args)


def test_missing_data_names_the_files_and_the_data_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(vit.data, "download", lambda dataset, root: "URLError: no network")
    with pytest.raises(SystemExit) as e:
        vit.main.main(["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "run"), "--dataset", "fashion"])
    msg = str(e.value.code)
    assert "FashionMNIST/raw/{train-images-idx3-ubyte,train-labels-idx1-ubyte}" in msg
    assert "--data-dir" in msg and "no network" in msg and "\n" not in msg
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_checkpoints_of_another_folder_or_dataset_are_refused(tmp_path, monkeypatch, one_line_error):
    monkeypatch.setattr(vit.main, "sample", lambda args: None)
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=20)
    out = tmp_path / "run"
    vit.main.main(run_args(data, out, "--epochs", "1", "--batch-size", "20"))
    assert "holds a mnist run" in one_line_error("--resume", "--out-dir", str(out), "--dataset", "fashion")
    assert "holds another model" in one_line_error("--resume", "--out-dir", str(out), "--data-dir", str(data),
                                                   "--dim", "48")
    assert "exists; pass --resume" in one_line_error(*run_args(data, out))
    torch.save({"folder": "gpt"}, out / "ckpt.pt")
    assert "is a checkpoint of gpt, not of vit/" in one_line_error("--resume", "--out-dir", str(out))


# ---- --benchmark

def test_benchmark_prints_one_json_line_of_the_quick_config(tmp_path, capsys):
    vit.main.main(["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2",
                   "--data-dir", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run")])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # --quick: P = 7 on 28x28 (N = 16 patches, T = 17 tokens), D = 32, L = 3, MLP 64, batch 128, 10 classes
    P, N, T, D, L, M, B, K = 7, 16, 17, 32, 3, 64, 128, 10
    params = ((P * P + 1) * D + D + T * D                                       # E, x_class, E_pos
              + L * (2 * D + (3 * D * D + 3 * D) + (D * D + D) + 2 * D + (D * M + M) + (M * D + D))  # LN, qkv, msa, LN, MLP
              + 2 * D + (D * D + D) + (D * K + K))                              # final LN, head
    assert (row["folder"], row["device"], row["data"], row["unit"], row["compile"]) == ("vit", "cpu", "random", "images", False)
    assert row["params"] == params and row["batch_size"] == B and row["torch"] == torch.__version__
    # matmul FLOPs per image, forward: E, then per layer qkv, q k^T and A v (all heads), U_msa, MLP; the head
    forward = 2 * (N * P * P * D + L * (T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * M) + D * D + D * K)
    # backward twice the forward, except that E's input (pixels) needs no gradient
    assert row["flops_per_sample"] == 3 * forward - 2 * N * P * P * D
    assert row["samples_per_s"] == pytest.approx(row["batch_size"] / (row["step_ms"] / 1000), rel=1e-6)
    assert row["tflops"] == pytest.approx(row["flops_per_sample"] * row["samples_per_s"] / 1e12, rel=1e-6)
    assert row["mfu"] is None and row["peak_mem_mb"] > 0
    assert not (tmp_path / "run").exists()                                      # nothing written


def test_benchmark_flops_count_the_stems_convolutions():
    """With --stem-channels S the FLOPs per image add the two 3x3 convolutions at full resolution (2 H W S 9 C_in
    forward; backward twice that, except the first's, whose input (pixels) needs no gradient) and E's wider
    input, which now needs its gradient."""
    import argparse
    P, N, T, D, L, M, K, S, HW = 7, 16, 17, 32, 3, 64, 10, 8, 28 * 28
    cfg = vit.model.ViTConfig(patch_size=P, dim=D, depth=L, heads=4, mlp_dim=M, stem_channels=S)
    encoder_and_head = 2 * (L * (T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * M) + D * D + D * K)
    E, conv1, conv2 = 2 * N * P * P * S * D, 2 * HW * S * 9, 2 * HW * S * S * 9
    flops = vit.train.training_flops(cfg, 2, argparse.Namespace(label_smoothing=0.1))
    assert flops == 3 * (encoder_and_head + E + conv2) + 2 * conv1


def test_benchmark_uses_the_real_images_when_they_are_there(tmp_path, capsys, monkeypatch):
    data = synthetic_mnist(tmp_path / "data", n_train=700)
    seen = []
    get_batch = vit.train.get_batch
    monkeypatch.setattr(vit.train, "get_batch", lambda *a: seen.append(get_batch(*a)) or seen[-1])
    vit.main.main(run_args(data, tmp_path / "run", "--benchmark", "--benchmark-steps", "1"))
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["data"] == "real" and row["batch_size"] == 50 and len(seen) == 3 + 1
    images = vit.data.load_split(data, "mnist", "train")[0][:600]               # the training split (val 100)
    for x, _ in seen:                                                           # every batch holds training images
        assert all((images == im).all((1, 2)).any() for im in x)
    assert not (tmp_path / "run").exists()


# ---- host-device synchronisation

@pytest.mark.parametrize("log_interval, recipe", [(10, []), (20, []),
                                                  (10, ["--hflip", "0.5", "--random-erasing", "0.5", "--ema", "0.999"])])
def test_twenty_steps_read_the_device_only_at_log_steps(log_interval, recipe, tmp_path, monkeypatch):
    """One epoch of 20 steps on the CPU with CUDA's schedule (divergence read at log steps only): the loop
    reads a tensor on the host twice per log step (the divergence flag, the loss for the progress bar)
    and once at the end of the epoch (the divergence flag, before the checkpoint); none per step, also
    with the flip, Random Erasing and the weights' EMA on."""
    monkeypatch.setattr(vit.main, "sample", lambda args: None)
    monkeypatch.setattr(vit.train, "checks_every_step", lambda device: False)
    calls = count_syncs(monkeypatch, vit.train, "vit")
    data = synthetic_mnist(tmp_path / "data", n_train=600, n_test=10)
    vit.main.main(run_args(data, tmp_path / "run", "--epochs", "1", "--train-size", "500", "--batch-size", "25",
                           "--crop-padding", "2", "--log-interval", str(log_interval), *recipe))
    assert calls and len(calls) <= 2 * (20 // log_interval) + 1, calls                 # the spies see them: not zero


# ---- the shipped weights (pretrained/vit/)

@pytest.mark.parametrize("name", ["mnist", "fashion"])
def test_the_shipped_weights_load_into_todays_model_and_reproduce_their_check(name):
    """The fp16 weights in pretrained/vit/ load into the model code as it is now and give, on the JSON's
    fixed random images, the logits recorded at export: a model change that forgets to re-export fails
    here. The test images shipped for the attention maps end with ones the model gets wrong."""
    import safetensors.torch
    model, meta = vit.pretrained.load_model(name, "cpu")
    check = meta["check"]
    x = torch.randn(*check["shape"], generator=torch.Generator().manual_seed(check["seed"]))
    with torch.no_grad():
        logits = model(x)
    assert logits.sum().item() == pytest.approx(check["logits_sum"], rel=1e-3, abs=1e-3)
    assert logits.abs().sum().item() == pytest.approx(check["logits_abs_sum"], rel=1e-3)
    assert logits.argmax(-1).tolist() == check["argmax"]
    w = safetensors.torch.load_file(ROOT / "pretrained" / "vit" / f"{name}.safetensors")
    assert {k: v.dtype for k, v in w.items()} == {k: torch.float16 for k in model.state_dict()}
    assert all(torch.equal(p, w[k].float()) for k, p in model.state_dict().items())   # fp16 -> fp32 is exact
    images, labels = vit.pretrained.decode_examples(meta)
    assert images.shape == (16, 28, 28) and images.dtype == torch.uint8
    with torch.no_grad():
        preds = model(vit.data.normalize(images, name)).argmax(-1)
    assert (preds[-4:] != labels[-4:]).all()          # the last four were picked as errors at export


def test_a_tampered_shipped_file_is_refused_in_one_line_naming_it(tmp_path, monkeypatch):
    """A flipped byte in a shipped file, or a file missing from pretrained/SHA256SUMS: one line naming
    the file, before anything is loaded or written."""
    import shutil
    shutil.copytree(ROOT / "pretrained" / "vit", tmp_path / "pretrained" / "vit")
    shutil.copy(ROOT / "pretrained" / "SHA256SUMS", tmp_path / "pretrained" / "SHA256SUMS")
    monkeypatch.setattr(vit.pretrained, "ROOT", tmp_path / "pretrained")
    weights = tmp_path / "pretrained" / "vit" / "fashion.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    argv = ["--sample-only", "--pretrained", "--dataset", "fashion", "--device", "cpu",
            "--out-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "nothing")]
    with pytest.raises(SystemExit) as e:
        vit.main.main(argv)
    assert str(e.value.code) == ("vit: pretrained/vit/fashion.safetensors does not match pretrained/SHA256SUMS; "
                                 "restore it with git checkout")
    sums = tmp_path / "pretrained" / "SHA256SUMS"
    sums.write_text("".join(l + "\n" for l in sums.read_text().splitlines() if not l.endswith("vit/fashion.json")))
    with pytest.raises(SystemExit) as e:
        vit.main.main(argv)
    assert "pretrained/vit/fashion.json does not match pretrained/SHA256SUMS" in str(e.value.code)
    assert not (tmp_path / "run").exists()


def test_pretrained_without_sample_only_fine_tunes_from_the_shipped_weights(tmp_path, monkeypatch, one_line_error):
    """--pretrained on a training command starts from the shipped weights (not from the seed's
    initialisation), at epoch 0; model flags that disagree with the shipped model are refused."""
    import safetensors.torch
    data = synthetic_mnist(tmp_path / "data", n_train=200, n_test=10)
    seen, train_epoch = [], vit.train.train_epoch

    def spy(epoch, model, *a, **kw):
        seen.append((epoch, {k: v.clone() for k, v in model.state_dict().items()}))
        return train_epoch(epoch, model, *a, **kw)
    monkeypatch.setattr(vit.train, "train_epoch", spy)
    monkeypatch.setattr(vit.main, "sample", lambda args: None)
    vit.main.main(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), "--device", "cpu", "--val-size", "100",
                   "--batch-size", "50", "--epochs", "1", "--pretrained", "--dataset", "mnist"])
    shipped = safetensors.torch.load_file(ROOT / "pretrained" / "vit" / "mnist.safetensors")
    (epoch, state), = seen
    assert epoch == 0 and all(torch.equal(state[k], v.float()) for k, v in shipped.items())
    assert "leave out --dim" in one_line_error("--pretrained", "--dim", "32", "--out-dir", str(tmp_path / "r2"))


def test_compile_mode_reaches_torch_compile(monkeypatch):
    """--compile-mode reduce-overhead (CUDA graphs) is what torch.compile gets; without --compile nothing compiles."""
    calls = []
    monkeypatch.setattr(vit.train.torch, "compile", lambda model, **kw: calls.append(kw) or model)
    cfg = vit.model.ViTConfig(patch_size=7, dim=16, depth=1, heads=2, mlp_dim=16)
    for argv, expected in [([], []), (["--compile"], [{"mode": "default"}]),
                           (["--compile", "--compile-mode", "reduce-overhead"], [{"mode": "reduce-overhead"}])]:
        calls.clear()
        vit.train.build(cfg, vit.main.parse_args([*argv, "--device", "cpu"]), "cpu")
        assert calls == expected
