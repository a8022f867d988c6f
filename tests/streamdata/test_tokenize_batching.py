"""Tokenize batches by text bytes, honest CLI reports, and blank lines/paragraphs skipped under
--sample-by line|paragraph."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from streamdata import ConfigError, SourceError, open_store, tokenize_dataset
from streamdata import source as source_mod
from streamdata import tokenize as tokenize_mod
from streamdata.cli import main
from streamdata.output import LEDGER_FILE
from streamdata.source import SourceSpec, load_source, utf8_len
from streamdata.writer import StoreWriter


def _texts(n: int = 120, seed: int = 0) -> list[str]:
    """Documents of very different sizes (1 byte to ~6 KB), non-ASCII included, and an empty one."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "é", "日本語", "🙂", "def", "(x)", "\t", "return"]
    out = [" ".join(rng.choice(words, size=int(rng.integers(1, 1200)) if i % 17 == 0 else int(rng.integers(1, 40))))
           for i in range(n)]
    out[5] = ""
    return out


def _jsonl(path: Path, texts) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return path


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("max_bytes,max_docs,skip", [(1, None, 0), (300, None, 0), (2000, None, 7), (2000, 4, 3), (1 << 30, None, 0)])
def test_batches_hold_whole_documents_within_the_byte_budget(tmp_path, streaming, max_bytes, max_docs, skip):
    texts = _texts()
    src = load_source(SourceSpec(paths=(str(_jsonl(tmp_path / "d.jsonl", texts)),), streaming=streaming))
    try:  # plan_rows/read_rows small: batches must also cross planning windows and read steps
        batches = list(src.batches(max_bytes, skip=skip, max_docs=max_docs, plan_rows=7, read_rows=5))
    finally:
        src.close()
    assert [t for b in batches for t in b] == texts[skip:]  # every document, in order, none split
    sizes = [[utf8_len(t) for t in b] for b in batches]
    for k, s in enumerate(sizes):
        assert len(s) == 1 or sum(s) <= max_bytes  # over the budget only as a single document
        assert max_docs is None or len(s) <= max_docs
        if k + 1 < len(sizes) and (max_docs is None or len(s) < max_docs):
            assert sum(s) + sizes[k + 1][0] > max_bytes  # greedy: the next document did not fit


def test_batching_never_changes_the_tokens(tmp_path, bpe_tokenizer):
    src = str(_jsonl(tmp_path / "d.jsonl", _texts(300, seed=1)))
    ref = tokenize_dataset(source=src, tokenizer=str(bpe_tokenizer), out=str(tmp_path / "ref"), shard_tokens=997)
    for i, kw in enumerate([{"batch_bytes": 1}, {"batch_bytes": 500}, {"batch_size": 3}, {"batch_bytes": 4000, "batch_size": 2},
                            {"batch_bytes": 700, "streaming": True}]):
        m = tokenize_dataset(source=src, tokenizer=str(bpe_tokenizer), out=str(tmp_path / f"o{i}"), shard_tokens=997, **kw)
        assert [s.sha256 for s in m.shards] == [s.sha256 for s in ref.shards] and m.totals == ref.totals


@pytest.mark.parametrize("kw,msg", [({"batch_bytes": 0}, "batch_bytes=0 must be >= 1"), ({"batch_size": 0}, "batch_size=0 must be >= 1")])
def test_bad_batch_settings(tmp_path, kw, msg, capsys):
    with pytest.raises(ConfigError, match=msg):
        tokenize_mod.TokenizeConfig(source="x.jsonl", tokenizer="t.json", out="o", **kw)
    flag = "--batch-bytes" if "batch_bytes" in kw else "--batch-size"
    with pytest.raises(SystemExit) as e:
        main(["tokenize", "x.jsonl", "--tokenizer", "t", "--out", str(tmp_path / "o"), flag, "0"])
    assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_count_words_in_slices_equals_lm_evals_formula():
    rng = np.random.default_rng(3)
    alphabet = list("ab é🙂") + ["\u3000", "\x1c", "\x85", "\xa0", "\n", "\t"]  # Unicode whitespace \s matches
    for slice_chars in (1, 2, 3, 7, 64):
        for _ in range(200):
            t = "".join(rng.choice(alphabet, size=int(rng.integers(0, 90))))
            assert tokenize_mod.count_words(t, slice_chars) == len(re.split(r"\s+", t)), (slice_chars, t)


def _mapping_rss_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc only")
def test_reading_does_not_keep_the_arrow_file_resident(tmp_path):
    # ~24 MB of text: before, every page read stayed in the resident set (RSS grew with the corpus)
    texts = [("x" * 1000 + "\n") * 24 + str(i) for i in range(1000)]
    src = load_source(SourceSpec(paths=(str(_jsonl(tmp_path / "big.jsonl", texts)),)))
    try:
        arrow = src.dataset.cache_files[0]["filename"]
        size_kb = Path(arrow).stat().st_size // 1024
        n = 0
        for batch in src.batches(1 << 20):
            n += len(batch)
            resident = _mapping_rss_kb(str(Path(arrow).resolve()))
            assert resident < size_kb // 4, f"{resident} kB of a {size_kb} kB Arrow file resident after {n} documents"
        assert n == len(texts)
    finally:
        src.close()


def test_drop_mapped_pages_leaves_writable_and_foreign_mappings(tmp_path):
    import mmap

    f = tmp_path / "w.bin"
    f.write_bytes(b"\0" * 8192)
    with open(f, "r+b") as fh:
        mm = mmap.mmap(fh.fileno(), 8192, flags=mmap.MAP_PRIVATE)  # a private writable copy: must survive
        mm[:5] = b"hello"
        assert source_mod.drop_mapped_pages([str(f)]) == 0
        assert mm[:5] == b"hello"
        mm.close()
    with open(f, "rb") as fh:
        ro = mmap.mmap(fh.fileno(), 8192, access=mmap.ACCESS_READ)
        assert source_mod.drop_mapped_pages([str(f)]) == 8192 and ro[:5] == b"\0" * 5  # reads fault back in
        ro.close()
    assert source_mod.drop_mapped_pages([str(tmp_path / "nothing-mapped")]) == 0


# ---- honest reports on the CLI -------------------------------------------------------------
def _crash_after(monkeypatch, calls: int):
    real = StoreWriter.add_documents
    seen = {"n": 0}

    def add(self, *a, **k):
        seen["n"] += 1
        if seen["n"] > calls:
            raise OSError("disk full (simulated)")
        return real(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "add_documents", add)


def test_resumed_build_reports_this_runs_rate(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    src = _jsonl(tmp_path / "d.jsonl", _texts(400, seed=2))
    out = tmp_path / "s"
    args = ["tokenize", str(src), "--tokenizer", str(bpe_tokenizer), "--out", str(out), "--shard-tokens", "500",
            "--batch-size", "20", "--quiet"]
    with monkeypatch.context() as mp:
        _crash_after(mp, 8)
        with pytest.raises(OSError, match="simulated"):
            main(args)
    before = json.loads((out / LEDGER_FILE).read_text())
    tokens_before = sum(s["tokens"] for s in before["shards"])
    assert tokens_before > 0
    capsys.readouterr()
    assert main(args) == 0
    line = capsys.readouterr().out.strip()
    with open_store(out) as s:
        total = len(s)
    m = re.search(r"resumed after ([\d,]+) tokens; this run: ([\d,]+) tokens in ([\d.]+) s, ([\d,]+) tok/s", line)
    assert m, line
    done_before, this_run = int(m[1].replace(",", "")), int(m[2].replace(",", ""))
    assert done_before == tokens_before and this_run == total - tokens_before
    assert f"{total:,} tokens" in line  # the store's total is still stated
    rate, secs = int(m[4].replace(",", "")), float(m[3])
    assert rate <= this_run / max(secs - 0.05, 1e-9) + 1  # the rate divides this run's tokens, not the total


def test_noop_rerun_says_complete_without_a_rate(tmp_path, bpe_tokenizer, capsys):
    src = _jsonl(tmp_path / "d.jsonl", _texts(30))
    args = ["tokenize", str(src), "--tokenizer", str(bpe_tokenizer), "--out", str(tmp_path / "s"), "--quiet"]
    assert main(args) == 0
    assert "tok/s" in capsys.readouterr().out
    assert main(args) == 0
    line = capsys.readouterr().out
    assert "already complete" in line and "tok/s" not in line and "nothing to do" in line


# ---- --sample-by line | paragraph: blank units are not documents -----------------------------
def test_sample_by_line_and_paragraph_skip_blank_units(tmp_path, bpe_tokenizer):
    text = "first line\n\n   \nsecond  line\n\t\n\n\nthird\n\n\n\n\nfourth para\nstill fourth\n"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n\nlast file line\n", encoding="utf-8")
    tok = Tokenizer.from_file(str(bpe_tokenizer))
    eos = tok.token_to_id("<|endoftext|>")
    for mode in ("line", "paragraph"):
        for streaming in (False, True):
            out = tmp_path / f"{mode}-{streaming}"
            m = tokenize_dataset(source=str(tmp_path / "*.txt"), tokenizer=str(bpe_tokenizer), out=str(out),
                                 sample_by=mode, streaming=streaming)
            with open_store(out) as s:
                docs = [s.document(i).astype(np.int64).tolist() for i in range(s.num_documents)]
            texts = [tok.decode(d[:-1]) for d in docs]
            assert all(len(d) > 1 and d[-1] == eos for d in docs), (mode, docs)  # no EOS-only document
            assert all(t.strip() for t in texts)
            if mode == "line":
                assert texts == ["first line", "second  line", "third", "fourth para", "still fourth", "last file line"]
            else:
                assert "".join(texts).split() == (text + "last file line").split()
            assert m.source["skip_blank"] is True
    # document mode keeps every row, even an empty one (it is the user's document)
    m = tokenize_dataset(source=str(_jsonl(tmp_path / "j.jsonl", ["a", "", "b"])), tokenizer=str(bpe_tokenizer),
                         out=str(tmp_path / "doc"))
    assert m.totals["documents"] == 3


def test_all_blank_lines_is_a_one_line_error(tmp_path, bpe_tokenizer, capsys):
    (tmp_path / "a.txt").write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"every line of .*a.txt' is blank \(no documents\): check the files or --sample-by"):
        tokenize_dataset(source=str(tmp_path / "a.txt"), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "o"), sample_by="line")
    assert main(["tokenize", str(tmp_path / "a.txt"), "--tokenizer", str(bpe_tokenizer), "--out", str(tmp_path / "o"),
                 "--sample-by", "line", "--quiet"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # datasets' bars go to stderr too
    assert len(errors) == 1 and errors[0].startswith("streamdata: error: every line of") and "is blank" in errors[0]
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_sample_by_line_resumes_exactly(tmp_path, bpe_tokenizer, monkeypatch):
    lines = [("" if i % 3 == 0 else f"line {i} " + "word " * (i % 11)) for i in range(600)]
    (tmp_path / "a.txt").write_text("\n".join(lines), encoding="utf-8")
    kw = dict(source=str(tmp_path / "a.txt"), tokenizer=str(bpe_tokenizer), sample_by="line", shard_tokens=300, batch_size=25)
    ref = tokenize_dataset(out=str(tmp_path / "ref"), **kw)
    with monkeypatch.context() as mp:
        _crash_after(mp, 6)
        with pytest.raises(OSError, match="simulated"):
            tokenize_dataset(out=str(tmp_path / "s"), **kw)
    m = tokenize_dataset(out=str(tmp_path / "s"), **kw)
    assert [s.sha256 for s in m.shards] == [s.sha256 for s in ref.shards]
    assert m.totals["documents"] == sum(1 for t in lines if t.strip())


def test_source_given_positionally(tmp_path, bpe_tokenizer):
    src = _jsonl(tmp_path / "d.jsonl", ["one doc", "two docs"])
    m = tokenize_dataset(str(src), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"))
    assert m.totals["documents"] == 2
    with pytest.raises(ConfigError, match="source given twice"):
        tokenize_dataset(str(src), source=str(src), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="takes a TokenizeConfig, a source or keywords, not int"):
        tokenize_dataset(3, tokenizer=str(bpe_tokenizer), out=str(tmp_path / "t"))
