"""sd-cxr-harness: fine-tune Stable Diffusion on chest X-rays, judge it by its synthetic data."""
