"""What people read while and after a run: progress lines in a pipe carry the share done and an ETA
and end with the run's totals; the terminal bar ends on the report's loss; Ctrl-C says how to
resume; no library progress bar is drawn into a pipe or a log file; the report's table keeps the
digits of small figures, and its position plot says whether it is a long-context curve and how many
tokens each point averages."""

from __future__ import annotations

import io
import re

import pytest

from evaluator import StreamingEvaluator
from evaluator.cli import main
from evaluator.progress import Progress

from .helpers import V, tiny_gpt2
from .test_cli import hf_model_dir, store  # noqa: F401 - the same fixtures (pytest finds them by name)


def test_lines_in_a_pipe_carry_percent_and_eta_and_end_with_the_totals(make_store, capsys):
    path = make_store([list(range(1, 90)), list(range(2, 60))], vocab_size=V)
    ev = StreamingEvaluator(tiny_gpt2(), chunk_size=8, mode="sliding", device="cpu", verbose=True, log_interval=5,
                            batch_size=2)
    res = ev.evaluate_streaming(path)
    lines = [x for x in capsys.readouterr().err.splitlines() if " chunk " in x]
    assert len(lines) >= 3
    assert all(re.search(r"\(\d+\.\d%\)", x) for x in lines)
    assert all("ETA " in x for x in lines[:-1])
    last = lines[-1]
    assert "(100.0%)" in last and last.endswith("done") and f"loss {res['loss']:.4f}" in last


def test_the_bar_ends_on_the_final_loss_not_the_last_log_points():
    out = io.StringIO()
    p = Progress(total_windows=10, total_tokens=100, done_windows=0, done_tokens=0, log_interval=5, verbose=True,
                 stream=out, bar=True)
    p.update(5, 50, lambda: (263.3, 50))  # a log point: loss 5.2660
    p.update(5, 50, lambda: (999.0, 1))  # not a log point: the bar keeps 5.2660 ...
    p.finish(525.35, 100)  # ... until the run's totals arrive: 5.2535
    p.close()
    shown = re.findall(r"loss (\d\.\d{4})", out.getvalue())
    assert shown and shown[-1] == "5.2535"  # what the report says, not the last log point's 5.2660


@pytest.mark.parametrize("with_out", [True, False])
def test_ctrl_c_prints_how_to_resume(store, hf_model_dir, tmp_path, monkeypatch, capsys, with_out):
    import evaluator.cli as cli

    def interrupted(a):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_run", interrupted)
    argv = ["run", str(store), "--model", str(hf_model_dir)] + (["--out", str(tmp_path / "o")] if with_out else [])
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    if with_out:
        assert err == f"streameval: interrupted: rerun the same command to resume from the last checkpoint in {tmp_path / 'o'}"
    else:
        assert "nothing to resume: pass --out DIR" in err


def test_no_library_progress_bar_is_drawn_into_a_pipe(store, hf_model_dir, capsys):
    from transformers.utils import logging as hf_logging

    try:
        assert main(["run", str(store), "--model", str(hf_model_dir), "--device", "cpu", "--chunk-size", "32"]) == 0
        err = capsys.readouterr().err
        assert "Loading weights" not in err and "it/s]" not in err
    finally:
        hf_logging.enable_progress_bar()  # global state: leave it as other tests expect


def test_small_figures_keep_their_digits_in_the_table():
    from evaluator.report import _fmt

    assert _fmt(3.2e-05) == "3.2e-05" and _fmt(0.0) == "0.0000" and _fmt(4.5678) == "4.5678"


@pytest.mark.parametrize("mode, long_context", [("sliding", False), ("kv-cache", True)])
def test_the_position_plot_says_what_its_curve_is_and_counts_its_buckets(make_store, hf_model_dir, tmp_path, monkeypatch,
                                                                         mode, long_context):
    pytest.importorskip("matplotlib")
    import evaluator.report as report

    seen = {}
    real = report._save_png

    def capture(fig, path):
        ax = fig.axes[0]
        seen[path.name] = (ax.get_title(), [t.get_text() for t in ax.texts])
        return real(fig, path)

    monkeypatch.setattr(report, "_save_png", capture)
    store = make_store([list(range(1, 1 + n)) for n in (40, 7, 33, 20)], vocab_size=V)  # each fits 64 positions
    assert main(["run", str(store), "--model", str(hf_model_dir), "--device", "cpu", "--quiet", "--mode", mode,
                 "--doc-mode", "document", "--chunk-size", "32", "--out", str(tmp_path / "o")]) == 0
    title, labels = seen["loss_by_position.png"]
    assert ("long-context curve" in title and "not a" not in title) == long_context
    if not long_context:
        assert "capped at 32 tokens" in title
    tokens = [int(r.split(",")[2]) for r in (tmp_path / "o" / "positions.csv").read_text().splitlines()[1:]]
    assert labels == [f"{n:,}" for n in tokens]  # each point says how many tokens it averages
