"""Per-label AUC: equal to sklearn's, NaN targets masked per task, NaN + warning when undefined."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from harness.metrics import macro_auc, per_label_auc


def test_matches_roc_auc_score():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (200, 3)).astype(float)
    s = y * 0.5 + rng.random((200, 3))
    aucs = per_label_auc(y, s, ["a", "b", "c"])
    assert list(aucs) == ["a", "b", "c"]
    for j, k in enumerate("abc"):
        assert aucs[k] == pytest.approx(roc_auc_score(y[:, j], s[:, j]))
    assert macro_auc(aucs) == pytest.approx(np.mean([roc_auc_score(y[:, j], s[:, j]) for j in range(3)]))


def test_nan_targets_are_masked_per_task():
    y = np.array([[1, 0], [0, np.nan], [1, 1], [0, 0], [np.nan, 1]], dtype=float)
    s = np.array([[0.9, 0.1], [0.2, 0.99], [0.8, 0.7], [0.1, 0.3], [0.0, 0.6]])
    aucs = per_label_auc(y, s, ["x", "y"])
    assert aucs["x"] == pytest.approx(roc_auc_score([1, 0, 1, 0], [0.9, 0.2, 0.8, 0.1]))
    assert aucs["y"] == pytest.approx(roc_auc_score([0, 1, 0, 1], [0.1, 0.7, 0.3, 0.6]))


def test_single_class_task_is_nan_with_a_warning():
    y = np.array([[1, 0], [0, 0], [1, 0], [np.nan, np.nan]])
    s = np.array([[0.9, 0.5], [0.1, 0.4], [0.7, 0.3], [0.5, 0.5]])
    with pytest.warns(RuntimeWarning, match="Edema"):
        aucs = per_label_auc(y, s, ["Cardiomegaly", "Edema"])
    assert aucs["Cardiomegaly"] == 1.0 and math.isnan(aucs["Edema"])
    assert macro_auc(aucs) == 1.0  # NaN tasks are left out of the mean
    with pytest.warns(RuntimeWarning, match="Atelectasis"):
        all_nan = per_label_auc(np.full((3, 1), np.nan), np.zeros((3, 1)), ["Atelectasis"])
    assert math.isnan(macro_auc(all_nan)) and math.isnan(macro_auc({}))


def test_nonfinite_scores_do_not_crash():
    y = np.array([[1], [0], [1], [0]], dtype=float)
    with pytest.warns(RuntimeWarning, match="diverged|NaN"):
        aucs = per_label_auc(y, np.array([[np.nan], [0.1], [0.2], [0.3]]), ["Pleural Effusion"])
    assert math.isnan(aucs["Pleural Effusion"])


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="shape"):
        per_label_auc(np.zeros((4, 2)), np.zeros((4, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        per_label_auc(np.zeros((4, 2)), np.zeros((4, 2)), ["a"])


def test_no_warning_when_defined():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        per_label_auc([[0], [1]], [[0.2], [0.4]], ["a"])
