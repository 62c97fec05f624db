"""Arithmetic coding with integers (Witten, Neal & Cleary 1987), the coder of the paper's Sec. 2.

The coder keeps an interval [low, high] of 48-bit integers (Python's ints are exact at
any size). Coding a symbol s with cumulative frequencies cum[s] <= . < cum[s + 1] out of
a total narrows the interval to s's share; whenever the interval lies in one half, the leading bit is settled and
shifted out. When it straddles the middle inside the second and third quarters
(underflow), the next bit is not known yet: it is counted as pending and emitted,
inverted, after the next settled bit. The interval is kept wider than a quarter (2^46)
and totals are at most 2^30, so every symbol of frequency >= 1 keeps a sub-interval of
2^16 or more units: coding is exact, and rounding the interval's ends costs at most
about 2^-16 / ln 2 bits per symbol. The code length is within 2 bits of
sum_i -log2(freq(s_i) / total_i), plus that rounding, plus padding to whole bytes.

Probabilities become integer frequencies in `quantize`: every symbol gets at least 1,
so no symbol is ever impossible, and the same probabilities always give the same
frequencies: the encoder and the decoder only have to compute the same probabilities.
"""
import numpy as np

PRECISION = 48
WHOLE = 1 << PRECISION
HALF, QUARTER = WHOLE >> 1, WHOLE >> 2
TOTAL_BITS = 30  # frequencies sum to at most 2^30; after renormalising, high - low + 1 > 2^46


def quantize(probs, total_bits=TOTAL_BITS):
    """Probabilities (V,) -> cumulative integer frequencies (V + 1,) int64, cum[0] = 0, every
    frequency >= 1, cum[V] <= 2^total_bits. float64 on the CPU: deterministic given `probs`."""
    p = np.asarray(probs, dtype=np.float64)
    p = np.where(np.isfinite(p) & (p > 0), p, 0.0)
    budget = (1 << total_bits) - len(p)                     # what is left after the floor of 1 each
    if budget < 0:
        raise ValueError(f"a vocabulary of {len(p)} symbols needs more than 2^{total_bits} frequency units")
    s = p.sum()
    freq = 1 + (np.floor(p / s * budget) if s > 0 else np.zeros_like(p)).astype(np.int64)
    return np.concatenate([[0], np.cumsum(freq)])


class Encoder:
    """encode(cum, s) per symbol, then finish() -> bytes."""

    def __init__(self):
        self.low, self.high, self.pending = 0, WHOLE - 1, 0
        self.bits = []

    def _emit(self, bit):
        self.bits.append(bit)
        self.bits.extend([1 - bit] * self.pending)
        self.pending = 0

    def encode(self, cum, s):
        self.encode_range(int(cum[s]), int(cum[s + 1]), int(cum[-1]))

    def encode_range(self, lo, hi, total):
        """The symbol whose share of the cumulative frequencies is [lo, hi) out of total."""
        span = self.high - self.low + 1
        self.high = self.low + span * hi // total - 1
        self.low = self.low + span * lo // total
        while True:
            if self.high < HALF:                                # both in the lower half: a 0
                self._emit(0)
            elif self.low >= HALF:                              # both in the upper half: a 1
                self._emit(1)
                self.low, self.high = self.low - HALF, self.high - HALF
            elif self.low >= QUARTER and self.high < 3 * QUARTER:  # straddling the middle: underflow
                self.pending += 1
                self.low, self.high = self.low - QUARTER, self.high - QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1

    def finish_bits(self):
        """The bits that pick a number inside the final interval (low < QUARTER: 01..., else 10...)."""
        self.pending += 1
        self._emit(0 if self.low < QUARTER else 1)
        return self.bits

    def finish(self):
        """The code as bytes; the last byte padded with zeros (the decoder reads 0s past the end)."""
        return np.packbits(np.array(self.finish_bits(), dtype=np.uint8)).tobytes()


class Decoder:
    """decode(cum) -> s per symbol, from bytes (or a list of bits), mirroring Encoder exactly."""

    def __init__(self, data=b"", bits=None):
        self.bits = bits if bits is not None else np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
        self.pos = 0
        self.low, self.high = 0, WHOLE - 1
        self.value = 0
        for _ in range(PRECISION):
            self.value = 2 * self.value + self._next_bit()

    def _next_bit(self):
        bit = self.bits[self.pos] if self.pos < len(self.bits) else 0
        self.pos += 1
        return bit

    def decode(self, cum):
        total, span = int(cum[-1]), self.high - self.low + 1
        # the symbol whose [cum[s], cum[s + 1]) holds the scaled value (the inverse of encode's narrowing)
        target = ((self.value - self.low + 1) * total - 1) // span
        s = int(np.searchsorted(cum, target, side="right")) - 1
        self.high = self.low + span * int(cum[s + 1]) // total - 1
        self.low = self.low + span * int(cum[s]) // total
        while True:
            if self.high < HALF:
                pass
            elif self.low >= HALF:
                self.low, self.high, self.value = self.low - HALF, self.high - HALF, self.value - HALF
            elif self.low >= QUARTER and self.high < 3 * QUARTER:
                self.low, self.high, self.value = self.low - QUARTER, self.high - QUARTER, self.value - QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.value = 2 * self.value + self._next_bit()
        return s

    def overrun(self):
        """Bits read past the end of the code: a well-formed stream needs at most PRECISION of them."""
        return max(0, self.pos - len(self.bits))
