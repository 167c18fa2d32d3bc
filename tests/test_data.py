"""Data: the token cache is keyed, reused and never half-written; the loader shards disjointly,
is deterministic from the seed and resumes at an exact position."""

import hashlib
import json
import os

import numpy as np
import pytest

import lm.data as data_module
from lm.config import ConfigError, DataConfig
from lm.corpus import corpus_files, read_documents
from lm.data import prepare_data
from lm.shard_loader import TokenShardLoader


def loader(rank=0, world=1, seed=0, micro=3, tokens=np.arange(1001, dtype=np.uint16)):
    return TokenShardLoader(tokens, seq_len=10, micro_batch=micro, rank=rank, world_size=world, seed=seed)


def test_shards_are_disjoint_across_ranks_and_cover_an_epoch():
    world, micro = 4, 3
    loaders = [loader(rank=r, world=world, micro=micro) for r in range(world)]
    seen = []
    for _ in range(100 // (world * micro)):  # 100 windows per epoch; stay inside the first
        for ld in loaders:
            x, _ = ld.next_batch()
            seen.extend(int(row[0]) // 10 for row in x)
    assert len(seen) == len(set(seen)) == 96


def test_targets_are_inputs_shifted_by_one():
    x, y = loader().next_batch()
    assert x.shape == y.shape == (3, 10)
    assert np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())


def test_same_seed_gives_identical_batches_and_another_seed_does_not():
    a, b, c = loader(seed=7), loader(seed=7), loader(seed=8)
    batches_a = [a.next_batch()[0] for _ in range(40)]  # crosses epochs
    batches_b = [b.next_batch()[0] for _ in range(40)]
    batches_c = [c.next_batch()[0] for _ in range(40)]
    assert all(np.array_equal(p, q) for p, q in zip(batches_a, batches_b))
    assert not all(np.array_equal(p, q) for p, q in zip(batches_a, batches_c))


def test_loader_resumes_at_the_exact_position():
    full = loader(rank=1, world=2)
    expected = [full.next_batch()[0] for _ in range(30)]
    first = loader(rank=1, world=2)
    for _ in range(17):
        first.next_batch()
    resumed = loader(rank=1, world=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert all(np.array_equal(resumed.next_batch()[0], e) for e in expected[17:])


def test_cache_is_reused_and_keyed_by_tokenizer_settings(tmp_path, corpus_file):
    cfg = DataConfig(source="files", path=str(corpus_file), vocab_size=300, cache_dir=str(tmp_path))
    first = prepare_data(cfg, progress=False)
    stamp = os.stat(first.directory / "train.bin").st_mtime_ns
    again = prepare_data(cfg, progress=False)
    assert again.directory == first.directory
    assert os.stat(again.directory / "train.bin").st_mtime_ns == stamp
    other = prepare_data(DataConfig(**{**cfg.__dict__, "vocab_size": 320}), progress=False)
    assert other.directory != first.directory
    assert first.meta["train_tokens"] == len(first.tokens("train"))
    assert first.tokenizer().vocab_size == first.meta["vocab_size"]


def corpus_with_duplicates(root) -> list[str]:
    """A small corpus over three files and two formats, with repeated and empty documents."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "héllo", "日本", "\n", "  "]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(60)] + ["dup", "dup", ""]
    root.mkdir()
    (root / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:30]))
    (root / "b.txt").write_text("a whole file is one document\n")
    (root / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30:]))
    return docs[:30] + ["a whole file is one document\n"] + docs[30:]


def test_the_streamed_cache_holds_every_documents_tokens_in_content_order_split_at_val_fraction(tmp_path):
    """The cache is built without the corpus in memory (a pass for its key, one for the tokenizer's
    sample, one for its tokens), and holds what the in-memory definition says: each document's ids
    and end-of-text, documents ordered by their md5, the last val_fraction of tokens validating."""
    docs = corpus_with_duplicates(tmp_path / "corpus")
    cfg = DataConfig(source="files", path=str(tmp_path / "corpus"), vocab_size=300, val_fraction=0.1,
                     cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, progress=False)
    tokenizer = prepared.tokenizer()
    ordered = sorted(docs, key=lambda d: hashlib.md5(d.encode()).digest())
    expected = [i for d in ordered for i in tokenizer.encode(d) + [tokenizer.eot_id]]
    n_val = max(int(len(expected) * 0.1), 1)
    assert prepared.tokens("train").tolist() == expected[:-n_val]
    assert prepared.tokens("val").tolist() == expected[-n_val:]
    assert prepared.meta["documents"] == len(docs) and not (prepared.directory / "stream.bin").exists()
    from lm.data import _batches  # tokenized a batch at a time: 256 documents, or fewer large ones

    assert list(_batches(iter(["aaaa", "bb", "c", "dddddd", "e"]), max_docs=3, max_chars=5)) == \
        [["aaaa", "bb"], ["c", "dddddd"], ["e"]]


def test_the_tokenizer_sample_is_the_first_documents_in_content_order_train_and_validation_alike(tmp_path):
    from lm.corpus import iter_documents
    from lm.data import _CorpusIndex, _shuffled, _tokenizer_sample

    docs = corpus_with_duplicates(tmp_path / "corpus")
    val_docs = ["held out one", "dup", "held out two"]
    cfg = DataConfig(source="files", path=str(tmp_path / "corpus"))
    corpus = _CorpusIndex([lambda: iter_documents(corpus_files(cfg), cfg)])
    assert list(corpus.scan()) == list(iter_documents(corpus_files(cfg), cfg)) == docs
    for max_chars in (0, 1, 50, 500, 10 ** 9):
        for val in (None, val_docs):
            assert list(corpus.sample(max_chars, val)) == \
                list(_tokenizer_sample(_shuffled(docs + (val or [])), max_chars)), (max_chars, val)


def test_crash_while_building_leaves_no_cache_and_keeps_existing_ones(tmp_path, corpus_file, monkeypatch):
    good = DataConfig(source="files", path=str(corpus_file), vocab_size=300, cache_dir=str(tmp_path))
    existing = prepare_data(good, progress=False)
    before = {p.name: p.read_bytes() for p in existing.directory.iterdir()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_module, "tokenize_stream", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(DataConfig(**{**good.__dict__, "vocab_size": 330}), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing.directory.name]
    assert {p.name: p.read_bytes() for p in existing.directory.iterdir()} == before


def test_directories_globs_and_jsonl_text_fields(tmp_path):
    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "line one"}\n\n{"text": "line two"}\n')
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    cfg = DataConfig(source="files", path=str(tmp_path))
    assert read_documents(corpus_files(cfg), cfg) == ["plain text file", "line one", "line two"]
    cfg = DataConfig(source="files", path=f"{tmp_path}/**/*.jsonl")
    assert read_documents(corpus_files(cfg), cfg) == ["line one", "line two"]


def test_a_directory_of_source_code_is_refused_with_the_glob_that_reads_it(tmp_path, capsys):
    (tmp_path / "repo" / "pkg").mkdir(parents=True)
    for name in ("a.py", "b.py", "pkg/c.py", "setup.cfg"):
        (tmp_path / "repo" / name).write_text("def f():\n    return 1\n")
    cfg = DataConfig(source="files", path=f"{tmp_path}/repo/")
    with pytest.raises(ConfigError) as error:
        corpus_files(cfg)
    assert str(error.value) == (f"data.path: the directory '{tmp_path}/repo/' holds none of the formats it is read for "
                                f"(.txt, .md, .jsonl, .parquet, .arrow); its files: 3 .py, 1 .cfg: name them with a glob "
                                f"to read them as text, e.g. '{tmp_path}/repo/**/*.py'")
    cfg = DataConfig(source="files", path=f"{tmp_path}/repo/**/*.py")  # as the message says
    assert len(read_documents(corpus_files(cfg), cfg)) == 3
    (tmp_path / "repo" / "README.md").write_text("# A package\n")  # read, and the code beside it said once
    cfg = DataConfig(source="files", path=f"{tmp_path}/repo/")
    assert corpus_files(cfg) == corpus_files(cfg) == [tmp_path / "repo" / "README.md"]
    assert capsys.readouterr().err == (f"data: data.path item '{tmp_path}/repo/': 1 of its files are read (.txt, .md, "
                                       ".jsonl, .parquet, .arrow), not its 3 .py, 1 .cfg files: name them with a glob "
                                       f"to read them as text, e.g. '{tmp_path}/repo/**/*.py'\n")


def test_jsonl_without_the_text_field_names_the_field_and_line(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"body": "no"}\n')
    cfg = DataConfig(source="files", path=str(tmp_path / "c.jsonl"))
    with pytest.raises(ConfigError) as error:  # its one string field is the likely text
        read_documents(corpus_files(cfg), cfg)
    assert str(error.value) == (f"data.text_field='text': {tmp_path}/c.jsonl:2 has no such field; its fields: body "
                                "(strings: body); set data.text_field=body")
    (tmp_path / "c.jsonl").write_text('["not", "an", "object"]\n')
    with pytest.raises(ConfigError, match=r"c.jsonl:1 is an array, not a JSON object with that string field$"):
        read_documents(corpus_files(cfg), cfg)
    for value, kind in (("5", "a number"), ('["a"]', "an array"), ('{"t": "a"}', "an object"), ("true", "a boolean")):
        (tmp_path / "c.jsonl").write_text(f'{{"text": "ok"}}\n{{"text": null}}\n{{"text": {value}}}\n')
        with pytest.raises(ConfigError) as error:  # not trained on as "5" or "['a']"
            read_documents(corpus_files(cfg), cfg)
        assert str(error.value) == f"data.text_field='text': {tmp_path}/c.jsonl:3 has {kind} there, not a string (or null)"


def test_parquet_arrow_and_gzipped_files_read_as_their_plain_counterparts(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document {i}: " + "some words " * (i + 1) for i in range(40)]
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir(), packed.mkdir()
    (plain / "a.txt").write_text(docs[0])
    (plain / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[1:20]))
    (plain / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[20:30]))
    (plain / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[30:]))
    (packed / "a.txt.gz").write_bytes(gzip.compress(docs[0].encode()))
    (packed / "b.jsonl.gz").write_bytes(gzip.compress((plain / "b.jsonl").read_bytes()))
    # A Hugging Face dataset's Parquet file: more columns than the text, and a null row (skipped).
    pq.write_table(pa.table({"id": list(range(11)), "text": docs[20:30] + [None]}), packed / "c.parquet",
                   row_group_size=4)
    # What Dataset.save_to_disk writes: Arrow's stream format.
    table = pa.table({"text": docs[30:], "id": list(range(10))})
    with pa.ipc.new_stream(str(packed / "d.arrow"), table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    (packed / "notes.bin.gz").write_bytes(gzip.compress(b"not a corpus format"))  # a directory skips it
    read = {}
    for corpus in (plain, packed):
        cfg = DataConfig(source="files", path=str(corpus), tokenizer="char", cache_dir=str(tmp_path / "cache"))
        assert read_documents(corpus_files(cfg), cfg) == docs
        read[corpus] = prepare_data(cfg, progress=False)
    assert read[plain].directory == read[packed].directory, "the same text, so the same token cache"
    with pa.ipc.new_file(str(tmp_path / "e.arrow"), table.schema) as writer:  # Arrow's file format too
        writer.write_table(table)
    cfg = DataConfig(source="files", path=str(tmp_path / "e.arrow"))
    assert read_documents(corpus_files(cfg), cfg) == docs[30:]
    # Text mode, as corpora were always read (and their caches keyed): \r\n and \r are newlines.
    (tmp_path / "dos").mkdir()
    (tmp_path / "dos" / "d.txt").write_bytes(b"line one\r\nline two\r")
    (tmp_path / "dos" / "d.txt.gz").write_bytes(gzip.compress(b"line one\r\nline two\r"))
    cfg = DataConfig(source="files", path=str(tmp_path / "dos"))
    assert read_documents(corpus_files(cfg), cfg) == ["line one\nline two\n"] * 2


def test_unreadable_parquet_and_gzip_files_and_a_missing_column_are_one_line_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "d.parquet")
    cfg = DataConfig(source="files", path=str(tmp_path / "d.parquet"))
    with pytest.raises(ConfigError, match=r"^data.text_field='text': .*d.parquet has no such column; "
                                          r"its columns: \['content'\]$"):
        read_documents(corpus_files(cfg), cfg)
    (tmp_path / "e.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "f.txt.gz").write_bytes(b"not gzip")
    (tmp_path / "g.arrow").write_bytes(b"ARROW1 not really")
    for name, kind in (("e.parquet", "Parquet"), ("f.txt.gz", "gzip"), ("g.arrow", "Arrow")):
        cfg = DataConfig(source="files", path=str(tmp_path / name))
        with pytest.raises(ConfigError, match=rf"^data.path: .*{name}: not a readable {kind} file \(") as error:
            read_documents(corpus_files(cfg), cfg)
        assert "\n" not in str(error.value)


def test_text_in_utf16_or_with_a_bom_reads_as_its_text_and_files_not_in_utf8_are_skipped_or_refused(tmp_path, capsys):
    """Windows editors' "Unicode" (UTF-16 with a byte-order mark) and UTF-8 with a BOM read as their text;
    a stray undecodable byte reads as U+FFFD; a Latin-1 or binary file (trained on, U+FFFD characters) is
    skipped and reported as chat data's bad lines are, and more than data.max_bad_fraction stops the run."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(150):
        (corpus / f"{i:03d}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog.\n")
    (corpus / "utf16.txt").write_text("naïve café, written by Notepad\r\n", encoding="utf-16")
    (corpus / "bom.md").write_bytes(b"\xef\xbb\xbfwith a byte-order mark\r\n")
    (corpus / "stray.txt").write_bytes(b"one stray \xe9 byte " + b"in a long file " * 10)
    cfg = DataConfig(source="files", path=str(corpus), vocab_size=300, cache_dir=str(tmp_path / "cache"))
    docs = read_documents(corpus_files(cfg), cfg)
    assert "naïve café, written by Notepad\n" in docs and "with a byte-order mark\n" in docs
    assert any(d.startswith("one stray \ufffd byte") for d in docs)

    (corpus / "latin1.txt").write_bytes("façade, déjà vu, señor".encode("latin-1"))
    with pytest.raises(ConfigError) as error:  # read alone, as validation files and evaluation read, it is refused
        read_documents([corpus / "latin1.txt"], cfg)
    assert str(error.value) == (f"data.path: {corpus}/latin1.txt: not UTF-8 text (4 undecodable byte sequences in "
                                "22 bytes, the first at byte 2); allowed: UTF-8 text (or UTF-16 with a byte-order "
                                "mark): convert it, e.g. iconv -f latin1 -t utf-8, or leave it out")
    prepared = prepare_data(cfg, progress=False)  # 1 of 154 files: skipped, and said once
    assert capsys.readouterr().err.strip() == (f"data: skipped 1 of 154 files, not UTF-8 text: {corpus}/latin1.txt "
                                               "(4 undecodable byte sequences in 22 bytes, the first at byte 2)")
    assert prepared.meta["documents"] == 153
    (corpus / "binary.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"^data.path='.*corpus': 2 of 155 files are not UTF-8 text, more than "
                                          r"data.max_bad_fraction=0.01: .*binary.txt \(512 .*latin1.txt \(4 "):
        prepare_data(cfg, progress=False)


def test_default_corpus_is_the_python_standard_library():
    files = corpus_files(DataConfig())
    names = {f.name for f in files}
    assert {"os.py", "functools.py", "argparse.py"} <= names
    assert sum(f.stat().st_size for f in files) > 10_000_000


def test_val_path_gives_validation_its_own_files_and_training_all_of_path(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("abcabcabc " * 40)
    (tmp_path / "train" / "b.txt").write_text("cab bac " * 40)
    (tmp_path / "held_out.txt").write_text("zyx zyx " * 10)  # characters that training never sees
    split = DataConfig(source="files", path=str(tmp_path / "train"), tokenizer="char", cache_dir=str(tmp_path / "cache"))
    own = DataConfig(**{**split.__dict__, "val_path": str(tmp_path / "held_out.txt")})
    split_data, own_data = prepare_data(split, progress=False), prepare_data(own, progress=False)
    assert own_data.directory != split_data.directory, "the validation files are part of the cache key"
    tokenizer = own_data.tokenizer()
    train_text, val_text = (tokenizer.decode(own_data.tokens(s).tolist()) for s in ("train", "val"))
    assert sorted(train_text) == sorted("abcabcabc " * 40 + "cab bac " * 40), "all of data.path trains, nothing else"
    assert val_text == "zyx zyx " * 10, "validation is the val_path text"
    assert own_data.meta["val_tokens"] == len(val_text) and own_data.meta["val_documents"] == 1
    with pytest.raises(ConfigError, match=r"^data.val_path='/no/such.txt' does not exist"):
        prepare_data(DataConfig(**{**split.__dict__, "val_path": "/no/such.txt"}), progress=False)
    (tmp_path / "empty.txt").write_text("  ")
    with pytest.raises(ConfigError, match=r"^data.val_path='.*empty.txt': the corpus is empty"):
        prepare_data(DataConfig(**{**split.__dict__, "val_path": str(tmp_path / "empty.txt")}), progress=False)


def mixture_corpus(tmp_path):
    """Two sources told apart by their letters: a directory of 'a' documents, a JSONL file of 'b' ones."""
    (tmp_path / "a").mkdir()
    for i in range(6):
        (tmp_path / "a" / f"{i}.txt").write_text(f"aaa{'a' * i} " * (20 + i))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"bb{'b' * i} " * (10 + i)}) + "\n" for i in range(4)))
    return f"{tmp_path / 'a'},{tmp_path / 'b.jsonl'}"


def test_a_mixture_cache_keeps_each_source_apart_with_its_own_val_tail_and_serves_any_weights(tmp_path):
    path = mixture_corpus(tmp_path)
    cfg = DataConfig(source="files", path=path, tokenizer="char", val_fraction=0.1, weights=[3.0, 1.0],
                     cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, progress=False)
    tokenizer = prepared.tokenizer()
    sources = prepared.meta["sources"]
    assert [(s["path"], s["documents"]) for s in sources] == [(str(tmp_path / "a"), 6), (str(tmp_path / "b.jsonl"), 4)]
    train, val = (tokenizer.decode(prepared.tokens(s).tolist()) for s in ("train", "val"))
    a_train, b_train = sources[0]["train_tokens"], sources[1]["train_tokens"]
    assert set(train[:a_train]) <= {"a", " "} and set(train[a_train:]) <= {"b", " "}, "source 0, then source 1"
    a_val = sources[0]["val_tokens"]
    assert set(val[:a_val]) <= {"a", " "} and set(val[a_val:]) <= {"b", " "}, "each source's own val tail"
    for s in sources:
        assert s["val_tokens"] == max(int((s["train_tokens"] + s["val_tokens"]) * 0.1), 1)
    assert prepared.meta["train_tokens"] == a_train + b_train == len(prepared.tokens("train"))
    assert prepared.mixture("train", [3.0, 1.0]) == [(0, a_train, 3.0), (a_train, a_train + b_train, 1.0)]
    assert prepared.mixture("val", [3.0, 1.0]) == [(0, a_val, 3.0), (a_val, len(prepared.tokens("val")), 1.0)]
    assert prepared.source_names() == ["a", "b.jsonl"]

    other_weights = prepare_data(DataConfig(**{**cfg.__dict__, "weights": [1.0, 1.0]}), progress=False)
    assert other_weights.directory == prepared.directory, "weights are the loader's: the cache is reused"
    one_corpus = prepare_data(DataConfig(**{**cfg.__dict__, "weights": None}), progress=False)
    assert one_corpus.directory != prepared.directory and "sources" not in one_corpus.meta

    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "x.py").write_text("print(1)\n")  # not a corpus format: the source is empty
    with pytest.raises(ConfigError, match=r"^data.path: the directory '.*code' holds none of the formats .* "
                                          r"e.g. '.*code/\*\*/\*.py'$"):
        prepare_data(DataConfig(**{**cfg.__dict__, "path": f"{path},{tmp_path / 'code'}", "weights": [1, 1, 1]}),
                     progress=False)
    (tmp_path / "code" / "notes.txt").write_text("  \n")  # a corpus format, but no text in it
    with pytest.raises(ConfigError, match=r"its source '.*code' holds no documents; allowed: .txt"):
        prepare_data(DataConfig(**{**cfg.__dict__, "path": f"{path},{tmp_path / 'code'}", "weights": [1, 1, 1]}),
                     progress=False)


def test_a_mixture_loader_draws_each_source_by_weight_disjointly_and_resumes_exactly():
    tokens = np.concatenate([np.zeros(10_001, dtype=np.uint16), np.ones(2_001, dtype=np.uint16)])
    mixture = [(0, 10_001, 3.0), (10_001, 12_002, 1.0)]

    def mixed(rank=0, world=1):
        return TokenShardLoader(tokens, seq_len=10, micro_batch=8, rank=rank, world_size=world, seed=3,
                                mixture=mixture)

    ranks = [mixed(r, 2) for r in range(2)]
    starts = []
    for _ in range(1024 // 16):  # one block of the mixture: exactly its shares
        for ld in ranks:
            starts.extend(ld.window_starts())
            ld.next_batch()
    assert sum(s < 10_001 for s in starts) == 768 and sum(s >= 10_001 for s in starts) == 256
    source_1 = [s for s in starts if s >= 10_001]
    assert len(set(source_1)) == 200 and (10_001 + 199 * 10) in source_1, \
        "the small source's 200 windows are all visited before any repeats"
    x, y = ranks[0].next_batch()
    assert set(x.flatten().tolist()) <= {0, 1} and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    assert all(len(set(row.tolist())) == 1 for row in x), "no window straddles two sources"

    resumed = mixed(0, 2)
    resumed.load_state_dict(ranks[0].state_dict())
    assert resumed.window_starts() == ranks[0].window_starts()


def packed_chats(tokenizer, conversations, seq_len):
    """The definition of a packed chat split: (ids, answer mask) as lists."""
    from lm.chat_data import tokenize_conversation

    pad = tokenizer.eot_id if tokenizer.eot_id is not None else 0
    ids, mask = [], []
    for messages in conversations:
        conv_ids, conv_mask = tokenize_conversation(tokenizer, messages)
        conv_ids, conv_mask = conv_ids + [pad], conv_mask + [False]
        room = seq_len - len(ids) % seq_len
        if room < len(conv_ids) <= seq_len:
            ids, mask = ids + [pad] * room, mask + [False] * room
        ids, mask = ids + conv_ids, mask + conv_mask
    fill = -(-len(ids) // seq_len) * seq_len + 1 - len(ids)
    return ids + [pad] * fill, mask + [False] * fill


def test_the_streamed_chat_cache_packs_each_splits_conversations_in_content_order(tmp_path):
    """data=chat is built as text is, a pass at a time without the conversations in memory, and holds
    what the in-memory definition says: the last conversations in content order validate, and each
    split's conversations are packed into rows of seq_len, none straddling two unless longer than one."""
    from lm.chat_data import iter_conversations
    from lm.data import chat_splits

    lines = [json.dumps({"prompt": "q" * (i % 7 + 1), "completion": "a" * (i % 11 + 1)}) for i in range(40)]
    lines[5] = "{not json"
    (tmp_path / "chats.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="chat", path=str(tmp_path / "chats.jsonl"), tokenizer="char", val_fraction=0.1,
                     max_bad_fraction=0.05, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, progress=False, seq_len=16)
    bad = []
    conversations = list(iter_conversations([tmp_path / "chats.jsonl"], bad))
    assert len(bad) == 1 and prepared.meta["documents"] == len(conversations) == 39
    for split, part in chat_splits(conversations, 0.1).items():
        ids, mask = packed_chats(prepared.tokenizer(), part, seq_len=16)
        assert prepared.tokens(split).tolist() == ids, split
        assert prepared.loss_mask(split).tolist() == [int(m) for m in mask], split
        assert prepared.meta[f"{split}_answer_tokens"] == sum(mask)
    assert sorted(p.name for p in prepared.directory.iterdir()) == [
        "meta.json", "tokenizer.json", "train.bin", "train_mask.bin", "val.bin", "val_mask.bin"]


def test_a_chat_mixture_packs_each_sources_splits_on_their_own(tmp_path):
    from lm.chat_data import iter_conversations
    from lm.data import chat_splits

    for name, letter, count in (("x.jsonl", "x", 12), ("y.jsonl", "y", 30)):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": letter * (i % 5 + 1), "completion": letter * (i % 9 + 2)})
                                             + "\n" for i in range(count)))
    cfg = DataConfig(source="chat", path=f"{tmp_path / 'x.jsonl'},{tmp_path / 'y.jsonl'}", tokenizer="char",
                     val_fraction=0.2, weights=[1.0, 1.0], cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, progress=False, seq_len=16)
    sources = prepared.meta["sources"]
    assert [s["documents"] for s in sources] == [12, 30]
    expected = {"train": ([], []), "val": ([], [])}
    for name, source in zip(("x.jsonl", "y.jsonl"), sources):
        for split, part in chat_splits(list(iter_conversations([tmp_path / name], [])), 0.2).items():
            ids, mask = packed_chats(prepared.tokenizer(), part, seq_len=16)
            assert source[f"{split}_tokens"] == len(ids)
            expected[split][0].extend(ids)
            expected[split][1].extend(mask)
    for split, (ids, mask) in expected.items():
        assert prepared.tokens(split).tolist() == ids and prepared.loss_mask(split).tolist() == [int(m) for m in mask]
    windows = prepared.mixture("train", [1.0, 1.0])
    assert [(end - start - 1) % 16 for start, end, _ in windows] == [0, 0], "each source is whole rows"
    with pytest.raises(ConfigError, match=r"its source '.*z.jsonl' holds 1 usable conversations; a mixture's source "
                                          r"needs at least 2 \(one for validation\)"):
        (tmp_path / "z.jsonl").write_text(json.dumps({"prompt": "z", "completion": "zz"}) + "\n")
        prepare_data(DataConfig(**{**cfg.__dict__, "path": f"{cfg.path},{tmp_path / 'z.jsonl'}", "weights": [1, 1, 1]}),
                     progress=False, seq_len=16)
