"""npy backend (reader): raw little-endian token shards and ``.npy`` index arrays, memory-mapped.

Layout and commit order: :mod:`streamdata.format` (the writer is :mod:`streamdata.writer`).

At open every shard and index file is resolved inside the store (:func:`resolve_inside`), opened,
mapped and sized against the manifest, and the document index is checked
(:func:`~.base.check_document_index`); a store rewritten on disk afterwards keeps being read as it
was (the mappings hold the old files). ``streamdata verify`` adds the checksums.
"""

from __future__ import annotations

import bisect

import io
from pathlib import Path

import numpy as np

from ..errors import StoreError
from ..format import INDEX_DIR, SOURCE_ARRAYS, Manifest, numpy_dtype, resolve_inside
from .base import DocSources, MappedFile, TokenStore, check_document_index

__all__ = ["NpyTokenStore", "npy_header"]

_INDEX_NAMES = ("doc_offsets", "doc_bytes", "doc_words")


def npy_header(length: int) -> bytes:
    """The exact header ``np.save`` writes for an int64 array of shape ``(length,)`` (format 1.0).

    Index files are compared to it byte for byte: a damaged header that numpy would still parse
    (another shape, byte order or dtype) is refused instead of silently reinterpreting the data.
    """
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype("<i8")),
                                               "fortran_order": False, "shape": (int(length),)})
    return buf.getvalue()


class _Shard:
    """One mapped token shard covering global tokens ``[start, stop)``."""

    __slots__ = ("file", "arr", "start", "stop", "itemsize")

    def __init__(self, path: Path, start: int, tokens: int, dtype: np.dtype):
        self.start, self.stop, self.itemsize = start, start + tokens, dtype.itemsize
        self.file = MappedFile(path, "shard")
        if self.file.size != tokens * dtype.itemsize:
            size = self.file.size
            self.file.close()
            raise StoreError(
                f"shard {str(path)!r} has {size} bytes but the manifest says {tokens} tokens x {dtype.itemsize} bytes: "
                "the store is damaged (truncated?), rebuild it"
            )
        self.arr = self.file.array(dtype, tokens)

    def close(self) -> None:
        self.arr = None  # the numpy view first: a mapping with exported buffers cannot close
        self.file.close()


class NpyTokenStore(TokenStore):
    """A local npy store (layout: :mod:`streamdata.format`)."""

    widening_reads = True  # read_into is a numpy slice assignment: an int64 ``out`` is filled exactly

    def __init__(self, root: str | Path, manifest: Manifest):
        root = Path(root)
        self.path = str(root)
        self.manifest = manifest
        dtype = numpy_dtype(manifest.dtype)
        self._shards: list[_Shard] = []
        self._index_files: list[MappedFile] = []
        try:
            for s in manifest.shards:
                self._shards.append(_Shard(resolve_inside(root, s.file, "shard"), s.start, s.tokens, dtype))
            n = manifest.num_documents
            recorded = {x.name: x for x in manifest.index}
            unknown = sorted(set(recorded) - set(_INDEX_NAMES) - set(SOURCE_ARRAYS))
            if unknown:
                raise StoreError(f"{self.path!r}: manifest lists unknown index arrays {unknown}: the store is damaged, rebuild it")
            arrays = {}
            for name, length in zip(_INDEX_NAMES, (n + 1, n, n)):
                rel = recorded[name].file if name in recorded else f"{INDEX_DIR}/{name}.npy"
                arrays[name] = self._load_index(resolve_inside(root, rel, "index"), length)
            self._offsets, self._bytes, self._words = (arrays[k] for k in _INDEX_NAMES)
            if manifest.source_files is not None:  # version 3 (both arrays or neither: Manifest.from_dict)
                self._sources = DocSources(list(manifest.source_files),
                                           *(self._load_index(resolve_inside(root, recorded[k].file, "index"), n)
                                             for k in SOURCE_ARRAYS))
            self._starts = np.array([s.start for s in self._shards] + [len(self)], dtype=np.int64)
            self._start_list = [s.start for s in self._shards]  # for bisect (read_into's fast path)
            check_document_index(self.path, manifest, self._offsets, self._bytes, self._words, self._sources)
        except BaseException:
            self.close()
            raise

    def _load_index(self, path: Path, length: int) -> np.ndarray:
        f = MappedFile(path, "index")
        self._index_files.append(f)
        header = npy_header(length)
        if f.size != len(header) + 8 * length or f.read(0, len(header)) != header:
            raise StoreError(
                f"index {str(path)!r} is not the int64 ({length},) array the manifest needs "
                f"({f.size} bytes, expected {len(header) + 8 * length} with np.save's header): the store is damaged, rebuild it"
            )
        return f.array("<i8", length, len(header))

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
        # Called once per window by the loader (thousands per second): the common case, a range
        # inside one shard, is a bisect on a list and one slice copy; np.searchsorted plus the
        # generator cost ~10 us a call, as much as copying a 8k-token window.
        start, stop = int(start), int(stop)
        k = bisect.bisect_right(self._start_list, start) - 1
        if 0 <= start <= stop and k < len(self._shards) and stop <= self._shards[k].stop:
            sh = self._shards[k]
            out[: stop - start] = sh.arr[start - sh.start : stop - sh.start]
            return
        start, stop = self._check_range(start, stop)
        for sh, lo, hi, o in self._spans(start, stop):
            out[o : o + hi - lo] = sh.arr[lo:hi]

    def view(self, start: int, stop: int) -> np.ndarray | None:
        start, stop = int(start), int(stop)
        k = bisect.bisect_right(self._start_list, start) - 1
        if 0 <= start <= stop and k < len(self._shards) and stop <= self._shards[k].stop:
            sh = self._shards[k]
            return sh.arr[start - sh.start : stop - sh.start]
        return None

    def shard_views(self) -> list[tuple[int, np.ndarray]]:
        """(global start, read-only zero-copy array) per shard, for readers that slice memmaps directly."""
        return [(sh.start, sh.arr) for sh in self._shards]

    def release(self, start: int, stop: int) -> None:
        start, stop = self._check_range(start, stop)
        for sh, lo, hi, _ in self._spans(start, stop):
            sh.file.drop(lo * sh.itemsize, hi * sh.itemsize)

    def prefetch(self, start: int, stop: int) -> None:
        start, stop = self._check_range(start, stop)
        for sh, lo, hi, _ in self._spans(start, stop):
            sh.file.willneed(lo * sh.itemsize, hi * sh.itemsize)

    def close(self) -> None:
        # The index arrays stay valid after close (a mapping with live views is unmapped when the
        # last view goes, see MappedFile.close): callers may keep doc_offsets past the store.
        for sh in getattr(self, "_shards", []):
            sh.close()
        for f in getattr(self, "_index_files", []):
            f.close()
        self._shards, self._index_files = [], []
