"""Chunked evaluation equals the full-sequence forward (kv-cache, stateful), and sliding windows
equal a brute-force per-target reference: for ids given as a tensor and as a store on disk, which
both go through streamdata's WindowLoader and must give identical results."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluator import StreamingEvaluator

from .helpers import V, Bigram, TinyRNN, brute_sliding_nll, full_nll, tiny_gpt2, tiny_rwkv

CHUNKS = [1, 2, 3, 5, 8, 13, 32, 64, 100, 150, 1000]


def _check(res, ref: np.ndarray):
    assert res["total_tokens"] == len(ref)
    assert res["nll_sum"] == pytest.approx(ref.sum(), rel=1e-5)
    assert res["loss"] == pytest.approx(ref.mean(), rel=1e-5)
    assert res["perplexity"] == pytest.approx(np.exp(ref.mean()), rel=1e-5)


def _tokens(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["tensor", "store"])
def as_input(request, make_store):
    """The same ids as the evaluator's input: the tensor itself, or a store on disk holding them."""
    if request.param == "tensor":
        return lambda x: x
    return lambda x: make_store([x.tolist()], vocab_size=V, shard_tokens=61)  # windows cross shards


@pytest.mark.parametrize("chunk", CHUNKS)
def test_gpt2_kv_cache_matches_full_forward(chunk, as_input):
    m = tiny_gpt2(n_positions=256)
    x = _tokens(200)
    ref = full_nll(m, x)
    ev = StreamingEvaluator(m, chunk_size=chunk, device="cpu", mode="kv-cache", verbose=False)
    res = ev.evaluate_streaming_with_metrics(as_input(x), compute_per_token_metrics=True)
    assert res["mode"] == "kv-cache"
    assert res["num_chunks"] == -(-199 // chunk)
    _check(res, ref)
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 64, 149, 500])
def test_rwkv_stateful_matches_full_forward(chunk, as_input):
    m = tiny_rwkv()
    x = _tokens(150, seed=2)
    ref = full_nll(m, x)
    ev = StreamingEvaluator(m, chunk_size=chunk, device="cpu", verbose=False)  # auto -> stateful
    res = ev.evaluate_streaming(as_input(x))
    assert res["mode"] == "stateful"
    _check(res, ref)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("chunk", [1, 2, 5, 17, 64, 299, 4096])
def test_stateful_protocol_matches_full_forward(cell, chunk, as_input):
    m = TinyRNN(cell)
    x = _tokens(300, seed=3)
    ref = full_nll(m, x)
    ev = StreamingEvaluator(m, chunk_size=chunk, device="cpu", verbose=False)
    res = ev.evaluate_streaming_with_metrics(as_input(x), compute_per_token_metrics=True)
    assert res["mode"] == "stateful"
    _check(res, ref)
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: TinyRNN("gru"), tiny_rwkv, tiny_gpt2], ids=["gru", "rwkv", "gpt2"])
def test_losing_context_would_be_detected(make):
    """Guard against vacuous exactness tests: without carried context the result moves far more
    than their tolerance (1e-5 relative)."""
    m = make()
    x = _tokens(150, seed=3)
    ref = full_nll(m, x)
    res = StreamingEvaluator(m, chunk_size=16, device="cpu", mode="sliding", verbose=False).evaluate_streaming(x)
    assert abs(res["nll_sum"] - ref.sum()) > 1e-3 * ref.sum()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 70), chunk=st.integers(1, 24), ov_frac=st.floats(0, 0.95), seed=st.integers(0, 10**6),
       tail=st.sampled_from(["full", "short"]))
def test_sliding_matches_brute_force(n, chunk, ov_frac, seed, tail, as_input):
    overlap = min(chunk - 1, int(ov_frac * chunk))
    m = tiny_gpt2(n_positions=32)
    x = _tokens(n, seed=seed)
    ref = brute_sliding_nll(m, x, chunk, overlap, tail)
    ev = StreamingEvaluator(m, chunk_size=chunk, overlap=overlap, device="cpu", mode="sliding", batch_size=3,
                            verbose=False, tail=tail)
    res = ev.evaluate_streaming_with_metrics(as_input(x), compute_per_token_metrics=True)
    assert res["total_tokens"] == n - 1
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), ref, rtol=1e-5, atol=1e-5)
    assert res["nll_sum"] == pytest.approx(ref.sum(), rel=1e-5)


@pytest.mark.parametrize("loss_slice", [1, 7, 4096])
def test_loss_slices_do_not_change_results(loss_slice):
    m = tiny_gpt2(n_positions=64)
    x = _tokens(180, seed=4)
    base = StreamingEvaluator(m, chunk_size=48, overlap=16, device="cpu", verbose=False,
                              loss_slice=100000).evaluate_streaming_with_metrics(x, compute_per_token_metrics=True)
    res = StreamingEvaluator(m, chunk_size=48, overlap=16, device="cpu", verbose=False,
                             loss_slice=loss_slice).evaluate_streaming_with_metrics(x, compute_per_token_metrics=True)
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), np.asarray(base["per_token_losses"]), rtol=1e-6, atol=1e-6)


def test_hidden_and_logits_paths_agree():
    """The transformers adapter applies the lm head per slice; a generic module returns logits."""
    m = tiny_gpt2(n_positions=64)
    x = _tokens(120, seed=5)

    class Plain(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.vocab_size = inner, V

        def forward(self, ids):
            return self.inner(ids).logits

    a = StreamingEvaluator(m, chunk_size=40, overlap=10, device="cpu", verbose=False)
    b = StreamingEvaluator(Plain(m), chunk_size=40, overlap=10, device="cpu", verbose=False)
    assert a.adapter.split and a.adapter.kind == "transformers-attention"
    assert b.adapter.kind == "module"
    ra, rb = a.evaluate_streaming(x), b.evaluate_streaming(x)
    assert ra["nll_sum"] == pytest.approx(rb["nll_sum"], rel=1e-6)


def test_bigram_same_in_every_mode():
    m = Bigram()
    x = _tokens(257, seed=6)
    ref = m.nll(x[:-1].numpy(), x[1:].numpy())
    for kw in ({"mode": "sliding", "overlap": 0}, {"mode": "sliding", "overlap": 5}):
        res = StreamingEvaluator(m, chunk_size=16, device="cpu", verbose=False, **kw).evaluate_streaming(x)
        assert res["nll_sum"] == pytest.approx(ref.sum(), rel=1e-6)


@pytest.mark.parametrize("make, kw", [
    (Bigram, dict(mode="sliding", chunk_size=16, overlap=5, batch_size=3)),
    # batch_size=1: document mode's auto size is measured by timing (two runs may group documents differently)
    (lambda: TinyRNN("gru"), dict(mode="stateful", chunk_size=16, batch_size=1)),
    (lambda: tiny_gpt2(n_positions=256), dict(mode="kv-cache", chunk_size=16, batch_size=1)),
], ids=["sliding", "stateful", "kv-cache"])
@pytest.mark.parametrize("doc_mode", ["stream", "document"])
def test_tensor_and_store_input_give_identical_results(make_store, make, kw, doc_mode):
    rng = np.random.default_rng(9)
    docs = [rng.integers(0, V, size=int(n)).tolist() for n in (40, 1, 0, 77, 23)]
    flat = torch.tensor([t for d in docs for t in d])
    off = np.cumsum([0] + [len(d) for d in docs])
    from evaluator import EvalData

    m = make()
    res = []
    for data in (EvalData.from_tokens(flat, off), make_store(docs, vocab_size=V, shard_tokens=50)):
        ev = StreamingEvaluator(m, device="cpu", verbose=False, doc_mode=doc_mode, **kw)
        res.append(ev.evaluate_streaming_with_metrics(data, compute_per_token_metrics=True))
    a, b = res
    assert a["total_tokens"] == b["total_tokens"] and a["num_chunks"] == b["num_chunks"]
    assert a["nll_sum"] == b["nll_sum"]
    np.testing.assert_array_equal(np.asarray(a["per_token_losses"]), np.asarray(b["per_token_losses"]))
    np.testing.assert_array_equal(a["per_document"]["tokens"], b["per_document"]["tokens"])


def test_carried_modes_feed_every_token_once_whatever_the_tail():
    """tail applies to sliding windows: a carried run records tail 'short' and its numbers do not move."""
    x = _tokens(150, seed=4)
    res = {t: StreamingEvaluator(TinyRNN("gru"), chunk_size=16, device="cpu", mode="stateful", tail=t,
                                 verbose=False).evaluate_streaming(x) for t in ("full", "short")}
    assert res["full"]["tail"] == res["short"]["tail"] == "short"
    assert res["full"]["nll_sum"] == res["short"]["nll_sum"]
    sl = StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", mode="sliding", verbose=False).evaluate_streaming(x)
    assert sl["tail"] == "full"


def test_run_is_the_one_public_entry_of_both_api_calls():
    """compare used the engine's private _run; now every evaluation goes through the public run()."""
    import inspect

    import evaluator.compare as compare

    x = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(2))
    ev = StreamingEvaluator(Bigram(), chunk_size=16, overlap=4, device="cpu", verbose=False)
    a, b = ev.evaluate_streaming(x), ev.run(x, detailed=False)
    assert a["nll_sum"] == b["nll_sum"] and a["total_tokens"] == b["total_tokens"]
    c = ev.run(x)
    assert c["nll_sum"] == a["nll_sum"] and "chunk_losses" in c
    assert "._run(" not in inspect.getsource(compare) and not hasattr(StreamingEvaluator, "_run")
