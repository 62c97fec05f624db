"""ppo/: the paper's math against the formulas written out and torch.distributions (the clipped surrogate
inside and just outside 1 +- eps, the value loss, GAE, entropies, advantage normalisation, LR annealing),
a spy on that math inside a real update (the flags reach it), learning, and clear errors."""
import csv
import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import flip_bit, import_folder, shipped_copy, unlist
from torch.distributions import Categorical, Independent, Normal
from torch.utils.flop_counter import FlopCounterMode

ppo = import_folder("ppo")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The networks here are tiny: with two threads on a busy 2-core machine, the hand-offs between them
    cost several times the arithmetic (the short CartPole run took 273 s with two threads, 39 s with one,
    on a busy machine). Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def surrogate_written_out(r, A, eps):
    """-L^CLIP for one sample (eq. 7) and its derivative in r, in plain floats."""
    clipped = min(max(r, 1 - eps), 1 + eps)
    unclipped_term_chosen = r * A < clipped * A or 1 - eps < r < 1 + eps  # inside, both terms are r A
    return -min(r * A, clipped * A), (-A if unclipped_term_chosen else 0.0)


@pytest.mark.parametrize("eps", [0.1, 0.2])
@pytest.mark.parametrize("A", [2.0, -2.0], ids=["A>0", "A<0"])
def test_clipped_surrogate_inside_and_just_outside_the_clip_range(eps, A):
    # just inside and just outside 1 - eps and 1 + eps, and 1: a wrong eps or a min/max swap changes a value
    ratios = [1 - eps - 0.01, 1 - eps + 0.01, 1.0, 1 + eps - 0.01, 1 + eps + 0.01, 0.5, 1.5]
    r = torch.tensor(ratios, dtype=torch.float64, requires_grad=True)
    loss = ppo.train.clipped_surrogate(r, torch.full_like(r, A), clip_coef=eps)
    loss.sum().backward()
    for i, ratio in enumerate(ratios):
        value, grad = surrogate_written_out(ratio, A, eps)
        assert loss[i].item() == pytest.approx(value, abs=1e-12), ratio
        assert r.grad[i].item() == pytest.approx(grad, abs=1e-12), ratio
    # the clipped side: A > 0 stops pulling above 1 + eps, A < 0 below 1 - eps
    assert r.grad[4 if A > 0 else 0].item() == 0.0 and r.grad[0 if A > 0 else 4].item() == -A


def test_value_loss_against_the_formula():
    new, old, ret = [1.0, 2.0, -0.5, 0.5], [0.8, 1.0, 0.0, 0.0], [1.5, 0.0, 1.0, 1.0]
    eps = 0.2
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    unclipped = 0.5 * sum((v - R) ** 2 for v, R in zip(new, ret)) / 4  # L^VF = (V - V^targ)^2 / 2
    assert ppo.train.value_loss(t(new), t(old), t(ret), eps, clip=False).item() == pytest.approx(unclipped)
    # clipped: V_old + clip(V - V_old, -eps, eps) = 1.0, 1.2, -0.2, 0.2; the larger of the two squares per sample
    terms = [max((v - R) ** 2, (o + min(max(v - o, -eps), eps) - R) ** 2) for v, o, R in zip(new, old, ret)]
    assert terms == pytest.approx([0.25, 4.0, 2.25, 0.64])  # the last one: the clipped square is the larger
    assert ppo.train.value_loss(t(new), t(old), t(ret), eps, clip=True).item() == pytest.approx(0.5 * sum(terms) / 4)


def test_advantage_normalisation_loss_and_lr_annealing_against_numbers():
    adv = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, sample std sqrt(14 / 3)
    expected = [(a - 3.0) / (math.sqrt(14 / 3) + 1e-8) for a in [1.0, 2.0, 3.0, 6.0]]
    assert ppo.train.normalize_advantages(adv).tolist() == pytest.approx(expected)
    # -L^{CLIP+VF+S} = -L^CLIP + c1 L^VF - c2 S: 0.3 + 0.7 * 2 - 0.03 * 0.5
    assert ppo.train.ppo_loss(0.3, 2.0, 0.5, vf_coef=0.7, ent_coef=0.03) == pytest.approx(1.685)
    # linear to 0 over 4 iterations, and constant without annealing
    assert [ppo.train.annealed_lr(1e-3, i, 4, True) for i in range(4)] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert [ppo.train.annealed_lr(1e-3, i, 4, False) for i in range(4)] == [1e-3] * 4


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


def test_categorical_log_prob_and_entropy_match_torch_distributions_and_the_sums():
    torch.manual_seed(0)
    agent = ppo.model.Agent(obs_dim=4, n_actions=3, continuous=False)
    with torch.no_grad():  # a policy far from uniform, so that a wrong entropy shows
        agent.actor[-1].weight.mul_(300)
    obs, a = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    _, logp, ent, value = agent.get_action_and_value(obs, a)
    logits = agent.actor(obs)
    p = logits.softmax(-1)
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))  # S = -sum_a pi(a|s) log pi(a|s)
    torch.testing.assert_close(ent, Categorical(logits=logits).entropy())
    torch.testing.assert_close(logp, p.log()[torch.arange(6), a])
    torch.testing.assert_close(value, agent.critic(obs)[:, 0])
    assert ent.min() < 0.9 * math.log(3)  # not all uniform


@pytest.mark.parametrize("flags", [[], ["--no-norm-adv", "--no-anneal-lr"]], ids=["defaults", "no-norm-no-anneal"])
def test_the_flags_reach_the_math_inside_a_real_update(flags, tmp_path, monkeypatch):
    """Spies on the math functions during a real run: the flags' values reach them, the first
    minibatch's ratio is 1 (pi_theta = pi_old before any step), the advantages are the GAE ones
    (normalised or not), and each Adam step uses the annealed learning rate."""
    calls = {name: [] for name in ["gae", "surrogate", "value", "loss", "normalize"]}

    def spy(name, fn):
        def wrapper(*args, **kw):
            out = fn(*args, **kw)
            calls[name].append((args, kw, out))
            return out
        monkeypatch.setattr(ppo.train, fn.__name__, wrapper)

    for name, fn in [("gae", ppo.train.compute_gae), ("surrogate", ppo.train.clipped_surrogate),
                     ("value", ppo.train.value_loss), ("loss", ppo.train.ppo_loss),
                     ("normalize", ppo.train.normalize_advantages)]:
        spy(name, fn)
    logps, act = [], ppo.model.Agent.get_action_and_value

    def get_action_and_value(self, obs, action=None, greedy=False):
        out = act(self, obs, action, greedy)
        if not greedy:  # the rollout (no action given) and the updates (the rollout's actions scored)
            logps.append((action is None, out[1].detach()))
        return out

    monkeypatch.setattr(ppo.model.Agent, "get_action_and_value", get_action_and_value)
    lrs, step = [], torch.optim.Adam.step

    def adam_step(self, *args, **kw):
        lrs.append(self.param_groups[0]["lr"])
        return step(self, *args, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", adam_step)
    ppo.train.train(ppo.main.parse_args([
        "--num-envs", "2", "--num-steps", "8", "--num-minibatches", "2", "--update-epochs", "2",
        "--total-timesteps", "64", "--lr", "1e-3", "--gamma", "0.9", "--gae-lambda", "0.7", "--clip-coef", "0.15",
        "--ent-coef", "0.03", "--vf-coef", "0.7", "--clip-vloss", "--eval-episodes", "1", "--out-dir", str(tmp_path),
        *flags]))
    iterations, updates = 4, 2 * 2  # 64 / (2 x 8) rollouts; 2 epochs of 2 minibatches each
    assert [c[0][5:] for c in calls["gae"]] == [(0.9, 0.7)] * iterations  # gamma, lambda
    assert len(calls["surrogate"]) == len(calls["value"]) == len(calls["loss"]) == iterations * updates
    for (ratio, adv, eps), _, _ in calls["surrogate"]:
        assert eps == 0.15
    for args, kw, _ in calls["value"]:
        assert args[3:] == (0.15, True)  # clip_coef, --clip-vloss
    for args, kw, _ in calls["loss"]:
        assert args[3:] == (0.7, 0.03)  # c1, c2
    for i in range(iterations):  # each rollout's first minibatch: the policy has not moved yet
        torch.testing.assert_close(calls["surrogate"][i * updates][0][0], torch.ones(8), atol=1e-6, rtol=0)
    # r_t = pi_theta / pi_theta_old: log pi_theta - log r_t must be log-probabilities the rollout recorded
    old = torch.cat([logp for rollout, logp in logps if rollout])
    new = [logp for rollout, logp in logps if not rollout]
    assert len(new) == len(calls["surrogate"])
    for new_logp, ((ratio, _, _), _, _) in zip(new, calls["surrogate"]):
        implied_old = new_logp - ratio.detach().log()
        assert torch.isclose(implied_old[:, None], old[None, :], atol=1e-5).any(1).all()
    gae_adv = torch.cat([out[0].flatten() for _, _, out in calls["gae"]])
    for (_, adv, _), _, _ in calls["surrogate"]:
        if flags:  # --no-norm-adv: the GAE advantages themselves
            assert torch.isin(adv, gae_adv).all()
        else:  # normalised per minibatch: mean 0, sample std 1
            assert abs(adv.mean()) < 1e-5 and abs(adv.std() - 1) < 1e-5
    assert len(calls["normalize"]) == (0 if flags else iterations * updates)
    anneal = [1e-3] * 4 if flags else [1e-3, 7.5e-4, 5e-4, 2.5e-4]  # linear to 0 over the 4 iterations
    assert lrs == pytest.approx([lr for lr in anneal for _ in range(updates)])


def test_orthogonal_initialisation_with_a_small_last_actor_layer():
    torch.manual_seed(0)
    agent = ppo.model.Agent(obs_dim=4, n_actions=3, continuous=False)
    for net, last_std in [(agent.critic, 1.0), (agent.actor, 0.01)]:
        first, hidden, last = net[0].weight, net[2].weight, net[4].weight  # (64, 4), (64, 64), (out, 64)
        # orthogonal with gain g: the narrower side's Gram matrix is g^2 I
        torch.testing.assert_close(first.T @ first, 2.0 * torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close(hidden @ hidden.T, 2.0 * torch.eye(64), atol=1e-5, rtol=0)
        torch.testing.assert_close(last @ last.T, last_std ** 2 * torch.eye(last.size(0)), atol=1e-6, rtol=0)
        assert all(torch.all(net[i].bias == 0) for i in (0, 2, 4))


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


def one_line_error(capsys, argv, *words):
    """main(argv), in this process, stops with one line (SystemExit's message, or argparse's on stderr)
    naming the words; any other exception fails the test as a traceback would."""
    with pytest.raises(SystemExit) as e:
        ppo.main.main(argv)
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    assert len(text.strip().splitlines()) == 1, text
    assert all(w in text for w in words), text


def test_unknown_env_id_is_a_clear_error(tmp_path, capsys):
    one_line_error(capsys, ["--env-id", "NoSuchEnv-v9", "--out-dir", str(tmp_path)], "NoSuchEnv-v9")
    one_line_error(capsys, ["--env-id", "nosuchmodule:Env-v0", "--out-dir", str(tmp_path)], "nosuchmodule")


@pytest.mark.parametrize("args, words", [
    (["--num-minibatches", "256"], ["minibatches of 2"]),  # CartPole preset: a batch of 256
    (["--gamma", "1.5"], ["--gamma"]),
    (["--clip-coef", "-0.2"], ["--clip-coef"]),
])
def test_bad_hyperparameters_are_clear_errors(args, words, capsys):
    one_line_error(capsys, args, *words)


def test_unsupported_action_space_is_a_clear_error():
    class MultiBinaryEnv(gym.Env):
        observation_space = gym.spaces.Box(-1, 1, (2,))
        action_space = gym.spaces.MultiBinary(3)

    gym.register("MultiBinaryToy-v1", entry_point=MultiBinaryEnv)
    with pytest.raises(SystemExit, match="MultiBinary action space"):
        ppo.train.make_env("MultiBinaryToy-v1")


def test_checkpoint_of_another_env_is_refused(tmp_path, capsys):
    torch.save({"folder": "ppo", "env_id": "CartPole-v1"}, tmp_path / "ckpt.pt")
    one_line_error(capsys, ["--sample-only", "--env-id", "Acrobot-v1", "--out-dir", str(tmp_path)],
                   "CartPole-v1", "Acrobot-v1")


def test_checkpoint_of_another_folder_is_refused(tmp_path, capsys):
    torch.save({"folder": "gpt"}, tmp_path / "ckpt.pt")
    one_line_error(capsys, ["--sample-only", "--out-dir", str(tmp_path)], "gpt", "not of ppo/")


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


def test_benchmark_json_against_the_parameters_and_flops_written_out(tmp_path, capsys):
    ppo.main.main(["--benchmark", "--quick", "--device", "cpu", "--benchmark-steps", "2",
                   "--out-dir", str(tmp_path / "run")])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not (tmp_path / "run").exists()  # nothing written
    O, A, K, N, T = 4, 2, 20, 8, 32  # CartPole-v1 and its preset (--quick changes only the run's length)
    mlp = lambda out: (O * 64 + 64) + (64 * 64 + 64) + (64 * out + out)
    assert r["params"] == mlp(A) + mlp(1)
    assert (r["folder"], r["unit"], r["batch_size"], r["data"], r["mfu"]) == ("ppo", "env_steps", N * T, "real", None)
    # per env step: one forward of both nets in the rollout, the critic for V(s_{t+1}), K x (forward + backward)
    agent = ppo.model.Agent(O, A, continuous=False)
    with FlopCounterMode(display=False) as fc:
        agent.get_action_and_value(torch.randn(16, O))
    both, critic = fc.get_total_flops() / 16, 2 * (O * 64 + 64 * 64 + 64)
    assert both == critic + 2 * (O * 64 + 64 * 64 + 64 * A)
    assert r["flops_per_sample"] == (1 + 3 * K) * both + critic
    assert r["samples_per_s"] == pytest.approx(r["batch_size"] / (r["step_ms"] / 1e3), rel=1e-9)
    assert r["tflops"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 1e12, rel=1e-9)
    assert r["peak_mem_mb"] > 0 and r["torch"] == torch.__version__ and r["compile"] is False


# ---- the shipped agents (pretrained/ppo/)

@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_the_shipped_agents_load_into_todays_code_and_reproduce_their_check(env_id):
    env = ppo.train.make_env(env_id)
    agent = ppo.train.agent_for(env.observation_space, env.action_space)
    normalizer = ppo.train.Normalizer(env.observation_space.shape[0], 1, 0.99, enabled=env_id == "Pendulum-v1")
    env.close()
    card = ppo.pretrained.load_pretrained(agent, normalizer, env_id)
    check, obs_dim = card["check"], env.observation_space.shape[0]
    obs = torch.randn(8, obs_dim, generator=torch.Generator().manual_seed(0))  # the card's fixed input
    with torch.no_grad():
        out, value = agent.actor(obs), agent.critic(obs)[:, 0]
    assert check["shape"] == [8, obs_dim]
    assert out.sum().item() == pytest.approx(check["actor_sum"], rel=1e-4, abs=1e-4)
    assert out.abs().sum().item() == pytest.approx(check["actor_abs_sum"], rel=1e-4)
    assert value.sum().item() == pytest.approx(check["value_sum"], rel=1e-4)
    greedy = out.argmax(-1) if env_id == "CartPole-v1" else out  # arg max, or the Gaussian mean
    torch.testing.assert_close(greedy, torch.tensor(check["greedy_actions"], dtype=greedy.dtype), rtol=1e-4, atol=1e-5)
    if env_id == "CartPole-v1":  # and it balances the pole for a whole fresh episode
        assert ppo.train.evaluate(agent, env_id, normalizer, 1, 7, "cpu") == 500.0


def test_a_tampered_or_unlisted_shipped_file_is_a_one_line_error_naming_it(tmp_path, monkeypatch, capsys):
    root = shipped_copy("ppo", tmp_path)
    monkeypatch.setattr(ppo.pretrained, "ROOT", root)
    flip_bit(root / "ppo" / "cartpole.safetensors", at=-1)
    argv = ["--sample-only", "--pretrained", "--out-dir", str(tmp_path / "out")]
    one_line_error(capsys, argv, "pretrained/ppo/cartpole.safetensors", "SHA256SUMS", "git checkout")
    unlist(root, "ppo/cartpole.json")  # a file the manifest does not list is refused the same way
    one_line_error(capsys, argv, "pretrained/ppo/cartpole.json", "SHA256SUMS")
    assert not (tmp_path / "out").exists()


def test_fine_tuning_starts_from_the_shipped_agent(tmp_path):
    """--pretrained without --sample-only trains on from the shipped weights: after one iteration at a
    tiny learning rate the agent still balances the pole (a fresh one falls within ~30 steps)."""
    result = ppo.train.train(ppo.main.parse_args(["--pretrained", "--total-timesteps", "256", "--lr", "1e-12",
                                                  "--eval-episodes", "1", "--out-dir", str(tmp_path)]))
    shipped, _ = ppo.pretrained.pretrained_weights("CartPole-v1")
    for k, v in result["agent"].state_dict().items():
        torch.testing.assert_close(v, shipped[k], atol=1e-6, rtol=0)
    assert result["greedy_return"] == 500.0


def test_export_writes_weights_card_and_manifest_line_that_load_back(tmp_path, monkeypatch):
    run = tmp_path / "run"
    ppo.main.main(["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
                   "--update-epochs", "1", "--total-timesteps", "128", "--eval-episodes", "1", "--gif-steps", "2",
                   "--lr", "1e-3", "--out-dir", str(run)])
    monkeypatch.setattr(ppo.pretrained, "ROOT", tmp_path / "pretrained")
    ppo.main.main(["--export-pretrained", str(run)])
    card = ppo.pretrained.pretrained_card("Pendulum-v1")  # passes the sha256 check of the fresh manifest line
    assert card["command"] == ("python ppo/main.py --total-timesteps 128 --lr 0.001 --env-id Pendulum-v1 --num-envs 2 "
                               "--num-steps 64 --update-epochs 1 --num-minibatches 2")  # the training flags typed
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    weights, stats = ppo.pretrained.pretrained_weights("Pendulum-v1")
    for k, v in ckpt["agent"].items():
        assert torch.equal(weights[k], v), k  # float32: exact
    assert stats["obs_rms"]["mean"] == pytest.approx(ckpt["normalizer"]["obs_rms"]["mean"])
    assert card["config"]["normalize"] is True and card["training"]["env_steps"] == 128
