"""The classify entry point end to end on the tiny phantom: what it logs can be recomputed from its
predictions.csv, single-class labels give nan (not a crash), baselines compare paired, and bad
inputs fail with a clear error and a FAILED (never RUNNING) run."""

from __future__ import annotations

import math
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from harness import classify
from harness.compare import macro_auc_difference
from harness.metrics import snake
from harness.data import HOLDOUT_FRACTION, load_table
from harness.pathologies import FINDINGS

FAST = ["--epochs", "1", "--batch_size", "8", "--n_resamples", "100", "--threads", "1"]


def _args(train, test=None, *extra):
    return ["--train", f"chexpert:{train}", "--test", f"chexpert:{test or train}", *FAST, *extra]


def _predictions(run_id) -> pd.DataFrame:
    return pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.csv"))


def _auc(pred, name):
    known = pred[f"target_{name}"].notna()
    y = pred.loc[known, f"target_{name}"]
    return roc_auc_score(y, pred.loc[known, f"score_{name}"]) if y.nunique() == 2 else math.nan


def test_logged_metrics_recompute_from_predictions(mlflow_store, tiny_phantom):
    run = mlflow.get_run(classify.main(_args(tiny_phantom)))
    assert run.info.status == "FINISHED"
    metrics, pred = run.data.metrics, _predictions(run.info.run_id)
    assert len(pred) == int(run.data.params["n_test_images"]) and pred["path"].is_unique
    aucs = []
    for label in FINDINGS:
        name = snake(label)
        expected = _auc(pred, name)
        aucs.append(expected)
        if math.isnan(expected):
            assert math.isnan(metrics[f"auc_{name}"]) and f"harness.warning.auc_{name}" in run.data.tags
            continue
        assert metrics[f"auc_{name}"] == pytest.approx(expected, abs=1e-9)
        low, high = metrics[f"auc_{name}_ci_low"], metrics[f"auc_{name}_ci_high"]
        assert math.isnan(low) or low <= expected <= high
        known = pred[f"target_{name}"].notna()
        acc = ((pred.loc[known, f"score_{name}"] >= 0.5) == pred.loc[known, f"target_{name}"]).mean()
        assert metrics[f"acc_{name}"] == pytest.approx(acc)
        assert metrics[f"bal_acc_{name}"] == pytest.approx(balanced_accuracy_score(
            pred.loc[known, f"target_{name}"], pred.loc[known, f"score_{name}"] >= 0.5))
    assert metrics["auc_macro"] == pytest.approx(np.nanmean(aucs))
    assert metrics["bal_acc_macro"] == pytest.approx(np.nanmean([metrics[f"bal_acc_{snake(l)}"]
                                                                for l in FINDINGS]))
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "valid_auc_macro")
    assert [m.step for m in history] == [1]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"roc.png", "predictions.csv"} <= artifacts


def test_single_class_label_is_nan_with_warning(mlflow_store, tiny_phantom, tmp_path):
    data = shutil.copytree(tiny_phantom, tmp_path / "single")
    test = pd.read_csv(data / "test.csv")
    test["Edema"] = 0.0
    test.to_csv(data / "test.csv", index=False)
    with pytest.warns(RuntimeWarning, match="Edema"):
        run_id = classify.main(_args(data))
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert math.isnan(run.data.metrics["auc_edema"]) and math.isnan(run.data.metrics["auc_edema_ci_low"])
    assert "Edema" in run.data.tags["harness.warning.auc_edema"]
    assert not math.isnan(run.data.metrics["auc_macro"])


def test_paired_comparison_with_a_baseline_run(mlflow_store, tiny_phantom):
    base_id = classify.main(_args(tiny_phantom, None, "--seed", "0"))
    run_id = classify.main(_args(tiny_phantom, None, "--seed", "1", "--baseline_run", base_id,
                                 "--mix", f"chexpert:{tiny_phantom}", "--mix_ratio", "0"))
    run = mlflow.get_run(run_id)
    assert run.data.tags["harness.baseline_run"] == base_id
    ours, theirs = _predictions(run_id), _predictions(base_id)
    for label in FINDINGS:
        name = snake(label)
        diff = _auc(ours, name) - _auc(theirs, name)
        logged = run.data.metrics[f"auc_diff_{name}"]
        assert logged == pytest.approx(diff, abs=1e-9, nan_ok=True)
        low, high = run.data.metrics[f"auc_diff_{name}_ci_low"], run.data.metrics[f"auc_diff_{name}_ci_high"]
        assert math.isnan(low) or low <= logged <= high
    # the macro AUC's paired difference, from the two runs' predictions alone
    diff, low, high = macro_auc_difference(run_id, base_id, n_resamples=100)
    assert diff == pytest.approx(run.data.metrics["auc_diff_macro"], abs=1e-9)
    assert low <= diff <= high

    # The baseline must have scored the same test images.
    with pytest.raises(ValueError, match="other images"):
        classify.main(_args(tiny_phantom, None, "--views", "all", "--baseline_run", base_id))
    assert mlflow.search_runs(filter_string="attributes.status = 'RUNNING'").empty


def test_label_mismatch_and_empty_data_are_clear_errors(mlflow_store, tiny_phantom, tmp_path):
    table = pd.read_csv(tiny_phantom / "train.csv").head(12)
    folder = tmp_path / "fundus"
    folder.mkdir()
    labels = pd.DataFrame({"path": [str(tiny_phantom.parent / p) for p in table["Path"]],
                           "split": ["train"] * 8 + ["valid"] * 4, "view": "frontal",
                           "RG": [0, 1] * 6, "NRG": [1, 0] * 6})
    labels.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(ValueError, match="label sets differ"):  # (its paths are absolute: allowed)
        classify.main(["--train", f"folder:{folder}?absolute=1", "--test", f"chexpert:{tiny_phantom}", *FAST])
    # A test split with no rows: this folder set has none.
    with pytest.raises(ValueError, match="no rows"):
        classify.main(["--train", f"folder:{folder}?absolute=1", "--test", f"folder:{folder}?absolute=1", *FAST])
    runs = mlflow.search_runs()
    assert set(runs["status"]) == {"FAILED"} and len(runs) == 2


def test_mix_keeps_the_training_size_at_the_ratio(tiny_phantom):
    train = load_table(f"chexpert:{tiny_phantom}", "train")
    real = load_table(f"chexpert:{tiny_phantom}", "valid")
    mixed = classify._mix(train, real, 0.1, seed=0)
    n_real = round(0.1 * len(train))
    assert len(mixed) == len(train) and mixed["path"].isin(real["path"]).sum() == n_real
    assert mixed.attrs["labels"] == train.attrs["labels"]
    with pytest.raises(ValueError, match="needs"):
        classify._mix(train, real, 0.9, seed=0)


@pytest.mark.parametrize("argv, message", [
    (["--train", "dicom:/data"], "--train: unknown data format 'dicom'"),
    (["--test", "dicom:/data"], "--test: unknown data format 'dicom'"),
    (["--mix", "nifti:/data"], "--mix: unknown data format 'nifti'"),
    (["--labels", "心脏肥大,胸腔积液"], "do not give distinct metric names"),
])
def test_bad_data_and_labels_are_refused_by_the_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        classify.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_real_baseline_is_named_and_tagged_as_such(mlflow_store, tiny_phantom):
    run_id = classify.main(_args(tiny_phantom, None, "--mix", f"chexpert:{tiny_phantom}", "--mix_ratio", "0.5"))
    run = mlflow.get_run(run_id)
    assert run.info.run_name == "classify · real + 50% real"
    assert run.data.tags["harness.arm"] == "real" and run.data.tags["harness.judged"] == "real + 50% real"


def test_chexpert_small_as_shipped_scores_valid_csv_and_selects_on_a_train_holdout(mlflow_store, tiny_phantom, tmp_path):
    """CheXpert-v1.0-small ships train.csv and valid.csv only: valid.csv is scored as the test split,
    the model is selected on a seeded patient-wise hold-out of train.csv, and training never sees it."""
    small = tmp_path / "CheXpert-v1.0-small"
    shutil.copytree(tiny_phantom, small)
    (small / "test.csv").unlink()
    run = mlflow.get_run(classify.main(_args(small)))
    assert run.info.status == "FINISHED"
    official = load_table(f"chexpert:{small}?holdout=0", "valid")
    assert sorted(_predictions(run.info.run_id)["path"]) == sorted(official["path"])

    summaries = {name: mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data/{name}_summary.json")
                 for name in ("train", "valid", "test")}
    holdout = summaries["valid"]["holdout"]
    assert holdout["fraction"] == HOLDOUT_FRACTION and holdout["seed"] == 0 and holdout["of"] == "train.csv"
    assert summaries["test"]["split_source"].startswith("valid.csv")
    train, valid = load_table(f"chexpert:{small}", "train"), load_table(f"chexpert:{small}", "valid")
    assert set(train["patient"]).isdisjoint(valid["patient"])
    assert int(run.data.params["n_train_images"]) == len(train) and int(run.data.params["n_valid_images"]) == len(valid)
    assert len(train) + len(valid) == len(load_table(f"chexpert:{small}?holdout=0", "train"))

    # Scoring the split that selects the model is refused, and the error says how to avoid it.
    with pytest.raises(ValueError, match="also in the valid data.*pass --valid with other data"):
        classify.main(_args(small, None, "--test_split", "valid"))
