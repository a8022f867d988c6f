"""Runners: one batch of windows -> NLL of its scored targets -> the metric sums.

- :class:`SlidingRunner` (``sliding``): every window is an independent sequence; ``overlap``
  targets at its start are context only. Many windows run per forward; a micro-batch that runs out
  of device memory is re-run in halves (identical results: windows are independent), and later
  batches keep the smaller size.
- :class:`CarriedRunner` (``stateful``, ``kv-cache``): one window at a time, the model's state or
  KV cache carried from window to window (reset at the start of the stream, and of every document
  in document mode). A window that runs out of memory rolls the state back and is fed in halves
  (same result: the model sees the same tokens in the same order).

OOM rule shared by both: only the forward and the loss are retried; nothing is added to the sums
until both succeeded, so a retry never counts a target twice. The cache is emptied after leaving
the ``except`` block (inside it the traceback still references the failed forward's tensors).

Hot loop rules: no device sync per batch (sums stay on the device, counts come from the plan);
per-window/per-document sums and per-token losses leave the device in blocks (one sync per block,
see metrics.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch

from streamdata.loader import WindowBatch
from streamdata.windows import WindowPlan

from .errors import ModelError
from .metrics import MetricSums, PerTokenWriter, token_nll
from .models import ForwardOutput, ModelAdapter

__all__ = ["CarriedRunner", "Runner", "SlidingRunner"]

_OOM = torch.OutOfMemoryError  # torch >= 2.5, every device type; a RuntimeError too


class Runner(ABC):
    """Feeds batches of a plan through a model into ``sums`` (and ``writer``). ``plan`` is the
    loader's (lazy) plan, whose window 0 is window ``plan.first`` of the full plan; each batch
    carries its own windows (``batch.windows``), so a runner never indexes whole-plan arrays."""

    def __init__(self, adapter: ModelAdapter, plan: WindowPlan, sums: MetricSums, writer: PerTokenWriter | None,
                 loss_slice: int, device: torch.device, scorer: Callable[..., torch.Tensor] = token_nll):
        self.adapter, self.plan, self.sums, self.writer = adapter, plan, sums, writer
        self.loss_slice, self.device, self.detailed = loss_slice, device, sums.detailed
        self.scorer = scorer

    def _score(self, out: Any, targets: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Per-target values of the scored targets ``flat`` (indices into ``targets`` flattened),
        computed in loss slices by ``scorer(out, targets, flat, loss_slice)``: the fp32 NLL
        (:func:`~evaluator.metrics.token_nll`) for a run, [count, C] statistics for a model
        comparison (:func:`evaluator.compare.pair_stats`). The one place a runner turns a forward's
        output into numbers, so a comparison swaps only this and the sums' columns."""
        return self.scorer(out, targets, flat, self.loss_slice)

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
    def __init__(self, *args: Any, batch_windows: int):
        super().__init__(*args)
        self.batch_windows = batch_windows
        self.micro = batch_windows  # windows per forward; halved after an out-of-memory error

        # A compiled model (inside adapter.compiled()) gets one static shape, [micro, chunk_size]:
        # no trimming to the longest window, short batches padded with rows of id 0, every input
        # contiguous (dynamo guards on strides too). The padding is never scored: the scored
        # indices come from the score mask of the real rows only. One graph, plus one per halving
        # after an out-of-memory error.
        self.static = self.adapter.compile_mode is not None

    def state(self) -> dict[str, Any]:
        # The micro-batch size decides how windows are grouped per forward (float results may
        # depend on it): a resumed run keeps the size the crashed one had reached.
        return {"micro": self.micro}

    def load(self, state: dict[str, Any]) -> None:
        self.micro = int(state["micro"])

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
                _empty_cache(self.device)
                continue
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
    def __init__(self, *args: Any, document_mode: bool):
        super().__init__(*args)
        self.document_mode = document_mode
        self.prev_doc: int | None = None  # document of the last window fed (document mode)
        self.started = False

    def state(self) -> dict[str, Any]:
        return {"model_state": self.adapter.save_state(), "prev_doc": self.prev_doc, "started": self.started}

    def load(self, state: dict[str, Any]) -> None:
        self.prev_doc, self.started = state["prev_doc"], bool(state["started"])
        if self.started:
            self.adapter.load_state(state["model_state"])

    def warm_up(self, ids: torch.Tensor) -> None:
        # A fresh state fed the warm-up context in chunk-size pieces (as windows would feed it),
        # nothing scored; the first window of the block then continues this state (stream mode).
        self.adapter.begin_stream()
        L = self.plan.chunk_size
        for i in range(0, ids.numel(), L):
            self.adapter.forward_stream(ids[None, i : i + L])
        self.started = True

    def step(self, batch: WindowBatch) -> None:
        a = self.adapter
        win = batch.windows  # this batch's windows of the plan (host numpy)
        for r in range(batch.num_windows):
            n = int(win.length[r])
            doc = int(win.doc[r])
            if not self.started or (self.document_mode and doc != self.prev_doc):
                a.begin_stream()
                self.started = True
            self.prev_doc = doc
            pieces = [(0, n)]  # halves of the window after an out-of-memory error
            while pieces:
                p0, p1 = pieces.pop(0)
                snap = a.snapshot()
                flat = torch.arange(p1 - p0, device=self.device)
                try:
                    out = a.forward_stream(batch.inputs[r : r + 1, p0:p1])
                    nll = self._score(out, batch.targets[r : r + 1, p0:p1], flat)
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
                if self.detailed:
                    self._record(nll, p1 - p0, torch.full_like(flat, batch.first_window + r),
                                 batch.doc_ids[r, p0:p1], batch.positions[r, p0:p1])
                else:
                    self._record(nll, p1 - p0)


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
