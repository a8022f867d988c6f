"""``streamdata`` CLI: tokenize/info/verify through main(argv), on good and damaged stores."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from streamdata.cli import main
from streamdata.format import MANIFEST_NAME

from ..conftest import CORPUS


@pytest.fixture
def store(tmp_path, bpe_tokenizer):
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"content": t}) + "\n" for t in CORPUS * 20), encoding="utf-8")
    out = tmp_path / "store"
    rc = main(["tokenize", str(src), "--tokenizer", str(bpe_tokenizer), "--out", str(out), "--text-column", "content",
               "--shard-tokens", "300", "--quiet"])
    assert rc == 0
    return out


def test_tokenize_info_verify(capsys, store):
    out = capsys.readouterr().out
    assert "documents" in out and "tok/s" in out
    assert main(["info", str(store)]) == 0
    info = capsys.readouterr().out
    assert "tokens" in info and f"{len(CORPUS) * 20:,} (" in info and "uint16" in info and "eos=0 (<|endoftext|>)" in info
    assert main(["info", str(store), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["totals"]["documents"] == len(CORPUS) * 20 and len(d["shards"]) > 3 and d["derived"]["disk_bytes"] > 0
    assert main(["verify", str(store)]) == 0
    assert "OK" in capsys.readouterr().out


def test_verify_flipped_byte(store, capsys):
    shard = store / "shards" / "tokens-00001.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "DEFECT: shards/tokens-00001.bin: sha256" in out
    assert "tokens-00000" not in out


def test_verify_id_out_of_vocab(store, capsys):
    shard = store / "shards" / "tokens-00000.bin"
    data = bytearray(shard.read_bytes())
    data[2:4] = (65000).to_bytes(2, "little")  # token 1 becomes an id far above the 300-entry vocab
    shard.write_bytes(bytes(data))
    assert main(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "token id 65000 >= vocab size" in out and "(first at token 1)" in out


def test_verify_truncated_shard(store, capsys):
    shard = store / "shards" / "tokens-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert main(["verify", str(store)]) == 1
    assert "truncated?" in capsys.readouterr().out
    assert main(["info", str(store)]) == 2
    assert "tokens-00002.bin" in capsys.readouterr().err


def test_verify_deleted_manifest(store, capsys):
    (store / MANIFEST_NAME).unlink()
    assert main(["verify", str(store)]) == 1
    assert "no manifest.json" in capsys.readouterr().out
    assert main(["info", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a store" in err


def test_verify_damaged_index(store, capsys):
    import numpy as np

    off = np.load(store / "index" / "doc_offsets.npy")
    off[3], off[4] = off[4], off[3]
    np.save(store / "index" / "doc_offsets.npy", off)
    assert main(["verify", str(store)]) == 1
    assert "decreases at document 3" in capsys.readouterr().out


def test_bad_arguments_exit_2(tmp_path, capsys, bpe_tokenizer):
    with pytest.raises(SystemExit) as e:
        main(["tokenize", "x.jsonl", "--tokenizer", "t", "--out", "o", "--shard-tokens", "0"])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["tokenize", str(tmp_path / "nope.jsonl"), "--tokenizer", str(bpe_tokenizer), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamdata: error: data file") and err.count("\n") == 1


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "streamdata", "tokenize", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--text-column" in r.stdout and "--shard-tokens" in r.stdout


def test_tokenize_zarr_and_convert_round_trip(tmp_path, capsys, store, bpe_tokenizer):
    import numpy as np

    from streamdata import open_store

    src = tmp_path / "c.jsonl"
    z = tmp_path / "z"
    assert main(["tokenize", str(src), "--tokenizer", str(bpe_tokenizer), "--out", str(z), "--text-column", "content",
                 "--format", "zarr", "--compression", "zstd", "--quiet"]) == 0
    assert not (z / "_build").exists()
    # the same command again is a no-op on the finished store
    assert main(["tokenize", str(src), "--tokenizer", str(bpe_tokenizer), "--out", str(z), "--text-column", "content",
                 "--format", "zarr", "--compression", "zstd", "--quiet"]) == 0
    back = tmp_path / "back"
    assert main(["convert", str(z), str(back), "--format", "npy"]) == 0
    assert main(["verify", str(z)]) == 0 and main(["verify", str(back)]) == 0
    with open_store(store) as a, open_store(z) as b, open_store(back) as c:
        assert b.manifest.format == "zarr" and c.manifest.format == "npy"
        ref = a.read(0, len(a))
        np.testing.assert_array_equal(b.read(0, len(b)), ref)
        np.testing.assert_array_equal(c.read(0, len(c)), ref)
        np.testing.assert_array_equal(b.doc_offsets, a.doc_offsets)
        assert a.manifest.tokenizer == b.manifest.tokenizer == c.manifest.tokenizer
    capsys.readouterr()
    assert main(["tokenize", str(src), "--tokenizer", str(bpe_tokenizer), "--out", str(tmp_path / "x"), "--compression", "zstd"]) == 2
    assert "needs --format zarr" in capsys.readouterr().err


def test_convert_raw_bin(tmp_path, capsys):
    import numpy as np

    from streamdata import open_store

    ids = np.array([5, 6, 0, 7, 0, 8, 9, 10], dtype="<u4")
    ids.tofile(tmp_path / "train.bin")
    out = tmp_path / "conv"
    assert main(["convert", str(tmp_path / "train.bin"), str(out), "--dtype", "uint32", "--eos-id", "0", "--vocab-size", "11"]) == 0
    with open_store(out) as s:
        assert s.read(0, len(s)).tolist() == ids.tolist()
        assert s.doc_offsets.tolist() == [0, 3, 5, 8]
