"""What each reported figure was measured on: the document range of each chunk (``chunks.csv``
``first_document``/``last_document``) and the source of each document (``documents.csv``
``source_file``/``source_row``, recorded by ``streamdata tokenize``; see :mod:`streamdata.show`).

Both are columns computed a block at a time (``len`` and contiguous slices, what the report writer
reads), never a Python object per chunk or document held for the whole run. ``streamdata show
STORE --doc N`` prints a document's text, so a spike in the per-chunk plot leads to its text.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from streamdata.show import SourceColumn
from streamdata.windows import WindowSpec, plan_windows

__all__ = ["ChunkDocuments", "SourceColumn", "chunk_document_columns"]


class ChunkDocuments:
    """First (``which="first"``) or last (``"last"``) document of each window's scored targets.

    Window ``w`` scores targets ``score_from .. length - 1``, i.e. the store's tokens
    ``start + 1 + score_from`` to ``start + length`` (a virtual BOS start is ``doc_start - 1``, see
    :class:`streamdata.windows.WindowBlock`); a token's document is the ``d`` with
    ``doc_offsets[d] <= token < doc_offsets[d + 1]``.
    """

    def __init__(self, doc_offsets: Any, spec: WindowSpec, which: str):
        if which not in ("first", "last"):
            raise ValueError(f"which={which!r}: 'first' or 'last'")
        self._off, self._which = doc_offsets, which
        self._plan = plan_windows(doc_offsets, spec, check=False)

    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi, _ = key.indices(len(self._plan))
        if hi <= lo:
            return np.zeros(0, np.int64)
        b = self._plan.block(lo, hi)
        token = b.start + 1 + b.score_from if self._which == "first" else b.start + b.length
        return np.searchsorted(self._off, token, side="right").astype(np.int64) - 1


def chunk_document_columns(doc_offsets: Any, spec: WindowSpec) -> dict[str, ChunkDocuments]:
    """``{"first_document": ..., "last_document": ...}`` for the windows of ``spec`` over the store."""
    return {f"{w}_document": ChunkDocuments(doc_offsets, spec, w) for w in ("first", "last")}
