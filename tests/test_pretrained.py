"""The shipped weights in pretrained/: complete manifest, within budget, safetensors only, and the
README's try-it commands working offline from a fresh clone (issue 29). Each folder's own tests check
that its weights load into today's model code and reproduce the check in their JSON."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import safetensors
from conftest import ROOT, paper_folders

PRETRAINED = ROOT / "pretrained"
MiB = 2 ** 20


def shipped_files():
    return sorted(p for p in PRETRAINED.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS", "README.md"))


def test_the_manifest_lists_every_shipped_file_with_its_hash():
    listed = {}
    for line in (PRETRAINED / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    actual = {p.relative_to(PRETRAINED).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in shipped_files()}
    assert listed == actual


def test_the_shipped_files_fit_the_budget():
    sizes = {p.relative_to(PRETRAINED).as_posix(): p.stat().st_size for p in shipped_files()}
    assert {n: s for n, s in sizes.items() if s > 4 * MiB} == {}, "at most 4 MiB per file"
    assert sum(sizes.values()) <= 30 * MiB, f"{sum(sizes.values()) / MiB:.1f} MiB shipped; the budget is 30"


def test_weights_are_safetensors_and_every_folder_ships_some():
    assert [p.name for p in shipped_files() if p.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt")] == []
    for folder in paper_folders():
        weights = sorted((PRETRAINED / folder).glob("*.safetensors"))
        assert weights, f"pretrained/{folder}/ ships no weights"
        for w in weights:
            with safetensors.safe_open(str(w), framework="pt") as f:  # parses without unpickling anything
                assert len(list(f.keys())) > 0
            card = json.loads(w.with_suffix(".json").read_text())
            missing = {"config", "command", "hardware", "wall_time_s", "metric", "check"} - set(card)
            assert not missing, f"{w.with_suffix('.json').name} lacks {sorted(missing)}"


# The README's "Try it" commands, as written there, and how each test run checks it did its job.
# The tests run them from an empty folder (no data/, no runs/), so nothing but the shipped weights is
# at hand; OUT is a fresh folder for what they write.
REVIEW = "A dull, lifeless mess. The plot makes no sense and I nearly walked out."
TRY_IT = {
    "ddpm": ("python ddpm/main.py --dataset fashion --sample-only --pretrained --figures-dir images",
             ["--dataset", "fashion", "--sample-only", "--pretrained", "--out-dir", "OUT", "--figures-dir", "OUT"],
             ["ddpm_both.gif"], None),
    "translator": ('python translator/main.py translate --pretrained "She saw a boy sitting on a bench."',
                   ["translate", "--pretrained", "She saw a boy sitting on a bench."], [], "Elle"),
    "tiny_stories_lm": ('python tiny_stories_lm/main.py sample --pretrained --prompt "Once upon a time"',
                        ["sample", "--pretrained", "--prompt", "Once upon a time", "--out-dir", "OUT"], [],
                        "Once upon a time"),
    "ppo": ("python ppo/main.py --sample-only --pretrained",
            ["--sample-only", "--pretrained", "--out-dir", "OUT", "--figures-dir", "OUT"], ["ppo_cartpole.gif"], None),
    "gpt": ('python gpt/main.py --sample-only --pretrained --prompt "Big Brother"',
            ["--sample-only", "--pretrained", "--prompt", "Big Brother", "--out-dir", "OUT", "--figures-dir", "OUT"],
            [], "Big Brother"),
    "vit": ("python vit/main.py --dataset fashion --sample-only --pretrained",
            ["--dataset", "fashion", "--sample-only", "--pretrained", "--out-dir", "OUT", "--figures-dir", "OUT"],
            [], None),
    "fff": ("python fff/main.py --sample-only --pretrained",
            ["--sample-only", "--pretrained", "--out-dir", "OUT", "--figures-dir", "OUT"], [], None),
    "gnns": ("python gnns/main.py --model gat --sample-only --pretrained",
             ["--model", "gat", "--sample-only", "--pretrained", "--out-dir", "OUT", "--figures-dir", "OUT"], [], None),
    "nf": ("python nf/main.py --sample-only --pretrained",
           ["--sample-only", "--pretrained", "--out-dir", "OUT", "--figures-dir", "OUT"], ["nf_mnist_samples.png"], None),
    "sequence_models": (f'python sequence_models/main.py interact --pretrained --task imdb --review "{REVIEW}"',
                        ["interact", "--pretrained", "--task", "imdb", "--review", REVIEW], [], "negative"),
}


def test_every_folder_has_a_try_it_command_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert sorted([*TRY_IT, "lm_compression"]) == paper_folders()
    assert [c for c, *_ in TRY_IT.values() if c not in readme] == []
    assert "python lm_compression/main.py compress --pretrained IN OUT" in readme


def run(folder, argv, cwd):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / folder / "main.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("folder", sorted(TRY_IT))
def test_the_try_it_command_works_offline_from_an_empty_folder(folder, tmp_path):
    _, argv, files, printed = TRY_IT[folder]
    out = tmp_path / "out"
    r = run(folder, [str(out) if a == "OUT" else a for a in argv], cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert [f for f in files if not (out / f).is_file()] == [], sorted(p.name for p in out.rglob("*"))
    if printed:
        assert printed in r.stdout, r.stdout[-2000:]
    assert not (tmp_path / "data").exists(), "a try-it command reads no dataset"


def test_the_compress_try_it_round_trips(tmp_path):
    text = ("It was a bright cold day in April, and the clocks were striking thirteen. " * 40).encode()
    (tmp_path / "IN").write_bytes(text)
    r = run("lm_compression", ["compress", "--pretrained", "IN", "OUT"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 0 < (tmp_path / "OUT").stat().st_size < len(text) / 2
    r = run("lm_compression", ["decompress", "--pretrained", "OUT", "BACK"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "BACK").read_bytes() == text


def test_regenerate_redraws_from_the_shipped_weights_and_skips_what_needs_data(tmp_path):
    figures, runs = tmp_path / "figures", tmp_path / "runs"
    r = subprocess.run([sys.executable, "images/regenerate.py", "--figures-dir", str(figures), "--out-dir", str(runs),
                        "tiny_stories_lm", "fff"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert sorted(p.name for p in figures.iterdir()) == ["tiny_stories_lm_attention_layer3.png"]
    assert (runs / "tiny_stories_lm-0" / "attention.html").is_file()  # its run folder, not the checkout's runs/
    assert "skipped (needs --data-dir): fff/main.py" in r.stdout
