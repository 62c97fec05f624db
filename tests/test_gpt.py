"""gpt/: each line of the README's paper-to-code table against a reference written out here
(attention, FFN, pre-LN stack, init, tying, dropout, loss, AdamW's decay, the schedule, top-k and
temperature), the flags reaching that math in a real step, the KV cache, learning, exact resume,
DDP and clear errors. Synthetic text only."""
import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, flip_bit, import_folder, shipped_copy
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

gpt = import_folder("gpt")
CFG = gpt.model.GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "8", "--warmup-steps", "2", "--dropout", "0"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train several times faster on one thread than on two that spin on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model(cfg=CFG, std=None):
    """A GPT in eval mode; std: every parameter redrawn from N(0, std^2), so that biases, LayerNorm
    gains and a non-uniform attention all matter (the 0.02 init makes attention nearly uniform)."""
    torch.manual_seed(0)
    m = gpt.model.GPT(cfg).eval()
    if std:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, std)
    return m


def text_file(tmp_path, text="the quick brown fox jumps over the lazy dog. " * 80):
    path = tmp_path / "text.txt"
    path.write_text(text)
    return str(path)


def log_rows(out_dir):
    with open(out_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def parse(argv):
    return gpt.main.parse_args([str(a) for a in argv])


def error_line(argv, capsys):
    """gpt/main.py ARGV in this process must stop with one line and no traceback."""
    with pytest.raises(SystemExit) as e:
        gpt.main.main([str(a) for a in argv])
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert len(text.strip().splitlines()) == 1, text
    return text


# ---- the paper's math, each against a reference written out here

def layer_norm(x, ln):
    """(x - mean) / sqrt(var + eps) * g + b, the biased variance over the channels."""
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias


def attention_reference(attn, x, scale=None):
    """Vaswani eq. 1 per head, heads concatenated, then W^O; query t sees keys 0..t (§3.2.3)."""
    B, T, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split(C, dim=-1)  # W^Q, W^K, W^V of all heads
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))     # (B, nh, T, hs)
    scores = q @ k.transpose(-2, -1) * (scale or 1 / math.sqrt(hs))
    scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    heads = scores.softmax(-1) @ v                                            # (B, nh, T, hs)
    return heads.transpose(1, 2).reshape(B, T, C) @ attn.c_proj.weight.T + attn.c_proj.bias


def mlp_reference(mlp, x):
    """FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, GELU(u) = u Phi(u) = u (1 + erf(u / sqrt 2)) / 2."""
    u = x @ mlp.c_fc.weight.T + mlp.c_fc.bias
    return (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ mlp.c_proj.weight.T + mlp.c_proj.bias


def gpt_reference(m, idx):
    """Token + learned position embeddings, pre-LN blocks x + Attn(LN(x)), x + FFN(LN(x)), a last
    LN, and the embedding matrix transposed as the output projection."""
    x = m.wte.weight[idx] + m.wpe.weight[:idx.size(1)]
    for b in m.h:
        x = x + attention_reference(b.attn, layer_norm(x, b.ln_1))
        x = x + mlp_reference(b.mlp, layer_norm(x, b.ln_2))
    return layer_norm(x, m.ln_f) @ m.wte.weight.T


def test_attention_is_the_formula_written_out():
    attn, x = model(std=0.3).h[0].attn, torch.randn(2, 9, 32)
    with torch.no_grad():
        ref = attention_reference(attn, x)
        full, (k, v) = attn(x)
        torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-4)
        assert k.shape == (2, 2, 9, 16)  # the cache holds every head's keys
        # with a cache: a chunk of queries at positions 5..8 sees keys 0..5, ..., 0..8
        _, past = attn(x[:, :5])
        chunk, _ = attn(x[:, 5:], past)
    torch.testing.assert_close(chunk, ref[:, 5:], atol=1e-5, rtol=1e-4)
    # on these inputs the attention is far from uniform: a wrong scale would show
    assert (attention_reference(attn, x, scale=1 / 16) - ref).abs().max() > 0.1


def test_mlp_is_the_gelu_ffn_written_out():
    mlp, x = model(std=0.5).h[0].mlp, torch.randn(2, 5, 32)
    assert mlp.c_fc.out_features == 4 * 32  # inner width 4 d_model
    torch.testing.assert_close(mlp(x), mlp_reference(mlp, x), atol=1e-5, rtol=1e-4)


def test_forward_is_the_pre_ln_stack_written_out():
    m, idx = model(std=0.3), torch.randint(0, 11, (2, 16))
    logits, _ = m(idx)
    torch.testing.assert_close(logits, gpt_reference(m, idx), atol=1e-4, rtol=1e-4)


def test_loss_is_the_mean_next_character_cross_entropy():
    m, idx, targets = model(std=0.3), torch.randint(0, 11, (2, 16)), torch.randint(0, 11, (2, 16))
    logits, loss = m(idx, targets)
    log_p = logits.gather(-1, targets[..., None])[..., 0] - logits.exp().sum(-1).log()  # log softmax at y
    torch.testing.assert_close(loss, -log_p.mean())


def test_embedding_and_unembedding_share_one_matrix():
    m = model()
    assert m.lm_head.weight is m.wte.weight
    assert sum(p is m.wte.weight for p in m.parameters()) == 1  # one parameter, updated once
    assert gpt.train.n_params(m.cfg) == sum(p.numel() for p in m.parameters())  # the memory check's count


def test_init_follows_gpt2():
    cfg = gpt.model.GPTConfig(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=128)
    m = model(cfg)
    for name, p in m.named_parameters():
        if name.endswith("c_proj.weight"):  # residual writers: 0.02 / sqrt(2 n_layer), N = 2 x 4 layers
            assert abs(p.std().item() / (0.02 / math.sqrt(8)) - 1) < 0.1, name
        elif p.dim() == 2:
            assert abs(p.std().item() / 0.02 - 1) < 0.1, name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert torch.all(p == 1), name  # LayerNorm gains


def test_dropout_sits_on_the_embeddings_and_on_each_sublayer_output():
    # With p = 1 every dropout outputs zeros: the residual stream stays 0 from the embeddings on,
    # so the logits are lm_head(ln_f(0)) = W_e ln_f.bias at every position. A missing dropout lets
    # a bias or an embedding through.
    m = model(gpt.model.GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=1.0), std=0.3)
    logits, _ = m.train()(torch.randint(0, 11, (2, 16)))
    expected = (m.ln_f.bias @ m.wte.weight.T).expand(2, 16, 11)
    torch.testing.assert_close(logits, expected)


def test_weight_decay_is_decoupled_and_on_matrices_only():
    # AdamW with a zero gradient: Adam's step is 0 (m = v = 0), so a decayed parameter becomes
    # p (1 - lr wd) (Loshchilov & Hutter, Algorithm 2, line 12) and an undecayed one stays p.
    m = model(std=0.3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = m.configure_optimizers(weight_decay=0.5, lr=0.1, betas=(0.9, 0.99))
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    matrices = ("wte.weight", "wpe.weight", "c_attn.weight", "c_proj.weight", "c_fc.weight")
    for n, p in m.named_parameters():
        factor = 1 - 0.1 * 0.5 if n.endswith(matrices) else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)


def test_lr_schedule_is_linear_warmup_then_cosine():
    args = parse(["--lr", "1", "--min-lr", "0.1", "--warmup-steps", "2", "--steps", "6"])
    # step 0, 1: (s + 1) / 2; then 0.1 + 0.45 (1 + cos(pi (s - 2) / 4)); past the end: min-lr
    expected = [0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1, 0.1]
    assert [round(gpt.train.get_lr(s, args), 6) for s in range(8)] == expected


def test_flags_reach_the_optimiser_and_the_clipping_in_real_steps(tmp_path, monkeypatch):
    seen, clips = [], []
    configure = gpt.model.GPT.configure_optimizers

    def spy_configure(self, *a, **kw):  # the real optimiser, with a hook that reads it at every step
        opt = configure(self, *a, **kw)
        opt.register_step_pre_hook(lambda o, *_: seen.append(
            [(g["lr"], g["betas"], g["weight_decay"], len(g["params"])) for g in o.param_groups]))
        return opt

    clip = torch.nn.utils.clip_grad_norm_

    def spy_clip(params, max_norm, *a, **kw):
        params = list(params)
        norm = clip(params, max_norm, *a, **kw)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        clips.append((max_norm, len(params), norm.item(), after.item()))
        return norm

    monkeypatch.setattr(gpt.model.GPT, "configure_optimizers", spy_configure)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    gpt.train.train(parse(
        [*TINY, "--data", text_file(tmp_path), "--out-dir", tmp_path / "run", "--steps", "6", "--eval-interval", "6", "--log-interval", "1",
         "--lr", "0.01", "--min-lr", "0.001", "--weight-decay", "0.37", "--beta2", "0.95", "--grad-clip", "1e-3"]))
    expected_lr = [0.005, 0.01, 0.01, 0.0086820, 0.0055, 0.0023180]  # the schedule above, x 0.01
    assert [round(s[0][0], 7) for s in seen] == expected_lr
    n_matrices = 2 + 4 * CFG.n_layer  # wte (tied lm_head once), wpe, 4 per block
    n_vectors = 8 * CFG.n_layer + 2  # 4 biases and 2 LayerNorms per block, ln_f
    assert all(s == [(s[0][0], (0.9, 0.95), 0.37, n_matrices), (s[0][0], (0.9, 0.95), 0.0, n_vectors)] for s in seen)
    assert len(clips) == 6 and all(c[:2] == (1e-3, n_matrices + n_vectors) for c in clips)
    assert all(c[2] > 1e-2 and c[3] == pytest.approx(1e-3, rel=1e-3) for c in clips)  # it did clip, to 1e-3


# ---- sampling

def stub(m, probs):
    """m's forward replaced by fixed next-character log-probabilities, whatever the input."""
    logits = torch.tensor(probs).log()
    m.forward = lambda idx, targets=None, cache=None: (logits.expand(idx.size(0), idx.size(1), -1).clone(), None)
    return m


@pytest.mark.parametrize("temperature, top_k, expected", [
    (1.0, None, [0.5, 0.3, 0.15, 0.05]),
    (1.0, 3, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),   # the three likeliest, renormalised
    (0.5, 2, [0.25 / 0.34, 0.09 / 0.34, 0.0, 0.0]),          # p^(1/T): 0.5^2, 0.3^2, then the top 2
    (2.0, None, [0.37900, 0.29357, 0.20758, 0.11985]),       # sqrt(p) / sum sqrt(p)
])
def test_top_k_and_temperature_sample_the_hand_worked_distribution(temperature, top_k, expected):
    m = stub(model(gpt.model.GPTConfig(vocab_size=4, block_size=8, n_layer=1, n_head=1, n_embd=8)),
             [0.5, 0.3, 0.15, 0.05])
    torch.manual_seed(0)
    out = m.generate(torch.zeros(40_000, 1, dtype=torch.long), 1, temperature, top_k)[:, -1]
    freq = torch.bincount(out, minlength=4) / 40_000
    assert (freq - torch.tensor(expected)).abs().max() < 0.015  # 6 standard deviations
    assert torch.all(freq[torch.tensor(expected) == 0] == 0)


@pytest.mark.parametrize("prompt_len", [4, 2 * CFG.block_size + 3])
def test_greedy_generate_matches_recomputing_from_scratch(prompt_len):
    # Reference without a cache: the context is the last block_size characters, and once it is
    # full it restarts from the last half (the rule generate() follows with its cache).
    m, idx = model(std=0.3), torch.randint(0, 11, (3, prompt_len))
    n_new, bs = 3 * CFG.block_size, CFG.block_size
    out = m.generate(idx, max_new_tokens=n_new, top_k=1)
    ref, start = idx, max(0, prompt_len - bs)
    for _ in range(n_new):
        if ref.size(1) - start > bs:
            start = ref.size(1) - bs // 2
        logits, _ = m(ref[:, start:])
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (3, prompt_len + n_new)
    assert torch.equal(out, ref)


def test_kv_cache_logits_equal_full_recompute():
    m, x = model(std=0.3), torch.randint(0, 11, (2, 16))
    cache = [None] * CFG.n_layer
    # a prompt, single tokens, then a chunk of several tokens on top of the cache
    pieces = [x[:, :5], x[:, 5:6], x[:, 6:7], x[:, 7:11], x[:, 11:]]
    cached = torch.cat([m(p, cache=cache)[0] for p in pieces], dim=1)
    torch.testing.assert_close(cached, gpt_reference(m, x), atol=1e-4, rtol=1e-4)


# ---- training, sampling, the command line

def test_training_learns_a_repeating_text_and_the_samples_continue_it(tmp_path):
    out = tmp_path / "run"
    gpt.main.main([*TINY, "--data", text_file(tmp_path, "abcdefgh" * 400), "--out-dir", str(out), "--steps", "80",
                   "--eval-interval", "40", "--log-interval", "1", "--lr", "1e-2", "--prompt", "cde",
                   "--top-k", "1", "--num-samples", "2", "--max-new-tokens", "30"])
    rows = log_rows(out)
    assert abs(float(rows[0]["train_loss"]) - math.log(8)) < 0.3  # uniform over the 8 letters at first
    assert float(rows[-1]["val_loss"]) < 0.05  # then each character is certain from the one before
    continuation = "cde" + ("fghabcde" * 5)[:30]
    assert (out / "generated.txt").read_text() == f"#### SAMPLE 1 ####\n{continuation}\n\n" \
                                                  f"#### SAMPLE 2 ####\n{continuation}\n\n"
    import matplotlib.image
    assert matplotlib.image.imread(out / "gpt_loss.png").shape[:2] == (480, 720)  # 6 x 4 in at 120 dpi


def test_sampling_flags_reach_generate(trained, monkeypatch):
    seen = []
    generate = gpt.model.GPT.generate

    def spy(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        seen.append((idx.tolist(), max_new_tokens, temperature, top_k))
        return generate(self, idx, max_new_tokens, temperature, top_k)

    monkeypatch.setattr(gpt.model.GPT, "generate", spy)
    samples = gpt.sample.generate_samples(parse(
        ["--device", "cpu", "--out-dir", trained, "--prompt", "the", "--temperature", "0.55", "--top-k", "7",
         "--num-samples", "2", "--max-new-tokens", "5"]))
    tok = gpt.data.CharTokenizer(sorted(set((trained / "text.txt").read_text())))
    assert seen == [([tok.encode("the")] * 2, 5, 0.55, 7)]
    assert len(samples) == 2 and all(s.startswith("the") and len(s) == 8 for s in samples)


def test_quick_is_a_small_config_and_typed_flags_win():
    args = parse(["--quick"])
    assert (args.n_layer, args.n_embd, args.steps, args.out_dir) == (2, 64, 300, gpt.train.QUICK_OUT_DIR)
    args = parse(["--quick", "--steps", "7", "--out-dir", "elsewhere"])
    assert (args.n_layer, args.steps, args.out_dir, args.figures_dir) == (2, 7, "elsewhere", "elsewhere")


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    data = text_file(tmp_path)
    flags = [*TINY, "--data", data, "--steps", "8", "--eval-interval", "4", "--log-interval", "1",
             "--dropout", "0.1"]  # dropout on, so the RNG state must be restored too
    a = gpt.train.train(parse([*flags, "--out-dir", str(tmp_path / "a")]))

    get_batch = gpt.train.get_batch

    def interrupt_at_step_5(data, b, t, key):
        if key[1] == 5:
            raise KeyboardInterrupt
        return get_batch(data, b, t, key)

    monkeypatch.setattr(gpt.train, "get_batch", interrupt_at_step_5)
    with pytest.raises(SystemExit) as e:
        gpt.train.train(parse([*flags, "--out-dir", str(tmp_path / "b")]))
    assert e.value.code == 130
    monkeypatch.undo()
    # no other flags: --resume takes them from the checkpoint
    b = gpt.train.train(parse(["--out-dir", str(tmp_path / "b"), "--resume", "--device", "cpu"]))

    loss_a = [r["train_loss"] for r in log_rows(tmp_path / "a")]
    loss_b = [r["train_loss"] for r in log_rows(tmp_path / "b")]
    assert loss_b == loss_a  # steps 1-4 from the first run, 5-8 after the resume
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_a_non_finite_gradient_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def nan_at_step_3(params, max_norm, *a, **kw):
        calls.append(1)
        norm = clip(params, max_norm, *a, **kw)
        return norm * float("nan") if len(calls) == 3 else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nan_at_step_3)
    out = tmp_path / "run"
    args = parse([*TINY, "--data", text_file(tmp_path), "--out-dir", out, "--steps", "6",
                                "--eval-interval", "2", "--log-interval", "1"])
    with pytest.raises(SystemExit, match=rf"non-finite .* at step 3; stopping before the update; the last good "
                                         rf"checkpoint is {re.escape(str(out / 'ckpt.pt'))} \(step 2\); try a lower --lr"):
        gpt.train.train(args)
    ckpt = torch.load(out / "ckpt.pt")
    assert ckpt["step"] == 2 and len(calls) == 3


def test_training_waits_for_the_device_only_at_log_and_eval_steps(tmp_path, monkeypatch):
    # A host-device sync per step stalls a GPU; on CPU, count the calls that would be one. Budget:
    # the loss and the divergence flag at each log step, the weights check and the validation loss at
    # each eval step. A per-step .item() (or `if tensor:`) adds 20.
    calls = []
    for name in ("item", "cpu", "tolist", "__bool__", "__float__"):
        def spy(self, *a, _real=getattr(torch.Tensor, name), _name=name, **kw):
            calls.append(_name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, spy)
    steps, log_interval, eval_interval = 20, 5, 20
    gpt.train.train(parse([*TINY, "--data", text_file(tmp_path), "--out-dir", tmp_path / "run", "--steps", steps,
                           "--log-interval", log_interval, "--eval-interval", eval_interval]))
    monkeypatch.undo()
    assert steps // log_interval <= len(calls) <= 2 * (steps // log_interval) + 2 * (steps // eval_interval), calls


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {gpt_dir!r})
import main, train
model = train.train(main.parse_args({argv!r}))
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_two_process_gloo_ddp_keeps_identical_weights(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    argv = [*TINY, "--data", text_file(tmp_path), "--out-dir", str(out), "--steps", "4", "--eval-interval", "2",
            "--log-interval", "1", "--grad-accum", "2"]  # micro-steps: no_sync, then one all-reduce
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(gpt_dir=str(ROOT / "gpt"), argv=argv, out=str(out)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    torch.manual_seed(1337)
    init = gpt.model.GPT(gpt.model.GPTConfig(**torch.load(out / "ckpt.pt")["config"])).state_dict()
    assert any(not torch.equal(w0[k], init[k]) for k in w0)  # it did train
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    gpt.train.train(parse([*TINY, "--data", text_file(tmp), "--out-dir", str(tmp), "--steps", "2",
                                         "--eval-interval", "2", "--log-interval", "1"]))
    return tmp


def test_prompt_outside_the_vocabulary_is_a_clear_error(trained, capsys):
    line = error_line(["--sample-only", "--device", "cpu", "--out-dir", trained, "--prompt", "Zürich"], capsys)
    assert "vocabulary" in line and "Z" in line


def test_checkpoint_of_another_folder_or_with_non_finite_weights_is_refused(trained, tmp_path, capsys):
    torch.save({"folder": "vit", "model": {}}, tmp_path / "ckpt.pt")
    assert "not of gpt/" in error_line(["--sample-only", "--device", "cpu", "--out-dir", tmp_path], capsys)
    ckpt = torch.load(trained / "ckpt.pt")
    ckpt["model"]["ln_f.weight"][0] = float("nan")
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert "non-finite" in error_line(["--sample-only", "--device", "cpu", "--out-dir", tmp_path], capsys)


def test_bad_text_files_are_clear_errors(tmp_path, capsys):
    out = ["--device", "cpu", "--out-dir", tmp_path / "run"]
    assert "nope.txt" in error_line(["--data", tmp_path / "nope.txt", *out], capsys)
    (tmp_path / "empty.txt").write_text("")
    assert "empty.txt" in error_line(["--data", tmp_path / "empty.txt", *out], capsys)
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    assert "binary" in error_line(["--data", tmp_path / "bin.txt", *out], capsys)
    assert "directory" in error_line(["--data", tmp_path, *out], capsys)


def test_missing_novel_offline_names_the_url_and_the_layout(tmp_path, capsys, monkeypatch):
    def offline(path):
        raise OSError("no network")
    monkeypatch.setattr(gpt.data, "download", offline)
    line = error_line(["--device", "cpu", "--data-dir", tmp_path, "--out-dir", tmp_path / "run"], capsys)
    assert gpt.data.URL in line and str(tmp_path / "text" / "1984.txt") in line and "--data FILE" in line


def test_resume_on_another_text_is_refused(trained, tmp_path, capsys):
    other = text_file(tmp_path, "a different text, same characters. " * 80)
    assert "another text" in error_line(["--resume", "--out-dir", trained, "--data", other, "--steps", "4"], capsys)


def test_empty_prompt_and_out_of_range_values_are_clear_errors(capsys):
    assert "--prompt" in error_line(["--prompt", ""], capsys)
    assert "--beta2" in error_line(["--beta2", "1.5"], capsys)
    assert "--temperature" in error_line(["--temperature", "nan"], capsys)
    assert "--n-embd 100" in error_line(["--n-embd", "100", "--n-head", "3"], capsys)


def test_help_gives_the_readme_cpu_command():
    readme = (ROOT / "gpt" / "README.md").read_text()
    block = readme[readme.index("python gpt/main.py --data-dir ../shared/data --device cpu"):]
    flags = block[:block.index("```")].replace("\\\n", " ").split()[4:]  # after --data-dir DIR
    doc = " ".join(gpt.main.__doc__.replace("\\\n", " ").split())
    assert "python gpt/main.py " + " ".join(flags) in doc
    assert "README result (one GPU)" not in doc and "not measured" in doc


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_a_fresh_run_does_not_overwrite_a_checkpoint(trained, quick, capsys):
    before = (trained / "ckpt.pt").read_bytes()
    line = error_line([*TINY, *quick, "--data", trained / "text.txt", "--out-dir", trained], capsys)
    assert "--resume" in line
    assert (trained / "ckpt.pt").read_bytes() == before


# ---- --benchmark

def test_compile_mode_reaches_torch_compile_and_the_benchmark_line(tmp_path, capsys, monkeypatch):
    """--compile-mode reduce-overhead (CUDA graphs) is the mode torch.compile gets, and the JSON says so."""
    calls = []
    monkeypatch.setattr(gpt.train.torch, "compile", lambda model, **kw: calls.append(kw) or model)
    gpt.main.main([str(a) for a in ["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "1", "--compile",
                                    "--compile-mode", "reduce-overhead", "--data-dir", tmp_path / "nothing"]])
    assert calls == [{"mode": "reduce-overhead"}]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["compile"] == "reduce-overhead"


@pytest.mark.parametrize("data", ["random", "real"])
def test_benchmark_prints_one_json_line_of_the_quick_config(data, tmp_path, capsys):
    text = "the quick brown fox jumps over the lazy dog. " * 80
    source = ["--data", text_file(tmp_path, text)] if data == "real" else ["--data-dir", tmp_path / "nothing"]
    gpt.main.main([str(a) for a in ["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2",
                                    "--out-dir", tmp_path / "run", *source]])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # --quick: 2 layers, 2 heads, width 64, context 64, batch 16; random data: a vocabulary of 80
    V, L, C, T, B = len(set(text)) if data == "real" else 80, 2, 64, 64, 16
    m = gpt.model.GPT(gpt.model.GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=2, n_embd=C, dropout=0.0))
    params = sum(p.numel() for p in m.parameters())
    assert (row["folder"], row["device"], row["data"], row["unit"], row["compile"]) == ("gpt", "cpu", data, "tokens", False)
    assert row["params"] == params and row["batch_size"] == B * T and row["torch"] == torch.__version__
    # 6 N (N without the position table, which is a lookup) + 12 L T C for QK^T and AV (PaLM, appendix B)
    assert row["flops_per_sample"] == 6 * (params - T * C) + 12 * L * T * C
    # ... which is within 2% of what FlopCounterMode counts in one forward and backward (biases and
    # LayerNorms are not matmuls); the math attention backend makes the attention products countable
    x = torch.randint(V, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(x, x)[1].backward()
    assert row["flops_per_sample"] == pytest.approx(counter.get_total_flops() / (B * T), rel=0.02)
    assert row["samples_per_s"] == pytest.approx(row["batch_size"] / (row["step_ms"] / 1000), rel=1e-6)
    assert row["tflops"] == pytest.approx(row["flops_per_sample"] * row["samples_per_s"] / 1e12, rel=1e-6)
    assert row["mfu"] is None and row["peak_mem_mb"] > 0
    assert not (tmp_path / "run").exists()  # nothing written



def test_benchmark_times_steps_alone_and_in_flight_and_profile_prints_to_stderr(tmp_path, capsys, monkeypatch):
    """3 warm-up steps, --benchmark-steps timed alone, as many in flight, as many profiled, each a new step
    of the schedule; stdout stays the one JSON line benchmarks/run.py reads, the profile goes to stderr."""
    steps, real_step = [], gpt.train.train_step
    monkeypatch.setattr(gpt.train, "train_step", lambda *a, **kw: steps.append(a[3]) or real_step(*a, **kw))
    gpt.main.main([str(a) for a in ["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2", "--profile",
                                    "--data-dir", tmp_path / "nothing"]])
    out, err = capsys.readouterr()
    args = gpt.main.parse_args(["--quick"])
    assert steps == [gpt.train.get_lr(step, args) for step in range(3 + 3 * 2)]
    row = json.loads(out)                                   # one line, nothing else
    assert row["step_ms_in_flight"] > 0 and row["step_ms"] > 0
    assert "aten::mm" in err and "Self CPU time total" in err
    with pytest.raises(SystemExit):
        gpt.main.parse_args(["--profile"])
    assert "--profile profiles --benchmark's steps" in capsys.readouterr().err

# ---- the shipped model (pretrained/gpt/)

def test_the_shipped_model_loads_into_todays_code_and_reproduces_its_check():
    tok, weights, card = gpt.pretrained.pretrained_weights()
    cfg = gpt.model.GPTConfig(**card["config"])
    m = gpt.model.GPT(cfg)
    m.load_state_dict(weights)
    m.eval()
    assert len(tok) == cfg.vocab_size == len(card["vocab"])
    check = card["check"]
    x = torch.randint(cfg.vocab_size, (2, cfg.block_size + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = m(x[:, :-1], x[:, 1:])
    assert check["shape"] == [2, cfg.block_size]
    assert logits.sum().item() == pytest.approx(check["logits_sum"], rel=1e-3, abs=1e-2)
    assert logits.abs().sum().item() == pytest.approx(check["logits_abs_sum"], rel=1e-3)
    assert loss.item() == pytest.approx(check["loss"], rel=1e-3)
    # the loss is the mean next-character cross-entropy, written out
    logp = logits.log_softmax(-1)
    assert -logp.gather(-1, x[:, 1:, None]).mean().item() == pytest.approx(check["loss"], rel=1e-3)
    assert logits[:, -1].argmax(-1).tolist() == check["argmax_last"]
    # a trained model, not noise: after "Big Brothe" the next character is "r"
    with torch.no_grad():
        nxt = m(torch.tensor([tok.encode("Big Brothe")]))[0][0, -1].argmax().item()
    assert tok.decode([nxt]) == "r"


def test_sample_only_pretrained_writes_samples_and_the_curve_without_a_run(tmp_path):
    out, figures = tmp_path / "out", tmp_path / "figures"
    gpt.main.main(["--sample-only", "--pretrained", "--device", "cpu", "--out-dir", str(out), "--figures-dir",
                   str(figures), "--prompt", "Winston", "--num-samples", "2", "--max-new-tokens", "40"])
    text = (out / "generated.txt").read_text()
    assert text.count("#### SAMPLE") == 2 and text.count("\nWinston") == 2
    assert (figures / "gpt_loss.png").is_file() and not (out / "ckpt.pt").exists()


def test_a_tampered_shipped_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys):
    root = shipped_copy("gpt", tmp_path)
    monkeypatch.setattr(gpt.pretrained, "ROOT", root)
    flip_bit(root / "gpt" / "1984.safetensors", at=-2)
    line = error_line(["--sample-only", "--pretrained", "--device", "cpu", "--out-dir", tmp_path / "out"], capsys)
    assert "pretrained/gpt/1984.safetensors" in line and "SHA256SUMS" in line and "git checkout" in line
    assert not (tmp_path / "out").exists()


def test_fine_tuning_starts_from_the_shipped_weights_and_export_round_trips(tmp_path, monkeypatch):
    """--pretrained without --sample-only trains on from the shipped weights (a text within its vocabulary);
    --export-pretrained of that run writes files that load back to the run's weights, rounded to bf16."""
    tok, shipped, card = gpt.pretrained.pretrained_weights()
    run = tmp_path / "run"
    model = gpt.train.train(parse(["--pretrained", "--device", "cpu", "--data", text_file(tmp_path, "The clocks were "
                                   "striking thirteen. " * 80), "--steps", "2", "--eval-interval", "2",
                                   "--log-interval", "1", "--lr", "1e-9", "--min-lr", "0", "--warmup-steps", "0", "--out-dir", run]))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, shipped[k], atol=1e-6, rtol=0)
    monkeypatch.setattr(gpt.pretrained, "ROOT", tmp_path / "pretrained")
    gpt.main.main(["--export-pretrained", str(run), "--data", str(tmp_path / "text.txt")])
    tok2, back, card2 = gpt.pretrained.pretrained_weights()  # passes the sha256 check of the fresh manifest line
    assert tok2.chars == tok.chars and card2["config"] == card["config"]
    assert "--pretrained" in card2["command"] and "--steps 2" in card2["command"]
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v.to(torch.bfloat16).float()), k
