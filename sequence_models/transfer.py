"""Transfer learning when labels are scarce: the IMDb classifier trained on N labelled reviews,
from scratch and from an encoder pretrained as a language model on the unlabelled text
(--task imdb-lm), for several N; a table and a plot of test accuracy against N. Finished runs are
reused, so the command can be stopped, started again, or split over processes with --kinds."""
import copy
import json
import logging
from pathlib import Path

import matplotlib.pyplot as plt

from callbacks import FOLDER
from train import train

log = logging.getLogger(FOLDER)
# About 100-300 optimiser steps for the small sets; all labels: --epochs. No early stopping: every run
# keeps its epoch of best accuracy on 500 held-out reviews, and is tested on all 25,000 test reviews.
EPOCHS = {100: 40, 500: 15, 2500: 6}
# How each kind of run starts and fine-tunes: from scratch; the pretrained encoder with every layer at
# one rate; ULMFiT's recipe, the head alone for the first quarter of the epochs, then the LSTM at
# lr / 2.6 and the embedding at lr / 2.6^2.
KINDS = {"scratch": dict(pretrained=False, freeze=0, lr_decay=1.0),
         "pretrained": dict(pretrained=True, freeze=0, lr_decay=1.0),
         "ulmfit": dict(pretrained=True, freeze=0.25, lr_decay=2.6)}


def transfer(args):
    encoder = Path(args.encoder or Path(args.out_dir) / "imdb-lm-lstm" / "best.pt")
    if any(KINDS[k]["pretrained"] for k in args.kinds) and not encoder.is_file():
        raise SystemExit(f"sequence_models: no pretrained encoder at {encoder}; pretrain first: python "
                         f"sequence_models/main.py --task imdb-lm --data-dir {args.data_dir}")
    out = Path(args.out_dir) / "transfer"
    for n in args.label_counts:
        for kind in args.kinds:
            run, recipe = copy.copy(args), KINDS[kind]
            vars(run).update(task="imdb", model="lstm", labels=n, out_dir=str(out / f"{kind}-{n}"), resume=False,
                             encoder=str(encoder) if recipe["pretrained"] else None,
                             epochs=EPOCHS.get(n, args.epochs), valid_size=500, patience=0, tensorboard=False)
            vars(run).update(freeze_epochs=round(recipe["freeze"] * run.epochs), lr_decay=recipe["lr_decay"])
            if not (Path(run.out_dir) / "imdb-lstm" / "results.json").is_file():
                log.info(f"transfer: {kind}, {n} labels, {run.epochs} epochs")
                train(run)
    rows = {}
    for path in sorted(out.glob("*/imdb-lstm/results.json")):
        kind, n = path.parts[-3].split("-")
        rows.setdefault(kind, {})[int(n)] = json.loads(path.read_text())["test_accuracy"]
    (out / "transfer.json").write_text(json.dumps(rows, indent=2))
    for n in sorted({n for r in rows.values() for n in r}):
        log.info(f"{n:>6} labels: " + ", ".join(f"{kind} {r[n]:.2%}" for kind, r in rows.items() if n in r))
    plot(rows, Path(args.figures_dir) / "sequence_models_transfer.png")
    return rows


LABELS = {"scratch": "from scratch", "pretrained": "pretrained, plain fine-tuning",
          "ulmfit": "pretrained, ULMFiT fine-tuning"}


def plot(rows, path):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for kind, r in sorted(rows.items()):
        ns = sorted(r)
        ax.plot(ns, [100 * r[n] for n in ns], marker="o", label=LABELS[kind])
    ax.set_xscale("log")
    ax.set(xlabel="labelled training reviews", ylabel="IMDb test accuracy (%)",
           title="LSTM classifier: pretrained vs from scratch")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info(f"transfer figure: {path}")
