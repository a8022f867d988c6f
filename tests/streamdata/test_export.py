"""export_store / ``streamdata export``: Megatron, nanoGPT and LitData files whose read-back (our own
readers, and the tools' own where installed) equals the source ids and document bounds exactly;
written through the output rules (rerun, overwrite by swap, foreign folders refused); a damaged
source is refused; bad inputs one line each."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from streamdata import ConfigError, StoreError, export_store, open_raw_bin, open_store
from streamdata.backends.memory import MemoryTokenStore
from streamdata.cli import main
from streamdata.convert import convert_store
from streamdata.output import EXPORT_MARKER
from tests.conftest import write_token_store

EOS = 999
TARGETS = ("megatron", "nanogpt", "litdata")


def _docs(seed=0, n=12):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, EOS, int(rng.integers(1, 300))).tolist() + [EOS] for _ in range(n)]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    docs = _docs()
    write_token_store(root / "npy", docs, shard_tokens=700)
    convert_store(root / "npy", root / "zarr", format="zarr", chunk_tokens=256, chunks_per_shard=2)
    return root, docs


def _read_back(rec, to):
    """The export opened with our readers (nanoGPT keeps no document index: documents from the EOS ids)."""
    return open_store(rec.data_path, **({"eos_id": EOS} if to == "nanogpt" else {}))


@pytest.mark.parametrize("to", TARGETS)
@pytest.mark.parametrize("kind", ["npy", "zarr"])
def test_round_trip_equals_source(sources, tmp_path, kind, to):
    root, docs = sources
    with open_store(root / kind) as src:
        rec = export_store(src, tmp_path / "out", to, chunk_bytes=500)  # several litdata chunks
        want_ids, want_off = src.read(0, len(src)), np.asarray(src.doc_offsets)
    with _read_back(rec, to) as back:
        np.testing.assert_array_equal(back.read(0, len(back)), want_ids)
        np.testing.assert_array_equal(np.asarray(back.doc_offsets), want_off)
    expected_files = {"megatron": {"tokens.bin", "tokens.idx"}, "nanogpt": {"train.bin"}}.get(to)
    names = set(os.listdir(tmp_path / "out"))
    if expected_files is None:
        assert "index.json" in names and sum(n.startswith("chunk-0-") for n in names) > 1
        expected_files = names - {EXPORT_MARKER}
    assert names == expected_files | {EXPORT_MARKER}  # no ledger, lock or partial file left
    assert rec.dtype == "uint16"  # vocab 1000 < 65500: megatron-core chooses uint16 too
    assert (rec.tokens, rec.documents) == (len(want_ids), len(docs))


@pytest.mark.parametrize("to", TARGETS)
def test_stream_store_without_documents(tmp_path, to):
    ids = np.arange(5000, dtype=np.uint32) % 70000  # no vocabulary, 32-bit ids: one document
    ids[-1] = 3
    src = MemoryTokenStore(ids if to != "nanogpt" else ids % 60000)
    rec = export_store(src, tmp_path / "out", to, chunk_bytes=1 << 12)
    with open_store(rec.data_path) as back:
        np.testing.assert_array_equal(back.read(0, len(back)), src.read(0, len(src)))
        np.testing.assert_array_equal(np.asarray(back.doc_offsets), [0, len(src)])
    assert rec.dtype == {"megatron": "int32", "nanogpt": "uint16", "litdata": src.dtype.name}[to]


def test_rerun_finds_it_and_overwrite_swaps(sources, tmp_path):
    root, _ = sources
    out = tmp_path / "out"
    rec = export_store(root / "npy", out, "litdata")
    before = (out / EXPORT_MARKER).read_bytes()
    again = export_store(root / "npy", out, "litdata")  # same settings: nothing to do
    assert (out / EXPORT_MARKER).read_bytes() == before and again.files == rec.files
    with pytest.raises(ConfigError, match="already holds a finished store: pass --overwrite"):
        export_store(root / "npy", out, "litdata", chunk_bytes=300)
    export_store(root / "npy", out, "litdata", chunk_bytes=300, overwrite=True)
    assert len([n for n in os.listdir(out) if n.startswith("chunk-")]) > 1
    assert sorted(n for n in os.listdir(tmp_path) if n != "out") == []  # no -new/-old/lock left
    with pytest.raises(ConfigError, match="holds files streamdata did not write"):
        (out / "notes.txt").write_text("mine")
        export_store(root / "npy", out, "litdata", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_foreign_folder_refused_and_untouched(sources, tmp_path):
    root, _ = sources
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.bin").write_bytes(b"\x01\x00")  # someone's own nanoGPT file
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match="is not a store or build of streamdata"):
            export_store(root / "npy", out, "nanogpt", overwrite=overwrite)
    assert (out / "train.bin").read_bytes() == b"\x01\x00"


def test_damaged_source_refused_nothing_sealed(sources, tmp_path):
    root, _ = sources
    import shutil

    shutil.copytree(root / "npy", tmp_path / "src")
    shard = tmp_path / "src" / "shards" / "tokens-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1  # an id that is still < vocab: only the checksum sees it
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"does not match its checksum .* then rerun the export"):
        export_store(tmp_path / "src", tmp_path / "out", "megatron")
    assert not (tmp_path / "out").exists()  # nothing left looking complete


def test_nanogpt_refuses_large_vocab_and_large_ids(tmp_path):
    big = MemoryTokenStore(np.array([1, 2, 3], np.uint32), vocab_size=100000)
    with pytest.raises(ConfigError, match=r"vocabulary of 100000 ids does not fit nanoGPT's uint16 .* --to megatron"):
        export_store(big, tmp_path / "a", "nanogpt")
    wide = MemoryTokenStore(np.array([1, 70000, 3], np.uint32))  # vocabulary unknown: each id checked
    with pytest.raises(StoreError, match=r"token id 70000 at token 1, which uint16 cannot hold"):
        export_store(wide, tmp_path / "b", "nanogpt")
    assert not (tmp_path / "b").exists()


def test_cli_export_and_one_line_errors(sources, tmp_path, capsys):
    root, docs = sources
    assert main(["export", str(root / "npy"), "--to", "megatron", str(tmp_path / "m")]) == 0
    assert "give the tool" in capsys.readouterr().out
    with open_store(tmp_path / "m" / "tokens") as back:
        assert back.num_documents == len(docs)
    raw = tmp_path / "ids.bin"
    raw.write_bytes(np.array([1, 2, EOS, 4, EOS], "<u2").tobytes())
    assert main(["export", str(raw), "--eos-id", str(EOS), "--to", "litdata", str(tmp_path / "l")]) == 0
    with open_store(tmp_path / "l") as back:
        assert back.read(0, 5).tolist() == [1, 2, EOS, 4, EOS] and list(back.doc_offsets) == [0, 3, 5]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["export", str(root / "npy"), "--to", "parquet", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'parquet'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown export format 'parquet'"):
        export_store(root / "npy", tmp_path / "x", "parquet")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("x")
    assert main(["export", str(root / "npy"), "--to", "nanogpt", str(tmp_path / "mine")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is not a store or build of streamdata" in err


def test_megatron_reader_of_megatron_core(sources, tmp_path):
    core = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    root, docs = sources
    rec = export_store(root / "npy", tmp_path / "m", "megatron")
    ds = core.IndexedDataset(rec.data_path)
    assert len(ds) == len(docs) and [ds[i].tolist() for i in range(len(docs))] == docs
    ids = (np.arange(1000, dtype=np.uint32) * 977) % 100000  # no vocabulary: int32, as megatron-core chooses
    rec = export_store(MemoryTokenStore(ids, doc_offsets=[0, 10, 10, 600, 1000]), tmp_path / "w", "megatron")
    ds = core.IndexedDataset(rec.data_path)
    assert rec.dtype == "int32" and ds.index.dtype == np.int32 and [len(ds[i]) for i in range(4)] == [10, 0, 590, 400]
    assert np.concatenate([ds[i] for i in range(4)]).tolist() == ids.tolist()


def test_litdata_reader_of_litdata(sources, tmp_path):
    litdata = pytest.importorskip("litdata")
    root, docs = sources
    rec = export_store(root / "npy", tmp_path / "l", "litdata", chunk_bytes=1 << 20)  # one chunk
    ds = litdata.StreamingDataset(rec.data_path, item_loader=litdata.TokensLoader(block_size=1))
    assert [int(ds[i][0]) for i in range(len(ds))] == [t for d in docs for t in d]


def test_index_json_fields(sources, tmp_path):
    root, _ = sources
    rec = export_store(root / "npy", tmp_path / "l", "litdata", chunk_bytes=500)
    d = json.loads((tmp_path / "l" / "index.json").read_bytes())
    assert d["config"]["item_loader"] == "TokensLoader" and d["config"]["data_format"] == ["no_header_numpy:5"]
    assert sum(c["dim"] for c in d["chunks"]) == rec.tokens and sum(c["chunk_size"] for c in d["chunks"]) == rec.documents
    for c in d["chunks"]:
        assert c["chunk_bytes"] == (tmp_path / "l" / c["filename"]).stat().st_size
        assert c["chunk_size"] == 1 or c["dim"] * 2 <= 500  # whole documents up to chunk_bytes of ids


def test_killed_export_is_ours_and_a_rerun_finishes_it(sources, tmp_path, monkeypatch):
    """A process killed mid-export leaves the ledger, a finished .bin and a partial .idx: the folder
    stays ours (a rerun finishes it; with other settings it asks for --overwrite), and is never sealed."""
    from streamdata import export as ex
    from streamdata.output import Output

    root, docs = sources
    out = tmp_path / "out"
    real_finish = ex._Sink.finish

    def killed(self):
        if self.name.endswith(".idx"):
            raise KeyboardInterrupt  # stands in for kill -9: below, abort is what a dead process never runs
        return real_finish(self)

    # Fault injection, so a patch (no seam): the kill must land between two files' finish steps, as
    # a real kill would; the export has no hook there and should not grow one for tests.
    monkeypatch.setattr(ex._Sink, "finish", killed)
    monkeypatch.setattr(Output, "abort", lambda self: self.release())
    with pytest.raises(KeyboardInterrupt):
        export_store(root / "npy", out, "megatron")
    monkeypatch.undo()
    assert {"_build", "tokens.bin", "tokens.idx.partial"} <= set(os.listdir(out)) and not (out / EXPORT_MARKER).exists()
    with pytest.raises(ConfigError, match="unfinished build made with other settings"):
        export_store(root / "npy", out, "nanogpt")
    rec = export_store(root / "npy", out, "megatron")
    assert set(os.listdir(out)) == {"tokens.bin", "tokens.idx", EXPORT_MARKER}
    with open_store(rec.data_path) as back:
        assert back.num_documents == len(docs) and back.read(0, len(back)).tolist() == [t for d in docs for t in d]


@pytest.mark.parametrize("to,opens", [("megatron", "tokens"), ("nanogpt", "train.bin")])
def test_opening_the_export_folder_names_the_file(tmp_path, to, opens):
    export_store(MemoryTokenStore(np.arange(10, dtype=np.uint16)), tmp_path / "out", to)
    with pytest.raises(StoreError, match=f"is a streamdata export of .* not a store: open '.*/out/{opens}'"):
        open_store(tmp_path / "out")
