"""Convert any TokenStore (npy, zarr, raw .bin, Megatron) into an npy or zarr store.

A source in our formats (npy, zarr) is checked as it is read, like a merge's parts: its index
checksums before anything is written, every shard's sha256 as the copy streams it (a resumed copy
re-reads its finished prefix), so a damaged source is never sealed under fresh checksums.
Tokens and document bounds are copied exactly; the manifest keeps the source's identity
(tokenizer, special tokens, source, created_by, extra) and records where it came from in
``extra["converted_from"]`` (format, path, dtype, totals and shard checksums of the source).
Byte/word counts the source does not know (imports) are written as zeros (totals 0). The output
dtype follows the format's rule (``choose_dtype`` of the vocabulary size): a uint32 import whose
``vocab_size`` fits uint16 is written as uint16 (each id checked as it is narrowed).

- ``format="zarr"``: :func:`streamdata.backends.zarr.write_zarr_store` (bounded memory, resumable,
  local folder or fsspec URL).
- ``format="npy"``: :class:`streamdata.writer.StoreWriter` fed whole documents in blocks of about
  ``block_tokens`` ids (resumable the same way as ``tokenize``). Trap: the writer takes whole
  documents, so peak memory is about twice the larger of ``block_tokens`` and the longest
  document; a raw .bin opened without ``eos_id`` is one document as large as the file (convert it
  to zarr, or open it with ``eos_id``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .backends import TokenStore, open_store
from .backends.base import ChecksummedReads, find_id_over
from .backends.zarr import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNKS_PER_SHARD, check_compression, is_url, write_zarr_store
from .errors import ConfigError, StoreError
from .format import DEFAULT_SHARD_TOKENS, STORE_FORMATS, Manifest, choose_dtype, numpy_dtype, word_rule_of
from .output import full_disk_is_one_line
from .verify import index_mismatches

__all__ = ["FORMATS", "ConvertConfig", "checked_source", "convert_store", "source_summary"]

FORMATS = STORE_FORMATS
# keys of a source's extra that describe how *it* was built; they do not carry over
_BUILD_KEYS = ("build_settings", "zarr_build", "zarr", "converted_from")


@dataclass
class ConvertConfig:
    """Output settings of one conversion, validated on construction (the CLI's defaults come from here)."""

    format: str = "npy"  # one of STORE_FORMATS
    compression: str = "none"  # zarr only: COMPRESSIONS
    shard_tokens: int = DEFAULT_SHARD_TOKENS  # npy output: tokens per shard file
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS  # zarr output: ids per inner chunk
    chunks_per_shard: int = DEFAULT_CHUNKS_PER_SHARD  # zarr output: inner chunks per shard object
    block_tokens: int = 1 << 24  # npy output: ids per StoreWriter.add_documents call (32-64 MiB)

    def __post_init__(self):
        if self.format not in STORE_FORMATS:
            raise ConfigError(f"unknown store format {self.format!r}: pass one of {', '.join(STORE_FORMATS)}")
        check_compression(self.compression)
        if self.format == "npy" and self.compression != "none":
            raise ConfigError(f"npy stores are uncompressed, so compression {self.compression!r} does not apply: "
                              "drop --compression or pass --format zarr")
        for name in ("shard_tokens", "chunk_tokens", "chunks_per_shard", "block_tokens"):
            v = getattr(self, name)
            if v < 1:
                raise ConfigError(f"{name}={v} must be >= 1")


def source_summary(m: Manifest, path: str) -> dict[str, Any]:
    """What a copy records about its source: format, path, dtype, totals, shard checksums (and earlier chains)."""
    d: dict[str, Any] = {
        "format": m.format, "path": path, "dtype": m.dtype, "tokens": m.num_tokens, "documents": m.num_documents,
        "shards": [{"file": s.file, "tokens": s.tokens, "sha256": s.sha256} for s in m.shards],
    }
    if "converted_from" in m.extra:  # keep the chain of earlier conversions
        d["converted_from"] = m.extra["converted_from"]
    return d


def convert_store(
    src: TokenStore | str | os.PathLike,
    dst: str | os.PathLike,
    format: str = ConvertConfig.format,
    compression: str = ConvertConfig.compression,
    overwrite: bool = False,
    *,
    shard_tokens: int = ConvertConfig.shard_tokens,
    chunk_tokens: int = ConvertConfig.chunk_tokens,
    chunks_per_shard: int = ConvertConfig.chunks_per_shard,
    block_tokens: int = ConvertConfig.block_tokens,
    storage_options: dict | None = None,
) -> Manifest:
    """Copy ``src`` (a TokenStore, or anything :func:`streamdata.open_store` opens) into a new store
    at ``dst`` in ``format`` ("npy" or "zarr"; ``compression`` none|zstd|blosc applies to zarr).

    An interrupted conversion resumes when rerun with the same arguments; a finished identical
    one is returned as is; an existing store is replaced only with ``overwrite=True`` (by a swap once
    the new one is sealed; folder rules: :mod:`streamdata.output`).
    ``shard_tokens`` sizes npy shard files; ``chunk_tokens``/``chunks_per_shard`` the zarr layout.
    """
    cfg = ConvertConfig(format, compression, shard_tokens, chunk_tokens, chunks_per_shard, block_tokens)
    if cfg.format == "npy" and is_url(os.fspath(dst)):
        raise ConfigError(f"npy output must be a local folder, not {os.fspath(dst)!r}: pass --format zarr for a URL")
    owned = not isinstance(src, TokenStore)
    store = open_store(src) if owned else src
    try:
        with full_disk_is_one_line(dst):
            if not is_url(store.path) and not is_url(os.fspath(dst)):
                if Path(store.path).resolve() == Path(dst).resolve():
                    raise ConfigError(f"source and destination are the same path {os.fspath(dst)!r}: choose another output")
            m = store.manifest
            extra = {k: v for k, v in m.extra.items() if k not in _BUILD_KEYS}
            extra["converted_from"] = source_summary(m, store.path)  # the source's own dtype
            checked = checked_source(store)
            out_store = _narrowed(checked)
            if cfg.format == "zarr":  # the pack reads every token from 0 (also when it resumes) before it seals
                return write_zarr_store(out_store, dst, compression=cfg.compression, chunk_tokens=cfg.chunk_tokens,
                                        chunks_per_shard=cfg.chunks_per_shard, overwrite=overwrite, extra=extra,
                                        storage_options=storage_options)
            return _to_npy(out_store, checked, Path(dst), extra, cfg.shard_tokens, cfg.block_tokens, overwrite)
    finally:
        if owned:
            store.close()


class _NarrowedStore(TokenStore):
    """A store read with the smallest dtype its vocabulary needs (the format's rule,
    :func:`~streamdata.format.choose_dtype`): a uint32 import whose ``vocab_size`` fits uint16 is
    written as uint16. Every id is checked against the vocabulary as it is narrowed."""

    def __init__(self, inner: TokenStore, dtype: str):
        self._inner = inner
        self.path = inner.path
        self.manifest = dataclasses.replace(inner.manifest, dtype=dtype)
        self._index_of(inner)
        self._buf = np.empty(0, dtype=inner.dtype)

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        n = stop - start
        if self._buf.size < n:
            self._buf = np.empty(n, dtype=self._inner.dtype)
        wide = self._buf[:n]
        self._inner.read_into(start, stop, wide)
        bad = find_id_over(wide, self.vocab_size)
        if bad is not None:
            raise StoreError(f"{self.path!r} holds token id {bad[1]} at token {start + bad[0]}, >= vocab_size "
                             f"{self.vocab_size}: pass the right vocab_size, or the dtype the file was written with")
        out[:n] = wide

    def release(self, start: int, stop: int) -> None:
        self._inner.release(start, stop)


def _damaged(path: str, file: str, command: str) -> str:
    return (f"source {path!r}: {file!r} does not match its checksum (the source is damaged; nothing of it was "
            f"sealed): restore or rebuild the source ('streamdata verify' lists every defect), then rerun the {command}")


def checked_source(store: TokenStore, command: str = "convert") -> TokenStore:
    """``store`` read through its recorded checksums (docs/safety.md: a copy never launders damage);
    ``command`` names what to rerun in the refusal (convert, export).

    Our formats (npy, zarr) record checksums when they are written: the index is checked here
    (small), every token shard as the copy streams it (:class:`ChecksummedReads`). Imports and
    in-memory ids have nothing recorded to check against (their manifest is computed at open)."""
    if store.manifest.format not in STORE_FORMATS:
        return store
    bad = index_mismatches(store)
    if bad:
        raise StoreError(_damaged(store.path, bad[0][0], command))
    return ChecksummedReads(store, lambda file: _damaged(store.path, file, command))


def _narrowed(store: TokenStore) -> TokenStore:
    """``store`` itself, or a :class:`_NarrowedStore` when its vocabulary fits a smaller dtype."""
    vocab = store.vocab_size
    if vocab is None:
        return store
    want = choose_dtype(int(vocab))
    return _NarrowedStore(store, want) if numpy_dtype(want).itemsize < store.dtype.itemsize else store


def _to_npy(store: TokenStore, checked: TokenStore, dst: Path, extra: dict, shard_tokens: int, block_tokens: int,
            overwrite: bool) -> Manifest:
    """``store`` (perhaps narrowed) into an npy store; ``checked``: the reader underneath it, whose
    every shard must have been verified before the seal."""
    from .writer import StoreWriter, copy_documents

    m = store.manifest
    if store.num_documents == 0:
        raise ConfigError(f"source {store.path!r} holds no documents and an npy store needs at least one: "
                          "pass --format zarr, or check the source")
    dtype = store.dtype
    # ids are checked against the vocabulary; unknown (imports): anything the dtype holds
    vocab = store.vocab_size or (1 << (8 * dtype.itemsize))
    settings = {"converted_from": extra["converted_from"], "shard_tokens": shard_tokens, "dtype": m.dtype}
    w = StoreWriter(dst, dtype=m.dtype, vocab_size=vocab, shard_tokens=shard_tokens, settings=settings,
                    overwrite=overwrite)
    if w.finished is not None:
        return w.finished
    try:
        # read from token 0 also when resuming (documents already in finished shards are skipped):
        # a damaged shard copied before a crash is caught again, never skipped unchecked
        copy_documents(store, w, block_tokens, w.documents_done)
        if isinstance(checked, ChecksummedReads):
            checked.verified_all()
        created = {**m.created_by, "converted_by": {"tool": "streamdata.convert", "python": sys.version.split()[0]}}
        return w.commit(tokenizer=dict(m.tokenizer), special_tokens=dict(m.special_tokens), source=dict(m.source),
                        created_by=created, extra=extra, word_rule=word_rule_of(m),
                        source_files=None if store.doc_sources is None else store.doc_sources.files)
    except BaseException:
        w.abort()
        raise
