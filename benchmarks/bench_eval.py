"""Evaluation throughput: ``StreamingEvaluator`` streaming from a store vs compute only vs the loops people write.

    python -m benchmarks.bench_eval [--store S] [--model M] [--device D] [--tokens N] [--chunk-size L]
                                    [--overlap O] [--batch-size B] [--dtype T] [--repeat R] [--threads K]
                                    [--compile [MODE]] [--auto-batch [--auto-tokens N]] [--out DIR]

On the same model and the first ``N`` tokens of the same store, in one run:
- ours + checkpoints: ours with a checkpoint folder (``--checkpoint-interval``, default 60 s as the
         CLI's; a checkpoint is also written at the end, and its time counts);
- ours:  ``StreamingEvaluator(model, chunk_size=L, overlap=0, mode="sliding").evaluate_streaming(store,
         max_tokens=N)``: windows streamed from the store by ``WindowLoader``, ``B`` windows per forward
         (``--batch-size``, default the evaluator's ``auto``), loss in slices, float64 sums on the device;
         the figure is the engine's own ``tokens_per_second`` (scored targets / its loop time, which
         includes starting the loader and filling its pipeline, not the model/tokenizer checks before);
- (a) compute only, the limit: the same adapter, the same batch shapes (rows and widths of every batch
         of ours), the same sliced loss (``evaluator.metrics.token_nll``) and float64 device sum, on a
         device-resident buffer of synthetic ids: no store, no loader, no per-batch index work;
- (b) the quick-reference pattern: the whole sequence in RAM as one int64 tensor, batch 1, one chunk
         of ``L`` inputs at a time (``.to(device)`` per chunk), full logits, ``F.cross_entropy`` and a
         ``loss.item()`` sync per chunk: the same windows and the same ``N - 1`` scored targets as ours;
- ours, overlap ``O`` (default ``L // 2``): the same as ours with ``overlap=O`` (every target after the
         first window gets at least ``O`` tokens of context): same positions computed as (c);
- ours, compiled (``--compile [MODE]``): ours and ours-overlap again with ``compile=MODE`` (torch.compile
         of the model body, static [B, L] batches); its warm-up compiles the graph (not timed);
- auto batch (``--auto-batch``): ours (overlap 0) with ``batch_size="auto"`` (measured on the run's
         first forwards, evaluator/autobatch.py) against a sweep of fixed sizes (the ladder's sizes
         within auto's memory bound) and against the rule auto followed before (on a CPU the fixed
         guess 2048 // L; on CUDA the memory estimate, i.e. the bound): one run each, after the rest,
         of ``--auto-tokens`` tokens (default ``N``: the ladder spends at most a tenth of a run, so a
         short run may end it before the largest sizes);
- (c) the transformers perplexity guide (huggingface.co/docs/transformers/perplexity): ``max_length=L``,
         ``stride=L - O``, batch 1, labels -100 on the context part, ``model(input_ids, labels=...)``,
         ``outputs.loss * trg_len`` accumulated. It scores every label that is not -100 after the
         model's internal shift: ``end - 1`` in the first window and ``trg_len`` in each later one, i.e.
         the same ``N - 1`` targets (stride == max_length would drop the first token of every window).

tok/s is scored targets per second for every row (positions fed to the model are listed too: with
overlap they exceed the scored count). Every variant runs once untimed (warm-up), then ``--repeat``
times interleaved (a round over all variants per repeat, so a disturbance hits them alike); the best
run counts. CUDA: the clock reads after ``torch.cuda.synchronize()`` before and after a run, never
inside one. (b) and (c) time only their loops: reading the N tokens into RAM is reported apart.

Defaults: the store is the embedded corpus (``stdlib:eval``) tokenized with the bundled tokenizer
(or, until it exists, a 4096-entry BPE trained like ``bench_tokenize`` does), cached under
``bench-out/stores``; the model is a GPT-2-small-shaped transformers model with random weights
(12 layers, 768 hidden, 1024 positions, vocab 50257, bf16) on CUDA, scaled down on CPU (4 layers,
256 hidden, 1024 positions, the store's vocabulary, fp32). ``--model`` takes anything
``evaluator.load_model`` accepts (``default`` = the bundled trained model).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ._util import PeakMemory, fmt_bytes, fmt_rate, machine, one_line_errors, sync, table, write_json

CACHE = Path("bench-out") / "stores"
GOAL_VS_COMPUTE = 0.97


# ---- defaults: store and model ------------------------------------------------------------------
def default_tokenizer(cache: Path = CACHE) -> tuple[str, str]:
    """(tokenizer spec, label): the bundled tokenizer when it exists, else a 4096-entry byte-level BPE
    trained on ``stdlib:train`` (as bench_tokenize does), cached in ``cache/bpe4096``."""
    from streamdata.tokenize import DEFAULT_TOKENIZER

    if (DEFAULT_TOKENIZER / "tokenizer.json").is_file():
        return "default", "default"
    f = cache / "bpe4096" / "tokenizer.json"
    if not f.is_file():
        from .bench_tokenize import _default_tokenizer

        f.parent.mkdir(parents=True, exist_ok=True)
        made = Path(_default_tokenizer(f.parent))
        if made != f:  # an older bundled location: use it where it is
            return str(made), "bundled"
    return str(f), "bpe4096"


def default_store(cache: Path = CACHE, log: Callable[[str], None] = print) -> Path:
    """The embedded corpus's eval part, tokenized once and cached (rebuilt only when missing)."""
    import streamdata

    spec, label = default_tokenizer(cache)
    out = cache / f"stdlib-eval-{label}"
    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        log(f"building the default store {out} (stdlib:eval, tokenizer {label}) ...")
        streamdata.tokenize_dataset(source="stdlib:eval", tokenizer=spec, out=str(out))
        log(f"  built in {time.perf_counter() - t0:.1f} s (cached for later runs)")
    return out


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def random_gpt2(device: torch.device, vocab: int, n_positions: int = 1024, dtype: torch.dtype = torch.float32,
                small: bool | None = None, n_layer: int | None = None, n_embd: int | None = None):
    """A GPT-2 model with random weights (seed 0). ``small`` (default: on CUDA) is GPT-2 small's shape
    (12 layers, 768 hidden, 12 heads, vocab max(50257, ``vocab``)); otherwise 4 layers, 256 hidden,
    4 heads and the store's vocabulary, so a CPU run stays short."""
    from transformers import GPT2Config, GPT2LMHeadModel

    small = device.type == "cuda" if small is None else small
    if small:
        layers, hidden, heads, v = 12, 768, 12, max(50257, vocab)
    else:
        layers, hidden, heads, v = 4, 256, 4, vocab
    layers, hidden = n_layer or layers, n_embd or hidden
    heads = max(1, hidden // 64)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, n_positions=n_positions, vocab_size=v,
                     bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg).to(device=device, dtype=dtype).eval()


def describe_model(module: torch.nn.Module) -> str:
    cfg = getattr(module, "config", None)
    n = sum(p.numel() for p in module.parameters())
    dt = next(module.parameters()).dtype
    if cfg is not None and getattr(cfg, "model_type", None) == "gpt2":
        return (f"GPT-2 {cfg.n_layer} layers x {cfg.n_embd} hidden, {cfg.n_positions} positions, vocab {cfg.vocab_size}, "
                f"{n / 1e6:.1f}M params, {str(dt).replace('torch.', '')}")
    return f"{type(module).__name__}, {n / 1e6:.1f}M params, {str(dt).replace('torch.', '')}"


def load_adapter(spec: str | None, device: torch.device, vocab: int, dtype: torch.dtype, n_positions: int = 1024):
    """An evaluator ``ModelAdapter`` on ``device``: the random GPT-2 for ``None``/``"random"``, else
    ``evaluator.load_model(spec)`` (then cast to ``dtype`` only when given a floating dtype explicitly)."""
    from evaluator import load_model

    if spec in (None, "random"):
        adapter = load_model(random_gpt2(device, vocab, n_positions, dtype))
    else:
        adapter = load_model(spec, dtype=str(dtype).replace("torch.", ""))
        adapter.module.to(device)
    adapter.to(device)
    return adapter


# ---- one run of one variant -----------------------------------------------------------------------
@dataclass
class Run:
    """One timed run: ``scored`` targets whose NLL entered the sum, ``positions`` fed to the model."""

    seconds: float
    scored: int
    positions: int
    loss: float
    batch: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else math.inf


def make_evaluator(adapter, L: int, O: int, batch: int | str, device: torch.device, compile: str | None = None):
    from evaluator import StreamingEvaluator

    # dtype="float32": no autocast; the model runs in its own parameter dtype, like (b) and (c).
    return StreamingEvaluator(adapter, chunk_size=L, overlap=O, device=str(device), verbose=False, mode="sliding",
                              batch_size=batch, dtype="float32", compile=compile)


def run_ours(ev, store, max_tokens: int, checkpoint_interval: float | None = None) -> Run:
    """One evaluation; with ``checkpoint_interval`` into a fresh checkpoint folder (a reused one
    would resume the finished run and compute nothing). ``seconds`` is the engine's loop time
    (checkpoint writes included); ``extra["wall_s"]`` the whole call (the run identity included)."""
    import tempfile

    sync(ev.device)
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        if checkpoint_interval is not None:
            ev.config.checkpoint_interval = checkpoint_interval
        t0 = time.perf_counter()
        r = ev.evaluate_streaming(store, max_tokens=max_tokens,
                                  checkpoint_dir=None if checkpoint_interval is None else tmp)
        wall = time.perf_counter() - t0
    batch = int(r.get("batch_size_after_oom", r["batch_size"]))
    # positions -1: counted from the window plan by the caller
    return Run(r["total_time"], r["total_tokens"], -1, r["loss"], batch, {"num_chunks": r["num_chunks"], "wall_s": wall})


def plan_batches(plan, B: int, device: torch.device) -> list[tuple[int, int, int, torch.Tensor]]:
    """(rows, width, scored, flat indices of the scored targets on the device) of every batch of ``B``
    consecutive windows of ``plan``: the shapes ours computes, built before any timing."""
    out, seen = [], {}
    for i in range(0, len(plan), B):
        ln, sf = plan.length[i : i + B], plan.score_from[i : i + B]
        key = (ln.tobytes(), sf.tobytes())
        if key not in seen:
            T = int(ln.max())
            j = np.arange(T)
            mask = (j[None, :] < ln[:, None]) & (j[None, :] >= sf[:, None])
            flat = torch.from_numpy(np.flatnonzero(mask.reshape(-1))).to(device)
            seen[key] = (len(ln), T, int(mask.sum()), flat)
        out.append(seen[key])
    return out


def compute_only(adapter, batches, vocab: int, device: torch.device, loss_slice: int = 4096) -> Run:
    """(a): forward + sliced loss + float64 device sum over ``batches`` (see :func:`plan_batches`) on a
    device-resident buffer of synthetic ids. No host sync inside the loop, one at the end."""
    from evaluator.metrics import token_nll

    B = max(r for r, _, _, _ in batches)
    T = max(t for _, t, _, _ in batches)
    g = torch.Generator().manual_seed(1)
    buf = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    scored = positions = 0
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for rows, width, count, flat in batches:
            out = adapter.forward_windows(buf[:rows, :width])
            nll = token_nll(out, buf[:rows, 1 : width + 1], flat, loss_slice)
            del out
            total += nll.double().sum()
            scored += count
            positions += rows * width
    loss = total.item() / scored  # syncs: the clock stops after every queued kernel
    dt = time.perf_counter() - t0
    return Run(dt, scored, positions, loss, B)


def quickref_loop(model, data: torch.Tensor, chunk_size: int, device: torch.device) -> Run:
    """(b) the quick-reference pattern, written as people write it: the whole sequence in RAM, batch 1,
    one chunk at a time, full logits, a ``.item()`` sync per chunk."""
    sync(device)
    t0 = time.perf_counter()
    total_loss, total_tokens, positions = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(data) - 1, chunk_size):
            chunk = data[start : start + chunk_size + 1].to(device)
            inputs, targets = chunk[:-1].unsqueeze(0), chunk[1:].unsqueeze(0)
            out = model(inputs)
            logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
            total_loss += loss.item() * targets.numel()
            total_tokens += targets.numel()
            positions += inputs.numel()
    dt = time.perf_counter() - t0
    return Run(dt, total_tokens, positions, total_loss / total_tokens)


def hf_guide_loop(model, encodings: torch.Tensor, max_length: int, stride: int, device: torch.device) -> Run:
    """(c) the transformers perplexity guide's loop (``encodings``: [1, N] input ids in RAM).

    As in the guide: ``nlls.append(outputs.loss * trg_len)``, perplexity ``exp(sum / end_loc)``. The
    scored count is what the model actually averaged: labels that are not -100 after its internal
    shift (``trg_len`` minus one where the window's first label is unmasked)."""
    sync(device)
    t0 = time.perf_counter()
    seq_len = encodings.size(1)
    nlls = []
    prev_end_loc = 0
    scored = positions = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings[:, begin_loc:end_loc].to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100

        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss * trg_len

        nlls.append(neg_log_likelihood)
        scored += trg_len - (trg_len == end_loc - begin_loc)  # bookkeeping only (host ints)
        positions += end_loc - begin_loc
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    ppl = torch.exp(torch.stack(nlls).sum() / end_loc)
    loss = math.log(ppl.item())  # syncs
    dt = time.perf_counter() - t0
    return Run(dt, scored, positions, loss)


# ---- the comparison -------------------------------------------------------------------------------
def measure(adapter, store, *, chunk_size: int, overlap: int, tokens: int, batch: int | str = "auto",
            repeat: int = 3, device: torch.device, log: Callable[[str], None] = print,
            variants: tuple[str, ...] = ("ours", "compute", "quickref", "ours_overlap", "guide"),
            checkpoint_interval: float = 60.0, compile: str = "default") -> dict[str, Any]:
    """Run the variants on the first ``tokens`` tokens of ``store`` and return a JSON-able dict.

    ``variants``: any of ours, ours_ckpt (ours with a checkpoint folder, a checkpoint every
    ``checkpoint_interval`` seconds and at the end), compute, quickref, ours_overlap, guide,
    ours_compiled, ours_overlap_compiled (ours with ``compile``: the adapter is shared, and each
    evaluator compiles only inside its own runs, so the other rows stay eager). Each result holds tok/s
    (scored targets per second, best of ``repeat``), the scored count, positions fed, loss and
    peak memory (device bytes on CUDA, resident-set bytes on CPU, above the run's start)."""
    from streamdata.windows import plan_windows

    L, O = int(chunk_size), int(overlap)
    N = min(int(tokens), len(store))
    module = adapter.module
    vocab = adapter.vocab_size or int(store.vocab_size)
    from evaluator.models import HFAdapter

    is_hf = isinstance(adapter, HFAdapter)  # the guide's loop needs model(input_ids, labels=...)
    wanted = [v for v in variants if v != "guide" or is_hf]
    ev0 = make_evaluator(adapter, L, 0, batch, device) if {"ours", "ours_ckpt", "compute"} & set(wanted) else None
    evO = make_evaluator(adapter, L, O, batch, device) if "ours_overlap" in wanted and O > 0 else None
    if evO is None:
        wanted = [v for v in wanted if v != "ours_overlap"]
    evC = make_evaluator(adapter, L, 0, batch, device, compile) if "ours_compiled" in wanted else None
    evOC = make_evaluator(adapter, L, O, batch, device, compile) if "ours_overlap_compiled" in wanted and O > 0 else None
    if evOC is None:
        wanted = [v for v in wanted if v != "ours_overlap_compiled"]

    data = encodings = None
    if {"quickref", "guide"} & set(wanted):
        t0 = time.perf_counter()
        data = torch.from_numpy(store.read(0, N).astype(np.int64))  # the whole sequence in RAM
        load_s = time.perf_counter() - t0
        encodings = data.unsqueeze(0)
    else:
        load_s = None

    # Warm-up: every variant once, untimed (kernels, allocator, loader thread start-up). ours resolves
    # its batch size on two windows; (a) then replays ours' exact batch shapes. On CUDA, where kernels
    # are chosen per shape, the warm-up runs one full batch; on a CPU two windows are enough.
    cuda = device.type == "cuda"
    resolved_B = None
    if ev0 is not None:
        # auto measures its size on the run's first forwards: a whole run tells the size ours uses
        resolved_B = run_ours(ev0, store, N if batch == "auto" else min(N, 2 * L + 1)).batch
        if cuda:
            run_ours(ev0, store, min(N, resolved_B * L + 1))
    batches = None
    if "compute" in wanted:
        plan = plan_windows(store.doc_offsets, L, 0, "stream", max_tokens=N)
        batches = plan_batches(plan, resolved_B, device)
        compute_only(adapter, batches[:1] if cuda else plan_batches(plan[:2], 2, device), vocab, device,
                     ev0.config.loss_slice)
    if "quickref" in wanted:
        quickref_loop(module, data[: min(N, 2 * L + 1)], L, device)
    if evO is not None:
        run_ours(evO, store, min(N, (resolved_B or 1) * L + 1) if cuda else min(N, 2 * L + 1))
    if "guide" in wanted:
        hf_guide_loop(module, encodings[:, : min(N, 2 * L)], L, L - O, device)
    # Compiled rows: the warm-up compiles the one static shape [B, L] (B windows at least, so it is
    # the shape of the timed runs too); compiling takes seconds to minutes and is never timed.
    for e in (evC, evOC):
        if e is not None:
            B = resolved_B or 1
            run_ours(e, store, min(N, B * (L - e.overlap) + e.overlap + 1))

    fns: dict[str, Callable[[], Run]] = {
        "ours": lambda: run_ours(ev0, store, N),
        "ours_ckpt": lambda: run_ours(ev0, store, N, checkpoint_interval),
        "compute": lambda: compute_only(adapter, batches, vocab, device, ev0.config.loss_slice),
        "quickref": lambda: quickref_loop(module, data, L, device),
        "ours_overlap": lambda: run_ours(evO, store, N),
        "guide": lambda: hf_guide_loop(module, encodings, L, L - O, device),
        "ours_compiled": lambda: run_ours(evC, store, N),
        "ours_overlap_compiled": lambda: run_ours(evOC, store, N),
    }
    runs: dict[str, list[Run]] = {v: [] for v in wanted}
    peaks: dict[str, int | None] = {v: None for v in wanted}
    for r in range(repeat):
        for v in wanted:
            with PeakMemory(device) as pm:
                run = fns[v]()
            runs[v].append(run)
            if pm.bytes is not None:
                peaks[v] = max(peaks[v] or 0, pm.bytes)
            log(f"  repeat {r + 1}/{repeat}  {v:<13} {fmt_rate(run.rate):>8} scored tok/s  ({run.seconds:.2f} s)")

    positions_ours = {0: None, O: None}
    if ev0 is not None or evO is not None:  # positions ours feeds: its plan's window lengths
        for o in {0, O}:
            p = plan_windows(store.doc_offsets, L, o, "stream", max_tokens=N)
            positions_ours[o] = int(p.length.sum())
    meta = {
        "ours": ("ours: StreamingEvaluator from the store", 0),
        "ours_ckpt": (f"ours + checkpoints (every {checkpoint_interval:g} s, and at the end)", 0),
        "compute": ("(a) compute only (device-resident synthetic)", 0),
        "quickref": ("(b) quick-ref loop (batch 1, RAM, .item()/chunk)", 0),
        "ours_overlap": (f"ours, overlap {O}", O),
        "guide": (f"(c) HF perplexity guide (stride {L - O})", O),
        "ours_compiled": (f"ours, compiled ({compile})", 0),
        "ours_overlap_compiled": (f"ours, overlap {O}, compiled ({compile})", O),
    }
    results: dict[str, Any] = {}
    for v in wanted:
        best = min(runs[v], key=lambda x: x.seconds)
        if v == "compute":  # ours' batch size (a stream shorter than one batch still reports it)
            best.batch = resolved_B
        pos = best.positions if best.positions >= 0 else positions_ours[meta[v][1]]
        results[v] = {
            "label": meta[v][0], "overlap": meta[v][1], "batch": best.batch, "scored": best.scored,
            "positions": pos, "seconds": best.seconds, "tok_per_s": best.rate, "loss": best.loss,
            "runs_s": [x.seconds for x in runs[v]], "peak_bytes": peaks[v],
            "wall_s": [x.extra["wall_s"] for x in runs[v]] if "wall_s" in best.extra else None,
        }
    # Ratios of the best runs, and the median of per-round ratios: each round runs every variant back
    # to back, so a paired ratio cancels load that drifts between rounds (a shared machine).
    ratios, paired = {}, {}
    for mine, other in (("ours", "compute"), ("ours_ckpt", "compute"), ("ours_ckpt", "ours"), ("ours", "quickref"),
                        ("ours_overlap", "guide"), ("ours_compiled", "ours"), ("ours_compiled", "quickref"),
                        ("ours_overlap_compiled", "ours_overlap"), ("ours_overlap_compiled", "guide")):
        if mine in results and other in results:
            ratios[f"{mine}/{other}"] = results[mine]["tok_per_s"] / results[other]["tok_per_s"]
            rr = sorted((b.seconds / b.scored) / (a.seconds / a.scored) for a, b in zip(runs[mine], runs[other]))
            paired[f"{mine}/{other}"] = float(np.median(rr))
    return {"tokens": N, "chunk_size": L, "overlap": O, "batch": resolved_B, "repeat": repeat,
            "compile": compile if {"ours_compiled", "ours_overlap_compiled"} & set(wanted) else None,
            "device": str(device), "load_into_ram_s": load_s, "results": results, "ratios": ratios,
            "paired_ratios": paired,
            "peak_memory_kind": "device (max_memory_allocated)" if device.type == "cuda" else "host RSS (VmHWM delta)"}


def measure_auto_batch(adapter, store, *, chunk_size: int, tokens: int, device: torch.device,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """The auto-batch rows (see the module docstring): :func:`benchmarks._util.auto_batch_rows` over
    ours with overlap 0 on the first ``tokens`` tokens."""
    from evaluator.autobatch import ladder_sizes
    from evaluator.config import StreamingEvalConfig
    from evaluator.resolve import batch_windows_for, cpu_guess

    from ._util import auto_batch_rows

    L = int(chunk_size)
    bound = batch_windows_for(StreamingEvalConfig(batch_size="auto"), adapter, device, "sliding", L)
    old = bound if device.type == "cuda" else cpu_guess("sliding", L)
    log(f"auto batch: bound {bound}, sweep {ladder_sizes(bound)}, old rule {old}; one run each of "
        f"{min(tokens, len(store)):,} tokens")
    return auto_batch_rows(lambda B: make_evaluator(adapter, L, 0, B, device).evaluate_streaming(store, max_tokens=tokens),
                           ladder_sizes(bound), old, log)


def print_results(m: dict[str, Any], print_fn: Callable[[str], None] = print) -> None:
    rows = []
    order = ["ours", "ours_ckpt", "compute", "quickref", "ours_overlap", "guide", "ours_compiled", "ours_overlap_compiled"]
    res = m["results"]
    ref = {0: res.get("ours"), m["overlap"]: res.get("ours_overlap")}
    for v in order:
        if v not in res:
            continue
        r = res[v]
        mine = ref.get(r["overlap"])
        x = mine["tok_per_s"] / r["tok_per_s"] if mine and mine is not r else None
        rows.append([r["label"], r["overlap"], r["batch"], f"{r['scored']:,}", f"{r['positions']:,}",
                     fmt_rate(r["tok_per_s"]), "" if x is None else f"{x:.2f}x", f"{r['loss']:.4f}",
                     fmt_bytes(r["peak_bytes"])])
    print_fn(table(rows, ["variant", "overlap", "batch", "scored", "positions", "scored tok/s", "ours/this",
                          "loss", "peak mem"]))


def print_ratios(m: dict[str, Any], print_fn: Callable[[str], None] = print) -> None:
    """Ratios of the best runs and (in brackets) the median of per-round paired ratios; the goal
    against compute only is judged on the paired median (robust to load drifting between rounds)."""
    rt, pr = m["ratios"], m.get("paired_ratios", {})

    def both(k: str, fmt: str) -> str:
        return f"{rt[k]:{fmt}} best/best, {pr[k]:{fmt}} per-round median" if k in pr else f"{rt[k]:{fmt}}"

    if "ours/compute" in rt:
        ok = "met" if pr.get("ours/compute", rt["ours/compute"]) >= GOAL_VS_COMPUTE else "NOT met"
        print_fn(f"ours / (a) compute only   = {both('ours/compute', '.3f')}   (goal >= {GOAL_VS_COMPUTE}: {ok})")
    if "ours_ckpt/compute" in rt:
        ok = "met" if pr.get("ours_ckpt/compute", rt["ours_ckpt/compute"]) >= GOAL_VS_COMPUTE else "NOT met"
        print_fn(f"ours+checkpoints / (a)    = {both('ours_ckpt/compute', '.3f')}   (goal >= {GOAL_VS_COMPUTE}: {ok})")
        print_fn(f"ours+checkpoints / ours   = {both('ours_ckpt/ours', '.3f')}   (checkpointing's cost: ~1.0 expected)")
        w = m["results"]["ours_ckpt"].get("wall_s"), m["results"]["ours"].get("wall_s")
        if all(w):
            print_fn(f"  whole calls (run identity included): {min(w[0]):.3f} s vs {min(w[1]):.3f} s without checkpoints")
    if "ours/quickref" in rt:
        print_fn(f"ours / (b) quick-ref loop = {both('ours/quickref', '.2f')}  (goal on a GPU: several times)")
    if "ours_overlap/guide" in rt:
        print_fn(f"ours(overlap {m['overlap']}) / (c) HF guide = {both('ours_overlap/guide', '.2f')}  (goal on a GPU: several times)")
    if "ours_compiled/ours" in rt:
        print_fn(f"ours compiled / ours eager = {both('ours_compiled/ours', '.2f')}  (overlap 0)")
    if "ours_overlap_compiled/ours_overlap" in rt:
        print_fn(f"ours compiled / ours eager = {both('ours_overlap_compiled/ours_overlap', '.2f')}  (overlap {m['overlap']})")
    if "ours_overlap_compiled/guide" in rt:
        print_fn(f"ours(overlap {m['overlap']}) compiled / (c) HF guide = {both('ours_overlap_compiled/guide', '.2f')}")


def run_settings(a: argparse.Namespace, cpu_tokens: int) -> tuple[torch.device, int, int, int | str, torch.dtype, Path]:
    """The settings this benchmark and bench_compare derive alike from their flags: device (and
    ``--threads``), chunk L (1024 on CUDA, 512 on CPU), tokens N (1Mi on CUDA, ``cpu_tokens`` on
    CPU), windows per forward, model dtype and the store's path (the embedded corpus by default)."""
    from evaluator.config import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    cuda = device.type == "cuda"
    L = a.chunk_size or (1024 if cuda else 512)
    N = a.tokens or ((1 << 20) if cuda else cpu_tokens)
    batch = a.batch_size if a.batch_size == "auto" else int(a.batch_size)
    store_path = Path(a.store) if a.store else default_store(Path(a.cache))
    return device, L, N, batch, resolve_dtype(a.dtype, device), store_path


@one_line_errors("python -m benchmarks.bench_eval")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="a token store (default: the embedded stdlib corpus, built once and cached)")
    ap.add_argument("--model", default="random",
                    help="'random' (default: a GPT-2-shaped model with random weights), 'default' (the bundled "
                         "model), a transformers folder or hub id, or package.module:factory")
    ap.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    ap.add_argument("--tokens", type=int, help="evaluate the store's first N tokens (default 1Mi on CUDA, 24Ki on CPU)")
    ap.add_argument("--chunk-size", type=int, help="window length L (default 1024 on CUDA, 512 on CPU)")
    ap.add_argument("--overlap", type=int, help="overlap of the second ours row; (c) uses stride L - overlap (default L/2)")
    ap.add_argument("--batch-size", default="auto", help="windows per forward for ours and (a) (default: the evaluator's auto)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="model dtype for every variant (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--repeat", type=int, help="timed runs per variant; the best counts (default 3)")
    ap.add_argument("--threads", type=int, help="torch CPU threads for every variant (default: torch's default)")
    ap.add_argument("--cache", default=str(CACHE), help="folder for the default store (default bench-out/stores)")
    ap.add_argument("--checkpoint-interval", type=float, default=60.0, metavar="SECONDS",
                    help="the 'ours + checkpoints' row: seconds between checkpoints (default %(default)g, the CLI's)")
    ap.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead"),
                    help="add the rows 'ours, compiled' (overlap 0 and --overlap) with torch.compile of the model body "
                         "in this mode (default: default); compiling is part of the untimed warm-up")
    ap.add_argument("--auto-batch", action="store_true",
                    help="add the auto-batch rows: batch auto (measured) vs a sweep of fixed sizes and vs the old rule")
    ap.add_argument("--auto-tokens", type=int, help="tokens of each auto-batch run (default: --tokens)")
    ap.add_argument("--out", help="folder for bench_eval.json")
    a = ap.parse_args(argv)

    from streamdata import open_store

    device, L, N, batch, dtype, store_path = run_settings(a, cpu_tokens=24576)
    cuda = device.type == "cuda"
    O = L // 2 if a.overlap is None else a.overlap
    repeat = a.repeat or 3
    with open_store(store_path) as store:
        len_store = len(store)
        adapter = load_adapter(a.model, device, int(store.vocab_size or 50257), dtype, n_positions=max(1024, L))
        print(f"store {store_path}: {len(store):,} tokens ({store.dtype}); evaluating the first {min(N, len(store)):,}")
        print(f"model {a.model}: {describe_model(adapter.module)}; device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if cuda else f" ({torch.get_num_threads()} threads)"))
        print(f"chunk {L}, overlap rows {O}; warm-up, then {repeat} interleaved repeats (best counts); "
              f"load average {os.getloadavg()[0]:.2f}")
        m = measure(adapter, store, chunk_size=L, overlap=O, tokens=N, batch=batch, repeat=repeat, device=device,
                    variants=("ours", "ours_ckpt", "compute", "quickref", "ours_overlap", "guide")
                    + (("ours_compiled", "ours_overlap_compiled") if a.compile else ()),
                    checkpoint_interval=a.checkpoint_interval, compile=a.compile or "default")
        if a.auto_batch:
            m["auto_batch"] = measure_auto_batch(adapter, store, chunk_size=L, tokens=a.auto_tokens or N, device=device)
    print()
    print_results(m)
    if "auto_batch" in m:
        from ._util import auto_batch_table

        print(f"\nauto batch, overlap 0, {min(a.auto_tokens or N, len_store):,} tokens, one run each:\n{auto_batch_table(m['auto_batch'])}")
    print()
    print_ratios(m)
    print(f"\nscored = targets whose NLL entered the sum (N - 1 = {m['tokens'] - 1:,} for every row); positions = "
          f"tokens fed to the model; tok/s = scored / seconds. peak mem = {m['peak_memory_kind']} above the "
          f"run's start. (b)/(c) read the {m['tokens']:,} tokens into RAM first "
          f"({(m['load_into_ram_s'] or 0) * 1e3:.1f} ms, not timed).")
    path = write_json(a.out, "bench_eval.json", {
        "command": "python -m benchmarks.bench_eval", "args": vars(a), "store": str(store_path),
        "model": describe_model(adapter.module), **m,
    })
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
