"""Tokenize stage end to end on local data: round trips, sources, sharding, dtype choice, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import streamdata
from streamdata import ConfigError, SourceError, StoreError, TokenizerError, open_store, tokenize_dataset
from streamdata.format import MANIFEST_NAME, choose_dtype

from ..conftest import CORPUS


def write_jsonl(path: Path, texts, key="text") -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t, "id": len(t)}) + "\n")
    return path


def doc_tokens(store, i):
    return store.document(i).astype(np.int64).tolist()


@pytest.fixture
def corpus_jsonl(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", CORPUS)


def test_round_trip_every_document(tmp_path, corpus_jsonl, bpe_tokenizer):
    m = tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"))
    tok = Tokenizer.from_file(str(bpe_tokenizer))
    eos = tok.token_to_id("<|endoftext|>")
    assert m.special_tokens["eos"] == eos and m.special_tokens["bos"] is None
    with open_store(tmp_path / "s") as s:
        assert s.num_documents == len(CORPUS)
        for i, text in enumerate(CORPUS):
            ids = doc_tokens(s, i)
            assert ids == tok.encode(text, add_special_tokens=False).ids + [eos]
            assert tok.decode(ids[:-1]) == text
            assert int(s.doc_bytes[i]) == len(text.encode("utf-8"))
            assert int(s.doc_words[i]) == len(re.split(r"\s+", text))  # lm-eval's rule (test_words.py)
        assert len(s) == sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in CORPUS)
        assert m.totals["bytes"] == sum(len(t.encode()) for t in CORPUS)
        assert s.dtype == np.dtype("<u2")
    # the manifest records the tokenizer identity and the source
    assert m.tokenizer["vocab_size"] == tok.get_vocab_size() and len(m.tokenizer["sha256"]) == 64
    assert m.source["kind"] == "files" and m.source["files"][0]["path"].endswith("corpus.jsonl")


def test_bos_and_no_eos_policy(tmp_path, corpus_jsonl, bpe_tokenizer):
    tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"),
                     eos="none", bos="<|endoftext|>")
    tok = Tokenizer.from_file(str(bpe_tokenizer))
    with open_store(tmp_path / "s") as s:
        for i, text in enumerate(CORPUS):
            assert doc_tokens(s, i) == [0] + tok.encode(text, add_special_tokens=False).ids
        assert s.manifest.special_tokens["bos"] == 0 and s.manifest.special_tokens["eos"] is None


@pytest.mark.parametrize("fmt", ["parquet", "csv", "txt", "saved", "saved-dict"])
def test_sources_give_identical_tokens(tmp_path, bpe_tokenizer, fmt):
    import datasets

    texts = [t for t in CORPUS if t.strip() and "\n" not in t]  # csv/txt-safe subset
    ref = tokenize_dataset(source=str(write_jsonl(tmp_path / "a.jsonl", texts)), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "ref"))
    ds = datasets.Dataset.from_dict({"text": texts})
    if fmt == "parquet":
        ds.to_parquet(str(tmp_path / "c.parquet"))
        src = str(tmp_path / "c.parquet")
    elif fmt == "csv":
        ds.to_csv(str(tmp_path / "c.csv"), index=False)
        src = str(tmp_path / "c.csv")
    elif fmt == "txt":  # one document per file
        for i, t in enumerate(texts):
            (tmp_path / f"d{i:02d}.txt").write_text(t, encoding="utf-8")
        src = str(tmp_path / "d*.txt")
    elif fmt == "saved":
        ds.save_to_disk(str(tmp_path / "saved"))
        src = str(tmp_path / "saved")
    else:
        datasets.DatasetDict({"test": ds, "train": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
        src = str(tmp_path / "saved")
        with pytest.raises(SourceError, match="pass --split"):
            tokenize_dataset(source=src, tokenizer=str(bpe_tokenizer), out=str(tmp_path / "out"))
        assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    m = tokenize_dataset(source=src, tokenizer=str(bpe_tokenizer), out=str(tmp_path / "out"),
                         split="test" if fmt == "saved-dict" else None, overwrite=True)
    with open_store(tmp_path / "ref") as a, open_store(tmp_path / "out") as b:
        np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))
        np.testing.assert_array_equal(a.doc_offsets, b.doc_offsets)
    assert m.totals == ref.totals


def test_streaming_equals_materialised(tmp_path, corpus_jsonl, bpe_tokenizer):
    a = tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "a"), batch_size=3)
    b = tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "b"), streaming=True, batch_size=2)
    assert a.shards[0].sha256 == b.shards[0].sha256 and a.totals == b.totals
    assert b.source["streaming"] is True


def test_limits_cut_at_document_boundaries(tmp_path, corpus_jsonl, bpe_tokenizer):
    m = tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "d"), max_docs=3, batch_size=2)
    assert m.totals["documents"] == 3
    full = tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "f"))
    with open_store(tmp_path / "f") as f:
        off = f.doc_offsets
        target = int(off[2]) + 1  # one token into document 2: keep it whole, stop after it
        m = tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "t"), max_tokens=target, batch_size=2)
        assert m.totals["documents"] == 3 and m.totals["tokens"] == int(off[3])
    assert full.totals["documents"] == len(CORPUS)


def test_shards_and_reads_across_boundaries(tmp_path, bpe_tokenizer):
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(["alpha", "beta", "gamma", "def", "return", "(x)", "🙂"], size=rng.integers(1, 60))) for _ in range(300)]
    src = write_jsonl(tmp_path / "many.jsonl", texts)
    tokenize_dataset(source=str(src), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "one"))
    m = tokenize_dataset(source=str(src), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "many"), shard_tokens=257, batch_size=7)
    assert len(m.shards) > 5
    with open_store(tmp_path / "one") as one, open_store(tmp_path / "many") as many:
        ref = one.read(0, len(one))
        np.testing.assert_array_equal(many.read(0, len(many)), ref)
        np.testing.assert_array_equal(many.doc_offsets, one.doc_offsets)
        bounds = [s.start for s in m.shards]
        for b in bounds[1:]:
            assert b in set(many.doc_offsets.tolist())  # shards close at document boundaries
            np.testing.assert_array_equal(many.read(b - 3, b + 3), ref[b - 3 : b + 3])
        for _ in range(200):
            a, b = sorted(rng.integers(0, len(ref) + 1, size=2))
            np.testing.assert_array_equal(many.read(a, b), ref[a:b])
        for s in m.shards[:-1]:
            assert s.tokens >= 257  # closed after the document that reaches the limit
        with pytest.raises(ConfigError, match="outside"):
            many.read(0, len(ref) + 1)


def wordlevel_tokenizer(path: Path, vocab_size: int) -> Path:
    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["[UNK]"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


@pytest.mark.parametrize("vocab_size,dtype", [(65535, "uint16"), (65536, "uint16"), (65537, "uint32")])
def test_dtype_choice_at_the_uint16_edge(tmp_path, vocab_size, dtype):
    tok = wordlevel_tokenizer(tmp_path / "tok.json", vocab_size)
    top = vocab_size - 2  # highest ordinary word; [UNK] is vocab_size - 1
    src = write_jsonl(tmp_path / "d.jsonl", [f"w0 w{top} w32768 nope", "w65534"])
    m = tokenize_dataset(source=str(src), tokenizer=str(tok), out=str(tmp_path / "s"), eos="none")
    assert m.dtype == dtype
    with open_store(tmp_path / "s") as s:
        assert s.read(0, len(s)).astype(np.int64).tolist() == [0, top, 32768, vocab_size - 1, 65534]
        assert s.dtype.itemsize == (2 if dtype == "uint16" else 4)


def test_vocab_that_does_not_fit_uint32():
    assert choose_dtype(1 << 32) == "uint32"
    with pytest.raises(TokenizerError, match=r"4294967297 does not fit uint32"):
        choose_dtype((1 << 32) + 1)


# ---- bad input: one clear error, nothing that looks complete ---------------------------------
def _assert_nothing_complete(out: Path):
    assert not (out / MANIFEST_NAME).exists()
    with pytest.raises(StoreError):
        open_store(out)


def test_missing_text_column(tmp_path, corpus_jsonl, bpe_tokenizer):
    with pytest.raises(SourceError, match=r"text column 'content' not found \(columns: \['text', 'id'\]\)"):
        tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"), text_column="content")
    _assert_nothing_complete(tmp_path / "o")


@pytest.mark.parametrize("texts,row,what", [(["fine"] * 5 + [None, "fine"], 5, "null"), ([3, 1, 4, 1, 5], 0, "of type int")])
def test_non_string_text(tmp_path, bpe_tokenizer, texts, row, what):
    import datasets

    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(SourceError, match=rf"row {row}: column 'text' is {what}, not a string"):
        tokenize_dataset(source=str(tmp_path / "b.parquet"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"), batch_size=2)
    _assert_nothing_complete(tmp_path / "o")


def test_empty_dataset(tmp_path, bpe_tokenizer):
    import datasets

    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})).to_parquet(str(tmp_path / "e.parquet"))
    with pytest.raises(SourceError, match=r"hold no documents \(empty dataset\)"):
        tokenize_dataset(source=str(tmp_path / "e.parquet"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"))
    _assert_nothing_complete(tmp_path / "o")
    # a streaming source reveals emptiness only at the end: the writer refuses to seal it
    with pytest.raises(SourceError, match="produced no documents"):
        tokenize_dataset(source=str(tmp_path / "e.parquet"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"), streaming=True)
    _assert_nothing_complete(tmp_path / "o")


def test_unknown_tokenizer(tmp_path, corpus_jsonl):
    with pytest.raises(TokenizerError, match="unknown tokenizer 'no-such-org/no-such-tokenizer'"):
        tokenize_dataset(source=str(corpus_jsonl), tokenizer="no-such-org/no-such-tokenizer", out=str(tmp_path / "o"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer file"):
        tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(tmp_path / "bad.json"), out=str(tmp_path / "o"))
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(tmp_path), out=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_unknown_eos_token(tmp_path, corpus_jsonl, bpe_tokenizer):
    with pytest.raises(TokenizerError, match="--eos token '</s>' is not in the tokenizer's vocabulary"):
        tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"), eos="</s>")


def test_output_exists(tmp_path, corpus_jsonl, bpe_tokenizer):
    out = tmp_path / "s"
    m1 = tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(out))
    # same command again: the finished store is returned untouched (idempotent, nothing clobbered)
    assert tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(out)).totals == m1.totals
    with pytest.raises(ConfigError, match="already holds a finished store: pass --overwrite"):
        tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(out), max_docs=2)
    with open_store(out) as s:
        assert s.num_documents == len(CORPUS)  # untouched
    m2 = tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(out), max_docs=2, overwrite=True)
    assert m2.totals["documents"] == 2
    other = tmp_path / "notastore"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="is not empty and is not a store"):
            tokenize_dataset(source=str(corpus_jsonl), tokenizer=str(bpe_tokenizer), out=str(other), overwrite=overwrite)
    assert (other / "precious.txt").read_text() == "keep me"


def test_unreadable_or_missing_files(tmp_path, bpe_tokenizer):
    with pytest.raises(SourceError, match="data file '.*missing.jsonl' does not exist"):
        tokenize_dataset(source=str(tmp_path / "missing.jsonl"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"))
    with pytest.raises(SourceError, match="no files match"):
        tokenize_dataset(source=str(tmp_path / "*.parquet"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(SourceError, match="cannot read data files"):
        tokenize_dataset(source=str(tmp_path / "broken.parquet"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"))
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(SourceError, match=r"unsupported data file type\(s\) \['.xyz'\]"):
        tokenize_dataset(source=str(tmp_path / "x.xyz"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"))
    _assert_nothing_complete(tmp_path / "o")


def test_unknown_hub_dataset_offline(tmp_path, bpe_tokenizer):
    with pytest.raises(SourceError, match="cannot load dataset 'no-such-org/no-such-dataset'"):
        tokenize_dataset(source="no-such-org/no-such-dataset", tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"))


@pytest.mark.parametrize("kw,msg", [({"max_docs": 0}, "max_docs=0 must be >= 1"), ({"shard_tokens": 0}, "shard_tokens=0 must be >= 1"),
                                    ({"batch_size": 0}, "batch_size=0"), ({"format": "hdf5"}, "format 'hdf5' is not supported")])
def test_bad_config_values(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        streamdata.TokenizeConfig(source="x.jsonl", tokenizer="t.json", out="o", **kw)


def test_public_api_imports():
    import evaluator  # noqa: F401 - the second package must import too

    for name in streamdata.__all__:
        assert getattr(streamdata, name) is not None


def test_embedded_default_corpus(tmp_path, bpe_tokenizer):
    from streamdata.source import default_corpus_files

    train, ev = default_corpus_files("train"), default_corpus_files("eval")
    assert train and ev and not set(train) & set(ev)
    assert sorted(train + ev) == default_corpus_files("all")
    m = tokenize_dataset(source="stdlib:eval", tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"), max_docs=5)
    assert m.source["kind"] == "default" and m.source["part"] == "eval" and m.source["files"] == len(ev)
    tok = Tokenizer.from_file(str(bpe_tokenizer))
    with open_store(tmp_path / "s") as s:
        for i in range(5):
            text = Path(ev[i]).read_text(encoding="utf-8")
            assert tok.decode(doc_tokens(s, i)[:-1]) == text
    with pytest.raises(ConfigError, match="default corpus part 'dev' must be train, eval or all"):
        tokenize_dataset(source="stdlib:dev", tokenizer=str(bpe_tokenizer), out=str(tmp_path / "t"))
