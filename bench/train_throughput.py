"""Training throughput of the harness against a bare diffusers training loop, in one run.

Both train the same UNet (the dreambooth arm: text encoder and VAE frozen, VAE encoding every
step) with the same batch, resolution and data; the bare loop is plain PyTorch on images already
in memory, as in a minimal diffusers example. The harness's figure is what it logs to MLflow
(``throughput_images_per_s``, steady-state windows), so the ratio prices everything the harness
adds per step: accelerate, data loading, MLflow logging, progress bar.

    python -m bench.train_throughput                 # the embedded default architecture, CPU
    python -m bench.train_throughput --preset sd15 --resolution 512 --mixed_precision bf16  # GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def build_pipeline_dir(preset: str, root: Path) -> Path:
    """Random weights suffice for throughput: the default base's architecture, built in code."""
    from harness.base.components import SDConfig, assemble_pipeline, build_components
    from harness.base.tokenizer import build_tokenizer, medical_corpus

    config = SDConfig.preset(preset)
    tokenizer = build_tokenizer(medical_corpus(), vocab_size=min(config.vocab_size, 2048),
                                model_max_length=config.max_length)
    path = root / f"{preset}-pipeline"
    assemble_pipeline(build_components(config, tokenizer)).save_pretrained(path)
    return path


def bare_loop(pipe_dir: Path, data: str, steps: int, warmup: int, batch_size: int, resolution: int,
              lr: float, device: str, dtype: torch.dtype, channels_last: bool = False, fused_adamw: bool = False,
              compile: bool = False, sdpa: bool = True, stats: dict | None = None) -> float:
    """The reference: a plain PyTorch loop over in-memory batches, as diffusers' examples train
    (defaults: SDPA attention, unfused AdamW, eager). Returns images/s; ``stats`` (if given) gets the
    peak memory and the FLOPs of one training step."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from harness.data import DataSpec, ImageDataset, load_table, prompts_for_table

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    unet, vae, text_encoder = pipe.unet.to(device), pipe.vae.to(device, dtype), pipe.text_encoder.to(device, dtype)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    table = load_table(DataSpec.parse(data), split="train")
    images = ImageDataset(table, table.attrs["labels"], resolution=resolution, channels=3)
    n = min(len(images), batch_size * 8)
    pixels = torch.stack([images[i]["pixel_values"] for i in range(n)]).to(device, dtype)
    ids = pipe.tokenizer(prompts_for_table(table.iloc[:n]), padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    if not sdpa:
        from diffusers.models.attention_processor import AttnProcessor

        unet.set_attn_processor(AttnProcessor())  # the pre-torch-2 attention: explicit softmax(QK^T)V
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2, fused=fused_adamw or None)
    forward = torch.compile(unet) if compile else unet
    generator = torch.Generator().manual_seed(0)

    def step_once():
        pick = torch.randint(n, (batch_size,), generator=generator)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                latents = vae.encode(pixels[pick]).latent_dist.sample() * vae.config.scaling_factor
                hidden = text_encoder(ids[pick])[0]
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            if channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            pred = forward(noisy, t, hidden).sample
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step_once()
    if stats is not None:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:  # eager, so the counter sees every op
            saved, forward = forward, unet
            step_once()
            forward = saved
        stats["flops_per_step"] = counter.get_total_flops()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_once()
    _sync(device)
    seconds = time.perf_counter() - start
    if stats is not None and device == "cuda":
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return steps * batch_size / seconds


def harness_loop(pipe_dir: Path, data: str, steps: int, warmup: int, batch_size: int, resolution: int,
                 lr: float, precision: str, workdir: Path) -> float:
    """The harness's own entry point; its logged steady-state throughput. Returns images/s."""
    from mlflow.tracking import MlflowClient

    from harness import finetune

    window = max(1, warmup)  # throughput windows (k*w, (k+1)*w]: the first one holds the warm-up
    run_id = finetune.main([
        "--arm", "dreambooth", "--data", data, "--pretrained_model", str(pipe_dir),
        "--steps", str(warmup + steps), "--batch_size", str(batch_size), "--resolution", str(resolution),
        "--learning_rate", str(lr), "--mixed_precision", precision, "--lr_warmup_steps", "0",
        "--checkpoint_every", str(10 ** 9), "--grid_steps", "1", "--grid_seeds", "1",
        "--log_every", str(window), "--output_dir", str(workdir / f"out-{time.time_ns()}"), "--resume", "never",
    ])
    history = MlflowClient().get_metric_history(run_id, "throughput_images_per_s")
    steady = [m.value for m in history if m.step > window]
    return statistics.fmean(steady)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help="SDConfig preset: tiny | default | sd15")
    p.add_argument("--data", default="phantom")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    args = p.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'bench.db'}")
        pipe_dir = build_pipeline_dir(args.preset, tmp)
        common = dict(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size,
                      resolution=args.resolution, lr=1e-5)
        bare, harness = [], []
        for _ in range(args.rounds):
            bare.append(bare_loop(pipe_dir, args.data, device=device, dtype=dtype, **common))
            harness.append(harness_loop(pipe_dir, args.data, precision=args.mixed_precision, workdir=tmp, **common))
    b, h = statistics.median(bare), statistics.median(harness)
    print(f"device={device} preset={args.preset} batch={args.batch_size} resolution={args.resolution} "
          f"precision={args.mixed_precision} steps={args.steps} rounds={args.rounds}")
    print(f"bare diffusers loop : {b:8.2f} images/s  (rounds: {', '.join(f'{x:.2f}' for x in bare)})")
    print(f"harness fine-tuning : {h:8.2f} images/s  (rounds: {', '.join(f'{x:.2f}' for x in harness)})")
    paired = statistics.median(x / y for x, y in zip(harness, bare))
    print(f"ratio harness/bare  : {h / b:.3f} (ratio of medians); {paired:.3f} (median of per-round ratios)")
    return h / b


if __name__ == "__main__":
    main()
