"""benchmarks/run.py: every folder's --benchmark as a subprocess, one CSV and one markdown table."""
import csv
import subprocess
import sys

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
