"""Data sets (``FORMAT:PATH[?options]``), their tables and image tensors, and prompts built from labels."""

from harness.data.datasets import HOLDOUT_FRACTION, CachedImages, DataSpec, ImageDataset, load_table, summarize
from harness.data.prompts import (
    DEFAULT_TEMPLATE,
    NO_FINDING_TEMPLATE,
    disease_prompts,
    make_prompt,
    prompts_for_table,
)

__all__ = [
    "CachedImages",
    "DataSpec",
    "HOLDOUT_FRACTION",
    "load_table",
    "ImageDataset",
    "summarize",
    "make_prompt",
    "prompts_for_table",
    "disease_prompts",
    "DEFAULT_TEMPLATE",
    "NO_FINDING_TEMPLATE",
]
