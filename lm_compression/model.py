"""The byte model: the paper's own kind of predictor (Sec. 3), a decoder-only Transformer over bytes
(256 symbols, plus a start symbol as the first input), pre-LayerNorm blocks, with a KV cache so that
each coded byte costs one position. Trained in float (train.py); coded through the integer path
(intmodel.py) or in float (predictors.py). Shapes: B chunks side by side, T positions, C width.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

BOS = 256                  # the start symbol: the first byte of a chunk is predicted from it alone


@dataclass
class ByteConfig:
    context: int = 512     # bytes per chunk: each chunk is coded with a fresh context
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x, past=None):                # x (B, T, C); past: cached (k, v), (B, nh, T_past, hs)
        q, k, v = rearrange(self.qkv(x), "b t (three nh hs) -> three b nh t hs", three=3, nh=self.n_head)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        # causal: with a cache of T_past positions, query i sees keys 0 .. T_past + i
        mask = None if q.size(2) == k.size(2) else torch.ones(q.size(2), k.size(2), dtype=torch.bool,
                                                              device=x.device).tril(k.size(2) - q.size(2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(y, "b nh t hs -> b t (nh hs)")), (k, v)


class Block(nn.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)), the MLP 4C wide with GELU."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = SelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x, past=None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class ByteTransformer(nn.Module):
    def __init__(self, cfg: ByteConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(257, cfg.n_embd)     # 256 bytes and BOS
        self.pos = nn.Embedding(cfg.context, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, 256, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():      # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, past=None):
        """idx (B, T) of symbols 0..256 -> logits (B, T, 256) of the next byte, and the new cache."""
        start = 0 if past is None else past[0][0].size(2)
        x = self.drop(self.tok(idx) + self.pos(torch.arange(start, start + idx.size(1), device=idx.device)))
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, None if past is None else past[i])
            presents.append(present)
        return self.head(self.ln_f(x)), presents

    def num_params(self):
        return sum(p.numel() for p in self.parameters())
