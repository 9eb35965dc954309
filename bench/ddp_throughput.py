"""Data-parallel fine-tuning throughput: the harness under ``accelerate launch`` with N processes
against one process, same per-process batch, side by side in one run (rounds alternate).

On CPU each process gets ``--threads`` torch threads and the processes talk over gloo
(``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu``); on a GPU machine pass ``--gpu`` and one
process runs per GPU. The figure is the run's logged ``throughput_images_per_s`` (every process's
images, steady-state windows), so "per process" is that over N.

    python -m bench.ddp_throughput --processes 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.train_throughput import build_pipeline_dir

ROOT = Path(__file__).resolve().parents[1]


def launch(n: int, pipe_dir: Path, args, workdir: Path, gpu: bool) -> float:
    """One fine-tune with ``n`` processes; its steady-state images/s over all of them."""
    from mlflow.tracking import MlflowClient

    window = max(1, args.warmup)  # throughput windows (k*w, (k+1)*w]: the first one holds the warm-up
    out = workdir / f"out-{n}-{time.time_ns()}"
    finetune = ["-m", "harness.finetune", "--arm", "dreambooth", "--data", args.data,
                "--pretrained_model", str(pipe_dir), "--steps", str(args.warmup + args.steps),
                "--batch_size", str(args.batch_size), "--resolution", str(args.resolution), "--learning_rate", "1e-5",
                "--lr_warmup_steps", "0", "--checkpoint_every", str(10 ** 9), "--grid_steps", "1",
                "--grid_seeds", "1", "--log_every", str(window), "--output_dir", str(out), "--resume", "never"]
    launcher = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(n),
                "--main_process_port", "0"] if n > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not gpu:
        env["ACCELERATE_USE_CPU"] = "1"
    done = subprocess.run([*launcher, *finetune], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{n}-process fine-tune failed:\n{done.stderr[-3000:]}")
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    history = MlflowClient().get_metric_history(run_id, "throughput_images_per_s")
    return statistics.fmean(m.value for m in history if m.step > window)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="default", help="SDConfig preset: tiny | default | sd15")
    p.add_argument("--data", default="phantom")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch_size", type=int, default=8, help="per process")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--gpu", action="store_true", help="one process per GPU instead of CPU processes on gloo")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'bench.db'}")
        pipe_dir = build_pipeline_dir(args.preset, tmp)
        seen: dict[int, list[float]] = {1: [], args.processes: []}
        for _ in range(args.rounds):
            for n in seen:
                seen[n].append(launch(n, pipe_dir, args, tmp, args.gpu))
    one, many = statistics.median(seen[1]), statistics.median(seen[args.processes])
    n = args.processes
    print(f"preset={args.preset} batch/process={args.batch_size} resolution={args.resolution} "
          f"threads/process={args.threads} steps={args.steps} rounds={args.rounds} device={'gpu' if args.gpu else 'cpu'}")
    print("processes | images/s (all) | images/s per process | rounds")
    for k, v in ((1, one), (n, many)):
        print(f"{k:9d} | {v:14.2f} | {v / k:20.2f} | {', '.join(f'{x:.2f}' for x in seen[k])}")
    print(f"scaling: {many / one:.2f}x with {n} processes (per-process efficiency {many / one / n:.2f})")
    return {"one": one, "many": many, "processes": n}


if __name__ == "__main__":
    main()
