"""Smoke test of the evaluator rows of benchmarks/bench_scaling.py at toy sizes: each row evaluates
the whole sparse store until its progress lines, the JSON is complete, counts are exact and the
metric state is the same at every length. No timing assertions (the goals are printed, not asserted)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
@pytest.mark.parametrize("compare", [False, True], ids=["run", "compare"])
def test_bench_scaling_evaluator_rows(tmp_path, capsys, compare):
    from benchmarks import bench_scaling

    assert bench_scaling.main(["--part", "eval", "--device", "cpu", "--lengths", "1e5", "3e6", "--chunk-size", "64",
                               "--batch-windows", "4", "--lines", "2", "--tmp", str(tmp_path), "--out",
                               str(tmp_path / "out")] + ["--compare"] * compare) == 0
    text = capsys.readouterr().out
    assert "evaluator: first progress line within 5 s" in text and "loader, stream mode" not in text
    assert ("compare (two models), whole store" in text) == compare
    data = json.loads((tmp_path / "out" / "bench_scaling.json").read_text())
    assert data["loader"] == [] and data["evaluator_device"] == "cpu"
    rows = data["evaluator"]
    assert [r["n"] for r in rows] == [10**5, 3 * 10**6]
    for r in rows:  # the whole store's plan (no max_tokens): windows of 64 with a full tail
        assert r["windows"] == 1 + -(-(r["n"] - 1 - 64) // 64)
        assert 0 < r["first_line_s"] <= r["lines_s"] and r["rss_growth"] >= 0 and r["cuda_peak"] is None
    assert rows[0]["metric_state_bytes"] == rows[1]["metric_state_bytes"] < 1 << 20
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # sparse files and spilled arrays removed


def test_bench_scaling_refuses_bad_flags_in_one_line(capsys):
    from benchmarks import bench_scaling

    assert bench_scaling.main(["--part", "eval", "--lines", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--lines 0" in err and len(err.splitlines()) == 1
