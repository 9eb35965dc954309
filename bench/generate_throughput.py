"""Generation throughput: the harness's batched sampling against one image per pipeline call.

Both draw the same images (the six generation prompts, N per prompt, one seeded generator per
image) from the same loaded pipeline with the same scheduler, steps and guidance; rounds
alternate between the two so machine load hits both alike. The batched side is
``harness.generate.sample``, the code the ``generate`` entry point runs; the reference is the
plain diffusers idiom ``pipe(prompt, generator=...)`` in a loop. Also printed: the largest pixel
difference between the two sets of images (batching should not change them).

    python -m bench.generate_throughput                    # the embedded default architecture, CPU
    python -m bench.generate_throughput --preset sd15 --resolution 512 --mixed_precision fp16 --batch_size 32  # GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.train_throughput import build_pipeline_dir
from harness import generate
from harness.data import disease_prompts
from harness.pathologies import FINDINGS


def batched(pipe, prompts, seeds, batch_size, **kw) -> tuple[float, list]:
    start = time.perf_counter()
    images = [im for _, ims in generate.sample(pipe, prompts, seeds, batch_size, **kw) for im in ims]
    _sync(pipe)
    return len(prompts) / (time.perf_counter() - start), images


def one_per_call(pipe, prompts, seeds, num_inference_steps, guidance_scale, resolution) -> tuple[float, list]:
    start = time.perf_counter()
    images = [pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, height=resolution, width=resolution).images[0]
              for prompt, seed in zip(prompts, seeds)]
    _sync(pipe)
    return len(prompts) / (time.perf_counter() - start), images


def _sync(pipe) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help="SDConfig preset: tiny | default | sd15")
    p.add_argument("--n_per_prompt", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--scheduler", default="dpm", choices=["native", *generate.SCHEDULERS])
    p.add_argument("--resolution", type=int, default=0, help="0 = the preset's native size")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; medians are reported")
    p.add_argument("--mixed_precision", default="no", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    os.environ.setdefault("TQDM_DISABLE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        pipe_dir = build_pipeline_dir(args.preset, Path(tmp))
        pipe, _ = generate.load(generate.parse_args(["--checkpoint", str(pipe_dir), "--scheduler", args.scheduler,
                                                     "--mixed_precision", args.mixed_precision]))
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    texts = list(disease_prompts(FINDINGS).values())
    prompts = [t for t in texts for _ in range(args.n_per_prompt)]
    seeds = [generate.image_seed(0, k, i) for k in range(len(texts)) for i in range(args.n_per_prompt)]
    kw = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, resolution=resolution)

    one_per_call(pipe, prompts[:1], seeds[:1], **kw)  # warm-up: allocator, kernels
    rates = {"batched": [], "one_per_call": []}
    for _ in range(args.rounds):
        rate, together = batched(pipe, prompts, seeds, args.batch_size, **kw)
        rates["batched"].append(rate)
        rate, alone = one_per_call(pipe, prompts, seeds, **kw)
        rates["one_per_call"].append(rate)
    diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()) for a, b in zip(together, alone))
    b, o = statistics.median(rates["batched"]), statistics.median(rates["one_per_call"])
    print(f"device={pipe.device} dtype={str(pipe.dtype).removeprefix('torch.')} threads={torch.get_num_threads()} "
          f"preset={args.preset} resolution={resolution} scheduler={type(pipe.scheduler).__name__} "
          f"steps={args.num_inference_steps} guidance={args.guidance_scale} images={len(prompts)} rounds={args.rounds}")
    shown = {k: ", ".join(f"{x:.2f}" for x in v) for k, v in rates.items()}
    print(f"one image per call   : {o:8.2f} images/s  (rounds: {shown['one_per_call']})")
    print(f"batched (batch {args.batch_size:>4}) : {b:8.2f} images/s  (rounds: {shown['batched']})")
    print(f"ratio batched/single : {b / o:.3f}")
    print(f"max pixel difference between the two (0-255): {diff}")
    return b / o


if __name__ == "__main__":
    main()
