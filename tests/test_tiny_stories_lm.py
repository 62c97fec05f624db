"""tiny_stories_lm/: tokenizers, the bag model's blindness to order, causality, KV cache, attention
weights, learning, exact resume, DDP and clear errors. Synthetic stories only."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, import_folder

ts = import_folder("tiny_stories_lm")
M = ts.model
NAMES = ["Lily", "Tom", "Ben", "Mia", "Sue"]
PLACES = ["park", "garden", "beach", "shop"]
TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--hidden", "32", "--block-size", "32",
        "--batch-size", "8", "--warmup-steps", "2", "--dropout", "0", "--vocab-size", "300", "--eval-tokens", "0",
        "--num-samples", "1", "--max-new-tokens", "20"]


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


def model(**kw):
    torch.manual_seed(0)
    return M.build_model(config(**kw)).eval()


def log_rows(out_dir):
    with open(out_dir / "log.csv") as f:
        return list(csv.DictReader(f))


# ---- step 1: stories and tokens

def test_stories_are_split_on_endoftext_or_on_blank_lines():
    assert ts.data.split_stories("A b.\n<|endoftext|>\nC d.\n\nE f.<|endoftext|>") == ["A b.", "C d.\n\nE f."]
    assert ts.data.split_stories("A b.\n\nC d.\n \nE f.\n") == ["A b.", "C d.", "E f."]


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
    for t in range(12):  # the closed form against the window written out
        window = m.embedding(x[:, max(0, t - 4):t + 1]).mean(1)
        assert torch.allclose(logits[:, t], m.mlp(window), atol=1e-5)


def test_bag_prediction_does_not_depend_on_token_order_and_the_transformers_does():
    x = torch.randint(0, 23, (1, 5))
    shuffled = x[:, torch.tensor([3, 0, 4, 2, 1])]
    bag, transformer = model(model="bag"), model()
    assert torch.allclose(bag(x)[0][:, -1], bag(shuffled)[0][:, -1], atol=1e-6)
    assert not torch.allclose(transformer(x)[0][:, -1], transformer(shuffled)[0][:, -1], atol=1e-3)


# ---- step 3: the Transformer

@pytest.mark.parametrize("kw", [{}, dict(pos="learned", norm="layernorm")], ids=["rope-rmsnorm", "learned-layernorm"])
def test_future_tokens_never_change_earlier_logits(kw):
    m, x = model(**kw), torch.randint(0, 23, (2, 16))
    x2 = x.clone()
    x2[:, 9:] = torch.randint(0, 23, (2, 7))
    assert torch.allclose(m(x)[0][:, :9], m(x2)[0][:, :9], atol=1e-5)
    assert not torch.allclose(m(x)[0][:, 9:], m(x2)[0][:, 9:], atol=1e-3)


@pytest.mark.parametrize("kw", [{}, dict(pos="learned", norm="layernorm")], ids=["rope-rmsnorm", "learned-layernorm"])
def test_kv_cache_logits_equal_full_recompute(kw):
    m, x = model(**kw), torch.randint(0, 23, (2, 14))
    full, _ = m(x)
    cache = [None] * m.cfg.n_layer
    first, _ = m(x[:, :6], cache=cache)  # a prefix at once, then one token at a time
    steps = [first] + [m(x[:, t:t + 1], cache=cache)[0] for t in range(6, 14)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_rope_scores_depend_only_on_the_distance():
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 6, 8)
    pos = torch.arange(6)
    score = lambda i, j: (M.rope(q, pos)[0, 0, i] * M.rope(k, pos)[0, 0, j]).sum()
    assert torch.allclose(score(3, 1), score(5, 3), atol=1e-5) and torch.allclose(score(2, 2), score(0, 0), atol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_attention_weights_are_causal_and_give_the_same_outputs():
    m, x = model(), torch.randint(0, 23, (1, 10))
    weights = []
    with_weights, _ = m(x, attention=weights)
    assert torch.allclose(with_weights, m(x)[0], atol=1e-5)  # written out == scaled_dot_product_attention
    assert len(weights) == 2 and weights[0].shape == (1, 2, 10, 10)
    for w in weights:
        assert torch.allclose(w.sum(-1), torch.ones(1, 2, 10), atol=1e-5)
        assert torch.all(w.triu(1) == 0)


def test_sampling_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert M.sample_token(logits, temperature=0).item() == 1
    assert all(M.sample_token(logits, 1.0, top_k=1).item() == 1 for _ in range(20))
    assert all(M.sample_token(logits, 1.0, top_p=0.1).item() == 1 for _ in range(20))
    torch.manual_seed(0)  # top-2: only tokens 1 and 2
    assert {M.sample_token(logits, 1.0, top_k=2).item() for _ in range(200)} == {1, 2}


@pytest.mark.parametrize("kind", ["transformer", "bag"])
def test_generate_stops_at_the_end_of_the_story_and_passes_the_context(kind):
    m = model(model=kind)
    out = M.generate(m, torch.zeros(1, 3, dtype=torch.long), 40, temperature=0)
    assert out.shape == (1, 43)  # past block_size 16: the context is cut, generation goes on
    stop = out[0, 5].item()  # greedy: the token it produces at step 3 ends the story there
    assert torch.equal(M.generate(m, torch.zeros(1, 3, dtype=torch.long), 40, temperature=0, stop=stop)[0],
                       out[0, :out[0, 3:].tolist().index(stop) + 4])


# ---- training, the command line, errors

def test_loss_falls_and_the_pipeline_writes_stories_figures_and_results(tmp_path):
    out = tmp_path / "run"
    ts.main.main([*TINY, "--data-dir", data_dir(tmp_path, eot=True), "--out-dir", str(out), "--steps", "150",
                  "--eval-interval", "50", "--lr", "1e-2", "--layer", "1"])
    rows = log_rows(out)
    assert float(rows[0]["train_loss"]) > 4.0  # about ln 300 at the start
    assert float(rows[-1]["val_loss"]) < 0.4  # the synthetic stories are nearly predictable
    results = json.loads((out / "results.json").read_text())
    assert results["bits_per_character"] < 0.3 and results["characters_per_token"] > 1
    text = (out / "stories.txt").read_text()
    assert text.startswith("#### STORY 1 ####\nOnce upon a time")
    for name in ["tiny_stories_lm_transformer_loss.png", "tiny_stories_lm_attention_layer1.png", "attention.html"]:
        assert (out / name).stat().st_size > 0


def test_bag_model_trains_with_sgd(tmp_path):
    out = tmp_path / "bag"
    args = ts.main.parse_args([*TINY, "--model", "bag", "--data-dir", data_dir(tmp_path), "--out-dir", str(out),
                               "--steps", "60", "--eval-interval", "30", "--tokenizer", "word"])
    assert args.optimizer == "sgd"
    ts.train.train(args)
    rows = log_rows(out)
    assert float(rows[-1]["val_loss"]) < float(rows[0]["train_loss"]) - 1.0


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    flags = [*TINY, "--data-dir", data_dir(tmp_path), "--steps", "8", "--eval-interval", "4", "--log-interval", "1",
             "--dropout", "0.1"]  # dropout on, so the RNG state must be restored too
    a = ts.train.train(ts.main.parse_args([*flags, "--out-dir", str(tmp_path / "a")]))
    get_batch = ts.train.get_batch

    def interrupt_at_step_5(data, b, t, key):
        if key[1] == 5:
            raise KeyboardInterrupt
        return get_batch(data, b, t, key)

    monkeypatch.setattr(ts.train, "get_batch", interrupt_at_step_5)
    with pytest.raises(SystemExit) as e:
        ts.train.train(ts.main.parse_args([*flags, "--out-dir", str(tmp_path / "b")]))
    assert e.value.code == 130
    monkeypatch.undo()
    b = ts.train.train(ts.main.parse_args(["--out-dir", str(tmp_path / "b"), "--resume", "--device", "cpu"]))
    assert [r["train_loss"] for r in log_rows(tmp_path / "b")] == [r["train_loss"] for r in log_rows(tmp_path / "a")]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {folder!r})
import main, train
model = train.train(main.parse_args({argv!r}))
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_two_process_gloo_ddp_keeps_identical_weights(tmp_path):
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
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def run_main(*args):
    return subprocess.run([sys.executable, "tiny_stories_lm/main.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def one_line_error(r, *words):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_tokenize_command_shows_both_tokenizers(tmp_path):
    r = run_main("tokenize", "Once Lily went to the park.", "--data-dir", data_dir(tmp_path), "--vocab-size", "300",
                 "--out-dir", str(tmp_path / "none"))
    assert r.returncode == 0, r.stderr
    assert "word-level tokenizer" in r.stdout and "byte-level BPE tokenizer" in r.stdout
    assert "Once| Lily| went| to| the| park|." in r.stdout


def test_missing_data_offline_is_a_one_line_error_naming_the_files(tmp_path, monkeypatch):
    def offline(url, path):
        raise OSError("no network")
    monkeypatch.setattr(ts.data, "download", offline)
    with pytest.raises(SystemExit, match="train_excerpt.txt.*--data-dir"):
        ts.data.find_split(tmp_path, "train")
    assert not (tmp_path / "tinystories" / "TinyStoriesV2-GPT4-train.txt").exists()


def test_bad_flags_and_checkpoints_are_clear_errors(tmp_path):
    one_line_error(run_main("--n-embd", "30", "--n-head", "4"), "divisible")
    one_line_error(run_main("--top-p", "0"), "--top-p")
    one_line_error(run_main("tokenize"), "tokenize needs a text")
    one_line_error(run_main("--tokenizer", "chars"), "--tokenizer")
    torch.save({"folder": "gpt"}, tmp_path / "ckpt.pt")
    one_line_error(run_main("sample", "--out-dir", str(tmp_path)), "checkpoint of gpt")


def test_a_fresh_run_does_not_overwrite_a_checkpoint(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"precious")
    one_line_error(run_main("--data-dir", data_dir(tmp_path), "--out-dir", str(tmp_path), *TINY), "--resume")
    assert (tmp_path / "ckpt.pt").read_bytes() == b"precious"
