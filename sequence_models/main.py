"""RNN, LSTM and GRU written from tensor ops, and Bengio et al. (2003)'s MLP language model, trained by
a callback Learner: IMDb sentiment (Maas et al. 2011), fast.ai's human numbers (1 to 9,999 in
words), makemore's names and any text, character by character.

    python sequence_models/main.py --task imdb --model lstm --data-dir /path/to/datasets   # the README result
    python sequence_models/main.py --task numbers --model gru                              # no download needed
    python sequence_models/main.py --task names --model mlp --data-dir /path/to/datasets  # Bengio 2003 on names
    python sequence_models/main.py --task text --text /path/to/1984.txt --model lstm      # any UTF-8 text
    python sequence_models/main.py interact --task imdb                                   # type reviews, get sentiment
    python sequence_models/main.py interact --pretrained --task imdb --review "A dull, lifeless mess."  # shipped
    python sequence_models/main.py interact --task numbers --prompt "nine thousand twelve . nine thousand thirteen ."
    python sequence_models/main.py sweep --task names --model mlp --grid context=3,8 lr=1e-3,3e-3 --epochs 5
    python sequence_models/main.py --task imdb-lm --data-dir /path/to/datasets  # pretrain 10 epochs (--resume)
    python sequence_models/main.py transfer --seeds 3 --data-dir /path/to/datasets  # pretrained vs scratch, few labels
    python sequence_models/main.py probe --data-dir /path/to/datasets          # linear probe: pretrained vs random encoder
    python sequence_models/main.py --quick --data-dir /path/to/datasets                   # the pipeline, CPU, < 60 s
    python sequence_models/main.py --benchmark --task names --data-dir /path/to/datasets  # time the training step

--data-dir holds imdb/aclImdb_v1.tar.gz (IMDb's archive, as Stanford serves it) and names/names.txt
(makemore's names, one per line); either is downloaded there when missing.

Each run lives in OUT_DIR/<task>-<model>/: ckpt.pt (for --resume), best.pt (the highest validation
accuracy: what is evaluated and served), log.csv, train.log, results.json, tensorboard/.
--pretrained reads the shipped weights in pretrained/sequence_models/ instead (IMDb and numbers, LSTM).
"""
import argparse
import logging
import math
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from benchmark import benchmark
from callbacks import FOLDER, load_checkpoint
from pretrained import export, shipped_flags
from probe import probe
from sample import interact, sample
from sweep import parse_grid, sweep
from transfer import KINDS, transfer
from train import evaluate_only, log_file, run_dir, train

# Per task; a flag typed on the command line always wins.
DEFAULTS = {
    "imdb": dict(epochs=6, batch_size=64, lr=3e-3, emb_size=128, hidden_size=256, layers=1, dropout=0.4,
                 weight_decay=0.01, patience=2, checkpoint_every=0),
    "numbers": dict(epochs=30, batch_size=64, lr=3e-3, emb_size=64, hidden_size=64, layers=2, dropout=0.5,
                    weight_decay=0.1, patience=0, checkpoint_every=0),
    "names": dict(epochs=20, batch_size=128, lr=3e-3, emb_size=24, hidden_size=256, layers=1, dropout=0.1,
                  weight_decay=0.01, patience=0, checkpoint_every=0),
    "imdb-lm": dict(epochs=10, batch_size=64, lr=3e-3, emb_size=128, hidden_size=256, layers=1, dropout=0.1,
                    weight_decay=0.01, patience=0, checkpoint_every=500, bptt=32, emb_dropout=0.1),
    "text": dict(epochs=10, batch_size=64, lr=3e-3, emb_size=32, hidden_size=256, layers=2, dropout=0.1,
                 weight_decay=0.01, patience=0, checkpoint_every=0),
}
QUICK = {
    "imdb": dict(epochs=5, lr=5e-3, limit=4000, max_len=150, vocab_size=8000, emb_size=32, hidden_size=48),
    "numbers": dict(epochs=5, hidden_size=32, emb_size=32),
    "names": dict(epochs=2, hidden_size=32, emb_size=8),
    "text": dict(epochs=2, hidden_size=32, emb_size=8),
    "imdb-lm": dict(epochs=1, limit=1000, vocab_size=5000, lm_vocab=2000, emb_size=32, hidden_size=48),
}
QUICK_OUT_DIR = "runs/sequence_models-quick"
NUMBERS_PROMPT = "eight thousand one hundred eleven . eight thousand one hundred twelve ."
# What --resume does not take from the checkpoint's flags.
NOT_RESUMED = {"command", "resume", "sample_only", "evaluate", "quick", "out_dir", "figures_dir", "device", "compile",
               "bf16", "benchmark", "benchmark_steps", "wandb", "tensorboard", "review", "prompt", "words",
               "temperature", "pretrained", "export_pretrained"}
RENAMED = {"cell": "model", "pretrained": "encoder"}  # flags of checkpoints written before the renames


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


def counts(s):
    try:
        values = [int(v) for v in s.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give label counts like 100,500,2500")
    if any(v < 2 for v in values):
        raise argparse.ArgumentTypeError(f"{s!r}: every label count must be at least 2")
    return values


def kinds(s):
    values = s.split(",")
    if not values or not set(values) <= set(KINDS):
        raise argparse.ArgumentTypeError(f"{s!r}: give some of {','.join(KINDS)}")
    return values


def per_task(flag):
    return f"(default: {', '.join(f'{task} {d[flag]}' for task, d in DEFAULTS.items())})"


def flag(default, help, group="training", **kw):
    """A Config field: its default, help, --help group and argparse keywords (type, choices, action...)."""
    value = dict(default_factory=lambda: list(default)) if isinstance(default, list) else dict(default=default)
    return field(**value, metadata=dict(help=help, group=group, **kw))


def positive(kind):
    return number(kind, 0, low_open=True)


@dataclass
class Config:
    """Every flag, declared once: its default and help. Defaults of None come from the task (DEFAULTS)."""
    command: str = flag("train", "train (default): train, evaluate, sample; interact: use a trained model; sweep: one "
                        "training run per --grid config; transfer: pretrained vs scratch IMDb classifiers at "
                        "--label-counts; probe: logistic regression on the frozen pretrained and random encoders' "
                        "features at --label-counts", None, nargs="?",
                        choices=["train", "interact", "sweep", "transfer", "probe"])
    task: str = flag("imdb", "IMDb sentiment, an LM of IMDb's text (pretraining), the human-numbers LM, or a character "
                     "LM of makemore's names or of --text FILE", None,
                     choices=["imdb", "imdb-lm", "numbers", "names", "text"])
    model: str = flag("lstm", "the recurrent layer (rnn, lstm, gru), or (names, text) mlp: Bengio et al. 2003's MLP",
                      None, choices=["rnn", "lstm", "gru", "mlp"])
    # shared
    device: str = flag("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps", "shared", type=device)
    seed: int = flag(0, "seeds weights, dropout and batch order", "shared", type=number(int, 0, 2 ** 31 - 1))
    data_dir: str = flag("data", "dataset root; IMDb is DIR/imdb/aclImdb_v1.tar.gz, makemore's names "
                         "DIR/names/names.txt "
                         "(downloaded there if missing); human numbers are generated", "shared")
    out_dir: str = flag("runs/sequence_models", "runs go to OUT_DIR/<task>-<model>/", "shared")
    figures_dir: str = flag(None, "where figures go (default: --out-dir); 'images' refreshes the README's", "shared")
    epochs: int = flag(None, f"passes over the training data {per_task('epochs')}", "shared", type=number(int, 1))
    batch_size: int = flag(None, f"reviews, or token rows, per batch {per_task('batch_size')}", "shared",
                           type=number(int, 1))
    lr: float = flag(None, f"peak of the learning-rate schedule (AdamW) {per_task('lr')}", "shared",
                     type=positive(float))
    resume: bool = flag(False, "continue OUT_DIR/<task>-<model>/ckpt.pt with its flags", "shared", action="store_true")
    checkpoint_every: int = flag(None, "also write ckpt.pt every N optimiser steps within an epoch, where --resume "
                                 f"continues exactly (0: at the end of each epoch only) {per_task('checkpoint_every')}",
                                 "shared", type=number(int, 0))
    sample_only: bool = flag(False, "skip training: examples and figures from the checkpoint", "shared",
                             action="store_true")
    evaluate: bool = flag(False, "skip training: score the checkpoint on the validation (and test) split", "shared",
                          action="store_true")
    pretrained: bool = flag(False, "use the shipped weights in pretrained/sequence_models/ instead of a run folder "
                            "(--task imdb or numbers, --model lstm): with interact, --sample-only, --evaluate, or "
                            "training (fine-tunes them)", "shared", action="store_true")
    export_pretrained: str = flag(None, "write pretrained/sequence_models/<task>-<model>.{safetensors,json,log.csv} "
                                  "from this finished run folder (OUT_DIR/<task>-<model>) and refresh "
                                  "pretrained/SHA256SUMS", "shared", metavar="RUN_DIR")
    quick: bool = flag(False, "tiny model, a slice of the data: the pipeline on CPU in < 60 s", "shared",
                       action="store_true")
    wandb: bool = flag(False, "log to Weights & Biases (off by default)", "shared", action="store_true")
    tensorboard: bool = flag(False, "log to OUT_DIR/<task>-<model>/tensorboard", "shared", action="store_true")
    # model
    emb_size: int = flag(None, f"embedding width {per_task('emb_size')}", "model", type=number(int, 1))
    hidden_size: int = flag(None, f"hidden state width H {per_task('hidden_size')}", "model", type=number(int, 1))
    layers: int = flag(None, f"stacked recurrent layers {per_task('layers')}", "model", type=number(int, 1))
    dropout: float = flag(None, f"dropout; imdb: on embeddings, between layers, before the head; the LMs: on the last "
                          f"layer's outputs {per_task('dropout')}", "model", type=number(float, 0, 1))
    emb_dropout: float = flag(0.0, "recurrent LMs: dropout on the embedding outputs (AWD-LSTM's input dropout; "
                              f"0: off; imdb-lm: {DEFAULTS['imdb-lm']['emb_dropout']})", "model",
                              type=number(float, 0, 1))
    context: int = flag(3, "mlp: previous characters seen (Bengio's n - 1)", "model", type=number(int, 1, 1024))
    direct: bool = flag(False, "mlp: add Bengio's direct connections W x", "model", action="store_true")
    pooling: str = flag("meanmax", "imdb: what the head reads: meanmax, [mean; max] over the LSTM outputs; concat, "
                        "ULMFiT's [h_T; max; mean]", "model", choices=["meanmax", "concat"])
    # training
    weight_decay: float = flag(None, f"AdamW weight decay {per_task('weight_decay')}", type=number(float, 0))
    grad_clip: float = flag(1.0, "clip the gradient norm (0: off)", type=number(float, 0))
    patience: int = flag(None, "early stop after this many epochs without a better monitored metric: the validation "
                         "accuracy for imdb and numbers, the validation loss for names, text and imdb-lm (0: off) "
                         f"{per_task('patience')}", type=number(int, 0))
    max_len: int = flag(400, "imdb: keep a review's last N tokens", type=number(int, 1))
    vocab_size: int = flag(30_000, "imdb: most frequent words kept", type=number(int, 3))
    limit: int = flag(0, "imdb: use only N >= 8 train reviews (0: all)", type=number(int, 0))
    labels: int = flag(0, "imdb: train on N labelled reviews, half per class, the --seed-th block of N/2 of each "
                       "(0: all)", type=number(int, 0))
    encoder: str = flag(None, "imdb: start the encoder from this --task imdb-lm best.pt (ULMFiT's transfer)")
    freeze_epochs: int = flag(0, "imdb: train only the head for the first N epochs (ULMFiT's gradual unfreezing)",
                              type=number(int, 0))
    lr_decay: float = flag(1.0, "imdb: the LSTM learns at lr / D, the embedding at lr / D^2 (ULMFiT: 2.6)",
                           type=number(float, 1))
    lm_vocab: int = flag(10_000, "imdb-lm: predict the N most frequent words, the rest as <unk>", type=number(int, 3))
    bptt: int = flag(16, "stateful LMs (numbers, imdb-lm, text): tokens per window (truncated BPTT; "
                     f"imdb-lm: {DEFAULTS['imdb-lm']['bptt']})",
                     type=number(int, 1, 1024))
    ar: float = flag(2.0, "recurrent LMs: activation regularisation alpha", type=number(float, 0))
    tar: float = flag(1.0, "recurrent LMs: temporal activation regularisation beta", type=number(float, 0))
    text: str = flag(None, "text: the training text file (character level, last 10%% validates)")
    schedule: str = flag("onecycle", "learning rates over the fit: onecycle, Smith's one-cycle; stlr, ULMFiT's slanted "
                         "triangular rates (cut_frac 0.1, ratio 32)", choices=["onecycle", "stlr"])
    # speed
    compile: bool = flag(None, "torch.compile the recurrent time step (the MLP: the model) (default: on CUDA)", "speed",
                         action=argparse.BooleanOptionalAction)
    bf16: bool = flag(None, "bfloat16 autocast for all but the recurrence (default: on CUDA)", "speed",
                      action=argparse.BooleanOptionalAction)
    log_interval: int = flag(50, "steps between reads of the loss from the device: progress bar, TensorBoard, W&B, "
                             "the non-finite check", "speed", type=number(int, 1))
    benchmark: bool = flag(False, "time the training step of these flags' model and print one JSON line (real batches "
                           "if the data is here, else random ones); writes nothing", "speed", action="store_true")
    benchmark_steps: int = flag(None, "timed steps of --benchmark (default: 20; --quick 10)", "speed",
                                type=number(int, 1))
    # sweep, transfer, interact
    grid: list = flag(["hidden_size=128,256", "lr=1e-3,3e-3"], "values to try for emb_size, hidden_size, context, "
                      "layers, lr, dropout, batch_size (default: hidden_size=128,256 lr=1e-3,3e-3)", "sweep",
                      nargs="+", metavar="KEY=V1,V2")
    trials: int = flag(0, "run this many random configs of the grid (0: all)", "sweep", type=number(int, 0))
    label_counts: list = flag([100, 500, 2500], "labelled reviews per run, comma-separated", "transfer", type=counts)
    kinds: list = flag(list(KINDS), f"{','.join(KINDS)} (default: all): from scratch, plain fine-tuning of the "
                       "pretrained encoder, or ULMFiT's (--freeze-epochs, --lr-decay)", "transfer", type=kinds)
    valid_size: int = flag(0, "imdb: validate on the first N held-out reviews (0: all 2,500)", "transfer",
                           type=number(int, 0))
    seeds: int = flag(1, "transfer, probe: runs per label count and kind, with seeds --seed, --seed + 1, ...: other "
                      "labelled reviews (--labels) and other initial weights", "transfer", type=number(int, 1, 1000))
    test_size: int = flag(0, "probe: score on N test reviews, a fixed shuffle (0: all 25,000)", "transfer",
                          type=number(int, 0))
    review: str = flag(None, "imdb: a review to classify (default: read lines from stdin)", "interact")
    prompt: str = flag(None, f"numbers: words to continue (default: '{NUMBERS_PROMPT}'); text: characters to continue",
                       "interact")
    words: int = flag(24, "numbers: words to generate; names: names to sample; text: 10x characters", "interact",
                      type=number(int, 1, 10_000))
    temperature: float = flag(0.0, "0 is greedy, else >= 0.01 (numbers default 0, names 1, text 0.8)", "interact",
                              type=number(float, 0, 100))


def build_parser():
    p = Parser(prog="sequence_models/main.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {}
    for f in fields(Config):
        kw = dict(f.metadata)
        group = kw.pop("group")
        if f.name == "command":  # a positional's default is checked against its choices: not SUPPRESS
            p.add_argument(f.name, default=f.default, **kw)
            continue
        if group is None:  # --task and --model, before the groups
            p.add_argument("--" + f.name, default=argparse.SUPPRESS, **kw)
            continue
        target = groups.setdefault(group, p.add_argument_group(group))
        target.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, **kw)
    p.add_argument("--cell", dest="model", choices=["rnn", "lstm", "gru"], default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # the old name of --model, for the recurrent cells
    return p


def apply_overrides(explicit):
    """The flags in one place, later winning: Config's defaults, the task's, --quick's, a resumed run's or
    the shipped weights' flags, and those typed now (`explicit`)."""
    task = explicit.get("task", Config.task)
    quick = explicit.get("quick", False)
    layers = [DEFAULTS[task], QUICK[task] if quick else {}, dict(out_dir=QUICK_OUT_DIR) if quick else {}]
    if explicit.get("resume"):
        saved = load_checkpoint(run_dir(Config(**{**layers[0], **layers[2], **explicit})) / "ckpt.pt")["args"]
        saved = {RENAMED[k] if k in RENAMED and RENAMED[k] not in saved else k: v for k, v in saved.items()}
        layers.append({k: v for k, v in saved.items() if k not in NOT_RESUMED})
    elif explicit.get("pretrained"):
        layers.append(shipped_flags(task, explicit.get("model", Config.model)))
    merged = {}
    for layer in layers + [explicit]:
        merged.update(layer)
    return Config(**{k: v for k, v in merged.items() if k in {f.name for f in fields(Config)}})


def validate(p, args):
    """What one flag's type cannot check: combinations, and output paths that are files."""
    modes = ["--" + m.replace("_", "-") for m in ("benchmark", "sample_only", "evaluate", "export_pretrained")
             if getattr(args, m)]
    if len(modes) > 1:
        p.error(f"{' and '.join(modes)}: give one of them")
    if modes and args.command != "train":
        p.error(f"{modes[0]} does not go with {args.command}")
    if args.pretrained and (args.resume or args.command in ("sweep", "transfer", "probe") or args.export_pretrained):
        p.error("--pretrained goes with interact, --sample-only, --evaluate or a training run (which fine-tunes "
                "the shipped weights); transfer pretrains with --task imdb-lm and reads --encoder")
    if args.pretrained and args.pooling != "meanmax":
        p.error(f"--pooling {args.pooling}: the shipped IMDb weights pool meanmax; fine-tune them without --pooling")
    if args.model == "mlp" and args.task not in ("names", "text"):
        p.error("--model mlp is for --task names or text")
    if args.task == "text" and not args.text:
        p.error("--task text needs --text FILE")
    if 0 < args.limit < 8:
        p.error(f"--limit {args.limit}: give 0 (all reviews) or at least 8, so that validation is not empty")
    if 0 < args.temperature < 0.01:
        p.error(f"--temperature {args.temperature}: give 0 (greedy) or at least 0.01")
    for name in ("out_dir", "figures_dir"):
        if getattr(args, name) and (blocker := not_a_folder(getattr(args, name))) is not None:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: {blocker} is a file, not a folder; "
                    f"give a folder")


def parse_args(argv=None):
    p = build_parser()
    args = apply_overrides(vars(p.parse_args(argv)))
    validate(p, args)
    if args.command == "sweep":
        try:
            args.grid = parse_grid(args.grid)
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
    args.benchmark_steps = args.benchmark_steps or (10 if args.quick else 20)
    if args.prompt is None and args.task == "numbers":
        args.prompt = NUMBERS_PROMPT
    args.figures_dir = args.figures_dir or args.out_dir
    return args


def not_a_folder(path):
    """The first existing path on the way to `path` that is not a folder (where mkdir would fail), or None."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def setup_logging():
    """Log lines to stdout; train() adds its run's train.log once the flags, memory and data have passed."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[logging.StreamHandler(sys.stdout)],
                        force=True)
    logging.getLogger(FOLDER).setLevel(logging.INFO)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    if args.export_pretrained:
        return export(args.export_pretrained)
    if args.command == "interact":
        return interact(args)
    if args.command == "sweep":
        return sweep(args)
    if args.command == "transfer":
        return transfer(args)
    if args.command == "probe":
        return probe(args)
    if args.benchmark:
        return benchmark(args)
    if args.evaluate:
        return evaluate_only(args)
    if args.sample_only:
        return sample(args)
    results = train(args)
    with log_file(run_dir(args) / "train.log"):  # the examples go into the run's log too
        sample(replace(args, pretrained=False))   # from this run's best.pt, also after fine-tuning the shipped one
    return results


if __name__ == "__main__":
    main()
