"""Smoke test of benchmarks/bench_scaling.py at toy sizes: every row runs, the JSON is complete and
its counts are exact. No timing assertions (the goals are printed, not asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_bench_scaling_cli(tmp_path, capsys):
    from benchmarks import bench_scaling

    assert bench_scaling.main(["--lengths", "1e5", "3e6", "--documents", "5000", "--chunk-size", "64",
                               "--batch-windows", "4", "--batches", "2", "--tmp", str(tmp_path), "--out",
                               str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "first batch within 1 s" in text and "document mode over 5,000 documents" in text
    data = json.loads((tmp_path / "out" / "bench_scaling.json").read_text())
    rows = data["loader"]
    assert [r["n"] for r in rows] == [10**5, 3 * 10**6]
    for r in rows:  # exact counts of the sparse stream: windows of 64 (tail full), every target once
        n = r["n"]
        assert r["tokens"] == n and r["scored"] == n - 1
        assert r["windows"] == 1 + -(-(n - 1 - 64) // 64) and r["batches"] == -(-r["windows"] // 4)
        assert r["first_inputs"] == [4, 64] and r["batches_read"] == 3
        assert r["first_batch_s"] > 0 and r["rss_growth"] >= 0
    assert rows[0]["rss_growth_vs_base"] == 0
    doc = data["document"]
    lens = np.arange(5000) % 8 + 1  # the synthetic index's documents: 1..8 tokens, cycling
    assert doc["tokens"] == int(lens.sum()) and doc["scored"] == int(lens.sum())  # BOS: every token scored
    assert doc["windows"] == 5000  # each document fits one window of 64
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]  # the sparse files and the index are removed
