"""Shared fixtures: tiny deterministic stores and tokenizers built in tmp_path, and a guard that
fails any test which leaks a thread (the loader's and tokenizer's background threads must stop)."""

from __future__ import annotations

import os
import tempfile

# No network in tests (and none on CI): fail fast instead of waiting on hub timeouts, and keep the
# datasets cache out of the user's home. Set before anything imports datasets/huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="streamdata-tests-hf-"))

import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from streamdata.format import choose_dtype
from streamdata.writer import StoreWriter

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé text — with em dashes, 日本語, and emoji 🙂.",
    "",
    "short",
    "A longer document. " * 40,
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
]


def write_token_store(root: Path, docs: Sequence[Sequence[int]], vocab_size: int = 1000,
                      shard_tokens: int = 1 << 20, nbytes: Sequence[int] | None = None,
                      nwords: Sequence[int] | None = None) -> Path:
    """Write ``docs`` (lists of token ids, EOS already included if wanted) as a sealed npy store.

    Byte/word counts default to 4 bytes and 1 word per token so metric tests have known values.
    """
    lens = np.array([len(d) for d in docs], dtype=np.int64)
    flat = np.concatenate([np.asarray(d, dtype=np.int64) for d in docs]) if docs else np.zeros(0, np.int64)
    w = StoreWriter(root, dtype=choose_dtype(vocab_size), vocab_size=vocab_size, shard_tokens=shard_tokens,
                    settings={"test": True, "n": int(lens.sum())}, overwrite=True)
    w.add_documents(flat, lens, nbytes if nbytes is not None else 4 * lens, nwords if nwords is not None else lens)
    w.commit(tokenizer={"name": "test", "sha256": "0" * 64, "vocab_size": vocab_size, "special_ids": {}},
             special_tokens={"eos": None, "bos": None}, source={"kind": "test"})
    return root


@pytest.fixture
def make_store(tmp_path):
    """``make_store(docs, vocab_size=1000, shard_tokens=..., name="store")`` -> path of a sealed store."""
    counter = iter(range(10**6))

    def _make(docs, vocab_size=1000, shard_tokens=1 << 20, name=None, **kw):
        return write_token_store(tmp_path / (name or f"store{next(counter)}"), docs, vocab_size, shard_tokens, **kw)

    return _make


def train_bpe(path: Path, texts: Sequence[str] = CORPUS, vocab_size: int = 300) -> Path:
    """Train a tiny byte-level BPE with an ``<|endoftext|>`` special token and save it to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) * 3, trainer)
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory) -> Path:
    return train_bpe(tmp_path_factory.mktemp("tok") / "tokenizer.json")


@pytest.fixture(autouse=True)
def no_leaked_threads():
    """Fail a test that leaves a thread of ours running (waits briefly for clean shutdowns)."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5.0
    while True:
        leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()
                  and t.name.startswith("streamdata")]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``cuda`` cleanly when no CUDA device is present (CI never has one)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch means no CUDA
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
