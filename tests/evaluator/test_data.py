"""The data stage's windows follow the window semantics (streamdata/windows.py) for tensors and
stores, in both doc modes; tensors and stores go through the same loader and give the same batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evaluator.data import EvalData, WindowSpec, open_data

from .helpers import V


def _collect(ed, spec, batch=1):
    """(target id, doc, position in doc) of every scored target, in order (``batch`` windows per batch)."""
    out = []
    windows = ed.windows(spec, torch.device("cpu"), batch)
    try:
        assert len(windows.plan) == sum(int(b.num_windows) for b in windows)
        for b in windows:
            assert b.inputs.dtype == torch.int64 and b.inputs.shape == b.targets.shape == b.score_mask.shape
            assert int(b.score_mask.sum()) == b.num_scored
            for r in range(b.num_windows):
                n = int(b.lengths[r])
                # targets are the inputs shifted by one inside a window
                assert torch.equal(b.inputs[r, 1:n], b.targets[r, : n - 1])
                assert not b.score_mask[r, n:].any() and (b.inputs[r, n:] == 0).all()
                for j in torch.nonzero(b.score_mask[r]).flatten().tolist():
                    out.append((int(b.targets[r, j]), int(b.doc_ids[r, j]), int(b.positions[r, j])))
    finally:
        windows.close()
    return out


def _reference(docs, doc_mode, bos, max_tokens):
    """Every target the semantics score, in order: (token, doc, position in doc)."""
    flat = [(t, d, p) for d, doc in enumerate(docs) for p, t in enumerate(doc)]
    if max_tokens is not None:
        flat = flat[:max_tokens]
    if doc_mode == "stream":
        return flat if bos is not None else flat[1:]
    out = []
    for d in range(len(docs)):
        mine = [f for f in flat if f[1] == d]
        out.extend(mine if bos is not None else mine[1:])
    return out


docs_st = st.lists(st.lists(st.integers(0, V - 1), min_size=0, max_size=30), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(docs=docs_st, chunk=st.integers(1, 12), ov=st.integers(0, 11), doc_mode=st.sampled_from(["stream", "document"]),
       bos=st.sampled_from([None, 5]), batch=st.integers(1, 4), cut=st.one_of(st.none(), st.integers(2, 100)))
def test_store_and_tensor_windows_score_every_target_once(make_store, docs, chunk, ov, doc_mode, bos, batch, cut):
    ov = min(ov, chunk - 1)
    path = make_store(docs, vocab_size=V)
    spec = WindowSpec(chunk_size=chunk, overlap=ov, doc_mode=doc_mode, prepend_bos_id=bos, max_tokens=cut)
    want = _reference(docs, doc_mode, bos, cut)
    with open_data(path) as ed:
        assert _collect(ed, spec, batch) == want
        windows = ed.windows(spec, torch.device("cpu"), batch)
        assert windows.num_scored == len(want)
        windows.close()
    # the same ids and document index given in memory: the same targets
    flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    off = np.cumsum([0] + [len(d) for d in docs])
    with EvalData.from_tokens(flat, off) as ed:
        assert ed.kind == "tensor" and _collect(ed, spec, batch) == want


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 80), chunk=st.integers(1, 20), ov=st.integers(0, 19), bos=st.sampled_from([None, 3]),
       batch=st.integers(1, 5))
def test_tensor_windows_score_every_target_once(n, chunk, ov, bos, batch):
    ov = min(ov, chunk - 1)
    x = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n))
    ed = open_data(x)
    spec = WindowSpec(chunk_size=chunk, overlap=ov, prepend_bos_id=bos)
    got = _collect(ed, spec, batch)
    assert got == _reference([x.tolist()], "stream", bos, None)


def test_window_inputs_follow_the_stride():
    x = torch.arange(20)
    ed = open_data(x)
    spec = WindowSpec(chunk_size=8, overlap=3, tail="short")
    (b,) = list(ed.windows(spec, torch.device("cpu"), 10))
    # windows start at 0, 5, 10, 15 (stride 5); the last one is shorter (targets up to 19)
    assert b.inputs[:, 0].tolist() == [0, 5, 10, 15]
    assert b.lengths.tolist() == [8, 8, 8, 4]
    assert b.score_mask.sum(1).tolist() == [8, 5, 5, 1]
    assert b.score_mask[1].tolist() == [False] * 3 + [True] * 5
    # tail "full": the last window is right-aligned (inputs 11..18) and scores only target 19
    (b,) = list(ed.windows(dataclasses.replace(spec, tail="full"), torch.device("cpu"), 10))
    assert b.inputs[:, 0].tolist() == [0, 5, 10, 11]
    assert b.lengths.tolist() == [8, 8, 8, 8]
    assert b.score_mask.sum(1).tolist() == [8, 5, 5, 1]
    assert b.score_mask[3].tolist() == [False] * 7 + [True]


def test_open_data_accepts_arrays_lists_and_2d():
    dtypes = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64]
    datas = [np.arange(10, dtype=d) for d in dtypes] + [torch.arange(10, dtype=d) for d in
             (torch.uint8, torch.int16, torch.int32, torch.int64)] + [list(range(10)), torch.arange(10)[None]]
    want = _collect(open_data(torch.arange(10)), WindowSpec(chunk_size=4, overlap=1), 2)
    for d in datas:
        ed = open_data(d)
        assert ed.num_tokens == 10 and ed.kind == "tensor"
        assert _collect(ed, WindowSpec(chunk_size=4, overlap=1), 2) == want, d


@pytest.mark.parametrize("bad", [torch.zeros(3, 4, dtype=torch.long), torch.rand(10), "no/such/store", 3.5])
def test_open_data_rejects(bad):
    from streamdata.errors import StreamdataError

    with pytest.raises(StreamdataError):
        open_data(bad)


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(0, 50), min_size=1, max_size=30), cut=st.one_of(st.none(), st.integers(2, 900)),
       block=st.integers(1, 4))
def test_longest_document_reads_the_index_in_blocks(lens, cut, block):
    import evaluator.data as data_mod

    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    if off[-1] == 0:
        return
    ed = EvalData.from_tokens(torch.zeros(int(off[-1]), dtype=torch.long), doc_offsets=off)
    old = data_mod._INDEX_BLOCK
    data_mod._INDEX_BLOCK = block
    try:
        assert ed.longest_document(cut) == int(ed.document_lengths(cut).max())
    finally:
        data_mod._INDEX_BLOCK = old
