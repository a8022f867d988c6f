"""Word counts: lm-evaluation-harness's rule (``len(re.split(r"\\s+", text))``), counted in bounded
memory, recorded in the manifest as ``word_rule``; stores written before the rule was recorded
(``str.split()`` counts, no field) stay readable and are labelled with the rule they used."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import streamdata.output as output_mod
import streamdata.tokenize as tokenize_mod
from streamdata import StoreError, open_store, tokenize_dataset
from streamdata.cli import main
from streamdata.convert import convert_store
from streamdata.format import LEGACY_WORD_RULE, MANIFEST_NAME, WORD_RULE, read_manifest, word_rule_of
from streamdata.output import LEDGER_FILE
from streamdata.verify import verify_store

from ..conftest import CORPUS, write_token_store
from .test_tokenize import write_jsonl


def lm_eval_words(text: str) -> int:
    """lm-evaluation-harness 0.4.13, ``Task.count_words``, verbatim."""
    return len(re.split(r"\s+", text))


# every character str.isspace() knows (== what re's \s matches in a str), plus word characters
_WS = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000"
_TEXT = st.text(alphabet=st.sampled_from(list(_WS) + list("ab\u00e9\u65e5\U0001f642.")), max_size=60)


@pytest.mark.parametrize("text, words", [
    ("", 1), (" ", 2), ("\n\n", 2), ("a", 1), (" a", 2), ("a ", 2), (" a ", 3),
    ("a b", 2), ("a  \t\n b", 2), ("\u3000a\xa0b\x1c", 4),
])
def test_count_words_examples(text, words):
    assert tokenize_mod.count_words(text) == words == lm_eval_words(text)


@settings(max_examples=400, deadline=None)
@given(_TEXT)
def test_count_words_is_lm_evals_formula(text):
    assert tokenize_mod.count_words(text) == lm_eval_words(text)


@settings(max_examples=300, deadline=None)
@given(_TEXT, st.sampled_from([1, 2, 3, 5, 8]))
def test_count_words_in_slices_equals_the_direct_formula(text, slice_chars):
    """Long texts are counted slice by slice: words and whitespace runs cut by a slice boundary
    (tiny slices here, so most texts cross many) are each counted once."""
    assert tokenize_mod.count_words(text, slice_chars) == lm_eval_words(text)


@pytest.mark.parametrize("text", ["ab" * 7 + " " * 9 + "cd", " " * 20, "x" * 20, " a" * 10 + " "])
def test_runs_and_words_across_boundaries(text):
    for slice_chars in range(1, len(text) + 2):
        assert tokenize_mod.count_words(text, slice_chars) == lm_eval_words(text), slice_chars


def test_tokenize_counts_and_records_the_lm_eval_rule(tmp_path, bpe_tokenizer, capsys):
    texts = CORPUS + ["  leading", "trailing\n", "\n both \n", " "]
    src = write_jsonl(tmp_path / "c.jsonl", texts)
    m = tokenize_dataset(source=str(src), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"))
    assert m.word_rule == WORD_RULE == "lm-eval"
    assert json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())["word_rule"] == "lm-eval"
    with open_store(tmp_path / "s") as s:
        assert s.doc_words.tolist() == [lm_eval_words(t) for t in texts]
        assert m.totals["words"] == sum(lm_eval_words(t) for t in texts)
        assert word_rule_of(s.manifest) == "lm-eval"
    assert main(["info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "lm-eval rule: len(re.split(" in out and "written before" not in out
    assert not [n for n in verify_store(tmp_path / "s").notes if "rule" in n]
    # zarr: the rule travels through the npy staging store into the packed store
    m2 = tokenize_dataset(source=str(src), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "z"), format="zarr")
    assert m2.word_rule == "lm-eval" and m2.totals["words"] == m.totals["words"]


def _old_store(root):
    """A store as written before the rule was recorded: str.split() counts, no word_rule field."""
    texts = ["one two", " lead", "", "a b c "]
    docs = [[1, 2], [3], [4], [5, 6, 7]]
    return write_token_store(root, docs, nbytes=[len(t.encode()) for t in texts], nwords=[len(t.split()) for t in texts])


def test_store_without_a_rule_reads_as_str_split_and_says_so(tmp_path, capsys):
    root = _old_store(tmp_path / "old")
    assert "word_rule" not in json.loads((root / MANIFEST_NAME).read_text())
    m = read_manifest(root)
    assert m.word_rule is None and word_rule_of(m) == LEGACY_WORD_RULE == "str-split"
    assert "word_rule" not in json.loads(m.to_json())  # re-serialised unchanged: its digest stays the same
    with open_store(root) as s:
        assert s.doc_words.tolist() == [2, 1, 0, 3]
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "str-split rule: len(text.split()); written before the rule was recorded" in out
    assert main(["info", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["derived"]["word_rule"] == "str-split"
    r = verify_store(root)
    assert r.ok and any("str-split rule" in n and "not lm-eval's" in n for n in r.notes)
    assert main(["verify", str(root)]) == 0
    assert "str-split rule" in capsys.readouterr().out


def test_convert_keeps_the_rule_the_counts_were_made_by(tmp_path, bpe_tokenizer, capsys):
    old = _old_store(tmp_path / "old")
    m = convert_store(old, tmp_path / "old.zarr", format="zarr")
    assert m.word_rule == "str-split"  # now recorded explicitly; the counts are the same
    m = convert_store(tmp_path / "old.zarr", tmp_path / "old2", format="npy")
    assert m.word_rule == "str-split"
    new = tmp_path / "new"
    tokenize_dataset(source=str(write_jsonl(tmp_path / "c.jsonl", CORPUS)), tokenizer=str(bpe_tokenizer), out=str(new))
    assert convert_store(new, tmp_path / "new.zarr", format="zarr").word_rule == "lm-eval"
    # ids with no word counts (a raw import) record no rule
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.array([1, 2, 0, 3, 0], "<u2").tobytes())
    from streamdata import open_raw_bin

    with open_raw_bin(raw, eos_id=0, vocab_size=10) as s:
        assert word_rule_of(s.manifest) is None
        assert convert_store(s, tmp_path / "raw.npy", format="npy").word_rule is None
    assert main(["info", str(tmp_path / "raw.npy")]) == 0
    assert "not counted (no word perplexity from this store)" in capsys.readouterr().out


def test_unknown_rule_is_refused_with_its_name(tmp_path):
    root = _old_store(tmp_path / "s")
    d = json.loads((root / MANIFEST_NAME).read_text())
    d["word_rule"] = "whitespace-ish"
    (root / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(StoreError, match=r"word_rule 'whitespace-ish' is unknown \(this reader knows lm-eval, str-split"):
        open_store(root)
    d["word_rule"] = 3
    (root / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(StoreError, match=r"field 'word_rule' is 3, expected a string"):
        open_store(root)


def test_a_build_begun_with_the_old_rule_never_resumes_into_mixed_counts(tmp_path, bpe_tokenizer, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", CORPUS * 50)
    kw = dict(source=str(src), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"), shard_tokens=2000)

    def boom(*a, **k):
        raise OSError("killed (simulated)")

    with monkeypatch.context() as mp:
        mp.setattr(output_mod.Output, "seal", boom)
        with pytest.raises(OSError):
            tokenize_dataset(**kw)
    # the ledger of a build started by a version that did not record the rule
    ledger = tmp_path / "o" / LEDGER_FILE
    d = json.loads(ledger.read_text())
    del d["settings"]["word_rule"]
    ledger.write_text(json.dumps(d))
    with pytest.raises(Exception, match=r"unfinished build made with other settings \(word_rule\)"):
        tokenize_dataset(**kw)
    m = tokenize_dataset(overwrite=True, **kw)
    assert m.word_rule == "lm-eval" and m.totals["words"] == 50 * sum(lm_eval_words(t) for t in CORPUS)
