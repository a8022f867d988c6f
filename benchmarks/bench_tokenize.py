"""Tokenize throughput and peak memory: ``streamdata tokenize`` vs the tokenizer's own limit vs the
common recipe, and our byte-budget batching vs the old document-count batching.

    python -m benchmarks.bench_tokenize [--source FILES...] [--part all] [--tokenizer T] [--repeat 2]
                                        [--batch-docs 1000] [--scale 16] [--huge-mb 50] [--parts 2 [--parts-only]]
                                        [--out DIR]

On the same documents, in one run:
- limit:   ``Tokenizer.encode_batch`` (and ``encode_batch_fast``) over the texts already in a Python
           list, 1000 documents per call: pure tokenizer work, no reading or writing;
- ours:    ``streamdata`` tokenize end to end (``run_tokenize``, default ``batch_bytes``): read through
           ``datasets`` (Arrow cache warm), encode, write the shards, index and manifest (fsynced);
- ours, old batching: the same with the batching of before issue 15 (``--batch-docs`` documents per
           call, no byte budget), the "before" row of the memory goal;
- recipe:  the usual script (nanoGPT's prepare.py pattern): ``Dataset.map(batched=True,
           num_proc=N)`` producing id lists, then concatenating them into one ``np.memmap``.
Each "ours" row runs in a child process of its own, so its peak RSS (the child's VmHWM: the
interpreter, datasets, the tokenizer and the pipeline; the time excludes imports) is its own.
``--scale K`` adds both "ours" rows on a corpus of the same files repeated K times (in a temporary
folder); ``--huge-mb M`` adds one document of M MB (stdlib text concatenated): what a single huge
document costs. These extra rows run once each (they take K times, or minutes, longer). Every variant produces the same tokens (checked). Throughput is tokens per second
(min of repeats); peak RSS is the max of repeats.
``--parts K`` adds the partitioned build (``tokenize --num-parts K``): K part processes started at
once against one process for the whole corpus, each timed from start to the last exit by the
parent (imports and the Arrow conversion of its own files included on both sides: no shared
cache), plus the ``merge`` of the parts, which must equal the single run (checked). Wall-clock
ratios, min of ``--repeat``, the two taking turns; ``--parts-only`` runs just these rows.
Defaults: the embedded corpus (``stdlib:all``, the issue-15 goal's corpus) and the bundled tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

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


# The child that runs one "ours" variant: imports first (not timed), then run_tokenize, then its own
# VmHWM (peak resident set, kB in /proc/self/status) as one JSON line on stdout.
_CHILD = """
import json, sys, time
from streamdata.tokenize import run_tokenize
kw = json.loads(sys.stdin.read())
t0 = time.perf_counter()
r = run_tokenize(**kw)
dt = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
print(json.dumps({'seconds': dt, 'tokens': r.tokens_this_run, 'peak_rss_mib': hwm / 1024}))
"""


def _ours_in_children(kws: list[dict], repeat: int) -> list[dict]:
    """For each of ``kws``: best time and highest peak RSS of ``repeat`` child runs of
    ``run_tokenize(**kw)``. The variants take turns, so a busy spell of the machine hits them alike."""
    import subprocess
    import sys

    runs: list[list[dict]] = [[] for _ in kws]
    for _ in range(repeat):
        for kw, mine in zip(kws, runs):
            p = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(kw), capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"tokenize child failed: {p.stderr.strip().splitlines()[-1:]}")
            mine.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"  {Path(kw['out']).name}: {mine[-1]}", flush=True)  # progress: the table comes at the end
    return [{"seconds": min(r["seconds"] for r in rs), "tokens": rs[-1]["tokens"],
             "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)} for rs in runs]


def _wall_of_children(kws: list[dict]) -> float:
    """Wall seconds from starting one ``run_tokenize(**kw)`` child per ``kws`` (all at once) to the last exit."""
    import subprocess
    import sys

    # stderr to files, not pipes: a child whose pipe filled up (progress output) would stall until read
    logs = [tempfile.TemporaryFile(mode="w+") for _ in kws]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=log, text=True) for log in logs]
    for p, kw in zip(procs, kws):
        p.stdin.write(json.dumps(kw))
        p.stdin.close()
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    errors = []
    for code, log in zip(codes, logs):
        log.seek(0)
        if code != 0:
            errors.append(log.read().strip().splitlines()[-1:])
        log.close()
    if errors:
        raise RuntimeError(f"tokenize child failed: {errors}")
    return wall


def _parts_vs_one(files: list[str], k: int, tok_path: str, text_column: str, tmp: Path, repeat: int) -> dict:
    """``tokenize --num-parts k`` (k processes at once, then merge) against one process, same corpus."""
    from streamdata.merge import merge_parts

    base = {"source": list(files), "tokenizer": tok_path, "overwrite": True, "text_column": text_column}
    one = [{**base, "out": str(tmp / "one")}]
    parts = [{**base, "out": str(tmp / f"part{i}"), "num_parts": k, "part": i} for i in range(k)]
    t_one = t_parts = t_merge = float("inf")
    for _ in range(repeat):  # taking turns: a busy spell of the machine hits both alike
        t_one = min(t_one, _wall_of_children(one))
        t_parts = min(t_parts, _wall_of_children(parts))
        t0 = time.perf_counter()
        merge_parts([kw["out"] for kw in parts], tmp / "merged", overwrite=True)
        t_merge = min(t_merge, time.perf_counter() - t0)
        print(f"  one {t_one:.1f} s, {k} parts {t_parts:.1f} s, merge {t_merge:.1f} s", flush=True)
    import streamdata

    with streamdata.open_store(tmp / "one") as a, streamdata.open_store(tmp / "merged") as b:
        assert np.array_equal(a.read(0, len(a)), b.read(0, len(b))), "merged parts differ from the single run"
        assert [s.sha256 for s in a.manifest.shards] == [s.sha256 for s in b.manifest.shards]
        n = len(a)
    return {"parts": k, "tokens": n, "seconds_one": t_one, "seconds_parts": t_parts, "seconds_merge": t_merge,
            "speedup_parts": t_one / t_parts, "speedup_parts_and_merge": t_one / (t_parts + t_merge)}


def _scaled_corpus(files: list[str], k: int, folder: Path) -> list[str]:
    """``files`` copied ``k`` times under ``folder`` (one document each, as the stdlib corpus); returns
    a glob for them (a list of ~30k paths would not fit a command line)."""
    for r in range(k):
        d = folder / f"copy{r:02d}"
        d.mkdir(parents=True)
        for i, f in enumerate(files):
            shutil.copyfile(f, d / f"{i:05d}.txt")
    return [str(folder / "copy*" / "*.txt")]


def _huge_document(files: list[str], mb: int, path: Path) -> str:
    """One text file (one document) of ``mb`` MB: the corpus's files concatenated, repeated as needed."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        while n < mb * 1_000_000:
            for src in files:
                t = Path(src).read_text(encoding="utf-8")
                f.write(t)
                n += len(t.encode("utf-8"))
                if n >= mb * 1_000_000:
                    break
    return str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", nargs="*", help="data files (default: the embedded stdlib corpus, --part)")
    ap.add_argument("--part", default="all", choices=("all", "eval", "train"), help="embedded corpus part (default: all)")
    ap.add_argument("--batch-docs", type=int, default=1000,
                    help="the old batching's documents per tokenizer call, for the 'before' row (default: 1000)")
    ap.add_argument("--scale", type=int, default=1, help="also run both 'ours' rows on the corpus repeated this many times")
    ap.add_argument("--huge-mb", type=int, default=0, help="also tokenize one document of this many MB (0: skip)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the project's default BPE)")
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--num-proc", type=int, default=os.cpu_count(), help="processes for the Dataset.map recipe")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--parts", type=int, default=0,
                    help="also time 'tokenize --num-parts K' (K processes at once, then merge) against one process (0: skip)")
    ap.add_argument("--parts-only", action="store_true", help="with --parts: only those rows")
    ap.add_argument("--out", help="folder for a JSON result")
    a = ap.parse_args(argv)
    if a.parts_only and a.parts < 1:
        ap.error("--parts-only needs --parts K (K >= 1)")

    import datasets
    from tokenizers import Tokenizer

    import streamdata
    from streamdata.source import SourceSpec, default_corpus_files, load_source

    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        files = a.source or default_corpus_files(a.part)
        tok_path = a.tokenizer or _default_tokenizer(tmp)
        tok = Tokenizer.from_file(tok_path)
        eos = tok.token_to_id("<|endoftext|>")
        cache = str(tmp / "hf-cache")
        if a.parts_only:
            return _report_parts(_parts_vs_one(files, a.parts, tok_path, a.text_column, tmp, a.repeat), a)
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

        from streamdata.tokenize import DEFAULT_BATCH_BYTES

        old_batching = {"batch_size": a.batch_docs, "batch_bytes": 1 << 62}  # documents alone decide

        def ours(src_files, variants, repeat=a.repeat):
            """``variants``: (output folder, extra settings) pairs, run in turns on ``src_files``."""
            return _ours_in_children([{"source": list(src_files), "tokenizer": tok_path, "out": str(out), "overwrite": True,
                                       "cache_dir": cache, "text_column": a.text_column, **extra} for out, extra in variants],
                                     repeat)

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
        ours_out = tmp / "ours"
        r_ours, r_old = ours(files, [(ours_out, {}), (tmp / "old", old_batching)])
        t_ours, n_ours = r_ours["seconds"], r_ours["tokens"]
        (tmp / "map").mkdir(exist_ok=True)
        t_rec, (n_rec, rec_path) = best_of(recipe, a.repeat)

        # same tokens from every variant
        with streamdata.open_store(ours_out) as s:
            mine = s.read(0, len(s))
        theirs = np.fromfile(rec_path, dtype=np.uint16)
        assert n_tok == n_ours == n_rec and np.array_equal(mine, theirs), "variants disagree on the tokens"

        with streamdata.open_store(tmp / "old") as s:
            assert np.array_equal(s.read(0, len(s)), mine), "old batching gave other tokens"

        ours_name = f"ours, batch_bytes {DEFAULT_BATCH_BYTES / 2**20:g} MiB (default)"
        old_name = f"ours, old batching ({a.batch_docs} docs/call)"
        rows = [
            ("tokenizer encode_batch (limit)", n_tok / t_slow, t_slow, 1.0, "-"),
            ("tokenizer encode_batch_fast", n_tok / t_fast, t_fast, t_slow / t_fast, "-"),
            (ours_name, n_ours / t_ours, t_ours, t_slow / t_ours, f"{r_ours['peak_rss_mib']:,.0f}"),
            (old_name, n_ours / r_old["seconds"], r_old["seconds"], t_slow / r_old["seconds"], f"{r_old['peak_rss_mib']:,.0f}"),
            (f"datasets.map(num_proc={a.num_proc}) + np.memmap", n_rec / t_rec, t_rec, t_slow / t_rec, "-"),
        ]
        extra: dict = {}
        if a.scale > 1:
            big = _scaled_corpus(files, a.scale, tmp / "scaled")
            # one run each: K times the corpus's time
            r_big, r_big_old = ours(big, [(tmp / "big", {}), (tmp / "big-old", old_batching)], repeat=1)
            assert r_big["tokens"] == r_big_old["tokens"] == a.scale * n_tok, "the scaled corpus gave other token counts"
            shutil.rmtree(tmp / "scaled")
            rows += [(f"{ours_name}, corpus x{a.scale}", r_big["tokens"] / r_big["seconds"], r_big["seconds"],
                      t_slow * a.scale / r_big["seconds"], f"{r_big['peak_rss_mib']:,.0f}"),
                     (f"{old_name}, corpus x{a.scale}", r_big_old["tokens"] / r_big_old["seconds"], r_big_old["seconds"],
                      t_slow * a.scale / r_big_old["seconds"], f"{r_big_old['peak_rss_mib']:,.0f}")]
            extra["scaled"] = {"scale": a.scale, "ours": r_big, "old_batching": r_big_old}
        if a.huge_mb:
            huge = _huge_document(files, a.huge_mb, tmp / "huge.txt")
            (r_huge,) = ours([huge], [(tmp / "huge", {})], repeat=1)
            rows.append((f"ours, one {a.huge_mb} MB document", r_huge["tokens"] / r_huge["seconds"], r_huge["seconds"],
                         float("nan"), f"{r_huge['peak_rss_mib']:,.0f}"))
            extra["huge_document"] = {"mb": a.huge_mb, **r_huge}
        if a.parts:
            extra["partitioned"] = _report_parts(_parts_vs_one(files, a.parts, tok_path, a.text_column, tmp, a.repeat),
                                                 None)
        print(table(rows, ["variant", "tok/s", "seconds", "x encode_batch", "peak RSS MiB"]))
        print(f"ours / encode_batch = {t_slow / t_ours:.2f}x   ours / recipe = {t_rec / t_ours:.2f}x   "
              f"ours / old batching = {r_old['seconds'] / t_ours:.2f}x tok/s at {r_ours['peak_rss_mib'] / r_old['peak_rss_mib']:.2f}x "
              f"the peak RSS ({n_tok:,} tokens, best of {a.repeat}, {time.strftime('%Y-%m-%d')})")
        write_json(a.out, "bench_tokenize.json", {
            "tokens": n_tok, "documents": len(texts), "bytes": n_bytes, "repeat": a.repeat,
            "seconds": {"encode_batch": t_slow, "encode_batch_fast": t_fast, "ours": t_ours, "old_batching": r_old["seconds"],
                        "recipe": t_rec},
            "peak_rss_mib": {"ours": r_ours["peak_rss_mib"], "old_batching": r_old["peak_rss_mib"]},
            "batch_bytes": DEFAULT_BATCH_BYTES, "batch_docs_old": a.batch_docs,
            "ratios": {"ours_vs_encode_batch": t_slow / t_ours, "ours_vs_recipe": t_rec / t_ours,
                       "ours_vs_old_batching": r_old["seconds"] / t_ours,
                       "peak_rss_ours_vs_old": r_ours["peak_rss_mib"] / r_old["peak_rss_mib"]},
            **extra, "machine": machine(),
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _report_parts(r: dict, a) -> Any:
    """Print the partitioned rows; with ``a`` (``--parts-only``) also write the JSON and return 0."""
    k = r["parts"]
    print(table([("one process, whole corpus", r["tokens"] / r["seconds_one"], r["seconds_one"], 1.0),
                 (f"{k} part processes at once", r["tokens"] / r["seconds_parts"], r["seconds_parts"], r["speedup_parts"]),
                 (f"{k} parts + merge", r["tokens"] / (r["seconds_parts"] + r["seconds_merge"]),
                  r["seconds_parts"] + r["seconds_merge"], r["speedup_parts_and_merge"])],
                ["variant", "tok/s", "wall s", "x one process"]))
    print(f"{k} parts at once / one process = {r['speedup_parts']:.2f}x wall clock ({r['speedup_parts_and_merge']:.2f}x "
          f"with the merge; {r['tokens']:,} tokens, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')})")
    if a is None:
        return r
    write_json(a.out, "bench_tokenize.json", {"partitioned": r, "repeat": a.repeat, "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
