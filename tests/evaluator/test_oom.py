"""A batch (or chunk) that runs out of device memory is retried smaller, with identical results."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluator import ModelError, StreamingEvaluator

from .helpers import V, Bigram, OOMAbove, TinyRNN, full_nll, tiny_gpt2


def _run(model, x, **kw):
    ev = StreamingEvaluator(model, device="cpu", verbose=False, **kw)
    return ev.evaluate_streaming_with_metrics(x, compute_per_token_metrics=True)


def _same(a, b):
    assert a["total_tokens"] == b["total_tokens"] and a["num_chunks"] == b["num_chunks"]
    np.testing.assert_array_equal(np.asarray(a["per_token_losses"]), np.asarray(b["per_token_losses"]))
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-12)
    np.testing.assert_allclose(a["chunk_losses"], b["chunk_losses"], rtol=1e-12)


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_sliding_batch_oom_is_split(limit):
    x = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0))
    inner = Bigram()
    ref = _run(inner, x, chunk_size=16, overlap=4, batch_size=8)
    wrapped = OOMAbove(inner, max_rows=limit)
    res = _run(wrapped, x, chunk_size=16, overlap=4, batch_size=8)
    assert wrapped.raised > 0
    assert res["batch_size_after_oom"] <= limit
    _same(res, ref)


def test_sliding_oom_on_one_window_is_a_clear_error():
    x = torch.randint(0, V, (100,))
    with pytest.raises(ModelError, match="out of device memory on a single window of chunk_size=16"):
        _run(OOMAbove(Bigram(), max_rows=0), x, chunk_size=16, batch_size=4)


@pytest.mark.parametrize("limit", [1, 5, 16])
def test_stateful_chunk_oom_rolls_back_and_splits(limit):
    """The wrapped model has already advanced its state when it raises: the engine must roll back."""
    x = torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(1))
    inner = TinyRNN("lstm")
    ref = full_nll(inner, x)
    wrapped = OOMAbove(inner, max_len=limit)
    res = _run(wrapped, x, chunk_size=64, mode="stateful")
    assert wrapped.raised > 0
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), ref, rtol=1e-5, atol=1e-6)
    assert res["nll_sum"] == pytest.approx(ref.sum(), rel=1e-5)


def test_kv_cache_chunk_oom_crops_and_splits():
    m = tiny_gpt2(n_positions=256)
    x = torch.randint(0, V, (150,), generator=torch.Generator().manual_seed(2))
    ref = full_nll(m, x)
    ev = StreamingEvaluator(m, chunk_size=64, device="cpu", mode="kv-cache", verbose=False)
    body = ev.adapter.body
    real = body.forward
    raised = []

    def forward(*args, **kw):  # runs (so the cache grows), then reports OOM for long chunks
        out = real(*args, **kw)
        if kw.get("input_ids") is not None and kw["input_ids"].shape[1] > 20:
            raised.append(kw["input_ids"].shape[1])
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return out

    body.forward = forward
    res = ev.evaluate_streaming_with_metrics(x, compute_per_token_metrics=True)
    assert raised
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), ref, rtol=1e-5, atol=1e-5)


def test_sliding_oom_with_a_transformer():
    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.vocab_size = inner, V

        def forward(self, ids):
            return self.inner(ids).logits

    x = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(3))
    inner = Logits(tiny_gpt2(n_positions=64))
    ref = _run(inner, x, chunk_size=32, overlap=8, batch_size=8)
    res = _run(OOMAbove(inner, max_rows=3), x, chunk_size=32, overlap=8, batch_size=8)
    assert res["batch_size_after_oom"] == 2
    # windows are independent: only the matmul blocking of a different batch size may differ
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), np.asarray(ref["per_token_losses"]), rtol=1e-6, atol=1e-6)
    assert res["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-9)
