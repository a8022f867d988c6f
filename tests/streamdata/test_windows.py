"""Window plan: property tests against a brute-force enumeration written here in plain Python, and
the lazy planner against the eager one it replaced (kept here verbatim as a second reference)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamdata.errors import ConfigError
from streamdata.windows import PlanBlocks, WindowPlan, plan_windows


def brute_windows(offsets, L, O, mode, bos, tail="full"):
    """Reference: walk each stream window by window, exactly as the semantics read.

    Returns (start, length, score_from, doc, bos) tuples in reading order.
    """
    N = offsets[-1]
    streams = [(0, N, -1)] if mode == "stream" else [(offsets[i], offsets[i + 1], i) for i in range(len(offsets) - 1)]
    out = []
    b = 1 if bos else 0
    for a, e, d in streams:
        v = e - a + b  # virtual stream: [BOS] + tokens
        if v < 2:
            continue
        s, first = 0, True
        scored_to = 0  # virtual position of the last target scored so far
        while True:
            length = min(L, v - 1 - s)
            if tail == "full" and not first and s + L >= v - 1:
                # last window of a multi-window stream: L inputs ending at the stream's end; score
                # from the first target past those already scored
                s = v - 1 - L
                length = L
                out.append((a - b + s, length, scored_to - s, d, False))
                break
            out.append((a - b + s, length, 0 if first else O, d, bool(b) and s == 0))
            scored_to = s + length
            if s + L >= v - 1:  # target v-1 (the stream's last token) is scored
                break
            s += L - O
            first = False
    return out


def eager_plan(doc_offsets, chunk_size, overlap=0, mode="stream", prepend_bos=False, max_tokens=None, tail="full"):
    """The eager planner the lazy one replaced (every window materialised at once; tail policy
    included), as a reference: (start, length, score_from, doc, bos) arrays."""
    L, O = int(chunk_size), int(overlap)
    stride = L - O
    off = np.asarray(doc_offsets).astype(np.int64, copy=False)
    if max_tokens is not None:
        off = np.minimum(off, int(max_tokens))
    n_tok = int(off[-1])
    bos_shift = 1 if prepend_bos else 0
    if mode == "stream":
        a, n, doc_of_stream = np.zeros(1, np.int64), np.array([n_tok], np.int64), np.full(1, -1, np.int64)
    else:
        a, n, doc_of_stream = off[:-1], np.diff(off), np.arange(len(off) - 1, dtype=np.int64)
    v = n + bos_shift
    nw = np.where(v >= 2, 1 + -(-np.maximum(v - 1 - L, 0) // stride), 0)
    total = int(nw.sum())
    has = nw > 0
    nw_h, a_h, v_h, d_h = nw[has], a[has], v[has], doc_of_stream[has]
    firsts = np.zeros(len(nw_h), np.int64)
    if len(nw_h) > 1:
        np.cumsum(nw_h[:-1], out=firsts[1:])
    k = np.arange(total, dtype=np.int64) - np.repeat(firsts, nw_h)
    vstart = k * stride
    vlen = np.repeat(v_h, nw_h)
    length = np.minimum(L, vlen - 1 - vstart)
    score_from = np.where(k == 0, 0, O).astype(np.int64)
    if tail == "full":
        last = (k > 0) & (k == np.repeat(nw_h, nw_h) - 1)
        moved = np.where(last, L - length, 0)
        vstart -= moved
        length += moved
        score_from += moved
    start = np.repeat(a_h, nw_h) - bos_shift + vstart
    return start, length, score_from, np.repeat(d_h, nw_h), (k == 0) & bool(prepend_bos)


# The planner's group sizes (index_docs, pass_docs): tiny ones make small layouts cross many groups
# and counting steps; the last are the defaults.
GROUPS = st.sampled_from([PlanBlocks(1, 1), PlanBlocks(1, 3), PlanBlocks(2, 2), PlanBlocks(2, 5), PlanBlocks(3, 7),
                          PlanBlocks()])


def arrays_as_tuples(arrs):
    return list(zip(*(a.tolist() for a in arrs)))


def scored_targets(plan: WindowPlan):
    """{(stream id, global target position): context length} from a plan; asserts no duplicates."""
    seen = {}
    for s, n, f, d, _ in zip(plan.start.tolist(), plan.length.tolist(), plan.score_from.tolist(),
                             plan.doc.tolist(), plan.bos.tolist()):
        for j in range(f, n):
            key = (d, s + 1 + j)
            assert key not in seen, f"target {key} scored twice"
            seen[key] = j + 1  # tokens of its stream (BOS included) the prediction sees
    return seen


@st.composite
def layouts(draw):
    lens = draw(st.lists(st.integers(0, 40) | st.sampled_from([0, 1, 2]), min_size=0, max_size=12))
    off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    L = draw(st.integers(1, 12))
    O = draw(st.integers(0, L - 1))
    mode = draw(st.sampled_from(["stream", "document"]))
    bos = draw(st.booleans())
    tail = draw(st.sampled_from(["full", "short"]))
    return off, L, O, mode, bos, tail


def as_tuples(plan):
    return list(zip(plan.start.tolist(), plan.length.tolist(), plan.score_from.tolist(), plan.doc.tolist(),
                    plan.bos.tolist()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), GROUPS)
def test_plan_matches_brute_force_and_scores_every_target_once(layout, groups):
    off, L, O, mode, bos, tail = layout
    plan = plan_windows(off, L, O, mode, prepend_bos=bos, tail=tail, blocks=groups)
    _check_plan_against_brute_force(plan, off, L, O, mode, bos, tail)


def _check_plan_against_brute_force(plan, off, L, O, mode, bos, tail):
    assert as_tuples(plan) == brute_windows(off.tolist(), L, O, mode, bos, tail)
    assert plan.tail == tail
    for arr in (plan.start, plan.length, plan.score_from, plan.doc):
        assert arr.dtype == np.int64
    assert plan.bos.dtype == bool

    # Every target of every stream is scored exactly once ...
    N = int(off[-1])
    b = 1 if bos else 0
    streams = [(0, N, -1)] if mode == "stream" else [(int(off[i]), int(off[i + 1]), i) for i in range(len(off) - 1)]
    expected = {(d, p) for a, e, d in streams for p in range(a + 1 - b, e) if e - a + b >= 2}
    seen = scored_targets(plan)
    assert set(seen) == expected
    assert plan.num_scored == len(expected)
    if mode == "stream":
        assert plan.num_scored == max(N - 1 + b, 0)

    # ... with the most context the semantics allow: q = position in the virtual stream.
    stream = {d: (a, e) for a, e, d in streams}
    S = L - O
    for (d, p), ctx in seen.items():
        a, e = stream[d]
        v = e - a + b
        q = p - a + b
        nw = 1 + -(-max(0, v - 1 - L) // S)
        before_tail = (nw - 2) * S + L  # last target scored by the window before the last one
        if q <= L:
            assert ctx == q  # first window: the whole history
        elif tail == "full" and nw >= 2 and q > before_tail:
            assert ctx == q - (v - 1 - L)  # right-aligned last window: L inputs end at the stream's end
            assert O + 1 <= ctx <= L
        else:
            assert ctx == O + 1 + (q - L - 1) % S  # a later window: overlap + 1 .. L tokens
            assert O + 1 <= ctx <= L
    # The full tail scores the same targets with at least as much context as the short one, in as many windows.
    other = plan_windows(off, L, O, mode, prepend_bos=bos, tail="short" if tail == "full" else "full")
    full, short = (seen, scored_targets(other)) if tail == "full" else (scored_targets(other), seen)
    assert set(full) == set(short) and len(other) == len(plan)
    assert all(full[k] >= short[k] for k in full)

    # Windows stay inside their stream, never read past it, and the last one reaches its end.
    for (s, n, f, d, w_bos) in as_tuples(plan):
        a, e = (0, N) if d == -1 else (int(off[d]), int(off[d + 1]))
        assert a - b <= s and s + n + 1 <= e
        assert 1 <= n <= L and 0 <= f < n
        assert w_bos == (bos and s == a - 1)
    starts = plan.start.tolist()
    assert starts == sorted(starts)  # reading order: the loader's spans only move forward
    for a, e, d in streams:
        mine = [(s, n) for (s, n, f, dd, _) in as_tuples(plan) if dd == d]
        ends = [s + n + 1 for s, n in mine]
        if e - a + b >= 2:
            assert max(ends) == e  # the last (possibly partial) window reads the stream's last token
            if tail == "full" and len(mine) >= 2:
                assert mine[-1] == (e - 1 - L, L)


@settings(max_examples=100, deadline=None)
@given(layouts(), st.integers(1, 5), GROUPS, st.data())
def test_shard_blocks_union_is_the_plan(layout, world, groups, data):
    _check_shards(layout, world, data, groups)


def _check_shards(layout, world, data, blocks):
    off, L, O, mode, bos, tail = layout
    plan = plan_windows(off, L, O, mode, prepend_bos=bos, tail=tail, blocks=blocks)
    parts = [plan.shard(r, world) for r in range(world)]
    assert sum(len(p) for p in parts) == len(plan)
    assert sum(p.num_scored for p in parts) == plan.num_scored
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    glued = [t for p in parts for t in as_tuples(p)]
    assert glued == as_tuples(plan)
    firsts = [p.first for p in parts]
    assert firsts == sorted(firsts) and firsts[0] == 0
    i = data.draw(st.integers(0, len(plan)))
    tail = plan[i:]
    assert tail.first == i and as_tuples(tail) == as_tuples(plan)[i:]


def test_worked_example_from_the_docstring():
    plan = plan_windows(np.array([0, 10]), 4, 1, "stream", tail="short")
    assert as_tuples(plan) == [(0, 4, 0, -1, False), (3, 4, 1, -1, False), (6, 3, 1, -1, False)]
    assert plan.num_scored == 9
    plan = plan_windows(np.array([0, 10]), 4, 1, "stream")  # tail "full", the default
    assert as_tuples(plan) == [(0, 4, 0, -1, False), (3, 4, 1, -1, False), (5, 4, 2, -1, False)]
    assert plan.num_scored == 9


def test_full_tail_is_lm_eval_rolling_windows():
    """lm-eval's get_rolling_token_windows (context_len=1, as loglikelihood_rolling calls it), written
    out here: with a BOS prefix, document mode, overlap 0 and tail full our windows are its windows."""

    def rolling(n, max_len):  # yields (first input position, first target position, last target + 1), virtual
        pred_len = max_len  # context_len=1: max_len - context_len + 1
        out = [(0, 1, min(max_len, n) + 1)]  # first window: [BOS] + tokens, targets 1..max_len
        predicted = min(max_len, n)
        while predicted < n:
            w = min(n - predicted, pred_len)
            end = predicted + w + 1
            out.append((end - 1 - max_len, predicted + 1, end))  # inputs [end-1-max_len, end-1)
            predicted += w
        return out

    for n in range(1, 40):
        for L in (1, 2, 3, 5, 8, 16):
            plan = plan_windows(np.array([0, n]), L, 0, "document", prepend_bos=True)
            # virtual position = global + 1 (the document starts at 0, BOS at -1)
            ours = [(s + 1, s + 1 + 1 + f, s + 1 + ln + 1) for s, ln, f, _, _ in as_tuples(plan)]
            # lm-eval's first window is [BOS] + x[:L-1]; ours too (virtual position 0 = BOS)
            assert ours == rolling(n, L), (n, L)


def test_plan_is_document_and_shard_agnostic_in_stream_mode():
    # Shards never enter the plan; in stream mode the document layout does not either.
    rng = np.random.default_rng(0)
    lens = rng.integers(0, 50, size=200)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    a = plan_windows(off, 64, 16, "stream")
    b = plan_windows(np.array([0, off[-1]]), 64, 16, "stream")
    assert as_tuples(a) == as_tuples(b)


def test_document_mode_small_documents():
    off = np.array([0, 0, 1, 3, 3, 4], np.int64)  # docs of 0, 1, 2, 0, 1 tokens
    plan = plan_windows(off, 8, 0, "document")
    assert as_tuples(plan) == [(1, 1, 0, 2, False)]  # only the 2-token doc has a target
    plan = plan_windows(off, 8, 0, "document", prepend_bos=True)
    # BOS: 1-token docs give one window of length 1 scoring their token; 0-token docs nothing.
    assert as_tuples(plan) == [(-1, 1, 0, 1, True), (0, 2, 0, 2, True), (2, 1, 0, 4, True)]
    assert plan.num_scored == 4


def test_max_tokens_cuts_the_store():
    off = np.array([0, 5, 12, 30], np.int64)
    for mode, tail in ((m, t) for m in ("stream", "document") for t in ("full", "short")):
        for M in (0, 1, 5, 6, 13, 30, 100):
            got = plan_windows(off, 4, 1, mode, max_tokens=M, tail=tail)
            want = plan_windows(np.minimum(off, M), 4, 1, mode, tail=tail)
            assert as_tuples(got) == as_tuples(want)
            assert all(p < M for (_, p) in scored_targets(got))


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(chunk_size=0, overlap=0), "chunk_size=0"),
        (dict(chunk_size=8, overlap=8), "overlap=8"),
        (dict(chunk_size=8, overlap=-1), "overlap=-1"),
        (dict(chunk_size=8, overlap=0, mode="sliding"), "mode='sliding'"),
        (dict(chunk_size=2.5, overlap=0), "chunk_size=2.5"),
        (dict(chunk_size=8, overlap=0, tail="long"), "tail='long'"),
    ],
)
def test_bad_config_raises_one_line_config_error(kw, word):
    with pytest.raises(ConfigError) as e:
        plan_windows(np.array([0, 100]), **kw)
    msg = str(e.value)
    assert word in msg and "\n" not in msg and ":" in msg


def test_bad_offsets_and_shards_raise():
    with pytest.raises(ConfigError):
        plan_windows(np.array([1, 5]), 4)
    with pytest.raises(ConfigError):
        plan_windows(np.array([0, 5, 3]), 4)
    plan = plan_windows(np.array([0, 100]), 4)
    with pytest.raises(ConfigError, match="rank=2"):
        plan.shard(2, 2)
    with pytest.raises(ConfigError, match="world_size=0"):
        plan.shard(0, 0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.none() | st.integers(0, 300), GROUPS, st.data())
def test_lazy_plan_equals_the_eager_plan(layout, max_tokens, groups, data):
    """Every block, slice, rank block and count of the lazy plan equals the eager planner's arrays."""
    off, L, O, mode, bos, tail = layout
    want = eager_plan(off, L, O, mode, bos, max_tokens, tail)
    rows = arrays_as_tuples(want)
    plan = plan_windows(off, L, O, mode, prepend_bos=bos, max_tokens=max_tokens, tail=tail, blocks=groups)
    n = len(plan)
    assert n == len(rows) == plan.full_windows
    assert plan.num_scored == int((want[1] - want[2]).sum())
    assert plan.num_tokens == (int(off[-1]) if max_tokens is None else min(int(off[-1]), max_tokens))
    for _ in range(3):
        lo = data.draw(st.integers(0, n))
        hi = data.draw(st.integers(lo, n + 2))
        blk = plan.block(lo, hi)
        assert blk.first == lo and arrays_as_tuples((blk.start, blk.length, blk.score_from, blk.doc, blk.bos)) == rows[lo:hi]
        for arr in (blk.start, blk.length, blk.score_from, blk.doc):
            assert arr.dtype == np.int64
        assert blk.bos.dtype == bool
    # start_at then a rank block, as the loader takes them: windows, counts and first index
    start_at = data.draw(st.integers(0, n))
    world = data.draw(st.integers(1, 4))
    rank = data.draw(st.integers(0, world - 1))
    view = plan[start_at:].shard(rank, world)
    m = n - start_at
    lo, hi = start_at + m * rank // world, start_at + m * (rank + 1) // world
    assert (view.first, len(view)) == (lo, hi - lo)
    assert view.num_scored == int((want[1][lo:hi] - want[2][lo:hi]).sum())
    got = [t for b in view.blocks(data.draw(st.integers(1, 5))) for t in as_block_tuples(b)]
    assert got == rows[lo:hi]
    assert as_tuples(view) == rows[lo:hi]  # the materialising attributes agree


def as_block_tuples(b):
    return arrays_as_tuples((b.start, b.length, b.score_from, b.doc, b.bos))


def test_a_million_documents_against_the_eager_plan():
    rng = np.random.default_rng(1)
    lens = rng.integers(0, 3000, size=1_000_000)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    plan = plan_windows(off, 1024, 256, "document", prepend_bos=True)
    assert plan.num_scored == int(lens.sum())  # BOS: every token of every document is scored
    want = eager_plan(off, 1024, 256, "document", True)
    assert len(plan) == len(want[0])
    for lo in (0, 12345, len(plan) // 2, len(plan) - 7000):
        got = plan.block(lo, lo + 7000)
        assert arrays_as_tuples((got.start, got.length, got.score_from, got.doc, got.bos)) == \
            arrays_as_tuples(tuple(w[lo : lo + 7000] for w in want))
    plan = plan_windows(off, 1024, 512, "stream")
    assert plan.num_scored == int(off[-1]) - 1
    assert len(plan) == 1 + -(-(int(off[-1]) - 1 - 1024) // 512)


def test_planning_a_memory_mapped_index_allocates_o1_not_o_documents(tmp_path):
    """Document mode over a memory-mapped index of 4M documents: the plan keeps 16 bytes per 65,536
    documents and its counting pass works in fixed-size steps, so the Python heap (numpy arrays
    included) stays far below the index's own 32 MB (~4 MiB measured); the eager plan allocated ~10 arrays of
    O(windows) (hundreds of MB here). The last windows are read without materialising the others."""
    D = 4_000_000
    rng = np.random.default_rng(7)
    path = tmp_path / "offsets.i64"
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.int64, shape=(D + 1,))
    mm[0] = 0
    for d0 in range(0, D, 1 << 20):  # written in steps: the test's own memory stays small too
        d1 = min(d0 + (1 << 20), D)
        mm[d0 + 1 : d1 + 1] = mm[d0] + np.cumsum(rng.integers(0, 40, size=d1 - d0))
    mm.flush()
    del mm
    off = np.load(path, mmap_mode="r")
    tracemalloc.start()
    try:
        plan = plan_windows(off, 16, 4, "document", prepend_bos=True, check=False)
        n, scored = len(plan), plan.num_scored
        tail = plan.block(n - 100, n)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"planning peaked at {peak / 2**20:.1f} MiB of Python/numpy heap"
    lens = np.diff(np.asarray(off))
    assert scored == int(lens.sum())  # BOS: every token of every document
    assert n == int(np.where(lens + 1 >= 2, 1 + -(-np.maximum(lens - 16, 0) // 12), 0).sum())
    assert tail.stop[-1] == int(off[-1]) and tail.doc[-1] == D - 1 - int(np.flatnonzero(lens[::-1])[0])
