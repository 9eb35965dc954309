"""The whole study in one run: fine-tune each arm -> per checkpoint generate, classify and check,
against a classifier trained on real images; prints the write-up's table.

    python -m harness.pipeline                     # the embedded default, CPU-sized
    mlflow run . -e pipeline --env-manager local   # the same, as an MLflow Project step
    python -m harness.pipeline --steps 50000 --eval_steps 30000,50000 --n_per_prompt 1000   # the write-up's

Each step is the entry point's own ``run(config)``, as a nested MLflow run of this one. As in MLflow's
multistep example, a step that already FINISHED with identical parameters, code and data is
reused instead of rerun (tag ``harness.step_key``); ``--force true`` redoes everything.
Each judged checkpoint is registered as a version of ``cxr-sd-<data>`` (``registry.register``) and
the best one gets the ``champion`` alias (``registry.promote``). At each judged step the first arm
is compared with every other on the same real test images: the paired bootstrap CI of the macro-AUC
difference (metrics ``macro_auc_diff_<first>_minus_<arm>_<step>`` with ``_ci_low`` / ``_ci_high``,
table ``arm_differences.md``).

Steps that do not depend on each other (the arms, the real baseline) run side by side in ``--jobs``
worker processes, each with ``cpu_count // jobs`` torch threads: small models leave cores idle, so on
2 CPU cores two 1-thread processes train the embedded UNet faster than one 2-thread process
(``python -m bench.parallel_steps``; README). A worker dies with the
pipeline process (``kill -9`` included), and a rerun first stops any step process that a dead
pipeline left running, so two processes never train the same fine-tune.

Every argument is checked before anything runs: the pipeline's own, and each step's config as the
pipeline makes it; the data's labels must give metric names (``harness.metrics.snake``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import pandas as pd
import psutil
from mlflow.tracking import MlflowClient

from harness import checks, classify, finetune, generate, tracking
from harness.compare import difference_table
from harness.metrics import check_metric_names, checks_row, classify_row
from harness.classifier import CLASSIFIERS
from harness.config import ConfigError, StepConfig, param, parse
from harness.artifacts import local_spec
from harness.data import DataSpec, load_table
from registry.promote import promote
from registry.register import model_name, register_checkpoint

STEP_KEY = "harness.step_key"
CODE_DIRS = ("harness", "registry")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig(StepConfig):
    data: str = param("phantom", "real data: FORMAT:PATH or 'phantom'", project=True)
    pretrained_model: str = param("base", project=True)
    arms: str = param("dreambooth,text_encoder,unet_text_encoder", "comma-separated arms; the first is compared "
                      "with each other", project=True)
    # CPU-sized defaults (the write-up compared 30000 and 50000 iterations on a GPU): the small
    # embedded base wants 2e-3 (a real SD checkpoint ~5e-6), and more steps keep helping (README:
    # quality table); one judged checkpoint per arm keeps the CPU time in check.
    steps: int = param(1200, project=True)
    eval_steps: str = param("", "checkpoints to judge, comma-separated (\"600,1200\": the write-up's two "
                            "per arm); empty = the last, --steps", project=True)
    learning_rate: float = param(2e-3, "for the embedded base; a real SD wants ~5e-6", project=True)
    batch_size: int = param(8)
    # Fewer images cannot show anything: even a perfect generator (the phantom renderer) trains a
    # classifier near chance from a few dozen per prompt (`bench.synthetic_ratio --oracle`; README).
    n_per_prompt: int = param(200, "synthetic images per disease prompt (data prompts: as many in all, x6)",
                              project=True)
    # Data prompts (label sets drawn from the real train split) show a classifier the findings'
    # co-occurrence, which single-finding prompts never do (README: the perfect generator's figures).
    prompts: str = param("data", "generate's prompts: data (the real label sets) or disease (the write-up's "
                         "five + no finding)", choices=["disease", "data"], project=True)
    # Few DPM-Solver steps: more did not change the synthetic AUC beyond its CI (README).
    num_inference_steps: int = param(6)
    # A UNet fine-tuned longer draws the findings without as much push: at 4800 steps 3 does as well
    # as 5 or better, at 1200 it does worse (README: quality table).
    guidance_scale: float = param(generate.GenerateConfig.guidance_scale, "generate's classifier-free guidance",
                                  project=True)
    classifier: str = param("small_cnn", choices=CLASSIFIERS)
    epochs: int = param(8, project=True)
    seed: int = param(0, project=True)
    promote_margin: float = param(0.0, "AUC a checkpoint must gain to take champion")
    registered_model: str = param("", "registered model for the judged checkpoints (default: "
                                  "cxr-sd-<data>-<path hash>, registry.register.model_name); name it when "
                                  "workers see the data under other paths")
    force: bool = param(False, "rerun steps even when a finished one matches", project=True, key=False)
    jobs: int = param(0, "worker processes for independent steps; 0 = 2 on a CPU-only machine with 2+ cores, "
                      "else 1 (1 = every step in this process, one after another)", project=True, key=False)
    launcher: str = param("", "start each fine-tune through this launcher, e.g. 'accelerate launch --num_processes 8' "
                          "(data parallel); empty = in the step's own process", project=True, key=False)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)
    eval: list[int] = field(init=False)  # eval_steps, parsed and sorted

    def check(self) -> None:
        # Everything is checked here, before the first step: a bad value found by a later step would
        # only show after the fine-tunes (hours on a real budget).
        self.not_negative("jobs", "seed")
        self.at_least(1, "steps", "batch_size", "n_per_prompt", "num_inference_steps", "epochs")
        self.positive("learning_rate")
        if not math.isfinite(self.promote_margin):
            raise ConfigError(f"--promote_margin {self.promote_margin}: must be a number")
        try:
            DataSpec.parse(self.data)
        except ValueError as err:
            raise ConfigError(f"--data: {err}") from None
        arms = self.arm_list()
        unknown = sorted(set(arms) - set(finetune.ARMS))
        if unknown or len(set(arms)) != len(arms):
            raise ConfigError(f"--arms {self.arms!r}: each of {', '.join(sorted(finetune.ARMS))} at most once"
                              + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
        try:
            self.eval = sorted({int(s) for s in self.eval_steps.split(",") if s.strip()} or {self.steps})
        except ValueError:
            raise ConfigError(f"--eval_steps {self.eval_steps!r}: expected comma-separated integers") from None
        if not self.eval or self.eval[-1] > self.steps or self.eval[0] < 1:
            raise ConfigError(f"--eval_steps must be steps between 1 and --steps={self.steps}, "
                              f"got {self.eval_steps!r}")
        self._check_steps()

    def arm_list(self) -> list[str]:
        return [a.strip() for a in self.arms.split(",") if a.strip()]

    def _check_steps(self) -> None:
        """Each step's config as the study will make it, with stand-ins for the run ids and folders
        that only earlier steps make, so a value a step refuses is refused now."""
        run, generated = "0" * 32, f"chexpert:runs:/{'0' * 32}/synthetic"
        steps = [("finetune", lambda arm=arm: finetune_config(self, arm)) for arm in self.arm_list()]
        steps += [("classify", lambda: classify_config(self, self.data)),
                  ("generate", lambda: generate_config(self, run, self.eval[-1])),
                  ("classify", lambda: classify_config(self, generated, run)),
                  ("checks", lambda: checks_config(self, generated, run))]
        for name, make in steps:
            try:
                make()
            except ConfigError as err:
                raise ConfigError(f"the {name} step: {err}") from None


def parse_args(argv=None) -> PipelineConfig:
    return parse(PipelineConfig, argv, prog="python -m harness.pipeline")


# What each step is given: the pipeline's shared values, and what earlier steps made.

def finetune_config(config: PipelineConfig, arm: str) -> finetune.FinetuneConfig:
    return finetune.FinetuneConfig(arm=arm, data=config.data, pretrained_model=config.pretrained_model,
                                   steps=config.steps, learning_rate=config.learning_rate,
                                   batch_size=config.batch_size, seed=config.seed,
                                   checkpoint_every=math.gcd(*config.eval), launcher=config.launcher)


def generate_config(config: PipelineConfig, finetune_run: str, step: int) -> generate.GenerateConfig:
    return generate.GenerateConfig(run_id=finetune_run, step=step, n_per_prompt=config.n_per_prompt,
                                   prompts=config.prompts, num_inference_steps=config.num_inference_steps,
                                   guidance_scale=config.guidance_scale, seed=config.seed)


def classify_config(config: PipelineConfig, train: str, baseline_run: str | None = None) -> classify.ClassifyConfig:
    return classify.ClassifyConfig(train=train, baseline_run=baseline_run or "", test=config.data,
                                   model=config.classifier, epochs=config.epochs, seed=config.seed)


def checks_config(config: PipelineConfig, generated: str, classifier_run: str) -> checks.ChecksConfig:
    # the distance in the real-trained classifier's features
    return checks.ChecksConfig(generated=generated, real=config.data, seed=config.seed,
                               classifier_run=classifier_run)


def check_labels(data: str) -> list[str]:
    """The data's labels, which must give distinct, non-empty metric names (classify needs them,
    after the fine-tunes): checked before any step."""
    labels = load_table(local_spec(data), "train").attrs["labels"]
    check_metric_names(labels)
    return labels


def code_version() -> str:
    """A hash of the project's Python sources: a step is reused only if its code is unchanged."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_step(name: str, entry: str, config, force: bool) -> tracking.StepResult:
    """Run step ``entry`` with ``config`` as a nested run, or reuse a FINISHED run with the same key."""
    key = tracking.params_key({"step": name, "entry": entry, "config": config.key_params(), "code": code_version()})
    client = MlflowClient()
    step = STEPS[entry]
    if not force:
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(experiments, f"tags.`{STEP_KEY}` = '{key}' and attributes.status = 'FINISHED'",
                                   max_results=1)
        if found:
            log.info(f"{name}: reusing run {found[0].info.run_id}")
            return step.result(found[0].info.run_id)
    log.info(f"{name}: running")
    result = step.run(config)
    client.set_tag(result.run_id, STEP_KEY, key)
    return result


@dataclass(frozen=True)
class StudyResult:
    """The pipeline run, the write-up's table and the arms' paired differences."""
    run_id: str
    table: pd.DataFrame
    differences: pd.DataFrame


def run(config: PipelineConfig) -> StudyResult:
    labels = check_labels(config.data)
    tracking.use_project_store()
    stop_orphaned_steps()  # before tracked_run reaps: their runs then end KILLED with them
    with tracking.tracked_run("pipeline", config.experiment, tags={"harness.entry_point": "pipeline"}) as active:
        if config.pretrained_model == "base" and config.arm_list():  # its version: steps of another base aren't reused
            from harness.pretrained import base_uri

            config = config.replace(pretrained_model=base_uri())
        tracking.log_params({k: tracking.redact_url(v) if isinstance(v, str) else v  # a model URL's password
                             for k, v in config.params().items() if k != "experiment"})
        start = time.perf_counter()
        table, differences = study(config, labels)
        if config.arm_list():
            _promote(config.registered_model or model_name(config.data), config.promote_margin)
        mlflow.log_metric("pipeline_seconds", time.perf_counter() - start)
        mlflow.log_table(table.reset_index(), "comparison.json")
        mlflow.log_text(table.to_markdown(floatfmt=".3f"), "comparison.md")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        if not differences.empty:
            mlflow.log_text(differences.to_markdown(floatfmt=".3f"), "arm_differences.md")
            print(differences.to_string(float_format=lambda v: f"{v:.3f}"))
    return StudyResult(active.info.run_id, table, differences)


def main(argv=None) -> pd.DataFrame:
    """The command line's entry: returns the write-up's table."""
    return run(parse_args(argv)).table


# The entry points a study runs: each module's ``run(config)``, and ``result(run_id)`` for a reused run.
STEPS = {"finetune": finetune, "generate": generate, "classify": classify, "checks": checks}


@dataclass
class Task:
    """One step: which entry point, and its config made from the results of the steps it needs."""
    entry: str
    config: Callable[[dict[str, tracking.StepResult]], object]
    needs: list[str] = field(default_factory=list)


def study(config: PipelineConfig, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every step; returns the write-up's table (a column per label of the data) and the arms'
    paired differences."""
    arms = config.arm_list()
    tasks = {}
    # longest first: the fine-tunes, then the real baseline; the rest as their inputs come
    for arm in arms:
        tasks[f"finetune/{arm}"] = Task("finetune", lambda done, arm=arm: finetune_config(config, arm))
    tasks["classify/real"] = Task("classify", lambda done: classify_config(config, config.data))
    for arm in arms:
        for step in config.eval:
            at = f"{arm}/{step}"
            tasks[f"generate/{at}"] = Task("generate", lambda done, arm=arm, step=step: generate_config(
                config, done[f"finetune/{arm}"].run_id, step), [f"finetune/{arm}"])
            tasks[f"classify/{at}"] = Task("classify", lambda done, at=at: classify_config(
                config, done[f"generate/{at}"].artifacts["data"], done["classify/real"].run_id),
                [f"generate/{at}", "classify/real"])
            tasks[f"checks/{at}"] = Task("checks", lambda done, at=at: checks_config(
                config, done[f"generate/{at}"].artifacts["data"], done["classify/real"].run_id),
                [f"generate/{at}", "classify/real"])
    results = execute(tasks, resolve_jobs(config.jobs), config.force)
    done = {name: result.run_id for name, result in results.items()}

    rows = {"real images": classify_row(results["classify/real"].metrics.get, labels)}
    for arm in arms:
        for step in config.eval:
            at = f"{arm}/{step}"
            version = register_checkpoint(done[f"finetune/{arm}"], step, done[f"classify/{at}"],
                                          done[f"generate/{at}"], done[f"checks/{at}"],
                                          name=config.registered_model or None)
            log.info(f"{arm} @ {step}: registered {version.name} version {version.version}")
            rows[f"{arm} @ {step}"] = {**classify_row(results[f"classify/{at}"].metrics.get, labels),
                                       **checks_row(results[f"checks/{at}"].metrics.get)}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "training data"
    return table, arm_differences(arms, config.eval, done, config.seed)


def arm_differences(arms: list[str], steps: list[int], done: dict[str, str], seed: int) -> pd.DataFrame:
    """Macro AUC of the first arm minus each other arm at each step, paired on the same real test
    images, with its 95% bootstrap CI; logged as metrics of the active run."""
    pairs = {(arms[0], arm, step): (done[f"classify/{arms[0]}/{step}"], done[f"classify/{arm}/{step}"])
             for step in steps for arm in arms[1:]}
    table = difference_table({f"{a} - {b} @ {step}": runs for (a, b, step), runs in pairs.items()}, seed)
    for (a, b, step), row in zip(pairs, table.itertuples(index=False)):
        name = f"macro_auc_diff_{a}_minus_{b}_{step}"
        mlflow.log_metrics({name: row[0], f"{name}_ci_low": row[1], f"{name}_ci_high": row[2]})
    return table


def resolve_jobs(jobs: int) -> int:
    """``--jobs 0``: 2 worker processes on a CPU-only machine with at least 2 cores, else 1."""
    if jobs:
        return jobs
    import torch

    return 2 if not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else 1


def execute(tasks: dict[str, Task], jobs: int, force: bool) -> dict[str, tracking.StepResult]:
    """Run every task once its needs are done; returns task name -> its result. With ``jobs`` > 1 the
    tasks run in that many worker processes as nested runs of the active run; a failed task lets
    the running ones finish, starts no more, and raises its error."""
    done: dict[str, tracking.StepResult] = {}
    if jobs <= 1:
        while len(done) < len(tasks):
            name = next(n for n, t in tasks.items() if n not in done and all(d in done for d in t.needs))
            done[name] = run_step(name, tasks[name].entry, tasks[name].config(done), force)
        return done
    parent = mlflow.active_run()
    env = {"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_EXPERIMENT_ID": parent.info.experiment_id,
           tracking.PARENT_RUN_ENV: parent.info.run_id}
    threads = max(1, (os.cpu_count() or 1) // jobs)
    pending: dict = {}
    # spawn: each worker is a child of this process, which _worker_init ties its life to
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(env, threads, os.getpid())) as pool:
        try:
            while len(done) < len(tasks):
                for name, task in tasks.items():
                    if name not in done and name not in pending.values() and all(d in done for d in task.needs):
                        pending[pool.submit(run_step, name, task.entry, task.config(done), force)] = name
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[pending.pop(future)] = future.result()
        except BaseException:
            for future in pending:
                future.cancel()  # queued ones never start; running ones end their runs themselves
            raise
    return done


def _worker_init(env: dict, threads: int, parent_pid: int) -> None:
    import torch

    die_with_parent(parent_pid)
    os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run`: the pipeline's own run, not the steps'
    os.environ.update(env)
    torch.set_num_threads(threads)


def die_with_parent(parent_pid: int, interval: float = 0.5) -> None:
    """End this process when ``parent_pid``, its parent, ends. A worker that outlived a killed
    pipeline would go on training under a KILLED run, then wait for ever on the task pipe (its
    sibling workers hold the pipe open), and a rerun would train the same fine-tune beside it.
    On Linux the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``); a thread that
    watches the parent covers other systems and a failed ``prctl``."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        except (OSError, AttributeError) as err:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (%s): relying on the parent watchdog", err)
    if not _parent_alive(parent_pid):  # it died before the signal was armed
        os._exit(1)
    watch_parent(parent_pid, interval)


def _parent_alive(parent_pid: int) -> bool:
    # an orphan is re-parented (to init or a subreaper); where it is not, the pid is gone
    return os.getppid() == parent_pid and psutil.pid_exists(parent_pid)


def watch_parent(parent_pid: int, interval: float = 0.5) -> threading.Thread:
    """A daemon thread that ends this process, at once and without cleanup, once ``parent_pid`` is
    no longer its parent."""
    def watch():
        while _parent_alive(parent_pid):
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="harness-watch-parent", daemon=True)
    thread.start()
    return thread


def stop_orphaned_steps(wait_s: float = 5.0) -> list[int]:
    """Stop the step processes on this host whose pipeline process is gone but which still run a
    step (a RUNNING run nested under the dead pipeline's run, by a live process): a rerun would
    otherwise train the same fine-tune at the same time. Each gets ``wait_s`` seconds to die with
    its parent by itself, then SIGKILL. Returns their pids."""
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    running = client.search_runs(experiments, f"attributes.status = 'RUNNING' and "
                                              f"tags.`{tracking.TAG_HOST}` = '{socket.gethostname()}'")
    pipelines: dict[str, bool] = {}  # pipeline run id -> its process is gone

    def dead_pipeline(run_id: str) -> bool:
        if run_id not in pipelines:
            tags = client.get_run(run_id).data.tags
            pipelines[run_id] = (tags.get("harness.entry_point") == "pipeline" and _has_process_tags(tags)
                                 and not tracking._process_alive(int(tags[tracking.TAG_PID]),
                                                                 float(tags[tracking.TAG_STARTED])))
        return pipelines[run_id]

    orphans = []
    for run in running:
        tags = run.data.tags
        parent = tags.get("mlflow.parentRunId")
        if not parent or not _has_process_tags(tags) or not dead_pipeline(parent):
            continue
        pid, started = int(tags[tracking.TAG_PID]), float(tags[tracking.TAG_STARTED])
        if tracking._process_alive(pid, started):
            log.warning("step run %s (process %d) outlived its pipeline run %s: stopping it", run.info.run_id,
                        pid, parent)
            orphans.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(orphans, timeout=wait_s) if orphans else ([], [])
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=wait_s)
    return [proc.pid for proc in orphans]


def _has_process_tags(tags: dict) -> bool:
    return tracking.TAG_PID in tags and tracking.TAG_STARTED in tags


def _promote(name: str, margin: float) -> None:
    try:
        decision = promote(name, margin=margin)
    except ValueError as e:  # e.g. every checkpoint's macro AUC is nan (a test split without positives)
        warnings.warn(f"no champion promoted: {e}")
        mlflow.set_tag("harness.champion", f"none: {e}"[:5000])
        return
    mlflow.set_tag("harness.champion", f"{name}@champion = version {decision.champion}")
    log.info(f"{name}@champion: {decision.reason}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
