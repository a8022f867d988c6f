"""The kill -9 sweep: `streameval run` and `compare` (sliding, kv-cache, document mode, parallel
documents, a state-space model) killed with SIGKILL at many moments (inside a batch, halfway through
a checkpoint's write), then the same command again: every report equals the uninterrupted one
(metrics, CSVs without their time columns, per-token file bit for bit).

~5 minutes on 2 cores (about 60 subprocesses), so it runs only with STREAMEVAL_TEST_KILL_SWEEP=1:

    STREAMEVAL_TEST_KILL_SWEEP=1 .venv/bin/python -m pytest -q tests/evaluator/test_kill_sweep.py
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from evaluator.cli import main

from .helpers import V, tiny_gpt2
from .test_resume import _killed_run

pytestmark = pytest.mark.skipif(os.environ.get("STREAMEVAL_TEST_KILL_SWEEP") != "1",
                                reason="minutes of killed subprocesses: set STREAMEVAL_TEST_KILL_SWEEP=1")

#: results.json keys that must be equal (times, paths and settings echoes are left out)
KEYS = ("loss", "perplexity", "nll_sum", "total_tokens", "num_chunks", "bits_per_byte", "byte_perplexity",
        "word_perplexity", "num_documents", "avg_chunk_loss", "std_chunk_loss", "kl_mean", "kl_sum", "kl_stderr",
        "kl_median", "kl_p90", "kl_p99", "kl_max", "top1_agreement", "loss_reference", "nll_sum_reference",
        "candidate_top1_accuracy")
KILLS = [("mid-batch", n) for n in (1, 2, 3, 5, 8, 13)] + [("mid-write", n) for n in (1, 2, 4)]


def _report(d: Path) -> dict:
    out = {}
    for f in sorted(d.iterdir()):
        if f.name == "results.json":
            r = json.loads(f.read_text())
            out[f.name] = {k: r.get(k) for k in KEYS}
        elif f.suffix == ".csv":
            rows = list(csv.reader(open(f)))
            keep = [i for i, h in enumerate(rows[0]) if "time" not in h and "second" not in h]
            out[f.name] = [[r[i] for i in keep] for r in rows]
        elif f.suffix == ".f32":
            out[f.name] = f.read_bytes()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import numpy as np
    import torch
    import transformers as tf

    from tests.conftest import write_token_store

    root = tmp_path_factory.mktemp("sweep")
    rng = np.random.default_rng(5)
    docs = [rng.integers(1, V, size=int(n)).tolist() for n in rng.integers(2, 120, size=14)]
    store = write_token_store(root / "store", docs, vocab_size=V, shard_tokens=300)
    tiny_gpt2(n_positions=1024, seed=0).save_pretrained(root / "a")
    tiny_gpt2(n_positions=1024, seed=1).save_pretrained(root / "b")
    torch.manual_seed(0)
    tf.MambaForCausalLM(tf.MambaConfig(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4,
                                       expand=2)).save_pretrained(root / "mamba")
    return root, store


# Document mode names --batch-size 1 (one document at a time) where it used to rely on the CPU's auto
# of 1: auto is now measured by timing, so two runs may group documents differently (in the last bits).
CONFIGS = {
    "run-sliding": ["run", "a", "--chunk-size", "16", "--overlap", "4", "--batch-size", "2", "--per-token"],
    "run-kv-stream": ["run", "a", "--chunk-size", "24", "--mode", "kv-cache", "--per-token"],
    "run-kv-document": ["run", "a", "--chunk-size", "24", "--mode", "kv-cache", "--doc-mode", "document", "--batch-size", "1",
                        "--per-token"],
    "run-kv-parallel-documents": ["run", "a", "--chunk-size", "24", "--mode", "kv-cache", "--doc-mode", "document",
                                  "--batch-size", "4", "--per-token"],
    "run-mamba-stateful-document": ["run", "mamba", "--chunk-size", "16", "--mode", "stateful", "--doc-mode",
                                    "document", "--batch-size", "1", "--per-token"],
    "compare-sliding": ["compare", "a", "--chunk-size", "16", "--overlap", "4", "--batch-size", "2"],
    "compare-kv-document": ["compare", "a", "--chunk-size", "24", "--mode", "kv-cache", "--doc-mode", "document",
                            "--batch-size", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_killed_run_resumes_to_the_uninterrupted_report(setup, name):
    root, store = setup
    cmd, model, *flags = CONFIGS[name]
    ref_model = ["--reference", str(root / "b")] if cmd == "compare" else []
    base = [cmd, str(store), "--model", str(root / model), *ref_model, *flags, "--device", "cpu", "--quiet", "--no-plots"]
    ref = root / f"ref-{name}"
    assert main([*base, "--out", str(ref)]) == 0
    want = _report(ref)
    killed = 0
    for where, n in KILLS:
        out = root / f"out-{name}-{where}-{n}"
        if _killed_run(where, n, [*base, "--out", str(out), "--checkpoint-interval", "0.000001"]) != -9:
            continue  # the run ended before this kill point
        killed += 1
        assert main([*base, "--out", str(out), "--checkpoint-interval", "0.000001"]) == 0, (where, n)
        assert _report(out) == want, (where, n)
    assert killed >= 3
