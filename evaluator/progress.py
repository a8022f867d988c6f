"""Progress of an evaluation on stderr, as people plan with it.

On a terminal: a tqdm bar counting scored tokens, with rate and ETA, its postfix the running loss
and perplexity (set to the final figures when the run ends, so the bar at 100% shows what the
report says). Elsewhere (a pipe, a log file): one plain line every ``log_interval`` windows with the
share of scored tokens done and the ETA at the rate so far, and a last line with the totals.
Nothing with ``verbose=False``. The loss needs the device's running sum: one sync per
``log_interval`` windows, never per batch (the bar itself advances from host-known counts).

Under torchrun only rank 0 reports, counting its own block; with ``world_size`` N > 1 the lines
show the global throughput as N x rank 0's rate (the split gives every rank about the same tokens;
measuring it exactly would need a collective per line, in lockstep across ranks).
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from .metrics import perplexity

__all__ = ["Progress", "duration"]


class Progress:
    def __init__(self, *, total_windows: int, total_tokens: int, done_windows: int, done_tokens: int,
                 log_interval: int, verbose: bool, stream: TextIO | None = None, bar: bool | None = None,
                 world_size: int = 1):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = verbose
        self.total_windows, self.total_tokens, self.log_interval = total_windows, total_tokens, log_interval
        self.world_size = world_size
        self.done, self.tokens = done_windows, done_tokens
        self.start_tokens = done_tokens  # rates count this process's work only (a resumed run too)
        self.next_log = (done_windows // log_interval + 1) * log_interval
        self._line_at = -1  # windows done when the last plain line was printed
        self.t0 = time.perf_counter()
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = None
        if verbose and (isatty if bar is None else bar):
            from tqdm import tqdm

            desc = "streameval" if world_size == 1 else f"streameval rank 0/{world_size}"
            self.bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True, desc=desc,
                            file=self.stream, dynamic_ncols=True, smoothing=0.1)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(f"[streameval] {text}", file=self.stream)
        else:
            print(f"[streameval] {text}", file=self.stream, flush=True)

    def update(self, windows: int, tokens: int, running: Callable[[], tuple[float, int]]) -> None:
        """After a batch: ``running()`` returns (sum NLL, tokens) so far; called only at log points."""
        self.done += windows
        self.tokens += tokens
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(tokens)
        if self.done < self.next_log:
            return
        self.next_log = (self.done // self.log_interval + 1) * self.log_interval
        nll, n = running()  # the one sync per log point
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {nll / n:.4f} ppl {perplexity(nll, n):.3f}", refresh=False)
        else:
            self._line(nll, n)

    def _line(self, nll: float, n: int) -> None:
        dt = time.perf_counter() - self.t0
        rate = (self.tokens - self.start_tokens) / dt if dt > 0 else 0.0
        who, scale = "", ""
        if self.world_size > 1:
            who, scale = "rank 0 ", f" (all {self.world_size} ranks, est. {self.world_size} x rank 0)"
        share = 100.0 * self.tokens / self.total_tokens if self.total_tokens else 100.0
        left = self.total_tokens - self.tokens
        eta = "done" if self.done >= self.total_windows else f"ETA {duration(left / rate)}" if rate > 0 else "ETA ?"
        self._line_at = self.done
        print(f"[streameval] {who}chunk {self.done:,}/{self.total_windows:,} ({share:.1f}%)  loss {nll / n:.4f}  "
              f"ppl {perplexity(nll, n):.3f}  {rate * self.world_size:,.0f} tok/s{scale}  {eta}",
              file=self.stream, flush=True)

    def finish(self, nll: float, n: int) -> None:
        """The run's totals (after its last batch): the bar's postfix shows them at 100%; in a pipe,
        a last line. (Without this the bar kept the last log point's loss.)"""
        if not self.enabled or n <= 0:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {nll / n:.4f} ppl {perplexity(nll, n):.3f}", refresh=True)
        elif self._line_at != self.done:  # (a log point at the last window already said it)
            self._line(nll, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def duration(seconds: float) -> str:
    """1h02m, 3m05s, 12s: how long, as people read it."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def quiet_library_bars() -> None:
    """No progress bars from transformers and datasets ("Loading weights", "Generating train
    split"): the CLIs call it with --quiet (our own lines are off already) and whenever stderr is a
    pipe or a log file, where a bar is a line of noise per refresh; the benchmarks too."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    from streamdata.cli import quiet_datasets

    quiet_datasets()
