"""The pair of models of a comparison, as the engine's one model: :class:`PairAdapter` runs a
candidate and a reference on the same batch and pairs everything the engine does to a model's
state.

- ``forward_windows`` and ``forward_stream`` run each model (each carrying its own state or KV
  cache in stateful and kv-cache modes) and return both outputs (:class:`PairOutput`);
- ``snapshot/restore/keep_rows/save_state/load_state`` act on both states, or on neither;
- ``carry_check`` is both models' carry checks (:class:`~evaluator.carry_check.CarryCheck`);
- modes are those both support, positions the smaller context, the vocabulary the compared one
  (different sizes only when one is a prefix of the other and ``allow_vocab_prefix``).

The reference may live on another device (``reference_device``): its inputs are sent there. What
is computed from the two outputs is :func:`evaluator.kl.pair_stats`; the API and the results are
:mod:`evaluator.compare`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .carry_check import CarryCheck
from .config import resolve_device
from .errors import ModelError
from .models import ForwardOutput, ModelAdapter

__all__ = ["PairAdapter", "PairOutput"]


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

