"""How much of the real images' value survives the frozen VAE? An upper bound for every arm.

Every fine-tuning arm keeps the VAE frozen, so a generated image can at best be what the VAE
decodes. This passes the real train and valid splits through the pipeline's VAE (encode, decode),
trains the classify step's classifier on the round-tripped images and on the originals, and scores
both on the untouched real test split. The ratio of the two macro AUCs bounds the
synthetic/real ratio any arm can reach with this VAE.

    python -m bench.vae_ceiling                              # the registered embedded base
    python -m bench.vae_ceiling --pretrained_model /models/sd-1-5 --resolution 512

``--synthetic chexpert:DIR`` (a generated set, e.g. a ``bench.synthetic_ratio --keep`` directory's
``generated/CheXpert-v1.0-small``) also asks where that set's gap lies: a classifier trained on it, on the
real images and on their round trips, each scored on the real test split and on its VAE round
trip. A synthetic-trained classifier that ranks round-tripped test films far better than the
originals is held back by how its images look (the VAE's rendering), not by missing findings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm


def round_trip(vae, spec, out: Path, resolution: int, batch_size: int = 64) -> Path:
    """Copy a CheXpert-layout data set's train and valid splits with every image VAE round-tripped."""
    from harness.data import ImageDataset, load_table

    root = spec.path.parent
    for split in ("train", "valid"):
        shutil.copy(spec.path / f"{split}.csv", _mkdir(out / spec.path.name) / f"{split}.csv")
        table = load_table(spec, split=split, views="all", uncertain="ignore")
        images = ImageDataset(table, table.attrs["labels"], resolution=resolution, channels=3)
        for start in tqdm(range(0, len(images), batch_size), desc=f"VAE round trip ({split})"):
            rows = range(start, min(start + batch_size, len(images)))
            x = torch.stack([images[i]["pixel_values"] for i in rows])
            with torch.no_grad():
                y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1).mean(1)
            for i, image in zip(rows, y):
                target = out / Path(table["path"].iloc[i]).relative_to(root)
                pixels = ((image.numpy() + 1) * 127.5).round().astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(_mkdir(target.parent) / target.name, quality=95)
    return out / spec.path.name


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model", default="base")
    p.add_argument("--data", default="phantom", help="a CheXpert-layout data set (phantom, chexpert:DIR)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--synthetic", default="", help="a generated data set (chexpert:DIR): also score a classifier "
                                                   "trained on it on the round-tripped test split")
    args = p.parse_args(argv)

    from harness import classify
    from harness.data import DataSpec
    from harness.pretrained import load_pipeline

    vae = load_pipeline(args.pretrained_model).vae.eval()
    spec = DataSpec.parse(args.data).resolve()
    if spec.format != "chexpert":
        raise ValueError(f"--data must be a CheXpert-layout data set, got {args.data!r}")
    with tempfile.TemporaryDirectory() as tmp:
        recon = round_trip(vae, spec, Path(tmp) / "recon", args.resolution)
        store = f"sqlite:///{Path(tmp) / 'bench.db'}"  # keep the bench's runs out of the project store
        os.environ["MLFLOW_TRACKING_URI"] = store
        mlflow.set_tracking_uri(store)
        recipe = ["--epochs", str(args.epochs), "--resolution", str(args.resolution), "--experiment", "vae_ceiling"]
        real_test = ["--test", str(spec)]
        round_trip_test = ["--test", f"chexpert:{recon}"]  # its valid.csv is the test split, round-tripped
        trains = {"real images": ["--train", str(spec)],
                  "round-tripped images": ["--train", f"chexpert:{recon}?holdout=0", "--valid", str(spec)]}
        if args.synthetic:
            trains["synthetic images"] = ["--train", args.synthetic]
        from mlflow.tracking import MlflowClient

        def metrics(train: list[str], test: list[str]) -> dict:
            return MlflowClient().get_run(classify.main([*train, *test, *recipe])).data.metrics

        on_real = {name: metrics(train, real_test) for name, train in trains.items()}
        # each classifier on the round-tripped films too: the same recipe and seed retrain the same one
        cross = {name: (on_real[name]["auc_macro"], metrics(train, round_trip_test)["auc_macro"])
                 for name, train in trains.items()} if args.synthetic else {}
        real_m, decoded_m = on_real["real images"], on_real["round-tripped images"]
    real, decoded = real_m["auc_macro"], decoded_m["auc_macro"]
    print(f"real train images          : macro AUC {real:.3f}")
    print(f"VAE round-tripped images   : macro AUC {decoded:.3f}")
    print(f"ceiling on synthetic/real  : {decoded / real:.3f}")
    per_label = sorted(k for k in real_m if k.startswith("auc_") and not k.endswith(("_ci_low", "_ci_high"))
                       and k not in ("auc_macro", "auc_diff_macro"))
    for k in per_label:  # which findings the VAE loses
        print(f"  {k[4:]:24s}: real {real_m[k]:.3f}, round-tripped {decoded_m.get(k, float('nan')):.3f}")
    if cross:
        print("macro AUC, trained on (rows) x tested on (real test split | its VAE round trip):")
        for name, (real_films, round_trip_films) in cross.items():
            print(f"  {name:24s}: {real_films:.3f} | {round_trip_films:.3f}")
    return {"real": real, "round_tripped": decoded, "ceiling": decoded / real, **({"cross": cross} if cross else {})}


if __name__ == "__main__":
    main()
