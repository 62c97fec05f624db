"""MNIST and FashionMNIST from torchvision's folder layout:
DATA_DIR/{MNIST,FashionMNIST}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].

The IDX files are read directly with numpy; torchvision is only asked to download them
when they are missing, so an offline machine works once the files are in place, and so does
a machine where torchvision does not import (a build made for another torch).
"""
import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

DATASETS = {"mnist": "MNIST", "fashion": "FashionMNIST"}
CLASSES = {"mnist": [str(d) for d in range(10)],
           "fashion": ["T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                       "boot"]}


# Where the four files of each dataset can be fetched by hand (torchvision's own mirrors).
URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "fashion": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
FILES = [f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
SIDE = 28  # both datasets' images are 28x28


def read_idx(path):
    """An IDX file: a magic number whose last byte is the number of dimensions, the sizes, uint8 data."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">i4", count=ndim, offset=4)
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


def why(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def download(dataset, root):
    """torchvision's downloader, into root/<Dataset>/raw; returns why nothing came, or None."""
    try:
        from torchvision import datasets
    except Exception as e:  # not installed, or built for another torch ("operator torchvision::nms does not exist")
        return f"torchvision could not be imported ({why(e)}), so nothing was downloaded"
    try:
        for train in (True, False):
            getattr(datasets, DATASETS[dataset])(root=root, train=train, download=True)
    except Exception as e:  # no network, a mirror down
        return f"the download failed ({why(e)})"
    return None


def load_split(data_dir, dataset, split):
    """(images uint8 (N, 1, H, W), labels int64 (N,)) of split 'train' or 'test'."""
    raw = Path(data_dir) / DATASETS[dataset] / "raw"
    prefix = "train" if split == "train" else "t10k"
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]

    def find(name):
        return next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None)

    if any(find(n) is None for n in names):
        reason = download(dataset, data_dir)
        missing = [n for n in names if find(n) is None]
        if missing:
            raise SystemExit(
                f"ddpm: {dataset} not found: expected {', '.join(f'{raw}/{n}[.gz]' for n in missing)}, and {reason}; "
                f"put {', '.join(FILES)} from {URLS[dataset]} into {raw}/, or point --data-dir at the folder "
                f"that holds {DATASETS[dataset]}/raw/")
    try:
        images, labels = (read_idx(find(n)) for n in names)
    except (ValueError, IndexError, OSError, EOFError, zlib.error) as e:
        raise SystemExit(f"ddpm: {raw} holds a damaged IDX file ({type(e).__name__}: {e})")
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise SystemExit(f"ddpm: {raw} holds images of shape {tuple(images.shape)} and labels of shape "
                         f"{tuple(labels.shape)}; expected (N, H, W) and (N,)")
    return images[:, None], labels.long()


def to_model_range(pixels):
    """uint8 [0, 255] -> float [-1, 1], the range the reverse process ends in (Sec. 3.3)."""
    return pixels.float() / 127.5 - 1


def to_pixels(x):
    """float [-1, 1] -> float [0, 1], for figures."""
    return ((x + 1) / 2).clamp(0, 1)
