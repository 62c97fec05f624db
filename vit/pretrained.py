"""The shipped weights, pretrained/vit/<dataset>.{safetensors,json,log.csv}: read them (safetensors, no
pickle, after their sha256 matched pretrained/SHA256SUMS) and write them from a finished run
(--export-pretrained RUN_DIR). The JSON holds the model's config, the command that trained it, its
measured test accuracy, a check (logits of fixed random images, so that a change to the model that
forgets to re-export fails a test) and a few test images, so that the attention maps can be drawn
without the dataset."""
import base64
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data import normalize
from model import ViT, ViTConfig

ROOT = Path(__file__).resolve().parent.parent / "pretrained"  # the repository's pretrained/
DTYPE = torch.float16  # the weights are small numbers: fp16 keeps 11 significant bits where bf16 keeps 8
CHECK = {"seed": 0, "shape": [8, 1, 28, 28]}  # standard-normal images from torch.Generator().manual_seed(0)


def paths(name):
    folder = ROOT / "vit"
    return folder / f"{name}.safetensors", folder / f"{name}.json", folder / f"{name}.log.csv"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(path):
    """`path`, once its sha256 matches its line in pretrained/SHA256SUMS; otherwise one line naming it."""
    rel = path.relative_to(ROOT).as_posix()
    if not path.is_file():
        raise SystemExit(f"vit: pretrained/{rel} is missing; restore it with git checkout, or train without --pretrained")
    sums = ROOT / "SHA256SUMS"
    lines = sums.read_text().splitlines() if sums.is_file() else []
    expected = {f: h for h, _, f in (line.partition("  ") for line in lines)}
    if expected.get(rel) != sha256(path):
        raise SystemExit(f"vit: pretrained/{rel} does not match pretrained/SHA256SUMS; restore it with git checkout")
    return path


def read_meta(name):
    return json.loads(verified(paths(name)[1]).read_text())


def pretrained_config(name):
    """The shipped model's config (the model flags: patch_size, dim, depth, heads, mlp_dim, dropout,
    stem_channels), each field the JSON predates at its default."""
    return asdict(ViTConfig(**read_meta(name)["config"]))


def load_pretrained(name, cfg=None):
    """The shipped state dict, in float32; with `cfg`, refused unless it is the shipped model's config."""
    meta = read_meta(name)
    if cfg is not None and cfg != ViTConfig(**meta["config"]):   # a JSON from before a config field: its default
        raise SystemExit(f"vit: pretrained/vit/{name} is another model ({meta['config']}); leave out the model flags")
    return {k: v.float() for k, v in load_file(verified(paths(name)[0])).items()}


def load_model(name, device):
    """-> (ViT in eval mode with the shipped weights, the JSON)."""
    meta = read_meta(name)
    model = ViT(ViTConfig(**meta["config"]))
    model.load_state_dict(load_pretrained(name))
    return model.to(device).eval(), meta


@torch.no_grad()
def check_of(model):
    """Logits of the fixed check images on the CPU in float32: their sum, absolute sum and argmax."""
    x = torch.randn(*CHECK["shape"], generator=torch.Generator().manual_seed(CHECK["seed"]))
    logits = model.cpu().eval()(x)
    return {**CHECK, "logits_sum": logits.sum().item(), "logits_abs_sum": logits.abs().sum().item(),
            "argmax": logits.argmax(-1).tolist()}


def encode_examples(images, labels, idx):
    """Test images (uint8) as base64 in the JSON: a few KB, enough to draw the attention maps offline."""
    picked = images[idx].cpu().contiguous()
    return {"test_index": idx.tolist(), "shape": list(picked.shape), "labels": labels[idx].tolist(),
            "images_uint8_base64": base64.b64encode(picked.numpy().tobytes()).decode()}


def decode_examples(meta):
    """-> (images (n, H, W) uint8, labels (n,)) shipped in the JSON."""
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
    """This machine, in words (training records it in the checkpoint, and the export writes those)."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "") if Path("/proc/cpuinfo").is_file() else ""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{os.cpu_count()}-core CPU{f' ({cpu})' if cpu else ''}{gpu}, OMP_NUM_THREADS="
            f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}")


def export(ckpt, weights_of_run, run_dir, command, test):
    """pretrained/vit/<dataset>.* from a finished run's checkpoint: weights_of_run (its state dict, or its
    EMA) in fp16, the run's log, and the JSON, whose test accuracy and check are measured with the fp16
    weights loaded back in float32. test: (images, labels) of the test split."""
    name = ckpt["args"]["dataset"]
    weights, meta_path, log_path = paths(name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(DTYPE).contiguous() for k, v in weights_of_run.items()}, weights)
    model = ViT(ViTConfig(**ckpt["config"]))
    model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
    model.eval()
    images, labels = test
    with torch.no_grad():
        preds = torch.cat([model(normalize(images[i:i + 1000], name)).argmax(-1) for i in range(0, len(images), 1000)])
    wrong = (preds != labels).nonzero()[:, 0]
    n = 16  # the README's attention grid: the first 12 test images, then the first 4 the model gets wrong
    meta = {"folder": "vit", "name": name, "config": ckpt["config"], "command": command,
            "hardware": "; then ".join(ckpt.get("hardware") or [f"exported on {hardware()}"]),
            "wall_time_s": round(ckpt["train_time"], 1), "wall_time_note": "the training loop's time, as logged",
            "epochs": ckpt["epoch"], "dtype": str(DTYPE).removeprefix("torch."),
            "metric": {"name": "test_acc", "value": (preds == labels).float().mean().item(),
                       "split": f"test ({len(labels):,} images), with the shipped fp16 weights"},
            "val_acc": ckpt["val_acc"], "check": check_of(model),
            "size_note": f"the README's {sum(v.numel() for v in weights_of_run.values()):,}-parameter ViT in fp16: "
                         f"{weights.stat().st_size / 2 ** 20:.2f} MiB, well within the 4 MiB per file",
            "examples": encode_examples(images, labels, torch.cat([torch.arange(n - n // 4), wrong[:n // 4]]))}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copyfile(Path(run_dir) / "log.csv", log_path)
    refresh_sums([weights, meta_path, log_path])
    print(f"wrote {weights}, {meta_path} and {log_path}: test accuracy {meta['metric']['value']:.2%} with the "
          f"fp16 weights; pretrained/SHA256SUMS refreshed")
    return meta
