"""The GPU check: one script, one table, for the day a GPU machine is lent (issue 14 §4).

Measures, within a few minutes on an H100/H200:

- **training**: an SD-1.5-architecture UNet with random weights (``--preset sd15``, 512 px, bf16),
  the bare diffusers-example loop with each speed option on and off (torch.compile,
  channels_last, fused AdamW, SDPA attention), and the harness's own fine-tuning loop. Images/s,
  peak memory, the ratio to the diffusers-example defaults, and MFU: the measured FLOPs of one
  training step (``torch.utils.flop_counter``) times steps/s, over the device's dense bf16 peak;
- **generation**: the harness's ``generate.sample`` at batch 1 (UNet iterations/s) and batched
  (images/s);
- **the embedded study** on the GPU: ``bench.synthetic_ratio`` with the pipeline's defaults, its
  time and its ratio (``--study``).

Prints one table and writes it as JSON (``--out``). On CPU, ``--preset tiny`` is a dry run of the
same code (the test suite runs it), so the script cannot rot before a GPU is lent.

    python -m bench.gpu_check --out gpu_check.json                   # on the GPU machine
    python -m bench.gpu_check --preset tiny --resolution 32 --steps 2 --warmup 1 --no-study --no-compile  # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.train_throughput import bare_loop, build_pipeline_dir, harness_loop
from registry.pyfunc import DEFAULT_GUIDANCE

log = logging.getLogger(__name__)

# Dense bf16 peaks, FLOP/s (vendor data sheets, SXM parts); MFU is left out on other devices.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# Each training variant: the diffusers-example defaults with one option changed, then all the helpful ones.
VARIANTS = {
    "diffusers defaults": {},
    "+ channels_last": {"channels_last": True},
    "+ fused AdamW": {"fused_adamw": True},
    "+ torch.compile": {"compile": True},
    "- SDPA (classic attention)": {"sdpa": False},
}


def bf16_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in BF16_PEAK.items() if key in name), None)


def training(pipe_dir: Path, args, device: str, dtype: torch.dtype, workdir: Path) -> list[dict]:
    common = dict(pipe_dir=pipe_dir, data=args.data, steps=args.steps, warmup=args.warmup,
                  batch_size=args.batch_size, resolution=args.resolution, lr=1e-5, device=device, dtype=dtype)
    peak = bf16_peak(device)
    rows = []

    def measure(name, **options):
        stats: dict = {}
        rate = bare_loop(**common, **options, stats=stats)
        rows.append({"what": f"train: {name}", "images_per_s": rate, "options": options, **stats})
        log.info("%s: %.2f images/s", name, rate)

    variants = {k: v for k, v in VARIANTS.items() if args.compile or not v.get("compile")}
    for name, options in variants.items():
        measure(name, **options)
    base = rows[0]["images_per_s"]
    helpful = {k: v for row, (name, opts) in zip(rows[1:], list(variants.items())[1:])
               if row["images_per_s"] > base for k, v in opts.items()}
    if len(helpful) > 1:
        measure("best combination", **helpful)
    harness = harness_loop(pipe_dir, args.data, args.steps, args.warmup, args.batch_size, args.resolution,
                           1e-5, args.mixed_precision, workdir)
    rows.append({"what": "train: harness fine-tuning loop", "images_per_s": harness, "options": {}})
    flops = rows[0].get("flops_per_step")
    for row in rows:
        row["ratio_to_diffusers_defaults"] = row["images_per_s"] / base
        if peak and flops:
            row["mfu"] = flops * row["images_per_s"] / args.batch_size / peak
    best = max(rows[:-1], key=lambda r: r["images_per_s"])
    rows.append({"what": "train: best bare-loop options (the GPU default to adopt)", "options": best["options"],
                 "images_per_s": best["images_per_s"], "ratio_to_diffusers_defaults": best["images_per_s"] / base})
    return rows


def generation(pipe_dir: Path, args) -> list[dict]:
    from harness import generate

    pipe, _ = generate.load(generate.parse_args(["--checkpoint", str(pipe_dir), "--mixed_precision",
                                                 args.mixed_precision]))
    steps, kw = args.num_inference_steps, dict(guidance_scale=DEFAULT_GUIDANCE, resolution=args.resolution)
    generate_all = lambda n, batch: [x for _, ims in generate.sample(pipe, ["a frontal chest x-ray"] * n,
                                                                     list(range(n)), batch, num_inference_steps=steps,
                                                                     **kw) for x in ims]
    generate_all(1, 1)  # warm-up: kernels, allocator
    rows = []
    for n, batch, what in ((args.gen_images, 1, "generate: batch 1"),
                           (args.gen_batch, args.gen_batch, f"generate: batch {args.gen_batch}")):
        _sync()
        start = time.perf_counter()
        generate_all(n, batch)
        _sync()
        seconds = time.perf_counter() - start
        rows.append({"what": what, "images_per_s": n / seconds, "unet_it_per_s": n / batch * steps / seconds})
    return rows


def study(args) -> dict:
    from bench import synthetic_ratio

    start = time.perf_counter()
    result = synthetic_ratio.main(["--keep", str(Path(args.out).with_suffix("")) + "-study"])
    return {"what": "embedded study (dreambooth, bench.synthetic_ratio defaults)", "seconds": time.perf_counter() - start,
            "ratio": result["ratio"], "synthetic_macro_auc": result["synthetic_macro_auc"],
            "real_macro_auc": result["real_macro_auc"]}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def table(rows: list[dict]) -> str:
    cols = ("images_per_s", "ratio_to_diffusers_defaults", "mfu", "peak_memory_gib", "unet_it_per_s", "seconds", "ratio")
    shown = [c for c in cols if any(c in r for r in rows)]
    lines = ["| what | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in shown]
        lines.append(f"| {r['what']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15", help="SDConfig preset of the random-weight model: sd15 | default | tiny")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (torch.compile compiles here)")
    p.add_argument("--mixed_precision", default="auto", choices=["auto", "no", "bf16", "fp16"])
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--gen_images", type=int, default=4, help="images drawn one at a time")
    p.add_argument("--gen_batch", type=int, default=16, help="images drawn in one batch")
    p.add_argument("--data", default="phantom")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="include the torch.compile variant (minutes of compiling on a CPU)")
    p.add_argument("--study", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the embedded study (default: on a GPU)")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision, torch.float32)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'bench.db'}")
        pipe_dir = build_pipeline_dir(args.preset, tmp)
        rows = training(pipe_dir, args, device, dtype, tmp) + generation(pipe_dir, args)
    if args.study if args.study is not None else device == "cuda":
        rows.append(study(args))
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "preset": args.preset,
              "resolution": args.resolution, "batch_size": args.batch_size, "precision": args.mixed_precision,
              "torch": torch.__version__, "seconds": time.perf_counter() - started, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"{result['device']}, {args.preset} @ {args.resolution} px, batch {args.batch_size}, {args.mixed_precision}, "
          f"{result['seconds']:.0f} s")
    print(table(rows))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
