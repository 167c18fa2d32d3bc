"""The files a corpus is read from: plain text, JSON Lines, Parquet and Arrow, the text ones also gzipped.

Parquet is what Hugging Face datasets publish and `Dataset.to_parquet` writes; Arrow is what
`Dataset.save_to_disk` and the datasets cache hold; JSON Lines is what most tools export. Text and
chat data both read their structured files through `read_records`, so each format works for both,
with the same row numbers in their error messages.
"""

from __future__ import annotations

import codecs
import gzip
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEXT_FORMATS = (".txt", ".md")
TABLE_FORMATS = (".parquet", ".arrow")
RECORD_FORMATS = (".jsonl",) + TABLE_FORMATS
FORMATS = TEXT_FORMATS + RECORD_FORMATS  # and .txt.gz, .md.gz, .jsonl.gz


class UnreadableFile(ValueError):
    """A whole file that cannot be read as its format (a corrupt Parquet file, a bad gzip stream)."""


class NotUTF8(UnreadableFile):
    """A text file that is binary or in another encoding than UTF-8."""

    def __init__(self, path: Path, detail: str):
        self.path, self.detail = path, detail
        super().__init__(f"{path}: not UTF-8 text ({detail}); allowed: UTF-8 text (or UTF-16 with a byte-order "
                         "mark): convert it, e.g. iconv -f latin1 -t utf-8, or leave it out")


def file_format(path: Path) -> str:
    """The format a file's name says, under a .gz: ".txt", ".jsonl", ... or "" for none of them.
    Tables are read in place (memory-mapped, compressed inside), so .parquet.gz is none."""
    if path.suffix == ".gz":
        inner = Path(path.stem).suffix
        return inner if inner in FORMATS and inner not in TABLE_FORMATS else ""
    return path.suffix if path.suffix in FORMATS else ""


# A file where more than this share of bytes is not UTF-8 is binary or in another encoding (Latin-1,
# cp1252): trained on, it would be U+FFFD characters. Fewer (a stray byte) read as U+FFFD.
MAX_UNDECODABLE = 0.01
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def read_text(path: Path) -> str:
    """The file's text, gunzipped if .gz, newlines as text mode reads them (\r\n and \r as \n): UTF-8,
    or UTF-16 with a byte-order mark (Windows editors' "Unicode"). More than MAX_UNDECODABLE of bytes
    that are not UTF-8 is NotUTF8, naming the first."""
    with _opened(path, binary=True) as f:
        raw = f.read()
    encoding = next((codec for mark, codec in _BYTE_ORDER_MARKS if raw.startswith(mark)), "utf-8")
    text = raw.decode(encoding, errors="replace")
    undecodable = text.count("\ufffd") - (raw.count("\ufffd".encode()) if encoding != "utf-16" else 0)  # less U+FFFD written
    if undecodable > MAX_UNDECODABLE * len(raw):
        try:
            raw.decode(encoding)
        except UnicodeDecodeError as error:
            raise NotUTF8(path, f"{undecodable} undecodable byte sequences in {len(raw)} bytes, the first at "
                                f"byte {error.start}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _text_lines(path: Path) -> Iterator[str]:
    """The file's lines in text mode, read as they are needed (a JSONL file need not fit in memory)."""
    with _opened(path) as f:
        yield from f


@contextmanager
def _opened(path: Path, binary: bool = False):
    """The file open in text mode (UTF-8, undecodable bytes as U+FFFD) or binary, gunzipped if .gz; a
    bad gzip stream, met wherever it is read, is UnreadableFile."""
    gzipped, text = path.suffix == ".gz", {} if binary else {"encoding": "utf-8", "errors": "replace"}
    mode = "rb" if binary else "rt" if gzipped else "r"
    try:
        with gzip.open(path, mode, **text) if gzipped else open(path, mode, **text) as f:
            yield f
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        if not gzipped:
            raise
        raise UnreadableFile(f"{path}: not a readable gzip file ({error})") from None


def read_records(path: Path, columns: list[str] | None = None) -> Iterator[tuple[int, object]]:
    """(row number from 1, record) for each non-blank JSONL line or each Parquet or Arrow row (a dict
    of `columns`, or of every column). A JSONL line that is not JSON yields its JSONDecodeError in
    place of a record, so that the caller can report it by number and go on."""
    if file_format(path) in TABLE_FORMATS:
        yield from enumerate(_table_rows(path, columns), 1)
        return
    for lineno, line in enumerate(_text_lines(path), 1):  # a line at a time: a file need not fit in memory
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as error:
                yield lineno, error


def table_columns(path: Path) -> list[str]:
    """The column names of a Parquet or Arrow file."""
    try:
        if file_format(path) == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).schema_arrow.names
        return _arrow_reader(path).schema.names
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a file it cannot read
        raise UnreadableFile(_unreadable(path, error)) from None


def _table_rows(path: Path, columns: list[str] | None) -> Iterator[dict]:
    try:
        if file_format(path) == ".parquet":
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(path).iter_batches(batch_size=4096, columns=columns)
        else:
            batches = (b.select(columns) if columns else b for b in _arrow_batches(_arrow_reader(path)))
        for batch in batches:
            yield from batch.to_pylist()
    except Exception as error:
        raise UnreadableFile(_unreadable(path, error)) from None


def _arrow_reader(path: Path):
    """Arrow's stream format (what Hugging Face datasets write), or else its file format."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path)))


def _arrow_batches(reader) -> Iterator:
    if hasattr(reader, "read_next_batch"):  # the stream format's reader iterates; the file format's is indexed
        yield from reader
    else:
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))


def _unreadable(path: Path, error: Exception) -> str:
    kind = "Parquet" if file_format(path) == ".parquet" else "Arrow"
    return f"{path}: not a readable {kind} file ({error})"
