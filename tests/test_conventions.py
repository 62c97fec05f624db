"""Conventions every paper folder keeps: the shared flags, one-line errors,
and no code shared between folders."""
import ast
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import ROOT, import_folder, paper_folders, write_idx

SHARED_FLAGS = ["--device", "--seed", "--data-dir", "--out-dir", "--quick", "--wandb",
                "--resume", "--figures-dir", "--sample-only"]
FOLDERS = paper_folders()


def run_main(folder, *args, cwd=ROOT):
    # progress bars write to stderr (the error must be its only line); one thread: the runs are tiny
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / folder / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("folder", FOLDERS)
def test_help_lists_shared_flags(folder):
    r = run_main(folder, "--help")
    assert r.returncode == 0, r.stderr
    missing = [f for f in SHARED_FLAGS if f not in r.stdout]
    assert not missing, f"{folder}/main.py --help lacks {missing}"


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("args", [["--no-such-flag"], ["--seed", "abc"], ["--device", "gpu7"]],
                         ids=["unknown-flag", "bad-seed", "bad-device"])
def test_bad_flag_is_a_one_line_error(folder, args):
    r = run_main(folder, *args)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{r.stderr}"


def _imported_names(source):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("folder", FOLDERS)
def test_folder_imports_no_other_folder(folder):
    own = {p.stem for p in (ROOT / folder).glob("*.py")}
    others = {p.stem for f in FOLDERS if f != folder for p in (ROOT / f).glob("*.py")}
    for path in sorted((ROOT / folder).rglob("*.py")):
        source = path.read_text()
        assert "sys.path" not in source, f"{path.relative_to(ROOT)} edits sys.path"
        for name in _imported_names(source):
            assert name not in FOLDERS, f"{path.relative_to(ROOT)} imports folder {name}"
            assert name in own or name not in others, \
                f"{path.relative_to(ROOT)} imports {name!r}, which only another folder has"


# --- hostile inputs every folder answers in one line (issue 25) ---------------------------------

# Per folder: the subcommand (if any) that trains, and a model size no machine here can hold.
TRAIN_CMD = {"lm_compression": ["train"]}
ABSURD_SIZE = {
    "ddpm": ["--base", "100000"], "fff": ["--leaf-width", "100000", "--depth", "20"],
    "gnns": ["--hidden", "100000"], "gpt": ["--n-embd", "100000", "--n-head", "2"],
    "lm_compression": ["--n-embd", "100000"], "nf": ["--hidden", "100000"],
    "ppo": ["--num-envs", "100000", "--num-steps", "100000", "--total-timesteps", "10000000000"],
    "sequence_models": ["--hidden-size", "100000"], "tiny_stories_lm": ["--n-embd", "100000"],
    "translator": ["--d-model", "100000"], "vit": ["--dim", "100000"],
}


def one_line(r):
    assert r.returncode != 0, r.stdout[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{r.stderr}"
    return lines[0]


def test_every_folder_has_an_absurd_size_case():
    assert sorted(ABSURD_SIZE) == FOLDERS


def error_line(folder, argv, capsys):
    """Run FOLDER/main.py's main(ARGV) in this process (no interpreter start-up); it must stop with
    one line, on stderr or as the exit message, and no traceback."""
    main = import_folder(folder).main
    with pytest.raises(SystemExit) as e:
        main.main([str(a) for a in argv])
    assert e.value.code not in (0, None)
    text = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    return lines[0]


@pytest.mark.parametrize("folder", FOLDERS)
def test_absurd_model_size_is_refused_before_allocating(folder, tmp_path, capsys):
    """The memory a model would need is estimated before anything is allocated or read, and nothing
    is left behind (not even an empty run folder)."""
    out = tmp_path / "run"
    (tmp_path / "empty").mkdir()
    line = error_line(folder, [*TRAIN_CMD.get(folder, []), *ABSURD_SIZE[folder], "--device", "cpu",
                               "--data-dir", tmp_path / "empty", "--out-dir", out], capsys)
    assert "memory" in line.lower(), line
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--out-dir", "--figures-dir"])
@pytest.mark.parametrize("folder", FOLDERS)
def test_an_existing_file_as_output_folder_is_refused_and_kept(folder, flag, tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("the user's notes")
    (tmp_path / "empty").mkdir()
    cmd = TRAIN_CMD.get(folder, [])
    if folder == "lm_compression" and flag == "--figures-dir":  # only `benchmark` draws figures
        cmd = ["benchmark", path]
    args = [*cmd, "--device", "cpu", "--data-dir", tmp_path / "empty", flag, path]
    if flag == "--figures-dir":
        args += ["--out-dir", tmp_path / "run"]
    assert str(path) in error_line(folder, args, capsys)
    assert path.read_text() == "the user's notes"


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_help_and_no_message_names_the_developers_data_folder(folder):
    """`../shared` exists only on the machines this project is developed on."""
    for path in sorted((ROOT / folder).glob("*.py")):
        assert "shared/data" not in path.read_text(), f"{path.relative_to(ROOT)} names ../shared/data"
    assert "shared/data" not in run_main(folder, "--help").stdout


# Per folder: a tiny synthetic dataset (built by the test) and a short training run on it. With
# --lr 1e9 every one of them diverges; the run must stop with one line, and no checkpoint it leaves
# may hold a non-finite number.
def _mnist(root):
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 300), ("t10k", 60)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 12 * (c // 5):8 + 12 * (c // 5), 2 + 5 * (c % 5):8 + 5 * (c % 5)] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)


def _text(root):
    (root / "text").mkdir(parents=True)
    (root / "text" / "1984.txt").write_text("".join(f"It was a bright cold day in April, number {i % 13}. "
                                                     for i in range(400)))


def _names(root):
    (root / "names").mkdir(parents=True)
    rng = np.random.default_rng(0)
    (root / "names" / "names.txt").write_text("\n".join("".join(rng.choice(list("abcdehilmnorsty"), rng.integers(3, 8)))
                                                        for _ in range(400)) + "\n")


def _tinystories(root):
    (root / "tinystories").mkdir(parents=True)
    story = "Once upon a time, {0} went to the park. {0} saw a big dog. \"Hello, dog!\" said {0}. The end."
    for split, n in (("train", 200), ("valid", 40)):
        (root / "tinystories" / f"{split}_excerpt.txt").write_text(
            "\n\n".join(story.format(["Lily", "Tom", "Ben", "Mia"][i % 4]) for i in range(n)))


def _tatoeba(root):
    (root / "tatoeba").mkdir(parents=True)
    nouns = {"cat": "chat", "dog": "chien", "bird": "oiseau", "horse": "cheval"}
    verbs = {"sleeps": "dort", "eats": "mange", "runs": "court", "sings": "chante"}
    lines = [f"The {n} {v}.\tLe {fn} {fv}.\tCC-BY 2.0 (France) Attribution: tatoeba.org\n"
             for n, fn in nouns.items() for v, fv in verbs.items()] * 5
    with zipfile.ZipFile(root / "tatoeba" / "fra-eng.zip", "w") as z:
        z.writestr("fra.txt", "".join(lines))


MNIST_TINY = ["--epochs", "2", "--train-size", "200", "--batch-size", "50"]
DIVERGE = {
    "ddpm": (_mnist, [*MNIST_TINY, "--base", "8", "--res-blocks", "1", "--T", "20", "--warmup-steps", "0",
                      "--n-samples", "4", "--n-eval", "8", "--eval-batch", "8", "--classifier-epochs", "1"]),
    "fff": (_mnist, [*MNIST_TINY, "--val-size", "50", "--depth", "2", "--leaf-width", "8"]),
    "gnns": (_mnist, [*MNIST_TINY, "--val-size", "50", "--hidden", "8", "--layers", "2", "--heads", "2"]),
    "gpt": (_text, ["--steps", "40", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
                    "--batch-size", "8", "--warmup-steps", "0", "--eval-interval", "20"]),
    "lm_compression": (_text, ["--steps", "40", "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--context", "16",
                               "--batch-size", "8", "--warmup-steps", "0", "--eval-interval", "20"]),
    "nf": (_mnist, [*MNIST_TINY, "--n-couplings", "5", "--hidden", "8", "--blocks", "1", "--warmup-steps", "0"]),
    "ppo": (None, ["--env-id", "Pendulum-v1", "--num-envs", "2", "--num-steps", "64", "--num-minibatches", "2",
                   "--update-epochs", "2", "--total-timesteps", "512", "--save-interval", "1"]),
    "sequence_models": (_names, ["--task", "names", "--epochs", "2", "--emb-size", "8", "--hidden-size", "16"]),
    "tiny_stories_lm": (_tinystories, ["--steps", "40", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                                       "--block-size", "16", "--batch-size", "8", "--vocab-size", "300",
                                       "--warmup-steps", "0", "--eval-interval", "20", "--eval-tokens", "0"]),
    "translator": (_tatoeba, ["--steps", "40", "--n-layer", "1", "--n-head", "2", "--d-model", "16", "--d-ff", "32",
                              "--vocab-size", "300", "--batch-size", "8", "--warmup-steps", "1",
                              "--eval-interval", "20", "--eval-sentences", "2"]),
    "vit": (_mnist, [*MNIST_TINY, "--val-size", "50", "--patch-size", "7", "--dim", "16", "--depth", "1",
                     "--heads", "2", "--mlp-dim", "32", "--warmup-epochs", "0"]),
}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_every_folder_has_a_divergence_case():
    assert sorted(DIVERGE) == FOLDERS


@pytest.mark.parametrize("folder", FOLDERS)
def test_divergence_stops_with_one_line_and_no_non_finite_checkpoint(folder, tmp_path):
    build, args = DIVERGE[folder]
    if build:
        build(tmp_path / "data")
    out = tmp_path / "run"
    r = run_main(folder, *TRAIN_CMD.get(folder, []), *args, "--lr", "1e9", "--device", "cpu",
                 "--data-dir", str(tmp_path / "data"), "--out-dir", str(out), cwd=tmp_path)  # caches under runs/ go there
    line = one_line(r)
    assert "non-finite" in line and "--lr" in line, line
    for path in sorted(out.rglob("*.pt")):
        for t in _tensors(torch.load(path, weights_only=True)):
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{path} holds a non-finite tensor"
    for path in sorted(out.rglob("*.safetensors")):
        for t in safetensors.torch.load_file(path).values():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{path} holds a non-finite tensor"


# --- one meaning for a number flag, and README links that cannot go stale (issue 30) -------------

def _number_source(folder):
    source = (ROOT / folder / "main.py").read_text()
    defs = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == "number"]
    assert len(defs) == 1, f"{folder}/main.py should define `number` once"
    return ast.get_source_segment(source, defs[0])


def test_every_folder_validates_numbers_with_the_same_function():
    """`number(kind, low, high, low_open)` means [low, high] (or (low, high]) in every folder: the
    eleven copies are the same text, so a bound cannot mean one thing here and another there."""
    sources = {folder: _number_source(folder) for folder in FOLDERS}
    reference = sources["gpt"]
    assert "v <= high" in reference, "the upper bound is inclusive"
    assert [f for f, s in sources.items() if s != reference] == []


BAD_VALUES = [("--lr", "0"), ("--seed", "-1"), ("--batch-size", "0")]
SAME_MEANING = {"ppo": {"--batch-size": "--num-minibatches"}}  # PPO's batch is num_envs x num_steps


@pytest.mark.parametrize("flag,value", BAD_VALUES, ids=[f for f, _ in BAD_VALUES])
@pytest.mark.parametrize("folder", FOLDERS)
def test_the_same_bad_value_gets_the_same_one_line_error(folder, flag, value, capsys):
    flag = SAME_MEANING.get(folder, {}).get(flag, flag)
    line = error_line(folder, [*TRAIN_CMD.get(folder, []), flag, value, "--device", "cpu"], capsys)
    assert re.search(rf"error: argument [^:]*{flag}: '{value}': must be (> 0|>= 0|>= 1)\b", line), line


LINK = r"\[([^\]]*)\]\(([\w./-]+\.py)#L(\d+)(?:-L(\d+))?\)"


def _readme_links():
    for readme in sorted(ROOT.glob("*/README.md")):
        for n, line in enumerate(readme.read_text().splitlines(), 1):
            for m in re.finditer(LINK, line):
                quoted = re.findall(r"`([^`]+)`", m.group(1))
                adjacent = re.search(r"`([^`]+)`\s*$", line[:m.start()])
                yield (f"{readme.parent.name}/README.md:{n}", readme.parent / m.group(2), int(m.group(3)),
                       int(m.group(4) or m.group(3)), quoted or ([adjacent.group(1)] if adjacent else []))


def test_readme_line_links_name_lines_that_hold_what_they_quote():
    """Every `file.py#Lx-Ly` link in a folder README names lines that exist, one thing at a time
    (at most 60 lines: no function is longer), and contains the identifier quoted in backticks in
    or right before the link text."""
    problems = []
    for where, path, a, b, quoted in _readme_links():
        lines = path.read_text().splitlines() if path.is_file() else []
        if not 1 <= a <= b <= len(lines):
            problems.append(f"{where}: {path.name}#L{a}-L{b} is not a range of the file")
            continue
        if b - a + 1 > 60:
            problems.append(f"{where}: {path.name}#L{a}-L{b} spans {b - a + 1} lines; link each part")
        body = "\n".join(lines[a - 1:b])
        for ident in quoted:
            names = re.findall(r"[A-Za-z_]\w*", ident)
            if names and not ident.endswith(".py") and names[-1] not in body:
                problems.append(f"{where}: `{ident}` is not in {path.name} L{a}-{b}")
    assert problems == []


@pytest.mark.parametrize("folder", FOLDERS)
def test_no_function_is_longer_than_a_screen(folder):
    """~60 lines at most, so a training loop shows the algorithm's steps in one screen and the run
    harness lives in named helpers."""
    long = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
