"""Model comparison cost: ``compare`` vs the two evaluations it replaces, and the disk a
write-logits-then-read comparison would need.

    python -m benchmarks.bench_compare [--store S] [--device D] [--tokens N] [--chunk-size L] [--overlap O]
                                       [--batch-size B] [--mode M] [--dtype T] [--layers N --hidden H]
                                       [--repeat R] [--threads K] [--out DIR]

On the first ``N`` tokens of the same store, with the same windows, in one run:

- compare: ``evaluator.compare_streaming(candidate, reference, store, ...)``: both models on every
  batch, per scored token KL(reference || candidate), both NLLs and top-1 agreement computed in loss
  slices on the device (float64 sums; the per-token KL to an unlinked temporary file), plus the exact
  KL quantiles (two passes over that file). Time: the engine's loop time (``total_time``) plus the
  quantile passes, timed apart and added.
- two runs: ``StreamingEvaluator(candidate).evaluate_streaming_with_metrics(store)`` and then the same
  for the reference: what one does without ``compare`` (both perplexities, but no KL and no
  agreement). Time: the sum of the two runs' ``total_time``.
- ratio = compare / two runs: the price of the per-token statistics over two plain evaluations.
- disk of the write-logits-then-read baseline (llama.cpp's ``--kl-divergence-base``, as the issue
  defines it): vocabulary x scored tokens x 4 bytes of reference logits, *computed*, not written;
  next to ours: nothing (or scored tokens x 4 bytes when the per-token KL is kept).

Models: a GPT-2-shaped random reference (bench_eval's: GPT-2 small's shape on CUDA, 4 x 256 on CPU)
and as the candidate its copy with every linear weight fake-quantized to int8 (symmetric, one scale
per output channel: round(w / s) * s, s = max|w| / 127): a real quantization error, not a second
random model. Each variant runs once on a short prefix untimed (warm-up), then ``--repeat`` times
interleaved; the best run counts. CUDA: the engine's clock reads after a device sync.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

import torch

from ._util import fmt_bytes, fmt_rate, machine, one_line_errors, table, write_json
from .bench_eval import CACHE, describe_model, random_gpt2, run_settings


def fake_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose 2-D weights (Linear, GPT-2's Conv1D, embeddings) are rounded to int8
    levels, symmetric, one scale per output row."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in q.named_parameters():
            if p.dim() == 2 and name.endswith("weight"):
                s = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
                p.copy_(torch.round(p / s) * s)
    return q


def measure(cand: torch.nn.Module, ref: torch.nn.Module, store: Any, *, tokens: int, chunk_size: int, overlap: int,
            batch: int | str, mode: str, device: torch.device, repeat: int = 1, warm_tokens: int | None = None) -> dict[str, Any]:
    from evaluator import StreamingEvaluator, compare_streaming
    from evaluator.compare import QUANTILES
    from evaluator.quantiles import quantiles

    kw = dict(chunk_size=chunk_size, overlap=overlap, batch_size=batch, mode=mode, device=str(device), verbose=False,
              dtype="float32")  # no autocast: each model runs in its own parameter dtype

    def compare(n: int) -> dict[str, Any]:
        r = compare_streaming(cand, ref, store, max_tokens=n, **kw)
        t0 = time.perf_counter()
        quantiles(r["per_token_kl"], [0.0, *QUANTILES.values(), 1.0])  # what compare_streaming did after its loop
        r["quantile_s"] = time.perf_counter() - t0
        r["seconds"] = r["total_time"] + r["quantile_s"]
        return r

    def two_runs(n: int) -> dict[str, Any]:
        a = StreamingEvaluator(cand, **kw).evaluate_streaming_with_metrics(store, max_tokens=n)
        b = StreamingEvaluator(ref, **kw).evaluate_streaming_with_metrics(store, max_tokens=n)
        return {"seconds": a["total_time"] + b["total_time"], "candidate_s": a["total_time"],
                "reference_s": b["total_time"], "perplexity_candidate": a["perplexity"],
                "perplexity_reference": b["perplexity"], "total_tokens": a["total_tokens"]}

    warm = warm_tokens or min(tokens, 4 * chunk_size + 1)
    compare(warm)
    two_runs(warm)
    best: dict[str, dict[str, Any]] = {}
    for _ in range(repeat):  # interleaved: a disturbance hits both alike
        for name, fn in (("compare", compare), ("two_runs", two_runs)):
            r = fn(tokens)
            if name not in best or r["seconds"] < best[name]["seconds"]:
                best[name] = r
    c, t = best["compare"], best["two_runs"]
    scored = c["total_tokens"]
    vocab = int(c["compared_vocab"])
    # the two ways must have scored the same targets and found the same perplexities
    if t["total_tokens"] != scored:
        raise RuntimeError(f"compare scored {scored} targets, the two runs {t['total_tokens']}")
    return {
        "tokens": tokens, "scored": scored, "vocab": vocab, "chunk_size": chunk_size, "overlap": overlap,
        "mode": c["mode"], "batch_size": c["batch_size"], "device": str(device),
        "compare_s": c["seconds"], "compare_loop_s": c["total_time"], "compare_quantile_s": c["quantile_s"],
        "two_runs_s": t["seconds"], "candidate_run_s": t["candidate_s"], "reference_run_s": t["reference_s"],
        "ratio_compare_vs_two_runs": c["seconds"] / t["seconds"],
        "compare_tok_s": scored / c["seconds"], "two_runs_tok_s": scored / t["seconds"],
        "logits_file_bytes": vocab * scored * 4,  # vocabulary x scored tokens x fp32: computed, never written
        "our_disk_bytes": 0, "our_per_token_kl_bytes": scored * 4,
        "kl_mean": c["kl_mean"], "kl_p99": c["kl_p99"], "kl_max": c["kl_max"], "top1_agreement": c["top1_agreement"],
        "perplexity_candidate": c["perplexity_candidate"], "perplexity_reference": c["perplexity_reference"],
        "perplexity_candidate_two_runs": t["perplexity_candidate"], "perplexity_reference_two_runs": t["perplexity_reference"],
    }


def print_results(m: dict[str, Any], print_fn=print) -> None:
    rows = [
        ("compare (both models, KL/agreement/NLLs per token)", f"{m['compare_s']:.3f}", fmt_rate(m["compare_tok_s"]),
         f"loop {m['compare_loop_s']:.3f} s + quantiles {m['compare_quantile_s'] * 1e3:.1f} ms"),
        ("two runs, one after the other (perplexities only)", f"{m['two_runs_s']:.3f}", fmt_rate(m["two_runs_tok_s"]),
         f"candidate {m['candidate_run_s']:.3f} s + reference {m['reference_run_s']:.3f} s"),
    ]
    print_fn(table(rows, ["variant", "seconds", "scored tok/s", "detail"]))
    print_fn(f"\nratio compare / two runs: {m['ratio_compare_vs_two_runs']:.2f}x")
    print_fn(f"disk: write-logits-then-read baseline {fmt_bytes(m['logits_file_bytes'])} "
             f"({m['vocab']:,} vocab x {m['scored']:,} scored tokens x 4 bytes, computed, not written); "
             f"compare: {fmt_bytes(m['our_disk_bytes'])} ({fmt_bytes(m['our_per_token_kl_bytes'])} when the per-token "
             "KL is kept)")
    print_fn(f"figures: KL mean {m['kl_mean']:.4g}, 99th percentile {m['kl_p99']:.4g}, max {m['kl_max']:.4g}; top-1 "
             f"agreement {m['top1_agreement']:.2f}%; perplexity candidate {m['perplexity_candidate']:.4f} (two runs: "
             f"{m['perplexity_candidate_two_runs']:.4f}), reference {m['perplexity_reference']:.4f} (two runs: "
             f"{m['perplexity_reference_two_runs']:.4f})")


@one_line_errors("bench_compare")
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", help="a token store (default: the embedded stdlib corpus, built once and cached)")
    ap.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    ap.add_argument("--tokens", type=int, help="compare on the store's first N tokens (default 1Mi on CUDA, 16Ki on CPU)")
    ap.add_argument("--chunk-size", type=int, help="window length L (default 1024 on CUDA, 512 on CPU)")
    ap.add_argument("--overlap", type=int, default=0, help="sliding mode: overlap (default 0)")
    ap.add_argument("--batch-size", default="auto", help="windows per forward (default: the evaluator's auto)")
    ap.add_argument("--mode", default="sliding", choices=("sliding", "kv-cache"), help="context mode (default sliding)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--layers", type=int, help="layers of the random reference (default: bench_eval's shape)")
    ap.add_argument("--hidden", type=int, help="hidden size of the random reference (default: bench_eval's shape)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per variant; the best counts (default 1)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--cache", default=str(CACHE), help="folder for the default store (default bench-out/stores)")
    ap.add_argument("--out", help="folder for bench_compare.json")
    a = ap.parse_args(argv)

    from streamdata import open_store

    device, L, N, batch, dtype, store_path = run_settings(a, cpu_tokens=16384)
    cuda = device.type == "cuda"
    with open_store(store_path) as store:
        n_pos = max(1024, L, N if a.mode == "kv-cache" else 0)
        ref = random_gpt2(device, int(store.vocab_size or 50257), n_pos, dtype, n_layer=a.layers, n_embd=a.hidden)
        cand = fake_int8(ref)
        print(f"store {store_path}: {len(store):,} tokens; comparing on the first {min(N, len(store)):,}")
        print(f"reference: {describe_model(ref)}; candidate: its int8 fake-quantized copy; device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if cuda else f" ({torch.get_num_threads()} threads)"))
        print(f"chunk {L}, overlap {a.overlap}, mode {a.mode}; warm-up, then {a.repeat} interleaved repeat(s); "
              f"load average {os.getloadavg()[0]:.2f}")
        m = measure(cand, ref, store, tokens=N, chunk_size=L, overlap=a.overlap, batch=batch, mode=a.mode,
                    device=device, repeat=a.repeat)
    print()
    print_results(m)
    path = write_json(a.out, "bench_compare.json", {"command": "python -m benchmarks.bench_compare", "args": vars(a),
                                                    "store": str(store_path), "model": describe_model(ref),
                                                    "machine": machine(), **m})
    if path:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
