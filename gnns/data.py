"""MNIST digits as pixel graphs.

Each image becomes a graph: a node per pixel (with --background drop, only the pixels
with ink, intensity > 0), node features (intensity, x, y) on [0, 1], and an edge between
each pair of 8-neighbouring pixels that are both nodes, in both directions. Self-loops are
not stored; the layers add them (A + I).

A split is built once, vectorised over all its images, and cached as a `GraphSet`: node
features and edges of all graphs concatenated (edges in local, per-graph node indices),
with offsets `node_ptr` and `edge_ptr`. `GraphSet.batch(idx)` gathers any set of graphs
into one disjoint graph with a batch vector, again without a Python loop over graphs.

The IDX files are read directly, from torchvision's layout
DATA_DIR/{MNIST,FashionMNIST}/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz];
torchvision is only asked to download them when they are missing, so an offline machine
(or one whose torchvision does not import beside this torch) works once they are in place.
"""
import gzip
import os
import zlib
from dataclasses import dataclass
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
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]  # 8-neighbourhood
CACHE_VERSION = 2  # 2: the cache records the images file it was built from


# ---------------------------------------------------------------- images

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


def load_images(data_dir, dataset, split):
    """(images (N, 28, 28) uint8, labels (N,) int64) of 'train' or 'test'."""
    raw = Path(data_dir) / DATASETS[dataset] / "raw"
    names = idx_files(split)
    paths = [find(raw, n) for n in names]
    if None in paths:
        reason = download(dataset, data_dir)
        paths = [find(raw, n) for n in names]
        if None in paths:
            raise SystemExit(
                f"gnns: {dataset} not found: expected {raw}/{{{','.join(names)}}}[.gz]; {reason}; put the four "
                f"files {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz from {URLS[dataset]} into {raw}/, "
                f"or point --data-dir at a folder that holds {DATASETS[dataset]}/raw/")
    try:
        images, labels = (read_idx(p) for p in paths)
    except (ValueError, IndexError, OSError, EOFError, zlib.error) as e:
        raise SystemExit(f"gnns: {paths[0].parent} holds a damaged IDX file ({type(e).__name__}: {e})")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise SystemExit(f"gnns: {paths[0]} and {paths[1]} do not hold matching images (N, H, W) and labels (N,)")
    return images, labels.long()


# ---------------------------------------------------------------- graphs

@dataclass
class Batch:
    """Many graphs as one disjoint graph: node i belongs to graph batch[i]."""
    x: torch.Tensor           # (N, 3) float: intensity, x, y
    edge_index: torch.Tensor  # (2, E) long: rows (source j, target i), message j -> i
    batch: torch.Tensor       # (N,) long, graph of each node
    num_graphs: int
    y: torch.Tensor = None    # (G,) labels

    def to(self, device):
        return Batch(self.x.to(device), self.edge_index.to(device), self.batch.to(device), self.num_graphs,
                     None if self.y is None else self.y.to(device))


def exclusive_cumsum(counts):
    return torch.cumsum(counts, 0) - counts


def pointers(counts):
    """Offsets [0, c0, c0 + c1, ...] of consecutive blocks with these sizes (along the first dimension)."""
    return torch.cat([counts.new_zeros((1, *counts.shape[1:])), torch.cumsum(counts, 0)])


def ranges(starts, counts, total=None):
    """Concatenated aranges [starts[k], starts[k] + counts[k]) for every k, without a loop; with their
    total length given (known on the host), nothing waits for the device."""
    offsets = torch.repeat_interleave(starts - exclusive_cumsum(counts), counts, output_size=total)
    return offsets + torch.arange(len(offsets), device=counts.device)


@dataclass
class GraphSet:
    """All graphs of a split, concatenated; graph g owns nodes node_ptr[g]:node_ptr[g+1]
    and edges edge_ptr[g]:edge_ptr[g+1], whose endpoints are local node numbers."""
    nodes: torch.Tensor      # (N_total, 3) uint8: intensity 0..255, column, row
    node_ptr: torch.Tensor   # (G + 1,) long
    edges: torch.Tensor      # (2, E_total) int16: local (source, target)
    edge_ptr: torch.Tensor   # (G + 1,) long
    y: torch.Tensor          # (G,) long
    side: int                # images are side x side

    def __len__(self):
        return len(self.y)

    def to(self, device):
        return GraphSet(self.nodes.to(device), self.node_ptr.to(device), self.edges.to(device),
                        self.edge_ptr.to(device), self.y.to(device), self.side)

    def batch(self, idx):
        """The graphs `idx` (a 1-D long tensor, on the set's device) as one disjoint graph, features on [0, 1]."""
        x, edge_index, graph, y = self.gather(idx, max(len(idx), 1))
        return Batch(x, edge_index, graph, len(idx), y)

    def gather(self, idx, batch_size, nodes=None, edges=None):
        """The graphs `idx` as consecutive batches of batch_size graphs, node and graph numbers starting at
        0 in each batch. With the total nodes and edges of idx given (known on the host), nothing waits for
        the device. -> x (N, 3) float, edge_index (2, E) long, graph (N,) long, y (G,)"""
        device = self.nodes.device
        n_nodes = self.node_ptr[idx + 1] - self.node_ptr[idx]
        n_edges = self.edge_ptr[idx + 1] - self.edge_ptr[idx]
        x = self.nodes[ranges(self.node_ptr[idx], n_nodes, nodes)].float()
        x = x / torch.tensor([255.0, self.side - 1, self.side - 1], device=device)
        k = torch.arange(len(idx), device=device)
        first = exclusive_cumsum(n_nodes)                                # first node of each graph
        shift = torch.repeat_interleave(first - first[k - k % batch_size], n_edges, output_size=edges)
        edge_index = self.edges[:, ranges(self.edge_ptr[idx], n_edges, edges)].long() + shift  # local -> batch
        graph = torch.repeat_interleave(k % batch_size, n_nodes, output_size=nodes)
        return x, edge_index, graph, self.y[idx]


class Batches:
    """The batches of an epoch: the graphs `order` of a GraphSet, batch_size at a time (the last batch
    may be smaller). Their sizes are read on the host once, here; then batch(s) waits for nothing.
    Built `chunk` batches at a time, on first use: on a GPU the whole epoch at once (a few dozen
    launches), on a CPU one batch at a time, which stays in cache (a whole epoch of 55,000 digits at
    once, 52M edges, took 8.3 s here against 1.7 s batch by batch)."""

    def __init__(self, graphs, order, batch_size, chunk):
        self.graphs, self.order, self.batch_size, self.chunk = graphs, order, batch_size, chunk
        steps = -(-len(order) // batch_size)
        bounds = torch.arange(0, steps * batch_size + 1, batch_size, device=order.device).clamp(max=len(order))
        sizes = torch.stack([graphs.node_ptr[order + 1] - graphs.node_ptr[order],
                             graphs.edge_ptr[order + 1] - graphs.edge_ptr[order]], 1)      # (G, 2)
        self.node_ptr, self.edge_ptr = pointers(sizes)[bounds].T.tolist()  # batch s: nodes node_ptr[s]:node_ptr[s+1]
        self.built = None, None                                            # (chunk number, its tensors)

    def __len__(self):
        return len(self.node_ptr) - 1

    def batch(self, s):
        c, B = s // self.chunk, self.batch_size
        first, last = c * self.chunk, min((c + 1) * self.chunk, len(self))     # the chunk's batches
        if self.built[0] != c:
            nodes, edges = self.node_ptr[last] - self.node_ptr[first], self.edge_ptr[last] - self.edge_ptr[first]
            self.built = c, self.graphs.gather(self.order[first * B:last * B], B, nodes, edges)
        x, edge_index, graph, y = self.built[1]
        n0, n1 = self.node_ptr[s] - self.node_ptr[first], self.node_ptr[s + 1] - self.node_ptr[first]
        e0, e1 = self.edge_ptr[s] - self.edge_ptr[first], self.edge_ptr[s + 1] - self.edge_ptr[first]
        y = y[(s - first) * B:(s - first + 1) * B]
        return Batch(x[n0:n1], edge_index[:, e0:e1], graph[n0:n1], len(y), y)


def build_graphs(images, labels, background="drop"):
    """Pixel graphs of uint8 images (G, H, W), vectorised over all images at once."""
    G, H, W = images.shape
    if H != W:
        raise SystemExit(f"gnns: images are {H}x{W}; pixel graphs here are built from square images")
    if not 2 <= H <= 181:  # coordinates are stored as uint8, local node numbers as int16 (H * W < 2^15)
        raise SystemExit(f"gnns: images of side {H}: pixel graphs here take sides 2 to 181")
    keep = images > 0 if background == "drop" else torch.ones_like(images, dtype=torch.bool)
    flat = keep.reshape(G, -1)
    n_nodes = flat.sum(1)
    local = torch.cumsum(flat, 1) - 1                    # (G, H*W): node number of each kept pixel in its graph
    g, r, c = keep.nonzero(as_tuple=True)                # kept pixels, graph-major then row-major
    nodes = torch.stack([images[g, r, c], c.to(torch.uint8), r.to(torch.uint8)], 1)

    # an edge (source j -> target i) for every kept pixel i and each kept 8-neighbour j
    src, dst, owner = [], [], []
    for dy, dx in NEIGHBOURS:
        rj, cj = r + dy, c + dx
        inside = (rj >= 0) & (rj < H) & (cj >= 0) & (cj < W)
        gi, ri, ci, rj, cj = g[inside], r[inside], c[inside], rj[inside], cj[inside]
        both = keep[gi, rj, cj]
        gi, ri, ci, rj, cj = gi[both], ri[both], ci[both], rj[both], cj[both]
        src.append(local[gi, rj * W + cj])
        dst.append(local[gi, ri * W + ci])
        owner.append(gi)
    src, dst, owner = torch.cat(src), torch.cat(dst), torch.cat(owner)
    order = torch.argsort(owner, stable=True)            # edges grouped by graph
    edges = torch.stack([src[order], dst[order]]).to(torch.int16)
    n_edges = torch.bincount(owner, minlength=G)
    return GraphSet(nodes, pointers(n_nodes), edges, pointers(n_edges), labels, H)


def cache_path(args, split):
    return Path(args.cache_dir) / f"{args.dataset}-{split}-{args.background}-v{CACHE_VERSION}.pt"


def images_file(args, split):
    """(path, size, modification time) of the split's images file in --data-dir, or None if it is not there."""
    path = find(Path(args.data_dir) / DATASETS[args.dataset] / "raw", idx_files(split)[0])
    return None if path is None else [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]


def cached_graphs(args, split):
    """The cached GraphSet of a split if the cache was built from the images file now in --data-dir
    (another folder's, or a test's synthetic digits, are not used), else None."""
    source, cache = images_file(args, split), cache_path(args, split)
    if source is None or not cache.is_file():
        return None
    try:
        saved = torch.load(cache, weights_only=True)
    except Exception:  # a damaged cache is rebuilt, not trusted
        return None
    return GraphSet(**{k: v for k, v in saved.items() if k != "source"}) if saved.get("source") == source else None


def random_images(n, generator):
    """n random uint8 images (n, 28, 28) with ink in blobs, about 19% of the pixels (a MNIST digit's
    share), so that their pixel graphs have a digit's 150 nodes and about 810 of its 950 directed edges:
    for --benchmark without data."""
    noise = torch.rand(n, 1, 28, 28, generator=generator)
    smooth = torch.nn.functional.avg_pool2d(noise, 9, stride=1, padding=4)[:, 0]   # neighbours alike: blobs
    ink = smooth > smooth.flatten(1).quantile(0.81, dim=1)[:, None, None]
    return (noise[:, 0] * 254 + 1).to(torch.uint8) * ink


def load_graphs(args, split):
    """The GraphSet of a split: from the cache, or built from the images and cached."""
    graphs = cached_graphs(args, split)
    if graphs is not None:
        return graphs
    images, labels = load_images(args.data_dir, args.dataset, split)
    graphs = build_graphs(images, labels, args.background)
    cache = cache_path(args, split)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # two runs building at once do not collide
    torch.save({**vars(graphs), "source": images_file(args, split)}, tmp)
    os.replace(tmp, cache)
    return graphs


def subset(graphs, idx):
    """The graphs `idx` as a GraphSet of their own (for the train / validation split)."""
    b = graphs.node_ptr
    n_nodes, n_edges = b[idx + 1] - b[idx], graphs.edge_ptr[idx + 1] - graphs.edge_ptr[idx]
    return GraphSet(graphs.nodes[ranges(b[idx], n_nodes)], pointers(n_nodes),
                    graphs.edges[:, ranges(graphs.edge_ptr[idx], n_edges)], pointers(n_edges), graphs.y[idx],
                    graphs.side)


def load_data(args):
    """Train / validation / test GraphSets: validation is the last --val-size training images,
    training the first --train-size (0: all) of the rest."""
    train, test = load_graphs(args, "train"), load_graphs(args, "test")
    if not 0 <= args.val_size < len(train):
        raise SystemExit(f"gnns: --val-size {args.val_size} must be below the {len(train)} training images")
    n = len(train) - args.val_size
    m = min(n, args.train_size) if args.train_size else n
    return {"train": subset(train, torch.arange(m)), "val": subset(train, torch.arange(n, len(train))),
            "test": test}
