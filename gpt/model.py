"""A decoder-only Transformer (Vaswani et al. 2017) with GPT-2's pre-LayerNorm
block (Radford et al. 2019), in the order the data meets it:
CausalSelfAttention -> MLP -> Block -> GPTConfig -> GPT.

Shapes: B batch, T time (characters), C = n_embd channels, nh heads, hs = C / nh.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # W^Q, W^K, W^V of all heads at once
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)      # W^O
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, past=None):
        # x (B, T, C); past: this layer's cached (k, v), each (B, nh, T_past, hs), or None
        q, k, v = rearrange(self.c_attn(x), "b t (three nh hs) -> three b nh t hs",
                            three=3, nh=self.n_head)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        T, L = q.size(2), k.size(2)
        # Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V, each query seeing only keys at or
        # before its own position: with a cache, query i sits at position L - T + i.
        mask = None if T == L else torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = rearrange(y, "b nh t hs -> b t (nh hs)")  # Concat(head_1, ..., head_h)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    """FFN(x) = GELU(x W_1 + b_1) W_2 + b_2, inner width 4C."""

    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """GPT-2's pre-LN residual block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, past=None):
        a, present = self.attn(self.ln_1(x), past)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, present


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 256  # context length T
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # token embedding
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)  # learned position embedding
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017; the paper's section 3.4): one matrix embeds and unembeds.
        self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the init of layers that write into the residual stream by 1/sqrt(2 n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        """Parameters, without the position embedding (as GPT-2 counts them)."""
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls, plus 12 L T C for attention
        (PaLM appendix B)."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd

    def forward(self, idx, targets=None, cache=None):
        # idx (B, T) token ids; targets (B, T) or None.
        # cache: a list with one (k, v) or None per layer, filled in place: pass it to decode
        # token by token without recomputing the prefix.
        T = idx.size(1)
        past = cache[0][0].size(2) if cache and cache[0] is not None else 0
        assert past + T <= self.cfg.block_size, f"context {past + T} > block_size {self.cfg.block_size}"
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for i, block in enumerate(self.h):
            x, present = block(x, cache[i] if cache else None)
            if cache is not None:
                cache[i] = present
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def configure_optimizers(self, weight_decay, lr, betas):
        # Weight decay on matrices (Linear weights, embeddings) only; biases and LayerNorm
        # gains stay undecayed (the tied wte/lm_head matrix is listed once).
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused: one kernel for the whole update (on CPU too, where it was 3-4x faster than the loop)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sample max_new_tokens after idx (B, T) with a KV cache: each new token costs one
        position, not a recomputation of the whole context."""
        cache, feed = [None] * self.cfg.n_layer, idx[:, -self.cfg.block_size:]
        for _ in range(max_new_tokens):
            if cache[0] is not None and cache[0][0].size(2) == self.cfg.block_size:
                # Context full: positions are absolute, so restart the cache from the last
                # half-context (a window slid every step would recompute all of it each token).
                cache, feed = [None] * self.cfg.n_layer, idx[:, -max(1, self.cfg.block_size // 2):]
            logits, _ = self(feed, cache=cache)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            feed = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat([idx, feed], dim=1)
        return idx
