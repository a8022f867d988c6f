"""Proof that the batch loop queues work without waiting for the device: :class:`SyncDebug`.

``STREAMEVAL_SYNC_DEBUG`` = ``warn`` or ``error`` (``1``) runs the engine's batch loop under
``torch.cuda.set_sync_debug_mode`` (CUDA only; elsewhere there is no sync to catch); a caller of
:meth:`evaluator.StreamingEvaluator.run` may pass a :class:`SyncDebug` itself (``sync_debug=``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .errors import ConfigError

__all__ = ["SYNC_DEBUG_ENV", "SyncDebug"]

SYNC_DEBUG_ENV = "STREAMEVAL_SYNC_DEBUG"
_MODES = {"": 0, "0": 0, "off": 0, "warn": 1, "1": 2, "error": 2}


class SyncDebug:
    """``torch.cuda.set_sync_debug_mode(mode)`` (0 off, 1 warn, 2 error) over the batch loop, so a
    test or a user can prove the loop queues work without waiting for the device. :meth:`allowed`
    lifts it where the loop syncs by design: the progress line (every ``log_interval`` windows), the
    detail block flush (every few thousand windows), the per-token block drain, a checkpoint. The
    previous mode comes back on exit, also on errors. The mode is process-wide: the loader's reader
    thread runs under it too. A SyncDebug built directly applies its mode on any device (a CPU test
    of where the engine sets and lifts it); :meth:`from_env` turns it off where there is no CUDA."""

    def __init__(self, mode: int):
        self.mode = mode
        self.active = mode != 0
        self._saved: list[int] = []

    @staticmethod
    def from_env(device: torch.device) -> "SyncDebug":
        """The mode ``STREAMEVAL_SYNC_DEBUG`` names (off when unset), for a loop on ``device``."""
        text = os.environ.get(SYNC_DEBUG_ENV, "").strip().lower()
        if text not in _MODES:
            raise ConfigError(f"{SYNC_DEBUG_ENV}={text!r} is not one of warn, error, 1, 0: "
                              "set it to warn or error, or unset it")
        # Syncs exist only on CUDA: elsewhere the setting has nothing to check.
        return SyncDebug(_MODES[text] if device.type == "cuda" else 0)

    def _set(self, mode: int) -> None:
        self._saved.append(torch.cuda.get_sync_debug_mode())
        torch.cuda.set_sync_debug_mode(mode)

    def _restore(self) -> None:
        torch.cuda.set_sync_debug_mode(self._saved.pop())

    def __enter__(self) -> "SyncDebug":
        if self.active:
            self._set(self.mode)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self._restore()

    @contextmanager
    def allowed(self) -> Iterator[None]:
        """The mode lifted (0) inside: a sync the loop makes by design."""
        if not self.active:
            yield
            return
        self._set(0)
        try:
            yield
        finally:
            self._restore()
