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

Container (big-endian): magic, version (3; version 2, without the group field, is still read),
predictor kind, model name, the predictor's setting (the integer path's version, or a float
predictor's device, dtype, threads and torch version), 16-byte weight digest, chunk size, chunks
coded side by side, original length, CRC-32 of the original; the code; CRC-32 of everything before it.

Speed: the integer path encodes from full passes (every input is known; its integers equal the
position-by-position ones), so only decoding steps through the KV cache, `group_for(lm)` chunks at a time;
each step's frequencies stay on the predictor's device until the coder needs them (encoding: three
numbers per byte; decoding: the rows, once per step).
"""
import struct
import zlib
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from coder import Decoder, Encoder
from model import BOS
from train import device_memory

MAGIC, VERSION = b"LMZ\x1a", 3
KINDS = {"bytes": 0, "tokens": 1}
HEAD = struct.Struct(">4sBBHB")          # magic, version, kind, name length, setting length; name, setting
TAIL = struct.Struct(">16sIIQI")         # digest, chunk size, chunks side by side, original length, CRC-32 of it
TAIL_V2 = struct.Struct(">16sIQI")       # version 2: no chunks side by side, always 32
CHECK = struct.Struct(">I")              # CRC-32 of the container up to here
UNIFORM = np.arange(257, dtype=np.int64)  # cumulative frequencies of a uniform byte
GROUP, GROUP_V2 = 2048, 32               # byte model: at most GROUP chunks coded side by side (a batch per
                                         # decoding step; 512 before 2026-12-01: the container records it)
CACHE_BUDGET = 2 << 30                   # bytes of decoding's KV cache a group of chunks may take
ESCAPE_STEP = 32                         # escaped bytes: counts start at 1, +32 per occurrence
SETTING = {"integer": ("path", "version", "weights"),              # what the container records
           "float": ("path", "device", "dtype", "threads", "torch")}


class Corrupt(Exception):
    """The code does not decode to what the container promises."""


class EncodeIO:
    """code(cum, s): write s, return it; code_step(cum, symbols): a batch of them, one per row of cum."""

    def __init__(self):
        self.coder = Encoder()

    def code(self, cum, s):
        self.coder.encode(cum, s)
        return s

    def code_step(self, cum, symbols):
        """cum (B, V + 1) on the predictor's device; symbols (B,) int64 on the CPU. Each symbol's share
        (cum[s], cum[s + 1], total) gathered on the device: three numbers per symbol reach the coder."""
        s = symbols.to(cum.device)[:, None]
        shares = torch.cat([cum.gather(1, s), cum.gather(1, s + 1), cum[:, -1:]], 1).tolist()
        for lo, hi, total in shares:
            self.coder.encode_range(lo, hi, total)
        return symbols


class DecodeIO:
    """code(cum, _): read a symbol, return it."""

    def __init__(self, data=b"", bits=None):
        self.coder = Decoder(data, bits)

    def code(self, cum, _):
        return self.coder.decode(cum)

    def code_step(self, cum, _):
        """cum (B, V + 1) -> (B,) symbols read one after the other (each narrows the interval the next reads)."""
        return torch.tensor([self.coder.decode(row) for row in cum.cpu().numpy()])


def code_uint16(io, n=0):
    return io.code(UNIFORM, n >> 8) << 8 | io.code(UNIFORM, n & 255)


def utf8_cut(buf, start, end):
    """`end`, moved back over at most 3 continuation bytes so that a chunk does not split a character."""
    cut = end
    while cut < len(buf) and cut > start + 1 and end - cut < 3 and buf[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut


def group_for(lm):
    """Chunks coded side by side: as many as CACHE_BUDGET holds the decoding KV cache of, at most GROUP (the
    shipped model: 2048). It depends on the model's shape alone, so a model and an input give the same bytes
    on every machine."""
    return max(1, min(GROUP, CACHE_BUDGET // lm.cache_bytes))


def check_memory(lm, group, length):
    """Refuse, in one line, a decoding whose KV cache (`group` chunks side by side) cannot fit the device."""
    need = min(group, -(-length // lm.context)) * lm.cache_bytes
    device, have = str(lm.device), device_memory(lm.device)
    if need > have:
        raise SystemExit(f"lm_compression: decoding this file takes about {need / 2**30:,.1f} GiB for the model's "
                         f"cache ({group} chunks side by side, as it was compressed) and {device} has "
                         f"{have / 2**30:,.1f} GiB; decompress it on a machine with more memory")


def full_pass(device):
    """Chunks per full forward pass when encoding; the bytes do not depend on it. 8 on a CPU (small tensors:
    1.2x faster than 32 with --compile), 256 elsewhere: on a GPU a pass costs its ~1,360 kernel launches
    whatever its size (not measured: no GPU was lent)."""
    return 8 if torch.device(device).type == "cpu" else 256


def encode_bytes_full(lm, io, buf, length, pbar, group=GROUP):
    """The integer path's encoder: every byte's share of the frequencies from full passes over its chunk
    (all inputs are known), then the coder in the order `code_bytes` decodes: group by group, position by
    position, chunk by chunk."""
    C, n = lm.context, -(-length // lm.context)
    y = torch.zeros(n * C, dtype=torch.long)
    y[:length] = torch.frombuffer(bytearray(buf[:length]), dtype=torch.uint8)
    y = y.view(n, C)                                         # (n, C); the last chunk padded (causal: unread)
    x = torch.cat([torch.full((n, 1), BOS), y[:, :-1]], 1)
    k = full_pass(lm.device)
    shares = torch.cat([lm.shares(x[i:i + k], y[i:i + k]) for i in range(0, n, k)])
    coded = torch.arange(n * C).view(n, C) < length          # (n, C): positions inside the input
    for g in range(0, n, group):
        in_order = shares[g:g + group].transpose(0, 1)[coded[g:g + group].T]   # (positions, 3), t-major
        for lo, hi, total in in_order.tolist():
            io.coder.encode_range(lo, hi, total)
        pbar.update(len(in_order))


def code_bytes(lm, io, buf, length, pbar, group=GROUP):
    """Byte model: buf[i] for i < length, in chunks of lm.context, `group` chunks side by side (one batch
    per forward pass, their bytes interleaved position by position in the code stream)."""
    if not length:
        return
    view = np.frombuffer(buf, dtype=np.uint8)                # writes go to buf
    for first in torch.arange(0, length, lm.context).split(group):  # (B,) the group's chunk starts
        n_last = min(lm.context, length - int(first[-1]))    # only the input's last chunk can be shorter
        inputs, past = torch.full((len(first),), BOS), None  # a finished chunk keeps its last byte as input
        for t in range(lm.context if len(first) > 1 else n_last):
            B = len(first) - (t >= n_last)                   # chunks still coding at position t
            cum, past = lm.freqs(inputs, past)               # (len(first), 257)
            at = (first[:B] + t).numpy()
            inputs[:B] = io.code_step(cum[:B], torch.from_numpy(view[at].astype(np.int64)))
            view[at] = inputs[:B].numpy()
            pbar.update(B)


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
                token = io.code(cum[0].numpy(), ids[i] if encoding else 0)
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


def code(lm, io, buf, length, encoding, progress=True, setting=None, group=GROUP):
    """The loop both directions share; buf holds the input (encoding) or receives it (decoding), with
    the threads of `setting` (what the container recorded; by default the predictor's own) and a byte
    model's `group` of chunks side by side."""
    with tqdm(total=length, unit="B", unit_scale=True, desc="compress" if encoding else "decompress",
              disable=not progress or length < 4096, dynamic_ncols=True, leave=False) as pbar, \
            threads(setting or lm.setting()):
        if lm.kind == "bytes" and encoding and lm.inference == "integer" and length:
            encode_bytes_full(lm, io, buf, length, pbar, group)
        elif lm.kind == "bytes":
            code_bytes(lm, io, buf, length, pbar, group)
        else:
            code_tokens(lm, io, buf, length, pbar, encoding)


def compress(data, lm, progress=True, group=None):
    """bytes -> container bytes; a byte model codes `group` chunks side by side (default `group_for(lm)`)."""
    group = group or (group_for(lm) if lm.kind == "bytes" else GROUP)
    io = EncodeIO()
    code(lm, io, bytearray(data), len(data), True, progress, group=group)
    name, setting = lm.name.encode()[:65535], pack_setting(lm.setting())
    body = (HEAD.pack(MAGIC, VERSION, KINDS[lm.kind], len(name), len(setting)) + name + setting
            + TAIL.pack(lm.digest, lm.context, group, len(data), zlib.crc32(data)) + io.coder.finish())
    return body + CHECK.pack(zlib.crc32(body))


def pack_setting(setting):
    """{"path": "integer", "version": "1", "weights": "int16"} -> b"integer;1;int16" (the fields of
    SETTING in order; at most 255 bytes)."""
    return ";".join(setting[k] for k in SETTING[setting["path"]]).encode()[:255]


def unpack_setting(raw):
    values = raw.decode("utf-8", "replace").split(";")
    return dict(zip(SETTING.get(values[0], ("path",)), values))


def read_header(blob):
    """The container's fields, after checking its magic, version and checksum. Version 2 (before the
    group of chunks side by side was recorded: always 32) is still read."""
    if len(blob) < HEAD.size or blob[:4] != MAGIC:
        raise Corrupt("not a file this tool wrote (no LMZ header)")
    _, version, kind, name_len, setting_len = HEAD.unpack_from(blob)
    if version not in (2, VERSION):
        raise Corrupt(f"format version {version}; this tool reads versions 2 and {VERSION}")
    start, tail = HEAD.size + name_len + setting_len, TAIL if version == VERSION else TAIL_V2
    if len(blob) < start + tail.size + CHECK.size:
        raise Corrupt("truncated (shorter than its header)")
    if zlib.crc32(blob[:-CHECK.size]) != CHECK.unpack_from(blob, len(blob) - CHECK.size)[0]:
        raise Corrupt("damaged or truncated (checksum mismatch)")
    name = blob[HEAD.size:HEAD.size + name_len].decode("utf-8", "replace")
    fields = tail.unpack_from(blob, start)
    digest, context, group, length, crc = fields if version == VERSION else (*fields[:2], GROUP_V2, *fields[2:])
    if group < 1:
        raise Corrupt("no chunks side by side (0 in its header)")
    kind = {v: k for k, v in KINDS.items()}.get(kind, "unknown")
    return {"version": version, "kind": kind, "name": name,
            "setting": unpack_setting(blob[HEAD.size + name_len:start]), "digest": digest, "context": context,
            "group": group, "length": length, "crc": crc, "code": blob[start + tail.size:-CHECK.size]}


def check_model(header, lm):
    """The model the container names (by its weights' digest) must be the one here."""
    if (lm.kind, lm.digest) != (header["kind"], header["digest"]):
        hint = "--pretrained" if header["name"].startswith("pretrained:") else f"--model {header['name']}"
        raise Corrupt(f"it was compressed with model {header['name']} ({header['kind']}, digest "
                      f"{header['digest'].hex()[:12]}), not with {lm.name} ({lm.kind}, digest {lm.digest.hex()[:12]}); "
                      f"pass {hint}")


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
    integer path keeps torch's (all cores unless OMP_NUM_THREADS or torch.set_num_threads say
    otherwise): its integers do not depend on it."""
    before = torch.get_num_threads()
    if setting.get("path") == "float":
        torch.set_num_threads(int(setting["threads"]))
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
    if lm.kind == "bytes":
        check_memory(lm, header["group"], header["length"])
    io = DecodeIO(header["code"])
    buf = bytearray(header["length"])
    code(lm, io, buf, header["length"], False, progress, header["setting"], header["group"])
    if zlib.crc32(buf) != header["crc"] or io.coder.overrun() > 64:
        raise Corrupt("decoded bytes fail the CRC of the original (a float predictor computing other "
                      "probabilities than where it was compressed?)")
    return bytes(buf)
