"""Window loader across threads and modes (CPU): the ring must not depend on the caller's
grad/inference mode, and a reader that does not stop must never share its ring with a later pass.

These reproduce, without a GPU, two defects of the CUDA path: the reader thread's ``copy_`` into a
ring allocated under the caller's ``torch.inference_mode()`` raised "Inplace update to inference
tensor outside InferenceMode" on the first CUDA batch; and a reader that outlived ``close()`` kept
writing into a ring slot that the next iteration had been handed.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from streamdata import open_store
from streamdata.loader import LoaderTuning, WindowLoader
from tests.streamdata.test_loader import batch_tuples, random_docs, run

L, O = 16, 4


@pytest.fixture
def store(make_store):
    rng = np.random.default_rng(7)
    return make_store(random_docs(rng, 30, 80, 65536), vocab_size=65536, shard_tokens=113)


def ring_tensors(ring) -> list[torch.Tensor]:
    names = ("host_tok", "host_meta", "dev_tok", "dev_meta")
    return [t for n in names for t in getattr(ring, n, [])]


def copy_like_the_cuda_reader(ring) -> list[BaseException]:
    """What ``_emit_cuda`` does to the ring, from a plain thread (as the reader thread is):
    ``slot[:n].copy_(src)``. Returns the exceptions raised."""
    errors: list[BaseException] = []

    def work():
        try:
            for t in ring_tensors(ring):
                t[:3].copy_(torch.arange(3, dtype=t.dtype))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            errors.append(e)

    th = threading.Thread(target=work, name="test-reader-ops")
    th.start()
    th.join()
    return errors


@pytest.mark.parametrize("mode_ctx", [torch.inference_mode, torch.no_grad])
def test_iterating_inside_inference_mode_gives_plain_ring_tensors(store, mode_ctx):
    with open_store(store) as s:
        ld = WindowLoader(s, chunk_size=L, overlap=O, batch_windows=3, device="cpu")
        want, _ = run(WindowLoader(s, chunk_size=L, overlap=O, batch_windows=3, device="cpu"), L)
        got = []
        with mode_ctx():  # the evaluator iterates its loader inside inference_mode
            it = iter(ld)  # allocates the ring in this thread, in this mode
            ring = it._ring
            for b in it:
                got += batch_tuples(b, L)
        assert got == want
        assert ring_tensors(ring) and not any(t.is_inference() for t in ring_tensors(ring))
        assert copy_like_the_cuda_reader(ring) == []
        # the ring is reused by the next pass, now outside inference mode: still writable, same batches
        assert ld._ring is ring
        assert run(ld, L)[0] == want


def test_a_reader_that_does_not_stop_keeps_its_ring(store):
    with open_store(store) as s:
        ld = WindowLoader(s, chunk_size=L, overlap=O, batch_windows=2, device="cpu", num_slots=2,
                          tuning=LoaderTuning(join_timeout_s=0.2))  # close() gives up on the hung reader soon
        want, _ = run(ld, L)  # allocates the ring and hands it back for reuse
        real = s.read_into
        calls, entered, release = [0], threading.Event(), threading.Event()

        def hanging_read(a, b, out):
            calls[0] += 1
            if calls[0] == 3:  # the reader's third batch hangs (a stuck network read, say)
                entered.set()
                release.wait(10)
            real(a, b, out)

        s.read_into = hanging_read
        s.view = lambda a, b: None  # no zero-copy gather: every batch goes through read_into
        it = iter(ld)
        old_ring = it._ring
        next(it)
        assert entered.wait(5)
        with pytest.warns(RuntimeWarning, match="did not stop"):
            it.close()
        assert ld._ring is None, "a ring whose reader is still running must not be reused"
        s.read_into = real
        it2 = iter(ld)
        assert it2._ring is not old_ring
        release.set()  # the old reader now finishes its read into *its own* slot, then exits
        got = []
        for b in it2:
            got += batch_tuples(b, L)
        assert got == want


@pytest.mark.parametrize("overlap", [0, 4])
def test_ids_beyond_vocab_size_stop_the_loader_with_one_line(make_store, overlap):
    from streamdata.errors import StoreError

    docs = [list(range(60)), [1, 2, 3, 99, 4] + list(range(30))]
    with open_store(make_store(docs, vocab_size=1000)) as s:
        ok = WindowLoader(s, chunk_size=L, overlap=overlap, batch_windows=2, device="cpu", vocab_size=100)
        assert len(run(ok, L)[0]) > 0  # every id < 100: nothing raised
        ld = WindowLoader(s, chunk_size=L, overlap=overlap, batch_windows=2, device="cpu", vocab_size=99)
        seen = 0
        with pytest.raises(StoreError) as e:
            for _ in ld:
                seen += 1
        assert "token id 99 at position 63 of store" in str(e.value) and "\n" not in str(e.value)
        assert seen >= 1  # the batches before the bad span were delivered
