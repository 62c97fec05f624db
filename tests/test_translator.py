"""translator/: the paper's math against independent references (scaled_dot_product_attention,
nn.MultiheadAttention, the formulas written out, a stub decoder with known probabilities for beam
search), masks, causality, the decoding cache, the tokenizer, the split, learning to the label-smoothing
floor, reload, exact resume and clear errors. A synthetic parallel corpus only; translations are
checked against the set of a sentence's references."""
import csv
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT, flip_bit, import_folder, shipped_copy, unlist
from torch.utils.flop_counter import FlopCounterMode

tr = import_folder("translator")
M = tr.model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The networks here are tiny: with two threads on a busy 2-core machine, the hand-offs between them
    cost several times the arithmetic. Module-wide, so that the trained fixture gets it too; restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NOUNS = {"cat": "chat", "dog": "chien", "bird": "oiseau", "horse": "cheval", "fish": "poisson"}
ADJECTIVES = {"red": "rouge", "black": "noir", "small": "petit", "happy": "heureux"}
VERBS = {"sleeps": "dort", "eats": "mange", "runs": "court", "sings": "chante"}
TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--d-ff", "64", "--dropout", "0",
        "--vocab-size", "300", "--batch-size", "16", "--warmup-steps", "20", "--lr", "5e-3", "--max-len", "24",
        "--eval-sentences", "4", "--beam", "3", "--batch-tokens", "0"]


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


REFERENCES = dict(tr.data.group(pairs()))  # English -> every French translation in the corpus


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on the synthetic corpus, then the whole report (test scores, examples, figures);
    and the learning rate of every Adam step of the training."""
    tmp = tmp_path_factory.mktemp("translator")
    args = tr.main.parse_args([*TINY, "--data-dir", data_dir(tmp), "--out-dir", str(tmp / "run"), "--steps", "150",
                               "--eval-interval", "50", "--log-interval", "5", "--keep-last", "2"])
    lrs, step = [], torch.optim.Adam.step

    def adam_step(self, *a, **kw):
        g = self.param_groups[0]
        lrs.append((g["lr"], g["betas"], g["eps"]))
        return step(self, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", adam_step)
        m = tr.train.train(args).eval()
    tr.sample.report(args)
    args.adam_lrs = lrs
    return args, m


# ---- the model

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
    out = M.beam_search(m, src, beam=1)[0]
    logits, _ = m(src, torch.tensor([[1] + out]))
    assert logits[0].argmax(-1)[:len(out)].tolist() == out  # each cached step chose the full forward's argmax


def greedy_by_full_passes(m, src):
    """Greedy decoding written out without a cache or beams: a full forward pass over the prefix for each
    new token, the most probable one (never padding or BOS), until EOS or 2 x |source| + 10 tokens."""
    outputs = []
    for row in src:
        x, ys = row[row != 0][None], [1]
        for _ in range(min(2 * x.size(1) + 10, m.cfg.max_len - 1)):
            logits = m(x, torch.tensor([ys]))[0][0, -1]
            logits[[0, 1]] = float("-inf")
            ys.append(int(logits.argmax()))
            if ys[-1] == 2:
                break
        outputs.append(ys[1:-1] if ys[-1] == 2 else ys[1:])
    return outputs


def test_beam_search_with_beam_1_is_greedy_decoding(trained):
    m = model()
    torch.manual_seed(1)
    src = torch.randint(3, 40, (4, 9))
    src[1, 5:] = 0
    assert M.beam_search(m, src, beam=1) == greedy_by_full_passes(m, src)  # untrained: runs to the length limit
    assert all(len(out) <= 2 * 9 + 10 for out in M.beam_search(m, src, beam=4))
    args, m = trained  # trained: stops at EOS
    tok = tr.data.load_tokenizer(torch.load(Path(args.out_dir) / "ckpt.pt")["tokenizer"])
    src = tr.data.collate(tr.data.encode(tok, ["The red cat sleeps.", "The happy bird sings.", "Fish."]), [[]] * 3)[0]
    greedy = M.beam_search(m, src, beam=1)
    assert greedy == greedy_by_full_passes(m, src)
    assert tok.decode(greedy[0]) in REFERENCES["The red cat sleeps."]  # "Le chat..." or "Ce chat...": both right


@pytest.mark.parametrize("beam", [1, 3])
def test_batched_beam_search_equals_one_sentence_at_a_time(trained, beam):
    """Sentences of different lengths in one padded batch, every beam of every sentence in one decoder
    forward per step, give exactly what each sentence gets alone: with a seeded untrained model (each
    runs to its own length limit) and with the trained one (they stop at EOS at different steps)."""
    args, trained_model = trained
    tok = tr.data.load_tokenizer(torch.load(Path(args.out_dir) / "ckpt.pt")["tokenizer"])
    torch.manual_seed(2)
    random_ids = [torch.randint(3, 40, (n,)).tolist() + [2] for n in (1, 7, 3, 11, 5)]
    texts = ["Fish.", "The red cat sleeps.", "The happy bird sings.", "The dog.", "Small cats eat."]
    for m, sentences in ((model(), random_ids), (trained_model, [ids + [2] for ids in tr.data.encode(tok, texts)])):
        src = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in sentences], batch_first=True)
        batched = M.beam_search(m, src, beam=beam)
        assert batched == [M.beam_search(m, torch.tensor([s]), beam=beam)[0] for s in sentences]
    assert len({len(out) for out in batched}) > 2  # the trained model's outputs end at different steps


# ---- the model against independent references

def test_attention_matches_scaled_dot_product_attention_with_an_explicit_scale():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    mask = M.padding_mask(torch.tensor([[4, 4, 4, 0, 0], [4, 4, 4, 4, 4]]), 0) & M.causal_mask(4, 5, "cpu")
    y, weights = M.attention(q, k, v, mask)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1 / math.sqrt(8)))
    assert torch.all(weights[~mask.expand_as(weights)] == 0)


def test_multi_head_attention_matches_torch_nn_multiheadattention():
    torch.manual_seed(0)
    cfg = config(d_model=12, n_head=3)
    mha, ref = M.MultiHeadAttention(cfg), nn.MultiheadAttention(12, 3, batch_first=True)
    with torch.no_grad():  # the same W^Q, W^K, W^V (stacked in torch's in_proj) and W^O
        ref.in_proj_weight.copy_(torch.cat([mha.w_q.weight, mha.w_k.weight, mha.w_v.weight]))
        ref.in_proj_bias.copy_(torch.cat([mha.w_q.bias, mha.w_k.bias, mha.w_v.bias]))
        ref.out_proj.weight.copy_(mha.w_o.weight)
        ref.out_proj.bias.copy_(mha.w_o.bias)
    x_q, x_kv = torch.randn(2, 4, 12), torch.randn(2, 6, 12)  # cross-attention: queries from another sequence
    keys = torch.tensor([[5, 5, 5, 5, 0, 0], [5, 5, 5, 5, 5, 5]])
    y, weights, _ = mha(x_q, x_kv, M.padding_mask(keys, 0))
    y_ref, w_ref = ref(x_q, x_kv, x_kv, key_padding_mask=keys == 0)  # torch: True = ignore
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(weights.mean(1), w_ref)  # torch averages the heads' weights


def test_sinusoidal_positions_follow_the_formula():
    d = 8
    pe = M.sinusoidal_positions(12, d)
    for pos in range(12):
        for i in range(d // 2):  # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / d)), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / d)), abs=1e-6)


def test_label_smoothed_loss_against_the_formula():
    m = model(label_smoothing=0.1)
    torch.manual_seed(1)
    src, tgt_in = torch.randint(3, 40, (2, 5)), torch.randint(3, 40, (2, 4))
    tgt_out = torch.tensor([[7, 8, 9, 2], [10, 2, 0, 0]])  # the second target padded
    logits, loss = m(src, tgt_in, tgt_out)
    eps, V, total, n = 0.1, 40, 0.0, 0
    for b in range(2):
        for t in range(4):
            y = tgt_out[b, t].item()
            if y == 0:  # padding: no loss
                continue
            z = logits[b, t].double()
            log_p = z - math.log(sum(math.exp(x) for x in z.tolist()))
            # q = (1 - eps) one_hot(y) + eps / V (Szegedy et al. 2016; the paper's eps_ls, §5.4); H(q, p)
            total += -((1 - eps) * log_p[y] + eps / V * log_p.sum()).item()
            n += 1
    assert loss.item() == pytest.approx(total / n, rel=1e-5)


def test_the_schedule_is_the_papers():
    args = tr.main.parse_args(["--warmup-steps", "4000"])
    lr = lambda s: tr.train.get_lr(s - 1, args, 512)  # the paper counts steps from 1
    # 512^-0.5 min(s^-0.5, s 4000^-1.5), worked out: 0.0441942 x 3.95285e-6 s, or 0.0441942 / sqrt(s)
    for s, expected in [(1, 1.74693e-7), (100, 1.74693e-5), (4000, 6.98771e-4), (16000, 3.49386e-4)]:
        assert lr(s) == pytest.approx(expected, rel=1e-5), s
    args.lr = 1e-3  # --lr: the same shape, peaking at 1e-3
    assert [lr(s) for s in (1000, 4000, 16000)] == pytest.approx([2.5e-4, 1e-3, 5e-4])


def test_length_penalty_is_gnmts_and_the_output_limit_twice_the_input_plus_10():
    for length in (1, 2, 7, 30):
        for alpha in (0.0, 0.6, 1.0):
            assert M.length_penalty(length, alpha) == pytest.approx((5 + length) ** alpha / (5 + 1) ** alpha)
    src = torch.tensor([[5, 6, 2, 0, 0, 0, 0, 0, 0, 0, 0], [5] * 10 + [2]])  # 3 and 11 real tokens
    assert M.output_limit(model(max_len=64), src).tolist() == [2 * 3 + 10, 2 * 11 + 10]
    assert M.output_limit(model(max_len=24), src).tolist() == [16, 23]  # within max_len - 1


def test_feed_forward_is_relu_between_two_linear_maps():
    torch.manual_seed(0)
    ff, x = M.FeedForward(config()), torch.randn(2, 3, 16)
    W1, b1, W2, b2 = ff.w_1.weight.T, ff.w_1.bias, ff.w_2.weight.T, ff.w_2.bias
    torch.testing.assert_close(ff(x), torch.maximum(x @ W1 + b1, torch.tensor(0.0)) @ W2 + b2)  # eq. 2


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post-ln", "pre-ln"])
def test_layers_are_their_sublayers_with_residuals_layernorm_and_dropout(pre_ln):
    """Each layer against its sublayers composed by hand: LayerNorm(x + Dropout(Sublayer(x))) (§3.1, §5.4),
    or x + Dropout(Sublayer(LayerNorm(x))) with pre-LN; self-attention, then (decoder) cross-attention to
    the encoder's output, then the FFN; dropout masks drawn in the same order from the same seed."""
    cfg = config(dropout=0.3, pre_ln=pre_ln)
    torch.manual_seed(0)
    enc, dec = M.EncoderLayer(cfg).train(), M.DecoderLayer(cfg).train()
    x, y = torch.randn(2, 5, 16), torch.randn(2, 4, 16)
    src_mask, tgt_mask = M.padding_mask(torch.tensor([[4, 4, 4, 0, 0], [4] * 5]), 0), M.causal_mask(4, 4, "cpu")

    def residual(layer, i, h, sublayer):
        if pre_ln:
            return h + F.dropout(sublayer(layer.norms[i](h)), 0.3)
        return layer.norms[i](h + F.dropout(sublayer(h), 0.3))

    torch.manual_seed(1)
    h = residual(enc, 0, x, lambda a: enc.self_attn(a, a, src_mask)[0])
    expected_enc = residual(enc, 1, h, enc.ff)
    torch.manual_seed(1)
    torch.testing.assert_close(enc(x, src_mask), expected_enc)

    memory = torch.randn(2, 5, 16)
    torch.manual_seed(2)
    h = residual(dec, 0, y, lambda a: dec.self_attn(a, a, tgt_mask)[0])
    h = residual(dec, 1, h, lambda a: dec.cross_attn(a, memory, src_mask)[0])
    expected_dec = residual(dec, 2, h, dec.ff)
    torch.manual_seed(2)
    torch.testing.assert_close(dec(y, memory, src_mask, tgt_mask)[0], expected_dec)


@pytest.mark.parametrize("pre_ln", [False, True], ids=["post-ln", "pre-ln"])
def test_the_transformer_is_its_layers_in_the_papers_order(pre_ln):
    """Fig. 1 by hand: E[x] sqrt(d) + PE -> N encoder layers; E[y] sqrt(d) + PE -> N decoder layers, each
    reading the encoder's output; then the same E, transposed, as the output layer (§3.4, §3.5)."""
    m = model(pre_ln=pre_ln)
    src, tgt = torch.tensor([[5, 6, 7, 2, 0], [8, 9, 10, 11, 2]]), torch.tensor([[1, 12, 13, 0], [1, 14, 15, 16]])
    E, d = m.embedding.weight, 16
    pe = torch.tensor([[math.sin(p / 10000 ** (i / d)) if i % 2 == 0 else math.cos(p / 10000 ** ((i - 1) / d))
                        for i in range(d)] for p in range(5)])
    src_mask = M.padding_mask(src, 0)
    x = E[src] * math.sqrt(d) + pe[:5]
    for layer in m.encoder:
        x = layer(x, src_mask)
    memory = m.enc_norm(x)
    y = E[tgt] * math.sqrt(d) + pe[:4]
    for layer in m.decoder:
        y = layer(y, memory, src_mask, M.causal_mask(4, 4, "cpu") & M.padding_mask(tgt, 0))[0]
    torch.testing.assert_close(m(src, tgt)[0], m.dec_norm(y) @ E.T, atol=1e-5, rtol=1e-5)
    assert isinstance(m.enc_norm, nn.LayerNorm) == pre_ln  # pre-LN: a final LayerNorm on each side
    m = model(pre_ln=pre_ln, dropout=0.3).train()  # §5.4: dropout on the sums of embeddings and positions
    torch.manual_seed(3)
    out = m.embed(src)
    torch.manual_seed(3)
    torch.testing.assert_close(out, F.dropout(m.embedding.weight[src] * math.sqrt(d) + pe[:5], 0.3))


# ---- beam search on a stub decoder whose next-token probabilities are known
A, B, C, D, SINK = 3, 4, 5, 6, 7  # tokens of the stub; 0, 1, 2 are padding, BOS, EOS
EOS = tr.data.EOS


class TreeModel:
    """A decoder stub: table[prefix] -> {token: P(token | prefix)}; after SINK, SINK again; any other
    prefix ends (EOS) with probability 1. Only what beam_search calls."""

    def __init__(self, table):
        self.cfg, self.decoder, self.table = M.Config(vocab_size=8, max_len=8), [None], table

    def next_probs(self, prefix):
        return {SINK: 1.0} if prefix and prefix[-1] == SINK else self.table.get(tuple(prefix), {EOS: 1.0})

    def encode(self, src):
        return torch.zeros(src.size(0), src.size(1), 1), M.padding_mask(src, 0)

    def decode(self, last, memory, src_mask, cache):
        c = cache[0]  # the prefixes so far, BOS first, kept (and reordered by the beams) in the cache
        c["self"] = (torch.cat([c["self"][0], last], 1) if "self" in c else last,)
        logits = torch.full((last.size(0), 1, 8), math.log(1e-9))
        for i, prefix in enumerate(c["self"][0][:, 1:].tolist()):
            for token, p in self.next_probs(prefix).items():
                logits[i, 0, token] = math.log(p)
        return logits, []



def all_hypotheses(stub, limit, prefix=(), log_p=0.0):
    """Every finished output with its log P and length (EOS counted), by walking the whole tree."""
    for token, p in stub.next_probs(list(prefix)).items():
        if token == EOS:
            yield list(prefix), log_p + math.log(p), len(prefix) + 1
        elif len(prefix) + 1 == limit:  # cut at the limit, the last token kept
            yield list(prefix) + [token], log_p + math.log(p), limit
        else:
            yield from all_hypotheses(stub, limit, prefix + (token,), log_p + math.log(p))


def best(stub, alpha, limit=7):
    """The output that maximises log P(Y|X) / ((5 + |Y|)^alpha / 6^alpha)."""
    return max(all_hypotheses(stub, limit), key=lambda h: h[1] / ((5 + h[2]) ** alpha / 6 ** alpha))[0]


SRC = torch.tensor([[9, 2]])  # output limit min(2 x 2 + 10, max_len 8 - 1) = 7 tokens


def test_beam_search_finds_the_best_output_that_greedy_misses():
    stub = TreeModel({(): {A: 0.6, B: 0.4}, (A,): {C: 0.55, D: 0.45}, (B,): {C: 0.9, D: 0.1},
                      (A, C): {D: 0.9, EOS: 0.1}, (B, C): {EOS: 0.95, D: 0.05}})
    # greedy decoding: A, then C, then D: 0.6 x 0.55 x 0.9 = 0.297
    assert best(stub, 0.6) == [B, C]  # 0.4 x 0.9 x 0.95 = 0.342
    # after the second token the beams swap ([B, C] 0.36 overtakes [A, C] 0.33): each must go on
    # from its own prefix, which the stub reads from the reordered cache
    assert M.beam_search(stub, SRC, beam=2, alpha=0.6) == [[B, C]]
    assert M.beam_search(stub, SRC, beam=1, alpha=0.6) == [[A, C, D]]  # beam 1 is greedy


def short_or_long(p_end):
    """short: [A] with P 0.4; long: [B, C, D] with P 0.52 x 0.9 x 0.95 x p_end; the rest of A's mass runs
    into SINK until the length limit."""
    return TreeModel({(): {A: 0.48, B: 0.52}, (A,): {EOS: 0.4 / 0.48, SINK: 0.08 / 0.48}, (B,): {C: 0.9, EOS: 0.1},
                      (B, C): {D: 0.95, EOS: 0.05}, (B, C, D): {EOS: p_end, A: 1 - p_end}})


def test_the_length_normalised_score_prefers_the_longer_output_when_it_should():
    stub = short_or_long(0.85)  # long: P 0.378
    # log 0.4 = -0.916 > log 0.378 = -0.973, but -0.916 / (7/6)^0.6 = -0.835 < -0.973 / (9/6)^0.6 = -0.763
    assert best(stub, 0.0) == [A] and best(stub, 0.6) == [B, C, D]
    assert M.beam_search(stub, SRC, beam=2, alpha=0.0) == [[A]]
    assert M.beam_search(stub, SRC, beam=2, alpha=0.6) == [[B, C, D]]
    # |Y| counts EOS: with P 0.3407 the long output loses, -1.077 / (9/6)^0.6 = -0.844 < -0.835; were EOS
    # not counted, it would win (-1.077 / (8/6)^0.6 = -0.904 > -0.916 / 1)
    stub = short_or_long(0.7663)
    assert best(stub, 0.6) == [A] and M.beam_search(stub, SRC, beam=2, alpha=0.6) == [[A]]


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


def test_batches_hold_pairs_of_similar_length_and_are_a_pure_function_of_seed_and_index():
    src = [[10 + i] + [5] * (i % 7) for i in range(50)]  # pair i starts with token 10 + i
    tgt = [[6] * (1 + i % 5) for i in range(50)]
    a, b = tr.data.Batches(src, tgt, 8, seed=3), tr.data.Batches(src, tgt, 8, seed=3)
    assert a.per_epoch == 7
    epoch = [a(i) for i in range(7)]
    assert sorted(t for s, _, _ in epoch for t in s[:, 0].tolist()) == list(range(10, 60))  # every pair once
    for s, _, tgt_out in epoch:  # §5.1: sorted by length within a pool, so a batch spans 2 tokens at most
        lengths = (s != 0).sum(1) + (tgt_out != 0).sum(1)
        assert lengths.max() - lengths.min() <= 2, lengths.tolist()
    first = [a(i)[0] for i in range(20)]
    later = [b(i)[0] for i in reversed(range(20))][::-1]  # any order of requests, the same batches
    assert all(torch.equal(x, y) for x, y in zip(first, later))
    src_b, tgt_in, tgt_out = a(0)
    assert torch.all(tgt_in[:, 0] == 1) and torch.equal(tgt_in[:, 1:], tgt_out[:, :-1].masked_fill(tgt_out[:, :-1] == 2, 0))


def test_batches_by_tokens_keep_to_the_budget_with_little_padding():
    """--batch-tokens: pairs sorted by (source, target) length, cut into batches of at most that many
    tokens, padding included; every pair once an epoch, a fresh order each epoch, the same cuts."""
    src = [[10 + i] + [5] * (i % 7) for i in range(50)]  # pair i starts with token 10 + i
    tgt = [[6] * (1 + i % 5) for i in range(50)]
    by_pairs = tr.data.Batches(src, tgt, 8, seed=3)
    a, b = tr.data.Batches(src, tgt, 8, seed=3, batch_tokens=60), tr.data.Batches(src, tgt, 8, seed=4, batch_tokens=60)
    assert a.per_epoch == b.per_epoch

    def padding(batches, epoch, budget=60):
        got = [batches(epoch * batches.per_epoch + i) for i in range(batches.per_epoch)]
        assert sorted(t for s, _, _ in got for t in s[:, 0].tolist()) == list(range(10, 60))  # every pair once
        padded = sum(s.numel() + t.numel() for s, _, t in got)  # source x EOS, target y EOS
        assert all(s.numel() + t.numel() <= budget for s, _, t in got)
        return 1 - sum(int((s != 0).sum() + (t != 0).sum()) for s, _, t in got) / padded, [s[:, 0] for s, _, _ in got]

    (pa, first), (pa1, second), (pb, _) = padding(a, 0), padding(a, 1), padding(b, 0)
    assert pa == pa1 == pb < padding(by_pairs, 0, budget=8 * 14)[0]  # the cuts depend on the lengths alone; 18% against 27%
    assert [x.tolist() for x in first] != [x.tolist() for x in second]  # but the order changes each epoch


def test_missing_data_offline_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    def offline(url, path):
        raise OSError("no network")
    monkeypatch.setattr(tr.data, "download", offline)
    with pytest.raises(SystemExit, match=r"tatoeba/fra-eng\.zip.*https://www\.manythings\.org/anki/fra-eng\.zip"
                                         r".*DIR/tatoeba/fra-eng\.zip.*--data-dir DIR") as e:
        tr.data.find_zip(tmp_path)
    assert len(str(e.value).splitlines()) == 1 and "shared" not in str(e.value)
    assert not (tmp_path / "tatoeba" / "fra-eng.zip").exists()
    (tmp_path / "tatoeba" / "fra-eng.zip").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "tatoeba" / "fra-eng.zip").write_text("not a zip")
    with pytest.raises(SystemExit, match="not the Tatoeba export"):
        tr.data.read_pairs(tr.data.find_zip(tmp_path))


# ---- training and translating

def label_smoothing_floor(V, eps):
    """The least label-smoothed cross-entropy of a deterministic target: the entropy of the smoothed
    target q = (1 - eps + eps / V) on the right token, eps / V on each of the others."""
    q_right, q_other = 1 - eps + eps / V, eps / V
    return -q_right * math.log(q_right) - (V - 1) * q_other * math.log(q_other)


def test_validation_loss_reaches_the_label_smoothing_floor_and_the_report_is_written(trained):
    args, _ = trained
    out = Path(args.out_dir)
    rows = log_rows(out)
    V = torch.load(out / "ckpt.pt")["config"]["vocab_size"]
    floor = label_smoothing_floor(V, 0.1)  # 0.89 for V = 300; validation has one translation per sentence
    assert float(rows[0]["train_loss"]) > 0.7 * math.log(V)  # about ln V at the start
    val = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    # unseen sentences (new combinations of seen words): within 0.1 nats of the floor after 150 steps
    # (0.930 to 0.939 with seeds 1-4 and 1337), and still falling from step 50
    assert val[-1] < floor + 0.1 and val[-1] < val[0], (val, floor)
    results = json.loads((out / "results.json").read_text())
    assert results["test_sentences"] == 4 and results["test_pairs"] >= 4
    assert results["greedy"]["bleu_multi_ref"] > 75  # 84.9 to 100 with those seeds
    assert {"bleu", "chrf", "signature"} <= set(results["greedy"]) and "beam3" in results
    assert (out / "translations.txt").read_text().startswith("She saw a boy sitting on a bench.\n  greedy: ")
    for name in ["translator_attention.png", "translator_curves.png"]:
        assert plt.imread(out / name).shape[2] == 4  # an RGBA image


def test_each_optimiser_step_uses_the_papers_schedule(trained):
    args, _ = trained  # --lr 5e-3 --warmup-steps 20: 5e-3 min(s / 20, sqrt(20 / s)) at step s = 1, 2, ...
    assert len(args.adam_lrs) == 150
    for s, expected in [(1, 2.5e-4), (10, 2.5e-3), (20, 5e-3), (80, 2.5e-3), (125, 2e-3)]:
        assert args.adam_lrs[s - 1][0] == pytest.approx(expected), s
    assert {(betas, eps) for _, betas, eps in args.adam_lrs} == {((0.9, 0.98), 1e-9)}  # Adam of §5.3


def test_a_saved_model_translates_identically_after_reload(trained):
    args, m = trained
    loaded, tok, _ = tr.train.load_model(Path(args.out_dir) / "ckpt.pt", "cpu")
    texts = ["The red cat sleeps.", "The small horse sings.", "The happy fish runs."]
    for beam in (1, 3):
        assert tr.sample.translate(loaded, tok, texts, beam)[0] == tr.sample.translate(m, tok, texts, beam)[0]
    assert tr.sample.translate(loaded, tok, ["The black dog eats."])[0][0] in REFERENCES["The black dog eats."]


def test_average_is_the_mean_of_the_last_kept_weights(trained, capsys):
    """--keep-last 2 keeps the weights of the last two validations (steps 100 and 150 of 50, 100, 150);
    --average translates with their element-wise mean (§6.1), written out here from the two files."""
    args, m = trained
    run = Path(args.out_dir)
    assert sorted(p.name for p in run.glob("weights-*.pt")) == ["weights-0000100.pt", "weights-0000150.pt"]
    w100, w150 = (torch.load(run / f"weights-0000{s}.pt", weights_only=True) for s in (100, 150))
    for k, v in m.state_dict().items():
        assert torch.equal(w150[k], v), k  # the last kept weights are the final model's
    averaged, _, _ = tr.train.load_model(run / "ckpt.pt", "cpu", average=True)
    for k, v in averaged.state_dict().items():
        torch.testing.assert_close(v, (w100[k] + w150[k]) / 2, rtol=0, atol=1e-7)
    assert any(not torch.equal(w100[k], w150[k]) for k in w100)
    one_line_exit(capsys, lambda: tr.train.load_model(ROOT / "translator" / "ckpt.pt", "cpu", average=True), "no checkpoint")
    empty = Path(args.out_dir).parent / "no-kept"
    empty.mkdir(exist_ok=True)
    with pytest.raises(SystemExit, match="--keep-last"):
        tr.train.kept_weights(empty)


# ---- the shipped weights (pretrained/translator/)

SHIPPED = ROOT / "pretrained" / "translator"


def test_the_shipped_weights_load_into_todays_model_and_reproduce_their_check():
    """pretrained/translator/en-fr.*: fp16 safetensors within the 4 MiB a file, loaded (after the sha256
    check) into today's Transformer, give the outputs the export recorded on its fixed inputs; a model
    change that forgets to re-export fails here."""
    meta = json.loads((SHIPPED / "en-fr.json").read_text())
    assert all(p.stat().st_size <= 4 * 2**20 for p in SHIPPED.iterdir())
    weights = safetensors.torch.load_file(SHIPPED / "en-fr.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    model, tok, info = tr.pretrained.load_pretrained("cpu")
    assert set(weights) == set(M.Transformer(M.Config(**meta["config"])).state_dict())
    assert info["step"] == meta["run"]["step"] and model.cfg == M.Config(**meta["config"])
    got, want = tr.pretrained.check(model, tok), meta["check"]
    assert got["translation_ids"] == want["translation_ids"] and got["argmax"] == want["argmax"]
    assert got["logits_sum"] == pytest.approx(want["logits_sum"], rel=1e-3)
    assert got["logits_abs_sum"] == pytest.approx(want["logits_abs_sum"], rel=1e-3)


def test_a_tampered_or_unlisted_shipped_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    """A copy of the folder and of pretrained/translator with one byte flipped: translate --pretrained stops
    in one line naming the file, before loading it; so does a file whose line is gone from SHA256SUMS."""
    shutil.copytree(ROOT / "translator", tmp_path / "translator", ignore=shutil.ignore_patterns("__pycache__"))
    weights = shipped_copy("translator", tmp_path) / "translator" / "en-fr.safetensors"
    flip_bit(weights)
    r = subprocess.run([sys.executable, "translator/main.py", "translate", "--pretrained", "Hello."], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and r.stderr.strip() == ("translator: pretrained/translator/en-fr.safetensors does not "
                                                      "match pretrained/SHA256SUMS; restore it with git checkout")
    shutil.copy(SHIPPED / "en-fr.safetensors", weights)  # intact again, but the tokenizer's line is gone
    unlist(tmp_path / "pretrained", "translator/en-fr.tokenizer.json")
    monkeypatch.setattr(tr.pretrained, "ROOT", tmp_path / "pretrained")
    with pytest.raises(SystemExit, match=r"^translator: pretrained/translator/en-fr\.tokenizer\.json does not match "
                                         r"pretrained/SHA256SUMS; restore it with git checkout$"):
        tr.pretrained.load_pretrained()


def test_export_writes_fp16_weights_that_load_back_and_refreshes_only_its_own_sums(trained, tmp_path, monkeypatch):
    """--export-pretrained RUN_DIR: the run's weights rounded to fp16, its tokenizer, a JSON whose check the
    loaded files reproduce exactly, the command with the run's flags; SHA256SUMS keeps other folders' lines."""
    args, m = trained
    monkeypatch.setattr(tr.pretrained, "ROOT", tmp_path / "pretrained")
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "SHA256SUMS").write_text(f"{'0' * 64}  gpt/1984.json\n")
    tr.main.main(["--export-pretrained", args.out_dir])
    sums = (tmp_path / "pretrained" / "SHA256SUMS").read_text().splitlines()
    assert sums[0] == f"{'0' * 64}  gpt/1984.json" and len(sums) == 4
    loaded, tok, info = tr.pretrained.load_pretrained()
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.half().float()), k
    meta = json.loads((tmp_path / "pretrained" / "translator" / "en-fr.json").read_text())
    assert tr.pretrained.check(loaded, tok) == meta["check"] and info["step"] == 150
    assert meta["command"].startswith("python translator/main.py --device cpu --data-dir /path/to/datasets")
    assert "--d-model 32" in meta["command"] and "--steps 150" in meta["command"] and "--out-dir" not in meta["command"]
    assert meta["metric"]["value"] == json.loads((Path(args.out_dir) / "results.json").read_text())["beam3"]["bleu"]


def test_training_with_pretrained_fine_tunes_the_shipped_model(tmp_path):
    """Training with --pretrained starts from the shipped weights, config and tokenizer (the model flags
    typed are not used), with a fresh schedule: one step at a negligible learning rate leaves them."""
    model = tr.train.train(tr.main.parse_args(
        [*TINY, "--pretrained", "--data-dir", data_dir(tmp_path), "--out-dir", str(tmp_path / "ft"), "--steps", "1",
         "--lr", "1e-12", "--warmup-steps", "1", "--eval-interval", "1", "--eval-sentences", "1"]))
    shipped, tok, _ = tr.pretrained.load_pretrained("cpu")
    assert model.cfg == shipped.cfg and model.cfg.d_model != 32  # not TINY's --d-model
    for (name, a), b in zip(model.state_dict().items(), shipped.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["tokenizer"] == tok.to_str()


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
                       input="\n".join(lines) + "\n", cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    out = r.stdout.split("\n")
    assert len(out) == len(lines) + 1 and out[0] in REFERENCES["The red cat sleeps."] and out[1] == "" and out[2]
    assert out[3]
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
    with open(tmp_path / "b" / "log.csv", "a") as f:  # a row torn by a crash (or two writers) is dropped on resume
        f.write("\x007,1.0\n")
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


def test_benchmark_json_against_the_parameters_written_out_and_flop_counter(tmp_path, capsys):
    tr.main.main(["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2",
                  "--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "run")])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not (tmp_path / "run").exists() and not (tmp_path / "empty").exists()  # nothing written or downloaded
    V, d, f, N, L = 1000, 128, 256, 2, 64  # --quick's vocabulary and model; --max-len
    B = 960 // (2 * L)  # --quick's --batch-tokens 960 hold 7 pairs of L + L tokens
    ffn = 2 * d * f + f + d
    encoder_layer, decoder_layer = 4 * (d * d + d) + ffn + 2 * 2 * d, 8 * (d * d + d) + ffn + 3 * 2 * d
    assert r["params"] == V * d + N * (encoder_layer + decoder_layer)  # the embedding is the output layer too
    # random batches: as many pairs of L source and L target tokens as --batch-tokens hold, no padding
    assert (r["folder"], r["unit"], r["batch_size"], r["data"], r["mfu"]) == ("translator", "tokens", B * 2 * L,
                                                                             "random", None)
    cfg = tr.model.Config(vocab_size=V, max_len=L, n_layer=N, n_head=4, d_model=d, d_ff=f)
    src, tgt_in, tgt_out = (torch.randint(3, V, (2, L)) for _ in range(3))
    with FlopCounterMode(display=False) as fc:  # one forward and backward of two pairs
        tr.model.Transformer(cfg)(src, tgt_in, tgt_out)[1].backward()
    assert r["flops_per_sample"] == fc.get_total_flops() / (2 * 2 * L)
    assert r["samples_per_s"] == pytest.approx(r["batch_size"] / (r["step_ms"] / 1e3), rel=1e-9)
    assert r["tflops"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e12, rel=1e-9)
    assert r["peak_mem_mb"] > 0 and r["torch"] == torch.__version__ and r["compile"] is False


def test_benchmark_takes_real_batches_when_the_zip_is_there(tmp_path, capsys):
    data = data_dir(tmp_path)
    tr.main.main([*TINY, "--benchmark", "--benchmark-steps", "2", "--data-dir", data, "--out-dir", str(tmp_path / "run")])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["data"] == "real" and not (tmp_path / "run").exists()
    # the synthetic sentences are 5 words: a batch of 16 pairs holds far fewer tokens than 16 x 2 x --max-len
    assert 16 * 2 * 4 <= r["batch_size"] < 16 * 2 * 24
    tr.main.main([*TINY, "--benchmark", "--benchmark-steps", "2", "--data-dir", data, "--batch-tokens", "150"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 4 * (4 + 4) <= r["batch_size"] <= 150  # --batch-tokens: padding included, at most 150 a batch
    assert r["samples_per_s"] == pytest.approx(r["batch_size"] / (r["step_ms"] / 1e3), rel=1e-9)
