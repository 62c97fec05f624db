"""lm_compression/: the arithmetic coder against random streams and the ideal code length, the
codec's round trip on awkward bytes with byte models and a (tiny, offline) Hugging Face LM,
the KV cache against a full pass, the container's checks, learning, and the command line."""
import contextlib
import hashlib
import io
import json
import gzip
import lzma
import math
import os
import shutil
import stat
import subprocess
import sys
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import flip_bit, import_folder, shipped_copy

lmc = import_folder("lm_compression")
coder, codec, model, predictors = lmc.coder, lmc.codec, lmc.model, lmc.predictors


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is the fastest, and on cores shared with other jobs torch's
    default of two made this file 9x slower (394 s against 45 s). Tests of thread counts set their own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

EDGE_CASES = {"empty": b"", "one byte": b"\x00", "all 256 values": bytes(range(256)),
              "invalid utf-8": b"caf\xc3 \xff\xfe broken \x80\x80 end \xe2\x82",
              "utf-8 text": "naïve café, 1984 — «Big Brother» 猫".encode(),
              "random": np.random.default_rng(0).integers(0, 256, 700).astype(np.uint8).tobytes(),
              "binary": np.arange(0, 4000, 13, dtype="<u4").tobytes() + bytes(40) + b"\x7fELF\x02\x01"}


def random_stream(seed):
    """Symbols drawn from random distributions: flat, peaked, and with near-zero entries."""
    rng = np.random.default_rng(seed)
    V, n = int(rng.integers(2, 400)), int(rng.integers(0, 300))
    dists, symbols = [], []
    for _ in range(n):
        p = rng.dirichlet(np.full(V, rng.choice([0.01, 0.3, 3.0])))
        p[rng.integers(V, size=3)] = rng.choice([0.0, 1e-300, 1e-12])  # near-impossible symbols
        p[rng.integers(V)] += 1e-3                        # (not all of them)
        s = int(rng.integers(V)) if rng.random() < 0.1 else int(rng.choice(V, p=p / p.sum()))  # sometimes those
        dists.append(p)
        symbols.append(s)
    return dists, symbols


@pytest.mark.parametrize("seed", range(40))
def test_coder_round_trips_random_streams_within_a_few_bits_of_the_ideal(seed):
    dists, symbols = random_stream(seed)
    enc, ideal = coder.Encoder(), 0.0
    for p, s in zip(dists, symbols):
        cum = coder.quantize(p)
        enc.encode(cum, s)
        ideal += -math.log2((cum[s + 1] - cum[s]) / cum[-1])
    data = enc.finish()
    dec = coder.Decoder(data)
    assert [dec.decode(coder.quantize(p)) for p in dists] == symbols
    assert len(enc.bits) <= ideal + 2 + len(symbols) * 2 ** -15  # the final interval, rounding
    assert len(data) == math.ceil(len(enc.bits) / 8)


def exact_step(rng):
    """(cum, s): a random distribution over up to 40 symbols with a power-of-two total, in which the
    symbol s to code has a power-of-two frequency at a random position. The coder's interval then stays
    a power of two wide, every one of its divisions is exact, yet intervals fall anywhere (so that
    they straddle the middle, and the underflow bits are exercised)."""
    k = int(rng.integers(6, 17))
    f_s = 1 << int(rng.integers(0, k - 1))
    V = int(rng.integers(2, 40))
    cuts = np.sort(rng.choice(np.arange(1, (1 << k) - f_s), V - 2, replace=False)) if V > 2 else []
    others = np.diff(np.concatenate([[0], cuts, [(1 << k) - f_s]]))             # V - 1 frequencies >= 1
    s = int(rng.integers(V))
    freqs = np.concatenate([others[:s], [f_s], others[s:]])
    return np.concatenate([[0], np.cumsum(freqs)]), s


def narrow(low, width, cum, s):
    return low + width * Fraction(int(cum[s]), int(cum[-1])), width * Fraction(int(cum[s + 1] - cum[s]), int(cum[-1]))


@pytest.mark.parametrize("seed", range(8))
def test_the_code_is_a_binary_fraction_inside_the_messages_interval(seed):
    """The code, read as a binary fraction 0.b1b2..., must lie in the message's interval
    [low, low + P(message)), computed here with Fractions (Sec. 2; Witten, Neal & Cleary); decoding
    by that interval alone gives the symbols back; the code is at most 2 bits longer than -log2 P."""
    rng = np.random.default_rng(seed)
    steps = [exact_step(rng) for _ in range(int(rng.integers(1, 120)))]
    enc, low, width = coder.Encoder(), Fraction(0), Fraction(1)
    for cum, s in steps:
        enc.encode(cum, s)
        low, width = narrow(low, width, cum, s)
    bits = enc.finish_bits()
    value = Fraction(int("".join(map(str, bits)), 2), 2 ** len(bits))
    assert low <= value < low + width
    assert len(bits) <= math.log2(width.denominator) - math.log2(width.numerator) + 2   # -log2 P, exactly
    low, width = Fraction(0), Fraction(1)
    for cum, s in steps:                                                # an independent decoder: the interval itself
        assert int(np.searchsorted(cum, math.floor((value - low) / width * int(cum[-1])), side="right")) - 1 == s
        low, width = narrow(low, width, cum, s)


def test_quantize_keeps_every_symbol_possible_and_costs_little():
    rng = np.random.default_rng(1)
    for V in (16, 256, 50_000):
        p = rng.dirichlet(np.full(V, 0.05))
        p[:10] = [0, np.nan, np.inf, -1, 1e-300, 0, 0, 0, 0, 0]
        cum = coder.quantize(p)
        freq = np.diff(cum)
        assert freq.min() >= 1 and cum[-1] <= 2 ** coder.TOTAL_BITS and len(freq) == V
        q = p.copy()
        q[~np.isfinite(q) | (q < 0)] = 0
        q /= q.sum()
        kl = np.sum(q[q > 0] * np.log2(q[q > 0] / (freq[q > 0] / cum[-1])))
        assert kl < 1e-3                                  # bits per symbol lost to the integer grid
    assert np.array_equal(np.diff(coder.quantize(np.zeros(5))), np.full(5, 1))


def tiny_byte_lm(context=8, seed=0, integer=True):
    torch.manual_seed(seed)
    net = model.ByteTransformer(model.ByteConfig(context=context, n_layer=1, n_head=2, n_embd=16))
    return predictors.IntByteLM(net, f"tiny-{seed}") if integer else predictors.ByteLM(net, f"tiny-{seed}", "cpu")


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_byte_model_round_trips_edge_cases(name):
    lm = tiny_byte_lm()
    data = EDGE_CASES[name]
    blob = codec.compress(data, lm, progress=False)
    assert codec.decompress(blob, lm, progress=False) == data


def test_many_chunks_in_several_batches_round_trip():
    lm = tiny_byte_lm(context=4)
    data = bytes(range(256)) * 2 + b"tail"                # 129 chunks of 4: more than one batch of 32
    assert codec.decompress(codec.compress(data, lm, progress=False), lm, progress=False) == data


def reference_forward(net, x):
    """The byte model written out: embeddings, then per block x + W_o softmax(q k^T / sqrt(d) + causal) v
    on LayerNorm(x), x + W_2 GELU(W_1 LayerNorm(x)); LayerNorm, GELU and the head (from torch.nn.functional)."""
    B, T = x.shape
    h = net.tok.weight[x] + net.pos.weight[:T]
    C, nh = h.shape[-1], net.cfg.n_head
    causal = torch.full((T, T), float("-inf")).triu(1)
    for blk in net.blocks:
        a = F.layer_norm(h, (C,), blk.ln_1.weight, blk.ln_1.bias)
        q, k, v = (a @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).split(C, -1)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(C // nh) + causal, -1)
        h = h + (w @ v).transpose(1, 2).reshape(B, T, C) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        m = F.layer_norm(h, (C,), blk.ln_2.weight, blk.ln_2.bias)
        h = h + F.gelu(m @ blk.mlp[0].weight.T + blk.mlp[0].bias) @ blk.mlp[2].weight.T + blk.mlp[2].bias
    return F.layer_norm(h, (C,), net.ln_f.weight, net.ln_f.bias) @ net.head.weight.T


@torch.no_grad()
def test_byte_model_full_pass_and_kv_cache_steps_equal_the_written_out_transformer():
    net = scaled_net(context=12)
    x = torch.cat([torch.full((3, 1), model.BOS), torch.randint(0, 256, (3, 11))], 1)
    ref = reference_forward(net, x)
    full, _ = net(x)
    past, steps = None, []
    for t in range(12):
        logits, past = net(x[:, t:t + 1], past)
        steps.append(logits)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-4, rtol=1e-4)


def test_every_flipped_bit_and_truncation_is_reported():
    lm = tiny_byte_lm()
    blob = codec.compress(b"It was a bright cold day in April, and the clocks were striking thirteen.", lm,
                          progress=False)
    for i in range(len(blob) * 8):
        bad = bytearray(blob)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(codec.Corrupt):
            codec.decompress(bytes(bad), lm, progress=False)
    for n in (0, 3, 10, len(blob) - 1):
        with pytest.raises(codec.Corrupt):
            codec.decompress(blob[:n], lm, progress=False)


def as_version_2(blob):
    """A version-3 container rewritten as version 2 wrote it: version byte 2, no group field (v2 always
    coded 32 chunks side by side), the trailing CRC recomputed."""
    h = codec.read_header(blob)
    assert h["group"] == codec.GROUP_V2
    start = len(blob) - codec.CHECK.size - len(h["code"]) - codec.TAIL.size
    body = (blob[:4] + bytes([2]) + blob[5:start] + codec.TAIL_V2.pack(h["digest"], h["context"], h["length"], h["crc"])
            + h["code"])
    return body + codec.CHECK.pack(zlib.crc32(body))


ORWELL = b"It was a bright cold day in April, and the clocks were striking thirteen. " * 6  # 57 chunks of 8


def test_version_2_files_are_still_decoded_and_32_chunks_side_by_side_code_as_before():
    """The bytes version 2 wrote for this model and text (sha256 taken with the code before version 3,
    commit 7fb1f3b): the integer path's code is exact, so the same model gives the same bytes anywhere."""
    lm = tiny_byte_lm()
    v2 = as_version_2(codec.compress(ORWELL, lm, progress=False, group=codec.GROUP_V2))
    assert hashlib.sha256(v2).hexdigest() == "e0cfee9489924baf47d6d15cf174dfd50848cf919d0111b1ec5f8fa8908b22b3"
    assert codec.decompress(v2, lm, progress=False) == ORWELL
    float_lm = tiny_byte_lm(integer=False)
    assert codec.decompress(as_version_2(codec.compress(ORWELL, float_lm, progress=False, group=32)), float_lm,
                            progress=False) == ORWELL
    v4 = bytearray(v2)
    v4[4] = 4
    with pytest.raises(codec.Corrupt, match="format version 4; this tool reads versions 2 and 3"):
        codec.decompress(bytes(v4), lm, progress=False)


def test_the_group_fills_the_cache_budget_and_decoding_refuses_a_cache_the_machine_cannot_hold(monkeypatch):
    """Chunks side by side: as many as 2 GiB of decoding's KV cache holds, at most 2048: the shipped model's
    shape (4 layers, width 128, context 128, float64: 1 MiB a chunk) gets 2048, a 6-layer, 512-wide model of
    context 256 (12 MiB a chunk) 170; the container records it. A file whose cache does not fit the machine
    is refused in one line before anything is decoded."""
    shipped = model.ByteTransformer(model.ByteConfig(context=128, n_layer=4, n_head=4, n_embd=128))
    big = model.ByteTransformer(model.ByteConfig(context=256, n_layer=6, n_head=8, n_embd=512))
    assert [codec.group_for(predictors.IntByteLM(net, "x")) for net in (shipped, big)] == [2048, 170]
    assert codec.group_for(predictors.ByteLM(big, "x", "cpu")) == 341              # float32: half the bytes
    lm, data = tiny_byte_lm(), ORWELL * 3
    blob = codec.compress(data, lm, progress=False)
    assert codec.read_header(blob)["group"] == codec.group_for(lm) == 2048
    chunks = -(-len(data) // lm.context)
    monkeypatch.setattr(codec, "device_memory", lambda device: chunks * lm.cache_bytes - 1)
    with pytest.raises(SystemExit, match=r"^lm_compression: decoding this file takes about .* GiB .*more memory$"):
        codec.decompress(blob, lm, progress=False)
    monkeypatch.setattr(codec, "device_memory", lambda device: chunks * lm.cache_bytes)
    assert codec.decompress(blob, lm, progress=False) == data


@pytest.mark.parametrize("group, passes", [(1, 8), (3, 8), (512, 8), (3, 1), (512, 5), (512, 256)])
def test_the_full_pass_encoder_writes_what_the_step_by_step_decoder_reads(group, passes, monkeypatch):
    """Encoding with the integer path takes every position's frequencies from full passes; the code must
    be the one the position-by-position loop writes (and decodes), for any group of chunks side by side
    and any number of chunks per full pass (8 on a CPU, 256 on a GPU)."""
    assert (codec.full_pass("cpu"), codec.full_pass("meta")) == (8, 256)
    monkeypatch.setattr(codec, "full_pass", lambda device: passes)
    lm, data = tiny_byte_lm(), ORWELL[:-3]                              # the last chunk 5 bytes long
    steps = codec.EncodeIO()
    codec.code_bytes(lm, steps, bytearray(data), len(data), tqdm_stub(), group)
    blob = codec.compress(data, lm, progress=False, group=group)
    assert codec.read_header(blob)["code"] == steps.coder.finish()
    assert codec.read_header(blob)["group"] == group and codec.decompress(blob, lm, progress=False) == data


@pytest.mark.parametrize("kernels", ["written out", "compiled"])
def test_the_integer_path_writes_the_bytes_it_wrote_before_and_compiled_kernels_write_them_too(kernels, monkeypatch):
    """The code of a fixed model and text (sha256 taken with the code at dedcd10, before `--compile` and the
    speed-ups after it) with the kernels as written and with `intmodel.fuse`'s compiled ones: the same bytes.
    512 chunks side by side, the default then (the container records it)."""
    if kernels == "compiled":
        for name in ("per_row", "requantize", "i_gelu", "attention_weights"):  # restored after the test
            monkeypatch.setattr(im, name, getattr(im, name))
        im.fuse()
        assert hasattr(im.i_gelu, "_torchdynamo_orig_callable")
    lm = predictors.IntByteLM(scaled_net(context=16), "scaled")
    data = ORWELL + np.random.default_rng(0).integers(0, 256, 300).astype(np.uint8).tobytes()
    blob = codec.compress(data, lm, progress=False, group=512)
    assert hashlib.sha256(blob).hexdigest() == "4f53e651ca4999341d766daf30be882f85006ad5cd069707a1eaaded3b820138"
    assert codec.decompress(blob, lm, progress=False) == data


def tqdm_stub():
    class Bar:
        def update(self, n):
            pass
    return Bar()


def test_another_model_is_refused():
    blob = codec.compress(b"hello", tiny_byte_lm(seed=0), progress=False)
    with pytest.raises(codec.Corrupt, match="compressed with model tiny-0"):
        codec.decompress(blob, tiny_byte_lm(seed=1), progress=False)


def test_sampling_decodes_coin_flips_into_the_models_distribution():
    class Peaked:  # 'a' with probability 0.9, the rest spread evenly
        kind, context, vocab = "bytes", 64, 256

        def freqs(self, inputs, past=None):
            p = np.full(256, 0.1 / 255)
            p[ord("a")] = 0.9
            return torch.from_numpy(np.stack([coder.quantize(p)] * len(inputs))), past
    text = lmc.sample.sample(Peaked(), 64, seed=0) + lmc.sample.sample(Peaked(), 64, seed=1)
    assert 0.75 < text.count(b"a") / len(text) < 0.99


@pytest.fixture(scope="module")
def token_lm():
    """A tiny Llama and a byte-level BPE tokenizer, both built here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tf = predictors.transformers()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the clocks were striking thirteen"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")
    torch.manual_seed(0)
    net = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    return predictors.TokenLM(net, tokenizer, "tiny-llama", "cpu", context=64)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_token_lm_round_trips_edge_cases_escaping_what_it_cannot_tokenize(token_lm, name):
    data = EDGE_CASES[name] * (3 if name == "utf-8 text" else 1)  # several chunks, cut between characters
    blob = codec.compress(data, token_lm, progress=False)
    assert codec.decompress(blob, token_lm, progress=False) == data


@torch.no_grad()
def test_token_lm_codes_a_chunk_in_its_cross_entropy_plus_mode_and_length(token_lm):
    """One chunk: 1 bit of mode (0 of {0, 1} with counts 1, 1), 16 bits of token count, then the tokens
    at -log2 q, q the quantised softmax of one full pass of the Hugging Face model (not the KV cache)."""
    text = b"the clocks were striking thirteen, the clocks"
    ids = token_lm.tokenize(text)
    logits = token_lm.net(input_ids=torch.tensor([[token_lm.bos] + ids[:-1]])).logits[0]
    cums = [coder.quantize(p) for p in torch.softmax(logits.double(), -1).numpy()]
    ideal = 1 + 16 + sum(-math.log2((c[i + 1] - c[i]) / c[-1]) for c, i in zip(cums, ids))
    enc = codec.EncodeIO()
    codec.code(token_lm, enc, bytearray(text), len(text), True, progress=False)
    assert ideal - 0.5 <= len(enc.coder.finish_bits()) <= ideal + 2.5      # float: the cache's last bits may differ


def test_token_lm_codes_text_as_tokens(token_lm):
    text = b"the clocks were striking thirteen " * 4
    assert token_lm.tokenize(text) is not None and token_lm.tokenize(b"\xff") is None
    assert len(codec.compress(text, token_lm, progress=False)) < len(text)


def run_main(*args):
    """main.main in this process: (exit code, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            lmc.main.main([str(a) for a in args])
        except SystemExit as e:
            return e.code, out.getvalue()
    return 0, out.getvalue()


def error(*args):
    """The one-line message a bad command stops with."""
    with pytest.raises(SystemExit) as e:
        lmc.main.main([str(a) for a in args])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code, e.value.code
    return e.value.code


def english(n_sentences, seed=0):
    """Simple English: sentences from a small grammar, words chosen at random (so gzip finds few long repeats)."""
    rng = np.random.default_rng(seed)
    words = [["Winston", "Julia", "O'Brien", "The Party", "Big Brother", "The telescreen", "A thin man", "The old woman",
              "Syme", "Parsons", "The girl", "Nobody"],
             ["watched", "remembered", "wrote about", "looked at", "thought of", "forgot", "loved", "hated", "feared",
              "found", "carried", "believed in"],
             ["the diary", "the glass paperweight", "the Ministry of Truth", "the proles", "the old song",
              "a photograph", "the canteen", "the dark hair", "the bells of St Clement's", "the Brotherhood",
              "the coral", "the rats"],
             ["in the canteen", "at night", "without a word", "for a long time", "again", "in silence",
              "with a kind of fear", "before the Two Minutes Hate"]]
    return " ".join(" ".join(rng.choice(w) for w in words) + "." for _ in range(n_sentences))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte model trained for a few seconds on simple English, then the held-out round trip and a sample."""
    d = tmp_path_factory.mktemp("lmc")
    text = d / "text.txt"
    text.write_text(english(500))
    code, out = run_main("train", "--data", text, "--out", d / "m.pt", "--steps", 400, "--context", 32,
                         "--n-layer", 1, "--n-head", 2, "--n-embd", 48, "--batch-size", 16, "--lr", 6e-3,
                         "--eval-interval", 200, "--warmup-steps", 10, "--device", "cpu")
    assert code == 0, out
    return d, out


def test_a_trained_quick_model_codes_held_out_english_below_gzip(trained):
    d, out = trained
    rates = [float(line.split("held-out ")[1].split(" bits")[0]) for line in out.splitlines()
             if line.startswith("step")]
    assert rates[-1] < rates[0] < 8, out                               # ~8 bits/byte at random init
    held_out = (d / "m.heldout.txt").read_bytes()
    assert held_out == (d / "text.txt").read_bytes()[-len(held_out):] and len(held_out) > 2000   # never trained on
    blob = codec.compress(held_out, predictors.load_predictor(str(d / "m.pt"), "cpu"), progress=False)
    assert len(blob) < 0.8 * len(gzip.compress(held_out, 9)), (len(blob), len(gzip.compress(held_out, 9)))
    assert f"{len(blob):,} bytes compressed" in out and "decompressed exactly" in out


def test_compress_decompress_files_and_their_errors(trained):
    d, _ = trained
    src = d / "in.bin"
    src.write_bytes(EDGE_CASES["invalid utf-8"] * 5 + b"Big Brother is watching you")
    assert run_main("compress", src, d / "c.lmz", "--model", d / "m.pt")[0] == 0
    assert run_main("decompress", d / "c.lmz", d / "out.bin")[0] == 0   # the model named in the header
    assert (d / "out.bin").read_bytes() == src.read_bytes()

    assert "is the input file" in error("compress", src, src, "--model", d / "m.pt", "--force")
    assert "exists; pass --force" in error("decompress", d / "c.lmz", d / "out.bin")
    bad = bytearray((d / "c.lmz").read_bytes())
    bad[len(bad) // 2] ^= 16
    (d / "bad.lmz").write_bytes(bytes(bad))
    assert "checksum mismatch" in error("decompress", d / "bad.lmz", d / "never.bin")
    assert not (d / "never.bin").exists() and not list(d.glob(".never.bin*"))
    assert "not a file this tool wrote" in error("decompress", src, d / "never.bin")
    assert "no model" in error("compress", src, d / "x", "--out-dir", d / "nothing")
    assert "not a byte-model checkpoint" in error("compress", src, d / "x", "--model", src)
    for missing in ("no-such-model-dir", "missing.pt", "missing.gguf"):   # not a Hugging Face repo-id error
        assert f"--model {d / missing}: no such file or folder" in error("compress", src, d / "x", "--model",
                                                                          d / missing)
    assert "no training text" in error("train", "--data", d / "none.txt")
    assert "exists; pass --resume" in error("train", "--data", d / "text.txt", "--out", d / "m.pt")


def test_number_is_the_code_and_its_length_the_models_cross_entropy(trained):
    d, _ = trained
    sentence = b"Big Brother watched the diary at night."
    code, out = run_main("number", sentence.decode(), "--model", d / "m.pt")
    assert code == 0 and "(exact)" in out, out
    binary = out.split("as a binary fraction: 0.")[1].split()[0]
    decimal = out.split("in decimal, exactly: 0.")[1].split()[0]
    assert Fraction(int(binary, 2), 2 ** len(binary)) == Fraction(int(decimal), 10 ** len(decimal))
    ideal = ideal_bits(predictors.load_predictor(str(d / "m.pt"), "cpu").int_net, sentence)
    assert ideal <= len(binary) <= ideal + 2 + 1e-3, (len(binary), ideal)


def test_stdin_to_stdout_round_trip_writes_nothing_else_to_stdout(trained, monkeypatch, capsys):
    d, _ = trained
    data = b"\x00\xffWar is peace." * 3

    def run(stdin):
        out = io.BytesIO()
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(out, write_through=True))
        lmc.main.main(["decompress" if stdin[:4] == b"LMZ\x1a" else "compress", "-", "-", "--model", str(d / "m.pt")])
        return out.getvalue()
    blob = run(data)
    assert codec.read_header(blob)["length"] == len(data)                 # a container and nothing else
    assert run(blob) == data
    with pytest.raises(SystemExit):
        lmc.main.main(["train", "--n-embd", "30", "--n-head", "4"])
    assert "--n-embd 30 is not divisible by --n-head 4" in capsys.readouterr().err


def test_benchmark_reports_the_sizes_each_compressor_gives(trained, tmp_path):
    d, _ = trained
    data = english(120, seed=1).encode()[:5000]                         # three 2048-byte chunks
    (tmp_path / "t.txt").write_bytes(data)
    code, out = run_main("benchmark", tmp_path / "t.txt", "--model", d / "m.pt", "--out-dir", tmp_path, "--also-float")
    assert code == 0, out
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[3:5] for line in out.splitlines()
            if line.startswith("| ") and "compressor" not in line}
    chunks = [data[i:i + 2048] for i in range(0, len(data), 2048)]
    lm_int, lm_float = (predictors.load_predictor(str(d / "m.pt"), "cpu", integer=i) for i in (True, False))
    expected = {("gzip -9", "whole file"): len(gzip.compress(data, 9)),
                ("gzip -9", "2048-byte chunks"): sum(len(gzip.compress(c, 9)) for c in chunks)
                - 2 * len(gzip.compress(b"", 9)),                     # the header counted once, as the paper
                ("xz -9", "whole file"): len(lzma.compress(data, preset=9)),
                ("m.pt", "32-byte chunks (bytes, integer)"): len(codec.compress(data, lm_int, progress=False)),
                ("m.pt", "32-byte chunks (bytes, float)"): len(codec.compress(data, lm_float, progress=False))}
    for key, size in expected.items():
        rate, reported = rows[key]
        assert int(reported.replace(",", "")) == size and rate.strip() == f"{size / len(data):.1%}", (key, rows[key])
    assert (tmp_path / "lm_compression_rates.png").stat().st_size > 0


def test_outputs_that_cannot_be_written_are_refused_in_one_line_before_the_model_loads(trained, tmp_path):
    d, _ = trained
    src = tmp_path / "in.txt"
    src.write_bytes(b"War is peace.")
    line = error("compress", src, tmp_path / "missing" / "out.lmz", "--model", d / "m.pt")
    assert f"there is no folder {tmp_path / 'missing'}" in line
    (tmp_path / "folder").mkdir()
    for force in ([], ["--force"]):                      # not "exists; pass --force", then IsADirectoryError
        assert "is a folder; name a file" in error("compress", src, tmp_path / "folder", "--model", d / "m.pt", *force)
    assert list((tmp_path / "folder").iterdir()) == [] and not (tmp_path / "missing").exists()


@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_ctrl_c_is_one_line_and_leaves_nothing_behind(trained, tmp_path, monkeypatch, command):
    d, _ = trained
    src = tmp_path / "in"
    src.write_bytes(codec.compress(b"War is peace.", lmc.predictors.load_predictor(str(d / "m.pt"), "cpu"), progress=False)
                    if command == "decompress" else b"War is peace.")
    calls = []

    def interrupted(*args, **kwargs):                   # Ctrl-C in the middle of coding
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(lmc.main, command, interrupted)
    line = error(command, src, tmp_path / "out", "--model", d / "m.pt")
    assert calls and "interrupted" in line and "nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_resume_without_a_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Freedom is the freedom to say that two plus two make four. " * 20)
    line = error("train", "--resume", "--data", text, "--out", tmp_path / "none.pt", "--device", "cpu")
    assert f"there is nothing to resume at {tmp_path / 'none.pt'}" in line


def test_compress_finds_what_train_quick_wrote_or_says_where_it_looked(trained, tmp_path, monkeypatch, capsys):
    d, _ = trained
    monkeypatch.chdir(tmp_path)
    quick = lmc.main.parse_args(["train", "--quick"])
    (tmp_path / "in.txt").write_bytes(b"Ignorance is strength.")
    line = error("compress", "in.txt", "out.lmz")
    assert "no model at runs/lm_compression/byte_model.pt or runs/lm_compression-quick/byte_model.pt" in line
    Path(quick.out).parent.mkdir(parents=True)
    Path(quick.out).write_bytes((d / "m.pt").read_bytes())
    assert run_main("compress", "in.txt", "out.lmz")[0] == 0
    assert f"using {quick.out}" in capsys.readouterr().err
    assert run_main("decompress", "out.lmz", "back.txt")[0] == 0
    assert (tmp_path / "back.txt").read_bytes() == b"Ignorance is strength."
    assert f"no model at {tmp_path / 'elsewhere' / 'byte_model.pt'};" in error(
        "compress", "in.txt", "x.lmz", "--out-dir", tmp_path / "elsewhere")   # an explicit --out-dir: only there


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_permissions_a_normal_write_gives(trained, tmp_path, umask):
    d, _ = trained
    src = tmp_path / "in.txt"
    src.write_bytes(b"Who controls the past controls the future.")
    old = os.umask(umask)
    try:
        with open(tmp_path / "reference", "w"):
            pass
        assert run_main("compress", src, tmp_path / "c.lmz", "--model", d / "m.pt")[0] == 0
        assert run_main("decompress", tmp_path / "c.lmz", tmp_path / "back.txt")[0] == 0
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "reference").stat().st_mode)
    assert mode == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "c.lmz").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "back.txt").stat().st_mode) == mode


# --- the integer path (intmodel.py, issue 26): kernels against float references, then invariances ---
im = lmc.intmodel
SCALE = 2 ** im.F


def fixed(x):
    return torch.round(torch.as_tensor(x, dtype=torch.float64) * SCALE).long()


def test_i_sqrt_is_the_integer_square_root():
    rng = np.random.default_rng(0)
    n = [1, 2, 3, 4, 15, 16, 17, 2 ** 44 - 1, 2 ** 44, 2 ** 62 - 1] + [int(v) for v in rng.integers(1, 2 ** 62, 500)]
    assert im.i_sqrt(torch.tensor(n)).tolist() == [math.isqrt(v) for v in n]


def test_i_exp_and_i_gelu_follow_exp_and_gelu_within_i_berts_error():
    d = torch.linspace(-15, 0, 30001, dtype=torch.float64)
    e = im.i_exp(fixed(d)).double() * 0.3585 / 2 ** 32                 # units of a S^2 (I-BERT's I-EXP)
    assert ((e - torch.exp(d)) / torch.exp(d)).abs().max() < 4e-3      # the polynomial's error, about 0.3%
    x = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    g = im.i_gelu(fixed(x)).double() / SCALE
    exact = x / 2 * (1 + torch.special.erf(x / math.sqrt(2)))
    assert (g - exact).abs().max() < 0.02                              # I-BERT's i-GELU: about 0.018


def test_int_layer_norm_and_linear_follow_torch_nn():
    torch.manual_seed(0)
    ln, lin = torch.nn.LayerNorm(48), torch.nn.Linear(48, 20)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3), ln.bias.normal_(0, 0.3), lin.bias.normal_(0, 0.3)
    x = torch.randn(5, 48, dtype=torch.float64) * torch.tensor([[0.01], [1], [10], [100], [1000]])
    y = im.IntLayerNorm(ln)(fixed(x)).double() / SCALE
    torch.testing.assert_close(y, ln.double()(x), atol=2e-3, rtol=0)
    z = torch.randn(6, 48, dtype=torch.float64) * 3
    for bits, tol in ((8, 0.1), (16, 1e-3)):   # per-channel rounding: |error| <= sum |x| s_j / 2
        out = im.IntLinear(lin, bits)(fixed(z)).double() / SCALE
        torch.testing.assert_close(out, lin.double()(z), atol=tol, rtol=0)


def python_linear(lin, x):
    """IntLinear's formula in Python integers (no overflow possible), for inputs at the extremes."""
    rows = []
    for row in x.tolist():
        e = max(0, max(abs(v) for v in row).bit_length() - im.ROW_BITS)
        xs = [(v + ((1 << e) >> 1)) >> e for v in row]
        out = []
        for w, m, k, b in zip(lin.w.tolist(), lin.m.tolist(), lin.k.tolist(), lin.b.tolist()):
            acc = sum(a * c for a, c in zip(w, xs)) * m
            out.append(max(-im.LIMIT, min(im.LIMIT, ((acc + ((1 << (k - e)) >> 1)) >> (k - e)) + b)))
        rows.append(out)
    return rows


def test_int_linear_does_not_overflow_at_the_saturation_limits():
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 8)
    with torch.no_grad():
        lin.weight.copy_(torch.sign(torch.randn(8, 512)) * 8)        # every weight at +-q_max after scaling
        lin.bias.fill_(1000.0)
    q = im.IntLinear(lin, 16)
    x = torch.full((3, 512), im.LIMIT)
    x[1] = -im.LIMIT
    x[2] = torch.where(torch.sign(lin.weight[0]) > 0, im.LIMIT, -im.LIMIT)  # all products of row 0 one sign
    assert q(x).tolist() == python_linear(q, x)


def scaled_net(context=16, n_layer=2, n_embd=32, seed=0, std=0.3):
    """A random byte model with weights large enough that attention and GELU are far from linear."""
    torch.manual_seed(seed)
    net = model.ByteTransformer(model.ByteConfig(context=context, n_layer=n_layer, n_head=2, n_embd=n_embd)).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.normal_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0, std)
    return net


def int_frequencies_full(int_net, chunks):
    """Every position's frequencies from one full pass: (B, T, 257)."""
    logits, _ = int_net.forward(chunks)
    return im.frequencies(logits.reshape(-1, 256)).reshape(*chunks.shape, 257).numpy()


def test_integer_logits_follow_the_float_model_and_its_frequencies_its_softmax():
    net = scaled_net()
    x = torch.cat([torch.full((4, 1), model.BOS), torch.randint(0, 256, (4, 15))], 1)
    with torch.no_grad():
        ref, _ = net(x)
    int_net = im.IntByteTransformer(net)
    logits, _ = int_net.forward(x)
    assert ref.std() > 1                                               # logits that matter
    torch.testing.assert_close(logits.double() / SCALE, ref.double(), atol=0.05 * ref.abs().max().item(), rtol=0)
    cum = im.frequencies(logits.reshape(-1, 256)).numpy()
    freq = np.diff(cum, axis=1)
    assert freq.min() >= 1 and cum[:, -1].max() <= 2 ** 30
    p = torch.softmax(ref.reshape(-1, 256).double(), -1).numpy()
    kl = (p * np.log2(p / (freq / cum[:, -1:]))).sum(1)              # bits per byte lost to the integer path
    assert kl.mean() < 0.01, kl.mean()


def test_integer_path_is_batch_invariant_and_its_kv_cache_equals_a_full_pass():
    int_net = im.IntByteTransformer(scaled_net())
    torch.manual_seed(1)
    chunks = torch.cat([torch.full((32, 1), model.BOS), torch.randint(0, 256, (32, 15))], 1)
    full = int_frequencies_full(int_net, chunks)
    for B in (1, 3, 32):                                               # the same chunks among fewer or more others
        assert np.array_equal(int_frequencies_full(int_net, chunks[:B]), full[:B])
        assert np.array_equal(int_frequencies_full(int_net, chunks[-B:]), full[-B:])
    past, steps = None, []
    for t in range(16):                                               # one position at a time through the cache
        logits, past = int_net.forward(chunks[:, t:t + 1], past)
        steps.append(im.frequencies(logits[:, 0]))
    assert np.array_equal(np.stack(steps, 1), full)


def ideal_bits(int_net, data):
    """-sum log2 freq(x_i) / total over `data`, chunks of the context from BOS, by full passes (not the codec)."""
    C, total = int_net.context, 0.0
    for s in range(0, len(data), C):
        y = torch.tensor(list(data[s:s + C]))
        freqs = int_frequencies_full(int_net, torch.cat([torch.tensor([model.BOS]), y[:-1]])[None])[0]
        f = freqs[np.arange(len(y)), y + 1] - freqs[np.arange(len(y)), y]
        total += -np.log2(f / freqs[:, -1]).sum()
    return total


@pytest.mark.parametrize("name", ["random", "text"])
def test_coded_length_is_the_integer_models_cross_entropy(name):
    net = scaled_net(context=24)
    lm = predictors.IntByteLM(net, "scaled")
    data = (np.random.default_rng(0).integers(0, 256, 1500).astype(np.uint8).tobytes() if name == "random"
            else b"It was a bright cold day in April, and the clocks were striking thirteen. " * 20)
    code = codec.read_header(codec.compress(data, lm, progress=False))["code"]
    ideal = ideal_bits(lm.int_net, data)
    assert ideal - 1 <= 8 * len(code) <= 1.005 * ideal + 64 * 8, (8 * len(code), ideal)


class CountsThreads:
    """Mixed into a predictor: records the thread count each forward pass (`freqs`) ran with."""

    def freqs(self, inputs, past=None):
        self.seen.append(torch.get_num_threads())
        return super().freqs(inputs, past)


class CountingIntLM(CountsThreads, predictors.IntByteLM):
    """The integer path."""
    seen = []


class CountingLM(CountsThreads, predictors.ByteLM):
    """A float byte model."""
    seen = []


def test_integer_path_gives_the_same_integers_and_decodes_under_any_thread_count():
    lm = CountingIntLM(scaled_net(context=16), "scaled")
    data = np.random.default_rng(0).integers(0, 256, 40 * 16 + 5).astype(np.uint8).tobytes()  # two batches of chunks
    chunks = torch.cat([torch.full((8, 1), model.BOS), torch.tensor(list(data[:8 * 15])).view(8, 15)], 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        blob = codec.compress(data, lm, progress=False)
        reference = int_frequencies_full(lm.int_net, chunks)
        for n in (2, 4):
            torch.set_num_threads(n)
            assert np.array_equal(int_frequencies_full(lm.int_net, chunks), reference)
            lm.seen.clear()
            assert codec.decompress(blob, lm, progress=False) == data and torch.get_num_threads() == n
            assert set(lm.seen) == {n}                                  # the caller's threads, not forced to 1
    finally:
        torch.set_num_threads(before)
    assert codec.read_header(blob)["setting"] == {"path": "integer", "version": str(im.VERSION),
                                                   "weights": f"int{im.WEIGHT_BITS}"}


def test_float_path_restores_the_thread_count_and_refuses_another_setting_before_decoding(tmp_path):
    lm = CountingLM(scaled_net(), "float", "cpu")
    data = b"Two and two make five. " * 4
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        blob = codec.compress(data, lm, progress=False)
        torch.set_num_threads(4)
        lm.seen.clear()
        assert codec.decompress(blob, lm, progress=False) == data
        assert set(lm.seen) == {1} and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
    setting = codec.read_header(blob)["setting"]
    assert setting == {"path": "float", "device": "cpu", "dtype": "float32", "threads": "1",
                       "torch": torch.__version__}
    on_gpu = dict(setting, device="cuda (NVIDIA H200)", torch="2.11.0+cu130")
    lm.setting = lambda: on_gpu                                         # as if compressed there
    other = codec.compress(data, lm, progress=False)
    del lm.setting
    lm.seen.clear()
    with pytest.raises(codec.Corrupt, match=r"compressed with float float on float, cuda \(NVIDIA H200\).*"
                                            r"decompress needs the same device, dtype and torch version"):
        codec.decompress(other, lm, progress=False)
    assert lm.seen == []                                               # refused before decoding
    with pytest.raises(codec.Corrupt, match="integer .* path; pass --float"):
        codec.decompress(blob, predictors.IntByteLM(scaled_net(), "float"), progress=False)


def test_training_keeps_the_weights_with_the_best_held_out_rate(tmp_path, monkeypatch):
    """The checkpoint `compress` reads holds the weights of the best evaluation, not the last; --resume
    continues from the last state."""
    (tmp_path / "t.txt").write_text(english(60))
    rates, weights = iter([3.0, 2.0, 2.5, 2.2]), []

    def held_out(net, data, device):                                     # a stub with a known answer
        weights.append({k: v.clone() for k, v in net.state_dict().items()})
        return next(rates)
    monkeypatch.setattr(lmc.train, "bits_per_byte", held_out)
    args = ["--data", tmp_path / "t.txt", "--out", tmp_path / "m.pt", "--context", 16, "--n-layer", 1, "--n-head", 2,
            "--n-embd", 16, "--batch-size", 4, "--eval-interval", 2, "--warmup-steps", 0, "--device", "cpu"]
    lmc.train.train(lmc.main.parse_args(["train", *map(str, args), "--steps", "6"]))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)
    best, last = weights[1], weights[2]
    assert ckpt["val_bits_per_byte"] == 2.0 and ckpt["resume"]["step"] == 6
    assert all(torch.equal(ckpt["model"][k], best[k]) for k in best)
    assert all(torch.equal(ckpt["resume"]["model"][k], last[k]) for k in last)
    assert not torch.equal(best["head.weight"], last["head.weight"])
    lmc.train.train(lmc.main.parse_args(["train", *map(str, args), "--steps", "8", "--resume"]))
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)               # 2.2 is not better than 2.0
    assert ckpt["val_bits_per_byte"] == 2.0 and ckpt["resume"]["step"] == 8
    assert all(torch.equal(ckpt["model"][k], best[k]) for k in best)


def test_train_benchmark_reports_the_quick_models_size_batch_and_flops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                   # no data/ here: random bytes, nothing written
    code, out = run_main("train", "--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", 2)
    assert code == 0, out
    r = json.loads(out.strip().splitlines()[-1])
    q = lmc.main.QUICK
    C, L, T = q["n_embd"], q["n_layer"], q["context"]
    net = model.ByteTransformer(model.ByteConfig(context=T, n_layer=L, n_head=q["n_head"], n_embd=C))
    assert r["params"] == sum(p.numel() for p in net.parameters())
    assert r["batch_size"] == q["batch_size"] * T and r["unit"] == "tokens" and r["data"] == "random"
    N = r["params"] - net.tok.weight.numel() - net.pos.weight.numel()    # parameters that multiply
    assert r["flops_per_sample"] == 6 * N + 12 * L * T * C               # 6N + causal attention, fwd + bwd
    assert r["samples_per_s"] * r["step_ms"] / 1000 == pytest.approx(r["batch_size"])
    assert r["tflops"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e12)
    assert r["mfu"] is None and r["compile"] is False and r["device"] == "cpu"
    assert list(tmp_path.iterdir()) == []


# --- flags, the shipped weights, the coder's benchmark (issues 28-30) ---------------------------------

def test_train_flags_take_quick_values_unless_given_and_the_defaults_otherwise():
    quick = lmc.main.parse_args(["train", "--quick", "--steps", "7", "--device", "cpu"])
    assert quick.steps == 7 and quick.n_embd == lmc.main.QUICK["n_embd"] and quick.dropout == 0.0
    assert quick.out_dir == lmc.main.QUICK_OUT_DIR and quick.benchmark_steps == 3
    full = lmc.main.parse_args(["train", "--lr", "1e-3"])
    assert full.lr == 1e-3 and full.steps == 4000 and full.context == 256 and full.benchmark_steps == 20
    assert all(getattr(full, k) == v for k, v in lmc.main.TRAIN.items() if k != "lr")


def test_the_shipped_byte_model_loads_and_reproduces_its_check():
    """pretrained/lm_compression/byte_model: today's code must give the integer path's container its JSON
    records, byte for byte (exact by construction), and the float model's bits/byte on the same text."""
    weights = lmc.weights
    net, meta = weights.load_pretrained()
    assert meta["config"] == {k: getattr(net.cfg, k) for k in meta["config"]}
    lm = predictors.IntByteLM(net, weights.PRETRAINED)
    blob = codec.compress(weights.CHECK_TEXT, lm, progress=False)
    assert len(blob) == meta["check"]["compressed_bytes"] < len(weights.CHECK_TEXT)
    assert hashlib.sha256(blob).hexdigest() == meta["check"]["sha256"]
    assert codec.decompress(blob, lm, progress=False) == weights.CHECK_TEXT
    data = torch.tensor(list(weights.CHECK_TEXT))
    with torch.no_grad():                                               # -log2 p, chunks from BOS, written out
        bits = sum(F.cross_entropy(net(torch.cat([torch.tensor([model.BOS]), y[:-1]])[None])[0][0], y,
                                   reduction="sum").item() for y in data.split(net.cfg.context)) / math.log(2)
    assert bits / len(data) == pytest.approx(meta["check"]["float_bits_per_byte"], rel=1e-4)


def test_a_tampered_shipped_file_is_one_line_naming_it(tmp_path):
    root = Path(lmc.weights.ROOT).parent
    shutil.copytree(root / "lm_compression", tmp_path / "lm_compression", ignore=shutil.ignore_patterns("__pycache__"))
    flip_bit(shipped_copy("lm_compression", tmp_path) / "lm_compression" / "byte_model.safetensors", at=-1)
    (tmp_path / "in.txt").write_bytes(b"Big Brother is watching you.")
    run = subprocess.run([sys.executable, tmp_path / "lm_compression" / "main.py", "compress", "--pretrained",
                          tmp_path / "in.txt", tmp_path / "out.lmz"], capture_output=True, text=True)
    assert run.returncode != 0 and run.stderr.strip() == ("lm_compression: pretrained/lm_compression/byte_model"
                                                          ".safetensors does not match pretrained/SHA256SUMS; "
                                                          "restore it with git checkout"), run.stderr
    assert not (tmp_path / "out.lmz").exists()


def test_a_file_coded_with_the_shipped_model_asks_for_it_by_name():
    shipped_like = tiny_byte_lm()
    shipped_like.name = lmc.weights.PRETRAINED
    blob = codec.compress(b"Freedom is slavery.", shipped_like, progress=False)
    assert codec.read_header(blob)["name"] == "pretrained:byte_model"
    with pytest.raises(codec.Corrupt, match="compressed with model pretrained:byte_model .*; pass --pretrained$"):
        codec.decompress(blob, tiny_byte_lm(seed=1), progress=False)


def test_benchmark_coder_times_one_exact_round_trip_and_reports_its_size(trained):
    d, _ = trained
    (d / "piece.txt").write_bytes(b"Ignorance is strength. ")
    code, out = run_main("benchmark-coder", d / "piece.txt", "--bytes", 1000, "--model", d / "m.pt", "--device", "cpu")
    assert code == 0, out
    row = json.loads(out.strip().splitlines()[-1])
    data = (b"Ignorance is strength. " * 44)[:1000]
    blob = codec.compress(data, predictors.load_predictor(str(d / "m.pt"), "cpu"), progress=False)
    assert row["bytes"] == 1000 and row["exact"] is True and row["compressed_bytes"] == len(blob)
    assert row["rate"] == pytest.approx(len(blob) / 1000) and row["data"] == "real"
    assert row["chunks_side_by_side"] == codec.GROUP and row["inference"] == "integer"
