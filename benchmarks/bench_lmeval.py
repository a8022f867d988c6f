"""Our evaluator vs lm-evaluation-harness's ``loglikelihood_rolling``: same model, documents and windows.

    python -m benchmarks.bench_lmeval [--model default|FOLDER] [--docs D] [--chunk-size L] [--batch-size B]
                                      [--device D] [--repeat R] [--threads K] [--out DIR]

Both sides score every token of each document once, each document on its own, with lm-eval's
rolling windows: the first window holds HFLM's prefix token + the document's first ``L - 1``
tokens, later windows ``L`` tokens each, the last one right-aligned to the document's end
(``max_length = L``). In one run, interleaved (a round over both per repeat; the best run counts):

- lm-eval: ``HFLM(pretrained=<the model object>, tokenizer=<its tokenizer>, max_length=L,
  batch_size=B).loglikelihood_rolling(requests)``, one request per document (lm-eval 0.4.13, the
  ``parity`` extra). Its time includes tokenizing the strings (its loop does that; listed apart too).
- ours: the README's parity recipe, ``StreamingEvaluator(model, chunk_size=L, overlap=0,
  doc_mode="document", bos=<HFLM's prefix token>, tail="full", mode="sliding", batch_size=B)
  .evaluate_streaming(store)`` on a store of the same documents (tokenized once beforehand with the
  same tokenizer, no EOS/BOS added, as ``streamdata tokenize --eos none``): the store is read, not
  the text.

tok/s is scored targets per second (the targets are the same: every token of every document). The
per-document NLLs of the two are compared as well (max relative difference, printed), so the row
only counts when both computed the same thing.

Defaults: the bundled model and tokenizer (``--model default``: 4-layer GPT-2, 1024 positions,
4096-entry BPE), the first ``D`` files of the embedded corpus ``stdlib:eval`` between 4 and 24 KB
(Python source), ``L = 256``, ``B = 8``, CPU unless ``--device``. ``--model FOLDER``: a
transformers causal LM folder with its ``tokenizer.json`` (loaded locally, nothing downloaded).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._util import fmt_rate, machine, one_line_errors, sync, table, write_json


def corpus_docs(n: int, lo: int = 4096, hi: int = 24576) -> list[str]:
    """The first ``n`` files of ``stdlib:eval`` whose UTF-8 size is in [lo, hi] bytes, as texts."""
    from streamdata.source import default_corpus_files

    out = []
    for f in default_corpus_files("eval"):
        size = os.path.getsize(f)
        if lo <= size <= hi:
            out.append(Path(f).read_text(encoding="utf-8"))
            if len(out) == n:
                break
    return out


def load_hf(model: str, folder: Path) -> tuple[Any, Any, Path]:
    """(model, tokenizer, tokenizer.json) as lm-eval gets them: transformers objects, loaded locally.
    ``default``: the bundled model and tokenizer, saved together into ``folder`` first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    if model == "default":
        from evaluator.models import DEFAULT_MODEL_DIR
        from streamdata.tokenize import DEFAULT_TOKENIZER

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR).save_pretrained(folder)
            PreTrainedTokenizerFast(tokenizer_file=str(DEFAULT_TOKENIZER / "tokenizer.json"),
                                    eos_token="<|endoftext|>").save_pretrained(folder)
        model = str(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model)
    return m, tok, Path(model) / "tokenizer.json"


def _quiet() -> None:
    """No progress bars or per-call warnings from transformers, datasets and lm-eval in the output."""
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # loglikelihood_rolling asks for a progress bar per batch (disable_tqdm=False, not ours to pass)
    import lm_eval.models.huggingface as hflm

    bar = hflm.tqdm

    def no_bar(*args, **kw):
        kw["disable"] = True
        return bar(*args, **kw)

    hflm.tqdm = no_bar
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


@one_line_errors("python -m benchmarks.bench_lmeval", flags=("device", "model", "chunk_size"))
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' (the bundled model) or a local transformers folder")
    ap.add_argument("--docs", type=int, default=16, help="documents from stdlib:eval (default: %(default)s)")
    ap.add_argument("--chunk-size", type=int, default=256, help="lm-eval's max_length = our chunk size (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward, both sides (default: %(default)s)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    ap.add_argument("--repeat", type=int, default=2, help="timed runs of each; the best counts (default: %(default)s)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    ap.add_argument("--out", help="folder for bench_lmeval.json")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local model and tokenizer only
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        import sys

        print("python -m benchmarks.bench_lmeval: error: lm-eval is not installed: "
              "pip install -c .ci/constraints.txt -e '.[parity]'", file=sys.stderr)
        return 2
    from evaluator import StreamingEvaluator
    from evaluator.config import resolve_device
    from streamdata import tokenize_dataset

    _quiet()

    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    L, B = a.chunk_size, a.batch_size
    docs = corpus_docs(a.docs)
    with tempfile.TemporaryDirectory(prefix="bench-lmeval-") as tmp:
        tmp = Path(tmp)
        model, hf_tok, tok_json = load_hf(a.model, tmp / "model")
        model.to(device)
        lm = HFLM(pretrained=model, tokenizer=hf_tok, max_length=L, batch_size=B)
        prefix = lm.prefix_token_id
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        store = tmp / "store"
        tokenize_dataset(source=str(tmp / "docs.jsonl"), tokenizer=str(tok_json), out=str(store), eos="none", bos="none")
        t0 = time.perf_counter()
        lens = [len(lm.tok_encode(d)) for d in docs]
        t_tok = time.perf_counter() - t0
        targets = sum(lens)
        windows = sum(1 + max(0, -(-(n - L) // L)) for n in lens if n)
        folder = tmp / "model" if a.model == "default" else Path(a.model)
        ev = StreamingEvaluator(str(folder), chunk_size=L, overlap=0, doc_mode="document", bos=prefix, tail="full",
                                mode="sliding", batch_size=B, device=str(device), verbose=False)
        reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(docs)]

        def run_lm():
            return np.array(lm.loglikelihood_rolling(reqs, disable_tqdm=True))

        def run_ours():
            return ev.evaluate_streaming_with_metrics(str(store))

        print(f"{len(docs)} documents of stdlib:eval, {targets:,} tokens, {windows:,} windows of L={L} "
              f"(batch {B}); model {a.model} on {device}"
              + ("" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"))
        best = {"lm-eval": float("inf"), "ours": float("inf")}
        out: dict[str, Any] = {}
        for name, fn in (("lm-eval", run_lm), ("ours", run_ours)):  # warm-up
            out[name] = fn()
        for _ in range(a.repeat):
            for name, fn in (("lm-eval", run_lm), ("ours", run_ours)):
                sync(device)
                t0 = time.perf_counter()
                out[name] = fn()
                sync(device)
                best[name] = min(best[name], time.perf_counter() - t0)
    r = out["ours"]
    assert r["total_tokens"] == targets, (r["total_tokens"], targets)
    ours_nll = np.asarray(r["per_document"]["nll"][: len(docs)], dtype=np.float64)
    ref = -out["lm-eval"]
    rel = float(np.max(np.abs(ours_nll - ref) / np.maximum(np.abs(ref), 1e-12)))
    total_rel = abs(float(r["nll_sum"]) - ref.sum()) / abs(ref.sum())
    rows = [[name, f"{best[name]:.2f}", fmt_rate(targets / best[name])] for name in ("lm-eval", "ours")]
    print(table(rows, ["variant", "best s", "scored tok/s"]))
    ratio = best["lm-eval"] / best["ours"]
    print(f"ours / lm-eval = {ratio:.2f}x scored tok/s; lm-eval's time includes tokenizing the text "
          f"({t_tok:.2f} s of it, measured apart); per-document NLL max rel diff {rel:.2e}, total {total_rel:.2e}")
    f = write_json(a.out, "bench_lmeval.json", {
        "docs": len(docs), "targets": targets, "windows": windows, "chunk_size": L, "batch_size": B,
        "device": str(device), "model": a.model, "threads": torch.get_num_threads(),
        "seconds": best, "tok_per_s": {k: targets / v for k, v in best.items()}, "ratio_ours_over_lmeval": ratio,
        "lm_eval_tokenize_s": t_tok, "max_rel_doc_nll_diff": rel, "total_rel_nll_diff": total_rel,
        "machine": machine(),
    })
    if f:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
