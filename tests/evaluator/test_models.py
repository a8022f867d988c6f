"""Public API, model loading (objects, local folders, entry points), automatic mode choice, and
document mode resetting state/cache at every document."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import evaluator
from evaluator import ModelError, StreamingEvalConfig, StreamingEvaluator, create_streaming_evaluator, load_model

from .helpers import V, Bigram, TinyRNN, full_nll, tiny_gpt2, tiny_rwkv


def test_all_names_import():
    for name in evaluator.__all__:
        assert getattr(evaluator, name) is not None


def test_quick_reference_usage():
    m = tiny_gpt2(n_positions=128)
    x = torch.randint(0, V, (300,), generator=torch.Generator().manual_seed(0))
    cfg = StreamingEvalConfig(chunk_size=64, overlap=16, device="cpu", verbose=False)
    ev = create_streaming_evaluator(m, cfg)
    assert ev.chunk_size == 64 and ev.overlap == 16 and ev.model is m
    r = ev.evaluate_streaming(x)
    assert r["mode"] == "sliding" and r["total_tokens"] == 299
    ev.chunk_size = ev.chunk_size // 2  # the quick reference's OOM advice still works
    assert ev.evaluate_streaming(x)["chunk_size"] == 32
    assert cfg.chunk_size == 64  # the caller's config is not modified
    with pytest.raises(evaluator.ConfigError, match="not both"):
        StreamingEvaluator(m, chunk_size=8, config=cfg)


@pytest.mark.parametrize("make,n,mode", [
    (lambda: TinyRNN(), 100, "stateful"),
    (tiny_rwkv, 100, "stateful"),
    (lambda: tiny_gpt2(n_positions=128), 129, "kv-cache"),   # 128 inputs fit 128 positions
    (lambda: tiny_gpt2(n_positions=128), 130, "sliding"),    # one more does not
    (Bigram, 100, "sliding"),
])
def test_auto_mode(make, n, mode):
    x = torch.randint(0, V, (n,))
    r = StreamingEvaluator(make(), chunk_size=32, device="cpu", verbose=False).evaluate_streaming(x)
    assert r["mode"] == mode


def test_auto_with_overlap_is_sliding():
    r = StreamingEvaluator(TinyRNN(), chunk_size=32, overlap=8, device="cpu", verbose=False).evaluate_streaming(torch.arange(90))
    assert r["mode"] == "sliding"


@pytest.mark.parametrize("make,mode", [(lambda: TinyRNN("gru"), "stateful"), (tiny_rwkv, "stateful"),
                                       (lambda: tiny_gpt2(n_positions=64), "kv-cache")], ids=["gru", "rwkv", "gpt2"])
@pytest.mark.parametrize("bos", [None, 3])
def test_document_mode_resets_at_every_document(make_store, make, mode, bos):
    g = np.random.default_rng(5)
    docs = [g.integers(0, V, n).tolist() for n in (30, 1, 45, 0, 12, 60)]
    path = make_store(docs, vocab_size=V)
    m = make()
    ref = []
    for d in docs:
        seq = ([bos] if bos is not None else []) + d
        if len(seq) >= 2:
            ref.append(full_nll(m, torch.tensor(seq)))
    ref = np.concatenate(ref)
    ev = StreamingEvaluator(m, chunk_size=16, device="cpu", doc_mode="document", mode=mode, bos=bos, verbose=False)
    r = ev.evaluate_streaming_with_metrics(path, compute_per_token_metrics=True)
    assert r["total_tokens"] == len(ref) == sum(max(0, len(d) - 1 + (bos is not None)) for d in docs)
    np.testing.assert_allclose(np.asarray(r["per_token_losses"]), ref, rtol=1e-5, atol=1e-5)


def test_stream_mode_carries_state_across_documents(make_store):
    g = np.random.default_rng(6)
    docs = [g.integers(0, V, n).tolist() for n in (30, 45, 12)]
    path = make_store(docs, vocab_size=V)
    m = TinyRNN()
    ref = full_nll(m, torch.tensor(sum(docs, [])))
    r = StreamingEvaluator(m, chunk_size=16, device="cpu", verbose=False).evaluate_streaming(path)
    assert r["nll_sum"] == pytest.approx(ref.sum(), rel=1e-5)


def test_local_transformers_folder(tmp_path):
    m = tiny_gpt2(n_positions=64)
    m.save_pretrained(tmp_path / "ckpt")
    x = torch.randint(0, V, (100,), generator=torch.Generator().manual_seed(1))
    a = StreamingEvaluator(m, chunk_size=32, overlap=8, device="cpu", verbose=False).evaluate_streaming(x)
    b = StreamingEvaluator(str(tmp_path / "ckpt"), chunk_size=32, overlap=8, device="cpu", verbose=False).evaluate_streaming(x)
    assert b["model"] == str(tmp_path / "ckpt")
    assert a["nll_sum"] == pytest.approx(b["nll_sum"], rel=1e-6)


def test_factory_entry_point(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "from tests.evaluator.helpers import TinyRNN\n"
        "def make():\n    return TinyRNN('gru', seed=4)\n"
        "def folder():\n    return " + repr(str(tmp_path / "ckpt")) + "\n"
        "not_callable = 3\n"
    )
    tiny_gpt2(n_positions=64).save_pretrained(tmp_path / "ckpt")
    monkeypatch.syspath_prepend(str(tmp_path))
    a = load_model("my_models:make")
    assert a.kind == "stateful-protocol" and a.name == "my_models:make"
    assert load_model("my_models:folder").kind == "transformers-attention"
    with pytest.raises(ModelError, match="has no callable 'not_callable'"):
        load_model("my_models:not_callable")
    with pytest.raises(ModelError, match="cannot import 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:make")


def test_unknown_model_name_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="nothing-here.: folder not found") as e:
        load_model(str(tmp_path / "nothing-here"))
    assert "\n" not in str(e.value)


def test_transformers_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ModelError, match=r"needs transformers, which is not installed: pip install 'streamdata\[hf\]'"):
        load_model(str(tmp_path))
    # plain modules never need it
    assert load_model(Bigram()).kind == "module"


def test_hf_adapter_facts():
    a = load_model(tiny_gpt2(n_positions=96))
    assert a.max_positions == 96 and a.context_length == 96 and a.vocab_size == V and a.bos_token_id == 0
    assert set(a.modes) == {"sliding", "kv-cache"}
    r = load_model(tiny_rwkv())
    assert r.max_positions is None and r.context_length == 64 and set(r.modes) == {"sliding", "stateful"}


def test_default_model_is_loadable():
    from evaluator.models import DEFAULT_MODEL_DIR

    assert (DEFAULT_MODEL_DIR / "config.json").is_file(), "the bundled model is missing: python -m evaluator.assets.default.train"
    assert not (DEFAULT_MODEL_DIR / "tokenizer.json").exists()  # one copy of the tokenizer: streamdata's
    a = load_model("default")
    assert a.kind == "transformers-attention" and a.tokenizer_sha256 is not None
    assert a.vocab_size == 4096 and a.max_positions == 1024
    # A quick check that the bundled weights are trained: a slice of held-out stdlib code scores
    # far below the uniform perplexity of 4096 (the full eval-part figure is in training_info.json).
    from streamdata.source import default_corpus_files
    from streamdata.tokenize import load_tokenizer

    # the default model is paired with streamdata's bundled tokenizer ('--tokenizer default')
    tok = load_tokenizer("default")
    assert tok.sha256 == a.tokenizer_sha256 and a.name == "default"
    text = "\n".join(open(f, encoding="utf-8").read() for f in default_corpus_files("eval")[100:103])
    ids = torch.tensor(tok.tokenizer.encode(text).ids[:3000])
    r = StreamingEvaluator("default", chunk_size=512, overlap=128, device="cpu", verbose=False).evaluate_streaming(ids)
    assert r["perplexity"] < 400


def test_auto_says_why_a_failed_cache_check_means_sliding(capsys):
    """auto used to turn into sliding silently on any exception of the kv-cache check."""
    m = tiny_gpt2(n_positions=128)
    ev = StreamingEvaluator(m, chunk_size=16, device="cpu", verbose=True)
    real = ev.adapter.forward_stream

    def broken(inputs):
        raise TypeError("this model's forward takes no cache argument (simulated)")

    ev.adapter.forward_stream = broken
    x = torch.randint(0, V, (60,), generator=torch.Generator().manual_seed(0))
    res = ev.evaluate_streaming(x)
    assert res["mode"] == "sliding"
    assert "kv-cache unusable" in res["mode_reason"] and "TypeError" in res["mode_reason"]
    assert "simulated" in capsys.readouterr().err  # printed when verbose
    ev.adapter.forward_stream = real
    ev.adapter._carry_checks.clear()
    ok = ev.evaluate_streaming(x)
    assert ok["mode"] == "kv-cache" and "reproduces the full forward" in ok["mode_reason"]


def test_one_chunk_size_default_for_every_entry_point():
    """create_streaming_evaluator(m) used to evaluate 8192-token windows, StreamingEvaluator(m) the
    model's context: the same data gave different numbers depending on the entry point."""
    m = tiny_gpt2(n_positions=96)
    x = torch.randint(0, V, (400,), generator=torch.Generator().manual_seed(1))
    a = create_streaming_evaluator(m, StreamingEvalConfig(device="cpu", verbose=False, mode="sliding"))
    b = StreamingEvaluator(m, device="cpu", verbose=False, mode="sliding")
    assert StreamingEvalConfig().chunk_size is None and a.chunk_size == b.chunk_size == 96
    ra, rb = a.evaluate_streaming(x), b.evaluate_streaming(x)
    assert ra["num_chunks"] == rb["num_chunks"] and ra["nll_sum"] == rb["nll_sum"]
    with pytest.raises(evaluator.ConfigError, match="pass chunk_size=N"):
        StreamingEvaluator(TinyRNN("gru"), device="cpu", verbose=False)  # no context length: say how to set it
