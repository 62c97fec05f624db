"""Redraw the README figures in images/ from the shipped weights in pretrained/.

    python images/regenerate.py --data-dir /path/to/datasets          # every folder
    python images/regenerate.py ppo translator                        # some folders (no data needed)

Each line below is a folder's own command (`--sample-only --pretrained` or its equivalent) with
`--figures-dir`; this script only runs them one after the other, from the repository root, with
their run folders under `--out-dir` (runs/regenerate/) so that no training run of yours is touched, and copies
into images/ the figures each command is listed for below. Commands
marked DATA draw from test images or sentences and need `--data-dir` (the layout of the top-level
README's Data section); without it they are skipped and said so. Curves are drawn from the training
logs shipped next to the weights; figures that no shipped model can draw (the long CPU runs' curves,
timing plots) are not redrawn here, and each folder README says which run drew them.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = "DATA"  # marks a command that reads a dataset
ATTENTION_PROMPT = "Lily and Ben went to the park. Lily saw a dog and she"

# folder: [(the folder's flags, the README figures that command redraws)]; a command may draw more
# (a curve of a short shipped log, say), but only the figures listed here are copied into images/.
COMMANDS = {
    "ddpm": [(["--dataset", "mnist", "--sample-only", "--pretrained"], ["ddpm_mnist_shipped_samples.png"]),
             (["--dataset", "fashion", "--sample-only", "--pretrained"],
              ["ddpm_fashion_shipped_samples.png", "ddpm_both.gif"])],
    "nf": [(["--sample-only", "--pretrained", DATA],
            ["nf_mnist_samples.png", "nf_mnist_temperatures.png", "nf_mnist_interpolation.png"])],
    "vit": [(["--dataset", d, "--sample-only", "--pretrained", DATA],
             [f"vit_{d}_attention.png", f"vit_{d}_confusion.png"]) for d in ("mnist", "fashion")],
    "fff": [(["--sample-only", "--pretrained", DATA], ["fff_leaves.png", "fff_curves.png"])],
    "gnns": [(["--model", "gcn", "--sample-only", "--pretrained", DATA], ["gnns_mnist_gcn_graph.png"]),
             (["--model", "gat", "--sample-only", "--pretrained", DATA], ["gnns_mnist_gat_graph.png", "gnns_mnist_curves.png"])],
    "ppo": [(["--sample-only", "--pretrained"], ["ppo_cartpole.gif", "ppo_cartpole_curve.png"])],
    "tiny_stories_lm": [(["attention", "--pretrained", "--layer", "3", "--attention-prompt", ATTENTION_PROMPT],
                         ["tiny_stories_lm_attention_layer3.png"])],
    "translator": [(["translate", "--pretrained", "She saw a boy sitting on a bench."], ["translator_attention.png"])],
    "sequence_models": [(["--task", t, "--sample-only", "--pretrained"], [f"sequence_models_{t}_pretrained_curves.png"])
                        for t in ("imdb", "numbers")],
}


def command(folder, i, spec, data_dir, figures_dir, out_dir):
    """The argv that runs one entry of COMMANDS, or None when it needs data that was not given."""
    if DATA in spec and data_dir is None:
        return None
    flags = [a for a in spec if a != DATA]
    out = ["--out-dir", str(Path(out_dir) / f"{folder}-{i}"), "--figures-dir", str(figures_dir)]
    data = ["--data-dir", data_dir] if DATA in spec else []
    if folder == "translator":  # `translate TEXT`: the sentence goes last
        return [sys.executable, str(ROOT / folder / "main.py"), *flags[:-1], *out, flags[-1]]
    return [sys.executable, str(ROOT / folder / "main.py"), *flags, *out, *data]


def redraw(folder, i, spec, figures, args):
    """Run one command into a scratch folder and copy the figures it is listed for; False on failure."""
    with tempfile.TemporaryDirectory() as scratch:
        cmd = command(folder, i, spec, args.data_dir, scratch, args.out_dir)
        shown = " ".join(repr(a) if " " in a else a for a in [f"{folder}/main.py", *(spec if cmd is None else cmd[2:])])
        if cmd is None:
            print(f"skipped (needs --data-dir): {shown}")
            return True
        t0 = time.perf_counter()
        ok = subprocess.run(cmd, cwd=ROOT).returncode == 0
        missing = [f for f in figures if not (Path(scratch) / f).is_file()]
        ok = ok and not missing
        if ok:
            for f in figures:
                shutil.copyfile(Path(scratch) / f, Path(args.figures_dir) / f)
        print(f"{'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f} s: {shown}"
              + (f" (did not draw {', '.join(missing)})" if missing else f" -> {', '.join(figures)}"))
        return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", metavar="FOLDER", help=f"folders to redraw (default: all: {', '.join(COMMANDS)})")
    p.add_argument("--data-dir", help="dataset root for the commands that draw from test data (skipped without it)")
    p.add_argument("--figures-dir", default=str(ROOT / "images"), help="where the figures go (default: images/)")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "regenerate"),
                   help="where the commands' run folders go (default: runs/regenerate/)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.folders) - set(COMMANDS))
    if unknown:
        p.error(f"no figures to redraw for {', '.join(unknown)} (folders: {', '.join(COMMANDS)})")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder")
    for flag, path in (("--figures-dir", args.figures_dir), ("--out-dir", args.out_dir)):
        if Path(path).is_file():
            p.error(f"{flag} {path} is a file; pass a folder")
    Path(args.figures_dir).mkdir(parents=True, exist_ok=True)
    failed = 0
    for folder in args.folders or COMMANDS:
        for i, (spec, figures) in enumerate(COMMANDS[folder]):
            failed += not redraw(folder, i, spec, figures, args)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
