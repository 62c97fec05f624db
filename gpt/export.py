"""--export-pretrained RUN_DIR: a finished run -> pretrained/gpt/1984.safetensors (the weights in bfloat16,
the tied output matrix stored once), 1984.json (the card: config, vocabulary, command, measured metric,
a fixed-input check) and 1984.log.csv (for the loss curve)."""
import hashlib
import json
import os
import platform
import shutil
from contextlib import nullcontext

import torch
from safetensors.torch import load_file, save_file

from data import CharTokenizer, load_text, train_val_split, val_windows
from model import GPT, GPTConfig
import pretrained
from pretrained import FOLDER, NAME, check_output, refresh_sums
from train import evaluate, load_checkpoint

DTYPE = torch.bfloat16


def export_pretrained(run_dir, args, command_of):
    """args: this command's flags (--data / --data-dir find the run's text to measure the exported weights on)."""
    ckpt = load_checkpoint(run_dir / "ckpt.pt", "cpu")
    dest = pretrained.ROOT / FOLDER
    dest.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(DTYPE).contiguous() for k, v in ckpt["model"].items() if k != "lm_head.weight"}
    save_file(weights, dest / f"{NAME}.safetensors")
    # The card's numbers come from the file just written, read back into today's float32 code on the CPU.
    cfg = GPTConfig(**ckpt["config"])
    model = GPT(cfg)
    back = {k: v.float() for k, v in load_file(dest / f"{NAME}.safetensors").items()}
    model.load_state_dict({**back, "lm_head.weight": back["wte.weight"]})
    model.eval()
    text = load_text(args)
    if hashlib.sha256(text.encode()).hexdigest() != ckpt["text_sha256"]:
        raise SystemExit(f"gpt: {run_dir / 'ckpt.pt'} was trained on another text; pass the run's --data or --data-dir")
    _, val = train_val_split(CharTokenizer(ckpt["vocab"]).encode(text), cfg.block_size)
    val_loss = evaluate(model, val_windows(val, cfg.block_size, 64), "cpu", nullcontext())
    card = {
        "folder": FOLDER, "name": NAME, "config": ckpt["config"], "vocab": ckpt["vocab"],
        "command": command_of(ckpt["args"]),
        "hardware": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}",
        "wall_time_s": round(ckpt["train_time"], 1),
        "metric": {"name": "cross-entropy, nats per character (the bfloat16 weights in float32)",
                   "value": round(val_loss, 4), "split": "the whole validation split (last 10% of the text)",
                   "at_training_end_float32": round(ckpt["val_loss"], 4)},
        "steps": ckpt["step"],
        "check": check_output(model),
        "size_note": f"{sum(p.numel() for p in model.parameters()):,} parameters in bfloat16 "
                     f"({(dest / f'{NAME}.safetensors').stat().st_size / 2**20:.2f} MiB): the README's CPU model "
                     f"fits the 4 MiB budget whole",
    }
    (dest / f"{NAME}.json").write_text(json.dumps(card, indent=1) + "\n")
    written = [dest / f"{NAME}.safetensors", dest / f"{NAME}.json"]
    if (run_dir / "log.csv").is_file():
        shutil.copyfile(run_dir / "log.csv", dest / f"{NAME}.log.csv")
        written.append(dest / f"{NAME}.log.csv")
    refresh_sums(written)
    print(f"wrote {', '.join(str(p) for p in written)}; validation {val_loss:.4f} nats/char; "
          f"refreshed {pretrained.ROOT / 'SHA256SUMS'}")
