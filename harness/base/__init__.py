"""A small Stable-Diffusion-architecture base model, built locally and offline.

Real SD-1.5 weights cannot be downloaded here, so the harness trains its own stand-in: a CLIP-style
tokenizer and text encoder, a KL autoencoder and a conditional UNet, wired into a standard
``StableDiffusionPipeline`` directory. The base sees natural-ish captioned scenes and radiographs
captioned only by their view (never a finding), playing the part of SD's web prior.
"""

from harness.base.components import SDConfig, assemble_pipeline, build_components
from harness.base.tokenizer import build_tokenizer, medical_corpus

__all__ = ["SDConfig", "assemble_pipeline", "build_components", "build_tokenizer", "medical_corpus"]
