"""``streamdata tokenize --ids-column``: a column that already holds token ids (a pre-tokenized
``input_ids``) stored as it is, one document per row, without a tokenizer; checked against the
brute force (the rows themselves), through every source kind, batching and the evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamdata import ConfigError, SourceError, open_store, tokenize_dataset
from streamdata.cli import main


def _rows(seed: int = 0, n: int = 40, vocab: int = 1000) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, vocab, int(rng.integers(1, 60))).tolist() for _ in range(n)]
    rows[3] = []  # an empty row is an empty document
    return rows


def _jsonl(path: Path, rows, extra: bool = True) -> Path:
    path.write_text("".join(json.dumps({"input_ids": r, **({"text": "x"} if extra else {})}) + "\n" for r in rows))
    return path


def _check(out: Path, rows, vocab: int) -> None:
    flat = np.array([t for r in rows for t in r], dtype=np.int64)
    with open_store(out) as s:
        np.testing.assert_array_equal(s.read(0, len(s)), flat)
        np.testing.assert_array_equal(s.doc_offsets, np.concatenate([[0], np.cumsum([len(r) for r in rows])]))
        m = s.manifest
        assert s.dtype == np.dtype("<u2" if vocab <= 65536 else "<u4")
        assert m.tokenizer == {"name": None, "sha256": None, "vocab_size": vocab, "special_ids": {}, "ids_column": "input_ids"}
        assert m.source["ids_column"] == "input_ids" and "text_column" not in m.source
        assert m.special_tokens["eos"] is None and m.special_tokens["bos"] is None
        assert m.totals["bytes"] == 0 and m.totals["words"] == 0 and m.word_rule is None


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "saved", "jsonl-streaming"])
def test_ids_column_is_stored_as_it_is(tmp_path, kind):
    rows = _rows(1)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "d.parquet"
        pq.write_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32())), "n": list(range(len(rows)))}), src)
    elif kind == "saved":
        import datasets

        src = tmp_path / "saved"
        datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(src))
    else:
        src = _jsonl(tmp_path / "d.jsonl", rows)
    vocab = 1000 if kind != "parquet" else 100000  # a vocabulary beyond uint16: uint32 ids
    # tiny batches (80 bytes = 10 ids) and shards: rows are never split, batches and shards cut anywhere
    tokenize_dataset(str(src), tokenizer=None, ids_column="input_ids", vocab_size=vocab, out=str(tmp_path / "out"),
                     batch_bytes=80, shard_tokens=100, streaming=kind.endswith("streaming"))
    _check(tmp_path / "out", rows, vocab)


def test_limits_and_rerun(tmp_path):
    rows = _rows(2)
    src = _jsonl(tmp_path / "d.jsonl", rows)
    m = tokenize_dataset(str(src), tokenizer=None, ids_column="input_ids", vocab_size=1000, out=str(tmp_path / "a"),
                         max_docs=7, batch_bytes=40)
    assert m.num_documents == 7 and m.num_tokens == sum(len(r) for r in rows[:7])
    cum = np.cumsum([len(r) for r in rows])
    m = tokenize_dataset(str(src), tokenizer=None, ids_column="input_ids", vocab_size=1000, out=str(tmp_path / "b"),
                         max_tokens=int(cum[10]) - 1)
    assert m.num_documents == 11 and m.num_tokens == int(cum[10])  # stops after the row that reaches the limit
    again = tokenize_dataset(str(src), tokenizer=None, ids_column="input_ids", vocab_size=1000, out=str(tmp_path / "b"),
                             max_tokens=int(cum[10]) - 1)
    assert again == m  # the same settings: already complete


def test_cli_and_evaluator_say_bytes_and_words_are_unknown(tmp_path, capsys):
    from evaluator import StreamingEvaluator

    from ..evaluator.helpers import Bigram

    rows = _rows(3, vocab=97)
    src = _jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert main(["tokenize", str(src), "--ids-column", "input_ids", "--vocab-size", "97", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    _check(out, rows, 97)
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "words      not counted" in info and "tokenizer  None (vocab 97" in info
    r = StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False).evaluate_streaming_with_metrics(str(out))
    assert r["bits_per_byte"] is None and r["word_perplexity"] is None and np.isfinite(r["loss"])


def test_bad_ids_input_is_one_line(tmp_path, capsys):
    src = _jsonl(tmp_path / "d.jsonl", [[1, 2], [3, 4000], [5]])
    cases = [
        (dict(vocab_size=None), ConfigError, r"--ids-column 'input_ids' needs --vocab-size N"),
        (dict(tokenizer="default"), ConfigError, r"without a tokenizer, but --tokenizer 'default' was given too"),
        (dict(eos="</s>"), ConfigError, r"--eos '</s>' needs a tokenizer; with --ids-column the ids are stored as they are"),
        (dict(), SourceError, r"row 1: column 'input_ids' holds id 4000, outside the vocabulary \[0, 1000\)"),
        (dict(ids_column="text"), SourceError, r"column 'text' holds string, not lists of token ids"),
        (dict(ids_column="labels"), SourceError, r"ids column 'labels' not found \(columns: .*\): pass --ids-column NAME"),
    ]
    for k, (kw, exc, match) in enumerate(cases):
        args = dict(tokenizer=None, ids_column="input_ids", vocab_size=1000, out=str(tmp_path / f"o{k}")) | kw
        with pytest.raises(exc, match=match) as e:
            tokenize_dataset(str(src), **args)
        assert "\n" not in str(e.value)
    nulls = tmp_path / "n.jsonl"
    nulls.write_text('{"input_ids": [1]}\n{"input_ids": null}\n')
    with pytest.raises(SourceError, match=r"row 1: column 'input_ids' is null, not a list of ids"):
        tokenize_dataset(str(nulls), tokenizer=None, ids_column="input_ids", vocab_size=10, out=str(tmp_path / "n"))
    neg = _jsonl(tmp_path / "neg.jsonl", [[1], [2, -3]])
    with pytest.raises(SourceError, match=r"row 1: column 'input_ids' holds id -3"):
        tokenize_dataset(str(neg), tokenizer=None, ids_column="input_ids", vocab_size=10, out=str(tmp_path / "neg"))
    (tmp_path / "t.txt").write_text("hello\n")
    with pytest.raises(SourceError, match=r"plain-text files hold only text"):
        tokenize_dataset(str(tmp_path / "t.txt"), tokenizer=None, ids_column="input_ids", vocab_size=10, out=str(tmp_path / "t"))
    assert main(["tokenize", str(src), "--out", str(tmp_path / "x")]) == 2  # neither a tokenizer nor an ids column
    assert "no tokenizer: pass --tokenizer" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"vocab_size=5 applies only with --ids-column"):
        tokenize_dataset(str(src), tokenizer="default", vocab_size=5, out=str(tmp_path / "y"))
    assert not any((tmp_path / f"o{k}" / "manifest.json").exists() for k in range(len(cases)))


def test_parts_merge_into_the_whole(tmp_path):
    from streamdata import merge_parts

    rows = _rows(4)
    files = [_jsonl(tmp_path / f"d{i}.jsonl", rows[i * 10 : (i + 1) * 10]) for i in range(4)]
    common = dict(tokenizer=None, ids_column="input_ids", vocab_size=1000, num_parts=2)
    parts = [str(tmp_path / f"part{i}") for i in range(2)]
    for i, out in enumerate(parts):
        tokenize_dataset([str(f) for f in files], out=out, part=i, **common)
    merge_parts(parts, out=str(tmp_path / "merged"))
    _check(tmp_path / "merged", rows, 1000)
