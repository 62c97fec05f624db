"""MNIST (or FashionMNIST) as uint8 images, from torchvision's folder layout:
DATA_DIR/{MNIST,FashionMNIST}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz],
and the dequantisation that turns the 256 pixel levels into a continuous variable.

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
# Where the files of each dataset can be fetched by hand (torchvision's own mirrors).
URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "fashion": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
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


def load_images(data_dir, dataset, split):
    """uint8 images (N, 1, H, W) of split 'train' or 'test' (labels are not needed for density estimation)."""
    raw = Path(data_dir) / DATASETS[dataset] / "raw"
    name = f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte"

    def find():
        return next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None)

    path = find()
    if path is None:
        reason = download(dataset, data_dir)
        path = find()
        if path is None:
            raise SystemExit(
                f"nf: {dataset} not found: expected {raw}/{name}[.gz], and {reason}; put train-images-idx3-ubyte.gz "
                f"and t10k-images-idx3-ubyte.gz from {URLS[dataset]} into {raw}/, or point --data-dir at the "
                f"folder that holds {DATASETS[dataset]}/raw/")
    try:
        images = read_idx(path)
    except (ValueError, IndexError, OSError, EOFError, zlib.error) as e:
        raise SystemExit(f"nf: {path} is a damaged IDX file ({type(e).__name__}: {e})")
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise SystemExit(f"nf: {path} does not hold square images (N, H, W), but shape {tuple(images.shape)}")
    return images[:, None]


def load_data(args):
    """{'train', 'test'}: uint8 image tensors; --train-size / --test-size take the first N."""
    train = load_images(args.data_dir, args.dataset, "train")
    test = load_images(args.data_dir, args.dataset, "test")
    return {"train": train[:args.train_size or None], "test": test[:args.test_size or None]}


def dequantize(pixels, generator=None):
    """x = (pixel + u) / 256, u ~ U[0, 1)^D (uniform dequantisation, Sec. 4.1): a density on x
    then bounds the discrete log-likelihood of the pixels from below."""
    device = generator.device if generator is not None else pixels.device    # a CPU generator: same noise anywhere
    u = torch.rand(pixels.shape, generator=generator, device=device).to(pixels.device)
    return (pixels.float() + u) / 256
