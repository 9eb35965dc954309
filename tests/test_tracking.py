"""MLflow plumbing: data set logging survives the create race between parallel workers; a SIGTERM
waits for a store write in progress and still ends the run KILLED."""

from __future__ import annotations

import os
import signal
import time

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from harness import tracking


def test_log_input_retries_the_servers_duplicate_dataset_race(mlflow_store, monkeypatch):
    # What a PostgreSQL-backed server answered when two tuning workers logged the same data set at once.
    race = MlflowException('BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates '
                           'unique constraint "dataset_pk"')
    real, calls = mlflow.log_input, []

    def flaky(dataset, context=None, **kwargs):
        calls.append(context)
        if len(calls) == 1:
            raise race
        return real(dataset, context=context, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", flaky)
    dataset = mlflow.data.from_pandas(pd.DataFrame({"a": [1, 2]}), name="phantom-train")
    with mlflow.start_run() as run:
        tracking.log_input(dataset, context="training")
    assert calls == ["training", "training"]
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["phantom-train"]


def test_log_input_raises_other_errors_at_once(monkeypatch):
    calls = []

    def broken(dataset, context=None, **kwargs):
        calls.append(context)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")

    monkeypatch.setattr(mlflow, "log_input", broken)
    with pytest.raises(MlflowException, match="run not found"):
        tracking.log_input(object(), context="training")
    assert calls == ["training"]


def test_reaper_fails_the_pending_models_of_the_runs_it_reaps(mlflow_store):
    import socket

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment = client.create_experiment("e")
    dead = client.create_run(experiment, tags={tracking.TAG_HOST: socket.gethostname(), tracking.TAG_PID: "999999999",
                                               tracking.TAG_STARTED: "0.0"})
    pending = client.create_logged_model(experiment, name="checkpoint-000010", source_run_id=dead.info.run_id)
    ready = client.create_logged_model(experiment, name="checkpoint-000005", source_run_id=dead.info.run_id)
    client.finalize_logged_model(ready.model_id, "READY")

    assert tracking.reap_dead_runs(client) == [dead.info.run_id]
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert str(client.get_logged_model(pending.model_id).status) == "FAILED"
    assert str(client.get_logged_model(ready.model_id).status) == "READY"


def test_a_failed_runs_error_tag_hides_credentials(mlflow_store):
    """Errors quote the URLs they failed on: the error tag must not keep a password."""
    import pytest
    from mlflow.tracking import MlflowClient

    from harness import tracking

    with pytest.raises(ConnectionError):
        with tracking.tracked_run("fails") as run:
            raise ConnectionError("could not reach postgresql://alice:s3cret@db/optuna")
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert "s3cret" not in tags[tracking.TAG_ERROR] and "alice" in tags[tracking.TAG_ERROR]


def test_a_project_run_whose_environment_never_came_up_is_reaped(mlflow_store):
    """`mlflow run` without conda installed creates its run, fails to build the environment and
    leaves the run RUNNING with no step (no pid tag): the next entry point ends it."""
    import time

    from mlflow.tracking import MlflowClient

    from harness import tracking

    client = MlflowClient()
    experiment = client.create_experiment("projects")
    now = int(time.time() * 1000)
    old = client.create_run(experiment, start_time=now - 2 * tracking.PROJECT_START_TIMEOUT_S * 1000,
                            tags={"mlflow.project.env": "conda"})
    young = client.create_run(experiment, start_time=now, tags={"mlflow.project.env": "conda"})
    plain = client.create_run(experiment, start_time=now - 2 * tracking.PROJECT_START_TIMEOUT_S * 1000)
    assert tracking.reap_dead_runs(client) == [old.info.run_id]
    assert client.get_run(old.info.run_id).info.status == "KILLED"
    assert "--env-manager local" in client.get_run(old.info.run_id).data.tags[tracking.TAG_ERROR]
    assert {client.get_run(r.info.run_id).info.status for r in (young, plain)} == {"RUNNING"}


def test_a_sigterm_during_a_store_write_is_raised_after_it_and_the_run_ends_killed(mlflow_store, monkeypatch):
    # Raised inside the write, Terminated once left an SQLite cursor holding the lock that the
    # KILLED write then waited on ("database is locked"): the run stayed RUNNING.
    real, written = MlflowClient.log_batch, []

    def signalled_mid_write(self, run_id, metrics=(), **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs here
        written.append(run_id)
        return real(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", signalled_mid_write)
    with pytest.raises(tracking.Terminated, match="held back"), tracking.sigterm_raises():
        with tracking.tracked_run("stopped") as run:
            tracking.MetricBuffer(run.info.run_id, flush_every=1).log({"loss": 0.5}, step=0)
            time.sleep(1.0)  # not reached: the held-back signal is raised as the flush ends
    client = MlflowClient()
    assert written == [run.info.run_id]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [0.5]
    assert client.get_run(run.info.run_id).info.status == "KILLED"
