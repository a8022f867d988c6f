"""The evaluator on CUDA (skipped without a GPU): the same numbers as on the CPU for store and
tensor input in every mode, no host sync in the hot loop, and per-chunk times measured on the
evaluation's own device.

Run with the CUDA sanitizer too (README, set-up): ``TORCH_CUDA_SANITIZER=1 pytest -m cuda``.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

import evaluator.engine as engine_mod
import evaluator.runners as runners_mod
import evaluator.metrics as metrics_mod
from evaluator import StreamingEvaluator
from evaluator.scoring import NLL
from evaluator.runners import CarriedRunner, SlidingRunner

from .helpers import V, Bigram, TinyRNN, tiny_gpt2

pytestmark = pytest.mark.cuda

CASES = [  # (model factory, settings)
    (Bigram, dict(mode="sliding", chunk_size=32, overlap=8, batch_size=4)),
    (Bigram, dict(mode="sliding", chunk_size=32, overlap=0, batch_size=3, doc_mode="document", bos=5)),
    (lambda: TinyRNN("gru"), dict(mode="stateful", chunk_size=24)),
    (lambda: TinyRNN("lstm"), dict(mode="stateful", chunk_size=24, doc_mode="document")),
    (lambda: tiny_gpt2(n_positions=512), dict(mode="kv-cache", chunk_size=40, doc_mode="document")),
    (lambda: tiny_gpt2(n_positions=64), dict(mode="sliding", chunk_size=64, overlap=16, batch_size=5)),
]


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(3)
    return [rng.integers(0, V, size=int(n)).tolist() for n in (1, 0, 300, 57, 2, 120, 33)]


def _evaluate(model, data, device, **kw):
    ev = StreamingEvaluator(copy.deepcopy(model), device=device, verbose=False, **kw)
    return ev.evaluate_streaming_with_metrics(data, compute_per_token_metrics=True)


def _same(cpu, gpu):
    assert gpu["device"].startswith("cuda")
    assert cpu["total_tokens"] == gpu["total_tokens"] and cpu["num_chunks"] == gpu["num_chunks"]
    assert gpu["nll_sum"] == pytest.approx(cpu["nll_sum"], rel=1e-5)
    np.testing.assert_array_equal(cpu["per_document"]["tokens"], gpu["per_document"]["tokens"])
    np.testing.assert_allclose(np.asarray(gpu["per_token_losses"]), np.asarray(cpu["per_token_losses"]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factory, kw", CASES)
def test_cuda_equals_cpu_for_store_and_tensor_input(make_store, docs, factory, kw):
    model = factory()
    store = make_store(docs, vocab_size=V)
    _same(_evaluate(model, store, "cpu", **kw), _evaluate(model, store, "cuda", **kw))
    if kw.get("doc_mode", "stream") == "stream":
        flat = torch.tensor([t for d in docs for t in d])
        _same(_evaluate(model, flat, "cpu", **kw), _evaluate(model, flat.cuda(), "cuda", **kw))


@pytest.mark.parametrize("factory, kw", [c for c in CASES if c[1]["mode"] != "kv-cache"])
def test_the_loop_never_syncs_the_host(make_store, docs, monkeypatch, factory, kw):
    """The whole loop (loader batches, forward, loss, sums) runs under sync debug mode 'error';
    only the progress lines and the final total may sync."""
    store = make_store(docs * 20, vocab_size=V)
    cls = SlidingRunner if kw["mode"] == "sliding" else CarriedRunner
    real_step, real_total = cls.step, metrics_mod.MetricSums.total
    steps = []

    def step(self, batch):
        torch.cuda.set_sync_debug_mode("error")  # from the first step on (the loader's next() included)
        steps.append(1)
        return real_step(self, batch)

    def total(self):  # progress lines and the final total: the allowed syncs
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real_total(self)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(cls, "step", step)
    monkeypatch.setattr(metrics_mod.MetricSums, "total", total)
    try:
        ev = StreamingEvaluator(factory(), device="cuda", verbose=True, log_interval=7, **kw)
        res = ev.evaluate_streaming(store)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(steps) > 3 and res["total_tokens"] > 0


def test_chunk_times_are_measured_on_the_evaluation_device(make_store, docs):
    """Events used to be recorded on the current device's stream (cuda:0) whatever the device."""
    dev = f"cuda:{torch.cuda.device_count() - 1}"
    store = make_store(docs * 10, vocab_size=V)
    model = tiny_gpt2(n_positions=64)
    res = StreamingEvaluator(model, device=dev, verbose=False, chunk_size=64, batch_size=2) \
        .evaluate_streaming_with_metrics(store)
    times = np.asarray(res["chunk_times"])
    assert len(times) == res["num_chunks"] and (times > 0).all()
    # the batches' device time cannot exceed the wall time of the whole run
    assert times.sum() <= res["total_time"] * 1.05
    if torch.cuda.device_count() > 1:
        assert torch.cuda.memory_allocated(0) == 0, "a run on another GPU touched cuda:0"


def test_oom_retry_on_a_real_device(make_store, docs, monkeypatch):
    """An OOM from the real allocator mid-step (in the loss) is retried with identical results."""
    store = make_store(docs * 5, vocab_size=V)
    kw = dict(chunk_size=32, overlap=8, batch_size=8)
    ref = _evaluate(Bigram(), store, "cuda", **kw)
    real = runners_mod.token_nll

    def big_alloc_first(out, targets, flat, loss_slice):
        if targets.shape[0] > 2:
            torch.empty(1 << 50, dtype=torch.uint8, device=targets.device)  # raises OutOfMemoryError
        return real(out, targets, flat, loss_slice)

    ev = StreamingEvaluator(Bigram(), device="cuda", verbose=False, **kw)
    res = ev.run(store, per_token=True, scoring=dataclasses.replace(NLL, score=big_alloc_first))
    assert res["batch_size_after_oom"] == 2 and res["total_tokens"] == ref["total_tokens"]
    assert res["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-12)
