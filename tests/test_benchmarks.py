"""benchmarks/run.py: every folder's --benchmark as a subprocess, one CSV and one markdown table."""
import csv
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def test_run_collects_two_folders_into_one_csv_and_table(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/run.py", "--device", "cpu", "--quick", "--benchmark-steps", "2",
                        "--data-dir", str(tmp_path / "no-data"), "--results-dir", str(tmp_path), "fff", "gpt"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = tmp_path.glob("cpu-*-quick.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [row["folder"] for row in rows] == ["fff", "gpt"]
    table = r.stdout.split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(rows)
    for row, line in zip(rows, table[2:]):
        assert not row["error"] and row["device"] == "cpu" and row["data"] == "random"
        assert int(row["params"]) > 0 and int(row["batch_size"]) > 0
        # the throughput is the batch over the median step, as the folders promise
        assert abs(float(row["samples_per_s"]) * float(row["step_ms"]) / 1000 / int(row["batch_size"]) - 1) < 0.01
        assert abs(float(row["tflops"]) * 1e12 / (float(row["flops_per_sample"]) * float(row["samples_per_s"])) - 1) < 0.01
        assert line.startswith(f"| {row['folder']} | cpu |")


def test_an_unknown_folder_is_a_one_line_error():
    r = subprocess.run([sys.executable, "benchmarks/run.py", "nosuchfolder"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "nosuchfolder" in r.stderr.strip().splitlines()[-1]


def load_run_py():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    return run


GPU_ROW = {"device": "cuda:0 NVIDIA H200", "unit": "images", "samples_per_s": 1234.5, "step_ms": 2.0}


def csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_run_stopped_half_way_keeps_the_rows_it_measured(tmp_path, monkeypatch, capsys):
    """The CSV is rewritten after every folder: stopping the run (a timeout, Ctrl-C) loses no row. A
    first folder that fails has no device name: its provisional auto-<date>.csv gives way to the GPU's."""
    run = load_run_py()

    def run_folder(folder, args):
        if folder == "gpt":
            raise KeyboardInterrupt
        return {"folder": folder, "error": "no output"} if folder == "ddpm" else dict(GPU_ROW, folder=folder)

    monkeypatch.setattr(run, "run_folder", run_folder)
    with pytest.raises(KeyboardInterrupt):
        run.main(["--results-dir", str(tmp_path), "ddpm", "fff", "gnns", "gpt"])
    (path,) = tmp_path.glob("*.csv")  # one file, named after the GPU, not "auto"
    assert path.name.startswith("cuda0 NVIDIA H200-") and not path.name.endswith("-compile.csv")
    assert [r["folder"] for r in csv_rows(path)] == ["ddpm", "fff", "gnns"]
    progress = capsys.readouterr().err.splitlines()
    assert progress[0].startswith("ddpm: ") and progress[0].endswith(" s (no output)")
    assert progress[2].startswith("gnns: ") and progress[2].endswith(" s, 1,234 images/s, 2 ms/step")


def test_rerunning_some_folders_replaces_their_rows_and_keeps_the_others(tmp_path, monkeypatch):
    """A second run that day (one folder again) must not replace the first run's table; --compile
    runs go to their own file."""
    run = load_run_py()
    rate = {"value": 100.0}
    monkeypatch.setattr(run, "run_folder", lambda folder, args: dict(GPU_ROW, folder=folder,
                                                                      samples_per_s=rate["value"]))
    run.main(["--results-dir", str(tmp_path), "fff", "gnns", "vit"])
    rate["value"] = 200.0
    run.main(["--results-dir", str(tmp_path), "gnns"])
    run.main(["--results-dir", str(tmp_path), "--compile", "vit"])
    plain, compiled = sorted(tmp_path.glob("*.csv"), key=lambda p: p.name.endswith("-compile.csv"))
    assert compiled.name.endswith("-compile.csv")
    assert [(r["folder"], float(r["samples_per_s"])) for r in csv_rows(plain)] == [
        ("fff", 100.0), ("gnns", 200.0), ("vit", 100.0)]
    assert [(r["folder"], float(r["samples_per_s"])) for r in csv_rows(compiled)] == [("vit", 200.0)]


def test_the_gpu_script_names_flags_its_folders_have_and_skips_what_does_not_fit(tmp_path):
    """benchmarks/gpu_language.sh runs on a lent GPU, where a renamed flag would cost the whole call: every
    --flag of its commands is in that folder's --help (of its subcommand). With no time left every command
    is skipped, each on a line of summary.txt, and nothing runs."""
    script = ROOT / "benchmarks" / "gpu_language.sh"
    dry = subprocess.run(["bash", script, tmp_path / "data", tmp_path / "logs"], capture_output=True, text=True,
                         env={**os.environ, "DRY": "1"}, check=True).stdout.splitlines()
    assert len(dry) >= 10 and not (tmp_path / "logs").exists()
    commands = [line.split(": ", 1)[1].split() for line in dry]
    assert all(words[0] == "python" and (ROOT / words[1]).is_file() for words in commands), dry
    # the script or subcommand (benchmark-coder, evaluate) of each command: its --help, all started at once
    keys = [(words[1], *[w for w in words[2:3] if not w.startswith("-")]) for words in commands]
    helps = {key: subprocess.Popen([sys.executable, *key, "--help"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for key in dict.fromkeys(keys)}
    helps = {key: p.communicate()[0] for key, p in helps.items()}
    for words, key in zip(commands, keys):
        flags = [w.replace("--no-", "--", 1) for w in words[2:] if w.startswith("--")]  # --no-X: X's switch
        missing = [f for f in flags if not re.search(rf"(?<![\w-]){f}(?![\w-])", helps[key])]
        assert not missing, (words, missing)
    subprocess.run(["bash", script, tmp_path / "data", tmp_path / "logs", "0"], capture_output=True, check=True)
    summary = (tmp_path / "logs" / "summary.txt").read_text().splitlines()
    assert len(summary) == len(dry) and all(": skipped, " in s for s in summary)
