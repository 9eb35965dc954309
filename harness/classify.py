"""Judge a training set by the classifier it makes: train on it, test per disease on REAL images.

The study's yardstick (seed write-up): train a multi-label classifier on synthetic images (the
generate step writes a CheXpert-layout folder, so ``--train chexpert:<dir>``, or for labels other
than CheXpert's a ``folder:<dir>``: ``generate.generated_spec`` names it), optionally mixed with
real images, and measure per-label AUC on a real test split - against the same entry point
trained on the real train split (the baseline; ``--baseline_run`` gives the paired difference).

    python -m harness.classify                                        # real baseline on the phantom
    python -m harness.classify --train chexpert:outputs/synthetic --baseline_run <baseline run id>
    python -m harness.classify --train chexpert:outputs/synthetic --mix phantom --mix_ratio 0.5
    mlflow run . -e classify -P train=chexpert:outputs/synthetic --env-manager local

Data discipline: model selection (best epoch by validation macro AUC) uses ``--valid``'s ``valid``
split (default: the training data's), never the test split. The test table is read up front only
to check it (labels, no image shared with training, the baseline's image set); its images go
through the model once, after model selection. ``--test_split valid`` scores the real data's valid
split instead: hyperparameter tuning (``harness.tune``) scores every trial that way and keeps the
test split for the one configuration it picks.

``--mix REAL --mix_ratio r``: the training set keeps the size of ``--train``'s train split, a
fraction ``r`` of it drawn from REAL's train split and the rest from ``--train`` (seeded, without
replacement; r = 0 is ``--train`` alone, r = 1 real images alone at the same size).

Logged (names shared by every classify run, so the MLflow UI compares them): per label ``auc_<l>``,
``auc_<l>_ci_low`` / ``_ci_high`` (stratified bootstrap, ``harness.evaluate``), ``acc_<l>`` (score
>= 0.5), ``bal_acc_<l>`` (balanced accuracy at 0.5: the mean of sensitivity and specificity, which
unlike accuracy does not reward predicting a rare finding's absence) and ``auc_macro`` /
``acc_macro`` / ``bal_acc_macro``, with ``<l>`` the label in snake case (``auc_pleural_effusion``);
per epoch ``train_loss``, ``valid_loss``, ``valid_auc_macro``, ``valid_auc_<l>``; artifacts ``roc.png`` and ``predictions.csv`` (path, patient, study, view, then
``target_<l>`` and ``score_<l>``: every figure can be recomputed from it). A label with one class
in the test split gets nan metrics and a ``harness.warning.auc_<l>`` tag. With ``--baseline_run``:
``auc_diff_<l>`` = this run's AUC minus the baseline's on the same images, with its paired CI, and
``auc_diff_macro``. ``harness.compare.macro_auc_difference`` gives the same paired comparison of the macro AUC
between any two classify runs from their ``predictions.csv`` (the pipeline's arm differences).

Models: ``small_cnn`` (default, CPU) or ``densenet`` (torchxrayvision's DenseNet-121, randomly
initialised: nothing is downloaded; pretrained xrv weights would only be used if present locally,
and this entry point does not load any).
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_curve

from harness import tracking
from harness.artifacts import resolved
from harness.classifier import (CLASSIFIER_ARTIFACT, CLASSIFIERS, build_classifier, load_classifier, predict,
                                save_classifier, train_classifier)
from harness.config import ConfigError, StepConfig, param, parse
from harness.compare import PREDICTIONS, load_baseline
from harness.data import CachedImages, DataSpec, ImageDataset, load_table, summarize
from harness.data.datasets import META_COLUMNS
from harness.evaluate import (bootstrap_auc, paired_difference, per_label_accuracy,
                              per_label_balanced_accuracy)
from harness.metrics import check_metric_names, macro_auc, nan_mean, per_label_auc, snake

PREDICTION_META = ["path", "patient", "study", "view"]


@dataclass
class ClassifyConfig(StepConfig):
    train: str = param("phantom", "training data: FORMAT:PATH or 'phantom' (its train split)", project=True)
    mix: str = param("", "real data set mixed into the training set (its train split)", project=True)
    mix_ratio: float = param(0.5, "fraction of the training set drawn from --mix", project=True)
    valid: str = param("", "data set whose valid split selects the model (default: --train)", project=True)
    test: str = param("phantom", "real data set whose test split is scored once", project=True)
    test_split: str = param("test", "split of --test that is scored: 'valid' for tuning (harness.tune), so that "
                            "the test split stays unseen until the chosen configuration is scored once. A "
                            "chexpert folder without test.csv (CheXpert-v1.0-small) scores valid.csv as 'test' "
                            "and has a seeded patient-wise hold-out of train.csv as 'valid' "
                            "(harness.data.datasets)", choices=["test", "valid"])
    labels: str = param("", "comma-separated labels (default: the data sets' own)")
    model: str = param("small_cnn", "classifier architecture", choices=CLASSIFIERS, project=True)
    resolution: int = param(64, project=True)
    epochs: int = param(8, project=True)
    lr: float = param(1e-3, project=True)
    batch_size: int = param(32, project=True)
    seed: int = param(0, project=True)
    views: str = param("frontal", choices=["frontal", "lateral", "all"], project=True)
    uncertain: str = param("ignore", choices=["ignore", "zeros", "ones"], project=True)
    max_train_images: int = param(0, "0 = all")
    n_resamples: int = param(1000, "bootstrap resamples for the CIs")
    confidence: float = param(0.95)
    baseline_run: str = param("", "classify run id to compare with (paired, same test images)", project=True)
    device: str = param("auto", "auto = cuda when available, else cpu", key=False)
    num_workers: int = param(0, key=False)
    threads: int = param(0, "torch CPU threads (0 = torch's default; 1 is much faster on a busy shared CPU)",
                         key=False)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)

    def check(self) -> None:
        self.at_least(1, "epochs", "batch_size", "n_resamples")
        self.at_least(16, "resolution")
        self.not_negative("max_train_images", "num_workers", "threads")
        self.positive("lr")
        self.within("mix_ratio", 0.0, 1.0)
        if not 0.0 < self.confidence < 1.0:
            raise ConfigError(f"--confidence {self.confidence}: must be in (0, 1)")
        for flag in ("train", "mix", "valid", "test"):  # an unknown format fails here, before any training
            if getattr(self, flag):
                try:
                    DataSpec.parse(getattr(self, flag))
                except ValueError as err:
                    raise ConfigError(f"--{flag}: {err}") from None
        if self.labels:
            try:
                check_metric_names(self.labels.split(","))
            except ValueError as err:
                raise ConfigError(f"--labels: {err}") from None


def parse_args(argv=None) -> ClassifyConfig:
    return parse(ClassifyConfig, argv, prog="python -m harness.classify")


def run_identity(args) -> tuple[str, dict]:
    """The run's name and tags, by what it judges: a generated set's checkpoint
    (``classify · dreambooth @ 600``, tags ``harness.arm`` / ``harness.step`` /
    ``harness.source_run`` / ``harness.generate_run``) or real data (``classify · real``)."""
    from harness.generate import generated_source, judged, source_tags

    source = generated_source(args.train)
    what = judged(source) if source is not None else "real"
    tags = source_tags(source) if source is not None else {"harness.arm": "real"}
    if args.mix:
        what += f" + {args.mix_ratio:.0%} real"
    return f"classify · {what}", {**tags, "harness.judged": what}


def run(config: ClassifyConfig) -> tracking.StepResult:
    """Train, select, test once, log; the result holds the run's metrics and ``predictions``."""
    local = resolved(config, "train", "mix", "valid", "test")  # artifact URIs -> local folders; params keep the URIs
    name, tags = run_identity(local)
    with tracking.tracked_run(name, config.experiment, tags={"harness.entry_point": "classify", **tags}) as active:
        tracking.log_params({k: v for k, v in config.params().items() if k != "experiment"})
        classify(local, active.info.run_id)
    return result(active.info.run_id)


def result(run_id: str) -> tracking.StepResult:
    """A classify run's result: its metrics and its ``predictions`` (every figure recomputes from it)."""
    return tracking.StepResult.of(run_id, predictions=PREDICTIONS)


# ------------------------------------------------------------------- the logged classifier

def log_classifier(model: torch.nn.Module, **meta) -> None:
    """Log a classifier to the active run as ``classifier/model.pt`` (for ``--classifier_run``)."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.log_artifact(str(save_classifier(model, Path(tmp) / "model.pt", **meta)), "classifier")


def classifier_from_run(run_id: str) -> torch.nn.Module:
    """The classifier a run logged with ``log_classifier``."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CLASSIFIER_ARTIFACT, dst_path=tmp)
        except Exception as err:  # MlflowException or OSError, depending on the store
            raise ValueError(f"run {run_id} has no {CLASSIFIER_ARTIFACT} (classify runs log one): "
                             f"{err}") from err
        return load_classifier(path)


def main(argv=None) -> str:
    """The command line's entry: returns the MLflow run id."""
    return run(parse_args(argv)).run_id


# ------------------------------------------------------------------------------------------ data


def load_tables(args) -> tuple[dict[str, pd.DataFrame], list[str]]:
    """train (possibly mixed), valid and test tables, on one label list in one order."""
    opts = {"views": args.views, "uncertain": args.uncertain,
            "labels": args.labels.split(",") if args.labels else None}
    train = load_table(args.train, "train", **opts)
    labels = train.attrs["labels"]
    names = [snake(l) for l in labels]
    if len(set(names)) != len(names) or "" in names:
        raise ValueError(f"labels {labels} do not give distinct metric names ({names})")

    def other(spec, split, role):
        try:
            table = load_table(spec, split, **opts)
        except FileNotFoundError as err:
            hint = " (pass --valid with a data set that has one)" if role == "validation" and not args.valid else ""
            raise FileNotFoundError(f"{role} data: {err}{hint}") from err
        if set(table.attrs["labels"]) != set(labels):
            raise ValueError(f"label sets differ: training data {args.train} has {labels}, {role} data {spec} "
                             f"has {table.attrs['labels']} (pass --labels to choose common ones)")
        attrs = {**table.attrs, "labels": labels}
        table = table[META_COLUMNS + labels]
        table.attrs = attrs
        return table

    if args.max_train_images:
        train = train.iloc[: args.max_train_images]
    if args.mix:
        train = _mix(train, other(args.mix, "train", "mix"), args.mix_ratio, args.seed)
    tables = {"train": train, "valid": other(args.valid or args.train, "valid", "validation"),
              "test": other(args.test, args.test_split, "test")}
    for name in ("train", "valid"):
        shared = set(tables[name]["path"]) & set(tables["test"]["path"])
        if shared:
            # The usual cause: --test_split valid on the data that also selects the model.
            hint = (" (--test_split valid scores the split that selects the model; pass --valid with other data)"
                    if name == "valid" and args.test_split == "valid" else "")
            raise ValueError(f"{len(shared)} test image(s) are also in the {name} data, e.g. {min(shared)}{hint}")
    return tables, labels


def _mix(train: pd.DataFrame, real: pd.DataFrame, ratio: float, seed: int) -> pd.DataFrame:
    total = len(train)
    n_real = int(round(ratio * total))
    if n_real > len(real):
        raise ValueError(f"--mix_ratio {ratio} of {total} training images needs {n_real} real images; "
                         f"{real.attrs['spec']} has {len(real)}")
    rng = np.random.default_rng(seed)
    parts = [train.iloc[np.sort(rng.choice(total, total - n_real, replace=False))],
             real.iloc[np.sort(rng.choice(len(real), n_real, replace=False))]]
    mixed = pd.concat(parts, ignore_index=True)
    mixed.attrs = {**train.attrs, "mixed_with": real.attrs["spec"], "n_mixed_real": n_real,
                   "n_mixed_train": total - n_real}
    return mixed


def _loader(table, labels, args, shuffle: bool):
    images = CachedImages(ImageDataset(table, labels, resolution=args.resolution, channels=1))
    return torch.utils.data.DataLoader(images, batch_size=args.batch_size, shuffle=shuffle,
                                       num_workers=args.num_workers,
                                       generator=torch.Generator().manual_seed(args.seed) if shuffle else None)


# -------------------------------------------------------------------------------------- baseline


# ------------------------------------------------------------------------------------------- run


def classify(args, run_id: str) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _classify(args, run_id)
    finally:
        torch.set_num_threads(threads)


def _classify(args, run_id: str) -> dict[str, float]:
    tables, labels = load_tables(args)
    baseline = load_baseline(args.baseline_run, tables["test"], labels) if args.baseline_run else None
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    _log_data(tables, labels, device)

    torch.manual_seed(args.seed)
    model = build_classifier(args.model, len(labels), in_channels=1)
    start = time.perf_counter()
    model, history = train_classifier(model, _loader(tables["train"], labels, args, shuffle=True),
                                      _loader(tables["valid"], labels, args, shuffle=False),
                                      epochs=args.epochs, lr=args.lr, seed=args.seed, device=device,
                                      labels=labels, progress=False)
    train_s = time.perf_counter() - start
    _log_history(history, labels, run_id)
    # The selected model: checks take its features for the Frechet distance (--classifier_run).
    log_classifier(model, architecture=args.model, n_labels=len(labels), in_channels=1, labels=labels,
                   resolution=args.resolution)

    # The one look at the test split.
    scores, targets = predict(model, _loader(tables["test"], labels, args, shuffle=False), device)
    metrics = score_metrics(targets, scores, labels, args)
    if baseline is not None:
        metrics.update(_compare(targets, scores, baseline, labels, args))
        mlflow.set_tag("harness.baseline_run", args.baseline_run)
    best = max(history, key=lambda r: (np.nan_to_num(r["valid_macro_auc"], nan=-np.inf), -r["valid_loss"]))
    metrics.update({"train_seconds": train_s, "best_epoch": best["epoch"]})
    mlflow.log_metrics(metrics)
    _log_predictions(tables["test"], targets, scores, labels)
    mlflow.log_figure(roc_figure(targets, scores, labels, split=args.test_split), "roc.png")
    return metrics


def score_metrics(targets, scores, labels, args) -> dict[str, float]:
    """auc_*, their CIs, acc_* and bal_acc_*; a single-class label gets nan and a warning tag."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aucs = per_label_auc(targets, scores, labels)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # still shown
        label = next((l for l in labels if repr(l) in str(w.message)), None)
        if label is not None:
            mlflow.set_tag(f"harness.warning.auc_{snake(label)}", str(w.message)[:5000])
    cis = bootstrap_auc(targets, scores, labels, n_resamples=args.n_resamples, seed=args.seed,
                        confidence=args.confidence)
    acc = per_label_accuracy(targets, scores, labels)
    balanced = per_label_balanced_accuracy(targets, scores, labels)
    out = {"auc_macro": macro_auc(aucs), "acc_macro": nan_mean(acc), "bal_acc_macro": nan_mean(balanced)}
    for label in labels:
        n = snake(label)
        out.update({f"auc_{n}": aucs[label], f"auc_{n}_ci_low": cis[label][0], f"auc_{n}_ci_high": cis[label][1],
                    f"acc_{n}": acc[label], f"bal_acc_{n}": balanced[label]})
    return out


def _compare(targets, scores, baseline, labels, args) -> dict[str, float]:
    diffs = paired_difference(targets, scores, baseline, labels, n_resamples=args.n_resamples, seed=args.seed,
                              confidence=args.confidence)
    out = {}
    for label, (diff, low, high) in diffs.items():
        n = snake(label)
        out.update({f"auc_diff_{n}": diff, f"auc_diff_{n}_ci_low": low, f"auc_diff_{n}_ci_high": high})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # already warned for this run's own AUCs
        out["auc_diff_macro"] = (macro_auc(per_label_auc(targets, scores, labels))
                                 - macro_auc(per_label_auc(targets, baseline, labels)))
    return out


def roc_figure(targets, scores, labels, split: str = "test") -> Figure:
    """One ROC curve per label with a defined AUC (sklearn's roc_curve on the known rows)."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot()
    for j, label in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y = targets[known, j]
        if len(np.unique(y)) < 2 or not np.isfinite(scores[known, j]).all():
            continue
        fpr, tpr, _ = roc_curve(y, scores[known, j])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc = per_label_auc(y[:, None], scores[known, j][:, None], [label])[label]
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f}, n={known.sum()})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
           title=f"ROC on the {split} split")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------- logging


def _log_data(tables, labels, device) -> None:
    contexts = {"train": "training", "valid": "validation", "test": "testing"}
    for name, table in tables.items():
        spec = table.attrs["spec"]
        full = spec + (f"+{table.attrs['mixed_with']}" if "mixed_with" in table.attrs else "")
        source = str(DataSpec.parse(spec).resolve().path)
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways": it is a local dir
            warnings.filterwarnings("ignore", message="The specified dataset source")
            dataset = mlflow.data.from_pandas(table, source=source, name=f"{name}:{full}")
        tracking.log_input(dataset, context=contexts[name])
        mlflow.log_dict(summarize(table), f"data/{name}_summary.json")
    mixed = {k: tables["train"].attrs[k] for k in ("n_mixed_real", "n_mixed_train") if k in tables["train"].attrs}
    mlflow.log_params({"n_train_images": len(tables["train"]), "n_valid_images": len(tables["valid"]),
                       "n_test_images": len(tables["test"]), "label_names": json.dumps(labels),
                       "device_used": device, **mixed})


def _log_history(history, labels, run_id) -> None:
    names = {"train_loss": "train_loss", "valid_loss": "valid_loss", "valid_macro_auc": "valid_auc_macro",
             **{f"valid_auc/{l}": f"valid_auc_{snake(l)}" for l in labels}}
    now = int(time.time() * 1000)
    batch = [Metric(names[k], float(v), now, int(rec["epoch"])) for rec in history for k, v in rec.items()
             if k in names]
    MlflowClient().log_batch(run_id, metrics=batch)


def _log_predictions(test, targets, scores, labels) -> None:
    table = test[PREDICTION_META].copy()
    for j, label in enumerate(labels):
        table[f"target_{snake(label)}"] = targets[:, j]
        table[f"score_{snake(label)}"] = scores[:, j]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PREDICTIONS
        table.to_csv(path, index=False)
        mlflow.log_artifact(str(path))


if __name__ == "__main__":
    main()
