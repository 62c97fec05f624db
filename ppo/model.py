"""Actor and critic (Schulman et al. 2017, section 6.1: separate networks, no shared trunk),
two tanh layers of 64 as in the paper's MuJoCo experiments.

Shapes: B batch, O observation size, A number of actions (discrete) or action dimensions (continuous).
"""
import math

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical


def layer_init(layer, std=math.sqrt(2), bias=0.0):
    """Implementation detail: orthogonal weights with scale sqrt(2), zero biases."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


def mlp(in_dim, out_dim, out_std):
    return nn.Sequential(layer_init(nn.Linear(in_dim, 64)), nn.Tanh(),
                         layer_init(nn.Linear(64, 64)), nn.Tanh(),
                         layer_init(nn.Linear(64, out_dim), std=out_std))


def gaussian_log_prob(a, mean, log_std):
    """log pi(a|s) of a diagonal Gaussian, summed over action dimensions: (B, A) -> (B,)."""
    return (-0.5 * ((a - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_entropy(log_std):
    """Entropy of a diagonal Gaussian: sum over dimensions of 1/2 log(2 pi e sigma^2)."""
    return (0.5 + 0.5 * math.log(2 * math.pi) + log_std).sum(-1)


class Agent(nn.Module):
    def __init__(self, obs_dim, n_actions, continuous):
        super().__init__()
        self.continuous = continuous
        self.critic = mlp(obs_dim, 1, out_std=1.0)  # V(s)
        # Small last-layer init: the initial policy is near uniform / near zero mean.
        self.actor = mlp(obs_dim, n_actions, out_std=0.01)  # logits, or the Gaussian mean
        if continuous:
            self.log_std = nn.Parameter(torch.zeros(n_actions))  # state-independent sigma

    def get_value(self, obs):
        return self.critic(obs).squeeze(-1)  # (B, O) -> (B,)

    def get_action_and_value(self, obs, action=None, greedy=False):
        """Sample (or score) actions: returns action, log pi(a|s), entropy S[pi](s), V(s)."""
        out = self.actor(obs)
        if self.continuous:
            log_std = self.log_std.expand_as(out)
            if action is None:
                action = out if greedy else out + log_std.exp() * torch.randn_like(out)
            logp, entropy = gaussian_log_prob(action, out, log_std), gaussian_entropy(log_std)
        else:
            dist = Categorical(logits=out)
            if action is None:
                action = out.argmax(-1) if greedy else dist.sample()
            logp, entropy = dist.log_prob(action), dist.entropy()
        return action, logp, entropy, self.get_value(obs)


class RunningMeanStd:
    """Running mean and variance over batches (Chan et al.), for observation and reward scaling."""

    def __init__(self, shape=()):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4

    def update(self, x):
        b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / total
        self.var = (self.var * self.count + b_var * b_count + delta ** 2 * self.count * b_count / total) / total
        self.count = total

    def state_dict(self):
        return {"mean": self.mean.tolist(), "var": self.var.tolist(), "count": self.count}

    def load_state_dict(self, d):
        self.mean, self.var, self.count = np.array(d["mean"]), np.array(d["var"]), d["count"]
