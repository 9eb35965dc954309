"""Speed of the bootstrap AUC intervals (``harness.evaluate``) at the size of a real test set.

Default: 5 diseases x 10,000 images x 1000 resamples, ~30 % positives, 10 % unknown targets,
continuous scores (every score its own tie group: the worst case for the counting AUC). Target:
under 2 s on 2 CPU cores. Prints the median of ``--repeats`` timings in seconds.

    python -m bench.eval_speed
    python -m bench.eval_speed --images 100000 --paired
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from harness.evaluate import bootstrap_auc, paired_difference
from harness.pathologies import FINDINGS


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--labels", type=int, default=len(FINDINGS))
    p.add_argument("--n_resamples", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paired", action="store_true", help="also time paired_difference (two classifiers)")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    labels = [f"label_{k}" for k in range(args.labels)]
    y = (rng.random((args.images, args.labels)) < 0.3).astype(float)
    y[rng.random(y.shape) < 0.1] = np.nan
    score = rng.random(y.shape) + 0.8 * np.nan_to_num(y)
    other = score + rng.normal(0, 0.3, y.shape)

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    size = f"{args.labels} labels x {args.images} images x {args.n_resamples} resamples"
    seconds = timed(lambda: bootstrap_auc(y, score, labels, n_resamples=args.n_resamples))
    print(f"bootstrap_auc      {size}: {seconds:.3f} s (median of {args.repeats})")
    if args.paired:
        paired = timed(lambda: paired_difference(y, score, other, labels, n_resamples=args.n_resamples))
        print(f"paired_difference  {size}: {paired:.3f} s (median of {args.repeats})")
    return seconds


if __name__ == "__main__":
    main()
