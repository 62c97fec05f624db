"""Sampling is decoding random bits (the paper's point that a compressor is a generative model).

Fair coin flips, read by the arithmetic decoder, pick each symbol with the probability the model
gives it (up to the quantisation): the same loop that decompresses a file, fed noise instead of
a code.
"""
import numpy as np
from tqdm import tqdm

from codec import DecodeIO, code_bytes


def coin_flips(n_symbols, seed):
    """Enough fair bits for n_symbols: no symbol costs more than 31 bits at the coder's resolution."""
    return np.random.default_rng(seed).integers(0, 2, size=32 * n_symbols + 64).tolist()


def sample(lm, n_bytes, seed):
    """About n_bytes of text from the model: a byte model decodes one chunk of n_bytes (at most its
    context); a token LM decodes tokens from BOS until it has n_bytes."""
    if lm.kind == "bytes":
        n = min(n_bytes, lm.context)
        buf = bytearray(n)
        code_bytes(lm, DecodeIO(bits=coin_flips(n, seed)), buf, n, tqdm(disable=True))
        return bytes(buf)
    io, tokens, token, past = DecodeIO(bits=coin_flips(4 * n_bytes, seed)), [], lm.bos, None
    while len(lm.detokenize(tokens)) < n_bytes and len(tokens) < 4 * n_bytes:
        cum, past = lm.freqs([token], past)
        token = io.code(cum[0].numpy(), 0)
        tokens.append(token)
    return lm.detokenize(tokens)
