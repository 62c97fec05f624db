"""The byte model's files: the checkpoint `train` writes (torch, read with weights_only=True) and the
shipped weights in pretrained/lm_compression/ (safetensors, checked against pretrained/SHA256SUMS
before they are read; `--export-pretrained RUN_DIR` writes them from a finished run).
"""
import hashlib
import json
import os
import platform
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model import ByteConfig, ByteTransformer

FOLDER = "lm_compression"  # stamped into checkpoints, so that another folder's is refused
ROOT = Path(__file__).resolve().parent.parent / "pretrained"
HERE, SUMS = ROOT / FOLDER, ROOT / "SHA256SUMS"
NAME = "byte_model"                        # pretrained/lm_compression/byte_model.{safetensors,json}
PRETRAINED = f"pretrained:{NAME}"          # the model's name in a container coded with --pretrained
CHECK_TEXT = (b"It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his "
              b"chin nuzzled into his breast in an effort to escape the vile wind, slipped quickly through the "
              b"glass doors of Victory Mansions, though not quickly enough to prevent a swirl of gritty dust "
              b"from entering along with him.")                  # the novel's first two sentences, the check's input


def save_byte_model(cfg, state, path, **extra):
    """Atomic: a temp file next to `path`, then a rename. `state`: the weights `load_byte_model` gives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"folder": FOLDER, "kind": "byte-model", "config": asdict(cfg), "model": state, **extra}, tmp)
    tmp.replace(path)


def load_byte_model(path):
    """(ByteTransformer, checkpoint) from a file `save_byte_model` wrote, or None for any other file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not (isinstance(ckpt, dict) and ckpt.get("folder") == FOLDER and ckpt.get("kind") == "byte-model"):
        return None
    net = ByteTransformer(ByteConfig(**ckpt["config"]))
    net.load_state_dict(ckpt["model"])
    return net, ckpt


def read_sums():
    return {f: h for h, f in (line.split("  ", 1) for line in SUMS.read_text().splitlines() if "  " in line)} \
        if SUMS.is_file() else {}


def verified(path):
    """`path`, once its sha256 matches its line in pretrained/SHA256SUMS; otherwise one line naming it."""
    name = path.relative_to(ROOT).as_posix()
    if not path.is_file():
        raise SystemExit(f"lm_compression: pretrained/{name} is missing; restore it with git checkout")
    if read_sums().get(name) != hashlib.sha256(path.read_bytes()).hexdigest():
        raise SystemExit(f"lm_compression: pretrained/{name} does not match pretrained/SHA256SUMS; restore it "
                         f"with git checkout")
    return path


def load_pretrained():
    """(ByteTransformer in float32, its JSON) from the shipped files, each checked against SHA256SUMS."""
    meta = json.loads(verified(HERE / f"{NAME}.json").read_text())
    net = ByteTransformer(ByteConfig(**meta["config"]))
    net.load_state_dict({k: v.float() for k, v in load_file(verified(HERE / f"{NAME}.safetensors")).items()})
    return net.eval(), meta


def fixed_input_check(net):
    """What the test reproduces from the shipped files, on CHECK_TEXT (no data files): the integer path's
    container (exact: its length and sha256) and the float model's bits/byte (to a tolerance)."""
    from codec import compress                                  # codec and predictors import this module
    from predictors import IntByteLM
    from train import bits_per_byte
    blob = compress(CHECK_TEXT, IntByteLM(net, PRETRAINED), progress=False)
    data = torch.frombuffer(bytearray(CHECK_TEXT), dtype=torch.uint8).long()
    return {"input": "weights.CHECK_TEXT", "bytes": len(CHECK_TEXT), "compressed_bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(), "float_bits_per_byte": bits_per_byte(net, data, "cpu")}


def command(saved, defaults):
    """The run's training command: every training flag that differs from its default."""
    flags = [f"--{k.replace('_', '-')} {saved[k]}" for k in defaults if saved.get(k, defaults[k]) != defaults[k]]
    return " ".join(["python lm_compression/main.py train --data-dir /path/to/datasets", *flags, "--device cpu"])


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
    SUMS.write_text("".join(f"{h}  {f}\n" for f, h in sorted(lines.items())))


def export_pretrained(run_dir, defaults):
    """RUN_DIR/byte_model.pt (what `train` keeps: the best held-out weights) -> pretrained/lm_compression/
    byte_model.{safetensors,json} in float16, SHA256SUMS refreshed. The metric is measured with the float16
    weights, on RUN_DIR/byte_model.heldout.txt when it is there."""
    from train import bits_per_byte
    path = Path(run_dir) / "byte_model.pt" if Path(run_dir).is_dir() else Path(run_dir)
    loaded = load_byte_model(path) if path.is_file() else None
    if loaded is None:
        raise SystemExit(f"lm_compression: --export-pretrained: no byte-model checkpoint at {path}")
    net, ckpt = loaded
    half = {k: v.half().contiguous() for k, v in net.state_dict().items()}
    net.load_state_dict({k: v.float() for k, v in half.items()})     # what loading the shipped file gives
    held_out = path.with_suffix(".heldout.txt")
    n = net.num_params()
    metric = ({"name": "held-out bits/byte, float16 weights in float32 code", "split": f"{held_out.name} "
               f"(the last {ckpt['args']['val_fraction']:.0%} of the training text), chunks of {net.cfg.context} "
               f"from BOS", "value": bits_per_byte(net, torch.frombuffer(bytearray(held_out.read_bytes()),
                                                                        dtype=torch.uint8).long(), "cpu")}
              if held_out.is_file() else {"name": "held-out bits/byte (float32, at training)", "split":
                                         "the end of the training text", "value": ckpt["val_bits_per_byte"]})
    meta = {"folder": FOLDER, "name": NAME, "config": asdict(net.cfg), "step": ckpt.get("step"),
            "command": command(ckpt["args"], defaults), "hardware": hardware(), "wall_time_s": ckpt.get("wall_time_s"),
            "metric": metric, "trained_val_bits_per_byte": ckpt["val_bits_per_byte"],
            "check": fixed_input_check(net.eval()),
            "size_note": f"{n:,} parameters in float16: {2 * n / 2 ** 20:.2f} MiB, within the 4 MiB a file may "
                         f"take; the integer path quantises them to int16 per channel when loaded"}
    HERE.mkdir(parents=True, exist_ok=True)
    save_file(half, HERE / f"{NAME}.safetensors")
    (HERE / f"{NAME}.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_sums()
    print(f"wrote pretrained/{FOLDER}/{NAME}.safetensors, pretrained/{FOLDER}/{NAME}.json and their lines of "
          f"pretrained/SHA256SUMS")
