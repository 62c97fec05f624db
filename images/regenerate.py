"""Redraw the README figures in images/ from the shipped weights in pretrained/.

    python images/regenerate.py --data-dir /path/to/datasets          # every folder
    python images/regenerate.py ppo translator                        # some folders (no data needed)

Each line below is a folder's own command (`--sample-only --pretrained` or its equivalent) with
`--figures-dir images`; this script only runs them one after the other, from the repository root,
with their run folders under runs/regenerate/ so that no training run of yours is touched. Commands
marked DATA draw from test images or sentences and need `--data-dir` (the layout of the top-level
README's Data section); without it they are skipped and said so. Curves are drawn from the training
logs shipped next to the weights; figures that no shipped model can draw (the long CPU runs' curves,
timing plots) are not redrawn here, and each folder README says which run drew them.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = "DATA"  # marks a command that reads a dataset
ATTENTION_PROMPT = "Lily and Ben went to the park. Lily saw a dog and she"

COMMANDS = {
    "ddpm": [["--dataset", "fashion", "--sample-only", "--pretrained"]],
    "nf": [["--sample-only", "--pretrained", DATA]],
    "vit": [["--dataset", "mnist", "--sample-only", "--pretrained", DATA],
            ["--dataset", "fashion", "--sample-only", "--pretrained", DATA]],
    "fff": [["--sample-only", "--pretrained", DATA]],
    "gnns": [["--model", "gcn", "--sample-only", "--pretrained", DATA],
             ["--model", "gat", "--sample-only", "--pretrained", DATA]],
    "ppo": [["--sample-only", "--pretrained"]],
    "tiny_stories_lm": [["attention", "--pretrained", "--layer", "3", "--attention-prompt", ATTENTION_PROMPT]],
    "translator": [["translate", "--pretrained", "She saw a boy sitting on a bench."]],
    "sequence_models": [["--task", "imdb", "--sample-only", "--pretrained"],
                        ["--task", "numbers", "--sample-only", "--pretrained"]],
}


def command(folder, i, spec, data_dir, figures_dir):
    """The argv that runs one entry of COMMANDS, or None when it needs data that was not given."""
    if DATA in spec and data_dir is None:
        return None
    flags = [a for a in spec if a != DATA]
    out = ["--out-dir", str(ROOT / "runs" / "regenerate" / f"{folder}-{i}"), "--figures-dir", str(figures_dir)]
    data = ["--data-dir", data_dir] if DATA in spec else []
    if folder == "translator":  # `translate TEXT`: the sentence goes last
        return [sys.executable, str(ROOT / folder / "main.py"), *flags[:-1], *out, flags[-1]]
    return [sys.executable, str(ROOT / folder / "main.py"), *flags, *out, *data]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", metavar="FOLDER", help=f"folders to redraw (default: all: {', '.join(COMMANDS)})")
    p.add_argument("--data-dir", help="dataset root for the commands that draw from test data (skipped without it)")
    p.add_argument("--figures-dir", default=str(ROOT / "images"), help="where the figures go (default: images/)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.folders) - set(COMMANDS))
    if unknown:
        p.error(f"no figures to redraw for {', '.join(unknown)} (folders: {', '.join(COMMANDS)})")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        p.error(f"--data-dir {args.data_dir} is not a folder")
    if Path(args.figures_dir).is_file():
        p.error(f"--figures-dir {args.figures_dir} is a file; pass a folder")
    failed = 0
    for folder in args.folders or COMMANDS:
        for i, spec in enumerate(COMMANDS[folder]):
            cmd = command(folder, i, spec, args.data_dir, args.figures_dir)
            shown = " ".join(repr(a) if " " in a else a for a in [f"{folder}/main.py", *(spec if cmd is None else cmd[2:])])
            if cmd is None:
                print(f"skipped (needs --data-dir): {shown}")
                continue
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=ROOT)
            failed += r.returncode != 0
            print(f"{'ok' if r.returncode == 0 else 'FAILED'} in {time.perf_counter() - t0:.0f} s: {shown}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
