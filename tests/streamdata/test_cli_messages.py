"""``streamdata`` as a first-time user meets it: no tracebacks (closed pipe, URL outputs), the
format's dtype rule on convert, errors in flag terms (a mistyped flag's closest match, a missing
tokenizer path at once, long errors cut at a word), --quiet silencing every bar."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from streamdata import open_store
from streamdata.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_convert_uint32_bin_whose_vocab_fits_is_written_as_uint16(tmp_path, capsys, fmt):
    ids = np.array([5, 50256, 0, 7, 50256, 8, 9, 10], dtype="<u4")
    ids.tofile(tmp_path / "train.bin")
    out = tmp_path / f"conv-{fmt}"
    assert main(["convert", str(tmp_path / "train.bin"), str(out), "--format", fmt, "--dtype", "uint32",
                 "--eos-id", "50256", "--vocab-size", "50257"]) == 0
    with open_store(out) as s:
        assert s.manifest.dtype == "uint16" and s.dtype == np.dtype("<u2")
        assert s.read(0, len(s)).tolist() == ids.tolist()
        assert s.doc_offsets.tolist() == [0, 2, 5, 8]
        assert s.manifest.extra["converted_from"]["dtype"] == "uint32"  # what the source was
    assert main(["verify", str(out)]) == 0
    # without a vocabulary nothing says the ids fit: the file's dtype is kept
    assert main(["convert", str(tmp_path / "train.bin"), str(tmp_path / "wide"), "--dtype", "uint32"]) == 0
    with open_store(tmp_path / "wide") as s:
        assert s.manifest.dtype == "uint32"


def test_info_json_into_a_closed_pipe_is_no_traceback(tmp_path):
    ids = np.arange(100, dtype="<u2")
    ids.tofile(tmp_path / "t.bin")
    assert main(["convert", str(tmp_path / "t.bin"), str(tmp_path / "s")]) == 0
    # `streamdata info --json s | head -0`: the reader is gone before the first write
    p = subprocess.Popen([sys.executable, "-m", "streamdata", "info", "--json", str(tmp_path / "s")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert err == ""  # no traceback, no "Exception ignored" at exit


def test_convert_to_file_url(tmp_path, capsys):
    ids = np.arange(1, 60, dtype="<u2")
    ids.tofile(tmp_path / "t.bin")
    dst = tmp_path / "missing-parent" / "x.zarr"
    assert main(["convert", str(tmp_path / "t.bin"), dst.as_uri(), "--format", "zarr"]) == 0
    with open_store(dst.as_uri()) as s:
        assert s.read(0, len(s)).tolist() == ids.tolist()
    # an output that cannot be created: one line, exit 2, nothing left behind
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "t.bin"), (blocker / "x.zarr").as_uri(), "--format", "zarr"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("streamdata: error: ") and "x.zarr" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["a-file", "missing-parent", "t.bin"]


def test_errors_name_flags(tmp_path, capsys):
    """The library says ``compression='zstd'``; the CLI says the flag."""
    capsys.readouterr()
    assert main(["tokenize", "stdlib:eval", "--tokenizer", "default", "--out", str(tmp_path / "o"),
                 "--compression", "zstd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamdata: error: --compression zstd needs --format zarr") and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_in_cli_terms_rewrites_only_known_argument_names():
    from streamdata.errors import in_cli_terms

    flags = {"mode": "--mode", "doc_mode": "--doc-mode", "overlap": "--overlap", "device": "--device"}
    assert in_cli_terms("overlap=3 does not apply to mode='stateful': pass overlap=0, or mode='sliding'.", flags) == \
        "--overlap 3 does not apply to --mode stateful: pass --overlap 0, or --mode sliding."
    assert in_cli_terms("doc_mode='x' (mode=auto)", flags) == "--doc-mode x (--mode auto)"
    assert in_cli_terms("pass device='cpu' or leave device unset", flags) == "pass --device cpu or omit --device"
    # names the CLI has no flag for stay as they are
    assert in_cli_terms("loss_slice=0 must be >= 1; leave loss_slice unset", flags) == "loss_slice=0 must be >= 1; leave loss_slice unset"


def test_a_mistyped_flag_names_the_closest_valid_one(capsys):
    from streamdata.cli import main

    with pytest.raises(SystemExit):
        main(["tokenize", "docs.jsonl", "--tokenizer", "t.json", "--out", "o", "--max-dcos", "3"])
    err = capsys.readouterr().err
    assert "--max-dcos: did you mean --max-docs?" in err


def test_a_tokenizer_written_as_a_path_that_does_not_exist_fails_at_once(tmp_path, capsys, monkeypatch):
    """'tokenizer.jsn' used to go to the hub (~25 s of retries offline) and end in a message cut
    mid-word; now: one line at once, with the closest name in its folder."""
    from streamdata.cli import main

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    import huggingface_hub

    def no_hub(*a, **k):
        raise AssertionError("a path-like name must never reach the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    assert main(["tokenize", "d.jsonl", "--tokenizer", "tokenizer.jsn", "--out", "s"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "tokenizer 'tokenizer.jsn': no such file or folder (did you mean 'tokenizer.json'?)" in err
    assert not (tmp_path / "s").exists()


def test_long_error_text_is_cut_at_a_word_boundary():
    from streamdata.errors import brief

    e = RuntimeError("connection failed, please check your network and try again later " * 5)
    out = brief(e, 60)
    assert out.endswith(" ...") and len(out) <= 64 and out[:-4] == out[:-4].rstrip()
    assert out[:-4].split()[-1] in e.args[0].split()  # a whole word, never "aga"
    assert brief(ValueError("short")) == "short" and brief(KeyError()) == "KeyError"


def test_quiet_also_silences_the_datasets_bars(tmp_path, capsys):
    from datasets.utils.logging import enable_progress_bar

    from streamdata.cli import main

    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(5)))
    try:
        assert main(["tokenize", str(tmp_path / "d.jsonl"), "--tokenizer", "default", "--out", str(tmp_path / "s"),
                     "--quiet"]) == 0
        err = capsys.readouterr().err
        assert "Generating train split" not in err and "examples/s" not in err
    finally:
        enable_progress_bar()


def test_a_python_call_in_a_hint_stays_python_in_the_cli(tmp_path, capsys):
    """The raw-format hint read 'open_raw_bin(path, --dtype ...)': half a call, half a flag."""
    from streamdata.cli import main

    (tmp_path / "ids.xyz").write_bytes(b"\x00" * 16)
    assert main(["info", str(tmp_path / "ids.xyz")]) == 2
    err = capsys.readouterr().err
    assert "open_raw_bin(path, dtype=...)" in err and "--dtype ..." not in err
