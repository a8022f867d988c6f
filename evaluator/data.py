"""Data stage of the evaluator: whatever the user passes (a 1-D tensor or array of token ids, a
:class:`streamdata.TokenStore`, or a store path) -> an :class:`EvalData`, whose :meth:`EvalData.windows`
yields batches of windows on the device. This is the only module that knows where tokens live.

Window semantics (DESIGN.md, "Windows: exact semantics"). Each stream (the whole token sequence in
``stream`` mode, each document in ``document`` mode, optionally prefixed by a BOS id) of n tokens has
targets ``v[1:n]``, each scored exactly once. Window k of chunk size L starts at ``s = k * (L - overlap)``,
reads inputs ``v[s:s+len]`` and targets ``v[s+1:s+len+1]`` with ``len = min(L, n - 1 - s)``; in every
window but a stream's first, the first ``overlap`` targets are context only. A stream with ``n < 2``
has no windows.

Stores go through :class:`streamdata.loader.WindowLoader` (pinned ring, side stream, device-side
window cutting) when that module is installed; raw tensors go through :class:`_TensorWindows`, a
small in-memory implementation of the same semantics and the same :class:`WindowBatch` fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from .errors import ConfigError, DataError

__all__ = ["EvalData", "WindowBatch", "WindowSpec", "open_data", "plan_windows_np", "expected_scored"]

# Token ids scanned per block when checking ids against the model's vocabulary (host memory bound).
_SCAN_BLOCK = 1 << 24


@dataclass
class WindowBatch:
    """B windows, right-padded to L. Mirrors ``streamdata.loader.WindowBatch`` field for field.

    Device tensors: ``inputs``/``targets`` int64 [B, L] (padding 0), ``score_mask`` bool [B, L]
    (True exactly for scored targets), ``doc_ids`` int64 [B, L] (document of each target),
    ``positions`` int64 [B, L] (position of each target in its document), ``lengths`` int64 [B].
    Host ints: ``first_window`` (plan index of row 0), ``num_windows`` (B), ``num_scored``.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    score_mask: torch.Tensor
    doc_ids: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    first_window: int
    num_windows: int
    num_scored: int


@dataclass(frozen=True)
class WindowSpec:
    """How to cut windows: the engine resolves these from its config and the model."""

    chunk_size: int
    overlap: int = 0
    doc_mode: str = "stream"  # "stream" | "document"
    batch_windows: int = 1
    bos_id: int | None = None
    max_tokens: int | None = None  # evaluate the prefix [0, max_tokens) of the token sequence

    def __post_init__(self):
        if self.chunk_size < 1 or not 0 <= self.overlap < self.chunk_size:
            raise ConfigError(f"window spec chunk_size={self.chunk_size}, overlap={self.overlap}: need 0 <= overlap < chunk_size")
        if self.batch_windows < 1:
            raise ConfigError(f"batch_windows={self.batch_windows} must be >= 1")


@dataclass
class WindowPlan:
    """Windows as parallel int64 arrays (the fallback's plan; the loader has its own ``plan``).

    ``vstart``: index of the window's first input in its stream's virtual sequence (BOS counted);
    ``gbase``: global token index of virtual position 0 of its stream (``a - 1`` with a BOS prefix,
    so global = gbase + virtual for every real token); ``length``; ``score_from``; ``doc``
    (document of the stream, -1 in stream mode); ``bos`` (the stream has a BOS prefix).
    """

    vstart: np.ndarray
    gbase: np.ndarray
    length: np.ndarray
    score_from: np.ndarray
    doc: np.ndarray
    bos: np.ndarray

    def __len__(self) -> int:
        return len(self.length)

    @property
    def start(self) -> np.ndarray:
        """Global token index of each window's first input (the BOS slot maps to one before its stream)."""
        return self.gbase + self.vstart


def _stream_windows(n: int, L: int, overlap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vstart, length, score_from) of the windows over one stream of n virtual tokens."""
    t = n - 1  # targets v[1..n)
    if t <= 0:
        e = np.zeros(0, np.int64)
        return e, e, e
    stride = L - overlap
    k = 1 if t <= L else 1 + -(-(t - L) // stride)
    vstart = np.arange(k, dtype=np.int64) * stride
    length = np.minimum(L, t - vstart)
    score_from = np.full(k, overlap, np.int64)
    score_from[0] = 0
    return vstart, length, score_from


def plan_windows_np(doc_offsets: np.ndarray, spec: WindowSpec) -> WindowPlan:
    """The window plan for documents ``doc_offsets`` (int64 [D+1]) under ``spec`` (pure function)."""
    off = np.asarray(doc_offsets, dtype=np.int64)
    n_total = int(off[-1])
    limit = n_total if spec.max_tokens is None else min(n_total, int(spec.max_tokens))
    bos = spec.bos_id is not None
    if spec.doc_mode == "stream":
        streams = [(0, limit, -1)]
    else:
        ndocs = int(np.searchsorted(off, limit, side="left"))  # documents starting before the limit
        streams = [(int(off[d]), min(int(off[d + 1]), limit), d) for d in range(ndocs)]
    parts: list[tuple[np.ndarray, ...]] = []
    for a, b, d in streams:
        vs, ln, sf = _stream_windows(b - a + bos, spec.chunk_size, spec.overlap)
        if len(vs):
            k = len(vs)
            parts.append((vs, np.full(k, a - bos, np.int64), ln, sf, np.full(k, d, np.int64), np.full(k, bos, bool)))
    if not parts:
        e = np.zeros(0, np.int64)
        return WindowPlan(e, e, e, e, e, np.zeros(0, bool))
    cols = [np.concatenate(c) for c in zip(*parts)]
    return WindowPlan(*cols)


def expected_scored(doc_offsets: np.ndarray, doc_mode: str, bos: bool, max_tokens: int | None) -> int:
    """Number of targets the semantics score: N-1 (+1 with BOS) per stream."""
    off = np.asarray(doc_offsets, dtype=np.int64)
    limit = int(off[-1]) if max_tokens is None else min(int(off[-1]), int(max_tokens))
    if doc_mode == "stream":
        return max(0, limit - 1 + bos)
    lens = np.clip(np.minimum(off[1:], limit) - off[:-1], 0, None)
    return int(np.clip(lens[lens > 0] - 1 + bos, 0, None).sum())


class _TensorWindows:
    """In-memory window iterator over a 1-D token tensor (same semantics as the store loader).

    Only the span a batch needs is copied to the device; windows are then cut on the device from
    per-row start/length vectors, so the host never builds [B, L] index matrices.
    """

    def __init__(self, tokens: torch.Tensor, doc_offsets: np.ndarray, spec: WindowSpec, device: torch.device):
        self.tokens, self.spec, self.device = tokens, spec, device
        self.plan = plan_windows_np(doc_offsets, spec)
        self._off_dev = torch.tensor(np.asarray(doc_offsets, np.int64), device=device)  # copy: store index is read-only

    def __len__(self) -> int:
        return -(-len(self.plan) // self.spec.batch_windows)

    def __iter__(self) -> Iterator[WindowBatch]:
        p, B, L = self.plan, self.spec.batch_windows, self.spec.chunk_size
        dev = self.device
        ar = torch.arange(L + 1, device=dev)
        for w0 in range(0, len(p), B):
            w1 = min(len(p), w0 + B)
            g0 = p.gbase[w0:w1] + p.vstart[w0:w1]  # global index of each window's v[s]
            has_bos = p.bos[w0:w1] & (p.vstart[w0:w1] == 0)
            lo = int((g0 + has_bos).min())
            hi = int((g0 + p.length[w0:w1] + 1).max())
            span = self.tokens[lo:hi].to(dev, dtype=torch.int64, non_blocking=True)
            g0_d = torch.as_tensor(g0, device=dev)
            ln_d = torch.as_tensor(p.length[w0:w1], device=dev)
            sf_d = torch.as_tensor(p.score_from[w0:w1], device=dev)
            idx = g0_d[:, None] + ar[None, :]  # [B, L+1] global indices of v[s .. s+L]
            valid = ar[None, :] <= ln_d[:, None]
            tok = span[(idx - lo).clamp_(0, hi - lo - 1)]
            if has_bos.any():
                tok[torch.as_tensor(has_bos, device=dev), 0] = int(self.spec.bos_id)
            tok = tok.masked_fill_(~valid, 0)
            j = ar[None, :L]
            in_len = j < ln_d[:, None]
            score = in_len & (j >= sf_d[:, None])
            tgt_g = idx[:, 1:]  # global index of each target
            if self.spec.doc_mode == "stream":
                doc = torch.searchsorted(self._off_dev, tgt_g.contiguous(), right=True) - 1
            else:
                doc = torch.as_tensor(p.doc[w0:w1], device=dev)[:, None].expand(-1, L)
            doc = doc.clamp(0, len(self._off_dev) - 2)
            pos = tgt_g - self._off_dev[doc]
            yield WindowBatch(
                inputs=tok[:, :L].masked_fill(~in_len, 0),  # the last target is not an input
                targets=tok[:, 1:].contiguous(),
                score_mask=score,
                doc_ids=torch.where(in_len, doc, 0),
                positions=torch.where(in_len, pos, 0),
                lengths=ln_d,
                first_window=w0,
                num_windows=w1 - w0,
                num_scored=int((p.length[w0:w1] - p.score_from[w0:w1]).sum()),
            )

    def close(self) -> None:
        pass


class _StoreWindows(_TensorWindows):
    """Fallback for stores while :mod:`streamdata.loader` is absent: synchronous reads per batch."""

    def __init__(self, store: Any, spec: WindowSpec, device: torch.device):
        self.store = store
        super().__init__(_StoreSlicer(store), store.doc_offsets, spec, device)


class _StoreSlicer:
    """``slicer[lo:hi]`` -> int64 CPU tensor of store tokens (what _TensorWindows indexes)."""

    def __init__(self, store: Any):
        self.store = store

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return torch.from_numpy(self.store.read(sl.start, sl.stop).astype(np.int64))


def _loader_class():
    """``streamdata.loader.WindowLoader`` when installed, else None (older streamdata)."""
    try:
        from streamdata.loader import WindowLoader  # noqa: PLC0415 - optional stage
    except ImportError:
        return None
    return WindowLoader


@dataclass
class EvalData:
    """Tokens to evaluate plus what the metrics need to know about them.

    ``doc_offsets`` int64 [D+1] (a raw tensor is one document); ``doc_bytes``/``doc_words`` int64 [D]
    or None when unknown (raw tensors, imported stores): bits-per-byte and word perplexity are then
    reported as None, never estimated.
    """

    name: str
    kind: str  # "tensor" | "store"
    num_tokens: int
    doc_offsets: np.ndarray
    doc_bytes: np.ndarray | None = None
    doc_words: np.ndarray | None = None
    vocab_size: int | None = None  # the store tokenizer's vocabulary (ids are < this)
    tokenizer_sha256: str | None = None
    special_tokens: dict[str, Any] = field(default_factory=dict)
    store: Any = None
    tokens: torch.Tensor | None = None  # kind == "tensor": 1-D integer tensor (any device)
    _owns_store: bool = False

    @classmethod
    def from_tokens(cls, tokens: Any, doc_offsets: Any = None, doc_bytes: Any = None, doc_words: Any = None,
                    name: str = "the token tensor") -> "EvalData":
        """In-memory token ids with an optional document index and per-document UTF-8 byte/word
        counts (so byte and word metrics can be reported without a store)."""
        ed = open_data(tokens)
        n = ed.num_tokens
        if doc_offsets is not None:
            off = np.asarray(doc_offsets, dtype=np.int64)
            if off.ndim != 1 or len(off) < 1 or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 0):
                raise DataError(f"doc_offsets must be non-decreasing from 0 to the token count {n}: pass [0, ..., {n}]")
            ed.doc_offsets = off
        for attr, val in (("doc_bytes", doc_bytes), ("doc_words", doc_words)):
            if val is not None:
                arr = np.asarray(val, dtype=np.int64)
                if arr.shape != (ed.num_documents,):
                    raise DataError(f"{attr} has {arr.shape} entries, the data has {ed.num_documents} documents: pass one count per document")
                setattr(ed, attr, arr)
        ed.name = name
        return ed

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    def limit(self, max_tokens: int | None) -> int:
        return self.num_tokens if max_tokens is None else min(self.num_tokens, int(max_tokens))

    def document_lengths(self, max_tokens: int | None = None) -> np.ndarray:
        lim = self.limit(max_tokens)
        off = self.doc_offsets
        return np.clip(np.minimum(off[1:], lim) - off[:-1], 0, None)

    # ---- checks that run before any compute ----------------------------------------------
    def check_ids(self, vocab: int | None, max_tokens: int | None = None) -> None:
        """Raise DataError naming the first id outside ``[0, vocab)`` and its position.

        Stores whose tokenizer vocabulary fits the model's are not scanned: the writer checked every
        id against that vocabulary. Otherwise tokens are scanned in 16Mi blocks (host memory bound).
        """
        if vocab is None:
            return
        lim = self.limit(max_tokens)
        if self.kind == "store":
            if self.vocab_size is not None and self.vocab_size <= vocab:
                return
            for lo in range(0, lim, _SCAN_BLOCK):
                blk = self.store.read(lo, min(lim, lo + _SCAN_BLOCK))
                bad = np.flatnonzero(blk >= vocab)
                if len(bad):
                    i = int(bad[0])
                    raise DataError(_bad_id_message(int(blk[i]), lo + i, vocab, self.name))
            return
        t = self.tokens
        for lo in range(0, lim, _SCAN_BLOCK):
            blk = t[lo : min(lim, lo + _SCAN_BLOCK)]
            badmask = (blk >= vocab) | (blk < 0)
            if bool(badmask.any()):
                i = int(torch.nonzero(badmask)[0, 0])
                raise DataError(_bad_id_message(int(blk[i]), lo + i, vocab, self.name))

    # ---- windows -----------------------------------------------------------------------
    def windows(self, spec: WindowSpec, device: torch.device, backend: str = "auto"):
        """An iterable of :class:`WindowBatch` (with ``len()`` and ``plan``; call ``close()`` at the end).

        ``backend``: "auto" (stores: streamdata's WindowLoader when installed; tensors: in memory),
        "loader" or "fallback" (the in-memory implementation, also for stores: tests compare both).
        """
        if backend not in ("auto", "loader", "fallback"):
            raise ConfigError(f"backend={backend!r} must be auto, loader or fallback")
        if self.kind == "tensor":
            if backend == "loader":
                raise ConfigError("backend='loader' needs a store; tensors are windowed in memory")
            return _TensorWindows(self.tokens, self.doc_offsets, spec, device)
        loader = _loader_class() if backend != "fallback" else None
        if loader is None:
            if backend == "loader":
                raise ConfigError("backend='loader' but streamdata.loader is not installed: upgrade streamdata")
            return _StoreWindows(self.store, spec, device)
        return _LoaderWindows(loader, self.store, spec, device)

    def close(self) -> None:
        if self._owns_store and self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> "EvalData":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LoaderWindows:
    """Adapter over ``streamdata.loader.WindowLoader`` (its batches already have our fields)."""

    def __init__(self, loader_cls: Any, store: Any, spec: WindowSpec, device: torch.device):
        self.loader = loader_cls(
            store, chunk_size=spec.chunk_size, overlap=spec.overlap, mode=spec.doc_mode,
            batch_windows=spec.batch_windows, device=device, prepend_bos_id=spec.bos_id,
            max_tokens=spec.max_tokens,
        )
        self.plan = self.loader.plan

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


def _bad_id_message(tok: int, pos: int, vocab: int, name: str) -> str:
    return (
        f"token id {tok} at position {pos} of {name} is outside the model's vocabulary [0, {vocab}): "
        "the data was tokenized with another tokenizer; evaluate with the matching model or re-tokenize"
    )


def open_data(data: Any) -> EvalData:
    """Wrap ``data``: a 1-D integer tensor/array/list, a TokenStore, or a store folder path."""
    from streamdata.store import TokenStore, open_store

    if isinstance(data, EvalData):
        return data
    if isinstance(data, TokenStore):
        return _from_store(data, owns=False)
    if isinstance(data, (str, os.PathLike)):
        return _from_store(open_store(data), owns=True)
    if isinstance(data, np.ndarray) or isinstance(data, (list, tuple)):
        arr = np.asarray(data)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise DataError(f"token ids have dtype {arr.dtype}, not an integer type: pass integer token ids")
        if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8:
            arr = arr.astype(np.int64)
        data = torch.from_numpy(np.ascontiguousarray(arr))
    if isinstance(data, torch.Tensor):
        t = data
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1:
            raise DataError(f"token tensor has shape {tuple(data.shape)}: pass a 1-D tensor of token ids (or shape [1, N])")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise DataError(f"token tensor has dtype {t.dtype}, not an integer type: pass integer token ids (e.g. torch.long)")
        n = int(t.shape[0])
        return EvalData(name="the token tensor", kind="tensor", num_tokens=n,
                        doc_offsets=np.array([0, n], np.int64), tokens=t)
    raise DataError(f"cannot evaluate data of type {type(data).__name__}: pass a 1-D token tensor, a TokenStore or a store path")


def _from_store(store: Any, owns: bool) -> EvalData:
    m = store.manifest
    tok = m.tokenizer or {}
    off = np.asarray(store.doc_offsets, dtype=np.int64)
    db, dw = store.doc_bytes, store.doc_words
    return EvalData(
        name=f"store {store.path!r}", kind="store", num_tokens=len(store), doc_offsets=off,
        doc_bytes=None if db is None else np.asarray(db, np.int64),
        doc_words=None if dw is None else np.asarray(dw, np.int64),
        vocab_size=store.vocab_size, tokenizer_sha256=tok.get("sha256"),
        special_tokens=dict(m.special_tokens or {}), store=store, _owns_store=owns,
    )

