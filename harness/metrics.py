"""Classification metrics: per-label ROC AUC with unknown targets masked, their macro (nan-skipping)
mean, and the names labels take in metric and column names."""

from __future__ import annotations

import re
import warnings

import numpy as np
from sklearn.metrics import roc_auc_score


def per_label_auc(y_true, y_score, labels) -> dict[str, float]:
    """ROC AUC of each column; rows whose target is NaN are left out of that column only.

    A column with one class, no known target or non-finite scores gets NaN and a warning naming
    it - never an error.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    y_score = np.asarray(y_score, dtype=np.float64)
    labels = list(labels)
    if y_true.ndim == 1:
        y_true, y_score = y_true[:, None], y_score.reshape(-1, 1)
    if y_true.shape != y_score.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_score has shape {y_score.shape}")
    if y_true.shape[1] != len(labels):
        raise ValueError(f"{len(labels)} labels {labels} for {y_true.shape[1]} columns")
    out = {}
    for j, label in enumerate(labels):
        known = ~np.isnan(y_true[:, j])
        classes = np.unique(y_true[known, j])
        if len(classes) < 2:
            warnings.warn(f"AUC of {label!r} is undefined: its {int(known.sum())} known target(s) are all "
                          f"{classes.tolist() or 'missing'}", RuntimeWarning, stacklevel=2)
            out[label] = float("nan")
            continue
        if not np.isfinite(y_score[known, j]).all():  # a diverged model: report, do not crash
            warnings.warn(f"AUC of {label!r} is undefined: its scores contain NaN or inf", RuntimeWarning, stacklevel=2)
            out[label] = float("nan")
            continue
        out[label] = float(roc_auc_score(y_true[known, j], y_score[known, j]))
    return out


def nan_mean(per_label: dict) -> float:
    """Mean of the defined per-label values (AUCs, accuracies, ...); NaN when none is defined."""
    values = np.array(list(per_label.values()), dtype=np.float64)
    if values.size == 0 or np.isnan(values).all():
        return float("nan")
    return float(np.nanmean(values))


macro_auc = nan_mean  # the macro AUC is the nan-mean of the per-label AUCs


def snake(label: str) -> str:
    """A label as it appears in metric and column names: 'Pleural Effusion' -> 'pleural_effusion'."""
    return re.sub(r"[^0-9a-z]+", "_", label.lower()).strip("_")


def check_metric_names(labels: list[str]) -> list[str]:
    """The labels' metric names (``snake``); a ValueError unless they are distinct and not empty
    (a label of CJK characters only has an empty one)."""
    names = [snake(l) for l in labels]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"labels {labels} do not give distinct metric names ({names}); metric names keep "
                         "the letters a-z and digits of a label: rename the label columns")
    return names


# ---------------------------------------------------------------- metric names -> table columns
# The one mapping from logged metric names to the columns of the write-up's tables, used by the
# pipeline's printed table, the registry's tags and the report.

SUMMARY_COLUMNS = {"macro AUC": "auc_macro", "accuracy": "acc_macro", "balanced accuracy": "bal_acc_macro"}
# The checks (harness.checks), each with whether lower is better.
CHECK_COLUMNS = {"frontal fraction": ("view_frontal_fraction", False),
                 "memorized fraction": ("memorization_fraction", True),
                 "Frechet distance": ("frechet_distance", True),
                 "prompt adherence": ("adherence_mean", False),
                 "adherence ceiling": ("adherence_ceiling_mean", False)}


def auc_metric(label: str, suffix: str = "") -> str:
    """'Pleural Effusion' -> 'auc_pleural_effusion' (suffix '_ci_low' / '_ci_high' for its CI)."""
    return f"auc_{snake(label)}{suffix}"


def labels_of(metrics, candidates: list[str] | None = None) -> list[str]:
    """The labels a run's ``auc_<l>`` metrics name, in ``candidates``' order (their spelling), else
    as the snake-case names themselves."""
    names = {k[4:] for k in metrics if k.startswith("auc_") and not k.endswith(("_ci_low", "_ci_high"))
             and k != "auc_macro" and not k.startswith("auc_diff_")}
    known = [l for l in candidates or [] if snake(l) in names]
    return known + sorted(names - {snake(l) for l in known})


def classify_row(get, labels: list[str], cis: bool = False) -> dict[str, float]:
    """The write-up's columns from a classify run's metrics (``get(name) -> value or None``):
    per-label AUC (with its CI columns when ``cis``), macro AUC, accuracy, balanced accuracy
    (accuracy at 0.5 mostly reflects the labels' prevalence)."""
    row = {}
    for label in labels:
        for suffix in ("", "_ci_low", "_ci_high") if cis else ("",):
            row[f"{label}{suffix}"] = _number(get(auc_metric(label, suffix)))
    row.update({column: _number(get(metric)) for column, metric in SUMMARY_COLUMNS.items()})
    return row


def checks_row(get) -> dict[str, float]:
    """The checks' columns from a checks run's metrics (``get(name) -> value or None``)."""
    return {column: _number(get(metric)) for column, (metric, _) in CHECK_COLUMNS.items()}


def _number(x) -> float:
    return float("nan") if x is None else float(x)
