"""Tokenizers trained on the user's own corpus, saved as one `tokenizer.json` that travels with
every checkpoint and export (with `chat_template.json` beside it where the tokenizer came from a
pretrained model with a chat template of its own: see lm.chat_template).

- `ByteBPETokenizer`: byte-level BPE (GPT-2 style) from Hugging Face `tokenizers`; any unicode
  text round-trips because every byte has an id.
- `CharTokenizer`: one id per character seen in the corpus (nanoGPT's shakespeare_char recipe).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from lm.chat_template import FILE as CHAT_TEMPLATE_FILE, ChatTemplate, hf_chat_template

END_OF_TEXT = "<|endoftext|>"
# The BPE trainer's time grows with the square of a word's length: one 3 MB line of base64 or a
# minified file took hours, with nothing printed. Longer runs are learned from in pieces this long.
LONGEST_TRAINING_WORD = 256
_OVERLONG_RUN = re.compile(rf"\S{{{LONGEST_TRAINING_WORD + 1},}}|\s{{{LONGEST_TRAINING_WORD + 1},}}")


class ByteBPETokenizer:
    def __init__(self, hf_tokenizer, eos_token_id: int | list | None = None, chat_template: ChatTemplate | None = None):
        self._tok = hf_tokenizer
        self.chat_template = chat_template  # a pretrained model's own; None: the built-in one
        # Ours and GPT-2's end-of-text is <|endoftext|>; Llama's are named otherwise. A model config's
        # eos_token_id is the fallback (an int or a list), if the tokenizer has that id.
        named = (hf_tokenizer.token_to_id(t) for t in (END_OF_TEXT, "</s>", "<|end_of_text|>"))
        fallback = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
        if not isinstance(fallback, int) or not 0 <= fallback < hf_tokenizer.get_vocab_size():
            fallback = None
        self.eot_id: int | None = next((i for i in named if i is not None), fallback)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "ByteBPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
            show_progress=False,
        )
        tok.train_from_iterator(_short_words(texts), trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    # add_special_tokens, as in transformers: True adds what the tokenizer puts around a text (Llama's and
    # Mistral's BOS; nothing for GPT-2's, Qwen's or ours) to a document or a completion prompt; False
    # for text that holds them already (a chat template writes BOS itself) or pieces of a text.
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Ids and the character offset where each token starts (to map text spans to tokens)."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [start for start, _ in encoding.offsets]

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[bytes | None]:
        """Each id's bytes as they appear in decoded text (None for a special token), for guided
        decoding. Byte-level vocabularies (GPT-2's, ours, Llama 3's, Qwen's) spell bytes with GPT-2's
        printable map; SentencePiece ones (Llama 2's, Mistral's) write a space as U+2581 and bytes
        they lack as <0xHH>."""
        if getattr(self, "_token_bytes", None) is None:
            special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
            sentencepiece = self._tok.token_to_id("<0x0A>") is not None
            to_byte = _byte_level_map()
            table: list[bytes | None] = []
            for i in range(self._tok.get_vocab_size()):
                piece = self._tok.id_to_token(i)
                if piece is None or i in special:
                    table.append(None)
                elif sentencepiece:
                    table.append(bytes([int(piece[3:5], 16)]) if len(piece) == 6 and piece.startswith("<0x")
                                 else piece.replace("\u2581", " ").encode())
                elif all(c in to_byte for c in piece):
                    table.append(bytes(to_byte[c] for c in piece))
                else:  # an added token that is plain text
                    table.append(piece.encode())
            self._token_bytes = table
        return self._token_bytes

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))
        _save_chat_template(self.chat_template, path)

    def to_json(self) -> str:
        return self._tok.to_str()


class CharTokenizer:
    def __init__(self, chars: list[str]):
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}
        self.eot_id: int | None = None
        self.chat_template: ChatTemplate | None = None  # always the built-in one

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:  # (no special tokens)
        try:
            return [self._ids[c] for c in text]
        except KeyError as e:
            raise ValueError(f"character {e.args[0]!r} is not in this character-level vocabulary") from None

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        return self.encode(text), list(range(len(text)))

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def token_bytes(self) -> list[bytes | None]:
        return [c.encode() for c in self.chars]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())
        _save_chat_template(None, path)

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)


Tokenizer = ByteBPETokenizer | CharTokenizer


def _byte_level_map() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def with_chat_template(tokenizer: Tokenizer, template: ChatTemplate | None) -> Tokenizer:
    """The same tokenizer carrying another chat template (None: the built-in one)."""
    changed = copy.copy(tokenizer)
    changed.chat_template = template
    return changed


def _save_chat_template(template: ChatTemplate | None, tokenizer_path: str | Path) -> None:
    beside = Path(tokenizer_path).with_name(CHAT_TEMPLATE_FILE)
    if template is not None:
        beside.write_text(template.to_json())
    else:
        beside.unlink(missing_ok=True)


def copy_tokenizer(source: str | Path, destination: str | Path) -> None:
    """Copy a saved tokenizer file and the chat template saved beside it, if any."""
    shutil.copyfile(source, destination)
    template = Path(source).with_name(CHAT_TEMPLATE_FILE)
    if template.exists():
        shutil.copyfile(template, Path(destination).with_name(CHAT_TEMPLATE_FILE))


def bos_ids(tokenizer: Tokenizer) -> list[int]:
    """What the tokenizer puts before a text it encodes with its special tokens (Llama's and Mistral's
    BOS; nothing for GPT-2's, Qwen's or ours), end-of-text aside."""
    return [i for i in tokenizer.encode("", add_special_tokens=True) if i != tokenizer.eot_id]


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    """The tokens that end a generation: end-of-text, and where the tokenizer carries a pretrained
    model's chat template, the EOS it names and the marker it closes a reply with, when one token
    each (Llama 3 Instruct's <|eot_id|>, Qwen's <|im_end|>: what their generation_config.json lists)."""
    ids = {getattr(tokenizer, "eot_id", None)} - {None}
    template = getattr(tokenizer, "chat_template", None)
    if template is not None:
        for text in (template.special_tokens.get("eos_token"), template.end_of_turn):
            if text and len(encoded := tokenizer.encode(text)) == 1:
                ids.add(encoded[0])
    return ids


def document_start(tokenizer: Tokenizer) -> list[int]:
    """Ids that begin a new document: the tokenizer's BOS where it adds one (Llama's), else end-of-text
    for BPE, a newline (or id 0) for characters."""
    if bos := bos_ids(tokenizer):
        return bos
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    return tokenizer.encode("\n") if "\n" in getattr(tokenizer, "chars", []) else [0]


def _short_words(texts: Iterable[str], longest: int = LONGEST_TRAINING_WORD) -> Iterator[str]:
    """The texts, with runs of non-space (or space) characters longer than `longest` cut into pieces of
    that length, for BPE training only: a token that long is rarely learned, and encoding is not cut."""
    for text in texts:
        start = 0
        for run in _OVERLONG_RUN.finditer(text):
            if run.start() > start:
                yield text[start:run.start()]
            yield from (text[i:min(i + longest, run.end())] for i in range(run.start(), run.end(), longest))
            start = run.end()
        if start < len(text):
            yield text[start:]


def train_tokenizer(kind: str, texts: Iterator[str], vocab_size: int) -> Tokenizer:
    if kind == "char":
        return CharTokenizer.train(texts)
    return ByteBPETokenizer.train(texts, vocab_size)


def hf_directory_tokenizer(directory: str | Path, eos_token_id: int | list | None = None) -> ByteBPETokenizer:
    """A Hugging Face model directory's tokenizer: tokenizer.json, or GPT-2's vocab.json + merges.txt."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    directory = Path(directory)
    template = hf_chat_template(directory)
    if (directory / "tokenizer.json").exists():
        return ByteBPETokenizer(HFTokenizer.from_file(str(directory / "tokenizer.json")), eos_token_id, template)
    if (directory / "vocab.json").exists() and (directory / "merges.txt").exists():
        tok = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return ByteBPETokenizer(tok, eos_token_id, template)
    raise FileNotFoundError("no tokenizer: the directory needs tokenizer.json (or vocab.json and merges.txt)")


def load_tokenizer(path: str | Path) -> Tokenizer:
    data = json.loads(Path(path).read_text())
    if data.get("type") == "char":
        return CharTokenizer(data["chars"])
    from tokenizers import Tokenizer as HFTokenizer

    beside = Path(path).with_name(CHAT_TEMPLATE_FILE)
    template = ChatTemplate.from_json(beside.read_text()) if beside.exists() else None
    return ByteBPETokenizer(HFTokenizer.from_file(str(path)), chat_template=template)
