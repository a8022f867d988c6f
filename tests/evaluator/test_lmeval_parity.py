"""Parity with lm-evaluation-harness: its own HFLM ``loglikelihood_rolling`` and our evaluator on the
same local model, tokenizer and documents give the same NLL, bits per byte, byte and word perplexity.

Our settings are the README's recipe (section "Numbers that match lm-evaluation-harness"): document
mode, BOS = HFLM's prefix token, overlap 0, tail ``full``, chunk size = HFLM's ``max_length``. The
model is a random GPT-2 with ``initializer_range=0.5``, so its predictions are peaked and a token
scored with other context than lm-eval gives it changes the NLL far beyond the tolerance (a
near-uniform random model would hide such errors). Skipped when lm-eval is not installed (it is
the ``parity`` extra: ``pip install -c .ci/constraints.txt -e '.[test,parity]'``). Nothing is
downloaded: the model and tokenizer objects are handed to HFLM, and HF_HUB_OFFLINE is set.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[test,parity]')")
pytest.importorskip("accelerate", reason="lm-eval's HFLM needs accelerate (pip install -e '.[test,parity]')")

from evaluator import StreamingEvaluator  # noqa: E402
from evaluator.cli import main as eval_main  # noqa: E402
from streamdata import open_store, tokenize_dataset  # noqa: E402

from ..conftest import CORPUS, train_bpe  # noqa: E402
from ..streamdata.test_tokenize import write_jsonl  # noqa: E402

# documents with leading/trailing whitespace (where the word rules differ), an empty one (no target,
# one word), one token long, and long ones (several windows at the smaller max_length)
DOCS = CORPUS + [" leading and trailing whitespace \n", "\n\n" + "word and more words " * 12 + "\n", "x",
                 "Ein längerer Text, über mehrere Zeilen.\n\tMit Tabs\tund Leerzeichen.  \n" * 3]
MAX_POSITIONS = 512


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: conftest sets it too
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("parity")
    tok_json = train_bpe(root / "tokenizer.json", DOCS, vocab_size=320)
    vocab = Tokenizer.from_file(str(tok_json)).get_vocab_size()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_positions=MAX_POSITIONS, n_embd=32, n_layer=2, n_head=4,
                     initializer_range=0.5, bos_token_id=0, eos_token_id=0)
    folder = root / "model"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GPT2LMHeadModel(cfg).save_pretrained(folder)
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(tok_json)),
                                eos_token="<|endoftext|>").save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        hf_tok = AutoTokenizer.from_pretrained(folder)
    # the store is tokenized with the ORIGINAL tokenizer.json (the model folder holds the re-saved
    # one): the tokenizer check must accept it. No EOS/BOS in the store: lm-eval scores the text only.
    store = root / "store"
    tokenize_dataset(source=str(write_jsonl(root / "docs.jsonl", DOCS)), tokenizer=str(tok_json), out=str(store),
                     eos="none", bos="none")
    with open_store(store) as s:
        longest = int(np.diff(s.doc_offsets).max())
    return folder, model, hf_tok, store, longest


def _lm_eval(model, hf_tok, max_length: int):
    """lm-eval's per-document log-likelihoods, its prefix token and its own metric aggregates."""
    from lm_eval.api import metrics as lm_metrics
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=hf_tok, max_length=max_length, batch_size=4)
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(DOCS)]
    ll = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    words = [Task.count_words(d) for d in DOCS]
    nbytes = [Task.count_bytes(d) for d in DOCS]
    agg = {
        "word_perplexity": lm_metrics.weighted_perplexity(list(zip(ll, words))),
        "byte_perplexity": lm_metrics.weighted_perplexity(list(zip(ll, nbytes))),
        "bits_per_byte": lm_metrics.bits_per_byte(list(zip(ll, nbytes))),
    }
    return np.array(ll), lm.prefix_token_id, agg, sum(words), sum(nbytes)


def _ours(folder, store, prefix: int, max_length: int, mode: str):
    ev = StreamingEvaluator(str(folder), chunk_size=max_length, overlap=0, doc_mode="document", bos=prefix,
                            tail="full", mode=mode, device="cpu", verbose=False)
    return ev.evaluate_streaming_with_metrics(str(store))


@pytest.mark.parametrize("where", ["above", "below"])
def test_loglikelihood_rolling_parity(setup, where):
    folder, model, hf_tok, store, longest = setup
    # above: every document in one window; below: several windows, the last one right-aligned
    max_length = MAX_POSITIONS if where == "above" else 16
    assert (max_length > longest + 1) if where == "above" else (max_length < longest // 4)
    ll, prefix, agg, words, nbytes = _lm_eval(model, hf_tok, max_length)
    assert prefix == hf_tok.eos_token_id == 0 and hf_tok.bos_token_id is None  # HFLM: BOS if set, else EOS
    modes = ["sliding", "kv-cache"] if where == "above" else ["sliding"]
    for mode in modes:
        r = _ours(folder, store, prefix, max_length, mode)
        assert r["total_words"] == words and r["total_bytes"] == nbytes and r["word_rule"] == "lm-eval"
        doc_nll = np.asarray(r["per_document"]["nll"][: len(DOCS)], dtype=np.float64)
        np.testing.assert_allclose(doc_nll, -ll, rtol=1e-5, atol=1e-6, err_msg=f"{mode} per-document NLL")
        assert r["nll_sum"] == pytest.approx(-ll.sum(), rel=1e-5)
        for k in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
            assert r[k] == pytest.approx(agg[k], rel=1e-5), (mode, k)


def test_tail_short_is_not_lm_evals(setup):
    """The check above can fail: with the short tail (less context for each last window) the NLL
    of the multi-window documents moves far beyond the tolerance."""
    folder, model, hf_tok, store, _ = setup
    ll, prefix, _, _, _ = _lm_eval(model, hf_tok, 16)
    ev = StreamingEvaluator(str(folder), chunk_size=16, overlap=0, doc_mode="document", bos=prefix, tail="short",
                            mode="sliding", device="cpu", verbose=False)
    r = ev.evaluate_streaming_with_metrics(str(store))
    assert abs(r["nll_sum"] + ll.sum()) > 1e-3 * abs(ll.sum())


def test_cli_recipe(setup, capsys):
    """The README's command line gives lm-eval's word perplexity too (printed with its rule). Without
    ``--mode sliding``, auto picks kv-cache here (every document fits the model): more context than
    lm-eval's windows give, so a lower NLL."""
    folder, model, hf_tok, store, _ = setup
    _, prefix, agg, _, _ = _lm_eval(model, hf_tok, 16)
    recipe = ["--doc-mode", "document", "--bos", str(prefix), "--mode", "sliding", "--overlap", "0", "--tail", "full",
              "--chunk-size", "16"]
    assert eval_main(["run", str(store), "--model", str(folder), *recipe, "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("word perplexity (lm-eval words)"))
    assert float(line.split()[-1].replace(",", "")) == pytest.approx(agg["word_perplexity"], rel=1e-4)
    assert not math.isnan(agg["word_perplexity"])
