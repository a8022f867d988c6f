"""Window plan: which token windows to read, and which of their targets to score (a pure function).

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

Modes
-----
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
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import ConfigError

__all__ = ["MODES", "TAILS", "WindowPlan", "plan_windows"]

MODES = ("stream", "document")
TAILS = ("full", "short")  # the last window of a stream: right-aligned with L inputs, or cut short


@dataclass(frozen=True)
class WindowPlan:
    """Windows in reading order (global token order). All arrays are int64 (``bos``: bool), length ``len(plan)``.

    - ``start``: global token offset of the first token the window reads (for a BOS window: the
      virtual position ``doc_start - 1``, which the loader replaces by the BOS id).
    - ``length``: number of input tokens, ``1..chunk_size``; the window reads ``length + 1`` tokens.
    - ``score_from``: index (within the window's targets) of the first scored target; targets
      ``score_from .. length - 1`` are scored, the ones before are context only.
    - ``doc``: document id (``document`` mode) or -1 (``stream`` mode).
    - ``bos``: the window begins with a virtual BOS token.
    - ``first``: index of this plan's window 0 in the full plan (slices keep global indices).
    """

    start: np.ndarray
    length: np.ndarray
    score_from: np.ndarray
    doc: np.ndarray
    bos: np.ndarray
    chunk_size: int
    overlap: int
    mode: str
    prepend_bos: bool
    num_tokens: int  # N: tokens of the (possibly max_tokens-truncated) address space
    tail: str = "full"  # the tail policy the plan was made with (see the module docstring)
    first: int = 0
    _num_scored: int | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.start)

    @property
    def stride(self) -> int:
        return self.chunk_size - self.overlap

    @property
    def scored_per_window(self) -> np.ndarray:
        """int64 ``[len(plan)]``: targets each window scores (``length - score_from``, always >= 1)."""
        return self.length - self.score_from

    @property
    def num_scored(self) -> int:
        """Targets scored by this plan: ``N - 1`` for a whole stream (``N`` with BOS); in
        ``document`` mode the sum over documents of ``len - 1`` (``len`` with BOS) for docs that have windows."""
        if self._num_scored is None:
            object.__setattr__(self, "_num_scored", int(self.scored_per_window.sum()))
        return self._num_scored

    @property
    def stop(self) -> np.ndarray:
        """int64 ``[len(plan)]``: one past the last global token each window reads (``start + length + 1``)."""
        return self.start + self.length + 1

    def __getitem__(self, sl: slice) -> "WindowPlan":
        """A contiguous block of windows as a plan (``first`` keeps the global window index)."""
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            raise TypeError("WindowPlan supports only contiguous slices, e.g. plan[10:20]")
        lo, hi, _ = sl.indices(len(self))
        hi = max(lo, hi)
        return replace(
            self, start=self.start[lo:hi], length=self.length[lo:hi], score_from=self.score_from[lo:hi],
            doc=self.doc[lo:hi], bos=self.bos[lo:hi], first=self.first + lo, _num_scored=None,
        )

    def shard(self, rank: int, world_size: int) -> "WindowPlan":
        """Rank ``rank``'s contiguous block of windows out of ``world_size`` near-equal blocks.

        Blocks differ in size by at most one window; their union, in rank order, is the whole plan.
        """
        if world_size < 1:
            raise ConfigError(f"world_size={world_size} must be >= 1: pass the number of processes (e.g. torch.distributed.get_world_size())")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank={rank} is outside [0, {world_size}): pass 0 <= rank < world_size")
        n = len(self)
        return self[n * rank // world_size : n * (rank + 1) // world_size]


def _check_config(chunk_size: int, overlap: int, mode: str, tail: str) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r} must be an integer >= 1: pass e.g. chunk_size=1024")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < chunk_size:
        raise ConfigError(
            f"overlap={overlap!r} must be an integer in [0, chunk_size={chunk_size}): pass e.g. overlap={chunk_size // 2}"
        )
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is not known: pass one of {', '.join(repr(m) for m in MODES)}")
    if tail not in TAILS:
        raise ConfigError(f"tail={tail!r} is not known: pass one of {', '.join(repr(t) for t in TAILS)}")


def plan_windows(
    doc_offsets: np.ndarray,
    chunk_size: int,
    overlap: int = 0,
    mode: str = "stream",
    prepend_bos: bool = False,
    *,
    max_tokens: int | None = None,
    tail: str = "full",
) -> WindowPlan:
    """Plan the windows over a store whose document ``i`` is ``[doc_offsets[i], doc_offsets[i+1])``.

    ``doc_offsets``: int64 ``[num_documents + 1]``, non-decreasing, ``doc_offsets[0] == 0``,
    ``doc_offsets[-1] == N``. ``max_tokens``: plan as if the store ended at token ``max_tokens``
    (every document is cut there), so no target at a global position ``>= max_tokens`` is read.
    ``tail``: ``"full"`` (the last window of a stream right-aligned with ``chunk_size`` inputs) or
    ``"short"`` (cut short at the stream's end).
    See the module docstring for the exact semantics. Vectorised: O(windows + documents) numpy work.
    """
    _check_config(chunk_size, overlap, mode, tail)
    L, O = int(chunk_size), int(overlap)
    stride = L - O
    off = np.asarray(doc_offsets)
    if off.ndim != 1 or len(off) < 1 or off.dtype.kind not in "iu":
        raise ConfigError(f"doc_offsets has dtype {off.dtype} shape {off.shape}: pass an int64 array [num_documents + 1]")
    off = off.astype(np.int64, copy=False)
    if off[0] != 0 or (len(off) > 1 and np.any(off[1:] < off[:-1])):
        raise ConfigError("doc_offsets must start at 0 and be non-decreasing: pass the store's doc_offsets index")
    if max_tokens is not None:
        if max_tokens < 0:
            raise ConfigError(f"max_tokens={max_tokens} is negative: pass None (whole store) or a token count >= 0")
        off = np.minimum(off, int(max_tokens))
    n_tok = int(off[-1])

    bos_shift = 1 if prepend_bos else 0
    if mode == "stream":
        a = np.zeros(1, np.int64)  # stream starts
        n = np.array([n_tok], np.int64)  # stream lengths (real tokens)
        doc_of_stream = np.full(1, -1, np.int64)
    else:
        a = off[:-1]
        n = np.diff(off)
        doc_of_stream = np.arange(len(n), dtype=np.int64)
    v = n + bos_shift  # virtual stream length ([BOS] + tokens)
    # Windows per stream: 0 if v < 2, else 1 + ceil(max(0, v - 1 - L) / stride).
    nw = np.where(v >= 2, 1 + -(-np.maximum(v - 1 - L, 0) // stride), 0)
    total = int(nw.sum())
    has = nw > 0
    nw_h, a_h, v_h, d_h = nw[has], a[has], v[has], doc_of_stream[has]
    # k: index of each window within its stream (0, 1, ... per stream), without a Python loop.
    firsts = np.zeros(len(nw_h), np.int64)
    if len(nw_h) > 1:
        np.cumsum(nw_h[:-1], out=firsts[1:])
    k = np.arange(total, dtype=np.int64) - np.repeat(firsts, nw_h)
    vstart = k * stride  # start within the virtual stream
    vlen = np.repeat(v_h, nw_h)
    length = np.minimum(L, vlen - 1 - vstart)
    score_from = np.where(k == 0, 0, O).astype(np.int64)
    if tail == "full":
        # The last window of a stream with >= 2 windows ends where it did but starts L tokens before
        # the stream's last target; the targets it gains were scored by the window before, so they
        # become context: score_from grows by exactly the distance the start moved back.
        last = (k > 0) & (k == np.repeat(nw_h, nw_h) - 1)
        moved = np.where(last, L - length, 0)
        vstart -= moved
        length += moved
        score_from += moved
    start = np.repeat(a_h, nw_h) - bos_shift + vstart
    bos = (k == 0) & bool(prepend_bos)
    doc = np.repeat(d_h, nw_h)
    return WindowPlan(
        start=start, length=length, score_from=score_from, doc=doc, bos=bos,
        chunk_size=L, overlap=O, mode=mode, prepend_bos=bool(prepend_bos), num_tokens=n_tok, tail=tail,
    )
