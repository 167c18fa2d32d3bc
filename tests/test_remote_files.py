"""Corpus files in an object store (a local S3 server) build the same token cache as the same files
on disk, are downloaded once, and bad URIs are one-line errors naming the field."""

import json
import re

import pyarrow.fs as pafs
import pytest

import lm.remote_files as remote_files
from lm.config import ConfigError, DataConfig
from lm.corpus import corpus_files
from lm.data import prepare_data


@pytest.fixture
def corpus(tmp_path, s3_storage):
    """The same three files on disk and under s3://<bucket>/corpus/ (one of a format no reader knows)."""
    local = tmp_path / "corpus"
    (local / "notes").mkdir(parents=True)
    (local / "a.txt").write_text("def main():\n    return 1\n" * 200)
    (local / "notes" / "b.jsonl").write_text("".join(json.dumps({"text": f"note {i} " * 30}) + "\n" for i in range(50)))
    (local / "skip.bin").write_bytes(b"\x00\x01")
    bucket = s3_storage.split("/")[2]
    fs, _ = pafs.FileSystem.from_uri(s3_storage)
    for path in local.rglob("*"):
        if path.is_file():
            pafs.copy_files(str(path), f"{bucket}/corpus/{path.relative_to(local).as_posix()}",
                            destination_filesystem=fs)
    return local, f"s3://{bucket}/corpus"


def data(path, tmp_path, **kw):
    return DataConfig(source="text", path=path, vocab_size=300, cache_dir=str(tmp_path / "cache"), **kw)


def test_a_corpus_in_a_bucket_builds_the_cache_the_same_files_on_disk_build(corpus, tmp_path):
    local, uri = corpus
    from_disk = prepare_data(data(str(local), tmp_path), progress=False)
    from_store = prepare_data(data(uri + "/", tmp_path), progress=False)
    assert from_store.directory == from_disk.directory, "the same key: the content is the same"
    mirrored = corpus_files(data(uri, tmp_path))
    assert [p.name for p in mirrored] == ["a.txt", "b.jsonl"], "a prefix's files of known formats"
    assert all(str(p).startswith(str(tmp_path / "cache" / "downloads")) for p in mirrored)
    assert [p.name for p in corpus_files(data(f"{uri}/notes/*.jsonl", tmp_path))] == ["b.jsonl"]
    assert [p.name for p in corpus_files(data(f"{uri}/**/*.jsonl", tmp_path))] == ["b.jsonl"], "as glob.glob"
    with pytest.raises(ConfigError, match="matches no files"):
        corpus_files(data(f"{uri}/*.jsonl", tmp_path))  # `*` stays within a directory, as on disk
    assert [p.name for p in corpus_files(data(f"{uri}/a.txt,{uri}/notes", tmp_path))] == ["a.txt", "b.jsonl"]
    mixture = prepare_data(data(f"{uri}/a.txt,{uri}/notes", tmp_path, weights=[1, 1]), progress=False)
    assert [s["path"] for s in mixture.meta["sources"]] == [f"{uri}/a.txt", f"{uri}/notes"]


def test_files_are_downloaded_again_only_when_the_store_lists_another_size_or_time(corpus, tmp_path, monkeypatch):
    _, uri = corpus
    fetched = []
    original = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda src, dst, **kw: (fetched.append(src), original(src, dst, **kw)))
    first = corpus_files(data(uri, tmp_path))
    assert len(fetched) == 2
    assert corpus_files(data(uri, tmp_path)) == first and len(fetched) == 2, "reused"
    fs, root = pafs.FileSystem.from_uri(f"{uri}/a.txt")
    with fs.open_output_stream(root) as f:
        f.write(b"changed\n")
    corpus_files(data(uri, tmp_path))
    assert len(fetched) == 3 and first[0].read_text() == "changed\n"
    assert sorted(p.name for p in first[0].parent.iterdir()) == [".a.txt.lock", ".a.txt.source", "a.txt", "notes"]


def test_bad_uris_are_one_line_errors_naming_the_field(corpus, tmp_path):
    _, uri = corpus
    for path, field, message in (
            (f"{uri}/missing.txt", "data.path", "does not exist"),
            (f"{uri}/*.parquet", "data.path", "matches no files"),
            ("nosuch://bucket/x.txt", "data.path", "cannot be read: ArrowInvalid"),
    ):
        with pytest.raises(ConfigError, match=f"^{field}='{re.escape(path)}' {message}"):
            corpus_files(data(path, tmp_path))
    with pytest.raises(ConfigError, match=f"^data.val_path='{uri}/nope/' does not exist"):
        corpus_files(data(uri, tmp_path, val_path=f"{uri}/nope/"), "data.val_path")
    assert remote_files.is_uri(uri) and not remote_files.is_uri("corpus/a.txt")
