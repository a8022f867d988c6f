"""zarr v3 backend: a token store as one zarr group, local or behind any fsspec URL.

Shared parts of the format (manifest fields, dtype rule, commit order) are described in
:mod:`streamdata.format`; this docstring holds what is specific to zarr.

Layout of a ``zarr`` store (``manifest["format"] == "zarr"``)::

    STORE/                      a zarr v3 group (zarr.json), attributes {"streamdata": {...}}
      manifest.json             written LAST (local: tmp + fsync + rename; object stores: one PUT);
                                without it the group is not a store
      tokens/                   1-D array [total tokens], dtype uint16|uint32 (manifest "dtype"),
                                little-endian ("bytes" codec endian=little), fill value 0.
                                Sharding codec: a shard object holds ``chunks_per_shard`` inner
                                chunks of ``chunk_tokens`` ids (defaults 16 x 1Mi = 16Mi ids,
                                32 MiB uint16); inner chunks are the unit a reader decodes, shards the
                                unit of an object PUT. Compression per inner chunk: none|zstd|blosc.
      doc_offsets/              int64 [documents + 1]: token offset of each document start, last ==
                                total tokens. Documents may straddle inner chunks and shards.
      doc_bytes/, doc_words/    int64 [documents]: UTF-8 bytes / whitespace words of each document's
                                text (zeros when the source did not know them, e.g. raw .bin imports;
                                then manifest totals bytes == words == 0)
      doc_source_file/,         int64 [documents], optional (format version 3): where each document
      doc_source_row/           came from (streamdata.format.SOURCE_ARRAYS; manifest source_files)
      _build/                   only while packing: zarr-pack.json (resume ledger), and for
                                ``tokenize --format zarr`` the npy staging store (npy-staging/)

The manifest has one entry in ``shards``: ``{"file": "tokens", "tokens": N, "documents": n,
"sha256": sha256 of the N ids as little-endian bytes}``, i.e. the same checksum an npy store's
shards would have, so ``streamdata verify`` (which hashes what ``read_into`` returns) checks both.

Writer (:func:`write_zarr_store`): zarr shards are written one at a time, each exactly aligned to a
shard, so zarr never read-modify-writes a shard. After each shard the ledger records how many
tokens are done (local: after fsync of the shard file). A rerun with the same settings continues
there (rehashing the finished prefix from the source, which is cheaper than keeping hash state)
and gives byte-identical objects; other settings are refused unless ``overwrite``.

Reader (:class:`ZarrTokenStore`): never one zarr ``__getitem__`` per window (~1.1-2.5 ms each for
8Ki ids on the 2-core build machine, i.e. 3-7M tok/s). Two read paths:

- **block cache** (compressed or remote stores): small reads are served from a cache of the last
  two decoded blocks (``block_tokens`` ids, aligned to inner chunks, >= 1Mi); reads of a block or
  more go straight to zarr into the caller's buffer. zarr decodes at most ~0.4-1.1G tok/s here,
  which bounds this path.
- **direct** (local, uncompressed, exactly the codec chain we write; kept because it measures
  ~5x the block cache on the same store in ``benchmarks.bench_zarr``): shard files are
  memory-mapped and sliced like npy shards, using the sharding codec's published binary layout
  (zarr v3 sharding spec): the shard holds its stored inner chunks back to back, then an index of
  ``chunks_per_shard`` pairs (offset, nbytes) as little-endian uint64, then the index's crc32c
  (4 bytes LE; checked with ``google_crc32c``, the library zarr's own crc32c codec uses);
  (2^64-1, 2^64-1) marks an inner chunk that is not stored; a stored inner chunk is always
  ``chunk_tokens`` ids (the array's partial last one is padded with the fill value).

Damage and replacement (both paths): the writer stores every token chunk, also all-zero ones
(``write_empty_chunks``), so a missing shard object or inner chunk is damage, reported as a
StoreError, never read as the fill value (zarr would). The direct path opens every shard file at
open and checks its index, that chunks tile the file and the last chunk's padding: every byte of a
shard is then covered by the crc32c, the token checksum or that padding check. It reads the
snapshot it opened. zarr's own path reads lazily, so after every zarr read it checks that
``manifest.json`` still holds the bytes it opened (one small read per block): a store replaced or
removed while it is read fails in one line rather than mixing two stores. Errors zarr raises on
damaged objects (decode errors, a bad shard index crc, garbage ``zarr.json``) become one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, StoreError
from ..format import (
    BUILD_DIR,
    FORMAT_VERSION,
    MANIFEST_NAME,
    IndexInfo,
    Manifest,
    SOURCE_ARRAYS,
    ShardInfo,
    fsync_dir,
    manifest_missing,
    numpy_dtype,
    parse_manifest,
    resolve_inside,
    word_rule_of,
)
from ..output import Output, full_disk_is_one_line, json_normalised as _norm, prepare_output
from .base import INDEX_IN_RAM, DocSources, MappedFile, TokenStore, check_document_index, check_index_in_ram, int64_index

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_BLOCK_TOKENS",
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_CHUNKS_PER_SHARD",
    "ZarrTokenStore",
    "check_compression",
    "is_url",
    "open_zarr_store",
    "pack_into_output",
    "write_zarr_store",
]

COMPRESSIONS = ("none", "zstd", "blosc")
DEFAULT_CHUNK_TOKENS = 1 << 20  # inner chunk: 2 MiB uint16; the smallest unit a reader decodes
DEFAULT_CHUNKS_PER_SHARD = 16  # shard object: 16Mi ids (32 MiB uint16), one PUT on object stores
DEFAULT_BLOCK_TOKENS = 1 << 22  # reader cache block: 4Mi ids (see benchmarks/bench_zarr.py)
_INDEX_CHUNK = 1 << 20  # entries per chunk of the document index arrays (8 MiB int64)


def _compressors(name: str) -> Any:
    """zarr v3 ``compressors`` for a compression name (None: raw little-endian bytes)."""
    if name == "none":
        return None
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "zstd":
        # level 3: zstd's own default speed/ratio trade-off (packing must not become the slow stage)
        return [ZstdCodec(level=3)]
    if name == "blosc":
        # byte shuffle stores the high bytes of all ids together (alike when the vocabulary is small
        # next to the dtype, e.g. 32k ids in uint16 or any vocabulary in uint32), then zstd
        return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
    raise ConfigError(f"unknown compression {name!r}: pass one of {', '.join(COMPRESSIONS)}")


def check_compression(name: str) -> str:
    if name not in COMPRESSIONS:
        raise ConfigError(f"unknown compression {name!r}: pass one of {', '.join(COMPRESSIONS)}")
    return name


def is_url(path: Any) -> bool:
    return isinstance(path, str) and "://" in path


# ---- where a store lives: a local folder or an fsspec URL ---------------------------------------
class _Location:
    """Small file API over a local folder or an fsspec URL (only what the store needs).

    Local folders (and file:// URLs when writing) get POSIX durability: tmp file + fsync + rename.
    Object stores get one PUT per file, which is atomic per object.
    """

    def __init__(self, where: str | os.PathLike, storage_options: dict | None = None):
        import fsspec

        self.storage_options = dict(storage_options or {})
        self.url = os.fspath(where)
        #: a URL (also file://): zarr reads through fsspec, never memory-maps (see ZarrTokenStore)
        self.remote = is_url(self.url)
        try:
            # a plain path is the local file system at that path (not parsed as a URL: a name may
            # hold '::', fsspec's chaining syntax)
            self.fs, self.root = (fsspec.core.url_to_fs(self.url, **self.storage_options) if self.remote
                                  else (fsspec.filesystem("file"), os.path.abspath(self.url)))
        except (ImportError, ValueError) as e:
            proto = self.url.split("://", 1)[0]
            raise StoreError(
                f"cannot open {self.url!r}: fsspec has no usable filesystem for {proto!r} ({e}): "
                "install its fsspec package (s3fs, gcsfs, ...) or pass a local path"
            ) from None
        self.root = self.root.rstrip("/") or "/"
        protos = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        #: POSIX files underneath (a plain path or file://): writes get tmp + fsync + rename
        self.local = "file" in protos or "local" in protos

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def isfile(self, rel: str) -> bool:
        return self.fs.isfile(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def fsync(self, rel: str) -> None:
        """Make a finished data file durable before a ledger/manifest points at it (local only)."""
        if not self.local:
            return
        p = self.path(rel)
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:  # zarr does not write chunks that equal the fill value
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_tree(self, rel: str) -> None:
        if not self.local:
            return
        top = self.path(rel)
        for d, _, files in os.walk(top):
            for f in files:
                self.fsync(os.path.relpath(os.path.join(d, f), self.root))
            fsync_dir(Path(d))

    def zarr_store(self, read_only: bool):
        from zarr.storage import FsspecStore, LocalStore

        if not self.remote:  # zarr's own local store: no async wrapper around plain files
            return LocalStore(self.root, read_only=read_only)
        # from_url wraps synchronous filesystems (memory, local) in fsspec's async wrapper
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)

    def read_manifest(self) -> Manifest:
        """Like :func:`streamdata.format.read_manifest`, for any location (same messages)."""
        return self.read_manifest_bytes()[1]

    def read_manifest_bytes(self) -> tuple[bytes, Manifest]:
        """(the bytes of ``manifest.json``, the manifest they hold): the bytes identify the store
        that was opened (a reader compares them again to detect a replaced store)."""
        shown = self.url
        if not self.isfile(MANIFEST_NAME):
            raise manifest_missing(shown, self.exists(), self.exists(BUILD_DIR))
        where = f"{shown}/{MANIFEST_NAME}"
        try:
            data = self.read_bytes(MANIFEST_NAME)
        except OSError as e:
            raise StoreError(f"{where!r} cannot be read ({e}): check the location and its permissions") from None
        return data, parse_manifest(data, where)


# ---- reader -----------------------------------------------------------------------------------
_NO_CHUNK = (1 << 64) - 1  # sharding index entry of an inner chunk that is not stored (fill value)
_LE_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_DIRECT_CODECS = [{"name": "sharding_indexed", "configuration": {
    "codecs": [_LE_BYTES], "index_codecs": [_LE_BYTES, {"name": "crc32c"}], "index_location": "end"}}]
_DAMAGED = "the store is damaged, rebuild it"


def _one_line(e: BaseException) -> str:
    """``Type: message`` of an exception raised inside zarr/numcodecs, on one line (for our errors)."""
    return " ".join(f"{type(e).__name__}: {e}".split())


_SETTLE_S = 10.0  # seconds to let zarr's other reads of a failed call finish before cancelling them


def _settle_zarr_tasks() -> None:
    """Wait for (then cancel) the reads zarr still has in flight after one of them failed.

    zarr runs a read as many tasks on its own event loop (one per chunk, ``asyncio.gather``); when
    one fails (a lost chunk object, a decode error, a full disk while writing) the call raises at
    once and the others stay pending. Left so, they are destroyed at interpreter exit with dozens
    of lines of asyncio noise ("Task was destroyed but it is pending!", "coroutine ... was never
    awaited", tracebacks) after our one-line error. So: let them finish (local reads take
    milliseconds; a finishing task may start children, hence rounds), cancel what still runs after
    _SETTLE_S, and retrieve every outcome. Trap: the loop is zarr's one loop for the process, so a
    read of another store by another thread that is still running after _SETTLE_S is cancelled too
    (it fails); the caller is failing with a damaged store at that point anyway.
    """
    import asyncio

    from zarr.core import sync as zsync

    loop = zsync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return

    async def settle() -> None:
        me = asyncio.current_task()
        deadline = loop.time() + _SETTLE_S
        seen: set = set()
        while True:
            pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            seen.update(pending)
            left = deadline - loop.time()
            if not pending:
                break
            if left <= 0:
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=1.0)
                break
            await asyncio.wait(pending, timeout=left)
        for t in seen:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: no "exception was never retrieved" at exit

    try:
        asyncio.run_coroutine_threadsafe(settle(), loop).result(timeout=_SETTLE_S + 5)
    except Exception:  # noqa: BLE001 - best effort: the one-line error that follows is what matters
        pass


def _direct_eligible(arr) -> bool:
    """True when ``arr`` uses exactly the uncompressed codec chain the direct reader understands."""
    codecs = _norm(arr.metadata.to_dict().get("codecs"))
    if not isinstance(codecs, list) or len(codecs) != 1:
        return False
    cfg = dict(codecs[0].get("configuration", {}))
    cfg.pop("chunk_shape", None)
    return [{"name": codecs[0].get("name"), "configuration": cfg}] == _DIRECT_CODECS


def _strict_store(inner, where: str):
    """Wrap a zarr store so that a missing ``tokens`` shard/chunk object is an error.

    zarr reads a missing chunk object as the fill value (0): a deleted shard would read as token
    id 0 with no error. Our writer stores every token chunk (``write_empty_chunks``), so every
    chunk key of ``tokens`` must exist; this wrapper turns the ``None`` zarr would fill into a
    StoreError at the read that needs it (also when the object goes away after open). The document
    index arrays are not wrapped: an all-zero index chunk (unknown byte counts of an import) is
    legitimately absent, and a lost one fails the open-time index check or verify's checksums.
    """
    from zarr.storage import WrapperStore

    class _Strict(WrapperStore):
        async def get(self, key, prototype, byte_range=None):
            got = await self._store.get(key, prototype, byte_range)
            if got is None and key.startswith("tokens/") and key != "tokens/zarr.json":
                raise StoreError(f"zarr store {where!r} has lost the chunk object {key!r}: {_DAMAGED}")
            return got

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            got = await self._store.get_partial_values(prototype, key_ranges)
            for (key, _), value in zip(key_ranges, got):
                if value is None and key.startswith("tokens/") and key != "tokens/zarr.json":
                    raise StoreError(f"zarr store {where!r} has lost the chunk object {key!r}: {_DAMAGED}")
            return got

    return _Strict(inner)


class _MappedShard:
    """One shard file of ``tokens``, mapped, with a zero-copy view and file offset per inner chunk."""

    __slots__ = ("file", "views", "offsets")

    def __init__(self, file: MappedFile, views: list[np.ndarray], offsets: list[int]):
        self.file, self.views, self.offsets = file, views, offsets

    def close(self) -> None:
        self.views = []  # drop the exported buffers before unmapping
        self.file.close()


class _DirectShards:
    """Uncompressed local shard files, memory-mapped and sliced without zarr (layout: module docstring).

    Every shard file is opened, mapped and its index checked (crc32c, one stored inner chunk per
    slot) at open, like the npy backend's shards: a store replaced on disk afterwards keeps being
    read as it was opened. A missing shard file or inner chunk is an error (our writer stores all).
    """

    def __init__(self, root: Path, arr, dtype: np.dtype, num_tokens: int):
        self.root, self.arr, self.dtype = root, arr, dtype
        self.chunk = int(arr.chunks[0])
        self.per_shard = int(arr.shards[0]) // self.chunk
        self.cbytes = self.chunk * dtype.itemsize
        self._shards: list[_MappedShard] = []
        try:
            for k in range(-(-num_tokens // (self.chunk * self.per_shard))):
                # chunks wholly past the array's end are never stored
                used = min(self.per_shard, -(-(num_tokens - k * self.chunk * self.per_shard) // self.chunk))
                self._shards.append(self._map(k, used))
            tail = num_tokens % self.chunk
            if tail and self._shards[-1].views[-1][tail:].any():
                # the last chunk is padded to full size with the fill value; no token reads these
                # bytes, so damage there would pass every checksum: refuse it here
                raise StoreError(f"zarr store {str(root)!r}: the padding after token {num_tokens} of the last "
                                 f"chunk is not the fill value: {_DAMAGED}")
        except BaseException:
            self.close()
            raise

    def _map(self, k: int, used: int) -> _MappedShard:
        import google_crc32c  # zarr's own crc32c dependency (its crc32c codec), declared by streamdata too

        rel = f"tokens/{self.arr.metadata.encode_chunk_key((k,))}"
        path = resolve_inside(self.root, rel, "zarr shard")
        f = MappedFile(path, "zarr shard")
        try:
            ib = self.per_shard * 16 + 4  # index: (offset, nbytes) uint64 LE per inner chunk + crc32c
            bad = f"zarr shard {str(path)!r} has a damaged index: {_DAMAGED}"
            if f.size < ib:
                raise StoreError(bad)
            raw = f.read(f.size - ib, f.size - 4)  # a copy: no buffer export to release later
            if google_crc32c.value(raw) != int.from_bytes(f.read(f.size - 4, f.size), "little"):
                raise StoreError(bad + " (crc32c mismatch)")
            views, offsets = [], []
            for c, (off, nb) in enumerate(np.frombuffer(raw, "<u8").reshape(-1, 2).tolist()):
                if c >= used:
                    if off != _NO_CHUNK:
                        raise StoreError(bad)
                    continue
                if off == _NO_CHUNK:
                    raise StoreError(f"zarr shard {str(path)!r} has lost inner chunk {c}: {_DAMAGED}")
                if nb != self.cbytes or off + nb > f.size - ib:
                    raise StoreError(bad)
                views.append(f.array(self.dtype, self.chunk, off))
                offsets.append(off)
            # chunks tile the file before the index exactly: no byte is outside a chunk or the index
            if sorted(offsets) != list(range(0, used * self.cbytes, self.cbytes)) or f.size != used * self.cbytes + ib:
                raise StoreError(bad + " (chunks do not tile the file)")
            return _MappedShard(f, views, offsets)
        except BaseException:
            f.close()
            raise

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        C, P = self.chunk, self.per_shard
        pos = start
        while pos < stop:
            c = pos // C
            base = c * C
            hi = min(stop, base + C)
            out[pos - start : hi - start] = self._shards[c // P].views[c % P][pos - base : hi - base]
            pos = hi

    def drop(self, start: int, stop: int) -> None:
        """Drop the resident pages of ids [start, stop) (:meth:`MappedFile.drop`), chunk by chunk."""
        C, P, isz = self.chunk, self.per_shard, self.dtype.itemsize
        for c in range(start // C, -(-stop // C)):
            sh = self._shards[c // P]
            off = sh.offsets[c % P]
            lo, hi = max(start, c * C) - c * C, min(stop, (c + 1) * C) - c * C
            sh.file.drop(off + lo * isz, off + hi * isz)

    def close(self) -> None:
        for sh in self._shards:
            sh.close()
        self._shards = []


def _open_array(group, name: str, where: str):
    import zarr

    try:
        arr = group[name]
    except KeyError:
        raise StoreError(f"zarr store {where!r} has no {name!r} array: {_DAMAGED}") from None
    except Exception as e:  # garbage metadata: zarr raises JSON, value and type errors of its own
        raise StoreError(f"zarr array {name!r} in {where!r} has unreadable metadata ({_one_line(e)}): {_DAMAGED}") from None
    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{where!r}: {name!r} is a zarr group, not an array: {_DAMAGED}")
    return arr


def _check_array(arr, name: str, where: str, dtype: np.dtype, length: int) -> None:
    if arr.ndim != 1:
        raise StoreError(
            f"zarr array {name!r} in {where!r} has {arr.ndim} dimensions (shape {tuple(arr.shape)}), expected 1-D: "
            "it is not a streamdata store; rebuild it with 'streamdata convert SRC DST --format zarr'"
        )
    got = np.dtype(arr.dtype)
    if got.kind != dtype.kind or got.itemsize != dtype.itemsize or got.byteorder not in ("=", "<", "|"):
        raise StoreError(
            f"zarr array {name!r} in {where!r} has dtype {got.str} but the manifest needs {dtype.str}: "
            "the store is damaged or not ours; rebuild it with 'streamdata convert SRC DST --format zarr'"
        )
    if arr.shape[0] != length:
        raise StoreError(
            f"zarr array {name!r} in {where!r} has {arr.shape[0]} entries but the manifest needs {length}: "
            "the store is damaged (interrupted write?), rebuild it"
        )


class ZarrTokenStore(TokenStore):
    """Read-only zarr v3 store (layout: module docstring), local or remote.

    ``direct``: None (default) memory-maps local uncompressed shards when the codec chain is exactly
    ours, else uses the block cache; False forces the block cache; True requires direct reads.
    ``block_tokens``: size of a cached block (rounded up to whole inner chunks, >= 1 chunk). Reads
    shorter than a block go through the cache of the last two blocks; longer ones go straight to
    zarr. Locks guard the cache, so a reader thread and the main thread may share a store.
    :attr:`read_path` says which path is in use ("direct" or "block-cache").
    ``index_in_ram``: index arrays up to this many entries are read into RAM, longer ones into a
    temporary memory map, block by block (see :func:`streamdata.backends.base.int64_index`).

    Consistency: the direct path maps every shard file at open (a snapshot). zarr's own path reads
    objects lazily, so it checks that ``manifest.json`` still holds the bytes it opened after every
    read from zarr: a store replaced (or deleted) while it is read fails with one line instead of
    serving a mix of two stores (our writers replace the manifest before or with the data).
    A missing token chunk is an error on both paths, never the fill value.
    """

    def __init__(self, where: str | os.PathLike, manifest: Manifest | None = None, *,
                 storage_options: dict | None = None, block_tokens: int | None = None,
                 direct: bool | None = None, index_in_ram: int = INDEX_IN_RAM):
        self._index_in_ram = check_index_in_ram(index_in_ram)
        self._loc = _Location(where, storage_options)
        self.path = self._loc.url
        self._stamp, self.manifest = self._loc.read_manifest_bytes()
        if manifest is not None and manifest.to_json() != self.manifest.to_json():
            raise StoreError(f"store {self.path!r} changed while it was being opened: open it again")
        if self.manifest.format != "zarr":
            raise StoreError(f"store {self.path!r} has format {self.manifest.format!r}, not 'zarr': open it with streamdata.open_store")
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._direct: _DirectShards | None = None
        self._zstore = None
        try:
            self._check_names()
            self._zstore = _strict_store(self._loc.zarr_store(read_only=True), self.path)
            self._open(block_tokens, direct)
            self._check_unchanged()
        except BaseException:
            self.close()
            raise

    def _check_names(self) -> None:
        """The manifest must name exactly our arrays, and (locally) they must lie inside the root."""
        m = self.manifest
        names = [s.file for s in m.shards] + [x.file for x in m.index]
        if [s.file for s in m.shards] != ["tokens"] or any(x.file != x.name for x in m.index) \
                or not {x.name for x in m.index} <= {"doc_offsets", "doc_bytes", "doc_words", *SOURCE_ARRAYS}:
            raise StoreError(f"zarr store {self.path!r}: manifest names {names}, expected the arrays tokens, doc_offsets, "
                             f"doc_bytes, doc_words (and {', '.join(SOURCE_ARRAYS)}): {_DAMAGED}")
        if not self._loc.remote:
            for rel in ("tokens", "doc_offsets", "doc_bytes", "doc_words", *(SOURCE_ARRAYS if m.source_files is not None else ())):
                resolve_inside(self._loc.root, rel, "zarr array")

    def _check_unchanged(self) -> None:
        """Fail if ``manifest.json`` no longer holds the bytes this store opened (see class docstring)."""
        try:
            now = self._loc.read_bytes(MANIFEST_NAME)
        except (OSError, FileNotFoundError):
            now = None
        if now != self._stamp:
            raise StoreError(f"store {self.path!r} was replaced or removed while it was read: "
                             "its results would mix two stores; open it again (do not rewrite a store in use)")

    def _zarr(self, fn, what: str):
        """Run a zarr read; its own exceptions (decode errors, damaged shard index) become one line."""
        try:
            return fn()
        except StoreError:
            _settle_zarr_tasks()
            raise
        except Exception as e:  # zarr/numcodecs raise many types for damaged objects
            _settle_zarr_tasks()
            raise StoreError(f"zarr store {self.path!r}: cannot read {what} ({_one_line(e)}): {_DAMAGED}") from None

    def _load_index(self, a, name: str, length: int) -> np.ndarray:
        """The int64 index array ``name``, read once so document lookups never go back to the
        (possibly remote, compressed) store: in RAM when small, else a memory map (int64_index)."""
        def fill(out: np.ndarray, lo: int, hi: int) -> None:
            out[:] = self._zarr(lambda: np.asarray(a[lo:hi], dtype=np.int64), f"the {name} array")

        return int64_index(length, fill, self._index_in_ram)

    def _open(self, block_tokens: int | None, direct: bool | None) -> None:
        import zarr

        m = self.manifest
        dtype = numpy_dtype(m.dtype)
        try:
            group = zarr.open_group(self._zstore, mode="r")
        except Exception as e:  # zarr raises several types (GroupNotFoundError, FileNotFoundError, JSON errors)
            raise StoreError(f"{self.path!r} has a manifest but no readable zarr group ({_one_line(e)}): {_DAMAGED}") from None
        self._tokens = _open_array(group, "tokens", self.path)
        _check_array(self._tokens, "tokens", self.path, dtype, m.num_tokens)
        n = m.num_documents
        idx = {}
        sources = SOURCE_ARRAYS if m.source_files is not None else ()
        for name, length in (("doc_offsets", n + 1), ("doc_bytes", n), ("doc_words", n), *((k, n) for k in sources)):
            a = _open_array(group, name, self.path)
            _check_array(a, name, self.path, np.dtype(np.int64), length)
            # Read the index once, so document lookups never go back to the (possibly remote,
            # compressed) store: into RAM when small, else block by block into a memory map.
            idx[name] = self._load_index(a, name, length)
        self._offsets, self._bytes, self._words = idx["doc_offsets"], idx["doc_bytes"], idx["doc_words"]
        for a in idx.values():
            a.flags.writeable = False
        if sources:
            self._sources = DocSources(list(m.source_files), *(idx[k] for k in SOURCE_ARRAYS))
        check_document_index(self.path, m, self._offsets, self._bytes, self._words, self._sources)
        # inner chunk (with sharding, Array.chunks is the inner chunk shape)
        self.chunk_tokens = int(self._tokens.chunks[0])
        want = DEFAULT_BLOCK_TOKENS if block_tokens is None else int(block_tokens)
        if want < 1:
            raise ConfigError(f"block_tokens={want} must be >= 1")
        #: tokens per cached block: whole inner chunks, so a block read never decodes a chunk twice
        self.block_tokens = -(-want // self.chunk_tokens) * self.chunk_tokens
        eligible = not self._loc.remote and _direct_eligible(self._tokens)
        if direct and not eligible:
            raise ConfigError(f"direct=True needs a local, uncompressed store with streamdata's codec chain; {self.path!r} "
                              "is not: pass direct=None")
        if eligible if direct is None else direct:
            self._direct = _DirectShards(Path(self._loc.root), self._tokens, dtype, m.num_tokens)
        self.read_path = "direct" if self._direct is not None else "block-cache"

    # ---- index -------------------------------------------------------------------------------
    @property
    def zarr_array(self):
        """The underlying ``tokens`` zarr array (for tools and benchmarks; reads bypass the cache)."""
        return self._tokens

    # ---- tokens ------------------------------------------------------------------------------
    def _block(self, b: int) -> np.ndarray:
        with self._lock:
            blk = self._cache.get(b)
            if blk is not None:
                self._cache.move_to_end(b)
                return blk
            lo = b * self.block_tokens
            hi = min(len(self), lo + self.block_tokens)
            # One zarr call decodes whole inner chunks; held under the lock so two threads asking
            # for the same block decode it once.
            blk = self._zarr(lambda: np.asarray(self._tokens[lo:hi]), f"tokens [{lo}, {hi})")
            self._check_unchanged()
            self._cache[b] = blk
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
            return blk

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        start, stop = self._check_range(start, stop)
        n = stop - start
        if n == 0:
            return
        if self._direct is not None:
            self._direct.read_into(start, stop, out)
            return
        B = self.block_tokens
        if n >= B:
            self._zarr(lambda: self._read_large(start, stop, out[:n]), f"tokens [{start}, {stop})")
            self._check_unchanged()
            return
        pos = start
        while pos < stop:
            b = pos // B
            base = b * B
            hi = min(stop, base + B)
            blk = self._block(b)  # a reference: stays valid even if another thread evicts it
            out[pos - start : hi - start] = blk[pos - base : hi - base]
            pos = hi

    def _read_large(self, start: int, stop: int, out: np.ndarray) -> None:
        """Large reads: decode straight into ``out`` when it is a contiguous array of our dtype."""
        if out.flags.c_contiguous and out.dtype == self.dtype and type(out) is np.ndarray:
            from zarr.core.buffer import default_buffer_prototype

            nd = default_buffer_prototype().nd_buffer.from_numpy_array(out)
            self._tokens.get_basic_selection(slice(start, stop), out=nd)
        else:
            out[:] = self._tokens[start:stop]

    def release(self, start: int, stop: int) -> None:
        """Block cache: drop cached blocks that lie wholly inside ``[start, stop)``
        (``release(0, len(store))`` drops all); a block still partly ahead of a sequential reader is
        kept, as dropping it would cost a full block decode for the next window. Direct: drop the
        pages of the mapped shard files, as the npy backend does."""
        start, stop = self._check_range(start, stop)
        if self._direct is not None:
            self._direct.drop(start, stop)
            return
        B = self.block_tokens
        with self._lock:
            for b in list(self._cache):
                lo, hi = b * B, min(len(self), (b + 1) * B)
                if start <= lo and hi <= stop:
                    del self._cache[b]

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
        if self._direct is not None:
            self._direct.close()
        zs = getattr(self, "_zstore", None)
        if zs is not None and hasattr(zs, "close"):
            zs.close()


def open_zarr_store(where: str | os.PathLike, *, storage_options: dict | None = None,
                    block_tokens: int | None = None) -> ZarrTokenStore:
    """Open a zarr store read-only from a local folder or any fsspec URL zarr accepts."""
    return ZarrTokenStore(where, storage_options=storage_options, block_tokens=block_tokens)


# ---- writer (folder rules, ledger, lock and swap: streamdata.output) ------------------------------
def _source_identity(m: Manifest) -> dict[str, Any]:
    """What makes a source's tokens and index what they are (content, not path: a moved source resumes)."""
    return {
        "format": m.format, "dtype": m.dtype, "tokens": m.num_tokens, "documents": m.num_documents,
        "shards": [[s.file, s.tokens, s.documents, s.sha256] for s in m.shards],
    }


def _write_tokens_block(arr, start: int, data: np.ndarray) -> None:
    """Write one whole zarr shard (a seam for tests that simulate a crash mid-pack)."""
    try:
        arr[start : start + len(data)] = data
    except Exception:
        _settle_zarr_tasks()  # e.g. a full disk: zarr's other writes of this shard are in flight
        raise


def _check_layout(compression: str, chunk_tokens: int, chunks_per_shard: int) -> None:
    check_compression(compression)
    if chunk_tokens < 1 or chunks_per_shard < 1:
        raise ConfigError(f"chunk_tokens={chunk_tokens} and chunks_per_shard={chunks_per_shard} must be >= 1: "
                          f"use the defaults ({DEFAULT_CHUNK_TOKENS}, {DEFAULT_CHUNKS_PER_SHARD})")


def _out_extra(m: Manifest, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The packed store's ``extra``: ``extra`` if given, else the source's without its build records."""
    return {k: v for k, v in m.extra.items() if k not in ("build_settings", "zarr")} if extra is None else dict(extra)


def _pack_settings(m: Manifest, compression: str, chunk_tokens: int, shard_tokens: int,
                   out_extra: dict[str, Any]) -> dict[str, Any]:
    """Identity of a pack: the source store's content and the zarr layout (decides every byte)."""
    return {
        "source_store": _source_identity(m),
        "compression": compression, "chunk_tokens": chunk_tokens, "shard_tokens": shard_tokens,
        "zarr_format": 3, "format_version": FORMAT_VERSION,
        # the manifest carries extra itself; a digest keeps this record short
        "extra_sha256": hashlib.sha256(json.dumps(out_extra, sort_keys=True, default=str).encode()).hexdigest(),
    }


def write_zarr_store(
    src: TokenStore,
    dst: str | os.PathLike,
    *,
    compression: str = "none",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunks_per_shard: int = DEFAULT_CHUNKS_PER_SHARD,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    storage_options: dict | None = None,
) -> Manifest:
    """Pack an open TokenStore into a zarr store at ``dst`` (a local folder or an fsspec URL).
    (A path or URL as the source: :func:`streamdata.convert_store`, which opens it.)

    Reads ``src`` sequentially one zarr shard at a time (memory: one shard of ids, 32 MiB with the
    defaults, plus the per-document index), resumably (see module docstring), manifest last.
    The manifest carries ``src``'s tokenizer, special tokens, source and created_by; its ``extra``
    is ``src``'s (without build records) unless ``extra`` is given, which replaces it.
    A finished store at ``dst`` made with the same settings is returned as is; another one is
    replaced only with ``overwrite=True``, by a swap once the new one is sealed (local outputs; a
    finished remote store is never replaced). Folder rules: :mod:`streamdata.output`.
    """
    _check_layout(compression, chunk_tokens, chunks_per_shard)
    if not isinstance(src, TokenStore):  # backends never call the dispatcher (no import circle)
        raise ConfigError(f"write_zarr_store takes an open TokenStore, not {type(src).__name__}: open it with "
                          "streamdata.open_store, or use streamdata.convert_store(path, dst, format='zarr')")
    m = src.manifest
    out_extra = _norm(_out_extra(m, extra))
    settings = _pack_settings(m, compression, chunk_tokens, chunk_tokens * chunks_per_shard, out_extra)
    with full_disk_is_one_line(dst):
        out = prepare_output(dst, settings, overwrite=overwrite, storage_options=storage_options)
        if out.finished is not None:
            return out.finished
        try:
            return pack_into_output(src, out, compression=compression, chunk_tokens=chunk_tokens,
                                    chunks_per_shard=chunks_per_shard, extra=out_extra, storage_options=storage_options)
        except BaseException:
            out.abort()
            raise


def pack_into_output(
    store: TokenStore,
    out: Output,
    *,
    compression: str = "none",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunks_per_shard: int = DEFAULT_CHUNKS_PER_SHARD,
    extra: dict[str, Any] | None = None,
    storage_options: dict | None = None,
) -> Manifest:
    """Pack ``store`` into the prepared output ``out`` (resuming at its ledger's ``packed_tokens``)
    and seal it. Used by :func:`write_zarr_store` and ``tokenize --format zarr`` (which packs its
    npy staging store); on an error the caller aborts ``out``."""
    import zarr

    _check_layout(compression, chunk_tokens, chunks_per_shard)
    m = store.manifest
    dtype = numpy_dtype(m.dtype)
    N, n = len(store), store.num_documents
    shard_tokens = chunk_tokens * chunks_per_shard
    out_extra = _norm(_out_extra(m, extra))
    ledger = out.ledger
    pack = _norm(_pack_settings(m, compression, chunk_tokens, shard_tokens, out_extra))
    if ledger.pack_settings != pack:  # a first pack, or the staging store was rebuilt: from the start
        ledger.pack_settings, ledger.packed_tokens = pack, 0
        out.commit_ledger()
    done = ledger.packed_tokens
    loc = _Location(out.root, storage_options)
    zstore = loc.zarr_store(read_only=False)
    # mode "a": create the group if absent, never delete what is there (_build holds the ledger)
    group = zarr.open_group(zstore, mode="a", attributes={
        "streamdata": {"format": "zarr", "format_version": FORMAT_VERSION, "manifest": MANIFEST_NAME}})
    tokens = None
    if done:
        try:
            tokens = group["tokens"]
            ok = (tokens.shape == (N,) and np.dtype(tokens.dtype) == dtype
                  and tokens.chunks == (chunk_tokens,) and tokens.shards == (shard_tokens,))
        except KeyError:
            ok = False
        if not ok:
            tokens, done = None, 0  # ledger outlived its array (removed by hand): redo cleanly
            ledger.packed_tokens = 0
            out.commit_ledger()
    if tokens is None:
        tokens = group.create_array(
            "tokens", shape=(N,), dtype=dtype, chunks=(chunk_tokens,), shards=(shard_tokens,),
            compressors=_compressors(compression), fill_value=0, overwrite=True,
            dimension_names=("token",),
            # store every chunk, also all-zero ones: readers treat a missing token chunk as damage
            # (zarr would read it as the fill value), see _strict_store and _DirectShards
            config={"write_empty_chunks": True},
        )

    # -- tokens, one whole zarr shard per step; the ledger counts a shard once it is durable
    h = hashlib.sha256()
    buf = np.empty(min(shard_tokens, max(N, 1)), dtype=dtype)
    for pos in range(0, done, shard_tokens):  # rehash the finished prefix from the source
        k = min(shard_tokens, done - pos)
        store.read_into(pos, pos + k, buf[:k])
        h.update(memoryview(buf[:k]).cast("B"))
        store.release(pos, pos + k)
    for pos in range(done, N, shard_tokens):
        k = min(shard_tokens, N - pos)
        block = buf[:k]
        store.read_into(pos, pos + k, block)
        h.update(memoryview(block).cast("B"))  # dtype is little-endian: these are the LE bytes
        _write_tokens_block(tokens, pos, block)
        loc.fsync(f"tokens/{tokens.metadata.encode_chunk_key((pos // shard_tokens,))}")
        ledger.packed_tokens = pos + k
        out.commit_ledger()
        store.release(pos, pos + k)

    # -- document index (cheap: rewritten whole on every run)
    sums, index = _write_index(group, store, compression)
    loc.fsync_tree("tokens")
    for x in index:
        loc.fsync_tree(x.name)
    loc.fsync("zarr.json")

    manifest = Manifest(
        dtype=m.dtype,
        tokenizer=dict(m.tokenizer),
        special_tokens=dict(m.special_tokens),
        source=dict(m.source),
        shards=[ShardInfo("tokens", N, n, h.hexdigest())],
        totals={"tokens": N, "documents": n, "bytes": sums[0], "words": sums[1]},
        format="zarr",
        index=index,
        word_rule=word_rule_of(m),  # the counts are copied, and so is the rule that counted them
        source_files=None if store.doc_sources is None else list(store.doc_sources.files),
        created_by=dict(m.created_by),
        extra={**out_extra,
               "zarr": {"chunk_tokens": chunk_tokens, "shard_tokens": shard_tokens, "compression": compression,
                        "zarr_version": zarr.__version__}},
    )
    return out.seal(manifest)


def _write_index(group, store: TokenStore, compression: str) -> tuple[tuple[int, int], list[IndexInfo]]:
    """Write doc_offsets/doc_bytes/doc_words (and the source arrays, when ``store`` has them) in
    1Mi-entry blocks.

    Returns ((sum bytes, sum words), one IndexInfo per array). The checksum is of the values as
    little-endian int64 (:func:`streamdata.format.index_sha256`), hashed block by block as written,
    so it equals what a reader recomputes from the array without a second pass here.
    """
    n = store.num_documents
    sums, index = [], []
    src_arrays = () if store.doc_sources is None else (("doc_source_file", store.doc_sources.file, n),
                                                       ("doc_source_row", store.doc_sources.row, n))
    for name, src, length in (("doc_offsets", store.doc_offsets, n + 1), ("doc_bytes", store.doc_bytes, n),
                              ("doc_words", store.doc_words, n), *src_arrays):
        arr = group.create_array(name, shape=(length,), dtype=np.int64, chunks=(min(_INDEX_CHUNK, max(1, length)),),
                                 compressors=_compressors(compression), fill_value=0, overwrite=True,
                                 dimension_names=("document",))
        total, h = 0, hashlib.sha256()
        for lo in range(0, length, _INDEX_CHUNK):
            hi = min(length, lo + _INDEX_CHUNK)
            if src is None:  # unknown counts (imports): the array stays all fill value (0), nothing stored
                block = np.zeros(hi - lo, dtype="<i8")
            else:
                block = np.ascontiguousarray(src[lo:hi], dtype="<i8")
                arr[lo:hi] = block
                total += int(block.sum())
            h.update(block.tobytes())
        sums.append(total)
        index.append(IndexInfo(name, name, length, h.hexdigest()))
    return (sums[1], sums[2]), index
