"""The ``sd-cxr`` command line: one click subcommand per entry point, made from the steps' configs.

    sd-cxr dreambooth --steps 50000          # = python -m harness.finetune --arm dreambooth --steps 50000
    sd-cxr pipeline --jobs 2
    sd-cxr report
    sd-cxr mlproject > MLproject              # the MLproject's parameters, from the same configs

A subcommand imports its step only when it runs (``sd-cxr report`` loads no torch). The MLproject
calls this command line, so a parameter is declared once: in its step's config dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
from dataclasses import dataclass, field

import click

from harness.config import StepConfig, command, field_type


@dataclass(frozen=True)
class EntryPoint:
    module: str
    config: str  # the config class's name in ``module``; the module's ``run(config)`` runs it
    fixed: dict = field(default_factory=dict)  # options this entry point sets (an arm)
    help: str = ""

    def load(self) -> tuple[type[StepConfig], object]:
        module = importlib.import_module(self.module)
        return getattr(module, self.config), module.run

    def doc(self) -> str:
        module = importlib.import_module(self.module)
        return self.help or (module.__doc__ or "").split("\n\n")[0]


_FINETUNE = "harness.finetune", "FinetuneConfig"
ENTRY_POINTS = {
    "phantom": EntryPoint("harness.data.phantom", "PhantomConfig",
        help="Render the embedded chest-radiograph phantom in the CheXpert layout."),
    "base": EntryPoint("harness.base.build", "BuildConfig",
        help="Build and register the small SD-architecture base model, offline."),
    **{arm: EntryPoint(*_FINETUNE, fixed={"arm": arm}, help=f"Fine-tune the {what}: the study's {arm} arm.")
       for arm, what in [("dreambooth", "UNet (text encoder and VAE frozen)"),
                         ("text_encoder", "text encoder (UNet and VAE frozen)"),
                         ("unet_text_encoder", "UNet and the text encoder")]},
    "finetune": EntryPoint(*_FINETUNE,
        help="Fine-tune any arm (--arm)."),
    "generate": EntryPoint("harness.generate", "GenerateConfig",
        help="Generate a labelled synthetic data set from a checkpoint."),
    "classify": EntryPoint("harness.classify", "ClassifyConfig",
        help="Train a classifier on a data set; per-finding AUC on real test images."),
    "checks": EntryPoint("harness.checks", "ChecksConfig",
        help="View mix, memorization, Frechet distance and prompt adherence of generated images."),
    "pipeline": EntryPoint("harness.pipeline", "PipelineConfig",
        help="The whole study: every arm, judged checkpoints, registry, champion."),
    "register": EntryPoint("harness.register", "RegisterConfig",
        help="Register a judged checkpoint as a model version with its metrics."),
    "promote": EntryPoint("harness.promote", "PromoteConfig",
        help="Point the champion alias at the best evaluated version."),
    "report": EntryPoint("harness.report", "ReportConfig",
        help="Write reports/ from the registry and runs."),
    "tune": EntryPoint("harness.tune", "TuneConfig",
        help="Optuna search of learning rate and steps against synthetic-data AUC."),
}


class _Steps(click.Group):
    """Subcommands built on demand from ``ENTRY_POINTS``, so one step's imports never load another's."""

    def list_commands(self, ctx):
        return [*ENTRY_POINTS, "mlproject"]

    def get_command(self, ctx, name):
        if name == "mlproject":
            return _mlproject
        if name not in ENTRY_POINTS:
            return None
        entry = ENTRY_POINTS[name]
        config, run = entry.load()
        return command(config, run, name=name, help=entry.doc(), fixed=entry.fixed)

    def format_commands(self, ctx, formatter):
        # the names only: describing each would import every step (torch included) for `--help`
        with formatter.section("Commands"):
            formatter.write_dl([(name, entry.help) for name, entry in ENTRY_POINTS.items()] + [("mlproject", "print the MLproject made from the configs")])


@click.group(cls=_Steps, context_settings={"max_content_width": 110})
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def cli(log_level: str) -> None:
    """Fine-tune Stable Diffusion on chest X-rays and judge it by what its images are worth as
    training data. Every subcommand is an MLflow Projects entry point (``mlflow run . -e NAME``)."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------------------- MLproject

HEADER = """\
name: sd-cxr-harness

# Made by `sd-cxr mlproject > MLproject` from the steps' config dataclasses (harness/cli.py): edit
# those, not this file (tests/test_cli.py checks that it is up to date). Each command is the
# `sd-cxr` command line through bin/python, which finds the project's environment (or says how to
# make one) when the caller's PATH has another python: `.venv/bin/mlflow run . -e dreambooth
# --env-manager local`.
conda_env: conda.yaml

entry_points:
"""


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return f'"{str(value).lower()}"'
    if value is None or value == "":
        return '""'
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) and not math.isfinite(value) else str(value)
    text = str(value)
    return text if text.replace("_", "").replace("-", "").isalnum() and not text[0].isdigit() else f'"{text}"'


def mlproject_text() -> str:
    """The MLproject: per entry point, its config's ``project=True`` fields as parameters."""
    lines = [HEADER]
    for name, entry in ENTRY_POINTS.items():
        config, _ = entry.load()
        fields = [f for f in config.options() if f.metadata.get("project") and f.name not in entry.fixed]
        lines.append(f"  {name}:\n    parameters:\n")
        for f in fields:
            kind = "float" if field_type(config, f)[0] in (int, float) else "string"
            default = "" if f.default is dataclasses.MISSING else f", default: {_yaml_value(f.default)}"
            lines.append(f"      {f.name}: {{type: {kind}{default}}}\n")
        options = " ".join(f"--{f.name} {{{f.name}}}" for f in fields)
        lines.append(f'    command: "bin/python -m harness {name} {options}"\n\n')
    return "".join(lines).rstrip("\n") + "\n"


@click.command("mlproject")
def _mlproject() -> None:
    """Print the MLproject made from the steps' configs."""
    click.echo(mlproject_text(), nl=False)


def main(argv=None):
    return cli.main(args=argv, prog_name="sd-cxr")


if __name__ == "__main__":
    main()
