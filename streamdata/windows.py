"""Window plan: which token windows to read, and which of their targets to score (a pure function,
computed lazily a block of windows at a time, so its memory does not grow with the stream).

Semantics (exact; docs/design.md "Windows" states the same rules)
----------------------------------------------------------------
We score token *positions*, not windows. A stream of ``N`` tokens ``x[0..N)`` has the targets
``t in [1, N)``; target ``t`` is predicted from the logits at position ``t - 1`` and is scored
exactly once.

A window with ``chunk_size = L`` starting at ``s`` reads up to ``L + 1`` tokens: inputs
``x[s : s+L]``, targets ``x[s+1 : s+L+1]``. Window ``k`` of a stream starts at ``s_k = k * stride``
with ``stride = L - overlap``. Window 0 scores all its targets; every later window treats its first
``overlap`` targets as context only (they were scored by the window before) and scores the rest.
Windows continue until target ``N - 1`` is scored, so the number of windows of a stream is ``0`` if
``N < 2``, else ``1 + ceil(max(0, N - 1 - L) / stride)``, whatever the tail policy.

Tail policy (the last window of a stream that has >= 2 windows; a one-window stream is the same
under both):

- ``short`` (the transformers perplexity guide's): the last window starts at its stride multiple
  like the others and is shorter than ``L`` when the stream ends first; ``score_from = overlap``.
- ``full`` (lm-evaluation-harness's rolling windows; the default): the last window is
  right-aligned to the stream's end with a full ``L`` inputs, ``start = N - 1 - L``; the targets
  it shares with the window before are context only, so ``score_from`` is the index of its first
  target not scored yet: ``overlap + (s_short - (N - 1 - L))``, where ``s_short`` is the ``short``
  start (``score_from >= overlap``). It scores the same targets as the ``short`` tail, each with at
  least as much context, and costs nothing extra (the window count, hence the forwards, is the same).

Context: the target at index ``j`` of a window (global position ``s + 1 + j``) is predicted from the
``j + 1`` tokens ``x[s .. s+j]``. Window 0 therefore gives target ``t`` its full history (``t``
tokens); a later window gives each scored target at least ``overlap + 1`` and at most ``L`` tokens.

Worked example: ``N = 10, L = 4, overlap = 1`` (stride 3), tail ``short``::

    window  start  inputs      targets     score_from  scored targets
    0       0      x[0:4]      x[1:5]      0           1 2 3 4
    1       3      x[3:7]      x[4:8]      1           5 6 7        (target 4 is context only)
    2       6      x[6:9]      x[7:10]     1           8 9          (last window: length 3)

and tail ``full``: windows 0 and 1 are the same; the last one is right-aligned::

    2       5      x[5:9]      x[6:10]     2           8 9          (targets 6 7 are context only)

Every target 1..9 is scored once under both: ``num_scored == N - 1 == 9``; targets 8 and 9 see
3 and 4 tokens under ``full`` instead of 2 and 3.

Document mode (``doc_mode``)
----------------------------
``stream``: the whole store ``[0, N)`` is one stream; windows cross document boundaries; ``doc`` is -1.
``document``: every document ``[a, b)`` of the index is its own stream (no window crosses a
boundary); documents with fewer than 2 tokens have no targets and produce no windows.

``prepend_bos``: the stream (each document in ``document`` mode, the whole store in ``stream``
mode) is read as the virtual stream ``[BOS] + x``, so its first real token becomes a target, is
predicted from BOS alone and is scored (a 1-token document then gives one window of length 1).
Only the first window of each stream begins with the virtual BOS. Positions of that virtual stream
are mapped back to global offsets by ``global = a - 1 + virtual``, so a BOS window has
``start = a - 1`` (``-1`` for the first document) and ``bos = True``; the loader substitutes the BOS
id for the token at ``start``. Hence, in every window, target ``j`` is the stored token at global
position ``start + 1 + j``.

The plan knows only the document offsets, never the shard layout: it is shard-agnostic by design.

Memory (issue 18): a plan holds no per-window array. ``stream`` mode is arithmetic. ``document``
mode walks the (memory-mapped) document index once, ``pass_docs`` documents at a time (~6 ns per
document: 0.6 s for 10^8 measured here), and keeps only the window and target counts before every
``index_docs``-th document (16 bytes per 65,536 documents; both sizes: :class:`PlanBlocks`); :meth:`WindowPlan.block` finds a
window's document from there and recomputes that group of documents (~2 MB, the last two cached
for sequential reads). ``len()`` is O(1).
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from .errors import ConfigError

__all__ = ["DOC_MODES", "MODES", "TAILS", "PlanBlocks", "WindowBlock", "WindowPlan", "WindowSpec", "check_window_rules",
           "plan_windows"]

DOC_MODES = ("stream", "document")  # the store as one stream, or every document on its own
MODES = DOC_MODES  # deprecated: the old name of DOC_MODES ("mode" is the evaluator's sliding/stateful/kv-cache)
TAILS = ("full", "short")  # the last window of a stream: right-aligned with L inputs, or cut short


def _is_int(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


def check_window_rules(*, chunk_size: int | None, overlap: int = 0, doc_mode: str = "stream", tail: str = "full",
                       prepend_bos: bool = False, prepend_bos_id: int | None = None,
                       max_tokens: int | None = None) -> None:
    """The window rules, the one place they are checked: a one-line ConfigError naming the first
    offending value and the fix. :class:`WindowSpec` runs it on construction; a caller that does not
    know ``chunk_size`` yet (the evaluator's config: None means the model's context length) passes
    None to check the rest now, and builds the spec (which checks ``overlap < chunk_size``) once the
    chunk size is resolved."""
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ConfigError(f"chunk_size={chunk_size!r} must be an integer >= 1: pass e.g. chunk_size=1024")
    if not _is_int(overlap) or overlap < 0:
        raise ConfigError(f"overlap={overlap!r} must be an integer >= 0 (targets re-read as context): pass e.g. overlap=0")
    if chunk_size is not None and overlap >= chunk_size:
        raise ConfigError(
            f"overlap={overlap} must be smaller than chunk_size={chunk_size} (windows advance by "
            f"chunk_size - overlap): pass e.g. overlap={chunk_size // 2}"
        )
    if doc_mode not in DOC_MODES:
        raise ConfigError(f"doc_mode={doc_mode!r} is not known: pass one of {', '.join(repr(m) for m in DOC_MODES)}")
    if tail not in TAILS:
        raise ConfigError(f"tail={tail!r} is not known: pass one of {', '.join(repr(t) for t in TAILS)}")
    if not (isinstance(prepend_bos, (bool, np.bool_)) or _is_int(prepend_bos) and prepend_bos in (0, 1)):
        raise ConfigError(f"prepend_bos={prepend_bos!r} must be True or False: pass prepend_bos=True to prefix a BOS")
    if prepend_bos_id is not None and (not _is_int(prepend_bos_id) or prepend_bos_id < 0):
        raise ConfigError(f"prepend_bos_id={prepend_bos_id!r} must be an integer >= 0: pass the tokenizer's BOS id, or None")
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 0):
        raise ConfigError(f"max_tokens={max_tokens!r} must be an integer >= 0: pass None (whole store) or a token count")


@dataclass(frozen=True)
class WindowSpec:
    """How to cut a store into windows: the one validated description that the plan
    (:func:`plan_windows`), the loader (:class:`~streamdata.loader.WindowLoader`) and the evaluator
    take as it is. Checked once, on construction (:func:`check_window_rules`); frozen afterwards.

    - ``chunk_size`` L: inputs per window (>= 1); ``overlap``: targets each later window re-reads as
      context (``0 <= overlap < chunk_size``; windows advance by ``chunk_size - overlap``).
    - ``doc_mode``: ``"stream"`` (the store is one stream) or ``"document"`` (each document alone).
    - ``tail``: the last window of a stream, ``"full"`` (right-aligned, L inputs) or ``"short"``.
    - ``prepend_bos``: read each stream as ``[BOS] + x`` (its first token is scored);
      ``prepend_bos_id``: the id the loader puts there (setting it implies ``prepend_bos``; the
      plan needs only the flag, the loader needs the id).
    - ``max_tokens``: plan as if the store ended at this token (None: the whole store).

    Not window rules, so not here: how many windows go in one batch (the loader's
    ``batch_windows``), which model mode reads them (the evaluator's ``mode``).
    """

    chunk_size: int
    overlap: int = 0
    doc_mode: str = "stream"
    tail: str = "full"
    prepend_bos: bool = False
    prepend_bos_id: int | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        if self.chunk_size is None:
            raise ConfigError("chunk_size=None must be an integer >= 1 (a spec needs the window length): pass e.g. chunk_size=1024")
        check_window_rules(chunk_size=self.chunk_size, overlap=self.overlap, doc_mode=self.doc_mode, tail=self.tail,
                           prepend_bos=self.prepend_bos, prepend_bos_id=self.prepend_bos_id, max_tokens=self.max_tokens)
        # numpy integers and a BOS id without the flag are normalised once, so equal specs compare equal
        norm = {"chunk_size": int(self.chunk_size), "overlap": int(self.overlap),
                "prepend_bos": bool(self.prepend_bos) or self.prepend_bos_id is not None}
        if self.prepend_bos_id is not None:
            norm["prepend_bos_id"] = int(self.prepend_bos_id)
        if self.max_tokens is not None:
            norm["max_tokens"] = int(self.max_tokens)
        for k, v in norm.items():
            object.__setattr__(self, k, v)

    @property
    def stride(self) -> int:
        """Tokens between the starts of consecutive windows of a stream: ``chunk_size - overlap``."""
        return self.chunk_size - self.overlap


def _doc_mode_alias(doc_mode: str | None, mode: str | None, where: str) -> str:
    """``doc_mode``, or the deprecated ``mode=`` keyword it replaced (with a DeprecationWarning)."""
    if mode is None:
        return "stream" if doc_mode is None else doc_mode
    warnings.warn(f"{where}(mode=...) is deprecated: pass doc_mode={mode!r} ('mode' is the evaluator's "
                  "sliding/stateful/kv-cache)", DeprecationWarning, stacklevel=3)
    if doc_mode is not None and doc_mode != mode:
        raise ConfigError(f"mode={mode!r} and doc_mode={doc_mode!r} are both set: pass only doc_mode")
    return mode


@dataclass(frozen=True)
class PlanBlocks:
    """Block sizes that bound a plan's memory (not window rules: every value gives the same windows).

    - ``index_docs``: documents per entry of the sparse document index (its memory: 16 bytes per
      ``index_docs`` documents; :meth:`WindowPlan.block` recomputes up to one group of this many).
    - ``pass_docs``: documents per step of the counting pass (its temporaries: ~50 bytes per
      document of one step; rounded down to whole groups, at least one).

    The defaults are the library's; tests pass tiny ones so a small store crosses many groups."""

    index_docs: int = 1 << 16
    pass_docs: int = 1 << 18

    def __post_init__(self):
        for name in ("index_docs", "pass_docs"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1: pass e.g. PlanBlocks() for the defaults")
            object.__setattr__(self, name, int(v))


@dataclass(frozen=True)
class WindowBlock:
    """A contiguous block of windows, materialised (host numpy arrays of equal length).

    - ``start``: global token offset of the first token the window reads (for a BOS window: the
      virtual position ``doc_start - 1``, which the loader replaces by the BOS id). int64.
    - ``length``: number of input tokens, ``1..chunk_size``; the window reads ``length + 1`` tokens.
    - ``score_from``: index (within the window's targets) of the first scored target; targets
      ``score_from .. length - 1`` are scored, the ones before are context only.
    - ``doc``: document id (``document`` mode) or -1 (``stream`` mode).
    - ``bos``: bool, the window begins with a virtual BOS token.
    - ``first``: index of the block's window 0 in the full plan.
    """

    start: np.ndarray
    length: np.ndarray
    score_from: np.ndarray
    doc: np.ndarray
    bos: np.ndarray
    first: int = 0

    def __len__(self) -> int:
        return len(self.start)

    @property
    def stop(self) -> np.ndarray:
        """int64: one past the last global token each window reads (``start + length + 1``)."""
        return self.start + self.length + 1

    @property
    def scored_per_window(self) -> np.ndarray:
        """int64: targets each window scores (``length - score_from``, always >= 1)."""
        return self.length - self.score_from

    def __getitem__(self, sl: slice) -> "WindowBlock":
        """Windows ``sl`` of the block (views, no copy; ``first`` keeps the full-plan index)."""
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("WindowBlock supports only contiguous slices, e.g. block[10:20]")
        lo, hi, _ = sl.indices(len(self))
        hi = max(lo, hi)
        return WindowBlock(self.start[lo:hi], self.length[lo:hi], self.score_from[lo:hi], self.doc[lo:hi],
                           self.bos[lo:hi], self.first + lo)


class _Streams:
    """The streams of a plan and how many windows and targets precede each group of them.

    Stream ``i`` is ``[a_i, e_i)`` of the (max_tokens-cut) address space: the whole store with
    ``doc_mode`` ``stream`` (one stream), document ``i`` with ``document``. ``win[j]``/``sco[j]``:
    windows/scored targets of the streams before stream ``j * blocks.index_docs``; ``win[-1]`` is the
    plan's window count. Built by one blockwise pass; immutable afterwards (views share it)."""

    def __init__(self, off: Any, spec: WindowSpec, check: bool, blocks: PlanBlocks):
        L, O = spec.chunk_size, spec.overlap
        self.K, self.pass_docs = blocks.index_docs, blocks.pass_docs
        self.L, self.O, self.S, self.b, self.tail = L, O, L - O, 1 if spec.prepend_bos else 0, spec.tail
        self.stream_mode = spec.doc_mode == "stream"
        n_all = int(off[-1])
        self.cut = n_all if spec.max_tokens is None else min(n_all, spec.max_tokens)
        if self.stream_mode:
            self.off = np.array([0, self.cut], np.int64)
            if check:
                _check_monotonic(off, len(off) - 1, self.pass_docs)
        else:
            self.off = off
        self.nd = len(self.off) - 1
        # Streams from this one on start at or after the cut: they have no tokens, hence no windows.
        live = self.nd if self.cut >= n_all else int(np.searchsorted(off, self.cut, side="left"))
        live = min(live, self.nd)
        if check and not self.stream_mode:
            _check_monotonic(off, self.nd, self.pass_docs)  # every document, also those past the cut (bad input is bad input)
        K = self.K
        nblk = -(-self.nd // K) if self.nd else 0
        per_w = np.zeros(nblk, np.int64)  # windows of each group of K streams
        per_s = np.zeros(nblk, np.int64)  # scored targets of each group
        step = max(self.pass_docs // K, 1) * K  # whole groups per step of the pass
        for d0 in range(0, live, step):
            d1 = min(d0 + step, live)
            o = self._offsets(d0, d1)
            n = np.diff(o)
            heads = np.arange(0, d1 - d0, K)
            per_w[d0 // K : d0 // K + len(heads)] = np.add.reduceat(self._windows_per_stream(n), heads)
            # scored per stream: max(n + b - 1, 0), i.e. n with BOS, n - (n > 0) without
            sc = o[np.minimum(heads + K, d1 - d0)] - o[heads]
            if not self.b:
                sc -= np.add.reduceat(n > 0, heads, dtype=np.int64)
            per_s[d0 // K : d0 // K + len(heads)] = sc
        # (groups at or past `live` keep 0: their streams have no tokens before the cut)
        self.win = np.zeros(nblk + 1, np.int64)
        self.sco = np.zeros(nblk + 1, np.int64)
        np.cumsum(per_w, out=self.win[1:])
        np.cumsum(per_s, out=self.sco[1:])
        self.total_windows, self.total_scored = int(self.win[-1]), int(self.sco[-1])
        self._cache: dict[int, tuple] = {}
        # Views share this object across threads (a loader's reader threads, the caller asking
        # num_scored): the group cache is the one mutable part.
        self._lock = threading.Lock()

    def _offsets(self, d0: int, d1: int) -> np.ndarray:
        """Offsets of streams [d0, d1) and the end of the last, cut at max_tokens (int64 [d1 - d0 + 1])."""
        o = np.asarray(self.off[d0 : d1 + 1], dtype=np.int64)  # a view of a memory map: no copy
        return np.minimum(o, self.cut) if int(o[-1]) > self.cut else o

    def _windows_per_stream(self, n: np.ndarray) -> np.ndarray:
        """Windows of streams of ``n`` real tokens: 0 if ``v = n + BOS < 2``, else
        ``1 + ceil(max(0, v - 1 - L) / stride)`` (in place on one temporary: the pass's hot loop)."""
        t = n - (self.L + 1 - self.b)  # v - 1 - L
        np.maximum(t, 0, out=t)
        t += self.S - 1
        t //= self.S
        t += n >= 2 - self.b  # the first window (v >= 2); t is already 0 when v < 2
        return t

    def _counts(self, d0: int, d1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Windows, start and virtual length of streams [d0, d1) (int64 arrays)."""
        o = self._offsets(d0, d1)
        n = np.diff(o)
        return self._windows_per_stream(n), o[:-1], n + self.b

    def _group(self, j: int) -> tuple:
        """Group ``j`` of ``index_docs`` streams: (first stream, windows before each stream (local,
        [k+1]), starts, virtual lengths, windows per stream). The last two groups are cached."""
        with self._lock:
            g = self._cache.get(j)
        if g is None:
            d0 = j * self.K
            nw, a, v = self._counts(d0, min(d0 + self.K, self.nd))
            before = np.zeros(len(nw) + 1, np.int64)
            np.cumsum(nw, out=before[1:])
            g = (d0, before, a, v, nw)
            with self._lock:
                while len(self._cache) >= 2:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[j] = g
        return g

    def windows(self, g0: int, g1: int) -> WindowBlock:
        """Windows ``[g0, g1)`` of the full plan, materialised: O(g1 - g0 + index_docs) work."""
        parts = []
        g = g0
        while g < g1:
            j = int(np.searchsorted(self.win, g, side="right")) - 1  # the group holding window g
            d0, before, a, v, nw = self._group(j)
            e = min(g1, int(self.win[j + 1]))
            r = np.arange(g - int(self.win[j]), e - int(self.win[j]), dtype=np.int64)  # group-local window ids
            i = np.searchsorted(before, r, side="right") - 1  # group-local stream of each window
            parts.append(self._cut(r - before[i], a[i], v[i], nw[i], i + d0))
            g = e
        if not parts:
            z = np.zeros(0, np.int64)
            return WindowBlock(z, z, z, z, np.zeros(0, bool), g0)
        if len(parts) == 1:
            return WindowBlock(*parts[0], first=g0)
        return WindowBlock(*(np.concatenate(c) for c in zip(*parts)), first=g0)

    def _cut(self, k, a, v, nw, d) -> tuple:
        """The exact window semantics (module docstring), per window: ``k`` its index in its
        stream, ``a``/``v``/``nw`` its stream's start, virtual length and window count."""
        L, O = self.L, self.O
        vstart = k * self.S  # start within the virtual stream
        length = np.minimum(L, v - 1 - vstart)
        score_from = np.where(k == 0, 0, O).astype(np.int64)
        if self.tail == "full":
            # The last window of a stream with >= 2 windows ends where it did but starts L tokens before
            # the stream's last target; the targets it gains were scored by the window before, so they
            # become context: score_from grows by exactly the distance the start moved back.
            moved = np.where((k > 0) & (k == nw - 1), L - length, 0)
            vstart = vstart - moved
            length = length + moved
            score_from = score_from + moved
        start = a - self.b + vstart
        doc = np.full(len(k), -1, np.int64) if self.stream_mode else d.astype(np.int64, copy=False)
        bos = (k == 0) & bool(self.b)
        return start, length, score_from, doc, bos

    def scored_before(self, g: int) -> int:
        """Targets scored by windows ``[0, g)`` of the full plan."""
        if g >= self.total_windows:
            return self.total_scored
        j = int(np.searchsorted(self.win, g, side="right")) - 1
        d0, before, a, v, nw = self._group(j)
        r = g - int(self.win[j])
        i = int(np.searchsorted(before, r, side="right")) - 1
        k = r - int(before[i])
        sc = np.where(v[:i] >= 2, v[:i] - 1, 0).sum(dtype=np.int64)  # whole streams of the group before i
        # windows 0..k-1 of stream i are not its last: window 0 scores L, each later one the stride
        part = 0 if k == 0 else self.L + (k - 1) * self.S
        return int(self.sco[j]) + int(sc) + part


def _check_monotonic(off: Any, nd: int, step: int) -> None:
    """ConfigError unless ``off[0] == 0`` and ``off`` never decreases; ``step`` documents at a time (bounded memory)."""
    if int(off[0]) != 0:
        raise ConfigError("doc_offsets must start at 0 and be non-decreasing: pass the store's doc_offsets index")
    for d0 in range(0, nd, step):
        blk = np.asarray(off[d0 : d0 + step + 1])
        if np.any(blk[1:] < blk[:-1]):
            raise ConfigError("doc_offsets must start at 0 and be non-decreasing: pass the store's doc_offsets index")


class WindowPlan:
    """Windows in reading order (global token order), computed on demand.

    A plan is a view ``[first, first + len(plan))`` of the full plan of a store; slices and
    :meth:`shard` give views sharing the same lazily computed streams. Materialise windows with
    :meth:`block` (or iterate :meth:`blocks`); the array attributes ``start``, ``length``,
    ``score_from``, ``doc``, ``bos``, ``stop`` and ``scored_per_window`` materialise the *whole*
    view on first use and keep it (O(windows) memory: for small plans, tests and benchmarks, never
    for a stream of unknown length).
    """

    def __init__(self, streams: _Streams, spec: WindowSpec, first: int, count: int):
        self._streams = streams
        #: the validated window rules this plan follows (chunk_size, overlap, doc_mode, tail, BOS, max_tokens)
        self.spec = spec
        #: N: tokens of the (possibly max_tokens-truncated) address space
        self.num_tokens = streams.cut
        #: index of this plan's window 0 in the full plan (slices keep global indices)
        self.first = first
        self._count = count
        self._num_scored: int | None = None
        self._whole: WindowBlock | None = None  # the materialised view, once an array attribute is read

    def __len__(self) -> int:
        return self._count

    # The spec's fields, read through (one owner: the spec).
    chunk_size = property(lambda self: self.spec.chunk_size)
    overlap = property(lambda self: self.spec.overlap)
    doc_mode = property(lambda self: self.spec.doc_mode)
    prepend_bos = property(lambda self: self.spec.prepend_bos)
    tail = property(lambda self: self.spec.tail)

    @property
    def mode(self) -> str:
        """Deprecated name of :attr:`doc_mode`."""
        warnings.warn("WindowPlan.mode is deprecated: read WindowPlan.doc_mode", DeprecationWarning, stacklevel=2)
        return self.spec.doc_mode

    def __repr__(self) -> str:
        return (f"WindowPlan(chunk_size={self.chunk_size}, overlap={self.overlap}, doc_mode={self.doc_mode!r}, "
                f"prepend_bos={self.prepend_bos}, tail={self.tail!r}, num_tokens={self.num_tokens}, "
                f"first={self.first}, windows={self._count})")

    @property
    def stride(self) -> int:
        return self.spec.stride

    @property
    def full_windows(self) -> int:
        """Windows of the full plan (before slices and rank blocks)."""
        return self._streams.total_windows

    @property
    def num_scored(self) -> int:
        """Targets scored by this plan: ``N - 1`` for a whole stream (``N`` with BOS); in
        ``document`` mode the sum over documents of ``len - 1`` (``len`` with BOS) for docs that have windows."""
        if self._num_scored is None:
            s = self._streams
            self._num_scored = s.scored_before(self.first + self._count) - s.scored_before(self.first)
        return self._num_scored

    def block(self, lo: int, hi: int) -> WindowBlock:
        """Windows ``[lo, hi)`` of this plan (clipped to it), materialised; ``block.first`` is the
        full-plan index of its window 0. Costs O(hi - lo) plus at most one group of documents."""
        lo = min(max(int(lo), 0), self._count)
        hi = min(max(int(hi), lo), self._count)
        return self._streams.windows(self.first + lo, self.first + hi)

    def blocks(self, size: int) -> Iterator[WindowBlock]:
        """This plan's windows in order, ``size`` at a time."""
        for lo in range(0, self._count, max(int(size), 1)):
            yield self.block(lo, lo + size)

    def __getitem__(self, sl: slice) -> "WindowPlan":
        """A contiguous block of windows as a plan (``first`` keeps the global window index)."""
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("WindowPlan supports only contiguous slices, e.g. plan[10:20]")
        lo, hi, _ = sl.indices(self._count)
        hi = max(lo, hi)
        return WindowPlan(self._streams, self.spec, self.first + lo, hi - lo)

    def shard(self, rank: int, world_size: int) -> "WindowPlan":
        """Rank ``rank``'s contiguous block of windows out of ``world_size`` near-equal blocks.

        Blocks differ in size by at most one window; their union, in rank order, is the whole plan.
        """
        if world_size < 1:
            raise ConfigError(f"world_size={world_size} must be >= 1: pass the number of processes (e.g. torch.distributed.get_world_size())")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is outside [0, {world_size}): pass 0 <= rank < world_size")
        n = self._count
        return self[n * rank // world_size : n * (rank + 1) // world_size]

    # ---- the whole view, materialised (O(windows) memory: small plans and tests only) ------------
    def _all(self) -> WindowBlock:
        if self._whole is None:
            self._whole = self.block(0, self._count)
        return self._whole

    start = property(lambda self: self._all().start, doc="int64 [len(plan)]: see WindowBlock (materialises the plan)")
    length = property(lambda self: self._all().length, doc="int64 [len(plan)] (materialises the plan)")
    score_from = property(lambda self: self._all().score_from, doc="int64 [len(plan)] (materialises the plan)")
    doc = property(lambda self: self._all().doc, doc="int64 [len(plan)] (materialises the plan)")
    bos = property(lambda self: self._all().bos, doc="bool [len(plan)] (materialises the plan)")
    stop = property(lambda self: self._all().stop, doc="int64 [len(plan)]: start + length + 1 (materialises the plan)")
    scored_per_window = property(lambda self: self._all().scored_per_window,
                                 doc="int64 [len(plan)]: length - score_from (materialises the plan)")


def plan_windows(
    doc_offsets: Any,
    chunk_size: int | WindowSpec,
    overlap: int = 0,
    doc_mode: str | None = None,
    prepend_bos: bool = False,
    *,
    max_tokens: int | None = None,
    tail: str = "full",
    check: bool = True,
    mode: str | None = None,
    blocks: PlanBlocks | None = None,
) -> WindowPlan:
    """Plan the windows over a store whose document ``i`` is ``[doc_offsets[i], doc_offsets[i+1])``.

    The rules come as a :class:`WindowSpec` (``plan_windows(offsets, spec)``, taken as it is) or as
    its fields (``chunk_size``, ``overlap``, ``doc_mode`` (default ``"stream"``), ``prepend_bos``,
    ``max_tokens``, ``tail``), from which one is built. ``mode=`` is the deprecated name of
    ``doc_mode`` (a DeprecationWarning).

    ``doc_offsets``: int64 ``[num_documents + 1]`` (a memory map is read block by block, never
    copied whole), non-decreasing, ``doc_offsets[0] == 0``, ``doc_offsets[-1] == N``.
    ``max_tokens``: plan as if the store ended at token ``max_tokens`` (every document is cut
    there), so no target at a global position ``>= max_tokens`` is read.
    ``tail``: ``"full"`` (the last window of a stream right-aligned with ``chunk_size`` inputs) or
    ``"short"`` (cut short at the stream's end).
    ``check``: verify that the offsets never decrease (a pass over them; a store's index was
    checked when it was opened, so the loader skips it).
    ``blocks``: the block sizes that bound the plan's memory (:class:`PlanBlocks`; None: the defaults).
    See the module docstring for the exact semantics. Stream mode costs O(1); document mode one
    blockwise pass over the offsets (numpy, ~6 ns per document), O(documents / 65536) memory.
    """
    if isinstance(chunk_size, WindowSpec):
        spec = chunk_size
        if (overlap, doc_mode, prepend_bos, max_tokens, tail, mode) != (0, None, False, None, "full", None):
            raise ConfigError("plan_windows got a WindowSpec and window arguments: pass the spec alone "
                              "(dataclasses.replace(spec, ...) changes a field)")
    else:
        spec = WindowSpec(chunk_size, overlap, _doc_mode_alias(doc_mode, mode, "plan_windows"), tail,
                          prepend_bos=prepend_bos, max_tokens=max_tokens)
    off = doc_offsets
    if not isinstance(off, np.ndarray):
        off = np.asarray(off)
    if off.ndim != 1 or len(off) < 1 or off.dtype.kind not in "iu":
        raise ConfigError(f"doc_offsets has dtype {off.dtype} shape {off.shape}: pass an int64 array [num_documents + 1]")
    if int(off[0]) != 0:
        raise ConfigError("doc_offsets must start at 0 and be non-decreasing: pass the store's doc_offsets index")
    if blocks is None:
        blocks = PlanBlocks()
    elif not isinstance(blocks, PlanBlocks):
        raise ConfigError(f"blocks={blocks!r} is not a PlanBlocks: pass streamdata.windows.PlanBlocks(index_docs=..., pass_docs=...)")
    streams = _Streams(off, spec, check, blocks)
    return WindowPlan(streams, spec, 0, streams.total_windows)
