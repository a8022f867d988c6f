"""Opening a store: the one dispatcher, paths that must stay inside the store, the open-time
structural checks, index checksums in verify, the in-memory backend, the loader capability."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from streamdata import StoreError, TokenStore, open_store
from streamdata.backends.memory import MemoryTokenStore
from streamdata.backends.npy import NpyTokenStore, npy_header
from streamdata.convert import convert_store
from streamdata.errors import ConfigError
from streamdata.format import MANIFEST_NAME
from streamdata.verify import verify_store

DOCS = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10] * 7, [11, 12, 13, 14, 15]]


@pytest.fixture
def npy(make_store):
    """A sealed npy store of 21 tokens in 5 documents, shard files of ~6 tokens (4 shards)."""
    return make_store(DOCS, shard_tokens=6)


def _edit_manifest(root: Path, fn) -> None:
    d = json.loads((root / MANIFEST_NAME).read_text())
    fn(d)
    (root / MANIFEST_NAME).write_text(json.dumps(d))


def _refused(root, match: str) -> None:
    """open_store refuses with one line matching ``match``, and verify reports it (not ok)."""
    with pytest.raises(StoreError, match=match) as e:
        open_store(root)
    assert "\n" not in str(e.value)
    r = verify_store(root)
    assert not r.ok and any(re.search(match, d) for d in r.defects), r.defects


# ---- defect 2: every manifest path resolves inside the store ------------------------------------
def test_shard_path_outside_the_store_is_refused(npy, tmp_path):
    """A manifest shard ``file`` of ``../x`` (with the right bytes there) verified OK before; an
    absolute path or a symlink leaving the root, likewise. Now: one line, and convert copies nothing."""
    first = json.loads((npy / MANIFEST_NAME).read_text())["shards"][0]["file"]
    outside = tmp_path / "outside.bin"
    outside.write_bytes((npy / first).read_bytes())  # same bytes: size and sha256 would match
    for bad in (os.path.relpath(outside, npy), str(outside)):
        _edit_manifest(npy, lambda d: d["shards"][0].update(file=bad))
        _refused(npy, "points outside the store")
        with pytest.raises(StoreError, match="points outside the store"):
            convert_store(npy, tmp_path / f"copy{len(bad)}")
        assert not (tmp_path / f"copy{len(bad)}" / MANIFEST_NAME).exists()
    _edit_manifest(npy, lambda d: d["shards"][0].update(file=first))
    (npy / first).unlink()
    (npy / first).symlink_to(outside)  # a symlink out of the root
    _refused(npy, "outside the store")


def test_index_path_outside_the_store_is_refused(npy, tmp_path):
    outside = tmp_path / "doc_offsets.npy"
    outside.write_bytes((npy / "index" / "doc_offsets.npy").read_bytes())
    _edit_manifest(npy, lambda d: d["index"][0].update(file="../doc_offsets.npy"))
    assert json.loads((npy / MANIFEST_NAME).read_text())["index"][0]["name"] == "doc_offsets"
    _refused(npy, "points outside the store")


def test_zarr_paths_outside_the_store_are_refused(npy, tmp_path):
    z = tmp_path / "z"
    convert_store(npy, z, format="zarr", chunk_tokens=4, chunks_per_shard=2)
    _edit_manifest(z, lambda d: d["shards"][0].update(file="../tokens"))
    _refused(z, "manifest names")
    _edit_manifest(z, lambda d: d["shards"][0].update(file="tokens"))
    assert verify_store(z).ok
    (tmp_path / "elsewhere").mkdir()
    (z / "tokens").rename(tmp_path / "elsewhere" / "tokens")
    (z / "tokens").symlink_to(tmp_path / "elsewhere" / "tokens")
    _refused(z, "outside the store")


# ---- defect 3: open-time structural checks --------------------------------------------------------
def _save_index(root: Path, name: str, values) -> None:
    np.save(root / "index" / f"{name}.npy", np.asarray(values, dtype=np.int64))


def test_negative_or_swapped_counts_are_refused_at_open(make_store):
    """Negative or swapped doc_bytes/doc_words gave bits per byte -57 with exit 0: refused at open."""
    root = make_store(DOCS, nbytes=[10, 20, 30, 40, 50], nwords=[1, 2, 3, 4, 5])
    with open_store(root) as s:
        assert s.doc_bytes.tolist() == [10, 20, 30, 40, 50]
    _save_index(root, "doc_bytes", [10, 20, -30, 90, 60])  # same sum, one negative count
    _refused(root, r"doc_bytes is negative \(-30\) at document 2")
    _save_index(root, "doc_bytes", [1, 2, 3, 4, 5])  # doc_bytes and doc_words swapped
    _save_index(root, "doc_words", [10, 20, 30, 40, 50])
    _refused(root, "doc_bytes sums to 15 but the manifest totals say 150")


def test_bad_offsets_are_refused_at_open(make_store):
    root = make_store(DOCS, shard_tokens=100)
    good = np.load(root / "index" / "doc_offsets.npy")
    assert good.tolist() == [0, 4, 6, 9, 16, 21]
    for bad, match in (([1, 4, 6, 9, 16, 21], r"spans \[1, 21\)"), ([0, 4, 6, 9, 16, 20], r"spans \[0, 20\)"),
                       ([0, 4, 9, 6, 16, 21], "decreases at document 2")):
        _save_index(root, "doc_offsets", bad)
        _refused(root, match)


def test_document_spanning_shards_is_refused(make_store):
    root = make_store(DOCS, shard_tokens=6)  # shards hold whole documents: [0,6), [6,16), [16,21)
    _save_index(root, "doc_offsets", [0, 4, 7, 9, 16, 21])  # document 1 now ends inside shard 2
    _refused(root, "a document spans the start of shard")


def test_index_file_must_be_exactly_what_np_save_writes(npy):
    buf = np.load(npy / "index" / "doc_bytes.npy")
    with open(npy / "index" / "probe.npy", "wb") as f:
        np.save(f, buf)
    assert (npy / "index" / "probe.npy").read_bytes()[: len(npy_header(len(buf)))] == npy_header(len(buf))
    raw = bytearray((npy / "index" / "doc_bytes.npy").read_bytes())
    raw[raw.index(b"False")] = ord("T")  # header still parses for numpy? either way not ours
    (npy / "index" / "doc_bytes.npy").write_bytes(bytes(raw).replace(b"Talse", b"True "))
    _refused(npy, "is not the int64")
    np.save(npy / "index" / "doc_bytes.npy", buf.astype(np.int32))  # another dtype
    _refused(npy, "is not the int64")


# ---- defect 3: index checksums (format version 2) -------------------------------------------------
def test_moved_offset_fails_verify(make_store):
    """Moving one doc_offsets entry (still ordered, still covering) passed verify: now its checksum fails."""
    root = make_store(DOCS, shard_tokens=100)
    assert [x["name"] for x in json.loads((root / MANIFEST_NAME).read_text())["index"]] == \
        ["doc_offsets", "doc_bytes", "doc_words"]
    assert verify_store(root).ok
    _save_index(root, "doc_offsets", [0, 4, 7, 9, 16, 21])  # one entry +1: structure still fine
    with open_store(root) as s:
        assert s.doc_offsets[2] == 7
    r = verify_store(root)
    assert not r.ok and r.defects == [r.defects[0]] and "index/doc_offsets.npy: sha256" in r.defects[0], r.defects


def test_version_1_store_opens_and_says_its_index_has_no_checksum(npy):
    def to_v1(d):
        d["format_version"] = 1
        del d["index"]
    _edit_manifest(npy, to_v1)
    with open_store(npy) as s:
        assert s.manifest.format_version == 1 and s.manifest.index == []
    r = verify_store(npy)
    assert r.ok and r.notes and "no checksum" in r.notes[0]
    _edit_manifest(npy, lambda d: d.update(format_version=2))  # version 2 without checksums: a defect
    r = verify_store(npy)
    assert not r.ok and "doc_offsets: no checksum in the manifest" in r.defects


# ---- the in-memory backend ------------------------------------------------------------------------
def test_memory_store_from_arrays_and_tensors():
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.int64)
    with open_store(ids) as s:
        assert isinstance(s, MemoryTokenStore) and s.manifest.format == "memory"
        assert s.dtype == np.dtype("<u2") and s.read(0, 8).tolist() == ids.tolist()
        assert s.doc_offsets.tolist() == [0, 8] and s.doc_bytes is None and s.vocab_size is None
        assert verify_store(s).ok
    assert ids.flags.writeable  # the caller's array is untouched
    s = open_store(np.array([70000, 1], dtype=np.uint32))  # no vocab: dtype from the largest id
    assert s.dtype == np.dtype("<u4")
    s = open_store(np.array([1, 2, 3], np.uint8), vocab_size=100_000)  # vocab given: choose_dtype(vocab)
    assert s.dtype == np.dtype("<u4") and s.vocab_size == 100_000
    torch = pytest.importorskip("torch")
    t = torch.tensor([[5, 6, 7, 8]]).reshape(-1)
    with open_store(t, doc_offsets=torch.tensor([0, 1, 4]), doc_bytes=np.array([2, 6]), doc_words=[1, 1]) as s:
        assert s.read(1, 4).tolist() == [6, 7, 8] and s.document(1).tolist() == [6, 7, 8]
        assert s.manifest.totals == {"tokens": 4, "documents": 2, "bytes": 8, "words": 2}
        assert verify_store(s).ok


def test_memory_store_refuses_bad_input():
    with pytest.raises(StoreError, match=r"token id -1 at position 1 of <memory> is negative"):
        open_store(np.array([1, -1, 2]))
    with pytest.raises(StoreError, match=r"token id 50 at position 2 of <memory> is >= vocab_size 50"):
        open_store(np.array([1, 2, 50]), vocab_size=50)
    with pytest.raises(ConfigError, match="pass a 1-D integer array"):
        open_store(np.array([1.0, 2.0]))
    with pytest.raises(StoreError, match=r"doc_offsets spans \[0, 2\), the manifest says \[0, 3\)"):
        open_store(np.array([1, 2, 3]), doc_offsets=np.array([0, 2]))
    with pytest.raises(StoreError, match="doc_bytes is negative"):
        open_store(np.array([1, 2, 3]), doc_offsets=np.array([0, 1, 3]), doc_bytes=np.array([-1, 1]))


# ---- structure -----------------------------------------------------------------------------------
def test_widening_reads_is_a_backend_capability(npy, tmp_path):
    z = tmp_path / "z"
    convert_store(npy, z, format="zarr", chunk_tokens=4, chunks_per_shard=2)
    flat = [t for d in DOCS for t in d]
    with open_store(npy) as a, open_store(z) as b, open_store(np.array(flat)) as c:
        assert (a.widening_reads, b.widening_reads, c.widening_reads) == (True, False, True)
        for s in (a, c):  # what the capability promises: an int64 buffer is filled exactly
            wide = np.full(21, -1, np.int64)
            s.read_into(0, 21, wide)
            assert wide.tolist() == flat
    assert TokenStore.widening_reads is False and NpyTokenStore.widening_reads is True
    with pytest.raises(ConfigError, match="do not apply to the store folder"):
        open_store(npy, vocab_size=3)


def test_backends_never_import_the_dispatcher():
    """No import circles: backend modules import base (and each other), never backends/__init__."""
    pkg = Path(__file__).resolve().parents[2] / "streamdata" / "backends"
    for name in ("base", "npy", "raw_bin", "megatron", "memory"):
        tree = ast.parse((pkg / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.level == 1 and node.module is None), f"{name}.py imports the dispatcher"
                assert node.module not in ("streamdata.backends",), f"{name}.py imports the dispatcher"
    assert not (pkg.parent / "store.py").exists() and not (pkg.parent / "imports.py").exists()
