"""Errors that reach users.

Every error a user can cause (bad argument, bad input file, damaged store) is a
:class:`StreamdataError` whose message is one line naming the offending value and what to do.
The CLIs print that line and exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

__all__ = ["StreamdataError", "StoreError", "ConfigError", "SourceError", "TokenizerError", "cli_flags", "in_cli_terms"]


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


def cli_flags(parser) -> dict[str, str]:
    """``{dest: "--flag"}`` for every long option of an argparse parser and its subcommands."""
    import argparse

    flags: dict[str, str] = {}
    todo = [parser]
    while todo:
        p = todo.pop()
        for act in p._actions:  # argparse keeps no public list of a parser's actions
            if isinstance(act, argparse._SubParsersAction):
                todo.extend(act.choices.values())
            elif act.option_strings and act.dest not in flags:
                longs = [o for o in act.option_strings if o.startswith("--")]
                if longs:
                    flags[act.dest] = longs[0]
    return flags


# ``name=value`` (value quoted or a bare token) and ``leave name unset``, as the API's messages say them
_ARG_RE = re.compile(r"\b([a-z][a-z0-9_]*)=('[^']*'|\"[^\"]*\"|[^\s,;:()]+)|\bleave ([a-z][a-z0-9_]*) unset")


def in_cli_terms(message: str, flags: dict[str, str]) -> str:
    """A :class:`ConfigError` message in the CLI's terms: the API names arguments as Python does
    (``pass device='cpu' or leave device unset``, ``chunk_size=1024``); a CLI user reads flags
    (``pass --device cpu or omit --device``, ``--chunk-size 1024``); a switch is its flag alone
    (``check_tokenizer=False`` -> ``--no-check-tokenizer``). Only names in ``flags`` change
    (``{dest: "--flag"}``, e.g. from :func:`cli_flags`), so one message serves both callers."""

    def sub(m: re.Match) -> str:
        if m.group(3) is not None:
            flag = flags.get(m.group(3))
            return f"omit {flag}" if flag else m.group(0)
        flag = flags.get(m.group(1))
        if flag is None:
            return m.group(0)
        value, tail = m.group(2), ""
        if value.rstrip(".") in ("True", "False"):  # a switch: its flag alone (or "without" it)
            on = (value.rstrip(".") == "True") != flag.startswith("--no-")  # --no-x sets x=False
            return (flag if on else f"without {flag}") + value[len(value.rstrip(".")):]
        if value[:1] in "'\"":
            value = value[1:-1]
        elif value.endswith("."):  # end of a sentence, not part of the value
            value, tail = value[:-1], "."
        return f"{flag} {value}{tail}"

    return _ARG_RE.sub(sub, message)
