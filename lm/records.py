"""The files a corpus is read from: plain text, JSON Lines and Parquet, any of the text ones gzipped.

Parquet is what Hugging Face datasets publish and `Dataset.to_parquet` writes; JSON Lines is what
most tools export. Text and chat data both read their structured files through `read_records`, so
each format works for both, with the same row numbers in their error messages.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

TEXT_FORMATS = (".txt", ".md")
RECORD_FORMATS = (".jsonl", ".parquet")
FORMATS = TEXT_FORMATS + RECORD_FORMATS  # and .txt.gz, .md.gz, .jsonl.gz


class UnreadableFile(ValueError):
    """A whole file that cannot be read as its format (a corrupt Parquet file, a bad gzip stream)."""


def file_format(path: Path) -> str:
    """The format a file's name says, under a .gz: ".txt", ".jsonl", ... or "" for none of them.
    Parquet compresses itself, so .parquet.gz is none."""
    if path.suffix == ".gz":
        inner = Path(path.stem).suffix
        return inner if inner in FORMATS and inner != ".parquet" else ""
    return path.suffix if path.suffix in FORMATS else ""


def read_text(path: Path) -> str:
    """The file's text, in text mode (universal newlines: \r\n and \r read as \n), gunzipped if .gz."""
    if path.suffix != ".gz":
        return path.read_text(encoding="utf-8", errors="replace")
    try:
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise UnreadableFile(f"{path}: not a readable gzip file ({error})") from None


def read_records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[int, object]]:
    """(row number from 1, record) for each non-blank JSONL line or each Parquet row (a dict of
    `columns`, or of every column). A JSONL line that is not JSON yields its JSONDecodeError in
    place of a record, so that the caller can report it by number and go on."""
    if file_format(path) == ".parquet":
        yield from enumerate(_parquet_rows(path, columns), 1)
        return
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as error:
                yield lineno, error


def parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).schema_arrow.names
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
        raise UnreadableFile(f"{path}: not a readable Parquet file ({error})") from None


def _parquet_rows(path: Path, columns: list[str] | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns)
        for batch in batches:
            yield from batch.to_pylist()
    except Exception as error:
        raise UnreadableFile(f"{path}: not a readable Parquet file ({error})") from None
