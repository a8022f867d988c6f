"""evaluator: stream token windows through a language model and report loss, perplexity and the
tokenizer-independent metrics (bits per byte, byte and word perplexity) for sequences of any length.

Pipeline (one module per stage, one direction): data (tensor | store -> windows on the device)
-> models (adapters: sliding | stateful | kv-cache) -> metrics (sliced loss, float64 device sums)
-> engine (the loop, out-of-memory retries, results); compare (a candidate model against a reference on
the same windows: KL divergence, top-1 agreement, both perplexities).
"""

from .compare import compare_streaming
from .config import StreamingEvalConfig
from .data import EvalData, WindowBatch, WindowSpec, open_data
from .engine import RunTuning, StreamingEvaluator, create_streaming_evaluator
from .errors import ConfigError, DataError, EvaluatorError, ModelError
from .metrics import bits_per_byte, byte_perplexity, perplexity, word_perplexity
from .models import DEFAULT_MODEL_DIR, ForwardOutput, ModelAdapter, load_model, wrap_model
from .results import CompareResult, RunResult

__all__ = [
    "CompareResult",
    "ConfigError",
    "DEFAULT_MODEL_DIR",
    "DataError",
    "EvalData",
    "EvaluatorError",
    "ForwardOutput",
    "ModelAdapter",
    "ModelError",
    "RunResult",
    "RunTuning",
    "StreamingEvalConfig",
    "StreamingEvaluator",
    "WindowBatch",
    "WindowSpec",
    "bits_per_byte",
    "byte_perplexity",
    "compare_streaming",
    "create_streaming_evaluator",
    "load_model",
    "open_data",
    "perplexity",
    "word_perplexity",
    "wrap_model",
]
