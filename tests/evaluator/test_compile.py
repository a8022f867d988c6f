"""``compile`` (``--compile``): torch.compile of the model body with static shapes in sliding mode.

The plumbing tests trace the real graph with dynamo's ``aot_eager`` backend (graph capture and AOT
tracing, no code generation: seconds on a CPU). The inductor test generates kernels with the
machine's C++ compiler (about a minute on a 2-core CPU), so it runs only with
``STREAMEVAL_TEST_INDUCTOR=1`` (benchmarks.gpu_check sets it on the GPU machine).
"""

from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest
import torch

import evaluator.models as models_mod
from evaluator import StreamingEvaluator
from evaluator.cli import build_parser, main
from evaluator.config import StreamingEvalConfig
from evaluator.errors import ConfigError, ModelError

from .helpers import V, Bigram, tiny_gpt2

DOCS_LENS = (1, 0, 150, 57, 2, 120, 33, 64, 65)  # short windows, empty and one-token documents


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(11)
    return [rng.integers(0, V, size=n).tolist() for n in DOCS_LENS]


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setenv("STREAMEVAL_COMPILE_BACKEND", "aot_eager")


def _run(model, data, **kw):
    ev = StreamingEvaluator(copy.deepcopy(model), device="cpu", verbose=False, **kw)
    shapes = []
    real = ev.adapter.forward_windows

    def record(inputs):  # what the runner feeds the (compiled) forward
        shapes.append((tuple(inputs.shape), inputs.is_contiguous()))
        return real(inputs)

    ev.adapter.forward_windows = record
    res = ev.evaluate_streaming_with_metrics(data, compute_per_token_metrics=True)
    return res, shapes, ev


def _same_as_eager(eager, comp, rel):
    assert comp["total_tokens"] == eager["total_tokens"] and comp["num_chunks"] == eager["num_chunks"]
    assert comp["loss"] == pytest.approx(eager["loss"], rel=rel)
    np.testing.assert_allclose(np.asarray(comp["per_token_losses"]), np.asarray(eager["per_token_losses"]),
                               rtol=rel, atol=rel)
    np.testing.assert_array_equal(comp["per_document"]["tokens"], eager["per_document"]["tokens"])


CASES = [  # (model factory, settings): the body split (GPT-2) and a whole module (Bigram)
    (lambda: tiny_gpt2(n_positions=64), dict(chunk_size=64, overlap=16, batch_size=4)),
    (lambda: tiny_gpt2(n_positions=64), dict(chunk_size=32, overlap=0, batch_size=3, doc_mode="document", bos=0)),
    (Bigram, dict(chunk_size=32, overlap=8, batch_size=5, tail="short")),
]


@pytest.mark.parametrize("factory, kw, mode", [(*CASES[0], "default"), (*CASES[1], "reduce-overhead"),
                                                (*CASES[2], "default")])
def test_compiled_equals_eager_with_one_static_shape(aot_eager, make_store, docs, factory, kw, mode):
    model = factory()
    store = make_store(docs, vocab_size=V)
    eager, eager_shapes, _ = _run(model, store, mode="sliding", **kw)
    comp, shapes, ev = _run(model, store, mode="sliding", compile=mode, **kw)
    _same_as_eager(eager, comp, 1e-5)
    assert comp["compile"] == mode and eager["compile"] is None
    # every forward had the one static shape [rows, chunk_size], contiguous; the eager run trims
    # short batches (so the plan here does have short windows and a short last batch)
    L, B = kw["chunk_size"], kw["batch_size"]
    rows = min(B, comp["num_chunks"])
    assert set(shapes) == {((rows, L), True)}
    assert len({s for s, _ in eager_shapes}) > 1
    assert ev.adapter.compile_mode is None  # eager again after the run (a shared adapter stays eager)


def test_padded_rows_and_columns_are_never_scored(aot_eager, make_store):
    """A model whose logits on padding (id 0) are huge would show any padding that was scored."""

    class Loud(Bigram):
        def forward(self, x):
            return super().forward(x) + (x == 0).unsqueeze(-1).float() * 1e4 * torch.arange(V, dtype=torch.float32)

    docs = [[1 + (i * 7 + j) % (V - 1) for j in range(n)] for i, n in enumerate((40, 9, 3, 77))]  # no id 0
    store = make_store(docs, vocab_size=V)
    kw = dict(mode="sliding", chunk_size=16, batch_size=4, doc_mode="document")
    eager, _, _ = _run(Loud(), store, **kw)
    comp, shapes, _ = _run(Loud(), store, compile=True, **kw)
    assert {s for s, _ in shapes} == {(4, 16)}
    _same_as_eager(eager, comp, 1e-6)
    assert eager["loss"] < 10  # nothing of the 1e4 padding logits reached the sums


def test_compile_failure_is_one_line(make_store, docs, monkeypatch, capsys):
    def broken(module, **kw):
        def call(*a, **k):
            raise RuntimeError("backend exploded\nsecond line of the traceback text")
        return call

    monkeypatch.setattr(models_mod.torch, "compile", broken)
    store = make_store(docs, vocab_size=V)
    ev = StreamingEvaluator(tiny_gpt2(n_positions=64), device="cpu", verbose=False, mode="sliding", chunk_size=32,
                            compile="default")
    with pytest.raises(ModelError) as e:
        ev.evaluate_streaming(store)
    msg = str(e.value)
    assert "\n" not in msg and "torch.compile" in msg and "backend exploded" in msg
    assert ev.adapter.name in msg and "leave compile unset" in msg and "[" in msg
    rc = main(["run", str(store), "--model", "tests.evaluator.helpers:Bigram", "--chunk-size", "32", "--mode", "sliding",
               "--device", "cpu", "--quiet", "--compile"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "torch.compile" in err and "omit --compile" in err


def test_an_unusable_backend_is_one_line(make_store, docs, monkeypatch):
    monkeypatch.setenv("STREAMEVAL_COMPILE_BACKEND", "no-such-backend")
    ev = StreamingEvaluator(Bigram(), device="cpu", verbose=False, mode="sliding", chunk_size=32, compile=True)
    with pytest.raises(ModelError, match=r"torch.compile \(mode 'default', backend 'no-such-backend'\) failed .*"
                                         r"leave compile unset"):
        ev.evaluate_streaming(make_store(docs, vocab_size=V))
    assert ev.adapter.compile_mode is None


def test_out_of_memory_in_a_compiled_forward_is_retried(aot_eager, make_store, docs, monkeypatch):
    """OOM stays an OOM (the runner halves the batch), not a compile failure; halves are padded too."""
    store = make_store(docs, vocab_size=V)
    kw = dict(mode="sliding", chunk_size=32, overlap=8, batch_size=4)
    eager, _, _ = _run(Bigram(), store, **kw)
    ev = StreamingEvaluator(Bigram(), device="cpu", verbose=False, compile="default", **kw)
    real = ev.adapter.forward_windows
    shapes = []

    def oom_on_big(inputs):
        shapes.append(tuple(inputs.shape))
        if inputs.shape[0] > 2:
            raise torch.OutOfMemoryError("fake: out of memory")
        return real(inputs)

    ev.adapter.forward_windows = oom_on_big
    res = ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True)
    assert res["batch_size_after_oom"] == 2 and set(shapes[1:]) == {(2, 32)}
    _same_as_eager(eager, res, 1e-6)


def test_settings_errors_and_cli(make_store, docs):
    assert StreamingEvalConfig(compile=True).compile == "default"
    assert StreamingEvalConfig(compile=False).compile is None
    with pytest.raises(ConfigError, match=r"compile='fast' is not one of default, reduce-overhead"):
        StreamingEvalConfig(compile="fast")
    with pytest.raises(ConfigError, match=r"applies to mode 'sliding'.*mode='kv-cache'"):
        StreamingEvalConfig(compile="default", mode="kv-cache")
    # auto resolving to a carried mode: refused before any work, naming the resolved mode
    store = make_store(docs, vocab_size=V)
    ev = StreamingEvaluator(tiny_gpt2(n_positions=512), device="cpu", verbose=False, chunk_size=32, compile=True)
    with pytest.raises(ConfigError, match=r"resolved mode 'kv-cache'.*pass mode='sliding'"):
        ev.evaluate_streaming(store)
    p = build_parser()
    assert p.parse_args(["run", "s", "--model", "m"]).compile is None
    assert p.parse_args(["run", "s", "--model", "m", "--compile"]).compile == "default"
    assert p.parse_args(["run", "s", "--model", "m", "--compile", "reduce-overhead"]).compile == "reduce-overhead"


def test_a_checkpoint_records_compile(aot_eager, make_store, docs, tmp_path):
    """Compiled kernels round differently: an eager run's checkpoint is never continued compiled."""
    store = make_store(docs, vocab_size=V)
    kw = dict(mode="sliding", chunk_size=32, batch_size=2, device="cpu", verbose=False)
    StreamingEvaluator(Bigram(), checkpoint_dir=str(tmp_path / "ck"), **kw).evaluate_streaming(store)
    with pytest.raises(ConfigError, match=r"differs in: compile"):
        StreamingEvaluator(Bigram(), checkpoint_dir=str(tmp_path / "ck"), compile=True, **kw).evaluate_streaming(store)


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.skipif(os.environ.get("STREAMEVAL_TEST_INDUCTOR") != "1",
                    reason="inductor code generation takes ~1 min on a 2-core CPU: set STREAMEVAL_TEST_INDUCTOR=1")
@pytest.mark.skipif(_cxx() is None, reason="inductor's CPU backend needs a C++ compiler (none on PATH)")
def test_inductor_compiled_equals_eager_fp32(make_store, docs, monkeypatch):
    monkeypatch.delenv("STREAMEVAL_COMPILE_BACKEND", raising=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    store = make_store(docs, vocab_size=V)
    kw = dict(mode="sliding", chunk_size=64, overlap=16, batch_size=4)
    model = tiny_gpt2(n_positions=64)
    eager = StreamingEvaluator(copy.deepcopy(model), device=dev, verbose=False, **kw) \
        .evaluate_streaming_with_metrics(store, compute_per_token_metrics=True)
    # CUDA: reduce-overhead (inductor kernels and CUDA graphs; bench_eval --compile runs "default"
    # there); CPU: default (CUDA graphs do not apply)
    for mode in ["reduce-overhead"] if dev == "cuda" else ["default"]:
        comp = StreamingEvaluator(copy.deepcopy(model), device=dev, verbose=False, compile=mode, **kw) \
            .evaluate_streaming_with_metrics(store, compute_per_token_metrics=True)
        _same_as_eager(eager, comp, 1e-5)
