"""MNIST and FashionMNIST as uint8 tensors, from torchvision's folder layout:
DATA_DIR/{MNIST,FashionMNIST}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].

The files are read directly (the IDX format is a few lines of numpy) and torchvision
is only asked to download them when they are missing, so a machine without network
access (or with a torchvision that does not import beside this torch) works as soon
as the files are in place.
"""
import gzip
from pathlib import Path

import numpy as np
import torch

DATASETS = {"mnist": "MNIST", "fashion": "FashionMNIST"}
CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
}
URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirrors
        "fashion": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion": (0.2860, 0.3530)}  # of the training images, on [0, 1]


def idx_files(split):
    prefix = "train" if split == "train" else "t10k"
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def read_idx(path):
    """An IDX file (LeCun's format: magic with the number of dimensions, sizes, then uint8 data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def find(raw, name):
    for candidate in (raw / name, raw / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def first_line(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def download(dataset, root):
    """torchvision's downloader, into root/<Dataset>/raw; returns why nothing came, or None."""
    try:
        from torchvision import datasets
    except Exception as e:  # not installed, or built for another torch ("operator torchvision::nms does not exist")
        return f"torchvision could not be imported ({first_line(e)}), so nothing was downloaded"
    try:
        for train in (True, False):
            getattr(datasets, DATASETS[dataset])(root=root, train=train, download=True)
    except Exception as e:  # no network, a mirror down
        return f"the download failed ({first_line(e)})"
    return None


def load_split(data_dir, dataset, split):
    """(images (N, 28, 28) uint8, labels (N,) int64) of 'train' or 'test'."""
    raw = Path(data_dir) / DATASETS[dataset] / "raw"
    names = idx_files(split)
    paths = [find(raw, n) for n in names]
    if None in paths:
        reason = download(dataset, data_dir)
        paths = [find(raw, n) for n in names]
        if None in paths:
            raise SystemExit(
                f"vit: {dataset} not found: expected {raw}/{{{','.join(names)}}}[.gz]; {reason}; put the four "
                f"files {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz from {URLS[dataset]} into {raw}/, "
                f"or point --data-dir at a folder that holds {DATASETS[dataset]}/raw/")
    try:
        images, labels = (read_idx(p) for p in paths)
    except (ValueError, IndexError, OSError, EOFError) as e:
        raise SystemExit(f"vit: {paths[0].parent} holds a damaged IDX file ({type(e).__name__}: {e})")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SystemExit(f"vit: {paths[0]} and {paths[1]} do not hold matching images (N, H, W) and labels (N,)")
    return images, labels.long()


def load_data(args):
    """Train / validation / test splits: validation is the last --val-size training images,
    training the first --train-size (0: all) of the rest."""
    train_x, train_y = load_split(args.data_dir, args.dataset, "train")
    test_x, test_y = load_split(args.data_dir, args.dataset, "test")
    if not 0 <= args.val_size < len(train_x):
        raise SystemExit(f"vit: --val-size {args.val_size} must be below the {len(train_x)} training images")
    n = len(train_x) - args.val_size
    m = min(n, args.train_size) if args.train_size else n
    return {"train": (train_x[:m], train_y[:m]), "val": (train_x[n:], train_y[n:]), "test": (test_x, test_y)}


def normalize(images, dataset):
    """uint8 (B, H, W) -> float (B, 1, H, W), standardised with the training set's mean and std."""
    mean, std = MEAN_STD[dataset]
    return (images.float().unsqueeze(1) / 255.0 - mean) / std


def random_crop(images, padding, generator):
    """The light augmentation: pad uint8 images (B, H, W) by `padding` black pixels and crop back
    to H x W at a random offset per image. Batched with index arithmetic on the images' device; the
    offsets come from `generator`, a generator on that device (no copy from the host, no wait)."""
    B, H, W = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, B), generator=generator, device=images.device)
    rows = (dy[:, None] + torch.arange(H, device=images.device))[:, :, None]   # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=images.device))[:, None, :]   # (B, 1, W)
    return padded[torch.arange(B, device=images.device)[:, None, None], rows, cols]


def random_hflip(images, p, generator):
    """Flip each uint8 image (B, H, W) left-right with probability p, on the images' device (a garment
    mirrored is the same garment; a digit mirrored is not, so this suits FashionMNIST, not MNIST)."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < p            # (B,)
    return torch.where(flip[:, None, None], images.flip(-1), images)


# Random Erasing (Zhong et al. 2020, arXiv 1708.04896, Alg. 1), with the paper's ranges (§3.1):
S_L, S_H, R_1 = 0.02, 0.4, 0.3   # area of I_e in [s_l, s_h] x S, aspect ratio r_e in [r_1, r_2 = 1 / r_1]
TRIES = 30                       # Alg. 1 redraws until I_e fits (30% of draws do on 28x28): 0.7^30 < 1e-4 misses


def random_erasing(images, p, generator):
    """Alg. 1 on uint8 images (B, H, W), before normalisation, so that the fill is the paper's Rand(0, 255):
    with probability p an image gets one rectangle I_e, inside it, of random pixels. Batched: TRIES
    candidates per image at once, the first that fits is taken (an image none fits is left as it is),
    the rectangle a mask of broadcast comparisons."""
    B, H, W = images.shape
    dev = images.device
    u = torch.rand(4, B, TRIES, generator=generator, device=dev)                        # (4, B, TRIES)
    S_e = (S_L + (S_H - S_L) * u[0]) * H * W                                            # S_e <- Rand(s_l, s_h) x S
    r_e = R_1 + (1 / R_1 - R_1) * u[1]                                                  # r_e <- Rand(r_1, r_2)
    H_e, W_e = (S_e * r_e).sqrt().round(), (S_e / r_e).sqrt().round()                   # H_e, W_e (whole pixels)
    x_e, y_e = (u[2] * W).floor(), (u[3] * H).floor()                                   # x_e <- Rand(0, W), y_e <- Rand(0, H)
    area, aspect = H_e * W_e / (H * W), H_e / W_e                                       # after rounding, still in range:
    fits = ((x_e + W_e <= W) & (y_e + H_e <= H)                                         # if x_e + W_e <= W and y_e + H_e <= H
            & (S_L <= area) & (area <= S_H) & (R_1 <= aspect) & (aspect <= 1 / R_1))    # (B, TRIES)
    first = fits.int().argmax(1, keepdim=True)                                          # (B, 1): the first draw that fits
    x, y, w, h = (t.gather(1, first).long()[:, :, None] for t in (x_e, y_e, W_e, H_e))  # (B, 1, 1) each
    erase = (torch.rand(B, generator=generator, device=dev) < p) & fits.any(1)          # p_1 < p: erase
    rows, cols = torch.arange(H, device=dev)[:, None], torch.arange(W, device=dev)      # (H, 1), (W,)
    I_e = erase[:, None, None] & (y <= rows) & (rows < y + h) & (x <= cols) & (cols < x + w)  # (B, H, W)
    fill = torch.randint(0, 256, images.shape, generator=generator, device=dev, dtype=torch.uint8)
    return torch.where(I_e, fill, images)                                               # I(I_e) <- Rand(0, 255)
