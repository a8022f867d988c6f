"""Merge the parts of a partitioned tokenize into one store: ``streamdata merge PART... --out STORE``.

``streamdata tokenize SOURCE --num-parts K --part I --out PART_I`` writes part I as an ordinary,
complete store whose manifest holds ``extra["part"]`` (K, I, and the slice of the source it covers:
:mod:`streamdata.source`). Parts 0..K-1 in order are the whole source in its order, so the merge
concatenates them: the result's tokens, document offsets, byte/word counts, totals, source,
tokenizer and special tokens, and its checksums, equal those of one ``tokenize`` of the whole source
with the same settings (npy shard checksums need the same ``shard_tokens``: shards close after the
document that reaches it, so equal documents and an equal limit give equal shards).

Why a copy, not a manifest that points at the parts: the merged store is an ordinary npy or zarr
store, so every backend, the loader, ``verify`` and ``convert`` stay as they are and the parts can
be deleted afterwards; reading in place would save one copy of the corpus on disk but would give
every reader a second layout to trust (paths outside the root, parts replaced underneath). The
copy runs at disk speed (no tokenizing), in bounded memory: the tokens are streamed part by part
in blocks of whole documents (``block_tokens`` ids, or one longer document); the document index is
held once, as a ``tokenize`` of the whole source holds it when it seals.

Checks, one line each naming the part and the fix (before anything is written): every part is a
finished store (a folder with an unfinished build, or without ``manifest.json``, is refused) made
by ``tokenize --num-parts``; all parts have the same ``num_parts``, tokenizer (sha256), special
tokens (EOS/BOS policy), dtype, word-count rule and source identity (which includes ``sample_by`` and the text
column); each part number appears once and none is missing; the output is not one of the parts. Every
part's document-index arrays are compared with their manifest checksums before anything is
written (:func:`streamdata.verify.index_mismatches`), and while copying every part shard is hashed
and compared with the part's manifest (:class:`~streamdata.backends.base.ChecksummedReads`), so a
damaged part stops the merge instead of being sealed under a new, valid checksum.

Output: npy or zarr (default: the first part's format and layout), with the folder rules of every
writer (:func:`streamdata.output.prepare_output`: lock, resume, refuse foreign folders, overwrite by
swap). An interrupted merge resumes when rerun: npy keeps its finished shards, zarr its packed zarr
shards; the parts are re-read (and re-verified) from the start, which is cheap next to tokenizing.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .backends import TokenStore, open_store
from .backends.base import ChecksummedReads, DocSources
from .backends.zarr import DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNKS_PER_SHARD, check_compression, is_url
from .errors import ConfigError, StoreError
from .format import BUILD_DIR, DEFAULT_SHARD_TOKENS, MANIFEST_NAME, STORE_FORMATS, Manifest, ShardInfo, word_rule_of
from .output import full_disk_is_one_line, prepare_output
from .verify import index_mismatches

__all__ = ["MergeConfig", "merge_parts"]


@dataclass
class MergeConfig:
    """Settings of one ``streamdata merge`` (validated on construction). ``None``: take the first
    part's value (its format; npy ``shard_tokens`` from its build settings; zarr compression)."""

    parts: Sequence[str]
    out: str
    format: str | None = None  # npy | zarr
    compression: str | None = None  # zarr only: none | zstd | blosc
    shard_tokens: int | None = None  # npy only: tokens per shard file (equal to the parts' for equal checksums)
    overwrite: bool = False
    block_tokens: int = 1 << 24  # ids per copy step (32-64 MiB): bounds the merge's memory

    def __post_init__(self):
        if isinstance(self.parts, (str, os.PathLike)):
            self.parts = (self.parts,)
        self.parts = tuple(os.fspath(p) for p in self.parts)
        if not self.parts:
            raise ConfigError("no parts given: pass every part folder of a 'tokenize --num-parts K' run")
        if not self.out:
            raise ConfigError("no output folder: pass --out DIR")
        if self.format is not None and self.format not in STORE_FORMATS:
            raise ConfigError(f"format {self.format!r} is not supported: use {' or '.join(STORE_FORMATS)}")
        if self.compression is not None:
            check_compression(self.compression)
        for name in ("shard_tokens", "block_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}={v} must be >= 1")


@dataclass
class _Part:
    path: str
    store: TokenStore
    record: dict[str, Any]  # the part's extra["part"]
    tokens_start: int = 0  # global offsets in the merged store
    docs_start: int = 0
    checked: ChecksummedReads | None = None  # the store read through its shard checksums (set by _check_parts)

    @property
    def index(self) -> int:
        return int(self.record["part"])


def _damaged(path: str, file: str) -> str:
    return (f"part {path!r}: {file!r} does not match its checksum (the part is damaged; nothing of it was sealed): "
            "re-tokenize that part with --overwrite, then rerun the merge")


def merge_parts(parts: Sequence[str | os.PathLike] | MergeConfig, out: str | os.PathLike | None = None,
                **kwargs: Any) -> Manifest:
    """Merge the stores ``parts`` (all parts of one ``tokenize --num-parts K``, in any order) into a
    new store at ``out`` and return its manifest (see the module docstring for the rules)."""
    cfg = parts if isinstance(parts, MergeConfig) else MergeConfig(parts, os.fspath(out) if out is not None else "", **kwargs)
    with full_disk_is_one_line(cfg.out):
        return _merge(cfg)


def _merge(cfg: MergeConfig) -> Manifest:
    _check_paths(cfg)
    opened: list[_Part] = []
    try:
        for p in cfg.parts:
            opened.append(_open_part(p))
        ordered = _check_parts(opened)
        first = ordered[0].store
        fmt = cfg.format or first.manifest.format
        if fmt not in STORE_FORMATS:
            fmt = "npy"
        settings = _settings(ordered, fmt, cfg)
        view = _Concatenated(ordered)
        if fmt == "npy":
            return _to_npy(view, cfg, settings)
        return _to_zarr(view, cfg, settings)
    finally:
        for p in opened:
            p.store.close()


# ---- checks -------------------------------------------------------------------------------------
def _local(path: str) -> Path | None:
    return None if is_url(path) else Path(path).resolve()


def _check_paths(cfg: MergeConfig) -> None:
    """Duplicate part paths, and an output that is (or holds, or is inside) a part."""
    seen: dict[Path, str] = {}
    out = _local(cfg.out)
    for p in cfg.parts:
        real = _local(p)
        if real is None:
            continue
        if real in seen:
            raise ConfigError(f"part {p!r} is given twice (also as {seen[real]!r}): pass each part once")
        seen[real] = p
        if out is not None and (out == real or real in out.parents or out in real.parents):
            raise ConfigError(f"out={cfg.out!r} is part {p!r} or overlaps it: write the merged store to another folder")


def _open_part(path: str) -> _Part:
    local = _local(path)
    if local is not None:
        if not local.exists():
            raise ConfigError(f"part {path!r} does not exist: check the path, or tokenize it with --num-parts K --part I")
        if local.is_dir() and not (local / MANIFEST_NAME).is_file():
            if (local / BUILD_DIR).exists():
                raise ConfigError(f"part {path!r} is not finished (a build without {MANIFEST_NAME}: still running or "
                                  "interrupted): let it finish or rerun its tokenize command, then merge")
            raise ConfigError(f"part {path!r} has no {MANIFEST_NAME}, so it is not a store: pass the --out folders "
                              "of 'tokenize --num-parts K --part I'")
    store = open_store(path)
    record = store.manifest.extra.get("part")
    if not _valid_record(record):
        store.close()
        raise ConfigError(f"{path!r} is a store but not a part (its manifest has no part record): tokenize the "
                          "source with --num-parts K --part I, once per part, and merge those")
    return _Part(path, store, record)


def _valid_record(r: Any) -> bool:
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return (isinstance(r, dict) and count(r.get("num_parts")) and count(r.get("part")) and r["part"] < r["num_parts"]
            and isinstance(r.get("unit"), str) and isinstance(r.get("range"), list) and len(r["range"]) == 2
            and all(count(x) for x in r["range"]) and count(r.get("of")))


def _differs(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first key path at which two JSON values differ, with both values (None when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = _differs(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
            if d is not None:
                return d
        return None
    return None if a == b else (path, a, b)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_parts(parts: list[_Part]) -> list[_Part]:
    """Refuse parts that do not make one whole (module docstring); return them in part order."""
    ref = min(parts, key=lambda p: (p.index, p.path))
    k = int(ref.record["num_parts"])
    redo = "re-tokenize it with the same command as the other parts (only --part changes)"
    for p in parts:
        if int(p.record["num_parts"]) != k:
            raise ConfigError(f"part {p.path!r} is part {p.index} of {p.record['num_parts']}, but part {ref.path!r} is "
                              f"part {ref.index} of {k}: merge the parts of one run (same --num-parts)")
    by_index: dict[int, _Part] = {}
    for p in sorted(parts, key=lambda p: (p.index, p.path)):
        if p.index in by_index:
            raise ConfigError(f"parts {by_index[p.index].path!r} and {p.path!r} are both part {p.index} of {k}: "
                              "pass each part once")
        by_index[p.index] = p
    missing = [i for i in range(k) if i not in by_index]
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ConfigError(f"part(s) {shown} of {k} are missing: pass all {k} parts (tokenize a missing one with "
                          f"--num-parts {k} --part {missing[0]})")
    m0 = ref.store.manifest
    for p in parts:
        m = p.store.manifest
        for what, a, b in (("tokenizer", m.tokenizer.get("sha256"), m0.tokenizer.get("sha256")),
                           ("vocabulary size", m.tokenizer.get("vocab_size"), m0.tokenizer.get("vocab_size")),
                           ("token dtype", m.dtype, m0.dtype),
                           ("word-count rule", word_rule_of(m), word_rule_of(m0))):
            if a != b:
                raise ConfigError(f"part {p.path!r} has another {what} ({_short(a)}) than part {ref.path!r} "
                                  f"({_short(b)}): {redo}")
        d = _differs(_policy(m.special_tokens), _policy(m0.special_tokens))
        if d is not None:
            raise ConfigError(f"part {p.path!r} has another EOS/BOS policy ({d[0]} {_short(d[1])}) than part "
                              f"{ref.path!r} ({_short(d[2])}): {redo}")
        d = _differs(m.source, m0.source)
        if d is not None:
            raise ConfigError(f"part {p.path!r} comes from another source or source setting ({d[0]} {_short(d[1])}) "
                              f"than part {ref.path!r} ({_short(d[2])}): {redo}")
        if (p.record["unit"], p.record["of"]) != (ref.record["unit"], ref.record["of"]):
            raise ConfigError(f"part {p.path!r} cuts the source into {p.record['unit']} of {p.record['of']}, part "
                              f"{ref.path!r} into {ref.record['unit']} of {ref.record['of']}: {redo}")
    ordered = [by_index[i] for i in range(k)]
    pos = 0
    for p in ordered:  # the slices must tile the source: same cut, so this only fails on edited manifests
        lo, hi = p.record["range"]
        if lo != pos or hi <= lo:
            raise ConfigError(f"part {p.path!r} covers {p.record['unit']} [{lo}, {hi}) but the parts before it end at "
                              f"{pos}: {redo}")
        pos = hi
    if pos != ref.record["of"]:
        raise ConfigError(f"the parts cover {ref.record['unit']} [0, {pos}) of {ref.record['of']}: {redo}")
    for p in ordered:  # the index now (small); the shards as the copy reads them (ChecksummedReads)
        bad = index_mismatches(p.store)
        if bad:
            raise StoreError(_damaged(p.path, bad[0][0]))
    tok = doc = 0
    for p in ordered:
        p.tokens_start, p.docs_start = tok, doc
        p.checked = ChecksummedReads(p.store, lambda file, path=p.path: _damaged(path, file))
        tok += len(p.store)
        doc += p.store.num_documents
    return ordered


def _policy(special: dict[str, Any]) -> dict[str, Any]:
    """The EOS/BOS fields that decide the ids (the placement note is prose)."""
    return {k: v for k, v in special.items() if k != "placement"}


def _settings(parts: list[_Part], fmt: str, cfg: MergeConfig) -> dict[str, Any]:
    """The merge's identity: each part's content (not its path: moved parts still resume) and the layout."""
    m0 = parts[0].store.manifest
    d: dict[str, Any] = {
        "merge_of": [{"part": p.index, "num_parts": int(p.record["num_parts"]), "tokens": len(p.store),
                      "documents": p.store.num_documents,
                      "shards": [[s.file, s.tokens, s.documents, s.sha256] for s in p.store.manifest.shards]}
                     for p in parts],
        "dtype": m0.dtype, "format": fmt,
    }
    if fmt == "npy":
        d["shard_tokens"] = _layout(cfg.shard_tokens, m0.extra.get("build_settings"), "shard_tokens", DEFAULT_SHARD_TOKENS)
    else:  # the first part's zarr layout when it is zarr, else the defaults (what tokenize --format zarr writes)
        z = m0.extra.get("zarr") if m0.format == "zarr" else None
        d["compression"] = _layout(cfg.compression, z, "compression", "none")
        d["chunk_tokens"] = int(_layout(None, z, "chunk_tokens", DEFAULT_CHUNK_TOKENS))
        d["chunks_per_shard"] = max(1, int(_layout(None, z, "shard_tokens", d["chunk_tokens"] * DEFAULT_CHUNKS_PER_SHARD))
                                    // d["chunk_tokens"])
    return d


def _layout(given: Any, recorded: Any, key: str, default: Any) -> Any:
    if given is not None:
        return given
    if isinstance(recorded, dict) and recorded.get(key) is not None:
        return recorded[key]
    return default


# ---- the parts as one read-only store, verified as it is read ----------------------------------
class _Concatenated(TokenStore):
    """The parts back to back as one TokenStore, read sequentially from token 0.

    Each part is read through its :class:`ChecksummedReads`: every part shard is hashed as its
    tokens pass and compared with the part's manifest when its last token is read. Reads must
    continue where the previous one ended (both copy paths read that way, also when they resume:
    the npy copy re-reads from 0, the zarr pack rehashes from 0), so nothing reaches the output
    sealed without having been checked.
    """

    def __init__(self, parts: list[_Part]):
        self._parts = parts
        m0 = parts[0].store.manifest
        self.path = "+".join(p.path for p in parts)
        tokens = sum(len(p.store) for p in parts)
        docs = sum(p.store.num_documents for p in parts)
        shards = []
        for p in parts:  # the parts' own shards, in order: the pack's record of what it read
            for s in p.store.manifest.shards:
                shards.append(ShardInfo(f"part-{p.index:05d}/{s.file}", s.tokens, s.documents, s.sha256,
                                        p.tokens_start + s.start, p.docs_start + s.doc_start))
        totals = {"tokens": tokens, "documents": docs}
        for k in ("bytes", "words"):
            totals[k] = sum(int(p.store.manifest.totals.get(k, 0)) for p in parts)
        k = len(parts)
        extra = {"merged_from": {"num_parts": k, "unit": parts[0].record["unit"], "of": parts[0].record["of"],
                                 "parts": [{"part": p.index, "path": p.path, "range": p.record["range"],
                                            "tokens": len(p.store), "documents": p.store.num_documents}
                                           for p in parts]}}
        created = {**m0.created_by, "merged_by": {"tool": "streamdata.merge", "python": sys.version.split()[0]}}
        self.manifest = Manifest(dtype=m0.dtype, tokenizer=dict(m0.tokenizer), special_tokens=dict(m0.special_tokens),
                                 source=dict(m0.source), shards=shards, totals=totals, format="parts",
                                 created_by=created, extra=extra, word_rule=word_rule_of(m0))
        self._offsets = _Joined([p.store.doc_offsets for p in parts], [p.tokens_start for p in parts], offsets=True)
        self._bytes = None if any(p.store.doc_bytes is None for p in parts) else _Joined([p.store.doc_bytes for p in parts])
        self._words = None if any(p.store.doc_words is None for p in parts) else _Joined([p.store.doc_words for p in parts])
        # sources: a part's rows count from the whole source's start and its files index the whole
        # source's list (streamdata.source), so they are joined as they are; all parts or none
        srcs = [p.store.doc_sources for p in parts]
        if all(x is not None and x.files == srcs[0].files for x in srcs):
            self._sources = DocSources(list(srcs[0].files), _Joined([x.file for x in srcs]), _Joined([x.row for x in srcs]))

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        for p in self._parts:
            lo, hi = max(start, p.tokens_start), min(stop, p.tokens_start + len(p.store))
            if lo < hi:
                p.checked.read_into(lo - p.tokens_start, hi - p.tokens_start, out[lo - start : hi - start])

    def release(self, start: int, stop: int) -> None:
        for p in self._parts:
            lo, hi = max(start, p.tokens_start), min(stop, p.tokens_start + len(p.store))
            if lo < hi:
                p.store.release(lo - p.tokens_start, hi - p.tokens_start)

    def verified_all(self) -> None:
        for p in self._parts:
            p.checked.verified_all()


class _Joined:
    """Several int64 index arrays read as one (``len`` and slices, which is all the copy uses),
    without concatenating them in memory. ``offsets``: doc_offsets arrays, each shifted by its
    part's first token and all but the first without its leading 0."""

    def __init__(self, arrays: list[np.ndarray], shifts: list[int] | None = None, offsets: bool = False):
        self._parts = []
        start = 0
        for i, a in enumerate(arrays):
            skip = 1 if offsets and i > 0 else 0
            n = len(a) - skip
            self._parts.append((start, n, a, skip, 0 if shifts is None else int(shifts[i])))
            start += n
        self._len = start

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("_Joined supports contiguous slices only")
        lo, hi, _ = key.indices(self._len)
        pieces = []
        for start, n, a, skip, shift in self._parts:
            a_lo, a_hi = max(lo, start), min(hi, start + n)
            if a_lo < a_hi:
                pieces.append(np.asarray(a[a_lo - start + skip : a_hi - start + skip], dtype=np.int64) + shift)
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)


# ---- the two outputs ----------------------------------------------------------------------------
def _to_npy(view: _Concatenated, cfg: MergeConfig, settings: dict[str, Any]) -> Manifest:
    from .writer import StoreWriter, copy_documents

    if is_url(cfg.out):
        raise ConfigError(f"npy output must be a local folder, not {cfg.out!r}: pass --format zarr for a URL")
    m = view.manifest
    w = StoreWriter(cfg.out, dtype=m.dtype, vocab_size=int(m.tokenizer["vocab_size"]),
                    shard_tokens=int(settings["shard_tokens"]), settings=settings, overwrite=cfg.overwrite)
    if w.finished is not None:
        return w.finished
    try:
        done = w.documents_done  # merged documents in finished shards of an interrupted merge
        for p in view._parts:  # each part read whole (verified as read), its documents before `done` skipped
            copy_documents(p.checked, w, cfg.block_tokens, done - p.docs_start)
        view.verified_all()
        return w.commit(tokenizer=dict(m.tokenizer), special_tokens=dict(m.special_tokens), source=dict(m.source),
                        created_by=m.created_by, extra=m.extra, word_rule=m.word_rule,
                        source_files=None if view.doc_sources is None else view.doc_sources.files)
    except BaseException:
        w.abort()
        raise


def _to_zarr(view: _Concatenated, cfg: MergeConfig, settings: dict[str, Any]) -> Manifest:
    from .backends.zarr import pack_into_output

    out = prepare_output(cfg.out, settings, overwrite=cfg.overwrite)
    if out.finished is not None:
        return out.finished
    try:
        # the pack reads every token (from 0, also when it resumes) before it writes the index and
        # seals, so every part shard is verified before the seal
        return pack_into_output(view, out, compression=settings["compression"], chunk_tokens=settings["chunk_tokens"],
                                chunks_per_shard=settings["chunks_per_shard"], extra=view.manifest.extra)
    except BaseException:
        out.abort()
        raise
