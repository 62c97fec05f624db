"""--export-pretrained RUN_DIR: a finished run -> pretrained/tiny_stories_lm/<model>.safetensors (the weights
in bfloat16, the Transformer's tied output matrix stored once), <model>.json (the card: config, command,
measured metric, a fixed-input check), <model>.tokenizer.json and <model>.log.csv (for the loss curve)."""
import json
import os
import platform
import shutil
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

from data import load_tokenizer
from model import Config, build_model, num_params
import pretrained
from pretrained import FOLDER, check_output, refresh_sums
from train import bits_per_character, load_checkpoint, prepare_data

DTYPE = torch.bfloat16


def export_pretrained(run_dir, args, command_of):
    """args: this command's flags (--data-dir finds the validation text the exported weights are scored on)."""
    ckpt = load_checkpoint(run_dir / "ckpt.pt")
    cfg, name, dest = Config(**ckpt["config"]), ckpt["config"]["model"], pretrained.ROOT / FOLDER
    dest.mkdir(parents=True, exist_ok=True)
    tied = name == "transformer"
    save_file({k: v.to(DTYPE).contiguous() for k, v in ckpt["model"].items() if not (tied and k == "lm_head.weight")},
              dest / f"{name}.safetensors")
    (dest / f"{name}.tokenizer.json").write_text(json.dumps(ckpt["tokenizer"]))
    # The card's numbers come from the files just written, read back into today's float32 code on the CPU.
    net = build_model(cfg)
    back = {k: v.float() for k, v in load_file(dest / f"{name}.safetensors").items()}
    net.load_state_dict({**back, **({"lm_head.weight": back["wte.weight"]} if tied else {})})
    net.eval()
    run = SimpleNamespace(**{**ckpt["args"], "data_dir": args.data_dir})  # the run's text limits and corpus
    _, _, valid_ids, valid_chars = prepare_data(run, json.loads((dest / f"{name}.tokenizer.json").read_text()))
    results = bits_per_character(net, valid_ids, valid_chars, run, "cpu", nullcontext())
    card = {
        "folder": FOLDER, "name": name, "config": ckpt["config"], "tokenizer": ckpt["args"]["tokenizer"],
        "tokenizer_file": f"{name}.tokenizer.json",
        "command": command_of(ckpt["args"]),
        "hardware": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}",
        "wall_time_s": round(ckpt["train_time"], 1),
        "metric": {"name": "bits per character (the bfloat16 weights in float32)",
                   "value": round(results["bits_per_character"], 4), "nats_per_token": round(results["val_loss"], 4),
                   "split": f"the whole validation text ({valid_chars:,} characters, {results['val_tokens']:,} tokens)"},
        "steps": ckpt["step"],
        "check": check_output(net),
        "size_note": f"{num_params(net):,} parameters in bfloat16 "
                     f"({(dest / f'{name}.safetensors').stat().st_size / 2**20:.2f} MiB) with a "
                     f"{len(load_tokenizer(ckpt['tokenizer'])):,}-token tokenizer: sized to stay under the 4 MiB "
                     f"budget (the README's 2.16M Transformer and 2.69M bag would not)",
    }
    (dest / f"{name}.json").write_text(json.dumps(card, indent=1) + "\n")
    written = [dest / f"{name}.safetensors", dest / f"{name}.json", dest / f"{name}.tokenizer.json"]
    if (run_dir / "log.csv").is_file():
        shutil.copyfile(run_dir / "log.csv", dest / f"{name}.log.csv")
        written.append(dest / f"{name}.log.csv")
    refresh_sums(written)
    print(f"wrote {', '.join(str(p) for p in written)}; validation {results['bits_per_character']:.4f} bits/character; "
          f"refreshed {pretrained.ROOT / 'SHA256SUMS'}")
