"""Imports: nanoGPT raw .bin and Megatron-LM .bin/.idx files, written here from the formats'
published layouts (not from our reader), read back through every TokenStore operation."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from streamdata import ConfigError, StoreError, open_store
from streamdata.backends.megatron import MegatronTokenStore, open_megatron, read_megatron_index
from streamdata.backends.raw_bin import RawBinTokenStore, open_raw_bin
from streamdata.verify import verify_store


# ---- writers from the published layouts ----------------------------------------------------------
def write_nanogpt_bin(path: Path, ids, dtype="uint16") -> Path:
    """nanoGPT prepare.py: np.memmap(filename, dtype=np.uint16, mode='w+') filled with the ids."""
    arr = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="w+", shape=(len(ids),)) if len(ids) else None
    if arr is None:
        path.write_bytes(b"")
    else:
        arr[:] = ids
        arr.flush()
        del arr
    return path


# Megatron DType codes (megatron/core/datasets/indexed_dataset.py)
CODES = {"uint8": 1, "int8": 2, "int16": 3, "int32": 4, "int64": 5, "float64": 6, "float32": 7, "uint16": 8}


def write_megatron(prefix: Path, documents, dtype="int32", *, gap: int = 0, modes: bool = False,
                   magic=b"MMIDIDX\x00\x00", version=1, code=None, doc_index=None) -> Path:
    """IndexedDatasetBuilder + _IndexWriter: ``documents`` is a list of documents, each a list of
    sequences (lists of ids). ``gap`` inserts that many junk bytes before every sequence (non-contiguous
    pointers, as a hand-made index may have)."""
    dt = np.dtype(dtype).newbyteorder("<")
    lengths, pointers, doc_idx = [], [], [0]
    data = bytearray()
    for doc in documents:
        for seq in doc:
            data += b"\xAB" * gap
            pointers.append(len(data))
            data += np.asarray(seq, dtype=dt).tobytes()
            lengths.append(len(seq))
        doc_idx.append(len(lengths))
    if doc_index is not None:
        doc_idx = doc_index
    prefix.with_name(prefix.name + ".bin").write_bytes(bytes(data))
    idx = bytearray()
    idx += magic
    idx += struct.pack("<Q", version)
    idx += struct.pack("<B", CODES[dtype] if code is None else code)
    idx += struct.pack("<Q", len(lengths))
    idx += struct.pack("<Q", len(doc_idx))
    idx += np.asarray(lengths, "<i4").tobytes()
    idx += np.asarray(pointers, "<i8").tobytes()
    idx += np.asarray(doc_idx, "<i8").tobytes()
    if modes:
        idx += np.zeros(len(lengths), "<i1").tobytes()
    prefix.with_name(prefix.name + ".idx").write_bytes(bytes(idx))
    return prefix


def _docs(seed=0, n=25, vocab=1000):
    rng = np.random.default_rng(seed)
    return [[rng.integers(1, vocab, int(rng.integers(0, 400))).tolist() for _ in range(int(rng.integers(1, 4)))]
            for _ in range(n)]


def _check_store(s, flat, offsets):
    n = len(flat)
    assert len(s) == n and s.num_documents == len(offsets) - 1
    np.testing.assert_array_equal(s.doc_offsets, offsets)
    np.testing.assert_array_equal(s.read(0, n), flat)
    for i in range(s.num_documents):
        np.testing.assert_array_equal(s.document(i), flat[offsets[i] : offsets[i + 1]])
    rng = np.random.default_rng(0)
    for lo in rng.integers(0, max(1, n), 30):
        hi = min(n, int(lo) + int(rng.integers(0, 2000)))
        out = np.empty(hi - lo, s.dtype)
        s.read_into(int(lo), hi, out)
        np.testing.assert_array_equal(out, flat[lo:hi])
    s.prefetch(0, n)
    s.release(0, n)
    assert s.doc_bytes is None and s.doc_words is None
    assert verify_store(s).ok, verify_store(s).defects


# ---- raw .bin -------------------------------------------------------------------------------------
def test_raw_bin_whole_file_one_document(tmp_path):
    ids = np.random.default_rng(1).integers(0, 50257, 10000)
    p = write_nanogpt_bin(tmp_path / "train.bin", ids)
    for s in (open_raw_bin(p), open_store(p), open_store(tmp_path / "train")):  # path, open_store, prefix
        with s:
            assert isinstance(s, RawBinTokenStore) and s.manifest.format == "raw-bin"
            _check_store(s, ids.astype(np.uint16), [0, 10000])
            m = s.manifest
            sha = hashlib.sha256(p.read_bytes()).hexdigest()
            assert m.shards[0].sha256 == sha and m.source["files"][0]["sha256"] == sha
            assert m.tokenizer["vocab_size"] is None and m.special_tokens["eos"] is None
            assert "bytes" not in m.totals


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_raw_bin_eos_documents(tmp_path, dtype):
    eos = 7
    ids = np.array([1, 2, eos, 3, eos, eos, 4, 5, 6], dtype=np.int64)
    if dtype == "uint32":
        ids[0] = 70000
    p = write_nanogpt_bin(tmp_path / "x.bin", ids, dtype)
    with open_raw_bin(p, dtype=dtype, eos_id=eos, vocab_size=100000 if dtype == "uint32" else 100) as s:
        # documents end at (and include) each EOS; trailing tokens form the last document
        _check_store(s, ids.astype(dtype), [0, 3, 5, 6, 9])
        assert s.vocab_size == (100000 if dtype == "uint32" else 100) and s.manifest.special_tokens["eos"] == eos
    ids2 = np.array([1, eos, 2, eos])
    p2 = write_nanogpt_bin(tmp_path / "y.bin", ids2)
    with open_raw_bin(p2, eos_id=eos) as s:  # EOS last: no empty trailing document
        _check_store(s, ids2.astype(np.uint16), [0, 2, 4])
    with open_raw_bin(write_nanogpt_bin(tmp_path / "empty.bin", []), eos_id=eos) as s:
        assert len(s) == 0 and s.num_documents == 0 and s.doc_offsets.tolist() == [0]


def test_raw_bin_bad_input(tmp_path):
    p = tmp_path / "odd.bin"
    p.write_bytes(b"\x01\x00\x02")
    with pytest.raises(StoreError, match=r"odd.bin' has 3 bytes, not a multiple of 2 \(uint16\)"):
        open_raw_bin(p)
    with pytest.raises(StoreError, match="not a multiple of 2"):
        open_store(p)
    good = write_nanogpt_bin(tmp_path / "g.bin", [1, 2, 3, 999])
    with pytest.raises(ConfigError, match=r"unknown token dtype 'int7' for a raw .bin: pass one of uint16, uint32"):
        open_raw_bin(good, dtype="int7")
    with pytest.raises(StoreError, match=r"token id 999 at token 3, >= vocab_size 500"):
        open_raw_bin(good, vocab_size=500)
    with pytest.raises(ConfigError, match=r"eos_id 70000 is outside \[0, 65536\)"):
        open_raw_bin(good, eos_id=70000)
    with pytest.raises(ConfigError, match="vocab_size 100000 does not fit"):
        open_raw_bin(good, vocab_size=100000)
    with pytest.raises(StoreError, match="does not exist"):
        open_raw_bin(tmp_path / "nope.bin")
    with open_raw_bin(good, checksum=False) as s:
        assert s.manifest.shards[0].sha256 == "" and s.manifest.extra["checksum"] == "skipped"
        assert not verify_store(s).ok  # an unverified import is reported, not silently trusted


def test_neither_format(tmp_path):
    t = tmp_path / "notes.txt"
    t.write_text("hello")
    with pytest.raises(StoreError, match=r"neither a store folder, a raw token .bin, nor a Megatron .idx/.bin pair") as e:
        open_store(t)
    assert "\n" not in str(e.value)
    (tmp_path / "folder").mkdir()
    with pytest.raises(StoreError, match="has no manifest.json"):
        open_store(tmp_path / "folder")


# ---- Megatron -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint16", "int32", "int64", "uint8", "int16"])
def test_megatron_documents(tmp_path, dtype):
    vocab = 250 if dtype in ("uint8", "int8") else 1000
    docs = _docs(3, vocab=vocab)
    prefix = write_megatron(tmp_path / f"corpus_{dtype}_text_document", docs, dtype)
    flat = np.array([t for d in docs for s in d for t in s], dtype=np.int64)
    doc_lens = [sum(len(s) for s in d) for d in docs]
    seq_lens = [len(s) for d in docs for s in d]
    for arg in (prefix, str(prefix) + ".idx", str(prefix) + ".bin"):
        with open_store(arg) as s:
            assert isinstance(s, MegatronTokenStore) and s.manifest.format == "megatron"
            assert s.dtype == (np.dtype("<u2") if np.dtype(dtype).itemsize <= 2 else np.dtype("<u4"))
            _check_store(s, flat.astype(s.dtype), np.concatenate([[0], np.cumsum(doc_lens)]))
            files = s.manifest.source["files"]
            assert files[0]["sha256"] == hashlib.sha256(Path(str(prefix) + ".bin").read_bytes()).hexdigest()
            assert files[1]["sha256"] == hashlib.sha256(Path(str(prefix) + ".idx").read_bytes()).hexdigest()
            assert s.manifest.source["file_dtype"] == dtype and s.manifest.source["dtype_code"] == CODES[dtype]
    with open_megatron(prefix, documents="sequence") as s:
        _check_store(s, flat.astype(s.dtype), np.concatenate([[0], np.cumsum(seq_lens)]))
    with open_megatron(prefix, vocab_size=vocab, eos_id=0) as s:  # vocab known: smallest dtype
        assert s.dtype == np.dtype("<u2") and s.vocab_size == vocab and s.manifest.special_tokens["eos"] == 0


def test_megatron_index_layout_parsed(tmp_path):
    docs = [[[1, 2, 3], [4]], [[5, 6]]]
    prefix = write_megatron(tmp_path / "m", docs, "uint16")
    ix = read_megatron_index(str(prefix) + ".idx")
    assert ix.dtype_code == 8 and ix.dtype == np.dtype("<u2")
    assert ix.sequence_lengths.tolist() == [3, 1, 2]
    assert ix.sequence_pointers.tolist() == [0, 6, 8]  # byte offsets
    assert ix.document_indices.tolist() == [0, 2, 3]


def test_megatron_noncontiguous_trailing_and_multimodal(tmp_path):
    docs = _docs(5, n=12)
    flat = np.array([t for d in docs for s in d for t in s], dtype=np.int64)
    doc_lens = [sum(len(s) for s in d) for d in docs]
    p = write_megatron(tmp_path / "gappy", docs, "int32", gap=6, modes=True)
    with open_megatron(p) as s:
        assert not s._contiguous
        _check_store(s, flat.astype(np.uint32), np.concatenate([[0], np.cumsum(doc_lens)]))
        assert s.manifest.source["files"][0]["sha256"] != s.manifest.shards[0].sha256  # junk bytes in .bin
    # document index ending before the last sequences: they form one last document
    seqs = [len(x) for d in docs for x in d]
    n_seq = len(seqs)
    p2 = write_megatron(tmp_path / "trail", docs, "uint16", doc_index=[0, 2, n_seq - 2])
    seq_off = np.concatenate([[0], np.cumsum(seqs)])
    with open_megatron(p2) as s:
        _check_store(s, flat.astype(np.uint16), seq_off[[0, 2, n_seq - 2, n_seq]])


def test_megatron_bad_input(tmp_path):
    docs = [[[1, 2, 3]], [[4, 5]]]
    cases = [
        ("magic", {"magic": b"NOTMAGIC\x00"}, StoreError, r"does not start with the Megatron magic"),
        ("version", {"version": 2}, StoreError, r"has version 2; only version 1 is known"),
        ("code", {"code": 9}, StoreError, r"unknown dtype code 9"),
        ("float", {"dtype": "float32"}, StoreError, r"holds float32 values, not token ids"),
    ]
    for name, kw, exc, msg in cases:
        p = write_megatron(tmp_path / name, docs, **({"dtype": "int32"} | kw))
        with pytest.raises(exc, match=msg) as e:
            open_store(p)
        assert "\n" not in str(e.value) and name in str(e.value)
        with pytest.raises(exc, match=msg):
            open_store(str(p) + ".bin")  # a .bin beside a bad .idx is not silently read as raw
    p = write_megatron(tmp_path / "trunc", docs)
    idx = Path(str(p) + ".idx")
    idx.write_bytes(idx.read_bytes()[:-5])
    with pytest.raises(StoreError, match="truncated"):
        open_store(p)
    idx.write_bytes(b"MMID")
    with pytest.raises(StoreError, match="fewer than its 34-byte header"):
        open_store(idx)
    p = write_megatron(tmp_path / "short", docs)
    b = Path(str(p) + ".bin")
    b.write_bytes(b.read_bytes()[:-4])
    with pytest.raises(StoreError, match="points past the end"):
        open_store(p)
    b.unlink()
    with pytest.raises(StoreError, match="has no data file"):
        open_megatron(p)
    p = write_megatron(tmp_path / "neg", [[[1, -2, 3]]], "int16")
    with pytest.raises(StoreError, match="holds id -2, outside uint16"):
        open_store(p)
    with pytest.raises(ConfigError, match="documents='pages'"):
        open_megatron(write_megatron(tmp_path / "ok", docs), documents="pages")


def test_open_token_files_options(tmp_path):
    from streamdata.backends import open_token_files

    p = write_nanogpt_bin(tmp_path / "val.bin", [1, 9, 2, 9, 3], "uint32")
    with open_token_files(p, dtype="uint32", eos_id=9, vocab_size=10) as s:
        assert s.dtype == np.dtype("<u4") and s.doc_offsets.tolist() == [0, 2, 4, 5]
    m = write_megatron(tmp_path / "m", [[[1, 2]], [[3]]], "uint16")
    with open_token_files(m, documents="sequence", vocab_size=10) as s:
        assert s.num_documents == 2 and s.vocab_size == 10
    with pytest.raises(ConfigError, match="records its dtype: drop the dtype option"):
        open_token_files(str(m) + ".idx", dtype="uint32")


def test_raw_bin_without_checksum_reads_nothing_at_open_and_readers_enforce_its_vocab(tmp_path, monkeypatch):
    import streamdata.backends.raw_bin as raw_bin
    from streamdata.loader import WindowLoader

    huge = tmp_path / "huge.bin"  # 10^11 tokens (200 GB apparent, no disk used): opens at once
    with open(huge, "wb"):
        pass
    os.truncate(huge, 2 * 10**11)
    good = write_nanogpt_bin(tmp_path / "g.bin", [1, 2, 3, 999, 4, 5, 6, 7, 8])

    def no_scan(*a, **k):
        raise AssertionError("the ids were read at open")

    monkeypatch.setattr(raw_bin, "scan_tokens", no_scan)  # a spy: opening must never scan the ids
    with open_raw_bin(huge, vocab_size=66, checksum=False) as s:
        assert len(s) == 10**11 and s.vocab_size == 66
    with open_raw_bin(good, vocab_size=500, checksum=False) as s:  # id 999 is not seen at open ...
        assert s.vocab_size == 500
        with pytest.raises(StoreError, match=r"token id 999 at position 3 of store .* outside the vocabulary \[0, 500\)") as e:
            for _ in WindowLoader(s, chunk_size=4, batch_windows=1, device="cpu", vocab_size=500):
                pass  # ... but as soon as a reader reads it
        assert "\n" not in str(e.value)
    with pytest.raises(AssertionError, match="read at open"):  # with an eos_id the ids must be read
        open_raw_bin(good, eos_id=7, vocab_size=500, checksum=False)


@pytest.mark.parametrize("in_ram", [3, 1 << 20], ids=["memmapped-index", "index-in-ram"])
def test_megatron_index_in_blocks_equals_the_whole_index(tmp_path, monkeypatch, in_ram):
    """Sequence and document offsets are built block by block (into a temporary memmap, unlinked at
    once, beyond index_in_ram entries): the same store as built in one piece, contiguous or not, with
    trailing sequences or none, by document or by sequence; nothing left in the temp folder."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    docs = _docs(9, n=11)
    flat = np.array([t for d in docs for s in d for t in s], dtype=np.int64)
    seqs = [len(x) for d in docs for x in d]
    seq_off = np.concatenate([[0], np.cumsum(seqs)])
    doc_off = np.concatenate([[0], np.cumsum([sum(len(s) for s in d) for d in docs])])
    n_seq = len(seqs)
    cases = [(write_megatron(tmp_path / "plain", docs, "uint16"), "document", doc_off, True),
             (write_megatron(tmp_path / "plain2", docs, "uint16"), "sequence", seq_off, True),
             (write_megatron(tmp_path / "gappy", docs, "uint16", gap=4), "document", doc_off, False),
             (write_megatron(tmp_path / "trail", docs, "uint16", doc_index=[0, 2, n_seq - 2]), "document",
              seq_off[[0, 2, n_seq - 2, n_seq]], True)]
    for prefix, documents, offsets, contiguous in cases:
        with open_megatron(prefix, documents=documents, index_in_ram=in_ram) as s:
            assert s._contiguous == contiguous
            assert isinstance(s.doc_offsets, np.memmap) == (len(offsets) > in_ram)
            _check_store(s, flat.astype(np.uint16), offsets)
    assert list(scratch.iterdir()) == []
    with pytest.raises(StoreError, match="points past the end"):  # checked in every block, not only the first
        bad = write_megatron(tmp_path / "bad", docs, "uint16")
        with open(str(bad) + ".bin", "r+b") as f:
            f.truncate(2 * (len(flat) - 1))
        open_megatron(bad, index_in_ram=in_ram)
    # a document index that decreases where two blocks of 3 meet (entries 3 -> 4) is caught too
    bad = write_megatron(tmp_path / "bad-docs", docs, "uint16", doc_index=[0, 1, 2, 5, 4, n_seq - 1])
    with pytest.raises(StoreError, match="document index that does not start at 0, decrease"):
        open_megatron(bad, index_in_ram=in_ram)
    with pytest.raises(ConfigError, match="index_in_ram=0 must be an integer >= 1"):
        open_megatron(bad, index_in_ram=0)


# ---- no silent guess: files of a recognised format are never read as a raw .bin ------------------
def test_megatron_bin_without_its_idx_is_refused_unless_a_dtype_is_given(tmp_path):
    prefix = write_megatron(tmp_path / "corpus_text_document", [[[1, 2, 3]], [[4, 5]]], "uint16")
    Path(str(prefix) + ".idx").unlink()
    for arg in (str(prefix) + ".bin", prefix):
        with pytest.raises(StoreError, match=r"corpus_text_document.bin' is named like a Megatron-LM data file but "
                                             r"'corpus_text_document.idx' is not beside it: copy the .idx there") as e:
            open_store(arg)
        assert "\n" not in str(e.value)
    with open_store(str(prefix) + ".bin", dtype="uint16") as s:  # a dtype given: the caller says it is raw ids
        assert s.read(0, 5).tolist() == [1, 2, 3, 4, 5] and s.manifest.source["dtype_from"] == "given by the caller"


def test_a_store_shard_opened_from_outside_its_folder_is_refused(make_store, tmp_path):
    root = make_store([[1, 2, 3], [4, 5]], name="st")
    shard = root / "shards" / "tokens-00000.bin"
    with pytest.raises(StoreError, match=r"tokens-00000.bin' is a shard of the streamdata store '.*st' \(the folder "
                                         r"holds its dtype and document index\): open the folder instead") as e:
        open_store(shard)
    assert "\n" not in str(e.value)
    with pytest.raises(StoreError, match=r"is the manifest of the store '.*st': open the folder instead"):
        open_store(root / "manifest.json")
    (root / "manifest.json").unlink()
    (root / "_build").mkdir()
    with pytest.raises(StoreError, match=r"is a shard of the streamdata unfinished build of a store"):
        open_store(shard)


def test_a_raw_bin_says_its_dtype_was_assumed(tmp_path, capsys):
    from streamdata.cli import main

    p = write_nanogpt_bin(tmp_path / "train.bin", [1, 2, 3])
    with open_store(p) as s:
        assert s.manifest.source["dtype"] == "uint16" and s.manifest.source["dtype_from"].startswith("assumed")
    with open_raw_bin(p) as s:
        assert s.manifest.source["dtype_from"] == "given by the caller"
    assert main(["info", str(p)]) == 0
    assert ("raw .bin train.bin: uint16 ids, dtype assumed (nanoGPT's uint16: a raw .bin does not record its dtype); "
            "32-bit ids: open_raw_bin(path, dtype='uint32') or convert --dtype uint32; documents: whole file") \
        in capsys.readouterr().out
