"""ppo/: GAE, the clipped objective's gradient, the Gaussian policy, learning, and clear errors."""
import csv
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import ROOT, import_folder
from torch.distributions import Independent, Normal

ppo = import_folder("ppo")


def test_gae_matches_the_sum_of_discounted_deltas_with_termination_and_truncation():
    torch.manual_seed(0)
    T, N, gamma, lam = 7, 2, 0.9, 0.8
    rewards, values, next_values = torch.randn(T, N), torch.randn(T, N), torch.randn(T, N)
    terminated, dones = torch.zeros(T, N), torch.zeros(T, N)
    terminated[2, 0] = dones[2, 0] = 1.0  # env 0: the pole fell after step 2
    dones[4, 1] = 1.0                     # env 1: time limit after step 4 (truncated, not terminal)
    adv, ret = ppo.train.compute_gae(rewards, values, next_values, terminated, dones, gamma, lam)

    for n in range(N):
        for t in range(T):
            # A_t = sum_l (gamma lambda)^l delta_{t+l}, up to and including the episode's last step
            total, l = 0.0, 0
            while t + l < T:
                k = t + l
                delta = rewards[k, n] + gamma * next_values[k, n] * (1 - terminated[k, n]) - values[k, n]
                total += (gamma * lam) ** l * delta.item()
                if dones[k, n]:
                    break
                l += 1
            assert adv[t, n].item() == pytest.approx(total, abs=1e-5)
    assert adv[2, 0].item() == pytest.approx((rewards[2, 0] - values[2, 0]).item())  # no bootstrap
    assert adv[4, 1].item() == pytest.approx((rewards[4, 1] + gamma * next_values[4, 1] - values[4, 1]).item())
    torch.testing.assert_close(ret, adv + values)


@pytest.mark.parametrize("ratio, advantage, clipped", [
    (1.5, 2.0, True),    # above 1 + eps with A > 0: no incentive to move further
    (0.5, -2.0, True),   # below 1 - eps with A < 0: likewise
    (0.5, 2.0, False),   # outside, but against the advantage: the unclipped term still pulls back
    (1.5, -2.0, False),
    (1.1, 2.0, False),   # inside the trust region
    (0.9, -2.0, False),
])
def test_clipped_objective_gradient(ratio, advantage, clipped):
    r = torch.tensor([ratio], requires_grad=True)
    ppo.train.clipped_surrogate(r, torch.tensor([advantage]), clip_coef=0.2).sum().backward()
    assert r.grad.item() == (0.0 if clipped else pytest.approx(-advantage))  # d(-r A)/dr = -A


def test_gaussian_log_prob_and_entropy_match_torch_distributions():
    torch.manual_seed(0)
    mean, log_std, a = torch.randn(5, 3), torch.randn(3), torch.randn(5, 3)
    dist = Independent(Normal(mean, log_std.exp().expand_as(mean)), 1)
    torch.testing.assert_close(ppo.model.gaussian_log_prob(a, mean, log_std), dist.log_prob(a))
    torch.testing.assert_close(ppo.model.gaussian_entropy(log_std.expand_as(mean)), dist.entropy())
    agent = ppo.model.Agent(obs_dim=4, n_actions=3, continuous=True)
    obs = torch.randn(5, 4)
    _, logp, ent, _ = agent.get_action_and_value(obs, a)
    dist = Independent(Normal(agent.actor(obs), agent.log_std.exp().expand(5, 3)), 1)
    torch.testing.assert_close(logp, dist.log_prob(a))
    torch.testing.assert_close(ent, dist.entropy())


def returns_logged(out_dir):
    with open(out_dir / "log.csv") as f:
        return [float(r["episodic_return"]) for r in csv.DictReader(f) if r["episodic_return"] != "nan"]


def test_a_short_cartpole_run_raises_the_return(tmp_path):
    args = ppo.main.parse_args(["--total-timesteps", "20480", "--out-dir", str(tmp_path), "--eval-episodes", "1"])
    ppo.train.train(args)
    rets = returns_logged(tmp_path)
    assert rets[0] < 60 and rets[-1] > 150, (rets[0], rets[-1])


def test_continuous_pipeline_and_resume(tmp_path):
    flags = ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
             "--update-epochs", "2", "--save-interval", "1", "--eval-episodes", "1", "--gif-steps", "20",
             "--out-dir", str(tmp_path)]
    ppo.main.main([*flags, "--total-timesteps", "256"])
    ckpt = torch.load(tmp_path / "ckpt.pt")
    assert ckpt["global_step"] == 256 and ckpt["normalizer"]["obs_rms"]["count"] > 256
    assert (tmp_path / "ppo_pendulum.gif").stat().st_size > 0
    # Resuming with nothing left to do hands back exactly the saved agent...
    agent = ppo.train.train(ppo.main.parse_args(["--out-dir", str(tmp_path), "--resume",
                                                 "--total-timesteps", "256"]))["agent"]
    for k, v in agent.state_dict().items():
        assert torch.equal(v, ckpt["agent"][k]), k
    # ...and with more to do continues the run with its own flags (env id, sizes, normalisation).
    args = ppo.main.parse_args(["--out-dir", str(tmp_path), "--resume", "--total-timesteps", "512"])
    assert (args.env_id, args.num_envs, args.num_steps, args.normalize) == ("Pendulum-v1", 2, 64, True)
    ppo.train.train(args)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    assert (ckpt["global_step"], ckpt["iteration"]) == (512, 4)
    with open(tmp_path / "log.csv") as f:
        assert [int(r["global_step"]) for r in csv.DictReader(f)] == [128, 256, 384, 512]


def run_main(*args):
    return subprocess.run([sys.executable, "ppo/main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def one_line_error(r, *words):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_unknown_env_id_is_a_clear_error(tmp_path):
    one_line_error(run_main("--env-id", "NoSuchEnv-v9", "--out-dir", str(tmp_path)), "NoSuchEnv-v9")
    one_line_error(run_main("--env-id", "nosuchmodule:Env-v0", "--out-dir", str(tmp_path)), "nosuchmodule")


@pytest.mark.parametrize("args, words", [
    (["--num-minibatches", "256"], ["minibatches of 2"]),  # CartPole preset: a batch of 256
    (["--gamma", "1.5"], ["--gamma"]),
    (["--clip-coef", "-0.2"], ["--clip-coef"]),
])
def test_bad_hyperparameters_are_clear_errors(args, words):
    one_line_error(run_main(*args), *words)


def test_unsupported_action_space_is_a_clear_error():
    class MultiBinaryEnv(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,))
        action_space = gym.spaces.MultiBinary(3)

    gym.register("MultiBinaryToy-v1", entry_point=MultiBinaryEnv)
    with pytest.raises(SystemExit, match="MultiBinary action space"):
        ppo.train.make_env("MultiBinaryToy-v1")


def test_checkpoint_of_another_env_is_refused(tmp_path):
    torch.save({"folder": "ppo", "env_id": "CartPole-v1"}, tmp_path / "ckpt.pt")
    one_line_error(run_main("--sample-only", "--env-id", "Acrobot-v1", "--out-dir", str(tmp_path)),
                   "CartPole-v1", "Acrobot-v1")


def test_checkpoint_of_another_folder_is_refused(tmp_path):
    torch.save({"folder": "gpt"}, tmp_path / "ckpt.pt")
    one_line_error(run_main("--sample-only", "--out-dir", str(tmp_path)), "gpt", "not of ppo/")


class CountingEnv(gym.Env):
    """Observation = steps taken in this episode; truncated by a TimeLimit of 3 steps."""
    observation_space = gym.spaces.Box(0, 10, (1,))
    action_space = gym.spaces.Discrete(2)

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.full(1, self.t, dtype=np.float32), 1.0, False, False, {}


def test_truncated_steps_bootstrap_from_the_final_observation(tmp_path, monkeypatch):
    gym.register("Counting-v0", entry_point=CountingEnv, max_episode_steps=3)

    class ObsIsValue(ppo.model.Agent):
        def get_value(self, obs):  # V(s) = the step count, so V(s_{t+1}) shows which s_{t+1} was used
            return obs[:, 0]

    seen = {}

    def spy(rewards, values, next_values, terminated, dones, gamma, lam):
        seen.update(next_values=next_values, dones=dones, terminated=terminated)
        return compute_gae(rewards, values, next_values, terminated, dones, gamma, lam)

    compute_gae = ppo.train.compute_gae
    monkeypatch.setattr(ppo.train, "compute_gae", spy)
    monkeypatch.setattr(ppo.train, "agent_for", lambda o, a: ObsIsValue(1, 2, continuous=False))
    ppo.train.train(ppo.main.parse_args(["--env-id", "Counting-v0", "--num-envs", "2", "--num-steps", "7",
                                         "--num-minibatches", "2", "--total-timesteps", "14",
                                         "--eval-episodes", "1", "--out-dir", str(tmp_path)]))
    # steps 0..6 of each env: s_{t+1} counts 1, 2, 3 (truncated: the final observation, not the
    # reset's 0), then 1, 2, 3, 1
    expected = torch.tensor([1., 2., 3., 1., 2., 3., 1.])[:, None].expand(7, 2)
    torch.testing.assert_close(seen["next_values"], expected)
    assert seen["dones"][:, 0].tolist() == [0, 0, 1, 0, 0, 1, 0] and not seen["terminated"].any()
