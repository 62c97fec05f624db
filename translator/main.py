"""English to French with the Transformer (Vaswani et al. 2017), trained on Tatoeba's pairs.

    python translator/main.py --data-dir /path/to/datasets            # train (sized for one GPU), test scores, figures
    python translator/main.py translate "She saw a boy sitting on a bench."
    python translator/main.py translate --pretrained "She saw a boy sitting on a bench."   # the shipped weights
    python translator/main.py translate --beam 1 < english.txt         # greedy, one line of stdin at a time
    python translator/main.py evaluate --data-dir /path/to/datasets   # sacreBLEU and chrF on the test split
    python translator/main.py --quick --data-dir /path/to/datasets    # everything on CPU in < 60 s
    python translator/main.py --benchmark --quick --device cpu         # time training's step: one JSON line
    torchrun --nproc_per_node=4 translator/main.py ...                # DistributedDataParallel

The README's 5,000-step result (test BLEU 32.69 with beam 4, 31 min on 2 CPU cores; carried on to 15,000
steps with --keep-last 5 and evaluated with --average: 41.33; the 5,000-step log drew
images/translator_curves.png):

    python translator/main.py --device cpu --data-dir /path/to/datasets --out-dir runs/translator-cpu \
        --d-model 256 --n-head 4 --d-ff 1024 --n-layer 3 --dropout 0.1 --batch-size 64 --batch-tokens 0 \
        --lr 1e-3 --warmup-steps 800 --steps 5000 --eval-interval 1000 --log-interval 50

Data: DIR/tatoeba/fra-eng.zip, the manythings.org/anki export (fra.txt: English<TAB>French per line),
downloaded from https://www.manythings.org/anki/fra-eng.zip into --data-dir when missing.
A run goes to runs/translator/: ckpt.pt (with the tokenizer), log.csv, results.json,
test_translations.tsv, translations.txt, translator_attention.png, translator_curves.png.
The shipped weights are pretrained/translator/en-fr.* (--pretrained; written by --export-pretrained RUN_DIR).
"""
import argparse
import math
import os
import re
from pathlib import Path

from pretrained import export_pretrained
from sample import SEED_SENTENCE, evaluate_command, report, translate_command
from train import QUICK_OUT_DIR, benchmark, load_checkpoint, train

# --quick: a slice of the data, a tiny model, a short run: the whole pipeline on CPU in under a minute.
QUICK = dict(max_pairs=10000, max_eval=100, vocab_size=1000, n_layer=2, n_head=4, d_model=128, d_ff=256, dropout=0.1,
             batch_size=32, batch_tokens=960, steps=400, warmup_steps=100, lr=2e-3, eval_interval=200,
             log_interval=10, eval_sentences=100)
# Flags that --resume does not take from the checkpoint: what to do, where things go, how to decode.
NOT_RESUMED = {"command", "text", "resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "wandb",
               "beam", "alpha", "attention_text", "pretrained", "export_pretrained", "compile", "average"}


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


def build_parser():
    """Every flag, declared once with its default and help."""
    p = Parser(prog="translator/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["train", "translate", "evaluate"], default="train",
                   help="train (default): train, then score the test split and draw the figures; translate [TEXT]: "
                        "TEXT, or each line of stdin; evaluate: sacreBLEU and chrF of a checkpoint on the test split")
    p.add_argument("text", nargs="?", default=None, help="translate: the English text (default: read stdin)")
    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0), default=1337, help="seeds weights, batches and dropout (>= 0); "
                                                                     "not the split, which is fixed")
    g.add_argument("--data-dir", default="data", help="dataset root: DIR/tatoeba/fra-eng.zip (downloaded there from manythings.org if missing)")
    g.add_argument("--out-dir", default=None, help=f"the run's folder (default: runs/translator; {QUICK_OUT_DIR} "
                   "with --quick, runs/translator-pretrained with --pretrained)")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: --out-dir); 'images' refreshes the "
                   "README's; with translate TEXT, draws TEXT's cross-attention there")
    g.add_argument("--steps", type=positive(int), default=20_000, help="optimiser steps")
    g.add_argument("--batch-size", type=positive(int), default=256, help="sentence pairs per batch of validation "
                   "and decoding, and of training when --batch-tokens is 0")
    g.add_argument("--lr", type=positive(float), default=None,
                   help="peak learning rate (default: the paper's d_model^-0.5 * warmup_steps^-0.5)")
    g.add_argument("--resume", action="store_true", help="continue --out-dir/ckpt.pt with its flags (same schedule and batches)")
    g.add_argument("--sample-only", action="store_true", help="skip training: test scores, examples and figures of the checkpoint")
    g.add_argument("--quick", action="store_true", help="a slice of the data, a tiny model: the pipeline on CPU in < 60 s")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    g.add_argument("--benchmark", action="store_true", help="time training's optimiser step of these flags (real "
                   "batches if the zip is in --data-dir, else random) and print one JSON line; writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=None,
                   help="timed steps after 3 warm-up ones (default 20; with --quick 3, after 1)")
    g.add_argument("--pretrained", action="store_true", help="use the shipped weights in pretrained/translator/ "
                   "instead of a run folder (translate, evaluate, --sample-only; training: fine-tune them)")
    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None, help="write RUN_DIR/ckpt.pt's model as "
                   "pretrained/translator/en-fr.* (fp16 safetensors, JSON, tokenizer) and refresh pretrained/SHA256SUMS")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the encoder and decoder layers for training (default: on with CUDA)")
    add_run_flags(p)
    return p


def add_run_flags(p):
    """The flags of the data, the model, training and translation (build_parser's other half)."""
    g = p.add_argument_group("data and tokenizer (on --resume, the checkpoint's tokenizer)")
    g.add_argument("--vocab-size", type=number(int, 260, 65_536), default=8000, help="tokens of the shared BPE")
    g.add_argument("--max-pairs", type=number(int, 0), default=0, help="train on the first N training pairs (0: all)")
    g.add_argument("--max-eval", type=number(int, 0), default=0,
                   help="validate and test on the first N sentences of those splits (0: all)")
    g.add_argument("--batch-tokens", type=number(int, 0), default=6000, help="training batches of pairs of similar "
                   "length, at most this many tokens each, padding included (0: --batch-size pairs)")

    g = p.add_argument_group("model (on --resume, --sample-only, translate and evaluate, the checkpoint's)")
    g.add_argument("--max-len", type=number(int, 4, 4096), default=64, help="positions per side, in tokens")
    g.add_argument("--n-layer", type=positive(int), default=6, help="N: encoder layers, and decoder layers")
    g.add_argument("--n-head", type=positive(int), default=4, help="h: attention heads")
    g.add_argument("--d-model", type=positive(int), default=512, help="d_model, even and divisible by --n-head")
    g.add_argument("--d-ff", type=positive(int), default=1024, help="the feed-forward layers' inner width")
    g.add_argument("--dropout", type=number(float, 0, 1), default=0.3, help="P_drop")
    g.add_argument("--label-smoothing", type=number(float, 0, 1), default=0.1, help="epsilon_ls")
    g.add_argument("--pre-ln", action="store_true", help="LayerNorm before each sublayer, not after it (the paper)")

    g = p.add_argument_group("training")
    g.add_argument("--warmup-steps", type=positive(int), default=4000, help="the schedule's warmup_steps")
    g.add_argument("--beta2", type=number(float, 0, 1), default=0.98, help="Adam beta_2")
    g.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the global gradient norm (0: off, "
                                                                           "as in the paper)")
    g.add_argument("--grad-accum", type=positive(int), default=1, help="micro-steps per optimiser step")
    g.add_argument("--eval-interval", type=positive(int), default=1000, help="steps between validation + checkpoint")
    g.add_argument("--log-interval", type=positive(int), default=50, help="steps between log lines")
    g.add_argument("--eval-sentences", type=positive(int), default=500,
                   help="validation sentences translated (greedy) for the BLEU at each evaluation")
    g.add_argument("--keep-last", type=number(int, 0), default=0, help="also keep the model weights of the last N "
                   "validations, as weights-STEP.pt, for --average")

    g = p.add_argument_group("translation")
    g.add_argument("--beam", type=positive(int), default=4, help="beam size (1: greedy); evaluate scores greedy and this")
    g.add_argument("--alpha", type=number(float, 0), default=0.6, help="length penalty exponent of the beam search")
    g.add_argument("--attention-text", default=SEED_SENTENCE, help="the sentence whose cross-attention is drawn")
    g.add_argument("--average", action="store_true", help="translate, evaluate and --sample-only with the mean of "
                   "the run's kept weights (--keep-last), as the paper averages its last checkpoints (§6.1)")


def flag_defaults(p):
    return {a.dest: a.default for a in p._actions if a.dest != "help"}


def apply_overrides(defaults, typed):
    """The run's flags, later layers winning: the defaults, --quick's, on --resume the checkpoint's flags
    (but NOT_RESUMED), then the flags typed."""
    out_dir = typed.get("out_dir") or (QUICK_OUT_DIR if typed.get("quick") else
                                       "runs/translator-pretrained" if typed.get("pretrained") else "runs/translator")
    layers = [defaults, QUICK if typed.get("quick") else {}]
    if typed.get("resume"):
        saved = {"batch_tokens": 0, **load_checkpoint(Path(out_dir) / "ckpt.pt")["args"]}  # older runs: pairs
        layers.append({k: v for k, v in saved.items() if k not in NOT_RESUMED})
    return {**{k: v for layer in layers for k, v in layer.items()}, **typed, "out_dir": out_dir}


def parse_args(argv=None):
    """argv, parsed once: the parser returns only the flags typed (their defaults suppressed), and
    apply_overrides puts them over the defaults; then the checks that look at several flags."""
    p = build_parser()
    defaults = flag_defaults(p)
    for a in p._actions:
        if a.option_strings:  # the positionals (command, text) are never overridden
            a.default = argparse.SUPPRESS
    typed = vars(p.parse_intermixed_args(argv))  # intermixed: translate --pretrained TEXT
    for flag in ("out_dir", "figures_dir"):
        if typed.get(flag):
            output_folder(p, "--" + flag.replace("_", "-"), typed[flag])
    if typed.get("resume") and typed.get("pretrained"):
        p.error("--resume continues a run, --pretrained starts one from the shipped weights; choose one")
    if typed.get("average") and typed.get("pretrained"):
        p.error("--average reads a run's kept weights, --pretrained the shipped ones; choose one")
    args = argparse.Namespace(**apply_overrides(defaults, typed))
    if args.command != "translate" and args.text is not None:
        p.error(f"unexpected text {args.text!r}; only the translate command takes one")
    if args.command == "translate" and args.text is not None and not args.text.strip():
        p.error("translate: the text is empty; give a sentence, or none to read lines from stdin")
    if args.d_model % args.n_head or args.d_model % 2:
        p.error(f"--d-model {args.d_model} must be even and divisible by --n-head {args.n_head}")
    if not args.attention_text.strip():
        p.error("--attention-text is empty; give a sentence")
    if args.export_pretrained and not (Path(args.export_pretrained) / "ckpt.pt").is_file():
        p.error(f"--export-pretrained {args.export_pretrained}: no ckpt.pt there; give the --out-dir of a finished run")
    args.draw_translation = args.command == "translate" and "figures_dir" in typed
    args.figures_dir = args.figures_dir or args.out_dir
    if args.benchmark_steps is None:
        args.benchmark_steps = 3 if args.quick else 20
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.export_pretrained:
        run_dir = Path(args.export_pretrained)
        return export_pretrained(load_checkpoint(run_dir / "ckpt.pt"), run_dir, flag_defaults(build_parser()))
    if args.benchmark:
        return benchmark(args)
    if args.command == "translate":
        return translate_command(args)
    if args.command == "evaluate":
        return evaluate_command(args)
    if not args.sample_only:
        train(args)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone scores and draws
        report(args, pretrained=args.pretrained and args.sample_only)  # after fine-tuning: the run's checkpoint


if __name__ == "__main__":
    main()
