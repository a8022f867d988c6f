"""The architecture matrix, as a user meets it: transformers' own model classes (tiny random
configs) in their exact carried mode (kv-cache for attention models, full or sliding-window;
stateful for RWKV and the Mamba family), document mode, chunks shorter than the documents, one
document at a time and four side by side, with checkpoints and an interrupted run resumed; every
per-token loss against a brute-force full forward of each document (fp32: 1e-5), and in bfloat16
within twice the distance of the bfloat16 full forward itself from the fp32 one.

docs/evaluate.md "Models verified" lists these; this file is the command that verifies them."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluator.runners as runners_mod
from evaluator import ModelError, StreamingEvaluator

from .helpers import V, Interrupt, interrupt_after, tiny_gpt2, tiny_rwkv
from .test_resume import _same

CHUNK = 8
WINDOW = 5  # sliding_window of Mistral/Gemma2: smaller than the chunk, so the cache drops keys


def _attn(**kw):
    return dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, bos_token_id=0, eos_token_id=0, **kw)


def _build(name: str):
    import transformers as tf

    torch.manual_seed(0)
    makers = {
        "gpt2": lambda: tiny_gpt2(n_positions=256),
        "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_attn(num_key_value_heads=2))),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_attn(num_key_value_heads=2))),
        "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**_attn(num_key_value_heads=2, head_dim=8))),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**_attn(num_key_value_heads=2, pad_token_id=0))),
        "gpt-neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**_attn())),
        "falcon-rotary": lambda: tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=False,
            max_position_embeddings=256, bos_token_id=0, eos_token_id=0)),
        "falcon-alibi": lambda: tf.FalconForCausalLM(tf.FalconConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True,
            max_position_embeddings=256, bos_token_id=0, eos_token_id=0)),
        "mistral-sliding": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_attn(num_key_value_heads=2,
                                                                                  sliding_window=WINDOW))),
        "gemma2-sliding": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**_attn(num_key_value_heads=2, head_dim=8,
                                                                                sliding_window=WINDOW))),
        "jamba-hybrid": lambda: tf.JambaForCausalLM(tf.JambaConfig(
            **_attn(num_key_value_heads=2), attn_layer_period=2, attn_layer_offset=1,
            expert_layer_period=2, expert_layer_offset=1, num_experts=2, mamba_d_state=8, mamba_d_conv=4,
            mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False)),
        "rwkv": lambda: tiny_rwkv(),
        "mamba": lambda: tf.MambaForCausalLM(tf.MambaConfig(
            vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2,
            bos_token_id=0, eos_token_id=0)),
        "mamba2": lambda: tf.Mamba2ForCausalLM(tf.Mamba2Config(
            vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2, num_heads=8,
            head_dim=8, n_groups=1, chunk_size=16, bos_token_id=0, eos_token_id=0)),
        "falcon-mamba": lambda: tf.FalconMambaForCausalLM(tf.FalconMambaConfig(
            vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2,
            bos_token_id=0, eos_token_id=0)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = makers[name]().eval()
    if name.startswith(("mamba", "falcon-mamba", "jamba")):
        # Random init leaves the SSM close to memoryless; a larger decay range makes the carried
        # state matter to the next chunk (a dropped state then shows in every comparison).
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("A_log"):
                    p.mul_(0.1)
    return m


ATTENTION = ["gpt2", "llama-gqa", "qwen2", "gemma", "phi3", "gpt-neox", "falcon-rotary", "falcon-alibi",
             "mistral-sliding", "gemma2-sliding", "jamba-hybrid"]  # (Jamba: attention and Mamba layers)
CARRIED_STATE = ["rwkv", "mamba", "mamba2", "falcon-mamba"]
ALL = ATTENTION + CARRIED_STATE
# The fast lane (pytest -m "not slow") runs one architecture per kind of carried state: a plain
# cache (gpt2), grouped-query attention (llama-gqa), a sliding-window cache (gemma2-sliding), an SSM
# cache (mamba2); the whole matrix (about 5x the time) runs in the full suite. RWKV's own state is
# also in the fast lane's tests/evaluator/test_parallel_docs.py.
FAST = ("gpt2", "llama-gqa", "gemma2-sliding", "mamba2")
MATRIX = [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in ALL]


@pytest.fixture(scope="module")
def docs():
    g = np.random.default_rng(11)
    return [g.integers(1, V, int(n)).tolist() for n in (29, 3, 41, 17, 1, 24)]


@pytest.fixture(scope="module")
def many_docs():
    """Enough short documents for two segments of four side by side (a checkpoint between them)."""
    g = np.random.default_rng(12)
    return [g.integers(1, V, int(n)).tolist() for n in g.integers(1, 13, 40)]


@pytest.fixture(scope="module")
def models():
    return {}


def _model(models, name):
    if name not in models:
        models[name] = _build(name)
    return models[name]


def _full_nll(model, docs, dtype: str = "float32") -> np.ndarray:
    """Per-target NLL of one full forward per document (no cache), in ``dtype`` (autocast)."""
    out = []
    ctx = torch.autocast("cpu", dtype=getattr(torch, dtype)) if dtype != "float32" else torch.inference_mode()
    with torch.inference_mode(), ctx:
        for d in docs:
            if len(d) < 2:
                continue
            x = torch.tensor(d)[None]
            logits = model(input_ids=x[:, :-1], use_cache=False).logits
            out.append(F.cross_entropy(logits[0].float(), x[0, 1:], reduction="none").double().numpy())
    return np.concatenate(out)


def _evaluate(model, store, ckdir=None, **kw):
    ev = StreamingEvaluator(model, chunk_size=CHUNK, device="cpu", verbose=False, doc_mode="document",
                            checkpoint_interval=1e-9, **kw)
    return ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True, checkpoint_dir=ckdir)


@pytest.mark.parametrize("name", MATRIX)
def test_carried_mode_equals_full_forward_and_resumes_exactly(name, make_store, docs, many_docs, models, tmp_path,
                                                              monkeypatch):
    model = _model(models, name)
    mode = "kv-cache" if name in ATTENTION else "stateful"
    for batch, dd in ((1, docs), (4, many_docs)):
        store = make_store(dd, vocab_size=V)
        ref = _full_nll(model, dd)
        # batch 1 leaves the mode to auto, which must pick the exact one for every architecture
        whole = _evaluate(model, store, batch_size=1) if batch == 1 else _evaluate(model, store, mode=mode, batch_size=batch)
        assert whole["mode"] == mode, whole["mode_reason"]
        np.testing.assert_allclose(np.asarray(whole["per_token_losses"]), ref, rtol=1e-5, atol=1e-5)
        ck = tmp_path / f"ck{batch}"
        with monkeypatch.context() as m:
            interrupt_after(m, runners_mod.CarriedRunner, 3 if batch == 1 else 1)  # (B > 1: a step is a segment)
            with pytest.raises(Interrupt):
                _evaluate(model, store, ck, batch_size=batch)
        resumed = _evaluate(model, store, ck, batch_size=batch)
        assert resumed["resumed_from_window"] > 0
        _same(resumed, whole)  # bit for bit: the restored cache continues exactly


@pytest.mark.parametrize("name", MATRIX)
def test_bfloat16_carried_mode_lands_within_twice_its_own_full_forward_rounding(name, make_store, docs, models):
    model = _model(models, name)
    store = make_store(docs, vocab_size=V)
    fp32 = _full_nll(model, docs)
    own = np.abs(_full_nll(model, docs, "bfloat16") - fp32).mean()
    res = _evaluate(model, store, dtype="bfloat16", batch_size=1)
    assert res["mode"] in ("kv-cache", "stateful")
    assert res["carry_check"] is None or res["carry_check"]["ok"]  # (RWKV: its own state, no cache to check)
    got = np.abs(np.asarray(res["per_token_losses"], np.float64) - fp32).mean()
    assert got <= 2 * own + 1e-6, (got, own)


class _IgnoresItsCache(torch.nn.Module):
    """A GPT-2 that accepts a cache argument and ignores it: every chunk starts without context."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_gpt2(n_positions=256)
        self.config = self.inner.config

    def forward(self, input_ids, past_key_values=None, use_cache=False, **kw):
        return self.inner(input_ids=input_ids, use_cache=False)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_cache_that_is_really_wrong_is_refused_in_every_dtype(dtype, make_store, docs):
    store = make_store(docs, vocab_size=V)
    bad = _adapter_around(_IgnoresItsCache())
    with pytest.raises(ModelError, match=f"carried cache in {dtype}.*differ from one full forward.*rounding"):
        _evaluate(bad, store, mode="kv-cache", dtype=dtype)
    res = _evaluate(bad, store, dtype=dtype)  # auto says why and falls back to exact sliding windows
    assert res["mode"] == "sliding" and "kv-cache unusable" in res["mode_reason"]
    assert res["carry_check"]["max_diff"] > 10 * res["carry_check"]["tolerance"]


class _ShapeRounding(torch.nn.Module):
    """GPT-2 whose logits carry a perturbation of bfloat16-rounding size that depends on the
    forward's shape, as on devices whose half-precision kernels tile by shape: a correct cache then
    differs from the full forward by rounding only (the old check compared fp32-upcast logits at
    the fp32 tolerance, 1e-4, and refused every such model in bfloat16)."""

    def __init__(self, eps: float):
        super().__init__()
        self.inner = tiny_gpt2(n_positions=256)
        self.config = self.inner.config
        self.eps = eps

    def forward(self, input_ids, **kw):
        out = self.inner(input_ids=input_ids, **kw)
        T = input_ids.shape[1]
        g = torch.Generator().manual_seed(T)
        noise = (torch.rand(T, out.logits.shape[-1], generator=g) * 2 - 1) * self.eps
        out.logits = out.logits + noise.to(out.logits.dtype)
        return out


def _adapter_around(wrapper):
    from evaluator.models import HFAttentionAdapter

    a = HFAttentionAdapter(wrapper.inner)
    a.module, a.body = wrapper, None  # the adapter calls the wrapper's full forward
    return a


def test_half_precision_rounding_is_told_from_a_wrong_cache(make_store, docs):
    store = make_store(docs, vocab_size=V)
    res = _evaluate(_adapter_around(_ShapeRounding(4e-3)), store, mode="kv-cache", dtype="bfloat16")
    chk = res["carry_check"]
    assert res["mode"] == "kv-cache" and chk["ok"] and chk["dtype"] == "bfloat16"
    assert 1e-4 < chk["max_diff"] <= chk["tolerance"] and chk["rounding"] > 0
    assert res["total_tokens"] == sum(len(d) - 1 for d in docs if len(d) >= 2)


@pytest.mark.slow
@pytest.mark.parametrize("name, batch", [("mistral-sliding", "1"), ("mamba", "1"), ("gemma2-sliding", "4")])
def test_a_killed_cli_run_of_a_saved_model_resumes_to_the_uninterrupted_report(name, batch, tmp_path, make_store,
                                                                                many_docs, models):
    """As a user meets it: a saved model folder, `streameval run --out`, SIGKILL mid-run, the same
    command again. A sliding-window model used to fail here at the final checkpoint, exit 2."""
    from evaluator.cli import main

    from .test_resume import _csv, _killed_run

    folder = tmp_path / name
    _model(models, name).save_pretrained(folder)
    store = make_store(many_docs, vocab_size=V)
    common = ["run", str(store), "--model", str(folder), "--device", "cpu", "--quiet", "--per-token", "--no-plots",
              "--doc-mode", "document", "--chunk-size", str(CHUNK), "--batch-size", batch]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*common, "--out", str(ref)]) == 0
    assert _killed_run("mid-batch", 2, [*common, "--out", str(out), "--checkpoint-interval", "0.000001"]) == -9
    assert not (out / "results.json").exists()
    assert main([*common, "--out", str(out), "--checkpoint-interval", "0.000001"]) == 0
    got, want = (json.loads((d / "results.json").read_text()) for d in (out, ref))
    assert got["nll_sum"] == want["nll_sum"] and got["mode"] == want["mode"] in ("kv-cache", "stateful")
    assert _csv(out / "documents.csv") == _csv(ref / "documents.csv")


def test_a_cache_that_cannot_be_saved_is_said_at_the_start_and_the_run_finishes(tmp_path, make_store, docs, models,
                                                                                 monkeypatch, capsys):
    from evaluator import hf_cache

    def unsaveable(cache, device=None):
        raise hf_cache.CacheStateError("cache layer 0 (ExoticLayer).codebook is a Quantizer, which a checkpoint cannot hold")

    model = _model(models, "gpt2")
    store = make_store(docs, vocab_size=V)
    want = _evaluate(model, store, mode="kv-cache", batch_size=1)  # (a fixed size: auto's depends on timing)
    monkeypatch.setattr(hf_cache, "cache_state", unsaveable)
    ev = StreamingEvaluator(model, chunk_size=CHUNK, device="cpu", verbose=True, doc_mode="document", mode="kv-cache",
                            checkpoint_interval=1e-9, batch_size=1)
    got = ev.evaluate_streaming_with_metrics(store, compute_per_token_metrics=True, checkpoint_dir=tmp_path / "ck")
    err = capsys.readouterr().err
    assert "no checkpoints before the end of this run" in err and "Quantizer" in err
    assert not got["carry_check"]["checkpoint"] and got["nll_sum"] == want["nll_sum"]
