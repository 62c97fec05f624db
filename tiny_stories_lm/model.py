"""Steps 2 and 3 of the lesson: two next-token predictors with the same interface,
forward(idx, targets=None, cache=None) -> (logits, loss).

BagOfEmbeddings: the mean of the last `context` tokens' embeddings through an MLP. It has no
attention and no positions, so it cannot know the order of its context: its samples stay word salad.

Transformer: a decoder-only Transformer (Vaswani et al. 2017) in the llama style that TinyStories
models use: pre-norm blocks with RMSNorm (Zhang & Sennrich 2019) or LayerNorm, rotary position
embeddings (RoPE, Su et al. 2021) or learned ones, causal attention through
scaled_dot_product_attention, a KV cache for sampling.

Shapes: B batch, T time (tokens), C = n_embd channels, nh heads, hs = C / nh, V vocabulary.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class Config:
    vocab_size: int
    model: str = "transformer"  # or "bag"
    block_size: int = 256       # training and evaluation sequence length T; the Transformer's context
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.1
    pos: str = "rope"           # or "learned"
    norm: str = "rmsnorm"       # or "layernorm"
    context: int = 16           # bag: the window k of tokens averaged
    hidden: int = 1024          # bag: the MLP's hidden width


def cross_entropy(logits, targets):
    return None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())


class BagOfEmbeddings(nn.Module):
    """p(x_{t+1} | x_{t-k+1..t}) = softmax(MLP(mean_j E[x_j])), k = context.

    Positions before the start of the sequence are padding: left out of the mean, so the first
    token's prediction averages one embedding, the second's two, ... up to k.
    """

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, cfg.hidden), nn.LeakyReLU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.hidden, cfg.vocab_size))

    def forward(self, idx, targets=None, cache=None):
        # idx (B, T); the window of position t is t-k+1..t, as running sums: S_t - S_{t-k}
        k, T = self.cfg.context, idx.size(1)
        s = self.embedding(idx).cumsum(1)                             # (B, T, C)
        window = s - F.pad(s, (0, 0, k, 0))[:, :T]                    # (B, T, C) sums of <= k embeddings
        count = torch.arange(1, T + 1, device=idx.device).clamp(max=k)  # (T,) tokens in each window
        logits = self.mlp(window / count[:, None])                    # (B, T, V)
        return logits, cross_entropy(logits, targets)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g: LayerNorm without the mean and the bias."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, pos, base=10000.0):
    """Rotate each pair of channels (i, i + hs/2) of x (B, nh, T, hs) by the angle pos * base^(-2i/hs):
    the dot product of a rotated query and key then depends only on their distance."""
    hs = x.size(-1)
    freq = base ** (-torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)  # (hs/2,)
    angle = pos[:, None].float() * freq                                                 # (T, hs/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.rope, self.dropout = cfg.n_head, cfg.pos == "rope", cfg.dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)  # W^Q, W^K, W^V of all heads
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)     # W^O
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, past=None, need_weights=False):
        # x (B, T, C) at positions pos (T,); past: this layer's cached (k, v), each (B, nh, T_past, hs)
        q, k, v = rearrange(self.qkv(x), "b t (three nh hs) -> three b nh t hs", three=3, nh=self.n_head)
        if self.rope:
            q, k = rope(q, pos), rope(k, pos)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        T, L = q.size(2), k.size(2)
        # softmax(Q K^T / sqrt(hs)) V, query i (at position L - T + i) seeing keys 0 .. L - T + i
        causal = (None if T == L and not need_weights  # the square case: SDPA's is_causal
                  else torch.ones(T, L, dtype=torch.bool, device=x.device).tril(L - T))
        weights = None
        if need_weights:  # the same attention written out, to look at the weights
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
            weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, nh, T, L)
            y = weights @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, is_causal=causal is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = rearrange(y, "b nh t hs -> b t (nh hs)")
        return self.resid_dropout(self.proj(y)), (k, v), weights


class MLP(nn.Module):
    """FFN(x) = GELU(x W_1) W_2, inner width 4C."""

    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))


def norm(cfg):
    return RMSNorm(cfg.n_embd) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + MLP(Norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.norm_1, self.attn = norm(cfg), CausalSelfAttention(cfg)
        self.norm_2, self.mlp = norm(cfg), MLP(cfg)

    def forward(self, x, pos, past=None, need_weights=False):
        a, present, weights = self.attn(self.norm_1(x), pos, past, need_weights)
        x = x + a
        return x + self.mlp(self.norm_2(x)), present, weights


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual writers scaled by 1/sqrt(2 n_layer)
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, attention=None):
        # idx (B, T); cache: a list with one (k, v) or None per layer, filled in place, to decode token
        # by token without recomputing the prefix; attention: a list that receives each layer's weights
        past = cache[0][0].size(2) if cache and cache[0] is not None else 0
        T = idx.size(1)
        assert past + T <= self.cfg.block_size, f"context {past + T} > block_size {self.cfg.block_size}"
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.wte(idx) + (self.wpe(pos) if self.wpe is not None else 0)
        x = self.drop(x)                                                      # (B, T, C)
        for i, block in enumerate(self.blocks):
            x, present, weights = block(x, pos, cache[i] if cache else None, attention is not None)
            if cache is not None:
                cache[i] = present
            if attention is not None:
                attention.append(weights)                                     # (B, nh, T, past + T)
        logits = self.lm_head(self.norm_f(x))                                 # (B, T, V)
        return logits, cross_entropy(logits, targets)


def build_model(cfg):
    return BagOfEmbeddings(cfg) if cfg.model == "bag" else Transformer(cfg)


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, stop=None):
    """Continue idx (1, T) by sampling; stops early at the token `stop` (end of story).
    The Transformer decodes with its KV cache, one position per new token; the bag model
    re-reads its window, which is all it ever sees."""
    cfg = model.cfg
    cache = [None] * cfg.n_layer if isinstance(model, Transformer) else None
    window = cfg.block_size if cache is not None else cfg.context
    feed = idx[:, -window:]
    for _ in range(max_new_tokens):
        if cache is not None and cache[0] is not None and cache[0][0].size(2) == cfg.block_size:
            # context full: restart the cache from the last half-context
            cache, feed = [None] * cfg.n_layer, idx[:, -max(1, cfg.block_size // 2):]
        logits, _ = model(feed, cache=cache)
        next_id = sample_token(logits[:, -1, :], temperature, top_k, top_p)  # (1, 1)
        idx = torch.cat([idx, next_id], dim=1)
        if stop is not None and next_id.item() == stop:
            break
        feed = next_id if cache is not None else idx[:, -window:]
    return idx


def sample_token(logits, temperature=1.0, top_k=None, top_p=None):
    """One token from logits (B, V): greedy at temperature 0; otherwise softmax(logits / T) cut to
    the top-k tokens and then to the smallest set whose probability reaches top_p (nucleus)."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep tokens until the mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), num_samples=1)
