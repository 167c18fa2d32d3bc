"""A run's directory, `<run.storage>/<run.name>`, on a filesystem path or in an object store.

`run.storage` may be a path (every node of a multi-node run must mount it) or a URI that
`pyarrow.fs` resolves, as Ray Train's own `storage_path` does: `s3://bucket/runs` (credentials and
endpoint from the usual AWS variables, `AWS_ENDPOINT_URL` for S3-compatible stores), `gs://`,
`abfs://`, `hdfs://`. Ray Train uploads the checkpoints there; the driver, the workers, export and
serve read the run through this class. In an object store, what must be read as files (a
checkpoint to resume from, an export to serve) is downloaded to a node-local copy first, once per
node, and what the launcher writes (summary, exports, profiles) is uploaded, each file whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from lm.checkpoint import TRAINER_STATE, damaged_archive, manifest_complete
from lm.remote_files import is_uri, split_query
from lm.staging import node_lock, staged_directory

CHECKPOINT_PATTERN = re.compile(r"checkpoint_(\d+)$")
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of the run's checkpoints


def open_storage(storage: str):
    """(pyarrow filesystem, path on it) for run.storage."""
    import pyarrow.fs as pafs

    if not is_uri(storage):
        return pafs.LocalFileSystem(), os.path.abspath(storage)
    fs, path = pafs.FileSystem.from_uri(storage)
    return fs, path.rstrip("/")


class RunDir:
    def __init__(self, storage: str, name: str):
        self.fs, base = open_storage(storage)
        self.path = f"{base}/{name}" if name else base  # "": the storage itself, whose runs listdir() lists
        self.remote = is_uri(storage) and type(self.fs).__name__ != "LocalFileSystem"
        bare, self.query = split_query(storage) if is_uri(storage) else (storage, "")
        self.location = "/".join(filter(None, (bare.rstrip("/"), name))) if is_uri(storage) else self.path

    def _path(self, rel: str = "") -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def where(self, rel: str = "") -> str:
        """`rel`'s path or URI (with the storage URI's query, if any), as a user would pass it to a tool."""
        return (f"{self.location}/{rel}" if rel else self.location) + self.query

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> str:
        """Whole or not at all: a local file is written beside and renamed; an object store shows an
        object only once its upload is complete."""
        target = self._path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        staging = target if self.remote else f"{target}.tmp"
        with self.fs.open_output_stream(staging) as f:
            f.write(text.encode())
        if staging != target:
            self.fs.move(staging, target)
        return self.where(rel)

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._path(rel))

    def mtime(self, rel: str) -> float | None:
        info = self.fs.get_file_info(self._path(rel))
        return info.mtime.timestamp() if info.mtime else None

    def listdir(self, rel: str = "") -> list[str]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self._path(rel), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def listing(self, rel: str) -> dict[str, tuple[int, float | None]]:
        """Every file under `rel`, by path relative to `rel`: (size, modification time) (one listing)."""
        import pyarrow.fs as pafs

        root = self._path(rel)
        infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return {i.path[len(root) + 1:]: (i.size, i.mtime.timestamp() if i.mtime else None)
                for i in infos if i.type == pafs.FileType.File}

    def sizes(self, rel: str) -> dict[str, int]:
        return {name: size for name, (size, _) in self.listing(rel).items()}

    # Checkpoints
    def is_complete(self, checkpoint: str) -> bool:
        sizes = self.sizes(checkpoint)
        if TRAINER_STATE not in sizes:
            return False
        return manifest_complete(lambda name: self.read_text(f"{checkpoint}/{name}"), sizes.get)

    def latest_checkpoint(self) -> str | None:
        """The name of the complete checkpoint with the highest step, or None."""
        steps = {name: int(m.group(1)) for name in self.listdir() if (m := CHECKPOINT_PATTERN.match(name))}
        for name in sorted(steps, key=steps.get, reverse=True):
            if self.is_complete(name):
                return name
        return None

    def damaged_file(self, checkpoint: str) -> str | None:
        """lm.checkpoint.damaged_archive of a checkpoint here, local or in an object store."""
        return damaged_archive(self.sizes(checkpoint),
                               lambda name: self.fs.open_input_file(self._path(f"{checkpoint}/{name}")))

    def reconcile_ray_snapshot(self) -> str | None:
        """Ray Train will not start in a run directory whose list of checkpoints (its
        checkpoint_manager_snapshot.json) names one that is gone (moved aside as damaged, deleted by
        hand) or that another Ray version wrote. Resuming reads the checkpoints in storage, not that
        list (launcher.ray_worker), so such a list is removed, and why is returned. Ray then rotates
        (trainer.keep_checkpoints) only the checkpoints written after: the older ones stay."""
        import ray

        if not self.exists(RAY_SNAPSHOT):
            return None
        try:
            snapshot = json.loads(self.read_text(RAY_SNAPSHOT))
            version = snapshot["ray_version"]
            named = [result["checkpoint_dir_name"] for result in snapshot["checkpoint_results"]]
        except (ValueError, KeyError, TypeError):
            why = "it could not be read"
        else:
            gone = [name for name in named if not self.exists(name)]
            if version != ray.__version__:
                why = f"Ray {version} wrote it, this is Ray {ray.__version__}"
            elif gone:
                why = f"it names {', '.join(gone)}, which {'is' if len(gone) == 1 else 'are'} gone"
            else:
                return None
        self.delete(RAY_SNAPSHOT)
        return why

    def trainer_state(self, checkpoint: str) -> dict:
        return json.loads(self.read_text(f"{checkpoint}/{TRAINER_STATE}"))

    def config(self, checkpoint: str):
        from lm.config import config_from_dict

        return config_from_dict(json.loads(self.read_text(f"{checkpoint}/config.json")))

    def local_copy(self, rel: str, cache: str | Path) -> Path:
        """A local directory with `rel`'s files: the directory itself on a filesystem; in an object
        store, a copy under `cache` that the processes of one node share (the first downloads it,
        the others wait for it, and a later call reuses it while the source lists the same files, sizes
        and times)."""
        if not self.remote:
            return Path(self._path(rel))
        return download(self.fs, self._path(rel), self.listing(rel), Path(cache) / rel.replace("/", "_"))

    def exports(self) -> list[tuple[float, str]]:
        """(time written, location) of each complete export of the run (`launcher.export`)."""
        from lm.export import EXPORT_FILES

        files = self.listing("exports")  # one listing, not a request per file
        names = {path.split("/", 1)[0] for path in files}
        return [(files[f"{name}/{EXPORT_FILES[-1]}"][1] or 0.0, self.where(f"exports/{name}"))  # uploaded last
                for name in sorted(names) if all(f"{name}/{f}" in files for f in EXPORT_FILES)]

    def upload(self, local: str | Path, rel: str, last: tuple[str, ...] = ()) -> str:
        """Copy a local directory's files under `rel`; the names in `last` go after the others, so a
        reader that checks for them never sees a partial upload."""
        import pyarrow.fs as pafs

        local = Path(local)
        files = sorted((p for p in local.rglob("*") if p.is_file()),
                       key=lambda p: p.relative_to(local).as_posix() in last)
        target = self._path(rel)
        for path in files:
            name = path.relative_to(local).as_posix()
            self.fs.create_dir(f"{target}/{name}".rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(path), f"{target}/{name}", source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        return self.where(rel)


def local_directory(location: str, cache: str | Path) -> Path:
    """A directory given as a path, or as a URI whose files are downloaded under `cache` once per node."""
    if not is_uri(location):
        return Path(location)
    fs, path = open_storage(location)
    if type(fs).__name__ == "LocalFileSystem":
        return Path(path)
    return download(fs, path, RunDir(location, "").listing(""),
                    Path(cache) / re.sub(r"[^A-Za-z0-9_.-]", "_", split_query(location)[0]))


DOWNLOADED = ".lmstack-downloaded.json"


def download(fs, source: str, listing: dict, dest: Path) -> Path:
    """`source`'s files (as `RunDir.listing` lists them) into `dest`, whole: written beside, then
    renamed; the listing is kept with the copy, which is reused while it is the same."""
    import pyarrow.fs as pafs

    record = json.dumps(listing, sort_keys=True)
    with node_lock(dest.with_name(dest.name + ".lock")):
        marker = dest / DOWNLOADED
        if marker.is_file() and marker.read_text() == record:
            return dest
        with staged_directory(dest) as partial:
            pafs.copy_files(source, str(partial), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            (partial / DOWNLOADED).write_text(record)
    return dest
