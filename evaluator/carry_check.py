"""Before a carried-state run (kv-cache, or a state-space model's stateful mode): does feeding the
model chunk by chunk with its carried cache reproduce one full forward, in the run's dtype, and does
a checkpoint of that cache continue exactly?

Why a measurement and not a fixed tolerance: in float32 a correct cache differs from the full
forward by ~1e-6 and a wrong one by O(1), so any tolerance separates them. In bfloat16/float16 a
*correct* cache already differs by the dtype's rounding (different kernel shapes round differently),
and how much depends on the model, its logit scale and the device's kernels; a fixed tolerance
either refuses correct caches on some device or accepts a wrong cache of a small model. So the check
measures the model's own rounding noise in the run's dtype on the same probe and compares:

- ``max_diff``: max |log p(carried) - log p(full)| over the probe's positions (nats), where carried
  = the probe fed as two chunks with the cache carried between them;
- ``rounding``: the same distance between two forwards that are equal in exact arithmetic and
  differ only in shape: the full forward of the first half vs the first half of the full forward;
- ``rounding_fp32``: (half precision only, where an fp32 copy is affordable) the distance of the
  dtype's full forward from the fp32 full forward of the same weights;
- ``tolerance = max(floor, 4 * max(rounding, rounding_fp32))``, with ``floor`` one unit of the
  dtype's precision at the largest logit (float32: the relative 1e-4 used before).

A cache that ignores its past (or a model that drops the argument) gives differences of the size of
what the context changes, tenths of a nat even for a tiny random model, and is refused in every
dtype. The measurement lands in ``results.json`` (``carry_check``).

The same probe makes a checkpoint round trip: the cache after the first half is saved as plain
host data (:meth:`ModelAdapter.save_state`), restored into a fresh cache, and the second half fed
again; ``checkpoint`` says whether that reproduced the uninterrupted second half exactly (equal
tensors). Where it did not (or the cache cannot be saved), the engine turns checkpoints off at the
start of the run and says so, instead of failing at the end.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from streamdata.errors import brief

__all__ = ["CarryCheck", "measure_carry"]

# One unit of each dtype's precision, relative to the logits' scale (bf16: 8 bits of mantissa).
_FLOOR = {"float32": 1e-4, "bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}
_NOISE_FACTOR = 4.0
_FP32_COPY_MAX_BYTES = 2 << 30  # an fp32 copy of the weights for the reference: small models only


@dataclass(frozen=True)
class CarryCheck:
    """What the carry check measured (all distances in nats, on fp32 log-probabilities)."""

    ok: bool
    reason: str  # one phrase: what was found (used in mode_reason and refusals)
    dtype: str
    positions: int = 0  # probe length (two chunks of half each)
    max_diff: float | None = None
    rounding: float | None = None
    rounding_fp32: float | None = None
    tolerance: float | None = None
    stepwise: bool = False  # chunks after the first are fed one token at a time (state-space models)
    checkpoint: bool = False  # a saved and restored cache continued the stream exactly
    checkpoint_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logp(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().item()) if a.numel() else 0.0


def autocast_for(device: torch.device, dtype: str):
    """The engine's autocast for a run in ``dtype`` (a no-op in float32)."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _fp32_logits(adapter: Any, full: Callable[[Any, torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
    """Logits of the full forward in float32 (no autocast): of the model itself when its weights are
    fp32 (the run's half precision comes from autocast), else of an fp32 copy when that is small
    enough to make; None otherwise (a dispatched model, a large one)."""
    params = list(adapter.module.parameters())
    if adapter.dispatched or any(p.device.type == "meta" for p in params):
        return None
    if all(p.dtype == torch.float32 for p in params if p.is_floating_point()):
        return full(adapter.module, x)
    need = 4 * sum(p.numel() for p in params)
    if need > _FP32_COPY_MAX_BYTES:
        return None
    if adapter.device.type == "cuda" and torch.cuda.mem_get_info(adapter.device)[0] < 2 * need:
        return None
    twin = copy.deepcopy(adapter.module).float()
    try:
        return full(twin, x)
    finally:
        del twin


def measure_carry(adapter: Any, dtype: str, full: Callable[[Any, torch.Tensor], torch.Tensor],
                  n: int = 16, stepwise: bool = False) -> CarryCheck:
    """Run the probe (``n`` tokens, two chunks of n/2) on ``adapter`` (already on its device) in
    ``dtype``. ``full(module, x)`` returns the logits of one full forward of ``module`` without a
    cache. ``stepwise`` is passed through to the result (the adapter's feeding mode under test)."""
    if adapter.max_positions is not None:
        n = min(n, adapter.max_positions)
    if n < 2:
        return CarryCheck(False, f"the model has only {adapter.max_positions} positions", dtype)
    h = n // 2
    dev = adapter.device
    x = (torch.arange(n, device=dev) * 7 + 3).remainder(adapter.vocab_size or n)[None]
    with torch.inference_mode():
        with autocast_for(dev, dtype):
            try:
                full_logits = full(adapter.module, x).float()
                prefix = _logp(full(adapter.module, x[:, :h]))
                adapter.begin_stream()
                a = _logp(adapter.stream_logits(x[:, :h]))
                saved, saved_why = None, ""
                try:
                    saved = adapter.save_state()
                except Exception as e:  # noqa: BLE001 - any failure means: no checkpoint of this cache
                    saved_why = _first_line(e)
                b = _logp(adapter.stream_logits(x[:, h:]))
                b2 = None
                if saved is not None:
                    try:
                        adapter.load_state(saved)
                        b2 = _logp(adapter.stream_logits(x[:, h:]))
                    except Exception as e:  # noqa: BLE001
                        saved_why = _first_line(e)
            except Exception as e:  # noqa: BLE001 - any failure means: this model cannot carry its cache
                return CarryCheck(False, f"a forward with a carried cache raised {_first_line(e)}", dtype, n)
            finally:
                adapter.end_stream()  # leave no probe state behind
        ref = _fp32_logits(adapter, full, x) if dtype != "float32" else None
    logp = _logp(full_logits)
    max_diff = _max_abs(torch.cat([a, b], dim=1), logp)
    rounding = _max_abs(prefix, logp[:, :h])
    rounding_fp32 = None if ref is None else _max_abs(logp, _logp(ref))
    floor = _FLOOR.get(dtype, _FLOOR["bfloat16"]) * (1.0 + float(full_logits.abs().max().item()))
    tolerance = max(floor, _NOISE_FACTOR * max(rounding, rounding_fp32 or 0.0))
    if b2 is not None and torch.equal(b2, b):
        ckpt, ckpt_why = True, "a saved and restored cache continues the stream exactly"
    elif b2 is not None:
        ckpt, ckpt_why = False, (f"a saved and restored cache continues the stream {_max_abs(b2, b):.2e} nats away from "
                                 "the uninterrupted one")
    else:
        ckpt, ckpt_why = False, f"its cache cannot be saved ({saved_why})"
    where = f"{dtype}, max {max_diff:.2e} nats vs tolerance {tolerance:.2e}"
    if max_diff <= tolerance:
        reason = f"a carried cache reproduces the full forward ({where})"
        return CarryCheck(True, reason, dtype, n, max_diff, rounding, rounding_fp32, tolerance, stepwise, ckpt, ckpt_why)
    reason = (f"logits with a carried cache differ from one full forward by more than this dtype's rounding ({where}): "
              "the model does not use its cache the way transformers' DynamicCache expects")
    return CarryCheck(False, reason, dtype, n, max_diff, rounding, rounding_fp32, tolerance, stepwise, ckpt, ckpt_why)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {brief(e, 160)}" if str(e).strip() else type(e).__name__
