"""Language Modeling Is Compression (Delétang, Ruoss et al., ICLR 2024): a model's next-symbol
probabilities drive an arithmetic coder, losslessly, on any bytes.

    python lm_compression/main.py train --data-dir /path/to/datasets         # a byte model on 1984's first 90%
    python lm_compression/main.py compress IN OUT [--model M]                # '-' is stdin / stdout
    python lm_compression/main.py decompress IN OUT                          # the model named in IN's header
    python lm_compression/main.py number "The quick brown fox"               # a sentence as one binary fraction, and back
    python lm_compression/main.py sample --bytes 300                         # decode coin flips: text from the model
    python lm_compression/main.py benchmark FILE... --model M                # rates and speeds against gzip, xz, zstd
    python lm_compression/main.py train --quick --data-dir /path/to/datasets # the whole pipeline on CPU in < 60 s
    python lm_compression/main.py train --benchmark [--quick] [--compile]    # time the training step: one JSON line

The README's CPU result (a byte model on 1984, then its held-out end against gzip, xz, zstd):
    python lm_compression/main.py train --data-dir /path/to/datasets --out-dir runs/lm_compression-cpu \
      --context 256 --n-layer 4 --n-head 4 --n-embd 128 --batch-size 16 --lr 2e-3 --steps 4000 \
      --eval-interval 500 --device cpu
    python lm_compression/main.py benchmark runs/lm_compression-cpu/byte_model.heldout.txt \
      --out-dir runs/lm_compression-cpu --device cpu --also-float

--data-dir: a folder holding text/1984.txt (or pass any text with --data FILE).
--model is a byte-model checkpoint (default: OUT_DIR/byte_model.pt, what `train` writes), a
Hugging Face causal LM name or local folder, or a .gguf file (through transformers' gguf loading).
A byte model codes through the integer-only path (intmodel.py): what one machine compresses, any
machine decompresses, whatever its threads or CPU (it runs on all cores; OMP_NUM_THREADS=1 for one,
faster where other jobs keep the cores busy). --float runs it in float instead; float (and
every Hugging Face model) decompresses only with the device, dtype and torch version it was
compressed with (the file records them; the thread count is restored).
"""
import argparse
import gzip
import json
import math
import os
import re
import secrets
import stat
import sys
import time
from pathlib import Path

import torch

from benchmark import benchmark, coder_benchmark, plot
from codec import Corrupt, DecodeIO, EncodeIO, code, compress, decompress, read_header
from intmodel import fuse
from predictors import load_predictor
from sample import sample
from train import benchmark as benchmark_training, read_text, resolve_device, split, train
from weights import PRETRAINED, export_pretrained

SHARED = ("shared flags, on every command: --device, --seed, --data-dir, --out-dir, --pretrained; on train: --quick, "
          "--resume, --sample-only, --wandb, --benchmark, --benchmark-steps, --compile; on benchmark: --figures-dir; "
          "before the command: --export-pretrained RUN_DIR")
# train's defaults: the README's model, measured not to memorise 1984 in 4,000 steps (a 6 x 512 one did by 1,500)
TRAIN = dict(steps=4000, batch_size=16, lr=2e-3, context=256, n_layer=4, n_head=4, n_embd=128, dropout=0.0,
             weight_decay=0.1, warmup_steps=200, eval_interval=500, val_fraction=0.1, benchmark_steps=20)
QUICK = dict(steps=150, batch_size=16, context=64, n_layer=2, n_head=2, n_embd=64, eval_interval=50,
             warmup_steps=10, lr=3e-3, benchmark_steps=3)
OUT_DIR, QUICK_OUT_DIR = "runs/lm_compression", "runs/lm_compression-quick"
QUICK_ROUND_TRIP = 16_384  # --quick codes only the start of the held-out text


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def device(s):
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"{s!r}: choose auto, cpu, cuda, cuda:N or mps")
    return s


def number(kind, low, high=math.inf, low_open=False):
    """An argparse type: a finite `kind` in [low, high], or in (low, high] with low_open."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {s!r}")
        if not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
            raise argparse.ArgumentTypeError(
                f"{s!r}: must be {'>' if low_open else '>='} {low}" + (f" and <= {high}" if high < math.inf else ""))
        return v
    return parse


def shared_flags():
    """The flags every command takes, and those of the commands that code with a model."""
    shared = argparse.ArgumentParser(add_help=False)
    g = shared.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0, 2 ** 32 - 1), default=0, help="seeds training and sampling")
    g.add_argument("--data-dir", default="data", help="dataset root holding text/1984.txt (the default training text)")
    g.add_argument("--out-dir", default=None, help=f"where `train` writes byte_model.pt, the default --model "
                                                    f"(default: {OUT_DIR}, {QUICK_OUT_DIR} with --quick)")
    g.add_argument("--pretrained", action="store_true", help="use the shipped weights in pretrained/lm_compression/ "
                   "instead of a run folder")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default=None, help="byte-model checkpoint, Hugging Face name or folder, or .gguf "
                                                     "file (default: OUT_DIR/byte_model.pt)")
    model.add_argument("--context", type=number(int, 16, 1 << 20), default=2048,
                       help="a token LM's chunk, in bytes (the paper: 2048); a byte model uses its own context")
    model.add_argument("--float", action="store_true", help="run a byte model in float, not through the integer "
                       "path (float decodes only with the same device, dtype, torch version; decompress reads "
                       "which from the file)")
    model.add_argument("--compile", action="store_true", help="torch.compile the integer path's element-wise "
                       "kernels (the same bytes; faster on long inputs, after seconds of compiling)")
    return shared, model


def build_parser():
    """Every command and flag, declared once; train's defaults are applied after parsing (`apply_overrides`)."""
    shared, model = shared_flags()
    force = argparse.ArgumentParser(add_help=False)
    force.add_argument("--force", action="store_true", help="replace an existing OUT (never IN itself)")
    p = Parser(prog="lm_compression/main.py", description=__doc__, epilog=SHARED,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export-pretrained", metavar="RUN_DIR", default=None, help="write pretrained/lm_compression/"
                   "byte_model.{safetensors,json} from a finished run (RUN_DIR/byte_model.pt), and SHA256SUMS")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name, help in (("compress", "IN -> OUT, '-' for stdin/stdout"), ("decompress", "IN -> OUT, exactly the original")):
        c = sub.add_parser(name, parents=[shared, model, force], help=help)
        c.add_argument("input", metavar="IN")
        c.add_argument("output", metavar="OUT")
    n = sub.add_parser("number", parents=[shared, model], help="a sentence as a binary fraction in [0, 1), and back")
    n.add_argument("text")
    s = sub.add_parser("sample", parents=[shared, model], help="decode coin flips with the model: a sample")
    s.add_argument("--bytes", type=number(int, 1, 1 << 16), default=400, help="about this many bytes")
    c = sub.add_parser("benchmark-coder", parents=[shared, model], help="time compress and decompress of one input "
                       "(default 1 MiB) with one model; one JSON line, nothing written")
    c.add_argument("file", nargs="?", metavar="FILE", help="the text (repeated up to --bytes; default: random bytes)")
    c.add_argument("--bytes", type=number(int, 1), default=1 << 20, help="bytes to code (default 1 MiB)")
    b = sub.add_parser("benchmark", parents=[shared], help="rates and speeds against gzip -9, xz -9, zstd -19")
    b.add_argument("files", nargs="+", metavar="FILE")
    b.add_argument("--model", action="append", default=None, help="a model to measure (repeatable; "
                                                                    "default: OUT_DIR/byte_model.pt)")
    b.add_argument("--context", type=number(int, 16, 1 << 20), default=2048, help="a token LM's chunk, in bytes")
    b.add_argument("--also-float", action="store_true", help="measure a byte model in float too, beside the "
                                                              "integer path")
    b.add_argument("--limit", type=number(int, 0), default=0, help="only the first N bytes of each file (0: all)")
    b.add_argument("--figures-dir", default=None, help="also draw the rates (default: OUT_DIR)")
    add_train_flags(sub.add_parser("train", parents=[shared], help="a byte-level Transformer on a text, its end held out"))
    return p


def add_train_flags(t):
    """train's flags; those of TRAIN default to None here: `apply_overrides` fills them (--quick's or TRAIN's)."""
    t.add_argument("--data", default=None, help="the training text (default: DATA_DIR/text/1984.txt)")
    t.add_argument("--out", default=None, help="the checkpoint (default: OUT_DIR/byte_model.pt)")
    t.add_argument("--quick", action="store_true", help="a tiny model, 150 steps, then the whole pipeline (< 60 s on CPU)")
    t.add_argument("--resume", action="store_true", help="continue --out where it stopped")
    t.add_argument("--sample-only", action="store_true", help="skip training: held-out rate, round trip and a sample")
    t.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    t.add_argument("--compile", action="store_true", help="torch.compile the model for the training step (and the "
                   "integer path's kernels for the round trip after it)")
    t.add_argument("--benchmark", action="store_true", help="only time the training step of these flags (on the "
                   "training text if it is here, else random bytes) and print one JSON line; writes nothing")
    flags = {"benchmark_steps": (number(int, 1), "--benchmark's timed steps, after warm-up ones"),
             "steps": (number(int, 1), "optimiser steps"), "batch_size": (number(int, 1), "chunks per step"),
             "lr": (number(float, 0, low_open=True), "peak learning rate (AdamW)"),
             "context": (number(int, 8, 1 << 16), "bytes per chunk (the paper: 2048)"),
             "n_layer": (number(int, 1), "Transformer blocks"), "n_head": (number(int, 1), "attention heads"),
             "n_embd": (number(int, 8), "width"), "dropout": (number(float, 0, 0.99), "dropout probability"),
             "weight_decay": (number(float, 0), "AdamW's, on the matrices"),
             "warmup_steps": (number(int, 0), "linear warmup, then cosine to 10%%"),
             "eval_interval": (number(int, 1), "held-out rate and checkpoint every N steps (the checkpoint keeps "
                                               "the best held-out weights)"),
             "val_fraction": (number(float, 0.01, 0.9), "the end of the text held out")}
    for name, (kind, help) in flags.items():
        t.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                       help=f"{help} (default {TRAIN[name]}; --quick: {QUICK.get(name, TRAIN[name])})")


def apply_overrides(args):
    """In one place, what the command line left out: train's flags from --quick's values or TRAIN's."""
    for name, default in TRAIN.items():
        if getattr(args, name) is None:
            setattr(args, name, QUICK.get(name, default) if args.quick else default)
    args.benchmark_warmup = 10 if args.compile else 3          # compiling happens in the first steps


def parse_args(argv=None):
    """Flags, parsed once; train's defaults, --out-dir's default and the output folders checked."""
    p = build_parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        if args.export_pretrained:
            return args
        p.error("choose a command: compress, decompress, number, sample, benchmark, benchmark-coder, train")
    args.explicit_out_dir = args.out_dir is not None
    if args.command == "train":
        apply_overrides(args)
        if args.n_embd % args.n_head:
            p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    args.out_dir = args.out_dir or (QUICK_OUT_DIR if getattr(args, "quick", False) else OUT_DIR)
    check_folder(p, "--out-dir", args.out_dir)
    if args.command == "train":
        args.out = args.out or str(Path(args.out_dir) / "byte_model.pt")
        check_folder(p, "--out's folder", Path(args.out).parent)
    if args.command == "benchmark" and args.figures_dir:
        check_folder(p, "--figures-dir", args.figures_dir)
    return args


def check_folder(p, flag, path):
    """A folder the command would create or write into must not be an existing file."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists() and not parent.is_dir():
            p.error(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag.split()[0]}")


def default_models(args):
    """Where a command looks for the byte model when --model is not given: OUT_DIR/byte_model.pt; without
    --out-dir also what `train --quick` writes."""
    if args.explicit_out_dir:
        return [Path(args.out_dir) / "byte_model.pt"]
    return [Path(OUT_DIR) / "byte_model.pt", Path(QUICK_OUT_DIR) / "byte_model.pt"]


def model_spec(args):
    """What --model or --pretrained names (None: where `train` writes)."""
    if args.pretrained and args.model:
        raise SystemExit("lm_compression: --pretrained and --model name two models; pass one of them")
    return PRETRAINED if args.pretrained else args.model


def load(args, spec, integer=True):
    """The predictor for --model SPEC, the shipped byte model with --pretrained, or (SPEC None) the byte
    model where `train` writes it; a byte model through the integer path unless `integer` is False."""
    if spec is None:
        found = [p for p in default_models(args) if p.is_file()]
        if not found:
            looked = " or ".join(str(p) for p in default_models(args))
            raise SystemExit(f"lm_compression: no model at {looked}; train one (python lm_compression/main.py "
                             f"train --data-dir /path/to/datasets) or pass --model (a byte-model checkpoint, a "
                             f"Hugging Face name or folder, or a .gguf file)")
        spec = str(found[0])
        if not args.explicit_out_dir and found[0] != default_models(args)[0]:
            print(f"using {spec} (what `train --quick` wrote; pass --model to choose another)", file=sys.stderr)
    t0 = time.perf_counter()
    lm = load_predictor(spec, resolve_device(args.device), getattr(args, "context", 2048), integer)
    if getattr(args, "compile", False) and lm.inference == "integer":   # not on `benchmark`
        fuse()
    if time.perf_counter() - t0 > 2:
        print(f"loaded {spec} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return lm


def read_input(name):
    if name == "-":
        return sys.stdin.buffer.read()
    if not Path(name).is_file():
        raise SystemExit(f"lm_compression: no input file {name}")
    return Path(name).read_bytes()


def check_output(args):
    """Refuse to write over the input, over a folder, into a missing folder, or over a file without --force."""
    if args.output == "-":
        return
    out = Path(args.output)
    if args.input != "-" and out.exists() and out.resolve() == Path(args.input).resolve():
        raise SystemExit(f"lm_compression: OUT {out} is the input file; choose another OUT")
    if out.is_dir():
        raise SystemExit(f"lm_compression: OUT {out} is a folder; name a file (inside it, say)")
    if not out.parent.is_dir():
        raise SystemExit(f"lm_compression: OUT {out}: there is no folder {out.parent}; create it first")
    if out.exists() and not args.force:
        raise SystemExit(f"lm_compression: {out} exists; pass --force to replace it")


def write_output(name, data):
    """Atomic: a temp file in OUT's folder, renamed over OUT only once complete. The temp file is
    created 0666 less the umask, as open(OUT, 'w') would (an OUT being replaced keeps its mode)."""
    if name == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    out = Path(name)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if out.is_file():
            os.chmod(tmp, stat.S_IMODE(out.stat().st_mode))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def report(what, n_in, n_out, raw, seconds):
    print(f"{what}: {n_in:,} -> {n_out:,} bytes in {seconds:.1f} s, {raw / max(seconds, 1e-9) / 1e3:,.1f} kB/s "
          f"of the original", file=sys.stderr)


def cmd_compress(args):
    check_output(args)
    data = read_input(args.input)
    lm = load(args, model_spec(args), not args.float)
    t0 = time.perf_counter()
    blob = compress(data, lm)
    write_output(args.output, blob)
    report("compressed", len(data), len(blob), len(data), time.perf_counter() - t0)


def cmd_decompress(args):
    check_output(args)
    blob = read_input(args.input)
    try:
        header = read_header(blob)
        if not (args.model or args.pretrained) and header["name"].endswith(".pt") and not Path(header["name"]).exists():
            raise Corrupt(f"it was compressed with the byte model {header['name']}, which is not here; pass --model")
        lm = load(args, model_spec(args) or header["name"], header["setting"].get("path") != "float")
        t0 = time.perf_counter()
        data = decompress(blob, lm)
    except Corrupt as e:
        raise SystemExit(f"lm_compression: {args.input}: {e}; nothing was written")
    write_output(args.output, data)
    report("decompressed", len(blob), len(data), len(data), time.perf_counter() - t0)


def cmd_number(args):
    lm = load(args, model_spec(args), not args.float)
    data = args.text.encode("utf-8")
    enc = EncodeIO()
    code(lm, enc, bytearray(data), len(data), True, progress=False)
    bits = enc.coder.finish_bits()
    digits = "".join(map(str, bits))
    buf = bytearray(len(data))
    code(lm, DecodeIO(bits=bits), buf, len(data), False, progress=False)
    print(f"{args.text!r}: {len(data)} bytes, coded with {lm.name}")
    print(f"as a binary fraction: 0.{digits}  ({len(bits)} bits, {len(bits) / max(1, len(data)):.2f} bits/byte)")
    decimal = str(int(digits, 2) * 5 ** len(bits)).rjust(len(bits), "0").rstrip("0") or "0"  # x / 2^n = x 5^n / 10^n
    print(f"the same number in decimal, exactly: 0.{decimal}")
    print(f"decoded back from the number and the length: {bytes(buf).decode('utf-8', 'replace')!r}  "
          f"({'exact' if bytes(buf) == data else 'MISMATCH'})")


def cmd_sample(args):
    print(sample(load(args, model_spec(args), not args.float), args.bytes, args.seed).decode("utf-8", "replace"))


def cmd_benchmark_coder(args):
    """One JSON line: compress and decompress of --bytes of FILE (repeated) or of random bytes, timed."""
    lm = load(args, model_spec(args), not args.float)
    if args.file:
        text = read_input(args.file) or b"\0"
        data = (text * (args.bytes // len(text) + 1))[:args.bytes]
    else:
        data = bytes(torch.randint(256, (args.bytes,), generator=torch.Generator().manual_seed(args.seed)).tolist())
    print(json.dumps(coder_benchmark(lm, data, "real" if args.file else "random") | {"compile": args.compile}))


def cmd_benchmark(args):
    lms = [load(args, spec) for spec in args.model or ([PRETRAINED] if args.pretrained else [None])]
    lms += [load(args, lm.name, integer=False) for lm in lms if args.also_float and lm.inference == "integer"]
    results = benchmark(args.files, lms, args.limit)
    fig_dir = Path(args.figures_dir or args.out_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    plot(results, fig_dir / "lm_compression_rates.png")
    print(f"wrote {fig_dir / 'lm_compression_rates.png'}")


def cmd_train(args):
    """Train (unless --sample-only), then the whole pipeline on the held-out text: rate, round trip, a sample."""
    if args.benchmark:
        return benchmark_training(args)
    if not args.sample_only:
        train(args)
    lm = load(args, PRETRAINED if args.pretrained and args.sample_only else args.out)
    _, held_out = split(read_text(args)[1], args.val_fraction)
    path = Path(args.out).with_suffix(".heldout.txt")       # for `benchmark`
    write_output(str(path), held_out)
    held_out = held_out[:QUICK_ROUND_TRIP] if args.quick else held_out
    t0 = time.perf_counter()
    blob = compress(held_out, lm)
    seconds = time.perf_counter() - t0
    exact = decompress(blob, lm, progress=False) == held_out
    print(f"held-out text ({path}{', its start' if args.quick else ''}, {len(held_out):,} bytes): {len(blob):,} bytes compressed "
          f"({len(blob) / len(held_out):.1%}; gzip -9: {len(gzip.compress(held_out, 9)) / len(held_out):.1%}), "
          f"{len(held_out) / seconds / 1e3:.1f} kB/s; decompressed {'exactly' if exact else 'WRONG'}")
    print("a sample (coin flips decoded by the model):\n" + sample(lm, 300, args.seed).decode("utf-8", "replace"))
    print(f"compress with it: python lm_compression/main.py compress IN OUT --model {args.out}")


def main(argv=None):
    args = parse_args(argv)
    if args.command is None:                                  # --export-pretrained RUN_DIR
        return export_pretrained(args.export_pretrained, {k: v for k, v in TRAIN.items() if k != "benchmark_steps"})
    try:
        {"compress": cmd_compress, "decompress": cmd_decompress, "number": cmd_number, "sample": cmd_sample,
         "benchmark": cmd_benchmark, "benchmark-coder": cmd_benchmark_coder, "train": cmd_train}[args.command](args)
    except KeyboardInterrupt:  # train's loop handles its own (it names the checkpoint to resume)
        raise SystemExit(f"lm_compression: {args.command} interrupted (Ctrl-C)"
                         + ("; nothing was written" if args.command in ("compress", "decompress") else ""))


if __name__ == "__main__":
    main()
