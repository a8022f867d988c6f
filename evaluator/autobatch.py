"""Batch size by measurement (``batch_size="auto"``): the run's first forwards try a short ladder
of micro-batch sizes and keep the fastest.

:func:`evaluator.resolve.batch_windows_for` gives the *bound*: the loader's batch (sliding) or the
parallel-documents bound (carried document mode), a memory estimate (free GPU memory; on a CPU,
available RAM, capped at 64). Within it the runner's micro size (windows per forward in sliding mode,
documents per group in parallel-document mode, see :mod:`evaluator.runners`) climbs the ladder
``1, 2, 4, ..., bound`` (starting at ``bound // 64`` when the bound is larger: tiny sizes only waste
the device there), each rung timed over at least ``min_units`` forwards (groups) and ``min_seconds``
(or ``max_units`` forwards: on a GPU small sizes take milliseconds). The ladder spends at most a
``share`` (a tenth) of the run's rows (windows; documents in parallel-document mode): a rung that
would not fit is not tried, so a short run is not spent measuring.
The climb stops at the first rung whose rate (scored tokens per second) is below the best so far
(throughput rises with the size until the device is busy, then falls: a rung past the peak is the
only one run at a size known to be worse), or at the bound; the fastest rung is kept for the rest
of the run.

Nothing is computed twice or thrown away: every window of a rung is scored into the sums as usual,
so the results equal a run with fixed sizes (bit for bit where a model's rows do not depend on the
batch they share; otherwise within the rounding that any two batch sizes differ by, the matmul
blocking of another batch shape: ~1e-7 relative in carried document mode; none for a tiny GPT-2's
sliding windows on the 2-core test CPU). The choice depends on timing, so two runs of one command
may choose differently and then differ in those last bits: pass a fixed batch size where runs must
agree bit for bit. The run's very first forward is not timed (allocations, kernel selection), nor a
forward of another size than the rung's (a batch's remainder, an out-of-memory half). Out of memory during the ladder ends it: the fastest rung below the failed size is kept.

Timing: :class:`WallTimer` reads ``time.perf_counter``; on CUDA it synchronizes the device before
and after each timed forward, only while the ladder runs (under the engine's sync-debug allowance),
so the rest of the run keeps its no-sync-per-batch rule. A test passes its own timer
(``StreamingEvaluator(..., tuning=RunTuning(batch_timer=...))``, see :class:`LadderTimer`).

Resume: the ladder's state (rungs measured, the choice, its share) travels in the runner's
checkpoint state with the bound, and a resumed run uses them (the loader batch and the micro size
the crashed run used; a ladder cut short continues at its rung), so an interrupted run that had
made its choice resumes to that run's numbers bit for bit, whatever the free memory is now.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

if TYPE_CHECKING:
    from .results import RunResult

__all__ = ["Ladder", "LadderTimer", "WallTimer", "attach", "ladder_sizes", "record"]


class LadderTimer(Protocol):
    """Times one forward (sliding) or group (parallel documents) of ``size`` rows scoring ``tokens``."""

    def start(self) -> None: ...

    def stop(self, size: int, tokens: int) -> float:
        """Seconds since :meth:`start`."""
        ...


class WallTimer:
    """Wall-clock seconds; on CUDA the device is synchronized at both ends (queued work must be
    done before the clock starts, and the timed work before it stops), inside ``allow_sync``."""

    def __init__(self, device: torch.device, allow_sync: Callable[[], Any] = nullcontext):
        self.device, self.allow_sync = device, allow_sync
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            with self.allow_sync():
                torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def stop(self, size: int, tokens: int) -> float:
        self._sync()
        return time.perf_counter() - self._t0


def ladder_sizes(bound: int) -> list[int]:
    """Powers of two from ``max(1, bound // 64)`` below ``bound``, then ``bound`` itself."""
    first = max(1, bound // 64)
    sizes = []
    s = 1
    while s < bound:
        if s >= first:
            sizes.append(s)
        s *= 2
    return sizes + [bound]


class Ladder:
    """The measurement of one run (see the module docstring). The runner asks :meth:`size` before a
    forward while :attr:`active`, and reports it with :meth:`start` / :meth:`stop`."""

    def __init__(self, bound: int, timer: LadderTimer, *, budget: int | None = None, min_units: int = 2,
                 max_units: int = 8, min_seconds: float = 0.25, tolerance: float = 0.0):
        self.bound, self.timer = int(bound), timer
        self.budget = budget  # rows (windows or documents) the ladder may spend; None: no limit
        self.min_units, self.max_units, self.min_seconds, self.tolerance = min_units, max_units, min_seconds, tolerance
        self.spent = 0  # rows fed while the ladder ran (timed or not)
        self.sizes = ladder_sizes(self.bound)
        self.k = 0  # the rung being measured
        self.rungs: dict[int, list[float]] = {}  # size -> [tokens, seconds, units] timed
        self.chosen: int | None = None if len(self.sizes) > 1 else self.bound  # nothing to choose from
        self.note = ""  # why the ladder ended early (out of memory, the run ended)
        self.warm = False  # the run's (this process's) first forward happened: later ones are timed
        self.on_done: Callable[[str], None] | None = None  # told the choice once (the engine: a progress note)

    @property
    def active(self) -> bool:
        return self.chosen is None

    def size(self) -> int:
        """The micro size to use now: the rung being measured, then the choice."""
        return self.sizes[self.k] if self.chosen is None else self.chosen

    def start(self) -> None:
        if self.active and self.warm:
            self.timer.start()

    def stop(self, size: int, tokens: int) -> None:
        if not self.active:
            return
        self.spent += size
        if not self.warm:  # the first forward of this process: warm-up, not timed
            self.warm = True
            return
        seconds = self.timer.stop(size, tokens)
        if size != self.size():  # a remainder or a half: another shape than the rung's
            return
        r = self.rungs.setdefault(size, [0.0, 0.0, 0])
        r[0] += tokens
        r[1] += seconds
        r[2] += 1
        over = self.budget is not None and self.spent >= self.budget
        if r[2] < self.min_units or (r[1] < self.min_seconds and r[2] < self.max_units and not over):
            return
        rates = self.rates()
        if rates[size] < (1 - self.tolerance) * max(rates.values()) or self.k + 1 == len(self.sizes):
            self._finish()
        elif self.budget is not None and self.spent + self.min_units * self.sizes[self.k + 1] > self.budget:
            self.note = f"the ladder's share of the run ({self.budget} rows) ends before size {self.sizes[self.k + 1]}"
            self._finish()
        else:
            self.k += 1

    def out_of_memory(self, fits: int) -> None:
        """A forward of more than ``fits`` rows ran out of memory: end the ladder below it."""
        if self.active:
            self.note = f"out of memory above {fits}"
            self._finish(fits)

    def end_of_run(self) -> None:
        """The run ended during the ladder: the best rung measured (else the size in use) is the choice."""
        if self.active:
            self.note = "the run ended during the ladder"
            self._finish()

    def rates(self) -> dict[int, float]:
        """Scored tokens per second of each rung timed so far."""
        return {s: t / sec for s, (t, sec, _) in self.rungs.items() if sec > 0}

    def _finish(self, limit: int | None = None) -> None:
        rates = {s: r for s, r in self.rates().items() if limit is None or s <= limit}
        fallback = self.size() if limit is None else min(self.size(), limit)
        self.chosen = max(rates, key=lambda s: (rates[s], -s)) if rates else fallback
        if self.on_done is not None:
            self.on_done(self.line())

    def line(self) -> str:
        """``batch size 8 (measured: 1: 410 tok/s, 2: 661, 4: 880, 8: 973, 16: 950)``."""
        rates = self.rates()
        if len(self.sizes) == 1:
            return f"batch size {self.chosen} (the memory bound: nothing to measure)"
        steps = ", ".join(f"{s}: {r:,.0f}" + (" tok/s" if i == 0 else "") for i, (s, r) in enumerate(sorted(rates.items())))
        extra = f"; {self.note}" if self.note else ""
        return f"batch size {self.chosen} (measured: {steps or 'nothing timed'}{extra}; bound {self.bound})"

    def report(self) -> dict[str, Any]:
        """``results["batch_size_choice"]``: the choice, the ladder (size -> scored tok/s), the bound."""
        return {"chosen": self.chosen, "rule": "measured" if len(self.sizes) > 1 else "bound", "bound": self.bound,
                "ladder": {str(s): r for s, r in sorted(self.rates().items())}, "note": self.note or None}

    def state(self) -> dict[str, Any]:
        return {"bound": self.bound, "k": self.k, "chosen": self.chosen, "note": self.note, "spent": self.spent,
                "budget": self.budget,
                "rungs": {str(s): list(r) for s, r in self.rungs.items()}}

    def load(self, state: dict[str, Any]) -> None:
        """Continue an earlier process's ladder (its rungs and choice); this process warms up again."""
        if int(state["bound"]) != self.bound:
            raise RuntimeError(f"internal error: ladder bound {state['bound']} resumed with bound {self.bound}")
        self.k, self.chosen, self.note, self.spent = int(state["k"]), state["chosen"], state["note"], int(state["spent"])
        self.budget = state["budget"]  # the whole run's share (a resumed plan is only the rest of it)
        self.rungs = {int(s): [float(r[0]), float(r[1]), int(r[2])] for s, r in state["rungs"].items()}


def attach(runner: Any, batch_windows: int, auto: bool, state: dict[str, Any] | None, device: torch.device,
           allow_sync: Callable[[], Any], note: Callable[[str], None]) -> Ladder | None:
    """The engine's hook: with ``auto`` (``ResolvedRun.batch_auto``) a ladder within the bound
    ``batch_windows``, continued from the runner's checkpoint ``state`` when resuming, set on the
    runner; ``note`` tells the user the plan now and the choice when it is made. None otherwise."""
    if not auto:
        return None
    ladder = Ladder(batch_windows, runner.batch_timer or WallTimer(device, allow_sync),
                    budget=None if runner.ladder_share is None else int(runner.ladder_share * runner.ladder_rows()))
    if state is not None and state.get("ladder") is not None:
        ladder.load(state["ladder"])
    elif ladder.active:
        note(f"batch size auto: measuring {', '.join(map(str, ladder.sizes))} on the first forwards "
             f"(the memory bound is {batch_windows}); every window is scored as usual")
    else:
        note(ladder.line())
    ladder.on_done = note
    runner.ladder = ladder
    return ladder


def record(res: "RunResult", ladder: Ladder | None, micro: int | None, batch_windows: int) -> None:
    """The results' batch keys: ``batch_size`` (the size used: the measured choice with auto),
    ``batch_size_choice`` (auto: :meth:`Ladder.report`), ``batch_size_after_oom`` (the size an
    out-of-memory error left, when below it)."""
    size = batch_windows
    if ladder is not None:
        ladder.end_of_run()
        size = ladder.chosen
        res.batch_size = size
        res.batch_size_choice = ladder.report()
    if micro is not None and micro < size:
        res.batch_size_after_oom = micro
