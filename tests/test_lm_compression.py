"""lm_compression/: the arithmetic coder against random streams and the ideal code length, the
codec's round trip on awkward bytes with byte models and a (tiny, offline) Hugging Face LM,
the KV cache against a full pass, the container's checks, learning, and the command line."""
import contextlib
import io
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_error_line, import_folder

lmc = import_folder("lm_compression")
coder, codec, model = lmc.coder, lmc.codec, lmc.model

EDGE_CASES = {"empty": b"", "one byte": b"\x00", "all 256 values": bytes(range(256)),
              "invalid utf-8": b"caf\xc3 \xff\xfe broken \x80\x80 end \xe2\x82",
              "utf-8 text": "naïve café, 1984 — «Big Brother» 猫".encode(),
              "binary": np.random.default_rng(0).integers(0, 256, 700).astype(np.uint8).tobytes()}


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


def tiny_byte_lm(context=8, seed=0):
    torch.manual_seed(seed)
    net = model.ByteTransformer(model.ByteConfig(context=context, n_layer=1, n_head=2, n_embd=16))
    return model.ByteLM(net, f"tiny-{seed}", "cpu")


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


def test_kv_cache_steps_equal_one_full_pass():
    torch.manual_seed(0)
    net = model.ByteTransformer(model.ByteConfig(context=12, n_layer=2, n_head=2, n_embd=32)).eval()
    x = torch.cat([torch.full((3, 1), model.BOS), torch.randint(0, 256, (3, 11))], 1)
    full, _ = net(x)
    past, steps = None, []
    for t in range(12):
        logits, past = net(x[:, t:t + 1], past)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


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


def test_another_model_is_refused():
    blob = codec.compress(b"hello", tiny_byte_lm(seed=0), progress=False)
    with pytest.raises(codec.Corrupt, match="compressed with model tiny-0"):
        codec.decompress(blob, tiny_byte_lm(seed=1), progress=False)


def test_sampling_decodes_coin_flips_into_the_models_distribution():
    class Peaked:  # 'a' with probability 0.9, the rest spread evenly
        kind, context, vocab = "bytes", 64, 256

        def probs(self, inputs, past=None):
            p = np.full((len(inputs), 256), 0.1 / 255)
            p[:, ord("a")] = 0.9
            return p, past
    text = lmc.sample.sample(Peaked(), 64, seed=0) + lmc.sample.sample(Peaked(), 64, seed=1)
    assert 0.75 < text.count(b"a") / len(text) < 0.99


@pytest.fixture(scope="module")
def token_lm():
    """A tiny Llama and a byte-level BPE tokenizer, both built here: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tf = model.transformers()
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
    return model.TokenLM(net, tokenizer, "tiny-llama", "cpu", context=64)


@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_token_lm_round_trips_edge_cases_escaping_what_it_cannot_tokenize(token_lm, name):
    data = EDGE_CASES[name] * (3 if name == "utf-8 text" else 1)  # several chunks, cut between characters
    blob = codec.compress(data, token_lm, progress=False)
    assert codec.decompress(blob, token_lm, progress=False) == data


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny byte model trained on a repetitive text, then the held-out round trip and a sample."""
    d = tmp_path_factory.mktemp("lmc")
    text = d / "text.txt"
    text.write_text("".join(f"Big Brother is watching you, number {i % 7}. " for i in range(300)))
    code, out = run_main("train", "--data", text, "--out", d / "m.pt", "--steps", 100, "--context", 32,
                         "--n-layer", 1, "--n-head", 2, "--n-embd", 32, "--batch-size", 16, "--lr", 3e-3,
                         "--eval-interval", 50, "--warmup-steps", 10, "--device", "cpu")
    assert code == 0, out
    return d, out


def test_training_learns_and_the_pipeline_round_trips(trained):
    d, out = trained
    rates = [float(line.split("held-out ")[1].split(" bits")[0]) for line in out.splitlines()
             if line.startswith("step")]
    assert rates[-1] < 2.0 and rates[-1] < rates[0], out   # from ~8 bits/byte at random init
    assert "decompressed exactly" in out and (d / "m.heldout.txt").is_file()


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


def test_number_is_exact(trained):
    d, _ = trained
    code, out = run_main("number", "Big Brother is watching you", "--model", d / "m.pt")
    assert code == 0 and "(exact)" in out and "as a binary fraction: 0." in out, out


def test_stdin_to_stdout_round_trip_and_a_one_line_error(trained):
    d, _ = trained
    data = b"\x00\xffWar is peace." * 3
    command = [sys.executable, str(ROOT / "lm_compression" / "main.py")]
    c = subprocess.run(command + ["compress", "-", "-", "--model", d / "m.pt"], input=data, capture_output=True)
    back = subprocess.run(command + ["decompress", "-", "-", "--model", d / "m.pt"], input=c.stdout,
                          capture_output=True)
    assert back.stdout == data, back.stderr
    assert "--n-embd 30 is not divisible" in cli_error_line("lm_compression", "train", "--n-embd", "30",
                                                            "--n-head", "4")


def test_benchmark_measures_every_compressor_and_draws_them(trained, tmp_path):
    d, _ = trained
    text = tmp_path / "t.txt"
    text.write_bytes(b"Big Brother is watching you. " * 200)   # 5,800 bytes: three 2048-byte chunks
    code, out = run_main("benchmark", text, "--model", d / "m.pt", "--out-dir", tmp_path)
    assert code == 0, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "compressor" not in line]
    names = {r.split("|")[1].strip() for r in rows}
    assert {"gzip -9", "xz -9", "m.pt"} <= names and len(rows) == 2 * (len(names) - 1) + 1
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
    src.write_bytes(codec.compress(b"War is peace.", lmc.model.load_predictor(str(d / "m.pt"), "cpu"), progress=False)
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
