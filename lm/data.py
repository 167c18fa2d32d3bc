"""Corpus -> tokenizer + memory-mapped train/val token files -> rank-sharded, resumable batches.

The token cache is built once, on the driver, under a key of (corpus content, tokenizer settings),
so reruns and sweeps reuse it. It is written to a temporary directory and renamed into place, so
a crash never leaves a half cache that looks complete, and an existing cache is never modified.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.config import ConfigError, DataConfig
from lm.tokenizer import Tokenizer, load_tokenizer, train_tokenizer

CACHE_FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".jsonl", ".md")


# ---------------------------------------------------------------------------------------------
# Corpus: which files, and their text.


def stdlib_files() -> list[Path]:
    """The Python standard library's own source: real code and prose on every machine with Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def corpus_files(data: DataConfig) -> list[Path]:
    """Resolve `data.path` (files, directories, globs; comma separated) or the stdlib default."""
    if data.source == "stdlib":
        return stdlib_files()
    files: list[Path] = []
    for item in (p.strip() for p in str(data.path).split(",") if p.strip()):
        expanded = os.path.expanduser(item)
        if any(ch in expanded for ch in "*?["):
            matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
            if not matches:
                raise ConfigError(f"data.path={item!r} matches no files: pass existing files, directories or globs")
            files.extend(m for m in matches if m.is_file())
        elif os.path.isdir(expanded):
            files.extend(sorted(p for p in Path(expanded).rglob("*")
                                if p.is_file() and p.suffix in TEXT_SUFFIXES))
        elif os.path.isfile(expanded):
            files.append(Path(expanded))
        else:
            raise ConfigError(f"data.path={item!r} does not exist: pass existing files, directories or globs")
    return files


def read_documents(files: list[Path], data: DataConfig) -> list[str]:
    """One string per document: a whole text file, or each .jsonl line's `data.text_field`."""
    docs: list[str] = []
    budget = data.max_bytes
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".jsonl":
            for lineno, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[data.text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ConfigError(f"data.text_field={data.text_field!r}: {path}:{lineno} is not a "
                                      f"JSON object with that string field") from None
                docs.append(str(text))
        elif raw.strip():
            docs.append(raw)
        if budget is not None:
            budget -= len(raw.encode("utf-8"))
            if budget <= 0:
                break
    if not any(d.strip() for d in docs):
        where = "the Python standard library" if data.source == "stdlib" else repr(data.path)
        raise ConfigError(f"data.path={where}: the corpus is empty ({len(files)} files, no text); "
                          f"allowed: non-empty {', '.join(TEXT_SUFFIXES)} files")
    return docs


def cache_key(docs: list[str], data: DataConfig) -> str:
    """Hash of everything that changes the token files: the text and the tokenizer settings."""
    h = hashlib.sha256()
    settings = {"v": CACHE_FORMAT_VERSION, "tokenizer": data.tokenizer, "val_fraction": data.val_fraction,
                "tokenizer_train_bytes": data.tokenizer_train_bytes}
    if data.tokenizer == "bpe":
        settings["vocab_size"] = data.vocab_size
    h.update(json.dumps(settings, sort_keys=True).encode())
    for doc in docs:
        encoded = doc.encode("utf-8")
        h.update(len(encoded).to_bytes(8, "little"))
        h.update(encoded)
    return h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# The cache: tokenizer.json, train.bin, val.bin, meta.json.


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


def prepare_data(data: DataConfig, progress: bool = True) -> PreparedData:
    """Return the token cache for this corpus and tokenizer, building it if it does not exist."""
    docs = read_documents(corpus_files(data), data)
    key = cache_key(docs, data)
    final = Path(data.cache_dir) / key
    if (final / "meta.json").exists():
        return PreparedData.load(final)

    docs = _shuffled(docs)
    staging = Path(data.cache_dir) / f".{key}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        tokenizer = train_tokenizer(data.tokenizer, _tokenizer_sample(docs, data.tokenizer_train_bytes),
                                    data.vocab_size)
        tokenizer.save(staging / "tokenizer.json")
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        ids = _encode_all(tokenizer, docs, dtype, progress)
        n_val = max(int(len(ids) * data.val_fraction), 1)
        ids[:-n_val].tofile(staging / "train.bin")
        ids[-n_val:].tofile(staging / "val.bin")
        meta = {"dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
                "tokenizer": data.tokenizer, "train_tokens": int(len(ids) - n_val),
                "val_tokens": int(n_val), "documents": len(docs), "key": key}
        (staging / "meta.json").write_text(json.dumps(meta, indent=2))  # written last: marks complete
        try:
            os.replace(staging, final)
        except OSError:  # another process finished the same cache first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PreparedData.load(final)


def _encode_all(tokenizer: Tokenizer, docs: list[str], dtype, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    chunks = []
    batch = 256
    with tqdm(total=len(docs), desc="tokenizing corpus", unit="doc", disable=not progress) as bar:
        for start in range(0, len(docs), batch):
            for ids in tokenizer.encode_batch(docs[start:start + batch]):
                if tokenizer.eot_id is not None:
                    ids = ids + [tokenizer.eot_id]
                chunks.append(np.asarray(ids, dtype=dtype))
            bar.update(min(batch, len(docs) - start))
    return np.concatenate(chunks)


# ---------------------------------------------------------------------------------------------
# The loader.


class TokenShardLoader:
    """Batches of (input, target) windows, disjoint across ranks, deterministic from the seed.

    The token stream is cut into non-overlapping windows of seq_len+1 tokens; each epoch visits
    them in a permutation drawn from (seed, epoch). A global batch takes the next
    micro_batch x world_size windows, and rank r takes its own contiguous slice of them. The
    whole state is one integer, `position` (windows consumed globally), so resume is exact.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, micro_batch: int, rank: int,
                 world_size: int, seed: int):
        self.tokens, self.seq_len, self.micro_batch = tokens, seq_len, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{len(tokens)} tokens are too few for one window of {seq_len}+1 tokens")
        self.position = 0
        self._epoch, self._order = -1, None

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def _window(self, global_index: int) -> int:
        epoch, offset = divmod(global_index, self.num_windows)
        if epoch != self._epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._epoch = epoch
        return int(self._order[offset])

    def window_indices(self) -> list[int]:
        """The windows this rank takes for the next micro batch (without consuming them)."""
        start = self.position + self.rank * self.micro_batch
        return [self._window(start + i) for i in range(self.micro_batch)]

    def next_batch(self):
        import torch

        rows = [self.tokens[w * self.seq_len: w * self.seq_len + self.seq_len + 1]
                for w in self.window_indices()]
        self.position += self.micro_batch * self.world_size
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
