"""The novel as characters: find (or download) the text, build the vocabulary,
split 90/10, and draw random (B, T) windows."""
import http.client
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

# Project Gutenberg Australia's plain-text edition of Nineteen Eighty-Four.
URL = "https://gutenberg.net.au/ebooks01/0100021.txt"


def text_path(args):
    return Path(args.data) if args.data else Path(args.data_dir) / "text" / "1984.txt"


def download(path):
    """Fetch the novel, keep the story from 'Chapter 1' to 'THE END', write it atomically."""
    with urllib.request.urlopen(URL, timeout=30) as r:
        text = r.read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    start, end = text.find("Chapter 1"), text.rfind("THE END")
    if start >= 0 and end > start:
        text = text[start:end + len("THE END")] + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_text(args):
    path = text_path(args)
    if path.is_dir():
        raise SystemExit(f"gpt: {path} is a directory; --data takes a text file")
    if not path.is_file():
        if args.data:
            raise SystemExit(f"gpt: --data {path}: no such file")
        try:
            print(f"downloading 1984 from {URL} to {path}")
            download(path)
        except (OSError, http.client.HTTPException) as e:
            raise SystemExit(f"gpt: no text at {path} and the download from {URL} failed ({e}); save that "
                             f"file as {path}, or pass --data-dir DIR with DIR/text/1984.txt, or --data FILE")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise SystemExit(f"gpt: cannot read {path} ({e.strerror})")
    if "\0" in text:
        raise SystemExit(f"gpt: {path} looks binary (it holds NUL bytes); give a text file")
    if len(text) < 100:
        raise SystemExit(f"gpt: {path} holds {len(text)} characters; need a text of at least 100")
    return text


class CharTokenizer:
    """Characters <-> ids; the vocabulary is the sorted set of the text's characters."""

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def __len__(self):
        return len(self.chars)

    def encode(self, s):
        unknown = sorted(set(s) - self.stoi.keys())
        if unknown:
            raise SystemExit(f"gpt: characters {''.join(unknown)!r} are not in the model's vocabulary "
                             f"{self.chars!r}")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def train_val_split(ids, block_size):
    """First 90% of the text trains, the last 10% validates."""
    ids = np.asarray(ids, dtype=np.int64)
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]
    if len(val) <= block_size:
        raise SystemExit(f"gpt: the validation split has {len(val)} characters, fewer than "
                         f"--block-size {block_size} + 1; use a longer text or a smaller --block-size")
    return train, val


def get_batch(data, batch_size, block_size, key):
    """x, y of shape (B, T), y shifted by one. The windows are a pure function of `key`
    (seed, step, rank, micro-step), so a resumed run sees exactly the batches it would have seen."""
    rng = np.random.default_rng(key)
    ix = rng.integers(0, len(data) - block_size, size=batch_size)
    w = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)])  # (B, T + 1)
    return w[:, :-1], w[:, 1:]


def val_windows(val, block_size, batch_size):
    """The whole validation split as consecutive non-overlapping windows, in batches."""
    n = (len(val) - 1) // block_size
    x = torch.from_numpy(val[:n * block_size]).view(n, block_size)
    y = torch.from_numpy(val[1:n * block_size + 1]).view(n, block_size)
    return list(zip(x.split(batch_size), y.split(batch_size)))
