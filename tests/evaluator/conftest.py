"""Evaluator test fixtures."""

from __future__ import annotations

import tempfile

import pytest


@pytest.fixture(autouse=True)
def _temp_files_in_tmp_path(tmp_path, monkeypatch):
    """Per-token memmaps without an explicit path go to a temporary file: keep them in tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
