"""From a checkpoint to what a person looks at: test accuracy (metrics.json), test digits
with the class token's attention rollout over them, a confusion matrix and the training curve."""
import csv
import json
import math
import os
from contextlib import nullcontext
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import matplotlib.ticker
import torch
import torch.nn.functional as F

from data import CLASSES, DATASETS, find, idx_files, load_split, normalize
from model import ViT, ViTConfig, attention_rollout
from pretrained import decode_examples, load_model, paths, read_meta
from train import evaluated_weights, load_checkpoint, predict, resolve_device


def plot_attention(model, images, labels, preds, idx, dataset, path):
    """Each example: the test image, then its attention rollout overlaid; titles red when wrong."""
    x = normalize(images[idx], dataset)
    with torch.no_grad():
        _, attentions = model(x, return_attention=True)
    g = model.cfg.image_size // model.cfg.patch_size
    rollout = attention_rollout(attentions).reshape(-1, 1, g, g)                      # (n, 1, H/P, W/P)
    rollout = F.interpolate(rollout, size=images.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    rollout = rollout / rollout.amax(dim=(1, 2), keepdim=True)
    per_row = 4
    rows = -(-len(idx) // per_row)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=(2 * per_row * 1.3, rows * 1.5), squeeze=False)
    names = CLASSES[dataset]
    for ax in axes.flat:
        ax.axis("off")
    for j, i in enumerate(idx.tolist()):
        a, b = axes[j // per_row, 2 * (j % per_row)], axes[j // per_row, 2 * (j % per_row) + 1]
        img = images[i].cpu().numpy()
        a.imshow(img, cmap="gray")
        b.imshow(img, cmap="gray")
        b.imshow(rollout[j].cpu().numpy(), cmap="inferno", alpha=0.6)
        ok = preds[i] == labels[i]
        a.set_title(f"{names[preds[i]]}" if ok else f"{names[preds[i]]} ({names[labels[i]]})",
                    color="green" if ok else "red", fontsize=8)
        b.set_title("rollout", fontsize=8)
    fig.suptitle(f"ViT on {dataset}: prediction (true label when wrong) and the class token's attention rollout",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(confusion, dataset, path):
    names = CLASSES[dataset]
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.imshow(confusion.log1p().numpy(), cmap="Blues")
    for t in range(len(names)):
        for p in range(len(names)):
            n = confusion[t, p].item()
            if n:
                ax.text(p, t, n, ha="center", va="center", fontsize=7,
                        color="white" if t == p else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    acc = confusion.diag().sum().item() / confusion.sum().item()
    ax.set(xlabel="predicted", ylabel="true", title=f"ViT on {dataset} test set: accuracy {acc:.2%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curve(log_path, dataset, path):
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", ms=3, label="train (label-smoothed)")
    if rows and rows[0]["val_loss"]:
        a.plot(epochs, [float(r["val_loss"]) for r in rows], "o-", ms=3, label="validation")
        b.plot(epochs, [100 * (1 - float(r["val_acc"])) for r in rows], "o-", ms=3, label="validation")
    b.plot(epochs, [100 * (1 - float(r["train_acc"])) for r in rows], "o-", ms=3, label="train (augmented)")
    a.set(xlabel="epoch", ylabel="cross-entropy", title=f"ViT on {dataset}: loss")
    b.set(xlabel="epoch", ylabel="error (%)", yscale="log", title="error rate")
    b.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    b.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_for_sampling(args, device):
    """The model to look at, from --out-dir's checkpoint or (--pretrained) the shipped weights.
    -> (model in eval mode, dataset, facts for metrics.json, the training log or None)"""
    if args.pretrained:
        model, meta = load_model(args.dataset, device)
        facts = {"epochs": meta["epochs"], "val_acc": meta["val_acc"], "train_time_s": meta["wall_time_s"],
                 "weights": f"pretrained/vit/{args.dataset}.safetensors"}
        return model, args.dataset, facts, paths(args.dataset)[2]
    out = Path(args.out_dir)
    ckpt = load_checkpoint(out / "ckpt.pt", device)
    model = ViT(ViTConfig(**ckpt["config"])).to(device)
    model.load_state_dict(evaluated_weights(ckpt))         # with --ema, the weights' average
    facts = {"epochs": ckpt["epoch"], "val_acc": None if math.isnan(ckpt["val_acc"]) else ckpt["val_acc"],
             "train_time_s": round(ckpt["train_time"], 1), "ema": ckpt["args"].get("ema", 0.0)}
    return model.eval(), ckpt["args"]["dataset"], facts, out / "log.csv"


def has_curve(log):
    """Whether the training log holds a curve: two epochs or more (a one-epoch run is a point, not drawn)."""
    if not log.is_file():
        return False
    with open(log) as f:
        epochs = len(list(csv.DictReader(f)))
    if epochs < 2:
        print(f"{log} holds {epochs} epoch: no training curve drawn")
    return epochs >= 2


def has_test_set(data_dir, dataset):
    raw = Path(data_dir) / DATASETS[dataset] / "raw"
    return all(find(raw, n) for n in idx_files("test"))


def write_figures(figures, log, dataset, fig_dir):
    """Draw each figure (plus the training curve when the log has one) as fig_dir/vit_<dataset>_<name>.png."""
    if has_curve(log):
        figures["curve"] = lambda p: plot_curve(log, dataset, p)
    for name, draw in figures.items():
        path = fig_dir / f"vit_{dataset}_{name}.png"
        draw(path)
        print(f"wrote {path}")


def sample_shipped_examples(model, dataset, log, args, device):
    """--pretrained without the test set in --data-dir: the attention maps of the test images shipped in
    the JSON (the same images as the README's figure) and the shipped training curve; no download."""
    images, labels = (t.to(device) for t in decode_examples(read_meta(dataset)))
    preds = predict(model, images, dataset, 1000, nullcontext()).argmax(-1)
    raw = Path(args.data_dir) / DATASETS[dataset] / "raw"
    print(f"vit: no {dataset} test set in {raw}/ (put t10k-{{images-idx3,labels-idx1}}-ubyte[.gz] there for the "
          f"test accuracy and confusion matrix); the {len(labels)} test images shipped in pretrained/vit/"
          f"{dataset}.json: {(preds == labels).sum().item()} of {len(labels)} right")
    fig_dir = Path(args.figures_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {"attention": lambda p: plot_attention(model, images, labels, preds, torch.arange(len(labels)),
                                                     dataset, p)}
    write_figures(figures, log, dataset, fig_dir)


def sample(args):
    device = resolve_device(args.device)
    out, fig_dir = Path(args.out_dir), Path(args.figures_dir)
    model, dataset, facts, log = load_for_sampling(args, device)
    if args.pretrained and not has_test_set(args.data_dir, dataset):
        return sample_shipped_examples(model, dataset, log, args, device)
    images, labels = (t.to(device) for t in load_split(args.data_dir, dataset, "test"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else nullcontext()
    logits = predict(model, images, dataset, 1000, autocast)
    preds = logits.argmax(-1)
    wrong = (preds != labels).nonzero()[:, 0]
    metrics = {"dataset": dataset, "test_acc": (preds == labels).float().mean().item(),
               "test_errors": len(wrong), "test_loss": F.cross_entropy(logits, labels).item(),
               "parameters": model.num_params(), **facts}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "metrics.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out / "metrics.json")
    print(f"test accuracy {metrics['test_acc']:.2%} ({len(wrong)} of {len(labels):,} wrong) on {dataset}, "
          f"{metrics['parameters']:,} parameters, {facts['epochs']} epochs, {facts['train_time_s']:.0f} s training")

    fig_dir.mkdir(parents=True, exist_ok=True)
    n, K = args.num_examples, len(CLASSES[dataset])
    idx = torch.cat([torch.arange(n - n // 4, device=device), wrong[:n // 4]])  # the first test images, then errors
    figures = {"attention": lambda p: plot_attention(model, images, labels, preds, idx, dataset, p),
               "confusion": lambda p: plot_confusion(
                   torch.bincount(labels.cpu() * K + preds.cpu(), minlength=K * K).reshape(K, K), dataset, p)}
    write_figures(figures, log, dataset, fig_dir)
    return metrics
