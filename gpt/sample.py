"""From a checkpoint to what a person reads: samples in generated.txt and the loss curve."""
import csv
import os
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from data import CharTokenizer
from model import GPT, GPTConfig
from pretrained import load_weights, log_path, pretrained_weights
from train import load_checkpoint, resolve_device


def load_model(args, device):
    """The model and vocabulary of --out-dir's checkpoint, or the shipped ones (--pretrained --sample-only)."""
    if args.pretrained and args.sample_only:
        tok, weights, card = pretrained_weights()
        model = GPT(GPTConfig(**card["config"]))
        load_weights(model, weights)
    else:
        ckpt = load_checkpoint(Path(args.out_dir) / "ckpt.pt", device)
        tok, model = CharTokenizer(ckpt["vocab"]), GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tok


def generate_samples(args):
    device = resolve_device(args.device)
    model, tok = load_model(args, device)
    if args.prompt is None:  # a paragraph start, or the first character of a text without newlines
        args.prompt = "\n" if "\n" in tok.chars else tok.chars[0]
    prompt = tok.encode(args.prompt)
    torch.manual_seed(args.seed)
    idx = torch.tensor([prompt] * args.num_samples, device=device)  # (num_samples, T_prompt)
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k)
    return [tok.decode(row.tolist()) for row in out]


def plot_loss(log_path, fig_path):
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label="train (batch)")
    ax.plot([int(r["step"]) for r in val], [float(r["val_loss"]) for r in val], "o-", label="validation (whole split)")
    ax.set(xlabel="step", ylabel="cross-entropy (nats / character)", title="character-level GPT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(fig_path, dpi=120)
    plt.close(fig)


def sample(args):
    out = Path(args.out_dir)
    samples = generate_samples(args)
    out.mkdir(parents=True, exist_ok=True)
    text = "".join(f"#### SAMPLE {i} ####\n{s}\n\n" for i, s in enumerate(samples, 1))
    tmp = out / "generated.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out / "generated.txt")
    print(text, end="")
    print(f"wrote {out / 'generated.txt'}")
    log_csv = log_path() if args.pretrained and args.sample_only else out / "log.csv"
    if log_csv is not None and log_csv.is_file():
        fig_dir = Path(args.figures_dir)
        fig_dir.mkdir(parents=True, exist_ok=True)
        plot_loss(log_csv, fig_dir / "gpt_loss.png")
        print(f"wrote {fig_dir / 'gpt_loss.png'}")
