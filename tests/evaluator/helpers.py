"""Tiny deterministic models for the evaluator tests (random init, fp32, built in milliseconds)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

V = 97  # vocabulary of every test model


def tiny_gpt2(n_positions: int = 256, vocab: int = V, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GPT2LMHeadModel(cfg).eval()


def tiny_rwkv(vocab: int = V, seed: int = 0):
    from transformers import RwkvConfig, RwkvForCausalLM

    torch.manual_seed(seed)
    cfg = RwkvConfig(vocab_size=vocab, context_length=64, hidden_size=32, num_hidden_layers=2,
                     attention_hidden_size=32, intermediate_size=64, bos_token_id=0, eos_token_id=0)
    m = RwkvForCausalLM(cfg).eval()
    # Random init leaves RWKV's time-decay/mix parameters at zero/one; perturb so state matters.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "time_" in name:
                p.add_(0.5 * torch.randn_like(p))
    return m


class TinyRNN(nn.Module):
    """GRU or LSTM language model with the stateful protocol: forward continues from self.state."""

    def __init__(self, cell: str = "gru", vocab: int = V, hidden: int = 24, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab_size = vocab
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)
        with torch.no_grad():  # larger recurrent weights: long memory, so a lost state shows
            for name, p in self.rnn.named_parameters():
                if name.startswith("weight"):
                    p.mul_(4.0)
            self.out.weight.mul_(4.0)
        self.state = None

    def forward(self, x):
        y, self.state = self.rnn(self.emb(x), self.state)
        return self.out(y)

    def get_state(self):
        return self.state

    def set_state(self, s):
        self.state = s

    def reset_state(self):
        self.state = None


class Bigram(nn.Module):
    """Context-free model: logits of target t depend only on token t-1, so every mode gives the same
    per-token NLL and references are plain numpy."""

    def __init__(self, vocab: int = V, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.vocab_size = vocab
        self.table = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x)

    def nll(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            lp = F.log_softmax(self.table.weight.double(), dim=-1).numpy()
        return -lp[prev, nxt]


class Uniform(nn.Module):
    """Zero logits: every target costs exactly ln(vocab) nats."""

    def __init__(self, vocab: int = V):
        super().__init__()
        self.vocab_size = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab_size) + 0 * self.dummy


def full_nll(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Per-target NLL (float64 numpy) of one full-sequence forward over x (targets x[1:])."""
    with torch.inference_mode():
        if hasattr(model, "reset_state"):
            model.reset_state()
        out = model(x[None, :-1])
        logits = out if isinstance(out, torch.Tensor) else out.logits
        nll = F.cross_entropy(logits[0].float(), x[1:], reduction="none")
        if hasattr(model, "reset_state"):
            model.reset_state()
    return nll.double().numpy()


def brute_sliding_nll(model: nn.Module, v: torch.Tensor, L: int, overlap: int, tail: str = "full") -> np.ndarray:
    """For every target t of stream v, run the model on exactly the context the window semantics
    give it (from the start of the window that scores t) and return the NLLs in target order.

    Written from the window semantics (streamdata/windows.py docstring), independently of the planner: window k starts at
    k * (L - overlap) and scores targets (s + 1 + (overlap if k else 0)) .. s + L. Under tail "full" the
    targets of the last window of a stream with >= 2 windows are predicted from its start n - 1 - L instead.
    """
    n = len(v)
    stride = L - overlap
    nw = 1 + -(-max(0, n - 1 - L) // stride)  # windows of the stream
    out = []
    with torch.inference_mode():
        for t in range(1, n):
            k = 0
            while not (k * stride + 1 + (overlap if k else 0) <= t <= k * stride + L):
                k += 1
            s = k * stride
            if tail == "full" and k == nw - 1 and k > 0:
                s = n - 1 - L
            ctx = v[s:t][None]
            o = model(ctx)
            logits = o if isinstance(o, torch.Tensor) else o.logits
            out.append(float(F.cross_entropy(logits[0, -1:].float(), v[t : t + 1])))
    return np.array(out)


class OOMAbove(nn.Module):
    """Wraps a model; raises torch.OutOfMemoryError when a forward gets more than ``max_rows`` rows
    or ``max_len`` positions (after running the inner model, so carried state has already moved)."""

    def __init__(self, inner: nn.Module, max_rows: int | None = None, max_len: int | None = None):
        super().__init__()
        self.inner = inner
        self.vocab_size = inner.vocab_size
        self.max_rows, self.max_len = max_rows, max_len
        self.raised = 0
        if hasattr(inner, "get_state"):
            self.get_state, self.set_state, self.reset_state = inner.get_state, inner.set_state, inner.reset_state

    def forward(self, x):
        y = self.inner(x)
        if (self.max_rows is not None and x.shape[0] > self.max_rows) or (self.max_len is not None and x.shape[1] > self.max_len):
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return y


def gru_lm():
    """``tests.evaluator.helpers:gru_lm``: a factory for ``--model`` (deterministic weights)."""
    return TinyRNN("gru")


class Interrupt(Exception):
    """A crash inside a run, raised by :func:`interrupt_after` (the process survives)."""


def interrupt_after(monkeypatch, cls, k: int) -> None:
    """Make ``cls.step`` raise :class:`Interrupt` after ``k`` steps (batches, or units of a carried run)."""
    real, seen = cls.step, [0]

    def step(self, batch):
        if seen[0] == k:
            raise Interrupt(f"interrupted after {k} steps")
        seen[0] += 1
        return real(self, batch)

    monkeypatch.setattr(cls, "step", step)
