"""memory backend: token ids already in memory (a numpy array or a torch tensor) as a TokenStore.

For callers that hold ids rather than a store (the evaluator's tensor input, tests): everything
downstream (windows, loader, metrics, verify) then has one input path. Nothing is written to disk.

- ``tokens``: 1-D, any integer dtype (a torch tensor is copied to host memory once). Negative ids
  are refused. Stored as the smallest unsigned dtype: ``choose_dtype(vocab_size)`` when the
  vocabulary is given (every id must then be below it), else from the largest id.
- ``doc_offsets`` (default: one document), ``doc_bytes``/``doc_words`` (default: unknown, None):
  arrays, tensors or sequences of integers.
  They pass the same structural check as a store on disk
  (:func:`~streamdata.backends.base.check_document_index`).
- The synthesized manifest has format ``"memory"``, an identity without a tokenizer (unknown
  except ``vocab_size``), one shard ``"<memory>"`` with the sha256 of the ids as little-endian
  bytes of the store dtype (what ``streamdata verify`` recomputes; ``checksum=False`` skips it).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from ..format import Manifest, ShardInfo, choose_dtype, numpy_dtype
from .base import TokenStore, check_document_index, find_id_over, imported_identity

__all__ = ["MemoryTokenStore", "is_array", "open_memory"]


def is_array(obj: Any) -> bool:
    """True for a numpy array or a torch tensor (checked without importing torch)."""
    return isinstance(obj, np.ndarray) or (type(obj).__module__.startswith("torch") and hasattr(obj, "detach"))


def _host(obj: Any, what: str) -> np.ndarray | None:
    if obj is None:
        return None
    if is_array(obj) and not isinstance(obj, np.ndarray):  # a torch tensor (maybe on a GPU)
        obj = obj.detach().cpu().numpy()
    obj = np.asarray(obj)
    if obj.ndim != 1 or obj.dtype.kind not in "iu":
        raise ConfigError(f"{what} has dtype {obj.dtype} and shape {obj.shape}: pass a 1-D integer array")
    return obj


class MemoryTokenStore(TokenStore):
    """Token ids held in memory (see module docstring)."""

    widening_reads = True  # read_into is a numpy slice assignment: an int64 ``out`` is filled exactly

    def __init__(self, tokens: Any, *, doc_offsets: Any = None, doc_bytes: Any = None, doc_words: Any = None,
                 vocab_size: int | None = None, eos_id: int | None = None, checksum: bool = True,
                 name: str = "<memory>"):
        ids = _host(tokens, "tokens")
        self.path = name
        n = len(ids)
        lo = int(ids.min()) if n else 0
        hi = int(ids.max()) if n else 0
        if lo < 0:
            at = int(np.argmax(ids < 0))
            raise StoreError(f"token id {lo} at position {at} of {name} is negative: pass non-negative token ids")
        if vocab_size is not None:
            dtype = choose_dtype(int(vocab_size))
            bad = find_id_over(ids, int(vocab_size))
            if bad is not None:
                raise StoreError(f"token id {bad[1]} at position {bad[0]} of {name} is >= vocab_size {vocab_size}: "
                                 "pass the vocabulary the ids come from")
        else:
            dtype = choose_dtype(hi + 1)
        sdt = numpy_dtype(dtype)
        # no copy when already the store dtype; a read-only view, so the caller's array keeps its flags
        self._ids = np.ascontiguousarray(ids, dtype=sdt).view()
        self._ids.flags.writeable = False
        off = _host(doc_offsets, "doc_offsets")
        offsets = np.array([0, n] if n else [0], dtype=np.int64) if off is None else np.asarray(off, dtype=np.int64)
        counts = [None if c is None else np.asarray(_host(c, f"doc_{k}"), dtype=np.int64)
                  for k, c in (("bytes", doc_bytes), ("words", doc_words))]
        self._offsets, self._bytes, self._words = offsets, counts[0], counts[1]
        totals = {"tokens": n, "documents": len(offsets) - 1}
        for k, c in zip(("bytes", "words"), counts):
            if c is not None:
                totals[k] = int(c.sum())
        sha = hashlib.sha256(self._ids).hexdigest() if checksum else ""
        tokenizer, special = imported_identity(vocab_size, eos_id, "unknown (in-memory token ids)")
        self.manifest = Manifest(
            dtype=dtype, tokenizer=tokenizer, special_tokens=special, source={"kind": "memory", "name": name},
            shards=[ShardInfo(name, n, totals["documents"], sha)], totals=totals, format="memory",
            created_by={"tool": "streamdata.backends.memory"},
            extra={"doc_counts": "given" if counts[0] is not None else "unknown",
                   "checksum": "sha256" if checksum else "skipped"},
        )
        check_document_index(name, self.manifest, self._offsets, self._bytes, self._words)

    def view(self, start: int, stop: int) -> np.ndarray:
        start, stop = self._check_range(start, stop)
        return self._ids[start:stop]

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        start, stop = self._check_range(start, stop)
        out[: stop - start] = self._ids[start:stop]


def open_memory(tokens: Any, **kw: Any) -> MemoryTokenStore:
    """``MemoryTokenStore(tokens, **kw)``: see :mod:`streamdata.backends.memory`."""
    return MemoryTokenStore(tokens, **kw)
