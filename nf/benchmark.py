"""--benchmark: time training steps of the configured flow (the training loop's own step function,
so the same fused Adam, TF32 and --compile) and print one JSON line."""
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from data import DATASETS, SIDE, dequantize, load_images
from train import build_model, check_memory, model_config, on_device, resolve_device, train_step

BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # dense FLOP/s


def images(args, device):
    """uint8 training images on the device: the real ones when --data-dir holds them (never downloaded),
    else random pixels of the same shape and dtype."""
    raw = Path(args.data_dir) / DATASETS[args.dataset] / "raw"
    if any((raw / f"train-images-idx3-ubyte{gz}").is_file() for gz in ("", ".gz")):
        return load_images(args.data_dir, args.dataset, "train")[:args.train_size or None].to(device), "real"
    return torch.randint(0, 256, (max(args.batch_size, args.train_size), 1, SIDE, SIDE), dtype=torch.uint8,
                         device=device), "random"


def training_flops(cfg, batch_size):
    """FLOPs of one forward + backward of the bits/dim, counted by FlopCounterMode on the meta device."""
    with torch.device("meta"):
        model = build_model(cfg)
        with FlopCounterMode(display=False) as counter:
            model.bits_per_dim(torch.zeros(batch_size, cfg.channels, cfg.side, cfg.side)).mean().backward()
    return counter.get_total_flops()


def benchmark(args):
    device = resolve_device(args.device)
    check_memory(args, device)
    x_train, data = images(args, device)
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    g = torch.Generator(device).manual_seed(args.seed)
    model, bits_per_dim, optimizer = on_device(build_model(cfg), args, device)
    model.initialize(dequantize(x_train[:512], g))              # actnorm's initialisation, as in training
    n = args.benchmark_steps or (2 if args.quick else 20)
    warmup = 3 if args.compile or device != "cpu" else 1        # eager on the CPU: one step allocates everything
    sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
    times = []
    for _ in range(warmup + n):
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=g, device=device)
        sync()
        t0 = time.perf_counter()
        train_step(model, bits_per_dim, optimizer, dequantize(x_train[idx], g), args.lr, args)
        sync()
        times.append(time.perf_counter() - t0)
    step_ms = statistics.median(times[warmup:]) * 1000
    flops = training_flops(cfg, args.batch_size) / args.batch_size
    name = f"{device} {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else device
    samples_per_s = args.batch_size / (step_ms / 1000)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    print(json.dumps({
        "folder": "nf", "device": name, "torch": torch.__version__, "params": model.num_params(),
        "batch_size": args.batch_size, "unit": "images", "samples_per_s": samples_per_s, "step_ms": step_ms,
        "flops_per_sample": flops, "tflops": flops * samples_per_s / 1e12,
        "mfu": flops * samples_per_s / peak if peak else None,
        "peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.startswith("cuda") else
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "compile": args.compile, "data": data}))
