"""TokenStore: the read interface every backend implements, and :func:`open_store`.

A store is one global token address space ``[0, len(store))`` over its shards plus a document
index. Consumers (the window loader, the evaluator, ``streamdata verify``) use only this interface,
so a backend (raw numpy memmap shards, zarr v3, imported nanoGPT/Megatron files) is a matter of
implementing :meth:`TokenStore.read_into` and friends.

Performance contract for backends:
- ``read_into`` copies a range into a caller-owned buffer (the loader's pinned host slot) with no
  intermediate allocation where the backend allows it.
- ``release`` is a hint that a range will not be read again soon, so a sequential pass over a file
  larger than RAM keeps the resident set bounded (numpy backend: ``madvise``/``posix_fadvise``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from .errors import ConfigError, StoreError
from .format import Manifest, read_manifest

__all__ = ["TokenStore", "open_store"]


class TokenStore(ABC):
    """Read-only view of a token store. Use as a context manager or call :meth:`close`."""

    manifest: Manifest
    path: str

    # ---- required by backends -------------------------------------------------------------
    @abstractmethod
    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, stop)`` into ``out[: stop - start]`` (same dtype as the store)."""

    # Backends set these in __init__: the document index as int64 arrays (memory-mapped or small).
    _offsets: np.ndarray
    _bytes: np.ndarray | None = None
    _words: np.ndarray | None = None

    @property
    def doc_offsets(self) -> np.ndarray:
        """int64 ``[num_documents + 1]``: token offset of each document start; last == ``len(self)``."""
        return self._offsets

    @property
    def doc_bytes(self) -> np.ndarray | None:
        """int64 ``[num_documents]`` UTF-8 bytes per document, or None when unknown (imports)."""
        return self._bytes

    @property
    def doc_words(self) -> np.ndarray | None:
        """int64 ``[num_documents]`` whitespace-separated words per document, or None when unknown."""
        return self._words

    def release(self, start: int, stop: int) -> None:  # noqa: B027 - optional hint, default no-op
        """Hint: tokens ``[start, stop)`` will not be read again soon; the backend may drop them."""

    def prefetch(self, start: int, stop: int) -> None:  # noqa: B027 - optional hint, default no-op
        """Hint: tokens ``[start, stop)`` will be read soon; the backend may start reading them."""

    def close(self) -> None:  # noqa: B027 - backends with open files override
        """Release file handles and mappings. Arrays returned by :meth:`read` stay valid (copies)."""

    # ---- shared behaviour -----------------------------------------------------------------
    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.dtype).newbyteorder("<")

    @property
    def num_documents(self) -> int:
        return self.manifest.num_documents

    @property
    def vocab_size(self) -> int | None:
        v = self.manifest.tokenizer.get("vocab_size")
        return None if v is None else int(v)

    def __len__(self) -> int:
        return self.manifest.num_tokens

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        n = len(self)
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= n:
            raise ConfigError(f"token range [{start}, {stop}) is outside the store's [0, {n}): pass 0 <= start <= stop <= {n}")
        return start, stop

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as a new array of the store's dtype (crosses shards freely)."""
        start, stop = self._check_range(start, stop)
        out = np.empty(stop - start, dtype=self.dtype)
        self.read_into(start, stop, out)
        return out

    def document_bounds(self, i: int) -> tuple[int, int]:
        """Global token range ``[start, stop)`` of document ``i`` (including its EOS/BOS ids)."""
        if not 0 <= i < self.num_documents:
            raise ConfigError(f"document index {i} is outside [0, {self.num_documents})")
        off = self.doc_offsets
        return int(off[i]), int(off[i + 1])

    def document(self, i: int) -> np.ndarray:
        return self.read(*self.document_bounds(i))

    def __enter__(self) -> "TokenStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, tokens={len(self)}, documents={self.num_documents}, "
            f"dtype={self.manifest.dtype}, format={self.manifest.format})"
        )


def open_store(path: str | os.PathLike) -> TokenStore:
    """Open a finished store read-only. A folder without a complete manifest is refused.

    ``path``: an npy or zarr store folder; an fsspec URL of a store (``memory://``, ``file://``,
    ``s3://``, ...; zarr streams remotely); or existing token files read in place without
    re-tokenizing (:mod:`streamdata.imports`): a raw nanoGPT-style ``.bin`` (uint16; use
    ``open_raw_bin`` for another dtype or EOS document bounds) or a Megatron ``.idx``/``.bin``/prefix.
    """
    if isinstance(path, TokenStore):
        return path
    text = os.fspath(path)
    if "://" in text:  # fsspec URL (memory://, file://, s3://, gs://, https://): read-only, streamed
        from .backends.zarr import open_url_store

        return open_url_store(text)
    root = Path(text)
    if root.is_file() or (not root.exists() and (Path(text + ".idx").is_file() or Path(text + ".bin").is_file())):
        # existing token files, read in place: a raw .bin (uint16) or a Megatron .bin/.idx pair or prefix
        from .imports import open_token_files

        return open_token_files(root)
    manifest = read_manifest(root)
    fmt = manifest.format
    if fmt == "npy":
        from .backends.npy import NpyTokenStore

        return NpyTokenStore(root, manifest)
    if fmt == "zarr":
        from .backends.zarr import ZarrTokenStore

        return ZarrTokenStore(root, manifest)
    raise StoreError(f"store {str(root)!r} has format {fmt!r}, which this version cannot read: upgrade streamdata")
