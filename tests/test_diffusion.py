"""The one denoising objective and latent cache that the base build and fine-tuning share."""

from __future__ import annotations

import pytest
import torch

from harness.diffusion import LatentCache, diffusion_loss


@pytest.fixture(scope="module")
def parts(tiny_pipeline_dir):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    load = dict(pretrained_model_name_or_path=tiny_pipeline_dir)
    return {"vae": AutoencoderKL.from_pretrained(subfolder="vae", **load).eval(),
            "unet": UNet2DConditionModel.from_pretrained(subfolder="unet", **load).eval(),
            "text_encoder": CLIPTextModel.from_pretrained(subfolder="text_encoder", **load).eval(),
            "tokenizer": CLIPTokenizer.from_pretrained(subfolder="tokenizer", **load),
            "scheduler": DDPMScheduler.from_pretrained(subfolder="scheduler", **load)}


def test_latent_cache_samples_the_vae_posterior_by_key_or_row(parts):
    vae = parts["vae"]
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    keyed = LatentCache.encode(vae, [([10, 11], x[:2]), ([12], x[2:])], scaling_factor=0.5)
    rows = LatentCache.of_images(vae, x, batch_size=2, scaling_factor=0.5)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    assert len(keyed) == len(rows) == 3
    assert torch.allclose(keyed.means[2], post.mean[2], atol=1e-5)
    for cache, index in ((keyed, torch.tensor([12, 10])), (rows, torch.tensor([2, 0]))):
        a = cache.sample(index, generator=torch.Generator().manual_seed(0))
        noise = torch.randn(post.mean[[2, 0]].shape, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(a, (post.mean[[2, 0]] + post.std[[2, 0]] * noise) * 0.5, atol=1e-5)


def _hidden(parts, n):
    tok = parts["tokenizer"]
    ids = tok(["a chest x-ray"] * n, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return parts["text_encoder"](ids.input_ids)[0]


def test_diffusion_loss_is_the_noise_prediction_error_with_min_snr_weights(parts):
    unet, scheduler = parts["unet"], parts["scheduler"]
    latents, hidden = torch.randn(4, 4, 16, 16), _hidden(parts, 4)
    with torch.no_grad():
        plain = diffusion_loss(unet, scheduler, latents, hidden, generator=torch.Generator().manual_seed(1))
        weighted = diffusion_loss(unet, scheduler, latents, hidden, snr_gamma=1.0,
                                  generator=torch.Generator().manual_seed(1))
        # by hand, the same draws: noise first, then the timesteps
        g = torch.Generator().manual_seed(1)
        noise, t = torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (4,), generator=g)
        pred = unet(scheduler.add_noise(latents, noise, t), t, hidden).sample
    assert plain.shape == (4,)
    assert torch.allclose(plain, (pred - noise).pow(2).flatten(1).mean(1), atol=1e-6)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    assert torch.allclose(weighted, plain * snr.clamp(max=1.0) / snr, atol=1e-6)


def test_diffusion_loss_targets_the_velocity_under_v_prediction(parts):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(parts["scheduler"].config, prediction_type="v_prediction")
    latents, hidden = torch.randn(2, 4, 16, 16), _hidden(parts, 2)
    with torch.no_grad():
        loss = diffusion_loss(parts["unet"], scheduler, latents, hidden, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        noise, t = torch.randn(latents.shape, generator=g), torch.randint(0, 1000, (2,), generator=g)
        pred = parts["unet"](scheduler.add_noise(latents, noise, t), t, hidden).sample
    target = scheduler.get_velocity(latents, noise, t)
    assert torch.allclose(loss, (pred - target).pow(2).flatten(1).mean(1), atol=1e-6)
