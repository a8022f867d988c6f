"""Errors of the evaluator that reach users.

They extend :class:`streamdata.StreamdataError`, so a CLI catches one base class and prints its
one-line message (the offending value and the fix); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from streamdata.errors import ConfigError, StreamdataError

__all__ = ["EvaluatorError", "ConfigError", "DataError", "ModelError"]


class EvaluatorError(StreamdataError):
    """Base class of the evaluator's user-facing errors."""


class DataError(EvaluatorError, ValueError):
    """The data to evaluate is unusable with this model (empty, ids out of range, other tokenizer)."""


class ModelError(EvaluatorError):
    """The model cannot be loaded, or it cannot run in the requested mode."""
