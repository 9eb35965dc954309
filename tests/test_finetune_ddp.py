"""Data-parallel fine-tuning: two CPU processes on gloo under ``accelerate launch --multi_gpu``,
as a user starts it on several GPUs. What must hold there: one MLflow run, each checkpoint
written and logged once, the same weights on every process after each step (the gradients are
all-reduced) from different batches, a NaN on one process failing both, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness import finetune

ROOT = Path(finetune.__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).parent / "accelerate"
LAUNCH = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
TIMEOUT_S = 300  # generous on 2 busy cores; a hang fails instead of blocking the suite


def _args(data, base, out, steps, every, *extra):
    return ["--arm", "unet_text_encoder", "--data", f"chexpert:{data}", "--pretrained_model", str(base),
            "--steps", str(steps), "--batch_size", "2", "--checkpoint_every", str(every), "--grid_steps", "2",
            "--grid_seeds", "1", "--log_every", "2", "--output_dir", str(out), *extra]


def _env(tmp_path, **extra) -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
            "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config changes the launch
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **extra}


def _launch(argv, env, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCH, "-m", "harness.finetune", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _dump(folder: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in (folder / f"process_{i}.jsonl").read_text().splitlines()] for i in (0, 1)]


@pytest.mark.slow
def test_two_processes_train_one_run_with_the_same_weights_from_different_batches(
        mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    out, dump = tmp_path / "out", tmp_path / "dump"
    done = _launch(_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2, "--gradient_accumulation_steps", "2"),
                   _env(tmp_path, HARNESS_DEBUG_DUMP=str(dump)))
    assert done.returncode == 0, done.stderr[-3000:]

    (run,) = _runs()  # one run, not one per process
    assert run.info.status == "FINISHED"
    assert run.data.params["num_processes"] == "2"
    assert run.data.params["global_batch_size"] == str(2 * 2 * 2)  # batch x accumulation x processes
    assert sorted(k for k in run.data.tags if k.startswith(finetune.CHECKPOINT_TAG)) == [
        f"{finetune.CHECKPOINT_TAG}000002", f"{finetune.CHECKPOINT_TAG}000004"]
    models = MlflowClient().search_logged_models([run.info.experiment_id],
                                                 filter_string=f"source_run_id = '{run.info.run_id}'")
    assert sorted(m.name for m in models) == ["checkpoint-000002", "checkpoint-000004"]  # each logged once
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    for step in ("step_000002", "step_000004"):  # every process saved its random state
        assert {p.name for p in (out / "checkpoints" / step / "state").glob("random_states_*.pkl")} == {
            "random_states_0.pkl", "random_states_1.pkl"}
    history = MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # logged once per step, by one process

    first, second = _dump(dump)
    assert [r["step"] for r in first] == [r["step"] for r in second] == [1, 2, 3, 4]
    for a, b in zip(first, second):
        assert a["weights"] == pytest.approx(b["weights"], rel=1e-6)  # all-reduced: the same update
        assert len(a["images"]) == len(b["images"]) == 2 * 2  # 2 accumulated batches of 2
        assert not set(a["images"]) & set(b["images"])  # each process its own shard
        assert a["loss"] == pytest.approx(b["loss"])  # the logged loss is the mean over processes
    assert first[0]["weights"] != first[-1]["weights"]  # and the weights did move


@pytest.mark.slow
def test_nan_on_one_process_fails_the_run_on_both(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    done = _launch(_args(tiny_phantom, tiny_pipeline_dir, out, 6, 2), _env(tmp_path, HARNESS_DEBUG_NAN="1:3"))
    assert done.returncode != 0
    assert time.monotonic() - start < TIMEOUT_S  # nothing hung
    (run,) = _runs()
    assert run.info.status == "FAILED"
    error = run.data.tags["harness.error"]
    assert error.startswith("NonFiniteLossError") and "at step 3 in process 1 of 2" in error
    assert (out / "checkpoints" / "step_000002" / "pipeline" / "model_index.json").is_file()  # kept


def _start(argv, env) -> subprocess.Popen:
    return subprocess.Popen([*LAUNCH, "-m", "harness.finetune", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    assert path.exists(), f"no {path.name} within {TIMEOUT_S} s"


def _kill_9_all(proc: subprocess.Popen) -> None:
    """kill -9 the launcher and its workers at once, as a crash of the machine would."""
    import psutil

    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


@pytest.mark.slow
def test_kill_9_then_rerun_resumes_and_a_stopped_launcher_ends_the_run(mlflow_store, tiny_phantom, tiny_pipeline_dir,
                                                                   tmp_path):
    out, env = tmp_path / "out", _env(tmp_path)
    argv = _args(tiny_phantom, tiny_pipeline_dir, out, 120, 20)
    proc = _start(argv, env)
    _wait_for(out / "checkpoints" / "step_000020", proc)
    _kill_9_all(proc)
    (killed,) = _runs()
    assert killed.info.status == "RUNNING"  # what kill -9 leaves behind ...

    proc = _start(argv, env)  # ... the rerun reaps and resumes it; then SIGTERM from outside
    _wait_for(out / "checkpoints" / "step_000040", proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher, which passes it on to its processes
    proc.wait(timeout=TIMEOUT_S)
    client = MlflowClient()
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    (resumed,) = [r for r in _runs() if r.info.run_id != killed.info.run_id]
    assert resumed.data.tags["harness.resumed_from"] == killed.info.run_id
    assert int(resumed.data.tags["harness.resumed_at_step"]) >= 20
    assert resumed.info.status in ("KILLED", "FAILED")  # never left RUNNING

    import psutil

    proc = _start(argv, env)  # the launcher alone killed -9: its workers end their run, none is left
    _wait_for(out / "checkpoints" / "step_000060", proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=TIMEOUT_S)
    assert not alive
    seen = {killed.info.run_id, resumed.info.run_id}
    (orphaned,) = [r for r in _runs() if r.info.run_id not in seen]
    assert orphaned.info.status in ("KILLED", "FAILED")

    done = _launch(argv, env)  # and the next start finishes what is left
    assert done.returncode == 0, done.stderr[-3000:]
    (last,) = [r for r in _runs() if r.info.run_id not in seen | {orphaned.info.run_id}]
    assert last.info.status == "FINISHED" and last.data.tags["harness.step"] == "120"
    assert int(last.data.tags["harness.resumed_at_step"]) >= 60


@pytest.mark.slow
def test_launcher_option_runs_the_fine_tune_data_parallel_and_judges_its_checkpoints(
        mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path, monkeypatch):
    """What pipeline and tune do with --launcher: the fine-tune runs under the launcher, and
    on_checkpoint (tune's pruning) is called in this process for each of its checkpoints."""
    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    launcher = " ".join(LAUNCH)
    config = finetune.parse_args(_args(tiny_phantom, tiny_pipeline_dir, tmp_path / "out", 6, 2)).replace(
        launcher=launcher)
    judged = []

    def on_checkpoint(step, run_id):
        judged.append(step)
        return step == 4  # prune here

    result = finetune.run(config, on_checkpoint)
    assert judged == [2, 4]
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["harness.stopped_early"] == "4"
    assert run.data.params["num_processes"] == "2" and run.data.tags["harness.launcher"] == launcher
    assert sorted(result.artifacts) == ["checkpoint_2", "checkpoint_4"]
