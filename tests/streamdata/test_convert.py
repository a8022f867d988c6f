"""convert_store: any TokenStore (npy, zarr, raw .bin, Megatron) into npy or zarr with identical
tokens, documents and identity; resumable; bad arguments are one clear error."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from streamdata import ConfigError, StoreError, open_store
from streamdata.convert import convert_store
from streamdata.format import MANIFEST_NAME
from streamdata import open_raw_bin
from streamdata.verify import verify_store
from streamdata.writer import StoreWriter

SMALL = {"chunk_tokens": 4096, "chunks_per_shard": 4, "shard_tokens": 30000, "block_tokens": 20000}


def _docs(seed=0, n=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 1000, int(rng.integers(1, 6000))).tolist() for _ in range(n)]


def _write_megatron(prefix: Path, docs) -> Path:
    """One sequence per document, uint16 (layout: megatron/core/datasets/indexed_dataset.py)."""
    lens = np.array([len(d) for d in docs], "<i4")
    ptrs = np.concatenate([[0], np.cumsum(lens[:-1]) * 2]).astype("<i8")
    prefix.with_name(prefix.name + ".bin").write_bytes(np.concatenate(docs).astype("<u2").tobytes())
    head = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(docs), len(docs) + 1)
    prefix.with_name(prefix.name + ".idx").write_bytes(
        head + lens.tobytes() + ptrs.tobytes() + np.arange(len(docs) + 1, dtype="<i8").tobytes())
    return prefix


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from tests.conftest import write_token_store

    root = tmp_path_factory.mktemp("convert")
    docs = _docs()
    nbytes = np.arange(len(docs)) * 3
    npy = write_token_store(root / "npy", docs, shard_tokens=25000, nbytes=nbytes, nwords=nbytes // 2)
    convert_store(npy, root / "zarr", format="zarr", compression="zstd", **SMALL)
    eos = 999
    raw_docs = [d[:-1] + [eos] for d in docs]
    (root / "raw.bin").write_bytes(np.concatenate(raw_docs).astype("<u2").tobytes())
    _write_megatron(root / "mega", docs)
    return root, docs, raw_docs


SOURCES = {
    "npy": lambda root: open_store(root / "npy"),
    "zarr": lambda root: open_store(root / "zarr"),
    "raw-bin": lambda root: open_raw_bin(root / "raw.bin", eos_id=999, vocab_size=1000),
    "megatron": lambda root: open_store(root / "mega"),
}
TARGETS = [("npy", "none"), ("zarr", "none"), ("zarr", "zstd")]


@pytest.mark.parametrize("src_kind", sorted(SOURCES))
@pytest.mark.parametrize("fmt,comp", TARGETS)
def test_convert_identical(sources, tmp_path, src_kind, fmt, comp):
    root, _, _ = sources
    with SOURCES[src_kind](root) as src:
        m = convert_store(src, tmp_path / "out", format=fmt, compression=comp, **SMALL)
        with open_store(tmp_path / "out") as dst:
            assert dst.manifest.format == fmt and dst.dtype == src.dtype
            np.testing.assert_array_equal(dst.read(0, len(dst)), src.read(0, len(src)))
            np.testing.assert_array_equal(dst.doc_offsets, src.doc_offsets)
            zeros = np.zeros(src.num_documents, np.int64)
            np.testing.assert_array_equal(dst.doc_bytes, zeros if src.doc_bytes is None else src.doc_bytes)
            np.testing.assert_array_equal(dst.doc_words, zeros if src.doc_words is None else src.doc_words)
            for key in ("tokenizer", "special_tokens", "source"):
                assert getattr(dst.manifest, key) == getattr(src.manifest, key)
            cf = m.extra["converted_from"]
            assert cf["format"] == src.manifest.format and cf["path"] == src.path
            assert cf["shards"][0]["sha256"] == src.manifest.shards[0].sha256
            # the output records its own build settings (what a rerun compares), never the source's
            own = m.extra["build_settings"]
            assert own != src.manifest.extra.get("build_settings")
            assert (own["source_store"]["shards"][0][3] if fmt == "zarr" else own["converted_from"]["shards"][0]["sha256"]) \
                == src.manifest.shards[0].sha256
        assert verify_store(tmp_path / "out").ok, verify_store(tmp_path / "out").defects


def test_chain_keeps_history_and_tokens(sources, tmp_path):
    root, docs, _ = sources
    m1 = convert_store(root / "zarr", tmp_path / "npy2", **SMALL)  # zarr (itself converted from npy) -> npy
    assert m1.extra["converted_from"]["format"] == "zarr"
    assert m1.extra["converted_from"]["converted_from"]["format"] == "npy"
    with open_store(tmp_path / "npy2") as s:
        assert len(s.manifest.shards) > 1  # npy shards of ~30000 tokens
        for i, d in enumerate(docs):
            assert s.document(i).tolist() == d
    assert convert_store(root / "zarr", tmp_path / "npy2", **SMALL) == m1  # finished: returned as is


def test_npy_convert_resumes(sources, tmp_path, monkeypatch):
    root, _, _ = sources
    ref = convert_store(root / "zarr", tmp_path / "ref", **SMALL)
    real, calls = StoreWriter.add_documents, []

    def crash(self, *a, **kw):
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(StoreWriter, "add_documents", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_store(root / "zarr", tmp_path / "out", **SMALL)
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    with pytest.raises(StoreError, match="unfinished build"):
        open_store(tmp_path / "out")
    monkeypatch.setattr(StoreWriter, "add_documents", real)
    m = convert_store(root / "zarr", tmp_path / "out", **SMALL)
    assert m.shards == ref.shards and m.totals == ref.totals
    assert json.loads(m.to_json())["extra"]["converted_from"]["path"] == ref.extra["converted_from"]["path"]
    for s in m.shards:
        assert (tmp_path / "out" / s.file).read_bytes() == (tmp_path / "ref" / s.file).read_bytes()


def test_convert_bad_arguments(sources, tmp_path):
    root, _, _ = sources
    cases = [
        ({"format": "parquet"}, r"unknown store format 'parquet': pass one of npy, zarr"),
        ({"format": "zarr", "compression": "lz4hc"}, r"unknown compression 'lz4hc': pass one of none, zstd, blosc"),
        ({"format": "npy", "compression": "zstd"}, r"npy stores are uncompressed.*--format zarr"),
        ({"shard_tokens": 0}, r"shard_tokens=0 must be >= 1"),
    ]
    for kw, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            convert_store(root / "npy", tmp_path / "x", **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="source and destination are the same"):
        convert_store(root / "npy", root / "npy", format="zarr")
    with pytest.raises(ConfigError, match="already holds a finished store"):
        convert_store(root / "npy", root / "zarr", format="zarr")  # made with other settings
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="holds no documents.*--format zarr"):
        convert_store(tmp_path / "empty.bin", tmp_path / "e")
    assert convert_store(tmp_path / "empty.bin", tmp_path / "ez", format="zarr").num_tokens == 0
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(StoreError, match="neither a store folder"):
        convert_store(text, tmp_path / "y")
