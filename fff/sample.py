"""From checkpoints to what a person looks at: test accuracies (metrics.json), how the
test digits spread over the leaves, the training curves; and, with --speed, the inference
time of FFF-hard against the dense layer of equal training width."""
import csv
import json
import os
import statistics
import time
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from data import DATASETS, load_split, normalize
from model import FF, FFF, build
from pretrained import decode_examples, load_model, paths, read_meta
from train import ckpt_path, load_checkpoint, predict, resolve_device

SPEED_BATCHES = (1, 1024)  # batch sizes the speed table times
LABELS = {"fff": "FFF", "ff_train": "FF, equal training width", "ff_infer": "FF, equal inference width"}


def has_test_set(data_dir, dataset):
    raw = Path(data_dir) / DATASETS[dataset] / "raw"
    return all((raw / n).is_file() or (raw / f"{n}.gz").is_file()
               for n in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def write_json(obj, path):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def plot_leaves(leaf, y, n_leaves, path):
    """Per leaf, the class histogram of the test digits that hard routing sends there."""
    counts = torch.zeros(n_leaves, 10, dtype=torch.long)
    counts.index_put_((leaf.cpu(), y.cpu()), torch.ones_like(leaf.cpu()), accumulate=True)
    if n_leaves <= 16:
        cols = min(n_leaves, 4)
        rows = -(-n_leaves // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), sharey=True, squeeze=False)
        for k, ax in enumerate(axes.flat):
            if k >= n_leaves:
                ax.axis("off")
                continue
            ax.bar(range(10), counts[k].numpy(), color="tab:blue")
            ax.set_xticks(range(10))
            ax.set_title(f"leaf {k} ({format(k, f'0{n_leaves.bit_length() - 1}b')}): {counts[k].sum().item()} digits",
                         fontsize=9)
    else:
        fig, ax = plt.subplots(figsize=(8, 0.12 * n_leaves + 2))
        ax.imshow(counts.numpy(), aspect="auto", cmap="Blues", interpolation="nearest")
        ax.set(xlabel="class", ylabel="leaf", xticks=range(10))
    fig.suptitle("FFF, hard routing: test digits per leaf and class (leaf label = path, 1 = right)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(logs, path):
    """Validation accuracy per epoch of each model; logs: {name: log_<name>.csv path}."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, log in logs.items():
        with open(log) as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        ax.plot(epochs, [100 * float(r["val_acc"]) for r in rows], "o-", ms=3,
                label=LABELS[name] + (" (soft)" if name == "fff" else ""))
        if name == "fff":
            ax.plot(epochs, [100 * float(r["val_acc_hard"]) for r in rows], "o-", ms=3, label="FFF (hard)")
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="FFF against dense baselines")
    ax.set_ylim(bottom=max(80, ax.get_ylim()[0]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_models(args, device):
    """The models to look at, from --out-dir's checkpoints or (--pretrained) the shipped weights.
    -> {name: (model in eval mode, facts for metrics.json, its training log)}"""
    out = Path(args.out_dir)
    if args.pretrained:
        shipped = {name: load_model(name, device) for name in args.models}
        return {name: (model, {"epochs": meta["epochs"], "train_time_s": meta["wall_time_s"],
                               "weights": f"pretrained/fff/{name}.safetensors"}, paths(name)[2])
                for name, (model, meta) in shipped.items()}
    names = [n for n in args.models if ckpt_path(out, n).exists()]
    if not names:
        raise SystemExit(f"fff: no checkpoints ckpt_{{{','.join(args.models)}}}.pt in {out}; train first")
    models = {}
    for name in names:
        ckpt = load_checkpoint(ckpt_path(out, name), device)
        model = build(name, ckpt["config"]).to(device)
        model.load_state_dict(ckpt["model"])
        models[name] = (model, {"epochs": ckpt["epoch"], "train_time_s": round(ckpt["train_time"], 1)},
                        out / f"log_{name}.csv")
    return models


def write_curves(models, fig_dir):
    fig_dir.mkdir(parents=True, exist_ok=True)
    if all(log.is_file() for _, _, log in models.values()):
        plot_curves({name: log for name, (_, _, log) in models.items()}, fig_dir / "fff_curves.png")
        print(f"wrote {fig_dir / 'fff_curves.png'}")


def try_shipped_digits(models, args, device):
    """--pretrained without the test set in --data-dir: the test digits shipped in pretrained/fff/fff.json
    through each model (the FFF's leaf by hard routing), and the shipped training curves; no download."""
    pixels, y = (t.to(device) for t in decode_examples(read_meta("fff")))
    x = normalize(pixels, args.dataset)
    print(f"fff: no {args.dataset} test set in {Path(args.data_dir) / DATASETS[args.dataset] / 'raw'}/ (put "
          f"t10k-{{images-idx3,labels-idx1}}-ubyte[.gz] there for test accuracies and the leaf figure); the "
          f"{len(y)} test digits shipped in pretrained/fff/fff.json:")
    print(f"{'label':>26}: {' '.join(f'{v:>3}' for v in y.tolist())}")
    for name, (model, _, _) in models.items():
        pred = predict(model, x, "hard" if name == "fff" else "soft")
        print(f"{LABELS[name] + (' (hard)' if name == 'fff' else ''):>26}: {' '.join(f'{v:>3}' for v in pred.tolist())}"
              f"   {(pred == y).sum().item()} of {len(y)} right")
        if name == "fff":
            with torch.no_grad():
                leaf = model.route(x)
            print(f"{'FFF leaf (path, 1 = right)':>26}: "
                  f"{' '.join(format(v, f'0{model.depth}b') for v in leaf.tolist())}")
    write_curves(models, Path(args.figures_dir))


def sample(args):
    """Test accuracy of every trained model (FFF in both modes) and the figures."""
    device = resolve_device(args.device)
    out, fig_dir = Path(args.out_dir), Path(args.figures_dir)
    models = load_models(args, device)
    if args.pretrained and not has_test_set(args.data_dir, args.dataset):
        return try_shipped_digits(models, args, device)
    pixels, y = (t.to(device) for t in load_split(args.data_dir, args.dataset, "test"))
    x = normalize(pixels, args.dataset)
    metrics = {}
    for name, (model, facts, _) in models.items():
        soft = predict(model, x, "soft")
        m = {"parameters": sum(p.numel() for p in model.parameters()), "epochs": facts["epochs"],
             "inference_multiply_adds": model.inference_flops(), "train_time_s": facts["train_time_s"],
             "test_acc": (soft == y).float().mean().item()}
        if name == "fff":
            hard = predict(model, x, "hard")
            with torch.no_grad():
                leaf = model.route(x)
            m["test_acc_hard"] = (hard == y).float().mean().item()
            m["soft_hard_agreement"] = (soft == hard).float().mean().item()
            m["leaves_used"] = leaf.unique().numel()
            fig_dir.mkdir(parents=True, exist_ok=True)
            plot_leaves(leaf, y, model.n_leaves, fig_dir / "fff_leaves.png")
            print(f"wrote {fig_dir / 'fff_leaves.png'}")
        metrics[name] = m
        hard = f", hard {m['test_acc_hard']:.2%} (soft-hard agreement {m['soft_hard_agreement']:.2%})" \
            if name == "fff" else ""
        print(f"{LABELS[name]:>26}: test accuracy {m['test_acc']:.2%}{hard}; {m['parameters']:,} parameters, "
              f"{m['inference_multiply_adds']:,} multiply-adds per sample")
    out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out / "metrics.json")
    write_curves(models, fig_dir)
    return metrics


def time_per_batch(fn, x, device, min_run_time=0.5):
    """Median seconds of fn(x): one warm-up call, then at least 5 calls and min_run_time seconds.
    On CUDA each call is bracketed by synchronisations, so the time is the kernels', not the launch's.
    (Plain perf_counter: torch.utils.benchmark, imported with a CUDA build on a machine without CUDA,
    prints a warning on stderr.)"""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    fn(x)
    sync()
    times = []
    while len(times) < 5 or sum(times) < min_run_time:
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def speed(args):
    """Inference time per batch: FFF-hard against the dense FF of equal training width (and of equal
    inference width), at several depths, all timed in this one run on this device."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    I, l, O = 784, args.leaf_width, 10
    rows = []
    for depth in args.speed_depths:
        fff, ff_train, ff_infer = (m.to(device).eval() for m in
                                   (FFF(I, l, O, depth), FF(I, l * 2 ** depth, O), FF(I, l, O)))
        for batch in SPEED_BATCHES:
            x = torch.randn(batch, I, device=device)
            t = {"fff_hard": time_per_batch(lambda x: fff(x, mode="hard"), x, device),
                 "ff_train": time_per_batch(ff_train, x, device), "ff_infer": time_per_batch(ff_infer, x, device)}
            rows.append({"depth": depth, "leaves": 2 ** depth, "training_width": l * 2 ** depth, "batch": batch,
                         **{f"{k}_us": round(v * 1e6, 1) for k, v in t.items()},
                         **{f"{k}_multiply_adds": m.inference_flops() for k, m in
                            (("fff_hard", fff), ("ff_train", ff_train), ("ff_infer", ff_infer))},
                         "speedup_vs_ff_train": round(t["ff_train"] / t["fff_hard"], 2)})
            r = rows[-1]
            print(f"depth {depth} (FF width {r['training_width']:>6}), batch {batch:>4}: FFF-hard {r['fff_hard_us']:>9.1f} us, "
                  f"FF equal training width {r['ff_train_us']:>9.1f} us -> speed-up {r['speedup_vs_ff_train']:.2f}x; "
                  f"FF width {l}: {r['ff_infer_us']:.1f} us")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json({"device": device, "threads": torch.get_num_threads(), "rows": rows}, out / "speed.json")
    print(f"wrote {out / 'speed.json'}")
    return rows
