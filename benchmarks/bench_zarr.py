"""zarr vs npy read throughput: sequential window reads through ``TokenStore.read_into``.

    python -m benchmarks.bench_zarr [--tokens N] [--window 8192] [--block TOKENS] [--repeat 3] [--out DIR]

The same random uint16 tokens (``--tokens``, default 64Mi) are written once as an npy store and as
zarr stores (uncompressed and zstd, default layout: 1Mi-id inner chunks, 16 per shard). Each is
read front to back in windows of ``window + 1`` ids advancing by ``window`` (what the loader reads
for chunk_size = window, overlap 0) into one reused buffer; page cache warm (a pass first), so this
measures the per-window cost of each backend, not the disk. In the same run, for contrast:
- ``zarr naive``: one zarr ``__getitem__`` per window (the pattern the block cache replaces),
  timed over the first ``--naive-windows`` windows only (it is ~100x slower).
- ``zarr block``: raw zarr reads of ``--block``-sized aligned slices (the cache's refill cost alone).
Local uncompressed zarr reads take the direct path (shard files memory-mapped, see
streamdata/backends/zarr.py); the block-cache path is also timed on the same store (``direct=False``),
and is what compressed and remote stores use. Throughput in tokens/s (best of ``--repeat`` passes,
backends interleaved); ratio = zarr / npy (goal >= 0.5x uncompressed).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ._util import best_of, machine, one_line_errors, table, write_json


def _write_npy(root: Path, tokens: np.ndarray, doc_lens: np.ndarray) -> None:
    from streamdata.writer import StoreWriter

    w = StoreWriter(root, dtype="uint16", vocab_size=1 << 16, shard_tokens=1 << 24,
                    settings={"bench": "zarr", "tokens": int(tokens.size)})
    if w.finished is not None:  # --dir reused: the same data is already there
        return
    w.add_documents(tokens, doc_lens, doc_lens * 4, doc_lens)
    w.commit(tokenizer={"name": "bench", "sha256": None, "vocab_size": 1 << 16, "special_ids": {}},
             special_tokens={"eos": None, "bos": None}, source={"kind": "bench"})


def _windows(store, window: int, buf: np.ndarray, limit: int | None = None) -> int:
    n = len(store)
    count = 0
    for s in range(0, n - 1, window):
        e = min(n, s + window + 1)
        store.read_into(s, e, buf[: e - s])
        count += 1
        if limit is not None and count >= limit:
            return s + window
    return n


@one_line_errors("python -m benchmarks.bench_zarr")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64 << 20, help="tokens in the test store (default 64Mi)")
    ap.add_argument("--window", type=int, default=8192, help="window (chunk) size in tokens (default 8192)")
    ap.add_argument("--block", type=int, default=None, help="reader cache block in tokens (default: the backend's)")
    ap.add_argument("--naive-windows", type=int, default=1000, help="windows timed for the naive zarr read")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="folder for the test stores (default: a temp folder, deleted after)")
    ap.add_argument("--out", help="folder for a JSON result")
    a = ap.parse_args(argv)

    import zarr

    from streamdata import open_store
    from streamdata.backends.zarr import ZarrTokenStore, write_zarr_store

    tmp = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="bench-zarr-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 50257, a.tokens, dtype=np.uint16)
        lens = rng.integers(1, 4096, a.tokens // 1000 + 2).astype(np.int64)
        lens = lens[: int(np.searchsorted(np.cumsum(lens), a.tokens))]
        lens = np.append(lens, a.tokens - lens.sum())
        t0 = time.perf_counter()
        _write_npy(tmp / "npy", tokens, lens)
        t_npy = time.perf_counter() - t0
        pack = {}
        with open_store(tmp / "npy") as src:
            for comp in ("none", "zstd"):
                t0 = time.perf_counter()
                write_zarr_store(src, tmp / f"zarr-{comp}", compression=comp)
                pack[comp] = time.perf_counter() - t0
        del tokens

        buf = np.empty(a.window + 1, dtype=np.uint16)
        stores = {
            "npy": open_store(tmp / "npy"),
            "zarr none": ZarrTokenStore(tmp / "zarr-none", block_tokens=a.block),  # direct (mmap) path
            "zarr none, block cache": ZarrTokenStore(tmp / "zarr-none", block_tokens=a.block, direct=False),
            "zarr zstd": ZarrTokenStore(tmp / "zarr-zstd", block_tokens=a.block),  # block cache
        }
        rows, results = [], {name: 0.0 for name in stores}
        for st in stores.values():
            _windows(st, a.window, buf)  # warm the page cache
        # Interleave the backends in every repeat so a noisy neighbour hits all of them alike.
        for _ in range(a.repeat):
            for name, st in stores.items():
                dt, n = best_of(lambda st=st: _windows(st, a.window, buf), 1)
                results[name] = max(results[name], n / dt)
        base = results["npy"]
        for name, tps in results.items():
            path = getattr(stores[name], "read_path", "mmap")
            rows.append((f"{name} read_into [{path}]", tps / 1e6, tps / base, 1e6 * a.window / tps))
        for comp in ("none", "zstd"):
            arr = stores[f"zarr {comp}"].zarr_array
            # the same windows as _windows (the last one shorter), at most --naive-windows of them:
            # a store smaller than naive_windows * window has fewer
            k = min(a.naive_windows, -(-(a.tokens - 1) // a.window))

            def naive(arr=arr, k=k):
                n = 0
                for i in range(k):
                    s = i * a.window
                    e = min(a.tokens, s + a.window + 1)
                    buf[: e - s] = arr[s:e]
                    n += e - s - 1
                return n

            dt, n = best_of(naive, 1)
            results[f"zarr {comp} naive"] = n / dt
            rows.append((f"zarr {comp} naive getitem/window", n / dt / 1e6, n / dt / base, 1e6 * a.window / (n / dt)))
            B = stores[f"zarr {comp}"].block_tokens

            def blocks(arr=arr, B=B):
                total = arr.shape[0]
                for s in range(0, total, B):
                    arr[s : s + B]
                return total

            dt, n = best_of(blocks, a.repeat)
            results[f"zarr {comp} block"] = n / dt
            rows.append((f"zarr {comp} block reads ({B >> 20}Mi)", n / dt / 1e6, n / dt / base, 1e6 * B / (n / dt)))
        for st in stores.values():
            st.close()
        sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in tmp.iterdir()}
        print(f"{a.tokens:,} uint16 tokens, window {a.window} (+1), zarr {zarr.__version__}, "
              f"{machine()['cpus']} CPUs; page cache warm")
        print(f"write: npy {a.tokens / t_npy / 1e6:.0f}M tok/s; zarr pack none {a.tokens / pack['none'] / 1e6:.0f}M tok/s, "
              f"zstd {a.tokens / pack['zstd'] / 1e6:.0f}M tok/s; on disk: "
              + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in sorted(sizes.items())))
        print(table(rows, ["read", "M tok/s", "x npy", "us per window/block"]))
        write_json(a.out, "bench_zarr.json", {"tokens": a.tokens, "window": a.window, "tok_per_s": results,
                                              "disk_bytes": sizes})
    finally:
        if not a.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
