"""The project's packaging stays consistent: MLproject, conda.yaml, requirements, README, CI."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

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
    for name, entry in project["entry_points"].items():
        module = re.match(r"python -m ([\w.]+)", entry["command"]).group(1)
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
