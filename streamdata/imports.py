"""Read-only TokenStores over token files other tools wrote, read in place (no re-tokenizing).

Two layouts, both memory-mapped like the npy backend (:mod:`streamdata.backends.npy`):

**nanoGPT-style raw ``.bin``** (nanoGPT's ``prepare.py``: ``np.memmap(..., dtype=np.uint16)``): a
headerless little-endian array of token ids; nothing in the file says its dtype, so the caller
does (default uint16; a uint32 file read as uint16 gives garbage ids, which ``vocab_size`` catches).
Document bounds are not stored: with ``eos_id`` a document is every run of tokens up to and
including an EOS, and tokens after the last EOS form a last document; without it the whole file is
one document.

**Megatron-LM indexed dataset** (``PREFIX.bin`` + ``PREFIX.idx``; layout of
megatron/core/datasets/indexed_dataset.py ``_IndexWriter``), all little-endian::

    offset  size      field
    0       9         magic b"MMIDIDX\\x00\\x00"
    9       8         uint64 version == 1
    17      1         uint8 dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                      7 float32, 8 uint16 (dtype of the ids in .bin)
    18      8         uint64 S: sequence count
    26      8         uint64 D: document-index entries (= documents + 1)
    34      4*S       int32 sequence lengths (ids per sequence)
    ..      8*S       int64 sequence pointers (byte offset of each sequence in .bin)
    ..      8*D       int64 document index: sequence index where each document starts, then S
    ..      S         int8 sequence modes (multimodal datasets only; ignored here)

A Megatron *document* is sequences ``[doc_index[i], doc_index[i+1])``; ``documents="sequence"``
makes every sequence a document instead. Sequences not covered by the document index (index
ending before S) form one last document, so the document bounds always cover every token.

Token address space: sequences in index order, so token ``i`` of the store is found through the
cumulative sequence lengths. When the pointers are contiguous (what Megatron's builder writes,
also after ``add_index`` merges) reads are slices of the mapping; otherwise they gather per sequence.

Store dtype: ``choose_dtype(vocab_size)`` when ``vocab_size`` is given, else uint16 for 8/16-bit
files and uint32 for int32/int64 files. int32 ids are read as uint32 without a copy; other widths
are converted on read with a range check (a negative or too-large id raises StoreError).
Float datasets are refused.

Each import synthesizes a :class:`~streamdata.format.Manifest` (format ``raw-bin`` or
``megatron``; tokenizer unknown except ``vocab_size``) whose single shard entry has the sha256 of
the ids as the store returns them (little-endian bytes of the store dtype, what ``streamdata
verify`` recomputes); ``source["files"]`` lists each file with its size and sha256. For a raw .bin,
and for the usual contiguous uint16/int32 Megatron .bin, the two checksums are the same and the file
is read once. Byte and word counts per document are unknown: ``doc_bytes``/``doc_words`` are None
and ``totals`` has no ``bytes``/``words``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, StoreError
from .format import Manifest, ShardInfo, choose_dtype, numpy_dtype, sha256_file
from .store import TokenStore

__all__ = [
    "MEGATRON_DTYPES",
    "MegatronIndex",
    "MegatronTokenStore",
    "RAW_DTYPES",
    "RawBinTokenStore",
    "open_megatron",
    "open_raw_bin",
    "open_token_files",
    "read_megatron_index",
]

RAW_DTYPES = ("uint16", "uint32")
MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
# code -> little-endian numpy dtype (Megatron's DType enum)
MEGATRON_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
_SCAN_BLOCK = 1 << 24  # ids per pass step: 32-64 MiB, full disk bandwidth, bounded memory
_PAGE = mmap.PAGESIZE


class _MappedFile:
    """A whole file mapped read-only, with the page hints the npy backend uses."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise StoreError(f"cannot open {str(path)!r} ({e.strerror}): check the path and permissions") from None
        self.size = os.fstat(self.fd).st_size
        # mmap cannot map an empty file
        self.mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ) if self.size else None

    def array(self, dtype: np.dtype, count: int, offset: int = 0) -> np.ndarray:
        if self.mm is None or count == 0:
            return np.empty(0, dtype=dtype)
        return np.frombuffer(self.mm, dtype=dtype, count=count, offset=offset)

    def drop(self, b0: int, b1: int) -> None:
        """Drop resident pages wholly inside bytes [b0, b1) (see backends/npy.py for why both calls)."""
        if self.mm is None:
            return
        b0 = -(-b0 // _PAGE) * _PAGE
        b1 = min(b1, self.size) // _PAGE * _PAGE
        if b1 > b0:
            self.mm.madvise(mmap.MADV_DONTNEED, b0, b1 - b0)
            os.posix_fadvise(self.fd, b0, b1 - b0, os.POSIX_FADV_DONTNEED)

    def willneed(self, b0: int, b1: int) -> None:
        if self.mm is None or b1 <= b0:
            return
        b0 = b0 // _PAGE * _PAGE
        self.mm.madvise(mmap.MADV_WILLNEED, b0, min(b1, self.size) - b0)

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


def _raw_dtype(dtype: str) -> np.dtype:
    if dtype not in RAW_DTYPES:
        raise ConfigError(f"unknown token dtype {dtype!r} for a raw .bin: pass one of {', '.join(RAW_DTYPES)}")
    return numpy_dtype(dtype)


def _check_ids(eos_id: int | None, vocab_size: int | None, dtype_name: str, what: str) -> None:
    limit = 1 << (8 * numpy_dtype(dtype_name).itemsize)
    if vocab_size is not None and not 0 < int(vocab_size) <= limit:
        raise ConfigError(f"vocab_size {vocab_size} does not fit {what} ids of dtype {dtype_name} (max {limit}): "
                          "pass the dtype the file was written with, or the right vocab_size")
    if eos_id is not None:
        top = int(vocab_size) if vocab_size is not None else limit
        if not 0 <= int(eos_id) < top:
            raise ConfigError(f"eos_id {eos_id} is outside [0, {top}): pass the EOS id of the tokenizer that wrote the file")


def _file_entry(path: Path, sha: str) -> dict[str, Any]:
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": sha}


def _identity(vocab_size: int | None, eos_id: int | None) -> tuple[dict, dict]:
    tokenizer = {"name": None, "sha256": None, "vocab_size": None if vocab_size is None else int(vocab_size),
                 "special_ids": {}}
    special = {"eos": None if eos_id is None else int(eos_id), "eos_token": None, "bos": None, "bos_token": None,
               "placement": "unknown (imported token file)"}
    return tokenizer, special


class _ImportedStore(TokenStore):
    """Shared parts: no byte/word counts, a mapped data file, page hints."""

    _file: _MappedFile | None = None
    _arr: np.ndarray | None = None  # zero-copy views of _file
    _flat: np.ndarray | None = None

    def close(self) -> None:
        # numpy views of the mapping must go first: an mmap with exported buffers cannot close
        self._arr = self._flat = None
        if self._file is not None:
            self._file.close()
            self._file = None


# ---- raw .bin ---------------------------------------------------------------------------------
class RawBinTokenStore(_ImportedStore):
    """A headerless little-endian token file (nanoGPT ``train.bin``/``val.bin``). See module docstring."""

    def __init__(self, path: str | os.PathLike, dtype: str = "uint16", eos_id: int | None = None,
                 vocab_size: int | None = None, *, checksum: bool = True):
        p = Path(path)
        np_dtype = _raw_dtype(dtype)
        _check_ids(eos_id, vocab_size, dtype, "raw .bin")
        if not p.is_file():
            raise StoreError(f"raw token file {str(p)!r} does not exist: check the path")
        size = p.stat().st_size
        if size % np_dtype.itemsize:
            raise StoreError(
                f"raw token file {str(p)!r} has {size} bytes, not a multiple of {np_dtype.itemsize} ({dtype}): "
                "pass the dtype it was written with, or check the file is not truncated"
            )
        self.path = str(p)
        self._file = _MappedFile(p)
        try:
            self._arr = self._file.array(np_dtype, size // np_dtype.itemsize)
            sha, eos_pos = self._scan(eos_id, vocab_size, checksum)
        except BaseException:
            self.close()
            raise
        n_tok = len(self._arr)
        if eos_id is None:
            offsets = np.array([0, n_tok] if n_tok else [0], dtype=np.int64)
        else:
            ends = eos_pos + 1
            if not ends.size or ends[-1] != n_tok:
                ends = np.append(ends, n_tok) if n_tok else ends
            offsets = np.concatenate([[0], ends]).astype(np.int64)
        offsets.flags.writeable = False
        self._offsets = offsets
        tokenizer, special = _identity(vocab_size, eos_id)
        self.manifest = Manifest(
            dtype=dtype, tokenizer=tokenizer, special_tokens=special,
            source={"kind": "raw-bin", "files": [_file_entry(p, sha)], "dtype": dtype,
                    "documents": "split after each EOS id" if eos_id is not None else "whole file"},
            shards=[ShardInfo(p.name, n_tok, len(offsets) - 1, sha)],
            totals={"tokens": n_tok, "documents": len(offsets) - 1},
            format="raw-bin", created_by={"tool": "streamdata.imports"},
            extra={"read_only_import": True, "doc_counts": "unknown", "checksum": "sha256" if checksum else "skipped"},
        )

    def _scan(self, eos_id: int | None, vocab_size: int | None, checksum: bool) -> tuple[str, np.ndarray]:
        """One sequential pass: sha256 of the file, EOS positions, the vocabulary check (what is asked)."""
        if not (checksum or eos_id is not None or vocab_size is not None):
            return "", np.zeros(0, np.int64)
        h = hashlib.sha256()
        found: list[np.ndarray] = []
        arr, isz = self._arr, self._arr.itemsize
        for lo in range(0, len(arr), _SCAN_BLOCK):
            block = arr[lo : lo + _SCAN_BLOCK]
            if checksum:
                h.update(block)  # the file's bytes: headerless, so these are the token bytes
            if eos_id is not None:
                found.append(np.flatnonzero(block == eos_id) + lo)
            if vocab_size is not None and block.size and int(block.max()) >= vocab_size:
                bad = lo + int(np.argmax(block >= vocab_size))
                raise StoreError(
                    f"{self.path!r} holds token id {int(arr[bad])} at token {bad}, >= vocab_size {vocab_size}: "
                    "pass the right vocab_size, or the dtype the file was written with"
                )
            self._file.drop(lo * isz, (lo + len(block)) * isz)  # bounded resident set on huge files
        pos = np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)
        return (h.hexdigest() if checksum else ""), pos

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
                 vocab_size: int | None = None, *, checksum: bool = True) -> RawBinTokenStore:
    """Open a headerless little-endian token file read-only.

    ``dtype``: "uint16" (nanoGPT) or "uint32". ``eos_id``: split documents after each EOS (else one
    document). ``vocab_size``: recorded, and every id is checked against it. ``checksum=False``
    skips hashing the file at open (one full read, ~1-2 GB/s); the manifest then records an empty
    sha256 and ``streamdata verify`` reports it as a mismatch.
    """
    return RawBinTokenStore(path, dtype, eos_id, vocab_size, checksum=checksum)


# ---- Megatron indexed dataset -----------------------------------------------------------------
@dataclass
class MegatronIndex:
    """The parsed ``.idx`` file (arrays are read-only views of a copy of the file)."""

    path: Path
    dtype_code: int
    dtype: np.dtype  # of the ids in .bin
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S], byte offsets in .bin
    document_indices: np.ndarray  # int64 [D]


def read_megatron_index(idx_path: str | os.PathLike) -> MegatronIndex:
    """Parse and validate a Megatron ``.idx`` (layout: module docstring)."""
    p = Path(idx_path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise StoreError(f"cannot read Megatron index {str(p)!r} ({e.strerror}): check the path") from None
    if len(raw) < _HEADER.size:
        raise StoreError(f"Megatron index {str(p)!r} has {len(raw)} bytes, fewer than its {_HEADER.size}-byte header: "
                         "the file is truncated or not a Megatron index")
    magic, version, code, S, D = _HEADER.unpack_from(raw, 0)
    if magic != MEGATRON_MAGIC:
        raise StoreError(f"{str(p)!r} does not start with the Megatron magic {MEGATRON_MAGIC!r} (found {magic!r}): "
                         "it is not a Megatron MMIDIDX index (older 'cached'/'lazy' indexes are not supported)")
    if version != MEGATRON_VERSION:
        raise StoreError(f"Megatron index {str(p)!r} has version {version}; only version {MEGATRON_VERSION} is known: "
                         "re-export it with a current Megatron-LM")
    if code not in MEGATRON_DTYPES:
        raise StoreError(f"Megatron index {str(p)!r} has unknown dtype code {code} (known: {sorted(MEGATRON_DTYPES)}): "
                         "the file is damaged or from an unsupported Megatron version")
    need = _HEADER.size + 12 * S + 8 * D
    if len(raw) < need:
        raise StoreError(f"Megatron index {str(p)!r} has {len(raw)} bytes but its counts (S={S}, D={D}) need {need}: "
                         "the file is truncated")
    o = _HEADER.size
    lengths = np.frombuffer(raw, "<i4", S, o)
    pointers = np.frombuffer(raw, "<i8", S, o + 4 * S)
    docs = np.frombuffer(raw, "<i8", D, o + 12 * S)
    return MegatronIndex(p, int(code), np.dtype(MEGATRON_DTYPES[code]), lengths, pointers, docs)


class MegatronTokenStore(_ImportedStore):
    """A Megatron-LM ``.bin``/``.idx`` pair. See module docstring."""

    def __init__(self, prefix: str | os.PathLike, *, documents: str = "document", vocab_size: int | None = None,
                 eos_id: int | None = None, checksum: bool = True):
        prefix = os.fspath(prefix)
        if documents not in ("document", "sequence"):
            raise ConfigError(f"documents={documents!r}: pass 'document' (Megatron's document index) or 'sequence'")
        idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
        if not idx_path.is_file():
            raise StoreError(f"Megatron index {str(idx_path)!r} does not exist: pass the dataset prefix (PATH without .bin/.idx)")
        if not bin_path.is_file():
            raise StoreError(f"Megatron index {str(idx_path)!r} has no data file {str(bin_path)!r}: copy the .bin beside it")
        ix = read_megatron_index(idx_path)
        fdt = ix.dtype
        if fdt.kind == "f":
            raise StoreError(f"Megatron dataset {prefix!r} holds {fdt.name} values, not token ids: import a token dataset")
        if vocab_size is not None:
            dtype = choose_dtype(int(vocab_size))
        else:
            dtype = "uint16" if fdt.itemsize <= 2 else "uint32"
        _check_ids(eos_id, vocab_size, dtype, "Megatron")
        self.path = prefix
        self._fdt = fdt
        self._sdt = numpy_dtype(dtype)
        lengths = ix.sequence_lengths.astype(np.int64)
        ptrs = ix.sequence_pointers
        S = len(lengths)
        if (lengths < 0).any():
            raise StoreError(f"Megatron index {str(idx_path)!r} has a negative sequence length: the file is damaged")
        seq_off = np.zeros(S + 1, dtype=np.int64)
        np.cumsum(lengths, out=seq_off[1:])
        bin_size = bin_path.stat().st_size
        if S and ((ptrs < 0).any() or int((ptrs + lengths * fdt.itemsize).max()) > bin_size):
            raise StoreError(f"Megatron index {str(idx_path)!r} points past the end of {str(bin_path)!r} ({bin_size} bytes): "
                             "the .bin is truncated or belongs to another index")
        d = ix.document_indices
        if d.size and (d[0] != 0 or (np.diff(d) < 0).any() or d[-1] > S):
            raise StoreError(f"Megatron index {str(idx_path)!r} has a document index that does not start at 0, "
                             f"decrease, and stay within the {S} sequences: the file is damaged")
        if documents == "sequence":
            offsets = seq_off
        else:
            bounds = d if d.size else np.zeros(1, np.int64)
            if bounds[-1] != S:  # trailing sequences outside any document: one last document
                bounds = np.append(bounds, S)
            offsets = seq_off[bounds]
        self._offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self._offsets.flags.writeable = False
        self._seq_off, self._ptrs = seq_off, ptrs
        n_tok = int(seq_off[-1])
        # Contiguous sequences (the builder's output): token i is element i of the file.
        self._contiguous = bool(S == 0 or np.array_equal(ptrs, seq_off[:-1] * fdt.itemsize))
        # Same bytes as the store dtype (uint16 -> uint16, int32 -> uint32): read without converting.
        # (int16 is converted with a check instead: a negative id must not wrap silently.)
        self._same_bytes = fdt == self._sdt or (fdt == np.dtype("<i4") and self._sdt == np.dtype("<u4"))
        self._file = _MappedFile(bin_path)
        self._flat = self._file.array(fdt, n_tok) if self._contiguous else None
        self.manifest = Manifest(  # provisional (checksums below read through read_into)
            dtype=dtype, tokenizer={}, special_tokens={}, source={}, shards=[ShardInfo(bin_path.name, n_tok, len(self._offsets) - 1, "")],
            totals={"tokens": n_tok, "documents": len(self._offsets) - 1}, format="megatron",
        )
        try:
            tok_sha = self._token_sha(vocab_size) if checksum or vocab_size is not None else ""
            if not checksum:
                tok_sha = bin_sha = idx_sha = ""
            else:
                same_file = self._contiguous and self._same_bytes and bin_size == n_tok * fdt.itemsize
                bin_sha = tok_sha if same_file else sha256_file(bin_path)
                idx_sha = sha256_file(idx_path)
        except BaseException:
            self.close()
            raise
        tokenizer, special = _identity(vocab_size, eos_id)
        self.manifest = Manifest(
            dtype=dtype, tokenizer=tokenizer, special_tokens=special,
            source={"kind": "megatron", "prefix": str(Path(prefix).resolve()),
                    "files": [_file_entry(bin_path, bin_sha), _file_entry(idx_path, idx_sha)],
                    "file_dtype": fdt.name, "dtype_code": ix.dtype_code, "sequences": S,
                    "index_documents": max(0, len(d) - 1), "documents": documents},
            shards=[ShardInfo(bin_path.name, n_tok, len(self._offsets) - 1, tok_sha)],
            totals={"tokens": n_tok, "documents": len(self._offsets) - 1},
            format="megatron", created_by={"tool": "streamdata.imports"},
            extra={"read_only_import": True, "doc_counts": "unknown", "checksum": "sha256" if checksum else "skipped"},
        )

    def _token_sha(self, vocab_size: int | None) -> str:
        h = hashlib.sha256()
        n = len(self)
        buf = np.empty(min(_SCAN_BLOCK, max(1, n)), dtype=self._sdt)
        for lo in range(0, n, len(buf)):
            hi = min(n, lo + len(buf))
            view = buf[: hi - lo]
            self.read_into(lo, hi, view)
            h.update(view)
            if vocab_size is not None and view.size and int(view.max()) >= vocab_size:
                bad = lo + int(np.argmax(view >= vocab_size))
                raise StoreError(f"Megatron dataset {self.path!r} holds token id {int(view.max())} (first bad at token {bad}) "
                                 f">= vocab_size {vocab_size}: pass the right vocab_size")
            self.release(lo, hi)
        return h.hexdigest()

    def _copy(self, src: np.ndarray, out: np.ndarray) -> None:
        if self._same_bytes:
            out[: len(src)] = src.view(self._sdt)
            return
        if src.size:
            lo, hi = int(src.min()), int(src.max())
            top = np.iinfo(self._sdt).max
            if lo < 0 or hi > top:
                bad = lo if lo < 0 else hi
                raise StoreError(f"Megatron dataset {self.path!r} holds id {bad}, outside {self._sdt.name}: "
                                 "pass vocab_size so the store dtype fits, or check the file")
        out[: len(src)] = src  # widening/narrowing cast, range checked above

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        start, stop = self._check_range(start, stop)
        if self._contiguous:
            self._copy(self._flat[start:stop], out)
            return
        # Gather per sequence (pointers not contiguous: rare, e.g. hand-edited indexes).
        k = int(np.searchsorted(self._seq_off, start, side="right")) - 1
        pos = start
        isz = self._fdt.itemsize
        while pos < stop:
            s0, s1 = int(self._seq_off[k]), int(self._seq_off[k + 1])
            hi = min(stop, s1)
            if hi > pos:
                piece = self._file.array(self._fdt, hi - pos, int(self._ptrs[k]) + (pos - s0) * isz)
                self._copy(piece, out[pos - start : hi - start])
            pos = max(pos, hi)
            k += 1

    def _byte_range(self, start: int, stop: int) -> tuple[int, int] | None:
        if not self._contiguous or start >= stop:
            return None
        return start * self._fdt.itemsize, stop * self._fdt.itemsize

    def release(self, start: int, stop: int) -> None:
        start, stop = self._check_range(start, stop)
        r = self._byte_range(start, stop)
        if r and self._file is not None:
            self._file.drop(*r)

    def prefetch(self, start: int, stop: int) -> None:
        start, stop = self._check_range(start, stop)
        r = self._byte_range(start, stop)
        if r and self._file is not None:
            self._file.willneed(*r)


def open_megatron(prefix: str | os.PathLike, *, documents: str = "document", vocab_size: int | None = None,
                  eos_id: int | None = None, checksum: bool = True) -> MegatronTokenStore:
    """Open a Megatron-LM indexed dataset read-only: ``prefix`` is the path without ``.bin``/``.idx``
    (a path ending in either is accepted too). ``documents``: "document" (Megatron's document
    index) or "sequence" (each sequence a document). ``vocab_size``/``eos_id`` are recorded (and
    ids checked against ``vocab_size``); ``checksum=False`` skips hashing the files at open."""
    text = os.fspath(prefix)
    if text.endswith((".bin", ".idx")):
        text = text[:-4]
    return MegatronTokenStore(text, documents=documents, vocab_size=vocab_size, eos_id=eos_id, checksum=checksum)


def open_token_files(path: str | os.PathLike, *, dtype: str | None = None, eos_id: int | None = None,
                     vocab_size: int | None = None, documents: str = "document", checksum: bool = True) -> TokenStore:
    """Open existing token files by path (what :func:`streamdata.open_store` does with a path that is
    not a store folder; CLIs pass the options through): a Megatron ``.idx``, a ``.bin`` with an
    ``.idx`` beside it, or a prefix with both opens as Megatron (``documents``); another ``.bin``, or
    a prefix with only a ``.bin``, as a raw file of ``dtype`` (default uint16). ``eos_id`` and
    ``vocab_size`` apply to both."""
    text = os.fspath(path)
    p = Path(text)
    prefix = None
    if p.suffix == ".idx":
        prefix = text[:-4]
    elif p.suffix == ".bin" and Path(text[:-4] + ".idx").is_file():
        prefix = text[:-4]
    elif not p.exists() and Path(text + ".idx").is_file():
        prefix = text
    if prefix is not None:
        if dtype is not None:
            raise ConfigError(f"{text!r} is a Megatron dataset, whose .idx records its dtype: drop the dtype option")
        return open_megatron(prefix, documents=documents, vocab_size=vocab_size, eos_id=eos_id, checksum=checksum)
    raw = p if p.suffix == ".bin" and p.is_file() else (Path(text + ".bin") if not p.exists() else None)
    if raw is not None and raw.is_file():
        return open_raw_bin(raw, dtype or "uint16", eos_id, vocab_size, checksum=checksum)
    raise StoreError(
        f"{text!r} is neither a store folder, a raw token .bin, nor a Megatron .idx/.bin pair: pass one of those "
        "(for other raw id files use streamdata.imports.open_raw_bin(path, dtype=...))"
    )
