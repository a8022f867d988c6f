"""``streamdata`` command line: a thin layer over the Python API.

    streamdata tokenize SOURCE... --tokenizer T --out DIR [options]
    streamdata tokenize SOURCE... --ids-column COL --vocab-size V --out DIR [options]
    streamdata info STORE [--json]
    streamdata show STORE --doc N [--tokenizer PATH] [--ids]
    streamdata verify STORE
    streamdata convert SRC DST [--format npy|zarr] [options]
    streamdata export SRC --to megatron|nanogpt|litdata OUT [options]
    streamdata merge PART... --out DIR [--format npy|zarr] [options]

Exit codes: 0 success; 1 ``verify`` found defects; 2 bad input (one line on stderr); 130 interrupted;
141 stdout closed early (``| head``: no traceback, no message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import StreamdataError, SuggestingParser, cli_flags, in_cli_terms
from .format import LEGACY_WORD_RULE, WORD_RULE, WORD_RULES, word_rule_of

__all__ = ["main", "quiet_datasets"]


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo`` (underscores allowed: 1_000_000)."""
    def parse(text: str) -> int:
        try:
            v = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{text!r} must be >= {lo}")
        return v
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


def _import_options(p: argparse.ArgumentParser) -> None:
    """The options of a source that is existing token files (convert, export)."""
    from .backends.raw_bin import RAW_DTYPES

    g = p.add_argument_group("imports (raw .bin / Megatron / datatrove / LitData source)")
    g.add_argument("--dtype", choices=RAW_DTYPES, help=f"raw .bin element type (default {RAW_DTYPES[0]})")
    g.add_argument("--eos-id", type=int, help="raw .bin: split documents after each occurrence of this id")
    g.add_argument("--vocab-size", type=_positive, help="vocabulary size to record (enables the id < vocab check)")
    g.add_argument("--documents", choices=("document", "sequence"), help="Megatron: documents from the document index or one per sequence")


@contextmanager
def _source(a: argparse.Namespace) -> Iterator[Any]:
    """``a.src`` as a path, or opened with the import options given (and closed after the block)."""
    from .backends import open_token_files

    imports = {k: v for k, v in (("dtype", a.dtype), ("eos_id", a.eos_id), ("vocab_size", a.vocab_size),
                                 ("documents", a.documents)) if v is not None}
    src = open_token_files(a.src, **imports) if imports else a.src
    try:
        yield src
    finally:
        if not isinstance(src, str):
            src.close()


def build_parser() -> argparse.ArgumentParser:
    # defaults and choices come from the library's one place for each (config dataclasses, constants)
    from .backends.zarr import COMPRESSIONS
    from .convert import ConvertConfig
    from .format import STORE_FORMATS
    from .source import SAMPLE_BY
    from .tokenize import TokenizeConfig as T

    C = ConvertConfig
    p = SuggestingParser(prog="streamdata", description="Tokenize datasets once into memory-mapped token stores; inspect and verify stores.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("tokenize", help="tokenize a dataset into a store",
                       description="Tokenize a Hugging Face dataset (hub id, local files/globs, or a save_to_disk folder) "
                                   "into a token store. Interrupted runs resume when the same command is run again.")
    t.add_argument("source", nargs="+", metavar="SOURCE", help="hub dataset id, data files/globs (json, jsonl, parquet, csv, tsv, txt), or a save_to_disk folder")
    t.add_argument("--tokenizer", help="tokenizer.json path, a folder holding one, a hub id, or 'default' (the bundled 4096-entry BPE); "
                                       "required unless --ids-column")
    t.add_argument("--out", required=True, help="output store folder")
    t.add_argument("--config", dest="config_name", help="dataset configuration name (hub datasets)")
    t.add_argument("--split", help="split to tokenize (default: the only split, or 'train' for data files)")
    t.add_argument("--revision", help="dataset revision (hub datasets)")
    t.add_argument("--text-column", default=T.text_column, help=f"column holding the document text (default: {T.text_column})")
    t.add_argument("--ids-column", metavar="COL",
                   help="column already holding token ids (lists of integers, e.g. input_ids): stored as they are, one "
                        "document per row, without a tokenizer (no EOS/BOS added; needs --vocab-size). The store has no "
                        "byte or word counts: bits per byte and word perplexity are reported as unavailable")
    t.add_argument("--vocab-size", type=_positive, help="with --ids-column: the vocabulary the ids come from (picks uint16/uint32; "
                                                       "every id is checked against it)")
    t.add_argument("--sample-by", default=T.sample_by, choices=SAMPLE_BY,
                   help=f"plain-text files: one document per file, paragraph or line; blank (empty or whitespace-only) "
                        f"lines and paragraphs are skipped (default: {T.sample_by})")
    t.add_argument("--streaming", action="store_true", help="stream the dataset (IterableDataset) instead of materialising it")
    t.add_argument("--max-docs", type=_positive, help="stop after this many documents")
    t.add_argument("--max-tokens", type=_positive, help="stop after the document that brings the total to this many tokens")
    t.add_argument("--shard-tokens", type=_positive, default=T.shard_tokens, help=f"tokens per shard file, closed at a document boundary (default: {T.shard_tokens})")
    t.add_argument("--eos", default=T.eos, help=f"EOS appended to every document: auto (the tokenizer's, if any), none, or a token (default: {T.eos})")
    t.add_argument("--bos", default=T.bos, help=f"BOS prepended to every document: none, auto, or a token (default: {T.bos})")
    t.add_argument("--batch-bytes", type=_positive, default=T.batch_bytes,
                   help=f"UTF-8 bytes of text per tokenizer call, whole documents only (default: {T.batch_bytes:,}); the peak "
                        "memory grows by about 100 MB per MB of it. A document larger than this is encoded alone, at about 130x its size "
                        "(one 50 MB document: 6.3 GB peak): split huge documents beforehand (e.g. --sample-by paragraph)")
    t.add_argument("--batch-size", type=_positive, default=T.batch_size, metavar="DOCS",
                   help="also at most DOCS documents per tokenizer call (default: no limit, --batch-bytes decides)")
    t.add_argument("--format", default=T.format, choices=STORE_FORMATS, help=f"store format (default: {T.format})")
    t.add_argument("--compression", default=T.compression, choices=COMPRESSIONS, help=f"zarr only: codec per inner chunk (default: {T.compression})")
    t.add_argument("--overwrite", action="store_true",
                   help="replace a finished store of ours (built beside it, swapped in only when complete) or restart an unfinished build")
    t.add_argument("--cache-dir", help="datasets cache folder to keep the Arrow copy of local files in (default: a temporary one, removed at exit)")
    t.add_argument("--num-parts", type=_positive, metavar="K",
                   help="tokenize only one of K contiguous parts of the source (with --part; then 'streamdata merge' "
                        "the K part folders): local files are cut at file boundaries, balanced by size, saved/hub datasets by row")
    t.add_argument("--part", type=_non_negative, metavar="I", help="which part to tokenize, 0 to K-1 (with --num-parts)")
    t.add_argument("--quiet", action="store_true", help="no progress bars (ours and the datasets library's)")

    i = sub.add_parser("info", help="summarise a store", description="Print a human summary of a store (or JSON with --json).")
    i.add_argument("store", help="store folder or URL (or raw .bin / Megatron / datatrove .ds files, a LitData folder)")
    i.add_argument("--json", action="store_true", help="print the manifest and derived figures as JSON")

    sh = sub.add_parser("show", help="print one document's text (or ids), token count and source",
                        description="Print document N of a store: a header line (its token count and its source: "
                                    "the file and row, or the dataset row, that tokenize recorded) and its text, "
                                    "decoded with the store's tokenizer without the BOS/EOS ids its policy added.")
    sh.add_argument("store", help="store folder or URL (or raw .bin / Megatron / datatrove .ds files, a LitData folder)")
    sh.add_argument("--doc", type=int, required=True, metavar="N", help="document number, 0 to documents - 1")
    sh.add_argument("--tokenizer", metavar="PATH",
                    help="tokenizer.json (or a folder holding one) to decode with; default: the one the manifest "
                         "names, when it is a local file here; it must match the store's recorded tokenizer")
    sh.add_argument("--ids", action="store_true", help="print the token ids (BOS/EOS included) instead of the text")

    v = sub.add_parser("verify", help="check checksums, token ids and the document index",
                       description="Verify a store: shard checksums, ids < vocab size, document index consistency. "
                                   "Exit 1 and list every defect if any is found.")
    v.add_argument("store", help="store folder or URL (or raw .bin / Megatron / datatrove .ds files, a LitData folder)")

    c = sub.add_parser("convert", help="convert a store or existing token files into npy or zarr",
                       description="Copy any store (npy, zarr, a URL) or existing token files (nanoGPT raw .bin, "
                                   "Megatron-LM .bin/.idx, datatrove .ds, a LitData TokensLoader folder) into our npy "
                                   "or zarr format, with identical tokens and documents. Reruns resume.")
    c.add_argument("src", help="store folder or URL, raw .bin file, Megatron prefix/.idx/.bin, datatrove .ds file or "
                               "folder, or LitData folder")
    c.add_argument("dst", help="output folder (zarr: also an fsspec URL)")
    c.add_argument("--format", default=C.format, choices=STORE_FORMATS, help=f"output format (default: {C.format})")
    c.add_argument("--compression", default=C.compression, choices=COMPRESSIONS, help="zarr only")
    c.add_argument("--overwrite", action="store_true", help="replace a finished store of ours (swapped in only when complete)")
    c.add_argument("--shard-tokens", type=_positive, default=C.shard_tokens, help=f"npy output: tokens per shard file (default: {C.shard_tokens})")
    c.add_argument("--chunk-tokens", type=_positive, default=C.chunk_tokens, help=f"zarr output: ids per inner chunk (default: {C.chunk_tokens})")
    _import_options(c)

    from .export import EXPORT_FORMATS, ExportConfig

    x = sub.add_parser("export", help="write a store as Megatron, nanoGPT or LitData token files",
                       description="Write any store or existing token files into the files another trainer reads: "
                                   "--to megatron (OUT/tokens.bin + .idx, one sequence per document), nanogpt "
                                   "(OUT/train.bin, uint16 ids) or litdata (OUT/index.json + chunk-0-K.bin, one item "
                                   "per document, for StreamingDataset with TokensLoader). OUT also holds "
                                   "streamdata-export.json, which marks it as ours; the tools ignore it.")
    x.add_argument("src", help="store folder or URL, raw .bin file, Megatron prefix/.idx/.bin, datatrove .ds file or "
                               "folder, or LitData folder")
    x.add_argument("--to", required=True, choices=EXPORT_FORMATS, help="target format")
    x.add_argument("out", help="output folder (local)")
    x.add_argument("--overwrite", action="store_true", help="replace a finished export of ours (swapped in only when complete)")
    x.add_argument("--chunk-bytes", type=_positive, default=ExportConfig.chunk_bytes,
                   help=f"litdata: id bytes per chunk file at most (default: {ExportConfig.chunk_bytes}, LitData's)")
    _import_options(x)

    mg = sub.add_parser("merge", help="join the parts of 'tokenize --num-parts K' into one store",
                        description="Join the K part stores of a partitioned tokenize (given in any order) into one "
                                    "store equal to a single tokenize of the whole source: same tokens, document "
                                    "index, counts and checksums. Refuses parts of different runs or settings, "
                                    "duplicate, missing or unfinished parts. Reruns resume.")
    mg.add_argument("parts", nargs="+", metavar="PART", help="the --out folders of 'tokenize --num-parts K --part I', I = 0..K-1")
    mg.add_argument("--out", required=True, help="output store folder (not one of the parts)")
    mg.add_argument("--format", choices=STORE_FORMATS, help="output format (default: the parts' format)")
    mg.add_argument("--compression", choices=COMPRESSIONS, help="zarr output: codec per inner chunk (default: the parts', else none)")
    mg.add_argument("--shard-tokens", type=_positive,
                    help="npy output: tokens per shard file (default: the parts' own, which gives the shard checksums of a single run)")
    mg.add_argument("--overwrite", action="store_true", help="replace a finished store of ours (swapped in only when complete)")
    return p


def _cmd_tokenize(a: argparse.Namespace) -> int:
    from .tokenize import TokenizeConfig, run_tokenize

    if a.quiet or not sys.stderr.isatty():
        quiet_datasets()

    cfg = TokenizeConfig(
        source=a.source, tokenizer=a.tokenizer, out=a.out, config_name=a.config_name, split=a.split,
        revision=a.revision, text_column=a.text_column, streaming=a.streaming, sample_by=a.sample_by,
        max_docs=a.max_docs, max_tokens=a.max_tokens, shard_tokens=a.shard_tokens, eos=a.eos, bos=a.bos,
        batch_bytes=a.batch_bytes, batch_size=a.batch_size, overwrite=a.overwrite, cache_dir=a.cache_dir, progress=not a.quiet,
        format=a.format, compression=a.compression, num_parts=a.num_parts, part=a.part,
        ids_column=a.ids_column, vocab_size=a.vocab_size,
    )
    t0 = time.perf_counter()
    r = run_tokenize(cfg)
    dt = time.perf_counter() - t0
    m, tot = r.manifest, r.manifest.totals
    head = f"{a.out}: {tot['tokens']:,} tokens, {tot['documents']:,} documents, {len(m.shards)} shard(s), dtype {m.dtype}"
    if a.num_parts is not None:
        head += f", part {a.part} of {a.num_parts}"
    if r.already_complete:  # nothing was tokenized: no rate to report
        print(f"{head} (already complete with these settings: nothing to do; --overwrite rebuilds it)")
    elif r.tokens_before:  # a rate counts this run's tokens only, not those an interrupted run wrote
        print(f"{head} (resumed after {r.tokens_before:,} tokens; this run: {r.tokens_this_run:,} tokens in "
              f"{dt:.1f} s, {r.tokens_this_run / max(dt, 1e-9):,.0f} tok/s)")
    else:
        print(f"{head} ({dt:.1f} s, {r.tokens_this_run / max(dt, 1e-9):,.0f} tok/s)")
    return 0


def _disk_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def _cmd_info(a: argparse.Namespace) -> int:
    from .backends import open_store

    with open_store(a.store) as s:
        m = s.manifest
        tot = m.totals
        derived = {
            "disk_bytes": _disk_bytes(a.store) if os.path.isdir(a.store) else None,
            "tokens_per_document": tot["tokens"] / max(1, tot["documents"]),
            "bytes_per_token": (tot.get("bytes", 0) / tot["tokens"]) if tot["tokens"] else None,
            "word_rule": word_rule_of(m),  # recorded, or what a store without the field used
        }
        if a.json:
            d = json.loads(m.to_json())
            d["derived"] = derived
            print(json.dumps(d, indent=2, sort_keys=True))
            return 0
        tk, sp, src = m.tokenizer, m.special_tokens, m.source
        rows = [
            ("store", f"{s.path} (format {m.format} v{m.format_version})"),
            ("tokens", f"{tot['tokens']:,} ({m.dtype})"),
            ("documents", f"{tot['documents']:,} ({derived['tokens_per_document']:,.1f} tokens/doc)"),
            ("text", f"{tot.get('bytes', 0):,} UTF-8 bytes, {tot.get('words', 0):,} words"
                     + (f", {derived['bytes_per_token']:.2f} bytes/token" if derived["bytes_per_token"] else "")),
            ("words", _describe_word_rule(m)),
            ("shards", f"{len(m.shards)}" + (f", {derived['disk_bytes'] / 2**20:,.1f} MiB on disk" if derived["disk_bytes"] else "")),
            ("tokenizer", f"{tk.get('name')} (vocab {tk.get('vocab_size')}, sha256 {str(tk.get('sha256'))[:12]})"),
            ("special", f"bos={sp.get('bos')} ({sp.get('bos_token')}), eos={sp.get('eos')} ({sp.get('eos_token')})"),
            ("source", _describe_source(src)),
            ("sources", "per document: file and row (see 'streamdata show STORE --doc N')" if s.doc_sources is not None
             else "per document: not recorded"),
        ]
        w = max(len(k) for k, _ in rows)
        for k, val in rows:
            print(f"{k:<{w}}  {val}")
    return 0


def _describe_word_rule(m) -> str:
    rule = word_rule_of(m)
    if rule is None:
        return "not counted (no word perplexity from this store)"
    text = f"{rule} rule: {WORD_RULES[rule]}"
    if rule == LEGACY_WORD_RULE and m.word_rule is None:
        text += (f"; written before the rule was recorded, so its word perplexity is not lm-eval's "
                 f"(re-tokenize to count by the {WORD_RULE} rule)")
    return text


def _describe_source(src: dict) -> str:
    kind = src.get("kind")
    if kind == "hub":
        parts = [src.get("id")] + [f"{k}={src[k]}" for k in ("config", "split", "revision") if src.get(k)]
        return "hub " + " ".join(str(p) for p in parts)
    if kind == "files":
        files = src.get("files", [])
        first = Path(files[0]["path"]).name if files else "?"
        return f"{len(files)} {src.get('builder')} file(s) ({first}{', ...' if len(files) > 1 else ''}), column {src.get('text_column')!r}"
    if kind == "saved":
        return f"saved dataset {src.get('path')} split={src.get('split')}"
    if kind == "default":  # records the number of files, not their list
        return f"embedded corpus {src.get('id')} ({src.get('files')} standard-library files of Python {src.get('python')})"
    imported = _describe_import(src)
    return imported if imported is not None else json.dumps(src)[:120]


def _describe_import(src: dict) -> str | None:
    """The source row of a store read in place from another tool's files: what they are, the dtype
    the ids were read as and where it came from (given, recorded, or assumed), and what a document is."""
    kind, files = src.get("kind"), src.get("files") or []
    first = Path(files[0]["path"]).name if files else "?"
    if kind == "raw-bin":
        how = src.get("dtype_from", "given by the caller")
        head = f"raw .bin {first}: {src.get('dtype')} ids, dtype {how}"
        if how != "given by the caller":
            head += "; 32-bit ids: open_raw_bin(path, dtype='uint32') or convert --dtype uint32"
        return f"{head}; documents: {src.get('documents')}"
    if kind == "megatron":
        return (f"Megatron-LM {Path(src.get('prefix', '?')).name}.bin/.idx: {src.get('file_dtype')} ids (recorded in the .idx); "
                f"documents: {src.get('documents')} ({src.get('sequences')} sequences)")
    if kind == "datatrove":
        ds = [f for f in files if f["path"].endswith(".ds")]
        where = ds[0]["path"] if len(ds) == 1 else f"{src.get('path')} ({len(ds)} .ds files)"
        return (f"datatrove {Path(where).name if len(ds) == 1 else where}: {src.get('file_dtype')} ids (token size "
                f"{src.get('token_size')} from {' / '.join(src.get('token_size_from', []))}); documents: {src.get('documents')}")
    if kind == "litdata":
        return (f"LitData {src.get('path')} ({len(files) - 1} chunk(s), {src.get('data_format')}): {src.get('file_dtype')} "
                f"ids (recorded in index.json); documents: {src.get('documents')} ({src.get('items')} items)")
    return None


def _cmd_show(a: argparse.Namespace) -> int:
    from .show import show_document

    d = show_document(a.store, a.doc, tokenizer=a.tokenizer, ids_only=a.ids)
    print(d.header())
    if a.ids:
        print(" ".join(str(int(x)) for x in d.ids))
    else:
        sys.stdout.write(d.text if d.text.endswith("\n") else d.text + "\n")
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from .verify import verify_store

    r = verify_store(a.store)
    for n in r.notes:  # not defects: e.g. a version-1 store's index has no checksum to check
        print(f"{a.store}: note: {n}")
    if r.ok:
        print(f"{a.store}: OK ({r.checked_tokens:,} tokens, {r.checked_documents:,} documents checked)")
        return 0
    for d in r.defects:
        print(f"{a.store}: DEFECT: {d}")
    print(f"{a.store}: {len(r.defects)} defect(s) found", file=sys.stderr)
    return 1


def _cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert_store

    t0 = time.perf_counter()
    with _source(a) as src:
        m = convert_store(src, a.dst, format=a.format, compression=a.compression, overwrite=a.overwrite,
                          shard_tokens=a.shard_tokens, chunk_tokens=a.chunk_tokens)
    print(f"{a.dst}: {m.num_tokens:,} tokens, {m.num_documents:,} documents, format {m.format} "
          f"({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_export(a: argparse.Namespace) -> int:
    from .export import export_store

    t0 = time.perf_counter()
    with _source(a) as src:
        r = export_store(src, a.out, a.to, overwrite=a.overwrite, chunk_bytes=a.chunk_bytes)
    print(f"{a.out}: {r.tokens:,} tokens, {r.documents:,} documents as {r.to} ({r.dtype}); give the tool "
          f"{r.data_path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_merge(a: argparse.Namespace) -> int:
    from .merge import MergeConfig, merge_parts

    cfg = MergeConfig(parts=a.parts, out=a.out, format=a.format, compression=a.compression,
                      shard_tokens=a.shard_tokens, overwrite=a.overwrite)
    t0 = time.perf_counter()
    m = merge_parts(cfg)
    print(f"{a.out}: {m.num_tokens:,} tokens, {m.num_documents:,} documents from {len(a.parts)} part(s), "
          f"format {m.format} ({time.perf_counter() - t0:.1f} s)")
    return 0


def stdout_closed() -> int:
    """stdout's reader went away (``streamdata info --json | head``): no traceback and no message,
    as shell tools do; stdout is pointed at /dev/null so the interpreter's final flush cannot fail
    again. Returns 141 (128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def quiet_datasets() -> None:
    """No progress bars from datasets ("Generating train split", "Map"): with --quiet, and whenever
    stderr is a pipe or a log file, where a bar is a line of noise per refresh."""
    try:
        from datasets.utils.logging import disable_progress_bar
    except ImportError:
        return
    disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = {"tokenize": _cmd_tokenize, "info": _cmd_info, "show": _cmd_show, "verify": _cmd_verify, "convert": _cmd_convert,
           "export": _cmd_export, "merge": _cmd_merge}[args.command]
    try:
        rc = cmd(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return rc
    except BrokenPipeError:
        return stdout_closed()
    except StreamdataError as e:
        print(f"streamdata: error: {in_cli_terms(str(e), cli_flags(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("streamdata: interrupted (finished shards are kept: rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
