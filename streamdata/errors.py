"""Errors that reach users.

Every error a user can cause (bad argument, bad input file, damaged store) is a
:class:`StreamdataError` whose message is one line naming the offending value and what to do.
The CLIs print that line and exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["StreamdataError", "StoreError", "ConfigError", "SourceError", "TokenizerError"]


class StreamdataError(Exception):
    """Base class: a user-facing problem described in one line."""


class ConfigError(StreamdataError, ValueError):
    """An argument or configuration value is out of range or inconsistent."""


class SourceError(StreamdataError):
    """The dataset source cannot be read, or its documents are not usable text."""


class TokenizerError(StreamdataError):
    """The tokenizer cannot be loaded or does not fit the store format."""


class StoreError(StreamdataError):
    """A folder is not a complete store, or a store is damaged."""
