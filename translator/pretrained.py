"""The shipped weights, pretrained/translator/en-fr.*: loaded (safetensors, no pickle) only after their
sha256 matches pretrained/SHA256SUMS; and written from a finished run by --export-pretrained, with a check
(a fixed input and the outputs the exported weights give) that tests/test_translator.py reproduces."""
import hashlib
import json
import os
from pathlib import Path

import safetensors.torch
import torch

from data import BOS, EOS, load_tokenizer
from model import Config, Transformer, num_params, translate_ids

ROOT = Path(__file__).resolve().parent.parent / "pretrained"
FOLDER, NAME = "translator", "en-fr"
CHECK_TEXT = "She saw a boy sitting on a bench."
# Flags that say nothing about how the weights were trained.
NOT_TRAINING = {"command", "text", "resume", "sample_only", "out_dir", "figures_dir", "wandb", "beam", "alpha",
                "attention_text", "pretrained", "export_pretrained", "compile", "benchmark", "benchmark_steps", "average"}


def files():
    """The weights, the JSON and the tokenizer of the shipped model."""
    return (ROOT / FOLDER / f"{NAME}.safetensors", ROOT / FOLDER / f"{NAME}.json",
            ROOT / FOLDER / f"{NAME}.tokenizer.json")


def verified(path):
    """path's bytes, once their sha256 matches path's line in pretrained/SHA256SUMS."""
    name = f"pretrained/{FOLDER}/{path.name}"
    if not path.is_file():
        raise SystemExit(f"translator: {name} is missing; restore it with git checkout")
    sums = ROOT / "SHA256SUMS"
    lines = dict(line.split("  ", 1)[::-1] for line in sums.read_text().splitlines()) if sums.is_file() else {}
    data = path.read_bytes()
    if lines.get(f"{FOLDER}/{path.name}") != hashlib.sha256(data).hexdigest():
        raise SystemExit(f"translator: {name} does not match pretrained/SHA256SUMS; restore it with git checkout")
    return data


def load_pretrained(device="cpu"):
    """The shipped model (float32, eval mode), its tokenizer, and what evaluate reads of a checkpoint."""
    weights, meta, tokenizer = files()
    state = safetensors.torch.load(verified(weights))  # from the bytes checked: no second read
    meta = json.loads(verified(meta))
    tok = load_tokenizer(verified(tokenizer).decode())
    model = Transformer(Config(**meta["config"]))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval(), tok, {**meta["run"], "config": meta["config"]}


@torch.no_grad()
def check(model, tok):
    """Outputs of the model on inputs built without data: the beam-4 translation of CHECK_TEXT (its first
    max_len - 1 tokens), and the logits of random source and target tokens (torch.Generator seeded 0)."""
    L = model.cfg.max_len
    out = translate_ids(model, [tok.encode(CHECK_TEXT).ids[:L - 1]], beam=4)[0]
    g = torch.Generator().manual_seed(0)
    S, T = min(12, L), min(10, L)
    src = torch.cat([torch.randint(EOS + 1, model.cfg.vocab_size, (2, S - 1), generator=g), torch.full((2, 1), EOS)], 1)
    tgt = torch.cat([torch.full((2, 1), BOS), torch.randint(EOS + 1, model.cfg.vocab_size, (2, T - 1), generator=g)], 1)
    logits = model(src, tgt)[0]                                          # (2, 10, V)
    return {"text": CHECK_TEXT, "beam": 4, "translation_ids": out, "translation": tok.decode(out), "seed": 0,
            "src_shape": list(src.shape), "tgt_shape": list(tgt.shape), "logits_sum": logits.sum().item(),
            "logits_abs_sum": logits.abs().sum().item(), "argmax": logits.argmax(-1).tolist()}


def training_command(ckpt, defaults):
    """The command that trains these weights: the run's flags that differ from today's defaults (runs from
    before --batch-tokens batched by pairs); --steps is the checkpoint's step (the schedule does not depend
    on --steps, so stopping there gives the same weights)."""
    saved = {**defaults, "batch_tokens": 0, **ckpt["args"], "steps": ckpt["step"], "data_dir": "/path/to/datasets"}
    argv = []
    for key, value in saved.items():
        if key in NOT_TRAINING or key not in defaults or (value == defaults[key] and key != "data_dir"):
            continue
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return " ".join(["python translator/main.py", *argv])


def export_pretrained(ckpt, run_dir, defaults):
    """--export-pretrained RUN_DIR: the run's model in fp16 (its weights are all within fp16's range), the
    tokenizer, and a JSON with the config, the command, the measured metric and the check computed with
    the fp16 weights loaded back into float32 on the CPU; then pretrained/SHA256SUMS is refreshed."""
    model = Transformer(Config(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})  # the check sees what is shipped
    tok = load_tokenizer(ckpt["tokenizer"])
    results = Path(run_dir) / "results.json"
    scores = json.loads(results.read_text()) if results.is_file() else None
    n, beam = num_params(model), next((k for k in (scores or {}) if k.startswith("beam")), None)
    metric = ({"name": f"sacreBLEU, {beam} (alpha {scores['alpha']}), one reference per segment",
               "value": scores[beam]["bleu"], "split": f"test ({scores['test_sentences']} English sentences, "
                                                       f"{scores['test_pairs']} pairs)"} if beam else
              {"name": "sacreBLEU, greedy", "value": ckpt["val_bleu"],
               "split": f"validation (first {ckpt['args']['eval_sentences']} sentences)"})
    meta = {"folder": FOLDER, "name": NAME, "config": ckpt["config"], "command": training_command(ckpt, defaults),
            "hardware": ckpt.get("hardware", "not recorded"), "wall_time_s": ckpt.get("wall_time"),
            "metric": metric, "scores": {k: scores[k] for k in ("greedy", beam) if k} if beam else None,
            "check": check(model.eval(), tok), "tokenizer": f"{NAME}.tokenizer.json",
            "run": {k: ckpt[k] for k in ("step", "train_time", "val_loss", "val_bleu", "data_sha256")},
            "size_note": f"{n / 1e6:.2f}M parameters (the shared {model.cfg.vocab_size} x {model.cfg.d_model} "
                         f"embedding included) x 2 bytes (fp16) = {2 * n / 2**20:.2f} MiB, within the 4 MiB a file"}
    weights, meta_path, tokenizer = files()
    weights.parent.mkdir(parents=True, exist_ok=True)
    for path, write in ((weights, lambda p: safetensors.torch.save_file(state, p)),
                        (tokenizer, lambda p: Path(p).write_text(ckpt["tokenizer"])),
                        (meta_path, lambda p: Path(p).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n"))):
        write(str(path) + ".tmp")
        os.replace(str(path) + ".tmp", path)
        print(f"wrote {path}")
    refresh_sums()


def write_atomic(path, text):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def refresh_sums():
    """Rewrite this folder's lines of pretrained/SHA256SUMS, keeping the other folders' lines."""
    sums = ROOT / "SHA256SUMS"
    lines = dict(line.split("  ", 1)[::-1] for line in sums.read_text().splitlines()) if sums.is_file() else {}
    lines = {f: h for f, h in lines.items() if not f.startswith(f"{FOLDER}/")}
    for path in sorted((ROOT / FOLDER).iterdir()):
        if path.is_file():
            lines[f"{FOLDER}/{path.name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    # every folder's lines, replaced in one rename: never half-written
    write_atomic(sums, "".join(f"{h}  {f}\n" for f, h in sorted(lines.items())))
    print(f"refreshed {sums}")
