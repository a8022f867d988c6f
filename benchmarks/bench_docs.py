"""Parallel documents (issue 13): document mode, kv-cache, B documents side by side vs batch 1.

    python -m benchmarks.bench_docs [--docs N] [--min-len A] [--max-len Z] [--positions P] [--chunk-size L]
                                    [--batch-size B] [--layers K] [--hidden H] [--heads NH] [--kv-heads NKV]
                                    [--intermediate I] [--vocab V] [--dtype D] [--device cpu|cuda]
                                    [--repeat R] [--auto-batch] [--out DIR]

One run builds one in-memory store (:class:`streamdata.backends.memory.MemoryTokenStore`) of ``N``
documents whose lengths are drawn uniformly from ``[A, Z]`` tokens (random ids, seed 0) and one
Llama-shaped model (transformers ``LlamaConfig``, random weights, seed 0, ``P`` positions, built in
``D`` on the device), then evaluates the same store with ``StreamingEvaluator.evaluate_streaming``,
``mode="kv-cache"``, ``doc_mode="document"``, chunk ``L`` (default ``P``: one window per document),
twice per round: ``batch_size=1`` (one document at a time, the carried-cache path people write by
hand) and ``batch_size=B`` (B documents side by side, each with its own KV cache). Rounds are
interleaved; the best of ``--repeat`` counts for each. Before the rounds, one untimed run of each
on the first 32 documents warms up kernels and the allocator.

The figure is the engine's ``tokens_per_second``: scored targets over the evaluation loop's time
(the loader, the forwards, the loss; model construction and the store are outside it). The ratio
is parallel over batch 1, measured in the same run on the same tokens. Each row also reports the
relative difference of ``nll_sum`` from the batch-1 figure (float rounding of batched kernels:
~1e-7 in fp32, ~1e-3 in bf16).

``--auto-batch`` adds, after the rounds, ``batch_size="auto"`` (measured on the run's first groups,
evaluator/autobatch.py) against a sweep of fixed sizes (the ladder's sizes within auto's memory
bound) and against the rule auto followed before (1 document on a CPU, the memory estimate on CUDA):
one run each on the same store.

Defaults: on CPU a small model and 160 documents of 16-400 tokens (about a minute on 2 cores); on
CUDA the issue's shape: 2,000 documents of 100-4,000 tokens, 4,096 positions, bf16, a 12-layer
1024-wide Llama (16 heads, 4 KV heads), B = 32.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ._util import fmt_rate, one_line_errors, table, write_json

CPU = dict(docs=160, min_len=16, max_len=400, positions=512, batch_size=8, layers=2, hidden=128, heads=4, kv_heads=2,
           intermediate=344, vocab=4096, dtype="float32", repeat=2)
CUDA = dict(docs=2000, min_len=100, max_len=4000, positions=4096, batch_size=32, layers=12, hidden=1024, heads=16,
            kv_heads=4, intermediate=2816, vocab=32000, dtype="bfloat16", repeat=1)


def _model(a: argparse.Namespace):
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=a.positions, bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings(), torch.device(a.device):  # initialised on the device: seconds, not minutes, at 200M
        warnings.simplefilter("ignore")
        m = LlamaForCausalLM(cfg).eval()
    return m.to(dtype=getattr(torch, a.dtype))


def _store(a: argparse.Namespace, docs: int | None = None):
    from streamdata.backends.memory import MemoryTokenStore

    rng = np.random.default_rng(0)
    lens = rng.integers(a.min_len, a.max_len + 1, size=a.docs)[:docs]
    ids = rng.integers(1, a.vocab, size=int(lens.sum()), dtype=np.int64)
    return MemoryTokenStore(ids, doc_offsets=np.concatenate([[0], np.cumsum(lens)]), vocab_size=a.vocab,
                            name=f"{len(lens)} documents of {a.min_len}-{a.max_len} tokens")


def _evaluate(model: Any, store: Any, a: argparse.Namespace, B: int) -> dict[str, Any]:
    from evaluator import StreamingEvaluator

    ev = StreamingEvaluator(model, chunk_size=a.chunk_size, mode="kv-cache", doc_mode="document", batch_size=B,
                            dtype=a.dtype, device=a.device, verbose=False)
    return ev.evaluate_streaming(store)


def _auto_batch(model: Any, store: Any, a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from evaluator import StreamingEvaluator
    from evaluator.autobatch import ladder_sizes
    from evaluator.resolve import batch_windows_for, cpu_guess

    from ._util import auto_batch_rows

    ev = StreamingEvaluator(model, chunk_size=a.chunk_size, mode="kv-cache", doc_mode="document", batch_size="auto",
                            dtype=a.dtype, device=a.device, verbose=False)
    bound = batch_windows_for(ev.config, ev.adapter, torch.device(a.device), "kv-cache", a.chunk_size)
    old = bound if a.device == "cuda" else cpu_guess("kv-cache", a.chunk_size)
    print(f"auto batch: bound {bound}, sweep {ladder_sizes(bound)}, old rule {old}")
    return auto_batch_rows(lambda B: _evaluate(model, store, a, B), ladder_sizes(bound), old)


@one_line_errors("bench_docs")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_docs", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu or cuda (sets the defaults below)")
    for name, what in (("docs", "documents"), ("min_len", "shortest document, tokens"),
                       ("max_len", "longest document, tokens"), ("positions", "the model's positions"),
                       ("chunk_size", "window length L (default: --positions)"),
                       ("batch_size", "documents side by side in the parallel run"), ("layers", "model layers"),
                       ("hidden", "model width"), ("heads", "attention heads"), ("kv_heads", "key/value heads"),
                       ("intermediate", "MLP width"), ("vocab", "vocabulary"),
                       ("repeat", "interleaved rounds; the best run counts")):
        p.add_argument("--" + name.replace("_", "-"), type=int,
                       help=f"{what} (default: cpu {CPU.get(name, 'P')}, cuda {CUDA.get(name, 'P')})")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="model dtype (default: cpu float32, cuda bfloat16)")
    p.add_argument("--auto-batch", action="store_true",
                   help="add the auto-batch rows: batch auto (measured) vs a sweep of fixed sizes and vs the old rule")
    p.add_argument("--out", help="folder for bench_docs.json (default: none written)")
    a = p.parse_args(argv)
    for k, v in (CUDA if a.device == "cuda" else CPU).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.chunk_size is None:
        a.chunk_size = a.positions
    for name in ("docs", "min_len", "positions", "chunk_size", "batch_size", "layers", "hidden", "heads", "kv_heads",
                 "intermediate", "vocab", "repeat"):
        lo = 2 if name == "min_len" else 1
        if getattr(a, name) < lo:
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} must be >= {lo}")
    if a.max_len < a.min_len or a.max_len > a.positions + 1:
        p.error(f"--max-len={a.max_len} must lie in [--min-len={a.min_len}, --positions + 1 = {a.positions + 1}] "
                "(kv-cache keeps each document in one cache)")

    import torch

    from streamdata.loader import resolve_device

    resolve_device(a.device, kinds=("cpu", "cuda"))  # no GPU for --device cuda: one line, before building anything
    model = _model(a)
    store, warm = _store(a), _store(a, docs=32)
    variants = [("batch 1", 1), (f"parallel, B={a.batch_size}", a.batch_size)]
    with torch.inference_mode():
        for _, B in variants:
            _evaluate(model, warm, a, B)
    best: dict[str, dict[str, Any]] = {}
    for _ in range(a.repeat):
        for name, B in variants:
            r = _evaluate(model, store, a, B)
            r = {k: r[k] for k in ("tokens_per_second", "total_time", "total_tokens", "nll_sum", "num_chunks", "batch_size")}
            if name not in best or r["tokens_per_second"] > best[name]["tokens_per_second"]:
                best[name] = r
    base = best[variants[0][0]]
    rows = []
    for name, _ in variants:
        r = best[name]
        r["vs_batch_1"] = r["tokens_per_second"] / base["tokens_per_second"]
        r["nll_rel_diff"] = abs(r["nll_sum"] - base["nll_sum"]) / abs(base["nll_sum"])
        rows.append([name, fmt_rate(r["tokens_per_second"]), f"{r['vs_batch_1']:.2f}x", f"{r['total_time']:.2f}",
                     f"{r['nll_rel_diff']:.1e}"])
    print(f"document mode, kv-cache, {a.docs:,} documents of {a.min_len}-{a.max_len} tokens ({base['total_tokens']:,} "
          f"targets), L={a.chunk_size}, Llama-shaped {a.layers}x{a.hidden} ({a.heads}/{a.kv_heads} heads, "
          f"{a.positions} positions), {a.dtype}, {a.device}, best of {a.repeat}:")
    print(table(rows, ["variant", "scored tok/s", "vs batch 1", "loop s", "nll rel diff"]))
    payload = {"ratio_parallel_vs_batch_1": best[variants[1][0]]["vs_batch_1"], "settings": vars(a), "rows": best}
    if a.auto_batch:  # (after the ratio above: benchmarks.gpu_check reads the first ratio it finds)
        payload["auto_batch"] = _auto_batch(model, store, a)
        from ._util import auto_batch_table

        print(f"\nauto batch, one run each:\n{auto_batch_table(payload['auto_batch'])}")
    write_json(a.out, "bench_docs.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
