"""Smoke tests of the benchmarks at toy sizes: every stage runs and reports sane numbers.

No timing assertions: these check that the code paths work and the JSON is complete, not speed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

VOCAB = 500
MODEL = "tests.benchmarks.test_benchmarks_smoke:tiny_model"


def tiny_model():
    """A 1-layer GPT-2 with random weights (the factory the benchmarks load by name)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Toy shapes: with two OpenMP threads on a busy 2-core machine every tiny op waits for the other
    thread's time slice (ms each); one thread keeps these tests fast and their timing irrelevant."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def toy_store(make_store):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in rng.integers(50, 400, size=12)]
    return make_store(docs, vocab_size=VOCAB, name="toy")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_suite_records_the_evaluators_auto_batch():
    """The suite's record of what batch_size="auto" would pick is live (it once called a helper that
    no longer existed, swallowed the error and always recorded None): fast-lane twin of the suite test."""
    from benchmarks.suite import evaluator_auto_batch
    from evaluator import load_model

    adapter = load_model(tiny_model())
    for L in (32, 1 << 20):
        B = evaluator_auto_batch(adapter, torch.device("cpu"), L)
        assert isinstance(B, int) and B >= 1, (L, B)
    assert evaluator_auto_batch(adapter, torch.device("cpu"), 1 << 20) <= evaluator_auto_batch(adapter, torch.device("cpu"), 32)


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_suite_reports_every_stage(toy_store, tmp_path):
    from benchmarks.suite import Settings, report, run_suite

    st = Settings(chunk_size=32, tokens=600, sweep_tokens=300, chunk_sweep=(16, 32, 128), batch_sweep=(1, 4),
                  n_positions=64, repeat=1, loader_repeat=1, memory_sizes=(3000, 6000), link_sizes=(4096,),
                  workers=(0,), batch=4, memory_chunk=256, memory_batch=2)
    out = tmp_path / "out"
    res = run_suite(store=str(toy_store), model=MODEL, device="cpu", out=str(out), settings=st,
                    cache=str(tmp_path / "cache"), log=lambda s: None, threads=1)
    # batch set by the suite: what the evaluator's auto would pick is recorded (it was always None:
    # the suite called a helper that no longer existed and swallowed the error)
    assert isinstance(res["auto_batch"], int) and res["auto_batch"] >= 1
    lines: list[str] = []
    report(res, lines.append)
    text = "\n".join(lines)
    assert "VERDICT: bound by" in text and "n/a (no device)" in text

    data = json.loads((out / "suite.json").read_text())
    stages = data["stages"]
    for k in ("disk_cold", "disk_warm", "loader", "compute", "end_to_end"):
        assert _positive(stages[k]), (k, stages[k])
    assert stages["link"] is None and data["link"] is None  # no device here
    v = data["verdict"]
    assert v["bound_by"] in ("disk", "loader", "compute") and _positive(v["overlap_efficiency"])

    ev = data["eval"]["results"]
    assert set(ev) == {"ours", "compute", "quickref", "ours_overlap", "guide"}
    for r in ev.values():
        assert _positive(r["tok_per_s"]) and r["scored"] == 599 and math.isfinite(r["loss"])
    # same tokens, same windows, same model: ours and the batch-1 loop agree on the loss
    assert ev["ours"]["loss"] == pytest.approx(ev["quickref"]["loss"], rel=1e-4)
    assert ev["ours_overlap"]["positions"] > ev["ours"]["positions"]
    for k in ("ours/quickref", "ours_overlap/guide", "loader/memmap", "loader/nanogpt", "loader/dataloader0"):
        assert _positive(data["baseline_ratios"][k]), k

    sw = data["sweeps"]
    assert [p["chunk_size"] for p in sw["chunk"]] == [16, 32] and sw["skipped_chunks"] == [128]
    assert [p["batch"] for p in sw["batch"]] == [1, 4]
    assert all(_positive(p["tok_per_s"]) for p in sw["chunk"] + sw["batch"])

    rows = data["memory"]["rows"]
    assert [r["tokens"] for r in rows] == [3000, 6000]
    assert all(_positive(r["peak_rss_kb"]) and _positive(r["median_rss_kb"]) and r["scored"] == r["tokens"] - 1
               for r in rows)
    assert isinstance(data["memory"]["flatness"]["flat"], bool)
    assert {p.name for p in out.iterdir()} >= {"suite.json", "stages.png", "sweeps.png", "memory.png"}


def test_bench_eval_cli(toy_store, tmp_path, capsys):
    from benchmarks import bench_eval

    assert bench_eval.main(["--store", str(toy_store), "--model", MODEL, "--device", "cpu", "--tokens", "500",
                            "--chunk-size", "32", "--batch-size", "4", "--repeat", "1", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "ours / (a) compute only" in text and "(c) HF perplexity guide" in text
    data = json.loads((tmp_path / "bench_eval.json").read_text())
    assert set(data["ratios"]) == {"ours/compute", "ours_ckpt/compute", "ours_ckpt/ours", "ours/quickref",
                                   "ours_overlap/guide"}
    assert all(_positive(x) for x in data["ratios"].values())
    assert data["results"]["guide"]["scored"] == data["results"]["ours"]["scored"] == 499
    # the checkpointed row computes the same loss (a fresh checkpoint folder each run, never a no-op resume)
    assert data["results"]["ours_ckpt"]["scored"] == 499
    assert data["results"]["ours_ckpt"]["loss"] == data["results"]["ours"]["loss"]
    assert "ours+checkpoints / ours" in text


def test_bench_loader_cli(toy_store, tmp_path):
    from benchmarks import bench_loader

    assert bench_loader.main(["--store", str(toy_store), "--chunk-size", "64", "--overlap", "16", "--batch-windows", "4",
                              "--workers", "0", "--repeat", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_loader.json").read_text())
    assert all(_positive(r["tok_per_s"]) for r in data["results"])
    # the GPU path's host side alone, and the CPU path against the widened copy, at both overlaps
    fills = [r for r in data["results"] if r["variant"].startswith("(d) slot fill")]
    assert sorted(r["overlap"] for r in fills) == [0, 16]
    from streamdata import open_store

    with open_store(toy_store) as s:  # every input token of the plan was filled (overlap 0: B x L per batch)
        from streamdata.windows import plan_windows

        n_in = int(plan_windows(s.doc_offsets, 64, 0, "stream").length.size) * 64
    assert next(r for r in fills if r["overlap"] == 0)["tokens"] == n_in
    assert all(_positive(r["vs_int64_limit"]) for r in data["results"] if r["variant"] == "(d) WindowLoader")


@pytest.mark.slow  # ~2 s: two benchmarks, nine runs each
def test_auto_batch_rows(toy_store, tmp_path, capsys):
    """bench_eval/bench_docs --auto-batch: batch auto against every size of the sweep and the old rule."""
    from benchmarks import bench_docs, bench_eval
    from evaluator.autobatch import ladder_sizes

    assert bench_eval.main(["--store", str(toy_store), "--model", MODEL, "--device", "cpu", "--tokens", "500",
                            "--chunk-size", "32", "--repeat", "1", "--auto-batch", "--out", str(tmp_path)]) == 0
    ab = json.loads((tmp_path / "bench_eval.json").read_text())["auto_batch"]
    sweep = list(dict.fromkeys(ladder_sizes(ab["auto_choice"]["bound"]) + [2048 // 32]))  # the old rule: 2048 // L
    assert [int(k) for k in ab["fixed_tok_per_s"]] == sweep and ab["old_rule"] == 64 and ab["best_fixed"] in sweep
    assert _positive(ab["ratio_auto_vs_best_fixed"]) and _positive(ab["ratio_auto_vs_old_rule"])
    assert "auto vs best fixed" in capsys.readouterr().out
    assert bench_docs.main(["--device", "cpu", "--docs", "12", "--min-len", "8", "--max-len", "60", "--positions", "64",
                            "--batch-size", "4", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
                            "--intermediate", "64", "--vocab", "512", "--repeat", "1", "--auto-batch",
                            "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_docs.json").read_text())
    from benchmarks.gpu_check import _find_ratio

    assert _find_ratio(data)[0] == "ratio_parallel_vs_batch_1"  # (gpu_check's docs row: the first ratio found)
    assert data["auto_batch"]["old_rule"] == 1 and _positive(data["auto_batch"]["ratio_auto_vs_best_fixed"])
