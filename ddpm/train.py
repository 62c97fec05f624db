"""Train eps_theta with Algorithm 1: data, model and its EMA copy, AdamW, warmup + cosine, then
the loop over epochs; after each epoch the EMA model's loss on fixed test noise and an atomic
checkpoint."""
import contextlib
import copy
import csv
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from data import SIDE, load_split, to_model_range
from model import Diffusion, UNet, UNetConfig, rename_old_keys
from pretrained import load_pretrained

FOLDER = "ddpm"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/ddpm-quick"  # the one place a fresh (--quick) run may overwrite a checkpoint
LOG_FIELDS = ["epoch", "train_loss", "test_loss", "lr", "images_per_s", "elapsed_s"]
TEST_IMAGES, TEST_SEED = 2000, 1234  # the test loss: the same images, t and eps every epoch


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"ddpm: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("ddpm: --device mps, but MPS is not available here (try --device cpu)")
    return name


def load_checkpoint(path, device, kind="diffusion", dataset=None):
    """A checkpoint of this folder, of `kind` (the diffusion model or the evaluation classifier),
    trained on `dataset` when one is given; anything else is a one-line error."""
    if not path.is_file():
        raise SystemExit(f"ddpm: no checkpoint at {path}; train first (python ddpm/main.py --dataset "
                         f"{dataset or 'mnist'}), or pass the --out-dir of a ddpm run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"ddpm: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER or ckpt.get("kind") != kind:
        found = "something else" if not folder else f"a {folder}/ checkpoint" if folder != FOLDER else \
            f"the ddpm/ {ckpt.get('kind')}"
        raise SystemExit(f"ddpm: {path} holds {found}, not a ddpm/ {kind} checkpoint")
    if dataset and ckpt["dataset"] != dataset:
        raise SystemExit(f"ddpm: {path} was trained on {ckpt['dataset']}, not on {dataset}; "
                         f"pass --dataset {ckpt['dataset']}, or another --out-dir")
    for key in ("model", "ema"):                                # checkpoints from before the middle blocks had names
        if key in ckpt:
            ckpt[key] = rename_old_keys(ckpt[key])
    return ckpt


def save_atomic(obj, path):
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def get_lr(step, total_steps, warmup_steps, lr):
    """Linear warmup to lr, then cosine decay to zero at the end of training."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * lr


def model_config(args, side):
    return UNetConfig(side=side, base=args.base, mults=tuple(args.mults), res_blocks=args.res_blocks,
                      attn_levels=tuple(args.attn_levels), dropout=args.dropout)


def memory_needed(cfg, batch_size):
    """Bytes a training step needs, counted on the meta device, where nothing is allocated: 20 a
    parameter (weights, gradients, Adam's two moments, the EMA copy) and 4 an activation the
    backward pass keeps (roughly: every layer's output for one batch)."""
    outputs = []
    with torch.device("meta"):
        model = UNet(cfg)
        for m in model.modules():
            if not list(m.children()):
                m.register_forward_hook(lambda m, inputs, out: outputs.append(out.numel()))
        model(torch.zeros(batch_size, cfg.channels, cfg.side, cfg.side), torch.zeros(batch_size, dtype=torch.long))
    return 20 * model.num_params() + 4 * sum(outputs)


def check_memory(args, device):
    """Refuse a model the device cannot hold, before any data is read or anything allocated."""
    try:
        need = memory_needed(model_config(args, SIDE), args.batch_size)
    except ValueError as e:  # a side the down-samplings do not divide
        raise SystemExit(f"ddpm: {e}")
    have = torch.cuda.mem_get_info(device)[0] if device.startswith("cuda") else \
        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise SystemExit(f"ddpm: --base {args.base} --mults {' '.join(map(str, args.mults))} --batch-size "
                         f"{args.batch_size} needs about {need / 2 ** 30:,.0f} GiB of memory for weights, optimiser "
                         f"state and activations ({device} has {have / 2 ** 30:,.0f} GiB); choose a smaller model "
                         f"or batch")


def build_model(cfg):
    try:
        return UNet(cfg)
    except ValueError as e:  # a side the down-samplings do not divide
        raise SystemExit(f"ddpm: {e}")


def on_device(model, args, device):
    """The model on `device` and what a training step runs: fused AdamW (one kernel, and no per-step
    .item() of Adam's step count), on CUDA also TF32 matmuls, channels_last convs and bf16 autocast; with
    --compile, torch.compile'd eps_theta (the state dict stays `model`'s)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = model.to(device, memory_format=torch.channels_last if cuda else torch.preserve_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=cuda or device == "cpu" or None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    return model, (torch.compile(model) if args.compile else model), optimizer, autocast


def batch(x_train, idx, device):
    """uint8 images already on the device -> a batch in [-1, 1] (channels_last on CUDA, for the convs)."""
    x_0 = to_model_range(x_train[idx])
    return x_0.contiguous(memory_format=torch.channels_last) if device.startswith("cuda") else x_0


def train_step(model, eps_theta, ema, diffusion, optimizer, autocast, x_0, step, lr, args, check=None):
    """One optimiser step of Algorithm 1 with no host sync: loss, gradient (clipped to --grad-clip),
    `check(loss, grad_norm)` when given, AdamW at `lr`, then the EMA. Returns the loss (a tensor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        loss = diffusion.loss(eps_theta, x_0)                   # Algorithm 1, lines 2-5
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),  # clips only with --grad-clip > 0
                                               args.grad_clip if args.grad_clip > 0 else math.inf)
    if check:
        check(loss, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(ema, model, step, args.ema_decay)
    return loss.detach()


@torch.no_grad()
def ema_update(ema, model, step, decay):
    """theta_ema <- d theta_ema + (1 - d) theta, with d warmed up as (1 + step) / (10 + step): the
    average forgets its random initialisation within the first few hundred steps."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)


@torch.no_grad()
def test_loss(model, diffusion, x_0, device, batch_size=500):
    """L_simple on test images with t and eps drawn from a fixed seed: comparable across epochs."""
    g = torch.Generator().manual_seed(TEST_SEED)
    t = torch.randint(0, diffusion.T, (len(x_0),), generator=g)
    eps = torch.randn(x_0.shape, generator=g)
    total = torch.zeros((), device=device)                     # summed on the device: one sync at the end
    for i in range(0, len(x_0), batch_size):
        x, tt, e = (v[i:i + batch_size].to(device) for v in (x_0, t, eps))
        total += torch.nn.functional.mse_loss(model(diffusion.q_sample(x, tt, e), tt).float(), e, reduction="sum")
    return total.item() / eps.numel()


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


def kept(ckpt_path):
    return f"the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"


def check_finite(loss, grad_norm, step, ckpt_path):
    """Stop before a non-finite loss or gradient reaches the weights (and so the checkpoint)."""
    if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
        raise SystemExit(f"ddpm: the loss became non-finite ({loss.item():g}, gradient norm {grad_norm.item():g}) "
                         f"at step {step}; stopping before the update ({kept(ckpt_path)}); try a lower --lr")


def check_savable(model, ema, held_out, epoch, ckpt_path):
    """The last guard before a checkpoint: finite weights and a finite test loss."""
    if not (math.isfinite(held_out) and all(torch.isfinite(p).all() for m in (model, ema) for p in m.parameters())):
        raise SystemExit(f"ddpm: the weights or the test loss ({held_out:g}) became non-finite in epoch {epoch}; "
                         f"stopping without saving ({kept(ckpt_path)}); try a lower --lr")


def refuse_or_resume(args, ckpt_path, device):
    """The checkpoint to continue with --resume (None for a fresh run); a fresh run never overwrites one."""
    ckpt = load_checkpoint(ckpt_path, device, dataset=args.dataset) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"ddpm: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    return ckpt


def start_run(args):
    """Everything the loop needs, as a namespace: the data on the device, the U-Net, its EMA copy, the
    diffusion, AdamW, and where a resumed run stands (or the shipped weights, with --pretrained)."""
    device = resolve_device(args.device)
    run = SimpleNamespace(device=device, dir=Path(args.run_dir), ckpt_path=Path(args.run_dir) / "ckpt.pt", epoch=0)
    ckpt = refuse_or_resume(args, run.ckpt_path, device)
    check_memory(args, device)
    run.x_train = load_split(args.data_dir, args.dataset, "train")[0][:args.train_size or None].to(device)  # uint8
    run.x_test = to_model_range(load_split(args.data_dir, args.dataset, "test")[0][:TEST_IMAGES])

    cfg = model_config(args, run.x_train.shape[-1])
    if ckpt and asdict(cfg) != ckpt["config"]:
        raise SystemExit(f"ddpm: {run.ckpt_path} holds another model ({ckpt['config']}); "
                         f"resume without model flags, or train it in another --out-dir")
    torch.manual_seed(args.seed)
    model, run.eps_theta, run.optimizer, run.autocast = on_device(build_model(cfg), args, device)
    if args.pretrained:                                         # fine-tuning: the shipped EMA weights, a new AdamW
        model.load_state_dict(load_pretrained(args.dataset, cfg))
    run.model, run.ema = model, copy.deepcopy(model).eval().requires_grad_(False)  # sampling uses the EMA (Sec. 4)
    run.diffusion = Diffusion(args.T, args.schedule).to(device)
    if ckpt:
        model.load_state_dict(ckpt["model"])
        run.ema.load_state_dict(ckpt["ema"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.epoch = ckpt["epoch"]
    run.cfg, run.train_time = cfg, ckpt["train_time"] if ckpt else 0.0
    run.steps_per_epoch = len(run.x_train) // args.batch_size  # the last partial batch of each epoch is dropped
    if run.steps_per_epoch == 0:
        raise SystemExit(f"ddpm: --batch-size {args.batch_size} exceeds the {len(run.x_train)} training images")
    run.total_steps = args.epochs * run.steps_per_epoch
    run.dir.mkdir(parents=True, exist_ok=True)
    print(f"DDPM: U-Net of {model.num_params():,} parameters, T = {args.T} ({args.schedule} betas); "
          f"{args.dataset}: {len(run.x_train):,} training images on {device}"
          + (" (bf16 autocast)" if device.startswith("cuda") else "")
          + (f"; resuming after epoch {run.epoch}" if ckpt else "")
          + ("; starting from the shipped weights" if args.pretrained else ""))
    return run


def start_wandb(args, run_dir):
    try:
        import wandb
        wandb.init(project="papers-ddpm", config=vars(args), dir=run_dir)
        return wandb
    except ImportError:
        raise SystemExit("ddpm: --wandb needs the wandb package (pip install wandb)")
    except Exception as e:  # not logged in, no network: say so in one line
        raise SystemExit(f"ddpm: --wandb could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


@contextlib.contextmanager
def logged(args, run):
    """log.csv (and wandb) open around the loop; Ctrl-C keeps the last epoch's checkpoint and says so."""
    run.wandb = start_wandb(args, run.dir) if args.wandb else None
    run.log_file, run.log = open_log(run.dir / "log.csv", run.epoch)
    if run.epoch >= args.epochs:
        print(f"{run.ckpt_path} is at epoch {run.epoch}, which is not below --epochs {args.epochs}: nothing to train")
    run.model.train()
    try:
        yield
    except KeyboardInterrupt:
        if run.ckpt_path.exists():
            print(f"\ninterrupted; the last checkpoint ({run.ckpt_path}) is from the end of an epoch: "
                  f"continue with --resume")
        else:
            print("\ninterrupted before the first epoch ended; nothing was saved")
        raise SystemExit(130)
    finally:
        run.log_file.close()
        if run.wandb:
            run.wandb.finish()


def end_epoch(args, run, done, losses, lr, dt):
    """After an epoch: the EMA model's test loss, the guard against non-finite numbers, an atomic
    checkpoint, a row of log.csv (and wandb), a line on the terminal."""
    run.train_time += dt
    with run.autocast:
        held_out = test_loss(run.ema, run.diffusion, run.x_test, run.device)
    check_savable(run.model, run.ema, held_out, done, run.ckpt_path)
    row = {"epoch": done, "train_loss": torch.stack(losses).mean().item(), "test_loss": held_out,
           "lr": lr, "images_per_s": run.steps_per_epoch * args.batch_size / dt, "elapsed_s": run.train_time}
    save_atomic({"folder": FOLDER, "kind": "diffusion", "dataset": args.dataset, "model": run.model.state_dict(),
                 "ema": run.ema.state_dict(), "optimizer": run.optimizer.state_dict(), "epoch": done,
                 "config": asdict(run.cfg), "args": vars(args), "train_time": run.train_time}, run.ckpt_path)
    run.log.writerow(row)
    run.log_file.flush()
    tqdm.write(f"epoch {done:3d}  train loss {row['train_loss']:.4f}  test loss (EMA) {held_out:.4f}  "
               f"lr {lr:.1e}  {row['images_per_s']:,.0f} images/s  {dt:.0f} s/epoch  {run.train_time:.0f} s")
    if run.wandb:
        run.wandb.log(row, step=done)


def train(args):
    """Algorithm 1, repeated until --epochs: x_0 ~ q(x_0) (a batch of training images), t ~ Uniform({1..T}),
    eps ~ N(0, I), a gradient step on ||eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t)||^2,
    then the EMA of the weights; after each epoch the test loss and a checkpoint (end_epoch)."""
    run = start_run(args)
    with logged(args, run):
        for epoch in range(run.epoch, args.epochs):
            # Batch order, t, eps and dropout of an epoch are seeded by (seed, epoch): resuming replays them.
            torch.manual_seed(args.seed * 100_003 + epoch)
            order = torch.randperm(len(run.x_train)).to(run.device)
            t0, losses = time.perf_counter(), []
            pbar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True,
                        leave=False)
            for s in pbar:                                      # repeat
                step = epoch * run.steps_per_epoch + s
                lr = get_lr(step, run.total_steps, args.warmup_steps, args.lr)
                x_0 = batch(run.x_train, order[s * args.batch_size:(s + 1) * args.batch_size], run.device)  # line 2
                log_step = s % args.log_interval == 0
                # The finiteness check syncs: every step on the CPU (free there), at log steps elsewhere;
                # check_savable still keeps a non-finite state out of every checkpoint.
                check = (lambda l, g: check_finite(l, g, step, run.ckpt_path)) if run.device == "cpu" or log_step \
                    else None
                losses.append(train_step(run.model, run.eps_theta, run.ema, run.diffusion, run.optimizer,  # lines 3-5
                                         run.autocast, x_0, step, lr, args, check))
                if log_step:
                    pbar.set_postfix(loss=f"{losses[-1].item():.4f}", lr=f"{lr:.1e}")
            end_epoch(args, run, epoch + 1, losses, lr, time.perf_counter() - t0)
    return run.ema
