"""Engine stage: the loop that drives windows from the data stage through a runner into the sums.

The parts, each with one job: :mod:`evaluator.resolve` decides the run (mode, windows, batch size)
before any compute; :mod:`evaluator.runners` feed one batch through the model into the sums
(sliding; carried state for stateful and kv-cache, each with its own out-of-memory rule);
:mod:`evaluator.checkpoint` makes a run resumable after a crash; :mod:`evaluator.results`
assembles the results (:class:`~evaluator.results.RunResult`). :class:`StreamingEvaluator` decides
a run and hands it to a per-run ``_Run``, the short loop between them in three steps: ``open``
(per-token file, spill files, sums, runner, resume, progress), ``iterate`` (the batch loop; batch
times: :mod:`evaluator.timing`, the no-sync proof: :mod:`evaluator.sync_debug`), ``finish`` (final
checkpoint, rank reductions, the result).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable

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
from .metrics import MetricSums, PerTokenWriter, publish_per_token
from .models import ModelAdapter, load_model
from .progress import Progress
from .resolve import ResolvedRun, resolve_chunk_size, resolve_run
from .results import RunResult
from .run_folder import RunFolder, check_output_file
from .autobatch import LadderTimer
from .runners import LOOKAHEAD, SEGMENT_SLOTS, CarriedRunner, Runner, SlidingRunner
from .scoring import NLL, Scoring
from .spill import SpillFiles
from .sync_debug import SyncDebug
from .timing import Timer

__all__ = ["RunTuning", "StreamingEvaluator", "create_streaming_evaluator"]


@dataclasses.dataclass(frozen=True)
class RunTuning:
    """Sizes and hooks that change how a run is computed, never its numbers: the blocks in which
    per-window/per-document sums and per-token values leave the device, the parallel-document
    look-ahead, the auto batch ladder's timer and share. The defaults are what runs use; tests pass
    tiny blocks to cross every block boundary and a fake timer to make the ladder's choice exact.

    ``lookahead``/``segment_slots``: a parallel-document segment holds at most ``lookahead * B``
    documents in ``max(lookahead * B * L, segment_slots)`` slot tokens (evaluator/runners.py);
    ``tune_groups``: document groups per segment while the ladder measures; ``batch_timer``: the
    ladder's clock (None: wall time, synced on CUDA); ``ladder_share``: the share of the run's rows
    the ladder may spend (None: no limit); ``block_windows``/``block_documents``: rows of the
    detail block on the device (evaluator/metrics.py); ``per_token_block``: float32 values gathered
    on the device per drain of the per-token file."""

    lookahead: int = LOOKAHEAD
    segment_slots: int = SEGMENT_SLOTS
    tune_groups: int = 2
    batch_timer: LadderTimer | None = None
    ladder_share: float | None = 0.1
    block_windows: int = 4096
    block_documents: int = 4096
    per_token_block: int = 1 << 20

    def __post_init__(self) -> None:
        for name in ("lookahead", "segment_slots", "tune_groups", "block_windows", "block_documents", "per_token_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"RunTuning({name}={value!r}): pass an int >= 1")
        if self.ladder_share is not None and not 0 < self.ladder_share <= 1:
            raise ConfigError(f"RunTuning(ladder_share={self.ladder_share!r}): pass a share in (0, 1], or None")


class StreamingEvaluator:
    """Evaluate a language model on token sequences of any length, streamed window by window.

    ``StreamingEvaluator(model, chunk_size=None, overlap=0, device=None, verbose=True, **options)``
    where ``options`` are further :class:`StreamingEvalConfig` fields, or
    ``StreamingEvaluator(model, config=StreamingEvalConfig(...))``. ``model``: an nn.Module, a
    transformers model, a hub id or local folder, ``"default"``, or ``"package.module:factory"``.
    ``chunk_size=None`` (the default everywhere) takes the model's context length from its config.
    """

    def __init__(self, model: Any, chunk_size: int | None = None, overlap: int = 0, device: str | None = None,
                 verbose: bool = True, *, config: StreamingEvalConfig | None = None, tuning: RunTuning | None = None,
                 **options: Any):
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
        self.tuning = RunTuning() if tuning is None else tuning  # how, never what (block sizes, ladder hooks)

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
            scoring: Scoring | None = None, sync_debug: SyncDebug | None = None,
            clock: Callable[[], float] | None = None) -> dict[str, Any]:
        """The one entry every evaluation goes through (:meth:`evaluate_streaming` and
        :meth:`evaluate_streaming_with_metrics` are its two common forms; a model comparison and the
        benchmarks call it too): :meth:`run_result`'s results as a dict."""
        return self.run_result(data, max_tokens=max_tokens, log_interval=log_interval, detailed=detailed,
                               per_token=per_token, checkpoint_dir=checkpoint_dir, scoring=scoring,
                               sync_debug=sync_debug, clock=clock).to_dict()

    def run_result(self, data: Any, *, max_tokens: int | None = None, log_interval: int | None = None,
                   detailed: bool = True, per_token: bool = False,
                   checkpoint_dir: "str | os.PathLike | RunFolder | None" = None, scoring: Scoring | None = None,
                   sync_debug: SyncDebug | None = None, clock: Callable[[], float] | None = None) -> RunResult:
        """:meth:`run` as a typed :class:`~evaluator.results.RunResult`. ``detailed``:
        per-chunk/per-document/per-position results; ``per_token``: the per-token file; ``scoring``:
        what is scored per target and how it is summed (:data:`evaluator.scoring.NLL`, the default;
        :data:`evaluator.compare.COMPARE`). ``sync_debug``: the batch loop's
        :class:`~evaluator.sync_debug.SyncDebug` (default: ``STREAMEVAL_SYNC_DEBUG``'s);
        ``clock``: a host clock (seconds) for the per-chunk times instead of the device's own
        (:class:`~evaluator.timing.Timer`)."""
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
            opts = _Options(log_interval, detailed, per_token, scoring, sync_debug, clock)
            return self._run_in(data, max_tokens, folder, opts)

    def _run_in(self, data: Any, max_tokens: int | None, folder: RunFolder | None, opts: "_Options") -> RunResult:
        """Decide the run over the opened data (settings, this process's part, the checkpoint to
        resume), then hand it to a :class:`_Run` over the window loader."""
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
            ckpt = None if folder is None else self._checkpointer(folder, ed, run, part, opts)
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
                    return _Run(self, ed, run, windows, part, ckpt, state, folder, opts).execute()
            finally:
                windows.close()

    def _checkpointer(self, folder: RunFolder, ed: EvalData, run: ResolvedRun, part: "_Part",
                      opts: "_Options") -> Checkpointer:
        """This process's checkpoint in the run folder, under the identity of everything that
        changes the numbers (a checkpoint of another identity is refused when loaded)."""
        cfg = self.config
        folder.check_world(part.info)
        ident = run_identity(ed, self.adapter, run, opts.detailed, opts.per_token)
        if cfg.compile is not None:  # compiled kernels round differently: never mixed with eager sums
            ident.settings.update(compile=cfg.compile)
        if opts.scoring is not NLL:  # another kind of numbers: never resumed as a run (or vice versa)
            ident.settings.update(scoring=opts.scoring.name)
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
        return ckpt


@dataclasses.dataclass(frozen=True)
class _Options:
    """What a call of :meth:`StreamingEvaluator.run_result` asks of the run, besides the config."""

    log_interval: int
    detailed: bool
    per_token: bool
    scoring: Scoring
    sync_debug: SyncDebug | None
    clock: Callable[[], float] | None


class _Run:
    """One run over its window loader, in three steps: :meth:`open` (the per-token file, the spill
    files, the sums, the runner, a resumed state, progress), :meth:`iterate` (the batch loop: no
    sync but the designed ones, no allocation per batch), :meth:`finish` (the final checks and
    checkpoint, the reductions over ranks, the :class:`~evaluator.results.RunResult`).
    :meth:`execute` runs them and removes what an error leaves unfinished."""

    def __init__(self, ev: StreamingEvaluator, ed: EvalData, run: ResolvedRun, windows: WindowLoader, part: "_Part",
                 ckpt: Checkpointer | None, state: dict[str, Any] | None, folder: RunFolder | None, opts: _Options):
        self.ev, self.cfg, self.dev = ev, ev.config, ev.device
        self.ed, self.run, self.windows, self.part, self.info = ed, run, windows, part, part.info
        self.ckpt, self.state, self.folder, self.opts = ckpt, state, folder, opts
        self.num_windows = windows.full_plan_windows
        self.expected = state["expected"] if state is not None else windows.num_scored  # every target once
        self.writer: Any = None  # PerTokenWriter (or the scoring's wrapper of it)
        self.spill: SpillFiles | None = None
        self.elapsed0, self.resumed_from = 0.0, None  # seconds and window of a resumed run
        self.next_window = windows.plan.first

    def execute(self) -> RunResult:
        try:
            self.open()
            try:
                self.iterate()
                self.progress.finish(self.nll_sum, self.tokens)
            finally:
                self.progress.close()
            return self.finish()
        finally:
            if self.writer is not None:
                self.writer.discard()
            if self.spill is not None:
                self.spill.discard()

    # ---- open ----------------------------------------------------------------------------
    def open(self) -> None:
        ed, state, info, part, dev = self.ed, self.state, self.info, self.part, self.dev
        # (one rank's block may be empty, e.g. more ranks than documents: only an empty plan is an error)
        if self.expected == 0 and (info is None or part.total_scored == 0):
            spec = self.run.spec
            raise DataError(
                f"{ed.name} has no token to score ({ed.limit(spec.max_tokens)} tokens; each "
                f"{'document' if spec.doc_mode == 'document' else 'stream'} needs >= 2, or 1 with a BOS prefix)"
            )
        records = {} if state is None else state["files"]  # what the checkpoint relies on: checked on resume
        # STREAMEVAL_SYNC_DEBUG=warn|error: torch's sync debug mode over the batch loop, lifted
        # (debug.allowed()) only where the loop syncs by design; a no-op by default.
        self.debug = self.opts.sync_debug if self.opts.sync_debug is not None else SyncDebug.from_env(dev)
        if self.opts.per_token:
            self.writer = self._per_token_writer(records.get("per_token"))
        self.timer = Timer(dev, enabled=self.opts.detailed, clock=self.opts.clock)  # chunk_times: detailed only
        if self.opts.detailed:
            # Per-window and per-document sums leave the device in blocks into files: beside the
            # checkpoint (the CLI's --out) so a resumed run continues them, else in a temporary
            # folder removed at the end (and on errors).
            self.spill = SpillFiles(None if self.ckpt is None else self.ckpt.folder, self.num_windows, ed.num_documents,
                                    resume=state is not None, columns=self.opts.scoring.spill,
                                    records=records.get("spill"))
        self.sums = MetricSums(dev, self.opts.detailed, self.spill, seconds=self.timer.drain,
                               block_windows=self.ev.tuning.block_windows, block_documents=self.ev.tuning.block_documents,
                               columns=self.opts.scoring.columns)
        self.runner = self._runner()
        self.warm = None  # split_warmup: the context fed unscored before this rank's block
        if state is not None:
            self.sums.load_state_dict(state["sums"])
            self.runner.load(state["runner"])  # (a warm-up already in the carried state)
            self.elapsed0, self.resumed_from = float(state["elapsed"]), int(state["next_window"])
        else:
            self.warm = part.warmup_ids(ed, self.run, self.ev.adapter.vocab_size, dev)
        self.progress = Progress(total_windows=self.num_windows if info is None else part.hi,
                                 total_tokens=self.expected, done_windows=self.windows.plan.first,
                                 done_tokens=self.sums.tokens, log_interval=self.opts.log_interval,
                                 verbose=self.cfg.verbose and (info is None or info.is_main),
                                 world_size=1 if info is None else info.world_size)
        if self.resumed_from is not None:
            self.progress.note(f"resuming from window {self.resumed_from:,} of {self.num_windows:,} ({self.ckpt.path})")
        # batch_size="auto": the runner's first forwards measure a ladder of sizes (None: a fixed size)
        self.ladder = autobatch.attach(self.runner, self.run.batch_windows, self.run.batch_auto,
                                       None if state is None else state["runner"], dev, self.debug.allowed,
                                       self.progress.note)
        self.t_start = time.perf_counter()

    def _per_token_writer(self, record: dict[str, Any] | None) -> PerTokenWriter:
        """The per-token file (one process: all of it; a torchrun rank: its slice of the one file)."""
        path, info = self.cfg.per_token_path, self.info
        filled = 0 if self.state is None else int(self.state["per_token_filled"])
        column, block = self.opts.scoring.per_token_column, self.ev.tuning.per_token_block
        if path is None and self.ckpt is not None:
            path = str(self.folder.per_token_path("nll"))  # resumable: in the run folder
        if info is None:  # (its block drains are syncs by design)
            return PerTokenWriter(path, self.expected, filled=filled, allow_sync=self.debug.allowed, record=record,
                                  column=column, block=block)
        shared, path = dd.shared_per_token_file(path, self.part.total_scored, info, self.dev)
        return PerTokenWriter(path, self.part.total_scored, filled=filled, allow_sync=self.debug.allowed, record=record,
                              file=shared, base=self.part.scored_before, count=self.expected,
                              anonymous=path is None and info.is_main, column=column, block=block)

    def _runner(self) -> Runner:
        run, ev = self.run, self.ev
        args = (ev.adapter, self.windows.plan, self.sums, self.writer, run.loss_slice, self.dev, self.opts.scoring.score)
        t = ev.tuning
        ladder = dict(batch_timer=t.batch_timer, ladder_share=t.ladder_share)
        if run.mode == "sliding":
            return SlidingRunner(*args, batch_windows=run.batch_windows, **ladder)
        return CarriedRunner(*args, document_mode=run.spec.doc_mode == "document",
                             save_model_state=run.carry_check is None or run.carry_check.checkpoint,
                             lookahead=t.lookahead, segment_slots=t.segment_slots, tune_groups=t.tune_groups, **ladder)

    # ---- iterate -------------------------------------------------------------------------
    def iterate(self) -> None:
        """Every batch of the loader through the runner into the sums; leaves ``nll_sum`` and
        ``tokens`` (synced: the total time then includes all queued work)."""
        # locals: the loop reads nothing through self per batch
        runner, sums, timer, progress, debug = self.runner, self.sums, self.timer, self.progress, self.debug
        detailed, ckpt, windows = self.opts.detailed, self.ckpt, self.windows
        warm, next_window = self.warm, self.next_window
        # On cuda:N everything (kernels, events, the allocator) must use device N, not the
        # thread's current device (0 by default: a stray context there, and wrong timings).
        on_device = torch.cuda.device(self.dev) if self.dev.type == "cuda" else nullcontext()
        with on_device, torch.inference_mode(), self.ev._autocast():
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
                            self.checkpoint(next_window, complete=False)
            self.next_window = next_window
            self.nll_sum, self.tokens = sums.total()  # syncs: total_time includes all queued work
            sums.flush()

    def checkpoint(self, next_window: int, complete: bool) -> None:
        """Save everything summed before ``next_window`` (flushed and made durable first)."""
        writer, spill = self.writer, self.spill
        if writer is not None:
            writer.flush()
        sums_state = self.sums.state_dict()  # flushes the detail block and syncs its files first
        files: dict[str, Any] = {}  # the digests of what this state relies on (run_folder.py)
        if spill is not None:  # windows below window_base and documents below doc_base are final
            files["spill"] = spill.digests(sums_state["window_base"], max(0, sums_state["doc_base"]), complete)
        if writer is not None:
            files["per_token"] = writer.digest()
        self.ckpt.save({"next_window": next_window, "windows_total": self.num_windows, "expected": self.expected,
                        "sums": sums_state, "files": files,
                        "runner": self.runner.state(),
                        "per_token_filled": 0 if writer is None else writer.filled,
                        "elapsed": self.elapsed0 + time.perf_counter() - self.t_start,
                        "resumed_from": -1 if self.resumed_from is None else self.resumed_from}, complete=complete)

    # ---- finish --------------------------------------------------------------------------
    def finish(self) -> RunResult:
        """Check the count, save the final checkpoint, reduce over the ranks, assemble the result."""
        info, dev, part, nll_sum, tokens = self.info, self.dev, self.part, self.nll_sum, self.tokens
        if tokens != self.expected:  # the loop and the plan disagree: a bug, never a user error
            raise RuntimeError(f"internal error: scored {tokens} targets, the window semantics give {self.expected}")
        if self.ckpt is not None:
            self.checkpoint(self.next_window, complete=True)
        total_time = self.elapsed0 + time.perf_counter() - self.t_start  # checkpoint writes included
        warmup = None
        if info is not None:  # float64/int64 sums over the ranks (never averages); the slowest rank's time
            (nll_sum,) = dd.all_reduce_scalars([nll_sum], torch.float64, info, dev)
            (tokens,) = dd.all_reduce_scalars([tokens], torch.int64, info, dev)
            (total_time,) = dd.all_reduce_scalars([total_time], torch.float64, info, dev, op="max")
            if tokens != part.total_scored:
                raise RuntimeError(f"internal error: the ranks scored {tokens} targets, the plan gives {part.total_scored}")
            if part.warmup is not None:  # say that these numbers are an approximation, and of what
                warmup = {"tokens": part.warmup, "restarts": info.world_size - 1,
                          "note": f"approximation: each of the {info.world_size - 1} later processes restarted the "
                                  f"carried state at its block after {part.warmup} unscored tokens of warm-up context"}
        res = RunResult.of(self.run, self.ed, self.ev.adapter.name, nll_sum, tokens, self.num_windows, total_time,
                           compile=self.cfg.compile, scored=self.opts.scoring.summary(self.sums),
                           world_size=1 if info is None else info.world_size,
                           backend=None if info is None else info.backend, split_warmup=warmup,
                           resumed_from_window=self.resumed_from, detailed=self.opts.detailed)
        autobatch.record(res, self.ladder, self.runner.micro_batch, self.run.batch_windows)  # the batch fields
        if self.opts.detailed:
            self._finish_detail(res)
        return res

    def _finish_detail(self, res: RunResult) -> None:
        """The detail figures from the spilled files (every rank's summed into rank 0's) and the
        per-token file, finished and published (under torchrun: by rank 0, once every rank's slice
        is on disk)."""
        info, part, sums, dev = self.info, self.part, self.sums, self.dev
        files = self.spill.finish()
        self.spill = None
        if info is not None:
            files = _reduce_detail(part, sums, files, self.num_windows, self.ed.num_documents, dev)
        if files is not None:  # (other ranks than 0 return the totals only)
            res.detail = self.opts.scoring.detail(self.run, self.ed, sums, files)
        writer = self.writer
        if writer is None:
            return
        if writer.filled != self.expected:
            raise RuntimeError(f"internal error: wrote {writer.filled} per-token losses, expected {self.expected}")
        if info is None:
            res.per_token_losses, res.per_token_path = writer.finish(), writer.path
        else:
            writer.finish()
            dd.barrier(info, dev)  # every rank's slice is on disk before rank 0 publishes
            if info.is_main:
                res.per_token_losses = publish_per_token(writer.file, writer.path, part.total_scored)
                res.per_token_path = writer.path
        self.writer = None


def _reduce_detail(part: "_Part", sums: MetricSums, files: dict[str, Any], num_windows: int, num_documents: int,
                   dev: torch.device) -> dict[str, Any] | None:
    """Every rank's position buckets and spilled columns summed (float64/int64) into rank 0's
    files (beside the checkpoints, else a temporary folder); None on the other ranks."""
    info = part.info
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


def create_streaming_evaluator(model: Any, config: StreamingEvalConfig | None = None) -> StreamingEvaluator:
    """Factory of the quick reference: ``create_streaming_evaluator(model, StreamingEvalConfig(...))``."""
    return StreamingEvaluator(model, config=config if config is not None else StreamingEvalConfig())
