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
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import CharTokenizer, get_batch, load_text, text_path, train_val_split, val_windows
from model import GPT, GPTConfig
from pretrained import load_weights, pretrained_weights

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
    """CSV of the run; on resume, rows past the checkpoint (lost work) are dropped first. The kept rows
    replace the log in one rename: a run stopped at any moment leaves the old log or the new one, never an empty one."""
    rows = []
    if resume_step and path.is_file():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    f = open(path, "a", newline="")
    return f, csv.DictWriter(f, fieldnames=LOG_FIELDS)


def train(args):
    """nanoGPT's loop: each step a batch per micro-step, forward, backward, the gradient clipped, AdamW
    at the scheduled learning rate; every --log-interval a log row, every --eval-interval the loss on
    the whole validation split and an atomic checkpoint."""
    procs = start_processes(args)
    check_memory(args, procs.device)
    run = start_run(args, procs)  # data, model, AdamW; restored on --resume, shipped with --pretrained
    log = RunLog(args, run, procs)
    watch = Divergence(args, run, procs.device, procs.master)
    pbar = tqdm(range(run.step, args.steps), initial=run.step, total=args.steps, desc="train", dynamic_ncols=True,
                **({} if procs.master else {"disable": True}))  # disable=False would override TQDM_DISABLE=1
    try:
        for step in pbar:
            done = step + 1
            watch.at(done, at_log=done % args.log_interval == 0 or done == args.steps)
            batches = [to_device(get_batch(run.train_data, args.batch_size, run.cfg.block_size,
                                           (args.seed, step, procs.rank, micro)), procs.device)
                       for micro in range(args.grad_accum)]
            lr = get_lr(step, args)
            loss, _ = train_step(run.model, run.optimizer, batches, lr, args, run.autocast, procs.ddp, watch.check)
            at_eval = done % args.eval_interval == 0 or done == args.steps
            if at_eval:
                watch.check_weights(run.raw)
            if procs.master:
                log.step(loss, done, lr, watch.at_log, at_eval, pbar)
    except KeyboardInterrupt:
        interrupted(run.ckpt_path, run.last_ckpt, procs.master)
    finally:
        log.close()
        if procs.ddp:
            dist.destroy_process_group()
    if procs.master:
        log.summary(args, run)
    return run.raw


def start_processes(args):
    """One process per GPU under torchrun (DistributedDataParallel averages the gradients), else this one."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return SimpleNamespace(ddp=False, rank=0, world=1, local_rank=0, device=resolve_device(args.device),
                               master=True)
    if args.device == "mps":
        raise SystemExit("gpt: torchrun with --device mps is not supported; use cuda or cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    device = f"cuda:{local_rank}" if use_cuda else "cpu"  # one GPU per process, by local rank
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank = int(os.environ["RANK"])
    return SimpleNamespace(ddp=True, rank=rank, world=int(os.environ["WORLD_SIZE"]), local_rank=local_rank,
                           device=device, master=rank == 0)


def start_run(args, procs):
    """The text, its vocabulary and splits, the model and AdamW. --resume restores the checkpoint's
    vocabulary, weights, optimiser, step and RNG; --pretrained starts from the shipped weights;
    a fresh run refuses to overwrite another run's checkpoint."""
    device, device_type = procs.device, procs.device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = Path(args.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"gpt: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    shipped = pretrained_weights() if args.pretrained else None  # (vocabulary, weights, card)
    text = read_text_once(args, procs)
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    if ckpt and ckpt["text_sha256"] != text_sha:
        raise SystemExit(f"gpt: {ckpt_path} was trained on another text than {args.data or 'the novel'}; "
                         f"--resume needs the same --data / --data-dir text")
    tok = CharTokenizer(ckpt["vocab"]) if ckpt else shipped[0] if shipped else CharTokenizer.from_text(text)
    cfg = GPTConfig(**ckpt["config"]) if ckpt else GPTConfig(
        vocab_size=len(tok), block_size=args.block_size, n_layer=args.n_layer,
        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
    train_data, val_data = train_val_split(tok.encode(text), cfg.block_size)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw = GPT(cfg).to(device)
    optimizer = raw.configure_optimizers(args.weight_decay, args.lr, (0.9, args.beta2))
    torch.manual_seed(args.seed + procs.rank)  # but different dropout masks
    if shipped:  # fine-tuning: the shipped weights, a fresh optimiser and schedule
        load_weights(raw, shipped[1])
    if ckpt:
        restore(ckpt, raw, optimizer, procs)
    model = torch.compile(raw, mode=args.compile_mode) if compiles(args, device_type) else raw
    if procs.ddp:
        model = DDP(model, device_ids=[procs.local_rank] if device_type == "cuda" else None)
    return SimpleNamespace(
        ckpt_path=ckpt_path, text_sha=text_sha, device_type=device_type, n_val=len(val_data), tok=tok, cfg=cfg, raw=raw, model=model, optimizer=optimizer,
        train_data=train_data, windows=val_windows(val_data, cfg.block_size, args.batch_size),
        step=ckpt["step"] if ckpt else 0, last_ckpt=ckpt["step"] if ckpt else 0, train_time=ckpt["train_time"] if ckpt else 0.0,
        val_loss=ckpt["val_loss"] if ckpt else float("nan"), resumed=ckpt is not None,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext(),
        tokens_per_step=args.batch_size * cfg.block_size * args.grad_accum * procs.world,
        eval_model=model.module if procs.ddp else model)


def read_text_once(args, procs):
    """The training text; under torchrun, local rank 0 alone downloads it, if it has to."""
    if procs.ddp and procs.local_rank != 0:
        dist.barrier()
    text = load_text(args)
    if procs.ddp and procs.local_rank == 0:
        dist.barrier()
    return text


def restore(ckpt, raw, optimizer, procs):
    """--resume: weights, optimiser and, on rank 0, the RNG (exact dropout masks; other ranks draw fresh ones)."""
    raw.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if procs.master:
        torch.set_rng_state(ckpt["rng"].cpu())
        if procs.device.startswith("cuda") and ckpt["cuda_rng"] is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"].cpu())


class Divergence:
    """Divergence is caught before the update of step `done`, at log steps only (on every device: a
    host sync per step would stall a GPU); every save comes after such a check."""

    def __init__(self, args, run, device, master):
        self.args, self.run, self.master = args, run, master
        self.finite = torch.ones((), dtype=torch.bool, device=device)  # no non-finite gradient norm so far
        self.done, self.at_log = 0, False

    def at(self, done, at_log):
        self.done, self.at_log = done, at_log

    def check(self, norm):
        self.finite.logical_and_(torch.isfinite(norm))  # the same on every rank after DDP's all-reduce
        if self.at_log and not self.finite.item():
            when = "at" if self.args.log_interval == 1 else "by"
            raise diverged(self.args, f"the loss became non-finite (gradient norm {norm.item():g}) {when} step "
                           f"{self.done}; stopping before the update", self.run.ckpt_path, self.run.last_ckpt, self.master)

    def check_weights(self, raw):
        if not all_finite(raw):
            raise diverged(self.args, f"the weights became non-finite at step {self.done}; they are not saved",
                           self.run.ckpt_path, self.run.last_ckpt, self.master)


def interrupted(ckpt_path, last_ckpt, master):
    if master and ckpt_path.exists():
        print(f"\ninterrupted; the last checkpoint (step {last_ckpt}) is {ckpt_path}: continue with --resume")
    elif master:
        print("\ninterrupted before the first checkpoint; nothing was saved")
    raise SystemExit(130)


class RunLog:
    """Rank 0's side of the run: log.csv (and W&B), the progress bar, validation and checkpoints."""

    def __init__(self, args, run, procs):
        self.args, self.run, self.master, self.file = args, run, procs.master, None
        self.start, self.resumed_time, self.losses = run.step, run.train_time, []
        self.device, self.wandb, self.t0 = procs.device, None, time.perf_counter()
        if not self.master:
            return
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        print(f"{run.raw.num_params() / 1e6:.2f}M parameters, vocabulary {len(run.tok)}, "
              f"{len(run.train_data):,} train / {run.n_val:,} val characters, "
              f"{run.tokens_per_step:,} tokens per step on {procs.world} x {procs.device}"
              + (f", resuming at step {run.step}" if run.resumed else ""))
        self.file, self.csv = open_log(Path(args.out_dir) / "log.csv", run.step)
        if args.wandb:
            import wandb
            self.wandb = wandb
            wandb.init(project="papers-gpt", config=vars(args), dir=args.out_dir)
        if self.start >= args.steps:
            print(f"{run.ckpt_path} is at step {self.start}, which is not below --steps {args.steps}: nothing to train")

    def step(self, loss, done, lr, at_log, at_eval, pbar):
        """Collect the step's loss (a device tensor); at log steps write a row (the one sync with the GPU),
        at eval steps also the whole-split validation loss and a checkpoint."""
        self.losses.append(loss)
        if not at_log:
            return
        run, args = self.run, self.args
        train_loss = torch.stack(self.losses).mean().item()  # syncs with the GPU only here
        dt = time.perf_counter() - self.t0
        run.train_time += dt
        tps = len(self.losses) * run.tokens_per_step / dt
        self.losses, row = [], {"step": done, "train_loss": train_loss, "lr": lr, "tokens_per_s": tps}
        if at_eval:
            row["val_loss"] = run.val_loss = evaluate(run.eval_model, run.windows, self.device, run.autocast)
            save_checkpoint(run, args, done)
            run.last_ckpt = done
        row["elapsed_s"] = run.train_time
        self.csv.writerow(row)
        self.file.flush()
        pbar.set_postfix(loss=f"{train_loss:.3f}", val=f"{run.val_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}")
        if self.wandb:
            self.wandb.log(row, step=done)
        self.t0 = time.perf_counter()
        return row

    def summary(self, args, run):
        if args.steps > self.start:
            tps = run.tokens_per_step * (args.steps - self.start) / (run.train_time - self.resumed_time)
            tflops = run.raw.flops_per_token() * tps / 1e12
            peak = peak_flops(self.device)
            mfu = f", MFU {tflops * 1e12 / peak:.1%}" if peak else ""
            print(f"val loss {run.val_loss:.4f} nats/char (whole validation split) after {args.steps} steps; "
                  f"{run.train_time:.0f} s training, {tps:,.0f} tokens/s, {tflops:.2f} TFLOP/s{mfu}")
        if self.wandb:
            self.wandb.finish()

    def close(self):
        if self.file:
            self.file.close()


def save_checkpoint(run, args, step):
    save_atomic({"folder": FOLDER, "model": run.raw.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "step": step, "config": asdict(run.cfg), "vocab": run.tok.chars, "args": vars(args),
                 "val_loss": run.val_loss, "text_sha256": run.text_sha, "train_time": run.train_time,
                 "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state() if run.device_type == "cuda" else None}, run.ckpt_path)


def benchmark(args):
    """--benchmark: the model, optimiser and step of training (same autocast and compile), a few warm-up
    steps, then the median of --benchmark-steps timed optimiser steps, each fetching its batches as
    training does, and the mean of as many in flight (`time_steps`); --profile: a profile of as many
    more (`profile_steps`). Real windows of the text when it is already there (nothing is downloaded), else
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
    model = torch.compile(raw, mode=args.compile_mode) if compiles(args, device_type) else raw

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

    def run_step(step):
        micro = [to_device(b, device) for b in batches(step)]
        train_step(model, optimizer, micro, get_lr(step, args), args, autocast)

    warmup, steps = 3, args.benchmark_steps
    times, in_flight = time_steps(run_step, warmup, steps, synchronize)
    if args.profile:
        profile_steps(run_step, warmup + 2 * steps, steps, synchronize, device_type)
    step_s = statistics.median(times)
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
        "step_ms_in_flight": in_flight * 1e3,
        "compile": args.compile_mode if compiles(args, device_type) else False, "data": "real" if real else "random"}))


def time_steps(run_step, warmup, steps, synchronize):
    """After `warmup` steps, `steps` steps each timed alone (synchronised before and after: what one step
    costs), then `steps` more in flight with one synchronisation at the end (what training sees, which
    does not wait for the GPU between steps: the host queues the next step while the GPU runs this one).
    Returns the single steps' times and the in-flight steps' mean time, in seconds."""
    times = []
    for step in range(warmup + steps):
        synchronize()
        t0 = time.perf_counter()
        run_step(step)
        synchronize()
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for step in range(warmup + steps, warmup + 2 * steps):
        run_step(step)
    synchronize()
    return times[warmup:], (time.perf_counter() - t0) / steps


def profile_steps(run_step, first, steps, synchronize, device_type):
    """--profile: `steps` more steps under torch.profiler; to stderr, the ops that took the most time (on a
    GPU, the kernels by device time) and, on CUDA, how much of a step the GPU was busy: a GPU idle for most
    of the step waits on the host (Python, launches), which CUDA graphs (--compile-mode reduce-overhead) cut.
    The profiler slows the host, so the busy share is a lower bound."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device_type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for step in range(first, first + steps):
            run_step(step)
        synchronize()
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    print(averages.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=25),
          file=sys.stderr)
    if cuda:
        busy = sum(e.self_device_time_total for e in averages
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e6
        print(f"GPU busy {busy / steps * 1e3:.2f} ms of {wall / steps * 1e3:.2f} ms a step ({busy / wall:.0%}) "
              f"under the profiler", file=sys.stderr)
