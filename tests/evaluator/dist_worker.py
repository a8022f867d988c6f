"""One process of the distributed tests (tests/evaluator/test_distributed.py).

    python tests/evaluator/dist_worker.py OUT CASE...                      # one process
    python -m torch.distributed.run --standalone --nproc-per-node N tests/evaluator/dist_worker.py OUT CASE...

Evaluates the same deterministic documents in every case named, inside ``evaluator.distributed.session``
(the group torchrun's environment describes, or none), and rank 0 writes ``OUT/CASE.json``: the
scalars, per-document and per-chunk sums and per-token losses. ``fail``: rank 1 raises while rank 0
evaluates (the test checks that every rank exits, with the error, well within the timeout).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root (tests.*, evaluator)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluator import StreamingEvaluator  # noqa: E402
from evaluator import distributed as dd  # noqa: E402
from evaluator.data import EvalData  # noqa: E402
from evaluator.errors import ConfigError  # noqa: E402
from tests.evaluator.helpers import V, TinyRNN, tiny_gpt2  # noqa: E402

#: case -> (model, settings)
CASES = {
    "sliding": ("gpt2", dict(chunk_size=16, overlap=4, mode="sliding", batch_size=3)),
    "sliding_doc": ("gpt2", dict(chunk_size=16, mode="sliding", doc_mode="document", bos=0, batch_size=2)),
    # document mode: batch_size=1 (one document at a time, as the CPU's auto was; auto now measures its
    # size by timing, so two runs may group documents differently, in the last bits)
    "kv_doc": ("gpt2", dict(chunk_size=16, mode="kv-cache", doc_mode="document", batch_size=1)),
    "stateful_doc": ("rnn", dict(chunk_size=8, mode="stateful", doc_mode="document", bos=0, batch_size=1)),
    "kv_stream": ("gpt2", dict(chunk_size=16, mode="kv-cache", doc_mode="stream", max_tokens=200)),
    # carried state through one stream, split with --split-warmup: a warm-up reaching the stream's
    # start (K >= any block start) replays the exact prefix in the same pieces, so it equals one
    # process; K = 3 restarts each later block after 3 tokens (an approximation)
    "stateful_stream_warm": ("rnn", dict(chunk_size=8, mode="stateful", bos=0, split_warmup=10**9)),
    "kv_stream_warm": ("gpt2", dict(chunk_size=16, mode="kv-cache", max_tokens=200, split_warmup=10**9)),
    "stateful_stream_k3": ("rnn", dict(chunk_size=8, mode="stateful", bos=0, split_warmup=3)),
    "ckpt": ("gpt2", dict(chunk_size=16, overlap=8, mode="sliding", doc_mode="document", checkpoint_interval=0)),
    # kv_doc's settings with a checkpoint after every batch; DIST_WORKER_CRASH_AFTER=N kills rank 1
    # (os._exit, no cleanup: as a killed process) at its N-th forward
    "resume": ("gpt2", dict(chunk_size=16, mode="kv-cache", doc_mode="document", checkpoint_interval=1e-9,
                            batch_size=1)),
}


def data() -> EvalData:
    rng = np.random.default_rng(7)
    lens = rng.integers(0, 70, size=23)
    lens[[3, 11]] = [1, 0]  # a one-token and an empty document: no windows of their own
    ids = rng.integers(1, V, size=int(lens.sum()))
    off = np.concatenate([[0], np.cumsum(lens)])
    return EvalData.from_tokens(torch.as_tensor(ids), off, doc_bytes=lens * 3 + 1, doc_words=lens // 2 + 1)


def model(kind: str):
    return tiny_gpt2() if kind == "gpt2" else TinyRNN("gru")


def run_case(out: Path, case: str, info) -> dict | None:
    kind, settings = CASES[case]
    settings = dict(settings)
    if case in ("ckpt", "resume"):
        settings["checkpoint_dir"] = str(out / f"{case}-run")
    m = model(kind)
    crash_after = int(os.environ.get("DIST_WORKER_CRASH_AFTER", "0"))
    if crash_after and info is not None and info.rank == 1:
        body = getattr(m, "transformer", m)  # the adapter runs GPT-2's body, then the head per loss slice
        calls, forward = [0], body.forward

        def dying_forward(*args, **kwargs):
            calls[0] += 1
            if calls[0] >= crash_after:
                os._exit(3)
            return forward(*args, **kwargs)

        body.forward = dying_forward
    ev = StreamingEvaluator(m, device="cpu", verbose=False, **settings)
    try:
        r = ev.evaluate_streaming_with_metrics(data(), compute_per_token_metrics=True)
    except ConfigError as e:
        return {"error": str(e)}
    if info is not None and not info.is_main:
        return None
    pd = r["per_document"]
    return {
        "nll_sum": r["nll_sum"], "total_tokens": r["total_tokens"], "num_chunks": r["num_chunks"],
        "world_size": r["world_size"], "backend": r["backend"], "bits_per_byte": r["bits_per_byte"],
        "doc_tokens": np.asarray(pd["tokens"]).tolist(), "doc_nll": np.asarray(pd["nll"]).tolist(),
        "chunk_losses": [x if math.isfinite(x) else None for x in np.asarray(r["chunk_losses"]).tolist()],
        "bucket_tokens": np.asarray(r["position_buckets"]["tokens"]).tolist(),
        "bucket_nll": np.asarray(r["position_buckets"]["nll"]).tolist(),
        "per_token": np.asarray(r["per_token_losses"]).tolist(),
        "per_token_path": r["per_token_path"],
        "split_warmup": r.get("split_warmup"),
    }


def main() -> int:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    with dd.session("cpu") as info:
        for case in cases:
            if case == "fail":
                if info is not None and info.rank == 1:
                    raise RuntimeError("boom: rank 1 failed on purpose")
                run_case(out, "sliding", info)
                continue
            res = run_case(out, case, info)
            if res is not None:
                (out / f"{case}.json").write_text(json.dumps(res))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
