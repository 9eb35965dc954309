"""Benchmarks that the issues lean on, run on tiny components: the GPU check's CPU dry run (the same
code on the tiny preset, so it works the day a GPU is lent) and the VAE ceiling's cross-domain table."""

from __future__ import annotations

import json

import pytest

from bench import gpu_check, vae_ceiling


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


@pytest.mark.slow
def test_vae_ceiling_scores_each_training_set_on_real_and_round_tripped_test_films(mlflow_store, tmp_path,
                                                                                   tiny_phantom, tiny_pipeline_dir):
    # the tiny phantom stands in for a generated set: any CheXpert-layout folder is one
    result = vae_ceiling.main(["--pretrained_model", str(tiny_pipeline_dir), "--data", f"chexpert:{tiny_phantom}",
                               "--resolution", "32", "--epochs", "1", "--synthetic", f"chexpert:{tiny_phantom}"])
    assert set(result["cross"]) == {"real images", "round-tripped images", "synthetic images"}
    # the same images, recipe and seed train "real" and "synthetic": the same classifier, the same scores
    assert result["cross"]["synthetic images"] == pytest.approx(result["cross"]["real images"], nan_ok=True)
    assert result["cross"]["real images"][0] == pytest.approx(result["real"], nan_ok=True)
    assert result["ceiling"] == pytest.approx(result["round_tripped"] / result["real"], nan_ok=True)
