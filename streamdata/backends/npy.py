"""Numpy backend: raw little-endian token shards read through ``mmap`` (layout: streamdata.format).

We map shard files with :mod:`mmap` ourselves rather than ``np.memmap`` because we need the mapping
object for ``madvise`` (dropping pages behind a sequential reader) and the file descriptor for
``posix_fadvise``; numpy arrays are zero-copy views of the mappings.
Never pin these arrays with CUDA: pinning a mapping makes the whole file resident.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..format import INDEX_DIR, Manifest, numpy_dtype
from ..store import TokenStore

_PAGE = mmap.PAGESIZE


class _Shard:
    __slots__ = ("fd", "mm", "arr", "start", "stop", "itemsize")

    def __init__(self, path: Path, start: int, tokens: int, dtype: np.dtype):
        self.start, self.stop, self.itemsize = start, start + tokens, dtype.itemsize
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"cannot open shard {str(path)!r} ({e.strerror}): the store is damaged, rebuild it") from None
        size = os.fstat(self.fd).st_size
        if size != tokens * dtype.itemsize:
            os.close(self.fd)
            raise StoreError(
                f"shard {str(path)!r} has {size} bytes but the manifest says {tokens} tokens x {dtype.itemsize} bytes: "
                "the store is damaged (truncated?), rebuild it"
            )
        if tokens:
            self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
            self.arr = np.frombuffer(self.mm, dtype=dtype)
        else:  # mmap cannot map an empty file
            self.mm, self.arr = None, np.empty(0, dtype=dtype)

    def drop(self, lo: int, hi: int) -> None:
        """Drop resident pages of local token range [lo, hi) (whole pages inside it only)."""
        if self.mm is None:
            return
        b0 = -(-lo * self.itemsize // _PAGE) * _PAGE  # round up: never drop a page still partly ahead
        b1 = hi * self.itemsize // _PAGE * _PAGE
        if b1 > b0:
            # MADV_DONTNEED unmaps the pages from this process (resident set); FADV_DONTNEED evicts
            # the clean pages from the page cache so a larger-than-RAM pass does not push out others.
            self.mm.madvise(mmap.MADV_DONTNEED, b0, b1 - b0)
            os.posix_fadvise(self.fd, b0, b1 - b0, os.POSIX_FADV_DONTNEED)

    def willneed(self, lo: int, hi: int) -> None:
        if self.mm is None or hi <= lo:
            return
        b0 = lo * self.itemsize // _PAGE * _PAGE
        self.mm.madvise(mmap.MADV_WILLNEED, b0, hi * self.itemsize - b0)

    def close(self) -> None:
        self.arr = None
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class NpyTokenStore(TokenStore):
    def __init__(self, root: Path, manifest: Manifest):
        self.path = str(root)
        self.manifest = manifest
        dtype = numpy_dtype(manifest.dtype)
        self._shards: list[_Shard] = []
        try:
            for s in manifest.shards:
                self._shards.append(_Shard(root / s.file, s.start, s.tokens, dtype))
            self._offsets = self._load_index(root, "doc_offsets", manifest.num_documents + 1)
            self._bytes = self._load_index(root, "doc_bytes", manifest.num_documents)
            self._words = self._load_index(root, "doc_words", manifest.num_documents)
        except BaseException:
            self.close()
            raise
        if self._offsets[0] != 0 or self._offsets[-1] != len(self):
            self.close()
            raise StoreError(f"{self.path!r}: document index does not cover [0, {len(self)}): the store is damaged, rebuild it")
        self._starts = np.array([s.start for s in self._shards] + [len(self)], dtype=np.int64)

    @staticmethod
    def _load_index(root: Path, name: str, length: int) -> np.ndarray:
        path = root / INDEX_DIR / f"{name}.npy"
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False) if length else np.zeros(0, np.int64)
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read index {str(path)!r} ({e}): the store is damaged, rebuild it") from None
        if arr.dtype != np.int64 or arr.shape != (length,):
            raise StoreError(
                f"index {str(path)!r} has dtype {arr.dtype} shape {arr.shape}, expected int64 ({length},): "
                "the store is damaged, rebuild it"
            )
        return arr

    def _spans(self, start: int, stop: int):
        """Yield (shard, local_lo, local_hi, out_lo) pieces covering the global range."""
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = start
        while pos < stop:
            sh = self._shards[k]
            hi = min(stop, sh.stop)
            if hi > pos:
                yield sh, pos - sh.start, hi - sh.start, pos - start
            pos = max(pos, hi)
            k += 1

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        start, stop = self._check_range(start, stop)
        for sh, lo, hi, o in self._spans(start, stop):
            out[o : o + hi - lo] = sh.arr[lo:hi]

    def shard_views(self) -> list[tuple[int, np.ndarray]]:
        """(global start, read-only zero-copy array) per shard, for readers that slice memmaps directly."""
        return [(sh.start, sh.arr) for sh in self._shards]

    def release(self, start: int, stop: int) -> None:
        start, stop = self._check_range(start, stop)
        for sh, lo, hi, _ in self._spans(start, stop):
            sh.drop(lo, hi)

    def prefetch(self, start: int, stop: int) -> None:
        start, stop = self._check_range(start, stop)
        for sh, lo, hi, _ in self._spans(start, stop):
            sh.willneed(lo, hi)

    def close(self) -> None:
        for sh in getattr(self, "_shards", []):
            sh.close()
        self._shards = []
