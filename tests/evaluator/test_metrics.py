"""Metric formulas against hand computation; per-document, per-position, per-chunk and per-token
results against numpy references; byte/word metrics from the store's counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluator import DataError, StreamingEvaluator, bits_per_byte, byte_perplexity, perplexity, word_perplexity
from evaluator.metrics import position_bucket_edges

from .helpers import V, Bigram, TinyRNN, Uniform, tiny_gpt2


def test_formulas_by_hand():
    # 3 tokens costing 1, 2 and 3 nats over 12 bytes and 2 words
    nll = 6.0
    assert perplexity(nll, 3) == pytest.approx(math.e ** 2)
    assert bits_per_byte(nll, 12) == pytest.approx(0.5 / math.log(2))
    assert byte_perplexity(nll, 12) == pytest.approx(math.exp(0.5))
    assert word_perplexity(nll, 2) == pytest.approx(math.exp(3.0))
    assert bits_per_byte(nll, None) is None and word_perplexity(nll, 0) is None
    assert perplexity(1e6, 1) == math.inf


def test_position_bucket_edges():
    assert position_bucket_edges(0).tolist() == [1]
    assert position_bucket_edges(1).tolist() == [1, 2]
    assert position_bucket_edges(7).tolist() == [1, 2, 4, 8]
    assert position_bucket_edges(8).tolist() == [1, 2, 4, 8, 16]


def _docs(seed=0, lens=(5, 1, 40, 0, 17, 2, 64)):
    g = np.random.default_rng(seed)
    return [g.integers(0, V, n).tolist() for n in lens]


@pytest.mark.parametrize("doc_mode", ["stream", "document"])
def test_uniform_model_on_store_gives_known_metrics(make_store, doc_mode):
    docs = _docs()
    n = sum(map(len, docs))
    path = make_store(docs, vocab_size=V)  # 4 bytes and 1 word per token
    ev = StreamingEvaluator(Uniform(), chunk_size=8, overlap=3, device="cpu", doc_mode=doc_mode, verbose=False)
    r = ev.evaluate_streaming_with_metrics(path)
    scored = n - 1 if doc_mode == "stream" else sum(max(0, len(d) - 1) for d in docs)
    assert r["total_tokens"] == scored
    assert r["loss"] == pytest.approx(math.log(V))
    assert r["perplexity"] == pytest.approx(V)
    total = scored * math.log(V)
    assert r["bits_per_byte"] == pytest.approx(total / (4 * n) / math.log(2))
    assert r["byte_perplexity"] == pytest.approx(math.exp(total / (4 * n)))
    assert r["word_perplexity"] == pytest.approx(math.exp(total / n))
    assert r["total_bytes"] == 4 * n and r["total_words"] == n
    assert r["num_documents"] == len(docs)


def _bigram_reference(m: Bigram, docs, doc_mode, bos=None):
    """(nll, doc, position) of every scored target in order, from the context-free bigram table."""
    rows = []
    flat = [(t, d, p) for d, doc in enumerate(docs) for p, t in enumerate(doc)]
    if doc_mode == "stream":
        seq = ([(bos, -1, -1)] if bos is not None else []) + flat
        for a, b in zip(seq[:-1], seq[1:]):
            rows.append((m.nll(np.array([a[0]]), np.array([b[0]]))[0], b[1], b[2]))
    else:
        for d, doc in enumerate(docs):
            seq = ([bos] if bos is not None else []) + list(doc)
            for i in range(1, len(seq)):
                rows.append((m.nll(np.array([seq[i - 1]]), np.array([seq[i]]))[0], d, i - (bos is not None)))
    return rows


@pytest.mark.parametrize("doc_mode,bos", [("stream", None), ("document", None), ("document", 7), ("stream", 7)])
def test_per_document_and_position_results(make_store, tmp_path, doc_mode, bos):
    docs = _docs(1)
    path = make_store(docs, vocab_size=V, nbytes=[3 * len(d) + 1 for d in docs], nwords=[len(d) // 2 for d in docs])
    m = Bigram()
    ref = _bigram_reference(m, docs, doc_mode, bos)
    nll = np.array([r[0] for r in ref])
    doc = np.array([r[1] for r in ref])
    pos = np.array([r[2] for r in ref])
    per_tok = tmp_path / "tok.f32"
    ev = StreamingEvaluator(m, chunk_size=6, overlap=2, device="cpu", doc_mode=doc_mode, bos=bos, verbose=False,
                            per_token_path=str(per_tok), batch_size=4)
    r = ev.evaluate_streaming_with_metrics(path, compute_per_token_metrics=True)
    assert r["bos_id"] == bos and r["total_tokens"] == len(ref)
    # per-token: a memmap over the file we named, equal to the reference in order
    assert isinstance(r["per_token_losses"], np.memmap) and r["per_token_path"] == str(per_tok)
    np.testing.assert_allclose(np.asarray(r["per_token_losses"]), nll, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.fromfile(per_tok, dtype=np.float32), nll, rtol=1e-5, atol=1e-6)
    # per document: sums and counts
    pd = r["per_document"]
    for d in range(len(docs)):
        assert pd["tokens"][d] == (doc == d).sum()
        assert pd["nll"][d] == pytest.approx(nll[doc == d].sum(), rel=1e-5, abs=1e-9)
    # position buckets [0,1), [1,2), [2,4), ...
    pb = r["position_buckets"]
    for lo, hi, cnt, s in zip(pb["lo"], pb["hi"], pb["tokens"], pb["nll"]):
        sel = (pos >= lo) & (pos < hi)
        assert cnt == sel.sum() and s == pytest.approx(nll[sel].sum(), rel=1e-5, abs=1e-9)
    assert pb["tokens"].sum() == len(ref)
    # byte and word metrics from the store's counts
    nbytes = sum(3 * len(d) + 1 for d in docs)
    nwords = sum(len(d) // 2 for d in docs)
    assert r["bits_per_byte"] == pytest.approx(nll.sum() / nbytes / math.log(2), rel=1e-5)
    assert r["word_perplexity"] == pytest.approx(math.exp(nll.sum() / nwords), rel=1e-5)
    assert r["loss"] == pytest.approx(nll.mean(), rel=1e-5)


def test_max_tokens_counts_bytes_of_complete_documents_only(make_store):
    docs = _docs(2, lens=(10, 10, 10))
    path = make_store(docs, vocab_size=V)
    m = Bigram()
    r = StreamingEvaluator(m, chunk_size=4, device="cpu", verbose=False).evaluate_streaming_with_metrics(path, max_tokens=25)
    assert r["total_tokens"] == 24
    ref = _bigram_reference(m, docs, "stream")[:24]
    nll_complete = sum(x[0] for x in ref if x[1] < 2)  # documents 0 and 1 end before token 25
    assert r["byte_metric_documents"] == 2 and r["total_bytes"] == 4 * 20
    assert r["bits_per_byte"] == pytest.approx(nll_complete / 80 / math.log(2), rel=1e-5)


def test_chunk_metrics(make_store):
    x = torch.randint(0, V, (100,), generator=torch.Generator().manual_seed(3))
    m = Bigram()
    nll = m.nll(x[:-1].numpy(), x[1:].numpy())
    r = StreamingEvaluator(m, chunk_size=30, overlap=10, device="cpu", verbose=False).evaluate_streaming_with_metrics(x)
    # windows score targets 1-30, 31-50, 51-70, 71-90, 91-99
    bounds = [(0, 30), (30, 50), (50, 70), (70, 90), (90, 99)]
    want = [nll[a:b].mean() for a, b in bounds]
    assert r["num_chunks"] == 5 and len(r["chunk_times"]) == 5
    np.testing.assert_allclose(r["chunk_losses"], want, rtol=1e-5)
    np.testing.assert_allclose(r["chunk_perplexities"], np.exp(want), rtol=1e-5)
    assert r["avg_chunk_loss"] == pytest.approx(np.mean(want), rel=1e-5)
    assert r["std_chunk_loss"] == pytest.approx(np.std(want), rel=1e-4)
    assert r["loss"] == pytest.approx(nll.mean(), rel=1e-5)  # sums, not a mean of chunk means
    assert r["bits_per_byte"] is None and r["word_perplexity"] is None  # raw tensor: no counts, none invented


def test_result_keys_of_the_quick_reference():
    m = TinyRNN()
    x = torch.randint(0, V, (64,))
    ev = StreamingEvaluator(m, chunk_size=16, device="cpu", verbose=False)
    basic = ev.evaluate_streaming(x, max_tokens=50, log_interval=1)
    for k in ("loss", "perplexity", "total_tokens", "num_chunks", "total_time", "tokens_per_second", "avg_chunk_time"):
        assert k in basic
    assert basic["total_tokens"] == 49 and basic["num_chunks"] == 4
    full = ev.evaluate_streaming_with_metrics(x)
    for k in ("chunk_losses", "chunk_perplexities", "chunk_times", "avg_chunk_loss", "std_chunk_loss",
              "avg_chunk_time", "per_token_losses"):
        assert k in full
    assert full["per_token_losses"] is None


def test_bfloat16_autocast_is_close():
    m = tiny_gpt2(n_positions=64)
    x = torch.randint(0, V, (120,), generator=torch.Generator().manual_seed(9))
    a = StreamingEvaluator(m, chunk_size=32, overlap=8, device="cpu", verbose=False).evaluate_streaming(x)
    b = StreamingEvaluator(m, chunk_size=32, overlap=8, device="cpu", verbose=False, dtype="bfloat16").evaluate_streaming(x)
    assert b["dtype"] == "bfloat16"
    assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)


def test_progress_lines(capsys):
    x = torch.randint(0, V, (200,))
    StreamingEvaluator(Bigram(), chunk_size=10, device="cpu", batch_size=2, verbose=True).evaluate_streaming(x, log_interval=5)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("[streameval] mode sliding (auto: ")  # auto's choice, and why
    assert [line.split()[2] for line in err[1:]] == ["6/20", "10/20", "16/20", "20/20"]


def _evaluate_with_stderr(stream, monkeypatch):
    monkeypatch.setattr("sys.stderr", stream)
    x = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(0))
    StreamingEvaluator(Bigram(), chunk_size=10, device="cpu", batch_size=2, verbose=True).evaluate_streaming(x, log_interval=5)
    stream.flush()


def test_progress_is_a_bar_on_a_terminal_and_lines_in_a_pipe(monkeypatch):
    """A pseudo-terminal gets tqdm's bar (scored tokens, rate, ETA, running loss); a pipe gets
    plain lines, one per log interval, and no bar control characters."""
    import os
    import pty

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    with os.fdopen(slave, "w", buffering=1) as tty:
        _evaluate_with_stderr(tty, monkeypatch)
        out = b""
        while True:
            import select

            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                break
            out += os.read(master, 65536)
    os.close(master)
    text = out.decode(errors="replace")
    assert "streameval:" in text and "399/399" in text and "tok/s" in text and "\r" in text and "loss" in text
    assert "[streameval] chunk" not in text

    r, w = os.pipe()
    with os.fdopen(w, "w") as pipe:
        _evaluate_with_stderr(pipe, monkeypatch)
    with os.fdopen(r) as f:
        text = f.read()
    lines = [line for line in text.splitlines() if line.startswith("[streameval] chunk")]
    assert len(lines) == 8 and lines[-1].split()[2] == "40/40" and "\r" not in text


def test_in_memory_documents_with_counts():
    from evaluator import EvalData

    docs = _docs(4, lens=(12, 30, 7))
    flat = torch.tensor(sum(docs, []))
    off = np.cumsum([0] + [len(d) for d in docs])
    ed = EvalData.from_tokens(flat, off, doc_bytes=[10, 20, 30], doc_words=[1, 2, 3])
    m = Bigram()
    ref = _bigram_reference(m, docs, "document")
    nll = sum(x[0] for x in ref)
    r = StreamingEvaluator(m, chunk_size=8, device="cpu", doc_mode="document", verbose=False).evaluate_streaming_with_metrics(ed)
    assert r["total_tokens"] == len(ref) == 46
    assert r["bits_per_byte"] == pytest.approx(nll / 60 / math.log(2), rel=1e-5)
    assert r["word_perplexity"] == pytest.approx(math.exp(nll / 6), rel=1e-5)
    with pytest.raises(DataError, match="doc_offsets must be non-decreasing"):
        EvalData.from_tokens(flat, [0, 5, 3, 49])
    with pytest.raises(DataError, match="doc_bytes has"):
        EvalData.from_tokens(flat, off, doc_bytes=[1, 2])
