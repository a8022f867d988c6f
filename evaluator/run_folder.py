"""The run folder (``streameval run/compare/demo --out DIR``, the API's ``checkpoint_dir``): the one
home of every name in it and of the rules that keep it safe (docs/safety.md, "Run folders").

Layout (every name below is spelled here and nowhere else)::

    streameval-run.json          our marker: written first (atomically); only it makes a folder ours
    .streameval-lock             the writer lock (an exclusive flock, dropped by the OS when the
                                 process dies; the file is removed when the run ends)
    checkpoint.pt                the resumable state (evaluator/checkpoint.py), checksummed
    progress.json                for people and scripts: unfinished or complete (never read by a resume)
    window_*.npy, document_*.npy spilled per-window/per-document sums (evaluator/spill.py),
                                 NAME.partial until the run completes
    per_token_losses.f32         --per-token (run), per_token_kl.f32 (compare); NAME.partial until complete
    results.json, *.csv, *.png   the report (evaluator/report.py); results.json last: the report is complete
    rank-R-of-N/                 under torchrun: each rank's checkpoint, progress and spilled columns
    store/                       demo only: the corpus it tokenized (a streamdata store, never removed)

Rules:

- **Ours vs foreign.** A folder is ours when it carries our marker. A missing or empty folder is
  made ours (the marker is the first file we write). Any other non-empty folder is refused, with
  or without ``--overwrite``, and nothing in it is touched. A folder of ours may also hold files
  of the user: they are never read, changed or removed.
- **One run per folder.** :meth:`RunFolder.open` takes the lock before it changes anything and
  holds it until the run (and its report) is done; a second run on the same folder fails at once
  with one line. Under torchrun rank 0 holds the lock for every rank (the others attach to the
  folder only after rank 0 has it: :func:`evaluator.distributed.open_run_folder`).
- **Integrity.** Everything a resume reads is checksummed: the checkpoint carries the SHA-256 of
  its own bytes in a small header, and records for each file it relies on (spilled columns,
  per-token file) its size and the SHA-256 of the byte range it relies on: the prefix flushed
  before the checkpoint (the whole file once the run is complete). The digests grow with the
  files (:class:`PrefixDigest`: bytes are read once, when they become final), so a checkpoint
  costs what was written since the last one, not the file size. A resume checks all of it before
  any compute; a mismatch is one line naming the file, with ``--overwrite`` as the way to start
  over. Bytes past a prefix (written after the checkpoint, or never) are cleared before the run
  continues, so nothing unverified can reach a result.
- **Overwrite** removes only the names listed here, in a folder carrying our marker (the marker
  and the demo's store stay), and rank folders only of our names.
- **Publishing**: files are written under ``.partial`` (or temporary) names and renamed when
  whole; ``results.json`` is written last, so its presence means the run and its report are complete.
- **A full disk** (ENOSPC, EDQUOT) is one line naming the folder: free space and rerun the same
  command, which resumes from the last checkpoint.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable

from streamdata.format import fsync_dir
from streamdata.output import FolderLock

from .errors import ConfigError, EvaluatorError

__all__ = [
    "CHECKPOINT_NAME", "MARKER_NAME", "PROGRESS_NAME", "REPORT_FILES", "RESULTS_NAME", "PrefixDigest", "RunFolder",
    "check_output_file", "partial", "per_token_name", "spill_name", "temporary",
]

MARKER_NAME = "streameval-run.json"
_MARKER = "streameval-run-folder"  # the marker field: what makes a folder ours
_MARKER_VERSION = 1
LOCK_NAME = ".streameval-lock"
CHECKPOINT_NAME = "checkpoint.pt"
PROGRESS_NAME = "progress.json"
RESULTS_NAME = "results.json"
DEMO_STORE = "store"
_PARTIAL = ".partial"

#: Report files by role (evaluator/report.py writes them; results.json last).
REPORT_FILES = {
    "results": RESULTS_NAME, "chunks": "chunks.csv", "documents": "documents.csv", "positions": "positions.csv",
    "plot_chunks": "perplexity_per_chunk.png", "plot_positions": "loss_by_position.png",
    "plot_kl_positions": "kl_by_position.png", "plot_kl_histogram": "kl_histogram.png",
}
_PER_TOKEN = {"nll": "per_token_losses.f32", "kl": "per_token_kl.f32"}

# Names of ours that --overwrite may remove: fixed names, spilled columns, temporary names.
_SPILL = re.compile(r"^(window|document)_[a-z0-9_]+\.npy(\.partial)?$")
_TMP = re.compile(r"^\.(.+)\.tmp-\d+$")  # temporary(): the name it will be published under
_RANK_DIR = re.compile(r"^rank-(\d+)-of-(\d+)$")
_FIXED = {CHECKPOINT_NAME, PROGRESS_NAME, *REPORT_FILES.values(), *_PER_TOKEN.values(),
          *(n + _PARTIAL for n in _PER_TOKEN.values())}


def temporary(path: Path) -> Path:
    """Where a file of ours is written before it is renamed to ``path`` (fsynced first where it
    matters): hidden, beside it, named by the process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def partial(path: str | os.PathLike) -> str:
    """The name a file has while it is incomplete (renamed to ``path`` when whole)."""
    return str(path) + _PARTIAL


def spill_name(column: str) -> str:
    return f"{column}.npy"


def per_token_name(kind: str) -> str:
    """``nll``: a run's per-token losses; ``kl``: a comparison's per-token KL."""
    return _PER_TOKEN[kind]


def rank_dir_name(rank: int, world_size: int) -> str:
    return f"rank-{rank}-of-{world_size}"


def _ours(name: str) -> bool:
    name = _published_as(name) or name
    return name in _FIXED or bool(_SPILL.match(name))


# ---- integrity ---------------------------------------------------------------------------------
_READ = 1 << 23  # bytes per read while digesting (8 MiB)


class PrefixDigest:
    """SHA-256 of bytes ``[start, end)`` of one file, extended as ``end`` grows (never re-read).

    A writer calls :meth:`extend` when bytes become final (at a checkpoint) and puts :meth:`record`
    into the checkpoint; a resume rebuilds it with :meth:`resume`, which checks the file against
    the record and returns a digest ready to extend."""

    def __init__(self, start: int = 0):
        self.start = self.end = int(start)
        self._h = hashlib.sha256()

    def extend(self, fd: int, end: int) -> None:
        while self.end < end:
            b = os.pread(fd, min(_READ, end - self.end), self.end)
            if not b:
                raise OSError(errno.EIO, f"short read at byte {self.end}")
            self._h.update(b)
            self.end += len(b)

    def extend_file(self, path: str | os.PathLike, end: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.extend(fd, end)
        finally:
            os.close(fd)

    def record(self, path: str | os.PathLike, size: int) -> dict[str, Any]:
        return {"path": str(path), "size": int(size), "start": self.start, "end": self.end,
                "sha256": self._h.hexdigest()}

    @staticmethod
    def resume(path: str | os.PathLike, rec: dict[str, Any], what: str) -> "PrefixDigest":
        """Check ``path`` against ``rec`` (size, digest of the recorded range); one-line
        ConfigError naming the file otherwise."""
        path = str(path)
        if not os.path.isfile(path):
            raise damaged(path, what, "it is missing")
        size = os.path.getsize(path)
        if size != rec["size"]:
            raise damaged(path, what, f"it holds {size:,} bytes, the checkpoint recorded {rec['size']:,}")
        d = PrefixDigest(rec["start"])
        d.extend_file(path, rec["end"])
        if d._h.hexdigest() != rec["sha256"]:
            raise damaged(path, what, f"bytes {rec['start']:,}..{rec['end']:,} differ from their checksum")
        return d


def damaged(path: str | os.PathLike, what: str, why: str) -> ConfigError:
    return ConfigError(f"{what} {str(path)!r} is damaged ({why}): it cannot be resumed; "
                       "pass --overwrite to start over")


def clear_after(path: str | os.PathLike, end: int, size: int) -> None:
    """Zero bytes ``[end, size)`` of ``path`` (a truncate and re-extend: sparse, O(1)), so what a
    crashed run wrote past its last checkpoint, or damage there, cannot reach a resumed run."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, end)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


# ---- output paths ------------------------------------------------------------------------------
def check_output_file(path: str | os.PathLike | None, what: str) -> None:
    """Refuse, before any compute, an output file that cannot be written: a folder at ``path`` or
    at its ``.partial`` name, or a parent that is not a writable folder."""
    if path is None:
        return
    p = Path(path)
    for q in (p, Path(partial(p))):
        if q.is_dir():
            raise ConfigError(f"{what} {str(p)!r}: {str(q)!r} is a folder: name a file (e.g. {str(p / 'out.f32')!r})")
    parent = p.parent
    if not parent.is_dir():
        raise ConfigError(f"{what} {str(p)!r}: its folder {str(parent)!r} does not exist: create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(p)!r}: its folder {str(parent)!r} is not writable: choose another path")


def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


# ---- the folder --------------------------------------------------------------------------------
def _read_marker(root: Path) -> bool:
    try:
        d = json.loads((root / MARKER_NAME).read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("marker") == _MARKER and d.get("version") == _MARKER_VERSION


def _published_as(name: str) -> str | None:
    """The name a temporary file (:func:`temporary`) will be renamed to; None for other names."""
    m = _TMP.match(name)
    return m.group(1) if m else None


def _entries(root: Path) -> list[str]:
    """What the folder holds, besides our lock file and an interrupted marker write."""
    return sorted(e.name for e in root.iterdir() if e.name != LOCK_NAME and _published_as(e.name) != MARKER_NAME)


class RunFolder:
    """One run folder, opened for a run: the lock held (unless attached as a torchrun rank > 0),
    our marker present. A context manager: ``with RunFolder.open(path) as f: ...`` releases the
    lock at the end and turns a full disk into one line naming the folder."""

    def __init__(self, root: Path, lock: Any = None):
        self.root = root
        self._lock = lock

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out",
             demo: bool = False) -> "RunFolder":
        """Open ``path`` for a run: create it when missing, refuse a foreign one, lock it, mark it,
        and with ``overwrite`` remove the files of an earlier run (only names of ours).

        ``demo``: a folder holding nothing but a finished streamdata store named ``store`` (what
        ``streameval demo`` left before run folders had a marker; the store's own manifest makes
        it ours) is adopted as empty."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise ConfigError(f"{flag} {str(path)!r} is a file, not a folder: choose another {flag}")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{flag} {str(path)!r} is not a writable folder ({e.strerror}): choose another {flag}") from None
        if not os.access(root, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {str(path)!r} is not a writable folder: choose another {flag}")
        cls._refuse_foreign(root, flag, demo)  # before the lock: nothing is created in a foreign folder
        lock = FolderLock(root / LOCK_NAME, f"{flag} {str(path)!r}")
        folder = cls(root, lock)
        try:
            cls._refuse_foreign(root, flag, demo)  # again under the lock: it may have changed meanwhile
            if not _read_marker(root):
                folder._write_marker()  # the first file of ours in the folder
            if overwrite:
                folder._remove_ours()
            elif (root / RESULTS_NAME).exists() and not folder._any_checkpoint():
                raise ConfigError(f"{flag} {str(path)!r} holds the report of an earlier run without its checkpoint: "
                                  f"pass --overwrite to replace it, or choose another {flag}")
        except BaseException as e:
            folder.close()
            if disk_full(e):  # (the marker could not be written)
                raise folder._disk_full(e) from None
            raise
        return folder

    @classmethod
    def attach(cls, path: str | os.PathLike) -> "RunFolder":
        """A torchrun rank > 0: the folder rank 0 opened (and holds locked) for every rank."""
        root = Path(path)
        if not _read_marker(root):
            raise ConfigError(f"{str(path)!r} is not a run folder of streameval (no {MARKER_NAME}): "
                              "internal error, rank 0 opens it first")
        return cls(root)

    @staticmethod
    def _refuse_foreign(root: Path, flag: str, demo: bool = False) -> None:
        names = _entries(root)
        if demo and names == [DEMO_STORE]:
            from streamdata.format import read_manifest

            try:
                read_manifest(root / DEMO_STORE)  # a finished store of ours (its manifest's format)
                names = []
            except Exception:  # noqa: BLE001 - anything else there: not adopted
                pass
        if names and not _read_marker(root):
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ConfigError(
                f"{flag} {str(root)!r} is not empty and is not a run folder of streameval (no valid {MARKER_NAME}; "
                f"it holds {shown}): choose an empty or new {flag} (nothing was changed; --overwrite never removes "
                "files streameval did not write)")

    def _write_marker(self) -> None:
        tmp = temporary(self.root / MARKER_NAME)
        body = {"marker": _MARKER, "version": _MARKER_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "note": "a run folder of streameval: its --overwrite removes only the files it writes"}
        with open(tmp, "w") as f:
            f.write(json.dumps(body, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / MARKER_NAME)
        fsync_dir(self.root)

    def _remove_ours(self) -> None:
        """--overwrite: our names only (never the marker, the demo's store or anything else)."""
        for p in self.root.iterdir():
            if p.is_symlink():
                continue
            if p.is_file() and _ours(p.name):
                p.unlink()
            elif p.is_dir() and _RANK_DIR.match(p.name):
                for f in p.iterdir():
                    if f.is_file() and not f.is_symlink() and _ours(f.name):
                        f.unlink()
                try:
                    p.rmdir()
                except OSError:  # something else is in there: left as it is
                    pass

    def _rank_dirs(self) -> Iterable[tuple[Path, int]]:
        if not self.root.is_dir():
            return
        for p in self.root.iterdir():
            m = _RANK_DIR.match(p.name)
            if m and p.is_dir():
                yield p, int(m.group(2))

    def _any_checkpoint(self) -> bool:
        return (self.root / CHECKPOINT_NAME).exists() or any((p / CHECKPOINT_NAME).exists() for p, _ in self._rank_dirs())

    # ---- the run's places ------------------------------------------------------------------------
    def part_dir(self, info: Any = None) -> Path:
        """Where this process keeps its checkpoint and spilled columns: the folder itself, or its
        rank folder under torchrun (created)."""
        if info is None:
            return self.root
        d = self.root / rank_dir_name(info.rank, info.world_size)
        d.mkdir(exist_ok=True)
        return d

    def check_world(self, info: Any = None) -> None:
        """Refuse to resume a checkpoint written with another number of processes (its rank blocks
        would not line up with this run's): one line naming both world sizes."""
        world = 1 if info is None else info.world_size
        found = {w for p, w in self._rank_dirs() if (p / CHECKPOINT_NAME).is_file()}
        if (self.root / CHECKPOINT_NAME).is_file():
            found.add(1)
        other = sorted(found - {world})
        if other:
            raise ConfigError(
                f"{str(self.root)!r} holds a checkpoint of a run with {other[0]} process(es), this run has {world}: "
                f"rerun with {other[0]} process(es) to resume it, pass --overwrite to start over, or choose another --out")

    def per_token_path(self, kind: str) -> Path:
        return self.root / per_token_name(kind)

    def report_path(self, role: str) -> Path:
        return self.root / REPORT_FILES[role]

    def demo_store(self) -> Path:
        """``streameval demo``: the store it tokenizes into the folder (kept by --overwrite)."""
        return self.root / DEMO_STORE

    def is_complete(self) -> bool:
        """The report is there (results.json is written last)."""
        return (self.root / RESULTS_NAME).is_file()

    # ---- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.close()
        if exc is not None and disk_full(exc):
            raise self._disk_full(exc) from None

    def _disk_full(self, exc: OSError) -> EvaluatorError:
        return EvaluatorError(
            f"no space left for the run folder {str(self.root)!r} ({exc.strerror}"
            f"{f': {exc.filename}' if exc.filename else ''}): free space there and rerun the same command "
            "(it resumes from the last checkpoint)")

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r}, locked={self._lock is not None})"
