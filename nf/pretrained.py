"""The shipped weights: pretrained/nf/<dataset>.safetensors (the flow, float32: see "size_note") and
<dataset>.json (its flags, the command that trained it, its test bits/dim, a check on a fixed input). Both
are checked against pretrained/SHA256SUMS before they are read; `--export-pretrained RUN_DIR` writes them."""
import hashlib
import json
import os
import platform
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import FlowConfig, RealNVP

ROOT = Path(__file__).resolve().parent.parent / "pretrained"
HERE = ROOT / "nf"
SUMS = ROOT / "SHA256SUMS"
MODEL_FLAGS = ("n_couplings", "scales", "hidden", "blocks", "alpha")
TRAINING_FLAGS = ("dataset", "train_size", "epochs", "batch_size", "lr", "warmup_steps", "weight_decay", "grad_clip",
                  "seed", *MODEL_FLAGS)


def read_sums():
    return {f: h for h, f in (line.split("  ", 1) for line in SUMS.read_text().splitlines() if "  " in line)} \
        if SUMS.is_file() else {}


def verified(path):
    """`path`, once its sha256 matches its line in pretrained/SHA256SUMS; otherwise one line naming it."""
    name = path.relative_to(ROOT).as_posix()
    if not path.is_file():
        raise SystemExit(f"nf: pretrained/{name} is missing; restore it with git checkout")
    if read_sums().get(name) != hashlib.sha256(path.read_bytes()).hexdigest():
        raise SystemExit(f"nf: pretrained/{name} does not match pretrained/SHA256SUMS; restore it with git checkout")
    return path


def read_meta(dataset):
    path = HERE / f"{dataset}.json"
    if not path.is_file() and f"nf/{dataset}.json" not in read_sums():
        shipped = sorted(p.stem for p in HERE.glob("*.json"))
        raise SystemExit(f"nf: no shipped weights for --dataset {dataset} (pretrained/nf/ holds: "
                         f"{', '.join(shipped) or 'nothing'}); train a run, or choose --dataset {' or '.join(shipped)}")
    return json.loads(verified(path).read_text())


def load_pretrained(dataset, cfg=None):
    """The shipped flow's state dict for `dataset`; with `cfg`, refused unless it is the shipped flow."""
    meta = read_meta(dataset)
    if cfg is not None and vars(cfg) != meta["config"]:
        raise SystemExit(f"nf: the shipped {dataset} flow is {meta['config']}; drop the model flags to fine-tune it")
    return load_file(verified(HERE / f"{dataset}.safetensors"))


def fixed_input_check(model):
    """bits/dim of 8 seeded images in [0, 1), built without data: what the test reproduces from the file."""
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bpd = model.eval().bits_per_dim(x)
    return {"seed": 0, "shape": [8, 1, 28, 28], "input": "torch.rand", "bits_per_dim": bpd.tolist()}


def command(saved, defaults):
    """The run's training command: the dataset and every training flag that differs from its default."""
    flags = [f"--{k.replace('_', '-')} {saved[k]}" for k in TRAINING_FLAGS if k == "dataset" or saved[k] != defaults[k]]
    return " ".join(["python nf/main.py", *flags, "--data-dir /path/to/datasets"])


def hardware():
    info = Path("/proc/cpuinfo")
    name = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                 if line.startswith("model name")), "") if info.is_file() else platform.processor()
    return f"{os.cpu_count()}-core CPU ({name}), torch {torch.__version__}"


def write_sums():
    """Refresh this folder's lines of pretrained/SHA256SUMS, keeping every other folder's."""
    lines = {f: h for f, h in read_sums().items() if (ROOT / f).is_file()}
    for path in sorted(HERE.iterdir()):
        lines[path.relative_to(ROOT).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    tmp = SUMS.with_name(SUMS.name + ".tmp")  # every folder's lines: replaced in one rename, never half-written
    tmp.write_text("".join(f"{h}  {f}\n" for f, h in sorted(lines.items())))
    os.replace(tmp, SUMS)


def export_pretrained(run_dir, defaults):
    """RUN_DIR/ckpt.pt (a finished run) -> pretrained/nf/<dataset>.{safetensors,json}, SHA256SUMS refreshed.
    float32: the log-determinants sum thousands of s values (README, Speed), and 4 bytes a parameter fit."""
    from train import load_checkpoint                           # train imports this module
    ckpt = load_checkpoint(Path(run_dir) / "ckpt.pt", "cpu")
    model = RealNVP(FlowConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    saved, n = ckpt["args"], model.num_params()
    dataset = saved["dataset"]
    meta = {"folder": "nf", "name": dataset, "config": ckpt["config"], "flags": {k: saved[k] for k in MODEL_FLAGS},
            "epochs": ckpt["epoch"], "command": command(saved, defaults), "hardware": hardware(),
            "wall_time_s": round(ckpt["train_time"]),
            "metric": {"name": "bits/dim (fixed dequantisation noise)", "value": ckpt["test_bpd"],
                       "split": "test" + (f", the first {saved['test_size']} images" if saved["test_size"] else "")},
            "test_size": saved["test_size"],
            "check": fixed_input_check(model),
            "size_note": f"{n:,} parameters in float32: {4 * n / 2 ** 20:.1f} MiB, within the 4 MiB a file may take"}
    HERE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, HERE / f"{dataset}.safetensors")
    (HERE / f"{dataset}.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_sums()
    print(f"wrote pretrained/nf/{dataset}.safetensors, pretrained/nf/{dataset}.json and their lines of "
          f"pretrained/SHA256SUMS")
