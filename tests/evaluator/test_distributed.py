"""Distributed evaluation (evaluator/distributed.py): N gloo processes under torchrun equal one process.

The runs launch ``tests/evaluator/dist_worker.py`` with ``python -m torch.distributed.run`` (torchrun)
in a subprocess, on the CPU; the single-process reference is the same script without torchrun.
``OMP_NUM_THREADS=1`` in both (torchrun sets it for its workers): fp32 matmuls then add in the same
order, so every figure is compared exactly, and the float64 totals within 1e-9 relative (the ranks'
partial sums are added in another order than one process adds them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evaluator import distributed as dd
from evaluator.errors import ConfigError
from evaluator.run_folder import RunFolder
from streamdata.errors import ConfigError as StreamConfigError
from streamdata.windows import plan_windows

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("dist_worker.py"))
CASES = ["sliding", "sliding_doc", "kv_doc", "stateful_doc", "kv_stream", "stateful_stream_warm", "kv_stream_warm",
         "stateful_stream_k3", "ckpt"]
TIMEOUT_S = 40  # the process group's timeout in these runs (STREAMEVAL_DIST_TIMEOUT)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env[dd.TIMEOUT_ENV] = str(TIMEOUT_S)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _launch(out: Path, nproc: int, cases: list[str], timeout: float = 300, tmp: Path | None = None,
            **extra_env: str) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**_env(), **extra_env}
    if tmp is not None:  # the workers' temporary files (per-token losses, spilled detail) go there
        tmp.mkdir()
        env["TMPDIR"] = str(tmp)
    cmd = [sys.executable, WORKER, str(out), *cases] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", WORKER, str(out), *cases]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _load(out: Path, case: str) -> dict:
    return json.loads((out / f"{case}.json").read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world1")
    p = _launch(out, 1, CASES)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
@pytest.mark.parametrize("nproc", [2, 3])
def test_n_processes_equal_one(single, tmp_path, nproc):
    p = _launch(tmp_path, nproc, CASES)
    assert p.returncode == 0, p.stderr[-3000:]
    for case in CASES:
        one, many = _load(single, case), _load(tmp_path, case)
        if case == "kv_stream":  # one state through the whole stream: refused, naming document mode
            assert "error" not in one
            assert "--doc-mode document" in many["error"] and f"split over {nproc} processes" in many["error"]
            assert "--split-warmup K" in many["error"]
            continue
        assert one["split_warmup"] is None, case  # one process: nothing to split, nothing approximated
        if case == "stateful_stream_k3":  # an approximation: every target once, other numbers, and said so
            assert many["split_warmup"]["tokens"] == 3 and many["split_warmup"]["restarts"] == nproc - 1
            assert "approximation" in many["split_warmup"]["note"]
            assert many["total_tokens"] == one["total_tokens"] and many["doc_tokens"] == one["doc_tokens"]
            assert many["chunk_losses"][0] == one["chunk_losses"][0]  # rank 0's block starts the stream: exact
            assert many["nll_sum"] != one["nll_sum"]
            continue
        if case.endswith("_warm"):
            assert many["split_warmup"]["tokens"] == 10**9, case
        assert many["world_size"] == nproc and many["backend"] == "gloo", case
        assert one["world_size"] == 1 and one["backend"] is None
        assert many["total_tokens"] == one["total_tokens"], case
        assert many["num_chunks"] == one["num_chunks"], case
        assert many["doc_tokens"] == one["doc_tokens"], case
        assert many["bucket_tokens"] == one["bucket_tokens"], case
        # Sums of the same fp32 NLLs, reduced in float64 (an average of averages would be off by
        # O(1)). A rank batches its windows with other neighbours (sliding, batch 2: another padding
        # width), so a target's fp32 NLL may round one ulp apart (seen: 4.8e-7 on one target of a
        # 347-nat bucket on some CPUs): 1e-6 relative, not 1e-9.
        assert abs(many["nll_sum"] - one["nll_sum"]) <= 1e-6 * abs(one["nll_sum"]), case
        np.testing.assert_allclose(many["doc_nll"], one["doc_nll"], rtol=1e-6, atol=0, err_msg=case)
        np.testing.assert_allclose(many["bucket_nll"], one["bucket_nll"], rtol=1e-6, atol=0, err_msg=case)
        assert many["chunk_losses"] == one["chunk_losses"], case  # every window lies in one rank: exact
        # one file, each rank's slice at its offset (every value in its place; fp32 ulps as above)
        np.testing.assert_allclose(many["per_token"], one["per_token"], rtol=1e-6, atol=0, err_msg=case)
        assert many["bits_per_byte"] == pytest.approx(one["bits_per_byte"], rel=1e-6), case
    # with a checkpoint folder: per-rank checkpoints, the reduced columns and per-token file at the top
    run = tmp_path / "ckpt-run"
    assert sorted(p.name for p in run.glob("rank-*")) == [f"rank-{r}-of-{nproc}" for r in range(nproc)]
    assert _load(tmp_path, "ckpt")["per_token_path"] == str(run / "per_token_losses.f32")
    assert np.array_equal(np.load(run / "document_tokens.npy"), np.load(single / "ckpt-run" / "document_tokens.npy"))
    if nproc != 2:
        return
    # a rerun resumes every rank's final checkpoint (nothing recomputed): the same numbers
    rerun = tmp_path / "again"
    rerun.mkdir()
    (rerun / "ckpt-run").symlink_to(run)
    p = _launch(rerun, nproc, ["ckpt"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _load(rerun, "ckpt")["per_token"] == _load(tmp_path, "ckpt")["per_token"]
    assert _load(rerun, "ckpt")["nll_sum"] == _load(tmp_path, "ckpt")["nll_sum"]
    # ... and one with another world size is refused, naming both
    p = _launch(rerun, 1, ["ckpt"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"run with {nproc} process(es), this run has 1: rerun with {nproc}" in _load(rerun, "ckpt")["error"]


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_a_killed_rank_resumes_from_its_checkpoint(single, tmp_path):
    """kv-cache document mode, a checkpoint per batch; rank 1 dies at its 15th forward (of ~30). The same
    command then resumes every rank from its own checkpoint (carried cache, spilled sums, its
    slice of the per-token file) and equals the uninterrupted one-process run."""
    p = _launch(tmp_path, 2, ["resume"], DIST_WORKER_CRASH_AFTER="15")
    assert p.returncode != 0 and not (tmp_path / "resume.json").exists()
    progress = json.loads((tmp_path / "resume-run" / "rank-1-of-2" / "progress.json").read_text())
    assert progress["status"].startswith("unfinished") and progress["windows_done"] > 0
    p = _launch(tmp_path, 2, ["resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    one, res = _load(single, "kv_doc"), _load(tmp_path, "resume")
    assert res["total_tokens"] == one["total_tokens"] and res["doc_tokens"] == one["doc_tokens"]
    assert abs(res["nll_sum"] - one["nll_sum"]) <= 1e-9 * abs(one["nll_sum"])
    assert res["per_token"] == one["per_token"] and res["chunk_losses"] == one["chunk_losses"]


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_a_failing_rank_stops_every_rank(tmp_path):
    t0 = time.monotonic()
    p = _launch(tmp_path / "out", 2, ["fail"], timeout=TIMEOUT_S * 4, tmp=tmp_path / "tmp")
    assert p.returncode != 0
    assert "boom: rank 1 failed on purpose" in p.stderr
    assert not [f for f in (tmp_path / "tmp").iterdir() if f.name.startswith("streameval-")]  # nothing of ours left
    assert time.monotonic() - t0 < TIMEOUT_S * 3  # no hang: a bound, not a speed goal


# ---- the split (no processes needed) ---------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_range_document_mode_whole_documents_balanced_by_tokens(seed, world):
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 40, size=int(rng.integers(1, 60)))
    lens[rng.random(len(lens)) < 0.2] = 1
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    L, O = int(rng.integers(1, 12)), 0
    O = int(rng.integers(0, L))
    plan = plan_windows(off, L, O, "document", bool(seed % 2), max_tokens=None if seed < 3 else int(off[-1] * 0.7))
    docs = plan.doc
    ranges = [dd.rank_range(plan, off, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(plan)
    assert all(ranges[r][1] == ranges[r + 1][0] and ranges[r][0] <= ranges[r][1] for r in range(world - 1))
    N = plan.num_tokens
    for r, (lo, hi) in enumerate(ranges):
        if 0 < lo < len(plan):
            assert docs[lo] != docs[lo - 1]  # a block starts at a document's first window
            # brute force: the first document with windows whose start offset reaches r * N / world
            d = int(np.searchsorted(off, r * N // world, side="left"))
            assert docs[lo] == docs[docs >= d].min()


def test_rank_range_stream_mode_is_shard():
    plan = plan_windows(np.array([0, 1000]), 16, 4, "stream")
    for world in (1, 2, 3, 7):
        for r in range(world):
            lo, hi = dd.rank_range(plan, None, r, world)
            sh = plan.shard(r, world)
            assert (lo, hi) == (sh.first, sh.first + len(sh))


def test_check_rank_folders_refuses_another_world_size(tmp_path):
    # (the rule lives in the run folder's owner now: RunFolder.check_world)
    def check(root, info):
        RunFolder(root).check_world(info)

    info2 = dd.DistInfo(0, 2, 0, "gloo")
    check(tmp_path / "missing", info2)  # nothing there: fine
    (tmp_path / "rank-0-of-3").mkdir()
    check(tmp_path, info2)  # a folder without a checkpoint: not a run
    (tmp_path / "rank-0-of-3" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"run with 3 process\(es\), this run has 2: rerun with 3"):
        check(tmp_path, info2)
    with pytest.raises(ConfigError, match=r"run with 3 process\(es\), this run has 1"):
        check(tmp_path, None)
    check(tmp_path, dd.DistInfo(1, 3, 1, "gloo"))
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # a single-process run's checkpoint
    with pytest.raises(ConfigError, match=r"run with 1 process\(es\), this run has 3"):
        check(tmp_path, dd.DistInfo(1, 3, 1, "gloo"))


def test_remove_rank_folders_removes_only_our_files(tmp_path):
    # (--overwrite of a run folder of ours: RunFolder.open(..., overwrite=True))
    RunFolder.open(tmp_path).close()  # made ours (empty)
    a, b = tmp_path / "rank-0-of-2", tmp_path / "rank-1-of-2"
    for f in (a, b):
        f.mkdir()
        (f / "checkpoint.pt").write_bytes(b"x")
        (f / "window_nll.npy.partial").write_bytes(b"x")
    (b / "notes.txt").write_text("mine")
    (tmp_path / "rank-data").mkdir()
    RunFolder.open(tmp_path, overwrite=True).close()
    assert not a.exists()
    assert sorted(p.name for p in b.iterdir()) == ["notes.txt"]
    assert (tmp_path / "rank-data").is_dir()


@pytest.mark.parametrize("name,value,match", [
    ("WORLD_SIZE", "two", "WORLD_SIZE='two' is not an integer >= 1"),
    (dd.TIMEOUT_ENV, "0", f"{dd.TIMEOUT_ENV}='0' is not a number of seconds > 0"),
])
def test_bad_environment_is_one_line(monkeypatch, name, value, match):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=match):
        with dd.session("cpu"):
            pass


def test_no_torchrun_environment_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with dd.session("cpu") as info:
        assert info is None and dd.current() is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    with dd.session("cpu") as info:
        assert info is None


def test_loader_stop_at(tmp_path):
    from streamdata.loader import WindowLoader
    from evaluator.data import EvalData

    ed = EvalData.from_tokens(np.arange(200) % 50)
    with WindowLoader(ed.store, chunk_size=8, device="cpu", start_at=3, stop_at=9) as wl:
        assert (wl.plan.first, len(wl.plan)) == (3, 6)
        assert sum(b.num_windows for b in wl) == 6
    for kw, match in [(dict(start_at=5, stop_at=4), "stop_at=4 must be an integer >= 5"),
                      (dict(stop_at=10 ** 6), "stop_at=1000000 is past the plan's")]:
        with pytest.raises(StreamConfigError, match=match):
            WindowLoader(ed.store, chunk_size=8, device="cpu", **kw)


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_cli_under_torchrun_rank0_writes_the_report(tmp_path, make_store):
    """``torchrun -m evaluator run``: one table, one report (rank 0), equal to the API in one process."""
    import torch

    from evaluator import StreamingEvaluator

    from .helpers import V, tiny_gpt2

    rng = np.random.default_rng(5)
    docs = [rng.integers(1, V, size=int(n)).tolist() for n in rng.integers(1, 60, size=9)]
    store = make_store(docs, vocab_size=V, shard_tokens=100)
    model_dir = tmp_path / "tiny-gpt2"
    tiny_gpt2(n_positions=64).save_pretrained(model_dir)
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "evaluator", "run",
           str(store), "--model", str(model_dir), "--chunk-size", "16", "--mode", "kv-cache", "--doc-mode", "document",
           "--batch-size", "1", "--device", "cpu", "--out", str(out), "--per-token", "--quiet", "--no-plots"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("report: ") == 1  # rank 0 only
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["backend"] == "gloo"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1): the same fp32 addition order
    try:
        ref = StreamingEvaluator(str(model_dir), chunk_size=16, mode="kv-cache", doc_mode="document", device="cpu",
                                 batch_size=1, verbose=False).evaluate_streaming_with_metrics(str(store), compute_per_token_metrics=True)
    finally:
        torch.set_num_threads(threads)
    assert res["total_tokens"] == ref["total_tokens"]
    assert abs(res["nll_sum"] - ref["nll_sum"]) <= 1e-9 * ref["nll_sum"]
    per_token = np.fromfile(out / "per_token_losses.f32", dtype=np.float32)
    np.testing.assert_array_equal(per_token, np.asarray(ref["per_token_losses"]))
    assert np.array_equal(np.load(out / "document_tokens.npy"), np.asarray(ref["per_document"]["tokens"]))


@pytest.mark.slow
def test_torchrun_ranks_share_rank_0s_folder_lock(tmp_path, make_store):
    """Rank 0 takes --out's lock for every rank: a folder in use refuses the whole torchrun run at
    once (no rank waits for the process group's timeout), with the one line of the lock. (Every rank
    raises it, but torchrun stops the others as soon as one fails, so they may not get to print.)"""
    from .helpers import V

    store = make_store([[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 4, vocab_size=V)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "evaluator", "run",
           str(store), "--model", "tests.evaluator.helpers:gru_lm", "--chunk-size", "4", "--doc-mode", "document",
           "--device", "cpu", "--out", str(out), "--quiet", "--no-plots"]
    with RunFolder.open(out):  # another run holds the folder
        t0 = time.monotonic()
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert time.monotonic() - t0 < TIMEOUT_S
    assert p.returncode != 0
    lines = [x for x in p.stderr.splitlines() if x.startswith("streameval: error:")]
    assert 1 <= len(lines) <= 2 and all("another process" in x and str(out) in x for x in lines), p.stderr[-2000:]
    assert not (out / "rank-0-of-2").exists()
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]  # free again: the same command runs
    assert json.loads((out / "results.json").read_text())["world_size"] == 2
