"""The sd-cxr command line and the step configs it is made from."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness import classify, finetune, pipeline
from harness.config import ConfigError, parse


def test_mlflow_projects_values_parse_as_typed():
    """MLflow Projects renders an integer default as '400.0' and a flag as 'true'."""
    config = parse(finetune.FinetuneConfig, ["--arm", "dreambooth", "--steps", "400.0", "--skip_bad", "true",
                                             "--template", ""])
    assert config.steps == 400 and config.skip_bad is True and config.template is None
    assert parse(finetune.FinetuneConfig, ["--arm", "dreambooth", "--skip_bad"]).skip_bad is True
    with pytest.raises(SystemExit) as exit_info:
        parse(finetune.FinetuneConfig, ["--arm", "dreambooth", "--steps", "1.5"])
    assert exit_info.value.code == 2


def test_a_config_is_checked_when_made_and_round_trips_through_its_argv():
    with pytest.raises(ConfigError, match="--epochs 0: must be at least 1"):
        classify.ClassifyConfig(epochs=0)
    config = classify.ClassifyConfig(train="chexpert:/x/CheXpert-v1.0-small", epochs=3, lr=5e-4)
    assert parse(classify.ClassifyConfig, config.to_argv()) == config
    assert "experiment" not in config.key_params() and "epochs" in config.key_params()


def test_a_config_made_in_code_is_held_to_its_choices():
    with pytest.raises(ConfigError, match="--prompts 'fancy': choose one of disease, data"):
        pipeline.PipelineConfig(prompts="fancy")
    with pytest.raises(ConfigError, match="--arm 'lora'"):
        finetune.FinetuneConfig(arm="lora")


def test_help_lists_every_entry_point_without_importing_torch():
    code = ("import sys; from harness.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'sd-cxr --help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("dreambooth", "text_encoder", "unet_text_encoder", "generate", "classify", "checks", "pipeline",
                 "tune", "report", "promote"):
        assert f"  {name} " in out


@pytest.mark.slow
def test_a_subcommand_shows_its_defaults():
    out = subprocess.run([sys.executable, "-m", "harness", "classify", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--epochs INTEGER" in out and "[default: 8]" in out


def test_the_committed_mlproject_is_the_one_the_configs_make():
    """The MLproject is generated (`sd-cxr mlproject > MLproject`): a parameter changed in a config
    and not regenerated fails here, instead of `mlflow run` running other defaults than the CLI."""
    from pathlib import Path

    from harness.cli import mlproject_text

    committed = (Path(__file__).resolve().parents[1] / "MLproject").read_text()
    assert committed == mlproject_text(), "MLproject is stale: run `python -m harness mlproject > MLproject`"


def test_every_entry_point_has_a_config_and_a_run():
    from harness.cli import ENTRY_POINTS
    from harness.config import StepConfig

    for name, entry in ENTRY_POINTS.items():
        config, run = entry.load()
        assert issubclass(config, StepConfig) and callable(run), name
        assert set(entry.fixed) <= {f.name for f in config.options()}, name


@pytest.mark.parametrize("module, argv", [
    ("harness.data.phantom", ["--patients", "2"]),
    ("harness.base.build", ["--batch_size", "0"]),
    ("harness.report", ["--log", "maybe"]),
    ("harness.register", ["--step", "1", "--classify_run", "c"]),  # --finetune_run is required
    ("harness.promote", ["--margin", "-0.1"]),
])
def test_bad_input_exits_2_before_any_work(module, argv, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(module).main(argv)
    assert exit_info.value.code == 2
    assert "Error:" in capsys.readouterr().err
