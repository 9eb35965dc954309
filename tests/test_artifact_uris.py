"""No shared disk needed: a generate run logs its data set as an artifact, and every data spec takes
an MLflow artifact URI as its PATH (``harness.artifacts``), downloaded once into a local cache.

The end-to-end test is the shared-server setup: a real ``mlflow server --artifacts-destination``;
generate in one folder, delete that folder and every cache, classify by URI from another."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import artifacts, classify, generate
from harness.data import load_table

FAST = ["--epochs", "1", "--batch_size", "8", "--n_resamples", "50", "--threads", "1", "--resolution", "32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _generate(checkpoint, *extra) -> str:
    return generate.main(["--checkpoint", str(checkpoint), "--n_per_prompt", "3", "--batch_size", "18",
                          "--num_inference_steps", "2", "--threads", "1", *extra])


@pytest.mark.slow
def test_classify_by_uri_on_another_machine(mlflow_server, tiny_pipeline_dir, tiny_phantom, tmp_path, monkeypatch):
    """Generate in one folder; with that folder and every local cache gone (another worker), classify
    reads the data set by its run's artifact URI alone; the real test data stays where it is."""
    (tmp_path / "worker_a").mkdir()
    monkeypatch.chdir(tmp_path / "worker_a")
    gen = _generate(tiny_pipeline_dir)
    tags = MlflowClient().get_run(gen).data.tags
    uri = tags[generate.GENERATED_URI_TAG]
    assert uri == f"chexpert:runs:/{gen}/synthetic" == generate.generated_spec(gen)
    logged = {a.path for a in MlflowClient().list_artifacts(gen, "synthetic")}
    assert {"synthetic/generate.json", "synthetic/prompts.csv", "synthetic/CheXpert-v1.0-small"} <= logged

    monkeypatch.chdir(tmp_path)
    shutil.rmtree(tmp_path / "worker_a")  # the generating machine's disk, gone
    shutil.rmtree(tmp_path / ".cache", ignore_errors=True)  # HARNESS_CACHE_DIR: every local cache
    (tmp_path / "worker_b").mkdir()
    monkeypatch.chdir(tmp_path / "worker_b")

    run = mlflow.get_run(classify.main(["--train", uri, "--test", f"chexpert:{tiny_phantom}", *FAST]))
    assert run.info.status == "FINISHED"
    assert run.data.params["train"] == uri  # the run records the URI, not this machine's copy
    assert run.data.tags["harness.generate_run"] == gen  # generate.json came with the images
    # 2 train + 1 valid image per prompt: the generated set's own valid.csv selects the model
    assert (run.data.params["n_train_images"], run.data.params["n_valid_images"]) == ("12", "6")
    (entry,) = (tmp_path / ".cache" / "artifacts").iterdir()  # downloaded once, keyed by the URI
    assert json.loads((entry / artifacts.MANIFEST).read_text())["uri"] == f"runs:/{gen}/synthetic"

    # A second step on this machine reads the cache: nothing is downloaded again.
    def no_download(**kwargs):
        raise AssertionError(f"downloaded again: {kwargs}")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", no_download)
    assert artifacts.local_spec(uri) == f"chexpert:{entry / 'synthetic'}"
    monkeypatch.undo()

    # The same folder by its mlflow-artifacts:/ URI, and a subfolder of it, with options.
    root = MlflowClient().get_run(gen).info.artifact_uri
    assert root.startswith("mlflow-artifacts:")
    table = load_table(artifacts.local_spec(f"chexpert:{root}/synthetic/CheXpert-v1.0-small?holdout=0"), "valid",
                       views="all")
    assert len(table) == 6


def test_the_generating_host_reads_its_folder_in_place(mlflow_store, tiny_pipeline_dir, tmp_path, monkeypatch):
    """While the folder a run logged is still there, unchanged, on this host, a URI into it is that
    folder (no download); once it changes or goes, the URI downloads."""
    out = tmp_path / "gen"
    gen = _generate(tiny_pipeline_dir, "--output_dir", str(out))
    uri = generate.generated_spec(gen)
    copy = json.loads(MlflowClient().get_run(gen).data.tags[artifacts.LOCAL_COPY_TAG + "synthetic"])
    assert (copy["host"], copy["path"]) == (socket.gethostname(), str(out))
    assert artifacts.local_spec(uri) == f"chexpert:{out}"
    assert artifacts.local_spec(f"{uri}/CheXpert-v1.0-small?holdout=0") == f"chexpert:{out / 'CheXpert-v1.0-small'}?holdout=0"
    assert not (tmp_path / ".cache" / "artifacts").exists()

    (out / "prompts.csv").write_text("changed\n")  # no longer what the run logged
    local = artifacts.local_spec(uri)
    assert local.startswith(f"chexpert:{tmp_path / '.cache' / 'artifacts'}")
    assert len(load_table(local, "train", views="all")) == 12


def test_uri_errors_name_what_is_wrong(mlflow_store, tmp_path):
    with mlflow.start_run() as run:
        mlflow.log_text("x", "other/file.txt")
    with pytest.raises(FileNotFoundError, match=f"runs:/{run.info.run_id}/synthetic cannot be downloaded"):
        artifacts.local_spec(f"chexpert:runs:/{run.info.run_id}/synthetic")
    with pytest.raises(ValueError, match="names a model, not a data set"):
        artifacts.local_spec("chexpert:models:/cxr-sd-phantom@champion")
    with pytest.raises(ValueError, match="unknown data format"):
        artifacts.local_spec("chexpret:runs:/abc/synthetic")
    with pytest.raises(FileNotFoundError, match="is an MLflow artifact URI; download it first"):
        load_table("chexpert:runs:/abc/synthetic")  # the data layer itself never talks to MLflow
    assert artifacts.local_spec("phantom") == "phantom"
    assert artifacts.local_spec(f"chexpert:{tmp_path}?holdout=0.2") == f"chexpert:{tmp_path}?holdout=0.2"
    assert list((tmp_path / ".cache" / "artifacts").iterdir()) == []  # a failed download leaves nothing behind


def test_a_download_is_atomic_and_the_first_one_wins(mlflow_store, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.txt").write_text("a")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), "set")
    uri = f"runs:/{run.info.run_id}/set"
    entry = tmp_path / "entry"
    first = artifacts._download(uri, entry)
    assert first == entry / "set" and (first / "sub" / "a.txt").read_text() == "a"
    # a second process that downloaded at the same time keeps the first's folder
    assert artifacts._download(uri, entry) == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # a download killed midway leaves only its temporary folder, which the next download removes
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".{'ab' * 12}.tmp-{artifacts._host()}.{dead.pid}.x1y2"
    stale.mkdir()
    other_host = tmp_path / f".{'ef' * 12}.tmp-elsewhere.{dead.pid}.x1y2"
    other_host.mkdir()
    assert artifacts.remove_stale_downloads(tmp_path) == [stale]
    assert other_host.exists()


@pytest.mark.slow
def test_finetune_and_data_prompts_read_real_data_by_uri(mlflow_store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    """Any data spec may be a URI: here real data logged as a run's artifact, fine-tuned on and
    drawn from for data prompts (the fine-tune's --data, inherited by generate)."""
    from harness import finetune

    with mlflow.start_run() as logged:
        mlflow.log_artifacts(str(tiny_phantom), "real")
    uri = f"chexpert:runs:/{logged.info.run_id}/real"
    tuned = finetune.main(["--arm", "dreambooth", "--data", uri, "--pretrained_model", str(tiny_pipeline_dir),
                           "--steps", "1", "--batch_size", "4", "--checkpoint_every", "1", "--grid_steps", "1",
                           "--grid_seeds", "1", "--output_dir", str(tmp_path / "tuned")])
    run = MlflowClient().get_run(tuned)
    assert run.info.status == "FINISHED" and run.data.params["data"] == uri
    gen = MlflowClient().get_run(generate.main(["--run_id", tuned, "--prompts", "data", "--n_per_prompt", "1",
                                                "--batch_size", "6", "--num_inference_steps", "1", "--threads", "1"]))
    assert gen.info.status == "FINISHED" and gen.data.params["prompt_data_used"] == uri
    (entry,) = (tmp_path / ".cache" / "artifacts").iterdir()  # one download, shared by both steps
    assert json.loads((entry / artifacts.MANIFEST).read_text())["uri"] == f"runs:/{logged.info.run_id}/real"
