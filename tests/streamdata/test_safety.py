"""Safety of the write side (issue 9): index checksums recorded by every writer, ownership of output
folders, one writer per folder, overwrite by swap, resume identity, one-line errors, no leftovers."""

from __future__ import annotations

import numpy as np
import pytest

from streamdata import open_store
from streamdata.backends.zarr import write_zarr_store
from streamdata.format import FORMAT_VERSION, index_sha256, read_manifest


def _index_arrays(store):
    return {"doc_offsets": store.doc_offsets, "doc_bytes": store.doc_bytes, "doc_words": store.doc_words}


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_every_writer_records_index_checksums(make_store, tmp_path, fmt):
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], []]
    root = make_store(docs, nbytes=[3, 1, 9, 0], nwords=[1, 1, 2, 0])
    if fmt == "zarr":
        write_zarr_store(root, tmp_path / "z", chunk_tokens=4, chunks_per_shard=2)
        root = tmp_path / "z"
    m = read_manifest(root)
    assert m.format_version == FORMAT_VERSION == 2
    assert [x.name for x in m.index] == ["doc_offsets", "doc_bytes", "doc_words"]
    with open_store(root) as s:
        arrays = _index_arrays(s)
        for info in m.index:
            assert info.length == len(arrays[info.name])
            assert info.sha256 == index_sha256(np.asarray(arrays[info.name]))
            assert (root / info.file).exists()
    assert [x.file for x in m.index] == (
        ["index/doc_offsets.npy", "index/doc_bytes.npy", "index/doc_words.npy"] if fmt == "npy"
        else ["doc_offsets", "doc_bytes", "doc_words"])
