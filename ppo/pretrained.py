"""The shipped agents in pretrained/ppo/: each file checked against pretrained/SHA256SUMS before it is
read, the weights read through safetensors (no pickle), the card (JSON) beside them."""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

FOLDER = "ppo"
ROOT = Path(__file__).resolve().parent.parent / "pretrained"


def file_name(env_id):
    return env_id.split("-")[0].lower()  # CartPole-v1 -> cartpole


def verified(path):
    """path, once its sha256 is the one pretrained/SHA256SUMS lists for it; otherwise one line saying what to do."""
    name = path.relative_to(ROOT).as_posix()
    if not path.is_file():
        raise SystemExit(f"{FOLDER}: pretrained/{name} is missing (shipped: "
                         f"{', '.join(sorted(p.stem for p in path.parent.glob('*.safetensors'))) or 'none'}); "
                         f"restore it with git checkout, or train without --pretrained")
    sums = ROOT / "SHA256SUMS"
    listed = dict(line.split("  ", 1)[::-1] for line in sums.read_text().splitlines()) if sums.is_file() else {}
    if listed.get(name) != hashlib.sha256(path.read_bytes()).hexdigest():
        raise SystemExit(f"{FOLDER}: pretrained/{name} does not match pretrained/SHA256SUMS; "
                         f"restore it with git checkout")
    return path


def pretrained_card(env_id):
    """The JSON beside the weights: config, command, hardware, metric, the fixed-input check."""
    return json.loads(verified(ROOT / FOLDER / f"{file_name(env_id)}.json").read_text())


def pretrained_weights(env_id):
    """The agent's state dict (float32) and the normaliser's statistics of the shipped agent for env_id."""
    tensors = load_file(verified(ROOT / FOLDER / f"{file_name(env_id)}.safetensors"))
    agent = {k[len("agent."):]: v.float() for k, v in tensors.items() if k.startswith("agent.")}
    normalizer = {name: {"mean": tensors[f"{name}.mean"].tolist(), "var": tensors[f"{name}.var"].tolist(),
                         "count": tensors[f"{name}.count"].item()} for name in ("obs_rms", "ret_rms")}
    return agent, normalizer


def load_pretrained(agent, normalizer, env_id):
    """Load the shipped agent for env_id into agent (an Agent of the env's sizes) and normalizer."""
    weights, stats = pretrained_weights(env_id)
    try:
        agent.load_state_dict(weights)
    except RuntimeError:
        raise SystemExit(f"{FOLDER}: pretrained/{FOLDER}/{file_name(env_id)}.safetensors does not fit this "
                         f"agent for {env_id}; re-export it with --export-pretrained")
    normalizer.load_state_dict(stats)
    return pretrained_card(env_id)


def log_path(env_id):
    """The shipped run's log.csv (for the learning curve), checked like the weights; None if none shipped."""
    path = ROOT / FOLDER / f"{file_name(env_id)}.log.csv"
    return verified(path) if path.exists() else None


@torch.no_grad()
def check_output(agent, obs_dim):
    """The card's fixed-input check: 8 observations drawn from torch.Generator().manual_seed(0) (no
    environment needed), through the greedy policy and the critic."""
    obs = torch.randn(8, obs_dim, generator=torch.Generator().manual_seed(0))
    out, value = agent.actor(obs), agent.get_value(obs)
    return {"seed": 0, "shape": [8, obs_dim], "actor_sum": out.sum().item(), "actor_abs_sum": out.abs().sum().item(),
            "greedy_actions": agent.get_action_and_value(obs, greedy=True)[0].tolist(),
            "value_sum": value.sum().item()}


def refresh_sums(paths):
    """Write the sha256 lines of paths into pretrained/SHA256SUMS, keeping the other folders' lines."""
    sums = ROOT / "SHA256SUMS"
    lines = dict(line.split("  ", 1)[::-1] for line in sums.read_text().splitlines()) if sums.is_file() else {}
    for p in paths:
        lines[p.relative_to(ROOT).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    tmp = sums.with_name(sums.name + ".tmp")  # every folder's lines: replaced in one rename, never half-written
    tmp.write_text("".join(f"{h}  {f}\n" for f, h in sorted(lines.items()) if (ROOT / f).exists()))
    os.replace(tmp, sums)
