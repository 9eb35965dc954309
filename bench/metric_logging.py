"""Per-step metric logging: the harness's ``tracking.MetricBuffer`` (a ``log_batch`` every N steps)
against MLflow's own asynchronous logging (``mlflow.log_metrics(..., synchronous=False)`` each
step) and plain synchronous ``log_metrics``, side by side on one tracking store.

It times what the training loop waits for per step (the call itself), then what the run's end waits
for (the buffer's last flush, or ``mlflow.flush_async_logging``), and checks every value arrived.

    python -m bench.metric_logging                      # a local SQLite store
    python -m bench.metric_logging --tracking_uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from harness import tracking


def _row(step: int) -> dict:
    return {"loss": 1.0 / step, "lr": 1e-3}


def buffered(run_id: str, steps: int, every: int) -> None:
    buffer = tracking.MetricBuffer(run_id, flush_every=every)
    for step in range(1, steps + 1):
        buffer.log(_row(step), step)
    buffer.flush()


def asynchronous(run_id: str, steps: int, every: int) -> None:
    for step in range(1, steps + 1):
        mlflow.log_metrics(_row(step), step=step, synchronous=False)
    mlflow.flush_async_logging()


def synchronous(run_id: str, steps: int, every: int) -> None:
    for step in range(1, steps + 1):
        mlflow.log_metrics(_row(step), step=step)


WAYS = {"MetricBuffer": buffered, "log_metrics async": asynchronous, "log_metrics sync": synchronous}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--flush_every", type=int, default=25, help="the buffer's (finetune's --log_every)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tracking_uri", default="")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(args.tracking_uri or f"sqlite:///{Path(tmp) / 'bench.db'}")
        mlflow.set_experiment("bench-metric-logging")
        seconds: dict[str, list[float]] = {name: [] for name in WAYS}
        for _ in range(args.rounds):
            for name, way in WAYS.items():
                with mlflow.start_run() as run:
                    start = time.perf_counter()
                    way(run.info.run_id, args.steps, args.flush_every)
                    seconds[name].append(time.perf_counter() - start)
                logged = MlflowClient().get_metric_history(run.info.run_id, "loss")
                if len(logged) != args.steps:
                    raise RuntimeError(f"{name}: {len(logged)} of {args.steps} loss values arrived")
    print(f"{args.steps} steps x 2 metrics, {args.rounds} rounds, store {mlflow.get_tracking_uri().split(':')[0]}")
    print("way                | ms per step (median round) | rounds (s)")
    result = {}
    for name, values in seconds.items():
        median = sorted(values)[len(values) // 2]
        result[name] = 1000 * median / args.steps
        print(f"{name:18s} | {result[name]:26.3f} | {', '.join(f'{v:.2f}' for v in values)}")
    return result


if __name__ == "__main__":
    main()
