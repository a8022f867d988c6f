"""Tokenize throughput: ``streamdata tokenize`` vs the tokenizer's own limit vs the common recipe.

    python -m benchmarks.bench_tokenize [--source FILES...] [--tokenizer T] [--repeat 2] [--out DIR]

On the same documents, in one run:
- limit:   ``Tokenizer.encode_batch`` (and ``encode_batch_fast``) over the texts already in a Python
           list, 1000 documents per call: pure tokenizer work, no reading or writing;
- ours:    ``streamdata.tokenize_dataset`` end to end: read through ``datasets`` (Arrow cache warm),
           encode, write the shards, index and manifest (fsynced);
- recipe:  the usual script (nanoGPT's prepare.py pattern): ``Dataset.map(batched=True,
           num_proc=N)`` producing id lists, then concatenating them into one ``np.memmap``.
Every variant produces the same tokens (checked). Throughput is tokens per second (min of repeats).
Defaults: the embedded corpus (the stdlib's eval part) and the default 4096-entry BPE tokenizer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ._util import best_of, machine, table, write_json


def _default_tokenizer(tmp: Path) -> str:
    from streamdata.tokenize import DEFAULT_TOKENIZER

    asset = DEFAULT_TOKENIZER / "tokenizer.json"  # the bundled tokenizer ('--tokenizer default')
    if asset.is_file():
        return str(asset)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from streamdata.source import default_corpus_files

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(default_corpus_files("train"), trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                                  show_progress=False))
    tok.save(str(tmp / "tokenizer.json"))
    return str(tmp / "tokenizer.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", nargs="*", help="data files (default: the embedded stdlib corpus, eval part)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the project's default BPE)")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count(), help="processes for the Dataset.map recipe")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", help="folder for a JSON result")
    a = ap.parse_args(argv)

    import datasets
    from tokenizers import Tokenizer

    import streamdata
    from streamdata.source import SourceSpec, default_corpus_files, load_source

    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        files = a.source or default_corpus_files("eval")
        tok_path = a.tokenizer or _default_tokenizer(tmp)
        tok = Tokenizer.from_file(tok_path)
        eos = tok.token_to_id("<|endoftext|>")
        cache = str(tmp / "hf-cache")
        spec = SourceSpec(paths=tuple(files), text_column=a.text_column, cache_dir=cache)
        src = load_source(spec)  # builds the Arrow cache once: every variant below reads it warm
        ds = src.dataset
        texts = ds[:][a.text_column]
        n_bytes = sum(len(t.encode()) for t in texts)
        print(f"{len(texts):,} documents, {n_bytes / 1e6:.1f} MB of text, tokenizer {Path(tok_path).name} "
              f"(vocab {tok.get_vocab_size()}), {os.cpu_count()} CPUs")

        def limit(fast: bool):
            enc = tok.encode_batch_fast if fast else tok.encode_batch
            n = 0
            for i in range(0, len(texts), 1000):
                n += sum(len(e.ids) + 1 for e in enc(texts[i : i + 1000], add_special_tokens=False))
            return n

        def ours():
            out = tmp / "ours"
            m = streamdata.tokenize_dataset(source=files, tokenizer=tok_path, out=str(out), overwrite=True,
                                            cache_dir=cache, text_column=a.text_column)
            return m.totals["tokens"], out

        def recipe():
            def proc(batch):
                encs = tok.encode_batch(batch[a.text_column], add_special_tokens=False)
                ids = [e.ids + [eos] for e in encs]
                return {"ids": ids, "len": [len(x) for x in ids]}

            tokd = ds.map(proc, batched=True, num_proc=a.num_proc, remove_columns=ds.column_names,
                          load_from_cache_file=False, cache_file_name=str(tmp / "map" / "tok.arrow"))
            total = int(np.sum(tokd["len"], dtype=np.int64))
            path = tmp / "recipe.bin"
            arr = np.memmap(path, dtype=np.uint16, mode="w+", shape=(total,))
            idx, shards = 0, max(1, min(64, len(tokd)))
            for i in range(shards):
                part = tokd.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")
                batch = np.concatenate(part["ids"]) if len(part) else np.zeros(0, np.uint16)
                arr[idx : idx + len(batch)] = batch
                idx += len(batch)
            arr.flush()
            del arr
            shutil.rmtree(tmp / "map", ignore_errors=True)
            return total, path

        (tmp / "map").mkdir()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        t_slow, n_tok = best_of(lambda: limit(False), a.repeat)
        t_fast, _ = best_of(lambda: limit(True), a.repeat)
        t_ours, (n_ours, ours_out) = best_of(ours, a.repeat)
        (tmp / "map").mkdir(exist_ok=True)
        t_rec, (n_rec, rec_path) = best_of(recipe, a.repeat)

        # same tokens from every variant
        with streamdata.open_store(ours_out) as s:
            mine = s.read(0, len(s))
        theirs = np.fromfile(rec_path, dtype=np.uint16)
        assert n_tok == n_ours == n_rec and np.array_equal(mine, theirs), "variants disagree on the tokens"

        rows = [
            ("tokenizer encode_batch (limit)", n_tok / t_slow, t_slow, 1.0),
            ("tokenizer encode_batch_fast", n_tok / t_fast, t_fast, t_slow / t_fast),
            ("streamdata tokenize (ours, end to end)", n_ours / t_ours, t_ours, t_slow / t_ours),
            (f"datasets.map(num_proc={a.num_proc}) + np.memmap", n_rec / t_rec, t_rec, t_slow / t_rec),
        ]
        print(table(rows, ["variant", "tok/s", "seconds", "x encode_batch"]))
        print(f"ours / encode_batch = {t_slow / t_ours:.2f}x   ours / recipe = {t_rec / t_ours:.2f}x   "
              f"({n_tok:,} tokens, best of {a.repeat}, {time.strftime('%Y-%m-%d')})")
        write_json(a.out, "bench_tokenize.json", {
            "tokens": n_tok, "documents": len(texts), "bytes": n_bytes, "repeat": a.repeat,
            "seconds": {"encode_batch": t_slow, "encode_batch_fast": t_fast, "ours": t_ours, "recipe": t_rec},
            "ratios": {"ours_vs_encode_batch": t_slow / t_ours, "ours_vs_recipe": t_rec / t_ours},
            "machine": machine(),
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
