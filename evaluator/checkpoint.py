"""Crash-safe, resumable evaluation: an atomic checkpoint of everything a run has summed so far.

A run with a checkpoint folder writes ``checkpoint.pt`` there at most every ``interval`` seconds
(at batch boundaries) and once at the end, each time to a temporary name, fsynced, then renamed:
a reader sees the previous checkpoint or the new one, never half of one. It holds:

- ``identity``: the store (a digest of its manifest, or of the ids for in-memory data), the model
  (name, kind, parameter shapes and a float64 sum of every parameter) and every setting that
  changes the numbers (mode, windows, batch, BOS, max_tokens, dtype, loss slice, device type,
  detail level). A checkpoint of another identity is refused, naming what differs.
- ``next_window``: the first window not yet summed (a batch boundary: the resumed loader's
  batches are then the same windows as the uninterrupted run's);
- the float64/int64 metric sums that live in memory (the total, the position buckets, and the
  running sums of the document the run is in) as exact copies, and how far the spilled files are
  valid: per-window sums and times up to ``next_window``, per-document sums below ``doc_base``
  (:mod:`evaluator.spill`; they are flushed and fsynced before the checkpoint is written, and a
  resumed run continues them in place), the per-token file's filled length, the runner's state
  (the micro-batch size after an out-of-memory error; the carried model state: RNN state or KV
  cache tensors) and the seconds spent so far. Its size does not grow with the stream.

The same batches are then summed in the same order, so a resumed run gives the uninterrupted
run's totals bit for bit on the same device. Tensors are saved with ``torch.save`` and loaded with
``weights_only=True`` (no code is unpickled). ``progress.json`` beside it says, for people and
scripts, whether the run is unfinished or complete.

Integrity (``torch.load`` does not verify the zip's CRCs, so a flipped bit in a float64 sum would
be resumed as valid): the file is a one-line header holding the SHA-256 of the ``torch.save``
bytes that follow it, and ``files`` records the size and the SHA-256 of the byte range of each
file the state relies on (:class:`evaluator.run_folder.PrefixDigest`). The writers check their
files against these records when they resume (evaluator/spill.py, evaluator/metrics.py). A
``progress.json`` without its checkpoint means the checkpoint was lost: refused, never silently
restarted. Names and rules of the folder: :mod:`evaluator.run_folder`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamdata.format import fsync_dir

from .data import EvalData
from .errors import ConfigError
from .models import ModelAdapter
from .resolve import ResolvedRun
from .run_folder import CHECKPOINT_NAME, PROGRESS_NAME, temporary

__all__ = ["CHECKPOINT_NAME", "PROGRESS_NAME", "Checkpointer", "RunIdentity", "run_identity"]

# 2: per-window/per-document sums spilled to files, not held in the checkpoint;
# 3: a checksummed file, and the digests of the files the state relies on ("files")
_FORMAT = 3
_MAGIC = b"streameval checkpoint sha256="
_HEADER = len(_MAGIC) + 64 + 1  # magic, 64 hex digits of the payload's SHA-256, newline


class _HashingWriter:
    """What torch.save writes to: the file, and a SHA-256 of every byte on the way."""

    def __init__(self, f: Any):
        self._f, self.sha = f, hashlib.sha256()

    def write(self, b: Any) -> int:
        self.sha.update(b)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()


@dataclass(frozen=True)
class RunIdentity:
    """What decides a run's numbers: a checkpoint resumes only a run with an equal identity."""

    store: str
    model: str
    settings: dict[str, Any]

    def differences(self, other: "RunIdentity") -> list[str]:
        out = [k for k in ("store", "model") if getattr(self, k) != getattr(other, k)]
        keys = sorted(set(self.settings) | set(other.settings))
        return out + [k for k in keys if self.settings.get(k) != other.settings.get(k)]


def _store_digest(ed: EvalData) -> str:
    m = ed.store.manifest
    h = hashlib.sha256()
    if m.format == "memory":  # ids given in memory: their manifest carries no checksum, hash the ids
        h.update(str(ed.store.dtype).encode())
        block = 1 << 24
        for lo in range(0, len(ed.store), block):
            h.update(ed.store.read(lo, min(len(ed.store), lo + block)).tobytes())
        h.update(np.ascontiguousarray(ed.doc_offsets, dtype="<i8").tobytes())
    else:  # shard and index checksums are in the manifest: its canonical JSON names the content
        h.update(m.to_json().encode())
    return h.hexdigest()


def _model_fingerprint(adapter: ModelAdapter) -> str:
    """Name, kind, every parameter's name/shape/dtype and its float64 sum (one device sync per
    device: a model under a device map has its parameters on several, some offloaded)."""
    h = hashlib.sha256(f"{adapter.name}|{adapter.kind}|{type(adapter.module).__qualname__}".encode())
    sums = []
    for name, p in adapter.parameter_values():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        sums.append(p.detach().double().sum())
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(sums):
        by_device.setdefault(s.device, []).append(i)
    values = np.zeros(len(sums), np.float64)
    for dev, idx in by_device.items():
        values[idx] = torch.stack([sums[i] for i in idx]).cpu().numpy()
    if sums:
        h.update(values.tobytes())
    return h.hexdigest()


def run_identity(ed: EvalData, adapter: ModelAdapter, run: ResolvedRun, detailed: bool, per_token: bool) -> RunIdentity:
    spec = run.spec
    settings = {
        "mode": run.mode, "doc_mode": spec.doc_mode, "chunk_size": spec.chunk_size, "overlap": spec.overlap,
        "tail": spec.tail, "bos_id": spec.prepend_bos_id, "max_tokens": spec.max_tokens,
        # auto: measured within a memory bound that a resumed run takes from the checkpoint (autobatch)
        "batch_windows": "auto" if run.batch_auto else run.batch_windows,
        "dtype": run.dtype, "loss_slice": run.loss_slice, "device_type": run.device.type,
        "detailed": detailed, "per_token": per_token,
    }
    return RunIdentity(_store_digest(ed), _model_fingerprint(adapter), settings)


class Checkpointer:
    """Reads and writes the checkpoint of one run in ``folder`` (created if needed)."""

    def __init__(self, folder: str | os.PathLike, identity: RunIdentity, interval_s: float):
        self.folder = Path(folder)
        self.identity = identity
        self.interval_s = float(interval_s)
        self.path = self.folder / CHECKPOINT_NAME
        self._last = time.monotonic()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"checkpoint folder {str(self.folder)!r} cannot be created ({e.strerror}): "
                              "choose another folder") from None

    def load(self) -> dict[str, Any] | None:
        """The checkpoint to resume from, None when there is none; refuses another run's and a
        damaged one (the files it records are checked by their writers when they resume)."""
        if not self.path.is_file():
            progress = self.folder / PROGRESS_NAME
            if progress.is_file():  # written only after a checkpoint: the checkpoint was lost
                raise ConfigError(f"checkpoint {str(self.path)!r} is missing but {str(progress)!r} says one was "
                                  "written: the run folder is damaged; pass --overwrite to start over")
            return None
        try:
            data = self.path.read_bytes()  # (its size does not grow with the stream)
            if len(data) < _HEADER or not data.startswith(_MAGIC) or data[_HEADER - 1 : _HEADER] != b"\n":
                raise ValueError("not a streameval checkpoint of this version")
            if hashlib.sha256(memoryview(data)[_HEADER:]).hexdigest().encode() != data[len(_MAGIC) : _HEADER - 1]:
                raise ValueError("its bytes differ from its checksum")
            state = torch.load(io.BytesIO(memoryview(data)[_HEADER:]), map_location="cpu", weights_only=True)
            if state.get("format") != _FORMAT:
                raise ValueError(f"checkpoint format {state.get('format')!r}")
            ident = RunIdentity(**state["identity"])
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one user-facing error
            raise ConfigError(
                f"checkpoint {str(self.path)!r} is unreadable or damaged ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:120] if str(e) else ''}): pass --overwrite to start over"
            ) from None
        diff = ident.differences(self.identity)
        if diff:
            raise ConfigError(
                f"{str(self.folder)!r} holds a checkpoint of another run (differs in: {', '.join(diff)}): rerun the "
                "original command to resume it, pass --overwrite to start over, or choose another output folder"
            )
        return state

    def due(self) -> bool:
        return self.interval_s > 0 and time.monotonic() - self._last >= self.interval_s

    def save(self, state: dict[str, Any], *, complete: bool) -> None:
        """Write ``state`` atomically (temporary file, fsync, rename), then the progress file.
        ``state["files"]``: the records of the files it relies on (PrefixDigest.record)."""
        payload = {"format": _FORMAT, "identity": asdict(self.identity), "complete": complete, **state}
        tmp = temporary(self.path)
        try:
            with open(tmp, "wb") as f:
                f.write(_MAGIC + b"0" * 64 + b"\n")  # the digest is filled in once the payload is written
                w = _HashingWriter(f)
                torch.save(payload, w)
                f.flush()
                os.pwrite(f.fileno(), w.sha.hexdigest().encode(), len(_MAGIC))
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # (a full disk: nothing of ours is left half-written)
            raise
        fsync_dir(self.folder)
        self._last = time.monotonic()
        progress = {
            "status": "complete" if complete else "unfinished: rerun the same command to resume",
            "windows_done": int(state["next_window"]), "windows_total": int(state["windows_total"]),
            "tokens_scored": int(state["sums"]["tokens"]), "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        ptmp = temporary(self.folder / PROGRESS_NAME)
        try:
            ptmp.write_text(json.dumps(progress, indent=2) + "\n")
            os.replace(ptmp, self.folder / PROGRESS_NAME)
        except BaseException:
            ptmp.unlink(missing_ok=True)
            raise
