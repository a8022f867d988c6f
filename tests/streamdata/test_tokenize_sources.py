"""Document sources recorded at tokenize time (store format 3: doc_source_file / doc_source_row and
the manifest's source_files), kept by every path that makes a store, and ``streamdata show --doc``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamdata import ConfigError, StoreError, TokenizerError, convert_store, open_store, tokenize_dataset
from streamdata.cli import main
from streamdata.format import SOURCE_ARRAYS, read_manifest
from streamdata.merge import merge_parts
from streamdata.show import show_document
from streamdata.verify import verify_store

from ..conftest import train_bpe

A = ["first of a", "second of a\nwith two lines", "third of a"]
B = ["only one in b, with ünïcode"]
C = ["c zero", "c one", "c two", "c three"]


def write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def sources(store_path) -> list[tuple[str | None, int]]:
    """(file name or None, row) of every document, read back from the store."""
    with open_store(store_path) as s:
        ds = s.doc_sources
        assert ds is not None
        return [(Path(ds.files[f]).name if f >= 0 else None, int(r))
                for f, r in zip(np.asarray(ds.file[:]).tolist(), np.asarray(ds.row[:]).tolist())]


def expected(*files) -> list[tuple[str, int]]:
    return [(name, r) for name, texts in files for r in range(len(texts))]


@pytest.fixture
def two_files(tmp_path):
    return [write_jsonl(tmp_path / "a.jsonl", A), write_jsonl(tmp_path / "b.jsonl", B),
            write_jsonl(tmp_path / "c.jsonl", C)]


@pytest.mark.parametrize("streaming,fmt", [(False, "npy"), (True, "npy"), (False, "zarr")])
def test_jsonl_files_record_file_and_row(tmp_path, two_files, bpe_tokenizer, streaming, fmt):
    m = tokenize_dataset(source=[str(f) for f in two_files], tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"),
                         streaming=streaming, batch_bytes=20, format=fmt)
    assert m.format_version == 3 and [Path(f).name for f in m.source_files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert [x.name for x in m.index][-2:] == list(SOURCE_ARRAYS)
    assert sources(tmp_path / "s") == expected(("a.jsonl", A), ("b.jsonl", B), ("c.jsonl", C))
    assert verify_store(tmp_path / "s").ok


def test_parquet_and_saved_dataset(tmp_path, bpe_tokenizer):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": A}), tmp_path / "p0.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": C}), tmp_path / "p1.parquet", row_group_size=1)
    tokenize_dataset(source=[str(tmp_path / "p0.parquet"), str(tmp_path / "p1.parquet")], tokenizer=str(bpe_tokenizer),
                     out=str(tmp_path / "pq"))
    assert sources(tmp_path / "pq") == expected(("p0.parquet", A), ("p1.parquet", C))

    datasets.Dataset.from_dict({"text": A + C}).save_to_disk(str(tmp_path / "saved"))
    m = tokenize_dataset(source=str(tmp_path / "saved"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "sv"))
    assert m.source_files == [] and sources(tmp_path / "sv") == [(None, r) for r in range(len(A + C))]
    # a part of a saved dataset counts rows from the whole dataset's start
    tokenize_dataset(source=str(tmp_path / "saved"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "p1"),
                     num_parts=2, part=1)
    assert sources(tmp_path / "p1") == [(None, r) for r in range(4, 7)]


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("sample_by,want", [
    ("line", [("t1.txt", 0), ("t1.txt", 4), ("t2.txt", 0), ("t2.txt", 1)]),
    ("paragraph", [("t1.txt", 0), ("t1.txt", 2), ("t2.txt", 0)]),
    ("document", [("t1.txt", 0), ("t2.txt", 0)])])
def test_text_files_record_the_unit_counting_blank_ones(tmp_path, bpe_tokenizer, streaming, sample_by, want):
    # lines "l zero", "", " ", "", "l four"; paragraphs (split at blank lines) "l zero", " ", "l four\n"
    (tmp_path / "t1.txt").write_text("l zero\n\n \n\nl four\n")
    (tmp_path / "t2.txt").write_text("m zero\nm one")
    tokenize_dataset(source=[str(tmp_path / "t1.txt"), str(tmp_path / "t2.txt")], tokenizer=str(bpe_tokenizer),
                     out=str(tmp_path / "s"), sample_by=sample_by, streaming=streaming)
    assert sources(tmp_path / "s") == want


def test_resume_after_a_crash_keeps_sources(tmp_path, two_files, bpe_tokenizer, monkeypatch):
    import streamdata.writer as writer_mod

    calls = {"n": 0}
    real = writer_mod.StoreWriter._finish_shard

    def crash_on_second(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(self)

    kw = dict(source=[str(f) for f in two_files], tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"),
              shard_tokens=8, batch_bytes=16)
    monkeypatch.setattr(writer_mod.StoreWriter, "_finish_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        tokenize_dataset(**kw)
    monkeypatch.setattr(writer_mod.StoreWriter, "_finish_shard", real)
    m = tokenize_dataset(**kw)
    assert len(m.shards) > 2
    assert sources(tmp_path / "s") == expected(("a.jsonl", A), ("b.jsonl", B), ("c.jsonl", C))


def test_parts_merge_and_convert_keep_sources(tmp_path, two_files, bpe_tokenizer):
    files = [str(f) for f in two_files]
    for i in range(2):
        tokenize_dataset(source=files, tokenizer=str(bpe_tokenizer), out=str(tmp_path / f"part{i}"), num_parts=2, part=i)
    want = expected(("a.jsonl", A), ("b.jsonl", B), ("c.jsonl", C))
    n0 = len(sources(tmp_path / "part0"))
    assert sources(tmp_path / "part0") + sources(tmp_path / "part1") == want and 0 < n0 < len(want)
    for fmt in ("npy", "zarr"):
        merge_parts([str(tmp_path / "part0"), str(tmp_path / "part1")], str(tmp_path / f"merged-{fmt}"), format=fmt)
        assert sources(tmp_path / f"merged-{fmt}") == want
        assert read_manifest(tmp_path / f"merged-{fmt}").source_files == read_manifest(tmp_path / "part0").source_files
    convert_store(tmp_path / "merged-npy", tmp_path / "z", format="zarr")
    convert_store(tmp_path / "z", tmp_path / "back", format="npy")
    for p in ("z", "back"):
        assert sources(tmp_path / p) == want and verify_store(tmp_path / p).ok


@pytest.mark.parametrize("streaming", [False, True])
def test_ids_column_records_rows(tmp_path, streaming):
    rows = {"i0.jsonl": [[1, 2, 3], [4], [5, 6]], "i1.jsonl": [[7], [], [8, 9]]}
    for name, rs in rows.items():
        (tmp_path / name).write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rs))
    tokenize_dataset(source=[str(tmp_path / n) for n in rows], tokenizer=None, ids_column="input_ids", vocab_size=10,
                     out=str(tmp_path / "s"), streaming=streaming, batch_bytes=16)
    assert sources(tmp_path / "s") == [(n, r) for n, rs in rows.items() for r in range(len(rs))]


def test_manifest_lists_sources_whole_or_not_at_all(tmp_path, two_files, bpe_tokenizer):
    tokenize_dataset(source=[str(f) for f in two_files], tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"))
    path = tmp_path / "s" / "manifest.json"
    d = json.loads(path.read_text())
    del d["source_files"]
    path.write_text(json.dumps(d))
    with pytest.raises(StoreError, match="come together"):
        open_store(tmp_path / "s")


def test_stores_without_sources_report_none(make_store, tmp_path):
    root = make_store([[1, 2], [3]])
    d = json.loads((root / "manifest.json").read_text())
    d["format_version"] = 2  # as written before sources were recorded
    (root / "manifest.json").write_text(json.dumps(d))
    with open_store(root) as s:
        assert s.doc_sources is None
        assert show_document(s, 1, ids_only=True).source.startswith("not recorded")
    assert verify_store(root).ok
    convert_store(root, tmp_path / "z", format="zarr")  # a copy of a store without sources has none either
    assert read_manifest(tmp_path / "z").source_files is None
    with open_store(tmp_path / "z") as s:
        assert s.doc_sources is None


def test_damaged_source_array_is_a_defect(tmp_path, two_files, bpe_tokenizer):
    tokenize_dataset(source=[str(f) for f in two_files], tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"))
    path = tmp_path / "s" / "index" / "doc_source_row.npy"
    arr = np.load(path)
    arr[1] += 1
    np.save(path, arr)
    r = verify_store(tmp_path / "s")
    assert not r.ok and "doc_source_row" in r.defects[0]


# ---- streamdata show --doc -------------------------------------------------------------------------
def test_show_doc_prints_the_text_back(tmp_path, two_files, bpe_tokenizer, capsys):
    tokenize_dataset(source=[str(f) for f in two_files], tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"),
                     bos="<|endoftext|>")
    texts = A + B + C
    for n, text in enumerate(texts):
        d = show_document(tmp_path / "s", n)
        assert d.text == text
    capsys.readouterr()
    assert main(["show", str(tmp_path / "s"), "--doc", "3"]) == 0
    out = capsys.readouterr().out
    header, body = out.split("\n", 1)
    with open_store(tmp_path / "s") as s:
        ntok = int(s.doc_offsets[4] - s.doc_offsets[3])
    assert header == f"# document 3 of {len(texts)}: {ntok} tokens; source: {two_files[1].resolve()} row 0"
    assert body == B[0] + "\n"
    assert main(["show", str(tmp_path / "s"), "--doc", "0", "--ids"]) == 0
    with open_store(tmp_path / "s") as s:
        assert capsys.readouterr().out.split("\n")[1] == " ".join(map(str, s.document(0).tolist()))


@pytest.mark.parametrize("n", [-1, 8, 100])
def test_show_doc_out_of_range_is_one_line(tmp_path, two_files, bpe_tokenizer, capsys, n):
    tokenize_dataset(source=[str(f) for f in two_files], tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"))
    capsys.readouterr()
    assert main(["show", str(tmp_path / "s"), "--doc", str(n)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"streamdata: error: --doc {n} is outside the store's documents: pass 0 to 7 (8 documents)"
    with pytest.raises(ConfigError):
        show_document(tmp_path / "s", n)


def test_show_doc_needs_a_usable_tokenizer(tmp_path, two_files, bpe_tokenizer, capsys):
    tok = tmp_path / "tok" / "tokenizer.json"
    tok.parent.mkdir()
    train_bpe(tok)
    tokenize_dataset(source=[str(f) for f in two_files], tokenizer=str(tok), out=str(tmp_path / "s"))
    tok.unlink()  # the recorded path is gone
    capsys.readouterr()
    assert main(["show", str(tmp_path / "s"), "--doc", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --tokenizer PATH" in err[0]
    # the same tokenizer elsewhere is accepted (its identity matches the manifest's)
    assert show_document(tmp_path / "s", 0, tokenizer=str(bpe_tokenizer)).text == A[0]
    # another one is refused
    other = train_bpe(tmp_path / "other.json", texts=["zzz yyy xxx"] * 5, vocab_size=280)
    with pytest.raises(TokenizerError, match="is not the one store"):
        show_document(tmp_path / "s", 0, tokenizer=str(other))
    # ids stored as they are: no tokenizer recorded
    (tmp_path / "ids.jsonl").write_text(json.dumps({"input_ids": [1, 2]}) + "\n")
    tokenize_dataset(source=str(tmp_path / "ids.jsonl"), tokenizer=None, ids_column="input_ids", vocab_size=10,
                     out=str(tmp_path / "ids"))
    capsys.readouterr()
    assert main(["show", str(tmp_path / "ids"), "--doc", "0"]) == 2
    assert "pass --tokenizer PATH" in capsys.readouterr().err


def test_info_on_the_embedded_corpus_store(tmp_path, capsys):
    """The embedded corpus records its file count, not a file list: info described it as an import
    and failed with a TypeError (files[0] of an int)."""
    tokenize_dataset(source="stdlib:train", tokenizer="default", out=str(tmp_path / "s"), max_docs=2)
    capsys.readouterr()
    assert main(["info", str(tmp_path / "s")]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["source"].startswith("embedded corpus stdlib:train (") and "Python" in rows["source"]
    assert rows["sources"].startswith("per document: file and row")
    with open_store(tmp_path / "s") as s:
        assert np.asarray(s.doc_sources.row[:]).tolist() == [0, 0]  # one document per file


def test_a_reused_cache_without_row_counts_records_sources_as_not_known(tmp_path, two_files, bpe_tokenizer):
    import datasets

    files = [str(f) for f in two_files]
    datasets.load_dataset("json", data_files=files, split="train", cache_dir=str(tmp_path / "cache"))  # no counts kept
    tokenize_dataset(source=files, tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"), cache_dir=str(tmp_path / "cache"))
    assert sources(tmp_path / "s") == [(None, -1)] * len(A + B + C)
    assert show_document(tmp_path / "s", 0).source == "not known"
