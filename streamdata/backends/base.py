"""What every backend shares: the :class:`TokenStore` read interface, the one memory-mapping helper
(:class:`MappedFile`) and the open-time structural check of the document index.

A store is one global token address space ``[0, len(store))`` over its shards plus a document
index. Consumers (the window loader, the evaluator, ``streamdata verify``) use only this interface,
so a backend (npy shards, zarr v3, imported nanoGPT/Megatron files, an in-memory array) is a matter
of implementing :meth:`TokenStore.read_into` and setting the index arrays.

Performance contract for backends:
- ``read_into`` copies a range into a caller-owned buffer (the loader's pinned host slot) with no
  intermediate allocation where the backend allows it.
- ``release`` is a hint that a range will not be read again soon, so a sequential pass over a file
  larger than RAM keeps the resident set bounded (:meth:`MappedFile.drop`).

Safety contract (checked by every backend when it opens, so no consumer has to):
- every path taken from a manifest goes through :func:`streamdata.format.resolve_inside`;
- every file the store will read is opened (and sized) at open time, so a store replaced on disk
  while it is read keeps serving the snapshot it opened, or the backend detects the change and fails;
- :func:`check_document_index` refuses an index that would give wrong numbers (O(documents), numpy).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from ..errors import ConfigError, StoreError
from ..format import Manifest

__all__ = ["INDEX_IN_RAM", "ChecksummedReads", "DocSources", "MappedFile", "TokenStore", "check_document_index",
           "check_index_in_ram", "find_id_over",
           "imported_identity", "int64_index", "scan_tokens"]

_PAGE = mmap.PAGESIZE
# Entries per step of the index checks: bounds the temporaries (a bool mask and a diff of 4Mi
# entries, ~40 MiB) whatever the number of documents.
_CHECK_BLOCK = 1 << 22
SCAN_BLOCK = 1 << 24  # ids per step of a full pass: 32-64 MiB, full disk bandwidth, bounded memory


class MappedFile:
    """A whole file opened and memory-mapped read-only at construction, with page hints.

    We map with :mod:`mmap` ourselves rather than ``np.memmap`` because we need the mapping object
    for ``madvise`` (dropping pages behind a sequential reader) and the file descriptor for
    ``posix_fadvise``; numpy arrays from :meth:`array` are zero-copy views of the mapping.
    The descriptor is held until :meth:`close`, so the file's data stays what it was at open even
    if the path is renamed over or unlinked (a snapshot). Trap: never pin these arrays with CUDA:
    pinning a mapping makes the whole file resident.
    """

    __slots__ = ("path", "fd", "mm", "size")

    def __init__(self, path: str | os.PathLike, what: str = "file"):
        self.path = Path(path)
        self.mm: mmap.mmap | None = None
        try:
            self.fd: int | None = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"cannot open {what} {str(self.path)!r} ({e.strerror}): "
                             "check the path, or the store is damaged (rebuild it)") from None
        try:
            self.size = os.fstat(self.fd).st_size  # bytes
            if self.size:  # mmap cannot map an empty file
                self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            self.close()
            raise

    def array(self, dtype: np.dtype | str, count: int, offset: int = 0) -> np.ndarray:
        """Zero-copy read-only view of ``count`` items of ``dtype`` starting at byte ``offset``."""
        if self.mm is None or count == 0:
            return np.empty(0, dtype=dtype)
        return np.frombuffer(self.mm, dtype=dtype, count=count, offset=offset)

    def read(self, b0: int, b1: int) -> bytes:
        """Bytes ``[b0, b1)`` as a copy (no buffer export that would keep the mapping open)."""
        return b"" if self.mm is None else self.mm[b0:b1]

    def drop(self, b0: int, b1: int) -> None:
        """Drop the resident pages wholly inside bytes ``[b0, b1)``.

        MADV_DONTNEED unmaps the pages from this process (resident set); FADV_DONTNEED evicts the
        clean pages from the page cache, so a larger-than-RAM pass does not push out other files.
        Rounded inwards: a page still partly ahead of the reader is never dropped.
        """
        if self.mm is None:
            return
        b0 = -(-b0 // _PAGE) * _PAGE
        b1 = min(b1, self.size) // _PAGE * _PAGE
        if b1 > b0:
            self.mm.madvise(mmap.MADV_DONTNEED, b0, b1 - b0)
            os.posix_fadvise(self.fd, b0, b1 - b0, os.POSIX_FADV_DONTNEED)

    def willneed(self, b0: int, b1: int) -> None:
        """Hint that bytes ``[b0, b1)`` will be read soon (the kernel starts reading them ahead)."""
        b1 = min(b1, self.size)
        if self.mm is None or b1 <= b0:
            return
        b0 = b0 // _PAGE * _PAGE
        self.mm.madvise(mmap.MADV_WILLNEED, b0, b1 - b0)

    def close(self) -> None:
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:
                # a numpy view is still alive (e.g. in an exception's traceback): the mapping is
                # unmapped when the last view goes; mmap holds its own duplicate of the fd
                pass
            self.mm = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


#: Index arrays of up to this many int64 entries (8 MiB) are built in RAM; longer ones in a temporary
#: memory map (:func:`int64_index`), whose blocks are also this long. The default of the stores'
#: ``index_in_ram`` argument.
INDEX_IN_RAM = 1 << 20


def check_index_in_ram(value: Any) -> int:
    """``index_in_ram`` as given to a store: an int >= 1, else a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"index_in_ram={value!r} must be an integer >= 1 (index entries held in RAM): "
                          f"pass e.g. {INDEX_IN_RAM}, the default")
    return int(value)


def int64_index(length: int, fill: Callable[[np.ndarray, int, int], None], in_ram: int = INDEX_IN_RAM) -> np.ndarray:
    """A read-only int64 array of ``length`` entries that ``fill(out, lo, hi)`` writes block by block,
    in order (``out`` is entries ``[lo, hi)``, at most ``in_ram`` long).

    Up to ``in_ram`` entries: an array in RAM. Longer (a document index of 10^8 entries is 800 MB):
    a temporary .npy file of ours, filled through a memory map, mapped read-only and unlinked at
    once, so the kernel pages it in and out as a file's, nothing stays on disk after close or a
    crash, and the process holds O(block) memory whatever the length.
    """
    if length <= in_ram:
        out = np.empty(length, np.int64)
        if length:
            fill(out, 0, length)
        out.flags.writeable = False
        return out
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix="streamdata-index-", suffix=".npy")
    os.close(fd)
    try:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int64, shape=(length,))
        for lo in range(0, length, in_ram):
            hi = min(length, lo + in_ram)
            fill(mm[lo:hi], lo, hi)
        mm.flush()
        del mm
        return np.load(tmp, mmap_mode="r")
    finally:
        os.unlink(tmp)


@dataclass(frozen=True)
class DocSources:
    """Where each document of a store came from (:data:`streamdata.format.SOURCE_ARRAYS`): document
    ``i`` is row ``row[i]`` of ``files[file[i]]``, or row ``row[i]`` of the dataset when ``file[i]``
    is -1 (-1 rows: not known). ``file``/``row``: int64 [num_documents], arrays or memory maps (or a
    view that supports ``len`` and contiguous slices); read a block at a time, never whole."""

    files: list[str]
    file: Any
    row: Any


def check_document_index(where: str, manifest: Manifest, offsets: np.ndarray, doc_bytes: np.ndarray | None,
                         doc_words: np.ndarray | None, sources: DocSources | None = None) -> None:
    """Refuse (StoreError, one line) a document index that would give wrong numbers.

    Checks: ``offsets`` has ``documents + 1`` entries, starts at 0, ends at the token total and
    never decreases; every shard boundary is a document boundary (documents never span shards);
    byte/word counts (when known) have one entry per document, are non-negative and sum to the
    manifest totals; source arrays (when recorded) have one entry per document, files within
    ``-1..len(source_files) - 1`` and rows >= -1. Vectorised in blocks, temporaries bounded by
    _CHECK_BLOCK: ~4 ns per document for the three arrays together (10^7 documents: 42 ms on the
    2-core build machine, page cache warm), so a 10^8-document index costs ~0.4 s at open, plus
    reading its 2.4 GB when cold (the two source arrays add a pass each, and 1.6 GB).
    """
    n, n_tok = manifest.num_documents, manifest.num_tokens
    bad = f"the store is damaged, rebuild it ({where!r})"
    if offsets.shape != (n + 1,):
        raise StoreError(f"doc_offsets has shape {offsets.shape}, the manifest needs ({n + 1},): {bad}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != n_tok:
        raise StoreError(f"doc_offsets spans [{int(offsets[0])}, {int(offsets[-1])}), the manifest says [0, {n_tok}): {bad}")
    for lo in range(0, n, _CHECK_BLOCK):
        block = offsets[lo : lo + _CHECK_BLOCK + 1]  # one entry of overlap: every step is compared
        down = np.flatnonzero(block[1:] < block[:-1])
        if down.size:
            raise StoreError(f"doc_offsets decreases at document {lo + int(down[0])}: {bad}")
    # a shard start must be one of the offsets (searchsorted: offsets are sorted now)
    starts = np.array([s.start for s in manifest.shards[1:]], dtype=np.int64)
    if starts.size:
        pos = np.minimum(np.searchsorted(offsets, starts), n)
        spans = np.flatnonzero(offsets[pos] != starts)
        if spans.size:
            raise StoreError(f"a document spans the start of shard {manifest.shards[1 + int(spans[0])].file!r} "
                             f"(token {int(starts[spans[0]])}): index and shards disagree; {bad}")
    for name, arr in (("bytes", doc_bytes), ("words", doc_words)):
        if arr is None:
            continue
        if arr.shape != (n,):
            raise StoreError(f"doc_{name} has shape {arr.shape}, the manifest needs ({n},): {bad}")
        total = 0
        for lo in range(0, n, _CHECK_BLOCK):
            block = arr[lo : lo + _CHECK_BLOCK]
            neg = np.flatnonzero(block < 0)
            if neg.size:
                raise StoreError(f"doc_{name} is negative ({int(block[neg[0]])}) at document {lo + int(neg[0])}: {bad}")
            total += int(block.sum(dtype=np.int64))
        want = manifest.totals.get(name)
        if want is not None and total != int(want):
            raise StoreError(f"doc_{name} sums to {total} but the manifest totals say {int(want)}: {bad}")
    if sources is not None:
        for name, arr, hi in (("doc_source_file", sources.file, len(sources.files)), ("doc_source_row", sources.row, None)):
            if len(arr) != n:
                raise StoreError(f"{name} has {len(arr)} entries, the manifest needs {n}: {bad}")
            for lo in range(0, n, _CHECK_BLOCK):
                block = np.asarray(arr[lo : lo + _CHECK_BLOCK])
                out = np.flatnonzero((block < -1) | (block >= hi)) if hi is not None else np.flatnonzero(block < -1)
                if out.size:
                    raise StoreError(f"{name} is {int(block[out[0]])} at document {lo + int(out[0])}, outside "
                                     f"[-1, {'inf' if hi is None else hi}): {bad}")


class TokenStore(ABC):
    """Read-only view of a token store. Use as a context manager or call :meth:`close`."""

    manifest: Manifest
    path: str

    #: Capability the window loader reads: True when :meth:`read_into` may be given an ``int64``
    #: buffer and fills it exactly (a numpy slice assignment widens uint16/uint32 in the same pass
    #: as the copy, saving the loader a second pass). Other backends get a buffer of :attr:`dtype`.
    widening_reads: ClassVar[bool] = False

    # ---- required by backends -------------------------------------------------------------
    @abstractmethod
    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, stop)`` into ``out[: stop - start]`` (same dtype as the store)."""

    def view(self, start: int, stop: int) -> np.ndarray | None:
        """Tokens ``[start, stop)`` as a read-only zero-copy array (store dtype) when they lie in one
        mapped piece (a shard's memmap, an in-memory array), else None (then use :meth:`read_into`).
        The loader gathers overlapping windows from it in one strided copy: one pass over the bytes
        and one release of the GIL per batch, where a copy per window released it per window."""
        return None

    # Backends set these in __init__: the document index as int64 arrays (memory-mapped or small).
    _offsets: np.ndarray
    _bytes: np.ndarray | None = None
    _words: np.ndarray | None = None
    _sources: DocSources | None = None

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 ``[num_documents + 1]``: token offset of each document start; last == ``len(self)``."""
        return self._offsets

    @property
    def doc_bytes(self) -> np.ndarray | None:
        """int64 ``[num_documents]`` UTF-8 bytes per document, or None when unknown (imports)."""
        return self._bytes

    @property
    def doc_words(self) -> np.ndarray | None:
        """int64 ``[num_documents]`` whitespace-separated words per document, or None when unknown."""
        return self._words

    @property
    def doc_sources(self) -> DocSources | None:
        """Where each document came from (file and row, or dataset row), or None when the store
        does not record it (stores written before format version 3, imports, in-memory ids)."""
        return self._sources

    def _index_of(self, inner: "TokenStore") -> None:
        """Take ``inner``'s document index as this store's (wrappers that read through another store)."""
        self._offsets, self._bytes, self._words = inner.doc_offsets, inner.doc_bytes, inner.doc_words
        self._sources = inner.doc_sources

    def release(self, start: int, stop: int) -> None:  # noqa: B027 - optional hint, default no-op
        """Hint: tokens ``[start, stop)`` will not be read again soon; the backend may drop them."""

    def prefetch(self, start: int, stop: int) -> None:  # noqa: B027 - optional hint, default no-op
        """Hint: tokens ``[start, stop)`` will be read soon; the backend may start reading them."""

    def close(self) -> None:  # noqa: B027 - backends with open files override
        """Release file handles and mappings. Arrays returned by :meth:`read` stay valid (copies)."""

    # ---- shared behaviour -----------------------------------------------------------------
    def _check_index(self) -> None:
        """Run :func:`check_document_index` on this store's arrays (backends call it at the end of open)."""
        check_document_index(self.path, self.manifest, self._offsets, self._bytes, self._words, self._sources)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.dtype).newbyteorder("<")

    @property
    def num_documents(self) -> int:
        return self.manifest.num_documents

    @property
    def vocab_size(self) -> int | None:
        v = self.manifest.tokenizer.get("vocab_size")
        return None if v is None else int(v)

    def __len__(self) -> int:
        return self.manifest.num_tokens

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        n = len(self)
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= n:
            raise ConfigError(f"token range [{start}, {stop}) is outside the store's [0, {n}): pass 0 <= start <= stop <= {n}")
        return start, stop

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as a new array of the store's dtype (crosses shards freely)."""
        start, stop = self._check_range(start, stop)
        out = np.empty(stop - start, dtype=self.dtype)
        self.read_into(start, stop, out)
        return out

    def document_bounds(self, i: int) -> tuple[int, int]:
        """Global token range ``[start, stop)`` of document ``i`` (including its EOS/BOS ids)."""
        if not 0 <= i < self.num_documents:
            raise ConfigError(f"document index {i} is outside [0, {self.num_documents})")
        off = self.doc_offsets
        return int(off[i]), int(off[i + 1])

    def document(self, i: int) -> np.ndarray:
        return self.read(*self.document_bounds(i))

    def __enter__(self) -> "TokenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, tokens={len(self)}, documents={self.num_documents}, "
            f"dtype={self.manifest.dtype}, format={self.manifest.format})"
        )


# ---- shared by full passes (verify, imports) and synthesized manifests ----------------------
def find_id_over(ids: np.ndarray, vocab_size: int | None) -> tuple[int, int] | None:
    """(position, id) of the first id ``>= vocab_size`` in ``ids``, or None (also when vocab is unknown)."""
    if vocab_size is None or not ids.size or int(ids.max()) < vocab_size:
        return None
    at = int(np.argmax(ids >= vocab_size))
    return at, int(ids[at])


def scan_tokens(store: TokenStore, start: int, stop: int, *, vocab_size: int | None = None,
                each: Callable[[np.ndarray, int], None] | None = None,
                checksum: bool = True) -> tuple[str, tuple[int, int] | None]:
    """One sequential pass over tokens ``[start, stop)`` through ``read_into`` in SCAN_BLOCK steps.

    Returns (sha256 of the ids as little-endian bytes of the store dtype, "" with
    ``checksum=False``; the first ``(token, id)`` with id >= ``vocab_size`` or None).
    ``each(block, global_start)`` sees every block. Pages behind the pass are released, so memory
    stays bounded on any file size.
    """
    h = hashlib.sha256() if checksum else None
    bad = None
    buf = np.empty(min(SCAN_BLOCK, max(1, stop - start)), dtype=store.dtype)
    for lo in range(start, stop, len(buf)):
        hi = min(stop, lo + len(buf))
        view = buf[: hi - lo]
        store.read_into(lo, hi, view)
        if h is not None:
            h.update(view)  # store dtype is little-endian: these are the LE bytes
        if bad is None:
            got = find_id_over(view, vocab_size)
            bad = None if got is None else (lo + got[0], got[1])
        if each is not None:
            each(view, lo)
        store.release(lo, hi)
    return ("" if h is None else h.hexdigest()), bad


class ChecksummedReads(TokenStore):
    """``inner`` read front to back, each shard's sha256 compared with its manifest entry as the
    shard's last token passes: what a copy (``merge``, ``convert``) reads through, so a damaged
    source stops the copy instead of being sealed under a new, valid checksum, with no second
    pass over the data.

    Reads must continue where the previous one ended (from token 0; a resumed copy re-reads its
    finished prefix), else RuntimeError: a gap would let bytes through unchecked. ``damaged(file)``
    words the StoreError for the shard ``file`` that does not match. Call :meth:`verified_all`
    before sealing: it fails unless every shard was checked.
    """

    def __init__(self, inner: TokenStore, damaged: Callable[[str], str]):
        self._inner, self._damaged = inner, damaged
        self.path, self.manifest = inner.path, inner.manifest
        self._index_of(inner)
        self._shards = list(inner.manifest.shards)
        self._next = 0  # the next token to hash
        self._k = 0  # the shard being hashed
        self._hash = hashlib.sha256()

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        if start != self._next:
            raise RuntimeError(f"checked reads of {self.path!r} must be sequential: read at {start}, expected {self._next}")
        self._inner.read_into(start, stop, out)
        data, pos = out[: stop - start], start
        # also past the end of the data: shards of 0 tokens that start there are checked at once
        while pos < stop or (self._k < len(self._shards) and self._shards[self._k].tokens == 0
                             and self._shards[self._k].start == pos):
            s = self._shards[self._k]
            upto = min(stop, s.start + s.tokens)
            self._hash.update(memoryview(np.ascontiguousarray(data[pos - start : upto - start])).cast("B"))  # LE dtype
            pos = upto
            if pos == s.start + s.tokens:
                if self._hash.hexdigest() != s.sha256:
                    raise StoreError(self._damaged(s.file))
                self._k += 1
                self._hash = hashlib.sha256()
        self._next = stop

    def release(self, start: int, stop: int) -> None:
        self._inner.release(start, stop)

    def verified_all(self) -> None:
        if self._next == len(self) and self._k < len(self._shards):  # empty shards at the very end
            self.read_into(self._next, self._next, np.empty(0, self.dtype))
        if self._next != len(self) or self._k != len(self._shards):
            raise RuntimeError(f"{self.path!r}: read {self._next} of {len(self)} tokens, so not every shard was verified")


def imported_identity(vocab_size: int | None, eos_id: int | None, placement: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer, special_tokens) manifest fields for ids that came without a tokenizer (imports, arrays)."""
    tokenizer = {"name": None, "sha256": None, "vocab_size": None if vocab_size is None else int(vocab_size),
                 "special_ids": {}}
    special = {"eos": None if eos_id is None else int(eos_id), "eos_token": None, "bos": None, "bos_token": None,
               "placement": placement}
    return tokenizer, special
