"""Window loader: stream planned windows out of a token store into device tensors, in bounded memory.

Data path (the rules: docs/design.md "Loader")::

    store shards --read_into--> host slot (store dtype: uint16/uint32, pinned on CUDA; a ring
    of ``num_slots`` allocated once) --non_blocking copy on a side CUDA stream--> device slot
    --widen to int64 + one gather (index arithmetic) on the consumer's stream--> WindowBatch

One batch = ``B`` consecutive windows of the plan (:mod:`streamdata.windows`). The reader thread
reads the *union span* of the batch's windows ``[lo, hi)`` once, so tokens shared by overlapping
windows (and the one token shared by adjacent windows without overlap) cross the link once; the
windows are cut from the span on the device. Every target of the plan appears in exactly one
batch with ``score_mask`` True, with the context the plan gives it.

Synchronisation on CUDA (no host sync in the consumer's loop):
- the producer copies slot ``i`` on the side stream and records ``copied[i]``; the consumer's
  current stream waits on ``copied[i]`` (``wait_event``: a device-side dependency, no CPU block);
- after the consumer has enqueued its reads of device slot ``i`` it records ``consumed[i]`` and
  returns the slot; before copying into it again the side stream waits on ``consumed[i]``, and the
  producer (a background thread, so blocking there is fine) waits on ``copied[i]`` before it
  overwrites host slot ``i`` (the DMA engine may still be reading it).

On CPU there is no link: the reader thread also widens and cuts each batch with numpy, so the
consumer only dequeues finished batches (up to ``num_slots`` wait). For back-to-back full windows on a numpy
store the span is read straight into the int64 array that inputs and targets view: one pass.

Memory stays bounded for stores larger than RAM: the reader calls ``store.release`` behind its
cursor (numpy backend: ``madvise(DONTNEED)`` + ``posix_fadvise(DONTNEED)``) and ``store.prefetch``
ahead of it. Batch tensors are fresh allocations (never views of the ring), so a consumer may keep
them as long as it likes. Nothing grows with the stream's length either: the plan is lazy
(:mod:`streamdata.windows`), the reader tabulates ``table_windows`` windows at a time
(:class:`LoaderTuning`), and the document index is the store's own (memory-mapped for npy stores),
read a batch's span at a time.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from .errors import ConfigError, StoreError, brief
from .backends import TokenStore, open_store
from .backends.base import find_id_over
from .windows import PlanBlocks, WindowBlock, WindowPlan, WindowSpec, _doc_mode_alias, plan_windows

__all__ = ["LoaderTuning", "WindowBatch", "WindowLoader", "resolve_device"]

_THREAD_NAME = "streamdata-loader"
_DEFAULT_BATCH_TOKENS = 1 << 16
# Same-width signed torch dtype carrying the unsigned store ids as bit patterns (torch's uint16/32
# support is partial across versions and devices; int16/int32 copy everywhere and we mask on widening).
_BITS_DTYPE = {np.dtype("<u2"): torch.int16, np.dtype("<u4"): torch.int32}
_UNSIGNED_MASK = {np.dtype("<u2"): 0xFFFF, np.dtype("<u4"): 0xFFFFFFFF}


@dataclass(eq=False)
class WindowBatch:
    """``B`` consecutive windows of the plan, as tensors on the loader's device.

    - ``inputs``, ``targets``: int64 ``[B, L]``; window ``b`` has ``lengths[b]`` real tokens, and both
      are right-padded with 0. ``targets[b, j]`` is the token at global position ``start + 1 + j``.
      Treat them as read-only views: when every window of the batch is full-length (no padding),
      both view one buffer, which saves copies: without overlap, the span itself (contiguous);
      with overlap, a ``[B, L+1]`` array of the windows' tokens (row stride ``L + 1``, so not
      ``is_contiguous()``: use ``reshape``, not ``view``, to flatten them).
    - ``score_mask``: bool ``[B, L]``; True exactly for the targets to score (each target of the
      plan is True in exactly one batch of one rank).
    - ``lengths``: int64 ``[B]``.
    - ``doc_ids``, ``positions`` (computed on first access, on the current stream, then cached):
      int64 ``[B, L]``, the document id of each target and its 0-based position in that document
      (counted from the document's first stored token); -1 on padding.
    - ``first_window``, ``num_windows``, ``num_scored``: host ints from the plan (no device sync).
      ``first_window`` is the index of window 0 of this batch in the full plan (before ``start_at``
      and rank blocks), so ``first_window + num_windows`` is a valid ``start_at`` to resume after it.
    - ``windows``: the batch's windows of the plan as host numpy arrays (a
      :class:`~streamdata.windows.WindowBlock`: ``start``, ``length``, ``score_from``, ``doc``,
      ``bos``, ``first == first_window``), so consumers need no whole-plan array.
    - ``doc_range``: ``(first, last)`` document ids that the batch's span touches, host ints (no
      sync): every ``doc_ids`` entry of a target lies in it (the evaluator sizes its per-document
      block from it).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    score_mask: torch.Tensor
    lengths: torch.Tensor
    first_window: int
    num_windows: int
    num_scored: int
    windows: WindowBlock
    # Lazy doc/position state (numpy on CPU, tensors on CUDA): each window's start relative to
    # ``_lo`` ([B] int64), the global start offsets of the documents d0..d1 that the batch's span
    # touches ([k] int64), and d0.
    _rel: Any = field(repr=False)
    _lo: int = field(repr=False)
    _doc_starts: Any = field(repr=False)
    _d0: int = field(repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.inputs.shape[0]

    @property
    def doc_range(self) -> tuple[int, int]:
        return self._d0, self._d0 + len(self._doc_starts) - 1

    def _docs(self) -> tuple[torch.Tensor, torch.Tensor]:
        if "doc" in self._cache:
            return self._cache["doc"], self._cache["pos"]
        L = self.inputs.shape[1]
        # The target's document is the last one starting at or before it (documents are sorted;
        # side="right" skips empty documents that share its start).
        if isinstance(self._rel, np.ndarray):  # CPU: numpy (single-threaded kernels, see _cut_host)
            j = np.arange(L)
            pos = (self._rel + (self._lo + 1))[:, None] + j  # global position of each target
            valid = j < self.lengths.numpy()[:, None]
            local = np.maximum(np.searchsorted(self._doc_starts, pos, side="right") - 1, 0)
            doc = torch.from_numpy(np.where(valid, local + self._d0, -1))
            within = torch.from_numpy(np.where(valid, pos - self._doc_starts[local], -1))
        else:
            j = torch.arange(L, device=self.inputs.device)
            pos = (self._rel + (self._lo + 1))[:, None] + j
            valid = j < self.lengths[:, None]
            local = torch.searchsorted(self._doc_starts, pos, right=True).sub_(1).clamp_(min=0)
            doc = torch.where(valid, local + self._d0, -1)
            within = torch.where(valid, pos - self._doc_starts[local], -1)
        self._cache["doc"], self._cache["pos"] = doc, within
        return doc, within

    @property
    def doc_ids(self) -> torch.Tensor:
        return self._docs()[0]

    @property
    def positions(self) -> torch.Tensor:
        return self._docs()[1]


@dataclass(frozen=True)
class _Batches:
    """Host-side table of a run of consecutive batches, vectorised once over their windows ``win``
    (a block of the loader's plan that starts at a batch boundary; ``w0``/``w1`` index into it).

    Held as Python lists: the reader indexes them once per batch, and ``list[b]`` is far cheaper
    than ``int(ndarray[b])``."""

    win: WindowBlock
    w0: list  # first window (index into win)
    w1: list  # one past the last window
    lo: list  # span [lo, hi) of global tokens the batch reads (lo >= 0; a BOS window's virtual token is not read)
    hi: list
    d0: list  # documents d0..d1 intersect the span
    d1: list
    uniform: list  # full-length windows, no BOS, evenly spaced by the stride (fast cut)
    any_bos: list
    scored: list  # targets scored per batch
    max_span: int
    max_meta: int  # int64 metadata words per batch: 4 per window + document starts

    @classmethod
    def build(cls, win: WindowBlock, B: int, doc_offsets: np.ndarray, L: int, O: int) -> "_Batches":
        W = len(win)
        if W == 0:
            return cls(win, [], [], [], [], [], [], [], [], [], 1, 1)
        start, stop = win.start, win.stop
        w0 = np.arange(0, W, B, dtype=np.int64)
        w1 = np.minimum(w0 + B, W)
        lo = np.maximum(np.minimum.reduceat(start, w0), 0)
        hi = np.maximum.reduceat(stop, w0)
        d0 = np.searchsorted(doc_offsets, lo, side="right") - 1
        d1 = np.searchsorted(doc_offsets, hi - 1, side="right") - 1
        # (a right-aligned tail window is full-length but scores from past the overlap: not uniform)
        full = (win.length == L) & ~win.bos & (win.score_from <= O)
        partial = np.add.reduceat((~full).astype(np.int64), w0)
        bad_step = np.zeros(W, np.int64)
        np.cumsum(np.diff(start) != L - O, out=bad_step[1:])
        uniform = (partial == 0) & (bad_step[w1 - 1] == bad_step[w0])
        any_bos = np.add.reduceat(win.bos.astype(np.int64), w0) > 0
        scored = np.add.reduceat(win.scored_per_window, w0)
        meta = 4 * (w1 - w0) + (d1 - d0 + 1)
        return cls(win, w0.tolist(), w1.tolist(), lo.tolist(), hi.tolist(), d0.tolist(), d1.tolist(), uniform.tolist(),
                   any_bos.tolist(), scored.tolist(), int((hi - lo).max()), int(meta.max()))

    def __len__(self) -> int:
        return len(self.w0)


def resolve_device(spec: Any, kinds: tuple[str, ...] | None = None) -> torch.device:
    """``None`` -> ``cuda:N`` (the current device) when CUDA is available, else cpu. A device that is
    not there, or (with ``kinds``) of another type, is a ConfigError naming it. The one resolver of
    the project: the loader takes cpu/cuda, the evaluator any device torch can use."""
    if spec is None:
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device={spec!r} is not a device name ({str(e).splitlines()[0]}): pass 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={spec!r} is not available (no CUDA device or no CUDA build of torch): pass device='cpu' or leave device unset")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device={spec!r} is not available (this machine has {n} CUDA device(s): cuda:0..cuda:{n - 1})")
        if dev.index is None:
            # Always an explicit index: streams, events and memory queries then name one device
            # instead of whichever is current in the calling thread.
            dev = torch.device("cuda", torch.cuda.current_device())
    elif kinds is not None and dev.type not in kinds:
        raise ConfigError(f"device={spec!r} is not supported here: pass one of {', '.join(repr(k) for k in kinds)} "
                          "(cuda as 'cuda' or 'cuda:N')")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device={spec!r} is not available (no Apple MPS backend here): pass device='cpu' or leave device unset")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:  # noqa: BLE001 - any backend failure means "not usable here"
            raise ConfigError(f"device={spec!r} is not available ({brief(e, 120)}): pass device='cpu' or leave device unset") from None
    return dev


def _check_int(name: str, value: Any, lo: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ConfigError(f"{name}={value!r} must be an integer >= {lo}: {fix}")
    return int(value)


@dataclass(frozen=True)
class LoaderTuning:
    """Block sizes and the time-out of the loader's reader thread. Not window rules: every value
    gives the same batches. The defaults are the library's; tests pass tiny ones (many tables, a
    hint per batch, a short wait for a hung reader).

    - ``table_windows``: windows per host-side batch table (rounded down to whole batches, at least
      one batch): the reader plans and tabulates this many at a time, so its memory does not grow
      with the stream (~100 bytes per window).
    - ``hint_tokens``: the reader hints the kernel (``store.prefetch`` ahead, ``store.release``
      behind) in steps of at least this many tokens: one madvise/fadvise pair per step instead of
      one per batch (a syscall each, and the page cache works in pages anyway).
    - ``join_timeout_s``: seconds ``close()`` waits for a reader thread to exit (a store read can
      block, e.g. on a network FS); after it, a RuntimeWarning, and the thread's ring is abandoned.
    - ``plan_blocks``: the plan's block sizes (:class:`~streamdata.windows.PlanBlocks`).
    """

    table_windows: int = 1 << 15
    hint_tokens: int = 1 << 22
    join_timeout_s: float = 60.0
    plan_blocks: PlanBlocks = PlanBlocks()

    def __post_init__(self):
        fix = "pass e.g. LoaderTuning() for the defaults"
        object.__setattr__(self, "table_windows", _check_int("table_windows", self.table_windows, 1, fix))
        object.__setattr__(self, "hint_tokens", _check_int("hint_tokens", self.hint_tokens, 1, fix))
        t = self.join_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
            raise ConfigError(f"join_timeout_s={t!r} must be a number of seconds > 0: {fix}")
        if not isinstance(self.plan_blocks, PlanBlocks):
            raise ConfigError(f"plan_blocks={self.plan_blocks!r} is not a PlanBlocks: pass streamdata.windows.PlanBlocks(...)")


class _ClosesOnExit:
    """``with`` support and close-on-collection for objects that own a reader thread or a store.
    Subclasses define ``close()``; it must be idempotent (``__del__`` calls it again)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing useful to do
            pass


class WindowLoader(_ClosesOnExit):
    """Iterate the windows of a store as :class:`WindowBatch` es on a device. See the module docstring.

    ``store``: an open :class:`TokenStore` (not closed by the loader) or a path (opened and owned).
    ``spec``: the window rules, a :class:`~streamdata.windows.WindowSpec` taken as it is; or, instead
    of a spec, its fields ``chunk_size``/``overlap``/``doc_mode``/``prepend_bos_id``/``tail``/``max_tokens``
    (:func:`plan_windows`; a BOS id turns on ``prepend_bos`` and is the id substituted for the
    virtual BOS token; ``tail="full"`` right-aligns each stream's last window, ``"short"`` cuts it).
    ``mode=`` is the deprecated name of ``doc_mode`` (a DeprecationWarning).
    ``batch_windows`` or ``batch_tokens`` (not both): windows per batch ``B``, or a budget of padded
    tokens per batch, ``B = batch_tokens // chunk_size`` (tensors are always ``[B, chunk_size]``;
    default ``B = max(1, 65536 // chunk_size)``). The last batch may hold fewer windows.
    ``device``: None picks CUDA when available, else CPU.
    ``start_at``: index of the first window of the full plan to load (resume after a batch with
    ``batch.first_window + batch.num_windows``); the windows from there are split into
    ``world_size`` contiguous blocks and this loader yields block ``rank``. ``stop_at``: one past the
    last window of the full plan to load (None: its end); a rank that owns an explicit block (the
    evaluator's document-balanced split) resumes with ``start_at``/``stop_at``. ``plan`` is that block
    (a lazy :class:`~streamdata.windows.WindowPlan`); ``plan.first`` is the full-plan index of its
    window 0, ``full_plan_windows`` the full plan's window count. Each batch carries its own
    windows (``batch.windows``).
    ``max_tokens`` (a spec field): plan as if the store ended there (no target at a position >= it is loaded).
    ``vocab_size``: when given, the reader checks every span it reads and raises StoreError naming
    the first id ``>= vocab_size`` and its position, before that batch reaches a model (an
    embedding lookup with such an id is an IndexError on CPU and a device-side assert that kills
    the CUDA context). Costs one max() per span on the reader thread.
    ``num_slots``: ring slots / batches read ahead. ``release_behind``: drop the store's pages
    behind the read cursor (bounded memory on stores larger than RAM; pass False to keep a small
    store in the page cache across repeated passes).
    ``tuning``: the reader's block sizes and time-out (:class:`LoaderTuning`; None: the defaults).
    """

    def __init__(
        self,
        store: TokenStore | str | os.PathLike,
        spec: WindowSpec | None = None,
        *,
        chunk_size: int | None = None,
        overlap: int = 0,
        doc_mode: str | None = None,
        batch_windows: int | None = None,
        batch_tokens: int | None = None,
        device: Any = None,
        start_at: int = 0,
        stop_at: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        prepend_bos_id: int | None = None,
        num_slots: int = 4,
        release_behind: bool = True,
        max_tokens: int | None = None,
        vocab_size: int | None = None,
        tail: str = "full",
        mode: str | None = None,
        tuning: LoaderTuning | None = None,
    ):
        # The window rules first (before a store is opened): a spec taken as it is, or one built from its fields.
        if spec is None:
            spec = WindowSpec(chunk_size, overlap, _doc_mode_alias(doc_mode, mode, "WindowLoader"), tail,
                              prepend_bos_id=prepend_bos_id, max_tokens=max_tokens)
        elif (chunk_size, overlap, doc_mode, prepend_bos_id, max_tokens, tail, mode) != (None, 0, None, None, None, "full", None):
            raise ConfigError("WindowLoader got a WindowSpec and window arguments: pass the spec alone "
                              "(dataclasses.replace(spec, ...) changes a field)")
        elif not isinstance(spec, WindowSpec):
            raise ConfigError(f"spec={spec!r} is not a WindowSpec: pass streamdata.WindowSpec(chunk_size=..., ...)")
        if spec.prepend_bos and spec.prepend_bos_id is None:
            raise ConfigError("the spec has prepend_bos=True but no prepend_bos_id: pass the tokenizer's BOS id "
                              "(the loader puts it before each stream)")
        if tuning is None:
            tuning = LoaderTuning()
        elif not isinstance(tuning, LoaderTuning):
            raise ConfigError(f"tuning={tuning!r} is not a LoaderTuning: pass streamdata.loader.LoaderTuning(...), or None")
        #: the reader's block sizes and time-out
        self.tuning = tuning
        self._owns_store = not isinstance(store, TokenStore)
        self.store = open_store(store) if self._owns_store else store
        try:
            self._setup(spec, batch_windows, batch_tokens, device, (start_at, stop_at), rank, world_size,
                        num_slots, release_behind, vocab_size)
        except BaseException:
            self.close()
            raise

    def _setup(self, spec, batch_windows, batch_tokens, device, start_at, rank, world_size,
               num_slots, release_behind, vocab_size) -> None:
        self.device = resolve_device(device, kinds=("cpu", "cuda"))
        if vocab_size is not None:
            vocab_size = _check_int("vocab_size", vocab_size, 1, "pass the model's vocabulary size, or None")
        #: ids >= this are refused by the reader (None: not checked)
        self.vocab_size = vocab_size
        #: the window rules (taken as given; the plan follows them)
        self.spec = spec
        self.num_slots = _check_int("num_slots", num_slots, 2, "pass num_slots >= 2 (one being filled, one being consumed)")
        # The store's own index (memory-mapped for npy stores; checked when the store was opened, so
        # the plan skips its monotonicity pass). The plan and the reader read it block by block.
        offsets = self.store.doc_offsets
        full = plan_windows(offsets, spec, check=False, blocks=self.tuning.plan_blocks)
        if batch_windows is not None and batch_tokens is not None:
            raise ConfigError(f"batch_windows={batch_windows} and batch_tokens={batch_tokens} are both set: pass only one")
        if batch_windows is not None:
            B = _check_int("batch_windows", batch_windows, 1, "pass the number of windows per batch, e.g. 8")
        elif batch_tokens is None:
            B = max(1, _DEFAULT_BATCH_TOKENS // full.chunk_size)
        else:
            budget = _check_int("batch_tokens", batch_tokens, 1, "pass a token budget per batch, e.g. 65536")
            if budget < full.chunk_size:
                raise ConfigError(
                    f"batch_tokens={budget} is less than one window (chunk_size={full.chunk_size}): "
                    f"pass batch_tokens >= {full.chunk_size} or use batch_windows"
                )
            B = budget // full.chunk_size
        start_at, stop_at = start_at
        start_at = _check_int("start_at", start_at, 0, "pass the index of the first window to load (0 = start)")
        if start_at > len(full):
            raise ConfigError(f"start_at={start_at} is past the plan's {len(full)} windows: pass 0 <= start_at <= {len(full)}")
        if stop_at is not None:
            stop_at = _check_int("stop_at", stop_at, start_at, f"pass start_at={start_at} <= stop_at <= {len(full)}, or None")
            if stop_at > len(full):
                raise ConfigError(f"stop_at={stop_at} is past the plan's {len(full)} windows: pass stop_at <= {len(full)}, or None")
        self.full_plan_windows = len(full)
        #: This loader's windows: the full plan from ``start_at`` (to ``stop_at``), then rank ``rank``'s block.
        self.plan: WindowPlan = full[start_at:stop_at].shard(rank, world_size)
        self.batch_windows = B
        self.bos_id = spec.prepend_bos_id
        self.release_behind = bool(release_behind)
        self._offsets = offsets
        self._num_batches = -(-len(self.plan) // B)
        # Ring slot sizes. B consecutive windows of one stream span (B-1)*stride + L + 1 tokens; a
        # batch may span more (documents too short to have a window lie between its windows) and
        # touch any number of documents: the reader then grows the slot (rare, see _Ring.ensure).
        L, O = full.chunk_size, full.overlap
        span = (B - 1) * (L - O) + L + 1 if spec.doc_mode == "stream" else B * (L + 1)
        self._span_cap = max(1, min(span, full.num_tokens + 1))
        self._meta_cap = 4 * B + min(self._span_cap, len(offsets) - 1) + 1
        self._iters: weakref.WeakSet = weakref.WeakSet()
        self._ring: _Ring | None = None

    # ---- public ------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of batches this loader yields."""
        return self._num_batches

    def _tables(self) -> Iterator[_Batches]:
        """The batch tables of one pass, in order: ``tuning.table_windows`` windows (whole batches) each."""
        B, plan = self.batch_windows, self.plan
        per = max(1, self.tuning.table_windows // B) * B
        # A plain ndarray view: slicing an np.memmap object costs ~10x more (subclass bookkeeping).
        offsets = np.asarray(self._offsets)
        for lo in range(0, len(plan), per):
            yield _Batches.build(plan.block(lo, lo + per), B, offsets, plan.chunk_size, plan.overlap)

    @property
    def num_scored(self) -> int:
        """Targets scored over the whole iteration (host int)."""
        return self.plan.num_scored

    def __iter__(self) -> "_LoaderIterator":
        it = _LoaderIterator(self)
        self._iters.add(it)
        return it

    def close(self) -> None:
        """Stop every running iteration (joining its reader thread) and close an owned store."""
        for it in list(getattr(self, "_iters", ())):
            it.close()
        self._ring = None
        if getattr(self, "_owns_store", False) and self.store is not None:
            self.store.close()
            self.store = None

    def host_pass(self) -> int:
        """The reader's host work for every batch (each span read into a reused host slot of the
        loader's own sizes, ids checked, metadata packed, with the reader's prefetch and release
        hints), in this thread, with no device and no copy; returns the batches' input tokens. For
        benchmarks: the rate at which the device path's reader can feed the link."""
        it = iter(self)
        pipe = it._pipe
        it.close()  # keep the pipeline's methods, stop its reader thread: this thread drives it
        pipe.stop.clear()
        tok = np.empty(self._span_cap, dtype=self.store.dtype)
        meta = np.empty(self._meta_cap, dtype=np.int64)
        tokens = [0]
        L = self.plan.chunk_size

        def emit(b: int, lo: int, hi: int) -> bool:
            pipe.fill_host(b, lo, hi, tok, meta)
            bt = pipe.batches  # the reader's current batch table (b indexes it)
            tokens[0] += int(bt.w1[b] - bt.w0[b]) * L
            return True

        pipe._produce(emit)
        return tokens[0]

    def __repr__(self) -> str:
        p = self.plan
        return (f"WindowLoader(chunk_size={p.chunk_size}, overlap={p.overlap}, doc_mode={p.doc_mode!r}, windows={len(p)}, "
                f"batches={len(self)}, batch_windows={self.batch_windows}, device={str(self.device)!r})")

    # ---- internals ---------------------------------------------------------------------------
    def _take_ring(self) -> "_Ring":
        """The ring is allocated once per loader and reused by later iterations (pinned memory is
        slow to allocate); a second concurrent iteration gets its own."""
        ring, self._ring = self._ring, None
        if ring is None:
            ring = _Ring(self.device, self.store.dtype, self.num_slots, self._span_cap, self._meta_cap)
        return ring

    def _give_ring(self, ring: "_Ring") -> None:
        self._ring = ring


def _widen_bits(bits: torch.Tensor, mask: int) -> torch.Tensor:
    """int64 ids from unsigned ids carried as same-width signed bit patterns (int16/int32):
    the cast sign-extends, the mask clears the extension (uint16 id 40000 arrives as int16 -25536)."""
    return bits.to(torch.int64).bitwise_and_(mask)


class _Ring:
    """Host slots (pinned on CUDA) and, on CUDA, device slots + events. Allocated once per loader."""

    def __init__(self, device: torch.device, dtype: np.dtype, num_slots: int, span: int, meta: int):
        # Trap: grad and inference mode are per thread. The ring is allocated by whichever thread
        # first iterates (often inside the caller's ``torch.inference_mode()``), but the reader
        # thread writes into it with ``copy_``; an inference tensor may not be modified outside
        # inference mode, so allocating it there made the reader fail on the first CUDA batch.
        # Plain tensors can be read and written in any mode, by any thread.
        with torch.inference_mode(False):
            self._allocate(device, dtype, num_slots, span, meta)

    def _allocate(self, device: torch.device, dtype: np.dtype, num_slots: int, span: int, meta: int) -> None:
        self.device, self.np_dtype = device, dtype
        self.cuda = device.type == "cuda"
        self.bits = bits = _BITS_DTYPE[dtype]
        # CPU: the reader cuts each batch as soon as its span is read, so one slot suffices; the
        # read-ahead is the queue of finished batches. (A second CPU reader taking alternate batches
        # was measured here: with another job on the cores it cut throughput by up to 2x.)
        n = num_slots if self.cuda else 1
        self.host_tok = [torch.empty(span, dtype=bits, pin_memory=self.cuda) for _ in range(n)]
        # numpy views share the (pinned) memory: read_into writes the store dtype straight into it.
        self.host_tok_np = [t.numpy().view(dtype) for t in self.host_tok]
        if self.cuda:
            self.host_meta = [torch.empty(meta, dtype=torch.int64, pin_memory=True) for _ in range(n)]
            self.host_meta_np = [t.numpy() for t in self.host_meta]
            self.dev_tok = [torch.empty(span, dtype=bits, device=device) for _ in range(n)]
            self.dev_meta = [torch.empty(meta, dtype=torch.int64, device=device) for _ in range(n)]
            # blocking: the reader thread sleeps in copied[i].synchronize() instead of spinning a core
            self.copied = [torch.cuda.Event(blocking=True) for _ in range(n)]
            self.consumed = [torch.cuda.Event() for _ in range(n)]
            self.side_stream = torch.cuda.Stream(device=device)
            # The side stream writes the device slots: when the ring is freed, the caching allocator
            # must not hand their memory out before those copies finish (no stream sync needed).
            for t in self.dev_tok + self.dev_meta:
                t.record_stream(self.side_stream)
        self.num_slots = n

    def ensure(self, i: int, span: int, meta: int) -> None:
        """Grow slot ``i`` to hold ``span`` tokens and ``meta`` metadata words (at least doubling).

        Rare: a batch whose windows lie far apart (many documents too short for a window between
        them) or whose span touches many documents. Called by the reader while it owns slot ``i``:
        the slot's last copy has finished (``copied[i]``), and on CUDA the side stream is current,
        so new device buffers belong to it; the old ones were recorded on every stream that read
        them (``record_stream``), so the caching allocator recycles them only after those reads."""
        if span <= self.host_tok[i].numel() and (not self.cuda or meta <= self.host_meta[i].numel()):
            return
        with torch.inference_mode(False):  # see __init__
            if span > self.host_tok[i].numel():
                n = max(span, 2 * self.host_tok[i].numel())
                self.host_tok[i] = torch.empty(n, dtype=self.bits, pin_memory=self.cuda)
                self.host_tok_np[i] = self.host_tok[i].numpy().view(self.np_dtype)
                if self.cuda:
                    self.dev_tok[i] = torch.empty(n, dtype=self.bits, device=self.device)
            if self.cuda and meta > self.host_meta[i].numel():
                n = max(meta, 2 * self.host_meta[i].numel())
                self.host_meta[i] = torch.empty(n, dtype=torch.int64, pin_memory=True)
                self.host_meta_np[i] = self.host_meta[i].numpy()
                self.dev_meta[i] = torch.empty(n, dtype=torch.int64, device=self.device)


@dataclass
class _Item:
    """CUDA: a batch whose span and metadata are (being) copied into device slot ``slot``."""

    b: int
    slot: int
    n: int  # span tokens
    nw: int  # windows
    k: int  # document starts in the metadata
    lo: int
    d0: int
    uniform: bool
    any_bos: bool
    # Everything the consumer needs from the batch table (the reader has moved on to later tables).
    first_window: int
    scored: int
    windows: WindowBlock


_END = object()  # the reader has emitted every batch


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Pipeline:
    """One iteration's reader thread and hand-off queues. Holds no reference to the iterator, so an
    abandoned iterator is garbage-collected and its ``__del__`` stops this pipeline."""

    def __init__(self, loader: WindowLoader, ring: _Ring):
        self.store = loader.store
        self.plan = loader.plan
        self.tables = loader._tables  # batch tables of a pass, made by the reader thread as it goes
        self.batches: _Batches | None = None  # the current table (reader thread)
        self.span_cap = loader._span_cap
        self.hint_tokens = loader.tuning.hint_tokens
        self.join_timeout_s = loader.tuning.join_timeout_s
        # A plain ndarray view: slicing an np.memmap object costs ~10x more (subclass bookkeeping).
        self.offsets = np.asarray(loader._offsets)
        self.ring = ring
        self.device = loader.device
        self.bos_id = loader.bos_id
        self.release_behind = loader.release_behind
        self.vocab_size = loader.vocab_size
        # Backends whose read_into is a numpy slice assignment (npy, raw .bin, memory) declare
        # widening_reads: they widen uint16/uint32 into an int64 buffer exactly, in the same pass
        # as the copy. Others get a buffer of the store's dtype, as the TokenStore contract says.
        self.widening_reads = self.store.widening_reads
        self.L, self.O = self.plan.chunk_size, self.plan.overlap
        self.mask = _UNSIGNED_MASK[ring.np_dtype]
        self.stop = threading.Event()
        self.free: queue.Queue = queue.Queue()  # CUDA: slots the consumer has handed back
        for i in range(ring.num_slots):
            self.free.put(i)
        # CPU: finished batches wait here (the read-ahead); CUDA: at most num_slots items exist.
        self.ready: queue.Queue = queue.Queue(maxsize=loader.num_slots)
        self._jn = np.arange(self.L + 1, dtype=np.int64)  # index arithmetic on CPU, reused every batch
        self.thread = threading.Thread(target=self._run, name=f"{_THREAD_NAME}-{id(self):x}", daemon=True)
        self.thread.start()

    # ---- reader thread -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.ring.cuda:
                # A new thread starts outside inference mode, which is the mode the ring (plain
                # tensors, see _Ring) is written in; stated here so no caller's mode leaks in.
                with torch.inference_mode(False), torch.cuda.device(self.device), \
                        torch.cuda.stream(self.ring.side_stream):
                    self._produce(self._emit_cuda)
            else:
                self._produce(self._emit_host)
            self._put(_END)
        except BaseException as e:  # noqa: BLE001 - every failure goes to the consumer, which re-raises it
            self._put(_Failed(e))

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _take_slot(self) -> int | None:
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)  # None: close() woke us
            except queue.Empty:
                continue
        return None

    def _produce(self, emit) -> None:
        plan, store = self.plan, self.store
        n = len(plan)
        if n == 0:
            return
        # Spans only move forward (starts and stops never decrease in plan order), so the pass reads
        # [first window's start, last window's stop).
        end = int(plan.block(n - 1, n).stop[0])
        # Hint the kernel in large steps (a syscall each): a few ring-fulls ahead, released behind.
        hint = max(self.hint_tokens, 2 * self.span_cap * max(self.ring.num_slots, 2))
        released = None  # never drop pages before our first batch (not ours to judge)
        prefetched = 0
        for bt in self.tables():
            self.batches = bt
            if released is None:
                released = prefetched = bt.lo[0]
            for b in range(len(bt)):
                if self.stop.is_set():
                    return
                lo, hi = bt.lo[b], bt.hi[b]
                if prefetched < min(hi + hint // 2, end):
                    nxt = min(max(prefetched, hi) + hint, end)
                    store.prefetch(max(prefetched, lo), nxt)
                    prefetched = nxt
                if not emit(b, lo, hi):
                    return
                if self.release_behind and lo - released >= hint:
                    store.release(released, lo)  # spans only move forward: nothing before lo is read again
                    released = lo
        if self.release_behind and end > released:
            store.release(released, end)

    def _emit_host(self, b: int, lo: int, hi: int) -> bool:
        if self.widening_reads and self.O == 0 and self.batches.uniform[b]:
            # Back-to-back full windows: the span *is* the windows. Read it widened, in one pass,
            # straight into the int64 array that inputs and targets view (no slot, no second copy).
            wide = np.empty(hi - lo, np.int64)
            self.store.read_into(lo, hi, wide)
            self._check_ids(wide, lo)
            return self._put(self._cut_host(wide, b, lo))
        if self.O and self.batches.uniform[b]:
            src = self.store.view(lo, hi)
            if src is not None:
                # Overlapping full windows inside one mapped piece: gather them from the mapping in
                # one strided, widening copy (one pass over the bytes and one GIL release per batch;
                # a copy per window released the GIL per window, each a hand-off to the consumer).
                self._check_ids(src, lo)
                return self._put(self._cut_host(src, b, lo))
        if self.widening_reads and self.O and self.batches.uniform[b]:
            # Overlapping full windows across pieces: read each window's L+1 tokens widened straight
            # into its int64 row: one pass over the bytes (narrow span + widening copy is two).
            w0, w1 = self.batches.w0[b], self.batches.w1[b]
            tok = np.empty((w1 - w0, self.L + 1), np.int64)
            for r, s in enumerate(self.batches.win.start[w0:w1].tolist()):
                self.store.read_into(s, s + self.L + 1, tok[r])
                self._check_ids(tok[r], s)
            return self._put(self._cut_host(tok, b, lo))
        self.ring.ensure(0, hi - lo, 0)
        span = self.ring.host_tok_np[0][: hi - lo]
        self.store.read_into(lo, hi, span)
        self._check_ids(span, lo)
        return self._put(self._cut_host(span, b, lo))

    def _check_ids(self, span: np.ndarray, lo: int) -> None:
        bad = find_id_over(span, self.vocab_size)
        if bad is not None:
            raise StoreError(
                f"token id {bad[1]} at position {lo + bad[0]} of store {self.store.path!r} is outside the vocabulary "
                f"[0, {self.vocab_size}): evaluate with the model of the store's tokenizer, or check the store "
                "with 'streamdata verify'"
            )

    def _emit_cuda(self, b: int, lo: int, hi: int) -> bool:
        ring = self.ring
        i = self._take_slot()
        if i is None:
            return False
        ring.copied[i].synchronize()  # the DMA out of this host slot (its last copy) has finished
        n = hi - lo
        bt = self.batches
        ring.ensure(i, n, 4 * (bt.w1[b] - bt.w0[b]) + bt.d1[b] - bt.d0[b] + 1)
        m = self.fill_host(b, lo, hi, ring.host_tok_np[i], ring.host_meta_np[i])
        side = ring.side_stream  # also the current stream of this thread (see _run)
        side.wait_event(ring.consumed[i])  # the consumer's reads of device slot i are done
        ring.dev_tok[i][:n].copy_(ring.host_tok[i][:n], non_blocking=True)
        ring.dev_meta[i][:m].copy_(ring.host_meta[i][:m], non_blocking=True)
        ring.copied[i].record(side)
        return self._put(self._item(b, i, lo, hi))

    def fill_host(self, b: int, lo: int, hi: int, tok: np.ndarray, meta: np.ndarray) -> int:
        """The host side of one CUDA batch: its span read into ``tok`` (store dtype; the pinned
        slot), its ids checked, its metadata packed into ``meta``. Returns the metadata words.
        (benchmarks.bench_loader times this alone: the GPU path's host-side rate.)"""
        span = tok[: hi - lo]
        self.store.read_into(lo, hi, span)
        self._check_ids(span, lo)
        return self._pack_meta(b, lo, meta)

    def _pack_meta(self, b: int, lo: int, meta: np.ndarray) -> int:
        """Per-window metadata of batch ``b`` in one int64 block (one small copy to the device):
        start - lo, length, score_from, bos ([B] each), then the start offsets of documents d0..d1.
        Returns the number of words written."""
        bt = self.batches
        win = bt.win
        w0, w1, d0, d1 = bt.w0[b], bt.w1[b], bt.d0[b], bt.d1[b]
        nw, k = w1 - w0, d1 - d0 + 1
        meta[0:nw] = win.start[w0:w1] - lo
        meta[nw : 2 * nw] = win.length[w0:w1]
        meta[2 * nw : 3 * nw] = win.score_from[w0:w1]
        meta[3 * nw : 4 * nw] = win.bos[w0:w1]
        meta[4 * nw : 4 * nw + k] = self.offsets[d0 : d1 + 1]
        return 4 * nw + k

    def _item(self, b: int, slot: int, lo: int, hi: int) -> _Item:
        bt = self.batches
        w0, w1 = bt.w0[b], bt.w1[b]
        return _Item(b, slot, hi - lo, w1 - w0, bt.d1[b] - bt.d0[b] + 1, lo, bt.d0[b], bt.uniform[b],
                     bt.any_bos[b], bt.win.first + w0, bt.scored[b], bt.win[w0:w1])

    # ---- cutting a batch out of its span -------------------------------------------------------
    @staticmethod
    def _batch(win: WindowBlock, scored: int, inputs, targets, score_mask, lengths, rel, lo, doc_starts,
               d0) -> WindowBatch:
        return WindowBatch(inputs, targets, score_mask, lengths, win.first, len(win), scored, win, rel, lo,
                           doc_starts, d0)

    def _cut_host(self, span: np.ndarray, b: int, lo: int) -> WindowBatch:
        """CPU, in the reader thread. ``span``: tokens [lo, lo+n) in the store dtype (the slot), or
        already int64 (widening reads: the whole span when ``O == 0``, else the ``[B, L+1]`` windows).

        numpy only: its kernels are single-threaded and release the GIL, whereas torch's CPU kernels
        fan out to intra-op threads that then compete with the consumer (and a CPU model) for the
        same cores; measured here, that made a 1 MB fill take milliseconds under load. numpy's
        uint16/uint32 -> int64 casts are exact. Every array handed out is freshly allocated (the slot
        is reused for the next batch); inputs and targets share one allocation, because each
        MB-sized allocation can cost fresh zeroed pages from the kernel (measured here: two separate
        1 MiB arrays per batch were 20x slower than one 2 MiB array)."""
        bt, L, O = self.batches, self.L, self.O
        w0, w1 = bt.w0[b], bt.w1[b]
        B = w1 - w0
        wb = bt.win[w0:w1]  # this batch's windows (views)
        sf = wb.score_from
        if bt.uniform[b] and O == 0:
            # Back-to-back full windows: widen the span once; inputs/targets are views (no copy).
            if span.dtype == np.int64:
                wide = span  # already widened by the read (_emit_host)
            else:
                wide = np.empty(span.size, np.int64)
                np.copyto(wide, span, casting="safe")
            inputs, targets = wide[: B * L].reshape(B, L), wide[1 : B * L + 1].reshape(B, L)
            score_mask = np.ones((B, L), bool)
        elif bt.uniform[b]:
            if span.ndim == 2:
                tok = span  # the windows themselves, already read widened row by row (_emit_host)
            else:
                # Windows start every S tokens: a strided view of the narrow span, widened while
                # copied. Each window's L+1 tokens are copied once; inputs/targets are views of
                # them (row stride L+1).
                step = span.itemsize
                win = np.lib.stride_tricks.as_strided(span, (B, L + 1), ((L - O) * step, step), writeable=False)
                tok = np.empty((B, L + 1), np.int64)
                np.copyto(tok, win, casting="safe")
            inputs, targets = tok[:, :L], tok[:, 1:]
            score_mask = np.ones((B, L), bool)
            score_mask[:, :O] = (sf == 0)[:, None]  # context, except in a stream's first window
        else:
            idx = (wb.start - lo)[:, None] + self._jn  # [B, L+1] span index of each token read
            np.clip(idx, 0, span.size - 1, out=idx)  # clamped lanes are masked below
            tok = span[idx]  # one gather (still narrow)
            jl = self._jn[:L]
            valid = jl < wb.length[:, None]
            inputs, targets = np.empty((2, B, L), np.int64)
            np.multiply(tok[:, :L], valid, out=inputs, dtype=np.int64)  # padding -> 0, widened exactly
            np.multiply(tok[:, 1:], valid, out=targets, dtype=np.int64)
            if bt.any_bos[b]:
                inputs[:, 0] = np.where(wb.bos, self.bos_id, inputs[:, 0])
            score_mask = valid & (jl >= sf[:, None])
        t = torch.from_numpy
        d0, d1 = bt.d0[b], bt.d1[b]
        return self._batch(wb, bt.scored[b], t(inputs), t(targets), t(score_mask), t(wb.length.copy()),
                           wb.start - lo, lo, self.offsets[d0 : d1 + 1].copy(), d0)

    def _cut_device(self, span: torch.Tensor, meta: torch.Tensor, it: _Item) -> WindowBatch:
        """CUDA, on the consumer's stream. ``span``: int64 [n] tokens [lo, lo+n) on the device;
        ``meta``: the item's int64 metadata (owned). Only kernel launches: nothing waits for the GPU."""
        L, O, B = self.L, self.O, it.nw
        rel, length, sf = meta[0:B], meta[B : 2 * B], meta[2 * B : 3 * B]
        if it.uniform:
            if O == 0:
                # Back-to-back full windows: the span is the windows; views, no copy.
                inputs = span[: B * L].view(B, L)
                targets = span[1 : B * L + 1].view(B, L)
            else:
                # Windows start every S tokens: each window's L+1 tokens are copied once (one gather
                # of overlapping strided rows); inputs/targets are views of them (row stride L+1).
                tok = span.unfold(0, L + 1, L - O).contiguous()
                inputs, targets = tok[:, :L], tok[:, 1:]
            score_mask = torch.ones((B, L), dtype=torch.bool, device=span.device)
            if O:
                score_mask[:, :O] = (sf == 0)[:, None]  # context, except in a stream's first window
        else:
            n = span.numel()
            # Made per batch on the consumer's stream (a tiny kernel): a tensor cached across batches
            # would belong to whichever stream was current when it was allocated.
            j = torch.arange(L + 1, device=span.device)
            idx = rel[:, None] + j  # [B, L+1] span index of every token each window reads
            tok = span[idx.clamp_(0, n - 1)]  # one gather; clamped lanes are masked below
            jl = j[:L]
            valid = jl < length[:, None]
            inputs = torch.where(valid, tok[:, :L], 0)
            targets = torch.where(valid, tok[:, 1:], 0)
            if it.any_bos:
                inputs[:, 0] = torch.where(meta[3 * B : 4 * B] != 0, self.bos_id, inputs[:, 0])
            score_mask = valid & (jl >= sf[:, None])
        return self._batch(it.windows, it.scored, inputs, targets, score_mask, length, rel, it.lo,
                           meta[4 * B : 4 * B + it.k], it.d0)

    # ---- consumer side -----------------------------------------------------------------------
    def next(self) -> WindowBatch:
        """The next batch in plan order; StopIteration after the last one."""
        while True:
            try:
                item = self.ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    raise RuntimeError(f"{self.thread.name} stopped without a result (bug)") from None
        if item is _END:
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.exc
        return self.finish_cuda(item) if isinstance(item, _Item) else item

    def finish_cuda(self, it: _Item) -> WindowBatch:
        """Consumer's stream: wait for the slot's copy, widen, take the metadata, free the slot, cut."""
        ring, i = self.ring, it.slot
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(ring.copied[i])
        span = _widen_bits(ring.dev_tok[i][: it.n], self.mask)
        meta = ring.dev_meta[i][: 4 * it.nw + it.k].clone()
        # The slots outlive this batch and were allocated on another stream: tell the caching
        # allocator that `cur` reads them, so freeing the ring never recycles memory under a pending read.
        ring.dev_tok[i].record_stream(cur)
        ring.dev_meta[i].record_stream(cur)
        ring.consumed[i].record(cur)  # everything that reads device slot i is enqueued before this
        self.free.put(i)
        return self._cut_device(span, meta, it)

    def shutdown(self) -> bool:
        """Stop the reader; True once it has exited (False: it is still running, e.g. a hung read)."""
        self.stop.set()
        self.free.put(None)  # wake a reader waiting for a slot
        th = self.thread
        if th.is_alive() and th is not threading.current_thread():
            th.join(timeout=self.join_timeout_s)
            if th.is_alive():
                warnings.warn(f"{th.name} did not stop within {self.join_timeout_s:g} s (a store read is hanging?); "
                              "its buffers are abandoned, not reused", RuntimeWarning, stacklevel=2)
        return not th.is_alive()
        # CUDA: copies may still be in flight. Nothing waits for them here: a later iteration reusing
        # the ring orders itself after them (copied/consumed events, same side stream), and freeing
        # the ring is deferred by the caching allocator (record_stream).


class _LoaderIterator(_ClosesOnExit, Iterator[WindowBatch]):
    """One pass over a loader. Stops its reader thread when exhausted, closed, or garbage-collected
    (an early ``break`` out of a ``for`` loop drops the last reference)."""

    def __init__(self, loader: WindowLoader):
        if loader.store is None:
            raise ConfigError("this WindowLoader is closed: create a new one")
        self._loader = loader
        self._ring = loader._take_ring()
        self._pipe: _Pipeline | None = _Pipeline(loader, self._ring)

    def __iter__(self) -> "_LoaderIterator":
        return self

    def __len__(self) -> int:
        return len(self._loader)

    def __next__(self) -> WindowBatch:
        pipe = self._pipe
        if pipe is None:
            raise StopIteration
        try:
            return pipe.next()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None and pipe.shutdown():
            # Only a ring whose reader has exited goes back for reuse: a reader still alive (a hung
            # store read) could later write into a slot that the next iteration is using.
            self._loader._give_ring(self._ring)

