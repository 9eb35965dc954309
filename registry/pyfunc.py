"""A full diffusers pipeline as an MLflow pyfunc model.

MLflow's built-in diffusers support covers LoRA adapters only, so a fully fine-tuned pipeline is
wrapped here as a custom ``mlflow.pyfunc.PythonModel``: the pipeline directory travels as an
artifact, and ``predict`` takes a DataFrame of prompts and returns images.

    model = mlflow.pyfunc.load_model("models:/cxr-sd-phantom@champion")
    images = model.predict(pd.DataFrame({"prompt": ["a frontal chest x-ray with no finding"]}))
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec

PIPELINE_ARTIFACT = "pipeline"
# Few steps by default: a caller that wants quality passes num_inference_steps per row.
DEFAULT_STEPS = 25
# Classifier-free guidance makes the findings show; too much exaggerates them past what real films
# show, and a classifier trained on such images ranks real ones worse (README: quality table).
DEFAULT_GUIDANCE = 5.0


class DiffusionPipelineModel(mlflow.pyfunc.PythonModel):
    """Input: DataFrame with ``prompt`` and optional ``seed``, ``num_inference_steps``,
    ``guidance_scale``. Output: uint8 array [N, H, W, 3], one image per row."""

    def load_context(self, context):
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(context.artifacts[PIPELINE_ARTIFACT])
        self.pipe.set_progress_bar_config(disable=True)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> np.ndarray:
        import torch

        if "prompt" not in model_input.columns:
            raise ValueError(f"model input needs a 'prompt' column, got {list(model_input.columns)}")
        images = []
        for i, row in enumerate(model_input.to_dict("records")):
            seed = row.get("seed")
            generator = torch.Generator().manual_seed(int(seed) if pd.notna(seed) else i)
            steps = row.get("num_inference_steps")
            guidance = row.get("guidance_scale")
            out = self.pipe(
                row["prompt"],
                num_inference_steps=int(steps) if pd.notna(steps) else DEFAULT_STEPS,
                guidance_scale=float(guidance) if pd.notna(guidance) else DEFAULT_GUIDANCE,
                generator=generator,
                output_type="np",
            )
            images.append((out.images[0] * 255).round().astype(np.uint8))
        return np.stack(images)


def signature(resolution: int) -> ModelSignature:
    inputs = Schema([
        ColSpec("string", "prompt"),
        ColSpec("long", "seed", required=False),
        ColSpec("long", "num_inference_steps", required=False),
        ColSpec("double", "guidance_scale", required=False),
    ])
    outputs = Schema([TensorSpec(np.dtype(np.uint8), (-1, resolution, resolution, 3))])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "diffusers", "transformers", "accelerate")]


def example_input() -> pd.DataFrame:
    """What a caller sends: prompts, with optional seed, steps and guidance per row."""
    return pd.DataFrame({"prompt": ["a frontal chest x-ray showing cardiomegaly"], "seed": [0],
                         "num_inference_steps": [2], "guidance_scale": [DEFAULT_GUIDANCE]})


def log_pipeline(pipeline_dir: str | Path, name: str = "model", registered_model_name: str | None = None,
                 resolution: int | None = None, input_example: pd.DataFrame | None = None):
    """Log a diffusers pipeline directory as a pyfunc model of the active run; optionally register it.
    The model carries a signature and an input example (``example_input()`` unless one is given).

    Returns MLflow's ``ModelInfo`` (``registered_model_version`` is set when registered).
    """
    pipeline_dir = Path(pipeline_dir)
    if not (pipeline_dir / "model_index.json").is_file():
        raise ValueError(f"{pipeline_dir} is not a diffusers pipeline directory (no model_index.json)")
    if resolution is None:
        import json

        unet_cfg = json.loads((pipeline_dir / "unet" / "config.json").read_text())
        vae_cfg = json.loads((pipeline_dir / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        resolution = unet_cfg["sample_size"] * factor
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pipeline_model.py")),  # models from code, no pickle
        artifacts={PIPELINE_ARTIFACT: str(pipeline_dir)},
        code_paths=[str(Path(__file__).parent)],
        signature=signature(resolution),
        input_example=input_example if input_example is not None else example_input(),
        pip_requirements=_requirements(),
        registered_model_name=registered_model_name,
    )


def pipeline_dir_in(model_dir: str | Path) -> Path | None:
    """The diffusers directory inside a downloaded pyfunc pipeline model (None if there is none)."""
    from mlflow.models import Model

    model_dir = Path(model_dir)
    if (model_dir / "model_index.json").is_file():
        return model_dir
    if not (model_dir / "MLmodel").is_file():
        return None
    artifacts = Model.load(model_dir).flavors.get("python_function", {}).get("artifacts", {})
    entry = artifacts.get(PIPELINE_ARTIFACT)
    if entry and (model_dir / entry["path"] / "model_index.json").is_file():
        return model_dir / entry["path"]
    return None


def pipeline_dir_of(model_uri: str, dst: str | Path | None = None) -> Path:
    """Download a logged pyfunc pipeline model (``models:/...`` or ``runs:/...``) and return the
    diffusers directory inside it."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst) if dst else None))
    found = pipeline_dir_in(local)
    if found is None:
        raise ValueError(f"{model_uri} is not a diffusers pipeline model (no model_index.json in {local})")
    return found
