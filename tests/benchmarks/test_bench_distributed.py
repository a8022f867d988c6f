"""bench_distributed at toy size: the worker (what every launch runs) and bad input. The launches
themselves (1 process, torchrun with 2) are what tests/evaluator/test_distributed.py covers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import bench_distributed as bd


def test_worker_scores_every_target_once(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "ids.bin"
    np.random.default_rng(0).integers(0, bd.VOCAB, size=300, dtype=np.uint16).tofile(path)
    assert bd.main(["--worker", str(path), "--chunk-size", "32", "--batch-size", "3", "--layers", "1", "--hidden", "64"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["total_tokens"] == 299 and r["world_size"] == 1 and r["backend"] is None
    assert r["tokens_per_second"] > 0 and r["nll_sum"] > 0


@pytest.mark.parametrize("flag,value", [("--procs", "1"), ("--tokens", "1"), ("--repeat", "0")])
def test_bad_counts_are_one_line(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        bd.main([flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag}={value} must be >= " in err
