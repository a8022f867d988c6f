"""Model stage: adapters that give the engine one interface over every kind of model it evaluates.

Kinds, and the context modes each supports:

- any ``nn.Module`` whose forward(input_ids [B, T]) returns logits [B, T, V], an object with
  ``.logits``, a dict with ``"logits"`` or a tuple whose first item is the logits: ``sliding``;
- a module with the stateful protocol ``get_state() / set_state(s) / reset_state()``: ``sliding``
  and ``stateful``. Protocol: ``forward(x)`` continues from the current state and leaves the state
  after ``x`` in place; ``reset_state()`` starts a new sequence; ``get_state()`` returns an object
  that ``set_state`` accepts (the engine clones its tensors before a chunk so it can roll back
  after an out-of-memory error);
- a transformers causal LM (by object, hub id or local folder): attention models support
  ``sliding`` and ``kv-cache`` (a DynamicCache carried across chunks, full or sliding-window
  attention layers alike: exact full-context evaluation while the stream fits the model's
  positions); state-space models (Mamba, Mamba2, FalconMamba: their cache holds convolution and
  SSM states) and recurrent models (RWKV, whose ``state`` is passed back in) support ``sliding``
  and ``stateful``. Carried caches are checked against one full forward in the run's dtype before
  the run (:mod:`evaluator.carry_check`) and checkpointed exactly (:mod:`evaluator.hf_cache`);
- ``package.module:factory``: a user's callable returning any of the above.

Loss memory: when a transformers model's output embedding (lm head) is reachable and applying it
to the body's last hidden state reproduces the model's logits (checked once on 8 tokens), the
engine calls the body and applies the head per loss slice, so [tokens, vocab] logits exist only
for one slice at a time. Otherwise the model returns full logits and only the fp32 upcast and
log-softmax are sliced.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import shutil
import sys
import tempfile
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from streamdata.errors import brief, missing_local_path

from . import hf_cache
from .carry_check import CarryCheck, measure_carry
from .errors import ModelError

__all__ = [
    "DEFAULT_MODEL_DIR",
    "ForwardOutput",
    "ModelAdapter",
    "ModuleAdapter",
    "StatefulModuleAdapter",
    "HFAdapter",
    "HFAttentionAdapter",
    "HFCacheAdapter",
    "HFRecurrentAdapter",
    "HFStateSpaceAdapter",
    "load_model",
    "wrap_model",
]

# The embedded default model (trained by ``python -m evaluator.assets.default.train``, which lives
# beside it). Its tokenizer is streamdata's bundled one (``--tokenizer default``): one copy.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "default"

# Config attributes that name a model's context length, most specific first.
_CONTEXT_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx", "max_seq_len", "max_sequence_length",
                  "seq_length", "block_size", "context_length", "max_positions")
_RECURRENT_HF = ("rwkv",)  # transformers models whose state is passed back in as `state`
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@dataclass
class ForwardOutput:
    """What a forward produced: either ``hidden`` [B, T, H] with the ``head`` that maps hidden
    states to logits (applied per loss slice by the metrics stage), or full ``logits`` [B, T, V]."""

    hidden: torch.Tensor | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    logits: torch.Tensor | None = None


def _extract_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise ModelError(
            f"the model returned {type(out).__name__}, not logits: return a [B, T, vocab] tensor, an object with "
            ".logits, or a tuple whose first item is the logits"
        )
    return logits


def _first_attr(objs: tuple[Any, ...], names: tuple[str, ...], minimum: int = 1) -> Any:
    """The first int attribute >= minimum among ``names`` of ``objs`` (a module, then its config)."""
    for o in objs:
        if o is None:
            continue
        for n in names:
            v = getattr(o, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v >= minimum:
                return v
    return None


def _clone_tree(x: Any) -> Any:
    """Deep copy of the tensors in a state object (tensor, tuple/list/dict of them, or None)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, tuple):
        return tuple(_clone_tree(v) for v in x)
    if isinstance(x, list):
        return [_clone_tree(v) for v in x]
    if isinstance(x, dict):
        return {k: _clone_tree(v) for k, v in x.items()}
    return x


def _tree_to(x: Any, device: torch.device) -> Any:
    """A copy of a state tree (tensor, tuple/list/dict of them, or None) with its tensors on ``device``."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device, copy=True)
    if isinstance(x, tuple):
        return tuple(_tree_to(v, device) for v in x)
    if isinstance(x, list):
        return [_tree_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _tree_to(v, device) for k, v in x.items()}
    return x


class ModelAdapter:
    """The engine's view of a model. Subclasses implement the modes they list in ``modes``."""

    kind = "module"
    modes: tuple[str, ...] = ("sliding",)

    def __init__(self, module: nn.Module, name: str | None = None, tokenizer_sha256: str | None = None):
        self.module = module
        self.name = name or type(module).__name__
        cfg = getattr(module, "config", None)
        self.vocab_size: int | None = self._find_vocab(module, cfg)
        # max_positions: positions one sequence may use (absolute position embeddings): a hard limit
        # for sliding windows and kv-cache streams. context_length: the default chunk_size.
        self.context_length: int | None = _first_attr((module, cfg), _CONTEXT_ATTRS)
        self.max_positions: int | None = self.context_length
        self.bos_token_id: int | None = _first_attr((module, cfg), ("bos_token_id",), minimum=0)
        sha = tokenizer_sha256 or getattr(module, "tokenizer_sha256", None) or getattr(cfg, "tokenizer_sha256", None)
        self.tokenizer_sha256: str | None = sha if isinstance(sha, str) and sha else None
        # what the tokenizer check compares with a store's manifest["tokenizer"]: the whole-file sha256
        # and, when the tokenizer.json was at hand (load_model of a folder, hub id or 'default'),
        # ids_sha256/ids_parts (streamdata.tokenize.tokenizer_digests)
        self.tokenizer_identity: dict[str, Any] | None = {"sha256": self.tokenizer_sha256} if self.tokenizer_sha256 else None

    @staticmethod
    def _find_vocab(module: nn.Module, cfg: Any) -> int | None:
        v = _first_attr((module, cfg), ("vocab_size", "n_vocab", "num_tokens"))
        if v is not None:
            return v
        # No declared vocabulary: the largest embedding table bounds valid ids (a position table
        # can only make this bound looser, never reject a valid id).
        rows = [m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)]
        return max(rows) if rows else None

    # ---- lifecycle ----------------------------------------------------------------------
    @property
    def dispatched(self) -> bool:
        """True for a model spread over devices by a device map (transformers + accelerate): its
        layers stay where the map put them, and inputs go to :meth:`input_device`."""
        return bool(getattr(self.module, "hf_device_map", None))

    def input_device(self) -> torch.device | None:
        """Where a dispatched model takes its inputs (accelerate's execution device of the whole
        model: the device of its first layers); None for a model that is moved as a whole."""
        if not self.dispatched:
            return None
        hook = getattr(self.module, "_hf_hook", None)
        dev = getattr(hook, "execution_device", None)
        if dev is None:  # no top-level hook (every layer on one device): where the weights are
            dev = next((q.device for q in self.module.parameters() if q.device.type != "meta"), "cpu")
        return _as_device(dev)

    def parameter_values(self):
        """(name, tensor) of every parameter with its values: a layer a device map offloaded to disk
        has meta parameters, whose values accelerate keeps in its hook's ``weights_map``."""
        hooked = {n: m._hf_hook for n, m in self.module.named_modules()
                  if getattr(getattr(m, "_hf_hook", None), "weights_map", None) is not None} if self.dispatched else {}
        for name, q in self.module.named_parameters():
            if q.device.type == "meta":
                owners = [h for h in hooked if h == "" or name.startswith(h + ".")]
                if owners:
                    h = max(owners, key=len)
                    q = hooked[h].weights_map[name[len(h) + 1:] if h else name]
            yield name, q

    def to(self, device: torch.device) -> "ModelAdapter":
        if self.dispatched:
            # Moving a dispatched model would undo its map (and accelerate refuses to move offloaded
            # weights): it stays put, and ``device`` must be where it takes its inputs.
            if device != self.input_device():
                raise ModelError(f"model {self.name} is spread over devices by a device map and takes its inputs on "
                                 f"{self.input_device()}, not {device}: leave --device unset (or pass "
                                 f"--device {self.input_device()})")
        else:
            self.module.to(device)
        self.module.eval()  # dropout off: chunked and full evaluation must agree
        self.device = device
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "modes": list(self.modes), "vocab_size": self.vocab_size,
                "max_positions": self.max_positions, "tokenizer_sha256": self.tokenizer_sha256,
                "tokenizer_ids_sha256": (self.tokenizer_identity or {}).get("ids_sha256")}

    def supports_kv_cache(self) -> bool:
        return "kv-cache" in self.modes

    @property
    def full_logits(self) -> bool:
        """True when a forward returns [B, T, vocab] logits (no hidden states + head to slice)."""
        return True

    # ---- sliding: rows are independent sequences starting from an empty context ----------
    def forward_windows(self, inputs: torch.Tensor) -> ForwardOutput:
        return ForwardOutput(logits=_extract_logits(self._windows_call(self.module, inputs)))

    # ---- torch.compile of what sliding windows call ------------------------------------------
    compile_mode: str | None = None  # set only inside compiled(): the torch.compile mode in use
    _compiled: Any = None  # the compiled module of compile_mode (None: eager)
    _compile_cache: dict | None = None  # (mode, backend) -> compiled module, reused by later runs

    def _compile_target(self) -> nn.Module:
        """The module sliding windows call: the whole module here (HFAdapter: the body when split)."""
        return self.module

    @contextmanager
    def compiled(self, mode: str | None, backend: str = "inductor"):
        """Within the block, :meth:`forward_windows` calls ``torch.compile`` of the model body
        (``mode``: "default" or "reduce-overhead"; None: eager, a no-op). ``dynamic=False``: one
        graph per input shape, and the sliding runner feeds one shape (it pads every batch to
        [batch_size, chunk_size]). Compiling is lazy (the first forward); the compiled module is
        kept for later runs. The adapter is eager again after the block (a benchmark's compute-only
        loop or another evaluator sharing it stays eager). ``backend``: "inductor" (the kernels);
        "eager"/"aot_eager" trace the same graph without code generation (tests of the plumbing)."""
        if mode is None:
            yield
            return
        if self._compile_cache is None:
            self._compile_cache = {}
        key = (mode, backend)
        if key not in self._compile_cache:
            # mode is an inductor setting ("default" is its default); other backends take none
            kw = {"mode": mode} if backend == "inductor" and mode != "default" else {}
            try:
                self._compile_cache[key] = torch.compile(self._compile_target(), dynamic=False, backend=backend, **kw)
            except Exception as e:  # noqa: BLE001 - e.g. an unknown backend, a Python torch.compile does not support
                raise ModelError(f"model {self.name}: torch.compile (mode {mode!r}, backend {backend!r}) failed "
                                 f"({type(e).__name__}: {brief(e)}): leave compile unset to run eager") from None
        self._compiled, self.compile_mode = self._compile_cache[key], mode
        try:
            yield
        finally:
            self._compiled, self.compile_mode = None, None

    def _windows_call(self, module: nn.Module, *args: Any, **kw: Any) -> Any:
        """``module(*args, **kw)``, through its compiled version inside :meth:`compiled`. Any
        failure there but running out of memory (which the runner retries in halves) becomes one
        line: which model, what failed, how to run eager."""
        if self._compiled is None or module is not self._compile_target():
            return module(*args, **kw)
        if self.compile_mode == "reduce-overhead":
            # CUDA graphs reuse their output buffers: a new step means the previous forward's
            # outputs (already consumed by the loss) may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        try:
            return self._compiled(*args, **kw)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - dynamo/inductor raise many types; all one user-facing error
            first = brief(e)
            shape = "x".join(str(d) for d in (args[0] if args else kw.get("input_ids")).shape)
            raise ModelError(
                f"model {self.name}: torch.compile (mode {self.compile_mode!r}) of {type(module).__name__} failed on a "
                f"[{shape}] batch ({type(e).__name__}: {first}): leave compile unset to run eager"
            ) from None

    # ---- stateful / kv-cache: one sequence fed chunk by chunk ---------------------------
    def begin_stream(self) -> None:
        raise ModelError(f"model {self.name} carries no state: use mode='sliding'")

    def forward_stream(self, inputs: torch.Tensor) -> ForwardOutput:
        raise ModelError(f"model {self.name} carries no state: use mode='sliding'")

    def snapshot(self) -> Any:
        """State before a chunk, so an out-of-memory chunk can be rolled back and re-fed in halves."""
        return None

    def restore(self, snap: Any) -> None:
        pass

    def can_keep_rows(self) -> bool:
        """Whether :meth:`keep_rows` would cut the carried state now (asked without changing it)."""
        return False

    def keep_rows(self, m: int) -> bool:
        """Parallel documents (rows of one carried batch, longest first): keep only the state of
        rows ``[0, m)`` once the later rows' documents have ended. False: this adapter cannot cut
        its state's batch dimension (a protocol module's layout is its own), so the caller keeps
        feeding every row (ended rows get padding, never scored)."""
        return False

    # ---- checkpoints: the carried state as plain tensors on the host -----------------------
    def save_state(self) -> Any:
        """The carried state (after the last chunk) as a tree of CPU tensors (tuple/list/dict),
        for a checkpoint; ``load_state`` puts it back. None when nothing is carried."""
        return None

    def load_state(self, state: Any) -> None:
        if state is not None:
            raise ModelError(f"model {self.name} carries no state, but the checkpoint holds one: start over with --overwrite")

    # ---- the carry check (kv-cache; a state-space model's stateful mode) -------------------
    checks_carry = False  # True: a carried run starts with carry_check (evaluator.carry_check)

    def carry_check(self, dtype: str = "float32") -> CarryCheck:
        """Whether feeding chunks with the carried cache reproduces one full forward in ``dtype``
        on this device, and whether a checkpoint of the cache continues exactly (measured once per
        device and dtype; see :mod:`evaluator.carry_check`)."""
        return CarryCheck(False, f"{self.kind} models carry no KV cache", dtype)

    def end_stream(self) -> None:
        """Drop the carried state (the carry check's probe leaves none behind)."""

    def stream_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """fp32 logits of :meth:`forward_stream` (the carry check's probe; never in the hot loop)."""
        o = self.forward_stream(inputs)
        return (o.head(o.hidden) if o.logits is None else o.logits).float()


class ModuleAdapter(ModelAdapter):
    """Any module returning logits: sliding windows only."""


class StatefulModuleAdapter(ModelAdapter):
    """A module with ``get_state()/set_state(s)/reset_state()`` (see the module docstring)."""

    kind = "stateful-protocol"
    modes = ("sliding", "stateful")

    def forward_windows(self, inputs: torch.Tensor) -> ForwardOutput:
        self.module.reset_state()  # each batch of windows is a fresh set of sequences
        try:
            return ForwardOutput(logits=_extract_logits(self._windows_call(self.module, inputs)))
        finally:
            self.module.reset_state()

    def begin_stream(self) -> None:
        self.module.reset_state()

    def forward_stream(self, inputs: torch.Tensor) -> ForwardOutput:
        return ForwardOutput(logits=_extract_logits(self.module(inputs)))

    def snapshot(self) -> Any:
        return _clone_tree(self.module.get_state())

    def restore(self, snap: Any) -> None:
        self.module.set_state(_clone_tree(snap))

    def save_state(self) -> Any:
        return _tree_to(self.module.get_state(), torch.device("cpu"))

    def load_state(self, state: Any) -> None:
        self.module.set_state(_tree_to(state, self.device))


class HFAdapter(ModelAdapter):
    """What every transformers causal LM shares: vocabulary, the body/head split, sliding windows.
    Use :func:`wrap_model`, which picks :class:`HFAttentionAdapter` or :class:`HFRecurrentAdapter`."""

    kind = "transformers"

    def __init__(self, model: nn.Module, name: str | None = None, tokenizer_sha256: str | None = None):
        super().__init__(model, name or getattr(model, "name_or_path", None) or type(model).__name__, tokenizer_sha256)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(emb, nn.Embedding):  # ids must index the input table (may exceed config.vocab_size)
            self.vocab_size = int(emb.num_embeddings)
        self.model_type = str(getattr(model.config, "model_type", ""))
        body = getattr(model, "base_model", None)
        self.body = body if isinstance(body, nn.Module) and body is not model else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head = head if isinstance(head, nn.Module) else None
        self.split = False  # set by to(): body + per-slice head reproduces the logits
        fwd = self.body.forward if self.body is not None else model.forward
        params = inspect.signature(fwd).parameters
        full_params = inspect.signature(model.forward).parameters
        # transformers 5 renamed past_key_values -> cache; support both spellings.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._full_cache_arg = "cache" if "cache" in full_params else "past_key_values"

    def to(self, device: torch.device) -> "HFAdapter":
        super().to(device)
        self._check_split()
        return self

    def _check_split(self) -> None:
        """Use body + head only where it reproduces the model's logits (no softcap/scale after the head)."""
        self.split = False
        if self.body is None or self.head is None or self.dispatched:
            # Dispatched: only the whole model's forward returns its output on the input device
            # (accelerate's io_same_device); a head called alone answers on its own device.
            return
        n = max(2, min(8, self.vocab_size or 8))
        x = torch.arange(n, device=self.device).remainder(self.vocab_size or n)[None]
        with torch.inference_mode():
            try:
                full = _extract_logits(self.module(input_ids=x, use_cache=False)).float()
                hid = self._body(x, use_cache=False).last_hidden_state
                split = self.head(hid).float()
            except Exception:  # noqa: BLE001 - an unusual body signature just means: no split
                return
        if split.shape == full.shape:
            self.split = _close(split, full)

    @property
    def full_logits(self) -> bool:
        return not self.split

    def _body(self, x: torch.Tensor, **kw: Any) -> Any:
        return self.body(input_ids=x, **kw)

    def _out(self, x: torch.Tensor, **kw: Any) -> tuple[ForwardOutput, Any]:
        if self.split:
            out = self._body(x, **kw)
            return ForwardOutput(hidden=out.last_hidden_state, head=self.head), out
        out = self.module(input_ids=x, **{self._full_cache_arg if k == self._cache_arg else k: v for k, v in kw.items()})
        return ForwardOutput(logits=_extract_logits(out)), out

    def forward_windows(self, inputs: torch.Tensor) -> ForwardOutput:
        # Right padding needs no attention mask: causal attention never lets a position see later
        # (padded) ones, and padded targets are not scored.
        if self._compiled is None:
            return self._out(inputs, use_cache=False)[0]
        out = self._windows_call(self._compile_target(), input_ids=inputs, use_cache=False)
        if self.split:
            return ForwardOutput(hidden=out.last_hidden_state, head=self.head)
        return ForwardOutput(logits=_extract_logits(out))

    def _compile_target(self) -> nn.Module:
        # The transformer body when the head runs per loss slice (the head is a matmul applied to
        # a few thousand rows at a time, outside the graph), else the whole model.
        return self.body if self.split else self.module

    def _full_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Logits of one forward of ``module`` (this model, or the carry check's fp32 copy), no cache."""
        return _extract_logits(module(input_ids=x, use_cache=False))


class HFCacheAdapter(HFAdapter):
    """What the transformers models that carry a ``Cache`` share (attention, state-space, hybrids):
    feeding chunks into the cache, saving and restoring it exactly, cutting its rows, rolling it
    back after running out of memory, the carry check.

    Feeding: a chunk from an empty cache is one forward. A chunk that continues the cache is one
    forward too, unless the cache has SSM (linear-attention) layers whose multi-token forward starts
    from a zero state instead of the carried one (transformers' Mamba, FalconMamba and the hybrids
    built on their mixer use the carried state only in one-token steps): the carry check finds that
    exactly (:meth:`_multi_token_uses_state`) and such chunks are then fed one token at a time,
    exact at the price of one forward per token after a document's first chunk (a larger chunk
    size keeps more of the work in the fast first forward)."""

    def __init__(self, model: nn.Module, name: str | None = None, tokenizer_sha256: str | None = None):
        super().__init__(model, name, tokenizer_sha256)
        self.cache: Any = None
        self.fed = 0  # tokens fed since begin_stream (0: the next chunk starts from an empty cache)
        self.stepwise = False  # continuation chunks one token at a time (set by the carry check)
        self._carry_checks: dict[tuple[str, str], CarryCheck] = {}

    def begin_stream(self) -> None:
        self.cache = hf_cache.new_cache(self.module.config)
        self.fed = 0

    def end_stream(self) -> None:
        self.cache = None

    def forward_stream(self, inputs: torch.Tensor) -> ForwardOutput:
        T = inputs.shape[1]
        if not self.stepwise or self.fed == 0 or T == 1:
            res = self._feed(inputs)
        else:
            outs = [self._feed(inputs[:, t : t + 1]) for t in range(T)]
            res = (ForwardOutput(hidden=torch.cat([o.hidden for o in outs], dim=1), head=outs[0].head)
                   if outs[0].logits is None else ForwardOutput(logits=torch.cat([o.logits for o in outs], dim=1)))
        self.fed += T
        return res

    def _feed(self, inputs: torch.Tensor) -> ForwardOutput:
        """One forward of ``inputs`` continuing ``self.cache`` (which the model updates in place or
        returns anew)."""
        res, out = self._out(inputs, **{self._cache_arg: self.cache}, use_cache=True)
        new = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if new is not None:
            self.cache = new
        return res

    def _feed_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        o = self._feed(inputs)
        return (o.head(o.hidden) if o.logits is None else o.logits).float()

    # ---- out-of-memory rollback ----------------------------------------------------------------
    def snapshot(self) -> Any:
        return None if self.cache is None else (hf_cache.snapshot(self.cache), self.fed)

    def restore(self, snap: Any) -> None:
        if snap is None:
            self.begin_stream()
        else:
            hf_cache.rollback(self.cache, snap[0])
            self.fed = snap[1]

    # ---- checkpoints and parallel documents: any DynamicCache, layer kind by layer kind ----------
    def can_keep_rows(self) -> bool:
        return self.cache is not None and hf_cache.can_select_rows(self.cache)

    def keep_rows(self, m: int) -> bool:
        if not self.can_keep_rows():
            return False
        hf_cache.select_rows(self.cache, m)  # views of the first rows: no copy
        return True

    def save_state(self) -> Any:
        if self.cache is None:
            return None
        try:
            return {"cache": hf_cache.cache_state(self.cache), "fed": self.fed}
        except hf_cache.CacheStateError as e:  # the carry check found this before the run: a bug if here
            raise ModelError(f"model {self.name}'s cache cannot be checkpointed ({e}): pass --checkpoint-interval 0") from None

    def load_state(self, state: Any) -> None:
        self.begin_stream()
        if state is None:
            return
        if isinstance(state, list):  # checkpoint format of 2026-11: [(keys, values) | None] per full-attention layer
            state = {"cache": [{"type": "DynamicLayer", "attrs": {"keys": kv[0], "values": kv[1], "is_initialized": True,
                                                                  "device": {"__device__": "cpu"}}}
                               for kv in state if kv is not None], "fed": 1}
        try:
            self.cache = hf_cache.restore_cache(self.module.config, state["cache"], self.device, self._layer_devices())
        except hf_cache.CacheStateError as e:
            raise ModelError(f"the checkpoint's cache does not fit model {self.name} ({e}): pass --overwrite to start over") from None
        self.fed = int(state.get("fed", 0))

    def _layer_devices(self) -> dict[int, torch.device]:
        """Cache layer index -> the device its attention runs on. A dispatched model's layer i
        concatenates new keys to its cached ones on its own device, so a restored cache must be put
        there; attention modules of transformers carry their cache index as ``layer_idx``."""
        if not self.dispatched:
            return {}
        # accelerate hooks the blocks of the map (and the whole model): a module runs on the
        # execution device of its nearest hooked ancestor.
        hooked: dict[str, Any] = {}
        for name, m in self.module.named_modules():
            dev = getattr(getattr(m, "_hf_hook", None), "execution_device", None)
            if dev is not None:
                hooked[name] = dev
        out: dict[int, torch.device] = {}
        for name, m in self.module.named_modules():
            idx = getattr(m, "layer_idx", None)
            if not isinstance(idx, int) or idx in out:
                continue
            owners = [h for h in hooked if h == "" or name == h or name.startswith(h + ".")]
            if owners:
                out[idx] = _as_device(hooked[max(owners, key=len)])
        return out

    # ---- the carry check -----------------------------------------------------------------------
    checks_carry = True

    def carry_check(self, dtype: str = "float32") -> CarryCheck:
        key = (str(self.device), dtype)
        if key not in self._carry_checks:
            self.stepwise = not self._multi_token_uses_state()
            chk = measure_carry(self, dtype, self._full_forward, stepwise=self.stepwise)
            if chk.ok and self.stepwise:
                chk = replace(chk, reason=chk.reason + "; chunks after a document's first are fed one token at a time "
                                                       "(the model's multi-token forward starts from a zero SSM state)")
            self._carry_checks[key] = chk
        chk = self._carry_checks[key]
        self.stepwise = chk.stepwise
        return chk

    def _multi_token_uses_state(self) -> bool:
        """Whether a multi-token forward continues the carried SSM states: the same chunk fed after
        the same context, once with the states as they are and once doubled, must differ. Exact in
        any dtype (a path that ignores the state gives equal tensors), unlike a tolerance. True
        when the cache has no SSM state (attention only)."""
        dev = self.device
        x = (torch.arange(12, device=dev) * 5 + 1).remainder(self.vocab_size or 12)[None]
        with torch.inference_mode():
            try:
                self.begin_stream()
                self._feed(x[:, :6])
                states = [t for layer in self.cache.layers for t in getattr(layer, "recurrent_states", {}).values()
                          if t is not None]
                if not states:
                    return True
                snap = hf_cache.snapshot(self.cache)
                one = self._feed_logits(x[:, 6:])
                hf_cache.rollback(self.cache, snap)
                for layer in self.cache.layers:
                    for t in getattr(layer, "recurrent_states", {}).values():
                        if t is not None:
                            t.mul_(2)
                two = self._feed_logits(x[:, 6:])
            except Exception:  # noqa: BLE001 - the carry check then reports the failure itself
                return True
            finally:
                self.end_stream()
        return not torch.equal(one, two)


class HFAttentionAdapter(HFCacheAdapter):
    """A transformers attention model: sliding windows, or a DynamicCache carried across chunks
    (``kv-cache``: exact full-context evaluation while a stream fits the model's positions). The
    cache holds whatever layer kinds the config declares: full attention, sliding-window attention
    (Mistral, Gemma2: only the last window of keys/values is kept), the SSM layers of a hybrid, and
    is checkpointed exactly (:mod:`evaluator.hf_cache`)."""

    kind = "transformers-attention"
    modes = ("sliding", "kv-cache")

    def forward_stream(self, inputs: torch.Tensor) -> ForwardOutput:
        if self.max_positions is not None:
            used = self.cache.get_seq_length()
            if used + inputs.shape[1] > self.max_positions:
                raise ModelError(
                    f"kv-cache stream reached {used + inputs.shape[1]} positions, beyond the model's "
                    f"{self.max_positions}: use mode='sliding' (with overlap) for streams longer than the context"
                )
        return super().forward_stream(inputs)


class HFStateSpaceAdapter(HFCacheAdapter):
    """A transformers state-space model (Mamba, Mamba2, FalconMamba): its cache (per layer a
    convolution state and an SSM state, transformers' linear-attention layers) carried across
    chunks: ``stateful``, exact at any stream length (no position table), or sliding windows."""

    kind = "transformers-state-space"
    modes = ("sliding", "stateful")

    def __init__(self, model: nn.Module, name: str | None = None, tokenizer_sha256: str | None = None):
        super().__init__(model, name, tokenizer_sha256)
        self.max_positions = None  # context_length is only the default chunk


class HFRecurrentAdapter(HFAdapter):
    """A transformers recurrent model (RWKV: its ``state`` is passed back in): sliding windows, or
    the state carried across chunks (``stateful``). No position table: any stream length."""

    kind = "transformers-recurrent"
    modes = ("sliding", "stateful")

    def __init__(self, model: nn.Module, name: str | None = None, tokenizer_sha256: str | None = None):
        super().__init__(model, name, tokenizer_sha256)
        self.max_positions = None  # context_length is only the default chunk
        self.state = None

    def begin_stream(self) -> None:
        self.state = None

    def forward_stream(self, inputs: torch.Tensor) -> ForwardOutput:
        if inputs.shape[0] > 1 and inputs.shape[1] == 1:
            return self._one_token_rows(inputs)
        res, out = self._out(inputs, state=self.state, use_cache=True)
        self.state = out.state  # RWKV updates the state tensors in place and returns them
        return res

    def _one_token_rows(self, inputs: torch.Tensor) -> ForwardOutput:
        """A one-token step of several rows (parallel documents), fed row by row: transformers'
        RWKV (5.x) mixes a one-token step with its [B, H] state by broadcasting against [B, 1, H]
        hidden states, which is right only for B = 1 (B > 1 gives [B, B, H] and wrong logits)."""
        outs, states = [], []
        for i in range(inputs.shape[0]):
            row = None if self.state is None else [t[i : i + 1] for t in self.state]
            res, out = self._out(inputs[i : i + 1], state=row, use_cache=True)
            outs.append(res)
            states.append(out.state)
        self.state = [torch.cat(parts) for parts in zip(*states)]
        if outs[0].logits is None:
            return ForwardOutput(hidden=torch.cat([o.hidden for o in outs]), head=outs[0].head)
        return ForwardOutput(logits=torch.cat([o.logits for o in outs]))

    def snapshot(self) -> Any:
        return _clone_tree(self.state)

    def restore(self, snap: Any) -> None:
        self.state = _clone_tree(snap)

    def can_keep_rows(self) -> bool:
        return self.state is None or all(isinstance(t, torch.Tensor) for t in self.state)

    def keep_rows(self, m: int) -> bool:
        # RWKV's state: a list of [batch, hidden, layers] tensors (updated in place: views stay valid).
        if not self.can_keep_rows():
            return False
        if self.state is not None:
            self.state = [t[:m] for t in self.state]
        return True

    def save_state(self) -> Any:
        return _tree_to(self.state, torch.device("cpu"))

    def load_state(self, state: Any) -> None:
        self.state = _tree_to(state, self.device)


def _as_device(dev: Any) -> torch.device:
    """accelerate's execution device (a GPU index, or a name/torch.device) as a torch.device."""
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding of the model's dtype (a wrong split/cache differs by O(1))."""
    tol = 1e-4 if a.dtype == torch.float32 else 5e-2
    return bool(((a - b).abs().max() <= tol * (1 + b.abs().max())).item())


def _is_hf_model(m: Any) -> bool:
    tf = sys.modules.get("transformers")
    if tf is None:
        return False
    try:
        return isinstance(m, tf.PreTrainedModel)
    except AttributeError:
        return False


def _hf_adapter(model: nn.Module, name: str | None, tokenizer_sha256: str | None) -> HFAdapter:
    if str(getattr(model.config, "model_type", "")) in _RECURRENT_HF:
        return HFRecurrentAdapter(model, name, tokenizer_sha256)
    try:  # the layer kinds the config declares: all linear-attention (SSM) layers make a state-space model
        state_space = hf_cache.is_linear_only(hf_cache.new_cache(model.config))
    except Exception:  # noqa: BLE001 - a config transformers cannot build a cache for: an attention model
        state_space = False
    return (HFStateSpaceAdapter if state_space else HFAttentionAdapter)(model, name, tokenizer_sha256)


def wrap_model(model: Any, name: str | None = None, tokenizer_sha256: str | None = None) -> ModelAdapter:
    """Adapter for an in-memory model (nn.Module, transformers model, or an adapter)."""
    if isinstance(model, ModelAdapter):
        return model
    if not isinstance(model, nn.Module):
        raise ModelError(f"cannot evaluate a {type(model).__name__}: pass an nn.Module, a transformers model, a hub id/folder or package.module:factory")
    if _is_hf_model(model):
        return _hf_adapter(model, name, tokenizer_sha256)
    if all(callable(getattr(model, a, None)) for a in ("get_state", "set_state", "reset_state")):
        return StatefulModuleAdapter(model, name, tokenizer_sha256)
    return ModuleAdapter(model, name, tokenizer_sha256)


def _tokenizer_identity_of_folder(folder: Path) -> dict[str, Any] | None:
    """The digests of ``folder/tokenizer.json`` (streamdata.tokenize.tokenizer_digests), None without one."""
    f = folder / "tokenizer.json"
    if not f.is_file():
        return None
    from streamdata.tokenize import tokenizer_digests
    from tokenizers import Tokenizer

    try:
        return tokenizer_digests(Tokenizer.from_file(str(f)))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer just leaves the identity unknown
        return None


def _tokenizer_identity_of_hub(repo: str) -> dict[str, Any] | None:
    try:
        from huggingface_hub import hf_hub_download

        return _tokenizer_identity_of_folder(Path(hf_hub_download(repo, "tokenizer.json")).parent)
    except Exception:  # noqa: BLE001 - offline or no tokenizer.json: identity unknown
        return None


def _set_tokenizer_identity(adapter: ModelAdapter, identity: dict[str, Any] | None) -> ModelAdapter:
    if identity is not None:
        adapter.tokenizer_identity = identity
        adapter.tokenizer_sha256 = identity["sha256"]
    return adapter


def load_model(spec: Any, *, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
               device_map: str | dict[str, Any] | None = None) -> ModelAdapter:
    """Resolve ``spec`` into an adapter.

    ``spec``: an nn.Module/transformers model/adapter; ``"default"`` (the embedded model); a local
    folder or hub id of a transformers causal LM (loaded with ``from_pretrained`` in ``dtype``);
    or ``"package.module:factory"`` (called without arguments; may return any of these).
    ``device_map``: for a model loaded by name, transformers' ``device_map`` ("auto", "balanced",
    "sequential", or {module name: device}; needs accelerate): the model is spread over the GPUs
    (and CPU/disk offload) and stays there; the evaluator feeds its first device.
    """
    if not isinstance(spec, (str, os.PathLike)):
        if device_map is not None:
            raise ModelError(f"device_map={device_map!r} applies to models loaded by name (a folder or hub id), not to a "
                             f"{type(spec).__name__} object: load it with from_pretrained(..., device_map=...) and pass it")
        return wrap_model(spec)
    s = os.fspath(spec)
    if s == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ModelError(f"the embedded default model is missing from {str(DEFAULT_MODEL_DIR)!r}: "
                             "run 'python -m evaluator.assets.default.train'")
        from streamdata.tokenize import DEFAULT_TOKENIZER

        adapter = load_model(str(DEFAULT_MODEL_DIR), dtype=dtype, device_map=device_map)
        adapter.name = "default"
        return _set_tokenizer_identity(adapter, _tokenizer_identity_of_folder(DEFAULT_TOKENIZER))
    if _FACTORY_RE.match(s) and not os.path.exists(s):
        mod_name, fn_name = s.split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ModelError(f"cannot import {mod_name!r} for model factory {s!r} ({e}): check the module is on PYTHONPATH") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise ModelError(f"{mod_name!r} has no callable {fn_name!r}: pass package.module:factory naming a function")
        made = fn()
        if isinstance(made, (str, os.PathLike)):
            return load_model(made, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map)
        if device_map is not None:
            raise ModelError(f"device_map={device_map!r} applies to models loaded by name, but factory {s!r} returned a "
                             f"{type(made).__name__}: return a folder or hub id from it, or dispatch the model yourself")
        return wrap_model(made, name=s)
    try:
        import transformers
    except ImportError:
        raise ModelError(f"loading {s!r} needs transformers, which is not installed: pip install 'streamdata[hf]'") from None
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    local = Path(os.path.expanduser(s))
    # written as a path (./x, ../x, /x, ~/x, a/b/c): never a hub id, so say what is missing
    # locally instead of the hub's repo-id validation text (or ~25 s of offline retries)
    hint = missing_local_path(s)
    if hint is not None or (local.exists() and not local.is_dir()):
        what = "is a file, not a model folder" if hint is None else f"folder not found{hint}"
        raise ModelError(f"model {s!r}: {what}: pass a folder holding a transformers causal LM (config.json and weights), "
                         "a hub id, 'default' or package.module:factory")
    extra: dict[str, Any] = {}
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise ModelError(f"device_map={device_map!r} needs accelerate, which is not installed: pip install 'streamdata[hf]'")
        # Layers the map offloads to disk ("disk", or "auto" when GPUs and RAM are full) are
        # written by accelerate into a folder of ours, removed with the model (or at once on failure).
        extra = {"device_map": device_map, "offload_folder": tempfile.mkdtemp(prefix="streameval-offload-")}
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(local) if local.is_dir() else s, dtype=torch_dtype,
                                                                  trust_remote_code=trust_remote_code, **extra)
    except Exception as e:  # noqa: BLE001 - unknown id, offline, not a causal LM: all one user error
        if extra:
            shutil.rmtree(extra["offload_folder"], ignore_errors=True)
        first = brief(e)
        raise ModelError(f"cannot load model {s!r} ({first}): pass a transformers causal LM folder or hub id, or package.module:factory") from None
    if extra:
        weakref.finalize(model, shutil.rmtree, extra["offload_folder"], ignore_errors=True)
    identity = _tokenizer_identity_of_folder(local) if local.is_dir() else _tokenizer_identity_of_hub(s)
    return _set_tokenizer_identity(_hf_adapter(model, s, None), identity)
