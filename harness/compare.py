"""Comparisons between classify runs from their logged predictions: the paired macro-AUC
difference of two runs on the same real test images, and a table of them.

Needs MLflow and the statistics, no model library: the report uses it on a laptop.
"""

from __future__ import annotations

import tempfile

import mlflow
import numpy as np
import pandas as pd

from harness.evaluate import paired_macro_difference
from harness.metrics import snake

PREDICTIONS = "predictions.csv"  # a classify run's artifact: path, patient, study, view, target_<l>, score_<l>


def load_predictions(run_id: str) -> pd.DataFrame:
    """A classify run's ``predictions.csv``: path, patient, study, view, ``target_<l>``, ``score_<l>``."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREDICTIONS, dst_path=tmp)
        except Exception as err:  # MlflowException or OSError, depending on the store
            raise ValueError(f"run {run_id} has no {PREDICTIONS} (is it a classify run?): {err}") from err
        return pd.read_csv(path)


def load_baseline(run_id: str, test: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """The baseline run's test scores [N, L], aligned to ``test``'s rows; errors unless it scored
    the same images with the same targets and labels."""
    base = load_predictions(run_id)
    names = [snake(l) for l in labels]
    missing = [c for n in names for c in (f"target_{n}", f"score_{n}") if c not in base.columns]
    if missing:
        have = [c.removeprefix("score_") for c in base.columns if c.startswith("score_")]
        raise ValueError(f"label sets differ: baseline run {run_id} has labels {have}, this run {names}")
    here, there = set(test["path"]), set(base["path"])
    if here != there or len(base) != len(test):
        raise ValueError(f"baseline run {run_id} was tested on other images: {len(there - here)} only there, "
                         f"{len(here - there)} only here (of {len(there)} and {len(here)}); use the same --test, "
                         f"--views and --uncertain")
    base = base.set_index("path").loc[test["path"]]
    targets = base[[f"target_{n}" for n in names]].to_numpy(dtype=np.float64)
    ours = test[labels].to_numpy(dtype=np.float64)
    if not np.array_equal(targets, ours, equal_nan=True):
        raise ValueError(f"baseline run {run_id} has other targets for the same test images (another --uncertain?)")
    return base[[f"score_{n}" for n in names]].to_numpy(dtype=np.float64)


def macro_auc_difference(run_a: str, run_b: str, n_resamples: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> tuple[float, float, float]:
    """Macro AUC of classify run a minus run b on the same test images, with its paired bootstrap
    CI (``harness.evaluate.paired_macro_difference``): ``(diff, low, high)``."""
    a = load_predictions(run_a)
    names = [c.removeprefix("score_") for c in a.columns if c.startswith("score_")]
    targets = a[[f"target_{n}" for n in names]].to_numpy(dtype=np.float64)
    test = pd.DataFrame({"path": a["path"], **{n: targets[:, j] for j, n in enumerate(names)}})
    score_b = load_baseline(run_b, test, names)  # the same images, targets and labels, or an error
    return paired_macro_difference(targets, a[[f"score_{n}" for n in names]].to_numpy(dtype=np.float64), score_b,
                                   names, n_resamples=n_resamples, seed=seed, confidence=confidence)


DIFFERENCE_COLUMNS = ["macro AUC difference", "CI low", "CI high"]


def difference_table(pairs: dict[str, tuple[str, str]], seed: int = 0, skip_incomparable: bool = False) -> pd.DataFrame:
    """``{row name: (classify run a, classify run b)}`` -> a table of ``macro_auc_difference``s;
    with ``skip_incomparable`` a pair without predictions or scored on other images is left out."""
    rows = {}
    for name, (a, b) in pairs.items():
        try:
            rows[name] = dict(zip(DIFFERENCE_COLUMNS, macro_auc_difference(a, b, seed=seed)))
        except ValueError:
            if not skip_incomparable:
                raise
    table = pd.DataFrame.from_dict(rows, orient="index", columns=DIFFERENCE_COLUMNS)
    table.index.name = "arms"
    return table
