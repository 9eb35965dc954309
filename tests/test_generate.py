"""The generate entry point, run for real on the tiny pipeline (and a tiny fine-tuning run)."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from harness import finetune, generate
from harness.data import DataSpec, load_table
from harness.data.prompts import NO_FINDING
from harness.grids import MIN_TILE, STRIP
from harness.pathologies import FINDINGS

PROMPTS = len(FINDINGS) + 1


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory):
    """An empty MLflow store with its schema created (creating it takes seconds; copying it, ms)."""
    root = tmp_path_factory.mktemp("store")
    cwd = os.getcwd()
    os.chdir(root)  # the Default experiment's artifact location is recorded relative to here
    try:
        MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()
    finally:
        os.chdir(cwd)
    return root / "mlflow.db"


@pytest.fixture
def store(mlflow_store, migrated_db, tmp_path):
    """conftest's mlflow_store, started from a copy of the migrated empty store."""
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    return mlflow_store


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(checkpoint, out, *extra, n=3, batch=4):
    source = ["--run_id", checkpoint] if extra[:1] == ("RUN",) else ["--checkpoint", str(checkpoint)]
    extra = extra[1:] if extra[:1] == ("RUN",) else extra
    return generate.main([*source, "--n_per_prompt", str(n), "--batch_size", str(batch),
                          "--num_inference_steps", "2", "--output_dir", str(out), *extra])


def _only_run():
    client = MlflowClient()
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run


def _pixels(out: Path) -> dict[str, np.ndarray]:
    with open(out / "prompts.csv") as fh:
        return {row["path"]: np.asarray(Image.open(out / row["path"]), dtype=np.int16) for row in csv.DictReader(fh)}


def test_writes_a_chexpert_data_set_labelled_by_prompt(store, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "gen"
    run_id = _run(tiny_pipeline_dir, out, n=3, batch=4)  # batches of 4 span prompts

    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    spec = run.data.tags["harness.generated_data"]
    assert spec == f"chexpert:{out / 'CheXpert-v1.0-small'}"
    assert run.data.tags["harness.source_checkpoint"] == str(tiny_pipeline_dir)
    assert run.data.params["n_per_prompt"] == "3" and run.data.params["resolution_px"] == "32"
    assert run.data.metrics["n_images"] == 3 * PROMPTS and run.data.metrics["throughput_images_per_s"] > 0
    assert {i.tags[0].value for i in run.inputs.dataset_inputs} == {"generated"}

    # read back by the real loader: 2 train + 1 valid image per prompt, labels from the prompt
    with open(out / "prompts.csv") as fh:
        provenance = {row["path"]: row for row in csv.DictReader(fh)}
    labels = FINDINGS + [NO_FINDING]
    for split, per_prompt in (("train", 2), ("valid", 1)):
        table = load_table(DataSpec.parse(spec), split=split, labels=labels)
        assert len(table) == per_prompt * PROMPTS
        for row in table.to_dict("records"):
            made_by = provenance[str(Path(row["path"]).relative_to(out))]
            assert made_by["split"] == split
            assert {l: row[l] for l in labels} == {l: float(l == made_by["labels"]) for l in labels}
            image = Image.open(row["path"])
            assert (image.format, image.mode, image.size) == ("JPEG", "L", (32, 32))
    # the default loader (five findings) reads it too: each finding has positives
    assert load_table(spec, split="train")[FINDINGS].sum().tolist() == [2.0] * len(FINDINGS)

    prompts = {row["labels"]: row["prompt"] for row in provenance.values()}
    assert prompts["Edema"] == "a frontal chest x-ray showing edema"
    assert prompts[NO_FINDING] == "a frontal chest x-ray with no finding"
    grid = Image.open(MlflowClient().download_artifacts(run_id, "grids/samples.png", str(tmp_path)))
    assert grid.size == (PROMPTS * MIN_TILE, STRIP + 3 * MIN_TILE)  # prompts as columns under their labels
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_data_prompts_draw_the_real_label_sets(store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    """--prompts data: as many images as the disease prompts would make, each prompted and labelled
    with the findings of a row of the real train split (co-occurring findings included)."""
    spec = f"chexpert:{tiny_phantom}"
    out = tmp_path / "gen"
    run_id = _run(tiny_pipeline_dir, out, "--prompts", "data", "--prompt_data", spec, "--seed", "3", n=4, batch=8)
    run = MlflowClient().get_run(run_id)
    assert run.data.params["prompt_data_used"] == spec
    real = {frozenset(s) for s in generate.data_label_sets(spec)}
    with open(out / "prompts.csv") as fh:
        made = list(csv.DictReader(fh))
    assert len(made) == 4 * PROMPTS and run.data.metrics["n_images"] == 4 * PROMPTS
    assert sum(row["split"] == "valid" for row in made) == round(0.1 * 4 * PROMPTS)
    tables = {split: load_table(DataSpec.parse(f"chexpert:{out / 'CheXpert-v1.0-small'}"), split=split,
                                labels=FINDINGS + [NO_FINDING]) for split in ("train", "valid")}
    by_path = {str(Path(p).relative_to(out)): r for t in tables.values() for p, r in zip(t["path"], t.to_dict("records"))}
    for row in made:
        positives = [] if row["labels"] == NO_FINDING else row["labels"].split("|")
        assert frozenset(positives) in real  # a label set the real data has
        assert all(f.lower() in row["prompt"] for f in positives)
        assert ("no finding" in row["prompt"]) == (not positives)
        labels = by_path[row["path"]]
        assert [f for f in FINDINGS if labels[f] == 1.0] == positives
        assert labels[NO_FINDING] == float(not positives)
    # the grid still shows the disease prompts
    grid = Image.open(MlflowClient().download_artifacts(run_id, "grids/samples.png", str(tmp_path)))
    assert grid.size == (PROMPTS * MIN_TILE, STRIP + 4 * MIN_TILE)
    # seeded: the same seed draws the same label sets
    _run(tiny_pipeline_dir, tmp_path / "again", "--prompts", "data", "--prompt_data", spec, "--seed", "3", n=4, batch=8)
    with open(tmp_path / "again" / "prompts.csv") as fh:
        assert [r["prompt"] for r in csv.DictReader(fh)] == [r["prompt"] for r in made]


def test_data_prompts_from_a_set_without_such_views_fail_the_run(store, tiny_pipeline_dir, tmp_path):
    frontal_only = MlflowClient().get_run(_run(tiny_pipeline_dir, tmp_path / "frontal", n=1, batch=6))
    spec = frontal_only.data.tags["harness.generated_data"]
    with pytest.raises(ValueError, match=r"no rows in .* for split='train', views='lateral'"):
        _run(tiny_pipeline_dir, tmp_path / "gen", "--prompts", "data", "--prompt_data", spec, "--view", "lateral")
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert not (tmp_path / "gen").exists()


@pytest.mark.slow
def test_seed_decides_images_and_batch_size_does_not(store, tiny_pipeline_dir, tmp_path):
    def images(name, *extra, batch=5):
        # guidance 3: the default (10) multiplies the batched-vs-single float noise by the guidance,
        # to a few grey levels in this random tiny model; the seeding is what is tested here
        _run(tiny_pipeline_dir, tmp_path / name, "--guidance_scale", "3", *extra, n=2, batch=batch)
        return _pixels(tmp_path / name)

    a, same, one_by_one, other = images("a"), images("same"), images("b1", batch=1), images("s1", "--seed", "1")
    assert all(np.array_equal(a[p], same[p]) for p in a)
    assert max(np.abs(a[p] - one_by_one[p]).max() for p in a) <= 2  # float noise through JPEG at most
    assert min(np.abs(a[p] - other[p]).mean() for p in a) > 5


@pytest.mark.parametrize("scheduler", sorted(generate.SCHEDULERS))
def test_every_scheduler_samples_and_is_batch_invariant(scheduler, tiny_pipeline_dir):
    args = generate.parse_args(["--checkpoint", str(tiny_pipeline_dir), "--scheduler", scheduler])
    pipe, source = generate.load(args)
    assert type(pipe.scheduler).__name__ == generate.SCHEDULERS[scheduler] and source == str(tiny_pipeline_dir)
    prompts, seeds = ["a frontal chest x-ray showing edema", "a frontal chest x-ray with no finding"] * 2, [1, 2, 3, 4]

    def images(batch):
        return np.stack([np.asarray(im, dtype=np.float32) for _, ims in
                         generate.sample(pipe, prompts, seeds, batch, 2, 3.0, 32) for im in ims])

    together, alone = images(4), images(1)
    assert together.shape == (4, 32, 32, 3) and np.abs(together[0] - together[2]).mean() > 1  # seeds matter
    assert np.abs(together - alone).max() <= 1


@pytest.mark.slow
def test_run_id_and_step_pick_the_checkpoint(store, tiny_phantom, tiny_pipeline_dir, tmp_path):
    ft = finetune.main(["--arm", "dreambooth", "--data", f"chexpert:{tiny_phantom}", "--pretrained_model",
                        str(tiny_pipeline_dir), "--steps", "2", "--batch_size", "2", "--checkpoint_every", "1",
                        "--grid_steps", "1", "--grid_seeds", "1", "--output_dir", str(tmp_path / "ft")])
    tags = MlflowClient().get_run(ft).data.tags
    assert generate.checkpoint_uri(ft) == tags["harness.checkpoint.000002"]  # default: the last one

    run_id = _run(ft, tmp_path / "gen", "RUN", "--step", "1.0", n=1, batch=6)  # "1.0" as MLflow passes it
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["harness.source_checkpoint"] == tags["harness.checkpoint.000001"]
    assert run.data.tags["harness.source_run"] == ft
    # named and tagged by its checkpoint, for the MLflow UI
    assert run.info.run_name == "generate · dreambooth @ 1"
    assert (run.data.tags["harness.arm"], run.data.tags["harness.step"]) == ("dreambooth", "1")
    assert load_table(run.data.tags["harness.generated_data"], split="train")[FINDINGS].sum().tolist() == [1.0] * 5

    with pytest.raises(LookupError, match=r"no checkpoint at step 7; it has steps \[1, 2\]"):
        _run(ft, tmp_path / "bad", "RUN", "--step", "7")
    with pytest.raises(LookupError, match=f"run {run_id} has no checkpoints"):
        _run(run_id, tmp_path / "bad", "RUN")
    client = MlflowClient()
    statuses = [r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert sorted(statuses) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("kind", ["empty_dir", "runs_uri_without_pipeline"])
def test_a_checkpoint_that_is_not_a_pipeline_fails_the_run(kind, store, tmp_path):
    import mlflow

    from harness import tracking

    tracking.setup()
    if kind == "empty_dir":
        bad = tmp_path / "empty"
        bad.mkdir()
    else:
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "readme.txt").write_text("not a model")
        with mlflow.start_run() as other:
            mlflow.log_artifacts(str(tmp_path / "notes"), "model")
        bad = f"runs:/{other.info.run_id}/model"
    with pytest.raises(ValueError, match=f"checkpoint '{bad}' is not a loadable Stable Diffusion pipeline"):
        _run(bad, tmp_path / "gen")
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="attributes.run_name = 'generate'")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "not a loadable Stable Diffusion pipeline" in runs[0].data.tags["harness.error"]
    assert not (tmp_path / "gen").exists()


def test_failure_mid_way_leaves_no_data_set(store, tiny_pipeline_dir, tmp_path, monkeypatch):
    real = generate.sample

    def dies_after_one_batch(*args, **kwargs):
        batches = real(*args, **kwargs)
        yield next(batches)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generate, "sample", dies_after_one_batch)
    with pytest.raises(RuntimeError, match="out of memory"):
        _run(tiny_pipeline_dir, tmp_path / "gen")
    assert _only_run().info.status == "FAILED"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".gen", "gen"))) == []


def test_existing_output_dir_is_refused(store, tiny_pipeline_dir, tmp_path):
    (tmp_path / "gen").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        _run(tiny_pipeline_dir, tmp_path / "gen")
    assert _only_run().info.status == "FAILED"


@pytest.mark.parametrize("argv, message", [
    ([], "exactly one of --checkpoint and --run_id"),
    (["--checkpoint", "x", "--run_id", "y"], "exactly one of --checkpoint and --run_id"),
    (["--checkpoint", "x", "--step", "3"], "--step needs --run_id"),
    (["--checkpoint", "x", "--n_per_prompt", "2.5"], "expected an integer"),
    (["--checkpoint", "x", "--guidance_scale", "-3"], "--guidance_scale -3.0 must be a number >= 0"),
    (["--checkpoint", "x", "--guidance_scale", "nan"], "--guidance_scale nan must be a number >= 0"),
    (["--checkpoint", "x", "--prompts", "data", "--prompt_data", "dicom:/x"], "unknown data format 'dicom'"),
])
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(argv)
    assert message in capsys.readouterr().err


def test_mlflow_style_numbers_are_accepted():
    args = generate.parse_args(["--checkpoint", "", "--run_id", "r", "--step", "-1.0", "--n_per_prompt", "400.0"])
    assert (args.step, args.n_per_prompt) == (-1, 400)


def test_guidance_help_says_what_disables_it(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    assert "1 or less disables guidance" in " ".join(capsys.readouterr().out.split())
    assert generate.parse_args(["--checkpoint", "x", "--guidance_scale", "0"]).guidance_scale == 0.0


def test_default_output_dir_is_under_HARNESS_OUTPUT_DIR(store, tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_OUTPUT_DIR", str(tmp_path / "elsewhere"))
    run_id = generate.main(["--checkpoint", str(tiny_pipeline_dir), "--n_per_prompt", "1", "--num_inference_steps",
                            "1", "--grid_rows", "1"])
    spec = MlflowClient().get_run(run_id).data.tags["harness.generated_data"]
    assert spec == f"chexpert:{tmp_path / 'elsewhere' / 'generated' / run_id / 'CheXpert-v1.0-small'}"
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_killed_generate_leaves_a_folder_that_the_next_one_removes(store, tiny_pipeline_dir, tmp_path, caplog):
    parent = tmp_path / "generated"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "MLFLOW_TRACKING_URI": store,
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "harness.generate", "--checkpoint", str(tiny_pipeline_dir),
                             "--n_per_prompt", "100000", "--batch_size", "2", "--num_inference_steps", "1",
                             "--output_dir", str(parent / "killed")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "generate.log", "w"))
    try:
        deadline = time.monotonic() + 300
        while not list(parent.glob(".killed.tmp-*/CheXpert-v1.0-small/train")):  # it is writing images
            assert proc.poll() is None, (tmp_path / "generate.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "generate never started writing"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    (stale,) = parent.glob(".killed.tmp-*")
    # a live generate's folder in the same place is left alone
    busy = parent / f".busy{generate._tmp_owner()}abc"
    busy.mkdir()
    with caplog.at_level(logging.WARNING, logger="harness.generate"):
        _run(tiny_pipeline_dir, parent / "next", n=1)
    assert not stale.exists() and busy.exists()
    assert f"removing {stale}" in caplog.text
    assert sorted(p.name for p in parent.iterdir()) == [busy.name, "next"]


# Pixels of the tiny pipeline's first image (DPM-Solver, 3 steps, guidance 5, seed 7), as diffusers'
# pipeline tests store slices: a change to sampling (scheduler set-up, guidance, seeding, dtype or
# the pipeline's assembly) that moves pixels fails here, not silently in the study's numbers.
EXPECTED_SLICE = [121, 102, 115, 172, 138, 100, 149, 130, 97]


def test_generation_matches_stored_pixels(tiny_pipeline_dir):
    config = generate.GenerateConfig(checkpoint=str(tiny_pipeline_dir))
    pipe, _ = generate.load(config)
    ((_, images),) = list(generate.sample(pipe, ["a frontal chest x-ray showing edema"], [7], batch_size=1,
                                          num_inference_steps=3, guidance_scale=5.0, resolution=32))
    image = np.asarray(images[0])
    assert image.shape == (32, 32, 3)
    got = image[-3:, -3:, -1].flatten().astype(int)
    assert np.abs(got - np.array(EXPECTED_SLICE)).max() <= 2, got.tolist()
