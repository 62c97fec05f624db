"""Train the character GPT: data, model, optimiser, schedule, then the loop with
evaluation and atomic checkpoints. Several GPUs or nodes: launch with torchrun, and
DistributedDataParallel averages the gradients; rank 0 alone logs and checkpoints."""
import csv
import hashlib
import json
import math
import os
import re
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import CharTokenizer, get_batch, load_text, text_path, train_val_split, val_windows
from model import GPT, GPTConfig

FOLDER = "gpt"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/gpt-quick"  # the one place a fresh (--quick) run may overwrite a checkpoint
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # dense
LOG_FIELDS = ["step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"]
VOCAB_GUESS = 256  # characters: the memory check runs before the text (and its vocabulary) is read
VOCAB_RANDOM = 80  # --benchmark without the text: random characters from a vocabulary the size of 1984's


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"gpt: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("gpt: --device mps, but MPS is not available here (try --device cpu)")
    return name


def n_params(cfg):
    """Parameters of GPT(cfg), counted from the config: wte (tied with lm_head), wpe, per block
    c_attn 3C^2 + 3C, c_proj C^2 + C, c_fc 4C^2 + 4C, c_proj 4C^2 + C, two LayerNorms 4C; ln_f 2C."""
    C = cfg.n_embd
    return cfg.vocab_size * C + cfg.block_size * C + cfg.n_layer * (12 * C * C + 13 * C) + 2 * C


def compiles(args, device_type):
    """--compile / --no-compile, and by default on CUDA only (on CPU it changed little for these sizes)."""
    return device_type == "cuda" if args.compile is None else args.compile


def peak_flops(device):
    """The GPU's dense bf16 peak (for MFU), or None when it is not in the table (CPU, MPS, other GPUs)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return next((f for k, f in PEAK_BF16_FLOPS.items() if re.search(rf"\b{k}\b", name)), None)


def check_memory(args, device):
    """Refuse a model that cannot fit before any data is read or anything allocated: 16 bytes per
    parameter (float32 weights, gradients and AdamW's two moments) plus, roughly, the float32
    activations one micro-batch keeps for the backward pass, 4 B T (L (18 C + nh T) + 3 V) bytes."""
    cfg = GPTConfig(VOCAB_GUESS, args.block_size, args.n_layer, args.n_head, args.n_embd)
    B, T, C, L = args.batch_size, cfg.block_size, cfg.n_embd, cfg.n_layer
    need = 16 * n_params(cfg) + 4 * B * T * (L * (18 * C + cfg.n_head * T) + 3 * cfg.vocab_size)
    have = (torch.cuda.mem_get_info(device)[1] if device.startswith("cuda")
            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > have:
        raise SystemExit(f"gpt: --n-layer {L} --n-embd {C} --block-size {T} --batch-size {B} needs about "
                         f"{need / 2**30:,.0f} GiB of memory for weights, optimiser state and activations "
                         f"({n_params(cfg) / 1e6:,.0f}M parameters), and {device} has {have / 2**30:,.0f} GiB; "
                         f"choose a smaller model or --batch-size")


def load_checkpoint(path, device):
    if not path.is_file():
        raise SystemExit(f"gpt: no checkpoint at {path}; train first, or pass the --out-dir of a gpt run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"gpt: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"gpt: {path} is a checkpoint of {folder or 'something else'}, not of gpt/")
    if not all(torch.isfinite(t).all() for t in ckpt["model"].values()):
        raise SystemExit(f"gpt: {path} holds non-finite weights (its run diverged); train again with a lower --lr")
    return ckpt


def save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def get_lr(step, args):
    """Linear warmup to --lr, then cosine decay to --min-lr at --steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (args.lr - args.min_lr)


def all_finite(model):
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def diverged(args, what, ckpt_path, last_ckpt, master):
    """The one-line exit of a diverged run (other DDP ranks exit quietly)."""
    saved = (f"the last good checkpoint is {ckpt_path} (step {last_ckpt})" if ckpt_path.exists()
             else "no checkpoint was saved")
    return SystemExit(f"gpt: {what}; {saved}; try a lower --lr (it is {args.lr:g})" if master else 1)


def to_device(tensors, device):
    """CPU tensors onto the device; on CUDA through pinned memory, without making the host wait for
    the GPU (the copy queues behind the work already launched)."""
    if device.startswith("cuda"):
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


@torch.no_grad()
def evaluate(model, windows, device, autocast):
    """Mean cross-entropy (nats per character) over the whole validation split."""
    model.eval()
    total, n = torch.zeros((), device=device), 0
    for x, y in windows:
        with autocast:
            _, loss = model(*to_device((x, y), device))
        total, n = total + loss.float() * y.numel(), n + y.numel()
    model.train()
    return total.item() / n  # the one wait for the GPU


def train_step(model, optimizer, batches, lr, args, autocast, ddp=False, before_update=None):
    """One optimiser step, the same in training and in --benchmark: the step's learning rate, forward
    and backward over the micro-batches [(x, y), ...] (DDP all-reduces the gradients on the last
    one only), the global gradient norm clipped to --grad-clip, AdamW's update. before_update(norm)
    runs between the clipping and the update (training's divergence check). Returns the mean loss
    and the gradient norm before clipping as device tensors: nothing here waits for a GPU."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    mean_loss = 0.0
    for micro, (x, y) in enumerate(batches):
        sync = model.no_sync() if ddp and micro < len(batches) - 1 else nullcontext()
        with sync:
            with autocast:
                _, loss = model(x, y)
            (loss / len(batches)).backward()
        mean_loss = mean_loss + loss.detach() / len(batches)
    # --grad-clip 0: an infinite bound leaves the gradients as they are
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
    if before_update:
        before_update(norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, norm


def open_log(path, resume_step):
    """CSV of the run; on resume, rows past the checkpoint (lost work) are dropped first."""
    rows = []
    if resume_step and path.is_file():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return f, writer


def train(args):
    # ---- processes and device: one per GPU under torchrun, else just this one
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        if args.device == "mps":
            raise SystemExit("gpt: torchrun with --device mps is not supported; use cuda or cpu")
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        device = f"cuda:{local_rank}" if use_cuda else "cpu"  # one GPU per process, by local rank
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    else:
        rank, world, device = 0, 1, resolve_device(args.device)
    check_memory(args, device)
    master = rank == 0
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()

    # ---- data and vocabulary (from the checkpoint when resuming)
    out = Path(args.out_dir)
    ckpt_path = out / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"gpt: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    if ddp and local_rank != 0:
        dist.barrier()  # local rank 0 alone downloads the text, if it has to
    text = load_text(args)
    if ddp and local_rank == 0:
        dist.barrier()
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    if ckpt and ckpt["text_sha256"] != text_sha:
        raise SystemExit(f"gpt: {ckpt_path} was trained on another text than {args.data or 'the novel'}; "
                         f"--resume needs the same --data / --data-dir text")
    tok = CharTokenizer(ckpt["vocab"]) if ckpt else CharTokenizer.from_text(text)
    cfg = GPTConfig(**ckpt["config"]) if ckpt else GPTConfig(
        vocab_size=len(tok), block_size=args.block_size, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    train_data, val_data = train_val_split(tok.encode(text), cfg.block_size)
    windows = val_windows(val_data, cfg.block_size, args.batch_size)

    # ---- model and optimiser
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = GPT(cfg).to(device)
    optimizer = model.configure_optimizers(args.weight_decay, args.lr, (0.9, args.beta2))
    torch.manual_seed(args.seed + rank)  # but different dropout masks
    step = 0
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        if master:  # exact resume of the dropout masks (the other ranks draw fresh ones)
            torch.set_rng_state(ckpt["rng"].cpu())
            if device_type == "cuda" and ckpt["cuda_rng"] is not None:
                torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())
    raw = model
    if compiles(args, device_type):
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    eval_model = model.module if ddp else model

    tokens_per_step = args.batch_size * cfg.block_size * args.grad_accum * world
    peak = peak_flops(device)
    if master:
        out.mkdir(parents=True, exist_ok=True)
        print(f"{raw.num_params() / 1e6:.2f}M parameters, vocabulary {len(tok)}, "
              f"{len(train_data):,} train / {len(val_data):,} val characters, {tokens_per_step:,} "
              f"tokens per step on {world} x {device}" + (f", resuming at step {step}" if ckpt else ""))
        log_file, log = open_log(out / "log.csv", step)
        if args.wandb:
            import wandb
            wandb.init(project="papers-gpt", config=vars(args), dir=out)

    def checkpoint(step, val_loss):
        save_atomic({"folder": FOLDER, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "config": asdict(cfg), "vocab": tok.chars, "args": vars(args),
                     "val_loss": val_loss, "text_sha256": text_sha, "train_time": train_time,
                     "rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state() if device_type == "cuda" else None}, ckpt_path)

    # ---- the loop
    quiet = {} if master else {"disable": True}  # an explicit disable=False would override TQDM_DISABLE=1
    pbar = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="train", dynamic_ncols=True, **quiet)
    start, t0, losses, last_ckpt = step, time.perf_counter(), [], step
    finite = torch.ones((), dtype=torch.bool, device=device)  # no non-finite gradient norm so far
    train_time, val_loss = (ckpt["train_time"], ckpt["val_loss"]) if ckpt else (0.0, float("nan"))
    resumed_time = train_time
    if master and start >= args.steps:
        print(f"{ckpt_path} is at step {start}, which is not below --steps {args.steps}: nothing to train")

    def check_finite(norm):
        """Divergence is caught before the update of step `done`, at log steps only (on every device: a
        host sync per step would stall a GPU); every save comes after such a check."""
        finite.logical_and_(torch.isfinite(norm))  # the same on every rank after DDP's all-reduce
        if at_log and not finite.item():
            when = "at" if args.log_interval == 1 else "by"
            raise diverged(args, f"the loss became non-finite (gradient norm {norm.item():g}) {when} step "
                           f"{done}; stopping before the update", ckpt_path, last_ckpt, master)

    try:
        for step in pbar:
            done = step + 1
            at_log = done % args.log_interval == 0 or done == args.steps
            batches = [to_device(get_batch(train_data, args.batch_size, cfg.block_size, (args.seed, step, rank, micro)),
                                 device) for micro in range(args.grad_accum)]
            lr = get_lr(step, args)
            loss, _ = train_step(model, optimizer, batches, lr, args, autocast, ddp, check_finite)
            if master:
                losses.append(loss)
            if (done % args.eval_interval == 0 or done == args.steps) and not all_finite(raw):
                raise diverged(args, f"the weights became non-finite at step {done}; they are not saved", ckpt_path,
                               last_ckpt, master)

            if master and at_log:
                train_loss = torch.stack(losses).mean().item()  # syncs with the GPU only here
                dt = time.perf_counter() - t0
                train_time += dt
                tps = len(losses) * tokens_per_step / dt
                losses, row = [], {"step": done, "train_loss": train_loss, "lr": lr, "tokens_per_s": tps}
                if done % args.eval_interval == 0 or done == args.steps:
                    row["val_loss"] = val_loss = evaluate(eval_model, windows, device, autocast)
                    checkpoint(done, val_loss)
                    last_ckpt = done
                row["elapsed_s"] = train_time
                log.writerow(row)
                log_file.flush()
                pbar.set_postfix(loss=f"{train_loss:.3f}", val=f"{val_loss:.3f}", lr=f"{lr:.1e}",
                                 tok_s=f"{tps:,.0f}")
                if args.wandb:
                    wandb.log(row, step=done)
                t0 = time.perf_counter()
    except KeyboardInterrupt:
        if master and ckpt_path.exists():
            print(f"\ninterrupted; the last checkpoint (step {last_ckpt}) is {ckpt_path}: "
                  f"continue with --resume")
        elif master:
            print("\ninterrupted before the first checkpoint; nothing was saved")
        raise SystemExit(130)
    finally:
        if master:
            log_file.close()
        if ddp:
            dist.destroy_process_group()

    if master and args.steps > start:
        tps = tokens_per_step * (args.steps - start) / (train_time - resumed_time)
        tflops = raw.flops_per_token() * tps / 1e12
        mfu = f", MFU {tflops * 1e12 / peak:.1%}" if peak else ""
        print(f"val loss {val_loss:.4f} nats/char (whole validation split) after {args.steps} steps; "
              f"{train_time:.0f} s training, {tps:,.0f} tokens/s, {tflops:.2f} TFLOP/s{mfu}")
        if args.wandb:
            wandb.finish()
    return raw


def benchmark(args):
    """--benchmark: the model, optimiser and step of training (same autocast and compile), a few warm-up
    steps, then the median of --benchmark-steps timed optimiser steps, each fetching its batches as
    training does. Real windows of the text when it is already there (nothing is downloaded), else
    random characters. Prints one JSON line; writes nothing."""
    device = resolve_device(args.device)
    check_memory(args, device)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    real = text_path(args).is_file()
    if real:
        text = load_text(args)
        tok = CharTokenizer.from_text(text)
        train_data, _ = train_val_split(tok.encode(text), args.block_size)
    cfg = GPTConfig(len(tok) if real else VOCAB_RANDOM, args.block_size, args.n_layer, args.n_head, args.n_embd,
                    args.dropout)
    torch.manual_seed(args.seed)
    raw = GPT(cfg).to(device)
    optimizer = raw.configure_optimizers(args.weight_decay, args.lr, (0.9, args.beta2))
    model = torch.compile(raw) if compiles(args, device_type) else raw

    def batches(step):
        if real:
            return [get_batch(train_data, args.batch_size, cfg.block_size, (args.seed, step, 0, micro))
                    for micro in range(args.grad_accum)]
        w = torch.randint(cfg.vocab_size, (args.grad_accum, args.batch_size, cfg.block_size + 1))
        return [(m[:, :-1], m[:, 1:]) for m in w]

    def synchronize():
        if device_type == "cuda":
            torch.cuda.synchronize(device)
        elif device_type == "mps":
            torch.mps.synchronize()

    warmup, times = 3, []
    for step in range(warmup + args.benchmark_steps):
        synchronize()
        t0 = time.perf_counter()
        micro = [to_device(b, device) for b in batches(step)]
        train_step(model, optimizer, micro, get_lr(step, args), args, autocast)
        synchronize()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warmup:])
    tokens = args.batch_size * cfg.block_size * args.grad_accum
    flops, peak = raw.flops_per_token(), peak_flops(device)
    cuda = device_type == "cuda"
    print(json.dumps({
        "folder": FOLDER, "torch": torch.__version__, "params": sum(p.numel() for p in raw.parameters()),
        "device": f"cuda:{torch.device(device).index or 0} {torch.cuda.get_device_name(device)}" if cuda else device,
        "batch_size": tokens, "unit": "tokens", "samples_per_s": tokens / step_s, "step_ms": step_s * 1e3,
        "flops_per_sample": flops, "tflops": flops * tokens / step_s / 1e12,
        "mfu": flops * tokens / step_s / peak if peak else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "compile": compiles(args, device_type), "data": "real" if real else "random"}))
