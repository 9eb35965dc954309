"""The fine-tuning entry points, run for real on tiny components and phantom data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from harness import finetune
from harness.grids import MIN_TILE, STRIP
from registry.pyfunc import pipeline_dir_of


def _args(data, base, out, steps=4, every=2, *extra):
    return ["--data", f"chexpert:{data}", "--pretrained_model", str(base), "--steps", str(steps),
            "--batch_size", "4", "--checkpoint_every", str(every), "--grid_steps", "2", "--grid_seeds", "1",
            "--log_every", "2", "--output_dir", str(out), *extra]


def _weights(pipe_dir: Path, name: str) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    return {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}


def _changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


class _Watch:
    """What a fine-tune's training steps did, seen from outside the loop: the token ids each
    training forward pass gave the text encoder (passes with gradients on; sampling grids and
    prior images runs under no_grad), the optimizer updates made, and the logged loss."""

    def __init__(self, monkeypatch):
        import harness.pretrained

        real = harness.pretrained.load_pipeline
        self.ids: list[torch.Tensor] = []
        self.updates = 0

        def record(module, args, kwargs):
            if torch.is_grad_enabled():
                self.ids.append((args[0] if args else kwargs["input_ids"]).detach().cpu().clone())

        def load(*args, **kwargs):
            pipe = real(*args, **kwargs)
            pipe.text_encoder.register_forward_pre_hook(record, with_kwargs=True)
            return pipe

        monkeypatch.setattr(harness.pretrained, "load_pipeline", load)

    def run(self, *argv, **kwargs) -> dict:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.ids, self.updates = [], 0

        def count(optimizer, args, kwargs):
            self.updates += 1

        handle = register_optimizer_step_post_hook(count)
        try:
            run_id = finetune.main(list(argv), arm=kwargs.pop("arm", "dreambooth"), **kwargs)
        finally:
            handle.remove()
        losses = [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "loss"), key=lambda m: m.step)]
        return {"run_id": run_id, "ids": self.ids, "updates": self.updates, "loss": losses}


def _token_ids(pipe_dir: Path, prompt: str) -> torch.Tensor:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(pipe_dir, subfolder="tokenizer")
    return tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids[0]


@pytest.mark.parametrize("arm", sorted(finetune.ARMS))
def test_arm_trains_only_its_modules_and_logs_everything(arm, mlflow_store, tiny_phantom, tiny_pipeline_dir,
                                                          tmp_path):
    run_id = finetune.main(_args(tiny_phantom, tiny_pipeline_dir, tmp_path / "out"), arm=arm)

    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["arm"] == arm and run.data.params["steps"] == "4"
    assert run.data.params["resolution_px"] == "32"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4]
    assert len(client.get_metric_history(run_id, "lr")) == 4
    assert client.get_metric_history(run_id, "throughput_images_per_s")[-1].value > 0
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].tags[0].value == "training"
    artifacts = {a.path for a in client.list_artifacts(run_id, "grids")}
    assert {"grids/step_000002.png", "grids/step_000004.png", "grids/iterations_vs_prompts.png"} <= artifacts
    grid = Image.open(client.download_artifacts(run_id, "grids/step_000004.png", str(tmp_path)))
    assert grid.size == (6 * MIN_TILE, STRIP + MIN_TILE)  # 5 findings + no finding, labelled, one seed

    # Each checkpoint is a full pipeline in MLflow; only the arm's modules moved.
    uri = run.data.tags["harness.checkpoint.000004"]
    ckpt = pipeline_dir_of(uri, tmp_path / "dl")
    for module in ("unet", "text_encoder", "vae"):
        moved = _changed(_weights(tiny_pipeline_dir, module), _weights(ckpt, module))
        assert moved == (module in finetune.ARMS[arm]), module


def test_checkpoint_reloads_and_generates(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    run_id = finetune.main(_args(tiny_phantom, tiny_pipeline_dir, tmp_path / "out", 2, 2), arm="dreambooth")
    uri = MlflowClient().get_run(run_id).data.tags["harness.checkpoint.000002"]
    import pandas as pd

    model = mlflow.pyfunc.load_model(uri)
    images = model.predict(pd.DataFrame({"prompt": ["a frontal chest x-ray showing edema"], "seed": [1],
                                         "num_inference_steps": [2]}))
    assert images.shape == (1, 32, 32, 3) and images.dtype == "uint8"


@pytest.mark.slow
def test_resume_after_kill_9(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "harness.finetune", "--arm", "dreambooth",
           *_args(tiny_phantom, tiny_pipeline_dir, out, 12, 3)]
    env = {**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "checkpoints" / "step_000003"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    client = MlflowClient()
    (killed,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert killed.info.status == "RUNNING"  # what kill -9 leaves behind ...

    run_id = finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 12, 3), arm="dreambooth")
    assert client.get_run(killed.info.run_id).info.status == "KILLED"  # ... is reaped
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["harness.resumed_from"] == killed.info.run_id
    resumed_at = int(run.data.tags["harness.resumed_at_step"])
    assert 3 <= resumed_at < 12
    assert run.data.tags["harness.step"] == "12"
    assert sorted({m.step for m in client.get_metric_history(run_id, "loss")}) == list(range(1, 13))


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_checkpoint(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(finetune.NonFiniteLossError, match="loss is (nan|inf) at step"):
        finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 20, 1, "--learning_rate", "1e30",
                            "--max_grad_norm", "0"), arm="dreambooth")
    (run,) = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["harness.error"]
    assert (out / "checkpoints" / "step_000001" / "pipeline" / "model_index.json").is_file()


@pytest.mark.parametrize("bad, message", [
    ("not-a-dir-or-hub-id", "could not load pretrained_model"),
    ("EMPTY_DIR", "not a diffusers pipeline directory"),
])
def test_bad_pretrained_model_fails_the_run_cleanly(bad, message, mlflow_store, tiny_phantom, tmp_path):
    if bad == "EMPTY_DIR":
        bad = tmp_path / "empty"
        bad.mkdir()
    with pytest.raises(ValueError, match=message):
        finetune.main(_args(tiny_phantom, bad, tmp_path / "out"), arm="dreambooth")
    (run,) = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()])
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_output_dir_of_other_parameters_is_refused(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path,
                                                   monkeypatch):
    out, watch = tmp_path / "out", _Watch(monkeypatch)
    # unfinished: stopped at its step-2 checkpoint of 4, so the folder holds a resumable state
    first = watch.run(*_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2), on_checkpoint=lambda step, run_id: True)
    assert first["updates"] == 2
    with pytest.raises(ValueError, match="holds a run with other parameters"):
        finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2, "--learning_rate", "3e-4"),
                      arm="dreambooth")
    # --resume never overwrites it: all 4 steps trained from the pretrained weights, nothing resumed
    again = watch.run(*_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2, "--learning_rate", "3e-4",
                             "--resume", "never"))
    tags = MlflowClient().get_run(again["run_id"]).data.tags
    assert "harness.resumed_from" not in tags and "harness.resumed_at_step" not in tags
    assert again["updates"] == 4 and len(again["loss"]) == 4
    assert json.loads((out / "run.json").read_text())["run_id"] == again["run_id"]


@pytest.mark.slow
def test_rerun_of_a_finished_run_trains_again(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 2, 2), arm="dreambooth")
    again = MlflowClient().get_run(finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 2, 2), arm="dreambooth"))
    assert "harness.resumed_from" not in again.data.tags and "harness.checkpoint.000002" in again.data.tags
    assert len(MlflowClient().get_metric_history(again.info.run_id, "loss")) == 2


@pytest.mark.slow
def test_mlflow_run_entry_point(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    """The user's form: `mlflow run . -e dreambooth -P steps=... --env-manager local`."""
    root = Path(finetune.__file__).parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HARNESS_OUTPUT_DIR": str(tmp_path / "outputs")}
    params = {"data": f"chexpert:{tiny_phantom}", "pretrained_model": str(tiny_pipeline_dir), "steps": "2",
              "batch_size": "4", "checkpoint_every": "2", "learning_rate": "1e-4"}
    cmd = [sys.executable, "-m", "mlflow", "run", str(root), "-e", "dreambooth", "--env-manager", "local",
           "--experiment-name", "cli"]
    for key, value in params.items():
        cmd += ["-P", f"{key}={value}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("cli").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["learning_rate"] == "1e-4" and run.data.params["arm"] == "dreambooth"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "loss")] == [1, 2]
    assert "harness.checkpoint.000002" in run.data.tags


@pytest.mark.slow
def test_gradient_accumulation(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path, monkeypatch):
    watch = _Watch(monkeypatch)
    run = watch.run(*_args(tiny_phantom, tiny_pipeline_dir, tmp_path / "out", 2, 2,
                           "--gradient_accumulation_steps", "2"))
    assert MlflowClient().get_run(run["run_id"]).info.status == "FINISHED"
    # steps count optimizer updates: 2 steps x 2 accumulated batches, one update per step
    assert [m.step for m in MlflowClient().get_metric_history(run["run_id"], "loss")] == [1, 2]
    assert len(run["ids"]) == 4 and run["updates"] == 2
    plain = watch.run(*_args(tiny_phantom, tiny_pipeline_dir, tmp_path / "plain", 2, 2))
    assert len(plain["ids"]) == 2 and plain["updates"] == 2


@pytest.mark.slow
def test_prior_preservation_adds_the_class_prompt_and_its_weighted_loss(mlflow_store, tiny_phantom,
                                                                       tiny_pipeline_dir, tmp_path, monkeypatch):
    """Each step also trains on the base's own class-prompt images; the loss is the instance loss
    + prior_loss_weight x the prior loss (the same draws at step 1 for every weight, so the
    step-1 loss is linear in the weight)."""
    watch, class_ids = _Watch(monkeypatch), _token_ids(tiny_pipeline_dir, "a photo")
    runs = {w: watch.run(*_args(tiny_phantom, tiny_pipeline_dir, tmp_path / f"w{w}", 1, 1, "--prior_preservation",
                                "--num_class_images", "4", "--prior_loss_weight", str(w)))
            for w in (0, 1, 2)}
    (ids,) = runs[1]["ids"]
    assert ids.shape[0] == 2 * 4  # the batch of 4, then 4 class images
    assert (ids[4:] == class_ids).all() and not (ids[:4] == class_ids).all(dim=1).any()
    loss = {w: run["loss"][0] for w, run in runs.items()}
    assert loss[1] - loss[0] > 1e-4  # the prior's loss counts ...
    assert loss[2] - loss[1] == pytest.approx(loss[1] - loss[0], rel=1e-3)  # ... times its weight


def test_missing_image_fails_clearly_or_is_skipped_and_counted(mlflow_store, tiny_phantom, tiny_pipeline_dir,
                                                               tmp_path):
    import shutil

    import pandas as pd

    data = tmp_path / "copy" / tiny_phantom.name
    shutil.copytree(tiny_phantom, data)
    first = pd.read_csv(data / "train.csv").query("`Frontal/Lateral` == 'Frontal'")["Path"].iloc[0]
    missing = data.parent / first
    missing.unlink()
    with pytest.raises(Exception, match=missing.name):
        finetune.main(_args(data, tiny_pipeline_dir, tmp_path / "a", 2, 2), arm="dreambooth")
    client = MlflowClient()
    (failed,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert failed.info.status == "FAILED"

    run_id = finetune.main(_args(data, tiny_pipeline_dir, tmp_path / "b", 2, 2, "--skip_bad"), arm="dreambooth")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["skipped_missing_images"] == 1


@pytest.mark.slow
def test_caption_dropout_and_min_snr_options(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path, monkeypatch):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--arm", "dreambooth", "--caption_dropout", "1.0"])
    with pytest.raises(SystemExit):
        finetune.parse_args(["--arm", "dreambooth", "--snr_gamma", "-1"])
    args = finetune.parse_args(["--arm", "dreambooth"])
    assert args.caption_dropout == 0.1 and args.snr_gamma == 5.0  # the measured defaults
    # both change what is learned: a different run key (resume identity)
    assert finetune.run_key(args) != finetune.run_key(finetune.parse_args(["--arm", "dreambooth", "--snr_gamma", "0"]))

    watch, empty = _Watch(monkeypatch), _token_ids(tiny_pipeline_dir, "")

    def run(name, dropout, gamma, steps=2):
        return watch.run(*_args(tiny_phantom, tiny_pipeline_dir, tmp_path / name, steps, steps,
                                "--caption_dropout", str(dropout), "--snr_gamma", str(gamma)))

    def dropped(result):
        rows = torch.cat(result["ids"])
        return int((rows == empty).all(dim=1).sum()), len(rows)

    # caption dropout: some of the 8 training prompts become the empty prompt; none without it
    half = run("dropout", 0.5, 0)
    assert MlflowClient().get_run(half["run_id"]).data.params["caption_dropout"] == "0.5"
    n, of = dropped(half)
    assert of == 8 and 0 < n < of
    plain = run("plain", 0, 0)
    assert dropped(plain) == (0, 8)
    # min-SNR: each image's loss x min(SNR, gamma) / SNR (epsilon prediction), same draws at step 1;
    # a gamma above every timestep's SNR weighs 1, a small one weighs high-SNR timesteps down
    assert run("gamma_large", 0, 1e4)["loss"][0] == pytest.approx(plain["loss"][0], rel=1e-6)
    assert run("gamma_small", 0, 0.05)["loss"][0] < 0.9 * plain["loss"][0]


@pytest.mark.slow
def test_ema_checkpoints_hold_the_warmed_up_average_of_the_raw_weights(mlflow_store, tiny_phantom,
                                                                     tiny_pipeline_dir, tmp_path):
    """Same seed, same raw trajectory: the EMA run's step-4 UNet is the average (decay
    min(0.5, 1 - (1 + s)^-2/3), s = step - 1) of the raw run's per-step UNets."""
    raw_out, ema_out = tmp_path / "raw", tmp_path / "ema"
    finetune.main(_args(tiny_phantom, tiny_pipeline_dir, raw_out, 4, 1, "--keep_checkpoints", "1", "--ema_decay", "0"),
                  arm="dreambooth")
    finetune.main(_args(tiny_phantom, tiny_pipeline_dir, ema_out, 4, 4, "--ema_decay", "0.5"), arm="dreambooth")
    raw = [_weights(raw_out / "checkpoints" / f"step_{s:06d}" / "pipeline", "unet") for s in range(1, 5)]
    average = raw[0]
    for s, weights in enumerate(raw[1:], start=1):
        decay = min(0.5, 1 - (1 + s) ** (-2 / 3))
        average = {k: decay * average[k] + (1 - decay) * weights[k] for k in average}
    saved = _weights(ema_out / "checkpoints" / "step_000004" / "pipeline", "unet")
    assert _changed(raw[-1], saved)  # not the raw weights ...
    for k in saved:  # ... but their average
        torch.testing.assert_close(saved[k], average[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(SystemExit):
        finetune.parse_args(["--arm", "dreambooth", "--ema_decay", "1.0"])


# --- fault probe (issue 12, section 3) ---------------------------------------------------------
def _runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time ASC"])


def _checkpoint_steps(run_id: str) -> list[int]:
    tags = MlflowClient().get_run(run_id).data.tags
    return sorted(int(k.rsplit(".", 1)[1]) for k in tags if k.startswith("harness.checkpoint."))


@pytest.mark.slow
def test_resumed_run_owns_every_checkpoint_of_the_run_it_continues(mlflow_store, tiny_phantom, tiny_pipeline_dir,
                                                                  tmp_path, monkeypatch):
    """Killed while logging the step-4 checkpoint (on disk, its logged model PENDING): the rerun
    lists steps 2 (logged by the first run), 4 (logged now, from disk) and 6, and the first run's
    half-logged model is FAILED."""
    import registry.pyfunc

    from harness.generate import checkpoint_uri

    out, real = tmp_path / "out", registry.pyfunc.log_pipeline

    def killed_at_step_4(path, name, **kwargs):
        if name == "checkpoint-000004":
            mlflow.initialize_logged_model(name=name)  # what the upload had got to: a PENDING model
            raise KeyboardInterrupt
        return real(path, name=name, **kwargs)

    monkeypatch.setattr(registry.pyfunc, "log_pipeline", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 6, 2), arm="dreambooth")
    (first,) = _runs()
    assert _checkpoint_steps(first.info.run_id) == [2]
    monkeypatch.setattr(registry.pyfunc, "log_pipeline", real)

    run_id = finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 6, 2), arm="dreambooth")
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["harness.resumed_at_step"] == "4"
    assert _checkpoint_steps(run_id) == [2, 4, 6]
    assert checkpoint_uri(run_id, 2) == first.data.tags["harness.checkpoint.000002"]  # the pipeline's lookup
    assert pipeline_dir_of(checkpoint_uri(run_id, 4), tmp_path / "dl").is_dir()
    models = client.search_logged_models([first.info.experiment_id],
                                         filter_string=f"source_run_id = '{first.info.run_id}'")
    assert {m.name: str(m.status) for m in models} == {"checkpoint-000002": "READY", "checkpoint-000004": "FAILED"}


@pytest.mark.slow
def test_second_fine_tune_in_the_same_folder_fails_at_once_naming_the_holder(mlflow_store, tiny_phantom,
                                                                              tiny_pipeline_dir, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from harness import finetune\n"
         "with finetune._locked(Path(sys.argv[1])) as lock:\n"
         "    lock.holder('run-of-the-first'); print('locked', flush=True); time.sleep(120)", str(out)],
        env={**os.environ, "PYTHONPATH": str(Path(finetune.__file__).parents[1])}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (out / "run.json").write_text('{"run_key": "x", "run_id": "y"}')
        started = time.perf_counter()
        with pytest.raises(finetune.OutputDirBusyError, match=f"process {holder.pid} .*run-of-the-first"):
            finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 2, 2), arm="dreambooth")
        assert time.perf_counter() - started < 5
        assert _runs() == [] and (out / "run.json").read_text() == '{"run_key": "x", "run_id": "y"}'
    finally:
        holder.kill()
        holder.wait()
    (out / "run.json").unlink()
    # the holder is gone, so is its lock
    assert MlflowClient().get_run(finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 2, 2),
                                                arm="dreambooth")).info.status == "FINISHED"


class _Planted:
    """A pickle that, once loaded, creates the file named by ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.slow
def test_resume_loads_no_pickle_from_the_output_folder_and_restores_the_weight_average(
        mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    def stop_at_2(step, run_id):
        if step == 2:
            raise RuntimeError("stopped")

    whole, out = tmp_path / "whole", tmp_path / "out"
    finetune.main(_args(tiny_phantom, tiny_pipeline_dir, whole, 4, 2, "--ema_decay", "0.9"), arm="dreambooth")
    with pytest.raises(RuntimeError, match="stopped"):
        finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2, "--ema_decay", "0.9"), arm="dreambooth",
                      on_checkpoint=stop_at_2)
    state = out / "checkpoints" / "step_000002" / "state"
    marker = tmp_path / "pwned"
    torch.save(_Planted(marker), state / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl is a pickle that this version never writes"):
        finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2, "--ema_decay", "0.9"), arm="dreambooth")
    assert not marker.exists()

    (state / "custom_checkpoint_0.pkl").unlink()
    run_id = finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2, "--ema_decay", "0.9"), arm="dreambooth")
    assert MlflowClient().get_run(run_id).data.tags["harness.resumed_at_step"] == "2"
    assert sorted(p.name for p in state.glob("ema_*")) == ["ema_0.safetensors"]
    # interrupted and resumed, the step-4 average is the uninterrupted run's: the average was restored
    resumed = _weights(out / "checkpoints" / "step_000004" / "pipeline", "unet")
    expected = _weights(whole / "checkpoints" / "step_000004" / "pipeline", "unet")
    for k in expected:
        torch.testing.assert_close(resumed[k], expected[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps 0: must be at least 1"),
    (["--learning_rate", "-0.001"], "--learning_rate -0.001: must be positive"),
    (["--learning_rate", "0"], "--learning_rate 0.0: must be positive"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be positive"),
    (["--prior_preservation", "--num_class_images", "0"], "--num_class_images 0: --prior_preservation needs at least 1"),
    (["--data", "dicom:/data/x"], "unknown data format 'dicom'"),
    (["--data", "/data/CheXpert-v1.0-small"], "has no format"),
    (["--log_every", "0"], "--log_every 0: must be at least 1"),
    (["--lr_warmup_steps", "-1"], "--lr_warmup_steps -1: must not be negative"),
])
def test_bad_arguments_fail_before_any_model_loads(extra, message, capsys):
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        finetune.parse_args(["--arm", "dreambooth", *extra])
    assert exit_info.value.code == 2 and time.perf_counter() - started < 1
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("host", ["this", "another"])
@pytest.mark.slow
def test_rerun_cleans_up_a_run_that_died_with_the_tracking_server(host, mlflow_store, tiny_phantom,
                                                                  tiny_pipeline_dir, tmp_path):
    """A tracking-server outage crashed the fine-tune where it could not end its run: RUNNING, a
    dead pid, a PENDING logged model. The rerun of the same command ends it (also when it ran on
    another host, which the pid-keyed reaper cannot judge) and fails the model."""
    import socket

    def crash_at_2(step, run_id):
        raise RuntimeError("tracking server unreachable")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2), arm="dreambooth", on_checkpoint=crash_at_2)
    (crashed,) = _runs()
    client, dead_id = MlflowClient(), crashed.info.run_id
    # ... as the outage left it: never ended, its process gone, an upload never finalized
    client.update_run(dead_id, status="RUNNING")
    client.set_tag(dead_id, "harness.pid", "999999999")
    client.set_tag(dead_id, "harness.host", socket.gethostname() if host == "this" else "elsewhere")
    pending = client.create_logged_model(crashed.info.experiment_id, name="checkpoint-000004",
                                         source_run_id=dead_id)
    assert str(client.get_logged_model(pending.model_id).status) == "PENDING"

    run_id = finetune.main(_args(tiny_phantom, tiny_pipeline_dir, out, 4, 2), arm="dreambooth")
    assert client.get_run(dead_id).info.status == "KILLED"
    assert str(client.get_logged_model(pending.model_id).status) == "FAILED"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["harness.resumed_from"] == dead_id


def test_repeat_factor_sampling_repeats_rare_findings_and_keeps_every_image():
    import pandas as pd

    # 10 images: "a" positive in 1 (f 0.1), "b" in 5 (f 0.5), one uncertain "a" (-1 is not said),
    # none positive in 4; a "No Finding" column is not a finding to repeat for
    table = pd.DataFrame({"a": [1.0, 0, 0, 0, 0, 0, -1.0, 0, 0, 0],
                          "b": [0, 1.0, 1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0],
                          "No Finding": [0, 0, 0, 0, 0, 0, 1.0, 1.0, 1.0, 1.0]})
    counts = pd.Series(finetune.repeat_indices(table, ["a", "b", "No Finding"], 0.4, seed=0)).value_counts()
    assert set(counts.index) == set(range(10))  # every image at least once
    assert counts[0] == 2  # sqrt(0.4 / 0.1) = 2 exactly
    assert all(counts[i] == 1 for i in range(1, 10))  # sqrt(0.4 / 0.5) < 1, and the rest have no positive
    # a fractional factor rounds up or down at random, fixed by the seed: the mean repeat is the factor
    draws = [finetune.repeat_indices(table, ["a", "b"], 0.9, seed=s).count(0) for s in range(400)]
    assert set(draws) == {3} and finetune.repeat_indices(table, ["a", "b"], 0.9, seed=1) == \
        finetune.repeat_indices(table, ["a", "b"], 0.9, seed=1)
    halves = [finetune.repeat_indices(table, ["a", "b"], 0.625, seed=s).count(0) for s in range(400)]
    assert set(halves) == {2, 3} and abs(sum(halves) / 400 - 2.5) < 0.1  # sqrt(6.25) = 2.5
    with pytest.raises(SystemExit):
        finetune.parse_args(["--arm", "dreambooth", "--repeat_threshold", "-1"])
    assert finetune.parse_args(["--arm", "dreambooth"]).repeat_threshold == 0.0


@pytest.mark.slow
def test_repeat_threshold_run_trains_on_the_repeated_epoch(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    run_id = finetune.main(_args(tiny_phantom, tiny_pipeline_dir, tmp_path / "out", 2, 2, "--repeat_threshold", "1"),
                           arm="dreambooth")
    run = MlflowClient().get_run(run_id)
    params = run.data.params
    assert run.info.status == "FINISHED" and params["repeat_threshold"] == "1.0"
    # every image once, and the images of findings rarer than t = 1 again
    assert int(params["n_samples_per_epoch"]) > int(params["n_train_images"])
    plain = finetune.parse_args(["--arm", "dreambooth"])
    assert finetune.run_key(plain) != finetune.run_key(finetune.parse_args(["--arm", "dreambooth",
                                                                             "--repeat_threshold", "1"]))


@pytest.mark.slow
def test_base_is_keyed_by_its_version_so_a_rebuilt_base_is_not_resumed(mlflow_store, tiny_phantom):
    """`--pretrained_model base` names the version it resolves to: after a rebuild of the base the
    same command trains afresh from the new one instead of reusing the old base's folder and run."""
    from harness.base import build

    tiny = ["--preset", "tiny", "--vae_steps", "1", "--unet_steps", "1", "--n_scenes", "8", "--n_radiographs", "4",
            "--batch_size", "2", "--no_samples"]
    argv = ["--data", f"chexpert:{tiny_phantom}", "--pretrained_model", "base", "--steps", "2", "--batch_size", "4",
            "--checkpoint_every", "2", "--grid_steps", "2", "--grid_seeds", "1"]
    seen = []
    for extra in ([], ["--force", "true"]):
        base = build.main(tiny + extra)["registered"]
        run = MlflowClient().get_run(finetune.main(argv, arm="dreambooth"))
        seen.append((base, run.data.params["pretrained_model"], run.data.tags["harness.run_key"]))
        assert run.info.status == "FINISHED" and "harness.resumed_from" not in run.data.tags
    (base1, used1, key1), (base2, used2, key2) = seen
    assert base1 != base2 and (used1, used2) == (base1, base2) and key1 != key2
