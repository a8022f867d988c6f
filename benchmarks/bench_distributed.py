"""Distributed evaluation (issue 12): 1 process vs N gloo processes under torchrun, on the same store.

    python -m benchmarks.bench_distributed [--procs 2] [--tokens N] [--chunk-size L] [--batch-size B]
                                           [--layers K] [--hidden H] [--device cpu|cuda] [--repeat R] [--out DIR]

One run measures, on the same raw uint16 store of ``N`` random ids (vocab 4096) and the same
GPT-2-shaped model (random weights, seed 0, fp32; ``--layers``/``--hidden``), sliding mode, ``L``-token
windows, ``B`` windows per forward:

- 1 process, torch's default threads (every core): ``StreamingEvaluator.evaluate_streaming``;
- 1 process, 1 thread (``OMP_NUM_THREADS=1``, as torchrun sets for each of its workers);
- ``--procs`` processes: ``python -m torch.distributed.run --standalone --nproc-per-node P`` of the same
  evaluation (gloo on the CPU, NCCL with ``--device cuda``: one GPU per process).

The figure is the engine's ``tokens_per_second``: scored targets over the evaluation loop's time
(under torchrun: all targets over the slowest rank's loop time); process start, imports and model
construction are outside it and reported apart as the launch's wall time. The scaling ratio is P
processes over 1 process with every core, measured in the same run (rounds interleaved, best of
``--repeat``). Each row also checks that ``nll_sum`` equals the 1-process figure within 1e-9 relative.
On CPU, processes and threads share the same cores: P processes on a P-core machine can at best match
one process that already uses all P cores through threads; the ratio says how close they come.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ._util import fmt_rate, machine, one_line_errors, table, write_json

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 4096


def _model(layers: int, hidden: int, positions: int):
    import warnings

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=positions, n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(cfg).eval()


def _worker(a: argparse.Namespace) -> int:
    """One process (under torchrun or not): evaluate, rank 0 prints one JSON line."""
    from evaluator import StreamingEvaluator
    from evaluator import distributed as dd

    with dd.session(a.device) as info:
        ev = StreamingEvaluator(_model(a.layers, a.hidden, a.chunk_size), chunk_size=a.chunk_size, mode="sliding",
                                batch_size=a.batch_size, device=None if info is not None else a.device, verbose=False)
        r = ev.evaluate_streaming(a.worker)
        if info is None or info.is_main:
            print(json.dumps({k: r[k] for k in ("tokens_per_second", "total_time", "total_tokens", "nll_sum",
                                                "world_size", "backend")}))
    return 0


def _launch(store: Path, a: argparse.Namespace, procs: int, threads: int | None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    args = ["-m", "benchmarks.bench_distributed", "--worker", str(store), "--chunk-size", str(a.chunk_size),
            "--batch-size", str(a.batch_size), "--layers", str(a.layers), "--hidden", str(a.hidden), "--device", a.device]
    cmd = [sys.executable, *args] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"benchmark run with {procs} process(es) failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["wall_s"] = wall
    return r


@one_line_errors("bench_distributed")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=2, help="processes of the torchrun row (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=60_000, help="tokens of the synthetic store (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=256, help="window length L (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: %(default)s)")
    p.add_argument("--layers", type=int, default=4, help="model layers (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="model width (default: %(default)s)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu: gloo; cuda: NCCL, one GPU per process")
    p.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the best run counts (default: %(default)s)")
    p.add_argument("--out", help="folder for bench_distributed.json (default: none written)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return _worker(a)
    for name in ("procs", "tokens", "chunk_size", "batch_size", "layers", "hidden", "repeat"):
        lo = 2 if name in ("procs", "tokens") else 1
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= {lo}")
    variants = [("1 process, all threads", 1, None), ("1 process, 1 thread", 1, 1),
                (f"{a.procs} processes (torchrun), 1 thread each", a.procs, None)]
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        store = Path(tmp) / "ids.bin"
        np.random.default_rng(0).integers(0, VOCAB, size=a.tokens, dtype=np.uint16).tofile(store)
        best: dict[str, dict[str, Any]] = {}
        for _ in range(a.repeat):
            for name, procs, threads in variants:
                r = _launch(store, a, procs, threads)
                if name not in best or r["tokens_per_second"] > best[name]["tokens_per_second"]:
                    best[name] = r
    base = best[variants[0][0]]
    rows = []
    for name, _, _ in variants:
        r = best[name]
        r["vs_1_process"] = r["tokens_per_second"] / base["tokens_per_second"]
        r["nll_rel_diff"] = abs(r["nll_sum"] - base["nll_sum"]) / abs(base["nll_sum"])
        rows.append([name, fmt_rate(r["tokens_per_second"]), f"{r['vs_1_process']:.2f}x", f"{r['total_time']:.2f}",
                     f"{r['wall_s']:.1f}", f"{r['nll_rel_diff']:.1e}"])
    print(f"sliding, L={a.chunk_size}, B={a.batch_size}, {a.tokens:,} tokens, GPT-2-shaped {a.layers}x{a.hidden}, "
          f"{a.device}, {os.cpu_count()} CPUs, best of {a.repeat}:")
    print(table(rows, ["variant", "scored tok/s", "vs 1 process", "loop s", "launch wall s", "nll rel diff"]))
    write_json(a.out, "bench_distributed.json", {"machine": machine(), "settings": vars(a), "rows": best})
    return 0


if __name__ == "__main__":
    sys.exit(main())
