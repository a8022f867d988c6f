"""A document of a store and where it came from: ``streamdata show STORE --doc N``, and the source
columns of the evaluator's ``documents.csv``.

A document's source is what tokenize recorded in the store (format version 3,
:data:`streamdata.format.SOURCE_ARRAYS`): a file of the manifest's ``source_files`` and the row in
it, or a dataset row. Stores without it (written before version 3, imports, in-memory ids) have an
empty source. The text is the document's ids decoded with the store's tokenizer, less the BOS/EOS
ids its policy added (``manifest["special_tokens"]``): a tokenizer that decodes exactly (byte-level
BPE) gives the row's text back.

The tokenizer: ``--tokenizer PATH`` when given, else the one the manifest names when that is a
local file or folder here (never a hub look-up); either way its identity must match the manifest's
(:func:`streamdata.tokenize.tokenizer_mismatch`, or the vocabulary size when no digest is recorded).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import TokenStore, open_store
from .backends.base import DocSources
from .errors import ConfigError, TokenizerError

__all__ = ["ShownDocument", "SourceColumn", "show_document", "source_of"]


def source_of(sources: DocSources | None, i: int) -> tuple[str | None, int | None]:
    """(file, row) of document ``i``: file None for a dataset row, row None when not known; (None,
    None) when the store records no sources."""
    if sources is None:
        return None, None
    f, r = int(sources.file[i]), int(sources.row[i])
    return (sources.files[f] if f >= 0 else None), (r if r >= 0 else None)


def describe_source(file: str | None, row: int | None, recorded: bool = True) -> str:
    """One phrase for a document's source: ``FILE row R``, ``dataset row R``, or why there is none."""
    if not recorded:
        return "not recorded in this store (written before format version 3, or an import)"
    if file is None:
        return "not known" if row is None else f"dataset row {row}"
    return f"{file} row {row}" if row is not None else f"{file} (row unknown)"


class SourceColumn:
    """The ``source_file`` or ``source_row`` column of ``documents.csv``, computed a block at a time
    from the store's source arrays (``len`` and contiguous slices; empty cells when not recorded or
    not known)."""

    def __init__(self, store: TokenStore, which: str, n: int | None = None):
        if which not in ("file", "row"):
            raise ValueError(f"which={which!r}: 'file' or 'row'")
        self._sources, self._which = store.doc_sources, which
        self._n = store.num_documents if n is None else n

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, key: slice) -> list[Any]:
        lo, hi, _ = key.indices(self._n)
        if self._sources is None:
            return [None] * max(0, hi - lo)
        if self._which == "row":
            return [r if r >= 0 else None for r in np.asarray(self._sources.row[lo:hi]).tolist()]
        files = self._sources.files
        return [files[f] if f >= 0 else None for f in np.asarray(self._sources.file[lo:hi]).tolist()]


@dataclass
class ShownDocument:
    """Document ``index`` of ``documents``: its ids (BOS/EOS included), source and decoded text."""

    index: int
    documents: int
    ids: np.ndarray
    source: str
    text: str | None  # None when only the ids were asked for

    def header(self) -> str:
        return f"# document {self.index} of {self.documents}: {len(self.ids)} tokens; source: {self.source}"


def check_document_number(n: int, documents: int) -> None:
    """Refuse a document number outside the store (one line naming it and the valid range)."""
    if documents == 0:
        raise ConfigError(f"--doc {n}: the store holds no documents")
    if not 0 <= n < documents:
        raise ConfigError(f"--doc {n} is outside the store's documents: pass 0 to {documents - 1} "
                          f"({documents} documents)")


def store_tokenizer(store: TokenStore, tokenizer: str | None) -> Any:
    """The tokenizer to decode ``store`` with (a LoadedTokenizer), checked against its manifest."""
    from .tokenize import load_tokenizer, tokenizer_mismatch

    rec = store.manifest.tokenizer
    spec = tokenizer
    if spec is None:
        name = rec.get("name")
        if not name:
            raise TokenizerError(f"store {store.path!r} records no tokenizer (ids stored as they are, or an import): "
                                 "pass --tokenizer PATH (a tokenizer.json that made the ids), or --ids")
        if not os.path.exists(name):
            raise TokenizerError(f"the store's tokenizer {name!r} is not a local file or folder here: pass --tokenizer "
                                 "PATH (the tokenizer.json the store was built with), or --ids")
        spec = name
    tok = load_tokenizer(spec)
    why = tokenizer_mismatch(rec, tok.identity())
    if why is None and rec.get("vocab_size") is not None and not (rec.get("sha256") or rec.get("ids_sha256")) \
            and int(rec["vocab_size"]) != tok.vocab_size:
        why = f"vocabulary sizes {tok.vocab_size} vs the store's {rec['vocab_size']}"
    if why is not None:
        raise TokenizerError(f"tokenizer {spec!r} is not the one store {store.path!r} was built with ({why}): pass "
                             "the tokenizer.json the store was built with, or --ids")
    return tok


def show_document(store: Any, n: int, *, tokenizer: str | None = None, ids_only: bool = False) -> ShownDocument:
    """Document ``n`` of ``store`` (a path or an open store): its ids, source and, unless
    ``ids_only``, its text decoded (see the module docstring for the tokenizer and the BOS/EOS)."""
    owned = not isinstance(store, TokenStore)
    s = open_store(store) if owned else store
    try:
        check_document_number(n, s.num_documents)
        ids = s.document(n)
        file, row = source_of(s.doc_sources, n)
        shown = ShownDocument(n, s.num_documents, ids, describe_source(file, row, s.doc_sources is not None), None)
        if not ids_only:
            tok = store_tokenizer(s, tokenizer)
            shown.text = tok.tokenizer.decode(_text_ids(ids, s.manifest.special_tokens), skip_special_tokens=False)
        return shown
    finally:
        if owned:
            s.close()


def _text_ids(ids: np.ndarray, special: dict[str, Any]) -> list[int]:
    """``ids`` without the BOS/EOS the store's policy added around the text."""
    out = ids.astype(np.int64).tolist()
    bos, eos = special.get("bos"), special.get("eos")
    if bos is not None and out and out[0] == bos:
        out = out[1:]
    if eos is not None and out and out[-1] == eos:
        out = out[:-1]
    return out
