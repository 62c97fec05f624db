"""The shipped weights, pretrained/fff/<model>.{safetensors,json,log.csv} for the FFF and both dense
baselines: read them (safetensors, no pickle, after their sha256 matched pretrained/SHA256SUMS) and
write them from a finished run (--export-pretrained RUN_DIR). Each JSON holds the sizes, the command
that trained the run, the measured test accuracy, a check (outputs on fixed random inputs, so that a
change to a model that forgets to re-export fails a test); the FFF's also a few test digits, so that
hard routing can be tried without the dataset."""
import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data import normalize
from model import FFF, build

ROOT = Path(__file__).resolve().parent.parent / "pretrained"  # the repository's pretrained/
MODELS = ("fff", "ff_train", "ff_infer")
CHECK = {"seed": 0, "shape": [8, 784]}  # standard-normal inputs from torch.Generator().manual_seed(0)


def paths(name):
    folder = ROOT / "fff"
    return folder / f"{name}.safetensors", folder / f"{name}.json", folder / f"{name}.log.csv"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(path):
    """`path`, once its sha256 matches its line in pretrained/SHA256SUMS; otherwise one line naming it."""
    rel = path.relative_to(ROOT).as_posix()
    if not path.is_file():
        raise SystemExit(f"fff: pretrained/{rel} is missing; restore it with git checkout, or train without --pretrained")
    sums = ROOT / "SHA256SUMS"
    lines = sums.read_text().splitlines() if sums.is_file() else []
    expected = {f: h for h, _, f in (line.partition("  ") for line in lines)}
    if expected.get(rel) != sha256(path):
        raise SystemExit(f"fff: pretrained/{rel} does not match pretrained/SHA256SUMS; restore it with git checkout")
    return path


def read_meta(name):
    return json.loads(verified(paths(name)[1]).read_text())


def pretrained_sizes():
    """The shipped models' sizes as flags (depth, leaf_width) and their dataset."""
    meta = read_meta("fff")
    cfg = meta["config"]
    return {"depth": cfg["depth"], "leaf_width": cfg["leaf_width"], "dataset": meta["dataset"]}


def load_pretrained(name, cfg=None):
    """The shipped state dict of model `name`; with `cfg`, refused unless it is the shipped sizes."""
    meta = read_meta(name)
    if cfg is not None and cfg != meta["config"]:
        raise SystemExit(f"fff: pretrained/fff/{name} has sizes {meta['config']}, not {cfg}; leave out the size flags")
    return load_file(verified(paths(name)[0]))


def load_model(name, device):
    """-> (model `name` in eval mode with the shipped weights, its JSON)."""
    meta = read_meta(name)
    model = build(name, meta["config"])
    model.load_state_dict(load_pretrained(name))
    return model.to(device).eval(), meta


@torch.no_grad()
def check_of(model):
    """Outputs on the fixed check inputs, on the CPU: soft logits' sum, absolute sum and argmax; for the
    FFF also the leaf that hard routing reaches and the hard logits' sum."""
    x = torch.randn(*CHECK["shape"], generator=torch.Generator().manual_seed(CHECK["seed"]))
    model = model.cpu().eval()
    logits, _ = model(x, mode="soft")
    check = {**CHECK, "logits_sum": logits.sum().item(), "logits_abs_sum": logits.abs().sum().item(),
             "argmax": logits.argmax(-1).tolist()}
    if isinstance(model, FFF):
        check |= {"leaves": model.route(x).tolist(), "hard_logits_sum": model(x, mode="hard")[0].sum().item()}
    return check


def encode_examples(pixels, labels, n):
    """The first n test digits (uint8, flattened) as base64 in the JSON."""
    return {"test_index": list(range(n)), "shape": [n, pixels.shape[1]], "labels": labels[:n].tolist(),
            "images_uint8_base64": base64.b64encode(pixels[:n].contiguous().numpy().tobytes()).decode()}


def decode_examples(meta):
    """-> (pixels (n, 784) uint8, labels (n,)) shipped in the JSON."""
    ex = meta["examples"]
    raw = bytearray(base64.b64decode(ex["images_uint8_base64"]))
    return torch.frombuffer(raw, dtype=torch.uint8).reshape(ex["shape"]), torch.tensor(ex["labels"])


def refresh_sums(files):
    """Rewrite pretrained/SHA256SUMS with fresh lines for `files`, keeping the other folders' lines."""
    sums = ROOT / "SHA256SUMS"
    lines = {f: h for h, _, f in (line.partition("  ") for line in
                                  (sums.read_text().splitlines() if sums.is_file() else []))}
    lines.update({p.relative_to(ROOT).as_posix(): sha256(p) for p in files})
    tmp = sums.with_suffix(".tmp")
    tmp.write_text("".join(f"{h}  {f}\n" for f, h in sorted(lines.items()) if (ROOT / f).is_file()))
    os.replace(tmp, sums)


def hardware():
    """This machine, in words (the run is exported where it trained)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "") if Path("/proc/cpuinfo").is_file() else ""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{os.cpu_count()}-core CPU{f' ({cpu})' if cpu else ''}{gpu}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}")


def export_one(name, ckpt, run_dir, command, pixels, labels):
    """pretrained/fff/<name>.*: the weights in float32 (hard routing decides by the sign of w.x + b, which
    rounding to 16 bits flips for some digits), the run's log and the JSON, measured with the written file."""
    weights, meta_path, log_path = paths(name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in ckpt["model"].items()}, weights)
    model = build(name, ckpt["config"])
    model.load_state_dict(load_file(weights))
    model.eval()
    x = normalize(pixels, ckpt["args"]["dataset"])
    with torch.no_grad():
        soft = model(x, mode="soft")[0].argmax(-1)
        hard = model(x, mode="hard")[0].argmax(-1) if name == "fff" else soft
    n_params = sum(v.numel() for v in ckpt["model"].values())
    meta = {"folder": "fff", "name": name, "dataset": ckpt["args"]["dataset"], "config": ckpt["config"],
            "command": command, "hardware": hardware(), "wall_time_s": round(ckpt["train_time"], 1),
            "wall_time_note": "this model's training loop, as logged (the command trains the three one after the other)",
            "epochs": ckpt["epoch"], "dtype": "float32",
            "metric": {"name": "test_acc_hard" if name == "fff" else "test_acc",
                       "value": (hard == labels).float().mean().item(),
                       "split": f"test ({len(labels):,} digits)" + (", hard routing (FORWARD_I)" if name == "fff" else "")},
            "test_acc_soft": (soft == labels).float().mean().item(), "val_acc": ckpt["val_acc"],
            "check": check_of(model),
            "size_note": f"{n_params:,} parameters in float32: {weights.stat().st_size / 2 ** 20:.2f} MiB, the README's "
                         f"size (depth 3, leaf width 32), well within the 4 MiB per file"}
    if name == "fff":
        meta["examples"] = encode_examples(pixels, labels, 16)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copyfile(Path(run_dir) / f"log_{name}.csv", log_path)
    print(f"wrote {weights}, {meta_path} and {log_path}: {meta['metric']['name']} {meta['metric']['value']:.2%}")
    return [weights, meta_path, log_path]


def export(ckpts, run_dir, command, test):
    """pretrained/fff/* from a finished run's checkpoints {name: checkpoint}; test: (pixels, labels)."""
    files = [f for name, ckpt in ckpts.items() for f in export_one(name, ckpt, run_dir, command, *test)]
    refresh_sums(files)
    print("pretrained/SHA256SUMS refreshed")
