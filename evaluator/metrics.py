"""Metrics stage: per-token negative log-likelihood computed in slices, and sums kept on the device.

Units: NLL in nats. Sums, never means of means: the loss is sum(NLL) / count over every scored
target, chunk and document figures are sums divided by their own counts. Sums are float64 on the
device (one fp32 addition per token would lose ~1e-7 relative per 1e7 tokens); counts are host ints
(known from the window plan, so they cost no device sync). The device is synced only to log and
at the end.

Tokenizer-independent metrics, as EleutherAI's lm-evaluation-harness defines them:
    bits_per_byte   = sum(NLL) / sum(UTF-8 bytes) / ln 2
    byte_perplexity = exp(sum(NLL) / sum(UTF-8 bytes))
    word_perplexity = exp(sum(NLL) / sum(whitespace-separated words))
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import numpy as np
import torch

from .models import ForwardOutput

__all__ = [
    "LN2",
    "MetricSums",
    "PerTokenWriter",
    "bits_per_byte",
    "byte_perplexity",
    "perplexity",
    "position_bucket_edges",
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
class MetricSums:
    """float64 NLL sums on the device: total, and (``detailed``) per window, per document and per
    log-spaced position bucket; counts of the latter two too (int64, device)."""

    def __init__(self, device: torch.device, num_windows: int, num_documents: int, max_position: int, detailed: bool):
        self.device = device
        self.detailed = detailed
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.tokens = 0  # host int: every batch says how many targets it scores
        if detailed:
            self.window_nll = torch.zeros(num_windows, dtype=torch.float64, device=device)
            self.window_tokens = torch.zeros(num_windows, dtype=torch.int64, device=device)
            self.doc_nll = torch.zeros(max(1, num_documents), dtype=torch.float64, device=device)
            self.doc_tokens = torch.zeros(max(1, num_documents), dtype=torch.int64, device=device)
            self.edges_np = position_bucket_edges(max_position)
            self.edges = torch.as_tensor(self.edges_np, device=device)
            self.bucket_nll = torch.zeros(len(self.edges_np), dtype=torch.float64, device=device)
            self.bucket_tokens = torch.zeros(len(self.edges_np), dtype=torch.int64, device=device)

    def add(self, nll: torch.Tensor, count: int, windows: torch.Tensor | None = None,
            docs: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> None:
        """Add ``count`` scored targets (``nll`` fp32 [count]) with their window, document and position."""
        # Every allocation first, then the in-place updates: an out-of-memory error raised here
        # leaves the sums as they were, never half-updated.
        n64 = nll.double()
        total = n64.sum()
        if self.detailed:
            ones = torch.ones_like(windows)
            b = torch.bucketize(positions, self.edges, right=True)  # pos p -> i with edges[i-1] <= p < edges[i]
        self.nll += total
        self.tokens += count
        if self.detailed:
            self.window_nll.index_add_(0, windows, n64)
            self.window_tokens.index_add_(0, windows, ones)
            self.doc_nll.index_add_(0, docs, n64)
            self.doc_tokens.index_add_(0, docs, ones)
            self.bucket_nll.index_add_(0, b, n64)
            self.bucket_tokens.index_add_(0, b, ones)

    def total(self) -> tuple[float, int]:
        """(sum NLL, tokens): one device sync."""
        return float(self.nll.item()), self.tokens

    _STATE = ("nll", "window_nll", "window_tokens", "doc_nll", "doc_tokens", "bucket_nll", "bucket_tokens")

    def state_dict(self) -> dict[str, Any]:
        """Every sum as a CPU tensor (exact float64/int64 copies) plus the token count: a checkpoint."""
        out: dict[str, Any] = {"tokens": self.tokens}
        for k in self._STATE:
            if hasattr(self, k):
                out[k] = getattr(self, k).cpu()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the same values, so later additions give bit-identical sums."""
        for k in self._STATE:
            if hasattr(self, k):
                mine = getattr(self, k)
                if k not in state or tuple(state[k].shape) != tuple(mine.shape) or state[k].dtype != mine.dtype:
                    raise ValueError(f"checkpoint sums {k!r} do not match this run's shape/dtype")
                mine.copy_(state[k])
        self.tokens = int(state["tokens"])

    def host(self) -> dict[str, np.ndarray]:
        """All detailed sums as numpy arrays (one sync per array, at the end only)."""
        if not self.detailed:
            return {}
        return {k: getattr(self, k).cpu().numpy() for k in
                ("window_nll", "window_tokens", "doc_nll", "doc_tokens", "bucket_nll", "bucket_tokens")}


class PerTokenWriter:
    """Per-token NLL (float32, nats) in stream order, written to a raw memmap file of known length.

    Element i is the i-th scored target in the order the semantics define (stream/document order,
    position order within it); nothing per token is ever held in a Python list.

    A named file is written as ``PATH.partial`` and renamed to ``PATH`` only by :meth:`finish`, so
    a file at ``PATH`` is always complete; ``filled`` > 0 continues a checkpointed ``.partial``
    file. Without a path the file is an anonymous temporary: it is unlinked by :meth:`finish` (the
    returned memmap stays readable: the mapping keeps the data) and by :meth:`discard` on errors,
    so nothing is left on disk either way.
    """

    def __init__(self, path: str | os.PathLike | None, total: int, filled: int = 0):
        self.total = total
        self.filled = filled
        if path is None:
            fd, tmp = tempfile.mkstemp(prefix="streameval-per-token-", suffix=".f32")
            os.close(fd)
            self.path, self._file = None, tmp
        else:
            self.path = str(path)
            self._file = self.path + ".partial"
        shape = (max(1, total),)
        if filled == total and self.path is not None and not os.path.isfile(self._file) and os.path.isfile(self.path):
            self._file = self.path  # a finished run resumed from its final checkpoint: already published
        if filled:
            if not os.path.isfile(self._file) or os.path.getsize(self._file) != shape[0] * 4:
                raise ValueError(f"per-token file {self._file!r} is missing or not {shape[0]} float32 values")
            self._mm = np.memmap(self._file, dtype=np.float32, mode="r+", shape=shape)
        else:
            self._mm = np.memmap(self._file, dtype=np.float32, mode="w+", shape=shape)

    def write(self, nll: torch.Tensor) -> None:
        n = nll.numel()
        self._mm[self.filled : self.filled + n] = nll.detach().cpu().numpy()  # syncs the device: opt-in cost
        self.filled += n

    def flush(self) -> None:
        """Make the values written so far durable (before a checkpoint records ``filled``)."""
        self._mm.flush()

    def finish(self) -> np.memmap:
        """Flush, publish the file under its final name, and return a read-only memmap of it."""
        self._mm.flush()
        del self._mm
        if self.path is None:
            out = np.memmap(self._file, dtype=np.float32, mode="r", shape=(self.total,))
            os.unlink(self._file)
            return out
        os.replace(self._file, self.path)
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(self.total,))

    def discard(self) -> None:
        """After an error: close; an anonymous temporary file is removed, a ``.partial`` one kept
        (a checkpointed run resumes into it; it never looks complete)."""
        mm = getattr(self, "_mm", None)
        if mm is not None:
            del self._mm
        if self.path is None and os.path.exists(self._file):
            os.unlink(self._file)


def summarize_chunks(window_nll: np.ndarray, window_tokens: np.ndarray) -> dict[str, Any]:
    """Per-chunk loss and perplexity lists, and their mean and (population) standard deviation."""
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = window_nll / window_tokens
    losses = [float(x) for x in loss]
    return {
        "chunk_losses": losses,
        "chunk_perplexities": [_exp(x) for x in losses],
        "avg_chunk_loss": float(np.mean(loss)) if len(loss) else math.nan,
        "std_chunk_loss": float(np.std(loss)) if len(loss) else math.nan,
    }
