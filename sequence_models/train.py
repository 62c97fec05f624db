"""The Learner: a training loop opened up through callbacks (fast.ai's design), the callbacks,
and train(args), which builds a task's data and model and fits them.

The loop calls its callbacks at these events, in this order:

    before_fit
      for every epoch:
        before_epoch
          for every training batch:
            before_batch, before_loss, after_loss, before_backward, after_backward,
            before_step, after_step, after_batch
          before_validate
            for every validation batch: before_batch, before_loss, after_loss, after_batch
          after_validate
        after_epoch
    after_fit

Callbacks run in the order of their `order` attribute. A callback stops the loop by raising
CancelBatch (skip the rest of this batch), CancelEpoch (go on with the next epoch) or CancelFit
(finish now; after_fit still runs).
"""
import contextlib
import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (IGNORE, NameLoader, ReviewLoader, StreamLoader, TensorLoader, Vocab, char_vocab, encode_reviews,
                  human_numbers, name_contexts, read_imdb, read_names, read_utf8, split_names, split_valid,
                  stream_contexts, tokenize)
from model import LanguageModel, MLPLanguageModel, SentimentClassifier

FOLDER = "sequence_models"  # stamped into checkpoints, so that another folder's checkpoint is refused
log = logging.getLogger(FOLDER)


class CancelBatch(Exception):
    pass


class CancelEpoch(Exception):
    pass


class CancelFit(Exception):
    pass


class Callback:
    order = 0


class Learner:
    """fit(epochs) trains `model` on data.train and validates on data.valid every epoch.

    State the callbacks read and write: epoch (0-based), step (optimiser steps so far), training,
    batch, xb (inputs), yb (targets), pred, loss, metrics (this epoch's), history (one row per
    epoch), and epochs (the target of this fit). bf16: the forward and the loss under bfloat16
    autocast (the recurrence itself stays float32, see model.Recurrent.forward).
    """

    def __init__(self, model, data, loss_fn, opt, callbacks=(), device="cpu", bf16=False):
        self.model, self.data, self.loss_fn, self.opt, self.device = model, data, loss_fn, opt, device
        self.bf16 = bf16
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)
        for cb in self.callbacks:
            cb.learner = self
        self.epoch, self.step, self.history, self.metrics, self.training = 0, 0, [], {}, False

    def callback(self, event):
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is not None:
                method()

    def one_batch(self):
        *self.xb, self.yb = [t.to(self.device) for t in self.batch]  # already there when the loader is
        self.callback("before_batch")
        with torch.autocast(torch.device(self.device).type, torch.bfloat16, enabled=self.bf16):
            self.pred = self.model(*self.xb)
            self.callback("before_loss")
            self.loss = self.loss_fn(self.pred, self.yb)
            self.callback("after_loss")
        if self.training:
            self.callback("before_backward")
            self.loss.backward()
            self.callback("after_backward")
            self.callback("before_step")
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.callback("after_step")
        self.callback("after_batch")

    def all_batches(self, loader):
        for self.batch in loader:
            try:
                self.one_batch()
            except CancelBatch:
                pass

    def validate(self, loader=None):
        """One pass without gradients over `loader` (default data.valid); returns self.metrics."""
        self.training, self.loader = False, self.data.valid if loader is None else loader
        self.model.eval()
        self.callback("before_validate")
        with torch.no_grad():
            self.all_batches(self.loader)
        self.callback("after_validate")
        return self.metrics

    def fit(self, epochs):
        self.epochs = epochs
        try:
            self.callback("before_fit")  # a checkpoint callback may move self.epoch forward here
            while self.epoch < self.epochs:
                try:
                    self.metrics = {"epoch": self.epoch + 1}
                    self.training, self.loader = True, self.data.train
                    self.model.train()
                    self.callback("before_epoch")
                    self.all_batches(self.loader)
                    self.validate()
                    self.callback("after_epoch")
                except CancelEpoch:
                    pass
                self.epoch += 1
        except CancelFit:
            pass
        self.callback("after_fit")


# ---- callbacks

def accuracy(pred, y):
    """Share of argmax predictions equal to the target (a review's label, or the next token),
    padding (IGNORE) left out."""
    keep = y != IGNORE
    return ((pred.argmax(-1) == y) & keep).sum() / keep.sum()  # not [keep]: a mask index waits for the device


def cross_entropy(pred, y):
    """pred (..., classes) logits, y (...) targets: a review's logits or every position's;
    targets equal to IGNORE (padding) are skipped, F.cross_entropy's default."""
    return F.cross_entropy(pred.flatten(0, -2), y.flatten())


class Metrics(Callback):
    """Mean loss and accuracy, weighted by targets, into metrics['train_loss', 'valid_accuracy', ...];
    at the end of every epoch the row goes into history. Each batch's (loss, accuracy, targets) stays
    on the device until its split ends, then all are read at once and summed in float64: a read per
    batch would make the host wait for the device every step."""
    order = -10

    def before_fit(self):
        self.rows = {}

    def before_epoch(self):
        self.rows, self.t0 = {}, time.perf_counter()

    def before_validate(self):
        self.rows["valid"] = []

    def after_loss(self):
        L = self.learner
        n = (L.yb != IGNORE).sum()
        row = torch.stack([L.loss.detach(), accuracy(L.pred, L.yb), n.float()])
        self.rows.setdefault("train" if L.training else "valid", []).append(row)

    def means(self, split):
        if not self.rows.get(split):
            return {}
        loss, acc, n = torch.stack(self.rows[split]).cpu().double().unbind(1)  # one read for the whole split
        mean = lambda v: ((v * n).sum() / n.sum()).item()
        return {f"{split}_loss": mean(loss), f"{split}_accuracy": mean(acc)}

    def after_validate(self):
        self.learner.metrics.update(self.means("valid"))

    def after_epoch(self):
        L = self.learner
        L.metrics.update(self.means("train"))
        L.metrics.update(lr=L.opt.param_groups[0]["lr"], seconds=time.perf_counter() - self.t0)
        L.history.append(dict(L.metrics))


class Progress(Callback):
    """tqdm bars over the batches, the training loss every `every` steps, and a log line per epoch
    (python logging)."""
    order = 90

    def __init__(self, every=1):
        self.every = every

    def bar(self, desc):
        self.pbar = tqdm(total=len(self.learner.loader), desc=desc, leave=False, dynamic_ncols=True)

    def before_epoch(self):
        self.bar(f"epoch {self.learner.epoch + 1}/{self.learner.epochs}")

    def after_batch(self):
        self.pbar.update()
        if self.learner.training and self.learner.step % self.every == 0:
            self.pbar.set_postfix(loss=f"{self.learner.loss.item():.3f}")

    def before_validate(self):
        if hasattr(self, "pbar"):
            self.pbar.close()  # the epoch's training bar
        self.bar("validate")

    def after_validate(self):
        self.pbar.close()

    def after_epoch(self):
        m = self.learner.metrics
        log.info(f"epoch {m['epoch']}/{self.learner.epochs}: train loss {m['train_loss']:.4f} "
                 f"acc {m['train_accuracy']:.2%} | valid loss {m['valid_loss']:.4f} "
                 f"acc {m['valid_accuracy']:.2%} | lr {m['lr']:.2e} | {m['seconds']:.0f} s")


class OneCycle(Callback):
    """Smith's one-cycle schedule (torch's OneCycleLR) over the whole fit, stepped every batch;
    each parameter group peaks at the lr it was created with."""

    def before_fit(self):
        L = self.learner
        L.scheduler = torch.optim.lr_scheduler.OneCycleLR(L.opt, [g["lr"] for g in L.opt.param_groups],
                                                          total_steps=L.epochs * len(L.data.train))

    def after_step(self):
        if self.learner.scheduler.last_epoch < self.learner.scheduler.total_steps:
            self.learner.scheduler.step()


class GradualUnfreezing(Callback):
    """ULMFiT's gradual unfreezing for a one-layer encoder: only the head trains for the first
    `epochs` epochs (the pretrained encoder frozen), then everything."""

    def __init__(self, encoder, epochs):
        self.encoder, self.epochs = encoder, epochs

    def before_epoch(self):
        for p in self.encoder:
            p.requires_grad_(self.learner.epoch >= self.epochs)


class GradientClipping(Callback):
    """Rescale the gradient to a global norm of at most max_norm before every step."""

    def __init__(self, max_norm):
        self.max_norm = max_norm

    def before_step(self):
        torch.nn.utils.clip_grad_norm_(self.learner.model.parameters(), self.max_norm)


class Diverged(Exception):
    """Training produced a non-finite number; it was neither stepped into the weights nor saved."""


def all_finite(obj):
    """True if every floating-point tensor in obj (a tensor, or dicts and lists of them) is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return all(all_finite(v) for v in values)


class StopOnNonFinite(Callback):
    """Stop before a non-finite loss or gradient reaches the weights (Checkpoint also refuses to save
    a non-finite state). The loss is checked after ARTAR's penalties, the gradient after clipping.

    every=1 reads both every step. With every > 1 and a fused optimiser nothing is read per step (a
    read makes the host wait for the device): a non-finite step sets a flag on the device that makes
    the optimiser skip that update and every later one (fused AdamW's found_inf, which GradScaler
    uses too), and the flag is read every `every` steps and before the epoch's checkpoint."""
    order = 10

    def __init__(self, every=1):
        self.every = every

    def before_fit(self):
        self.first_bad = torch.zeros((), dtype=torch.long, device=self.learner.device)  # first non-finite step; 0: none

    @property
    def deferred(self):  # asked each time: a resumed checkpoint's optimiser state may not be fused
        return self.every > 1 and all(g.get("fused") for g in self.learner.opt.param_groups)

    def after_loss(self):
        L = self.learner
        if L.training and not self.deferred and not torch.isfinite(L.loss):
            raise Diverged(f"the loss became non-finite ({L.loss.item()}) at step {L.step + 1}; "
                           f"stopped before the update")

    def before_step(self):
        L = self.learner
        norm = torch.nn.utils.get_total_norm([p.grad for p in L.model.parameters() if p.grad is not None])
        if self.deferred:
            bad = ~(torch.isfinite(L.loss) & torch.isfinite(norm))
            self.first_bad = torch.where(bad & (self.first_bad == 0), L.step + 1, self.first_bad)
            L.opt.found_inf = (self.first_bad > 0).float()  # 1: the fused step leaves weights and moments as they are
        elif not torch.isfinite(norm):
            raise Diverged(f"the gradient norm became non-finite ({norm.item()}) at step {L.step + 1}; "
                           f"stopped before the update")

    def after_step(self):
        if self.deferred and self.learner.step % self.every == 0:
            self.check()

    def after_epoch(self):  # before Checkpoint's save (order 100)
        if self.deferred:
            self.check()

    def check(self):
        step = int(self.first_bad)
        if step:
            raise Diverged(f"the loss or the gradient norm became non-finite at step {step}; that update and "
                           f"the ones after it were skipped")


class ARTAR(Callback):
    """Merity et al. 2017's activation regularisation on the LM's last layer, added to the training
    loss after Metrics has recorded the plain cross-entropy:
    AR = alpha * mean(dropout(h_t)^2) keeps activations small, TAR = beta * mean((h_t - h_{t-1})^2)
    on the undropped h_t keeps them from jumping between time steps. The means run over every step
    of the batch (for names, the padded steps after a name's end too)."""

    def __init__(self, alpha, beta):
        self.alpha, self.beta = alpha, beta

    def after_loss(self):
        L = self.learner
        if L.training:
            h = L.model.outputs
            L.loss = (L.loss + self.alpha * L.model.dropped.pow(2).mean()          # AR
                      + self.beta * (h[:, 1:] - h[:, :-1]).pow(2).mean())      # TAR; h (N, L, H)


class ResetState(Callback):
    """A stateful language model starts every epoch and every validation from a zero state."""

    def before_epoch(self):
        self.learner.model.reset()

    def before_validate(self):
        self.learner.model.reset()


def save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous file intact


def load_checkpoint(path, device="cpu"):
    if not path.is_file():
        raise SystemExit(f"sequence_models: no checkpoint at {path}; train first (same --task, --cell and --out-dir)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"sequence_models: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"sequence_models: {path} is a checkpoint of {folder or 'something else'}, not of sequence_models/")
    return ckpt


def best_epoch(history, monitor):
    """Index of the best epoch so far (the first, on ties): what best.pt holds and what early
    stopping waits to see beaten. `monitor` is the metric each task reports: the validation
    accuracy for IMDb and numbers (the loss can rise from over-confidence while the accuracy still
    climbs), the validation loss in nats per character for the character models."""
    values = [h[monitor] for h in history]
    return values.index(min(values) if monitor.endswith("loss") else max(values))


MONITOR = {"imdb": "valid_accuracy", "numbers": "valid_accuracy", "names": "valid_loss", "text": "valid_loss",
           "imdb-lm": "valid_loss"}


class Checkpoint(Callback):
    """Every epoch, atomically: ckpt.pt (everything --resume needs) and, at the best validation
    accuracy so far, best.pt (the weights that get evaluated and served). On resume, before_fit
    restores the model, optimiser, schedule, history and random state."""
    order = 100

    def __init__(self, out, meta, monitor, resume=None):
        self.out, self.meta, self.monitor, self.resume = Path(out), meta, monitor, resume

    def before_fit(self):
        L, ckpt = self.learner, self.resume
        if ckpt is None:
            return
        L.model.load_state_dict(ckpt["model"])
        L.opt.load_state_dict(ckpt["optimizer"])
        if hasattr(L, "scheduler"):
            L.scheduler.load_state_dict(ckpt["scheduler"])
        L.epoch, L.step, L.history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"])
        if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        for loader in vars(L.data).values():
            if hasattr(loader, "shuffle"):  # its shuffle is a function of (seed, epoch)
                loader.epoch = L.epoch
        log.info(f"resumed {self.out / 'ckpt.pt'} after epoch {L.epoch} (step {L.step})")

    def after_epoch(self):
        L = self.learner
        state = {**self.meta, "model": L.model.state_dict(), "epoch": L.epoch + 1, "step": L.step,
                 "history": L.history, "metrics": L.metrics}
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        resumable = {**state, "optimizer": L.opt.state_dict(), "rng": torch.get_rng_state(), "cuda_rng": cuda_rng,
                     "scheduler": L.scheduler.state_dict() if hasattr(L, "scheduler") else None}
        if not (math.isfinite(L.metrics["valid_loss"]) and all_finite(resumable)):
            raise Diverged(f"the model became non-finite (validation loss {L.metrics['valid_loss']}) in epoch "
                           f"{L.epoch + 1}; not saved")
        if best_epoch(L.history, self.monitor) == len(L.history) - 1:
            save_atomic(state, self.out / "best.pt")
        save_atomic(resumable, self.out / "ckpt.pt")


class EarlyStopping(Callback):
    """Stop once the monitored metric has not improved for `patience` epochs. It reads only the
    history, so a resumed run stops exactly where the uninterrupted one would."""
    order = 110  # after Checkpoint: the last epoch is saved before the fit ends

    def __init__(self, patience, monitor):
        self.patience, self.monitor = patience, monitor

    def before_fit(self):  # a resumed run that had already stopped stays stopped
        if self.learner.history:
            self.after_epoch()

    def after_epoch(self):
        history = self.learner.history
        best = best_epoch(history, self.monitor)
        if len(history) - 1 - best >= self.patience:
            log.info(f"early stop: no better {self.monitor} than epoch {best + 1}'s "
                     f"{history[best][self.monitor]:.4f} for {self.patience} epochs")
            raise CancelFit


class CSVLog(Callback):
    """log.csv: the history, one row per epoch, rewritten every epoch (so a resume keeps it whole)."""
    order = 105

    def __init__(self, path):
        self.path = Path(path)

    def after_epoch(self):
        rows = self.learner.history
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)


class TensorBoard(Callback):
    """Train loss and learning rate every `every` steps, validation loss and accuracy every epoch."""
    order = 95

    def __init__(self, log_dir, every=1):
        self.log_dir, self.every = log_dir, every

    def before_fit(self):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(self.log_dir)

    def after_batch(self):
        L = self.learner
        if L.training and L.step % self.every == 0:
            self.writer.add_scalar("loss/train", L.loss.item(), L.step)
            self.writer.add_scalar("lr", L.opt.param_groups[0]["lr"], L.step)

    def after_epoch(self):
        m = self.learner.metrics
        for split in ("train", "valid"):
            self.writer.add_scalar(f"accuracy/{split}", m[f"{split}_accuracy"], self.learner.step)
        self.writer.add_scalar("loss/valid", m["valid_loss"], self.learner.step)
        self.writer.flush()

    def after_fit(self):
        self.writer.close()


class Wandb(Callback):
    """Weights & Biases, opt-in: the same scalars as TensorBoard."""
    order = 95

    def __init__(self, config, out, every=1):
        self.config, self.out, self.every = config, out, every

    def before_fit(self):
        import wandb
        self.wandb = wandb
        wandb.init(project="papers-sequence_models", config=self.config, dir=self.out)

    def after_batch(self):
        L = self.learner
        if L.training and L.step % self.every == 0:
            self.wandb.log({"train/loss": L.loss.item(), "lr": L.opt.param_groups[0]["lr"]}, step=L.step)

    def after_epoch(self):
        self.wandb.log({k: v for k, v in self.learner.metrics.items() if k != "epoch"}, step=self.learner.step)

    def after_fit(self):
        self.wandb.finish()


# ---- the tasks

def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"sequence_models: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("sequence_models: --device mps, but MPS is not available here (try --device cpu)")
    return name


def run_dir(args):
    return Path(args.out_dir) / f"{args.task}-{args.cell}"


def imdb_splits(args, vocab=None):
    """The train / valid / test reviews and the vocabulary of the train text: one construction for
    the classifier and its pretrained language model, so that their word ids agree."""
    reviews = read_imdb(args.data_dir)
    train, valid = split_valid(reviews["train"])
    test = reviews["test"]
    if args.limit:  # --quick: a slice of each split, classes still balanced by the shuffle
        g = torch.Generator().manual_seed(1)
        test = [test[i] for i in torch.randperm(len(test), generator=g)[:args.limit // 2].tolist()]
        train, valid = train[:args.limit], valid[:args.limit // 4]
    vocab = vocab or Vocab.build((tokenize(text) for text, _ in train), args.vocab_size)
    return train, valid, test, vocab


def imdb_data(args, vocab=None):
    """Loaders for train / valid / test and the vocabulary (built on the train reviews)."""
    train, valid, test, vocab = imdb_splits(args, vocab)
    if args.valid_size:
        valid = valid[:args.valid_size]
    if args.labels:  # only N labelled reviews, half of each class; the vocabulary still comes from all the text
        train = ([r for r in train if r[1] == 1][:args.labels // 2]
                 + [r for r in train if r[1] == 0][:args.labels - args.labels // 2])
    enc = lambda reviews: encode_reviews(reviews, vocab, args.max_len)
    data = SimpleNamespace(train=ReviewLoader(enc(train), args.batch_size, shuffle=True, seed=args.seed),
                           valid=ReviewLoader(enc(valid), 2 * args.batch_size),
                           test=ReviewLoader(enc(test), 2 * args.batch_size))
    return data, vocab


def imdb_lm_data(args, vocab=None):
    """IMDb as unlabelled text, for pretraining the classifier's encoder: the train split's reviews
    as one token stream (labels unused), the validation reviews' text to validate. The vocabulary
    is the classifier's; the head predicts only the --lm-vocab most frequent words."""
    train, valid, _, vocab = imdb_splits(args, vocab)
    stream = lambda reviews: [i for text, _ in reviews for i in vocab.encode(tokenize(text))]
    return SimpleNamespace(train=StreamLoader(stream(train), args.batch_size, args.bptt, args.lm_vocab),
                           valid=StreamLoader(stream(valid), args.batch_size, args.bptt, args.lm_vocab)), vocab


def load_pretrained(path):
    """The --task imdb-lm checkpoint at path, read once: its vocabulary and then its encoder are used."""
    ckpt = load_checkpoint(Path(path))
    if ckpt["task"] != "imdb-lm":
        raise SystemExit(f"sequence_models: --pretrained {path} is a {ckpt['task']} model; pretrain with --task imdb-lm")
    return ckpt


def load_encoder(model, ckpt, vocab, path):
    """Copy a pretrained language model's embedding and recurrent layers (ckpt, from path) into the
    classifier: the transfer of ULMFiT (Howard & Ruder 2018); --freeze-epochs and --lr-decay add its
    gradual unfreezing and discriminative rates."""
    if ckpt["vocab"] != vocab.itos:
        raise SystemExit(f"sequence_models: --pretrained {path} has another vocabulary; use its --vocab-size and data")
    encoder = {k: v for k, v in ckpt["model"].items() if k.startswith(("embedding.", "rnn."))}
    try:
        model.load_state_dict(encoder, strict=False)
    except RuntimeError:
        c = ckpt["config"]
        raise SystemExit(f"sequence_models: --pretrained {path} is a {c['cell']} with embedding {c['emb_size']}, hidden "
                         f"{c['hidden_size']}, {c['num_layers']} layer(s); give the classifier the same")
    log.info(f"encoder ({', '.join(sorted({k.split('.')[0] for k in encoder}))}) loaded from {path}")


def numbers_data(args, vocab=None):
    train, valid = human_numbers()
    vocab = vocab or Vocab([w for w in dict.fromkeys(["<pad>", "<unk>"] + train + valid)])
    return SimpleNamespace(train=StreamLoader(vocab.encode(train), args.batch_size, args.bptt),
                           valid=StreamLoader(vocab.encode(valid), args.batch_size, args.bptt)), vocab


def names_data(args, vocab=None):
    """makemore's names: the MLP sees (context, next character) examples, a recurrent LM whole names."""
    train, valid, test = split_names(read_names(args.data_dir))
    vocab = vocab or char_vocab("".join(train))
    if args.cell == "mlp":
        loader = lambda names, shuffle: TensorLoader(*name_contexts(names, vocab, args.context), args.batch_size,
                                                     shuffle, args.seed)
    else:
        loader = lambda names, shuffle: NameLoader(names, vocab, args.batch_size, shuffle, args.seed)
    return SimpleNamespace(train=loader(train, True), valid=loader(valid, False), test=loader(test, False)), vocab


def text_data(args, vocab=None):
    """Any text file, character level: its first 90% trains, the rest validates."""
    path = Path(args.text)
    if not path.is_file():
        raise SystemExit(f"sequence_models: --text {path}: no such file")
    text = read_utf8(path, "--text takes a UTF-8 text file")
    cut = int(0.9 * len(text))
    if cut < 2 * max(args.context, args.bptt) + 2:
        raise SystemExit(f"sequence_models: --text {path} is too short ({len(text)} characters) to train on")
    vocab = vocab or char_vocab(text[:cut])
    train, valid = vocab.encode(list(text[:cut])), vocab.encode(list(text[cut:]))
    if args.cell == "mlp":
        return SimpleNamespace(train=TensorLoader(*stream_contexts(train, args.context), args.batch_size, True, args.seed),
                               valid=TensorLoader(*stream_contexts(valid, args.context), args.batch_size)), vocab
    return SimpleNamespace(train=StreamLoader(train, args.batch_size, args.bptt),
                           valid=StreamLoader(valid, args.batch_size, args.bptt)), vocab


DATA = {"imdb": imdb_data, "imdb-lm": imdb_lm_data, "numbers": numbers_data, "names": names_data,
        "text": text_data}


def model_config(args, vocab_size):
    if args.task == "imdb":
        return dict(vocab_size=vocab_size, cell=args.cell, emb_size=args.emb_size, hidden_size=args.hidden_size,
                    num_layers=args.layers, dropout=args.dropout)
    if args.cell == "mlp":
        return dict(vocab_size=vocab_size, cell="mlp", context=args.context, emb_size=args.emb_size,
                    hidden_size=args.hidden_size, direct=args.direct)
    return dict(vocab_size=vocab_size, cell=args.cell, emb_size=args.emb_size, hidden_size=args.hidden_size,
                num_layers=args.layers, dropout=args.dropout, stateful=args.task != "names",
                out_size=min(args.lm_vocab, vocab_size) if args.task == "imdb-lm" else None)


def build_model(task, config):
    if task == "imdb":
        return SentimentClassifier(**config)
    if config["cell"] == "mlp":
        return MLPLanguageModel(**{k: v for k, v in config.items() if k != "cell"})
    return LanguageModel(**config)


GATES = {"rnn": 1, "lstm": 4, "gru": 3}
# The vocabulary before any data is read: IMDb's is at most --vocab-size; characters are guessed
# (makemore's names have 27, a novel about 100); the numbers have 31 words.
VOCAB_GUESS = {"numbers": 32, "names": 30, "text": 100}


def n_parameters(task, config):
    """What build_model(task, config) will hold, counted from the config alone."""
    V, E, H = config["vocab_size"], config["emb_size"], config["hidden_size"]
    if config["cell"] == "mlp":  # C, H and d, U and b, W
        nm = config["context"] * E
        return V * E + nm * H + H + H * V + V + (nm * V if config["direct"] else 0)
    G = GATES[config["cell"]]  # per layer: W_ih, W_hh, b_ih, b_hh
    rnn = sum(G * H * ((E if k == 0 else H) + H + 2) for k in range(config["num_layers"]))
    if task == "imdb":
        return V * E + rnn + 2 * H * 2 + 2
    out = config["out_size"] or V
    tied = E == H and out == V
    return V * E + rnn + out + (0 if tied else H * out)


def check_memory(args, device):
    """Refuse, before any data is read or anything allocated, a model whose training step cannot fit:
    16 bytes per parameter (float32 weights, gradients and AdamW's two moments) plus, roughly, the
    float32 activations autograd keeps for one batch."""
    V = args.vocab_size if args.task in ("imdb", "imdb-lm") else VOCAB_GUESS[args.task]
    config = model_config(args, V)
    E, H = args.emb_size, args.hidden_size
    if args.cell == "mlp":
        tokens, per_token = args.batch_size, args.context * E + 2 * H + 3 * V
    else:  # per step and layer: the gates, c_t, tanh(c_t), h_t and the input projection; the logits x 3
        steps = args.max_len if args.task == "imdb" else 16 if args.task == "names" else args.bptt
        out = 0 if args.task == "imdb" else config["out_size"] or V
        tokens, per_token = args.batch_size * steps, E + args.layers * (2 * GATES[args.cell] + 3) * H + 3 * out
    need = 16 * n_parameters(args.task, config) + 4 * tokens * per_token
    have = (torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda")
            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > have:
        size = (f"--context {args.context} --emb-size {E} --hidden-size {H}" if args.cell == "mlp"
                else f"--emb-size {E} --hidden-size {H} --layers {args.layers}")
        raise SystemExit(f"sequence_models: --model {args.cell} with {size} needs about {need / 2 ** 30:,.1f} GiB "
                         f"of memory for weights, optimiser state and activations ({device} has "
                         f"{have / 2 ** 30:,.1f} GiB); choose a smaller model")


def depth(name):
    """How far below the output a classifier's parameter sits: 0 the head, 1 the recurrent layers,
    2 the embedding."""
    return 0 if name.startswith("head.") else 1 if name.startswith("rnn.") else 2


def encoder_params(model):
    return [p for name, p in model.named_parameters() if depth(name) > 0]


def param_groups(model, args):
    """ULMFiT's discriminative fine-tuning: the classifier's head at lr, its recurrent layers at
    lr / decay, the embedding at lr / decay^2 (decay 1: one rate for all)."""
    if args.task != "imdb" or args.lr_decay == 1:
        return [{"params": list(model.parameters()), "lr": args.lr}]
    groups = [[p for name, p in model.named_parameters() if depth(name) == d] for d in range(3)]
    return [{"params": g, "lr": args.lr / args.lr_decay ** d} for d, g in enumerate(groups)]  # lr / D^depth


@contextlib.contextmanager
def log_file(path):
    """Copy this folder's log lines into path (appending) while the block runs."""
    handler = logging.FileHandler(path)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def step_callbacks(args, model):
    """What every training step runs: the metrics, schedule, guards and penalties (also --benchmark's)."""
    callbacks = [Metrics(), OneCycle(), StopOnNonFinite(args.log_interval)]
    if args.grad_clip:
        callbacks.append(GradientClipping(args.grad_clip))
    if args.freeze_epochs and args.task == "imdb":
        callbacks.append(GradualUnfreezing(encoder_params(model), args.freeze_epochs))
    if isinstance(model, LanguageModel):
        callbacks.append(ARTAR(args.ar, args.tar))
        if model.stateful:
            callbacks.append(ResetState())
    return callbacks


def callbacks_for(args, model, out, meta, ckpt):
    """step_callbacks, and what a run adds: progress, checkpoints, logs, early stopping."""
    monitor = MONITOR[args.task]
    callbacks = step_callbacks(args, model) + [Progress(args.log_interval), Checkpoint(out, meta, monitor, ckpt),
                                                CSVLog(out / "log.csv")]
    if args.patience:
        callbacks.append(EarlyStopping(args.patience, monitor))
    if args.tensorboard:
        callbacks.append(TensorBoard(str(out / "tensorboard"), args.log_interval))
    if args.wandb:
        callbacks.append(Wandb(vars(args), str(out), args.log_interval))
    return callbacks


def cuda_default(flag, device):
    """--compile, --bf16: as given, else on for CUDA (where launches and bandwidth cost) only."""
    return device.startswith("cuda") if flag is None else flag


def model_and_optimiser(args, config, device, pretrained=None, vocab=None):
    """The model of config on device (its encoder from a pretrained LM if given; with --compile its
    time step, or the whole MLP, compiled) and its AdamW, fused: one kernel for the whole update."""
    model = build_model(args.task, config)
    if pretrained:
        load_encoder(model, pretrained, vocab, args.pretrained)
    model = model.to(device)
    if cuda_default(args.compile, device):
        torch.compiler.reset()  # sweeps and transfer train several models in one process: a cache for each
        if isinstance(model, MLPLanguageModel):
            model.compile()
        else:  # three variants: the first step (no gradient into h_0), the later ones, validation
            model.rnn.compile_step(dynamic=True)  # dynamic: the last, smaller batch reuses the kernels
    return model, torch.optim.AdamW(param_groups(model, args), weight_decay=args.weight_decay, fused=True)


def on_device(data, device):
    """Every loader's tensors moved to the training device, once: its batches are index gathers there."""
    for loader in vars(data).values():
        loader.to(device)
    return data


def train(args):
    device = resolve_device(args.device)
    out = run_dir(args)
    ckpt_path = out / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path) if args.resume else None
    if ckpt and args.epochs != ckpt["args"]["epochs"]:
        raise SystemExit(f"sequence_models: {ckpt_path} was planned for {ckpt['args']['epochs']} epochs (its one-cycle "
                         f"schedule too); resume without --epochs, or start a new run in another --out-dir")
    if ckpt is None and ckpt_path.exists() and not args.quick:
        raise SystemExit(f"sequence_models: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    check_memory(args, device)

    torch.manual_seed(args.seed)
    pretrained = load_pretrained(args.pretrained) if args.task == "imdb" and args.pretrained and not ckpt else None
    vocab = Vocab(ckpt["vocab"]) if ckpt else Vocab(pretrained["vocab"]) if pretrained else None
    data, vocab = DATA[args.task](args, vocab)
    config = ckpt["config"] if ckpt else model_config(args, len(vocab))
    model, opt = model_and_optimiser(args, config, device, pretrained, vocab)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    meta = {"folder": FOLDER, "task": args.task, "config": config, "vocab": vocab.itos, "args": vars(args)}
    learner = Learner(model, on_device(data, device), cross_entropy, opt, callbacks_for(args, model, out, meta, ckpt),
                      device, cuda_default(args.bf16, device))
    with log_file(out / "train.log"):
        log.info(f"{args.task} with a from-scratch {args.cell.upper()}: "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(vocab):,}, "
                 f"{len(data.train)} batches per epoch, {device}")
        try:
            learner.fit(args.epochs)
        except KeyboardInterrupt:
            done = f"after epoch {learner.history[-1]['epoch']}" if learner.history else "before the first epoch"
            raise SystemExit(f"\ninterrupted; last checkpoint {done} in {ckpt_path}"
                             + (": continue with --resume" if learner.history else ""))
        except Diverged as e:
            last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.is_file() else "no checkpoint was saved"
            raise SystemExit(f"sequence_models: {e}; {last}; try a lower --lr")
        return evaluate(args, learner, sum(h["seconds"] for h in learner.history))


def evaluate(args, learner, seconds):
    """The best-validation weights on validation (and, for IMDb, the test reviews) -> results.json."""
    out = run_dir(args)
    best = load_checkpoint(out / "best.pt", learner.device)
    learner.model.load_state_dict(best["model"])
    learner.callbacks = [cb for cb in learner.callbacks if isinstance(cb, (Metrics, Progress, ResetState))]
    results = {"task": args.task, "cell": args.cell, "best_epoch": best["epoch"],
               "epochs_run": len(learner.history), "train_seconds": round(seconds, 1),
               "params": sum(p.numel() for p in learner.model.parameters()),
               "history": [{k: h[k] for k in ("epoch", "train_loss", "valid_loss", "valid_accuracy")}
                           for h in learner.history]}
    m = learner.validate()
    results.update(valid_loss=m["valid_loss"], valid_accuracy=m["valid_accuracy"])
    if hasattr(learner.data, "test"):
        m = learner.validate(learner.data.test)
        results.update(test_loss=m["valid_loss"], test_accuracy=m["valid_accuracy"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    scores = ", ".join(f"{k} {v:.2%}" if "accuracy" in k else f"{k} {v:.4f}"
                       for k, v in results.items() if k.endswith(("_loss", "_accuracy")))
    log.info(f"best epoch {best['epoch']}: {scores} ({seconds / 60:.1f} min training)")
    return results
