"""The pipeline entry point on a tiny budget: every step runs, the table comes out, each judged
checkpoint is registered, a re-run reuses, and the report shows what MLflow holds."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from mlflow.tracking import MlflowClient

import pandas as pd
from PIL import Image

from harness import classify, finetune, pipeline, report, tracking
from harness.config import ConfigError
from harness.compare import macro_auc_difference
from harness.metrics import snake
from harness.pathologies import FINDINGS
from registry.register import model_name


def _runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.slow
def test_pipeline_runs_every_step_then_reuses_them(mlflow_store, tiny_phantom, tiny_pipeline_dir):
    argv = ["--data", f"chexpert:{tiny_phantom}", "--pretrained_model", str(tiny_pipeline_dir),
            "--arms", "dreambooth,text_encoder", "--steps", "2", "--eval_steps", "1,2", "--n_per_prompt", "3",
            "--num_inference_steps", "2", "--epochs", "1", "--batch_size", "4"]
    table = pipeline.main([*argv, "--jobs", "2"])
    assert list(table.index) == ["real images", "dreambooth @ 1", "dreambooth @ 2", "text_encoder @ 1",
                                 "text_encoder @ 2"]
    assert list(table.columns) == FINDINGS + ["macro AUC", "accuracy", "balanced accuracy", "frontal fraction",
                                              "memorized fraction", "Frechet distance", "prompt adherence",
                                              "adherence ceiling"]
    runs = _runs()
    # 1 pipeline + 1 real classify + 2 arms x (1 finetune + 2 x (generate + classify + checks))
    assert len(runs) == 1 + 1 + 2 * 7 and {r.info.status for r in runs} == {"FINISHED"}
    parent = next(r for r in runs if r.data.tags.get("harness.entry_point") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 15
    # --jobs 2: the steps ran in two worker processes, not in this one
    assert len({r.data.tags["harness.pid"] for r in children}) == 2
    assert str(os.getpid()) not in {r.data.tags["harness.pid"] for r in children}
    baseline = next(r for r in children if r.data.params.get("train") == f"chexpert:{tiny_phantom}")
    # The MLflow UI tells the runs apart: each is named by what it judges and tagged with the arm,
    # the step and the fine-tune run of its checkpoint.
    finetunes = {r.data.tags["harness.arm"]: r.info.run_id for r in children if "harness.run_key" in r.data.tags}
    assert baseline.info.run_name == "classify · real" and baseline.data.tags["harness.arm"] == "real"
    judged = [r for r in children if " @ " in r.info.run_name]
    assert sorted(r.info.run_name for r in judged) == sorted(
        f"{entry} · {arm} @ {step}" for entry in ("generate", "classify", "checks")
        for arm in ("dreambooth", "text_encoder") for step in (1, 2))
    for r in judged:
        arm, step = r.info.run_name.split(" · ")[1].split(" @ ")
        assert (r.data.tags["harness.arm"], r.data.tags["harness.step"]) == (arm, step)
        assert r.data.tags["harness.source_run"] == finetunes[arm]
    assert not math.isnan(baseline.data.metrics["auc_macro"])
    assert math.isclose(table.loc["real images", "macro AUC"], baseline.data.metrics["auc_macro"], rel_tol=1e-9)
    # the checks columns are the checks runs' figures, row by row
    checks = {r.info.run_name.split(" · ")[1]: r for r in judged if r.info.run_name.startswith("checks")}
    for row, run in checks.items():
        assert table.loc[row, "frontal fraction"] == pytest.approx(run.data.metrics["view_frontal_fraction"])
        assert table.loc[row, "memorized fraction"] == pytest.approx(run.data.metrics["memorization_fraction"])
    assert 0 <= table.loc["dreambooth @ 2", "frontal fraction"] <= 1

    again = pipeline.main([*argv, "--jobs", "1"])  # same parameters, code and data: nothing is recomputed
    assert len(_runs()) == len(runs) + 1
    assert again.equals(table)

    # Registry: one version per judged checkpoint, tagged with its runs and figures.
    client = MlflowClient()
    name = model_name(f"chexpert:{tiny_phantom}")
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted((v.tags["arm"], v.tags["step"]) for v in versions) == [
        ("dreambooth", "1"), ("dreambooth", "2"), ("text_encoder", "1"), ("text_encoder", "2")]
    for v in versions:
        judged = client.get_run(v.tags["classify_run_id"]).data.metrics
        assert v.tags["auc_macro"] == repr(judged["auc_macro"])
        assert client.get_run(v.tags["checks_run_id"]).data.metrics["view_frontal_fraction"] == \
            float(v.tags["view_frontal_fraction"])

    # The arms compared on the same test images: dreambooth - text_encoder at each judged step.
    classify_runs = {(v.tags["arm"], int(v.tags["step"])): v.tags["classify_run_id"] for v in versions}
    differences = {}
    for step in (1, 2):
        differences[step] = macro_auc_difference(classify_runs["dreambooth", step],
                                                          classify_runs["text_encoder", step])
        metric = f"macro_auc_diff_dreambooth_minus_text_encoder_{step}"
        logged = [parent.data.metrics[f"{metric}{suffix}"] for suffix in ("", "_ci_low", "_ci_high")]
        assert all(_same(x, y) for x, y in zip(logged, differences[step]))
    assert "arm_differences.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # Report: the table holds the logged values; every plot is a non-empty PNG; it is logged too.
    result = report.main(["--output_dir", "reports"])
    auc = pd.read_csv(f"reports/{name}_auc.csv", index_col=0)
    assert list(auc.index) == list(table.index)
    for v in versions:
        judged = client.get_run(v.tags["classify_run_id"]).data.metrics
        row = f"{v.tags['arm']} @ {v.tags['step']}"
        for label in FINDINGS:
            assert _same(auc.at[row, label], judged[f"auc_{snake(label)}"])
        assert _same(auc.at[row, "macro AUC"], judged["auc_macro"])
    assert _same(auc.at["real images", "macro AUC"], baseline.data.metrics["auc_macro"])
    assert list(auc.columns[-2:]) == ["accuracy", "balanced accuracy"]
    diffs = pd.read_csv(f"reports/{name}_arm_differences.csv", index_col=0)
    for step in (1, 2):
        assert _same(diffs.at[f"dreambooth - text_encoder @ {step}", "macro AUC difference"], differences[step][0])
    checks_csv = pd.read_csv(f"reports/{name}_checks.csv", index_col=0)
    assert {"prompt adherence", "adherence ceiling"} <= set(checks_csv.columns)
    pngs = [p for p in result["files"] if str(p).endswith(".png")]
    assert len(pngs) == 3 + 4 and all(p.stat().st_size > 1000 for p in pngs)  # 3 plots + 4 sample grids
    html = result["html"].read_text()
    assert html.count("data:image/png;base64,") == 7 and "champion" in html
    logged = [r for r in _runs() if r.data.tags.get("harness.entry_point") == "report"]
    assert len(logged) == 1 and logged[0].info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(logged[0].info.run_id, "report")}
    assert {"report/report.md", "report/report.html", f"report/{name}_auc.csv"} <= artifacts


@pytest.mark.slow
def test_a_step_failing_in_a_worker_fails_the_pipeline_and_leaves_no_run_running(mlflow_store, tiny_phantom,
                                                                                 tmp_path):
    argv = ["--data", f"chexpert:{tiny_phantom}", "--pretrained_model", str(tmp_path / "no-such-model"),
            "--arms", "dreambooth", "--steps", "1", "--eval_steps", "1", "--n_per_prompt", "1", "--epochs", "1",
            "--jobs", "2"]
    with pytest.raises(ValueError, match="could not load pretrained_model"):
        pipeline.main(argv)
    runs = _runs()
    assert {r.info.status for r in runs} <= {"FAILED", "FINISHED"}
    parent = next(r for r in runs if r.data.tags.get("harness.entry_point") == "pipeline")
    assert parent.info.status == "FAILED" and "could not load pretrained_model" in parent.data.tags["harness.error"]
    assert not MlflowClient().search_registered_models()  # nothing registered


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)


# ------------------------------------------------------------------------- faults and bad input


def _tiny_argv(phantom, base, *extra):
    return ["--data", f"chexpert:{phantom}", "--pretrained_model", str(base), "--arms", "dreambooth",
            "--steps", "2", "--eval_steps", "2", "--n_per_prompt", "1", "--num_inference_steps", "1",
            "--epochs", "1", "--batch_size", "4", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--n_per_prompt", "0"], "--n_per_prompt 0: must be at least 1"),
    (["--data", "dicom:/data/cxr"], "unknown data format 'dicom'"),
    (["--arms", "dreambooth,lora"], "(unknown: lora)"),
])
def test_bad_arguments_are_refused_before_any_step(extra, message, mlflow_store, tiny_phantom, tiny_pipeline_dir,
                                                   capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit):
        pipeline.main(_tiny_argv(tiny_phantom, tiny_pipeline_dir, *extra))
    assert time.perf_counter() - start < 1.0
    assert message in capsys.readouterr().err
    assert not _runs()  # no step ran, not even the pipeline's own run started


def test_the_judged_checkpoint_defaults_to_the_last_step_and_guidance_reaches_generate(tiny_phantom, tiny_pipeline_dir):
    common = {"data": f"chexpert:{tiny_phantom}", "pretrained_model": str(tiny_pipeline_dir)}
    assert pipeline.PipelineConfig(**common, steps=4800).eval == [4800]  # -P steps=4800 alone judges step 4800
    assert pipeline.PipelineConfig(**common, steps=1200, eval_steps="1200,600").eval == [600, 1200]
    with pytest.raises(ConfigError, match="between 1 and --steps=600"):
        pipeline.PipelineConfig(**common, steps=600, eval_steps="1200")
    assert pipeline.generate_config(pipeline.PipelineConfig(**common, guidance_scale=3.0), "run", 1).guidance_scale == 3.0
    with pytest.raises(ConfigError, match="--guidance_scale -1.0"):  # generate's check, before any step
        pipeline.PipelineConfig(**common, guidance_scale=-1.0)


def test_labels_without_metric_names_are_refused_before_any_step(mlflow_store, tmp_path, monkeypatch):
    """CJK label names have empty snake-case metric names: classify would refuse them, but only
    after the fine-tunes."""
    root = tmp_path / "cjk"
    (root / "img").mkdir(parents=True)
    rows = ["path,split,view,心脏肥大,胸腔积液"]
    for i in range(4):
        Image.new("L", (16, 16), 40 * i).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'train' if i < 2 else 'valid'},frontal,{i % 2},{1 - i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(finetune, "run", lambda *a, **k: pytest.fail("a fine-tune ran"))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="do not give distinct metric names"):
        pipeline.main(["--data", f"folder:{root}", "--jobs", "1"])
    assert time.perf_counter() - start < 1.0
    assert not _runs()


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            **extra}


@pytest.mark.slow
def test_killing_the_pipeline_kills_its_workers(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    """kill -9 of the pipeline process while its workers train: they must not go on (under a
    KILLED run, then waiting for ever on the task pipe) beside a rerun."""
    argv = _tiny_argv(tiny_phantom, tiny_pipeline_dir, "--jobs", "2")
    argv[argv.index("--steps") + 1] = argv[argv.index("--eval_steps") + 1] = "1000000"  # still training when killed
    proc = subprocess.Popen([sys.executable, "-m", "harness.pipeline", *argv], cwd=tmp_path,
                            env=_env(MLFLOW_TRACKING_URI=mlflow_store, HARNESS_CACHE_DIR=str(tmp_path / ".cache")),
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "pipeline.log", "w"))
    workers = []
    try:
        deadline = time.monotonic() + 300
        while not any(r.info.status == "RUNNING" and r.data.tags.get("harness.arm") == "dreambooth"
                      and r.data.metrics.get("loss") is not None for r in _runs()):
            assert proc.poll() is None, (tmp_path / "pipeline.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the fine-tune never started"
            time.sleep(0.5)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len([w for w in workers if "spawn_main" in " ".join(w.cmdline())]) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, [" ".join(w.cmdline())[:200] for w in alive]
    finally:
        proc.kill()
        for w in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()
    # the next run of any entry point marks the dead processes' runs KILLED
    tracking.reap_dead_runs()
    assert not [r for r in _runs() if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_a_worker_whose_parent_dies_ends_without_the_kernel_signal(tmp_path):
    """The portable fallback of ``die_with_parent``: the watchdog thread alone."""
    ready = tmp_path / "ready"
    child = (f"import os, pathlib, time; from harness.pipeline import watch_parent; watch_parent(os.getppid(), 0.1); "
             f"pathlib.Path({str(ready)!r}).write_text(str(os.getpid())); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)"],
                              env=_env())
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() or not ready.read_text():
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.2)
        worker = psutil.Process(int(ready.read_text()))
    finally:
        parent.kill()
        parent.wait()
    try:
        worker.wait(timeout=5)
    except psutil.TimeoutExpired:
        worker.kill()
        pytest.fail("the worker outlived its parent")


def test_a_rerun_stops_the_step_processes_of_a_dead_pipeline(mlflow_store):
    """Where a worker outlived its pipeline anyway, the next pipeline stops it before starting
    steps, so the two never train the same fine-tune."""
    client = MlflowClient()
    experiment = client.create_experiment("orphans")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = {tracking.TAG_HOST: socket.gethostname()}
    dead = client.create_run(experiment, tags={**host, "harness.entry_point": "pipeline",
                                               tracking.TAG_PID: str(gone.pid),
                                               tracking.TAG_STARTED: repr(time.time() - 60)}).info.run_id
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    me = psutil.Process()
    live = client.create_run(experiment, tags={**host, "harness.entry_point": "pipeline", tracking.TAG_PID: str(me.pid),
                                               tracking.TAG_STARTED: repr(me.create_time())}).info.run_id
    try:
        started = repr(psutil.Process(worker.pid).create_time())
        orphan = client.create_run(experiment, tags={**host, "mlflow.parentRunId": dead, tracking.TAG_PID: str(worker.pid),
                                                     tracking.TAG_STARTED: started}).info.run_id
        # a step of a live pipeline (this process) is left alone
        client.create_run(experiment, tags={**host, "mlflow.parentRunId": live, tracking.TAG_PID: str(me.pid),
                                            tracking.TAG_STARTED: repr(me.create_time())})
        assert pipeline.stop_orphaned_steps(wait_s=0.2) == [worker.pid]
        assert worker.poll() is not None  # (stop_orphaned_steps has reaped it: no exit status here)
        assert orphan in tracking.reap_dead_runs()
    finally:
        worker.kill()
        worker.wait()
