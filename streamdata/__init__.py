"""streamdata: tokenize a Hugging Face dataset once into memory-mapped token shards, then stream
overlapping chunk windows from disk to the GPU in bounded memory.

Pipeline (one module per stage): source -> tokenize -> writer -> format/store -> windows -> loader.
"""

from .convert import convert_store
from .errors import ConfigError, SourceError, StoreError, StreamdataError, TokenizerError
from .format import Manifest, ShardInfo
from .imports import open_megatron, open_raw_bin
from .store import TokenStore, open_store
from .tokenize import TokenizeConfig, load_tokenizer, tokenize_dataset

__all__ = [
    "ConfigError",
    "Manifest",
    "ShardInfo",
    "SourceError",
    "StoreError",
    "StreamdataError",
    "TokenStore",
    "TokenizeConfig",
    "TokenizerError",
    "convert_store",
    "load_tokenizer",
    "open_megatron",
    "open_raw_bin",
    "open_store",
    "tokenize_dataset",
]

__version__ = "0.1.0"
