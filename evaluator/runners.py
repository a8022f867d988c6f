"""Runners: one batch of windows -> NLL of its scored targets -> the metric sums.

- :class:`SlidingRunner` (``sliding``): every window is an independent sequence; ``overlap``
  targets at its start are context only. Many windows run per forward; a micro-batch that runs out
  of device memory is re-run in halves (identical results: windows are independent), and later
  batches keep the smaller size.
- :class:`CarriedRunner` (``stateful``, ``kv-cache``): the model's state or KV cache carried from
  window to window (reset at the start of the stream, and of every document in document mode). A
  stream (and a document too long to buffer) runs one window at a time; a window that runs out of
  memory rolls the state back and is fed in halves (same result: the model sees the same tokens in
  the same order). In document mode with a batch size ``B > 1`` it runs up to ``B`` documents side
  by side (:meth:`CarriedRunner.units`, see "Parallel documents" below).

OOM rule shared by both: only the forward and the loss are retried; nothing is added to the sums
until both succeeded, so a retry never counts a target twice. The cache is emptied after leaving
the ``except`` block (inside it the traceback still references the failed forward's tensors).

Parallel documents (carried modes, document mode, ``B > 1``). The loader yields windows in plan
order; :meth:`CarriedRunner.units` regroups them into *units* that the engine treats as batches
(sums, per-token file, timer, progress and checkpoints all work per unit, in plan order):

- a *segment*: consecutive whole documents of the plan (at most ``lookahead * B`` of them, in
  at most ``max(lookahead * B * chunk_size, segment_slots)`` slot tokens: a window takes a
  ``chunk_size`` row), whose windows are copied into a device buffer as they arrive. Its documents are sorted by length (longest first,
  stable) and cut into groups of ``B``; a group starts from a fresh state with batch dimension ``B``
  and feeds, at step ``k``, chunk ``k`` of every document that has one as one ``[B', T]`` forward
  (``T`` = the step's longest chunk). Every chunk but a document's last is a full ``chunk_size``, so
  right padding only ever follows a document's last token: causal attention never lets a real
  position see a later one, the padded targets are not scored, and the padded row drops out after
  that step (its state/cache rows are cut off, :meth:`ModelAdapter.keep_rows`, or, for a module
  whose state layout we do not know, kept and fed padding). So each document's NLL is its own full
  forward's. The values are recorded in plan order once the whole segment is done.
- a *run* of windows of one document longer than a segment's share (slot tokens ``// B``): it is
  streamed one window at a time as with ``B = 1`` (its state may then be checkpointed mid-document).

A checkpoint lands between units, where no segment is half done (its state is empty), so a resumed
run starts at a segment boundary and regroups exactly the same documents. Out of memory inside a
group: the group is restarted from a fresh state in two halves (and later groups use the smaller
size); a single document falls back to the window-halving rule. Nothing is recorded until the
whole segment succeeded, so no target is counted twice.

Batch size by measurement (``batch_size="auto"``, :mod:`evaluator.autobatch`): ``B`` is then a
memory bound, and a :class:`~evaluator.autobatch.Ladder` sets the micro size (sliding: windows per
forward; parallel documents: documents per group) on the run's first forwards (groups), timing
each; while it measures, a segment holds ``tune_groups`` groups of the rung's size, so rungs follow
each other quickly (which documents are streamed still follows ``B``).

Hot loop rules: no device sync per batch (sums stay on the device, counts come from the plan);
per-window/per-document sums and per-token losses leave the device in blocks (one sync per block,
see metrics.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import numpy as np
import torch

from streamdata.loader import WindowBatch
from streamdata.windows import WindowBlock, WindowPlan

from .autobatch import Ladder, LadderTimer
from .errors import ModelError
from .metrics import MetricSums, PerTokenWriter, token_nll
from .models import ForwardOutput, ModelAdapter

__all__ = ["CarriedRunner", "Runner", "SlidingRunner"]

_OOM = torch.OutOfMemoryError  # torch >= 2.5, every device type; a RuntimeError too
# Parallel documents (CarriedRunner's defaults): a segment holds at most LOOKAHEAD * B documents (the
# look-ahead the length sort sees: more means less padding, and more buffered windows) and
# max(LOOKAHEAD * B * L, SEGMENT_SLOTS) window slots of L tokens (int64 inputs and targets: 16 bytes a
# slot token, 32 with detailed metrics; 2^20 slot tokens = 16-32 MiB of device memory).
LOOKAHEAD = 8
SEGMENT_SLOTS = 1 << 20
_SCAN = 4096  # windows of the plan read per step while planning a segment


class Runner(ABC):
    """Feeds batches of a plan through a model into ``sums`` (and ``writer``). ``plan`` is the
    loader's (lazy) plan, whose window 0 is window ``plan.first`` of the full plan; each batch
    carries its own windows (``batch.windows``), so a runner never indexes whole-plan arrays."""

    def __init__(self, adapter: ModelAdapter, plan: WindowPlan, sums: MetricSums, writer: PerTokenWriter | None,
                 loss_slice: int, device: torch.device, scorer: Callable[..., torch.Tensor] | None = None, *,
                 batch_timer: LadderTimer | None = None, ladder_share: float | None = 0.1):
        self.adapter, self.plan, self.sums, self.writer = adapter, plan, sums, writer
        self.loss_slice, self.device, self.detailed = loss_slice, device, sums.detailed
        self.scorer = token_nll if scorer is None else scorer  # a run's fp32 NLL, or a comparison's statistics
        # batch_size="auto" (evaluator/autobatch.py): the ladder that measures the micro size (set by
        # autobatch.attach), its timer (None: autobatch.WallTimer; a test's fake) and the share of the
        # run's rows (ladder_rows) it may spend (None: no limit)
        self.ladder: Ladder | None = None
        self.batch_timer, self.ladder_share = batch_timer, ladder_share

    def _tuning(self) -> bool:
        return self.ladder is not None and self.ladder.active

    def ladder_rows(self) -> int:
        """Rows of this process's plan in the ladder's unit: windows (one forward holds micro of them)."""
        return len(self.plan)

    def _score(self, out: Any, targets: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Per-target values of the scored targets ``flat`` (indices into ``targets`` flattened),
        computed in loss slices by ``scorer(out, targets, flat, loss_slice)``: the fp32 NLL
        (:func:`~evaluator.metrics.token_nll`) for a run, [count, C] statistics for a model
        comparison (:func:`evaluator.kl.pair_stats`). The one place a runner turns a forward's
        output into numbers, so a comparison swaps only this and the sums' columns."""
        return self.scorer(out, targets, flat, self.loss_slice)

    @property
    def micro_batch(self) -> int | None:
        """Windows (sliding) or documents side by side (carried) per forward now: the requested
        batch, or less after an out-of-memory halving; None where there is no batch (one stream)."""
        return None

    def units(self, loader: Any) -> Any:
        """What the engine iterates and feeds to :meth:`step`: the loader's batches themselves here
        (a subclass may regroup them, keeping plan order: see :meth:`CarriedRunner.units`)."""
        return loader

    @abstractmethod
    def step(self, batch: WindowBatch) -> None:
        """Score one batch of windows into the sums (and the per-token file)."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold to continue after the last finished batch."""
        return {}

    def load(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` of an earlier process."""

    def warm_up(self, ids: torch.Tensor) -> None:
        """Start the carried state from ``ids`` [K] fed unscored (``split_warmup``); carried modes only."""
        raise RuntimeError(f"internal error: {type(self).__name__} carries no state to warm up")

    def _record(self, nll: torch.Tensor, count: int, windows: torch.Tensor | None = None,
                docs: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        if self.detailed:
            self.sums.add(nll, count, windows, docs, positions)
        else:
            self.sums.add(nll, count)
        if self.writer is not None:
            self.writer.write(nll)


class SlidingRunner(Runner):
    def __init__(self, *args: Any, batch_windows: int, **kw: Any):
        super().__init__(*args, **kw)
        self.batch_windows = batch_windows
        self.micro = batch_windows  # windows per forward; halved after an out-of-memory error
        # A compiled model (inside adapter.compiled()) gets one static shape, [micro, chunk_size]:
        # no trimming to the longest window, short batches padded with rows of id 0, every input
        # contiguous (dynamo guards on strides too). The padding is never scored: the scored
        # indices come from the score mask of the real rows only. One graph, plus one per halving
        # after an out-of-memory error.
        self.static = self.adapter.compile_mode is not None

    @property
    def micro_batch(self) -> int:
        return self.micro

    def state(self) -> dict[str, Any]:
        # The micro-batch size decides how windows are grouped per forward (float results may
        # depend on it): a resumed run keeps the size the crashed one had reached.
        return {"micro": self.micro, "ladder": None if self.ladder is None else self.ladder.state()}

    def load(self, state: dict[str, Any]) -> None:
        self.micro = int(state["micro"])  # (the ladder's state: evaluator.autobatch.attach)

    def step(self, batch: WindowBatch) -> None:
        rows = batch.num_windows
        win = batch.windows  # this batch's windows of the plan (host numpy; no whole-plan array)
        lens = win.length
        scored = lens - win.score_from
        if int(scored.sum()) != batch.num_scored:  # never trust a plan that disagrees with its batch
            raise RuntimeError(f"internal error: plan scores {int(scored.sum())} targets in windows "
                               f"{batch.first_window}.., batch says {batch.num_scored}")
        i = 0
        while i < rows:
            tune = self._tuning()
            if tune:
                self.micro = self.ladder.size()
                self.ladder.start()
            m = min(self.micro, rows - i)
            T = batch.inputs.shape[1] if self.static else int(lens[i : i + m].max())
            count = int(scored[i : i + m].sum())
            try:
                nll, flat = self._nll(batch, i, i + m, T, count)
                oom = False
            except _OOM:
                if m == 1:
                    raise ModelError(
                        f"out of device memory on a single window of chunk_size={self.plan.chunk_size}: pass "
                        f"chunk_size={max(1, self.plan.chunk_size // 2)} or less (or a smaller loss_slice)"
                    ) from None
                oom = True
            if oom:
                self.micro = max(1, m // 2)
                if tune:
                    self.ladder.out_of_memory(self.micro)
                    self.micro = self.ladder.size()
                _empty_cache(self.device)
                continue
            if tune:
                self.ladder.stop(m, count)
                self.micro = self.ladder.size()
            if self.detailed:
                self._record(nll, count, flat // T + (batch.first_window + i),  # global window ids
                             batch.doc_ids[i : i + m, :T].reshape(-1).index_select(0, flat),
                             batch.positions[i : i + m, :T].reshape(-1).index_select(0, flat))
            else:
                self._record(nll, count)
            i += m

    def _nll(self, batch: WindowBatch, r0: int, r1: int, T: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 NLL of the scored targets of rows [r0, r1), their flat indices into [r1 - r0, T])."""
        # Eager: trim the batch to its longest window: short windows (document ends) cost no padding
        # beyond it. Compiled: T is the full width, and missing rows are padded (see __init__).
        x, m = batch.inputs[r0:r1, :T], r1 - r0
        if self.static:
            R = min(self.micro, len(self.plan))  # a plan shorter than one batch is not padded beyond itself
            x = torch.cat([x, x.new_zeros(R - m, T)]) if m < R else x.contiguous()
        out = self.adapter.forward_windows(x)
        if x.shape[0] != m:  # drop the padded rows' outputs (views): flat indexes the real rows only
            out = ForwardOutput(hidden=None if out.hidden is None else out.hidden[:m], head=out.head,
                                logits=None if out.logits is None else out.logits[:m])
        flat = _scored_index(batch.score_mask[r0:r1, :T].reshape(-1), count)
        return self._score(out, batch.targets[r0:r1, :T], flat), flat


class CarriedRunner(Runner):
    def __init__(self, *args: Any, document_mode: bool, save_model_state: bool = True, lookahead: int = LOOKAHEAD,
                 segment_slots: int = SEGMENT_SLOTS, tune_groups: int = 2, **kw: Any):
        super().__init__(*args, **kw)
        self.document_mode = document_mode
        # Parallel documents: segments of at most lookahead * B documents in max(lookahead * B * L,
        # segment_slots) slot tokens (see LOOKAHEAD); tune_groups groups a segment while the ladder measures.
        self.lookahead, self.segment_slots, self.tune_groups = lookahead, segment_slots, tune_groups
        # False: the carry check found the model's cache cannot be restored exactly, so checkpoints
        # (only the final one: the engine turns the periodic ones off) record no model state.
        self.save_model_state = save_model_state
        self.prev_doc: int | None = None  # document of the last window fed (document mode)
        self.started = False
        self._micro: int | None = None  # documents per group (parallel documents only; halved after OOM)

    @property
    def micro_batch(self) -> int | None:
        return self._micro  # None: one stream at a time, no batch that could have shrunk

    def state(self) -> dict[str, Any]:
        # The group size decides which documents share a forward (float results may depend on it):
        # a resumed run keeps the size the crashed one had reached.
        saved = self.started and self.save_model_state
        return {"model_state": self.adapter.save_state() if saved else None, "prev_doc": self.prev_doc,
                "started": self.started, "micro": self._micro,
                "ladder": None if self.ladder is None else self.ladder.state()}

    def load(self, state: dict[str, Any]) -> None:
        self.prev_doc, self.started = state["prev_doc"], bool(state["started"])
        if state.get("micro") is not None:
            self._micro = int(state["micro"])
        if self.started:
            self.adapter.load_state(state["model_state"])

    def ladder_rows(self) -> int:
        """Documents of this process's plan (a group holds micro of them; empty ones counted too)."""
        p = self.plan
        return 0 if len(p) == 0 else int(p.block(len(p) - 1, len(p)).doc[0]) - int(p.block(0, 1).doc[0]) + 1

    def units(self, loader: Any) -> Any:
        """Document mode with ``loader.batch_windows`` = B > 1: the loader's batches regrouped into
        segments of whole documents run B side by side, and runs of one long document streamed (see
        the module docstring). Otherwise (stream mode, B = 1) the batches themselves."""
        B = int(getattr(loader, "batch_windows", 1))
        if not self.document_mode or B < 2:
            return loader
        if self._micro is None:
            self._micro = B
        return self._regroup(loader, B)

    def warm_up(self, ids: torch.Tensor) -> None:
        # A fresh state fed the warm-up context in chunk-size pieces (as windows would feed it),
        # nothing scored; the first window of the block then continues this state (stream mode).
        self.adapter.begin_stream()
        L = self.plan.chunk_size
        for i in range(0, ids.numel(), L):
            self.adapter.forward_stream(ids[None, i : i + L])
        self.started = True

    def step(self, batch: WindowBatch) -> None:
        if isinstance(batch, _Segment):
            self._step_segment(batch)
            return
        a = self.adapter
        win = batch.windows  # this batch's windows of the plan (host numpy)
        for r in range(batch.num_windows):
            n = int(win.length[r])
            doc = int(win.doc[r])
            if not self.started or (self.document_mode and doc != self.prev_doc):
                a.begin_stream()
                self.started = True
            self.prev_doc = doc
            nll = self._feed_window(batch.inputs[r : r + 1, :n], batch.targets[r : r + 1, :n])
            if self.detailed:
                self._record(nll, n, torch.full((n,), batch.first_window + r, dtype=torch.int64, device=self.device),
                             batch.doc_ids[r, :n], batch.positions[r, :n])
            else:
                self._record(nll, n)

    def _feed_window(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """fp32 NLL of every target of one window ``[1, n]`` fed to the carried state; after an
        out-of-memory error the state is rolled back and the window fed in halves."""
        a, n = self.adapter, inputs.shape[1]
        pieces, done = [(0, n)], []  # halves of the window after an out-of-memory error
        while pieces:
            p0, p1 = pieces.pop(0)
            snap = a.snapshot()
            flat = torch.arange(p1 - p0, device=self.device)
            try:
                out = a.forward_stream(inputs[:, p0:p1])
                nll = self._score(out, targets[:, p0:p1], flat)
                del out
                oom = False
            except _OOM:
                if p1 - p0 == 1:
                    raise ModelError("out of device memory on a single token: the model does not fit this device") from None
                oom = True
            if oom:
                a.restore(snap)
                _empty_cache(self.device)
                mid = (p0 + p1) // 2
                pieces[:0] = [(p0, mid), (mid, p1)]
                continue
            done.append(nll)
        return done[0] if len(done) == 1 else torch.cat(done)

    # ---- parallel documents ------------------------------------------------------------------
    def _regroup(self, loader: Any, B: int) -> Any:
        seg: _Segment | None = None
        for batch in loader:
            win, n, r = batch.windows, batch.num_windows, 0
            while r < n:
                w = batch.first_window + r
                if seg is None:
                    doc = int(win.doc[r])
                    if not (self.started and doc == self.prev_doc):  # (else: a streamed document continues)
                        seg = self._plan_segment(w, B)
                    if seg is None:  # stream this document's windows of the batch, one window at a time
                        r1 = r + int(np.argmax(np.append(win.doc[r:] != doc, True)))
                        yield _Run(batch, r, r1)
                        r = r1
                        continue
                k = min(n - r, seg.end - w)
                seg.take(batch, r, r + k)
                r += k
                if seg.end == w + k:
                    yield seg
                    seg = None
        if seg is not None:
            raise RuntimeError(f"internal error: the loader ended inside a segment of windows {seg.first_window}..{seg.end}")

    def _plan_segment(self, w: int, B: int) -> "_Segment | None":
        """The segment that starts at global window ``w`` (a document's first window), or None when
        that document is too long to buffer (it is then streamed)."""
        plan, L = self.plan, self.plan.chunk_size
        cap_docs, cap_slots = self.lookahead * B, max(self.lookahead * B * L, self.segment_slots)
        per_doc = cap_slots // B  # a document longer than this (in slot tokens) is streamed
        if self._tuning():  # short segments while measuring: a rung's groups, then the next rung
            self._micro = self.ladder.size()
            cap_docs = min(cap_docs, self.tune_groups * self._micro)
        i0 = w - plan.first
        docs: list[tuple[int, int, np.ndarray]] = []  # (plan index of its first window, doc id, window lengths)
        slots = 0
        cur: list[np.ndarray] = []  # window lengths of the document being scanned, its first window, its id
        cur_first, cur_doc, cur_windows = i0, None, 0
        j = i0
        while True:
            blk = plan.block(j, j + _SCAN) if j < len(plan) else None
            if blk is not None and int((blk.score_from != 0).sum()):  # carried modes: overlap 0
                raise RuntimeError("internal error: a carried-mode window scores from past its first target")
            doc = blk.doc if blk is not None else np.empty(0, np.int64)
            cuts = np.flatnonzero(doc[1:] != doc[:-1]) + 1  # where a new document starts in the block
            bounds = [0, *cuts.tolist(), len(doc)]
            runs = [(bounds[q], bounds[q + 1]) for q in range(len(bounds) - 1) if bounds[q + 1] > bounds[q]]
            if blk is None:
                runs = [(0, 0)]  # the plan ended: the scanned document is complete
            for a, b in runs:
                d = int(doc[a]) if blk is not None else None
                if cur and d != cur_doc:  # the scanned document is complete: take it if it fits
                    lens = np.concatenate(cur)
                    if slots + len(lens) * L > cap_slots:
                        return self._segment(i0, cur_first, docs, L)
                    docs.append((cur_first, cur_doc, lens))
                    slots += len(lens) * L
                    cur, cur_first, cur_windows = [], j + a, 0
                    if len(docs) == cap_docs or blk is None:
                        return self._segment(i0, cur_first, docs, L)
                cur_doc = d
                cur.append(blk.length[a:b])
                cur_windows += b - a
                if cur_windows * L > per_doc:  # too long to buffer
                    return self._segment(i0, cur_first, docs, L) if docs else None
            j += len(doc)

    def _segment(self, i0: int, i1: int, docs: list[tuple[int, int, np.ndarray]], L: int) -> "_Segment":
        return _Segment(self, i0, i1, docs, self._micro, L)

    def _step_segment(self, seg: "_Segment") -> None:
        a = self.adapter
        todo = [(g, 0, len(grp.docs)) for g, grp in enumerate(seg.groups)]
        out: dict[int, torch.Tensor] = {}  # slot -> fp32 NLL of that window's targets
        while todo:
            g, lo, hi = todo.pop(0)
            tune = self._tuning()
            if tune:
                self.ladder.start()
            try:
                got = self._run_group(seg, seg.groups[g], lo, hi)
                oom = False
            except _OOM:
                oom = True
            if oom:  # restart the group from a fresh state, in halves; nothing was recorded
                got = None
                a.begin_stream()
                _empty_cache(self.device)
                if hi - lo == 1:
                    if tune:  # one document does not fit: the ladder ends at 1
                        self.ladder.out_of_memory(1)
                        self._micro = self.ladder.size()
                    got = self._run_one_doc(seg, seg.groups[g], lo)
                else:
                    h = (hi - lo) // 2
                    self._micro = min(self._micro, h)
                    if tune:
                        self.ladder.out_of_memory(h)
                        self._micro = self.ladder.size()
                    todo[:0] = [(g, lo, lo + h), (g, lo + h, hi)]
                    continue
            elif tune:
                self.ladder.stop(hi - lo, int(sum(int(d.sum()) for d in seg.groups[g].docs[lo:hi])))
                self._micro = self.ladder.size()
            out.update(got)
        a.begin_stream()  # drop the last group's state/cache (nothing is carried past a segment)
        self.started, self.prev_doc = False, None
        # Record in plan order: the sums, spill blocks and the per-token file expect it.
        order = seg.slot.tolist()
        lens = seg.lengths.tolist()
        nll = torch.cat([out[s] for s in order])
        count = int(seg.lengths.sum())
        if self.detailed:
            wid = torch.cat([torch.full((n,), seg.first_window + i, dtype=torch.int64, device=self.device)
                             for i, n in enumerate(lens)])
            self._record(nll, count, wid, torch.cat([seg.doc_ids[s, :n] for s, n in zip(order, lens)]),
                         torch.cat([seg.positions[s, :n] for s, n in zip(order, lens)]))
        else:
            self._record(nll, count)

    def _run_group(self, seg: "_Segment", grp: "_Group", lo: int, hi: int) -> dict[int, torch.Tensor]:
        """Documents ``[lo, hi)`` of a group (sorted longest first) side by side from a fresh state:
        step k feeds chunk k of each document that has one. Returns slot -> NLL."""
        a = self.adapter
        a.begin_stream()
        rows = hi - lo  # rows the state holds (shrinks when the adapter can cut it)
        out: dict[int, torch.Tensor] = {}
        for k in range(grp.steps):
            act = min(hi, int(grp.active[k])) - lo  # documents [lo, lo + act) have a chunk k
            if act <= 0:
                break
            if act < rows and a.keep_rows(act):
                rows = act
            s0 = int(grp.offset[k]) + lo  # their chunks' slots: contiguous
            n = grp.lens[k][lo : lo + act]
            T, count = int(n.max()), int(n.sum())
            x, y, msk = seg.inputs[s0 : s0 + act, :T], seg.targets[s0 : s0 + act, :T], seg.mask[s0 : s0 + act, :T]
            if rows > act:  # ended documents' rows stay in the state: feed them padding, unscored
                pad = (0, 0, 0, rows - act)
                x, y, msk = (torch.nn.functional.pad(t, pad) for t in (x, y, msk))
            flat = _scored_index(msk.reshape(-1), count)
            res = a.forward_stream(x)
            nll = self._score(res, y, flat)
            del res
            for i, piece in enumerate(torch.split(nll, n.tolist())):
                out[s0 + i] = piece
        return out

    def _run_one_doc(self, seg: "_Segment", grp: "_Group", j: int) -> dict[int, torch.Tensor]:
        """Document ``j`` of a group alone, window by window (halving windows after an OOM)."""
        self.adapter.begin_stream()
        out: dict[int, torch.Tensor] = {}
        for k in range(grp.steps):
            if j >= int(grp.active[k]):
                break
            s = int(grp.offset[k]) + j
            n = int(grp.lens[k][j])
            out[s] = self._feed_window(seg.inputs[s : s + 1, :n], seg.targets[s : s + 1, :n])
        return out


class _Run:
    """Consecutive windows ``[r0, r1)`` of one loader batch, all of one streamed document: fed like
    a batch (views of the batch's tensors, used before the loader moves on)."""

    def __init__(self, batch: WindowBatch, r0: int, r1: int):
        self._b, self._r0, self._r1 = batch, r0, r1
        self.windows: WindowBlock = batch.windows[r0:r1]
        self.first_window, self.num_windows = batch.first_window + r0, r1 - r0
        self.num_scored = int(self.windows.scored_per_window.sum())
        d = int(self.windows.doc[0])
        self.doc_range = (d, d)
        self.inputs, self.targets = batch.inputs[r0:r1], batch.targets[r0:r1]

    @property
    def doc_ids(self) -> torch.Tensor:
        return self._b.doc_ids[self._r0 : self._r1]

    @property
    def positions(self) -> torch.Tensor:
        return self._b.positions[self._r0 : self._r1]


class _Group:
    """Up to B documents of a segment, sorted longest first, laid out step-major in the segment's
    buffer: the chunks k of documents 0..active[k]-1 occupy slots offset[k] .. offset[k]+active[k]-1,
    so any contiguous range of the group's documents is a contiguous slice at every step."""

    def __init__(self, docs: list[np.ndarray], base: int):
        self.docs = docs  # window lengths of each document, longest first
        self.steps = len(docs[0])
        nwin = np.array([len(d) for d in docs])
        self.active = np.array([(nwin > k).sum() for k in range(self.steps)], np.int64)
        if any((nwin[: self.active[k]] <= k).any() for k in range(self.steps)):  # longest first: a prefix is active
            raise RuntimeError(f"internal error: documents not sorted by window count: {nwin.tolist()}")
        self.offset = base + np.concatenate([[0], np.cumsum(self.active)[:-1]]).astype(np.int64)
        self.lens = [np.array([d[k] for d in docs[: self.active[k]]], np.int64) for k in range(self.steps)]
        self.size = int(self.active.sum())


class _Segment:
    """Consecutive whole documents of the plan (windows ``[first_window, end)``), buffered on the
    device as they arrive and run in groups (see the module docstring). Quacks like a batch for the
    engine: ``first_window``, ``num_windows``, ``num_scored``, ``doc_range``."""

    def __init__(self, runner: CarriedRunner, i0: int, i1: int, docs: list[tuple[int, int, np.ndarray]], B: int,
                 L: int):
        plan = runner.plan
        self.first_window, self.end = plan.first + i0, plan.first + i1
        self.num_windows = i1 - i0
        self.lengths = np.concatenate([lens for _, _, lens in docs])  # plan order
        self.num_scored = int(self.lengths.sum())
        self.doc_range = (docs[0][1], docs[-1][1])
        # Longest first (stable: equal lengths keep plan order); groups of B in that order.
        order = sorted(range(len(docs)), key=lambda d: -int(docs[d][2].sum()))
        self.groups: list[_Group] = []
        self.slot = np.empty(self.num_windows, np.int64)  # plan-order window -> buffer slot
        base = 0
        for g0 in range(0, len(order), B):
            members = order[g0 : g0 + B]
            grp = _Group([docs[d][2] for d in members], base)
            for j, d in enumerate(members):
                first = docs[d][0] - i0
                for k in range(len(docs[d][2])):
                    self.slot[first + k] = grp.offset[k] + j
            self.groups.append(grp)
            base += grp.size
        dev, n = runner.device, self.num_windows
        # Zeros: a row's columns past its window are right padding (valid ids, never scored).
        self.inputs = torch.zeros(n, L, dtype=torch.int64, device=dev)
        self.targets = torch.zeros(n, L, dtype=torch.int64, device=dev)
        self.mask = torch.zeros(n, L, dtype=torch.bool, device=dev)
        self.detailed = runner.detailed
        if self.detailed:
            self.doc_ids = torch.empty(n, L, dtype=torch.int64, device=dev)
            self.positions = torch.empty(n, L, dtype=torch.int64, device=dev)

    def take(self, batch: WindowBatch, r0: int, r1: int) -> None:
        """Copy windows ``[r0, r1)`` of a loader batch into their slots (the batch's buffers are
        reused once the loader moves on)."""
        i = batch.first_window + r0 - self.first_window
        L = batch.inputs.shape[1]
        for r in range(r0, r1):
            s = int(self.slot[i + r - r0])
            self.inputs[s, :L].copy_(batch.inputs[r])
            self.targets[s, :L].copy_(batch.targets[r])
            self.mask[s, :L].copy_(batch.score_mask[r])
            if self.detailed:
                self.doc_ids[s, :L].copy_(batch.doc_ids[r])
                self.positions[s, :L].copy_(batch.positions[r])


def _scored_index(mask_flat: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the True entries of ``mask_flat``, of which there are ``count``.

    ``nonzero_static`` sizes its result from the host-known count, so it needs no device sync
    (plain ``nonzero`` must read the count back: one sync per micro-batch). It exists for CPU and
    CUDA from torch 2.6, the minimum this project declares.
    """
    return torch.nonzero_static(mask_flat, size=count).squeeze(1)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
