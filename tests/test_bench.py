"""The GPU check's CPU dry run: the same code on the tiny preset, so it works the day a GPU is lent."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_table(mlflow_store, tmp_path, tiny_phantom):
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--preset", "tiny", "--resolution", "32", "--batch_size", "4", "--steps", "2",
                             "--warmup", "1", "--no-study", "--no-compile", "--num_inference_steps", "2",
                             "--gen_images", "1", "--gen_batch", "2", "--data", f"chexpert:{tiny_phantom}",
                             "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"], default=str))
    rows = {r["what"]: r for r in result["rows"]}
    assert rows["train: diffusers defaults"]["ratio_to_diffusers_defaults"] == 1.0
    assert rows["train: diffusers defaults"]["flops_per_step"] > 0  # what MFU is computed from on a GPU
    for what in ("train: + channels_last", "train: + fused AdamW", "train: - SDPA (classic attention)",
                 "train: harness fine-tuning loop", "generate: batch 1", "generate: batch 2"):
        assert rows[what]["images_per_s"] > 0, what
    assert rows["generate: batch 1"]["unet_it_per_s"] == pytest.approx(2 * rows["generate: batch 1"]["images_per_s"])
