"""Window loader on CUDA (skipped without a GPU): same tensors as the CPU path, copies on a side
stream of pinned memory that overlap compute, and no host synchronisation in the consumer's loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from streamdata import open_store
from streamdata.loader import WindowLoader

pytestmark = pytest.mark.cuda

FIELDS = ("inputs", "targets", "score_mask", "lengths", "doc_ids", "positions")


def random_store(make_store, vocab, n_docs=40, max_len=300, seed=0, shard_tokens=500):
    rng = np.random.default_rng(seed)
    lens = rng.choice([0, 1, 2] + list(range(3, max_len)), size=n_docs)
    return make_store([rng.integers(0, vocab, size=int(n)).tolist() for n in lens], vocab_size=vocab,
                      shard_tokens=shard_tokens)


def assert_same_batches(cpu, gpu):
    assert len(cpu) == len(gpu) > 0
    for c, g in zip(cpu, gpu):
        assert g.inputs.is_cuda and g.score_mask.is_cuda
        for f in FIELDS:
            assert torch.equal(getattr(c, f), getattr(g, f).cpu()), f
        assert (c.first_window, c.num_windows, c.num_scored) == (g.first_window, g.num_windows, g.num_scored)


@pytest.mark.parametrize("vocab", [65536, 1 << 20])  # uint16 (ids >= 32768) and uint32 (ids > 65535)
@pytest.mark.parametrize("mode, L, O, bos", [("stream", 64, 0, None), ("stream", 64, 16, 3),
                                             ("document", 32, 8, 3), ("document", 32, 0, None)])
def test_device_tensors_equal_the_cpu_path(make_store, vocab, mode, L, O, bos):
    with open_store(random_store(make_store, vocab)) as s:
        kw = dict(chunk_size=L, overlap=O, mode=mode, batch_windows=5, prepend_bos_id=bos, num_slots=3)
        cpu = list(WindowLoader(s, device="cpu", **kw))
        gpu = list(WindowLoader(s, device="cuda", **kw))
        assert_same_batches(cpu, gpu)
        # the consumer may iterate on a stream of its own: the loader waits on the current stream
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            gpu = list(WindowLoader(s, device="cuda", **kw))
        stream.synchronize()
        assert_same_batches(cpu, gpu)


def test_default_device_is_cuda_and_break_is_clean(make_store):
    with open_store(random_store(make_store, 1000)) as s:
        ld = WindowLoader(s, chunk_size=16, batch_windows=2)
        assert ld.device.type == "cuda"
        for i, b in enumerate(ld):
            assert b.inputs.device.type == "cuda"
            if i == 2:
                break


def test_copies_use_a_pinned_side_stream_overlap_compute_and_never_sync(make_store, tmp_path):
    """Profile a loop whose compute (matmuls) outlasts each batch's copy. Fails if the copies run on
    the compute stream, come from pageable memory, never overlap a kernel, if the consumer thread
    synchronises with the device, or if a slot is reused too early (wrong checksums under load)."""
    rng = np.random.default_rng(1)
    n = 1 << 22
    docs = [rng.integers(0, 65536, size=n).tolist()]
    with open_store(make_store(docs, vocab_size=65536, shard_tokens=1 << 20)) as s:
        kw = dict(chunk_size=8192, batch_windows=16, num_slots=3)
        want = [int(b.inputs.sum()) + int(b.targets.sum()) for b in WindowLoader(s, device="cpu", **kw)]
        a = torch.randn(2048, 2048, device="cuda")
        torch.cuda.synchronize()
        compute = torch.cuda.current_stream()
        sums = []
        prof_kw = dict(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
        with torch.profiler.profile(**prof_kw) as prof:
            it = iter(WindowLoader(s, device="cuda", **kw))
            side = it._pipe.ring.side_stream
            for b in it:
                for _ in range(4):  # a millisecond or more of compute per batch on the consumer's stream
                    a = torch.tanh(a @ a)
                sums.append(b.inputs.sum() + b.targets.sum())  # device scalars: no sync
            torch.cuda.synchronize()  # the only sync, after the loop
        assert side != compute, "the copies must run on a side stream"
        assert [int(x) for x in sums] == want

        path = tmp_path / "trace.json"
        prof.export_chrome_trace(str(path))
        events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
        copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
        big = [e for e in copies if e.get("args", {}).get("bytes", 0) >= 16 * 8192 * 2]  # token spans
        kernels = [e for e in events if e.get("cat") == "kernel"]
        assert big, f"no token-span copies in the trace: {sorted({e['name'] for e in copies})}"
        assert all("Pinned" in e["name"] for e in big), "spans must be copied from pinned memory"
        busy: dict = {}
        for k in kernels:  # the compute stream is the one with the most kernel time (the matmuls)
            busy[k["args"]["stream"]] = busy.get(k["args"]["stream"], 0) + k["dur"]
        compute_streams = {max(busy, key=busy.get)}
        assert not {e["args"]["stream"] for e in big} & compute_streams, "span copies ran on the compute stream"

        def overlaps(c, k):
            return c["ts"] < k["ts"] + k["dur"] and k["ts"] < c["ts"] + c["dur"]

        long_kernels = [k for k in kernels if k["args"]["stream"] in compute_streams and k["dur"] > 20]
        n_overlap = sum(any(overlaps(c, k) for k in long_kernels) for c in big)
        assert n_overlap >= len(big) // 4, f"only {n_overlap} of {len(big)} span copies overlapped compute"

        syncs = [e["name"] for e in events if e.get("cat") == "cuda_runtime"
                 and e["name"] in ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaMemcpy")]
        assert syncs.count("cudaDeviceSynchronize") == 1 and syncs.count("cudaStreamSynchronize") == 0, syncs
        assert not [e for e in events if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")]


def _checksums(batches):
    return [(int(b.inputs.sum()), int(b.targets.sum()), int(b.score_mask.sum())) for b in batches]


def _cpu_checksums(store, **kw):
    return _checksums(WindowLoader(store, device="cpu", **kw))


@pytest.mark.parametrize("overlap", [0, 96])
def test_a_slow_consumer_with_two_slots_never_sees_a_reused_slot(make_store, overlap):
    """The consumer's stream is kept busy (torch.cuda._sleep) after each batch, so the producer
    would overwrite a slot still being read if it did not wait for ``consumed[i]``."""
    with open_store(random_store(make_store, 65536, n_docs=60, max_len=2000, shard_tokens=3000)) as s:
        kw = dict(chunk_size=256, overlap=overlap, batch_windows=4, num_slots=2)
        want = _cpu_checksums(s, **kw)
        got = []
        for b in WindowLoader(s, device="cuda", **kw):
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU time before the batch is read
            got.append((b.inputs.sum(), b.targets.sum(), b.score_mask.sum()))
        assert [tuple(int(x) for x in g) for g in got] == want


def test_a_delayed_side_stream_is_waited_for(make_store, monkeypatch):
    """Each copy on the side stream is queued behind a long sleep kernel: a consumer that did not
    wait on ``copied[i]`` would read a slot before its tokens arrive."""
    import streamdata.loader as loader_mod

    real = loader_mod._Pipeline._emit_cuda

    def slow_emit(self, b, lo, hi):
        with torch.cuda.stream(self.ring.side_stream):
            torch.cuda._sleep(5_000_000)  # queued on the side stream before this batch's copy
        return real(self, b, lo, hi)

    # Fault injection, so a patch: the delay must sit on the side stream right before the reader's
    # own copy, inside its loop; a public hook there would be a test-only branch in the hot path.
    monkeypatch.setattr(loader_mod._Pipeline, "_emit_cuda", slow_emit)
    with open_store(random_store(make_store, 1 << 20, n_docs=30, max_len=1500)) as s:
        kw = dict(chunk_size=128, overlap=32, mode="document", batch_windows=3, num_slots=2, prepend_bos_id=1)
        assert _checksums(WindowLoader(s, device="cuda", **kw)) == _cpu_checksums(s, **kw)


def test_reiteration_after_break_and_two_concurrent_iterators(make_store):
    with open_store(random_store(make_store, 65536, n_docs=50, max_len=800)) as s:
        kw = dict(chunk_size=64, overlap=16, batch_windows=3, num_slots=3)
        want = _cpu_checksums(s, **kw)
        ld = WindowLoader(s, device="cuda", **kw)
        for i, _ in enumerate(ld):
            if i == 2:
                break
        assert _checksums(ld) == want  # the ring handed back by the broken pass is reused safely
        a, b = iter(ld), iter(ld)  # the second concurrent pass gets a ring of its own
        assert a._ring is not b._ring
        got_a, got_b = [], []
        for x, y in zip(a, b):
            got_a.append(x)
            got_b.append(y)
        assert _checksums(got_a) == _checksums(got_b) == want


def test_iterating_inside_inference_mode_on_cuda(make_store):
    """The evaluator iterates inside torch.inference_mode(): the reader thread's copies into the
    ring used to fail there ("Inplace update to inference tensor outside InferenceMode")."""
    with open_store(random_store(make_store, 65536)) as s:
        kw = dict(chunk_size=32, overlap=8, batch_windows=4)
        want = _cpu_checksums(s, **kw)
        ld = WindowLoader(s, device="cuda", **kw)
        with torch.inference_mode():
            got = _checksums(ld)
        assert got == want
        assert _checksums(ld) == want  # the same ring, reused outside inference mode


def test_slots_grow_on_cuda_for_batches_spanning_many_short_documents(make_store):
    """Batches whose span (1-token documents between their windows) and document count exceed the
    ring's first slot sizes: the reader grows host, pinned and device slots; same tensors as the CPU."""
    rng = np.random.default_rng(3)
    docs = []
    for _ in range(8):
        docs.append(rng.integers(0, 500, size=5).tolist())  # one window of 4 each
        docs += [[int(t)] for t in rng.integers(0, 500, size=int(rng.integers(20, 90)))]
    with open_store(make_store(docs, vocab_size=500, shard_tokens=10_000)) as s:
        kw = dict(chunk_size=4, overlap=1, mode="document", batch_windows=3, num_slots=2)
        cpu = list(WindowLoader(s, device="cpu", **kw))
        ld = WindowLoader(s, device="cuda", **kw)
        gpu = list(ld)
        assert_same_batches(cpu, gpu)
        assert max(t.numel() for t in ld._ring.dev_tok) > ld._span_cap  # a slot grew
        assert max(t.numel() for t in ld._ring.dev_meta) > ld._meta_cap
