"""batch_size="auto" by measurement (evaluator/autobatch.py): the run's first forwards climb a ladder
of micro sizes within the memory bound and keep the fastest. A fake timer (``RunTuning(
batch_timer=...)``) makes each size's speed known, so the choice is exact; every window is still
scored once (results as a fixed size's), the choice lands in the results, results.json and on stderr,
and a resumed run keeps it. An explicit batch size is left alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import evaluator.resolve as resolve_mod
import evaluator.runners as runners_mod
from evaluator import RunTuning, StreamingEvaluator
from evaluator.autobatch import Ladder, WallTimer, ladder_sizes

from .helpers import V, Bigram, Interrupt, OOMAbove, TinyRNN, brute_sliding_nll, full_nll, interrupt_after

# Speed per size in scored tokens per "second" of the fake timer: fastest at 4.
RATES = {1: 1.0, 2: 1.6, 4: 2.5, 8: 2.0, 16: 1.0}


class RateTimer:
    """A forward (group) of ``size`` rows scoring ``tokens`` takes ``tokens / rates[size]`` seconds."""

    def __init__(self, rates=RATES):
        self.rates, self.calls = rates, []

    def start(self):
        pass

    def stop(self, size, tokens):
        self.calls.append((size, tokens))
        return tokens / self.rates.get(size, 0.5)


def _ev(model, timer=None, share=1.0, **kw):
    """``share``: of the run's rows the ladder may spend (1.0: the whole ladder fits these runs; None: no limit)."""
    ev = StreamingEvaluator(model, device="cpu", verbose=kw.pop("verbose", False), **kw)
    if timer is not None:
        ev.tuning = RunTuning(batch_timer=timer, ladder_share=share)
    return ev


def _x(n=700, seed=0):
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


def test_the_ladder_keeps_the_fastest_and_stops_past_it():
    t = RateTimer({1: 410, 2: 661, 4: 880, 8: 973, 16: 950, 32: 700})
    lad = Ladder(64, t, min_units=2, min_seconds=0.0)
    sizes = []
    while lad.active:
        s = lad.size()
        sizes.append(s)
        lad.start()
        lad.stop(s, 1000)
    assert lad.chosen == 8 and lad.size() == 8
    assert sizes == [1] + [1, 1, 2, 2, 4, 4, 8, 8, 16, 16]  # the first forward untimed; 32 never tried
    assert {int(k): round(v) for k, v in lad.report()["ladder"].items()} == {1: 410, 2: 661, 4: 880, 8: 973, 16: 950}
    assert lad.line() == "batch size 8 (measured: 1: 410 tok/s, 2: 661, 4: 880, 8: 973, 16: 950; bound 64)"
    assert ladder_sizes(64) == [1, 2, 4, 8, 16, 32, 64] and ladder_sizes(256) == [4, 8, 16, 32, 64, 128, 256]
    assert ladder_sizes(12) == [1, 2, 4, 8, 12] and ladder_sizes(1) == [1]
    # a share of 20 rows: after 1 + 2 + 4 + 8 rows (1, 2, 4) a rung of 8 (16 rows) does not fit
    lad = Ladder(64, RateTimer({1: 1, 2: 2, 4: 3, 8: 4}), budget=20, min_seconds=0.0)
    while lad.active:
        lad.start()
        lad.stop(lad.size(), 10)
    assert lad.chosen == 4 and lad.spent == 15 and "ends before size 8" in lad.note
    # on a GPU small sizes take milliseconds: max_units forwards end a rung short of min_seconds
    lad = Ladder(64, RateTimer({1: 1e6, 2: 1.0}), min_seconds=1.0, max_units=3)
    for _ in range(4):
        lad.stop(lad.size(), 10)
    assert lad.size() == 2 and lad.rungs[1][2] == 3


def test_sliding_auto_picks_the_measured_fastest_with_the_fixed_size_results(capsys):
    x = _x()
    timer = RateTimer()
    res = _ev(Bigram(), timer, verbose=True, chunk_size=16, overlap=4, mode="sliding").evaluate_streaming_with_metrics(
        x, compute_per_token_metrics=True)
    assert res["batch_size"] == 4  # the old CPU rule gave 2048 // 16 = 128
    choice = res["batch_size_choice"]
    assert choice["chosen"] == 4 and choice["rule"] == "measured" and choice["bound"] >= 8
    assert sorted(int(k) for k in choice["ladder"]) == [1, 2, 4, 8]
    assert choice["ladder"]["4"] == pytest.approx(2.5) and choice["ladder"]["8"] == pytest.approx(2.0)
    assert "batch_size_after_oom" not in res
    # after the ladder every forward has 4 windows (a batch's remainder aside)
    sizes = [s for s, _ in timer.calls]
    assert sizes[:2] == [1, 1] and set(sizes) == {1, 2, 4, 8}
    err = capsys.readouterr().err
    assert "[streameval] batch size 4 (measured: 1: 1 tok/s, 2: 2, 4: 2, 8: 2; bound" in err
    # every window scored once, exactly as with a fixed batch size (a bigram's rows are independent)
    fixed = _ev(Bigram(), chunk_size=16, overlap=4, mode="sliding", batch_size=4).evaluate_streaming_with_metrics(
        x, compute_per_token_metrics=True)
    assert res["nll_sum"] == fixed["nll_sum"] and res["total_tokens"] == fixed["total_tokens"]
    np.testing.assert_array_equal(np.asarray(res["per_token_losses"]), np.asarray(fixed["per_token_losses"]))
    np.testing.assert_array_equal(res["chunk_losses"], fixed["chunk_losses"])
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), brute_sliding_nll(Bigram(), x, 16, 4), rtol=1e-6)


def _docs(n=48, seed=3):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, V, size=int(k)).tolist() for k in rng.integers(0, 30, size=n)]


def test_parallel_documents_auto_picks_the_measured_fastest(make_store):
    docs = _docs()
    model = TinyRNN("gru")
    timer = RateTimer()
    res = _ev(model, timer, chunk_size=7, mode="stateful", doc_mode="document").evaluate_streaming_with_metrics(
        make_store(docs, vocab_size=V), compute_per_token_metrics=True)
    assert res["batch_size"] == 4 and res["batch_size_choice"]["chosen"] == 4
    assert sorted(int(k) for k in res["batch_size_choice"]["ladder"]) == [1, 2, 4, 8]
    # each document's NLL is its own full forward's (groups of other sizes round differently: 1e-6)
    ref = [full_nll(model, torch.tensor(d)) if len(d) >= 2 else np.zeros(0) for d in docs]
    np.testing.assert_allclose(np.asarray(res["per_document"]["nll"]), [r.sum() for r in ref], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(res["per_token_losses"]), np.concatenate(ref), rtol=1e-5, atol=1e-5)
    fixed = _ev(model, chunk_size=7, mode="stateful", doc_mode="document", batch_size=4).evaluate_streaming(
        make_store(docs, vocab_size=V))
    assert res["total_tokens"] == fixed["total_tokens"] and res["nll_sum"] == pytest.approx(fixed["nll_sum"], rel=1e-7)


def test_the_choice_is_in_results_json(tmp_path):
    from evaluator.report import write_report

    res = _ev(Bigram(), RateTimer(), chunk_size=16, overlap=4, mode="sliding").evaluate_streaming_with_metrics(_x())
    write_report(res, tmp_path / "r", plots=False)
    got = json.loads((tmp_path / "r" / "results.json").read_text())
    assert got["batch_size"] == 4 and got["batch_size_choice"]["chosen"] == 4
    assert got["batch_size_choice"]["ladder"]["2"] == pytest.approx(1.6)


@pytest.mark.parametrize("where", ["inside", "after"])  # the ladder
def test_a_resumed_run_keeps_the_choice_and_the_bound(tmp_path, make_store, monkeypatch, where):
    """Interrupted inside or after the ladder, then resumed where free memory gives another bound: the
    resumed run continues the recorded ladder within the recorded bound, bit for bit."""
    store = make_store(_docs(), vocab_size=V)

    def evaluate(ck=None):
        ev = _ev(TinyRNN("gru"), RateTimer(), chunk_size=7, mode="stateful", doc_mode="document",
                 checkpoint_interval=1e-9)
        return ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True, checkpoint_dir=ck)

    real, seen = runners_mod.CarriedRunner.step, [0]
    with monkeypatch.context() as m:  # count the units (segments): the ladder is done before the last one
        m.setattr(runners_mod.CarriedRunner, "step", lambda self, b: (seen.__setitem__(0, seen[0] + 1), real(self, b)))
        ref = evaluate()
    assert ref["batch_size_choice"]["note"] is None and seen[0] > 3
    ck = tmp_path / "ck"
    with monkeypatch.context() as m:
        interrupt_after(m, runners_mod.CarriedRunner, 2 if where == "inside" else seen[0] - 1)
        with pytest.raises(Interrupt):
            evaluate(ck)
    monkeypatch.setattr(resolve_mod, "_available_ram", lambda: 1 << 20)  # the bound would now be 1
    res = evaluate(ck)
    assert 0 < res["resumed_from_window"] < ref["num_chunks"]
    assert res["batch_size_choice"]["bound"] == ref["batch_size_choice"]["bound"] > 1
    assert res["batch_size"] == ref["batch_size"] == 4
    assert res["nll_sum"] == ref["nll_sum"]
    np.testing.assert_array_equal(np.asarray(res["per_token_losses"]), np.asarray(ref["per_token_losses"]))
    np.testing.assert_array_equal(np.asarray(res["per_document"]["nll"]), np.asarray(ref["per_document"]["nll"]))


def test_out_of_memory_during_the_ladder_ends_it_below(make_store):
    x = _x(900)
    inner = Bigram()
    model = OOMAbove(inner, max_rows=3)  # a forward of more than 3 windows runs out of memory
    res = _ev(model, RateTimer({1: 1.0, 2: 1.5, 4: 9.0, 8: 9.0}), chunk_size=16, mode="sliding").evaluate_streaming(x)
    assert model.raised == 1 and res["batch_size"] == 2
    assert res["batch_size_choice"]["note"] == "out of memory above 2"
    fixed = _ev(inner, chunk_size=16, mode="sliding", batch_size=2).evaluate_streaming(x)
    assert res["nll_sum"] == fixed["nll_sum"] and res["total_tokens"] == fixed["total_tokens"]


def test_an_explicit_batch_size_is_not_measured():
    timer = RateTimer()
    res = _ev(Bigram(), timer, chunk_size=16, overlap=4, mode="sliding", batch_size=3).evaluate_streaming(_x())
    assert res["batch_size"] == 3 and "batch_size_choice" not in res and timer.calls == []


def test_one_carried_stream_has_no_batch_to_measure():
    timer = RateTimer()
    res = _ev(TinyRNN("gru"), timer, chunk_size=16, mode="stateful").evaluate_streaming(_x(200))
    assert res["batch_size"] == 1 and "batch_size_choice" not in res and timer.calls == []


def test_a_short_run_keeps_the_best_size_measured():
    """The run ends inside the ladder (6 windows: one untimed, two of size 1, one forward of 2): the
    fastest size measured is the choice, and it says so."""
    res = _ev(Bigram(), RateTimer(), share=None, chunk_size=16, mode="sliding").evaluate_streaming(_x(16 * 6 + 1))
    assert res["batch_size"] == 2 and res["batch_size_choice"]["note"] == "the run ended during the ladder"
    assert sorted(res["batch_size_choice"]["ladder"]) == ["1", "2"]


def test_the_ladder_spends_a_tenth_of_the_run():
    """100 windows: the ladder may feed 10 (1 untimed, 1 + 1, 2 + 2): a rung of 4 (8 more) would not fit."""
    res = _ev(Bigram(), RateTimer(), share=0.1, chunk_size=16, mode="sliding").evaluate_streaming(_x(16 * 100 + 1))
    assert res["batch_size"] == 2 and sorted(res["batch_size_choice"]["ladder"]) == ["1", "2"]
    assert res["batch_size_choice"]["note"] == "the ladder's share of the run (10 rows) ends before size 4"


def test_the_wall_timer_syncs_a_gpu_only_inside_the_sync_allowance(monkeypatch):
    """On CUDA the clock reads after a device sync at both ends, each under the engine's sync-debug
    allowance (STREAMEVAL_SYNC_DEBUG); on a CPU nothing is synced."""
    from contextlib import contextmanager

    inside, calls = [False], []

    @contextmanager
    def allowed():
        inside[0] = True
        yield
        inside[0] = False

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append((inside[0], device)))
    gpu = WallTimer(torch.device("cuda", 1), allowed)
    gpu.start()
    assert gpu.stop(4, 100) >= 0 and calls == [(True, torch.device("cuda", 1))] * 2
    calls.clear()
    cpu = WallTimer(torch.device("cpu"), allowed)
    cpu.start()
    assert cpu.stop(4, 100) >= 0 and calls == []
