"""The register step: one evaluated checkpoint as a version of the registry's model, with its
figures as tags (``registry.register`` does the registering; this is its command line).

    python -m harness register --finetune_run <id> --step 200 --classify_run <id> [--checks_run <id>]
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion

from harness import tracking
from harness.config import StepConfig, param, parse
from registry.register import MODEL_PREFIX, register_checkpoint


@dataclass
class RegisterConfig(StepConfig):
    finetune_run: str = param(help="the fine-tuning run whose checkpoint is registered", project=True)
    step: int = param(help="the checkpoint's step", project=True)
    classify_run: str = param(help="the classify run that judged its generated data", project=True)
    generate_run: str = param("", project=True)
    checks_run: str = param("", project=True)
    name: str = param("", f"registered model name (default {MODEL_PREFIX}-<data>)", project=True)

    def check(self) -> None:
        self.not_negative("step")


def run(config: RegisterConfig) -> ModelVersion:
    """Register the checkpoint (or find it registered); prints and returns its version."""
    tracking.use_project_store()
    version = register_checkpoint(config.finetune_run, config.step, config.classify_run,
                                  config.generate_run or None, config.checks_run or None, config.name or None)
    print(f"{version.name} version {version.version}: {version.tags.get('arm')} @ {version.tags.get('step')}, "
          f"auc_macro {version.tags.get('auc_macro')}")
    return version


def main(argv=None) -> ModelVersion:
    return run(parse(RegisterConfig, argv, prog="python -m harness.register"))


if __name__ == "__main__":
    main()
