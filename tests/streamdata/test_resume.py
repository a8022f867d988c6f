"""Resumable builds: a build killed at any point and re-run gives exactly the uninterrupted result; a
build killed at any moment of an overwrite or a conversion never leaves a partial store that opens,
and never loses the previous one."""

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


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
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


@pytest.mark.slow  # three tokenizes of 20,000 rows; the fast lane refuses other settings in test_words (word_rule)
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


# ---- kill -9 at named moments of tokenize --overwrite and convert -------------------------------------
# The child runs the CLI with one seam patched to SIGKILL itself at a named moment of the commit/swap.
_RUNNER = r"""
import os, signal, sys
import streamdata.output as o
point = os.environ.get("KILL_AT", "")
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point.startswith("rename:"):  # before the n-th rename of the swap (1: old aside, 2: new in)
    n, real_rename = [0], o._rename
    def _rename(a, b):
        n[0] += 1
        if n[0] == int(point.split(":")[1]):
            die()
        real_rename(a, b)
    o._rename = _rename
elif point == "ledger-cleanup":  # manifest written, ledger not yet removed
    real_remove = o._Dir.remove
    def remove(self, rel):
        if rel == "_build":
            die()
        real_remove(self, rel)
    o._Dir.remove = remove
elif point == "old-removal":  # swapped in, the old store not yet removed
    real_rmtree = o.shutil.rmtree
    def rmtree(p, *a, **k):
        if str(p).endswith(".streamdata-old"):
            die()
        real_rmtree(p, *a, **k)
    o.shutil.rmtree = rmtree
from streamdata.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _kill_run(args, env, point=None, ready=None) -> None:
    """Run the CLI in a child; it is killed at ``point`` (a seam) or when ``ready()`` turns true."""
    cmd = [sys.executable, "-c", _RUNNER, *map(str, args)]
    env = {**env, "KILL_AT": point or ""}
    if ready is not None:
        assert _run_and_kill_after(cmd, ready, env), "finished before it could be killed: make the data larger"
        return
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])


def _state(out: Path):
    """Manifests findable after a kill: (the store at out or None, the sealed replacement beside it or None)."""
    def sealed(p):
        try:
            with open_store(p) as s:
                return s.manifest
        except StoreError:
            return None
    new = out.parent / f".{out.name}.streamdata-new"
    return sealed(out) if out.exists() else None, sealed(new) if new.exists() else None


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_kill_during_overwrite_never_loses_a_store(tmp_path, big_jsonl, bpe_tokenizer):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "out"
    a_kw = dict(source=str(big_jsonl), tokenizer=str(bpe_tokenizer), shard_tokens=4000, batch_size=50, max_docs=2000)
    ref_b = tokenize_dataset(out=str(tmp_path / "ref"), **{**a_kw, "max_docs": 8000})
    args = ["tokenize", big_jsonl, "--tokenizer", bpe_tokenizer, "--out", out, "--shard-tokens", 4000,
            "--batch-size", 50, "--max-docs", 8000, "--quiet", "--overwrite"]
    new_ledger = out.parent / f".{out.name}.streamdata-new"
    for point in ("progress", "rename:1", "rename:2", "old-removal", "ledger-cleanup"):
        a = tokenize_dataset(out=str(out), overwrite=True, **a_kw)  # the store the user has: A
        if point == "progress":
            _kill_run(args, env, ready=lambda: ledger_shards(new_ledger) >= 3)
        else:
            _kill_run(args, env, point=point)
        at_out, beside = _state(out)
        # at every moment the old store A or the complete new one B is findable, never a partial one
        assert at_out is not None or beside is not None, point
        if at_out is not None:
            assert at_out.totals in (a.totals, ref_b.totals), point
        if point in ("progress", "rename:1"):
            assert at_out is not None and at_out.totals == a.totals, point  # the old store, untouched
        if beside is not None:
            assert beside.totals == ref_b.totals, point
        # a rerun recovers and finishes: exactly B, nothing left beside it
        m = tokenize_dataset(out=str(out), overwrite=True, **{**a_kw, "max_docs": 8000}) if point == "progress" \
            else tokenize_dataset(out=str(out), **{**a_kw, "max_docs": 8000})
        assert [s.sha256 for s in m.shards] == [s.sha256 for s in ref_b.shards], point
        assert _siblings(out) == [] and not (out / BUILD_DIR).exists(), (point, _siblings(out))


@pytest.mark.slow  # SIGKILLed child processes; test_convert resumes a convert crashed in-process in the fast lane
def test_kill_during_convert_resumes_or_keeps_the_old_store(tmp_path, big_jsonl, bpe_tokenizer):
    from streamdata.convert import convert_store

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    src = tmp_path / "src"
    tokenize_dataset(source=str(big_jsonl), tokenizer=str(bpe_tokenizer), out=str(src), max_docs=8000)
    out = tmp_path / "z"
    args = ["convert", src, out, "--format", "zarr", "--chunk-tokens", 4096]

    def packed():
        try:
            return json.loads((out / LEDGER_FILE).read_text())["packed_tokens"] > 0
        except (OSError, ValueError, KeyError):
            return False

    ref = convert_store(src, tmp_path / "ref", format="zarr", chunk_tokens=4096)  # the child's layout
    _kill_run(args, env, ready=packed)
    with pytest.raises(StoreError, match="unfinished build"):
        open_store(out)
    assert convert_store(src, out, format="zarr", chunk_tokens=4096) == ref  # resumed to the same store
    # convert --overwrite to npy over a finished store, killed between the two renames of the swap
    npy = tmp_path / "n"
    old = convert_store(src, npy, shard_tokens=9000)
    _kill_run(["convert", out, npy, "--overwrite"], env, point="rename:2")
    at_out, beside = _state(npy)
    assert at_out is None and beside is not None and beside.totals == old.totals  # the swap was decided
    assert convert_store(out, npy).totals == old.totals  # the rerun finishes the swap
    assert _siblings(npy) == []


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_kill_during_tokenize_zarr_resumes(tmp_path, big_jsonl, bpe_tokenizer):
    from streamdata.output import STAGING_DIR

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    kw = dict(source=str(big_jsonl), tokenizer=str(bpe_tokenizer), shard_tokens=4000, batch_size=50, max_docs=8000,
              format="zarr")
    ref = tokenize_dataset(out=str(tmp_path / "ref"), **kw)
    out = tmp_path / "z"
    args = ["tokenize", big_jsonl, "--tokenizer", bpe_tokenizer, "--out", out, "--shard-tokens", 4000,
            "--batch-size", 50, "--max-docs", 8000, "--format", "zarr", "--quiet"]
    _kill_run(args, env, ready=lambda: ledger_shards(out / STAGING_DIR) >= 3)
    with pytest.raises(StoreError, match="unfinished build"):
        open_store(out)
    m = tokenize_dataset(out=str(out), **kw)
    assert m.shards == ref.shards and m.totals == ref.totals and m.index == ref.index
    assert not (out / BUILD_DIR).exists() and _siblings(out) == []
