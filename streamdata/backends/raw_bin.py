"""raw-bin backend: a nanoGPT-style headerless token file, read in place (no re-tokenizing).

Layout (nanoGPT's ``prepare.py``: ``np.memmap(..., dtype=np.uint16)``): a headerless little-endian
array of token ids; nothing in the file says its dtype, so the caller does (default uint16; a
uint32 file read as uint16 gives garbage ids, which ``vocab_size`` catches). Document bounds are
not stored: with ``eos_id`` a document is every run of tokens up to and including an EOS, and
tokens after the last EOS form a last document; without it the whole file is one document.

Each import synthesizes a :class:`~streamdata.format.Manifest` (format ``raw-bin``; tokenizer
unknown except ``vocab_size``) whose single shard entry has the sha256 of the ids as the store
returns them (here exactly the file's bytes, so the file is read once); ``source["files"]`` lists
the file with its size and sha256. Byte and word counts per document are unknown:
``doc_bytes``/``doc_words`` are None and ``totals`` has no ``bytes``/``words``.

The rules shared with the other imports (:mod:`.megatron`, :mod:`.datatrove`, :mod:`.litdata`) live
here: :data:`RAW_DTYPES`, :func:`check_import_ids`, :func:`file_entry`, :class:`ImportedStore`, and the
one dtype rule of files whose ids are not our uint16/uint32 (:func:`import_dtype`, :func:`copy_ids`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from ..format import Manifest, ShardInfo, choose_dtype, numpy_dtype
from .base import MappedFile, TokenStore, check_document_index, imported_identity, scan_tokens

__all__ = ["DTYPE_ASSUMED", "RAW_DTYPES", "ImportedStore", "RawBinTokenStore", "check_import_ids", "copy_ids", "file_entry", "import_dtype",
           "open_raw_bin", "same_id_bytes"]

#: dtypes a raw token file may hold (also the choices of ``streamdata convert --dtype``)
RAW_DTYPES = ("uint16", "uint32")
#: ``source["dtype_from"]`` of a raw file opened without a dtype: nothing in the file says it
DTYPE_ASSUMED = "assumed (nanoGPT's uint16: a raw .bin does not record its dtype)"


def _raw_dtype(dtype: str) -> np.dtype:
    if dtype not in RAW_DTYPES:
        raise ConfigError(f"unknown token dtype {dtype!r} for a raw .bin: pass one of {', '.join(RAW_DTYPES)}")
    return numpy_dtype(dtype)


def check_import_ids(eos_id: int | None, vocab_size: int | None, dtype_name: str, what: str) -> None:
    """Refuse a ``vocab_size`` the store dtype cannot hold, and an ``eos_id`` outside the vocabulary."""
    limit = 1 << (8 * numpy_dtype(dtype_name).itemsize)
    if vocab_size is not None and not 0 < int(vocab_size) <= limit:
        raise ConfigError(f"vocab_size {vocab_size} does not fit {what} ids of dtype {dtype_name} (max {limit}): "
                          "pass the dtype the file was written with, or the right vocab_size")
    if eos_id is not None:
        top = int(vocab_size) if vocab_size is not None else limit
        if not 0 <= int(eos_id) < top:
            raise ConfigError(f"eos_id {eos_id} is outside [0, {top}): pass the EOS id of the tokenizer that wrote the file")


def import_dtype(file_dtype: np.dtype, vocab_size: int | None, what: str) -> str:
    """The store dtype of ids held in a file as ``file_dtype``: ``choose_dtype(vocab_size)`` when the
    vocabulary is known, else uint16 for 8/16-bit files and uint32 for 32/64-bit ones. Float files
    are refused (they hold values, not token ids)."""
    if file_dtype.kind not in "iu":
        raise StoreError(f"{what} holds {file_dtype.name} values, not token ids: import a token dataset")
    if vocab_size is not None:
        return choose_dtype(int(vocab_size))
    return "uint16" if file_dtype.itemsize <= 2 else "uint32"


def same_id_bytes(file_dtype: np.dtype, store_dtype: np.dtype) -> bool:
    """True when ids stored as ``file_dtype`` are already the store's bytes (uint16 -> uint16, uint32 or
    int32 -> uint32: a non-negative int32 has the bytes of the same uint32), so reads need no conversion.
    int16 is converted with a check instead: a negative id must not wrap silently."""
    return file_dtype == store_dtype or (file_dtype == np.dtype("<i4") and store_dtype == np.dtype("<u4"))


def copy_ids(src: np.ndarray, out: np.ndarray, store_dtype: np.dtype, same_bytes: bool, what: str) -> None:
    """Copy ids read from a file (``src``, its dtype) into ``out[: len(src)]`` as the store returns them.

    Same bytes: a view, no conversion. Otherwise the range is checked first (one min/max pass), so an id
    that would wrap or be cut by the cast raises StoreError instead of becoming another token."""
    if same_bytes:
        out[: len(src)] = src.view(store_dtype)
        return
    if src.size:
        lo, hi = int(src.min()), int(src.max())
        if lo < 0 or hi > np.iinfo(store_dtype).max:
            bad = lo if lo < 0 else hi
            raise StoreError(f"{what} holds id {bad}, outside {store_dtype.name}: "
                             "pass vocab_size so the store dtype fits, or check the file")
    out[: len(src)] = src  # widening/narrowing cast, range checked above


def file_entry(path: Path, sha: str) -> dict[str, Any]:
    """``source["files"]`` entry of an imported file: absolute path, size in bytes, sha256."""
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha}


class ImportedStore(TokenStore):
    """Shared parts of imports: one mapped data file, no byte/word counts."""

    _file: MappedFile | None = None
    _arr: np.ndarray | None = None  # zero-copy views of _file
    _flat: np.ndarray | None = None

    def close(self) -> None:
        # numpy views of the mapping must go first: an mmap with exported buffers cannot close
        self._arr = self._flat = None
        if self._file is not None:
            self._file.close()
            self._file = None


class RawBinTokenStore(ImportedStore):
    """A headerless little-endian token file (nanoGPT ``train.bin``/``val.bin``). See module docstring."""

    widening_reads = True  # read_into is a numpy slice assignment of the mapped array

    def __init__(self, path: str | os.PathLike, dtype: str = "uint16", eos_id: int | None = None,
                 vocab_size: int | None = None, *, checksum: bool = True, dtype_assumed: bool = False):
        p = Path(path)
        np_dtype = _raw_dtype(dtype)
        check_import_ids(eos_id, vocab_size, dtype, "raw .bin")
        if not p.is_file():
            raise StoreError(f"raw token file {str(p)!r} does not exist: check the path")
        self.path = str(p)
        self._file = MappedFile(p, "raw token file")
        size = self._file.size
        if size % np_dtype.itemsize:
            self.close()
            raise StoreError(
                f"raw token file {str(p)!r} has {size} bytes, not a multiple of {np_dtype.itemsize} ({dtype}): "
                "pass the dtype it was written with, or check the file is not truncated"
            )
        n_tok = size // np_dtype.itemsize
        self._arr = self._file.array(np_dtype, n_tok)
        # provisional manifest: scan_tokens reads through read_into, which checks ranges against it
        self.manifest = Manifest(dtype=dtype, tokenizer={}, special_tokens={}, source={},
                                 shards=[ShardInfo(p.name, n_tok, 1, "")], totals={"tokens": n_tok, "documents": 1},
                                 format="raw-bin")
        found: list[np.ndarray] = []
        sha = ""
        try:
            # checksum=False without eos_id: nothing to compute from the ids, so nothing is read at
            # open, whatever the file's size (a 2 TB file opens at once); a declared vocab_size is
            # then enforced as ids are read (the evaluator's loader checks every span against it).
            if checksum or eos_id is not None:
                each = None if eos_id is None else (lambda block, lo: found.append(np.flatnonzero(block == eos_id) + lo))
                sha, bad = scan_tokens(self, 0, n_tok, vocab_size=vocab_size, each=each)
                if bad is not None:
                    raise StoreError(
                        f"{self.path!r} holds token id {bad[1]} at token {bad[0]}, >= vocab_size {vocab_size}: "
                        "pass the right vocab_size, or the dtype the file was written with"
                    )
                sha = sha if checksum else ""
        except BaseException:
            self.close()
            raise
        if eos_id is None:
            offsets = np.array([0, n_tok] if n_tok else [0], dtype=np.int64)
        else:
            ends = (np.concatenate(found) if found else np.zeros(0, np.int64)).astype(np.int64) + 1
            if not ends.size or ends[-1] != n_tok:
                ends = np.append(ends, n_tok) if n_tok else ends
            offsets = np.concatenate([[0], ends]).astype(np.int64)
        offsets.flags.writeable = False
        self._offsets = offsets
        tokenizer, special = imported_identity(vocab_size, eos_id, "unknown (imported token file)")
        self.manifest = Manifest(
            dtype=dtype, tokenizer=tokenizer, special_tokens=special,
            source={"kind": "raw-bin", "files": [file_entry(p, sha)], "dtype": dtype,
                    "dtype_from": DTYPE_ASSUMED if dtype_assumed else "given by the caller",
                    "documents": "split after each EOS id" if eos_id is not None else "whole file"},
            shards=[ShardInfo(p.name, n_tok, len(offsets) - 1, sha)],
            totals={"tokens": n_tok, "documents": len(offsets) - 1},
            format="raw-bin", created_by={"tool": "streamdata.backends.raw_bin"},
            extra={"read_only_import": True, "doc_counts": "unknown", "checksum": "sha256" if checksum else "skipped"},
        )
        check_document_index(self.path, self.manifest, self._offsets, None, None)

    def view(self, start: int, stop: int) -> np.ndarray:
        start, stop = self._check_range(start, stop)
        return self._arr[start:stop]

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        start, stop = self._check_range(start, stop)
        out[: stop - start] = self._arr[start:stop]

    def release(self, start: int, stop: int) -> None:
        start, stop = self._check_range(start, stop)
        if self._file is not None:
            self._file.drop(start * self._arr.itemsize, stop * self._arr.itemsize)

    def prefetch(self, start: int, stop: int) -> None:
        start, stop = self._check_range(start, stop)
        if self._file is not None:
            self._file.willneed(start * self._arr.itemsize, stop * self._arr.itemsize)


def open_raw_bin(path: str | os.PathLike, dtype: str = "uint16", eos_id: int | None = None,
                 vocab_size: int | None = None, *, checksum: bool = True, dtype_assumed: bool = False) -> RawBinTokenStore:
    """Open a headerless little-endian token file read-only.

    ``dtype``: "uint16" (nanoGPT) or "uint32". ``eos_id``: split documents after each EOS (else one
    document). ``vocab_size``: recorded, and every id is checked against it. ``checksum=False``
    skips hashing the file at open (one full read, ~1-2 GB/s); the manifest then records an empty
    sha256 and ``streamdata verify`` reports it as a mismatch. With ``checksum=False`` and no
    ``eos_id`` nothing is read at open (O(1) for any size): ids are then checked against
    ``vocab_size`` as they are read (``WindowLoader(vocab_size=...)``, which the evaluator passes),
    not up front, and ``streamdata verify`` reads them all. ``dtype_assumed``: the caller did not know
    the dtype (``open_store`` of a ``.bin``): the manifest's ``source["dtype_from"]`` says so, and
    ``streamdata info`` shows it.
    """
    return RawBinTokenStore(path, dtype, eos_id, vocab_size, checksum=checksum, dtype_assumed=dtype_assumed)
