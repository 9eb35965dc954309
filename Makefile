SHELL := /bin/bash
# Two commands on a fresh clone (Python 3.11 + pip):  make demo   and   make test
# Both create the project's virtual environment (.venv) first when it is missing or stale.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
MLFLOW := $(VENV)/bin/mlflow
# MLproject commands say `python -m ...`: that must be the venv's python.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# `mlflow run` chooses the experiment before a step starts: the README's, not Default.
export MLFLOW_EXPERIMENT_NAME ?= sd-cxr

.PHONY: venv demo base study report test bench clean
venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" ; test $${PIPESTATUS[0]:-0} -eq 0
	$(PY) -m pip install -q --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import harness, registry, torch, torchvision, transformers, diffusers, torchxrayvision, mlflow"
	touch $@

# The main job on the embedded default: phantom data, the local base model, then the whole study
# (three arms, generate, classify, checks, register, promote; the pipeline prints the table) and
# its report.
demo: venv
	$(MLFLOW) run . -e phantom --env-manager local
	$(MLFLOW) run . -e base --env-manager local
	$(MLFLOW) run . -e pipeline --env-manager local
	$(MLFLOW) run . -e report --env-manager local
	@echo "report: $(CURDIR)/reports/report.html"

base: venv
	$(MLFLOW) run . -e base --env-manager local

# The write-up's study on the embedded default (every arm, judged checkpoints, champion), then its report.
study: venv
	$(MLFLOW) run . -e pipeline --env-manager local
	$(MLFLOW) run . -e report --env-manager local

report: venv
	$(MLFLOW) run . -e report --env-manager local

test: venv
	$(PY) -m pytest -q tests --durations=15

bench: venv
	$(PY) -m bench.train_throughput

clean:
	rm -rf outputs mlruns mlartifacts mlflow.db .cache
