"""Run every paper folder's `--benchmark` and collect the JSON lines into one table.

    python benchmarks/run.py                          # every folder, default configs, auto device
    python benchmarks/run.py --device cpu --quick     # every folder's --quick config, a few steps
    python benchmarks/run.py gpt vit --compile        # some folders; extra flags go to each of them

Each folder is run as its own process (`python <folder>/main.py --benchmark ...`), exactly as a
reader would run it; no folder is imported here. A folder prints one JSON line as its last line of
stdout (the columns are explained in benchmarks/README.md). The rows are written to
benchmarks/results/<device>-<date>[-quick][-compile].csv after every folder (a run stopped
half-way keeps what it measured; rows of other folders from an earlier run that day stay) and
printed as a markdown table at the end. A folder that fails is a row with its one-line error; the
others still run.
"""
import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A folder whose training is a subcommand: its --benchmark flag belongs to that subcommand.
SUBCOMMAND = {"lm_compression": ["train"]}
COLUMNS = ["folder", "device", "torch", "params", "batch_size", "unit", "samples_per_s", "step_ms", "data",
           "flops_per_sample", "tflops", "mfu", "peak_mem_mb", "compile", "error"]


def paper_folders():
    return sorted(p.name for p in ROOT.iterdir() if (p / "main.py").is_file())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="folders to run (default: all)")
    p.add_argument("--device", default="auto", help="passed to every folder: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--quick", action="store_true", help="each folder's --quick config and few steps (CPU: < 3 min)")
    p.add_argument("--compile", action="store_true", help="pass --compile to the folders")
    p.add_argument("--benchmark-steps", type=int, default=None, help="timed steps per folder (default: theirs)")
    p.add_argument("--data-dir", default=None, help="passed to every folder (default: theirs, data/)")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"), help="where the CSV goes")
    p.add_argument("--timeout", type=float, default=600, help="seconds per folder before it is stopped")
    args = p.parse_args(argv)
    unknown = sorted(set(args.folders) - set(paper_folders()))
    if unknown:
        p.error(f"no such folder: {', '.join(unknown)} (folders: {', '.join(paper_folders())})")
    if args.benchmark_steps is not None and args.benchmark_steps < 1:
        p.error("--benchmark-steps must be at least 1")
    if Path(args.results_dir).is_file():
        p.error(f"--results-dir {args.results_dir} is a file; pass a folder")
    return args


def folder_argv(folder, args):
    argv = [sys.executable, str(ROOT / folder / "main.py"), *SUBCOMMAND.get(folder, []), "--benchmark",
            "--device", args.device]
    if args.quick:
        argv.append("--quick")
    if args.compile:
        argv.append("--compile")
    if args.benchmark_steps:
        argv += ["--benchmark-steps", str(args.benchmark_steps)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    return argv


def run_folder(folder, args):
    """One folder's JSON line as a dict; a failure becomes a row with its last stderr line."""
    try:
        r = subprocess.run(folder_argv(folder, args), cwd=ROOT, capture_output=True, text=True,
                           timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"folder": folder, "error": f"stopped after {args.timeout:g} s"}
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        why = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"folder": folder, "error": why}
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"folder": folder, "error": f"last line is not JSON: {lines[-1][:200]}"}


def fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)


def markdown(rows):
    cols = [c for c in COLUMNS if any(r.get(c) not in (None, "") for r in rows)]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def write_csv(rows, args, previous=None):
    """Write the rows so far to the file of the first row's device (a GPU's name once one has run),
    date and mode. The rows of folders this run has not measured, from an earlier run's file of the
    same name, are kept: re-running one folder replaces its row, not the table."""
    device = next((r["device"] for r in rows if r.get("device")), args.device).replace(":", "")
    suffix = ("-quick" if args.quick else "") + ("-compile" if args.compile else "")
    out = Path(args.results_dir) / f"{device}-{datetime.date.today().isoformat()}{suffix}.csv"
    measured = {r["folder"] for r in rows}
    kept = []
    if out.is_file():
        with open(out, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r.get("folder") not in measured]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(sorted(kept + rows, key=lambda r: r["folder"]))
    os.replace(tmp, out)
    if previous is not None and previous != out:
        previous.unlink(missing_ok=True)
    return out


def progress(row, seconds):
    if row.get("error"):
        return f"{row['folder']}: {seconds:.1f} s ({row['error']})"
    return (f"{row['folder']}: {seconds:.1f} s, {fmt(row.get('samples_per_s'))} {row.get('unit', 'samples')}/s, "
            f"{fmt(row.get('step_ms'))} ms/step")


def main(argv=None):
    args = parse_args(argv)
    rows, out = [], None
    for folder in args.folders or paper_folders():
        t0 = time.perf_counter()
        rows.append(run_folder(folder, args))
        print(progress(rows[-1], time.perf_counter() - t0), file=sys.stderr, flush=True)
        # rewritten after every folder, so a run stopped half-way keeps the rows it measured
        out = write_csv(rows, args, previous=out)
    print(markdown(rows))
    print(f"\nwritten to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
