"""No hidden sync in the hot loop: ``STREAMEVAL_SYNC_DEBUG`` runs the engine's batch loop under
``torch.cuda.set_sync_debug_mode``, lifted only where the loop syncs by design (progress lines,
detail block flushes, per-token block drains, checkpoints).

The CUDA tests (skipped without a GPU) evaluate short streams in sliding, stateful and kv-cache
mode, detailed and not: every synchronizing CUDA call inside the loop is recorded (mode "warn")
and none may come from this project's code; sliding and stateful runs must have none at all, and
also pass in mode "error". The CPU tests check the plumbing: where the mode is set, lifted and
restored, and the one-line error of a bad setting.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluator.engine as engine_mod
from evaluator import StreamingEvaluator
from evaluator.compare import compare_streaming
from evaluator.errors import ConfigError
from evaluator.metrics import PerTokenWriter
from evaluator.progress import Progress
from evaluator.runners import SlidingRunner
from evaluator.sync_debug import SYNC_DEBUG_ENV, SyncDebug

from .helpers import V, Bigram, TinyRNN, tiny_gpt2

ROOT = Path(engine_mod.__file__).resolve().parents[1]
OURS = (str(ROOT / "evaluator"), str(ROOT / "streamdata"))

CASES = [  # (model factory, settings, whether the model's own library code may sync)
    (Bigram, dict(mode="sliding", chunk_size=32, overlap=8, batch_size=4), False),
    (lambda: tiny_gpt2(n_positions=64), dict(mode="sliding", chunk_size=64, overlap=16, batch_size=3), True),
    (lambda: TinyRNN("gru"), dict(mode="stateful", chunk_size=24, doc_mode="document"), False),
    (lambda: tiny_gpt2(n_positions=512), dict(mode="kv-cache", chunk_size=40, doc_mode="document"), True),
    (lambda: tiny_gpt2(n_positions=512), dict(mode="kv-cache", chunk_size=40), True),
]


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(5)
    return [rng.integers(0, V, size=int(n)).tolist() for n in (1, 0, 300, 57, 2, 120, 33)]


def _run(model, store, detailed, **kw):
    ev = StreamingEvaluator(copy.deepcopy(model), device="cuda", verbose=True, log_interval=5, **kw)
    if detailed:
        return ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True)
    return ev.evaluate_streaming(store)


@pytest.mark.cuda
@pytest.mark.parametrize("detailed", [False, True])
@pytest.mark.parametrize("factory, kw, library_may_sync", CASES)
def test_the_loop_has_no_hidden_sync(make_store, docs, monkeypatch, factory, kw, library_may_sync, detailed):
    store = make_store(docs * 8, vocab_size=V)
    model = factory()
    ref = _run(model, store, detailed, **kw)  # warm (lazy CUDA init, first-call syncs of libraries)
    monkeypatch.setenv(SYNC_DEBUG_ENV, "warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = _run(model, store, detailed, **kw)
    assert torch.cuda.get_sync_debug_mode() == 0  # restored after the loop
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    ours = [f"{w.filename}:{w.lineno}: {str(w.message)[:80]}" for w in syncs if w.filename.startswith(OURS)]
    assert not ours, "syncs inside the loop from our code:\n" + "\n".join(ours)
    if not library_may_sync:
        assert not syncs, [f"{w.filename}:{w.lineno}" for w in syncs]
        monkeypatch.setenv(SYNC_DEBUG_ENV, "error")  # and the strict mode passes too
        res = _run(model, store, detailed, **kw)
    assert res["total_tokens"] == ref["total_tokens"] and res["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-6)


# ---- the plumbing, on any machine ----------------------------------------------------------------
class _FakeMode:
    """Stands in for torch.cuda's sync debug mode (a CPU build has none)."""

    def __init__(self):
        self.mode, self.calls = 0, []

    def set(self, mode):
        self.mode = {"default": 0, "warn": 1, "error": 2}.get(mode, mode)
        self.calls.append(self.mode)

    def get(self):
        return self.mode


@pytest.fixture
def fake_mode(monkeypatch):
    f = _FakeMode()
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", f.set)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", f.get)
    return f


def test_set_lifted_and_restored(fake_mode):
    fake_mode.mode = 1  # a caller's own setting comes back afterwards
    d = SyncDebug(2)
    with d:
        assert fake_mode.mode == 2
        with d.allowed():
            assert fake_mode.mode == 0
        assert fake_mode.mode == 2
        with pytest.raises(KeyError), d.allowed():
            raise KeyError("x")
        assert fake_mode.mode == 2
    assert fake_mode.mode == 1
    with pytest.raises(ValueError), d:
        raise ValueError("an error in the loop")
    assert fake_mode.mode == 1


def test_the_engine_checks_the_loop_and_lifts_the_designed_syncs(fake_mode, make_store, docs, monkeypatch):
    # on the CPU the environment's setting is inert; pass the mode in to see where the engine applies it
    seen = {"step": set(), "update": set()}
    real_step, real_update = SlidingRunner.step, Progress.update

    def step(self, batch):
        seen["step"].add(fake_mode.mode)
        return real_step(self, batch)

    def update(self, *a, **k):
        seen["update"].add(fake_mode.mode)
        return real_update(self, *a, **k)

    monkeypatch.setattr(SlidingRunner, "step", step)
    monkeypatch.setattr(Progress, "update", update)
    # per-token blocks of 16 values: the writer's syncs happen inside the steps, and are lifted
    drains, real_init, real_pwrite = [], PerTokenWriter.__init__, PerTokenWriter._pwrite
    monkeypatch.setattr(PerTokenWriter, "__init__", lambda self, *a, **k: real_init(self, *a, **{**k, "block": 16}))
    monkeypatch.setattr(PerTokenWriter, "_pwrite", lambda self, v: drains.append(fake_mode.mode) or real_pwrite(self, v))
    store = make_store(docs, vocab_size=V)
    ev = StreamingEvaluator(Bigram(), device="cpu", verbose=False, mode="sliding", chunk_size=32, batch_size=2)
    res = ev.run(store, detailed=True, per_token=True, sync_debug=SyncDebug(2))
    assert res["total_tokens"] > 0
    assert seen == {"step": {2}, "update": {0}}
    assert fake_mode.mode == 0 and fake_mode.calls[0] == 2
    assert len(drains) > 2 and set(drains) == {0}
    # a comparison writes one column of its statistics through a wrapper: lifted all the same
    drains.clear()
    assert compare_streaming(Bigram(), Bigram(), store, device="cpu", verbose=False, mode="sliding", chunk_size=32,
                             batch_size=2, sync_debug=SyncDebug(2))["total_tokens"] == res["total_tokens"]
    assert len(drains) > 2 and set(drains) == {0}


def test_inert_off_cuda_and_bad_values_are_one_line(fake_mode, make_store, docs, monkeypatch):
    store = make_store(docs, vocab_size=V)
    monkeypatch.setenv(SYNC_DEBUG_ENV, "error")
    ev = StreamingEvaluator(Bigram(), device="cpu", verbose=False, mode="sliding", chunk_size=32)
    assert ev.evaluate_streaming(store)["total_tokens"] > 0
    assert fake_mode.calls == []  # nothing to check on a CPU: never set
    monkeypatch.setenv(SYNC_DEBUG_ENV, "loud")
    with pytest.raises(ConfigError, match=r"STREAMEVAL_SYNC_DEBUG='loud' is not one of warn, error"):
        ev.evaluate_streaming(store)
