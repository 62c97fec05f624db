"""sequence_models/: the from-scratch cells against torch.nn, the Learner's events and early
stops, masked pooling, the data layouts, resume, and the CLI on synthetic IMDb archives."""
import io
import json
import tarfile

import pytest
import torch
import torch.nn as nn
from conftest import cli_error_line, import_folder

sm = import_folder("sequence_models")
TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def pair(cell, num_layers, batch_first):
    ref = TORCH[cell](5, 7, num_layers, batch_first=batch_first)
    ours = sm.model.CELLS[cell](5, 7, num_layers, batch_first=batch_first)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("num_layers,batch_first,batch,initial_state", [
    (1, False, 1, False), (2, True, 3, True), (3, False, 4, True), (2, True, 2, False)])
def test_cell_matches_torch_outputs_states_and_gradients(cell, num_layers, batch_first, batch, initial_state):
    torch.manual_seed(0)
    ref, ours = pair(cell, num_layers, batch_first)
    x = torch.randn((batch, 6, 5) if batch_first else (6, batch, 5))
    n_states = 2 if cell == "lstm" else 1
    hx = [torch.randn(num_layers, batch, 7) for _ in range(n_states)] if initial_state else None
    results = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_()
        hi = [h.clone().requires_grad_() for h in hx] if hx else None
        out, state = module(xi, (tuple(hi) if n_states == 2 else hi[0]) if hi else None)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss that weighs every output differently
        ((out * weights).sum() + sum((s ** 2).sum() for s in as_tuple(state))).backward()
        grads = [xi.grad] + ([h.grad for h in hi] if hi else []) + [p.grad for p in module.parameters()]
        results.append((out, as_tuple(state), grads))
    (out_r, st_r, g_r), (out_o, st_o, g_o) = results
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=0)
    for a, b in zip(st_o, st_r, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(g_o, g_r, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_weights_load_back_into_torch_and_unbatched_input(cell):
    torch.manual_seed(1)
    ours = sm.model.CELLS[cell](4, 6, 2)
    ref = TORCH[cell](4, 6, 2)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # ours -> torch, the other direction
    x = torch.randn(5, 4)                   # unbatched (L, in)
    (out_o, st_o), (out_r, st_r) = ours(x), ref(x)
    assert out_o.shape == (5, 6)
    torch.testing.assert_close(out_o, out_r, atol=1e-5, rtol=0)
    for a, b in zip(as_tuple(st_o), as_tuple(st_r), strict=True):
        assert a.shape == (2, 6)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_masked_pool_ignores_padding():
    torch.manual_seed(2)
    outputs = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    garbage = outputs.clone()
    garbage[0, 3:] = 1e6  # whatever sits at the padding must not matter
    pooled = sm.model.masked_pool(garbage, mask)
    torch.testing.assert_close(pooled[0], torch.cat([outputs[0, :3].mean(0), outputs[0, :3].amax(0)]))
    torch.testing.assert_close(pooled[1], torch.cat([outputs[1].mean(0), outputs[1].amax(0)]))


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_classifier_gives_the_same_answer_with_or_without_padding(cell):
    torch.manual_seed(3)
    model = sm.model.SentimentClassifier(20, cell, emb_size=8, hidden_size=8).eval()
    short = torch.tensor([[4, 7, 9]])
    padded = torch.tensor([[4, 7, 9, 0, 0, 0], [3, 3, 3, 3, 3, 3]])  # batched with a longer review
    torch.testing.assert_close(model(padded, padded != 0)[0], model(short, short != 0)[0], atol=1e-6, rtol=0)


EVENTS = ["before_fit", "before_epoch", "before_batch", "before_loss", "after_loss", "before_backward",
          "after_backward", "before_step", "after_step", "after_batch", "before_validate", "after_validate",
          "after_epoch", "after_fit"]


class Recorder(sm.train.Callback):
    def __init__(self):
        self.events = []
        for e in EVENTS:
            setattr(self, e, lambda e=e: self.events.append(e))


def tiny_learner(callbacks, n_train=2, lr=0.1):
    torch.manual_seed(4)
    model = nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    data = sm.train.SimpleNamespace(train=[batch] * n_train, valid=[batch])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return sm.train.Learner(model, data, sm.train.cross_entropy, opt, [sm.train.Metrics(), *callbacks])


def test_learner_calls_callbacks_in_the_documented_order():
    rec = Recorder()
    tiny_learner([rec]).fit(1)
    train_batch = ["before_batch", "before_loss", "after_loss", "before_backward", "after_backward",
                   "before_step", "after_step", "after_batch"]
    valid_batch = ["before_batch", "before_loss", "after_loss", "after_batch"]
    assert rec.events == (["before_fit", "before_epoch"] + 2 * train_batch + ["before_validate"] + valid_batch
                          + ["after_validate", "after_epoch", "after_fit"])


def test_a_callback_can_stop_training():
    class StopAfterThreeSteps(sm.train.Callback):
        def after_step(self):
            if self.learner.step == 3:
                raise sm.train.CancelFit

    rec = Recorder()
    learner = tiny_learner([StopAfterThreeSteps(), rec], n_train=2)
    learner.fit(10)
    assert learner.step == 3 and rec.events[-1] == "after_fit"
    assert rec.events.count("after_epoch") == 1  # epoch 2 was cut short


def test_early_stopping_when_validation_does_not_improve():
    learner = tiny_learner([sm.train.EarlyStopping(patience=2, monitor="valid_loss")], lr=0.0)  # lr 0: the loss never improves
    learner.fit(10)
    assert len(learner.history) == 3


def test_artar_adds_to_the_training_loss_but_not_to_the_recorded_metric():
    torch.manual_seed(7)
    model = sm.model.LanguageModel(10, "gru", emb_size=8, hidden_size=8, num_layers=1, dropout=0.0)
    x, y = torch.randint(0, 10, (2, 5)), torch.randint(0, 10, (2, 5))
    seen = []

    class Spy(sm.train.Callback):
        order = 200

        def after_loss(self):
            if self.learner.training:
                seen.append(self.learner.loss.item())

    t = sm.train
    learner = t.Learner(model, t.SimpleNamespace(train=[(x, y)], valid=[(x, y)]), t.cross_entropy,
                        torch.optim.SGD(model.parameters(), lr=0.0), [t.Metrics(), t.ARTAR(2.0, 1.0), Spy()])
    learner.fit(1)
    model.reset()
    with torch.no_grad():
        ce = t.cross_entropy(model(x), y).item()
        h = model.outputs
        penalty = 2.0 * h.pow(2).mean() + 1.0 * (h[:, 1:] - h[:, :-1]).pow(2).mean()
    assert learner.history[0]["train_loss"] == pytest.approx(ce, abs=1e-5)
    assert seen == [pytest.approx(ce + penalty.item(), abs=1e-5)]


def test_number_words_and_split():
    nw = lambda n: " ".join(sm.data.number_words(n))
    assert nw(1) == "one" and nw(15) == "fifteen" and nw(40) == "forty" and nw(110) == "one hundred ten"
    assert nw(8000) == "eight thousand" and nw(2019) == "two thousand nineteen"
    assert nw(9999) == "nine thousand nine hundred ninety nine"
    assert len({nw(n) for n in range(1, 10_000)}) == 9999
    train, valid = sm.data.human_numbers()
    assert train[:4] == ["one", ".", "two", "."] and train[-3:] == ["eight", "thousand", "."]
    assert valid[:4] == ["eight", "thousand", "one", "."]


def test_stream_loader_rows_continue_across_batches():
    ids = list(range(1000))
    batches = list(sm.data.StreamLoader(ids, batch_size=4, bptt=10))
    (x0, y0), (x1, _) = batches[0], batches[1]
    assert x0.shape == (4, 10)
    assert torch.equal(y0[:, :-1], x0[:, 1:]) and torch.equal(y0[:, -1], x1[:, 0])  # shifted by one, continued


def test_review_loader_pads_right_and_masks():
    enc = [([5, 6, 7], 1), ([8], 0), ([9, 9], 1)]
    x, mask, y = next(iter(sm.data.ReviewLoader(enc, batch_size=3)))  # unshuffled: sorted by length
    assert x.tolist() == [[8, 0, 0], [9, 9, 0], [5, 6, 7]] and y.tolist() == [0, 1, 1]
    assert mask.tolist() == [[True, False, False], [True, True, False], [True, True, True]]


def test_sentiment_loss_falls_on_a_tiny_problem():
    torch.manual_seed(5)
    rows = []
    for i in range(128):  # label 1 <=> token 3 occurs somewhere; random lengths and filler
        label = i % 2
        ids = torch.randint(5, 30, (int(torch.randint(3, 12, ())),)).tolist()
        ids[int(torch.randint(0, len(ids), ()))] = 3 if label else 4
        rows.append((ids, label))
    data = sm.train.SimpleNamespace(train=sm.data.ReviewLoader(rows[:96], 16, shuffle=True),
                                    valid=sm.data.ReviewLoader(rows[96:], 32))
    model = sm.model.SentimentClassifier(30, "lstm", emb_size=16, hidden_size=16, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    learner = sm.train.Learner(model, data, sm.train.cross_entropy, opt, [sm.train.Metrics()])
    learner.fit(15)
    assert learner.history[-1]["valid_loss"] < 0.5 * learner.history[0]["valid_loss"]
    assert learner.history[-1]["valid_accuracy"] > 0.9


def test_ulmfit_fine_tuning_freezes_then_unfreezes_with_discriminative_rates():
    """The encoder stays exactly as loaded while frozen and trains afterwards; each depth has its rate."""
    torch.manual_seed(6)
    model = sm.model.SentimentClassifier(30, "lstm", emb_size=8, hidden_size=8, dropout=0.0)
    args = sm.train.SimpleNamespace(task="imdb", lr=1e-2, lr_decay=2.0)
    groups = sm.train.param_groups(model, args)
    assert [g["lr"] for g in groups] == [1e-2, 5e-3, 2.5e-3]
    assert [len(g["params"]) for g in groups] == [2, 4, 1]  # head; LSTM weights and biases; embedding
    rows = [(torch.randint(1, 30, (6,)).tolist(), i % 2) for i in range(16)]
    data = sm.train.SimpleNamespace(train=sm.data.ReviewLoader(rows, 8), valid=sm.data.ReviewLoader(rows, 8))
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    learner = sm.train.Learner(model, data, sm.train.cross_entropy, opt,
                               [sm.train.Metrics(), sm.train.GradualUnfreezing(sm.train.encoder_params(model), 2)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner.fit(2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}
    learner.fit(3)
    assert {"embedding.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= {
        k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


NUMBERS = ["--task", "numbers", "--device", "cpu", "--epochs", "2", "--emb-size", "8", "--hidden-size", "8",
           "--batch-size", "16", "--bptt", "8", "--dropout", "0.2"]


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    sm.main.main(NUMBERS + ["--out-dir", str(tmp_path / "straight")])
    straight = torch.load(tmp_path / "straight" / "numbers-lstm" / "ckpt.pt", weights_only=True)

    after_epoch = sm.train.CSVLog.after_epoch

    def interrupt(self):  # Ctrl-C right after epoch 1 is checkpointed
        after_epoch(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(sm.train.CSVLog, "after_epoch", interrupt)
    with pytest.raises(SystemExit, match="--resume"):
        sm.main.main(NUMBERS + ["--out-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(sm.train.CSVLog, "after_epoch", after_epoch)
    sm.main.main(["--task", "numbers", "--resume", "--device", "cpu", "--tensorboard", "--out-dir",
                  str(tmp_path / "resumed")])
    resumed = torch.load(tmp_path / "resumed" / "numbers-lstm" / "ckpt.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=1e-6, rtol=0)
    assert (tmp_path / "resumed" / "sequence_models_numbers_curves.png").is_file()
    assert list((tmp_path / "resumed" / "numbers-lstm" / "tensorboard").glob("events.out.tfevents.*"))


def write_imdb(root, n=48):
    """A synthetic aclImdb_v1.tar.gz: positive reviews say 'great', negative ones 'awful'."""
    g = torch.Generator().manual_seed(6)
    filler = "the a movie film plot actor scene story was is and it of".split()
    path = root / "imdb" / "aclImdb_v1.tar.gz"
    path.parent.mkdir(parents=True)
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            for label, word in (("pos", "great"), ("neg", "awful")):
                for i in range(n):
                    words = [filler[j] for j in torch.randint(0, len(filler), (12,), generator=g)]
                    words.insert(int(torch.randint(0, 12, (), generator=g)), word)
                    data = (" ".join(words) + ".<br /><br />").encode()
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{8 if label == 'pos' else 2}.txt")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_imdb_pipeline_and_interact(tmp_path, capsys):
    write_imdb(tmp_path)
    common = ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--device", "cpu", "--cell", "gru"]
    sm.main.main(common + ["--epochs", "6", "--emb-size", "16", "--hidden-size", "16", "--batch-size", "8",
                           "--lr", "1e-2", "--dropout", "0.0", "--patience", "0"])
    results = json.loads((tmp_path / "runs" / "imdb-gru" / "results.json").read_text())
    assert results["test_accuracy"] > 0.9
    capsys.readouterr()
    sm.main.main(["interact", "--review", "the film was great"] + common)
    sm.main.main(["interact", "--review", "an awful movie"] + common)
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["positive", "negative"]


def test_missing_imdb_offline_names_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(sm.data, "IMDB_URL", (tmp_path / "no-such-file").as_uri())
    with pytest.raises(SystemExit, match=r"imdb/aclImdb_v1\.tar\.gz.*--data-dir"):
        sm.data.read_imdb(tmp_path / "data")
    assert not (tmp_path / "data" / "imdb").exists() or not any((tmp_path / "data" / "imdb").iterdir())


def test_bad_checkpoint_and_prompt_are_one_line_errors(tmp_path):
    run = tmp_path / "numbers-lstm"
    run.mkdir()
    torch.save({"folder": "gpt"}, run / "ckpt.pt")
    line = cli_error_line("sequence_models", "--task", "numbers", "--resume", "--out-dir", str(tmp_path))
    assert "not of sequence_models" in line
    torch.save({"folder": "gpt"}, run / "best.pt")
    line = cli_error_line("sequence_models", "interact", "--task", "numbers", "--out-dir", str(tmp_path))
    assert "not of sequence_models" in line


def test_mlp_lm_shape_and_context_window():
    torch.manual_seed(8)
    model = sm.model.MLPLanguageModel(vocab_size=12, context=3, emb_size=4, hidden_size=16, direct=True)
    stream = torch.randint(0, 12, (20,)).tolist()
    X, Y = sm.data.stream_contexts(stream, 3)
    assert X.shape == (17, 3) and torch.equal(X[0], torch.tensor(stream[:3])) and Y[0] == stream[3]
    assert model(X).shape == (17, 12)
    t = 10  # the prediction of stream[t] sees stream[t-3:t] and nothing before
    outside, inside = list(stream), list(stream)
    outside[t - 4] = (stream[t - 4] + 1) % 12
    inside[t - 1] = (stream[t - 1] + 1) % 12
    predict = lambda s: model(sm.data.stream_contexts(s, 3)[0][t - 3:t - 2])
    torch.testing.assert_close(predict(outside), predict(stream))
    assert not torch.allclose(predict(inside), predict(stream))


def test_names_examples_and_padding_are_ignored():
    vocab = sm.data.char_vocab("abc")
    dot = vocab.stoi["."]
    X, Y = sm.data.name_contexts(["ab"], vocab, context=2)  # makemore: ..->a, .a->b, ab->.
    assert X.tolist() == [[dot, dot], [dot, vocab.stoi["a"]], vocab.encode(["a", "b"])]
    assert Y.tolist() == vocab.encode(["a", "b", "."])
    x, y = next(iter(sm.data.NameLoader(["ab", "c"], vocab, batch_size=2)))
    assert x.tolist() == [[dot] + vocab.encode(["a", "b"]), [dot, vocab.stoi["c"], dot]]
    assert y.tolist() == [vocab.encode(["a", "b", "."]), vocab.encode(["c", "."]) + [sm.data.IGNORE]]
    logits = torch.randn(2, 3, len(vocab))
    logits[1, 2] = 0  # whatever the model says at padding does not count
    logits[1, 2, 5] = 100
    full = sm.train.cross_entropy(logits[:1], y[:1]) * 3 + sm.train.cross_entropy(logits[1:, :2], y[1:, :2]) * 2
    torch.testing.assert_close(sm.train.cross_entropy(logits, y), full / 5)
    acc = sm.train.accuracy(logits, y)
    assert acc == (logits[:1].argmax(-1) == y[:1]).sum().add((logits[1, :2].argmax(-1) == y[1, :2]).sum()) / 5


def test_sweep_records_every_config_and_picks_the_lowest_validation_loss(tmp_path):
    names = tmp_path / "data" / "names" / "names.txt"
    names.parent.mkdir(parents=True)
    g = torch.Generator().manual_seed(9)
    names.write_text("\n".join("".join("abcde"[i] for i in torch.randint(0, 5, (int(n),), generator=g))
                               for n in torch.randint(2, 7, (200,), generator=g)) + "\n")
    argv = ["sweep", "--task", "names", "--model", "mlp", "--data-dir", str(tmp_path / "data"), "--out-dir",
            str(tmp_path / "runs"), "--device", "cpu", "--epochs", "2", "--emb-size", "4", "--batch-size", "64",
            "--grid", "hidden_size=2,16", "context=1,3"]
    records, best = sm.main.main(argv)
    lines = (tmp_path / "runs" / "sweep" / "names-mlp" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["run"] for line in lines] == [0, 1, 2, 3]
    assert {(r["hidden_size"], r["context"]) for r in records} == {(2, 1), (2, 3), (16, 1), (16, 3)}
    assert best["valid_loss"] == min(r["valid_loss"] for r in records) and len(best["curve"]) == 2
    assert (tmp_path / "runs" / "sequence_models_sweep_names_mlp.png").is_file()
    again, _ = sm.main.main(argv)  # a second sweep reuses the finished runs
    assert [r["valid_loss"] for r in again] == [r["valid_loss"] for r in records]


@pytest.mark.parametrize("model", ["mlp", "gru"])
def test_text_task_trains_and_continues_a_prompt(tmp_path, model, capsys):
    text = tmp_path / "abc.txt"
    text.write_text("abcd " * 600)
    common = ["--task", "text", "--text", str(text), "--model", model, "--out-dir", str(tmp_path), "--device", "cpu"]
    sm.main.main(common + ["--epochs", "5", "--emb-size", "8", "--hidden-size", "32", "--batch-size", "16",
                           "--context", "4", "--lr", "1e-2"])
    results = json.loads((tmp_path / f"text-{model}" / "results.json").read_text())
    assert results["valid_loss"] < 0.5  # the text is deterministic; a uniform guess costs ln 6 = 1.8
    capsys.readouterr()
    sm.main.main(["interact", "--prompt", "ab", "--words", "1", "--temperature", "0.01"] + common)
    assert capsys.readouterr().out.startswith("abcd abcd")


def test_a_pretrained_encoder_is_really_loaded_into_the_classifier(tmp_path):
    torch.manual_seed(10)
    vocab = sm.data.Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(18)])
    lm = sm.model.LanguageModel(20, "lstm", emb_size=8, hidden_size=12, num_layers=1, out_size=10)
    torch.save({"folder": "sequence_models", "task": "imdb-lm", "vocab": vocab.itos, "model": lm.state_dict(),
                "config": {"cell": "lstm", "emb_size": 8, "hidden_size": 12, "num_layers": 1}}, tmp_path / "best.pt")
    clf = sm.model.SentimentClassifier(20, "lstm", emb_size=8, hidden_size=12)
    head = clf.head.weight.clone()
    pretrained = sm.train.load_pretrained(tmp_path / "best.pt")
    sm.train.load_encoder(clf, pretrained, vocab, tmp_path / "best.pt")
    for name, p in lm.state_dict().items():
        if name.startswith(("embedding.", "rnn.")):
            assert torch.equal(clf.state_dict()[name], p), name
    assert torch.equal(clf.head.weight, head)  # the classifier's own head stays as it was
    with pytest.raises(SystemExit, match="another vocabulary"):
        sm.train.load_encoder(clf, pretrained, sm.data.Vocab(vocab.itos[:-1]), tmp_path / "best.pt")
    with pytest.raises(SystemExit, match="give the classifier the same"):
        sm.train.load_encoder(sm.model.SentimentClassifier(20, "gru", 8, 12), pretrained, vocab, tmp_path / "best.pt")


def test_transfer_compares_pretrained_and_scratch_classifiers(tmp_path):
    write_imdb(tmp_path)
    common = ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--device", "cpu", "--emb-size", "16",
              "--hidden-size", "16", "--batch-size", "8", "--epochs", "2"]
    sm.main.main(["--task", "imdb-lm", "--lm-vocab", "20", "--bptt", "8"] + common)
    rows = sm.main.main(["transfer", "--label-counts", "8,32"] + common)
    assert set(rows) == {"scratch", "pretrained", "ulmfit"} and all(set(r) == {8, 32} for r in rows.values())
    assert (tmp_path / "runs" / "sequence_models_transfer.png").is_file()


def one_line_exit(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code.strip(), e.value.code
    return e.value.code


def test_names_and_text_files_must_be_utf8_text(tmp_path):
    """Random bytes as names.txt (or --text) are refused in one line, not trained on as a vocabulary of
    200 byte values; a line that is not a name is named; real names, accents included, pass."""
    path = tmp_path / "names" / "names.txt"
    path.parent.mkdir()
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(11),
                                   dtype=torch.uint8).numpy().tobytes())
    assert str(path) in one_line_exit(sm.data.read_names, tmp_path)
    args = sm.train.SimpleNamespace(text=str(path), context=3, bptt=16, cell="mlp")
    assert str(path) in one_line_exit(sm.train.text_data, args)
    names = ["emma", "olivia", "ava", "zoé", "mary-jane", "o'neil", "ann marie", "liam", "noah", "mia"]
    path.write_text("\n".join(names[:4] + ["x2y"] + names[4:]) + "\n")
    assert f"{path} line 5 is not a name ('x2y')" in one_line_exit(sm.data.read_names, tmp_path)
    path.write_text("\r\n".join(names) + "\r\n\r\n")
    assert sm.data.read_names(tmp_path) == names
