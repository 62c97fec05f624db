"""From a checkpoint to what a person looks at: test bits/dim (metrics.json), samples ranked by
their log-probability (the seed's figure), the same latents at several temperatures, latent
interpolations between test digits, and the bits/dim curve of the run."""
import csv
import json
import math
import os
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from einops import rearrange

from data import DATASETS, load_images
from model import FlowConfig, RealNVP
from pretrained import load_pretrained, read_meta
from train import evaluate, load_checkpoint, resolve_device

REFERENCES = {"Real NVP": 1.06, "Glow": 1.05, "FFJORD": 0.99}  # MNIST test bits/dim, as reported (FFJORD, Table 2)


def write_json(obj, path):
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def grid(x, rows):
    """Images (N, C, H, W) on [0, 1] -> one (rows H, cols W) array, C = 1 shown in grey."""
    return rearrange(x.clamp(0, 1)[:, 0].cpu(), "(r c) h w -> (r h) (c w)", r=rows).numpy()


@torch.no_grad()
def ranked_samples(model, n, temperature, dataset, path):
    """n samples at `temperature`, sorted from the most to the least likely under the model;
    each labelled with its bits/dim (the seed's figure). Returns them and their bits/dim, in that order."""
    x, log_prob = model.sample(n, temperature, return_log_prob=True)
    bpd = model.bits(log_prob)
    order = bpd.argsort()
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols, 1.25 * rows + 0.4), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(x[order[k], 0].clamp(0, 1).cpu(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{bpd[order[k]]:.2f}", fontsize=7, pad=2)
    fig.suptitle(f"Real NVP samples ({dataset}), T = {temperature},\nranked by log p(x), most likely first "
                 f"(bits/dim above each)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return x[order], bpd[order]


@torch.no_grad()
def temperatures(model, temps, n, path):
    """The same latents z scaled by each temperature T: x = f^-1(T z), one row per T. Returns z and the rows."""
    cfg = model.cfg
    z = torch.randn(n, cfg.channels, cfg.side, cfg.side, device=next(model.parameters()).device)
    rows = [model.inverse(t * z) for t in temps]
    fig, ax = plt.subplots(figsize=(0.8 * n, 0.8 * len(temps) + 0.4))
    ax.imshow(grid(torch.cat(rows), len(temps)), cmap="gray", vmin=0, vmax=1)
    ax.set_yticks([(k + 0.5) * cfg.side for k in range(len(temps))], [f"T = {t}" for t in temps])
    ax.set_xticks([])
    ax.set_title("the same z at several temperatures: x = f^-1(T z)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return z, rows


@torch.no_grad()
def interpolate(model, test, pairs, steps, path):
    """Between the latents of two test digits: z(l) = ((1 - l) z_a + l z_b) / sqrt((1 - l)^2 + l^2),
    which keeps a Gaussian z's scale (a plain average of two independent N(0, I) vectors is
    shrunk by up to 1/sqrt 2 and looks like a low-temperature sample). Returns the images (pairs, steps, C, H, W)."""
    device = next(model.parameters()).device
    x = (test[:2 * pairs].float() + 0.5) / 256                  # the pixel centres: no noise
    z, _ = model(x.to(device))
    z_a, z_b = z[0::2], z[1::2]                                 # (pairs, C, H, W) each
    lam = torch.linspace(0, 1, steps, device=device)[:, None, None, None, None]
    z_l = ((1 - lam) * z_a + lam * z_b) / torch.sqrt((1 - lam) ** 2 + lam ** 2)  # (steps, pairs, C, H, W)
    x_l = model.inverse(rearrange(z_l, "s p c h w -> (p s) c h w"))
    fig, ax = plt.subplots(figsize=(0.8 * steps, 0.8 * pairs + 0.4))
    ax.imshow(grid(x_l, pairs), cmap="gray", vmin=0, vmax=1)
    ax.axis("off")
    ax.set_title("latent interpolation between test digits (ends: the digits themselves, f^-1(f(x)))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return rearrange(x_l, "(p s) c h w -> p s c h w", p=pairs)


def plot_curve(log_path, path):
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [float(r["train_bpd"]) for r in rows], "o-", ms=3, label="train (dequantised, during the epoch)")
    ax.plot(epochs, [float(r["test_bpd"]) for r in rows], "s-", ms=3, label="test")
    for k, (name, v) in enumerate(REFERENCES.items()):
        ax.axhline(v, color=f"C{k + 2}", ls=":", lw=1, label=f"{name}: {v} (as reported in FFJORD, Table 2)")
    ax.set(xlabel="epoch", ylabel="bits/dim", title="Real NVP negative log-likelihood")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_flow(args, device):
    """The flow to draw from, and what is known about it: a run's checkpoint, or with --pretrained the
    shipped weights and their JSON (whose test bits/dim was measured at training)."""
    if args.pretrained:
        meta = read_meta(args.dataset)
        ckpt = {"config": meta["config"], "model": load_pretrained(args.dataset), "epoch": meta["epochs"],
                "train_time": meta["wall_time_s"], "test_bpd": meta["metric"]["value"],
                "args": {"dataset": args.dataset, "test_size": meta["test_size"]}}
    else:
        ckpt = load_checkpoint(Path(args.out_dir) / "ckpt.pt", device)
    model = RealNVP(FlowConfig(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def test_images(args, dataset):
    """The test images; with --pretrained, None when --data-dir does not hold them (nothing is downloaded)."""
    if args.pretrained and not any((Path(args.data_dir) / DATASETS[dataset] / "raw" / f"t10k-images-idx3-ubyte{gz}")
                                   .is_file() for gz in ("", ".gz")):
        print(f"no {dataset} test images under {args.data_dir}: the test bits/dim is the shipped one, "
              f"and there is no interpolation figure (it starts from test digits)")
        return None
    return load_images(args.data_dir, dataset, "test")[:args.test_size or None]


def sample(args):
    device = resolve_device(args.device)
    out, fig_dir = Path(args.out_dir), Path(args.figures_dir)
    model, ckpt = load_flow(args, device)
    saved = ckpt["args"]
    test = test_images(args, saved["dataset"])
    # training ended by measuring these same test images with the same fixed noise: not twice
    test_bpd = ckpt["test_bpd"] if test is None or args.test_size == saved["test_size"] else \
        evaluate(model, test, device)
    metrics = {"dataset": saved["dataset"], "test_bpd": test_bpd, "test_images": len(test) if test is not None else
               None, "parameters": model.num_params(), "epochs": ckpt["epoch"], "config": ckpt["config"],
               "train_time_s": round(ckpt["train_time"], 1)}
    if not args.pretrained:
        write_json(metrics, out / "metrics.json")
    on = f"{len(test):,} {saved['dataset']} images" if test is not None else f"the shipped {saved['dataset']} test images"
    print(f"Real NVP test {metrics['test_bpd']:.4f} bits/dim on {on}, {metrics['parameters']:,} parameters, "
          f"{ckpt['epoch']} epochs, {ckpt['train_time']:.0f} s training")

    fig_dir.mkdir(parents=True, exist_ok=True)
    tag = f"nf_{saved['dataset']}"
    torch.manual_seed(args.seed)
    figures = [fig_dir / f"{tag}_{name}.png" for name in ("samples", "temperatures", "interpolation", "curve")]
    ranked_samples(model, args.n_samples, args.temperature, saved["dataset"], figures[0])
    temperatures(model, [0.25, 0.5, 0.75, 1.0], 10, figures[1])
    written = figures[:2]
    if test is not None and len(test) >= 2:
        interpolate(model, test, min(4, len(test) // 2), 10, figures[2])
        written.append(figures[2])
    if (out / "log.csv").is_file() and not args.pretrained:
        plot_curve(out / "log.csv", figures[3])
        written.append(figures[3])
    print("wrote " + ", ".join(str(p) for p in written))
    return metrics
