"""Which documents a data config names, and their text: files, directories and globs in every
format lm.records reads, or the embedded default (the Python standard library's own source).

Documents are read one file and one record at a time, so a corpus never has to fit in memory.
"""

from __future__ import annotations

import collections
import glob
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, NoReturn

from lm.chat_data import BadLine, iter_conversations
from lm.chat_template import BUILTIN, ChatTemplate
from lm.config import ConfigError, DataConfig, path_items
from lm.remote_files import is_uri, mirror
from lm.records import (FORMATS, RECORD_FORMATS, TABLE_FORMATS, NotUTF8, UnreadableFile, file_format,
                        read_records, read_text, table_columns)


def stdlib_files() -> list[Path]:
    """The Python standard library's own source: real code and prose on every machine with Python."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)


def _setting(data: DataConfig, field: str):
    """The value of a dotted data setting, e.g. "data.val_path"."""
    return getattr(data, field.removeprefix("data."))


def corpus_files(data: DataConfig, field: str = "data.path") -> list[Path]:
    """Resolve `data.path` (or `data.val_path`: files, directories, globs; comma separated), or the
    stdlib default."""
    if data.source == "stdlib" and field == "data.path":
        return stdlib_files()
    return [f for files in source_files(data, field) for f in files]


def source_files(data: DataConfig, field: str = "data.path") -> list[list[Path]]:
    """The files of each comma-separated item of `data.path` (or `data.val_path`): a mixture's sources."""
    downloads = Path(data.cache_dir) / "downloads"  # where items named by URI are mirrored
    return [item_files(item, downloads, field) for item in path_items(_setting(data, field))]


_ITEMS_NOTED: set[tuple[str, str]] = set()  # directories whose unread files were mentioned (once a process)


def item_files(item: str, downloads: Path, field: str = "data.path") -> list[Path]:
    """The files one item of data.path names: a file, a directory (its files of known formats,
    recursively) or a glob; a URI's are mirrored under `downloads` first (lm.remote_files)."""
    if is_uri(item):
        return mirror(item, downloads, field, known=lambda path: bool(file_format(Path(path))))
    expanded = os.path.expanduser(item)
    if any(ch in expanded for ch in "*?["):
        matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
        if not matches:
            raise ConfigError(f"{field}={item!r} matches no files: pass existing files, directories or globs")
        return [m for m in matches if m.is_file()]
    if os.path.isdir(expanded):
        files = sorted(p for p in Path(expanded).rglob("*") if p.is_file())
        known = [p for p in files if file_format(p)]
        # A tree of source code, say: its .py files are not read unless a glob names them. None read is
        # an error; most not read (a README among them) is said once.
        others = collections.Counter(p.suffix for p in files if p.suffix and not file_format(p)
                                     and not p.name.startswith("."))
        if others and sum(others.values()) > len(known) and (field, item) not in _ITEMS_NOTED:
            common = others.most_common(1)[0][0]
            kinds = ", ".join(f"{count} {suffix}" for suffix, count in others.most_common(3))
            kinds += ", ..." if len(others) > 3 else ""
            glob_hint = f"name them with a glob to read them as text, e.g. '{item.rstrip('/')}/**/*{common}'"
            if not known:
                raise ConfigError(f"{field}: the directory {item!r} holds none of the formats it is read for "
                                  f"({', '.join(FORMATS)}); its files: {kinds}: {glob_hint}")
            _ITEMS_NOTED.add((field, item))
            print(f"data: {field} item {item!r}: {len(known)} of its files are read ({', '.join(FORMATS)}), not "
                  f"its {kinds} files: {glob_hint}", file=sys.stderr, flush=True)
        return known
    if os.path.isfile(expanded):
        return [Path(expanded)]
    raise ConfigError(f"{field}={item!r} does not exist: pass existing files, directories or globs")


def iter_documents(files: list[Path], data: DataConfig, field: str = "data.path",
                   not_utf8: dict[Path, str] | None = None) -> Iterator[str]:
    """One string per document, in order: a whole text file, or each JSONL line's or Parquet/Arrow
    row's `data.text_field` (a null one is skipped). Files are read one at a time, and records one
    at a time, so a corpus never has to fit in memory. `data.max_bytes` stops after the file that
    reaches it. A text file that is not UTF-8 is a config error, or, given `not_utf8`, is skipped
    and recorded there (see `check_text_files`)."""
    budget = data.max_bytes
    for path in files:
        try:
            texts = _record_texts(path, data.text_field) if file_format(path) in RECORD_FORMATS else _file_text(path)
            for text in texts:
                yield text
                if budget is not None:
                    budget -= len(text.encode("utf-8"))
        except NotUTF8 as error:
            if not_utf8 is None:
                raise ConfigError(f"{field}: {error}") from None
            not_utf8[path] = error.detail
        except UnreadableFile as error:
            raise ConfigError(f"{field}: {error}") from None
        if budget is not None and budget <= 0:
            return


def read_documents(files: list[Path], data: DataConfig, field: str = "data.path") -> list[str]:
    """`iter_documents`, in memory; an empty corpus is a config error."""
    docs = list(iter_documents(files, data, field))
    if not any(d.strip() for d in docs):
        empty_corpus(files, data, field)
    return docs


def check_text_files(not_utf8: dict[Path, str], files: int, data: DataConfig) -> None:
    """Text files that are not UTF-8 (a Latin-1 test fixture in a code tree) are skipped and reported
    as chat data's bad lines are: more than data.max_bad_fraction of the files stops the run. The
    embedded corpus's few (the standard library's tests of other encodings) go unmentioned."""
    if not not_utf8 or data.source == "stdlib":
        return
    listed = _first_of([f"{path} ({detail})" for path, detail in not_utf8.items()], 5)
    if len(not_utf8) > data.max_bad_fraction * files:
        raise ConfigError(f"data.path={data.path!r}: {len(not_utf8)} of {files} files are not UTF-8 text, more than "
                          f"data.max_bad_fraction={data.max_bad_fraction}: {listed}; allowed: UTF-8 text (or UTF-16 "
                          "with a byte-order mark): convert them, e.g. iconv -f latin1 -t utf-8, or leave them out")
    print(f"data: skipped {len(not_utf8)} of {files} files, not UTF-8 text: {listed}", file=sys.stderr, flush=True)


def _first_of(items: list, shown: int) -> str:
    """The first `shown` items, and how many more: a report that stays one line."""
    return ", ".join(map(str, items[:shown])) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def empty_corpus(files: list[Path], data: DataConfig, field: str) -> NoReturn:
    where = "the Python standard library" if data.source == "stdlib" else repr(_setting(data, field))
    raise ConfigError(f"{field}={where}: the corpus is empty ({len(files)} files, no text); "
                      f"allowed: non-empty {', '.join(FORMATS)} files (the text ones also gzipped)")


def _file_text(path: Path) -> list[str]:
    return [text] if (text := read_text(path)).strip() else []


_JSON_TYPES = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object",
               bytes: "bytes"}


def _record_texts(path: Path, text_field: str) -> Iterator[str]:
    table = file_format(path) in TABLE_FORMATS
    if table and text_field not in (columns := table_columns(path)):
        raise ConfigError(f"data.text_field={text_field!r}: {path} has no such column; its columns: {columns}")
    for row, record in read_records(path, [text_field] if table else None):
        if not isinstance(record, dict):
            kind = "a string" if isinstance(record, str) else _JSON_TYPES.get(type(record), type(record).__name__)
            raise ConfigError(f"data.text_field={text_field!r}: {path}:{row} is {kind}, not a JSON object with that "
                              "string field")
        if text_field not in record:
            strings = [key for key, value in record.items() if isinstance(value, str)]
            hint = f"; set data.text_field={strings[0]}" if len(strings) == 1 else ""
            raise ConfigError(f"data.text_field={text_field!r}: {path}:{row} has no such field; its fields: "
                              f"{', '.join(map(str, record)) or 'none'} (strings: {', '.join(strings) or 'none'}){hint}")
        text = record[text_field]
        if text is not None and not isinstance(text, str):  # str() of it would train on "[...]" or "b'...'"
            kind = _JSON_TYPES.get(type(text), type(text).__name__)
            raise ConfigError(f"data.text_field={text_field!r}: {path}:{row} has {kind} there, not a string (or null)")
        if text is not None:
            yield text


def read_chats(files: list[Path], data: DataConfig, field: str = "data.path", template: ChatTemplate = BUILTIN
               ) -> list[list[dict]]:
    """The conversations, in memory (validation files of their own); checked as `check_chats`."""
    bad: list[BadLine] = []
    conversations = list(chat_conversations(files, bad, field, template))
    check_chats(len(conversations), bad, data, field)
    return conversations


def chat_conversations(files: list[Path], bad: list[BadLine], field: str = "data.path",
                       template: ChatTemplate = BUILTIN) -> Iterator[list[dict]]:
    """`iter_conversations`, a file that cannot be read at all being a config error naming `field`."""
    try:
        yield from iter_conversations(files, bad, template)
    except UnreadableFile as error:
        raise ConfigError(f"{field}: {error}") from None


def check_chats(count: int, bad: list[BadLine], data: DataConfig, field: str = "data.path") -> None:
    """Bad lines are reported with their line numbers, and too many stop the run. Without
    `data.val_path`, validation takes some of the `count` conversations, so at least 2 are needed."""
    value, total = _setting(data, field), count + len(bad)
    if bad:
        listed = _first_of(bad, 10)
        if len(bad) > data.max_bad_fraction * total:
            hint = ("; data.chat_template=builtin renders conversations with the built-in template instead"
                    if any(b.reason.startswith("the chat template") for b in bad) else "")
            raise ConfigError(f"{field}={value!r}: {len(bad)} of {total} lines are bad, more than "
                              f"data.max_bad_fraction={data.max_bad_fraction}: {listed}{hint}")
        print(f"data: skipped {len(bad)} bad lines of {total}: {listed}", file=sys.stderr, flush=True)
    needed = 1 if data.val_path else 2
    if count < needed:
        raise ConfigError(f"{field}={value!r}: {count} usable conversations; data=chat needs at least "
                          + ("1" if needed == 1 else "2 (one for validation)"))
