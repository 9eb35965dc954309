"""harness.evaluate: the fast AUC inside the bootstrap equals sklearn's, and the intervals equal a
slow reference (the same scipy bootstrap with roc_auc_score on every resample), for per-label AUCs
and for the paired difference of two classifiers' macro AUCs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from harness.evaluate import (_auc_counts, bootstrap_auc, paired_difference, paired_macro_difference,
                              per_label_accuracy, per_label_balanced_accuracy)

LABELS = ["Cardiomegaly", "Edema", "Pleural Effusion"]


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.35).astype(float)
    y[rng.random(y.shape) < 0.15] = np.nan  # unknown targets, masked per label
    scores = np.round(rng.random(y.shape) + 0.6 * np.nan_to_num(y), 1)  # rounded: many ties
    return y, scores


def test_fast_auc_equals_roc_auc_score_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (50, 40))
    s = rng.integers(0, 6, (50, 40)).astype(float)  # heavy ties
    groups = np.unique(s, return_inverse=True)[1].reshape(s.shape)
    for b in range(50):
        pos, neg = groups[b][y[b] == 1], groups[b][y[b] == 0]
        fast = _auc_counts(pos[None], neg[None], int(groups.max()) + 1)[0]
        assert fast == pytest.approx(roc_auc_score(y[b], s[b]), abs=1e-12)


def test_bootstrap_matches_slow_reference_and_contains_estimate():
    y, s = _data()
    fast = bootstrap_auc(y, s, LABELS, n_resamples=300, seed=3)
    rng = np.random.default_rng(3)  # the reference draws the same resamples in the same order
    for k, label in enumerate(LABELS):
        known = ~np.isnan(y[:, k])
        yk, sk = y[known, k], s[known, k]
        pos, neg = np.flatnonzero(yk == 1), np.flatnonzero(yk == 0)

        def slow(p, n):
            idx = np.concatenate([p, n])
            return roc_auc_score(yk[idx], sk[idx])

        ref = stats.bootstrap((pos, neg), slow, vectorized=False, n_resamples=300, batch=200,
                              method="percentile", rng=rng).confidence_interval
        low, high = fast[label]
        assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12)
        assert low < roc_auc_score(yk, sk) < high


def test_single_class_label_gets_nan_interval():
    y, s = _data()
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 0.0)
    ci = bootstrap_auc(y, s, LABELS, n_resamples=50)
    assert np.isnan(ci["Edema"]).all() and np.isfinite(ci["Cardiomegaly"]).all()


def test_paired_difference():
    y, a = _data()
    rng = np.random.default_rng(5)
    b = a + rng.normal(0, 0.5, a.shape)  # a worse classifier on the same images
    out = paired_difference(y, a, b, LABELS, n_resamples=400)
    for k, label in enumerate(LABELS):
        known = ~np.isnan(y[:, k])
        diff, low, high = out[label]
        assert diff == pytest.approx(roc_auc_score(y[known, k], a[known, k]) - roc_auc_score(y[known, k], b[known, k]))
        assert low <= diff <= high
    same = paired_difference(y, a, a, LABELS, n_resamples=50)  # paired: no difference, no width
    assert all(v == (0.0, 0.0, 0.0) for v in same.values())


def test_accuracy_masks_unknown_targets():
    y, s = _data()
    acc = per_label_accuracy(y, s, LABELS)
    known = ~np.isnan(y[:, 2])
    assert acc["Pleural Effusion"] == pytest.approx(accuracy_score(y[known, 2], s[known, 2] >= 0.5))


def test_balanced_accuracy_masks_unknown_targets_and_is_nan_for_one_class():
    y, s = _data()
    y[:, 1] = np.where(np.isnan(y[:, 1]), np.nan, 0.0)
    balanced = per_label_balanced_accuracy(y, s, LABELS)
    known = ~np.isnan(y[:, 2])
    assert balanced["Pleural Effusion"] == pytest.approx(balanced_accuracy_score(y[known, 2], s[known, 2] >= 0.5))
    assert np.isnan(balanced["Edema"]) and not np.isnan(per_label_accuracy(y, s, LABELS)["Edema"])
    # predicting every rare finding absent: accuracy is the prevalence of its absence, balanced accuracy 0.5
    never = np.zeros_like(s)
    assert per_label_balanced_accuracy(y, never, LABELS)["Cardiomegaly"] == 0.5
    assert per_label_accuracy(y, never, LABELS)["Cardiomegaly"] > 0.6


def _macro(y, s, rows):
    """Brute force: the nan-mean over labels with both classes of roc_auc_score on the rows."""
    aucs = []
    for k in range(y.shape[1]):
        yk, sk = y[rows, k], s[rows, k]
        known = ~np.isnan(yk)
        if len(np.unique(yk[known])) == 2:
            aucs.append(roc_auc_score(yk[known], sk[known]))
    return np.mean(aucs) if aucs else np.nan


@pytest.mark.slow
def test_paired_macro_difference_matches_brute_force():
    y, a = _data(n=60, seed=2)
    b = a + np.random.default_rng(6).normal(0, 0.5, a.shape)
    diff, low, high = paired_macro_difference(y, a, b, LABELS, n_resamples=300, seed=4)
    assert diff == pytest.approx(_macro(y, a, np.arange(len(y))) - _macro(y, b, np.arange(len(y))))
    ref = stats.bootstrap((np.arange(len(y)),), lambda i: _macro(y, a, i.astype(int)) - _macro(y, b, i.astype(int)),
                          vectorized=False, n_resamples=300, batch=200, method="percentile",
                          rng=np.random.default_rng(4)).confidence_interval  # the same resamples of images
    assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-12)
    assert low <= diff <= high
    assert paired_macro_difference(y, a, a, LABELS, n_resamples=50) == (0.0, 0.0, 0.0)
    one_class = np.where(np.isnan(y), np.nan, 0.0)
    assert np.isnan(paired_macro_difference(one_class, a, b, LABELS, n_resamples=50)).all()


def test_shape_errors_name_the_problem():
    y, s = _data()
    with pytest.raises(ValueError, match="y_true has shape"):
        bootstrap_auc(y, s, LABELS[:2])
    with pytest.raises(ValueError, match="scores have shape"):
        paired_difference(y, s, s[:10], LABELS)
