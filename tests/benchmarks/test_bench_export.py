"""Toy-size smoke test of benchmarks/bench_export.py: the 'ours' row runs end to end (tokenize, then
export to LitData) and the LitData row runs only where litdata imports (else it says so)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks import bench_export
from tests.conftest import CORPUS


@pytest.mark.slow  # ~6 s: datasets, a tokenize and an export (litdata, where installed, adds its workers)
def test_bench_export_toy(tmp_path, bpe_tokenizer, capsys):
    from tokenizers import Tokenizer

    files = []
    for i, text in enumerate(CORPUS[:4]):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    assert bench_export.main(["--source", *map(str, files), "--tokenizer", str(bpe_tokenizer), "--repeat", "1",
                              "--num-workers", "1", "--out", str(tmp_path / "res")]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "res" / "export.json").read_text())["result"]
    tok = Tokenizer.from_file(str(bpe_tokenizer))
    want = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in CORPUS[:4])  # one document per file + EOS
    assert res["documents"] == 4 and res["tokens"] == want and res["seconds_ours"] > 0
    assert "streamdata tokenize + export --to litdata" in out
    if importlib.util.find_spec("litdata") is None:
        assert "litdata not installed" in out and res["seconds_litdata"] is None
    else:
        assert res["seconds_litdata"] > 0 and res["speedup"] > 0
