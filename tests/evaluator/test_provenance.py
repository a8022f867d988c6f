"""What the report's rows were measured on: documents.csv carries each document's recorded source,
chunks.csv the first and last document of each chunk's scored targets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from evaluator.cli import main
from streamdata import open_store, tokenize_dataset
from streamdata.windows import WindowSpec, plan_windows

from .helpers import V

A = [[5, 6, 7, 8, 9, 10, 11], [12], [], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [24, 25]]
B = [[30, 31, 32], [33, 34, 35, 36, 37, 38, 39, 40, 41], [42]]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("prov")
    for name, rows in (("a.jsonl", A), ("b.jsonl", B)):
        (d / name).write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    tokenize_dataset(source=[str(d / "a.jsonl"), str(d / "b.jsonl")], tokenizer=None, ids_column="input_ids",
                     vocab_size=V, out=str(d / "s"), shard_tokens=16)
    return d / "s"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _brute_force_ranges(offsets: np.ndarray, spec: WindowSpec) -> list[tuple[int, int]]:
    """(first, last) document of each window's scored targets, one target at a time."""
    plan = plan_windows(offsets, spec)
    b = plan.block(0, len(plan))
    out = []
    for w in range(len(plan)):
        docs = []
        for j in range(int(b.score_from[w]), int(b.length[w])):
            t = int(b.start[w]) + 1 + j  # the store token that target j predicts
            docs.append(next(d for d in range(len(offsets) - 1) if offsets[d] <= t < offsets[d + 1]))
        out.append((min(docs), max(docs)))
    return out


@pytest.mark.parametrize("extra", [[], ["--doc-mode", "document"], ["--doc-mode", "document", "--bos", "1"],
                                   ["--mode", "sliding", "--overlap", "3"]])
def test_documents_and_chunks_name_what_they_measure(tmp_path, store, capsys, extra):
    out = tmp_path / "r"
    assert main(["run", str(store), "--model", "tests.evaluator.helpers:gru_lm", "--device", "cpu", "--quiet",
                 "--no-plots", "--chunk-size", "6", "--out", str(out), *extra]) == 0
    capsys.readouterr()
    docs = _rows(out / "documents.csv")
    files = {"a.jsonl": str((store.parent / "a.jsonl").resolve()), "b.jsonl": str((store.parent / "b.jsonl").resolve())}
    want = [(files[n], str(r)) for n, rows in (("a.jsonl", A), ("b.jsonl", B)) for r in range(len(rows))]
    assert [(d["source_file"], d["source_row"]) for d in docs] == want
    res = json.loads((out / "results.json").read_text())
    spec = WindowSpec(res["chunk_size"], res["overlap"], res["doc_mode"], res["tail"], prepend_bos_id=res["bos_id"],
                      max_tokens=res["max_tokens"])
    with open_store(store) as s:
        offsets = np.asarray(s.doc_offsets)
    chunks = _rows(out / "chunks.csv")
    assert len(chunks) == res["num_chunks"]
    assert [(int(c["first_document"]), int(c["last_document"])) for c in chunks] == _brute_force_ranges(offsets, spec)


def test_stores_without_sources_leave_the_columns_empty(tmp_path, make_store, capsys):
    s = make_store([[1, 2, 3, 4], [5, 6, 7]], vocab_size=V)
    out = tmp_path / "r"
    assert main(["run", str(s), "--model", "tests.evaluator.helpers:gru_lm", "--device", "cpu", "--quiet",
                 "--no-plots", "--chunk-size", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert [(d["source_file"], d["source_row"]) for d in _rows(out / "documents.csv")] == [("", ""), ("", "")]
