"""Graph convolution (GCN) and graph attention (GAT) networks classifying MNIST digits
turned into pixel graphs: train, then test accuracy, training curves and the graph of a
digit with its edge weights. --speed times sparse O(E) against dense O(N^2) layers.

    python gnns/main.py --model gcn      # the README results
    python gnns/main.py --model gat      # (then the curve shows both)
    python gnns/main.py --speed          # sparse vs dense at 49..784 nodes
    python gnns/main.py --quick          # the whole pipeline on CPU in < 60 s
    python gnns/main.py --benchmark      # one JSON line: training graphs/s, step time (writes nothing)

The data are read from --data-dir (default data/): MNIST/raw/ (or FashionMNIST/raw/) holding
{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], downloaded there by torchvision if missing;
files kept elsewhere: --data-dir /path/to/datasets.
"""
import argparse
import math
import re
import sys
from pathlib import Path

from data import DATASETS, load_images
from pretrained import export, pretrained_flags
from sample import sample, speed
from train import QUICK_OUT_DIR, benchmark, device_memory, load_checkpoint, resolve_device, train

# --quick: a small GCN on 10k graphs for two epochs, a small speed table; flags given explicitly still win.
QUICK = dict(hidden=32, layers=2, epochs=2, train_size=10_000, val_size=1000, batch_size=64, lr=3e-3,
             speed_sides=[7, 14], speed_steps=1, benchmark_steps=5, out_dir=QUICK_OUT_DIR)
# Flags that --resume does not take from the checkpoint: where things go, what to draw, what to time.
# Nodes and directed edges (self-loops included) per MNIST graph, rounded up from the averages (150 and
# 950 + 150 with the background dropped) or exact (all 784 pixels): for the memory estimate.
GRAPH_SIZE = {"drop": (200, 1400), "keep": (784, 6724)}
NOT_RESUMED = {"resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "wandb", "data_dir",
               "cache_dir", "speed", "speed_sides", "speed_steps", "speed_batch", "compile", "log_interval",
               "benchmark", "benchmark_steps", "pretrained", "export_pretrained"}
MODEL_FLAGS = {"hidden", "layers", "heads", "dropout", "background", "dataset"}  # --pretrained: from its JSON


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


def sides(s):
    try:
        values = [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give comma-separated image sides, e.g. 7,14,21,28")
    if not values or any(not 2 <= v <= 28 for v in values):
        raise argparse.ArgumentTypeError(f"{s!r}: each side must be in [2, 28]")
    return values


def output_folder(p, flag, path):
    """Refuse, before anything is read or written, an output folder that is (or lies under) a file."""
    for q in (Path(path), *Path(path).parents):
        if q.exists():
            if not q.is_dir():
                p.error(f"{flag} {path}: {q} is a file, not a folder; choose another {flag}")
            return


def memory_needed(args):
    """(parameters, bytes) of one training step, from the flags alone, before anything is allocated:
    16 bytes per parameter (float32 weights, gradients and AdamW's two moments) plus, roughly, what
    autograd keeps of one batch per layer: about 6 floats per node and feature (layer output, LayerNorm,
    ReLU, residual), 2 per edge and feature (gathered messages) and 4 per edge and head (GAT's scores
    and weights); --speed runs the dense layers too, about 4K + 3 floats per node pair."""
    H, L, K = args.hidden, args.layers, args.heads
    gat = args.model == "gat" or args.speed
    params = 4 * H + L * (H * H + (5 if gat else 3) * H) + 2 * H * H + 11 * H + 10  # encoder, layers + LNs, head
    if args.speed:
        n = max(args.speed_sides) ** 2
        batch, per_graph = args.speed_batch, 6 * n * H + (4 * K + 3) * n * n
    else:
        n, e = GRAPH_SIZE[args.background]
        batch, per_graph = args.batch_size, 6 * n * H + e * (2 * H + 4 * K)
    return params, 16 * params + 4 * batch * L * per_graph


def check_memory(p, args):
    params, need = memory_needed(args)
    device = resolve_device(args.device)
    have = device_memory(device)
    if need > have:
        batch = f"--speed-batch {args.speed_batch}" if args.speed else f"--batch-size {args.batch_size}"
        p.error(f"--hidden {args.hidden} --layers {args.layers} {batch}: {params:,} parameters need about "
                f"{need / 2 ** 30:,.1f} GiB of memory for weights, gradients, AdamW state and one batch's "
                f"activations ({device} here has {have / 2 ** 30:,.1f} GiB); choose a smaller model or batch")


def build_parser():
    """Every flag, declared once with its default and help."""
    p = Parser(prog="gnns/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               allow_abbrev=False)
    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0), default=0, help="seeds weights, batch order and dropout (>= 0)")
    g.add_argument("--data-dir", default="data", help="dataset root holding MNIST/raw/ or FashionMNIST/raw/ (downloaded there if missing)")
    g.add_argument("--out-dir", default=None, help="checkpoint ckpt.pt, log.csv, metrics.json (default: runs/gnns/<model>; --speed: runs/gnns)")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: --out-dir); 'images' refreshes the README's")
    g.add_argument("--epochs", type=positive(int), default=12, help="passes over the training graphs")
    g.add_argument("--batch-size", type=positive(int), default=128, help="graphs per optimiser step")
    g.add_argument("--lr", type=positive(float), default=2e-3, help="peak learning rate (AdamW)")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt with its flags (same schedule and batches)")
    g.add_argument("--sample-only", action="store_true", help="skip training: evaluate and draw figures from --out-dir's checkpoint")
    g.add_argument("--quick", action="store_true", help="small GCN, 10k graphs, 2 epochs, small speed table: under a minute on CPU")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    g.add_argument("--pretrained", action="store_true",
                   help="use the shipped weights in pretrained/gnns/ instead of a run folder")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DATASETS), default="mnist", help="mnist or fashion (FashionMNIST)")
    g.add_argument("--background", choices=["drop", "keep"], default="drop",
                   help="drop: nodes only for pixels with ink (about 150 per MNIST digit); keep: all 784 pixels")
    g.add_argument("--val-size", type=number(int, 0), default=5000, help="last training images held out for validation")
    g.add_argument("--train-size", type=number(int, 0), default=0, help="use only the first N training images (0: all)")
    g.add_argument("--cache-dir", default="runs/gnns/cache", help="where the built graphs are cached")

    g = p.add_argument_group("model (on --resume and --sample-only, the checkpoint's)")
    g.add_argument("--model", choices=["gcn", "gat"], default="gcn", help="gcn: graph convolution; gat: graph attention")
    g.add_argument("--hidden", type=positive(int), default=64, help="node feature width (GAT: all heads together)")
    g.add_argument("--layers", type=positive(int), default=4, help="message-passing layers")
    g.add_argument("--heads", type=positive(int), default=4, help="GAT attention heads; divides --hidden")
    g.add_argument("--dropout", type=number(float, 0, 1), default=0.0, help="dropout probability")

    g = p.add_argument_group("training")
    g.add_argument("--warmup-epochs", type=number(float, 0), default=0.5, help="linear warmup, in epochs")
    g.add_argument("--weight-decay", type=number(float, 0), default=1e-4, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes: graphs differ in size)")
    g.add_argument("--log-interval", type=positive(int), default=50, help="steps between progress-bar updates")
    g.add_argument("--benchmark", action="store_true",
                   help="time training steps of this config and print one JSON line (graphs/s, step time, TFLOP/s, MFU); writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=20, help="--benchmark: timed steps after 3 warm-up ones (--quick: 5)")

    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None,
                   help="write pretrained/gnns/<model>.{safetensors,json,log.csv} from the finished run in RUN_DIR, then stop")

    g = p.add_argument_group("speed")
    g.add_argument("--speed", action="store_true", help="only time training steps, sparse against dense, GCN and GAT")
    g.add_argument("--speed-sides", type=sides, default=[7, 14, 21, 28], help="image sides to time (28: 784 nodes)")
    g.add_argument("--speed-batch", type=positive(int), default=64, help="graphs per timed step")
    g.add_argument("--speed-steps", type=positive(int), default=3, help="timed steps per setting (after one warm-up)")
    return p


def typed_flags(p, argv):
    """The flags typed on the command line (their dests): presets and checkpoints never override these.
    The parser takes no abbreviations, so each typed flag is one of its option strings."""
    actions = p._option_string_actions
    return {actions[a.split("=")[0]].dest for a in argv if a.split("=")[0] in actions}


def overrides(p, args, typed):
    """The flags that replace the defaults, in one place: --quick's, then the resumed run's (or, with
    --pretrained, the shipped model's); a flag typed on the command line wins over all of them."""
    o = dict(QUICK) if args.quick else {}
    default_out = "runs/gnns" if args.speed else f"runs/gnns/{args.model}"
    o["out_dir"] = args.out_dir if "out_dir" in typed else o.get("out_dir", default_out)
    for flag, path in (("--out-dir", o["out_dir"]), ("--figures-dir", args.figures_dir),
                       ("--cache-dir", o.get("cache_dir", args.cache_dir))):
        if path:
            output_folder(p, flag, path)
    if args.pretrained and not args.speed:
        o.update(pretrained_flags(args.model))
    elif (args.resume or args.sample_only) and not args.speed:
        saved = load_checkpoint(Path(o["out_dir"]) / "ckpt.pt", "cpu")["args"]
        for flag in ("model", "dataset"):
            if flag in typed and getattr(args, flag) != saved[flag]:
                p.error(f"--{flag} {getattr(args, flag)}, but {o['out_dir']} holds a {saved[flag]} run")
        o.update({k: v for k, v in saved.items() if k not in NOT_RESUMED})
    return o


def apply_overrides(args, o, typed):
    for k, v in o.items():
        if k not in typed:
            setattr(args, k, v)


def validate(p, args, typed):
    """What the types alone cannot say, before anything is read or allocated."""
    if args.benchmark and (args.resume or args.sample_only or args.speed):
        p.error("--benchmark times a fresh model's training; leave out --resume, --sample-only and --speed")
    if args.pretrained and args.resume:
        p.error("--pretrained starts from the shipped weights, --resume from --out-dir's; choose one")
    if args.pretrained and not args.speed and MODEL_FLAGS & typed:
        p.error(f"--pretrained uses the shipped model's sizes; leave out --{' --'.join(sorted(MODEL_FLAGS & typed))}"
                .replace("_", "-"))
    if (args.model == "gat" or args.speed or args.quick) and args.hidden % args.heads:  # --speed times GAT too
        p.error(f"--hidden {args.hidden} is not divisible by --heads {args.heads}")
    if not args.sample_only or args.speed:
        check_memory(p, args)


def parse_args(argv=None):
    """Parse once; then the defaults are replaced by --quick's, the checkpoint's or the shipped model's
    flags (overrides), and a flag typed now always wins."""
    p = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.export_pretrained:
        return args
    typed = typed_flags(p, argv)
    apply_overrides(args, overrides(p, args, typed), typed)
    validate(p, args, typed)
    args.figures_dir = args.figures_dir or args.out_dir
    return args


def command_of(saved):
    """The command line of a run, from its checkpoint's flags: those that differ from the defaults."""
    p, skip = build_parser(), {"resume", "sample_only", "figures_dir"}
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {','.join(map(str, v)) if isinstance(v, list) else v}")
             for k, v in saved.items() if k not in skip and v != p.get_default(k) and v is not False]
    return " ".join(["python gnns/main.py", *flags])


def export_run(args):
    """--export-pretrained RUN_DIR: the finished run's checkpoint -> pretrained/gnns/<model>.*"""
    run_dir = Path(args.export_pretrained)
    ckpt = load_checkpoint(run_dir / "ckpt.pt", "cpu")
    images, labels = load_images(args.data_dir, ckpt["args"]["dataset"], "test")
    return export(ckpt, run_dir, command_of(ckpt["args"]), images, labels)


def main(argv=None):
    args = parse_args(argv)
    if args.export_pretrained:
        return export_run(args)
    if args.benchmark:
        return benchmark(args)
    if args.speed:
        speed(args)
        return
    if not args.sample_only:
        train(args)
    sample(args)
    if args.quick:
        speed(args)


if __name__ == "__main__":
    main()
