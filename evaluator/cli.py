"""``streameval`` command line: a thin layer over :class:`evaluator.StreamingEvaluator`.

    streameval run STORE --model M [--chunk-size N] [--overlap N] [--mode M] [--batch-size N|auto]
                   [--device D] [--dtype T] [--max-tokens N] [--out DIR [--checkpoint-interval S] [--overwrite]]
    streameval demo [--out DIR] [--full | --max-tokens N]
    streameval compare STORE --model CANDIDATE --reference REFERENCE [--reference-device D] [run's options]

With ``--out DIR`` a run is crash-safe: DIR is a run folder (evaluator/run_folder.py: ours by its
marker, locked, checksummed) that keeps a checkpoint (evaluator/checkpoint.py), and the same command
resumes after a crash; the report files appear only when the run is complete.

Under torchrun (``torchrun --nproc-per-node N -m evaluator run ...``) N processes share the run
(evaluator/distributed.py); rank 0 prints the table and writes the report.

Exit codes: 0 success; 2 bad input (one line on stderr); 130 interrupted; 141 stdout closed early (``| head``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Sequence

from streamdata.cli import stdout_closed
from streamdata.errors import StreamdataError, SuggestingParser, cli_flags, in_cli_terms
from streamdata.windows import DOC_MODES, TAILS

from .errors import EvaluatorError
from .progress import quiet_library_bars

__all__ = ["main", "demo_size", "DEMO_FULL_TOKENS", "DEMO_CPU_TOKENS"]

# The demo's sizes, in tokens of the stream (N tokens score N - 1 targets: the first has no context).
#: the full-size demo, and the default wherever the model runs on an accelerator: 1,000,000 scored targets
DEMO_FULL_TOKENS = 1_000_001
#: the default on a CPU: a real evaluation (250,000 scored targets, 326 chunks of 1024) that takes
#: under half a minute on a quiet 2-core machine and about 3 minutes on one loaded 4x over (measured
#: 2026-12-06, 2 cores: 28k tok/s quiet; 1.8k tok/s at load average 8, where the full size takes 9 min)
DEMO_CPU_TOKENS = 250_001


def _int_or_none(text: str) -> int | None:
    if text in ("model", "auto", "none"):
        return None
    try:
        v = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (or 'model')") from None
    return v


def _int(text: str) -> int:
    try:
        return int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _batch(text: str) -> int | str:
    return "auto" if text == "auto" else _int(text)


def _device_map(text: str) -> str | dict:
    from .config import DEVICE_MAPS

    if text in DEVICE_MAPS:
        return text
    try:
        m = json.loads(text)
    except ValueError:
        m = None
    if not isinstance(m, dict) or not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not {', '.join(DEVICE_MAPS)} or a JSON object "
                                         "such as '{\"model.embed_tokens\": 0, \"model.layers.0\": 1}'")
    return m


def _bos(text: str) -> int | str:
    return text if text in ("none", "model", "eos") else _int(text)


def _add_eval_options(p: argparse.ArgumentParser, *, chunk_default: Any, overlap_default: int, overlap_why: str,
                      compare: bool = False) -> None:
    p.add_argument("--chunk-size", type=_int_or_none, default=chunk_default,
                   help="window length L in tokens, or 'model': the model's context length (default: model)")
    p.add_argument("--overlap", type=_int, default=overlap_default,
                   help=f"sliding mode: context tokens each window re-reads (default: %(default)s; {overlap_why})")
    p.add_argument("--tail", default="full", choices=TAILS,
                   help="sliding mode: each stream's (document's) last window: full = right-aligned, a whole "
                        "chunk of context, as lm-evaluation-harness; short = cut at the stream's end (default: full)")
    p.add_argument("--mode", default="auto", choices=("auto", "sliding", "stateful", "kv-cache"),
                   help="how context crosses windows (default: auto)")
    p.add_argument("--doc-mode", default="stream", choices=DOC_MODES,
                   help="stream: one concatenated stream; document: each document on its own (default: stream)")
    p.add_argument("--batch-size", type=_batch, default="auto",
                   help="windows per forward in sliding mode; documents side by side (each with its own state or "
                        "cache) in stateful/kv-cache mode with --doc-mode document (1 in stream mode); or auto: the "
                        "run's first forwards try sizes within the memory bound and keep the fastest (default: auto)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    if not compare:  # (compare: each model whole on one device)
        p.add_argument("--device-map", type=_device_map, metavar="MAP",
                       help="spread a model loaded by name over devices (needs accelerate): auto, balanced, "
                            "balanced_low_0, sequential, or a JSON object {module: device}; windows go to its first device")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="autocast dtype")
    if not compare:  # (compare runs both models eager)
        p.add_argument("--compile", nargs="?", const="default", default=None, choices=("default", "reduce-overhead"),
                       metavar="MODE", help="sliding mode: torch.compile the model body with static shapes (every batch padded "
                            "to [batch size, chunk size], the padding unscored); reduce-overhead adds CUDA graphs. Equal to "
                            "eager within the dtype's rounding. MODE: default (when omitted) or reduce-overhead (default: eager)")
    p.add_argument("--max-tokens", type=_int, help="evaluate only the stream's first N tokens")
    p.add_argument("--bos", type=_bos, default="none", help="BOS prefix: none, model, eos, or a token id")
    if not compare:  # (compare: --per-token-kl)
        p.add_argument("--per-token", action="store_true", help="write per-token losses (float32) to OUT/per_token_losses.f32")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar or lines")
    p.add_argument("--checkpoint-interval", type=float, default=60.0, metavar="SECONDS",
                   help="with --out: seconds between checkpoints, at batch boundaries (default: %(default)g); "
                        "0: only the final one. Rerunning the same command resumes an interrupted run")
    if not compare:  # (compare runs in one process)
        p.add_argument("--split-warmup", type=_int, metavar="K",
                       help="under torchrun with --doc-mode stream in stateful/kv-cache mode: approximate by restarting "
                            "the state at each process's block after K unscored tokens of warm-up (recorded in the "
                            "results; otherwise refused: use --doc-mode document for exact splits)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out: remove this tool's checkpoint and report files there (no others; a "
                        "folder streameval did not create is refused with or without it)")


def build_parser() -> argparse.ArgumentParser:
    p = SuggestingParser(prog="streameval", description="Stream-evaluate a language model on a token store of any length.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="evaluate a model on a store", description="Evaluate MODEL on STORE window by window; "
                       "print a results table and write results.json, CSV tables and PNG plots to --out.")
    r.add_argument("store", help="store folder or URL (or raw .bin / Megatron / datatrove .ds files, a LitData folder)")
    r.add_argument("--model", required=True,
                   help="'default' (bundled), a transformers folder or hub id, or package.module:factory")
    r.add_argument("--out", default=None, help="report folder (default: none written)")
    r.add_argument("--no-check-tokenizer", dest="check_tokenizer", action="store_false",
                   help="evaluate even when the store's tokenizer differs from the model's (by default refused when "
                        "both are known; compared by what decides the ids)")
    _add_eval_options(r, chunk_default=None, overlap_default=0, overlap_why="demo's is 256")
    d = sub.add_parser("demo", help="the main job on the embedded default: tokenize the stdlib, evaluate the bundled model",
                       description="Tokenize the running Python's standard library (stdlib:eval) with the bundled tokenizer "
                                   "into OUT/store (reused if already there), then stream-evaluate the bundled model "
                                   f"on its first tokens and write the report to OUT. Its size: {DEMO_FULL_TOKENS:,} "
                                   f"tokens (one million scored targets), or {DEMO_CPU_TOKENS:,} when the model runs on "
                                   "a CPU (--full: the full size there too; --max-tokens N: N). No network needed.")
    d.add_argument("--out", default="runs/demo", help="output folder (default: %(default)s)")
    d.add_argument("--full", action="store_true",
                   help=f"the full size, {DEMO_FULL_TOKENS:,} tokens, also on a CPU (default there: {DEMO_CPU_TOKENS:,})")
    _add_eval_options(d, chunk_default=None, overlap_default=256, overlap_why="run's is 0")
    c = sub.add_parser("compare", help="compare a model with a reference on a store: KL divergence, top-1 agreement, "
                       "both perplexities", description="Run CANDIDATE (--model) and REFERENCE on the same windows of "
                       "STORE; per scored token compute KL(reference || candidate), both NLLs and whether the top-1 "
                       "predictions agree, on the device (no logits written); print a table and write results.json, "
                       "CSV tables and plots (KL by position, KL histogram) to --out.")
    c.add_argument("store", help="store folder or URL (or raw .bin / Megatron / datatrove .ds files, a LitData folder)")
    c.add_argument("--model", required=True, help="the candidate (e.g. a quantized model): as run's --model")
    c.add_argument("--reference", required=True, help="the reference (e.g. the original model): as --model")
    c.add_argument("--reference-device", help="device of the reference (default: --device); its log-probabilities "
                                              "are copied to --device one loss slice at a time")
    c.add_argument("--allow-vocab-prefix", action="store_true",
                   help="models whose vocabulary sizes differ: compare KL and top-1 over the shared first ids (the "
                        "smaller vocabulary must be a prefix of the larger; refused otherwise)")
    c.add_argument("--per-token-kl", metavar="PATH",
                   help="write the per-token KL (float32, raw) to PATH (default: OUT/per_token_kl.f32 with --out, "
                        "else a temporary file, removed)")
    c.add_argument("--out", default=None, help="report folder (default: none written)")
    c.add_argument("--no-check-tokenizer", dest="check_tokenizer", action="store_false",
                   help="compare even when the models' or the store's tokenizers differ (by default refused when known)")
    _add_eval_options(c, chunk_default=None, overlap_default=0, overlap_why="as run's", compare=True)
    return p


def _config(a: argparse.Namespace):
    from .config import StreamingEvalConfig
    from .run_folder import per_token_name

    return StreamingEvalConfig(
        chunk_size=a.chunk_size, overlap=a.overlap, tail=a.tail, max_tokens=a.max_tokens, device=a.device,
        device_map=getattr(a, "device_map", None), verbose=not a.quiet,
        mode=a.mode, doc_mode=a.doc_mode, batch_size=a.batch_size, dtype=a.dtype, bos=a.bos,
        compile=getattr(a, "compile", None),  # (not a compare option)
        per_token_path=str(Path(a.out) / per_token_name("nll")) if (getattr(a, "per_token", False) and a.out) else None,
        checkpoint_dir=a.out, checkpoint_interval=a.checkpoint_interval, split_warmup=getattr(a, "split_warmup", None),
        check_tokenizer=getattr(a, "check_tokenizer", True),  # run's --no-check-tokenizer (demo: always checked)
    )


def _check_out(a: argparse.Namespace) -> None:
    if a.out is None and a.overwrite:
        raise EvaluatorError("--overwrite applies to --out DIR: pass --out, or drop --overwrite")


def _open_out(a: argparse.Namespace, info: Any = None) -> Any:
    """--out as a run folder (evaluator/run_folder.py: refused when foreign or in use, locked,
    marked, --overwrite applied), before any work; a no-op context without --out."""
    from .distributed import open_run_folder

    _check_out(a)
    return nullcontext() if a.out is None else open_run_folder(a.out, info, overwrite=a.overwrite)


def _evaluate(store_path: str, model: str, a: argparse.Namespace, folder: Any = None) -> dict[str, Any] | None:
    """Evaluate and report; the results (None on the ranks other than 0 under torchrun)."""
    from streamdata import open_store

    from .distributed import session
    from .engine import StreamingEvaluator

    if a.per_token and not a.out:
        raise EvaluatorError("--per-token needs --out DIR (the losses go to a memory-mapped file there)")
    cfg = _config(a)  # settings are checked before the folder and the model are touched
    with session(a.device) as info:  # torchrun's process group, or None (one process)
        main_rank = info is None or info.is_main
        # (rank 0 opens --out for every rank: the others attach once it has)
        with (nullcontext(folder) if folder is not None else _open_out(a, info)) as folder:
            ev = StreamingEvaluator(model, config=cfg)
            with open_store(store_path) as store:
                res = ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=a.per_token,
                                                         checkpoint_dir=folder)
                if main_rank:
                    _report(res, a, cfg, store, ev.adapter.describe(), folder)
    return res if main_rank else None


def _report(res: dict[str, Any], a: argparse.Namespace, cfg: Any, store: Any, model: dict[str, Any], folder: Any) -> None:
    """Print the table; write the report into the run folder unless it is complete there already."""
    from .report import format_table, write_report

    print(format_table(res))
    if folder is None:
        return
    if res.get("resumed_from_window") == res["num_chunks"] and folder.is_complete():
        print(f"report: already complete in {a.out} (nothing was recomputed)")
        return
    files = write_report(res, folder.root, config=dataclasses.asdict(cfg), store=store, model=model,
                         plots=not a.no_plots)
    print(f"report: {', '.join(str(f) for f in files.values())}")


def _cmd_run(a: argparse.Namespace) -> int:
    _evaluate(a.store, a.model, a)
    return 0


def demo_size(*, full: bool, max_tokens: int | None, on_cpu: bool) -> tuple[int, str]:
    """The demo's size in tokens and why: --max-tokens N as given; else the full size, except on a
    CPU without --full (the default there finishes in minutes on 2 cores, also under load)."""
    if full and max_tokens is not None:
        raise EvaluatorError("--full and --max-tokens both set the demo's size: pass one of them")
    if max_tokens is not None:
        return max_tokens, f"--max-tokens {max_tokens}"
    if full or not on_cpu:
        return DEMO_FULL_TOKENS, "the full size"
    return DEMO_CPU_TOKENS, "the size on a CPU"


def _demo_on_cpu(a: argparse.Namespace) -> bool:
    from .config import resolve_device

    return resolve_device(a.device).type == "cpu"  # (--device unset: cuda when available)


def _say(text: str) -> None:
    # flushed: in a pipe (streameval demo 2>&1 | tee log) stdout is block-buffered and would
    # come out after the progress lines on stderr
    print(f"[demo] {text}", flush=True)


def _cmd_demo(a: argparse.Namespace) -> int:
    from streamdata import tokenize_dataset
    from streamdata.format import MANIFEST_NAME

    from .progress import duration
    from .run_folder import RunFolder

    _check_out(a)
    a.max_tokens, why = demo_size(full=a.full, max_tokens=a.max_tokens,
                                  on_cpu=a.max_tokens is None and not a.full and _demo_on_cpu(a))
    _config(a)  # settings are checked before the folder is touched
    with RunFolder.open(a.out, overwrite=a.overwrite, demo=True) as folder:  # before the corpus is tokenized into it
        store = folder.demo_store()
        t0 = time.perf_counter()
        if (store / MANIFEST_NAME).is_file():
            # a finished store of an earlier demo is reused as it is, also one an older version built
            # (tokenize would refuse it: its build settings lack what this version records, e.g. the
            # word rule; the results then label its word perplexity with the rule it used)
            from streamdata.format import read_manifest

            m = read_manifest(store)
        else:
            _say(f"tokenizing the Python standard library (stdlib:eval) into {store} ...")
            # (tqdm's bar only on a terminal: in a pipe it is a line of carriage returns)
            m = tokenize_dataset(source="stdlib:eval", tokenizer="default", out=str(store),
                                 progress=not a.quiet and sys.stderr.isatty())
        _say(f"store {store}: {m.num_tokens:,} tokens, {m.num_documents:,} documents of the Python standard library "
             f"({time.perf_counter() - t0:.1f} s; reused when already built)")
        other = f"; --full: {DEMO_FULL_TOKENS:,}" if a.max_tokens < DEMO_FULL_TOKENS else ""
        _say(f"evaluating the bundled model on the first {min(a.max_tokens, m.num_tokens):,} of the store's "
             f"{m.num_tokens:,} tokens ({why}{other}); the progress lines show the time left (ETA) once the first "
             "batches are measured")
        res = _evaluate(str(store), "default", a, folder)
    if res is not None:
        n, secs, rate = res["total_tokens"], res["total_time"], res["tokens_per_second"]
        line = f"scored {n:,} tokens in {secs:.1f} s ({rate:,.0f} tok/s), {why}"
        if a.max_tokens < DEMO_FULL_TOKENS and rate > 0:
            full = DEMO_FULL_TOKENS - 1
            line += (f"; the full-size demo scores {full:,} (about {duration(full / rate)} of evaluation at this "
                     f"rate): streameval demo --full --out {str(a.out).rstrip('/')}-full")
        _say(line)
    return 0


def _cmd_compare(a: argparse.Namespace) -> int:
    from streamdata import open_store

    from .compare import compare_streaming
    from .run_folder import check_output_file

    cfg = _config(a)  # settings are checked before the folder and the models are touched
    check_output_file(a.per_token_kl, "--per-token-kl")  # every output path before any compute
    with _open_out(a) as folder, open_store(a.store) as store:
        res = compare_streaming(a.model, a.reference, store, config=cfg, reference_device=a.reference_device,
                                allow_vocab_prefix=a.allow_vocab_prefix, per_token_kl=a.per_token_kl,
                                checkpoint_dir=folder)
        _report(res, a, cfg, store, res["models"], folder)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet or not sys.stderr.isatty():  # library bars drawn into a pipe or a log file are noise
        quiet_library_bars()
    cmd = {"run": _cmd_run, "demo": _cmd_demo, "compare": _cmd_compare}[args.command]
    try:
        rc = cmd(args)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here, not at interpreter exit
        return rc
    except BrokenPipeError:
        return stdout_closed()
    except (EvaluatorError, StreamdataError) as e:
        print(f"streameval: error: {in_cli_terms(str(e), cli_flags(parser))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        if out is not None:
            print(f"streameval: interrupted: rerun the same command to resume from the last checkpoint in {out}",
                  file=sys.stderr)
        else:
            print("streameval: interrupted (nothing to resume: pass --out DIR to make a run resumable)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
