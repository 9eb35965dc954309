"""The embedded base model's parts, built tiny in code: tokenizer, scenes, components, build."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from harness.base import build
from harness.base.components import SDConfig, assemble_pipeline, build_components, build_unet, build_vae
from harness.base.scenes import SceneDataset, caption_corpus
from harness.base.tokenizer import build_tokenizer, medical_corpus
from harness.pathologies import CHEXPERT_LABELS, FINDINGS

PROMPT = "a frontal chest x-ray showing cardiomegaly"


@pytest.fixture(scope="module")
def tokenizer():
    cfg = SDConfig.tiny()
    return build_tokenizer(caption_corpus(n=300) + medical_corpus(), vocab_size=cfg.vocab_size,
                           model_max_length=cfg.max_length)


def test_tokenizer_saves_loads_and_keeps_words_whole(tmp_path):
    tok = build_tokenizer(caption_corpus(n=300) + medical_corpus(), tmp_path, vocab_size=2048)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 32 and len(loaded) == len(tok) <= 2048
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>" and loaded.bos_token == "<|startoftext|>"
    ids = loaded(PROMPT).input_ids
    assert ids == tok(PROMPT).input_ids
    assert ids[0] == loaded.bos_token_id and ids[-1] == loaded.eos_token_id
    assert loaded.convert_ids_to_tokens(ids[1:-1]) == [
        "a</w>", "frontal</w>", "chest</w>", "x</w>", "-</w>", "ray</w>", "showing</w>", "cardiomegaly</w>"]
    assert loaded.decode(ids, skip_special_tokens=True).replace(" - ", "-") == PROMPT
    # every medical and scene word is one token; unseen words fall back to bytes, never <unk>
    for name in FINDINGS + CHEXPERT_LABELS + ["lateral", "no finding", "with", "red", "circle", "triangles"]:
        assert len(loaded(name, add_special_tokens=False).input_ids) == len(name.split()), name
    zebra = loaded("zebra ü", add_special_tokens=False).input_ids
    assert loaded.unk_token_id not in zebra and loaded.decode(zebra) == "zebra ü"
    longest = f"a lateral chest x-ray showing {', '.join(f.lower() for f in FINDINGS)}"
    assert len(loaded(longest).input_ids) <= loaded.model_max_length
    assert loaded(PROMPT, padding="max_length").input_ids[-1] == loaded.pad_token_id


def test_tokenizer_is_the_same_in_every_process(tmp_path):
    """One build recipe, one vocabulary: the token ids must not depend on the process's hashing."""
    import subprocess
    import sys

    code = ("import sys; from harness.base.scenes import caption_corpus; "
            "from harness.base.tokenizer import build_tokenizer, medical_corpus; "
            "build_tokenizer(caption_corpus(n=300) + medical_corpus(), sys.argv[1], vocab_size=2048)")
    for seed in ("1", "2"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / seed)], check=True, timeout=120,
                       env={**os.environ, "PYTHONHASHSEED": seed})
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "1" / name).read_text() == (tmp_path / "2" / name).read_text()


def test_scenes_are_deterministic_images_with_captions(tokenizer):
    a, b, c = SceneDataset(16, 32, seed=1), SceneDataset(16, 32, seed=1), SceneDataset(16, 32, seed=2)
    items = [a[i] for i in range(16)]
    assert all(it["pixel_values"].shape == (3, 32, 32) for it in items)
    assert all(it["pixel_values"].min() >= -1 and it["pixel_values"].max() <= 1 for it in items)
    assert torch.equal(items[5]["pixel_values"], b[5]["pixel_values"]) and items[5]["caption"] == b[5]["caption"]
    assert any(items[i]["caption"] != c[i]["caption"] for i in range(16))
    assert len({it["caption"] for it in items}) > 10
    with pytest.raises(IndexError):
        a[16]
    for it in items:  # the scene vocabulary is in the tokenizer as whole words
        words = it["caption"].split()
        assert len(tokenizer(it["caption"], add_special_tokens=False).input_ids) == len(words), it["caption"]


def test_tiny_components_have_matching_shapes(tokenizer):
    cfg = SDConfig.tiny()
    c = build_components(cfg, tokenizer)
    x = torch.rand(2, 3, cfg.resolution, cfg.resolution) * 2 - 1
    z = c["vae"].encode(x).latent_dist.sample()
    assert z.shape == (2, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    assert c["vae"].decode(z).sample.shape == x.shape
    ids = tokenizer([PROMPT, ""], padding="max_length", return_tensors="pt").input_ids
    hidden = c["text_encoder"](ids)[0]
    assert hidden.shape == (2, cfg.max_length, cfg.text_hidden)
    out = c["unet"](z, torch.tensor([10, 500]), hidden).sample
    assert out.shape == z.shape
    out.mean().backward()  # trainable end to end
    assert c["text_encoder"].config.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="max_length"):
        build_components(SDConfig(max_length=77), tokenizer)
    assert SDConfig.default().latent_size == 16 and SDConfig.sd15().latent_size == 64



def test_unet_attention_picks_the_levels_with_cross_attention():
    sd = build_unet(SDConfig.tiny())  # SD-1.x's layout: every level but the deepest
    assert sd.config.down_block_types == ("CrossAttnDownBlock2D", "DownBlock2D")
    assert sd.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D")
    sdxl = build_unet(dataclasses.replace(SDConfig.tiny(), unet_attention=(False, True)))
    assert sdxl.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert sdxl.config.up_block_types == ("CrossAttnUpBlock2D", "UpBlock2D")
    with pytest.raises(ValueError, match="one entry per level"):
        SDConfig(unet_attention=(True, False))
    # SD-1.x's layout leaves the config's dict, and so the build key of earlier builds, as it was
    assert "unet_attention" not in SDConfig().to_dict()
    assert SDConfig(unet_attention=(False, True, False)).to_dict()["unet_attention"] == (False, True, False)

def test_unet_pooled_text_conditions_every_block_through_the_timestep_embedding(tokenizer, tmp_path):
    cfg = dataclasses.replace(SDConfig.tiny(), unet_pooled_text=True, unet_attention=(False, False))
    torch.manual_seed(0)
    parts = build_components(cfg, tokenizer)
    unet = parts["unet"]
    assert unet.config.addition_embed_type == "text"
    z, t = torch.randn(1, cfg.latent_channels, cfg.latent_size, cfg.latent_size), torch.tensor([500])
    a, b = torch.randn(2, 1, cfg.max_length, cfg.text_hidden)
    with torch.no_grad():  # no cross-attention anywhere: the prompt reaches the UNet through the pooled path alone
        assert not torch.allclose(unet(z, t, a).sample, unet(z, t, b).sample)
    # a standard StableDiffusionPipeline saves, loads and samples it (the pooled path needs no extra inputs)
    assemble_pipeline(parts).save_pretrained(tmp_path)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert pipe.unet.config.addition_embed_type == "text"
    image = pipe("a frontal chest x-ray", num_inference_steps=2, height=cfg.resolution, width=cfg.resolution,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, cfg.resolution, cfg.resolution, 3)
    # off, the config's dict and so the build key of earlier builds stay as they were
    assert "unet_pooled_text" not in SDConfig().to_dict()
    assert SDConfig(unet_pooled_text=True).to_dict()["unet_pooled_text"] is True
    assert build_unet(SDConfig.tiny()).config.addition_embed_type is None


def test_pipeline_save_load_round_trip_is_identical(tokenizer, tmp_path):
    cfg = SDConfig.tiny()
    torch.manual_seed(0)
    pipe = assemble_pipeline(build_components(cfg, tokenizer))
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    kw = dict(num_inference_steps=2, height=cfg.resolution, width=cfg.resolution, output_type="np")
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(3), **kw).images
    b = loaded(PROMPT, generator=torch.Generator().manual_seed(3), **kw).images
    assert a.shape == (1, cfg.resolution, cfg.resolution, 3)
    np.testing.assert_allclose(a, b, atol=1e-6)


class _IdentityVAE(torch.nn.Module):
    """encode/decode are the identity, decode optionally adds noise of std ``sigma`` (in [-1,1] units)."""

    def __init__(self, sigma=0.0):
        super().__init__()
        self.sigma, self.p = sigma, torch.nn.Parameter(torch.zeros(()))

    device, dtype = torch.device("cpu"), torch.float32

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return SimpleNamespace(sample=z + self.sigma * torch.randn_like(z))


def test_vae_psnr_is_right_and_separates_good_from_random():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 215, (8, 32, 32), dtype=np.uint8)  # grayscale, like radiographs
    assert build.vae_psnr(_IdentityVAE(), images) > 90
    sigma = 0.02  # mse on [0,1] pixels = (sigma/2)**2 -> 40 dB
    assert build.vae_psnr(_IdentityVAE(sigma), images) == pytest.approx(-10 * np.log10((sigma / 2) ** 2), abs=0.3)
    torch.manual_seed(0)
    random_vae = build_vae(SDConfig.tiny()).eval()
    assert build.vae_psnr(random_vae, images) < 20
    assert build.vae_psnr(random_vae, torch.from_numpy(rng.random((2, 3, 32, 32), np.float32)) * 2 - 1) < 20


@pytest.mark.slow
def test_tiny_build_writes_a_loadable_diffusers_directory(tmp_path):
    logged = []
    out = tmp_path / "base"
    metrics = build.build_base(out, SDConfig.tiny(), vae_steps=4, unet_steps=4, batch_size=4, n_scenes=24,
                               n_radiographs=8, sample_steps=1, log_fn=lambda m, step: logged.append((step, m)))
    for key in ("vae_psnr", "vae_final_mse", "unet_final_loss", "scaling_factor", "seconds"):
        assert key in metrics
    assert np.isfinite(metrics["unet_final_loss"]) and metrics["scaling_factor"] > 0
    assert {"vae_loss", "unet_loss", "text_identity_loss"} <= {k for _, m in logged for k in m}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no tmp dir left behind
    assert (out / "samples.png").is_file()
    saved = json.loads((out / "base_build.json").read_text())
    assert saved["config"]["resolution"] == 32 and saved["metrics"]["seconds"] == metrics["seconds"]

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert pipe.tokenizer.model_max_length == 32
    # the logged cosine is the saved text encoder's, on the disease prompts
    assert metrics["disease_prompt_max_cosine"] == pytest.approx(
        build.prompt_max_cosine(pipe.text_encoder.eval(), pipe.tokenizer), abs=1e-5)
    assert metrics["disease_token_max_cosine"] == pytest.approx(
        build.prompt_max_cosine(pipe.text_encoder.eval(), pipe.tokenizer, where="differing"), abs=1e-5)
    img = pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()



@pytest.mark.slow
def test_token_identity_loss_makes_prompts_distinct(tokenizer):
    """The text encoder learns to keep each word readable from its output state, so the disease
    prompts, which differ in one word, stop mapping to (almost) the same states."""
    torch.manual_seed(0)
    te = build_components(SDConfig.tiny(), tokenizer)["text_encoder"]
    ids = tokenizer(medical_corpus(), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    before = build.token_identity_loss(te, ids, tokenizer.pad_token_id).item()
    cosine_before = build.prompt_max_cosine(te.eval(), tokenizer)
    te.train()
    opt = torch.optim.AdamW(te.parameters(), lr=1e-2)
    for _ in range(40):
        loss = build.token_identity_loss(te, ids, tokenizer.pad_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < before / 4
    assert build.prompt_max_cosine(te.eval(), tokenizer) < cosine_before
    # a prompt against itself: cosine 1
    assert build.prompt_max_cosine(te, tokenizer, [PROMPT, PROMPT]) == pytest.approx(1.0, abs=1e-5)
    # at the finding words alone the prompts are further apart than over the whole shared sequence
    assert build.prompt_max_cosine(te, tokenizer, where="differing") < build.prompt_max_cosine(te, tokenizer)
    assert build.prompt_max_cosine(te, tokenizer, [PROMPT, PROMPT], where="differing") == 1.0


@pytest.mark.slow
def test_base_entry_point_registers_once_and_is_reused(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from harness.pretrained import BASE_MODEL_NAME, base_uri, load_pipeline

    cli = ["--preset", "tiny", "--vae_steps", "1", "--unet_steps", "1", "--n_scenes", "8",
           "--n_radiographs", "4", "--batch_size", "2", "--no_samples", "--out", str(tmp_path / "base")]
    build.main(cli)
    client = MlflowClient()
    (v1,) = client.search_model_versions(f"name = '{BASE_MODEL_NAME}'")
    assert client.get_run(v1.run_id).data.metrics["vae_psnr"] > 0
    uri = f"models:/{BASE_MODEL_NAME}/1"
    assert build.main(cli) == {"reused": uri, "registered": uri}  # same recipe: no rebuild
    assert len(client.search_model_versions(f"name = '{BASE_MODEL_NAME}'")) == 1
    build.main(cli + ["--force", "true"])
    assert len(client.search_model_versions(f"name = '{BASE_MODEL_NAME}'")) == 2
    statuses = {r.info.status for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    assert statuses == {"FINISHED"}
    pipe = load_pipeline("base")  # what fine-tuning's default pretrained_model resolves to
    assert pipe.tokenizer.model_max_length == 32 and pipe.unet.config.sample_size == 16
    # "base" is the version the last build run made or reused (alias current), not the newest one
    assert base_uri() == f"models:/{BASE_MODEL_NAME}/2"
    other = [*cli[:-2], "--seed", "1", "--out", str(tmp_path / "other")]
    assert build.main(other)["registered"] == base_uri() == f"models:/{BASE_MODEL_NAME}/3"
    again = build.main(cli)
    assert again["reused"] == base_uri() != f"models:/{BASE_MODEL_NAME}/3"


TINY_BUILD = ["--preset", "tiny", "--vae_steps", "1", "--unet_steps", "1", "--n_scenes", "8",
              "--n_radiographs", "4", "--batch_size", "2", "--no_samples"]


@pytest.mark.slow
def test_a_new_store_registers_the_build_on_disk_without_rebuilding(mlflow_store, tmp_path, monkeypatch):
    """Pointing MLFLOW_TRACKING_URI at a new store must not cost a rebuild: "base" finds the
    default recipe's build in outputs/ by its key and registers it there on first use."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from harness.pretrained import BASE_MODEL_NAME, resolve

    parse = build.parse_args
    monkeypatch.setattr(build, "parse_args", lambda argv=None: parse([*TINY_BUILD, *(argv or [])]))
    first = build.main([])
    assert (tmp_path / "outputs").is_dir()

    new_store = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_store)
    mlflow.set_tracking_uri(new_store)
    import mlflow.tracking.fluent
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # as a new process starts
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(build, "build_base", lambda *a, **k: pytest.fail("rebuilt a build that is on disk"))
    path = resolve("base")
    client = MlflowClient()
    (version,) = client.search_model_versions(f"name = '{BASE_MODEL_NAME}'")
    assert version.tags["build_key"] == client.get_run(version.run_id).data.tags["harness.build_key"]
    assert "harness.registered_from_disk" in client.get_run(version.run_id).data.tags
    assert (Path(path) / "model_index.json").is_file() and first["registered"].endswith("/1")


def test_an_unfinished_build_on_disk_is_not_registered(mlflow_store, tmp_path):
    out = tmp_path / "half"
    (out / "unet").mkdir(parents=True)
    (out / "model_index.json").write_text("{}")  # no build_key: the build never finished
    assert not build.local_build(out, "anything")
    (out / build.BUILD_KEY_FILE).write_text("another-recipe")
    assert not build.local_build(out, "anything")


def test_phantom_radiographs_are_grayscale_with_generic_captions_that_name_no_finding():
    pytest.importorskip("harness.data.phantom")
    xrays, captions = build.phantom_radiographs(40, 32, seed=0)
    assert xrays.shape == (40, 32, 32) and xrays.dtype == np.uint8
    again, _ = build.phantom_radiographs(40, 32, seed=0)
    assert np.array_equal(xrays, again)
    assert set(captions) == {"a frontal chest x-ray", "a lateral chest x-ray"}  # the view, never a finding
