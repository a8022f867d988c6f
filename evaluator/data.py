"""Data stage of the evaluator: whatever the user passes -> an :class:`EvalData` (a streamdata
:class:`~streamdata.TokenStore` plus what the metrics need) -> batches of windows on the device.

There is one window stage, streamdata's: the plan of :mod:`streamdata.windows` (the exact
semantics: every target scored once, overlap as context, BOS prefix, document mode) cut and moved
to the device by :class:`streamdata.loader.WindowLoader` (pinned ring, side CUDA stream, no host
sync per batch). Token ids given in memory (a 1-D tensor, array or list) become a streamdata
``MemoryTokenStore``, so tensors and stores take the same path and give the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamdata import TokenStore, open_store
from streamdata.backends.base import scan_tokens
from streamdata.backends.memory import MemoryTokenStore
from streamdata.errors import StreamdataError
from streamdata.loader import WindowBatch, WindowLoader
from streamdata.windows import WindowSpec

from .errors import DataError

# WindowSpec is streamdata's (the window rules' one owner), re-exported: evaluator.WindowSpec is public.
__all__ = ["EvalData", "WindowBatch", "WindowSpec", "open_data"]

_INDEX_BLOCK = 1 << 20  # documents per step of a pass over the document index (8 MiB of offsets)


@dataclass
class EvalData:
    """Tokens to evaluate (a :class:`~streamdata.TokenStore`) plus what the metrics need.

    ``kind``: "tensor" (ids given in memory) or "store". ``doc_offsets`` int64 [D+1] (ids given in
    memory are one document unless offsets are given); ``doc_bytes``/``doc_words`` int64 [D] or None
    when unknown (raw ids, imported stores): bits-per-byte and word perplexity are then reported as
    None, never estimated.
    """

    store: TokenStore
    name: str
    kind: str = "store"
    _owns_store: bool = False

    @classmethod
    def from_tokens(cls, tokens: Any, doc_offsets: Any = None, doc_bytes: Any = None, doc_words: Any = None,
                    name: str = "the token tensor") -> "EvalData":
        """In-memory token ids with an optional document index and per-document UTF-8 byte/word
        counts (so byte and word metrics can be reported without a store)."""
        ids = _as_ids(tokens)
        n = int(ids.shape[0])
        if doc_offsets is not None:
            off = np.asarray(doc_offsets, dtype=np.int64)
            if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
                raise DataError(f"doc_offsets must be non-decreasing from 0 to the token count {n}: pass [0, ..., {n}]")
            doc_offsets = off
        docs = 1 if doc_offsets is None else len(doc_offsets) - 1
        counts = {}
        for attr, val in (("doc_bytes", doc_bytes), ("doc_words", doc_words)):
            if val is not None:
                arr = np.asarray(val, dtype=np.int64)
                if arr.shape != (docs,):
                    raise DataError(f"{attr} has {arr.shape} entries, the data has {docs} documents: pass one count per document")
                counts[attr] = arr
        return cls(_memory_store(ids, name, doc_offsets=doc_offsets, **counts), name, "tensor", _owns_store=True)

    # ---- what the engine and the metrics read ------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.store)

    @property
    def doc_offsets(self) -> np.ndarray:
        return np.asarray(self.store.doc_offsets)

    @property
    def doc_bytes(self) -> np.ndarray | None:
        return None if self.store.doc_bytes is None else np.asarray(self.store.doc_bytes)

    @property
    def doc_words(self) -> np.ndarray | None:
        return None if self.store.doc_words is None else np.asarray(self.store.doc_words)

    @property
    def vocab_size(self) -> int | None:
        """The store tokenizer's vocabulary (every id is below it), None when unknown."""
        return self.store.vocab_size

    @property
    def tokenizer_sha256(self) -> str | None:
        return (self.store.manifest.tokenizer or {}).get("sha256")

    @property
    def special_tokens(self) -> dict[str, Any]:
        return dict(self.store.manifest.special_tokens or {})

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def limit(self, max_tokens: int | None) -> int:
        return self.num_tokens if max_tokens is None else min(self.num_tokens, int(max_tokens))

    def document_lengths(self, max_tokens: int | None = None) -> np.ndarray:
        """int64 [D]: tokens of each document before ``max_tokens`` (O(documents) memory: small data only)."""
        lim = self.limit(max_tokens)
        off = self.doc_offsets
        return np.clip(np.minimum(off[1:], lim) - off[:-1], 0, None)

    def longest_document(self, max_tokens: int | None = None) -> int:
        """Tokens of the longest document before ``max_tokens`` (0 without documents), read from the
        (memory-mapped) index in blocks: memory does not grow with the number of documents."""
        lim = self.limit(max_tokens)
        off = self.store.doc_offsets
        longest = 0
        for d0 in range(0, len(off) - 1, _INDEX_BLOCK):
            o = np.minimum(np.asarray(off[d0 : d0 + _INDEX_BLOCK + 1]), lim)
            longest = max(longest, int(np.diff(o).max()))
            if int(o[-1]) >= lim:  # documents from here on are cut away by max_tokens
                break
        return longest

    # ---- checks that run before any compute ----------------------------------------------
    def check_ids(self, vocab: int | None, max_tokens: int | None = None) -> None:
        """Raise DataError naming the first id ``>= vocab`` and its position, before any compute,
        when the data may hold such ids: its vocabulary is unknown (ids given in memory, imports) or
        larger than the model's. Otherwise nothing is scanned here: the loader checks every span it
        reads (``WindowLoader(vocab_size=...)``), so even a damaged store fails with one line."""
        if vocab is None or (self.vocab_size is not None and self.vocab_size <= vocab):
            return
        _, bad = scan_tokens(self.store, 0, self.limit(max_tokens), vocab_size=vocab, checksum=False)
        if bad is not None:
            raise DataError(
                f"token id {bad[1]} at position {bad[0]} of {self.name} is outside the model's vocabulary "
                f"[0, {vocab}): the data was tokenized with another tokenizer; evaluate with the matching model "
                "or re-tokenize"
            )

    # ---- windows -----------------------------------------------------------------------
    def windows(self, spec: WindowSpec, device: torch.device, batch_windows: int = 1, vocab_size: int | None = None,
                start_at: int = 0, stop_at: int | None = None) -> WindowLoader:
        """The windows of ``spec`` (taken as it is) as a :class:`~streamdata.loader.WindowLoader` on
        ``device``, ``batch_windows`` per batch (``len()``, ``plan``, ``num_scored``; call ``close()``
        at the end), from window ``start_at`` of the full plan (resuming). Ids ``>= vocab_size`` stop
        the iteration with one line naming the first of them. ``stop_at``: one past the last window
        (a rank's block; None: the end)."""
        return WindowLoader(
            self.store, spec, batch_windows=batch_windows, device=device,
            vocab_size=_tighter(vocab_size, self.vocab_size), start_at=start_at, stop_at=stop_at,
        )

    def close(self) -> None:
        if self._owns_store and self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> "EvalData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_ids(data: Any) -> torch.Tensor | np.ndarray:
    """A 1-D integer tensor or array from a tensor/array/list (``[1, N]`` accepted), else DataError."""
    if isinstance(data, (list, tuple)):
        data = np.asarray(data) if len(data) else np.zeros(0, np.int64)
    shape = tuple(data.shape)
    if len(shape) == 2 and shape[0] == 1:
        data = data[0]
    if data.ndim != 1:
        raise DataError(f"token tensor has shape {shape}: pass a 1-D tensor of token ids (or shape [1, N])")
    if isinstance(data, torch.Tensor):
        ok = not (data.dtype.is_floating_point or data.dtype.is_complex or data.dtype == torch.bool)
    else:
        ok = data.dtype.kind in "iu"
    if not ok:
        raise DataError(f"token ids have dtype {data.dtype}, not an integer type: pass integer token ids (e.g. torch.long)")
    return data


def _memory_store(ids: Any, name: str, **kw: Any) -> MemoryTokenStore:
    try:  # ids on a device are copied to host memory once; the loader streams them back in windows
        # checksum=False: the sha256 serves `streamdata verify`, not an evaluation (2 GB of ids: ~1-2 s)
        return MemoryTokenStore(ids, name=name, checksum=False, **kw)
    except StreamdataError as e:  # negative ids, ids too large for uint32: data errors here
        raise DataError(str(e)) from None


def open_data(data: Any) -> EvalData:
    """Wrap ``data``: a 1-D integer tensor/array/list, a TokenStore, or a store path or URL."""
    if isinstance(data, EvalData):
        return data
    if isinstance(data, TokenStore):
        return EvalData(data, f"store {data.path!r}")
    if isinstance(data, (str, os.PathLike)):
        store = open_store(data)
        return EvalData(store, f"store {store.path!r}", _owns_store=True)
    if isinstance(data, (torch.Tensor, np.ndarray, list, tuple)):
        return EvalData.from_tokens(data)
    raise DataError(f"cannot evaluate data of type {type(data).__name__}: pass a 1-D token tensor, a TokenStore or a store path")


def _tighter(model_vocab: int | None, store_vocab: int | None) -> int | None:
    """The bound the loader checks every id against: the model's vocabulary, or the store's if
    smaller (an id the store's own tokenizer cannot produce is damage, even where the model has a
    row for it; stores opened without an up-front scan, such as a raw .bin with checksum=False,
    rely on this check)."""
    bounds = [v for v in (model_vocab, store_vocab) if v is not None]
    return min(bounds) if bounds else None
