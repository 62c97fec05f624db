"""The Transformer of Vaswani et al. 2017, "Attention Is All You Need": an encoder-decoder, in the
order the data meets it: embeddings and sinusoidal positions -> encoder layers (self-attention,
feed-forward) -> decoder layers (causal self-attention, cross-attention to the encoder's output,
feed-forward) -> the shared embedding matrix as the output layer. Then decoding: beam search (beam 1
is greedy), a batch's sentences and beams at once, with a cache of keys and values (one position a token).

Shapes: B batch, S source tokens, T target tokens, d = d_model, h heads, d_k = d / h, V vocabulary.
Masks are boolean, True where a query may attend to a key, broadcast to (B, h, T_query, T_key).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat
from torch.nn.utils.rnn import pad_sequence


@dataclass
class Config:
    vocab_size: int
    max_len: int = 64              # positions per side, BOS / EOS included
    n_layer: int = 6               # N, in the encoder and in the decoder
    n_head: int = 8                # h
    d_model: int = 512
    d_ff: int = 2048
    dropout: float = 0.1           # P_drop
    label_smoothing: float = 0.1   # epsilon_ls
    pre_ln: bool = False           # LayerNorm before each sublayer (Xiong et al. 2020), not after it
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2


def sinusoidal_positions(max_len, d_model):
    """PE(pos, 2i) = sin(pos / 10000^(2i / d_model)), PE(pos, 2i + 1) = cos(...) (§3.5)."""
    pos = torch.arange(max_len, dtype=torch.float32)[:, None]           # (max_len, 1)
    angle = pos / 10000 ** (torch.arange(0, d_model, 2) / d_model)       # (max_len, d/2)
    return rearrange(torch.stack([angle.sin(), angle.cos()], -1), "l i two -> l (i two)")  # (max_len, d)


def padding_mask(tokens, pad_id):
    """(B, 1, 1, L): every query may attend to the real tokens, none to the padding."""
    return rearrange(tokens != pad_id, "b l -> b 1 1 l")


def causal_mask(t, length, device):
    """(1, 1, t, length): the last t of `length` positions as queries, each seeing the keys up to itself."""
    return torch.ones(t, length, dtype=torch.bool, device=device).tril(length - t)[None, None]


def attention(q, k, v, mask):
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V (eq. 1); weight 0 where the mask is False."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))             # (B, h, T_q, T_k)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return weights @ v, weights                                          # (B, h, T_q, d_k)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)
    (§3.2.2): self-attention when queries and keys come from the same sequence, cross-attention
    when the keys and values are the encoder's output."""

    def __init__(self, cfg):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0
        self.h = cfg.n_head
        self.w_q, self.w_k, self.w_v, self.w_o = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))

    def forward(self, x_q, x_kv, mask, past=None):
        # x_q (B, T_q, d), x_kv (B, T_k, d); past: keys and values already projected, each (B, h, L, d_k):
        # of the earlier target positions, which x_kv's extend, or (x_kv None) the whole encoder output
        heads = lambda x: rearrange(x, "b t (h dk) -> b h t dk", h=self.h)
        q = heads(self.w_q(x_q))
        if x_kv is None:
            k, v = past
        else:
            k, v = heads(self.w_k(x_kv)), heads(self.w_v(x_kv))
            if past is not None:
                k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        y, weights = attention(q, k, v, mask)
        return self.w_o(rearrange(y, "b h t dk -> b t (h dk)")), weights, (k, v)


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2 (eq. 2), inner width d_ff."""

    def __init__(self, cfg):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.w_2(F.relu(self.w_1(x)))


class EncoderLayer(nn.Module):
    """Self-attention, then the feed-forward network, each inside a residual connection with LayerNorm
    (§3.1) and dropout on the sublayer's output (§5.4)."""

    def __init__(self, cfg):
        super().__init__()
        self.pre_ln, self.dropout = cfg.pre_ln, nn.Dropout(cfg.dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(2))
        self.self_attn, self.ff = MultiHeadAttention(cfg), FeedForward(cfg)

    def forward(self, x, src_mask):
        # x (B, S, d): every source position attends to every real source token
        if self.pre_ln:  # x + Dropout(Sublayer(LayerNorm(x)))
            h = self.norms[0](x)
            x = x + self.dropout(self.self_attn(h, h, src_mask)[0])
            return x + self.dropout(self.ff(self.norms[1](x)))
        x = self.norms[0](x + self.dropout(self.self_attn(x, x, src_mask)[0]))  # LayerNorm(x + Dropout(Sublayer(x)))
        return self.norms[1](x + self.dropout(self.ff(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the encoder's output, the feed-forward network: each
    inside a residual connection with LayerNorm (§3.1), dropout on the sublayer's output (§5.4)."""

    def __init__(self, cfg):
        super().__init__()
        self.pre_ln, self.dropout = cfg.pre_ln, nn.Dropout(cfg.dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn, self.cross_attn, self.ff = MultiHeadAttention(cfg), MultiHeadAttention(cfg), FeedForward(cfg)

    def forward(self, y, memory, src_mask, tgt_mask, cache=None):
        # y (B, T, d), memory (B, S, d): the encoder's output. cache (decoding step by step): this layer's
        # projected keys and values, "self" of the earlier target positions and "cross" of the memory
        c = {} if cache is None else cache
        kv = None if "cross" in c else memory
        if self.pre_ln:  # y + Dropout(Sublayer(LayerNorm(y)))
            h = self.norms[0](y)
            a, _, c["self"] = self.self_attn(h, h, tgt_mask, c.get("self"))
            y = y + self.dropout(a)
            a, weights, c["cross"] = self.cross_attn(self.norms[1](y), kv, src_mask, c.get("cross"))
            y = y + self.dropout(a)
            return y + self.dropout(self.ff(self.norms[2](y))), weights
        a, _, c["self"] = self.self_attn(y, y, tgt_mask, c.get("self"))  # causal: position i sees 0..i
        y = self.norms[0](y + self.dropout(a))                             # LayerNorm(y + Dropout(Sublayer(y)))
        a, weights, c["cross"] = self.cross_attn(y, kv, src_mask, c.get("cross"))  # every target position sees the source
        y = self.norms[1](y + self.dropout(a))
        return self.norms[2](y + self.dropout(self.ff(y))), weights        # weights (B, h, T, S)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # One matrix embeds source and target tokens and, transposed, is the pre-softmax linear map (§3.4)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.register_buffer("pe", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        # pre-LN leaves the residual stream unnormalised: a last LayerNorm on each side
        self.enc_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_ln else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_ln else nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.embedding.weight, std=cfg.d_model ** -0.5)  # times sqrt(d_model): unit variance

    def embed(self, tokens, start=0):
        # Embedding(x) * sqrt(d_model) + PE, then dropout (§3.4, §3.5, §5.4); tokens (B, L) at start, start+1, ...
        assert start + tokens.size(1) <= self.cfg.max_len, f"{start + tokens.size(1)} > max_len {self.cfg.max_len}"
        x = self.embedding(tokens) * math.sqrt(self.cfg.d_model) + self.pe[start:start + tokens.size(1)]
        return self.dropout(x)                                            # (B, L, d)

    def encode(self, src):
        """src (B, S) -> memory (B, S, d) and the source mask (B, 1, 1, S)."""
        src_mask = padding_mask(src, self.cfg.pad_id)
        x = self.embed(src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask

    def decode(self, tgt_in, memory, src_mask, cache=None):
        """tgt_in (B, T) -> logits (B, T, V) and each layer's cross-attention weights (B, h, T, S).
        cache: a list of one dict per layer, filled in place; then tgt_in holds only the new positions."""
        start = cache[0]["self"][0].size(2) if cache and "self" in cache[0] else 0
        T = tgt_in.size(1)
        tgt_mask = causal_mask(T, start + T, tgt_in.device)
        if cache is None:  # teacher forcing: the target's padding is masked too (a live prefix has none)
            tgt_mask = tgt_mask & padding_mask(tgt_in, self.cfg.pad_id)
        y, cross = self.embed(tgt_in, start), []
        for i, layer in enumerate(self.decoder):
            y, weights = layer(y, memory, src_mask, tgt_mask, cache[i] if cache else None)
            cross.append(weights)
        return self.dec_norm(y) @ self.embedding.weight.T, cross          # (B, T, V)

    def forward(self, src, tgt_in, tgt_out=None):
        """Logits (B, T, V) of each next target token; with tgt_out (B, T), the label-smoothed
        cross-entropy (§5.4) per real target token."""
        memory, src_mask = self.encode(src)
        logits, _ = self.decode(tgt_in, memory, src_mask)
        loss = None
        if tgt_out is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=self.cfg.pad_id,
                                   label_smoothing=self.cfg.label_smoothing)
        return logits, loss


def num_params(model):
    return sum(p.numel() for p in model.parameters())


def output_limit(model, src):
    """(B,) most tokens to generate per sentence: twice the source's length plus 10, within max_len."""
    return ((src != model.cfg.pad_id).sum(1) * 2 + 10).clamp(max=model.cfg.max_len - 1)


def next_log_probs(model, last, memory, src_mask, cache):
    """log P(y_t | y_<t, x), (B, V), from the newest target tokens `last` (B, 1) and the cache of the
    earlier ones; padding and BOS are never generated."""
    logits, _ = model.decode(last, memory, src_mask, cache)
    logits = logits[:, -1].float()
    logits[:, [model.cfg.pad_id, model.cfg.bos_id]] = float("-inf")
    return logits.log_softmax(-1)


def length_penalty(length, alpha):
    """lp(Y) = ((5 + |Y|) / (5 + 1))^alpha (Wu et al. 2016, GNMT §7; the paper's alpha = 0.6, §6.1)."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(model, src, beam=4, alpha=0.6):
    """Keep the `beam` likeliest prefixes of each sentence, every sentence and beam in one decoder forward
    per step. Of the 2 beam best one-token extensions, one that ends in EOS (or reaches the sentence's
    limit) and ranks in the top `beam` is a finished hypothesis, scored log P(Y | X) / lp(Y); the first
    `beam` that do not end live on. A sentence is done with `beam` finished hypotheses or at its limit;
    the best finished one wins (the earlier one on a tie). Beam 1 is greedy decoding.
    src (B, S) -> B lists of token ids, without BOS and EOS."""
    cfg, B, K, dev = model.cfg, src.size(0), beam, src.device
    limit = output_limit(model, src)                                    # (B,)
    memory, src_mask = model.encode(src)
    memory, src_mask = repeat(memory, "b s d -> (b k) s d", k=K), repeat(src_mask, "b 1 1 s -> (b k) 1 1 s", k=K)
    cache = [{} for _ in model.decoder]
    ys = torch.full((B * K, 1), cfg.bos_id, device=dev)                 # (B K, 1 + t)
    scores = torch.full((B, K), float("-inf"), device=dev)              # log P of each live prefix
    scores[:, 0] = 0.0                                                  # one live prefix at the start: BOS
    best = torch.full((B,), float("-inf"), device=dev)                  # the best finished hypothesis: its score,
    best_ys = torch.full((B, int(limit.max())), cfg.eos_id, device=dev)  # tokens (B, L) and length (B,)
    best_len = torch.zeros(B, dtype=torch.long, device=dev)
    n_finished, done = torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.bool, device=dev)
    rank, first_row = torch.arange(2 * K, device=dev), torch.arange(B, device=dev)[:, None] * K
    for t in range(int(limit.max())):
        logp = next_log_probs(model, ys[:, -1:], memory, src_mask, cache)  # (B K, V)
        top, flat = (scores.view(B * K, 1) + logp).view(B, K * cfg.vocab_size).topk(2 * K)  # (B, 2K): <= K end
        row, token = first_row + flat // cfg.vocab_size, flat % cfg.vocab_size  # the prefix extended, its new token
        ok = (top > float("-inf")) & ~done[:, None]
        ends = ok & ((token == cfg.eos_id) | (t + 1 >= limit)[:, None])
        finishes = ends & (rank < K)                                    # only a top-K candidate: beam 1 is greedy
        if finishes.any():  # (a host sync, as is done.all(); most steps nothing finishes)
            final = (top / length_penalty(t + 1, alpha)).masked_fill(~finishes, float("-inf"))
            score, r = final.max(1)                                     # (B,): this step's best finished one
            better, r = score > best, r[:, None]
            hyp = torch.cat([ys[row.gather(1, r)[:, 0], 1:], token.gather(1, r)], 1)  # (B, t + 1)
            best_ys[better, :t + 1], best = hyp[better], torch.where(better, score, best)
            best_len = torch.where(better, t + (token.gather(1, r)[:, 0] != cfg.eos_id).long(), best_len)
            n_finished += finishes.sum(1)
            done |= n_finished >= K
        done |= t + 1 >= limit
        if done.all():
            break
        live = ok & ~ends
        live &= live.cumsum(1) <= K                                     # the first K that do not end
        pick = torch.where(live, rank, 2 * K + rank).argsort(1)[:, :K]  # (B, K): them, in rank order, then fillers
        alive = live.gather(1, pick)                                    # a filler is never extended: score -inf
        scores = top.gather(1, pick).masked_fill(~alive, float("-inf"))
        rows = torch.where(alive, row.gather(1, pick), first_row).flatten()   # (B K,)
        ys = torch.cat([ys[rows], torch.where(alive, token.gather(1, pick), cfg.eos_id).flatten()[:, None]], 1)
        if K > 1:  # the surviving prefixes' keys and values (one beam never moves); "cross" is a sentence's
            for c in cache:
                c["self"] = tuple(x[rows] for x in c["self"])
    return [row[:n] for row, n in zip(best_ys.tolist(), best_len.tolist())]


def translate_ids(model, sources, beam=1, alpha=0.6, batch_size=64):
    """Source token lists (each at most max_len - 1 long) -> output token lists, by beam search (beam 1:
    greedy), in batches of sentences of similar length."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs = [None] * len(sources)
    for j in range(0, len(order), batch_size):
        ids = order[j:j + batch_size]
        src = pad_sequence([torch.tensor(sources[i] + [model.cfg.eos_id]) for i in ids], batch_first=True,
                           padding_value=model.cfg.pad_id).to(device)
        for i, out in zip(ids, beam_search(model, src, beam, alpha)):
            outputs[i] = out
    return outputs
