"""Build the embedded base model, fully offline: tokenizer -> VAE -> UNet + text encoder -> pipeline dir.

    python -m harness.base.build --out outputs/base            # the CPU default: a few minutes
    python -m harness.base.build --preset tiny --vae_steps 5 --unet_steps 5 --out /tmp/tiny

Stage 1 trains the VAE as a general image codec on drawn scenes AND unlabeled phantom radiographs
(no labels used), so fine-tuning on X-rays later has latents that can represent them. Stage 2
pretrains the UNet and text encoder jointly with SD's loss (epsilon prediction under the DDPM
schedule, 10% empty captions for classifier-free guidance) on the captioned scenes and the same
radiographs captioned only "a frontal/lateral chest x-ray": the base is our stand-in for SD's web
prior, which draws something like a chest X-ray (the write-up: "the images looked like some chest
x-rays") but was never told which findings an image shows - that is what fine-tuning teaches.
The radiographs' patients are not the phantom data set's.
The text encoder also learns, from text alone (captions and the medical words), to keep each token
readable from its output state, so prompts that differ in one finding word get different states,
as a real CLIP text encoder gives them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.base.components import SDConfig, assemble_pipeline, build_components
from harness.base.scenes import SceneDataset, caption_corpus
from harness.base.tokenizer import build_tokenizer, medical_corpus
from harness.config import StepConfig, param, parse
from harness.diffusion import LatentCache, diffusion_loss
from harness.pathologies import FINDINGS

log = logging.getLogger(__name__)
# The registered name of the embedded base; harness.pretrained resolves "base" to the version the
# last build run made or reused (its alias), so `-e base -P preset=...` picks what later steps use.
BASE_MODEL_NAME = "cxr-sd-base"
BASE_ALIAS = "current"

SAMPLE_CAPTIONS = [
    "a large red circle in the center on a white background",
    "a large blue square in the center on a yellow background",
    "a large green triangle in the center on a black background",
    "a large yellow ring in the center on a blue background",
    "a large white circle on the left on a black background",
    "a large white circle on the right on a black background",
    "three red circles on a white background",
    "a photo of a cat",
]


# ----------------------------------------------------------------------------- data

def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W) or (N,H,W,3) -> float [N,3,H,W] in [-1,1]."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x[..., None].expand(*x.shape, 3)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def phantom_radiographs(n: int, size: int, seed: int) -> tuple[np.ndarray, list[str]] | None:
    """``n`` unlabeled phantom radiographs (uint8 N,H,W) and their generic captions ("a frontal
    chest x-ray" / "a lateral chest x-ray"), or None if harness.data.phantom is absent.

    Findings are drawn at random (each with p=0.3) only to vary the images; they are not kept, as
    web captions of X-rays seldom name findings. Their patients are not the phantom data set's."""
    try:
        from harness.data.phantom import render
    except ImportError:
        return None
    rng = np.random.default_rng([seed, 7])
    out, captions = np.empty((n, size, size), np.uint8), []
    for i in range(n):
        findings = {f: bool(rng.random() < 0.3) for f in FINDINGS}
        view = ["PA", "AP", "LATERAL"][rng.choice(3, p=[0.45, 0.35, 0.2])]
        out[i] = render(findings, view, rng, size, float(rng.uniform(0, 1)))
        captions.append(f"a {'lateral' if view == 'LATERAL' else 'frontal'} chest x-ray")
    return out, captions


def render_scenes(n: int, resolution: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    ds = SceneDataset(n, resolution, seed)
    images, captions = torch.empty(n, 3, resolution, resolution), []
    for i in tqdm(range(n), desc="scenes", leave=False):
        item = ds[i]
        images[i] = item["pixel_values"]
        captions.append(item["caption"])
    return images, captions


# ----------------------------------------------------------------------------- metrics

@torch.no_grad()
def vae_psnr(vae, images, batch_size: int = 32) -> float:
    """Mean per-image PSNR (dB, on [0,1] pixels) of ``vae`` reconstructions from the posterior mean.

    images: uint8 (N,H,W) / (N,H,W,3) array, or a float [N,3,H,W] tensor in [-1,1]."""
    x = images if torch.is_tensor(images) else _to_tensor(np.asarray(images))
    device, dtype = vae.device, vae.dtype
    psnrs = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device, dtype)
        rec = vae.decode(vae.encode(xb).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((rec - xb) / 2).pow(2).flatten(1).mean(1).float().clamp_min(1e-10)
        psnrs.append(-10 * torch.log10(mse))
    return float(torch.cat(psnrs).mean())


# ----------------------------------------------------------------------------- training stages

def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float,
              device, log_fn=None, log_every: int = 10, seed: int = 0) -> float:
    """MSE + kl_weight * KL on random batches of ``images``; returns the final (smoothed) MSE."""
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # short warmup
    g = torch.Generator().manual_seed(seed)
    smoothed = None
    for step in (bar := tqdm(range(steps), desc="vae", leave=False)):
        x = images[torch.randint(len(images), (batch_size,), generator=g)].to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / x[0].numel()  # per pixel, so kl_weight doesn't depend on image size
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        smoothed = mse.item() if smoothed is None else 0.95 * smoothed + 0.05 * mse.item()
        bar.set_postfix(mse=f"{smoothed:.4f}")
        if log_fn and (step % log_every == 0 or step == steps - 1):
            log_fn({"vae_loss": loss.item(), "vae_mse": mse.item(), "vae_kl": kl.item()}, step)
    vae.eval().requires_grad_(False)
    return float("nan") if smoothed is None else smoothed


def token_identity_loss(text_encoder, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Cross-entropy of reading each token back from its final hidden state (tied to the input
    embedding table): keeps every word, rare ones included, distinct in the text encoder's output."""
    hidden = text_encoder(ids)[0]
    logits = hidden @ text_encoder.get_input_embeddings().weight.T
    keep = ids != pad_id
    keep[:, 0] = True  # bos
    return F.cross_entropy(logits[keep].float(), ids[keep])


def train_unet(unet, text_encoder, tokenizer, scheduler, latents: LatentCache,
               captions: list[str], steps: int, batch_size: int, lr: float,
               caption_dropout: float, device, log_fn=None, log_every: int = 10, seed: int = 0,
               text_corpus: list[str] | None = None, identity_weight: float = 0.0) -> float:
    """SD's objective: predict the noise added at a random DDPM timestep, conditioned on the caption.

    With ``identity_weight`` > 0 the text encoder also learns, on batches of ``text_corpus`` (text
    only, no images), to keep each token readable from its output state. Without it the jointly
    trained encoder maps every prompt to nearly the same states (``prompt_max_cosine`` near 1, logged
    as ``disease_prompt_max_cosine``), so a UNet fine-tuned under the frozen
    encoder (the dreambooth arm) has no signal to tell the disease prompts apart."""
    unet.train().requires_grad_(True)
    text_encoder.train().requires_grad_(True)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length,
                      return_tensors="pt").input_ids
    text_ids = tokenizer(list(text_corpus or captions), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warmup = max(1, min(50, steps // 10))
    # warmup then cosine to 10%: a short run ends on a low learning rate, which sharpens samples
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.55 + 0.45 * math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    g = torch.Generator().manual_seed(seed)  # every draw from it: the build repeats exactly
    smoothed = None
    for step in (bar := tqdm(range(steps), desc="unet", leave=False)):
        idx = torch.randint(len(latents), (batch_size,), generator=g)
        z = latents.sample(idx, generator=g)
        batch_ids = ids[idx].clone()
        drop = torch.rand(batch_size, generator=g) < caption_dropout
        batch_ids[drop] = empty
        hidden = text_encoder(batch_ids.to(device))[0]
        loss = diffusion_loss(unet, scheduler, z.to(device), hidden, generator=g).mean()
        identity = torch.zeros(())
        if identity_weight > 0:
            pick = torch.randint(len(text_ids), (2 * batch_size,), generator=g)
            identity = token_identity_loss(text_encoder, text_ids[pick].to(device), tokenizer.pad_token_id)
        opt.zero_grad(set_to_none=True)
        (loss + identity_weight * identity).backward()
        # clipped apart: the identity loss's early gradients must not shrink the UNet's steps
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()), 1.0)
        torch.nn.utils.clip_grad_norm_(list(text_encoder.parameters()), 1.0)
        opt.step()
        sched.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}")
        if log_fn and (step % log_every == 0 or step == steps - 1):
            log_fn({"unet_loss": loss.item(), "text_identity_loss": identity.item(),
                    "unet_lr": sched.get_last_lr()[0]}, step)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return float("nan") if smoothed is None else smoothed


@torch.no_grad()
def prompt_max_cosine(text_encoder, tokenizer, prompts: list[str] | None = None, where: str = "all") -> float:
    """The largest cosine similarity between two prompts' output states (default: the five
    disease prompts + no finding): over the whole padded sequence (``where="all"``), or only at the
    positions where the prompts' tokens differ (``"differing"``: the finding words), which is what
    cross-attention can tell apart; the shared words and the padding make the whole-sequence figure
    look close to 1 even when the findings' states differ."""
    from harness.data.prompts import disease_prompts

    prompts = prompts or list(disease_prompts(FINDINGS).values())
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(text_encoder.device)
    states = text_encoder(ids)[0].float()
    if where == "differing":
        differ = (ids != ids[0]).any(dim=0)
        if not differ.any():
            return 1.0  # the same tokens: the same states
        states = states[:, differ]
    h = F.normalize(states.flatten(1), dim=1)
    cos = h @ h.T
    return float(cos[~torch.eye(len(prompts), dtype=torch.bool, device=cos.device)].max())


@torch.no_grad()
def sample_grid(pipe, captions: list[str], resolution: int, seed: int = 0, steps: int = 25,
                guidance_scale: float = 4.0, n_per_caption: int = 2):
    """One row per caption, ``n_per_caption`` samples each (DDIM, so few steps suffice)."""
    from diffusers import DDIMScheduler
    from diffusers.utils import make_image_grid

    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    images = pipe(captions, num_images_per_prompt=n_per_caption, num_inference_steps=steps,
                  guidance_scale=guidance_scale, height=resolution, width=resolution, generator=g).images
    pipe.scheduler = scheduler
    return make_image_grid(images, rows=len(captions), cols=n_per_caption)


# ----------------------------------------------------------------------------- the build

def _training_images(config: SDConfig, n_scenes: int, n_radiographs: int, seed: int):
    """Captioned scenes + generically captioned phantom radiographs (64 more held out for the
    VAE's PSNR): the images, their captions, the scenes alone and the radiographs (None without
    the phantom)."""
    scene_images, captions = render_scenes(n_scenes, config.resolution, seed)
    xrays = phantom_radiographs(n_radiographs + 64, config.resolution, seed)
    if xrays is None:
        warnings.warn("harness.data.phantom not found: base trained on scenes only, no vae_psnr")
        return scene_images, captions, scene_images, None
    xrays, xray_captions = xrays
    images = torch.cat([scene_images, _to_tensor(xrays[:n_radiographs])])
    return images, captions + xray_captions[:n_radiographs], scene_images, xrays


def _save(pipe, out_dir: Path, record: dict, t_start: float, sample_steps: int) -> None:
    """Write the pipeline (with a sample grid unless ``sample_steps`` is 0) and ``base_build.json``
    next to ``out_dir``, then swap it in: a reader never sees half a build."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if sample_steps:
        grid = sample_grid(pipe, SAMPLE_CAPTIONS, pipe.unet.config.sample_size * pipe.vae_scale_factor,
                           seed=record["seed"], steps=sample_steps)
        grid.save(tmp / "samples.png")
        (tmp / "samples.txt").write_text("\n".join(SAMPLE_CAPTIONS) + "\n")
    record["metrics"]["seconds"] = time.time() - t_start
    (tmp / "base_build.json").write_text(json.dumps(record, indent=2))
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_base(out_dir, config: SDConfig | None = None, vae_steps: int = 300, unet_steps: int = 800,
               seed: int = 0, batch_size: int = 16, vae_lr: float = 1e-3, unet_lr: float = 5e-4,
               kl_weight: float = 1e-3, caption_dropout: float = 0.1, identity_weight: float = 0.1,
               n_scenes: int = 2000,
               n_radiographs: int = 600, device: str | None = None,
               log_fn: Callable[[dict, int], None] | None = None, samples: bool = True,
               sample_steps: int = 25) -> dict:
    """Train a base SD model from scratch and save it as a diffusers directory at ``out_dir``.

    Defaults are sized for 2 CPU cores and the default config (~5 min); on a GPU pass a bigger
    config and more steps. Returns metrics (vae_psnr on held-out phantom radiographs, final losses,
    scaling_factor, seconds...). ``log_fn(metrics, step)`` receives training losses as they come.
    """
    config = config or SDConfig.default()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.time()
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    metrics: dict = {}

    tokenizer = build_tokenizer(caption_corpus(seed=seed) + medical_corpus(), vocab_size=config.vocab_size,
                                model_max_length=config.max_length)
    parts = build_components(config, tokenizer)
    vae, unet, text_encoder = (parts[k].to(device) for k in ("vae", "unet", "text_encoder"))

    # Stage 1: the VAE, on scenes + unlabeled radiographs (held-out radiographs for PSNR).
    images, captions, scene_images, xrays = _training_images(config, n_scenes, n_radiographs, seed)
    t0 = time.time()
    metrics["vae_final_mse"] = train_vae(vae, images, vae_steps, batch_size, vae_lr, kl_weight, device,
                                         log_fn, seed=seed)
    metrics["vae_seconds"] = time.time() - t0
    metrics["vae_psnr"] = vae_psnr(vae, xrays[n_radiographs:]) if xrays is not None else float("nan")
    metrics["vae_psnr_scenes"] = vae_psnr(vae, scene_images[-64:])

    # SD's latent scale: 1/std of the latents, so diffusion sees unit-variance inputs.
    latents = LatentCache.of_images(vae, images, scaling_factor=1.0)
    scaling_factor = float(1 / latents.sample(range(len(latents))).std())
    latents.scaling_factor = scaling_factor
    vae.register_to_config(scaling_factor=scaling_factor)
    metrics["scaling_factor"] = scaling_factor

    # Stage 2: UNet + text encoder on the captioned scenes and generically captioned radiographs.
    t0 = time.time()
    metrics["unet_final_loss"] = train_unet(unet, text_encoder, tokenizer, parts["scheduler"], latents, captions,
                                            unet_steps, batch_size, unet_lr, caption_dropout,
                                            device, log_fn, seed=seed, identity_weight=identity_weight,
                                            # the captions + the medical words as text only (as CLIP read
                                            # "cardiomegaly" in web text without seeing it drawn)
                                            text_corpus=captions + medical_corpus() * 10)
    metrics["unet_seconds"] = time.time() - t0
    metrics["disease_prompt_max_cosine"] = prompt_max_cosine(text_encoder, tokenizer)
    metrics["disease_token_max_cosine"] = prompt_max_cosine(text_encoder, tokenizer, where="differing")

    pipe = assemble_pipeline(parts).to("cpu")
    record = {"config": config.to_dict(), "seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps,
              "batch_size": batch_size, "metrics": metrics}
    _save(pipe, out_dir, record, t_start, sample_steps if samples else 0)
    return metrics


BUILD_VERSION = 5  # bump when the build's code changes what it produces: part of the reuse key


BUILD_KEY_FILE = "build_key"  # written last: a folder holding it is a complete build of that recipe


def registered_build(key: str):
    """The registered base version built with these exact parameters, if any."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        versions = MlflowClient().search_model_versions(f"name = '{BASE_MODEL_NAME}'")
    except MlflowException:
        return None
    return next((v for v in versions if v.tags.get("build_key") == key), None)


def local_build(out: Path, key: str) -> bool:
    """Whether ``out`` holds a finished build of the recipe ``key`` (made for another tracking store)."""
    marker = out / BUILD_KEY_FILE
    return marker.is_file() and marker.read_text().strip() == key and (out / "model_index.json").is_file()


@dataclass
class BuildConfig(StepConfig):
    """The build's options; ``recipe_of`` picks the ones its output depends on (its reuse key)."""
    out: str | None = param(None, "diffusers directory to write (default: outputs/base-<key>)", key=False)
    preset: str = param("default", choices=["tiny", "default", "sd15"], project=True)
    # A 900-step VAE pays off only with long fine-tuning (README: e46, e52): the stretch budget's base.
    vae_steps: int = param(300, "VAE training steps", project=True)
    unet_steps: int = param(800, "UNet + text encoder training steps", project=True)
    batch_size: int = param(16)
    n_scenes: int = param(2000)
    n_radiographs: int = param(600)
    seed: int = param(0, project=True)
    device: str | None = param(None, "cpu / cuda (default: cuda if available)", key=False)
    no_samples: bool = param(False, "skip the sample grid", key=False)
    threads: int | None = param(None, "torch CPU threads (default: torch's; use 1 when other jobs share the cores)",
                                key=False)
    force: bool = param(False, "rebuild even if this build is registered", project=True, key=False)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)

    def check(self) -> None:
        self.not_negative("vae_steps", "unet_steps", "n_radiographs", "seed")
        self.at_least(1, "batch_size", "n_scenes")
        if self.threads is not None:
            self.not_negative("threads")


def parse_args(argv=None) -> BuildConfig:
    return parse(BuildConfig, argv, prog="python -m harness.base.build")


def recipe_of(a: BuildConfig) -> tuple[dict, str]:
    """What a build's output depends on, and its key (the reuse key in the registry and on disk)."""
    from harness import tracking
    from harness.data.phantom import GENERATOR_VERSION

    config = SDConfig.preset(a.preset)
    recipe = {"config": config.to_dict(), "vae_steps": a.vae_steps, "unet_steps": a.unet_steps,
              "batch_size": a.batch_size, "n_scenes": a.n_scenes, "n_radiographs": a.n_radiographs,
              "seed": a.seed, "build_version": BUILD_VERSION, "phantom_version": GENERATOR_VERSION}
    return recipe, tracking.params_key(recipe)


def default_out(key: str) -> Path:
    return Path(os.environ.get("HARNESS_OUTPUT_DIR", "outputs")) / f"base-{key}"


def register_default_local_build() -> str | None:
    """Register the default recipe's build found on disk into the current store (a new store or a
    team server: the build is the same, only the registry is new). Returns its models:/ URI, or
    None when there is no such build on disk."""
    config = parse_args([])
    recipe, key = recipe_of(config)
    if not local_build(default_out(key), key):
        return None
    return run(config).artifacts["registered"]


def run(config: BuildConfig) -> "tracking.StepResult":
    """Build the embedded base, log it to MLflow and register it as ``cxr-sd-base`` - once: a build
    with identical parameters and code is found in the registry and reused, and one found on disk
    (built for another store) is registered without rebuilding; ``--force true`` rebuilds. Either way
    the version gets the ``current`` alias: what "base" means to the steps after it. The
    result's artifacts: ``registered`` (the version's models:/ URI), and ``reused`` when it was."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from harness import tracking
    from registry.pyfunc import log_pipeline

    if config.threads:
        torch.set_num_threads(config.threads)
    sd = SDConfig.preset(config.preset)
    recipe, key = recipe_of(config)
    with tracking.tracked_run("base", config.experiment, tags={"harness.build_key": key}) as active:
        existing = None if config.force else registered_build(key)
        if existing is not None:
            uri = f"models:/{BASE_MODEL_NAME}/{existing.version}"
            MlflowClient().set_registered_model_alias(BASE_MODEL_NAME, BASE_ALIAS, existing.version)
            mlflow.set_tag("harness.reused", uri)
            log.info("reusing %s: built with the same parameters by run %s", uri, existing.run_id)
            return tracking.StepResult(active.info.run_id, {"reused": uri, "registered": uri})
        tracking.log_params({"preset": config.preset, **{k: v for k, v in recipe.items() if k != "config"},
                             **{f"config.{k}": v for k, v in sd.to_dict().items()}})
        out = Path(config.out) if config.out else default_out(key)
        if not config.force and local_build(out, key):
            mlflow.set_tag("harness.registered_from_disk", str(out.absolute()))
            log.info("registering the build in %s (same parameters, made for another store) without rebuilding", out)
            metrics = json.loads((out / "base_build.json").read_text()).get("metrics", {})
        else:
            buffer = tracking.MetricBuffer(active.info.run_id)
            metrics = build_base(out, sd, vae_steps=config.vae_steps, unet_steps=config.unet_steps,
                                 seed=config.seed, batch_size=config.batch_size, n_scenes=config.n_scenes,
                                 n_radiographs=config.n_radiographs, device=config.device,
                                 samples=not config.no_samples, log_fn=buffer.log)
            buffer.flush()
            (out / BUILD_KEY_FILE).write_text(key)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        for name in ("samples.png", "samples.txt", "base_build.json"):
            if (out / name).is_file():
                mlflow.log_artifact(str(out / name), "base")
        info = log_pipeline(out, name="base", registered_model_name=BASE_MODEL_NAME, resolution=sd.resolution)
        uri = f"models:/{BASE_MODEL_NAME}/{info.registered_model_version}"
        client = MlflowClient()
        client.set_model_version_tag(BASE_MODEL_NAME, info.registered_model_version, "build_key", key)
        client.set_registered_model_alias(BASE_MODEL_NAME, BASE_ALIAS, info.registered_model_version)
        mlflow.set_tag("harness.registered", uri)
        print(json.dumps(metrics, indent=2))
        return tracking.StepResult(active.info.run_id, {"registered": uri}, metrics)


def main(argv=None) -> dict:
    """The command line's entry: the build's metrics and ``registered`` URI, or ``reused`` and
    ``registered`` when an identical build was registered already."""
    result = run(parse_args(argv))
    if "reused" in result.artifacts:
        return dict(result.artifacts)
    return {**result.metrics, "registered": result.artifacts["registered"]}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
