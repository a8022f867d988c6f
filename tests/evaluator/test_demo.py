"""``streameval demo``, the first command a newcomer runs (issue 25, item 2): it says at its start how
much it will evaluate and that the time left follows, it keeps to a CPU-sized run on a CPU, and its
report names the command of the full-size demo. The store is prebuilt in ``OUT/store`` (the demo
reuses it), so no test tokenizes the standard library."""

from __future__ import annotations

import json

import pytest

from evaluator.cli import DEMO_CPU_TOKENS, DEMO_FULL_TOKENS, demo_size, main
from evaluator.progress import duration
from streamdata import tokenize_dataset

from ..conftest import CORPUS
from ..streamdata.test_tokenize import write_jsonl

SMALL = ["--chunk-size", "64", "--overlap", "16", "--batch-size", "4", "--no-plots"]


@pytest.fixture
def demo_out(tmp_path):
    """A demo folder whose store is already built (a small corpus, the bundled tokenizer)."""
    out = tmp_path / "demo"
    tokenize_dataset(source=str(write_jsonl(tmp_path / "c.jsonl", CORPUS * 4)), tokenizer="default",
                     out=str(out / "store"), progress=False)
    return out


def test_the_size_is_the_cpu_one_on_a_cpu_and_the_full_one_elsewhere():
    assert DEMO_CPU_TOKENS < DEMO_FULL_TOKENS == 1_000_001  # 1,000,000 scored targets
    assert demo_size(full=False, max_tokens=None, on_cpu=True) == (DEMO_CPU_TOKENS, "the size on a CPU")
    assert demo_size(full=False, max_tokens=None, on_cpu=False) == (DEMO_FULL_TOKENS, "the full size")
    assert demo_size(full=True, max_tokens=None, on_cpu=True) == (DEMO_FULL_TOKENS, "the full size")
    assert demo_size(full=False, max_tokens=5000, on_cpu=True) == (5000, "--max-tokens 5000")


def test_full_and_max_tokens_together_is_one_line(capsys, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--full", "--max-tokens", "600", "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "streameval: error: --full and --max-tokens both set the demo's size: pass one of them"
    assert not out.exists()  # refused before the folder is touched


def test_on_a_cpu_it_says_its_size_first_and_names_the_full_size_command(demo_out, tmp_path, monkeypatch):
    """stdout and stderr into one file, as in ``streameval demo 2>&1 | tee log``: stdout is then
    block-buffered, so the demo's own lines must be flushed to come before the progress lines."""
    log = tmp_path / "log"
    with open(log, "a") as out, open(log, "a", buffering=1) as err:  # O_APPEND: writes land in order
        monkeypatch.setattr("sys.stdout", out)
        monkeypatch.setattr("sys.stderr", err)
        rc = main(["demo", "--out", str(demo_out), "--device", "cpu", *SMALL])
        monkeypatch.undo()
    assert rc == 0
    lines = log.read_text().splitlines()
    total = json.loads((demo_out / "store" / "manifest.json").read_text())["totals"]["tokens"]
    assert total < DEMO_CPU_TOKENS  # the whole small store is evaluated
    start = next(i for i, s in enumerate(lines) if s.startswith("[demo] evaluating"))
    assert lines[start] == (f"[demo] evaluating the bundled model on the first {total:,} of the store's {total:,} tokens "
                            f"(the size on a CPU; --full: {DEMO_FULL_TOKENS:,}); the progress lines show the time "
                            "left (ETA) once the first batches are measured")
    progress = [i for i, s in enumerate(lines) if s.startswith("[streameval] chunk")]
    assert progress and start < progress[0] and "ETA" in lines[progress[0]]
    res = json.loads((demo_out / "results.json").read_text())
    assert res["max_tokens"] == DEMO_CPU_TOKENS and res["total_tokens"] == total - 1
    done = [s for s in lines if s.startswith("[demo] scored")]
    rate = res["tokens_per_second"]
    assert done == [f"[demo] scored {total - 1:,} tokens in {res['total_time']:.1f} s ({rate:,.0f} tok/s), the size on "
                    f"a CPU; the full-size demo scores {DEMO_FULL_TOKENS - 1:,} (about "
                    f"{duration((DEMO_FULL_TOKENS - 1) / rate)} of evaluation at this rate): "
                    f"streameval demo --full --out {demo_out}-full"]
    assert lines.index(done[0]) > max(progress)  # the report's last words


def test_the_full_size_run_names_no_bigger_one(capsys, demo_out):
    assert main(["demo", "--out", str(demo_out), "--device", "cpu", "--full", "--quiet", *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "(the full size)" in printed and "--full --out" not in printed
    assert json.loads((demo_out / "results.json").read_text())["max_tokens"] == DEMO_FULL_TOKENS
