"""How much of the real images' value survives the frozen VAE? An upper bound for every arm.

Every fine-tuning arm keeps the VAE frozen, so a generated image can at best be what the VAE
decodes. This passes the real train and valid splits through the pipeline's VAE (encode, decode),
trains the classify step's classifier on the round-tripped images and on the originals, and scores
both on the untouched real test split. The ratio of the two macro AUCs bounds the
synthetic/real ratio any arm can reach with this VAE.

    python -m bench.vae_ceiling                              # the registered embedded base
    python -m bench.vae_ceiling --pretrained_model /models/sd-1-5 --resolution 512
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


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_model", default="base")
    p.add_argument("--data", default="phantom", help="a CheXpert-layout data set (phantom, chexpert:DIR)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--epochs", type=int, default=8)
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
        common = ["--test", str(spec), "--epochs", str(args.epochs), "--resolution", str(args.resolution),
                  "--experiment", "vae_ceiling"]
        from mlflow.tracking import MlflowClient

        real_m = MlflowClient().get_run(classify.main(["--train", str(spec), *common])).data.metrics
        decoded_m = MlflowClient().get_run(classify.main(["--train", f"chexpert:{recon}?holdout=0", "--valid",
                                                          str(spec), *common])).data.metrics
    real, decoded = real_m["auc_macro"], decoded_m["auc_macro"]
    print(f"real train images          : macro AUC {real:.3f}")
    print(f"VAE round-tripped images   : macro AUC {decoded:.3f}")
    print(f"ceiling on synthetic/real  : {decoded / real:.3f}")
    per_label = sorted(k for k in real_m if k.startswith("auc_") and not k.endswith(("_ci_low", "_ci_high"))
                       and k not in ("auc_macro", "auc_diff_macro"))
    for k in per_label:  # which findings the VAE loses
        print(f"  {k[4:]:24s}: real {real_m[k]:.3f}, round-tripped {decoded_m.get(k, float('nan')):.3f}")
    return decoded / real


if __name__ == "__main__":
    main()
