"""The whole study in one run: fine-tune each arm -> per checkpoint generate, classify and check,
against a classifier trained on real images; prints the write-up's table.

    python -m harness.pipeline                     # the embedded default, CPU-sized
    mlflow run . -e pipeline --env-manager local   # the same, as an MLflow Project step
    python -m harness.pipeline --steps 50000 --eval_steps 30000,50000 --n_per_prompt 1000   # the write-up's

Each step is the entry point's own ``main`` run as a nested MLflow run of this one. As in MLflow's
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

Every argument is checked before anything runs: the pipeline's own, and each step's command line
through that step's parser; the data's labels must give metric names (``harness.metrics.snake``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import io
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
from harness.metrics import check_metric_names, snake
from harness.classifier import CLASSIFIERS
from harness.config import bool_arg, int_arg
from harness.artifacts import local_spec
from harness.data import DataSpec, load_table
from harness.pathologies import FINDINGS
from registry.promote import promote
from registry.register import model_name, register_checkpoint

STEP_KEY = "harness.step_key"
CODE_DIRS = ("harness", "registry")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="phantom", help="real data: FORMAT:PATH or 'phantom'")
    p.add_argument("--pretrained_model", default="base")
    p.add_argument("--arms", default="dreambooth,text_encoder,unet_text_encoder")
    # CPU-sized defaults (the write-up compared 30000 and 50000 iterations on a GPU): the small
    # embedded base wants 2e-3 (a real SD checkpoint ~5e-6), and more steps keep helping (README:
    # quality table); one judged checkpoint per arm keeps the CPU time in check.
    p.add_argument("--steps", type=int_arg, default=1200)
    p.add_argument("--eval_steps", default="1200", help="checkpoints to judge, comma-separated")
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--batch_size", type=int_arg, default=8)
    # Fewer images cannot show anything: even a perfect generator (the phantom renderer) trains a
    # classifier near chance from a few dozen per prompt (`bench.synthetic_ratio --oracle`; README).
    p.add_argument("--n_per_prompt", type=int_arg, default=200,
                   help="synthetic images per disease prompt (data prompts: as many in all, x6)")
    # Data prompts (label sets drawn from the real train split) show a classifier the findings'
    # co-occurrence, which single-finding prompts never do (README: the perfect generator's figures).
    p.add_argument("--prompts", default="data", choices=["disease", "data"],
                   help="generate's prompts: data (the real label sets) or disease (the write-up's five + no finding)")
    # Few DPM-Solver steps: more did not change the synthetic AUC beyond its CI (README).
    p.add_argument("--num_inference_steps", type=int_arg, default=6)
    p.add_argument("--classifier", default="small_cnn")
    p.add_argument("--epochs", type=int_arg, default=8)
    p.add_argument("--seed", type=int_arg, default=0)
    p.add_argument("--promote_margin", type=float, default=0.0, help="AUC a checkpoint must gain to take champion")
    p.add_argument("--registered_model", default="",
                   help="registered model for the judged checkpoints (default: cxr-sd-<data>-<path hash>, "
                        "registry.register.model_name); name it when workers see the data under other paths")
    p.add_argument("--force", type=bool_arg, default=False, help="rerun steps even when a finished one matches")
    p.add_argument("--jobs", type=int_arg, default=0,
                   help="worker processes for independent steps; 0 = 2 on a CPU-only machine with 2+ cores, "
                        "else 1 (1 = every step in this process, one after another)")
    p.add_argument("--experiment", default=None)
    args = p.parse_args(argv)
    # Everything is checked here, before the first step: a bad value found by a later step would
    # only show after the fine-tunes (hours on a real budget).
    if args.jobs < 0:
        p.error("--jobs must not be negative")
    small = [f"--{k} {getattr(args, k)}" for k in ("steps", "batch_size", "n_per_prompt", "num_inference_steps",
                                                    "epochs") if getattr(args, k) < 1]
    if small:
        p.error(f"{', '.join(small)}: must be at least 1")
    if args.seed < 0:
        p.error(f"--seed {args.seed} must not be negative")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        p.error(f"--learning_rate {args.learning_rate} must be a positive number")
    if not math.isfinite(args.promote_margin):
        p.error(f"--promote_margin {args.promote_margin} must be a number")
    try:
        DataSpec.parse(args.data)
    except ValueError as err:
        p.error(f"--data: {err}")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(finetune.ARMS))
    if unknown or len(set(arms)) != len(arms):
        p.error(f"--arms {args.arms!r}: each of {', '.join(sorted(finetune.ARMS))} at most once"
                + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if args.classifier not in CLASSIFIERS:
        p.error(f"--classifier {args.classifier!r}: choose one of {', '.join(CLASSIFIERS)}")
    try:
        args.eval = sorted({int(s) for s in args.eval_steps.split(",") if s.strip()})
    except ValueError:
        p.error(f"--eval_steps {args.eval_steps!r}: expected comma-separated integers")
    if not args.eval or args.eval[-1] > args.steps or args.eval[0] < 1:
        p.error(f"--eval_steps must be steps between 1 and --steps={args.steps}, got {args.eval_steps!r}")
    _check_step_arguments(p, args, arms)
    return args


def _check_step_arguments(p: argparse.ArgumentParser, args, arms: list[str]) -> None:
    """Each step's command line through that step's own parser, with stand-ins for the run ids and
    folders that only earlier steps make, so a value a step refuses is refused now."""
    run, generated = "0" * 32, f"chexpert:runs:/{'0' * 32}/synthetic"
    steps = [("finetune", finetune.parse_args, _finetune_argv(args, arm)) for arm in arms]
    steps += [("classify", classify.parse_args, _classify_argv(args, args.data)),
              ("generate", generate.parse_args, _generate_argv(args, run, args.eval[-1])),
              ("classify", classify.parse_args, _classify_argv(args, generated, run)),
              ("checks", checks.parse_args, _checks_argv(args, generated, run))]
    for name, parse, step_argv in steps:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse(step_argv)
        except SystemExit:
            message = (err.getvalue().strip().splitlines() or ["refused its arguments"])[-1]
            p.error(f"the {name} step: {message.split('error: ', 1)[-1]}")


def check_labels(data: str) -> list[str]:
    """The data's labels, which must give distinct, non-empty metric names (classify needs them,
    after the fine-tunes): checked before any step."""
    return check_metric_names(load_table(local_spec(data), "train").attrs["labels"])


def code_version() -> str:
    """A hash of the project's Python sources: a step is reused only if its code is unchanged."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for folder in CODE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def run_step(name: str, entry, argv: list[str], force: bool) -> str:
    """Run ``entry(argv)`` as a nested run, or reuse a FINISHED run with the same key."""
    key = tracking.params_key({"step": name, "argv": argv, "code": code_version()})
    client = MlflowClient()
    if not force:
        experiments = [e.experiment_id for e in client.search_experiments()]
        found = client.search_runs(experiments, f"tags.`{STEP_KEY}` = '{key}' and attributes.status = 'FINISHED'",
                                   max_results=1)
        if found:
            log.info(f"{name}: reusing run {found[0].info.run_id}")
            return found[0].info.run_id
    log.info(f"{name}: running")
    run_id = entry(argv)
    client.set_tag(run_id, STEP_KEY, key)
    return run_id


def main(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    check_labels(args.data)
    tracking.use_project_store()
    stop_orphaned_steps()  # before tracked_run reaps: their runs then end KILLED with them
    with tracking.tracked_run("pipeline", args.experiment, tags={"harness.entry_point": "pipeline"}) as run:
        tracking.log_params({k: tracking.redact_url(v) if isinstance(v, str) else v  # a model URL's password
                             for k, v in vars(args).items() if k not in {"experiment", "eval"}})
        start = time.perf_counter()
        table, differences = study(args)
        if args.arms.strip():
            _promote(args.registered_model or model_name(args.data), args.promote_margin)
        mlflow.log_metric("pipeline_seconds", time.perf_counter() - start)
        mlflow.log_table(table.reset_index(), "comparison.json")
        mlflow.log_text(table.to_markdown(floatfmt=".3f"), "comparison.md")
        print(table.to_string(float_format=lambda v: f"{v:.3f}"))
        if not differences.empty:
            mlflow.log_text(differences.to_markdown(floatfmt=".3f"), "arm_differences.md")
            print(differences.to_string(float_format=lambda v: f"{v:.3f}"))
        return table


ENTRIES = {"finetune": finetune.main, "generate": generate.main, "classify": classify.main, "checks": checks.main}


@dataclass
class Task:
    """One step: which entry point, and its argv built from the run ids of the steps it needs."""
    entry: str
    argv: Callable[[dict], list[str]]
    needs: list[str] = field(default_factory=list)


def _finetune_argv(args, arm: str) -> list[str]:
    return ["--arm", arm, "--data", args.data, "--pretrained_model", args.pretrained_model,
            "--steps", str(args.steps), "--learning_rate", str(args.learning_rate),
            "--batch_size", str(args.batch_size), "--seed", str(args.seed), "--checkpoint_every", str(math.gcd(*args.eval))]


def _generate_argv(args, finetune_run: str, step: int) -> list[str]:
    return ["--run_id", finetune_run, "--step", str(step), "--n_per_prompt", str(args.n_per_prompt),
            "--prompts", args.prompts, "--num_inference_steps", str(args.num_inference_steps), "--seed", str(args.seed)]


def _classify_argv(args, train: str, baseline_run: str | None = None) -> list[str]:
    baseline = ["--baseline_run", baseline_run] if baseline_run else []
    return ["--train", train, *baseline, "--test", args.data, "--model", args.classifier, "--epochs", str(args.epochs),
            "--seed", str(args.seed)]


def _checks_argv(args, generated: str, classifier_run: str) -> list[str]:
    # the distance in the real-trained classifier's features
    return ["--generated", generated, "--real", args.data, "--seed", str(args.seed), "--classifier_run", classifier_run]


def study(args) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every step; returns the write-up's table and the arms' paired differences."""
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    tasks = {}
    # longest first: the fine-tunes, then the real baseline; the rest as their inputs come
    for arm in arms:
        tasks[f"finetune/{arm}"] = Task("finetune", lambda done, arm=arm: _finetune_argv(args, arm))
    tasks["classify/real"] = Task("classify", lambda done: _classify_argv(args, args.data))
    for arm in arms:
        for step in args.eval:
            at = f"{arm}/{step}"
            tasks[f"generate/{at}"] = Task("generate", lambda done, arm=arm, step=step: _generate_argv(
                args, done[f"finetune/{arm}"], step), [f"finetune/{arm}"])
            tasks[f"classify/{at}"] = Task("classify", lambda done, at=at: _classify_argv(
                args, _generated(done[f"generate/{at}"]), done["classify/real"]), [f"generate/{at}", "classify/real"])
            tasks[f"checks/{at}"] = Task("checks", lambda done, at=at: _checks_argv(
                args, _generated(done[f"generate/{at}"]), done["classify/real"]), [f"generate/{at}", "classify/real"])
    done = execute(tasks, resolve_jobs(args.jobs), args.force)

    rows = {"real images": _row(done["classify/real"])}
    for arm in arms:
        for step in args.eval:
            at = f"{arm}/{step}"
            version = register_checkpoint(done[f"finetune/{arm}"], step, done[f"classify/{at}"],
                                          done[f"generate/{at}"], done[f"checks/{at}"],
                                          name=args.registered_model or None)
            log.info(f"{arm} @ {step}: registered {version.name} version {version.version}")
            rows[f"{arm} @ {step}"] = {**_row(done[f"classify/{at}"]), **_checks_row(done[f"checks/{at}"])}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "training data"
    return table, arm_differences(arms, args.eval, done, args.seed)


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


def _generated(generate_run: str) -> str:
    """What the next steps read: the generate run's artifact URI (any worker of the tracking server
    reads it; the host that made it reads its folder in place), not a local path."""
    return generate.generated_spec(generate_run)


def resolve_jobs(jobs: int) -> int:
    """``--jobs 0``: 2 worker processes on a CPU-only machine with at least 2 cores, else 1."""
    if jobs:
        return jobs
    import torch

    return 2 if not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else 1


def execute(tasks: dict[str, Task], jobs: int, force: bool) -> dict[str, str]:
    """Run every task once its needs are done; returns task name -> run id. With ``jobs`` > 1 the
    tasks run in that many worker processes as nested runs of the active run; a failed task lets
    the running ones finish, starts no more, and raises its error."""
    done: dict[str, str] = {}
    if jobs <= 1:
        while len(done) < len(tasks):
            name = next(n for n, t in tasks.items() if n not in done and all(d in done for d in t.needs))
            done[name] = run_step(name, ENTRIES[tasks[name].entry], tasks[name].argv(done), force)
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
                        pending[pool.submit(_run_task, name, task.entry, task.argv(done), force)] = name
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


def _run_task(name: str, entry: str, argv: list[str], force: bool) -> str:
    return run_step(name, ENTRIES[entry], argv, force)


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


def _checks_row(run_id: str) -> dict:
    """What the write-up judged by eye: view mix, near-copies of training images, distance, and
    whether the images show their prompts (with the phantom renderer's ceiling)."""
    metrics = MlflowClient().get_run(run_id).data.metrics
    return {"frontal fraction": metrics.get("view_frontal_fraction", float("nan")),
            "memorized fraction": metrics.get("memorization_fraction", float("nan")),
            "Frechet distance": metrics.get("frechet_distance", float("nan")),
            "prompt adherence": metrics.get("adherence_mean", float("nan")),
            "adherence ceiling": metrics.get("adherence_ceiling_mean", float("nan"))}


def _row(run_id: str) -> dict:
    """The write-up's columns from a classify run: per-disease AUC, macro AUC, accuracy and
    balanced accuracy (accuracy at 0.5 mostly reflects the labels' prevalence)."""
    metrics = MlflowClient().get_run(run_id).data.metrics
    row = {label: metrics.get(f"auc_{snake(label)}", float("nan")) for label in FINDINGS}
    row["macro AUC"] = metrics.get("auc_macro", float("nan"))
    row["accuracy"] = metrics.get("acc_macro", float("nan"))
    row["balanced accuracy"] = metrics.get("bal_acc_macro", float("nan"))
    return row


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
