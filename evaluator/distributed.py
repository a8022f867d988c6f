"""Distributed evaluation on ``torch.distributed``: N processes (``torchrun``) share one run.

    torchrun --nproc-per-node N -m evaluator run STORE --model M ...

What this module decides, and why:

- **The process group** starts from torchrun's environment (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; any of torchrun's rendezvous flags, multi-node
  included): NCCL when the run is on CUDA, gloo on the CPU, with a timeout (``STREAMEVAL_DIST_TIMEOUT``
  seconds, default 600) so a rank that dies makes the others fail instead of waiting forever. Each
  rank evaluates on its local device ``cuda:LOCAL_RANK``. :func:`session` destroys the group on exit
  and on errors. Without torchrun's environment (or with ``WORLD_SIZE=1``) nothing changes: one
  process. An API caller that initialised a group itself gets the same split (:func:`current`).
- **The split** (:func:`rank_range`): every rank takes one contiguous block of the window plan.
  Stream mode: near-equal blocks of windows (``WindowPlan.shard``'s arithmetic). Document mode (any
  context mode): whole documents, the boundaries placed where the token offsets cross ``k * N / world``
  (a binary search in the memory-mapped ``doc_offsets`` and one in the lazy plan: no per-document
  array), so every rank forwards about the same number of tokens. Stream mode with a carried state
  (stateful, kv-cache) is one sequence that cannot be split exactly: refused, naming document mode.
- **The sums** are reduced in float64 (int64 for counts) across ranks, never averaged: the total, the
  position buckets, and the spilled per-window/per-document columns (each rank spills its own,
  indexed by global id, zeros elsewhere; rank 0 adds them block by block with ``reduce``).
  Per-token losses go to one file in which each rank writes its own slice at its own offset (the
  file must be on a filesystem every rank sees: one machine, or a shared mount).
- **Checkpoints** are per rank, in ``OUT/rank-R-of-N/``; a resume with another world size is refused.
  Rank 0 holds the run folder's lock for every rank (:func:`open_run_folder`,
  evaluator/run_folder.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch

from streamdata.errors import StreamdataError

from .errors import ConfigError
from .metrics import named_per_token_file, temp_per_token_file
from .run_folder import RunFolder
from .spill import BLOCK, COLUMNS

__all__ = ["DistInfo", "current", "session", "rank_range", "open_run_folder", "TIMEOUT_ENV"]

TIMEOUT_ENV = "STREAMEVAL_DIST_TIMEOUT"
_DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str  # "nccl" | "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, lo: int) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        n = lo - 1
    if n < lo:
        raise ConfigError(f"environment {name}={v!r} is not an integer >= {lo}: launch with torchrun, or unset it")
    return n


def _timeout() -> timedelta:
    v = os.environ.get(TIMEOUT_ENV, str(_DEFAULT_TIMEOUT_S))
    try:
        s = float(v)
    except ValueError:
        s = -1.0
    if not s > 0:
        raise ConfigError(f"environment {TIMEOUT_ENV}={v!r} is not a number of seconds > 0: set e.g. {TIMEOUT_ENV}=600")
    return timedelta(seconds=s)


def current() -> DistInfo | None:
    """The initialised process group of more than one rank, else None (a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local = _env_int("LOCAL_RANK", 0)
    return DistInfo(dist.get_rank(), dist.get_world_size(), 0 if local is None else local, str(dist.get_backend()))


def _wants_cuda(device: str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


@contextmanager
def session(device: str | None = None) -> Iterator[DistInfo | None]:
    """Start the process group from torchrun's environment for the ``with`` block, destroy it after.

    Yields None without torchrun's environment (or ``WORLD_SIZE=1``), or when a group already exists
    (its owner destroys it; :func:`current` still describes it). ``device``: the run's --device
    (None: CUDA when available): CUDA -> NCCL on ``cuda:LOCAL_RANK``, else gloo.
    """
    import torch.distributed as dist

    world = _env_int("WORLD_SIZE", 1)
    if world is None or world == 1 or (dist.is_available() and dist.is_initialized()):
        yield current()
        return
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if rank is None or rank >= world:
        raise ConfigError(f"environment WORLD_SIZE={world} without a RANK in [0, {world}): launch with torchrun")
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run one process")
    cuda = _wants_cuda(device)
    if cuda:
        if device is not None and ":" in str(device):
            raise ConfigError(f"--device {device} under torchrun: pass --device cuda (each rank uses cuda:LOCAL_RANK)")
        n = torch.cuda.device_count()
        if local is None or local >= n:
            raise ConfigError(f"LOCAL_RANK={local} but this machine has {n} CUDA device(s): "
                              f"pass --nproc-per-node {n} or less (or --device cpu)")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    kw: dict[str, Any] = {"backend": backend, "timeout": _timeout()}
    if cuda:
        kw["device_id"] = torch.device("cuda", local)
    dist.init_process_group(**kw)
    try:
        yield current()
        # Leave the group together: a rank that tore gloo down while rank 0 was still writing the
        # report aborted at exit now and then ("terminate called without an active exception",
        # SIGABRT: 3 runs in 16 here). Only on success: after an error the others may never arrive.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_device(info: DistInfo) -> str:
    """The device a rank evaluates on when --device does not say: its local GPU (NCCL), else the CPU."""
    return f"cuda:{info.local_rank}" if info.backend == "nccl" else "cpu"


# ---- the split ------------------------------------------------------------------------------------
def _first_window_of_doc(plan: Any, d: int) -> int:
    """Index of the first window of ``plan`` whose document is >= ``d`` (binary search over the lazy
    plan: ~log2(windows) one-window blocks, each within one cached group of documents)."""
    lo, hi = 0, len(plan)
    while lo < hi:
        mid = (lo + hi) // 2
        if int(plan.block(mid, mid + 1).doc[0]) >= d:
            hi = mid
        else:
            lo = mid + 1
    return lo


def rank_range(plan: Any, doc_offsets: Any, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s windows ``[lo, hi)`` of the full ``plan`` (a WindowPlan starting at window 0).

    Stream mode: ``WindowPlan.shard``'s near-equal blocks. Document mode: whole documents, rank k's
    first document being the first whose offset is >= k * N / world_size (N: the plan's tokens,
    after max_tokens), so ranks forward about the same number of tokens.
    """
    n = len(plan)
    if plan.doc_mode == "stream":
        return n * rank // world_size, n * (rank + 1) // world_size
    N = plan.num_tokens

    def bound(k: int) -> int:
        if k == 0:
            return 0
        if k == world_size:
            return n
        d = int(np.searchsorted(doc_offsets, k * N // world_size, side="left"))  # memmap: reads ~log pages
        return _first_window_of_doc(plan, d)

    return bound(rank), bound(rank + 1)


# ---- the run folder --------------------------------------------------------------------------------
def open_run_folder(path: str | os.PathLike, info: DistInfo | None, overwrite: bool = False) -> RunFolder:
    """Open the run folder for this process (:meth:`RunFolder.open`: one process, or rank 0, which
    takes its lock for every rank and marks it); the other ranks attach to it once rank 0 has it.
    Rank 0's refusal reaches every rank, so all fail with the same one line instead of waiting."""
    if info is None:
        return RunFolder.open(path, overwrite=overwrite)
    folder, err = None, None
    if info.is_main:
        try:
            folder = RunFolder.open(path, overwrite=overwrite)
        except StreamdataError as e:
            err = str(e)
    # (also the point after which the folder is ready for every rank)
    err = _text_from_rank_0(err, info, torch.device(rank_device(info)))
    if err is not None:
        raise ConfigError(err)
    return folder if folder is not None else RunFolder.attach(path)


_TEXT_BYTES = 4096


def _text_from_rank_0(text: str | None, info: DistInfo, device: torch.device) -> str | None:
    """Rank 0's ``text`` (or None) on every rank, as a sum of byte codes (zeros on the other ranks).
    An all-reduce, not ``broadcast_object_list``: as the first collective of a gloo group, the
    latter made a rank abort at exit now and then (2 runs in 18; 0 in 16 with a plain collective)."""
    buf = torch.zeros(_TEXT_BYTES + 1, dtype=torch.int32)
    if info.is_main and text is not None:
        b = text.encode()[:_TEXT_BYTES]
        buf[0] = 1
        buf[1 : 1 + len(b)] = torch.tensor(list(b), dtype=torch.int32)
    (out,) = all_reduce_([buf], info, device)
    if int(out[0]) == 0:
        return None
    codes = out[1:].tolist()
    return bytes(c for c in codes[: codes.index(0) if 0 in codes else len(codes)]).decode(errors="replace")


# ---- reductions -----------------------------------------------------------------------------------
def _comm(t: torch.Tensor, info: DistInfo, device: torch.device) -> torch.Tensor:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    return t.to(device) if info.backend == "nccl" else t.cpu()


def all_reduce_(tensors: list[torch.Tensor], info: DistInfo, device: torch.device, op: str = "sum") -> list[torch.Tensor]:
    """Sum (or max) each tensor over the ranks; returns new tensors on the tensors' own devices."""
    import torch.distributed as dist

    red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    out = []
    for t in tensors:
        c = _comm(t.detach().clone(), info, device)
        dist.all_reduce(c, op=red)
        out.append(c.to(t.device))
    return out


def all_reduce_scalars(values: list[float], dtype: torch.dtype, info: DistInfo, device: torch.device,
                       op: str = "sum") -> list[Any]:
    t = torch.tensor(values, dtype=dtype)
    (r,) = all_reduce_([t], info, device, op)
    return r.tolist()


def reduce_spill(rank_files: dict[str, np.ndarray], final: Any, info: DistInfo, device: torch.device) -> None:
    """Add every rank's spilled columns (indexed by global window/document id, zeros outside the
    rank's block) into ``final`` (rank 0's :class:`~evaluator.spill.SpillFiles`; None elsewhere),
    block by block: memory stays one block per column. Every rank reads its whole column (sparse
    zeros outside its block), so each collective has the same shape on every rank."""
    import torch.distributed as dist

    for name in COLUMNS:
        col = rank_files[name]
        n = len(col)
        for lo in range(0, n, BLOCK):
            t = _comm(torch.from_numpy(np.array(col[lo : lo + BLOCK])), info, device)
            dist.reduce(t, dst=0, op=dist.ReduceOp.SUM)
            if final is not None:
                final.write(name, lo, t.cpu().numpy())


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo, device: torch.device) -> None:
    import torch.distributed as dist

    if info.backend == "nccl":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


# ---- per-token losses: one file, a slice per rank ---------------------------------------------------
def shared_per_token_file(path: str | None, total: int, info: DistInfo, device: torch.device) -> tuple[str, str | None]:
    """(file every rank writes, final name or None for an anonymous temporary file): each rank's
    :class:`~evaluator.metrics.PerTokenWriter` writes its slice of it (``file=``, ``base=``), and
    rank 0 publishes it (:func:`~evaluator.metrics.publish_per_token`) once every rank has finished.

    Rank 0 creates the file (``path + '.partial'``, or a temporary file whose name it broadcasts)
    at its full size without truncating what an interrupted run wrote (ranks resume into it);
    the others open it after a barrier. A finished run's published file is reused as it is."""
    if info.is_main:
        if path is None:
            file = temp_per_token_file()
        else:
            file = named_per_token_file(path)
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != max(1, total) * 4:
                os.ftruncate(fd, max(1, total) * 4)
        finally:
            os.close(fd)
    else:
        file = None
    try:
        shared = broadcast_object(file, info)
    except BaseException:
        if info.is_main and path is None:  # our temporary file: nobody will write it now
            os.unlink(file)
        raise
    return shared, path
