"""Tokenize stage: load a Hugging Face ``tokenizers`` tokenizer, apply the EOS/BOS policy, and run
the source -> tokenizer -> writer pipeline (:func:`tokenize_dataset`).

Throughput notes (measured on the 2-core build machine, see benchmarks/RESULTS.md):
- ``Tokenizer.encode_batch_fast`` encodes a batch on all cores in Rust (rayon) and releases the GIL;
  it skips the character offsets that ``encode_batch`` computes and we never use.
- Reading the next batch of texts out of Arrow, its Rust encoding and flattening run in a background
  thread, so they overlap the byte/word counting and writing of the batch before.
- Ids are flattened with one ``np.fromiter`` over all documents of a batch; per-document numpy
  arrays cost more than the tokenizer on short documents.

Memory: a batch is a text budget (``batch_bytes``), not a document count, because the tokenizer's
``Encoding`` objects and the ``ids`` lists take ~40 bytes per byte of text while they live (a
batch of 1,000 stdlib files held ~17 MB of text: 1.4 GB peak). Only the background thread holds
``Encoding`` objects, two batches at most (two encode calls in flight); the bounded queue holds flat
id arrays (8 bytes a token). So the peak is about a fixed ~220-280 MiB (interpreter, datasets, more
with many source files) + ~100x ``batch_bytes``. Documents are never split: one larger
than the budget is encoded alone, and the tokenizer itself then takes ~130x its size (a 50 MB
document: 6.3 GB peak).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np

from .errors import ConfigError, SourceError, TokenizerError, brief, missing_local_path
from .format import DEFAULT_SHARD_TOKENS, STORE_FORMATS, WORD_RULE, Manifest, choose_dtype
from .output import STAGING_DIR, Output, SourceFile, full_disk_is_one_line, lock_output, prepare_output
from .source import IdsBatch, Source, SourceSpec, check_part, load_source, utf8_len
from .writer import StoreWriter

__all__ = ["DEFAULT_TOKENIZER", "DEFAULT_BATCH_BYTES", "TOKENIZER_ID_PARTS", "IdsColumn", "TokenizeConfig", "TokenizeResult",
           "LoadedTokenizer", "count_words", "load_tokenizer", "run_tokenize", "tokenize_dataset", "tokenizer_digests",
           "tokenizer_mismatch", "tokenizer_sha256"]

#: The bundled tokenizer (``--tokenizer default``): a 4096-entry byte-level BPE with
#: ``<|endoftext|>`` as EOS, trained on the embedded corpus's train part by
#: ``python -m evaluator.assets.default.train`` (which also trains the bundled model on it); the
#: evaluator's default model uses this copy, the only one.
DEFAULT_TOKENIZER = Path(__file__).resolve().parent / "assets" / "default_tokenizer"

#: UTF-8 bytes of text per encode batch (``--batch-bytes``). Each MiB of batch adds ~100 MiB to the
#: peak RSS (two batches in flight). Measured (2 cores, warm Arrow cache): 2 MiB gave 416 MiB on
#: stdlib:all but 562 MiB on 16x that corpus (datasets' per-file state grows with the file count);
#: 1 MiB gave 464 MiB on the 16x corpus, under the 512 MiB goal (benchmarks/bench_tokenize.py).
DEFAULT_BATCH_BYTES = 1 << 20

# Names tried, in order, when a tokenizer's configuration does not say which token is EOS/BOS.
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "[BOS]", "<|endoftext|>")


#: The parts of a ``tokenizer.json`` that decide the ids we write (``encode(text,
#: add_special_tokens=False)``): the model (vocabulary, merges), normalizer, pre-tokenizer, added
#: tokens (their ids and how they match), and truncation/padding (both change what ``encode_batch``
#: returns when set; null in most files). Not the post-processor (we never apply it, and
#: transformers' ``save_pretrained`` adds an empty one to files that had none), nor the decoder.
TOKENIZER_ID_PARTS = ("model", "normalizer", "pre_tokenizer", "added_tokens", "truncation", "padding")


def tokenizer_sha256(tok: Any) -> str:
    """sha256 of the tokenizer's whole canonical JSON (``Tokenizer.to_str()``): the identity stores
    recorded before ``ids_sha256`` existed. It also covers parts that never change an id (the
    post-processor, the decoder), so two files that encode alike can differ here."""
    return hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()


def tokenizer_digests(tok: Any) -> dict[str, Any]:
    """The tokenizer's identity as stores and models record it: ``sha256`` (the whole JSON, kept for
    stores and readers of the older kind), ``ids_parts`` (sha256 of each :data:`TOKENIZER_ID_PARTS`
    entry's canonical JSON, so a mismatch can be named) and ``ids_sha256`` (of those part digests:
    equal exactly when every part that decides the ids is equal)."""
    text = tok.to_str()
    d = json.loads(text)
    parts = {k: hashlib.sha256(json.dumps(d.get(k), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
                               .encode("utf-8")).hexdigest() for k in TOKENIZER_ID_PARTS}
    ids = hashlib.sha256("".join(f"{k}={parts[k]}\n" for k in TOKENIZER_ID_PARTS).encode()).hexdigest()
    return {"sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "ids_sha256": ids, "ids_parts": parts}


def tokenizer_mismatch(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """What differs between two recorded tokenizer identities (a manifest's ``tokenizer``, a model's),
    or None when they agree or cannot be compared (a side records no digest).

    Like is compared with like: ``ids_sha256`` when both sides have it (the differing
    :data:`TOKENIZER_ID_PARTS` are named); otherwise the whole-JSON ``sha256``, where a difference
    may lie only in parts that never change an id, so a caller should say which side has only that
    kind (evaluator/resolve.py does)."""
    ai, bi = a.get("ids_sha256"), b.get("ids_sha256")
    if ai and bi:
        if ai == bi:
            return None
        pa, pb = a.get("ids_parts") or {}, b.get("ids_parts") or {}
        parts = [k for k in TOKENIZER_ID_PARTS if pa.get(k) != pb.get(k)]
        if not parts:  # equal parts, other ids digest: only a damaged manifest can do this
            return "their ids digests differ"
        return f"their {', '.join(parts)} {'differs' if len(parts) == 1 else 'differ'}"
    af, bf = a.get("sha256"), b.get("sha256")
    if af and bf and af != bf:
        return f"whole-file sha256 {af[:12]}... vs {bf[:12]}..."
    return None


@dataclass
class LoadedTokenizer:
    tokenizer: Any  # tokenizers.Tokenizer
    name: str
    sha256: str  # of the whole JSON (the build's resume identity; stores of the older kind record only it)
    vocab_size: int
    config_tokens: dict[str, str | None] = field(default_factory=dict)  # eos/bos from tokenizer_config.json
    ids_sha256: str | None = None  # of the parts that decide the ids (tokenizer_digests)
    ids_parts: dict[str, str] = field(default_factory=dict)

    #: how documents' words are counted in stores it builds (the evaluator's word perplexity)
    word_rule: ClassVar[str | None] = WORD_RULE

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def identity(self) -> dict[str, Any]:
        added = self.tokenizer.get_added_tokens_decoder()
        specials = {t.content: int(i) for i, t in sorted(added.items()) if getattr(t, "special", False)}
        return {"name": self.name, "sha256": self.sha256, "ids_sha256": self.ids_sha256, "ids_parts": dict(self.ids_parts),
                "vocab_size": self.vocab_size, "special_ids": specials}


def _read_token_config(folder: Path) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        p = folder / fname
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for key in ("eos_token", "bos_token"):
            v = d.get(key)
            if isinstance(v, dict):  # AddedToken serialised as a dict
                v = v.get("content")
            if isinstance(v, str) and key[:3] not in out:
                out[key[:3]] = v
    return out


def load_tokenizer(spec: str) -> LoadedTokenizer:
    """Load ``spec``: a ``tokenizer.json`` path, a folder holding one, a hub id, or ``default``."""
    from tokenizers import Tokenizer

    if spec == "default":
        if not (DEFAULT_TOKENIZER / "tokenizer.json").is_file():
            raise TokenizerError(f"the bundled tokenizer is missing from {str(DEFAULT_TOKENIZER)!r}: reinstall, or run 'python -m evaluator.assets.default.train'")
        spec = str(DEFAULT_TOKENIZER)
    hint = missing_local_path(spec)
    if hint is not None:  # written as a path: never a hub look-up (retries for ~25 s offline)
        raise TokenizerError(f"tokenizer {spec!r}: no such file or folder{hint}: pass a tokenizer.json file, a folder "
                             "holding one, a hub id or 'default'")
    p = Path(os.path.expanduser(spec))
    cfg: dict[str, str | None] = {}
    if p.is_file():
        try:
            tok = Tokenizer.from_file(str(p))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"cannot load tokenizer file {spec!r} ({brief(e)}): pass a valid tokenizer.json") from None
        cfg = _read_token_config(p.parent)
        name = str(p.resolve())
    elif p.is_dir():
        f = p / "tokenizer.json"
        if not f.is_file():
            raise TokenizerError(f"tokenizer folder {spec!r} has no tokenizer.json: pass the file or a folder saved by save_pretrained")
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as e:
            raise TokenizerError(f"cannot load {str(f)!r} ({brief(e)}): pass a valid tokenizer.json") from None
        cfg = _read_token_config(p)
        name = str(p.resolve())
    else:
        try:
            tok = Tokenizer.from_pretrained(spec)
        except Exception as e:  # offline, unknown repo, no tokenizer.json in the repo
            raise TokenizerError(
                f"unknown tokenizer {spec!r}: not a tokenizer.json file, a folder with one, or a reachable hub id "
                f"({brief(e, 160)})"
            ) from None
        name = spec
        try:  # EOS/BOS names live in tokenizer_config.json on the hub; optional
            from huggingface_hub import hf_hub_download

            cfg = _read_token_config(Path(hf_hub_download(spec, "tokenizer_config.json")).parent)
        except Exception:  # noqa: BLE001 - absent config is normal; we fall back to known names
            cfg = {}
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dig = tokenizer_digests(tok)
    return LoadedTokenizer(tok, name, dig["sha256"], int(vocab), cfg, dig["ids_sha256"], dig["ids_parts"])


@dataclass
class IdsColumn:
    """What stands for the tokenizer when the source column already holds token ids
    (``TokenizeConfig.ids_column``): the ids are checked against ``vocab_size`` and stored as they are."""

    column: str
    vocab_size: int
    sha256: ClassVar[None] = None  # no tokenizer file: the build settings record None
    word_rule: ClassVar[None] = None  # no text, so no words counted

    def identity(self) -> dict[str, Any]:
        return {"name": None, "sha256": None, "vocab_size": self.vocab_size, "special_ids": {},
                "ids_column": self.column}

    def check(self, batch: IdsBatch) -> None:
        """Refuse (one line naming the row) an id outside ``[0, vocab_size)``, before anything is written."""
        flat = batch.flat
        if not flat.size:
            return
        lo, hi = int(flat.min()), int(flat.max())
        if lo >= 0 and hi < self.vocab_size:
            return
        at = int(np.argmax((flat < 0) | (flat >= self.vocab_size)))
        row = batch.first_row + int(np.searchsorted(np.cumsum(batch.lens), at, side="right"))
        raise SourceError(f"row {row}: column {self.column!r} holds id {int(flat[at])}, outside the vocabulary "
                          f"[0, {self.vocab_size}): pass the --vocab-size of the tokenizer that made the ids")


def _resolve_special(tok: LoadedTokenizer, choice: str, which: str) -> tuple[int | None, str | None]:
    """``choice``: 'auto' (the tokenizer's own, if any), 'none', or a token string such as '</s>'."""
    if choice == "none":
        return None, None
    if choice == "auto":
        names = ([tok.config_tokens[which]] if tok.config_tokens.get(which) else []) + list(
            _EOS_NAMES if which == "eos" else _BOS_NAMES
        )
        for n in names:
            i = tok.token_id(n)
            if i is not None:
                return int(i), n
        return None, None
    i = tok.token_id(choice)
    if i is None:
        raise TokenizerError(f"--{which} token {choice!r} is not in the tokenizer's vocabulary: pass auto, none, or an existing token")
    return int(i), choice


@dataclass
class TokenizeConfig:
    """Settings of one ``streamdata tokenize`` run (validated on construction).

    ``ids_column``: the source's column already holds token ids (lists of integers, e.g. a
    pre-tokenized ``input_ids``): they are stored as they are, one document per row, with no
    tokenizer (``tokenizer`` None), no EOS/BOS added and ``vocab_size`` given (it picks the dtype and
    every id is checked against it). Such a store knows no byte or word counts (totals 0), so bits
    per byte and word perplexity are reported as unavailable."""

    source: Sequence[str] | str
    tokenizer: str | None
    out: str
    config_name: str | None = None
    split: str | None = None
    revision: str | None = None
    text_column: str = "text"
    streaming: bool = False
    sample_by: str = "document"
    max_docs: int | None = None
    max_tokens: int | None = None  # stop after the document that brings the total to this many or more
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    eos: str = "auto"  # auto | none | TOKEN: appended to every document
    bos: str = "none"  # auto | none | TOKEN: prepended to every document
    batch_bytes: int = DEFAULT_BATCH_BYTES  # UTF-8 text bytes per encode batch; a larger document is a batch alone
    batch_size: int | None = None  # also at most this many documents per batch (None: bytes alone decide)
    overwrite: bool = False
    format: str = "npy"  # STORE_FORMATS (zarr: tokenized into an npy staging store, then packed)
    compression: str = "none"  # zarr only: none | zstd | blosc
    cache_dir: str | None = None
    progress: bool = False
    data_files_builder: str | None = None
    #: a partitioned build (both or neither): this store holds part ``part`` (0-based) of ``num_parts``
    #: contiguous slices of the source (cut as streamdata.source says); ``streamdata merge`` joins them
    num_parts: int | None = None
    part: int | None = None
    ids_column: str | None = None  # store this column's token ids as they are (no tokenizer)
    vocab_size: int | None = None  # with ids_column: the ids' vocabulary size (required)

    def __post_init__(self):
        if isinstance(self.source, str):
            self.source = (self.source,)
        self._check_ids_mode()
        self.source = tuple(str(s) for s in self.source)
        check_part(self.num_parts, self.part)
        if self.num_parts is not None:
            for name in ("max_docs", "max_tokens"):
                if getattr(self, name) is not None:  # a global limit: a part cannot know what the parts before it hold
                    raise ConfigError(f"{name}={getattr(self, name)} cannot be combined with num_parts={self.num_parts}: "
                                      f"a limit counts from the source's start, which a part does not see; leave {name} unset")
        for name in ("max_docs", "max_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name}={v} must be >= 1 (or unset for no limit)")
        if self.shard_tokens < 1:
            raise ConfigError(f"shard_tokens={self.shard_tokens} must be >= 1: pass e.g. --shard-tokens 67108864")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1 (or unset for no document limit)")
        if self.batch_bytes < 1:
            raise ConfigError(f"batch_bytes={self.batch_bytes} must be >= 1: pass e.g. --batch-bytes {DEFAULT_BATCH_BYTES}")
        if self.format not in STORE_FORMATS:
            raise ConfigError(f"format {self.format!r} is not supported: use {' or '.join(STORE_FORMATS)}")
        if self.format == "npy" and self.compression != "none":
            raise ConfigError(f"compression={self.compression!r} needs --format zarr (npy shards are raw arrays)")
        if self.format == "zarr":
            from .backends.zarr import check_compression

            check_compression(self.compression)
        if not self.out:
            raise ConfigError("no output folder: pass --out DIR")
        if "://" in str(self.out):
            raise ConfigError(f"tokenize writes to a local folder, not {self.out!r}: tokenize locally, then "
                              "'streamdata convert' the store to the URL")

    def _check_ids_mode(self) -> None:
        """A tokenizer, or an ids column with its vocabulary size: never both, never neither."""
        if self.ids_column is None:
            if not self.tokenizer:
                raise ConfigError("no tokenizer: pass --tokenizer (a tokenizer.json, a folder, a hub id or 'default'), "
                                  "or --ids-column NAME for a column that already holds token ids")
            if self.vocab_size is not None:
                raise ConfigError(f"vocab_size={self.vocab_size} applies only with --ids-column (a tokenizer gives its "
                                  "own): drop --vocab-size")
            return
        if self.tokenizer:
            raise ConfigError(f"--ids-column {self.ids_column!r} stores ids as they are, without a tokenizer, but "
                              f"--tokenizer {self.tokenizer!r} was given too: drop one of them")
        if self.vocab_size is None or self.vocab_size < 1:
            raise ConfigError(f"--ids-column {self.ids_column!r} needs --vocab-size N, the vocabulary the ids come "
                              "from (it picks uint16/uint32, and every id is checked against it)")
        for name, default in (("eos", "auto"), ("bos", "none")):
            if getattr(self, name) not in (default, "none"):
                raise ConfigError(f"--{name} {getattr(self, name)!r} needs a tokenizer; with --ids-column the ids are "
                                  f"stored as they are: put the {name.upper()} ids in the column, or drop --{name}")

    def source_spec(self) -> SourceSpec:
        return SourceSpec(
            paths=tuple(self.source), config=self.config_name, split=self.split, revision=self.revision,
            text_column=self.text_column, streaming=self.streaming, sample_by=self.sample_by,
            cache_dir=self.cache_dir, data_files_builder=self.data_files_builder,
            num_parts=self.num_parts, part=self.part, ids_column=self.ids_column,
        )


def _prefetch(it: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run ``it`` in a background thread, ``depth`` items ahead (plus the one it is making); errors
    are re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    _END = object()

    def work():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", _END))
        except BaseException as e:  # handed to the consumer, which re-raises it
            q.put(("error", e))
        finally:  # a generator stopped early runs its clean-up (its encode threads) here, not at GC
            close = getattr(it, "close", None)
            if close is not None:
                close()

    t = threading.Thread(target=work, name="streamdata-source", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "item":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            t.join(timeout=0.05)


#: encode calls in flight at once (each on the tokenizer's shared rayon pool of all cores)
_ENCODE_CALLS = 2


def _encode(tok: Any, texts: Sequence[str]) -> list:
    """Rust-side encoding of a batch (all cores, GIL released). No special tokens from the
    tokenizer's post-processor: the explicit BOS/EOS policy is the only one applied."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return encode(list(texts), add_special_tokens=False)


def _flatten(encodings: Sequence[Any], bos: int | None, eos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Encodings -> (flat int64 ids of all documents with BOS/EOS added, int64 length of each)."""
    ids = [e.ids for e in encodings]
    extra = (bos is not None) + (eos is not None)
    lens = np.fromiter((len(x) + extra for x in ids), dtype=np.int64, count=len(ids))
    if extra == 0:
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lens.sum()))
    else:
        pre, post = ([bos] if bos is not None else []), ([eos] if eos is not None else [])
        flat = np.fromiter(itertools.chain.from_iterable(pre + x + post for x in ids), dtype=np.int64, count=int(lens.sum()))
    return flat, lens


def encode_documents(tok: Any, texts: Sequence[str], bos: int | None, eos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``texts`` -> (flat int64 ids of all documents, int64 length of each)."""
    return _flatten(_encode(tok, texts), bos, eos)


@dataclass
class TokenizeResult:
    """What one :func:`run_tokenize` call did, so a rate can count this run's work only."""

    manifest: Manifest
    #: the store was already finished with these settings: this call did nothing
    already_complete: bool
    #: tokens and documents in finished shards of an interrupted build that this call resumed
    tokens_before: int
    documents_before: int
    #: tokens and documents this call tokenized (0 when it only had to finish packing a zarr store)
    tokens_this_run: int
    documents_this_run: int


def tokenize_dataset(config: TokenizeConfig | str | Sequence[str] | None = None, /, **kwargs: Any) -> Manifest:
    """Tokenize a dataset into a store at ``config.out`` and return its manifest.

    Resumes an unfinished build of the same settings and unchanged source files; refuses to replace
    a finished store unless ``overwrite`` (a finished store built with the same settings is returned
    as is); never touches a folder that is not ours (rules: :mod:`streamdata.output`).
    ``config``: a :class:`TokenizeConfig`, or the source (a path, glob, hub id or a list of them) with
    the other fields as keywords. :func:`run_tokenize` also says how much of the work this call did.
    """
    return run_tokenize(config, **kwargs).manifest


def run_tokenize(config: TokenizeConfig | str | Sequence[str] | None = None, /, **kwargs: Any) -> TokenizeResult:
    """:func:`tokenize_dataset`, returning the manifest with this call's share of the work."""
    if isinstance(config, (str, os.PathLike, list, tuple)):  # the source given positionally
        if "source" in kwargs:
            raise ConfigError(f"source given twice ({str(config)[:80]!r} and source={kwargs['source']!r}): pass one")
        config, kwargs = None, {"source": [os.fspath(x) for x in ([config] if isinstance(config, (str, os.PathLike)) else config)], **kwargs}
    elif config is not None and not isinstance(config, TokenizeConfig):
        raise ConfigError(f"tokenize_dataset takes a TokenizeConfig, a source or keywords, not {type(config).__name__}: "
                          "pass e.g. tokenize_dataset('corpus/*.jsonl', tokenizer=..., out=...)")
    cfg = config if config is not None else TokenizeConfig(**kwargs)
    with full_disk_is_one_line(cfg.out):
        return _tokenize(cfg)


def _tokenize(cfg: TokenizeConfig) -> TokenizeResult:
    if cfg.ids_column is not None:
        tok: LoadedTokenizer | IdsColumn = IdsColumn(cfg.ids_column, int(cfg.vocab_size))
        eos_id = bos_id = None
        special = {"eos": None, "eos_token": None, "eos_policy": "none", "bos": None, "bos_token": None,
                   "bos_policy": "none", "placement": f"ids of column {cfg.ids_column!r} stored as they are: no BOS/EOS added"}
    else:
        tok = load_tokenizer(cfg.tokenizer)
        eos_id, eos_tok = _resolve_special(tok, cfg.eos, "eos")
        bos_id, bos_tok = _resolve_special(tok, cfg.bos, "bos")
        special = {
            "eos": eos_id, "eos_token": eos_tok, "eos_policy": cfg.eos,
            "bos": bos_id, "bos_token": bos_tok, "bos_policy": cfg.bos,
            "placement": "bos + text + eos for every document; the tokenizer's own post-processor is not applied",
        }
    dtype = choose_dtype(tok.vocab_size)
    # the lock first: a second writer of --out fails at once, before loading the source
    lock = lock_output(cfg.out)
    try:
        source = load_source(cfg.source_spec())
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    try:
        settings = {
            "source": source.identity,
            "tokenizer_sha256": tok.sha256,
            # doc_words' rule: a build begun by a version that counted words otherwise never resumes
            # into one store with mixed counts (it is refused with the key named)
            "word_rule": tok.word_rule,
            "special": special,
            "dtype": dtype,
            "shard_tokens": cfg.shard_tokens,
            "max_docs": cfg.max_docs,
            "max_tokens": cfg.max_tokens,
        }
        if cfg.ids_column is not None:  # the ids are checked against it: another vocabulary is another build
            settings = {**settings, "vocab_size": tok.vocab_size}
        if cfg.format == "zarr":
            settings = {**settings, "format": "zarr", "compression": cfg.compression}
        if source.part is not None:  # a part resumes only as the same part of the same cut
            settings = {**settings, "part": source.part}
        files = [SourceFile.of(f) for f in source.files]
        out = prepare_output(cfg.out, settings, overwrite=cfg.overwrite, sources=files, lock=lock)
        lock = None  # the Output holds it now
        if out.finished is not None:
            tot = out.finished.totals
            return TokenizeResult(out.finished, True, int(tot["tokens"]), int(tot["documents"]), 0, 0)
        if cfg.format == "npy":
            writer = StoreWriter(None, dtype=dtype, vocab_size=tok.vocab_size, shard_tokens=cfg.shard_tokens,
                                 settings=settings, output=out)
            return _run_pipeline(cfg, tok, source, writer, bos_id, eos_id, special)
        return _tokenize_zarr(cfg, tok, source, out, dtype, bos_id, eos_id, special)
    finally:
        if lock is not None:
            lock.release()
        source.close()


def _tokenize_zarr(cfg: TokenizeConfig, tok: LoadedTokenizer | IdsColumn, source: Source, out: Output, dtype: str,
                   bos_id: int | None, eos_id: int | None, special: dict[str, Any]) -> TokenizeResult:
    """``--format zarr``: tokenize into an npy staging store inside the build, then pack it into zarr.

    Both steps resume (the staging store has its own ledger; the pack records packed shards)."""
    from .backends import open_store
    from .backends.zarr import pack_into_output

    try:
        staging = Path(out.root) / STAGING_DIR
        writer = StoreWriter(staging, dtype=dtype, vocab_size=tok.vocab_size, shard_tokens=cfg.shard_tokens,
                             settings=out.settings)
        if writer.finished is None:
            staged = _run_pipeline(cfg, tok, source, writer, bos_id, eos_id, special)
        else:  # tokenized by an earlier run, interrupted while packing
            tot = writer.finished.totals
            staged = TokenizeResult(writer.finished, False, int(tot["tokens"]), int(tot["documents"]), 0, 0)
        with open_store(staging) as store:
            manifest = pack_into_output(store, out, compression=cfg.compression)  # seals: _build goes
        staged.manifest = manifest
        return staged
    except BaseException:
        out.abort()
        raise


def _run_pipeline(cfg: TokenizeConfig, tok: LoadedTokenizer | IdsColumn, source: Source, writer: StoreWriter,
                  bos_id: int | None, eos_id: int | None, special: dict[str, Any]) -> TokenizeResult:
    """source -> encode -> writer, then seal. On any error the writer keeps its finished shards."""
    created = {
        "tool": "streamdata", "python": sys.version.split()[0], "numpy": np.__version__,
        "tokenizers": _version("tokenizers"), "datasets": _version("datasets"),
        "time_unix": int(time.time()),
    }
    skip = writer.documents_done
    tokens_before = writer.tokens_written
    bar = None
    try:
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=source.num_rows if cfg.max_docs is None else min(cfg.max_docs, source.num_rows or cfg.max_docs),
                       initial=skip, unit="doc", desc="tokenize", file=sys.stderr, dynamic_ncols=True)
        done = cfg.max_docs is not None and skip >= cfg.max_docs or (
            cfg.max_tokens is not None and writer.tokens_written >= cfg.max_tokens)

        def limited():
            remaining = None if cfg.max_docs is None else cfg.max_docs - skip
            for texts, origins in source.documents(cfg.batch_bytes, skip=skip, max_docs=cfg.batch_size):
                if remaining is not None:
                    texts, origins = texts[:remaining], origins[:remaining]
                    remaining -= len(texts)
                yield texts, origins
                if remaining == 0:
                    return

        def encoded():
            if isinstance(tok, IdsColumn):  # ids already: checked, not encoded
                for batch, origins in limited():
                    tok.check(batch)
                    yield batch, origins, batch.flat, batch.lens
                return
            # Runs in the background thread: reading Arrow and the (GIL-free) Rust encoding of the
            # next batches overlap the counting and writing of batch k in this thread. Two encode
            # calls are in flight, so the cores a batch's last long documents leave idle take the
            # next batch's documents (one call at a time cost ~15% on stdlib:all's skewed sizes).
            # The Encoding objects (~40 bytes per byte of text) die here, inside _flatten's caller:
            # only flat id arrays queue.
            with ThreadPoolExecutor(_ENCODE_CALLS, thread_name_prefix="streamdata-encode") as pool:
                pending: deque = deque()
                try:
                    for texts, origins in limited():
                        pending.append((texts, origins, pool.submit(_encode, tok.tokenizer, texts)))
                        if len(pending) == _ENCODE_CALLS:
                            texts, origins, fut = pending.popleft()
                            yield (texts, origins, *_flatten(fut.result(), bos_id, eos_id))
                    while pending:
                        texts, origins, fut = pending.popleft()
                        yield (texts, origins, *_flatten(fut.result(), bos_id, eos_id))
                finally:
                    for _, _, fut in pending:  # stopped early (limit reached, error): no result wanted
                        fut.cancel()

        for texts, origins, flat, lens in ([] if done else _prefetch(encoded())):
            if cfg.max_tokens is not None:
                cum = np.cumsum(lens) + writer.tokens_written
                keep = int(np.searchsorted(cum, cfg.max_tokens, side="left")) + 1
                if keep < len(lens):
                    texts, origins, lens = texts[:keep], origins[:keep], lens[:keep]
                    flat = flat[: int(lens.sum())]
            if isinstance(tok, IdsColumn):  # no text: counts unknown (zeros, totals 0: no bits per byte)
                nbytes = nwords = np.zeros(len(lens), np.int64)
            else:
                nbytes = [utf8_len(t) for t in texts]
                nwords = [count_words(t) for t in texts]
            writer.add_documents(flat, lens, nbytes, nwords, origins.file, origins.row)
            if bar is not None:
                bar.update(len(texts))
            del texts, origins, flat, lens  # not held while the next batch is awaited
            if (cfg.max_docs is not None and writer.documents_written >= cfg.max_docs) or (
                cfg.max_tokens is not None and writer.tokens_written >= cfg.max_tokens
            ):
                break
        # a part's manifest says which slice it holds (extra survives convert and the zarr pack)
        writer.finished = writer.commit(tokenizer=tok.identity(), special_tokens=special,
                                        source=source.identity, created_by=created, word_rule=tok.word_rule,
                                        extra=None if source.part is None else {"part": source.part},
                                        source_files=source.origin_files)
        return TokenizeResult(writer.finished, False, tokens_before, skip,
                              writer.tokens_written - tokens_before, writer.documents_written - skip)
    except BaseException:
        writer.abort()
        raise
    finally:
        if bar is not None:
            bar.close()


#: characters per slice when counting a long document's words (count_words' slice_chars): str.split()
#: on a whole 50 MB document would hold a list of all its words at once (~60 bytes each)
_WORDS_SLICE = 1 << 20


def count_words(text: str, slice_chars: int = _WORDS_SLICE) -> int:
    r"""Words of ``text`` by lm-evaluation-harness's rule (:data:`~streamdata.format.WORD_RULE`):
    ``len(re.split(r"\s+", text))``, i.e. whitespace runs + 1, so leading and trailing whitespace
    each count an empty word and ``""`` counts 1.

    Computed from ``str.split()`` (same whitespace as ``\s``, ~2x faster than the regex and no list
    of empty strings): a slice with ``w`` words holds ``w - 1`` runs between them plus one at each
    whitespace end, or exactly 1 when it is all whitespace. Long texts are counted slice by slice
    (``slice_chars`` characters, >= 1; the count does not depend on it) in bounded memory; a
    whitespace run cut by a slice boundary (whitespace on both sides) is one run.
    """
    if slice_chars < 1:
        raise ConfigError(f"slice_chars={slice_chars} must be >= 1")
    runs, prev_ws = 0, False
    for lo in range(0, len(text), slice_chars):
        part = text[lo : lo + slice_chars]
        w = len(part.split())
        first_ws = part[0].isspace()
        runs += 1 if w == 0 else w - 1 + first_ws + part[-1].isspace()
        if prev_ws and first_ws:
            runs -= 1
        prev_ws = part[-1].isspace()
    return runs + 1


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:  # noqa: BLE001 - metadata is informational only
        return None

