"""Per-batch wall time without syncing the device in the loop: :class:`Timer`."""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["Timer"]


class Timer:
    """Wall time per batch of windows without syncing the device in the loop: CUDA events recorded
    around each batch on the stream the work is queued on, read at the end; ``time.perf_counter``
    on the CPU (which computes synchronously). Disabled (no marks at all) when no per-chunk times are
    asked for (``enabled`` False). ``clock``: a host clock in seconds used instead of either (a
    test counts its calls; on CUDA it would time the queueing, not the work)."""

    def __init__(self, device: torch.device, enabled: bool = True, clock: Callable[[], float] | None = None):
        self.device = device
        self.cuda = device.type == "cuda" and clock is None  # marks are CUDA events
        self.enabled = enabled
        self._clock = clock if clock is not None else (self._event if self.cuda else time.perf_counter)
        self.marks: list[tuple[Any, Any, int]] = []  # batches since the last drain: (start, stop, windows)
        self._t0: Any = None

    def _event(self) -> Any:
        e = torch.cuda.Event(enable_timing=True)
        # An event recorded without a stream lands on the *current device's* stream, which is not
        # the evaluation's device on cuda:N: name the stream the batch's kernels are queued on.
        e.record(torch.cuda.current_stream(self.device))
        return e

    def start(self) -> None:
        if self.enabled:
            self._t0 = self._clock()

    def stop(self, windows: int) -> None:
        if self.enabled:
            self.marks.append((self._t0, self._clock(), windows))

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
