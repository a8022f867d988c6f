"""Metrics stage: per-token negative log-likelihood computed in slices, and sums kept on the device.

Units: NLL in nats. Sums, never means of means: the loss is sum(NLL) / count over every scored
target, chunk and document figures are sums divided by their own counts. Sums are float64 on the
device (one fp32 addition per token would lose ~1e-7 relative per 1e7 tokens); counts are host ints
(known from the window plan, so they cost no device sync). The device is synced only to log, to
move a block of per-window/per-document sums to their files (every few thousand windows) and at
the end.

Tokenizer-independent metrics, as EleutherAI's lm-evaluation-harness defines them:
    bits_per_byte   = sum(NLL) / sum(UTF-8 bytes) / ln 2
    byte_perplexity = exp(sum(NLL) / sum(UTF-8 bytes))
    word_perplexity = exp(sum(NLL) / sum(whitespace-separated words))
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import numpy as np
import torch

from .models import ForwardOutput
from .run_folder import PrefixDigest, damaged, partial
from .spill import BLOCK, BlockView

__all__ = [
    "BUCKET_EDGES",
    "LN2",
    "MetricSums",
    "PerTokenWriter",
    "bits_per_byte",
    "byte_perplexity",
    "perplexity",
    "position_bucket_edges",
    "publish_per_token",
    "token_nll",
    "word_perplexity",
]

LN2 = math.log(2.0)


# ---- formulas (host floats) -------------------------------------------------------------------
def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(sum NLL / tokens): the token-level perplexity."""
    return _exp(nll_sum / tokens) if tokens else math.nan


def bits_per_byte(nll_sum: float, nbytes: int | None) -> float | None:
    return None if not nbytes else nll_sum / nbytes / LN2


def byte_perplexity(nll_sum: float, nbytes: int | None) -> float | None:
    return None if not nbytes else _exp(nll_sum / nbytes)


def word_perplexity(nll_sum: float, nwords: int | None) -> float | None:
    return None if not nwords else _exp(nll_sum / nwords)


def position_bucket_edges(max_position: int) -> np.ndarray:
    """Upper edges of log-spaced position buckets [0,1), [1,2), [2,4), [4,8), ... covering max_position."""
    k = 1
    while (1 << (k - 1)) <= max_position:
        k += 1
    return np.array([1 << i for i in range(k)], np.int64)


# ---- the loss, in slices ----------------------------------------------------------------------
def token_nll(out: ForwardOutput, targets: torch.Tensor, flat_idx: torch.Tensor, loss_slice: int) -> torch.Tensor:
    """fp32 NLL (nats) of the targets at ``flat_idx`` (indices into ``targets.reshape(-1)``, ascending).

    Only ``loss_slice`` rows of [tokens, vocab] logits exist at a time, in fp32: with hidden states
    the head runs per slice (so the model's own logits are never built); with full logits only the
    fp32 upcast is sliced. Positions that are padding or context-only are never sent through the
    head at all.
    """
    m = flat_idx.numel()
    tg = targets.reshape(-1).index_select(0, flat_idx)
    nll = torch.empty(m, dtype=torch.float32, device=targets.device)
    hidden = out.logits is None
    rows = (out.hidden if hidden else out.logits).flatten(0, -2)
    for i in range(0, m, loss_slice):
        idx = flat_idx[i : i + loss_slice]
        # A fresh fp32 slice that _nll_inplace may overwrite. The low-precision slice (the head's
        # output or the index_select) is a temporary of this expression, freed as soon as it ends.
        z = (out.head(rows.index_select(0, idx)) if hidden else rows.index_select(0, idx)).float()
        nll[i : i + loss_slice] = _nll_inplace(z, tg[i : i + loss_slice])
        del z
    return nll


def _nll_inplace(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NLL = logsumexp(z) - z[target] per row of fp32 logits ``z`` [rows, vocab]; overwrites ``z``.

    Memory: the max-shift and exp run in place, so a slice costs one fp32 [rows, vocab] (plus the
    low-precision slice while it is upcast); ``cross_entropy`` would add a second fp32 copy (its
    log-softmax output).
    """
    picked = z.gather(1, target[:, None]).squeeze(1)
    zmax = z.amax(dim=1, keepdim=True)
    lse = z.sub_(zmax).exp_().sum(dim=1).log_().add_(zmax.squeeze(1))
    return lse - picked


# ---- sums on the device -----------------------------------------------------------------------
#: Position buckets [0,1), [1,2), [2,4), ..., [2^61, 2^62): a fixed set that covers any position, so
#: their device arrays never depend on the data (results trim the empty buckets at the end).
BUCKET_EDGES = position_bucket_edges(1 << 61)


class MetricSums:
    """float64 NLL sums on the device, in memory that does not grow with the stream.

    Always: the total NLL (a 0-d float64 tensor) and the scored-token count (a host int: every
    batch says how many targets it scores). With ``detailed``: NLL sums and int64 counts per
    log-spaced position bucket (fixed size, :data:`BUCKET_EDGES`), and per window and per document
    in *blocks*: the device holds the windows and documents of the last few batches only; a block
    leaves the device (one sync, :meth:`flush`) into ``spill`` (:class:`evaluator.spill.SpillFiles`)
    when full, at checkpoints and at the end.

    Why results stay bit-identical to full device arrays: every window is scored inside one batch,
    so its block cell starts at 0 and receives the same additions in the same order. Documents do
    span batches: windows come in global order, so no batch touches a document before the last one
    its predecessor touched; at a flush every earlier document is final, and the last one's cell is
    carried (an exact float64 copy) to the start of the emptied block and keeps accumulating in
    place, as it would have in a full array. Caller protocol: :meth:`begin_batch` with the batch's
    windows and document range (host ints) before the runner adds its targets.
    """

    def __init__(self, device: torch.device, detailed: bool, spill: Any = None,
                 seconds: Callable[[int], np.ndarray] | None = None, block_windows: int = 4096,
                 block_documents: int = 4096, columns: tuple[str, ...] = ("nll",)):
        self.device = device
        self.detailed = detailed
        # Value columns summed per target: ("nll",) for a run (every sum a scalar per cell, as
        # always); more for a model comparison (evaluator/compare.py), whose values arrive as
        # [count, C] and whose sums carry a trailing axis of C. Column j spills as window_<name>
        # and document_<name>.
        self.columns = tuple(columns)
        c = () if len(self.columns) == 1 else (len(self.columns),)
        self._c = c
        self.nll = torch.zeros(c, dtype=torch.float64, device=device)
        self.tokens = 0  # host int: every batch says how many targets it scores
        if detailed:
            if spill is None:
                raise ValueError("detailed MetricSums need a spill (evaluator.spill.SpillFiles)")
            self.spill = spill
            self._seconds = seconds  # n -> seconds of the next n windows (the engine's timer), or None
            self.edges_np = BUCKET_EDGES
            self.edges = torch.as_tensor(BUCKET_EDGES, device=device)
            self.bucket_nll = torch.zeros((len(BUCKET_EDGES), *c), dtype=torch.float64, device=device)
            self.bucket_tokens = torch.zeros(len(BUCKET_EDGES), dtype=torch.int64, device=device)
            # Blocks: window ids [w_base, w_end) and documents [d_base, d_last] live on the device.
            self.window_nll = torch.zeros((block_windows, *c), dtype=torch.float64, device=device)
            self.window_tokens = torch.zeros(block_windows, dtype=torch.int64, device=device)
            self.doc_nll = torch.zeros((block_documents, *c), dtype=torch.float64, device=device)
            self.doc_tokens = torch.zeros(block_documents, dtype=torch.int64, device=device)
            self.w_base = self.w_end = 0
            self.d_base: int | None = None
            self.d_last: int | None = None

    # ---- blocks ----------------------------------------------------------------------------
    # Blocks made inside the engine's inference mode are inference tensors, which may be updated
    # in place only inside inference mode: the methods that touch them always run in it.
    @torch.inference_mode()
    def begin_batch(self, first_window: int, num_windows: int, doc_first: int, doc_last: int) -> None:
        """Make room for a batch of windows ``[first_window, +num_windows)`` whose span lies in
        documents ``doc_first..doc_last`` (host ints from the plan: no device sync)."""
        if not self.detailed:
            return
        full_w = self.w_end - self.w_base + num_windows > len(self.window_nll)
        full_d = self.d_base is not None and doc_last - self.d_base + 1 > len(self.doc_nll)
        if full_w or full_d:
            self.flush()
        if num_windows > len(self.window_nll):  # a batch larger than the block (the block is empty now)
            self.window_nll = torch.zeros((num_windows, *self._c), dtype=torch.float64, device=self.device)
            self.window_tokens = torch.zeros(num_windows, dtype=torch.int64, device=self.device)
        if self.w_end == self.w_base:  # empty block: it starts wherever the batches do (resume, rank block)
            self.w_base = self.w_end = first_window
        elif first_window != self.w_end:
            raise RuntimeError(f"internal error: batch starts at window {first_window}, the sums expect {self.w_end}")
        self.w_end += num_windows
        if self.d_base is None:
            self.d_base = self.d_last = doc_first
        # doc_first may lie before d_base: with overlap (or a right-aligned tail window) a batch
        # re-reads earlier tokens as context, but its *scored* targets never precede the last
        # target of the batch before, so they all fall in documents >= d_base.
        need = doc_last - self.d_base + 1
        if need > len(self.doc_nll):
            # Only a span of many empty documents gets here (the loader reads their offsets too).
            # Grow in place of flushing: the carried cell and the block's cells are copied exactly.
            cap = 1 << (need - 1).bit_length()
            kept = self.d_last - self.d_base + 1
            nll = torch.zeros((cap, *self._c), dtype=torch.float64, device=self.device)
            tok = torch.zeros(cap, dtype=torch.int64, device=self.device)
            nll[:kept].copy_(self.doc_nll[:kept])
            tok[:kept].copy_(self.doc_tokens[:kept])
            self.doc_nll, self.doc_tokens = nll, tok
        self.d_last = max(self.d_last, doc_last)

    @torch.inference_mode()
    def flush(self) -> None:
        """Copy the block to the spill files (one device sync) and empty it, carrying the last
        document's running sums (it may continue in the next batch)."""
        if not self.detailed:
            return
        nw = self.w_end - self.w_base
        nd = 0 if self.d_base is None else self.d_last - self.d_base + 1
        if nw == 0 and nd == 0:
            return
        # One transfer: the int64 counts travel bit for bit as float64-typed views.
        k = len(self.columns)  # values per cell (row-major [n, k] blocks, flattened)
        host = torch.cat([self.window_nll[:nw].reshape(-1), self.window_tokens[:nw].view(torch.float64),
                          self.doc_nll[:nd].reshape(-1), self.doc_tokens[:nd].view(torch.float64)]).cpu().numpy()
        wv, wt = host[: nw * k].reshape(nw, k), host[nw * k : nw * k + nw]
        dv, dt = host[nw * k + nw : nw * k + nw + nd * k].reshape(nd, k), host[nw * k + nw + nd * k :]
        if nw:
            for j, name in enumerate(self.columns):
                self.spill.write(f"window_{name}", self.w_base, wv[:, j])
            self.spill.write("window_tokens", self.w_base, wt.view(np.int64))
            if self._seconds is not None:  # after the sync above: timing events have completed
                self.spill.write("window_seconds", self.w_base, self._seconds(nw))
            self.window_nll[:nw].zero_()
            self.window_tokens[:nw].zero_()
            self.w_base = self.w_end
        if nd:
            for j, name in enumerate(self.columns):
                self.spill.write(f"document_{name}", self.d_base, dv[:, j])
            self.spill.write("document_tokens", self.d_base, dt.view(np.int64))
            self.doc_nll[:1].copy_(self.doc_nll[nd - 1 : nd])
            self.doc_tokens[:1].copy_(self.doc_tokens[nd - 1 : nd])
            self.doc_nll[1:nd].zero_()
            self.doc_tokens[1:nd].zero_()
            self.d_base = self.d_last

    # ---- sums ------------------------------------------------------------------------------
    def add(self, nll: torch.Tensor, count: int, windows: torch.Tensor | None = None,
            docs: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        """Add ``count`` scored targets (``nll`` fp32 [count], or [count, C] with C columns) with
        their global window and document ids and positions (within the batch announced by
        :meth:`begin_batch`)."""
        # Every allocation first, then the in-place updates: an out-of-memory error raised here
        # leaves the sums as they were, never half-updated.
        n64 = nll.double()
        total = n64.sum() if n64.dim() == 1 else n64.sum(0)  # (a run's reduction exactly as before)
        if self.detailed:
            ones = torch.ones_like(windows)
            b = torch.bucketize(positions, self.edges, right=True)  # pos p -> i with edges[i-1] <= p < edges[i]
            wi = windows - self.w_base
            di = docs - self.d_base
        self.nll += total
        self.tokens += count
        if self.detailed:
            self.window_nll.index_add_(0, wi, n64)
            self.window_tokens.index_add_(0, wi, ones)
            self.doc_nll.index_add_(0, di, n64)
            self.doc_tokens.index_add_(0, di, ones)
            self.bucket_nll.index_add_(0, b, n64)
            self.bucket_tokens.index_add_(0, b, ones)

    def total(self) -> tuple[float, int]:
        """(sum NLL, tokens): one device sync (the first column's sum when there are several)."""
        return float(self.nll.reshape(-1)[0].item()), self.tokens

    def totals(self) -> np.ndarray:
        """float64 sums of every column [C] (one device sync)."""
        return self.nll.reshape(-1).cpu().numpy()

    def buckets(self, column: int | None = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(upper edges, sums, token counts) of the position buckets (one sync; the end only). The
        sums of value column ``column`` ([buckets]; the first, the NLL, by default), or of every
        column ([buckets, C]) with ``column=None``."""
        sums = self.bucket_nll
        if column is not None and sums.dim() == 2:
            sums = sums[:, column]
        return self.edges_np, sums.cpu().numpy(), self.bucket_tokens.cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: the total, the bucket sums, and how far the spill files are valid, as exact
        CPU copies. Flushes the block and makes the spill files durable first, so the state never
        points past what is on disk."""
        out: dict[str, Any] = {"tokens": self.tokens, "nll": self.nll.cpu()}
        if self.detailed:
            self.flush()
            self.spill.sync()
            out.update(bucket_nll=self.bucket_nll.cpu(), bucket_tokens=self.bucket_tokens.cpu(),
                       window_base=self.w_base, doc_base=-1 if self.d_base is None else self.d_base,
                       doc_carry_nll=self.doc_nll[:1].cpu(), doc_carry_tokens=self.doc_tokens[:1].cpu())
        return out

    @torch.inference_mode()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the same values, so later additions give bit-identical sums."""
        pairs = [("nll", self.nll)]
        if self.detailed:
            pairs += [("bucket_nll", self.bucket_nll), ("bucket_tokens", self.bucket_tokens),
                      ("doc_carry_nll", self.doc_nll[:1]), ("doc_carry_tokens", self.doc_tokens[:1])]
        for k, mine in pairs:
            if k not in state or tuple(state[k].shape) != tuple(mine.shape) or state[k].dtype != mine.dtype:
                raise ValueError(f"checkpoint sums {k!r} do not match this run's shape/dtype")
        for k, mine in pairs:
            mine.copy_(state[k])
        self.tokens = int(state["tokens"])
        if self.detailed:
            self.w_base = self.w_end = int(state["window_base"])
            d = int(state["doc_base"])
            self.d_base = self.d_last = None if d < 0 else d


class PerTokenWriter:
    """Per-token NLL (float32, nats) in stream order, written to a raw file of known length.

    Element i is the i-th scored target in the order the semantics define (stream/document order,
    position order within it); nothing per token is ever held in a Python list. The values are
    gathered on the device in a block of ``block`` floats and leave it when the block is full (one
    sync per block, not per batch), written with ``pwrite`` (no writable mapping, so written pages
    do not count in the process's RSS).

    The file holds ``total`` values; this writer writes its slice ``[base, base + count)`` (``count``
    default ``total - base``; ``filled`` and ``total`` attributes count the slice's values). One
    process: ``base`` 0, the whole file, created here. Under torchrun every rank writes its own
    slice of one ``file`` that :func:`evaluator.distributed.shared_per_token_file` created; its
    creator (rank 0) publishes it with :func:`publish_per_token` once every rank has flushed, and
    only the creator's ``anonymous`` writer removes it on errors.

    A named file is written as ``PATH.partial`` and renamed to ``PATH`` only when published, so a
    file at ``PATH`` is always complete; ``filled`` > 0 continues a checkpointed ``.partial`` file.
    Without a path the file is an anonymous temporary: it is unlinked when published (the returned
    memmap stays readable: the mapping keeps the data) and by :meth:`discard` on errors, so nothing
    is left on disk either way.

    ``record`` (a resume, ``filled`` > 0): the checkpoint's record of the file; the values it
    relies on (the first ``filled``) must match their digest (evaluator/run_folder.py). The values
    after them are written again by the resumed run.

    ``column``: the values written come as [m, C] per-target statistics (a model comparison) and
    this column is the one the file keeps; None: [m] values.
    """

    _WHAT = "per-token file"

    # A context manager around each of the writer's syncs (a block drained to the host): the
    # engine's sync debug mode lifts itself there (evaluator/sync_debug.py); nothing by default.
    _allow_sync: Callable[[], ContextManager[Any]] = staticmethod(nullcontext)

    def __init__(self, path: str | os.PathLike | None, total: int, filled: int = 0, block: int = 1 << 20,
                 allow_sync: Callable[[], ContextManager[Any]] | None = None, record: dict[str, Any] | None = None,
                 *, file: str | None = None, base: int = 0, count: int | None = None,
                 anonymous: bool | None = None, column: int | None = None):
        if allow_sync is not None:
            self._allow_sync = allow_sync
        self.path = None if path is None else str(path)
        self.base = base  # first value of this writer's slice (a torchrun rank's offset)
        self.column = column  # values come as [m, C] statistics: this column is written (None: [m] values)
        self.total = total - base if count is None else count  # values of the slice
        self._size = max(1, total) * 4  # bytes of the whole file
        self.own_file = file is None  # created (and published by finish) here
        self.anonymous = self.path is None if anonymous is None else anonymous  # removed by discard
        self.filled = filled  # values accepted (on disk or in the device block)
        self._written = filled  # values on disk
        self._block, self._buf, self._k = block, None, 0
        if file is not None:
            self._file = file
        elif self.path is None:
            self._file = temp_per_token_file()
        else:
            self._file = named_per_token_file(self.path) if filled == total else partial(self.path)
        if filled:  # (a shared file: this slice only, the other ranks check theirs; rank 0 sized it)
            self._digest = self._resume(record, self._size if self.own_file else None)
            self._fd = os.open(self._file, os.O_RDWR)
        elif self.own_file:
            self._fd = os.open(self._file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(self._fd, self._size)  # sparse: disk is used as values arrive
            self._digest = PrefixDigest(0)
        else:
            self._fd = os.open(self._file, os.O_RDWR)
            self._digest = PrefixDigest(base * 4)

    @property
    def file(self) -> str:
        """The file written now (``PATH.partial``, a temporary file, or a shared file)."""
        return self._file

    def _resume(self, record: dict[str, Any] | None, size: int | None) -> PrefixDigest:
        """Check the file a resume continues: its record's digest, else (no record) its size."""
        if record is not None:
            return PrefixDigest.resume(self._file, record, self._WHAT)
        if not os.path.isfile(self._file):
            raise damaged(self._file, self._WHAT, "it is missing")
        if size is not None and os.path.getsize(self._file) != size:
            raise damaged(self._file, self._WHAT, f"it is not {size // 4} float32 values")
        d = PrefixDigest(self.base * 4)
        d.extend_file(self._file, (self.base + self.filled) * 4)
        return d

    def digest(self) -> dict[str, Any] | None:
        """The checkpoint's record of the values written so far (call after :meth:`flush`);
        None for an anonymous temporary file (nothing resumes from it)."""
        if self.path is None:
            return None
        self._digest.extend(self._fd, (self.base + self._written) * 4)
        return self._digest.record(self._file, os.fstat(self._fd).st_size)

    def write(self, nll: torch.Tensor) -> None:
        if self.column is not None:
            nll = nll[:, self.column]
        n = nll.numel()
        if self._k + n > self._block:
            self._drain()
        if n > self._block:  # larger than the block: straight to the file (a sync)
            with self._allow_sync():
                self._pwrite(nll.detach().cpu().numpy())
        else:
            if self._buf is None or self._buf.device != nll.device:
                self._drain()
                self._buf = torch.empty(self._block, dtype=torch.float32, device=nll.device)
            self._buf[self._k : self._k + n].copy_(nll.detach())
            self._k += n
        self.filled += n

    def _pwrite(self, values: np.ndarray) -> None:
        view, pos = memoryview(np.ascontiguousarray(values, dtype="<f4").tobytes()), (self.base + self._written) * 4
        self._written += len(values)
        while view:
            k = os.pwrite(self._fd, view, pos)
            view, pos = view[k:], pos + k

    def _drain(self) -> None:
        if self._k:
            with self._allow_sync():
                self._pwrite(self._buf[: self._k].cpu().numpy())  # the one sync per block
            self._k = 0

    def flush(self) -> None:
        """Make the values written so far durable (before a checkpoint records ``filled``)."""
        self._drain()
        os.fsync(self._fd)

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._buf = None

    def finish(self) -> np.memmap | None:
        """Flush and close; a file created here is published (:func:`publish_per_token`) and
        returned as a read-only memmap. A shared file: None (its creator publishes it once every
        writer has finished)."""
        self.flush()
        self._close()
        return publish_per_token(self._file, self.path, self.total) if self.own_file else None

    def discard(self) -> None:
        """After an error: close; an anonymous temporary file is removed, a ``.partial`` one kept
        (a checkpointed run resumes into it; it never looks complete)."""
        self._close()
        if self.anonymous and os.path.exists(self._file):
            os.unlink(self._file)


def temp_per_token_file() -> str:
    """A new empty temporary per-token file (an anonymous run's; removed when published)."""
    fd, tmp = tempfile.mkstemp(prefix="streameval-per-token-", suffix=".f32")
    os.close(fd)
    return tmp


def named_per_token_file(path: str) -> str:
    """The file a run with the final name ``path`` writes: ``PATH.partial``, or ``PATH`` itself
    when a finished run resumes from its final checkpoint (already published)."""
    file = partial(path)
    return path if not os.path.isfile(file) and os.path.isfile(path) else file


def publish_per_token(file: str, path: str | None, total: int) -> np.memmap:
    """The finished per-token ``file`` of ``total`` values as a read-only memmap, under its final
    name ``path`` (renamed; a ``PATH`` file is always complete), or, without a path, of the
    temporary file unlinked at once (the mapping keeps the data; nothing is left on disk)."""
    if path is None:
        out = np.memmap(file, dtype=np.float32, mode="r", shape=(total,))
        os.unlink(file)
        return out
    if file != path:
        os.replace(file, path)
    return np.memmap(path, dtype=np.float32, mode="r", shape=(total,))


def summarize_chunks(window_nll: Any, window_tokens: Any, block: int = BLOCK) -> dict[str, Any]:
    """Per-chunk loss and perplexity (read-only arrays computed ``block`` rows at a time from the
    spilled sums, see :class:`evaluator.spill.BlockView`), and their mean and (population) standard
    deviation, computed in bounded memory."""
    losses = BlockView(np.divide, window_nll, window_tokens, block=block)
    n = len(losses)
    if n == 0:
        mean = std = math.nan
    elif n <= block:  # one block: numpy's own mean and std of the whole array, as always
        loss = losses[:]
        mean, std = float(np.mean(loss)), float(np.std(loss))
    else:  # two passes over the file: the mean, then the squared deviations (no cancellation)
        mean = math.fsum(float(b.sum()) for b in losses.blocks()) / n
        std = math.sqrt(math.fsum(float(np.square(b - mean).sum()) for b in losses.blocks()) / n)
    return {
        "chunk_losses": losses,
        "chunk_perplexities": BlockView(lambda a, b: np.exp(a / b), window_nll, window_tokens, block=block),
        "avg_chunk_loss": mean,
        "std_chunk_loss": std,
    }
