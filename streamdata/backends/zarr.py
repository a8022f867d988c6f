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
  more go straight to zarr into the caller's buffer. zarr decodes at most ~0.5-1.1G tok/s here,
  which bounds this path.
- **direct** (local, uncompressed, exactly the codec chain we write): shard files are memory-mapped
  and sliced like npy shards, using the sharding codec's published binary layout (zarr v3 sharding
  spec): the shard ends with an index of ``chunks_per_shard`` pairs (offset, nbytes) as little-endian
  uint64, followed by its crc32c (4 bytes LE); (2^64-1, 2^64-1) marks an inner chunk that was not
  stored because it equals the fill value (all-zero ids), which reads as zeros; a stored inner chunk
  is always ``chunk_tokens`` ids (also the array's partial last one). The index crc is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
    ShardInfo,
    atomic_write_bytes,
    fsync_dir,
    numpy_dtype,
)
from ..store import TokenStore

__all__ = [
    "COMPRESSIONS",
    "DEFAULT_BLOCK_TOKENS",
    "DEFAULT_CHUNK_TOKENS",
    "DEFAULT_CHUNKS_PER_SHARD",
    "STAGING_DIR",
    "ZarrTokenStore",
    "check_compression",
    "is_url",
    "open_url_store",
    "open_zarr_store",
    "pack_build_as_zarr",
    "prepare_zarr_build",
    "write_zarr_store",
]

COMPRESSIONS = ("none", "zstd", "blosc")
DEFAULT_CHUNK_TOKENS = 1 << 20  # inner chunk: 2 MiB uint16; the smallest unit a reader decodes
DEFAULT_CHUNKS_PER_SHARD = 16  # shard object: 16Mi ids (32 MiB uint16), one PUT on object stores
DEFAULT_BLOCK_TOKENS = 1 << 22  # reader cache block: 4Mi ids (see benchmarks/bench_zarr.py)
_INDEX_CHUNK = 1 << 20  # entries per chunk of the document index arrays (8 MiB int64)
_LEDGER = f"{BUILD_DIR}/zarr-pack.json"
STAGING_DIR = f"{BUILD_DIR}/npy-staging"
_ARRAYS = ("tokens", "doc_offsets", "doc_bytes", "doc_words")


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
        self.storage_options = dict(storage_options or {})
        self.url = os.fspath(where)
        if is_url(self.url):
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            except (ImportError, ValueError) as e:
                proto = self.url.split("://", 1)[0]
                raise StoreError(
                    f"cannot open {self.url!r}: fsspec has no usable filesystem for {proto!r} ({e}): "
                    "install its fsspec package (s3fs, gcsfs, ...) or pass a local path"
                ) from None
            self.root = self.root.rstrip("/") or "/"
            protos = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
            self.local = "file" in protos or "local" in protos
            self.remote = True
        else:
            self.fs = None
            self.root = str(Path(self.url))
            self.local = True
            self.remote = False

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str = "") -> bool:
        if self.fs is None:
            return os.path.exists(self.path(rel))
        return self.fs.exists(self.path(rel))

    def isfile(self, rel: str) -> bool:
        if self.fs is None:
            return os.path.isfile(self.path(rel))
        return self.fs.isfile(self.path(rel))

    def is_nonempty_dir(self) -> bool:
        if self.fs is None:
            return os.path.isdir(self.root) and any(os.scandir(self.root))
        try:
            return bool(self.fs.isdir(self.root) and self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return False

    def read_bytes(self, rel: str) -> bytes:
        if self.fs is None:
            with open(self.path(rel), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(rel))

    def write_atomic(self, rel: str, data: bytes) -> None:
        if self.local:
            p = Path(self.path(rel))
            p.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(p, data)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def remove(self, rel: str) -> None:
        if self.fs is None:
            p = Path(self.path(rel))
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        elif self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    def remove_store(self) -> None:
        """Delete a store or build of ours: the manifest first, so a half-deleted store never looks whole."""
        if self.isfile(MANIFEST_NAME):
            self.remove(MANIFEST_NAME)
            if self.fs is None:
                fsync_dir(Path(self.root))
        if self.exists():
            if self.fs is None:
                shutil.rmtree(self.root)
            else:
                self.fs.rm(self.root, recursive=True)

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

        if self.fs is None:
            return LocalStore(self.root, read_only=read_only)
        # from_url wraps synchronous filesystems (memory, local) in fsspec's async wrapper
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)

    def read_manifest(self) -> Manifest:
        """Like :func:`streamdata.format.read_manifest`, for any location (same messages)."""
        shown = self.url
        if not self.exists():
            raise StoreError(f"store {shown!r} does not exist: check the path or build it with 'streamdata tokenize'")
        if not self.isfile(MANIFEST_NAME):
            hint = (
                "an unfinished build is there: rerun the same command to resume it"
                if self.exists(BUILD_DIR)
                else "it is not a store: build one with 'streamdata tokenize' or 'streamdata convert'"
            )
            raise StoreError(f"{shown!r} has no {MANIFEST_NAME}: {hint}")
        try:
            d = json.loads(self.read_bytes(MANIFEST_NAME))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"{shown}/{MANIFEST_NAME} is not readable JSON ({e}): the store is damaged, rebuild it") from None
        if not isinstance(d, dict):
            raise StoreError(f"{shown}/{MANIFEST_NAME} is not a JSON object: the store is damaged, rebuild it")
        return Manifest.from_dict(d, where=f"{shown}/{MANIFEST_NAME}")


# ---- reader -----------------------------------------------------------------------------------
_NO_CHUNK = (1 << 64) - 1  # sharding index entry of an inner chunk that is not stored (fill value)
_LE_BYTES = {"name": "bytes", "configuration": {"endian": "little"}}
_DIRECT_CODECS = [{"name": "sharding_indexed", "configuration": {
    "codecs": [_LE_BYTES], "index_codecs": [_LE_BYTES, {"name": "crc32c"}], "index_location": "end"}}]


def _direct_eligible(arr) -> bool:
    """True when ``arr`` uses exactly the uncompressed codec chain the direct reader understands."""
    codecs = _norm(arr.metadata.to_dict().get("codecs"))
    if not isinstance(codecs, list) or len(codecs) != 1:
        return False
    cfg = dict(codecs[0].get("configuration", {}))
    cfg.pop("chunk_shape", None)
    return [{"name": codecs[0].get("name"), "configuration": cfg}] == _DIRECT_CODECS


class _MappedShard:
    __slots__ = ("fd", "mm", "views", "offsets")

    def __init__(self, fd, mm, views, offsets):
        self.fd, self.mm, self.views, self.offsets = fd, mm, views, offsets

    def close(self) -> None:
        self.views = [None] * len(self.views)  # drop the exported buffers before unmapping
        if self.mm is not None:
            try:
                self.mm.close()
            except BufferError:  # a view still alive elsewhere: unmapped when it goes (mmap dups the fd)
                pass
            self.mm = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _DirectShards:
    """Uncompressed local shard files, memory-mapped and sliced without zarr (layout: module docstring).

    Shard files are mapped lazily on first use and stay mapped until :meth:`close` (like the npy
    backend's shards); pieces are zero-copy views of the mappings, copied out by ``read_into``.
    """

    def __init__(self, root: Path, arr, dtype: np.dtype):
        self.root, self.arr, self.dtype = root, arr, dtype
        self.chunk = int(arr.chunks[0])
        self.per_shard = int(arr.shards[0]) // self.chunk
        self.cbytes = self.chunk * dtype.itemsize
        self._shards: dict[int, _MappedShard] = {}
        self._lock = threading.Lock()

    def _shard(self, k: int) -> _MappedShard:
        got = self._shards.get(k)  # dict reads are atomic under the GIL; inserts take the lock
        if got is None:
            with self._lock:
                got = self._shards.get(k)
                if got is None:
                    got = self._shards[k] = self._map(k)
        return got

    def _map(self, k: int) -> _MappedShard:
        import mmap

        import google_crc32c  # a zarr dependency (its crc32c codec)

        path = self.root / "tokens" / self.arr.metadata.encode_chunk_key((k,))
        none = [None] * self.per_shard
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # the whole shard equals the fill value: zarr stores nothing
            return _MappedShard(None, None, none, none)
        except OSError as e:
            raise StoreError(f"cannot open zarr shard {str(path)!r} ({e.strerror}): the store is damaged, rebuild it") from None
        shard = _MappedShard(fd, None, none, none)
        try:
            size = os.fstat(fd).st_size
            ib = self.per_shard * 16 + 4  # index: (offset, nbytes) uint64 LE per inner chunk + crc32c
            bad = f"zarr shard {str(path)!r} has a damaged index: the store is damaged, rebuild it"
            if size < ib:
                raise StoreError(bad)
            shard.mm = mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            raw = mm[size - ib : size - 4]  # bytes (a copy): no buffer export to release later
            if google_crc32c.value(raw) != int.from_bytes(mm[size - 4 : size], "little"):
                raise StoreError(bad + " (crc32c mismatch)")
            views, offsets = [], []
            for off, nb in np.frombuffer(raw, "<u8").reshape(-1, 2).tolist():
                if off == _NO_CHUNK:
                    views.append(None)
                    offsets.append(None)
                elif nb != self.cbytes or off + nb > size - ib:
                    raise StoreError(bad)
                else:
                    views.append(np.frombuffer(mm, self.dtype, self.chunk, off))
                    offsets.append(off)
            shard.views, shard.offsets = views, offsets
            return shard
        except BaseException:
            shard.close()
            raise

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        C, P = self.chunk, self.per_shard
        pos = start
        while pos < stop:
            c = pos // C
            base = c * C
            hi = min(stop, base + C)
            piece = self._shard(c // P).views[c % P]
            if piece is None:  # inner chunk not stored: all fill value
                out[pos - start : hi - start] = 0
            else:
                out[pos - start : hi - start] = piece[pos - base : hi - base]
            pos = hi

    def drop(self, start: int, stop: int) -> None:
        """madvise/fadvise DONTNEED on whole pages of ids [start, stop) (why both: backends/npy.py)."""
        import mmap

        C, P, isz, page = self.chunk, self.per_shard, self.dtype.itemsize, mmap.PAGESIZE
        for c in range(start // C, -(-stop // C)):
            sh = self._shards.get(c // P)
            off = None if sh is None or sh.mm is None else sh.offsets[c % P]
            if off is None:
                continue
            lo, hi = max(start, c * C) - c * C, min(stop, (c + 1) * C) - c * C
            b0 = -(-(off + lo * isz) // page) * page  # never drop a page still partly needed
            b1 = (off + hi * isz) // page * page
            if b1 > b0:
                sh.mm.madvise(mmap.MADV_DONTNEED, b0, b1 - b0)
                os.posix_fadvise(sh.fd, b0, b1 - b0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            for sh in self._shards.values():
                sh.close()
            self._shards.clear()


def _open_array(group, name: str, where: str):
    try:
        arr = group[name]
    except KeyError:
        raise StoreError(f"zarr store {where!r} has no {name!r} array: the store is damaged, rebuild it") from None
    import zarr

    if not isinstance(arr, zarr.Array):
        raise StoreError(f"{where!r}: {name!r} is a zarr group, not an array: the store is damaged, rebuild it")
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
    zarr. Locks guard the cache and the shard maps, so a reader thread and the main thread may share
    a store. :attr:`read_path` says which path is in use ("direct" or "block-cache").
    """

    def __init__(self, where: str | os.PathLike, manifest: Manifest | None = None, *,
                 storage_options: dict | None = None, block_tokens: int | None = None,
                 direct: bool | None = None):
        self._loc = _Location(where, storage_options)
        self.path = self._loc.url
        self.manifest = manifest if manifest is not None else self._loc.read_manifest()
        if self.manifest.format != "zarr":
            raise StoreError(f"store {self.path!r} has format {self.manifest.format!r}, not 'zarr': open it with streamdata.open_store")
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._direct: _DirectShards | None = None
        self._zstore = self._loc.zarr_store(read_only=True)
        try:
            self._open(block_tokens, direct)
        except BaseException:
            self.close()
            raise

    def _open(self, block_tokens: int | None, direct: bool | None) -> None:
        import zarr

        m = self.manifest
        dtype = numpy_dtype(m.dtype)
        try:
            group = zarr.open_group(self._zstore, mode="r")
        except Exception as e:  # zarr raises several types (GroupNotFoundError, FileNotFoundError, ...)
            raise StoreError(f"{self.path!r} has a manifest but no readable zarr group ({type(e).__name__}: {e}): "
                             "the store is damaged, rebuild it") from None
        self._tokens = _open_array(group, "tokens", self.path)
        _check_array(self._tokens, "tokens", self.path, dtype, m.num_tokens)
        n = m.num_documents
        idx = {}
        for name, length in (("doc_offsets", n + 1), ("doc_bytes", n), ("doc_words", n)):
            a = _open_array(group, name, self.path)
            _check_array(a, name, self.path, np.dtype(np.int64), length)
            # The index is small next to the tokens (8 bytes per document): load it once, so
            # document lookups never go back to the (possibly remote) store.
            idx[name] = np.ascontiguousarray(a[:], dtype=np.int64) if length else np.zeros(0, np.int64)
        self._offsets, self._bytes, self._words = idx["doc_offsets"], idx["doc_bytes"], idx["doc_words"]
        for a in (self._offsets, self._bytes, self._words):
            a.flags.writeable = False
        if self._offsets[0] != 0 or self._offsets[-1] != len(self) or (np.diff(self._offsets) < 0).any():
            raise StoreError(f"{self.path!r}: document index does not cover [0, {len(self)}) in order: the store is damaged, rebuild it")
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
            self._direct = _DirectShards(Path(self._loc.root), self._tokens, dtype)
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
            # One zarr call decodes whole inner chunks; held under the lock so two threads asking
            # for the same block decode it once.
            blk = np.asarray(self._tokens[lo : min(len(self), lo + self.block_tokens)])
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
            self._read_large(start, stop, out[:n])
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


def open_url_store(url: str, *, storage_options: dict | None = None) -> TokenStore:
    """Open a store given as an fsspec URL (``memory://``, ``file://``, ``s3://``, ``gs://``, ``https://``).

    zarr stores stream through fsspec; an npy store behind a ``file://`` URL opens as the local
    folder (memory-mapped); npy stores elsewhere are refused (they need a local file system).
    """
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


# ---- writer -----------------------------------------------------------------------------------
def _norm(obj: Any) -> Any:
    """JSON-normalised copy (what a ledger read back compares equal to)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _source_identity(m: Manifest) -> dict[str, Any]:
    """What makes a source's tokens and index what they are (content, not path: a moved source resumes)."""
    return {
        "format": m.format, "dtype": m.dtype, "tokens": m.num_tokens, "documents": m.num_documents,
        "shards": [[s.file, s.tokens, s.documents, s.sha256] for s in m.shards],
    }


def _write_tokens_block(arr, start: int, data: np.ndarray) -> None:
    """Write one whole zarr shard (a seam for tests that simulate a crash mid-pack)."""
    arr[start : start + len(data)] = data


def write_zarr_store(
    src: TokenStore | str | os.PathLike,
    dst: str | os.PathLike,
    *,
    compression: str = "none",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    chunks_per_shard: int = DEFAULT_CHUNKS_PER_SHARD,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    storage_options: dict | None = None,
) -> Manifest:
    """Pack any TokenStore into a zarr store at ``dst`` (a local folder or an fsspec URL).

    Reads ``src`` sequentially one zarr shard at a time (memory: one shard of ids, 32 MiB with the
    defaults, plus the per-document index), resumably (see module docstring), manifest last.
    The manifest carries ``src``'s tokenizer, special tokens, source and created_by; its ``extra``
    is ``src``'s (without build ledgers) unless ``extra`` is given, which replaces it.
    A finished store at ``dst`` made with the same settings is returned as is; another one is
    replaced only with ``overwrite=True``.
    """
    import zarr

    check_compression(compression)
    if chunk_tokens < 1 or chunks_per_shard < 1:
        raise ConfigError(f"chunk_tokens={chunk_tokens} and chunks_per_shard={chunks_per_shard} must be >= 1: "
                          f"use the defaults ({DEFAULT_CHUNK_TOKENS}, {DEFAULT_CHUNKS_PER_SHARD})")
    from ..store import open_store

    owned = not isinstance(src, TokenStore)
    store = open_store(src) if owned else src
    try:
        m = store.manifest
        dtype = numpy_dtype(m.dtype)
        N, n = len(store), store.num_documents
        shard_tokens = chunk_tokens * chunks_per_shard
        out_extra = (
            {k: v for k, v in m.extra.items() if k not in ("zarr_build",)} if extra is None else dict(extra)
        )
        settings = _norm({
            "source_store": _source_identity(m),
            "compression": compression, "chunk_tokens": chunk_tokens, "shard_tokens": shard_tokens,
            "zarr_format": 3, "format_version": FORMAT_VERSION,
            # the manifest carries extra itself; a digest keeps this record short
            "extra_sha256": hashlib.sha256(json.dumps(_norm(out_extra), sort_keys=True).encode()).hexdigest(),
        })
        loc = _Location(dst, storage_options)
        done_manifest = _prepare_output(loc, settings, overwrite)
        if done_manifest is not None:
            return done_manifest

        # -- ledger: settings first (marks the folder as a build of ours), then the arrays
        ledger = _read_ledger(loc)
        if ledger is not None and ledger.get("settings") != settings:
            raise ConfigError(
                f"output {loc.url!r} holds an unfinished zarr pack made with other settings: rerun the original "
                "command to resume it, or pass overwrite=True (--overwrite) to start over"
            )
        done = int(ledger.get("tokens_done", 0)) if ledger else 0
        if ledger is None:
            _write_ledger(loc, settings, 0)  # before the first zarr object: a crash leaves a build of ours
        zstore = loc.zarr_store(read_only=False)
        # mode "a": create the group if absent, never delete what is there (_build may hold staging)
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
                tokens, done = None, 0  # ledger outlived its array (should not happen): redo cleanly
        if tokens is None:
            if done:
                _write_ledger(loc, settings, 0)
            tokens = group.create_array(
                "tokens", shape=(N,), dtype=dtype, chunks=(chunk_tokens,), shards=(shard_tokens,),
                compressors=_compressors(compression), fill_value=0, overwrite=True,
                dimension_names=("token",),
            )

        # -- tokens, one whole zarr shard per step
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
            _write_ledger(loc, settings, pos + k)
            store.release(pos, pos + k)

        # -- document index (cheap: rewritten whole on every run)
        sums, index = _write_index(group, store, compression)
        loc.fsync_tree("tokens")
        for name in ("doc_offsets", "doc_bytes", "doc_words"):
            loc.fsync_tree(name)
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
            created_by=dict(m.created_by),
            extra={**out_extra,
                   "zarr": {"chunk_tokens": chunk_tokens, "shard_tokens": shard_tokens, "compression": compression,
                            "zarr_version": zarr.__version__},
                   "zarr_build": settings},
        )
    finally:
        if owned:
            store.close()
    loc.write_atomic(MANIFEST_NAME, manifest.to_json().encode())
    loc.remove(BUILD_DIR)
    return manifest


def _prepare_output(loc: _Location, settings: dict, overwrite: bool) -> Manifest | None:
    """Refuse to clobber what is not ours; return a finished identical store; clear for overwrite."""
    if not loc.remote and os.path.exists(loc.root) and not os.path.isdir(loc.root):
        raise ConfigError(f"output {loc.url!r} exists and is not a folder: choose another output")
    if loc.isfile(MANIFEST_NAME):
        if not overwrite:
            try:
                m = loc.read_manifest()
            except StoreError:
                m = None
            if m is not None and m.format == "zarr" and m.extra.get("zarr_build") == settings:
                loc.remove(BUILD_DIR)  # a crash between the manifest and the clean-up
                return m
            raise ConfigError(f"output {loc.url!r} already holds a finished store: pass overwrite=True (--overwrite) "
                              "to replace it, or choose another output")
        loc.remove_store()
    elif loc.is_nonempty_dir() and not loc.exists(BUILD_DIR):
        raise ConfigError(f"output {loc.url!r} exists, is not empty and is not a store: choose another output (it is never deleted)")
    elif overwrite and loc.exists(_LEDGER):
        # start the zarr pack over, but keep a staging store of ours (tokenize --format zarr)
        for name in _ARRAYS:
            loc.remove(name)
        loc.remove(_LEDGER)
    return None


def _read_ledger(loc: _Location) -> dict | None:
    if not loc.isfile(_LEDGER):
        return None
    try:
        d = json.loads(loc.read_bytes(_LEDGER))
    except (OSError, ValueError) as e:
        raise StoreError(f"zarr pack ledger {loc.path(_LEDGER)!r} is unreadable ({e}): pass overwrite=True to start over") from None
    return d if isinstance(d, dict) else None


def _write_ledger(loc: _Location, settings: dict, tokens_done: int) -> None:
    loc.write_atomic(_LEDGER, json.dumps({"settings": settings, "tokens_done": tokens_done}, sort_keys=True).encode())


def _write_index(group, store: TokenStore, compression: str) -> tuple[tuple[int, int], list[IndexInfo]]:
    """Write doc_offsets/doc_bytes/doc_words in 1Mi-entry blocks.

    Returns ((sum bytes, sum words), one IndexInfo per array). The checksum is of the values as
    little-endian int64 (:func:`streamdata.format.index_sha256`), hashed block by block as written,
    so it equals what a reader recomputes from the array without a second pass here.
    """
    n = store.num_documents
    sums, index = [], []
    for name, src, length in (("doc_offsets", store.doc_offsets, n + 1), ("doc_bytes", store.doc_bytes, n),
                              ("doc_words", store.doc_words, n)):
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


# ---- tokenize --format zarr: npy staging, then pack ---------------------------------------------
def prepare_zarr_build(out: str | os.PathLike, *, settings: dict[str, Any], overwrite: bool = False
                       ) -> tuple[Manifest | None, Path]:
    """First step of ``tokenize --format zarr`` (local ``out`` only).

    Returns ``(manifest, staging)``: ``manifest`` is a finished zarr store at ``out`` whose
    ``extra["build_settings"]`` equals ``settings`` (nothing to do), else None; ``staging`` is the
    folder to tokenize into as an npy store (``out/_build/npy-staging``) before
    :func:`pack_build_as_zarr`. Refuses (ConfigError) a finished store or a foreign folder at
    ``out`` unless ``overwrite``, which deletes it (and any unfinished build) first.
    """
    if is_url(out):
        raise ConfigError(f"tokenize --format zarr writes to a local folder, not {os.fspath(out)!r}: "
                          "tokenize locally, then 'streamdata convert' to the URL")
    loc = _Location(out)
    settings = _norm(settings)
    root = Path(loc.root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output {str(root)!r} exists and is not a folder: choose another --out")
    if loc.isfile(MANIFEST_NAME) and not overwrite:
        try:
            m = loc.read_manifest()
        except StoreError:
            m = None
        if m is not None and m.format == "zarr" and m.extra.get("build_settings") == settings:
            loc.remove(BUILD_DIR)
            return m, root / STAGING_DIR
        raise ConfigError(f"output {str(root)!r} already holds a finished store: pass --overwrite to replace it, or choose another --out")
    if loc.is_nonempty_dir() and not loc.exists(BUILD_DIR) and not loc.isfile(MANIFEST_NAME):
        raise ConfigError(f"output {str(root)!r} exists, is not empty and is not a store: choose another --out (it is never deleted)")
    if overwrite and loc.exists():
        loc.remove_store()
    (root / BUILD_DIR).mkdir(parents=True, exist_ok=True)
    return None, root / STAGING_DIR


def pack_build_as_zarr(npy_store_path: str | os.PathLike, dst: str | os.PathLike, compression: str = "none", *,
                       chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chunks_per_shard: int = DEFAULT_CHUNKS_PER_SHARD,
                       overwrite: bool = False, remove_staging: bool = True) -> Manifest:
    """Last step of ``tokenize --format zarr``: pack the finished npy staging store into ``dst``
    (resumable, manifest last, identity and ``build_settings`` carried over), then delete the
    staging store. The staging store is deleted only after the zarr manifest is sealed."""
    check_compression(compression)
    manifest = write_zarr_store(npy_store_path, dst, compression=compression, chunk_tokens=chunk_tokens,
                                chunks_per_shard=chunks_per_shard, overwrite=overwrite)
    staging = Path(npy_store_path)
    if remove_staging and staging.exists():
        from ..writer import _remove_store

        _remove_store(staging)
    return manifest
