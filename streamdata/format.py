"""On-disk layout of a token store (format version 3), and the manifest that seals it.

This module is the single description of the bytes on disk; the writer
(:mod:`streamdata.writer`) and the readers (:mod:`streamdata.backends`) point back here.

Layout of a ``npy`` store::

    STORE/
      manifest.json                 written LAST, atomically; without it the folder is not a store
      shards/tokens-00000.bin       raw little-endian token ids, dtype uint16 or uint32 (manifest
                                    "dtype"), no header: nanoGPT-style readers can np.memmap it
      shards/tokens-00001.bin       ...
      index/doc_offsets.npy         int64 [num_documents + 1]: global token offset of each document
                                    start, last entry == total tokens (documents never span shards)
      index/doc_bytes.npy           int64 [num_documents]: UTF-8 bytes of each document's text
      index/doc_words.npy           int64 [num_documents]: words of each document's text, counted by
                                    the manifest's ``word_rule`` (see WORD_RULES)
      index/doc_source_file.npy     int64 [num_documents]: where each document came from (version 3,
      index/doc_source_row.npy      optional): an index into the manifest's ``source_files`` (-1: a
                                    dataset, not a file) and the row there (see SOURCE_ARRAYS)
      _build/                       only while building (see streamdata.output and the writer):
        streamdata-build.json       the build ledger: our marker, the settings, each source file's
                                    size/mtime/digest, the finished shards; written before anything else
        index-00000.npz             each finished shard's document lengths, bytes and words

Manifest (``manifest.json``, :class:`Manifest`): ``format`` (npy | zarr), ``format_version``, ``dtype``,
``tokenizer`` (name, vocab_size, special ids; ``sha256`` of its whole JSON, and since it was added
``ids_sha256`` with ``ids_parts``: digests of only the parts that decide the ids, see
:func:`streamdata.tokenize.tokenizer_digests`), ``special_tokens`` (EOS/BOS policy),
``source``, ``shards`` (file, tokens, documents, sha256 of the file), ``index`` (version 2: name,
file, length and :func:`index_sha256` of each document-index array), ``totals`` (tokens, documents,
bytes, words), ``word_rule`` (how the words were counted: :data:`WORD_RULES`; absent in stores
written before it was recorded, whose words are ``str.split()`` counts, :data:`LEGACY_WORD_RULE`),
``created_by`` and ``extra`` (``build_settings``: the identity a rerun compares), and since version 3
``source_files`` (the files ``doc_source_file`` indexes; absent: the store records no sources).
Version-1 stores (no ``index``) still open; ``verify`` says their index has no checksums.
Version-2 stores (and imports) have no source arrays: readers report an empty source.

Token address space: shards are concatenated in order, so token ``i`` of the store is token
``i - shards[k].start`` of shard ``k``. A document's span includes the EOS/BOS ids the policy adds
(``manifest["special_tokens"]``); its byte and word counts are of the text alone.

Commit order (levanter's rule: data, then counts, then the seal): shard files are written and
fsynced, the merged index is written and fsynced, and only then ``manifest.json`` is written to a
temporary name, fsynced and renamed. A crash at any point leaves a folder without a manifest,
which :func:`streamdata.open_store` refuses and ``streamdata tokenize`` resumes. Which folders a
writer may use, resume, replace or remove: :mod:`streamdata.output`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError, TokenizerError

__all__ = [
    "DEFAULT_SHARD_TOKENS",
    "FORMAT_VERSION",
    "STORE_FORMATS",
    "READABLE_VERSIONS",
    "LEGACY_WORD_RULE",
    "WORD_RULE",
    "WORD_RULES",
    "word_rule_of",
    "IndexInfo",
    "SOURCE_ARRAYS",
    "index_sha256",
    "resolve_inside",
    "MANIFEST_NAME",
    "Manifest",
    "ShardInfo",
    "choose_dtype",
    "read_manifest",
    "atomic_write_bytes",
    "create_file",
    "fsync_dir",
    "sha256_file",
]

#: Version written by this code. 2 added ``index`` (a checksum per document-index array); 3 the
#: optional source arrays (SOURCE_ARRAYS) and ``source_files`` (a version-2 reader would call
#: their index entries damage, so the version says it instead).
FORMAT_VERSION = 3
#: Versions this code opens (version-1 stores have no index checksums; verify says so).
READABLE_VERSIONS = (1, 2, 3)
#: Where each document came from, recorded at tokenize time (version 3, both or neither; int64 per
#: document like the other index arrays). ``doc_source_file``: an index into the manifest's
#: ``source_files``, or -1 when the source is a dataset (hub or ``save_to_disk``), not files.
#: ``doc_source_row``: for a file, the document's 0-based row in it, as datasets' builder reads it:
#: the record of a json/jsonl, parquet or csv file; for plain-text files with ``--sample-by line``
#: the line (universal newlines), blank lines counted though they are not documents; with
#: ``paragraph`` the piece between blank lines (``"\n\n"``), whitespace-only pieces counted
#: (datasets itself drops the empty ones a run of 3+ newlines makes); 0 for a whole file
#: (``document``). For a dataset, its 0-based row in the split (a part's rows count from the whole
#: dataset's start). -1 rows: not known (a streaming hub dataset's part after the first, whose
#: earlier data files' rows were never counted); -1 in both arrays: nothing known (local files whose
#: row counts datasets did not record: an Arrow cache reused from an older run's --cache-dir).
SOURCE_ARRAYS = ("doc_source_file", "doc_source_row")
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
INDEX_DIR = "index"
BUILD_DIR = "_build"
SHARD_PATTERN = "tokens-{:05d}.bin"
#: How a document's words are counted (``manifest["word_rule"]``), the denominator of word perplexity.
#: ``lm-eval``: ``len(re.split(r"\s+", text))``, lm-evaluation-harness's ``Task.count_words`` (the
#: figure papers cite): the number of whitespace runs + 1, so leading and trailing whitespace each
#: add an empty "word" and an empty text counts 1. ``str-split``: ``len(text.split())``, no empty
#: words; what stores written before the rule was recorded hold. Word perplexities from the two
#: rules differ by far more than noise on short documents (one or two words more per document):
#: a figure is always reported with its rule, never mixed.
#: Both use the same whitespace (``str.isspace``, which is also what ``re``'s ``\s`` matches in str).
WORD_RULES = {
    "lm-eval": 'len(re.split(r"\\s+", text)) (lm-evaluation-harness Task.count_words)',
    "str-split": "len(text.split())",
    "unrecorded": "counts given with in-memory token ids: the rule that counted them is not known",
}
#: The rule this code writes.
WORD_RULE = "lm-eval"
#: The rule of our stores without a ``word_rule`` field (written before it was recorded).
LEGACY_WORD_RULE = "str-split"
#: Formats this package writes (``tokenize --format``, ``convert --format``); imports only read others.
STORE_FORMATS = ("npy", "zarr")
#: npy shard size in tokens (64Mi: 128 MiB uint16 files), the default of tokenize and convert.
DEFAULT_SHARD_TOKENS = 1 << 26

# Token ids are stored as unsigned integers, little-endian, never int64.
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def choose_dtype(vocab_size: int) -> str:
    """Smallest on-disk dtype that holds every id in ``[0, vocab_size)``.

    uint16 holds ids 0..65535, i.e. a vocabulary of up to 65536 entries. Known failure elsewhere:
    ids above 65535 silently wrapped when written as uint16; we choose from the vocabulary size,
    and the writer also checks every id it writes.
    """
    if vocab_size <= 0:
        raise TokenizerError(f"tokenizer vocabulary size {vocab_size} is not positive: check the tokenizer file")
    if vocab_size <= 1 << 16:
        return "uint16"
    if vocab_size <= 1 << 32:
        return "uint32"
    raise TokenizerError(
        f"tokenizer vocabulary size {vocab_size} does not fit uint32 token ids (max 4294967296): "
        "use a smaller vocabulary"
    )


def numpy_dtype(name: str) -> np.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise StoreError(f"unknown token dtype {name!r} in manifest: expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class ShardInfo:
    """One token shard: ``tokens`` ids covering documents ``[doc_start, doc_start + documents)``."""

    file: str  # path relative to the store root
    tokens: int
    documents: int
    sha256: str
    start: int = 0  # global token offset (derived: sum of earlier shards' tokens)
    doc_start: int = 0  # global index of its first document (derived)


@dataclass(frozen=True)
class IndexInfo:
    """One document-index array (``doc_offsets``, ``doc_bytes``, ``doc_words``).

    ``sha256`` is of the array's *values* as little-endian int64 bytes (:func:`index_sha256`), not of
    a file, so every backend (npy file, zarr array) is verified the same way from what it returns.
    """

    name: str  # doc_offsets | doc_bytes | doc_words
    file: str  # path relative to the store root (npy: index/NAME.npy; zarr: the array's folder)
    length: int  # entries
    sha256: str


def index_sha256(arr: np.ndarray, block: int = 1 << 22) -> str:
    """sha256 of ``arr``'s values as little-endian int64 bytes, read in blocks (bounded memory)."""
    h = hashlib.sha256()
    for i in range(0, len(arr), block):
        h.update(np.ascontiguousarray(arr[i : i + block], dtype="<i8").tobytes())
    return h.hexdigest()


def resolve_inside(root: str | os.PathLike, rel: str, what: str = "file") -> Path:
    """The path ``root/rel`` after checking it stays inside ``root``.

    ``rel`` comes from a manifest or ledger, i.e. from a file anyone may have edited: an absolute
    path, a ``..`` component or a symlink that leaves the root would make us read (or checksum, or
    copy into a new store) a file the user never named. Refused with one line naming it.
    """
    root_p = Path(root)
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise StoreError(f"{what} path {rel!r} in {str(root_p)!r} is not a relative path: the store is damaged, rebuild it")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts:
        raise StoreError(
            f"{what} path {rel!r} in {str(root_p)!r} points outside the store (absolute or '..'): "
            "the manifest was edited or damaged; rebuild the store"
        )
    full = root_p / p
    real_root = root_p.resolve()
    real = full.resolve()
    if real != real_root and real_root not in real.parents:
        raise StoreError(
            f"{what} path {rel!r} in {str(root_p)!r} resolves to {str(real)!r}, outside the store (a symlink?): "
            "copy the file into the store or rebuild it"
        )
    return full


@dataclass
class Manifest:
    """Everything a reader needs to trust and interpret a store. Serialised as ``manifest.json``."""

    dtype: str
    tokenizer: dict[str, Any]  # name, sha256 (of its JSON), ids_sha256/ids_parts, vocab_size, special token ids
    special_tokens: dict[str, Any]  # EOS/BOS policy: {"bos": id|None, "eos": id|None, ...}
    source: dict[str, Any]  # dataset id/config/split/revision or file list, text column
    shards: list[ShardInfo]
    totals: dict[str, int]  # tokens, documents, bytes, words
    format: str = "npy"
    format_version: int = FORMAT_VERSION
    created_by: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    index: list[IndexInfo] = field(default_factory=list)  # empty in version-1 stores and imports
    #: how doc_words were counted (a WORD_RULES key); None: not recorded (see :func:`word_rule_of`)
    word_rule: str | None = None
    #: the files ``doc_source_file`` indexes (SOURCE_ARRAYS); None: the store records no sources
    source_files: list[str] | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.totals["tokens"])

    @property
    def num_documents(self) -> int:
        return int(self.totals["documents"])

    def to_json(self) -> str:
        d = asdict(self)
        d["shards"] = [{k: v for k, v in s.items() if k not in ("start", "doc_start")} for s in d["shards"]]
        for k in ("word_rule", "source_files"):
            if d[k] is None:  # not recorded: the JSON stays what it was (store digests unchanged)
                del d[k]
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> "Manifest":
        """Validate and type every field of a parsed ``manifest.json``; any wrong field is a StoreError
        naming it (a manifest is a file anyone may have edited, and every reader trusts its numbers)."""
        f = _Fields(where)
        f.obj(d, "manifest")
        version = f.int(d, "format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(
                f"{where}: format_version {version} is not supported (this reader knows {READABLE_VERSIONS}): "
                "upgrade streamdata or rebuild the store"
            )
        shards, start, doc_start = [], 0, 0
        for i, s in enumerate(f.list(d, "shards")):
            f.obj(s, f"shards[{i}]")
            info = ShardInfo(f.str(s, "file", f"shards[{i}]."), f.int(s, "tokens", f"shards[{i}]."),
                             f.int(s, "documents", f"shards[{i}]."), f.str(s, "sha256", f"shards[{i}]."),
                             start, doc_start)
            shards.append(info)
            start += info.tokens
            doc_start += info.documents
        totals = f.dict(d, "totals")
        for k in ("tokens", "documents"):
            f.int(totals, k, "totals.")
        for k in totals:
            f.int(totals, k, "totals.")
        tokenizer = f.dict(d, "tokenizer")
        if tokenizer.get("vocab_size") is not None:
            f.int(tokenizer, "vocab_size", "tokenizer.", low=1)
        for k in ("sha256", "ids_sha256"):  # ids_*: absent in stores written before they were recorded
            if tokenizer.get(k) is not None:
                f.str(tokenizer, k, "tokenizer.")
        if tokenizer.get("ids_parts") is not None:
            parts = f.dict(tokenizer, "ids_parts", "tokenizer.")
            for k in parts:
                f.str(parts, k, "tokenizer.ids_parts.")
        special = f.dict(d, "special_tokens")
        for k in ("bos", "eos"):
            if special.get(k) is not None:
                f.int(special, k, "special_tokens.")
        index = []
        for i, x in enumerate(f.list(d, "index") if "index" in d else []):  # absent in version 1
            f.obj(x, f"index[{i}]")
            index.append(IndexInfo(f.str(x, "name", f"index[{i}]."), f.str(x, "file", f"index[{i}]."),
                                   f.int(x, "length", f"index[{i}]."), f.str(x, "sha256", f"index[{i}].")))
        word_rule = f.str(d, "word_rule") if "word_rule" in d else None
        if word_rule is not None and word_rule not in WORD_RULES:
            raise StoreError(f"{where}: word_rule {word_rule!r} is unknown (this reader knows {', '.join(WORD_RULES)}): "
                             "upgrade streamdata, or rebuild the store")
        source_files = None
        if "source_files" in d:
            source_files = f.list(d, "source_files")
            for i, x in enumerate(source_files):
                if not isinstance(x, str):
                    raise f._bad(f"source_files[{i}]", x, "a string")
        names = {x.name for x in index}
        if (source_files is not None) != (set(SOURCE_ARRAYS) <= names) or len(names & set(SOURCE_ARRAYS)) == 1:
            raise StoreError(f"{where}: the source arrays {', '.join(SOURCE_ARRAYS)} and source_files come together, "
                             "but only some are listed: the manifest was edited or damaged; rebuild the store")
        m = cls(
            dtype=f.str(d, "dtype"),
            tokenizer=tokenizer,
            special_tokens=special,
            source=f.dict(d, "source"),
            shards=shards,
            totals=dict(totals),
            format=f.str(d, "format") if "format" in d else "npy",
            format_version=version,
            created_by=f.dict(d, "created_by") if "created_by" in d else {},
            extra=f.dict(d, "extra") if "extra" in d else {},
            index=index,
            word_rule=word_rule,
            source_files=source_files,
        )
        numpy_dtype(m.dtype)
        if start != m.num_tokens or doc_start != m.num_documents:
            raise StoreError(
                f"{where}: shards hold {start} tokens / {doc_start} documents but totals say "
                f"{m.num_tokens} / {m.num_documents}: the store is damaged, rebuild it"
            )
        return m


def word_rule_of(m: Manifest) -> str | None:
    """How the words of ``m``'s store were counted (a :data:`WORD_RULES` key): its recorded
    ``word_rule``; for our own formats without one, :data:`LEGACY_WORD_RULE` (written before the
    rule was recorded); for counts given some other way (in-memory ids with ``doc_words``),
    ``"unrecorded"``; None when the store knows no words (imports; a total of 0, where word
    perplexity is not reported either). Writers that copy counts record this."""
    if m.word_rule is not None:
        return m.word_rule
    if not m.totals.get("words"):
        return None
    return LEGACY_WORD_RULE if m.format in STORE_FORMATS else "unrecorded"


class _Fields:
    """Typed field access for :meth:`Manifest.from_dict`: one line naming the field on a mismatch."""

    def __init__(self, where: str):
        self.where = where

    def _bad(self, name: str, value: Any, expected: str) -> StoreError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return StoreError(f"{self.where}: field {name!r} is {shown}, expected {expected}: "
                          "the manifest was edited or damaged; rebuild the store")

    def _get(self, d: dict, key: str, prefix: str) -> Any:
        if key not in d:
            raise StoreError(f"{self.where}: field {prefix + key!r} is missing: the manifest is damaged; rebuild the store")
        return d[key]

    def obj(self, v: Any, name: str) -> None:
        if not isinstance(v, dict):
            raise self._bad(name, v, "a JSON object")

    def int(self, d: dict, key: str, prefix: str = "", low: int = 0) -> int:
        v = self._get(d, key, prefix)
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise self._bad(prefix + key, v, f"an integer >= {low}")
        return v

    def _typed(self, d: dict, key: str, prefix: str, kind: type, what: str) -> Any:
        v = self._get(d, key, prefix)
        if not isinstance(v, kind):
            raise self._bad(prefix + key, v, what)
        return v

    # (inside these methods the names str/dict/list are the builtins, not the methods)
    def str(self, d: dict, key: str, prefix: str = "") -> str:
        return self._typed(d, key, prefix, str, "a string")

    def dict(self, d: dict, key: str, prefix: str = "") -> dict:
        return self._typed(d, key, prefix, dict, "a JSON object")

    def list(self, d: dict, key: str, prefix: str = "") -> list:
        return self._typed(d, key, prefix, list, "a JSON list")


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (POSIX)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_file(path: str | os.PathLike):
    """Open ``path`` for writing (created or truncated) as a binary file object: every file a writer
    writes is opened here.

    ``O_NOFOLLOW``: a symlink planted under one of our names (``shards/tokens-00001.bin.partial``
    pointing at a file elsewhere) is refused in one line instead of being followed, truncated and
    overwritten with token ids. The folder checks of :mod:`streamdata.output` refuse such entries
    before a build starts; this closes the gap between that check and the open.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StoreError(f"{os.fspath(path)!r} is a symbolic link: streamdata writes only regular files inside "
                             "its output and left it alone; remove it yourself, then rerun") from None
        raise
    return os.fdopen(fd, "wb")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with create_file(tmp) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_file() and not tmp.is_symlink():  # ours (a full disk, say): no half file left behind
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def manifest_missing(shown: str, root_exists: bool, has_build: bool) -> StoreError:
    """The one-line error for a location without a readable ``manifest.json`` (any backend)."""
    if not root_exists:
        return StoreError(f"store {shown!r} does not exist: check the path or build it with 'streamdata tokenize'")
    hint = (
        "an unfinished build is there: rerun the same command to resume it"
        if has_build
        else "it is not a store: build one with 'streamdata tokenize' or 'streamdata convert'"
    )
    return StoreError(f"{shown!r} has no {MANIFEST_NAME}: {hint}")


def parse_manifest(data: bytes, where: str) -> Manifest:
    """The manifest held by ``data`` (the bytes of a ``manifest.json``), validated; ``where`` names it in errors."""
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreError(f"{where!r} is not readable JSON ({e}): the store is damaged, rebuild it") from None
    if not isinstance(d, dict):
        raise StoreError(f"{where!r} is not a JSON object: the store is damaged, rebuild it")
    return Manifest.from_dict(d, where=where)


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Read and validate ``root/manifest.json``; a folder without one is not a store."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise manifest_missing(str(root), root.exists(), (root / BUILD_DIR).exists())
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{str(path)!r} cannot be read ({e.strerror}): check its permissions") from None
    return parse_manifest(data, str(path))


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
