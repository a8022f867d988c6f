"""Damaged and replaced stores never give numbers: every file of an npy and a zarr store is damaged
in turn (bytes flipped, truncated, deleted) and ``verify`` must fail, with ``open_store`` either
refusing in one line or ``verify`` catching it; a deleted zarr chunk is an error, never zeros; a
store replaced while it is read gives the old data or one line, never a mix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamdata import StoreError, open_store
from streamdata.backends.zarr import ZarrTokenStore, write_zarr_store
from streamdata.errors import StreamdataError
from streamdata.format import MANIFEST_NAME
from streamdata.verify import verify_store

CHUNK, PER_SHARD = 512, 2  # zarr: 1024-token shards, so ~6k tokens make several shards and chunks


def _docs(seed: int, n: int = 12) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, int(rng.integers(50, 900))).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """An npy store (4 shard files) and zarr copies, uncompressed and zstd (several shards each)."""
    from tests.conftest import write_token_store

    root = tmp_path_factory.mktemp("damage")
    docs = _docs(0)
    n = len(docs)
    write_token_store(root / "npy", docs, shard_tokens=1500, nbytes=np.arange(1, n + 1) * 7, nwords=np.arange(1, n + 1))
    with open_store(root / "npy") as s:
        for comp in ("none", "zstd"):
            write_zarr_store(s, root / f"zarr-{comp}", compression=comp, chunk_tokens=CHUNK, chunks_per_shard=PER_SHARD)
    return root


def _files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())


def _damages(size: int, text: bool):
    """(name, fn(bytes) -> bytes | None): flips at the start, inside the header/metadata, the
    middle and the end; truncations; deletion (None). A flip is XOR 0xFF (every bit of the byte).
    For JSON (``text``) the last byte cut is the last one that is not insignificant whitespace."""
    def flip(i):
        return lambda b: b[:i] + bytes([b[i] ^ 0xFF]) + b[i + 1:]

    picks = sorted({0, min(size - 1, 9), min(size - 1, 60), size // 2, max(0, size - 5), size - 1})
    for i in picks:
        yield f"flip@{i}", flip(i)
    yield "truncate-1", (lambda b: b.rstrip()[:-1]) if text else (lambda b: b[:-1])
    yield "truncate-half", lambda b: b[: len(b) // 2]
    yield "delete", None


def _assert_caught(store: Path, what: str) -> None:
    try:
        s = open_store(store)
    except StreamdataError as e:  # refused at open: one line
        assert "\n" not in str(e), (what, str(e))
    else:
        s.close()
    r = verify_store(store)
    assert not r.ok, f"{what}: verify passed a damaged store"
    assert all("\n" not in d for d in r.defects), (what, r.defects)


@pytest.mark.parametrize("kind", ["npy", "zarr-none", "zarr-zstd"])
def test_every_damage_to_every_file_is_caught(pristine, tmp_path, kind):
    src = pristine / kind
    assert verify_store(src).ok
    files = _files(src)
    if kind == "npy":
        assert sum(f.startswith("shards/") for f in files) == 4 and sum(f.startswith("index/") for f in files) == 3
    else:
        assert sum(f.startswith("tokens/c/") for f in files) >= 5 and "tokens/zarr.json" in files
    cases = 0
    for rel in files:
        size = (src / rel).stat().st_size
        for name, fn in _damages(size, rel.endswith(".json")):
            work = tmp_path / "work"
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(src, work)
            if fn is None:
                (work / rel).unlink()
            else:
                (work / rel).write_bytes(fn((work / rel).read_bytes()))
            _assert_caught(work, f"{kind}/{rel} {name}")
            cases += 1
    assert cases >= 6 * len(files)  # every file, several damages each


# ---- zarr: a missing chunk is an error, never the fill value ----------------------------------
@pytest.mark.parametrize("kind,direct", [("zarr-none", None), ("zarr-none", False), ("zarr-zstd", None)])
def test_deleted_zarr_shard_is_an_error(pristine, tmp_path, kind, direct):
    """A deleted shard object read as zeros (fill value) and a run exited 0 with another loss."""
    work = tmp_path / "z"
    shutil.copytree(pristine / kind, work)
    (work / "tokens" / "c" / "2").unlink()
    with pytest.raises(StoreError, match=r"lost the chunk object 'tokens/c/2'|cannot open zarr shard") as e:
        with ZarrTokenStore(work, direct=direct) as s:
            s.read(0, len(s))  # the direct path refuses at open, zarr's own path at the read
    assert "\n" not in str(e.value)
    assert not verify_store(work).ok


def test_zarr_shard_deleted_after_open_is_an_error(pristine, tmp_path):
    work = tmp_path / "z"
    shutil.copytree(pristine / "zarr-zstd", work)
    with ZarrTokenStore(work, block_tokens=CHUNK) as s:  # small blocks: the read below is not cached
        first = s.read(0, 100)
        (work / "tokens" / "c" / "3").unlink()
        with pytest.raises(StoreError, match="lost the chunk object 'tokens/c/3'"):
            s.read(3 * CHUNK * PER_SHARD, 3 * CHUNK * PER_SHARD + 10)
    assert first.size == 100


def test_garbage_zarr_metadata_and_damaged_shard_index_are_one_line(pristine, tmp_path):
    work = tmp_path / "z"
    shutil.copytree(pristine / "zarr-zstd", work)
    (work / "tokens" / "zarr.json").write_bytes(b"{garbage")
    with pytest.raises(StoreError, match="zarr array 'tokens' .* unreadable metadata") as e:
        open_store(work)
    assert "\n" not in str(e.value)
    shutil.rmtree(work)
    shutil.copytree(pristine / "zarr-zstd", work)
    shard = work / "tokens" / "c" / "1"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the shard index (the last PER_SHARD * 16 + 4 bytes): crc32c fails
    shard.write_bytes(bytes(raw))
    with open_store(work) as s, pytest.raises(StoreError, match="cannot read tokens") as e:
        s.read(0, len(s))
    assert "\n" not in str(e.value)
    r = verify_store(work)
    assert not r.ok and "cannot read" in r.defects[0]


def test_direct_reads_equal_zarr_reads_across_shard_boundaries(pristine):
    with ZarrTokenStore(pristine / "zarr-none") as d, ZarrTokenStore(pristine / "zarr-none", direct=False,
                                                                      block_tokens=CHUNK) as z:
        assert d.read_path == "direct" and z.read_path == "block-cache"
        arr = z.zarr_array
        shard = CHUNK * PER_SHARD
        for lo, hi in [(0, len(d)), (shard - 3, shard + 3), (CHUNK - 1, 3 * shard + 1), (len(d) - 7, len(d))]:
            want = np.asarray(arr[lo:hi])
            np.testing.assert_array_equal(d.read(lo, hi), want)
            np.testing.assert_array_equal(z.read(lo, hi), want)


# ---- a store replaced while it is read ----------------------------------------------------------
def _write(npy_root: Path, zarr_root: Path, docs, make) -> np.ndarray:
    make(docs, name=npy_root.name)
    with open_store(npy_root) as s:
        write_zarr_store(s, zarr_root, compression="none", chunk_tokens=CHUNK, chunks_per_shard=PER_SHARD)
    return np.concatenate([np.asarray(d) for d in docs])


@pytest.mark.parametrize("direct", [None, False])
@pytest.mark.parametrize("how", ["swap", "rewrite"])
def test_store_replaced_while_read_never_mixes(make_store, tmp_path, direct, how):
    """A run read half of store A and half of store B (zarr opened shards lazily), exit 0."""
    docs_a = _docs(1)
    docs_b = [[t % 998 + 1 for t in d] for d in docs_a]  # same layout, other ids
    z = tmp_path / "z"
    a = _write(tmp_path / "a", z, docs_a, make_store)
    with ZarrTokenStore(z, direct=direct, block_tokens=CHUNK) as s:
        head = s.read(0, 10)  # the reader has started
        if how == "swap":  # what overwrite-by-swap does: the old folder renamed away, the new one in
            z.rename(tmp_path / "z-old")
            b = _write(tmp_path / "b", z, docs_b, make_store)
        else:  # the store deleted and written again at the same path
            shutil.rmtree(z)
            b = _write(tmp_path / "b", z, docs_b, make_store)
        assert not np.array_equal(a, b)
        try:
            got = s.read(0, len(s))
        except StoreError as e:
            assert "replaced or removed while it was read" in str(e) and "\n" not in str(e)
            assert direct is False  # the direct path holds a snapshot: it never needs to fail
        else:
            np.testing.assert_array_equal(got, a)  # the old store, whole: never a mix
        np.testing.assert_array_equal(head, a[:10])
    with open_store(z) as s:  # and the new store reads as itself
        np.testing.assert_array_equal(s.read(0, len(s)), b)


def test_manifest_changed_between_dispatch_and_open_is_refused(pristine, tmp_path):
    work = tmp_path / "z"
    shutil.copytree(pristine / "zarr-none", work)
    with open_store(work) as s:
        m = s.manifest
    d = json.loads((work / MANIFEST_NAME).read_text())
    d["source"] = {"kind": "another"}
    (work / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(StoreError, match="changed while it was being opened"):
        ZarrTokenStore(work, m)
