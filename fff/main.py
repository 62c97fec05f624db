"""Fast Feedforward Networks (Belcak & Wattenhofer 2023) on MNIST: train an FFF and two dense
baselines (equal training width, equal inference width), report test accuracy (FFF in soft
and hard mode) and the spread of digits over leaves; --speed times FFF-hard against dense.

    python fff/main.py                        # the README result
    python fff/main.py --speed --device cpu   # inference time, depths 3, 6, 9 (no data needed)
    python fff/main.py --quick                # the whole pipeline on CPU in < 60 s
    python fff/main.py --benchmark            # one JSON line: the FFF's training images/s, step time (writes nothing)

The data are read from --data-dir (default data/): MNIST/raw/ (or FashionMNIST/raw/) holding
{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], downloaded there by torchvision if missing;
files kept elsewhere: --data-dir /path/to/datasets.
"""
import argparse
import math
import re
import sys
from pathlib import Path

from data import DATASETS, load_split
from pretrained import export, pretrained_sizes
from model import MAX_DEPTH
from sample import SPEED_BATCHES, sample, speed
from train import MODELS, QUICK_OUT_DIR, benchmark, ckpt_path, device_memory, load_checkpoint, resolve_device, train

MAX_PARAMETERS = 2 ** 28  # 1 GiB of float32 weights (4 GiB with gradients and Adam): refuse more than that
# --quick: part of the data for two epochs; flags given explicitly still win.
QUICK = dict(epochs=2, train_size=15_000, val_size=2000, speed_depths=[2, 4], benchmark_steps=5,
             out_dir=QUICK_OUT_DIR)
# Flags that --resume does not take from the checkpoints: where things go, what to print.
NOT_RESUMED = {"resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "wandb", "data_dir",
               "speed", "speed_depths", "compile", "log_interval", "benchmark", "benchmark_steps", "pretrained",
               "export_pretrained"}
MODEL_FLAGS = {"depth", "leaf_width"}  # --pretrained takes these from its JSON


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


def depth(s):
    try:
        d = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid depth {s!r}: a whole number of tree levels")
    if not 1 <= d <= MAX_DEPTH:
        raise argparse.ArgumentTypeError(f"depth {d}: must be in 1..{MAX_DEPTH} (2^depth leaves)")
    return d


def depths(s):
    return [depth(d) for d in s.split(",")]


def models(s):
    names = s.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{s!r}: a comma-separated subset of {','.join(MODELS)}")
    return names


def fff_parameters(depth, leaf_width, in_dim=784, out_dim=10):
    """Node neurons (w, b) and leaves <dim_I, l, dim_O> (two Linear layers each)."""
    nodes, leaves = 2 ** depth - 1, 2 ** depth
    return nodes * (in_dim + 1) + leaves * (in_dim * leaf_width + leaf_width + leaf_width * out_dim + out_dim)


def memory_needed(depth, leaf_width, batch, in_dim=784, out_dim=10):
    """Bytes to train the largest of the three models (the FFF): 16 per parameter (float32 weights,
    gradients, Adam's two moments) plus, roughly, the activations of one batch in soft mode, where every
    leaf runs: hidden (B, 2^d, l) before and after the ReLU, leaf outputs (B, 2^d, O) and their mixture."""
    activations = batch * 2 ** depth * (3 * leaf_width + 2 * out_dim)
    return 16 * fff_parameters(depth, leaf_width, in_dim, out_dim) + 4 * activations


def output_folder(p, flag, path):
    """Refuse, before anything is read or written, an output folder that is (or lies under) a file."""
    for q in (Path(path), *Path(path).parents):
        if q.exists():
            if not q.is_dir():
                p.error(f"{flag} {path}: {q} is a file, not a folder; choose another {flag}")
            return


def check_memory(p, args):
    """Refuse, before anything is allocated, sizes that no machine here can hold (the parameter cap) or
    that this device cannot (the estimate against its memory)."""
    device = resolve_device(args.device)
    have = device_memory(device)
    sizes = [] if args.speed else [(args.depth, args.batch_size)]            # training
    if args.speed or args.quick:
        sizes += [(d, max(SPEED_BATCHES)) for d in args.speed_depths]        # the speed table
    for d, batch in sizes:
        n, need = fff_parameters(d, args.leaf_width), memory_needed(d, args.leaf_width, batch)
        if n > MAX_PARAMETERS:
            p.error(f"depth {d} with --leaf-width {args.leaf_width} needs {n:,} parameters, about "
                    f"{16 * n / 2 ** 30:,.0f} GiB of memory for weights, gradients and Adam state (this folder "
                    f"allows {MAX_PARAMETERS:,} parameters); choose a smaller depth or --leaf-width")
        if need > have:
            p.error(f"depth {d} with --leaf-width {args.leaf_width} and batches of {batch} needs about "
                    f"{need / 2 ** 30:,.1f} GiB of memory for weights, gradients, Adam state and one batch's "
                    f"activations ({device} here has {have / 2 ** 30:,.1f} GiB); choose a smaller depth, "
                    f"--leaf-width or --batch-size")


def build_parser():
    """Every flag, declared once with its default and help."""
    p = Parser(prog="fff/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               allow_abbrev=False)
    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto",
                   help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps; --speed times on this device")
    g.add_argument("--seed", type=number(int, 0), default=0, help="seeds weights, batch order and leaks (>= 0)")
    g.add_argument("--data-dir", default="data", help="dataset root holding MNIST/raw/ (downloaded there if missing)")
    g.add_argument("--out-dir", default="runs/fff", help="checkpoints ckpt_<model>.pt, log_<model>.csv, metrics.json, speed.json")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: --out-dir); 'images' refreshes the README's")
    g.add_argument("--epochs", type=positive(int), default=30, help="passes over the training set, per model")
    g.add_argument("--batch-size", type=positive(int), default=256, help="samples per step")
    g.add_argument("--lr", type=positive(float), default=1e-3, help="Adam learning rate at the start of the cosine decay")
    g.add_argument("--resume", action="store_true", help="continue the checkpoints in --out-dir with their flags")
    g.add_argument("--sample-only", action="store_true", help="skip training: test accuracy and figures from --out-dir")
    g.add_argument("--quick", action="store_true", help="15k images, 2 epochs per model, small speed table: under a minute on CPU")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    g.add_argument("--pretrained", action="store_true",
                   help="use the shipped weights in pretrained/fff/ instead of a run folder")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DATASETS), default="mnist", help="mnist (the paper's) or fashion")
    g.add_argument("--val-size", type=positive(int), default=6000, help="last training images held out (the paper: 9:1)")
    g.add_argument("--train-size", type=number(int, 0), default=0, help="use only the first N training images (0: all)")

    g = p.add_argument_group("model (on --resume and --sample-only, the checkpoints')")
    g.add_argument("--depth", type=depth, default=3, help=f"tree depth d: 2^d leaves, d node neurons per path (1..{MAX_DEPTH})")
    g.add_argument("--leaf-width", type=positive(int), default=32, help="hidden width l of each leaf; training width is l * 2^d")
    g.add_argument("--models", type=models, default=list(MODELS),
                   help="which to train: fff (the FFF), ff_train (dense, width l*2^d), ff_infer (dense, width l)")

    g = p.add_argument_group("training")
    g.add_argument("--hardening", type=number(float, 0), default=3.0, help="h in L = L_pred + h * sum_nodes H(c): pushes node decisions to 0 or 1")
    g.add_argument("--hardening-ramp", type=number(float, 0, 1), default=1.0,
                   help="fraction of training over which h grows linearly from 0 to --hardening (0: constant h, as in the paper)")
    g.add_argument("--region-leak", type=number(float, 0, 0.5), default=0.1, help="probability of a randomized child transposition per node and sample")
    g.add_argument("--compile", action="store_true", help="torch.compile the models' training forward")
    g.add_argument("--log-interval", type=positive(int), default=50,
                   help="on CUDA, steps between divergence checks (each waits for the GPU); on CPU every step is checked")
    g.add_argument("--benchmark", action="store_true",
                   help="time training steps of the first of --models and print one JSON line (images/s, step time, TFLOP/s, MFU); writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=20, help="--benchmark: timed steps after 3 warm-up ones (--quick: 5)")

    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None,
                   help="write pretrained/fff/<model>.{safetensors,json,log.csv} from the finished run in RUN_DIR, then stop")

    g = p.add_argument_group("speed")
    g.add_argument("--speed", action="store_true", help="only time inference (batch 1 and 1024) of FFF-hard against dense layers")
    g.add_argument("--speed-depths", type=depths, default=[3, 6, 9], help="comma-separated depths to time")
    return p


def typed_flags(p, argv):
    """The flags typed on the command line (their dests): presets and checkpoints never override these.
    The parser takes no abbreviations, so each typed flag is one of its option strings."""
    actions = p._option_string_actions
    return {actions[a.split("=")[0]].dest for a in argv if a.split("=")[0] in actions}


def overrides(p, args, typed):
    """The flags that replace the defaults, in one place: --quick's, then the resumed run's (or, with
    --pretrained, the shipped models' sizes); a flag typed on the command line wins over all of them."""
    o = dict(QUICK) if args.quick else {}
    out_dir = args.out_dir if "out_dir" in typed else o.get("out_dir", args.out_dir)
    output_folder(p, "--out-dir", out_dir)
    if args.figures_dir:
        output_folder(p, "--figures-dir", args.figures_dir)
    if args.pretrained and not args.speed:
        o.update(pretrained_sizes())
    elif (args.resume or args.sample_only) and not args.speed:
        names = args.models if "models" in typed else MODELS
        path = next((ckpt_path(out_dir, n) for n in names if ckpt_path(out_dir, n).exists()), None)
        if path is None:
            p.error(f"no checkpoint ckpt_<model>.pt in {out_dir} to resume or sample from")
        saved = load_checkpoint(path, "cpu")["args"]
        if args.dataset != saved["dataset"] and "dataset" in typed:
            p.error(f"--dataset {args.dataset}, but {out_dir} holds a {saved['dataset']} run")
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
        p.error(f"--pretrained uses the shipped models' sizes; leave out --{' --'.join(sorted(MODEL_FLAGS & typed))}"
                .replace("_", "-"))
    if not args.sample_only or args.speed:
        check_memory(p, args)


def parse_args(argv=None):
    """Parse once; then the defaults are replaced by --quick's, the checkpoint's or the shipped models'
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
    return " ".join(["python fff/main.py", *flags])


def export_run(args):
    """--export-pretrained RUN_DIR: the finished run's checkpoints -> pretrained/fff/<model>.*"""
    run_dir = Path(args.export_pretrained)
    names = [n for n in MODELS if ckpt_path(run_dir, n).exists()]
    if not names:
        raise SystemExit(f"fff: no checkpoint ckpt_<model>.pt in {run_dir} to export")
    ckpts = {n: load_checkpoint(ckpt_path(run_dir, n), "cpu") for n in names}
    test = load_split(args.data_dir, ckpts[names[0]]["args"]["dataset"], "test")
    return export(ckpts, run_dir, command_of(ckpts[names[0]]["args"]), test)


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
