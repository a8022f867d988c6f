"""Bad input is refused before any compute, with one line naming the value and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluator import ConfigError, DataError, ModelError, RunTuning, StreamingEvalConfig, StreamingEvaluator

from .helpers import V, Bigram, TinyRNN, tiny_gpt2


class CountingBigram(Bigram):
    """Counts forwards, so tests can assert that nothing was computed before an error."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_token_id_outside_vocab_in_tensor():
    m = CountingBigram()
    x = torch.randint(0, V, (100,))
    x[37] = V + 3
    x[80] = V + 9
    ev = StreamingEvaluator(m, chunk_size=16, device="cpu", verbose=False)
    with pytest.raises(DataError) as e:
        ev.evaluate_streaming(x)
    msg = _one_line(e)
    assert f"token id {V + 3} at position 37" in msg and f"[0, {V})" in msg
    assert m.calls == 0
    x[37] = -1  # a negative id is refused wherever it is (ids are held unsigned, as in a store)
    with pytest.raises(DataError, match="token id -1 at position 37"):
        ev.evaluate_streaming(x, max_tokens=30)
    x[37] = 1
    assert ev.evaluate_streaming(x, max_tokens=30)["total_tokens"] == 29  # ids past max_tokens are not read


def test_token_id_outside_vocab_in_store(make_store):
    m = CountingBigram()
    docs = [list(range(10)), [1, 2, 3, V + 1, 4], [V + 50]]
    path = make_store(docs, vocab_size=V + 100)
    ev = StreamingEvaluator(m, chunk_size=16, device="cpu", verbose=False)
    with pytest.raises(DataError, match=f"token id {V + 1} at position 13 of store"):
        ev.evaluate_streaming(path)
    assert m.calls == 0


@pytest.mark.parametrize("kw,match", [
    ({"chunk_size": 8, "overlap": 8}, "overlap=8 must be smaller than chunk_size=8"),
    ({"chunk_size": 8, "overlap": 9}, "overlap=9"),
    ({"chunk_size": 0}, "chunk_size=0"),
    ({"mode": "fast"}, "mode='fast'"),
    ({"doc_mode": "docs"}, "doc_mode='docs'"),
    ({"tail": "long"}, "tail='long'"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"batch_size": "big"}, "batch_size='big'"),
    ({"dtype": "fp8"}, "dtype='fp8'"),
    ({"loss_slice": 0}, "loss_slice=0"),
    ({"bos": "start"}, "bos='start'"),
    ({"max_tokens": 1}, "max_tokens=1"),
    ({"log_interval": 0}, "log_interval=0"),
    ({"mode": "stateful", "overlap": 4}, "overlap=4 does not apply to mode='stateful'"),
    ({"split_warmup": -1}, "split_warmup=-1 must be an int >= 0"),
    ({"split_warmup": 1.5}, "split_warmup=1.5"),
])
def test_config_validation(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        StreamingEvalConfig(**kw)
    _one_line(e)


def test_overlap_against_model_context_length():
    m = tiny_gpt2(n_positions=32)
    with pytest.raises(ConfigError, match="overlap=32 must be smaller than chunk_size=32"):
        StreamingEvaluator(m, chunk_size=None, overlap=32, device="cpu")


def test_chunk_size_above_model_context():
    m = tiny_gpt2(n_positions=32)
    x = torch.randint(0, V, (100,))
    ev = StreamingEvaluator(m, chunk_size=64, device="cpu", mode="sliding", verbose=False)
    with pytest.raises(ConfigError, match="chunk_size=64 exceeds model .* context of 32 positions") as e:
        ev.evaluate_streaming(x)
    _one_line(e)
    # kv-cache: the whole stream must fit the context
    ev = StreamingEvaluator(m, chunk_size=8, device="cpu", mode="kv-cache", verbose=False)
    with pytest.raises(ConfigError, match="needs 99 positions but model .* has 32"):
        ev.evaluate_streaming(x)
    assert ev.evaluate_streaming(x, max_tokens=33)["mode"] == "kv-cache"  # 32 inputs fit exactly


def test_mode_the_model_cannot_run():
    with pytest.raises(ConfigError, match="mode='stateful' is not available for model Bigram"):
        StreamingEvaluator(Bigram(), chunk_size=8, device="cpu", mode="stateful", verbose=False).evaluate_streaming(torch.arange(20))
    with pytest.raises(ConfigError, match="mode='kv-cache' is not available"):
        StreamingEvaluator(TinyRNN(), chunk_size=8, device="cpu", mode="kv-cache", verbose=False).evaluate_streaming(torch.arange(20))


def test_empty_and_unscorable_data(make_store):
    ev = StreamingEvaluator(Bigram(), chunk_size=8, device="cpu", verbose=False)
    with pytest.raises(DataError, match="holds no tokens"):
        ev.evaluate_streaming(make_store([[], []], vocab_size=V))
    with pytest.raises(DataError, match="holds no tokens"):
        ev.evaluate_streaming(torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="no token to score"):
        ev.evaluate_streaming(torch.tensor([5]))
    docs = make_store([[1], [2], []], vocab_size=V)
    ev_doc = StreamingEvaluator(Bigram(), chunk_size=8, device="cpu", doc_mode="document", verbose=False)
    with pytest.raises(DataError, match="no token to score"):
        ev_doc.evaluate_streaming(docs)
    # with a BOS prefix each 1-token document has one target
    ev_bos = StreamingEvaluator(Bigram(), chunk_size=8, device="cpu", doc_mode="document", bos=0, verbose=False)
    assert ev_bos.evaluate_streaming(docs)["total_tokens"] == 2


def test_tokenizer_mismatch(make_store):
    path = make_store([list(range(20))], vocab_size=V)  # the fixture records sha256 "0" * 64
    m = Bigram()
    m.tokenizer_sha256 = "ab" * 32
    ev = StreamingEvaluator(m, chunk_size=8, device="cpu", verbose=False)
    with pytest.raises(DataError, match=r"whole-file sha256 000000000000\.\.\. vs ababababab") as e:
        ev.evaluate_streaming(path)
    _one_line(e)
    off = StreamingEvaluator(m, chunk_size=8, device="cpu", verbose=False, check_tokenizer=False)
    assert off.evaluate_streaming(path)["total_tokens"] == 19
    m.tokenizer_sha256 = "0" * 64
    assert StreamingEvaluator(m, chunk_size=8, device="cpu", verbose=False).evaluate_streaming(path)["total_tokens"] == 19


def test_tokenizer_of_a_local_checkpoint(tmp_path, make_store, bpe_tokenizer):
    """A local transformers folder declares its tokenizer through tokenizer.json next to it."""
    import shutil

    from streamdata.tokenize import load_tokenizer

    tok = load_tokenizer(str(bpe_tokenizer))
    folder = tmp_path / "ckpt"
    tiny_gpt2(n_positions=64, vocab=tok.vocab_size).save_pretrained(folder)
    shutil.copy(bpe_tokenizer, folder / "tokenizer.json")
    ev = StreamingEvaluator(str(folder), chunk_size=16, device="cpu", verbose=False)
    assert ev.adapter.tokenizer_sha256 == tok.sha256 and ev.adapter.tokenizer_identity["ids_sha256"] == tok.ids_sha256
    store = make_store([list(range(30))], vocab_size=tok.vocab_size)
    with pytest.raises(DataError, match="records only that whole-file digest.*re-tokenize the store"):
        ev.evaluate_streaming(store)


# ids avoid the word "cuda": conftest skips every test whose keywords contain it
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps", "tpu9"], ids=["gpu", "gpu7", "apple", "bogus"])
def test_device_not_available(device):
    if device.startswith("cuda") and torch.cuda.is_available() and device == "cuda":
        pytest.skip("CUDA is available here")
    with pytest.raises(ConfigError, match=f"device='{device}'") as e:
        StreamingEvaluator(Bigram(), chunk_size=8, device=device)
    _one_line(e)


def test_bos_conflicts(make_store):
    m = tiny_gpt2(n_positions=64)
    x = torch.randint(0, V, (50,))
    with pytest.raises(ConfigError, match="bos='eos' but the token tensor records no EOS id"):
        StreamingEvaluator(m, chunk_size=16, device="cpu", bos="eos", verbose=False).evaluate_streaming(x)
    with pytest.raises(ConfigError, match="BOS id 500 is outside"):
        StreamingEvaluator(m, chunk_size=16, device="cpu", bos=500, verbose=False).evaluate_streaming(x)
    r = StreamingEvaluator(m, chunk_size=16, device="cpu", bos="model", verbose=False).evaluate_streaming(x)
    assert r["bos_id"] == 0 and r["total_tokens"] == 50
    with pytest.raises(ConfigError, match="declares no bos_token_id"):
        StreamingEvaluator(Bigram(), chunk_size=16, device="cpu", bos="model", verbose=False).evaluate_streaming(x)


def test_chunk_size_none_needs_a_declared_context():
    assert StreamingEvaluator(tiny_gpt2(n_positions=48), device="cpu").chunk_size == 48
    with pytest.raises(ConfigError, match="declares no context length: pass chunk_size"):
        StreamingEvaluator(Bigram(), device="cpu")


def test_model_errors():
    with pytest.raises(ModelError, match="cannot evaluate a int"):
        StreamingEvaluator(3, chunk_size=8, device="cpu")

    class Weird(torch.nn.Module):
        vocab_size = V

        def forward(self, x):
            return {"nothing": x}

    with pytest.raises(ModelError, match="not logits"):
        StreamingEvaluator(Weird(), chunk_size=8, device="cpu", verbose=False).evaluate_streaming(torch.arange(20))


@pytest.mark.parametrize("mode", ["sliding", "stateful"])
def test_a_damaged_store_with_an_id_beyond_the_vocabulary_is_one_line(make_store, mode):
    """The store declares the model's vocabulary, so nothing is scanned up front; one shard byte was
    changed afterwards to an id >= vocab. Used to be an IndexError traceback from the embedding (on
    CUDA a device-side assert); now the loader's check names the id and its position."""
    from streamdata.errors import StreamdataError

    from .helpers import TinyRNN

    path = make_store([list(range(50)), list(range(40))], vocab_size=V, shard_tokens=1000)
    shard = next((path / "shards").glob("*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[2 * 70 : 2 * 71] = (V + 5).to_bytes(2, "little")  # token 70 (uint16 store)
    shard.write_bytes(bytes(raw))
    model = CountingBigram() if mode == "sliding" else TinyRNN("gru")
    ev = StreamingEvaluator(model, chunk_size=16, device="cpu", verbose=False, mode=mode)
    with pytest.raises(StreamdataError) as e:
        ev.evaluate_streaming(path)
    msg = _one_line(e)
    assert f"token id {V + 5} at position 70 of store" in msg and f"[0, {V})" in msg and "streamdata verify" in msg


def test_the_loader_enforces_the_store_vocabulary_when_the_model_has_more_rows(tmp_path):
    """A raw .bin opened with checksum=False is not scanned at open; an id beyond the store's declared
    vocabulary (but inside the model's) still stops the run with one line naming it."""
    import streamdata

    p = tmp_path / "t.bin"
    np.array([1, 2, 3, 60, 90, 4, 5, 6, 7, 8, 9], dtype="<u2").tofile(p)  # 90 >= the declared 64
    store = streamdata.open_raw_bin(p, vocab_size=64, checksum=False)
    ev = StreamingEvaluator(Bigram(), chunk_size=4, device="cpu", verbose=False)  # vocab V = 97 > 90
    with pytest.raises(streamdata.StoreError, match=r"token id 90 at position 4 .* \[0, 64\)") as e:
        ev.evaluate_streaming(store)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw, text", [
    (dict(block_windows=0), "RunTuning(block_windows=0): pass an int >= 1"),
    (dict(per_token_block=2.5), "RunTuning(per_token_block=2.5): pass an int >= 1"),
    (dict(lookahead=True), "RunTuning(lookahead=True): pass an int >= 1"),
    (dict(ladder_share=0), "RunTuning(ladder_share=0): pass a share in (0, 1], or None"),
])
def test_bad_run_tuning_is_one_line(kw, text):
    with pytest.raises(ConfigError) as e:
        RunTuning(**kw)
    assert str(e.value) == text
