"""Test harness: import one paper folder's flat modules without name clashes.

Every folder has its own `model.py`, `train.py`, ... and imports its siblings
flatly (`from model import GPT`), exactly as `python gpt/main.py` sees them.
`import_folder("gpt")` imports all of a folder's modules with that folder
first on `sys.path`, hands them back as attributes of a namespace, and then
takes the bare names (`model`, `train`, ...) out of `sys.modules` again, so
the next folder's `model.py` is a fresh import. Folder modules therefore
import their siblings at the top of the file.

Also here, for the tests of several folders: `write_idx` (synthetic MNIST-style
files), `cli_error_line` (a command that must fail with exactly one line) and
`count_syncs` (host reads of tensors during a training loop).
"""
import gzip
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")  # figures without a display
os.environ.setdefault("WANDB_MODE", "disabled")

# pytest.ini runs the tests in up to 4 processes (pytest-xdist, `-n auto`; `pytest -n 0`: one): each
# takes its share of the cores, so that their threads do not wait for each other
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    THREADS = max(1, (os.cpu_count() or 1) // WORKERS)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))  # the commands tests run
    torch.set_num_threads(min(THREADS, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parent.parent


def paper_folders():
    """Top-level folders that hold a `main.py`: the paper reimplementations."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "main.py").is_file())


def import_folder(folder):
    """Import every module of `ROOT/folder` and return them as a namespace."""
    path = ROOT / folder
    names = sorted(p.stem for p in path.glob("*.py"))
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(path))
    try:
        mods = {n: importlib.import_module(n) for n in names}
    finally:
        sys.path.remove(str(path))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    return SimpleNamespace(**mods)


def write_idx(path, array):
    """An MNIST-style IDX file, gzipped: 0, 0, type 0x08 (uint8), ndim, big-endian sizes, data."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def cli_error_line(folder, *args):
    """Run `python <folder>/main.py ARGS`, expect failure, return its one stderr line."""
    r = subprocess.run([sys.executable, str(ROOT / folder / "main.py"), *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture
def root():
    return ROOT


def shipped_copy(folder, dest):
    """pretrained/<folder>/ and pretrained/SHA256SUMS copied to dest/pretrained/, a copy to tamper with.
    -> dest/pretrained"""
    shutil.copytree(ROOT / "pretrained" / folder, dest / "pretrained" / folder)
    shutil.copy(ROOT / "pretrained" / "SHA256SUMS", dest / "pretrained" / "SHA256SUMS")
    return dest / "pretrained"


def flip_bit(path, at=None):
    """Flip the lowest bit of byte `at` of a file (default: the middle byte): one bit of one weight."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 1
    path.write_bytes(bytes(data))


def unlist(pretrained, name):
    """Drop the line of pretrained/<name> from that copy's SHA256SUMS (a file the manifest does not list)."""
    sums = pretrained / "SHA256SUMS"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if not line.endswith("  " + name)))


SYNCS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")   # each waits for a GPU's queue to drain


def count_syncs(monkeypatch, module, folder):
    """Spies on the Tensor methods that read a value on the host, counting the calls made by `folder`'s
    code while `module.train_epoch` runs (the step loop; the end-of-epoch logging is outside it)."""
    calls, active = [], []
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **kw):
            if active and sys._getframe(1).f_code.co_filename.startswith(str(ROOT / folder)):
                calls.append(_name)
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, spy)
    train_epoch = module.train_epoch

    def counted(*a, **kw):
        active.append(1)
        try:
            return train_epoch(*a, **kw)
        finally:
            active.pop()
    monkeypatch.setattr(module, "train_epoch", counted)
    return calls
