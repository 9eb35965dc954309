"""A real Stable Diffusion checkpoint's layout, in miniature: what SD-1.5, SD-2.x and RoentGen ship.

Their diffusers folders hold more than the embedded base: a ``safety_checker``
(``StableDiffusionSafetyChecker``) and a ``feature_extractor`` (``CLIPImageProcessor``) in
``model_index.json``, a PNDM scheduler, v-prediction (SD-2.x) and a CLIP BPE tokenizer
(``vocab.json`` + ``merges.txt``). A tiny random pipeline with all of those parts goes through every
entry point: both fine-tuning arms, generate, classify, checks, register, promote and
``models:/...@champion`` predict.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import pipeline
from registry.register import model_name
from tests.conftest import dummy_components

WORDS = ("a", "frontal", "lateral", "chest", "x", "-", "ray", "showing", "with", "no", "finding", "and", "photo",
         "cardiomegaly", "edema", "consolidation", "atelectasis", "pleural", "effusion")


def clip_bpe_tokenizer(folder, max_length: int = 32):
    """A CLIP BPE tokenizer written as vocab.json + merges.txt, as real checkpoints ship it: every
    byte symbol (alone and word-final), and merges that build each of WORDS."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: "c h e s t</w>" -> "ch" -> "che" -> ...
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)


@pytest.fixture(scope="module")
def real_layout_dir(tmp_path_factory):
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("sd2_layout")
    tokenizer = clip_bpe_tokenizer(root / "bpe")
    parts = dummy_components()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=parts["text_encoder"].config.hidden_size, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8))
    # SD-2.x's scheduler: PNDM, v-prediction, as stabilityai/stable-diffusion-2 ships it.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=parts["unet"], scheduler=scheduler, safety_checker=checker,
                                   feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                        crop_size={"height": 32, "width": 32}),
                                   requires_safety_checker=True)
    path = root / "pipeline"
    pipe.save_pretrained(path)
    # As SD-1.5 ships it: the BPE files, no tokenizers-library tokenizer.json.
    (path / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(root / "bpe" / name, path / "tokenizer" / name)
    index = json.loads((path / "model_index.json").read_text())
    assert index["safety_checker"][1] == "StableDiffusionSafetyChecker" and (path / "tokenizer" / "merges.txt").is_file()
    return path


def test_bpe_tokenizer_is_clips(real_layout_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(real_layout_dir / "tokenizer")
    ids = tokenizer("a frontal chest x-ray showing edema").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "frontal</w>", "chest</w>", "x</w>",
                                                    "-</w>", "ray</w>", "showing</w>", "edema</w>", "<|endoftext|>"]


@pytest.mark.slow
def test_every_entry_point_runs_from_a_real_checkpoint_layout(mlflow_store, tiny_phantom, real_layout_dir):
    data = f"chexpert:{tiny_phantom}"
    table = pipeline.main(["--data", data, "--pretrained_model", str(real_layout_dir),
                           "--arms", "dreambooth,text_encoder", "--steps", "2", "--eval_steps", "2",
                           "--n_per_prompt", "3", "--num_inference_steps", "2", "--epochs", "1",
                           "--batch_size", "4", "--jobs", "1", "--registered_model", "cxr-sd-sd2-layout"])
    assert list(table.index) == ["real images", "dreambooth @ 2", "text_encoder @ 2"]

    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"FINISHED"}
    finetunes = [r for r in runs if "harness.run_key" in r.data.tags]
    assert len(finetunes) == 2
    for run in finetunes:  # the NSFW filter would blank radiographs: off, and the run says so
        assert run.data.tags["harness.safety_checker"].startswith("disabled")

    # The checkpoint keeps the pipeline's own prediction type and scheduler family.
    assert not client.search_registered_models(f"name = '{model_name(data)}'")  # the name chosen, not the default
    version = client.get_model_version_by_alias("cxr-sd-sd2-layout", "champion")
    model = mlflow.pyfunc.load_model("models:/cxr-sd-sd2-layout@champion")
    images = model.predict(pd.DataFrame({"prompt": ["a frontal chest x-ray showing edema"], "seed": [0],
                                         "num_inference_steps": [2]}))
    assert np.asarray(images).shape[-3:] == (32, 32, 3) and np.asarray(images).dtype == np.uint8
    local = mlflow.artifacts.download_artifacts(version.source)
    scheduler = next(p for p in Path(local).rglob("scheduler_config.json"))
    config = json.loads(scheduler.read_text())
    assert config["prediction_type"] == "v_prediction" and config["_class_name"] == "PNDMScheduler"
