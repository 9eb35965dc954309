"""Stable Diffusion's four parts at any size: config presets, random-init build, pipeline assembly.

The architecture is exactly SD-1.x's (CLIP text encoder -> cross-attention UNet on KL-VAE latents,
DDPM epsilon prediction); only the widths/depths shrink, so every diffusers/transformers tool that
works on SD (``StableDiffusionPipeline``, ``save_pretrained``, LoRA, textual inversion) works here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


@dataclass
class SDConfig:
    resolution: int = 64  # image side in pixels
    # VAE: one down-block per entry; len-1 of them downsample, so the factor is 2**(len-1).
    # (16, 32, 64): about half the step time of (32, 64, 64) on 2 cores, with a similar PSNR.
    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_layers_per_block: int = 1
    latent_channels: int = 4
    # UNet: SD's layout, cross-attention at every level except the deepest.
    # 16x16 -> 8x8 -> 4x4 latents. Twice as wide on the first two levels costs about twice the
    # fine-tuning time on one core and gained nothing that held across base builds (README, e23).
    unet_channels: tuple[int, ...] = (32, 64, 128)
    # Which UNet levels have cross-attention; None is SD-1.x's, every level but the deepest.
    # SDXL drops it at the first level, where self-attention's cost grows with the latent's area;
    # here that halves the fine-tuning time but lowered the ratio on both base builds tried (README, e32).
    unet_attention: tuple[bool, ...] | None = None
    # The prompt's states, attention-pooled, added to the timestep embedding that scales and shifts
    # every ResNet block (Imagen; SDXL's pooled text embedding): a global path beside cross-attention.
    unet_pooled_text: bool = False
    layers_per_block: int = 1
    # diffusers/SD-1.x naming quirk: for UNet2DConditionModel this is the number of heads per block.
    attention_head_dim: int = 4
    norm_num_groups: int = 16  # GroupNorm groups in VAE and UNet; must divide every channel count
    # CLIP text encoder.
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    max_length: int = 32  # tokens incl. bos/eos; our prompts are short (see tokenizer.MODEL_MAX_LENGTH)
    vocab_size: int = 2048  # tokenizer training budget; the text encoder uses len(tokenizer)
    # VAE latent scale; SD-1.x's value until build.py measures 1/std of our VAE's latents.
    scaling_factor: float = 0.18215

    def __post_init__(self):
        if self.unet_attention is not None and len(self.unet_attention) != len(self.unet_channels):
            raise ValueError(f"unet_attention={self.unet_attention} needs one entry per level of "
                             f"unet_channels={self.unet_channels}")

    @property
    def latent_size(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)

    @classmethod
    def tiny(cls) -> "SDConfig":
        """For tests: a forward/backward takes milliseconds on CPU."""
        return cls(resolution=32, vae_channels=(8, 16), latent_channels=4, unet_channels=(32, 64),
                   layers_per_block=1, attention_head_dim=2, norm_num_groups=8, text_hidden=32,
                   text_layers=2, text_heads=2, max_length=32, vocab_size=1024)

    @classmethod
    def default(cls) -> "SDConfig":
        """The embedded CPU base: 64 px, VAE factor 4 -> 16x16x4 latents, builds in minutes."""
        return cls()

    @classmethod
    def sd15(cls) -> "SDConfig":
        """SD-1.5's sizes (runwayml/stable-diffusion-v1-5 configs), for a GPU build. ~860M UNet params."""
        return cls(resolution=512, vae_channels=(128, 256, 512, 512), vae_layers_per_block=2,
                   latent_channels=4, unet_channels=(320, 640, 1280, 1280), layers_per_block=2,
                   attention_head_dim=8, norm_num_groups=32, text_hidden=768, text_layers=12,
                   text_heads=12, max_length=77, vocab_size=49408, scaling_factor=0.18215)

    @classmethod
    def preset(cls, name: str) -> "SDConfig":
        presets = {"tiny": cls.tiny, "default": cls.default, "sd15": cls.sd15}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(presets)}")
        return presets[name]()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name, sd1x in (("unet_attention", None), ("unet_pooled_text", False)):
            if d[name] == sd1x:  # SD-1.x's layout: the build key of every earlier config stays
                del d[name]
        return d


def build_vae(config: SDConfig) -> AutoencoderKL:
    n = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.vae_channels), layers_per_block=config.vae_layers_per_block,
        latent_channels=config.latent_channels, norm_num_groups=config.norm_num_groups,
        sample_size=config.resolution, scaling_factor=config.scaling_factor,
    )


def build_unet(config: SDConfig) -> UNet2DConditionModel:
    n = len(config.unet_channels)
    attention = config.unet_attention or (True,) * (n - 1) + (False,)
    return UNet2DConditionModel(
        sample_size=config.latent_size, in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(config.unet_channels), layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_head_dim, norm_num_groups=config.norm_num_groups,
        cross_attention_dim=config.text_hidden,
        **({"addition_embed_type": "text", "addition_embed_type_num_heads": config.text_heads}
           if config.unet_pooled_text else {}),
    )


def build_text_encoder(config: SDConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=config.text_hidden,
        intermediate_size=4 * config.text_hidden, num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads, max_position_embeddings=config.max_length,
        hidden_act="quick_gelu",  # as OpenAI CLIP / SD-1.x
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(text_config)


def build_scheduler() -> DDPMScheduler:
    """SD-1.x's training noise schedule (scaled_linear 0.00085..0.012 over 1000 steps, epsilon)."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type="epsilon",
                         steps_offset=1)


def build_components(config: SDConfig, tokenizer: CLIPTokenizer) -> dict:
    """Randomly initialised unet/vae/text_encoder + the tokenizer and a DDPM scheduler."""
    if tokenizer.model_max_length != config.max_length:
        raise ValueError(f"tokenizer.model_max_length={tokenizer.model_max_length} != "
                         f"config.max_length={config.max_length}")
    return dict(unet=build_unet(config), vae=build_vae(config),
                text_encoder=build_text_encoder(config, tokenizer), tokenizer=tokenizer,
                scheduler=build_scheduler())


def assemble_pipeline(components: dict) -> StableDiffusionPipeline:
    """A standard StableDiffusionPipeline (no safety checker: these are not photos of people)."""
    keys = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    return StableDiffusionPipeline(**{k: components[k] for k in keys}, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
