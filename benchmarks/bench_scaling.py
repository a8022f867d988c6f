"""Memory scaling (issue 18): start-up time and peak memory must not grow with the stream's length.

    python -m benchmarks.bench_scaling [--lengths 1e8 1e10 1e11] [--chunk-size 1024] [--batch-windows 64]
                                       [--batches 20] [--documents 1e8] [--part all|loader|eval] [--compare]
                                       [--device D] [--lines 3] [--tmp DIR] [--out DIR]

Loader rows, one per length N: a sparse raw uint16 ``.bin`` of N tokens (2N bytes apparent, no
block on disk: ``truncate``; it reads as zeros), opened with ``open_raw_bin(checksum=False)``, then
``WindowLoader`` (stream mode, chunk ``--chunk-size``, ``--batch-windows`` per batch, CPU, ids
checked against a vocabulary of 66) in a fresh child process per row, so each peak is its own:
- first batch (s): from constructing the loader (planning included) to the first batch in hand;
- peak RSS growth: the child's peak resident set (VmHWM) after the first batch and ``--batches``
  more, minus its resident set once the store is open (imports and the store excluded).
The baseline is the shortest length, measured in the same run: the other rows report their
difference to it. Goals: every first batch within 1 s, RSS growth within 64 MiB of the baseline's.
(The eager plan this replaced held ~32 bytes per window: 10^11 tokens at chunk 1024 took 7.8 GB
and 18.6 s before the first batch.)

Document row: a synthetic index of ``--documents`` documents (lengths 1..8 tokens, cycling), its
offsets a memory-mapped ``.npy`` written in blocks, the tokens a sparse file, as a
``MemoryTokenStore`` over the two memory maps; ``WindowLoader`` in document mode with a BOS
prefix (every document then has a window): seconds to the first batch (goal: within 5 s; the plan
walks the whole index once to count windows) and the RSS growth (the index pages that walk maps
count as resident while mapped: page cache, not heap).

Evaluator rows, one per length N, on the same sparse stores: ``evaluate_streaming_with_metrics``
(what ``streameval run`` calls: per-chunk and per-document detail included) of the WHOLE store
(no ``max_tokens``: that would shrink the plan and hide the length), sliding mode, a tiny model
that declares no vocabulary (so no id scan runs up front), ``--device`` (default: CUDA when
present), one progress line per batch; the child stops the run when its ``--lines``-th progress
line is printed (an exception out of the progress print: the engine's own cleanup runs, as after
any error) and reports:
- first progress line (s): from the evaluate call (plan, spill files, first batch, its forward);
- peak RSS growth: VmHWM at the stop minus the resident set once model and store are loaded;
- CUDA peak: ``torch.cuda.max_memory_allocated`` over the run (with a GPU);
- metric state: the bytes of every tensor the metric sums hold (the device-side state of issue 18:
  before it, 16 bytes per window, ~1.5 GB at 10^11 tokens and chunk 1024, plus per document).
Goals: every first progress line within 5 s; peak RSS growth, CUDA peak and metric state equal
across lengths (RSS within 64 MiB). ``--compare``: the evaluator rows run ``compare_streaming`` of
two such models (seeds 0 and 1) instead, the same way: KL statistics per token, six metric columns,
the per-token KL file (sparse, unlinked) that the quantiles read; the same goals.

Files go to ``--tmp`` (default: the system temporary folder) and are removed afterwards; they
need no disk blocks, except the document index (8 bytes per document: 0.8 GB for 10^8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from streamdata.errors import ConfigError

from ._util import fmt_bytes, one_line_errors, table, write_json

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20

# Shared by both child scripts: memory readings of the child itself (kB, from /proc/self/status),
# and reset_peak(), which restarts VmHWM at the current resident set and returns that baseline.
_MEMORY = r"""
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
    except OSError:
        pass
    return kb("VmRSS")
"""

# One row in a fresh process. Prints one JSON line. argv: kind, path, N or D, chunk, batch, batches.
_CHILD = r"""
import json, sys, time
import numpy as np

kind, path, n, L, B, more = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
import torch  # noqa: F401  (imported before the baseline: its ~200 MB are not the loader's)
import streamdata
from streamdata.backends.memory import MemoryTokenStore
from streamdata.loader import WindowLoader

t_open = time.perf_counter()
if kind == "stream":
    store = streamdata.open_raw_bin(path, dtype="uint16", checksum=False)
    kw = dict(doc_mode="stream")
else:
    tokens = np.memmap(path + ".tok", dtype=np.uint16, mode="r")
    store = MemoryTokenStore(tokens, doc_offsets=np.load(path + ".off.npy", mmap_mode="r"), checksum=False)
    kw = dict(doc_mode="document", prepend_bos_id=1)
open_s = time.perf_counter() - t_open
base = reset_peak()
t0 = time.perf_counter()
ld = WindowLoader(store, chunk_size=L, batch_windows=B, device="cpu", vocab_size=66, **kw)
it = iter(ld)
first = next(it)
first_s = time.perf_counter() - t0
got = 1
for _ in range(more):
    try:
        next(it)
        got += 1
    except StopIteration:
        break
it.close()
out = {"kind": kind, "n": n, "open_s": open_s, "first_batch_s": first_s, "batches_read": got,
       "batches": len(ld), "windows": ld.full_plan_windows, "scored": ld.num_scored,
       "first_inputs": list(first.inputs.shape), "rss_growth": (kb("VmHWM") - base) * 1024,
       "tokens": len(store)}
ld.close()
store.close()
print(json.dumps(out))
"""


def _child(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", _MEMORY + _CHILD, *map(str, args)], capture_output=True, text=True, env=env,
                       timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child {args[:3]} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def sparse_bin(path: Path, tokens: int) -> None:
    """A uint16 file of ``tokens`` zeros that takes no disk blocks (a hole)."""
    with open(path, "wb") as f:
        f.truncate(2 * tokens)


def synthetic_index(stem: Path, documents: int, step: int = 1 << 22) -> int:
    """Offsets of ``documents`` documents of 1..8 tokens (cycling) as ``stem.off.npy`` (written in
    blocks of ``step``: this process's memory stays small) and a sparse token file ``stem.tok``.
    Returns the token count."""
    import numpy as np

    off = np.lib.format.open_memmap(str(stem) + ".off.npy", mode="w+", dtype=np.int64, shape=(documents + 1,))
    off[0] = 0
    cycle = np.arange(1, 9, dtype=np.int64)
    for d0 in range(0, documents, step):
        d1 = min(d0 + step, documents)
        lens = cycle[np.arange(d0, d1) % 8]
        np.cumsum(lens, out=off[d0 + 1 : d1 + 1])
        off[d0 + 1 : d1 + 1] += off[d0]
    n = int(off[-1])
    off.flush()
    del off
    with open(str(stem) + ".tok", "wb") as f:
        f.truncate(2 * n)
    return n


def loader_rows(lengths: list[int], L: int, B: int, batches: int, tmp: Path, log=print) -> list[dict[str, Any]]:
    rows = []
    for n in lengths:
        path = tmp / f"sparse-{n}.bin"
        sparse_bin(path, n)
        try:
            r = _child(["stream", path, n, L, B, batches])
        finally:
            path.unlink(missing_ok=True)
        rows.append(r)
        log(f"  {n:.0e} tokens: first batch {r['first_batch_s']:.3f} s, peak RSS growth {fmt_bytes(r['rss_growth'])}")
    base = rows[0]
    for r in rows:
        r["first_batch_vs_base_s"] = r["first_batch_s"] - base["first_batch_s"]
        r["rss_growth_vs_base"] = r["rss_growth"] - base["rss_growth"]
    return rows


def document_row(documents: int, L: int, B: int, batches: int, tmp: Path, log=print) -> dict[str, Any]:
    stem = tmp / f"index-{documents}"
    try:
        n = synthetic_index(stem, documents)
        r = _child(["document", stem, documents, L, B, batches])
    finally:
        for suffix in (".off.npy", ".tok"):
            Path(str(stem) + suffix).unlink(missing_ok=True)
    r["tokens"] = n
    log(f"  {documents:.0e} documents: first batch {r['first_batch_s']:.3f} s, peak RSS growth {fmt_bytes(r['rss_growth'])}")
    return r


# One evaluator row in a fresh process. Prints one JSON line. argv: path, N, chunk, batch, lines, device.
_EVAL_CHILD = r"""
import contextlib, io, json, sys, time

path, n, L, B, lines, device, kind = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                                      sys.argv[6], sys.argv[7])
import torch
from torch import nn
import streamdata
import evaluator.engine as engine
from evaluator import StreamingEvaluator
from evaluator.metrics import MetricSums

class NoVocabBigram(nn.Module):
    # logits from the current token via a plain parameter table: no vocab_size, no nn.Embedding,
    # so nothing scans the store's ids up front (a sparse store is all zeros)
    def __init__(self, vocab=66, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab))
    def forward(self, x):
        return self.table[x]

made = []
class Recorded(MetricSums):  # the metric state, measured apart from everything else
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        made.append(self)
engine.MetricSums = Recorded

class Stop(Exception):
    pass

out = {"n": n}
dev = torch.device(device)

def at_stop():
    s = made[0]
    out["metric_state_bytes"] = sum(v.numel() * v.element_size() for v in vars(s).values() if isinstance(v, torch.Tensor))
    out["windows"] = s.spill.num_windows
    out["rss_growth"] = (kb("VmHWM") - base) * 1024
    out["cuda_peak"] = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None

class ProgressLines(io.TextIOBase):  # stderr stand-in: times the progress lines, stops after `lines`
    def __init__(self):
        self.times, self.buf = [], ""
    def writable(self):
        return True
    def write(self, text):
        self.buf += text
        *done, self.buf = self.buf.split("\n")
        for line in done:
            if line.startswith("[streameval] chunk"):
                self.times.append(time.perf_counter())
                if len(self.times) == lines:
                    at_stop()
                    raise Stop
        return len(text)

store = streamdata.open_raw_bin(path, dtype="uint16", checksum=False)  # nothing read at open
settings = dict(chunk_size=L, batch_size=B, mode="sliding", device=device, verbose=True, log_interval=B,
                check_tokenizer=False)
if kind == "compare":  # two models on the same windows: KL statistics per token, the per-token KL file
    from evaluator.compare import compare_streaming

    def evaluate(store):
        return compare_streaming(NoVocabBigram(seed=0), NoVocabBigram(seed=1), store, **settings)
else:
    evaluate = StreamingEvaluator(NoVocabBigram(), **settings).evaluate_streaming_with_metrics
sink = ProgressLines()
base = reset_peak()
if dev.type == "cuda":
    torch.cuda.reset_peak_memory_stats(dev)
t0 = time.perf_counter()
try:
    with contextlib.redirect_stderr(sink):
        evaluate(store)
    raise SystemExit(f"the evaluation ended before {lines} progress lines: pass a longer --lengths or fewer --lines")
except Stop:
    pass
store.close()
out["first_line_s"] = sink.times[0] - t0
out["lines_s"] = sink.times[-1] - t0
print(json.dumps(out))
"""


def eval_rows(lengths: list[int], L: int, B: int, lines: int, device: str, tmp: Path, log=print,
              kind: str = "run") -> list[dict[str, Any]]:
    rows = []
    for n in lengths:
        path = tmp / f"sparse-{n}.bin"
        sparse_bin(path, n)
        try:
            env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            # in the system temporary folder of the child: --tmp, so its spill files land there too
            env["TMPDIR"] = str(tmp)
            p = subprocess.run([sys.executable, "-c", _MEMORY + _EVAL_CHILD, str(path), str(n), str(L), str(B), str(lines), device, kind],
                               capture_output=True, text=True, env=env, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"evaluator child for {n:,} tokens failed:\n{p.stderr[-3000:]}")
            r = json.loads(p.stdout.strip().splitlines()[-1])
        finally:
            path.unlink(missing_ok=True)
        rows.append(r)
        cuda = f", CUDA peak {fmt_bytes(r['cuda_peak'])}" if r["cuda_peak"] is not None else ""
        log(f"  {n:.0e} tokens: first progress line {r['first_line_s']:.3f} s, peak RSS growth "
            f"{fmt_bytes(r['rss_growth'])}{cuda}, metric state {fmt_bytes(r['metric_state_bytes'])}")
    return rows


def _count(text: str) -> int:
    v = float(text)
    if v < 1 or v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1 (e.g. 1e10)")
    return int(v)


@one_line_errors("bench_scaling", flags=("chunk_size", "device"))
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_scaling",
                                 description="Loader and evaluator start-up time and peak memory across stream lengths "
                                             "(sparse stores).")
    ap.add_argument("--lengths", type=_count, nargs="+", default=[10**8, 10**10, 10**11],
                    help="stream lengths in tokens, shortest first: the baseline (default: 1e8 1e10 1e11)")
    ap.add_argument("--chunk-size", type=int, default=1024, help="window length (default: 1024)")
    ap.add_argument("--batch-windows", type=int, default=64, help="windows per batch (default: 64)")
    ap.add_argument("--batches", type=int, default=20, help="loader rows: batches read after the first (default: 20)")
    ap.add_argument("--documents", type=_count, default=10**8,
                    help="documents of the document-mode row's synthetic index (default: 1e8; 8 bytes each on disk)")
    ap.add_argument("--part", choices=("all", "loader", "eval"), default="all",
                    help="which rows: the loader's, the evaluator's, or both (default: all)")
    ap.add_argument("--device", default=None,
                    help="evaluator rows: cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    ap.add_argument("--lines", type=int, default=3,
                    help="evaluator rows: progress lines (one per batch) before the run is stopped (default: 3)")
    ap.add_argument("--compare", action="store_true",
                    help="evaluator rows: compare_streaming of two such models (KL statistics, per-token KL file) "
                         "instead of one model's run")
    ap.add_argument("--tmp", help="folder for the sparse files (default: the system temporary folder)")
    ap.add_argument("--out", help="folder for a JSON result")
    a = ap.parse_args(argv)
    if a.lines < 1:
        raise ConfigError(f"--lines {a.lines} must be >= 1: pass e.g. --lines 3")
    lengths = sorted(a.lengths)
    device = a.device
    if a.part != "loader":
        from evaluator.config import resolve_device  # a device that is not there: one line, before any work

        device = str(resolve_device(device))
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-", dir=a.tmp))
    rows, doc, ev = [], None, []
    try:
        if a.part != "eval":
            print(f"loader, stream mode, chunk {a.chunk_size}, {a.batch_windows} windows/batch, CPU, sparse raw uint16 .bin:")
            rows = loader_rows(lengths, a.chunk_size, a.batch_windows, a.batches, tmp)
            print(f"loader, document mode with BOS, synthetic index:")
            doc = document_row(a.documents, a.chunk_size, a.batch_windows, a.batches, tmp)
        if a.part != "loader":
            what = "compare (two models)" if a.compare else "evaluator with metrics"
            print(f"{what}, whole store, sliding, chunk {a.chunk_size}, {a.batch_windows} windows/batch, "
                  f"{device}, stopped at progress line {a.lines}:")
            ev = eval_rows(lengths, a.chunk_size, a.batch_windows, a.lines, device, tmp,
                           kind="compare" if a.compare else "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    goals = []
    if rows:
        print()
        print(table([[f"{r['n']:.0e} tokens", r["windows"], r["first_batch_s"], fmt_bytes(r["rss_growth"]),
                      fmt_bytes(r["rss_growth_vs_base"])] for r in rows]
                    + [[f"{a.documents:.0e} documents", doc["windows"], doc["first_batch_s"], fmt_bytes(doc["rss_growth"]), ""]],
                    ["loader", "windows", "first batch s", "peak RSS growth", "vs shortest"]))
        spread = max(r["rss_growth"] for r in rows) - min(r["rss_growth"] for r in rows)
        slowest = max(r["first_batch_s"] for r in rows)
        goals += [
            f"first batch within 1 s at every length: slowest {slowest:.3f} s ({'met' if slowest <= 1 else 'NOT met'})",
            f"RSS growth within 64 MiB across lengths: spread {spread / MiB:.1f} MiB ({'met' if spread <= 64 * MiB else 'NOT met'})",
            f"document mode over {a.documents:,} documents starts within 5 s: {doc['first_batch_s']:.2f} s "
            f"({'met' if doc['first_batch_s'] <= 5 else 'NOT met'})",
        ]
    if ev:
        print()
        base = ev[0]
        for r in ev:
            r["rss_growth_vs_base"] = r["rss_growth"] - base["rss_growth"]
        print(table([[f"{r['n']:.0e} tokens", r["windows"], r["first_line_s"], fmt_bytes(r["rss_growth"]),
                      fmt_bytes(r["rss_growth_vs_base"]), fmt_bytes(r["cuda_peak"]), fmt_bytes(r["metric_state_bytes"])]
                     for r in ev],
                    ["compare" if a.compare else "evaluator", "windows", "first line s", "peak RSS growth", "vs shortest", "CUDA peak", "metric state"]))
        slowest = max(r["first_line_s"] for r in ev)
        spread = max(r["rss_growth"] for r in ev) - min(r["rss_growth"] for r in ev)
        states = {r["metric_state_bytes"] for r in ev}
        goals += [
            f"evaluator: first progress line within 5 s at every length: slowest {slowest:.3f} s "
            f"({'met' if slowest <= 5 else 'NOT met'})",
            f"evaluator: peak RSS growth within 64 MiB across lengths: spread {spread / MiB:.1f} MiB "
            f"({'met' if spread <= 64 * MiB else 'NOT met'})",
            f"evaluator: metric state the same at every length: {', '.join(fmt_bytes(b) for b in sorted(states))} "
            f"({'met' if len(states) == 1 else 'NOT met'})",
        ]
        if base["cuda_peak"] is not None:
            cspread = max(r["cuda_peak"] for r in ev) - min(r["cuda_peak"] for r in ev)
            goals.append(f"evaluator: CUDA peak the same across lengths: spread {fmt_bytes(cspread)} "
                         f"({'met' if cspread <= MiB else 'NOT met'})")
    print("\n".join(goals))
    path = write_json(a.out, "bench_scaling.json", {
        "command": "python -m benchmarks.bench_scaling", "args": vars(a), "loader": rows, "document": doc,
        "evaluator": ev, "evaluator_device": device if ev else None, "goals": goals,
    })
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
