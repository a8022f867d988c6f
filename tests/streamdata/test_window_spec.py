"""One owner for the window rules: streamdata.windows.WindowSpec is validated once, and
the plan, the loader and the evaluator's config/resolve/data take that one object as it is."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from streamdata import WindowSpec, plan_windows
from streamdata.errors import ConfigError
from streamdata.windows import DOC_MODES, MODES, TAILS, check_window_rules

# Each bad value alone, with the text its one-line error must name.
BAD = [
    (dict(chunk_size=0), "chunk_size=0"),
    (dict(chunk_size=2.5), "chunk_size=2.5"),
    (dict(chunk_size=True), "chunk_size=True"),
    (dict(chunk_size=None), "chunk_size=None"),
    (dict(chunk_size=8, overlap=-1), "overlap=-1"),
    (dict(chunk_size=8, overlap=1.5), "overlap=1.5"),
    (dict(chunk_size=8, overlap=8), "overlap=8 must be smaller than chunk_size=8"),
    (dict(chunk_size=8, doc_mode="docs"), "doc_mode='docs'"),
    (dict(chunk_size=8, doc_mode="sliding"), "doc_mode='sliding'"),
    (dict(chunk_size=8, tail="long"), "tail='long'"),
    (dict(chunk_size=8, prepend_bos="yes"), "prepend_bos='yes'"),
    (dict(chunk_size=8, prepend_bos_id=-1), "prepend_bos_id=-1"),
    (dict(chunk_size=8, prepend_bos_id=1.5), "prepend_bos_id=1.5"),
    (dict(chunk_size=8, max_tokens=-1), "max_tokens=-1"),
    (dict(chunk_size=8, max_tokens=2.5), "max_tokens=2.5"),
]


@pytest.mark.parametrize("kw, word", BAD)
def test_spec_rejects_each_bad_value_in_one_line(kw, word):
    with pytest.raises(ConfigError) as e:
        WindowSpec(**kw)
    msg = str(e.value)
    # the value, then the fix after a colon, on one line
    assert word in msg and "\n" not in msg and ": pass" in msg, msg


def test_spec_is_frozen_and_normalised():
    s = WindowSpec(np.int64(8), np.int64(2), prepend_bos_id=np.int64(5), max_tokens=np.int64(40))
    assert s == WindowSpec(8, 2, prepend_bos_id=5, max_tokens=40)
    assert type(s.chunk_size) is int and type(s.overlap) is int and type(s.prepend_bos_id) is int
    assert s.prepend_bos is True and s.stride == 6  # a BOS id implies the prefix
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.overlap = 3
    # replace() builds a new spec: checked again
    with pytest.raises(ConfigError, match="overlap=8"):
        dataclasses.replace(s, overlap=8)
    assert DOC_MODES == ("stream", "document") and TAILS == ("full", "short") and MODES is DOC_MODES


def test_plan_takes_the_spec_as_it_is():
    off = np.array([0, 7, 7, 20, 21])
    spec = WindowSpec(4, 1, "document", "short", prepend_bos=True, max_tokens=18)
    plan = plan_windows(off, spec)
    assert plan.spec is spec and plan[1:3].spec is spec and plan.shard(1, 2).spec is spec
    legacy = plan_windows(off, 4, 1, "document", True, max_tokens=18, tail="short")
    assert legacy.spec == spec
    for a in ("start", "length", "score_from", "doc", "bos"):
        assert np.array_equal(getattr(plan, a), getattr(legacy, a)), a
    assert (plan.chunk_size, plan.overlap, plan.doc_mode, plan.tail, plan.prepend_bos) == (4, 1, "document", "short", True)
    with pytest.raises(ConfigError, match="pass the spec alone"):
        plan_windows(off, spec, overlap=2)


def test_mode_is_a_deprecated_alias_of_doc_mode():
    off = np.array([0, 5, 12])
    with pytest.warns(DeprecationWarning, match="pass doc_mode='document'"):
        old = plan_windows(off, 4, 1, mode="document")
    assert old.spec == WindowSpec(4, 1, "document")
    with pytest.warns(DeprecationWarning, match="read WindowPlan.doc_mode"):
        assert old.mode == "document"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        assert plan_windows(off, 4, 1, doc_mode="document").doc_mode == "document"
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="both set"):
        plan_windows(off, 4, 1, doc_mode="stream", mode="document")


def test_loader_takes_the_spec_as_it_is(make_store):
    from streamdata import WindowLoader

    path = make_store([list(range(1, 9)), list(range(10, 15))], vocab_size=100)
    spec = WindowSpec(4, 1, "document", prepend_bos_id=99)
    with WindowLoader(path, spec, batch_windows=2, device="cpu") as ld, \
            WindowLoader(path, chunk_size=4, overlap=1, doc_mode="document", prepend_bos_id=99, batch_windows=2,
                         device="cpu") as legacy:
        assert ld.spec is spec and ld.plan.spec is spec and legacy.spec == spec and ld.bos_id == 99
        got = [(b.inputs.tolist(), b.score_mask.tolist()) for b in ld]
        assert got == [(b.inputs.tolist(), b.score_mask.tolist()) for b in legacy] and got
    with pytest.raises(ConfigError, match="pass the spec alone"):
        WindowLoader(path, spec, chunk_size=4, device="cpu")
    with pytest.raises(ConfigError, match="prepend_bos=True but no prepend_bos_id"):
        WindowLoader(path, WindowSpec(4, prepend_bos=True), device="cpu")


# The evaluator's config checks its window fields with the spec's rules: the same one-line message.
CONFIG_BAD = [
    dict(chunk_size=0), dict(chunk_size=2.5), dict(chunk_size=8, overlap=-1), dict(chunk_size=8, overlap=8),
    dict(chunk_size=8, doc_mode="docs"), dict(chunk_size=8, tail="long"), dict(chunk_size=8, max_tokens=-1),
]


@pytest.mark.parametrize("kw", CONFIG_BAD)
def test_evaluator_config_errors_come_from_the_spec(kw):
    from evaluator import StreamingEvalConfig

    with pytest.raises(ConfigError) as spec_err:
        WindowSpec(**kw)
    with pytest.raises(ConfigError) as cfg_err:
        StreamingEvalConfig(**kw)
    assert str(cfg_err.value) == str(spec_err.value)


def test_config_resolve_and_loader_share_one_spec(monkeypatch):
    import torch

    import evaluator
    from evaluator import StreamingEvaluator, open_data
    from evaluator.resolve import resolve_run

    from ..evaluator.helpers import Bigram

    assert evaluator.WindowSpec is WindowSpec
    ev = StreamingEvaluator(Bigram(), chunk_size=6, overlap=2, device="cpu", verbose=False, mode="sliding",
                            tail="short", batch_size=3)
    # config.chunk_size=None is resolved from the model, then checked by the same rules
    with pytest.raises(ConfigError, match="overlap=2 must be smaller than chunk_size=2"):
        ev.chunk_size = 2
    assert ev.config.chunk_size == 6 and ev.chunk_size == 6  # a refused value changes nothing
    ed = open_data(torch.arange(30) % 50)
    run = resolve_run(ev.config, ev.adapter, ed, ev.device, ev.chunk_size, None)
    assert run.spec == WindowSpec(6, 2, "stream", "short") and run.batch_windows == 3
    seen = []
    real = WindowSpec.__post_init__
    monkeypatch.setattr(WindowSpec, "__post_init__", lambda self: seen.append(self) or real(self))
    with ed.windows(run.spec, ev.device, run.batch_windows) as ld:
        assert ld.spec is run.spec and ld.plan.spec is run.spec and ld.batch_windows == 3
        assert sum(b.num_scored for b in ld) == 29
    assert seen == []  # the loader built no second spec: nothing validated twice
