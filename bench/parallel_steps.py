"""Why the pipeline runs independent steps in worker processes: UNet training images/s of one
process using every core against ``jobs`` processes side by side with ``cores // jobs`` threads
each, measured in one run on the embedded default architecture (random weights, batch 8).

    python -m bench.parallel_steps            # prints both throughputs and their ratio
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time


def _train(threads: int, batch_size: int, steps: int, warmup: int, start, out) -> None:
    import torch
    import torch.nn.functional as F

    from harness.base.components import SDConfig, build_unet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = SDConfig.default()
    unet = build_unet(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x = torch.randn(batch_size, config.latent_channels, config.latent_size, config.latent_size)
    hidden = torch.randn(batch_size, 8, config.text_hidden)
    t = torch.randint(0, 1000, (batch_size,))
    for i in range(warmup):
        F.mse_loss(unet(x, t, hidden).sample, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    start.wait()  # every process times the same wall-clock window
    began = time.perf_counter()
    for i in range(steps):
        F.mse_loss(unet(x, t, hidden).sample, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    out.put(steps * batch_size / (time.perf_counter() - began))


def throughput(jobs: int, threads: int, batch_size: int, steps: int, warmup: int) -> float:
    """Images/s summed over ``jobs`` processes training at once."""
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(jobs), ctx.Queue()
    procs = [ctx.Process(target=_train, args=(threads, batch_size, steps, warmup, start, out)) for _ in range(jobs)]
    for proc in procs:
        proc.start()
    total = sum(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    return total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    one = throughput(1, cores, a.batch_size, a.steps, a.warmup)
    many = throughput(a.jobs, max(1, cores // a.jobs), a.batch_size, a.steps, a.warmup)
    print(f"1 process x {cores} threads: {one:.1f} images/s")
    print(f"{a.jobs} processes x {max(1, cores // a.jobs)} threads: {many:.1f} images/s")
    print(f"ratio: {many / one:.2f}")
    return {"one": one, "many": many, "ratio": many / one}


if __name__ == "__main__":
    main()
