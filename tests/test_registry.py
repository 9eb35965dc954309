"""Registry: evaluated checkpoints become versions (once), the champion alias moves only for a
better version, racing promotions end with the better one, and ``models:/...@champion`` draws images.

The runs here are real MLflow runs holding a real (tiny) pipeline model; their metrics are set
directly, so each case controls which version is better."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from registry import promote as promote_module
from harness import promote as promote_step
from registry.promote import history, promote
from registry.pyfunc import log_pipeline
from registry.register import model_name, register_checkpoint

NAME = "cxr-sd-phantom"


def log_checkpoints(pipeline_dir, steps=(1,), arm="dreambooth") -> str:
    """A finished fine-tuning run with a logged checkpoint at each of the given steps."""
    with mlflow.start_run(run_name=arm) as run:
        mlflow.log_params({"data": "phantom", "arm": arm})
        for step in steps:
            info = log_pipeline(pipeline_dir, name=f"checkpoint-{step:06d}")
            mlflow.set_tag(f"harness.checkpoint.{step:06d}", info.model_uri)
    return run.info.run_id


@pytest.fixture
def checkpoint(mlflow_store, tiny_pipeline_dir):
    return lambda steps=(1,), arm="dreambooth": log_checkpoints(tiny_pipeline_dir, steps, arm)


def evaluation(auc: float, **extra) -> str:
    """A finished classify-like run with the metrics classify logs."""
    with mlflow.start_run(run_name="classify") as run:
        mlflow.log_metrics({"auc_macro": auc, "auc_cardiomegaly": auc, "auc_cardiomegaly_ci_low": auc - 0.1,
                            "auc_cardiomegaly_ci_high": auc + 0.05, "acc_macro": 0.7, "n_ignored": 3, **extra})
    return run.info.run_id


def versions(name=NAME):
    return sorted(MlflowClient().search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def champion(name=NAME):
    return str(MlflowClient().get_model_version_by_alias(name, "champion").version)


def test_model_name():
    assert model_name("phantom") == "cxr-sd-phantom"
    name = model_name("chexpert:/data/CheXpert-v1.0-small/")
    assert re.fullmatch(r"cxr-sd-chexpert-chexpert-v1-0-small-[0-9a-f]{8}", name)
    assert model_name("chexpert:/data/CheXpert-v1.0-small") == name  # a trailing slash is the same folder
    assert model_name("mimic:/x/mimic-cxr-jpg").startswith("cxr-sd-mimic-mimic-cxr-jpg-")


def test_model_names_differ_per_data_set(tmp_path, monkeypatch):
    # Two copies of one archive compete for one champion unless their names differ.
    a, b = model_name("chexpert:/a/CheXpert-v1.0-small"), model_name("chexpert:/b/CheXpert-v1.0-small")
    assert a != b
    monkeypatch.chdir(tmp_path)  # a relative path names the folder it points to from here
    assert model_name("chexpert:data") == model_name(f"chexpert:{tmp_path / 'data'}")


def test_register_tags_and_no_duplicate(checkpoint):
    run = checkpoint(steps=(1, 2))
    classified = evaluation(0.8, bal_acc_macro=0.6, bal_acc_cardiomegaly=0.6)
    with mlflow.start_run(run_name="checks") as checked:
        mlflow.log_metrics({"frechet_distance": 3.0, "adherence_edema": 0.7, "adherence_mean": 0.7,
                            "adherence_ceiling_mean": 0.9, "memorization_max_similarity": 0.5})
    v = register_checkpoint(run, 2, classified, checks_run_id=checked.info.run_id)
    assert (v.name, str(v.version)) == (NAME, "1")
    tags = MlflowClient().get_model_version(NAME, "1").tags
    logged = MlflowClient().get_run(classified).data.metrics
    assert tags["arm"] == "dreambooth" and tags["step"] == "2" and tags["finetune_run_id"] == run
    assert tags["classify_run_id"] == classified
    assert float(tags["auc_macro"]) == logged["auc_macro"]
    assert float(tags["auc_cardiomegaly_ci_low"]) == logged["auc_cardiomegaly_ci_low"]
    assert "n_ignored" not in tags  # only evaluation figures travel
    assert float(tags["bal_acc_macro"]) == 0.6 and float(tags["bal_acc_cardiomegaly"]) == 0.6
    assert {k: float(tags[k]) for k in ("frechet_distance", "adherence_edema", "adherence_mean",
                                        "adherence_ceiling_mean")} == {"frechet_distance": 3.0, "adherence_edema": 0.7,
                                                                       "adherence_mean": 0.7,
                                                                       "adherence_ceiling_mean": 0.9}
    assert "memorization_max_similarity" not in tags
    assert tags["source_model"] == MlflowClient().get_run(run).data.tags["harness.checkpoint.000002"]

    again = register_checkpoint(run, 2, classified)  # the same checkpoint: the same version
    assert str(again.version) == "1" and len(versions()) == 1
    other = register_checkpoint(run, 1, evaluation(0.7))
    assert str(other.version) == "2" and len(versions()) == 2


def test_register_refuses_bad_input_and_writes_nothing(checkpoint):
    run = checkpoint(steps=(1,))
    with pytest.raises(ValueError, match="no checkpoint at step 5; it has \\[1\\]"):
        register_checkpoint(run, 5, evaluation(0.8))
    with mlflow.start_run() as not_classify:
        mlflow.log_metric("loss", 1.0)
    with pytest.raises(ValueError, match="no auc_macro"):
        register_checkpoint(run, 1, not_classify.info.run_id)
    with pytest.raises(ValueError, match="not found"):
        register_checkpoint(run, 1, "0" * 32)
    assert MlflowClient().search_registered_models() == []


@pytest.mark.slow
def test_promote_best_margin_idempotent_history(checkpoint):
    run = checkpoint(steps=(1, 2, 3))
    for step, auc in ((1, 0.70), (2, 0.80), (3, 0.60)):
        register_checkpoint(run, step, evaluation(auc))
    first = promote(NAME)
    assert first.moved and champion() == "2"
    tags = MlflowClient().get_model_version(NAME, "2").tags
    assert tags["promotion.previous_version"] == "" and float(tags["promotion.value"]) == pytest.approx(0.8)

    again = promote(NAME)  # idempotent: nothing moves, no new history
    assert not again.moved and champion() == "2" and len(history(NAME)) == 1

    register_checkpoint(checkpoint(steps=(4,), arm="text_encoder"), 4, evaluation(0.81))  # version 4
    kept = promote(NAME, margin=0.05)  # 0.81 does not beat 0.80 by 0.05
    assert not kept.moved and champion() == "2" and "margin" in kept.reason
    moved = promote(NAME, margin=0.005)
    assert moved.moved and champion() == "4"
    tags = MlflowClient().get_model_version(NAME, "4").tags
    assert tags["promotion.previous_version"] == "2" and float(tags["promotion.previous_value"]) == pytest.approx(0.8)
    assert [h["version"] for h in history(NAME)] == ["2", "4"]

    worse = promote(NAME, version=1)  # an explicit candidate is held to the same rule
    assert not worse.moved and champion() == "4"


def test_promote_refuses_unevaluated_version(checkpoint):
    run = checkpoint(steps=(1,))
    register_checkpoint(run, 1, evaluation(0.7))
    source = MlflowClient().get_run(run).data.tags["harness.checkpoint.000001"]
    bare = mlflow.register_model(source, NAME)  # registered by hand, without an evaluation
    with pytest.raises(ValueError, match=f"version {bare.version} has no evaluation metric 'auc_macro'"):
        promote(NAME, version=bare.version)
    with pytest.raises(ValueError, match="no evaluation metric"):  # the entry point: its run ends FAILED
        promote_step.main(["--name", NAME, "--version", str(bare.version)])
    runs = MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()],
                                      "tags.`harness.entry_point` = 'promote'")
    assert [r.info.status for r in runs] == ["FAILED"]
    with pytest.raises(ValueError, match="no registered model"):
        promote("no-such-model")
    with pytest.raises(MlflowException, match="champion"):
        champion()  # nothing was promoted by the refusals


@pytest.mark.slow
def test_racing_promotions_leave_the_better_champion(checkpoint, monkeypatch):
    """Both promotions decide against the same old champion; the worse one writes last."""
    run = checkpoint(steps=(1, 2, 3))
    for step, auc in ((1, 0.6), (2, 0.7), (3, 0.8)):
        register_checkpoint(run, step, evaluation(auc))
    promote(NAME, version=1)
    decided = threading.Barrier(2)
    better_written = threading.Event()

    def pause():
        decided.wait(timeout=120)  # both have read champion = version 1
        if threading.current_thread().name == "worse":
            better_written.wait(timeout=120)

    monkeypatch.setattr(promote_module, "_pause", pause)
    results = {}

    def race(version, name):
        try:
            results[name] = promote(NAME, version=version, client=MlflowClient())
        except Exception as e:  # surfaced below, not lost in the thread
            results[name] = e
        if name == "better":
            better_written.set()

    threads = [threading.Thread(target=race, args=(3, "better"), name="better"),
               threading.Thread(target=race, args=(2, "worse"), name="worse")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert champion() == "3", results
    assert results["better"].moved and not results["worse"].moved and results["worse"].champion == "3"
    assert MlflowClient().get_model_version(NAME, "2").tags["promotion.superseded_by"] == "3"


@pytest.mark.slow
def test_racing_promotion_processes(checkpoint, mlflow_store):
    """Two real processes promoting different versions at once: exactly one champion, the better."""
    run = checkpoint(steps=(1, 2, 3))
    for step, auc in ((1, 0.6), (2, 0.7), (3, 0.8)):
        register_checkpoint(run, step, evaluation(auc))
    promote(NAME, version=1)
    procs = [subprocess.Popen([sys.executable, "-m", "harness.promote", "--name", NAME, "--version", v],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for v in ("2", "3")]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert champion() == "3", outs


@pytest.mark.slow
def test_champion_generates_images(checkpoint):
    run = checkpoint(steps=(1,))
    register_checkpoint(run, 1, evaluation(0.75))
    promote(NAME)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    images = model.predict(pd.DataFrame({"prompt": ["a frontal chest x-ray showing edema"] * 2,
                                         "seed": [0, 1], "num_inference_steps": [2, 2]}))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[1])  # different seeds, different images
    metadata = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert metadata.signature is not None and metadata.saved_input_example_info is not None


@pytest.mark.slow
def test_registry_and_report_through_a_tracking_server(mlflow_server, tiny_pipeline_dir, capsys):
    """The shared-server setup: artifacts proxied by ``mlflow server``; register, promote, load the
    champion and build the report, all over HTTP."""
    from harness import report

    assert mlflow.get_tracking_uri().startswith("http://127.0.0.1:")
    run = log_checkpoints(tiny_pipeline_dir, steps=(1, 2))
    first = register_checkpoint(run, 1, evaluation(0.7))
    second = register_checkpoint(run, 2, evaluation(0.9))
    assert register_checkpoint(run, 2, evaluation(0.9)).version == second.version  # no duplicate over REST either
    assert promote(NAME).champion == str(second.version) != str(first.version)
    images = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
        pd.DataFrame({"prompt": ["a frontal chest x-ray with no finding"], "num_inference_steps": [2]}))
    assert images.shape == (1, 32, 32, 3)

    result = report.main(["--output_dir", "reports"])
    table = pd.read_csv(f"reports/{NAME}_auc.csv", index_col=0)
    assert table.loc["dreambooth @ 2", "macro AUC"] == pytest.approx(0.9)
    assert table.loc["dreambooth @ 1", "Cardiomegaly_ci_low"] == pytest.approx(0.6)
    assert "version " + str(second.version) in result["markdown"].read_text()
    printed = capsys.readouterr().out  # it ends make demo: the table, the champion, where the report is
    assert f"{NAME}: champion models:/{NAME}@champion = version {second.version}" in printed
    assert "dreambooth @ 2" in printed and "macro AUC" in printed and printed.rstrip().endswith("report.html")


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed (.ci/run installs it)")
@pytest.mark.slow
def test_report_renders_in_chromium(checkpoint):
    from harness import report

    run = checkpoint(steps=(1,))
    register_checkpoint(run, 1, evaluation(0.75))
    result = report.main(["--output_dir", "reports", "--log", "false", "--screenshot", "reports/report.png"])
    from PIL import Image

    shot = Image.open(result["screenshot"]).convert("L")
    assert shot.size == (1280, 3200)
    assert len(set(shot.resize((64, 160)).getdata())) > 10  # a rendered page, not a blank one


@pytest.mark.slow
def test_report_keeps_a_champion_that_a_newer_run_did_not_beat(checkpoint):
    from harness import report

    register_checkpoint(checkpoint(steps=(1,)), 1, evaluation(0.8))
    promote(NAME)
    register_checkpoint(checkpoint(steps=(1,)), 1, evaluation(0.6))  # a re-run of the same arm @ step
    assert not promote(NAME).moved
    result = report.main(["--output_dir", "reports", "--log", "false"])
    table = pd.read_csv(f"reports/{NAME}_auc.csv", index_col=0)
    assert list(table.index) == ["dreambooth @ 1", "dreambooth @ 1 (v1, champion)"]
    assert table["macro AUC"].tolist() == pytest.approx([0.6, 0.8])
    assert "= version 1 (dreambooth @ 1)" in result["markdown"].read_text()
