"""The Vision Transformer of Dosovitskiy et al. (2021), equations 1-4 and Appendix A
(multi-head self-attention), in the order an image meets them:
(with --stem-channels, the hybrid's CNN stem ->) patches -> embedding (+ class token, + positions)
-> L pre-LN encoder blocks -> head.

Shapes: B images, C channels, H x W pixels, P patch side, N = HW / P^2 patches,
D model width, k heads, D_h = D / k per head, S channels of the hybrid's stem.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class ViTConfig:
    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    dim: int = 64          # D
    depth: int = 6         # L
    heads: int = 4         # k
    mlp_dim: int = 128     # hidden width of the MLP in each block
    num_classes: int = 10
    dropout: float = 0.0
    stem_channels: int = 0  # S: 0 patches the pixels; S > 0 the feature map of a CNN stem (the hybrid, §3.1)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not divisible by patch size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"width {self.dim} is not divisible by {self.heads} heads")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_channels(self):
        """Channels of what is cut into patches: the image's C, or the stem's S."""
        return self.stem_channels or self.channels


def cnn_stem(cfg):
    """Section 3.1, "Hybrid Architecture": "the input sequence can be formed from feature maps of a CNN".
    Two 3x3 convolutions at full resolution (C -> S -> S), each followed by GELU, (B, C, H, W) -> (B, S, H, W);
    no normalisation layer (the weights' EMA averages parameters only). S = 0: the identity, no parameters."""
    if not cfg.stem_channels:
        return nn.Identity()
    S = cfg.stem_channels
    return nn.Sequential(nn.Conv2d(cfg.channels, S, 3, padding=1), nn.GELU(), nn.Conv2d(S, S, 3, padding=1), nn.GELU())


def patchify(x, P):
    """(B, C, H, W) -> (B, N, P*P*C): the sequence of flattened patches x_p of Section 3.1."""
    return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=P, p2=P)


def unpatchify(x_p, P, C):
    """(B, N, P*P*C) -> (B, C, H, W), the inverse of patchify (square images)."""
    h = math.isqrt(x_p.shape[1])
    return rearrange(x_p, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=P, p2=P, c=C)


class MultiHeadSelfAttention(nn.Module):
    """Appendix A, equations 5-8."""

    def __init__(self, cfg):
        super().__init__()
        self.heads = cfg.heads
        self.U_qkv = nn.Linear(cfg.dim, 3 * cfg.dim)   # k heads' U_qkv in R^{D x 3D_h}, side by side
        self.U_msa = nn.Linear(cfg.dim, cfg.dim)       # U_msa in R^{k D_h x D}
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, z):                                               # z: (B, N+1, D)
        # (5) [q, k, v] = z U_qkv, split into k heads of width D_h
        q, k, v = rearrange(self.U_qkv(z), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        # (6) A = softmax(q k^T / sqrt(D_h)), one (N+1) x (N+1) map per head; rows sum to 1
        A = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)  # (B, k, N+1, N+1)
        # (7) SA(z) = A v, per head
        sa = self.dropout(A) @ v                                        # (B, k, N+1, D_h)
        # (8) MSA(z) = [SA_1(z); ...; SA_k(z)] U_msa
        return self.U_msa(rearrange(sa, "b h n d -> b n (h d)")), A


class MLP(nn.Module):
    """"The MLP contains two layers with a GELU non-linearity" (Section 3.1)."""

    def __init__(self, cfg):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.mlp_dim), nn.Linear(cfg.mlp_dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, z):
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(z)))))


class Block(nn.Module):
    """One pre-LN encoder layer: Layernorm before every block, residual after it."""

    def __init__(self, cfg):
        super().__init__()
        self.ln1, self.msa = nn.LayerNorm(cfg.dim), MultiHeadSelfAttention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg)

    def forward(self, z):
        a, A = self.msa(self.ln1(z))
        z = a + z                          # (2) z'_l = MSA(LN(z_{l-1})) + z_{l-1}
        z = self.mlp(self.ln2(z)) + z      # (3) z_l  = MLP(LN(z'_l)) + z'_l
        return z, A


class ViT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.stem = cnn_stem(cfg)                                                 # the hybrid's CNN, or identity
        self.E = nn.Linear(cfg.patch_size ** 2 * cfg.patch_channels, cfg.dim)    # E in R^{(P^2 C) x D}; C = S if hybrid
        self.x_class = nn.Parameter(torch.zeros(1, 1, cfg.dim))                  # learnable [class] token
        self.E_pos = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim) * 0.02)  # 1D learned positions
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.ln = nn.LayerNorm(cfg.dim)
        # Classification head: "a MLP with one hidden layer at pre-training time" (Section 3.1);
        # training from scratch is pre-training, so tanh hidden layer then logits.
        self.head = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.Tanh(), nn.Linear(cfg.dim, cfg.num_classes))
        self.apply(self._init_weights)
        nn.init.zeros_(self.head[-1].weight)  # the authors' code starts the classifier at zero

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            # Xavier-uniform weights and zero biases, as in the authors' JAX code; on small data this
            # trains several times faster at the start than the N(0, 0.02) of BERT-style code.
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            # The stem: Kaiming-normal (He et al. 2015: fan-in, ReLU gain; GELU is ReLU-like), zero biases, so that
            # normalised pixels (second moment 1) leave the stem with a second moment of about 0.8 and E sees features on the raw
            # patches' scale; PyTorch's default (kaiming-uniform, a = sqrt(5)) would leave them at about 0.01.
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def embed(self, x):                                       # x: (B, C, H, W)
        x_p = patchify(self.stem(x), self.cfg.patch_size)     # (B, N, P^2 C), or (B, N, P^2 S) from the stem
        x_class = self.x_class.expand(x.shape[0], -1, -1)     # (B, 1, D)
        # (1) z_0 = [x_class; x_p^1 E; x_p^2 E; ...; x_p^N E] + E_pos
        z0 = torch.cat([x_class, self.E(x_p)], dim=1) + self.E_pos
        return self.dropout(z0)                               # (B, N+1, D)

    def encode(self, z):
        """The L encoder layers; returns z_L (B, N+1, D) and each layer's attention (B, k, N+1, N+1)."""
        attentions = []
        for block in self.blocks:
            z, A = block(z)
            attentions.append(A)
        return z, attentions

    def forward(self, x, return_attention=False):
        z_L, attentions = self.encode(self.embed(x))
        y = self.ln(z_L[:, 0])                                # (4) y = LN(z_L^0), the class token's output
        logits = self.head(y)                                 # (B, num_classes)
        return (logits, attentions) if return_attention else logits

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


@torch.no_grad()
def attention_rollout(attentions):
    """Attention rollout (Abnar & Zuidema 2020), as in the paper's Appendix D.8: average the heads,
    add the identity for the residual path, renormalise rows, multiply through the layers.
    Returns how much the class token draws on each patch: (B, N), rows summing to 1 over patches+class."""
    B, _, T, _ = attentions[0].shape
    R = torch.eye(T, device=attentions[0].device).expand(B, T, T)
    for A in attentions:
        A = A.mean(dim=1) + torch.eye(T, device=A.device)     # (B, T, T)
        A = A / A.sum(dim=-1, keepdim=True)
        R = A @ R
    return R[:, 0, 1:]                                        # class token's row, patches only
