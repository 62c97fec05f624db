"""Integer-only inference for the byte model, after I-BERT (Kim et al., "I-BERT: Integer-only BERT
Quantization", ICML 2021): the trained float `ByteTransformer`, quantised after training, run with
integer operations only, so that every machine computes the same next-byte frequencies, bit for bit.

Why: float results depend on the order of their additions, which changes with the thread count,
the batch size, the BLAS and the device; a coder fed by them decodes only where it encoded. Integer
sums are exact in any order as long as they do not overflow, so each kernel below states the bound
that keeps its int64 values under 2^63 for every input (activations are saturated to make the
bounds hold for any bytes, not only for likely ones). All of it runs on the CPU, where torch's int64
matmul is supported; the result does not depend on threads, batch composition or the KV cache.

Numbers: an activation is an int64 tensor q holding q / 2^F with F = 16 fraction bits (I-BERT keeps
a float scale next to each tensor; one fixed power-of-two scale makes every rescale a shift).
  - `per_row`: a matmul input, row by row shifted right to at most 2^15 (16-bit), like I-BERT's
    int8 activations but with a power-of-two scale per row (per token), so no calibration is needed
    and a row's integers do not depend on the other rows of the batch.
  - `IntLinear`: weights int8 or int16 with a scale per output channel (I-BERT Sec. 3.1, uniform
    symmetric quantisation), the scale a dyadic number m / 2^K; accumulation in int64; the
    requantisation a multiply and a shift (I-BERT's dyadic requantisation).
  - `i_exp` / `i_softmax`: I-BERT's I-EXP (integer-only softmax): exp(x) = 2^-z exp(p), p in
    (-ln 2, 0], exp(p) by I-POLY's second-order polynomial 0.3585 (p + 1.353)^2 + 0.344.
  - `i_gelu`: I-BERT's I-GELU: erf by I-ERF, the clipped second-order polynomial.
  - `IntLayerNorm`: I-BERT's integer-only LayerNorm: the standard deviation by I-SQRT, integer
    Newton iteration.
  - `frequencies`: the softmax of the head's logits as integer frequencies for the coder.
Constants are integer literals (ln 2 and the polynomial's coefficients at 2^-16), not computed with
a libm that may round differently elsewhere. Quantising the weights uses only IEEE-exact float64
operations (division, frexp, round), so it too gives the same integers on every machine.
"""
import hashlib
import math

import torch

VERSION = 1                  # of the integer kernels: recorded in every container coded with them
F = 16                       # fraction bits of every activation: q represents q / 2^16
LIMIT = 1 << (F + 11)        # activations are saturated to |q| <= 2^27 (|value| <= 2048)
ROW_BITS = 15                # matmul inputs: |q| <= 2^15 after `per_row`
E_MAX = 13                   # largest `per_row` shift: bit_length(2^27) - 15
WEIGHT_BITS = 16             # int16 weights (chosen by measurement: see the README)
Q_LN2 = 45426                # round(ln 2 * 2^16)
EXP_B, EXP_C = 88670, 4121251742  # floor(1.353 * 2^16), floor(0.344 / 0.3585 * 2^32): i-exp's b and c / a
ERF_B = -163955              # floor(-1.769 * sqrt(2) * 2^16): i-erf's b for an input at scale 2^-16 / sqrt(2)
ERF_C = -29743540832         # floor(2^33 / -0.2888): i-erf's 1 / a at that scale
ERF_A = -18927               # round(-0.2888 * 2^16): i-erf's a, to bring the result back to 2^-16
BUDGET = (1 << 30) - 256     # frequency units left after the floor of 1 per byte (the coder's 2^30)


def saturate(q):
    return q.clamp(-LIMIT, LIMIT)


POWERS = torch.tensor([1 << i for i in range(63)])


def round_shift(q, s, half=None):
    """round(q / 2^s) for 0 <= s < 63 (halves up), int64, exact; s an int or a tensor broadcast against q;
    `half` = floor(2^(s - 1)), where the caller has it in fewer operations per element."""
    if half is None:
        half = (1 << s) >> 1 if isinstance(s, int) else (torch.ones_like(s) << s) >> 1
    return (q + half) >> s


def bit_length(v):
    """The number of bits of each v >= 0 (0 for 0): how many of 1, 2, 4, ..., 2^62 are <= v."""
    return torch.searchsorted(POWERS.to(v.device), v, right=True)


def exact_matmul(a, b):
    """a @ b of int64 tensors through float64 (BLAS on the CPU, cuBLAS on a GPU), exact: every caller
    keeps each product and every partial sum of its rows below 2^53 in magnitude, so each is an integer
    that float64 holds exactly, in any order of summation. b may already be float64."""
    return torch.matmul(a.double(), b.double() if b.dtype != torch.float64 else b).long()


def per_row(q):
    """(..., n) -> (q >> e, e (..., 1)): each row shifted so |q >> e| <= 2^15. |q| <= 2^27 gives e <= 13."""
    e = (bit_length(q.abs().amax(-1, keepdim=True)) - ROW_BITS).clamp(min=0)
    return round_shift(q, e), e


def fixed(t):
    """A float tensor at 2^-16, rounded: q = round(t * 2^16) (scaling by 2^16 is exact)."""
    return torch.round(t.detach().double().cpu() * (1 << F)).long()


class IntLinear:
    """y = x W^T + b with W_q = round(W / s_j) per output channel j, s_j = max_i |W_ji| / (2^(bits-1) - 1)
    written as m_j / 2^K_j with m_j in [2^15, 2^16) (I-BERT's dyadic requantisation)."""

    def __init__(self, linear, bits, row_scale=None, device="cpu"):
        w = linear.weight.detach().double().cpu()                    # (out, in)
        if row_scale is not None:                                   # folded constants (attention's 1/sqrt(d))
            w = w * row_scale[:, None]
        q_max = (1 << (bits - 1)) - 1
        s = w.abs().amax(1) / q_max
        s = torch.where(s > 0, s, torch.ones_like(s))
        self.w = torch.round(w / s[:, None]).long()                  # (out, in), |w| <= q_max
        mant, exp = torch.frexp(s)                                  # s = mant 2^exp, mant in [0.5, 1)
        self.m, self.k = torch.round(mant * (1 << 16)).long(), 16 - exp.long()
        top = self.m == 1 << 16                                     # mant rounded up to 1
        self.m, self.k = torch.where(top, self.m >> 1, self.m), torch.where(top, self.k - 1, self.k)
        b = linear.bias if linear.bias is not None else torch.zeros(w.shape[0])
        self.b = fixed(b * (row_scale if row_scale is not None else 1))
        # Bounds: |acc| <= in * q_max * 2^15 < 2^47 (exact in float64) and |acc * m| < in * q_max * 2^31 < 2^63;
        # the shift k - e >= 0.
        if w.shape[1] * q_max >= 1 << 32 or self.k.min() < E_MAX or self.b.abs().max() > LIMIT:
            raise ValueError("weights or biases too large for the integer path")
        self.w_t = self.w.T.double().contiguous().to(device)              # (in, out): the matmul's operand
        self.m, self.k, self.b = self.m.to(device), self.k.to(device), self.b.to(device)
        self.pow_k = 1 << self.k if self.k.max() < 63 else None     # (a row of tiny weights has a larger k)

    def __call__(self, x):                                          # x (..., in) at 2^-16
        xs, e = per_row(x)
        acc = exact_matmul(xs, self.w_t)                            # (..., out), |acc| < 2^47
        return requantize(acc, e, self.m, self.k, self.pow_k, self.b)


def requantize(acc, e, m, k, pow_k, b):
    """IntLinear's output at 2^-16: acc 2^e m / 2^k + b, one rounding shift (I-BERT's dyadic requantisation)."""
    half = None if pow_k is None else pow_k >> (e + 1)              # 2^(k - e - 1), 0 where k = e
    return saturate(round_shift(acc * m, k - e, half) + b)


def i_sqrt(n):
    """floor(sqrt(n)) for n >= 1 (I-BERT's I-SQRT): Newton from 2^ceil(bits / 2), down to the fixed point."""
    x = torch.ones_like(n) << ((bit_length(n) + 1) >> 1)
    while True:
        y = (x + n // x) >> 1
        if not (y < x).any():
            return x
        x = torch.minimum(x, y)


class IntLayerNorm:
    """gamma (x - mu) / sqrt(var + eps) + beta, in integers (I-BERT's integer-only LayerNorm)."""

    def __init__(self, ln, device="cpu"):
        self.gamma, self.beta = fixed(ln.weight), fixed(ln.bias)
        self.eps = int(round(ln.eps * 2 ** (2 * F + 14)))            # eps in (2^-16)^2 units, times 2^14
        if self.gamma.abs().max() > 1 << 36 or self.beta.abs().max() > LIMIT or self.eps >= 1 << 40:
            raise ValueError("LayerNorm parameters too large for the integer path")
        self.gamma, self.beta = self.gamma.to(device), self.beta.to(device)

    def __call__(self, x):                                          # x (..., C), |x| <= 2^27
        C = x.shape[-1]
        d = x - torch.div(x.sum(-1, keepdim=True), C, rounding_mode="floor")    # |d| <= 2^28
        ds, e = per_row(d)                                          # |ds| <= 2^15, e <= 14
        # var in ds units, times 2^14 for 7 more bits of sigma: sum <= C 2^30, << 14 < 2^63 for C < 2^19
        var = ((ds * ds).sum(-1, keepdim=True) << 14) // C + (self.eps >> (2 * e))
        sigma = i_sqrt(var.clamp(min=1))                             # sqrt(var) 2^7, >= 1
        n = ((ds << (F + 7)) // sigma).clamp(-1 << 26, 1 << 26)      # (x - mu) / sigma at 2^-16; |ds 2^23| <= 2^38
        return saturate(round_shift(n * self.gamma, F) + self.beta)  # |n gamma| <= 2^26 2^36 = 2^62


def i_exp(d):
    """exp(d) for d <= 0 at 2^-16 (I-BERT's I-EXP): d = -z ln2 + p, exp(p) ~ 0.3585 (p + 1.353)^2 + 0.344,
    then >> z. Result in units of 0.3585 / 2^32, <= (2^16 1.353)^2 + EXP_C < 2^34."""
    z = torch.div(-d, Q_LN2, rounding_mode="floor").clamp(max=40)   # beyond 34 the result is 0 anyway
    p = (d + z * Q_LN2).clamp(min=-Q_LN2) + EXP_B                   # p + b, p in (-ln 2, 0]
    return (p * p + EXP_C) >> z


def i_softmax(s, allowed, bits):
    """softmax over the last axis at 2^-bits, where `allowed` (entries elsewhere get 0; None: all). The
    largest allowed entry has exp >= EXP_B^2 > 2^32, so the sum is never 0; exp 2^bits <= 2^(34 + bits)."""
    if allowed is None:
        d = s - s.amax(-1, keepdim=True)
    else:
        s = torch.where(allowed, s, -LIMIT)
        d = torch.where(allowed, s - s.amax(-1, keepdim=True), -(1 << 40))
    e = i_exp(d)
    return (e << bits) // e.sum(-1, keepdim=True)


def i_gelu(x):
    """x/2 (1 + erf(x / sqrt 2)) with I-BERT's I-ERF / I-GELU: erf(u) ~ sgn(u) [a (min(|u|, -b) + b)^2 + 1],
    a = -0.2888, b = -1.769, at the input's scale / sqrt 2; |x| <= 2^27."""
    u = x.abs().clamp(max=-ERF_B) + ERF_B
    L = torch.sign(x) * (u * u + ERF_C)                              # |L| < 2^35
    erf = round_shift(L * ERF_A, 2 * F + 1)                          # at 2^-16: |L a| < 2^50, |erf| <= 2^16 + 2
    return saturate(round_shift(x * ((1 << F) + erf), F + 1))        # |x (2^16 + erf)| < 2^27 2^18


class IntAttention:
    """Causal self-attention: scores q.k / sqrt(d) (the 1/sqrt(d) folded into W_q), i-softmax, the
    weighted sum of v. Keys (as `per_row` gives them) and values of earlier positions come from the
    cache, the same integers a full pass computes."""
    W_BITS = 24                                                      # attention weights at 2^-24

    def __init__(self, attn, bits, device="cpu"):
        C, self.n_head = attn.qkv.weight.shape[1], attn.n_head
        if C // self.n_head > 1 << 12:                                  # the scores' bound below
            raise ValueError("heads wider than 4096 are too wide for the integer path")
        fold = torch.ones(3 * C, dtype=torch.float64)
        fold[:C] = 1 / math.sqrt(C // self.n_head)                      # sqrt and / are IEEE-exact
        self.qkv, self.proj = IntLinear(attn.qkv, bits, fold, device), IntLinear(attn.proj, bits, device=device)

    def __call__(self, x, cache):                                   # x (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        (qs, eq), (ks, ek) = per_row(q), per_row(k)                 # |qs|, |ks| <= 2^15; eq, ek <= 13
        ks, ek, v = cache.append(ks.double(), ek, v.double())       # (B, nh, Tk, .): earlier positions too
        acc = exact_matmul(qs, ks.transpose(-1, -2))                 # (B, nh, T, Tk), |acc| <= hs 2^30 <= 2^42
        Tk = ks.size(2)
        # query i sees keys up to Tk - T + i: all of them for one query (the coder's steps)
        allowed = None if T == 1 else torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)
        w = attention_weights(acc, eq, ek.transpose(-1, -2), allowed)  # (B, nh, T, Tk), sum <= 2^24
        wv = exact_matmul(w, v)                                     # w >= 0: every partial sum <= 2^24 2^27 = 2^51
        y = round_shift(wv, self.W_BITS)                             # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


def attention_weights(acc, eq, ek, allowed):
    """q.k (acc) to scores at 2^-16, acc 2^(eq + ek - 16), the exponent in [-16, 10]: acc << 10 <= hs 2^40,
    then one rounding shift; then i-softmax, the weights at 2^-24."""
    scores = saturate(round_shift(acc << 10, 26 - eq - ek, ((1 << 25) >> eq) >> ek))
    return i_softmax(scores, allowed, IntAttention.W_BITS)


class Cache:
    """One layer's keys (as `per_row` gives them), their exponents and values so far, in buffers of
    the whole context: a new position is copied in, not concatenated into a new tensor. Keys and
    values are kept as float64 (integers below 2^53, exactly), the operands of `exact_matmul`."""

    def __init__(self, context):
        self.context, self.n, self.buffers = context, 0, None

    def append(self, *new):                                         # each (B, nh, T, .)
        if self.buffers is None:
            self.buffers = [t.new_empty(*t.shape[:2], self.context, t.shape[3]) for t in new]  # read up to n
        T = new[0].size(2)
        for buffer, t in zip(self.buffers, new):
            buffer[:, :, self.n:self.n + T] = t
        self.n += T
        return [buffer[:, :, :self.n] for buffer in self.buffers]


class IntBlock:
    """x + Attn(LN(x)), then x + MLP(LN(x)), as `Block`, each sum saturated."""

    def __init__(self, block, bits, device="cpu"):
        self.ln_1, self.ln_2 = IntLayerNorm(block.ln_1, device), IntLayerNorm(block.ln_2, device)
        self.attn = IntAttention(block.attn, bits, device)
        self.fc, self.fc2 = IntLinear(block.mlp[0], bits, device=device), IntLinear(block.mlp[2], bits, device=device)

    def __call__(self, x, cache):
        x = saturate(x + self.attn(self.ln_1(x), cache))
        return saturate(x + self.fc2(i_gelu(self.fc(self.ln_2(x)))))


class IntByteTransformer:
    """A trained `ByteTransformer` in integers: forward gives logits at 2^-16, `frequencies` the coder's."""

    def __init__(self, net, bits=WEIGHT_BITS, device="cpu"):
        self.context, self.bits, self.n_head, self.device = net.cfg.context, bits, net.cfg.n_head, device
        if net.cfg.n_embd > 1 << 16:                                    # IntLayerNorm's and IntLinear's bounds
            raise ValueError("widths above 65536 are too wide for the integer path")
        self.tok, self.pos = fixed(net.tok.weight), fixed(net.pos.weight)
        if max(self.tok.abs().max(), self.pos.abs().max()) > LIMIT:
            raise ValueError("embeddings too large for the integer path")
        self.tok, self.pos = self.tok.to(device), self.pos.to(device)
        self.blocks = [IntBlock(b, bits, device) for b in net.blocks]
        self.ln_f, self.head = IntLayerNorm(net.ln_f, device), IntLinear(net.head, bits, device=device)

    def forward(self, idx, past=None):
        """idx (B, T) symbols 0..256 -> logits (B, T, 256) at 2^-16, int64, and the cache (`past`, extended)."""
        past = past or [Cache(self.context) for _ in self.blocks]
        start = past[0].n
        x = saturate(self.tok[idx] + self.pos[start:start + idx.size(1)])
        for block, cache in zip(self.blocks, past):
            x = block(x, cache)
        return self.head(self.ln_f(x)), past

    def digest(self):
        """sha256 of every integer: two machines that quantised differently would disagree here."""
        h = hashlib.sha256(f"integer v{VERSION} int{self.bits} heads {self.n_head}".encode())
        for t in self.tensors():
            h.update(t.cpu().contiguous().numpy().tobytes())
        return h.digest()[:16]

    def tensors(self):
        yield from (self.tok, self.pos)
        for b in self.blocks:
            for lin in (b.attn.qkv, b.attn.proj, b.fc, b.fc2):
                yield from (lin.w, lin.m, lin.k, lin.b)
            yield from (b.ln_1.gamma, b.ln_1.beta, b.ln_2.gamma, b.ln_2.beta)
        yield from (self.ln_f.gamma, self.ln_f.beta, self.head.w, self.head.m, self.head.k, self.head.b)


def frequencies(logits):
    """(B, 256) logits at 2^-16 -> (B, 257) cumulative integer frequencies for the coder, on the
    logits' device: with e = i_exp(logit - max) >> 4, freq = 1 + floor(e BUDGET / sum e): every byte
    >= 1, the total <= 2^30. e <= 2^30, so e BUDGET < 2^60; the largest e is >= 2^28, so the sum is never 0."""
    e = i_exp(logits - logits.amax(-1, keepdim=True)) >> 4
    freq = 1 + e * BUDGET // e.sum(-1, keepdim=True)
    return torch.cat([freq.new_zeros(len(freq), 1), freq.cumsum(-1)], 1)


def fuse():
    """`--compile`: each element-wise chain (`per_row`, IntLinear's `requantize`, `i_gelu`, `attention_weights`)
    compiled by torch.compile into one loop over its tensor instead of one pass over memory per operation.
    Integer operations are exact in any fusion, so the integers stay the same (a test compares them)."""
    global per_row, requantize, i_gelu, attention_weights
    if not hasattr(i_gelu, "_torchdynamo_orig_callable"):             # once per process
        per_row, requantize, i_gelu, attention_weights = (torch.compile(f, dynamic=True) for f in
                                                          (per_row, requantize, i_gelu, attention_weights))
