"""The Transformer of Vaswani et al. 2017, "Attention Is All You Need": an encoder-decoder, in the
order the data meets it: embeddings and sinusoidal positions -> encoder layers (self-attention,
feed-forward) -> decoder layers (causal self-attention, cross-attention to the encoder's output,
feed-forward) -> the shared embedding matrix as the output layer. Then decoding: greedy and
beam search, with a cache of keys and values so that each new token costs one position.

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


class Sublayers(nn.Module):
    """The residual connection around each of a layer's n sublayers: LayerNorm(x + Dropout(Sublayer(x)))
    in the paper (§3.1, §5.4), x + Dropout(Sublayer(LayerNorm(x))) with pre_ln."""

    def __init__(self, cfg, n):
        super().__init__()
        self.pre_ln, self.dropout = cfg.pre_ln, nn.Dropout(cfg.dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(n))

    def input(self, i, x):
        """What sublayer i reads."""
        return self.norms[i](x) if self.pre_ln else x

    def output(self, i, x, out):
        """x after sublayer i, whose output is `out`."""
        x = x + self.dropout(out)
        return x if self.pre_ln else self.norms[i](x)


class EncoderLayer(Sublayers):
    def __init__(self, cfg):
        super().__init__(cfg, 2)
        self.self_attn, self.ff = MultiHeadAttention(cfg), FeedForward(cfg)

    def forward(self, x, src_mask):
        # x (B, S, d): every source position attends to every real source token
        h = self.input(0, x)
        x = self.output(0, x, self.self_attn(h, h, src_mask)[0])
        return self.output(1, x, self.ff(self.input(1, x)))


class DecoderLayer(Sublayers):
    def __init__(self, cfg):
        super().__init__(cfg, 3)
        self.self_attn, self.cross_attn, self.ff = MultiHeadAttention(cfg), MultiHeadAttention(cfg), FeedForward(cfg)

    def forward(self, y, memory, src_mask, tgt_mask, cache=None):
        # y (B, T, d), memory (B, S, d): the encoder's output. cache (decoding step by step): this layer's
        # projected keys and values, "self" of the earlier target positions and "cross" of the memory
        c = {} if cache is None else cache
        h = self.input(0, y)
        a, _, c["self"] = self.self_attn(h, h, tgt_mask, c.get("self"))  # causal: position i sees 0..i
        y = self.output(0, y, a)
        a, weights, c["cross"] = self.cross_attn(self.input(1, y), None if "cross" in c else memory, src_mask,
                                                 c.get("cross"))         # every target position sees the source
        y = self.output(1, y, a)
        return self.output(2, y, self.ff(self.input(2, y))), weights     # weights (B, h, T, S)


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


@torch.no_grad()
def greedy(model, src):
    """Each step appends the most probable next token; a sentence stops at EOS or at its limit.
    src (B, S) -> B lists of token ids, without BOS and EOS."""
    cfg, limit = model.cfg, output_limit(model, src)
    memory, src_mask = model.encode(src)
    cache = [{} for _ in model.decoder]
    ys = torch.full((src.size(0), 1), cfg.bos_id, device=src.device)    # (B, 1 + t)
    done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
    for t in range(int(limit.max())):
        token = next_log_probs(model, ys[:, -1:], memory, src_mask, cache).argmax(-1)  # (B,)
        ys = torch.cat([ys, token.masked_fill(done, cfg.eos_id)[:, None]], 1)  # a finished sentence: EOS again
        done |= (token == cfg.eos_id) | (t + 1 >= limit)
        if done.all():
            break
    outputs = [row[:n] for row, n in zip(ys[:, 1:].tolist(), limit.tolist())]
    return [row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row for row in outputs]


def length_penalty(length, alpha):
    """lp(Y) = ((5 + |Y|) / (5 + 1))^alpha (Wu et al. 2016, GNMT §7; the paper's alpha = 0.6, §6.1)."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(model, src, beam=4, alpha=0.6):
    """Keep the `beam` likeliest prefixes of each sentence. A candidate that ends in EOS and ranks in
    the top `beam` is finished, scored log P(Y | X) / lp(Y); a sentence is done with `beam` finished
    hypotheses (or at its limit, when the live ones finish too), and the best finished one wins.
    With beam 1 this is greedy decoding. src (B, S) -> B lists of token ids, without BOS and EOS."""
    cfg, limit, B, K = model.cfg, output_limit(model, src).tolist(), src.size(0), beam
    memory, src_mask = model.encode(src)
    memory, src_mask = repeat(memory, "b s d -> (b k) s d", k=K), repeat(src_mask, "b 1 1 s -> (b k) 1 1 s", k=K)
    cache = [{} for _ in model.decoder]
    ys = torch.full((B * K, 1), cfg.bos_id, device=src.device)          # (B K, 1 + t)
    scores = torch.full((B, K), float("-inf"), device=src.device)       # log P of each live prefix
    scores[:, 0] = 0.0                                                  # one live prefix at the start: BOS
    finished, done = [[] for _ in range(B)], [False] * B
    for t in range(max(limit)):
        logp = rearrange(next_log_probs(model, ys[:, -1:], memory, src_mask, cache), "(b k) v -> b k v", k=K)
        top, flat = (scores[:, :, None] + logp).flatten(1).topk(2 * K)  # (B, 2K): K of them do not end
        top, flat = top.tolist(), flat.tolist()
        survivors = []
        for b in range(B):
            live = []
            for r in range(2 * K):
                if done[b] or len(live) == K or top[b][r] == float("-inf"):
                    break
                k, token = divmod(flat[b][r], cfg.vocab_size)
                if token == cfg.eos_id or t + 1 >= limit[b]:
                    if r < K:  # only a top-K candidate may finish: so beam 1 is greedy
                        hyp = ys[b * K + k, 1:].tolist() + ([] if token == cfg.eos_id else [token])
                        finished[b].append((top[b][r] / length_penalty(t + 1, alpha), hyp))
                else:
                    live.append((top[b][r], b * K + k, token))
            done[b] = done[b] or len(finished[b]) >= K or t + 1 >= limit[b]
            survivors += live + [(float("-inf"), b * K, cfg.eos_id)] * (K - len(live))  # fillers: never extended
        if all(done):
            break
        new_scores, rows, tokens = zip(*survivors)
        rows = torch.tensor(rows, device=src.device)
        ys = torch.cat([ys[rows], torch.tensor(tokens, device=src.device)[:, None]], 1)
        scores = torch.tensor(new_scores, device=src.device).view(B, K)
        for c in cache:  # the surviving prefixes' keys and values; "cross" is the same for a sentence's beams
            c["self"] = tuple(x[rows] for x in c["self"])
    return [max(f, key=lambda f: f[0])[1] for f in finished]


def translate_ids(model, sources, beam=1, alpha=0.6, batch_size=64):
    """Source token lists (each at most max_len - 1 long) -> output token lists, greedy (beam 1) or
    beam search, in batches of sentences of similar length."""
    device = next(model.parameters()).device
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    outputs = [None] * len(sources)
    for j in range(0, len(order), batch_size):
        ids = order[j:j + batch_size]
        src = pad_sequence([torch.tensor(sources[i] + [model.cfg.eos_id]) for i in ids], batch_first=True,
                           padding_value=model.cfg.pad_id).to(device)
        for i, out in zip(ids, greedy(model, src) if beam == 1 else beam_search(model, src, beam, alpha)):
            outputs[i] = out
    return outputs
