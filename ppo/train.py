"""PPO, Algorithm 1 of Schulman et al. (2017): N actors collect T steps each, advantages by
GAE, then K epochs of minibatch Adam on the clipped surrogate L^CLIP+VF+S.

The implementation details that matter (Huang et al. 2022, "The 37 implementation details
of PPO") are named in a comment where they happen. Shapes: T steps, N envs, O obs size.
"""
import csv
import json
import os
import resource
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from tqdm import tqdm

from model import Agent, RunningMeanStd
from pretrained import load_pretrained

FOLDER = "ppo"
QUICK_OUT_DIR = "runs/ppo-quick"  # the one place a fresh (--quick) run may overwrite a checkpoint
# Dense bf16 peak FLOP/s of the GPUs whose MFU --benchmark reports (by a substring of the device name).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}
LOG_FIELDS = ["global_step", "episodic_return", "pg_loss", "v_loss", "entropy", "approx_kl",
              "clipfrac", "explained_var", "lr", "sps"]


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"ppo: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("ppo: --device mps, but MPS is not available here (try --device cpu)")
    return name


def make_env(env_id, render_mode=None):
    try:
        env = gym.make(env_id, **({"render_mode": render_mode} if render_mode else {}))
    except (gym.error.Error, ImportError, TypeError) as e:  # unknown id, missing extra, bad entry point
        raise SystemExit(f"ppo: --env-id {env_id}: {(str(e).splitlines() or [type(e).__name__])[0]}")
    space = env.action_space
    if not isinstance(space, (gym.spaces.Discrete, gym.spaces.Box)):
        raise SystemExit(f"ppo: --env-id {env_id} has a {type(space).__name__} action space; "
                         f"PPO here handles Discrete (categorical) and Box (Gaussian) actions")
    if len(env.observation_space.shape or ()) != 1:
        raise SystemExit(f"ppo: --env-id {env_id} has observations of shape {env.observation_space.shape}; "
                         f"these MLPs take flat vectors")
    return gym.wrappers.RecordEpisodeStatistics(env)  # raw episodic return, before any scaling


def make_envs(env_id, num_envs):
    # SAME_STEP autoreset: a finished env is reset inside step(), and the true last observation
    # comes back in info["final_obs"], which we need to bootstrap truncated episodes.
    return gym.vector.SyncVectorEnv([lambda: make_env(env_id) for _ in range(num_envs)],
                                    autoreset_mode=AutoresetMode.SAME_STEP)


class Normalizer:
    """Implementation detail for continuous control: observations scaled by their running mean
    and std, rewards divided by the running std of the discounted return; both clipped to +-10."""

    def __init__(self, obs_dim, num_envs, gamma, enabled):
        self.enabled, self.gamma = enabled, gamma
        self.obs_rms, self.ret_rms = RunningMeanStd((obs_dim,)), RunningMeanStd()
        self.returns = np.zeros(num_envs)

    def obs(self, o, update=False):
        if not self.enabled:
            return o
        if update:
            self.obs_rms.update(o)
        return np.clip((o - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + 1e-8), -10, 10)

    def reward(self, r, done):
        if not self.enabled:
            return r
        self.returns = self.returns * self.gamma + r
        self.ret_rms.update(self.returns)
        self.returns[done] = 0.0
        return np.clip(r / np.sqrt(self.ret_rms.var + 1e-8), -10, 10)

    def state_dict(self):
        return {"obs_rms": self.obs_rms.state_dict(), "ret_rms": self.ret_rms.state_dict()}

    def load_state_dict(self, d):
        self.obs_rms.load_state_dict(d["obs_rms"])
        self.ret_rms.load_state_dict(d["ret_rms"])


def compute_gae(rewards, values, next_values, terminated, dones, gamma, lam):
    """Generalized advantage estimation over (T, N) arrays, backwards in time.
    next_values[t] is V(s_{t+1}) of the true next state (the final observation when the episode
    ended at t). Implementation detail: a terminated episode bootstraps with 0, a truncated one
    (time limit) with V(s_{t+1}); either way the advantage does not flow across the boundary."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.size(0))):
        # delta_t = r_t + gamma V(s_{t+1}) - V(s_t)
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        # A_t = delta_t + (gamma lambda) A_{t+1}
        last = delta + gamma * lam * (1.0 - dones[t]) * last
        advantages[t] = last
    return advantages, advantages + values  # A_t and the lambda-return, the value target


def clipped_surrogate(ratio, advantages, clip_coef):
    """-L^CLIP per sample: -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t), with r_t = pi / pi_old."""
    return -torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)


def value_loss(new_values, old_values, returns, clip_coef, clip):
    """L^VF = (V(s_t) - V_t^targ)^2 / 2; implementation detail (option): clip V around its old value."""
    loss = (new_values - returns) ** 2
    if clip:
        clipped = old_values + (new_values - old_values).clamp(-clip_coef, clip_coef)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * loss.mean()


def normalize_advantages(advantages):
    """Implementation detail: advantages normalised per minibatch, (A - mean(A)) / (std(A) + 1e-8)."""
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


def ppo_loss(pg_loss, v_loss, entropy, vf_coef, ent_coef):
    """-L^{CLIP+VF+S} = -(L^CLIP - c1 L^VF + c2 S) (eq. 9), to minimise; pg_loss is already -L^CLIP."""
    return pg_loss + vf_coef * v_loss - ent_coef * entropy


def annealed_lr(lr, iteration, num_iterations, anneal):
    """Implementation detail: the learning rate falls linearly from lr (iteration 0) towards 0."""
    return lr * (1.0 - iteration / num_iterations) if anneal else lr


def update(agent, optimizer, batch, args, minibatch_size, iteration, ckpt_path):
    """K epochs of minibatch Adam on -L^{CLIP+VF+S} over the flattened rollout (Algorithm 1);
    returns the last minibatch's losses, the approx-KL and the clip fraction, for the log."""
    batch_size, clipfracs = batch["obs"].size(0), []
    for epoch in range(args.update_epochs):
        perm = torch.randperm(batch_size, device=batch["obs"].device)
        for start in range(0, batch_size, minibatch_size):
            mb = perm[start:start + minibatch_size]
            _, new_logp, entropy, new_value = agent.get_action_and_value(batch["obs"][mb], batch["actions"][mb])
            log_ratio = new_logp - batch["logprobs"][mb]
            ratio = log_ratio.exp()  # r_t(theta) = pi_theta(a_t|s_t) / pi_theta_old(a_t|s_t)
            with torch.no_grad():  # detail: the k3 estimator of KL, and the clipped fraction
                approx_kl = ((ratio - 1) - log_ratio).mean()
                clipfracs.append(((ratio - 1.0).abs() > args.clip_coef).float().mean().item())
            mb_adv = normalize_advantages(batch["advantages"][mb]) if args.norm_adv else batch["advantages"][mb]
            pg_loss = clipped_surrogate(ratio, mb_adv, args.clip_coef).mean()
            v_loss = value_loss(new_value, batch["values"][mb], batch["returns"][mb], args.clip_coef, args.clip_vloss)
            entropy_loss = entropy.mean()
            loss = ppo_loss(pg_loss, v_loss, entropy_loss, args.vf_coef, args.ent_coef)
            optimizer.zero_grad()
            loss.backward()
            # detail: global gradient-norm clipping
            grad_norm = torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            check_finite(loss, grad_norm, iteration, epoch, ckpt_path)
            optimizer.step()
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    return {"pg_loss": pg_loss.item(), "v_loss": v_loss.item(), "entropy": entropy_loss.item(),
            "approx_kl": approx_kl.item(), "clipfrac": float(np.mean(clipfracs))}


def check_finite(loss, grad_norm, iteration, epoch, ckpt_path):
    """Stop before a non-finite loss or gradient reaches the weights (and so a checkpoint)."""
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
        raise SystemExit(f"ppo: the loss or its gradient became non-finite (loss {loss.item():g}, gradient norm "
                         f"{grad_norm.item():g}) in "
                         f"epoch {epoch + 1} of iteration {iteration + 1}; stopping before the update ({kept}); "
                         f"try a lower --lr")


def check_memory(args, obs_dim, act_dim, device):
    """Refuse a rollout that cannot fit before anything is allocated: the (T, N) buffers (observation
    and next observation, action, log pi, reward, value, two done flags, advantage, return), the
    critic's 64-wide activations over all T N next observations at once, and 16 bytes per parameter
    of the two MLPs (weights, gradients, Adam's two moments)."""
    T, N = args.num_steps, args.num_envs
    params = 2 * (64 * 64 + 64) + (obs_dim + 1) * 64 * 2 + 65 * (1 + act_dim)
    need = 4 * T * N * (2 * obs_dim + act_dim + 7 + 4 * 64) + 16 * params
    have = (torch.cuda.mem_get_info(device)[1] if device.startswith("cuda")
            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > have:
        raise SystemExit(f"ppo: --num-envs {N} x --num-steps {T} needs about {need / 2**30:,.0f} GiB of memory for "
                         f"the rollout buffers and the critic's pass over them, and {device} has "
                         f"{have / 2**30:,.0f} GiB; choose fewer --num-envs or --num-steps")


def load_checkpoint(path, env_id=None):
    if not path.is_file():
        raise SystemExit(f"ppo: no checkpoint at {path}; train first, or pass the --out-dir of a ppo run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"ppo: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"ppo: {path} is a checkpoint of {folder or 'something else'}, not of ppo/")
    if env_id and ckpt["env_id"] != env_id:
        raise SystemExit(f"ppo: {path} was trained on {ckpt['env_id']}, not --env-id {env_id}")
    return ckpt


def agent_for(obs_space, act_space):
    continuous = isinstance(act_space, gym.spaces.Box)
    return Agent(int(np.prod(obs_space.shape)), act_space.shape[0] if continuous else act_space.n, continuous)


@torch.no_grad()
def evaluate(agent, env_id, normalizer, episodes, seed, device):
    """Greedy policy (arg max, or the Gaussian mean) on fresh episodes: mean raw return."""
    env = make_env(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + 10_000 + i)
        done = False
        while not done:
            o = torch.as_tensor(normalizer.obs(obs[None]), dtype=torch.float32, device=device)
            action = agent.get_action_and_value(o, greedy=True)[0][0].cpu().numpy()
            obs, _, terminated, truncated, info = env.step(clip_action(action, env.action_space))
            done = terminated or truncated
        returns.append(info["episode"]["r"])
    env.close()
    return float(np.mean(returns))


def clip_action(a, space):
    """Implementation detail: the Gaussian sample is clipped to the action bounds for the env
    only; the policy's log-probability is of the unclipped sample."""
    return np.clip(a, space.low, space.high) if isinstance(space, gym.spaces.Box) else a


def rollout_buffers(envs, T, N, device):
    """Rollout storage, (T, N, ...): s_t, the true s_{t+1}, a_t, log pi_old(a_t|s_t), r_t, V(s_t), the flags."""
    obs = torch.zeros((T, N) + envs.single_observation_space.shape, device=device)
    return dict(obs=obs, next_obs=torch.zeros_like(obs),  # next_obs: the final observation included
                actions=torch.zeros((T, N) + envs.single_action_space.shape, device=device),
                **{k: torch.zeros((T, N), device=device) for k in ["logprobs", "rewards", "values", "terminated",
                                                                   "dones"]})


def run_policy(agent, envs, normalizer, buf, next_obs, recent):
    """Algorithm 1's "run policy pi_old in the environment for T timesteps" in each of the N actors,
    into buf; appends finished episodes' raw returns to recent (the last 20 kept); returns s_T."""
    device = next_obs.device
    for t in range(buf["obs"].size(0)):
        buf["obs"][t] = next_obs
        with torch.no_grad():
            action, logp, _, value = agent.get_action_and_value(next_obs)
        buf["actions"][t], buf["logprobs"][t], buf["values"][t] = action, logp, value
        raw_obs, r, term, trunc, info = envs.step(clip_action(action.cpu().numpy(), envs.single_action_space))
        done = term | trunc
        buf["rewards"][t] = torch.as_tensor(normalizer.reward(r, done), device=device)
        buf["terminated"][t] = torch.as_tensor(term, device=device)
        buf["dones"][t] = torch.as_tensor(done, device=device)
        next_obs = torch.as_tensor(normalizer.obs(raw_obs, update=True), dtype=torch.float32, device=device)
        buf["next_obs"][t] = next_obs
        if done.any():  # SAME_STEP autoreset: raw_obs already is the next episode's start,
            # s_{t+1} is the final observation (normalised with the same, updated statistics)
            final = normalizer.obs(np.stack(info["final_obs"][done]))
            buf["next_obs"][t, torch.as_tensor(done)] = torch.as_tensor(final, dtype=torch.float32, device=device)
            ep = info["final_info"]
            recent[:] = (recent + [float(r) for r in ep["episode"]["r"][ep["_episode"]]])[-20:]
    return next_obs


def rollout(agent, envs, normalizer, buf, next_obs, recent, args):
    """Algorithm 1, lines 2-5: each of the N actors runs pi_old for T timesteps, then the advantage
    estimates A_1..A_T by GAE. Returns s_T and the batch of N T samples, flattened for the update."""
    T, N = buf["rewards"].shape
    next_obs = run_policy(agent, envs, normalizer, buf, next_obs, recent)
    with torch.no_grad():
        next_values = agent.get_value(buf["next_obs"].flatten(0, 1)).view(T, N)
        advantages, returns = compute_gae(buf["rewards"], buf["values"], next_values, buf["terminated"],
                                          buf["dones"], args.gamma, args.gae_lambda)
    return next_obs, dict(obs=buf["obs"].flatten(0, 1), actions=buf["actions"].flatten(0, 1),
                          logprobs=buf["logprobs"].flatten(), advantages=advantages.flatten(),
                          returns=returns.flatten(), values=buf["values"].flatten())


def train(args):
    """Algorithm 1: for each iteration, rollout() (N actors run pi_old for T steps, GAE), then update()
    (K epochs of minibatch Adam on the clipped surrogate); theta_old <- theta is the next rollout's policy."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    run = start_run(args, device)  # envs, agent, Adam, normaliser, counters; restored on --resume
    log = RunLog(run.out, args, run.global_step)
    T, N = args.num_steps, args.num_envs
    raw_obs, _ = run.envs.reset(seed=args.seed + run.iteration)
    next_obs = torch.as_tensor(run.normalizer.obs(raw_obs, update=True), dtype=torch.float32, device=device)
    run.start_time, run.start_step = time.time(), run.global_step
    pbar = tqdm(range(run.iteration, run.num_iterations), initial=run.iteration, total=run.num_iterations,
                desc=args.env_id, dynamic_ncols=True)
    try:
        for iteration in pbar:
            lr = annealed_lr(args.lr, iteration, run.num_iterations, args.anneal_lr)
            run.optimizer.param_groups[0]["lr"] = lr
            next_obs, batch = rollout(run.agent, run.envs, run.normalizer, run.buf, next_obs, run.recent, args)
            stats = update(run.agent, run.optimizer, batch, args, T * N // args.num_minibatches, iteration,
                           run.ckpt_path)
            run.iteration, run.global_step = iteration + 1, run.global_step + T * N
            row = log.write(run, args, batch, stats, lr)
            pbar.set_postfix(ret=f"{row['episodic_return']:.1f}", kl=f"{row['approx_kl']:.4f}", sps=f"{row['sps']:.0f}")
            if run.iteration % args.save_interval == 0 or run.iteration == run.num_iterations:
                save_checkpoint(run, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted; the last checkpoint is {run.ckpt_path}: continue with --resume")
        raise SystemExit(130)
    finally:
        run.envs.close()
        log.close()
    return finish(run, args, device, log)


def start_run(args, device):
    """Everything train() keeps between iterations: refuses to overwrite another run's checkpoint,
    checks memory, builds the envs, agent, Adam and normaliser, and restores them on --resume (or the
    shipped agent with --pretrained)."""
    out = Path(args.out_dir)
    ckpt_path = out / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, args.env_id) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"ppo: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    env = make_env(args.env_id)  # one env, for the sizes: the check comes before the N envs and buffers
    check_memory(args, int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape or (1,))), device)
    env.close()
    envs = make_envs(args.env_id, args.num_envs)
    agent = agent_for(envs.single_observation_space, envs.single_action_space).to(device)
    run = SimpleNamespace(
        out=out, ckpt_path=ckpt_path, envs=envs, agent=agent, train_time=0.0,
        optimizer=torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5),  # detail: Adam eps 1e-5
        normalizer=Normalizer(envs.single_observation_space.shape[0], args.num_envs, args.gamma, args.normalize),
        buf=rollout_buffers(envs, args.num_steps, args.num_envs, device),
        num_iterations=args.total_timesteps // (args.num_steps * args.num_envs),
        iteration=0, global_step=0, recent=[], solved_at=None)  # recent: the last 20 episodes' returns
    if args.pretrained:  # fine-tuning: the shipped agent and normaliser, a fresh optimiser and schedule
        load_pretrained(agent, run.normalizer, args.env_id)
    if ckpt:
        agent.load_state_dict(ckpt["agent"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.normalizer.load_state_dict(ckpt["normalizer"])
        run.iteration, run.global_step = ckpt["iteration"], ckpt["global_step"]
        run.recent, run.solved_at = ckpt["recent"], ckpt["solved_at"]
        run.train_time = ckpt.get("train_time", 0.0)
        torch.manual_seed(args.seed + run.iteration)  # fresh random streams, not a replay of iteration 0's
    out.mkdir(parents=True, exist_ok=True)
    return run


class RunLog:
    """log.csv (on --resume: the rows up to the checkpoint, lost work dropped) and, with --wandb, W&B."""

    def __init__(self, out, args, resume_step):
        rows = []
        if resume_step and (out / "log.csv").is_file():
            with open(out / "log.csv") as f:
                rows = [r for r in csv.DictReader(f) if int(r["global_step"]) <= resume_step]
        # the kept rows replace the log in one rename: stopped at any moment, the old log or the new one is there
        with open(out / "log.csv.tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(out / "log.csv.tmp", out / "log.csv")
        self.file = open(out / "log.csv", "a", newline="")
        self.csv = csv.DictWriter(self.file, fieldnames=LOG_FIELDS)
        self.wandb = None
        if args.wandb:
            import wandb
            self.wandb = wandb
            wandb.init(project="papers-ppo", config=vars(args), dir=out)

    def write(self, run, args, batch, stats, lr):
        """The iteration's row: mean return of the last 20 episodes (and the step it first reached
        --solve-return), the update's losses, explained variance of the value targets, LR, steps/s."""
        y, v = batch["returns"].cpu().numpy(), batch["values"].cpu().numpy()
        mean_return = float(np.mean(run.recent)) if run.recent else float("nan")
        if (run.solved_at is None and args.solve_return is not None and len(run.recent) >= 20
                and mean_return >= args.solve_return):
            run.solved_at = run.global_step
        sps = (run.global_step - run.start_step) / (time.time() - run.start_time)
        row = {"global_step": run.global_step, "episodic_return": mean_return, **stats,
               "explained_var": float(1 - np.var(y - v) / np.var(y)) if np.var(y) > 0 else float("nan"),
               "lr": lr, "sps": sps}
        self.csv.writerow(row)
        self.file.flush()
        if self.wandb:
            self.wandb.log(row, step=run.global_step)
        return row

    def close(self):
        self.file.close()


def save_checkpoint(run, args):
    tmp = run.ckpt_path.with_suffix(".tmp")
    torch.save({"folder": FOLDER, "env_id": args.env_id, "agent": run.agent.state_dict(),
                "optimizer": run.optimizer.state_dict(), "normalizer": run.normalizer.state_dict(),
                "iteration": run.iteration, "global_step": run.global_step, "recent": run.recent,
                "solved_at": run.solved_at, "args": vars(args),
                "train_time": run.train_time + time.time() - run.start_time}, tmp)
    os.replace(tmp, run.ckpt_path)  # atomic: a crash mid-write keeps the previous checkpoint


def finish(run, args, device, log):
    """The greedy evaluation of the trained agent and the run's one-line summary."""
    greedy = evaluate(run.agent, args.env_id, run.normalizer, args.eval_episodes, args.seed, device)
    sps = (run.global_step - run.start_step) / (time.time() - run.start_time)
    mean_return = float(np.mean(run.recent)) if run.recent else float("nan")
    solved = "" if args.solve_return is None else \
        f"{args.solve_return:g} first reached at step {run.solved_at if run.solved_at else 'never'}; "
    print(f"{args.env_id}: mean return of the last 20 training episodes {mean_return:.1f}; {solved}"
          f"greedy evaluation {greedy:.1f} over {args.eval_episodes} episodes; {sps:.0f} steps/s")
    if log.wandb:
        log.wandb.finish()
    return {"solved_at": run.solved_at, "greedy_return": greedy, "sps": sps, "agent": run.agent}


def flops_per_env_step(obs_dim, act_dim, update_epochs):
    """Training FLOPs per environment step, the two MLPs' matmuls only (biases, tanh, the losses and Adam
    left out): a forward pass of a net O -> 64 -> 64 -> out costs F = 2 (64 O + 64 * 64 + 64 out) per
    sample. Each env step pays the actor and critic forward in the rollout, the critic's V(s_{t+1}) for
    GAE, and in each of the K epochs a forward and a backward (twice the forward) of both nets:
    (1 + 3 K) (F_actor + F_critic) + F_critic (without --target-kl's early stop)."""
    forward = lambda out: 2 * (64 * obs_dim + 64 * 64 + 64 * out)
    return (1 + 3 * update_epochs) * (forward(act_dim) + forward(1)) + forward(1)


def benchmark(args):
    """--benchmark: the agent, optimiser, envs and iteration of training (rollout: N x T env steps and GAE;
    update: K epochs of minibatches), 3 warm-up iterations (1 with --quick), then the median of --benchmark-steps
    timed ones. The data are the simulated environments themselves ("real"). Prints one JSON line;
    writes nothing."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    env = make_env(args.env_id)
    obs_dim, act_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape or (1,)))
    env.close()
    check_memory(args, obs_dim, act_dim, device)
    envs = make_envs(args.env_id, args.num_envs)
    agent = agent_for(envs.single_observation_space, envs.single_action_space).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.lr, eps=1e-5)  # as train()
    normalizer = Normalizer(obs_dim, args.num_envs, args.gamma, enabled=args.normalize)
    buf = rollout_buffers(envs, args.num_steps, args.num_envs, device)
    next_obs = torch.as_tensor(normalizer.obs(envs.reset(seed=args.seed)[0], update=True), dtype=torch.float32,
                               device=device)
    cuda = device.startswith("cuda")
    warmup, times, recent, steps = 1 if args.quick else 3, [], [], args.num_envs * args.num_steps
    for i in range(warmup + args.benchmark_steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        next_obs, batch = rollout(agent, envs, normalizer, buf, next_obs, recent, args)
        update(agent, optimizer, batch, args, steps // args.num_minibatches, i,
               Path(args.out_dir) / "ckpt.pt")  # the path is only named in a divergence message
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    envs.close()
    step_s = statistics.median(times[warmup:])
    n_out = act_dim if isinstance(envs.single_action_space, gym.spaces.Box) else envs.single_action_space.n
    flops = flops_per_env_step(obs_dim, int(n_out), args.update_epochs)
    name = torch.cuda.get_device_name(device) if cuda else ""
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    print(json.dumps({
        "folder": FOLDER, "device": f"cuda:{torch.device(device).index or 0} {name}" if cuda else device,
        "torch": torch.__version__, "params": sum(p.numel() for p in agent.parameters() if p.requires_grad),
        "batch_size": steps, "unit": "env_steps", "samples_per_s": steps / step_s, "step_ms": step_s * 1e3,
        "flops_per_sample": flops, "tflops": flops * steps / step_s / 1e12,
        "mfu": flops * steps / step_s / peak if peak else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "compile": False, "data": "real"}))
