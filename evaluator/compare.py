"""Model comparison: a candidate and a reference read the same windows; per scored target only
scalars leave the device (KL divergence, both NLLs, top-1 agreement), never logits.

People who quantize, distill, prune or fine-tune a model compare it with the original token by
token. llama.cpp's ``llama-perplexity --kl-divergence`` writes the reference's logits to disk first
(vocabulary x scored tokens x 4 bytes) and reads them back; here both models run on the same
batch and the statistics are computed slice by slice on the device.

How it plugs into the one engine loop (:class:`evaluator.engine.StreamingEvaluator`), with no
copy of the loop or the runners:

- :class:`PairAdapter` is a model adapter over both models: ``forward_windows`` and
  ``forward_stream`` run each model (each carrying its own state or KV cache in stateful and
  kv-cache modes), ``snapshot/restore/save_state/load_state`` pair their states. The reference may
  live on another device (``reference_device``): its inputs are sent there, and its
  log-probabilities come back one loss slice at a time.
- :func:`pair_stats` is the runners' scoring hook (``Runner._score``): per scored target it returns
  the fp32 row ``[nll_candidate, nll_reference, KL(ref || cand), KL^2, top-1 agree, candidate
  top-1 == target]`` (:data:`COLUMNS`), computed ``loss_slice`` rows at a time.
- :data:`COMPARE` (an :class:`evaluator.engine.Scoring`) names those columns for the float64
  sums (total, per window, per document, per position bucket: the run's machinery with more
  columns), writes the KL column to the per-token file, and assembles the results.

What is compared (the definitions the tests check against brute-force references):

- ``KL(ref || cand) = sum_v p_ref(v) (log p_ref(v) - log p_cand(v))`` in nats, per scored target,
  with both distributions the softmax of each model's logits in fp32. With vocabularies of
  different sizes (only when one is a prefix of the other and ``allow_vocab_prefix``): both
  models' logits are cut to the first ``V = min(V_cand, V_ref)`` ids and renormalised there, so KL
  and top-1 agreement are over the shared ids only; each model's NLL (and so its perplexity) and
  the candidate's top-1 accuracy stay over its own full vocabulary.
- top-1 agreement: ``argmax`` of both models' logits (over the compared ids) equal (ties: the
  lowest id, torch's argmax).
- KL quantiles (median, 90/95/99/99.9th percentile, min, max): exact order statistics of the
  float32 per-token KL, with numpy's default ``linear`` interpolation (``np.quantile(kl, q)``),
  found in bounded memory by :func:`quantiles` (two passes over the memory-mapped file).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .carry_check import CarryCheck
from .config import StreamingEvalConfig, resolve_device
from .engine import Scoring, StreamingEvaluator
from .errors import ConfigError, DataError, ModelError
from .metrics import MetricSums, perplexity
from .models import ForwardOutput, ModelAdapter, StatefulModuleAdapter, load_model
from .results import detail as run_detail
from .run_folder import RunFolder, check_output_file, per_token_name
from .spill import BLOCK, COLUMNS as RUN_SPILL, BlockView

__all__ = ["COLUMNS", "COMPARE", "PairAdapter", "PairOutput", "compare_streaming", "pair_stats", "quantiles"]

#: Per-target statistics, in this order (the first is the candidate's NLL, so the run's per-chunk
#: and per-document figures and the progress line are the candidate's).
COLUMNS = ("nll", "nll_ref", "kl", "kl_sq", "agree", "correct")
_NLL, _NLL_REF, _KL, _KL_SQ, _AGREE, _CORRECT = range(len(COLUMNS))

#: Spilled columns: the run's, plus every further statistic per window and per document.
SPILL = {**RUN_SPILL, **{f"window_{c}": ("<f8", "windows") for c in COLUMNS[1:]},
         **{f"document_{c}": ("<f8", "documents") for c in COLUMNS[1:]}}

#: Quantiles reported (besides min and max), as result keys.
QUANTILES = {"kl_median": 0.5, "kl_p90": 0.9, "kl_p95": 0.95, "kl_p99": 0.99, "kl_p999": 0.999}


# ---- the pair of models ------------------------------------------------------------------------
@dataclass
class PairOutput:
    """Both models' outputs for one forward, and how many vocabulary ids are compared."""

    candidate: ForwardOutput
    reference: ForwardOutput
    vocab: int | None  # compare ids [0, vocab) (None: the whole, equal, vocabularies)


class PairAdapter(ModelAdapter):
    """The engine's one model, made of a candidate and a reference (each a :class:`ModelAdapter`).

    Modes: those both models support. Positions: the smaller context. Vocabulary (what token ids
    may be fed): the compared one. The reference runs on ``reference_device`` (default: the
    engine's device); its inputs are copied there per forward.
    """

    kind = "pair"

    def __init__(self, candidate: ModelAdapter, reference: ModelAdapter, reference_device: Any = None,
                 allow_vocab_prefix: bool = False):
        self.candidate, self.reference = candidate, reference
        self.module = candidate.module  # what the engine's .model and batch-size estimate read
        self.name = f"{candidate.name} vs {reference.name}"
        self.reference_device = resolve_device(reference_device) if reference_device is not None else None
        vc, vr = candidate.vocab_size, reference.vocab_size
        self.compared_vocab: int | None = None
        if vc is not None and vr is not None and vc != vr:
            if not allow_vocab_prefix:
                raise ModelError(
                    f"candidate {candidate.name} has {vc} vocabulary ids and reference {reference.name} {vr}: KL needs "
                    "one vocabulary; if the smaller is a prefix of the larger (padded embeddings), pass "
                    "allow_vocab_prefix=True (--allow-vocab-prefix) to compare over the first "
                    f"{min(vc, vr)} ids")
            self.compared_vocab = min(vc, vr)
        self.vocab_size = min(v for v in (vc, vr) if v is not None) if (vc or vr) else None
        ctx = [c for c in (candidate.context_length, reference.context_length) if c is not None]
        self.context_length = min(ctx) if ctx else None
        pos = [p for p in (candidate.max_positions, reference.max_positions) if p is not None]
        self.max_positions = min(pos) if pos else None
        self.bos_token_id = candidate.bos_token_id if candidate.bos_token_id is not None else reference.bos_token_id
        # what the engine checks the store against: the candidate's tokenizer, else the reference's
        # (compare_streaming first refuses two known tokenizers that differ)
        known = candidate if candidate.tokenizer_identity else reference
        self.tokenizer_identity = known.tokenizer_identity
        self.tokenizer_sha256 = known.tokenizer_sha256
        self.modes = tuple(m for m in candidate.modes if m in reference.modes)

    @property
    def dispatched(self) -> bool:
        return False  # models come loaded whole (no device map), each moved to its device

    def to(self, device: torch.device) -> "PairAdapter":
        self.candidate.to(device)
        self.reference.to(self.reference_device or device)
        self.device = device
        return self

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "modes": list(self.modes), "vocab_size": self.vocab_size,
                "compared_vocab": self.compared_vocab or self.vocab_size, "max_positions": self.max_positions,
                "candidate": self.candidate.describe(), "reference": self.reference.describe(),
                "reference_device": str(self.reference_device or self.device)}

    def parameter_values(self):
        for prefix, a in (("candidate.", self.candidate), ("reference.", self.reference)):
            for name, q in a.parameter_values():
                yield prefix + name, q

    @property
    def full_logits(self) -> bool:
        return self.candidate.full_logits or self.reference.full_logits

    def _ref_in(self, inputs: torch.Tensor) -> torch.Tensor:
        d = self.reference.device
        return inputs if inputs.device == d else inputs.to(d, non_blocking=True)

    def forward_windows(self, inputs: torch.Tensor) -> PairOutput:
        return PairOutput(self.candidate.forward_windows(inputs), self.reference.forward_windows(self._ref_in(inputs)),
                          self.compared_vocab)

    def begin_stream(self) -> None:
        self.candidate.begin_stream()
        self.reference.begin_stream()

    def forward_stream(self, inputs: torch.Tensor) -> PairOutput:
        return PairOutput(self.candidate.forward_stream(inputs), self.reference.forward_stream(self._ref_in(inputs)),
                          self.compared_vocab)

    def snapshot(self) -> Any:
        return (self.candidate.snapshot(), self.reference.snapshot())

    def restore(self, snap: Any) -> None:
        self.candidate.restore(snap[0])
        self.reference.restore(snap[1])

    def can_keep_rows(self) -> bool:
        return self.candidate.can_keep_rows() and self.reference.can_keep_rows()

    def keep_rows(self, m: int) -> bool:
        # Both models' states are cut, or neither: the runner then feeds every row to both.
        if not self.can_keep_rows():
            return False
        return self.candidate.keep_rows(m) and self.reference.keep_rows(m)

    def save_state(self) -> Any:
        return [self.candidate.save_state(), self.reference.save_state()]

    def load_state(self, state: Any) -> None:
        self.candidate.load_state(state[0])
        self.reference.load_state(state[1])

    @property
    def checks_carry(self) -> bool:
        return self.candidate.checks_carry or self.reference.checks_carry

    def carry_check(self, dtype: str = "float32") -> CarryCheck:
        """Both models' carry checks (each on its own device); the candidate's measurement is the
        one recorded, the first failure the one reported, checkpoints only where both restore."""
        checks = {}
        for who, a in (("candidate", self.candidate), ("reference", self.reference)):
            chk = a.carry_check(dtype) if a.checks_carry else CarryCheck(True, f"{a.kind} model carries its state", dtype,
                                                                          checkpoint=True)
            if not chk.ok:
                return dataclasses.replace(chk, reason=f"{who}: {chk.reason}")
            checks[who] = chk
        cand, ref = checks["candidate"], checks["reference"]
        ckpt_why = next((f"{w}: {c.checkpoint_reason}" for w, c in checks.items() if not c.checkpoint), cand.checkpoint_reason)
        return dataclasses.replace(cand, reason=f"for both models, {cand.reason}", checkpoint=cand.checkpoint and ref.checkpoint,
                                   checkpoint_reason=ckpt_why)


# ---- the per-target statistics -------------------------------------------------------------------
def _rows(o: ForwardOutput) -> torch.Tensor:
    return (o.hidden if o.logits is None else o.logits).flatten(0, -2)


def _slice(o: ForwardOutput, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """fp32 logits [len(idx), vocab] of the rows ``idx`` (the head applied to those rows only)."""
    return (o.head(rows.index_select(0, idx)) if o.logits is None else rows.index_select(0, idx)).float()


def pair_stats(out: PairOutput, targets: torch.Tensor, flat: torch.Tensor, loss_slice: int) -> torch.Tensor:
    """[m, 6] fp32 statistics (:data:`COLUMNS`) of the m scored targets at ``flat`` (ascending
    indices into ``targets.reshape(-1)``): the runners' scoring hook for a comparison.

    Per slice of ``loss_slice`` rows, with ``z'`` = logits minus their row maximum and
    ``s = sum exp(z')``: ``KL = sum_v p_ref(v) (z'_ref - z'_cand)(v) - log(s_ref / s_cand)``. That is
    the definition rearranged so that models that are close (a quantized copy) lose no digits to
    cancellation: the elementwise differences are small, and ``log`` is of a ratio near 1; a model
    against itself gives exactly 0. Memory: the two fp32 logit slices (our own copies, overwritten
    in place) and one more fp32 buffer, ``exp(z'_ref)``; never a whole batch's logits in fp32.
    The reference's part runs on its own device; what crosses to the candidate's is its shifted
    logits (its log-probabilities up to the per-row ``log s_ref``) and a few scalars per row.
    """
    dev = targets.device
    m = flat.numel()
    tg = targets.reshape(-1).index_select(0, flat)
    res = torch.empty((m, len(COLUMNS)), dtype=torch.float32, device=dev)
    crow, rrow = _rows(out.candidate), _rows(out.reference)
    rdev = rrow.device
    flat_r, tg_r = (flat, tg) if rdev == dev else (flat.to(rdev), tg.to(rdev))
    V = out.vocab
    for i in range(0, m, loss_slice):
        t, t_r = tg[i : i + loss_slice, None], tg_r[i : i + loss_slice, None]
        r = res[i : i + loss_slice]
        # reference, on its own device
        zr = _slice(out.reference, rrow, flat_r[i : i + loss_slice])
        full_r = None
        if V is not None and V < zr.shape[1]:  # its NLL over its whole vocabulary, the rest over [0, V)
            full_r = torch.logsumexp(zr, dim=1) - zr.gather(1, t_r).squeeze(1)
            zr = zr[:, :V]
        mr, top_r = zr.max(dim=1)
        g_r = zr.gather(1, t_r).squeeze(1)
        zr.sub_(mr[:, None])  # z'_ref
        if rdev != dev:  # the handover: one slice of shifted logits and a few scalars per row
            zr, mr, top_r, g_r = zr.to(dev), mr.to(dev), top_r.to(dev), g_r.to(dev)
            full_r = None if full_r is None else full_r.to(dev)
        p = zr.exp()  # unnormalised p_ref (the one extra buffer)
        s_r = p.sum(dim=1)
        r[:, _NLL_REF] = full_r if full_r is not None else mr + s_r.log() - g_r
        # candidate
        zc = _slice(out.candidate, crow, flat[i : i + loss_slice])
        full_c = top_full = None
        if V is not None and V < zc.shape[1]:
            full_c = torch.logsumexp(zc, dim=1) - zc.gather(1, t).squeeze(1)
            top_full = zc.argmax(dim=1)
            zc = zc[:, :V]
        mc, top_c = zc.max(dim=1)
        g_c = zc.gather(1, t).squeeze(1)
        r[:, _CORRECT] = ((top_c if top_full is None else top_full) == t.squeeze(1)).float()
        r[:, _AGREE] = (top_c == top_r).float()
        zc.sub_(mc[:, None])  # z'_cand
        d = zr.sub_(zc)  # z'_ref - z'_cand, in place of z'_ref
        s_c = zc.exp_().sum(dim=1)
        r[:, _NLL] = full_c if full_c is not None else mc + s_c.log() - g_c
        # an id the reference rules out (-inf) adds 0 (not NaN); one only the candidate rules out, +inf
        d.nan_to_num_(nan=0.0, neginf=0.0, posinf=math.inf)
        dot = torch.bmm(p[:, None, :], d[:, :, None]).reshape(-1)
        kl = dot / s_r - torch.log(s_r / s_c)
        r[:, _KL] = kl
        r[:, _KL_SQ] = kl * kl
        del zr, zc, p, d
    return res


class _ColumnWriter:
    """The per-token file takes one column (the KL) of the [m, C] statistics."""

    def __init__(self, writer: Any, column: int):
        self._w, self._col = writer, column

    def write(self, values: torch.Tensor) -> None:
        self._w.write(values[:, self._col])

    def __getattr__(self, name: str) -> Any:  # flush, finish, discard, filled, path
        return getattr(self._w, name)


# ---- results -----------------------------------------------------------------------------------
def _stderr(s: float, s2: float, n: int) -> float:
    """Standard error of a mean from the float64 sum and sum of squares of n values."""
    if n < 2:
        return math.nan
    var = max(0.0, (s2 - s * s / n) / (n - 1))
    return math.sqrt(var / n)


def _summary(sums: MetricSums) -> dict[str, Any]:
    t, n = sums.totals(), sums.tokens
    agree = t[_AGREE] / n
    return {
        "kl_mean": t[_KL] / n,
        "kl_stderr": _stderr(float(t[_KL]), float(t[_KL_SQ]), n),
        "kl_sum": float(t[_KL]),
        "top1_agreement": 100.0 * agree,  # percent
        "top1_agreement_stderr": 100.0 * math.sqrt(agree * (1 - agree) / (n - 1)) if n > 1 else math.nan,
        "candidate_top1_accuracy": 100.0 * t[_CORRECT] / n,
        "loss_candidate": t[_NLL] / n,
        "loss_reference": t[_NLL_REF] / n,
        "perplexity_candidate": perplexity(float(t[_NLL]), n),
        "perplexity_reference": perplexity(float(t[_NLL_REF]), n),
        "perplexity_ratio": math.exp((t[_NLL] - t[_NLL_REF]) / n),  # PPL(cand) / PPL(ref)
        "delta_nll_mean": (t[_NLL] - t[_NLL_REF]) / n,  # candidate - reference, nats/token
        "nll_sum_reference": float(t[_NLL_REF]),
    }


class _FirstColumn:
    """The run's detail assembly reads the position buckets of the first column (the candidate's NLL)."""

    def __init__(self, sums: MetricSums):
        self._s = sums

    def buckets(self):
        edges, bn, bt = self._s.buckets()
        return edges, bn[:, 0], bt


def _detail(run: Any, ed: Any, sums: MetricSums, files: dict[str, Any]) -> dict[str, Any]:
    out = run_detail(run, ed, _FirstColumn(sums), files)  # the candidate's chunk/document/byte figures
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
    _, bn, bt = sums.buckets()
    pos = out["position_buckets"]
    last = len(pos["hi"])
    with np.errstate(divide="ignore", invalid="ignore"):
        pos.update(
            loss_reference=bn[:last, _NLL_REF] / bt[:last],
            kl_mean=bn[:last, _KL] / bt[:last],
            top1_agreement=100.0 * bn[:last, _AGREE] / bt[:last],
            delta_nll_mean=(bn[:last, _NLL] - bn[:last, _NLL_REF]) / bt[:last],
        )
    return out


#: The comparison's scoring (see the module docstring).
COMPARE = Scoring("compare", score=pair_stats, columns=COLUMNS, spill=SPILL,
                  per_token=lambda w: _ColumnWriter(w, _KL), summary=_summary, detail=_detail)


# ---- exact quantiles in bounded memory -----------------------------------------------------------
def _keys(v: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order (negatives' bits flipped, positives' sign bit set)."""
    b = np.ascontiguousarray(v, dtype=np.float32).view(np.uint32)
    return b ^ np.where(b >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))


def _value(key: int) -> float:
    b = key ^ 0x80000000 if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array([b], np.uint32).view(np.float32)[0])


def _blocks(values: Any, block: int) -> Iterator[np.ndarray]:
    for lo in range(0, len(values), block):
        yield np.asarray(values[lo : lo + block])


def order_statistics(values: Any, ranks: Sequence[int], block: int = BLOCK) -> list[float]:
    """The ``ranks``-th smallest (0-based) of the float32 ``values`` (an array or memmap of any
    length), exactly, in memory of two 2^16-bin histograms per rank and one block: a pass counts
    the high 16 bits of each order-preserving key, then a pass counts the low 16 bits of the keys
    in each rank's high bin."""
    n = len(values)
    h = np.zeros(1 << 16, np.int64)
    for b in _blocks(values, block):
        h += np.bincount(_keys(b) >> 16, minlength=1 << 16)
    c = np.cumsum(h)
    hi = {r: int(np.searchsorted(c, r, side="right")) for r in ranks}
    if any(not 0 <= r < n for r in ranks):
        raise ValueError(f"ranks {list(ranks)} outside [0, {n})")
    lows = {b: np.zeros(1 << 16, np.int64) for b in set(hi.values())}
    for blk in _blocks(values, block):
        k = _keys(blk)
        top = k >> 16
        for b, h2 in lows.items():
            h2 += np.bincount(k[top == b] & 0xFFFF, minlength=1 << 16)
    out = []
    for r in ranks:
        b = hi[r]
        below = int(c[b - 1]) if b else 0
        lo = int(np.searchsorted(np.cumsum(lows[b]), r - below, side="right"))
        out.append(_value((b << 16) | lo))
    return out


def quantiles(values: Any, qs: Sequence[float], block: int = BLOCK) -> list[float]:
    """``np.quantile(values, qs)`` (method ``linear``, computed in float64 from the float32 order
    statistics) of a float32 array or memmap of any length, in bounded memory (:func:`order_statistics`)."""
    n = len(values)
    if n == 0:
        return [math.nan] * len(qs)
    pos = []
    for q in qs:
        v = n * q + (1 + q * (1 - 1 - 1)) - 1  # numpy's virtual index for alpha = beta = 1: (n - 1) q
        k = min(max(int(math.floor(v)), 0), n - 1)
        pos.append((k, min(k + 1, n - 1), v - math.floor(v)))
    ranks = sorted({r for k, k1, _ in pos for r in (k, k1)})
    stat = dict(zip(ranks, order_statistics(values, ranks, block)))
    out = []
    for k, k1, g in pos:
        a, b = stat[k], stat[k1]
        if g == 0 or k == k1:  # an order statistic itself (also an infinite one: no inf - inf)
            out.append(a)
            continue
        d = b - a
        out.append(b - d * (1 - g) if g >= 0.5 else a + d * g)  # numpy's _lerp
    return out


def kl_histogram(values: Any, bins: int = 100, top: float | None = None, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) of the per-token KL over [0, top] (default: the maximum), block by block."""
    if top is None:
        top = max((float(np.max(b)) for b in _blocks(values, block)), default=0.0)
    edges = np.linspace(0.0, max(top, 1e-12), bins + 1)
    counts = np.zeros(bins, np.int64)
    for b in _blocks(values, block):
        counts += np.histogram(np.clip(b, 0.0, edges[-1]), bins=edges)[0]
    return counts, edges


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
                      checkpoint_dir: "str | os.PathLike | RunFolder | None" = None, **options: Any) -> dict[str, Any]:
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
    ``per_token_kl`` (a read-only float32 memmap) and ``per_token_kl_path``.
    """
    if config is None:
        config = StreamingEvalConfig(**options)
    elif options:
        raise ConfigError("pass either config=StreamingEvalConfig(...) or keyword settings, not both")
    if config.device_map is not None:
        raise ConfigError(f"device_map={config.device_map!r} is not supported by compare: pass device and "
                          "reference_device (each model on one device)")
    if getattr(config, "compile", None) is not None:
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
    res = ev._run(data, max_tokens, None, detailed=True, per_token=True, checkpoint_dir=ckdir, scoring=COMPARE)
    kl = res.pop("per_token_losses")
    res["per_token_kl"], res["per_token_kl_path"] = kl, res.pop("per_token_path")
    qs = quantiles(kl, [0.0, *QUANTILES.values(), 1.0])
    res["kl_min"], res["kl_max"] = qs[0], qs[-1]
    res.update(zip(QUANTILES, qs[1:-1]))
    res.update(candidate=cand.name, reference=ref.name, reference_device=str(ref.device),
               compared_vocab=pair.compared_vocab or pair.vocab_size, vocab_candidate=cand.vocab_size,
               vocab_reference=ref.vocab_size)
    res["models"] = pair.describe()
    return res
