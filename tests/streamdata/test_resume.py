"""Resumable builds: a build killed at any point and re-run gives exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamdata import StoreError, open_store, tokenize_dataset
from streamdata import output as output_mod
from streamdata.format import BUILD_DIR, MANIFEST_NAME
from streamdata.output import LEDGER_FILE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    rng = np.random.default_rng(7)
    words = ["alpha", "beta", "gamma", "delta", "def", "class", "return", "import", "x", "(y)", "é", "🙂"]
    path = tmp_path_factory.mktemp("data") / "big.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(20000):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(1, 40))))}) + "\n")
    return path


def _cmd(src, tok, out):
    return [sys.executable, "-m", "streamdata", "tokenize", str(src), "--tokenizer", str(tok), "--out", str(out),
            "--shard-tokens", "4000", "--batch-size", "50", "--quiet"]


def ledger_shards(root: Path) -> int:
    """Finished shards the build ledger under ``root`` records (0 while it is absent or being replaced)."""
    try:
        return len(json.loads((root / LEDGER_FILE).read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def _run_and_kill_after(cmd, ready, env) -> bool:
    """Start ``cmd``; SIGKILL it as soon as ``ready()`` is true. Returns False if it finished first."""
    p = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            if p.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise AssertionError("build made no progress in 120 s")
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
        return True
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def _snapshot(path):
    with open_store(path) as s:
        return s.read(0, len(s)), np.array(s.doc_offsets), np.array(s.doc_bytes), s.manifest


def test_killed_builds_resume_to_identical_store(tmp_path, big_jsonl, bpe_tokenizer):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_cmd(big_jsonl, bpe_tokenizer, ref_out), env=env, cwd=REPO, check=True, capture_output=True)
    ref_tokens, ref_off, ref_bytes, ref_m = _snapshot(ref_out)
    assert len(ref_m.shards) >= 20

    # kill twice, at different depths, before letting it finish
    for k in (2, 9):
        killed = _run_and_kill_after(_cmd(big_jsonl, bpe_tokenizer, out), lambda: ledger_shards(out) > k, env)
        assert killed, "the build finished before it could be killed: make the test data larger"
        assert not (out / MANIFEST_NAME).exists()
        with pytest.raises(StoreError, match="unfinished build is there: rerun the same"):
            open_store(out)
    done = subprocess.run(_cmd(big_jsonl, bpe_tokenizer, out), env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tokens, off, nbytes, m = _snapshot(out)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(off, ref_off)
    np.testing.assert_array_equal(nbytes, ref_bytes)
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in ref_m.shards]
    assert m.totals == ref_m.totals
    assert not (out / BUILD_DIR).exists()
    assert not list(out.rglob("*.partial*"))


def test_crash_before_and_after_the_manifest(tmp_path, big_jsonl, bpe_tokenizer, monkeypatch):
    kw = dict(source=str(big_jsonl), tokenizer=str(bpe_tokenizer), shard_tokens=50000, max_docs=3000, batch_size=500)
    ref = tokenize_dataset(out=str(tmp_path / "ref"), **kw)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    # crash while sealing: no manifest, then a rerun completes it
    real_write, real_remove = output_mod._Dir.write_atomic, output_mod._Dir.remove

    def fail_on(real, name):
        def patched(self, rel, *a):
            if rel == name:
                boom()
            return real(self, rel, *a)
        return patched

    with monkeypatch.context() as mp:
        mp.setattr(output_mod._Dir, "write_atomic", fail_on(real_write, MANIFEST_NAME))
        with pytest.raises(OSError, match="simulated"):
            tokenize_dataset(out=str(tmp_path / "a"), **kw)
    assert not (tmp_path / "a" / MANIFEST_NAME).exists()
    assert tokenize_dataset(out=str(tmp_path / "a"), **kw).totals == ref.totals

    # crash after the manifest, before the ledger is cleaned up: the rerun accepts the finished store
    with monkeypatch.context() as mp:
        mp.setattr(output_mod._Dir, "remove", fail_on(real_remove, BUILD_DIR))
        with pytest.raises(OSError, match="simulated"):
            tokenize_dataset(out=str(tmp_path / "b"), **kw)
    assert (tmp_path / "b" / MANIFEST_NAME).exists() and (tmp_path / "b" / BUILD_DIR).exists()
    m = tokenize_dataset(out=str(tmp_path / "b"), **kw)
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in ref.shards]
    assert not (tmp_path / "b" / BUILD_DIR).exists()


def test_resume_with_other_settings_is_refused(tmp_path, big_jsonl, bpe_tokenizer, monkeypatch):
    kw = dict(source=str(big_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"), batch_size=500)

    def boom(*a, **k):
        raise OSError("killed (simulated)")

    with monkeypatch.context() as mp:
        mp.setattr(output_mod.Output, "seal", boom)
        with pytest.raises(OSError):
            tokenize_dataset(shard_tokens=10000, **kw)
    with pytest.raises(Exception, match=r"unfinished build made with other settings \(shard_tokens\)"):
        tokenize_dataset(shard_tokens=20000, **kw)
    m = tokenize_dataset(shard_tokens=20000, overwrite=True, **kw)
    assert all(s.tokens >= 20000 for s in m.shards[:-1])
