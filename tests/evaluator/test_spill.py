"""Length-independent metric memory: per-window and per-document sums leave the device in
blocks into spilled files. Results are bit-identical whatever the block size (tiny blocks force a
flush, a carried document and a grown block at almost every batch), a resumed run continues the
files exactly, the metric state's memory does not depend on the stream's length, and temporary
files never outlive the call."""

from __future__ import annotations

import csv
import math
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluator.engine as engine_mod
import evaluator.report as report_mod
import evaluator.runners as runners_mod
import evaluator.spill as spill_mod
from evaluator import RunTuning, StreamingEvaluator
from evaluator.cli import main
from evaluator.metrics import MetricSums, summarize_chunks
from evaluator.report import write_report
from evaluator.spill import BlockView, SpillFiles, block_sum

from .helpers import V, Bigram, TinyRNN, gru_lm


class Stop(Exception):
    pass


def _docs(seed=0):
    # empty and 1-token documents: batches whose span holds documents without targets
    rng = np.random.default_rng(seed)
    lens = [5, 0, 0, 1, 40, 0, 17, 2, 64, 1, 1, 0, 33, 9, 120, 3]
    return [rng.integers(1, V, n).tolist() for n in lens]


def _tiny_blocks(w=1, d=1, per_token=5):
    # per-token losses too: blocks of 5 values (batches both fill a block and exceed one)
    return RunTuning(block_windows=w, block_documents=d, per_token_block=per_token)


def _evaluate(model, data, tuning=None, **kw):
    ck = kw.pop("checkpoint_dir", None)
    ev = StreamingEvaluator(model, device="cpu", verbose=False, tuning=tuning, **kw)
    return ev.evaluate_streaming_with_metrics(data, compute_per_token_metrics=True, checkpoint_dir=ck)


def _identical(a, b):
    """Every sum bit for bit (not approx): block boundaries must not change an addition's order."""
    assert a["nll_sum"] == b["nll_sum"] and a["total_tokens"] == b["total_tokens"]
    assert a["num_chunks"] == b["num_chunks"] == len(a["chunk_losses"]) == len(a["chunk_times"])
    np.testing.assert_array_equal(np.asarray(a["chunk_losses"]), np.asarray(b["chunk_losses"]))
    for k in ("tokens", "nll", "loss", "complete"):
        np.testing.assert_array_equal(np.asarray(a["per_document"][k]), np.asarray(b["per_document"][k]))
    for k in ("lo", "hi", "tokens", "nll"):
        np.testing.assert_array_equal(a["position_buckets"][k], b["position_buckets"][k])
    for k in ("bits_per_byte", "word_perplexity", "avg_chunk_loss", "std_chunk_loss"):
        assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k]))
    np.testing.assert_array_equal(np.asarray(a["per_token_losses"]), np.asarray(b["per_token_losses"]))


CASES = [
    ("sliding-overlap", Bigram, dict(chunk_size=6, overlap=2, batch_size=3), "stream"),
    ("sliding-doc-bos", Bigram, dict(chunk_size=8, batch_size=4, bos=3), "document"),
    ("sliding-tail-short", Bigram, dict(chunk_size=7, overlap=3, batch_size=2, tail="short"), "document"),
    ("stateful", lambda: TinyRNN("gru"), dict(chunk_size=10, mode="stateful"), "stream"),
    # batch_size=1: one document at a time (auto measures its size by timing: two runs may differ in the last bits)
    ("stateful-doc", lambda: TinyRNN("lstm"), dict(chunk_size=10, mode="stateful", batch_size=1), "document"),
]


@pytest.mark.parametrize("name, factory, kw, doc_mode", CASES, ids=[c[0] for c in CASES])
def test_tiny_blocks_give_bit_identical_results(make_store, monkeypatch, name, factory, kw, doc_mode):
    docs = _docs()
    store = make_store(docs, vocab_size=V, nbytes=[3 * len(d) + 1 for d in docs], nwords=[len(d) // 2 for d in docs])
    model = factory()
    # one block larger than the whole run: what whole-run device arrays (the old design) held
    whole = _evaluate(model, store, doc_mode=doc_mode, tuning=RunTuning(block_windows=1 << 16, block_documents=1 << 16), **kw)
    flushes = []
    real_flush = MetricSums.flush
    monkeypatch.setattr(MetricSums, "flush", lambda self: (flushes.append(1), real_flush(self))[1])
    tiny = _evaluate(model, store, doc_mode=doc_mode, tuning=_tiny_blocks(), **kw)
    assert len(flushes) > 5  # the block left the device many times mid-run
    _identical(tiny, whole)
    # and both agree with the documents' own sums
    ref = np.asarray(whole["per_token_losses"], np.float64)
    assert whole["per_document"]["tokens"].sum() == len(ref) == whole["total_tokens"]


@pytest.mark.parametrize("name, factory, kw, doc_mode", [CASES[0], CASES[4]], ids=["sliding", "stateful-doc"])
def test_resume_continues_the_spilled_files_exactly(tmp_path, make_store, monkeypatch, name, factory, kw, doc_mode):
    store = make_store(_docs(1), vocab_size=V)
    model = factory()
    kw = dict(kw, tuning=_tiny_blocks(w=2, d=2))
    ref = _evaluate(model, store, doc_mode=doc_mode, **kw)
    ck = tmp_path / "ck"
    cls = runners_mod.SlidingRunner if kw.get("mode", "sliding") == "sliding" else runners_mod.CarriedRunner
    real, seen = cls.step, [0]

    def step(self, batch):
        if seen[0] == 7:
            raise Stop
        seen[0] += 1
        return real(self, batch)

    with monkeypatch.context() as m:
        m.setattr(cls, "step", step)
        with pytest.raises(Stop):
            _evaluate(model, store, doc_mode=doc_mode, checkpoint_dir=ck, checkpoint_interval=1e-9, **kw)
    partial = sorted(p.name for p in ck.glob("*.npy.partial"))
    assert partial == sorted(f"{n}.npy.partial" for n in spill_mod.COLUMNS) and not list(ck.glob("*.npy"))
    res = _evaluate(model, store, doc_mode=doc_mode, checkpoint_dir=ck, checkpoint_interval=1e-9, **kw)
    assert 0 < res["resumed_from_window"] < res["num_chunks"]
    _identical(res, ref)
    assert sorted(p.name for p in ck.glob("*.npy")) == sorted(spill_mod.FILE_NAMES) and not list(ck.glob("*.partial"))
    np.testing.assert_array_equal(np.load(ck / "document_nll.npy"), np.asarray(ref["per_document"]["nll"]))
    again = _evaluate(model, store, doc_mode=doc_mode, checkpoint_dir=ck, checkpoint_interval=1e-9, **kw)
    _identical(again, ref)  # a finished run resumed: the published files, unchanged


def test_temporary_detail_folder_is_removed_after_success_and_error(tmp_path, monkeypatch):
    x = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0))
    ev = StreamingEvaluator(Bigram(), chunk_size=16, batch_size=2, device="cpu", verbose=False)
    res = ev.evaluate_streaming_with_metrics(x)
    assert not list(tmp_path.glob("streameval-detail-*"))
    assert len(res["chunk_losses"]) == res["num_chunks"] == 19  # still readable: the mappings keep the pages
    assert np.isfinite(np.asarray(res["chunk_times"])).all() and res["per_document"]["tokens"][0] == 299
    real, seen = runners_mod.SlidingRunner.step, [0]

    def step(self, batch):
        if seen[0] == 3:
            raise Stop
        seen[0] += 1
        return real(self, batch)

    monkeypatch.setattr(runners_mod.SlidingRunner, "step", step)
    with pytest.raises(Stop):
        ev.evaluate_streaming_with_metrics(x)
    assert not list(tmp_path.glob("streameval-detail-*"))


# ---- memory independent of the length -----------------------------------------------------------
class Wide(torch.nn.Module):
    """A bigram model over a 66-id vocabulary (the sparse store's), logits from one token each."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vocab_size = 66
        self.table = torch.nn.Embedding(66, 66)

    def forward(self, x):
        return self.table(x)


def _sparse_store(tmp_path: Path, tokens: int, monkeypatch):
    """A raw uint16 .bin of ``tokens`` zero ids that occupies no disk (os.truncate). With
    checksum=False nothing is read at open (the loader checks the ids it reads against vocab_size)."""
    import streamdata

    path = tmp_path / f"sparse-{tokens}.bin"
    with open(path, "wb"):
        pass
    os.truncate(path, 2 * tokens)
    return streamdata.open_raw_bin(path, dtype="uint16", vocab_size=66, checksum=False)


def _metric_state_at_stop(tmp_path, monkeypatch, tokens: int, batches: int = 3) -> dict:
    """Evaluate the whole sparse store (no max_tokens: the plan keeps its length) and stop inside
    batch ``batches``; measure the metric state there: the bytes of every tensor the sums hold
    (device or CPU), the Python heap allocated by the evaluator's metric modules (tracemalloc), and
    the disk used by the spilled files against their apparent size."""
    store = _sparse_store(tmp_path, tokens, monkeypatch)
    made: list[MetricSums] = []

    class Recorded(MetricSums):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    # (instrumentation, not tuning: the test reads the very MetricSums the engine builds)
    monkeypatch.setattr(engine_mod, "MetricSums", Recorded)
    seen, out = [0], {}
    real = runners_mod.SlidingRunner.step

    def step(self, batch):
        if seen[0] == batches:
            s = made[0]
            out["tensor_bytes"] = sum(v.numel() * v.element_size() for v in vars(s).values() if isinstance(v, torch.Tensor))
            snap = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, f"*{os.sep}evaluator{os.sep}{m}.py") for m in ("metrics", "spill", "engine", "results")])
            out["heap_bytes"] = sum(st.size for st in snap.statistics("filename"))
            f = s.spill.columns["window_nll"]
            out["window_file"] = (os.stat(f.path).st_size, os.stat(f.path).st_blocks * 512)
            out["windows"] = s.spill.num_windows
            raise Stop
        seen[0] += 1
        return real(self, batch)

    monkeypatch.setattr(runners_mod.SlidingRunner, "step", step)
    ev = StreamingEvaluator(Wide(), chunk_size=1 << 16, batch_size=2, mode="sliding", device="cpu", verbose=False,
                            check_tokenizer=False)
    tracemalloc.start()
    try:
        with pytest.raises(Stop):
            ev.evaluate_streaming_with_metrics(store)
    finally:
        tracemalloc.stop()
        store.close()
    return out


def test_metric_memory_does_not_depend_on_the_stream_length(tmp_path, monkeypatch):
    """10^8 vs 10^11 tokens (1,526 vs 1,525,879 windows of 65,536): the same metric state, under
    1 MiB. Whole-run sums (the old design) held 16 bytes per window on the device (24 MB at 10^11)
    and copied the whole run's arrays to the host at the end."""
    with monkeypatch.context() as m:
        small = _metric_state_at_stop(tmp_path, m, 10**8)
    with monkeypatch.context() as m:
        big = _metric_state_at_stop(tmp_path, m, 10**11)
    assert big["windows"] > 900 * small["windows"]
    assert big["tensor_bytes"] == small["tensor_bytes"] < 1 << 20
    assert big["heap_bytes"] < 1 << 20 and small["heap_bytes"] < 1 << 20
    apparent, used = big["window_file"]
    assert apparent >= 8 * big["windows"] and used < 1 << 20  # sparse: disk only for what was written


# ---- pieces ------------------------------------------------------------------------------------
def test_block_view_and_block_sum():
    a = np.arange(1, 11, dtype=np.float64)
    b = np.full(10, 2, np.int64)
    v = BlockView(np.divide, a, b, block=4)
    assert len(v) == 10 and v.shape == (10,) and v[0] == 0.5 and v[-1] == 5.0 and v[-10] == 0.5
    with pytest.raises(IndexError):
        v[10]
    np.testing.assert_array_equal(v[2:5], a[2:5] / 2)
    np.testing.assert_array_equal(np.asarray(v), a / 2)
    assert list(v) == (a / 2).tolist() and [len(x) for x in v.blocks()] == [4, 4, 2]
    np.testing.assert_array_equal(v[[1, 3]], [1.0, 2.0])
    big = np.full(10, 2**60, np.int64)
    assert block_sum(big, block=4) == 10 * 2**60  # exact Python ints across blocks (a float sum would round)
    assert block_sum(a, 7, block=4) == 28.0 and block_sum(a, 3, block=4) == 6.0


def test_chunk_mean_and_std_across_blocks_match_numpy():
    rng = np.random.default_rng(0)
    nll, tok = rng.random(1000) * 50, rng.integers(1, 30, 1000)
    one = summarize_chunks(nll, tok)
    loss = nll / tok
    assert one["avg_chunk_loss"] == float(np.mean(loss)) and one["std_chunk_loss"] == float(np.std(loss))
    many = summarize_chunks(nll, tok, block=64)
    assert many["avg_chunk_loss"] == pytest.approx(np.mean(loss), rel=1e-14)
    assert many["std_chunk_loss"] == pytest.approx(np.std(loss), rel=1e-12)
    np.testing.assert_array_equal(np.asarray(many["chunk_perplexities"]), np.exp(loss))


def test_spill_files_refuse_a_missing_or_different_file_on_resume(tmp_path):
    f = SpillFiles(tmp_path, 10, 3)
    f.write("window_nll", 2, np.array([1.5, 2.5]))
    f.sync()
    f.discard()
    assert (tmp_path / "window_nll.npy.partial").exists()  # named folder: kept for a resume
    assert np.load(tmp_path / "window_nll.npy.partial")[:4].tolist() == [0, 0, 1.5, 2.5]
    with pytest.raises(ValueError, match="not"):
        SpillFiles(tmp_path, 11, 3, resume=True)
    (tmp_path / "document_nll.npy.partial").unlink()
    with pytest.raises(ValueError, match="missing"):
        SpillFiles(tmp_path, 10, 3, resume=True)


def test_report_csvs_written_in_blocks_equal_one_block(tmp_path, make_store):
    store = make_store(_docs(2), vocab_size=V)
    ev = StreamingEvaluator(gru_lm(), chunk_size=8, doc_mode="document", device="cpu", verbose=False)
    # spilled into a named folder, as the CLI's --out: the columns are read back from the files
    res = ev.evaluate_streaming_with_metrics(store, checkpoint_dir=tmp_path / "run")
    one = write_report(res, tmp_path / "a", plots=False)
    many = write_report(res, tmp_path / "b", plots=False, csv_block=3)  # many blocks per CSV
    for name in ("chunks", "documents", "positions"):
        rows = list(csv.reader(open(one[name])))
        assert len(rows) - 1 > 2 * 3 and list(csv.reader(open(many[name]))) == rows, name  # 3+ blocks


def test_cli_report_from_spilled_files(tmp_path, make_store, capsys):
    docs = _docs(2)
    store = make_store(docs, vocab_size=V)
    base = ["run", str(store), "--model", "tests.evaluator.helpers:gru_lm", "--device", "cpu", "--quiet", "--no-plots",
            "--chunk-size", "8", "--doc-mode", "document"]
    out = tmp_path / "b"
    assert main([*base, "--out", str(out)]) == 0
    rows = list(csv.reader(open(out / "documents.csv")))[1:]
    assert len(rows) == len(docs) and [int(r[1]) for r in rows] == np.load(out / "document_tokens.npy").tolist()
    wn, wt = np.load(out / "window_nll.npy"), np.load(out / "window_tokens.npy")
    chunks = list(csv.reader(open(out / "chunks.csv")))[1:]
    assert [float(r[1]) for r in chunks] == (wn / wt).tolist()
    assert main([*base, "--chunk-size", "6", "--out", str(out), "--overwrite"]) == 0  # removes the spilled files too
    assert len(np.load(out / "window_nll.npy")) == len(list(csv.reader(open(out / "chunks.csv")))) - 1


def test_plot_groups_chunks_beyond_the_point_limit():
    loss = np.linspace(0.0, 3.0, 95)
    x, ppl, group = report_mod._chunk_curve(BlockView(lambda a: a, loss), points=10)
    assert group == 10 and len(ppl) == 10
    want = [loss[i : i + 10].mean() for i in range(0, 95, 10)]
    np.testing.assert_allclose(np.log(ppl), want, rtol=1e-12)
    assert x.tolist() == [min(94, i * 10 + 5) for i in range(10)]
    x, ppl, group = report_mod._chunk_curve(loss[:7], points=10)
    assert group == 1 and x.tolist() == list(range(7))


@pytest.mark.parametrize("mode, overlap, bos", [("stream", 3, None), ("document", 0, 1), ("document", 2, None)])
def test_batch_doc_range_holds_every_scored_target(make_store, mode, overlap, bos):
    """The per-document block is sized from WindowBatch.doc_range: every scored target's document
    must lie in it, and no batch scores a document before the last one its predecessor scored."""
    from streamdata.loader import WindowLoader

    store = make_store(_docs(3), vocab_size=V)
    last = -1
    with WindowLoader(store, chunk_size=6, overlap=overlap, doc_mode=mode, batch_windows=3, device="cpu",
                      prepend_bos_id=bos) as ld:
        for b in ld:
            lo, hi = b.doc_range
            docs = b.doc_ids[b.score_mask]
            assert lo <= int(docs.min()) and int(docs.max()) <= hi
            assert int(docs.min()) >= last  # documents in order: earlier ones are final at a flush
            last = int(docs.max())
