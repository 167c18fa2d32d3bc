"""Documents (lm.corpus) -> tokenizer + memory-mapped train/val token files (lm.shard_loader
batches them).

The token cache is built once, on the driver, under a key of (corpus content, tokenizer settings),
so reruns and sweeps reuse it. A text corpus is streamed through the build, never held in memory.
The cache is written to a temporary directory and renamed into place, so a crash never leaves a half
cache that looks complete, and an existing cache is never modified.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from lm.chat_data import render_with_answer_spans, tokenize_conversation
from lm.chat_template import BUILTIN, ChatTemplate, ChatTemplateError
from lm.config import ConfigError, DataConfig, path_items
from lm.corpus import (chat_conversations, check_chats, check_text_files, corpus_files, empty_corpus,
                       iter_documents, read_chats, read_documents, source_files)
from lm.records import FORMATS
from lm.tokenizer import Tokenizer, bos_ids, load_tokenizer, train_tokenizer, with_chat_template

CACHE_FORMAT_VERSION = 1


def cache_key(docs: Iterable[str], data: DataConfig, tokenizer: Tokenizer | None = None,
              packed_seq_len: int | None = None, val_docs: list[str] | None = None) -> str:
    """Hash of everything that changes the token files: the text (and the validation text when it has
    files of its own) and the tokenizer settings."""
    h = hashlib.sha256()
    settings = {"v": CACHE_FORMAT_VERSION, "tokenizer": data.tokenizer, "val_fraction": data.val_fraction,
                "tokenizer_train_bytes": data.tokenizer_train_bytes}
    if data.tokenizer == "bpe":
        settings["vocab_size"] = data.vocab_size
    if data.source == "chat":
        settings["source"] = "chat"
    if tokenizer is not None:  # a given tokenizer (a pretrained model's) replaces the trained one
        settings = {"v": CACHE_FORMAT_VERSION, "source": data.source, "val_fraction": data.val_fraction,
                    "tokenizer_json": hashlib.sha256(tokenizer.to_json().encode()).hexdigest()}
        if tokenizer.chat_template is not None:  # saved with the cache's tokenizer, which the run serves with
            settings["chat_template"] = hashlib.sha256(tokenizer.chat_template.to_json().encode()).hexdigest()
        if bos := bos_ids(tokenizer):  # documents start with it
            settings["document_start"] = bos
    if packed_seq_len:
        settings["packed_seq_len"] = packed_seq_len
    if val_docs is not None:  # data.val_path: val_fraction splits nothing
        settings.pop("val_fraction")
        settings["val_documents"] = len(val_docs)
    h.update(json.dumps(settings, sort_keys=True).encode())
    for doc in itertools.chain(docs, val_docs or []):
        encoded = doc.encode("utf-8")
        h.update(len(encoded).to_bytes(8, "little"))
        h.update(encoded)
    return h.hexdigest()[:20]


@dataclass
class PreparedData:
    directory: Path
    meta: dict

    @classmethod
    def load(cls, directory: str | Path) -> "PreparedData":
        directory = Path(directory)
        return cls(directory, json.loads((directory / "meta.json").read_text()))

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.tokenizer_path)

    def tokens(self, split: str) -> np.memmap:
        return np.memmap(self.directory / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def mixture(self, split: str, weights: list[float] | None) -> list[tuple[int, int, float]] | None:
        """A split's sources as TokenShardLoader's mixture, [(first token, end token, weight)]; None without
        weights (one corpus), or for validation from files of its own (data.val_path)."""
        sources = self.meta.get("sources", [])
        if not weights or (split == "val" and not any(source["val_tokens"] for source in sources)):
            return None
        if len(sources) != len(weights):
            raise ValueError(f"data.weights has {len(weights)} weights but the token cache {self.directory} "
                             f"holds {len(sources)} sources")
        ends = np.cumsum([source[f"{split}_tokens"] for source in sources])
        return [(int(end - source[f"{split}_tokens"]), int(end), float(weight))
                for source, end, weight in zip(sources, ends, weights)]

    def source_names(self) -> list[str]:
        """Short, distinct names of a mixture's sources (for per-source metrics): each item's last part."""
        names = [Path(source["path"].rstrip("/")).name or source["path"] for source in self.meta.get("sources", [])]
        return [name if names.count(name) == 1 else f"{i}-{name}" for i, name in enumerate(names)]

    def loss_mask(self, split: str) -> np.memmap | None:
        """Chat data: 1 where a token is a target the loss counts (an answer token), else 0."""
        if not self.meta.get("loss_mask"):
            return None
        return np.memmap(self.directory / f"{split}_mask.bin", dtype=np.uint8, mode="r")


class _CorpusIndex:
    """What the streamed passes over a corpus (text documents, or conversations rendered as text) need of
    each document: its md5 (the order `_shuffled` puts documents in) and its length. Some 24 bytes a
    document, never the text."""

    def __init__(self, sources: list[Callable[[], Iterable[str]]]):
        self.sources = sources  # each reads its documents afresh: one source, or a mixture's (data.weights)
        self.digests = bytearray()
        self.lengths = array("q")  # characters, as `_tokenizer_sample` counts them
        self.ends: list[int] = []  # where each source's documents end
        self.has_text = False

    def __len__(self) -> int:
        return len(self.lengths)

    def documents(self) -> Iterator[str]:
        return itertools.chain.from_iterable(read() for read in self.sources)

    def scan(self) -> Iterator[str]:
        """The documents, each one's digest and length recorded on the way (the first pass)."""
        self.ends = []
        for read in self.sources:
            for doc in read():
                self.digests += hashlib.md5(doc.encode("utf-8")).digest()
                self.lengths.append(len(doc))
                self.has_text = self.has_text or bool(doc.strip())
                yield doc
            self.ends.append(len(self))

    def sample(self, max_chars: int, val_docs: list[str] | None) -> Iterator[str]:
        """`_tokenizer_sample(_shuffled(docs + val_docs), max_chars)`, reading only the documents it takes."""
        val_docs = val_docs or []
        digests = bytes(self.digests) + b"".join(hashlib.md5(v.encode("utf-8")).digest() for v in val_docs)
        lengths = np.concatenate([np.frombuffer(self.lengths, dtype=np.int64),
                                  np.array([len(v) for v in val_docs], dtype=np.int64)])
        order = _digest_order(digests)
        taken = order[:int(np.searchsorted(np.cumsum(lengths[order]), max_chars)) + 1]
        wanted = {int(i) for i in taken if i < len(self)}
        found = {}
        for i, doc in enumerate(self.documents()):
            if len(found) == len(wanted):
                break
            if i in wanted:
                found[i] = doc
        for i in taken:
            yield found[i] if i < len(self) else val_docs[i - len(self)]

    def source_ranges(self) -> list[tuple[int, int]]:
        """Each source's documents: [first, end) indices (after `scan`)."""
        return list(zip([0, *self.ends], self.ends))

    def source_sizes(self) -> list[int]:
        return [end - start for start, end in self.source_ranges()]

    def content_order(self, start: int, end: int) -> np.ndarray:
        """Documents start..end-1 in `_shuffled`'s order (by md5; ties in file order)."""
        return start + _digest_order(bytes(self.digests[16 * start:16 * end]))

    def write_splits(self, stream: "TokenStream", train: Path, val: Path, val_fraction: float) -> list[tuple]:
        """Each source's documents in content order, one source after another: the first part of each
        to `train`, its last val_fraction of tokens (0: none) to `val`. Returns (train, val) tokens by source."""
        split = []
        with open(train, "wb") as train_out, open(val, "wb") as val_out:
            for start, end in self.source_ranges():
                order = self.content_order(start, end)
                total = int(stream.offsets[end] - stream.offsets[start])  # the source's documents, in file order
                n_val = max(int(total * val_fraction), 1) if val_fraction else 0
                written = 0
                for i in order:
                    tokens = stream.tokens[stream.offsets[i]:stream.offsets[i + 1]]
                    cut = max(min(total - n_val - written, len(tokens)), 0)
                    tokens[:cut].tofile(train_out)
                    tokens[cut:].tofile(val_out)
                    written += len(tokens)
                split.append((total - n_val, n_val))
        return split


def _digest_order(digests: bytes) -> np.ndarray:
    """Indices sorted by 16-byte digest, ties in their given order (as `sorted` orders them)."""
    words = np.frombuffer(digests, dtype=">u8").reshape(-1, 2)
    return np.lexsort((words[:, 1], words[:, 0]))


@dataclass
class TokenStream:
    tokens: np.ndarray  # every document's ids, one after another
    offsets: np.ndarray  # document i is tokens[offsets[i]:offsets[i + 1]]
    mask: np.ndarray | None = None  # chat data: 1 where a token is an answer token


def tokenize_stream(tokenizer: Tokenizer, docs: Iterator[str], count: int, dtype, path: Path,
                    progress: bool) -> TokenStream:
    """`encode_documents`, streamed to a file (`write_tokens`), with where each document's ids start."""
    from tqdm import tqdm

    with tqdm(total=count, desc="tokenizing corpus", unit="doc", disable=not progress) as bar:
        lengths = write_tokens(tokenizer, docs, path, dtype, progress=bar)
    if len(lengths) != count:
        raise RuntimeError(f"the corpus changed while it was read: {count} documents, then {len(lengths)}")
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.frombuffer(lengths, dtype=np.int64), out=offsets[1:])
    tokens = np.memmap(path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype=dtype)
    return TokenStream(tokens, offsets)


def write_tokens(tokenizer: Tokenizer, docs: Iterable[str], path: Path, dtype, max_tokens: int | None = None,
                 progress=None) -> array:
    """Each document's ids (then end-of-text) to a file, tokenized a batch of documents at a time, up
    to the document that reaches max_tokens; `progress` (a tqdm bar) counts the documents. Returns
    each written document's number of tokens."""
    lengths, tokens = array("q"), 0
    with open(path, "wb") as out:
        for batch in _batches(docs):
            for ids in _document_ids(tokenizer, batch):
                np.asarray(ids, dtype=dtype).tofile(out)
                lengths.append(len(ids))
                tokens += len(ids)
                if max_tokens is not None and tokens >= max_tokens:
                    return lengths
            if progress is not None:
                progress.update(len(batch))
    return lengths


def _document_ids(tokenizer: Tokenizer, batch: list[str]) -> Iterator[list[int]]:
    """Each document's ids as the tokenizer encodes a text (after BOS, for a Llama tokenizer that adds
    one, as the model was pretrained), then end-of-text where the tokenizer has one."""
    for ids in tokenizer.encode_batch(batch, add_special_tokens=True):
        closed = tokenizer.eot_id is None or (ids and ids[-1] == tokenizer.eot_id)
        yield ids if closed else ids + [tokenizer.eot_id]


def _batches(docs: Iterable[str], max_docs: int = 256, max_chars: int = 16_000_000) -> Iterator[list[str]]:
    """Documents in batches of at most max_docs, or fewer once they hold max_chars (a corpus of large
    files does not gather hundreds of them in memory at once)."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) == max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _shuffled(docs: list[str]) -> list[str]:
    """A fixed, content-based order so the val split samples documents from the whole corpus."""
    return sorted(docs, key=lambda d: hashlib.md5(d.encode("utf-8")).digest())


def _tokenizer_sample(docs: list[str], max_bytes: int):
    used = 0
    for doc in docs:
        yield doc
        used += len(doc)
        if used >= max_bytes:
            return


def prepare_data(data: DataConfig, progress: bool = True, tokenizer: Tokenizer | None = None,
                 seq_len: int | None = None) -> PreparedData:
    """Return the token cache for this corpus and tokenizer, building it if it does not exist.
    `tokenizer`: use this one (a pretrained model's) instead of training one on the corpus.
    `seq_len`: the training sequence length, which chat data is packed to (see `_pack_chats`).
    A given tokenizer's own chat template renders chat data and is kept with the cache, unless
    data.chat_template=builtin."""
    val_files = corpus_files(data, "data.val_path") if data.val_path else None
    sources = source_files(data) if data.weights else [corpus_files(data)]
    if tokenizer is not None and tokenizer.chat_template is not None:
        if data.chat_template == "builtin":
            tokenizer = with_chat_template(tokenizer, None)
        else:
            try:
                tokenizer.chat_template.check()
            except ChatTemplateError as error:
                raise ConfigError(f"data.chat_template={data.chat_template!r} takes the pretrained model's own "
                                  f"template, which fails on a user/assistant exchange ({error}); allowed: auto, "
                                  "or builtin to use the built-in template") from None
    if data.source == "chat":
        return _prepare_chats(sources, val_files, data, tokenizer, seq_len)
    return _prepare_text(sources, val_files, data, tokenizer, progress)


def chat_template_of(tokenizer: Tokenizer | None) -> ChatTemplate:
    """The template chat data is rendered with: the tokenizer's own, else the built-in one."""
    return BUILTIN if tokenizer is None or tokenizer.chat_template is None else tokenizer.chat_template


def _prepare_text(sources: list[list[Path]], val_files: list[Path] | None, data: DataConfig,
                  tokenizer: Tokenizer | None, progress: bool) -> PreparedData:
    """Text, streamed: the corpus is read again for each pass (its key, the tokenizer's sample, its
    tokens) and is never in memory whole; validation files of their own are (they are small). A
    mixture (data.weights) keeps its sources apart: one after another in train.bin, and in val.bin
    each one's held-out tail; the weights are the loader's, so changing them reuses the cache."""
    val_docs = read_documents(val_files, data, "data.val_path") if val_files else None
    not_utf8: dict[Path, str] = {}  # skipped by every pass
    corpus = _CorpusIndex([functools.partial(iter_documents, files, data, not_utf8=not_utf8) for files in sources])
    key = cache_key(corpus.scan(), data, tokenizer, None, val_docs)
    check_text_files(not_utf8, sum(map(len, sources)), data)
    if not corpus.has_text:
        empty_corpus([f for files in sources for f in files], data, "data.path")
    if data.weights:
        key = _mixture_key(key, corpus.ends)
        for item, count in zip(path_items(data.path), corpus.source_sizes()):
            if not count:
                raise ConfigError(f"data.path={data.path!r}: its source {item!r} holds no documents; allowed: "
                                  f"{', '.join(FORMATS)} files (the text ones also gzipped)")

    def write(staging: Path) -> dict:
        nonlocal tokenizer
        if tokenizer is None:  # trained on the validation text too, as when val_fraction splits the corpus
            tokenizer = train_tokenizer(data.tokenizer, corpus.sample(data.tokenizer_train_bytes, val_docs),
                                        data.vocab_size)
        dtype, meta = _cache_header(staging, tokenizer, data, len(corpus), key)
        in_file_order = tokenize_stream(tokenizer, corpus.documents(), len(corpus), dtype, staging / "stream.bin",
                                        progress)
        # Each source's (the corpus's) last val_fraction of tokens in content order validates, unless
        # validation has files of its own.
        split = corpus.write_splits(in_file_order, staging / "train.bin", staging / "val.bin",
                                    0 if val_docs is not None else data.val_fraction)
        (staging / "stream.bin").unlink()
        if data.weights:
            meta["sources"] = [{"path": item, "documents": count, "train_tokens": n_train, "val_tokens": n_val}
                               for item, count, (n_train, n_val)
                               in zip(path_items(data.path), corpus.source_sizes(), split)]
        total = sum(n_train for n_train, _ in split)
        if val_docs is not None:  # all of data.path trains
            val_ids = encode_documents(tokenizer, _shuffled(val_docs), dtype, progress)
            val_ids.tofile(staging / "val.bin")
            meta.update(train_tokens=total, val_tokens=int(len(val_ids)), val_documents=len(val_docs))
        else:
            meta.update(train_tokens=total, val_tokens=sum(n_val for _, n_val in split))
        return meta

    return _cached(Path(data.cache_dir), key, write)


class _ChatFiles:
    """The good conversations of chat files, read afresh on each pass; `bad` holds the last pass's bad lines."""

    def __init__(self, files: list[Path], template: ChatTemplate):
        self.files, self.template, self.bad = files, template, []

    def conversations(self) -> Iterator[list[dict]]:
        self.bad = []
        return chat_conversations(self.files, self.bad, template=self.template)

    def rendered(self) -> Iterator[str]:
        return (render_with_answer_spans(c, self.template)[0] for c in self.conversations())


def _prepare_chats(sources: list[list[Path]], val_files: list[Path] | None, data: DataConfig,
                   tokenizer: Tokenizer | None, seq_len: int | None) -> PreparedData:
    """Conversations, streamed as text is: a pass for the key (and the bad lines), one for the tokenizer's
    sample, one for the ids and loss mask in file order; then each split is packed into rows of seq_len
    (`_pack_chats`), in content order. Validation files of their own are read whole (they are small).
    A mixture (data.weights) packs each source's splits on their own, one source after another."""
    if not seq_len:
        raise ValueError("chat data is packed to the training sequence length: pass seq_len")
    template = chat_template_of(tokenizer)
    val_chats = read_chats(val_files, data, "data.val_path", template) if val_files else None
    val_docs = [render_with_answer_spans(c, template)[0] for c in val_chats] if val_chats else None
    chats = [_ChatFiles(files, template) for files in sources]
    corpus = _CorpusIndex([source.rendered for source in chats])
    key = cache_key(corpus.scan(), data, tokenizer, seq_len, val_docs)
    check_chats(len(corpus), [line for source in chats for line in source.bad], data)
    if data.weights:
        key = _mixture_key(key, corpus.ends)
        needed = 1 if val_chats else 2
        for item, count in zip(path_items(data.path), corpus.source_sizes()):
            if count < needed:
                raise ConfigError(f"data.path={data.path!r}: its source {item!r} holds {count} usable conversations; "
                                  f"a mixture's source needs at least {needed}"
                                  + ("" if val_chats else " (one for validation)"))

    def write(staging: Path) -> dict:
        nonlocal tokenizer
        if tokenizer is None:
            tokenizer = train_tokenizer(data.tokenizer, corpus.sample(data.tokenizer_train_bytes, val_docs),
                                        data.vocab_size)
        dtype, meta = _cache_header(staging, tokenizer, data, len(corpus), key)
        conversations = itertools.chain.from_iterable(source.conversations() for source in chats)
        stream = _tokenize_chats(tokenizer, template, conversations, len(corpus), dtype, staging / "stream")
        if val_chats:  # all of data.path trains, in file order; validation is the val files'
            val_stream = _tokenize_chats(tokenizer, template, iter(val_chats), len(val_chats), dtype,
                                         staging / "val_stream")
            parts = {"train": [(stream, np.arange(start, end)) for start, end in corpus.source_ranges()],
                     "val": [(val_stream, np.arange(len(val_chats)))]}
        else:  # whole conversations, the same ones on every build (content order), each source's own
            orders = [corpus.content_order(start, end) for start, end in corpus.source_ranges()]
            n_vals = [chat_val_count(len(order), data.val_fraction) for order in orders]
            parts = {"train": [(stream, order[:-n]) for order, n in zip(orders, n_vals)],
                     "val": [(stream, order[-n:]) for order, n in zip(orders, n_vals)]}
        pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        packed = {}
        for split, pieces in parts.items():
            with open(staging / f"{split}.bin", "wb") as ids_out, open(staging / f"{split}_mask.bin", "wb") as mask_out:
                packed[split] = [_pack_chats(source, order, seq_len, pad, ids_out, mask_out)
                                 for source, order in pieces]
            meta[f"{split}_tokens"] = sum(tokens for tokens, _ in packed[split])
            meta[f"{split}_answer_tokens"] = sum(answers for _, answers in packed[split])
        if data.weights:
            val_tokens = [tokens for tokens, _ in packed["val"]] if not val_chats else [0] * len(chats)
            meta["sources"] = [{"path": item, "documents": count, "train_tokens": tokens, "val_tokens": n_val}
                               for item, count, (tokens, _), n_val
                               in zip(path_items(data.path), corpus.source_sizes(), packed["train"], val_tokens)]
        for name in ("stream", "val_stream"):
            for suffix in (".bin", "_mask.bin"):
                (staging / f"{name}{suffix}").unlink(missing_ok=True)
        meta["loss_mask"] = True
        return meta

    return _cached(Path(data.cache_dir), key, write)


def _mixture_key(key: str, ends: list[int]) -> str:
    """A mixture's cache key: the same documents split into other sources are another cache."""
    return hashlib.sha256(f"{key} sources {ends}".encode()).hexdigest()[:20]


def chat_val_count(conversations: int, val_fraction: float) -> int:
    """How many whole conversations validate (the last ones in content order): at least one, and one
    fewer than all."""
    return min(max(round(conversations * val_fraction), 1), conversations - 1)


def chat_splits(chats: list[list[dict]], val_fraction: float, template: ChatTemplate = BUILTIN
                ) -> dict[str, list[list[dict]]]:
    """{"train": ..., "val": ...}: the conversations each split of a data=chat cache holds, in memory."""
    def content_key(chat: list[dict]) -> bytes:
        return hashlib.md5(render_with_answer_spans(chat, template)[0].encode("utf-8")).digest()

    ordered = sorted(chats, key=content_key)
    n_val = chat_val_count(len(chats), val_fraction)
    return {"train": ordered[:-n_val], "val": ordered[-n_val:]}


def _tokenize_chats(tokenizer: Tokenizer, template: ChatTemplate, conversations: Iterator[list[dict]], count: int,
                    dtype, path: Path) -> TokenStream:
    """Each conversation's ids (to <path>.bin) and answer mask (to <path>_mask.bin, 1 byte a token), one
    after another; the stream's `mask` holds the latter."""
    offsets = np.zeros(count + 1, dtype=np.int64)
    done = 0
    with open(f"{path}.bin", "wb") as ids_out, open(f"{path}_mask.bin", "wb") as mask_out:
        for messages in conversations:
            if done == count:
                break
            ids, mask = tokenize_conversation(tokenizer, messages, template)
            np.asarray(ids, dtype=dtype).tofile(ids_out)
            np.asarray(mask, dtype=np.uint8).tofile(mask_out)
            offsets[done + 1] = offsets[done] + len(ids)
            done += 1
    if done != count or next(conversations, None) is not None:
        raise RuntimeError(f"the corpus changed while it was read: {count} conversations, then {done} or more")
    return TokenStream(np.memmap(f"{path}.bin", dtype=dtype, mode="r"), offsets,
                       np.memmap(f"{path}_mask.bin", dtype=np.uint8, mode="r"))


def _pack_chats(stream: TokenStream, order: np.ndarray, seq_len: int, pad: int, ids_out, mask_out) -> tuple[int, int]:
    """The conversations `order` names packed into rows of seq_len tokens (the loader's windows) so that
    no conversation straddles two rows unless it is longer than one: an answer is always trained with
    its question in view. End-of-text closes each conversation and pads rows; it carries no loss.
    Appends to the open files; returns (tokens, answer tokens) written."""
    written = answers = 0

    def put(ids: np.ndarray, mask: np.ndarray) -> None:
        nonlocal written
        ids.astype(stream.tokens.dtype, copy=False).tofile(ids_out)
        mask.astype(np.uint8, copy=False).tofile(mask_out)
        written += len(ids)

    for i in order:
        first, end = stream.offsets[i], stream.offsets[i + 1]
        ids, mask = stream.tokens[first:end], stream.mask[first:end]
        room = seq_len - written % seq_len
        if room < len(ids) + 1 <= seq_len:  # it fits in a row, but not in this one's rest: a fresh row
            put(np.full(room, pad), np.zeros(room))
        put(ids, mask)
        put(np.full(1, pad), np.zeros(1))  # end-of-text
        answers += int(mask.sum())
    rows = -(-written // seq_len)
    fill = rows * seq_len + 1 - written  # complete the last row, and its last target
    put(np.full(fill, pad), np.zeros(fill))
    return written, answers


def _cache_header(staging: Path, tokenizer: Tokenizer, data: DataConfig, documents: int, key: str) -> tuple:
    """Save the tokenizer; return the token files' dtype and the start of meta.json."""
    tokenizer.save(staging / "tokenizer.json")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return dtype, {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
                   "tokenizer": data.tokenizer, "documents": documents, "key": key}


def _cached(cache_dir: Path, key: str, write: Callable[[Path], dict]) -> PreparedData:
    """The cache under `key`, or else `write` fills a staging directory (returning meta.json's
    content), which is renamed into place once complete: a crash leaves no half cache."""
    final = cache_dir / key
    if (final / "meta.json").exists():
        return PreparedData.load(final)
    staging = cache_dir / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        meta = write(staging)
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks complete
        try:
            os.replace(staging, final)
        except OSError:  # another process finished the same cache first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PreparedData.load(final)


def encode_documents(tokenizer: Tokenizer, docs: list[str], dtype, progress: bool) -> np.ndarray:
    """One token stream: each document's ids, then end-of-text where the tokenizer has one."""
    from tqdm import tqdm

    chunks = []
    with tqdm(total=len(docs), desc="tokenizing corpus", unit="doc", disable=not progress) as bar:
        for batch in _batches(docs):
            chunks.extend(np.asarray(ids, dtype=dtype) for ids in _document_ids(tokenizer, batch))
            bar.update(len(batch))
    return np.concatenate(chunks)
