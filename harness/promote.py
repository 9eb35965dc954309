"""The promote step: point the ``champion`` alias at the best evaluated version, in a run of its
own (``registry.promote`` decides and moves the alias; this is its command line).

    python -m harness promote --name cxr-sd-phantom                 # best by auc_macro
    python -m harness promote --name cxr-sd-phantom --margin 0.01   # move only for a clear win
    python -m harness promote --name cxr-sd-phantom --version 7     # this one, if it wins
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow

from harness import tracking
from harness.config import StepConfig, param, parse
from registry.promote import ALIAS, DEFAULT_METRIC, Decision, promote
from registry.register import MODEL_PREFIX

log = logging.getLogger(__name__)


@dataclass
class PromoteConfig(StepConfig):
    name: str = param(f"{MODEL_PREFIX}-phantom", f"registered model ({MODEL_PREFIX}-<data>)", project=True)
    metric: str = param(DEFAULT_METRIC, project=True)
    margin: float = param(0.0, "how much the candidate must beat the champion by", project=True)
    alias: str = param(ALIAS)
    version: str = param("", "promote this version (default: the best evaluated one)", project=True)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)

    def check(self) -> None:
        self.not_negative("margin")


def run(config: PromoteConfig) -> Decision:
    """Promote, in a run of its own: the audit trail of who asked for what (and the run `mlflow run` makes)."""
    with tracking.tracked_run("promote", config.experiment, tags={"harness.entry_point": "promote"}):
        tracking.log_params({k: v for k, v in config.params().items() if k != "experiment"})
        decision = promote(config.name, config.metric, config.margin, config.alias, config.version or None)
        mlflow.set_tags({"harness.champion": str(decision.champion), "harness.moved": str(decision.moved),
                         "harness.reason": decision.reason[:5000]})
    log.info("%s@%s -> version %s: %s", config.name, config.alias, decision.champion, decision.reason)
    return decision


def main(argv=None) -> Decision:
    return run(parse(PromoteConfig, argv, prog="python -m harness.promote"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
