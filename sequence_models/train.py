"""train(args): a task's data and model, fitted by the Learner (learner.py) with its callbacks
(callbacks.py), then the best checkpoint evaluated; and the pieces around it: the model of the
flags, its size check before anything is read, ULMFiT's transfer and discriminative rates, and the
run's folder (overwrite refusal, resume, Ctrl-C and divergence as one line)."""
import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from callbacks import (ARTAR, FOLDER, MONITOR, Checkpoint, CSVLog, Diverged, EarlyStopping, GradientClipping,
                       GradualUnfreezing, Metrics, Progress, ResetState, SCHEDULES, StopOnNonFinite, TensorBoard,
                       Wandb, cross_entropy, load_checkpoint)
from data import DATA, Vocab
from learner import Learner
from model import POOLED, LanguageModel, MLPLanguageModel, build_model, is_mlp
from pretrained import load_shipped

log = logging.getLogger(FOLDER)


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"sequence_models: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("sequence_models: --device mps, but MPS is not available here (try --device cpu)")
    return name


def run_dir(args):
    return Path(args.out_dir) / f"{args.task}-{args.model}"


def load_language_model(path):
    """The --task imdb-lm checkpoint at path (--encoder), read once: its vocabulary and then its
    encoder are used."""
    ckpt = load_checkpoint(Path(path))
    if ckpt["task"] != "imdb-lm":
        raise SystemExit(f"sequence_models: --encoder {path} is a {ckpt['task']} model; pretrain with --task imdb-lm")
    return ckpt


def load_encoder(model, ckpt, vocab, path):
    """Copy a pretrained language model's embedding and recurrent layers (ckpt, from path) into the
    classifier: the transfer of ULMFiT (Howard & Ruder 2018); --freeze-epochs and --lr-decay add its
    gradual unfreezing and discriminative rates."""
    if ckpt["vocab"] != vocab.itos:
        raise SystemExit(f"sequence_models: --encoder {path} has another vocabulary; use its --vocab-size and data")
    encoder = {k: v for k, v in ckpt["model"].items() if k.startswith(("embedding.", "rnn."))}
    try:
        model.load_state_dict(encoder, strict=False)
    except RuntimeError:
        c = ckpt["config"]
        raise SystemExit(f"sequence_models: --encoder {path} is a {c['cell']} with embedding {c['emb_size']}, hidden "
                         f"{c['hidden_size']}, {c['num_layers']} layer(s); give the classifier the same")
    log.info(f"encoder ({', '.join(sorted({k.split('.')[0] for k in encoder}))}) loaded from {path}")


def model_config(args, vocab_size):
    if args.task == "imdb":
        return dict(vocab_size=vocab_size, cell=args.model, emb_size=args.emb_size, hidden_size=args.hidden_size,
                    num_layers=args.layers, dropout=args.dropout, pooling=args.pooling)
    if args.model == "mlp":
        return dict(vocab_size=vocab_size, context=args.context, emb_size=args.emb_size,
                    hidden_size=args.hidden_size, direct=args.direct)
    return dict(vocab_size=vocab_size, cell=args.model, emb_size=args.emb_size, hidden_size=args.hidden_size,
                num_layers=args.layers, dropout=args.dropout, stateful=args.task != "names",
                out_size=min(args.lm_vocab, vocab_size) if args.task == "imdb-lm" else None,
                emb_dropout=args.emb_dropout)


GATES = {"rnn": 1, "lstm": 4, "gru": 3}
# The vocabulary before any data is read: IMDb's is at most --vocab-size; characters are guessed
# (makemore's names have 27, a novel about 100); the numbers have 31 words.
VOCAB_GUESS = {"numbers": 32, "names": 30, "text": 100}


def n_parameters(task, config):
    """What build_model(task, config) will hold, counted from the config alone."""
    V, E, H = config["vocab_size"], config["emb_size"], config["hidden_size"]
    if is_mlp(config):  # C, H and d, U and b, W
        nm = config["context"] * E
        return V * E + nm * H + H + H * V + V + (nm * V if config["direct"] else 0)
    G = GATES[config["cell"]]  # per layer: W_ih, W_hh, b_ih, b_hh
    rnn = sum(G * H * ((E if k == 0 else H) + H + 2) for k in range(config["num_layers"]))
    if task == "imdb":
        return V * E + rnn + POOLED[config.get("pooling", "meanmax")] * H * 2 + 2
    out = config["out_size"] or V
    tied = E == H and out == V
    return V * E + rnn + out + (0 if tied else H * out)


def check_memory(args, device):
    """Refuse, before any data is read or anything allocated, a model whose training step cannot fit:
    16 bytes per parameter (float32 weights, gradients and AdamW's two moments) plus, roughly, the
    float32 activations autograd keeps for one batch."""
    V = args.vocab_size if args.task in ("imdb", "imdb-lm") else VOCAB_GUESS[args.task]
    config = model_config(args, V)
    E, H = args.emb_size, args.hidden_size
    if args.model == "mlp":
        tokens, per_token = args.batch_size, args.context * E + 2 * H + 3 * V
    else:  # per step and layer: the gates, c_t, tanh(c_t), h_t and the input projection; the logits x 3
        steps = args.max_len if args.task == "imdb" else 16 if args.task == "names" else args.bptt
        out = 0 if args.task == "imdb" else config["out_size"] or V
        tokens, per_token = args.batch_size * steps, E + args.layers * (2 * GATES[args.model] + 3) * H + 3 * out
    need = 16 * n_parameters(args.task, config) + 4 * tokens * per_token
    have = (torch.cuda.mem_get_info(torch.device(device))[0] if device.startswith("cuda")
            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > have:
        size = (f"--context {args.context} --emb-size {E} --hidden-size {H}" if args.model == "mlp"
                else f"--emb-size {E} --hidden-size {H} --layers {args.layers}")
        raise SystemExit(f"sequence_models: --model {args.model} with {size} needs about {need / 2 ** 30:,.1f} GiB "
                         f"of memory for weights, optimiser state and activations ({device} has "
                         f"{have / 2 ** 30:,.1f} GiB); choose a smaller model")


def depth(name):
    """How far below the output a classifier's parameter sits: 0 the head, 1 the recurrent layers,
    2 the embedding."""
    return 0 if name.startswith("head.") else 1 if name.startswith("rnn.") else 2


def encoder_params(model):
    return [p for name, p in model.named_parameters() if depth(name) > 0]


def param_groups(model, args):
    """ULMFiT's discriminative fine-tuning: the classifier's head at lr, its recurrent layers at
    lr / decay, the embedding at lr / decay^2 (decay 1: one rate for all)."""
    if args.task != "imdb" or args.lr_decay == 1:
        return [{"params": list(model.parameters()), "lr": args.lr}]
    groups = [[p for name, p in model.named_parameters() if depth(name) == d] for d in range(3)]
    return [{"params": g, "lr": args.lr / args.lr_decay ** d} for d, g in enumerate(groups)]  # lr / D^depth


@contextlib.contextmanager
def log_file(path):
    """Copy this folder's log lines into path (appending) while the block runs."""
    handler = logging.FileHandler(path)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def step_callbacks(args, model):
    """What every training step runs: the metrics, schedule, guards and penalties (also --benchmark's)."""
    callbacks = [Metrics(), SCHEDULES[args.schedule](), StopOnNonFinite(args.log_interval)]
    if args.grad_clip:
        callbacks.append(GradientClipping(args.grad_clip))
    if args.freeze_epochs and args.task == "imdb":
        callbacks.append(GradualUnfreezing(encoder_params(model), args.freeze_epochs))
    if isinstance(model, LanguageModel):
        callbacks.append(ARTAR(args.ar, args.tar))
        if model.stateful:
            callbacks.append(ResetState())
    return callbacks


def callbacks_for(args, model, out, meta, ckpt):
    """step_callbacks, and what a run adds: progress, checkpoints, logs, early stopping."""
    monitor = MONITOR[args.task]
    checkpoint = Checkpoint(out, meta, monitor, ckpt, args.checkpoint_every)
    callbacks = step_callbacks(args, model) + [Progress(args.log_interval), checkpoint, CSVLog(out / "log.csv")]
    if args.patience:
        callbacks.append(EarlyStopping(args.patience, monitor))
    if args.tensorboard:
        callbacks.append(TensorBoard(str(out / "tensorboard"), args.log_interval))
    if args.wandb:
        callbacks.append(Wandb(vars(args), str(out), args.log_interval))
    return callbacks


def cuda_default(flag, device):
    """--compile, --bf16: as given, else on for CUDA (where launches and bandwidth cost) only."""
    return device.startswith("cuda") if flag is None else flag


def model_and_optimiser(args, config, device, start=None, vocab=None):
    """The model of config on device, its weights from `start` if given (the shipped weights of
    --pretrained, or the language model of --encoder, whose embedding and LSTM only are copied);
    with --compile its time step, or the whole MLP, compiled; and its AdamW, fused: one kernel for
    the whole update."""
    model = build_model(args.task, config)
    if start and start["task"] == args.task:
        model.load_state_dict(start["model"])
    elif start:
        load_encoder(model, start, vocab, args.encoder)
    model = model.to(device)
    if cuda_default(args.compile, device):
        torch.compiler.reset()  # sweeps and transfer train several models in one process: a cache for each
        if isinstance(model, MLPLanguageModel):
            model.compile()
        else:  # three variants: the first step (no gradient into h_0), the later ones, validation
            model.rnn.compile_step(dynamic=True)  # dynamic: the last, smaller batch reuses the kernels
    return model, torch.optim.AdamW(param_groups(model, args), weight_decay=args.weight_decay, fused=True)


def on_device(data, device):
    """Every loader's tensors moved to the training device, once: its batches are index gathers there."""
    for loader in vars(data).values():
        loader.to(device)
    return data


def resumable(args, out):
    """--resume's ckpt.pt, or None; refuses to start over an existing run or to stretch a resumed one."""
    path = out / "ckpt.pt"
    ckpt = load_checkpoint(path) if args.resume else None
    if ckpt and args.epochs != ckpt["args"]["epochs"]:
        raise SystemExit(f"sequence_models: {path} was planned for {ckpt['args']['epochs']} epochs (its one-cycle "
                         f"schedule too); resume without --epochs, or start a new run in another --out-dir")
    if ckpt is None and path.exists() and not args.quick:
        raise SystemExit(f"sequence_models: {path} exists; pass --resume to continue it, or another --out-dir")
    return ckpt


def starting_weights(args, ckpt):
    """What a new run starts from: the shipped weights (--pretrained: fine-tuning), an IMDb language
    model's encoder (--encoder), or None (from scratch); a resumed run has its own."""
    if ckpt:
        return None
    if args.pretrained:
        return load_shipped(args.task, args.model)
    return load_language_model(args.encoder) if args.task == "imdb" and args.encoder else None


def fit_or_exit(learner, epochs, ckpt_path):
    """learner.fit, with Ctrl-C and a non-finite loss as one line that says where the run stands."""
    try:
        learner.fit(epochs)
    except KeyboardInterrupt:
        saved = next(cb.saved for cb in learner.callbacks if isinstance(cb, Checkpoint))
        raise SystemExit(f"\ninterrupted; last checkpoint {saved} in {ckpt_path}: continue with --resume" if saved
                         else "\ninterrupted before the first checkpoint; nothing to resume")
    except Diverged as e:
        last = f"the last good checkpoint is {ckpt_path}" if ckpt_path.is_file() else "no checkpoint was saved"
        raise SystemExit(f"sequence_models: {e}; {last}; try a lower --lr")


def train(args):
    device = resolve_device(args.device)
    out = run_dir(args)
    ckpt = resumable(args, out)
    check_memory(args, device)

    torch.manual_seed(args.seed)
    start = starting_weights(args, ckpt)
    vocab = Vocab(ckpt["vocab"]) if ckpt else Vocab(start["vocab"]) if start else None
    data, vocab = DATA[args.task](args, vocab)
    config = ckpt["config"] if ckpt else model_config(args, len(vocab))
    model, opt = model_and_optimiser(args, config, device, start, vocab)
    out.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    meta = {"folder": FOLDER, "task": args.task, "config": config, "vocab": vocab.itos, "args": vars(args)}
    learner = Learner(model, on_device(data, device), cross_entropy, opt, callbacks_for(args, model, out, meta, ckpt),
                      device, cuda_default(args.bf16, device))
    with log_file(out / "train.log"):
        origin = "the shipped" if args.pretrained else "a pretrained" if start else "a from-scratch"
        log.info(f"{args.task} with {origin} {args.model.upper()}: "
                 f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(vocab):,}, "
                 f"{len(data.train)} batches per epoch, {device}")
        fit_or_exit(learner, args.epochs, out / "ckpt.pt")
        return evaluate(args, learner, sum(h["seconds"] for h in learner.history))


def evaluate(args, learner, seconds):
    """The best-validation weights on validation (and, for IMDb and names, the test split) -> results.json."""
    out = run_dir(args)
    best = load_checkpoint(out / "best.pt", learner.device)
    learner.model.load_state_dict(best["model"])
    learner.callbacks = [cb for cb in learner.callbacks if isinstance(cb, (Metrics, Progress, ResetState))]
    results = {"task": args.task, "model": args.model, "best_epoch": best["epoch"],
               "epochs_run": len(learner.history), "train_seconds": round(seconds, 1),
               "params": sum(p.numel() for p in learner.model.parameters()),
               "history": [{k: h[k] for k in ("epoch", "train_loss", "valid_loss", "valid_accuracy")}
                           for h in learner.history]}
    results.update(scores(learner))
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log.info(f"best epoch {best['epoch']}: {format_scores(results)} ({seconds / 60:.1f} min training)")
    return results


def scores(learner):
    """valid_loss, valid_accuracy and, where the task has a test split, test_loss and test_accuracy."""
    m = learner.validate()
    out = {"valid_loss": m["valid_loss"], "valid_accuracy": m["valid_accuracy"]}
    if hasattr(learner.data, "test"):
        m = learner.validate(learner.data.test, "test")
        out.update(test_loss=m["test_loss"], test_accuracy=m["test_accuracy"])
    return out


def format_scores(results):
    return ", ".join(f"{k} {v:.2%}" if "accuracy" in k else f"{k} {v:.4f}"
                     for k, v in results.items() if k.endswith(("_loss", "_accuracy")))


def load_best(args, device="cpu"):
    """What gets evaluated and served: the run's best.pt, or with --pretrained the shipped weights."""
    if args.pretrained:
        return load_shipped(args.task, args.model)
    path = run_dir(args) / "best.pt"
    ckpt = load_checkpoint(path, device)
    if ckpt["task"] != args.task:
        raise SystemExit(f"sequence_models: {path} is a {ckpt['task']} model, not {args.task}")
    return ckpt


def evaluate_only(args):
    """--evaluate: best.pt (or the shipped weights) scored on the validation and, where there is one,
    the test split of the task's data, with the checkpoint's vocabulary."""
    device = resolve_device(args.device)
    ckpt = load_best(args, device)
    data, vocab = DATA[args.task](args, Vocab(ckpt["vocab"]))
    model = build_model(args.task, ckpt["config"])
    model.load_state_dict(ckpt["model"])
    callbacks = [Metrics(), Progress(args.log_interval)] + ([ResetState()] if isinstance(model, LanguageModel) and
                                                             model.stateful else [])
    learner = Learner(model.to(device), on_device(data, device), cross_entropy, None, callbacks, device,
                      cuda_default(args.bf16, device))
    learner.callback("before_fit")
    results = scores(learner)
    source = "the shipped weights" if args.pretrained else run_dir(args) / "best.pt"
    log.info(f"{args.task}, {source}: {format_scores(results)}")
    return results
