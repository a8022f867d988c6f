"""Partitioned tokenization: K parts tokenized apart and merged equal one tokenize of the whole source
(tokens, document index, counts, checksums); a part reads only its slice; merge refuses parts that do
not make one whole; interrupted parts and merges resume."""

from __future__ import annotations

import json
import random
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamdata import ConfigError, SourceError, StoreError, open_store, tokenize_dataset
from streamdata import source as source_mod
from streamdata import writer as writer_mod
from streamdata.cli import main
from streamdata.format import BUILD_DIR, LEGACY_WORD_RULE, MANIFEST_NAME, WORD_RULE
from streamdata.merge import MergeConfig, merge_parts
from streamdata.source import SourceSpec, even_bounds, load_source, part_bounds
from streamdata.tokenize import run_tokenize
from streamdata.verify import verify_store

from ..conftest import CORPUS, train_bpe

# Faults (a kill, a crash, a full disk, a network failure) are injected by patching the storage
# layer's private write/rename/finish seams: a fault must land in the middle of a write, and a public
# hook there would exist only for tests.

SHARD = 150  # small shards: output shard boundaries fall inside parts and across part boundaries


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(CORPUS) * rng.randint(1, 3) + f" #{seed}.{i}" for i in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[str]:
    """Seven jsonl files of unequal sizes (one tiny, one large), 40 documents in all."""
    root = tmp_path_factory.mktemp("parts-corpus")
    files = []
    for k, n in enumerate((3, 9, 1, 6, 12, 4, 5)):
        f = root / f"d{k}.jsonl"
        f.write_text("".join(json.dumps({"text": t}) + "\n" for t in _texts(n, k)), encoding="utf-8")
        files.append(str(f))
    return files


def _tok(src, tok, out, **kw):
    return tokenize_dataset(src, tokenizer=str(tok), out=str(out), shard_tokens=SHARD, **kw)


def _parts(src, tok, root: Path, k: int, **kw) -> list[str]:
    out = []
    for i in range(k):
        _tok(src, tok, root / f"part{i}", num_parts=k, part=i, **kw)
        out.append(str(root / f"part{i}"))
    return out


def assert_same_store(a_path, b_path):
    """Everything a single run decides: tokens, index arrays, totals, checksums, identity."""
    with open_store(a_path) as a, open_store(b_path) as b:
        np.testing.assert_array_equal(a.read(0, len(a)), b.read(0, len(b)))
        np.testing.assert_array_equal(np.asarray(a.doc_offsets), np.asarray(b.doc_offsets))
        np.testing.assert_array_equal(np.asarray(a.doc_bytes), np.asarray(b.doc_bytes))
        np.testing.assert_array_equal(np.asarray(a.doc_words), np.asarray(b.doc_words))
        ma, mb = a.manifest, b.manifest
        assert (ma.format, ma.dtype, ma.totals) == (mb.format, mb.dtype, mb.totals)
        assert [(s.file, s.tokens, s.documents, s.sha256) for s in ma.shards] == \
               [(s.file, s.tokens, s.documents, s.sha256) for s in mb.shards]
        assert [(x.name, x.length, x.sha256) for x in ma.index] == [(x.name, x.length, x.sha256) for x in mb.index]
        assert (ma.source, ma.tokenizer, ma.special_tokens) == (mb.source, mb.tokenizer, mb.special_tokens)
        assert ma.word_rule == mb.word_rule == WORD_RULE


# ---- the cut ------------------------------------------------------------------------------------
def _bounds_reference(weights, k, i):
    """Brute force of part_bounds' rule: each boundary the item boundary nearest j/k of the total
    (earlier on a tie, exact fractions), then moved so every run keeps an item."""
    n, total = len(weights), sum(weights)
    if total == 0:
        return even_bounds(n, k, i)
    cum = [sum(weights[:j]) for j in range(n + 1)]
    b = [0]
    for j in range(1, k):
        goal = Fraction(j * total, k)
        best = min(range(n + 1), key=lambda x: (abs(cum[x] - goal), x))
        b.append(min(max(best, b[-1] + 1), n - (k - j)))
    b.append(n)
    return b[i], b[i + 1]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=14), st.data())
def test_part_bounds_tile_and_match_reference(weights, data):
    k = data.draw(st.integers(1, len(weights)))
    got = [part_bounds(weights, k, i) for i in range(k)]
    assert got == [_bounds_reference(weights, k, i) for i in range(k)]
    assert got[0][0] == 0 and got[-1][1] == len(weights)
    assert all(lo < hi for lo, hi in got) and all(got[i][1] == got[i + 1][0] for i in range(k - 1))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 60), st.data())
def test_even_bounds_match_datasets_shard(n, data):
    import datasets

    k = data.draw(st.integers(1, n))
    ds = datasets.Dataset.from_dict({"i": list(range(n))})
    for i in range(k):
        lo, hi = even_bounds(n, k, i)
        assert ds.shard(num_shards=k, index=i, contiguous=True)["i"] == list(range(lo, hi))


# ---- merged == one run ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npy", "zarr"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_merge_equals_one_run(tmp_path, corpus, bpe_tokenizer, fmt, k):
    ref = _tok(corpus, bpe_tokenizer, tmp_path / "ref", format=fmt)
    parts = _parts(corpus, bpe_tokenizer, tmp_path, k, format=fmt)
    ranges = []
    for p in parts:
        with open_store(p) as s:
            rec = s.manifest.extra["part"]
            assert (rec["num_parts"], rec["unit"], rec["of"]) == (k, "files", len(corpus))
            assert s.manifest.source == ref.source  # the whole source's identity
            ranges.append(tuple(rec["range"]))
    assert ranges[0][0] == 0 and ranges[-1][1] == len(corpus)
    order = list(reversed(parts)) if k > 1 else parts  # any order
    m = merge_parts(order, tmp_path / "merged")
    assert m.format == fmt and len(m.shards) == len(ref.shards)
    assert m.extra["merged_from"]["num_parts"] == k
    assert_same_store(tmp_path / "ref", tmp_path / "merged")
    assert verify_store(str(tmp_path / "merged")).ok
    # rerun: the finished merge is returned as is
    assert merge_parts(parts, tmp_path / "merged").shards == m.shards


def test_merge_converts_between_formats(tmp_path, corpus, bpe_tokenizer):
    _tok(corpus, bpe_tokenizer, tmp_path / "ref")
    parts = _parts(corpus, bpe_tokenizer, tmp_path, 2, format="zarr")
    merge_parts(parts, tmp_path / "merged", format="npy")  # shard_tokens from the zarr parts' settings
    assert_same_store(tmp_path / "ref", tmp_path / "merged")


def test_saved_dataset_parts_by_row(tmp_path, bpe_tokenizer):
    import datasets

    datasets.Dataset.from_dict({"text": _texts(23, 99)}).save_to_disk(str(tmp_path / "saved"))
    src = str(tmp_path / "saved")
    _tok(src, bpe_tokenizer, tmp_path / "ref")
    parts = _parts(src, bpe_tokenizer, tmp_path, 3)
    recs = [open_store(p).manifest.extra["part"] for p in parts]
    assert [(r["unit"], r["range"]) for r in recs] == [("rows", [0, 8]), ("rows", [8, 16]), ("rows", [16, 23])]
    merge_parts(parts, tmp_path / "merged")
    assert_same_store(tmp_path / "ref", tmp_path / "merged")


def test_streaming_files_parts(tmp_path, corpus, bpe_tokenizer):
    _tok(corpus, bpe_tokenizer, tmp_path / "ref", streaming=True)
    merge_parts(_parts(corpus, bpe_tokenizer, tmp_path, 3, streaming=True), tmp_path / "merged")
    assert_same_store(tmp_path / "ref", tmp_path / "merged")


def test_streaming_dataset_parts_by_data_files():
    # the cut of a streaming hub dataset (no hub here: an IterableDataset of 5 data shards stands in)
    import datasets

    from streamdata.source import _data_files_part

    it = datasets.Dataset.from_dict({"text": [str(i) for i in range(23)]}).to_iterable_dataset(num_shards=5)
    rows, ranges = [], []
    for i in range(3):
        part, rec = _data_files_part(it, SourceSpec(paths=("x",), streaming=True, num_parts=3, part=i), "dataset 'x'")
        rows += [r["text"] for r in part]
        ranges.append(tuple(rec["range"]))
        assert (rec["unit"], rec["of"]) == ("data_files", 5)
    assert rows == [str(i) for i in range(23)] and ranges == [(0, 2), (2, 4), (4, 5)]
    with pytest.raises(SourceError, match=r"has 5 data file\(s\), fewer than num_parts=6: drop --streaming"):
        _data_files_part(it, SourceSpec(paths=("x",), streaming=True, num_parts=6, part=0), "dataset 'x'")


def test_text_files_by_paragraph(tmp_path, bpe_tokenizer):
    for i in range(4):  # blank paragraphs are skipped inside each part as in one run
        (tmp_path / f"t{i}.txt").write_text("\n\n".join(_texts(3 + i, i)) + "\n\n\n", encoding="utf-8")
    src = str(tmp_path / "t*.txt")
    _tok(src, bpe_tokenizer, tmp_path / "ref", sample_by="paragraph")
    merge_parts(_parts(src, bpe_tokenizer, tmp_path, 3, sample_by="paragraph"), tmp_path / "merged")
    assert_same_store(tmp_path / "ref", tmp_path / "merged")


def test_embedded_corpus_parts(tmp_path, bpe_tokenizer, monkeypatch):
    # the embedded corpus's own code path (identity, inner files source) on six small .py files
    files = []
    for i, t in enumerate(_texts(6, 5)):
        f = tmp_path / "lib" / f"m{i}.py"
        f.parent.mkdir(exist_ok=True)
        f.write_text(t * (i + 1), encoding="utf-8")
        files.append(str(f))
    monkeypatch.setattr(source_mod, "default_corpus_files", lambda part="eval": list(files))
    _tok("stdlib:eval", bpe_tokenizer, tmp_path / "ref")
    parts = _parts("stdlib:eval", bpe_tokenizer, tmp_path, 3)
    seen = []
    for i in range(3):
        src = load_source(SourceSpec(paths=("stdlib:eval",), num_parts=3, part=i))
        try:
            lo, hi = src.part["range"]
            assert src.files == files[lo:hi] and src.num_rows == hi - lo  # one document per file, its own only
            seen += src.files
        finally:
            src.close()
    assert seen == files
    merge_parts(parts, tmp_path / "merged")
    assert_same_store(tmp_path / "ref", tmp_path / "merged")


def test_a_part_reads_only_its_files(tmp_path, corpus, bpe_tokenizer):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    files = [shutil.copy(f, src_dir) for f in corpus]
    _tok(files, bpe_tokenizer, tmp_path / "ref")
    with open_store(tmp_path / "ref") as ref:
        ref_tokens, ref_off = ref.read(0, len(ref)), np.asarray(ref.doc_offsets)
    rec = load_source(SourceSpec(paths=tuple(files), num_parts=3, part=1)).part
    lo, hi = rec["range"]
    for j, f in enumerate(files):  # the other parts' files: same sizes (the cut is unchanged), unparsable
        if not lo <= j < hi:
            Path(f).write_bytes(b"\xff" * Path(f).stat().st_size)
    m = _tok(files, bpe_tokenizer, tmp_path / "p1", num_parts=3, part=1)
    docs_before = sum(len(Path(c).read_text().splitlines()) for c in corpus[:lo])
    with open_store(tmp_path / "p1") as p:
        a, b = int(ref_off[docs_before]), int(ref_off[docs_before + m.num_documents])
        np.testing.assert_array_equal(p.read(0, len(p)), ref_tokens[a:b])


# ---- resume -------------------------------------------------------------------------------------
class _Crash(Exception):
    pass


def _crash_after(monkeypatch, shards: int):
    real = writer_mod.StoreWriter._finish_shard
    calls = {"n": 0}

    def finish(self):
        real(self)
        calls["n"] += 1
        if calls["n"] == shards:
            raise _Crash("simulated crash")

    monkeypatch.setattr(writer_mod.StoreWriter, "_finish_shard", finish)


def test_interrupted_part_resumes(tmp_path, corpus, bpe_tokenizer, monkeypatch):
    ref = _tok(corpus, bpe_tokenizer, tmp_path / "ref", num_parts=2, part=1, batch_size=2)
    with monkeypatch.context() as mp:
        _crash_after(mp, 2)
        with pytest.raises(_Crash):
            _tok(corpus, bpe_tokenizer, tmp_path / "p1", num_parts=2, part=1, batch_size=2)
    assert not (tmp_path / "p1" / MANIFEST_NAME).exists()
    with pytest.raises(ConfigError, match="not finished"):  # a merge meanwhile names the unfinished part
        merge_parts([str(tmp_path / "ref"), str(tmp_path / "p1")], tmp_path / "m")
    r = run_tokenize(corpus, tokenizer=str(bpe_tokenizer), out=str(tmp_path / "p1"), shard_tokens=SHARD,
                     num_parts=2, part=1, batch_size=2)
    assert r.tokens_before > 0 and not r.already_complete
    assert_same_store(tmp_path / "ref", tmp_path / "p1")


def test_resume_refuses_another_part(tmp_path, corpus, bpe_tokenizer, monkeypatch):
    with monkeypatch.context() as mp:
        _crash_after(mp, 1)
        with pytest.raises(_Crash):
            _tok(corpus, bpe_tokenizer, tmp_path / "p", num_parts=2, part=1)
    with pytest.raises(ConfigError, match="other settings.*part"):
        _tok(corpus, bpe_tokenizer, tmp_path / "p", num_parts=2, part=0)


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_interrupted_merge_resumes(tmp_path, corpus, bpe_tokenizer, monkeypatch, fmt):
    from streamdata.backends import zarr as zarr_mod

    _tok(corpus, bpe_tokenizer, tmp_path / "ref", format=fmt)
    parts = _parts(corpus, bpe_tokenizer, tmp_path, 3, format=fmt)
    with monkeypatch.context() as mp:
        if fmt == "npy":
            _crash_after(mp, 3)
        else:
            real = zarr_mod._write_tokens_block

            def crash(arr, start, data):
                real(arr, start, data)
                raise _Crash("simulated crash")

            mp.setattr(zarr_mod, "_write_tokens_block", crash)
        with pytest.raises(_Crash):
            merge_parts(parts, tmp_path / "merged", **({"compression": "zstd"} if fmt == "zarr" else {}))
    assert not (tmp_path / "merged" / MANIFEST_NAME).exists()
    # resumed with small copy blocks: documents already in finished shards are skipped mid-block
    merge_parts(parts[::-1], tmp_path / "merged", block_tokens=37, **({"compression": "zstd"} if fmt == "zarr" else {}))
    assert_same_store(tmp_path / "ref", tmp_path / "merged")


# ---- refusals -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def three_parts(tmp_path_factory, corpus, bpe_tokenizer):
    root = tmp_path_factory.mktemp("three")
    return root, _parts(corpus, bpe_tokenizer, root, 3)


def _refused(parts, out, match, exc=ConfigError, **kw):
    with pytest.raises(exc, match=match):
        merge_parts(parts, out, **kw)
    assert not (Path(out) / MANIFEST_NAME).exists()


def test_refuses_missing_and_duplicate_parts(tmp_path, three_parts):
    root, (p0, p1, p2) = three_parts
    _refused([p0, p2], tmp_path / "m", r"part\(s\) 1 of 3 are missing.*--num-parts 3 --part 1")
    _refused([p0, p1, p2, p1], tmp_path / "m", "given twice")
    copy = tmp_path / "copy-of-1"
    shutil.copytree(p1, copy)
    _refused([p0, p1, p2, str(copy)], tmp_path / "m", "are both part 1 of 3")


def test_refuses_out_equal_to_a_part(tmp_path, three_parts):
    root, parts = three_parts
    before = sorted((f.name, f.stat().st_mtime_ns) for f in Path(parts[1]).rglob("*"))
    with pytest.raises(ConfigError, match=f"out='{parts[1]}' is part '{parts[1]}' or overlaps it"):
        merge_parts(parts, parts[1], overwrite=True)
    _refused(parts, Path(parts[1]) / "inside", "overlaps")
    _refused(parts, root, "overlaps")
    assert sorted((f.name, f.stat().st_mtime_ns) for f in Path(parts[1]).rglob("*")) == before


def test_refuses_unfinished_and_non_parts(tmp_path, corpus, bpe_tokenizer, three_parts):
    root, (p0, p1, p2) = three_parts
    unfinished = tmp_path / "unfinished"
    shutil.copytree(p1, unfinished)
    (unfinished / MANIFEST_NAME).unlink()
    (unfinished / BUILD_DIR).mkdir()
    _refused([p0, str(unfinished), p2], tmp_path / "m", f"part '{unfinished}' is not finished")
    (unfinished / BUILD_DIR).rmdir()
    _refused([p0, str(unfinished), p2], tmp_path / "m", "has no manifest.json")
    _refused([p0, str(tmp_path / "nowhere"), p2], tmp_path / "m", "does not exist")
    whole = _tok(corpus, bpe_tokenizer, tmp_path / "whole")
    assert "part" not in whole.extra
    _refused([p0, str(tmp_path / "whole"), p2], tmp_path / "m", "is a store but not a part")


def test_refuses_parts_of_other_runs(tmp_path, corpus, bpe_tokenizer, three_parts):
    root, (p0, p1, p2) = three_parts
    # another tokenizer
    other_tok = train_bpe(tmp_path / "other.json", texts=CORPUS[::-1], vocab_size=280)
    _tok(corpus, other_tok, tmp_path / "t1", num_parts=3, part=1)
    _refused([p0, str(tmp_path / "t1"), p2], tmp_path / "m", f"part '{tmp_path / 't1'}' has another tokenizer")
    # another EOS/BOS policy
    _tok(corpus, bpe_tokenizer, tmp_path / "e1", num_parts=3, part=1, eos="none")
    _refused([p0, str(tmp_path / "e1"), p2], tmp_path / "m", "another EOS/BOS policy")
    # another source (one file less: another identity and another cut)
    _tok(corpus[:-1], bpe_tokenizer, tmp_path / "s1", num_parts=3, part=1)
    _refused([p0, str(tmp_path / "s1"), p2], tmp_path / "m", "another source or source setting")
    # another number of parts
    _tok(corpus, bpe_tokenizer, tmp_path / "k1", num_parts=2, part=1)
    _refused([p0, str(tmp_path / "k1"), p2], tmp_path / "m", "part 1 of 2, but part .* is part 0 of 3")


def test_refuses_another_sample_by(tmp_path, bpe_tokenizer):
    for i in range(3):
        (tmp_path / f"t{i}.txt").write_text("\n".join(_texts(4, i)) + "\n", encoding="utf-8")
    src = str(tmp_path / "t*.txt")
    a = _parts(src, bpe_tokenizer, tmp_path / "a", 2, sample_by="line")
    b = _parts(src, bpe_tokenizer, tmp_path / "b", 2, sample_by="document")
    _refused([a[0], b[1]], tmp_path / "m", r"another source or source setting \(sample_by 'document'\)")


@pytest.mark.parametrize("dtype, word_rule, msg", [
    ("uint32", WORD_RULE, "another token dtype"),
    ("uint16", LEGACY_WORD_RULE, "another word-count rule \\('str-split'\\)"),
])
def test_refuses_another_dtype_or_word_rule(tmp_path, three_parts, dtype, word_rule, msg):
    from streamdata.writer import StoreWriter

    root, (p0, p1, p2) = three_parts
    with open_store(p1) as s:  # part 1 rewritten with one field changed, its identity otherwise unchanged
        m = s.manifest
        w = StoreWriter(tmp_path / "odd", dtype=dtype, vocab_size=int(m.tokenizer["vocab_size"]),
                        shard_tokens=SHARD, settings={"test": "odd"})
        w.add_documents(s.read(0, len(s)).astype(np.int64), np.diff(np.asarray(s.doc_offsets)), s.doc_bytes, s.doc_words)
        w.commit(tokenizer=m.tokenizer, special_tokens=m.special_tokens, source=m.source, extra={"part": m.extra["part"]},
                 word_rule=word_rule)
    _refused([p0, str(tmp_path / "odd"), p2], tmp_path / "m", msg)


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_refuses_a_damaged_part(tmp_path, three_parts, fmt):
    root, (p0, p1, p2) = three_parts
    bad = tmp_path / "bad1"
    shutil.copytree(p1, bad)
    shard = sorted((bad / "shards").iterdir())[-1]
    data = bytearray(shard.read_bytes())
    data[1] ^= 0x01  # ids stay in the vocabulary: only the checksum can tell
    shard.write_bytes(bytes(data))
    _refused([p0, str(bad), p2], tmp_path / "m", f"part '{bad}': 'shards/{shard.name}' does not match its checksum",
             exc=StoreError, format=fmt)


def test_partition_needs_enough_units(tmp_path, corpus, bpe_tokenizer):
    with pytest.raises(SourceError, match=r"has 2 file\(s\), fewer than num_parts=3.*split -n"):
        _tok(corpus[:2], bpe_tokenizer, tmp_path / "p", num_parts=3, part=0)
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(SourceError, match=r"has 2 document\(s\), fewer than num_parts=3"):
        _tok(str(tmp_path / "saved"), bpe_tokenizer, tmp_path / "p", num_parts=3, part=2)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("kw, msg", [
    ({"num_parts": 3}, "num_parts=3 needs part=I too"),
    ({"part": 0}, "part=0 needs num_parts=K too"),
    ({"num_parts": 0, "part": 0}, "num_parts=0 must be an integer >= 1"),
    ({"num_parts": 3, "part": 3}, r"part=3 must be an integer in \[0, 3\)"),
    ({"num_parts": 2, "part": 0, "max_docs": 5}, "max_docs=5 cannot be combined with num_parts=2"),
    ({"num_parts": 2, "part": 0, "max_tokens": 5}, "max_tokens=5 cannot be combined"),
])
def test_bad_part_settings(tmp_path, kw, msg):
    with pytest.raises(ConfigError, match=msg):
        tokenize_dataset("x.jsonl", tokenizer="t", out=str(tmp_path / "o"), **kw)


@pytest.mark.parametrize("kw, msg", [
    ({"parts": ()}, "no parts given"),
    ({"parts": ("a",), "out": ""}, "no output folder"),
    ({"parts": ("a",), "format": "bin"}, "format 'bin' is not supported"),
    ({"parts": ("a",), "shard_tokens": 0}, "shard_tokens=0 must be >= 1"),
])
def test_bad_merge_config(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        MergeConfig(**{"out": "o", **kw})


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_parts_and_merge(tmp_path, corpus, bpe_tokenizer, capsys):
    base = ["--tokenizer", str(bpe_tokenizer), "--shard-tokens", str(SHARD), "--quiet"]
    assert main(["tokenize", *corpus, "--out", str(tmp_path / "ref"), *base]) == 0
    for i in range(2):
        assert main(["tokenize", *corpus, "--out", str(tmp_path / f"p{i}"), "--num-parts", "2", "--part", str(i), *base]) == 0
        assert f"part {i} of 2" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "p1"), str(tmp_path / "p0"), "--out", str(tmp_path / "m")]) == 0
    assert "from 2 part(s), format npy" in capsys.readouterr().out
    assert_same_store(tmp_path / "ref", tmp_path / "m")
    # refusals are one line and exit 2, in the CLI's terms
    assert main(["merge", str(tmp_path / "p1"), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "part(s) 0 of 2 are missing" in err and "--num-parts 2 --part 0" in err
    assert main(["tokenize", *corpus, "--out", str(tmp_path / "x"), "--num-parts", "2", *base]) == 2
    assert "--num-parts 2 needs --part I too (0 <= I < 2): pass both, or neither" in capsys.readouterr().err
    assert main(["tokenize", *corpus, "--out", str(tmp_path / "x"), "--num-parts", "2", "--part", "0",
                 "--max-docs", "3", *base]) == 2
    assert "--max-docs 3 cannot be combined with --num-parts 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tokenize", *corpus, "--out", str(tmp_path / "x"), "--num-parts", "2", "--part", "-1", *base])


@pytest.mark.slow  # a benchmark at toy size; merged == one run is test_merge_equals_one_run's (fast lane)
def test_benchmark_parts_row_runs(tmp_path, corpus, bpe_tokenizer, capsys):
    # the benchmark's partitioned rows at toy size: they run, and the merged parts equal the single run
    from benchmarks import bench_tokenize

    assert bench_tokenize.main(["--source", *corpus, "--tokenizer", str(bpe_tokenizer), "--parts", "2",
                                "--parts-only", "--repeat", "1", "--out", str(tmp_path / "b")]) == 0
    r = json.loads((tmp_path / "b" / "bench_tokenize.json").read_text())["partitioned"]
    assert r["parts"] == 2 and r["tokens"] > 0 and r["seconds_parts"] > 0 and r["seconds_merge"] > 0
    assert "2 parts at once / one process" in capsys.readouterr().out
