"""TinyStories, from tokens to a Transformer that tells stories.

    python tiny_stories_lm/main.py tokenize "Once upon a time, Lily went to the park."   # step 1: tokens
    python tiny_stories_lm/main.py --model bag --context 2 --data-dir DIR   # step 2: averaged embeddings
    python tiny_stories_lm/main.py --data-dir DIR                           # step 3: a Transformer
    python tiny_stories_lm/main.py sample --prompt "Once upon a time"                    # stories from a checkpoint
    python tiny_stories_lm/main.py sample --pretrained --prompt "Once upon a time"       # the shipped model, offline
    python tiny_stories_lm/main.py attention --layer 1 --attention-prompt "..."          # attention heatmaps
    python tiny_stories_lm/main.py --quick                                               # everything on CPU in < 60 s
    python tiny_stories_lm/main.py --benchmark [--quick]     # one JSON line: tokens/s, step time, TFLOP/s (writes nothing)
    python tiny_stories_lm/main.py --preset gpu --data-dir DIR   # llama2.c's 15M model on the full corpus (one GPU)
    torchrun --nproc_per_node=4 tiny_stories_lm/main.py ...                              # DistributedDataParallel

Data: --data-dir DIR (default data/) holds DIR/tinystories/TinyStoriesV2-GPT4-train.txt and
TinyStoriesV2-GPT4-valid.txt, downloaded there when missing from
https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/ (2.2 GB + 22 MB), or any
train_excerpt.txt / valid_excerpt.txt in their place: stories separated by <|endoftext|> or blank
lines. With the README's excerpts there (932K and 788K characters), the two commands above are
its results: bag 1.610 and Transformer 1.189 bits per character on 2 CPU cores.

Training runs go to runs/tiny_stories_lm/<model>/: ckpt.pt (with the tokenizer), log.csv,
results.json (bits per character on the whole validation text), stories.txt, attention.html.
"""
import argparse
import math
import os
import re
import sys
from pathlib import Path

from export import export_pretrained
from pretrained import pretrained_flags
from sample import attention, sample, show_tokens
from train import QUICK_OUT_DIR, benchmark, load_checkpoint, train

# Per model: the defaults of the README's runs (CPU); flags given explicitly win.
DEFAULTS = {
    "transformer": dict(optimizer="adamw", lr=2e-3, min_lr=2e-4, steps=1500, batch_size=16, block_size=256,
                        dropout=0.2, weight_decay=0.1, warmup_steps=100),
    "bag": dict(optimizer="sgd", lr=3.0, min_lr=0.0, steps=1500, batch_size=16, block_size=256, dropout=0.1,
                weight_decay=0.0, warmup_steps=100),
}
# --preset gpu: sized and trained like llama2.c's 15M TinyStories model (dim 288, 6 layers, 6 heads, context
# 256, a 32K vocabulary; its train.py: batch 128 x 4 micro-steps, AdamW lr 5e-4, beta2 0.95, weight decay 0.1,
# 1,000 warmup steps, cosine to 0 at 100,000 steps, no dropout, bf16, compile), on the full TinyStoriesV2-GPT4
# files (downloaded when missing, never the excerpts). Its published validation loss: 1.072 nats/token.
PRESETS = {"gpu": dict(corpus="full", vocab_size=32_000, block_size=256, n_layer=6, n_head=6, n_embd=288,
                       dropout=0.0, batch_size=128, grad_accum=4, lr=5e-4, min_lr=0.0, beta2=0.95, weight_decay=0.1,
                       warmup_steps=1000, steps=100_000, eval_interval=2000, log_interval=50,
                       eval_tokens=1_048_576, compile=True)}
# --quick: a slice of the text, a tiny model, a short run: the whole pipeline on CPU in under a minute.
QUICK = dict(max_train_chars=300_000, max_valid_chars=30_000, vocab_size=512, n_layer=2, n_head=2, n_embd=64,
             hidden=128, block_size=64, batch_size=16, steps=500, warmup_steps=20, eval_interval=100,
             log_interval=10, num_samples=1, max_new_tokens=60, benchmark_steps=5)
# Flags that --resume does not take from the checkpoint: where things go and how to sample.
NOT_RESUMED = {"command", "text", "resume", "sample_only", "quick", "out_dir", "figures_dir", "device", "wandb",
               "prompt", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "layer", "attention_prompt",
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


def check_folder(p, flag, path):
    """A folder the run writes into: refused now if it, or the nearest existing path above it, is
    not a folder (mkdir would fail later, after the training)."""
    for d in [Path(path), *Path(path).parents]:
        if d.exists():
            if not d.is_dir():
                where = "is" if d == Path(path) else f"is inside {d}, which is"
                p.error(f"{flag} {path} {where} a file, not a folder; pass a folder (the file is left as it is)")
            return


def per_model(flag):
    return f"(default: transformer {DEFAULTS['transformer'][flag]}, bag {DEFAULTS['bag'][flag]})"


def build_parser():
    """Every flag, declared once; those left at None take the --model's DEFAULTS."""
    p = Parser(prog="tiny_stories_lm/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
               allow_abbrev=False)
    p.add_argument("command", nargs="?", choices=["train", "tokenize", "sample", "attention"], default="train",
                   help="train (default): train, then tell stories and draw figures; tokenize TEXT: show its tokens; "
                        "sample: stories from a checkpoint; attention: heatmaps of a checkpoint's attention")
    p.add_argument("text", nargs="?", default=None, help="tokenize: the text to cut into tokens")

    g = p.add_argument_group("shared")
    g.add_argument("--device", type=device, default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--seed", type=number(int, 0), default=1337, help="seeds weights, batches and sampling (>= 0)")
    g.add_argument("--data-dir", default="data", help="dataset root: DIR/tinystories/ holds TinyStoriesV2-GPT4-{train,"
                                                      "valid}.txt (downloaded there if missing) or {train,valid}_excerpt.txt "
                                                      "(stories separated by <|endoftext|> or blank lines)")
    g.add_argument("--out-dir", default=None, help="the run's folder (default: runs/tiny_stories_lm/<model>)")
    g.add_argument("--figures-dir", default=None, help="where figures go (default: --out-dir); 'images' refreshes the README's")
    g.add_argument("--steps", type=positive(int), help=f"optimiser steps {per_model('steps')}")
    g.add_argument("--batch-size", type=positive(int), help=f"sequences per micro-step and process {per_model('batch_size')}")
    g.add_argument("--lr", type=positive(float), help=f"peak learning rate {per_model('lr')}")
    g.add_argument("--resume", action="store_true", help="continue --out-dir/ckpt.pt with its flags (same schedule and batches)")
    g.add_argument("--sample-only", action="store_true", help="skip training: stories and figures from the checkpoint")
    g.add_argument("--pretrained", action="store_true",
                   help="use the shipped weights in pretrained/tiny_stories_lm/ instead of a run folder (--model picks which)")
    g.add_argument("--export-pretrained", metavar="RUN_DIR", default=None,
                   help="write pretrained/tiny_stories_lm/<model>.{safetensors,json} from the finished run in RUN_DIR "
                        "(scored on its validation text: --data-dir), then stop")
    g.add_argument("--quick", action="store_true", help="a slice of the text, a tiny model: the pipeline on CPU in < 60 s")
    g.add_argument("--preset", choices=["gpu"], default=None,
                   help="gpu: llama2.c's 15M model and recipe on the full corpus, bf16, compiled (flags typed win)")
    g.add_argument("--wandb", action="store_true", help="log to Weights & Biases (off by default)")
    add_data_and_model_flags(p)
    add_training_flags(p)
    add_sampling_flags(p)
    return p


def add_data_and_model_flags(p):
    g = p.add_argument_group("data and tokenizer (on --resume, the checkpoint's tokenizer)")
    g.add_argument("--tokenizer", choices=["bpe", "word"], default="bpe",
                   help="byte-level BPE (default) or words and punctuation, trained on the training stories")
    g.add_argument("--vocab-size", type=number(int, 260, 65_536), default=2048, help="tokens in the vocabulary")
    g.add_argument("--corpus", choices=["any", "full"], default="any",
                   help="any: the full TinyStoriesV2-GPT4 files, else the excerpts, else download the full ones; "
                        "full: the full files only (downloaded when missing)")
    g.add_argument("--max-train-chars", type=number(int, 0), default=0, help="read only this much training text (0: all)")
    g.add_argument("--max-valid-chars", type=number(int, 0), default=0, help="read only this much validation text (0: all)")

    g = p.add_argument_group("model (on --resume and --sample-only, the checkpoint's)")
    g.add_argument("--model", choices=["transformer", "bag"], default="transformer",
                   help="decoder-only Transformer, or the bag of averaged embeddings (no attention, no positions)")
    g.add_argument("--block-size", type=positive(int), help=f"sequence length in tokens {per_model('block_size')}")
    g.add_argument("--n-layer", type=positive(int), default=4, help="transformer: blocks")
    g.add_argument("--n-head", type=positive(int), default=4, help="transformer: attention heads")
    g.add_argument("--n-embd", type=positive(int), default=192, help="embedding width C (transformer: divisible by --n-head)")
    g.add_argument("--pos", choices=["rope", "learned"], default="rope", help="transformer: rotary or learned positions")
    g.add_argument("--norm", choices=["rmsnorm", "layernorm"], default="rmsnorm", help="transformer: the blocks' norm")
    g.add_argument("--context", type=positive(int), default=16, help="bag: tokens averaged (the window k)")
    g.add_argument("--hidden", type=positive(int), default=1024, help="bag: the MLP's hidden width")
    g.add_argument("--dropout", type=number(float, 0, 1), help=f"dropout probability {per_model('dropout')}")


def add_training_flags(p):
    g = p.add_argument_group("training")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], help=f"{per_model('optimizer')}; sgd has momentum 0.9")
    g.add_argument("--min-lr", type=number(float, 0), help=f"learning rate at the end of the cosine {per_model('min_lr')}")
    g.add_argument("--warmup-steps", type=number(int, 0), help=f"linear warmup steps {per_model('warmup_steps')}")
    g.add_argument("--weight-decay", type=number(float, 0), help=f"on matrices only {per_model('weight_decay')}")
    g.add_argument("--beta2", type=number(float, 0, 1), default=0.99, help="AdamW beta2")
    g.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="clip the global gradient norm (0: off)")
    g.add_argument("--grad-accum", type=positive(int), default=1, help="micro-steps per optimiser step")
    g.add_argument("--eval-interval", type=positive(int), default=100, help="steps between validation + checkpoint")
    g.add_argument("--log-interval", type=positive(int), default=10, help="steps between log lines")
    g.add_argument("--eval-tokens", type=number(int, 0), default=65_536, help="validation tokens scored at each "
                                                                               "eval (0: all; the final score uses all)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the model (--preset gpu: on)")
    g.add_argument("--benchmark", action="store_true", help="time training steps of this config and print one JSON "
                                                            "line (tokens/s, step time, TFLOP/s, MFU); writes nothing")
    g.add_argument("--benchmark-steps", type=positive(int), default=20,
                   help="--benchmark: timed steps after 3 warm-up ones (--quick: 5)")


def add_sampling_flags(p):
    g = p.add_argument_group("sampling and attention")
    g.add_argument("--prompt", default="Once upon a time", help="how the stories start")
    g.add_argument("--num-samples", type=positive(int), default=3, help="stories to tell")
    g.add_argument("--max-new-tokens", type=positive(int), default=400, help="tokens per story at most")
    g.add_argument("--temperature", type=number(float, 0), default=0.8, help="softmax temperature (0: greedy)")
    g.add_argument("--top-k", type=number(int, 0), default=0, help="sample among the k likeliest tokens (0: all)")
    g.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=0.95,
                   help="nucleus: the smallest set of tokens with this much probability (1: all)")
    g.add_argument("--layer", type=number(int, 0), default=0, help="attention: the layer whose heads are drawn")
    g.add_argument("--attention-prompt", default="Lily went to the park with her dog. She",
                   help="attention: the text whose attention is drawn")


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
    if args.preset and (args.quick or args.model != "transformer"):
        p.error(f"--preset {args.preset} trains the Transformer at full size; leave out --quick and --model bag")
    if args.pretrained and args.resume:
        p.error("--pretrained starts from the shipped weights; --resume continues a run: choose one")
    # The model's defaults, the preset's, --quick's, then a resumed run's flags or the shipped model's
    # config; flags typed on the command line win over all of them.
    explicit = typed_flags(p, argv)
    apply_overrides(args, explicit, DEFAULTS[args.model], PRESETS.get(args.preset, {}), QUICK if args.quick else {})
    if args.out_dir is None:
        run = args.model + (f"-{args.preset}" if args.preset else "")
        args.out_dir = f"{QUICK_OUT_DIR if args.quick else 'runs/tiny_stories_lm'}/{run}"
    for flag, path in (("--out-dir", args.out_dir), ("--figures-dir", args.figures_dir)):
        if path is not None:
            check_folder(p, flag, path)
    if args.resume:
        saved = load_checkpoint(Path(args.out_dir) / "ckpt.pt")["args"]
        apply_overrides(args, explicit, {k: v for k, v in saved.items() if k not in NOT_RESUMED})
    if args.pretrained:
        apply_overrides(args, explicit, pretrained_flags(args.model))
    if args.benchmark and (args.command != "train" or args.resume or args.sample_only):
        p.error("--benchmark times a fresh model's training; leave out the command, --resume and --sample-only")
    if args.command == "tokenize" and not args.text:
        p.error('tokenize needs a text: tiny_stories_lm/main.py tokenize "Once upon a time"')
    if args.command != "tokenize" and args.text is not None:
        p.error(f"unexpected text {args.text!r}; only the tokenize command takes one")
    if args.model == "transformer" and args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.model == "transformer" and args.pos == "rope" and (args.n_embd // args.n_head) % 2:
        p.error(f"--pos rope needs an even head size; --n-embd {args.n_embd} / --n-head {args.n_head} is odd")
    if args.eval_interval % args.log_interval:
        p.error(f"--eval-interval {args.eval_interval} must be a multiple of --log-interval {args.log_interval}")
    if args.prompt == "":
        p.error("--prompt is empty; give at least one character")
    if args.beta2 == 1:
        p.error("argument --beta2: '1': must be < 1 (AdamW divides by 1 - beta2^t)")
    args.figures_dir = args.figures_dir or args.out_dir
    return args




def command_of(saved):
    """The `python tiny_stories_lm/main.py ...` that reproduces a run's flags: those that differ from the
    defaults of its --model (for the card of --export-pretrained; --data-dir shown as DIR)."""
    p = build_parser()
    reference = vars(apply_overrides(p.parse_args([]), set(), DEFAULTS[saved["model"]]))
    words = ["python", "tiny_stories_lm/main.py"]
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
    if args.command == "tokenize":
        return show_tokens(args)
    if args.command == "attention":
        return attention(args)
    if args.command == "train" and not args.sample_only:
        train(args)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone tells stories
        sample(args)


if __name__ == "__main__":
    main()
