"""Vision Transformer (Dosovitskiy et al. 2021) on MNIST or FashionMNIST: train, then
test accuracy, attention-rollout maps and a confusion matrix.

    python vit/main.py --dataset mnist      # the README result
    python vit/main.py --dataset fashion
    python vit/main.py --quick              # the whole pipeline on CPU in < 60 s
    python vit/main.py --benchmark          # one JSON line: images/s, step time, TFLOP/s (writes nothing)

The data are read from --data-dir (default data/): MNIST/raw/ or FashionMNIST/raw/ holding
{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], downloaded there by torchvision if missing;
files kept elsewhere: --data-dir /path/to/datasets.
"""
import argparse
import math
import re
import sys
from pathlib import Path

from data import DATASETS, load_split
from pretrained import export, pretrained_config
from sample import sample
from train import QUICK_OUT_DIR, benchmark, device_memory, evaluated_weights, load_checkpoint, resolve_device, train

IMAGE_SIZE = 28  # MNIST and FashionMNIST
# --quick: a tiny model (P=7) on half the data for six epochs; flags given explicitly still win.
QUICK = dict(patch_size=7, dim=32, depth=3, heads=4, mlp_dim=64, epochs=6, train_size=30_000, val_size=2000,
             batch_size=128, lr=3e-3, warmup_epochs=0.5, num_examples=8, benchmark_steps=5, out_dir=QUICK_OUT_DIR)
# Flags that --resume does not take from the checkpoint: where things go and what to draw.
NOT_RESUMED = {"resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "wandb", "data_dir",
               "num_examples", "compile", "compile_mode", "log_interval", "benchmark", "benchmark_steps", "pretrained",
               "export_pretrained"}
MODEL_FLAGS = {"patch_size", "dim", "depth", "heads", "mlp_dim", "dropout", "stem_channels"}  # --pretrained takes these from its JSON


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


def output_folder(p, flag, path):
    """Refuse, before anything is read or written, an output folder that is (or lies under) a file."""
    for q in (Path(path), *Path(path).parents):
        if q.exists():
            if not q.is_dir():
                p.error(f"{flag} {path}: {q} is a file, not a folder; choose another {flag}")
            return


def memory_needed(args):
    """(parameters, bytes) of one training step, from the flags alone, before anything is allocated:
    16 bytes per parameter (float32 weights, gradients and AdamW's two moments) plus, roughly, the
    activations autograd keeps for one batch (per layer and token about 12 D + 3 mlp-dim floats, and
    two (N+1) x (N+1) maps per head; with the stem about 5 S x H x W: two convolutions' and GELUs'
    outputs and the patches cut from them)."""
    P, D, L, k, M, S = args.patch_size, args.dim, args.depth, args.heads, args.mlp_dim, args.stem_channels
    T = (IMAGE_SIZE // P) ** 2 + 1                                     # N patches + the class token
    C = S or 1                                                         # channels cut into patches
    params = ((9 * S + S + 9 * S * S + S if S else 0)                  # the stem: 3x3 convs 1 -> S -> S (+ biases)
              + (P * P * C + 1) * D + (T + 1) * D                      # E (weights, bias), x_class, E_pos
              + L * (4 * D * D + 2 * D * M + 9 * D + M)                # per block: U_qkv, U_msa, MLP, 2 LNs
              + 2 * D + D * D + D + 10 * D + 10)                       # final LN, head (D -> D -> 10)
    activations = args.batch_size * (L * (T * (12 * D + 3 * M) + 2 * k * T * T) + 5 * S * IMAGE_SIZE ** 2)
    return params, 16 * params + 4 * activations


def check_memory(p, args):
    params, need = memory_needed(args)
    device = resolve_device(args.device)
    have = device_memory(device)
    if need > have:
        stem = f" --stem-channels {args.stem_channels}" if args.stem_channels else ""
        p.error(f"--dim {args.dim} --depth {args.depth} --mlp-dim {args.mlp_dim}{stem} --batch-size {args.batch_size}: "
                f"{params:,} parameters need about {need / 2 ** 30:,.1f} GiB of memory for weights, gradients, "
                f"AdamW state and one batch's activations ({device} here has {have / 2 ** 30:,.1f} GiB); "
                f"choose a smaller model or --batch-size")


def add_data_and_model_flags(p):
    """The flags of the "data" (with the augmentations) and "model" groups."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DATASETS), default="mnist", help="mnist or fashion (FashionMNIST)")
    g.add_argument("--val-size", type=number(int, 0), default=5000, help="last training images held out for validation")
    g.add_argument("--train-size", type=number(int, 0), default=0, help="use only the first N training images (0: all)")
    g.add_argument("--crop-padding", type=number(int, 0, 13), default=2, help="augmentation: random crop after padding by this many pixels (0: off)")
    g.add_argument("--hflip", type=number(float, 0, 1), default=0.0,
                   help="augmentation: flip each training image left-right with this probability (suits clothes, not digits; 0: off)")
    g.add_argument("--random-erasing", type=number(float, 0, 1), default=0.0,
                   help="augmentation: Random Erasing (Zhong et al. 2020) with this probability per image: one rectangle "
                        "(2-40%% of the area, aspect 0.3-3.3) of random pixels (0: off)")

    g = p.add_argument_group("model (on --resume and --sample-only, the checkpoint's)")
    g.add_argument("--patch-size", type=positive(int), default=4, help=f"patch side P; divides the {IMAGE_SIZE}x{IMAGE_SIZE} images")
    g.add_argument("--dim", type=positive(int), default=64, help="width D, divisible by --heads")
    g.add_argument("--depth", type=positive(int), default=6, help="encoder layers L")
    g.add_argument("--heads", type=positive(int), default=4, help="attention heads k")
    g.add_argument("--mlp-dim", type=positive(int), default=128, help="hidden width of each block's MLP")
    g.add_argument("--dropout", type=number(float, 0, 1), default=0.0, help="dropout probability")
    g.add_argument("--stem-channels", type=number(int, 0), default=0, metavar="S",
                   help="the paper's hybrid (Section 3.1): cut the patches from the S-channel feature map of a CNN stem "
                        "(two 3x3 convolutions with GELU at full resolution) instead of the pixels (0: off, raw patches)")


def build_parser():
    """Every flag, declared once with its default and help."""
    p = Parser(prog="vit/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               allow_abbrev=False)
    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0), default=0, help="seeds weights, batch order, augmentation, dropout (>= 0)")
    g.add_argument("--data-dir", default="data", help="dataset root holding MNIST/raw/ or FashionMNIST/raw/ (downloaded there if missing)")
    g.add_argument("--out-dir", default=None, help="checkpoint ckpt.pt, log.csv, metrics.json (default: runs/vit/<dataset>)")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: --out-dir); 'images' refreshes the README's")
    g.add_argument("--epochs", type=positive(int), default=30, help="passes over the training set")
    g.add_argument("--batch-size", type=positive(int), default=128, help="images per optimiser step")
    g.add_argument("--lr", type=positive(float), default=2e-3, help="peak learning rate")
    g.add_argument("--resume", action="store_true", help="continue from --out-dir/ckpt.pt with its flags (same schedule and batches)")
    g.add_argument("--sample-only", action="store_true", help="skip training: evaluate and draw figures from --out-dir's checkpoint")
    g.add_argument("--quick", action="store_true", help="small model (P=7), 30k images, 6 epochs: the whole pipeline on CPU in under a minute")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    g.add_argument("--pretrained", action="store_true",
                   help="use the shipped weights in pretrained/vit/ instead of a run folder")

    add_data_and_model_flags(p)

    g = p.add_argument_group("training")
    g.add_argument("--min-lr", type=number(float, 0), default=1e-5, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup-epochs", type=number(float, 0), default=2.0, help="linear warmup, in epochs")
    g.add_argument("--weight-decay", type=number(float, 0), default=0.05, help="AdamW weight decay, on matrices only")
    g.add_argument("--label-smoothing", type=number(float, 0, 1), default=0.1, help="label smoothing of the cross-entropy")
    g.add_argument("--ema", type=number(float, 0, 1), default=0.0,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.999; warm-up "
                        "min(decay, (1+t)/(10+t)) at step t) and validate, test and export it (0: off)")
    g.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune"], default="default",
                   help="torch.compile's mode with --compile: reduce-overhead replays the model's kernels as CUDA graphs "
                        "(far fewer launches a step; CUDA only)")
    g.add_argument("--log-interval", type=positive(int), default=50,
                   help="steps between progress-bar updates; on CUDA also between non-finite checks (each waits for the GPU)")
    g.add_argument("--benchmark", action="store_true",
                   help="time training steps of this config and print one JSON line (images/s, step time, TFLOP/s, MFU); writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=20, help="--benchmark: timed steps after 3 warm-up ones (--quick: 5)")

    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None,
                   help="write pretrained/vit/<dataset>.{safetensors,json} from the finished run in RUN_DIR, then stop")

    g = p.add_argument_group("figures")
    g.add_argument("--num-examples", type=positive(int), default=16, help="test digits in the attention-map grid")
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
    o["out_dir"] = args.out_dir if "out_dir" in typed else o.get("out_dir", f"runs/vit/{args.dataset}")
    output_folder(p, "--out-dir", o["out_dir"])
    if args.figures_dir:
        output_folder(p, "--figures-dir", args.figures_dir)
    if args.pretrained:
        saved = pretrained_config(args.dataset)
        o.update({k: v for k, v in saved.items() if k in MODEL_FLAGS})
    elif args.resume or args.sample_only:
        saved = load_checkpoint(Path(o["out_dir"]) / "ckpt.pt", "cpu")["args"]
        if args.dataset != saved["dataset"] and "dataset" in typed:
            p.error(f"--dataset {args.dataset}, but {o['out_dir']} holds a {saved['dataset']} run")
        o.update({k: v for k, v in saved.items() if k not in NOT_RESUMED})
    return o


def apply_overrides(args, o, typed):
    for k, v in o.items():
        if k not in typed:
            setattr(args, k, v)


def validate(p, args, typed):
    """What the types alone cannot say, before anything is read or allocated."""
    if args.benchmark and (args.resume or args.sample_only):
        p.error("--benchmark times a fresh model; leave out --resume and --sample-only")
    if args.pretrained and args.resume:
        p.error("--pretrained starts from the shipped weights, --resume from --out-dir's; choose one")
    if args.pretrained and MODEL_FLAGS & typed:
        p.error(f"--pretrained uses the shipped model's sizes; leave out --{' --'.join(sorted(MODEL_FLAGS & typed))}"
                .replace("_", "-"))
    if IMAGE_SIZE % args.patch_size:
        divisors = ", ".join(str(d) for d in range(1, IMAGE_SIZE + 1) if IMAGE_SIZE % d == 0)
        p.error(f"--patch-size {args.patch_size} does not divide the {IMAGE_SIZE}x{IMAGE_SIZE} images; choose {divisors}")
    if args.ema == 1:
        p.error("--ema 1 would keep the initial weights for ever; choose a decay below 1 (e.g. 0.999), or 0 for off")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} is not divisible by --heads {args.heads}")
    if not args.sample_only:
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
    p, skip = build_parser(), {"resume", "sample_only", "figures_dir", "num_examples"}
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in saved.items()
             if k not in skip and v != p.get_default(k) and v is not False]
    return " ".join(["python vit/main.py", *flags])


def export_run(args):
    """--export-pretrained RUN_DIR: the finished run's checkpoint -> pretrained/vit/<dataset>.*, the weights'
    EMA when the run had --ema"""
    run_dir = Path(args.export_pretrained)
    ckpt = load_checkpoint(run_dir / "ckpt.pt", "cpu")
    test = load_split(args.data_dir, ckpt["args"]["dataset"], "test")
    return export(ckpt, evaluated_weights(ckpt), run_dir, command_of(ckpt["args"]), test)


def main(argv=None):
    args = parse_args(argv)
    if args.export_pretrained:
        return export_run(args)
    if args.benchmark:
        return benchmark(args)
    if not args.sample_only:
        train(args)
    sample(args)


if __name__ == "__main__":
    main()
