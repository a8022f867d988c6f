"""``streameval run`` through main(argv): table, results.json, CSV tables, plots, bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from evaluator import StreamingEvaluator
from evaluator.cli import main

from .helpers import V, tiny_gpt2


@pytest.fixture
def hf_model_dir(tmp_path):
    d = tmp_path / "tiny-gpt2"
    tiny_gpt2(n_positions=64).save_pretrained(d)
    return d


@pytest.fixture
def store(make_store):
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, V, size=int(n)).tolist() for n in rng.integers(1, 90, size=12)]
    return make_store(docs, vocab_size=V, shard_tokens=100)


def test_run_writes_report_matching_the_api(capsys, tmp_path, store, hf_model_dir):
    out = tmp_path / "report"
    rc = main(["run", str(store), "--model", str(hf_model_dir), "--chunk-size", "32", "--overlap", "8", "--tail", "short",
               "--device", "cpu", "--out", str(out), "--per-token", "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "bits per byte" in printed and "report:" in printed
    res = json.loads((out / "results.json").read_text())
    ref = StreamingEvaluator(str(hf_model_dir), chunk_size=32, overlap=8, tail="short", device="cpu", verbose=False) \
        .evaluate_streaming_with_metrics(str(store))
    assert res["total_tokens"] == ref["total_tokens"]
    assert math.isclose(res["loss"], ref["loss"], rel_tol=1e-6)
    # the fixture store counts 4 bytes and 1 word per token: bits per byte follows from the loss
    assert res["mode"] == "sliding" and res["chunk_size"] == 32 and res["overlap"] == 8
    assert res["store"]["tokenizer"]["vocab_size"] == V and res["model_identity"]["vocab_size"] == V
    assert res["versions"]["torch"] and res["config"]["overlap"] == 8
    assert res["tail"] == res["config"]["tail"] == "short"
    with open(out / "chunks.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == res["num_chunks"]
    np.testing.assert_allclose([float(r["loss"]) for r in rows], ref["chunk_losses"], rtol=1e-6)
    with open(out / "documents.csv") as f:
        docs = list(csv.DictReader(f))
    assert len(docs) == 12 and sum(int(d["scored_tokens"]) for d in docs) == res["total_tokens"]
    with open(out / "positions.csv") as f:
        assert sum(int(r["tokens"]) for r in csv.DictReader(f)) == res["total_tokens"]
    per_token = np.fromfile(out / "per_token_losses.f32", dtype=np.float32)
    assert per_token.shape == (res["total_tokens"],)
    assert math.isclose(float(per_token.astype(np.float64).sum()), res["nll_sum"], rel_tol=1e-5)
    for png in ("perplexity_per_chunk.png", "loss_by_position.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_bad_input_is_one_line(capsys, tmp_path, store, hf_model_dir, make_store):
    cases = [
        (["run", str(store), "--model", str(hf_model_dir), "--chunk-size", "16", "--overlap", "16", "--device", "cpu"], "--overlap 16"),
        (["run", str(store), "--model", str(hf_model_dir), "--chunk-size", "128", "--device", "cpu", "--mode", "sliding"], "--chunk-size 128 exceeds"),
        (["run", str(tmp_path / "nope"), "--model", str(hf_model_dir), "--device", "cpu"], "does not exist"),
        (["run", str(store), "--model", "no_such_pkg.mod:factory", "--device", "cpu"], "cannot import"),
        (["run", str(make_store([[1, 2, 3, V + 5, 4]], vocab_size=V + 10)), "--model", str(hf_model_dir), "--device", "cpu",
          "--chunk-size", "8"], f"token id {V + 5}"),
    ]
    capsys.readouterr()
    for argv, msg in cases:
        assert main(argv + ["--quiet"]) == 2, argv
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("streameval: error: ") and msg in err[0], err


def test_help_lists_the_options():
    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
