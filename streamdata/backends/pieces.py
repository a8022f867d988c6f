"""Imported ids held in several mapped pieces, read in order as one token address space.

A *piece* is a run of ids of one file dtype at a byte offset of a file (a whole datatrove ``.ds``
file; the data region of a LitData chunk after its header). The store's tokens are the pieces
back to back in the order the format defines; each piece is one manifest shard (documents never
span pieces, so ``check_document_index`` checks every piece start is a document start), and its
shard checksum is the sha256 of its ids as the store returns them (what ``streamdata verify``
recomputes). The formats' own modules (:mod:`.datatrove`, :mod:`.litdata`) parse and check their
files, build the pieces and each piece's document ends, then call :meth:`PiecedStore._seal`.

Reads: a range inside one piece is one slice of its mapping (:meth:`PiecedStore.view` returns it
zero-copy when the file's bytes are the store's, e.g. uint16 -> uint16, int32 -> uint32); ranges
across pieces are copied piece by piece. Other file dtypes are converted with a range check
(:func:`.raw_bin.copy_ids`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..errors import StoreError
from ..format import Manifest, ShardInfo, numpy_dtype
from .base import MappedFile, check_document_index, imported_identity, int64_index, scan_tokens
from .raw_bin import ImportedStore, copy_ids, same_id_bytes

__all__ = ["Piece", "PiecedStore"]


@dataclass(eq=False)
class Piece:
    """``tokens`` ids of the store's file dtype at byte ``offset`` of ``file``, holding ``documents``
    whole documents whose local end offsets (tokens, exclusive) ``ends(lo, hi)`` gives as int64 for
    documents ``[lo, hi)`` of the piece (read in blocks: an index may be larger than RAM)."""

    name: str  # the manifest shard name (file name relative to the dataset's folder)
    file: MappedFile
    offset: int  # bytes
    tokens: int
    documents: int
    ends: Callable[[int, int], np.ndarray]
    start: int = 0  # global token offset (set by PiecedStore)
    doc_start: int = 0  # global index of its first document (set by PiecedStore)
    arr: np.ndarray | None = field(default=None, repr=False)  # zero-copy view of the ids in the mapping

    @property
    def stop(self) -> int:
        return self.start + self.tokens


class PiecedStore(ImportedStore):
    """Shared reader of imports made of several pieces. See module docstring."""

    widening_reads = True  # read_into is a numpy slice assignment: an int64 ``out`` is filled exactly
    _pieces: list[Piece]
    _other_files: list[MappedFile]  # every file opened, pieces' too (closed with the store; closing twice is harmless)

    def _set_pieces(self, pieces: list[Piece], file_dtype: np.dtype, dtype: str, fmt: str) -> None:
        """Lay the pieces out one after the other, build the document index and a provisional
        manifest (read_into checks ranges against it), and check the index's structure."""
        self._pieces = pieces
        self._fdt, self._sdt = file_dtype, numpy_dtype(dtype)
        self._same = same_id_bytes(file_dtype, self._sdt)
        start = doc = 0
        for p in pieces:
            p.start, p.doc_start = start, doc
            p.arr = p.file.array(file_dtype, p.tokens, p.offset)
            start += p.tokens
            doc += p.documents
        self._starts = [p.start for p in pieces]
        doc_starts = [p.doc_start for p in pieces]

        def fill(out: np.ndarray, lo: int, hi: int) -> None:
            # entry 0 is 0; entry i >= 1 is the global end of document i - 1
            i = lo
            if i == 0:
                out[0] = 0
                i = 1
            while i < hi:
                d = i - 1
                p = pieces[bisect.bisect_right(doc_starts, d) - 1]  # the last piece starting at or before d: it holds d
                j0 = d - p.doc_start
                j1 = min(p.documents, j0 + hi - i)
                out[i - lo : i - lo + j1 - j0] = p.start + p.ends(j0, j1)
                i += j1 - j0

        self._offsets = int64_index(doc + 1, fill)
        self.manifest = Manifest(dtype=dtype, tokenizer={}, special_tokens={}, source={}, shards=self._shards([""] * len(pieces)),
                                 totals={"tokens": start, "documents": doc}, format=fmt)
        check_document_index(self.path, self.manifest, self._offsets, None, None)

    def _shards(self, shas: list[str]) -> list[ShardInfo]:
        return [ShardInfo(p.name, p.tokens, p.documents, sha, p.start, p.doc_start) for p, sha in zip(self._pieces, shas)]

    def _seal(self, what: str, *, vocab_size: int | None, eos_id: int | None, checksum: bool, tokenizer_name: str | None,
              source: dict[str, Any], fmt: str, tool: str) -> list[str]:
        """Checksum every piece (one pass, ids checked against ``vocab_size``) and write the final
        manifest. ``checksum=False`` reads nothing here: a declared ``vocab_size`` is then enforced
        as ids are read (the loader checks every span), and verify reports the empty checksums.
        Returns the shard checksums."""
        shas = []
        for p in self._pieces:
            if not checksum:
                shas.append("")
                continue
            sha, bad = scan_tokens(self, p.start, p.stop, vocab_size=vocab_size)
            if bad is not None:
                raise StoreError(f"{what} holds token id {bad[1]} at token {bad[0]} (in {p.name!r}), >= vocab_size "
                                 f"{vocab_size}: pass the right vocab_size")
            shas.append(sha)
        tokenizer, special = imported_identity(vocab_size, eos_id, "unknown (imported token file)")
        tokenizer["name"] = tokenizer_name
        m = self.manifest
        self.manifest = Manifest(
            dtype=m.dtype, tokenizer=tokenizer, special_tokens=special, source=source, shards=self._shards(shas),
            totals=dict(m.totals), format=fmt, created_by={"tool": tool},
            extra={"read_only_import": True, "doc_counts": "unknown", "checksum": "sha256" if checksum else "skipped"},
        )
        return shas

    def piece_is_file_bytes(self, p: Piece) -> bool:
        """True when piece ``p``'s shard checksum is also its file's (the whole file is its ids, same bytes)."""
        return self._same and p.offset == 0 and p.file.size == p.tokens * self._fdt.itemsize

    # ---- reads -----------------------------------------------------------------------------------
    def _copy(self, p: Piece, lo: int, hi: int, out: np.ndarray) -> None:
        copy_ids(p.arr[lo - p.start : hi - p.start], out, self._sdt, self._same, f"{self.path!r} ({p.name})")

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        start, stop = int(start), int(stop)
        k = bisect.bisect_right(self._starts, start) - 1
        if 0 <= start <= stop and 0 <= k < len(self._pieces) and stop <= self._pieces[k].stop:
            self._copy(self._pieces[k], start, stop, out)  # the loader's common case: one slice
            return
        start, stop = self._check_range(start, stop)
        for p, lo, hi in self._spans(start, stop):
            self._copy(p, lo, hi, out[lo - start :])

    def _spans(self, start: int, stop: int):
        """(piece, global lo, global hi) pieces covering ``[start, stop)``; empty pieces are skipped."""
        k = max(0, bisect.bisect_right(self._starts, start) - 1)
        pos = start
        while pos < stop:
            p = self._pieces[k]
            hi = min(stop, p.stop)
            if hi > pos:
                yield p, pos, hi
            pos = max(pos, hi)
            k += 1

    def view(self, start: int, stop: int) -> np.ndarray | None:
        if not self._same:
            return None
        start, stop = int(start), int(stop)
        k = bisect.bisect_right(self._starts, start) - 1
        if 0 <= start <= stop and 0 <= k < len(self._pieces) and stop <= self._pieces[k].stop:
            p = self._pieces[k]
            return p.arr[start - p.start : stop - p.start].view(self._sdt)
        return None

    def _hint(self, start: int, stop: int, drop: bool) -> None:
        start, stop = self._check_range(start, stop)
        isz = self._fdt.itemsize
        for p, lo, hi in self._spans(start, stop):
            b0, b1 = p.offset + (lo - p.start) * isz, p.offset + (hi - p.start) * isz
            (p.file.drop if drop else p.file.willneed)(b0, b1)

    def release(self, start: int, stop: int) -> None:
        self._hint(start, stop, True)

    def prefetch(self, start: int, stop: int) -> None:
        self._hint(start, stop, False)

    def close(self) -> None:
        # views of a mapping go before it closes (an mmap with exported buffers cannot close)
        for p in getattr(self, "_pieces", []):
            p.arr = None
        for p in getattr(self, "_pieces", []):
            p.file.close()
        for f in getattr(self, "_other_files", []):
            f.close()
        self._pieces, self._other_files = [], []
        super().close()
