"""The Learner: a training loop opened up through callbacks (fast.ai's design).

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
CancelBatch (skip the rest of this batch: after_cancel_batch runs instead of its after_batch, unlike
fast.ai's), CancelEpoch (go on with the next epoch) or CancelFit (finish now; after_fit still runs).
"""
import torch


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
    split ('train', 'valid' or 'test': what the current batches measure), batch, xb (inputs), yb
    (targets), out (what the model returned), pred (its logits), loss, metrics (this epoch's),
    history (one row per epoch), and epochs (the target of this fit). A model returns its logits,
    or a tuple whose first item is the logits and whose other items are for the callbacks (the
    language model's hidden states, for AR and TAR). bf16: the forward and the loss under bfloat16
    autocast (the recurrence itself stays float32, see model.Recurrent.forward).
    """

    def __init__(self, model, data, loss_fn, opt, callbacks=(), device="cpu", bf16=False):
        self.model, self.data, self.loss_fn, self.opt, self.device = model, data, loss_fn, opt, device
        self.bf16 = bf16
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)
        for cb in self.callbacks:
            cb.learner = self
        self.epoch, self.step, self.history, self.metrics, self.training = 0, 0, [], {}, False
        self.split = "train"

    def callback(self, event):
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is not None:
                method()

    def one_batch(self):
        *self.xb, self.yb = [t.to(self.device) for t in self.batch]  # already there when the loader is
        self.callback("before_batch")
        with torch.autocast(torch.device(self.device).type, torch.bfloat16, enabled=self.bf16):
            self.out = self.model(*self.xb)
            self.pred = self.out[0] if isinstance(self.out, tuple) else self.out
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
                self.callback("after_cancel_batch")

    def validate(self, loader=None, split="valid"):
        """One pass without gradients over `loader` (default data.valid); returns self.metrics, where
        this pass's scores are `<split>_loss` and `<split>_accuracy`."""
        self.training, self.split = False, split
        self.loader = self.data.valid if loader is None else loader
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
                    self.training, self.split, self.loader = True, "train", self.data.train
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
