"""Typed settings of one streaming evaluation, validated on construction.

Every error names the offending value and the fix in one line (the CLI prints it as is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from streamdata.windows import DOC_MODES, TAILS, check_window_rules

from .errors import ConfigError

__all__ = ["StreamingEvalConfig", "check_max_tokens", "MODES", "COMPILE_MODES", "DOC_MODES", "DTYPES", "TAILS", "resolve_device"]

MODES = ("auto", "sliding", "stateful", "kv-cache")  # how the model reads the windows (not the window rules)
# TAILS and DOC_MODES are streamdata.windows' (the window rules' one owner), re-exported here.
DTYPES = ("float32", "bfloat16", "float16")
# torch.compile modes offered for the model body (sliding mode): "default" (inductor kernels) and
# "reduce-overhead" (the same plus CUDA graphs: a fixed-shape batch replays one recorded graph).
COMPILE_MODES = ("default", "reduce-overhead")
_BOS_WORDS = ("none", "model", "eos")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' named strategies


@dataclass
class StreamingEvalConfig:
    """Settings of a :class:`~evaluator.StreamingEvaluator`.

    The first six fields are those of the original quick reference (same names, same meaning);
    the rest are additions. Units: tokens unless said otherwise.
    """

    # Window length L: inputs x[s:s+L] predict targets x[s+1:s+L+1]. None (the default, for every
    # entry point): the model's context length from its config (n_positions,
    # max_position_embeddings, ...); a model without one needs an explicit chunk_size.
    chunk_size: int | None = None
    # Sliding mode only: targets each window re-reads as context (scored by the window before).
    # Windows advance by chunk_size - overlap. Stateful and kv-cache modes carry the whole past
    # instead, so they need overlap == 0.
    overlap: int = 0
    # Sliding mode only: the last window of each stream (document). "full": right-aligned to the
    # stream's end with chunk_size inputs, scoring only targets not scored yet (lm-evaluation-harness's
    # rolling windows: more context for the tail, same cost); "short": cut short at the stream's end
    # (the transformers perplexity guide). Carried modes feed each token once, so the tail is "short".
    tail: str = "full"
    max_tokens: int | None = None  # evaluate only the stream's first max_tokens tokens
    device: str | None = None  # None: "cuda" when available, else "cpu"
    # A model loaded by name, spread over devices by transformers' device_map (needs accelerate):
    # "auto", "balanced", "balanced_low_0", "sequential", or {module name: device} ("disk": offloaded).
    # The model stays where the map puts it; windows go to its first device (leave device unset).
    device_map: Union[str, dict, None] = None
    verbose: bool = True  # progress lines on stderr every log_interval chunks
    log_interval: int = 10  # chunks (windows) between progress lines; each line syncs the device once
    # auto: stateful protocol or recurrent model (RWKV) -> stateful; transformers attention model
    # whose context holds every stream -> kv-cache; otherwise sliding. With overlap > 0, auto means
    # sliding (overlap is a sliding-window setting).
    mode: str = "auto"
    # stream: the store is one token stream (documents joined by their EOS ids), context crosses
    # documents. document: every document is evaluated on its own (state/cache reset at its start).
    doc_mode: str = "stream"
    # Windows per forward in sliding mode. In stateful and kv-cache mode with doc_mode "document":
    # documents run side by side, each with its own carried state or cache; doc_mode "stream" is one
    # stream: 1. "auto": measured on the run's first forwards within a memory bound (free GPU memory,
    # or available RAM capped at 64), the fastest kept (evaluator/autobatch.py; compiled on a CPU: a
    # fixed 2048 // chunk_size). A batch that runs out of device memory is retried in halves.
    batch_size: Union[int, str] = "auto"
    # "bfloat16"/"float16": autocast for the model (a model given by name is also loaded in this
    # dtype); the loss is always computed in fp32 and summed in fp64.
    dtype: str = "float32"
    # Scored tokens whose logits are materialised at once (rows of the [tokens, vocab] fp32 matrix).
    # 4096 x a 50k vocabulary = 0.8 GB of fp32 logits plus as much for log-softmax.
    loss_slice: int = 4096
    # Sliding mode: torch.compile the model body (the transformer body when the head is applied per
    # loss slice, else the whole module) with static shapes: every forward is [batch_size, chunk_size]
    # (short windows and the last batch are padded, the padding unscored), so one graph is compiled
    # (one more per halving after an out-of-memory error). None/False: eager; True or "default";
    # "reduce-overhead" adds CUDA graphs. Compiled kernels round differently: results equal the
    # eager run to the dtype's tolerance, and a checkpoint records the choice.
    compile: Union[str, bool, None] = None
    # BOS prefix: None/"none" (the first token of each stream/document is context only), an int id,
    # "model" (the model config's bos_token_id) or "eos" (the store's EOS id, GPT-2's convention).
    # Stream mode prefixes the whole stream once; document mode prefixes every document, so its
    # first token is scored too. The choice is recorded in the results.
    bos: Union[str, int, None] = None
    # Per-token losses (float32, nats) go to this file as a raw memmap; None: a temporary file.
    per_token_path: str | None = None
    # Refuse a store whose tokenizer differs from the model's when both are known: compared by what
    # decides the ids (evaluator/resolve.py). CLI: --no-check-tokenizer.
    check_tokenizer: bool = True
    # Crash-safe runs: a folder for checkpoint.pt (see evaluator/checkpoint.py). A rerun with the
    # same data, model and settings resumes from it and gives the uninterrupted result; another
    # run's checkpoint there is refused. None: no checkpoint.
    checkpoint_dir: str | None = None
    # Seconds between checkpoints (written at batch boundaries, and once at the end); 0: only at the end.
    checkpoint_interval: float = 60.0
    # Several processes (torchrun), doc_mode "stream", mode stateful or kv-cache: one state carried
    # through the whole stream cannot be split exactly, so such a run is refused unless this is set.
    # K >= 0: an approximation, each rank after the first restarts the state at its block and first
    # feeds the K tokens before the block, unscored (preceded by the BOS id when the warm-up reaches the
    # stream's start and the run prepends one: then, K >= the block's start, the result is exact). Every
    # target is still scored once; the first targets of each later block see at most K tokens of
    # context (kv-cache: at positions counted from the warm-up). Results record it. One process: unused.
    split_warmup: int | None = None

    def __post_init__(self):
        # The window rules are streamdata's WindowSpec's (one owner, one message per value): checked
        # here for the fields known now; chunk_size=None (the model's context length) is resolved
        # later (evaluator.resolve), where the spec itself is built and checks overlap < chunk_size.
        check_window_rules(chunk_size=self.chunk_size, overlap=self.overlap, doc_mode=self.doc_mode, tail=self.tail,
                           max_tokens=self.max_tokens)
        # An evaluation rule on top of the window rule (max_tokens >= 0): fewer than 2 tokens score nothing.
        check_max_tokens(self.max_tokens)
        if not isinstance(self.log_interval, int) or self.log_interval < 1:
            raise ConfigError(f"log_interval={self.log_interval!r} must be an int >= 1")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode in ("stateful", "kv-cache") and self.overlap:
            raise ConfigError(
                f"overlap={self.overlap} does not apply to mode={self.mode!r} (it carries the whole past): "
                "pass overlap=0, or mode='sliding'"
            )
        bs = self.batch_size
        if bs != "auto" and (isinstance(bs, bool) or not isinstance(bs, int) or bs < 1):
            raise ConfigError(f"batch_size={bs!r} must be an int >= 1 or 'auto'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if isinstance(self.loss_slice, bool) or not isinstance(self.loss_slice, int) or self.loss_slice < 1:
            raise ConfigError(f"loss_slice={self.loss_slice!r} must be an int >= 1 (scored tokens per loss slice), e.g. 4096")
        if self.compile is True:
            self.compile = "default"
        elif self.compile is False or self.compile == "none":
            self.compile = None
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ConfigError(f"compile={self.compile!r} is not one of {', '.join(COMPILE_MODES)} (or None/False: eager)")
        if self.compile is not None and self.mode in ("stateful", "kv-cache"):
            raise ConfigError(f"compile={self.compile!r} applies to mode 'sliding' (fixed-shape batches), not "
                              f"mode={self.mode!r}: pass mode='sliding', or leave compile unset")
        b = self.bos
        if b is None:
            self.bos = "none"
        elif isinstance(b, bool) or not (isinstance(b, int) and b >= 0 or b in _BOS_WORDS):
            raise ConfigError(f"bos={b!r} must be None/'none', 'model', 'eos' or a token id >= 0")
        dm = self.device_map
        if dm is not None and not (isinstance(dm, dict) and dm or dm in DEVICE_MAPS):
            raise ConfigError(f"device_map={dm!r} is not a device map: pass one of {', '.join(DEVICE_MAPS)}, or a "
                              "dict {module name: device}, e.g. {'model.layers.0': 0, ...}")
        if self.device is not None and not isinstance(self.device, str):
            self.device = str(self.device)  # accept torch.device
        ci = self.checkpoint_interval
        if isinstance(ci, bool) or not isinstance(ci, (int, float)) or not ci >= 0:
            raise ConfigError(f"checkpoint_interval={ci!r} must be a number of seconds >= 0 (0: only at the end)")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)
        sw = self.split_warmup
        if sw is not None and (isinstance(sw, bool) or not isinstance(sw, int) or sw < 0):
            raise ConfigError(f"split_warmup={sw!r} must be an int >= 0 (tokens of warm-up context): pass one, or leave split_warmup unset")


def resolve_device(spec: str | None):
    """``None`` -> cuda when available, else cpu. A device that is not there is a ConfigError.
    The one resolver is :func:`streamdata.loader.resolve_device`; imported here on call, so that
    importing this config module does not import torch."""
    from streamdata.loader import resolve_device as resolve

    return resolve(spec)


def check_max_tokens(value: object) -> None:
    """The evaluation's rule on top of the window rule (``max_tokens >= 0``): fewer than 2 tokens
    score nothing. One home for the config and a call's own ``max_tokens=``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
        raise ConfigError(f"max_tokens={value!r} must be an integer >= 2 (one input and one target): pass more, "
                          "or leave max_tokens unset (the whole store)")
