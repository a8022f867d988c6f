"""megatron backend: a Megatron-LM indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), read in place.

(``PREFIX.bin`` + ``PREFIX.idx``; layout of
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

The import synthesizes a :class:`~streamdata.format.Manifest` (format ``megatron``; tokenizer
unknown except ``vocab_size``) whose single shard entry has the sha256 of the ids as the store
returns them (little-endian bytes of the store dtype, what ``streamdata verify`` recomputes);
``source["files"]`` lists both files with size and sha256 (for the usual contiguous uint16/int32
.bin the two checksums are the same and the file is read once). Byte and word counts are unknown.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, StoreError
from ..format import Manifest, ShardInfo, numpy_dtype, sha256_file
from .base import (INDEX_IN_RAM, MappedFile, check_document_index, check_index_in_ram, imported_identity, int64_index,
                   scan_tokens)
from .raw_bin import ImportedStore, check_import_ids, copy_ids, file_entry, import_dtype, same_id_bytes

__all__ = ["MEGATRON_DTYPES", "MegatronIndex", "MegatronTokenStore", "open_megatron", "read_megatron_index"]

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
# code -> little-endian numpy dtype (Megatron's DType enum)
MEGATRON_DTYPES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes


@dataclass
class MegatronIndex:
    """The parsed ``.idx`` file (arrays are read-only views of its memory map ``file``)."""

    path: Path
    dtype_code: int
    dtype: np.dtype  # of the ids in .bin
    sequence_lengths: np.ndarray  # int32 [S]
    sequence_pointers: np.ndarray  # int64 [S], byte offsets in .bin
    document_indices: np.ndarray  # int64 [D]
    file: MappedFile | None = None  # the mapping the arrays view (closed with the store)


def read_megatron_index(idx_path: str | os.PathLike) -> MegatronIndex:
    """Parse and validate a Megatron ``.idx`` (layout: module docstring)."""
    p = Path(idx_path)
    # Mapped, not read: an index of 10^9 sequences is 12 GB; the arrays below are views of the map.
    f = MappedFile(p, "Megatron index")
    try:
        return _parse_megatron_index(p, f)
    except BaseException:
        f.close()
        raise


def _parse_megatron_index(p: Path, f: MappedFile) -> MegatronIndex:
    size = f.size
    if size < _HEADER.size:
        raise StoreError(f"Megatron index {str(p)!r} has {size} bytes, fewer than its {_HEADER.size}-byte header: "
                         "the file is truncated or not a Megatron index")
    magic, version, code, S, D = _HEADER.unpack(f.read(0, _HEADER.size))
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
    if size < need:
        raise StoreError(f"Megatron index {str(p)!r} has {size} bytes but its counts (S={S}, D={D}) need {need}: "
                         "the file is truncated")
    o = _HEADER.size
    lengths = f.array("<i4", S, o)
    pointers = f.array("<i8", S, o + 4 * S)
    docs = f.array("<i8", D, o + 12 * S)
    return MegatronIndex(p, int(code), np.dtype(MEGATRON_DTYPES[code]), lengths, pointers, docs, f)


class MegatronTokenStore(ImportedStore):
    """A Megatron-LM ``.bin``/``.idx`` pair. See module docstring."""

    def __init__(self, prefix: str | os.PathLike, *, documents: str = "document", vocab_size: int | None = None,
                 eos_id: int | None = None, checksum: bool = True, index_in_ram: int = INDEX_IN_RAM):
        prefix = os.fspath(prefix)
        in_ram = check_index_in_ram(index_in_ram)
        if documents not in ("document", "sequence"):
            raise ConfigError(f"documents={documents!r}: pass 'document' (Megatron's document index) or 'sequence'")
        idx_path, bin_path = Path(prefix + ".idx"), Path(prefix + ".bin")
        if not idx_path.is_file():
            raise StoreError(f"Megatron index {str(idx_path)!r} does not exist: pass the dataset prefix (PATH without .bin/.idx)")
        if not bin_path.is_file():
            raise StoreError(f"Megatron index {str(idx_path)!r} has no data file {str(bin_path)!r}: copy the .bin beside it")
        ix = read_megatron_index(idx_path)
        self._idx_file: MappedFile | None = ix.file  # the index arrays are views of it
        try:
            fdt = ix.dtype
            dtype = import_dtype(fdt, vocab_size, f"Megatron dataset {prefix!r}")
            check_import_ids(eos_id, vocab_size, dtype, "Megatron")
            self.path = prefix
            self._fdt = fdt
            self._sdt = numpy_dtype(dtype)
            lengths, ptrs, d = ix.sequence_lengths, ix.sequence_pointers, ix.document_indices  # views of the map
            S, D, isz = len(lengths), len(d), fdt.itemsize
            bin_size = bin_path.stat().st_size
            # One pass in blocks (memory O(block) for any number of sequences): sequence offsets (the
            # running sum of lengths), the checks of lengths and pointers, and whether the sequences lie
            # back to back in the .bin (the builder's output: token i is element i of the file).
            state = {"total": 0, "contiguous": True}

            def fill_seq_off(out: np.ndarray, lo: int, hi: int) -> None:
                ex = lengths[lo:hi].astype(np.int64)  # the last block (hi = S + 1) stops at S
                if (ex < 0).any():
                    raise StoreError(f"Megatron index {str(idx_path)!r} has a negative sequence length: the file is damaged")
                pt = ptrs[lo:hi]
                if ex.size and (int(pt.min()) < 0 or int((pt + ex * isz).max()) > bin_size):
                    raise StoreError(f"Megatron index {str(idx_path)!r} points past the end of {str(bin_path)!r} ({bin_size} bytes): "
                                     "the .bin is truncated or belongs to another index")
                run = np.cumsum(ex)
                out[0] = state["total"]
                out[1:] = state["total"] + run[: len(out) - 1]
                if state["contiguous"] and ex.size:
                    state["contiguous"] = bool(np.array_equal(pt, out[: ex.size] * isz))
                state["total"] += int(run[-1]) if ex.size else 0

            seq_off = int64_index(S + 1, fill_seq_off, in_ram)
            if D and (int(d[0]) != 0 or int(d[-1]) > S or any(
                    (np.diff(d[lo : lo + in_ram + 1]) < 0).any() for lo in range(0, D, in_ram))):
                raise StoreError(f"Megatron index {str(idx_path)!r} has a document index that does not start at 0, "
                                 f"decrease, and stay within the {S} sequences: the file is damaged")
            if documents == "sequence":
                offsets = seq_off
            else:
                # document bounds (sequence numbers): d, or [0] without one; S appended when trailing
                # sequences lie outside any document (they make one last document)
                base = D if D else 1
                last = int(d[-1]) if D else 0
                count = base + (last != S)

                def fill_offsets(out: np.ndarray, lo: int, hi: int) -> None:
                    take = np.full(hi - lo, S, np.int64)
                    m = max(0, min(hi, base) - lo)
                    take[:m] = d[lo : lo + m] if D else 0
                    out[:] = seq_off[take]

                offsets = int64_index(count, fill_offsets, in_ram)
            self._offsets = offsets
            self._seq_off, self._ptrs = seq_off, ptrs
            n_tok = int(seq_off[-1])
            self._contiguous = state["contiguous"]
            self._same_bytes = same_id_bytes(fdt, self._sdt)  # read without converting
            self._file = MappedFile(bin_path, "Megatron data file")
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
            tokenizer, special = imported_identity(vocab_size, eos_id, "unknown (imported token file)")
            self.manifest = Manifest(
                dtype=dtype, tokenizer=tokenizer, special_tokens=special,
                source={"kind": "megatron", "prefix": str(Path(prefix).resolve()),
                        "files": [file_entry(bin_path, bin_sha), file_entry(idx_path, idx_sha)],
                        "file_dtype": fdt.name, "dtype_code": ix.dtype_code, "sequences": S,
                        "index_documents": max(0, len(d) - 1), "documents": documents},
                shards=[ShardInfo(bin_path.name, n_tok, len(self._offsets) - 1, tok_sha)],
                totals={"tokens": n_tok, "documents": len(self._offsets) - 1},
                format="megatron", created_by={"tool": "streamdata.backends.megatron"},
                extra={"read_only_import": True, "doc_counts": "unknown", "checksum": "sha256" if checksum else "skipped"},
            )
            check_document_index(self.path, self.manifest, self._offsets, None, None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._seq_off = self._ptrs = None  # views of the index map go before it closes
        super().close()
        if getattr(self, "_idx_file", None) is not None:
            self._idx_file.close()
            self._idx_file = None

    def _token_sha(self, vocab_size: int | None) -> str:
        sha, bad = scan_tokens(self, 0, len(self), vocab_size=vocab_size)
        if bad is not None:
            raise StoreError(f"Megatron dataset {self.path!r} holds token id {bad[1]} at token {bad[0]} "
                             f">= vocab_size {vocab_size}: pass the right vocab_size")
        return sha

    def _copy(self, src: np.ndarray, out: np.ndarray) -> None:
        copy_ids(src, out, self._sdt, self._same_bytes, f"Megatron dataset {self.path!r}")

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
                  eos_id: int | None = None, checksum: bool = True, index_in_ram: int = INDEX_IN_RAM) -> MegatronTokenStore:
    """Open a Megatron-LM indexed dataset read-only: ``prefix`` is the path without ``.bin``/``.idx``
    (a path ending in either is accepted too). ``documents``: "document" (Megatron's document
    index) or "sequence" (each sequence a document). ``vocab_size``/``eos_id`` are recorded (and
    ids checked against ``vocab_size``); ``checksum=False`` skips hashing the files at open.
    ``index_in_ram``: offset arrays up to this many entries are built in RAM, longer ones in a
    temporary memory map, block by block (see :func:`streamdata.backends.base.int64_index`)."""
    text = os.fspath(prefix)
    if text.endswith((".bin", ".idx")):
        text = text[:-4]
    return MegatronTokenStore(text, documents=documents, vocab_size=vocab_size, eos_id=eos_id, checksum=checksum,
                              index_in_ram=index_in_ram)
