"""--benchmark: the training step of the flags' task and model, timed; one JSON line, nothing written.

    python sequence_models/main.py --benchmark --task names --data-dir /path/to/datasets
    python sequence_models/main.py --benchmark --quick --device cpu --benchmark-steps 5

The model (compiled if training's would be), optimiser, precision and step callbacks (metrics,
one-cycle, clipping, the non-finite guard, AR/TAR) are training's; a few warm-up steps, then
--benchmark-steps timed calls of the Learner's one_batch, each fetching its batch as training does.
Real batches when the task's data is already in --data-dir (nothing is downloaded), else random
ones of the same shape.
"""
import json
import resource
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from data import IMDB_FILE, NAMES_FILE
from callbacks import FOLDER, Diverged, cross_entropy
from data import DATA
from learner import Learner
from train import (GATES, VOCAB_GUESS, check_memory, cuda_default, is_mlp, model_config, model_and_optimiser, on_device,
                   resolve_device, step_callbacks)

WARMUP = 3
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # dense FLOP/s
NAMES_STEPS = 16  # random names batches: a name and its frame, padded (makemore's longest is 15 letters)


def flops_per_token(task, config):
    """Training FLOPs per time step of one sequence: 2 per multiply-add of the forward's matrix products,
    times 3 (the backward has two products per forward one). Per layer: W_ih x_t and W_hh h_{t-1}, G*H
    rows each; an LM adds its head (H -> out); the MLP its H, U and W. The element-wise gate math, the
    embedding lookup and the softmax are not counted (FlopCounterMode does not count them either)."""
    V, E, H = config["vocab_size"], config["emb_size"], config["hidden_size"]
    if is_mlp(config):
        nm = config["context"] * E
        return 3 * 2 * (nm * H + H * V + (nm * V if config["direct"] else 0))
    G = GATES[config["cell"]]
    layers = sum(2 * G * H * ((E if k == 0 else H) + H) for k in range(config["num_layers"]))
    return 3 * (layers + (0 if task == "imdb" else 2 * H * (config["out_size"] or V)))


def has_data(args):
    """Whether the task's data is here already (numbers are generated, --text is given)."""
    file = {"imdb": IMDB_FILE, "imdb-lm": IMDB_FILE, "names": NAMES_FILE}.get(args.task)
    return file is None or (Path(args.data_dir) / file).is_file()


def random_batches(args, config, device, n):
    """n random batches of the shapes and dtypes the task's loader yields."""
    V, N = config["vocab_size"], args.batch_size
    if args.task == "imdb":  # full-length reviews, no padding
        x = [torch.randint(2, V, (N, args.max_len), device=device) for _ in range(n)]
        return [(xi, xi != 0, torch.randint(0, 2, (N,), device=device)) for xi in x]
    if args.model == "mlp":
        return [(torch.randint(0, V, (N, args.context), device=device), torch.randint(0, V, (N,), device=device))
                for _ in range(n)]
    L, out = NAMES_STEPS if args.task == "names" else args.bptt, config.get("out_size") or V
    return [(torch.randint(0, V, (N, L), device=device), torch.randint(0, out, (N, L), device=device))
            for _ in range(n)]


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device == "mps":
        torch.mps.synchronize()


def time_steps(learner, batches, n, device):
    """Per call of one_batch, after WARMUP untimed ones: seconds, samples (targets) and time steps."""
    learner.callback("before_fit")
    learner.training = True
    learner.model.train()
    learner.callback("before_epoch")
    rows, it = [], iter(batches)
    for _ in range(WARMUP + n):
        synchronize(device)
        t0 = time.perf_counter()
        learner.batch = next(it, None)
        if learner.batch is None:  # a short epoch: start it over
            learner.batch = next(it := iter(batches))
        learner.one_batch()
        synchronize(device)
        rows.append((time.perf_counter() - t0, learner.yb.numel(), learner.xb[0].size(-1)))
    return [statistics.median(column) for column in zip(*rows[WARMUP:])]


def benchmark(args):
    device = resolve_device(args.device)
    check_memory(args, device)
    torch.manual_seed(args.seed)
    real = has_data(args)
    if real:
        data, vocab = DATA[args.task](args)
        data, config = on_device(data, device), model_config(args, len(vocab))
    else:
        config = model_config(args, args.vocab_size if args.task in ("imdb", "imdb-lm") else VOCAB_GUESS[args.task])
        batches = random_batches(args, config, device, WARMUP + args.benchmark_steps)
        data = SimpleNamespace(train=batches)
    model, opt = model_and_optimiser(args, config, device)
    learner = Learner(model, data, cross_entropy, opt, step_callbacks(args, model), device,
                      cuda_default(args.bf16, device))
    learner.epochs = args.epochs
    try:
        step_s, batch, T = time_steps(learner, data.train, args.benchmark_steps, device)
    except Diverged as e:
        raise SystemExit(f"sequence_models: --benchmark: {e}; try a lower --lr")
    batch = round(batch)
    # per review: T time steps of the recurrent layers, then the head on [mean; max] (2H -> 2 classes)
    flops = (T * flops_per_token(args.task, config) + 3 * 2 * 2 * config["hidden_size"] * 2 if args.task == "imdb"
             else flops_per_token(args.task, config))
    cuda = device.startswith("cuda")
    name = f"cuda:{torch.device(device).index or 0} {torch.cuda.get_device_name(device)}" if cuda else device
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(json.dumps({
        "folder": FOLDER, "device": name, "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()), "batch_size": batch,
        "unit": "reviews" if args.task == "imdb" else "tokens", "samples_per_s": batch / step_s,
        "step_ms": step_s * 1e3, "flops_per_sample": flops, "tflops": flops * batch / step_s / 1e12,
        "mfu": flops * batch / step_s / peak if peak else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20,
        "compile": cuda_default(args.compile, device), "data": "real" if real else "random"}))
