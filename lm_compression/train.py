"""Train the byte model (the paper's own models, Sec. 3: small decoder-only Transformers over
bytes) on one text, holding out its end. Each training window is a chunk as the coder sees it:
BOS, then `context` bytes taken from a random offset, every position predicting the next byte.
The held-out loss is measured the same way the coder codes: consecutive chunks, each from BOS,
so val bits/byte is the code length the compressor will reach (plus a few bytes per file).
"""
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import BOS, ByteConfig, ByteTransformer
from weights import load_byte_model, load_pretrained, save_byte_model


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"lm_compression: --device {name}, but CUDA is not available here (try --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("lm_compression: --device mps, but MPS is not available here (try --device cpu)")
    return name


def read_text(args):
    """The training text as bytes: --data, or DATA_DIR/text/1984.txt."""
    path = Path(args.data) if args.data else Path(args.data_dir) / "text" / "1984.txt"
    if not path.is_file():
        raise SystemExit(f"lm_compression: no training text at {path}; pass --data FILE, or a --data-dir holding "
                         f"text/1984.txt (--data-dir /path/to/datasets)")
    data = path.read_bytes()
    if len(data) < 4 * args.context:
        raise SystemExit(f"lm_compression: {path} has {len(data):,} bytes; training needs at least 4 x --context "
                         f"({4 * args.context:,})")
    return path, data


def split(data, val_fraction):
    """(training bytes, held-out bytes): the first (1 - f) of the text trains, the last f is held out."""
    n = int(len(data) * (1 - val_fraction))
    return data[:n], data[n:]


def as_tensor(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batch(data, context, batch_size, device):
    """(inputs, targets), each (B, context): inputs are BOS and the first context - 1 bytes."""
    i = torch.randint(len(data) - context, (batch_size,))
    y = torch.stack([data[j:j + context] for j in i.tolist()])
    x = torch.cat([torch.full((batch_size, 1), BOS), y[:, :-1]], 1)
    return x.to(device), y.to(device)


@torch.no_grad()
def bits_per_byte(net, data, device, batch_size=64):
    """Mean -log2 p(byte) over `data` cut into consecutive chunks of the context, each from BOS."""
    net.eval()
    C, total = net.cfg.context, 0.0
    full = len(data) // C * C
    groups = list(data[:full].view(-1, C).split(batch_size)) + ([data[full:][None]] if full < len(data) else [])
    for y in groups:                                            # (B, C); the last, shorter chunk on its own
        x = torch.cat([torch.full((len(y), 1), BOS), y[:, :-1]], 1).to(device)
        logits, _ = net(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().to(device), reduction="sum").item()
    net.train()
    return total / len(data) / math.log(2)


def get_lr(step, args):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def num_params(cfg):
    """The byte model's parameter count from its config, as ByteTransformer builds it: embeddings
    (257 + context) C, per block 12 C^2 + 13 C (qkv, proj, 4C MLP, two LayerNorms), ln_f, head 256 C."""
    C = cfg.n_embd
    return (257 + cfg.context) * C + cfg.n_layer * (12 * C * C + 13 * C) + 2 * C + 256 * C


def device_memory(device):
    """Bytes of memory on `device`: the GPU's total on CUDA, the machine's physical memory elsewhere."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(cfg, batch_size, device):
    """Refuse, before anything is read or allocated, a model that cannot fit: 16 bytes per parameter
    (float32 weights, gradients, AdamW's two moments) plus one batch's activations kept for the
    backward pass (per block about 20 C floats and the nh T attention weights per position)."""
    params = num_params(cfg)
    T = cfg.context + 1
    activations = 4 * batch_size * T * (cfg.n_layer * (20 * cfg.n_embd + 2 * cfg.n_head * T) + 3 * 256)
    need, have = 16 * params + activations, device_memory(device)
    if need > have:
        raise SystemExit(f"lm_compression: this model ({params:,} parameters, batch {batch_size} x {cfg.context}) "
                         f"needs about {need / 2 ** 30:,.1f} GiB of memory for weights, optimiser state and "
                         f"activations ({device} has {have / 2 ** 30:,.1f} GiB); choose a smaller --n-embd, "
                         f"--n-layer, --context or --batch-size")


def non_finite(what, step, out):
    where = f"the last good checkpoint is {out}" if out.is_file() else "no checkpoint was written"
    return SystemExit(f"lm_compression: the {what} became non-finite at step {step}; stopping before the update; "
                      f"{where}; try a lower --lr")


def start(args, cfg, out):
    """(net, ckpt or None): a fresh model (the shipped one with --pretrained, to fine-tune), or --resume's
    last state (its best weights stay in ckpt)."""
    if args.resume:
        if not out.exists():
            raise SystemExit(f"lm_compression: --resume: there is nothing to resume at {out} (no such file); "
                             f"train without --resume first, or pass the checkpoint with --out")
        loaded = load_byte_model(out) if out.is_file() else None
        if loaded is None or "resume" not in loaded[1]:
            raise SystemExit(f"lm_compression: --resume, but {out} is not a byte-model checkpoint of this folder")
        net, ckpt = loaded
        net.load_state_dict(ckpt["resume"]["model"])
        return net, ckpt
    if out.exists() and not args.quick:
        raise SystemExit(f"lm_compression: {out} exists; pass --resume to continue it, or another --out")
    torch.manual_seed(args.seed)
    return (load_pretrained()[0].train() if args.pretrained else ByteTransformer(cfg)), None


class Checkpoint:
    """The file `compress` reads: the weights with the best held-out rate so far (not the last: a model
    that starts to memorise its text gets worse on the held-out end), and the last state for --resume."""

    def __init__(self, out, ckpt, **meta):
        self.out, self.meta = out, meta
        self.best = (ckpt["val_bits_per_byte"], ckpt["model"]) if ckpt else (math.inf, None)
        self.t0 = time.perf_counter() - (ckpt.get("wall_time_s", 0) if ckpt else 0)   # training time so far

    def save(self, net, optimizer, step, val):
        """Keep the best held-out weights; never write a non-finite number."""
        if not (math.isfinite(val) and all(torch.isfinite(p).all() for p in net.parameters())):
            raise non_finite("held-out loss or a weight", step, self.out)
        if val < self.best[0]:
            self.best = (val, {k: v.detach().clone() for k, v in net.state_dict().items()})
        resume = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                  "step": step}
        save_byte_model(net.cfg, self.best[1], self.out, step=step, val_bits_per_byte=self.best[0], resume=resume,
                        wall_time_s=round(time.perf_counter() - self.t0, 1),
                        **self.meta)


def adamw(net, args, ckpt):
    """AdamW, weight decay on the matrices only; --resume's state restored."""
    decay = [p for p in net.parameters() if p.dim() >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": [p for p in net.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    if ckpt:
        optimizer.load_state_dict(ckpt["resume"]["optimizer"])
        torch.set_rng_state(ckpt["resume"]["rng"])
    return optimizer


def training_forward(net, args, device):
    """(the model the step runs, its autocast): torch.compile'd with --compile (`net` itself stays
    uncompiled for evaluation and checkpoints), bfloat16 autocast on CUDA."""
    model = torch.compile(net) if args.compile else net
    return model, torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def train_step(model, optimizer, x, y, autocast, lr, fail):
    """One AdamW step on a batch (x, y), each (B, T); returns the loss. A non-finite loss or gradient
    norm raises fail(what) before the update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        logits, _ = model(x)                                                   # (B, T, 256)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    if not torch.isfinite(torch.stack([loss.detach(), norm])).all():           # one sync for both
        raise fail("loss" if not torch.isfinite(loss) else "gradient norm")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def train(args):
    """AdamW on random chunks; every --eval-interval steps the held-out bits/byte and the checkpoint."""
    device = resolve_device(args.device)
    out = Path(args.out)
    cfg = ByteConfig(context=args.context, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     dropout=args.dropout)
    if not args.resume:
        check_memory(cfg, args.batch_size, device)
    net, ckpt = start(args, cfg, out)
    path, text = read_text(args)
    train_data, val_data = (as_tensor(d) for d in split(text, args.val_fraction))
    cfg, step = net.cfg, ckpt["resume"]["step"] if ckpt else 0
    optimizer = adamw(net.to(device).train(), args, ckpt)
    checkpoint = Checkpoint(out, ckpt, data=str(path), train_bytes=len(train_data), args=vars(args))
    print(f"byte model: {net.num_params():,} parameters ({cfg.n_layer} layers, width {cfg.n_embd}, context "
          f"{cfg.context}); {path.name}: {len(train_data):,} training bytes, the last {len(val_data):,} held out; "
          f"{device}" + (f"; resuming at step {step}" if ckpt else ""))
    wandb = start_wandb(args)
    model, autocast = training_forward(net, args, device)
    if step >= args.steps:
        print(f"{out} is at step {step}, not below --steps {args.steps}: nothing to train")
    t0 = time.perf_counter()
    pbar = tqdm(range(step, args.steps), desc="train", dynamic_ncols=True, leave=False)
    try:
        for step in pbar:
            x, y = batch(train_data, cfg.context, args.batch_size, device)
            loss = train_step(model, optimizer, x, y, autocast, get_lr(step, args),
                              lambda what: non_finite(what, step, out))
            if step % 20 == 0:
                pbar.set_postfix(bits_per_byte=f"{loss.item() / math.log(2):.3f}")
            if (step + 1) % args.eval_interval == 0 or step + 1 == args.steps:
                val, step = bits_per_byte(net, val_data, device), step + 1
                checkpoint.save(net, optimizer, step, val)
                if wandb:
                    wandb.log({"train_bits_per_byte": loss.item() / math.log(2), "val_bits_per_byte": val}, step=step)
                tqdm.write(f"step {step:6d}  train {loss.item() / math.log(2):.3f} bits/byte  held-out "
                           f"{val:.3f} bits/byte (rate {val / 8:.1%}){'  best' if val == checkpoint.best[0] else ''}  "
                           f"{time.perf_counter() - t0:.0f} s")
    except KeyboardInterrupt:
        raise SystemExit(f"\ninterrupted; the last checkpoint is {out}: continue with --resume")
    print(f"kept the weights with the best held-out rate: {checkpoint.best[0]:.3f} bits/byte ({out})")


def start_wandb(args):
    if not args.wandb:
        return None
    try:
        import wandb
        wandb.init(project="papers-lm_compression", config=vars(args))
    except ImportError:
        raise SystemExit("lm_compression: --wandb needs the wandb package (pip install wandb)")
    except Exception as e:  # not logged in, no network: one line
        raise SystemExit(f"lm_compression: --wandb could not start ({type(e).__name__})")
    return wandb


PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # dense FLOP/s


def flops_per_byte(cfg):
    """Training FLOPs per predicted byte: 6 N for the matrix multiplies forward and backward (N the
    parameters that multiply: all but the two embedding tables), plus causal attention's QK^T and AV,
    2 x 2 T C per layer forward, times 3 for forward and backward: 12 L T C (PaLM, App. B)."""
    N = num_params(cfg) - (257 + cfg.context) * cfg.n_embd
    return 6 * N + 12 * cfg.n_layer * cfg.context * cfg.n_embd


def benchmark(args):
    """--benchmark: time the training step of these flags on real batches (the training text, if it is
    here) or random bytes; print one JSON line. Writes nothing."""
    device = resolve_device(args.device)
    cfg = ByteConfig(context=args.context, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                     dropout=args.dropout)
    check_memory(cfg, args.batch_size, device)
    real = bool(args.data) or (Path(args.data_dir) / "text" / "1984.txt").is_file()
    data = as_tensor(split(read_text(args)[1], args.val_fraction)[0]) if real else \
        torch.randint(256, (max(4 * cfg.context, 1 << 16),))
    torch.manual_seed(args.seed)
    net = ByteTransformer(cfg).to(device).train()
    optimizer = adamw(net, args, None)
    model, autocast = training_forward(net, args, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fail = lambda what: SystemExit(f"lm_compression: --benchmark: the {what} became non-finite; try a lower --lr")
    times = []
    for i in range(args.benchmark_warmup + args.benchmark_steps):
        x, y = batch(data, cfg.context, args.batch_size, device)
        sync()
        t0 = time.perf_counter()
        train_step(model, optimizer, x, y, autocast, args.lr, fail)
        sync()
        times.append(time.perf_counter() - t0)
    step_ms = 1000 * statistics.median(times[args.benchmark_warmup:])
    tokens = args.batch_size * cfg.context                    # unit: bytes predicted per step
    samples_per_s, flops = tokens / (step_ms / 1000), float(flops_per_byte(cfg))
    name = f"{device} {torch.cuda.get_device_name(torch.device(device))}" if device.startswith("cuda") else device
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    peak_mem = (torch.cuda.max_memory_allocated(torch.device(device)) / 2 ** 20 if device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"folder": "lm_compression", "device": name, "torch": torch.__version__,
                      "params": net.num_params(), "batch_size": tokens, "unit": "tokens",
                      "samples_per_s": samples_per_s, "step_ms": step_ms, "flops_per_sample": flops,
                      "tflops": flops * samples_per_s / 1e12, "mfu": flops * samples_per_s / peak if peak else None,
                      "peak_mem_mb": peak_mem, "compile": args.compile, "data": "real" if real else "random"}))
