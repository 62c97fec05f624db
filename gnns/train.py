"""Train a GCN or GAT on pixel graphs: data, model, optimiser, schedule, then the loop over
epochs with validation accuracy and an atomic checkpoint after each epoch."""
import csv
import json
import math
import os
import re
import resource
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (DATASETS, Batches, build_graphs, cached_graphs, find, idx_files, load_data, load_images,
                  random_images, subset)
from model import GNN, GNNConfig
from pretrained import load_pretrained

FOLDER = "gnns"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/gnns-quick"  # the one place a fresh (--quick) run may overwrite a checkpoint
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # dense
LOG_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "graphs_per_s", "elapsed_s"]


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gnns: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("gnns: --device mps, but MPS is not available here (try --device cpu)")
    return name


def device_memory(device):
    """Bytes the device can hold: free CUDA memory, else this machine's RAM (CPU and MPS share it)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_checkpoint(path, device):
    if not path.is_file():
        raise SystemExit(f"gnns: no checkpoint at {path}; train first, or pass the --out-dir of a gnns run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"gnns: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"gnns: {path} is a checkpoint of {folder or 'something else'}, not of gnns/")
    return ckpt


def save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def get_lr(step, total_steps, warmup_steps, args):
    """Linear warmup to --lr, then cosine decay to zero at the end of training."""
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * args.lr


def model_config(args):
    return GNNConfig(model=args.model, hidden=args.hidden, layers=args.layers, heads=args.heads,
                     dropout=args.dropout)


def forward(model, b, device, dense=False, **kw):
    """The model on a Batch of graphs (moved to `device`)."""
    b = b.to(device)
    return model(b.x, b.edge_index, b.batch, b.num_graphs, dense=dense, **kw), b.y


@torch.no_grad()
def predict(model, graphs, device, batch_size=1000):
    """Logits (G, classes) of every graph of a GraphSet, in order (batches built where the set lives)."""
    was_training = model.training
    model.eval()
    batches = make_batches(graphs, torch.arange(len(graphs), device=graphs.y.device), batch_size)
    logits = [forward(model, batches.batch(s), device)[0] for s in range(len(batches))]
    model.train(was_training)
    return torch.cat(logits)


def evaluate(model, graphs, device):
    """(mean cross-entropy, accuracy) over a whole GraphSet."""
    logits = predict(model, graphs, device)
    y = graphs.y.to(device)
    return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def open_log(path, resume_epoch):
    """CSV of the run, one row per epoch; on resume, rows past the checkpoint are dropped first. The kept rows
    replace the log in one rename: a run stopped at any moment leaves the old log or the new one, never an empty one."""
    rows = []
    if resume_epoch and path.is_file():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    f = open(path, "a", newline="")
    return f, csv.DictWriter(f, fieldnames=LOG_FIELDS)


def stop_if_non_finite(finite, loss, grad_norm, step, ckpt_path):
    """One line and exit once a loss or gradient norm has been non-finite (`finite` is False), before
    that update reaches the weights (off CUDA) and before any checkpoint."""
    if not finite:
        kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
        raise SystemExit(f"gnns: the loss or its gradient became non-finite (loss {loss.item():g}, "
                         f"gradient norm {grad_norm.item():g}) at step {step}; stopping before the update ({kept}); "
                         f"try a lower --lr")


def checks_every_step(device):
    """Off CUDA reading a flag from the device costs nothing, so divergence is checked every step; on
    CUDA each read waits for the GPU to finish its queue, so only every --log-interval steps."""
    return torch.device(device).type != "cuda"


def precision(device):
    """TF32 matmuls on CUDA. No bf16 autocast: the layers are 64-wide, so the step is bound by kernel
    launches and by the gathers and scatters along the edges, not by matmuls, and autocast would sum
    the messages (index_add_) in bf16."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def adamw(model, args):
    """AdamW; on CUDA the fused kernel (one launch per step instead of several per parameter)."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             fused=True if next(model.parameters()).is_cuda else None)


def make_batches(graphs, order, batch_size):
    """Batches of the graphs `order`, built where the graphs live: on a GPU the whole epoch at once, on
    a CPU one batch at a time (see data.Batches)."""
    return Batches(graphs, order, batch_size, chunk=len(order) if graphs.y.device.type != "cpu" else 1)


def epoch_batches(train_set, epoch, args):
    """The epoch's batches: the order is drawn on the CPU from (seed, epoch), so resuming replays it,
    and moved to the device once; the last partial batch is dropped."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    order = torch.randperm(len(train_set), generator=g)[:len(train_set) // args.batch_size * args.batch_size]
    return make_batches(train_set, order.to(train_set.y.device), args.batch_size)


def train_step(model, fwd, optimizer, b, lr, args, device, before_update):
    """One optimiser step on a Batch; before_update(loss, grad_norm) runs between clipping and the update
    (the divergence check); fwd is the model, compiled with --compile. -> (loss, correct), device tensors."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    logits, y = forward(fwd, b, device)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),  # clips only with --grad-clip > 0
                                               args.grad_clip if args.grad_clip > 0 else math.inf)
    before_update(loss.detach(), grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), (logits.argmax(-1) == y).sum()


def train_epoch(epoch, model, fwd, optimizer, train_set, schedule, ckpt_path, args, device):
    """One pass over a fresh permutation of the training graphs. Whether a loss or gradient norm was
    non-finite is folded into a device tensor every step and read (a host sync) before the update:
    every step off CUDA, every --log-interval steps on CUDA, and always at the end of the epoch, so
    that no checkpoint holds a non-finite state. -> (losses, correct) per step, tensors, and the last lr."""
    steps_per_epoch, total_steps, warmup_steps = schedule
    every_step = checks_every_step(device)
    finite, last = torch.ones((), dtype=torch.bool, device=device), None
    torch.manual_seed(args.seed * 100_003 + epoch)          # dropout, seeded by (seed, epoch) like the order
    batches = epoch_batches(train_set, epoch, args)
    losses, correct = [], []
    pbar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True, leave=False)
    for s in pbar:
        step = epoch * steps_per_epoch + s
        lr = get_lr(step, total_steps, warmup_steps, args)

        def check(loss, grad_norm):
            nonlocal last
            last = (loss, grad_norm, step)
            finite.logical_and_(torch.isfinite(loss) & torch.isfinite(grad_norm))
            if every_step or s % args.log_interval == 0:
                stop_if_non_finite(finite, *last, ckpt_path)

        loss, right = train_step(model, fwd, optimizer, batches.batch(s), lr, args, device, check)
        losses.append(loss)
        correct.append(right)
        if s % args.log_interval == 0:
            pbar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    stop_if_non_finite(finite, *last, ckpt_path)
    return losses, correct, lr


def resume_or_refuse(args, device):
    """--out-dir/ckpt.pt and, with --resume, its contents. A fresh run refuses to overwrite a checkpoint
    (only --quick may, in its own default --out-dir)."""
    ckpt_path = Path(args.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"gnns: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    return ckpt_path, ckpt


def restore(model, optimizer, ckpt, cfg, ckpt_path, args):
    """The state to continue from: the checkpoint's (weights, optimiser, epoch, time), or with
    --pretrained the shipped weights (fine-tuning starts at epoch 0), or nothing. -> (epoch, train_time, val_acc)"""
    if ckpt is None:
        if args.pretrained:
            model.load_state_dict(load_pretrained(cfg.model, cfg))
        return 0, 0.0, float("nan")
    if asdict(cfg) != ckpt["config"]:
        raise SystemExit(f"gnns: {ckpt_path} holds another model ({ckpt['config']}); "
                         f"resume without model flags, or train it in another --out-dir")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["epoch"], ckpt["train_time"], ckpt["val_acc"]


def schedule_of(n_train, args):
    """(steps per epoch, total steps, warmup steps); the last partial batch of each epoch is dropped."""
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"gnns: --batch-size {args.batch_size} exceeds the {n_train} training graphs")
    return steps_per_epoch, args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)


def describe(model, cfg, data, device, args, epoch):
    train_set = data["train"]
    nodes, edges = train_set.node_ptr[-1].item() / len(train_set), train_set.edge_ptr[-1].item() / len(train_set)
    print(f"{cfg.model.upper()}: {model.num_params():,} parameters; {args.dataset} as pixel graphs "
          f"(background {args.background}: {nodes:.0f} nodes, {edges:.0f} directed edges per graph on average); "
          f"{len(train_set):,} train / {len(data['val']):,} val graphs on {device}"
          + (f"; resuming after epoch {epoch}" if epoch else ""))


@contextmanager
def run_log(out, epoch, args):
    """log.csv (and W&B with --wandb) for the epochs to come -> log(row, step); on Ctrl-C, one line
    about what was kept, exit 130."""
    if args.wandb:
        try:
            import wandb
            wandb.init(project="papers-gnns", config=vars(args), dir=out)
        except ImportError:
            raise SystemExit("gnns: --wandb needs the wandb package (pip install wandb)")
        except Exception as e:  # not logged in, no network: say so in one line
            raise SystemExit(f"gnns: --wandb could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    log_file, writer = open_log(out / "log.csv", epoch)

    def log(row, step):
        writer.writerow(row)
        log_file.flush()
        if args.wandb:
            wandb.log(row, step=step)
    try:
        yield log
    except KeyboardInterrupt:
        ckpt_path = out / "ckpt.pt"
        print(f"\ninterrupted; the last checkpoint ({ckpt_path}) is from the end of an epoch: continue with --resume"
              if ckpt_path.exists() else "\ninterrupted before the first epoch ended; nothing was saved")
        raise SystemExit(130)
    finally:
        log_file.close()
        if args.wandb:
            wandb.finish()


def train(args):
    """The graph sets on the device once, the GNN and AdamW, then per epoch: a pass over a fresh
    permutation with warmup + cosine lr (train_epoch), validation accuracy, an atomic checkpoint, a
    row of log.csv."""
    device = resolve_device(args.device)
    ckpt_path, ckpt = resume_or_refuse(args, device)
    precision(device)
    data = {k: graphs.to(device) for k, graphs in load_data(args).items() if k != "test"}  # on the device once
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    model = GNN(cfg).to(device)
    optimizer = adamw(model, args)
    epoch, train_time, val_acc = restore(model, optimizer, ckpt, cfg, ckpt_path, args)
    fwd = torch.compile(model, dynamic=True) if args.compile else model
    schedule = schedule_of(len(data["train"]), args)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    describe(model, cfg, data, device, args, epoch)
    if epoch >= args.epochs:
        print(f"{ckpt_path} is at epoch {epoch}, which is not below --epochs {args.epochs}: nothing to train")
    with run_log(Path(args.out_dir), epoch, args) as log:
        for epoch in range(epoch, args.epochs):
            t0 = time.perf_counter()
            losses, correct, lr = train_epoch(epoch, model, fwd, optimizer, data["train"], schedule, ckpt_path,
                                              args, device)
            dt = time.perf_counter() - t0
            train_time += dt
            n = schedule[0] * args.batch_size
            row = {"epoch": epoch + 1, "train_loss": torch.stack(losses).mean().item(),
                   "train_acc": torch.stack(correct).sum().item() / n, "lr": lr, "graphs_per_s": n / dt,
                   "elapsed_s": train_time}
            if len(data["val"]):
                row["val_loss"], row["val_acc"] = evaluate(model, data["val"], device)
                val_acc = row["val_acc"]
            save_atomic({"folder": FOLDER, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch + 1, "config": asdict(cfg), "args": vars(args), "val_acc": val_acc,
                         "train_time": train_time}, ckpt_path)
            log(row, epoch + 1)
            tqdm.write(f"epoch {epoch + 1:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                       f"val acc {val_acc:.4f}  lr {lr:.1e}  {row['graphs_per_s']:,.0f} graphs/s  {train_time:.0f} s")
    return model


def peak_flops(device):
    """The GPU's dense bf16 peak (for MFU), or None when it is not in the table (CPU, MPS, other GPUs)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return next((f for k, f in PEAK_BF16_FLOPS.items() if re.search(rf"\b{k}\b", name)), None)


def training_flops(cfg, nodes_per_graph):
    """Matmul FLOPs of one forward and backward pass per graph (what FlopCounterMode counts; the gathers
    and scatters of message passing move memory and are not counted): per node the encoder 3 -> H and
    each layer's H x H transform, per graph the head 2H -> H -> classes; the backward pass costs twice
    the forward, except the encoder's, whose input (pixel features) needs no gradient."""
    H, L, C = cfg.hidden, cfg.layers, cfg.num_classes
    return 2 * 2 * nodes_per_graph * cfg.in_dim * H + 3 * 2 * (nodes_per_graph * L * H * H + 2 * H * H + H * C)


def benchmark_graphs(args, n):
    """n training graphs drawn at random: from the cache or built from the IDX files when these are in
    --data-dir (nothing is downloaded or written), else pixel graphs of random blob images.
    -> (GraphSet, "real" | "random")"""
    g = torch.Generator().manual_seed(args.seed)
    if not all(find(Path(args.data_dir) / DATASETS[args.dataset] / "raw", name) for name in idx_files("train")):
        return build_graphs(random_images(n, g), torch.randint(0, 10, (n,), generator=g), args.background), "random"
    graphs = cached_graphs(args, "train")
    images, labels = load_images(args.data_dir, args.dataset, "train") if graphs is None else (None, graphs.y)
    if not 0 <= args.val_size < len(labels):
        raise SystemExit(f"gnns: --val-size {args.val_size} must be below the {len(labels)} training images")
    m = len(labels) - args.val_size
    pick = torch.randperm(min(m, args.train_size) if args.train_size else m, generator=g)[:n]
    return (subset(graphs, pick) if images is None else build_graphs(images[pick], labels[pick], args.background)), "real"


def benchmark(args):
    """--benchmark: the model, optimiser and training step (same batching, compile and device), 3 warm-up
    steps, then the median of --benchmark-steps timed optimiser steps, on graphs drawn at random from
    the training set (random blob images when the data are not there). Prints one JSON line; writes nothing."""
    device = resolve_device(args.device)
    precision(device)
    warmup, B = 3, args.batch_size
    graphs, data = benchmark_graphs(args, B * (warmup + args.benchmark_steps))
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    model = GNN(cfg).to(device)
    optimizer = adamw(model, args)
    fwd = torch.compile(model, dynamic=True) if args.compile else model
    batches = make_batches(graphs.to(device), torch.arange(len(graphs), device=device), B)
    finite = torch.ones((), dtype=torch.bool, device=device)
    cuda = device.startswith("cuda")

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)

    times = []
    for s in range(warmup + args.benchmark_steps):
        synchronize()
        t0 = time.perf_counter()
        train_step(model, fwd, optimizer, batches.batch(s), args.lr, args, device,  # what training folds in
                   lambda loss, grad_norm: finite.logical_and_(torch.isfinite(loss) & torch.isfinite(grad_norm)))
        synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warmup:])
    timed = slice(warmup * B, len(graphs))
    nodes = (graphs.node_ptr[timed.stop] - graphs.node_ptr[timed.start]).item() / (len(graphs) - timed.start)
    flops, peak = training_flops(cfg, nodes), peak_flops(device)
    print(json.dumps({
        "folder": FOLDER, "torch": torch.__version__, "params": model.num_params(),
        "device": f"cuda:{torch.device(device).index or 0} {torch.cuda.get_device_name(device)}" if cuda else device,
        "batch_size": B, "unit": "graphs", "samples_per_s": B / step_s, "step_ms": step_s * 1e3,
        "flops_per_sample": flops, "tflops": flops * B / step_s / 1e12,
        "mfu": flops * B / step_s / peak if peak else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "compile": bool(args.compile), "data": data, "model": cfg.model, "nodes_per_graph": nodes}))
