"""What a run scores per target and how the sums become results: a :class:`Scoring`.

The loop (:mod:`evaluator.engine`), the runners, the sums, checkpoints and spilling are the same for
every kind of evaluation; a run scores the fp32 NLL per target (:data:`NLL`), a model comparison its
per-target statistics (:data:`evaluator.compare.COMPARE`). A Scoring names the per-target function,
the sums' columns, the spilled columns, how the per-token file is written and how the sums become
result keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from .metrics import MetricSums
from .results import detail

__all__ = ["NLL", "Scoring"]


@dataclasses.dataclass(frozen=True)
class Scoring:
    """What a run scores per target and how the sums become results. The loop, the runners, the
    sums, checkpoints and spilling are the same for every kind; a run scores the NLL (:data:`NLL`),
    a model comparison its per-target statistics (:mod:`evaluator.compare`)."""

    name: str
    # (out, targets, flat, loss_slice) -> [m] or [m, C] fp32 values of the m scored targets;
    # None: the runners' own, metrics.token_nll
    score: Callable[..., torch.Tensor] | None = None
    columns: tuple[str, ...] = ("nll",)  # MetricSums value columns (the first one is what progress shows)
    spill: dict[str, tuple[str, str]] | None = None  # SpillFiles columns (None: a run's)
    # the column of [m, C] values the per-token file keeps (None: the score is [m] values, a run's)
    per_token_column: int | None = None
    summary: Callable[[MetricSums], dict[str, Any]] = lambda sums: {}  # keys after the run's settings (RunResult.scored)
    detail: Callable[..., dict[str, Any]] = detail  # (run, ed, sums, files) -> the detail keys


#: A run: the fp32 NLL per target, summed.
NLL = Scoring("nll")
