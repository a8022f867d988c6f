"""Shard writer: documents of token ids in, a sealed npy store out (layout: :mod:`streamdata.format`).

Guarantees (the folder rules themselves live in :mod:`streamdata.output`):
- **Atomic commit.** The manifest is written last; until then the folder is an unfinished build that
  :func:`streamdata.open_store` refuses.
- **Resumable.** Shard boundaries depend only on the document sequence and ``shard_tokens`` (a shard
  is closed after the document that brings it to ``shard_tokens`` or more; documents never span
  shards). A finished shard is recorded in the build ledger after its data and its index part
  (``_build/index-NNNNN.npz``) are fsynced, so a rerun after a crash skips exactly the documents of
  recorded shards and rewrites the rest: the same tokens in the same order as an uninterrupted run.
- **Never clobbers.** :func:`streamdata.output.prepare_output` refuses folders that are not ours,
  locks the output, and replaces a finished store (``overwrite=True``) only by a swap once the new
  one is sealed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from .errors import ConfigError, SourceError, StoreError
from .format import (
    BUILD_DIR,
    INDEX_DIR,
    SHARD_DIR,
    SHARD_PATTERN,
    SOURCE_ARRAYS,
    IndexInfo,
    Manifest,
    ShardInfo,
    create_file,
    fsync_dir,
    index_sha256,
    numpy_dtype,
    resolve_inside,
)
from .output import Output, SourceFile, prepare_output

if TYPE_CHECKING:
    from .backends import TokenStore

__all__ = ["StoreWriter", "ResumeState", "copy_documents"]


@dataclass
class ResumeState:
    """What earlier runs finished: skip ``documents`` source documents and continue at ``next_shard``."""

    shards: list[ShardInfo]
    documents: int
    tokens: int

    @property
    def next_shard(self) -> int:
        return len(self.shards)


def _write_bytes(f, data: bytes) -> None:
    """Append ``data`` to an open shard file (the one write of token bytes; a seam for tests that
    fill the disk after N bytes)."""
    f.write(data)


def _index_part(k: int) -> str:
    """Ledger-side index of shard ``k``: its documents' token counts, bytes and words (npz)."""
    return f"{BUILD_DIR}/index-{k:05d}.npz"


class StoreWriter:
    """Writes documents (token id arrays + byte/word counts) into shards, resumably.

    ``settings`` is the identity of everything that determines the output (source, tokenizer,
    policy, limits, shard size); a rerun resumes only when it, and each file in ``sources``, is
    unchanged. ``output``: an already prepared output to write into (instead of ``root``).
    """

    def __init__(
        self,
        root: str | os.PathLike | None,
        *,
        dtype: str,
        vocab_size: int,
        shard_tokens: int,
        settings: dict[str, Any],
        overwrite: bool = False,
        sources: Iterable[SourceFile] = (),
        output: Output | None = None,
    ):
        if shard_tokens < 1:
            raise ConfigError(f"shard_tokens={shard_tokens} must be >= 1: pass e.g. --shard-tokens 67108864")
        self.dtype = numpy_dtype(dtype)
        self.dtype_name = dtype
        self.vocab_size = int(vocab_size)
        self.shard_tokens = int(shard_tokens)
        self.output = output if output is not None else prepare_output(root, settings, overwrite=overwrite,
                                                                       sources=sources)
        self.settings = self.output.settings
        self.root = Path(self.output.root)
        #: set when the folder already holds a finished store built with these exact settings
        #: (a rerun after a finished build, or after a crash between the manifest and the ledger
        #: clean-up): nothing to do.
        self.finished: Manifest | None = self.output.finished
        if self.finished is not None:
            return
        try:
            self.state = self._load_state()
            self._docs_seen = self.state.documents
            self._tokens_total = self.state.tokens
            self._open_shard()
        except BaseException:
            self.output.abort()
            raise

    def _load_state(self) -> ResumeState:
        """Finished shards from the ledger, each checked against its files (paths stay inside the root)."""
        ledger = self.output.ledger
        shards: list[ShardInfo] = []
        for k, info in enumerate(ledger.shards):
            if info.file != f"{SHARD_DIR}/{SHARD_PATTERN.format(k)}":
                raise StoreError(f"build ledger of {str(self.root)!r} names shard {k} {info.file!r}: the build is "
                                 "damaged, pass --overwrite to start over")
            data = resolve_inside(self.root, info.file, "shard")
            part = resolve_inside(self.root, _index_part(k), "index part")
            if not part.is_file() or not data.is_file() or data.stat().st_size != info.tokens * self.dtype.itemsize:
                break  # the ledger outlived its data (a file removed by hand): redo from here
            shards.append(info)
        if len(shards) < len(ledger.shards):
            ledger.shards = shards
            self.output.commit_ledger()
        return ResumeState(shards, sum(s.documents for s in shards), sum(s.tokens for s in shards))

    # ---- writing ----------------------------------------------------------------------------
    def _open_shard(self) -> None:
        k = len(self.state.shards)
        self._name = f"{SHARD_DIR}/{SHARD_PATTERN.format(k)}"
        self._tmp = self.root / f"{self._name}.partial"
        self._tmp.parent.mkdir(exist_ok=True)
        self._f = create_file(self._tmp)
        self._hash = hashlib.sha256()
        self._lens: list[np.ndarray] = []
        self._bytes: list[np.ndarray] = []
        self._words: list[np.ndarray] = []
        self._src_file: list[np.ndarray] = []
        self._src_row: list[np.ndarray] = []
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

    def add_documents(self, flat: np.ndarray, lens: np.ndarray, nbytes: Sequence[int], nwords: Sequence[int],
                      source_file: Sequence[int] | None = None, source_row: Sequence[int] | None = None) -> None:
        """Append whole documents: ``flat`` holds their ids back to back (EOS/BOS included),
        ``lens[i]`` tokens for document ``i``; ``nbytes``/``nwords`` count each document's text;
        ``source_file``/``source_row`` say where each came from (streamdata.format.SOURCE_ARRAYS;
        None: -1, not known). They are sealed only when :meth:`commit` is given ``source_files``."""
        lens = np.asarray(lens, dtype=np.int64)
        n = len(lens)
        if n == 0:
            return
        nbytes = np.asarray(nbytes, dtype=np.int64)
        nwords = np.asarray(nwords, dtype=np.int64)
        unknown = np.full(n, -1, np.int64)
        src_file = unknown if source_file is None else np.asarray(source_file, dtype=np.int64)
        src_row = unknown if source_row is None else np.asarray(source_row, dtype=np.int64)
        flat = np.asarray(flat)
        if not (len(nbytes) == len(nwords) == len(src_file) == len(src_row) == n and int(lens.sum()) == flat.size):
            raise ValueError("add_documents: lens, nbytes, nwords, sources and flat disagree in length")
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
            self._append(flat[pos : pos + ntok], lens[i : i + take], nbytes[i : i + take], nwords[i : i + take],
                         src_file[i : i + take], src_row[i : i + take])
            pos += ntok
            i += take
            if self._shard_len >= self.shard_tokens:
                self._finish_shard()
                self._open_shard()

    def _append(self, tokens: np.ndarray, lens: np.ndarray, nbytes: np.ndarray, nwords: np.ndarray,
                src_file: np.ndarray, src_row: np.ndarray) -> None:
        buf = tokens.tobytes()
        _write_bytes(self._f, buf)
        self._hash.update(buf)
        self._lens.append(lens)
        self._bytes.append(nbytes)
        self._words.append(nwords)
        self._src_file.append(src_file)
        self._src_row.append(src_row)
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
        index = self.root / _index_part(k)
        tmp_index = index.with_name(index.name + ".partial.npz")
        with create_file(tmp_index) as f:
            np.savez(f, lens=lens, bytes=np.concatenate(self._bytes) if self._bytes else lens[:0],
                     words=np.concatenate(self._words) if self._words else lens[:0],
                     source_file=np.concatenate(self._src_file) if self._src_file else lens[:0],
                     source_row=np.concatenate(self._src_row) if self._src_row else lens[:0])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_index, index)
        fsync_dir(index.parent)
        prev = self.state.shards[-1] if self.state.shards else None
        info = ShardInfo(
            self._name, self._shard_len, len(lens), self._hash.hexdigest(),
            prev.start + prev.tokens if prev else 0, prev.doc_start + prev.documents if prev else 0,
        )
        self.state.shards.append(info)  # the same list as the ledger's: committed next, the 'done' mark
        self.output.ledger.shards = self.state.shards
        self.output.commit_ledger()
        self.state.documents += info.documents
        self.state.tokens += info.tokens

    def abort(self) -> None:
        """Stop without sealing: close files, keep finished shards for a later resume (and nothing else)."""
        if self.finished is not None:
            return
        self._close_partial()
        self.output.abort()

    def _close_partial(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            except OSError:  # its buffered tail cannot be written (a full disk): the file goes anyway
                pass
        if self._tmp.is_file() and not self._tmp.is_symlink():  # only the file we created
            self._tmp.unlink()

    def commit(self, *, tokenizer: dict, special_tokens: dict, source: dict, created_by: dict | None = None,
               extra: dict | None = None, word_rule: str | None = None,
               source_files: Sequence[str] | None = None) -> Manifest:
        """Seal the last shard, merge the per-shard indexes, write the manifest, drop the build ledger.

        ``word_rule``: how the documents' words were counted (streamdata.format.WORD_RULES), None when
        not known (copied counts of a store that recorded none keep recording none).
        ``source_files``: the files the documents' ``source_file`` values index; None: the store
        records no sources (also when a shard of the build was written by a version without them)."""
        if self._shard_len or not self.state.shards:
            if self._shard_len == 0 and self._docs_seen == 0:
                self.abort()
                raise SourceError("the dataset produced no documents: check the source, split and --max-docs (nothing was written)")
            self._finish_shard()
        else:
            self._close_partial()
        shards = self.state.shards
        lens = [np.load(self.root / _index_part(k)) for k in range(len(shards))]
        doc_lens = np.concatenate([z["lens"] for z in lens])
        nbytes = np.concatenate([z["bytes"] for z in lens]).astype(np.int64)
        nwords = np.concatenate([z["words"] for z in lens]).astype(np.int64)
        offsets = np.zeros(len(doc_lens) + 1, dtype=np.int64)
        np.cumsum(doc_lens, out=offsets[1:])
        arrays = [("doc_offsets", offsets), ("doc_bytes", nbytes), ("doc_words", nwords)]
        if source_files is not None and all("source_file" in z.files for z in lens):
            arrays += [(name, np.concatenate([z[key] for z in lens]).astype(np.int64))
                       for name, key in zip(SOURCE_ARRAYS, ("source_file", "source_row"))]
        else:
            source_files = None
        index_dir = self.root / INDEX_DIR
        index_dir.mkdir(exist_ok=True)
        index: list[IndexInfo] = []
        for name, arr in arrays:
            rel = f"{INDEX_DIR}/{name}.npy"
            with create_file(self.root / rel) as f:
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
            extra=dict(extra or {}),
            index=index,
            word_rule=word_rule,
            source_files=None if source_files is None else list(source_files),
        )
        self.finished = self.output.seal(manifest)
        return self.finished


def copy_documents(src: "TokenStore", writer: StoreWriter, block_tokens: int, skip: int = 0) -> None:
    """Append every document of ``src`` to ``writer`` except its first ``skip`` (already in finished
    shards of an interrupted copy), in blocks of whole documents of about ``block_tokens`` ids (at
    least one document, however long). Every token of ``src`` is read, in order from token 0, also
    the skipped ones: a :class:`~streamdata.backends.base.ChecksummedReads` source then checks every
    shard, and a damaged shard copied before a crash is caught by the rerun, not skipped unread.
    Byte/word counts ``src`` does not know (imports) are written as zeros; its document sources
    (when it records them) are copied, and :meth:`StoreWriter.commit` seals them when given
    ``src.doc_sources.files``."""
    off = src.doc_offsets
    nb, nw = src.doc_bytes, src.doc_words
    ds = src.doc_sources
    n = src.num_documents
    buf = np.empty(0, dtype=src.dtype)
    i = 0
    while i < n:
        j = int(np.searchsorted(off, int(off[i]) + block_tokens, side="right")) - 1
        j = min(n, max(j, i + 1))
        a, b = int(off[i]), int(off[j])
        if buf.size < b - a:
            buf = np.empty(max(b - a, min(block_tokens, len(src))), dtype=src.dtype)
        flat = buf[: b - a]
        src.read_into(a, b, flat)
        first = max(i, skip)
        if first < j:
            lens = np.diff(np.asarray(off[first : j + 1], dtype=np.int64))
            zeros = np.zeros(j - first, np.int64)
            writer.add_documents(flat[int(off[first]) - a :], lens, zeros if nb is None else nb[first:j],
                                 zeros if nw is None else nw[first:j], None if ds is None else ds.file[first:j],
                                 None if ds is None else ds.row[first:j])
        src.release(a, b)
        i = j
