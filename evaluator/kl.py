"""The per-target statistics of a model comparison, on the device: :func:`pair_stats` is the
runners' scoring hook (``Runner._score``) for a :class:`~evaluator.pair.PairOutput`. Per scored
target it returns the fp32 row :data:`COLUMNS`, ``[nll_candidate, nll_reference, KL(ref || cand),
KL^2, top-1 agree, candidate top-1 == target]``, computed ``loss_slice`` rows at a time; only these
scalars leave the device, never logits.

Definitions (the tests check them against brute-force references):

- ``KL(ref || cand) = sum_v p_ref(v) (log p_ref(v) - log p_cand(v))`` in nats, per scored target,
  with both distributions the softmax of each model's logits in fp32. With vocabularies of
  different sizes (``PairOutput.vocab`` set): both models' logits are cut to the first ``V`` ids
  and renormalised there, so KL and top-1 agreement are over the shared ids only; each model's NLL
  (and so its perplexity) and the candidate's top-1 accuracy stay over its own full vocabulary.
- top-1 agreement: ``argmax`` of both models' logits (over the compared ids) equal (ties: the
  lowest id, torch's argmax).
"""

from __future__ import annotations

import math

import torch

from .models import ForwardOutput
from .pair import PairOutput

__all__ = ["AGREE", "COLUMNS", "CORRECT", "KL", "KL_SQ", "NLL", "NLL_REF", "pair_stats"]

#: Per-target statistics, in this order (the first is the candidate's NLL, so the run's per-chunk
#: and per-document figures and the progress line are the candidate's).
COLUMNS = ("nll", "nll_ref", "kl", "kl_sq", "agree", "correct")
#: Their column indices.
NLL, NLL_REF, KL, KL_SQ, AGREE, CORRECT = range(len(COLUMNS))


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
        r[:, NLL_REF] = full_r if full_r is not None else mr + s_r.log() - g_r
        # candidate
        zc = _slice(out.candidate, crow, flat[i : i + loss_slice])
        full_c = top_full = None
        if V is not None and V < zc.shape[1]:
            full_c = torch.logsumexp(zc, dim=1) - zc.gather(1, t).squeeze(1)
            top_full = zc.argmax(dim=1)
            zc = zc[:, :V]
        mc, top_c = zc.max(dim=1)
        g_c = zc.gather(1, t).squeeze(1)
        r[:, CORRECT] = ((top_c if top_full is None else top_full) == t.squeeze(1)).float()
        r[:, AGREE] = (top_c == top_r).float()
        zc.sub_(mc[:, None])  # z'_cand
        d = zr.sub_(zc)  # z'_ref - z'_cand, in place of z'_ref
        s_c = zc.exp_().sum(dim=1)
        r[:, NLL] = full_c if full_c is not None else mc + s_c.log() - g_c
        # an id the reference rules out (-inf) adds 0 (not NaN); one only the candidate rules out, +inf
        d.nan_to_num_(nan=0.0, neginf=0.0, posinf=math.inf)
        dot = torch.bmm(p[:, None, :], d[:, :, None]).reshape(-1)
        kl = dot / s_r - torch.log(s_r / s_c)
        r[:, KL] = kl
        r[:, KL_SQ] = kl * kl
        del zr, zc, p, d
    return res
