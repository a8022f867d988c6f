"""Storage backends behind :class:`TokenStore`, one module per format, and the one :func:`open_store`.

- :mod:`.base`: the TokenStore interface, the memory-mapping helper, the open-time index check;
- :mod:`.npy` (our folder format), :mod:`.zarr` (zarr v3, local or fsspec URL; reader and writer),
  :mod:`.raw_bin` (nanoGPT ``.bin``), :mod:`.megatron` (Megatron-LM ``.bin``/``.idx``),
  :mod:`.memory` (ids already in memory: numpy arrays, torch tensors).

Backend modules import :mod:`.base` and never this dispatcher (no import circles); the dispatcher
imports a backend only when a store of its format is opened (zarr and fsspec load lazily).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StoreError
from ..format import read_manifest
from .base import TokenStore

__all__ = ["TokenStore", "open_store", "open_token_files"]


def open_store(path: Any, **kw: Any) -> TokenStore:
    """Open a finished store read-only. A folder without a complete manifest is refused.

    ``path``: an npy or zarr store folder; an fsspec URL of a store (``memory://``, ``file://``,
    ``s3://``, ...; zarr streams remotely, an npy store needs a local file system); existing token
    files read in place without re-tokenizing (:func:`open_token_files`: a raw nanoGPT-style ``.bin``
    or a Megatron ``.idx``/``.bin``/prefix); a numpy array or torch tensor of token ids
    (:class:`~.memory.MemoryTokenStore`); or an open TokenStore, returned as is.
    Keyword options go to the backend that opens ``path`` (e.g. ``storage_options`` for URLs,
    ``vocab_size`` for arrays and token files).
    """
    if isinstance(path, TokenStore):
        return path
    from .memory import MemoryTokenStore, is_array

    if is_array(path):
        return MemoryTokenStore(path, **kw)
    text = os.fspath(path)
    if "://" in text:  # fsspec URL (memory://, file://, s3://, gs://, https://): read-only, streamed
        return _open_url(text, **kw)
    root = Path(text)
    if root.is_file() or (not root.exists() and (Path(text + ".idx").is_file() or Path(text + ".bin").is_file())):
        return open_token_files(root, **kw)
    manifest = read_manifest(root)
    if kw:
        raise ConfigError(f"options {sorted(kw)} do not apply to the store folder {text!r}: drop them")
    if manifest.format == "npy":
        from .npy import NpyTokenStore

        return NpyTokenStore(root, manifest)
    if manifest.format == "zarr":
        from .zarr import ZarrTokenStore

        return ZarrTokenStore(root, manifest)
    raise StoreError(f"store {text!r} has format {manifest.format!r}, which this version cannot read: upgrade streamdata")


def _open_url(url: str, storage_options: dict | None = None) -> TokenStore:
    """A store behind an fsspec URL: zarr streams through fsspec; an npy store behind a URL that
    resolves to the local file system opens as that folder (memory-mapped); other npy stores are
    refused (they need a local file system)."""
    from .zarr import ZarrTokenStore, _Location

    loc = _Location(url, storage_options)
    manifest = loc.read_manifest()
    if manifest.format == "zarr":
        return ZarrTokenStore(url, manifest, storage_options=storage_options)
    if manifest.format == "npy":
        if loc.local:
            from .npy import NpyTokenStore

            return NpyTokenStore(Path(loc.root), manifest)
        raise StoreError(
            f"store {url!r} is an npy store, which opens only from a local path: copy it locally, or convert it "
            "with 'streamdata convert SRC DST --format zarr' and open the zarr store remotely"
        )
    raise StoreError(f"store {url!r} has format {manifest.format!r}, which this version cannot read: upgrade streamdata")


def open_token_files(path: str | os.PathLike, *, dtype: str | None = None, eos_id: int | None = None,
                     vocab_size: int | None = None, documents: str = "document", checksum: bool = True) -> TokenStore:
    """Open existing token files by path (what :func:`open_store` does with a path that is not a
    store folder; CLIs pass the options through): a Megatron ``.idx``, a ``.bin`` with an ``.idx``
    beside it, or a prefix with both opens as Megatron (``documents``); another ``.bin``, or a
    prefix with only a ``.bin``, as a raw file of ``dtype`` (default uint16). ``eos_id`` and
    ``vocab_size`` apply to both."""
    from .megatron import open_megatron
    from .raw_bin import open_raw_bin

    text = os.fspath(path)
    p = Path(text)
    prefix = None
    if p.suffix == ".idx":
        prefix = text[:-4]
    elif p.suffix == ".bin" and Path(text[:-4] + ".idx").is_file():
        prefix = text[:-4]
    elif not p.exists() and Path(text + ".idx").is_file():
        prefix = text
    if prefix is not None:
        if dtype is not None:
            raise ConfigError(f"{text!r} is a Megatron dataset, whose .idx records its dtype: drop the dtype option")
        return open_megatron(prefix, documents=documents, vocab_size=vocab_size, eos_id=eos_id, checksum=checksum)
    raw = p if p.suffix == ".bin" and p.is_file() else (Path(text + ".bin") if not p.exists() else None)
    if raw is not None and raw.is_file():
        return open_raw_bin(raw, dtype or "uint16", eos_id, vocab_size, checksum=checksum)
    raise StoreError(
        f"{text!r} is neither a store folder, a raw token .bin, nor a Megatron .idx/.bin pair: pass one of those "
        "(for other raw id files use streamdata.open_raw_bin(path, dtype=...))"
    )
