"""datatrove ``.ds`` token files (DocumentTokenizer's output), written here from datatrove's layout
(``pipeline/tokens/tokenizer.py`` ``TokenizedFile``: ids, uint64 document ends, a text metadata file),
not from our reader, and read back through every TokenStore operation, the CLI and the evaluator."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from streamdata import ConfigError, StoreError, open_datatrove, open_store
from streamdata.backends.datatrove import DatatroveTokenStore
from streamdata.cli import main

from .test_imports import _check_store


# ---- writer from datatrove's layout ---------------------------------------------------------------
def write_ds(folder: Path, name: str, docs, token_size: int = 2, tokenizer: str | None = "gpt2",
             metadata: str = "current") -> Path:
    """TokenizedFile.write/close/write_final_metadata: ``struct.pack("<%sH" or "<%sI")`` ids per document,
    ``struct.pack("<%sQ", *doc_ends)`` index, metadata "NAME|SIZE\\nCOUNT\\nHUMAN" ("current"), the
    name alone ("old": datatrove before uint32 files) or none."""
    folder.mkdir(parents=True, exist_ok=True)
    fmt = "H" if token_size == 2 else "I"
    path = folder / name
    ends, n = [], 0
    with open(path, "wb") as f:
        for d in docs:
            f.write(struct.pack(f"<{len(d)}{fmt}", *d))
            n += len(d)
            ends.append(n)
    (folder / f"{name}.index").write_bytes(struct.pack(f"<{len(ends)}Q", *ends))
    if metadata == "current":
        first = (tokenizer or "Unknown Tokenizer|" + str(token_size)) + "|" + str(token_size)
        (folder / f"{name}.metadata").write_text("\n".join([first, str(n), f"{n / 1000:.1f}kT"]))
    elif metadata == "old":
        (folder / f"{name}.metadata").write_text("\n".join([tokenizer or "Unknown Tokenizer", str(n), f"{n}T"]))
    return path


def _docs(seed: int, n: int, vocab: int, empty: bool = True) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, int(rng.integers(1, 200))).tolist() for _ in range(n)]
    if empty:
        docs[n // 2] = []  # an empty document: its end repeats the previous one
    return docs


def _flat(docs) -> tuple[np.ndarray, np.ndarray]:
    flat = np.array([t for d in docs for t in d], dtype=np.int64)
    return flat, np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)


def cli_round_trip(src: Path, tmp_path: Path, capsys, flat: np.ndarray, offsets: np.ndarray) -> str:
    """``streamdata info``, ``verify`` and ``convert`` (to npy) of ``src``: the npy copy holds the same ids
    and document bounds. Returns what ``info`` printed."""
    assert main(["info", str(src)]) == 0
    info = capsys.readouterr().out
    assert main(["verify", str(src)]) == 0
    assert "OK" in capsys.readouterr().out
    out = tmp_path / "converted"
    assert main(["convert", str(src), str(out)]) == 0
    capsys.readouterr()
    with open_store(out) as s:
        assert s.manifest.format == "npy"
        np.testing.assert_array_equal(s.read(0, len(s)), flat)
        np.testing.assert_array_equal(s.doc_offsets, offsets)
    return info


# ---- reading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("token_size", [2, 4])
def test_ds_file_ids_and_documents_read_back(tmp_path, token_size):
    vocab = 50257 if token_size == 2 else 128256
    docs = _docs(1, 30, vocab)
    path = write_ds(tmp_path, "000_train.ds", docs, token_size, tokenizer="meta-llama/Llama-3.2-1B")
    flat, offsets = _flat(docs)
    for arg in (path, tmp_path / "000_train", tmp_path):  # the file, its prefix, the folder
        with open_store(arg) as s:
            assert isinstance(s, DatatroveTokenStore) and s.manifest.format == "datatrove"
            assert s.dtype == np.dtype("<u2" if token_size == 2 else "<u4")
            _check_store(s, flat, offsets)
            assert s.manifest.tokenizer["name"] == "meta-llama/Llama-3.2-1B"
            src = s.manifest.source
            assert src["token_size"] == token_size and src["token_size_from"] == [".ds.metadata"]
            assert [Path(f["path"]).name for f in src["files"]] == ["000_train.ds", "000_train.ds.index",
                                                                    "000_train.ds.metadata"]
            # the ids are the file's bytes, so the shard checksum is the file's
            assert s.manifest.shards[0].sha256 == src["files"][0]["sha256"]
    with open_datatrove(path, vocab_size=vocab, eos_id=0) as s:
        assert s.dtype == np.dtype("<u4" if vocab > 65536 else "<u2") and s.vocab_size == vocab


def test_folder_reads_every_ds_in_sorted_name_order(tmp_path):
    parts = {"00002_shuffled.ds": _docs(2, 7, 1000), "00000_shuffled.ds": _docs(3, 5, 1000),
             "00001_shuffled.ds": [], "00003_shuffled.ds": _docs(4, 9, 1000, empty=False)}
    for name, docs in parts.items():  # written out of order: the reader sorts by name
        write_ds(tmp_path / "tok", name, docs)
    (tmp_path / "tok" / "00000_shuffled.ds.loss").write_bytes(b"\x01" * 10)  # loss masks are not ids
    ordered = [d for name in sorted(parts) for d in parts[name]]
    flat, offsets = _flat(ordered)
    with open_store(tmp_path / "tok") as s:
        _check_store(s, flat, offsets)
        assert [sh.file for sh in s.manifest.shards] == sorted(parts)
        assert [sh.documents for sh in s.manifest.shards] == [len(parts[n]) for n in sorted(parts)]


@pytest.mark.parametrize("metadata,size_from,name", [
    ("old", ".ds.index and the file size", "gpt2"),  # datatrove before uint32 files: the name alone
    ("none", ".ds.index and the file size", None),
    ("current-unknown", ".ds.metadata", None),  # "Unknown Tokenizer|4|4"
])
def test_token_size_without_metadata_comes_from_the_index(tmp_path, metadata, size_from, name):
    docs = _docs(5, 12, 100000)
    tokenizer = None if metadata == "current-unknown" else "gpt2"
    path = write_ds(tmp_path, "a.ds", docs, 4, tokenizer=tokenizer, metadata=metadata.split("-")[0])
    with open_store(path) as s:
        _check_store(s, *_flat(docs))
        assert s.dtype == np.dtype("<u4") and s.manifest.source["token_size_from"] == [size_from]
        assert s.manifest.tokenizer["name"] == name


# ---- the CLI and the evaluator -------------------------------------------------------------------
def test_info_verify_convert_round_trip(tmp_path, capsys):
    docs = _docs(6, 20, 1000)
    write_ds(tmp_path / "tok", "00000_shuffled.ds", docs[:8])
    write_ds(tmp_path / "tok", "00001_shuffled.ds", docs[8:])
    info = cli_round_trip(tmp_path / "tok", tmp_path, capsys, *_flat(docs))
    assert "format datatrove" in info and "tokenizer  gpt2 (" in info
    assert "uint16 ids (token size 2 from .ds.metadata); documents: one per .ds.index entry" in info
    with open_store(tmp_path / "converted") as s:  # the tokenizer name travels with the ids
        assert s.manifest.tokenizer["name"] == "gpt2" and s.manifest.extra["converted_from"]["format"] == "datatrove"


def test_loader_and_evaluator_document_mode_use_the_ds_index(tmp_path):
    from evaluator import StreamingEvaluator
    from streamdata import WindowLoader, convert_store

    from ..evaluator.helpers import Bigram

    docs = _docs(7, 9, 97)
    write_ds(tmp_path / "tok", "0.ds", docs[:4])
    write_ds(tmp_path / "tok", "1.ds", docs[4:])
    ref = tmp_path / "npy"
    convert_store(tmp_path / "tok", ref)
    with open_store(tmp_path / "tok") as a, open_store(ref) as b:
        got, want = ([[t.clone() for t in (w.inputs, w.targets, w.score_mask, w.doc_ids)] for w in
                      WindowLoader(s, chunk_size=16, overlap=4, doc_mode="document", batch_windows=3, device="cpu")]
                     for s in (a, b))
    assert len(got) == len(want) > 1
    for g, w in zip(got, want):
        assert all(x.equal(y) for x, y in zip(g, w))
    ev = StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", verbose=False, doc_mode="document")
    r1, r2 = ev.evaluate_streaming(str(tmp_path / "tok")), ev.evaluate_streaming(str(ref))
    assert r1["total_tokens"] == r2["total_tokens"] == len(_flat(docs)[0]) - sum(1 for d in docs if d)
    assert r1["loss"] == r2["loss"]


# ---- refusals: one line each, naming the file and what to do -------------------------------------
def _refused(exc, arg, match, **kw):
    with pytest.raises(exc, match=match) as e:
        open_store(arg, **kw) if kw else open_store(arg)
    assert "\n" not in str(e.value)


def test_damaged_or_mismatched_files_are_refused(tmp_path):
    docs = _docs(8, 6, 1000, empty=False)
    p = write_ds(tmp_path / "a", "x.ds", docs)
    Path(str(p) + ".index").unlink()
    _refused(StoreError, p, r"'.*x.ds' has no document index '.*x.ds.index' beside it: copy it there")
    p = write_ds(tmp_path / "b", "x.ds", docs)
    p.write_bytes(p.read_bytes()[:-2])
    _refused(StoreError, p, r"has \d+ bytes, but its index ends at token \d+ of 2 bytes \(.ds.metadata\)")
    p = write_ds(tmp_path / "c", "x.ds", docs)
    Path(str(p) + ".metadata").write_text("gpt2|2\n5\n5T")
    _refused(StoreError, p, r"counts 5 tokens, but the index ends at \d+: the files belong to different runs")
    p = write_ds(tmp_path / "d", "x.ds", docs)
    Path(str(p) + ".metadata").write_text("gpt2|3\n5\n5T")
    _refused(StoreError, p, r"records token size 3, but datatrove writes 2 or 4")
    p = write_ds(tmp_path / "e", "x.ds", docs)
    ix = Path(str(p) + ".index")
    ends = np.frombuffer(ix.read_bytes(), "<u8").copy()
    ends[[1, 2]] = ends[[2, 1]]
    ix.write_bytes(ends.tobytes())
    _refused(StoreError, p, r"x.ds.index' decreases at document 2")
    ix.write_bytes(ix.read_bytes()[:-3])
    _refused(StoreError, p, r"not a multiple of 8 \(uint64 ends\)")
    write_ds(tmp_path / "f", "0.ds", docs)
    write_ds(tmp_path / "f", "1.ds", docs, token_size=4)
    _refused(StoreError, tmp_path / "f", r"mix token sizes \[2, 4\]")
    write_ds(tmp_path / "g", "0.ds", docs)
    write_ds(tmp_path / "g", "1.ds", docs, tokenizer="EleutherAI/pythia-160m")
    _refused(StoreError, tmp_path / "g", r"different tokenizers \['EleutherAI/pythia-160m', 'gpt2'\]")
    p = write_ds(tmp_path / "h", "x.ds", docs)
    _refused(StoreError, p, r"holds token id \d+ at token \d+ \(in 'x.ds'\), >= vocab_size 10", vocab_size=10)
    _refused(ConfigError, p, r"is a datatrove dataset, whose .ds.metadata/.ds.index record its token size: drop the dtype option", dtype="uint32")
    _refused(ConfigError, p, r"documents='sequence' applies to Megatron datasets only", documents="sequence")


def test_side_files_are_never_read_as_ids(tmp_path):
    p = write_ds(tmp_path, "x.ds", _docs(9, 4, 1000))
    for side in (".index", ".metadata"):
        _refused(StoreError, str(p) + side, r"is a side file of the datatrove token file '.*x.ds': open that .ds file")
