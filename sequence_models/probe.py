"""A linear probe of the pretrained encoder: what its features alone know about sentiment.

The classifier's embedding and LSTM, frozen (eval mode, no dropout), turn each review into
[mean; max] over its LSTM outputs (model.masked_pool). A logistic regression on those features,
standardised with the labelled reviews' mean and deviation, is fitted on N labelled reviews (the
reviews that --labels N --seed S trains on), with the L2 strength among L2 that scores best on
held-out train reviews (the validation split, --valid-size; the test set plays no part in the
choice), and scored on --test-size test reviews. Then the same for the same architecture at its
random initialisation (torch.manual_seed(--seed)): what pretraining adds over random features.
Logistic regression is not this folder's subject: a few lines of full-batch L-BFGS.
"""
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from callbacks import FOLDER
from data import ReviewLoader, Vocab, encode_reviews, imdb_splits, labelled
from model import SentimentClassifier, masked_pool
from train import load_encoder, load_language_model, resolve_device
from transfer import mean_sd

log = logging.getLogger(FOLDER)
L2 = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the strengths tried, each scored on the held-out reviews


@torch.no_grad()
def features(model, reviews, vocab, max_len, batch_size):
    """[mean_t h_t ; max_t h_t] of the frozen encoder for each review, in the reviews' order:
    (R, 2H) float64, and the labels (R,)."""
    loader = ReviewLoader(encode_reviews(reviews, vocab, max_len), batch_size)
    device = next(model.parameters()).device
    pooled = []
    for x, mask, _ in loader.to(device):                                  # batches of similar length
        outputs, _ = model.rnn(model.embedding(x))                         # (N, L, H)
        pooled.append(masked_pool(outputs, mask).double().cpu())           # (N, 2H)
    order, pooled = torch.tensor([i for batch in loader.batches() for i in batch]), torch.cat(pooled)
    X = torch.empty_like(pooled)
    X[order] = pooled                                                      # back to the reviews' order
    return X, torch.tensor([label for _, label in reviews], dtype=torch.float64)


def logistic_regression(X, y, l2, iterations=500):
    """w, b minimising mean_i [-y_i log σ(z_i) - (1 - y_i) log(1 - σ(z_i))] + l2/2 ||w||², z = X w + b
    (X (R, D), y (R,) in {0, 1}), by full-batch L-BFGS in float64."""
    w = torch.zeros(X.size(1), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(X @ w + b, y) + l2 / 2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(objective)
    return w.detach(), b.detach()


def accuracy(X, y, w, b):
    return ((X @ w + b > 0).double() == y).double().mean().item()


def fit_probe(train, valid, test):
    """(X, y) of the labelled, held-out and test reviews -> the test accuracy of the logistic regression
    whose L2 strength scored best on the held-out reviews, and that strength."""
    mean, sd = train[0].mean(0), train[0].std(0).clamp(min=1e-8)
    standard = lambda X: (X - mean) / sd                                    # the labelled reviews' statistics
    fits = {l2: logistic_regression(standard(train[0]), train[1], l2) for l2 in L2}
    l2 = max(L2, key=lambda l2: accuracy(standard(valid[0]), valid[1], *fits[l2]))
    return {"test_accuracy": accuracy(standard(test[0]), test[1], *fits[l2]), "l2": l2}


def encoders(lm, vocab, path, seed):
    """The language model's embedding and LSTM in the classifier, and the same at random initialisation."""
    c = lm["config"]
    for name in ("pretrained", "random"):
        torch.manual_seed(seed)
        model = SentimentClassifier(len(vocab), c["cell"], c["emb_size"], c["hidden_size"], c["num_layers"], 0.0)
        if name == "pretrained":
            load_encoder(model, lm, vocab, path)
        yield name, model.eval()


def probe(args):
    path = Path(args.encoder or Path(args.out_dir) / "imdb-lm-lstm" / "best.pt")
    if not path.is_file():
        raise SystemExit(f"sequence_models: no pretrained encoder at {path}; pretrain first (--task imdb-lm) or "
                         f"give --encoder PATH")
    lm, device = load_language_model(path), resolve_device(args.device)
    vocab = Vocab(lm["vocab"])
    train, valid, test, _ = imdb_splits(args, vocab)
    g = torch.Generator().manual_seed(1)  # a fixed shuffle: the archive lists the test reviews by class
    test = [test[i] for i in torch.randperm(len(test), generator=g)[:args.test_size or None].tolist()]
    valid = valid[:args.valid_size or None]
    feats = lambda model, reviews: features(model, reviews, vocab, args.max_len, 2 * args.batch_size)
    rows = {}
    for name, model in encoders(lm, vocab, path, args.seed):
        model.to(device)
        held_out = feats(model, valid), feats(model, test)
        for n in args.label_counts:
            seeds = {s: fit_probe(feats(model, labelled(train, n, s)), *held_out)
                     for s in range(args.seed, args.seed + args.seeds)}
            rows.setdefault(name, {})[n] = {"seeds": seeds, **mean_sd([r["test_accuracy"] for r in seeds.values()])}
    out = Path(args.out_dir) / "probe"
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"encoder": str(path), "valid": len(valid), "test": len(test),
                                                **rows}, indent=2))
    log.info(f"linear probe, {len(test):,} test reviews; labels: pretrained encoder | random encoder | gain")
    for n in args.label_counts:
        p, r = rows["pretrained"][n], rows["random"][n]
        log.info(f"{n:>6}: {p['mean']:.2%} ± {100 * p['std']:.2f} | {r['mean']:.2%} ± {100 * r['std']:.2f} | "
                 f"{100 * (p['mean'] - r['mean']):+.2f} points ({args.seeds} seed(s))")
    return rows
