"""Hyperparameter search: every config of a grid (or --trials random picks from it) is one ordinary
training run, recorded in OUT_DIR/sweep/<task>-<model>/records.jsonl, then plotted: the validation
metric against each hyperparameter, and the validation curves of all runs. A sweep that is
interrupted and started again skips the runs that already finished."""
import argparse
import copy
import itertools
import json
import logging
import random
from pathlib import Path

import matplotlib.pyplot as plt

from callbacks import FOLDER, MONITOR
from train import train

log = logging.getLogger(FOLDER)
SWEEPABLE = {"emb_size": int, "hidden_size": int, "context": int, "layers": int, "lr": float, "dropout": float,
             "batch_size": int}


def parse_grid(items):
    """['emb_size=10,24', 'lr=1e-3,3e-3'] -> {'emb_size': [10, 24], 'lr': [0.001, 0.003]}"""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        key = key.replace("-", "_")
        if key not in SWEEPABLE or not values:
            raise argparse.ArgumentTypeError(f"--grid {item!r}: use KEY=V1,V2,... with KEY one of {', '.join(SWEEPABLE)}")
        try:
            grid[key] = [SWEEPABLE[key](v) for v in values.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--grid {item!r}: {key} takes {SWEEPABLE[key].__name__} values")
        if any(v <= 0 for v in grid[key]) and key != "dropout":
            raise argparse.ArgumentTypeError(f"--grid {item!r}: {key} must be positive")
    return grid


def configs(grid, trials, seed):
    """The grid's configs in order, or `trials` of them drawn at random without replacement."""
    every = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return random.Random(seed).sample(every, trials) if 0 < trials < len(every) else every


def sweep(args):
    out = Path(args.out_dir) / "sweep" / f"{args.task}-{args.model}"
    monitor = MONITOR[args.task]
    records = []
    for i, cfg in enumerate(configs(args.grid, args.trials, args.seed)):
        run = copy.copy(args)
        vars(run).update(cfg, out_dir=str(out / f"run{i:03d}"), resume=False, tensorboard=False)
        results_path = Path(run.out_dir) / f"{args.task}-{args.model}" / "results.json"
        log.info(f"sweep run {i}: {cfg}")
        results = json.loads(results_path.read_text()) if results_path.is_file() else train(run)
        records.append({"run": i, **cfg, monitor: results[monitor], "epochs": results["epochs_run"],
                        "seconds": results["train_seconds"], "curve": [h[monitor] for h in results["history"]]})
        (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    best = (min if monitor.endswith("loss") else max)(records, key=lambda r: r[monitor])
    plot(records, list(args.grid), monitor, best, Path(args.figures_dir) / f"sequence_models_sweep_{args.task}_{args.model}.png")
    flags = " ".join(f"--{k.replace('_', '-')} {best[k]}" for k in args.grid)
    log.info(f"best of {len(records)}: run {best['run']}, {monitor} {best[monitor]:.4f}: {flags}")
    return records, best


def plot(records, keys, monitor, best, path):
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(3.6 * (len(keys) + 1), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        ax.scatter([r[key] for r in records], [r[monitor] for r in records], alpha=0.7)
        ax.scatter([best[key]], [best[monitor]], color="red", zorder=3, label="best")
        if key == "lr" and max(r[key] for r in records) / min(r[key] for r in records) > 10:
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=monitor.replace("_", " "))
        ax.grid(alpha=0.3)
    ax = axes[0][-1]
    for r in records:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color="red" if r is best else "gray",
                alpha=1 if r is best else 0.4, lw=2 if r is best else 1)
    ax.set(xlabel="epoch", ylabel=monitor.replace("_", " "), title="all runs (best in red)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info(f"sweep figure: {path}")
