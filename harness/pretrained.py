"""Where a pretrained pipeline comes from: the embedded base, MLflow, a local folder or the Hub.

``resolve("base")`` is the embedded base model registered by the ``base`` entry point; a
``models:/`` or ``runs:/`` URI is a pipeline logged by this project; a directory holding
``model_index.json`` is a diffusers pipeline on disk; anything else is handed to diffusers as a
Hub id (which needs network, or a filled Hugging Face cache). One code path loads them all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlflow

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from harness.base.build import BASE_ALIAS, BASE_MODEL_NAME, register_default_local_build



def cache_dir() -> Path:
    return Path(os.environ.get("HARNESS_CACHE_DIR", ".cache")) / "pretrained"


def base_uri() -> str:
    """The concrete ``models:/`` version that "base" names in the project's store."""
    from harness.tracking import use_project_store

    use_project_store()
    try:
        return current_base_uri()
    except LookupError:
        # A new store (or a team server) and the default build already on disk: register it.
        uri = register_default_local_build()
        if uri is None:
            raise
        return uri


def resolve(name: str) -> str:
    """Return a local diffusers directory (or a Hub id) for ``name``."""
    from registry.pyfunc import pipeline_dir_in, pipeline_dir_of

    if name == "base":
        name = base_uri()
    if name.startswith(("models:/", "runs:/")):
        # Versions are immutable, so a downloaded copy is reused (aliases like @champion are not).
        store = hashlib.sha256(mlflow.get_tracking_uri().encode()).hexdigest()[:8]  # "v1" is per store
        dst = cache_dir() / store / name.replace(":/", "_").replace("/", "_").replace("@", "_")
        if "@" not in name and dst.is_dir() and pipeline_dir_in(dst) is not None:
            return str(pipeline_dir_in(dst))
        dst.mkdir(parents=True, exist_ok=True)
        return str(pipeline_dir_of(name, dst))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"pretrained_model {name!r} is a path but not a diffusers pipeline "
                             f"directory (no model_index.json in it)")
        return str(path)
    return name  # a Hub id: diffusers reports what is wrong with it


def current_base_uri() -> str:
    """The base version the last build run made or reused (alias ``current``); the newest version in a
    store written before the alias existed."""
    client = MlflowClient()
    try:
        return f"models:/{BASE_MODEL_NAME}/{client.get_model_version_by_alias(BASE_MODEL_NAME, BASE_ALIAS).version}"
    except MlflowException:
        pass
    try:
        versions = client.search_model_versions(f"name = '{BASE_MODEL_NAME}'")
    except MlflowException:
        versions = []
    if not versions:
        raise LookupError(f"no '{BASE_MODEL_NAME}' model is registered in {client.tracking_uri}: build the "
                          "embedded base first with `mlflow run . -e base` (or `make base`), or pass "
                          "pretrained_model=<diffusers dir | models:/... | Hub id>")
    newest = max(versions, key=lambda v: int(v.version))
    return f"models:/{BASE_MODEL_NAME}/{newest.version}"


SAFETY_CHECKER_TAG = "harness.safety_checker"


def load_pipeline(name_or_path: str, **kwargs):
    """Load any pretrained pipeline the way fine-tuning does. A checkpoint that ships SD's NSFW
    safety checker (SD-1.5, SD-2.x) loads without it: that filter blanks images it flags, and it was
    made for photographs, not radiographs. The active run, if any, is tagged with what was done."""
    import json

    from diffusers import StableDiffusionPipeline

    source = resolve(name_or_path)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                       requires_safety_checker=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load pretrained_model {name_or_path!r} ({source}): {exc}") from exc
    index = Path(source) / "model_index.json"
    shipped = index.is_file() and (json.loads(index.read_text()).get("safety_checker") or [None])[0] is not None
    if mlflow.active_run() is not None:
        mlflow.set_tag(SAFETY_CHECKER_TAG, "disabled (the checkpoint ships one; it would blank radiographs)"
                       if shipped else "none (the checkpoint has none)")
    return pipe
