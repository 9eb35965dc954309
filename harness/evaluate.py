"""Uncertainty and comparisons for per-disease test metrics: bootstrap CIs, paired AUC differences
(per label, and of the macro AUC between two classifiers), accuracy and balanced accuracy at a
threshold (their macro means: ``harness.metrics.nan_mean``).

All functions take ``y_true`` [N, L] (1, 0 or NaN = unknown) and scores [N, L], and work per label
on the rows where that label is known (NaN-masked per task, like ``harness.metrics``). A label
with a single class among its known rows has no AUC: its interval is ``(nan, nan)``; so is the
interval of a label with only one positive (or one negative), which a stratified bootstrap
cannot vary (its point AUC is still defined).

Resampling is done by ``scipy.stats.bootstrap`` with the positives and the negatives of a label
as two samples, so it resamples them separately (a *stratified* case bootstrap, pROC's default
for AUC): every resample has both classes and the same prevalence, so no resample is undefined.
Each image keeps its label and score together, and in ``paired_difference`` both classifiers'
scores of an image travel together (the two AUCs are computed on the same resampled images).
``paired_macro_difference`` cannot stratify (each label has its own positives), so it resamples
whole images - every label's target and both classifiers' scores together - and takes the
nan-mean over the labels defined in each resample, the same labels for both classifiers.

Inside the statistic the AUC of a resample is computed from counts: the scores are replaced once
by their tie groups (``np.unique``), a resample becomes per-group counts of positives and
negatives (``np.bincount``), and AUC = sum over positives of (negatives below + half the ties) /
(P * N) - the Mann-Whitney U with average ranks, equal to ``roc_auc_score`` (tests check it).
Both bootstraps share that computation (``_auc_from_counts``), on per-group counts of a resample.
That is O(resamples x images) with no sort per resample: 5 labels x 10,000 images x 1000
resamples take well under 2 s on 2 cores (``python -m bench.eval_speed``). Point estimates
come from ``sklearn.metrics.roc_auc_score`` itself.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from harness.metrics import nan_mean, per_label_auc

METHODS = ("percentile", "basic", "BCa")
# Resamples per statistic call: bounds memory (resamples x tie groups counts) to tens of MB.
BATCH = 200


def bootstrap_auc(y_true, y_score, labels, n_resamples: int = 1000, seed: int = 0,
                  confidence: float = 0.95, method: str = "percentile") -> dict[str, tuple[float, float]]:
    """Bootstrap confidence interval of each label's AUC: ``{label: (low, high)}``.

    ``method`` is scipy's: ``percentile`` (default), ``basic`` or ``BCa``. BCa needs a jackknife
    (one statistic per image), which costs O(images^2): fine for hundreds of test images, slow
    for tens of thousands.
    """
    y_true, scores = _check(y_true, labels, y_score)
    rng = np.random.default_rng(seed)
    out = {}
    for k, label in enumerate(labels):
        task = _task(y_true[:, k], scores[0][:, k])
        if task is None:
            out[label] = (np.nan, np.nan)
            continue
        pos, neg, (groups,), n_groups = task
        out[label] = _interval(lambda p, n: _auc_counts(groups[p], groups[n], n_groups),
                               pos, neg, n_resamples, rng, confidence, method)
    return out


def paired_difference(y_true, score_a, score_b, labels, n_resamples: int = 1000, seed: int = 0,
                      confidence: float = 0.95, method: str = "percentile") -> dict[str, tuple[float, float, float]]:
    """AUC(a) - AUC(b) per label on the same images, with a paired bootstrap CI:
    ``{label: (diff, low, high)}``. An interval excluding 0 means a difference at that level."""
    y_true, (score_a, score_b) = _check(y_true, labels, score_a, score_b)
    rng = np.random.default_rng(seed)
    out = {}
    for k, label in enumerate(labels):
        task = _task(y_true[:, k], score_a[:, k], score_b[:, k])
        if task is None:
            out[label] = (np.nan, np.nan, np.nan)
            continue
        pos, neg, (ga, gb), n_groups = task

        def diff(p, n):
            return _auc_counts(ga[p], ga[n], n_groups) - _auc_counts(gb[p], gb[n], n_groups)

        known = ~np.isnan(y_true[:, k])
        point = (roc_auc_score(y_true[known, k], score_a[known, k])
                 - roc_auc_score(y_true[known, k], score_b[known, k]))
        out[label] = (float(point), *_interval(diff, pos, neg, n_resamples, rng, confidence, method))
    return out


def paired_macro_difference(y_true, score_a, score_b, labels, n_resamples: int = 1000, seed: int = 0,
                            confidence: float = 0.95, method: str = "percentile") -> tuple[float, float, float]:
    """Macro AUC(a) - macro AUC(b) on the same images, with a paired bootstrap CI: ``(diff, low, high)``.

    Images are resampled with replacement, each with its targets and both classifiers' scores;
    each resample's macro AUC is the nan-mean over its labels with both classes (the point
    estimate: ``harness.metrics``' macro AUCs). nan when no label has a defined AUC; the interval is
    nan (scipy warns) when some resample has none, which only a test set of a handful of images makes.
    """
    y_true, (score_a, score_b) = _check(y_true, labels, score_a, score_b)
    _check_method(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # single-class labels: nan, already reported per label
        point = nan_mean(per_label_auc(y_true, score_a, labels)) - nan_mean(per_label_auc(y_true, score_b, labels))
    if np.isnan(point):
        return np.nan, np.nan, np.nan
    tasks = [[_groups(y_true[:, k], s[:, k]) for k in range(len(labels))] for s in (score_a, score_b)]

    def diff(index):
        batch_shape = index.shape[:-1]
        index = index.reshape(-1, index.shape[-1]).astype(np.intp)
        a, b = (_macro_auc_resampled(y_true, groups, index) for groups in tasks)
        return (a - b).reshape(batch_shape)

    rng = np.random.default_rng(seed)
    return float(point), *_bootstrap(diff, (np.arange(len(y_true)),), n_resamples, rng, confidence, method)


def per_label_accuracy(y_true, y_score, labels, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy of ``score >= threshold`` per label on its known rows (nan when none is known)."""
    return _thresholded(accuracy_score, y_true, y_score, labels, threshold, min_classes=1)


def per_label_balanced_accuracy(y_true, y_score, labels, threshold: float = 0.5) -> dict[str, float]:
    """Balanced accuracy (mean of sensitivity and specificity) of ``score >= threshold`` per label
    on its known rows, sklearn's ``balanced_accuracy_score``; nan for a label with one class."""
    return _thresholded(balanced_accuracy_score, y_true, y_score, labels, threshold, min_classes=2)


# ------------------------------------------------------------------------------------ internals


def _check(y_true, labels, *scores):
    y_true = np.asarray(y_true, dtype=np.float64)
    labels = list(labels)
    if y_true.ndim != 2 or y_true.shape[1] != len(labels):
        raise ValueError(f"y_true has shape {y_true.shape}; expected [images, {len(labels)} labels] for {labels}")
    out = []
    for s in scores:
        s = np.asarray(s, dtype=np.float64)
        if s.shape != y_true.shape:
            raise ValueError(f"scores have shape {s.shape}; expected {y_true.shape} like y_true")
        out.append(s)
    return y_true, out


def _task(y, *scores):
    """Positives' and negatives' row indices into the known rows, and each score column as tie
    groups over those rows (group ids ordered like the scores); None for a single-class task or
    non-finite scores (a diverged model; its AUC is nan in ``harness.metrics`` too)."""
    known = ~np.isnan(y)
    y = y[known]
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0 or not all(np.isfinite(s[known]).all() for s in scores):
        return None
    groups = [np.unique(s[known], return_inverse=True)[1] for s in scores]
    return pos, neg, groups, int(max(g.max() for g in groups)) + 1


def _thresholded(metric, y_true, y_score, labels, threshold: float, min_classes: int) -> dict[str, float]:
    """``metric(targets, score >= threshold)`` per label on its known rows; nan with fewer than
    ``min_classes`` classes there."""
    y_true, (scores,) = _check(y_true, labels, y_score)
    out = {}
    for k, label in enumerate(labels):
        known = ~np.isnan(y_true[:, k])
        enough = len(np.unique(y_true[known, k])) >= min_classes
        out[label] = float(metric(y_true[known, k], scores[known, k] >= threshold)) if enough else np.nan
    return out


def _groups(y, score):
    """Tie-group ids of a label's scores (ordered like the scores; -1 where the target is unknown)
    and the number of groups; None when its scores are not all finite on the known rows."""
    known = ~np.isnan(y)
    if not np.isfinite(score[known]).all():
        return None
    groups = np.full(len(y), -1)
    groups[known] = np.unique(score[known], return_inverse=True)[1]
    return groups, int(groups.max()) + 1


def _macro_auc_resampled(y_true, tasks, index):
    """[B] macro AUCs of the resamples ``index`` [B, n] (row ids), nan-mean over defined labels."""
    n = index.shape[0]
    aucs = np.full((n, len(tasks)), np.nan)
    for k, task in enumerate(tasks):
        if task is None:
            continue
        groups, n_groups = task
        flat, y = np.arange(n)[:, None] * n_groups + groups[index], y_true[index, k]  # unknown rows: y nan
        pos, neg = (np.bincount(flat[y == c], minlength=n * n_groups).reshape(n, n_groups) for c in (1, 0))
        aucs[:, k] = _auc_from_counts(pos, neg)
    defined = ~np.isnan(aucs)
    with np.errstate(invalid="ignore"):  # a resample with no defined label: nan
        return np.where(defined, aucs, 0).sum(1) / defined.sum(1)


def _auc_from_counts(pos, neg):
    """AUC per row from per-tie-group counts of positives and negatives [B, groups] (groups in
    score order): positives' wins over lower-scored negatives plus half the ties; nan for a
    row without positives or negatives."""
    below = np.cumsum(neg, axis=1) - 0.5 * neg  # negatives scored lower, plus half the ties
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * below).sum(1) / (n_pos * n_neg)


def _auc_counts(gp, gn, n_groups: int):
    """AUC of each resample (last axis) from tie-group ids of its positives ``gp`` and negatives ``gn``."""
    batch_shape = np.broadcast_shapes(gp.shape[:-1], gn.shape[:-1])  # BCa's jackknife mixes shapes
    gp = np.broadcast_to(gp, batch_shape + gp.shape[-1:]).reshape(-1, gp.shape[-1])
    gn = np.broadcast_to(gn, batch_shape + gn.shape[-1:]).reshape(-1, gn.shape[-1])
    offset = (np.arange(gp.shape[0]) * n_groups)[:, None]
    pos, neg = (np.bincount((g + offset).ravel(), minlength=gp.shape[0] * n_groups).reshape(-1, n_groups)
                for g in (gp, gn))
    return _auc_from_counts(pos, neg).reshape(batch_shape)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")


def _interval(statistic, pos, neg, n_resamples, rng, confidence, method):
    _check_method(method)
    if len(pos) < 2 or len(neg) < 2:  # a class of one cannot vary in a stratified resample
        return np.nan, np.nan
    return _bootstrap(statistic, (pos, neg), n_resamples, rng, confidence, method)


def _bootstrap(statistic, data, n_resamples, rng, confidence, method):
    res = stats.bootstrap(data, lambda *samples, axis=-1: statistic(*samples), vectorized=True,
                          n_resamples=n_resamples, batch=BATCH, confidence_level=confidence,
                          method=method, rng=rng)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
