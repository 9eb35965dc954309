"""Every evaluated checkpoint becomes a version in the MLflow model registry.

Naming: one registered model per training data set, ``cxr-sd-<data>`` (``cxr-sd-phantom`` for the
embedded default). Its versions are the checkpoints of every arm, so the ``champion`` alias
(``registry.promote``) names the best source of synthetic training data for that data set,
whichever arm made it. A version's tags say where it came from and what it is worth:

- ``arm``, ``step``, ``data``, ``source_model`` (the checkpoint's logged-model URI);
- ``finetune_run_id``, ``generate_run_id``, ``classify_run_id``, ``checks_run_id``;
- the classify run's ``auc_<label>`` (with ``_ci_low``/``_ci_high``), ``auc_macro``, ``acc_*`` and
  ``bal_acc_*`` (balanced accuracy);
- the checks run's ``view_frontal_fraction``, ``memorization_fraction``, ``frechet_distance`` and
  prompt adherence: ``adherence_<label>``, ``adherence_mean`` and, for phantom data, the
  renderer's ceiling ``adherence_ceiling_<label>`` / ``adherence_ceiling_mean``.

Everything is checked before anything is written, and the version is created with its tags in
one call: a bad input leaves no half-written entry. Registering the same checkpoint again
returns the existing version.

    python -m harness register --finetune_run <id> --step 200 --classify_run <id> [--checks_run <id>]
"""

from __future__ import annotations

import hashlib
import math
import os
import re

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


MODEL_PREFIX = "cxr-sd"
CHECKPOINT_TAG = "harness.checkpoint.{step:06d}"  # set by harness.finetune on each checkpoint
SOURCE_TAG = "source_model"
# What promotion and the report read. Classify metrics: per-label AUC with CIs, macro AUC, accuracy
# and balanced accuracy; checks metrics: the view mix, near-copies, distance and prompt adherence.
CLASSIFY_METRIC = re.compile(r"^(auc_[a-z_]+?(_ci_low|_ci_high)?|(bal_)?acc_[a-z_]+)$")
CHECKS_METRICS = ("view_frontal_fraction", "memorization_fraction", "frechet_distance")
CHECKS_METRIC = re.compile(rf"^({'|'.join(CHECKS_METRICS)}|adherence_[a-z0-9_]+)$")


def model_name(data: str) -> str:
    """``phantom`` -> ``cxr-sd-phantom``; ``chexpert:/x/CheXpert-v1.0-small`` ->
    ``cxr-sd-chexpert-chexpert-v1-0-small-<8 hex>``.

    The suffix hashes the folder's absolute path: two copies of one archive in different places
    (a release and a relabelled fork, say) must not compete for one champion. Workers that see the
    same data under different paths should name the model themselves (``--name`` / the
    pipeline's ``--registered_model``)."""
    fmt, _, path = str(data).partition(":")
    if not path:
        return f"{MODEL_PREFIX}-{_slug(fmt)}"
    folder = os.path.abspath(os.path.expanduser(path.strip()))
    last = re.split(r"[\\/]", folder.rstrip("/\\"))[-1]
    digest = hashlib.sha256(folder.encode()).hexdigest()[:8]
    return f"{MODEL_PREFIX}-{_slug(f'{fmt}-{last}')}-{digest}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _finished_run(client: MlflowClient, run_id: str, what: str):
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ValueError(f"{what} run {run_id!r} not found in {mlflow.get_tracking_uri()}") from e
    if run.info.status != "FINISHED":
        raise ValueError(f"{what} run {run_id} is {run.info.status}, not FINISHED: only finished work is registered")
    return run


def evaluation_tags(client: MlflowClient, classify_run_id: str, checks_run_id: str | None = None) -> dict:
    """The figures a version carries, read from its classify (and checks) run."""
    classify = _finished_run(client, classify_run_id, "classify")
    tags = {k: repr(v) for k, v in classify.data.metrics.items() if CLASSIFY_METRIC.match(k)}
    if "auc_macro" not in tags:
        raise ValueError(f"classify run {classify_run_id} has no auc_macro metric: is it a harness.classify run?")
    if checks_run_id:
        checks = _finished_run(client, checks_run_id, "checks").data.metrics
        tags.update({k: repr(v) for k, v in checks.items() if CHECKS_METRIC.match(k)})
    return tags


def find_version(client: MlflowClient, name: str, source_model: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{name}' and tags.{SOURCE_TAG} = '{source_model}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def register_checkpoint(finetune_run_id: str, step: int, classify_run_id: str, generate_run_id: str | None = None,
                        checks_run_id: str | None = None, name: str | None = None) -> ModelVersion:
    """Register the checkpoint of ``finetune_run_id`` at ``step`` with its evaluation; idempotent."""
    client = MlflowClient()
    finetune = _finished_run(client, finetune_run_id, "fine-tuning")
    source = finetune.data.tags.get(CHECKPOINT_TAG.format(step=int(step)))
    if not source:
        steps = sorted(int(k.rsplit(".", 1)[1]) for k in finetune.data.tags if k.startswith("harness.checkpoint."))
        raise ValueError(f"fine-tuning run {finetune_run_id} has no checkpoint at step {step}; it has {steps}")
    params = finetune.data.params
    name = name or model_name(params.get("data", "phantom"))
    tags = {
        "arm": params.get("arm", finetune.data.tags.get("harness.arm", "")),
        "step": str(int(step)),
        "data": params.get("data", ""),
        SOURCE_TAG: source,
        "finetune_run_id": finetune_run_id,
        "classify_run_id": classify_run_id,
        **({"generate_run_id": generate_run_id} if generate_run_id else {}),
        **({"checks_run_id": checks_run_id} if checks_run_id else {}),
        **evaluation_tags(client, classify_run_id, checks_run_id),
    }
    if generate_run_id:
        _finished_run(client, generate_run_id, "generate")
    existing = find_version(client, name, source)
    if existing is not None:
        # The same checkpoint: no second version. Its evaluation is brought up to date (a re-run
        # of classify or checks), which the report then shows.
        for key, value in tags.items():
            if existing.tags.get(key) != value:
                client.set_model_version_tag(name, existing.version, key, value)
        return client.get_model_version(name, existing.version)
    version = mlflow.register_model(source, name, tags=tags)
    client.set_registered_model_tag(name, "harness.kind", "synthetic-data-generator")
    return client.get_model_version(name, str(version.version))


def value(version: ModelVersion, metric: str) -> float | None:
    """A version's evaluated figure, or None when it has none (or it is nan)."""
    raw = version.tags.get(metric)
    if raw is None:
        return None
    try:
        out = float(raw)
    except ValueError:
        return None
    return None if math.isnan(out) else out
