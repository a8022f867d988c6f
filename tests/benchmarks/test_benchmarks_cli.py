"""The benchmarks as a first-time user runs them from the command line: a store smaller than the
windows asked for, --device cuda without a GPU as one line, a relative cache from another working
folder (small sizes; no timing asserted)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")


def test_bench_zarr_store_smaller_than_the_naive_windows(tmp_path, capsys):
    """--tokens 4194304 with the default 1000 naive windows of 8192 read past the end; here the
    same shape at toy size: 2.4 windows of 8192 in the store, 1000 asked for."""
    pytest.importorskip("zarr")
    from benchmarks import bench_zarr

    assert bench_zarr.main(["--tokens", "20000", "--window", "8192", "--repeat", "1", "--out", str(tmp_path)]) == 0
    assert "zarr none naive" in capsys.readouterr().out


def test_suite_device_cuda_without_gpu_is_one_line(monkeypatch, capsys):
    from benchmarks import suite

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert suite.main(["--device", "cuda", "--quick"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("python -m benchmarks: error: --device cuda is not available"), err
    assert "pass --device cpu" in err[0]


@pytest.mark.slow  # (out of the fast lane: pytest -m 'not slow')
def test_memory_step_with_a_relative_cache_from_another_cwd(tmp_path, monkeypatch):
    """The child process runs in the repository root: a relative store path must not reach it."""
    from benchmarks.suite import memory_scaling

    monkeypatch.chdir(tmp_path)
    res = memory_scaling((3000, 6000), torch.device("cpu"), Path("cache"), 256, 2, log=lambda s: None, threads=1)
    assert [r["scored"] for r in res["rows"]] == [2999, 5999]
    assert (tmp_path / "cache").is_dir() and Path(res["store"]).is_relative_to(tmp_path / "cache")


def test_benchmarks_draw_no_library_bars_into_a_pipe(monkeypatch):
    """A benchmark logged to a file or a pipe showed transformers' "Loading weights" bar (one line
    of noise per refresh): like the CLIs, a benchmark's main turns library bars off when stderr is
    not a terminal, and leaves them alone on a terminal."""
    import io

    from datasets.utils import logging as ds_logging
    from transformers.utils import logging as hf_logging

    from benchmarks._util import one_line_errors

    @one_line_errors("bench")
    def main(argv=None) -> int:
        return 0

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    try:
        hf_logging.enable_progress_bar()
        ds_logging.enable_progress_bar()
        monkeypatch.setattr("sys.stderr", Tty())
        assert main([]) == 0
        assert hf_logging.is_progress_bar_enabled() and ds_logging.is_progress_bar_enabled()
        monkeypatch.setattr("sys.stderr", io.StringIO())  # a pipe or a log file
        assert main([]) == 0
        assert not hf_logging.is_progress_bar_enabled() and not ds_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()
        ds_logging.enable_progress_bar()
