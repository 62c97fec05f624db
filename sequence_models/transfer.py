"""Transfer learning when labels are scarce: the IMDb classifier trained on N labelled reviews,
from scratch and from an encoder pretrained as a language model on the train split's text
(--task imdb-lm), for several N and --seeds seeds each (other labelled reviews, other initial
weights); a table (mean ± standard deviation over the seeds) and a plot of test accuracy against N.
Each (kind, N, seed) run has its folder OUT_DIR/transfer/<kind>-<N>-seed<S>/: finished runs are
skipped and an interrupted one resumed, so the command can be stopped, started again, or split
over processes with --kinds; the table covers every finished run in OUT_DIR/transfer."""
import copy
import json
import logging
import re
import statistics
from pathlib import Path

import matplotlib.pyplot as plt

from callbacks import FOLDER
from train import run_dir, train

log = logging.getLogger(FOLDER)
# About 100-300 optimiser steps for the small sets; all labels: --epochs. No early stopping: every run
# keeps its epoch of best accuracy on 500 held-out reviews, and is tested on all 25,000 test reviews.
EPOCHS = {100: 40, 500: 15, 2500: 6}
# How each kind of run starts and fine-tunes: from scratch; the pretrained encoder with every layer at
# one rate; ULMFiT's recipe (Howard & Ruder 2018, §3.2-3.3): the head alone for the first quarter of
# the epochs, then the LSTM at lr / 2.6 and the embedding at lr / 2.6^2, slanted triangular rates
# and concat pooling [h_T; max; mean]. The other kinds take --schedule and --pooling (default:
# one-cycle, [mean; max]).
KINDS = {"scratch": dict(pretrained=False, freeze=0, lr_decay=1.0),
         "pretrained": dict(pretrained=True, freeze=0, lr_decay=1.0),
         "ulmfit": dict(pretrained=True, freeze=0.25, lr_decay=2.6, pooling="concat", schedule="stlr")}
CELL = re.compile(r"([a-z]+)-(\d+)-seed(\d+)")  # a run's folder: <kind>-<N>-seed<S>


def transfer(args):
    encoder = Path(args.encoder or Path(args.out_dir) / "imdb-lm-lstm" / "best.pt")
    if any(KINDS[k]["pretrained"] for k in args.kinds) and not encoder.is_file():
        raise SystemExit(f"sequence_models: no pretrained encoder at {encoder}; pretrain first: python "
                         f"sequence_models/main.py --task imdb-lm --data-dir {args.data_dir}")
    out = Path(args.out_dir) / "transfer"
    for n in args.label_counts:
        for kind in args.kinds:
            for seed in range(args.seed, args.seed + args.seeds):
                run_cell(cell_args(args, encoder, out, kind, n, seed), kind)
    rows = summarise(out)
    (out / "transfer.json").write_text(json.dumps(rows, indent=2))
    for n in sorted({n for r in rows.values() for n in r}):
        log.info(f"{n:>6} labels: " + ", ".join(f"{kind} {r[n]['mean']:.2%} ± {100 * r[n]['std']:.2f} "
                                                f"({len(r[n]['seeds'])} seeds)" for kind, r in rows.items() if n in r))
    plot(rows, Path(args.figures_dir) / "sequence_models_transfer.png")
    return rows


def cell_args(args, encoder, out, kind, n, seed):
    """The flags of one run: the IMDb LSTM on n labelled reviews (the seed-th block), kind's recipe."""
    run, recipe = copy.copy(args), KINDS[kind]
    vars(run).update(task="imdb", model="lstm", labels=n, seed=seed, out_dir=str(out / f"{kind}-{n}-seed{seed}"),
                     encoder=str(encoder) if recipe["pretrained"] else None, epochs=EPOCHS.get(n, args.epochs),
                     valid_size=500, patience=0, tensorboard=False, pooling=recipe.get("pooling", args.pooling),
                     schedule=recipe.get("schedule", args.schedule))
    vars(run).update(freeze_epochs=round(recipe["freeze"] * run.epochs), lr_decay=recipe["lr_decay"])
    return run


def run_cell(run, kind):
    """Train one run unless its results.json exists; a ckpt.pt without it was interrupted: resumed."""
    folder = run_dir(run)
    if (folder / "results.json").is_file():
        return
    run.resume = (folder / "ckpt.pt").is_file()
    log.info(f"transfer: {kind}, {run.labels} labels, seed {run.seed}, {run.epochs} epochs"
             + (", resumed" if run.resume else ""))
    train(run)


def summarise(out):
    """{kind: {N: {'seeds': {seed: results}, 'mean': ..., 'std': ...}}} of the test accuracy, over every
    finished run in out; std is the sample standard deviation over the seeds (0 for one seed)."""
    rows = {}
    for path in sorted(out.glob("*/imdb-lstm/results.json")):
        if not (m := CELL.fullmatch(path.parts[-3])):
            continue
        r = json.loads(path.read_text())
        cell = rows.setdefault(m[1], {}).setdefault(int(m[2]), {"seeds": {}})
        cell["seeds"][int(m[3])] = {k: r[k] for k in ("test_accuracy", "best_epoch", "epochs_run", "train_seconds")}
    for cells in rows.values():
        for cell in cells.values():
            cell.update(mean_sd([s["test_accuracy"] for s in cell["seeds"].values()]))
    return rows


def mean_sd(values):
    """{'mean', 'std'}: the mean and the sample standard deviation (n - 1; 0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


LABELS = {"scratch": "from scratch", "pretrained": "pretrained, plain fine-tuning",
          "ulmfit": "pretrained, ULMFiT fine-tuning"}


def plot(rows, path):
    """Test accuracy against N per kind: the mean over the seeds, ± one standard deviation as bars."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for kind, r in sorted(rows.items()):
        ns = sorted(r)
        ax.errorbar(ns, [100 * r[n]["mean"] for n in ns], yerr=[100 * r[n]["std"] for n in ns], marker="o",
                    capsize=3, label=LABELS[kind])
    seeds = sorted({len(c["seeds"]) for r in rows.values() for c in r.values()})
    ax.set_xscale("log")
    ax.set(xlabel="labelled training reviews", ylabel="IMDb test accuracy (%)",
           title="LSTM classifier: pretrained vs from scratch"
                 + (f"\nmean ± sd over {'-'.join(map(str, seeds))} seeds" if seeds != [1] else ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info(f"transfer figure: {path}")
