"""Defects of the evaluator's CUDA path that can be reproduced on a CPU: out-of-memory retries that
must never count a target twice, no fast path switched off by an unrelated error, no timing events
when no per-chunk times are asked for, the loss slice's memory, and the auto batch size counting a
model's full logits. (The CUDA-only checks live in test_engine_cuda.py.)"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluator.resolve as resolve_mod
import evaluator.runners as runners_mod
import evaluator.metrics as metrics_mod
from evaluator import StreamingEvaluator
from evaluator.scoring import NLL
from evaluator.metrics import token_nll
from evaluator.models import ForwardOutput

from .helpers import V, Bigram, tiny_gpt2


def _run(model, x, detailed=True, **kw):
    ev = StreamingEvaluator(model, device="cpu", verbose=False, **kw)
    if detailed:
        return ev.evaluate_streaming_with_metrics(x, compute_per_token_metrics=True)
    return ev.evaluate_streaming(x)


def _tokens(n=300, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_oom_in_the_loss_after_the_forward_is_retried_exactly(monkeypatch):
    """An out-of-memory error in the loss (late in the step, after the forward) is retried in
    halves like one in the forward, and the result is identical."""
    x = _tokens()
    ref = _run(Bigram(), x, chunk_size=16, overlap=4, batch_size=8)
    real, raised = runners_mod.token_nll, []

    def flaky(out, targets, flat, loss_slice):
        if targets.shape[0] > 2:  # micro-batches of more than 2 windows "run out of memory"
            raised.append(targets.shape[0])
            raise torch.OutOfMemoryError("out of memory (simulated, in the loss)")
        return real(out, targets, flat, loss_slice)

    # the run's own scoring with a loss that fails on large micro-batches (Scoring.score: the seam)
    ev = StreamingEvaluator(Bigram(), device="cpu", verbose=False, chunk_size=16, overlap=4, batch_size=8)
    res = ev.run(x, per_token=True, scoring=dataclasses.replace(NLL, score=flaky))
    assert raised and res["batch_size_after_oom"] == 2
    assert res["total_tokens"] == ref["total_tokens"] == 299
    np.testing.assert_array_equal(np.asarray(res["per_token_losses"]), np.asarray(ref["per_token_losses"]))
    assert res["nll_sum"] == pytest.approx(ref["nll_sum"], rel=1e-12)


@pytest.mark.parametrize("mode", ["sliding", "stateful"])
def test_oom_while_adding_to_the_sums_is_not_retried_into_a_double_count(monkeypatch, mode):
    """Before the fix the retried block also covered MetricSums.add, which had already added the
    batch to its totals: the retry counted it twice and the run ended in 'internal error: scored N
    targets'. Now the sums are outside the retry and all their allocations come first, so the
    error surfaces as what it is, and the sums are untouched by the failed call."""
    from .helpers import TinyRNN

    x = _tokens(200, seed=1)
    model = Bigram() if mode == "sliding" else TinyRNN("gru")
    seen = {}
    real_bucketize = torch.bucketize

    def oom_once(*a, **kw):  # the detailed sums' own allocation fails on the first call
        if not seen:
            seen["raised"] = True
            raise torch.OutOfMemoryError("out of memory (simulated, in MetricSums.add)")
        return real_bucketize(*a, **kw)

    monkeypatch.setattr(metrics_mod.torch, "bucketize", oom_once)
    before = metrics_mod.MetricSums.add

    def checked_add(self, nll, count, *rest):
        n0, t0 = float(self.nll), self.tokens
        try:
            return before(self, nll, count, *rest)
        except torch.OutOfMemoryError:
            assert (float(self.nll), self.tokens) == (n0, t0), "a failed add changed the totals"
            raise

    monkeypatch.setattr(metrics_mod.MetricSums, "add", checked_add)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        _run(model, x, chunk_size=16, batch_size=4, mode=mode)
    assert seen


def test_an_unrelated_error_in_nonzero_static_is_raised_not_turned_into_a_slow_path(monkeypatch):
    """The scored-index fast path (no device sync) used to be switched off for the rest of the
    process after *any* RuntimeError. Now nonzero_static is always used (torch >= 2.6) and an error
    propagates."""
    x = _tokens()
    calls = {"static": 0, "plain": 0}
    real_static, real_plain = torch.nonzero_static, torch.nonzero

    def static(*a, **kw):
        calls["static"] += 1
        if calls["static"] == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return real_static(*a, **kw)

    def plain(*a, **kw):
        calls["plain"] += 1
        return real_plain(*a, **kw)

    monkeypatch.setattr(runners_mod.torch, "nonzero_static", static)
    monkeypatch.setattr(runners_mod.torch, "nonzero", plain)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _run(Bigram(), x, chunk_size=16, batch_size=4, detailed=False)
    res = _run(Bigram(), x, chunk_size=16, batch_size=4, detailed=False)
    assert res["total_tokens"] == 299
    assert calls["static"] > 2 and calls["plain"] == 0


@pytest.mark.parametrize("detailed", [False, True])
def test_timing_marks_only_when_chunk_times_are_reported(monkeypatch, detailed):
    made = []

    def clock():
        made.append(1)
        return time.perf_counter()

    ev = StreamingEvaluator(Bigram(), device="cpu", verbose=False, chunk_size=16, batch_size=4)
    res = ev.run(_tokens(), detailed=detailed, per_token=detailed, clock=clock)  # (what _run calls)
    if detailed:
        assert len(made) == 2 * (-(-res["num_chunks"] // 4)) and len(res["chunk_times"]) == res["num_chunks"]
    else:
        assert made == []  # two CUDA events per batch used to pile up for nothing


def _peak_cpu_bytes(fn) -> int:
    """Peak of live CPU tensor bytes while ``fn`` runs (allocations at the leaf ops, frees)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    ev = [e for e in prof.events() if e.cpu_memory_usage and (e.name == "[memory]" or not e.cpu_children)]
    cur = peak = 0
    for e in sorted(ev, key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [False, True])
def test_loss_slice_equals_cross_entropy_with_one_fp32_copy_less(dtype, hidden):
    torch.manual_seed(0)
    vocab, rows, slice_ = 20000, 48, 16
    tg = torch.randint(0, vocab, (2, rows // 2))
    flat = torch.tensor(sorted(np.random.default_rng(0).choice(rows, size=rows - 5, replace=False).tolist()))
    if hidden:
        head = torch.nn.Linear(24, vocab).to(dtype)
        h = torch.randn(2, rows // 2, 24, dtype=dtype)
        out, full = ForwardOutput(hidden=h, head=head), head(h)
    else:
        full = (4 * torch.randn(2, rows // 2, vocab)).to(dtype)
        out = ForwardOutput(logits=full)
    want = F.cross_entropy(full.reshape(-1, vocab).float()[flat], tg.reshape(-1)[flat], reduction="none")
    with torch.inference_mode():
        got = token_nll(out, tg, flat, slice_)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)

    def reference():  # the previous slice body: fp32 upcast, then cross_entropy's log-softmax
        rows_ = full.reshape(-1, vocab)
        for i in range(0, flat.numel(), slice_):
            F.cross_entropy(rows_.index_select(0, flat[i : i + slice_]).float(), tg.reshape(-1)[flat[i : i + slice_]],
                            reduction="none")

    fp32_slice = slice_ * vocab * 4
    with torch.inference_mode():
        ours = _peak_cpu_bytes(lambda: token_nll(ForwardOutput(logits=full), tg, flat, slice_))
        ref = _peak_cpu_bytes(reference)
    assert ours <= ref - 0.9 * fp32_slice, (ours, ref, fp32_slice)


def test_auto_batch_counts_full_logits(monkeypatch):
    """A model without a body/head split builds [B, L, vocab] logits itself; the CUDA auto batch
    size used to leave them out, so the first batch ran out of memory and was halved."""

    class WideLogits(torch.nn.Module):  # full logits, a large vocabulary
        vocab_size = 50000

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(self.vocab_size, 8)

        def forward(self, x):
            return self.emb(x)

    free = 8 << 30
    ev = StreamingEvaluator(WideLogits(), chunk_size=1024, device="cpu", verbose=False)
    assert ev.adapter.full_logits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    # only the sizing rule runs for a CUDA device here: no tensor is made
    B = resolve_mod.batch_windows_for(ev.config, ev.adapter, torch.device("cuda", 0), "sliding", 1024)
    assert B >= 1 and B * 1024 * 50000 * 4 <= 0.6 * free  # the logits alone fit the budget

    gpt = StreamingEvaluator(tiny_gpt2(n_positions=1024), device="cpu", verbose=False)
    assert not gpt.adapter.full_logits  # body + head per slice: logits never built whole
