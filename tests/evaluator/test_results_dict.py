"""The typed results (evaluator.results.RunResult, CompareResult) give the results dict the API has
always returned: the same keys in the same order (the literal lists below were recorded from the
tree before the dataclasses existed), each value recomputed here from the window semantics and the
bigram tables, and the scalars survive a JSON round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluator import StreamingEvaluator
from evaluator.compare import compare_result, compare_streaming
from evaluator.results import CompareResult, RunResult

from .helpers import V, Bigram

SETTINGS = ["loss", "perplexity", "total_tokens", "num_chunks", "total_time", "tokens_per_second", "avg_chunk_time",
            "nll_sum", "mode", "mode_reason", "doc_mode", "chunk_size", "overlap", "tail", "batch_size", "bos_id",
            "bos_policy", "max_tokens", "device", "dtype", "compile", "model", "data", "carry_check"]
# (chunk_documents: added since, the document range of each chunk, for chunks.csv)
DETAIL = ["chunk_losses", "chunk_perplexities", "avg_chunk_loss", "std_chunk_loss", "chunk_times", "chunk_documents",
          "bits_per_byte",
          "byte_perplexity", "word_perplexity", "total_bytes", "total_words", "byte_metric_documents", "num_documents",
          "word_rule", "per_document", "position_buckets"]
RUN_KEYS = SETTINGS + ["world_size", "backend"] + DETAIL + ["per_token_losses", "per_token_path"]
COMPARE_KEYS = (SETTINGS + ["kl_mean", "kl_stderr", "kl_sum", "top1_agreement", "top1_agreement_stderr",
                            "candidate_top1_accuracy", "loss_candidate", "loss_reference", "perplexity_candidate",
                            "perplexity_reference", "perplexity_ratio", "delta_nll_mean", "nll_sum_reference",
                            "world_size", "backend"]
                + DETAIL + ["per_token_kl", "per_token_kl_path", "kl_min", "kl_max", "kl_median", "kl_p90", "kl_p95",
                            "kl_p99", "kl_p999", "candidate", "reference", "reference_device", "compared_vocab",
                            "vocab_candidate", "vocab_reference", "models"])
N, L, O, B = 150, 16, 4, 3  # tokens, chunk size, overlap, windows per batch
TIMES = ("total_time", "tokens_per_second", "avg_chunk_time", "chunk_times")  # measured: differ between two runs


def _tokens():
    return torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(3))


def _log_probs(model: Bigram) -> np.ndarray:
    with torch.no_grad():
        return F.log_softmax(model.table.weight.double(), dim=-1).numpy()


def _windows() -> int:
    return 1 + -(-max(0, N - 1 - L) // (L - O))  # window k starts at k * (L - overlap)


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is None or isinstance(v, (bool, int, float, str))}


def _same(a: dict, b: dict) -> None:
    """Two results dicts of the same run, key by key (the measured times aside)."""
    assert list(a) == list(b)
    for k in a:
        if k in TIMES:
            continue
        if isinstance(a[k], dict):
            _same(a[k], b[k])
        elif isinstance(a[k], (float, int, str, type(None))):
            assert a[k] == b[k] or (a[k] != a[k] and b[k] != b[k]), k  # (nan == nan)
        else:
            np.testing.assert_array_equal(np.asarray(a[k][:]), np.asarray(b[k][:]), err_msg=k)


def test_run_result_to_dict_is_the_run_dict():
    x, model = _tokens(), Bigram()
    ev = StreamingEvaluator(model, device="cpu", verbose=False, chunk_size=L, overlap=O, batch_size=B)
    r = ev.run_result(x, detailed=True, per_token=True)
    assert isinstance(r, RunResult)
    d = r.to_dict()
    assert list(d) == RUN_KEYS
    _same(d, ev.run(x, detailed=True, per_token=True))
    _same(d, ev.evaluate_streaming_with_metrics(x, compute_per_token_metrics=True))
    assert list(ev.evaluate_streaming(x)) == SETTINGS + ["world_size", "backend"]  # no detail, no per-token keys

    v = x.numpy()
    nll = -_log_probs(model)[v[:-1], v[1:]]  # a bigram's NLL does not depend on the window
    n, nw = N - 1, _windows()
    assert d["total_tokens"] == n and d["num_chunks"] == nw == len(d["chunk_losses"]) == len(d["chunk_times"])
    assert d["nll_sum"] == pytest.approx(nll.sum(), rel=1e-6) and d["loss"] == d["nll_sum"] / n
    assert d["perplexity"] == pytest.approx(math.exp(nll.mean()), rel=1e-6)
    assert d["tokens_per_second"] == n / d["total_time"] and d["avg_chunk_time"] == d["total_time"] / nw
    np.testing.assert_allclose(d["per_token_losses"], nll, rtol=1e-5)
    assert (d["mode"], d["doc_mode"], d["chunk_size"], d["overlap"], d["tail"], d["batch_size"]) == \
        ("sliding", "stream", L, O, "full", B)
    assert (d["bos_id"], d["bos_policy"], d["max_tokens"], d["device"], d["dtype"], d["compile"]) == \
        (None, "none", None, "cpu", "float32", None)
    assert (d["model"], d["carry_check"], d["world_size"], d["backend"], d["per_token_path"]) == \
        ("Bigram", None, 1, None, None)
    # a raw tensor carries no byte or word counts: one document, no tokenizer-independent metrics
    assert (d["num_documents"], d["bits_per_byte"], d["word_perplexity"], d["total_bytes"], d["word_rule"]) == \
        (1, None, None, None, None)
    assert d["per_document"]["tokens"][0] == n and d["per_document"]["nll"][0] == pytest.approx(nll.sum(), rel=1e-6)
    assert int(np.sum(d["position_buckets"]["tokens"])) == n

    s = _scalars(d)
    assert set(s) >= set(SETTINGS) - {"carry_check"}
    assert json.loads(json.dumps(s)) == s


def test_compare_result_to_dict_is_the_compare_dict():
    x, cand, ref = _tokens(), Bigram(seed=0), Bigram(seed=1)
    kw = dict(device="cpu", verbose=False, chunk_size=L, overlap=O, batch_size=B)
    c = compare_result(cand, ref, x, **kw)
    assert isinstance(c, CompareResult)
    d = c.to_dict()
    assert list(d) == COMPARE_KEYS
    _same(d, compare_streaming(Bigram(seed=0), Bigram(seed=1), x, **kw))

    v = x.numpy()
    lc, lr = _log_probs(cand), _log_probs(ref)
    kl = (np.exp(lr[v[:-1]]) * (lr[v[:-1]] - lc[v[:-1]])).sum(-1)  # KL(ref || cand) per target
    n = N - 1
    assert d["total_tokens"] == n and d["num_chunks"] == _windows()
    assert d["kl_mean"] == pytest.approx(kl.mean(), rel=1e-5) and d["kl_sum"] == pytest.approx(kl.sum(), rel=1e-5)
    np.testing.assert_allclose(d["per_token_kl"], kl, rtol=1e-4, atol=1e-6)
    for k, q in (("kl_min", 0.0), ("kl_median", 0.5), ("kl_p90", 0.9), ("kl_p99", 0.99), ("kl_max", 1.0)):
        assert d[k] == pytest.approx(np.quantile(kl, q), rel=1e-4), k
    assert d["loss_candidate"] == d["loss"] == pytest.approx(-lc[v[:-1], v[1:]].mean(), rel=1e-6)
    assert d["loss_reference"] == pytest.approx(-lr[v[:-1], v[1:]].mean(), rel=1e-6)
    agree = lc[v[:-1]].argmax(-1) == lr[v[:-1]].argmax(-1)
    assert d["top1_agreement"] == pytest.approx(100.0 * agree.mean())
    assert (d["candidate"], d["reference"], d["reference_device"], d["compared_vocab"], d["vocab_candidate"],
            d["vocab_reference"], d["per_token_kl_path"]) == ("Bigram", "Bigram", "cpu", V, V, V, None)
    assert d["models"]["kind"] == "pair" and d["models"]["name"] == "Bigram vs Bigram"

    s = _scalars(d)
    assert json.loads(json.dumps(s)) == s
