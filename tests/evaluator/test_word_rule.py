"""Word perplexity is reported with the rule that counted its words (results, results.json, the
printed table): lm-eval's for stores tokenized now, str-split for stores written before the rule was
recorded, 'unrecorded' for counts given with in-memory ids, none when no words are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluator import StreamingEvaluator
from evaluator.cli import main
from evaluator.data import EvalData
from evaluator.report import format_table
from streamdata import tokenize_dataset

from ..conftest import CORPUS, write_token_store
from ..streamdata.test_tokenize import write_jsonl
from .helpers import V, Bigram


def _run(data):
    return StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False).evaluate_streaming_with_metrics(data)


def test_store_of_the_older_rule_is_labelled_str_split(tmp_path, capsys):
    docs = [list(range(1, 20)), list(range(5, 40))]
    store = write_token_store(tmp_path / "old", docs, vocab_size=V, nwords=[3, 7])  # written without word_rule
    r = _run(str(store))
    assert r["word_rule"] == "str-split" and r["total_words"] == 10
    assert r["word_perplexity"] == pytest.approx(math.exp(r["nll_sum"] / 10))
    table = format_table(r)
    assert "word perplexity (str-split words)" in table
    # the CLI: the printed table and results.json carry the rule too
    out = tmp_path / "report"
    assert main(["run", str(store), "--model", "tests.evaluator.helpers:Bigram", "--chunk-size", "16", "--device", "cpu",
                 "--out", str(out), "--no-plots", "--quiet"]) == 0
    assert "word perplexity (str-split words)" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["word_rule"] == "str-split" and res["word_perplexity"] == pytest.approx(r["word_perplexity"])


def test_store_tokenized_now_is_labelled_lm_eval(tmp_path, bpe_tokenizer):
    tokenize_dataset(source=str(write_jsonl(tmp_path / "c.jsonl", CORPUS)), tokenizer=str(bpe_tokenizer),
                     out=str(tmp_path / "s"))
    r = StreamingEvaluator(Bigram(vocab=400), chunk_size=16, device="cpu", verbose=False,
                           check_tokenizer=False).evaluate_streaming_with_metrics(str(tmp_path / "s"))
    assert r["word_rule"] == "lm-eval" and "word perplexity (lm-eval words)" in format_table(r)


def test_in_memory_counts_and_no_counts():
    ids = np.arange(1, 41) % V
    given = _run(EvalData.from_tokens(ids, [0, 20, 40], doc_bytes=[50, 60], doc_words=[4, 5]))
    assert given["word_rule"] == "unrecorded" and "word perplexity (unrecorded words)" in format_table(given)
    none = _run(ids)
    assert none["word_rule"] is None and none["word_perplexity"] is None
    assert "word perplexity " in format_table(none) and "words)" not in format_table(none)


def test_demo_reuses_a_store_an_older_version_built(tmp_path, capsys):
    """An earlier demo's store (no word_rule, no ids digest) is reused, not refused; the tokenizer is
    matched by its whole-file digest and word perplexity says which rule counted its words."""
    out = tmp_path / "demo"
    tokenize_dataset(source=str(write_jsonl(tmp_path / "c.jsonl", CORPUS * 4)), tokenizer="default", out=str(out / "store"))
    p = out / "store" / "manifest.json"
    d = json.loads(p.read_text())
    del d["word_rule"]
    d["tokenizer"].pop("ids_sha256")
    d["tokenizer"].pop("ids_parts")
    p.write_text(json.dumps(d))
    assert main(["demo", "--out", str(out), "--max-tokens", "600", "--chunk-size", "64", "--overlap", "16",
                 "--device", "cpu", "--no-plots", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "reused when already built" in printed and "word perplexity (str-split words)" in printed
