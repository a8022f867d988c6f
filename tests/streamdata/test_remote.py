"""Remote stores: zarr stores written to and read from fsspec URLs (memory://, file://) through the
real fsspec code path, read-only and streamed; clear errors for what cannot be opened remotely."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest

import streamdata.backends.zarr as zb
from streamdata import ConfigError, StoreError, open_store
from streamdata.backends.zarr import ZarrTokenStore, open_zarr_store, write_zarr_store
from streamdata.convert import convert_store
from streamdata.format import MANIFEST_NAME
from streamdata.verify import verify_store

# Faults (a kill, a crash, a full disk, a network failure) are injected by patching the storage
# layer's private write/rename/finish seams: a fault must land in the middle of a write, and a public
# hook there would exist only for tests.


@pytest.fixture
def mem_url():
    """A fresh prefix in fsspec's (process-global) memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    base = f"/streamdata-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{base}"
    if fs.exists(base):
        fs.rm(base, recursive=True)


@pytest.fixture
def npy_store(make_store):
    rng = np.random.default_rng(11)
    docs = [rng.integers(1, 1000, int(rng.integers(1, 7000))).tolist() for _ in range(30)]
    return make_store(docs, shard_tokens=40000)


def _same(a, b):
    np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))
    np.testing.assert_array_equal(a.doc_offsets, b.doc_offsets)
    np.testing.assert_array_equal(a.doc_bytes, b.doc_bytes)
    np.testing.assert_array_equal(a.doc_words, b.doc_words)
    for lo in range(0, len(a) - 5000, 3001):
        np.testing.assert_array_equal(a.read(lo, lo + 5000), b.read(lo, lo + 5000))


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_write_and_read_memory_url(npy_store, mem_url, compression):
    url = f"{mem_url}/store"
    with open_store(npy_store) as s:
        m = write_zarr_store(s, url, compression=compression, chunk_tokens=4096, chunks_per_shard=4)
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    assert fs.isfile(f"{root}/{MANIFEST_NAME}") and not fs.exists(f"{root}/_build")
    with open_store(url) as z, open_store(npy_store) as ref:
        assert isinstance(z, ZarrTokenStore) and z.read_path == "block-cache"  # remote: never mmap
        assert type(z._zstore._store).__name__ == "FsspecStore"  # inside the missing-chunk guard
        assert z.manifest == m and z.path == url
        _same(z, ref)
    assert verify_store(url).ok


def test_copied_store_and_file_url(npy_store, tmp_path, mem_url):
    local = tmp_path / "z"
    with open_store(npy_store) as s:
        write_zarr_store(s, local, compression="zstd", chunk_tokens=4096, chunks_per_shard=4)
    fs = fsspec.filesystem("memory")
    fs.put(str(local), mem_url.removeprefix("memory://") + "/copy", recursive=True)
    with open_store(f"{mem_url}/copy") as a, open_store(local.as_uri()) as b, open_store(npy_store) as ref:
        assert type(b._zstore._store).__name__ == "FsspecStore"  # file:// goes through fsspec, not LocalStore
        assert b.read_path == "block-cache"
        _same(a, ref)
        _same(b, ref)
    assert verify_store(local.as_uri()).ok


def test_npy_over_urls(npy_store, mem_url):
    with open_store(npy_store.as_uri()) as s, open_store(npy_store) as ref:  # file:// npy: local memmap
        assert type(s).__name__ == "NpyTokenStore"
        _same(s, ref)
    fs = fsspec.filesystem("memory")
    fs.put(str(npy_store), mem_url.removeprefix("memory://") + "/npy", recursive=True)
    with pytest.raises(StoreError, match="npy store, which opens only from a local path.*--format zarr"):
        open_store(f"{mem_url}/npy")


def test_convert_to_url_and_resume(npy_store, mem_url, monkeypatch):
    url = f"{mem_url}/conv"
    real, n = zb._write_tokens_block, []

    def crash(arr, start, data):
        if len(n) == 2:
            raise RuntimeError("simulated network failure")
        n.append(start)
        real(arr, start, data)

    monkeypatch.setattr(zb, "_write_tokens_block", crash)
    with pytest.raises(RuntimeError):
        convert_store(npy_store, url, format="zarr", compression="zstd", chunk_tokens=4096, chunks_per_shard=2)
    with pytest.raises(StoreError, match="unfinished build"):
        open_store(url)
    monkeypatch.setattr(zb, "_write_tokens_block", real)
    m = convert_store(npy_store, url, format="zarr", compression="zstd", chunk_tokens=4096, chunks_per_shard=2)
    assert m.extra["converted_from"]["format"] == "npy"
    with open_zarr_store(url) as z, open_store(npy_store) as ref:
        _same(z, ref)
    with pytest.raises(ConfigError, match="npy output must be a local folder"):
        convert_store(npy_store, f"{mem_url}/npy-out", format="npy")


def test_remote_errors(mem_url):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(f"{mem_url}/nothing")
    fs = fsspec.filesystem("memory")
    fs.pipe(mem_url.removeprefix("memory://") + "/half/zarr.json", b"{}")
    with pytest.raises(StoreError, match="has no manifest.json: it is not a store"):
        open_store(f"{mem_url}/half")
    fs.pipe(mem_url.removeprefix("memory://") + "/badjson/manifest.json", b"{not json")
    with pytest.raises(StoreError, match="not readable JSON"):
        open_store(f"{mem_url}/badjson")
    with pytest.raises(StoreError, match="no usable filesystem for 'nosuchproto'"):
        open_store("nosuchproto://bucket/store")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(StoreError, match="install its fsspec package"):
            open_store("s3://bucket/store")
