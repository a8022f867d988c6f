"""Source stage: a Hugging Face dataset (hub id, local files, or a ``save_to_disk`` folder) -> texts.

Everything goes through :mod:`datasets` (``load_dataset`` / ``load_from_disk``), so hub datasets,
local files and saved datasets behave alike, and ``streaming=True`` yields an ``IterableDataset``
that is never materialised. Documents come out in a deterministic order in batches of Python
strings bounded by their UTF-8 size; ``skip`` lets a resumed build continue after the documents it
already wrote. With ``sample_by`` line or paragraph, blank units are not documents (filtered out).
With ``ids_column`` the column holds token ids already (lists of integers, e.g. a pre-tokenized
``input_ids``): batches are then :class:`IdsBatch` (flat int64 ids and each row's length, straight
from Arrow, no Python lists), bounded by 8 bytes an id.

The embedded default corpus (no network, no download) is the running Python's own
standard-library source, one document per ``.py`` file, split deterministically into a ``train``
part (for fitting the default tokenizer/model) and an ``eval`` part (for evaluation).

Partitioned builds (``num_parts`` K, ``part`` I; :func:`part_bounds`): part I is a contiguous run of
the source's documents, and parts 0..K-1 in order are the whole source in its order, so K jobs
tokenize in parallel and ``streamdata merge`` concatenates them. The slice is cut where it costs
the other parts nothing: local files (and the embedded corpus) by whole files, balanced by file
size, so a part opens, converts and reads only its own files (the others are only stat-ed for the
source identity); a saved or hub dataset by row index (``Dataset.shard(K, I, contiguous=True)``,
which selects a row range of the Arrow table); a streaming hub dataset by its data files
(``IterableDataset.shard``). ``Source.identity`` stays the whole source's, ``Source.part`` says
which slice this is.

Document sources (:meth:`Source.documents`): with each batch comes each document's origin
(:class:`Origins`, the store's ``doc_source_file``/``doc_source_row``, meaning in
:data:`streamdata.format.SOURCE_ARRAYS`): an index into ``Source.origin_files`` (the whole source's
local files, also for a part) and the row in that file, or -1 and the dataset row. Bounded memory:
a materialised source maps positions to rows from its files' row counts (one int64 per file, taken
from datasets' ``original_shard_lengths`` as it converts them) and, for blank-filtered text, the
filter's own indices mapping; a streaming source reads its files one at a time (filtering blank
units itself, so rows still count them) and numbers rows as it reads.
"""

from __future__ import annotations

import bisect
import ctypes
import glob
import hashlib
import mmap
import os
import shutil
import sys
import sysconfig
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import ConfigError, SourceError

__all__ = ["DEFAULT_CORPUS_PREFIX", "SAMPLE_BY", "IdsBatch", "Origins", "SourceSpec", "Source", "load_source",
           "default_corpus_files", "part_bounds", "utf8_len"]

# file extension -> datasets packaged builder
_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".text": "text",
    ".py": "text",
    ".md": "text",
}
#: SOURCE prefix naming the embedded default corpus: ``stdlib:eval``, ``stdlib:train``, ``stdlib:all``
DEFAULT_CORPUS_PREFIX = "stdlib:"
#: how plain-text files are cut into documents (``--sample-by``); blank (empty or whitespace-only)
#: lines and paragraphs are skipped, while ``document`` keeps every file
SAMPLE_BY = ("document", "paragraph", "line")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_GLOB_CHARS = set("*?[")
#: rows whose text lengths are planned at once (materialised datasets; Source.batches' plan_rows):
#: bounds the planner's memory (8 bytes a row) whatever the dataset's size
_PLAN_ROWS = 8192
#: documents read per step from a streaming dataset before they are regrouped by bytes (read_rows)
_STREAM_READ_ROWS = 64


@dataclass(frozen=True)
class SourceSpec:
    """Where documents come from. ``paths`` is one hub id, or local files/globs, or one saved folder."""

    paths: tuple[str, ...]
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    text_column: str = "text"
    streaming: bool = False
    sample_by: str = "document"  # for plain-text files: one document per file/paragraph/line (blank units skipped)
    cache_dir: str | None = None
    data_files_builder: str | None = None  # force a builder for local files (e.g. "text")
    num_parts: int | None = None  # a partitioned read: the source is cut into this many contiguous parts ...
    part: int | None = None  # ... and this one (0-based) is read (module docstring); both or neither
    ids_column: str | None = None  # read this column of token ids (lists of integers) instead of a text column

    @property
    def column(self) -> str:
        """The column read: ``ids_column`` when set, else ``text_column``."""
        return self.ids_column if self.ids_column is not None else self.text_column

    def __post_init__(self):
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        if not self.paths:
            raise ConfigError("no SOURCE given: pass a hub dataset id, data files, or a saved dataset folder")
        check_part(self.num_parts, self.part)
        if self.sample_by not in SAMPLE_BY:
            raise ConfigError(f"sample_by={self.sample_by!r} must be one of {', '.join(SAMPLE_BY)}")
        if not self.text_column:
            raise ConfigError("text_column is empty: pass --text-column NAME")
        if self.ids_column is not None and not self.ids_column:
            raise ConfigError("ids_column is empty: pass --ids-column NAME")


@dataclass
class IdsBatch:
    """Rows of a token-id column: ``flat`` int64 ids back to back, ``lens[i]`` ids in row
    ``first_row + i``. Sliced like the list of texts it stands for (``batch[:k]``: the first k rows)."""

    flat: Any  # np.ndarray int64
    lens: Any  # np.ndarray int64
    first_row: int

    def __len__(self) -> int:
        return len(self.lens)

    def __getitem__(self, rows: slice) -> "IdsBatch":
        if not isinstance(rows, slice) or rows.start not in (None, 0) or rows.step not in (None, 1):
            raise TypeError("an IdsBatch is cut only as a prefix: batch[:k]")
        lens = self.lens[rows]
        return IdsBatch(self.flat[: int(lens.sum())], lens, self.first_row)


@dataclass
class Origins:
    """Where each document of a batch came from: ``file[i]`` (an index into ``Source.origin_files``,
    -1 for a dataset) and ``row[i]`` (-1: not known); int64 arrays, cut like the batch (``o[:k]``)."""

    file: Any  # np.ndarray int64
    row: Any  # np.ndarray int64

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, rows: slice) -> "Origins":
        return Origins(self.file[rows], self.row[rows])

    @staticmethod
    def unknown(n: int) -> "Origins":
        import numpy as np

        return Origins(np.full(n, -1, np.int64), np.full(n, -1, np.int64))


def _ids_of(column: Any, col: str, first_row: int) -> IdsBatch:
    """An Arrow list-of-integers column -> IdsBatch (no Python lists); anything else is one SourceError
    line naming the first bad row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    t = column.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) \
            or not pa.types.is_integer(t.value_type):
        raise SourceError(f"column {col!r} holds {t}, not lists of token ids (integers): pass the column of ids "
                          "(e.g. --ids-column input_ids), or --text-column for text (nothing was committed)")
    if column.null_count:
        row = first_row + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise SourceError(f"row {row}: column {col!r} is null, not a list of ids: clean the dataset (nothing was committed)")
    values = pc.list_flatten(column)
    if values.null_count:
        lens = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        at = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        row = first_row + int(np.searchsorted(np.cumsum(lens), at, side="right"))
        raise SourceError(f"row {row}: column {col!r} holds a null id: clean the dataset (nothing was committed)")
    lens = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = values.to_numpy(zero_copy_only=False).astype(np.int64)  # uint64 beyond int64 wraps: checked by the caller
    return IdsBatch(flat, lens, first_row)


@dataclass
class Source:
    """A resolved dataset: iterate text batches with :meth:`batches`."""

    spec: SourceSpec
    kind: str  # "hub" | "files" | "saved"
    dataset: Any  # datasets.Dataset or IterableDataset (one split)
    identity: dict[str, Any] = field(default_factory=dict)
    #: local files the documents come from (empty for hub datasets): their size, mtime and digest
    #: are the build ledger's resume identity
    files: list[str] = field(default_factory=list)
    #: temporary datasets cache holding the Arrow copy of local files; removed by close() (or at exit)
    tmp_cache: str | None = None
    #: a partitioned read (``spec.num_parts`` set): which slice of the source this is,
    #: {"num_parts", "part", "unit" ("files" | "rows" | "data_files"), "range": [lo, hi), "of": units}
    part: dict[str, Any] | None = None
    #: the whole source's local files (resolved paths), which Origins.file indexes; empty for a dataset
    origin_files: list[str] = field(default_factory=list)
    #: origin_files index of this part's first file (0 unless a part of files)
    file_base: int = 0
    #: a dataset's row of this part's first document (a part's range start); None: not known
    row_base: int | None = 0
    #: materialised local files: cumulative rows of this part's files as converted (before the blank
    #: filter), [0, n0, n0 + n1, ...]; None: not known (see load_source)
    file_rows: Any = None
    #: streaming plain text by line/paragraph: blank units are dropped while reading (not by a
    #: dataset filter), so the rows of a file still count them
    skip_blank: bool = False

    def __post_init__(self):
        if self.tmp_cache is not None:
            self._cleanup = weakref.finalize(self, shutil.rmtree, self.tmp_cache, True)

    def close(self) -> None:
        """Remove the temporary Arrow copy of local files (the dataset must not be read afterwards)."""
        if self.tmp_cache is not None:
            self._cleanup()

    @property
    def num_rows(self) -> int | None:
        """Number of documents, or None for a streaming dataset (unknown until the end)."""
        return None if self.spec.streaming else len(self.dataset)

    def batches(self, max_bytes: int, skip: int = 0, max_docs: int | None = None, *, plan_rows: int = _PLAN_ROWS,
                read_rows: int = _STREAM_READ_ROWS) -> Iterator[list[str] | IdsBatch]:
        """:meth:`documents` without the origins."""
        for batch, _ in self.documents(max_bytes, skip, max_docs, plan_rows=plan_rows, read_rows=read_rows):
            yield batch

    def documents(self, max_bytes: int, skip: int = 0, max_docs: int | None = None, *, plan_rows: int = _PLAN_ROWS,
                  read_rows: int = _STREAM_READ_ROWS) -> Iterator[tuple[list[str] | IdsBatch, Origins]]:
        """Yield lists of document texts in order, starting after the first ``skip`` documents,
        each with its documents' :class:`Origins`.

        A batch holds whole documents of at most ``max_bytes`` UTF-8 bytes of text together (and at
        most ``max_docs`` documents): the tokenizer's memory follows a batch's text, not its document
        count. Documents are never split; one larger than ``max_bytes`` is a batch of its own.
        With ``spec.ids_column`` the batches are :class:`IdsBatch`, sized at 8 bytes an id.
        ``plan_rows``: rows whose sizes a materialised dataset plans at once (memory: 8 bytes a row);
        ``read_rows``: rows a streaming dataset reads per step. Neither changes the batches.
        """
        if max_bytes < 1 or (max_docs is not None and max_docs < 1) or plan_rows < 1 or read_rows < 1:
            raise ConfigError(f"batches: max_bytes={max_bytes}, max_docs={max_docs}, plan_rows={plan_rows} and "
                              f"read_rows={read_rows} must be >= 1")
        if self.spec.streaming:
            yield from self._stream_batches(max_bytes, skip, max_docs, read_rows)
        else:
            yield from self._planned_batches(max_bytes, skip, max_docs, plan_rows)

    def _planned_batches(self, max_bytes: int, skip: int, max_docs: int | None,
                         plan_rows: int) -> Iterator[tuple[list[str] | IdsBatch, Origins]]:
        """Materialised dataset: batch boundaries come from the text lengths Arrow already stores
        (no Python string is made to plan), ``plan_rows`` rows at a time."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        col, ds = self.spec.column, self.dataset
        n = len(ds)
        arrow = ds.with_format("arrow")  # honours an indices mapping (e.g. the blank-unit filter)
        mapped = [c["filename"] for c in (getattr(ds, "cache_files", None) or []) if c.get("filename")]
        start, pending = skip, 0  # the batch being planned: rows [start, c0 + i), ``pending`` bytes
        for c0 in range(skip, n, plan_rows):
            column = arrow[c0 : min(n, c0 + plan_rows)][col]
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                sizes = pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            elif self.spec.ids_column is not None and (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
                                                      or pa.types.is_fixed_size_list(column.type)):
                sizes = 8 * pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            else:  # not text: the first batch reaches _check_texts, which names the row and the type
                sizes = np.zeros(len(column), np.int64)
            cum = np.cumsum(sizes)  # cum[k]: bytes of this window's rows 0..k
            i, m = 0, len(sizes)
            while i < m:
                base = int(cum[i - 1]) if i else 0
                j = int(np.searchsorted(cum, base + max_bytes - pending, side="right"))  # rows i..j-1 fit
                if max_docs is not None:
                    j = min(j, i + max_docs - (c0 + i - start))
                if j <= i:
                    if c0 + i > start:  # row i does not fit: the batch is full
                        yield self._rows(start, c0 + i), self._origins(start, c0 + i)
                        start, pending = c0 + i, 0
                        continue
                    j = i + 1  # a document larger than max_bytes: a batch of its own
                pending += int(cum[j - 1]) - base
                i = j
                if i < m:  # row i did not fit (or max_docs was reached)
                    yield self._rows(start, c0 + i), self._origins(start, c0 + i)
                    drop_mapped_pages(mapped)
                    start, pending = c0 + i, 0
        if start < n:
            yield self._rows(start, n), self._origins(start, n)
            drop_mapped_pages(mapped)

    def _origins(self, lo: int, hi: int) -> Origins:
        """Origins of the materialised dataset's documents ``[lo, hi)`` (positions after the blank
        filter, whose indices mapping gives the rows before it)."""
        import numpy as np

        indices = getattr(self.dataset, "_indices", None)
        if indices is not None and self.kind == "files":  # our blank filter's mapping
            pos = np.asarray(indices.column(0).slice(lo, hi - lo).to_numpy(zero_copy_only=False), dtype=np.int64)
        else:
            pos = np.arange(lo, hi, dtype=np.int64)
        if self.kind in ("saved", "hub"):
            if self.row_base is None:
                return Origins.unknown(hi - lo)
            return Origins(np.full(hi - lo, -1, np.int64), pos + self.row_base)
        if self.file_rows is None:
            return Origins.unknown(hi - lo)
        f = np.searchsorted(self.file_rows, pos, side="right") - 1
        return Origins(f + self.file_base, pos - self.file_rows[f])

    def _pieces(self, skip: int) -> Iterator[tuple[Any, int, int | None, int]]:
        """A streaming dataset as (piece, file, its first row's number or None when not known, rows
        datasets skipped) in order: one piece per local file when there are several (so rows count
        within each file, and skipped documents are read and dropped by the caller), else the
        dataset itself, whose first ``skip`` rows datasets skips when no blank filter applies."""
        ds = self.dataset
        if self.kind in ("saved", "hub"):  # never blank-filtered (plain-text files only)
            yield (ds.skip(skip) if skip else ds), -1, self.row_base, skip
            return
        n = len(self.files)
        if n == 1 or getattr(ds, "n_shards", None) != n:
            known = n == 1
            if not self.skip_blank and skip:
                ds = ds.skip(skip)
            yield ds, self.file_base if known else -1, 0 if known else None, 0 if self.skip_blank else skip
            return
        for k in range(n):  # datasets reads local data files as one shard each, in order
            yield ds.shard(num_shards=n, index=k, contiguous=True), self.file_base + k, 0, 0

    def _rows(self, lo: int, hi: int) -> list[str] | IdsBatch:
        if self.spec.ids_column is not None:
            return _ids_of(self.dataset.with_format("arrow")[lo:hi][self.spec.ids_column], self.spec.ids_column, lo)
        texts = self.dataset[lo:hi][self.spec.text_column]
        _check_texts(texts, self.spec.text_column, lo)
        return texts

    def _stream_batches(self, max_bytes: int, skip: int, max_docs: int | None,
                        read_rows: int) -> Iterator[tuple[list[str] | IdsBatch, Origins]]:
        """IterableDataset: read ``read_rows`` rows at a time (file by file, see :meth:`_pieces`),
        drop blank units and the first ``skip`` documents, and regroup the rest by bytes."""
        import numpy as np

        ids = self.spec.ids_column is not None
        col = self.spec.column
        # the batch being built: its documents (texts, or one-row IdsBatch pieces), their origins, bytes
        items: list[Any] = []
        files: list[int] = []
        rows: list[int] = []
        size, docs = 0, 0  # docs: documents read so far, skipped ones included

        def flush() -> tuple[list[str] | IdsBatch, Origins]:
            return (_join(items) if ids else items), Origins(np.array(files, np.int64), np.array(rows, np.int64))

        for piece, file, row0, row in self._pieces(skip):  # row: rows of the piece read (or skipped) so far
            docs += row  # rows datasets skipped for us
            it = (piece.with_format("arrow") if ids else piece).iter(batch_size=read_rows)
            while True:
                try:  # streaming parses while iterating: malformed JSON or non-UTF-8 text surfaces here
                    chunk = next(it)[col]
                except StopIteration:
                    break
                except SourceError:
                    raise
                except Exception as e:  # pyarrow/datasets/codec errors of several types
                    where = repr(self.files[0]) + (" ..." if len(self.files) > 1 else "") if self.files else "the source"
                    raise SourceError(f"cannot read {where} after document {docs} ({_first_line(e)}): "
                                      "fix or remove the bad rows (nothing was committed)") from None
                if ids:
                    got = _ids_of(chunk, col, docs)
                    off = np.concatenate([[0], np.cumsum(got.lens)])
                    units = [IdsBatch(got.flat[off[k] : off[k + 1]], got.lens[k : k + 1], docs + k) for k in range(len(got))]
                    sizes = (8 * got.lens).tolist()
                else:
                    _check_texts(chunk, col, docs)
                    units, sizes = chunk, [utf8_len(t) for t in chunk]
                for k, (x, b) in enumerate(zip(units, sizes)):
                    if self.skip_blank and not (x and not x.isspace()):
                        continue  # a blank line/paragraph separates documents (_not_blank); its row still counts
                    docs += 1
                    if docs <= skip:
                        continue
                    if items and (size + b > max_bytes or len(items) == max_docs):
                        yield flush()
                        items, files, rows, size = [], [], [], 0
                    items.append(x)
                    files.append(file)
                    rows.append(-1 if row0 is None else row0 + row + k)
                    size += b
                row += len(units)
        if items:
            yield flush()


def _join(parts: list[IdsBatch]) -> IdsBatch:
    import numpy as np

    parts = [p for p in parts if len(p)]
    return IdsBatch(np.concatenate([p.flat for p in parts]), np.concatenate([p.lens for p in parts]), parts[0].first_row)


def drop_mapped_pages(paths: Sequence[str]) -> int:
    """Drop this process's resident pages of read-only memory maps of ``paths`` (the Arrow files
    under a dataset); returns the bytes of mappings advised.

    The Arrow cache is memory-mapped and every page read stays in our resident set (a 500 MB corpus:
    +500 MB RSS) until the kernel needs it. ``MADV_DONTNEED`` on a read-only file mapping only
    unmaps the pages: a later read faults them back from the page cache, so it is safe to apply to
    the whole file, including the part not read yet. Writable mappings are left alone (there it
    could discard private copies). Linux only; elsewhere a no-op.
    """
    if not paths or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    wanted = {os.path.realpath(p) for p in paths}
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return 0
    done = 0
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 6 or "w" in parts[1] or parts[5].rstrip("\n") not in wanted:  # the kernel prints real paths
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED) == 0:
            done += hi - lo
    return done


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _LIBC


_LIBC: Any = None


def utf8_len(text: str) -> int:
    """UTF-8 size of ``text`` in bytes, without encoding a copy when it is ASCII (``isascii`` is O(1))."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _not_blank(texts: list[str]) -> list[bool]:
    """Filter for line/paragraph units: False for an empty or whitespace-only one."""
    return [bool(t) and not t.isspace() for t in texts]


def _check_texts(texts: Sequence[Any], col: str, first_row: int) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "null" if t is None else f"of type {type(t).__name__}"
            raise SourceError(
                f"row {first_row + i}: column {col!r} is {what}, not a string: clean the dataset or choose "
                "another --text-column (nothing was committed)"
            )


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _expand_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if _GLOB_CHARS & set(p):
            hits = sorted(glob.glob(p, recursive=True))
            hits = [h for h in hits if os.path.isfile(h)]
            if not hits:
                raise SourceError(f"no files match {p!r}: check the pattern")
            files.extend(Path(h) for h in hits)
        else:
            path = Path(p)
            if not path.exists():
                raise SourceError(f"data file {p!r} does not exist: check the path")
            if path.is_dir():
                raise SourceError(f"{p!r} is a folder: pass its files (e.g. '{p}/*.jsonl') or a save_to_disk folder alone")
            files.append(path)
    for f in files:
        if not os.access(f, os.R_OK):
            raise SourceError(f"data file {str(f)!r} is not readable: fix its permissions")
    return files


def _looks_local(p: str) -> bool:
    """Local path or glob, as opposed to a hub id such as ``wikitext`` or ``org/name``."""
    return (
        bool(_GLOB_CHARS & set(p))
        or os.path.exists(p)
        or p.startswith((".", "/", "~"))
        or Path(p).suffix.lower() in _BUILDERS
    )


def _pick_split(ds: Any, split: str | None, where: str) -> Any:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        names = list(ds.keys())
        if split is None:
            if len(names) == 1:
                return ds[names[0]]
            raise SourceError(f"{where} has splits {names}: pass --split NAME")
        if split not in ds:
            raise SourceError(f"{where} has no split {split!r} (it has {names}): pass one of them with --split")
        return ds[split]
    return ds


# ---- partitioned reads ------------------------------------------------------------------------
def check_part(num_parts: int | None, part: int | None) -> None:
    """Refuse an inconsistent partition request (one line naming the value)."""
    if num_parts is None and part is None:
        return
    if part is None:
        raise ConfigError(f"num_parts={num_parts} needs part=I too (0 <= I < {num_parts}): pass both, or neither")
    if num_parts is None:
        raise ConfigError(f"part={part} needs num_parts=K too (the number of parts): pass both, or neither")
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ConfigError(f"num_parts={num_parts!r} must be an integer >= 1")
    if isinstance(part, bool) or not isinstance(part, int) or not 0 <= part < num_parts:
        raise ConfigError(f"part={part!r} must be an integer in [0, {num_parts}) (parts are numbered from 0)")


def even_bounds(n: int, num_parts: int, part: int) -> tuple[int, int]:
    """[lo, hi) of part ``part`` of ``n`` items cut into ``num_parts`` contiguous runs of equal size
    (the first ``n % num_parts`` one item longer): the rule of datasets' ``shard(contiguous=True)``."""
    div, mod = divmod(n, num_parts)
    lo = div * part + min(part, mod)
    return lo, lo + div + (1 if part < mod else 0)


def part_bounds(weights: Sequence[int], num_parts: int, part: int) -> tuple[int, int]:
    """[lo, hi) of part ``part`` when ``len(weights)`` items (>= ``num_parts``) are cut into
    ``num_parts`` contiguous non-empty runs of about equal total weight (file sizes in bytes).

    Boundary ``i`` is the item boundary whose cumulative weight is nearest ``i / num_parts`` of the
    total (the earlier one on a tie), moved just enough that every run keeps at least one item.
    Deterministic: the same weights give the same cuts on every machine.
    """
    n = len(weights)
    if n < num_parts:
        raise ConfigError(f"{n} item(s) cannot be cut into {num_parts} non-empty parts")
    total = sum(int(w) for w in weights)
    if total <= 0:
        return even_bounds(n, num_parts, part)
    cum = [0]
    for w in weights:
        cum.append(cum[-1] + int(w))
    scaled = [c * num_parts for c in cum]  # integers: cum[j] * K against i * total, no float rounding
    bounds = [0]
    for i in range(1, part + 2):
        if i == num_parts:
            bounds.append(n)
            break
        goal = i * total
        j = bisect.bisect_left(scaled, goal)  # the first boundary at or past the goal (j <= n: goal < K * total)
        if j > 0 and goal - scaled[j - 1] <= scaled[j] - goal:
            j = bisect.bisect_left(scaled, scaled[j - 1])  # the earliest boundary at that weight (empty files)
        bounds.append(min(max(j, bounds[-1] + 1), n - (num_parts - i)))
    return bounds[part], bounds[part + 1]


def _files_part(files: Sequence[Path], spec: SourceSpec, what: str) -> tuple[list[Path], dict[str, Any] | None]:
    """The files of this part (all of them when the read is not partitioned) and its part record."""
    if spec.num_parts is None:
        return list(files), None
    if len(files) < spec.num_parts:
        raise SourceError(
            f"{what} has {len(files)} file(s), fewer than num_parts={spec.num_parts}: parts of local files are cut "
            "at file boundaries, so split the data into more files (e.g. 'split -n l/K'), save it with "
            "datasets' save_to_disk and pass that folder, or use fewer parts")
    lo, hi = part_bounds([os.path.getsize(f) for f in files], spec.num_parts, spec.part)
    return list(files[lo:hi]), {"num_parts": spec.num_parts, "part": spec.part, "unit": "files",
                                "range": [lo, hi], "of": len(files)}


def _rows_part(ds: Any, spec: SourceSpec, where: str) -> tuple[Any, dict[str, Any] | None]:
    """A materialised dataset's contiguous row range of this part (``Dataset.shard``, contiguous)."""
    if spec.num_parts is None:
        return ds, None
    n = len(ds)
    if n < spec.num_parts:
        raise SourceError(f"{where} has {n} document(s), fewer than num_parts={spec.num_parts}: use fewer parts")
    lo, hi = even_bounds(n, spec.num_parts, spec.part)
    ds = ds.shard(num_shards=spec.num_parts, index=spec.part, contiguous=True)  # rows [lo, hi): a table slice
    return ds, {"num_parts": spec.num_parts, "part": spec.part, "unit": "rows", "range": [lo, hi], "of": n}


def _data_files_part(ds: Any, spec: SourceSpec, where: str) -> tuple[Any, dict[str, Any] | None]:
    """A streaming dataset's contiguous run of data files (``IterableDataset.shard``): its row count is
    unknown before reading it all, so the cut is at its files, as datasets shards it."""
    if spec.num_parts is None:
        return ds, None
    n = int(getattr(ds, "num_shards", 1) or 1)
    if n < spec.num_parts:
        raise SourceError(f"streaming {where} has {n} data file(s), fewer than num_parts={spec.num_parts}: "
                          "drop --streaming (parts are then cut by row) or use fewer parts")
    lo, hi = even_bounds(n, spec.num_parts, spec.part)
    ds = ds.shard(num_shards=spec.num_parts, index=spec.part, contiguous=True)
    return ds, {"num_parts": spec.num_parts, "part": spec.part, "unit": "data_files", "range": [lo, hi], "of": n}


def load_source(spec: SourceSpec) -> Source:
    """Resolve ``spec`` into a single-split dataset with its text column checked."""
    import datasets

    paths = list(spec.paths)
    identity: dict[str, Any] = {"text_column": spec.text_column} if spec.ids_column is None else {"ids_column": spec.ids_column}
    kwargs: dict[str, Any] = {}
    if spec.cache_dir:
        kwargs["cache_dir"] = spec.cache_dir
    single = paths[0] if len(paths) == 1 else None
    if single is not None and single.startswith(DEFAULT_CORPUS_PREFIX):
        # the embedded default corpus: local stdlib files through the same datasets path
        part = single[len(DEFAULT_CORPUS_PREFIX):] or "eval"
        files = default_corpus_files(part)
        mine, part_record = _files_part([Path(f) for f in files], spec, f"the embedded corpus {single!r}")
        inner = load_source(SourceSpec(paths=tuple(str(f) for f in mine), text_column="text", streaming=spec.streaming,
                                       sample_by="document", cache_dir=spec.cache_dir, data_files_builder="text"))
        # files stay the inner source's (each file's identity is recorded for resume); the identity
        # is the whole corpus's, from names and sizes only
        digest = hashlib.sha256("\n".join(f"{Path(f).name}:{os.path.getsize(f)}" for f in files).encode()).hexdigest()
        inner.identity = {"kind": "default", "id": single, "part": part, "python": sys.version.split()[0],
                          "files": len(files), "files_sha256": digest, "text_column": "text", "streaming": spec.streaming}
        inner.part = part_record
        inner.origin_files = [str(Path(f).resolve()) for f in files]
        inner.file_base = 0 if part_record is None else part_record["range"][0]
        return inner
    local_files: list[str] = []
    tmp_cache: str | None = None
    part_record: dict[str, Any] | None = None
    origin: dict[str, Any] = {}  # Source's origin fields (origin_files, file_base, row_base, file_rows)
    try:
        if single is not None and os.path.isdir(single) and any(os.path.exists(os.path.join(single, m)) for m in _SAVED_MARKERS):
            kind = "saved"
            try:
                ds = datasets.load_from_disk(single)
            except Exception as e:  # datasets raises several types for a damaged folder
                raise SourceError(f"cannot load saved dataset {single!r} ({_first_line(e)}): check the folder") from None
            ds = _pick_split(ds, spec.split, f"saved dataset {single!r}")
            # the whole dataset's identity (an IterableDataset has no fingerprint), taken before the cut
            identity.update(kind=kind, path=str(Path(single).resolve()), split=spec.split,
                            fingerprint=None if spec.streaming else getattr(ds, "_fingerprint", None))
            ds, part_record = _rows_part(ds, spec, f"saved dataset {single!r}")
            origin = {"row_base": 0 if part_record is None else part_record["range"][0]}
            if spec.streaming:
                ds = ds.to_iterable_dataset()
            local_files = sorted(str(p) for p in Path(single).rglob("*") if p.is_file())
        elif single is None or _looks_local(single):
            kind = "files"
            files = _expand_files(paths)
            exts = {f.suffix.lower() for f in files}
            builder = spec.data_files_builder
            if builder is None:
                builders = {_BUILDERS.get(e) for e in exts}
                if None in builders:
                    unknown = sorted(e for e in exts if e not in _BUILDERS)
                    raise SourceError(f"unsupported data file type(s) {unknown}: use json, jsonl, parquet, csv, tsv or txt files")
                if len(builders) != 1:
                    raise SourceError(f"data files mix formats {sorted(exts)}: pass files of one format per build")
                builder = builders.pop()
            if builder == "text":
                kwargs["sample_by"] = spec.sample_by
            if exts == {".tsv"}:
                kwargs["sep"] = "\t"
            if not spec.streaming and not spec.cache_dir:
                # datasets converts local files to Arrow in its cache; a cache that outlives this command
                # would keep a second copy of the whole corpus, so it goes to a temporary folder
                # (an explicit --cache-dir is kept: the user asked for a reusable copy there)
                tmp_cache = kwargs["cache_dir"] = tempfile.mkdtemp(prefix="streamdata-datasets-")
            # a part converts and reads only its own files; the identity below lists all of them (stat only)
            mine, part_record = _files_part(files, spec, f"SOURCE {paths[0]!r}{' ...' if len(paths) > 1 else ''}")
            local_files = [str(f) for f in mine]
            saved_lengths = datasets.config.SAVE_ORIGINAL_SHARD_LENGTHS
            datasets.config.SAVE_ORIGINAL_SHARD_LENGTHS = True  # rows per data file: the documents' sources
            try:
                ds = datasets.load_dataset(builder, data_files=local_files, split="train",
                                           streaming=spec.streaming, **kwargs)
            except Exception as e:  # parse errors come as several pyarrow/datasets types
                if "corresponds to no data" in str(e):
                    raise SourceError(f"the data files hold no documents (empty dataset): {paths[0]!r}{' ...' if len(paths) > 1 else ''}") from None
                raise SourceError(f"cannot read data files ({_first_line(e)}): check that they are valid {builder}") from None
            finally:
                datasets.config.SAVE_ORIGINAL_SHARD_LENGTHS = saved_lengths
            origin = {"origin_files": [str(f.resolve()) for f in files],
                      "file_base": 0 if part_record is None else part_record["range"][0],
                      "file_rows": None if spec.streaming else _file_rows(ds, len(mine), builder, spec.sample_by)}
            identity.update(kind=kind, builder=builder,
                            files=[{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files])
            if builder == "text":
                identity["sample_by"] = spec.sample_by
        else:
            kind = "hub"
            try:
                ds = datasets.load_dataset(single, spec.config, split=spec.split, revision=spec.revision,
                                           streaming=spec.streaming, **kwargs)
            except Exception as e:  # offline, unknown id, bad config: all surface here
                raise SourceError(
                    f"cannot load dataset {single!r} (config={spec.config!r}, split={spec.split!r}): {_first_line(e)}"
                ) from None
            ds = _pick_split(ds, spec.split, f"dataset {single!r}")
            identity.update(kind=kind, id=single, config=spec.config, split=spec.split, revision=spec.revision,
                            fingerprint=None if spec.streaming else getattr(ds, "_fingerprint", None))
            cut = _data_files_part if spec.streaming else _rows_part
            ds, part_record = cut(ds, spec, f"dataset {single!r}")
            # a streaming part of data files starts at a row nobody counted (the earlier files' rows)
            origin = {"row_base": 0 if part_record is None else
                      part_record["range"][0] if part_record["unit"] == "rows" or part_record["range"][0] == 0 else None}
    except BaseException:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
        raise
    source = Source(spec, kind, ds, identity, files=local_files, tmp_cache=tmp_cache, part=part_record, **origin)
    try:
        _check_columns(source)
    except BaseException:
        source.close()
        raise
    return source


def _check_columns(source: Source) -> None:
    """Refuse an empty dataset or one without the text column; keep only that column."""
    spec, ds, paths = source.spec, source.dataset, source.spec.paths
    source.identity["streaming"] = spec.streaming
    if not spec.streaming and len(ds) == 0:
        raise SourceError(f"the dataset {paths[0]!r} (split {spec.split!r}) holds no documents (empty dataset): check the source and split")
    columns = _columns(ds)
    col = spec.column
    if spec.ids_column is not None and source.identity.get("builder") == "text":
        raise SourceError(f"--ids-column {col!r} reads a column of token ids, but plain-text files hold only text: "
                          "pass json/jsonl/parquet/csv files, a saved or a hub dataset, or --text-column")
    if columns is not None and col not in columns:
        flag = "--ids-column" if spec.ids_column is not None else "--text-column"
        raise SourceError(f"{'ids' if spec.ids_column is not None else 'text'} column {col!r} not found "
                          f"(columns: {columns}): pass {flag} NAME")
    if spec.streaming:
        source.dataset = ds.select_columns([col]) if columns is not None else ds
    else:
        source.dataset = ds.select_columns([col])
    if source.identity.get("builder") == "text" and spec.sample_by != "document":
        # Lines/paragraphs cut out of a file: a blank one is a separator, not a document (it would
        # become a document holding only EOS). Filtering the dataset itself keeps resume exact: the
        # skip count of a resumed build counts the same kept units. A streaming read filters as it
        # reads instead (Source.skip_blank), so that its rows still count the blank units.
        if spec.streaming:
            source.skip_blank = True
        else:
            source.dataset = source.dataset.filter(_not_blank, batched=True, input_columns=[spec.text_column])
        source.identity["skip_blank"] = True
        if not spec.streaming and len(source.dataset) == 0:
            raise SourceError(f"every {spec.sample_by} of {paths[0]!r}{' ...' if len(paths) > 1 else ''} is blank "
                              "(no documents): check the files or --sample-by")


def _file_rows(ds: Any, files: int, builder: str, sample_by: str) -> Any:
    """Cumulative rows of each of ``files`` data files in the converted dataset ``ds`` (before any
    filter), or None when datasets did not record them (an Arrow cache made by an earlier run in an
    explicit --cache-dir is reused as it is: its documents' sources are then unknown)."""
    import numpy as np

    n = len(ds)
    if builder == "text" and sample_by == "document":
        counts = [1] * files  # one row per file, also an empty one
    elif files == 1:
        counts = [n]
    else:
        split = (getattr(ds.info, "splits", None) or {}).get("train")
        counts = list(getattr(split, "original_shard_lengths", None) or [])
        counts += [0] * (files - len(counts))  # files after the last row (empty ones) are not listed
    if len(counts) != files or sum(counts) != n:
        return None
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _columns(ds: Any) -> list[str] | None:
    names = getattr(ds, "column_names", None)
    if names is None and getattr(ds, "features", None) is not None:
        names = list(ds.features)
    return list(names) if names is not None else None


# ---- the embedded default corpus ------------------------------------------------------------
def default_corpus_files(part: str = "eval") -> list[str]:
    """The running Python's standard-library ``.py`` files (UTF-8 only), deterministically split.

    ``part`` is ``"train"`` (about 20% of files, by a hash of the path relative to the stdlib root),
    ``"eval"`` (the other 80%) or ``"all"``. The same Python version gives the same list.
    """
    if part not in ("train", "eval", "all"):
        raise ConfigError(f"default corpus part {part!r} must be train, eval or all")
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if "site-packages" in rel.split("/"):
            continue
        try:
            f.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib test files are deliberately in other encodings
        is_train = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 5 == 0
        if part == "all" or (part == "train") == is_train:
            out.append(str(f))
    if not out:
        raise SourceError(f"no standard-library sources found under {str(root)!r} (Python {sys.version.split()[0]})")
    return out
