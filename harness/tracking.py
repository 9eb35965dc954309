"""MLflow plumbing shared by every entry point.

- ``setup``: the local default store is SQLite (``sqlite:///mlflow.db``) unless
  ``MLFLOW_TRACKING_URI`` says otherwise; inside ``mlflow run`` the run and experiment are given.
- ``tracked_run``: a run that always ends: FINISHED, FAILED (with the error as a tag) or KILLED.
  A process killed with ``kill -9`` cannot end its run, so every ``tracked_run`` first reaps the
  runs of dead processes on this host (tags ``harness.host``/``harness.pid``/``harness.started``),
  and fails the logged models they left PENDING.
- ``MetricBuffer``: per-step metrics written in batches, so tracking costs little per step.
- ``sigterm_raises``: SIGTERM (what a launcher such as ``accelerate launch`` sends its processes
  when one of them fails, or when it is itself stopped) raises ``Terminated``, so the
  ``tracked_run`` around it ends its run KILLED instead of leaving it RUNNING;
  ``sigterm_deferred`` holds it back until a store write has ended.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import mlflow
import psutil
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "sd-cxr"

TAG_HOST = "harness.host"
TAG_PID = "harness.pid"
TAG_STARTED = "harness.process_started"
TAG_ERROR = "harness.error"
TAG_STEP = "harness.step"
# A pipeline's worker processes start their steps' runs nested under this run (the pipeline's).
PARENT_RUN_ENV = "HARNESS_PARENT_RUN_ID"


def use_project_store() -> None:
    """The project's SQLite store, unless MLFLOW_TRACKING_URI says otherwise."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)


def setup(experiment: str | None = None) -> None:
    """Point MLflow at the project store and experiment (both overridable by the environment)."""
    use_project_store()
    # `mlflow run` hands its run (and experiment) to the step through the environment.
    if os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment or DEFAULT_EXPERIMENT)


def params_key(params: dict) -> str:
    """A short stable hash of parameters: the identity of a piece of work."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _process_alive(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - started) < 1.0  # the same process, not a reused pid
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def reap_dead_runs(client: MlflowClient | None = None) -> list[str]:
    """Mark KILLED every RUNNING run that a now-dead process on this host started."""
    client = client or MlflowClient()
    host = socket.gethostname()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"attributes.status = 'RUNNING' and tags.`{TAG_HOST}` = '{host}'",
    )
    reaped = []
    for run in runs:
        pid, started = run.data.tags.get(TAG_PID), run.data.tags.get(TAG_STARTED)
        if pid is None or started is None or _process_alive(int(pid), float(started)):
            continue
        end_dead_run(run.info.run_id, f"process {pid} on {host} died without ending the run", client)
        reaped.append(run.info.run_id)
    return reaped + reap_unstarted_project_runs(client, experiment_ids)


# `mlflow run` creates its run, then builds the environment, then starts the step, which tags its
# pid at once. A project run with no pid this long after it started never got a step: the
# environment failed (e.g. no conda), and MLflow left it RUNNING.
PROJECT_START_TIMEOUT_S = 3600


def reap_unstarted_project_runs(client: MlflowClient, experiment_ids: list[str],
                                timeout_s: float = PROJECT_START_TIMEOUT_S) -> list[str]:
    cutoff = int((time.time() - timeout_s) * 1000)
    runs = client.search_runs(
        experiment_ids,
        filter_string=f"attributes.status = 'RUNNING' and tags.`mlflow.project.env` != '' "
                      f"and attributes.start_time < {cutoff}")
    reaped = []
    for run in runs:
        if TAG_PID in run.data.tags:
            continue
        env = run.data.tags.get("mlflow.project.env")
        end_dead_run(run.info.run_id, f"`mlflow run` never started the step: its {env} environment was not "
                                      f"created (try --env-manager local)", client)
        reaped.append(run.info.run_id)
    return reaped


def end_dead_run(run_id: str, reason: str, client: MlflowClient | None = None) -> None:
    """End the run of a process known to be gone: KILLED, ``reason`` as its error tag, and the
    logged models it left PENDING marked FAILED."""
    client = client or MlflowClient()
    client.set_tag(run_id, TAG_ERROR, reason)
    client.set_terminated(run_id, status="KILLED")
    fail_pending_models(run_id, client)


def fail_pending_models(run_id: str, client: MlflowClient | None = None) -> list[str]:
    """Mark FAILED the logged models of ``run_id`` still PENDING. MLflow finalizes a model after
    its upload; a process killed (or cut off from the tracking server) during the upload leaves it
    PENDING for good, which reads as "still being written". Call only when no live process logs
    to the run. Returns the models' ids."""
    from mlflow.entities import LoggedModelStatus

    client = client or MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    pending, token = [], None
    while True:  # all pages first: finalizing while paging would shift the pages
        # status is compared here: a filter on it matches nothing in SQL stores (MLflow 3.x)
        page = client.search_logged_models([experiment_id], page_token=token,
                                           filter_string=f"source_run_id = '{run_id}'")
        pending += [model.model_id for model in page if model.status == LoggedModelStatus.PENDING]
        token = page.token
        if not token:
            break
    for model_id in pending:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
    return pending


class Terminated(BaseException):
    """The process got SIGTERM (raised by ``sigterm_raises``). A BaseException, as KeyboardInterrupt
    is: no ``except Exception`` swallows it."""


_deferring = 0  # > 0 inside sigterm_deferred: a SIGTERM then waits until the block has ended
_deferred: list[int] = []


def _on_sigterm(signum, frame):
    if _deferring:
        _deferred.append(signum)
        return
    raise Terminated(f"terminated by signal {signal.Signals(signum).name}")


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises ``Terminated`` in the main thread (elsewhere a signal
    handler cannot be set: the block runs unchanged). Python runs the handler between bytecodes, so a
    process blocked in a C call (a collective waiting on a peer) sees it when the call returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Hold a SIGTERM back while the block runs; raise it once the block has ended. Around store
    writes and the run's end: a ``Terminated`` raised inside a store call leaves its SQLite cursor
    alive in the traceback, holding a lock that makes the KILLED write fail ("database is locked")."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _deferred:
            signum = _deferred.pop()
            _deferred.clear()
            name = signal.Signals(signum).name
            raise Terminated(f"terminated by signal {name} (held back while the store was written)")


@contextmanager
def tracked_run(run_name: str, experiment: str | None = None, tags: dict | None = None,
                nested: bool = False) -> Iterator[mlflow.ActiveRun]:
    """Start (or join, under ``mlflow run``) a run that is never left RUNNING. Inside another
    run (a step of the ``pipeline``), the new run is nested under it."""
    nested = nested or mlflow.active_run() is not None
    parent = None if nested else os.environ.get(PARENT_RUN_ENV) or None
    if not nested:
        setup(experiment)
        reap_dead_runs()
    me = psutil.Process()
    process_tags = {TAG_HOST: socket.gethostname(), TAG_PID: str(me.pid),
                    TAG_STARTED: repr(me.create_time())}
    run = mlflow.start_run(run_name=run_name, nested=nested, parent_run_id=parent,
                           tags={**process_tags, **(tags or {})})
    try:
        yield run
    except Terminated as exc:
        with sigterm_deferred():
            mlflow.set_tag(TAG_ERROR, str(exc))
            mlflow.end_run("KILLED")
        raise
    except KeyboardInterrupt:
        with sigterm_deferred():
            mlflow.set_tag(TAG_ERROR, "interrupted")
            mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        with sigterm_deferred():
            mlflow.set_tag(TAG_ERROR, redact_url(f"{type(exc).__name__}: {exc}")[:5000])  # errors quote URLs
            mlflow.end_run("FAILED")
        raise
    else:
        with sigterm_deferred():
            mlflow.end_run("FINISHED")


def log_input(dataset, context: str, attempts: int = 3) -> None:
    """``mlflow.log_input``, retried when another process created the same data set in the same
    instant: the server's insert then fails on its unique key (seen with parallel tuning workers
    on PostgreSQL), and the retry finds the row and links it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            return mlflow.log_input(dataset, context=context)
        except MlflowException as err:
            if attempt == attempts - 1 or not any(s in str(err) for s in ("UniqueViolation", "UNIQUE constraint",
                                                                          "Duplicate entry", "already exists")):
                raise
            time.sleep(0.2 * (attempt + 1))


def log_params(params: dict) -> None:
    """Log parameters the active run does not have yet. Under ``mlflow run`` the CLI has already
    logged the entry point's parameters as typed (``1e-4``, ``400.0``); MLflow refuses to change a
    logged value, and the CLI's spelling is the one the user chose."""
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in existing})


class MetricBuffer:
    """Collects per-step metrics and writes them with ``log_batch`` every ``flush_every`` steps.
    Kept over ``log_metrics(..., synchronous=False)``, which still writes one batch per call: a
    fraction of its cost per step (``python -m bench.metric_logging``; README: benchmarks)."""

    def __init__(self, run_id: str, flush_every: int = 50):
        self.client = MlflowClient()
        self.run_id = run_id
        self.flush_every = flush_every
        self._pending: list[Metric] = []
        self._steps = 0

    def log(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._steps += 1
        if self._steps % self.flush_every == 0:
            self.flush()

    def flush(self) -> None:
        with sigterm_deferred():
            for start in range(0, len(self._pending), 1000):  # MLflow's per-batch limit
                self.client.log_batch(self.run_id, metrics=self._pending[start:start + 1000])
            self._pending = []  # inside: a signal held back until here must not leave them to log twice


def copy_metric_history(src_run_id: str, dst_run_id: str, keys: list[str], max_step: int) -> int:
    """Copy metric histories up to ``max_step`` (a resumed run continues its predecessor's curves)."""
    client = MlflowClient()
    metrics = [m for key in keys for m in client.get_metric_history(src_run_id, key) if m.step <= max_step]
    for start in range(0, len(metrics), 1000):
        client.log_batch(dst_run_id, metrics=metrics[start:start + 1000])
    return len(metrics)


# A URL's user-info password (scheme://user:PASSWORD@host) up to the last "@" of the token, and
# secret-looking query arguments (?password=..., &sslpassword=...): anywhere in a text, so error
# messages that quote a URL are covered too.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:@/\s'\"]*):[^\s'\"]*@")
_QUERY_SECRET = re.compile(r"(?P<head>[?&;](?:password|passwd|pwd|sslpassword|secret|token|api_key|access_key)=)"
                           r"[^&;\s'\"]*", re.IGNORECASE)


def redact_url(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``: what may be logged
    (params, tags, error messages) of a URL such as ``postgresql://user:password@host/db``."""
    text = _URL_PASSWORD.sub(r"\g<head>:***@", str(text))
    return _QUERY_SECRET.sub(r"\g<head>***", text)


@dataclass(frozen=True)
class StepResult:
    """What a step hands the next one: its run, the URIs of what it logged, its final metrics."""
    run_id: str
    artifacts: dict[str, str] = field(default_factory=dict)  # output name -> MLflow artifact URI
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, run_id: str, **artifacts: str) -> "StepResult":
        """The result of a finished run, with the named artifact paths as ``runs:/`` URIs."""
        run = MlflowClient().get_run(run_id)
        return cls(run_id, {name: f"runs:/{run_id}/{path}" for name, path in artifacts.items()},
                   dict(run.data.metrics))
