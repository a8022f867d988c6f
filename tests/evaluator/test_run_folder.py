"""The run folder (evaluator/run_folder.py), attacked: damaged files, two runs at once, a folder of
someone else's files, bad output paths, a full disk. Every fault is injected as a user (or the
disk) would cause it, and must end in one line (exit 2) or in the uninterrupted run's numbers,
never in silently different results."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluator.compare as compare_mod
import evaluator.runners as runners_mod
from evaluator.cli import main

from .helpers import V, Interrupt, interrupt_after, tiny_gpt2

RNN = "tests.evaluator.helpers:gru_lm"


def _gpt2_dirs(tmp_path):
    a, b = tmp_path / "cand", tmp_path / "ref-model"
    tiny_gpt2(seed=0).save_pretrained(a)
    tiny_gpt2(seed=1).save_pretrained(b)
    return a, b


def _interrupt(monkeypatch, k):
    interrupt_after(monkeypatch, runners_mod.CarriedRunner, k)


@pytest.fixture
def store(make_store):
    rng = np.random.default_rng(11)
    return make_store([rng.integers(1, V, size=int(n)).tolist() for n in rng.integers(2, 60, size=8)], vocab_size=V)


def _argv(store, out, *extra):
    return ["run", str(store), "--model", RNN, "--device", "cpu", "--quiet", "--no-plots", "--chunk-size", "8",
            "--per-token", "--checkpoint-interval", "0.000001", "--out", str(out), *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _report(out: Path) -> dict:
    r = json.loads((out / "results.json").read_text())
    return {"nll_sum": r["nll_sum"], "tokens": r["total_tokens"], "chunks": (out / "chunks.csv").read_text().splitlines(),
            "documents": (out / "documents.csv").read_text(), "per_token": (out / "per_token_losses.f32").read_bytes()}


def _same_report(got: dict, want: dict) -> None:
    assert got["nll_sum"] == want["nll_sum"] and got["tokens"] == want["tokens"]
    assert got["documents"] == want["documents"] and got["per_token"] == want["per_token"]
    # chunks.csv: index, loss, perplexity exact (seconds differ between runs)
    assert [r.split(",")[:3] for r in got["chunks"]] == [r.split(",")[:3] for r in want["chunks"]]


@pytest.fixture
def reference(store, tmp_path, capsys):
    ref = tmp_path / "ref"
    assert main(_argv(store, ref)) == 0
    capsys.readouterr()
    return _report(ref)


def _interrupted(store, out, monkeypatch, k=6):
    with monkeypatch.context() as m:
        _interrupt(m, k)
        with pytest.raises(Interrupt):
            main(_argv(store, out))


def _checkpoint_state(path: Path) -> dict:
    data = path.read_bytes()
    return torch.load(io.BytesIO(data[data.find(b"PK\x03\x04"):]), map_location="cpu", weights_only=True)


def _flip(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))


# ---- 1. a damaged checkpoint ------------------------------------------------------------------------
def test_one_bit_flipped_in_the_checkpoints_nll_sum_is_refused(store, tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "out"
    _interrupted(store, out, monkeypatch)
    ck = out / "checkpoint.pt"
    nll = float(_checkpoint_state(ck)["sums"]["nll"])
    data = ck.read_bytes()
    at = data.find(struct.pack("<d", nll))
    assert at > 0 and data.count(struct.pack("<d", nll)) == 1
    _flip(ck, at)  # the lowest mantissa bit of the float64 NLL sum: a valid-looking number
    assert main(_argv(store, out)) == 2
    err = _error(capsys)
    assert str(ck) in err and "--overwrite" in err
    assert not (out / "results.json").exists()
    assert main(_argv(store, out, "--overwrite")) == 0  # the way to start over
    _same_report(_report(out), reference)


# ---- the damage sweep -------------------------------------------------------------------------------
def test_every_damage_to_a_file_the_resume_reads_is_refused_in_one_line(store, tmp_path, reference, monkeypatch,
                                                                        capsys):
    """After an interrupted run: each file a resume reads, one at a time, gets a byte flipped (at the
    start, the middle and the end of the bytes the checkpoint relies on), is truncated, or is
    deleted; the rerun must refuse every one in one line naming the file, change nothing, and the
    undamaged folder must still resume to the uninterrupted results."""
    out = tmp_path / "out"
    _interrupted(store, out, monkeypatch)
    files = _checkpoint_state(out / "checkpoint.pt")["files"]
    relied = {Path(r["path"]).name: (r["start"], r["end"]) for r in [*files["spill"].values(), files["per_token"]]}
    assert len(relied) == 6  # five spilled columns and the per-token file
    ck = (out / "checkpoint.pt").stat().st_size
    relied["checkpoint.pt"] = (0, ck)
    relied["streameval-run.json"] = (0, (out / "streameval-run.json").stat().st_size)
    assert sorted(relied) == sorted(p.name for p in out.iterdir() if p.name != "progress.json")
    original = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = 0
    for name, (lo, hi) in sorted(relied.items()):
        path = out / name
        damages = [("flip", p) for p in sorted({lo, (lo + hi) // 2, hi - 1})] + [("truncate", None), ("delete", None)]
        for kind, pos in damages:
            if kind == "flip":
                _flip(path, pos)
            elif kind == "truncate":
                os.truncate(path, len(original[name]) // 2)
            else:
                path.unlink()
            assert main(_argv(store, out)) == 2, (name, kind, pos)
            err = _error(capsys)
            assert "--overwrite" in err, (name, kind, err)
            if name != "streameval-run.json":  # (our marker gone: the folder is refused as not ours)
                assert name.split(".partial")[0] in err, (name, kind, err)
            # nothing was changed by the refusal (the damaged file is as we left it)
            assert {p.name for p in out.iterdir()} == set(original) - ({name} if kind == "delete" else set())
            for p in out.iterdir():
                if p.name != name:
                    assert p.read_bytes() == original[p.name], (name, kind, p.name)
            path.write_bytes(original[name])
            refused += 1
    assert refused == 8 * 5
    # progress.json is for people: never read by a resume, so its damage changes nothing
    (out / "progress.json").write_text("{")
    assert main(_argv(store, out)) == 0
    _same_report(_report(out), reference)


def test_bytes_written_after_the_checkpoint_never_reach_the_results(store, tmp_path, monkeypatch, capsys):
    """Past the checkpoint's prefix a spilled column holds what the crashed run wrote later, or
    damage; with --max-tokens the last documents are never written by any run, so damage there
    would reach documents.csv: the resume clears everything past the prefixes first."""
    short = ["--max-tokens", "150"]
    assert main([*_argv(store, tmp_path / "ref"), *short]) == 0
    want = _report(tmp_path / "ref")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt(m, 3)
        with pytest.raises(Interrupt):
            main([*_argv(store, out), *short])
    for p in out.glob("*.npy.partial"):
        mm = np.load(p, mmap_mode="r+")
        mm[len(mm) // 2 :] = 7  # (past every prefix after 3 of ~20 batches)
        mm.flush()
        del mm
    assert main([*_argv(store, out), *short]) == 0
    _same_report(_report(out), want)


# ---- 10. missing / truncated / damaged header ------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "truncated", "header"])
def test_a_damaged_spilled_array_or_per_token_file_is_one_line(store, tmp_path, monkeypatch, capsys, damage):
    for name in ("window_nll.npy.partial", "document_tokens.npy.partial", "per_token_losses.f32.partial"):
        out = tmp_path / f"{damage}-{name}"
        _interrupted(store, out, monkeypatch)
        path = out / name
        if damage == "missing":
            path.unlink()
        elif damage == "truncated":
            os.truncate(path, path.stat().st_size - 5)
        else:
            with open(path, "r+b") as f:
                f.write(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': True, 'shape': (3,)}")
        assert main(_argv(store, out)) == 2
        err = _error(capsys)
        assert str(path) in err and "--overwrite" in err


# ---- 2. two runs on one folder --------------------------------------------------------------------
def test_a_second_run_on_a_folder_in_use_fails_at_once(store, tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "out"
    inside, go = threading.Event(), threading.Event()
    real = runners_mod.CarriedRunner.step
    first: list = []

    def step(self, batch):
        if threading.current_thread() is holder:
            inside.set()
            assert go.wait(30)
        return real(self, batch)

    monkeypatch.setattr(runners_mod.CarriedRunner, "step", step)
    holder = threading.Thread(target=lambda: first.append(main(_argv(store, out))))
    holder.start()
    try:
        assert inside.wait(30)
        assert main(_argv(store, out)) == 2  # while the first run is inside its loop
        err = _error(capsys)
        assert str(out) in err and "another process" in err
        a, b = _gpt2_dirs(tmp_path)
        rc = main(["compare", str(store), "--model", str(a), "--reference", str(b), "--device", "cpu", "--quiet",
                   "--chunk-size", "8", "--out", str(out)])
        assert rc == 2 and "another process" in _error(capsys)
    finally:
        go.set()
        holder.join(60)
    assert first == [0]
    _same_report(_report(out), reference)  # the report of the one run, not a mixture
    assert not (out / ".streameval-lock").exists()  # released (and removed) at the end


def test_the_api_locks_its_checkpoint_folder_too(store, tmp_path):
    from evaluator import StreamingEvaluator
    from evaluator.errors import ConfigError
    from evaluator.run_folder import RunFolder

    from .helpers import Bigram

    ck = tmp_path / "ck"
    with RunFolder.open(ck):
        with pytest.raises(ConfigError, match="another process"):
            StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False).evaluate_streaming(
                store, checkpoint_dir=ck)
    res = StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False).evaluate_streaming(
        store, checkpoint_dir=ck)  # released: runs
    assert res["total_tokens"] > 0


# ---- 5. a folder streameval did not create ------------------------------------------------------
def test_a_folder_of_someone_elses_files_is_refused_with_or_without_overwrite(store, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    mine = {"chunks.csv": b"my chunks", "documents.csv": b"my documents", "loss_by_position.png": b"my plot",
            "checkpoint.pt": b"my checkpoint", "notes.txt": b"notes"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    for extra in ([], ["--overwrite"]):
        assert main(_argv(store, out, *extra)) == 2
        err = _error(capsys)
        assert str(out) in err and "not a run folder of streameval" in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == mine  # nothing created, changed or removed
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_argv(store, empty)) == 0  # an empty (or missing) folder becomes ours
    assert (empty / "streameval-run.json").is_file() and (empty / "results.json").is_file()
    capsys.readouterr()
    (empty / "notes.txt").write_text("mine")
    assert main(_argv(store, empty, "--overwrite")) == 0  # only our names are removed and rewritten
    assert (empty / "notes.txt").read_text() == "mine"


# ---- 11. output paths checked before any compute ----------------------------------------------------
def test_output_paths_are_checked_before_any_compute(store, tmp_path, monkeypatch, capsys):
    loaded = []
    real = compare_mod.load_model
    monkeypatch.setattr(compare_mod, "load_model", lambda *a, **k: loaded.append(a) or real(*a, **k))
    a, b = _gpt2_dirs(tmp_path)
    folder = tmp_path / "kl-folder"
    folder.mkdir()
    base = ["compare", str(store), "--model", str(a), "--reference", str(b), "--device", "cpu", "--quiet",
            "--chunk-size", "8"]
    for path, word in ((folder, "is a folder"), (tmp_path / "no" / "kl.f32", "does not exist")):
        assert main([*base, "--per-token-kl", str(path)]) == 2
        err = _error(capsys)
        assert str(path) in err and word in err
    assert loaded == [] and not Path(str(folder) + ".partial").exists()
    (tmp_path / "x.f32.partial").mkdir()  # the name written while incomplete
    assert main([*base, "--per-token-kl", str(tmp_path / "x.f32")]) == 2
    assert "is a folder" in _error(capsys) and loaded == []
    # the API: a per-token path that is a folder, before the data is read
    from evaluator import StreamingEvaluator
    from evaluator.errors import ConfigError

    from .helpers import Bigram

    with pytest.raises(ConfigError, match="is a folder"):
        StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False, per_token_path=str(folder)) \
            .evaluate_streaming_with_metrics(store, compute_per_token_metrics=True)


# ---- 13. a full disk ------------------------------------------------------------------------------
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_is_one_line_and_the_same_command_resumes(store, tmp_path, reference, monkeypatch, capsys, code):
    out = tmp_path / "out"
    real, calls = os.pwrite, [0]

    def pwrite(fd, data, pos):
        calls[0] += 1
        if calls[0] > 12:  # after a few checkpoints' worth of writes
            raise OSError(code, os.strerror(code))
        return real(fd, data, pos)

    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", pwrite)
        assert main(_argv(store, out)) == 2
    err = _error(capsys)
    assert str(out) in err and "free space" in err and "rerun the same command" in err
    assert json.loads((out / "progress.json").read_text())["windows_done"] > 0  # it had checkpointed
    assert not list(out.glob(".checkpoint.pt.tmp-*"))
    assert main(_argv(store, out)) == 0  # space freed: the same command resumes
    assert json.loads((out / "results.json").read_text())["resumed_from_window"] > 0
    _same_report(_report(out), reference)


@pytest.mark.slow  # (two models, four comparisons: a few seconds on 2 cores)
def test_a_damaged_comparison_folder_is_refused_too(store, tmp_path, monkeypatch, capsys):
    a, b = _gpt2_dirs(tmp_path)
    argv = ["compare", str(store), "--model", str(a), "--reference", str(b), "--device", "cpu", "--quiet", "--no-plots",
            "--chunk-size", "8", "--mode", "kv-cache", "--checkpoint-interval", "0.000001"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    want = json.loads((tmp_path / "whole" / "results.json").read_text())
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt(m, 6)
        with pytest.raises(Interrupt):
            main([*argv, "--out", str(out)])
    files = _checkpoint_state(out / "checkpoint.pt")["files"]
    capsys.readouterr()
    for rec in (files["per_token"], files["spill"]["window_kl"], files["spill"]["document_agree"]):
        path = Path(rec["path"])
        original = path.read_bytes()
        _flip(path, (rec["start"] + rec["end"]) // 2)
        assert main([*argv, "--out", str(out)]) == 2
        err = _error(capsys)
        assert str(path) in err and "--overwrite" in err
        path.write_bytes(original)
    assert main([*argv, "--out", str(out)]) == 0
    got = json.loads((out / "results.json").read_text())
    for k in ("nll_sum", "nll_sum_reference", "kl_sum", "kl_p99", "top1_agreement"):
        assert got[k] == want[k], k
    assert (out / "per_token_kl.f32").read_bytes() == (tmp_path / "whole" / "per_token_kl.f32").read_bytes()
