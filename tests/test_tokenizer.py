"""Tokenizers: byte-level BPE round-trips any unicode text; char-level round-trips its alphabet."""

import random

import pytest

from lm.tokenizer import ByteBPETokenizer, CharTokenizer, load_tokenizer

TRAINING_TEXT = ["def main(argv):\n    return sorted(set(argv))\n" * 20, "The quick brown fox. " * 30]


def random_unicode(rng: random.Random, length: int) -> str:
    """Text from all planes, surrogates excluded (they cannot be UTF-8 encoded)."""
    out = []
    while len(out) < length:
        cp = rng.choice([rng.randrange(0, 0x80), rng.randrange(0x80, 0x800), rng.randrange(0x800, 0x10000),
                         rng.randrange(0x10000, 0x110000)])
        if not 0xD800 <= cp <= 0xDFFF:
            out.append(chr(cp))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe():
    return ByteBPETokenizer.train(iter(TRAINING_TEXT), vocab_size=300)


def test_byte_bpe_round_trips_arbitrary_unicode(bpe):
    rng = random.Random(0)
    samples = ["", " ", "\x00\t\r\n", "naïve café ☕ 日本語テキスト 🤖👩‍💻", "e\u0301 \u200b\ufeff",
               *(random_unicode(rng, rng.randrange(1, 200)) for _ in range(200))]
    for text in samples:
        assert bpe.decode(bpe.encode(text)) == text


def test_byte_bpe_learns_merges_and_keeps_every_byte(bpe):
    assert 256 < bpe.vocab_size <= 300
    assert len(bpe.encode("def main(argv):")) < len("def main(argv):".encode())
    assert bpe.eot_id is not None


def test_tokenizer_file_reloads_to_the_same_ids(bpe, tmp_path):
    char = CharTokenizer.train(iter(TRAINING_TEXT))
    for tok in (bpe, char):
        tok.save(tmp_path / "tokenizer.json")
        again = load_tokenizer(tmp_path / "tokenizer.json")
        assert type(again) is type(tok)
        assert again.encode("def main(argv):") == tok.encode("def main(argv):")


def test_char_tokenizer_round_trips_its_alphabet_and_rejects_others():
    tok = CharTokenizer.train(iter(["hello world\n", "ÄÖÜ"]))
    assert tok.vocab_size == len(set("hello world\nÄÖÜ"))
    assert tok.decode(tok.encode("hello ÄÖÜ\nworld")) == "hello ÄÖÜ\nworld"
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("z")
