"""The shipped models in pretrained/tiny_stories_lm/ (--model picks transformer or bag): each file checked
against pretrained/SHA256SUMS before it is read, the weights read through safetensors (no pickle), the
card (JSON: config, command, metric, a fixed-input check) and the tokenizer beside them."""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

FOLDER = "tiny_stories_lm"
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


def pretrained_card(model):
    return json.loads(verified(ROOT / FOLDER / f"{model}.json").read_text())


def pretrained_flags(model):
    """The shipped model's config as flag values (so memory checks and messages see its size)."""
    card = pretrained_card(model)
    return {**{k: v for k, v in card["config"].items() if k != "model"}, "tokenizer": card["tokenizer"]}


def pretrained_tokenizer(model):
    """The shipped model's tokenizer, as saved (load it with data.load_tokenizer)."""
    return json.loads(verified(ROOT / FOLDER / f"{model}.tokenizer.json").read_text())


def pretrained_weights(model):
    """The shipped model's saved tokenizer, weights (float32 state dict) and card."""
    card = pretrained_card(model)
    saved_tokenizer = pretrained_tokenizer(model)
    weights = {k: v.float() for k, v in load_file(verified(ROOT / FOLDER / f"{model}.safetensors")).items()}
    if "lm_head.weight" not in weights and "wte.weight" in weights and model == "transformer":
        weights["lm_head.weight"] = weights["wte.weight"]  # tied: stored once
    return saved_tokenizer, weights, card


def load_weights(net, weights, model):
    try:
        net.load_state_dict(weights)
    except RuntimeError:
        raise SystemExit(f"{FOLDER}: pretrained/{FOLDER}/{model}.safetensors does not fit this model; leave out "
                         f"the model flags (--n-layer, --n-embd, ...) with --pretrained, or re-export it")


def log_path(model):
    """The shipped run's log.csv (for the loss curve), checked like the weights; None if none shipped."""
    path = ROOT / FOLDER / f"{model}.log.csv"
    return verified(path) if path.exists() else None


@torch.no_grad()
def check_output(net):
    """The card's fixed-input check: 2 x min(block_size, 64) tokens drawn with torch.Generator().manual_seed(0)
    (no text needed), predicting themselves shifted by one: logits and loss."""
    cfg = net.eval().cfg  # no dropout
    T = min(cfg.block_size, 64)
    x = torch.randint(cfg.vocab_size, (2, T + 1), generator=torch.Generator().manual_seed(0))
    logits, loss = net(x[:, :-1], x[:, 1:])
    return {"seed": 0, "shape": [2, T], "logits_sum": logits.sum().item(), "logits_abs_sum": logits.abs().sum().item(),
            "loss": loss.item(), "argmax_last": logits[:, -1].argmax(-1).tolist()}


def write_atomic(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def refresh_sums(paths):
    """Write the sha256 lines of paths into pretrained/SHA256SUMS, keeping the other folders' lines."""
    sums = ROOT / "SHA256SUMS"
    lines = dict(line.split("  ", 1)[::-1] for line in sums.read_text().splitlines()) if sums.is_file() else {}
    for p in paths:
        lines[p.relative_to(ROOT).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    # every folder's lines, replaced in one rename: never half-written
    write_atomic(sums, "".join(f"{h}  {f}\n" for f, h in sorted(lines.items()) if (ROOT / f).exists()))
