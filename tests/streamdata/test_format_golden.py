"""Golden fixtures: token files written by the real tools (datatrove's ``DocumentTokenizer``, LitData's
``optimize(..., item_loader=TokensLoader())``), read in place by our readers and compared, id by id and
document bound by bound, with what was fed to the tool (each fixture folder's ``record.json``; how the
files were made: ``data/README.md``). The other format tests write the layouts themselves from the
tools' source; these catch a reading of that source that the real tool does not match."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from streamdata import StoreError, open_datatrove, open_litdata, open_store
from streamdata.backends.datatrove import DatatroveTokenStore
from streamdata.backends.litdata import LitdataTokenStore

from .test_format_datatrove import _flat, cli_round_trip
from .test_imports import _check_store

DATA = Path(__file__).parent / "data"
DATATROVE = DATA / "datatrove-0.10.1"
LITDATA = DATA / "litdata-0.2.76"


def _record(folder: Path) -> dict:
    return json.loads((folder / "record.json").read_text(encoding="utf-8"))


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and its digest: reading a fixture must leave it exactly as the tool wrote it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fixtures_are_what_the_records_say():
    dt, ld = _record(DATATROVE), _record(LITDATA)
    assert (dt["tool"], dt["version"]) == ("datatrove", DATATROVE.name.split("-", 1)[1])
    assert (ld["tool"], ld["version"]) == ("litdata", LITDATA.name.split("-", 1)[1])
    assert sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file()) < 50_000  # tiny, committed


# ---- datatrove ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bpe-u16", "words-u32"])
def test_datatrove_golden(tmp_path, capsys, name):
    rec = _record(DATATROVE)["outputs"][name]
    folder = DATATROVE / name
    before = _snapshot(folder)
    # the documents in file order: the inputs (each encoded with datatrove's tokenizer and EOS) in the
    # order datatrove's shuffle put them (unshuffled: input order)
    docs = [rec["ids_per_input_document"][i] for i in rec["input_document_order_in_files"]]
    flat, offsets = _flat(docs)
    fdt = {2: np.uint16, 4: np.uint32}[rec["token_size"]]
    for s in (open_store(folder), open_datatrove(folder, vocab_size=rec["vocab_size"])):
        with s:
            assert isinstance(s, DatatroveTokenStore) and s.dtype == fdt
            _check_store(s, flat.astype(fdt), offsets)
            assert s.manifest.tokenizer["name"] == rec["tokenizer_file"]  # from .ds.metadata "NAME|SIZE"
            assert s.manifest.source["token_size"] == rec["token_size"]
    # what datatrove's own reader saw: every token of the folder (DatatroveFolderDataset, seq_len=0), and
    # each file as one window with positions restarting where its .ds.index starts a document
    seen = rec["datatrove_read_back"]
    assert seen["folder_seq_len_0"] == flat.tolist()
    windows = {w["file"]: w for w in seen["files_whole_window"]}
    # each .ds file alone holds the next documents of that order (datatrove splits at max_tokens_per_file;
    # the last split file of bpe-u16 is empty: 0 bytes, an empty index)
    files = sorted(folder.glob("*.ds"))
    assert sorted(windows) == [f.name for f in files]
    at = 0
    for f in files:
        with open_store(f) as s:
            got = [s.document(i).tolist() for i in range(s.num_documents)]
        assert got == docs[at : at + len(got)], f.name
        at += len(got)
        w = windows[f.name]
        assert w["input_ids"] == [t for d in got for t in d]
        if all(got):  # datatrove 0.10.1 misplaces positions after an empty document (data/README.md)
            assert w["positions"] == [j for d in got for j in range(len(d))]
    assert at == len(docs)
    info = cli_round_trip(folder, tmp_path, capsys, flat, offsets)
    assert rec["tokenizer_file"] in info
    assert _snapshot(folder) == before


# ---- LitData --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,fdt", [("tensor-int32", np.uint32), ("numpy-uint16", np.uint16),
                                      ("tensor-int64", np.uint32), ("tensor-int32-empty-item", np.uint32)])
def test_litdata_golden(tmp_path, capsys, name, fdt):
    rec = _record(LITDATA)["outputs"][name]
    folder = LITDATA / name
    before = _snapshot(folder)
    items = rec["items"]
    flat, offsets = _flat(items)
    # what LitData itself streamed back from this folder (StreamingDataset, TokensLoader(block_size=1))
    assert rec["litdata_read_back_block_size_1"] == flat.tolist()
    for s in (open_store(folder), open_litdata(folder)):
        with s:
            assert isinstance(s, LitdataTokenStore) and s.dtype == fdt
            _check_store(s, flat.astype(fdt), offsets)  # one document per item
            chunks = json.loads((folder / "index.json").read_text())["chunks"]
            assert [sh.file for sh in s.manifest.shards] == [c["filename"] for c in chunks]
    if name != "tensor-int32-empty-item":
        assert len(chunks) >= 2  # items over several chunks
    cli_round_trip(folder, tmp_path, capsys, flat, offsets)
    assert _snapshot(folder) == before


def test_litdata_index_without_chunks_is_refused_as_such():
    """LitData 0.2.76 wrote this folder with exit 0 (an empty item stopped its chunk cutting, data/README.md):
    index.json lists no chunks and its config is null. Refused, saying so, not as "not a LitData index"."""
    folder = LITDATA / "empty-item-loses-chunks"
    before = _snapshot(folder)
    with pytest.raises(StoreError, match=r"index\.json' lists no chunks .*re-run optimize") as e:
        open_store(folder)
    assert "\n" not in str(e.value)
    assert _snapshot(folder) == before
