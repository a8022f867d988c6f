"""streamdata: tokenize a Hugging Face dataset once into memory-mapped token shards, then stream
overlapping chunk windows from disk to the GPU in bounded memory.

Pipeline (one module per stage): source -> tokenize -> writer -> format/store -> windows -> loader;
merge joins the stores of a partitioned tokenize (``--num-parts``).
"""

from .backends import TokenStore, open_store
from .backends.datatrove import open_datatrove
from .backends.litdata import open_litdata
from .backends.megatron import open_megatron
from .backends.raw_bin import open_raw_bin
from .convert import convert_store
from .export import export_store
from .errors import ConfigError, SourceError, StoreError, StreamdataError, TokenizerError
from .format import Manifest, ShardInfo
from .merge import MergeConfig, merge_parts
from .tokenize import TokenizeConfig, load_tokenizer, tokenize_dataset
from .windows import WindowPlan, WindowSpec, plan_windows

__all__ = [
    "ConfigError",
    "Manifest",
    "MergeConfig",
    "ShardInfo",
    "SourceError",
    "StoreError",
    "StreamdataError",
    "TokenStore",
    "TokenizeConfig",
    "TokenizerError",
    "WindowBatch",
    "WindowLoader",
    "WindowPlan",
    "WindowSpec",
    "convert_store",
    "export_store",
    "load_tokenizer",
    "merge_parts",
    "open_datatrove",
    "open_litdata",
    "open_megatron",
    "open_raw_bin",
    "open_store",
    "plan_windows",
    "tokenize_dataset",
]

__version__ = "0.1.0"

_LAZY = {"WindowBatch": "loader", "WindowLoader": "loader"}


def __getattr__(name: str):
    # The loader needs torch; importing it lazily keeps `streamdata info/verify/tokenize` and
    # data-only users free of torch's ~1-2 s import.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'streamdata' has no attribute {name!r}")
