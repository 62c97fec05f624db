"""Character-level GPT on Orwell's 1984: train, then sample.

    python gpt/main.py                      # the default config, meant for one GPU (not measured yet)
    python gpt/main.py --device cpu --n-layer 4 --n-head 4 --n-embd 128 --block-size 128 --batch-size 8 \\
        --dropout 0 --lr 2e-3 --steps 9000 --eval-interval 1000 --log-interval 50 --out-dir runs/gpt-cpu
                                            # the README's CPU result: 1.297 nats/char, 8 min on 2 cores
    python gpt/main.py --quick              # the whole pipeline on CPU in < 60 s
    python gpt/main.py --sample-only --pretrained   # samples from the shipped model (pretrained/gpt/), offline
    python gpt/main.py --benchmark [--quick] # one JSON line: tokens/s, step time, TFLOP/s, MFU (writes nothing)
    torchrun --nproc_per_node=4 gpt/main.py ...   # DistributedDataParallel

The novel is DIR/text/1984.txt for --data-dir DIR (default data/), downloaded there from
Project Gutenberg Australia (https://gutenberg.net.au/ebooks01/0100021.txt) when missing;
--data FILE trains on any other text.
"""
import argparse
import math
import os
import re
import sys
from pathlib import Path

from export import export_pretrained
from pretrained import pretrained_card
from sample import sample
from train import QUICK_OUT_DIR, benchmark, load_checkpoint, train

# --quick: a tiny model and a short run; flags given explicitly still win.
QUICK = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, dropout=0.0, batch_size=16, steps=300, lr=3e-3,
             warmup_steps=20, eval_interval=100, log_interval=10, num_samples=2, max_new_tokens=200,
             benchmark_steps=5, out_dir=QUICK_OUT_DIR)
# Flags that --resume does not take from the checkpoint: where things go and how to sample.
NOT_RESUMED = {"resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "compile", "compile_mode", "wandb", "prompt",
               "num_samples", "max_new_tokens", "temperature", "top_k", "pretrained", "export_pretrained"}


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


def positive(kind):
    return number(kind, 0, low_open=True)


def check_folder(p, flag, path):
    """A folder the run writes into: refused now if it, or the nearest existing path above it, is
    not a folder (mkdir would fail later, after the training)."""
    for d in [Path(path), *Path(path).parents]:
        if d.exists():
            if not d.is_dir():
                where = "is" if d == Path(path) else f"is inside {d}, which is"
                p.error(f"{flag} {path} {where} a file, not a folder; pass a folder (the file is left as it is)")
            return


def build_parser():
    """Every flag, declared once with its default."""
    p = Parser(prog="gpt/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               allow_abbrev=False)
    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0), default=1337, help="seeds weights, batches and sampling (>= 0)")
    g.add_argument("--data-dir", default="data", help="dataset root; the novel is DIR/text/1984.txt (downloaded there if missing)")
    g.add_argument("--out-dir", default="runs/gpt", help="checkpoint ckpt.pt, log.csv and generated.txt go here")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: --out-dir); 'images' refreshes the README's")
    g.add_argument("--steps", type=positive(int), default=5000, help="optimiser steps")
    g.add_argument("--batch-size", type=positive(int), default=64, help="sequences per micro-step and process")
    g.add_argument("--lr", type=positive(float), default=1e-3, help="peak learning rate")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt with its flags (same schedule and batches)")
    g.add_argument("--sample-only", action="store_true", help="skip training: sample and draw figures from --out-dir's checkpoint")
    g.add_argument("--pretrained", action="store_true", help="use the shipped weights in pretrained/gpt/ instead of a run folder")
    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None,
                   help="write pretrained/gpt/1984.{safetensors,json} from the finished run in RUN_DIR (scored on its "
                        "text: --data or --data-dir), then stop")
    g.add_argument("--quick", action="store_true", help="tiny model, 300 steps: the whole pipeline on CPU in under a minute")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="train on this text file instead of 1984")

    g = p.add_argument_group("model (on --resume and --sample-only, the checkpoint's)")
    g.add_argument("--n-layer", type=positive(int), default=6, help="Transformer blocks")
    g.add_argument("--n-head", type=positive(int), default=6, help="attention heads")
    g.add_argument("--n-embd", type=positive(int), default=384, help="width C, divisible by --n-head")
    g.add_argument("--block-size", type=positive(int), default=256, help="context length in characters")
    g.add_argument("--dropout", type=number(float, 0, 1), default=0.2, help="dropout probability")

    g = p.add_argument_group("training")
    g.add_argument("--min-lr", type=number(float, 0), default=1e-4, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-steps", type=number(int, 0), default=100, help="linear warmup steps")
    g.add_argument("--weight-decay", type=number(float, 0), default=0.1, help="AdamW weight decay, on matrices only")
    g.add_argument("--beta2", type=number(float, 0, 1), default=0.99, help="AdamW beta2")
    g.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--grad-accum", type=positive(int), default=1, help="micro-steps per optimiser step")
    g.add_argument("--eval-interval", type=positive(int), default=250, help="steps between validation + checkpoint")
    g.add_argument("--log-interval", type=positive(int), default=10, help="steps between log lines")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on with CUDA, off elsewhere)")
    g.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile's mode when compiling: reduce-overhead replays the model's kernels as CUDA "
                        "graphs (far fewer launches a step; CUDA only)")
    g.add_argument("--benchmark", action="store_true", help="time training steps of this config and print one JSON "
                                                            "line (tokens/s, step time, TFLOP/s, MFU); writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=20, help="--benchmark: timed steps after 3 warm-up ones (--quick: 5)")
    g.add_argument("--profile", action="store_true", help="--benchmark: then profile as many steps; the costliest "
                                                          "ops and, on CUDA, the GPU's busy share of a step to stderr")

    g = p.add_argument_group("sampling")
    g.add_argument("--prompt", default=None, help="text to continue (default: a newline, as if at a paragraph start)")
    g.add_argument("--num-samples", type=positive(int), default=3, help="samples to write to generated.txt")
    g.add_argument("--max-new-tokens", type=positive(int), default=500, help="characters per sample")
    g.add_argument("--temperature", type=positive(float), default=0.8, help="softmax temperature")
    g.add_argument("--top-k", type=positive(int), default=200, help="sample among the k likeliest characters")

    return p


def typed_flags(p, argv):
    """The destinations of the flags typed in argv (abbreviations are off, so a flag is its full name)."""
    typed = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {a.dest for a in p._actions if typed & set(a.option_strings)}


def apply_overrides(args, explicit, *layers):
    """Each layer (a dict of flag values) overrides the declared defaults and the layers before it;
    flags typed on the command line (explicit) override them all."""
    for layer in layers:
        for k, v in layer.items():
            if k not in explicit:
                setattr(args, k, v)
    return args


def parse_args(argv=None):
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    p = build_parser()
    args = p.parse_args(argv)
    # --quick's values, then a resumed run's flags or the shipped model's size; typed flags win over all.
    explicit = typed_flags(p, argv)
    apply_overrides(args, explicit, QUICK if args.quick else {})
    for flag, path in (("--out-dir", args.out_dir), ("--figures-dir", args.figures_dir)):
        if path is not None:
            check_folder(p, flag, path)
    if args.pretrained and args.resume:
        p.error("--pretrained starts from the shipped weights; --resume continues a run: choose one")
    if args.resume:
        saved = load_checkpoint(Path(args.out_dir) / "ckpt.pt", "cpu")["args"]
        apply_overrides(args, explicit, {k: v for k, v in saved.items() if k not in NOT_RESUMED})
    if args.pretrained:
        apply_overrides(args, explicit, {k: v for k, v in pretrained_card()["config"].items() if k != "vocab_size"})
    if args.profile and not args.benchmark:
        p.error("--profile profiles --benchmark's steps; add --benchmark")
    if args.benchmark and (args.resume or args.sample_only or args.pretrained):
        p.error("--benchmark times a fresh model; leave out --resume, --sample-only and --pretrained")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.prompt == "":
        p.error("--prompt is empty; give at least one character")
    if args.beta2 == 1:
        p.error("argument --beta2: '1': must be < 1 (AdamW divides by 1 - beta2^t)")
    if args.eval_interval % args.log_interval:
        p.error(f"--eval-interval {args.eval_interval} must be a multiple of --log-interval {args.log_interval}")
    args.figures_dir = args.figures_dir or args.out_dir
    return args


def command_of(saved):
    """The `python gpt/main.py ...` that reproduces a run's flags: those that differ from the defaults
    (for the card of --export-pretrained; --data-dir shown as DIR)."""
    p = build_parser()
    reference = vars(p.parse_args([]))
    words = ["python", "gpt/main.py"]
    for a in p._actions:
        v = saved.get(a.dest, reference.get(a.dest))
        if a.dest in NOT_RESUMED - {"pretrained"} or a.dest == "help" or v == reference.get(a.dest):
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            words.append(a.option_strings[0] if v else a.option_strings[1])
        elif a.nargs == 0:
            words.append(a.option_strings[0])
        else:
            words += [a.option_strings[0], "DIR" if a.dest == "data_dir" else str(v)]
    return " ".join(words)


def main(argv=None):
    args = parse_args(argv)
    if args.export_pretrained:
        return export_pretrained(Path(args.export_pretrained), args, command_of)
    if args.benchmark:
        return benchmark(args)
    if not args.sample_only:
        train(args)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone samples
        sample(args)


if __name__ == "__main__":
    main()
