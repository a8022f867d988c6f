"""bench_precision at toy size: per dtype, chunked kv-cache and the full forward against fp32."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")


def test_toy_run_reports_both_distances_per_dtype(tmp_path, capsys):
    from benchmarks.bench_precision import main

    assert main(["--docs", "3", "--max-len", "40", "--chunk-size", "16", "--dtypes", "float32,bfloat16",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_precision.json").read_text())["dtypes"]
    assert data["float32"]["full forward"]["max_abs"] == 0.0  # the reference itself
    assert data["float32"]["chunked kv-cache"]["max_abs"] < 1e-4
    bf = data["bfloat16"]
    assert bf["full forward"]["mean_abs"] > 0 and bf["ratio_mean_abs"] <= 2.0
    assert bf["carry_check"]["ok"] and bf["carry_check"]["dtype"] == "bfloat16"
    assert "chunked / full" in capsys.readouterr().out


def test_a_bad_dtype_is_one_line(capsys):
    from benchmarks.bench_precision import main

    with pytest.raises(SystemExit):
        main(["--dtypes", "float64"])
    err = capsys.readouterr().err
    assert "'float64' is not one of" in err
