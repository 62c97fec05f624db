"""RNN, LSTM and GRU written from tensor ops, and Bengio et al. (2003)'s MLP language model, trained by
a callback Learner: IMDb sentiment (Maas et al. 2011), fast.ai's human numbers (1 to 9,999 in
words), makemore's names and any text, character by character.

    python sequence_models/main.py --task imdb --cell lstm --data-dir /path/to/datasets   # the README result
    python sequence_models/main.py --task numbers --cell gru                              # no download needed
    python sequence_models/main.py --task names --model mlp --data-dir /path/to/datasets  # Bengio 2003 on names
    python sequence_models/main.py --task text --text /path/to/1984.txt --model lstm      # any UTF-8 text
    python sequence_models/main.py interact --task imdb                                   # type reviews, get sentiment
    python sequence_models/main.py interact --task numbers --prompt "nine thousand twelve . nine thousand thirteen ."
    python sequence_models/main.py sweep --task names --model mlp --grid context=3,8 lr=1e-3,3e-3 --epochs 5
    python sequence_models/main.py --quick --data-dir /path/to/datasets                   # the pipeline, CPU, < 60 s
    python sequence_models/main.py --benchmark --task names --data-dir /path/to/datasets  # time the training step

--data-dir holds imdb/aclImdb_v1.tar.gz (IMDb's archive, as Stanford serves it) and names/names.txt
(makemore's names, one per line); either is downloaded there when missing.

Each run lives in OUT_DIR/<task>-<cell>/: ckpt.pt (for --resume), best.pt (the highest validation
accuracy: what is evaluated and served), log.csv, train.log, results.json, tensorboard/.
"""
import argparse
import logging
import re
import sys
from pathlib import Path

from benchmark import benchmark
from sample import interact, sample
from sweep import parse_grid, sweep
from transfer import KINDS, transfer
from train import FOLDER, load_checkpoint, log_file, run_dir, train

# Per task; a flag typed on the command line always wins.
DEFAULTS = {
    "imdb": dict(epochs=6, batch_size=64, lr=3e-3, emb_size=128, hidden_size=256, layers=1, dropout=0.4,
                 weight_decay=0.01, patience=2),
    "numbers": dict(epochs=30, batch_size=64, lr=3e-3, emb_size=64, hidden_size=64, layers=2, dropout=0.5,
                    weight_decay=0.1, patience=0),
    "names": dict(epochs=20, batch_size=128, lr=3e-3, emb_size=24, hidden_size=256, layers=1, dropout=0.1,
                  weight_decay=0.01, patience=0),
    "imdb-lm": dict(epochs=1, batch_size=64, lr=3e-3, emb_size=128, hidden_size=256, layers=1, dropout=0.1,
                    weight_decay=0.01, patience=0),
    "text": dict(epochs=10, batch_size=64, lr=3e-3, emb_size=32, hidden_size=256, layers=2, dropout=0.1,
                 weight_decay=0.01, patience=0),
}
QUICK = {
    "imdb": dict(epochs=5, lr=5e-3, limit=4000, max_len=150, vocab_size=8000, emb_size=32, hidden_size=48),
    "numbers": dict(epochs=5, hidden_size=32, emb_size=32),
    "names": dict(epochs=2, hidden_size=32, emb_size=8),
    "text": dict(epochs=2, hidden_size=32, emb_size=8),
    "imdb-lm": dict(limit=1000, vocab_size=5000, lm_vocab=2000, emb_size=32, hidden_size=48),
}
QUICK_OUT_DIR = "runs/sequence_models-quick"
NUMBERS_PROMPT = "eight thousand one hundred eleven . eight thousand one hundred twelve ."
# What --resume does not take from the checkpoint's flags.
NOT_RESUMED = {"command", "resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "compile", "bf16",
               "benchmark", "benchmark_steps", "wandb", "tensorboard", "review", "prompt", "words", "temperature"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def device(s):
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"{s!r}: choose auto, cpu, cuda, cuda:N or mps")
    return s


def number(kind, low, high=float("inf")):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {s!r}")
        if not low <= v < high:
            raise argparse.ArgumentTypeError(f"{s!r}: must be in [{low}, {high})")
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
    return f"(default: imdb {DEFAULTS['imdb'][flag]}, numbers {DEFAULTS['numbers'][flag]})"


def parse_args(argv=None):
    p = Parser(prog="sequence_models/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["train", "interact", "sweep", "transfer"], default="train",
                   help="train (default): train, evaluate, sample; interact: use a trained model; "
                        "sweep: one training run per --grid config; transfer: pretrained vs scratch IMDb "
                        "classifiers at --label-counts")
    p.add_argument("--task", choices=["imdb", "imdb-lm", "numbers", "names", "text"], default="imdb",
                   help="IMDb sentiment, an LM of IMDb's text (pretraining), the human-numbers LM, or a character LM "
                        "of makemore's names or of --text FILE")
    p.add_argument("--cell", "--model", dest="cell", choices=["rnn", "lstm", "gru", "mlp"], default="lstm",
                   help="the recurrent layer, or (names, text) mlp: Bengio et al. 2003")

    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0, 2 ** 31), default=0, help="seeds weights, dropout and batch order")
    g.add_argument("--data-dir", default="data", help="dataset root; IMDb is DIR/imdb/aclImdb_v1.tar.gz (downloaded "
                                                      "there if missing); human numbers are generated")
    g.add_argument("--out-dir", default="runs/sequence_models", help="runs go to OUT_DIR/<task>-<cell>/")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: --out-dir); 'images' refreshes the README's")
    g.add_argument("--epochs", type=number(int, 1), help=f"passes over the training data {per_task('epochs')}")
    g.add_argument("--batch-size", type=number(int, 1), help=f"reviews, or token rows, per batch {per_task('batch_size')}")
    g.add_argument("--lr", type=number(float, 1e-8), help=f"peak of the one-cycle schedule (AdamW) {per_task('lr')}")
    g.add_argument("--resume", action="store_true", help="continue OUT_DIR/<task>-<cell>/ckpt.pt with its flags")
    g.add_argument("--sample-only", action="store_true", help="skip training: examples and figures from the checkpoint")
    g.add_argument("--quick", action="store_true", help="tiny model, a slice of the data: the pipeline on CPU in < 60 s")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    g.add_argument("--tensorboard", action="store_true", help="log to OUT_DIR/<task>-<cell>/tensorboard")

    g = p.add_argument_group("model (on --resume, the checkpoint's)")
    g.add_argument("--emb-size", type=number(int, 1), help=f"embedding width {per_task('emb_size')}")
    g.add_argument("--hidden-size", type=number(int, 1), help=f"hidden state width H {per_task('hidden_size')}")
    g.add_argument("--layers", type=number(int, 1), help=f"stacked recurrent layers {per_task('layers')}")
    g.add_argument("--dropout", type=number(float, 0, 1), help=f"dropout; imdb: on embeddings, between layers, "
                                                               f"before the head; numbers: on the last layer's outputs "
                                                               f"{per_task('dropout')}")

    g = p.add_argument_group("training")
    g.add_argument("--weight-decay", type=number(float, 0), help=f"AdamW weight decay {per_task('weight_decay')}")
    g.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the gradient norm (0: off)")
    g.add_argument("--patience", type=number(int, 0), help=f"early stop after this many epochs without a higher "
                                                           f"validation accuracy (0: off) {per_task('patience')}")
    g.add_argument("--max-len", type=number(int, 1), default=400, help="imdb: keep a review's last N tokens")
    g.add_argument("--vocab-size", type=number(int, 3), default=30_000, help="imdb: most frequent words kept")
    g.add_argument("--limit", type=number(int, 0), default=0, help="imdb: use only N >= 8 train reviews (0: all)")
    g.add_argument("--labels", type=number(int, 0), default=0, help="imdb: train on N labelled reviews, half per "
                                                                    "class (0: all)")
    g.add_argument("--pretrained", default=None, help="imdb: start the encoder from this --task imdb-lm best.pt")
    g.add_argument("--freeze-epochs", type=number(int, 0), default=0, help="imdb: train only the head for the first "
                                                                           "N epochs (ULMFiT's gradual unfreezing)")
    g.add_argument("--lr-decay", type=number(float, 1), default=1.0, help="imdb: the LSTM learns at lr / D, the "
                                                                          "embedding at lr / D^2 (ULMFiT: 2.6)")
    g.add_argument("--lm-vocab", type=number(int, 3), default=10_000, help="imdb-lm: predict the N most frequent "
                                                                          "words, the rest as <unk>")
    g.add_argument("--bptt", type=number(int, 1, 1025), default=16, help="numbers: tokens per window (truncated BPTT)")
    g.add_argument("--ar", type=number(float, 0), default=2.0, help="recurrent LMs: activation regularisation alpha")
    g.add_argument("--tar", type=number(float, 0), default=1.0, help="recurrent LMs: temporal activation regularisation beta")
    g.add_argument("--text", default=None, help="text: the training text file (character level, last 10%% validates)")
    g.add_argument("--context", type=number(int, 1, 1025), default=3, help="mlp: previous characters seen (Bengio's n - 1)")
    g.add_argument("--direct", action="store_true", help="mlp: add Bengio's direct connections W x")

    g = p.add_argument_group("speed")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the recurrent time step "
                                                                            "(the MLP: the model) (default: on CUDA)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bfloat16 autocast for all but the "
                                                                         "recurrence (default: on CUDA)")
    g.add_argument("--log-interval", type=number(int, 1), default=50, help="steps between reads of the loss from "
                                                                           "the device: progress bar, TensorBoard, "
                                                                           "W&B, the non-finite check")
    g.add_argument("--benchmark", action="store_true", help="time the training step of these flags' model and print "
                                                            "one JSON line (real batches if the data is here, else "
                                                            "random ones); writes nothing")
    g.add_argument("--benchmark-steps", type=number(int, 1), help="timed steps of --benchmark (default: 20; --quick 10)")

    g = p.add_argument_group("sweep")
    g.add_argument("--grid", nargs="+", metavar="KEY=V1,V2", default=["hidden_size=128,256", "lr=1e-3,3e-3"],
                   help="values to try for emb_size, hidden_size, context, layers, lr, dropout, batch_size "
                        "(default: hidden_size=128,256 lr=1e-3,3e-3)")
    g.add_argument("--trials", type=number(int, 0), default=0, help="run this many random configs of the grid (0: all)")

    g = p.add_argument_group("transfer")
    g.add_argument("--label-counts", type=counts, default=[100, 500, 2500], help="labelled reviews per run, "
                                                                                  "comma-separated")
    g.add_argument("--kinds", type=kinds, default=list(KINDS),
                   help=f"{','.join(KINDS)} (default: all): from scratch, plain fine-tuning of the pretrained "
                        f"encoder, or ULMFiT's (--freeze-epochs, --lr-decay)")
    g.add_argument("--valid-size", type=number(int, 0), default=0, help="imdb: validate on the first N held-out "
                                                                        "reviews (0: all 2,500)")

    g = p.add_argument_group("interact")
    g.add_argument("--review", default=None, help="imdb: a review to classify (default: read lines from stdin)")
    g.add_argument("--prompt", default=None, help=f"numbers: words to continue (default: '{NUMBERS_PROMPT}'); "
                                                  f"text: characters to continue")
    g.add_argument("--words", type=number(int, 1, 10_000), default=24, help="numbers: words to generate; names: names to sample; text: 10x characters")
    g.add_argument("--temperature", type=number(float, 0, 100), default=0.0, help="numbers: 0 is greedy, else >= 0.01")

    # Defaults, then the task's, then --quick's, then a resumed run's; flags typed now always win.
    args = p.parse_args(argv)
    p.set_defaults(**{**DEFAULTS[args.task], **(QUICK[args.task] if args.quick else {})})
    if args.quick:
        p.set_defaults(out_dir=QUICK_OUT_DIR)
    args = p.parse_args(argv)
    if args.resume:
        saved = load_checkpoint(run_dir(args) / "ckpt.pt")["args"]
        p.set_defaults(**{k: v for k, v in saved.items() if k not in NOT_RESUMED})
        args = p.parse_args(argv)
    if args.benchmark and args.command != "train":
        p.error(f"--benchmark times training; it does not go with {args.command}")
    args.benchmark_steps = args.benchmark_steps or (10 if args.quick else 20)
    if args.cell == "mlp" and args.task not in ("names", "text"):
        p.error("--model mlp is for --task names or text")
    if args.task == "text" and not args.text:
        p.error("--task text needs --text FILE")
    if 0 < args.limit < 8:
        p.error(f"--limit {args.limit}: give 0 (all reviews) or at least 8, so that validation is not empty")
    if 0 < args.temperature < 0.01:
        p.error(f"--temperature {args.temperature}: give 0 (greedy) or at least 0.01")
    if args.command == "sweep":
        try:
            args.grid = parse_grid(args.grid)
        except argparse.ArgumentTypeError as e:
            p.error(str(e))
    if args.prompt is None and args.task == "numbers":
        args.prompt = NUMBERS_PROMPT
    for flag in ("out_dir", "figures_dir"):
        if getattr(args, flag) and (blocker := not_a_folder(getattr(args, flag))) is not None:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {blocker} is a file, not a folder; "
                    f"give a folder")
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
    if args.command == "interact":
        return interact(args)
    if args.command == "sweep":
        return sweep(args)
    if args.command == "transfer":
        return transfer(args)
    if args.benchmark:
        return benchmark(args)
    if args.sample_only:
        return sample(args)
    train(args)
    with log_file(run_dir(args) / "train.log"):  # the examples go into the run's log too
        sample(args)


if __name__ == "__main__":
    main()
