"""The denoising objective, shared by the base build (``harness.base.build``) and fine-tuning
(``harness.finetune``): latents from a frozen VAE's posterior, cached once, and Stable Diffusion's
loss on them (noise a latent at a random DDPM timestep, predict the scheduler's target)."""

from __future__ import annotations

from typing import Iterable

import torch


class LatentCache:
    """The frozen VAE's posterior (mean, std) of every training image, computed once: the VAE never
    trains after its own stage, so encoding each batch again each step is wasted work. ``sample``
    draws mean + std * noise, as encoding would, times the VAE's scaling factor."""

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, scaling_factor: float, keys: list[int] | None = None):
        self.means, self.stds, self.scaling_factor = means, stds, scaling_factor
        self.rows = None if keys is None else {k: row for row, k in enumerate(keys)}

    @classmethod
    @torch.no_grad()
    def encode(cls, vae, batches: Iterable[tuple[list[int] | None, torch.Tensor]],
               scaling_factor: float | None = None) -> "LatentCache":
        """From ``(keys, pixel_values)`` batches; keys None: the images are rows 0, 1, ... in order."""
        device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
        means, stds, keys = [], [], []
        for batch_keys, pixels in batches:
            post = vae.encode(pixels.to(device, dtype)).latent_dist
            means.append(post.mean.float().cpu())
            stds.append(post.std.float().cpu())
            keys += list(batch_keys) if batch_keys is not None else []
        factor = vae.config.scaling_factor if scaling_factor is None else scaling_factor
        return cls(torch.cat(means), torch.cat(stds), factor, [int(k) for k in keys] or None)

    @classmethod
    def of_images(cls, vae, images: torch.Tensor, batch_size: int = 64, scaling_factor: float | None = None):
        return cls.encode(vae, ((None, images[i:i + batch_size]) for i in range(0, len(images), batch_size)),
                          scaling_factor)

    def __len__(self) -> int:
        return len(self.means)

    def sample(self, index, generator: torch.Generator | None = None) -> torch.Tensor:
        rows = torch.as_tensor([self.rows[int(i)] for i in index] if self.rows is not None else index)
        mean, std = self.means[rows], self.stds[rows]
        return (mean + std * torch.randn(mean.shape, generator=generator)) * self.scaling_factor


def diffusion_loss(unet, scheduler, latents: torch.Tensor, hidden: torch.Tensor, snr_gamma: float = 0.0,
                   generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each image's loss (a vector): noise ``latents`` at a uniform DDPM timestep, predict the
    scheduler's own target (the noise for SD-1.x, the velocity for SD-2.x's v-prediction) from
    ``hidden`` (the text encoder's states). With ``snr_gamma`` > 0, min-SNR-gamma weighting (Hang et
    al. 2023): it down-weights the nearly-clean timesteps, which teach little about layout.
    ``generator`` (on the CPU) makes the draws reproducible apart from the global RNG."""
    where = generator.device if generator is not None else latents.device
    noise = torch.randn(latents.shape, generator=generator, device=where, dtype=latents.dtype).to(latents.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
                      device=where).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    dtype = dtype or latents.dtype
    pred = unet(noisy.to(dtype), t, hidden.to(dtype)).sample
    v = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, t) if v else noise
    per_image = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if snr_gamma > 0:  # weight min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v
        alphas = scheduler.alphas_cumprod.to(t.device)[t].float()
        snr = alphas / (1 - alphas)
        per_image = per_image * snr.clamp(max=snr_gamma) / (snr + 1 if v else snr)
    return per_image
