"""Where every writer's output goes: the one home of "refuse / resume / overwrite / lock".

Every writer (the npy :class:`~streamdata.writer.StoreWriter`, the zarr pack
:func:`~streamdata.backends.zarr.write_zarr_store`, ``tokenize --format zarr``, ``convert``) calls
:func:`prepare_output` once and gets an :class:`Output`: the folder to write into, the build ledger
to resume from, and :meth:`Output.seal` / :meth:`Output.abort` to finish. It is a module of its own
(not part of :mod:`streamdata.format`) because it is about a build's lifecycle (locks, renames,
clean-up), while ``format`` describes the bytes of a finished store.

Rules (docs/safety.md):

- **Only our markers make a folder ours.** A folder is a *store of ours* when its ``manifest.json``
  parses with our ``format`` (npy, zarr) and a readable ``format_version``; it is a *build of ours*
  when ``_build/streamdata-build.json`` holds our ledger marker (written before anything else of a
  build). Either must also hold nothing but names our layouts use, each a real folder or regular
  file (:func:`foreign_entries`, lstat: a symlink named like a partial shard is foreign). Any
  other non-empty folder is refused, with or without ``overwrite``; nothing we did not write is
  ever removed, and a symlink never is. Every file a writer writes is opened with ``O_NOFOLLOW``
  (:func:`streamdata.format.create_file`).
- **A symlinked output is refused** (:func:`_refuse_symlink`): a swap renames the output folder,
  and the lock beside a link would not guard the real folder.
- **One writer per folder** (local outputs): an exclusive ``flock`` on ``.NAME.streamdata-lock``
  beside the output (beside, not inside: the output folder is renamed by an overwrite, and a lock
  file left inside would make a user's folder look foreign). The second writer fails at once; the
  OS drops the lock when a process dies. Our lock file is removed when the build ends.
- **Overwrite by swap**: replacing a finished store builds the new one in the sibling
  ``.NAME.streamdata-new`` (same file system), and only once it is sealed renames the old store to
  ``.NAME.streamdata-old``, the new one to ``NAME``, and removes the old one. Just before the seal
  the ``-new`` ledger records the swap (:attr:`BuildLedger.swap`: this output's real path and the
  sha256 of the manifest it replaces); the ledger goes only once the swap is done. Recovery rule
  (run by every :func:`prepare_output` under the lock, so any rerun completes it): a sealed ``-new``
  that is a real folder whose record names this output means the swap was decided, so it is
  finished; an ``-old`` is removed only when it is a real folder holding the store the record says
  was replaced. Any other ``-new``/``-old`` (a symlink, a file, a store without that record) is
  refused in one line and left alone. Until the swap the old store stays intact and readable.
- **Exports** (:mod:`streamdata.export`: Megatron, nanoGPT, LitData files) follow the same rules
  with another seal: instead of ``manifest.json`` (which would hide a LitData folder from our own
  reader and means "a store of ours") a sealed export holds :data:`EXPORT_MARKER`, a JSON record
  with our marker, the target format and its build settings, which the target tools ignore. A
  folder with that record holds only the names of its format's layout (:data:`EXPORT_LAYOUTS`),
  so ``--overwrite`` and reruns recognise it and anything else in it is foreign.
- **Full disk**: :func:`full_disk_is_one_line` around each writer turns ENOSPC/EDQUOT into one line.
- **Resume identity**: the ledger records the build's settings and each local source file's size,
  mtime and a content digest (:class:`SourceFile`); a rerun resumes only when all are unchanged.
- **Leftovers**: :meth:`Output.abort` keeps exactly what a rerun resumes from; when nothing was
  finished it removes every entry the build created (and the folder, when the build created it).

Remote outputs (fsspec URLs other than ``file://``) cannot be locked or renamed atomically: they are
written unlocked (one writer at a time is the caller's business), and ``overwrite`` of a finished
remote store is refused, because it could only delete the old store before the new one exists.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import ConfigError, SourceError, StoreError
from .format import (
    BUILD_DIR,
    INDEX_DIR,
    MANIFEST_NAME,
    READABLE_VERSIONS,
    SHARD_DIR,
    STORE_FORMATS,
    Manifest,
    ShardInfo,
    atomic_write_bytes,
    fsync_dir,
)

__all__ = [
    "EXPORT_LAYOUTS",
    "EXPORT_MARKER",
    "LEDGER_FILE",
    "STAGING_DIR",
    "BuildLedger",
    "FolderLock",
    "Output",
    "SourceFile",
    "foreign_entries",
    "full_disk_is_one_line",
    "json_normalised",
    "lock_output",
    "prepare_output",
]

LEDGER_MARKER = "streamdata-build-ledger"
LEDGER_FILE = f"{BUILD_DIR}/streamdata-build.json"
STAGING_DIR = f"{BUILD_DIR}/npy-staging"  # tokenize --format zarr: the npy store packed into zarr
_ZARR_ARRAYS = ("tokens", "doc_offsets", "doc_bytes", "doc_words", "doc_source_file", "doc_source_row")
_NEW, _OLD, _LOCK = ".streamdata-new", ".streamdata-old", ".streamdata-lock"
_DIGEST_SPAN = 1 << 20  # SourceFile digest: the first and the last MiB (a full hash of 1 TB is hours)

# Names our layouts put in a store or build root (npy: streamdata.format; zarr: backends/zarr.py).
_TMP = re.compile(r"^\..+\.tmp-\d+$")  # atomic_write_bytes' temporary names
_LOCKNAME = re.compile(r"^\..+" + re.escape(_LOCK) + "$")
_TOP = {MANIFEST_NAME, BUILD_DIR, SHARD_DIR, INDEX_DIR, "zarr.json", *_ZARR_ARRAYS}
_SHARD_NAME = re.compile(r"^tokens-\d{5}\.bin(\.partial)?$")
_INDEX_NAME = re.compile(r"^doc_(offsets|bytes|words|source_file|source_row)\.npy$")
#: the record that seals an export (what manifest.json is to a store): ours, ignored by the target tools
EXPORT_MARKER = "streamdata-export.json"
EXPORT_MARKER_ID = "streamdata-export"
#: the files each export format writes at the top of its folder (each first as NAME.partial)
EXPORT_LAYOUTS = {
    "megatron": re.compile(r"^tokens\.(bin|idx)(\.partial)?$"),
    "nanogpt": re.compile(r"^train\.bin(\.partial)?$"),
    "litdata": re.compile(r"^(index\.json|chunk-0-\d+\.bin)(\.partial)?$"),
}
_BUILD_NAME = re.compile(r"^(streamdata-build\.json|index-\d{5}\.npz(\.partial\.npz)?)$")


def json_normalised(obj: Any) -> Any:
    """JSON-normalised copy: what the same value compares equal to after a round trip through a ledger."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # a full disk, an exhausted quota


@contextmanager
def full_disk_is_one_line(out: str | os.PathLike) -> Iterator[None]:
    """Around a whole write (tokenize, convert, merge): a full disk or quota (ENOSPC, EDQUOT) becomes
    one line naming the output, instead of a traceback. Nothing else is needed to make the rerun
    right: the writer's abort keeps exactly the finished shards (a full disk strikes while a shard,
    index part or ledger is written, and each of those is committed only once it is complete), so
    the same command resumes after space is freed and gives the uninterrupted build's bytes."""
    try:
        yield
    except OSError as e:
        if e.errno not in _FULL:
            raise
        at = f" writing {os.fspath(e.filename)!r}" if e.filename else ""  # e.g. a temporary file elsewhere
        raise StoreError(f"no space left for output {os.fspath(out)!r} ({e.strerror}{at}): free space on its disk "
                         "(or raise the quota), then rerun the same command: finished shards are kept and it "
                         "resumes") from None


# ---- the source identity recorded for resume ----------------------------------------------------
@dataclass(frozen=True)
class SourceFile:
    """Identity of one local source file when a build started (rule: resume only when unchanged)."""

    path: str  # absolute
    size: int  # bytes
    mtime_ns: int
    digest: str  # sha256 of the size (8 bytes LE) + the first and the last MiB (see _DIGEST_SPAN)

    @classmethod
    def of(cls, path: str | os.PathLike) -> "SourceFile":
        p = Path(path).resolve()
        try:
            with open(p, "rb") as f:
                st = os.fstat(f.fileno())
                h = hashlib.sha256(st.st_size.to_bytes(8, "little"))
                h.update(f.read(_DIGEST_SPAN))
                if st.st_size > _DIGEST_SPAN:
                    f.seek(max(_DIGEST_SPAN, st.st_size - _DIGEST_SPAN))
                    h.update(f.read(_DIGEST_SPAN))
        except OSError as e:
            raise SourceError(f"cannot read source file {str(p)!r} ({e.strerror}): check the path and permissions") from None
        return cls(str(p), int(st.st_size), int(st.st_mtime_ns), h.hexdigest())


def _changed_sources(recorded: Sequence[SourceFile], now: Sequence[SourceFile]) -> list[str]:
    old = {s.path: s for s in recorded}
    new = {s.path: s for s in now}
    return sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p))


# ---- the one build ledger -----------------------------------------------------------------------
@dataclass
class BuildLedger:
    """What a build has finished, committed after each durable step by :meth:`Output.commit_ledger`.

    Written first, before any other file of a build: its marker is what makes an unfinished build
    folder ours. ``settings`` is the identity of everything that decides the output bytes; a rerun
    resumes only when it and ``sources`` are unchanged.
    """

    settings: dict[str, Any]
    sources: list[SourceFile] = field(default_factory=list)
    shards: list[ShardInfo] = field(default_factory=list)  # npy: finished shard files, in order
    packed_tokens: int = 0  # zarr: tokens of the source store packed (whole zarr shards, fsynced)
    pack_settings: dict[str, Any] | None = None  # zarr: identity of that pack; packed_tokens counts under it
    #: overwrite by swap: {"target": the output this replacement was built for (real parent + name),
    #: "replaces": sha256 of the replaced store's manifest.json or None}; written just before the seal
    #: and kept until the swap is done: what makes a sealed ``-new`` (and the ``-old`` it pushes
    #: aside) trusted leftovers of *this* output (see _recover)
    swap: dict[str, Any] | None = None
    marker: str = LEDGER_MARKER

    @property
    def has_progress(self) -> bool:
        return bool(self.shards) or self.packed_tokens > 0

    def to_json(self) -> bytes:
        d = {
            "marker": self.marker, "settings": self.settings, "packed_tokens": self.packed_tokens,
            "pack_settings": self.pack_settings, "swap": self.swap,
            "sources": [vars(s) for s in self.sources],
            "shards": [{"file": s.file, "tokens": s.tokens, "documents": s.documents, "sha256": s.sha256}
                       for s in self.shards],
        }
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> "BuildLedger":
        """The ledger in ``data`` (which :func:`_has_marker` found ours); StoreError when damaged."""
        try:
            d = json.loads(data)
            shards, start, doc_start = [], 0, 0
            for s in d["shards"]:
                info = ShardInfo(_typed(s["file"], str), _typed(s["tokens"], int), _typed(s["documents"], int),
                                 _typed(s["sha256"], str), start, doc_start)
                shards.append(info)
                start, doc_start = start + info.tokens, doc_start + info.documents
            return cls(
                settings=_typed(d["settings"], dict),
                sources=[SourceFile(_typed(s["path"], str), _typed(s["size"], int), _typed(s["mtime_ns"], int),
                                    _typed(s["digest"], str)) for s in d["sources"]],
                shards=shards,
                packed_tokens=_typed(d["packed_tokens"], int),
                pack_settings=None if d["pack_settings"] is None else _typed(d["pack_settings"], dict),
                swap=None if d.get("swap") is None else _typed(d["swap"], dict),  # absent in older ledgers
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise StoreError(f"build ledger {where!r} is damaged ({type(e).__name__}: {e}): "
                             "pass --overwrite to start the build over") from None


def _has_marker(data: bytes | None) -> bool:
    """True when ``data`` is a ledger of ours (our marker field): what makes a build folder ours."""
    try:
        d = json.loads(data) if data is not None else None
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(d, dict) and d.get("marker") == LEDGER_MARKER


def _typed(v: Any, t: type) -> Any:
    if not isinstance(v, t) or (t is int and isinstance(v, bool)):
        raise TypeError(f"{v!r} is not {t.__name__}")
    return v


# ---- a folder, local or behind an fsspec URL ---------------------------------------------------
class _Dir:
    """The few file operations a build needs, on a local folder (POSIX: fsync, rename, flock) or an
    fsspec URL (one PUT per file, which object stores make atomic per object)."""

    def __init__(self, where: str | os.PathLike, storage_options: dict | None = None):
        text = os.fspath(where)
        self.url = text
        self.fs = None
        if "://" in text:
            import fsspec

            try:
                fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
            except (ImportError, ValueError) as e:
                raise StoreError(f"cannot write to {text!r}: fsspec has no usable filesystem for "
                                 f"{text.split('://', 1)[0]!r} ({e}): install its fsspec package or pass a local path") from None
            protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
            if "file" in protos or "local" in protos:
                text = root  # file:// is a local folder: locked and swapped like one
            else:
                self.fs, self.root = fs, root.rstrip("/") or "/"
        if self.fs is None:
            self.root = os.path.abspath(text)
            self.url = text if "://" in self.url else self.root

    @property
    def local(self) -> bool:
        return self.fs is None

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return os.path.lexists(self.path(rel)) if self.local else self.fs.exists(self.path(rel))

    def isdir(self, rel: str = "") -> bool:
        return os.path.isdir(self.path(rel)) if self.local else self.fs.isdir(self.path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        if self.local:
            return sorted(os.listdir(self.path(rel))) if os.path.isdir(self.path(rel)) else []
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    def read(self, rel: str) -> bytes | None:
        try:
            if self.local:  # never through a symlink: what it points to is not this folder's
                with os.fdopen(os.open(self.path(rel), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as f:
                    return f.read()
            return self.fs.cat_file(self.path(rel))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None  # a symlink: read as absent, and foreign_entries refuses the folder
            raise

    def write_atomic(self, rel: str, data: bytes) -> None:
        if self.local:
            p = Path(self.path(rel))
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(p, data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def remove(self, rel: str) -> None:
        """Remove one entry of OUR layout (callers check ownership first). A symlink is never ours
        (we write only real files and folders): it is left alone, and so is what it points to."""
        p = self.path(rel)
        if self.local:
            if os.path.islink(p):
                return
            if os.path.isdir(p):
                shutil.rmtree(p)  # does not follow symlinks inside
            elif os.path.lexists(p):
                os.unlink(p)
        elif self.fs.exists(p):
            self.fs.rm(p, recursive=True)


def _is_our_manifest(data: bytes | None) -> bool:
    if data is None:
        return False
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(d, dict) and d.get("format") in STORE_FORMATS and d.get("format_version") in READABLE_VERSIONS


def _export_record(data: bytes | None) -> dict | None:
    """The sealed export record in ``data`` when it is ours (our marker, a known format), else None."""
    try:
        d = json.loads(data) if data is not None else None
    except (UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(d, dict) and d.get("marker") == EXPORT_MARKER_ID and d.get("to") in EXPORT_LAYOUTS
    return d if ok else None


def _export_layout(d: _Dir) -> "re.Pattern | None":
    """The file names of the export format ``d`` holds (sealed record, or the ledger of an export build), or None."""
    rec = _export_record(d.read(EXPORT_MARKER))
    if rec is not None:
        return EXPORT_LAYOUTS[rec["to"]]
    data = d.read(LEDGER_FILE)
    if _has_marker(data):
        try:
            to = json.loads(data).get("settings", {}).get("export")
        except (ValueError, AttributeError):
            return None
        return EXPORT_LAYOUTS.get(to) if isinstance(to, str) else None
    return None


def _seal_bytes(d: _Dir) -> bytes | None:
    """The bytes of what seals ``d``: its manifest (a store) or its export record (an export)."""
    data = d.read(MANIFEST_NAME)
    return data if data is not None else d.read(EXPORT_MARKER)


def _is_real(d: _Dir, rel: str, kind: str) -> bool:
    """Local: ``rel`` is a real ``kind`` ("dir" or "file"), not a symlink (lstat, never followed)."""
    try:
        mode = os.lstat(d.path(rel)).st_mode
    except FileNotFoundError:
        return False
    return stat.S_ISDIR(mode) if kind == "dir" else stat.S_ISREG(mode)


def _odd_in_tree(d: _Dir, rel: str) -> list[str]:
    """Symlinks and other non-regular entries anywhere under the folder ``rel`` (a zarr chunk tree)."""
    out = []
    for parent, dirs, files in os.walk(d.path(rel), followlinks=False):
        for n in dirs + files:
            p = os.path.join(parent, n)
            if os.path.islink(p) or not (os.path.isdir(p) or os.path.isfile(p)):
                out.append(os.path.relpath(p, d.root))
    return out


def foreign_entries(d: _Dir, rel: str = "") -> list[str]:
    """Entries under ``rel`` that none of our layouts writes (local: checked in depth; remote: top level).

    Local folders are checked by kind as well as by name: every entry must be a real folder or a
    regular file where our layout puts one, so a symlink carrying one of our names (a partial shard
    pointing at a file elsewhere, a linked ``shards/``) is foreign, and a writer never opens,
    truncates or removes what it points to.
    """
    out = []
    exported = _export_layout(d) if not rel else None
    for name in d.listdir(rel):
        sub = f"{rel}/{name}" if rel else name
        if _TMP.match(name) or _LOCKNAME.match(name) or (exported is not None and (
                exported.match(name) or name == EXPORT_MARKER)):
            if d.local and not _is_real(d, sub, "file"):
                out.append(sub)
        elif name not in _TOP:
            out.append(sub)
        elif not d.local:
            continue
        elif name in (MANIFEST_NAME, "zarr.json"):
            if not _is_real(d, sub, "file"):
                out.append(sub)
        elif not _is_real(d, sub, "dir"):
            out.append(sub)
        elif name == SHARD_DIR:
            out += _odd_files(d, sub, lambda n: _SHARD_NAME.match(n) or _TMP.match(n))
        elif name == INDEX_DIR:
            out += _odd_files(d, sub, lambda n: _INDEX_NAME.match(n) or _TMP.match(n))
        elif name == BUILD_DIR:
            for n in d.listdir(sub):
                if n == STAGING_DIR.rsplit("/", 1)[-1] and _is_real(d, f"{sub}/{n}", "dir"):
                    out += foreign_entries(d, f"{sub}/{n}")
                else:
                    out += _odd_files(d, sub, lambda n: _BUILD_NAME.match(n) or _TMP.match(n) or _LOCKNAME.match(n), [n])
        else:  # a zarr array: its zarr.json and the chunk tree "c/" that zarr writes
            for n in d.listdir(sub):
                if n == "c" and _is_real(d, f"{sub}/c", "dir"):
                    out += _odd_in_tree(d, f"{sub}/c")
                elif n != "zarr.json" or not _is_real(d, f"{sub}/{n}", "file"):
                    out.append(f"{sub}/{n}")
    return out


def _odd_files(d: _Dir, rel: str, ours, names: list[str] | None = None) -> list[str]:
    """Entries of folder ``rel`` (or just ``names``) that are not regular files with a name ``ours`` accepts."""
    return [f"{rel}/{n}" for n in (d.listdir(rel) if names is None else names)
            if not (ours(n) and _is_real(d, f"{rel}/{n}", "file"))]


def _kind(d: _Dir) -> str:
    """'absent' (missing or empty), 'store' or 'build' (ours), or 'foreign'."""
    if not d.exists():
        return "absent"
    if d.local and not os.path.isdir(d.root):
        raise ConfigError(f"output {d.url!r} exists and is not a folder: choose another output")
    if not d.listdir():
        return "absent"
    if _is_our_manifest(d.read(MANIFEST_NAME)) or _export_record(d.read(EXPORT_MARKER)) is not None:
        return "store"
    if _has_marker(d.read(LEDGER_FILE)):
        return "build"  # even if the rest of the ledger is damaged: ours, so --overwrite may clear it
    return "foreign"


def _refuse_foreign(d: _Dir, kind: str) -> None:
    if kind == "foreign":
        raise ConfigError(f"output {d.url!r} exists, is not empty and is not a store or build of streamdata: "
                          "choose another output (it is never deleted)")
    extra = foreign_entries(d)
    if extra:
        shown = ", ".join(repr(x) for x in extra[:3]) + (" ..." if len(extra) > 3 else "")
        raise ConfigError(f"output {d.url!r} holds files streamdata did not write ({shown}): move them out or "
                          "choose another output (nothing was changed)")


# ---- the lock -------------------------------------------------------------------------------------
class FolderLock:
    """Exclusive flock on a lock file of ours (beside a store output; inside a run folder: evaluator/run_folder.py);
    removed on release. The second holder fails at once with one line; the OS drops the lock when the process dies."""

    def __init__(self, path: Path, what: str):
        self.path = path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ConfigError(f"lock file {str(path)!r} of {what} is a symbolic link, not ours: remove it "
                                      "yourself (streamdata left it alone), then rerun") from None
                raise ConfigError(f"cannot create {what} (lock file {str(path)!r}: {e.strerror}): "
                                  "choose a writable output") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"{what} is being written by another process (lock {str(path)!r} is held): "
                                      "wait for it to finish, or choose another output") from None
                raise
            # the holder before us may have removed the file after we opened it: lock the live file
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd  # the file stays empty: the lock is the flock, not the content

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter that opened it retries on the live path
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            self.release()


# ---- the output ---------------------------------------------------------------------------------
class Output:
    """A prepared output: write into :attr:`root`, commit progress with :meth:`commit_ledger`,
    finish with :meth:`seal` (or :meth:`abort`). :attr:`finished` is set instead when the target
    already holds a finished store of the same settings (nothing to do)."""

    def __init__(self, target: _Dir, settings: dict[str, Any]):
        self.target = target
        self.settings = settings
        self.dir = target  # where this build writes: the target, or its sibling for overwrite-by-swap
        self.finished: Manifest | dict | None = None  # dict: a sealed export's record
        self.ledger = BuildLedger(settings)
        self._lock: FolderLock | None = None
        self._created = False  # this build created self.dir (abort may remove it)
        self._swap = False
        self._ended = False  # sealed or aborted

    @property
    def root(self) -> str:
        """Local folder path (or, for a remote output, the URL) to write into."""
        return self.dir.root if self.dir.local else self.dir.url

    @property
    def url(self) -> str:
        return self.target.url

    def commit_ledger(self) -> None:
        """The one helper that commits the ledger: atomically, after the data it records is durable."""
        self.dir.write_atomic(LEDGER_FILE, self.ledger.to_json())

    def seal(self, manifest: Manifest, file: str = MANIFEST_NAME) -> Manifest:
        """Write the manifest (the seal), drop the ledger, swap into place, release the lock.

        ``manifest.extra["build_settings"]`` becomes this build's settings: a rerun with the same
        settings finds the finished store and does nothing. An export seals with its record
        (``file=EXPORT_MARKER``; any object with ``extra`` and ``to_json()``).
        """
        manifest.extra = {**manifest.extra, "build_settings": self.settings}
        if self._swap:  # the ledger says which output this replacement is for, until the swap is done
            self.ledger.swap = {"target": _identity(self.target), "replaces": _manifest_sha256(self.target)}
            self.commit_ledger()
        self.dir.write_atomic(file, manifest.to_json().encode())
        if not self._swap:
            self.dir.remove(BUILD_DIR)
        self._ended = True  # sealed: from here a crash is recovered by the next prepare_output
        try:
            if self._swap:
                _finish_swap(self.target, self.ledger.swap)
        finally:
            self.release()
        return manifest

    def abort(self) -> None:
        """Stop without sealing: keep what a rerun resumes from, remove a build that finished nothing.
        A no-op once the output was sealed or aborted."""
        if self._ended:
            return
        self._ended = True
        try:
            if self.finished is None and not self.ledger.has_progress and not self.dir.exists(STAGING_DIR):
                exported = EXPORT_LAYOUTS.get(self.settings.get("export"))  # what an export build wrote
                for name in self.dir.listdir():
                    if name in _TOP or _TMP.match(name) or (exported is not None and exported.match(name)):
                        self.dir.remove(name)
                if (self._created or self._swap) and self.dir.local and not self.dir.listdir():
                    os.rmdir(self.dir.root)
        finally:
            self.release()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _sibling(target: _Dir, suffix: str) -> _Dir:
    parent, name = os.path.split(target.root)
    return _Dir(os.path.join(parent, f".{name}{suffix}"))


def _rename(src: str, dst: str) -> None:
    """One rename of the swap (same file system: atomic). A seam for tests that kill between renames."""
    os.rename(src, dst)


def _identity(target: _Dir) -> str:
    """The output a swap record names: its real parent folder and its name (stable under a parent
    reached through another symlinked path)."""
    parent, name = os.path.split(target.root)
    return os.path.join(os.path.realpath(parent), name)


def _manifest_sha256(d: _Dir) -> str | None:
    data = _seal_bytes(d) if _is_real(d, "", "dir") else None
    return None if data is None else hashlib.sha256(data).hexdigest()


def _swap_record(d: _Dir) -> dict[str, Any] | None:
    """The swap record in the ledger of ``d`` (a real folder of ours), or None."""
    data = d.read(LEDGER_FILE) if _is_real(d, "", "dir") and _is_real(d, LEDGER_FILE, "file") else None
    if not _has_marker(data):
        return None
    try:
        return BuildLedger.parse(data, d.path(LEDGER_FILE)).swap
    except StoreError:
        return None


def _not_ours(d: _Dir, target: _Dir, why: str) -> ConfigError:
    return ConfigError(f"{d.root!r} {why}, so it is not a leftover of a streamdata swap of {target.url!r}: "
                       "streamdata left it alone; move it away yourself, then rerun")


def _check_sibling(d: _Dir, target: _Dir) -> None:
    """A swap sibling must be a real folder: a symlink (or a file) with our reserved name is refused."""
    if os.path.islink(d.root):
        raise _not_ours(d, target, f"is a symbolic link (to {os.readlink(d.root)!r})")
    if os.path.lexists(d.root) and not os.path.isdir(d.root):
        raise _not_ours(d, target, "is not a folder")


def _finish_swap(target: _Dir, record: dict[str, Any]) -> None:
    """Complete an overwrite whose new store is sealed in the ``-new`` sibling (see module docstring)."""
    new, old = _sibling(target, _NEW), _sibling(target, _OLD)
    parent = Path(target.root).parent
    if target.exists():
        if old.exists():
            raise StoreError(f"cannot finish replacing {target.url!r}: {old.root!r} is in the way: move it out and rerun")
        _rename(target.root, old.root)
    _rename(new.root, target.root)
    fsync_dir(parent)
    _remove_old(target, old, record)
    target.remove(BUILD_DIR)  # the swap record goes last: until here a rerun can finish the clean-up


def _remove_old(target: _Dir, old: _Dir, record: dict[str, Any] | None) -> None:
    """Remove the store the swap pushed aside: only a real folder holding our store whose manifest
    is the one the swap record says it replaced; anything else is refused and left alone."""
    if not old.exists():
        return
    _check_sibling(old, target)
    if record is None or record.get("target") != _identity(target):
        raise _not_ours(old, target, "was not pushed aside by a swap recorded in the store at the output")
    if _kind(old) != "store" or foreign_entries(old) or _manifest_sha256(old) != record.get("replaces"):
        raise _not_ours(old, target, "is not the store that swap replaced")
    shutil.rmtree(old.root)


def _recover(target: _Dir) -> None:
    """Finish an overwrite interrupted by a crash (called under the lock).

    Trusted leftovers only: a sealed ``-new`` that is a real folder whose ledger records a swap for
    this very output (:attr:`BuildLedger.swap`) is swapped in; an ``-old`` is removed only when the
    swap record (in ``-new``, or in the store already swapped in) names this output and that store's
    manifest. A symlink or a folder we cannot tie to this output is refused in one line, left alone.
    """
    new, old = _sibling(target, _NEW), _sibling(target, _OLD)
    _check_sibling(new, target)
    _check_sibling(old, target)
    if new.exists() and _kind(new) == "store":
        record = _swap_record(new)
        if record is None or record.get("target") != _identity(target):
            raise _not_ours(new, target, "holds a finished store that was not built to replace this output")
        if foreign_entries(new):
            raise _not_ours(new, target, "holds files streamdata did not write")
        _finish_swap(target, record)
    elif old.exists():
        if not target.exists():
            raise ConfigError(f"{old.root!r} is beside a missing output {target.url!r} and no sealed replacement is "
                              "there to finish a swap: streamdata left it alone; if it is your store, rename it back to "
                              "the output yourself, then rerun")
        record = _swap_record(target) if _kind(target) == "store" else None
        _remove_old(target, old, record)  # the swap finished but the old store was not yet removed
        target.remove(BUILD_DIR)
    elif target.exists() and _swap_record(target) is not None and _kind(target) == "store":
        target.remove(BUILD_DIR)  # swapped in and cleaned, only the record was left


def _start(out: Output, d: _Dir, created: bool) -> Output:
    out.dir, out._created = d, created
    if d.local:
        os.makedirs(d.root, exist_ok=True)
    out.commit_ledger()  # first file of the build: the marker that makes the folder ours
    return out


def _clear(d: _Dir) -> None:
    """Remove a build of ours (ownership checked by the caller): ledger last, so a crash keeps the marker."""
    for name in d.listdir():
        if name != BUILD_DIR:
            d.remove(name)
    d.remove(BUILD_DIR)


def _resume(out: Output, d: _Dir, sources: list[SourceFile]) -> Output:
    ledger = BuildLedger.parse(d.read(LEDGER_FILE) or b"", d.path(LEDGER_FILE))
    if ledger.settings != out.settings:
        diff = sorted(k for k in set(ledger.settings) | set(out.settings)
                      if ledger.settings.get(k) != out.settings.get(k))
        raise ConfigError(f"output {out.url!r} holds an unfinished build made with other settings "
                          f"({', '.join(diff) or 'unreadable'}): rerun the original command to resume it, "
                          "or pass --overwrite to start over")
    changed = _changed_sources(ledger.sources, sources)
    if changed:
        raise SourceError(f"source changed since the build started ({changed[0]}"
                          f"{f' and {len(changed) - 1} more' if len(changed) > 1 else ''}): rerun with --overwrite")
    out.dir, out.ledger = d, ledger
    return out


def lock_output(target: str | os.PathLike, storage_options: dict | None = None) -> "FolderLock | None":
    """Take the writer lock of a local ``target`` (creating its parent folders); None for a remote URL.

    For callers that must hold the lock before they can compute the settings (``tokenize`` loads
    the source first): pass it to :func:`prepare_output` as ``lock``.
    """
    d = _Dir(target, storage_options)
    if not d.local:
        _inspect(d)
        return None
    _refuse_symlink(d)  # before the lock file is made beside it
    parent = Path(d.root).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create output {d.url!r} ({e.strerror}): choose a writable output") from None
    lock = FolderLock(parent / f".{Path(d.root).name}{_LOCK}", f"output {d.url!r}")
    try:
        _inspect(d)  # refuse a foreign target now, before the caller spends time on its source
    except BaseException:
        lock.release()
        raise
    return lock


def _refuse_symlink(d: _Dir) -> None:
    """A symlinked ``--out`` is refused (docs/safety.md): an overwrite renames the output folder,
    which would move the link and not the store, and the lock beside the link would not guard the
    real folder against a writer that names it. Symlinks in the parent path are fine."""
    if d.local and os.path.islink(d.root):
        raise ConfigError(f"output {d.url!r} is a symbolic link (to {os.path.realpath(d.root)!r}): streamdata writes, "
                          "locks and replaces only real folders; pass the folder itself as the output")


def _inspect(d: _Dir) -> str:
    """Recover an interrupted swap (local, under the lock), then classify ``d``; refuse what is not ours."""
    _refuse_symlink(d)
    if d.local:
        _recover(d)
    kind = _kind(d)
    if kind != "absent":
        _refuse_foreign(d, kind)
    return kind


def _finished(d: _Dir) -> "Manifest | dict | None":
    """The finished store's manifest, or a sealed export's record (a dict); None when damaged."""
    rec = _export_record(d.read(EXPORT_MARKER))
    if rec is not None:
        return rec
    try:
        return Manifest.from_dict(json.loads(d.read(MANIFEST_NAME) or b"null"), where=d.path(MANIFEST_NAME))
    except (StoreError, ValueError):
        return None  # damaged: not the finished identical store, so replaced only with overwrite


def _build_settings(m: "Manifest | dict") -> Any:
    extra = m.get("extra") if isinstance(m, dict) else m.extra
    return extra.get("build_settings") if isinstance(extra, dict) else None


def prepare_output(
    target: str | os.PathLike,
    settings: dict[str, Any],
    *,
    overwrite: bool = False,
    sources: Iterable[SourceFile] = (),
    storage_options: dict | None = None,
    lock: "FolderLock | None" = None,
) -> Output:
    """Lock ``target`` and decide what this build does (see the module docstring for the rules).

    Returns an :class:`Output` that is one of: ``finished`` (a store of ours built with these
    settings is there: nothing to do, lock released); a resumed build (``ledger`` holds its
    progress); or a fresh build in ``target`` or, when ``overwrite`` replaces a finished store, in
    its ``-new`` sibling. Raises ConfigError for a foreign or occupied target, or one that is locked.
    ``lock``: the target's lock from :func:`lock_output`, taken over by the returned Output.
    """
    try:
        settings = json_normalised(settings)
        sources = list(sources)
        target_dir = _Dir(target, storage_options)
        out = Output(target_dir, settings)
        out.ledger.sources = sources
        if lock is None:
            lock = lock_output(target, storage_options)
        out._lock = lock
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    try:
        kind = _inspect(target_dir)
        if kind == "absent":
            return _start(out, target_dir, created=not target_dir.exists())
        if kind == "build":
            if overwrite:
                _clear(target_dir)  # an unfinished build is not a store: nothing to protect
                return _start(out, target_dir, created=False)
            return _resume(out, target_dir, sources)
        # a finished store of ours
        m = _finished(target_dir)
        if not overwrite:
            if m is not None and json_normalised(_build_settings(m)) == settings:
                target_dir.remove(BUILD_DIR)  # a crash between the manifest and the ledger clean-up
                out.finished = m
                out.release()
                return out
            raise ConfigError(f"output {target_dir.url!r} already holds a finished store: pass --overwrite to "
                              "replace it, or choose another output")
        if not target_dir.local:
            raise ConfigError(f"output {target_dir.url!r} holds a finished store and remote outputs cannot be replaced "
                              "safely (no atomic rename): delete it yourself, or write to a new URL")
        new = _sibling(target_dir, _NEW)
        out._swap = True
        new_kind = _kind(new)
        if new_kind == "build" and not foreign_entries(new):
            try:
                return _resume(out, new, sources)
            except (ConfigError, SourceError, StoreError):
                _clear(new)  # an earlier replacement with other settings or sources: overwrite means start over
        elif new_kind != "absent":
            _refuse_foreign(new, new_kind)  # a foreign folder with our sibling's name: never removed
            _clear(new)
        return _start(out, new, created=True)
    except BaseException:
        out.release()
        raise
