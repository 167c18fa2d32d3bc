"""Tokenizers: byte-level BPE round-trips any unicode text; char-level round-trips its alphabet."""

import random

import pytest

from lm.tokenizer import LONGEST_TRAINING_WORD, ByteBPETokenizer, CharTokenizer, _short_words, load_tokenizer

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


def test_bpe_training_learns_from_overlong_runs_in_pieces_and_encodes_them_whole():
    """One word of a few megabytes (a base64 blob, a minified line) kept HF's BPE trainer busy for
    hours (its time grows with the square of a word's length): runs are learned from in pieces of
    LONGEST_TRAINING_WORD characters, so no token is longer, and the text is still encoded whole."""
    rng = random.Random(0)
    blob = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(3 * 10**5))
    texts = ["x" * 3 * 10**5, f"data = '{blob}'\n", " " * 3 * 10**5 + "end", *TRAINING_TEXT]
    tok = ByteBPETokenizer.train(iter(texts), vocab_size=400)
    longest = max(len(piece) for piece in tok.token_bytes() if piece is not None)
    assert tok.vocab_size == 400 and 16 <= longest <= LONGEST_TRAINING_WORD  # merges were learned in the runs
    for text in texts[:3]:
        assert tok.decode(tok.encode(text)) == text
    assert ["".join(_short_words([text])) for text in texts] == texts  # the pieces are all of the text
    assert list(_short_words(TRAINING_TEXT)) == TRAINING_TEXT  # and text without such runs trains as it is


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


def test_a_tokenizer_that_adds_bos_starts_documents_and_text_prompts_with_it(bpe, tmp_path):
    """A Llama tokenizer puts BOS before a text (`tokenizer(text)` in transformers): documents are
    trained, and completion prompts decoded, after it; a chat template's text, which writes BOS
    itself, and pieces of a text are encoded without it."""
    from lm.config import DataConfig, ModelConfig
    from lm.data import prepare_data
    from lm.engine import Engine, SamplingParams
    from lm.hf_format import hf_config, hf_tokenizer_config
    from lm.model import GPT
    from lm.tokenizer import document_start
    from test_finetune import with_bos

    llama = with_bos(bpe, "<s>")
    bos = llama.encode("<s>")[0]
    assert llama.encode("def main") == bpe.encode("def main")
    assert llama.encode("def main", add_special_tokens=True) == [bos, *bpe.encode("def main")]
    assert document_start(llama) == [bos] and document_start(bpe) == [bpe.eot_id]
    # exported to transformers with it as BOS (GPT-2's end-of-text is both)
    assert hf_config(ModelConfig(), llama)["bos_token_id"] == bos
    assert hf_config(ModelConfig(), bpe)["bos_token_id"] == bpe.eot_id
    assert hf_tokenizer_config(llama, ModelConfig())["bos_token"] == "<s>"

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"def f{i}(x):\n    return x + {i}\n")
    data = DataConfig(name="text", source="files", path=str(docs), cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    with_bos_cache, plain_cache = (prepare_data(data, progress=False, tokenizer=t) for t in (llama, bpe))
    assert with_bos_cache.directory != plain_cache.directory
    tokens = [int(t) for split in ("train", "val") for t in with_bos_cache.tokens(split)]
    assert tokens.count(bos) == 6 and tokens.count(bpe.eot_id) == 6  # <s> document </s>, each document
    assert all(tokens[i + 1] == bos for i, t in enumerate(tokens[:-1]) if t == bpe.eot_id)

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=llama.vocab_size + 4))
    engine = Engine(model.eval(), llama, max_batch_size=2)
    greedy = SamplingParams(max_tokens=2, temperature=0)
    assert engine.submit("def main", greedy).prompt_ids == [bos, *bpe.encode("def main")]
    assert engine.submit("<s>def main", greedy, add_special_tokens=False).prompt_ids[:1] == [bos]
