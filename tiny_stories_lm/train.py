"""Train either model: stories -> tokenizer -> token streams, then the loop with warmup + cosine,
validation and atomic checkpoints, and at the end bits per character on the whole validation
text. Several GPUs: launch with torchrun, and DistributedDataParallel averages the gradients;
rank 0 alone logs and checkpoints."""
import csv
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
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import (FILES, characters, encode_stories, eval_windows, get_batch, load_tokenizer, read_stories,
                  train_tokenizer)
from model import Config, build_model, num_params
from pretrained import load_weights, pretrained_weights

FOLDER = "tiny_stories_lm"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/tiny_stories_lm-quick"  # the one place (/<model>) a fresh --quick run may overwrite a checkpoint
LOG_FIELDS = ["step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"]
TOKENIZER_CHARS = 20_000_000  # the BPE and word vocabularies are learned on this much training text
BENCHMARK_CHARS = 1_000_000  # --benchmark with the corpus there: batches (and the tokenizer) from this much of it
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # dense, for MFU


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"tiny_stories_lm: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("tiny_stories_lm: --device mps, but MPS is not available here (try --device cpu)")
    return name


def n_params(cfg):
    """Parameters of build_model(cfg), counted from the config. Bag: E, then the MLP's two layers.
    Transformer: wte (tied with lm_head), wpe if learned, per block qkv 3C^2, proj C^2, fc 4C^2,
    proj 4C^2 and two norms (C each for RMSNorm, 2C for LayerNorm), and the final norm."""
    V, C = cfg.vocab_size, cfg.n_embd
    if cfg.model == "bag":
        return V * C + C * cfg.hidden + cfg.hidden + cfg.hidden * V + V
    norm = C if cfg.norm == "rmsnorm" else 2 * C
    return V * C + (cfg.block_size * C if cfg.pos == "learned" else 0) + cfg.n_layer * (12 * C * C + 2 * norm) + norm


def flops_per_token(cfg):
    """Training FLOPs per token, forward and backward: 6 per weight of a matmul (2 forward, 4 backward),
    plus, in the Transformer, 12 L T C for QK^T and AV (PaLM, appendix B). The embedding table is a
    lookup: it counts once, as the tied output layer (Transformer), or not at all (bag; its window
    mean is O(C) per token)."""
    C = cfg.n_embd
    if cfg.model == "bag":
        return 6 * (n_params(cfg) - cfg.vocab_size * C)
    wpe = cfg.block_size * C if cfg.pos == "learned" else 0
    return 6 * (n_params(cfg) - wpe) + 12 * cfg.n_layer * cfg.block_size * C


def peak_flops(device):
    """The GPU's dense bf16 peak (for MFU), or None when it is not in the table (CPU, MPS, other GPUs)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return next((f for k, f in PEAK_BF16_FLOPS.items() if re.search(rf"\b{k}\b", name)), None)


def check_memory(args, device):
    """Refuse a model that cannot fit before any data is read or anything allocated: 16 bytes per
    parameter (float32 weights, gradients and two optimiser moments) plus, roughly, the float32
    activations one micro-batch keeps for the backward pass."""
    cfg = Config(vocab_size=args.vocab_size, model=args.model, block_size=args.block_size, n_layer=args.n_layer,
                 n_head=args.n_head, n_embd=args.n_embd, pos=args.pos, norm=args.norm, hidden=args.hidden)
    B, T, C, V = args.batch_size, cfg.block_size, cfg.n_embd, cfg.vocab_size
    per_token = (3 * C + 3 * cfg.hidden if cfg.model == "bag" else cfg.n_layer * (18 * C + cfg.n_head * T)) + 3 * V
    need = 16 * n_params(cfg) + 4 * B * T * per_token
    have = (torch.cuda.mem_get_info(device)[1] if device.startswith("cuda")
            else os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    if need > have:
        raise SystemExit(f"tiny_stories_lm: this {cfg.model} (--n-embd {C}, --block-size {T}, --batch-size {B}, "
                         f"--vocab-size {V}) needs about {need / 2**30:,.0f} GiB of memory for weights, optimiser "
                         f"state and activations ({n_params(cfg) / 1e6:,.0f}M parameters), and {device} has "
                         f"{have / 2**30:,.0f} GiB; choose a smaller model or --batch-size")


def all_finite(model):
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def diverged(args, what, ckpt_path, last_ckpt, master):
    """The one-line exit of a diverged run (other DDP ranks exit quietly)."""
    saved = (f"the last good checkpoint is {ckpt_path} (step {last_ckpt})" if ckpt_path.exists()
             else "no checkpoint was saved")
    return SystemExit(f"tiny_stories_lm: {what}; {saved}; try a lower --lr (it is {args.lr:g})" if master else 1)


def load_checkpoint(path, device="cpu"):
    if not path.is_file():
        raise SystemExit(f"tiny_stories_lm: no checkpoint at {path}; train first, or pass the --out-dir of a run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"tiny_stories_lm: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"tiny_stories_lm: {path} is a checkpoint of {folder or 'something else'}, not of {FOLDER}/")
    if not all(torch.isfinite(t).all() for t in ckpt["model"].values()):
        raise SystemExit(f"tiny_stories_lm: {path} holds non-finite weights (its run diverged); train again with "
                         f"a lower --lr")
    return ckpt


def load_model(path, device):
    """The model and tokenizer of a checkpoint, in eval mode."""
    ckpt = load_checkpoint(Path(path), device)
    model = build_model(Config(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), load_tokenizer(ckpt["tokenizer"]), ckpt


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


def make_optimizer(model, args):
    """AdamW for the Transformer (decay on matrices only); the lesson's plain SGD with momentum
    for the bag model."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    # fused: one kernel for the whole update (on CPU too, where it was 3-4x faster than the loop)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.beta2), fused=True)


def to_device(tensors, device):
    """CPU tensors onto the device; on CUDA through pinned memory, without making the host wait for
    the GPU (the copy queues behind the work already launched)."""
    if device.startswith("cuda"):
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


@torch.no_grad()
def evaluate(model, batches, device, autocast):
    """Total cross-entropy (nats) and tokens over the batches."""
    model.eval()
    total, n = torch.zeros((), device=device), 0
    for x, y in batches:
        with autocast:
            _, loss = model(*to_device((x, y), device))
        total, n = total + loss.float() * y.numel(), n + y.numel()
    model.train()
    return total.item(), n  # the one wait for the GPU


def train_step(model, optimizer, batches, lr, args, autocast, ddp=False, before_update=None):
    """One optimiser step, the same in training and in --benchmark: the step's learning rate, forward
    and backward over the micro-batches [(x, y), ...] (DDP all-reduces the gradients on the last
    one only), the global gradient norm clipped to --grad-clip, the optimiser's update.
    before_update(norm) runs between the clipping and the update (training's divergence check).
    Returns the mean loss and the gradient norm before clipping as device tensors: nothing here
    waits for a GPU."""
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


def prepare_data(args, saved_tokenizer=None):
    """Stories of both splits, the tokenizer (trained here unless saved), and the token streams."""
    full = args.corpus == "full"
    train_stories = read_stories(args.data_dir, "train", args.max_train_chars, full)
    valid_stories = read_stories(args.data_dir, "valid", args.max_valid_chars, full)
    if saved_tokenizer:
        tok = load_tokenizer(saved_tokenizer)
    else:
        head, n = [], 0
        for s in train_stories:
            head.append(s)
            n += len(s)
            if n >= TOKENIZER_CHARS:
                break
        tok = train_tokenizer(args.tokenizer, head, args.vocab_size)
    train_ids, valid_ids = encode_stories(tok, train_stories), encode_stories(tok, valid_stories)
    if len(train_ids) <= args.block_size + 1:
        raise SystemExit(f"tiny_stories_lm: the training text has {len(train_ids)} tokens, too few for --block-size "
                         f"{args.block_size}; use more text or a smaller --block-size")
    return tok, train_ids, valid_ids, characters(valid_stories)


def bits_per_character(model, valid_ids, valid_chars, args, device, autocast):
    """Cross-entropy of the whole validation stream in bits, over the characters it stands for:
    comparable across tokenizers, which cut the same text into different numbers of tokens."""
    nats, tokens = evaluate(model, eval_windows(valid_ids, args.block_size, args.batch_size), device, autocast)
    return {"val_loss": nats / tokens, "val_tokens": tokens, "val_characters": valid_chars,
            "bits_per_character": nats / math.log(2) / valid_chars, "characters_per_token": valid_chars / tokens}


def train(args):
    """The loop of both models: each step a batch per micro-step, forward, backward, the gradient
    clipped, the optimiser at the scheduled learning rate; every --log-interval a log row, every
    --eval-interval the loss on --eval-tokens of validation and an atomic checkpoint; at the end
    bits per character on the whole validation text."""
    procs = start_processes(args)
    check_memory(args, procs.device)
    run = start_run(args, procs)  # tokenizer, data, model, optimiser; restored on --resume, shipped with --pretrained
    log = RunLog(args, run, procs)
    watch = Divergence(args, run, procs.device, procs.master)
    pbar = tqdm(range(run.step, args.steps), initial=run.step, total=args.steps, desc="train", dynamic_ncols=True,
                **({} if procs.master else {"disable": True}))  # disable=False would override TQDM_DISABLE=1
    try:
        for step in pbar:
            done = step + 1
            watch.at(done, at_log=done % args.log_interval == 0 or done == args.steps)
            batches = [to_device(get_batch(run.train_ids, args.batch_size, run.cfg.block_size,
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
        raise SystemExit("tiny_stories_lm: torchrun with --device mps is not supported; use cuda or cpu")
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
    """The stories, the tokenizer and token streams, the model and optimiser. --resume restores the
    checkpoint's tokenizer, weights, optimiser, step and RNG; --pretrained starts from the shipped
    tokenizer and weights; a fresh run refuses to overwrite another run's checkpoint."""
    device, device_type = procs.device, procs.device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ckpt_path = Path(args.out_dir) / "ckpt.pt"
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and Path(args.out_dir).parent == Path(QUICK_OUT_DIR)):
        raise SystemExit(f"tiny_stories_lm: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    shipped = pretrained_weights(args.model) if args.pretrained else None  # (saved tokenizer, weights, card)
    if procs.ddp and procs.local_rank != 0:
        dist.barrier()  # local rank 0 alone downloads the corpus, if it has to
    tok, train_ids, valid_ids, valid_chars = prepare_data(args, ckpt["tokenizer"] if ckpt else
                                                          shipped[0] if shipped else None)
    if procs.ddp and procs.local_rank == 0:
        dist.barrier()
    cfg = Config(**ckpt["config"]) if ckpt else Config(
        vocab_size=len(tok), model=args.model, block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head,
        n_embd=args.n_embd, dropout=args.dropout, pos=args.pos, norm=args.norm, context=args.context,
        hidden=args.hidden)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    raw = build_model(cfg).to(device)
    optimizer = make_optimizer(raw, args)
    torch.manual_seed(args.seed + procs.rank)  # but different dropout masks
    if shipped:  # fine-tuning: the shipped weights, a fresh optimiser and schedule
        load_weights(raw, shipped[1], args.model)
    if ckpt:
        restore(ckpt, raw, optimizer, procs)
    model = torch.compile(raw) if args.compile else raw
    if procs.ddp:
        model = DDP(model, device_ids=[procs.local_rank] if device_type == "cuda" else None)
    return SimpleNamespace(
        ckpt_path=ckpt_path, device_type=device_type, tok=tok, cfg=cfg, raw=raw, model=model, optimizer=optimizer,
        train_ids=train_ids, valid_ids=valid_ids, valid_chars=valid_chars,
        val_batches=eval_windows(valid_ids, cfg.block_size, args.batch_size, args.eval_tokens),
        step=ckpt["step"] if ckpt else 0, last_ckpt=ckpt["step"] if ckpt else 0,
        train_time=ckpt["train_time"] if ckpt else 0.0, val_loss=ckpt["val_loss"] if ckpt else float("nan"),
        resumed=ckpt is not None,
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext(),
        tokens_per_step=args.batch_size * cfg.block_size * args.grad_accum * procs.world)


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
                           f"{self.done}; stopping before the update", self.run.ckpt_path, self.run.last_ckpt,
                           self.master)

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
    """Rank 0's side of the run: log.csv (and W&B), the progress bar, validation, checkpoints, results.json."""

    def __init__(self, args, run, procs):
        self.args, self.run, self.master, self.file = args, run, procs.master, None
        self.losses, self.device, self.wandb, self.t0 = [], procs.device, None, time.perf_counter()
        if not self.master:
            return
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
        print(f"{run.cfg.model}: {num_params(run.raw) / 1e6:.2f}M parameters, {args.tokenizer} tokenizer of "
              f"{len(run.tok):,} tokens, {len(run.train_ids):,} train / {len(run.valid_ids):,} validation tokens, "
              f"{run.tokens_per_step:,} tokens per step on {procs.world} x {procs.device}"
              + (f", resuming at step {run.step}" if run.resumed else ""))
        self.file, self.csv = open_log(Path(args.out_dir) / "log.csv", run.step)
        if args.wandb:
            import wandb
            self.wandb = wandb
            wandb.init(project="papers-tiny_stories_lm", config=vars(args), dir=args.out_dir)

    def step(self, loss, done, lr, at_log, at_eval, pbar):
        """Collect the step's loss (a device tensor); at log steps write a row (the one sync with the GPU),
        at eval steps also the validation loss and a checkpoint."""
        self.losses.append(loss)
        if not at_log:
            return
        run = self.run
        train_loss = torch.stack(self.losses).mean().item()  # syncs with the GPU only here
        dt = time.perf_counter() - self.t0
        run.train_time += dt
        tps = len(self.losses) * run.tokens_per_step / dt
        self.losses, row = [], {"step": done, "train_loss": train_loss, "lr": lr, "tokens_per_s": tps}
        if at_eval:
            nats, n = evaluate(run.raw, run.val_batches, self.device, run.autocast)
            row["val_loss"] = run.val_loss = nats / n
            save_checkpoint(run, self.args, done)
            run.last_ckpt = done
        row["elapsed_s"] = run.train_time
        self.csv.writerow(row)
        self.file.flush()
        pbar.set_postfix(loss=f"{train_loss:.3f}", val=f"{run.val_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}")
        if self.wandb:
            self.wandb.log(row, step=done)
        self.t0 = time.perf_counter()

    def summary(self, args, run):
        """Bits per character on the whole validation text, into results.json."""
        results = bits_per_character(run.raw, run.valid_ids, run.valid_chars, args, self.device, run.autocast)
        results.update(model=run.cfg.model, tokenizer=args.tokenizer, vocab_size=len(run.tok),
                       params=num_params(run.raw), steps=args.steps, train_seconds=round(run.train_time, 1),
                       device=self.device)
        (Path(args.out_dir) / "results.json").write_text(json.dumps(results, indent=2))
        print(f"{run.cfg.model}: validation {results['val_loss']:.4f} nats/token, {results['bits_per_character']:.4f} "
              f"bits/character ({results['characters_per_token']:.2f} characters per token, whole validation "
              f"text) after {args.steps} steps; {run.train_time:.0f} s training")
        if self.wandb:
            self.wandb.log({"bits_per_character": results["bits_per_character"]})
            self.wandb.finish()

    def close(self):
        if self.file:
            self.file.close()


def save_checkpoint(run, args, step):
    save_atomic({"folder": FOLDER, "model": run.raw.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "step": step, "config": asdict(run.cfg), "tokenizer": run.tok.to_json(), "args": vars(args),
                 "val_loss": run.val_loss, "train_time": run.train_time, "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state() if run.device_type == "cuda" else None}, run.ckpt_path)


def benchmark_data(args):
    """--benchmark's batches: the training stories when they are already in --data-dir (nothing is
    downloaded; the first BENCHMARK_CHARS of them, tokenizer trained there), else random tokens."""
    folder, full = Path(args.data_dir) / "tinystories", args.corpus == "full"
    if not any((folder / name).is_file() for name in (FILES["train"][:1] if full else FILES["train"])):
        return args.vocab_size, None
    stories = read_stories(args.data_dir, "train", min(args.max_train_chars or BENCHMARK_CHARS, BENCHMARK_CHARS), full)
    tok = train_tokenizer(args.tokenizer, stories, args.vocab_size)
    ids = encode_stories(tok, stories)
    if len(ids) <= args.block_size + 1:
        raise SystemExit(f"tiny_stories_lm: {folder} holds {len(ids)} training tokens, too few for --block-size "
                         f"{args.block_size}")
    return len(tok), ids


def benchmark(args):
    """--benchmark: the model, optimiser and step of training (same autocast and compile), a few warm-up
    steps, then the median of --benchmark-steps timed optimiser steps, each fetching its batches as
    training does. Prints one JSON line; writes nothing."""
    device = resolve_device(args.device)
    check_memory(args, device)
    device_type = device.split(":")[0]
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    vocab_size, ids = benchmark_data(args)
    cfg = Config(vocab_size=vocab_size, model=args.model, block_size=args.block_size, n_layer=args.n_layer,
                 n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout, pos=args.pos, norm=args.norm,
                 context=args.context, hidden=args.hidden)
    torch.manual_seed(args.seed)
    raw = build_model(cfg).to(device)
    optimizer = make_optimizer(raw, args)
    model = torch.compile(raw) if args.compile else raw

    def batches(step):
        if ids is not None:
            return [get_batch(ids, args.batch_size, cfg.block_size, (args.seed, step, 0, micro))
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
    tokens, flops, peak = args.batch_size * cfg.block_size * args.grad_accum, flops_per_token(cfg), peak_flops(device)
    cuda = device_type == "cuda"
    print(json.dumps({
        "folder": FOLDER, "torch": torch.__version__, "params": num_params(raw),
        "device": f"cuda:{torch.device(device).index or 0} {torch.cuda.get_device_name(device)}" if cuda else device,
        "batch_size": tokens, "unit": "tokens", "samples_per_s": tokens / step_s, "step_ms": step_s * 1e3,
        "flops_per_sample": flops, "tflops": flops * tokens / step_s / 1e12,
        "mfu": flops * tokens / step_s / peak if peak else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "compile": bool(args.compile), "data": "real" if ids is not None else "random"}))
