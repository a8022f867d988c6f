"""datatrove backend: the token files of datatrove's ``DocumentTokenizer``, read in place.

Layout (datatrove ``pipeline/tokens/tokenizer.py``, ``TokenizedFile``; little-endian, no headers)::

    NAME.ds           token ids of the documents back to back, TOKEN_SIZE bytes each:
                      2 (uint16) or 4 (uint32, tokenizers of more than 65536 ids)
    NAME.ds.index     uint64 [documents]: each document's END offset in tokens (exclusive), in order;
                      the last one is the number of tokens in NAME.ds. No leading 0, no count.
    NAME.ds.metadata  text lines: "TOKENIZER|TOKEN_SIZE", the token count, the count in words
                      (e.g. "1.2M"). Without a tokenizer name datatrove writes
                      "Unknown Tokenizer|TOKEN_SIZE|TOKEN_SIZE"; versions before uint32 support wrote the
                      tokenizer name alone (their files are uint16).
    NAME.ds.loss      optional (save_loss_metadata): one loss-mask byte per token; not read here.

Opening ``NAME.ds`` reads that file; opening a folder reads every ``*.ds`` directly inside it, in
sorted name order (what datatrove's ``DatatroveFolderDataset`` does), each file one piece
(:mod:`.pieces`). Documents come from each ``.ds.index`` (required: without it the document bounds
are lost, so the file is refused rather than read as one document).

The token size is never guessed: it is the metadata's ``|TOKEN_SIZE`` when recorded, else the file
size divided by the index's last end (exact: the file holds exactly that many ids); the two, and the
metadata's token count, must agree with the file size, or the file is refused. The metadata's
tokenizer name becomes the store's tokenizer name (``streamdata info`` shows it); it is a name only
(no digest), so the evaluator's tokenizer check cannot compare it and says nothing.

Checks at open: file sizes against the token size, each index non-decreasing and ending at its
file's token count, one token size and one tokenizer name across a folder's files, and
``check_document_index`` on the whole; with ``checksum`` (default) one pass over the ids computes
each file's checksum and checks every id against ``vocab_size``. Store dtype: ``choose_dtype``
of ``vocab_size`` when given, else the files' (uint16/uint32). Byte and word counts are unknown.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, StoreError
from ..format import resolve_inside, sha256_file
from .base import INDEX_IN_RAM, MappedFile
from .pieces import Piece, PiecedStore
from .raw_bin import check_import_ids, file_entry, import_dtype

__all__ = ["DatatroveMetadata", "DatatroveTokenStore", "datatrove_part", "is_datatrove_folder", "open_datatrove",
           "read_datatrove_metadata"]

SUFFIX = ".ds"
_PARTS = (".ds.index", ".ds.metadata", ".ds.loss")  # files beside NAME.ds that are not ids
_TOKEN_SIZES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_UNKNOWN = "Unknown Tokenizer"  # what datatrove writes when it was given no tokenizer name


@dataclass
class _DsFile:
    """One opened ``NAME.ds`` with what its side files said."""

    piece: Piece
    index: Path
    metadata: Path | None  # None: no .ds.metadata beside it
    token_size: int
    size_from: str  # where the token size came from
    tokenizer: str | None


@dataclass(frozen=True)
class DatatroveMetadata:
    """A parsed ``NAME.ds.metadata``: ``token_size`` None when this datatrove version did not record it."""

    tokenizer: str | None
    token_size: int | None
    token_count: int | None


def read_datatrove_metadata(path: Path) -> DatatroveMetadata:
    """Parse ``NAME.ds.metadata`` (layout: module docstring)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StoreError(f"datatrove metadata {str(path)!r} cannot be read ({e}): copy it again, or remove it "
                         "(the token size then comes from the .ds.index)") from None
    first = lines[0].strip() if lines else ""
    m = re.fullmatch(r"(.*)\|(\d+)", first)
    name, size = (m.group(1), int(m.group(2))) if m else (first, None)
    if size is not None and size not in _TOKEN_SIZES:
        raise StoreError(f"datatrove metadata {str(path)!r} records token size {size}, but datatrove writes 2 or 4 bytes "
                         "per token: the file is damaged")
    if name.startswith(_UNKNOWN) or not name:
        name = None
    count = int(lines[1]) if len(lines) > 1 and lines[1].strip().isdigit() else None
    return DatatroveMetadata(name, size, count)


def datatrove_part(path: Path) -> Path | None:
    """The ``NAME.ds`` that ``path`` belongs to when it is one of its side files (index, metadata, loss)."""
    for suffix in _PARTS:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            return path.with_name(path.name[: -len(suffix) + len(SUFFIX)])
    return None


def is_datatrove_folder(root: Path) -> bool:
    """A folder holding at least one ``*.ds`` file directly inside it."""
    return any(p.suffix == SUFFIX and p.is_file() for p in root.iterdir())


class DatatroveTokenStore(PiecedStore):
    """One ``.ds`` file or a folder of them. See module docstring."""

    def __init__(self, path: str | os.PathLike, *, vocab_size: int | None = None, eos_id: int | None = None,
                 checksum: bool = True):
        p = Path(path)
        self.path = str(p)
        self._pieces, self._other_files = [], []
        if p.is_dir():
            root = p
            names = sorted(q.name for q in p.iterdir() if q.suffix == SUFFIX and q.is_file())
            if not names:
                raise StoreError(f"{str(p)!r} holds no datatrove .ds files: pass the folder DocumentTokenizer wrote, or one .ds file")
        elif p.suffix == SUFFIX and p.is_file():
            root, names = p.parent, [p.name]
        else:
            raise StoreError(f"datatrove file {str(p)!r} does not exist: pass a NAME.ds file or the folder holding them")
        try:
            self._open(root, names, vocab_size, eos_id, checksum)
        except BaseException:
            self.close()
            raise

    def _open(self, root: Path, names: list[str], vocab_size: int | None, eos_id: int | None, checksum: bool) -> None:
        parts = [self._open_file(root, name) for name in names]
        sizes = {f.token_size for f in parts}
        tokenizers = {f.tokenizer for f in parts if f.tokenizer is not None}
        if len(sizes) > 1:
            raise StoreError(f"the .ds files in {str(root)!r} mix token sizes {sorted(sizes)}: they were written by "
                             "different tokenizers; open the files one by one")
        if len(tokenizers) > 1:
            raise StoreError(f"the .ds files in {str(root)!r} were written by different tokenizers {sorted(tokenizers)}: "
                             "open the files of one tokenizer (one by one, or move them into their own folder)")
        token_size = sizes.pop()
        fdt = _TOKEN_SIZES[token_size]
        dtype = import_dtype(fdt, vocab_size, f"datatrove dataset {self.path!r}")
        check_import_ids(eos_id, vocab_size, dtype, "datatrove")
        self._set_pieces([f.piece for f in parts], fdt, dtype, "datatrove")
        what = f"datatrove dataset {self.path!r}"
        shas = self._seal(what, vocab_size=vocab_size, eos_id=eos_id, checksum=checksum,
                          tokenizer_name=tokenizers.pop() if tokenizers else None, fmt="datatrove",
                          tool="streamdata.backends.datatrove", source={})
        files = []
        for f, sha in zip(parts, shas):
            same = checksum and self.piece_is_file_bytes(f.piece)
            files.append(file_entry(f.piece.file.path, sha if same else (sha256_file(f.piece.file.path) if checksum else "")))
            files += [file_entry(x, sha256_file(x) if checksum else "") for x in (f.index, f.metadata) if x is not None]
        self.manifest.source.update({
            "kind": "datatrove", "path": str(Path(self.path).resolve()), "files": files, "token_size": token_size,
            "file_dtype": fdt.name, "token_size_from": sorted({f.size_from for f in parts}),
            "documents": "one per .ds.index entry",
        })

    def _open_file(self, root: Path, name: str) -> _DsFile:
        """Open ``root/name`` and its side files and check them against each other."""
        path = resolve_inside(root, name, "datatrove file")
        ix_path = resolve_inside(root, name + ".index", "datatrove index")
        md_path = resolve_inside(root, name + ".metadata", "datatrove metadata")
        if not ix_path.is_file():
            raise StoreError(f"datatrove file {str(path)!r} has no document index {str(ix_path)!r} beside it: copy it "
                             "there (DocumentTokenizer writes one per .ds file)")
        meta = read_datatrove_metadata(md_path) if md_path.is_file() else DatatroveMetadata(None, None, None)
        ix = MappedFile(ix_path, "datatrove index")
        self._other_files.append(ix)
        if ix.size % 8:
            raise StoreError(f"datatrove index {str(ix_path)!r} has {ix.size} bytes, not a multiple of 8 (uint64 ends): "
                             "the file is truncated or damaged")
        ends = ix.array("<u8", ix.size // 8)
        data = MappedFile(path, "datatrove file")
        self._other_files.append(data)  # closed with the store, also when a later file is refused
        n_tok = int(ends[-1]) if len(ends) else 0
        size_from = ".ds.metadata"
        token_size = meta.token_size
        if token_size is None:  # older datatrove: the name only; the index and the file size decide
            size_from = ".ds.index and the file size"
            token_size = data.size // n_tok if n_tok and data.size % n_tok == 0 else 2
            if token_size not in _TOKEN_SIZES:
                raise StoreError(f"datatrove file {str(path)!r} has {data.size} bytes for the {n_tok} tokens its "
                                 f"index counts ({token_size} bytes each), but datatrove writes 2 or 4: the files "
                                 "belong to different runs; copy them again")
        if data.size != n_tok * token_size:
            raise StoreError(f"datatrove file {str(path)!r} has {data.size} bytes, but its index ends at token {n_tok} "
                             f"of {token_size} bytes ({size_from}): the .ds, its .index or its .metadata is "
                             "truncated or belongs to another file")
        if meta.token_count is not None and meta.token_count != n_tok:
            raise StoreError(f"datatrove metadata {str(md_path)!r} counts {meta.token_count} tokens, but the index "
                             f"ends at {n_tok}: the files belong to different runs; copy them again")
        for lo in range(0, len(ends), INDEX_IN_RAM):  # uint64: compared unsigned, no wrap
            block = ends[lo : lo + INDEX_IN_RAM + 1]
            down = np.flatnonzero(block[1:] < block[:-1])
            if down.size:
                raise StoreError(f"datatrove index {str(ix_path)!r} decreases at document {lo + int(down[0]) + 1}: "
                                 "the file is damaged")

        def local_ends(j0: int, j1: int, ends=ends) -> np.ndarray:
            return ends[j0:j1].astype(np.int64)  # <= n_tok (checked above), so no wrap

        return _DsFile(Piece(name, data, 0, n_tok, len(ends), local_ends), ix_path, md_path if md_path.is_file() else None,
                       token_size, size_from, meta.tokenizer)


def open_datatrove(path: str | os.PathLike, *, vocab_size: int | None = None, eos_id: int | None = None,
                   checksum: bool = True, dtype: str | None = None) -> DatatroveTokenStore:
    """Open datatrove token files read-only: ``path`` is a ``NAME.ds`` file or a folder of them
    (documents of all files in sorted name order). ``vocab_size``/``eos_id`` are recorded (ids are
    checked against ``vocab_size``); ``checksum=False`` skips the pass over the ids at open."""
    if dtype is not None:
        raise ConfigError(f"{os.fspath(path)!r} is a datatrove dataset, whose .ds.metadata/.ds.index record its "
                          "token size: drop the dtype option")
    return DatatroveTokenStore(path, vocab_size=vocab_size, eos_id=eos_id, checksum=checksum)
