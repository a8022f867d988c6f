"""Shard writer: documents of token ids in, a sealed store out (layout: :mod:`streamdata.format`).

Guarantees:
- **Atomic commit.** The manifest is written last; until then the folder is an unfinished build that
  :func:`streamdata.open_store` refuses.
- **Resumable.** Shard boundaries depend only on the document sequence and ``shard_tokens`` (a shard
  is closed after the document that brings it to ``shard_tokens`` or more; documents never span
  shards). A finished shard is recorded in ``_build/shard-NNNNN.json`` after its data and index are
  fsynced, so a rerun after a crash skips exactly the documents of recorded shards and rewrites the
  rest: the same tokens in the same order as an uninterrupted run.
- **Never clobbers.** An existing store is replaced only with ``overwrite=True``; a folder that is
  neither a store nor a build of ours is never deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ConfigError, SourceError, StoreError
from .format import (
    BUILD_DIR,
    INDEX_DIR,
    MANIFEST_NAME,
    SHARD_DIR,
    SHARD_PATTERN,
    IndexInfo,
    Manifest,
    ShardInfo,
    atomic_write_bytes,
    index_sha256,
    fsync_dir,
    numpy_dtype,
    read_manifest,
    write_manifest,
)

__all__ = ["StoreWriter", "ResumeState"]

_SETTINGS = "settings.json"


@dataclass
class ResumeState:
    """What earlier runs finished: skip ``documents`` source documents and continue at ``next_shard``."""

    shards: list[ShardInfo]
    documents: int
    tokens: int

    @property
    def next_shard(self) -> int:
        return len(self.shards)


def _is_ours(root: Path) -> bool:
    return (root / MANIFEST_NAME).is_file() or (root / BUILD_DIR).is_dir()


def _remove_store(root: Path) -> None:
    """Delete a store or build folder of ours: the manifest first, so a half-deleted store never looks whole."""
    m = root / MANIFEST_NAME
    if m.exists():
        m.unlink()
        fsync_dir(root)
    shutil.rmtree(root)


class StoreWriter:
    """Writes documents (token id arrays + byte/word counts) into shards, resumably.

    ``settings`` is the identity of everything that determines the output (source, tokenizer,
    policy, limits, shard size); a rerun resumes only when it is identical.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        dtype: str,
        vocab_size: int,
        shard_tokens: int,
        settings: dict[str, Any],
        overwrite: bool = False,
    ):
        if shard_tokens < 1:
            raise ConfigError(f"shard_tokens={shard_tokens} must be >= 1: pass e.g. --shard-tokens 67108864")
        self.root = Path(root)
        self.dtype = numpy_dtype(dtype)
        self.dtype_name = dtype
        self.vocab_size = int(vocab_size)
        self.shard_tokens = int(shard_tokens)
        self.settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
        #: set when the folder already holds a finished store built with these exact settings
        #: (a rerun after a crash between the manifest and the ledger clean-up): nothing to do.
        self.finished: Manifest | None = None
        self._prepare_folder(overwrite)
        if self.finished is not None:
            return
        self.state = self._load_state()
        self._docs_seen = self.state.documents
        self._tokens_total = self.state.tokens
        self._open_shard()

    # ---- folder lifecycle -------------------------------------------------------------------
    def _prepare_folder(self, overwrite: bool) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise ConfigError(f"output {str(root)!r} exists and is not a folder: choose another --out")
        if (root / MANIFEST_NAME).is_file():
            if not overwrite:
                try:
                    m = read_manifest(root)
                except StoreError:
                    m = None
                if m is not None and m.extra.get("build_settings") == self.settings:
                    self.finished = m
                    shutil.rmtree(root / BUILD_DIR, ignore_errors=True)
                    return
                raise ConfigError(f"output {str(root)!r} already holds a finished store: pass --overwrite to replace it, or choose another --out")
            _remove_store(root)
        elif root.is_dir() and any(root.iterdir()) and not (root / BUILD_DIR).is_dir():
            raise ConfigError(
                f"output {str(root)!r} exists, is not empty and is not a store: choose another --out (it is never deleted)"
            )
        elif (root / BUILD_DIR).is_dir() and overwrite:
            _remove_store(root)
        build = root / BUILD_DIR
        build.mkdir(parents=True, exist_ok=True)
        (root / SHARD_DIR).mkdir(exist_ok=True)
        settings_path = build / _SETTINGS
        if settings_path.exists():
            try:
                old = json.loads(settings_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != self.settings:
                diff = sorted(k for k in set(old or {}) | set(self.settings) if (old or {}).get(k) != self.settings.get(k))
                raise ConfigError(
                    f"output {str(root)!r} holds an unfinished build made with other settings ({', '.join(diff) or 'unreadable'}): "
                    "rerun the original command to resume it, or pass --overwrite to start over"
                )
        else:
            atomic_write_bytes(settings_path, (json.dumps(self.settings, indent=2, sort_keys=True) + "\n").encode())

    def _load_state(self) -> ResumeState:
        shards: list[ShardInfo] = []
        build = self.root / BUILD_DIR
        k, start, doc_start = 0, 0, 0
        while (p := build / f"shard-{k:05d}.json").is_file():
            try:
                rec = json.loads(p.read_text())
                info = ShardInfo(rec["file"], int(rec["tokens"]), int(rec["documents"]), rec["sha256"], start, doc_start)
            except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
                raise StoreError(f"build ledger {str(p)!r} is unreadable ({e}): pass --overwrite to start over") from None
            data = self.root / info.file
            if not data.is_file() or data.stat().st_size != info.tokens * self.dtype.itemsize:
                break  # ledger outlived its data (should not happen): redo from here
            shards.append(info)
            start += info.tokens
            doc_start += info.documents
            k += 1
        return ResumeState(shards, doc_start, start)

    # ---- writing ----------------------------------------------------------------------------
    def _open_shard(self) -> None:
        k = len(self.state.shards)
        self._name = f"{SHARD_DIR}/{SHARD_PATTERN.format(k)}"
        self._tmp = self.root / f"{self._name}.partial"
        self._f = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._lens: list[np.ndarray] = []
        self._bytes: list[np.ndarray] = []
        self._words: list[np.ndarray] = []
        self._shard_len = 0

    @property
    def documents_done(self) -> int:
        """Source documents already in finished shards when this writer opened (skip these)."""
        return self.state.documents

    @property
    def documents_written(self) -> int:
        return self._docs_seen

    @property
    def tokens_written(self) -> int:
        return self._tokens_total

    def add_documents(self, flat: np.ndarray, lens: np.ndarray, nbytes: Sequence[int], nwords: Sequence[int]) -> None:
        """Append whole documents: ``flat`` holds their ids back to back (EOS/BOS included),
        ``lens[i]`` tokens for document ``i``; ``nbytes``/``nwords`` count each document's text."""
        lens = np.asarray(lens, dtype=np.int64)
        n = len(lens)
        if n == 0:
            return
        nbytes = np.asarray(nbytes, dtype=np.int64)
        nwords = np.asarray(nwords, dtype=np.int64)
        flat = np.asarray(flat)
        if not (len(nbytes) == len(nwords) == n and int(lens.sum()) == flat.size):
            raise ValueError("add_documents: lens, nbytes, nwords and flat disagree in length")
        if flat.size:
            hi, lo = int(flat.max()), int(flat.min())
            if hi >= self.vocab_size or lo < 0:
                bad = hi if hi >= self.vocab_size else lo
                raise StoreError(
                    f"token id {bad} is outside the tokenizer's vocabulary [0, {self.vocab_size}): "
                    "the tokenizer reports a wrong vocab size; nothing was committed"
                )
        flat = flat.astype(self.dtype, copy=False)
        # Split the batch after the document that brings the open shard to shard_tokens or more.
        i, pos = 0, 0
        while i < n:
            room = self.shard_tokens - self._shard_len
            cum = np.cumsum(lens[i:])
            j = int(np.searchsorted(cum, room, side="left"))  # first doc (relative) reaching the room
            take = min(j + 1, n - i)
            ntok = int(cum[take - 1])
            self._append(flat[pos : pos + ntok], lens[i : i + take], nbytes[i : i + take], nwords[i : i + take])
            pos += ntok
            i += take
            if self._shard_len >= self.shard_tokens:
                self._finish_shard()
                self._open_shard()

    def _append(self, tokens: np.ndarray, lens: np.ndarray, nbytes: np.ndarray, nwords: np.ndarray) -> None:
        buf = tokens.tobytes()
        self._f.write(buf)
        self._hash.update(buf)
        self._lens.append(lens)
        self._bytes.append(nbytes)
        self._words.append(nwords)
        self._shard_len += len(tokens)
        self._docs_seen += len(lens)
        self._tokens_total += len(tokens)

    def _finish_shard(self) -> None:
        """Seal the open shard: data file, then its index, then the ledger entry (the 'done' mark)."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        k = len(self.state.shards)
        final = self.root / self._name
        os.replace(self._tmp, final)
        fsync_dir(final.parent)
        lens = np.concatenate(self._lens) if self._lens else np.zeros(0, np.int64)
        index = self.root / BUILD_DIR / f"index-{k:05d}.npz"
        tmp_index = index.with_name(index.name + ".partial.npz")
        np.savez(tmp_index, lens=lens, bytes=np.concatenate(self._bytes) if self._bytes else lens[:0],
                 words=np.concatenate(self._words) if self._words else lens[:0])
        with open(tmp_index, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_index, index)
        prev = self.state.shards[-1] if self.state.shards else None
        info = ShardInfo(
            self._name, self._shard_len, len(lens), self._hash.hexdigest(),
            prev.start + prev.tokens if prev else 0, prev.doc_start + prev.documents if prev else 0,
        )
        rec = {"file": info.file, "tokens": info.tokens, "documents": info.documents, "sha256": info.sha256}
        atomic_write_bytes(self.root / BUILD_DIR / f"shard-{k:05d}.json", json.dumps(rec).encode())
        self.state.shards.append(info)
        self.state.documents += info.documents
        self.state.tokens += info.tokens

    def abort(self) -> None:
        """Stop without sealing: close files, keep finished shards for a later resume."""
        if self.finished is not None:
            return
        if not self._f.closed:
            self._f.close()
        if self._tmp.exists():
            self._tmp.unlink()

    def commit(self, *, tokenizer: dict, special_tokens: dict, source: dict, created_by: dict | None = None,
               extra: dict | None = None) -> Manifest:
        """Seal the last shard, merge the per-shard indexes, write the manifest, drop the build ledger."""
        if self._shard_len or not self.state.shards:
            if self._shard_len == 0 and self._docs_seen == 0:
                self.abort()
                raise SourceError("the dataset produced no documents: check the source, split and --max-docs (nothing was written)")
            self._finish_shard()
        else:
            self.abort()
        shards = self.state.shards
        lens = [np.load(self.root / BUILD_DIR / f"index-{k:05d}.npz") for k in range(len(shards))]
        doc_lens = np.concatenate([z["lens"] for z in lens])
        nbytes = np.concatenate([z["bytes"] for z in lens]).astype(np.int64)
        nwords = np.concatenate([z["words"] for z in lens]).astype(np.int64)
        offsets = np.zeros(len(doc_lens) + 1, dtype=np.int64)
        np.cumsum(doc_lens, out=offsets[1:])
        index_dir = self.root / INDEX_DIR
        index_dir.mkdir(exist_ok=True)
        index: list[IndexInfo] = []
        for name, arr in (("doc_offsets", offsets), ("doc_bytes", nbytes), ("doc_words", nwords)):
            rel = f"{INDEX_DIR}/{name}.npy"
            with open(self.root / rel, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
            index.append(IndexInfo(name, rel, len(arr), index_sha256(arr)))
        fsync_dir(index_dir)
        manifest = Manifest(
            dtype=self.dtype_name,
            tokenizer=tokenizer,
            special_tokens=special_tokens,
            source=source,
            shards=list(shards),
            totals={
                "tokens": int(offsets[-1]),
                "documents": len(doc_lens),
                "bytes": int(nbytes.sum()),
                "words": int(nwords.sum()),
            },
            created_by=created_by or {},
            extra={**(extra or {}), "build_settings": self.settings},
            index=index,
        )
        write_manifest(self.root, manifest)
        shutil.rmtree(self.root / BUILD_DIR)
        return manifest
