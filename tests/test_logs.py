"""Every training log's --resume: the rows up to the checkpoint are on disk the moment the log is
reopened, so a run stopped right after it restarted (a timeout, a second Ctrl-C) loses no history.
Until 2026-11-30 the log was truncated and rewritten through a buffer: a vit run resumed and stopped
in its first epoch lost its 21 earlier rows."""
import csv
from types import SimpleNamespace

import pytest
from conftest import import_folder

FOLDERS = ["ddpm", "fff", "gnns", "gpt", "nf", "tiny_stories_lm", "translator", "vit"]


def rows_on_disk(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("folder", FOLDERS)
def test_reopening_a_log_keeps_the_rows_up_to_the_checkpoint_on_disk_at_once(folder, tmp_path):
    train = import_folder(folder).train
    key = train.LOG_FIELDS[0]                   # "epoch" or "step"
    path = tmp_path / "log.csv"
    f, writer = train.open_log(path, 0)
    for i in (1, 2, 3):
        writer.writerow({name: (i if name == key else 0.5) for name in train.LOG_FIELDS})
    f.close()
    f, writer = train.open_log(path, 2)        # resumed from the checkpoint of row 2
    try:
        assert [int(r[key]) for r in rows_on_disk(path)] == [1, 2]   # before anything is flushed or closed
        writer.writerow({name: (4 if name == key else 0.5) for name in train.LOG_FIELDS})
    finally:
        f.close()
    assert [int(r[key]) for r in rows_on_disk(path)] == [1, 2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_ppo_reopening_its_log_keeps_the_rows_up_to_the_checkpoint_on_disk_at_once(tmp_path):
    train = import_folder("ppo").train
    args = SimpleNamespace(wandb=False)
    log = train.RunLog(tmp_path, args, 0)
    for step in (256, 512, 768):
        log.csv.writerow({name: (step if name == "global_step" else 0.5) for name in train.LOG_FIELDS})
    log.file.close()
    log = train.RunLog(tmp_path, args, 512)
    try:
        assert [int(r["global_step"]) for r in rows_on_disk(tmp_path / "log.csv")] == [256, 512]
    finally:
        log.file.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]
