"""Uncertainty and comparisons for per-disease test metrics: bootstrap CIs, paired AUC differences,
accuracy at a threshold (its macro mean: ``harness.metrics.macro_auc``, a nan-skipping mean).

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

Inside the statistic the AUC of a resample is computed from counts: the scores are replaced once
by their tie groups (``np.unique``), a resample becomes per-group counts of positives and
negatives (``np.bincount``), and AUC = sum over positives of (negatives below + half the ties) /
(P * N) - the Mann-Whitney U with average ranks, equal to ``roc_auc_score`` (tests check it).
That is O(resamples x images) with no sort per resample: 5 labels x 10,000 images x 1000
resamples take well under 2 s on 2 cores (``python -m bench.eval_speed``). Point estimates
come from ``sklearn.metrics.roc_auc_score`` itself.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, roc_auc_score

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


def per_label_accuracy(y_true, y_score, labels, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy of ``score >= threshold`` per label on its known rows (nan when none is known)."""
    y_true, (scores,) = _check(y_true, labels, y_score)
    out = {}
    for k, label in enumerate(labels):
        known = ~np.isnan(y_true[:, k])
        out[label] = (float(accuracy_score(y_true[known, k], scores[known, k] >= threshold))
                      if known.any() else np.nan)
    return out


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


def _auc_counts(gp, gn, n_groups: int):
    """AUC of each resample (last axis) from tie-group ids of its positives ``gp`` and negatives ``gn``."""
    batch_shape = np.broadcast_shapes(gp.shape[:-1], gn.shape[:-1])  # BCa's jackknife mixes shapes
    gp = np.broadcast_to(gp, batch_shape + gp.shape[-1:]).reshape(-1, gp.shape[-1])
    gn = np.broadcast_to(gn, batch_shape + gn.shape[-1:]).reshape(-1, gn.shape[-1])
    offset = (np.arange(gp.shape[0]) * n_groups)[:, None]
    neg = np.bincount((gn + offset).ravel(), minlength=gp.shape[0] * n_groups).reshape(-1, n_groups)
    below = np.cumsum(neg, axis=1) - neg + 0.5 * neg  # negatives scored lower, plus half the ties
    wins = np.take_along_axis(below, gp, axis=1).sum(axis=1)
    return (wins / (gp.shape[1] * gn.shape[1])).reshape(batch_shape)


def _interval(statistic, pos, neg, n_resamples, rng, confidence, method):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if len(pos) < 2 or len(neg) < 2:  # a class of one cannot vary in a stratified resample
        return np.nan, np.nan
    res = stats.bootstrap((pos, neg), lambda p, n, axis=-1: statistic(p, n), vectorized=True,
                          n_resamples=n_resamples, batch=BATCH, confidence_level=confidence,
                          method=method, rng=rng)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
