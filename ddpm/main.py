"""DDPM (Ho et al. 2020) on MNIST or FashionMNIST: train a U-Net to predict the noise
(Algorithm 1), sample with the reverse process (Algorithm 2) or DDIM (Song et al. 2021),
write a sample grid and a GIF of x_T -> x_0, and measure FID in a classifier's feature space.

    python ddpm/main.py --dataset fashion              # train (the defaults: one GPU), then samples and GIF
    python ddpm/main.py --dataset mnist --evaluate     # FID, confident share, classes
    python ddpm/main.py --quick                        # the whole pipeline on CPU in < 60 s
    python ddpm/main.py --dataset fashion --sample-only --pretrained --figures-dir images
                                                       # the shipped weights (no data): images/ddpm_both.gif

The README's CPU result (a U-Net of 1.1M parameters, 3 epochs per dataset,
training 26 min per dataset on 2 CPU cores):

    for ds in mnist fashion; do
      python ddpm/main.py --dataset $ds --out-dir runs/ddpm-cpu --n-samples 36 \\
        --base 32 --res-blocks 1 --dropout 0 --batch-size 64 --lr 1e-3 --warmup-steps 200 --ema-decay 0.999 --epochs 3
      python ddpm/main.py --dataset $ds --evaluate --out-dir runs/ddpm-cpu --n-eval 250 --eval-batch 250
      python ddpm/main.py --dataset $ds --sample-only --out-dir runs/ddpm-cpu --n-samples 36 --figures-dir images
    done

--data-dir (default data/) holds MNIST/raw/ and FashionMNIST/raw/, each with the four IDX files
{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]; missing ones are downloaded there when torchvision
imports and a network is up. Files kept elsewhere: --data-dir /path/to/datasets.
Each dataset's run lives in --out-dir/<dataset>/; with both there, the GIF shows both side by side
(with --pretrained: both shipped models). --export-pretrained OUT_DIR/<dataset> ships a finished run.
"""
import argparse
import math
import re
import sys
from pathlib import Path

from data import DATASETS
from evaluate import evaluate
from benchmark import benchmark
from pretrained import PRETRAINED_SAMPLING, export_pretrained, read_meta
from sample import sample
from train import QUICK_OUT_DIR, load_checkpoint, train

# --quick: a tiny U-Net, 1,000 images, one epoch, T = 100, 64 samples for the evaluation.
QUICK = dict(base=16, res_blocks=1, epochs=1, train_size=1000, batch_size=50, T=100, warmup_steps=5,
             n_samples=16, n_eval=64, classifier_epochs=2, sample_steps=20, out_dir=QUICK_OUT_DIR)
# Flags that --resume, --sample-only and --evaluate do not take from the checkpoint.
NOT_RESUMED = {"resume", "sample_only", "evaluate", "quick", "out_dir", "figures_dir", "device", "wandb",
               "data_dir", "dataset", "sampler", "sample_steps", "eta", "variance", "n_samples", "n_eval",
               "eval_batch", "classifier_epochs", "run_dir", "log_interval", "compile", "benchmark", "benchmark_steps",
               "pretrained", "export_pretrained"}


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


def add_shared_flags(g):
    """The flags every folder of the repository has, and this folder's run modes."""
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0, 2 ** 31 - 1), default=0, help="seeds weights, batches, noise and samples (>= 0)")
    g.add_argument("--data-dir", default="data", help="dataset root holding MNIST/raw/ or FashionMNIST/raw/ (downloaded there if missing)")
    g.add_argument("--out-dir", default="runs/ddpm", help="runs go to OUT_DIR/<dataset>/: ckpt.pt, log.csv, classifier.pt, eval.json")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: the run's folder); 'images' refreshes the README's")
    g.add_argument("--epochs", type=positive(int), default=30, help="passes over the training images")
    g.add_argument("--batch-size", type=positive(int), default=128, help="images per optimiser step")
    g.add_argument("--lr", type=positive(float), default=2e-4, help="peak learning rate (AdamW; the paper: 2e-4)")
    g.add_argument("--resume", action="store_true", help="continue OUT_DIR/<dataset>/ckpt.pt with its flags (same schedule and batches)")
    g.add_argument("--sample-only", action="store_true", help="skip training: samples, GIF and loss curve from the checkpoint")
    g.add_argument("--evaluate", action="store_true", help="skip training: FID, confident share and class histogram of "
                                                           "DDPM (T steps) and DDIM (--sample-steps) samples")
    g.add_argument("--pretrained", action="store_true", help="use the shipped weights in pretrained/ddpm/ instead of a run "
                                                             "folder (with --sample-only: DDIM 50 steps, 36 samples, unless given)")
    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None,
                   help="write pretrained/ddpm/<dataset>.{safetensors,json} from the finished run in RUN_DIR (OUT_DIR/<dataset>)")
    g.add_argument("--quick", action="store_true", help="a tiny U-Net, 1,000 images, one epoch, T = 100; train, sample "
                                                        "and evaluate in under a minute on CPU")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    g.add_argument("--log-interval", type=positive(int), default=20,
                   help="steps between progress-bar updates: the only host-device syncs of the training loop")
    g.add_argument("--compile", action="store_true", help="torch.compile the U-Net (off by default)")
    g.add_argument("--benchmark", action="store_true", help="time --benchmark-steps training steps of this config and "
                                                            "print one JSON line; trains nothing, writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=None, help="timed steps (default 20; 2 with --quick)")


def build_parser():
    p = Parser(prog="ddpm/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_flags(p.add_argument_group("shared"))
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DATASETS), default="mnist", help="mnist or fashion (FashionMNIST)")
    g.add_argument("--train-size", type=number(int, 0), default=0, help="use only the first N training images (0: all 60,000)")

    g = p.add_argument_group("diffusion (on --resume, --sample-only, --evaluate and --pretrained, the checkpoint's)")
    g.add_argument("--T", type=number(int, 2, 100_000), default=1000, help="diffusion steps (the paper: 1000)")
    g.add_argument("--schedule", choices=["linear", "cosine"], default="linear",
                   help="betas: linear 1e-4..0.02 (the paper) or cosine (Nichol & Dhariwal 2021)")

    g = p.add_argument_group("model (on --resume, --sample-only, --evaluate and --pretrained, the checkpoint's)")
    g.add_argument("--base", type=number(int, 4), default=64, help="U-Net feature maps at full resolution (a multiple of 4)")
    g.add_argument("--mults", type=positive(int), nargs="+", default=[1, 2, 2], help="feature maps per resolution, in units of --base")
    g.add_argument("--res-blocks", type=positive(int), default=2, help="residual blocks per resolution")
    g.add_argument("--attn-levels", type=number(int, 0), nargs="*", default=[2],
                   help="resolutions with self-attention, 0 = full (the middle always has it)")
    g.add_argument("--dropout", type=number(float, 0, 0.99), default=0.1, help="dropout in the residual blocks")

    g = p.add_argument_group("training")
    g.add_argument("--warmup-steps", type=number(int, 0), default=500, help="linear learning-rate warmup, in steps")
    g.add_argument("--weight-decay", type=number(float, 0), default=0.0, help="AdamW's decoupled weight decay")
    g.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the global gradient norm (the paper: 1; 0: off)")
    g.add_argument("--ema-decay", type=number(float, 0, 0.999999), default=0.9995, help="EMA of the weights, used for sampling (the paper: 0.9999)")

    g = p.add_argument_group("sampling")
    g.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm", help="Algorithm 2 over all T steps, or DDIM")
    g.add_argument("--sample-steps", type=number(int, 1), default=None, help="DDIM's steps (1..T; default 50, or T if smaller)")
    g.add_argument("--eta", type=number(float, 0, 1), default=0.0, help="DDIM's noise: 0 deterministic, 1 DDPM-like")
    g.add_argument("--variance", choices=["beta_tilde", "beta"], default="beta_tilde", help="DDPM's sigma_t^2 (Sec. 3.2)")
    g.add_argument("--n-samples", type=number(int, 1, 1024), default=64, help="samples in the grid (a square number is best)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--n-eval", type=number(int, 2), default=10_000, help="samples per sampler for FID")
    g.add_argument("--eval-batch", type=positive(int), default=1000, help="samples drawn at once")
    g.add_argument("--classifier-epochs", type=positive(int), default=3, help="training epochs of the FID classifier")
    return p


def saved_flags(args):
    """The flags a run was made with, as overrides: a checkpoint's (--resume, --sample-only, --evaluate), or
    the shipped model's (--pretrained: its U-Net and diffusion, and for sampling DDIM 50 steps, 36 samples)."""
    if args.pretrained:
        meta = read_meta(args.dataset)
        return meta["flags"] | (PRETRAINED_SAMPLING if args.sample_only else {})
    if (args.resume or args.sample_only or args.evaluate) and not args.benchmark:
        saved = load_checkpoint(Path(args.out_dir) / args.dataset / "ckpt.pt", "cpu", dataset=args.dataset)["args"]
        return {k: v for k, v in saved.items() if k not in NOT_RESUMED}
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
    args = argparse.Namespace(**(vars(args) | saved_flags(args) | explicit))
    args.run_dir = str(Path(args.out_dir) / args.dataset)
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
    if args.sample_steps is None:
        args.sample_steps = min(50, args.T)
    elif args.sample_steps > args.T:
        p.error(f"--sample-steps {args.sample_steps} is larger than T = {args.T}; choose 1..{args.T}")
    if args.base % 4:
        p.error(f"--base {args.base} is not a multiple of 4 (group normalisation uses groups of 4 or more maps)")
    if any(level >= len(args.mults) for level in args.attn_levels):
        p.error(f"--attn-levels {args.attn_levels}: the U-Net has levels 0..{len(args.mults) - 1} (one per --mults entry)")
    args.figures_dir = args.figures_dir or args.run_dir
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.export_pretrained:
        return export_pretrained(args.export_pretrained, default_flags())
    if args.benchmark:
        return benchmark(args)
    if not (args.sample_only or args.evaluate):
        train(args)                                             # handles its own Ctrl-C; --pretrained fine-tunes
    try:
        if args.quick or not args.evaluate:
            sample(args)
        if args.quick or args.evaluate:
            evaluate(args)
    except KeyboardInterrupt:
        print("\nddpm: interrupted while sampling or evaluating; the checkpoint is untouched, and classifier.pt and "
              "eval.json are written only when complete: run the command again to finish", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    main()
