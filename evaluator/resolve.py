"""Resolve a run before any compute: config + model + data -> the mode, windows and batch size.

Everything here only reads settings and metadata (and, for a carried cache: ``kv-cache``, or a
state-space model's ``stateful``, runs the model on a 16-token probe to check that the carried cache
reproduces the full forward in the run's dtype: :mod:`evaluator.carry_check`). Every refusal is a one-line
error naming the value and the fix, raised before the first window is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from streamdata.windows import WindowSpec, check_window_rules

from .carry_check import CarryCheck
from .config import StreamingEvalConfig
from .data import EvalData
from .errors import ConfigError, DataError, ModelError
from .models import ModelAdapter

__all__ = ["ResolvedRun", "resolve_chunk_size", "resolve_run", "batch_windows_for", "cpu_guess"]

# batch_size="auto" is measured within a memory bound (evaluator/autobatch.py): at most this many
# windows (documents) per batch, on CUDA and on a CPU (where even 64 is past the fastest size seen).
_AUTO_MAX_WINDOWS = 256
_CPU_AUTO_MAX_WINDOWS = 64
# The old CPU guess, kept for compiled runs (one static shape: no ladder of sizes to compile) and as
# the benchmarks' baseline: sliding ~2k tokens per forward, carried documents one at a time.
_CPU_AUTO_TOKENS = 2048


@dataclass(frozen=True)
class ResolvedRun:
    """What one evaluation does, fully decided: the identity of its numbers (with the data and model)."""

    mode: str  # sliding | stateful | kv-cache
    mode_reason: str  # why this mode (auto's choice, or "requested")
    spec: WindowSpec  # the window rules: chunk, overlap (0 in carried modes), doc mode, tail, BOS id, max_tokens
    # Windows per batch from config.batch_size (a run setting, not a window rule): windows per forward
    # in sliding mode; documents side by side in carried document mode; 1 for one carried stream.
    # With batch_auto, the memory bound within which the runner measures its size (evaluator/autobatch.py).
    batch_windows: int
    device: torch.device
    dtype: str
    loss_slice: int
    bos_policy: str
    carry_check: CarryCheck | None = None  # what the carry check measured (carried caches only)
    batch_auto: bool = False  # batch_size="auto" with a batch to size: measured by the runner


def resolve_chunk_size(config: StreamingEvalConfig, adapter: ModelAdapter) -> int:
    """``config.chunk_size``, or the model's context length when it is None (the one default)."""
    cs = config.chunk_size
    if cs is None:
        cs = adapter.context_length
        if cs is None:
            raise ConfigError(f"model {adapter.name} declares no context length: pass chunk_size=N (the window length in tokens)")
    check_window_rules(chunk_size=cs, overlap=config.overlap)  # the model's length meets the configured overlap
    return int(cs)


def resolve_run(config: StreamingEvalConfig, adapter: ModelAdapter, ed: EvalData, device: torch.device,
                chunk_size: int, max_tokens: int | None) -> ResolvedRun:
    _check_tokenizer(config, adapter, ed)
    bos_id = _resolve_bos(config, adapter, ed)
    mode, why, check = _resolve_mode(config, adapter, ed, bos_id is not None, max_tokens)
    p = adapter.max_positions
    if mode == "sliding" and p is not None and chunk_size > p:
        raise ConfigError(
            f"chunk_size={chunk_size} exceeds model {adapter.name}'s context of {p} positions: "
            f"pass chunk_size={p} or less, or leave chunk_size unset (the model's context)"
        )
    spec = WindowSpec(chunk_size=chunk_size, overlap=config.overlap if mode == "sliding" else 0, doc_mode=config.doc_mode,
                      tail=config.tail if mode == "sliding" else "short", prepend_bos_id=bos_id, max_tokens=max_tokens)
    bw = batch_windows_for(config, adapter, device, mode, chunk_size)
    return ResolvedRun(mode, why, spec, bw, device, config.dtype, config.loss_slice, config.bos, check,
                       batch_auto=config.batch_size == "auto" and measured_batch(config, mode))


def _check_tokenizer(config: StreamingEvalConfig, adapter: ModelAdapter, ed: EvalData) -> None:
    """Refuse a store whose ids were made by another tokenizer than the model's, when both are known.

    Compares what decides the ids (``ids_sha256``: model, normalizer, pre-tokenizer, added tokens,
    truncation, padding), so a copy saved by transformers' ``save_pretrained`` (which adds an empty
    post-processor) matches its original. Stores and models that record only the older whole-file
    ``sha256`` are compared by that, and the message says so, since a difference there may not
    change a single id."""
    if not config.check_tokenizer:
        return
    from streamdata.tokenize import tokenizer_mismatch

    store = dict(ed.store.manifest.tokenizer or {})
    model = dict(adapter.tokenizer_identity or {})
    what = tokenizer_mismatch(store, model)
    if what is None:
        return
    if store.get("ids_sha256") and model.get("ids_sha256"):
        raise DataError(f"{ed.name} was tokenized with another tokenizer than model {adapter.name}'s ({what}), so "
                        "its ids mean other tokens: re-tokenize with the model's tokenizer (or, if you know better, "
                        "pass check_tokenizer=False)")
    older = " and ".join(n for n, d in ((ed.name, store), (f"model {adapter.name}", model)) if not d.get("ids_sha256"))
    fix = ("re-tokenize the store (it then records ids_sha256, and only what decides the ids is compared)"
           if not store.get("ids_sha256") else
           "load the model from a folder holding its tokenizer.json (its ids digest is then computed)")
    raise DataError(f"{ed.name}'s tokenizer file differs from model {adapter.name}'s ({what}), and {older} records only "
                    "that whole-file digest, which also covers parts that never change an id (such as the "
                    f"post-processor save_pretrained adds): {fix}, or pass check_tokenizer=False if one tokenizer "
                    "made both")


def _resolve_bos(config: StreamingEvalConfig, adapter: ModelAdapter, ed: EvalData) -> int | None:
    b = config.bos
    if b == "none":
        return None
    if b == "model":
        bos = adapter.bos_token_id
        if bos is None:
            raise ConfigError(f"bos='model' but model {adapter.name} declares no bos_token_id: pass an id or bos='none'")
    elif b == "eos":
        bos = ed.special_tokens.get("eos")
        if bos is None:
            raise ConfigError(f"bos='eos' but {ed.name} records no EOS id: pass an id or bos='none'")
    else:
        bos = int(b)
    if ed.special_tokens.get("bos") is not None:
        raise ConfigError(f"{ed.name} already starts every document with BOS id {ed.special_tokens['bos']}: pass bos='none'")
    vocab = adapter.vocab_size
    if vocab is not None and not 0 <= bos < vocab:
        raise ConfigError(f"BOS id {bos} is outside the model's vocabulary [0, {vocab}): pass another id")
    return int(bos)


def _longest_stream(config: StreamingEvalConfig, ed: EvalData, bos: bool, max_tokens: int | None) -> int:
    """Positions (inputs) the longest stream feeds the model: n - 1 + BOS."""
    if config.doc_mode == "stream":
        n = ed.limit(max_tokens)
    else:
        n = ed.longest_document(max_tokens)
    return max(0, n - 1 + bos)


def _resolve_mode(config: StreamingEvalConfig, a: ModelAdapter, ed: EvalData, bos: bool,
                  max_tokens: int | None) -> tuple[str, str, CarryCheck | None]:
    mode = config.mode
    longest = _longest_stream(config, ed, bos, max_tokens)
    fits = a.max_positions is None or longest <= a.max_positions
    unit = "document" if config.doc_mode == "document" else "stream"
    if mode == "auto":
        if config.overlap > 0:
            return "sliding", "auto: overlap > 0 is a sliding-window setting", None
        if "stateful" in a.modes:
            if not a.checks_carry:
                return "stateful", f"auto: {a.kind} model carries its state", None
            chk = a.carry_check(config.dtype)
            if not chk.ok:
                return "sliding", f"auto: stateful unusable ({chk.reason})", chk
            return "stateful", f"auto: {a.kind} model carries its state and {chk.reason}", chk
        if not a.supports_kv_cache():
            return "sliding", f"auto: {a.kind} models carry no state or cache", None
        if not fits:
            return "sliding", (f"auto: the longest {unit} needs {longest} positions, more than the model's "
                               f"{a.max_positions}, so no single cache can hold it"), None
        chk = a.carry_check(config.dtype)
        if not chk.ok:
            return "sliding", f"auto: kv-cache unusable ({chk.reason})", chk
        return "kv-cache", f"auto: every {unit} fits the model's {a.max_positions} positions and {chk.reason}", chk
    if mode not in a.modes:
        raise ConfigError(f"mode={mode!r} is not available for model {a.name} ({a.kind}; it supports {', '.join(a.modes)})")
    if mode == "kv-cache" and not fits:
        raise ConfigError(
            f"mode='kv-cache' keeps one context per {unit}: {ed.name} needs {longest} positions but model "
            f"{a.name} has {a.max_positions}: use mode='sliding' with an overlap, or limit max_tokens"
        )
    if mode == "sliding" or not a.checks_carry:
        return mode, "requested", None
    chk = a.carry_check(config.dtype)
    if not chk.ok:
        raise ModelError(f"model {a.name} cannot be evaluated with a carried cache in {config.dtype} ({chk.reason}): "
                         "use mode='sliding'")
    return mode, f"requested; {chk.reason}", chk


def measured_batch(config: StreamingEvalConfig, mode: str) -> bool:
    """Whether ``batch_size="auto"`` is measured (evaluator/autobatch.py): there is a batch (sliding,
    or carried document mode) and no compiled body (one static shape: a ladder would compile each rung)."""
    return (mode == "sliding" or config.doc_mode == "document") and config.compile is None


def cpu_guess(mode: str, L: int) -> int:
    """The fixed CPU rule ``batch_size="auto"`` used before it was measured (compiled runs keep it)."""
    return max(1, min(_AUTO_MAX_WINDOWS, _CPU_AUTO_TOKENS // L)) if mode == "sliding" else 1


def batch_windows_for(config: StreamingEvalConfig, adapter: ModelAdapter, device: torch.device, mode: str, L: int) -> int:
    """Windows per batch in sliding mode; in stateful/kv-cache mode the documents run side by side
    (document mode: one carried state or cache per document, evaluator.runners.CarriedRunner.units),
    and 1 in stream mode (one stream, one state). ``"auto"``: the memory bound within which the
    runner measures the fastest size (:func:`measured_batch`), or, compiled on a CPU, :func:`cpu_guess`."""
    if mode != "sliding" and config.doc_mode != "document":
        return 1
    bs = config.batch_size
    if bs != "auto":
        return int(bs)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cap = _AUTO_MAX_WINDOWS
    elif not measured_batch(config, mode):
        return cpu_guess(mode, L)
    else:
        # Host memory the forwards may take: half of what is available now (the loader, the store's
        # page cache and other processes keep the rest). Conservative because a host that overcommits
        # may kill the process rather than report out of memory (which the runners would retry in halves).
        free, cap = _available_ram() // 2, _CPU_AUTO_MAX_WINDOWS
    per_window = _bytes_per_window(config, adapter, mode, L)
    budget = 0.6 * free - 3 * config.loss_slice * (adapter.vocab_size or 50000) * 4
    return int(max(1, min(cap, budget // max(1, per_window))))


def _bytes_per_window(config: StreamingEvalConfig, adapter: ModelAdapter, mode: str, L: int) -> int:
    """A window's memory estimate: activations of one layer at a time (~32 values per hidden unit
    per token, in the autocast/param dtype) plus the fp32 head slice; an overshoot costs one
    out-of-memory retry at half the size, never a wrong result."""
    cfg = getattr(adapter.module, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or 4096
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None) or 32
    elt = 4 if config.dtype == "float32" else 2
    per_window = L * (32 * hidden * elt + heads * L * elt // 4)
    if mode == "kv-cache":
        # Each document's cache: keys and values of every layer, up to the model's positions.
        layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None) or 32
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        per_window += 2 * layers * (hidden * kv_heads // heads) * elt * (adapter.max_positions or L)
    if adapter.full_logits:
        # The model builds [B, L, vocab] logits itself (no body/head split to slice the head):
        # counted at 4 bytes, since many models upcast their logits to fp32.
        per_window += L * (adapter.vocab_size or 50000) * 4
    return per_window


def _available_ram() -> int:
    """Bytes of host memory available now (Linux: MemAvailable; elsewhere the physical memory / 2)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30
