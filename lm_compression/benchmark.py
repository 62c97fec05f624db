"""Compression rate (compressed / raw) and speed: language models against gzip -9, xz -9 and
zstd -19, on whole files and, as in the paper (Sec. 3), in independent 2048-byte chunks.

Chunked rates follow the paper's code: each chunk is compressed on its own and the container
overhead (the size of an empty input's output) is counted once, not once per chunk. A language
model's rate is its container's size over the raw size; its chunks are its context, all in one
container. Every language-model result is decompressed and compared with the input.
"""
import gzip
import lzma
import shutil
import subprocess
import time
from pathlib import Path

import torch

from codec import compress, decompress, group_for

CHUNK = 2048


def zstd(*flags):
    return lambda data: subprocess.run(["zstd", *flags, "-q", "-c"], input=data, capture_output=True,
                                       check=True).stdout


def classical():
    """name -> (compress, decompress), for those installed."""
    found = {"gzip -9": (lambda d: gzip.compress(d, 9, mtime=0), gzip.decompress),
             "xz -9": (lambda d: lzma.compress(d, preset=9), lzma.decompress)}
    if shutil.which("zstd"):
        found["zstd -19"] = (zstd("-19"), zstd("-d"))
    return found


def measure(fn, data):
    t0 = time.perf_counter()
    out = fn(data)
    return out, time.perf_counter() - t0


def run_classical(name, pack, unpack, data):
    """Rows for the whole file and for 2048-byte chunks (overhead counted once)."""
    whole, seconds = measure(pack, data)
    _, back_seconds = measure(unpack, whole)
    overhead = len(pack(b""))
    chunks, t0 = [], time.perf_counter()
    for i in range(0, len(data), CHUNK):
        chunks.append(pack(data[i:i + CHUNK]))
    t1 = time.perf_counter()
    for c in chunks:
        unpack(c)
    size = sum(map(len, chunks)) - overhead * (len(chunks) - 1)
    return [(name, "whole file", len(whole), seconds, back_seconds),
            (name, f"{CHUNK}-byte chunks", size, t1 - t0, time.perf_counter() - t1)]


def run_lm(lm, data):
    blob, seconds = measure(lambda d: compress(d, lm), data)
    back, back_seconds = measure(lambda b: decompress(b, lm), blob)
    if back != data:
        raise SystemExit(f"lm_compression: {lm.name} did not round-trip; this is a bug")
    return (Path(lm.name).name, f"{lm.context}-byte chunks ({lm.kind}, {lm.inference})", len(blob), seconds,
            back_seconds)


def coder_benchmark(lm, data, kind):
    """`benchmark-coder`: compress, then decompress, `data` with one model; the row as a dict (kB = 1000 bytes)."""
    blob, seconds = measure(lambda d: compress(d, lm, progress=False), data)
    back, back_seconds = measure(lambda b: decompress(b, lm, progress=False), blob)
    device = f"cuda:0 {torch.cuda.get_device_name(lm.device)}" if str(lm.device).startswith("cuda") else str(lm.device)
    return {"folder": "lm_compression", "device": device, "torch": torch.__version__, "model": lm.name,
            "inference": lm.inference, "context": lm.context, "chunks_side_by_side": group_for(lm) if lm.kind == "bytes" else 1,
            "threads": torch.get_num_threads(), "bytes": len(data),
            "data": kind, "compressed_bytes": len(blob), "rate": len(blob) / len(data),
            "compress_kB_s": len(data) / seconds / 1e3, "decompress_kB_s": len(data) / back_seconds / 1e3,
            "exact": back == data}


def table(path, data, rows):
    lines = [f"{path} ({len(data):,} bytes)", "",
             "| compressor | input | rate | compressed bytes | compress | decompress |", "|---|---|---|---|---|---|"]
    for name, mode, size, seconds, back in rows:
        def speed(seconds):
            rate = len(data) / max(seconds, 1e-9)
            return f"{rate / 1e3:,.1f} kB/s" if rate >= 1e3 else f"{rate:,.0f} B/s"
        lines.append(f"| {name} | {mode} | {size / max(1, len(data)):.1%} | {size:,} | {speed(seconds)} | {speed(back)} |")
    return "\n".join(lines)


def benchmark(files, lms, limit=0):
    """Per file: (name, raw size, rows); each table printed as soon as it is measured."""
    results = []
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise SystemExit(f"lm_compression: benchmark: no file {path}")
        data = path.read_bytes()[:limit or None]
        rows = [row for name, (pack, unpack) in classical().items() for row in run_classical(name, pack, unpack, data)]
        rows += [run_lm(lm, data) for lm in lms]
        results.append((path.name, len(data), rows))
        print(table(path, data, rows) + "\n", flush=True)
    return results


def plot(results, path):
    """Horizontal bars: the rate of every compressor on every file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt                                     # here: every command starts faster
    fig, axes = plt.subplots(1, len(results), figsize=(3 + 4 * len(results), 0.5 * len(results[0][2]) + 1.5),
                             squeeze=False, sharey=True)                # every file has the same compressors
    for ax, (name, n, rows) in zip(axes[0], results):
        rates = [r[2] / max(1, n) for r in rows]
        ax.barh(range(len(rows)), rates, color=["tab:blue" if "(" in r[1] else "tab:gray" for r in rows])
        ax.set_yticks(range(len(rows)), [f"{r[0]}, {r[1]}" for r in rows], fontsize=8)
        for i, rate in enumerate(rates):
            ax.text(rate, i, f" {rate:.1%}", va="center", fontsize=8)
        ax.set(xlabel="compressed / raw (lower is better)", title=f"{name} ({n:,} bytes)")
        ax.set_xlim(0, max(rates) * 1.2)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
