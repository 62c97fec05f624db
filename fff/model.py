"""Fast Feedforward Networks (Belcak & Wattenhofer 2023), Algorithm 1, and the dense
feedforward baseline they are measured against.

An FFF of depth d is a balanced binary tree: 2^d - 1 node neurons N_{m,n} decide, and
2^d leaves N_{d,n} are small feedforward networks <dim_I, l, dim_O>. Nodes are stored
breadth-first: node (m, n) has index 2^m - 1 + n, its children (m+1, 2n) and (m+1, 2n+1)
have indices 2i + 1 and 2i + 2, and leaf n's binary digits are its path (1 = right).

Shapes: B samples, I = dim_I, O = dim_O, L = 2^d leaves of width l (`leaf_width`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

MODES = ("soft", "hard")
MAX_DEPTH = 20  # 2^20 leaves: beyond this the parameter count alone is absurd for one layer


def uniform_(t, fan_in):
    bound = 1 / math.sqrt(fan_in)  # nn.Linear's default range
    return nn.init.uniform_(t, -bound, bound)


def binary_entropy(c, eps=1e-6):
    """H(c) = -c log c - (1 - c) log(1 - c), in nats; c clamped away from 0 and 1."""
    c = c.clamp(eps, 1 - eps)
    return -(c * c.log() + (1 - c) * (1 - c).log())


class FFF(nn.Module):
    def __init__(self, in_dim, leaf_width, out_dim, depth):
        super().__init__()
        if not 1 <= depth <= MAX_DEPTH:
            raise ValueError(f"depth {depth} is outside 1..{MAX_DEPTH}")
        self.depth, self.n_nodes, self.n_leaves = depth, 2 ** depth - 1, 2 ** depth
        L, I, l, O = self.n_leaves, in_dim, leaf_width, out_dim
        # Node neurons N_{m,n} = <dim_I, 1, 1> with a sigmoid: one hyperplane w.x + b each.
        self.node_weights = nn.Parameter(uniform_(torch.empty(self.n_nodes, I), I))
        self.node_biases = nn.Parameter(uniform_(torch.empty(self.n_nodes), I))
        # Leaves N_{d,n} = <dim_I, l, dim_O>: Linear(I, l) -> ReLU -> Linear(l, O), one per leaf.
        self.w1 = nn.Parameter(uniform_(torch.empty(L, I, l), I))
        self.b1 = nn.Parameter(uniform_(torch.empty(L, l), I))
        self.w2 = nn.Parameter(uniform_(torch.empty(L, l, O), l))
        self.b2 = nn.Parameter(uniform_(torch.empty(L, O), l))

    def forward(self, x, mode="soft", leak=0.0):
        """x (B, I) -> (y (B, O), per-sample node entropies (B, n_nodes) or None in hard mode)."""
        if mode == "soft":
            return self.forward_soft(x, leak)
        if mode == "hard":
            return self.forward_hard(x), None
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")

    def forward_soft(self, x, leak=0.0):
        """FORWARD_T: every leaf, mixed by its path probability. In training, `leak` is the
        probability of a randomized child transposition (the paper's remedy for overfragmentation):
        a node's <1 - c, c> is swapped to <c, 1 - c> for that sample."""
        # c_{m,n}(x) = sigmoid(N_{m,n}(x)) for all nodes at once
        c = torch.sigmoid(x @ self.node_weights.T + self.node_biases)          # (B, n_nodes)
        H = binary_entropy(c)
        if leak > 0 and self.training:
            c = torch.where(torch.rand_like(c) < leak, 1 - c, c)
        p = self.path_probabilities(c)                                           # (B, L)
        # All leaves on all samples: the cost of a dense layer of width L * l.
        h = F.relu(torch.einsum("bi,lih->blh", x, self.w1) + self.b1)          # (B, L, l)
        y_leaves = torch.einsum("blh,lho->blo", h, self.w2) + self.b2            # (B, L, O)
        y = torch.einsum("bl,blo->bo", p, y_leaves)                              # (B, O)
        return y, H

    def path_probabilities(self, c):
        """F_{m,n} = c_{m,n} F_{m+1,2n+1} + (1 - c_{m,n}) F_{m+1,2n}, unrolled: each level splits
        every path's probability in two, (1 - c) to the left child, c to the right. (B, n_nodes) -> (B, L)"""
        p = c.new_ones(c.shape[0], 1)                                            # (B, 1): the root
        for m in range(self.depth):
            c_m = c[:, 2 ** m - 1:2 ** (m + 1) - 1]                              # (B, 2^m): level m
            p = rearrange(torch.stack([p * (1 - c_m), p * c_m], dim=-1), "b n two -> b (n two)")
        return p

    def route(self, x):
        """FORWARD_I's descent: at each level go right iff c_{m,n}(x) >= 1/2, i.e. w.x + b >= 0.
        Batched over samples; each sample reads only the d node rows on its path. -> leaf (B,)"""
        node = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        for _ in range(self.depth):
            w, b = self.node_weights[node], self.node_biases[node]               # (B, I), (B,): one row each
            logit = torch.linalg.vecdot(w, x) + b                                # (B,)
            node = 2 * node + 1 + (logit >= 0)                                   # left child 2i+1, right 2i+2
        return node - self.n_nodes

    def forward_hard(self, x):
        """FORWARD_I: one leaf per sample. Samples are grouped by the leaf they reached, and each
        group is one matmul with that leaf's weights: a loop over leaves in use, not over samples."""
        leaf = self.route(x)                                                     # (B,)
        y = x.new_empty(x.shape[0], self.w2.shape[2])                            # (B, O)
        order = leaf.argsort()
        leaves, counts = torch.unique_consecutive(leaf[order], return_counts=True)
        for n, idx in zip(leaves.tolist(), order.split(counts.tolist())):
            h = F.relu(torch.addmm(self.b1[n], x[idx], self.w1[n]))              # (B_n, l)
            y[idx] = torch.addmm(self.b2[n], h, self.w2[n])                      # (B_n, O)
        return y

    def inference_flops(self):
        """Multiply-adds per sample in hard mode: d node neurons and one leaf."""
        I, l, O = self.w1.shape[1], self.w1.shape[2], self.w2.shape[2]
        return self.depth * I + I * l + l * O


class FF(nn.Module):
    """The dense baseline <dim_I, w, dim_O>: Linear -> ReLU -> Linear."""

    def __init__(self, in_dim, width, out_dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, width), nn.Linear(width, out_dim)

    def forward(self, x, mode=None):
        return self.fc2(F.relu(self.fc1(x))), None

    def inference_flops(self):
        return self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features


def build(name, cfg):
    """The FFF or a baseline of §4 by name; cfg: in_dim, leaf_width, out_dim, depth (the FFF's sizes; the
    dense layer of equal training width is l 2^d wide, the one of equal inference width l)."""
    I, l, O, d = cfg["in_dim"], cfg["leaf_width"], cfg["out_dim"], cfg["depth"]
    return {"fff": lambda: FFF(I, l, O, d), "ff_train": lambda: FF(I, l * 2 ** d, O),
            "ff_infer": lambda: FF(I, l, O)}[name]()
