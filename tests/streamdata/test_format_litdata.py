"""LitData token folders (``optimize(..., item_loader=TokensLoader())``), written here from LitData's
layout (``streaming/writer.py`` ``BinaryWriter._create_chunk``, ``TokensLoader.encode_data``, the
``index.json`` of ``write_chunks_index``/merge), not from our reader, and read back through every
TokenStore operation and the CLI; a chunk file is never read as raw ids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from streamdata import ConfigError, StoreError, open_litdata, open_raw_bin, open_store
from streamdata.backends.litdata import LitdataTokenStore

from .test_format_datatrove import _flat, _refused, cli_round_trip
from .test_imports import _check_store

# LitData constants.py dtype tables, as its serializers record them (torch.int32 is torch.int: key 16)
TENSOR_CODES = {"uint8": 11, "int16": 14, "int32": 16, "int64": 18, "uint16": 20, "float32": 1}
NUMPY_CODES = {"int8": 0, "int16": 1, "int32": 2, "int64": 3, "uint8": 4, "uint16": 5, "uint32": 6, "uint64": 7}


def write_litdata(folder: Path, items, dtype: str = "int32", *, per_chunk: int = 3, serializer: str = "no_header_tensor",
                  old_chunk_bytes: bool = False, config: dict | None = None) -> Path:
    """``items`` (lists of ids) as LitData writes them: chunks of ``per_chunk`` items, each chunk =
    uint32 count, uint32 offsets (from the header's end to the file's), the items' raw ids; index.json
    with the chunk list and the config. ``old_chunk_bytes``: record the items' bytes (older LitData)
    instead of the chunk's size."""
    folder.mkdir(parents=True, exist_ok=True)
    codes = TENSOR_CODES if serializer == "no_header_tensor" else NUMPY_CODES
    dt = np.dtype(dtype).newbyteorder("<")
    chunks = []
    for k, lo in enumerate(range(0, len(items), per_chunk)):
        group = [np.asarray(x, dt).tobytes() for x in items[lo : lo + per_chunk]]
        num_items = np.uint32(len(group))
        offsets = np.array([0] + [len(g) for g in group]).cumsum().astype(np.uint32)
        offsets += len(num_items.tobytes()) + len(offsets.tobytes())
        data = num_items.tobytes() + offsets.tobytes() + b"".join(group)
        name = f"chunk-0-{k}.bin"
        (folder / name).write_bytes(data)
        dims = [len(x) for x in items[lo : lo + per_chunk]]
        chunks.append({"chunk_bytes": sum(len(g) for g in group) if old_chunk_bytes else len(data),
                       "chunk_size": len(group), "dim": sum(dims) if dims[0] else None, "filename": name})
    cfg = {"chunk_bytes": 1 << 26, "chunk_size": None, "compression": None,
           "data_format": [f"{serializer}:{codes[dtype]}"],
           "data_spec": '[1, {"type": null, "context": null, "children_spec": []}]', "encryption": None,
           "item_loader": "TokensLoader"} | (config or {})
    (folder / "index.json").write_text(json.dumps({"chunks": chunks, "config": cfg, "updated_at": "1764950000.0"},
                                                  sort_keys=True))
    return folder


def _items(seed: int, n: int, vocab: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    items = [rng.integers(0, vocab, int(rng.integers(1, 150))).tolist() for _ in range(n)]
    items[0] = []  # an empty first item: LitData then records dim null for its chunk
    items[n // 2] = []
    return items


# ---- reading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("serializer,dtype", [("no_header_tensor", "int32"), ("no_header_tensor", "uint16"),
                                              ("no_header_tensor", "int64"), ("no_header_numpy", "uint32"),
                                              ("no_header_numpy", "int16")])
def test_items_read_back_as_documents(tmp_path, serializer, dtype):
    items = _items(1, 14, 30000)
    root = write_litdata(tmp_path / "opt", items, dtype, serializer=serializer, per_chunk=4)
    flat, offsets = _flat(items)
    for s in (open_store(root), open_litdata(root)):
        with s:
            assert isinstance(s, LitdataTokenStore) and s.manifest.format == "litdata"
            assert s.dtype == np.dtype("<u2" if np.dtype(dtype).itemsize <= 2 else "<u4")
            _check_store(s, flat, offsets)  # one document per item, empty ones included
            assert [sh.file for sh in s.manifest.shards] == [f"chunk-0-{k}.bin" for k in range(4)]
            src = s.manifest.source
            assert src["file_dtype"] == dtype and src["items"] == 14 and src["documents"] == "one per LitData item"
            assert [Path(f["path"]).name for f in src["files"]][:2] == ["index.json", "chunk-0-0.bin"]
            # ids with the store's bytes (uint16, int32/uint32 -> uint32) are zero-copy views of the chunk
            assert (s.view(0, 1) is not None) == (dtype in ("uint16", "int32", "uint32"))
    with open_litdata(root, vocab_size=30000) as s:  # a known vocabulary picks the smallest dtype
        assert s.dtype == np.dtype("<u2") and s.vocab_size == 30000
        np.testing.assert_array_equal(s.read(0, len(s)), flat)


def test_older_chunk_bytes_and_no_item_loader_field(tmp_path):
    items = _items(2, 7, 1000)
    cfg = {"item_loader": None}  # versions before it was recorded
    root = write_litdata(tmp_path / "old", items, old_chunk_bytes=True, config=cfg)
    with open_store(root) as s:
        _check_store(s, *_flat(items))


def test_info_verify_convert_round_trip(tmp_path, capsys):
    items = _items(3, 10, 1000)
    root = write_litdata(tmp_path / "opt", items)
    info = cli_round_trip(root, tmp_path, capsys, *_flat(items))
    assert "format litdata" in info and "(4 chunk(s), no_header_tensor:16): int32 ids (recorded in index.json)" in info
    assert "documents: one per LitData item (10 items)" in info and "tokens     " in info and "(uint32)" in info


# ---- a chunk is never garbage -----------------------------------------------------------------------
def test_a_chunk_file_is_refused_not_read_as_raw_ids(tmp_path):
    items = [[1, 2, 3], [70000, 5], [6]]
    root = write_litdata(tmp_path / "opt", items)
    chunk = root / "chunk-0-0.bin"
    _refused(StoreError, chunk, r"'.*chunk-0-0.bin' is a chunk of the LitData dataset '.*opt' \(listed in its "
             r"index.json; a header, then ids\): open the folder instead")
    _refused(StoreError, root / "index.json", r"is the index of the LitData dataset '.*opt': open the folder instead")
    alone = tmp_path / "copied" / "chunk-0-0.bin"  # copied away from its index.json: the header still says it
    alone.parent.mkdir()
    alone.write_bytes(chunk.read_bytes())
    _refused(StoreError, alone, r"has the layout of a LitData chunk \(3 items: a uint32 count and offsets that end at "
             r"its size\) without its index.json")
    _refused(StoreError, alone, "layout of a LitData chunk", dtype="uint32")  # a dtype does not make it raw ids
    with open_raw_bin(alone, dtype="uint32") as s:  # only naming the raw reader does: the header comes first
        assert s.read(0, 1).tolist() == [3]


# ---- refusals: one line each ----------------------------------------------------------------------
@pytest.mark.parametrize("config,match", [
    ({"compression": "zstd"}, r"the chunks are compressed \(compression='zstd'\), which this reader does not undo"),
    ({"encryption": {"algorithm": "fernet", "level": "chunk"}}, r"the chunks are encrypted"),
    ({"item_loader": "PyTreeLoader"}, r"item_loader is 'PyTreeLoader', not 'TokensLoader'"),
    ({"data_format": ["no_header_tensor:16", "int"]}, r"is not a token dataset"),
    ({"data_format": ["pickle"]}, r"is not a token dataset"),
    ({"data_format": ["no_header_tensor:1"]}, r"holds non-integer values \(dtype code 1\), not token ids"),
])
def test_other_litdata_folders_are_refused(tmp_path, config, match):
    root = write_litdata(tmp_path / "opt", _items(4, 5, 100), config=config)
    _refused(StoreError, root, match)


def test_damaged_chunks_are_refused(tmp_path):
    items = _items(5, 6, 100)
    items[3] = [7, 8]  # chunk 1 starts with a non-empty item: its dim is recorded

    def damaged(name: str, fn) -> Path:
        root = write_litdata(tmp_path / name, items)
        fn(root / "chunk-0-1.bin", root / "index.json")
        return root

    def edit_index(fn):
        def run(chunk, index):
            d = json.loads(index.read_text())
            fn(d["chunks"][1])
            index.write_text(json.dumps(d))
        return run

    def set_u32(at: int, value: int):
        def run(chunk, index):
            b = bytearray(chunk.read_bytes())
            b[at : at + 4] = np.uint32(value).tobytes()
            chunk.write_bytes(bytes(b))
        return run

    cases = [
        (lambda c, i: c.write_bytes(c.read_bytes()[:-4]), r"chunk-0-1.bin' has item offsets that do not run from its "
                                                          r"20-byte header to its size"),
        (lambda c, i: c.write_bytes(c.read_bytes()[:10]), r"has 10 bytes, fewer than the header of its 3 items \(20\)"),
        (set_u32(0, 4), r"holds 4 items but index.json says 3"),
        (set_u32(8, 7), r"offsets that do not run"),  # offsets[1] inside the header, before offsets[0]
        (edit_index(lambda c: c.update(dim=c["dim"] + 1)), r"holds \d+ ids but index.json says dim=\d+"),
        (edit_index(lambda c: c.update(chunk_bytes=5)), r"says chunk_bytes=5: the file is truncated"),
        (edit_index(lambda c: c.update(filename="../escape.bin")), r"points outside the store"),
        (edit_index(lambda c: c.update(chunk_size="3")), r"field 'chunk_size' is '3', expected an item count"),
    ]
    for k, (fn, match) in enumerate(cases):
        _refused(StoreError, damaged(f"case{k}", fn), match)
    root = write_litdata(tmp_path / "odd", [[1, 2], [3]], "int32")
    chunk = root / "chunk-0-0.bin"
    b = bytearray(chunk.read_bytes())
    b[8:12] = np.uint32(int(np.frombuffer(b[8:12], "<u4")[0]) + 2).tobytes()  # an item boundary inside an id
    chunk.write_bytes(bytes(b))
    _refused(StoreError, root, r"has an item whose size is not a whole number of int32 ids")
    ok = write_litdata(tmp_path / "ok", items)
    _refused(StoreError, ok, r"holds token id \d+ at token \d+ \(in 'chunk-0-\d.bin'\), >= vocab_size 5", vocab_size=5)
    _refused(ConfigError, ok, r"whose index.json records its dtype: drop the dtype option", dtype="uint16")
    neg = write_litdata(tmp_path / "neg", [[1, -1, 2]], "int64")
    with pytest.raises(StoreError, match=r"holds id -1, outside uint32") as e:
        open_store(neg)
    assert "\n" not in str(e.value)
