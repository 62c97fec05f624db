"""sequence_models/: the from-scratch cells against torch.nn, the Learner's events and early
stops, masked pooling, the data layouts, resume, and the CLI on synthetic IMDb archives."""
import io
import json
import math
import tarfile
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from conftest import cli_error_line, flip_bit, import_folder, shipped_copy, unlist

sm = import_folder("sequence_models")
TORCH = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train many times faster on one thread than on two that spin on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_stacked_layers_with_dropout_between_them_match_torch_layer_by_layer(cell):
    """Eval: a 2-layer cell with dropout 0.5 is torch's. Training: layer 2 reads dropout(layer 1's
    outputs) and the last layer's outputs are not dropped, rebuilt from two 1-layer torch modules
    and F.dropout drawing the same mask (same seed, same shape)."""
    torch.manual_seed(12)
    ref = TORCH[cell](5, 7, 2, dropout=0.5)
    ours = sm.model.CELLS[cell](5, 7, 2, dropout=0.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 3, 5)
    torch.testing.assert_close(ours.eval()(x)[0], ref.eval()(x)[0], atol=1e-5, rtol=0)
    layers = [TORCH[cell](5 if k == 0 else 7, 7) for k in range(2)]
    for k, layer in enumerate(layers):
        layer.load_state_dict({f"{n}_l0": ref.state_dict()[f"{n}_l{k}"]
                               for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    torch.manual_seed(13)
    out, state = ours.train()(x)
    torch.manual_seed(13)
    h1, s1 = layers[0](x)
    h2, s2 = layers[1](F.dropout(h1, 0.5))
    torch.testing.assert_close(out, h2, atol=1e-5, rtol=0)
    for a, b1, b2 in zip(as_tuple(state), as_tuple(s1), as_tuple(s2), strict=True):
        torch.testing.assert_close(a, torch.cat([b1, b2]), atol=1e-5, rtol=0)


def test_masked_pool_ignores_padding():
    torch.manual_seed(2)
    outputs = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    garbage = outputs.clone()
    garbage[0, 3:] = 1e6  # whatever sits at the padding must not matter
    pooled = sm.model.masked_pool(garbage, mask)
    torch.testing.assert_close(pooled[0], torch.cat([outputs[0, :3].mean(0), outputs[0, :3].amax(0)]))
    torch.testing.assert_close(pooled[1], torch.cat([outputs[1].mean(0), outputs[1].amax(0)]))
    hand = torch.tensor([[[1., 2.], [3., -4.], [-9., 50.]]])  # two real steps, then padding
    # mean over the real steps (1+3)/2, (2-4)/2; max over them 3, 2 (not the padding's 50)
    assert sm.model.masked_pool(hand, torch.tensor([[True, True, False]])).tolist() == [[2., -1., 3., 2.]]


@pytest.mark.parametrize("cell", ["rnn", "gru"])
def test_classifier_gives_the_same_answer_with_or_without_padding(cell):
    torch.manual_seed(3)
    model = sm.model.SentimentClassifier(20, cell, emb_size=8, hidden_size=8).eval()
    short = torch.tensor([[4, 7, 9]])
    padded = torch.tensor([[4, 7, 9, 0, 0, 0], [3, 3, 3, 3, 3, 3]])  # batched with a longer review
    torch.testing.assert_close(model(padded, padded != 0)[0], model(short, short != 0)[0], atol=1e-6, rtol=0)


EVENTS = ["before_fit", "before_epoch", "before_batch", "before_loss", "after_loss", "before_backward",
          "after_backward", "before_step", "after_step", "after_batch", "before_validate", "after_validate",
          "after_epoch", "after_fit", "after_cancel_batch"]


class Recorder(sm.learner.Callback):
    def __init__(self):
        self.events = []
        for e in EVENTS:
            setattr(self, e, lambda e=e: self.events.append(e))


def tiny_learner(callbacks, n_train=2, lr=0.1):
    torch.manual_seed(4)
    model = nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    data = SimpleNamespace(train=[batch] * n_train, valid=[batch])
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return sm.learner.Learner(model, data, sm.callbacks.cross_entropy, opt, [sm.callbacks.Metrics(), *callbacks])


def test_learner_calls_callbacks_in_the_documented_order():
    rec = Recorder()
    tiny_learner([rec]).fit(1)
    train_batch = ["before_batch", "before_loss", "after_loss", "before_backward", "after_backward",
                   "before_step", "after_step", "after_batch"]
    valid_batch = ["before_batch", "before_loss", "after_loss", "after_batch"]
    assert rec.events == (["before_fit", "before_epoch"] + 2 * train_batch + ["before_validate"] + valid_batch
                          + ["after_validate", "after_epoch", "after_fit"])


def test_a_callback_can_stop_training():
    class StopAfterThreeSteps(sm.learner.Callback):
        def after_step(self):
            if self.learner.step == 3:
                raise sm.learner.CancelFit

    rec = Recorder()
    learner = tiny_learner([StopAfterThreeSteps(), rec], n_train=2)
    learner.fit(10)
    assert learner.step == 3 and rec.events[-1] == "after_fit"
    assert rec.events.count("after_epoch") == 1  # epoch 2 was cut short


def test_a_cancelled_batch_gets_after_cancel_batch_and_still_moves_the_progress_bar():
    """A resumed epoch skips its first batches with CancelBatch: the bar must count them, or it
    shows 2,000 of 2,966 batches done as 0 and an ETA three times too long."""
    class SkipFirst(sm.learner.Callback):
        def before_batch(self):
            if self.learner.training and self.learner.step == 0 and not getattr(self, "done", False):
                self.done = True
                raise sm.learner.CancelBatch

    rec, progress = Recorder(), sm.callbacks.Progress()
    learner = tiny_learner([rec, SkipFirst(), progress], n_train=3)
    seen = []
    progress.before_validate = lambda: seen.append(progress.pbar.n)   # the training bar, before it closes
    learner.fit(1)
    assert learner.step == 2 and seen == [3]
    assert rec.events[2:4] == ["before_batch", "after_cancel_batch"]   # instead of after_batch
    assert rec.events.count("after_batch") == 2 + 1                    # two trained, one validated


def test_early_stopping_when_validation_does_not_improve():
    learner = tiny_learner([sm.callbacks.EarlyStopping(patience=2, monitor="valid_loss")], lr=0.0)  # lr 0: the loss never improves
    learner.fit(10)
    assert len(learner.history) == 3


class Tap(sm.learner.Callback):
    """Calls fn(learner, event) at the given events, at the given place in the callback order."""

    def __init__(self, order, fn, *events):
        self.order = order
        for e in events:
            setattr(self, e, lambda e=e: fn(self.learner, e))


def tar_written_out(h):
    """Merity et al.'s TAR term: the mean over batch, steps t >= 1 and units of (h_t - h_{t-1})^2."""
    N, L, H = h.shape
    return sum(((h[:, t] - h[:, t - 1]) ** 2).sum() for t in range(1, L)) / (N * (L - 1) * H)


def test_a_non_finite_gradient_stops_before_the_update_and_a_non_finite_model_is_not_saved(tmp_path):
    class Poison(sm.learner.Callback):
        def after_backward(self):
            self.learner.model.weight.grad[0, 0] = float("inf")

    learner = tiny_learner([sm.callbacks.StopOnNonFinite(), Poison()])
    before = learner.model.weight.detach().clone()
    with pytest.raises(sm.callbacks.Diverged, match="gradient norm became non-finite .* step 1; stopped before"):
        learner.fit(1)
    assert torch.equal(learner.model.weight, before)
    learner = tiny_learner([sm.callbacks.Checkpoint(tmp_path, {}, "valid_loss")])
    with torch.no_grad():
        learner.model.bias[0] = float("nan")
    with pytest.raises(sm.callbacks.Diverged, match="not saved"):
        learner.fit(1)
    assert not list(tmp_path.iterdir())


def test_artar_is_merity_formula_on_dropped_and_raw_outputs_and_is_not_in_the_recorded_metric():
    """AR = alpha * mean(dropout(h)^2) on the dropped outputs, TAR = beta * mean((h_t - h_{t-1})^2)
    over time on the raw ones; alpha != beta and dropout 0.5 so that a swap or a wrong tensor shows."""
    torch.manual_seed(7)
    model = sm.model.LanguageModel(10, "gru", emb_size=8, hidden_size=8, num_layers=1, dropout=0.5)
    x, y = torch.randint(0, 10, (3, 6)), torch.randint(0, 10, (3, 6))
    seen = {}
    record = lambda key: lambda L, e: L.training and seen.setdefault(key, (
        L.loss.item(), L.out.dropped.detach(), L.out.hidden.detach()))
    cb = sm.callbacks
    learner = sm.learner.Learner(model, SimpleNamespace(train=[(x, y)], valid=[(x, y)]), cb.cross_entropy,
                                 torch.optim.SGD(model.parameters(), lr=0.0),
                                 [cb.Metrics(), cb.ARTAR(2.0, 3.0), Tap(-5, record("before"), "after_loss"),
                                  Tap(200, record("after"), "after_loss")])
    learner.fit(1)
    ce, dropped, h = seen["before"]
    assert not torch.equal(dropped, h)  # dropout acted, so AR on the wrong tensor would show
    expected = ce + 2.0 * (dropped ** 2).sum() / dropped.numel() + 3.0 * tar_written_out(h)
    assert seen["after"][0] == pytest.approx(expected.item(), abs=1e-5)
    assert learner.history[0]["train_loss"] == pytest.approx(ce, abs=1e-6)  # Metrics saw the plain loss


def rates_seen(seed, n_reviews, batch_size, schedule, read):
    """Fit a tiny IMDb LSTM with ULMFiT's three parameter groups (head, LSTM, embedding at lr 1e-2,
    1e-2 / 2.6, 1e-2 / 2.6^2) on n_reviews random reviews for 2 epochs under the `schedule` callback;
    -> [read(group) for each group] before every optimiser step."""
    torch.manual_seed(seed)
    model = sm.model.SentimentClassifier(30, "lstm", emb_size=4, hidden_size=4, dropout=0.0)
    groups = sm.train.param_groups(model, SimpleNamespace(task="imdb", lr=1e-2, lr_decay=2.6))
    rows = [(torch.randint(2, 30, (3,)).tolist(), i % 2) for i in range(n_reviews)]
    data = SimpleNamespace(train=sm.data.ReviewLoader(rows, batch_size), valid=sm.data.ReviewLoader(rows[:4], 4))
    seen = []
    tap = Tap(5, lambda L, e: seen.append([read(g) for g in L.opt.param_groups]), "before_step")
    sm.learner.Learner(model, data, sm.callbacks.cross_entropy, torch.optim.AdamW(groups),
                       [sm.callbacks.Metrics(), schedule, tap]).fit(2)
    return seen


def test_one_cycle_is_smith_schedule_written_out_per_group_and_step():
    """torch's OneCycleLR defaults, written out: over T = epochs x batches steps, cosine from
    peak/25 up to the peak by step 0.3 T - 1, then down to peak/25/1e4 at step T - 1; beta_1 goes
    0.95 -> 0.85 -> 0.95. Each ULMFiT group (head, LSTM, embedding) peaks at lr, lr/D, lr/D^2."""
    seen = rates_seen(16, 20, 4, sm.callbacks.OneCycle(), lambda g: (g["lr"], g["betas"][0]))
    T = 2 * 5
    anneal = lambda a, b, pct: b + (a - b) / 2 * (1 + math.cos(math.pi * pct))
    top = 0.3 * T - 1
    for i, step in enumerate(seen):
        for (lr, beta1), peak in zip(step, [1e-2, 1e-2 / 2.6, 1e-2 / 2.6 ** 2], strict=True):
            up = i <= top
            pct = i / top if up else (i - top) / (T - 1 - top)
            assert lr == pytest.approx(anneal(peak / 25, peak, pct) if up else anneal(peak, peak / 25 / 1e4, pct))
            assert beta1 == pytest.approx(anneal(0.95, 0.85, pct) if up else anneal(0.85, 0.95, pct))
    assert len(seen) == T


def test_slanted_triangular_rates_are_ulmfit_equation_3_per_group_and_step():
    """Howard & Ruder 2018, eq. 3, written out with cut_frac 0.1 and ratio 32 over T = 2 epochs x 15
    batches (T cut_frac whole, so the paper's cut (1/cut_frac - 1) form): each ULMFiT group peaks at
    its own rate."""
    seen = rates_seen(17, 15, 1, sm.callbacks.SCHEDULES["stlr"](), lambda g: g["lr"])
    T, cut_frac, ratio = 30, 0.1, 32
    cut = math.floor(T * cut_frac)
    for t, step in enumerate(seen):
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
        for lr, peak in zip(step, [1e-2, 1e-2 / 2.6, 1e-2 / 2.6 ** 2], strict=True):
            assert lr == pytest.approx(peak * (1 + p * (ratio - 1)) / ratio)
    assert len(seen) == T and seen[cut][0] == pytest.approx(1e-2)


def test_language_model_input_dropout_drops_the_embedding_outputs_in_training_only():
    torch.manual_seed(18)
    lm = sm.model.LanguageModel(12, "lstm", emb_size=4, hidden_size=6, num_layers=1, dropout=0.0, stateful=False,
                                emb_dropout=0.5)
    x = torch.randint(0, 12, (20, 5))
    seen = []
    lm.rnn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out, e = lm(x, None), lm.embedding(x)
    kept = seen[0] != 0                                                         # (20, 5, 4)
    torch.testing.assert_close(seen[0][kept], 2 * e[kept])                      # kept ones scaled by 1 / (1 - p)
    assert 0.35 < kept.float().mean() < 0.65                                    # each dropped with p = 0.5
    torch.testing.assert_close(out.hidden, lm.rnn(seen[0])[0])
    lm.eval()
    torch.testing.assert_close(lm(x, None).hidden, lm.rnn(lm.embedding(x))[0])


def test_metrics_are_nats_and_accuracy_per_real_target_over_the_whole_split():
    """Two validation batches with different numbers of real targets: the loss is the sum of
    -log p(target) over every real target of the split divided by their number (not a mean of
    batch means), padding (IGNORE) left out, and so is the accuracy."""
    g = torch.Generator().manual_seed(17)
    logits = [torch.randn(1, 4, 5, generator=g), torch.randn(1, 3, 5, generator=g)]
    I = sm.data.IGNORE
    targets = [torch.tensor([[3, I, 0, I]]), torch.tensor([[1, 4, 2]])]  # 2 and 3 real targets

    class Stub(nn.Module):  # returns the stored logits of batch x
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return logits[int(x)] + self.w

    batches = [(torch.tensor(i), targets[i]) for i in range(2)]
    learner = sm.learner.Learner(Stub(), SimpleNamespace(train=[], valid=batches), sm.callbacks.cross_entropy,
                               torch.optim.SGD(Stub().parameters(), lr=0.0), [sm.callbacks.Metrics()])
    learner.callback("before_fit")
    m = learner.validate()
    real = [(b, t, int(targets[b][0, t])) for b in range(2) for t in range(targets[b].size(1)) if targets[b][0, t] != I]
    nats = [float(logits[b][0, t].exp().sum().log() - logits[b][0, t, y]) for b, t, y in real]
    hits = [int(logits[b][0, t].argmax()) == y for b, t, y in real]
    assert m["valid_loss"] == pytest.approx(sum(nats) / 5) and m["valid_accuracy"] == pytest.approx(sum(hits) / 5)


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
    data = SimpleNamespace(train=sm.data.ReviewLoader(rows[:96], 16, shuffle=True),
                                    valid=sm.data.ReviewLoader(rows[96:], 32))
    model = sm.model.SentimentClassifier(30, "lstm", emb_size=16, hidden_size=16, dropout=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    learner = sm.learner.Learner(model, data, sm.callbacks.cross_entropy, opt, [sm.callbacks.Metrics()])
    learner.fit(15)
    assert learner.history[-1]["valid_loss"] < 0.5 * learner.history[0]["valid_loss"]
    assert learner.history[-1]["valid_accuracy"] > 0.9


def test_ulmfit_fine_tuning_freezes_then_unfreezes_with_discriminative_rates():
    """The encoder stays exactly as loaded while frozen and trains afterwards; each depth has its rate."""
    torch.manual_seed(6)
    model = sm.model.SentimentClassifier(30, "lstm", emb_size=8, hidden_size=8, dropout=0.0)
    args = SimpleNamespace(task="imdb", lr=1e-2, lr_decay=2.0)
    groups = sm.train.param_groups(model, args)
    name = {id(p): n for n, p in model.named_parameters()}
    assert [sorted(name[id(p)] for p in g["params"]) for g in groups] == [
        ["head.bias", "head.weight"], ["rnn.bias_hh_l0", "rnn.bias_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0"],
        ["embedding.weight"]]
    assert [g["lr"] for g in groups] == [1e-2, 1e-2 / 2.0, 1e-2 / 2.0 ** 2]  # lr, lr / D, lr / D^2
    rows = [(torch.randint(1, 30, (6,)).tolist(), i % 2) for i in range(16)]
    data = SimpleNamespace(train=sm.data.ReviewLoader(rows, 8), valid=sm.data.ReviewLoader(rows, 8))
    opt = torch.optim.AdamW(groups, weight_decay=0.1)
    learner = sm.learner.Learner(model, data, sm.callbacks.cross_entropy, opt,
                               [sm.callbacks.Metrics(), sm.callbacks.GradualUnfreezing(sm.train.encoder_params(model), 2)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    learner.fit(2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"head.weight", "head.bias"}
    learner.fit(3)
    assert {"embedding.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= {
        k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


NUMBERS = ["--task", "numbers", "--device", "cpu", "--epochs", "2", "--emb-size", "8", "--hidden-size", "8",
           "--batch-size", "64", "--bptt", "16", "--dropout", "0.2"]


def test_interrupted_run_resumes_exactly(tmp_path, monkeypatch):
    sm.main.main(NUMBERS + ["--out-dir", str(tmp_path / "straight")])
    straight = torch.load(tmp_path / "straight" / "numbers-lstm" / "ckpt.pt", weights_only=True)

    after_epoch = sm.callbacks.CSVLog.after_epoch

    def interrupt(self):  # Ctrl-C right after epoch 1 is checkpointed
        after_epoch(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(sm.callbacks.CSVLog, "after_epoch", interrupt)
    with pytest.raises(SystemExit, match="--resume"):
        sm.main.main(NUMBERS + ["--out-dir", str(tmp_path / "resumed")])
    monkeypatch.setattr(sm.callbacks.CSVLog, "after_epoch", after_epoch)
    sm.main.main(["--task", "numbers", "--resume", "--device", "cpu", "--tensorboard", "--out-dir",
                  str(tmp_path / "resumed")])
    resumed = torch.load(tmp_path / "resumed" / "numbers-lstm" / "ckpt.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=1e-6, rtol=0)
    assert (tmp_path / "resumed" / "sequence_models_numbers_curves.png").is_file()
    assert list((tmp_path / "resumed" / "numbers-lstm" / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_takes_the_flags_of_a_checkpoint_written_before_the_renames(tmp_path):
    """A checkpoint from before --model and --encoder stored `cell` and `pretrained` (a path): --resume
    reads them as --model and --encoder, and its other flags as before; flags typed now still win."""
    old = vars(sm.main.parse_args(["--task", "numbers", "--model", "gru", "--hidden-size", "24", "--epochs", "3"]))
    old["cell"], old["pretrained"] = old.pop("model"), "lm/best.pt"
    del old["encoder"], old["evaluate"], old["export_pretrained"]
    (tmp_path / "numbers-gru").mkdir()
    torch.save({"folder": "sequence_models", "args": old}, tmp_path / "numbers-gru" / "ckpt.pt")
    args = sm.main.parse_args(["--task", "numbers", "--model", "gru", "--resume", "--out-dir", str(tmp_path),
                               "--layers", "3"])
    assert (args.model, args.hidden_size, args.epochs, args.layers) == ("gru", 24, 3, 3)
    assert (args.encoder, args.pretrained, args.resume) == ("lm/best.pt", False, True)


def write_imdb(root, n=48, test_only=""):
    """A synthetic aclImdb_v1.tar.gz: positive reviews say 'great', negative ones 'awful'; the test
    reviews end with `test_only`."""
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
                    data = (" ".join(words) + ".<br /><br />" + (test_only if split == "test" else "")).encode()
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{8 if label == 'pos' else 2}.txt")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


LM = ["--task", "imdb-lm", "--device", "cpu", "--epochs", "2", "--emb-size", "8", "--hidden-size", "12",
      "--batch-size", "4", "--bptt", "8", "--lm-vocab", "20", "--dropout", "0.3", "--checkpoint-every", "5"]


def test_language_model_killed_mid_epoch_resumes_exactly_where_it_was(tmp_path, monkeypatch):
    """--checkpoint-every 5: a run killed just after the mid-epoch checkpoint of step 10 (epoch 1 of
    2), then resumed, ends with the weights, optimiser state and per-epoch losses of the run that was
    never stopped: the trained batches are skipped, the LM's carried state, the random state (dropout)
    and the epoch's metric rows come back."""
    write_imdb(tmp_path, n=24)
    common = LM + ["--data-dir", str(tmp_path)]
    sm.main.main(common + ["--out-dir", str(tmp_path / "straight")])
    save, saved = sm.callbacks.Checkpoint.save, []

    def kill_after_step_10(self, state):
        save(self, state)
        saved.append((state["step"], state["batch"]))
        if state["step"] == 10:
            raise KeyboardInterrupt

    monkeypatch.setattr(sm.callbacks.Checkpoint, "save", kill_after_step_10)
    with pytest.raises(SystemExit, match=r"at step 10 \(epoch 1, batch 10\).*--resume"):
        sm.main.main(common + ["--out-dir", str(tmp_path / "resumed")])
    assert saved == [(5, 5), (10, 10)]
    ckpt = torch.load(tmp_path / "resumed" / "imdb-lm-lstm" / "ckpt.pt", weights_only=True)
    assert ckpt["lm_state"][0].shape == (1, 4, 12) and ckpt["rows"].shape == (10, 3)
    monkeypatch.setattr(sm.callbacks.Checkpoint, "save", save)
    sm.main.main(["--task", "imdb-lm", "--resume", "--device", "cpu", "--data-dir", str(tmp_path),
                  "--out-dir", str(tmp_path / "resumed")])
    straight, resumed = [torch.load(tmp_path / run / "imdb-lm-lstm" / "ckpt.pt", weights_only=True)
                         for run in ("straight", "resumed")]
    assert resumed["step"] == straight["step"] > 2 * 10 and resumed["epoch"] == 2
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, atol=1e-6, rtol=0)
    for k, v in straight["optimizer"]["state"].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][k]["exp_avg_sq"], v["exp_avg_sq"], atol=1e-9, rtol=0)
    for a, b in zip(straight["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-6)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], abs=1e-6)


def test_the_language_model_reads_the_train_splits_text_only(tmp_path, monkeypatch):
    """imdb-lm's streams hold exactly the tokens of the archive's train reviews (valid: the held-out
    ones), none of the test reviews (which here end with words no train review has)."""
    write_imdb(tmp_path, n=24, test_only=" unseen words unseen words")
    streams, loader = [], sm.data.StreamLoader
    monkeypatch.setattr(sm.data, "StreamLoader", lambda ids, *a: streams.append(ids) or loader(ids, *a))
    args = SimpleNamespace(data_dir=str(tmp_path), limit=0, vocab_size=100, batch_size=4, bptt=8, lm_vocab=20)
    _, vocab = sm.data.imdb_lm_data(args)
    with tarfile.open(tmp_path / "imdb" / "aclImdb_v1.tar.gz") as tar:
        texts = {m.name.split("/")[1]: [] for m in tar}
        for m in tar:
            texts[m.name.split("/")[1]].append(tar.extractfile(m).read().decode())
    train_tokens = sum(len(sm.data.tokenize(t)) for t in texts["train"])
    assert len(streams) == 2 and len(streams[0]) + len(streams[1]) == train_tokens
    assert len(streams[1]) == train_tokens // len(texts["train"]) * len(sm.data.split_valid(texts["train"])[1])
    assert "unseen" not in vocab.stoi and "great" in vocab.stoi


def test_imdb_pipeline_and_interact(tmp_path, capsys):
    write_imdb(tmp_path)
    common = ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--device", "cpu", "--model", "gru"]
    sm.main.main(common + ["--epochs", "6", "--emb-size", "16", "--hidden-size", "16", "--batch-size", "8",
                           "--lr", "1e-2", "--dropout", "0.0", "--patience", "0"])
    results = json.loads((tmp_path / "runs" / "imdb-gru" / "results.json").read_text())
    assert results["test_accuracy"] > 0.9
    capsys.readouterr()
    sm.main.main(["interact", "--review", "the film was great"] + common)
    sm.main.main(["interact", "--review", "an awful movie"] + common)
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["positive", "negative"]


def test_missing_imdb_offline_names_the_data_dir_and_leaves_no_run_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sm.data, "IMDB_URL", (tmp_path / "no-such-file").as_uri())
    with pytest.raises(SystemExit, match=r"imdb/aclImdb_v1\.tar\.gz.*--data-dir"):
        sm.main.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"), "--device", "cpu"])
    assert not (tmp_path / "data" / "imdb").exists() or not any((tmp_path / "data" / "imdb").iterdir())
    assert not (tmp_path / "runs").exists()


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


def test_mlp_lm_is_bengio_formula_written_out():
    """y = b + W x + U tanh(d + H x), x the context's feature vectors C(w) concatenated, oldest first
    (the paper lists them newest first, which only permutes the columns of H and W); W optional."""
    torch.manual_seed(14)
    model = sm.model.MLPLanguageModel(vocab_size=6, context=3, emb_size=2, hidden_size=4, direct=True)
    C, H, d, U, b, W = (model.C.weight, model.H.weight, model.H.bias, model.U.weight, model.U.bias, model.W.weight)
    window = [4, 0, 5]                                     # w_{t-3}, w_{t-2}, w_{t-1}
    x = torch.cat([C[4], C[0], C[5]])                      # (n m,) = (6,)
    torch.testing.assert_close(model(torch.tensor([window]))[0], b + W @ x + U @ torch.tanh(d + H @ x))
    model.W = None                                         # without the direct connections
    torch.testing.assert_close(model(torch.tensor([window]))[0], b + U @ torch.tanh(d + H @ x))


def test_language_model_ties_weights_and_carries_its_state_detached():
    """Against torch.nn.LSTM over the whole sequence: a stateful LM fed two windows in turn gives the
    same logits as one pass (the state carries over) with the state detached at the edge; logits are
    h E^T + b with E the input embedding (weight tying). A names LM (stateful=False) starts each
    window from zeros."""
    torch.manual_seed(15)
    lm = sm.model.LanguageModel(9, "lstm", emb_size=6, hidden_size=6, num_layers=2, dropout=0.0).eval()
    ref = nn.LSTM(6, 6, 2, batch_first=True)
    ref.load_state_dict(lm.rnn.state_dict())
    E, bias = lm.embedding.weight, lm.head.bias
    x = torch.randint(0, 9, (2, 8))
    with torch.no_grad():
        full = ref(E[x])[0] @ E.T + bias                    # (N, L, V)
        alone = ref(E[x[:, 5:]])[0] @ E.T + bias
    first, second = lm(x[:, :5]).logits, lm(x[:, 5:]).logits
    torch.testing.assert_close(torch.cat([first, second], 1), full, atol=1e-5, rtol=0)
    assert not any(s.requires_grad for s in lm.state)     # truncated BPTT: no graph into the last window
    lm.stateful = False
    torch.testing.assert_close(lm(x[:, 5:]).logits, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task,config", [
    ("imdb", dict(vocab_size=50, cell="lstm", emb_size=6, hidden_size=5, num_layers=2, dropout=0.1)),
    ("imdb", dict(vocab_size=50, cell="rnn", emb_size=6, hidden_size=5, num_layers=1, dropout=0.1)),
    ("imdb", dict(vocab_size=50, cell="gru", emb_size=6, hidden_size=5, num_layers=1, dropout=0.1, pooling="concat")),
    ("numbers", dict(vocab_size=30, cell="gru", emb_size=7, hidden_size=7, num_layers=2, dropout=0.1, stateful=True,
                     out_size=None)),
    ("imdb-lm", dict(vocab_size=30, cell="lstm", emb_size=7, hidden_size=7, num_layers=1, dropout=0.1,
                     stateful=True, out_size=12)),
    ("names", dict(vocab_size=30, context=3, emb_size=4, hidden_size=9, direct=True))])
def test_the_memory_estimate_counts_the_parameters_the_model_will_have(task, config):
    """The size check before any data is read counts parameters from the config alone (tied weights
    once); here against the built model."""
    model = sm.model.build_model(task, config)
    assert sm.train.n_parameters(task, config) == sum(p.numel() for p in model.parameters())


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
    full = sm.callbacks.cross_entropy(logits[:1], y[:1]) * 3 + sm.callbacks.cross_entropy(logits[1:, :2], y[1:, :2]) * 2
    torch.testing.assert_close(sm.callbacks.cross_entropy(logits, y), full / 5)
    acc = sm.callbacks.accuracy(logits, y)
    assert acc == (logits[:1].argmax(-1) == y[:1]).sum().add((logits[1, :2].argmax(-1) == y[1, :2]).sum()) / 5


def write_names(root, n):
    names = root / "names" / "names.txt"
    names.parent.mkdir(parents=True)
    g = torch.Generator().manual_seed(9)
    names.write_text("\n".join("".join("abcde"[i] for i in torch.randint(0, 5, (int(k),), generator=g))
                               for k in torch.randint(2, 7, (n,), generator=g)) + "\n")


def test_sweep_records_every_config_and_picks_the_lowest_validation_loss(tmp_path):
    write_names(tmp_path / "data", 200)
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
    pretrained = sm.train.load_language_model(tmp_path / "best.pt")
    sm.train.load_encoder(clf, pretrained, vocab, tmp_path / "best.pt")
    for name, p in lm.state_dict().items():
        if name.startswith(("embedding.", "rnn.")):
            assert torch.equal(clf.state_dict()[name], p), name
    assert torch.equal(clf.head.weight, head)  # the classifier's own head stays as it was
    with pytest.raises(SystemExit, match="another vocabulary"):
        sm.train.load_encoder(clf, pretrained, sm.data.Vocab(vocab.itos[:-1]), tmp_path / "best.pt")
    with pytest.raises(SystemExit, match="give the classifier the same"):
        sm.train.load_encoder(sm.model.SentimentClassifier(20, "gru", 8, 12), pretrained, vocab, tmp_path / "best.pt")


def accuracy_written_out(ckpt, reviews):
    """A saved classifier's accuracy, one review at a time (no batching, padding or masks)."""
    model = sm.model.SentimentClassifier(**ckpt["config"]).eval()
    model.load_state_dict(ckpt["model"])
    vocab, max_len = sm.data.Vocab(ckpt["vocab"]), ckpt["args"]["max_len"]
    hits = 0
    with torch.no_grad():
        for text, label in reviews:
            x = torch.tensor([vocab.encode(sm.data.tokenize(text))[-max_len:]])
            hits += int(model(x, torch.ones_like(x, dtype=torch.bool)).argmax()) == label
    return hits / len(reviews)


def test_transfer_reports_what_its_saved_models_score_and_starts_from_the_pretrained_encoder(tmp_path, monkeypatch):
    """Each kind's test accuracy in the table is what its saved best.pt scores, evaluated here review
    by review; the pretrained and ulmfit runs start from the language model's embedding and LSTM
    (and scratch runs do not), on N labelled reviews, half of each class, with each kind's recipe."""
    write_imdb(tmp_path)
    runs = tmp_path / "runs"
    common = ["--data-dir", str(tmp_path), "--out-dir", str(runs), "--device", "cpu", "--emb-size", "16",
              "--hidden-size", "16", "--batch-size", "8", "--epochs", "2"]
    sm.main.main(["--task", "imdb-lm", "--lm-vocab", "20", "--bptt", "8", "--vocab-size", "12"] + common)
    lm, lm_vocab = [torch.load(runs / "imdb-lm-lstm" / "best.pt", weights_only=True)[k] for k in ("model", "vocab")]
    started, load_encoder, imdb_data = [], sm.train.load_encoder, sm.data.DATA["imdb"]

    def spy_encoder(model, *a):
        load_encoder(model, *a)
        started.append({k: v.clone() for k, v in model.state_dict().items()})

    def spy_data(args, vocab=None):
        data, vocab = imdb_data(args, vocab)
        labels = [label for _, label in data.train.encoded]
        started.append((args.labels, len(labels), sum(labels), args.encoder is not None, args.lr_decay,
                        args.freeze_epochs, args.pooling, args.schedule))
        return data, vocab

    monkeypatch.setattr(sm.train, "load_encoder", spy_encoder)
    monkeypatch.setitem(sm.data.DATA, "imdb", spy_data)
    rows = sm.main.main(["transfer", "--label-counts", "8,32"] + common)
    recipe = {"scratch": (False, 1.0), "pretrained": (True, 1.0), "ulmfit": (True, 2.6)}
    ulmfit, other = (round(0.25 * 2), "concat", "stlr"), (0, "meanmax", "onecycle")
    expected = [(n, n, n // 2, *recipe[kind], *(ulmfit if kind == "ulmfit" else other))
                for n in (8, 32) for kind in recipe]
    assert [s for s in started if isinstance(s, tuple)] == expected
    loaded = [s for s in started if isinstance(s, dict)]
    assert len(loaded) == 4  # pretrained and ulmfit, at 8 and 32 labels
    for state in loaded:
        for k, v in lm.items():
            if k.startswith(("embedding.", "rnn.")):
                assert torch.equal(state[k], v), k
    with tarfile.open(tmp_path / "imdb" / "aclImdb_v1.tar.gz") as tar:
        test = [(tar.extractfile(m).read().decode(), int(m.name.split("/")[2] == "pos"))
                for m in tar if m.name.startswith("aclImdb/test/")]
    for kind in recipe:
        for n in (8, 32):
            ckpt = torch.load(runs / "transfer" / f"{kind}-{n}-seed0" / "imdb-lstm" / "best.pt", weights_only=True)
            assert (ckpt["vocab"] == lm_vocab) == (kind != "scratch"), kind  # the LM's words, not its own 30,000
            assert rows[kind][n]["mean"] == pytest.approx(accuracy_written_out(ckpt, test), abs=1e-9), (kind, n)


def test_transfer_runs_each_seed_skips_finished_runs_resumes_an_interrupted_one_and_reports_mean_and_sd(
        tmp_path, monkeypatch):
    """--seeds 3: every (N, kind) runs seeds 0, 1, 2, each in its folder with its seed; a rerun with the
    same --out-dir trains nothing that has results.json and resumes a run that left only ckpt.pt; the
    table's mean and sd are those of the accuracies the runs wrote (a stub trains: known numbers)."""
    encoder = tmp_path / "lm.pt"
    encoder.write_bytes(b"")  # the stub never reads it
    calls, accuracy = [], lambda run: 0.5 + 0.01 * run.seed + 0.1 * (run.encoder is not None) + run.labels / 1e4

    def stub_train(run):
        calls.append((run.out_dir.split("/")[-1], run.seed, run.labels, run.resume, run.pooling, run.schedule))
        folder = sm.train.run_dir(run)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps({"test_accuracy": accuracy(run), "best_epoch": 1,
                                                         "epochs_run": run.epochs, "train_seconds": 1.0}))

    monkeypatch.setattr(sm.transfer, "train", stub_train)
    argv = ["transfer", "--label-counts", "8,32", "--kinds", "scratch,ulmfit", "--seeds", "3", "--encoder",
            str(encoder), "--out-dir", str(tmp_path / "runs"), "--device", "cpu"]
    sm.main.main(argv[:4] + ["scratch"] + argv[5:])
    assert [c[:3] for c in calls] == [(f"scratch-{n}-seed{s}", s, n) for n in (8, 32) for s in range(3)]
    interrupted = tmp_path / "runs" / "transfer" / "ulmfit-32-seed1" / "imdb-lstm"
    interrupted.mkdir(parents=True)
    (interrupted / "ckpt.pt").write_bytes(b"")
    calls.clear()
    rows = sm.main.main(argv)
    assert calls == [(f"ulmfit-{n}-seed{s}", s, n, (n, s) == (32, 1), "concat", "stlr")
                     for n in (8, 32) for s in range(3)]
    calls.clear()
    assert sm.main.main(argv) == rows and calls == []
    written = json.loads((tmp_path / "runs" / "transfer" / "transfer.json").read_text())
    for kind in ("scratch", "ulmfit"):
        for n in (8, 32):
            runs = [json.loads((tmp_path / "runs" / "transfer" / f"{kind}-{n}-seed{s}" / "imdb-lstm" /
                                "results.json").read_text())["test_accuracy"] for s in range(3)]
            mean = sum(runs) / 3
            sd = math.sqrt(sum((a - mean) ** 2 for a in runs) / 2)
            assert rows[kind][n]["mean"] == pytest.approx(mean, abs=1e-12) and mean == pytest.approx(
                0.51 + 0.1 * (kind == "ulmfit") + n / 1e4)
            assert rows[kind][n]["std"] == pytest.approx(sd, abs=1e-12) and sd == pytest.approx(0.01)
            assert written[kind][str(n)]["mean"] == pytest.approx(mean, abs=1e-12)
    assert (tmp_path / "runs" / "sequence_models_transfer.png").is_file()


def test_labelled_reviews_are_half_per_class_and_each_seed_takes_its_own_block():
    reviews = [(f"r{i}", i % 3 == 0) for i in range(60)]  # 20 positive, 40 negative, in the fixed-shuffle order
    pos, neg = [r for r in reviews if r[1]], [r for r in reviews if not r[1]]
    assert sm.data.labelled(reviews, 9, 0) == pos[:4] + neg[:5]
    assert sm.data.labelled(reviews, 9, 1) == pos[4:8] + neg[5:10]
    assert sm.data.labelled(reviews, 12, 3) == pos[18:] + pos[:4] + neg[18:24]  # wraps around a class
    subsets = [set(sm.data.labelled(reviews, 8, s)) for s in range(5)]
    assert all(a.isdisjoint(b) for i, a in enumerate(subsets) for b in subsets[i + 1:])


def test_probe_logistic_regression_reaches_the_stationary_point_written_out_and_separates_separable_data():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (X @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.0], dtype=torch.float64) + 0.3 > 0).double()  # separable
    for l2 in (0.1, 1.0, 1e-3):
        w, b = sm.probe.logistic_regression(X, y, l2)
        p = 1 / (1 + torch.exp(-(X @ w + b)))
        # the objective's gradient, written out: (1/R) X^T (p - y) + l2 w = 0 and (1/R) sum(p - y) = 0
        torch.testing.assert_close(X.T @ (p - y) / len(y) + l2 * w, torch.zeros(5, dtype=torch.float64),
                                   atol=1e-7, rtol=0)
        assert abs(float((p - y).mean())) < 1e-7
    assert sm.probe.accuracy(X, y, w, b) == 1.0  # l2 1e-3: every training point on its side


def test_probe_picks_its_l2_on_held_out_reviews_never_on_the_test_labels():
    g = torch.Generator().manual_seed(4)
    make = lambda n: (torch.randn(n, 6, generator=g, dtype=torch.float64),
                      torch.randint(0, 2, (n,), generator=g).double())
    train, valid, test = make(30), make(30), make(50)
    flipped = (test[0], 1 - test[1])
    a, b = sm.probe.fit_probe(train, valid, test), sm.probe.fit_probe(train, valid, flipped)
    assert a["l2"] == b["l2"] and a["test_accuracy"] + b["test_accuracy"] == pytest.approx(1.0)
    mean, sd = train[0].mean(0), train[0].std(0)
    w, c = sm.probe.logistic_regression((train[0] - mean) / sd, train[1], a["l2"])
    valid_accuracy = lambda l2: sm.probe.accuracy((valid[0] - mean) / sd, valid[1], *sm.probe.logistic_regression(
        (train[0] - mean) / sd, train[1], l2))
    assert valid_accuracy(a["l2"]) == max(valid_accuracy(l2) for l2 in sm.probe.L2)
    assert a["test_accuracy"] == sm.probe.accuracy((test[0] - mean) / sd, test[1], w, c)


def test_probe_features_are_mean_and_max_of_the_lstm_outputs_of_each_review_alone(tmp_path):
    torch.manual_seed(5)
    vocab = sm.data.Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(10)])
    model = sm.model.SentimentClassifier(len(vocab), "lstm", emb_size=4, hidden_size=6, dropout=0.5).eval()
    reviews = [(" ".join(f"w{(3 * i + j) % 10}" for j in range(2 + i % 5)), i % 2) for i in range(9)]
    X, y = sm.probe.features(model, reviews, vocab, max_len=5, batch_size=4)
    assert y.tolist() == [i % 2 for i in range(9)] and X.shape == (9, 12)
    for row, (text, _) in zip(X, reviews):
        ids = torch.tensor([vocab.encode(text.split())[-5:]])
        h, _ = model.rnn(model.embedding(ids))                              # (1, L, 6), no padding
        torch.testing.assert_close(row.float(), torch.cat([h[0].mean(0), h[0].amax(0)]), atol=1e-6, rtol=0)


def test_probe_command_scores_the_pretrained_and_the_random_encoder(tmp_path):
    write_imdb(tmp_path, n=24)
    args = SimpleNamespace(data_dir=str(tmp_path), limit=0, vocab_size=100)
    vocab = sm.data.imdb_splits(args)[3]
    torch.manual_seed(0)
    lm = sm.model.LanguageModel(len(vocab), "lstm", emb_size=8, hidden_size=8, num_layers=1, out_size=10)
    (tmp_path / "lm").mkdir()
    torch.save({"folder": "sequence_models", "task": "imdb-lm", "vocab": vocab.itos, "model": lm.state_dict(),
                "config": {"cell": "lstm", "emb_size": 8, "hidden_size": 8, "num_layers": 1}},
               tmp_path / "lm" / "best.pt")
    rows = sm.main.main(["probe", "--data-dir", str(tmp_path), "--encoder", str(tmp_path / "lm" / "best.pt"),
                         "--label-counts", "8,16", "--seeds", "2", "--test-size", "20", "--out-dir",
                         str(tmp_path / "runs"), "--device", "cpu"])
    written = json.loads((tmp_path / "runs" / "probe" / "probe.json").read_text())
    assert written["test"] == 20 and written["valid"] == 4
    for name in ("pretrained", "random"):
        for n in (8, 16):
            seeds = [rows[name][n]["seeds"][s]["test_accuracy"] for s in (0, 1)]
            assert all(a * 20 == round(a * 20) for a in seeds)  # a share of the 20 test reviews
            assert rows[name][n]["mean"] == pytest.approx(sum(seeds) / 2)
            assert written[name][str(n)]["std"] == pytest.approx(abs(seeds[0] - seeds[1]) / math.sqrt(2))


def test_concat_pooling_is_last_max_and_mean_of_the_real_steps():
    torch.manual_seed(6)
    meanmax = sm.model.SentimentClassifier(12, "gru", emb_size=4, hidden_size=5, dropout=0.0)
    concat = sm.model.SentimentClassifier(12, "gru", emb_size=4, hidden_size=5, dropout=0.0, pooling="concat")
    assert concat.head.in_features == 15 and meanmax.head.in_features == 10
    x = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0]])
    outputs = torch.randn(2, 4, 5)
    pooled = concat.pool(outputs, x != 0)
    for r, L in ((0, 4), (1, 2)):
        real = outputs[r, :L]
        torch.testing.assert_close(pooled[r], torch.cat([real[-1], real.amax(0), real.mean(0)]))
        torch.testing.assert_close(meanmax.pool(outputs, x != 0)[r], torch.cat([real.mean(0), real.amax(0)]))
    logits = concat(x, x != 0)
    h, _ = concat.rnn(concat.embedding(x[1:, :2]))                         # the short review without padding
    torch.testing.assert_close(logits[1], concat.head(torch.cat([h[0, -1], h[0].amax(0), h[0].mean(0)])))


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
    args = SimpleNamespace(text=str(path), context=3, bptt=16, model="mlp")
    assert str(path) in one_line_exit(sm.data.text_data, args)
    names = ["emma", "olivia", "ava", "zoé", "mary-jane", "o'neil", "ann marie", "liam", "noah", "mia"]
    path.write_text("\n".join(names[:4] + ["x2y"] + names[4:]) + "\n")
    assert f"{path} line 5 is not a name ('x2y')" in one_line_exit(sm.data.read_names, tmp_path)
    path.write_text("\r\n".join(names) + "\r\n\r\n")
    assert sm.data.read_names(tmp_path) == names


def one_real_step(monkeypatch, argv, check):
    """Parse argv as the command line does and train: check(learner, seen) runs after the first
    optimiser step, with what taps around the callbacks saw in it; then the run stops."""
    seen = {}

    def tap(key, what):
        return lambda L, e: L.training and L.step == 0 and seen.setdefault(key, what(L))

    def stop(L, e):
        check(L, seen)
        raise sm.learner.CancelFit

    params = lambda L: {n: p.detach().clone() for n, p in L.model.named_parameters()}
    grads = lambda L: {n: p.grad.clone() for n, p in L.model.named_parameters() if p.grad is not None}
    norm = lambda L: float(torch.stack([g.norm() for g in grads(L).values()]).norm())
    model_out = lambda L: (L.out.dropped, L.out.hidden) if isinstance(L.out, tuple) else (None, None)
    taps = [Tap(-5, tap("ce", lambda L: (L.loss.item(), *model_out(L))), "after_loss"),
            Tap(5, tap("penalised", lambda L: L.loss.item()), "after_loss"),
            Tap(-1, tap("norm", norm), "before_step"),                     # before GradientClipping
            Tap(5, tap("step", lambda L: (norm(L), params(L), grads(L), [g["lr"] for g in L.opt.param_groups])),
                "before_step"),                                            # after it
            Tap(200, stop, "after_step")]
    with_taps = sm.train.callbacks_for
    monkeypatch.setattr(sm.train, "callbacks_for", lambda *a: with_taps(*a) + taps)
    monkeypatch.setattr(sm.train, "evaluate", lambda *a: None)
    sm.train.train(sm.main.parse_args(argv))


def test_flags_reach_the_math_of_a_real_training_step_of_the_names_lm(tmp_path, monkeypatch):
    """--ar, --tar: the loss of the step grows by Merity's terms with these values; --grad-clip: the
    step's gradient norm is min(norm, clip); --weight-decay and --lr: the first AdamW step is written
    out, p' = p (1 - lr_0 wd) - lr_0 g / (|g| + eps) (bias-corrected moments of one step: m = g,
    v = g^2), with lr_0 = lr / 25, where one-cycle starts."""
    write_names(tmp_path / "data", 120)
    argv = ["--task", "names", "--model", "gru", "--data-dir", str(tmp_path / "data"), "--out-dir",
            str(tmp_path / "runs"), "--device", "cpu", "--epochs", "1", "--emb-size", "8", "--hidden-size", "12",
            "--batch-size", "16", "--dropout", "0.5", "--ar", "1.5", "--tar", "0.7", "--grad-clip", "0.05",
            "--weight-decay", "0.3", "--lr", "2e-3"]
    done = []

    def check(L, seen):
        ce, dropped, h = seen["ce"]  # AR and TAR take every step of the padded batch, as ARTAR does
        assert seen["penalised"] == pytest.approx(ce + 1.5 * dropped.pow(2).mean().item()
                                                  + 0.7 * tar_written_out(h).item(), rel=1e-5)
        clipped, before, g, _ = seen["step"]
        assert clipped == pytest.approx(min(seen["norm"], 0.05), rel=1e-4)
        lr0 = 2e-3 / 25
        for n, p in L.model.named_parameters():
            expected = before[n] * (1 - lr0 * 0.3) - lr0 * g[n] / (g[n].abs() + 1e-8)
            torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=1e-5)
        done.append(True)

    one_real_step(monkeypatch, argv, check)
    assert done


def test_flags_reach_the_math_of_a_real_training_step_of_the_classifier(tmp_path, monkeypatch):
    """--lr-decay: the head, the LSTM and the embedding peak at lr, lr/D, lr/D^2 and start the step
    at a 25th of that; --freeze-epochs: in the first epoch only the head has gradients and moves;
    --weight-decay reaches every group."""
    write_imdb(tmp_path, n=12)
    argv = ["--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs"), "--device", "cpu", "--epochs", "2",
            "--emb-size", "8", "--hidden-size", "8", "--batch-size", "8", "--lr", "1e-2", "--lr-decay", "3",
            "--freeze-epochs", "1", "--weight-decay", "0.2"]
    done = []

    def check(L, seen):
        name = {id(p): n.split(".")[0] for n, p in L.model.named_parameters()}
        _, before, g, lrs = seen["step"]
        groups = [({name[id(p)] for p in group["params"]}, group["max_lr"], group["weight_decay"])
                  for group in L.opt.param_groups]
        assert [parts for parts, *_ in groups] == [{"head"}, {"rnn"}, {"embedding"}]
        assert [peak for _, peak, _ in groups] == pytest.approx([1e-2, 1e-2 / 3, 1e-2 / 9])  # lr / D^depth
        assert lrs == pytest.approx([1e-2 / 25, 1e-2 / 3 / 25, 1e-2 / 9 / 25])              # one-cycle's start
        assert all(wd == 0.2 for *_, wd in groups)
        assert {n.split(".")[0] for n in g} == {"head"}
        moved = {n.split(".")[0] for n, p in L.model.named_parameters() if not torch.equal(p, before[n])}
        assert moved == {"head"}
        done.append(True)

    one_real_step(monkeypatch, argv, check)
    assert done


def counted_flops(model, batch):
    """FlopCounterMode's count of one forward and backward of cross-entropy (+ the model's inputs)."""
    *x, y = batch
    with FlopCounterMode(display=False) as counter:
        out = model(*x)
        F.cross_entropy((out[0] if isinstance(out, tuple) else out).flatten(0, -2), y.flatten()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("task", ["imdb", "numbers"])
def test_benchmark_reports_the_quick_models_parameters_batch_and_flops(task, tmp_path, capsys):
    """--benchmark --quick's JSON line against the quick config written out here: its parameter count,
    its batch in reviews (IMDb, random: no archive in --data-dir) or tokens (numbers, real: generated),
    training FLOPs per sample as 3 x 2 x the multiply-adds of the matrix products (checked against
    FlopCounterMode's count of one step), and the throughput as batch / median step."""
    sm.main.main(["--benchmark", "--quick", "--task", task, "--device", "cpu", "--benchmark-steps", "2",
                  "--data-dir", str(tmp_path)])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lstm = lambda n_in, H: 4 * H * (n_in + H) + 2 * 4 * H  # W_ih, W_hh, b_ih, b_hh
    torch.manual_seed(0)
    if task == "imdb":  # --quick: vocabulary 8,000, embedding 32, one LSTM layer of 48, reviews cut to 150
        V, E, H, L, N = 8000, 32, 48, 150, 64
        params = V * E + lstm(E, H) + (2 * H * 2 + 2)                        # embedding, LSTM, head on [mean; max]
        flops = 3 * 2 * (L * 4 * H * (E + H) + 2 * H * 2)                    # per review
        model = sm.model.SentimentClassifier(V, "lstm", E, H, dropout=0.0)
        x = torch.randint(2, V, (N, L))
        batch = (x, x != 0, torch.randint(0, 2, (N,)))
        assert (r["unit"], r["data"], r["batch_size"]) == ("reviews", "random", N)
    else:  # --quick: embedding = hidden = 32 (tied head), two LSTM layers, 64 rows of 16 words
        train, valid = sm.data.human_numbers()
        V, E, H, N = 2 + len(set(train + valid)), 32, 32, 64                  # + <pad>, <unk>
        params = V * E + lstm(E, H) + lstm(H, H) + V                          # the head shares the embedding
        flops = 3 * 2 * (4 * H * (E + H) + 4 * H * (H + H) + H * V)         # per token
        model = sm.model.LanguageModel(V, "lstm", E, H, num_layers=2, dropout=0.0)
        batch = (torch.randint(0, V, (N, 16)), torch.randint(0, V, (N, 16)))
        assert (r["unit"], r["data"], r["batch_size"]) == ("tokens", "real", N * 16)
    assert r["params"] == params == sum(p.numel() for p in model.parameters())
    assert r["flops_per_sample"] == flops
    assert counted_flops(model, batch) / r["batch_size"] == pytest.approx(flops, rel=0.03)  # h_0 has no gradient
    assert r["samples_per_s"] == pytest.approx(r["batch_size"] / (r["step_ms"] / 1000), rel=1e-9)
    assert r["tflops"] == pytest.approx(flops * r["samples_per_s"] / 1e12, rel=1e-9)
    assert (r["folder"], r["device"], r["mfu"], r["compile"]) == ("sequence_models", "cpu", None, False)
    assert not list(tmp_path.iterdir())  # nothing downloaded, nothing written


def test_the_input_projection_is_one_matrix_product_per_layer_and_only_the_recurrent_one_loops(monkeypatch):
    """W_ih x_t + b_ih for all t is one F.linear on the (L N, in) inputs per layer; the loop holds only
    W_hh h_{t-1}, one (N, H) product per step."""
    torch.manual_seed(18)
    ours = sm.model.LSTM(5, 7, 2)
    calls, linear = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: calls.append((w, tuple(x.shape))) or linear(x, w, b))
    ours(torch.randn(6, 3, 5))
    expected = [(ours.weight_ih_l0, (6 * 3, 5))] + [(ours.weight_hh_l0, (3, 7))] * 6 \
        + [(ours.weight_ih_l1, (6 * 3, 7))] + [(ours.weight_hh_l1, (3, 7))] * 6
    assert [(id(w), shape) for w, shape in calls] == [(id(w), shape) for w, shape in expected]


def test_the_compiled_time_step_matches_torch():
    """compile_step(): the same outputs, states and gradients as torch.nn's LSTM, training and then
    without gradients on a smaller batch. aot_eager traces what inductor would fuse (dynamo and AOT
    autograd) and runs it with eager kernels, which keeps the test fast on CPU."""
    torch.manual_seed(19)
    ref, ours = pair("lstm", 2, True)
    torch.compiler.reset()  # the cells share Recurrent.step's code, and so dynamo's cache of its variants
    ours.compile_step(backend="aot_eager", dynamic=True)
    x = torch.randn(3, 6, 5)
    for module in (ref, ours):
        out, state = module(x)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        ((out * weights).sum() + sum(s.sum() for s in as_tuple(state))).backward()
    torch.testing.assert_close(ours(x)[0], ref(x)[0], atol=1e-5, rtol=0)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for a, b in zip(as_tuple(ours(x[:2])[1]), as_tuple(ref(x[:2])[1]), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_with_a_fused_optimiser_a_non_finite_step_is_skipped_on_the_device_and_reported_at_the_next_read():
    """StopOnNonFinite(every=4) with fused AdamW reads nothing per step: a NaN gradient at step 2 leaves
    the weights, Adam's moments and its step count as step 1 left them, through steps 3 and 4 too
    (every later update is skipped), and the flag read at step 4 names step 2."""
    class Poison(sm.learner.Callback):
        def after_backward(self):
            if self.learner.step == 1:
                self.learner.model.weight.grad[0, 0] = float("nan")

    torch.manual_seed(4)
    model = nn.Linear(3, 2)
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    data = SimpleNamespace(train=[batch] * 6, valid=[batch])
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    seen = []
    snapshot = lambda L, e: seen.append([model.weight.detach().clone(), opt.state[model.weight]["exp_avg"].clone(),
                                         opt.state[model.weight]["step"].clone()])
    learner = sm.learner.Learner(model, data, sm.callbacks.cross_entropy, opt,
                               [sm.callbacks.StopOnNonFinite(every=4), Poison(), Tap(5, snapshot, "after_step")])
    with pytest.raises(sm.callbacks.Diverged, match="non-finite at step 2; that update and the ones after it were skipped"):
        learner.fit(1)
    assert len(seen) == 4 and seen[0][2] == 1
    for later in seen[1:]:
        assert all(torch.equal(a, b) for a, b in zip(later, seen[0], strict=True))
    assert torch.isfinite(model.weight).all()


READS = ("item", "cpu", "tolist", "__bool__", "__int__", "__float__")  # each makes the host wait for the device


def test_twenty_training_steps_read_from_the_device_only_at_the_log_interval(tmp_path, monkeypatch):
    """20 steps of names training at --log-interval 10 (the path CUDA takes: fused AdamW, the deferred
    non-finite check, metrics summed on the device, batches gathered there): the loop may read a tensor
    only at the 2 log points (the non-finite flag, the progress bar's loss) and once an epoch (the
    shuffled order), so at most 2 x 2 + 1 reads; before this was 4 or more per step."""
    write_names(tmp_path / "data", 200)
    argv = ["--task", "names", "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"), "--device",
            "cpu", "--epochs", "1", "--emb-size", "8", "--hidden-size", "8", "--batch-size", "4",
            "--log-interval", "10"]
    reads, counting = [], []
    for name in READS:
        def spy(self, *a, _name=name, _read=getattr(torch.Tensor, name), **k):
            if counting:
                reads.append(_name)
            return _read(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)

    def stop(L, e):
        if L.step == 20:
            counting.clear()
            raise sm.learner.CancelFit

    taps = [Tap(-100, lambda L, e: counting.append(True), "before_fit"), Tap(200, stop, "after_step")]
    with_taps = sm.train.callbacks_for
    monkeypatch.setattr(sm.train, "callbacks_for", lambda *a: with_taps(*a) + taps)
    monkeypatch.setattr(sm.train, "evaluate", lambda *a: None)
    sm.train.train(sm.main.parse_args(argv))
    assert len(reads) <= 20 // 10 * 2 + 1, reads


# ---- the shipped weights (pretrained/sequence_models/)

SHIPPED = ["imdb-lstm", "numbers-lstm"]


def shipped_meta(name):
    return json.loads((sm.pretrained.PRETRAINED / f"{name}.json").read_text())


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_weights_load_into_todays_model_and_reproduce_their_check(name):
    """The safetensors (sha256-checked) load into today's model code and answer the JSON's fixed
    input (seeded token ids, no data files) as they did at export: logit sums within 1e-3, and the
    same argmax wherever the top two logits are not a near-tie."""
    task, model_kind = name.split("-")
    ckpt = sm.pretrained.load_shipped(task, model_kind)
    expected = shipped_meta(name)["check"]
    model = sm.model.build_model(task, ckpt["config"])
    model.load_state_dict(ckpt["model"])
    got = sm.pretrained.check(task, model)
    assert got["shape"] == expected["shape"]
    assert got["logits_abs_sum"] == pytest.approx(expected["logits_abs_sum"], rel=1e-3)
    assert got["logits_sum"] == pytest.approx(expected["logits_sum"], abs=1e-3 * expected["logits_abs_sum"])
    x = torch.randint(2, model.embedding.num_embeddings, tuple(expected["shape"]),
                      generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x, x != 0) if task == "imdb" else model(x, None).logits
    top2 = logits.topk(2, -1).values.flatten(0, -2)
    clear = (top2[:, 0] - top2[:, 1] > 1e-3).tolist()
    assert [a for a, c in zip(got["argmax"], clear) if c] == [b for b, c in zip(expected["argmax"], clear) if c]


def test_the_shipped_numbers_lm_reproduces_its_validation_accuracy():
    """The human numbers are generated in code, so the JSON's metric itself is checked: next-word
    accuracy over every token of numbers 8,001-9,999, the stream read statefully as in training."""
    meta = shipped_meta("numbers-lstm")
    args = SimpleNamespace(batch_size=64, bptt=meta["flags"]["bptt"])
    ckpt = sm.pretrained.load_shipped("numbers", "lstm")
    data, _ = sm.data.numbers_data(args, sm.data.Vocab(ckpt["vocab"]))
    model = sm.model.build_model("numbers", ckpt["config"])
    model.load_state_dict(ckpt["model"])
    learner = sm.learner.Learner(model, data, sm.callbacks.cross_entropy, None,
                                 [sm.callbacks.Metrics(), sm.callbacks.ResetState()])
    learner.callback("before_fit")
    assert learner.validate()["valid_accuracy"] == pytest.approx(meta["metric"]["value"], abs=1e-4)


def test_interact_and_fine_tuning_read_the_shipped_weights(capsys):
    """interact --pretrained classifies with the shipped IMDb model; a training run with --pretrained
    takes the shipped model's flags (not the task's defaults) and starts from its weights."""
    for review in sm.sample.EXAMPLES[:2]:
        sm.main.main(["interact", "--pretrained", "--task", "imdb", "--device", "cpu", "--review", review])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["positive", "negative"]
    args = sm.main.parse_args(["--pretrained", "--device", "cpu", "--epochs", "1"])
    flags = shipped_meta("imdb-lstm")["flags"]
    assert (args.emb_size, args.hidden_size, args.vocab_size) == (flags["emb_size"], flags["hidden_size"],
                                                                   flags["vocab_size"]) != (128, 256, 30_000)
    start = sm.train.starting_weights(args, None)
    config = sm.train.model_config(args, len(start["vocab"]))
    model, _ = sm.train.model_and_optimiser(args, config, "cpu", start, sm.data.Vocab(start["vocab"]))
    shipped = sm.pretrained.load_shipped("imdb", "lstm")["model"]
    assert model.state_dict().keys() == shipped.keys()
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())


def copy_of_the_shipped_weights(tmp_path, monkeypatch):
    """pretrained/sequence_models/ and pretrained/SHA256SUMS copied to tmp_path, and read from there."""
    monkeypatch.setattr(sm.pretrained, "PRETRAINED", shipped_copy("sequence_models", tmp_path) / "sequence_models")
    return tmp_path / "pretrained"


def test_a_tampered_shipped_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys):
    root = copy_of_the_shipped_weights(tmp_path, monkeypatch)
    flip_bit(root / "sequence_models" / "imdb-lstm.safetensors", at=-1)
    with pytest.raises(SystemExit) as e:
        sm.main.main(["interact", "--pretrained", "--task", "imdb", "--review", "fine", "--device", "cpu"])
    assert e.value.code == ("sequence_models: pretrained/sequence_models/imdb-lstm.safetensors does not match "
                            "pretrained/SHA256SUMS; restore it with git checkout")
    assert capsys.readouterr().out == ""


def test_a_shipped_file_without_its_sha256_line_is_refused(tmp_path, monkeypatch):
    root = copy_of_the_shipped_weights(tmp_path, monkeypatch)
    unlist(root, "sequence_models/numbers-lstm.json")
    assert sm.pretrained.load_shipped("imdb", "lstm")["task"] == "imdb"  # the other files still pass
    with pytest.raises(SystemExit, match=r"pretrained/sequence_models/numbers-lstm\.json does not match"):
        sm.pretrained.load_shipped("numbers", "lstm")


def test_export_writes_weights_that_load_back_and_refreshes_only_this_folders_sums(tmp_path, monkeypatch):
    """--export-pretrained RUN_DIR of a small numbers run: the weights load back equal to best.pt's
    (float32: small), the JSON carries the run's metric, flags, vocabulary and a check that today's code
    reproduces, and SHA256SUMS gets this folder's lines next to another folder's, which stay."""
    import hashlib
    sm.main.main(NUMBERS + ["--out-dir", str(tmp_path / "runs")])
    shipped = tmp_path / "pretrained" / "sequence_models"
    shipped.parent.mkdir()
    (shipped.parent / "SHA256SUMS").write_text("ab" * 32 + "  gpt/x.safetensors\n")
    monkeypatch.setattr(sm.pretrained, "PRETRAINED", shipped)
    sm.main.main(["--export-pretrained", str(tmp_path / "runs" / "numbers-lstm")])
    best = torch.load(tmp_path / "runs" / "numbers-lstm" / "best.pt", weights_only=True)
    results = json.loads((tmp_path / "runs" / "numbers-lstm" / "results.json").read_text())
    ckpt = sm.pretrained.load_shipped("numbers", "lstm")
    assert ckpt["model"].keys() == best["model"].keys()
    assert all(torch.equal(ckpt["model"][k], v) for k, v in best["model"].items())
    meta = json.loads((shipped / "numbers-lstm.json").read_text())
    assert meta["metric"]["value"] == results["valid_accuracy"] and meta["vocab"] == best["vocab"]
    assert (meta["flags"]["emb_size"], meta["flags"]["bptt"], meta["dtype"]) == (8, 16, "float32")
    model = sm.model.build_model("numbers", ckpt["config"])
    model.load_state_dict(ckpt["model"])
    assert sm.pretrained.check("numbers", model) == meta["check"]
    lines = (shipped.parent / "SHA256SUMS").read_text().splitlines()
    assert lines[0] == "ab" * 32 + "  gpt/x.safetensors"
    assert lines[1:] == [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  sequence_models/{f.name}"
                         for f in sorted(shipped.iterdir())]
