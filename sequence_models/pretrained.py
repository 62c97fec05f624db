"""The shipped weights, pretrained/sequence_models/<task>-<model>.*: the weights (.safetensors), a
JSON (model config, vocabulary, the flags that shape the model and its data, the command that
trained it, its hardware, wall time and metric, and a check), and the run's log.csv. Every file is
checked against pretrained/SHA256SUMS before it is read; safetensors holds no pickle.

    python sequence_models/main.py interact --pretrained --task imdb --review "A dull, lifeless mess."
    python sequence_models/main.py --export-pretrained runs/sequence_models/imdb-lstm   # refresh them
"""
import hashlib
import json
import logging
import os
import platform
import shutil
from pathlib import Path

import safetensors.torch
import torch

from callbacks import FOLDER, load_checkpoint
from model import build_model

log = logging.getLogger(FOLDER)
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained" / FOLDER
# The flags that shape the model and its data: a run from the shipped weights (interact, evaluation,
# fine-tuning) takes them, as --resume takes a checkpoint's.
FLAGS = ("model", "emb_size", "hidden_size", "layers", "dropout", "vocab_size", "max_len", "lm_vocab", "bptt",
         "context", "direct")
MAX_FP32_BYTES = 3 * 2 ** 20  # larger models ship in bfloat16, so that a file stays under 4 MiB
CHECK_SHAPE = {"imdb": (8, 64), "numbers": (4, 16)}  # token ids of the check


def verified(path):
    """The bytes of a file under pretrained/, once its sha256 matches its line in pretrained/SHA256SUMS."""
    shown = f"pretrained/{FOLDER}/{path.name}"
    if not path.is_file():
        raise SystemExit(f"sequence_models: {shown} is missing; restore it with git checkout")
    sums = PRETRAINED.parent / "SHA256SUMS"
    lines = sums.read_text().splitlines() if sums.is_file() else []
    expected = {name: digest for digest, _, name in (line.partition("  ") for line in lines)}
    data = path.read_bytes()
    if expected.get(f"{FOLDER}/{path.name}") != hashlib.sha256(data).hexdigest():
        raise SystemExit(f"sequence_models: {shown} does not match pretrained/SHA256SUMS; restore it with git checkout")
    return data


def meta(task, model):
    """The JSON of the shipped weights for --task and --model, verified."""
    path = PRETRAINED / f"{task}-{model}.json"
    if not path.is_file():
        have = ", ".join(f"--task {p.stem.replace('-', ' --model ')}" for p in sorted(PRETRAINED.glob("*.json")))
        raise SystemExit(f"sequence_models: no shipped weights for --task {task} --model {model}; shipped: "
                         f"{have or 'none'}")
    return json.loads(verified(path))


def shipped_flags(task, model):
    return meta(task, model)["flags"]


def load_shipped(task, model):
    """The shipped weights as a checkpoint (the keys of best.pt that evaluation and serving read),
    in float32."""
    m = meta(task, model)
    state = safetensors.torch.load(verified(PRETRAINED / f"{task}-{model}.safetensors"))
    return {"folder": FOLDER, "task": task, "config": m["config"], "vocab": m["vocab"], "args": m["flags"],
            "model": {k: v.float() for k, v in state.items()}}


@torch.no_grad()
def check(task, model):
    """The model's answer to fixed token ids (seeded, no data files): sums and argmax of its logits."""
    shape = CHECK_SHAPE[task]
    V = model.embedding.num_embeddings
    x = torch.randint(2, V, shape, generator=torch.Generator().manual_seed(0))
    model.eval()
    logits = model(x, x != 0) if task == "imdb" else model(x, None).logits
    return {"seed": 0, "shape": list(shape), "logits_sum": logits.double().sum().item(),
            "logits_abs_sum": logits.double().abs().sum().item(), "argmax": logits.argmax(-1).flatten().tolist()}


def command(task, flags):
    """The folder's own command that trains this model (every flag that shaped it written out)."""
    keys = ("model", "emb_size", "hidden_size", "layers", "dropout", "vocab_size", "max_len", "epochs",
            "batch_size", "lr", "weight_decay", "seed")
    if task != "imdb":
        keys = tuple(k for k in keys if k not in ("vocab_size", "max_len")) + ("bptt", "ar", "tar")
    data = " --data-dir /path/to/datasets" if task == "imdb" else ""
    return (f"python sequence_models/main.py --task {task} " + " ".join(f"--{k.replace('_', '-')} {flags[k]}"
                                                                        for k in keys) + data)


def hardware(device):
    """The run's device, as this machine names it (the run's own wall time was measured there)."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines() if l.startswith("model name")] \
        if cpuinfo.is_file() else []
    return f"{os.cpu_count()}-core CPU ({names[0] if names else platform.processor()})"


def export(run):
    """--export-pretrained RUN_DIR: the finished run's best.pt, results.json and log.csv ->
    pretrained/sequence_models/<task>-<model>.{safetensors,json,log.csv}, and their SHA256SUMS lines."""
    run = Path(run)
    best, results = load_checkpoint(run / "best.pt"), json.loads((run / "results.json").read_text())
    flags = {{"cell": "model"}.get(k, k): v for k, v in best["args"].items()}
    task, name = best["task"], f"{best['task']}-{flags['model']}"
    if task not in CHECK_SHAPE:
        raise SystemExit(f"sequence_models: --export-pretrained ships imdb and numbers models; {run} is {task}")
    fp32_bytes = 4 * sum(v.numel() for v in best["model"].values())
    dtype = torch.bfloat16 if fp32_bytes > MAX_FP32_BYTES else torch.float32
    PRETRAINED.mkdir(parents=True, exist_ok=True)
    weights = PRETRAINED / f"{name}.safetensors"
    safetensors.torch.save_file({k: v.to(dtype).contiguous().clone() for k, v in best["model"].items()}, weights)
    model = build_model(task, best["config"])  # the check, from the rounded weights in float32
    model.load_state_dict({k: v.float() for k, v in safetensors.torch.load_file(weights).items()})
    split = "test" if task == "imdb" else "valid"
    info = {"folder": FOLDER, "name": name, "config": best["config"], "flags": {k: flags[k] for k in FLAGS},
            "command": command(task, flags), "hardware": hardware(best["args"]["device"]),
            "wall_time_s": results["train_seconds"],
            "wall_time_note": "the training and validation epochs, summed from log.csv (reading the data and the "
                              "final test are not counted)",
            "metric": {"name": f"{split}_accuracy", "value": results[f"{split}_accuracy"], "split": split,
                       "loss": results[f"{split}_loss"], "best_epoch": results["best_epoch"]},
            "dtype": str(dtype).removeprefix("torch."), "params": results["params"], "check": check(task, model),
            "size_note": f"{results['params']:,} parameters in {str(dtype).removeprefix('torch.')}: "
                         f"{weights.stat().st_size / 2 ** 20:.2f} MiB, under the 4 MiB a file may take",
            "vocab": best["vocab"]}
    (PRETRAINED / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.copyfile(run / "log.csv", PRETRAINED / f"{name}.log.csv")
    refresh_sums()
    log.info(f"exported {run} to {PRETRAINED}/{name}.*: {info['metric']['name']} {info['metric']['value']:.4f}")
    return info


def refresh_sums():
    """This folder's lines of pretrained/SHA256SUMS rewritten from its files; other folders' kept."""
    sums = PRETRAINED.parent / "SHA256SUMS"
    lines = {}
    for line in sums.read_text().splitlines() if sums.is_file() else []:
        digest, _, name = line.partition("  ")
        if not name.startswith(f"{FOLDER}/"):
            lines[name] = digest
    for f in sorted(PRETRAINED.iterdir()):
        if f.is_file():
            lines[f"{FOLDER}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
    tmp = sums.with_name(sums.name + ".tmp")  # every folder's lines: replaced in one rename, never half-written
    tmp.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(lines.items())))
    os.replace(tmp, sums)
