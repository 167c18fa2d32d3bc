"""Where runs live: local paths for one machine; for a cluster, a filesystem every node mounts or an
object store (`launcher/run_dir.py`)."""

from __future__ import annotations

import os
from pathlib import Path

from launcher.run_dir import is_uri, open_storage
from lm.config import ConfigError, TrainConfig

# Filesystem types whose contents every node of a cluster can see.
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                       "9p", "virtiofs", "wekafs", "panfs", "orangefs", "ocfs2", "gfs2"}


def filesystem_type(path: str, mounts_file: str = "/proc/mounts") -> str | None:
    """The type of the filesystem holding `path`, from the longest matching mount point."""
    target = os.path.realpath(path)  # resolves symlinks in the part that exists; the run dir may not yet
    best, best_type = "", None
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, fields[2]
    return best_type


def is_shared_filesystem(path: str) -> bool:
    fs = filesystem_type(path)
    return fs is not None and (fs in NETWORK_FILESYSTEMS or fs.startswith("fuse."))


def check_run_storage(cfg: TrainConfig) -> None:
    """Refuse storage that some workers could not reach, before anything is started."""
    storage = cfg.run.storage
    if is_uri(storage):
        check_object_store(storage)
        return
    check_writable_directory(storage, "run.storage")
    if not cfg.cluster.multi_node:
        return
    shared = cfg.cluster.shared_storage
    if shared is None:
        shared = is_shared_filesystem(storage)
    if not shared:
        raise ConfigError(f"run.storage={storage!r} is node-local ({filesystem_type(storage)}), but "
                          "cluster.multi_node=true puts workers on several nodes: allowed: a path on a "
                          "filesystem every node mounts (NFS, EFS, FSx, Lustre, ...), or "
                          "cluster.shared_storage=true if this path is shared")


def check_writable_directory(path: str, field: str) -> None:
    """A directory this user can write or create (nothing is made here): checked before the token cache
    is built, where a file in the way or a read-only directory failed with a traceback after it."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = (f"{existing} is a file" if not existing.is_dir() else
               f"{existing} is not writable by this user" if not os.access(existing, os.W_OK | os.X_OK) else None)
    if problem:
        raise ConfigError(f"{field}={path!r} cannot be written: {problem}; allowed: a directory this user can "
                          "create and write")


def check_object_store(storage: str, field: str = "run.storage") -> None:
    """The URI names a filesystem pyarrow knows, and it answers (credentials, endpoint, bucket)."""
    try:
        fs, path = open_storage(storage)
        fs.get_file_info(path)
        bucket = path.split("/", 1)[0]
        if type(fs).__name__ in ("S3FileSystem", "GcsFileSystem") and fs.get_file_info(bucket).type.name == "NotFound":
            raise FileNotFoundError(f"bucket {bucket!r} does not exist")
    except Exception as error:  # pyarrow raises ValueError, OSError and its own errors
        message = " ".join(str(error).split())[:300]
        raise ConfigError(f"{field}={storage!r} cannot be used: {type(error).__name__}: {message}; allowed: a "
                          "filesystem path, or a URI pyarrow reaches with this machine's credentials (s3://bucket/"
                          "path, gs://bucket/path; AWS_ENDPOINT_URL for an S3-compatible store)") from None
