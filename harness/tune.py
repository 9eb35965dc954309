"""Tune an arm's learning rate and step count against the AUC its synthetic images are worth.

An Optuna study: each trial fine-tunes the arm (``harness.finetune``) with a learning rate drawn
on a log scale and a step count drawn from a range; at every ``--eval_every`` checkpoint it
generates a synthetic data set (``harness.generate``) and trains a classifier on it
(``harness.classify``), scored on the real data's VALID split. That macro AUC is the trial's
intermediate value (a ``MedianPruner`` stops hopeless trials early) and, at the last step, its
objective. ``--objective adherence`` judges a checkpoint by its images' prompt adherence instead
(``harness.checks.prompt_adherence`` under one classifier trained on the real train split for the
whole study): no classifier training per checkpoint, so judging and pruning cost seconds. The test
split is never used while tuning: once the study is done, the best trial's synthetic data alone is
scored on it (a classifier trained on it, whatever the objective), and its checkpoint is registered.

    python -m harness.tune --arm dreambooth --n_trials 12                  # SQLite file, one worker
    mlflow run . -e tune -P arm=text_encoder --env-manager local
    # several workers, on one or more machines, share one study on PostgreSQL (the password
    # from PGPASSWORD or ~/.pgpass, never in the URL: it would show in `ps` and in MLflow):
    python -m harness.tune --arm dreambooth --n_trials 40 --study_name db-lr \\
        --storage postgresql://user@dbhost/optuna                          # start it N times

MLflow: a study run per worker process; under it one run per trial (Optuna's params, value, state
and user attributes via ``optuna_integration.MLflowCallback``), and under that the trial's
fine-tune run with its generate and classify runs (their ids are tags of the trial run). The study
run logs the best parameters and value, the optimization history, parameter importances,
intermediate values, the trials table, trials per hour and the time pruning saved.

Before the first trial, what every trial needs is checked once: the storage opens, the pretrained
model resolves, the data's train, valid and test splits load. A study in which no trial completes
ends FAILED with the trials' most common error.

Fault tolerance: the study lives in the storage (``load_if_exists``), so rerunning the command
resumes it; a trial that raises is recorded FAILED (its MLflow runs end FAILED) and the study goes
on; a worker that dies stops its trial's heartbeat, and after ``--grace_period`` seconds the next
worker to start a trial marks it FAILED, ends its MLflow runs KILLED and queues it again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import math
import re
import tempfile
import time
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from optuna_integration import MLflowCallback
from optuna_integration.mlflow.mlflow import RUN_ID_ATTRIBUTE_KEY  # where MLflowCallback looks for a trial's run

from harness import checks, classify, finetune, generate, tracking
from harness.classifier import CLASSIFIERS
from harness.classify import classifier_from_run
from harness.config import ConfigError, StepConfig, param, parse
from harness.artifacts import local_spec
from harness.data import DataSpec, load_table
from harness.metrics import nan_mean

log = logging.getLogger(__name__)

# --objective -> the trial's value as Optuna's MLflow callback logs it; per checkpoint it is logged
# as checkpoint_<name> (step = fine-tuning step)
OBJECTIVES = {"auc": "valid_auc_macro", "adherence": "adherence_mean"}
TAG = "harness.tune."


@dataclass
class TuneConfig(StepConfig):
    arm: str = param("dreambooth", "the arm whose learning rate and steps are searched",
                     choices=sorted(finetune.ARMS), project=True)
    data: str = param("phantom", "real data: FORMAT:PATH or 'phantom' (train, valid and test)", project=True)
    pretrained_model: str = param("base", project=True)
    study_name: str = param("", "default: <arm>-<data> (-adherence with that objective); workers sharing a study "
                            "use the same", project=True)
    storage: str = param("sqlite:///optuna.db", "an SQLAlchemy URL: a local SQLite file (default, no server) or "
                         "postgresql://user@host/db for several workers (its password from PGPASSWORD or "
                         "~/.pgpass, never in the URL)", project=True)
    n_trials: int = param(10, "trials in the whole study, across all workers", project=True)
    timeout: float = param(0.0, "this worker stops starting trials after N s (0 = never)", key=False)
    # The search space, around where the embedded base starts to draw chests (at 1e-4 / 200 steps it
    # draws textures). On a GPU with SD 1.5 search e.g. 1e-6..1e-5 and 2000-20000 steps, eval_every 2000.
    lr_min: float = param(1e-4, project=True)
    lr_max: float = param(3e-3, project=True)
    steps_min: int = param(200, project=True)
    steps_max: int = param(800, project=True)
    eval_every: int = param(200, "judge a checkpoint every N steps (the pruner's intermediate values); steps are "
                            "multiples", project=True)
    # Per trial, as in the pipeline's defaults (harness.pipeline): too few images per prompt measure
    # nothing, even from a perfect generator (`bench.synthetic_ratio --oracle`; README).
    batch_size: int = param(8)
    n_per_prompt: int = param(200, "synthetic images per prompt and checkpoint", project=True)
    prompts: str = param("data", "as the pipeline's --prompts", choices=["disease", "data"], project=True)
    num_inference_steps: int = param(10)
    classifier: str = param("small_cnn", choices=CLASSIFIERS)
    epochs: int = param(8, project=True)
    seed: int = param(0, "fine-tuning, generation and classifier seed (every trial)", project=True)
    sampler_seed: int = param(-1, "TPE sampler seed; -1 = a fresh one per worker (workers with one seed propose "
                              "the same trials)")
    objective: str = param("auc", "what judges a checkpoint: auc = valid-split macro AUC of a classifier trained "
                           "on its images; adherence = their prompt adherence under a real-trained classifier "
                           "(seconds)", choices=sorted(OBJECTIVES), project=True)
    pruner: str = param("median", choices=["median", "none"], project=True)
    n_startup_trials: int = param(2, "trials finished before pruning starts")
    heartbeat_interval: int = param(60, "seconds between a running trial's heartbeats", key=False)
    grace_period: int = param(0, "seconds without heartbeat before a trial counts as dead (0 = 2 x "
                              "heartbeat_interval)", key=False)
    max_retry: int = param(1, "times a dead worker's trial is queued again", key=False)
    register: bool = param(True, "register the best trial's checkpoint", project=True, key=False)
    promote: bool = param(False, "then give it the 'champion' alias if it beats the current one "
                          "(registry.promote)", key=False)
    threads: int = param(0, "torch CPU threads for generate/classify (0 = default)", key=False)
    launcher: str = param("", "start each fine-tune through this launcher, e.g. 'accelerate launch --num_processes 8' "
                          "(data parallel); empty = in the step's own process", project=True, key=False)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)
    # --objective adherence: the classify run whose real-trained classifier judges (set by run())
    adherence_classifier_run: str = dataclasses.field(default="", init=False)

    def check(self) -> None:
        if not 0 < self.lr_min <= self.lr_max:
            raise ConfigError(f"need 0 < lr_min <= lr_max, got {self.lr_min} and {self.lr_max}")
        if self.eval_every < 1 or self.steps_min < self.eval_every or self.steps_max < self.steps_min:
            raise ConfigError(f"need 1 <= eval_every <= steps_min <= steps_max, got {self.eval_every}, "
                              f"{self.steps_min}, {self.steps_max}")
        if self.steps_min % self.eval_every or self.steps_max % self.eval_every:
            raise ConfigError(f"steps_min ({self.steps_min}) and steps_max ({self.steps_max}) must be multiples of "
                              f"eval_every ({self.eval_every}): every trial ends on a judged checkpoint")
        self.at_least(1, "n_trials", "heartbeat_interval", "batch_size", "n_per_prompt", "num_inference_steps",
                      "epochs")
        self.not_negative("max_retry", "grace_period", "threads", "timeout")
        if not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", self.storage):
            raise ConfigError(f"--storage {tracking.redact_url(self.storage)!r}: expected an SQLAlchemy URL, "
                              "sqlite:///FILE or postgresql://...")
        try:
            DataSpec.parse(self.data)  # an unknown format fails here, not in the first trial
        except ValueError as err:
            raise ConfigError(f"--data: {err}") from None
        data = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.data).strip("_")
        suffix = "" if self.objective == "auc" else f"-{self.objective}"  # a study has one objective
        self.study_name = self.study_name or f"{self.arm}-{data}{suffix}"


def parse_args(argv=None) -> TuneConfig:
    return parse(TuneConfig, argv, prog="python -m harness.tune")


# ------------------------------------------------------------------------ the steps of a trial

def finetune_config(args: TuneConfig, learning_rate: float, steps: int) -> finetune.FinetuneConfig:
    return finetune.FinetuneConfig(arm=args.arm, data=args.data, pretrained_model=args.pretrained_model,
                                   steps=steps, learning_rate=learning_rate, batch_size=args.batch_size,
                                   seed=args.seed, checkpoint_every=args.eval_every,
                                   # one row of sample images per checkpoint, drawn like the judged ones
                                   grid_seeds=1, grid_steps=args.num_inference_steps,
                                   launcher=args.launcher)


def generate_config(args: TuneConfig, finetune_run: str, step: int) -> generate.GenerateConfig:
    return generate.GenerateConfig(run_id=finetune_run, step=step, n_per_prompt=args.n_per_prompt,
                                   prompts=args.prompts, num_inference_steps=args.num_inference_steps,
                                   seed=args.seed, threads=args.threads)


def classify_config(args: TuneConfig, train: str, test_split: str = "test") -> classify.ClassifyConfig:
    return classify.ClassifyConfig(train=train, test=args.data, test_split=test_split, model=args.classifier,
                                   epochs=args.epochs, seed=args.seed, threads=args.threads)


# ----------------------------------------------------------------------------------- storage


def open_study(args) -> optuna.Study:
    """Create or load (``load_if_exists``) the study, with heartbeats so a dead worker's trial is
    failed and queued again instead of staying RUNNING."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    storage = None
    for attempt in range(5):  # workers started together race to create Optuna's tables: retry
        try:
            with warnings.catch_warnings():  # heartbeats and the retry callback are "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    args.storage, heartbeat_interval=args.heartbeat_interval,
                    grace_period=args.grace_period or None,
                    heartbeat_stale_trial_callback=RetryDeadWorkerTrial(max_retry=args.max_retry))
            break
        except (IntegrityError, ProgrammingError) as err:  # "already exists" from a concurrent CREATE
            if attempt == 4:
                raise
            log.info(f"storage not ready ({type(err).__name__}), retrying")
            time.sleep(1 + attempt)
    sampler = optuna.samplers.TPESampler(seed=None if args.sampler_seed < 0 else args.sampler_seed,
                                         constant_liar=True)  # workers in parallel spread their trials
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=args.n_startup_trials) if args.pruner == "median"
              else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=args.study_name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="maximize", load_if_exists=True)


class BudgetLock:
    """Held by one worker from its budget check until its next trial exists: Optuna creates a
    trial without looking at a budget, so workers that checked together would both start the last
    trial. A PostgreSQL / MySQL advisory lock named after the study, a file lock next to an SQLite
    file; released when the worker's connection or process ends, so a dead worker holds nothing."""

    def __init__(self, storage: str, study_name: str):
        import sqlalchemy

        self.url = sqlalchemy.engine.make_url(storage)
        self.key = zlib.crc32(f"harness.tune:{study_name}".encode())
        self.name = f"harness.tune:{study_name}"[:64]  # MySQL's limit for a lock name
        self._engine = (sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
                        if self.url.get_backend_name() in ("postgresql", "mysql") else None)
        self._held = None

    def acquire(self) -> "BudgetLock":
        from sqlalchemy import text

        backend = self.url.get_backend_name()
        if backend == "postgresql":
            self._held = self._engine.connect()
            self._held.execute(text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        elif backend == "mysql":
            self._held = self._engine.connect()
            self._held.execute(text("SELECT GET_LOCK(:n, -1)"), {"n": self.name})
        elif backend == "sqlite" and self.url.database not in (None, "", ":memory:"):
            self._held = open(f"{self.url.database}.tune-lock-{self.key:08x}", "a")  # one per study
            fcntl.flock(self._held, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        from sqlalchemy import text

        held, self._held = self._held, None
        if held is None:
            return
        backend = self.url.get_backend_name()
        try:
            if backend == "postgresql":
                held.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            elif backend == "mysql":
                held.execute(text("SELECT RELEASE_LOCK(:n)"), {"n": self.name})
            else:
                fcntl.flock(held, fcntl.LOCK_UN)
        finally:
            held.close()


def _releasing_first(objective, lock: BudgetLock):
    """The objective, releasing ``lock`` as it starts: its trial exists, the budget counts it."""
    def run(trial: optuna.Trial) -> float:
        lock.release()
        return objective(trial)

    return run


def trials_used(study: optuna.Study) -> int:
    """Trials that count against ``--n_trials``: every trial started, except queued (WAITING) ones
    and dead workers' trials that were queued again (their retry counts instead)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in _retry_history(t)}
    return sum(t.state != TrialState.WAITING and t.number not in retried for t in trials)


def _retry_history(trial: optuna.trial.FrozenTrial) -> list[int]:
    """Numbers of the dead-worker trials this trial retries, the original first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retry_history(trial)


def _fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and queue again) the trials of dead workers now; Optuna itself does it only when
    the next trial starts, after the budget check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


class RetryDeadWorkerTrial(RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a heartbeat-stale trial, which also ends the MLflow runs its dead worker
    left RUNNING (the trial's run and every run under it) as KILLED."""

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run_id = trial.system_attrs.get(RUN_ID_ATTRIBUTE_KEY)
        if run_id:
            _kill_run_tree(MlflowClient(), run_id, f"worker of trial {trial.number} stopped its heartbeat")
        super().__call__(study, trial)


def _kill_run_tree(client: MlflowClient, run_id: str, reason: str) -> None:
    run = client.get_run(run_id)
    for child in client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'"):
        _kill_run_tree(client, child.info.run_id, reason)
    if run.info.status == "RUNNING":
        client.set_tag(run_id, tracking.TAG_ERROR, reason)
        client.set_terminated(run_id, status="KILLED")


class TrialRunCallback(MLflowCallback):
    """``optuna_integration``'s MLflowCallback (the trial's params, value, state and user
    attributes), written into the trial's own run: the objective opens that run and records its
    id where the callback looks (as the callback's ``track_in_mlflow`` does). The callback reopens
    the run under the trial's number and ends it FINISHED; the run's own name and end status
    (FAILED for a crashed trial) are put back."""

    def __init__(self, metric_name: str):
        with warnings.catch_warnings():  # deprecated in optuna-integration 4.9, removed in 6.0 (pinned: 5.0)
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(metric_name=metric_name, create_experiment=False, mlflow_kwargs={"nested": True})

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        client = MlflowClient()
        run_id = trial.system_attrs.get(RUN_ID_ATTRIBUTE_KEY)
        before = client.get_run(run_id).info if run_id else None
        super().__call__(study, trial)
        if before is not None:
            client.update_run(run_id, status=before.status, name=before.run_name)


# --------------------------------------------------------------------------------- one trial


def score_checkpoint(args, finetune_run: str, step: int) -> tuple[float, str, str | None]:
    """Generate from the checkpoint at ``step`` and judge the images by ``--objective``: the macro
    AUC on the real VALID split of a classifier trained on them, or their mean prompt adherence
    under ``args.adherence_classifier_run``. Returns the value, the generate and the classify run
    id (None for adherence: no classifier is trained)."""
    generated = generate.run(generate_config(args, finetune_run, step))
    gen, synthetic = generated.run_id, generated.artifacts["data"]  # a URI: any worker reads it
    if args.objective == "adherence":
        adherence = nan_mean(checks.prompt_adherence(classifier_from_run(args.adherence_classifier_run), local_spec(synthetic)))
        if not math.isfinite(adherence):
            raise ValueError(f"prompt adherence of {synthetic} is {adherence}: no finding is both named and not "
                             "named by its prompts; generate more images")
        return adherence, gen, None
    result = classify.run(classify_config(args, synthetic, test_split="valid"))
    judged, auc = result.run_id, result.metrics.get("auc_macro", math.nan)
    if not math.isfinite(auc):
        raise ValueError(f"macro AUC on the valid split of {args.data} is {auc} (classify run {judged}): "
                         "no label has both classes there; use a larger valid split")
    return auc, gen, judged


def make_objective(args, study_run_id: str):
    def objective(trial: optuna.Trial) -> float:
        learning_rate = trial.suggest_float("learning_rate", args.lr_min, args.lr_max, log=True)
        steps = trial.suggest_int("steps", args.steps_min, args.steps_max, step=args.eval_every)
        start = time.perf_counter()
        pruned_at = None
        with tracking.tracked_run(f"trial-{trial.number}", nested=True,
                                  tags={TAG + "study": args.study_name, TAG + "trial": str(trial.number),
                                        TAG + "study_run": study_run_id}) as run:
            run_id = run.info.run_id
            # Where optuna_integration's MLflowCallback finds the trial's run (its track_in_mlflow does the same).
            trial.storage.set_trial_system_attr(trial._trial_id, RUN_ID_ATTRIBUTE_KEY, run_id)
            mlflow.log_params(trial.params)  # the same values the callback logs at the end
            retried = _retry_history(_frozen(trial))
            if retried:
                mlflow.set_tag(TAG + "retry_of_trial", str(retried[0]))
            values = {}

            def on_checkpoint(step: int, finetune_run: str) -> bool:
                nonlocal pruned_at
                value, gen, judged = score_checkpoint(args, finetune_run, step)
                values[step] = value
                client = MlflowClient()  # the active run is the fine-tune's: address the trial's by id
                client.log_metric(run_id, f"checkpoint_{OBJECTIVES[args.objective]}", value, step=step)
                client.set_tag(run_id, f"{TAG}generate_run.{step:06d}", gen)
                if judged:
                    client.set_tag(run_id, f"{TAG}classify_run.{step:06d}", judged)
                trial.set_user_attr("generate_runs", {**trial.user_attrs.get("generate_runs", {}), str(step): gen})
                trial.report(value, step)
                if step < steps and trial.should_prune():
                    pruned_at = step
                    return True  # finetune stops here; its run FINISHES at this step
                return False

            finetune_run = finetune.run(finetune_config(args, learning_rate, steps), on_checkpoint).run_id
            mlflow.set_tag(TAG + "finetune_run", finetune_run)
            trial.set_user_attr("finetune_run", finetune_run)
            seconds = time.perf_counter() - start
            trial.set_user_attr("seconds", seconds)
            if pruned_at is not None:
                # Fine-tuning steps and checkpoint judging both scale with the step count.
                saved = seconds * (steps / pruned_at - 1)
                trial.set_user_attr("pruned_at_step", pruned_at)
                trial.set_user_attr("saved_steps", steps - pruned_at)
                trial.set_user_attr("saved_seconds", saved)
                mlflow.log_metrics({"pruning_saved_seconds": saved, "pruning_saved_steps": steps - pruned_at})
        if pruned_at is not None:
            raise optuna.TrialPruned(f"{OBJECTIVES[args.objective]} {values[pruned_at]:.3f} at step {pruned_at} "
                                     "is below the median")
        return values[steps]

    return objective


# ----------------------------------------------------------------------------------- the study


def run(config: TuneConfig) -> tracking.StepResult:
    """Run this worker's share of the study (until ``--n_trials`` trials exist in it); the result
    is this worker's study run."""
    args = config
    with tracking.tracked_run(f"tune-{args.study_name}", args.experiment,
                              tags={"harness.entry_point": "tune", TAG + "study": args.study_name,
                                    TAG + "storage": tracking.redact_url(args.storage)}) as active:
        _refuse_logged_password(args, active.info.run_id)
        tracking.log_params({k: tracking.redact_url(v) if k == "storage" else v
                             for k, v in args.params().items() if k != "experiment"})
        study = reach_storage(args)
        check_trial_inputs(args)
        if args.objective == "adherence":
            args.adherence_classifier_run = adherence_classifier(study, args)
        start, ran = time.perf_counter(), 0
        objective = _recording_errors(make_objective(args, active.info.run_id))
        callbacks = [TrialRunCallback(OBJECTIVES[args.objective])]
        # One trial per optimize call, checking the budget first: Optuna's MaxTrialsCallback checks
        # after a trial and counts only finished ones, so parallel workers would overshoot.
        lock = BudgetLock(args.storage, args.study_name)
        while True:
            lock.acquire()
            try:
                _fail_stale_trials(study)  # a dead worker's trial must not count as running
                if trials_used(study) >= args.n_trials:
                    break
                if args.timeout and time.perf_counter() - start > args.timeout:
                    log.info(f"--timeout {args.timeout} s reached")
                    break
                study.optimize(_releasing_first(objective, lock), n_trials=1, catch=(Exception,),
                               callbacks=callbacks, gc_after_trial=True)
            finally:
                lock.release()
            ran += 1
        hours = (time.perf_counter() - start) / 3600
        mlflow.log_metrics({"worker_trials": ran, "trials_per_hour": ran / hours if hours > 0 else 0.0})
        best = summarize(study, args)
        if best is not None:
            test_run = evaluate_best(study, best, args)
            if args.register:
                register_best(best, test_run, args.promote)
        fail_if_none_completed(study)
    return tracking.StepResult.of(active.info.run_id, trials="trials.csv")


def main(argv=None) -> str:
    """The command line's entry: returns the MLflow run id of this worker's study run."""
    return run(parse_args(argv)).run_id


class StudyFailed(RuntimeError):
    """No trial of the study completed."""


def _refuse_logged_password(args, run_id: str) -> None:
    """A password in --storage: under ``mlflow run`` the CLI has already stored it as this run's
    ``storage`` parameter, verbatim (it logs every -P before the entry point starts), and MLflow
    cannot change or delete a logged parameter; on a command line it shows in ``ps``."""
    if tracking.redact_url(args.storage) == args.storage:
        return
    logged = MlflowClient().get_run(run_id).data.params.get("storage", "")
    if tracking.redact_url(logged) != logged:
        raise ValueError(f"run {run_id} holds the storage password in plain text: `mlflow run` logged the -P "
                         "storage URL as given. Delete the run (`mlflow runs delete --run-id ...`, then `mlflow "
                         "gc`) and pass the password through PGPASSWORD or ~/.pgpass, with "
                         "storage=postgresql://user@host/db")
    log.warning("the --storage URL holds a password, which any user of this host can read in `ps`; "
                "pass it through PGPASSWORD or ~/.pgpass instead (it is not logged to MLflow)")


def reach_storage(args) -> optuna.Study:
    """``open_study``, with an error that names the storage (without its password) when it cannot
    be reached, before any trial starts."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return open_study(args)
    except (SQLAlchemyError, ImportError) as err:
        raise ConnectionError(f"optuna storage {tracking.redact_url(args.storage)} cannot be opened: "
                              f"{tracking.redact_url(f'{type(err).__name__}: {err}')}") from None


def check_trial_inputs(args) -> None:
    """What every trial needs, checked once before the first one (else each trial fails on it in
    turn): the pretrained model resolves (``harness.pretrained.resolve``: registered, downloaded
    or a pipeline directory) and the data's train, valid and test splits load."""
    from harness.pretrained import resolve

    resolve(args.pretrained_model)
    for split in ("train", "valid", "test"):  # fine-tuning, trial scoring, the best trial's one test
        load_table(local_spec(args.data), split)


def _recording_errors(objective):
    """The objective, recording a failed trial's error as its user attribute ``error`` (Optuna
    keeps only a log line), for the study's verdict when no trial completes."""
    def recorded(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except optuna.TrialPruned:
            raise
        except Exception as err:  # a step's ConfigError included: that trial fails, not the worker
            trial.set_user_attr("error", tracking.redact_url(f"{type(err).__name__}: {err}")[:2000])
            raise

    return recorded


def fail_if_none_completed(study: optuna.Study) -> None:
    """Raise ``StudyFailed`` when no trial of the study completed and none is still running
    (another worker may yet complete one), naming the failed trials' most common error."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.COMPLETE, TrialState.RUNNING) for t in trials):
        return
    failed = [t for t in trials if t.state == TrialState.FAIL]
    errors = Counter(t.user_attrs.get("error", "no error recorded (its worker died?)") for t in failed)
    states = ", ".join(f"{n} {state.lower()}" for state, n in Counter(t.state.name for t in trials).items())
    message = f"no trial of study {study.study_name!r} completed ({states or 'no trials'})"
    if errors:
        error, n = errors.most_common(1)[0]
        message += f"; {n} of {len(failed)} failed trial(s) with {error}"
    raise StudyFailed(message)


def adherence_classifier(study: optuna.Study, args) -> str:
    """The classify run whose real-trained classifier scores prompt adherence: one per study (a
    study attribute, so workers and resumes share it), the pipeline's real baseline (train split,
    model selection on the valid split; the test AUC it logs is not used by the study)."""
    run_id = study.user_attrs.get("adherence_classifier_run")
    if run_id is None:
        run_id = classify.run(classify_config(args, args.data)).run_id
        study.set_user_attr("adherence_classifier_run", run_id)
    mlflow.set_tag(TAG + "adherence_classifier_run", run_id)
    return run_id


def summarize(study: optuna.Study, args) -> optuna.trial.FrozenTrial | None:
    """The study so far on this worker's run: counts, best trial, pruning savings, plots. Returns
    the best trial once no trial is running any more (it is then scored once on the test split)."""
    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    mlflow.log_metrics({f"n_trials_{k}": v for k, v in counts.items()} | {"n_trials": len(trials)})
    pruned = [t for t in trials if t.state == TrialState.PRUNED and "saved_seconds" in t.user_attrs]
    saved = sum(t.user_attrs["saved_seconds"] for t in pruned)
    spent = sum(t.user_attrs.get("seconds", 0.0) for t in trials)
    mlflow.log_metrics({"pruning_saved_seconds": saved,
                        "pruning_saved_steps": sum(t.user_attrs["saved_steps"] for t in pruned),
                        "pruning_saved_fraction": saved / (spent + saved) if spent + saved else 0.0,
                        "trial_seconds_total": spent})
    with tempfile.TemporaryDirectory() as tmp:
        table = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration"))
        table.to_csv(Path(tmp) / "trials.csv", index=False)
        mlflow.log_artifact(str(Path(tmp) / "trials.csv"))
    _log_plots(study)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        log.info("no trial completed yet")
        return None
    best = study.best_trial
    mlflow.log_params({f"best_{k}": v for k, v in best.params.items()} | {"best_trial": best.number})
    name = OBJECTIVES[args.objective]
    mlflow.log_metric(f"best_{name}", best.value)
    mlflow.set_tag(TAG + "best_trial_run", best.system_attrs.get(RUN_ID_ATTRIBUTE_KEY, ""))
    log.info(f"best trial {best.number}: {name} {best.value:.4f} with {best.params}")
    if counts["running"]:
        log.info(f"{counts['running']} trial(s) still running: the last worker to finish scores the best "
              "trial on the test split")
        return None
    return best


def evaluate_best(study: optuna.Study, best, args) -> str:
    """The one look at the test split: a classifier on the best trial's last synthetic data set."""
    done = study.user_attrs.get("test_evaluation", {})
    if done.get("trial") == best.number:  # another worker (or an earlier run) already did it
        test_run = done["classify_run"]
    else:
        gen = best.user_attrs["generate_runs"][str(best.params["steps"])]
        synthetic = generate.generated_spec(gen)  # a URI: any worker reads it
        test_run = classify.run(classify_config(args, synthetic)).run_id
        study.set_user_attr("test_evaluation", {"trial": best.number, "classify_run": test_run})
    metrics = MlflowClient().get_run(test_run).data.metrics
    mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items() if k.startswith(("auc_", "acc_"))
                        and "_ci_" not in k})
    mlflow.set_tag(TAG + "test_classify_run", test_run)
    log.info(f"best trial {best.number} on the test split: macro AUC {metrics.get('auc_macro', math.nan):.4f}")
    return test_run


def register_best(best, test_run: str, promote: bool = False) -> None:
    """Register the best trial's final checkpoint in the model registry (idempotent)."""
    from registry.register import register_checkpoint

    step = best.params["steps"]
    version = register_checkpoint(best.user_attrs["finetune_run"], step, classify_run_id=test_run,
                                  generate_run_id=best.user_attrs["generate_runs"][str(step)])
    mlflow.set_tag(TAG + "registered", f"models:/{version.name}/{version.version}")
    log.info(f"registered models:/{version.name}/{version.version}")
    if promote:
        from registry.promote import promote as promote_version

        decision = promote_version(version.name, version=version.version)
        mlflow.set_tag(TAG + "promotion", decision.reason[:5000])
        log.info(f"promotion: {decision.reason}")


def _log_plots(study: optuna.Study) -> None:
    """Optuna's matplotlib plots (no plotly needed); importances need two finished trials."""
    from optuna.visualization import matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" warnings of optuna.visualization.matplotlib
        for name, plot in (("optimization_history", plots.plot_optimization_history),
                           ("param_importances", plots.plot_param_importances),
                           ("intermediate_values", plots.plot_intermediate_values)):
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as err:
                log.info(f"no {name} plot yet: {err}")
                continue
            figure = getattr(axes, "figure", None) or axes.flat[0].figure
            mlflow.log_figure(figure, f"plots/{name}.png")
            import matplotlib.pyplot as plt

            plt.close(figure)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
