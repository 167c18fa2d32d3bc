"""Files in an object store, read through a local mirror: corpus files (`data.path=s3://...`) and a
pretrained model's directory (`trainer.init_from=s3://...`, `mirror_directory`).

An item of `data.path` may be a URI that `pyarrow.fs` resolves (s3://, gs://, abfs://, hdfs://):
a file, a "directory" (every file under the prefix) or a glob in its last parts. Its files are
downloaded once into `<data.cache_dir>/downloads/`, each written beside and renamed, and fetched
again only when the store lists another size or modification time; the corpus is then read from
the mirror as local files are (so the token cache's key, which hashes the content, is the same as
for the same files on disk). Every node that builds the cache mirrors what it reads.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from pathlib import Path

from lm.config import ConfigError
from lm.staging import node_lock

GLOB_CHARS = "*?["


def is_uri(path: str) -> bool:
    return "://" in path


def split_query(uri: str) -> tuple[str, str]:
    """(the URI without its query, "?<query>" or ""): pyarrow reads options such as
    `?endpoint_override=host:9000&scheme=http` there, and paths go before it."""
    bare, mark, query = uri.partition("?")
    return bare, mark + query


def mirror(item: str, downloads: Path, field: str = "data.path", known=lambda path: True) -> list[Path]:
    """The local copies of the files one URI item names (`known(path)`: a directory's files of known
    formats), in the item's order."""
    return _mirror(item, downloads, field, known)[0]


def mirror_directory(uri: str, downloads: Path, field: str) -> Path:
    """The local copy of every file under a URI prefix (a model directory), as a directory."""
    return _mirror(uri, downloads, field)[1]


def _mirror(item: str, downloads: Path, field: str, known=lambda path: True) -> tuple[list[Path], Path]:
    """(`mirror`'s local copies, the local directory that mirrors the item's prefix)."""
    import pyarrow.fs as pafs

    bare, query = split_query(item)
    try:
        glob_at = min((bare.index(c) for c in GLOB_CHARS if c in bare), default=None)
        base = bare if glob_at is None else bare[:glob_at].rsplit("/", 1)[0]
        fs, root = pafs.FileSystem.from_uri(base + query)
        info = fs.get_file_info(root)
        if glob_at is None and info.type == pafs.FileType.File:
            files = [info]
        elif info.type == pafs.FileType.Directory:
            listing = fs.get_file_info(pafs.FileSelector(root, recursive=True))
            files = sorted((i for i in listing if i.type == pafs.FileType.File), key=lambda i: i.path)
            if glob_at is None:
                files = [i for i in files if known(i.path)]
            else:
                pattern = (root + bare[len(base):]).split("/")
                files = [i for i in files if _glob_match(i.path.split("/"), pattern)]
        else:
            files = []
    except Exception as error:  # pyarrow: unknown scheme, credentials, endpoint
        raise ConfigError(f"{field}={item!r} cannot be read: {type(error).__name__}: "
                          f"{' '.join(str(error).split())[:300]}") from None
    if not files:
        what = "matches no files" if glob_at is not None else "does not exist"
        raise ConfigError(f"{field}={item!r} {what}: pass existing files, directories or globs")
    local_root = _local_root(item, downloads)
    return [_download(fs, info, local_root / info.path) for info in files], local_root / root.rstrip("/")


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """A path's parts against a glob's, as `glob.glob(recursive=True)` matches: `*`, `?` and `[...]`
    within one part, `**` any number of parts."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _local_root(uri: str, downloads: Path) -> Path:
    return downloads / re.sub(r"[^A-Za-z0-9_.-]", "_", uri.split("://", 1)[0] + "://")


def _download(fs, info, local: Path) -> Path:
    """One file, fetched unless the copy was made from the same size and modification time; one
    process of the machine at a time (a node's ranks may ask for the same file together)."""
    import pyarrow.fs as pafs

    stamp = json.dumps({"size": info.size, "mtime": info.mtime.timestamp() if info.mtime else None})
    record = local.with_name(f".{local.name}.source")
    with node_lock(local.with_name(f".{local.name}.lock")):
        if local.is_file() and record.is_file() and record.read_text() == stamp:
            return local
        partial = local.with_name(f".{local.name}.partial-{os.getpid()}")
        try:
            pafs.copy_files(info.path, str(partial), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())
            os.replace(partial, local)
        finally:
            partial.unlink(missing_ok=True)
        record.write_text(stamp)
    return local
