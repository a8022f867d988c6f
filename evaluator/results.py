"""Result assembly: the float64 sums of a finished run -> :class:`RunResult` (and a comparison's
:class:`CompareResult`), whose ``to_dict()`` is the results dict the API returns.

Keys: those of the quick reference (loss, perplexity, total_tokens, num_chunks, total_time,
tokens_per_second, avg_chunk_time) plus the resolved settings; with detail, per-chunk,
per-document and per-position figures and the tokenizer-independent metrics (see metrics.py),
read from the spilled per-window and per-document files (see spill.py) in bounded memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from streamdata.format import word_rule_of

from .data import EvalData
from .metrics import (
    MetricSums,
    bits_per_byte,
    byte_perplexity,
    perplexity,
    summarize_chunks,
    word_perplexity,
)
from .provenance import SourceColumn, chunk_document_columns
from .resolve import ResolvedRun
from .spill import BlockView, block_sum

__all__ = ["CompareResult", "RunResult", "detail"]


@dataclasses.dataclass
class RunResult:
    """A finished run's results; :meth:`to_dict` gives the dict :meth:`evaluator.StreamingEvaluator.run`
    returns (its keys in this order). Units: losses in nats per target, times in seconds."""

    # ---- the quick reference's figures
    loss: float  # nll_sum / total_tokens
    perplexity: float
    total_tokens: int  # targets scored
    num_chunks: int  # windows of the plan
    total_time: float  # seconds (checkpoint writes included; with several processes the slowest one's)
    tokens_per_second: float
    avg_chunk_time: float
    nll_sum: float  # float64 sum over every target
    # ---- the resolved settings
    mode: str
    mode_reason: str
    doc_mode: str
    chunk_size: int
    overlap: int
    tail: str
    batch_size: int  # windows per forward (sliding); documents in parallel (carried, document mode)
    bos_id: int | None
    bos_policy: str
    max_tokens: int | None
    device: str
    dtype: str
    compile: str | None  # the torch.compile mode of the model body (None: eager)
    model: str
    data: str
    # carried caches: the carry check's measurement (max difference from one full forward, the
    # dtype's own rounding, the tolerance; evaluator.carry_check), else None
    carry_check: dict[str, Any] | None
    # ---- after the settings
    scored: dict[str, Any] = dataclasses.field(default_factory=dict)  # the Scoring's summary keys (a comparison's)
    world_size: int = 1
    backend: str | None = None  # torch.distributed's (None: one process)
    # keys present only when set:
    split_warmup: dict[str, Any] | None = None  # the approximation a split carried state made
    resumed_from_window: int | None = None
    batch_size_choice: dict[str, Any] | None = None  # batch_size="auto": the measured ladder (evaluator.autobatch)
    batch_size_after_oom: int | None = None  # the micro-batch an out-of-memory error left
    # ---- detail (detailed runs): the Scoring's detail keys (None on ranks other than 0), the per-token file
    detailed: bool = False
    detail: dict[str, Any] | None = None
    per_token_losses: np.ndarray | None = None  # a read-only float32 memmap
    per_token_path: str | None = None

    @staticmethod
    def of(run: ResolvedRun, ed: EvalData, model_name: str, nll_sum: float, tokens: int, num_windows: int,
           total_time: float, compile: str | None = None, **rest: Any) -> "RunResult":
        """The figures of ``tokens`` targets summing to ``nll_sum`` and the settings of ``run``;
        ``rest``: the fields after the settings."""
        spec = run.spec
        return RunResult(
            loss=nll_sum / tokens, perplexity=perplexity(nll_sum, tokens), total_tokens=tokens, num_chunks=num_windows,
            total_time=total_time, tokens_per_second=tokens / total_time if total_time > 0 else math.inf,
            avg_chunk_time=total_time / num_windows, nll_sum=nll_sum,
            mode=run.mode, mode_reason=run.mode_reason, doc_mode=spec.doc_mode, chunk_size=spec.chunk_size,
            overlap=spec.overlap, tail=spec.tail, batch_size=run.batch_windows, bos_id=spec.prepend_bos_id,
            bos_policy=run.bos_policy, max_tokens=spec.max_tokens, device=str(run.device), dtype=run.dtype,
            compile=compile, model=model_name, data=ed.name,
            carry_check=None if run.carry_check is None else run.carry_check.to_dict(), **rest)

    def to_dict(self) -> dict[str, Any]:
        """The results dict (the same keys, order and values the API has always returned; arrays
        and memmaps shared, not copied)."""
        out = {k: getattr(self, k) for k in _SETTINGS}
        out.update(self.scored)
        out.update(world_size=self.world_size, backend=self.backend)
        out.update((k, getattr(self, k)) for k in _WHEN_SET if getattr(self, k) is not None)
        if self.detail is not None:
            out.update(self.detail)
        if self.detailed:
            out.update(per_token_losses=self.per_token_losses, per_token_path=self.per_token_path)
        return out


_NAMES = [f.name for f in dataclasses.fields(RunResult)]
_SETTINGS = _NAMES[: _NAMES.index("scored")]  # the figures and the settings, always present
_WHEN_SET = ("split_warmup", "resumed_from_window", "batch_size_choice", "batch_size_after_oom")


@dataclasses.dataclass
class CompareResult:
    """A model comparison's results (:func:`evaluator.compare.compare_streaming`); :meth:`to_dict`
    gives the dict it returns. ``run``: the candidate's run scored with the comparison's
    :class:`~evaluator.scoring.Scoring` (its sums' statistics, kl_mean ... nll_sum_reference, in
    ``run.scored``; its per-token file holds the per-token KL)."""

    run: RunResult
    kl_min: float
    kl_max: float
    kl_quantiles: dict[str, float]  # kl_median, kl_p90, ... (evaluator.compare.QUANTILES), exact
    candidate: str  # model names
    reference: str
    reference_device: str
    compared_vocab: int  # the ids compared (the shared prefix with allow_vocab_prefix)
    vocab_candidate: int
    vocab_reference: int
    models: dict[str, Any]  # PairAdapter.describe()

    @property
    def per_token_kl(self) -> np.ndarray | None:
        """The per-token KL(ref || cand), float32 nats (a read-only memmap)."""
        return self.run.per_token_losses

    @property
    def per_token_kl_path(self) -> str | None:
        return self.run.per_token_path

    def to_dict(self) -> dict[str, Any]:
        out = self.run.to_dict()
        del out["per_token_losses"], out["per_token_path"]
        out.update(per_token_kl=self.per_token_kl, per_token_kl_path=self.per_token_kl_path,
                   kl_min=self.kl_min, kl_max=self.kl_max)
        out.update(self.kl_quantiles)
        out.update(candidate=self.candidate, reference=self.reference, reference_device=self.reference_device,
                   compared_vocab=self.compared_vocab, vocab_candidate=self.vocab_candidate,
                   vocab_reference=self.vocab_reference, models=self.models)
        return out


def detail(run: ResolvedRun, ed: EvalData, sums: MetricSums, files: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-chunk, per-document and per-position figures, and bits per byte / byte and word perplexity.

    ``files``: the spilled per-window and per-document columns (read-only memmaps, see
    :mod:`evaluator.spill`). Nothing here holds a whole column in memory: chunk and document
    losses are :class:`~evaluator.spill.BlockView` s over them, sums are taken block by block.
    """
    out: dict[str, Any] = summarize_chunks(files["window_nll"], files["window_tokens"])
    out["chunk_times"] = files["window_seconds"]
    out["chunk_documents"] = chunk_document_columns(ed.doc_offsets, run.spec)  # what each chunk scored
    # Byte/word metrics count only documents scored to their end, so a max_tokens cut never
    # pairs a partial NLL with a whole document's bytes (nothing is estimated). Documents end in
    # order, so the complete ones are a prefix [0, c): found by bisection, summed in blocks.
    nd = ed.num_documents
    limit = ed.limit(run.spec.max_tokens)
    ends = ed.doc_offsets[1:]
    c = int(np.searchsorted(ends, limit, side="right"))
    doc_nll, doc_tok = files["document_nll"][:nd], files["document_tokens"][:nd]
    nll_c = float(block_sum(doc_nll, c))
    doc_bytes, doc_words = ed.doc_bytes, ed.doc_words
    nbytes = int(block_sum(doc_bytes, c)) if doc_bytes is not None else None
    nwords = int(block_sum(doc_words, c)) if doc_words is not None else None
    out.update(
        bits_per_byte=bits_per_byte(nll_c, nbytes),
        byte_perplexity=byte_perplexity(nll_c, nbytes),
        word_perplexity=word_perplexity(nll_c, nwords),
        total_bytes=nbytes,
        total_words=nwords,
        byte_metric_documents=c if nbytes is not None or nwords is not None else 0,
        num_documents=nd,
        # how doc_words were counted (streamdata.format.WORD_RULES): word perplexities of two rules
        # differ by far more than noise, so the figure always travels with its rule
        word_rule=word_rule_of(ed.store.manifest) if nwords is not None else None,
    )
    out["per_document"] = {
        "tokens": doc_tok,
        "nll": doc_nll,
        "loss": BlockView(np.divide, doc_nll, doc_tok),
        "perplexity": BlockView(lambda a, b: np.exp(a / b), doc_nll, doc_tok),
        "bytes": doc_bytes,
        "words": doc_words,
        "complete": BlockView(lambda e: e <= limit, ends, dtype=bool),
        # where each document came from, as tokenize recorded it (empty when the store did not)
        "source_file": SourceColumn(ed.store, "file", nd),
        "source_row": SourceColumn(ed.store, "row", nd),
    }
    edges, bn, bt = sums.buckets()
    last = int(np.flatnonzero(bt)[-1]) + 1 if bt.any() else 0
    with np.errstate(divide="ignore", invalid="ignore"):
        bl = bn[:last] / bt[:last]
    out["position_buckets"] = {
        "lo": np.concatenate([[0], edges[: last - 1]]).astype(np.int64) if last else np.zeros(0, np.int64),
        "hi": edges[:last].copy(),
        "tokens": bt[:last],
        "nll": bn[:last],
        "loss": bl,
        "perplexity": np.exp(bl),
    }
    return out
