"""How far chunked kv-cache evaluation lands from the fp32 full forward, per dtype, next to how far
the same dtype's own full forward lands (one run, same model, same tokens).

    python -m benchmarks.bench_precision [--model default|FOLDER|HUB_ID] [--docs N] [--max-len T]
                                         [--chunk-size L] [--dtypes float32,bfloat16,float16]
                                         [--device cpu|cuda] [--out DIR]

The documents are the first ``N`` of the bundled evaluation corpus tokenized with the model's
tokenizer (``--model default``: the embedded model and tokenizer) and cut to ``T`` tokens. Per
dtype the model is loaded in that dtype (``load_model(..., dtype=)``, which is also the engine's
autocast dtype) and evaluated twice on the same documents:

- *full forward*: one forward per document, no cache, per-target NLL (the reference people trust);
- *chunked kv-cache*: ``StreamingEvaluator(mode="kv-cache", doc_mode="document", chunk_size=L)``,
  each document fed in chunks of ``L`` with its cache carried (its per-token losses).

Both are compared with the fp32 full forward: the mean and max absolute per-token difference
(nats) and the relative difference of the NLL sum. The goal: chunked lands within ~2x the dtype's
own full-forward distance (rounding of a different shape, not a wrong cache). The carry check's
measured tolerance is printed beside. Defaults: 24 documents of up to 512 tokens, L = 64, all three
dtypes (~1 minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from ._util import one_line_errors, table, write_json


def _documents(tokenizer: Any, n: int, max_len: int) -> list[list[int]]:
    from streamdata.source import default_corpus_files

    docs = []
    for f in default_corpus_files("eval"):
        ids = tokenizer.encode(open(f, encoding="utf-8").read()).ids[:max_len]
        if len(ids) >= 2:
            docs.append(ids)
        if len(docs) == n:
            break
    return docs


def _full_nll(adapter: Any, docs: list[list[int]], dtype: str) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    from evaluator.carry_check import autocast_for

    out = []
    with torch.inference_mode(), autocast_for(adapter.device, dtype):
        for d in docs:
            x = torch.tensor(d, device=adapter.device)[None]
            logits = adapter.module(input_ids=x[:, :-1], use_cache=False).logits
            out.append(F.cross_entropy(logits[0].float(), x[0, 1:], reduction="none").double().cpu().numpy())
    return np.concatenate(out)


@one_line_errors("bench_precision")
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model (default: the embedded one)")
    p.add_argument("--docs", type=int, default=24, help="documents (default 24)")
    p.add_argument("--max-len", type=int, default=512, help="tokens per document at most (default 512)")
    p.add_argument("--chunk-size", type=int, default=64, help="kv-cache chunk L (default 64)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated (default: all three)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", help="folder for bench_precision.json (default: none written)")
    a = p.parse_args(argv)
    dtypes = a.dtypes.split(",")
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            p.error(f"--dtypes: {d!r} is not one of float32, bfloat16, float16")
    for name in ("docs", "max_len", "chunk_size"):
        if getattr(a, name) < (2 if name == "max_len" else 1):
            p.error(f"--{name.replace('_', '-')}={getattr(a, name)} is too small")

    import torch

    from evaluator import StreamingEvaluator, load_model
    from streamdata.backends.memory import MemoryTokenStore
    from streamdata.loader import resolve_device
    from streamdata.tokenize import load_tokenizer

    device = resolve_device(a.device, kinds=("cpu", "cuda"))
    tok = load_tokenizer("default" if a.model == "default" else a.model)
    docs = _documents(tok.tokenizer, a.docs, a.max_len)
    lens = np.array([len(d) for d in docs])
    store = MemoryTokenStore(np.concatenate(docs).astype(np.int64), doc_offsets=np.concatenate([[0], np.cumsum(lens)]),
                             vocab_size=tok.tokenizer.get_vocab_size(), name=f"{len(docs)} bundled documents")
    ref = _full_nll(load_model(a.model, dtype="float32").to(device), docs, "float32")
    rows, payload = [], {}
    for dtype in dtypes:
        adapter = load_model(a.model, dtype=dtype).to(device)
        full = _full_nll(adapter, docs, dtype)
        ev = StreamingEvaluator(adapter, chunk_size=a.chunk_size, mode="kv-cache", doc_mode="document", dtype=dtype,
                                device=str(device), verbose=False, check_tokenizer=False)
        res = ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True)
        chunked = np.asarray(res["per_token_losses"], np.float64)
        chk = res["carry_check"]
        entry = {}
        for what, v in (("full forward", full), ("chunked kv-cache", chunked)):
            diff = np.abs(v - ref)
            entry[what] = {"mean_abs": float(diff.mean()), "max_abs": float(diff.max()),
                           "nll_sum_rel": float(abs(v.sum() - ref.sum()) / ref.sum())}
            rows.append([dtype, what, f"{diff.mean():.2e}", f"{diff.max():.2e}", entry[what]["nll_sum_rel"] and
                         f"{entry[what]['nll_sum_rel']:.1e}" or "0"])
        entry["ratio_mean_abs"] = entry["chunked kv-cache"]["mean_abs"] / max(entry["full forward"]["mean_abs"], 1e-300)
        entry["carry_check"] = chk
        rows[-1].append(f"{entry['ratio_mean_abs']:.2f}x" if dtype != "float32" else "-")
        rows[-2].append("")
        payload[dtype] = entry
        del adapter, ev
        torch.cuda.empty_cache() if device.type == "cuda" else None
    print(f"model {a.model}, {len(docs)} documents ({int(lens.sum() - len(lens)):,} targets, up to {a.max_len} tokens), "
          f"kv-cache chunk {a.chunk_size}, {device}; distances from the fp32 full forward, per target (nats):")
    print(table(rows, ["dtype", "evaluation", "mean |diff|", "max |diff|", "NLL sum rel", "chunked / full"]))
    write_json(a.out, "bench_precision.json", {"settings": vars(a), "dtypes": payload})
    return 0


if __name__ == "__main__":
    sys.exit(main())
