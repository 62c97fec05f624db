"""Conventions every paper folder keeps: the shared flags, one-line errors,
and no code shared between folders."""
import ast
import subprocess
import sys

import pytest
from conftest import ROOT, paper_folders

SHARED_FLAGS = ["--device", "--seed", "--data-dir", "--out-dir", "--quick", "--wandb",
                "--resume", "--figures-dir", "--sample-only"]
FOLDERS = paper_folders()


def run_main(folder, *args):
    return subprocess.run([sys.executable, f"{folder}/main.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


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
