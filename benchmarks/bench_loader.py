"""Window loader throughput: ``WindowLoader`` vs the memmap limit vs the loaders people use today.

    python -m benchmarks.bench_loader [--store S] [--tokens N] [--chunk-size 8192] [--batch-windows 16]
                                      [--workers 0 1 2] [--repeat 3] [--out DIR]

Over the same sequential windows of one store (stream mode), in one run:
- (a) limit:     ``np.memmap`` slices of each window (``L + 1`` tokens) copied into a reused host
                 buffer, batch by batch; no widening, no device: what reading the windows costs at least;
                 (a') the same copies widened into a reused int64 buffer: the least it costs to produce
                 int64 windows on the host (4x the bytes written), for reference;
- (b) nanoGPT:   ``get_batch`` as in nanoGPT's train.py (memmap recreated per batch,
                 ``astype(np.int64)``, ``torch.from_numpy``, ``torch.stack``; on CUDA ``pin_memory()``
                 then ``to(device, non_blocking=True)``), but over the sequential windows, not random ones;
- (c) DataLoader: ``torch.utils.data.DataLoader`` over a memmap ``Dataset`` returning (x, y) int64
                 windows, ``pin_memory`` on CUDA, for each ``--workers`` value;
- (d) ours, slot fill: the GPU path's host side alone (the reader's span read into a reused
                 uint16/uint32 slot, id check, metadata, kernel hints; no device): judged against (a);
- (d) ours:      ``WindowLoader`` (overlap 0 and overlap 512; ``release_behind=False`` so the page
                 cache stays warm for every row; the last row repeats overlap 0 with ``release_behind=True``,
                 which drops pages behind the cursor, as a long run over a larger-than-RAM store would:
                 its first pass starts warm, later passes read what it evicted from disk; run it last).
(b)-(d) deliver int64 inputs and targets [B, L] (ours also a score mask); (a) delivers raw windows
in the store's dtype, (a') int64 windows [B, L+1]. Goals: the slot fill >= 0.8x (a) (the GPU path
sends the store dtype and widens on the device); on a CPU, delivered int64 windows >= 0.8x (a').

Page cache: warm for all rows (the store is read once before any timing). Timing: each variant runs
``--repeat`` full passes and keeps the best; a pass is timed from its first delivered batch to its
last (start-up, e.g. DataLoader workers, excluded) and counts the input tokens (``B x L`` per batch)
delivered after the first batch. On CUDA the clock stops after ``torch.cuda.synchronize()``, so the
figure is tokens delivered *to the device*. Ratios are against (a) over the same windows.
Without ``--store`` a synthetic uint16 store of ``--tokens`` random ids (default 256Mi) is built in a
temporary folder (one shard, so nanoGPT-style readers see one file) and deleted afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ._util import machine, table, write_json


def build_synthetic(root: Path, tokens: int, vocab: int = 50257, doc_tokens: int = 1 << 20) -> Path:
    from streamdata.writer import StoreWriter

    w = StoreWriter(root, dtype="uint16", vocab_size=vocab, shard_tokens=tokens, settings={"bench": tokens},
                    overwrite=True)
    rng = np.random.default_rng(0)
    block = 1 << 24
    for pos in range(0, tokens, block):
        n = min(block, tokens - pos)
        flat = rng.integers(0, vocab, size=n, dtype=np.uint16)
        lens = np.full(-(-n // doc_tokens), doc_tokens, np.int64)
        lens[-1] = n - doc_tokens * (len(lens) - 1)
        w.add_documents(flat, lens, 4 * lens, lens)
    w.commit(tokenizer={"name": "synthetic", "sha256": "0" * 64, "vocab_size": vocab}, special_tokens={},
             source={"kind": "synthetic", "tokens": tokens})
    return root


class Shards:
    """Raw memmaps of an npy store's shard files, as a baseline reader sees them."""

    def __init__(self, store):
        self.starts = np.array([s.start for s in store.manifest.shards] + [len(store)], np.int64)
        self.files = [os.path.join(store.path, s.file) for s in store.manifest.shards]
        self.dtype = store.dtype
        self.maps = [np.memmap(f, dtype=self.dtype, mode="r") if s.tokens else None
                     for f, s in zip(self.files, store.manifest.shards)]

    def locate(self, start: int, stop: int):
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        return k, start - self.starts[k], stop <= self.starts[k + 1]

    def copy(self, start: int, stop: int, out: np.ndarray, maps=None) -> None:
        copy_span(self.starts, maps or self.maps, start, stop, out)


def copy_span(starts: np.ndarray, maps, start: int, stop: int, out: np.ndarray) -> None:
    """Copy global tokens [start, stop) of shards beginning at ``starts`` (memmaps ``maps``) into ``out``."""
    k = int(np.searchsorted(starts, start, side="right")) - 1
    if stop <= starts[k + 1]:
        lo = start - starts[k]
        out[: stop - start] = maps[k][lo : lo + stop - start]
        return
    pos = start  # a window crossing a shard boundary: piecewise
    while pos < stop:
        k = int(np.searchsorted(starts, pos, side="right")) - 1
        hi = min(stop, int(starts[k + 1]))
        if hi > pos:
            out[pos - start : hi - start] = maps[k][pos - starts[k] : hi - starts[k]]
        pos = max(pos, hi)


def warm_page_cache(shards: Shards) -> float:
    t0 = time.perf_counter()
    buf = bytearray(1 << 24)
    for f in shards.files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def timed_pass(batches, tokens_per_batch, device) -> tuple[float, int]:
    """Seconds from the first delivered batch to the last, and input tokens delivered after the first."""
    it = iter(batches)
    first = next(it)
    del first
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    for b in it:
        tokens += tokens_per_batch(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, tokens


def batches_of(plan, B: int):
    """(starts, lengths) of each batch of ``B`` consecutive windows of ``plan``."""
    starts, lengths = plan.start, plan.length
    for i in range(0, len(plan), B):
        yield starts[i : i + B], lengths[i : i + B]


def memmap_limit(shards: Shards, plan, B: int, L: int, dtype=None) -> tuple[float, int]:
    """(a) the limit: memmap slices of each window (``L + 1`` tokens) copied into a reused host buffer.

    Shard and local offset of every window are computed up front (vectorised), so the loop is one
    slice copy per window. ``dtype`` (default: the store's) is the buffer's dtype; np.int64 gives
    (a'), the least it costs to produce int64 windows on the host. Returns ``timed_pass``'s pair.
    """
    buf = np.empty((B, L + 1), dtype=dtype or shards.dtype)
    k = np.searchsorted(shards.starts, plan.start, side="right") - 1
    local = (plan.start - shards.starts[k]).tolist()
    inside = (plan.stop <= shards.starts[k + 1]).tolist()
    k, stops, starts = k.tolist(), plan.stop.tolist(), plan.start.tolist()
    maps = shards.maps

    def gen():
        for i in range(0, len(plan), B):
            for r in range(min(B, len(plan) - i)):
                w = i + r
                n = stops[w] - starts[w]
                if inside[w]:
                    buf[r, :n] = maps[k[w]][local[w] : local[w] + n]
                else:
                    shards.copy(starts[w], stops[w], buf[r])
            yield r * L + L

    return timed_pass(gen(), lambda n: n, torch.device("cpu"))


def nanogpt_get_batch(shards: Shards, plan, B: int, L: int, total: int, device: torch.device) -> tuple[float, int]:
    """(b) nanoGPT's ``get_batch`` over the sequential windows of ``plan`` (``total``: store tokens)."""
    cuda = device.type == "cuda"

    def gen():
        for st, _ in batches_of(plan, B):
            # nanoGPT recreates the memmap every batch to avoid a memory leak
            maps = [np.memmap(f, dtype=shards.dtype, mode="r") for f in shards.files]
            ws = []
            for s in st.tolist():
                w = np.empty(L + 1, dtype=shards.dtype)
                shards.copy(s, min(s + L + 1, total), w, maps)
                ws.append(w)
            x = torch.stack([torch.from_numpy(w[:L].astype(np.int64)) for w in ws])
            y = torch.stack([torch.from_numpy(w[1 : L + 1].astype(np.int64)) for w in ws])
            if cuda:
                x = x.pin_memory().to(device, non_blocking=True)
                y = y.pin_memory().to(device, non_blocking=True)
            yield x

    return timed_pass(gen(), lambda x: x.numel(), device)


class WindowDataset(torch.utils.data.Dataset):
    """(c) the usual map-style Dataset: one memmap window per item, (x, y) int64."""

    def __init__(self, shards: Shards, plan, L: int, total: int):
        # Only file names and offsets: a worker started by spawn pickles the Dataset, and a pickled
        # memmap is a full in-memory copy of the file.
        self.files, self.dtype, self.shard_starts = shards.files, shards.dtype, shards.starts
        self.starts, self.L, self.total = plan.start, L, total
        self.maps = None  # opened lazily in each worker process

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        if self.maps is None:
            self.maps = [np.memmap(f, dtype=self.dtype, mode="r") for f in self.files]
        s, L = int(self.starts[i]), self.L
        w = np.zeros(L + 1, dtype=self.dtype)
        copy_span(self.shard_starts, self.maps, s, min(s + L + 1, self.total), w)
        return torch.from_numpy(w[:L].astype(np.int64)), torch.from_numpy(w[1:].astype(np.int64))


def dataloader_pass(shards: Shards, plan, B: int, L: int, total: int, device: torch.device,
                    workers: int) -> tuple[float, int]:
    """(c) ``torch.utils.data.DataLoader`` over :class:`WindowDataset`; ``pin_memory`` on CUDA (on a
    CPU-only machine pinning does not apply)."""
    cuda = device.type == "cuda"
    dl = torch.utils.data.DataLoader(WindowDataset(shards, plan, L, total), batch_size=B, shuffle=False,
                                     num_workers=workers, pin_memory=cuda, prefetch_factor=4 if workers else None)

    def gen():
        for x, y in dl:
            if cuda:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            yield x

    return timed_pass(gen(), lambda x: x.numel(), device)


def window_loader_pass(store, L: int, O: int, B: int, device: torch.device, release: bool,
                       max_tokens: int | None = None, count: str = "inputs") -> tuple[float, int]:
    """(d) ours: ``WindowLoader``; counts ``inputs.numel()`` per batch (``count="scored"``: targets scored)."""
    from streamdata.loader import WindowLoader

    ld = WindowLoader(store, chunk_size=L, overlap=O, batch_windows=B, device=device, release_behind=release,
                      max_tokens=max_tokens)
    per = (lambda b: b.inputs.numel()) if count == "inputs" else (lambda b: b.num_scored)
    with ld:
        return timed_pass(ld, per, device)


def slot_fill_pass(store, L: int, O: int, B: int) -> tuple[float, int]:
    """(d) host side of ours' CUDA path, alone: for every batch, the reader's exact host work
    (``fill_host``: the span read into a reused uint16/uint32 slot, ids checked, metadata packed;
    the reader's own loop with its prefetch/release hints) in this thread, with no device and no
    copy: the rate at which the GPU path's reader can feed the link. Times the whole pass and
    counts every batch's input tokens (no thread start-up to exclude)."""
    from streamdata.loader import WindowLoader

    with WindowLoader(store, chunk_size=L, overlap=O, batch_windows=B, device="cpu", release_behind=False) as ld:
        t0 = time.perf_counter()
        tokens = ld.host_pass()
        return time.perf_counter() - t0, tokens


def best_pass(fn, repeat: int) -> tuple[float, int]:
    """The fastest of ``repeat`` passes of ``fn() -> (seconds, tokens)`` (passes with tokens only)."""
    best, toks = float("inf"), 0
    for _ in range(repeat):
        s, t = fn()
        if t and s < best:
            best, toks = s, t
    return best, toks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="an existing npy store (default: build a synthetic one)")
    ap.add_argument("--tokens", type=int, default=256 << 20, help="tokens of the synthetic store (default 256Mi)")
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--overlap", type=int, default=512, help="overlap of the second WindowLoader row")
    ap.add_argument("--batch-windows", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="*", default=[0, 1, 2], help="DataLoader num_workers values")
    ap.add_argument("--repeat", type=int, default=3, help="passes per variant; the best counts (default 3)")
    ap.add_argument("--out", help="folder for a JSON result")
    a = ap.parse_args(argv)

    from streamdata import open_store
    from streamdata.windows import plan_windows

    tmp = None
    try:
        if a.store:
            store_path = Path(a.store)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="bench-loader-"))
            t0 = time.perf_counter()
            store_path = build_synthetic(tmp / "store", a.tokens)
            print(f"built a synthetic store of {a.tokens:,} uint16 tokens in {time.perf_counter() - t0:.1f} s")
        store = open_store(store_path)
        if store.manifest.format != "npy":
            raise SystemExit(f"--store {store_path} has format {store.manifest.format!r}: the memmap baselines need an npy store")
        cuda = torch.cuda.is_available()
        device = torch.device("cuda" if cuda else "cpu")
        L, B = a.chunk_size, a.batch_windows
        shards = Shards(store)
        warm_s = warm_page_cache(shards)
        print(f"{len(store):,} tokens ({store.dtype}), {len(store.manifest.shards)} shard(s); page cache warmed by "
              f"reading the store once ({len(store) * store.dtype.itemsize / warm_s / 1e9:.2f} GB/s); chunk {L}, "
              f"{B} windows per batch, device {device}")

        plans = {O: plan_windows(store.doc_offsets, L, O, "stream") for O in (0, a.overlap)}
        rows, results = [], []

        def record(name, O, fn):
            best, toks = best_pass(fn, a.repeat)
            rate = toks / best if toks else float("nan")
            results.append({"variant": name, "overlap": O, "seconds": best, "tokens": toks, "tok_per_s": rate})
            print(f"  {name:<40} {rate / 1e6:10.1f} M tok/s", flush=True)

        n = len(store)
        memmap_lim = lambda plan, dtype=None: memmap_limit(shards, plan, B, L, dtype)  # noqa: E731
        nanogpt = lambda plan: nanogpt_get_batch(shards, plan, B, L, n, device)  # noqa: E731
        dataloader = lambda plan, k: dataloader_pass(shards, plan, B, L, n, device, k)  # noqa: E731
        ours = lambda O, release: window_loader_pass(store, L, O, B, device, release)  # noqa: E731

        print("best of", a.repeat, "passes:")
        record("(a) memmap -> buffer (limit)", 0, lambda: memmap_lim(plans[0]))
        record("(a') memmap -> int64 buffer", 0, lambda: memmap_lim(plans[0], np.int64))
        record("(b) nanoGPT get_batch", 0, lambda: nanogpt(plans[0]))
        for k in a.workers:
            record(f"(c) DataLoader num_workers={k}", 0, lambda k=k: dataloader(plans[0], k))
        record("(d) WindowLoader", 0, lambda: ours(0, False))
        record("(d) slot fill (host side of the GPU path)", 0, lambda: slot_fill_pass(store, L, 0, B))
        record("(a) memmap -> buffer (limit)", a.overlap, lambda: memmap_lim(plans[a.overlap]))
        record("(a') memmap -> int64 buffer", a.overlap, lambda: memmap_lim(plans[a.overlap], np.int64))
        record("(d) WindowLoader", a.overlap, lambda: ours(a.overlap, False))
        record("(d) slot fill (host side of the GPU path)", a.overlap, lambda: slot_fill_pass(store, L, a.overlap, B))
        record("(d) WindowLoader, release_behind=True", 0, lambda: ours(0, True))

        limit = {r["overlap"]: r["tok_per_s"] for r in results if r["variant"].startswith("(a) ")}
        wide = {r["overlap"]: r["tok_per_s"] for r in results if r["variant"].startswith("(a') ")}
        for r in results:
            r["vs_limit"] = r["tok_per_s"] / limit[r["overlap"]]
            r["vs_int64_limit"] = r["tok_per_s"] / wide[r["overlap"]] if r["overlap"] in wide else None
            rows.append([r["variant"], r["overlap"], r["tok_per_s"] / 1e6, r["vs_limit"],
                         r["vs_int64_limit"] if r["vs_int64_limit"] is not None else "n/a"])
        unit = "M tok/s to " + ("device" if cuda else "host")
        print()
        print(table(rows, ["variant", "overlap", unit, "x limit (a)", "x int64 (a')"]))
        goals = []
        for O in sorted(limit):
            fill = next((r for r in results if r["overlap"] == O and r["variant"].startswith("(d) slot fill")), None)
            wl = next((r for r in results if r["overlap"] == O and r["variant"] == "(d) WindowLoader"), None)
            if fill:
                goals.append(f"overlap {O}: slot fill / (a) = {fill['vs_limit']:.2f} (goal >= 0.8: "
                             f"{'met' if fill['vs_limit'] >= 0.8 else 'NOT met'})")
            if wl and not cuda and wl["vs_int64_limit"] is not None:
                goals.append(f"overlap {O}: CPU int64 windows / (a') = {wl['vs_int64_limit']:.2f} (goal >= 0.8: "
                             f"{'met' if wl['vs_int64_limit'] >= 0.8 else 'NOT met'})")
        print("\n".join(goals))
        print(f"\nchunk {L}, {B} windows/batch, {len(store):,}-token store, warm page cache, device {device}; "
              f"(a) delivers raw {store.dtype} windows on the host, the others int64 inputs+targets"
              + (" on the GPU" if cuda else ""))
        path = write_json(a.out, "bench_loader.json", {
            "command": "python -m benchmarks.bench_loader", "args": vars(a), "store_tokens": len(store),
            "device": str(device), "page_cache": "warm", "results": results,
        })
        if path:
            print(f"wrote {path}")
        store.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
