"""The project's packaging stays consistent: MLproject, conda.yaml, requirements, README, CI."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines):
    return sorted(l.strip() for l in lines if re.match(r"^[A-Za-z0-9_.-]+==", l.strip()))


def test_conda_env_pins_mirror_requirements():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _pins(pip) == _pins((ROOT / "requirements.txt").read_text().splitlines())


def test_every_entry_point_runs_a_module_with_main():
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    assert project["conda_env"] == "conda.yaml"
    from harness.cli import ENTRY_POINTS

    for name, entry in project["entry_points"].items():
        module, subcommand = re.match(r"bin/python -m ([\w.]+)(?: (\w+))?", entry["command"]).groups()
        if module == "harness":  # the sd-cxr command line: the subcommand's step module
            assert subcommand == name and name in ENTRY_POINTS, name
            module = ENTRY_POINTS[name].module
            assert hasattr(importlib.import_module(module), ENTRY_POINTS[name].config), name
        assert callable(importlib.import_module(module).main), name
        for param in re.findall(r"\{(\w+)\}", entry["command"]):
            assert param in entry["parameters"], f"{name}: {{{param}}} is not a parameter"


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_mlproject_defaults_are_the_modules_defaults():
    """`mlflow run . -e X` with no -P runs what `python -m ...` runs (a 0 patients default once failed)."""
    from harness import pipeline
    from harness.data.phantom import DEFAULT_PATIENTS
    from registry.pyfunc import DEFAULT_GUIDANCE

    entries = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    assert entries["phantom"]["parameters"]["patients"]["default"] == DEFAULT_PATIENTS
    assert entries["generate"]["parameters"]["guidance_scale"]["default"] == DEFAULT_GUIDANCE
    defaults = pipeline.parse_args([])
    for name in ("steps", "eval_steps", "learning_rate", "n_per_prompt", "prompts", "epochs"):
        value, ours = entries["pipeline"]["parameters"][name]["default"], getattr(defaults, name)
        assert (float(value) == ours) if isinstance(ours, (int, float)) else (str(value) == ours), name


def _bare_env(tmp_path) -> dict:
    """A shell where `python` is not the project's: no venv active, only the system's PATH."""
    import os

    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)), "OMP_NUM_THREADS": "1",
            "HARNESS_DATA_DIR": str(tmp_path / "data"), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}


@pytest.mark.slow
def test_mlflow_run_finds_the_project_env_when_it_is_not_active(tmp_path):
    """`.venv/bin/mlflow run . --env-manager local` without activating .venv once failed inside the
    step with "No module named 'mlflow'": MLproject commands go through bin/python, which finds it."""
    import subprocess
    import sys

    import pytest
    from mlflow.tracking import MlflowClient

    mlflow_cli = Path(sys.executable).with_name("mlflow")
    if not mlflow_cli.is_file():
        pytest.skip("the mlflow console script is not next to this Python")
    done = subprocess.run([str(mlflow_cli), "run", str(ROOT), "-e", "phantom", "-P", "patients=8",
                           "--env-manager", "local"], env=_bare_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").search_runs(["0"])
    assert run.info.status == "FINISHED"
    assert any((tmp_path / "data").glob("phantom-*/CheXpert-v1.0-small/train.csv"))


def test_bin_python_without_the_project_env_says_what_to_do(tmp_path):
    import shutil
    import subprocess

    import pytest

    (tmp_path / "bin").mkdir()
    shutil.copy(ROOT / "bin" / "python", tmp_path / "bin" / "python")  # a checkout with no .venv
    done = subprocess.run(["sh", str(tmp_path / "bin" / "python"), "-c", "print('ran')"], env=_bare_env(tmp_path),
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    if done.returncode == 0:
        pytest.skip("this machine's system Python has the project's packages")
    assert done.returncode == 2 and "ran" not in done.stdout
    assert "make venv" in done.stderr and "mlflow" in done.stderr


def test_make_puts_mlflow_runs_in_the_readmes_experiment():
    """`mlflow run` picks the experiment before a step starts (Default, unless told): the Makefile
    tells it the one the README names."""
    from harness.tracking import DEFAULT_EXPERIMENT

    makefile = (ROOT / "Makefile").read_text()
    assert re.search(rf"^export MLFLOW_EXPERIMENT_NAME \?= {DEFAULT_EXPERIMENT}$", makefile, re.M)
    assert f"experiment `{DEFAULT_EXPERIMENT}`" in (ROOT / "README.md").read_text()

