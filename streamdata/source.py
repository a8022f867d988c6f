"""Source stage: a Hugging Face dataset (hub id, local files, or a ``save_to_disk`` folder) -> texts.

Everything goes through :mod:`datasets` (``load_dataset`` / ``load_from_disk``), so hub datasets,
local files and saved datasets behave alike, and ``streaming=True`` yields an ``IterableDataset``
that is never materialised. Documents come out in a deterministic order in batches of Python
strings; ``skip`` lets a resumed build continue after the documents it already wrote.

The embedded default corpus (no network, no download) is the running Python's own
standard-library source, one document per ``.py`` file, split deterministically into a ``train``
part (for fitting the default tokenizer/model) and an ``eval`` part (for evaluation).
"""

from __future__ import annotations

import glob
import hashlib
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

__all__ = ["DEFAULT_CORPUS_PREFIX", "SAMPLE_BY", "SourceSpec", "Source", "load_source", "default_corpus_files"]

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
#: how plain-text files are cut into documents (``--sample-by``)
SAMPLE_BY = ("document", "paragraph", "line")
_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceSpec:
    """Where documents come from. ``paths`` is one hub id, or local files/globs, or one saved folder."""

    paths: tuple[str, ...]
    config: str | None = None
    split: str | None = None
    revision: str | None = None
    text_column: str = "text"
    streaming: bool = False
    sample_by: str = "document"  # for plain-text files: one document per file/paragraph/line
    cache_dir: str | None = None
    data_files_builder: str | None = None  # force a builder for local files (e.g. "text")

    def __post_init__(self):
        if isinstance(self.paths, str):
            object.__setattr__(self, "paths", (self.paths,))
        if not self.paths:
            raise ConfigError("no SOURCE given: pass a hub dataset id, data files, or a saved dataset folder")
        if self.sample_by not in SAMPLE_BY:
            raise ConfigError(f"sample_by={self.sample_by!r} must be one of {', '.join(SAMPLE_BY)}")
        if not self.text_column:
            raise ConfigError("text_column is empty: pass --text-column NAME")


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

    def batches(self, batch_size: int, skip: int = 0) -> Iterator[list[str]]:
        """Yield lists of document texts in order, starting after the first ``skip`` documents."""
        col = self.spec.text_column
        ds = self.dataset
        if self.spec.streaming:
            if skip:
                ds = ds.skip(skip)
            it = ds.iter(batch_size=batch_size)
            row = skip
            while True:
                try:  # streaming parses while iterating: malformed JSON or non-UTF-8 text surfaces here
                    batch = next(it)
                except StopIteration:
                    return
                except Exception as e:  # pyarrow/datasets/codec errors of several types
                    where = repr(self.files[0]) + (" ..." if len(self.files) > 1 else "") if self.files else "the source"
                    raise SourceError(f"cannot read {where} after document {row} ({_first_line(e)}): "
                                      "fix or remove the bad rows (nothing was committed)") from None
                texts = batch[col]
                _check_texts(texts, col, row)
                row += len(texts)
                yield texts
        else:
            n = len(ds)
            for lo in range(skip, n, batch_size):
                texts = ds[lo : min(n, lo + batch_size)][col]
                _check_texts(texts, col, lo)
                yield texts


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


def load_source(spec: SourceSpec) -> Source:
    """Resolve ``spec`` into a single-split dataset with its text column checked."""
    import datasets

    paths = list(spec.paths)
    identity: dict[str, Any] = {"text_column": spec.text_column}
    kwargs: dict[str, Any] = {}
    if spec.cache_dir:
        kwargs["cache_dir"] = spec.cache_dir
    single = paths[0] if len(paths) == 1 else None
    if single is not None and single.startswith(DEFAULT_CORPUS_PREFIX):
        # the embedded default corpus: local stdlib files through the same datasets path
        part = single[len(DEFAULT_CORPUS_PREFIX):] or "eval"
        files = default_corpus_files(part)
        inner = load_source(SourceSpec(paths=tuple(files), text_column="text", streaming=spec.streaming,
                                       sample_by="document", cache_dir=spec.cache_dir, data_files_builder="text"))
        # files stay the inner source's (each file's identity is recorded for resume)
        digest = hashlib.sha256("\n".join(f"{Path(f).name}:{os.path.getsize(f)}" for f in files).encode()).hexdigest()
        inner.identity = {"kind": "default", "id": single, "part": part, "python": sys.version.split()[0],
                          "files": len(files), "files_sha256": digest, "text_column": "text", "streaming": spec.streaming}
        return inner
    local_files: list[str] = []
    tmp_cache: str | None = None
    try:
        if single is not None and os.path.isdir(single) and any(os.path.exists(os.path.join(single, m)) for m in _SAVED_MARKERS):
            kind = "saved"
            try:
                ds = datasets.load_from_disk(single)
            except Exception as e:  # datasets raises several types for a damaged folder
                raise SourceError(f"cannot load saved dataset {single!r} ({_first_line(e)}): check the folder") from None
            ds = _pick_split(ds, spec.split, f"saved dataset {single!r}")
            if spec.streaming:
                ds = ds.to_iterable_dataset()
            identity.update(kind=kind, path=str(Path(single).resolve()), split=spec.split,
                            fingerprint=getattr(ds, "_fingerprint", None))
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
            local_files = [str(f) for f in files]
            try:
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                           streaming=spec.streaming, **kwargs)
            except Exception as e:  # parse errors come as several pyarrow/datasets types
                if "corresponds to no data" in str(e):
                    raise SourceError(f"the data files hold no documents (empty dataset): {paths[0]!r}{' ...' if len(paths) > 1 else ''}") from None
                raise SourceError(f"cannot read data files ({_first_line(e)}): check that they are valid {builder}") from None
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
    except BaseException:
        if tmp_cache is not None:
            shutil.rmtree(tmp_cache, ignore_errors=True)
        raise
    source = Source(spec, kind, ds, identity, files=local_files, tmp_cache=tmp_cache)
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
    if columns is not None and spec.text_column not in columns:
        raise SourceError(f"text column {spec.text_column!r} not found (columns: {columns}): pass --text-column NAME")
    if spec.streaming:
        source.dataset = ds.select_columns([spec.text_column]) if columns is not None else ds
    else:
        source.dataset = ds.select_columns([spec.text_column])


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
