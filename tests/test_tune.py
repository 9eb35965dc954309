"""The tune entry point on tiny models: a study end to end, its resume (also after a worker is
killed mid-trial), a crashing trial, pruning, and three workers sharing a study on PostgreSQL with
an MLflow server on a PostgreSQL backend store."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from conftest import serve_mlflow
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from harness import finetune, report, tracking, tune
from harness.data import load_table

RUN_ID = "mlflow_run_id"  # where optuna_integration's MLflowCallback keeps a trial's run id


@pytest.fixture(scope="session")
def tune_phantom(tmp_path_factory):
    """A phantom large enough for a valid split with both classes in some labels (~13 images)."""
    from harness.data.phantom import write_phantom

    return write_phantom(tmp_path_factory.mktemp("tune_phantom"), n_patients=80, seed=0, size=64)


def _argv(phantom, base, storage, n_trials, *extra, steps=(1, 2)):
    return ["--arm", "dreambooth", "--data", f"chexpert:{phantom}", "--pretrained_model", str(base),
            "--storage", storage, "--study_name", "s", "--n_trials", str(n_trials),
            "--steps_min", str(steps[0]), "--steps_max", str(steps[1]), "--eval_every", "1", "--batch_size", "4",
            "--n_per_prompt", "3", "--num_inference_steps", "2", "--epochs", "1", "--threads", "1", *extra]


def _study(storage: str) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=storage)


def _runs(client=None):
    client = client or MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _children(runs, parent_id):
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


@pytest.mark.slow
def test_tiny_study_end_to_end_then_resumed(mlflow_store, tune_phantom, tiny_pipeline_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study_run_id = tune.main(_argv(tune_phantom, tiny_pipeline_dir, storage, 2, "--sampler_seed", "0"))
    study = _study(storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    n_valid = len(load_table(f"chexpert:{tune_phantom}", "valid"))
    client = MlflowClient()
    runs = _runs(client)
    study_run = client.get_run(study_run_id)
    assert study_run.info.status == "FINISHED"
    for trial in study.trials:
        run = client.get_run(trial.system_attrs[RUN_ID])
        # The trial's run: nested under the study run, with Optuna's params, value and state.
        assert run.info.status == "FINISHED" and run.info.run_name == f"trial-{trial.number}"
        assert run.data.tags["mlflow.parentRunId"] == study_run_id
        assert run.data.params == {k: str(v) for k, v in trial.params.items()}
        assert run.data.metrics["valid_auc_macro"] == pytest.approx(trial.value)
        assert run.data.tags["state"] == "COMPLETE"
        # ... and its fine-tune, generate and classify runs, linked by tags and nested under it.
        finetune_run = client.get_run(run.data.tags["harness.tune.finetune_run"])
        assert finetune_run.data.tags["mlflow.parentRunId"] == run.info.run_id
        assert float(finetune_run.data.params["learning_rate"]) == pytest.approx(trial.params["learning_rate"])
        assert finetune_run.data.params["steps"] == str(trial.params["steps"])
        for step in range(1, trial.params["steps"] + 1):
            judged = client.get_run(run.data.tags[f"harness.tune.classify_run.{step:06d}"])
            assert judged.data.params["test_split"] == "valid"  # tuning never looks at the test split
            assert judged.data.params["n_test_images"] == str(n_valid)
            assert judged.data.tags["mlflow.parentRunId"] == finetune_run.info.run_id
            assert trial.intermediate_values[step] == pytest.approx(judged.data.metrics["auc_macro"])
            assert client.get_run(run.data.tags[f"harness.tune.generate_run.{step:06d}"]).info.status == "FINISHED"
        assert trial.value == trial.intermediate_values[trial.params["steps"]]
    # The study run: best trial, plots, the one test-split evaluation, the registered checkpoint.
    best = study.best_trial
    assert study_run.data.metrics["best_valid_auc_macro"] == pytest.approx(best.value)
    assert study_run.data.params["best_trial"] == str(best.number)
    assert study_run.data.metrics["n_trials_complete"] == 2 and study_run.data.metrics["worker_trials"] == 2
    assert study_run.data.metrics["trials_per_hour"] > 0
    artifacts = {a.path for a in client.list_artifacts(study_run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png"} <= artifacts
    test_run = client.get_run(study_run.data.tags["harness.tune.test_classify_run"])
    assert test_run.data.params["test_split"] == "test"
    assert test_run.data.tags["mlflow.parentRunId"] == study_run_id
    assert study_run.data.metrics["test_auc_macro"] == pytest.approx(test_run.data.metrics["auc_macro"])
    best_gen = best.user_attrs["generate_runs"][str(best.params["steps"])]
    assert test_run.data.params["train"] == client.get_run(best_gen).data.tags["harness.generated_uri"]  # a URI, not a path
    name, version = study_run.data.tags["harness.tune.registered"].removeprefix("models:/").split("/")
    tags = client.get_model_version(name, version).tags
    assert tags["finetune_run_id"] == best.user_attrs["finetune_run"]
    assert tags["step"] == str(best.params["steps"]) and tags["classify_run_id"] == test_run.info.run_id
    n_runs = len(runs)

    # Resume: the same command with a larger budget adds exactly the missing trial.
    again = tune.main(_argv(tune_phantom, tiny_pipeline_dir, storage, 3))
    study = _study(storage)
    assert [t.number for t in study.trials] == [0, 1, 2] and study.trials[2].state == TrialState.COMPLETE
    assert client.get_run(study.trials[2].system_attrs[RUN_ID]).data.tags["mlflow.parentRunId"] == again
    assert client.get_run(again).data.metrics["worker_trials"] == 1
    assert len(_runs(client)) > n_runs

    # The report's tuning section: one row per trial, as Optuna recorded it.
    result = report.main(["--output_dir", "reports", "--log", "false"])
    table = pd.read_csv(next(p for p in result["files"] if p.name.endswith("_trials.csv")))
    assert list(table["trial"]) == [t.number for t in study.trials]
    assert list(table["state"]) == ["COMPLETE"] * 3
    assert table["valid macro AUC"].tolist() == pytest.approx([t.value for t in study.trials])
    assert table["learning_rate"].tolist() == pytest.approx([t.params["learning_rate"] for t in study.trials])
    assert "Tuning (Optuna)" in result["markdown"].read_text()


@pytest.mark.slow
def test_crashing_trial_is_recorded_and_the_study_goes_on(mlflow_store, tune_phantom, tiny_pipeline_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    # The largest float32 learning rate: after the warmup's first step (at rate 0) the weights blow
    # up, the loss is not finite at step 3 and finetune raises.
    study.enqueue_trial({"learning_rate": 3e38, "steps": 3})
    study_run_id = tune.main(_argv(tune_phantom, tiny_pipeline_dir, storage, 2, steps=(2, 3)))
    crashed, ok = _study(storage).trials
    assert crashed.state == TrialState.FAIL and ok.state == TrialState.COMPLETE
    client = MlflowClient()
    run = client.get_run(crashed.system_attrs[RUN_ID])
    assert run.info.status == "FAILED" and "NonFiniteLossError" in run.data.tags["harness.error"]
    assert run.data.tags["state"] == "FAIL"
    finetune_runs = _children(_runs(client), run.info.run_id)
    assert [r.info.status for r in finetune_runs] == ["FAILED"]
    assert client.get_run(study_run_id).info.status == "FINISHED"
    assert client.get_run(study_run_id).data.metrics["n_trials_fail"] == 1


@pytest.mark.slow
def test_pruning_stops_a_trial_built_to_be_bad(mlflow_store, tune_phantom, tiny_pipeline_dir, tmp_path,
                                                monkeypatch):
    """Tiny random models give every trial about the same AUC, so the judged value is pinned: a
    learning rate above 1e-3 scores 0.1, others 0.9. Everything else (fine-tuning, generating,
    classifying, reporting, the pruner's decision, the early stop) runs for real."""
    real = tune.score_checkpoint

    def score(args, finetune_run, step):
        _, gen, judged = real(args, finetune_run, step)
        lr = float(MlflowClient().get_run(finetune_run).data.params["learning_rate"])
        return (0.1 if lr > 1e-3 else 0.9), gen, judged

    monkeypatch.setattr(tune, "score_checkpoint", score)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for lr in (1e-4, 2e-4, 5e-2):  # two good trials, then a bad one
        study.enqueue_trial({"learning_rate": lr, "steps": 2})
    study_run_id = tune.main(_argv(tune_phantom, tiny_pipeline_dir, storage, 3, steps=(2, 2)))
    good1, good2, bad = _study(storage).trials
    assert good1.state == good2.state == TrialState.COMPLETE
    assert good1.intermediate_values == {1: 0.9, 2: 0.9}
    assert bad.state == TrialState.PRUNED and bad.intermediate_values == {1: 0.1}
    assert bad.user_attrs["pruned_at_step"] == 1 and bad.user_attrs["saved_steps"] == 1
    client = MlflowClient()
    finetune_run = client.get_run(bad.user_attrs["finetune_run"])
    # Fine-tuning really stopped after the first checkpoint, and its run ended cleanly.
    assert finetune_run.info.status == "FINISHED" and finetune_run.data.tags["harness.stopped_early"] == "1"
    assert max(m.step for m in client.get_metric_history(finetune_run.info.run_id, "loss")) == 1
    assert not any(k.startswith("harness.checkpoint.") and not k.endswith("000001") for k in finetune_run.data.tags)
    trial_run = client.get_run(bad.system_attrs[RUN_ID])
    assert trial_run.info.status == "FINISHED" and trial_run.data.tags["state"] == "PRUNED"
    metrics = client.get_run(study_run_id).data.metrics
    assert metrics["n_trials_pruned"] == 1 and metrics["pruning_saved_steps"] == 1
    # Half of the bad trial's steps (and checkpoint judgings) were not run: as long as it ran.
    assert metrics["pruning_saved_seconds"] == pytest.approx(bad.user_attrs["seconds"])
    assert 0 < metrics["pruning_saved_fraction"] < 1


@pytest.mark.slow
def test_adherence_objective_judges_checkpoints_without_training_classifiers(mlflow_store, tune_phantom,
                                                                             tiny_pipeline_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study_run_id = tune.main(_argv(tune_phantom, tiny_pipeline_dir, storage, 1, "--objective", "adherence",
                                   "--prompts", "disease"))
    study = _study(storage)
    (trial,) = study.trials
    assert trial.state == TrialState.COMPLETE
    client = MlflowClient()
    study_run = client.get_run(study_run_id)
    # one classifier trained on the real train split judges every checkpoint of the study
    judge = client.get_run(study.user_attrs["adherence_classifier_run"])
    assert study_run.data.tags["harness.tune.adherence_classifier_run"] == judge.info.run_id
    assert judge.data.params["train"] == f"chexpert:{tune_phantom}"
    trial_run = client.get_run(trial.system_attrs[RUN_ID])
    assert trial_run.data.metrics["adherence_mean"] == pytest.approx(trial.value) and 0 <= trial.value <= 1
    history = client.get_metric_history(trial_run.info.run_id, "checkpoint_adherence_mean")
    assert {m.step: m.value for m in history} == pytest.approx(trial.intermediate_values)
    assert not any(k.startswith("harness.tune.classify_run.") for k in trial_run.data.tags)  # no classifier per step
    classify_runs = [r for r in _runs(client) if r.data.tags.get("harness.entry_point") == "classify"]
    assert len(classify_runs) == 2  # the judge, and the best trial's one look at the test split
    assert study_run.data.metrics["best_adherence_mean"] == pytest.approx(trial.value)
    assert client.get_run(study_run.data.tags["harness.tune.test_classify_run"]).data.params["test_split"] == "test"


def test_a_study_without_the_pretrained_model_fails_before_any_trial(mlflow_store, tune_phantom, tmp_path):
    """A fresh store where `cxr-sd-base` is not registered: each trial used to fail on it in turn,
    and the study ended FINISHED."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(LookupError, match="no 'cxr-sd-base' model is registered"):
        tune.main(_argv(tune_phantom, "base", storage, 3))
    assert _study(storage).trials == []
    (study_run,) = _runs()
    assert study_run.info.status == "FAILED" and "cxr-sd-base" in study_run.data.tags["harness.error"]


@pytest.mark.slow
def test_a_study_whose_every_trial_fails_ends_failed(mlflow_store, tune_phantom, tiny_pipeline_dir, tmp_path,
                                                     monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(finetune, "run", broken)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    with pytest.raises(tune.StudyFailed, match=r"no trial of study 's' completed \(2 fail\); 2 of 2 failed trial\(s\) "
                                               r"with RuntimeError: CUDA error"):
        tune.main(_argv(tune_phantom, tiny_pipeline_dir, storage, 2))
    assert [t.state for t in _study(storage).trials] == [TrialState.FAIL] * 2
    study_run = next(r for r in _runs() if r.data.tags.get("harness.entry_point") == "tune")
    assert study_run.info.status == "FAILED" and "CUDA error" in study_run.data.tags["harness.error"]
    assert study_run.data.metrics["n_trials_fail"] == 2  # the study's summary is still logged


def test_unreachable_storage_fails_at_once_and_its_password_is_never_logged(mlflow_store, tune_phantom,
                                                                            tiny_pipeline_dir):
    storage = f"postgresql://tuner:s3cret-pw@127.0.0.1:{_free_port()}/optuna"
    with pytest.raises(ConnectionError, match=r"optuna storage postgresql://tuner:\*\*\*@127.0.0.1:\d+/optuna "
                                              "cannot be opened"):
        tune.main(_argv(tune_phantom, tiny_pipeline_dir, storage, 1))
    (run,) = _runs()
    assert run.info.status == "FAILED"
    assert run.data.params["storage"] == run.data.tags["harness.tune.storage"] == tracking.redact_url(storage)
    logged = [*run.data.params.values(), *run.data.tags.values()]
    assert not [v for v in logged if "s3cret" in v]


def test_a_password_that_mlflow_run_logged_is_refused(mlflow_store, tune_phantom, tiny_pipeline_dir, monkeypatch):
    """`mlflow run -P storage=postgresql://user:pw@...` logs the URL as the run's parameter before
    the entry point starts, and MLflow cannot delete it: the run fails, saying what to do."""
    import mlflow

    storage = f"postgresql://tuner:s3cret-pw@127.0.0.1:{_free_port()}/optuna"
    client = MlflowClient()
    run = client.create_run(client.create_experiment("mlflow-run"))
    client.log_param(run.info.run_id, "storage", storage)  # what the mlflow run CLI does
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    with pytest.raises(ValueError, match="PGPASSWORD or ~/.pgpass"):
        tune.main(_argv(tune_phantom, tiny_pipeline_dir, storage, 1))
    mlflow.end_run()
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FAILED" and not [v for v in run.data.tags.values() if "s3cret" in v]


def test_tracking_redact_url_hides_every_credential():
    assert tracking.redact_url("postgresql://u:p@ss/w@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert tracking.redact_url("error on 'mysql+pymysql://u:pw@h/db?ssl=1&password=pw2'") == \
        "error on 'mysql+pymysql://u:***@h/db?ssl=1&password=***'"
    for plain in ("sqlite:///optuna.db", "postgresql://u@h/db", "http://127.0.0.1:5000/#/experiments"):
        assert tracking.redact_url(plain) == plain


def test_unknown_data_format_is_refused_by_the_arguments(capsys):
    with pytest.raises(SystemExit):
        tune.parse_args(["--arm", "dreambooth", "--data", "dicom:/data"])
    assert "unknown data format 'dicom'" in capsys.readouterr().err


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            **extra}


@pytest.mark.slow
def test_killed_worker_trial_is_failed_and_retried_on_resume(mlflow_store, tune_phantom, tiny_pipeline_dir,
                                                              tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    argv = _argv(tune_phantom, tiny_pipeline_dir, storage, 1, "--heartbeat_interval", "1", "--grace_period", "2",
                 steps=(2, 2))
    worker = subprocess.Popen([sys.executable, "-m", "harness.tune", *argv], cwd=tmp_path,
                              env=_env(MLFLOW_TRACKING_URI=mlflow_store), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:  # kill -9 once the trial is running with its MLflow run
            trials = _study(storage).trials if _has_study(storage) else []
            if trials and trials[0].state == TrialState.RUNNING and RUN_ID in trials[0].system_attrs:
                break
            assert worker.poll() is None, "the worker ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("the worker never started its trial")
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert _study(storage).trials[0].state == TrialState.RUNNING  # nothing marked it: it died
    time.sleep(3)  # past the grace period
    tune.main(argv)
    dead, retry = _study(storage).trials
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.params == dead.params and retry.system_attrs["retry_history"] == [0]
    client = MlflowClient()
    dead_run = client.get_run(dead.system_attrs[RUN_ID])
    assert dead_run.info.status == "KILLED"
    retry_run = client.get_run(retry.system_attrs[RUN_ID])
    assert retry_run.info.status == "FINISHED" and retry_run.data.tags["harness.tune.retry_of_trial"] == "0"
    assert not [r for r in _runs(client) if r.info.status == "RUNNING"]


def _has_study(storage: str) -> bool:
    try:
        return bool(optuna.get_all_study_names(storage))
    except Exception:  # the worker is still creating the schema
        return False


# ------------------------------------------------------------------------------- PostgreSQL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on 127.0.0.1 (Debian's `postgresql` package; .ci/run installs
    it). PostgreSQL refuses to run as root, so as root it runs as `nobody`. Yields a URL prefix."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: apt-get install postgresql")
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="pg-"))
    if as_user:
        shutil.chown(root, "nobody")
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg  # SQLAlchemy 2.1's default driver for postgresql:// URLs

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:  # CREATE DATABASE cannot run in a transaction
            conn.execute("CREATE DATABASE optuna")
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _acquired(lock) -> threading.Event:
    """Set once ``lock`` is acquired, in a thread of its own (a test that fails does not hang)."""
    got = threading.Event()
    threading.Thread(target=lambda: (lock.acquire(), got.set()), daemon=True).start()
    return got


def _lock_excludes_a_second_worker(storage: str) -> None:
    first = tune.BudgetLock(storage, "s").acquire()
    second = tune.BudgetLock(storage, "s")
    got = _acquired(second)
    assert not got.wait(1.0)  # the second worker waits while the first checks the budget
    other = tune.BudgetLock(storage, "another study")
    assert _acquired(other).wait(10)  # another study's workers do not
    other.release()
    first.release()
    first.release()  # released once: a second call does nothing
    assert got.wait(10)
    second.release()


def test_the_budget_lock_lets_one_worker_at_a_time_check_sqlite(tmp_path):
    _lock_excludes_a_second_worker(f"sqlite:///{tmp_path / 'optuna.db'}")


def test_the_budget_lock_lets_one_worker_at_a_time_check_postgresql(postgres):
    _lock_excludes_a_second_worker(f"{postgres}/optuna")


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` with a PostgreSQL backend store and local artifacts; yields its URL."""
    (tmp_path / "mlartifacts").mkdir()
    with serve_mlflow(f"{postgres}/mlflow", str(tmp_path / "mlartifacts")) as url:
        yield url


@pytest.mark.slow
def test_three_workers_share_a_study_on_postgresql(postgres, mlflow_server, tune_phantom, tiny_pipeline_dir,
                                                    tmp_path, monkeypatch):
    n_trials = 5  # more than the workers: some run two
    storage = f"{postgres}/optuna"
    argv = _argv(tune_phantom, tiny_pipeline_dir, storage, n_trials, "--register", "false", steps=(1, 1))
    env = _env(MLFLOW_TRACKING_URI=mlflow_server, HARNESS_CACHE_DIR=str(tmp_path / ".cache"))
    workers = [subprocess.Popen([sys.executable, "-m", "harness.tune", *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"worker{i}.log", "w"))
               for i in range(3)]
    for i, worker in enumerate(workers):
        assert worker.wait(timeout=600) == 0, (tmp_path / f"worker{i}.log").read_text()[-5000:]

    trials = _study(storage).trials
    # Exactly the trials asked for, each once, each finished.
    assert [t.number for t in trials] == list(range(n_trials))
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    client = MlflowClient(mlflow_server)
    runs = _runs(client)
    study_runs = [r for r in runs if r.data.tags.get("harness.entry_point") == "tune"]
    assert len(study_runs) == 3 and {r.info.status for r in study_runs} == {"FINISHED"}
    assert sum(r.data.metrics["worker_trials"] for r in study_runs) == n_trials
    assert sum(r.data.metrics["worker_trials"] > 0 for r in study_runs) >= 2  # the work was shared
    # Every trial has its own MLflow run, under one of the workers' study runs.
    run_ids = [t.system_attrs[RUN_ID] for t in trials]
    assert len(set(run_ids)) == n_trials
    for trial, run_id in zip(trials, run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["harness.tune.trial"] == str(trial.number)
        assert run.data.tags["mlflow.parentRunId"] in {r.info.run_id for r in study_runs}
        assert run.data.tags["state"] == trial.state.name
    trial_runs = [r for r in runs if "harness.tune.trial" in r.data.tags]
    assert sorted(r.info.run_id for r in trial_runs) == sorted(run_ids)  # no stray or duplicate trial runs
    # The best trial was scored on the test split, by the last worker to finish.
    assert any("harness.tune.test_classify_run" in r.data.tags for r in study_runs)
