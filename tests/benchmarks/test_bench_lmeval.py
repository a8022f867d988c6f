"""bench_lmeval at toy size (no timing asserted): both sides score the same targets and agree."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("torch")


def test_without_lm_eval_is_one_line(monkeypatch, capsys):
    from benchmarks import bench_lmeval

    monkeypatch.setitem(sys.modules, "lm_eval.api.instance", None)  # as if lm-eval were not installed
    assert bench_lmeval.main(["--docs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lm-eval is not installed" in err[0] and ".[parity]" in err[0]


def test_toy_run_agrees_with_lm_eval(tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (the parity extra)")
    pytest.importorskip("accelerate")
    from benchmarks import bench_lmeval

    assert bench_lmeval.main(["--docs", "2", "--chunk-size", "128", "--batch-size", "4", "--repeat", "1",
                              "--threads", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_lmeval.json").read_text())
    assert res["docs"] == 2 and res["targets"] > 2 * 128 and res["windows"] > 2
    assert res["max_rel_doc_nll_diff"] < 1e-5 and res["total_rel_nll_diff"] < 1e-5
    assert all(v > 0 for v in res["tok_per_s"].values())
    assert "ours / lm-eval" in capsys.readouterr().out
