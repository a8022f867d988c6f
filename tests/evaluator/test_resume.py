"""Crash-safe, resumable evaluation: a run interrupted at any point (SIGKILL included, also during a
checkpoint write) and rerun gives the uninterrupted run's results; another run's checkpoint is
refused; reports appear only when complete; nothing of ours is left looking complete when it is not."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluator.runners as runners_mod
from evaluator import StreamingEvaluator
from evaluator.cli import main

from .helpers import V, Bigram, Interrupt, TinyRNN, interrupt_after, tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def docs():
    rng = np.random.default_rng(5)
    return [rng.integers(1, V, size=int(n)).tolist() for n in rng.integers(2, 120, size=14)]


def _same(a, b):
    assert a["total_tokens"] == b["total_tokens"] and a["num_chunks"] == b["num_chunks"]
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-12, abs=0)
    np.testing.assert_array_equal(a["per_document"]["tokens"], b["per_document"]["tokens"])
    np.testing.assert_allclose(a["per_document"]["nll"], b["per_document"]["nll"], rtol=1e-12)
    np.testing.assert_allclose(a["chunk_losses"], b["chunk_losses"], rtol=1e-12)
    np.testing.assert_allclose(a["position_buckets"]["nll"], b["position_buckets"]["nll"], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(a["per_token_losses"]), np.asarray(b["per_token_losses"]))


CASES = [
    ("sliding", Bigram, dict(chunk_size=16, overlap=4, batch_size=3), "stream"),
    ("sliding-doc", Bigram, dict(chunk_size=16, overlap=0, batch_size=2, bos=3), "document"),
    ("stateful", lambda: TinyRNN("lstm"), dict(chunk_size=20, mode="stateful"), "stream"),
    # batch_size=1 in document mode: one document at a time (auto measures its size by timing, so two
    # runs may group documents differently: tests/evaluator/test_autobatch.py resumes auto runs)
    ("stateful-doc", lambda: TinyRNN("gru"), dict(chunk_size=20, mode="stateful", batch_size=1), "document"),
    ("kv-cache", lambda: tiny_gpt2(n_positions=2048), dict(chunk_size=24, mode="kv-cache"), "stream"),
    ("kv-cache-doc", lambda: tiny_gpt2(n_positions=256), dict(chunk_size=24, mode="kv-cache", batch_size=1), "document"),
]


@pytest.mark.parametrize("name, factory, kw, doc_mode", CASES, ids=[c[0] for c in CASES])
def test_interrupted_api_run_resumes_to_the_uninterrupted_result(tmp_path, make_store, docs, monkeypatch,
                                                                  name, factory, kw, doc_mode):
    store = make_store(docs, vocab_size=V, shard_tokens=300)
    model = factory()

    def evaluate(ckdir=None):
        ev = StreamingEvaluator(model, device="cpu", verbose=False, doc_mode=doc_mode, checkpoint_interval=1e-9, **kw)
        return ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True, checkpoint_dir=ckdir)

    ref = evaluate()
    cls = runners_mod.SlidingRunner if kw.get("mode", "sliding") == "sliding" else runners_mod.CarriedRunner
    ck = tmp_path / "ck"
    with monkeypatch.context() as m:
        interrupt_after(m, cls, 5)
        with pytest.raises(Interrupt):
            evaluate(ck)
    progress = json.loads((ck / "progress.json").read_text())
    assert progress["status"].startswith("unfinished") and 0 < progress["windows_done"] < ref["num_chunks"]
    assert not (ck / "per_token_losses.f32").exists() and (ck / "per_token_losses.f32.partial").exists()
    res = evaluate(ck)
    assert res["resumed_from_window"] == progress["windows_done"]
    _same(res, ref)
    assert json.loads((ck / "progress.json").read_text())["status"] == "complete"
    again = evaluate(ck)  # a finished run: nothing left to compute, the same results
    assert again["resumed_from_window"] == ref["num_chunks"]
    _same(again, ref)


def test_a_checkpoint_of_another_run_is_refused(tmp_path, make_store, docs):
    from evaluator.errors import ConfigError

    store = make_store(docs, vocab_size=V)
    ck = tmp_path / "ck"
    StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False).evaluate_streaming(store, checkpoint_dir=ck)
    for kw, word in ((dict(chunk_size=16, overlap=2), "overlap"), (dict(chunk_size=8), "chunk_size"),
                     (dict(chunk_size=16, max_tokens=50), "max_tokens"), (dict(chunk_size=16, tail="short"), "tail")):
        with pytest.raises(ConfigError, match=word) as e:
            StreamingEvaluator(Bigram(), device="cpu", verbose=False, **kw).evaluate_streaming(store, checkpoint_dir=ck)
        assert "\n" not in str(e.value) and "--overwrite" in str(e.value)
    with pytest.raises(ConfigError, match="model"):
        StreamingEvaluator(Bigram(seed=1), chunk_size=16, device="cpu", verbose=False).evaluate_streaming(store, checkpoint_dir=ck)
    other = make_store(docs[:-1], vocab_size=V)
    with pytest.raises(ConfigError, match="store"):
        StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False).evaluate_streaming(other, checkpoint_dir=ck)
    (ck / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="unreadable"):
        StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False).evaluate_streaming(store, checkpoint_dir=ck)


def test_per_token_temporary_files_are_removed_after_success_and_error(tmp_path, monkeypatch):
    import tempfile

    assert tempfile.gettempdir() == str(tmp_path)  # tests/evaluator/conftest.py
    x = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0))
    ev = StreamingEvaluator(Bigram(), chunk_size=16, batch_size=2, device="cpu", verbose=False)
    res = ev.evaluate_streaming_with_metrics(x, compute_per_token_metrics=True)
    assert res["per_token_path"] is None and len(res["per_token_losses"]) == 299
    assert np.isfinite(np.asarray(res["per_token_losses"])).all()  # still readable: the mapping keeps it
    assert not list(tmp_path.glob("streameval-per-token-*"))
    interrupt_after(monkeypatch, runners_mod.SlidingRunner, 2)
    with pytest.raises(Interrupt):
        ev.evaluate_streaming_with_metrics(x, compute_per_token_metrics=True)
    assert not list(tmp_path.glob("streameval-per-token-*"))


# ---- the CLI, killed for real -------------------------------------------------------------------
_KILLER = r"""
import os, signal, sys
import torch
import evaluator.runners as runners
from evaluator.cli import main

where, n = sys.argv[1], int(sys.argv[2])
calls = [0]
if where == "mid-write":  # SIGKILL halfway through writing the n-th checkpoint's temporary file
    real_save = torch.save
    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            f.write(b"half a checkpoint"); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = save
elif where == "mid-batch":  # SIGKILL inside the n-th batch, after its forward
    for cls in (runners.SlidingRunner, runners.CarriedRunner):
        real = cls._record
        def record(self, *a, _real=real, **k):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(self, *a, **k)
        cls._record = record
sys.exit(main(sys.argv[3:]))
"""


def _killed_run(where: str, n: int, argv: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", _KILLER, where, str(n), *argv], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    return p.returncode


def _csv(path: Path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    tiny_gpt2(n_positions=1024).save_pretrained(d)
    return d


RUNS = [  # (model, flags, kill point, n)
    ("gpt2", ["--chunk-size", "16", "--overlap", "4", "--batch-size", "2"], "mid-write", 3),
    ("gpt2", ["--chunk-size", "16", "--overlap", "4", "--batch-size", "2"], "mid-batch", 7),
    ("rnn", ["--chunk-size", "20", "--mode", "stateful", "--doc-mode", "document", "--batch-size", "1"], "mid-write", 4),
    ("gpt2", ["--chunk-size", "24", "--mode", "kv-cache"], "mid-write", 2),
    ("gpt2", ["--chunk-size", "24", "--mode", "kv-cache", "--doc-mode", "document", "--batch-size", "1"], "mid-batch", 5),
]


@pytest.mark.slow
@pytest.mark.parametrize("model, flags, where, n", RUNS)
def test_a_killed_cli_run_resumes_to_the_uninterrupted_report(tmp_path, make_store, docs, gpt2_dir, capsys,
                                                               model, flags, where, n):
    store = make_store(docs, vocab_size=V, shard_tokens=300)
    spec = str(gpt2_dir) if model == "gpt2" else "tests.evaluator.helpers:gru_lm"
    common = ["run", str(store), "--model", spec, "--device", "cpu", "--quiet", "--per-token", "--no-plots", *flags]
    ref_dir, out = tmp_path / "ref", tmp_path / "out"
    assert main([*common, "--out", str(ref_dir)]) == 0
    rc = _killed_run(where, n, [*common, "--out", str(out), "--checkpoint-interval", "0.000001"])
    assert rc == -9, f"the run was not killed (exit {rc})"
    # an unfinished run: a checkpoint and a progress file, no report, no complete-looking per-token file
    assert (out / "checkpoint.pt").exists() and not (out / "results.json").exists()
    assert not (out / "per_token_losses.f32").exists()
    assert json.loads((out / "progress.json").read_text())["status"].startswith("unfinished")
    capsys.readouterr()
    assert main([*common, "--out", str(out), "--checkpoint-interval", "0.000001"]) == 0
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, ref_dir))
    assert got["resumed_from_window"] > 0 and "resumed_from_window" not in want
    assert got["total_tokens"] == want["total_tokens"] and got["num_chunks"] == want["num_chunks"]
    assert got["nll_sum"] == pytest.approx(want["nll_sum"], rel=1e-12, abs=0)
    assert _csv(out / "documents.csv") == _csv(ref_dir / "documents.csv")
    assert [r[:3] for r in _csv(out / "chunks.csv")] == [r[:3] for r in _csv(ref_dir / "chunks.csv")]
    assert (out / "per_token_losses.f32").read_bytes() == (ref_dir / "per_token_losses.f32").read_bytes()
    # the same command once more: a no-op that prints the results again
    before = (out / "results.json").stat().st_mtime_ns
    assert main([*common, "--out", str(out)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert (out / "results.json").stat().st_mtime_ns == before


def test_cli_refuses_another_run_and_overwrite_starts_over(tmp_path, make_store, docs, capsys):
    store = make_store(docs, vocab_size=V)
    out = tmp_path / "out"
    base = ["run", str(store), "--model", "tests.evaluator.helpers:gru_lm", "--device", "cpu", "--quiet", "--no-plots",
            "--out", str(out)]
    assert main([*base, "--chunk-size", "20"]) == 0
    # (written after the first run: a folder of someone else's files is refused; tests/evaluator/test_run_folder.py)
    (out / "notes.txt").write_text("mine")  # not ours: never touched
    capsys.readouterr()
    assert main([*base, "--chunk-size", "24"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--chunk-size" in err and "--overwrite" in err and len(err.splitlines()) == 1  # the CLI's name for it
    assert main([*base, "--chunk-size", "24", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["chunk_size"] == 24
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_checks_out_before_any_work(tmp_path, make_store, docs, capsys):
    store = make_store(docs, vocab_size=V)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, word in ((afile, "is a file"), (afile / "sub", "not a writable folder")):
        rc = main(["run", str(store), "--model", "tests.evaluator.helpers:gru_lm", "--device", "cpu", "--quiet",
                   "--chunk-size", "20", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and word in err and len(err.splitlines()) == 1, err
    rc = main(["demo", "--out", str(afile), "--quiet"])  # checked before the corpus is tokenized into it
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "is a file" in err and len(err.splitlines()) == 1, err
    old = tmp_path / "old"
    old.mkdir()
    (old / "results.json").write_text("{}")  # a report without its checkpoint (another tool, an older version)
    rc = main(["run", str(store), "--model", "tests.evaluator.helpers:gru_lm", "--device", "cpu", "--quiet",
               "--chunk-size", "20", "--out", str(old)])
    assert rc == 2 and "--overwrite" in capsys.readouterr().err
    assert (old / "results.json").read_text() == "{}"
