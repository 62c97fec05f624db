"""Train Real NVP by maximum likelihood: data, model, optimiser, schedule, then the loop over
epochs; the loss is the bits/dim of freshly dequantised training images, and after each epoch
the test set's bits/dim and an atomic checkpoint."""
import contextlib
import csv
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from data import SIDE, dequantize, load_data
from model import FlowConfig, RealNVP
from pretrained import load_pretrained

FOLDER = "nf"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/nf-quick"  # the one place a fresh (--quick) run may overwrite a checkpoint
LOG_FIELDS = ["epoch", "train_bpd", "test_bpd", "lr", "images_per_s", "elapsed_s"]
TEST_NOISE_SEED = 1234  # the test set's dequantisation noise: the same every epoch, so epochs compare


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"nf: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("nf: --device mps, but MPS is not available here (try --device cpu)")
    return name


def load_checkpoint(path, device):
    if not path.is_file():
        raise SystemExit(f"nf: no checkpoint at {path}; train first, or pass the --out-dir of an nf run")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise SystemExit(f"nf: {path} is not a readable checkpoint ({type(e).__name__})")
    folder = ckpt.get("folder") if isinstance(ckpt, dict) else None
    if folder != FOLDER:
        raise SystemExit(f"nf: {path} is a checkpoint of {folder or 'something else'}, not of nf/")
    return ckpt


def save_atomic(obj, path):
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def get_lr(step, total_steps, warmup_steps, args):
    """Linear warmup to --lr, then cosine decay to zero at the end of training."""
    if step < warmup_steps:
        return args.lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) * args.lr


def model_config(args, channels=1, side=SIDE):
    return FlowConfig(channels=channels, side=side, n_couplings=args.n_couplings, scales=args.scales,
                      hidden=args.hidden, blocks=args.blocks, alpha=args.alpha)


def memory_needed(cfg, batch_size):
    """Bytes a training step needs, counted on the meta device, where nothing is allocated: 16 a
    parameter (weights, gradients, Adam's two moments) and 4 an activation the backward pass keeps
    (roughly: every layer's output for one batch)."""
    outputs = []
    with torch.device("meta"):
        model = RealNVP(cfg)
        for m in model.modules():
            if not list(m.children()):
                m.register_forward_hook(lambda m, inputs, out: outputs.append(sum(o.numel() for o in out)
                                                                              if isinstance(out, tuple) else out.numel()))
        model(torch.zeros(batch_size, cfg.channels, cfg.side, cfg.side))
    return 16 * model.num_params() + 4 * sum(outputs)


def check_memory(args, device):
    """Refuse a model the device cannot hold, before any data is read or anything allocated."""
    try:
        need = memory_needed(model_config(args), args.batch_size)
    except ValueError as e:  # couplings too few for the scales, a side the squeezes do not divide
        raise SystemExit(f"nf: {e}")
    have = torch.cuda.mem_get_info(device)[0] if device.startswith("cuda") else \
        os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise SystemExit(f"nf: --hidden {args.hidden} --blocks {args.blocks} --n-couplings {args.n_couplings} "
                         f"--batch-size {args.batch_size} needs about {need / 2 ** 30:,.0f} GiB of memory for weights, "
                         f"optimiser state and activations ({device} has {have / 2 ** 30:,.0f} GiB); choose a smaller "
                         f"model or batch")


def build_model(cfg):
    try:
        return RealNVP(cfg)
    except ValueError as e:  # couplings too few for the scales, a side the squeezes do not divide
        raise SystemExit(f"nf: {e}")


def on_device(model, args, device):
    """The model on `device` and what a training step runs: on CUDA channels_last conv weights (the convs'
    outputs follow them; kept off on the CPU, where it is faster but rounds differently: README, Speed) and
    TF32; fused Adam (one kernel, and no per-step .item() of Adam's step count; Adam with L2, as before, not
    AdamW); with --compile a torch.compile'd bits/dim. No bf16 autocast: the log-determinants are sums of
    thousands of s values (README, Speed)."""
    model = model.to(device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        model = model.to(memory_format=torch.channels_last)
    fused = device.startswith("cuda") or device == "cpu" or None
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=fused)
    return model, (torch.compile(model.bits_per_dim) if args.compile else model.bits_per_dim), optimizer


def clip_grad_norm(parameters, max_norm):
    """torch.nn.utils.clip_grad_norm_'s maths (the same ops, so the same bits) without its per-tensor
    .to(device) calls: the global gradient norm, and the gradients scaled by min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in parameters if p.grad is not None]
    grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    torch._foreach_mul_(grads, torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0))
    return grad_norm


def train_step(model, bits_per_dim, optimizer, x, lr, args, check=None):
    """One optimiser step of maximum likelihood with no host sync: bits/dim, gradient (clipped to
    --grad-clip), `check(loss, grad_norm)` when given, then Adam at `lr`. Returns the loss (a tensor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = bits_per_dim(x).mean()                               # maximum likelihood, in bits/dim
    loss.backward()
    grad_norm = clip_grad_norm(model.parameters(), args.grad_clip if args.grad_clip > 0 else math.inf)  # > 0: clips
    if check:
        check(loss, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def evaluate(model, images, device, batch_size=500):
    """Mean bits/dim of uint8 images, dequantised with fixed noise, in eval mode."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(TEST_NOISE_SEED)
    bpd = torch.cat([model.bits_per_dim(dequantize(images[i:i + batch_size].to(device), g))
                     for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return bpd.mean().item()                                    # the one host sync of the evaluation


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
        raise SystemExit(f"nf: the loss became non-finite ({loss.item():g}, gradient norm {grad_norm.item():g}) "
                         f"at step {step}; stopping before the update ({kept(ckpt_path)}); try a lower --lr")


def check_savable(model, test_bpd, epoch, ckpt_path):
    """The last guard before a checkpoint: finite weights and a finite test bits/dim."""
    if not (math.isfinite(test_bpd) and all(torch.isfinite(p).all() for p in model.parameters())):
        raise SystemExit(f"nf: the weights or the test bits/dim ({test_bpd:g}) became non-finite in epoch {epoch}; "
                         f"stopping without saving ({kept(ckpt_path)}); try a lower --lr")


def refuse_or_resume(args, ckpt_path, device):
    """The checkpoint to continue with --resume (None for a fresh run); a fresh run never overwrites one."""
    ckpt = load_checkpoint(ckpt_path, device) if args.resume else None
    if ckpt is None and ckpt_path.exists() and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"nf: {ckpt_path} exists; pass --resume to continue it, or another --out-dir")
    return ckpt


def match_layout(optimizer):
    """Adam's moments from a checkpoint in their parameter's memory layout (a CUDA run saves channels_last
    ones, a CPU run not): fused Adam walks each parameter and its moments in memory order."""
    for p, state in optimizer.state.items():
        for k, v in state.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                state[k] = torch.empty_like(p).copy_(v)


def start_run(args):
    """Everything the loop needs, as a namespace: the data (training images on the device), the flow, Adam,
    and where a resumed run stands (or the shipped weights, with --pretrained)."""
    device = resolve_device(args.device)
    run = SimpleNamespace(device=device, dir=Path(args.out_dir), ckpt_path=Path(args.out_dir) / "ckpt.pt", epoch=0)
    ckpt = refuse_or_resume(args, run.ckpt_path, device)
    check_memory(args, device)
    data = load_data(args)
    run.train_set, run.test_set = data["train"].to(device), data["test"]  # uint8, on the device for the whole run

    cfg = model_config(args, run.train_set.shape[1], run.train_set.shape[2])
    if ckpt and asdict(cfg) != ckpt["config"]:
        raise SystemExit(f"nf: {run.ckpt_path} holds another model ({ckpt['config']}); "
                         f"resume without model flags, or train it in another --out-dir")
    torch.manual_seed(args.seed)
    run.model, run.bits_per_dim, run.optimizer = on_device(build_model(cfg), args, device)
    if ckpt:
        run.model.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        match_layout(run.optimizer)
        run.epoch = ckpt["epoch"]
    elif args.pretrained:                                       # fine-tuning: the shipped weights, a new Adam
        run.model.load_state_dict(load_pretrained(args.dataset, cfg))
    else:  # actnorm's data-dependent initialisation, on the first 512 training images
        run.model.initialize(dequantize(run.train_set[:512], torch.Generator().manual_seed(args.seed)))
    run.cfg, run.train_time = cfg, ckpt["train_time"] if ckpt else 0.0
    run.steps_per_epoch = len(run.train_set) // args.batch_size  # the last partial batch of each epoch is dropped
    if run.steps_per_epoch == 0:
        raise SystemExit(f"nf: --batch-size {args.batch_size} exceeds the {len(run.train_set)} training images")
    run.total_steps = args.epochs * run.steps_per_epoch
    run.dir.mkdir(parents=True, exist_ok=True)
    print_model(args, run, ckpt)
    return run


def print_model(args, run, ckpt):
    cfg = run.cfg
    k, last = RealNVP.layout(cfg.n_couplings, cfg.scales)
    layout = (f"{cfg.scales} scales of {k} checkerboard + {k} channel-wise, then {last} checkerboard" if cfg.scales
              else "one flat stack of checkerboard couplings")
    print(f"Real NVP: {run.model.num_params():,} parameters, {cfg.n_couplings} couplings ({layout}), ResNets of "
          f"{cfg.blocks} blocks x {cfg.hidden}; {args.dataset}: {len(run.train_set):,} train / {len(run.test_set):,} "
          f"test images on {run.device}" + (f"; resuming after epoch {run.epoch}" if ckpt else "")
          + ("; starting from the shipped weights" if args.pretrained else ""))


def start_wandb(args, out):
    try:
        import wandb
        wandb.init(project="papers-nf", config=vars(args), dir=out)
        return wandb
    except ImportError:
        raise SystemExit("nf: --wandb needs the wandb package (pip install wandb)")
    except Exception as e:  # not logged in, no network: say so in one line
        raise SystemExit(f"nf: --wandb could not start ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


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
    """After an epoch: the test set's bits/dim, the guard against non-finite numbers, an atomic checkpoint,
    a row of log.csv (and wandb), a line on the terminal."""
    run.train_time += dt
    row = {"epoch": done, "train_bpd": torch.stack(losses).mean().item(),
           "test_bpd": evaluate(run.model, run.test_set, run.device), "lr": lr,
           "images_per_s": run.steps_per_epoch * args.batch_size / dt, "elapsed_s": run.train_time}
    check_savable(run.model, row["test_bpd"], done, run.ckpt_path)
    save_atomic({"folder": FOLDER, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "epoch": done, "config": asdict(run.cfg), "args": vars(args), "test_bpd": row["test_bpd"],
                 "train_time": run.train_time}, run.ckpt_path)
    run.log.writerow(row)
    run.log_file.flush()
    tqdm.write(f"epoch {done:3d}  train {row['train_bpd']:.4f}  test {row['test_bpd']:.4f} bits/dim  "
               f"lr {lr:.1e}  {row['images_per_s']:,.0f} images/s  {run.train_time:.0f} s")
    if run.wandb:
        run.wandb.log(row, step=done)


def train(args):
    """Maximum likelihood (Sec. 3.1): for each batch of freshly dequantised training images x, a gradient step
    on the bits/dim -log p_X(x) / (D log 2) (+ the 1/256 bins), Adam with warmup + cosine; after each epoch
    the test bits/dim and a checkpoint (end_epoch)."""
    run = start_run(args)
    with logged(args, run):
        for epoch in range(run.epoch, args.epochs):
            # The batch order and the dequantisation noise of an epoch are seeded by (seed, epoch):
            # resuming replays them exactly.
            # On CUDA both are drawn there (a CUDA generator: other numbers than the CPU's, as reproducible).
            g = torch.Generator(run.device).manual_seed(args.seed * 100_003 + epoch)
            order = torch.randperm(len(run.train_set), generator=g, device=run.device)
            t0, losses = time.perf_counter(), []
            pbar = tqdm(range(run.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", dynamic_ncols=True,
                        leave=False)
            for s in pbar:
                step = epoch * run.steps_per_epoch + s
                lr = get_lr(step, run.total_steps, args.warmup_steps, args)
                x = dequantize(run.train_set[order[s * args.batch_size:(s + 1) * args.batch_size]], g)  # Sec. 4.1
                log_step = s % args.log_interval == 0
                # The finiteness check syncs: every step on the CPU (free there), at log steps elsewhere;
                # check_savable still keeps a non-finite state out of every checkpoint.
                check = (lambda l, gn: check_finite(l, gn, step, run.ckpt_path)) if run.device == "cpu" or log_step \
                    else None
                losses.append(train_step(run.model, run.bits_per_dim, run.optimizer, x, lr, args, check))
                if log_step:
                    pbar.set_postfix(bpd=f"{losses[-1].item():.3f}", lr=f"{lr:.1e}")
            end_epoch(args, run, epoch + 1, losses, lr, time.perf_counter() - t0)
    return run.model
