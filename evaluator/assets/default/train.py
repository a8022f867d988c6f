"""Train the embedded default model: ``python -m evaluator.assets.default.train``.

This script lives beside the model it produces (``evaluator/assets/default/``); nothing at run time
imports it.

Recipe (seeded, CPU, ``torch.set_num_threads(2)``; about six and a half minutes in all on 2 cores):

1. A byte-level BPE tokenizer (``tokenizers``; vocabulary 4096; ``<|endoftext|>`` is the EOS) trained
   on the train part of the embedded default corpus (``streamdata.source.default_corpus_files("train")``:
   ~20% of the running Python's standard-library sources, ~1.9M tokens).
2. Those documents tokenized with EOS after every document, into one token stream.
3. A small transformers GPT-2 (4 layers, d_model 128, 4 heads, 1024 positions, tied embeddings;
   ~1.45M parameters, ~5.8 MB of fp32 safetensors) trained for a fixed wall-clock budget
   (``--minutes``; the LR schedule, the window length and the distillation weight follow the elapsed
   fraction of it, so a slower machine still gets a complete schedule, only fewer steps). It is also
   distilled from a cheap "bigram + in-window copy" teacher (see :func:`teacher_cross_entropy`).
4. Saved to ``evaluator/assets/default/``: ``model.safetensors`` + ``config.json`` (save_pretrained)
   and ``training_info.json`` (the recipe, steps, tokens, losses, time, and the evaluation below).
   The tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the eos_token) has one copy:
   streamdata's bundled one (``--tokenizer default``), which the evaluator pairs with this model.
5. Evaluated with the streaming evaluator on a deterministic sample of the *eval* part (every
   ``--eval-every``-th file, stream mode, EOS after each document, chunk 1024, overlap 256): text
   neither the tokenizer nor the model saw.

Being time-budgeted, two runs on differently loaded machines take different numbers of steps
(recorded in training_info.json); the seeds fix everything else.

Measured (the committed model; 2-core CPU shared with other jobs, load ~3): 940 steps, 0.96M
tokens in 5 minutes; eval-part perplexity 107 (bits/byte 2.02). For scale: a count-based bigram
of the train part scores 4.56 nats/token (perplexity 96) on the eval part, and the bigram + copy
teacher 3.0 (perplexity ~21). The model is about bigram level and barely uses its context yet
(loss is flat in the position within a document); what it lacks is tokens, so ``--minutes`` is the
lever. Tried and rejected here (worse at equal time): d_model 192, a higher peak LR (4e-3), larger
batches, 1 x 1024 windows from the start, and a hand-wired induction circuit at initialisation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_OUT = Path(__file__).resolve().parent
EOS = "<|endoftext|>"
VOCAB = 4096


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB):
    """Byte-level BPE (GPT-2 style: every byte is representable, no unknown token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def read_corpus(part: str, every: int = 1) -> tuple[list[str], list[str]]:
    from streamdata.source import default_corpus_files

    files = default_corpus_files(part)[::every]
    return files, [Path(f).read_text(encoding="utf-8") for f in files]


def encode(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint16 ids with EOS after every document, int64 document offsets)."""
    from streamdata.tokenize import encode_documents

    flat, lens = encode_documents(tok, texts, bos=None, eos=tok.token_to_id(EOS))
    return flat.astype(np.uint16), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def build_model(vocab_size: int, eos_id: int, d_model: int = 128, layers: int = 4, heads: int = 4):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab_size, n_positions=1024, n_embd=d_model, n_layer=layers, n_head=heads,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id,
                     tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


def bigram_teacher(stream: np.ndarray, vocab: int, k: float = 0.01) -> torch.Tensor:
    """Add-k smoothed bigram distribution P[prev, next] (fp32 [V, V], 64 MiB at V=4096) counted from
    the training stream."""
    t = stream.astype(np.int64)
    uni = np.bincount(t, minlength=vocab).astype(np.float64) + 0.5
    uni /= uni.sum()
    counts = np.bincount(t[:-1] * vocab + t[1:], minlength=vocab * vocab).reshape(vocab, vocab).astype(np.float32)
    prior = (k * vocab * uni).astype(np.float32)
    return torch.from_numpy((counts + prior[None, :]) / (counts.sum(1, keepdims=True) + np.float32(k * vocab)))


def teacher_cross_entropy(x: torch.Tensor, logp: torch.Tensor, bigram: torch.Tensor, k1: float = 2.0,
                          k2: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy of the model (``logp`` [B, T, V]) to a cheap "bigram + copy" teacher on
    windows ``x`` [B, T+1].

    Why: a 1.4M-parameter model trained for minutes sees ~1-3M tokens, about what it takes to learn
    bigram statistics from one-hot targets, and far too few to discover copying. Code repeats
    itself (names, call patterns), and this teacher, computable from the window alone, predicts
    the default corpus's eval part at ~3.0 nats/token with a 1024-token window (the bigram alone:
    4.5). Distilling it gives every position a dense target that already contains both.

    The teacher at position t (current token b = x_t, previous a = x_{t-1}) mixes: the bigram row
    P[b]; the tokens that followed earlier occurrences of b in the window (weight c1/(c1+k1) for c1
    occurrences); the tokens that followed earlier occurrences of (a, b) (weight c2/(c2+k2)). Its
    cross-entropy is a weighted sum of a soft bigram term and gathers of logp at those successors.
    """
    B, T = x.shape[0], x.shape[1] - 1
    V = logp.shape[-1]
    inp, succ = x[:, :-1], x[:, 1:]  # the successor of input position j is x[j + 1]
    big = -(bigram[inp.reshape(-1)] * logp.reshape(-1, V)).sum(-1).view(B, T)
    earlier = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), -1)  # j < t
    eq1 = (inp[:, :, None] == inp[:, None, :]) & earlier  # [B, t, j]: x_j == x_t
    prev = torch.cat([torch.full((B, 1), -1, dtype=x.dtype, device=x.device), inp[:, :-1]], 1)
    eq2 = eq1 & (prev[:, :, None] == prev[:, None, :]) & (prev[:, None, :] >= 0)
    g = torch.gather(logp, 2, succ[:, None, :].expand(B, T, T))  # g[b, t, j] = logp[b, t, x_{j+1}]
    c1, c2 = eq1.sum(-1).float(), eq2.sum(-1).float()
    m1 = -(g * eq1).sum(-1) / c1.clamp(min=1)
    m2 = -(g * eq2).sum(-1) / c2.clamp(min=1)
    l1, l2 = c1 / (c1 + k1), c2 / (c2 + k2)
    return ((1 - l2) * (1 - l1) * big + (1 - l2) * l1 * m1 + l2 * m2).mean()


def train(model, stream: np.ndarray, seconds: float, lr: float, short_block: int = 512, short_batch: int = 2,
          long_block: int = 1024, long_batch: int = 1, long_from: float = 0.8, distill_full: float = 0.5,
          log_every: int = 50) -> dict:
    """Train for a fixed wall-clock budget; the schedule follows the elapsed fraction p of it.

    - LR: linear warmup over the first 3%, cosine decay to 10% at p = 1 (AdamW, betas 0.9/0.95).
    - Windows: ``short_batch`` x ``short_block`` tokens, then from p = ``long_from``
      ``long_batch`` x ``long_block`` so every one of the 1024 positions is trained.
    - Loss: next-token cross-entropy + w(p) x :func:`teacher_cross_entropy`, w = 1 until
      p = ``distill_full``, then falling linearly to 0 at p = 1.
    """
    vocab = model.config.vocab_size
    bigram = bigram_teacher(stream, vocab)
    data = torch.from_numpy(stream.astype(np.int64))
    gen = torch.Generator().manual_seed(1234)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    model.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    step = tokens = long_steps = 0
    while True:
        p = (time.perf_counter() - t0) / seconds
        if p >= 1.0:
            break
        f = p / 0.03 if p < 0.03 else 0.1 + 0.45 * (1 + math.cos(math.pi * (p - 0.03) / 0.97))
        for g in opt.param_groups:
            g["lr"] = lr * f
        block, batch = (long_block, long_batch) if p >= long_from else (short_block, short_batch)
        long_steps += p >= long_from
        starts = torch.randint(0, len(data) - block - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + block + 1] for s in starts.tolist()])
        logp = torch.nn.functional.log_softmax(model(input_ids=x[:, :-1]).logits.float(), dim=-1)
        ce = torch.nn.functional.nll_loss(logp.reshape(-1, vocab), x[:, 1:].reshape(-1))
        w = 1.0 if p < distill_full else max(0.0, (1.0 - p) / (1.0 - distill_full))
        loss = ce + w * teacher_cross_entropy(x, logp, bigram) if w > 0 else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(ce.detach()))
        step += 1
        tokens += batch * block
        if step % log_every == 0:
            el = time.perf_counter() - t0
            print(f"[train] step {step}  p {p:.2f}  loss {np.mean(losses[-log_every:]):.3f}  lr {lr * f:.2e}  "
                  f"distill {w:.2f}  block {block}  {tokens / el:,.0f} tok/s  {el:.0f}s", file=sys.stderr, flush=True)
    model.eval()
    return {"steps": step, "long_steps": long_steps, "tokens_seen": tokens, "train_seconds": time.perf_counter() - t0,
            "final_train_loss": float(np.mean(losses[-50:])), "peak_lr": lr, "short": [short_batch, short_block],
            "long": [long_batch, long_block], "long_from": long_from, "distill_full": distill_full,
            "teacher": "bigram (add-0.01, train stream) + in-window copy of successors of x_t and (x_{t-1}, x_t)"}


def evaluate(out_dir: Path, tokenizer_dir: Path, eval_every: int, chunk: int, overlap: int) -> dict:
    """Streaming evaluation of the saved model on every ``eval_every``-th eval-part file."""
    from streamdata.tokenize import load_tokenizer

    from evaluator.data import EvalData
    from evaluator.engine import StreamingEvaluator

    tok = load_tokenizer(str(tokenizer_dir))
    files, texts = read_corpus("eval", eval_every)
    flat, off = encode(tok.tokenizer, texts)
    ed = EvalData.from_tokens(torch.from_numpy(flat.astype(np.int64)), off,
                              doc_bytes=[len(t.encode("utf-8")) for t in texts], doc_words=[len(t.split()) for t in texts],
                              name=f"default corpus eval part (every {eval_every}th file, {len(files)} files)")
    ev = StreamingEvaluator(str(out_dir), chunk_size=chunk, overlap=overlap, device="cpu", verbose=False)
    r = ev.evaluate_streaming_with_metrics(ed)
    return {k: r[k] for k in ("loss", "perplexity", "bits_per_byte", "byte_perplexity", "word_perplexity",
                              "total_tokens", "total_bytes", "total_time", "tokens_per_second", "mode",
                              "chunk_size", "overlap", "doc_mode")} | {"files": len(files), "every": eval_every}


from streamdata.tokenize import DEFAULT_TOKENIZER  # noqa: E402 - after the helpers it does not need


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluator.assets.default.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: evaluator/assets/default)")
    ap.add_argument("--minutes", type=float, default=5.0, help="training time budget (the schedule follows it)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=16, help="evaluate on every Nth eval-part file (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer-out", default=str(DEFAULT_TOKENIZER), metavar="DIR",
                    help="where tokenizer.json + tokenizer_config.json go (default: streamdata's bundled tokenizer "
                         "folder, which '--tokenizer default' and the evaluator's default model both use)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    files, texts = read_corpus("train")
    t = time.perf_counter()
    tok = train_tokenizer(texts)
    eos_id = tok.token_to_id(EOS)
    tok_seconds = time.perf_counter() - t
    stream, offsets = encode(tok, texts)
    print(f"[train] tokenizer: vocab {tok.get_vocab_size()} in {tok_seconds:.1f}s; train part: {len(files)} files, "
          f"{sum(len(x.encode()) for x in texts) / 1e6:.1f} MB, {len(stream):,} tokens", file=sys.stderr, flush=True)

    model = build_model(tok.get_vocab_size(), eos_id, args.d_model, args.layers)
    stats = train(model, stream, args.minutes * 60, args.lr)

    model.save_pretrained(out, safe_serialization=True)
    tok_dir = Path(args.tokenizer_out)
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
        "model_max_length": 1024, "add_prefix_space": False}, indent=2) + "\n")
    from streamdata.tokenize import tokenizer_sha256

    info = {
        "recipe": "python -m evaluator.assets.default.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "corpus": {"part": "train", "files": len(files), "tokens": int(len(stream)), "documents": len(texts),
                   "python": platform.python_version()},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": tok.get_vocab_size(), "eos_token": EOS, "eos_id": eos_id,
                      "sha256": tokenizer_sha256(tok), "train_seconds": round(tok_seconds, 2)},
        "model": {"type": "gpt2", "n_layer": args.layers, "n_embd": args.d_model, "n_head": 4, "n_positions": 1024,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "training": stats | {"seed": 0, "threads": args.threads, "torch": torch.__version__},
    }
    if args.eval_every:
        info["eval"] = evaluate(out, tok_dir, args.eval_every, chunk=1024, overlap=256)
        e = info["eval"]
        print(f"[train] eval part ({e['files']} files, {e['total_tokens']:,} tokens): loss {e['loss']:.4f}  "
              f"perplexity {e['perplexity']:.2f}  bits/byte {e['bits_per_byte']:.4f}", file=sys.stderr)
    info["total_seconds"] = round(time.perf_counter() - t_all, 1)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"[train] saved {out} ({size / 1e6:.2f} MB) in {info['total_seconds']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP threads that spin-wait on a core another process is using make each step several
        # times slower (measured here: 2 spinning threads 2.5x slower than 1 thread while another
        # job ran). The policy is read when torch loads, which importing this package already did,
        # so set it and restart the interpreter once.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "evaluator.assets.default.train", *sys.argv[1:]])
    sys.exit(main())
