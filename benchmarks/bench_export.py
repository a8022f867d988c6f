"""Tokenize here and export to LitData vs LitData's own tokenization path, on the same corpus and tokenizer.

    python -m benchmarks.bench_export [--source FILES...] [--part all] [--tokenizer T] [--repeat 2]
                                      [--num-workers N] [--out DIR]

Rows (one run, the two taking turns ``--repeat`` times, min wall time of each):
- ours:    ``streamdata tokenize`` (``run_tokenize``, default settings, a fresh Arrow cache each time:
           the text files are read as a user's first run reads them) then ``export_store(...,
           to="litdata")``, end to end: a LitData folder StreamingDataset reads with TokensLoader;
- litdata: ``litdata.optimize(fn=tokenize, inputs=files, item_loader=TokensLoader(), chunk_bytes=64 MiB,
           num_workers=N)`` where ``tokenize(path)`` returns the same ids (the tokenizer's ids of the
           file's text, then EOS) as a uint16 array: LitData's own tokenization path. Run only when
           litdata imports; otherwise its row says "litdata not installed".
Both outputs hold the same documents (checked: the same multiset of per-document id arrays; LitData's
workers may reorder items). Defaults: the embedded corpus (``stdlib:all``) and the bundled tokenizer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ._util import machine, table, write_json
from .bench_tokenize import _default_tokenizer


class _TokenizeFile:
    """LitData's ``fn``: one file's text -> its ids + EOS (a picklable callable for optimize's workers)."""

    def __init__(self, tok_path: str, eos: int):
        self.tok_path, self.eos, self.tok = tok_path, eos, None

    def __call__(self, path: str) -> np.ndarray:
        if self.tok is None:
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(self.tok_path)
        text = Path(path).read_text(encoding="utf-8")
        return np.array(self.tok.encode(text, add_special_tokens=False).ids + [self.eos], dtype=np.uint16)


def _documents(folder: str) -> list[bytes]:
    """Each document of an export (our reader) as bytes, sorted: order-free comparison."""
    import streamdata

    with streamdata.open_store(folder) as s:
        ids, off = s.read(0, len(s)), np.asarray(s.doc_offsets)
    return sorted(ids[a:b].astype("<u2").tobytes() for a, b in zip(off[:-1], off[1:]))


def run(files: list[str], tok_path: str, tmp: Path, repeat: int, num_workers: int) -> dict:
    from tokenizers import Tokenizer

    from streamdata import export_store
    from streamdata.export import LITDATA_CHUNK_BYTES
    from streamdata.tokenize import run_tokenize

    eos = Tokenizer.from_file(tok_path).token_to_id("<|endoftext|>")
    try:
        import litdata
    except ImportError:
        litdata = None

    def ours() -> int:
        shutil.rmtree(tmp / "hf-cache", ignore_errors=True)  # end to end: the text is read each time
        r = run_tokenize(source=list(files), tokenizer=tok_path, out=str(tmp / "store"), overwrite=True,
                         cache_dir=str(tmp / "hf-cache"), progress=False)
        return export_store(tmp / "store", tmp / "ours", "litdata", overwrite=True).tokens if r else 0

    def theirs() -> None:
        litdata.optimize(fn=_TokenizeFile(tok_path, eos), inputs=list(files), output_dir=str(tmp / "theirs"),
                         item_loader=litdata.TokensLoader(), chunk_bytes=LITDATA_CHUNK_BYTES, num_workers=num_workers,
                         mode="overwrite")

    t_ours = t_theirs = float("inf")
    tokens = 0
    for _ in range(repeat):  # taking turns: a busy spell of the machine hits both alike
        t0 = time.perf_counter()
        tokens = ours()
        t_ours = min(t_ours, time.perf_counter() - t0)
        if litdata is not None:
            t0 = time.perf_counter()
            theirs()
            t_theirs = min(t_theirs, time.perf_counter() - t0)
    res = {"documents": len(files), "tokens": tokens, "seconds_ours": t_ours,
           "litdata": getattr(litdata, "__version__", None), "seconds_litdata": None, "speedup": None}
    if litdata is not None:
        assert _documents(str(tmp / "ours")) == _documents(str(tmp / "theirs")), "the two exports hold other documents"
        res.update(seconds_litdata=t_theirs, speedup=t_theirs / t_ours)
    return res


def report(res: dict, num_workers: int) -> str:
    n = res["tokens"]
    rows = [["streamdata tokenize + export --to litdata", res["seconds_ours"], n / res["seconds_ours"], "1.00x"]]
    if res["seconds_litdata"] is None:
        rows.append(["litdata optimize(fn=tokenize, TokensLoader())", "litdata not installed", "-", "-"])
    else:
        rows.append([f"litdata {res['litdata']} optimize(fn=tokenize, TokensLoader(), num_workers={num_workers})",
                     res["seconds_litdata"], n / res["seconds_litdata"], f"{res['speedup']:.2f}x"])
    return table(rows, ["path", "seconds", "tokens/s", "time vs ours"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", nargs="*", help="text files, one document each (default: the embedded corpus, --part)")
    ap.add_argument("--part", default="all", choices=("all", "eval", "train"), help="embedded corpus part (default: all)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the project's default BPE)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=os.cpu_count(), help="LitData optimize workers (default: CPUs)")
    ap.add_argument("--out", help="folder for a JSON result")
    a = ap.parse_args(argv)
    from streamdata.cli import quiet_datasets
    from streamdata.source import default_corpus_files

    quiet_datasets()  # a bar per refresh would bury the table

    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        files = a.source or default_corpus_files(a.part)
        tok_path = a.tokenizer or _default_tokenizer(tmp)
        res = run(files, tok_path, tmp, a.repeat, a.num_workers)
        print(f"{res['documents']:,} documents, {res['tokens']:,} tokens, {os.cpu_count()} CPUs")
        print(report(res, a.num_workers))
        write_json(a.out, "export.json", {"result": res, "machine": machine()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
