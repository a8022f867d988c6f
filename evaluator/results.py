"""Result assembly: the float64 sums of a finished run -> the results dict the API returns.

Keys: those of the quick reference (loss, perplexity, total_tokens, num_chunks, total_time,
tokens_per_second, avg_chunk_time) plus the resolved settings; with detail, per-chunk,
per-document and per-position figures and the tokenizer-independent metrics (see metrics.py).
"""

from __future__ import annotations

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
from .resolve import ResolvedRun

__all__ = ["summary", "detail"]


def summary(run: ResolvedRun, ed: EvalData, model_name: str, nll_sum: float, tokens: int, num_windows: int,
            total_time: float) -> dict[str, Any]:
    spec = run.spec
    return {
        "loss": nll_sum / tokens,
        "perplexity": perplexity(nll_sum, tokens),
        "total_tokens": tokens,
        "num_chunks": num_windows,
        "total_time": total_time,
        "tokens_per_second": tokens / total_time if total_time > 0 else math.inf,
        "avg_chunk_time": total_time / num_windows,
        "nll_sum": nll_sum,
        "mode": run.mode,
        "mode_reason": run.mode_reason,
        "doc_mode": spec.doc_mode,
        "chunk_size": spec.chunk_size,
        "overlap": spec.overlap,
        "tail": spec.tail,
        "batch_size": spec.batch_windows if run.mode == "sliding" else 1,
        "bos_id": spec.bos_id,
        "bos_policy": run.bos_policy,
        "max_tokens": spec.max_tokens,
        "device": str(run.device),
        "dtype": run.dtype,
        "model": model_name,
        "data": ed.name,
    }


def detail(run: ResolvedRun, ed: EvalData, sums: MetricSums, chunk_times: list[float]) -> dict[str, Any]:
    """Per-chunk, per-document and per-position figures, and bits per byte / byte and word perplexity."""
    h = sums.host()
    out: dict[str, Any] = summarize_chunks(h["window_nll"], h["window_tokens"])
    out["chunk_times"] = chunk_times
    # Byte/word metrics count only documents scored to their end, so a max_tokens cut never
    # pairs a partial NLL with a whole document's bytes (nothing is estimated).
    nd = ed.num_documents
    limit = ed.limit(run.spec.max_tokens)
    complete = ed.doc_offsets[1:] <= limit
    doc_nll, doc_tok = h["doc_nll"][:nd], h["doc_tokens"][:nd]
    nll_c = float(doc_nll[complete].sum())
    doc_bytes, doc_words = ed.doc_bytes, ed.doc_words
    nbytes = int(doc_bytes[complete].sum()) if doc_bytes is not None else None
    nwords = int(doc_words[complete].sum()) if doc_words is not None else None
    out.update(
        bits_per_byte=bits_per_byte(nll_c, nbytes),
        byte_perplexity=byte_perplexity(nll_c, nbytes),
        word_perplexity=word_perplexity(nll_c, nwords),
        total_bytes=nbytes,
        total_words=nwords,
        byte_metric_documents=int(complete.sum()) if nbytes is not None or nwords is not None else 0,
        num_documents=nd,
        # how doc_words were counted (streamdata.format.WORD_RULES): word perplexities of two rules
        # differ by far more than noise, so the figure always travels with its rule
        word_rule=word_rule_of(ed.store.manifest) if nwords is not None else None,
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        doc_loss = doc_nll / doc_tok
    out["per_document"] = {
        "tokens": doc_tok,
        "nll": doc_nll,
        "loss": doc_loss,
        "perplexity": np.exp(doc_loss),
        "bytes": doc_bytes,
        "words": doc_words,
        "complete": complete,
    }
    edges = sums.edges_np
    bt, bn = h["bucket_tokens"], h["bucket_nll"]
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
