"""Set the ``champion`` alias on the best evaluated version, guarded by a margin.

    python -m harness promote --name cxr-sd-phantom                 # best by auc_macro
    python -m harness promote --name cxr-sd-phantom --margin 0.01   # move only for a clear win
    python -m harness promote --name cxr-sd-phantom --version 7     # this one, if it wins

The alias moves when there is no champion yet, or when the candidate's metric beats the current
champion's by more than ``margin``. A move is recorded on the new champion as tags
(``promotion.previous_version``, ``promotion.previous_value``, ``promotion.value``,
``promotion.metric``, ``promotion.time``); the champion's history is the versions that carry them.
Running it again changes nothing. Registry aliases only (stages are deprecated).

Races: the registry has no compare-and-set, so after writing the alias a promotion reads the
registry again. Any version promoted after the champion it decided against was promoted
concurrently; the best of those keeps the alias. Two promotions racing each other therefore end
with one champion, the better one, whichever writes last.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from registry.register import MODEL_PREFIX, value


ALIAS = "champion"
DEFAULT_METRIC = "auc_macro"  # the write-up's headline figure
LOWER_IS_BETTER = {"frechet_distance", "memorization_fraction"}
TIME_TAG = "promotion.time"


@dataclass
class Decision:
    moved: bool
    champion: str | None  # the version holding the alias afterwards
    reason: str


def _pause() -> None:
    """Between deciding and writing: a seam for the race test."""


def _better(a: float, b: float, metric: str, margin: float = 0.0) -> bool:
    return a < b - margin if metric in LOWER_IS_BETTER else a > b + margin


def _champion(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _promoted_time(version: ModelVersion | None) -> int:
    return int(version.tags.get(TIME_TAG, 0)) if version is not None else 0


def evaluated_versions(client: MlflowClient, name: str, metric: str) -> list[ModelVersion]:
    return [v for v in client.search_model_versions(f"name = '{name}'") if value(v, metric) is not None]


def promote(name: str, metric: str = DEFAULT_METRIC, margin: float = 0.0, alias: str = ALIAS,
            version: str | int | None = None, client: MlflowClient | None = None) -> Decision:
    client = client or MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        raise ValueError(f"no registered model {name!r} in this registry") from e
    if version is not None:
        candidate = client.get_model_version(name, str(version))
        if value(candidate, metric) is None:
            raise ValueError(f"{name} version {version} has no evaluation metric {metric!r} "
                             f"(its tags: {sorted(candidate.tags)}); register it with its classify run first")
    else:
        versions = evaluated_versions(client, name, metric)
        if not versions:
            raise ValueError(f"{name} has no version with evaluation metric {metric!r}; nothing to promote")
        sign = -1 if metric in LOWER_IS_BETTER else 1
        candidate = max(versions, key=lambda v: (sign * value(v, metric), -int(v.version)))
    new = value(candidate, metric)

    current = _champion(client, name, alias)
    if current is not None and str(current.version) == str(candidate.version):
        return Decision(False, str(current.version), f"version {current.version} is already {alias}")
    old = value(current, metric) if current is not None else None
    if old is not None and not _better(new, old, metric, margin):
        return Decision(False, str(current.version), f"version {candidate.version} ({metric} {new:.4f}) does not beat "
                                                f"{alias} version {current.version} ({old:.4f}) by margin {margin}")
    _pause()
    tags = {"promotion.metric": metric, "promotion.value": repr(new), "promotion.margin": repr(margin),
            "promotion.previous_version": str(current.version) if current is not None else "",
            "promotion.previous_value": repr(old) if old is not None else "",
            TIME_TAG: str(time.time_ns())}
    for key, text in tags.items():  # tags first: a reader that sees the alias sees why
        client.set_model_version_tag(name, candidate.version, key, text)
    client.set_registered_model_alias(name, alias, candidate.version)
    holder = _settle(client, name, alias, metric, since=_promoted_time(current))
    if holder != str(candidate.version):
        client.set_model_version_tag(name, candidate.version, "promotion.superseded_by", holder)
        return Decision(False, holder, f"a concurrent promotion of version {holder} won over {candidate.version}")
    return Decision(True, holder, f"version {candidate.version} ({metric} {new:.4f}) replaces "
                                  f"{'no champion' if current is None else f'version {current.version} ({old})'}")


def _settle(client: MlflowClient, name: str, alias: str, metric: str, since: int) -> str:
    """After a write: of the versions promoted since ``since``, the best keeps the alias."""
    contenders = [v for v in evaluated_versions(client, name, metric) if _promoted_time(v) > since]
    best = contenders[0]
    for v in contenders[1:]:
        if _better(value(v, metric), value(best, metric), metric):
            best = v
    holder = _champion(client, name, alias)
    if holder is None or str(holder.version) != str(best.version):
        client.set_registered_model_alias(name, alias, best.version)
    return str(best.version)


def history(name: str, alias: str = ALIAS, client: MlflowClient | None = None) -> list[dict]:
    """Every promotion of ``name``, oldest first (from the tags ``promote`` leaves)."""
    client = client or MlflowClient()
    rows = []
    for v in client.search_model_versions(f"name = '{name}'"):
        if TIME_TAG in v.tags:
            rows.append({"ns": int(v.tags[TIME_TAG]), "version": str(v.version), "arm": v.tags.get("arm"), "step": v.tags.get("step"),
                         "metric": v.tags.get("promotion.metric"), "value": value(v, "promotion.value"),
                         "previous_version": v.tags.get("promotion.previous_version") or None,
                         "previous_value": value(v, "promotion.previous_value"),
                         "superseded_by": v.tags.get("promotion.superseded_by"),
                         "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(v.tags[TIME_TAG]) / 1e9))})
    return [{k: v for k, v in r.items() if k != "ns"} for r in sorted(rows, key=lambda r: r["ns"])]
