"""``streamdata verify``: check a store end to end and list every defect found.

Checks, in order (a defect stops only the checks that depend on it):
1. the manifest is complete and readable, and the backend opens (sizes of shard files match);
2. per manifest shard: sha256 of its little-endian token bytes equals the recorded checksum;
3. every token id is below the tokenizer's vocabulary size;
4. the document index: starts at 0, ends at the token total, never decreases, has one entry per
   document, no document spans two shards, byte/word counts are non-negative and sum to the totals.

The checksum is computed from the tokens as the store returns them (``read_into``), so the same
code verifies every backend; for npy shards these bytes are exactly the file's bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import StreamdataError
from .store import TokenStore, open_store

__all__ = ["VerifyReport", "verify_store"]

_BLOCK = 1 << 24  # tokens per read: 32-64 MiB, large enough for full disk bandwidth


@dataclass
class VerifyReport:
    path: str
    defects: list[str] = field(default_factory=list)
    checked_tokens: int = 0
    checked_documents: int = 0

    @property
    def ok(self) -> bool:
        return not self.defects


def verify_store(path: str | os.PathLike | TokenStore) -> VerifyReport:
    report = VerifyReport(str(getattr(path, "path", path)))
    try:
        store = open_store(path)
    except StreamdataError as e:
        report.defects.append(str(e))
        return report
    try:
        _check_tokens(store, report)
        _check_index(store, report)
    finally:
        if store is not path:
            store.close()
    return report


def _check_tokens(store: TokenStore, report: VerifyReport) -> None:
    vocab = store.vocab_size
    buf = np.empty(min(_BLOCK, max(1, len(store))), dtype=store.dtype)
    for shard in store.manifest.shards:
        h = hashlib.sha256()
        pos, stop = shard.start, shard.start + shard.tokens
        while pos < stop:
            hi = min(stop, pos + len(buf))
            view = buf[: hi - pos]
            try:
                store.read_into(pos, hi, view)
            except (OSError, StreamdataError) as e:
                report.defects.append(f"{shard.file}: cannot read tokens [{pos}, {hi}) ({e})")
                break
            h.update(view.tobytes())
            if vocab is not None and view.size:
                top = int(view.max())
                if top >= vocab:
                    where = pos + int(np.argmax(view >= vocab))
                    report.defects.append(f"{shard.file}: token id {top} >= vocab size {vocab} (first at token {where})")
                    vocab = None  # report once; the checksum below will usually fail too
            pos = hi
        else:
            if h.hexdigest() != shard.sha256:
                report.defects.append(f"{shard.file}: sha256 {h.hexdigest()[:16]}... != manifest {shard.sha256[:16]}...")
        report.checked_tokens += pos - shard.start


def _check_index(store: TokenStore, report: VerifyReport) -> None:
    m = store.manifest
    off = np.asarray(store.doc_offsets)
    n_docs = m.num_documents
    if off.shape != (n_docs + 1,):
        report.defects.append(f"document index has {off.shape[0]} offsets, expected {n_docs + 1}")
        return
    if off[0] != 0 or off[-1] != len(store):
        report.defects.append(f"document index spans [{off[0]}, {off[-1]}), expected [0, {len(store)})")
    bad = np.flatnonzero(np.diff(off) < 0)
    if bad.size:
        report.defects.append(f"document index decreases at document {int(bad[0])}")
    starts = {s.start for s in m.shards} | {len(store)}
    # documents never span shards: every shard boundary must be a document boundary
    on_boundary = np.isin(np.array(sorted(starts), dtype=np.int64), off)
    if not on_boundary.all():
        report.defects.append("a document spans a shard boundary (index and shards disagree)")
    for name, arr, total in (("bytes", store.doc_bytes, m.totals.get("bytes")), ("words", store.doc_words, m.totals.get("words"))):
        if arr is None:
            continue
        arr = np.asarray(arr)
        if arr.shape != (n_docs,):
            report.defects.append(f"doc_{name} has shape {arr.shape}, expected ({n_docs},)")
            continue
        if (arr < 0).any():
            report.defects.append(f"doc_{name} has negative counts")
        if total is not None and int(arr.sum()) != int(total):
            report.defects.append(f"doc_{name} sums to {int(arr.sum())}, manifest totals say {total}")
    report.checked_documents = n_docs
