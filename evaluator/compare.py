"""Model comparison: a candidate and a reference read the same windows; per scored target only
scalars leave the device (KL divergence, both NLLs, top-1 agreement), never logits.

People who quantize, distill, prune or fine-tune a model compare it with the original token by
token. llama.cpp's ``llama-perplexity --kl-divergence`` writes the reference's logits to disk first
(vocabulary x scored tokens x 4 bytes) and reads them back; here both models run on the same
batch and the statistics are computed slice by slice on the device.

How it plugs into the one engine loop (:class:`evaluator.engine.StreamingEvaluator`), with no
copy of the loop or the runners; one module per job:

- :mod:`evaluator.pair`: :class:`~evaluator.pair.PairAdapter`, a model adapter over both models
  (both forwards, both states or KV caches, the paired carry check). The reference may live on
  another device (``reference_device``).
- :mod:`evaluator.kl`: :func:`~evaluator.kl.pair_stats`, the runners' scoring hook: per scored
  target the fp32 row ``[nll_candidate, nll_reference, KL(ref || cand), KL^2, top-1 agree,
  candidate top-1 == target]`` (:data:`~evaluator.kl.COLUMNS`; the definitions are there).
- :mod:`evaluator.quantiles`: exact quantiles of the float32 per-token KL in bounded memory (two
  passes over the memory-mapped file), numpy's default ``linear`` method (``np.quantile(kl, q)``).
- here: :func:`compare_streaming` (the API: loads both models, checks their tokenizers, runs the
  engine) and :data:`COMPARE` (an :class:`evaluator.scoring.Scoring`), which names the columns for
  the float64 sums (total, per window, per document, per position bucket: the run's machinery
  with more columns), writes the KL column to the per-token file, and assembles the results
  (KL mean and standard error, quantiles, agreement, both losses and perplexities).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np
import torch

from .config import StreamingEvalConfig, resolve_device
from .engine import StreamingEvaluator
from .scoring import Scoring
from .errors import ConfigError, DataError
from .kl import AGREE, COLUMNS, CORRECT, KL, KL_SQ, NLL, NLL_REF, pair_stats
from .metrics import MetricSums, perplexity
from .models import StatefulModuleAdapter, load_model
from .pair import PairAdapter
from .quantiles import quantiles
from .results import CompareResult, detail as run_detail
from .run_folder import RunFolder, check_output_file, per_token_name
from .spill import COLUMNS as RUN_SPILL, BlockView
from .sync_debug import SyncDebug

__all__ = ["COMPARE", "QUANTILES", "compare_result", "compare_streaming"]

#: Spilled columns: the run's, plus every further statistic per window and per document.
SPILL = {**RUN_SPILL, **{f"window_{c}": ("<f8", "windows") for c in COLUMNS[1:]},
         **{f"document_{c}": ("<f8", "documents") for c in COLUMNS[1:]}}

#: Quantiles reported (besides min and max), as result keys.
QUANTILES = {"kl_median": 0.5, "kl_p90": 0.9, "kl_p95": 0.95, "kl_p99": 0.99, "kl_p999": 0.999}


# ---- results -----------------------------------------------------------------------------------
def _stderr(s: float, s2: float, n: int) -> float:
    """Standard error of a mean from the float64 sum and sum of squares of n values."""
    if n < 2:
        return math.nan
    var = max(0.0, (s2 - s * s / n) / (n - 1))
    return math.sqrt(var / n)


def _summary(sums: MetricSums) -> dict[str, Any]:
    t, n = sums.totals(), sums.tokens
    agree = t[AGREE] / n
    return {
        "kl_mean": t[KL] / n,
        "kl_stderr": _stderr(float(t[KL]), float(t[KL_SQ]), n),
        "kl_sum": float(t[KL]),
        "top1_agreement": 100.0 * agree,  # percent
        "top1_agreement_stderr": 100.0 * math.sqrt(agree * (1 - agree) / (n - 1)) if n > 1 else math.nan,
        "candidate_top1_accuracy": 100.0 * t[CORRECT] / n,
        "loss_candidate": t[NLL] / n,
        "loss_reference": t[NLL_REF] / n,
        "perplexity_candidate": perplexity(float(t[NLL]), n),
        "perplexity_reference": perplexity(float(t[NLL_REF]), n),
        "perplexity_ratio": math.exp((t[NLL] - t[NLL_REF]) / n),  # PPL(cand) / PPL(ref)
        "delta_nll_mean": (t[NLL] - t[NLL_REF]) / n,  # candidate - reference, nats/token
        "nll_sum_reference": float(t[NLL_REF]),
    }


def _detail(run: Any, ed: Any, sums: MetricSums, files: dict[str, Any]) -> dict[str, Any]:
    out = run_detail(run, ed, sums, files)  # the candidate's chunk/document/byte figures (its NLL: column 0)
    nd = ed.num_documents
    tok = files["document_tokens"][:nd]
    doc = {c: files[f"document_{c}"][:nd] for c in COLUMNS[1:]}
    pd = out["per_document"]
    pd.update(
        nll_reference=doc["nll_ref"],
        kl=doc["kl"],
        kl_mean=BlockView(np.divide, doc["kl"], tok),
        top1_agreement=BlockView(lambda a, b: 100.0 * a / b, doc["agree"], tok),
        delta_nll_mean=BlockView(lambda a, b, c: (a - b) / c, files["document_nll"][:nd], doc["nll_ref"], tok),
    )
    _, bn, bt = sums.buckets(column=None)
    pos = out["position_buckets"]
    last = len(pos["hi"])
    with np.errstate(divide="ignore", invalid="ignore"):
        pos.update(
            loss_reference=bn[:last, NLL_REF] / bt[:last],
            kl_mean=bn[:last, KL] / bt[:last],
            top1_agreement=100.0 * bn[:last, AGREE] / bt[:last],
            delta_nll_mean=(bn[:last, NLL] - bn[:last, NLL_REF]) / bt[:last],
        )
    return out


#: The comparison's scoring (see the module docstring).
COMPARE = Scoring("compare", score=pair_stats, columns=COLUMNS, spill=SPILL,
                  per_token_column=KL, summary=_summary, detail=_detail)


# ---- the API -----------------------------------------------------------------------------------
def _check_tokenizers(cfg: StreamingEvalConfig, pair: PairAdapter) -> None:
    """Both models must share a tokenizer (when both are known). The store is then checked by the
    engine, as for a run, against the pair's identity: the candidate's, else the reference's (when
    both are known they are equal by now), so it matches both."""
    if not cfg.check_tokenizer:
        return
    from streamdata.tokenize import tokenizer_mismatch

    c, r = dict(pair.candidate.tokenizer_identity or {}), dict(pair.reference.tokenizer_identity or {})
    if c and r:
        what = tokenizer_mismatch(c, r)
        if what is not None:
            raise DataError(f"candidate {pair.candidate.name} and reference {pair.reference.name} use different "
                            f"tokenizers ({what}): the same ids would mean other tokens; compare models of one "
                            "tokenizer (or, if you know better, pass check_tokenizer=False)")


def compare_streaming(candidate: Any, reference: Any, data: Any, *, config: StreamingEvalConfig | None = None,
                      reference_device: str | None = None, allow_vocab_prefix: bool = False,
                      per_token_kl: str | os.PathLike | None = None, max_tokens: int | None = None,
                      checkpoint_dir: "str | os.PathLike | RunFolder | None" = None,
                      sync_debug: SyncDebug | None = None, **options: Any) -> dict[str, Any]:
    """Compare ``candidate`` with ``reference`` on every scored target of ``data``.

    ``candidate``/``reference``: what :class:`~evaluator.StreamingEvaluator` accepts (a module, a
    transformers model, a folder or hub id, ``package.module:factory``), loaded in ``config.dtype``.
    ``data``: a tensor, array, store or store path. ``config`` or keyword ``options``: the run's
    settings (:class:`~evaluator.StreamingEvalConfig`: chunk_size, overlap, mode, doc_mode,
    batch_size, device, dtype, max_tokens, ...); both models see the same windows.
    ``reference_device``: where the reference runs (default: the candidate's device).
    ``per_token_kl``: a file for the per-token KL (float32, raw); default: beside the checkpoint,
    else an unlinked temporary file. Returns the run's keys for the candidate (loss, perplexity,
    per-chunk/document/position figures) plus the comparison's (see :data:`COMPARE`): kl_mean,
    kl_stderr, kl_median, kl_p90, kl_p95, kl_p99, kl_p999, kl_min, kl_max, top1_agreement (%),
    candidate_top1_accuracy (%), loss/perplexity of both, perplexity_ratio, delta_nll_mean,
    ``per_token_kl`` (a read-only float32 memmap) and ``per_token_kl_path``: :func:`compare_result`'s
    :class:`~evaluator.results.CompareResult` as a dict.
    """
    return compare_result(candidate, reference, data, config=config, reference_device=reference_device,
                          allow_vocab_prefix=allow_vocab_prefix, per_token_kl=per_token_kl, max_tokens=max_tokens,
                          checkpoint_dir=checkpoint_dir, sync_debug=sync_debug, **options).to_dict()


def compare_result(candidate: Any, reference: Any, data: Any, *, config: StreamingEvalConfig | None = None,
                   reference_device: str | None = None, allow_vocab_prefix: bool = False,
                   per_token_kl: str | os.PathLike | None = None, max_tokens: int | None = None,
                   checkpoint_dir: "str | os.PathLike | RunFolder | None" = None,
                   sync_debug: SyncDebug | None = None, **options: Any) -> CompareResult:
    """:func:`compare_streaming` as a typed :class:`~evaluator.results.CompareResult` (the same
    arguments; ``sync_debug``: see :meth:`evaluator.StreamingEvaluator.run_result`)."""
    if config is None:
        config = StreamingEvalConfig(**options)
    elif options:
        raise ConfigError("pass either config=StreamingEvalConfig(...) or keyword settings, not both")
    if config.device_map is not None:
        raise ConfigError(f"device_map={config.device_map!r} is not supported by compare: pass device and "
                          "reference_device (each model on one device)")
    if config.compile is not None:
        raise ConfigError(f"compile={config.compile!r} is not supported by compare (it compiles one model's body): "
                          "leave compile unset")
    device = resolve_device(config.device) if config.device is not None else None  # bad names fail first
    if reference_device is not None:
        resolve_device(reference_device)
    ckdir = config.checkpoint_dir if checkpoint_dir is None else checkpoint_dir
    root = ckdir.root if isinstance(ckdir, RunFolder) else ckdir
    path = per_token_kl if per_token_kl is not None else (os.path.join(root, per_token_name("kl")) if root else None)
    config = dataclasses.replace(config, per_token_path=None if path is None else str(path))
    check_output_file(per_token_kl, "per_token_kl")  # before the models are loaded (the engine checks it again)
    cand = load_model(candidate, dtype=config.dtype)
    ref = load_model(reference, dtype=config.dtype)
    if cand is ref or (cand.module is ref.module and isinstance(cand, StatefulModuleAdapter) and config.mode != "sliding"):
        # one object carries one state (and one adapter one cache): a pair needs two
        raise ConfigError("candidate and reference are the same model object: pass two (e.g. a copy.deepcopy)")
    pair = PairAdapter(cand, ref, reference_device, allow_vocab_prefix)
    _check_tokenizers(config, pair)  # before the models are moved and checked on the device
    ev = StreamingEvaluator(pair, config=dataclasses.replace(config, device=None if device is None else str(device)))
    run = ev.run_result(data, max_tokens=max_tokens, detailed=True, per_token=True, checkpoint_dir=ckdir,
                        scoring=COMPARE, sync_debug=sync_debug)
    qs = quantiles(run.per_token_losses, [0.0, *QUANTILES.values(), 1.0])
    return CompareResult(run, kl_min=qs[0], kl_max=qs[-1], kl_quantiles=dict(zip(QUANTILES, qs[1:-1])),
                         candidate=cand.name, reference=ref.name, reference_device=str(ref.device),
                         compared_vocab=pair.compared_vocab or pair.vocab_size, vocab_candidate=cand.vocab_size,
                         vocab_reference=ref.vocab_size, models=pair.describe())
