"""Data sets (``FORMAT:PATH``), their tables and image tensors, and prompts built from labels."""

from harness.data.datasets import CachedImages, DataSpec, ImageDataset, load_table, summarize
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
    "load_table",
    "ImageDataset",
    "summarize",
    "make_prompt",
    "prompts_for_table",
    "disease_prompts",
    "DEFAULT_TEMPLATE",
    "NO_FINDING_TEMPLATE",
]
