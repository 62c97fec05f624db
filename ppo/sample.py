"""From a checkpoint to what a person looks at: the greedy return, the learning curve and a GIF."""
import csv
import os
from pathlib import Path

import imageio.v2 as imageio
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame renders off-screen, without a display
from pretrained import file_name, load_pretrained, log_path as shipped_log
from train import Normalizer, agent_for, clip_action, evaluate, load_checkpoint, make_env


def plot_curve(log_path, fig_path, env_id):
    with open(log_path) as f:
        rows = [r for r in csv.DictReader(f) if r["episodic_return"] != "nan"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(r["global_step"]) for r in rows], [float(r["episodic_return"]) for r in rows])
    ax.set(xlabel="environment steps", ylabel="mean return, last 20 episodes", title=f"PPO on {env_id}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(fig_path, dpi=120)
    plt.close(fig)


@torch.no_grad()
def record_gif(agent, normalizer, env_id, path, steps, seed):
    env = make_env(env_id, render_mode="rgb_array")
    obs, _ = env.reset(seed=seed)
    frames = [env.render()]
    for _ in range(steps - 1):
        o = torch.as_tensor(normalizer.obs(obs[None]), dtype=torch.float32)
        action = agent.get_action_and_value(o, greedy=True)[0][0].numpy()
        obs, _, terminated, truncated, _ = env.step(clip_action(action, env.action_space))
        frames.append(env.render())
        if terminated or truncated:
            break
    env.close()
    imageio.mimsave(path, [f[::2, ::2] for f in frames], duration=20, loop=0)  # half size, 50 fps
    return len(frames)


def sample(args, evaluate_policy=True):
    """The greedy return, the learning curve and a GIF of the run in --out-dir (or of the shipped agent)."""
    out, fig_dir = Path(args.out_dir), Path(args.figures_dir)
    env = make_env(args.env_id)
    agent = agent_for(env.observation_space, env.action_space)
    normalizer = Normalizer(env.observation_space.shape[0], 1, args.gamma, enabled=args.normalize)
    env.close()
    if args.pretrained and args.sample_only:
        load_pretrained(agent, normalizer, args.env_id)
        log_csv, source = shipped_log(args.env_id), f"pretrained/ppo/{file_name(args.env_id)}.safetensors"
    else:
        ckpt = load_checkpoint(out / "ckpt.pt", args.env_id)
        agent.load_state_dict(ckpt["agent"])
        normalizer.load_state_dict(ckpt["normalizer"])
        log_csv, source = out / "log.csv", out / "ckpt.pt"
    agent.eval()
    if evaluate_policy:
        print(f"{source}: greedy evaluation {evaluate(agent, args.env_id, normalizer, args.eval_episodes, args.seed, 'cpu'):.1f} "
              f"mean return over {args.eval_episodes} episodes")
    fig_dir.mkdir(parents=True, exist_ok=True)
    name = f"ppo_{file_name(args.env_id)}"
    if log_csv is not None and log_csv.is_file():
        plot_curve(log_csv, fig_dir / f"{name}_curve.png", args.env_id)
        print(f"wrote {fig_dir / f'{name}_curve.png'}")
    n = record_gif(agent, normalizer, args.env_id, fig_dir / f"{name}.gif", args.gif_steps, args.seed)
    print(f"wrote {fig_dir / f'{name}.gif'} ({n} frames)")
