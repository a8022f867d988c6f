"""Storage backends behind :class:`TokenStore`, one module per format, and the one :func:`open_store`.

- :mod:`.base`: the TokenStore interface, the memory-mapping helper, the open-time index check;
- :mod:`.npy` (our folder format), :mod:`.zarr` (zarr v3, local or fsspec URL; reader and writer),
  :mod:`.raw_bin` (nanoGPT ``.bin``), :mod:`.megatron` (Megatron-LM ``.bin``/``.idx``),
  :mod:`.datatrove` (datatrove ``.ds``/``.ds.index``), :mod:`.litdata` (LitData TokensLoader folders;
  both read through :mod:`.pieces`), :mod:`.memory` (ids already in memory: numpy arrays, torch tensors).

No silent guess: a file that belongs to a recognised format (a LitData chunk, a datatrove side file,
a Megatron ``.bin`` without its ``.idx``, a shard of one of our stores) is refused with one line
naming what it is and what to open instead; only a ``.bin`` that is none of these opens as a raw
file, and its manifest says whether its dtype was given or assumed.

Backend modules import :mod:`.base` and never this dispatcher (no import circles); the dispatcher
imports a backend only when a store of its format is opened (zarr and fsspec load lazily).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StoreError
from ..format import BUILD_DIR, MANIFEST_NAME, SHARD_DIR, read_manifest
from .base import TokenStore

__all__ = ["TokenStore", "open_store", "open_token_files"]


def open_store(path: Any, **kw: Any) -> TokenStore:
    """Open a finished store read-only. A folder without a complete manifest is refused.

    ``path``: an npy or zarr store folder; an fsspec URL of a store (``memory://``, ``file://``,
    ``s3://``, ...; zarr streams remotely, an npy store needs a local file system); existing token
    files read in place without re-tokenizing (:func:`open_token_files`: a raw nanoGPT-style ``.bin``,
    a Megatron ``.idx``/``.bin``/prefix, a datatrove ``.ds`` file or folder of them, a LitData
    TokensLoader folder); a numpy array or torch tensor of token ids
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
    if root.is_file() or (not root.exists() and any(Path(text + s).is_file() for s in _PREFIX_SUFFIXES)) \
            or foreign_folder(root) is not None:
        return open_token_files(root, **kw)
    _refuse_export_folder(root)
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


def _refuse_export_folder(root: Path) -> None:
    """A Megatron or nanoGPT export folder (``streamdata export``) is no store: name the file to open."""
    from ..output import EXPORT_MARKER

    if (root / MANIFEST_NAME).exists() or not (root / EXPORT_MARKER).is_file():
        return
    for name, what in (("tokens.idx", "Megatron"), ("train.bin", "nanoGPT")):
        if (root / name).is_file():
            target = str(root / (name[:-4] if what == "Megatron" else name))
            raise StoreError(f"{str(root)!r} is a streamdata export of {what} files, not a store: open {target!r}"
                             + (" (with eos_id / --eos-id to recover its documents)" if what == "nanoGPT" else ""))


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


#: Extensions tried after a path that does not exist (a dataset prefix: Megatron, raw, datatrove).
_PREFIX_SUFFIXES = (".idx", ".bin", ".ds")
_MEGATRON_NAMES = ("_document", "_sentence")  # Megatron preprocess_data.py: PREFIX_{key}_{level}.bin


def foreign_folder(root: Path) -> str | None:
    """"litdata" or "datatrove" when ``root`` is a folder of that tool's token files, else None.
    A folder with our manifest or an unfinished build of ours is ours, whatever else it holds."""
    if not root.is_dir() or (root / MANIFEST_NAME).exists() or (root / BUILD_DIR).exists():
        return None
    from .datatrove import is_datatrove_folder
    from .litdata import INDEX_NAME

    if (root / INDEX_NAME).is_file():
        return "litdata"
    return "datatrove" if is_datatrove_folder(root) else None


def _recognised(p: Path, dtype: str | None) -> str | None:
    """One line saying what ``p`` is and what to open instead, when ``p`` belongs to a recognised
    format that must not be read as a raw .bin; None for a plain id file."""
    from .datatrove import datatrove_part
    from .litdata import INDEX_NAME, describe_litdata_chunk

    ds = datatrove_part(p)
    if ds is not None:
        return f"{str(p)!r} is a side file of the datatrove token file {str(ds)!r}: open that .ds file (or its folder)"
    if p.name == INDEX_NAME:
        return f"{str(p)!r} is the index of the LitData dataset {str(p.parent)!r}: open the folder instead"
    if p.name == MANIFEST_NAME:
        return f"{str(p)!r} is the manifest of the store {str(p.parent)!r}: open the folder instead"
    if p.suffix != ".bin":
        return None
    store = p.parent.parent
    if p.parent.name == SHARD_DIR and re.fullmatch(r"tokens-\d+\.bin", p.name) and (
            (store / MANIFEST_NAME).exists() or (store / BUILD_DIR).exists()):
        state = "store" if (store / MANIFEST_NAME).exists() else "unfinished build of a store"
        return (f"{str(p)!r} is a shard of the streamdata {state} {str(store)!r} (the folder holds its dtype and document "
                "index): open the folder instead")
    chunk = describe_litdata_chunk(p)
    if chunk is not None:
        return chunk
    if dtype is None and p.stem.endswith(_MEGATRON_NAMES):
        return (f"{str(p)!r} is named like a Megatron-LM data file but {p.stem + '.idx'!r} is not beside it: copy the "
                ".idx there and open either file (to read it as raw ids anyway, pass its dtype: --dtype or dtype=)")
    return None


def open_token_files(path: str | os.PathLike, *, dtype: str | None = None, eos_id: int | None = None,
                     vocab_size: int | None = None, documents: str = "document", checksum: bool = True) -> TokenStore:
    """Open existing token files by path (what :func:`open_store` does with a path that is not a
    store folder; CLIs pass the options through): a Megatron ``.idx``, a ``.bin`` with an ``.idx``
    beside it, or a prefix with both opens as Megatron (``documents``); a datatrove ``.ds`` (or a
    prefix with one) or a folder of them as datatrove; a folder with a LitData ``index.json`` as
    LitData; another ``.bin``, or a prefix with only a ``.bin``, as a raw file of ``dtype`` (default
    uint16, recorded as assumed) unless it belongs to a recognised format (refused with one line
    saying what to open instead). ``eos_id`` and ``vocab_size`` apply to all; ``dtype`` only to raw
    files (the other formats record theirs); ``documents="sequence"`` only to Megatron."""
    from .megatron import open_megatron
    from .raw_bin import open_raw_bin

    text = os.fspath(path)
    p = Path(text)
    kind = foreign_folder(p)
    ds = p if p.suffix == ".ds" and p.is_file() else (Path(text + ".ds") if not p.exists() and Path(text + ".ds").is_file() else None)
    if kind is not None or ds is not None:
        if documents != "document":
            raise ConfigError(f"documents={documents!r} applies to Megatron datasets only; {text!r} is "
                              f"{'a LitData' if kind == 'litdata' else 'a datatrove'} dataset: drop the option")
        opts = {"vocab_size": vocab_size, "eos_id": eos_id, "checksum": checksum, "dtype": dtype}
        if kind == "litdata":
            from .litdata import open_litdata

            return open_litdata(p, **opts)
        from .datatrove import open_datatrove

        return open_datatrove(p if kind else ds, **opts)
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
    if p.is_file():
        what = _recognised(p, dtype)
        if what is not None:
            raise StoreError(what)
    raw = p if p.suffix == ".bin" and p.is_file() else (Path(text + ".bin") if not p.exists() else None)
    if raw is not None and raw.is_file():
        what = _recognised(raw, dtype)
        if what is not None:
            raise StoreError(what)
        return open_raw_bin(raw, dtype or "uint16", eos_id, vocab_size, checksum=checksum, dtype_assumed=dtype is None)
    raise StoreError(
        f"{text!r} is neither a store folder, a raw token .bin, nor a Megatron .idx/.bin pair (nor a datatrove .ds or "
        "a LitData folder): pass one of those (for other raw id files use streamdata.open_raw_bin(path, dtype=...))"
    )
