"""--export-pretrained RUN_DIR: a finished run -> pretrained/ppo/<env>.safetensors (the agent in float32:
9k parameters, and the normaliser's statistics), <env>.json (the card) and <env>.log.csv (its curve)."""
import csv
import json
import os
import platform
import shutil

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import pretrained
from pretrained import FOLDER, check_output, file_name, refresh_sums
from train import Normalizer, agent_for, evaluate, load_checkpoint, make_env

EVAL_EPISODES = 10


def training_seconds(ckpt, log_csv):
    """The run's training time: saved in the checkpoint, or (older runs) env steps / the last logged steps/s."""
    if "train_time" in ckpt:
        return ckpt["train_time"]
    with open(log_csv) as f:
        last = list(csv.DictReader(f))[-1]
    return int(last["global_step"]) / float(last["sps"])


def export_pretrained(run_dir, command_of):
    ckpt = load_checkpoint(run_dir / "ckpt.pt")
    args, env_id = ckpt["args"], ckpt["env_id"]
    name, dest = file_name(env_id), pretrained.ROOT / FOLDER
    tensors = {f"agent.{k}": v.float().contiguous() for k, v in ckpt["agent"].items()}
    for rms, stats in ckpt["normalizer"].items():
        for k in ("mean", "var", "count"):
            tensors[f"{rms}.{k}"] = torch.tensor(stats[k], dtype=torch.float64)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dest / f"{name}.safetensors")
    # The card's numbers come from the file just written, read back into today's code on the CPU.
    env = make_env(env_id)
    agent = agent_for(env.observation_space, env.action_space)
    written = load_file(dest / f"{name}.safetensors")
    agent.load_state_dict({k[len("agent."):]: v for k, v in written.items() if k.startswith("agent.")})
    agent.eval()
    normalizer = Normalizer(env.observation_space.shape[0], 1, args["gamma"], args["normalize"])
    normalizer.load_state_dict(ckpt["normalizer"])
    obs_dim = env.observation_space.shape[0]
    env.close()
    greedy = evaluate(agent, env_id, normalizer, EVAL_EPISODES, args["seed"], "cpu")
    has_log = (run_dir / "log.csv").is_file()
    card = {
        "folder": FOLDER, "name": name,
        "config": {"env_id": env_id, "obs_dim": obs_dim, "continuous": agent.continuous,
                   "normalize": args["normalize"], "gamma": args["gamma"]},
        "command": command_of(args),
        "hardware": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}",
        "wall_time_s": round(training_seconds(ckpt, run_dir / "log.csv"), 1),
        "metric": {"name": f"greedy return, mean of {EVAL_EPISODES} fresh episodes (seeds {args['seed']} + 10000..)",
                   "value": greedy, "split": "fresh episodes"},
        "training": {"env_steps": ckpt["global_step"], "solved_at": ckpt["solved_at"],
                     "mean_return_last_20_training_episodes": float(np.mean(ckpt["recent"])) if ckpt["recent"] else None},
        "check": check_output(agent, obs_dim),
        "size_note": f"two 64-wide MLPs, {sum(p.numel() for p in agent.parameters()):,} parameters in float32 "
                     f"({(dest / f'{name}.safetensors').stat().st_size / 1024:.0f} KiB): no need to round them",
    }
    (dest / f"{name}.json").write_text(json.dumps(card, indent=1) + "\n")
    written = [dest / f"{name}.safetensors", dest / f"{name}.json"]
    if has_log:
        shutil.copyfile(run_dir / "log.csv", dest / f"{name}.log.csv")
        written.append(dest / f"{name}.log.csv")
    refresh_sums(written)
    print(f"wrote {', '.join(str(p) for p in written)}; greedy return {greedy:.1f}; refreshed {pretrained.ROOT / 'SHA256SUMS'}")
