"""transformers ``Cache`` objects carried across chunks: build, cut rows, save and restore exactly.

The kv-cache and state-space adapters (:mod:`evaluator.models`) carry one ``DynamicCache`` built
from the model's config. transformers then gives each layer the kind its config asks for:

- ``DynamicLayer`` (full attention): keys/values of every position so far, ``[B, heads, T, dim]``;
- ``DynamicSlidingWindowLayer`` (Mistral, Gemma2/3, ...): only the last ``sliding_window - 1``
  positions' keys/values plus ``cumulative_length`` (how many positions were seen: the next
  chunk's rotary positions and mask offsets come from it, so it must be restored too);
- ``LinearAttentionLayer`` (Mamba, Mamba2, FalconMamba): per state index a convolution state
  ``[B, channels, kernel]`` and a recurrent (SSM) state, updated in place, plus flags;
- the mixed kinds of hybrid models (both of the above in one layer object).

A checkpoint must restore the cache *exactly*, whatever the layer kind, so :func:`cache_state`
saves every attribute of every layer as plain data (tensors on the host, ints, bools, strings and
dicts of them: what ``torch.load(weights_only=True)`` accepts), and :func:`restore_cache` sets them
on a fresh cache of the same config, checking that the layer kinds and attribute names agree. An
attribute of any other type (a quantizer object, say) makes the cache unsaveable:
:class:`CacheStateError` says which, and the engine learns it before the first window (the carry
check's checkpoint round trip), never at the end of a run.

Traps: ``device`` and ``dtype`` attributes are objects torch.load refuses, so they are written as
strings and rebuilt; a restored tensor goes to the device its layer runs on (a dispatched model's
layers live on several); linear-attention layers update their tensors in place with ``copy_``, so a
snapshot for an out-of-memory rollback must clone them (``cache_state(..., device=None)`` does).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["CacheStateError", "cache_state", "can_select_rows", "is_linear_only", "new_cache", "restore_cache", "rollback",
           "select_rows", "snapshot"]

_PLAIN = (bool, int, float, str, type(None))


class CacheStateError(Exception):
    """A cache holds something that cannot be saved as plain data (the message says what)."""


def new_cache(config: Any) -> Any:
    """A ``DynamicCache`` whose layers are of the kinds ``config`` declares (sliding, linear, full)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)  # transformers >= 4.56: per-layer types (sliding, full, linear)
    except TypeError:
        return DynamicCache()


def _is_linear(layer: Any) -> bool:
    return hasattr(layer, "conv_states") and hasattr(layer, "recurrent_states")


def is_linear_only(cache: Any) -> bool:
    """True when every layer is a pure linear-attention (state-space) layer: a Mamba-family model."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(_is_linear(layer) and not hasattr(layer, "keys") for layer in layers)


def _convert(v: Any, tensor: Callable[[torch.Tensor], torch.Tensor], where: str) -> Any:
    if isinstance(v, torch.Tensor):
        return tensor(v)
    if isinstance(v, _PLAIN):
        return v
    if isinstance(v, torch.dtype):
        return {"__dtype__": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"__device__": str(v)}
    if isinstance(v, dict) and all(isinstance(k, (int, str)) for k in v):
        return {k: _convert(x, tensor, f"{where}[{k!r}]") for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_convert(x, tensor, f"{where}[{i}]") for i, x in enumerate(v))
    raise CacheStateError(f"{where} is a {type(v).__name__}, which a checkpoint cannot hold")


def cache_state(cache: Any, device: torch.device | None = torch.device("cpu")) -> list[dict[str, Any]]:
    """Every layer of ``cache`` as ``{"type": class name, "attrs": {name: plain value}}``: tensors
    copied to ``device`` (None: cloned where they are, for an in-memory snapshot)."""
    if type(cache).__name__ != "DynamicCache" or getattr(cache, "offloading", False):
        raise CacheStateError(f"a {type(cache).__name__}{' with offloading' if getattr(cache, 'offloading', False) else ''} "
                              "is not a plain DynamicCache")
    copy = (lambda t: t.detach().clone()) if device is None else (lambda t: t.detach().to(device, copy=True))
    out = []
    for i, layer in enumerate(cache.layers):
        name = type(layer).__name__
        out.append({"type": name, "attrs": {k: _convert(v, copy, f"cache layer {i} ({name}).{k}")
                                            for k, v in vars(layer).items()}})
    return out


def _rebuild(v: Any, device: torch.device) -> Any:
    if isinstance(v, torch.Tensor):
        return v.to(device, copy=True)
    if isinstance(v, dict):
        if set(v) == {"__dtype__"}:
            return getattr(torch, v["__dtype__"])
        if set(v) == {"__device__"}:
            return device  # where the layer runs now (a resume may use another GPU index)
        return {k: _rebuild(x, device) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_rebuild(x, device) for x in v)
    return v


def restore_cache(config: Any, state: list[dict[str, Any]], device: torch.device,
                  layer_devices: dict[int, torch.device] | None = None) -> Any:
    """A fresh cache for ``config`` holding exactly ``state`` (from :func:`cache_state`), its tensors
    on ``device`` (or ``layer_devices[i]`` for layer i of a dispatched model)."""
    cache = new_cache(config)
    layers = cache.layers
    while len(layers) < len(state) and getattr(cache, "layer_class_to_replicate", None) is not None:
        layers.append(cache.layer_class_to_replicate())  # a cache built without config grows lazily
    if len(layers) != len(state):
        raise CacheStateError(f"the checkpoint's cache has {len(state)} layers, the model's {len(layers)}")
    for i, (layer, saved) in enumerate(zip(layers, state)):
        # (a fresh layer may hold fewer attributes: lazy initialization adds keys, values, device)
        if type(layer).__name__ != saved["type"] or not set(vars(layer)) <= set(saved["attrs"]):
            raise CacheStateError(f"cache layer {i} is a {type(layer).__name__} now but the checkpoint holds a "
                                  f"{saved['type']} (another transformers version or model config)")
        dev = (layer_devices or {}).get(i, device)
        for k, v in saved["attrs"].items():
            setattr(layer, k, _rebuild(v, dev))
    return cache


# ---- parallel documents: keep rows [0, m) of every layer ------------------------------------------
_KNOWN_ROW_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer", "LinearAttentionLayer",
                     "LinearAttentionAndFullAttentionLayer", "LinearAttentionAndSlidingWindowAttentionLayer")


def can_select_rows(cache: Any) -> bool:
    """Whether :func:`select_rows` knows every layer's batch dimension."""
    layers = getattr(cache, "layers", None)
    return layers is not None and all(type(layer).__name__ in _KNOWN_ROW_LAYERS for layer in layers)


def select_rows(cache: Any, m: int) -> None:
    """Keep rows ``[0, m)`` of every layer (views of the first rows: no copy): keys/values of the
    attention kinds, conv/SSM states of the linear kinds (all batch-first)."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                setattr(layer, name, t[:m])
        if _is_linear(layer):
            for states in (layer.conv_states, layer.recurrent_states):
                for k, t in states.items():
                    if isinstance(t, torch.Tensor) and t.dim() > 0:
                        states[k] = t[:m]


# ---- out-of-memory rollback: the cache as it was before a chunk -----------------------------------
def snapshot(cache: Any) -> list[Any]:
    """What :func:`rollback` needs to put ``cache`` back as it is now: a full-attention layer only
    grows, so its length is enough (cropped later, no copy); any other layer (a sliding window that
    drops old keys, states updated in place) is copied."""
    out: list[Any] = []
    for i, layer in enumerate(cache.layers):
        if type(layer).__name__ == "DynamicLayer":
            keys = getattr(layer, "keys", None)
            out.append(("len", None if keys is None else keys.shape[-2]))
        else:
            out.append(("copy", {k: _convert(v, lambda t: t.detach().clone(), f"cache layer {i}")
                                 for k, v in vars(layer).items()}))
    return out


def rollback(cache: Any, snap: list[Any]) -> None:
    """Put ``cache`` back to ``snap`` (from :func:`snapshot`); the snapshot stays usable again."""
    for layer, (how, what) in zip(cache.layers, snap):
        if how == "len":
            if what is None:  # empty before the chunk: as a fresh layer (lazily initialized again)
                layer.keys = layer.values = None
                layer.is_initialized = False
            else:
                layer.keys, layer.values = layer.keys[..., :what, :], layer.values[..., :what, :]
        else:
            dev = torch.device(getattr(layer, "device", None) or "cpu")
            for k, v in what.items():
                setattr(layer, k, _rebuild(v, dev))
