"""MNIST (or FashionMNIST) as flat uint8 pixel vectors, standardised per batch, from torchvision's folder layout:
DATA_DIR/{MNIST,FashionMNIST}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].

The IDX files are read directly with numpy; torchvision is only asked to download
them when they are missing, so an offline machine (or one whose torchvision does not
import beside this torch) works once the files are in place.
"""
import gzip
from pathlib import Path

import numpy as np
import torch

DATASETS = {"mnist": "MNIST", "fashion": "FashionMNIST"}
URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",  # torchvision's mirrors
        "fashion": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
MEAN_STD = {"mnist": (0.1307, 0.3081), "fashion": (0.2860, 0.3530)}  # of the training images, on [0, 1]


def read_idx(path):
    """An IDX file: a magic number whose last byte is the number of dimensions, the sizes, uint8 data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


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
    """(pixels (N, 784) uint8, labels (N,) int64) for split 'train' or 'test'."""
    raw = Path(data_dir) / DATASETS[dataset] / "raw"
    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")

    def find():
        return [next((p for p in (raw / n, raw / f"{n}.gz") if p.is_file()), None) for n in names]

    paths = find()
    if None in paths:
        reason = download(dataset, data_dir)
        paths = find()
        if None in paths:
            raise SystemExit(
                f"fff: {dataset} not found: expected {raw}/{{{','.join(names)}}}[.gz]; {reason}; put the four "
                f"files {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz from {URLS[dataset]} into {raw}/, "
                f"or point --data-dir at a folder that holds {DATASETS[dataset]}/raw/")
    try:
        images, labels = (read_idx(p) for p in paths)
    except (ValueError, IndexError, OSError, EOFError) as e:
        raise SystemExit(f"fff: {raw} holds a damaged IDX file ({type(e).__name__}: {e})")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SystemExit(f"fff: {paths[0]} and {paths[1]} do not hold matching images (N, H, W) and labels (N,)")
    return images.flatten(1), labels.long()


def normalize(pixels, dataset):
    """uint8 pixels (B, 784) -> float, standardised with the training set's mean and std."""
    mean, std = MEAN_STD[dataset]
    return (pixels.float() / 255.0 - mean) / std


def load_data(args):
    """Train / validation / test; validation is the last --val-size training images (the paper: 9:1)."""
    train_x, train_y = load_split(args.data_dir, args.dataset, "train")
    if not 0 < args.val_size < len(train_x):
        raise SystemExit(f"fff: --val-size {args.val_size} must be in 1..{len(train_x) - 1}")
    n = len(train_x) - args.val_size
    m = min(n, args.train_size) if args.train_size else n
    return {"train": (train_x[:m], train_y[:m]), "val": (train_x[n:], train_y[n:]),
            "test": load_split(args.data_dir, args.dataset, "test")}
