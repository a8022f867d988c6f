"""``streameval`` as a first-time user meets it: errors in the caller's terms (flags on the CLI,
keyword arguments in Python), CPU-only and out-of-memory advice, a mistyped flag's closest match, a
missing model folder named as such, a one-chunk run's plot."""

from __future__ import annotations

import warnings

import pytest

from evaluator import StreamingEvaluator
from evaluator.cli import main
from evaluator.errors import ConfigError, ModelError

from .test_cli import hf_model_dir, store  # noqa: F401 - the same fixtures (pytest finds them by name)


def _one_error_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv + ["--quiet"]) == 2, argv
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("streameval: error: "), err
    return err[0]


def test_cli_errors_name_flags_and_api_errors_name_arguments(capsys, store, hf_model_dir):
    base = ["run", str(store), "--model", str(hf_model_dir)]
    # cuda:99 is missing with or without a GPU
    err = _one_error_line(capsys, base + ["--device", "cuda:99"])
    assert "--device cuda:99 is not available" in err and "device=" not in err
    err = _one_error_line(capsys, base + ["--device", "cpu", "--chunk-size", "128", "--mode", "sliding"])
    assert "--chunk-size 128 exceeds" in err and "pass --chunk-size 64 or less, or omit --chunk-size" in err
    assert "chunk_size" not in err
    err = _one_error_line(capsys, base + ["--device", "cpu", "--chunk-size", "16", "--overlap", "16"])
    assert "--overlap 16 must be smaller than --chunk-size 16" in err and "pass e.g. --overlap 8" in err
    err = _one_error_line(capsys, ["run", str(store), "--model", "tests.evaluator.helpers:gru_lm", "--device", "cpu"])
    assert "declares no context length: pass --chunk-size N" in err

    # the same rules from Python speak Python
    with pytest.raises(ConfigError, match=r"chunk_size=128 exceeds .* pass chunk_size=64 or less, or leave chunk_size unset"):
        StreamingEvaluator(str(hf_model_dir), chunk_size=128, mode="sliding", device="cpu", verbose=False) \
            .evaluate_streaming(str(store))
    with pytest.raises(ConfigError, match=r"device='cuda:99' is not available.*") as e:
        StreamingEvaluator(str(hf_model_dir), device="cuda:99", verbose=False)
    assert "--" not in str(e.value)


def test_cpu_only_device_advice(capsys, store, hf_model_dir, monkeypatch):
    """Without a GPU, --device cuda says to pass --device cpu (it said "pass device='cpu'")."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _one_error_line(capsys, ["run", str(store), "--model", str(hf_model_dir), "--device", "cuda"])
    assert "--device cuda is not available" in err and "pass --device cpu or omit --device" in err
    with pytest.raises(ConfigError, match=r"pass device='cpu' or leave device unset"):
        StreamingEvaluator(str(hf_model_dir), device="cuda", verbose=False)


@pytest.mark.parametrize("spec", ["./nope", "../nope/deeper", "~/streamdata-no-such-model"])
def test_missing_model_folder_says_folder_not_found(capsys, store, tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    err = _one_error_line(capsys, ["run", str(store), "--model", spec, "--device", "cpu"])
    assert f"model {spec!r}: folder not found" in err and "repo id" not in err.lower()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ModelError, match="is a file, not a model folder"):
        StreamingEvaluator("./afile", device="cpu", verbose=False)


def test_one_chunk_run_plots_a_point_without_warnings(tmp_path, store, hf_model_dir, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figures.append(self), save(self, *a, **k))[1])
    out = tmp_path / "report"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a divide-by-zero or singular-limits warning fails the test
        rc = main(["run", str(store), "--model", str(hf_model_dir), "--chunk-size", "64", "--device", "cpu",
                   "--doc-mode", "stream", "--mode", "sliding", "--max-tokens", "50", "--out", str(out), "--quiet"])
    assert rc == 0
    assert (out / "perplexity_per_chunk.png").stat().st_size > 0
    ax = figures[0].axes[0]
    line = ax.get_lines()[0]
    assert len(line.get_xdata()) == 1  # one chunk
    assert line.get_marker() not in (None, "None", "", " ")  # ... drawn as a visible point
    lo, hi = ax.get_ylim()
    y = float(line.get_ydata()[0])
    assert lo < y < hi


def oom_model():
    """``tests.evaluator.test_cli_messages:oom_model``: every forward runs out of memory."""
    from .helpers import Bigram, OOMAbove

    return OOMAbove(Bigram(), max_rows=0)


def test_out_of_memory_advice_names_the_flag(capsys, store):
    err = _one_error_line(capsys, ["run", str(store), "--model", "tests.evaluator.test_cli_messages:oom_model",
                                   "--device", "cpu", "--chunk-size", "16", "--mode", "sliding"])
    assert "single window of --chunk-size 16: pass --chunk-size 8 or less" in err and "chunk_size" not in err


def test_a_mistyped_flag_names_the_closest_valid_one(capsys, store):
    with pytest.raises(SystemExit):
        main(["run", str(store), "--model", "default", "--chunksize", "64"])
    assert "--chunksize: did you mean --chunk-size?" in capsys.readouterr().err


def test_no_python_names_in_a_cli_message(capsys, store):
    """'--max-tokens 1 must be an int >= 2 ... or None': None is no value a command line can pass."""
    err = _one_error_line(capsys, ["run", str(store), "--model", "default", "--max-tokens", "1"])
    assert "--max-tokens 1 must be an integer >= 2" in err and "omit --max-tokens" in err
    assert "None" not in err and "max_tokens" not in err
