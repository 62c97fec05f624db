"""gpt/: causality, KV cache, learning, exact resume, DDP, and clear errors. Synthetic text only."""
import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, import_folder

gpt = import_folder("gpt")
CFG = gpt.model.GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
TINY = ["--device", "cpu", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16",
        "--batch-size", "8", "--warmup-steps", "2", "--dropout", "0"]


def model():
    torch.manual_seed(0)
    return gpt.model.GPT(CFG).eval()


def text_file(tmp_path, text="the quick brown fox jumps over the lazy dog. " * 80):
    path = tmp_path / "text.txt"
    path.write_text(text)
    return str(path)


def log_rows(out_dir):
    with open(out_dir / "log.csv") as f:
        return list(csv.DictReader(f))


def run_main(*args):
    return subprocess.run([sys.executable, "gpt/main.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_future_tokens_never_change_earlier_logits():
    m, x = model(), torch.randint(0, 11, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 11
    (a, _), (b, _) = m(x), m(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_kv_cache_logits_equal_full_recompute():
    m, x = model(), torch.randint(0, 11, (2, 16))
    full, _ = m(x)
    cache = [None] * CFG.n_layer
    # a prompt, single tokens, then a chunk of several tokens on top of the cache
    pieces = [x[:, :5], x[:, 5:6], x[:, 6:7], x[:, 7:11], x[:, 11:]]
    cached = torch.cat([m(p, cache=cache)[0] for p in pieces], dim=1)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt_len", [4, 2 * CFG.block_size + 3])
def test_greedy_generate_matches_recomputing_from_scratch(prompt_len):
    # Reference without a cache: the context is the last block_size characters, and once it is
    # full it restarts from the last half (the rule generate() follows with its cache).
    m, idx = model(), torch.randint(0, 11, (3, prompt_len))
    n_new, bs = 3 * CFG.block_size, CFG.block_size
    out = m.generate(idx, max_new_tokens=n_new, top_k=1)
    ref, start = idx, max(0, prompt_len - bs)
    for _ in range(n_new):
        if ref.size(1) - start > bs:
            start = ref.size(1) - bs // 2
        logits, _ = m(ref[:, start:])
        ref = torch.cat([ref, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.shape == (3, prompt_len + n_new)
    assert torch.equal(out, ref)


def test_loss_falls_on_a_repeating_text(tmp_path):
    data = text_file(tmp_path, "abcdefgh" * 400)
    gpt.train.train(gpt.main.parse_args(
        [*TINY, "--data", data, "--out-dir", str(tmp_path / "run"), "--steps", "80", "--eval-interval", "40", "--log-interval", "1", "--lr", "1e-2"]))
    rows = log_rows(tmp_path / "run")
    assert float(rows[0]["train_loss"]) > 1.5  # about ln 8 at the start
    assert float(rows[-1]["val_loss"]) < 0.1


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, monkeypatch):
    data = text_file(tmp_path)
    flags = [*TINY, "--data", data, "--steps", "8", "--eval-interval", "4", "--log-interval", "1",
             "--dropout", "0.1"]  # dropout on, so the RNG state must be restored too
    a = gpt.train.train(gpt.main.parse_args([*flags, "--out-dir", str(tmp_path / "a")]))

    get_batch = gpt.train.get_batch

    def interrupt_at_step_5(data, b, t, key):
        if key[1] == 5:
            raise KeyboardInterrupt
        return get_batch(data, b, t, key)

    monkeypatch.setattr(gpt.train, "get_batch", interrupt_at_step_5)
    with pytest.raises(SystemExit) as e:
        gpt.train.train(gpt.main.parse_args([*flags, "--out-dir", str(tmp_path / "b")]))
    assert e.value.code == 130
    monkeypatch.undo()
    # no other flags: --resume takes them from the checkpoint
    b = gpt.train.train(gpt.main.parse_args(["--out-dir", str(tmp_path / "b"), "--resume", "--device", "cpu"]))

    loss_a = [r["train_loss"] for r in log_rows(tmp_path / "a")]
    loss_b = [r["train_loss"] for r in log_rows(tmp_path / "b")]
    assert loss_b == loss_a  # steps 1-4 from the first run, 5-8 after the resume
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {gpt_dir!r})
import main, train
model = train.train(main.parse_args({argv!r}))
torch.save(model.state_dict(), os.path.join({out!r}, "rank" + os.environ["RANK"] + ".pt"))
"""


def test_two_process_gloo_ddp_keeps_identical_weights(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    argv = [*TINY, "--data", text_file(tmp_path), "--out-dir", str(out), "--steps", "6", "--eval-interval", "3",
            "--log-interval", "1", "--grad-accum", "2"]  # micro-steps: no_sync, then one all-reduce
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(gpt_dir=str(ROOT / "gpt"), argv=argv, out=str(out)))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    torch.manual_seed(1337)
    init = gpt.model.GPT(gpt.model.GPTConfig(**torch.load(out / "ckpt.pt")["config"])).state_dict()
    assert any(not torch.equal(w0[k], init[k]) for k in w0)  # it did train
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_quick_pipeline_writes_samples_and_figure(tmp_path):
    out = tmp_path / "quick"
    gpt.main.main(["--quick", "--device", "cpu", "--data", text_file(tmp_path), "--out-dir", str(out)])
    text = (out / "generated.txt").read_text()
    assert text.startswith("#### SAMPLE 1 ####\n") and "#### SAMPLE 2 ####" in text
    assert (out / "gpt_loss.png").stat().st_size > 0
    assert torch.load(out / "ckpt.pt")["step"] == 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    gpt.train.train(gpt.main.parse_args([*TINY, "--data", text_file(tmp), "--out-dir", str(tmp), "--steps", "2",
                                         "--eval-interval", "2", "--log-interval", "1"]))
    return tmp


def one_line_error(r, *words):
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(w in r.stderr for w in words), r.stderr


def test_prompt_outside_the_vocabulary_is_a_clear_error(trained):
    one_line_error(run_main("--sample-only", "--device", "cpu", "--out-dir", str(trained), "--prompt", "Zürich"),
                   "vocabulary", "Z")


def test_checkpoint_of_another_folder_is_refused(tmp_path):
    torch.save({"folder": "vit", "model": {}}, tmp_path / "ckpt.pt")
    one_line_error(run_main("--sample-only", "--out-dir", str(tmp_path)), "vit", "not of gpt/")


def test_bad_text_files_are_clear_errors(tmp_path):
    one_line_error(run_main("--data", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path)), "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    one_line_error(run_main("--data", str(tmp_path / "empty.txt"), "--out-dir", str(tmp_path)), "empty.txt")
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 4)
    one_line_error(run_main("--data", str(tmp_path / "bin.txt"), "--out-dir", str(tmp_path)), "binary")
    one_line_error(run_main("--data", str(tmp_path), "--out-dir", str(tmp_path)), "directory")


def test_resume_on_another_text_is_refused(trained, tmp_path):
    other = text_file(tmp_path, "a different text, same characters. " * 80)
    one_line_error(run_main("--resume", "--out-dir", str(trained), "--data", other, "--steps", "4"), "another text")


def test_empty_prompt_and_out_of_range_values_are_clear_errors():
    one_line_error(run_main("--prompt", ""), "--prompt")
    one_line_error(run_main("--beta2", "1.5"), "--beta2")
    one_line_error(run_main("--temperature", "nan"), "--temperature")


def test_heads_must_divide_the_width():
    one_line_error(run_main("--n-embd", "100", "--n-head", "3"), "--n-embd 100", "--n-head 3")


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_a_fresh_run_does_not_overwrite_a_checkpoint(trained, quick):
    before = (trained / "ckpt.pt").read_bytes()
    one_line_error(run_main(*TINY, *quick, "--data", str(trained / "text.txt"), "--out-dir", str(trained)),
                   "--resume")
    assert (trained / "ckpt.pt").read_bytes() == before
