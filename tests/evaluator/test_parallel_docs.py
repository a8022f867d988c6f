"""Parallel documents in stateful and kv-cache modes (document mode, batch_size = B documents side
by side): every document's NLL equals its own full forward, whatever B, the documents' lengths
(1 token to several chunks), the look-ahead, a document streamed because it is too long to buffer,
an out-of-memory retry or a resumed run; counts, per-window/per-document sums and the per-token file
stay exact and in plan order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import evaluator.runners as runners_mod
from evaluator import RunTuning, StreamingEvaluator

from .helpers import V, Interrupt, OOMAbove, TinyRNN, full_nll, interrupt_after, tiny_gpt2, tiny_rwkv

# Lengths in tokens: no target (0, 1), one to three targets, chunk edges (CHUNK = 7), several chunks.
LENGTHS = [1, 2, 3, 4, 7, 8, 9, 15, 40, 0, 2, 23, 64, 5, 3, 57, 1, 30, 6, 8, 2]
CHUNK = 7

MODELS = {
    "gpt2-kv": (lambda: tiny_gpt2(n_positions=128), "kv-cache"),
    "gru": (lambda: TinyRNN("gru"), "stateful"),
    "lstm": (lambda: TinyRNN("lstm"), "stateful"),
    "rwkv": (tiny_rwkv, "stateful"),
}


@pytest.fixture(scope="module")
def models():
    return {k: f() for k, (f, _) in MODELS.items()}


def _docs(lengths=LENGTHS, seed=11):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V, size=n).tolist() for n in lengths]


def _brute(model, docs, bos=None):
    """Per document: the NLLs of one full forward over it (with the BOS prefix), or [] (no target)."""
    out = []
    for d in docs:
        x = ([bos] if bos is not None else []) + d
        out.append(full_nll(model, torch.tensor(x)) if len(x) >= 2 else np.zeros(0))
    return out


def _run(model, mode, store, B, tuning=None, **kw):
    """``tuning``: a RunTuning (e.g. a small lookahead or segment_slots)."""
    ev = StreamingEvaluator(model, chunk_size=kw.pop("chunk_size", CHUNK), device="cpu", verbose=False, mode=mode,
                            doc_mode="document", batch_size=B, **kw)
    ev.tuning = tuning or RunTuning()
    return ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True)


def _check_against(res, ref):
    tokens = np.array([len(r) for r in ref])
    assert res["total_tokens"] == tokens.sum()
    np.testing.assert_array_equal(np.asarray(res["per_document"]["tokens"]), tokens)
    np.testing.assert_allclose(np.asarray(res["per_document"]["nll"]), [r.sum() for r in ref], rtol=1e-5, atol=1e-5)
    # the per-token file: plan order (document by document, position by position)
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), np.concatenate(ref), rtol=1e-5, atol=1e-5)
    assert res["nll_sum"] == pytest.approx(sum(r.sum() for r in ref), rel=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("B", [1, 3, 64])  # 64: more than the 21 documents
def test_each_document_equals_its_full_forward(models, make_store, name, B):
    model, mode = models[name], MODELS[name][1]
    docs = _docs()
    res = _run(model, mode, make_store(docs, vocab_size=V, shard_tokens=50), B)
    assert res["mode"] == mode and res["batch_size"] == B
    _check_against(res, _brute(model, docs))


@pytest.mark.parametrize("name", ["gpt2-kv", "gru"])
def test_bos_prefix_and_a_one_token_document(models, make_store, name):
    model, mode = models[name], MODELS[name][1]
    docs = _docs([1, 6, 7, 13, 1, 2, 30])
    res = _run(model, mode, make_store(docs, vocab_size=V), 4, bos=5)
    _check_against(res, _brute(model, docs, bos=5))


@pytest.mark.parametrize("name", ["gpt2-kv", "rwkv", "gru"])
def test_parallel_equals_batch_one_per_window_and_document(models, make_store, name):
    """Small segments (look-ahead 1: B documents each) so that many segments and groups occur."""
    model, mode = models[name], MODELS[name][1]
    store = make_store(_docs(), vocab_size=V, shard_tokens=37)
    one = _run(model, mode, store, 1)
    par = _run(model, mode, store, 4, tuning=RunTuning(lookahead=1))
    assert par["num_chunks"] == one["num_chunks"] and par["total_tokens"] == one["total_tokens"]
    np.testing.assert_array_equal(np.asarray(par["per_document"]["tokens"]), np.asarray(one["per_document"]["tokens"]))
    np.testing.assert_allclose(np.asarray(par["chunk_losses"]), np.asarray(one["chunk_losses"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(par["per_document"]["nll"]), np.asarray(one["per_document"]["nll"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(par["per_token_losses"]), np.asarray(one["per_token_losses"]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(par["position_buckets"]["nll"], one["position_buckets"]["nll"], rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2-kv", "lstm"])
def test_documents_too_long_to_buffer_are_streamed(models, make_store, name, monkeypatch):
    """A segment of at most 2 * 3 * 7 = 42 slot tokens: documents longer than 14 tokens (3 windows
    or more) are streamed one window at a time between the grouped ones."""
    model, mode = models[name], MODELS[name][1]
    seen = []
    real = runners_mod.CarriedRunner.step
    monkeypatch.setattr(runners_mod.CarriedRunner, "step", lambda self, b: (seen.append(type(b).__name__), real(self, b)))
    docs = _docs()
    res = _run(model, mode, make_store(docs, vocab_size=V), 3, tuning=RunTuning(lookahead=2, segment_slots=1))
    assert {"_Run", "_Segment"} <= set(seen)
    _check_against(res, _brute(model, docs))


def test_out_of_memory_halves_the_group_then_the_window(make_store):
    """Forwards of more than 2 rows fail: groups of 4 documents are rerun as 2 + 2 (later groups
    keep 2); forwards longer than 5 positions fail as well: a lone document's window is halved."""
    inner = TinyRNN("gru")
    docs = _docs()
    ref = _brute(inner, docs)
    model = OOMAbove(inner, max_rows=2)
    res = _run(model, "stateful", make_store(docs, vocab_size=V), 4)
    assert model.raised > 0 and res["batch_size_after_oom"] == 2
    _check_against(res, ref)
    model = OOMAbove(inner, max_rows=1, max_len=5)
    res = _run(model, "stateful", make_store(docs, vocab_size=V), 4)
    assert res["batch_size_after_oom"] == 1
    _check_against(res, ref)


@pytest.mark.parametrize("name", ["gpt2-kv", "gru"])
@pytest.mark.parametrize("after", [1, 4, 9])
def test_interrupted_run_resumes_to_the_uninterrupted_result(models, make_store, tmp_path, monkeypatch, name, after):
    """Checkpoints after every unit (segments and streamed windows); a crash after ``after`` units
    and a rerun give the uninterrupted run's numbers bit for bit."""
    model, mode = models[name], MODELS[name][1]
    store = make_store(_docs(), vocab_size=V)

    def evaluate(ck=None):
        ev = StreamingEvaluator(model, chunk_size=CHUNK, device="cpu", verbose=False, mode=mode, doc_mode="document",
                                batch_size=3, checkpoint_interval=1e-9)
        ev.tuning = RunTuning(lookahead=2, segment_slots=1)  # long documents streamed: checkpoints inside them too
        return ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True, checkpoint_dir=ck)

    ref = evaluate()
    ck = tmp_path / "ck"
    with monkeypatch.context() as m:
        interrupt_after(m, runners_mod.CarriedRunner, after)
        with pytest.raises(Interrupt):
            evaluate(ck)
    res = evaluate(ck)
    assert 0 < res["resumed_from_window"] < ref["num_chunks"]
    assert res["total_tokens"] == ref["total_tokens"] and res["nll_sum"] == ref["nll_sum"]
    np.testing.assert_array_equal(np.asarray(res["per_document"]["nll"]), np.asarray(ref["per_document"]["nll"]))
    np.testing.assert_array_equal(np.asarray(res["chunk_losses"]), np.asarray(ref["chunk_losses"]))
    np.testing.assert_array_equal(np.asarray(res["per_token_losses"]), np.asarray(ref["per_token_losses"]))


def test_stream_mode_keeps_one_stream(models, make_store):
    """doc_mode 'stream' carries one state through everything: batch_size does not split it."""
    model = models["gru"]
    docs = _docs([20, 30, 9])
    ev = StreamingEvaluator(model, chunk_size=CHUNK, device="cpu", verbose=False, mode="stateful", batch_size=4)
    res = ev.evaluate_streaming(make_store(docs, vocab_size=V))
    assert res["batch_size"] == 1
    ref = full_nll(model, torch.tensor(sum(docs, [])))
    assert res["nll_sum"] == pytest.approx(ref.sum(), rel=1e-5) and res["total_tokens"] == len(ref)


def test_kv_cache_still_refuses_a_document_beyond_the_positions(make_store):
    from evaluator.errors import ConfigError

    with pytest.raises(ConfigError, match="130 positions"):
        _run(tiny_gpt2(n_positions=128), "kv-cache", make_store(_docs([5, 131, 3]), vocab_size=V), 4)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["gpt2-kv", "gru", "rwkv"])
def test_on_cuda_each_document_equals_its_full_forward(models, make_store, name):
    """The same on a GPU (device buffers, cache slicing there); brute force on the CPU copy."""
    import copy

    model, mode = models[name], MODELS[name][1]
    docs = _docs()
    ref = _brute(model, docs)
    ev = StreamingEvaluator(copy.deepcopy(model).cuda(), chunk_size=CHUNK, device="cuda", verbose=False, mode=mode,
                            doc_mode="document", batch_size=4)
    res = ev.evaluate_streaming_with_metrics(make_store(docs, vocab_size=V), compute_per_token_metrics=True)
    assert res["batch_size"] == 4 and res["total_tokens"] == sum(len(r) for r in ref)
    np.testing.assert_allclose(np.asarray(res["per_document"]["nll"]), [r.sum() for r in ref], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), np.concatenate(ref), rtol=1e-4, atol=1e-4)
