"""tiny_stories_lm/: each line of the README's paper-to-code table against a reference written out
here (BPE's first merge, word tokens, the bag's mean, attention with RoPE, RMSNorm, the pre-norm
stack, init, tying, dropout, nucleus sampling, AdamW's and SGD's decay, the schedule, bits per
character), the flags reaching that math in a real step, the KV cache, learning beyond trigrams,
exact resume, DDP and clear errors. Synthetic stories only."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT, import_folder, shipped_copy
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ts = import_folder("tiny_stories_lm")
M = ts.model
NAMES = ["Lily", "Tom", "Ben", "Mia", "Sue"]
PLACES = ["park", "garden", "beach", "shop"]
TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--hidden", "32", "--block-size", "32",
        "--batch-size", "8", "--warmup-steps", "2", "--dropout", "0", "--vocab-size", "300", "--eval-tokens", "0",
        "--num-samples", "1", "--max-new-tokens", "20"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train several times faster on one thread than on two that spin on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def stories(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (1,), generator=g))]
    out = []
    for _ in range(n):
        name, place = pick(NAMES), pick(PLACES)
        out.append(f"Once upon a time, {name} went to the {place}. {name} was happy. "
                   f"{name} saw a big dog at the {place}. \"Hello, dog!\" said {name}. The end.")
    return out


def data_dir(tmp_path, eot=False, n=200):
    """Synthetic excerpts: the train split separated by blank lines, the validation one by EOT or blank lines."""
    folder = tmp_path / "data" / "tinystories"
    folder.mkdir(parents=True)
    (folder / "train_excerpt.txt").write_text("\n\n".join(stories(n)))
    sep = "\n<|endoftext|>\n" if eot else "\n\n"
    (folder / "valid_excerpt.txt").write_text(sep.join(stories(n // 5, seed=1)))
    return str(tmp_path / "data")


def config(**kw):
    return M.Config(**{**dict(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
                              context=5, hidden=16), **kw})


def model(std=None, **kw):
    """A model in eval mode; std: every parameter redrawn from N(0, std^2), so that norm gains and
    biases and a non-uniform attention all matter (the 0.02 init makes attention nearly uniform)."""
    torch.manual_seed(0)
    m = M.build_model(config(**kw)).eval()
    if std:
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, std)
    return m


def parse(argv):
    return ts.main.parse_args([str(a) for a in argv])


def log_rows(out_dir):
    with open(out_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def error_line(argv, capsys):
    """tiny_stories_lm/main.py ARGV in this process must stop with one line and no traceback."""
    with pytest.raises(SystemExit) as e:
        ts.main.main([str(a) for a in argv])
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert len(text.strip().splitlines()) == 1, text
    return text


# ---- step 1: stories and tokens

def test_stories_are_split_on_endoftext_or_on_blank_lines():
    assert ts.data.split_stories("A b.\n<|endoftext|>\nC d.\n\nE f.<|endoftext|>") == ["A b.", "C d.\n\nE f."]
    assert ts.data.split_stories("A b.\n\nC d.\n \nE f.\n") == ["A b.", "C d.", "E f."]


def test_bpe_starts_from_the_256_bytes_and_merges_the_most_frequent_pair_first():
    # Pre-tokenised: "ab", " ab", " ab", " cd" per story; pairs: (a, b) x3, (" ", a) x2, (" ", c), (c, d)
    tok = ts.data.train_tokenizer("bpe", ["ab ab ab cd"] * 10, 256 + 1 + 1)  # bytes, end-of-text, one merge
    assert len(tok) == 258 and tok.tok.token_to_id("<|endoftext|>") is not None
    assert len(tok.encode("ab")) == 1 and len(tok.encode("cd")) == 2 and len(tok.encode(" ab")) == 2
    odd = "Zoë 日本"  # bytes never seen in training still have a token each
    assert tok.decode(tok.encode(odd)) == odd and len(tok.encode(odd)) == len(odd.encode())


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_tokenizers_round_trip_text_exactly(kind):
    tok = ts.data.train_tokenizer(kind, stories(50) + ["Two paragraphs.\n\nHere."], 300)
    text = "Once upon a time, Lily met Bartholomew.\n\n  \"Hello!\" said Tom,  the end."  # an unseen word
    assert tok.decode(tok.encode(text)) == text
    assert "".join(ts.data.piece_strings(tok, text)) == text
    if kind == "bpe":  # bytes: anything round-trips, even what training never saw
        odd = "Zoë's café — 日本 🦄\ttab"
        assert tok.decode(tok.encode(odd)) == odd
    saved = ts.data.load_tokenizer(json.loads(json.dumps(tok.to_json())))  # as the checkpoint keeps it
    assert saved.encode(text) == tok.encode(text) and saved.eot == tok.eot


def test_word_tokens_are_words_and_punctuation_with_their_space():
    tok = ts.data.train_tokenizer("word", stories(50), 300)
    assert ts.data.piece_strings(tok, "Once Lily went to the park.") == ["Once", " Lily", " went", " to", " the",
                                                                          " park", "."]
    assert ts.data.piece_strings(tok, "Lily hot") == ["L", "i", "l", "y", " ", "h", "o", "t"]  # unseen: characters
    assert tok.decode(tok.encode("Lily!?")) == "Lily!<unk>"  # a character never seen: the one lossy case


def test_stream_puts_an_end_of_text_after_every_story():
    tok = ts.data.train_tokenizer("word", stories(20), 300)
    ids = ts.data.encode_stories(tok, ["Lily.", "Tom."])
    assert tok.decode(ids.tolist()) == "Lily.<|endoftext|>Tom.<|endoftext|>"
    assert ts.data.characters(["Lily.", "Tom."]) == 11  # each story, and one separator after it


def test_eval_windows_predict_every_token_but_the_first_once():
    data = torch.arange(50).numpy()
    batches = ts.data.eval_windows(data, block_size=8, batch_size=3)
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert ys.tolist() == list(range(1, 50)) and torch.equal(xs + 1, ys)


# ---- step 2: the bag of embeddings

def test_bag_model_is_the_mean_of_its_window_through_the_mlp():
    m, x = model(model="bag"), torch.randint(0, 23, (2, 12))
    logits, _ = m(x)
    E = m.embedding.weight
    for t in range(12):  # the window t-4..t (k = 5), shorter at the start: its sum over its length
        window = [E[x[:, j]] for j in range(max(0, t - 4), t + 1)]
        torch.testing.assert_close(logits[:, t], m.mlp(sum(window) / len(window)), atol=1e-5, rtol=1e-4)


def test_bag_prediction_does_not_depend_on_token_order_and_the_transformers_does():
    x = torch.randint(0, 23, (1, 5))
    shuffled = x[:, torch.tensor([3, 0, 4, 2, 1])]
    bag, transformer = model(model="bag"), model()
    assert torch.allclose(bag(x)[0][:, -1], bag(shuffled)[0][:, -1], atol=1e-6)
    assert not torch.allclose(transformer(x)[0][:, -1], transformer(shuffled)[0][:, -1], atol=1e-3)


# ---- step 3: the Transformer, each part against a reference written out here

def rope_reference(x, pos, base=10000.0):
    """RoFormer eq. 34 with the channel pairs (i, i + d/2): z_i = x_i + j x_{i+d/2} is multiplied by
    e^{j pos theta_i}, theta_i = base^(-2i/d), i = 0 .. d/2 - 1."""
    d = x.size(-1)
    theta = torch.tensor([base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    z = torch.complex(x[..., :d // 2].double(), x[..., d // 2:].double())
    z = z * torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), pos[:, None].double() * theta)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def attention_reference(attn, x, pos, rope):
    """Vaswani eq. 1 per head, RoPE on the queries and keys only, heads concatenated, then W^O."""
    B, T, C = x.shape
    nh, hs = attn.n_head, C // attn.n_head
    q, k, v = (x @ attn.qkv.weight.T).split(C, dim=-1)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
    if rope:
        q, k = rope_reference(q, pos), rope_reference(k, pos)
    scores = (q @ k.transpose(-2, -1) / math.sqrt(hs)).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    weights = scores.softmax(-1)                                      # (B, nh, T, T)
    return (weights @ v).transpose(1, 2).reshape(B, T, C) @ attn.proj.weight.T, weights


def norm_reference(x, norm, kind):
    if kind == "rmsnorm":  # x / sqrt(mean(x^2) + eps) * g
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def transformer_reference(m, idx):
    """Token (+ learned position) embeddings, pre-norm blocks x + Attn(Norm(x)), x + FFN(Norm(x)) with
    FFN(x) = GELU(x W_1) W_2, a last norm, and the embedding matrix transposed as the output layer."""
    cfg, T = m.cfg, idx.size(1)
    pos = torch.arange(T)
    x = m.wte.weight[idx] + (m.wpe.weight[:T] if cfg.pos == "learned" else 0)
    for b in m.blocks:
        x = x + attention_reference(b.attn, norm_reference(x, b.norm_1, cfg.norm), pos, cfg.pos == "rope")[0]
        u = norm_reference(x, b.norm_2, cfg.norm) @ b.mlp.fc.weight.T
        x = x + (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ b.mlp.proj.weight.T
    return norm_reference(x, m.norm_f, cfg.norm) @ m.wte.weight.T


KINDS = pytest.mark.parametrize("kw", [{}, dict(pos="learned", norm="layernorm")], ids=["rope-rmsnorm", "learned-layernorm"])


def test_rope_rotates_each_channel_pair_by_position_times_theta():
    x, pos = torch.randn(2, 3, 7, 16), torch.tensor([0, 1, 2, 5, 17, 100, 255])
    torch.testing.assert_close(M.rope(x, pos), rope_reference(x, pos), atol=1e-5, rtol=1e-4)
    # and so a query-key score depends only on the distance
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8)
    score = lambda i, j: (M.rope(q, torch.arange(6))[0, 0, i] * M.rope(k, torch.arange(6))[0, 0, j]).sum()
    assert torch.allclose(score(3, 1), score(5, 3), atol=1e-5) and not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


@KINDS
def test_attention_is_the_formula_written_out(kw):
    m = model(std=0.3, **kw)
    attn, x, pos = m.blocks[0].attn, torch.randn(2, 9, 16), torch.arange(9)
    ref, ref_weights = attention_reference(attn, x, pos, m.cfg.pos == "rope")
    with torch.no_grad():
        out, _, _ = attn(x, pos)
        written, _, weights = attn(x, pos, need_weights=True)  # the path of the heatmaps
        _, past, _ = attn(x[:, :5], pos[:5])  # a cache, then queries at positions 5..8
        chunk, _, chunk_weights = attn(x[:, 5:], pos[5:], past, need_weights=True)
    for y in (out, written):
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(weights, ref_weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunk, ref[:, 5:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(chunk_weights, ref_weights[:, :, 5:], atol=1e-5, rtol=1e-4)
    assert ref_weights[:, :, 4:].max() > 0.5  # far from uniform: a wrong scale or rotation would show


def test_rmsnorm_is_the_formula():
    norm, x = M.RMSNorm(16), torch.randn(3, 5, 16) * 4
    with torch.no_grad():
        norm.weight.normal_()
    torch.testing.assert_close(norm(x), norm_reference(x, norm, "rmsnorm"))
    torch.testing.assert_close(norm(x), F.rms_norm(x, (16,), norm.weight, eps=1e-6))


@KINDS
def test_forward_is_the_pre_norm_stack_written_out(kw):
    m, idx = model(std=0.3, **kw), torch.randint(0, 23, (2, 16))
    torch.testing.assert_close(m(idx)[0], transformer_reference(m, idx), atol=1e-4, rtol=1e-4)


@KINDS
def test_kv_cache_logits_equal_the_reference(kw):
    m, x = model(std=0.3, **kw), torch.randint(0, 23, (2, 14))
    cache = [None] * m.cfg.n_layer
    first, _ = m(x[:, :6], cache=cache)  # a prefix at once, then one token at a time
    steps = [first] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(6, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), transformer_reference(m, x), atol=1e-4, rtol=1e-4)


@KINDS
def test_future_tokens_never_change_earlier_logits(kw):
    m, x = model(**kw), torch.randint(0, 23, (2, 16))
    x2 = x.clone()
    x2[:, 9:] = torch.randint(0, 23, (2, 7))
    assert torch.allclose(m(x)[0][:, :9], m(x2)[0][:, :9], atol=1e-5)
    assert not torch.allclose(m(x)[0][:, 9:], m(x2)[0][:, 9:], atol=1e-3)


def test_init_follows_gpt2_and_the_output_layer_is_the_embedding():
    m = M.build_model(M.Config(vocab_size=64, block_size=64, n_layer=4, n_head=4, n_embd=128, pos="learned"))
    assert m.lm_head.weight is m.wte.weight and sum(p is m.wte.weight for p in m.parameters()) == 1
    for name, p in m.named_parameters():
        if name.endswith("proj.weight"):  # residual writers: 0.02 / sqrt(2 n_layer)
            assert abs(p.std().item() / (0.02 / math.sqrt(8)) - 1) < 0.1, name
        elif p.dim() == 2:
            assert abs(p.std().item() / 0.02 - 1) < 0.1, name
        else:
            assert torch.all(p == 1), name  # RMSNorm gains
    for cfg in (config(), config(pos="learned", norm="layernorm"), config(model="bag")):  # the memory check's count
        assert ts.train.n_params(cfg) == sum(p.numel() for p in M.build_model(cfg).parameters())


def test_dropout_sits_on_the_embeddings_and_on_each_sublayer_output():
    # With p = 1 every dropout outputs zeros: the residual stream stays 0 from the embeddings on, so
    # the logits are norm_f(0) W_e^T = bias_f W_e^T everywhere (LayerNorm, whose random biases would
    # leak through any missing dropout). The attention weights are not dropped here, so that each
    # attention output reaches its residual dropout.
    m = model(std=0.3, pos="learned", norm="layernorm", dropout=1.0).train()
    for b in m.blocks:
        b.attn.dropout = 0.0
    logits, _ = m(torch.randint(0, 23, (2, 16)))
    torch.testing.assert_close(logits, (m.norm_f.bias @ m.wte.weight.T).expand(2, 16, 23))


# ---- sampling

@pytest.mark.parametrize("temperature, top_k, top_p, expected", [
    (1.0, 0, 0.7, [0.625, 0.375, 0, 0]),                   # 0.5 + 0.3 reaches 0.7: the nucleus is 2 tokens
    (1.0, 0, 0.85, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0]),
    (2.0, 0, 0.7, [0.43061, 0.33355, 0.23585, 0]),         # sqrt(p) first: 0.379 + 0.294 < 0.7, so 3 tokens
    (1.0, 3, 0.83, [0.625, 0.375, 0, 0]),                  # top-3 renormalised (0.526, 0.316, ...), then 0.83
    (0.5, 2, 1.0, [0.25 / 0.34, 0.09 / 0.34, 0, 0]),        # p^2, the top 2
])
def test_temperature_top_k_and_top_p_sample_the_hand_worked_distribution(temperature, top_k, top_p, expected):
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(40_000, 4)
    torch.manual_seed(0)
    freq = torch.bincount(M.sample_token(logits, temperature, top_k, top_p)[:, 0], minlength=4) / 40_000
    assert (freq - torch.tensor(expected)).abs().max() < 0.015  # 6 standard deviations
    assert torch.all(freq[torch.tensor(expected) == 0] == 0)
    assert torch.all(M.sample_token(logits[:3], 0.0) == 0)  # temperature 0: greedy


def test_sampling_flags_reach_sample_token(monkeypatch):
    seen, sample_token = [], M.sample_token

    def spy(logits, temperature=1.0, top_k=None, top_p=None):
        seen.append((temperature, top_k, top_p))
        return sample_token(logits, temperature, top_k, top_p)

    monkeypatch.setattr(M, "sample_token", spy)
    tok = ts.data.train_tokenizer("word", stories(20), 300)
    args = parse(["--temperature", "0.55", "--top-k", "7", "--top-p", "0.6", "--num-samples", "2",
                  "--max-new-tokens", "3", "--prompt", "Once upon"])
    out = ts.sample.tell_stories(args, model(vocab_size=len(tok)), tok)
    assert len(out) == 2 and all(s.startswith("Once upon") for s in out)
    assert seen and set(seen) == {(0.55, 7, 0.6)}


@pytest.mark.parametrize("kind", ["transformer", "bag"])
def test_generate_stops_at_the_end_of_the_story_and_passes_the_context(kind):
    m = model(model=kind)
    out = M.generate(m, torch.zeros(1, 3, dtype=torch.long), 40, temperature=0)
    assert out.shape == (1, 43)  # past block_size 16: the context is cut, generation goes on
    stop = out[0, 5].item()  # greedy: the token it produces at step 3 ends the story there
    assert torch.equal(M.generate(m, torch.zeros(1, 3, dtype=torch.long), 40, temperature=0, stop=stop)[0],
                       out[0, :out[0, 3:].tolist().index(stop) + 4])


# ---- optimisation and scoring

@pytest.mark.parametrize("kind, optimizer", [("transformer", "adamw"), ("bag", "sgd")])
def test_weight_decay_is_on_matrices_only(kind, optimizer):
    # A zero gradient: AdamW's Adam step and SGD's gradient term are 0, so a decayed parameter
    # becomes p (1 - lr wd) after one step (AdamW: decoupled; SGD: wd p is the whole gradient).
    m = model(std=0.3, model=kind)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    args = parse(["--model", kind, "--optimizer", optimizer, "--lr", "0.1", "--weight-decay", "0.5"])
    opt = ts.train.make_optimizer(m, args)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    matrices = ("wte.weight", "qkv.weight", "proj.weight", "fc.weight", "embedding.weight", "mlp.0.weight",
                "mlp.3.weight")
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] * (0.95 if n.endswith(matrices) else 1.0), msg=n)


def test_lr_schedule_is_linear_warmup_then_cosine():
    args = parse(["--lr", "1", "--min-lr", "0.1", "--warmup-steps", "2", "--steps", "6"])
    # step 0, 1: (s + 1) / 2; then 0.1 + 0.45 (1 + cos(pi (s - 2) / 4)); past the end: min-lr
    expected = [0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802, 0.1, 0.1]
    assert [round(ts.train.get_lr(s, args), 6) for s in range(8)] == expected


@pytest.mark.parametrize("kind", ["transformer", "bag"])
def test_flags_reach_the_optimiser_and_the_clipping_in_real_steps(kind, tmp_path, monkeypatch):
    seen, clips = [], []
    make_optimizer = ts.train.make_optimizer

    def spy_optimizer(m, args):  # the real optimiser, with a hook that reads it at every step
        opt = make_optimizer(m, args)
        opt.register_step_pre_hook(lambda o, *_: seen.append(
            (type(o).__name__, [(g["lr"], g.get("betas", g.get("momentum")), g["weight_decay"]) for g in o.param_groups])))
        return opt

    clip = torch.nn.utils.clip_grad_norm_

    def spy_clip(params, max_norm, *a, **kw):
        params = list(params)
        norm = clip(params, max_norm, *a, **kw)
        clips.append((max_norm, norm.item(), torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()))
        return norm

    monkeypatch.setattr(ts.train, "make_optimizer", spy_optimizer)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy_clip)
    ts.train.train(parse([*TINY, "--model", kind, "--data-dir", data_dir(tmp_path), "--out-dir", tmp_path / "run",
                          "--steps", "6", "--eval-interval", "6", "--log-interval", "1", "--lr", "0.01", "--min-lr",
                          "0.001", "--weight-decay", "0.37", "--beta2", "0.95", "--grad-clip", "1e-3",
                          "--tokenizer", "word"]))
    expected_lr = [0.005, 0.01, 0.01, 0.0086820, 0.0055, 0.0023180]  # the schedule above, x 0.01
    moment = (0.9, 0.95) if kind == "transformer" else 0.9  # AdamW's betas; SGD's momentum
    assert [s[0] for s in seen] == ["AdamW" if kind == "transformer" else "SGD"] * 6
    assert [[(round(lr, 7), b, wd) for lr, b, wd in s[1]] for s in seen] == \
           [[(lr, moment, 0.37), (lr, moment, 0.0)] for lr in expected_lr]
    assert len(clips) == 6 and all(c[0] == 1e-3 and c[1] > 1e-2 and c[2] == pytest.approx(1e-3, rel=1e-3)
                                   for c in clips)  # it did clip, to 1e-3


def test_bits_per_character_by_hand():
    class Stub(nn.Module):  # costs 0.1 t nats to predict token t, whatever the input
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1))

        def forward(self, x, y):
            return None, (0.1 * y.float()).mean()

    args = parse(["--block-size", "8", "--batch-size", "2"])
    out = ts.train.bits_per_character(Stub(), torch.arange(21).numpy(), 50, args, "cpu", nullcontext())
    # tokens 1..20 predicted once (windows of 8, 8 and 4): 0.1 (1 + ... + 20) = 21 nats, over 50 characters
    assert out["val_tokens"] == 20 and out["val_loss"] == pytest.approx(21 / 20)
    assert out["bits_per_character"] == pytest.approx(21 / math.log(2) / 50)
    assert out["characters_per_token"] == pytest.approx(50 / 20)


# ---- training, the command line, errors

def conditional_entropy(ids, order):
    """Nats per token of the best order-`order` Markov model of `ids`, fitted on `ids` themselves
    (so a lower bound on what that model would score): order 0 unigram, 2 trigram."""
    ctx = Counter(tuple(ids[i - order:i]) for i in range(order, len(ids)))
    full = Counter(tuple(ids[i - order:i + 1]) for i in range(order, len(ids)))
    n = len(ids) - order
    return -sum(c / n * math.log(c / ctx[k[:-1]]) for k, c in full.items())


def test_the_transformer_learns_beyond_trigrams_and_the_pipeline_shows_it(tmp_path):
    out, data = tmp_path / "run", data_dir(tmp_path, eot=True)
    ts.main.main([*TINY, "--data-dir", data, "--out-dir", str(out), "--steps", "200", "--eval-interval", "100",
                  "--log-interval", "1", "--lr", "1e-2", "--layer", "1", "--temperature", "0",
                  "--max-new-tokens", "60"])
    ckpt = torch.load(out / "ckpt.pt")
    tok = ts.data.load_tokenizer(ckpt["tokenizer"])
    valid = ts.data.read_stories(data, "valid")
    ids = ts.data.encode_stories(tok, valid).tolist()
    results = json.loads((out / "results.json").read_text())
    assert abs(float(log_rows(out)[0]["train_loss"]) - math.log(len(tok))) < 0.3  # uniform at first
    # below the best trigram model of the validation text itself: it reads more than the last two tokens
    assert results["val_loss"] < conditional_entropy(ids, 2)
    nats = results["val_loss"] * results["val_tokens"]
    assert results["bits_per_character"] == pytest.approx(nats / math.log(2) / ts.data.characters(valid))
    story = (out / "stories.txt").read_text()
    assert re.fullmatch(r"#### STORY 1 ####\nOnce upon a time, (\w+) went to the (\w+)\. \1 was happy\. [^\n]*\n\n",
                        story), story  # greedy: the template, the name kept
    html = (out / "attention.html").read_text()
    weights = json.loads(re.search(r"weights = (\[.*?\]);", html).group(1))
    tokens = json.loads(re.search(r"const tokens = (\[.*?\]), weights", html).group(1))
    w = torch.tensor(weights)  # (layer, head, query, key), rounded to 3 decimals
    prompt = ts.main.parse_args([]).attention_prompt
    assert w.shape == (2, 2, len(tokens), len(tokens)) and len(tokens) == min(32, len(tok.encode(prompt)))
    assert prompt.startswith("".join(tokens))
    assert torch.allclose(w.sum(-1), torch.ones(2, 2, len(tokens)), atol=0.01) and torch.all(w.triu(1) == 0)


def test_the_bag_model_learns_from_its_window_with_sgd(tmp_path):
    out, data = tmp_path / "bag", data_dir(tmp_path)
    args = parse([*TINY, "--model", "bag", "--data-dir", data, "--out-dir", out, "--steps", "60",
                  "--eval-interval", "30", "--tokenizer", "word"])
    assert args.optimizer == "sgd"
    ts.train.train(args)
    tok = ts.data.load_tokenizer(torch.load(out / "ckpt.pt")["tokenizer"])
    ids = ts.data.encode_stories(tok, ts.data.read_stories(data, "valid")).tolist()
    val_loss = json.loads((out / "results.json").read_text())["val_loss"]
    assert val_loss < 0.5 * conditional_entropy(ids, 0)  # far below the best context-free model


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    flags = [*TINY, "--data-dir", data_dir(tmp_path), "--steps", "8", "--eval-interval", "4", "--log-interval", "1",
             "--dropout", "0.1"]  # dropout on, so the RNG state must be restored too
    a = ts.train.train(parse([*flags, "--out-dir", str(tmp_path / "a")]))
    get_batch = ts.train.get_batch

    def interrupt_at_step_5(data, b, t, key):
        if key[1] == 5:
            raise KeyboardInterrupt
        return get_batch(data, b, t, key)

    monkeypatch.setattr(ts.train, "get_batch", interrupt_at_step_5)
    with pytest.raises(SystemExit) as e:
        ts.train.train(parse([*flags, "--out-dir", str(tmp_path / "b")]))
    assert e.value.code == 130
    monkeypatch.undo()
    b = ts.train.train(parse(["--out-dir", str(tmp_path / "b"), "--resume", "--device", "cpu"]))
    assert [r["train_loss"] for r in log_rows(tmp_path / "b")] == [r["train_loss"] for r in log_rows(tmp_path / "a")]
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
    args = parse([*TINY, "--data-dir", data_dir(tmp_path), "--out-dir", out, "--steps", "6", "--eval-interval", "2",
                  "--log-interval", "1"])
    with pytest.raises(SystemExit, match=rf"non-finite .* at step 3; stopping before the update; the last good "
                                         rf"checkpoint is {re.escape(str(out / 'ckpt.pt'))} \(step 2\); try a lower --lr"):
        ts.train.train(args)
    assert torch.load(out / "ckpt.pt")["step"] == 2 and len(calls) == 3


def test_training_waits_for_the_device_only_at_log_and_eval_steps(tmp_path, monkeypatch):
    # A host-device sync per step stalls a GPU; on CPU, count the calls that would be one. Budget:
    # the loss and the divergence flag at each log step, the weights check and the validation loss at
    # each eval step. A per-step .item() (or `if tensor:`) adds 20.
    root, calls = data_dir(tmp_path), []
    for name in ("item", "cpu", "tolist", "__bool__", "__float__"):
        def spy(self, *a, _real=getattr(torch.Tensor, name), _name=name, **kw):
            calls.append(_name)
            return _real(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, spy)
    steps, log_interval, eval_interval = 20, 5, 20
    args = parse([*TINY, "--data-dir", root, "--out-dir", tmp_path / "run", "--steps", steps, "--log-interval",
                  log_interval, "--eval-interval", eval_interval])
    prepared = ts.train.prepare_data(args)  # the data outside the count (the final score reads the loss once more)
    monkeypatch.setattr(ts.train, "prepare_data", lambda *a: prepared)
    monkeypatch.setattr(ts.train, "bits_per_character", lambda *a: {"val_loss": 0.0, "bits_per_character": 0.0,
                                                                     "characters_per_token": 1.0})
    ts.train.train(args)
    n = len(calls)
    monkeypatch.undo()
    assert steps // log_interval <= n <= 2 * (steps // log_interval) + 2 * (steps // eval_interval), calls


# ---- --preset gpu

def test_gpu_preset_is_llama2c_15m_model_and_recipe():
    args = parse(["--preset", "gpu"])
    assert (args.n_embd, args.n_layer, args.n_head, args.block_size, args.vocab_size) == (288, 6, 6, 256, 32_000)
    assert (args.batch_size, args.grad_accum, args.lr, args.min_lr, args.warmup_steps, args.steps) == (
        128, 4, 5e-4, 0.0, 1000, 100_000)
    assert (args.beta2, args.weight_decay, args.dropout, args.compile, args.corpus) == (0.95, 0.1, 0.0, True, "full")
    assert args.out_dir == "runs/tiny_stories_lm/transformer-gpu"
    cfg = M.Config(vocab_size=32_000, block_size=256, n_layer=6, n_head=6, n_embd=288)
    assert 15.0e6 < ts.train.n_params(cfg) == M.num_params(M.build_model(cfg)) < 15.5e6  # "15M"
    assert parse(["--preset", "gpu", "--steps", "7", "--no-compile"]).steps == 7  # typed flags win
    assert not parse(["--preset", "gpu", "--no-compile"]).compile


def test_gpu_preset_trains_on_the_full_corpus_files_not_the_excerpts(tmp_path, monkeypatch):
    root = data_dir(tmp_path)  # excerpts of stories(); the "full" files: other stories, separated by EOT
    full_valid = stories(30, seed=3)
    folder = tmp_path / "data" / "tinystories"
    (folder / "TinyStoriesV2-GPT4-train.txt").write_text("\n<|endoftext|>\n".join(stories(150, seed=2)))
    (folder / "TinyStoriesV2-GPT4-valid.txt").write_text("\n<|endoftext|>\n".join(full_valid))
    out = tmp_path / "run"
    ts.main.main([str(a) for a in ["--preset", "gpu", *TINY, "--grad-accum", "1", "--steps", "2",
                                   "--eval-interval", "2", "--log-interval", "1", "--no-compile", "--data-dir", root,
                                   "--out-dir", out]])
    assert json.loads((out / "results.json").read_text())["val_characters"] == sum(len(s) + 1 for s in full_valid)
    # without the full files the preset downloads them (here: offline) rather than train on an excerpt
    for split in ("train", "valid"):
        (folder / f"TinyStoriesV2-GPT4-{split}.txt").unlink()
    monkeypatch.setattr(ts.data, "download", lambda url, path: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit, match=r"\(looked for TinyStoriesV2-GPT4-train.txt\) and the download"):
        ts.main.main([str(a) for a in ["--preset", "gpu", *TINY, "--data-dir", root, "--out-dir", tmp_path / "b"]])


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {folder!r})
import main, train
model = train.train(main.parse_args({argv!r}))
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_two_process_gloo_ddp_trains_and_keeps_identical_weights(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    argv = [*TINY, "--data-dir", data_dir(tmp_path), "--out-dir", str(out), "--steps", "4", "--eval-interval", "2",
            "--log-interval", "1", "--grad-accum", "2"]
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(folder=str(ROOT / "tiny_stories_lm"), argv=argv, out=str(out)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    torch.manual_seed(1337)  # the run's --seed: its initial weights
    init = M.build_model(M.Config(**torch.load(out / "ckpt.pt")["config"])).state_dict()
    assert all(not torch.equal(w0[k], init[k]) for k in w0 if k.endswith("weight"))  # every matrix moved
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_tokenize_command_shows_both_tokenizers(tmp_path, capsys):
    ts.main.main(["tokenize", "Once Lily went to the park.", "--data-dir", data_dir(tmp_path), "--vocab-size", "300",
                  "--out-dir", str(tmp_path / "none")])
    out = capsys.readouterr().out
    assert "word-level tokenizer" in out and "byte-level BPE tokenizer" in out
    assert "Once| Lily| went| to| the| park|." in out


def test_missing_data_offline_is_a_one_line_error_naming_the_files_and_the_url(tmp_path, monkeypatch):
    def offline(url, path):
        raise OSError("no network")
    monkeypatch.setattr(ts.data, "download", offline)
    with pytest.raises(SystemExit, match="train_excerpt.txt.*huggingface.co.*TinyStoriesV2-GPT4-train.txt.*--data-dir"):
        ts.data.find_split(tmp_path, "train")
    assert not (tmp_path / "tinystories" / "TinyStoriesV2-GPT4-train.txt").exists()


def test_help_gives_the_readme_commands():
    readme = (ROOT / "tiny_stories_lm" / "README.md").read_text()
    doc = ts.main.__doc__
    for run in ("--model bag --context 2 --data-dir", "main.py --data-dir"):  # the bag's and the Transformer's
        assert run in readme and run in doc
    assert "1.610" in doc and "1.189" in doc and "shared" not in doc


def test_bad_flags_and_checkpoints_are_clear_errors(tmp_path, capsys):
    assert "divisible" in error_line(["--n-embd", "30", "--n-head", "4"], capsys)
    assert "--top-p" in error_line(["--top-p", "0"], capsys)
    assert "tokenize needs a text" in error_line(["tokenize"], capsys)
    assert "--tokenizer" in error_line(["--tokenizer", "chars"], capsys)
    torch.save({"folder": "gpt"}, tmp_path / "ckpt.pt")
    assert "checkpoint of gpt" in error_line(["sample", "--out-dir", tmp_path], capsys)
    cfg = config()
    torch.save({"folder": "tiny_stories_lm", "model": {k: v * float("nan") for k, v in M.build_model(cfg).state_dict().items()}},
               tmp_path / "ckpt.pt")
    assert "non-finite" in error_line(["sample", "--out-dir", tmp_path], capsys)


def test_a_fresh_run_does_not_overwrite_a_checkpoint(tmp_path, capsys):
    (tmp_path / "ckpt.pt").write_bytes(b"precious")
    assert "--resume" in error_line(["--data-dir", data_dir(tmp_path), "--out-dir", tmp_path, *TINY], capsys)
    assert (tmp_path / "ckpt.pt").read_bytes() == b"precious"


# ---- --benchmark

@pytest.mark.parametrize("kind, data", [("transformer", "random"), ("bag", "random"), ("transformer", "real")])
def test_benchmark_prints_one_json_line_of_the_quick_config(kind, data, tmp_path, capsys):
    root = data_dir(tmp_path) if data == "real" else tmp_path / "nothing"
    ts.main.main([str(a) for a in ["--benchmark", "--quick", "--model", kind, "--device", "cpu", "--benchmark-steps", "2",
                                   "--data-dir", root, "--out-dir", tmp_path / "run"]])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # --quick: width 64, 2 layers, 2 heads, the bag's hidden 128, sequences of 64, batch 16, 512 tokens
    V = 512 if data == "random" else len(ts.data.train_tokenizer("bpe", ts.data.read_stories(root, "train"), 512))
    C, L, H, T, B = 64, 2, 128, 64, 16
    m = M.build_model(M.Config(vocab_size=V, model=kind, block_size=T, n_layer=L, n_head=2, n_embd=C, hidden=H,
                               dropout=0.0))
    params = sum(p.numel() for p in m.parameters())
    assert (row["folder"], row["device"], row["data"], row["unit"], row["compile"]) == (
        "tiny_stories_lm", "cpu", data, "tokens", False)
    assert row["params"] == params and row["batch_size"] == B * T and row["torch"] == torch.__version__
    # 6 per matmul weight (the embedding is a lookup, counted once as the tied output layer), plus
    # 12 L T C for the Transformer's QK^T and AV (PaLM, appendix B)
    expected = 6 * (params - V * C) if kind == "bag" else 6 * params + 12 * L * T * C
    assert row["flops_per_sample"] == expected
    # ... within 2% of FlopCounterMode's count of one forward and backward (norms and biases are
    # not matmuls); the math attention backend makes the attention products countable
    x = torch.randint(V, (B, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(x, x)[1].backward()
    assert row["flops_per_sample"] == pytest.approx(counter.get_total_flops() / (B * T), rel=0.02)
    assert row["samples_per_s"] == pytest.approx(row["batch_size"] / (row["step_ms"] / 1000), rel=1e-6)
    assert row["tflops"] == pytest.approx(row["flops_per_sample"] * row["samples_per_s"] / 1e12, rel=1e-6)
    assert row["mfu"] is None and row["peak_mem_mb"] > 0
    assert not (tmp_path / "run").exists()  # nothing written


# ---- the shipped models (pretrained/tiny_stories_lm/)

@pytest.mark.parametrize("model", ["transformer", "bag"])
def test_the_shipped_models_load_into_todays_code_and_reproduce_their_check(model):
    saved, weights, card = ts.pretrained.pretrained_weights(model)
    tok, cfg = ts.data.load_tokenizer(saved), ts.model.Config(**card["config"])
    net = ts.model.build_model(cfg)
    net.load_state_dict(weights)
    net.eval()
    assert len(tok) == cfg.vocab_size and cfg.model == model
    check, T = card["check"], min(cfg.block_size, 64)
    x = torch.randint(cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = net(x[:, :-1], x[:, 1:])
    assert check["shape"] == [2, T]
    assert logits.sum().item() == pytest.approx(check["logits_sum"], rel=1e-3, abs=1e-1)
    assert logits.abs().sum().item() == pytest.approx(check["logits_abs_sum"], rel=1e-3)
    assert loss.item() == pytest.approx(check["loss"], rel=1e-3)
    assert F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item() == pytest.approx(check["loss"], rel=1e-3)
    assert logits[:, -1].argmax(-1).tolist() == check["argmax_last"]
    # a trained model, not noise: after "Once upon a" the likeliest next token is " time"
    with torch.no_grad():
        nxt = net(torch.tensor([tok.encode("Once upon a")]))[0][0, -1].argmax().item()
    assert tok.decode([nxt]) == " time"


def test_sample_pretrained_tells_a_story_and_draws_the_figures_without_a_run(tmp_path, capsys):
    out, figures = tmp_path / "out", tmp_path / "figures"
    ts.main.main(["sample", "--pretrained", "--prompt", "Once upon a time", "--device", "cpu", "--num-samples", "1",
                  "--max-new-tokens", "30", "--out-dir", str(out), "--figures-dir", str(figures)])
    assert (out / "stories.txt").read_text().startswith("#### STORY 1 ####\nOnce upon a time")
    assert (figures / "tiny_stories_lm_attention_layer0.png").is_file() and (out / "attention.html").is_file()
    assert (figures / "tiny_stories_lm_transformer_loss.png").is_file() and not (out / "ckpt.pt").exists()


def test_a_tampered_shipped_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys):
    root = shipped_copy("tiny_stories_lm", tmp_path)
    monkeypatch.setattr(ts.pretrained, "ROOT", root)
    tokenizer = root / "tiny_stories_lm" / "transformer.tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace("time", "tame", 1))  # one merge of the BPE changed
    line = error_line(["sample", "--pretrained", "--device", "cpu", "--out-dir", tmp_path / "out"], capsys)
    assert "pretrained/tiny_stories_lm/transformer.tokenizer.json" in line and "SHA256SUMS" in line
    assert not (tmp_path / "out").exists()


def test_fine_tuning_starts_from_the_shipped_bag_and_export_round_trips(tmp_path, monkeypatch):
    """--pretrained without a command trains on from the shipped weights and tokenizer; --export-pretrained
    of that run writes files that load back to the run's weights, rounded to bf16."""
    saved, shipped, card = ts.pretrained.pretrained_weights("bag")
    (tmp_path / "tinystories").mkdir()
    for split in ("train", "valid"):
        (tmp_path / "tinystories" / f"{split}_excerpt.txt").write_text(
            "\n\n".join(f"Once upon a time, Lily saw {n} red balls in the park." for n in range(60)))
    run = tmp_path / "run"
    net = ts.train.train(ts.main.parse_args(["--pretrained", "--model", "bag", "--device", "cpu", "--data-dir",
                                             str(tmp_path), "--steps", "2", "--eval-interval", "2", "--log-interval",
                                             "1", "--lr", "1e-9", "--block-size", "16", "--out-dir", str(run)]))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, shipped[k], atol=1e-6, rtol=0)
    monkeypatch.setattr(ts.pretrained, "ROOT", tmp_path / "pretrained")
    ts.main.main(["--export-pretrained", str(run), "--data-dir", str(tmp_path)])
    saved2, back, card2 = ts.pretrained.pretrained_weights("bag")  # passes the check of the fresh manifest line
    assert saved2 == saved and "--pretrained" in card2["command"] and "--model bag" in card2["command"]
    for k, v in net.state_dict().items():
        assert torch.equal(back[k], v.to(torch.bfloat16).float()), k
