"""litdata backend: a LitData token folder (``optimize(..., item_loader=TokensLoader())``), read in place.

Layout (LitData ``streaming/writer.py`` ``BinaryWriter``, ``streaming/item_loader.py`` ``TokensLoader``;
all little-endian)::

    FOLDER/index.json      {"chunks": [{"filename": "chunk-R-K.bin", "chunk_size": items,
                                        "dim": tokens (null when the first item was empty),
                                        "chunk_bytes": bytes}, ...],
                            "config": {"data_format": ["no_header_tensor:D"] or ["no_header_numpy:D"],
                                       "compression": null, "encryption": null,
                                       "item_loader": "TokensLoader" (recorded by newer versions),
                                       "chunk_size", "chunk_bytes", "data_spec"}, "updated_at": ...}
    FOLDER/chunk-R-K.bin   uint32 N (items in the chunk)
                           uint32 offsets[N + 1]: byte offset in this file of each item's start, then
                                  the end of the last item (offsets[0] = 4 * (N + 2), offsets[N] = file size)
                           the items: each the raw ids of one 1-D tensor or array (no header), dtype D

``D`` indexes LitData's dtype tables (``constants.py``): tensors ``_TORCH_DTYPES_MAPPING`` (int32 is
16, the last key of torch.int32 = torch.int, what its serializer records), arrays
``_NUMPY_DTYPES_MAPPING`` (numpy's integer types in ``np.sctypes`` order). ``chunk_bytes`` is the chunk
file's size in LitData 0.2.x and the items' bytes in older versions; either is accepted.

Token address space: the chunks in ``index.json`` order, each chunk's items in order; every token is
read (LitData's own TokensLoader cuts fixed ``block_size`` blocks across items and drops each chunk's
tail that does not fill a block: those tokens are here too). Each chunk's data region is one piece
(:mod:`.pieces`, one manifest shard, memory-mapped).

Documents: one per LitData *item*, the unit ``optimize``'s function returned, because it is the only
boundary the files record. In the usual pipelines (litgpt's prepare scripts) an item is one tokenized
document with its EOS, so document mode scores the documents as written; where a pipeline packed
fixed-size blocks, each block is a document (evaluate such data in stream mode).

Refused (one line each): compressed or encrypted chunks, a loader other than TokensLoader, a data
format other than one integer tensor/array per item, an index that lists no chunks and no config
(what LitData 0.2.76's ``optimize`` leaves, exiting 0, after an empty item: the data is lost).
Checks at open: every chunk file inside the folder, its item count, offsets (start after the header,
never decrease, end at the file size, whole ids per item), its ``dim`` and ``chunk_bytes`` against
index.json; with ``checksum`` (default) one pass over the ids computes each chunk's checksum and
checks every id against ``vocab_size``. Store dtype:
``choose_dtype(vocab_size)`` when given, else uint16 for 8/16-bit ids and uint32 for 32/64-bit ones
(int32 ids are read as uint32 without a copy, so a negative id reads as one >= 2^31, which the
``vocab_size`` check and ``verify`` catch; narrower or wider ids are converted with a range check).
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from ..format import resolve_inside, sha256_file
from .base import MappedFile
from .pieces import Piece, PiecedStore
from .raw_bin import check_import_ids, file_entry, import_dtype

__all__ = ["INDEX_NAME", "LitdataTokenStore", "describe_litdata_chunk", "litdata_dtype", "open_litdata"]

INDEX_NAME = "index.json"
# LitData constants.py: _TORCH_DTYPES_MAPPING and _NUMPY_DTYPES_MAPPING (integer entries; others are refused)
_TENSOR_DTYPES = {11: "u1", 12: "i1", 13: "<i2", 14: "<i2", 15: "<i4", 16: "<i4", 17: "<i8", 18: "<i8", 20: "<u2"}
_NUMPY_DTYPES = {0: "i1", 1: "<i2", 2: "<i4", 3: "<i8", 4: "u1", 5: "<u2", 6: "<u4", 7: "<u8"}
_SERIALIZERS = {"no_header_tensor": _TENSOR_DTYPES, "no_header_numpy": _NUMPY_DTYPES}


def litdata_dtype(data_format: Any, where: str) -> np.dtype:
    """The id dtype of a token dataset's ``config["data_format"]`` (refused unless one integer tensor/array per item)."""
    fmt = data_format[0] if isinstance(data_format, list) and len(data_format) == 1 else None
    m = re.fullmatch(r"(no_header_tensor|no_header_numpy):(\d+)", fmt) if isinstance(fmt, str) else None
    if m is None:
        raise StoreError(f"{where}: data_format {data_format!r} is not a token dataset (one 1-D tensor or array of ids per "
                         "item, what optimize(..., item_loader=TokensLoader()) writes): only LitData token folders are read")
    table = _SERIALIZERS[m.group(1)]
    code = int(m.group(2))
    if code not in table:
        raise StoreError(f"{where}: data_format {fmt!r} holds non-integer values (dtype code {code}), not token ids: "
                         "import a token dataset")
    return np.dtype(table[code])


def _field(d: dict, key: str, kind: type | tuple, where: str, what: str) -> Any:
    v = d.get(key)
    if not isinstance(v, kind) or isinstance(v, bool):
        raise StoreError(f"{where}: field {key!r} is {v!r}, expected {what}: the index is damaged; copy the folder again")
    return v


def describe_litdata_chunk(path: Path) -> str | None:
    """What to say about ``path`` when it is a LitData chunk file (so it is never read as raw ids), or None.

    A chunk listed by the ``index.json`` beside it is one for certain; without an index, a file whose
    first uint32 N is followed by offsets that start right after the header and end exactly at the
    file's size has LitData's chunk layout (a raw id file matching both by chance is vanishingly rare)."""
    folder = path.parent
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            chunks = json.loads(index.read_bytes()).get("chunks", [])
            listed = any(isinstance(c, dict) and c.get("filename") == path.name for c in chunks)
        except (OSError, ValueError, AttributeError):
            listed = False
        if listed:
            return (f"{str(path)!r} is a chunk of the LitData dataset {str(folder)!r} (listed in its {INDEX_NAME}; "
                    "a header, then ids): open the folder instead")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            n, first = struct.unpack("<II", head)
            if first != 4 * (n + 2) or first > size:
                return None
            f.seek(4 + 4 * n)
            (last,) = struct.unpack("<I", f.read(4))
    except (OSError, struct.error):
        return None
    if last != size:
        return None
    return (f"{str(path)!r} has the layout of a LitData chunk ({n} items: a uint32 count and offsets that end at its "
            f"size) without its {INDEX_NAME}: copy the dataset's {INDEX_NAME} beside it and open the folder "
            "(to read its bytes as raw ids anyway: streamdata.open_raw_bin(path, dtype=...))")


class LitdataTokenStore(PiecedStore):
    """A LitData TokensLoader folder. See module docstring."""

    def __init__(self, folder: str | os.PathLike, *, vocab_size: int | None = None, eos_id: int | None = None,
                 checksum: bool = True):
        root = Path(folder)
        self.path = str(root)
        self._pieces, self._other_files = [], []
        index = root / INDEX_NAME
        if not index.is_file():
            raise StoreError(f"{str(root)!r} has no {INDEX_NAME}: it is not a LitData dataset folder")
        where = str(index)
        try:
            d = json.loads(index.read_bytes())
        except (OSError, ValueError) as e:
            raise StoreError(f"{where!r} is not readable JSON ({e}): copy the LitData folder again") from None
        if isinstance(d, dict) and d.get("chunks") == [] and d.get("config") is None:
            # what LitData 0.2.76's optimize leaves, exiting 0, when an empty item stops its chunk cutting
            # (tests/streamdata/data/README.md): the chunks it wrote are not listed, the rest is lost
            raise StoreError(f"{where!r} lists no chunks (and no config): the optimize run that wrote it saved no "
                             "usable data; re-run optimize (LitData 0.2.76 does this when an item is empty: "
                             "leave empty items out)")
        if not isinstance(d, dict) or not isinstance(d.get("chunks"), list) or not isinstance(d.get("config"), dict):
            raise StoreError(f"{where!r} has no 'chunks' list and 'config' object: it is not a LitData index")
        cfg = d["config"]
        for key, what in (("compression", "compressed"), ("encryption", "encrypted")):
            if cfg.get(key):
                raise StoreError(f"{where}: the chunks are {what} ({key}={cfg[key]!r}), which this reader does not "
                                 f"undo: re-run optimize without {key}, or read it with LitData")
        loader = cfg.get("item_loader")
        if loader is not None and loader != "TokensLoader":
            raise StoreError(f"{where}: item_loader is {loader!r}, not 'TokensLoader': only LitData token folders "
                             "(optimize(..., item_loader=TokensLoader())) are read")
        fdt = litdata_dtype(cfg.get("data_format"), where)
        dtype = import_dtype(fdt, vocab_size, f"LitData dataset {self.path!r}")
        check_import_ids(eos_id, vocab_size, dtype, "LitData")
        try:
            pieces = [self._open_chunk(root, c, i, fdt, where) for i, c in enumerate(d["chunks"])]
            self._set_pieces(pieces, fdt, dtype, "litdata")
            shas = self._seal(f"LitData dataset {self.path!r}", vocab_size=vocab_size, eos_id=eos_id, checksum=checksum,
                              tokenizer_name=None, fmt="litdata", tool="streamdata.backends.litdata", source={})
            files = [file_entry(index, sha256_file(index) if checksum else "")]
            for p, sha in zip(pieces, shas):
                files.append(file_entry(p.file.path, sha256_file(p.file.path) if checksum else ""))
            self.manifest.source.update({
                "kind": "litdata", "path": str(root.resolve()), "files": files, "file_dtype": fdt.name,
                "data_format": cfg["data_format"][0], "item_loader": loader, "items": self.num_documents,
                "documents": "one per LitData item",
            })
        except BaseException:
            self.close()
            raise

    def _open_chunk(self, root: Path, c: Any, i: int, fdt: np.dtype, where: str) -> Piece:
        at = f"{where} chunks[{i}]"
        if not isinstance(c, dict):
            raise StoreError(f"{at} is {c!r}, not an object: the index is damaged; copy the folder again")
        name = _field(c, "filename", str, at, "a file name")
        items = _field(c, "chunk_size", int, at, "an item count")
        dim = c.get("dim")
        path = resolve_inside(root, name, "LitData chunk")
        f = MappedFile(path, "LitData chunk")
        self._other_files.append(f)  # closed with the store, also when a later chunk is refused
        header = 4 * (items + 2)
        bad = f"LitData chunk {str(path)!r}"
        if f.size < header:
            raise StoreError(f"{bad} has {f.size} bytes, fewer than the header of its {items} items ({header}): "
                             "the file is truncated")
        n = int(f.array("<u4", 1)[0])
        if n != items:
            raise StoreError(f"{bad} holds {n} items but {INDEX_NAME} says {items}: the chunk belongs to another "
                             "index; copy the folder again")
        offsets = f.array("<u4", items + 1, 4)
        if int(offsets[0]) != header or int(offsets[-1]) != f.size or bool((np.diff(offsets.astype(np.int64)) < 0).any()):
            raise StoreError(f"{bad} has item offsets that do not run from its {header}-byte header to its size "
                             f"({f.size} bytes) without decreasing: the file is damaged")
        rel = offsets.astype(np.int64) - header  # bytes of the items region before each item
        if bool((rel % fdt.itemsize).any()):
            raise StoreError(f"{bad} has an item whose size is not a whole number of {fdt.name} ids: its dtype is "
                             "not the data_format's, or the file is damaged")
        tokens = int(rel[-1]) // fdt.itemsize
        if dim is not None and dim != tokens:
            raise StoreError(f"{bad} holds {tokens} ids but {INDEX_NAME} says dim={dim!r}: the chunk belongs to "
                             "another index; copy the folder again")
        cb = c.get("chunk_bytes")
        if cb is not None and cb not in (f.size, f.size - header):
            raise StoreError(f"{bad} has {f.size} bytes but {INDEX_NAME} says chunk_bytes={cb!r}: the file is "
                             "truncated or belongs to another index")

        def local_ends(j0: int, j1: int, offsets=offsets, header=header) -> np.ndarray:
            return (offsets[j0 + 1 : j1 + 1].astype(np.int64) - header) // fdt.itemsize

        return Piece(name, f, header, tokens, items, local_ends)


def open_litdata(folder: str | os.PathLike, *, vocab_size: int | None = None, eos_id: int | None = None,
                 checksum: bool = True, dtype: str | None = None) -> LitdataTokenStore:
    """Open a LitData token folder (the output of ``optimize(..., item_loader=TokensLoader())``)
    read-only, one document per item. ``vocab_size``/``eos_id`` are recorded (ids are checked
    against ``vocab_size``); ``checksum=False`` skips the pass over the ids at open."""
    if dtype is not None:
        raise ConfigError(f"{os.fspath(folder)!r} is a LitData dataset, whose {INDEX_NAME} records its dtype: "
                          "drop the dtype option")
    return LitdataTokenStore(folder, vocab_size=vocab_size, eos_id=eos_id, checksum=checksum)
