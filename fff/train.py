"""Train the FFF and its two dense baselines, one after the other, on the same data,
batches and schedule: the loss (cross-entropy plus, for the FFF, the hardening term),
validation accuracy after each epoch, an atomic checkpoint per model and epoch."""
import csv
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import load_data
from model import FF, FFF

FOLDER = "fff"  # stamped into checkpoints, so that another folder's checkpoint is refused
QUICK_OUT_DIR = "runs/fff-quick"  # the one place a fresh (--quick) run may overwrite checkpoints
MODELS = ("fff", "ff_train", "ff_infer")  # the FFF, dense of equal training width, dense of equal inference width
CHECK_EVERY = 50  # on CUDA, steps between divergence checks (each waits for the GPU); on CPU every step
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


def build(name, cfg):
    """cfg: in_dim, leaf_width, out_dim, depth (the FFF's sizes; the baselines derive theirs)."""
    I, l, O, d = cfg["in_dim"], cfg["leaf_width"], cfg["out_dim"], cfg["depth"]
    return {"fff": lambda: FFF(I, l, O, d), "ff_train": lambda: FF(I, l * 2 ** d, O),
            "ff_infer": lambda: FF(I, l, O)}[name]()


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
    """CSV of one model's run; on resume, rows past the checkpoint are dropped first."""
    rows = []
    if resume_epoch and path.is_file():
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return f, writer


def train_one(name, cfg, data, args, device):
    out = Path(args.out_dir)
    path = ckpt_path(out, name)
    ckpt = load_checkpoint(path, device) if args.resume and path.exists() else None
    torch.manual_seed(args.seed)
    model = build(name, cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    epoch, train_time = 0, 0.0
    if ckpt:
        if ckpt["config"] != cfg:
            raise SystemExit(f"fff: {path} holds sizes {ckpt['config']}, not {cfg}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        epoch, train_time = ckpt["epoch"], ckpt["train_time"]
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n_params:,} parameters, {model.inference_flops():,} multiply-adds per sample at inference"
          + (f"; resuming after epoch {epoch}" if ckpt else ""))
    if epoch >= args.epochs:
        return
    train_x, train_y = data["train"]
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    is_fff = name == "fff"
    log_file, log = open_log(out / f"log_{name}.csv", epoch)
    healthy = torch.ones((), dtype=torch.bool, device=device)  # no non-finite or exploded loss yet
    if args.wandb:
        try:
            import wandb
        except ImportError:
            raise SystemExit("fff: --wandb needs the wandb package (pip install wandb)")
        wandb.init(project="papers-fff", name=name, config={**vars(args), "model": name}, dir=out, reinit=True)
    try:
        for epoch in range(epoch, args.epochs):
            # Each epoch's batch order and region leaks are seeded by (seed, epoch): --resume replays them,
            # and all three models see the same batches.
            g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
            torch.manual_seed(args.seed * 100_003 + epoch)
            order = torch.randperm(len(train_x), generator=g).to(device)
            t0, losses, entropies, correct = time.perf_counter(), [], [], []
            for i in tqdm(range(steps_per_epoch), desc=f"{name} {epoch + 1}/{args.epochs}", leave=False,
                          dynamic_ncols=True):
                step = epoch * steps_per_epoch + i
                progress = step / total_steps
                lr = 0.5 * args.lr * (1 + math.cos(math.pi * progress))  # cosine decay from --lr to 0
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = order[i * args.batch_size:(i + 1) * args.batch_size]
                x, y = train_x[idx], train_y[idx]
                if is_fff:
                    logits, H = model(x, mode="soft", leak=args.region_leak)
                    loss, L_pred, L_harden = fff_loss(logits, y, H, hardening(progress, args))
                    entropies.append(L_harden.detach())
                else:
                    logits, _ = model(x)
                    loss = L_pred = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
                healthy &= torch.isfinite(loss.detach()) & (L_pred.detach() < EXPLODED) & torch.isfinite(grad_norm)
                if not device.startswith("cuda") or i % CHECK_EVERY == 0:
                    stop_if_diverged(healthy, name, L_pred, grad_norm, step, path)
                optimizer.step()
                losses.append(L_pred.detach())  # logged: the cross-entropy alone, comparable across models
                correct.append((logits.argmax(-1) == y).sum())
            stop_if_diverged(healthy, name, L_pred, grad_norm, step, path)  # never a checkpoint of diverged weights
            dt = time.perf_counter() - t0
            train_time += dt
            done = epoch + 1
            row = {"epoch": done, "train_loss": torch.stack(losses).mean().item(),
                   "train_acc": torch.stack(correct).sum().item() / len(train_x), "lr": lr,
                   "val_acc": accuracy(model, *data["val"], "soft"), "elapsed_s": round(train_time, 2)}
            if is_fff:
                row["node_entropy"] = torch.stack(entropies).mean().item() / model.n_nodes  # mean per node
                row["val_acc_hard"] = accuracy(model, *data["val"], "hard")
            save_atomic({"folder": FOLDER, "name": name, "model": model.state_dict(), "config": cfg,
                         "optimizer": optimizer.state_dict(), "epoch": done, "args": vars(args),
                         "train_time": train_time, "val_acc": row["val_acc"]}, path)
            log.writerow(row)
            log_file.flush()
            hard = f" (hard {row['val_acc_hard']:.4f}, node entropy {row['node_entropy']:.3f})" if is_fff else ""
            tqdm.write(f"{name} epoch {done:3d}  loss {row['train_loss']:.4f}  val acc {row['val_acc']:.4f}{hard}"
                       f"  {train_time:.0f} s")
            if args.wandb:
                wandb.log(row, step=done)
    except KeyboardInterrupt:
        print(f"\ninterrupted; {name}'s last checkpoint is {path} (end of an epoch), if any: continue with --resume")
        raise SystemExit(130)
    finally:
        log_file.close()
        if args.wandb:
            wandb.finish()


def train(args):
    device = resolve_device(args.device)
    out = Path(args.out_dir)
    existing = [ckpt_path(out, n) for n in args.models if ckpt_path(out, n).exists()]
    if existing and not args.resume and not (args.quick and args.out_dir == QUICK_OUT_DIR):
        raise SystemExit(f"fff: {existing[0]} exists; pass --resume to continue, or another --out-dir")
    data = {k: (x.to(device), y.to(device)) for k, (x, y) in load_data(args).items()}
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"in_dim": data["train"][0].shape[1], "leaf_width": args.leaf_width, "out_dim": 10, "depth": args.depth}
    print(f"{args.dataset}: {len(data['train'][0]):,} train / {len(data['val'][0]):,} val images on {device}; "
          f"FFF depth {args.depth} ({2 ** args.depth} leaves of width {args.leaf_width}), hardening h = {args.hardening}")
    for name in args.models:
        train_one(name, cfg, data, args, device)
