"""From a checkpoint to what a person looks at: test accuracy (metrics.json), the training
curves of GCN and GAT side by side (the seed's plot), a test digit drawn as its graph with
the weight each node gives its neighbours; and the sparse-vs-dense speed benchmark."""
import csv
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.collections import LineCollection

from data import CLASSES, DATASETS, build_graphs, find, idx_files, load_graphs, load_images
from model import GNN, GNNConfig, gcn_norm
from pretrained import decode_examples, load_model, paths, read_meta
from train import forward, load_checkpoint, predict, resolve_device


def write_json(obj, path):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def plot_curves(runs, val_size, path):
    """Validation accuracy (and training loss) per epoch of each run: {name: log.csv path}."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, log_path in runs.items():
        with open(log_path) as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        a.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", ms=3, label=name)
        if rows and rows[0]["val_acc"]:
            b.plot(epochs, [100 * float(r["val_acc"]) for r in rows], "o-", ms=3, label=name)
    a.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
    b.set(xlabel="epoch", ylabel="accuracy (%)", title=f"validation accuracy ({val_size:,} held-out digits)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_graph(b, edge_index, weight, title, path):
    """One graph at its pixel positions: nodes shaded by intensity, and for each edge (j, i) a
    segment from node i half-way towards j, coloured by the weight i gives to j."""
    pos = b.x[:, 1:].cpu() * torch.tensor([1.0, -1.0])                   # x right, y up
    j, i = edge_index.cpu()
    keep = i != j                                                        # self-loops are drawn as node rings
    mid = (pos[i] + pos[j]) / 2
    segments = torch.stack([pos[i][keep], mid[keep]], 1).numpy()
    w = weight.cpu()
    fig, ax = plt.subplots(figsize=(6, 6))
    lines = LineCollection(segments, array=w[keep].numpy(), cmap="viridis", linewidths=2.0)
    ax.add_collection(lines)
    ax.scatter(pos[:, 0], pos[:, 1], c=b.x[:, 0].cpu(), cmap="gray_r", s=18, edgecolors="black",
               linewidths=0.3, vmin=0, vmax=1, zorder=3)
    fig.colorbar(lines, ax=ax, shrink=0.7, label="weight of the neighbour")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_digit_graph(model, graphs, preds, device, dataset, path):
    """The first test digit as its graph: GAT's last-layer attention (mean over heads), or GCN's
    fixed weights d_i^-1/2 d_j^-1/2, on each edge."""
    b = graphs.batch(torch.tensor([0])).to(device)
    label, pred = CLASSES[dataset][b.y[0]], CLASSES[dataset][preds[0]]
    if model.cfg.model == "gat":
        with torch.no_grad():
            _, att = model(b.x, b.edge_index, b.batch, 1, return_attention=True)
        edge_index, alpha = att[-1]
        weight, what = alpha.mean(1), "GAT attention alpha_ij, last layer, mean of heads"
    else:
        edge_index, d = gcn_norm(b.edge_index, len(b.x))
        weight, what = d[edge_index[0]] * d[edge_index[1]], "GCN weights d_i^-1/2 d_j^-1/2"
    plot_graph(b, edge_index, weight, f"test digit {label} (predicted {pred}) as a pixel graph:\n{what}", path)


def load_for_sampling(args, device):
    """The model to look at, from --out-dir's checkpoint or (--pretrained) the shipped weights.
    -> (model in eval mode, the flags it was trained with, facts for metrics.json, {GCN/GAT: training log})"""
    if args.pretrained:
        model, meta = load_model(args.model, device)
        facts = {"epochs": meta["epochs"], "val_acc": meta["val_acc"], "train_time_s": meta["wall_time_s"],
                 "weights": f"pretrained/gnns/{args.model}.safetensors"}
        logs = {n.upper(): paths(n)[2] for n in ("gcn", "gat") if paths(n)[2].is_file()}
        return model, {k: meta[k] for k in ("dataset", "background", "val_size")}, facts, logs
    out = Path(args.out_dir)
    ckpt = load_checkpoint(out / "ckpt.pt", device)
    model = GNN(GNNConfig(**ckpt["config"])).to(device)
    model.load_state_dict(ckpt["model"])
    facts = {"epochs": ckpt["epoch"], "val_acc": None if math.isnan(ckpt["val_acc"]) else ckpt["val_acc"],
             "train_time_s": round(ckpt["train_time"], 1)}
    # the seed's plot: this run's curve, with the other model's when it sits next to it (runs/gnns/{gcn,gat})
    logs = {name.upper(): out / "log.csv" if name == model.cfg.model else out.parent / name / "log.csv"
            for name in ("gcn", "gat")}
    return model.eval(), ckpt["args"], facts, {k: v for k, v in logs.items() if v.is_file()}


def has_curve(log):
    """Whether a training log holds a curve: two epochs or more (a one-epoch run is a point, not drawn)."""
    with open(log) as f:
        epochs = len(list(csv.DictReader(f)))
    if epochs < 2:
        print(f"{log} holds {epochs} epoch: left out of the training curves")
    return epochs >= 2


def draw_figures(model, test, preds, logs, saved, device, fig_dir):
    """The first test digit as its graph with its edge weights, and the training curves."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    tag = f"gnns_{saved['dataset']}"
    path = fig_dir / f"{tag}_{model.cfg.model}_graph.png"
    draw_digit_graph(model, test, preds, device, saved["dataset"], path)
    print(f"wrote {path}")
    logs = {name: log for name, log in logs.items() if has_curve(log)}
    if logs:
        path = fig_dir / f"{tag}_curves.png"
        plot_curves(logs, saved["val_size"], path)
        print(f"wrote {path} ({' and '.join(logs)})")


def try_shipped_digits(model, saved, logs, args, device):
    """--pretrained without the test set in --data-dir: the test digits shipped in the JSON (the first is
    the README figure's) as pixel graphs through the model, the figures; no download."""
    images, labels = decode_examples(read_meta(args.model))
    test = build_graphs(images, labels, saved["background"])
    preds = predict(model, test, device).argmax(-1).cpu()
    print(f"gnns: no {saved['dataset']} test set in {Path(args.data_dir) / DATASETS[saved['dataset']] / 'raw'}/ "
          f"(put t10k-{{images-idx3,labels-idx1}}-ubyte[.gz] there for the test accuracy); the {len(labels)} test "
          f"digits shipped in pretrained/gnns/{args.model}.json: labels {labels.tolist()}, {model.cfg.model.upper()} "
          f"predicts {preds.tolist()} ({(preds == labels).sum().item()} of {len(labels)} right)")
    draw_figures(model, test, preds, logs, saved, device, Path(args.figures_dir))


def sample(args):
    device = resolve_device(args.device)
    out = Path(args.out_dir)
    model, saved, facts, logs = load_for_sampling(args, device)
    raw = Path(args.data_dir) / DATASETS[saved["dataset"]] / "raw"
    if args.pretrained and not all(find(raw, n) for n in idx_files("test")):
        return try_shipped_digits(model, saved, logs, args, device)
    # the checkpoint's graphs (dataset, background), from this invocation's paths
    test = load_graphs(SimpleNamespace(dataset=saved["dataset"], background=saved["background"],
                                       data_dir=args.data_dir, cache_dir=args.cache_dir), "test")
    logits = predict(model, test, device)
    y = test.y.to(device)
    preds = logits.argmax(-1)
    metrics = {"model": model.cfg.model, "dataset": saved["dataset"], "background": saved["background"],
               "test_acc": (preds == y).float().mean().item(), "test_errors": int((preds != y).sum()),
               "test_loss": F.cross_entropy(logits, y).item(), "parameters": model.num_params(), **facts}
    out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out / "metrics.json")
    print(f"{model.cfg.model.upper()} test accuracy {metrics['test_acc']:.2%} ({metrics['test_errors']} of "
          f"{len(y):,} wrong) on {saved['dataset']}, {metrics['parameters']:,} parameters, {facts['epochs']} epochs, "
          f"{facts['train_time_s']:.0f} s training")
    draw_figures(model, test, preds, logs, saved, device, Path(args.figures_dir))
    return metrics


def time_steps(model, b, device, dense, steps):
    """Seconds per training step (forward, backward, optimiser step) on one batch, after a warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for k in range(steps + 1):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, y = forward(model, b, device, dense=dense)
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if k:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def speed(args):
    """Training-step time of the sparse O(E) and dense O(N^2) layers on the same batch of digits,
    all pixels kept (a side x side image is a graph of side^2 nodes), for GCN and GAT, in one run.
    Epoch times are extrapolated: time per step x steps in an epoch of 55,000 graphs."""
    device = resolve_device(args.device)
    images, labels = load_images(args.data_dir, args.dataset, "train")
    images, labels = images[:args.speed_batch], labels[:args.speed_batch]
    rows = []
    for side in args.speed_sides:
        small = images if side == 28 else F.interpolate(images[:, None].float(), size=(side, side), mode="area")[:, 0]
        b = build_graphs(small.round().to(torch.uint8), labels, "keep").batch(torch.arange(len(labels)))
        for name in ("gcn", "gat"):
            torch.manual_seed(args.seed)
            model = GNN(GNNConfig(model=name, hidden=args.hidden, layers=args.layers, heads=args.heads)).to(device)
            with torch.no_grad():  # the two implementations compute the same logits (before training moves them)
                diff = (forward(model, b, device, dense=True)[0] - forward(model, b, device)[0]).abs().max().item()
            t = {impl: time_steps(model, b, device, impl == "dense", args.speed_steps) for impl in ("sparse", "dense")}
            epoch = {impl: v * 55_000 / len(labels) for impl, v in t.items()}
            rows.append({"model": name, "nodes": side * side, "edges_per_graph": b.edge_index.shape[1] // len(labels),
                         "batch": len(labels), "max_logit_difference": diff, "sparse_ms": round(1e3 * t["sparse"], 1),
                         "dense_ms": round(1e3 * t["dense"], 1), "sparse_epoch_s": round(epoch["sparse"]),
                         "dense_epoch_s": round(epoch["dense"]), "dense_over_sparse": round(t["dense"] / t["sparse"], 2)})
            r = rows[-1]
            print(f"{name.upper()} at {r['nodes']:>3} nodes/graph, batch {r['batch']}: sparse {r['sparse_ms']:>8.1f} ms, "
                  f"dense {r['dense_ms']:>8.1f} ms per step -> dense/sparse {r['dense_over_sparse']:.2f}x "
                  f"(epoch of 55,000 graphs: {r['sparse_epoch_s']} s vs {r['dense_epoch_s']} s, extrapolated); "
                  f"logits agree to {diff:.1e}")
    out, fig_dir = Path(args.out_dir), Path(args.figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json({"device": device, "threads": torch.get_num_threads(), "rows": rows}, out / "speed.json")
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, colour in (("gcn", "C0"), ("gat", "C1")):
        rs = [r for r in rows if r["model"] == name]
        for impl, style in (("sparse", "o-"), ("dense", "s--")):
            ax.plot([r["nodes"] for r in rs], [r[f"{impl}_ms"] for r in rs], style, color=colour,
                    label=f"{name.upper()} {impl}")
    ax.set(xlabel="nodes per graph (all pixels of a side x side digit)", ylabel="ms per training step",
           yscale="log", title=f"batch of {args.speed_batch} graphs, {device}, {torch.get_num_threads()} threads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(fig_dir / "gnns_speed.png", dpi=120)
    plt.close(fig)
    print(f"wrote {out / 'speed.json'} and {fig_dir / 'gnns_speed.png'}")
    return rows
