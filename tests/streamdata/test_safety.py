"""Safety of the write side: index checksums recorded by every writer, ownership of output
folders, one writer per folder, overwrite by swap, resume identity, one-line errors, no leftovers."""

from __future__ import annotations

import re

import numpy as np
import pytest

from streamdata import open_store
from streamdata.backends.zarr import write_zarr_store
from streamdata.format import FORMAT_VERSION, index_sha256, read_manifest


def _index_arrays(store):
    return {"doc_offsets": store.doc_offsets, "doc_bytes": store.doc_bytes, "doc_words": store.doc_words}


@pytest.mark.parametrize("fmt", ["npy", "zarr"])
def test_every_writer_records_index_checksums(make_store, tmp_path, fmt):
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], []]
    root = make_store(docs, nbytes=[3, 1, 9, 0], nwords=[1, 1, 2, 0])
    if fmt == "zarr":
        with open_store(root) as src:
            write_zarr_store(src, tmp_path / "z", chunk_tokens=4, chunks_per_shard=2)
        root = tmp_path / "z"
    m = read_manifest(root)
    assert m.format_version == FORMAT_VERSION == 3
    assert [x.name for x in m.index] == ["doc_offsets", "doc_bytes", "doc_words"]
    with open_store(root) as s:
        arrays = _index_arrays(s)
        for info in m.index:
            assert info.length == len(arrays[info.name])
            assert info.sha256 == index_sha256(np.asarray(arrays[info.name]))
            assert (root / info.file).exists()
    assert [x.file for x in m.index] == (
        ["index/doc_offsets.npy", "index/doc_bytes.npy", "index/doc_words.npy"] if fmt == "npy"
        else ["doc_offsets", "doc_bytes", "doc_words"])


# ---- helpers ---------------------------------------------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from streamdata import ConfigError, SourceError, StoreError, tokenize_dataset  # noqa: E402
from streamdata.cli import main  # noqa: E402
from streamdata.format import MANIFEST_NAME  # noqa: E402
from streamdata.verify import verify_store  # noqa: E402

from ..conftest import CORPUS  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path):
    return _jsonl(tmp_path / "corpus.jsonl", CORPUS * 5)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tokenize_cli(src, tok, out, *extra) -> list[str]:
    return ["tokenize", str(src), "--tokenizer", str(tok), "--out", str(out), "--quiet", *map(str, extra)]


def _one_line_error(capsys, *needles):
    """Our error is one line, the last on stderr (datasets may print its own progress/log lines before)."""
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("streamdata: error: ") and err.count("streamdata: error:") == 1, err
    for n in needles:
        assert n in last, err
    return last


# ---- defect 1: only our own markers make a folder ours ---------------------------------------------
@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_build_folder_is_never_taken(tmp_path, corpus, bpe_tokenizer, capsys, overwrite):
    """Repro: ``mkdir -p docs/_build/html`` + a file, then tokenize --out docs: refused, docs/_build kept."""
    docs = tmp_path / "docs"
    (docs / "_build" / "html").mkdir(parents=True)
    (docs / "_build" / "html" / "index.html").write_text("<html>my docs</html>")
    before = _tree(docs)
    rc = main(_tokenize_cli(corpus, bpe_tokenizer, docs, *(["--overwrite"] if overwrite else [])))
    assert rc == 2
    _one_line_error(capsys, "is not a store or build of streamdata", "never deleted")
    assert _tree(docs) == before and sorted(p.name for p in docs.iterdir()) == ["_build"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "docs"]  # no lock file left beside


def test_foreign_manifest_with_overwrite_loses_nothing(tmp_path, corpus, bpe_tokenizer, capsys):
    site = tmp_path / "site"
    site.mkdir()
    (site / MANIFEST_NAME).write_text(json.dumps({"name": "my web app", "icons": []}))
    (site / "app.js").write_text("console.log(1)")
    before = _tree(site)
    assert main(_tokenize_cli(corpus, bpe_tokenizer, site, "--overwrite")) == 2
    _one_line_error(capsys, "not a store or build of streamdata")
    assert _tree(site) == before


def test_our_store_holding_foreign_files_is_not_overwritten(tmp_path, corpus, bpe_tokenizer, capsys):
    out = tmp_path / "s"
    m = tokenize_dataset(source=str(corpus), tokenizer=str(bpe_tokenizer), out=str(out))
    (out / "notes.txt").write_text("my notes about this corpus")
    (out / "shards" / "extra.bin").write_bytes(b"\0\1")
    before = _tree(out)
    assert main(_tokenize_cli(corpus, bpe_tokenizer, out, "--overwrite", "--max-docs", 3)) == 2
    _one_line_error(capsys, "holds files streamdata did not write", "notes.txt")
    assert _tree(out) == before
    with open_store(out) as s:
        assert s.manifest.totals == m.totals


# ---- defect 5: one writer per folder ---------------------------------------------------------------
def test_second_writer_fails_at_once_and_a_crash_releases_the_lock(tmp_path, corpus, bpe_tokenizer, capsys):
    out = tmp_path / "s"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from streamdata.output import lock_output; l = lock_output(sys.argv[1]); "
                               "print('locked', flush=True); sys.stdin.read()", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_tokenize_cli(corpus, bpe_tokenizer, out)) == 2
        _one_line_error(capsys, "is being written by another process")
        assert not out.exists()
        holder.kill()  # SIGKILL: the OS releases the flock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert main(_tokenize_cli(corpus, bpe_tokenizer, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "s"]  # the stale lock file is gone too


# ---- defect 6: overwrite builds beside and swaps only when sealed -----------------------------------
def test_failed_overwrite_keeps_the_old_store(tmp_path, bpe_tokenizer, corpus):
    import datasets

    out = tmp_path / "s"
    old = tokenize_dataset(source=str(corpus), tokenizer=str(bpe_tokenizer), out=str(out))
    before = _tree(out)
    texts = ["fine text number %d" % i for i in range(40)]
    texts[30] = None  # a bad row after several finished shards
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(SourceError, match="row 30"):
        tokenize_dataset(source=str(tmp_path / "bad.parquet"), tokenizer=str(bpe_tokenizer), out=str(out),
                         overwrite=True, batch_size=5, shard_tokens=20)
    assert _tree(out) == before
    with open_store(out) as s:
        assert s.manifest.totals == old.totals
    assert verify_store(out).ok
    # the same overwrite with a good source resumes the replacement beside it, then swaps it in
    texts[30] = "fixed"
    datasets.Dataset.from_dict({"text": texts}).to_parquet(str(tmp_path / "good.parquet"))
    m = tokenize_dataset(source=str(tmp_path / "good.parquet"), tokenizer=str(bpe_tokenizer), out=str(out),
                         overwrite=True, batch_size=5, shard_tokens=20)
    with open_store(out) as s:
        assert s.manifest.totals == m.totals and m.totals["documents"] == 40
    assert verify_store(out).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.parquet", "corpus.jsonl", "good.parquet", "s"]


# ---- defect 7: resume checks the source files' content, not path and size --------------------------
def test_source_edited_in_place_to_the_same_size_is_not_resumed(tmp_path, bpe_tokenizer, monkeypatch):
    from streamdata import output as output_mod

    src = _jsonl(tmp_path / "d.jsonl", [f"document number {i:03d} alpha beta" for i in range(60)])
    kw = dict(source=str(src), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"), shard_tokens=30, batch_size=7)

    def crash(*a, **k):
        raise OSError("killed (simulated)")

    with monkeypatch.context() as mp:
        mp.setattr(output_mod.Output, "seal", crash)
        with pytest.raises(OSError, match="simulated"):
            tokenize_dataset(**kw)
    st = src.stat()
    data = src.read_bytes()
    src.write_bytes(data.replace(b"number 001", b"number 999"))  # same size, other text
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime: only the content tells
    assert src.stat().st_size == st.st_size
    with pytest.raises(SourceError, match=r"source changed since the build started .*d\.jsonl.*: rerun with --overwrite"):
        tokenize_dataset(**kw)
    m = tokenize_dataset(overwrite=True, **kw)
    with open_store(tmp_path / "s") as s:
        assert s.num_documents == 60 == m.totals["documents"]


# ---- defect 8: one line instead of a traceback -----------------------------------------------------
@pytest.mark.parametrize("name,data", [("bad.jsonl", b'{"text": "ok"}\n{"text": "unterminated\n'),
                                       ("bad.txt", b"fine line\n\xff\xfe not utf-8 \x80\n")])
def test_streaming_over_malformed_input(tmp_path, bpe_tokenizer, capsys, name, data):
    (tmp_path / name).write_bytes(data)
    out = tmp_path / "o"
    assert main(_tokenize_cli(tmp_path / name, bpe_tokenizer, out, "--streaming", "--sample-by", "line")) == 2
    _one_line_error(capsys, name)
    assert not out.exists()


@pytest.mark.parametrize("field,value,needle", [("tokenizer", {"vocab_size": "big"}, "tokenizer.vocab_size"),
                                                ("totals", [1, 2], "'totals'"),
                                                ("shards", [{"file": 3}], "shards[0].file")])
def test_manifest_fields_are_type_checked(make_store, capsys, field, value, needle):
    root = make_store([[1, 2, 3], [4, 5]])
    d = json.loads((root / MANIFEST_NAME).read_text())
    d[field] = {**d[field], **value} if isinstance(value, dict) else value
    (root / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(StoreError, match=re.escape(needle)) as e:
        open_store(root)
    assert "\n" not in str(e.value)
    assert main(["info", str(root)]) == 2
    _one_line_error(capsys, needle)


def test_unwritable_out(tmp_path, corpus, bpe_tokenizer, make_store, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(_tokenize_cli(corpus, bpe_tokenizer, blocker / "store")) == 2
    _one_line_error(capsys, "choose a writable output")
    assert main(["convert", str(make_store([[1, 2]])), str(blocker / "conv")]) == 2
    _one_line_error(capsys, "choose a writable output")
    assert main(_tokenize_cli(corpus, bpe_tokenizer, blocker)) == 2  # --out is a file
    _one_line_error(capsys, "is not a folder")
    assert blocker.read_text() == "x"


# ---- defect 9: leftovers ---------------------------------------------------------------------------
def test_failed_build_leaves_nothing_when_nothing_finished(tmp_path, bpe_tokenizer):
    import datasets

    datasets.Dataset.from_dict({"text": ["ok", None, "ok"]}).to_parquet(str(tmp_path / "b.parquet"))
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(SourceError, match="row 1"):
            tokenize_dataset(source=str(tmp_path / "b.parquet"), tokenizer=str(bpe_tokenizer), out=str(out))
        assert list(out.iterdir()) == [] if out.exists() else out.name == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.parquet", "empty"]


def test_local_files_leave_no_arrow_copy_in_the_datasets_cache(tmp_path, corpus, bpe_tokenizer, monkeypatch):
    import datasets

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    tokenize_dataset(source=str(corpus), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "s"))
    tokenize_dataset(source=str(corpus), tokenizer=str(bpe_tokenizer), out=str(tmp_path / "z"), format="zarr")
    assert not [p for p in cache.rglob("*.arrow")]
    with open_store(tmp_path / "s") as s:
        assert s.num_documents == len(CORPUS) * 5


# ---- defect 10: the CLI's choices are the library's --------------------------------------------------
def test_cli_choices_come_from_the_library():
    from streamdata.backends.raw_bin import RAW_DTYPES
    from streamdata.backends.zarr import COMPRESSIONS
    from streamdata.cli import build_parser
    from streamdata.format import STORE_FORMATS

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    opts = {(verb, a.dest): a for verb in ("tokenize", "convert") for a in sub[verb]._actions}
    assert tuple(opts["convert", "dtype"].choices) == RAW_DTYPES
    for verb in ("tokenize", "convert"):
        assert tuple(opts[verb, "format"].choices) == STORE_FORMATS
        assert tuple(opts[verb, "compression"].choices) == COMPRESSIONS
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "a.bin", "out", "--dtype", "int32"])


def test_damaged_ledger_of_ours_is_refused_then_cleared_by_overwrite(tmp_path, corpus, bpe_tokenizer, monkeypatch):
    from streamdata import output as output_mod
    from streamdata.output import LEDGER_FILE

    out = tmp_path / "s"
    kw = dict(source=str(corpus), tokenizer=str(bpe_tokenizer), out=str(out), shard_tokens=50, batch_size=4)
    with monkeypatch.context() as mp:
        mp.setattr(output_mod.Output, "seal", lambda *a: (_ for _ in ()).throw(OSError("killed (simulated)")))
        with pytest.raises(OSError):
            tokenize_dataset(**kw)
    ledger = json.loads((out / LEDGER_FILE).read_text())
    ledger["shards"][0]["tokens"] = "many"
    (out / LEDGER_FILE).write_text(json.dumps(ledger))
    with pytest.raises(StoreError, match=r"build ledger .* is damaged .*pass --overwrite"):
        tokenize_dataset(**kw)
    assert tokenize_dataset(overwrite=True, **kw).totals["documents"] == len(CORPUS) * 5
