"""Real NVP (Dinh et al. 2017) on MNIST: train a multi-scale affine-coupling flow by exact
maximum likelihood, report test bits/dim, draw samples ranked by log-probability, the same
latents at several temperatures, and latent interpolations between test digits.

    python nf/main.py                       # the default config (meant for one GPU)
    python nf/main.py --quick               # the whole pipeline on CPU in < 60 s
    python nf/main.py --sample-only --pretrained --figures-dir images     # the README's figures, shipped weights
    python nf/main.py --export-pretrained RUN                              # ship a finished run

The README's CPU results (2 CPU cores): the paper's layout with narrow s/t networks, 1.4255 test
bits/dim in 45 min, and the seed's flat stack of 30 couplings, stopped after epoch 1:

    python nf/main.py --out-dir runs/nf-cpu --hidden 32 --blocks 1 --epochs 10
    python nf/main.py --out-dir runs/nf-flat30 --scales 0 --n-couplings 30 --hidden 32 --blocks 1 --epochs 10

--data-dir (default data/) holds MNIST/raw/ (or FashionMNIST/raw/) with the IDX files
{train,t10k}-images-idx3-ubyte[.gz]; missing ones are downloaded there when torchvision imports and
a network is up. Files kept elsewhere: --data-dir /path/to/datasets.
"""
import argparse
import math
import re
from pathlib import Path

from data import DATASETS
from benchmark import benchmark
from pretrained import export_pretrained, read_meta
from sample import sample
from train import QUICK_OUT_DIR, load_checkpoint, train

# --quick: a small flow on 2,000 images for two epochs; flags given explicitly still win.
QUICK = dict(n_couplings=5, hidden=16, blocks=1, epochs=2, train_size=2000, test_size=500, warmup_steps=10,
             n_samples=16, out_dir=QUICK_OUT_DIR)
# Flags that --resume does not take from the checkpoint: where things go, what to draw.
NOT_RESUMED = {"resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "wandb", "data_dir",
               "temperature", "n_samples", "log_interval", "compile", "benchmark", "benchmark_steps", "pretrained",
               "export_pretrained"}


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


def build_parser():
    p = Parser(prog="nf/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0, 2 ** 32 - 1), default=0, help="seeds weights, batch order, dequantisation noise and samples (>= 0)")
    g.add_argument("--data-dir", default="data", help="dataset root holding MNIST/raw/ or FashionMNIST/raw/ (downloaded there if missing)")
    g.add_argument("--out-dir", default="runs/nf", help="checkpoint ckpt.pt, log.csv, metrics.json")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: --out-dir); 'images' refreshes the README's")
    g.add_argument("--epochs", type=positive(int), default=30, help="passes over the training images")
    g.add_argument("--batch-size", type=positive(int), default=64, help="images per optimiser step")
    g.add_argument("--lr", type=positive(float), default=1e-3, help="peak learning rate (Adam)")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt with its flags (same schedule and batches)")
    g.add_argument("--sample-only", action="store_true", help="skip training: test bits/dim and figures from --out-dir's checkpoint")
    g.add_argument("--pretrained", action="store_true", help="use the shipped weights in pretrained/nf/ instead of a run "
                                                             "folder (--sample-only: figures; else fine-tuning)")
    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None,
                   help="write pretrained/nf/<dataset>.{safetensors,json} from the finished run in RUN_DIR")
    g.add_argument("--quick", action="store_true", help="a small flow, 2,000 images, 2 epochs: under a minute on CPU")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    g.add_argument("--log-interval", type=positive(int), default=20,
                   help="steps between progress-bar updates: the only host-device syncs of the training loop")
    g.add_argument("--compile", action="store_true", help="torch.compile the flow's bits/dim (off by default)")
    g.add_argument("--benchmark", action="store_true", help="time --benchmark-steps training steps of this config and "
                                                            "print one JSON line; trains nothing, writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=None, help="timed steps (default 20; 2 with --quick)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DATASETS), default="mnist", help="mnist or fashion (FashionMNIST)")
    g.add_argument("--train-size", type=number(int, 0), default=0, help="use only the first N training images (0: all 60,000)")
    g.add_argument("--test-size", type=number(int, 0), default=0, help="evaluate on the first N test images (0: all 10,000)")

    g = p.add_argument_group("model (on --resume, --sample-only and --pretrained, the checkpoint's)")
    g.add_argument("--n-couplings", type=positive(int), default=16,
                   help="coupling layers in all: k checkerboard + k channel-wise per scale, k = n // (2 scales + 1), "
                        "the rest checkerboard at the last scale (16: the paper's 3 + 3, 3 + 3, 4)")
    g.add_argument("--scales", type=number(int, 0, 2), default=2,
                   help="squeeze + factor-out steps (28 -> 14 -> 7); 0: one flat stack, e.g. the seed's 30 couplings")
    g.add_argument("--hidden", type=positive(int), default=64, help="feature maps of each coupling's s/t ResNet")
    g.add_argument("--blocks", type=positive(int), default=4, help="residual blocks of each s/t ResNet")
    g.add_argument("--alpha", type=number(float, 0, 0.499, low_open=True), default=0.05,
                   help="logit transform margin: y = logit(alpha + (1 - 2 alpha) x)")

    g = p.add_argument_group("training")
    g.add_argument("--warmup-steps", type=number(int, 0), default=200, help="linear learning-rate warmup, in steps")
    g.add_argument("--weight-decay", type=number(float, 0), default=5e-5, help="L2 penalty on all parameters (the paper: 5e-5 on the weight-norm scales)")
    g.add_argument("--grad-clip", type=number(float, 0), default=100.0, help="clip the global gradient norm (0: off)")

    g = p.add_argument_group("samples")
    g.add_argument("--temperature", type=positive(float), default=0.75, help="z ~ N(0, T^2 I) for the ranked samples")
    g.add_argument("--n-samples", type=number(int, 1, 1024), default=64, help="samples in the ranked grid (1..1024)")

    return p


def saved_flags(args):
    """The flags a run was made with, as overrides: the checkpoint's (--resume, --sample-only) or the
    shipped model's (--pretrained)."""
    if args.pretrained:
        return read_meta(args.dataset)["flags"]
    if (args.resume or args.sample_only) and not args.benchmark:
        return {k: v for k, v in load_checkpoint(Path(args.out_dir) / "ckpt.pt", "cpu")["args"].items()
                if k not in NOT_RESUMED}
    return {}


def apply_overrides(p, defaults, explicit):
    """The one place flags are layered: the defaults, then --quick's, then the checkpoint's (or the shipped
    model's); the flags typed on the command line always win."""
    args = argparse.Namespace(**(defaults | (QUICK if explicit.get("quick") else {}) | explicit))
    for flag, path in (("--out-dir", args.out_dir), ("--figures-dir", args.figures_dir)):
        file = path and next((q for q in (Path(path), *Path(path).parents) if q.exists() and not q.is_dir()), None)
        if file:
            p.error(f"{flag} {path}: {file} is a file, not a folder; choose another {flag}")
    if args.pretrained and args.resume:
        p.error("--pretrained starts from the shipped weights and --resume from a run folder: choose one")
    saved = saved_flags(args)
    args = argparse.Namespace(**(vars(args) | saved | explicit))
    if "dataset" in saved and args.dataset != saved["dataset"]:
        p.error(f"--dataset {args.dataset}, but {args.out_dir} holds a {saved['dataset']} run")
    return args


def default_flags(p=None):
    return {a.dest: a.default for a in (p or build_parser())._actions if a.dest != "help"}


def parse_args(argv=None):
    """Parsed once: the typed flags alone (every default suppressed), then layered by apply_overrides."""
    p = build_parser()
    defaults = default_flags(p)
    for action in p._actions:
        action.default = argparse.SUPPRESS
    args = apply_overrides(p, defaults, vars(p.parse_args(argv)))
    if args.n_couplings < 2 * args.scales + 1:
        p.error(f"--n-couplings {args.n_couplings} is too few for --scales {args.scales} "
                f"(at least {2 * args.scales + 1}: one checkerboard and one channel-wise per scale, one at the end)")
    args.figures_dir = args.figures_dir or args.out_dir
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.export_pretrained:
        return export_pretrained(args.export_pretrained, default_flags())
    if args.benchmark:
        return benchmark(args)
    if not args.sample_only:
        train(args)                                             # --pretrained: fine-tunes the shipped weights
    sample(args)


if __name__ == "__main__":
    main()
