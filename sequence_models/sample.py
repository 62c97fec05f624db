"""From a trained run to what a person looks at: a review's sentiment, numbers or text continued
from a prompt, new names, and the training curves of every model trained on the task."""
import csv
import io
import logging
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from callbacks import FOLDER
from data import Vocab, tokenize
from model import MLPLanguageModel, build_model
from pretrained import PRETRAINED, verified
from train import load_best, resolve_device

log = logging.getLogger(FOLDER)
EXAMPLES = [  # written for this README, not from IMDb
    "One of the best films I have seen this year: funny, moving, and beautifully acted.",
    "A dull, lifeless mess. The plot makes no sense and I nearly walked out.",
    "I expected to hate it, but the second half won me over completely.",
    "The trailer promised a thriller; what we got was two hours of nothing happening.",
]


def load_model(args):
    """best.pt of the run, or with --pretrained the shipped weights: (model, vocabulary, its flags)."""
    ckpt = load_best(args)
    device = resolve_device(args.device)
    model = build_model(ckpt["task"], ckpt["config"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), Vocab(ckpt["vocab"]), ckpt["args"]


@torch.no_grad()
def sentiment(model, vocab, text, max_len):
    """P(positive) of one review."""
    ids = vocab.encode(tokenize(text))[-max_len:] or [1]
    x = torch.tensor([ids], device=next(model.parameters()).device)
    return torch.softmax(model(x, x != 0), -1)[0, 1].item()


def rng(model, seed):
    """A random generator on the model's device, for reproducible sampling."""
    return torch.Generator(device=next(model.parameters()).device).manual_seed(seed)


@torch.no_grad()
def generate(model, ids, n, temperature=0.0, stop=None, pad=0, generator=None):
    """Continue the token ids by up to n tokens (ending before `stop`): greedy at temperature 0,
    else sampled. The MLP slides its window of the last `context` tokens (padded with `pad`);
    a recurrent LM carries its state from one token to the next."""
    device = next(model.parameters()).device
    mlp = isinstance(model, MLPLanguageModel)
    if mlp:
        window = ([pad] * model.context + ids)[-model.context:]
    else:
        model.reset()
        logits = model(torch.tensor([ids], device=device), model.state).logits[0, -1]
    out = []
    for _ in range(n):
        if mlp:
            logits = model(torch.tensor([window], device=device))[0]
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        if nxt == stop:
            break
        out.append(nxt)
        if mlp:
            window = window[1:] + [nxt]
        else:
            logits = model(torch.tensor([[nxt]], device=device), model.state).logits[0, -1]
    return out


def continue_numbers(model, vocab, prompt, n_words, temperature, seed):
    words = prompt.split()
    if not words:
        raise SystemExit("sequence_models: --prompt is empty; give some number words")
    unknown = sorted({w for w in words if w not in vocab.stoi or vocab.stoi[w] < 2})
    if unknown:
        raise SystemExit(f"sequence_models: {', '.join(unknown)} not in the vocabulary; use: "
                         f"{' '.join(vocab.itos[2:])}")
    g = rng(model, seed)
    return " ".join(vocab.decode(generate(model, vocab.encode(words), n_words, temperature, generator=g)))


def new_names(model, vocab, n, seed, temperature=1.0):
    """n names sampled from '.' to '.' (makemore's sampling)."""
    g = rng(model, seed)
    dot = vocab.stoi["."]
    return ["".join(vocab.decode(generate(model, [dot], 40, temperature, stop=dot, pad=dot, generator=g)))
            for _ in range(n)]


def continue_text(model, vocab, prompt, n, seed, temperature=0.8):
    g = rng(model, seed)
    ids = vocab.encode(list(prompt)) or [vocab.stoi["."]]
    return prompt + "".join(vocab.decode(generate(model, ids, n, temperature, pad=vocab.stoi["."], generator=g)))


def interact(args):
    model, vocab, train_args = load_model(args)
    if args.task == "numbers":
        print(args.prompt, "->", continue_numbers(model, vocab, args.prompt, args.words, args.temperature, args.seed))
        return
    if args.task == "names":
        print("\n".join(new_names(model, vocab, args.words, args.seed, args.temperature or 1.0)))
        return
    if args.task == "text":
        print(continue_text(model, vocab, args.prompt or "\n", 10 * args.words, args.seed, args.temperature or 0.8))
        return
    lines = [args.review] if args.review is not None else sys.stdin
    if args.review is None and sys.stdin.isatty():
        print("type a review, one per line (Ctrl-D to end)")
    n = 0
    try:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                print("(empty review: nothing to classify)")
                continue
            p = sentiment(model, vocab, line, train_args["max_len"])
            print(f"{'positive' if p >= 0.5 else 'negative'} (P(positive) = {p:.3f})")
    except KeyboardInterrupt:
        return
    if n == 0:
        print("no review given: pass --review, or lines on stdin")


def curve_logs(args):
    """({label: log.csv rows}, figure name): every model trained on the task in --out-dir, or with
    --pretrained the shipped run's log (a figure of its own: the README's curves are other runs')."""
    if args.pretrained:
        text = verified(PRETRAINED / f"{args.task}-{args.model}.log.csv").decode()
        return ({f"{args.model} (shipped)": list(csv.DictReader(io.StringIO(text)))},
                f"sequence_models_{args.task}_pretrained_curves.png")
    paths = {model: Path(args.out_dir) / f"{args.task}-{model}" / "log.csv" for model in ("rnn", "lstm", "gru", "mlp")}
    return ({model: list(csv.DictReader(open(path))) for model, path in paths.items() if path.is_file()},
            f"sequence_models_{args.task}_curves.png")


def plot_curves(args):
    """Validation accuracy and loss per epoch of every model that has a log for this task."""
    runs, name = curve_logs(args)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, rows in runs.items():
        epochs = [int(r["epoch"]) for r in rows]
        line, = ax_loss.plot(epochs, [float(r["valid_loss"]) for r in rows], marker="o", label=f"{label} valid")
        ax_loss.plot(epochs, [float(r["train_loss"]) for r in rows], ls="--", color=line.get_color(),
                     label=f"{label} train")
        ax_acc.plot(epochs, [100 * float(r["valid_accuracy"]) for r in rows], marker="o", label=label)
    metric = "next-word accuracy" if args.task == "numbers" else "accuracy"
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (nats)", title=f"{args.task}: loss")
    ax_acc.set(xlabel="epoch", ylabel=f"validation {metric} (%)", title=f"{args.task}: validation {metric}")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(args.figures_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log.info(f"curves of {', '.join(runs)}: {path}")


def sample(args):
    model, vocab, train_args = load_model(args)
    if args.task == "imdb":
        for text in EXAMPLES:
            p = sentiment(model, vocab, text, train_args["max_len"])
            log.info(f"{'positive' if p >= 0.5 else 'negative'} {p:.3f}  {text}")
    elif args.task == "numbers":
        for prompt in (args.prompt, "nine thousand four hundred ninety eight . nine thousand four hundred ninety nine ."):
            log.info(f"{prompt} -> {continue_numbers(model, vocab, prompt, args.words, args.temperature, args.seed)}")
    elif args.task == "names":
        log.info("new names: " + ", ".join(new_names(model, vocab, 12, args.seed)))
    elif args.task == "imdb-lm":
        g = rng(model, args.seed)
        prompt = args.prompt or "this movie is"
        ids = generate(model, vocab.encode(tokenize(prompt)), 40, 0.8, generator=g)
        log.info(prompt + " " + " ".join(vocab.decode(ids)))
    else:
        log.info(continue_text(model, vocab, args.prompt or "\n", 300, args.seed))
    plot_curves(args)
