"""Calibrate the phantom's difficulty: how well does the small CNN learn it at 64 px?

Builds (or reuses) the phantom for the given parameters, trains ``small_cnn`` on the frontal
train split (uncertain labels ignored), selects the epoch by validation macro AUC and reports
per-disease and macro AUC on the test split, with wall times. DEFAULT_DIFFICULTY in
harness/data/phantom.py is set from this script's output.

    python -m bench.calibrate_phantom                     # the default phantom
    python -m bench.calibrate_phantom --difficulty 0.6    # another difficulty
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from harness.pathologies import FINDINGS


def load_split(path, split: str, resolution: int) -> dict:
    """A whole split as tensors (decoded once: an epoch then costs only the model)."""
    from harness.data.datasets import ImageDataset, load_table

    table = load_table(f"chexpert:{path}", split=split, views="frontal", uncertain="ignore", labels=FINDINGS)
    ds = ImageDataset(table, FINDINGS, resolution=resolution, channels=1)
    items = [ds[i] for i in range(len(ds))]
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items])}


def loader(data: dict, batch_size: int, shuffle: bool, seed: int = 0):
    ds = torch.utils.data.StackDataset(**data)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def main(argv=None) -> dict:
    from harness.data import phantom

    p = argparse.ArgumentParser(prog="python -m bench.calibrate_phantom", description=__doc__.split("\n\n")[0])
    p.add_argument("--difficulty", type=float, default=phantom.DEFAULT_DIFFICULTY)
    p.add_argument("--patients", type=int, default=phantom.DEFAULT_PATIENTS)
    p.add_argument("--size", type=int, default=phantom.DEFAULT_SIZE)
    p.add_argument("--seed", type=int, default=0, help="phantom seed (the classifier uses --train-seed)")
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=64, help="training resolution (the harness default)")
    p.add_argument("--epochs", type=int, default=6, help="6 epochs of ~1300 images: ~2 min on 2 cores")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the machine is shared)")
    p.add_argument("--data-dir", default=None, help="phantom cache (default $HARNESS_DATA_DIR or <repo>/data)")
    args = p.parse_args(argv)

    from harness.classifier import build_classifier, predict, train_classifier
    from harness.metrics import macro_auc, per_label_auc

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = phantom.ensure_phantom(args.patients, args.seed, args.difficulty, args.size, cache_dir=args.data_dir)
    t_data = time.perf_counter() - t0
    splits = {s: load_split(path, s, args.resolution) for s in ("train", "valid", "test")}
    t_load = time.perf_counter() - t0 - t_data

    model = build_classifier("small_cnn", len(FINDINGS), in_channels=1)
    t1 = time.perf_counter()
    model, history = train_classifier(model, loader(splits["train"], args.batch_size, True, args.train_seed),
                                      loader(splits["valid"], 256, False), epochs=args.epochs, lr=args.lr,
                                      seed=args.train_seed, labels=FINDINGS)
    t_train = time.perf_counter() - t1
    scores, targets = predict(model, loader(splits["test"], 256, False))
    aucs = per_label_auc(targets, scores, FINDINGS)
    result = {
        "difficulty": args.difficulty, "phantom": str(path),
        "n_images": {s: int(len(d["labels"])) for s, d in splits.items()},
        "test_auc": aucs, "test_macro_auc": macro_auc(aucs),
        "best_epoch": max(history, key=lambda h: (h["valid_macro_auc"], -h["valid_loss"]))["epoch"],
        "seconds": {"phantom": round(t_data, 1), "load": round(t_load, 1), "train": round(t_train, 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }
    for label, auc in aucs.items():
        print(f"  {label:<18} AUC {auc:.3f}")
    print(f"  {'macro':<18} AUC {result['test_macro_auc']:.3f}   (difficulty {args.difficulty}, "
          f"train {t_train:.0f} s, total {result['seconds']['total']:.0f} s)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
