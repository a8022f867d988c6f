"""zarr backend: every TokenStore operation matches the npy store of the same documents, across inner
chunk, shard and cache-block boundaries; the pack is resumable; bad zarr input is one clear error."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

import numpy as np
import pytest

import streamdata.backends.zarr as zb
from streamdata import ConfigError, StoreError, open_store
from streamdata.backends.zarr import (
    ZarrTokenStore,
    pack_into_output,
    write_zarr_store,
)
from streamdata.format import BUILD_DIR, MANIFEST_NAME
from streamdata.output import LEDGER_FILE, STAGING_DIR, prepare_output
from streamdata.verify import verify_store
from streamdata.writer import StoreWriter

# Faults (a kill, a crash, a full disk, a network failure) are injected by patching the storage
# layer's private write/rename/finish seams: a fault must land in the middle of a write, and a public
# hook there would exist only for tests.

CHUNK = 4096  # tiny inner chunks so a few hundred thousand tokens cross many chunks and shards
PER_SHARD = 4  # shard = 16384 tokens


def make_docs(seed: int = 0, n_docs: int = 60, vocab: int = 1000) -> list[list[int]]:
    """Documents of 0..~12k tokens (several straddle 4096-chunks and 16384-shards), one empty,
    and one with a 9000-token run of id 0 so whole inner chunks equal the fill value (stored all
    the same: a missing chunk must read as an error, never as zeros)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, vocab, int(rng.integers(1, 12000))).tolist() for _ in range(n_docs)]
    docs[3] = []
    docs[7] = [5] + [0] * 9000 + [6]
    return docs


def pack(src, dst, compression="none", **kw):
    with open_store(src) as s:
        return write_zarr_store(s, dst, compression=compression, chunk_tokens=CHUNK, chunks_per_shard=PER_SHARD, **kw)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """npy store (shard files of ~50k tokens) and zarr copies: none (direct and block cache), zstd, blosc."""
    from tests.conftest import write_token_store

    root = tmp_path_factory.mktemp("zarr")
    docs = make_docs()
    rng = np.random.default_rng(1)
    nbytes = rng.integers(0, 100, len(docs))
    npy = write_token_store(root / "npy", docs, vocab_size=1000, shard_tokens=50000, nbytes=nbytes,
                            nwords=nbytes // 5)
    for comp in ("none", "zstd", "blosc"):
        pack(npy, root / f"zarr-{comp}", comp)
    return root, docs


BACKENDS = {
    "npy": lambda root: open_store(root / "npy"),
    "zarr-none-direct": lambda root: ZarrTokenStore(root / "zarr-none"),
    "zarr-none-cache": lambda root: ZarrTokenStore(root / "zarr-none", direct=False, block_tokens=8192),
    "zarr-zstd": lambda root: open_store(root / "zarr-zstd"),
    "zarr-zstd-smallblock": lambda root: ZarrTokenStore(root / "zarr-zstd", block_tokens=5000),
    "zarr-blosc": lambda root: open_store(root / "zarr-blosc"),
}


@pytest.fixture(params=sorted(BACKENDS))
def store(request, stores):
    root, _ = stores
    s = BACKENDS[request.param](root)
    yield s
    s.close()


def test_read_paths(stores):
    root, _ = stores
    with ZarrTokenStore(root / "zarr-none") as a, ZarrTokenStore(root / "zarr-zstd") as b:
        assert a.read_path == "direct" and b.read_path == "block-cache"
        assert a.chunk_tokens == CHUNK and b.block_tokens == zb.DEFAULT_BLOCK_TOKENS
    with pytest.raises(ConfigError, match="direct=True"):
        ZarrTokenStore(root / "zarr-zstd", direct=True)


def test_every_operation_matches_npy(store, stores):
    root, docs = stores
    flat = np.concatenate([np.asarray(d, np.uint16) for d in docs])
    with open_store(root / "npy") as ref:
        assert len(store) == len(ref) == flat.size
        assert store.dtype == ref.dtype == np.dtype("<u2")
        assert store.num_documents == ref.num_documents == len(docs)
        assert store.vocab_size == 1000
        np.testing.assert_array_equal(store.doc_offsets, ref.doc_offsets)
        np.testing.assert_array_equal(store.doc_bytes, ref.doc_bytes)
        np.testing.assert_array_equal(store.doc_words, ref.doc_words)
        np.testing.assert_array_equal(store.read(0, len(store)), flat)
        for i in range(len(docs)):
            np.testing.assert_array_equal(store.document(i), np.asarray(docs[i], np.uint16))
            assert store.document_bounds(i) == ref.document_bounds(i)
        for m in (store.manifest, ref.manifest):
            assert m.tokenizer["vocab_size"] == 1000
        assert store.manifest.totals == ref.manifest.totals
        assert store.manifest.source == ref.manifest.source


def test_reads_across_boundaries(store):
    n = len(store)
    flat = np.empty(n, np.uint16)
    store.read_into(0, n, flat)
    edges = sorted({k * CHUNK for k in range(1, n // CHUNK + 1)} | {5000 * k for k in range(1, n // 5000)})
    rng = np.random.default_rng(3)
    spans = [(e - d, e + d2) for e in edges[::3] for d, d2 in ((1, 1), (0, 1), (1, 0), (100, 9000))]
    spans += [(int(s), int(s) + int(rng.integers(0, 40000))) for s in rng.integers(0, n, 60)]
    spans += [(0, 0), (n, n), (n - 1, n), (0, n)]
    for lo, hi in spans:
        lo, hi = max(0, lo), min(n, hi)
        out = np.full(hi - lo + 3, 7, np.uint16)  # out may be longer than the range: only the head is written
        store.read_into(lo, hi, out)
        np.testing.assert_array_equal(out[: hi - lo], flat[lo:hi])
        assert (out[hi - lo :] == 7).all()
    with pytest.raises(ConfigError, match="outside"):
        store.read(n - 1, n + 1)


def test_sequential_windows_hit_the_cache(stores):
    """A sequential window pass decodes each block once, never one zarr read per window."""
    root, _ = stores
    with ZarrTokenStore(root / "zarr-zstd", block_tokens=16384) as s:
        calls = []
        real = s._tokens

        class Counting:
            def __getitem__(self, key):
                calls.append(key)
                return real[key]

        s._tokens = Counting()
        n, W = len(s), 1000
        buf = np.empty(W + 1, np.uint16)
        windows = 0
        for start in range(0, n - 1, W):
            e = min(n, start + W + 1)
            s.read_into(start, e, buf[: e - start])
            windows += 1
        assert windows > 200
        assert len(calls) == -(-n // s.block_tokens)  # one zarr read per block
        assert len(s._cache) <= 2
        s.release(0, 16384)  # wholly read blocks are dropped, the current one is kept
        s.release(0, n)
        assert not s._cache


def test_threads_share_a_store(stores):
    root, _ = stores
    with open_store(root / "npy") as ref:
        flat = ref.read(0, len(ref))
    for kw in ({"direct": False, "block_tokens": 4096}, {}):
        with ZarrTokenStore(root / "zarr-none", **kw) as s:
            errors = []

            def work(seed):
                rng = np.random.default_rng(seed)
                try:
                    for lo in rng.integers(0, len(s) - 9000, 300):
                        got = s.read(int(lo), int(lo) + 8193)
                        if not np.array_equal(got, flat[lo : lo + 8193]):
                            errors.append(int(lo))
                except Exception as e:  # noqa: BLE001 - surfaced below
                    errors.append(repr(e))

            t = threading.Thread(target=work, args=(1,), name="streamdata-test-reader")
            t.start()
            work(2)
            t.join()
            assert not errors


def test_manifest_layout_and_verify(stores):
    root, docs = stores
    flat = np.concatenate([np.asarray(d, "<u2") for d in docs])
    for comp in ("none", "zstd", "blosc"):
        d = root / f"zarr-{comp}"
        m = json.loads((d / MANIFEST_NAME).read_text())
        assert m["format"] == "zarr" and m["dtype"] == "uint16"
        assert m["shards"] == [{"file": "tokens", "tokens": flat.size, "documents": len(docs),
                                "sha256": hashlib.sha256(flat.tobytes()).hexdigest()}]
        assert m["extra"]["zarr"]["compression"] == comp and m["extra"]["zarr"]["chunk_tokens"] == CHUNK
        assert verify_store(d).ok, verify_store(d).defects
        meta = json.loads((d / "tokens" / "zarr.json").read_text())
        (codec,) = meta["codecs"]
        assert codec["name"] == "sharding_indexed"
        assert codec["configuration"]["chunk_shape"] == [CHUNK]
        assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [CHUNK * PER_SHARD]
        inner = [c["name"] for c in codec["configuration"]["codecs"]]
        assert inner == {"none": ["bytes"], "zstd": ["bytes", "zstd"], "blosc": ["bytes", "blosc"]}[comp]
        assert json.loads((d / "zarr.json").read_text())["node_type"] == "group"
        assert not (d / BUILD_DIR).exists()
    # every token chunk is stored, also the all-zero ones (a missing chunk is damage, not zeros)
    idx = np.frombuffer((root / "zarr-none/tokens/c/0").read_bytes()[-(PER_SHARD * 16 + 4):-4], "<u8")
    shards = sorted((root / "zarr-none/tokens/c").iterdir(), key=lambda p: int(p.name))
    assert len(shards) == -(-sum(map(len, docs)) // (CHUNK * PER_SHARD))
    holes = [p for p in shards if (np.frombuffer(p.read_bytes()[-(PER_SHARD * 16 + 4):-4], "<u8") == 2**64 - 1).any()]
    assert idx.size == 2 * PER_SHARD and not holes


def test_uint32_store(make_store, tmp_path):
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 100_000, int(rng.integers(1, 9000))).tolist() for _ in range(12)]
    npy = make_store(docs, vocab_size=100_000)
    m = pack(npy, tmp_path / "z32", "zstd")
    assert m.dtype == "uint32"
    with open_store(tmp_path / "z32") as z, open_store(npy) as ref:
        assert z.dtype == np.dtype("<u4")
        np.testing.assert_array_equal(z.read(0, len(z)), ref.read(0, len(ref)))
    assert verify_store(tmp_path / "z32").ok


def test_default_layout_is_large(make_store, tmp_path):
    npy = make_store([[1, 2, 3]] * 5)
    with open_store(npy) as s:
        write_zarr_store(s, tmp_path / "z")
    with ZarrTokenStore(tmp_path / "z") as z:
        assert z.chunk_tokens == 1 << 20 and z.zarr_array.shards == (16 << 20,)
        assert z.block_tokens >= 1 << 20
        assert z.read(0, 15).tolist() == [1, 2, 3] * 5


def test_rerun_overwrite_and_refusals(make_store, tmp_path):
    npy = make_store(make_docs(2, n_docs=8))
    m1 = pack(npy, tmp_path / "z")
    assert pack(npy, tmp_path / "z") == m1  # finished with the same settings: returned as is
    with pytest.raises(ConfigError, match="already holds a finished store"):
        pack(npy, tmp_path / "z", "zstd")
    m2 = pack(npy, tmp_path / "z", "zstd", overwrite=True)
    assert m2.extra["zarr"]["compression"] == "zstd" and m2.shards[0].sha256 == m1.shards[0].sha256
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a store"):
        pack(npy, other, overwrite=True)
    assert (other / "keep.txt").exists()
    with pytest.raises(ConfigError, match="unknown compression 'lz5'"):
        pack(npy, tmp_path / "z3", "lz5")
    with pytest.raises(ConfigError, match="chunk_tokens=0"):
        write_zarr_store(npy, tmp_path / "z4", chunk_tokens=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_resume_after_interrupted_pack(make_store, tmp_path, monkeypatch, compression):
    npy = make_store(make_docs(4, n_docs=30))
    ref = pack(npy, tmp_path / "ref", compression)
    real, calls = zb._write_tokens_block, []

    def crash_after_3(arr, start, data):
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        calls.append(start)
        real(arr, start, data)

    monkeypatch.setattr(zb, "_write_tokens_block", crash_after_3)
    with pytest.raises(KeyboardInterrupt):
        pack(npy, tmp_path / "z", compression)
    assert not (tmp_path / "z" / MANIFEST_NAME).exists()
    with pytest.raises(StoreError, match="unfinished build"):
        open_store(tmp_path / "z")
    ledger = json.loads((tmp_path / "z" / LEDGER_FILE).read_text())
    assert ledger["packed_tokens"] == 3 * CHUNK * PER_SHARD
    with pytest.raises(ConfigError, match="other settings"):
        pack(npy, tmp_path / "z", "blosc")  # a rerun must use the same settings
    monkeypatch.setattr(zb, "_write_tokens_block", lambda arr, start, data: (calls.append(start), real(arr, start, data)))
    calls.clear()
    m = pack(npy, tmp_path / "z", compression)
    assert calls and min(calls) == 3 * CHUNK * PER_SHARD  # continued, did not redo finished shards
    assert m == ref
    assert _files(tmp_path / "z") == _files(tmp_path / "ref")  # byte-identical objects


def test_tokenize_zarr_path(make_store, tmp_path):
    """The tokenize --format zarr flow: prepare the output, build npy in its staging folder, pack, seal."""
    out = tmp_path / "out"
    settings = {"source": "test", "format": "zarr", "compression": "zstd"}
    o = prepare_output(out, settings)
    assert o.finished is None and Path(o.root) == out
    staging = Path(o.root) / STAGING_DIR
    w = StoreWriter(staging, dtype="uint16", vocab_size=1000, shard_tokens=30000, settings=settings)
    docs = make_docs(6, n_docs=20)
    flat = np.concatenate([np.asarray(d, np.int64) for d in docs])
    lens = np.array([len(d) for d in docs])
    w.add_documents(flat, lens, lens * 2, lens // 3)
    w.commit(tokenizer={"name": "t", "vocab_size": 1000}, special_tokens={"eos": None}, source={"kind": "test"})
    with open_store(staging) as st:
        m = pack_into_output(st, o, compression="zstd", chunk_tokens=CHUNK, chunks_per_shard=PER_SHARD)
    assert not staging.exists() and not (out / BUILD_DIR).exists()
    assert m.format == "zarr" and m.extra["build_settings"] == settings and m.source == {"kind": "test"}
    with open_store(out) as z:
        np.testing.assert_array_equal(z.read(0, len(z)), flat.astype(np.uint16))
        np.testing.assert_array_equal(z.doc_bytes, lens * 2)
    assert prepare_output(out, settings).finished == m  # a rerun finds the finished store
    with pytest.raises(ConfigError, match="already holds a finished store"):
        prepare_output(out, {**settings, "compression": "none"})
    o = prepare_output(out, {**settings, "compression": "none"}, overwrite=True)
    assert o.finished is None and Path(o.root) != out and (out / MANIFEST_NAME).exists()  # built beside it
    o.abort()


def _write_bad_tokens(root: Path, arr_kw: dict) -> Path:
    """Copy of a good store whose tokens array is replaced by ``arr_kw`` (manifest unchanged)."""
    import zarr

    g = zarr.open_group(zarr.storage.LocalStore(root), mode="a")
    g.create_array("tokens", overwrite=True, fill_value=0, **arr_kw)
    return root


def test_bad_zarr_arrays(make_store, tmp_path):
    npy = make_store([[1, 2, 3, 4]] * 4)
    m = pack(npy, tmp_path / "good")
    n = m.num_tokens
    cases = {
        "dtype": ({"shape": (n,), "dtype": "int64", "chunks": (16,)}, r"dtype <i8 but the manifest needs <u2"),
        "rank": ({"shape": (n, 2), "dtype": "uint16", "chunks": (16, 2)}, r"2 dimensions .*expected 1-D"),
        "length": ({"shape": (n - 1,), "dtype": "uint16", "chunks": (16,)}, r"entries but the manifest needs"),
    }
    import shutil

    for name, (kw, msg) in cases.items():
        root = tmp_path / name
        shutil.copytree(tmp_path / "good", root)
        _write_bad_tokens(root, kw)
        with pytest.raises(StoreError, match=msg) as e:
            open_store(root)
        assert "\n" not in str(e.value) and str(root) in str(e.value)
    root = tmp_path / "missing"
    shutil.copytree(tmp_path / "good", root)
    shutil.rmtree(root / "doc_words")
    with pytest.raises(StoreError, match="no 'doc_words' array"):
        open_store(root)
    root = tmp_path / "badindex"
    shutil.copytree(tmp_path / "good", root)
    shard = root / "tokens" / "c" / "0"
    b = bytearray(shard.read_bytes())
    b[-10] ^= 0xFF  # corrupt the shard index
    shard.write_bytes(bytes(b))
    with pytest.raises(StoreError, match="damaged index"):
        open_store(root).read(0, 4)


def test_write_zarr_store_takes_an_open_store(make_store, tmp_path):
    """The backend never calls the dispatcher: a path is refused with one line naming what to use."""
    npy = make_store([[1, 2, 3]] * 5)
    with pytest.raises(ConfigError, match="convert_store") as e:
        write_zarr_store(npy, tmp_path / "z")
    assert "\n" not in str(e.value) and not (tmp_path / "z").exists()


@pytest.mark.parametrize("comp", ["none", "zstd"])
def test_a_long_index_is_memory_mapped_and_leaves_no_file(stores, comp, tmp_path, monkeypatch):
    """Index arrays longer than index_in_ram are copied block by block into a temporary memmap that
    is unlinked at once: same values as the npy store's index, nothing left in the temp folder."""
    import tempfile

    root, docs = stores
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # 60 documents: 9 blocks of 7, the last one partial
    with open_store(root / "npy") as npy, ZarrTokenStore(root / f"zarr-{comp}", index_in_ram=7) as z:
        for got, want in ((z.doc_offsets, npy.doc_offsets), (z.doc_bytes, npy.doc_bytes), (z.doc_words, npy.doc_words)):
            assert isinstance(got, np.memmap) and not got.flags.writeable
            np.testing.assert_array_equal(got, want)
        assert list(scratch.iterdir()) == []  # unlinked as soon as mapped
        for d in (0, 3, 7, 59):
            np.testing.assert_array_equal(z.document(d), npy.document(d))
    with ZarrTokenStore(root / f"zarr-{comp}") as z:  # small against the default: in RAM
        assert not isinstance(z.doc_offsets, np.memmap)
    with pytest.raises(ConfigError, match="index_in_ram=-1 must be an integer >= 1"):
        ZarrTokenStore(root / f"zarr-{comp}", index_in_ram=-1)
