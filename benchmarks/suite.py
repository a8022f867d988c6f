"""The benchmark suite: on one store and one model, in one run, measure each stage of a streaming
evaluation on its own, the whole pipeline end to end, and the baselines people use today.

    python -m benchmarks [--store S] [--model M] [--device D] [--out DIR] [--quick]

Stages (every throughput in tokens/s, so they compare like with like: token ids the stage moves,
or targets the model scores; with overlap 0 each stored token is scored once):
- disk -> host: the store's shard files read sequentially (16 MiB ``readinto``), cold (every shard's
  pages evicted first with ``posix_fadvise(POSIX_FADV_DONTNEED)``, residency checked with ``mincore``)
  and warm (page cache);
- host -> device: ``copy_`` of pinned and of pageable host buffers at a few sizes (CUDA only; on a
  CPU-only machine there is no link: "n/a (no device)");
- loader: ``WindowLoader`` alone, scored tokens per second delivered to the device (as the evaluator
  runs it: ``release_behind=True``, so later passes re-read what it dropped);
- model: the same model on device-resident synthetic input, compute only (bench_eval's (a));
- end to end: ``StreamingEvaluator.evaluate_streaming(store)`` (bench_eval's "ours").
Verdict: the stage with the lowest throughput among disk (cold), link (pinned, at the loader's
transfer size), loader and model bounds the run; overlap efficiency = end to end / that minimum.

Sweeps: chunk size (batch auto) and batch size (at the main chunk size): throughput and peak memory
(CUDA: ``torch.cuda.max_memory_allocated`` above the start; CPU: peak RSS above the start).
Baselines in the same run, each as a ratio to ours: the batch-1 sync-per-chunk whole-sequence-in-RAM
loop and the transformers perplexity-guide loop (to end to end), nanoGPT ``get_batch``,
``DataLoader(pin_memory=True)`` and raw memmap reading (to ``WindowLoader``, warm page cache).
Memory scaling: peak RSS (VmHWM) and peak device memory of a fresh process evaluating 1M, 10M and
100M+ tokens (``--quick``: 1M, 10M, 20M) of a synthetic uint16 store with a tiny bigram model.

Outputs: tables on the terminal; ``suite.json`` and PNG charts (``stages.png``, ``sweeps.png``,
``memory.png``) in ``--out`` (default ``bench-out/suite``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import bench_eval as be
from . import bench_loader as bl
from ._util import (PeakMemory, fmt_bytes, fmt_rate, machine, one_line_errors, proc_status_kb, reset_peak_rss, sync, table,
                    write_json)

ROOT = Path(__file__).resolve().parents[1]
_READ_BLOCK = 16 << 20


# ---- settings -------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Sizes of one suite run. ``for_device`` gives the defaults (GPU, CPU, quick)."""

    chunk_size: int  # main window length L
    tokens: int  # tokens of the model / end-to-end / baseline runs
    sweep_tokens: int
    chunk_sweep: tuple[int, ...]
    batch_sweep: tuple[int, ...]
    n_positions: int  # of the default random model
    repeat: int
    loader_repeat: int
    memory_sizes: tuple[int, ...]
    link_sizes: tuple[int, ...] = (64 << 10, 1 << 20, 16 << 20, 64 << 20)
    workers: tuple[int, ...] = (0, 2)
    batch: int | str = "auto"
    sweep_repeat: int = 2  # runs per sweep point; the best counts
    memory_chunk: int = 16384
    memory_batch: int = 8

    @classmethod
    def for_device(cls, device: torch.device, quick: bool) -> "Settings":
        if device.type == "cuda":
            return cls(chunk_size=4096, tokens=(1 << 18) if quick else (1 << 20), sweep_tokens=(1 << 18) if quick else (1 << 20),
                       chunk_sweep=(2048, 4096, 8192, 16384), batch_sweep=(1, 8, 32, 64), n_positions=16384,
                       repeat=2 if quick else 3, loader_repeat=3 if quick else 5, sweep_repeat=1 if quick else 2,
                       memory_sizes=(10**6, 10**7, 2 * 10**7) if quick else (10**6, 10**7, 100 << 20))
        # CPU: a scaled-down model (see bench_eval.random_gpt2) and sizes that keep the default run
        # under ~5 minutes on 2 cores (--quick: ~2). Chunk sizes scaled down from 2048..16384.
        return cls(chunk_size=512, tokens=(1 << 13) if quick else (1 << 14), sweep_tokens=(1 << 13) if quick else (1 << 14),
                   chunk_sweep=(256, 512, 1024, 2048), batch_sweep=(1, 4, 8, 32), n_positions=2048,
                   repeat=1 if quick else 3, loader_repeat=3 if quick else 5,
                   memory_sizes=(10**6, 10**7, 2 * 10**7) if quick else (10**6, 10**7, 100 << 20),
                   link_sizes=(), workers=(0,) if quick else (0, 2), batch=8, sweep_repeat=1 if quick else 2)


# ---- disk -> host ---------------------------------------------------------------------------------
def resident_fraction(path: str | os.PathLike) -> float | None:
    """Fraction of the file's pages in the page cache (``mincore`` on a fresh mapping), None if unknown."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = -(-size // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            return float((np.frombuffer(vec, np.uint8) & 1).mean())
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


def evict(files: list[str]) -> None:
    """Drop the files' clean pages from the page cache (pages mapped by a live process may stay)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages cannot be dropped: write them back first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_files(files: list[str]) -> tuple[float, int]:
    """Seconds to read ``files`` sequentially into one reused 16 MiB buffer, and the bytes read."""
    buf = bytearray(_READ_BLOCK)
    n = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                k = fh.readinto(buf)
                if not k:
                    break
                n += k
    return time.perf_counter() - t0, n


def shard_files(store) -> list[str]:
    return [os.path.join(store.path, s.file) for s in store.manifest.shards if s.tokens]


def disk_stage(store, repeat: int = 3) -> dict[str, Any]:
    """Cold (evicted, one pass) and warm (best of ``repeat``) sequential reads of the shard files."""
    item = store.dtype.itemsize
    if store.manifest.format != "npy":
        return {"cold": None, "warm": None, "note": f"{store.manifest.format} store: file reads not measured"}
    files = shard_files(store)
    evict(files)
    res_before = [resident_fraction(f) for f in files]
    known = [r for r in res_before if r is not None]
    cached = max(known) if known else None
    s, n = read_files(files)
    cold = {"seconds": s, "bytes": n, "GB_per_s": n / s / 1e9, "tok_per_s": n / item / s,
            "resident_after_evict": cached}
    best = min(read_files(files)[0] for _ in range(repeat))
    warm = {"seconds": best, "bytes": n, "GB_per_s": n / best / 1e9, "tok_per_s": n / item / best}
    note = None
    if cached is not None and cached > 0.05:
        note = f"eviction incomplete: {cached:.0%} of a shard stayed cached (mapped elsewhere?); 'cold' is partly warm"
    if n < (64 << 20):
        note = (note + "; " if note else "") + f"small store ({n / 1e6:.0f} MB): the cold figure includes per-file latency"
    return {"cold": cold, "warm": warm, "note": note}


# ---- host -> device ----------------------------------------------------------------------------------
def link_stage(device: torch.device, sizes: tuple[int, ...], repeat: int = 5) -> list[dict[str, Any]] | None:
    """Pinned and pageable host-to-device ``copy_`` at each size: GB/s, best of ``repeat`` batches of
    copies (wall clock between ``synchronize`` calls). None without a CUDA device."""
    if device.type != "cuda":
        return None
    rows = []
    for n in sizes:
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        srcs = {"pinned": torch.ones(n, dtype=torch.uint8).pin_memory(), "pageable": torch.ones(n, dtype=torch.uint8)}
        iters = max(3, min(200, (256 << 20) // n))
        row: dict[str, Any] = {"bytes": n}
        for kind, src in srcs.items():
            nb = kind == "pinned"
            dst.copy_(src, non_blocking=nb)
            torch.cuda.synchronize(device)
            best = float("inf")
            for _ in range(repeat):
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(iters):
                    dst.copy_(src, non_blocking=nb)
                torch.cuda.synchronize(device)
                best = min(best, (time.perf_counter() - t0) / iters)
            row[f"{kind}_GB_per_s"] = n / best / 1e9
        rows.append(row)
        del dst, srcs
    return rows


def link_rate_for(rows: list[dict[str, Any]] | None, transfer_bytes: int, itemsize: int) -> float | None:
    """Tokens/s of a pinned copy at the measured size nearest (in log scale) to ``transfer_bytes``."""
    if not rows:
        return None
    r = min(rows, key=lambda r: abs(np.log(r["bytes"]) - np.log(max(1, transfer_bytes))))
    return r["pinned_GB_per_s"] * 1e9 / itemsize


# ---- loader and its baselines -------------------------------------------------------------------------
def loader_stage(store, L: int, B: int, device: torch.device, repeat: int) -> dict[str, Any]:
    """``WindowLoader`` over the whole store as the evaluator runs it (``release_behind=True``)."""
    s, t = bl.best_pass(lambda: bl.window_loader_pass(store, L, 0, B, device, True, count="scored"), repeat)
    return {"seconds": s, "scored": t, "tok_per_s": t / s if t else None, "release_behind": True}


def loader_baselines(store, L: int, B: int, device: torch.device, repeat: int, workers: tuple[int, ...]) -> dict[str, Any]:
    """Raw memmap reading (the limit), nanoGPT ``get_batch``, ``DataLoader(pin_memory=True)`` and ours
    (``release_behind=False``) over the same overlap-0 windows of the whole store, warm page cache.
    Tokens/s = input tokens delivered (B x L per batch) after the first batch."""
    from streamdata.windows import plan_windows

    if store.manifest.format != "npy":
        return {"note": f"{store.manifest.format} store: the memmap baselines need an npy store"}
    shards = bl.Shards(store)
    bl.warm_page_cache(shards)
    plan = plan_windows(store.doc_offsets, L, 0, "stream")
    n = len(store)
    out: dict[str, Any] = {}

    def rec(key, label, fn):
        s, t = bl.best_pass(fn, repeat)
        out[key] = {"label": label, "seconds": s, "tokens": t, "tok_per_s": t / s if t else None}

    rec("memmap", "raw memmap -> buffer (limit, store dtype, host)", lambda: bl.memmap_limit(shards, plan, B, L))
    rec("nanogpt", "nanoGPT get_batch", lambda: bl.nanogpt_get_batch(shards, plan, B, L, n, device))
    for k in workers:
        rec(f"dataloader{k}", f"DataLoader(pin_memory={device.type == 'cuda'}, num_workers={k})",
            lambda k=k: bl.dataloader_pass(shards, plan, B, L, n, device, k))
    rec("ours", "WindowLoader (release_behind=False)", lambda: bl.window_loader_pass(store, L, 0, B, device, False))
    ours = out["ours"]["tok_per_s"]
    for v in out.values():
        v["ours_over_this"] = ours / v["tok_per_s"] if v["tok_per_s"] else None
    return out


# ---- sweeps ----------------------------------------------------------------------------------------
def sweep_point(adapter, store, L: int, B: int | str, tokens: int, device: torch.device, repeat: int = 1) -> dict[str, Any]:
    """End-to-end runs at chunk ``L`` and batch ``B``: scored tok/s (best of ``repeat``) and peak memory."""
    ev = be.make_evaluator(adapter, L, 0, B, device)
    if device.type == "cuda":  # kernels are chosen per shape: one untimed batch first
        be.run_ours(ev, store, min(tokens, L * (B if isinstance(B, int) else 8) + 1))
    runs, peak = [], None
    for _ in range(max(1, repeat)):
        with PeakMemory(device) as pm:
            runs.append(be.run_ours(ev, store, tokens))
        if pm.bytes is not None:
            peak = max(peak or 0, pm.bytes)
    run = min(runs, key=lambda r: r.seconds)
    return {"chunk_size": L, "batch": run.batch, "scored": run.scored, "seconds": run.seconds,
            "tok_per_s": run.rate, "peak_bytes": peak, "runs_s": [r.seconds for r in runs]}


def sweeps(adapter, store, st: Settings, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    ctx = adapter.max_positions
    chunks = [c for c in st.chunk_sweep if ctx is None or c <= ctx]
    skipped = [c for c in st.chunk_sweep if c not in chunks]
    out: dict[str, Any] = {"tokens": st.sweep_tokens, "chunk": [], "batch": [], "skipped_chunks": skipped,
                           "chunk_sweep_batch": st.batch}
    for L in chunks:
        p = sweep_point(adapter, store, L, st.batch, st.sweep_tokens, device, st.sweep_repeat)
        out["chunk"].append(p)
        log(f"  chunk {L:>6} batch {p['batch']:>4}: {fmt_rate(p['tok_per_s']):>8} tok/s, peak {fmt_bytes(p['peak_bytes'])}")
    for B in st.batch_sweep:
        p = sweep_point(adapter, store, st.chunk_size, B, st.sweep_tokens, device, st.sweep_repeat)
        out["batch"].append(p)
        log(f"  chunk {st.chunk_size:>6} batch {B:>4}: {fmt_rate(p['tok_per_s']):>8} tok/s, peak {fmt_bytes(p['peak_bytes'])}")
    return out


# ---- memory scaling ---------------------------------------------------------------------------------
class Bigram(nn.Module):
    """A tiny model for the memory-scaling runs: embedding + linear (logits depend on one token)."""

    def __init__(self, vocab: int = 16, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(x))


MEMORY_VOCAB = 16


def memory_store(cache: Path, tokens: int, log: Callable[[str], None]) -> Path:
    """A synthetic uint16 store of at least ``tokens`` random ids (vocab 16), reused when present."""
    for p in sorted(cache.glob("synthetic-u16-v16-*")):
        try:
            n = int(p.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if n >= tokens and (p / "manifest.json").is_file():
            return p
    # The next power of two's worth of Mi-tokens at or above ``tokens`` (100M -> 100Mi = 104,857,600).
    n = -(-tokens // (1 << 20)) * (1 << 20)
    p = cache / f"synthetic-u16-v16-{n}"
    t0 = time.perf_counter()
    bl.build_synthetic(p, n, vocab=MEMORY_VOCAB, doc_tokens=1 << 20)
    log(f"  built {p} ({n:,} uint16 tokens, {n * 2 / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s (cached)")
    return p


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: evaluate ``spec['tokens']`` tokens, report VmHWM and device peak."""
    from evaluator import StreamingEvaluator

    dev = torch.device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    ev = StreamingEvaluator(Bigram(MEMORY_VOCAB), chunk_size=spec["chunk"], device=str(dev), verbose=False,
                            mode="sliding", batch_size=spec["batch"], loss_slice=spec["chunk"] * spec["batch"])
    ev.evaluate_streaming(spec["store"], max_tokens=spec["chunk"] * spec["batch"] + 1)  # warm-up: one batch
    hwm_setup = proc_status_kb("VmHWM")
    rss0 = proc_status_kb("VmRSS")
    exact = reset_peak_rss()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        dev0 = torch.cuda.memory_allocated(dev)
    # The peak is an extreme value (the worst interleaving of the reader thread's and the model's
    # allocations so far), so it creeps up with run length even when memory is bounded; the median
    # of RSS samples during the run shows the steady state.
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            v = proc_status_kb("VmRSS")
            if v is not None:
                samples.append(v)

    th = threading.Thread(target=sample, name="bench-rss-sampler", daemon=True)
    th.start()
    t0 = time.perf_counter()
    try:
        r = ev.evaluate_streaming(spec["store"], max_tokens=spec["tokens"])
    finally:
        done.set()
        th.join()
    dt = time.perf_counter() - t0
    hwm_eval = proc_status_kb("VmHWM")
    out = {"tokens": spec["tokens"], "scored": r["total_tokens"], "seconds": dt, "tok_per_s": r["total_tokens"] / dt,
           "rss_before_kb": rss0, "peak_rss_eval_kb": hwm_eval if exact else None,
           "median_rss_kb": int(np.median(samples)) if samples else rss0, "rss_samples": len(samples),
           "peak_rss_kb": max(hwm_setup or 0, hwm_eval or 0), "rss_growth_kb": (hwm_eval - rss0) if exact else None,
           "device_peak_bytes": None, "loss": r["loss"]}
    if dev.type == "cuda":
        out["device_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - dev0
    return out


def memory_scaling(sizes: tuple[int, ...], device: torch.device, cache: Path, chunk: int, batch: int,
                   log: Callable[[str], None], threads: int | None = None) -> dict[str, Any]:
    # absolute: the children run in the repository root, whatever the caller's cwd
    store = memory_store(cache, max(sizes), log).resolve()
    rows = []
    for n in sizes:
        spec = {"store": str(store), "tokens": int(n), "device": str(device), "chunk": chunk, "batch": batch,
                "threads": threads}
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "benchmarks.suite", "--memory-child", json.dumps(spec)],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory-scaling child for {n:,} tokens failed:\n{proc.stderr[-2000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        log(f"  {n:>12,} tokens: RSS median {row['median_rss_kb'] / 1024:,.0f} MB, peak {row['peak_rss_kb'] / 1024:,.0f} MB, "
            f"{fmt_rate(row['tok_per_s'])} tok/s")
    first, last = rows[0], rows[-1]
    dm = (last["median_rss_kb"] - first["median_rss_kb"]) / 1024
    flat = {"tokens_first": first["tokens"], "tokens_last": last["tokens"], "median_delta_mb": dm,
            "peak_delta_mb": (last["peak_rss_kb"] - first["peak_rss_kb"]) / 1024, "int64_mb": last["tokens"] * 8 / 2**20,
            "flat": abs(dm) < max(32.0, 0.1 * first["median_rss_kb"] / 1024)}
    if first["device_peak_bytes"] is not None:
        flat["device_delta_mb"] = (last["device_peak_bytes"] - first["device_peak_bytes"]) / 2**20
    return {"store": str(store), "model": f"Bigram(vocab {MEMORY_VOCAB}, dim 16)", "chunk_size": chunk,
            "batch": batch, "rows": rows, "flatness": flat}


def fmt_kb(kb: int | None) -> str:
    return "n/a" if kb is None else fmt_bytes(kb * 1024)


# ---- verdict ---------------------------------------------------------------------------------------
def verdict(stages: dict[str, float | None], e2e: float) -> dict[str, Any]:
    """The slowest stage bounds the run; overlap efficiency = end to end / that stage's throughput."""
    known = {k: v for k, v in stages.items() if v}
    bound = min(known, key=known.get)
    rest = sorted((v, k) for k, v in known.items() if k != bound)
    return {"bound_by": bound, "bound_tok_per_s": known[bound], "end_to_end_tok_per_s": e2e,
            "overlap_efficiency": e2e / known[bound],
            "headroom": {k: v / known[bound] for v, k in rest}}


STAGE_NAMES = {"disk": "disk (cold)", "link": "host->device link", "loader": "loader", "compute": "compute (model)"}


# ---- charts ----------------------------------------------------------------------------------------
def charts(res: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # 1. throughput per stage, and baselines vs ours
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    st = res["stages"]
    labels, vals, colors = [], [], []
    for key, lab, col in (("disk_cold", "disk cold", "tab:gray"), ("disk_warm", "disk warm", "tab:gray"),
                          ("link", "H2D pinned", "tab:purple"), ("loader", "loader", "tab:blue"),
                          ("compute", "model alone", "tab:orange"), ("end_to_end", "end to end", "tab:green")):
        v = st.get(key)
        if v:
            labels.append(lab)
            vals.append(v)
            colors.append(col)
    a1.barh(labels[::-1], vals[::-1], color=colors[::-1])
    a1.set_xscale("log")
    a1.set_xlabel("tokens/s (log)")
    a1.set_title(f"stages: bound by {res['verdict']['bound_by']}, overlap eff. {res['verdict']['overlap_efficiency']:.2f}")
    for i, v in enumerate(vals[::-1]):
        a1.text(v, i, " " + fmt_rate(v), va="center", fontsize=8)
    bl_labels, bl_vals, bl_cols = [], [], []
    ev = res["eval"]["results"]
    for key, lab in (("ours", "ours (eval)"), ("quickref", "batch-1 loop"), ("ours_overlap", "ours, overlap"),
                     ("guide", "HF guide")):
        if key in ev:
            bl_labels.append(lab)
            bl_vals.append(ev[key]["tok_per_s"])
            bl_cols.append("tab:green" if key.startswith("ours") else "tab:red")
    for key, v in (res.get("loader_baselines") or {}).items():
        if isinstance(v, dict) and v.get("tok_per_s"):
            short = {"memmap": "memmap limit", "nanogpt": "nanoGPT get_batch", "ours": "ours: WindowLoader"}
            bl_labels.append(short.get(key) or f"DataLoader, {key[len('dataloader'):]} workers")
            bl_vals.append(v["tok_per_s"])
            bl_cols.append("tab:blue" if key == "ours" else "tab:gray")
    a2.barh(bl_labels[::-1], bl_vals[::-1], color=bl_cols[::-1])
    a2.set_xscale("log")
    a2.set_xlabel("tokens/s (log): scored (eval rows), delivered (loader rows)")
    a2.set_title("ours vs baselines")
    for i, v in enumerate(bl_vals[::-1]):
        a2.text(v, i, " " + fmt_rate(v), va="center", fontsize=8)
    fig.tight_layout()
    p = out / "stages.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # 2. sweeps
    sw = res["sweeps"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    mem_label = "peak device MB" if res["device"].startswith("cuda") else "peak RSS above start, MB"
    for ax, key, xlab in ((a1, "chunk", f"chunk size (batch {sw.get('chunk_sweep_batch', 'auto')})"),
                          (a2, "batch", f"batch size (chunk {res['settings']['chunk_size']})")):
        pts = sw[key]
        if not pts:
            continue
        xs = [p["chunk_size"] if key == "chunk" else p["batch"] for p in pts]
        ax.plot(xs, [p["tok_per_s"] for p in pts], "o-", color="tab:green", label="scored tok/s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlab)
        ax.set_ylabel("scored tokens/s")
        ax.set_ylim(bottom=0)
        mem = [(x, p["peak_bytes"] / 1e6) for x, p in zip(xs, pts) if p["peak_bytes"] is not None]
        if mem:
            ax2 = ax.twinx()
            ax2.plot([m[0] for m in mem], [m[1] for m in mem], "s--", color="tab:red", label=mem_label)
            ax2.set_ylabel(mem_label, color="tab:red")
            ax2.set_ylim(bottom=0)
        ax.set_title(f"throughput vs {key} size")
    fig.tight_layout()
    p = out / "sweeps.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # 3. memory scaling
    mem = res.get("memory")
    if mem and mem["rows"]:
        rows = mem["rows"]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        xs = [r["tokens"] for r in rows]
        ax.plot(xs, [r["peak_rss_kb"] / 1024 for r in rows], "o-", label="peak RSS (VmHWM), MB")
        ax.plot(xs, [r["median_rss_kb"] / 1024 for r in rows], "^-", label="median RSS during evaluation, MB")
        ax.plot(xs, [x * 8 / 2**20 for x in xs], ":", color="gray", label="the tokens as one int64 tensor (for scale)")
        if all(r["device_peak_bytes"] is not None for r in rows):
            ax.plot(xs, [r["device_peak_bytes"] / 1e6 for r in rows], "s-", label="peak device memory, MB")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.5 * max(max(r["peak_rss_kb"] / 1024 for r in rows), 1.0))
        ax.set_xlabel("tokens evaluated (streamed from a store)")
        ax.set_ylabel("MB")
        ax.set_title("memory vs tokens evaluated (should be flat)")
        ax.legend()
        fig.tight_layout()
        p = out / "memory.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


# ---- the run ---------------------------------------------------------------------------------------
def evaluator_auto_batch(adapter, device: torch.device, L: int) -> int:
    """Windows per batch that the evaluator's ``batch_size="auto"`` picks for this model, device and
    chunk size in sliding mode (through its public rule; no run)."""
    from evaluator.config import StreamingEvalConfig
    from evaluator.resolve import batch_windows_for

    return batch_windows_for(StreamingEvalConfig(batch_size="auto"), adapter, device, "sliding", L)


def run_suite(store: str | None = None, model: str | None = None, device: str | None = None, out: str | None = None,
              quick: bool = False, settings: Settings | None = None, cache: str | None = None, memory: bool = True,
              make_charts: bool = True, log: Callable[[str], None] = print, threads: int | None = None) -> dict[str, Any]:
    """Run every stage, sweep, baseline and (``memory``) the memory scaling; return the results dict
    (also written to ``out/suite.json`` with charts when ``out`` is given)."""
    from evaluator.config import resolve_device
    from streamdata import open_store

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    st = settings or Settings.for_device(dev, quick)
    cache_p = Path(cache) if cache else be.CACHE
    store_path = Path(store) if store else be.default_store(cache_p, log)
    load0 = os.getloadavg()[0]
    log(f"device {dev}" + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else
                           f" ({torch.get_num_threads()} threads; no GPU: sizes scaled down)")
        + f"; load average {load0:.2f}")
    if load0 > 0.5 and dev.type == "cpu":
        log(f"  note: load average {load0:.2f} before the run: other processes compete for the CPUs")

    res: dict[str, Any] = {"command": "python -m benchmarks" + (" --quick" if quick else ""), "device": str(dev),
                           "store": str(store_path), "settings": asdict(st), "load_average_start": load0,
                           "threads": torch.get_num_threads()}
    # 1. disk first, before anything maps the store's pages
    with open_store(store_path) as s:
        log("disk -> host ...")
        res["disk"] = disk_stage(s)
    res["link"] = link_stage(dev, st.link_sizes) if dev.type == "cuda" else None

    with open_store(store_path) as s:
        adapter = be.load_adapter(model, dev, int(s.vocab_size or 50257), be.resolve_dtype(None, dev),
                                  n_positions=st.n_positions)
        res["model"] = be.describe_model(adapter.module)
        res["store_tokens"] = len(s)
        log(f"store {store_path}: {len(s):,} tokens ({s.dtype}); model {model or 'random'}: {res['model']}")
        L = st.chunk_size
        if adapter.max_positions is not None and L > adapter.max_positions:
            L = st.chunk_size = adapter.max_positions
        O = L // 2
        # 2. model alone, end to end, and the batch-1 / HF-guide baselines (one interleaved measurement)
        log(f"model alone, end to end, batch-1 loop, HF guide: first {min(st.tokens, len(s)):,} tokens, chunk {L} ...")
        m = be.measure(adapter, s, chunk_size=L, overlap=O, tokens=st.tokens, batch=st.batch, repeat=st.repeat,
                       device=dev, log=log)
        res["eval"] = m
        B = m["batch"]
        if st.batch != "auto":  # the bound a user's batch_size="auto" measures within, for the record (no run)
            res["auto_batch"] = evaluator_auto_batch(adapter, dev, L)
        # 3. loader alone and its baselines
        log(f"loader alone (chunk {L}, {B} windows/batch, whole store) and loader baselines ...")
        res["loader"] = loader_stage(s, L, B, dev, st.loader_repeat)
        res["loader_baselines"] = loader_baselines(s, L, B, dev, st.loader_repeat, st.workers)
        # 4. sweeps
        log(f"sweeps ({st.sweep_tokens:,} tokens per point) ...")
        res["sweeps"] = sweeps(adapter, s, st, dev, log)
        itemsize = res["itemsize"] = s.dtype.itemsize
    # 5. memory scaling
    if memory and st.memory_sizes:
        log(f"memory scaling (fresh process per size; {', '.join(f'{n:,}' for n in st.memory_sizes)} tokens) ...")
        res["memory"] = memory_scaling(st.memory_sizes, dev, cache_p, st.memory_chunk, st.memory_batch, log,
                                       threads=torch.get_num_threads() if threads else None)

    ev = m["results"]
    stages = {
        "disk_cold": (res["disk"]["cold"] or {}).get("tok_per_s"),
        "disk_warm": (res["disk"]["warm"] or {}).get("tok_per_s"),
        "link": link_rate_for(res["link"], B * (L + 1) * itemsize, itemsize),
        "loader": res["loader"]["tok_per_s"],
        "compute": ev["compute"]["tok_per_s"],
        "end_to_end": ev["ours"]["tok_per_s"],
    }
    res["stages"] = stages
    res["verdict"] = verdict({"disk": stages["disk_cold"], "link": stages["link"], "loader": stages["loader"],
                              "compute": stages["compute"]}, stages["end_to_end"])
    if res["verdict"]["bound_by"] == "compute" and "ours/compute" in m.get("paired_ratios", {}):
        # end to end and compute ran back to back in every round: the paired ratio cancels load drift
        res["verdict"]["overlap_efficiency_paired"] = m["paired_ratios"]["ours/compute"]
    res["baseline_ratios_paired"] = dict(m.get("paired_ratios", {}))
    res["baseline_ratios"] = {
        "ours/quickref": m["ratios"].get("ours/quickref"),
        "ours_overlap/guide": m["ratios"].get("ours_overlap/guide"),
        **{f"loader/{k}": v.get("ours_over_this") for k, v in (res["loader_baselines"] or {}).items()
           if isinstance(v, dict) and k != "ours"},
    }
    res["seconds"] = time.perf_counter() - t_start
    res["load_average_end"] = os.getloadavg()[0]
    if out:
        outp = Path(out)
        outp.mkdir(parents=True, exist_ok=True)
        if make_charts:
            res["charts"] = [str(p) for p in charts(res, outp)]
        res["json"] = str(write_json(str(outp), "suite.json", res))
    return res


# ---- printing --------------------------------------------------------------------------------------
def report(res: dict[str, Any], print_fn: Callable[[str], None] = print) -> None:
    st, ev, S = res["settings"], res["eval"], res["stages"]
    dev = res["device"]
    item = "token ids"
    bnote = "" if st["batch"] == "auto" else f" (set by the suite; the evaluator's auto would measure within {res.get('auto_batch', '?')})"
    print_fn(f"\n== stages ({res['model']}; {dev}; chunk {ev['chunk_size']}, batch {ev['batch']}{bnote}) ==")
    d = res["disk"]
    rows = []
    if d["cold"]:
        rows.append(["disk -> host, cold", "shard files, evicted (fadvise), sequential read", fmt_rate(S["disk_cold"]),
                     f"{d['cold']['GB_per_s']:.2f} GB/s"])
        rows.append(["disk -> host, warm", "page cache, sequential read (best of 3)", fmt_rate(S["disk_warm"]),
                     f"{d['warm']['GB_per_s']:.2f} GB/s"])
    else:
        rows.append(["disk -> host", d.get("note", "n/a"), "n/a", ""])
    if res["link"]:
        for r in res["link"]:
            rows.append([f"host -> device {fmt_bytes(r['bytes'])}", "pinned / pageable copy_",
                         fmt_rate(r["pinned_GB_per_s"] * 1e9 / res["itemsize"]), f"{r['pinned_GB_per_s']:.1f} / {r['pageable_GB_per_s']:.1f} GB/s"])
    else:
        rows.append(["host -> device", "n/a (no device)", "n/a", ""])
    lo = res["loader"]
    rows.append(["loader alone", "WindowLoader -> device, scored tokens (whole store)", fmt_rate(lo["tok_per_s"]), ""])
    rows.append(["model alone", "device-resident synthetic input, same shapes + sliced loss", fmt_rate(S["compute"]), ""])
    rows.append(["end to end", "StreamingEvaluator.evaluate_streaming(store)", fmt_rate(S["end_to_end"]), ""])
    print_fn(table(rows, ["stage", "what", "tok/s", "bandwidth"]))
    if d.get("note"):
        print_fn(f"  disk: {d['note']}")
    v = res["verdict"]
    print_fn(f"\nVERDICT: bound by {STAGE_NAMES[v['bound_by']]} ({fmt_rate(v['bound_tok_per_s'])} tok/s); "
             f"end to end {fmt_rate(v['end_to_end_tok_per_s'])} tok/s; overlap efficiency = end to end / "
             f"min(disk, link, loader, compute) = {v['overlap_efficiency']:.3f}"
             + (f" (per-round paired median {v['overlap_efficiency_paired']:.3f})" if "overlap_efficiency_paired" in v else ""))
    if v["headroom"]:
        print_fn("  headroom of the other stages: " + ", ".join(f"{STAGE_NAMES[k]} {x:,.1f}x" for k, x in v["headroom"].items()))
    if S["link"] is None:
        print_fn("  (no device: the link is not a stage here)")

    print_fn(f"\n== ours vs the evaluation loops people write (first {ev['tokens']:,} tokens; best of {ev['repeat']}) ==")
    be.print_results(ev, print_fn)
    be.print_ratios(ev, print_fn)

    lb = res.get("loader_baselines") or {}
    if "ours" in lb:
        print_fn(f"\n== ours (WindowLoader) vs loaders people use (whole store, warm page cache, best of {st['loader_repeat']}) ==")
        rows = [[v["label"], fmt_rate(v["tok_per_s"]), f"{v['ours_over_this']:.2f}x"] for v in lb.values()]
        print_fn(table(rows, ["loader", "tok/s delivered", "ours/this"]))
        print_fn("  the memmap row is the limit (raw store-dtype windows in a host buffer); the others deliver int64 inputs"
                 + (" on the GPU" if dev.startswith("cuda") else " (no device: pinning does not apply)"))
    elif lb.get("note"):
        print_fn(f"\nloader baselines: {lb['note']}")

    sw = res["sweeps"]
    mem_kind = "peak device mem" if dev.startswith("cuda") else "peak RSS above start"
    print_fn(f"\n== sweeps ({sw['tokens']:,} tokens per point, best of {st['sweep_repeat']}"
             f"{'' if dev.startswith('cuda') else '; CPU: chunk sizes scaled down from 2048..16384'}) ==")
    rows = [[p["chunk_size"], p["batch"], fmt_rate(p["tok_per_s"]), fmt_bytes(p["peak_bytes"])] for p in sw["chunk"] + sw["batch"]]
    print_fn(table(rows, ["chunk", "batch", "scored tok/s", mem_kind]))
    if sw["skipped_chunks"]:
        print_fn(f"  skipped chunk sizes beyond the model's context: {sw['skipped_chunks']}")

    mem = res.get("memory")
    if mem:
        print_fn(f"\n== memory scaling ({mem['model']}, chunk {mem['chunk_size']}, batch {mem['batch']}; fresh process per size) ==")
        rows = [[f"{r['tokens']:,}", f"{r['scored']:,}", f"{r['median_rss_kb'] / 1024:,.0f} MB", f"{r['peak_rss_kb'] / 1024:,.0f} MB",
                 fmt_kb(r["rss_growth_kb"]), fmt_bytes(r["device_peak_bytes"]), fmt_rate(r["tok_per_s"])] for r in mem["rows"]]
        print_fn(table(rows, ["tokens", "scored", "RSS median in eval", "peak RSS (VmHWM)", "peak above start",
                              "peak device", "tok/s"]))
        f = mem["flatness"]
        print_fn(f"  from {f['tokens_first']:,} to {f['tokens_last']:,} tokens: RSS median {f['median_delta_mb']:+,.0f} MB, "
                 f"peak {f['peak_delta_mb']:+,.0f} MB; the {f['tokens_last']:,} tokens as one int64 tensor in RAM would "
                 f"take {f['int64_mb']:,.0f} MB: {'FLAT' if f['flat'] else 'NOT flat'} (median within "
                 f"max(32 MB, 10%))" + (f"; peak device {f['device_delta_mb']:+,.1f} MB" if f.get("device_delta_mb") is not None else ""))
    print_fn(f"\nload average {res['load_average_start']:.2f} at start, {res['load_average_end']:.2f} at end; "
             f"suite took {res['seconds']:.0f} s")
    if res.get("json"):
        print_fn(f"wrote {res['json']}" + (f" and {', '.join(Path(c).name for c in res.get('charts', []))}" if res.get("charts") else ""))


def build_parser() -> argparse.ArgumentParser:
    """The suite's options (also the README's options table, tests/test_readme.py)."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="a token store (default: the embedded stdlib corpus, built once and cached)")
    ap.add_argument("--model", default="random",
                    help="'random' (default: GPT-2-small-shaped random weights; scaled down on CPU), 'default' "
                         "(the bundled model), a transformers folder or hub id, or package.module:factory")
    ap.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    ap.add_argument("--out", default="bench-out/suite", help="folder for suite.json and the charts (default bench-out/suite)")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (under ~2 minutes on a 2-core CPU)")
    ap.add_argument("--tokens", type=int, help="tokens of the model/end-to-end/baseline runs")
    ap.add_argument("--chunk-size", type=int, help="main chunk size")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory-scaling runs")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--cache", help="folder for the default and synthetic stores (default bench-out/stores)")
    return ap


@one_line_errors("python -m benchmarks")
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--memory-child"]:
        print(json.dumps(memory_child(json.loads(argv[1]))))
        return 0
    ap = build_parser()
    a = ap.parse_args(argv)
    from evaluator.config import resolve_device

    st = Settings.for_device(resolve_device(a.device), a.quick)
    if a.tokens:
        st.tokens = st.sweep_tokens = a.tokens
    if a.chunk_size:
        st.chunk_size = a.chunk_size
    res = run_suite(a.store, None if a.model == "random" else a.model, a.device, a.out, a.quick, st, a.cache,
                    memory=not a.no_memory, threads=a.threads)
    report(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
