"""translator/: masks, causality, the decoding cache, beam search against greedy, the tokenizer, the
split, learning, reload, exact resume and clear errors. A synthetic parallel corpus only."""
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, import_folder

tr = import_folder("translator")
M = tr.model
NOUNS = {"cat": "chat", "dog": "chien", "bird": "oiseau", "horse": "cheval", "fish": "poisson"}
ADJECTIVES = {"red": "rouge", "black": "noir", "small": "petit", "happy": "heureux"}
VERBS = {"sleeps": "dort", "eats": "mange", "runs": "court", "sings": "chante"}
TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "--dropout", "0",
        "--vocab-size", "300", "--batch-size", "16", "--warmup-steps", "20", "--lr", "5e-3", "--max-len", "24",
        "--eval-sentences", "4", "--beam", "3"]


def pairs():
    """'The red cat sleeps.' -> 'Le chat rouge dort.', 80 English sentences; those that sleep have a
    second translation."""
    out = []
    for (n, fn), (a, fa), (v, fv) in itertools.product(NOUNS.items(), ADJECTIVES.items(), VERBS.items()):
        out.append((f"The {a} {n} {v}.", f"Le {fn} {fa} {fv}."))
        if v == "sleeps":
            out.append((f"The {a} {n} {v}.", f"Ce {fn} {fa} {fv}."))
    return out


def data_dir(tmp_path):
    """DIR/tatoeba/fra-eng.zip holding fra.txt as manythings.org writes it (with an attribution column)."""
    folder = tmp_path / "data" / "tatoeba"
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "fra-eng.zip", "w") as z:
        z.writestr("fra.txt", "".join(f"{en}\t{fr}\tCC-BY 2.0 (France) Attribution: tatoeba.org\n" for en, fr in pairs()))
        z.writestr("_about.txt", "synthetic")
    return str(tmp_path / "data")


def config(**kw):
    return M.Config(**{**dict(vocab_size=40, max_len=24, n_layer=2, n_head=2, d_model=16, d_ff=32, dropout=0.0), **kw})


def model(**kw):
    torch.manual_seed(0)
    return M.Transformer(config(**kw)).eval()


def log_rows(out_dir):
    with open(out_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def one_line_exit(capsys, fn, *words):
    """fn() exits with one line (an argparse error on stderr, or SystemExit's message) naming the words."""
    with pytest.raises(SystemExit) as e:
        fn()
    message = str(e.value.code) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert len(message.strip().splitlines()) == 1, message
    assert all(w in message for w in words), message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on the synthetic corpus, then the whole report (test scores, examples, figures)."""
    tmp = tmp_path_factory.mktemp("translator")
    args = tr.main.parse_args([*TINY, "--data-dir", data_dir(tmp), "--out-dir", str(tmp / "run"), "--steps", "150",
                               "--eval-interval", "75", "--log-interval", "5"])
    m = tr.train.train(args).eval()
    tr.sample.report(args)
    return args, m


# ---- the model

def test_sinusoidal_positions_follow_the_formula():
    pe = M.sinusoidal_positions(10, 8)
    pos, i = 7, 3
    assert torch.isclose(pe[pos, 2 * i], torch.tensor(math.sin(pos / 10000 ** (2 * i / 8))))
    assert torch.isclose(pe[pos, 2 * i + 1], torch.tensor(math.cos(pos / 10000 ** (2 * i / 8))))


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post-ln", "pre-ln"])
def test_padding_changes_nothing_and_gets_no_attention(pre_ln):
    m = model(pre_ln=pre_ln)
    src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[1, 8, 9]])
    alone, _ = m(src, tgt)
    # the same pair in a batch with a longer one: padded on both sides
    src_b = torch.tensor([[5, 6, 7, 2, 0, 0, 0], [9, 9, 9, 9, 9, 9, 2]])
    tgt_b = torch.tensor([[1, 8, 9, 0, 0], [1, 3, 4, 5, 6]])
    batched, _ = m(src_b, tgt_b)
    assert torch.allclose(batched[0, :3], alone[0], atol=1e-5)
    memory, src_mask = m.encode(src_b)
    _, cross = m.decode(tgt_b, memory, src_mask)
    for w in cross:  # (B, h, T, S): no weight on the source's padding
        assert torch.all(w[0, :, :, 4:] == 0) and torch.allclose(w.sum(-1), torch.ones(2, 2, 5))


def test_future_target_tokens_never_change_earlier_logits():
    m = model()
    src, tgt = torch.randint(3, 40, (2, 6)), torch.randint(3, 40, (2, 9))
    tgt2 = tgt.clone()
    tgt2[:, 5:] = torch.randint(3, 40, (2, 4))
    a, b = m(src, tgt)[0], m(src, tgt2)[0]
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-5)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-3)
    assert M.causal_mask(2, 5, "cpu")[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]  # 2 new after 3 cached


def test_cached_decoding_equals_teacher_forcing():
    m = model()
    src = torch.randint(3, 40, (1, 7))
    out = M.greedy(m, src)[0]
    logits, _ = m(src, torch.tensor([[1] + out]))
    assert logits[0].argmax(-1)[:len(out)].tolist() == out  # each cached step chose the full forward's argmax


def test_beam_search_with_beam_1_is_greedy_decoding(trained):
    m = model()
    torch.manual_seed(1)
    src = torch.randint(3, 40, (4, 9))
    src[1, 5:] = 0
    assert M.beam_search(m, src, beam=1) == M.greedy(m, src)  # untrained: runs to the length limit
    assert all(len(out) <= 2 * 9 + 10 for out in M.beam_search(m, src, beam=4))
    args, m = trained  # trained: stops at EOS
    tok = tr.data.load_tokenizer(torch.load(Path(args.out_dir) / "ckpt.pt")["tokenizer"])
    src = tr.data.collate(tr.data.encode(tok, ["The red cat sleeps.", "The happy bird sings.", "Fish."]), [[]] * 3)[0]
    greedy = M.greedy(m, src)
    assert M.beam_search(m, src, beam=1) == greedy and tok.decode(greedy[0]) == "Le chat rouge dort."


def test_length_penalty_is_gnmts():
    assert M.length_penalty(1, 0.6) == 1.0 and math.isclose(M.length_penalty(7, 0.6), 2 ** 0.6)


def test_the_schedule_is_the_papers():
    args = tr.main.parse_args(["--warmup-steps", "4000"])
    lr = lambda s: tr.train.get_lr(s - 1, args, 512)  # the paper counts steps from 1
    assert math.isclose(lr(100), 512 ** -0.5 * 100 * 4000 ** -1.5)
    assert math.isclose(lr(16000), 512 ** -0.5 * 16000 ** -0.5)
    assert max(lr(s) for s in range(1, 20000, 50)) <= lr(4000)
    args.lr = 1e-3  # --lr: the same shape, peaking at 1e-3
    assert math.isclose(lr(4000), 1e-3) and math.isclose(lr(16000), 5e-4)


# ---- data and tokenizer

def test_tokenizer_round_trips_text_and_survives_the_checkpoint():
    tok = tr.data.train_tokenizer([t for p in pairs() for t in p] + ["Élise a vu un garçon, déjà ?"], 300)
    for text in ["She saw a boy sitting on a bench.", "Elle vit un garçon assis sur un banc.",
                 "Zoë's café: 日本語 🦄\ttab  two spaces"]:  # the last: characters never seen in training
        assert tok.decode(tok.encode(text).ids) == text
    saved = tr.data.load_tokenizer(tok.to_str())
    assert saved.encode("Le chat noir dort.").ids == tok.encode("Le chat noir dort.").ids
    assert [tok.token_to_id(s) for s in ["<pad>", "<s>", "</s>"]] == [0, 1, 2]


def test_split_keeps_each_english_sentence_in_one_split(tmp_path):
    ps = pairs()
    splits = tr.data.split_pairs(ps)
    english = {name: {en for en, _ in s} for name, s in splits.items()}
    assert not english["train"] & english["valid"] and not english["train"] & english["test"]
    assert not english["valid"] & english["test"]
    assert sorted(p for s in splits.values() for p in s) == sorted(ps)  # nothing lost
    assert len(english["test"]) == len(english["valid"]) == 4  # 5% of 80, rounded up
    assert tr.data.split_pairs(ps[::-1])["test"][0][0] == splits["test"][0][0]  # not the file's order
    assert all(len(refs) == 2 for en, refs in tr.data.group(ps) if "sleeps" in en)


def test_batches_are_a_pure_function_of_seed_and_index():
    src = [[5] * (1 + i % 7) for i in range(50)]
    tgt = [[6] * (1 + i % 5) for i in range(50)]
    a, b = tr.data.Batches(src, tgt, 8, seed=3), tr.data.Batches(src, tgt, 8, seed=3)
    assert a.per_epoch == 7
    first = [a(i)[0].shape for i in range(20)]
    assert [b(i)[0].shape for i in reversed(range(20))][::-1] == first  # any order, the same batches
    src_b, tgt_in, tgt_out = a(0)
    assert torch.all(tgt_in[:, 0] == 1) and torch.equal(tgt_in[:, 1:], tgt_out[:, :-1].masked_fill(tgt_out[:, :-1] == 2, 0))


def test_missing_data_offline_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    def offline(url, path):
        raise OSError("no network")
    monkeypatch.setattr(tr.data, "download", offline)
    with pytest.raises(SystemExit, match=r"tatoeba/fra-eng\.zip.*--data-dir ../shared/data") as e:
        tr.data.find_zip(tmp_path)
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "tatoeba" / "fra-eng.zip").exists()
    (tmp_path / "tatoeba" / "fra-eng.zip").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tatoeba" / "fra-eng.zip").write_text("not a zip")
    with pytest.raises(SystemExit, match="not the Tatoeba export"):
        tr.data.read_pairs(tr.data.find_zip(tmp_path))


# ---- training and translating

def test_loss_falls_and_the_report_is_written(trained):
    args, _ = trained
    out = Path(args.out_dir)
    rows = log_rows(out)
    assert float(rows[0]["train_loss"]) > 4.0  # about ln 300 at the start
    assert float(rows[-1]["val_loss"]) < 1.5  # the label-smoothed loss's floor is about 0.6 here
    results = json.loads((out / "results.json").read_text())
    assert results["test_sentences"] == 4 and results["test_pairs"] >= 4
    assert {"bleu", "chrf", "bleu_multi_ref", "signature"} <= set(results["greedy"]) and "beam3" in results
    assert (out / "translations.txt").read_text().startswith("She saw a boy sitting on a bench.\n  greedy: ")
    for name in ["translator_attention.png", "translator_curves.png"]:
        assert (out / name).stat().st_size > 0


def test_a_saved_model_translates_identically_after_reload(trained):
    args, m = trained
    loaded, tok, _ = tr.train.load_model(Path(args.out_dir) / "ckpt.pt", "cpu")
    texts = ["The red cat sleeps.", "The small horse sings.", "The happy fish runs."]
    for beam in (1, 3):
        assert tr.sample.translate(loaded, tok, texts, beam)[0] == tr.sample.translate(m, tok, texts, beam)[0]
    assert tr.sample.translate(loaded, tok, ["The black dog eats."])[0][0].startswith("Le chien")


def test_translation_scores_count_every_reference():
    refs = [["Le chat dort.", "Ce chat dort."], ["Le chien mange."]]
    s = tr.train.translation_scores(["Le chat dort.", "Le chien mange."], refs)
    assert s["segments"] == 3 and s["sentences"] == 2 and s["bleu_multi_ref"] == 100.0 and s["bleu"] < 100


def test_long_text_is_cut_into_pieces_that_fit(trained):
    _, m = trained
    tok = tr.train.load_model(Path(trained[0].out_dir) / "ckpt.pt", "cpu")[1]
    text = "The red cat sleeps, the black dog eats. The small horse sings! " * 4
    pieces = tr.sample.fit(tok, text.strip(), 23)
    assert len(pieces) > 1 and all(len(tok.encode(p).ids) <= 23 for p in pieces)
    assert " ".join(pieces).split() == text.split()
    assert tr.sample.fit(tok, "x" * 200, 23)  # no break at all: cut between tokens
    outputs, n = tr.sample.translate(m, tok, ["", "   ", text, "The red cat sleeps."])
    assert outputs[:2] == ["", ""] and n == [0, 0, len(pieces), 1]


def test_translate_reads_stdin_and_handles_bad_lines(trained):
    args, _ = trained
    lines = ["The red cat sleeps.", "", "Zoë mange 日本語 🦄 ÿ", "The red cat sleeps, the black dog eats. " * 6]
    r = subprocess.run([sys.executable, "translator/main.py", "translate", "--out-dir", args.out_dir, "--device", "cpu"],
                       input="\n".join(lines) + "\n", cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = r.stdout.split("\n")
    assert len(out) == len(lines) + 1 and out[0].startswith("Le chat") and out[1] == "" and out[2] and out[3]
    assert "line 4 is longer than the model's 23 tokens; translated in" in r.stderr


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    flags = [*TINY, "--data-dir", data_dir(tmp_path), "--steps", "8", "--eval-interval", "4", "--log-interval", "1",
             "--dropout", "0.1"]  # dropout on, so the RNG state must be restored too
    a = tr.train.train(tr.main.parse_args([*flags, "--out-dir", str(tmp_path / "a")]))
    call = tr.data.Batches.__call__

    def interrupt_at_step_5(self, index):
        if index == 5:
            raise KeyboardInterrupt
        return call(self, index)

    monkeypatch.setattr(tr.data.Batches, "__call__", interrupt_at_step_5)
    with pytest.raises(SystemExit) as e:
        tr.train.train(tr.main.parse_args([*flags, "--out-dir", str(tmp_path / "b")]))
    assert e.value.code == 130
    monkeypatch.undo()
    b = tr.train.train(tr.main.parse_args(["--out-dir", str(tmp_path / "b"), "--resume", "--device", "cpu"]))
    assert [r["train_loss"] for r in log_rows(tmp_path / "b")] == [r["train_loss"] for r in log_rows(tmp_path / "a")]
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


# ---- errors

def test_bad_flags_are_one_line_errors(capsys):
    one_line_exit(capsys, lambda: tr.main.parse_args(["--d-model", "30", "--n-head", "4"]), "--d-model 30")
    one_line_exit(capsys, lambda: tr.main.parse_args(["translate", ""]), "empty")
    one_line_exit(capsys, lambda: tr.main.parse_args(["evaluate", "some text"]), "only the translate command")
    one_line_exit(capsys, lambda: tr.main.parse_args(["--beam", "0"]), "--beam")


def test_checkpoints_of_another_folder_and_fresh_runs_over_a_checkpoint_are_refused(tmp_path, capsys):
    torch.save({"folder": "gpt"}, tmp_path / "ckpt.pt")
    one_line_exit(capsys, lambda: tr.main.main(["translate", "Hello.", "--out-dir", str(tmp_path)]), "checkpoint of gpt")
    one_line_exit(capsys, lambda: tr.train.train(tr.main.parse_args([*TINY, "--out-dir", str(tmp_path)])), "--resume")
    assert torch.load(tmp_path / "ckpt.pt") == {"folder": "gpt"}


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
            "--log-interval", "1", "--grad-accum", "2"]  # micro-steps: no_sync, then one all-reduce
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(folder=str(ROOT / "translator"), argv=argv, out=str(out)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    torch.manual_seed(1337)
    init = M.Transformer(M.Config(**torch.load(out / "ckpt.pt")["config"])).state_dict()
    assert any(not torch.equal(w0[k], init[k]) for k in w0)  # it did train
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
