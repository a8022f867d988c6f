"""Engine stage: the loop that drives windows from the data stage through a runner into the sums.

The parts, each with one job: :mod:`evaluator.resolve` decides the run (mode, windows, batch size)
before any compute; :mod:`evaluator.runners` feed one batch through the model into the sums
(sliding; carried state for stateful and kv-cache, each with its own out-of-memory rule);
:mod:`evaluator.checkpoint` makes a run resumable after a crash; :mod:`evaluator.results`
assembles the results. :class:`StreamingEvaluator` is the short loop between them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch

from streamdata.loader import WindowLoader
from streamdata.windows import plan_windows

from . import autobatch
from . import distributed as dd
from .carry_check import autocast_for
from .checkpoint import Checkpointer, run_identity
from .config import StreamingEvalConfig, check_max_tokens, resolve_device
from .data import EvalData, open_data
from .errors import ConfigError, DataError
from .metrics import MetricSums, PerTokenWriter
from .models import ModelAdapter, load_model
from .progress import Progress
from .resolve import ResolvedRun, resolve_chunk_size, resolve_run
from .results import summary
from .run_folder import RunFolder, check_output_file
from .runners import CarriedRunner, Runner, SlidingRunner
from .scoring import NLL, Scoring
from .spill import SpillFiles

__all__ = ["StreamingEvaluator", "create_streaming_evaluator"]


class StreamingEvaluator:
    """Evaluate a language model on token sequences of any length, streamed window by window.

    ``StreamingEvaluator(model, chunk_size=None, overlap=0, device=None, verbose=True, **options)``
    where ``options`` are further :class:`StreamingEvalConfig` fields, or
    ``StreamingEvaluator(model, config=StreamingEvalConfig(...))``. ``model``: an nn.Module, a
    transformers model, a hub id or local folder, ``"default"``, or ``"package.module:factory"``.
    ``chunk_size=None`` (the default everywhere) takes the model's context length from its config.
    """

    def __init__(self, model: Any, chunk_size: int | None = None, overlap: int = 0, device: str | None = None,
                 verbose: bool = True, *, config: StreamingEvalConfig | None = None, **options: Any):
        if config is None:
            config = StreamingEvalConfig(chunk_size=chunk_size, overlap=overlap, device=device, verbose=verbose, **options)
        elif chunk_size is not None or overlap or device is not None or options:
            raise ConfigError("pass either config=StreamingEvalConfig(...) or keyword settings, not both")
        config = dataclasses.replace(config)  # our own copy: setters below must not change the caller's
        device = resolve_device(config.device) if config.device is not None else None  # bad names fail first
        info = dd.current()
        if device is None and info is not None and config.device_map is None:
            device = resolve_device(dd.rank_device(info))  # under torchrun: this rank's local device
        self.adapter: ModelAdapter = load_model(model, dtype=config.dtype, device_map=config.device_map)
        # A model spread over devices (device map) takes its inputs on its first device and stays
        # where it is; any other model is moved to the requested (or default) device.
        self.device = device or self.adapter.input_device() or resolve_device(None)
        self.adapter.to(self.device)
        self.config = config
        self._chunk_size = resolve_chunk_size(config, self.adapter)
        # Keyword arguments for the runner (evaluator/runners.py): tests and benchmarks set e.g.
        # lookahead/segment_slots (parallel documents) or batch_timer (the auto batch ladder's clock).
        self.runner_options: dict[str, Any] = {}

    # ---- settings ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.module

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int | None) -> None:
        # Checked as a new config is (its construction runs the window rules), before this one
        # changes: a refused value leaves the config as it was.
        cs = resolve_chunk_size(dataclasses.replace(self.config, chunk_size=value), self.adapter)
        self.config.chunk_size, self._chunk_size = value, cs

    @property
    def overlap(self) -> int:
        return self.config.overlap

    # ---- public API ----------------------------------------------------------------------
    def evaluate_streaming(self, data: Any, max_tokens: int | None = None, log_interval: int | None = None,
                           checkpoint_dir: "str | os.PathLike | RunFolder | None" = None) -> dict[str, Any]:
        """Loss and perplexity over every scored target of ``data`` (tensor, array, store or store path).

        Returns loss (nats/token), perplexity, total_tokens (targets scored), num_chunks (windows),
        total_time (s), tokens_per_second, avg_chunk_time (s), plus the resolved settings.
        ``checkpoint_dir`` (or the config's): a folder where the run keeps a checkpoint; the same
        call after a crash resumes from it (see :mod:`evaluator.checkpoint`). It is a run folder
        (:mod:`evaluator.run_folder`): missing, empty or ours (a foreign folder is refused), locked
        for the run; or a :class:`~evaluator.run_folder.RunFolder` the caller opened.
        """
        return self.run(data, max_tokens=max_tokens, log_interval=log_interval, detailed=False,
                        checkpoint_dir=checkpoint_dir)

    def evaluate_streaming_with_metrics(self, data: Any, max_tokens: int | None = None,
                                        compute_per_token_metrics: bool = False,
                                        checkpoint_dir: "str | os.PathLike | RunFolder | None" = None) -> dict[str, Any]:
        """:meth:`evaluate_streaming` plus per-chunk, per-document, per-position and per-byte/word metrics.

        ``per_token_losses`` (when ``compute_per_token_metrics``) is a read-only float32 numpy memmap;
        of the file at ``per_token_path`` when the config names one, else of an unlinked temporary
        file (``per_token_path`` None: nothing is left on disk). bits_per_byte, byte_perplexity and
        word_perplexity are None when the data carries no byte/word counts (raw tensors).
        """
        return self.run(data, max_tokens=max_tokens, detailed=True, per_token=compute_per_token_metrics,
                        checkpoint_dir=checkpoint_dir)

    # ---- the run ---------------------------------------------------------------------------
    def _autocast(self):
        return autocast_for(self.device, self.config.dtype)

    def run(self, data: Any, *, max_tokens: int | None = None, log_interval: int | None = None, detailed: bool = True,
            per_token: bool = False, checkpoint_dir: "str | os.PathLike | RunFolder | None" = None,
            scoring: Scoring | None = None) -> dict[str, Any]:
        """The one entry every evaluation goes through (:meth:`evaluate_streaming` and
        :meth:`evaluate_streaming_with_metrics` are its two common forms; a model comparison and the
        benchmarks call it too). ``detailed``: per-chunk/per-document/per-position results;
        ``per_token``: the per-token file; ``scoring``: what is scored per target and how it is
        summed (:data:`evaluator.scoring.NLL`, the default; :data:`evaluator.compare.COMPARE`)."""
        cfg = self.config
        scoring = NLL if scoring is None else scoring
        if scoring is not NLL and dd.current() is not None:
            raise ConfigError(f"a {scoring.name} run under torchrun is not supported: run it as one process")
        max_tokens = cfg.max_tokens if max_tokens is None else max_tokens
        check_max_tokens(max_tokens)
        log_interval = cfg.log_interval if log_interval is None else int(log_interval)
        if log_interval < 1:
            raise ConfigError(f"log_interval={log_interval} must be >= 1")
        target = cfg.checkpoint_dir if checkpoint_dir is None else checkpoint_dir
        # The run folder: the caller's (the CLI opened it, with the lock held), else opened here for
        # this run (locked until it ends; a full disk there becomes one line).
        folder = target if isinstance(target, RunFolder) or target is None else \
            dd.open_run_folder(target, dd.current())
        with folder if folder is not target else nullcontext():
            check_output_file(cfg.per_token_path, "per_token_path")  # every output path before any compute
            return self._run_in(data, max_tokens, log_interval, detailed, per_token, folder, scoring)

    def _run_in(self, data: Any, max_tokens: int | None, log_interval: int, detailed: bool, per_token: bool,
                folder: RunFolder | None, scoring: "Scoring") -> dict[str, Any]:
        cfg = self.config
        with open_data(data) as ed:
            if ed.num_tokens == 0:
                raise DataError(f"{ed.name} holds no tokens: nothing to evaluate")
            run = resolve_run(cfg, self.adapter, ed, self.device, self._chunk_size, max_tokens)
            if cfg.verbose and cfg.mode == "auto":
                print(f"[streameval] mode {run.mode} ({run.mode_reason})", file=sys.stderr, flush=True)
            ed.check_ids(self.adapter.vocab_size, max_tokens)
            if cfg.compile is not None and run.mode != "sliding":
                raise ConfigError(f"compile={cfg.compile!r} applies to mode 'sliding' (fixed-shape batches), but this run "
                                  f"resolved mode {run.mode!r} ({run.mode_reason}): pass mode='sliding', or leave compile unset")
            part = _Part.of(dd.current(), run, ed, None if folder is None else folder.root, cfg.split_warmup)
            ckpt = None
            if folder is not None:
                folder.check_world(part.info)
                ident = run_identity(ed, self.adapter, run, detailed, per_token)
                if cfg.compile is not None:  # compiled kernels round differently: never mixed with eager sums
                    ident.settings.update(compile=cfg.compile)
                if scoring is not NLL:  # another kind of numbers: never resumed as a run (or vice versa)
                    ident.settings.update(scoring=scoring.name)
                if part.info is not None:  # one checkpoint per rank, of its own block (its rank folder)
                    ident.settings.update(world_size=part.info.world_size, rank=part.info.rank)
                    if part.warmup is not None:  # the approximation changes the numbers
                        ident.settings.update(split_warmup=part.warmup)
                ckpt = Checkpointer(folder.part_dir(part.info), ident, cfg.checkpoint_interval)
                carry = run.carry_check
                if carry is not None and not carry.checkpoint:
                    # Said now, not found at the end: the run finishes and reports, only its
                    # progress cannot be resumed (the final checkpoint records it complete).
                    ckpt.interval_s = 0.0
                    if cfg.verbose:
                        print(f"[streameval] no checkpoints before the end of this run: {carry.checkpoint_reason} "
                              "(an interrupted run starts over)", file=sys.stderr, flush=True)
            state = ckpt.load() if ckpt is not None else None
            if state is not None and run.batch_auto and state["runner"].get("ladder") is not None:
                # autobatch: the bound the interrupted run measured within (free memory moves)
                run = dataclasses.replace(run, batch_windows=int(state["runner"]["ladder"]["bound"]))
            windows = ed.windows(run.spec, self.device, run.batch_windows, vocab_size=self.adapter.vocab_size,
                                 start_at=part.lo if state is None else int(state["next_window"]), stop_at=part.hi)
            try:
                # compile None: a no-op. STREAMEVAL_COMPILE_BACKEND: a test's "eager"/"aot_eager"
                # (the same graph capture without code generation); default inductor.
                with self.adapter.compiled(cfg.compile, os.environ.get("STREAMEVAL_COMPILE_BACKEND") or "inductor"):
                    return self._loop(ed, run, windows, log_interval, detailed, per_token, ckpt, state, part, scoring,
                                      folder)
            finally:
                windows.close()

    def _loop(self, ed: EvalData, run: ResolvedRun, windows: WindowLoader, log_interval: int, detailed: bool,
              per_token: bool, ckpt: Checkpointer | None, state: dict[str, Any] | None,
              part: "_Part", scoring: "Scoring", folder: RunFolder | None) -> dict[str, Any]:
        cfg, dev, spec = self.config, self.device, run.spec
        info = part.info
        num_windows = windows.full_plan_windows
        expected = state["expected"] if state is not None else windows.num_scored  # every target once
        # (one rank's block may be empty, e.g. more ranks than documents: only an empty plan is an error)
        if expected == 0 and (info is None or part.total_scored == 0):
            raise DataError(
                f"{ed.name} has no token to score ({ed.limit(spec.max_tokens)} tokens; each "
                f"{'document' if spec.doc_mode == 'document' else 'stream'} needs >= 2, or 1 with a BOS prefix)"
            )
        path = cfg.per_token_path
        if per_token and path is None and ckpt is not None:
            path = str(folder.per_token_path("nll"))  # resumable: in the run folder
        writer, spill = None, None
        filled = 0 if state is None else int(state["per_token_filled"])
        records = {} if state is None else state["files"]  # what the checkpoint relies on: checked on resume
        # STREAMEVAL_SYNC_DEBUG=warn|error: torch's sync debug mode over the batch loop, lifted
        # (debug.allowed()) only where the loop syncs by design; a no-op by default.
        debug = _SyncDebug.from_env(dev)
        try:
            if not per_token:
                writer = None
            elif info is None:  # (its block drains are syncs by design)
                writer = scoring.per_token(PerTokenWriter(path, expected, filled=filled, allow_sync=debug.allowed,
                                                          record=records.get("per_token")))
            else:  # one file, this rank's slice at its own offset
                shared, path = dd.shared_per_token_file(path, part.total_scored, info, dev)
                writer = dd.RankTokenWriter(shared, part.scored_before, expected, filled=filled,
                                            anonymous=path is None and info.is_main, allow_sync=debug.allowed,
                                            record=records.get("per_token"))
            timer = _Timer(dev, enabled=detailed)  # chunk_times are a detailed-only result
            if detailed:
                # Per-window and per-document sums leave the device in blocks into files: beside the
                # checkpoint (the CLI's --out) so a resumed run continues them, else in a temporary
                # folder removed at the end (and on errors).
                spill = SpillFiles(None if ckpt is None else ckpt.folder, num_windows, ed.num_documents,
                                   resume=state is not None, columns=scoring.spill, records=records.get("spill"))
            sums = MetricSums(dev, detailed, spill, seconds=timer.drain, columns=scoring.columns)
            args = (self.adapter, windows.plan, sums, writer, run.loss_slice, dev, scoring.score)
            runner: Runner = SlidingRunner(*args, batch_windows=run.batch_windows, **self.runner_options) \
                if run.mode == "sliding" else CarriedRunner(*args, document_mode=spec.doc_mode == "document",
                                   save_model_state=run.carry_check is None or run.carry_check.checkpoint,
                                   **self.runner_options)
            elapsed0, resumed_from = 0.0, None
            warm = None
            if state is not None:
                sums.load_state_dict(state["sums"])
                runner.load(state["runner"])  # (a warm-up already in the carried state)
                elapsed0, resumed_from = float(state["elapsed"]), int(state["next_window"])
            else:
                warm = part.warmup_ids(ed, run, self.adapter.vocab_size, dev)
            progress = Progress(total_windows=num_windows if info is None else part.hi, total_tokens=expected,
                                done_windows=windows.plan.first, done_tokens=sums.tokens, log_interval=log_interval,
                                verbose=cfg.verbose and (info is None or info.is_main),
                                world_size=1 if info is None else info.world_size)
            if resumed_from is not None:
                progress.note(f"resuming from window {resumed_from:,} of {num_windows:,} ({ckpt.path})")
            ladder = autobatch.attach(runner, run.batch_windows, run.batch_auto, None if state is None else state["runner"],
                                      dev, debug.allowed, progress.note)  # batch_size="auto": measured
            t_start = time.perf_counter()
            next_window = windows.plan.first

            def checkpoint(complete: bool) -> None:
                if writer is not None:
                    writer.flush()
                sums_state = sums.state_dict()  # flushes the detail block and syncs its files first
                files: dict[str, Any] = {}  # the digests of what this state relies on (run_folder.py)
                if spill is not None:  # windows below window_base and documents below doc_base are final
                    files["spill"] = spill.digests(sums_state["window_base"], max(0, sums_state["doc_base"]), complete)
                if writer is not None:
                    files["per_token"] = writer.digest()
                ckpt.save({"next_window": next_window, "windows_total": num_windows, "expected": expected,
                           "sums": sums_state, "files": files,
                           "runner": runner.state(),
                           "per_token_filled": 0 if writer is None else writer.filled,
                           "elapsed": elapsed0 + time.perf_counter() - t_start,
                           "resumed_from": -1 if resumed_from is None else resumed_from}, complete=complete)

            # On cuda:N everything (kernels, events, the allocator) must use device N, not the
            # thread's current device (0 by default: a stray context there, and wrong timings).
            on_device = torch.cuda.device(dev) if dev.type == "cuda" else nullcontext()
            try:
                with on_device, torch.inference_mode(), self._autocast():
                    if warm is not None:
                        runner.warm_up(warm)
                    with debug:
                        for batch in runner.units(windows):  # (carried document mode: regrouped, plan order)
                            if detailed:  # may flush the previous block first (a sync every few thousand windows)
                                with debug.allowed():
                                    sums.begin_batch(batch.first_window, batch.num_windows, *batch.doc_range)
                            timer.start()
                            runner.step(batch)
                            timer.stop(batch.num_windows)
                            next_window = batch.first_window + batch.num_windows
                            with debug.allowed():  # a progress line reads the running sum (every log_interval)
                                progress.update(batch.num_windows, batch.num_scored, sums.total)
                            if ckpt is not None and ckpt.due():
                                with debug.allowed():
                                    checkpoint(complete=False)
                    nll_sum, tokens = sums.total()  # syncs: total_time includes all queued work
                    sums.flush()
                progress.finish(nll_sum, tokens)
            finally:
                progress.close()
            if tokens != expected:  # the loop and the plan disagree: a bug, never a user error
                raise RuntimeError(f"internal error: scored {tokens} targets, the window semantics give {expected}")
            if ckpt is not None:
                checkpoint(complete=True)
            total_time = elapsed0 + time.perf_counter() - t_start  # checkpoint writes included
            if info is not None:  # float64/int64 sums over the ranks (never averages); the slowest rank's time
                (nll_sum,) = dd.all_reduce_scalars([nll_sum], torch.float64, info, dev)
                (tokens,) = dd.all_reduce_scalars([tokens], torch.int64, info, dev)
                (total_time,) = dd.all_reduce_scalars([total_time], torch.float64, info, dev, op="max")
                if tokens != part.total_scored:
                    raise RuntimeError(f"internal error: the ranks scored {tokens} targets, the plan gives {part.total_scored}")
            res = summary(run, ed, self.adapter.name, nll_sum, tokens, num_windows, total_time, compile=cfg.compile)
            res.update(scoring.summary(sums))
            res["world_size"] = 1 if info is None else info.world_size
            res["backend"] = None if info is None else info.backend
            if part.warmup is not None:  # say that these numbers are an approximation, and of what
                res["split_warmup"] = {
                    "tokens": part.warmup, "restarts": info.world_size - 1,
                    "note": f"approximation: each of the {info.world_size - 1} later processes restarted the carried "
                            f"state at its block after {part.warmup} unscored tokens of warm-up context"}
            if resumed_from is not None:
                res["resumed_from_window"] = resumed_from
            autobatch.record(res, ladder, runner.micro_batch, run.batch_windows)  # batch_size(_choice, _after_oom)
            if detailed:
                files = spill.finish()
                spill = None
                if info is not None:
                    files = self._reduce_detail(part, sums, files, num_windows, ed.num_documents)
                if files is not None:  # (other ranks than 0 return the totals only)
                    res.update(scoring.detail(run, ed, sums, files))
                res["per_token_losses"], res["per_token_path"] = None, None
                if writer is not None:
                    if writer.filled != expected:
                        raise RuntimeError(f"internal error: wrote {writer.filled} per-token losses, expected {expected}")
                    if info is None:
                        res["per_token_losses"], res["per_token_path"] = writer.finish(), writer.path
                    else:
                        shared = writer.path
                        writer.finish()
                        dd.barrier(info, dev)  # every rank's slice is on disk before rank 0 publishes
                        if info.is_main:
                            res["per_token_losses"] = dd.publish_per_token(shared, path, part.total_scored)
                            res["per_token_path"] = path
                    writer = None
            return res
        finally:
            if writer is not None:
                writer.discard()
            if spill is not None:
                spill.discard()

    def _reduce_detail(self, part: "_Part", sums: MetricSums, files: dict[str, Any], num_windows: int,
                       num_documents: int) -> dict[str, Any] | None:
        """Every rank's position buckets and spilled columns summed (float64/int64) into rank 0's
        files (beside the checkpoints, else a temporary folder); None on the other ranks."""
        info, dev = part.info, self.device
        sums.bucket_nll, sums.bucket_tokens = dd.all_reduce_([sums.bucket_nll, sums.bucket_tokens], info, dev)
        final = SpillFiles(part.root if part.checkpointed else None, num_windows, num_documents) if info.is_main else None
        try:
            dd.reduce_spill(files, final, info, dev)
        except BaseException:
            if final is not None:
                final.discard()
            raise
        return final.finish() if final is not None else None


@dataclasses.dataclass(frozen=True)
class _Part:
    """This process's share of a run: windows ``[lo, hi)`` of the full plan (``hi`` None: to the end),
    the targets scored before ``lo`` and in the whole plan (per-token file offsets), the run's
    folder, and with ``split_warmup`` the tokens that warm up a carried state restarted at ``lo``.
    ``info`` None: a single process, the whole plan."""

    info: dd.DistInfo | None
    lo: int = 0
    hi: int | None = None
    scored_before: int = 0
    total_scored: int = 0
    root: Any = None
    checkpointed: bool = False
    warmup: int | None = None  # split_warmup in effect (carried state in stream mode, several processes)
    warmup_span: tuple[int, int] | None = None  # global tokens [a, b) fed unscored before this rank's block

    @staticmethod
    def of(info: dd.DistInfo | None, run: ResolvedRun, ed: EvalData, checkpoint_dir: str | None,
           warmup: int | None = None) -> "_Part":
        from pathlib import Path

        root = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if info is None:
            return _Part(None, root=root, checkpointed=root is not None)
        spec = run.spec
        carried_stream = run.mode != "sliding" and spec.doc_mode == "stream"
        if carried_stream and warmup is None:
            raise ConfigError(
                f"mode {run.mode!r} with doc_mode 'stream' carries one state through the whole stream and cannot be "
                f"split over {info.world_size} processes: pass --doc-mode document (doc_mode='document'), run one "
                "process, or accept an approximation with --split-warmup K (split_warmup=K)"
            )
        full = plan_windows(ed.doc_offsets, spec, check=False)
        lo, hi = dd.rank_range(full, ed.doc_offsets, info.rank, info.world_size)
        span = None
        if carried_stream and lo < hi and lo > 0:  # rank 0 starts at the stream's start: exact
            s = int(full.block(lo, lo + 1).start[0])  # the block's first input token (never a virtual BOS here)
            span = (max(0, s - warmup), s)
        return _Part(info, lo, hi, full[:lo].num_scored, full.num_scored, root, root is not None,
                     warmup if carried_stream else None, span)

    def warmup_ids(self, ed: EvalData, run: ResolvedRun, vocab: int | None, device: torch.device) -> torch.Tensor | None:
        """The split-warm-up context of this rank's block as int64 ids [K'] on ``device`` (the BOS id
        first when the warm-up reaches the stream's start and the run prepends one); None: no warm-up."""
        if self.warmup_span is None:
            return None
        a, b = self.warmup_span
        ids = ed.store.read(a, b).astype(np.int64)
        if vocab is not None and ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise DataError(f"{ed.name} holds token id {bad} in [{a}, {b}), outside the model's vocabulary [0, {vocab}): "
                            "re-tokenize with the model's tokenizer")
        if a == 0 and run.spec.prepend_bos_id is not None:
            ids = np.concatenate([[run.spec.prepend_bos_id], ids])
        return torch.from_numpy(ids).to(device) if ids.size else None


SYNC_DEBUG_ENV = "STREAMEVAL_SYNC_DEBUG"
_SYNC_DEBUG_MODES = {"": 0, "0": 0, "off": 0, "warn": 1, "1": 2, "error": 2}


class _SyncDebug:
    """``torch.cuda.set_sync_debug_mode`` over the batch loop (opt-in: ``STREAMEVAL_SYNC_DEBUG``
    = ``warn`` or ``error``/``1``; CUDA only), so a test or a user can prove the loop queues work
    without waiting for the device. :meth:`allowed` lifts it where the loop syncs by design: the
    progress line (every ``log_interval`` windows), the detail block flush (every few thousand
    windows), the per-token block drain, a checkpoint. The previous mode comes back on exit, also
    on errors. The mode is process-wide: the loader's reader thread runs under it too."""

    def __init__(self, mode: int):
        self.mode = mode
        self.active = mode != 0
        self._saved: list[int] = []

    @staticmethod
    def from_env(device: torch.device) -> "_SyncDebug":
        text = os.environ.get(SYNC_DEBUG_ENV, "").strip().lower()
        if text not in _SYNC_DEBUG_MODES:
            raise ConfigError(f"{SYNC_DEBUG_ENV}={text!r} is not one of warn, error, 1, 0: "
                              "set it to warn or error, or unset it")
        # Syncs exist only on CUDA: elsewhere the setting has nothing to check.
        return _SyncDebug(_SYNC_DEBUG_MODES[text] if device.type == "cuda" else 0)

    def _set(self, mode: int) -> None:
        self._saved.append(torch.cuda.get_sync_debug_mode())
        torch.cuda.set_sync_debug_mode(mode)

    def _restore(self) -> None:
        torch.cuda.set_sync_debug_mode(self._saved.pop())

    def __enter__(self) -> "_SyncDebug":
        if self.active:
            self._set(self.mode)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self._restore()

    @contextmanager
    def allowed(self):
        if not self.active:
            yield
            return
        self._set(0)
        try:
            yield
        finally:
            self._restore()


class _Timer:
    """Wall time per batch of windows without syncing the device in the loop: CUDA events recorded
    around each batch on the stream the work is queued on, read at the end; perf_counter on the CPU
    (which computes synchronously). Disabled (no events at all) when no per-chunk times are asked for."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.cuda = device.type == "cuda"
        self.enabled = enabled
        self.marks: list[tuple[Any, Any, int]] = []  # batches since the last drain: (start, stop, windows)
        self._t0: Any = None

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        # An event recorded without a stream lands on the *current device's* stream, which is not
        # the evaluation's device on cuda:N: name the stream the batch's kernels are queued on.
        e.record(torch.cuda.current_stream(self.device))
        return e

    def start(self) -> None:
        if self.enabled:
            self._t0 = self._now()

    def stop(self, windows: int) -> None:
        if self.enabled:
            self.marks.append((self._t0, self._now(), windows))

    def drain(self, n: int) -> np.ndarray:
        """Seconds per window of the ``n`` windows timed since the last drain (each batch's time
        shared equally among its windows). On CUDA the caller has synced the device (the events
        must have completed)."""
        out = np.empty(n, np.float64)
        i = 0
        for a, b, k in self.marks:
            out[i : i + k] = (a.elapsed_time(b) / 1000.0 if self.cuda else b - a) / k
            i += k
        self.marks = []
        if i != n:
            raise RuntimeError(f"internal error: {i} windows timed, {n} flushed")
        return out


def create_streaming_evaluator(model: Any, config: StreamingEvalConfig | None = None) -> StreamingEvaluator:
    """Factory of the quick reference: ``create_streaming_evaluator(model, StreamingEvalConfig(...))``."""
    return StreamingEvaluator(model, config=config if config is not None else StreamingEvalConfig())
