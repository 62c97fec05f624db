"""The shipped model in pretrained/gpt/: each file checked against pretrained/SHA256SUMS before it is
read, the weights read through safetensors (no pickle), the card (JSON: config, vocabulary, command,
metric, a fixed-input check) beside them."""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from data import CharTokenizer

FOLDER = "gpt"
NAME = "1984"  # pretrained/gpt/1984.{safetensors,json,log.csv}
ROOT = Path(__file__).resolve().parent.parent / "pretrained"


def verified(path):
    """path, once its sha256 is the one pretrained/SHA256SUMS lists for it; otherwise one line saying what to do."""
    name = path.relative_to(ROOT).as_posix()
    if not path.is_file():
        raise SystemExit(f"{FOLDER}: pretrained/{name} is missing; restore it with git checkout, "
                         f"or train without --pretrained")
    sums = ROOT / "SHA256SUMS"
    listed = dict(line.split("  ", 1)[::-1] for line in sums.read_text().splitlines()) if sums.is_file() else {}
    if listed.get(name) != hashlib.sha256(path.read_bytes()).hexdigest():
        raise SystemExit(f"{FOLDER}: pretrained/{name} does not match pretrained/SHA256SUMS; "
                         f"restore it with git checkout")
    return path


def pretrained_card():
    return json.loads(verified(ROOT / FOLDER / f"{NAME}.json").read_text())


def pretrained_weights():
    """The shipped model's vocabulary, weights (float32 state dict) and card."""
    card = pretrained_card()
    weights = {k: v.float() for k, v in load_file(verified(ROOT / FOLDER / f"{NAME}.safetensors")).items()}
    weights["lm_head.weight"] = weights["wte.weight"]  # tied: stored once
    return CharTokenizer(card["vocab"]), weights, card


def load_weights(model, weights):
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise SystemExit(f"{FOLDER}: pretrained/{FOLDER}/{NAME}.safetensors does not fit this model; leave out "
                         f"the model flags (--n-layer, --n-embd, ...) with --pretrained, or re-export it")


def log_path():
    """The shipped run's log.csv (for the loss curve), checked like the weights; None if none shipped."""
    path = ROOT / FOLDER / f"{NAME}.log.csv"
    return verified(path) if path.exists() else None


@torch.no_grad()
def check_output(model):
    """The card's fixed-input check: 2 x block_size characters drawn with torch.Generator().manual_seed(0)
    (no text needed), predicting themselves shifted by one: logits and loss."""
    cfg = model.eval().cfg  # no dropout
    x = torch.randint(cfg.vocab_size, (2, cfg.block_size + 1), generator=torch.Generator().manual_seed(0))
    logits, loss = model(x[:, :-1], x[:, 1:])
    return {"seed": 0, "shape": [2, cfg.block_size], "logits_sum": logits.sum().item(),
            "logits_abs_sum": logits.abs().sum().item(), "loss": loss.item(),
            "argmax_last": logits[:, -1].argmax(-1).tolist()}


def refresh_sums(paths):
    """Write the sha256 lines of paths into pretrained/SHA256SUMS, keeping the other folders' lines."""
    sums = ROOT / "SHA256SUMS"
    lines = dict(line.split("  ", 1)[::-1] for line in sums.read_text().splitlines()) if sums.is_file() else {}
    for p in paths:
        lines[p.relative_to(ROOT).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    tmp = sums.with_name(sums.name + ".tmp")  # every folder's lines: replaced in one rename, never half-written
    tmp.write_text("".join(f"{h}  {f}\n" for f, h in sorted(lines.items()) if (ROOT / f).exists()))
    os.replace(tmp, sums)
