"""Report stage: results of one evaluation -> terminal table, results.json, CSV tables, PNG plots.

Files written to ``out``:

    results.json       scalar metrics, the resolved settings, store identity (manifest: format,
                       tokenizer, source, totals), model identity, library versions, machine, time
    chunks.csv         one row per chunk (window): index, loss, perplexity, seconds, and the first and
                       last document its scored targets lie in (first_document, last_document)
    documents.csv      one row per document: tokens scored, nll, loss, perplexity, bytes, words, complete,
                       and its source as tokenize recorded it (source_file and source_row: a file and
                       its row, or an empty file and the dataset row; both empty when the store
                       records none): ``streamdata show STORE --doc N`` prints its text
    positions.csv      loss by position in the document, log-spaced buckets [lo, hi)
    perplexity_per_chunk.png, loss_by_position.png   (matplotlib, Agg backend; skipped with a note
                       when matplotlib is missing; over 20,000 chunks, each point is the mean
                       loss of an equal group of consecutive chunks)

A model comparison (``streameval compare``, evaluator/compare.py) writes the same files (its
per-chunk and byte/word figures are the candidate's), with the comparison's scalars in
results.json and the table, more columns in documents.csv and positions.csv (reference NLL, mean
KL, top-1 agreement, mean delta NLL), and two more plots: kl_by_position.png (mean KL per position
bucket) and kl_histogram.png (the per-token KL, read block by block from its memory-mapped file).

Arrays stay out of results.json so it stays small for 1B-token runs; the CSVs hold them. The CSVs
are written block by block from the spilled arrays (:mod:`evaluator.spill`: window_*.npy and
document_*.npy, which the engine leaves in the same folder), never built as whole tables, so
writing a report of 10^8 chunks takes memory of one block.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .run_folder import REPORT_FILES, temporary
from .spill import BLOCK

__all__ = ["format_table", "write_report", "versions"]

_SCALARS = (
    "loss", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity", "total_tokens", "num_chunks",
    "num_documents", "total_bytes", "total_words", "byte_metric_documents", "total_time", "tokens_per_second",
    "avg_chunk_time", "avg_chunk_loss", "std_chunk_loss", "nll_sum", "mode", "doc_mode", "chunk_size", "overlap",
    "tail", "batch_size", "batch_size_choice", "batch_size_after_oom", "bos_id", "bos_policy", "max_tokens", "device", "dtype", "model", "data",
    "per_token_path", "mode_reason", "resumed_from_window", "word_rule", "world_size", "backend",
    # a model comparison (evaluator/compare.py); loss/perplexity above are then the candidate's
    "candidate", "reference", "reference_device", "compared_vocab", "vocab_candidate", "vocab_reference",
    "kl_mean", "kl_stderr", "kl_min", "kl_median", "kl_p90", "kl_p95", "kl_p99", "kl_p999", "kl_max", "kl_sum",
    "top1_agreement", "top1_agreement_stderr", "candidate_top1_accuracy", "loss_candidate", "loss_reference",
    "perplexity_candidate", "perplexity_reference", "perplexity_ratio", "delta_nll_mean", "nll_sum_reference",
    "per_token_kl_path",
)

#: The comparison's summary rows: (label, key).
_COMPARE_ROWS = (
    ("KL(reference || candidate) mean", "kl_mean"), ("  standard error", "kl_stderr"), ("  median", "kl_median"),
    ("  90th percentile", "kl_p90"), ("  95th percentile", "kl_p95"), ("  99th percentile", "kl_p99"),
    ("  maximum", "kl_max"), ("top-1 agreement (%)", "top1_agreement"),
    ("perplexity candidate", "perplexity_candidate"), ("perplexity reference", "perplexity_reference"),
    ("perplexity ratio (cand/ref)", "perplexity_ratio"), ("mean delta NLL (cand - ref)", "delta_nll_mean"),
    ("candidate top-1 accuracy (%)", "candidate_top1_accuracy"),
)


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("streamdata", "torch", "numpy", "transformers", "tokenizers", "datasets", "zarr"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and abs(v) < 0.01:  # a small KL or standard error: significant digits, never 0.0000
            return f"{v:.4g}"
        return f"{v:,.4f}" if abs(v) < 1000 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(res: dict[str, Any]) -> str:
    """The human summary printed at the end of a run."""
    rows = [
        ("data", res.get("data")),
        ("model", res.get("model")),
        ("mode", f"{res.get('mode')} / {res.get('doc_mode')}  chunk {res.get('chunk_size')}  overlap {res.get('overlap')}  "
                 f"batch {res.get('batch_size')}  {res.get('device')} {res.get('dtype')}"),
        ("scored tokens", res.get("total_tokens")),
        ("chunks", res.get("num_chunks")),
        ("loss (nats/token)", res.get("loss")),
        ("perplexity", res.get("perplexity")),
        ("bits per byte", res.get("bits_per_byte")),
        ("byte perplexity", res.get("byte_perplexity")),
        # labelled with the rule that counted the words (lm-eval's, or the older str-split)
        (f"word perplexity ({res['word_rule']} words)" if res.get("word_rule") else "word perplexity",
         res.get("word_perplexity")),
        ("time (s)", res.get("total_time")),
        ("tokens/s", res.get("tokens_per_second")),
    ]
    if res.get("byte_metric_documents") is not None and res.get("num_documents"):
        rows.insert(8, ("byte/word metrics over", f"{res['byte_metric_documents']:,} of {res['num_documents']:,} documents (complete ones)"))
    if "kl_mean" in res:  # a comparison: its figures replace the single model's
        rows = rows[:5] + [(k, res.get(v)) for k, v in _COMPARE_ROWS] + rows[-2:]
        rows[1] = ("models", f"candidate {res.get('candidate')}  reference {res.get('reference')} "
                             f"({res.get('reference_device')})")
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {_fmt(v)}" for k, v in rows)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return _json_safe(float(v))
    return v


def _save_png(fig: Any, path: Path) -> Path:
    """Lay out, write atomically (a temporary name, then a rename: never a half-written plot) and
    close ``fig``; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(temporary(path), dpi=120, format="png")
    os.replace(temporary(path), path)
    plt.close(fig)
    return path


def _blocks(col: Any, n: int, size: int) -> Any:
    """Consecutive blocks of ``col[:n]`` as Python lists (None: a column of None)."""
    for lo in range(0, n, size):
        hi = min(n, lo + size)
        if col is None:
            yield [None] * (hi - lo)
        elif isinstance(col, range):
            yield list(col[lo:hi])
        else:
            yield np.asarray(col[lo:hi]).tolist()


#: Rows per block when a CSV is written (64Ki rows: a few MB of Python objects at a time); the
#: default of :func:`write_report`'s ``csv_block``.
CSV_BLOCK = BLOCK // 16


def _write_csv(path: Path, header: list[str], columns: list[Any], n: int, block: int) -> None:
    """Rows ``0..n-1`` of ``columns`` (arrays, memmaps, BlockViews, ranges or None), written
    ``block`` rows at a time: memory is one block whatever ``n``."""
    tmp = temporary(path)
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for rows in zip(*(_blocks(c, n, block) for c in columns)):
            w.writerows([_json_safe(x) for x in row] for row in zip(*rows))
    os.replace(tmp, path)  # a report file is either absent or whole


def write_report(res: dict[str, Any], out: str | Path, *, config: dict[str, Any] | None = None,
                 store: Any = None, model: dict[str, Any] | None = None, plots: bool = True,
                 csv_block: int = CSV_BLOCK) -> dict[str, Path]:
    """Write the report files for ``res`` (an ``evaluate_streaming_with_metrics`` result) into ``out``.
    ``csv_block``: rows per block of a CSV (the files are the same whatever it is; memory is one block)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    payload: dict[str, Any] = {k: _json_safe(res[k]) for k in _SCALARS if k in res}
    payload["config"] = config or {}
    if store is not None:
        m = store.manifest
        payload["store"] = {"path": str(getattr(store, "path", "")), "format": m.format, "dtype": m.dtype,
                            "tokenizer": m.tokenizer, "special_tokens": m.special_tokens, "source": m.source,
                            "totals": m.totals}
    payload["model_identity"] = model or {}
    payload["versions"] = versions()
    payload["machine"] = {"platform": platform.platform(), "processor": platform.machine(), "argv": sys.argv}
    payload["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    if res.get("chunk_losses") is not None:
        n = len(res["chunk_losses"])
        files["chunks"] = out / REPORT_FILES["chunks"]
        spans = res.get("chunk_documents") or {}  # first/last document of each chunk's scored targets
        _write_csv(files["chunks"], ["chunk", "loss", "perplexity", "seconds", "first_document", "last_document"],
                   [range(n), res["chunk_losses"], res["chunk_perplexities"], res.get("chunk_times"),
                    spans.get("first_document"), spans.get("last_document")], n, csv_block)
    docs = res.get("per_document")
    if docs is not None:
        nd = len(docs["tokens"])
        files["documents"] = out / REPORT_FILES["documents"]
        extra = [k for k in ("nll_reference", "kl_mean", "top1_agreement", "delta_nll_mean") if k in docs]
        _write_csv(files["documents"], ["document", "scored_tokens", "nll", "loss", "perplexity", "bytes", "words",
                                        "complete", "source_file", "source_row", *extra],
                   [range(nd), docs["tokens"], docs["nll"], docs["loss"], docs["perplexity"], docs.get("bytes"),
                    docs.get("words"), docs["complete"], docs.get("source_file"), docs.get("source_row"),
                    *(docs[k] for k in extra)], nd, csv_block)
    pos = res.get("position_buckets")
    if pos is not None:
        files["positions"] = out / REPORT_FILES["positions"]
        extra = [k for k in ("loss_reference", "kl_mean", "top1_agreement", "delta_nll_mean") if k in pos]
        _write_csv(files["positions"], ["position_lo", "position_hi", "tokens", "loss", "perplexity", *extra],
                   [pos["lo"], pos["hi"], pos["tokens"], pos["loss"], pos["perplexity"], *(pos[k] for k in extra)],
                   len(pos["hi"]), csv_block)
    if plots:
        files.update(_plots(res, out))
    # results.json last: its presence means the report is complete
    files["results"] = out / REPORT_FILES["results"]
    tmp = temporary(files["results"])
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, files["results"])
    return files


def _position_title(res: dict[str, Any], unit: str) -> str:
    """The loss-by-position plot's title: a long-context curve only where each target saw its whole
    past (a carried state or cache); sliding windows cap the context at the chunk."""
    if res.get("mode") in ("kv-cache", "stateful"):
        return f"Loss by position in the {unit}: the long-context curve (every target sees its whole past)"
    return (f"Loss by position in the {unit}, sliding windows: the context is capped at {res.get('chunk_size')} tokens "
            "(not a long-context curve)")


def _plots(res: dict[str, Any], out: Path) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        print("[streameval] matplotlib is not installed: no PNG plots (pip install 'streamdata[plots]')", file=sys.stderr)
        return {}
    files: dict[str, Path] = {}
    losses = res.get("chunk_losses")
    if losses is not None and len(losses):
        x, ppl, group = _chunk_curve(losses)
        fig, ax = plt.subplots(figsize=(8, 4))
        # markers while the points are few: a line through one chunk draws nothing
        ax.plot(x, ppl, lw=0.8, marker="o" if len(ppl) <= 200 else None, ms=3)
        ax.axhline(res["perplexity"], color="k", ls="--", lw=0.8, label=f"overall {res['perplexity']:.3g}")
        ax.set_xlabel("chunk (window) index" + (f" (each point: exp of the mean loss of {group:,} chunks)" if group > 1 else ""))
        ax.set_ylabel("perplexity of the chunk's scored tokens")
        ax.set_yscale("log")
        ax.set_title(f"Perplexity per chunk: {res.get('model')} on {res.get('data')}", fontsize=9)
        ax.legend()
        files["plot_chunks"] = _save_png(fig, out / REPORT_FILES["plot_chunks"])
    pos = res.get("position_buckets")
    if pos is not None and len(pos["hi"]):
        mid = np.sqrt(np.maximum(pos["lo"], 1) * pos["hi"])  # geometric bucket centre
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(mid, pos["loss"], marker="o", ms=3)
        for x, y, n in zip(mid, pos["loss"], pos["tokens"]):  # how much each point averages over
            ax.annotate(f"{int(n):,}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center", fontsize=6)
        ax.set_xscale("log")
        unit = "document" if res.get("doc_mode") == "document" else "stream"
        ax.set_xlabel(f"position of the target token in its {unit} (log-spaced buckets; labels: tokens per bucket)")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(_position_title(res, unit), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        files["plot_positions"] = _save_png(fig, out / REPORT_FILES["plot_positions"])
    if pos is not None and len(pos["hi"]) and "kl_mean" in pos:  # a comparison
        mid = np.sqrt(np.maximum(pos["lo"], 1) * pos["hi"])
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(mid, pos["kl_mean"], marker="o", ms=3)
        ax.axhline(res["kl_mean"], color="k", ls="--", lw=0.8, label=f"overall {res['kl_mean']:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("position of the target token in its document (log-spaced buckets)")
        ax.set_ylabel("mean KL(reference || candidate) (nats)")
        ax.set_title(f"KL by position: {res.get('candidate')} vs {res.get('reference')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        files["plot_kl_positions"] = _save_png(fig, out / REPORT_FILES["plot_kl_positions"])
    if res.get("per_token_kl") is not None and len(res["per_token_kl"]):
        from .quantiles import histogram

        counts, edges = histogram(res["per_token_kl"])  # block by block over the memmap
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.stairs(counts, edges, fill=True)
        ax.set_yscale("log")
        ax.set_xlabel("KL(reference || candidate) of one scored token (nats)")
        ax.set_ylabel("tokens")
        ax.set_title(f"Per-token KL: mean {res['kl_mean']:.3g}, median {res['kl_median']:.3g}, "
                     f"99th percentile {res['kl_p99']:.3g}, max {res['kl_max']:.3g}", fontsize=9)
        files["plot_kl_histogram"] = _save_png(fig, out / REPORT_FILES["plot_kl_histogram"])
    return files


#: Most points the per-chunk plot draws (a plot of 10^8 chunks would need the whole column in memory).
PLOT_POINTS = 20_000


def _chunk_curve(losses: Any, points: int = PLOT_POINTS) -> tuple[np.ndarray, np.ndarray, int]:
    """(x, perplexity, chunks per point) for the per-chunk plot: every chunk while there are at
    most ``points``, else exp of the mean chunk loss of equal groups of consecutive chunks (x: the
    group's middle chunk), read block by block."""
    n = len(losses)
    if n <= points:
        with np.errstate(over="ignore"):
            return np.arange(n), np.exp(np.asarray(losses[:n], np.float64)), 1
    group = -(-n // points)
    size = group * max(1, BLOCK // group)  # blocks hold whole groups
    means = []
    for lo in range(0, n, size):
        b = np.asarray(losses[lo : min(n, lo + size)], np.float64)
        k = -(-len(b) // group)
        pad = np.full(k * group - len(b), np.nan)
        means.append(np.nanmean(np.concatenate([b, pad]).reshape(k, group), axis=1))
    m = np.concatenate(means)
    x = np.minimum(np.arange(len(m)) * group + group // 2, n - 1)
    with np.errstate(over="ignore"):
        return x, np.exp(m), group
