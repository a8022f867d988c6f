"""Export any TokenStore into the files another trainer reads: Megatron-LM, nanoGPT or LitData.

``export_store(src, out, to=...)`` writes the folder ``out`` (local) through the same output rules as
every writer (:mod:`streamdata.output`: lock, refusal of foreign folders, overwrite by swap, full
disk in one line) and checks what it reads like ``convert`` (:func:`streamdata.convert.checked_source`:
a damaged npy/zarr source is refused, never sealed under fresh checksums). Tokens stream in blocks
(:func:`~streamdata.backends.base.scan_tokens`), so memory stays bounded on any store size.

Layouts (names fixed, so a rerun and ``--overwrite`` recognise the folder; see output.EXPORT_LAYOUTS):

- ``megatron``: ``out/tokens.bin`` + ``out/tokens.idx``, megatron-core's IndexedDataset (byte layout:
  :mod:`streamdata.backends.megatron`); one sequence per document, document index = every sequence
  (``[0, 1, ..., S]``). dtype by megatron-core's ``DType.optimal_dtype(vocab_size)``: uint16 when the
  vocabulary is known and < 65500, else int32 (ids >= 2^31 refused). Megatron's data path is ``out/tokens``.
- ``nanogpt``: ``out/train.bin``, raw uint16 ids (``np.memmap(path, dtype=np.uint16)``), documents
  concatenated in order (the store's EOS ids are in the tokens already; no document index is kept:
  reopen with ``eos_id`` to recover the documents). A vocabulary > 65536 is refused.
- ``litdata``: ``out/index.json`` + ``out/chunk-0-K.bin`` as LitData's ``optimize(...,
  item_loader=TokensLoader())`` writes them (layout: :mod:`streamdata.backends.litdata`): one item per
  document, the store's dtype as a ``no_header_numpy`` array, chunks of whole items of at most
  ``chunk_bytes`` id bytes (LitData's default 64 MiB; a larger document gets a chunk of its own).

Every data file is written as ``NAME.partial`` and renamed when complete, the index last. The export
is sealed by :data:`~streamdata.output.EXPORT_MARKER` (``streamdata-export.json``: our marker, the
target, the files with sizes and sha256, the source it came from, the build settings), which the
target tools ignore; a rerun with the same source and settings finds it and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .backends import TokenStore, open_store
from .backends.base import ChecksummedReads, scan_tokens
from .backends.zarr import is_url
from .convert import checked_source, source_summary
from .errors import ConfigError, StoreError
from .format import create_file, fsync_dir
from .output import EXPORT_LAYOUTS, EXPORT_MARKER, EXPORT_MARKER_ID, full_disk_is_one_line, prepare_output

__all__ = ["EXPORT_FORMATS", "LITDATA_CHUNK_BYTES", "ExportConfig", "ExportRecord", "export_store"]

EXPORT_FORMATS = tuple(EXPORT_LAYOUTS)  # megatron, nanogpt, litdata
LITDATA_CHUNK_BYTES = 1 << 26  # LitData's _DEFAULT_CHUNK_BYTES (64 MiB)
_U32 = (1 << 32) - 1  # LitData chunk offsets are uint32: a chunk file must stay below 4 GiB
MEGATRON_PREFIX = "tokens"
NANOGPT_FILE = "train.bin"
_MEGATRON_CODES = {"uint16": 8, "int32": 4}  # megatron-core DType
_LITDATA_NUMPY_CODES = {"uint16": 5, "uint32": 6}  # LitData _NUMPY_DTYPES_MAPPING
#: LitData's treespec of one leaf (an item that is a single array), as its writer records it
_LITDATA_LEAF_SPEC = '[1, {"type": null, "context": null, "children_spec": []}]'


@dataclass
class ExportConfig:
    """Settings of one export, validated on construction (the CLI's defaults come from here)."""

    to: str  # one of EXPORT_FORMATS
    chunk_bytes: int = LITDATA_CHUNK_BYTES  # litdata: id bytes per chunk file (at most; one item at least)

    def __post_init__(self):
        if self.to not in EXPORT_FORMATS:
            raise ConfigError(f"unknown export format {self.to!r}: pass --to one of {', '.join(EXPORT_FORMATS)}")
        if not 1 <= self.chunk_bytes < _U32:
            raise ConfigError(f"chunk_bytes={self.chunk_bytes} must be in [1, {_U32}) (LitData chunk offsets are uint32)")


@dataclass
class ExportRecord:
    """The seal of an export (``streamdata-export.json``), what :func:`export_store` returns."""

    to: str
    dtype: str  # of the ids written
    tokens: int
    documents: int
    files: list[dict[str, Any]]  # {"file", "bytes", "sha256"} in writing order
    exported_from: dict[str, Any]  # convert.source_summary of the source
    tokenizer: dict[str, Any] = field(default_factory=dict)
    special_tokens: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # build_settings (set by Output.seal)
    folder: str = ""  # where it is (not recorded)

    @property
    def data_path(self) -> str:
        """What the target tool is given: Megatron's data prefix, nanoGPT's file, LitData's folder."""
        name = {"megatron": MEGATRON_PREFIX, "nanogpt": NANOGPT_FILE, "litdata": ""}[self.to]
        return os.path.join(self.folder, name) if name else self.folder

    def to_json(self) -> str:
        d = {k: v for k, v in vars(self).items() if k != "folder"}
        return json.dumps({"marker": EXPORT_MARKER_ID, "format_version": 1, **d}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], folder: str) -> "ExportRecord":
        try:
            return cls(to=d["to"], dtype=d["dtype"], tokens=int(d["tokens"]), documents=int(d["documents"]),
                       files=list(d["files"]), exported_from=dict(d["exported_from"]),
                       tokenizer=dict(d.get("tokenizer") or {}), special_tokens=dict(d.get("special_tokens") or {}),
                       extra=dict(d.get("extra") or {}), folder=folder)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{os.path.join(folder, EXPORT_MARKER)!r} is damaged ({type(e).__name__}: {e}): "
                             "pass --overwrite to export again") from None


def export_store(src: TokenStore | str | os.PathLike, out: str | os.PathLike, to: str, overwrite: bool = False, *,
                 chunk_bytes: int = LITDATA_CHUNK_BYTES) -> ExportRecord:
    """Write ``src`` (a TokenStore, or anything :func:`streamdata.open_store` opens) into the local
    folder ``out`` in the format ``to`` ("megatron", "nanogpt" or "litdata"; layouts: module docstring).

    A finished identical export is returned as is; an existing export of ours is replaced only with
    ``overwrite=True`` (swapped in once complete); any other non-empty folder is refused. An
    interrupted export is started over by a rerun (its files are ours, marked by the build ledger).
    """
    cfg = ExportConfig(to, chunk_bytes)
    if is_url(os.fspath(out)):
        raise ConfigError(f"export writes a local folder, not {os.fspath(out)!r}: pass a local path")
    owned = not isinstance(src, TokenStore)
    store = open_store(src) if owned else src
    try:
        with full_disk_is_one_line(out):
            _refuse_source_inside(store, Path(out))
            dtype = _target_dtype(cfg.to, store)
            m = store.manifest
            settings: dict[str, Any] = {"export": cfg.to, "dtype": dtype, "source": source_summary(m, store.path)}
            if cfg.to == "litdata":
                settings["chunk_bytes"] = cfg.chunk_bytes
            o = prepare_output(out, settings, overwrite=overwrite)
            if o.finished is not None:
                return ExportRecord.from_dict(o.finished, os.path.abspath(out))
            try:
                checked = checked_source(store, "export")
                files = _WRITERS[cfg.to](checked, Path(o.root), np.dtype(dtype).newbyteorder("<"), cfg)
                if isinstance(checked, ChecksummedReads):
                    checked.verified_all()
                rec = ExportRecord(cfg.to, dtype, len(store), store.num_documents, files, settings["source"],
                                   dict(m.tokenizer), dict(m.special_tokens), folder=os.path.abspath(out))
                o.seal(rec, EXPORT_MARKER)
                return rec
            except BaseException:
                o.abort()
                raise
    finally:
        if owned:
            store.close()


def _refuse_source_inside(store: TokenStore, out: Path) -> None:
    """An export never writes over what it reads (an overwrite would swap the source away)."""
    if is_url(store.path) or store.manifest.format == "memory":
        return
    s, o = Path(store.path).resolve(), out.resolve()
    if s == o or o in s.parents:
        raise ConfigError(f"source {store.path!r} lies inside the output {os.fspath(out)!r}: choose another output")


def _target_dtype(to: str, store: TokenStore) -> str:
    vocab = store.vocab_size
    if to == "megatron":  # megatron-core DType.optimal_dtype(cardinality)
        return "uint16" if vocab is not None and vocab < 65500 else "int32"
    if to == "nanogpt":
        if vocab is not None and vocab > 1 << 16:
            raise ConfigError(f"vocabulary of {vocab} ids does not fit nanoGPT's uint16 train.bin (at most 65536 ids): "
                              "export with --to megatron or --to litdata, which keep 32-bit ids")
        return "uint16"
    return store.dtype.name  # litdata: the store's own uint16/uint32


class _Sink:
    """One output file: written as NAME.partial (O_NOFOLLOW), hashed as written, renamed to NAME when complete."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.f = create_file(root / f"{name}.partial")
        self.h = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.f.write(data)
        self.h.update(data)
        self.size += len(data)

    def finish(self) -> dict[str, Any]:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.root / f"{self.name}.partial", self.root / self.name)
        fsync_dir(self.root)
        return {"file": self.name, "bytes": self.size, "sha256": self.h.hexdigest()}

    def close(self) -> None:
        self.f.close()


def _stream(store: TokenStore, root: Path, dtype: np.dtype, plan: Iterator[tuple[str, bytes, int]],
            limit: str) -> list[dict[str, Any]]:
    """Every token of ``store`` in order into the files of ``plan``: (name, header, token stop) each,
    in token order; a file ends when the pass reaches its stop. Ids are converted to ``dtype`` with
    a range check (``limit`` says what to do when one does not fit)."""
    done: list[dict[str, Any]] = []
    sinks: list[_Sink] = []
    top = np.iinfo(dtype).max
    state = {"next": next(plan, None)}

    def advance(pos: int) -> None:  # finish every file whose stop is reached; open the next
        while state["next"] is not None:
            name, header, stop = state["next"]
            if not sinks:
                sinks.append(_Sink(root, name))
                sinks[0].write(header)
            if stop > pos:
                return
            done.append(sinks.pop().finish())
            state["next"] = next(plan, None)

    def each(view: np.ndarray, lo: int) -> None:
        if view.dtype != dtype and view.size and int(view.max()) > top:
            at = int(np.argmax(view > top))
            raise StoreError(f"{store.path!r} holds token id {int(view[at])} at token {lo + at}, which {dtype.name} "
                             f"cannot hold: {limit}")
        pos = lo
        while pos < lo + len(view):
            advance(pos)
            stop = min(lo + len(view), state["next"][2])
            part = view[pos - lo : stop - lo]
            sinks[0].write(memoryview(np.ascontiguousarray(part, dtype=dtype)).cast("B"))
            pos = stop
        advance(pos)

    try:
        advance(0)
        _, bad = scan_tokens(store, 0, len(store), vocab_size=store.vocab_size, each=each, checksum=False)
        if bad is not None:
            raise StoreError(f"{store.path!r} holds token id {bad[1]} at token {bad[0]}, >= vocab_size "
                             f"{store.vocab_size}: the source is damaged ('streamdata verify' lists every defect)")
        advance(len(store))
    finally:
        for s in sinks:
            s.close()
    return done


def _index_blocks(n: int, step: int = 1 << 22) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _to_megatron(store: TokenStore, root: Path, dtype: np.dtype, cfg: ExportConfig) -> list[dict[str, Any]]:
    off = store.doc_offsets
    S = store.num_documents
    files = _stream(store, root, dtype, iter([(f"{MEGATRON_PREFIX}.bin", b"", len(store))]),
                    "export with --vocab-size of the tokenizer, or --to litdata")
    idx = _Sink(root, f"{MEGATRON_PREFIX}.idx")
    try:  # header, then lengths, pointers and document index, each streamed in blocks of the offsets
        idx.write(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, _MEGATRON_CODES[dtype.name], S, S + 1))
        for lo, hi in _index_blocks(S):
            lens = np.diff(np.asarray(off[lo : hi + 1], dtype=np.int64))
            if lens.size and int(lens.max()) > np.iinfo(np.int32).max:
                d = lo + int(np.argmax(lens > np.iinfo(np.int32).max))
                raise StoreError(f"document {d} of {store.path!r} has {int(lens.max())} tokens, more than a Megatron "
                                 "sequence holds (int32 lengths): split it, or export --to litdata")
            idx.write(lens.astype("<i4").tobytes())
        for lo, hi in _index_blocks(S):
            idx.write((np.asarray(off[lo:hi], dtype=np.int64) * dtype.itemsize).astype("<i8").tobytes())
        for lo, hi in _index_blocks(S + 1):
            idx.write(np.arange(lo, hi, dtype="<i8").tobytes())
        return files + [idx.finish()]
    finally:
        idx.close()


def _to_nanogpt(store: TokenStore, root: Path, dtype: np.dtype, cfg: ExportConfig) -> list[dict[str, Any]]:
    return _stream(store, root, dtype, iter([(NANOGPT_FILE, b"", len(store))]),
                   "nanoGPT's train.bin holds uint16 ids only: export with --to megatron or --to litdata")


def _litdata_chunks(store: TokenStore, isz: int, chunk_bytes: int) -> Iterator[tuple[int, int, int]]:
    """(chunk number, first document, end document) of each chunk: whole documents of at most
    ``chunk_bytes`` id bytes, at least one document each."""
    off = store.doc_offsets
    n = store.num_documents
    per = max(1, chunk_bytes // isz)
    i = k = 0
    while i < n:
        j = int(np.searchsorted(off, int(off[i]) + per, side="right")) - 1
        j = min(n, max(j, i + 1))
        yield k, i, j
        i, k = j, k + 1


def _to_litdata(store: TokenStore, root: Path, dtype: np.dtype, cfg: ExportConfig) -> list[dict[str, Any]]:
    off = store.doc_offsets
    isz = dtype.itemsize
    chunks: list[dict[str, Any]] = []

    def plan() -> Iterator[tuple[str, bytes, int]]:
        for k, i, j in _litdata_chunks(store, isz, cfg.chunk_bytes):
            header = 4 * (j - i + 2)
            ends = header + (np.asarray(off[i : j + 1], dtype=np.int64) - int(off[i])) * isz
            if int(ends[-1]) > _U32:
                raise StoreError(f"documents {i}..{j - 1} of {store.path!r} take {int(ends[-1])} bytes, more than a "
                                 "LitData chunk holds (uint32 offsets, 4 GiB): export --to megatron")
            name = f"chunk-0-{k}.bin"
            chunks.append({"chunk_bytes": int(ends[-1]), "chunk_size": j - i, "dim": int(off[j]) - int(off[i]),
                           "filename": name})
            yield name, np.uint32(j - i).tobytes() + ends.astype("<u4").tobytes(), int(off[j])

    files = _stream(store, root, dtype, plan(), "pass the right vocab_size")
    config = {"chunk_bytes": cfg.chunk_bytes, "chunk_size": None, "compression": None,
              "data_format": [f"no_header_numpy:{_LITDATA_NUMPY_CODES[dtype.name]}"], "data_spec": _LITDATA_LEAF_SPEC,
              "encryption": None, "item_loader": "TokensLoader"}
    index = _Sink(root, "index.json")  # last: LitData reads nothing before it exists
    try:
        index.write(json.dumps({"chunks": chunks, "config": config, "updated_at": str(time.time())},
                               sort_keys=True).encode())
        return files + [index.finish()]
    finally:
        index.close()


_WRITERS = {"megatron": _to_megatron, "nanogpt": _to_nanogpt, "litdata": _to_litdata}
