"""The shipped weights, pretrained/gnns/<model>.{safetensors,json,log.csv} for GCN and GAT: read them
(safetensors, no pickle, after their sha256 matched pretrained/SHA256SUMS) and write them from a
finished run (--export-pretrained RUN_DIR). Each JSON holds the config, the command that trained it,
its measured test accuracy, a check (logits of fixed random pixel graphs, so that a change to the model
that forgets to re-export fails a test) and a few test digits, so that the model can be tried and a
digit drawn as its graph without the dataset."""
import base64
import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data import build_graphs, random_images
from model import GNN, GNNConfig

ROOT = Path(__file__).resolve().parent.parent / "pretrained"  # the repository's pretrained/
CHECK = {"seed": 0, "graphs": 4}  # pixel graphs of data.random_images(4, torch.Generator().manual_seed(0))


def paths(name):
    folder = ROOT / "gnns"
    return folder / f"{name}.safetensors", folder / f"{name}.json", folder / f"{name}.log.csv"


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(path):
    """`path`, once its sha256 matches its line in pretrained/SHA256SUMS; otherwise one line naming it."""
    rel = path.relative_to(ROOT).as_posix()
    if not path.is_file():
        raise SystemExit(f"gnns: pretrained/{rel} is missing; restore it with git checkout, or train without --pretrained")
    sums = ROOT / "SHA256SUMS"
    lines = sums.read_text().splitlines() if sums.is_file() else []
    expected = {f: h for h, _, f in (line.partition("  ") for line in lines)}
    if expected.get(rel) != sha256(path):
        raise SystemExit(f"gnns: pretrained/{rel} does not match pretrained/SHA256SUMS; restore it with git checkout")
    return path


def read_meta(name):
    return json.loads(verified(paths(name)[1]).read_text())


def pretrained_flags(name):
    """The shipped model's flags: its sizes (hidden, layers, heads, dropout) and graphs (dataset, background)."""
    meta = read_meta(name)
    cfg = meta["config"]
    return {"hidden": cfg["hidden"], "layers": cfg["layers"], "heads": cfg["heads"], "dropout": cfg["dropout"],
            "dataset": meta["dataset"], "background": meta["background"]}


def load_pretrained(name, cfg=None):
    """The shipped state dict of `name` (gcn or gat); with `cfg`, refused unless it is the shipped config."""
    meta = read_meta(name)
    if cfg is not None and asdict(cfg) != meta["config"]:
        raise SystemExit(f"gnns: pretrained/gnns/{name} is another model ({meta['config']}); leave out the model flags")
    return load_file(verified(paths(name)[0]))


def load_model(name, device):
    """-> (GNN in eval mode with the shipped weights, its JSON)."""
    meta = read_meta(name)
    model = GNN(GNNConfig(**meta["config"]))
    model.load_state_dict(load_pretrained(name))
    return model.to(device).eval(), meta


@torch.no_grad()
def check_of(model, background):
    """Logits of the fixed check graphs on the CPU in float32: their sum, absolute sum and argmax."""
    images = random_images(CHECK["graphs"], torch.Generator().manual_seed(CHECK["seed"]))
    b = build_graphs(images, torch.zeros(len(images), dtype=torch.long), background).batch(torch.arange(len(images)))
    logits = model.cpu().eval()(b.x, b.edge_index, b.batch, b.num_graphs)
    return {**CHECK, "background": background, "logits_sum": logits.sum().item(),
            "logits_abs_sum": logits.abs().sum().item(), "argmax": logits.argmax(-1).tolist()}


def encode_examples(images, labels, n):
    """The first n test digits (uint8) as base64 in the JSON."""
    return {"test_index": list(range(n)), "shape": [n, *images.shape[1:]], "labels": labels[:n].tolist(),
            "images_uint8_base64": base64.b64encode(images[:n].contiguous().numpy().tobytes()).decode()}


def decode_examples(meta):
    """-> (images (n, 28, 28) uint8, labels (n,)) shipped in the JSON."""
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


def export(ckpt, run_dir, command, images, labels):
    """pretrained/gnns/<model>.* from a finished run: the weights in float32 (27k parameters: 0.1 MiB, so
    no rounding is needed), the run's log, and the JSON, measured with the written file on the test set
    (images, labels)."""
    saved, name = ckpt["args"], ckpt["config"]["model"]
    weights, meta_path, log_path = paths(name)
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in ckpt["model"].items()}, weights)
    model = GNN(GNNConfig(**ckpt["config"]))
    model.load_state_dict(load_file(weights))
    model.eval()
    test = build_graphs(images, labels, saved["background"])
    with torch.no_grad():
        preds = torch.cat([model(b.x, b.edge_index, b.batch, b.num_graphs).argmax(-1) for b in
                           (test.batch(torch.arange(i, min(i + 1000, len(test)))) for i in range(0, len(test), 1000))])
    n_params = sum(v.numel() for v in ckpt["model"].values())
    meta = {"folder": "gnns", "name": name, "dataset": saved["dataset"], "background": saved["background"],
            "val_size": saved["val_size"],
            "config": ckpt["config"], "command": command, "hardware": hardware(),
            "wall_time_s": round(ckpt["train_time"], 1), "wall_time_note": "the training loop's time, as logged",
            "epochs": ckpt["epoch"], "dtype": "float32",
            "metric": {"name": "test_acc", "value": (preds == labels).float().mean().item(),
                       "split": f"test ({len(labels):,} digits as pixel graphs)"},
            "val_acc": ckpt["val_acc"], "check": check_of(model, saved["background"]),
            "size_note": f"{n_params:,} parameters in float32: {weights.stat().st_size / 2 ** 20:.2f} MiB, the "
                         f"README's model, well within the 4 MiB per file",
            "examples": encode_examples(images, labels, 8)}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    shutil.copyfile(Path(run_dir) / "log.csv", log_path)
    refresh_sums([weights, meta_path, log_path])
    print(f"wrote {weights}, {meta_path} and {log_path}: test accuracy {meta['metric']['value']:.2%}; "
          f"pretrained/SHA256SUMS refreshed")
    return meta
