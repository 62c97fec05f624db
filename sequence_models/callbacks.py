"""The callbacks the Learner runs (see learner.py for the events): the metric, progress, Smith's
one-cycle schedule, ULMFiT's slanted triangular rates and gradual unfreezing, gradient clipping,
the non-finite guard, Merity's AR and TAR, the language model's state reset, checkpoints (and
load_checkpoint, which reads them), early stopping, log.csv, TensorBoard and Weights & Biases."""
import csv
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE
from learner import Callback, CancelBatch, CancelFit

FOLDER = "sequence_models"  # stamped into checkpoints, so that another folder's checkpoint is refused
log = logging.getLogger(FOLDER)


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
    """Mean loss and accuracy, weighted by targets, into metrics['<split>_loss', '<split>_accuracy']
    for the split the learner measured (train, valid, or test in the final evaluation); at the end of
    every epoch the row goes into history. Each batch's (loss, accuracy, targets) stays on the device
    until its split ends, then all are read at once and summed in float64: a read per batch would
    make the host wait for the device every step."""
    order = -10

    def before_fit(self):
        self.rows = {}

    def before_epoch(self):
        self.rows, self.t0 = {}, time.perf_counter()

    def before_validate(self):
        self.rows[self.learner.split] = []

    def after_loss(self):
        L = self.learner
        n = (L.yb != IGNORE).sum()
        row = torch.stack([L.loss.detach(), accuracy(L.pred, L.yb), n.float()])
        self.rows.setdefault(L.split, []).append(row)

    def means(self, split):
        if not self.rows.get(split):
            return {}
        loss, acc, n = torch.stack(self.rows[split]).cpu().double().unbind(1)  # one read for the whole split
        mean = lambda v: ((v * n).sum() / n.sum()).item()
        return {f"{split}_loss": mean(loss), f"{split}_accuracy": mean(acc)}

    def after_validate(self):
        self.learner.metrics.update(self.means(self.learner.split))

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

    def after_cancel_batch(self):  # a batch skipped (a resumed epoch's first ones) still moves the bar
        self.pbar.update()

    def before_validate(self):
        if hasattr(self, "pbar"):
            self.pbar.close()  # the epoch's training bar
        self.bar("validate" if self.learner.split == "valid" else self.learner.split)

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


class SlantedTriangular(Callback):
    """ULMFiT's slanted triangular learning rates (Howard & Ruder 2018, §3.2, eq. 3) over the whole
    fit, stepped every batch; each parameter group peaks at the lr it was created with (η_max):
        cut = ⌊T · cut_frac⌋,   p_t = t / cut if t < cut, else 1 − (t − cut) / (T − cut),
        η_t = η_max · (1 + p_t (ratio − 1)) / ratio                     (cut_frac 0.1, ratio 32)
    (T − cut is the paper's cut · (1/cut_frac − 1) when T · cut_frac is whole, and keeps p_t >= 0
    for t <= T when it is not)."""

    def __init__(self, cut_frac=0.1, ratio=32):
        self.cut_frac, self.ratio = cut_frac, ratio

    def before_fit(self):
        L = self.learner
        T = L.epochs * len(L.data.train)
        cut = max(1, math.floor(T * self.cut_frac))

        def eta(t):  # η_t / η_max
            p = t / cut if t < cut else 1 - (t - cut) / max(T - cut, 1)
            return (1 + p * (self.ratio - 1)) / self.ratio

        L.scheduler = torch.optim.lr_scheduler.LambdaLR(L.opt, eta)

    def after_step(self):
        self.learner.scheduler.step()


SCHEDULES = {"onecycle": OneCycle, "stlr": SlantedTriangular}


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
    on the undropped h_t keeps them from jumping between time steps. h_t and dropout(h_t) are what
    the language model returns next to its logits. The means run over every step of the batch (for
    names, the padded steps after a name's end too)."""

    def __init__(self, alpha, beta):
        self.alpha, self.beta = alpha, beta

    def after_loss(self):
        L = self.learner
        if L.training:
            _, h, dropped = L.out                                                # h, dropped (N, L, H)
            L.loss = (L.loss + self.alpha * dropped.pow(2).mean()                # AR
                      + self.beta * (h[:, 1:] - h[:, :-1]).pow(2).mean())        # TAR


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
    """Atomically: ckpt.pt (everything --resume needs) at the end of every epoch and, with every > 0,
    every `every` optimiser steps within an epoch too, so that a kill loses at most that many steps;
    best.pt (the weights that get evaluated and served) at the best monitored metric of an epoch.
    On resume, before_fit restores the model, optimiser, schedule, history and random state; a
    mid-epoch checkpoint also its place in the epoch: the batches already trained are skipped, and
    the language model's carried state and the epoch's metric rows come back, so the run goes on
    exactly as an uninterrupted one."""
    order = 100

    def __init__(self, out, meta, monitor, resume=None, every=0):
        self.out, self.meta, self.monitor, self.resume, self.every = Path(out), meta, monitor, resume, every
        self.skip, self.carry, self.saved = 0, None, None  # saved: where the last ckpt.pt stands, in words

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
        self.skip = ckpt.get("batch", 0)  # checkpoints before --checkpoint-every: end of epoch only
        self.carry = ckpt if self.skip else None
        self.saved = self.where(ckpt)
        log.info(f"resumed {self.out / 'ckpt.pt'} {self.saved}")

    @staticmethod
    def where(ckpt):
        if ckpt.get("batch"):
            return f"at step {ckpt['step']} (epoch {ckpt['epoch'] + 1}, batch {ckpt['batch']})"
        return f"after epoch {ckpt['epoch']} (step {ckpt['step']})"

    def metrics(self):  # the run's Metrics callback: the epoch's rows a mid-epoch checkpoint carries
        return next(cb for cb in self.learner.callbacks if isinstance(cb, Metrics))

    def before_epoch(self):  # after ResetState and Metrics (lower order) have cleared what a resume restores
        self.batch, L, carry = 0, self.learner, self.carry
        if carry:
            state = carry["lm_state"]  # h (layers, N, H), or the LSTM's (h, c)
            if state is not None:
                L.model.state = tuple(h.to(L.device) for h in state) if isinstance(state, tuple) else state.to(L.device)
            metrics = self.metrics()
            metrics.rows["train"] = list(carry["rows"].to(L.device).unbind(0))
            metrics.t0 -= carry.get("seconds", 0.0)  # the epoch's time counts what the killed run had done
            self.carry = None

    def before_batch(self):
        if self.learner.training:
            self.batch += 1                   # training batches of this epoch so far
            if self.batch <= self.skip:       # trained before the resumed checkpoint was written
                raise CancelBatch

    def after_step(self):
        L = self.learner
        if self.every and L.step % self.every == 0 and self.batch < len(L.loader):  # the last: after_epoch's
            metrics = self.metrics()
            rows = metrics.rows.get("train")
            self.save(self.state({"epoch": L.epoch, "batch": self.batch, "lm_state": getattr(L.model, "state", None),
                                  "rows": torch.stack(rows).cpu() if rows else torch.zeros(0, 3),
                                  "seconds": time.perf_counter() - metrics.t0}))

    def after_epoch(self):
        L = self.learner
        self.skip = 0
        if not math.isfinite(L.metrics["valid_loss"]):
            raise Diverged(f"the model became non-finite (validation loss {L.metrics['valid_loss']}) in epoch "
                           f"{L.epoch + 1}; not saved")
        state = self.state({"epoch": L.epoch + 1, "batch": 0})
        if best_epoch(L.history, self.monitor) == len(L.history) - 1:
            save_atomic({k: v for k, v in state.items() if k not in RESUME_ONLY}, self.out / "best.pt")
        self.save(state)

    def state(self, place):
        """The meta, weights, history and `place` (epoch, batch within it), with what --resume needs;
        refused, as Diverged, if anything in it is non-finite (StopOnNonFinite's flag read first)."""
        L = self.learner
        for guard in (cb for cb in L.callbacks if isinstance(cb, StopOnNonFinite) and cb.deferred):
            guard.check()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        state = {**self.meta, "model": L.model.state_dict(), "step": L.step, "history": L.history,
                 "metrics": L.metrics, **place, "optimizer": L.opt.state_dict(), "rng": torch.get_rng_state(),
                 "cuda_rng": cuda_rng, "scheduler": L.scheduler.state_dict() if hasattr(L, "scheduler") else None}
        if not all_finite(state):
            raise Diverged(f"the model became non-finite in epoch {L.epoch + 1}; not saved")
        return state

    def save(self, state):
        save_atomic(state, self.out / "ckpt.pt")
        self.saved = self.where(state)


RESUME_ONLY = ("batch", "lm_state", "rows", "seconds", "optimizer", "rng", "cuda_rng", "scheduler")


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
        rows, tmp = self.learner.history, self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:                  # then renamed over the log: never half-written
            writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)


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
