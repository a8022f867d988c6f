"""Engine stage: drive windows from the data stage through a model adapter into the metric sums.

Modes (see :mod:`evaluator.models` for which model supports which):

- ``sliding``: every window is an independent sequence; ``overlap`` targets at its start are context
  only. Many windows run per forward (``batch_size``); a batch that runs out of device memory is
  re-run in halves (results identical: windows are independent), and later batches keep the
  smaller size.
- ``stateful``: one window at a time, the model's state carried from window to window (reset at the
  start of the stream, and of every document in document mode).
- ``kv-cache``: like stateful with a transformers DynamicCache: exact full-context evaluation.

Out of memory in the two carried modes rolls the state/cache back to before the window and feeds
the window in halves (same result: the model sees the same tokens in the same order).

Hot loop rules: no device sync per batch (sums stay on the device, counts come from the plan),
except where asked for (per-token losses are copied to their memmap per batch; a progress line
every ``log_interval`` chunks reads one scalar).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from .config import StreamingEvalConfig, resolve_device
from .data import EvalData, WindowSpec, expected_scored, open_data
from .errors import ConfigError, DataError, ModelError
from .metrics import (
    MetricSums,
    PerTokenWriter,
    bits_per_byte,
    byte_perplexity,
    perplexity,
    summarize_chunks,
    token_nll,
    word_perplexity,
)
from .models import ModelAdapter, load_model

__all__ = ["StreamingEvaluator", "create_streaming_evaluator"]

# torch >= 2.5 names it torch.OutOfMemoryError; older releases only torch.cuda.OutOfMemoryError.
_OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

# Sliding windows per forward when batch_size="auto" on a CPU: there is no link to hide and no
# device sync to save, and large forwards fall out of cache. Measured (benchmarks/RESULTS.md, 4x256
# GPT-2, chunk 512): batch 1/4/8/32 gave 10.3k/10.7k/8.4k/6.1k tok/s, so ~2k tokens per forward.
_CPU_AUTO_TOKENS = 2048
_AUTO_MAX_WINDOWS = 256


class StreamingEvaluator:
    """Evaluate a language model on token sequences of any length, streamed window by window.

    ``StreamingEvaluator(model, chunk_size=None, overlap=0, device=None, verbose=True, **options)``
    where ``options`` are further :class:`StreamingEvalConfig` fields, or
    ``StreamingEvaluator(model, config=StreamingEvalConfig(...))``. ``model``: an nn.Module, a
    transformers model, a hub id or local folder, ``"default"``, or ``"package.module:factory"``.
    ``chunk_size=None`` takes the model's context length from its config.
    """

    def __init__(self, model: Any, chunk_size: int | None = None, overlap: int = 0, device: str | None = None,
                 verbose: bool = True, *, config: StreamingEvalConfig | None = None, **options: Any):
        if config is None:
            config = StreamingEvalConfig(chunk_size=chunk_size, overlap=overlap, device=device, verbose=verbose, **options)
        elif chunk_size is not None or overlap or device is not None or options:
            raise ConfigError("pass either config=StreamingEvalConfig(...) or keyword settings, not both")
        config = dataclasses.replace(config)  # our own copy: setters below must not change the caller's
        self.device = resolve_device(config.device)
        self.adapter: ModelAdapter = load_model(model, dtype=config.dtype)
        self.adapter.to(self.device)
        self.config = config
        self._resolve_chunk_size()
        self._micro: int | None = None  # sliding windows per forward after an out-of-memory retry

    # ---- settings ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.module

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        self.config.chunk_size = value
        self.config.__post_init__()
        self._resolve_chunk_size()

    @property
    def overlap(self) -> int:
        return self.config.overlap

    def _resolve_chunk_size(self) -> None:
        cs = self.config.chunk_size
        if cs is None:
            cs = self.adapter.context_length
            if cs is None:
                raise ConfigError(f"chunk_size=None but model {self.adapter.name} declares no context length: pass chunk_size")
        if self.config.overlap >= cs:
            raise ConfigError(f"overlap={self.config.overlap} must be smaller than chunk_size={cs}: pass a smaller overlap")
        self._chunk_size = int(cs)

    # ---- public API ----------------------------------------------------------------------
    def evaluate_streaming(self, data: Any, max_tokens: int | None = None, log_interval: int | None = None) -> dict[str, Any]:
        """Loss and perplexity over every scored target of ``data`` (tensor, store or store path).

        Returns loss (nats/token), perplexity, total_tokens (targets scored), num_chunks (windows),
        total_time (s), tokens_per_second, avg_chunk_time (s), plus the resolved settings.
        """
        return self._run(data, max_tokens, log_interval, detailed=False, per_token=False)

    def evaluate_streaming_with_metrics(self, data: Any, max_tokens: int | None = None,
                                        compute_per_token_metrics: bool = False) -> dict[str, Any]:
        """:meth:`evaluate_streaming` plus per-chunk, per-document, per-position and per-byte/word metrics.

        ``per_token_losses`` (when ``compute_per_token_metrics``) is a read-only float32 numpy memmap
        of the file at ``per_token_path``; bits_per_byte, byte_perplexity and word_perplexity are None
        when the data carries no byte/word counts (raw tensors).
        """
        return self._run(data, max_tokens, None, detailed=True, per_token=compute_per_token_metrics)

    # ---- resolution and checks (all before any compute) -----------------------------------
    def _check_tokenizer(self, ed: EvalData) -> None:
        a, b = ed.tokenizer_sha256, self.adapter.tokenizer_sha256
        if self.config.check_tokenizer and a and b and a != b:
            raise DataError(
                f"{ed.name} was tokenized with tokenizer sha256 {a[:12]}..., but model {self.adapter.name} uses "
                f"{b[:12]}...: re-tokenize with the model's tokenizer (or pass check_tokenizer=False)"
            )

    def _resolve_bos(self, ed: EvalData) -> int | None:
        b = self.config.bos
        if b == "none":
            return None
        if b == "model":
            bos = self.adapter.bos_token_id
            if bos is None:
                raise ConfigError(f"bos='model' but model {self.adapter.name} declares no bos_token_id: pass an id or bos='none'")
        elif b == "eos":
            bos = ed.special_tokens.get("eos")
            if bos is None:
                raise ConfigError(f"bos='eos' but {ed.name} records no EOS id: pass an id or bos='none'")
        else:
            bos = int(b)
        if ed.special_tokens.get("bos") is not None:
            raise ConfigError(
                f"{ed.name} already starts every document with BOS id {ed.special_tokens['bos']}: pass bos='none'"
            )
        vocab = self.adapter.vocab_size
        if vocab is not None and not 0 <= bos < vocab:
            raise ConfigError(f"BOS id {bos} is outside the model's vocabulary [0, {vocab}): pass another id")
        return int(bos)

    def _longest_stream(self, ed: EvalData, bos: bool, max_tokens: int | None) -> int:
        """Positions (inputs) the longest stream feeds the model: n - 1 + BOS."""
        if self.config.doc_mode == "stream":
            n = ed.limit(max_tokens)
        else:
            lens = ed.document_lengths(max_tokens)
            n = int(lens.max()) if len(lens) else 0
        return max(0, n - 1 + bos)

    def _resolve_mode(self, ed: EvalData, bos: bool, max_tokens: int | None) -> str:
        a, mode = self.adapter, self.config.mode
        longest = self._longest_stream(ed, bos, max_tokens)
        fits = a.max_positions is None or longest <= a.max_positions
        if mode == "auto":
            if self.config.overlap > 0:
                return "sliding"
            if "stateful" in a.modes:
                return "stateful"
            if a.supports_kv_cache() and fits and a.verify_kv_cache():
                return "kv-cache"
            return "sliding"
        if mode not in a.modes:
            raise ConfigError(f"mode={mode!r} is not available for model {a.name} ({a.kind}; it supports {', '.join(a.modes)})")
        if mode == "kv-cache":
            if not fits:
                raise ConfigError(
                    f"mode='kv-cache' keeps one context per {'document' if self.config.doc_mode == 'document' else 'stream'}: "
                    f"{ed.name} needs {longest} positions but model {a.name} has {a.max_positions}: use mode='sliding' "
                    "with an overlap, or limit max_tokens"
                )
            if not a.verify_kv_cache():
                raise ModelError(f"model {a.name} does not reproduce its logits with a carried DynamicCache: use mode='sliding'")
        return mode

    def _check_window(self, mode: str) -> None:
        p = self.adapter.max_positions
        if mode == "sliding" and p is not None and self._chunk_size > p:
            raise ConfigError(
                f"chunk_size={self._chunk_size} exceeds model {self.adapter.name}'s context of {p} positions: "
                f"pass chunk_size<={p} (or None to use it)"
            )

    def _batch_windows(self, mode: str) -> int:
        if mode != "sliding":
            return 1
        bs = self.config.batch_size
        if bs != "auto":
            return int(bs)
        L = self._chunk_size
        if self.device.type != "cuda":
            return max(1, min(_AUTO_MAX_WINDOWS, _CPU_AUTO_TOKENS // L))
        # Free memory / a per-window estimate: activations of one layer at a time (~32 values per
        # hidden unit per token, in the autocast/param dtype) plus the fp32 head slice. An overshoot
        # costs one out-of-memory retry at half the size, never a wrong result.
        free, _ = torch.cuda.mem_get_info(self.device)
        cfg = getattr(self.model, "config", None)
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 4096
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 32
        elt = 4 if self.config.dtype == "float32" else 2
        per_window = L * (32 * hidden * elt + heads * L * elt // 4)
        budget = 0.6 * free - 3 * self.config.loss_slice * (self.adapter.vocab_size or 50000) * 4
        return int(max(1, min(_AUTO_MAX_WINDOWS, budget // max(1, per_window))))

    def _autocast(self):
        if self.config.dtype == "float32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.config.dtype))

    # ---- the run ---------------------------------------------------------------------------
    def _run(self, data: Any, max_tokens: int | None, log_interval: int | None, detailed: bool, per_token: bool) -> dict[str, Any]:
        cfg = self.config
        max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2):
            raise ConfigError(f"max_tokens={max_tokens!r} must be an int >= 2 or None")
        log_interval = cfg.log_interval if log_interval is None else int(log_interval)
        if log_interval < 1:
            raise ConfigError(f"log_interval={log_interval} must be >= 1")
        ed = open_data(data)
        try:
            if ed.num_tokens == 0:
                raise DataError(f"{ed.name} holds no tokens: nothing to evaluate")
            self._check_tokenizer(ed)
            bos_id = self._resolve_bos(ed)
            mode = self._resolve_mode(ed, bos_id is not None, max_tokens)
            self._check_window(mode)
            ed.check_ids(self.adapter.vocab_size, max_tokens)
            expected = expected_scored(ed.doc_offsets, cfg.doc_mode, bos_id is not None, max_tokens)
            if expected == 0:
                raise DataError(
                    f"{ed.name} has no token to score ({ed.limit(max_tokens)} tokens; each "
                    f"{'document' if cfg.doc_mode == 'document' else 'stream'} needs >= 2, or 1 with a BOS prefix)"
                )
            spec = WindowSpec(chunk_size=self._chunk_size, overlap=cfg.overlap if mode == "sliding" else 0,
                              doc_mode=cfg.doc_mode, batch_windows=self._batch_windows(mode), bos_id=bos_id,
                              max_tokens=max_tokens)
            return self._loop(ed, spec, mode, expected, log_interval, detailed, per_token)
        finally:
            ed.close()

    def _loop(self, ed: EvalData, spec: WindowSpec, mode: str, expected: int, log_interval: int,
              detailed: bool, per_token: bool) -> dict[str, Any]:
        cfg, dev = self.config, self.device
        windows = ed.windows(spec, dev)
        try:
            plan = windows.plan
            num_windows = len(plan)
            lens = ed.document_lengths(spec.max_tokens)
            sums = MetricSums(dev, num_windows, ed.num_documents, int(lens.max()) if len(lens) else 1, detailed)
            writer = PerTokenWriter(cfg.per_token_path, expected) if per_token else None
            self._micro = spec.batch_windows if mode == "sliding" else None
            timer = _Timer(dev)
            step = self._sliding_batch if mode == "sliding" else self._stream_batch
            done, next_log = 0, log_interval
            t_start = time.perf_counter()
            with torch.inference_mode(), self._autocast():
                for batch in windows:
                    timer.start()
                    step(batch, plan, spec, sums, writer, detailed)
                    timer.stop(batch.num_windows)
                    done += batch.num_windows
                    if cfg.verbose and done >= next_log:
                        self._log(done, num_windows, sums, t_start)
                        next_log = (done // log_interval + 1) * log_interval
            nll_sum, tokens = sums.total()  # syncs: total_time includes all queued work
            total_time = time.perf_counter() - t_start
        finally:
            windows.close()
        if tokens != expected:  # the plan and the semantics disagree: a bug, never a user error
            raise RuntimeError(f"internal error: scored {tokens} targets, the window semantics give {expected}")
        loss = nll_sum / tokens
        res: dict[str, Any] = {
            "loss": loss,
            "perplexity": perplexity(nll_sum, tokens),
            "total_tokens": tokens,
            "num_chunks": num_windows,
            "total_time": total_time,
            "tokens_per_second": tokens / total_time if total_time > 0 else math.inf,
            "avg_chunk_time": total_time / num_windows,
            "nll_sum": nll_sum,
            "mode": mode,
            "doc_mode": spec.doc_mode,
            "chunk_size": spec.chunk_size,
            "overlap": spec.overlap,
            "batch_size": spec.batch_windows if mode == "sliding" else 1,
            "bos_id": spec.bos_id,
            "bos_policy": cfg.bos,
            "max_tokens": spec.max_tokens,
            "device": str(dev),
            "dtype": cfg.dtype,
            "model": self.adapter.name,
            "data": ed.name,
        }
        if self._micro is not None and self._micro < spec.batch_windows:
            res["batch_size_after_oom"] = self._micro
        if detailed:
            res.update(self._detailed(ed, spec, sums, timer, nll_sum, tokens))
            if writer is not None:
                if writer.filled != expected:
                    raise RuntimeError(f"internal error: wrote {writer.filled} per-token losses, expected {expected}")
                res["per_token_losses"], res["per_token_path"] = writer.finish(), writer.path
            else:
                res["per_token_losses"], res["per_token_path"] = None, None
        return res

    def _log(self, done: int, total: int, sums: MetricSums, t0: float) -> None:
        nll, n = sums.total()  # the one sync per progress line
        dt = time.perf_counter() - t0
        print(f"[streameval] chunk {done}/{total}  loss {nll / n:.4f}  ppl {perplexity(nll, n):.3f}  "
              f"{n / dt if dt > 0 else 0:,.0f} tok/s", file=sys.stderr, flush=True)

    # ---- sliding ---------------------------------------------------------------------------
    def _sliding_batch(self, batch: Any, plan: Any, spec: WindowSpec, sums: MetricSums,
                       writer: PerTokenWriter | None, detailed: bool) -> None:
        # Plan arrays are indexed from the plan's own window 0 (``plan.first`` in the full plan).
        w0, rows = batch.first_window - getattr(plan, "first", 0), batch.num_windows
        lens = np.asarray(plan.length[w0 : w0 + rows], np.int64)
        scored = lens - np.asarray(plan.score_from[w0 : w0 + rows], np.int64)
        if int(scored.sum()) != batch.num_scored:  # never trust a plan that disagrees with its batch
            raise RuntimeError(f"internal error: plan scores {int(scored.sum())} targets in windows {w0}.., batch says {batch.num_scored}")
        i = 0
        while i < rows:
            m = min(self._micro, rows - i)
            try:
                self._sliding_rows(batch, w0, i, i + m, int(lens[i : i + m].max()), int(scored[i : i + m].sum()),
                                   sums, writer, detailed)
            except _OOM:
                if m == 1:
                    raise ModelError(
                        f"out of device memory on a single window of chunk_size={spec.chunk_size}: lower chunk_size or loss_slice"
                    ) from None
                self._micro = max(1, m // 2)
                _empty_cache(self.device)
                continue
            i += m

    def _sliding_rows(self, batch: Any, w0: int, r0: int, r1: int, T: int, count: int, sums: MetricSums,
                      writer: PerTokenWriter | None, detailed: bool) -> None:
        # Trim the batch to its longest window: short windows (document ends) cost no padding beyond it.
        inputs = batch.inputs[r0:r1, :T]
        mask = batch.score_mask[r0:r1, :T]
        out = self.adapter.forward_windows(inputs)
        flat = _scored_index(mask.reshape(-1), count)
        nll = token_nll(out, batch.targets[r0:r1, :T], flat, self.config.loss_slice)
        del out
        if detailed:
            sums.add(nll, count, flat // T + (w0 + r0),
                     batch.doc_ids[r0:r1, :T].reshape(-1).index_select(0, flat),
                     batch.positions[r0:r1, :T].reshape(-1).index_select(0, flat))
        else:
            sums.add(nll, count)
        if writer is not None:
            writer.write(nll)

    # ---- stateful / kv-cache ----------------------------------------------------------------
    def _stream_batch(self, batch: Any, plan: Any, spec: WindowSpec, sums: MetricSums,
                      writer: PerTokenWriter | None, detailed: bool) -> None:
        a = self.adapter
        for r in range(batch.num_windows):
            w = batch.first_window - getattr(plan, "first", 0) + r  # index into the plan's arrays
            n = int(plan.length[w])
            if w == 0 or (spec.doc_mode == "document" and int(plan.doc[w]) != int(plan.doc[w - 1])):
                a.begin_stream()
            pieces = [(0, n)]  # halves of the window after an out-of-memory error
            while pieces:
                p0, p1 = pieces.pop(0)
                snap = a.snapshot()
                try:
                    out = a.forward_stream(batch.inputs[r : r + 1, p0:p1])
                    flat = torch.arange(p1 - p0, device=self.device)
                    nll = token_nll(out, batch.targets[r : r + 1, p0:p1], flat, self.config.loss_slice)
                    del out
                except _OOM:
                    if p1 - p0 == 1:
                        raise ModelError("out of device memory on a single token: the model does not fit this device") from None
                    a.restore(snap)
                    _empty_cache(self.device)
                    mid = (p0 + p1) // 2
                    pieces[:0] = [(p0, mid), (mid, p1)]
                    continue
                if detailed:
                    sums.add(nll, p1 - p0, torch.full_like(flat, w), batch.doc_ids[r, p0:p1], batch.positions[r, p0:p1])
                else:
                    sums.add(nll, p1 - p0)
                if writer is not None:
                    writer.write(nll)

    # ---- results ---------------------------------------------------------------------------
    def _detailed(self, ed: EvalData, spec: WindowSpec, sums: MetricSums, timer: "_Timer",
                  nll_sum: float, tokens: int) -> dict[str, Any]:
        h = sums.host()
        out: dict[str, Any] = summarize_chunks(h["window_nll"], h["window_tokens"])
        out["chunk_times"] = timer.per_window()
        # Byte/word metrics count only documents scored to their end, so a max_tokens cut never
        # pairs a partial NLL with a whole document's bytes (nothing is estimated).
        nd = ed.num_documents
        limit = ed.limit(spec.max_tokens)
        complete = ed.doc_offsets[1:] <= limit
        doc_nll, doc_tok = h["doc_nll"][:nd], h["doc_tokens"][:nd]
        nll_c = float(doc_nll[complete].sum())
        nbytes = int(ed.doc_bytes[complete].sum()) if ed.doc_bytes is not None else None
        nwords = int(ed.doc_words[complete].sum()) if ed.doc_words is not None else None
        out.update(
            bits_per_byte=bits_per_byte(nll_c, nbytes),
            byte_perplexity=byte_perplexity(nll_c, nbytes),
            word_perplexity=word_perplexity(nll_c, nwords),
            total_bytes=nbytes,
            total_words=nwords,
            byte_metric_documents=int(complete.sum()) if nbytes is not None or nwords is not None else 0,
            num_documents=nd,
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            doc_loss = doc_nll / doc_tok
        out["per_document"] = {
            "tokens": doc_tok,
            "nll": doc_nll,
            "loss": doc_loss,
            "perplexity": np.exp(doc_loss),
            "bytes": ed.doc_bytes,
            "words": ed.doc_words,
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


class _Timer:
    """Wall time per batch of windows without syncing the device in the loop: CUDA events recorded
    around each batch and read at the end; perf_counter on the CPU (which computes synchronously)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[Any, Any, int]] = []
        self._t0: Any = None

    def start(self) -> None:
        if self.cuda:
            self._t0 = torch.cuda.Event(enable_timing=True)
            self._t0.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self, windows: int) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
        else:
            e = time.perf_counter()
        self.marks.append((self._t0, e, windows))

    def per_window(self) -> list[float]:
        """Seconds per window: each batch's time shared equally among its windows."""
        out: list[float] = []
        for a, b, n in self.marks:
            dt = a.elapsed_time(b) / 1000.0 if self.cuda else b - a
            out.extend([dt / n] * n)
        return out


_NONZERO_STATIC: dict[str, bool] = {}


def _scored_index(mask_flat: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the True entries of ``mask_flat``, of which there are ``count``.

    ``nonzero_static`` sizes its result from the host-known count, so it needs no device sync
    (plain ``nonzero`` must read the count back). Builds of torch without it on this device type
    fall back to ``nonzero`` (one sync per batch).
    """
    kind = mask_flat.device.type
    if _NONZERO_STATIC.get(kind, True):
        try:
            return torch.nonzero_static(mask_flat, size=count).squeeze(1)
        except _OOM:
            raise  # a RuntimeError too, but one the caller retries
        except (AttributeError, NotImplementedError, RuntimeError):
            _NONZERO_STATIC[kind] = False
    return torch.nonzero(mask_flat).squeeze(1)


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def create_streaming_evaluator(model: Any, config: StreamingEvalConfig | None = None) -> StreamingEvaluator:
    """Factory of the quick reference: ``create_streaming_evaluator(model, StreamingEvalConfig(...))``."""
    return StreamingEvaluator(model, config=config if config is not None else StreamingEvalConfig())
