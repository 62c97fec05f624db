"""Compression = a predictor + the arithmetic coder (Sec. 2 of the paper), in a container.

One loop, `code`, serves both directions: it walks the input symbol by symbol, asks the
predictor for the next symbol's integer frequencies given what came before, and hands them to the
coder: the encoder writes the symbol it is given, the decoder reads one. The round trip is exact
when both sides compute the same frequencies: always for the byte model's integer path (the
default); for a float predictor only on the same device, dtype, thread count and torch version,
which the container records and `decompress` checks (restoring the thread count) before decoding.

Long inputs are cut into chunks of the model's context (the paper's 2048 bytes for a token LM,
`context` bytes for a byte model) and every chunk starts from a fresh context. A byte model
codes its chunks side by side, a batch of them per forward pass, interleaved in one code
stream. A token LM codes one chunk at a time: a mode symbol, the chunk's length, then its
tokens; a chunk the tokenizer cannot give back byte for byte (invalid UTF-8, say) is escaped and
coded byte by byte with adaptive counts instead.

Container (big-endian): magic, version, predictor kind, model name, the predictor's setting (the
integer path's version, or a float predictor's device, dtype, threads and torch version), 16-byte
weight digest, chunk size, original length, CRC-32 of the original; the code; CRC-32 of everything
before it.
"""
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from coder import Decoder, Encoder
from model import BOS

MAGIC, VERSION = b"LMZ\x1a", 2
KINDS = {"bytes": 0, "tokens": 1}
HEAD = struct.Struct(">4sBBHB")          # magic, version, kind, name length, setting length; name, setting
TAIL = struct.Struct(">16sIQI")          # digest, chunk size, original length, CRC-32 of the original
CHECK = struct.Struct(">I")              # CRC-32 of the container up to here
UNIFORM = np.arange(257, dtype=np.int64)  # cumulative frequencies of a uniform byte
BATCH_CHUNKS = 32                        # byte model: chunks coded side by side
ESCAPE_STEP = 32                         # escaped bytes: counts start at 1, +32 per occurrence
SETTING = {"integer": ("path", "version", "weights"),              # what the container records
           "float": ("path", "device", "dtype", "threads", "torch")}


class Corrupt(Exception):
    """The code does not decode to what the container promises."""


class EncodeIO:
    """code(cum, s): write s, return it."""

    def __init__(self):
        self.coder = Encoder()

    def code(self, cum, s):
        self.coder.encode(cum, s)
        return s


class DecodeIO:
    """code(cum, _): read a symbol, return it."""

    def __init__(self, data=b"", bits=None):
        self.coder = Decoder(data, bits)

    def code(self, cum, _):
        return self.coder.decode(cum)


def code_uint16(io, n=0):
    return io.code(UNIFORM, n >> 8) << 8 | io.code(UNIFORM, n & 255)


def utf8_cut(buf, start, end):
    """`end`, moved back over at most 3 continuation bytes so that a chunk does not split a character."""
    cut = end
    while cut < len(buf) and cut > start + 1 and end - cut < 3 and buf[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


def code_bytes(lm, io, buf, length, pbar):
    """Byte model: buf[i] for i < length, chunk by chunk of lm.context, BATCH_CHUNKS at a time."""
    starts = list(range(0, length, lm.context))
    for g in range(0, len(starts), BATCH_CHUNKS):
        group = starts[g:g + BATCH_CHUNKS]
        lens = [min(lm.context, length - s) for s in group]
        inputs, past = [BOS] * len(group), None
        for t in range(max(lens)):
            cum, past = lm.freqs(inputs, past)                  # (B, 257)
            for b, s in enumerate(group):
                if t < lens[b]:
                    buf[s + t] = inputs[b] = io.code(cum[b], buf[s + t])
            pbar.update(sum(t < n for n in lens))


def code_escaped(io, chunk, n):
    """Bytes under an adaptive order-0 model: the escape for what a tokenizer cannot round-trip."""
    counts, out = np.ones(256, dtype=np.int64), bytearray()
    for i in range(n):
        b = io.code(np.concatenate([[0], np.cumsum(counts)]), chunk[i] if chunk else 0)
        counts[b] += ESCAPE_STEP
        out.append(b)
    return bytes(out)


def code_tokens(lm, io, buf, length, pbar, encoding):
    """Token LM: per chunk a mode (0 tokens, 1 escaped bytes), a length, then the symbols."""
    pos = 0
    while pos < length:
        chunk = ids = None
        if encoding:
            chunk = bytes(buf[pos:utf8_cut(buf, pos, min(pos + lm.context, length))])
            ids = lm.tokenize(chunk)
        if io.code(np.array([0, 1, 2]), 0 if ids is not None else 1) == 0:
            n, tokens, token, past = code_uint16(io, len(ids) if encoding else 0), [], lm.bos, None
            for i in range(n):
                cum, past = lm.freqs([token], past)
                token = io.code(cum[0], ids[i] if encoding else 0)
                tokens.append(token)
            chunk = lm.detokenize(tokens)
        else:
            n = code_uint16(io, len(chunk) if encoding else 0)
            chunk = code_escaped(io, chunk, n)
        if not chunk or pos + len(chunk) > length:
            raise Corrupt("the code runs past the original length")
        buf[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
        pbar.update(len(chunk))


def code(lm, io, buf, length, encoding, progress=True, setting=None):
    """The loop both directions share; buf holds the input (encoding) or receives it (decoding), with
    the threads of `setting` (what the container recorded; by default the predictor's own)."""
    with tqdm(total=length, unit="B", unit_scale=True, desc="compress" if encoding else "decompress",
              disable=not progress or length < 4096, dynamic_ncols=True, leave=False) as pbar, \
            threads(setting or lm.setting()):
        if lm.kind == "bytes":
            code_bytes(lm, io, buf, length, pbar)
        else:
            code_tokens(lm, io, buf, length, pbar, encoding)


def compress(data, lm, progress=True):
    """bytes -> container bytes."""
    io = EncodeIO()
    code(lm, io, bytearray(data), len(data), True, progress)
    name, setting = lm.name.encode()[:65535], pack_setting(lm.setting())
    body = (HEAD.pack(MAGIC, VERSION, KINDS[lm.kind], len(name), len(setting)) + name + setting
            + TAIL.pack(lm.digest, lm.context, len(data), zlib.crc32(data)) + io.coder.finish())
    return body + CHECK.pack(zlib.crc32(body))


def pack_setting(setting):
    """{"path": "integer", "version": "1", "weights": "int16"} -> b"integer;1;int16" (the fields of
    SETTING in order; at most 255 bytes)."""
    return ";".join(setting[k] for k in SETTING[setting["path"]]).encode()[:255]


def unpack_setting(raw):
    values = raw.decode("utf-8", "replace").split(";")
    return dict(zip(SETTING.get(values[0], ("path",)), values))


def read_header(blob):
    """The container's fields, after checking its magic, version and checksum."""
    if len(blob) < HEAD.size or blob[:4] != MAGIC:
        raise Corrupt("not a file this tool wrote (no LMZ header)")
    _, version, kind, name_len, setting_len = HEAD.unpack_from(blob)
    if version != VERSION:
        raise Corrupt(f"format version {version}; this tool reads version {VERSION}")
    start = HEAD.size + name_len + setting_len
    if len(blob) < start + TAIL.size + CHECK.size:
        raise Corrupt("truncated (shorter than its header)")
    if zlib.crc32(blob[:-CHECK.size]) != CHECK.unpack_from(blob, len(blob) - CHECK.size)[0]:
        raise Corrupt("damaged or truncated (checksum mismatch)")
    name = blob[HEAD.size:HEAD.size + name_len].decode("utf-8", "replace")
    digest, context, length, crc = TAIL.unpack_from(blob, start)
    kind = {v: k for k, v in KINDS.items()}.get(kind, "unknown")
    return {"kind": kind, "name": name, "setting": unpack_setting(blob[HEAD.size + name_len:start]),
            "digest": digest, "context": context, "length": length, "crc": crc,
            "code": blob[start + TAIL.size:-CHECK.size]}


def check_model(header, lm):
    if (lm.kind, lm.digest) != (header["kind"], header["digest"]):
        raise Corrupt(f"it was compressed with model {header['name']} ({header['kind']}, digest "
                      f"{header['digest'].hex()[:12]}), not with {lm.name} ({lm.kind}, digest {lm.digest.hex()[:12]}); "
                      f"pass --model {header['name']}")


def check_setting(header, lm):
    """Before decoding: the integer path must be the same version; a float predictor needs the same
    device, dtype and torch version (its thread count is restored by `threads`)."""
    was, now = header["setting"], lm.setting()
    if was.get("path") == "integer" and was == now:
        return
    if was.get("path") != now["path"] or was.get("path") == "integer":
        raise Corrupt(f"it was compressed with the {describe(was)} path; this is the {describe(now)} path"
                      + ("; pass --float" if was.get("path") == "float" and lm.kind == "bytes" else ""))
    if any(was.get(k) != now[k] for k in ("device", "dtype", "torch")):
        raise Corrupt(f"it was compressed with float {header['name']} on {describe(was)}: decompress needs the "
                      f"same device, dtype and torch version, and here it is {describe(now)}")


def describe(setting):
    if setting.get("path") == "integer":
        return f"integer v{setting.get('version')} ({setting.get('weights')} weights)"
    if setting.get("path") == "float":
        return (f"float, {setting.get('device')}, {setting.get('dtype')}, {setting.get('threads')} threads, "
                f"torch {setting.get('torch')}")
    return "unknown"


@contextmanager
def threads(setting):
    """A float predictor decodes with the thread count it encoded with (its sums depend on it). The
    integer path runs on one: its results do not depend on it, and its tensors are too small to gain
    from more (on the shared 2-core machine of the README, 2 threads decoded 10x slower than 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(setting["threads"]) if setting.get("path") == "float" else 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def decompress(blob, lm, progress=True):
    """container bytes -> bytes; raises Corrupt on any mismatch, before decoding where it can."""
    header = read_header(blob)
    check_setting(header, lm)
    check_model(header, lm)
    lm.context = header["context"]
    io = DecodeIO(header["code"])
    buf = bytearray(header["length"])
    code(lm, io, buf, header["length"], False, progress, header["setting"])
    if zlib.crc32(buf) != header["crc"] or io.coder.overrun() > 64:
        raise Corrupt("decoded bytes fail the CRC of the original (a float predictor computing other "
                      "probabilities than where it was compressed?)")
    return bytes(buf)
