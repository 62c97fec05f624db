"""The shipped weights: pretrained/ddpm/<dataset>.safetensors (the EMA U-Net, float16) and <dataset>.json
(its flags, the command that trained it, its measured test loss, a check on a fixed input). Both are
checked against pretrained/SHA256SUMS before they are read; `--export-pretrained RUN_DIR` writes them."""
import csv
import hashlib
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import UNet, UNetConfig, rename_old_keys

ROOT = Path(__file__).resolve().parent.parent / "pretrained"
HERE = ROOT / "ddpm"
SUMS = ROOT / "SHA256SUMS"
# --pretrained --sample-only: DDIM (50 steps) and 36 samples, so that both GIF panels and the grid take
# seconds on a CPU; flags typed on the command line still win (--sampler ddpm for Algorithm 2).
PRETRAINED_SAMPLING = dict(sampler="ddim", n_samples=36)
MODEL_FLAGS = ("T", "schedule", "base", "mults", "res_blocks", "attn_levels", "dropout")
TRAINING_FLAGS = ("dataset", "train_size", "epochs", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip",
                  "ema_decay", "seed", *MODEL_FLAGS)


def verified(path):
    """`path`, once its sha256 matches its line in pretrained/SHA256SUMS; otherwise one line naming it."""
    name = path.relative_to(ROOT).as_posix()
    if not path.is_file():
        raise SystemExit(f"ddpm: pretrained/{name} is missing; restore it with git checkout")
    sums = {f: h for h, f in (line.split("  ", 1) for line in SUMS.read_text().splitlines() if "  " in line)} \
        if SUMS.is_file() else {}
    if sums.get(name) != hashlib.sha256(path.read_bytes()).hexdigest():
        raise SystemExit(f"ddpm: pretrained/{name} does not match pretrained/SHA256SUMS; restore it with git checkout")
    return path


def read_meta(dataset):
    return json.loads(verified(HERE / f"{dataset}.json").read_text())


def load_pretrained(dataset, cfg=None):
    """The shipped EMA weights for `dataset` as a float32 state dict; with `cfg`, refused unless the U-Net
    of `cfg` is the shipped one (fine-tuning with other model flags)."""
    meta = read_meta(dataset)
    if cfg is not None and {**asdict(cfg), "dropout": 0} != {**shipped_config(meta), "dropout": 0}:
        raise SystemExit(f"ddpm: the shipped {dataset} U-Net is {shipped_config(meta)}; "
                         f"drop the model flags to fine-tune it")
    return {k: v.float() for k, v in load_file(verified(HERE / f"{dataset}.safetensors")).items()}


def shipped_config(meta):
    return asdict(UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}))


def fixed_input_check(model, T):
    """eps_theta on 8 seeded x_t and t, built without data: what the test reproduces from the shipped file."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(8, 1, 28, 28, generator=g)
    t = torch.randint(0, T, (8,), generator=g)
    with torch.no_grad():
        eps = model.eval()(x_t, t)
    return {"seed": 0, "shape": [8, 1, 28, 28], "t": t.tolist(), "eps_sum": eps.sum().item(),
            "eps_abs_sum": eps.abs().sum().item(), "eps_first": eps.flatten()[:8].tolist()}


def command(saved, defaults):
    """The run's training command: the dataset and every training flag that differs from its default."""
    def flag(k, v):
        return f"--{k.replace('_', '-')} " + (" ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
    flags = [flag(k, saved[k]) for k in TRAINING_FLAGS if k == "dataset" or saved[k] != defaults[k]]
    return " ".join(["python ddpm/main.py", *flags, "--data-dir /path/to/datasets"])


def hardware():
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return f"{os.cpu_count()}-core CPU ({name}), torch {torch.__version__}"


def write_sums():
    """Refresh this folder's lines of pretrained/SHA256SUMS, keeping every other folder's."""
    lines = {f: h for h, f in (line.split("  ", 1) for line in SUMS.read_text().splitlines() if "  " in line)} \
        if SUMS.is_file() else {}
    lines = {f: h for f, h in lines.items() if (ROOT / f).is_file()}
    for path in sorted(HERE.iterdir()):
        lines[path.relative_to(ROOT).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    tmp = SUMS.with_name(SUMS.name + ".tmp")  # every folder's lines: replaced in one rename, never half-written
    tmp.write_text("".join(f"{h}  {f}\n" for f, h in sorted(lines.items())))
    os.replace(tmp, SUMS)


def export_pretrained(run_dir, defaults):
    """RUN_DIR/ckpt.pt (a finished run) -> pretrained/ddpm/<dataset>.{safetensors,json}, SHA256SUMS refreshed."""
    from train import load_checkpoint                           # train imports this module
    run = Path(run_dir)
    ckpt = load_checkpoint(run / "ckpt.pt", "cpu")
    if not (run / "log.csv").is_file():
        raise SystemExit(f"ddpm: {run / 'log.csv'} is missing: the exported model's test loss is read from it")
    with open(run / "log.csv") as f:
        last = list(csv.DictReader(f))[-1]
    weights = {k: v.half().contiguous() for k, v in rename_old_keys(ckpt["ema"]).items()}  # 2 bytes a parameter
    model = UNet(UNetConfig(**ckpt["config"]))
    model.load_state_dict({k: v.float() for k, v in weights.items()})  # the check sees the float16-rounded weights
    saved, dataset = ckpt["args"], ckpt["dataset"]
    n = model.num_params()
    meta = {"folder": "ddpm", "name": dataset, "config": ckpt["config"],
            "flags": {k: saved[k] for k in MODEL_FLAGS}, "epochs": ckpt["epoch"],
            "command": command(saved, defaults), "hardware": hardware(), "wall_time_s": round(ckpt["train_time"]),
            "metric": {"name": "L_simple of the EMA weights (float32) on 2,000 test images, fixed t and eps",
                       "value": float(last["test_loss"]), "split": "test"},
            "check": fixed_input_check(model, saved["T"]),
            "size_note": f"{n:,} parameters of the EMA U-Net in float16: {2 * n / 2 ** 20:.1f} MiB "
                         f"(float32 would take {4 * n / 2 ** 20:.1f} MiB; a file may take 4 MiB)"}
    HERE.mkdir(parents=True, exist_ok=True)
    save_file(weights, HERE / f"{dataset}.safetensors")
    (HERE / f"{dataset}.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_sums()
    print(f"wrote pretrained/ddpm/{dataset}.safetensors, pretrained/ddpm/{dataset}.json and their lines of "
          f"pretrained/SHA256SUMS")
