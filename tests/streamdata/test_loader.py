"""Window loader on CPU: batches reproduce a brute-force enumeration of (input, target, scored, doc,
position) tuples; resume, rank blocks, unsigned widening, and clean shutdown (no leaked threads)."""

from __future__ import annotations

import bisect
import threading
import time

import numpy as np
import pytest
import torch

from streamdata import open_store
from streamdata.errors import ConfigError
from streamdata.loader import LoaderTuning, WindowBatch, WindowLoader
from streamdata.windows import PlanBlocks
from tests.conftest import write_token_store
from tests.streamdata.test_windows import brute_windows

BOS = 7


def random_docs(rng, n_docs, max_len, vocab):
    lens = rng.choice([0, 1, 2, 3] + list(range(4, max_len)), size=n_docs)
    # ids across the whole vocabulary: in uint16 half of them are >= 32768 (negative as int16 bits)
    return [rng.integers(0, vocab, size=int(n)).tolist() for n in lens]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores with many small shards (windows cross shard boundaries): uint16 and uint32."""
    rng = np.random.default_rng(1234)
    root = tmp_path_factory.mktemp("loader-stores")
    out = {}
    for name, vocab, n_docs in (("u16", 65536, 60), ("u32", 1 << 20, 25)):
        docs = random_docs(rng, n_docs, 90, vocab)
        out[name] = write_token_store(root / name, docs, vocab_size=vocab, shard_tokens=97)
    return out


def expected_tuples(store, L, O, mode, bos_id, windows=None):
    """Brute force: per planned window, per input position j < length:
    (input id, target id, scored?, target's document, target's position in that document)."""
    x = store.read(0, len(store)).astype(np.int64).tolist()
    off = np.asarray(store.doc_offsets).tolist()
    wins = brute_windows(off, L, O, mode, bos_id is not None) if windows is None else windows
    out = []
    for s, n, f, _, is_bos in wins:
        for j in range(n):
            inp = bos_id if (is_bos and j == 0) else x[s + j]
            p = s + 1 + j
            d = bisect.bisect_right(off, p) - 1  # last document starting at or before p
            out.append((inp, x[p], j >= f, d, p - off[d]))
    return out


def batch_tuples(batch: WindowBatch, L: int):
    B = batch.batch_size
    assert batch.inputs.shape == batch.targets.shape == batch.score_mask.shape == (B, L)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64 and batch.score_mask.dtype == torch.bool
    assert batch.doc_ids.shape == batch.positions.shape == (B, L) and batch.doc_ids.dtype == torch.int64
    assert batch.lengths.shape == (B,) and batch.num_windows == B
    w = batch.windows  # the batch's windows of the plan, on the host
    assert len(w) == B and w.first == batch.first_window
    assert w.length.tolist() == batch.lengths.tolist() and int((w.length - w.score_from).sum()) == batch.num_scored
    assert batch.num_scored == int(batch.score_mask.sum())
    valid = np.arange(L)[None, :] < batch.lengths.numpy()[:, None]
    cols = [t.numpy() for t in (batch.inputs, batch.targets, batch.score_mask, batch.doc_ids, batch.positions)]
    # padding: zeros, never scored, no document, no position
    assert not cols[0][~valid].any() and not cols[1][~valid].any() and not cols[2][~valid].any()
    assert (cols[3][~valid] == -1).all() and (cols[4][~valid] == -1).all()
    inp, tgt, sc, doc, pos = (c[valid].tolist() for c in cols)  # row-major: window by window
    return list(zip(inp, tgt, sc, doc, pos))


def run(loader, L):
    got, firsts = [], []
    for batch in loader:
        got += batch_tuples(batch, L)
        firsts.append((batch.first_window, batch.num_windows))
    return got, firsts


@pytest.fixture(params=["default", "tiny"])
def tuning(request):
    """Run a test with the default table/group sizes and again with tiny ones, so a pass crosses
    many batch tables (the reader's blocks of windows) and many groups of the lazy plan."""
    if request.param == "tiny":
        return LoaderTuning(table_windows=5, plan_blocks=PlanBlocks(index_docs=2, pass_docs=3))
    return LoaderTuning()


CASES = [  # (store, mode, chunk_size, overlap, BOS id): every mode x overlap 0/>0 x BOS, both dtypes
    ("u16", "stream", 1, 0, None),
    ("u16", "stream", 8, 0, None),
    ("u16", "stream", 8, 3, BOS),
    ("u16", "stream", 33, 32, None),
    ("u16", "stream", 200, 50, None),
    ("u16", "document", 1, 0, BOS),
    ("u16", "document", 8, 0, None),
    ("u16", "document", 8, 3, BOS),
    ("u16", "document", 16, 15, None),
    ("u16", "document", 200, 50, BOS),
    ("u32", "stream", 8, 0, BOS),
    ("u32", "stream", 9, 4, None),
    ("u32", "document", 8, 0, BOS),
    ("u32", "document", 9, 4, None),
]


@pytest.mark.parametrize("name, mode, L, O, bos", CASES)
@pytest.mark.parametrize("tail", ["full", "short"])
def test_batches_reproduce_brute_force(stores, tuning, name, mode, L, O, bos, tail):
    with open_store(stores[name]) as store:
        wins = brute_windows(np.asarray(store.doc_offsets).tolist(), L, O, mode, bos is not None, tail)
        want = expected_tuples(store, L, O, mode, bos, wins)
        for kw in (dict(batch_windows=3), dict(batch_tokens=5 * L + L // 2), dict(batch_windows=1000)):
            loader = WindowLoader(store, chunk_size=L, overlap=O, doc_mode=mode, device="cpu", prepend_bos_id=bos,
                                  tail=tail, tuning=tuning, **kw)
            expect_B = kw.get("batch_windows") or 5
            got, firsts = run(loader, L)
            assert got == want
            assert sum(n for _, n in firsts) == len(loader.plan)
            assert len(firsts) == len(loader) == -(-len(loader.plan) // expect_B)
            assert [f for f, _ in firsts] == list(range(0, len(loader.plan), expect_B))
            assert sum(t[2] for t in got) == loader.num_scored == loader.plan.num_scored
            assert loader.full_plan_windows == len(wins)


def test_unsigned_ids_widen_exactly(make_store):
    hi16 = [0, 1, 32767, 32768, 40000, 65534, 65535, 12345, 65535, 32768]
    with open_store(make_store([hi16, hi16[::-1]], vocab_size=65536, shard_tokens=7)) as s:
        assert s.dtype == np.uint16
        got, _ = run(WindowLoader(s, chunk_size=4, overlap=1, device="cpu", batch_windows=2), 4)
        assert [t[0] for t in got[:4]] == hi16[:4] and max(t[1] for t in got) == 65535
        assert got == expected_tuples(s, 4, 1, "stream", None)
    hi32 = [0, 65535, 65536, 70000, 2**31 - 1, 2**31, 2**32 - 1, 5]
    with open_store(make_store([hi32], vocab_size=2**32, shard_tokens=3)) as s:
        assert s.dtype == np.uint32
        got, _ = run(WindowLoader(s, chunk_size=8, device="cpu", batch_windows=1), 8)
        assert [t[0] for t in got] == hi32[:-1] and [t[1] for t in got] == hi32[1:]


def test_start_at_resumes_and_rank_blocks_union_is_whole(stores, tuning):
    with open_store(stores["u16"]) as store:
        L, O = 16, 4
        full = WindowLoader(store, chunk_size=L, overlap=O, doc_mode="document", batch_windows=4, device="cpu",
                            prepend_bos_id=BOS, tuning=tuning)
        want, _ = run(full, L)
        wins = brute_windows(np.asarray(store.doc_offsets).tolist(), L, O, "document", True)
        for start_at in (0, 1, 5, len(wins) - 1, len(wins)):
            part = WindowLoader(store, chunk_size=L, overlap=O, doc_mode="document", batch_windows=4, device="cpu",
                                prepend_bos_id=BOS, start_at=start_at, tuning=tuning)
            got, firsts = run(part, L)
            assert got == expected_tuples(store, L, O, "document", BOS, wins[start_at:])
            assert [f for f, _ in firsts] == list(range(start_at, len(wins), 4))
        for world in (1, 2, 3, 7):
            glued, scored = [], 0
            for rank in range(world):
                ld = WindowLoader(store, chunk_size=L, overlap=O, doc_mode="document", batch_windows=4, device="cpu",
                                  prepend_bos_id=BOS, rank=rank, world_size=world, start_at=3, tuning=tuning)
                got, _ = run(ld, L)
                glued += got
                scored += ld.num_scored
            assert glued == expected_tuples(store, L, O, "document", BOS, wins[3:])
            assert scored == sum(t[2] for t in glued)


def test_max_tokens_scores_only_targets_before_it(stores, tuning):
    with open_store(stores["u16"]) as store:
        for mode in ("stream", "document"):
            for M in (0, 1, 50, 1000, len(store), len(store) + 10):
                ld = WindowLoader(store, chunk_size=16, overlap=4, doc_mode=mode, batch_windows=3, device="cpu", max_tokens=M,
                                  tuning=tuning)
                got, _ = run(ld, 16)
                off = np.minimum(np.asarray(store.doc_offsets), M).tolist()
                assert got == expected_tuples(store, 16, 4, mode, None, brute_windows(off, 16, 4, mode, False))
                last = max([s + 1 + j for s, n, _, _, _ in brute_windows(off, 16, 4, mode, False) for j in range(n)],
                           default=-1)
                assert last < max(M, 0) or last == -1


def test_iterating_twice_is_deterministic_and_path_is_owned(stores):
    ld = WindowLoader(stores["u16"], chunk_size=32, overlap=8, batch_windows=2, device="cpu")
    with ld:
        a, _ = run(ld, 32)
        b, _ = run(ld, 32)
        assert a == b and len(a) > 0
    assert ld.store is None  # opened from a path: closed with the loader
    with pytest.raises(ConfigError, match="closed"):
        iter(ld)


def test_empty_plan_yields_nothing(make_store):
    with open_store(make_store([[5], []])) as s:
        ld = WindowLoader(s, chunk_size=4, device="cpu")
        assert len(ld) == 0 and list(ld) == []


def loader_threads():
    return [t for t in threading.enumerate() if t.name.startswith("streamdata-loader") and t.is_alive()]


def wait_no_threads(timeout=5.0):
    deadline = time.monotonic() + timeout
    while loader_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return loader_threads()


def big_store(make_store):
    rng = np.random.default_rng(5)
    return make_store([rng.integers(0, 1000, size=20000).tolist()], shard_tokens=3000)


def test_early_break_and_abandoned_iterators_stop_the_thread(make_store):
    with open_store(big_store(make_store)) as s:
        ld = WindowLoader(s, chunk_size=64, overlap=16, batch_windows=2, device="cpu", num_slots=2)
        for i, _ in enumerate(ld):
            assert loader_threads()
            if i == 2:
                break
        assert not wait_no_threads()
        it = iter(ld)
        next(it)
        del it  # abandoned half-way
        assert not wait_no_threads()
        with ld:  # the context manager closes live iterations
            it = iter(ld)
            next(it)
        assert not wait_no_threads()
        with pytest.raises(StopIteration):
            next(it)


def test_consumer_exception_stops_the_thread(make_store):
    with open_store(big_store(make_store)) as s:
        ld = WindowLoader(s, chunk_size=64, batch_windows=2, device="cpu")
        with pytest.raises(ZeroDivisionError):
            for i, _ in enumerate(ld):
                if i == 3:
                    1 / 0
        assert not wait_no_threads()


def test_reader_exception_propagates_to_the_consumer(make_store):
    with open_store(big_store(make_store)) as s:
        real = s.read_into
        ld = WindowLoader(s, chunk_size=64, batch_windows=2, device="cpu")
        bad = next(ld._tables()).lo[3]  # the span of batch 3 cannot be read

        def failing(start, stop, out):
            if start == bad:
                raise OSError(5, "disk on fire")
            real(start, stop, out)

        s.read_into = failing
        seen = 0
        with pytest.raises(OSError, match="disk on fire"):
            for _ in ld:
                seen += 1
        assert seen == 3  # batches before the failure are delivered, in order
        assert not wait_no_threads()


def test_release_behind_and_prefetch_ahead(make_store):
    hint_every_ring = LoaderTuning(hint_tokens=1)  # hints in steps of two ring-fulls, not of 4 Mi tokens
    with open_store(big_store(make_store)) as s:
        log = []
        real_read = s.read_into
        s.read_into = lambda a, b, out: (log.append(("read", a, b)), real_read(a, b, out))[1]
        s.release = lambda a, b: log.append(("release", a, b))
        s.prefetch = lambda a, b: log.append(("prefetch", a, b))
        ld = WindowLoader(s, chunk_size=64, overlap=8, batch_windows=2, device="cpu", num_slots=2,
                          tuning=hint_every_ring)
        list(ld)
        releases = [(a, b) for k, a, b in log if k == "release"]
        assert len(releases) > 3  # released step by step, not only at the end
        assert releases[-1][1] == len(s) and releases[0][0] == 0
        for i, (k, a, b) in enumerate(log):
            if k == "release":  # never drops what a later read needs
                assert all(ra >= b for kk, ra, _ in log[i + 1 :] if kk == "read")
        prefetches = [(a, b) for k, a, b in log if k == "prefetch"]
        assert prefetches[0][0] == 0 and prefetches[-1][1] == len(s)  # hints chain over the whole pass
        assert all(p[1] == q[0] for p, q in zip(prefetches, prefetches[1:]))
        ld = WindowLoader(s, chunk_size=64, batch_windows=2, device="cpu", release_behind=False, tuning=hint_every_ring)
        n = len(log)
        list(ld)
        assert not [e for e in log[n:] if e[0] == "release"]


def test_config_errors_are_one_line(stores):
    with open_store(stores["u16"]) as s:
        bad = [
            (dict(chunk_size=8, batch_windows=2, batch_tokens=64), "batch_windows=2"),
            (dict(chunk_size=8, batch_tokens=7), "batch_tokens=7"),
            (dict(chunk_size=8, batch_windows=0), "batch_windows=0"),
            (dict(chunk_size=8, num_slots=1), "num_slots=1"),
            (dict(chunk_size=8, start_at=10**9), "start_at=1000000000"),
            (dict(chunk_size=8, prepend_bos_id=-1), "prepend_bos_id=-1"),
            (dict(chunk_size=8, overlap=8), "overlap=8"),
            (dict(chunk_size=8, mode="docs"), "mode='docs'"),
            (dict(chunk_size=8, rank=2, world_size=2), "rank=2"),
            (dict(chunk_size=8, device="tpu"), "device='tpu'"),
        ]
        if not torch.cuda.is_available():
            bad.append((dict(chunk_size=8, device="cuda"), "device='cuda'"))
        for kw, word in bad:
            with pytest.raises(ConfigError) as e:
                WindowLoader(s, **kw)
            assert word in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
        ld = WindowLoader(s, chunk_size=1 << 17, device="cpu")  # default budget: at least one window per batch
        assert ld.batch_windows == 1


def test_tuning_errors_are_one_line(stores):
    bad = [
        (lambda: LoaderTuning(table_windows=0), "table_windows=0"),
        (lambda: LoaderTuning(hint_tokens=True), "hint_tokens=True"),
        (lambda: LoaderTuning(join_timeout_s=0), "join_timeout_s=0"),
        (lambda: LoaderTuning(join_timeout_s=float("nan")), "join_timeout_s=nan"),
        (lambda: LoaderTuning(plan_blocks=(2, 3)), "plan_blocks=(2, 3)"),
        (lambda: PlanBlocks(index_docs=0), "index_docs=0"),
        (lambda: PlanBlocks(pass_docs=2.5), "pass_docs=2.5"),
        (lambda: WindowLoader(stores["u16"], chunk_size=8, device="cpu", tuning={"table_windows": 5}), "tuning="),
    ]
    for make, word in bad:
        with pytest.raises(ConfigError) as e:
            make()
        assert word in str(e.value) and "\n" not in str(e.value), (word, str(e.value))
    assert LoaderTuning() == LoaderTuning(1 << 15, 1 << 22, 60.0, PlanBlocks(1 << 16, 1 << 18))  # the library's sizes


@pytest.mark.parametrize("name, mode, L, O, bos", [c for c in CASES if c[2] > 1])
def test_device_cut_matches_host_cut(stores, name, mode, L, O, bos):
    """The CUDA path's torch cut (_cut_device) and widening, run here on CPU tensors, must equal the
    CPU path batch for batch: the index arithmetic is checked without a GPU (the copy/stream
    mechanics are covered by test_loader_cuda.py where a GPU exists)."""
    from streamdata.loader import _widen_bits

    with open_store(stores[name]) as store:
        ld = WindowLoader(store, chunk_size=L, overlap=O, doc_mode=mode, batch_windows=3, device="cpu", prepend_bos_id=bos)
        host = list(ld)
        it = iter(ld)
        pipe = it._pipe
        it.close()  # keep the pipeline's methods, stop its threads
        signed = np.int16 if store.dtype == np.uint16 else np.int32  # the bit patterns the device slot holds
        mask = 0xFFFF if store.dtype == np.uint16 else 0xFFFFFFFF
        tables = [(bt, b) for bt in ld._tables() for b in range(len(bt))]
        assert len(tables) == len(host)
        for (bt, b), want in zip(tables, host):
            pipe.batches = bt
            meta = np.empty(bt.max_meta, np.int64)
            lo, hi = bt.lo[b], bt.hi[b]
            raw = store.read(lo, hi)
            span = _widen_bits(torch.from_numpy(raw.view(signed)), mask)
            assert torch.equal(span, torch.from_numpy(raw.astype(np.int64)))
            m = pipe._pack_meta(b, lo, meta)
            got = pipe._cut_device(span, torch.from_numpy(meta[:m].copy()), pipe._item(b, 0, lo, hi))
            for f in ("inputs", "targets", "score_mask", "lengths", "doc_ids", "positions"):
                assert torch.equal(getattr(got, f), getattr(want, f)), (b, f)
            assert (got.first_window, got.num_windows, got.num_scored) == (want.first_window, want.num_windows,
                                                                          want.num_scored)


def test_other_backends_go_through_read_into(stores, tmp_path):
    """zarr and raw .bin stores (no widening reads: the slot path) give the same tuples."""
    from streamdata.convert import convert_store
    from streamdata import open_raw_bin

    convert_store(stores["u16"], tmp_path / "z", format="zarr", chunk_tokens=64, chunks_per_shard=4)
    with open_store(stores["u16"]) as src:
        src.read(0, len(src)).tofile(tmp_path / "raw.bin")
    for opener in (lambda: open_store(tmp_path / "z"), lambda: open_raw_bin(tmp_path / "raw.bin", eos_id=5)):
        with opener() as s:
            for mode, L, O in (("stream", 16, 0), ("document", 16, 4)):
                ld = WindowLoader(s, chunk_size=L, overlap=O, doc_mode=mode, batch_windows=3, device="cpu")
                assert run(ld, L)[0] == expected_tuples(s, L, O, mode, None)


def test_slots_grow_for_batches_spanning_many_short_documents(make_store):
    """Document mode: 1-token documents have no window but lie inside a batch's span, so a batch can
    read far more than B * (L + 1) tokens; the ring slot grows and the batches stay exact."""
    rng = np.random.default_rng(11)
    docs = []
    for _ in range(6):
        docs.append(rng.integers(0, 500, size=5).tolist())  # one window each
        docs += [[int(t)] for t in rng.integers(0, 500, size=int(rng.integers(20, 60)))]
    with open_store(make_store(docs, vocab_size=500, shard_tokens=10_000)) as s:
        for tail in ("full", "short"):
            ld = WindowLoader(s, chunk_size=4, overlap=1, doc_mode="document", batch_windows=3, device="cpu", tail=tail)
            assert ld._span_cap == 3 * 5  # less than a batch with short documents between its windows reads
            got, _ = run(ld, 4)
            off = np.asarray(s.doc_offsets).tolist()
            assert got == expected_tuples(s, 4, 1, "document", None, brute_windows(off, 4, 1, "document", False, tail))
            assert max(bt.max_span for bt in ld._tables()) > ld._span_cap  # the growth was needed
            assert ld._ring.host_tok[0].numel() >= max(bt.max_span for bt in ld._tables())


def test_store_view_is_zero_copy_inside_one_piece_and_none_across_shards(make_store, tmp_path):
    import streamdata
    from streamdata.backends.memory import MemoryTokenStore

    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 1000, size=int(n)).tolist() for n in rng.integers(1, 40, size=20)]
    path = make_store(docs, vocab_size=1000, shard_tokens=37)
    flat = np.concatenate([np.asarray(d) for d in docs])
    raw = tmp_path / "t.bin"
    flat.astype("<u2").tofile(raw)
    with open_store(path) as npy, streamdata.open_raw_bin(raw, checksum=False) as rb, \
            MemoryTokenStore(flat.astype(np.int64)) as mem:
        starts = [s.start for s in npy.manifest.shards] + [len(npy)]
        for _ in range(300):
            a = int(rng.integers(0, len(flat)))
            b = int(rng.integers(a, len(flat) + 1))
            one_shard = any(lo <= a and b <= hi for lo, hi in zip(starts[:-1], starts[1:]))
            v = npy.view(a, b)
            assert (v is not None) == one_shard
            for got in ([v] if v is not None else []) + [rb.view(a, b), mem.view(a, b)]:
                np.testing.assert_array_equal(got, flat[a:b])
                assert not got.flags.writeable  # a view of the store, never a way to change it


@pytest.mark.parametrize("bad,says", [("meta", "is not supported here: pass one of 'cpu', 'cuda'"),
                                      ("nonsense", "is not a device name")])
def test_a_device_the_loader_cannot_use_is_one_line(make_store, bad, says):
    from streamdata.errors import ConfigError

    with open_store(make_store([[1, 2, 3, 4, 5]])) as s:
        with pytest.raises(ConfigError, match=f"device='{bad}' {says}") as e:
            WindowLoader(s, chunk_size=2, device=bad)
    assert "\n" not in str(e.value)


def test_host_pass_reads_every_batch_without_a_device(make_store):
    """The benchmark's reader-only pass is public (it drove the loader's private pipeline): it
    counts the input tokens a normal iteration delivers, and leaves no thread behind."""
    rng = np.random.default_rng(4)
    store = make_store([rng.integers(0, 500, int(n)).tolist() for n in rng.integers(5, 200, 9)], vocab_size=500)
    with WindowLoader(store, chunk_size=16, overlap=4, batch_windows=3, device="cpu") as ld:
        want = sum(b.inputs.shape[0] * 16 for b in ld)
        assert ld.host_pass() == want
