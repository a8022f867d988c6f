"""``python -m benchmarks.gpu_check``: the one GPU check command, tested on the CPU.

Fast tests cover the parts: the no-GPU refusal, the step runner (timeouts kill the step, the rest
runs), JUnit counts, the summary's goals, the PNG, and ``--dry-run`` of one real step end to end.
The whole dry run (every step at toy sizes, ~3-4 min on a loaded 2-core machine) runs only with
``STREAMEVAL_TEST_GPU_CHECK=1``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from benchmarks import gpu_check as gc  # noqa: E402


def test_without_cuda_it_says_so_in_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert gc.main(["--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--dry-run" in err
    assert not (tmp_path / "o" / "gpu_check.json").exists()  # no numbers made up


def test_a_step_that_overruns_is_killed_and_recorded(tmp_path):
    slow = gc.Step("slow", [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 1.5)
    t0 = time.monotonic()
    gc.run_step(slow, tmp_path, deadline=time.monotonic() + 100, reserve=0)
    assert time.monotonic() - t0 < 30 and slow.status.startswith("timed out") and slow.rc is None
    assert "started" in (tmp_path / "slow.log").read_text()
    bad = gc.run_step(gc.Step("bad", [sys.executable, "-c", "raise SystemExit(3)"], 30), tmp_path,
                      deadline=time.monotonic() + 100, reserve=0)
    assert bad.status == "failed (rc 3)"
    late = gc.run_step(gc.Step("late", [sys.executable, "-c", "pass"], 30), tmp_path, deadline=time.monotonic() + 3)
    assert late.status.startswith("skipped:") and late.rc is None  # out of budget: not started


def test_junit_counts(tmp_path):
    f = tmp_path / "r.xml"
    f.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="7" failures="1" errors="1" '
                 'skipped="2"></testsuite></testsuites>')
    assert gc.junit_counts(f) == {"passed": 3, "failed": 1, "errors": 1, "skipped": 2}
    assert gc.junit_counts(tmp_path / "missing.xml") is None


def test_cuda_test_files_are_found():
    files = gc.cuda_test_files()
    assert "tests/evaluator/test_engine_cuda.py" in files and "tests/evaluator/test_sync.py" in files
    assert "tests/streamdata/test_loader_cuda.py" in files and "tests/test_gpu_check.py" not in files


def _steps(**data):
    out = {}
    for name, d in data.items():
        s = gc.Step(name, ["x"], 1)
        s.status, s.data = ("ok", d) if d != "not available" else ("not available", None)
        out[name] = s
    return out


def test_summary_judges_each_goal():
    ev = {"paired_ratios": {"ours/compute": 0.98, "ours/quickref": 7.5, "ours_overlap/guide": 3.6,
                            "ours_overlap_compiled/guide": 4.0, "ours_compiled/ours": 1.1},
          "ratios": {}, "results": {"ours": {"tok_per_s": 6e5}, "compute": {"positions": 1_000_000, "seconds": 2.0}}}
    loader = {"results": [{"variant": "(d) WindowLoader", "overlap": 0, "tok_per_s": 4e6},
                          {"variant": "(d) WindowLoader", "overlap": 512, "tok_per_s": 9e9}]}
    memory = {"evaluator": [{"cuda_peak": 1000}, {"cuda_peak": 1040}]}
    tests = {"cuda": {"passed": 40, "failed": 0, "errors": 0, "skipped": 1},
             "inductor": {"passed": 1, "failed": 1, "errors": 0, "skipped": 0}}
    rows = {r["measure"]: r for r in gc.summarize(_steps(tests=tests, eval=ev, loader=loader, memory=memory,
                                                          docs={"ratio": 6.2, "rows": {}},
                                                          precision={"dtypes": {"bfloat16": {"ratio_mean_abs": 1.3}}},
                                                          distributed={"rows": {"1 process, all threads": {"vs_1_process": 1.0},
                                                                                "2 processes (torchrun), 1 thread each": {"vs_1_process": 1.9}}}))}
    assert rows["CUDA tests"]["pass"] is False  # one inductor failure fails the row
    assert rows["end to end vs compute only"]["pass"] is True
    assert rows["overlap 0, chunk 1024 vs the seed's batch-1 loop"]["pass"] is False
    assert rows["overlap 512, chunk 1024 vs the transformers guide loop"]["pass"] is True
    assert rows["overlap 512 compiled vs the guide loop (moonshot)"]["pass"] is False
    lv = rows["loader alone vs the model's consumption"]
    assert lv["value"] == pytest.approx(4e6 / 5e5) and lv["pass"] is False  # 8x < 10x
    mem = rows["device memory streaming 1M vs 100M tokens"]
    assert mem["value"] == pytest.approx(0.04) and mem["pass"] is True
    assert rows["document mode kv-cache, parallel vs batch 1"]["value"] == 6.2
    assert rows["compiled vs eager, overlap 0"]["pass"] is None  # reported, no goal
    prec = rows["kv-cache bf16: distance from fp32, chunked / full forward"]
    assert prec["value"] == 1.3 and prec["pass"] is True
    assert rows["distributed over every GPU vs 1"]["value"] == 1.9
    # a step that produced nothing: n/a with its status, never a number
    # batch auto's rows, from the auto_batch blocks of bench_eval and bench_docs
    ab = {"ratio_auto_vs_best_fixed": 0.97, "ratio_auto_vs_old_rule": 1.4, "auto_choice": {"chosen": 8},
          "best_fixed": 16, "old_rule": 2}
    got = {r["measure"]: r for r in gc.summarize(_steps(eval={**ev, "auto_batch": ab},
                                                         docs={"ratio": 6.2, "auto_batch": {**ab, "old_rule": 1,
                                                                                            "ratio_auto_vs_best_fixed": 0.9}}))}
    assert got["batch auto vs the best fixed size, sliding"]["pass"] is True
    assert got["batch auto vs the best fixed size, sliding"]["note"] == "auto chose 8, the sweep's best 16"
    assert got["batch auto vs the old rule (2), sliding"]["value"] == 1.4
    assert got["batch auto vs the best fixed size, parallel documents"]["pass"] is False
    assert rows["batch auto vs the best fixed size, sliding"]["value"] is None  # no auto_batch block: n/a
    missing = {r["measure"]: r for r in gc.summarize(_steps(eval=None, docs="not available"))}
    assert missing["end to end vs compute only"]["value"] is None and missing["end to end vs compute only"]["pass"] is None
    assert "not available" in missing["document mode kv-cache, parallel vs batch 1"]["note"]
    # pytest that wrote no JUnit results (e.g. it could not start) fails the tests row
    t = {r["measure"]: r for r in gc.summarize(_steps(tests={"cuda": None, "inductor": None}))}["CUDA tests"]
    assert t["pass"] is False and t["value"] == "no results"


def test_the_demo_step_times_the_full_size_demo_on_the_device(tmp_path):
    """The README's first command, timed where a user would run it (issue 25, item 2): the full-size
    demo on the GPU, into a temporary folder (a fresh run: nothing reused), its wall time a summary row."""
    store = tmp_path / "tmp" / "store"
    steps = {s.name: s for s in gc.plan_steps(tmp_path / "o", store, dry=False, device="cuda:0", gpus=1)}
    demo = steps["demo"].argv
    assert demo[1:5] == ["-m", "evaluator", "demo", "--full"] and demo[demo.index("--device") + 1] == "cuda:0"
    assert demo[demo.index("--out") + 1] == str(tmp_path / "tmp" / "demo")
    dry = gc.plan_steps(tmp_path / "o", store, dry=True, device="cuda", gpus=0)
    toy = next(s for s in dry if s.name == "demo").argv
    assert "--full" not in toy and toy[toy.index("--device") + 1] == "cpu" and "--max-tokens" in toy

    s = gc.Step("demo", demo, 90)
    s.status, s.seconds = "ok", 31.5
    run = tmp_path / "tmp" / "demo"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({"total_tokens": 1_000_000, "total_time": 4.0, "tokens_per_second": 250_000.0,
                                                   "perplexity": 130.2, "device": "cuda:0"}))
    gc.collect(s, tmp_path / "o")
    row = {r["measure"]: r for r in gc.summarize({"demo": s})}["demo, full size: wall time (s)"]
    assert row["value"] == 31.5 and row["pass"] is None
    assert row["note"] == "1,000,000 tokens scored in 4.0 s (250,000 tok/s), perplexity 130.2"
    s.status, s.seconds, s.data = "timed out after 90 s", 90.0, None
    row = {r["measure"]: r for r in gc.summarize({"demo": s})}["demo, full size: wall time (s)"]
    assert row["value"] is None and row["note"] == "timed out after 90 s"  # never a time for a run that did not finish


def test_dry_run_of_one_step_writes_json_and_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "gc"
    rc = gc.main(["--dry-run", "--out", str(out), "--skip", "tests", "demo", "eval", "memory", "docs", "precision",
                                                 "distributed"])
    text = capsys.readouterr().out
    assert rc == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert data["dry_run"] is True and data["steps"]["loader"]["status"] == "ok"
    assert data["steps"]["eval"]["status"] == "skipped: --skip" and data["steps"]["demo"]["status"] == "skipped: --skip"
    assert (out / "loader" / "bench_loader.json").is_file() and (out / "gpu_check.png").stat().st_size > 0
    assert "measure" in text and "dry run" in text


@pytest.mark.skipif(os.environ.get("STREAMEVAL_TEST_GPU_CHECK") != "1",
                    reason="the whole dry run takes minutes on a 2-core CPU: set STREAMEVAL_TEST_GPU_CHECK=1")
def test_whole_dry_run(tmp_path):
    out = tmp_path / "gc"
    assert gc.main(["--dry-run", "--out", str(out)]) == 0
    data = json.loads((out / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in data["steps"].items()} == {k: "ok" for k in gc.STEPS}
    assert data["steps"]["tests"]["data"]["cuda"]["failed"] == 0
    ev = data["steps"]["eval"]["data"]
    assert {"ours_compiled/ours", "ours_overlap_compiled/guide"} <= set(ev["ratios"])
    # the compiled rows score the same targets to the same loss (fp32, CPU)
    res = ev["results"]
    assert res["ours_compiled"]["scored"] == res["ours"]["scored"]
    assert res["ours_compiled"]["loss"] == pytest.approx(res["ours"]["loss"], rel=1e-5)
