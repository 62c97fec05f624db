"""Train the FFF and its two dense baselines, one after the other, on the same data,
batches and schedule: the loss (cross-entropy plus, for the FFF, the hardening term),
validation accuracy after each epoch, an atomic checkpoint per model and epoch."""
import csv
import json
import math
import os
import re
import resource
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from data import DATASETS, load_data, normalize
from model import FFF, build
from pretrained import load_pretrained

FOLDER = "fff"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/fff-quick"  # the one place a fresh (--quick) run may overwrite checkpoints
MODELS = ("fff", "ff_train", "ff_infer")  # the FFF, dense of equal training width, dense of equal inference width
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # dense
EXPLODED = 1e4    # a mean cross-entropy this large means logit margins in the thousands: diverged
LOG_FIELDS = ["epoch", "train_loss", "train_acc", "node_entropy", "val_acc", "val_acc_hard", "lr", "elapsed_s"]


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"fff: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("fff: --device mps, but MPS is not available here (try --device cpu)")
    return name


def device_memory(device):
    """Bytes the device can hold: free CUDA memory, else this machine's RAM (CPU and MPS share it)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ckpt_path(out, name):
    return Path(out) / f"ckpt_{name}.pt"


def load_checkpoint(path, device):
    if not path.is_file():
        raise SystemExit(f"fff: no checkpoint at {path}; train first, or pass the --out-dir of a fff run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"fff: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"fff: {path} is a checkpoint of {folder or 'something else'}, not of fff/")
    return ckpt


def save_atomic(obj, path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def tf32(device):
    """TF32 matmuls on CUDA. No bf16 autocast: hard routing decides by the sign of w.x + b, which bf16
    (8 significant bits) flips for inputs near a node's hyperplane, and at these sizes the step is
    bound by kernel launches, not by arithmetic."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def adam(model, args):
    """Adam, as the paper trains; on CUDA the fused kernel (one launch per step instead of several per
    parameter)."""
    return torch.optim.Adam(model.parameters(), lr=args.lr, fused=True if next(model.parameters()).is_cuda else None)


def hardening(progress, args):
    """h at `progress` (0..1) of training: grows linearly from 0 over the first --hardening-ramp of
    training, then stays at --hardening (--hardening-ramp 0: the paper's constant h)."""
    if not args.hardening_ramp:
        return args.hardening
    return args.hardening * min(1.0, progress / args.hardening_ramp)


def fff_loss(logits, y, H, h):
    """L = L_pred + h L_harden (§3): L_pred the cross-entropy, L_harden the sum over the nodes of the
    entropies H(c_{m,n}(x)) of their decisions (H: (B, n_nodes)), both means over the batch.
    -> (L, L_pred, L_harden)"""
    L_pred = F.cross_entropy(logits, y)
    L_harden = H.sum(dim=1).mean()
    return L_pred + h * L_harden, L_pred, L_harden


def stop_if_diverged(healthy, name, L_pred, grad_norm, step, path):
    """One line and exit once a loss or gradient norm has been non-finite, or the cross-entropy has
    exploded (`healthy` is False), so that no checkpoint is written from then on; on CPU it is checked
    every step, before the update. (With Adam, a far too large --lr need not give NaN: each step moves
    every weight by about lr, the logits grow to ~1e20 and stay finite, and the run would end "fine".)"""
    if not healthy:
        kept = f"the last good checkpoint is {path}" if path.exists() else "no checkpoint of it was written"
        raise SystemExit(f"fff: {name}'s loss became non-finite or exploded (cross-entropy {L_pred.item():g}, "
                         f"against ln 10 = 2.3 for a uniform guess; gradient norm {grad_norm.item():g}) at step "
                         f"{step}; stopped without saving it ({kept}); try a lower --lr")


@torch.no_grad()
def predict(model, x, mode, batch_size=4096):
    """Predicted classes (N,), in eval mode and in batches (soft mode holds every leaf's output)."""
    was_training = model.training
    model.eval()
    pred = torch.cat([model(x[i:i + batch_size], mode=mode)[0].argmax(-1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return pred


def accuracy(model, x, y, mode):
    return (predict(model, x, mode) == y).float().mean().item()


def open_log(path, resume_epoch):
    """CSV of one model's run; on resume, rows past the checkpoint are dropped first. The kept rows
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


def training_pixels(pixels, dataset):
    """The training pixels as the step reads them: on a GPU uint8 (a quarter of the memory; each batch
    is standardised there, three small kernels); on the CPU standardised once, as before, since
    standardising every batch there cost up to 0.2 ms per step (a dense step of width 32 takes 1.3 ms)."""
    return pixels if pixels.device.type != "cpu" else normalize(pixels, dataset)


def get_batch(train_x, train_y, order, i, args):
    """Batch i of an epoch, gathered by index where the pixels live, standardised if they are uint8.
    -> x (B, I) float, y (B,)"""
    idx = order[i * args.batch_size:(i + 1) * args.batch_size]
    x = train_x[idx]
    return normalize(x, args.dataset) if x.dtype == torch.uint8 else x, train_y[idx]


def train_step(model, fwd, optimizer, x, y, lr, h, args, before_update):
    """One optimiser step: the FFF's soft forward (FORWARD_T with region leaks) and L = L_pred + h L_harden,
    or a dense model and its cross-entropy; before_update(loss, L_pred, grad_norm) runs just before the
    update (the divergence check); fwd is the model, compiled with --compile.
    -> (L_pred, L_harden or None, correct predictions), device tensors."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    L_harden = None
    if isinstance(model, FFF):
        logits, H = fwd(x, mode="soft", leak=args.region_leak)
        loss, L_pred, L_harden = fff_loss(logits, y, H, h)
    else:
        logits, _ = fwd(x)
        loss = L_pred = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    before_update(loss.detach(), L_pred.detach(), grad_norm)
    optimizer.step()
    correct = (logits.argmax(-1) == y).sum()
    return L_pred.detach(), None if L_harden is None else L_harden.detach(), correct


def checks_every_step(device):
    """Off CUDA reading a flag from the device costs nothing, so divergence is checked every step; on
    CUDA each read waits for the GPU to finish its queue, so only every --log-interval steps."""
    return device.type != "cuda"


def train_epoch(epoch, name, model, fwd, optimizer, train_x, train_y, total_steps, path, args):
    """One pass over a fresh permutation of the training set, with the cosine lr and the hardening ramp.
    Divergence is folded into a device tensor every step and read (a host sync) before the update:
    every step off CUDA, every --log-interval steps on CUDA, and always at the end of the epoch, so
    that no checkpoint holds a diverged state. -> (L_pred, L_harden, correct) per step and the last lr."""
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    every_step = checks_every_step(train_x.device)
    healthy, last = torch.ones((), dtype=torch.bool, device=train_x.device), None
    # Each epoch's batch order and region leaks are seeded by (seed, epoch): --resume replays them,
    # and all three models see the same batches.
    g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    torch.manual_seed(args.seed * 100_003 + epoch)
    order = torch.randperm(len(train_x), generator=g).to(train_x.device)
    losses, entropies, correct = [], [], []
    for i in tqdm(range(steps_per_epoch), desc=f"{name} {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True):
        step = epoch * steps_per_epoch + i
        progress = step / total_steps
        lr = 0.5 * args.lr * (1 + math.cos(math.pi * progress))  # cosine decay from --lr to 0

        def check(loss, L_pred, grad_norm):
            nonlocal last
            last = (L_pred, grad_norm, step)
            healthy.logical_and_(torch.isfinite(loss) & (L_pred < EXPLODED) & torch.isfinite(grad_norm))
            if every_step or i % args.log_interval == 0:
                stop_if_diverged(healthy, name, *last, path)

        L_pred, L_harden, right = train_step(model, fwd, optimizer, *get_batch(train_x, train_y, order, i, args), lr,
                                             hardening(progress, args), args, check)
        losses.append(L_pred)  # logged: the cross-entropy alone, comparable across models
        entropies.append(L_harden)
        correct.append(right)
    stop_if_diverged(healthy, name, *last, path)  # never a checkpoint of diverged weights
    return losses, entropies, correct, lr


def resume_or_start(name, cfg, args, device):
    """Model `name` (weights seeded by --seed), its optimiser and where its training stands: the
    checkpoint's state with --resume, the shipped weights with --pretrained (fine-tuning from epoch 0),
    else fresh. -> (model, optimizer, epoch, train_time)"""
    path = ckpt_path(args.out_dir, name)
    ckpt = load_checkpoint(path, device) if args.resume and path.exists() else None
    torch.manual_seed(args.seed)
    model = build(name, cfg).to(device)
    optimizer = adam(model, args)
    if ckpt is None:
        if args.pretrained:
            model.load_state_dict(load_pretrained(name, cfg))
        return model, optimizer, 0, 0.0
    if ckpt["config"] != cfg:
        raise SystemExit(f"fff: {path} holds sizes {ckpt['config']}, not {cfg}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    return model, optimizer, ckpt["epoch"], ckpt["train_time"]


@contextmanager
def run_log(out, name, epoch, args):
    """log_<name>.csv (and W&B with --wandb) for the epochs to come -> log(row, step); on Ctrl-C, one
    line about what was kept, exit 130."""
    log_file, writer = open_log(out / f"log_{name}.csv", epoch)
    if args.wandb:
        try:
            import wandb
        except ImportError:
            raise SystemExit("fff: --wandb needs the wandb package (pip install wandb)")
        wandb.init(project="papers-fff", name=name, config={**vars(args), "model": name}, dir=out, reinit=True)

    def log(row, step):
        writer.writerow(row)
        log_file.flush()
        if args.wandb:
            wandb.log(row, step=step)
    try:
        yield log
    except KeyboardInterrupt:
        print(f"\ninterrupted; {name}'s last checkpoint is {ckpt_path(out, name)} (end of an epoch), if any: "
              f"continue with --resume")
        raise SystemExit(130)
    finally:
        log_file.close()
        if args.wandb:
            wandb.finish()


def train_one(name, cfg, data, args, device):
    """One model: per epoch a pass with the cosine lr and (FFF) the hardening ramp, validation accuracy
    (FFF: soft and hard), an atomic checkpoint and a row of log_<name>.csv."""
    model, optimizer, epoch, train_time = resume_or_start(name, cfg, args, device)
    fwd = torch.compile(model) if args.compile else model
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {model.inference_flops():,} "
          f"multiply-adds per sample at inference" + (f"; resuming after epoch {epoch}" if epoch else ""))
    train_x, train_y = data["train"]
    total_steps = args.epochs * math.ceil(len(train_x) / args.batch_size)
    path = ckpt_path(args.out_dir, name)
    with run_log(Path(args.out_dir), name, epoch, args) if epoch < args.epochs else nullcontext() as log:
        for epoch in range(epoch, args.epochs):
            t0 = time.perf_counter()
            losses, entropies, correct, lr = train_epoch(epoch, name, model, fwd, optimizer, train_x, train_y,
                                                         total_steps, path, args)
            train_time += time.perf_counter() - t0
            row = {"epoch": epoch + 1, "train_loss": torch.stack(losses).mean().item(),
                   "train_acc": torch.stack(correct).sum().item() / len(train_x), "lr": lr,
                   "val_acc": accuracy(model, *data["val"], "soft"), "elapsed_s": round(train_time, 2)}
            if name == "fff":
                row["node_entropy"] = torch.stack(entropies).mean().item() / model.n_nodes  # mean per node
                row["val_acc_hard"] = accuracy(model, *data["val"], "hard")
            save_atomic({"folder": FOLDER, "name": name, "model": model.state_dict(), "config": cfg,
                         "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "args": vars(args),
                         "train_time": train_time, "val_acc": row["val_acc"]}, path)
            log(row, epoch + 1)
            hard = f" (hard {row['val_acc_hard']:.4f}, node entropy {row['node_entropy']:.3f})" if name == "fff" else ""
            tqdm.write(f"{name} epoch {epoch + 1:3d}  loss {row['train_loss']:.4f}  val acc {row['val_acc']:.4f}{hard}"
                       f"  {train_time:.0f} s")


def peak_flops(device):
    """The GPU's dense bf16 peak (for MFU), or None when it is not in the table (CPU, MPS, other GPUs)."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    return next((f for k, f in PEAK_BF16_FLOPS.items() if re.search(rf"\b{k}\b", name)), None)


def training_flops(name, cfg, batch_size, args):
    """FLOPs of one training forward and backward pass per sample (the FFF in soft mode: every leaf),
    counted by FlopCounterMode on the meta device (matmuls only: biases and elementwise ops are not counted)."""
    with torch.device("meta"):
        model, x = build(name, cfg), torch.zeros(batch_size, cfg["in_dim"])
        y = torch.zeros(batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        logits, H = model(x, mode="soft")
        (fff_loss(logits, y, H, 1.0)[0] if H is not None else F.cross_entropy(logits, y)).backward()
    return counter.get_total_flops() / batch_size


def benchmark(args):
    """--benchmark: the first of --models (default the FFF), its optimiser and the training step (batches by
    index where the data live), 3 warm-up steps, then the median of --benchmark-steps timed optimiser steps.
    Real training images when the IDX files are in --data-dir (nothing is downloaded), else random ones.
    Prints one JSON line; writes nothing."""
    device, name = resolve_device(args.device), args.models[0]
    tf32(device)
    raw = Path(args.data_dir) / DATASETS[args.dataset] / "raw"
    real = all((raw / f).is_file() or (raw / f"{f}.gz").is_file()
               for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                         "t10k-labels-idx1-ubyte"))
    if real:
        train_x, train_y = (t.to(device) for t in load_data(args)["train"])
    else:
        n = args.train_size or 60_000 - args.val_size
        train_x = torch.randint(0, 256, (n, 784), dtype=torch.uint8, device=device)
        train_y = torch.randint(0, 10, (n,), device=device)
    train_x = training_pixels(train_x, args.dataset)
    cfg = {"in_dim": train_x.shape[1], "leaf_width": args.leaf_width, "out_dim": 10, "depth": args.depth}
    torch.manual_seed(args.seed)
    model = build(name, cfg).to(device)
    optimizer = adam(model, args)
    fwd = torch.compile(model) if args.compile else model
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed)).to(device)
    steps = len(train_x) // args.batch_size
    healthy = torch.ones((), dtype=torch.bool, device=device)
    cuda = device.startswith("cuda")

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)

    def check(loss, L_pred, grad_norm):  # what training folds in every step, without reading it
        healthy.logical_and_(torch.isfinite(loss) & (L_pred < EXPLODED) & torch.isfinite(grad_norm))

    warmup, times = 3, []
    for i in range(warmup + args.benchmark_steps):
        synchronize()
        t0 = time.perf_counter()
        train_step(model, fwd, optimizer, *get_batch(train_x, train_y, order, i % steps, args), args.lr,
                   args.hardening, args, check)
        synchronize()
        times.append(time.perf_counter() - t0)
    step_s, B = statistics.median(times[warmup:]), args.batch_size
    flops, peak = training_flops(name, cfg, B, args), peak_flops(device)
    print(json.dumps({
        "folder": FOLDER, "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters()),
        "device": f"cuda:{torch.device(device).index or 0} {torch.cuda.get_device_name(device)}" if cuda else device,
        "batch_size": B, "unit": "images", "samples_per_s": B / step_s, "step_ms": step_s * 1e3,
        "flops_per_sample": flops, "tflops": flops * B / step_s / 1e12,
        "mfu": flops * B / step_s / peak if peak else None,
        "peak_mem_mb": (torch.cuda.max_memory_allocated(device) if cuda
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        "compile": bool(args.compile), "data": "real" if real else "random", "model": name}))


def train(args):
    device = resolve_device(args.device)
    out = Path(args.out_dir)
    existing = [ckpt_path(out, n) for n in args.models if ckpt_path(out, n).exists()]
    if existing and not args.resume and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"fff: {existing[0]} exists; pass --resume to continue, or another --out-dir")
    tf32(device)
    # All of it on the device once; the validation split standardised once.
    data = {k: (x.to(device), y.to(device)) for k, (x, y) in load_data(args).items()}
    data["train"] = (training_pixels(data["train"][0], args.dataset), data["train"][1])
    data["val"] = (normalize(data["val"][0], args.dataset), data["val"][1])
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"in_dim": data["train"][0].shape[1], "leaf_width": args.leaf_width, "out_dim": 10, "depth": args.depth}
    print(f"{args.dataset}: {len(data['train'][0]):,} train / {len(data['val'][0]):,} val images on {device}; "
          f"FFF depth {args.depth} ({2 ** args.depth} leaves of width {args.leaf_width}), hardening h = {args.hardening}")
    for name in args.models:
        train_one(name, cfg, data, args, device)
