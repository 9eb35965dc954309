"""MLflow artifact URIs as data sets, so that steps on machines which share only a tracking server
hand each other data: a data spec's PATH may be ``runs:/<run id>/<path>`` or
``mlflow-artifacts:/...`` (``chexpert:runs:/<generate run>/synthetic``).

``local_spec`` is the one step-boundary function: every entry point passes each data spec it takes
through it (``resolved(config, *fields)`` for a step's config or Namespace) before the data layer
(``harness.data``, which never talks to MLflow) reads it; a spec with a local PATH comes back as it is.

A URI is downloaded once per machine, with ``mlflow.artifacts.download_artifacts``, into
``$HARNESS_CACHE_DIR/artifacts/<hash of the URI>`` (``~/.cache/sd-cxr/artifacts/...`` without the
variable): into a temporary folder beside it, then renamed into place, so no process ever sees half
a download, and of two processes downloading the same URI at once the second keeps the first's.
A run's artifacts do not change once logged, so a cached folder is never refetched: delete it to
refetch. A temporary folder left by a killed process is removed by the next download on its host.

``log_folder`` logs a folder as an artifact of the active run and tags where it lies on this host
(``harness.local_copy.<artifact path>``: host, path, file count and bytes). A ``runs:/`` URI into
such an artifact is read in place while that folder is still there, unchanged, on the same host:
the machine that made a data set never downloads it back.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from harness.data.datasets import DataSpec, is_artifact_uri
from harness.tracking import redact_url

log = logging.getLogger(__name__)

LOCAL_COPY_TAG = "harness.local_copy."
MANIFEST = "harness-artifact.json"  # in each cache entry, beside the download: its URI and path
_RUNS_URI = re.compile(r"runs:/(?P<run>[^/]+)/(?P<top>[^/]+)(?:/(?P<rest>.+))?")


def cache_root() -> Path:
    """``$HARNESS_CACHE_DIR/artifacts``, else ``~/.cache/sd-cxr/artifacts``."""
    return Path(os.environ.get("HARNESS_CACHE_DIR") or "~/.cache/sd-cxr").expanduser() / "artifacts"


def split_spec(spec: str) -> tuple[str, str, str]:
    """``FORMAT``, ``PATH`` and ``?options`` (with its ``?``, or empty) of a data spec, the PATH as
    written (``DataSpec`` holds it as a ``Path``, which folds a URI's ``//``)."""
    head, mark, query = str(spec).partition("?")
    fmt, _, path = head.partition(":")
    return fmt.strip(), path.strip(), mark + query


def local_spec(spec: str) -> str:
    """``spec`` with an MLflow artifact URI as PATH replaced by the URI's local folder (downloaded
    once, see the module docstring); any other spec (a local path, ``phantom``) unchanged."""
    if not spec:
        return spec
    spec = str(spec)
    DataSpec.parse(spec)  # an unknown format or option fails here, before any download
    fmt, path, query = split_spec(spec)
    if path.startswith("models:/"):
        raise ValueError(f"data set {spec!r}: a models:/ URI names a model, not a data set; pass a runs:/ "
                         "or mlflow-artifacts:/ URI of the data set's folder")
    if not is_artifact_uri(path):
        return spec
    return f"{fmt}:{local_path(path)}{query}"


def resolved(config, *fields: str):
    """A copy of ``config`` (a step's config dataclass or argparse Namespace) with each data-spec
    field in ``fields`` through ``local_spec``: what the step loads. The original keeps the URIs,
    for the run's parameters and the step's identity."""
    out = copy.copy(config)
    for name in fields:
        value = getattr(config, name)
        if value:
            object.__setattr__(out, name, local_spec(value))
    return out


def local_path(uri: str) -> Path:
    """The local folder (or file) of an artifact URI: the cached download, the folder its run logged
    it from (same host, unchanged), or a new download into the cache."""
    stripped = uri.rstrip("/")  # runs:/<run>/synthetic/ is runs:/<run>/synthetic
    uri = uri if stripped.endswith(":") else stripped
    entry = cache_root() / hashlib.sha256(uri.encode()).hexdigest()[:24]
    return _cached(entry) or _local_copy(uri) or _download(uri, entry)


def log_folder(folder, artifact_path: str) -> str:
    """Log ``folder`` as ``artifact_path`` of the active run and tag where it lies on this host;
    returns the folder's ``runs:/`` URI."""
    folder = Path(folder).absolute()
    run_id = mlflow.active_run().info.run_id
    mlflow.log_artifacts(str(folder), artifact_path)
    files, size = _fingerprint(folder)
    mlflow.set_tag(LOCAL_COPY_TAG + artifact_path, json.dumps(
        {"host": socket.gethostname(), "path": str(folder), "files": files, "bytes": size}))
    return f"runs:/{run_id}/{artifact_path}"


# ---------------------------------------------------------------------------------------------


def _cached(entry: Path) -> Path | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    path = entry / manifest["path"]
    return path if path.exists() else None


def _fingerprint(folder: Path) -> tuple[int, int]:
    files = size = 0
    for root, _, names in os.walk(folder):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(root, name))
    return files, size


def _local_copy(uri: str) -> Path | None:
    """The folder a ``runs:/`` URI's artifact was logged from, if it is on this host, unchanged."""
    found = _RUNS_URI.fullmatch(uri)
    if not found:
        return None
    try:
        tag = MlflowClient().get_run(found["run"]).data.tags.get(LOCAL_COPY_TAG + found["top"])
    except MlflowException:
        return None  # the download names what is wrong
    if not tag:
        return None
    where = json.loads(tag)
    folder = Path(where["path"])
    if where.get("host") != socket.gethostname() or not folder.is_dir():
        return None
    if _fingerprint(folder) != (where.get("files"), where.get("bytes")):
        log.info("%s: %s has changed since it was logged; downloading the artifact", uri, folder)
        return None
    path = folder / found["rest"] if found["rest"] else folder
    return path if path.exists() else None


def _download(uri: str, entry: Path) -> Path:
    entry.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_downloads(entry.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-{_host()}.{os.getpid()}.", dir=entry.parent))
    try:
        log.info("downloading %s into %s", uri, entry)
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except MlflowException as err:
            raise FileNotFoundError(f"MLflow artifact {uri} cannot be downloaded from tracking server "
                                    f"{redact_url(mlflow.get_tracking_uri())}: {err.message}") from None
        if not got.exists() or (got.is_dir() and not any(got.iterdir())):
            raise FileNotFoundError(f"MLflow artifact {uri} holds no files")
        (tmp / MANIFEST).write_text(json.dumps({"uri": redact_url(uri), "path": got.relative_to(tmp).as_posix(),
                                                "downloaded": time.time()}))
        try:
            os.rename(tmp, entry)
        except OSError:
            if _cached(entry) is None:  # not another process's complete download
                raise
            log.info("%s: another process downloaded it first", uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _cached(entry)


# A download in progress: .<entry>.tmp-<host>.<pid>.<random>, so the next download can tell one
# that a killed process left behind.
_TMP = re.compile(r"^\.[0-9a-f]+\.tmp-(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[^.]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())


def remove_stale_downloads(parent: Path) -> list[Path]:
    """Remove the temporary download folders in ``parent`` whose process, on this host, is gone."""
    removed = []
    for path in parent.iterdir():
        found = _TMP.match(path.name)
        if not found or found["host"] != _host():
            continue
        try:
            # the owner made the folder: a process started after it is not the owner
            alive = psutil.Process(int(found["pid"])).create_time() <= path.stat().st_mtime
        except psutil.NoSuchProcess:
            alive = False
        except (psutil.AccessDenied, FileNotFoundError):
            continue
        if not alive:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
