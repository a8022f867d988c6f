"""The tokenizer check compares what decides the ids (model, normalizer, pre-tokenizer, added tokens,
truncation, padding), not the whole tokenizer.json: a copy written by transformers' save_pretrained
(which adds an empty post-processor) matches its original; another normalizer is refused by name;
stores and models with only the older whole-file digest are compared like with like and told so."""

from __future__ import annotations

import json
import warnings

import pytest
from tokenizers import Tokenizer, normalizers

from evaluator import DataError, StreamingEvaluator
from evaluator.cli import main as eval_main
from streamdata import tokenize_dataset
from streamdata.errors import in_cli_terms
from streamdata.format import MANIFEST_NAME
from streamdata.tokenize import TOKENIZER_ID_PARTS, load_tokenizer, tokenizer_digests, tokenizer_mismatch

from ..conftest import CORPUS, train_bpe
from ..streamdata.test_tokenize import write_jsonl
from .helpers import tiny_gpt2


def _saved_model(folder, tokenizer_json, vocab):
    """A tiny GPT-2 and its tokenizer, both written by transformers' save_pretrained."""
    from transformers import PreTrainedTokenizerFast

    tiny_gpt2(n_positions=64, vocab=vocab).save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tokenizer_json)),
                                eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tokenizer trained here, a store tokenized with its original file, and a model folder whose
    tokenizer.json is that tokenizer re-saved by save_pretrained."""
    root = tmp_path_factory.mktemp("tokcheck")
    tok_json = train_bpe(root / "tokenizer.json")
    vocab = load_tokenizer(str(tok_json)).vocab_size
    store = root / "store"
    tokenize_dataset(source=str(write_jsonl(root / "c.jsonl", CORPUS)), tokenizer=str(tok_json), out=str(store))
    model = _saved_model(root / "model", tok_json, vocab)
    return root, tok_json, store, model, vocab


def _strip_ids_digest(store):
    """Make ``store`` look written before ids_sha256 existed (only the whole-file sha256)."""
    p = store / MANIFEST_NAME
    d = json.loads(p.read_text())
    d["tokenizer"].pop("ids_sha256")
    d["tokenizer"].pop("ids_parts")
    p.write_text(json.dumps(d))


def test_save_pretrained_copy_matches_the_original(trained, capsys):
    _, tok_json, store, model, _ = trained
    original = json.loads((tok_json).read_text())
    saved = json.loads((model / "tokenizer.json").read_text())
    assert original["post_processor"] is None and saved["post_processor"] is not None  # what broke the old check
    a = tokenizer_digests(Tokenizer.from_file(str(tok_json)))
    b = tokenizer_digests(Tokenizer.from_file(str(model / "tokenizer.json")))
    assert a["sha256"] != b["sha256"] and a["ids_sha256"] == b["ids_sha256"] and a["ids_parts"] == b["ids_parts"]
    ev = StreamingEvaluator(str(model), chunk_size=32, device="cpu", verbose=False)
    assert ev.adapter.tokenizer_identity["ids_sha256"] == a["ids_sha256"]
    r = ev.evaluate_streaming(str(store))
    assert r["total_tokens"] > 0
    assert eval_main(["run", str(store), "--model", str(model), "--chunk-size", "32", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()


def test_another_normalizer_is_refused_by_name(trained, tmp_path, capsys):
    _, tok_json, store, _, vocab = trained
    tok = Tokenizer.from_file(str(tok_json))
    tok.normalizer = normalizers.Lowercase()
    other_json = tmp_path / "lower.json"
    tok.save(str(other_json))
    model = _saved_model(tmp_path / "model", other_json, vocab)
    ev = StreamingEvaluator(str(model), chunk_size=32, device="cpu", verbose=False)
    with pytest.raises(DataError, match=r"another tokenizer than model .*'s \(their normalizer differs\)") as e:
        ev.evaluate_streaming(str(store))
    assert "\n" not in str(e.value) and "check_tokenizer=False" in str(e.value)
    # the CLI says it in its own terms, and its switch turns the check off
    args = ["run", str(store), "--model", str(model), "--chunk-size", "32", "--device", "cpu", "--quiet"]
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "their normalizer differs" in err and "pass --no-check-tokenizer" in err and "check_tokenizer" not in err
    assert eval_main(args + ["--no-check-tokenizer"]) == 0
    off = StreamingEvaluator(str(model), chunk_size=32, device="cpu", verbose=False, check_tokenizer=False)
    assert off.evaluate_streaming(str(store))["total_tokens"] > 0


def test_each_part_is_named():
    base = {"ids_sha256": "x", "ids_parts": {k: k for k in TOKENIZER_ID_PARTS}, "sha256": "s"}
    for k in TOKENIZER_ID_PARTS:
        other = {"ids_sha256": "y", "ids_parts": {**base["ids_parts"], k: "changed"}, "sha256": "t"}
        assert tokenizer_mismatch(base, other) == f"their {k} differs"
    two = {"ids_sha256": "y", "ids_parts": {**base["ids_parts"], "model": 1, "added_tokens": 2}, "sha256": "t"}
    assert tokenizer_mismatch(base, two) == "their model, added_tokens differ"
    assert tokenizer_mismatch(base, {**base, "sha256": "other file"}) is None  # same ids, other post-processor
    assert tokenizer_mismatch(base, {}) is None and tokenizer_mismatch({}, base) is None  # unknown: not compared
    damaged = {"ids_sha256": "z", "ids_parts": dict(base["ids_parts"])}  # parts equal, digest not: edited
    assert tokenizer_mismatch(base, damaged) == "their ids digests differ"


def test_store_with_only_the_whole_file_digest(trained, tmp_path, capsys):
    """Stores written before ids_sha256: compared by the whole-file sha256, and the message says so."""
    root, tok_json, store, model, _ = trained
    old = tmp_path / "old"
    tokenize_dataset(source=str(root / "c.jsonl"), tokenizer=str(tok_json), out=str(old))
    _strip_ids_digest(old)
    ev = StreamingEvaluator(str(model), chunk_size=32, device="cpu", verbose=False)
    with pytest.raises(DataError, match=r"records only that whole-file digest.*re-tokenize the store \(it then records "
                                        r"ids_sha256") as e:
        ev.evaluate_streaming(str(old))
    assert "\n" not in str(e.value) and str(old) in str(e.value)
    args = ["run", str(old), "--model", str(model), "--chunk-size", "32", "--device", "cpu", "--quiet"]
    assert eval_main(args) == 2 and "--no-check-tokenizer" in capsys.readouterr().err
    assert eval_main(args + ["--no-check-tokenizer"]) == 0
    # like with like: the model folder holding the very file the store was made with passes
    same = _saved_model(tmp_path / "same", tok_json, load_tokenizer(str(tok_json)).vocab_size)
    (same / "tokenizer.json").write_bytes(tok_json.read_bytes())
    assert StreamingEvaluator(str(same), chunk_size=32, device="cpu", verbose=False).evaluate_streaming(str(old))["total_tokens"] > 0


def test_model_with_only_a_whole_file_digest(trained):
    _, _, store, _, vocab = trained
    m = tiny_gpt2(n_positions=64, vocab=vocab)
    m.config.tokenizer_sha256 = "ab" * 32  # a model that declares only the older digest
    ev = StreamingEvaluator(m, chunk_size=32, device="cpu", verbose=False)
    with pytest.raises(DataError, match=r"\(whole-file sha256 [0-9a-f]{12}\.\.\. vs abababababab\.\.\.\), and model .* "
                                        r"records only .*load the model from a folder holding its tokenizer.json"):
        ev.evaluate_streaming(str(store))


def test_default_model_on_a_store_of_the_older_kind(tmp_path):
    """The bundled model against a store of the bundled tokenizer recorded before ids_sha256."""
    store = tmp_path / "s"
    tokenize_dataset(source=str(write_jsonl(tmp_path / "c.jsonl", CORPUS)), tokenizer="default", out=str(store))
    _strip_ids_digest(store)
    r = StreamingEvaluator("default", chunk_size=64, device="cpu", verbose=False).evaluate_streaming(str(store))
    assert r["total_tokens"] > 0


@pytest.mark.parametrize("msg, flags, out", [
    ("pass check_tokenizer=False", {"check_tokenizer": "--no-check-tokenizer"}, "pass --no-check-tokenizer"),
    ("the default (check_tokenizer=True).", {"check_tokenizer": "--no-check-tokenizer"},
     "the default (without --no-check-tokenizer)."),
    ("pass overwrite=True", {"overwrite": "--overwrite"}, "pass --overwrite"),
    ("as before (overwrite=False)", {"overwrite": "--overwrite"}, "as before (without --overwrite)"),
    ("pass chunk_size=8", {"chunk_size": "--chunk-size"}, "pass --chunk-size 8"),
])
def test_switches_in_cli_terms(msg, flags, out):
    assert in_cli_terms(msg, flags) == out
