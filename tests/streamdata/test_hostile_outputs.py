"""The storage layer against hostile outputs and inputs: no wrong number with exit 0
(damaged parts and sources are never sealed under fresh checksums), no foreign file touched (crafted
swap leftovers, symlinks inside a build, a symlinked --out), one line per bad input (a missing zarr
chunk without asyncio noise, a full disk)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamdata import open_store, tokenize_dataset
from streamdata.cli import main
from streamdata.format import MANIFEST_NAME
from streamdata.verify import verify_store

from ..conftest import CORPUS, write_token_store

# Faults (a kill, a crash, a full disk, a network failure) are injected by patching the storage
# layer's private write/rename/finish seams: a fault must land in the middle of a write, and a public
# hook there would exist only for tests.

REPO = Path(__file__).resolve().parents[2]
SHARD = 150  # small shards: several per store, so resumes and interior boundaries are exercised


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    return _jsonl(tmp_path / "corpus.jsonl", [f"{t} #{i}" for i, t in enumerate(CORPUS * 4)])


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (symlinks as their target text, never followed) with its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = b"->" + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _tok(src, tok, out, *extra) -> list[str]:
    return ["tokenize", str(src), "--tokenizer", str(tok), "--out", str(out), "--quiet", "--shard-tokens", str(SHARD),
            *map(str, extra)]


def _one_line(capsys, *needles) -> str:
    """Exit-2 errors: exactly one line on stderr (datasets may log before it: the error is the last)."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("streamdata: error: ") and err.count("streamdata: error:") == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert n in lines[-1], err
    return lines[-1]


def _docs(seed: int, n: int = 30) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 900, int(rng.integers(5, 60))).tolist() for _ in range(n)]


def _move_interior_offset(store: Path) -> None:
    """Move one interior document offset by one token (still increasing, not at a shard start)."""
    path = store / "index" / "doc_offsets.npy"
    off = np.load(path)
    starts = set(np.cumsum([s["tokens"] for s in json.loads((store / MANIFEST_NAME).read_text())["shards"]]).tolist())
    i = next(i for i in range(1, len(off) - 1) if off[i] + 1 < off[i + 1] and int(off[i]) not in starts and i > 2)
    off[i] += 1
    np.save(path, off)


def _flip_shard_byte(store: Path) -> None:
    shard = sorted((store / "shards").iterdir())[-1]
    data = bytearray(shard.read_bytes())
    data[2] ^= 0x01  # the id stays in the vocabulary: only the checksum can tell
    shard.write_bytes(bytes(data))


# ---- merge never seals a damaged part (index included) ----------------------------------------------
def _two_parts(tmp_path, corpus, tok) -> list[Path]:
    second = _jsonl(tmp_path / "more.jsonl", [f"{t} more {i}" for i, t in enumerate(CORPUS * 3)])
    parts = []
    for i in range(2):
        args = _tok(corpus, tok, tmp_path / f"p{i}", "--num-parts", 2, "--part", i)
        assert main([*args[:2], str(second), *args[2:]]) == 0
        parts.append(tmp_path / f"p{i}")
    return parts


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_merge_refuses_a_part_with_a_moved_offset(tmp_path, corpus, bpe_tokenizer, capsys, fmt):
    parts = _two_parts(tmp_path, corpus, bpe_tokenizer)
    _move_interior_offset(parts[1])
    assert not verify_store(parts[1]).ok  # verify PART reports it
    capsys.readouterr()
    assert main(["merge", *map(str, parts), "--out", str(tmp_path / "m"), "--format", fmt]) == 2
    _one_line(capsys, f"part '{parts[1]}'", "doc_offsets", "checksum")
    assert not (tmp_path / "m" / MANIFEST_NAME).exists()


# ---- convert never launders damage ------------------------------------------------------------------
@pytest.fixture
def good_store(tmp_path):
    return write_token_store(tmp_path / "src", _docs(1), shard_tokens=200)


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
@pytest.mark.parametrize("damage", ["shard", "offsets"])
def test_convert_refuses_a_damaged_source(tmp_path, good_store, capsys, fmt, damage):
    (_flip_shard_byte if damage == "shard" else _move_interior_offset)(good_store)
    assert not verify_store(good_store).ok
    dst = tmp_path / "dst"
    assert main(["convert", str(good_store), str(dst), "--format", fmt]) == 2
    _one_line(capsys, f"'{good_store}'", "checksum", "shards/tokens-00" if damage == "shard" else "doc_offsets")
    assert not (dst / MANIFEST_NAME).exists()


def test_convert_of_a_damaged_zarr_source_is_refused(tmp_path, good_store, capsys):
    z = tmp_path / "z"
    assert main(["convert", str(good_store), str(z), "--format", "zarr", "--chunk-tokens", "64"]) == 0
    chunk = sorted((z / "tokens" / "c").iterdir(), key=lambda p: int(p.name))[0]
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x01  # inside the first inner chunk's ids (uncompressed): no crc covers it
    chunk.write_bytes(bytes(data))
    assert not verify_store(z).ok
    capsys.readouterr()
    assert main(["convert", str(z), str(tmp_path / "n")]) == 2
    _one_line(capsys, f"'{z}'", "checksum")
    assert not (tmp_path / "n" / MANIFEST_NAME).exists()


def test_convert_resumed_after_a_crash_still_checks_the_prefix(tmp_path, good_store, monkeypatch):
    """A damaged shard copied before a crash must not be skipped (unverified) by the resume."""
    from streamdata import writer as writer_mod
    from streamdata.convert import convert_store
    from streamdata.errors import StoreError

    _flip_shard_byte(good_store)
    first = sorted((good_store / "shards").iterdir())[-1]
    assert first.name != "tokens-00000.bin"
    real = writer_mod.StoreWriter._finish_shard
    calls = []

    def crash(self):
        real(self)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with monkeypatch.context() as mp:
        mp.setattr(writer_mod.StoreWriter, "_finish_shard", crash)
        with pytest.raises((KeyboardInterrupt, StoreError)):
            convert_store(good_store, tmp_path / "dst", shard_tokens=50)
    with pytest.raises(StoreError, match="checksum"):
        convert_store(good_store, tmp_path / "dst", shard_tokens=50)
    assert not (tmp_path / "dst" / MANIFEST_NAME).exists()


# ---- crafted swap leftovers beside the output -------------------------------------------------------
@pytest.mark.parametrize("how", ["symlink", "copy"])
def test_crafted_new_sibling_never_swaps(tmp_path, corpus, bpe_tokenizer, capsys, how):
    out, other = tmp_path / "s", tmp_path / "other"
    assert main(_tok(corpus, bpe_tokenizer, out)) == 0
    assert main(_tok(corpus, bpe_tokenizer, other, "--max-docs", 3)) == 0
    new = tmp_path / ".s.streamdata-new"
    if how == "symlink":
        new.symlink_to(other, target_is_directory=True)
    else:  # a real folder holding a finished store that was not built to replace this output
        shutil.copytree(other, new)
    before_out, before_other, before_new = _tree(out), _tree(other), _tree(new)
    capsys.readouterr()
    assert main(_tok(corpus, bpe_tokenizer, out)) == 2
    _one_line(capsys, ".s.streamdata-new", "left it alone")
    assert _tree(out) == before_out and _tree(other) == before_other and _tree(new) == before_new
    assert new.is_symlink() == (how == "symlink")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus.jsonl", "s", "other", ".s.streamdata-new"])


def test_crafted_old_symlink_is_refused_and_left_alone(tmp_path, corpus, bpe_tokenizer, capsys):
    out, other = tmp_path / "s", tmp_path / "other"
    assert main(_tok(corpus, bpe_tokenizer, out)) == 0
    assert main(_tok(corpus, bpe_tokenizer, other, "--max-docs", 3)) == 0
    old = tmp_path / ".s.streamdata-old"
    old.symlink_to(other, target_is_directory=True)
    before_out, before_other = _tree(out), _tree(other)
    for args in (_tok(corpus, bpe_tokenizer, out), _tok(corpus, bpe_tokenizer, out, "--overwrite", "--max-docs", 5),
                 ["convert", str(other), str(out), "--overwrite"]):
        capsys.readouterr()
        assert main(args) == 2, args
        _one_line(capsys, ".s.streamdata-old", "symbolic link", "left it alone")
        assert old.is_symlink() and _tree(out) == before_out and _tree(other) == before_other


def test_a_real_swap_still_recovers_after_a_crash_between_the_renames(tmp_path, corpus, bpe_tokenizer, monkeypatch):
    """The leftover the swap itself writes is still trusted: killed before the second rename, the
    next plain run finishes the swap and removes the old store."""
    from streamdata import output as output_mod

    out = tmp_path / "s"
    tokenize_dataset(source=str(corpus), tokenizer=str(bpe_tokenizer), out=str(out), max_docs=3)
    n, real = [0], output_mod._rename

    def rename(a, b):
        n[0] += 1
        if n[0] == 2:
            raise KeyboardInterrupt  # as if killed between the renames
        real(a, b)

    monkeypatch.setattr(output_mod, "_rename", rename)
    with pytest.raises(KeyboardInterrupt):
        tokenize_dataset(source=str(corpus), tokenizer=str(bpe_tokenizer), out=str(out), overwrite=True)
    monkeypatch.setattr(output_mod, "_rename", real)
    assert not out.exists() and (tmp_path / ".s.streamdata-old").is_dir()
    m = tokenize_dataset(source=str(corpus), tokenizer=str(bpe_tokenizer), out=str(out))
    assert m.totals["documents"] == len(CORPUS) * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "s"]
    assert sorted(p.name for p in out.iterdir()) == ["index", MANIFEST_NAME, "shards"]
    assert verify_store(out).ok


# ---- a symlink inside an unfinished build is never opened or removed --------------------------------
def test_symlinked_partial_shard_in_a_build_is_refused(tmp_path, corpus, bpe_tokenizer, capsys, monkeypatch):
    from streamdata import writer as writer_mod

    out = tmp_path / "s"
    real = writer_mod.StoreWriter._finish_shard

    def crash(self):
        real(self)
        raise KeyboardInterrupt  # after the first finished shard

    with monkeypatch.context() as mp:
        mp.setattr(writer_mod.StoreWriter, "_finish_shard", crash)
        assert main(_tok(corpus, bpe_tokenizer, out)) == 130
    victim = tmp_path / "victim.txt"
    victim.write_text("precious data, not ours")
    link = out / "shards" / "tokens-00001.bin.partial"
    assert not link.exists()
    link.symlink_to(victim)
    before = _tree(out)
    capsys.readouterr()
    for args in (_tok(corpus, bpe_tokenizer, out), _tok(corpus, bpe_tokenizer, out, "--overwrite")):
        assert main(args) == 2
        _one_line(capsys, "tokens-00001.bin.partial")
        assert victim.read_text() == "precious data, not ours"
        assert link.is_symlink() and _tree(out) == before


def test_writers_open_only_regular_files(tmp_path):
    """Defence in depth behind the folder check: the writer's own open refuses a symlink."""
    from streamdata.errors import StreamdataError
    from streamdata.format import create_file

    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "link").symlink_to(victim)
    with pytest.raises(StreamdataError, match="symbolic link"):
        create_file(tmp_path / "link")
    assert victim.read_bytes() == b"keep"


# ---- a symlinked --out ------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_symlinked_out_is_refused(tmp_path, corpus, bpe_tokenizer, capsys, overwrite):
    real_out, link = tmp_path / "real", tmp_path / "link"
    assert main(_tok(corpus, bpe_tokenizer, real_out, "--max-docs", 3)) == 0
    link.symlink_to(real_out, target_is_directory=True)
    before = _tree(real_out)
    capsys.readouterr()
    assert main(_tok(corpus, bpe_tokenizer, link, *(["--overwrite"] if overwrite else []))) == 2
    _one_line(capsys, f"'{link}'", "symbolic link", str(real_out))
    assert _tree(real_out) == before and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "link", "real"]
    assert main(_tok(corpus, bpe_tokenizer, link)) == 2  # and again: nothing was left that breaks a rerun
    _one_line(capsys, "symbolic link")


# ---- a missing zarr chunk is one line, without asyncio noise ----------------------------------------
def test_missing_zstd_chunk_is_one_line_without_asyncio_noise(tmp_path):
    from streamdata.backends.zarr import write_zarr_store

    src = write_token_store(tmp_path / "npy", _docs(2, 60), shard_tokens=1 << 20)
    with open_store(src) as s:
        write_zarr_store(s, tmp_path / "z", compression="zstd", chunk_tokens=16, chunks_per_shard=2)
    assert len(list((tmp_path / "z" / "tokens" / "c").iterdir())) > 40  # many pending reads when one fails
    (tmp_path / "z" / "tokens" / "c" / "3").unlink()
    r = subprocess.run([sys.executable, "-m", "streamdata", "verify", str(tmp_path / "z")], cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert [ln for ln in r.stdout.splitlines() if "DEFECT" in ln] == [
        f"{tmp_path / 'z'}: DEFECT: tokens: cannot read its tokens (zarr store '{tmp_path / 'z'}' has lost the "
        "chunk object 'tokens/c/3': the store is damaged, rebuild it)"]
    assert r.stderr.strip() == f"{tmp_path / 'z'}: 1 defect(s) found", r.stderr
    for noise in ("Task was destroyed", "was never awaited", "Traceback", "never retrieved"):
        assert noise not in r.stdout + r.stderr


# ---- a full disk is one line, and the rerun resumes to the same store -------------------------------
def _fill_disk_after(monkeypatch, module, name: str, limit: int, err: int = errno.ENOSPC) -> None:
    """Patch ``module.name`` (a ``write(f, data)`` seam) to raise ``err`` once ``limit`` bytes went through."""
    real, seen = getattr(module, name), [0]

    def write(f, data):
        seen[0] += memoryview(data).nbytes
        if seen[0] > limit:
            raise OSError(err, os.strerror(err))
        return real(f, data)

    monkeypatch.setattr(module, name, write)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_during_tokenize_is_one_line_and_resumes(tmp_path, corpus, bpe_tokenizer, capsys, monkeypatch, err):
    from streamdata import writer as writer_mod

    ref = tmp_path / "ref"
    assert main(_tok(corpus, bpe_tokenizer, ref)) == 0
    out = tmp_path / "s"
    with monkeypatch.context() as mp:
        _fill_disk_after(mp, writer_mod, "_write_bytes", 1000, err)
        capsys.readouterr()
        assert main(_tok(corpus, bpe_tokenizer, out)) == 2
    _one_line(capsys, f"'{out}'", "free space", "rerun")
    assert not (out / MANIFEST_NAME).exists() and any((out / "shards").iterdir())  # finished shards kept
    assert main(_tok(corpus, bpe_tokenizer, out)) == 0
    assert "resumed after" in capsys.readouterr().out
    with open_store(ref) as a, open_store(out) as b:
        assert np.array_equal(a.read(0, len(a)), b.read(0, len(b)))
        assert np.array_equal(a.doc_offsets, b.doc_offsets)
        assert [s.sha256 for s in a.manifest.shards] == [s.sha256 for s in b.manifest.shards]


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_full_disk_during_convert_is_one_line(tmp_path, good_store, capsys, monkeypatch, fmt):
    from streamdata import writer as writer_mod
    from streamdata.backends import zarr as zarr_mod

    with monkeypatch.context() as mp:
        if fmt == "npy":
            _fill_disk_after(mp, writer_mod, "_write_bytes", 300)
        else:
            def full(arr, start, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            mp.setattr(zarr_mod, "_write_tokens_block", full)
        assert main(["convert", str(good_store), str(tmp_path / "c"), "--format", fmt]) == 2
        _one_line(capsys, f"'{tmp_path / 'c'}'", "free space")
    assert main(["convert", str(good_store), str(tmp_path / "c"), "--format", fmt]) == 0
    assert verify_store(tmp_path / "c").ok


def test_symlinked_files_in_a_store_make_it_foreign(tmp_path, corpus, bpe_tokenizer, capsys):
    """A store of ours whose manifest or shards folder is a symlink is not ours: --overwrite refuses
    it in one line and removes nothing (neither the link nor what it points to)."""
    out, other = tmp_path / "s", tmp_path / "other"
    assert main(_tok(corpus, bpe_tokenizer, other, "--max-docs", 3)) == 0
    out.mkdir()
    (out / MANIFEST_NAME).symlink_to(other / MANIFEST_NAME)
    (out / "shards").symlink_to(other / "shards", target_is_directory=True)
    before_other = _tree(other)
    capsys.readouterr()
    assert main(_tok(corpus, bpe_tokenizer, out, "--overwrite")) == 2
    _one_line(capsys, f"'{out}'")
    assert (out / MANIFEST_NAME).is_symlink() and (out / "shards").is_symlink() and _tree(other) == before_other


def test_full_disk_during_merge_is_one_line_and_resumes(tmp_path, corpus, bpe_tokenizer, capsys, monkeypatch):
    from streamdata import writer as writer_mod

    parts = _two_parts(tmp_path, corpus, bpe_tokenizer)
    merge = ["merge", *map(str, parts), "--shard-tokens", str(SHARD)]
    assert main([*merge, "--out", str(tmp_path / "ref")]) == 0
    with monkeypatch.context() as mp:
        _fill_disk_after(mp, writer_mod, "_write_bytes", 1500)
        capsys.readouterr()
        assert main([*merge, "--out", str(tmp_path / "m")]) == 2
    _one_line(capsys, f"'{tmp_path / 'm'}'", "free space")
    assert main([*merge, "--out", str(tmp_path / "m")]) == 0
    assert _tree(tmp_path / "m") == _tree(tmp_path / "ref")  # byte for byte the uninterrupted merge


def test_full_disk_while_packing_zarr_is_one_line_and_resumes(tmp_path, corpus, bpe_tokenizer, capsys, monkeypatch):
    from streamdata.backends import zarr as zarr_mod

    assert main(_tok(corpus, bpe_tokenizer, tmp_path / "ref", "--format", "zarr")) == 0
    out = tmp_path / "z"
    with monkeypatch.context() as mp:
        def full(arr, start, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        mp.setattr(zarr_mod, "_write_tokens_block", full)
        capsys.readouterr()
        assert main(_tok(corpus, bpe_tokenizer, out, "--format", "zarr")) == 2
    _one_line(capsys, f"'{out}'", "free space")
    assert main(_tok(corpus, bpe_tokenizer, out, "--format", "zarr")) == 0
    with open_store(tmp_path / "ref") as a, open_store(out) as b:
        assert a.manifest.shards == b.manifest.shards and a.manifest.index == b.manifest.index


def test_old_sibling_beside_a_missing_output_is_left_alone(tmp_path, corpus, bpe_tokenizer, capsys):
    """No sealed replacement beside it: nothing ties the -old folder to this output, so it is not
    renamed into place or removed; one line says to rename it back if it is the user's store."""
    old = tmp_path / ".s.streamdata-old"
    assert main(_tok(corpus, bpe_tokenizer, old, "--max-docs", 3)) == 0
    before = _tree(old)
    capsys.readouterr()
    assert main(_tok(corpus, bpe_tokenizer, tmp_path / "s")) == 2
    _one_line(capsys, ".s.streamdata-old", "rename it back")
    assert _tree(old) == before and not (tmp_path / "s").exists()
