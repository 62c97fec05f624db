"""Train the ViT: data, model, optimiser, schedule, then the loop over epochs with
validation accuracy and an atomic checkpoint after each epoch."""
import copy
import csv
import json
import math
import os
import re
import resource
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from data import DATASETS, find, idx_files, load_data, normalize, random_crop, random_erasing, random_hflip
from model import ViT, ViTConfig
from pretrained import hardware, load_pretrained

FOLDER = "vit"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/vit-quick"  # the one place a fresh (--quick) run may overwrite a checkpoint
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # dense
LOG_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "elapsed_s"]


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"vit: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("vit: --device mps, but MPS is not available here (try --device cpu)")
    return name


def device_memory(device):
    """Bytes the device can hold: free CUDA memory, else this machine's RAM (CPU and MPS share it)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def load_checkpoint(path, device):
    if not path.is_file():
        raise SystemExit(f"vit: no checkpoint at {path}; train first, or pass the --out-dir of a vit run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"vit: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"vit: {path} is a checkpoint of {folder or 'something else'}, not of vit/")
    return ckpt


def save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def get_lr(step, total_steps, warmup_steps, args):
    """Linear warmup to --lr, then cosine decay towards --min-lr at the end of training."""
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def smoothed_cross_entropy(logits, y, epsilon):
    """Cross-entropy against label-smoothed targets (Szegedy et al. 2016): (1 - eps) one-hot + eps / K."""
    return F.cross_entropy(logits, y, label_smoothing=epsilon)


def configure_optimizer(model, args):
    """AdamW; weight decay on the weight matrices (and the hybrid stem's 4-D kernels) only, not on biases,
    LayerNorms, the class token or the position embeddings. On CUDA the fused kernel: one launch per step."""
    decay = [p for p in model.parameters() if p.ndim in (2, 4)]
    no_decay = [p for p in model.parameters() if p.ndim not in (2, 4)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999),
                             fused=True if decay[0].is_cuda else None)


def evaluated_weights(ckpt):
    """The weights a run is judged by (validation, test, export): their EMA when it trained with --ema."""
    return ckpt.get("ema") or ckpt["model"]


def build(cfg, args, device):
    """The model (weights seeded by --seed), its optimiser, and what the training step calls: the
    model, compiled with --compile (in --compile-mode)."""
    torch.manual_seed(args.seed)
    model = ViT(cfg).to(device)
    return model, configure_optimizer(model, args), torch.compile(model, mode=args.compile_mode) if args.compile else model


def stop_if_non_finite(finite, loss, grad_norm, step, ckpt_path):
    """One line and exit once a loss or gradient norm has been non-finite (`finite` is False), so that
    no checkpoint is written from then on; on CPU it is checked every step, before the update."""
    if not finite:
        kept = f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written"
        raise SystemExit(f"vit: the loss or its gradient became non-finite (loss {loss.item():g}, "
                         f"gradient norm {grad_norm.item():g}) at step {step}; stopped without saving it ({kept}); "
                         f"try a lower --lr")


@torch.no_grad()
def predict(model, images, dataset, batch_size, autocast):
    """Logits (N, classes) for uint8 images (N, H, W) already on the model's device."""
    was_training = model.training
    model.eval()
    logits = []
    for i in range(0, len(images), batch_size):
        with autocast:
            logits.append(model(normalize(images[i:i + batch_size], dataset)).float())
    model.train(was_training)
    return torch.cat(logits)


def evaluate(model, images, labels, dataset, batch_size, autocast):
    """(mean cross-entropy, accuracy) over a whole split."""
    logits = predict(model, images, dataset, batch_size, autocast)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(-1) == labels).float().mean().item()


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


def precision(device_type):
    """TF32 matmuls and bf16 autocast on CUDA; float32 elsewhere. -> the autocast context."""
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def shuffle(n, seed, device):
    """An epoch's order of the n training images, drawn on the CPU and moved to the device once, and the
    generator of its crops: on the CPU the same one (the crops drawn after the order), elsewhere one
    on the device, so that no step copies from the host or waits for the device."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).to(device)
    return order, g if device.type == "cpu" else torch.Generator(device).manual_seed(seed)


def get_batch(train_x, train_y, order, i, args, generator):
    """Batch i of an epoch: uint8 images (B, H, W) and labels (B,) gathered by index where the data
    live, then augmented there, each only when its flag is on: random crop, horizontal flip, Random
    Erasing (on the uint8 pixels, before normalisation). The draws come from `generator`, in that order."""
    idx = order[i * args.batch_size:(i + 1) * args.batch_size]
    x, y = train_x[idx], train_y[idx]
    if args.crop_padding:
        x = random_crop(x, args.crop_padding, generator)
    if args.hflip:
        x = random_hflip(x, args.hflip, generator)
    if args.random_erasing:
        x = random_erasing(x, args.random_erasing, generator)
    return x, y


def train_step(model, fwd, optimizer, x, y, lr, args, autocast, before_update):
    """One optimiser step; before_update(loss, grad_norm) runs between clipping and the update (the
    divergence check). -> (loss, correct predictions), tensors on the device: nothing waits for it."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        logits = fwd(normalize(x, args.dataset))
        loss = smoothed_cross_entropy(logits.float(), y, args.label_smoothing)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),  # clips only with --grad-clip > 0
                                               args.grad_clip if args.grad_clip > 0 else math.inf)
    before_update(loss.detach(), grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), (logits.argmax(-1) == y).sum()


def make_ema(model, ckpt, args):
    """--ema: a copy of the model, without gradients, that holds the exponential moving average of its
    weights: the checkpoint's average on --resume, else the current weights (theta_ema_0 = theta_0). Else None."""
    if not args.ema:
        return None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt is not None and ckpt.get("ema"):
        ema.load_state_dict(ckpt["ema"])
    return ema


def ema_decay(t, args):
    """The decay after optimiser step t (0, 1, ...): --ema, warmed up as TensorFlow's ExponentialMovingAverage
    does with num_updates, min(decay, (1 + t) / (10 + t)), so early averages are not held at the initial weights."""
    return min(args.ema, (1 + t) / (10 + t))


@torch.no_grad()
def update_ema(ema, model, decay):
    """Polyak averaging: theta_ema <- decay theta_ema + (1 - decay) theta, one foreach lerp over every tensor.
    (swa_utils.AveragedModel reads its n_averaged counter on the host each update: a GPU sync per step.)"""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def checks_every_step(device):
    """Off CUDA reading a flag from the device costs nothing, so divergence is checked every step; on
    CUDA each read waits for the GPU to finish its queue, so only every --log-interval steps."""
    return device.type != "cuda"


def train_epoch(epoch, model, fwd, optimizer, ema, train_x, train_y, schedule, ckpt_path, args, autocast):
    """One pass over a fresh permutation of the training set. Whether a loss or gradient norm was
    non-finite is folded into a device tensor every step and read (a host sync) before the update:
    every step off CUDA, every --log-interval steps on CUDA, and always at the end of the epoch, so
    that no checkpoint holds a non-finite state. With --ema, the average follows each update.
    -> (losses, correct) per step, tensors, and the last lr."""
    steps_per_epoch, total_steps, warmup_steps = schedule
    every_step = checks_every_step(train_x.device)
    finite, last = torch.ones((), dtype=torch.bool, device=train_x.device), None
    # Everything random in an epoch is seeded by (seed, epoch): resuming replays it exactly.
    torch.manual_seed(args.seed * 100_003 + epoch)          # dropout
    order, g = shuffle(len(train_x), args.seed * 100_003 + epoch, train_x.device)
    losses, correct = [], []
    pbar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True, leave=False)
    for i in pbar:
        step = epoch * steps_per_epoch + i
        lr = get_lr(step, total_steps, warmup_steps, args)

        def check(loss, grad_norm):
            nonlocal last
            last = (loss, grad_norm, step)
            finite.logical_and_(torch.isfinite(loss) & torch.isfinite(grad_norm))
            if every_step or i % args.log_interval == 0:
                stop_if_non_finite(finite, *last, ckpt_path)

        loss, right = train_step(model, fwd, optimizer, *get_batch(train_x, train_y, order, i, args, g), lr, args,
                                 autocast, check)
        if ema is not None:
            update_ema(ema, model, ema_decay(step, args))
        losses.append(loss)
        correct.append(right)
        if i % args.log_interval == 0:
            pbar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
    stop_if_non_finite(finite, *last, ckpt_path)
    return losses, correct, lr


def peak_flops(device):
    """The GPU's dense bf16 peak (for MFU), or None when it is not in the table (CPU, MPS, other GPUs)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return next((f for k, f in PEAK_BF16_FLOPS.items() if re.search(rf"\b{k}\b", name)), None)


def training_flops(cfg, batch_size, args):
    """FLOPs of one forward and backward pass per image, counted by FlopCounterMode on the meta device
    (matmuls, and with --stem-channels the stem's convolutions; biases, LayerNorms, GELU and softmax are not counted)."""
    with torch.device("meta"):
        model, x = ViT(cfg), torch.zeros(batch_size, cfg.channels, cfg.image_size, cfg.image_size)
    y = torch.zeros(batch_size, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        smoothed_cross_entropy(model(x), y, args.label_smoothing).backward()
    return counter.get_total_flops() / batch_size


def benchmark(args):
    """--benchmark: the model, optimiser and step of training (same autocast, compile, batches by index
    on the device with the augmentations of the flags, and the --ema update), 3 warm-up steps, then the median of --benchmark-steps timed optimiser steps.
    Real training images when the IDX files are in --data-dir (nothing is downloaded), else random
    ones. Prints one JSON line; writes nothing."""
    device = resolve_device(args.device)
    autocast = precision(device.split(":")[0])
    raw = Path(args.data_dir) / DATASETS[args.dataset] / "raw"
    real = all(find(raw, n) for split in ("train", "test") for n in idx_files(split))
    if real:
        train_x, train_y = (t.to(device) for t in load_data(args)["train"])
    else:
        n = args.train_size or 60_000 - args.val_size
        train_x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, device=device)
        train_y = torch.randint(0, 10, (n,), device=device)
    cfg = model_config(args, train_x)
    model, optimizer, fwd = build(cfg, args, device)
    ema = make_ema(model, None, args)
    order, g = shuffle(len(train_x), args.seed, train_x.device)
    steps = len(train_x) // args.batch_size
    finite = torch.ones((), dtype=torch.bool, device=device)
    cuda = device.startswith("cuda")

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)

    warmup, times = 3, []
    for i in range(warmup + args.benchmark_steps):
        synchronize()
        t0 = time.perf_counter()
        x, y = get_batch(train_x, train_y, order, i % steps, args, g)
        train_step(model, fwd, optimizer, x, y, args.lr, args, autocast,
                   lambda loss, grad_norm: finite.logical_and_(torch.isfinite(loss) & torch.isfinite(grad_norm)))
        if ema is not None:
            update_ema(ema, model, ema_decay(i, args))
        synchronize()
        times.append(time.perf_counter() - t0)
    step_s, B = statistics.median(times[warmup:]), args.batch_size
    flops, peak = training_flops(cfg, B, args), peak_flops(device)
    print(json.dumps({
        "folder": FOLDER, "torch": torch.__version__, "params": model.num_params(),
        "device": f"cuda:{torch.device(device).index or 0} {torch.cuda.get_device_name(device)}" if cuda else device,
        "batch_size": B, "unit": "images", "samples_per_s": B / step_s, "step_ms": step_s * 1e3,
        "flops_per_sample": flops, "tflops": flops * B / step_s / 1e12,
        "mfu": flops * B / step_s / peak if peak else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "compile": args.compile_mode if args.compile else False, "data": "real" if real else "random"}))


def resume_or_refuse(args, device):
    """--out-dir/ckpt.pt and, with --resume, its contents. A fresh run refuses to overwrite a checkpoint
    (only --quick may, in its own default --out-dir)."""
    ckpt_path = Path(args.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"vit: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    return ckpt_path, ckpt


def model_config(args, train_x):
    H, W = train_x.shape[1:]
    if H != W:
        raise SystemExit(f"vit: images are {H}x{W}; this ViT takes square images")
    return ViTConfig(image_size=H, patch_size=args.patch_size, dim=args.dim, depth=args.depth, heads=args.heads,
                     mlp_dim=args.mlp_dim, dropout=args.dropout, stem_channels=args.stem_channels)


def machines_of(ckpt, here):
    """The machines a run trained on, in order: the checkpoint's list, plus this one if it differs from the last."""
    machines = (ckpt or {}).get("hardware", [])
    return machines if machines[-1:] == [here] else [*machines, here]


def restore(model, optimizer, ckpt, cfg, ckpt_path, args):
    """The state to continue from: the checkpoint's (weights, optimiser, epoch, time), or with
    --pretrained the shipped weights (fine-tuning starts at epoch 0), or nothing. -> (epoch, train_time, val_acc)"""
    if ckpt is None:
        if args.pretrained:
            model.load_state_dict(load_pretrained(args.dataset, cfg))
        return 0, 0.0, float("nan")
    if cfg != ViTConfig(**ckpt["config"]):                 # a checkpoint from before a config field: its default
        raise SystemExit(f"vit: {ckpt_path} holds another model ({ckpt['config']}); "
                         f"resume without model flags, or train it in another --out-dir")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt["epoch"], ckpt["train_time"], ckpt["val_acc"]


def schedule_of(n_train, args):
    """(steps per epoch, total steps, warmup steps); the last partial batch of each epoch is dropped."""
    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"vit: --batch-size {args.batch_size} exceeds the {n_train} training images")
    return steps_per_epoch, args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)


@contextmanager
def run_log(out, epoch, args):
    """log.csv (and W&B with --wandb) for the epochs to come -> log(row, step); on Ctrl-C, one line
    about what was kept, exit 130."""
    out.mkdir(parents=True, exist_ok=True)
    log_file, writer = open_log(out / "log.csv", epoch)
    if args.wandb:
        try:
            import wandb
        except ImportError:
            raise SystemExit("vit: --wandb needs the wandb package (pip install wandb)")
        wandb.init(project="papers-vit", config=vars(args), dir=out)

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


def describe(model, cfg, data, device, args, epoch):
    train_x = data["train"][0]
    stem = f" of the CNN stem's {cfg.stem_channels}-channel feature map" if cfg.stem_channels else ""
    print(f"{model.num_params():,} parameters ({cfg.num_patches} patches of {cfg.patch_size}x{cfg.patch_size}{stem}, "
          f"D={cfg.dim}, L={cfg.depth}, k={cfg.heads}); {args.dataset}: {len(train_x):,} train / "
          f"{len(data['val'][0]):,} val / {len(data['test'][0]):,} test images on {device}"
          + (f"; resuming after epoch {epoch}" if epoch else ""))
    if epoch >= args.epochs:
        print(f"{Path(args.out_dir) / 'ckpt.pt'} is at epoch {epoch}, which is not below --epochs {args.epochs}: "
              f"nothing to train")


def train(args):
    """Data on the device once, the ViT and AdamW (and with --ema the weights' average), then per epoch: a
    pass over a fresh permutation with warmup + cosine lr (train_epoch), validation accuracy (of the
    average with --ema), an atomic checkpoint, a row of log.csv."""
    device = resolve_device(args.device)
    autocast = precision(device.split(":")[0])
    ckpt_path, ckpt = resume_or_refuse(args, device)
    data = {k: (x.to(device), y.to(device)) for k, (x, y) in load_data(args).items()}
    train_x, train_y = data["train"]
    cfg = model_config(args, train_x)
    model, optimizer, fwd = build(cfg, args, device)
    epoch, train_time, val_acc = restore(model, optimizer, ckpt, cfg, ckpt_path, args)
    ema = make_ema(model, ckpt, args)                       # None without --ema
    machines = machines_of(ckpt, hardware())                # where each part of the run trained, for the export
    judged = model if ema is None else ema                  # what validation (and sample.py) evaluates
    schedule = schedule_of(len(train_x), args)
    describe(model, cfg, data, device, args, epoch)
    with run_log(Path(args.out_dir), epoch, args) as log:
        for epoch in range(epoch, args.epochs):
            t0 = time.perf_counter()
            losses, correct, lr = train_epoch(epoch, model, fwd, optimizer, ema, train_x, train_y, schedule,
                                              ckpt_path, args, autocast)
            dt = time.perf_counter() - t0
            train_time += dt
            n = schedule[0] * args.batch_size
            row = {"epoch": epoch + 1, "train_loss": torch.stack(losses).mean().item(),
                   "train_acc": torch.stack(correct).sum().item() / n, "lr": lr, "images_per_s": n / dt,
                   "elapsed_s": train_time}
            if len(data["val"][0]):
                row["val_loss"], row["val_acc"] = evaluate(judged, *data["val"], args.dataset, 1000, autocast)
                val_acc = row["val_acc"]
            save_atomic({"folder": FOLDER, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "ema": None if ema is None else ema.state_dict(), "epoch": epoch + 1,
                         "config": asdict(cfg), "args": vars(args), "val_acc": val_acc, "train_time": train_time,
                         "hardware": machines},
                        ckpt_path)
            log(row, epoch + 1)
            tqdm.write(f"epoch {epoch + 1:3d}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  "
                       f"val acc{' (EMA)' if ema is not None else ''} {val_acc:.4f}  lr {lr:.1e}  {row['images_per_s']:,.0f} img/s  {train_time:.0f} s")
    return model
