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
2 CPU cores two 1-thread processes train the embedded UNet at 1.4-1.8x the images/s of one 2-thread
process (``python -m bench.parallel_steps``: 82 vs 47 images/s, ratio 1.76).
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from harness import checks, classify, finetune, generate, tracking
from harness.cli import bool_arg, int_arg
from harness.pathologies import FINDINGS
from registry.promote import promote
from registry.register import model_name, register_checkpoint

STEP_KEY = "harness.step_key"
CODE_DIRS = ("harness", "registry")


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
    # Fewer images cannot show anything: the phantom renderer itself, as a perfect generator, gives a
    # synthetic-trained macro AUC of 0.51 at 24 per disease prompt, 0.70 at 100, 0.84 at 200, 0.89 at
    # 400 (real: 0.94; `python -m bench.synthetic_ratio --oracle --prompts disease`).
    p.add_argument("--n_per_prompt", type=int_arg, default=200,
                   help="synthetic images per disease prompt (data prompts: as many in all, x6)")
    # Data prompts (label sets drawn from the real train split) show a classifier the findings'
    # co-occurrence; the perfect generator reaches 0.88 from 1200 of them, 0.84 from disease prompts.
    p.add_argument("--prompts", default="data", choices=["disease", "data"],
                   help="generate's prompts: data (the real label sets) or disease (the write-up's five + no finding)")
    # Few DPM-Solver steps: more did not change the synthetic AUC beyond its CI (README).
    p.add_argument("--num_inference_steps", type=int_arg, default=6)
    p.add_argument("--classifier", default="small_cnn")
    p.add_argument("--epochs", type=int_arg, default=8)
    p.add_argument("--seed", type=int_arg, default=0)
    p.add_argument("--promote_margin", type=float, default=0.0, help="AUC a checkpoint must gain to take champion")
    p.add_argument("--force", type=bool_arg, default=False, help="rerun steps even when a finished one matches")
    p.add_argument("--jobs", type=int_arg, default=0,
                   help="worker processes for independent steps; 0 = 2 on a CPU-only machine with 2+ cores, "
                        "else 1 (1 = every step in this process, one after another)")
    p.add_argument("--experiment", default=None)
    args = p.parse_args(argv)
    if args.jobs < 0:
        p.error("--jobs must not be negative")
    args.eval = sorted({int(s) for s in args.eval_steps.split(",") if s.strip()})
    if not args.eval or args.eval[-1] > args.steps or args.eval[0] < 1:
        p.error(f"--eval_steps must be steps between 1 and --steps={args.steps}, got {args.eval_steps!r}")
    return args


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
            print(f"[pipeline] {name}: reusing run {found[0].info.run_id}")
            return found[0].info.run_id
    print(f"[pipeline] {name}: running")
    run_id = entry(argv)
    client.set_tag(run_id, STEP_KEY, key)
    return run_id


def main(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    with tracking.tracked_run("pipeline", args.experiment, tags={"harness.entry_point": "pipeline"}) as run:
        tracking.log_params({k: v for k, v in vars(args).items() if k not in {"experiment", "eval"}})
        start = time.perf_counter()
        table, differences = study(args)
        if args.arms.strip():
            _promote(model_name(args.data), args.promote_margin)
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


def study(args) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run every step; returns the write-up's table and the arms' paired differences."""
    classify_common = ["--test", args.data, "--model", args.classifier, "--epochs", str(args.epochs),
                       "--seed", str(args.seed)]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    tasks = {}
    # longest first: the fine-tunes, then the real baseline; the rest as their inputs come
    for arm in arms:
        tasks[f"finetune/{arm}"] = Task("finetune", lambda done, arm=arm: [
            "--arm", arm, "--data", args.data, "--pretrained_model", args.pretrained_model,
            "--steps", str(args.steps), "--learning_rate", str(args.learning_rate),
            "--batch_size", str(args.batch_size), "--seed", str(args.seed),
            "--checkpoint_every", str(_gcd(args.eval))])
    tasks["classify/real"] = Task("classify", lambda done: ["--train", args.data, *classify_common])
    for arm in arms:
        for step in args.eval:
            at = f"{arm}/{step}"
            tasks[f"generate/{at}"] = Task("generate", lambda done, arm=arm, step=step: [
                "--run_id", done[f"finetune/{arm}"], "--step", str(step), "--n_per_prompt", str(args.n_per_prompt),
                "--prompts", args.prompts, "--num_inference_steps", str(args.num_inference_steps),
                "--seed", str(args.seed)], [f"finetune/{arm}"])
            tasks[f"classify/{at}"] = Task("classify", lambda done, at=at: [
                "--train", _generated(done[f"generate/{at}"]), "--baseline_run", done["classify/real"],
                *classify_common], [f"generate/{at}", "classify/real"])
            tasks[f"checks/{at}"] = Task("checks", lambda done, at=at: [
                "--generated", _generated(done[f"generate/{at}"]), "--real", args.data, "--seed", str(args.seed),
                # the distance in the real-trained classifier's features
                "--classifier_run", done["classify/real"]], [f"generate/{at}", "classify/real"])
    done = execute(tasks, resolve_jobs(args.jobs), args.force)

    rows = {"real images": _row(done["classify/real"])}
    for arm in arms:
        for step in args.eval:
            at = f"{arm}/{step}"
            version = register_checkpoint(done[f"finetune/{arm}"], step, done[f"classify/{at}"],
                                          done[f"generate/{at}"], done[f"checks/{at}"])
            print(f"[pipeline] {arm} @ {step}: registered {version.name} version {version.version}")
            rows[f"{arm} @ {step}"] = {**_row(done[f"classify/{at}"]), **_checks_row(done[f"checks/{at}"])}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "training data"
    return table, arm_differences(arms, args.eval, done, args.seed)


def arm_differences(arms: list[str], steps: list[int], done: dict[str, str], seed: int) -> pd.DataFrame:
    """Macro AUC of the first arm minus each other arm at each step, paired on the same real test
    images, with its 95% bootstrap CI; logged as metrics of the active run."""
    pairs = {(arms[0], arm, step): (done[f"classify/{arms[0]}/{step}"], done[f"classify/{arm}/{step}"])
             for step in steps for arm in arms[1:]}
    table = classify.difference_table({f"{a} - {b} @ {step}": runs for (a, b, step), runs in pairs.items()}, seed)
    for (a, b, step), row in zip(pairs, table.itertuples(index=False)):
        name = f"macro_auc_diff_{a}_minus_{b}_{step}"
        mlflow.log_metrics({name: row[0], f"{name}_ci_low": row[1], f"{name}_ci_high": row[2]})
    return table


def _generated(generate_run: str) -> str:
    return MlflowClient().get_run(generate_run).data.tags["harness.generated_data"]


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
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(env, threads)) as pool:
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


def _worker_init(env: dict, threads: int) -> None:
    import torch

    os.environ.pop("MLFLOW_RUN_ID", None)  # under `mlflow run`: the pipeline's own run, not the steps'
    os.environ.update(env)
    torch.set_num_threads(threads)


def _run_task(name: str, entry: str, argv: list[str], force: bool) -> str:
    return run_step(name, ENTRIES[entry], argv, force)


def _promote(name: str, margin: float) -> None:
    try:
        decision = promote(name, margin=margin)
    except ValueError as e:  # e.g. every checkpoint's macro AUC is nan (a test split without positives)
        warnings.warn(f"no champion promoted: {e}")
        mlflow.set_tag("harness.champion", f"none: {e}"[:5000])
        return
    mlflow.set_tag("harness.champion", f"{name}@champion = version {decision.champion}")
    print(f"[pipeline] {name}@champion: {decision.reason}")


def _gcd(steps: list[int]) -> int:
    from math import gcd

    out = 0
    for s in steps:
        out = gcd(out, s)
    return out


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
    row = {label: metrics.get(f"auc_{classify.snake(label)}", float("nan")) for label in FINDINGS}
    row["macro AUC"] = metrics.get("auc_macro", float("nan"))
    row["accuracy"] = metrics.get("acc_macro", float("nan"))
    row["balanced accuracy"] = metrics.get("bal_acc_macro", float("nan"))
    return row


if __name__ == "__main__":
    main()
