"""Errors that reach users.

Every error a user can cause (bad argument, bad input file, damaged store) is a
:class:`StreamdataError` whose message is one line naming the offending value and what to do.
The CLIs print that line and exit non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re

__all__ = ["StreamdataError", "StoreError", "ConfigError", "SourceError", "TokenizerError", "SuggestingParser", "brief",
           "missing_local_path",
           "cli_flags", "in_cli_terms"]


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


def brief(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters, cut at a word
    boundary with an ellipsis (a message cut mid-word reads like a typo: "...try aga")."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if len(line) <= limit:
        return line
    cut = line[:limit].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut + " ..."


# names that are files, never hub ids: a hub id is "name" or "org/name"
_FILE_SUFFIXES = (".json", ".jsn", ".jsonl", ".model", ".txt", ".bin", ".pt", ".pth", ".safetensors", ".yaml", ".yml")


def missing_local_path(spec: str) -> str | None:
    """For a ``--tokenizer``/``--model`` value that is written as a local path (``./x``, ``~/x``,
    ``/x``, ``a/b/c``, or a file name such as ``tokenizer.jsn``) and does not exist: a hint for the
    message, ``" (did you mean 'x'?)"`` with the closest name in its folder, or ``""``; None when it
    exists or may be a hub id. A hub look-up of a typo costs ~25 s of retries offline and ends in a
    confusing message."""
    s = os.fspath(spec)
    path = os.path.expanduser(s)
    if os.path.exists(path):
        return None
    written_as_path = (s.startswith((".", "~", os.sep)) or os.path.isabs(s) or s.count("/") > 1
                       or s.lower().endswith(_FILE_SUFFIXES))
    if not written_as_path:
        return None
    folder, name = os.path.split(os.path.abspath(path))
    hint = ""
    if os.path.isdir(folder):
        close = difflib.get_close_matches(name, os.listdir(folder), n=1, cutoff=0.6)
        if close:
            hint = f" (did you mean {os.path.join(os.path.dirname(s), close[0])!r}?)"
    return hint


class SuggestingParser(argparse.ArgumentParser):
    """argparse that names the closest valid flag for a mistyped one (``--chunksize``: did you mean
    ``--chunk-size``?), looking at the flags of the subcommand being parsed and of the parser."""

    def error(self, message: str):  # noqa: D102 - argparse's hook for every usage error
        m = re.match(r"unrecognized arguments: (.*)$", message)
        if m:
            hints = []
            options = self._all_long_options()
            for word in m.group(1).split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{word}: did you mean {close[0]}?")
            if hints:
                message = f"{message} ({'; '.join(hints)})"
        super().error(message)

    def _all_long_options(self) -> list[str]:
        seen: list[str] = []
        todo: list[argparse.ArgumentParser] = [self]
        while todo:
            p = todo.pop()
            for act in p._actions:  # argparse keeps no public list of a parser's actions
                if isinstance(act, argparse._SubParsersAction):
                    todo.extend(act.choices.values())
                seen.extend(o for o in act.option_strings if o.startswith("--") and o not in seen)
        return seen


def cli_flags(parser) -> dict[str, str]:
    """``{dest: "--flag"}`` for every long option of an argparse parser and its subcommands."""
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


# (not inside a path, a file name or a quoted value: "/out/per_token_kl.f32" stays as it is)
_CALL_RE = re.compile(r"\b[A-Za-z_][\w.]*\([^()]*\)")
_BARE_RE = re.compile(r"(?<![-\w./'\"])([a-z][a-z0-9]*(?:_[a-z0-9]+)+)\b(?![-=(/\w]|\.\w)")


def in_cli_terms(message: str, flags: dict[str, str]) -> str:
    """A :class:`ConfigError` message in the CLI's terms: the API names arguments as Python does
    (``pass device='cpu' or leave device unset``, ``chunk_size=1024``); a CLI user reads flags
    (``pass --device cpu or omit --device``, ``--chunk-size 1024``); a switch is its flag alone
    (``check_tokenizer=False`` -> ``--no-check-tokenizer``), and a bare snake_case name of a flag is
that flag (``limit max_tokens`` -> ``limit --max-tokens``). Only names in ``flags`` change
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

    # then names the API writes bare ("or limit max_tokens"): only snake_case names of a flag
    def plain(text: str) -> str:
        return _BARE_RE.sub(lambda m: flags.get(m.group(1), m.group(0)), _ARG_RE.sub(sub, text))

    # a Python call the message quotes (``open_raw_bin(path, dtype=...)``) stays Python: half a call
    # in flags ("open_raw_bin(path, --dtype ...)") is neither
    out, at = [], 0
    for call in _CALL_RE.finditer(message):
        out += [plain(message[at:call.start()]), call.group(0)]
        at = call.end()
    return "".join(out) + plain(message[at:])
