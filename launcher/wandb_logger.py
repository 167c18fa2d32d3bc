"""Weights & Biases from rank 0 of a worker group: offline by default, online when asked."""

from __future__ import annotations

import netrc
import os
import socket
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from lm.config import ConfigError, LoggingConfig, TrainConfig
from lm.remote_files import is_uri


def wandb_hosts() -> list[str]:
    """The hosts `wandb login` keeps a key for in netrc: WANDB_BASE_URL's, or W&B's default server
    (api.forge.coreweave.com since wandb 0.31, whose key W&B also finds under api.wandb.ai, the server
    behind it; before, api.wandb.ai itself)."""
    base = os.environ.get("WANDB_BASE_URL")
    try:
        from wandb.sdk.lib import urls
    except ImportError:  # an older wandb
        return [urlparse(base or "https://api.wandb.ai").hostname]
    base = base or getattr(urls, "DEFAULT_BASE_URL", "https://api.wandb.ai")
    upstream = getattr(urls, "forge_upstream_url", lambda url: url)(base)
    return list(dict.fromkeys([urlparse(base).hostname, urlparse(upstream).hostname]))


def check_credentials(cfg: LoggingConfig) -> None:
    """Online logging without a W&B API key fails inside rank 0, after Ray and the workers have
    started. Refuse it on the driver instead, looking where W&B looks: WANDB_API_KEY or an identity
    token file, `wandb login`'s netrc entry for the W&B host, or an api_key in W&B's settings files.
    Anything that might hold a key passes: only a setup with none is refused."""
    if cfg.backend != "wandb" or cfg.mode != "online":
        return
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    hosts = wandb_hosts()
    try:
        if any(netrc.netrc(os.environ.get("NETRC") or None).authenticators(host) for host in hosts):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    host = hosts[0]
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    for settings in (config_dir / "settings", Path(cfg.dir) / "wandb" / "settings", Path("wandb") / "settings"):
        try:
            if "api_key" in settings.read_text():
                return
        except OSError:
            continue
    raise ConfigError(f"logging.mode='online' needs a W&B API key for {host}: set WANDB_API_KEY (on a cluster, "
                      "in the job's runtime_env env_vars) or run `wandb login`; allowed without one: "
                      "logging=wandb_offline or logging=none")


def check_server(cfg: LoggingConfig, timeout: float = 5.0) -> None:
    """Online logging to a W&B server this machine cannot reach failed in rank 0's wandb.init after its
    90 s timeout, with a traceback: refuse it on the driver (a name that does not resolve, a connection
    refused or unanswered). Behind a proxy (HTTPS_PROXY, ALL_PROXY) only W&B can tell: not checked."""
    if cfg.backend != "wandb" or cfg.mode != "online" or \
            any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    base = os.environ.get("WANDB_BASE_URL") or f"https://{wandb_hosts()[0]}"
    url = urlparse(base)
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except OSError as error:
        raise ConfigError(f"logging.mode='online': the W&B server {base} cannot be reached from here ({error}); "
                          "allowed: logging=wandb_offline (`wandb sync` uploads the run later) or logging=none") from None


def copies_offline_run(cfg: TrainConfig) -> bool:
    """W&B writes an offline run on rank 0's node, which in a run across nodes or with its storage in a
    bucket may be any node, an autoscaled one that goes away with the job included: there rank 0 also
    copies the run's directory into the run's storage, under `wandb/`, from where `wandb sync` uploads it."""
    return (cfg.logging.backend == "wandb" and cfg.logging.mode == "offline"
            and (cfg.cluster.multi_node or is_uri(cfg.run.storage)))


def offline_copy(wandb_dir: str) -> str:
    """Where, relative to the run's directory in storage, rank 0 copies an offline W&B run's directory."""
    return f"wandb/{PurePosixPath(wandb_dir).name}"


class WandbLogger:
    """One W&B run per training run: a run that resumes from a checkpoint passes the W&B run id
    saved in it, and its metrics continue that W&B run (offline, another directory with the same
    id, which `wandb sync` uploads into the one run). Steps the previous attempt logged past the
    checkpoint are logged again with the same values (resume is exact); W&B keeps the first."""

    def __init__(self, cfg: LoggingConfig, run_name: str, group: str | None, config: dict,
                 run_id: str | None = None):
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        Path(cfg.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=group or cfg.group,
                              name=run_name, dir=cfg.dir, mode=cfg.mode, config=config,
                              tags=list(cfg.tags) or None, notes=cfg.notes,
                              # A new run without an id takes W&B's (or WANDB_RUN_ID's).
                              id=run_id, resume="allow" if run_id else None,
                              job_type="train", reinit="finish_previous",
                              # Ray already forwards worker stdout; W&B's capture would echo it twice.
                              settings=wandb.Settings(console="off"))

    @property
    def run_id(self) -> str:
        return self.run.id

    @property
    def run_dir(self) -> str:
        """The run's own directory (…/wandb/offline-run-<time>-<id>), what `wandb sync` takes."""
        return str(Path(self.run.dir).parent)

    def update_config(self, config: dict) -> None:
        """The run's config as the workers run it (`trainer.precision=auto` resolved)."""
        self.run.config.update(config, allow_val_change=True)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_profile(self, trace: Path) -> None:
        """A profiler trace (and its operator table) as an artifact of type `profile`: W&B's UI shows a
        `trace.pt.trace.json` in it in a trace viewer. One artifact per run; a version per window."""
        import wandb

        artifact = wandb.Artifact(f"profile-{self.run.id}", type="profile",
                                  description=f"torch.profiler trace of {trace.parent.name}, {trace.stem.split('.')[0]}")
        artifact.add_file(str(trace), name="trace.pt.trace.json")
        table = trace.with_name(trace.name.replace(".pt.trace.json", ".ops.txt"))
        if table.exists():
            artifact.add_file(str(table), name="ops.txt")
        self.run.log_artifact(artifact, aliases=[trace.parent.name])

    def log_model(self, location: str, step: int, metrics: dict) -> None:
        """The checkpoint at `location` (a path or a URI) as a `model` artifact that refers to it where
        it is, as W&B's reference artifacts do for buckets: W&B records each file's checksum, and a
        later version of the same files is not a new one. Aliases: `latest` and `step_<N>`."""
        import re

        import wandb

        from lm.remote_files import is_uri, split_query

        name = "model-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.run.name or self.run.id)
        artifact = wandb.Artifact(name, type="model", metadata={"step": step, **metrics})
        uri = split_query(location)[0] if is_uri(location) else Path(location).resolve().as_uri()  # no pyarrow query
        artifact.add_reference(uri)
        self.run.log_artifact(artifact, aliases=["latest", f"step_{step}"])

    def finish(self) -> None:
        """Finish the run and shut W&B's service down, as W&B's atexit hooks would at the process's exit
        (Ray ends a worker's process without running them, which left the service's socket directory
        in the temp dir at every run)."""
        import wandb

        self.run.finish()
        wandb.teardown()


def remove_import_temporaries() -> None:
    """The two empty temporary directories (`tmp*wandb-media`, `tmp*wandb-artifacts`) that importing
    wandb makes and only an atexit hook removes: for a process that is done with W&B and will end
    without its atexit hooks (a Ray worker). Does nothing on a wandb without them."""
    import sys
    import tempfile

    private = sys.modules.get("wandb.sdk.data_types._private")
    artifact = sys.modules.get("wandb.sdk.artifacts.artifact")
    holders = ((private, "MEDIA_TMP"), (getattr(artifact, "Artifact", None), "_TMP_DIR"))
    for holder, name in holders:
        directory = getattr(holder, name, None)
        if isinstance(directory, tempfile.TemporaryDirectory):
            directory.cleanup()
