"""Model comparison (evaluator/compare.py): KL(reference || candidate), top-1 agreement and both NLLs
equal a brute-force full-logits reference (float64, every target from exactly the context the
window semantics give it); a model against itself gives KL 0 and 100% agreement; quantiles are
numpy's; bad inputs are refused in one line; the CLI writes the report; an interrupted comparison
resumes to the uninterrupted result."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluator.runners as runners_mod
from evaluator import ConfigError, DataError, ModelError
from evaluator.cli import main
from evaluator.compare import compare_streaming
from evaluator.pair import PairAdapter

from .helpers import V, Interrupt, TinyRNN, interrupt_after, tiny_gpt2


SHARP = 3.0


def sharp_gpt2(seed: int, vocab: int = V, n_positions: int = 256):
    """A tiny GPT-2 with larger (tied) embeddings: peaked distributions, so KL and top-1 differ
    clearly between seeds (random init gives near-uniform ones)."""
    m = tiny_gpt2(n_positions=n_positions, vocab=vocab, seed=seed)
    with torch.no_grad():
        m.transformer.ln_f.weight.mul_(SHARP)
    return m


def _logits(model, ctx: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        o = model(ctx[None])
    return (o if isinstance(o, torch.Tensor) else o.logits)[0].double()


def _context_starts(n: int, L: int, overlap: int, tail: str = "full") -> list[int]:
    """Start of the window that scores target t (t = 1..n-1), from the window semantics."""
    stride = L - overlap
    nw = 1 + -(-max(0, n - 1 - L) // stride)
    out = []
    for t in range(1, n):
        k = 0
        while not (k * stride + 1 + (overlap if k else 0) <= t <= k * stride + L):
            k += 1
        out.append(n - 1 - L if tail == "full" and k == nw - 1 and k > 0 else k * stride)
    return out


def brute(cand, ref, v: torch.Tensor, L: int | None = None, overlap: int = 0, vocab: int | None = None) -> dict:
    """Per-target float64 statistics. L None: one full forward (kv-cache / a document that fits).
    With L, target t is predicted from x[s:t], s the start of the window that scores it: one
    forward per distinct s (a causal model's logits at t-1 see x[s:t] only)."""
    n = len(v)
    starts = [0] * (n - 1) if L is None else _context_starts(n, L, overlap)
    cache: dict = {}
    rows = []
    for t, s in zip(range(1, n), starts):
        if s not in cache:
            end = max(t2 for t2, s2 in zip(range(1, n), starts) if s2 == s)
            cache[s] = (_logits(cand, v[s:end]), _logits(ref, v[s:end]))
        zc_all, zr_all = cache[s]
        rows.append((zc_all[t - 1 - s], zr_all[t - 1 - s]))
    zc, zr = torch.stack([a for a, _ in rows]), torch.stack([b for _, b in rows])
    tg = v[1:]
    nll_c = F.cross_entropy(zc, tg, reduction="none")
    nll_r = F.cross_entropy(zr, tg, reduction="none")
    correct = zc.argmax(1) == tg
    if vocab is not None:
        zc, zr = zc[:, :vocab], zr[:, :vocab]
    lpc, lpr = F.log_softmax(zc, 1), F.log_softmax(zr, 1)
    kl = (lpr.exp() * (lpr - lpc)).sum(1)
    agree = zc.argmax(1) == zr.argmax(1)
    return {k: x.numpy().astype(np.float64) for k, x in
            dict(kl=kl, nll_c=nll_c, nll_r=nll_r, agree=agree, correct=correct).items()}


def _check(res: dict, b: dict) -> None:
    n = len(b["kl"])
    assert res["total_tokens"] == n
    np.testing.assert_allclose(np.asarray(res["per_token_kl"]), b["kl"], rtol=0, atol=1e-6)
    assert res["kl_mean"] == pytest.approx(b["kl"].mean(), abs=1e-6)
    assert res["kl_stderr"] == pytest.approx(b["kl"].std(ddof=1) / np.sqrt(n), rel=1e-4)
    assert res["top1_agreement"] == pytest.approx(100 * b["agree"].mean(), abs=1e-9)
    assert res["candidate_top1_accuracy"] == pytest.approx(100 * b["correct"].mean(), abs=1e-9)
    assert res["loss_candidate"] == pytest.approx(b["nll_c"].mean(), abs=1e-6)
    assert res["loss_reference"] == pytest.approx(b["nll_r"].mean(), abs=1e-6)
    assert res["delta_nll_mean"] == pytest.approx((b["nll_c"] - b["nll_r"]).mean(), abs=1e-6)
    assert res["perplexity_ratio"] == pytest.approx(np.exp((b["nll_c"] - b["nll_r"]).mean()), rel=1e-6)
    assert res["loss"] == res["loss_candidate"]
    # the percentiles are numpy's (method "linear") over the float32 per-token KL the run wrote
    kl32 = np.asarray(res["per_token_kl"], np.float64)
    for key, q in (("kl_median", 0.5), ("kl_p90", 0.9), ("kl_p95", 0.95), ("kl_p99", 0.99), ("kl_p999", 0.999),
                   ("kl_min", 0.0), ("kl_max", 1.0)):
        assert res[key] == pytest.approx(float(np.quantile(kl32, q)), rel=1e-12, abs=0), key
    assert 0.05 < res["kl_mean"] and 0 < res["top1_agreement"] < 100  # the models really differ


@pytest.fixture(scope="module")
def pair():
    return sharp_gpt2(0), sharp_gpt2(1)


def test_sliding_with_overlap_equals_the_brute_force_reference(pair):
    cand, ref = pair
    v = torch.from_numpy(np.random.default_rng(0).integers(0, V, 75))
    res = compare_streaming(cand, ref, v, device="cpu", verbose=False, mode="sliding", chunk_size=16, overlap=5,
                            batch_size=3, loss_slice=7)  # several loss slices per forward
    _check(res, brute(cand, ref, v, 16, 5))


@pytest.mark.parametrize("batch", [1, 3], ids=["one-document", "parallel-documents"])
def test_kv_cache_equals_the_brute_force_reference_per_document(pair, make_store, batch, monkeypatch):
    cand, ref = pair
    rng = np.random.default_rng(1)
    docs = [rng.integers(1, V, size=int(n)).tolist() for n in (30, 2, 45, 17)]
    store = make_store(docs, vocab_size=V)
    cut, keep_rows = [], PairAdapter.keep_rows

    def spy(self, m):
        cut.append((m, keep_rows(self, m)))
        return cut[-1][1]

    monkeypatch.setattr(PairAdapter, "keep_rows", spy)
    res = compare_streaming(cand, ref, store, device="cpu", verbose=False, mode="kv-cache", chunk_size=8,
                            doc_mode="document", batch_size=batch)  # 3: documents side by side, each pair of caches
    # side by side, ended documents leave both models' caches (3 rows -> 2 -> 1 as the shorter ones end)
    assert cut == ([] if batch == 1 else [(2, True), (1, True)])
    per = [brute(cand, ref, torch.tensor(d)) for d in docs]
    _check(res, {k: np.concatenate([p[k] for p in per]) for k in per[0]})
    pd = res["per_document"]
    np.testing.assert_array_equal(pd["tokens"], [len(d) - 1 for d in docs])
    np.testing.assert_allclose(pd["kl_mean"][:], [p["kl"].mean() for p in per], atol=1e-6)
    np.testing.assert_allclose(pd["top1_agreement"][:], [100 * p["agree"].mean() for p in per], atol=1e-9)
    np.testing.assert_allclose(pd["delta_nll_mean"][:], [(p["nll_c"] - p["nll_r"]).mean() for p in per], atol=1e-6)
    pos = res["position_buckets"]  # by position in the document: [1,2), [2,4), ...
    kl_by_pos = np.concatenate([p["kl"] for p in per])
    where = np.concatenate([np.arange(1, len(d)) for d in docs])
    for lo, hi, k in zip(pos["lo"], pos["hi"], pos["kl_mean"]):
        sel = (where >= lo) & (where < hi)
        if sel.any():
            assert k == pytest.approx(kl_by_pos[sel].mean(), abs=1e-6)


@pytest.mark.parametrize("mode", ["sliding", "kv-cache", "stateful"])
def test_a_model_against_itself_gives_kl_zero_and_full_agreement(mode):
    m = TinyRNN("gru") if mode == "stateful" else sharp_gpt2(3)
    v = torch.from_numpy(np.random.default_rng(2).integers(0, V, 60))
    res = compare_streaming(m, copy.deepcopy(m), v, device="cpu", verbose=False, mode=mode, chunk_size=16,
                            overlap=4 if mode == "sliding" else 0)
    assert res["kl_max"] == 0.0 and res["kl_mean"] == 0.0 and res["top1_agreement"] == 100.0
    assert res["perplexity_ratio"] == 1.0 and res["delta_nll_mean"] == 0.0


def test_vocabulary_prefix_is_refused_unless_allowed_and_then_compared_over_the_shared_ids():
    cand, ref = sharp_gpt2(0, vocab=V + 7), sharp_gpt2(1)
    v = torch.from_numpy(np.random.default_rng(3).integers(0, V, 40))
    with pytest.raises(ModelError, match=r"104 vocabulary ids .* 97: .*allow_vocab_prefix=True") as e:
        compare_streaming(cand, ref, v, device="cpu", verbose=False, chunk_size=16)
    assert "\n" not in str(e.value)
    res = compare_streaming(cand, ref, v, device="cpu", verbose=False, chunk_size=16, mode="kv-cache",
                            allow_vocab_prefix=True)
    assert res["compared_vocab"] == V
    _check(res, brute(cand, ref, v, vocab=V))


def test_different_tokenizers_and_a_missing_reference_device_give_one_line(pair):
    cand, ref = copy.deepcopy(pair[0]), copy.deepcopy(pair[1])
    cand.config.tokenizer_sha256, ref.config.tokenizer_sha256 = "a" * 64, "b" * 64
    v = torch.from_numpy(np.random.default_rng(4).integers(0, V, 40))
    with pytest.raises(DataError, match="use different tokenizers") as e:
        compare_streaming(cand, ref, v, device="cpu", verbose=False, chunk_size=16)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        compare_streaming(pair[0], pair[1], v, device="cpu", reference_device="cuda:99", verbose=False, chunk_size=16)
    assert "cuda:99" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="same model object"):
        m = TinyRNN("gru")
        compare_streaming(m, m, v, device="cpu", verbose=False, chunk_size=16, mode="stateful")


def test_an_interrupted_comparison_resumes_to_the_uninterrupted_result(pair, tmp_path, monkeypatch):
    cand, ref = pair
    v = torch.from_numpy(np.random.default_rng(5).integers(0, V, 90))
    kw = dict(device="cpu", verbose=False, mode="kv-cache", chunk_size=8, checkpoint_interval=1e-9)
    whole = compare_streaming(cand, ref, v, **kw)
    ck = tmp_path / "ck"
    with monkeypatch.context() as m:
        interrupt_after(m, runners_mod.CarriedRunner, 4)
        with pytest.raises(Interrupt):
            compare_streaming(cand, ref, v, checkpoint_dir=str(ck), **kw)
    assert (ck / "per_token_kl.f32.partial").exists()
    res = compare_streaming(cand, ref, v, checkpoint_dir=str(ck), **kw)
    assert res["resumed_from_window"] == 4
    for k in ("kl_sum", "nll_sum", "nll_sum_reference", "top1_agreement", "kl_p99", "kl_max"):
        assert res[k] == whole[k], k
    np.testing.assert_array_equal(np.asarray(res["per_token_kl"]), np.asarray(whole["per_token_kl"]))
    assert res["per_token_kl_path"] == str(ck / "per_token_kl.f32")
    # a run's checkpoint is not a comparison's: the identity says which
    from evaluator import StreamingEvaluator

    with pytest.raises(Exception, match="checkpoint"):
        StreamingEvaluator(cand, chunk_size=8, mode="kv-cache", device="cpu", verbose=False).evaluate_streaming(
            v, checkpoint_dir=str(ck))


def test_cli_compare_writes_the_report(tmp_path, make_store, capsys):
    rng = np.random.default_rng(7)
    store = make_store([rng.integers(1, V, size=40).tolist() for _ in range(3)], vocab_size=V)
    a, b = tmp_path / "cand", tmp_path / "ref"
    sharp_gpt2(0).save_pretrained(a)
    sharp_gpt2(1).save_pretrained(b)
    out = tmp_path / "out"
    rc = main(["compare", str(store), "--model", str(a), "--reference", str(b), "--chunk-size", "16", "--overlap", "4",
               "--device", "cpu", "--quiet", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "KL(reference || candidate) mean" in text and "top-1 agreement (%)" in text
    r = json.loads((out / "results.json").read_text())
    assert r["total_tokens"] == 3 * 40 - 1 and r["candidate"] == str(a) and r["reference"] == str(b)
    assert 0 < r["kl_mean"] and r["kl_median"] <= r["kl_p90"] <= r["kl_p99"] <= r["kl_max"]
    assert r["model_identity"]["kind"] == "pair"
    assert np.fromfile(out / "per_token_kl.f32", np.float32).mean() == pytest.approx(r["kl_mean"], rel=1e-5)
    header = (out / "documents.csv").read_text().splitlines()[0]
    assert header.endswith("nll_reference,kl_mean,top1_agreement,delta_nll_mean")
    # bad input: one line, exit 2
    rc = main(["compare", str(store), "--model", str(a), "--reference", str(b), "--reference-device", "cuda:99",
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "cuda:99" in err


def test_bench_compare_runs_at_toy_size(tmp_path, make_store, capsys):
    from benchmarks import bench_compare

    rng = np.random.default_rng(8)
    store = make_store([rng.integers(1, V, size=150).tolist() for _ in range(2)], vocab_size=V)
    assert bench_compare.main(["--store", str(store), "--device", "cpu", "--tokens", "200", "--chunk-size", "32",
                               "--batch-size", "4", "--layers", "1", "--hidden", "32", "--out", str(tmp_path)]) == 0
    m = json.loads((tmp_path / "bench_compare.json").read_text())
    assert m["scored"] == 199 and m["logits_file_bytes"] == V * 199 * 4
    assert m["perplexity_candidate"] == pytest.approx(m["perplexity_candidate_two_runs"], rel=1e-9)
    assert m["perplexity_reference"] == pytest.approx(m["perplexity_reference_two_runs"], rel=1e-9)
    assert m["ratio_compare_vs_two_runs"] > 0 and 0 < m["top1_agreement"] <= 100
    assert "ratio compare / two runs" in capsys.readouterr().out


def test_ids_a_model_rules_out_with_minus_inf_logits():
    """An id the reference gives -inf adds 0 to KL (also when the candidate does too); one only the
    candidate rules out makes KL infinite. Checked on pair_stats itself against float64 sums."""
    from evaluator.kl import pair_stats
    from evaluator.pair import PairOutput
    from evaluator.models import ForwardOutput

    g = torch.Generator().manual_seed(9)
    zr, zc = torch.randn(1, 6, 11, generator=g) * 3, torch.randn(1, 6, 11, generator=g) * 3
    zr[0, :, 0] = -math.inf  # the reference rules id 0 out everywhere
    zc[0, 1, 0] = -math.inf  # ... and the candidate too, on row 1
    zc[0, 4, 5] = -math.inf  # only the candidate rules id 5 out on row 4
    tg = torch.randint(1, 11, (1, 6), generator=g)
    got = pair_stats(PairOutput(ForwardOutput(logits=zc), ForwardOutput(logits=zr), None), tg, torch.arange(6), 4)
    lpr, lpc = F.log_softmax(zr[0].double(), 1), F.log_softmax(zc[0].double(), 1)
    pr = lpr.exp()
    want = torch.where(pr > 0, pr * (lpr - lpc), torch.zeros_like(pr)).sum(1)
    assert math.isinf(want[4]) and math.isinf(got[4, 2])
    keep = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(got[keep, 2].numpy(), want[keep].numpy(), atol=1e-6)
    np.testing.assert_allclose(got[:, 0].numpy(), -lpc.gather(1, tg[0, :, None]).squeeze(1).numpy(), atol=1e-5)
    np.testing.assert_allclose(got[:, 1].numpy(), -lpr.gather(1, tg[0, :, None]).squeeze(1).numpy(), atol=1e-5)


def test_a_reference_that_does_not_fit_the_device_is_one_line(pair):
    """A model too large for the device: every forward runs out of memory, so after halving the
    batch down to one window the comparison stops with the run's one-line advice."""

    class Logits(torch.nn.Module):  # the model's logits, or out of memory on every forward
        def __init__(self, inner, fits: bool):
            super().__init__()
            self.inner, self.fits, self.vocab_size, self.calls = inner, fits, V, 0

        def forward(self, ids):
            self.calls += 1
            if not self.fits:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return self.inner(ids).logits

    v = torch.from_numpy(np.random.default_rng(6).integers(0, V, 100))
    huge = Logits(pair[1], fits=False)
    with pytest.raises(ModelError, match="out of device memory on a single window of chunk_size=16") as e:
        compare_streaming(Logits(pair[0], fits=True), huge, v, device="cpu", verbose=False, chunk_size=16,
                          batch_size=4, mode="sliding")
    assert "\n" not in str(e.value) and "chunk_size=8" in str(e.value)
    assert huge.calls == 3  # batches of 4, 2, 1 windows tried: halving, then the clear error
