"""Spilled detail: per-window and per-document sums on disk, so memory never grows with the stream.

The device keeps only a block of these sums (:class:`evaluator.metrics.MetricSums`); every few
batches the block is copied out (one device sync) and written here with ``pwrite``. Writing through
file descriptors, not a writable memmap, keeps the written pages out of the process's RSS (the
kernel's page cache holds them until written back). Files, in one folder:

    window_nll.npy       float64 [num_chunks]     sum of NLL (nats) of each window's scored targets
    window_tokens.npy    int64   [num_chunks]     targets each window scored
    window_seconds.npy   float64 [num_chunks]     seconds per window (its batch's time shared equally)
    document_nll.npy     float64 [num_documents]  sum of NLL of each document's scored targets
    document_tokens.npy  int64   [num_documents]  targets scored in each document

They are plain ``.npy`` files (``np.load(path, mmap_mode="r")`` reads them; entries of windows and
documents never reached are 0). While a run is unfinished each is ``NAME.partial`` (same format),
renamed to ``NAME`` when the run completes, so a file under its final name is always whole. The
folder is the CLI's ``--out`` (or the API's ``checkpoint_dir``), where a resumed run continues the
partial files; without one, a temporary folder removed at the end and on errors (the returned
memmaps stay readable: a mapping keeps its pages).

A file is created sparse (its size is set, nothing is written), so a 10^8-window run costs disk only
for what it wrote. Each column keeps a SHA-256 of its final prefix (:meth:`SpillFiles.digests`,
recorded in every checkpoint); a resume checks each file against its record before anything is
written, and clears what lies past the prefix (evaluator/run_folder.py, "Integrity"). The arrays are indexed by global window and document id, so partial arrays of
several processes (ranks) over disjoint windows add up elementwise to the whole run's.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import ConfigError
from .run_folder import PrefixDigest, clear_after, damaged, partial, spill_name

__all__ = ["BLOCK", "BlockView", "COLUMNS", "SpillFiles", "block_sum"]

#: Elements per block when a spilled array is read back (8 MiB of float64).
BLOCK = 1 << 20

#: name -> (dtype, axis): every spilled column.
COLUMNS: dict[str, tuple[str, str]] = {
    "window_nll": ("<f8", "windows"),
    "window_tokens": ("<i8", "windows"),
    "window_seconds": ("<f8", "windows"),
    "document_nll": ("<f8", "documents"),
    "document_tokens": ("<i8", "documents"),
}

#: The final file names of a run's columns.
FILE_NAMES = tuple(spill_name(name) for name in COLUMNS)
_WHAT = "spilled column"


class _Column:
    """One ``.npy`` file written at element offsets with ``pwrite``.

    ``record`` (a resume): the checkpoint's record of this file (evaluator/run_folder.py); the
    file must match it, and what lies past the recorded prefix is cleared."""

    def __init__(self, folder: Path, name: str, length: int, resume: bool, dtype: str,
                 record: dict[str, Any] | None = None):
        self.name, self.dtype, self.length = name, np.dtype(dtype), length
        self.unverified: tuple[int, int] | None = None  # bytes [a, b) past the checkpoint's prefix
        self.final = folder / spill_name(name)
        self.partial = Path(partial(self.final))
        shape = (max(1, length),)  # a zero-length file cannot be mapped; slices stop at ``length``
        if resume:
            # A run that completed may have renamed its files already (a crash between the rename
            # and the report): continue whichever exists, the partial one first.
            path = self.partial if self.partial.is_file() else self.final
            if not path.is_file():
                raise damaged(self.partial, _WHAT, "it is missing")
            # the digest covers the header too: a damaged header is caught here, before numpy reads it
            self.digest = PrefixDigest.resume(path, record, _WHAT) if record is not None else None
            try:
                mm = np.load(path, mmap_mode="r")
            except (ValueError, OSError, EOFError) as e:  # a damaged header, a truncated file
                raise damaged(path, _WHAT, f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}") from None
            if mm.shape != shape or mm.dtype != self.dtype:
                raise ConfigError(f"{_WHAT} {str(path)!r} holds {mm.dtype}{list(mm.shape)}, not {self.dtype}{list(shape)}: "
                                  "pass --overwrite to start over")
            self.offset = mm.offset
            size = self.offset + mm.nbytes
            del mm
            if self.digest is None:
                self.digest = PrefixDigest(0)
                self.digest.extend_file(path, self.offset)  # (a caller without records: the header only)
            elif path == self.partial and self.digest.end < size:
                self.unverified = (self.digest.end, size)  # cleared once every column is checked
        else:
            path = self.partial
            # open_memmap writes the header and sets the size (sparse); nothing else is written
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape)
            self.offset = mm.offset
            del mm
            self.digest = PrefixDigest(0)
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        self.size = os.fstat(self.fd).st_size

    def write(self, lo: int, values: np.ndarray) -> None:
        if len(values):
            data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
            pos, view = self.offset + lo * self.dtype.itemsize, memoryview(data)
            while view:  # pwrite may write less than asked (signals, large writes)
                n = os.pwrite(self.fd, view, pos)
                view, pos = view[n:], pos + n

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SpillFiles:
    """The spilled columns of one run in ``folder`` (None: a temporary folder of our own).

    ``resume``: continue the files of a checkpointed run (they must exist with the same shapes).
    """

    def __init__(self, folder: str | os.PathLike | None, num_windows: int, num_documents: int, resume: bool = False,
                 columns: dict[str, tuple[str, str]] | None = None, records: dict[str, Any] | None = None):
        # columns: name -> (dtype, axis), default :data:`COLUMNS` (a model comparison spills more);
        # records: the checkpoint's file records (name -> PrefixDigest.record) to check on resume
        self.spec = COLUMNS if columns is None else columns
        self.temporary = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="streameval-detail-")) if folder is None else Path(folder)
        self.num_windows, self.num_documents = num_windows, num_documents
        self.columns: dict[str, _Column] = {}
        try:
            for name, (dtype, axis) in self.spec.items():
                n = num_windows if axis == "windows" else num_documents
                resumed = resume and not self.temporary
                rec = None
                if resumed and records is not None:
                    if name not in records:
                        raise damaged(self.folder / spill_name(name), _WHAT, "the checkpoint has no record of it")
                    rec = records[name]
                self.columns[name] = _Column(self.folder, name, n, resumed, dtype, rec)
            # Only once every column matched its record (a refusal changes nothing): what lies past
            # a prefix (written after the checkpoint, or damage) is cleared, so it cannot reach a result.
            for c in self.columns.values():
                if c.unverified is not None:
                    clear_after(c.path, *c.unverified)
        except BaseException:
            self.discard()
            raise

    def write(self, name: str, lo: int, values: np.ndarray) -> None:
        self.columns[name].write(lo, values)

    def sync(self) -> None:
        """Make everything written so far durable (before a checkpoint records how far it is valid)."""
        for c in self.columns.values():
            c.sync()

    def digests(self, windows_final: int, documents_final: int, whole: bool = False) -> dict[str, Any]:
        """The checkpoint's records of every column: the digest of its bytes up to the first
        window (document) that is not final yet, or of the whole file (``whole``: the run is
        complete). Reads only the bytes that became final since the last call."""
        out = {}
        for name, c in self.columns.items():
            n = windows_final if self.spec[name][1] == "windows" else documents_final
            end = c.size if whole else c.offset + max(0, min(n, c.length)) * c.dtype.itemsize
            c.digest.extend(c.fd, end)
            out[name] = c.digest.record(c.path, c.size)
        return out

    def finish(self) -> dict[str, np.memmap]:
        """Close, publish under the final names, and return read-only memmaps of every column
        (sliced to its length). A temporary folder is removed; its memmaps stay readable."""
        out: dict[str, np.memmap] = {}
        for name, c in self.columns.items():
            c.close()
            if not self.temporary and c.path == c.partial:
                os.replace(c.partial, c.final)
                c.path = c.final
            out[name] = np.load(c.path, mmap_mode="r")[: c.length]
        if self.temporary:
            self._remove_folder()
        return out

    def discard(self) -> None:
        """After an error: close; a temporary folder is removed, named ``.partial`` files are kept
        (a checkpointed run resumes into them; they never look complete)."""
        for c in self.columns.values():
            c.close()
        if self.temporary:
            self._remove_folder()

    def _remove_folder(self) -> None:
        # Only our own files, then the (then empty) folder we created: never a recursive delete of
        # anything else that might have appeared there.
        for name in self.spec:
            final = self.folder / spill_name(name)
            for p in (final, Path(partial(final))):
                p.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # something else was put there: left as it is
            pass


def block_sum(a: Any, n: int | None = None, *, block: int | None = None) -> Any:
    """Sum of ``a[:n]`` read ``block`` elements at a time (None: :data:`BLOCK`). One block: exactly
    ``np.sum`` of the whole (numpy's pairwise order). Longer: integers add exactly (Python ints);
    floats as numpy's sum of each block, then ``math.fsum`` of the block sums (exactly rounded).
    Memory stays one block."""
    n = len(a) if n is None else n
    block = BLOCK if block is None else block
    if n <= block:
        return np.asarray(a[:n]).sum()
    parts = (np.asarray(a[lo : min(n, lo + block)]).sum() for lo in range(0, n, block))
    if np.dtype(a.dtype).kind in "iub":
        return sum(int(p) for p in parts)
    return math.fsum(float(p) for p in parts)


class BlockView:
    """A read-only 1-D array computed elementwise from other arrays (spilled memmaps), block by block.

    ``fn(*blocks) -> ndarray`` is applied to equal slices of ``columns``. Indexing with an int or a
    slice computes just that part; ``np.asarray(view)`` materialises the whole array (the caller's
    choice: O(length) memory); :meth:`blocks` iterates in bounded memory, ``block`` elements at a
    time (None: :data:`BLOCK`).
    """

    def __init__(self, fn: Callable[..., np.ndarray], *columns: Any, dtype: Any = np.float64, block: int | None = None):
        self.fn, self.columns = fn, columns
        self.dtype = np.dtype(dtype)
        self.block = BLOCK if block is None else block
        self._len = len(columns[0])

    def __len__(self) -> int:
        return self._len

    @property
    def shape(self) -> tuple[int]:
        return (self._len,)

    ndim = 1

    def _compute(self, *blocks: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.asarray(self.fn(*(np.asarray(b) for b in blocks)), dtype=self.dtype)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            i = int(key) + (self._len if key < 0 else 0)
            if not 0 <= i < self._len:
                raise IndexError(f"index {int(key)} is out of bounds for length {self._len}")
            return self._compute(*(c[i : i + 1] for c in self.columns))[0]
        if isinstance(key, slice):
            return self._compute(*(c[key] for c in self.columns))
        return np.asarray(self)[key]

    def blocks(self, size: int | None = None) -> Iterator[np.ndarray]:
        size = size or self.block
        for lo in range(0, self._len, size):
            yield self._compute(*(c[lo : lo + size] for c in self.columns))

    def __iter__(self) -> Iterator[Any]:
        for b in self.blocks():
            yield from b.tolist()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.empty(self._len, self.dtype)
        lo = 0
        for b in self.blocks():
            out[lo : lo + len(b)] = b
            lo += len(b)
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"BlockView(length={self._len}, dtype={self.dtype})"
