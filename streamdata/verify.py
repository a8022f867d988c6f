"""``streamdata verify``: check a store end to end and list every defect found.

Checks, in order (a defect stops only the checks that depend on it):
1. the store opens: the manifest is complete and readable, every path in it stays inside the store,
   every file has the size the manifest records, and the document index passes the open-time
   structural check (:func:`streamdata.backends.base.check_document_index`: offsets start at 0,
   never decrease and end at the token total, documents never span shards, byte/word counts are
   non-negative and sum to the totals);
2. per manifest shard: sha256 of its little-endian token bytes equals the recorded checksum, and
   every token id is below the tokenizer's vocabulary size;
3. per document-index array (the source arrays too, when recorded): its checksum
   (:func:`streamdata.format.index_sha256`) equals the one in ``manifest.index``. Version-1 stores
   have no index checksums: a note says so (not a defect).
Notes (facts, not defects) also say when the words were counted by the older ``str-split`` rule
(stores written before ``word_rule`` was recorded): their word perplexity is not lm-eval's.

The checksums are computed from what the store returns (``read_into`` and the index arrays), so the
same code verifies every backend; for npy shards these bytes are exactly the file's bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .backends import TokenStore, open_store
from .backends.base import scan_tokens
from .errors import StreamdataError
from .format import LEGACY_WORD_RULE, WORD_RULE, WORD_RULES, index_sha256, word_rule_of

__all__ = ["VerifyReport", "index_mismatches", "verify_store"]

# Formats whose document index is stored (and, from format version 2, checksummed); imports and
# in-memory stores derive theirs at open from the token files themselves.
_STORED_INDEX = ("npy", "zarr")


@dataclass
class VerifyReport:
    path: str
    defects: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # facts worth saying that are not defects
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
        if word_rule_of(store.manifest) == LEGACY_WORD_RULE:
            report.notes.append(f"words were counted by the {LEGACY_WORD_RULE} rule ({WORD_RULES[LEGACY_WORD_RULE]}), "
                                f"not lm-eval's: results label its word perplexity so; re-tokenize to count by "
                                f"the {WORD_RULE} rule")
    finally:
        if store is not path:
            store.close()
    return report


def _check_tokens(store: TokenStore, report: VerifyReport) -> None:
    vocab = store.vocab_size
    for shard in store.manifest.shards:
        try:
            sha, bad = scan_tokens(store, shard.start, shard.start + shard.tokens, vocab_size=vocab)
        except (OSError, StreamdataError) as e:
            report.defects.append(f"{shard.file}: cannot read its tokens ({e})")
            continue
        if bad is not None:
            report.defects.append(f"{shard.file}: token id {bad[1]} >= vocab size {vocab} (first at token {bad[0]})")
            vocab = None  # report once; the checksum below will usually fail too
        if sha != shard.sha256:
            report.defects.append(f"{shard.file}: sha256 {sha[:16]}... != manifest {shard.sha256[:16]}...")
        report.checked_tokens += shard.tokens


def _check_index(store: TokenStore, report: VerifyReport) -> None:
    m = store.manifest
    report.checked_documents = m.num_documents
    if m.format in _STORED_INDEX and not m.index and m.format_version < 2:
        report.notes.append(f"format version {m.format_version}: the document index has no checksum "
                            "(written before version 2); its structure was checked")
        return
    report.defects += [f"{file}: {what}" for file, what in index_mismatches(store)]


def index_mismatches(store: TokenStore) -> list[tuple[str, str]]:
    """(file, what differs) for each document-index array of ``store`` that does not match the
    checksum its manifest records: ``verify``, and every copy (``merge``, ``convert``) before it
    writes, so a moved offset is never sealed under a fresh checksum. One pass over the index
    (24 bytes per document, nothing next to the tokens). Empty for imports and in-memory stores
    (their index is derived from the token files at open) and for version-1 stores (no checksums)."""
    m = store.manifest
    if m.format not in _STORED_INDEX or (not m.index and m.format_version < 2):
        return []
    arrays = {"doc_offsets": store.doc_offsets, "doc_bytes": store.doc_bytes, "doc_words": store.doc_words}
    if store.doc_sources is not None:  # format version 3, recorded at tokenize time
        arrays.update(doc_source_file=store.doc_sources.file, doc_source_row=store.doc_sources.row)
    recorded = {x.name: x for x in m.index}
    out = []
    for name, arr in arrays.items():
        info = recorded.get(name)
        if info is None:
            if arr is not None:
                out.append((name, "no checksum in the manifest"))
            continue
        if arr is None or len(arr) != info.length:
            out.append((name, f"{None if arr is None else len(arr)} entries, manifest says {info.length}"))
            continue
        got = index_sha256(arr)
        if got != info.sha256:
            out.append((info.file, f"sha256 {got[:16]}... != manifest {info.sha256[:16]}..."))
    return out
