"""From a checkpoint to what a person looks at: a grid of samples from the EMA model, a GIF of the
reverse process x_T -> x_0, the same GIF for MNIST and FashionMNIST side by side when both runs
exist, and the loss curves of the run."""
import csv
import time
from pathlib import Path

import imageio.v2 as imageio
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from tqdm import tqdm

from data import DATASETS, to_pixels
from model import Diffusion, UNet, UNetConfig
from pretrained import HERE, load_pretrained, read_meta, shipped_config
from train import load_checkpoint, resolve_device

GIF_FRAMES, GIF_SCALE, GIF_GREYS = 40, 2, 32
GIF_MS = 80  # per frame; imageio's GIF writer takes milliseconds (0.08 would be 0: as fast as the viewer goes)


def load_model(run_dir, dataset, device, pretrained=False):
    """The EMA weights of a run (the ones the paper samples with), or the shipped ones with `pretrained`;
    the diffusion process; and the checkpoint (for the shipped weights: their JSON)."""
    if pretrained:
        ckpt = read_meta(dataset) | {"epoch": read_meta(dataset)["epochs"]}
        model = UNet(UNetConfig(**shipped_config(ckpt)))
        weights, T, schedule = load_pretrained(dataset), ckpt["flags"]["T"], ckpt["flags"]["schedule"]
    else:
        ckpt = load_checkpoint(Path(run_dir) / "ckpt.pt", device, dataset=dataset)
        model = UNet(UNetConfig(**ckpt["config"]))
        weights, T, schedule = ckpt["ema"], ckpt["args"]["T"], ckpt["args"]["schedule"]
    model.to(device).load_state_dict(weights)
    return model.eval(), Diffusion(T, schedule).to(device), ckpt


def open_run(args):
    """(device, run folder, figures folder, EMA model, diffusion, checkpoint) of the flags' run."""
    device = resolve_device(args.device)
    run = Path(args.run_dir)
    return (device, run, Path(args.figures_dir)) + load_model(run, args.dataset, device, args.pretrained)


def sampler_name(args):
    if args.sampler == "ddpm":
        return f"DDPM, {args.T} steps, sigma^2 = {args.variance.replace('_', ' ')}"
    return f"DDIM, {args.sample_steps} steps, eta = {args.eta:g}"


def draw(model, diffusion, args, n, seed, device, frames=0, desc="sampling"):
    """n samples with the sampler the flags choose, the noise from `seed`; with frames > 0 also up to
    `frames` snapshots (t, x_t) of the reverse process, x_T first and x_0 last, spaced as sqrt: denser
    near x_0, where the image takes shape."""
    shape = (n, model.cfg.channels, model.cfg.side, model.cfg.side)
    steps = len(diffusion.timesteps(args.sampler, args.sample_steps))
    keep = set(((steps - 1) * torch.linspace(0, 1, frames).sqrt()).round().long().tolist()) | {steps} if frames else ()
    snapshots = []
    reverse = diffusion.reverse(model, shape, args.sampler, args.sample_steps, args.eta, args.variance,
                                torch.Generator().manual_seed(seed))
    for i, (t, x) in enumerate(tqdm(reverse, total=steps + 1, desc=desc, leave=False, dynamic_ncols=True)):
        if i in keep:
            snapshots.append((t, x.float().cpu()))
    return (x, snapshots) if frames else x


def grid(x, rows):
    """Images (N, 1, H, W) on [-1, 1] -> one (rows H, cols W) uint8 array."""
    g = rearrange(to_pixels(x)[:, 0].cpu(), "(r c) h w -> (r h) (c w)", r=rows)
    return (g * 255).round().byte().numpy()


def save_figure(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_grid(x, rows, title, path):
    fig, ax = plt.subplots(figsize=(max(0.45 * len(x) / rows, 3.2) + 0.4, 0.45 * rows + 0.8))
    ax.imshow(grid(x, rows), cmap="gray", vmin=0, vmax=255)
    ax.axis("off")
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)


def gif_frames(panels, titles):
    """panels: per dataset a list of (t, x_t) snapshots -> RGB frames, the panels side by side, labelled."""
    frames = []
    for k in range(len(panels[0])):
        t = panels[0][k][0]
        tiles = [np.kron(grid(snaps[k][1], int(len(snaps[k][1]) ** 0.5)), np.ones((GIF_SCALE, GIF_SCALE), np.uint8))
                 for snaps in panels]
        # 32 grey levels look the same and halve the GIF: the noisy frames barely compress
        tiles = [(np.round(tile / 255 * (GIF_GREYS - 1)) * (255 / (GIF_GREYS - 1))).astype(np.uint8) for tile in tiles]
        gap = np.full((tiles[0].shape[0], 12), 255, np.uint8)
        body = np.concatenate([p for tile in tiles for p in (tile, gap)][:-1], axis=1)
        frame = Image.fromarray(np.concatenate([np.full((22, body.shape[1]), 255, np.uint8), body]))
        pen = ImageDraw.Draw(frame)
        for j, name in enumerate(titles):
            pen.text((j * (tiles[0].shape[1] + 12) + 4, 5), f"{name}   t = {t}", fill=0)
        frames.append(np.asarray(frame.convert("RGB")))
    return frames + [frames[-1]] * 15                           # hold x_0 for a moment before looping


def plot_curve(log_path, path):
    with open(log_path) as f:
        rows = list(csv.DictReader(f))
    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [float(r["train_loss"]) for r in rows], "o-", ms=3, label="train (during the epoch)")
    ax.plot(epochs, [float(r["test_loss"]) for r in rows], "s-", ms=3, label="test, EMA weights, fixed t and eps")
    ax.set(xlabel="epoch", ylabel="L_simple = E ||eps - eps_theta||^2", title="DDPM training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def other_model(args, device):
    """The other dataset's model for the side-by-side GIF: the shipped one with --pretrained, else the run
    next to this one in --out-dir; None when there is none."""
    other = next(d for d in DATASETS if d != args.dataset)
    if not (HERE / f"{other}.json" if args.pretrained else Path(args.out_dir) / other / "ckpt.pt").is_file():
        return None
    return other, load_model(Path(args.out_dir) / other, other, device, args.pretrained)[:2]


def sample(args):
    device, run, fig_dir, model, diffusion, _ = open_run(args)
    fig_dir.mkdir(parents=True, exist_ok=True)
    tag = f"ddpm_{args.dataset}"
    written = []

    rows = int(args.n_samples ** 0.5)
    t0 = time.perf_counter()
    x = draw(model, diffusion, args, rows * rows, args.seed, device, desc=f"{args.n_samples} samples")
    print(f"{rows * rows} samples ({sampler_name(args)}) in {time.perf_counter() - t0:.1f} s on {device}")
    written.append(fig_dir / f"{tag}{'_shipped' if args.pretrained else ''}_samples.png")
    save_grid(x, rows, f"{DATASETS[args.dataset]} samples\n{sampler_name(args)}", written[-1])

    # The reverse process as a GIF, its frames picked by draw; with the other dataset's model, both side by side.
    runs = {args.dataset: (model, diffusion)}
    if other := other_model(args, device):
        runs[other[0]] = other[1]
    panels = {name: draw(m, d, args, 16, args.seed + 1, device, GIF_FRAMES, desc=f"{name} GIF")[1]
              for name, (m, d) in sorted(runs.items())}
    both = len(panels) == 2 and len({len(s) for s in panels.values()}) == 1  # both models give the same frames
    written.append(fig_dir / ("ddpm_both.gif" if both else f"{tag}.gif"))
    imageio.mimsave(written[-1], gif_frames(list(panels.values()) if both else [panels[args.dataset]],
                                            [DATASETS[n] for n in panels] if both else [DATASETS[args.dataset]]),
                    duration=GIF_MS, loop=0)
    if (run / "log.csv").is_file() and not args.pretrained:
        plot_curve(run / "log.csv", fig_dir / f"{tag}_loss.png")
        written.append(fig_dir / f"{tag}_loss.png")
    print("wrote " + ", ".join(str(p) for p in written))
