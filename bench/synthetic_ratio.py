"""The study's quality number for one arm, end to end: synthetic-trained / real-trained macro AUC.

Fine-tunes one arm from the base, generates images with generate's ``--prompts`` (``data``: 6 x
``n_per_prompt`` images prompted with real label sets; ``disease``: ``n_per_prompt`` per disease
prompt + no finding), trains the classify step's classifier on them and on the real train split,
and scores both on the real test split. Also prints, per finding, how well the REAL-trained
classifier tells the images labelled with that finding from the no-finding images ("prompt AUC":
0.5 = the prompt changes nothing the real classifier can see), which needs no second classifier.

``--oracle`` replaces fine-tuning + generation by the phantom renderer itself drawing new patients
for each prompt: a perfect generator. Its ratio is the ceiling that the prompts, their number and
the classifier budget put on every arm, whatever the model. Measured (small_cnn, 8 epochs, real
macro AUC 0.938): disease prompts, 24 images per prompt 0.512 (chance), 100: 0.702, 200: 0.844,
400: 0.892; data prompts, 1200 images in all (n_per_prompt 200) 0.881, 2400: 0.964.

    python -m bench.synthetic_ratio --arm dreambooth --steps 600 --n_per_prompt 200
    python -m bench.synthetic_ratio --oracle --n_per_prompt 200 [--prompts disease]
    python -m bench.synthetic_ratio --checkpoint outputs/dreambooth-.../checkpoints/step_000600/pipeline

Runs go to a temporary MLflow store unless ``--keep`` names a directory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def oracle_data(out: Path, n_per_prompt: int, seed: int, prompts: str = "disease", data: str = "phantom") -> str:
    """A CheXpert-layout set drawn by the phantom renderer for generate's prompts (same label
    sets, splits and sizes as ``generate --prompts <prompts>`` would make)."""
    from PIL import Image

    from harness import generate
    from harness.data.datasets import write_csv
    from harness.data.phantom import ARCHIVE, JPEG_QUALITY, render
    from harness.pathologies import CHEXPERT_COLUMNS, FINDINGS

    args = generate.parse_args(["--checkpoint", "oracle", "--n_per_prompt", str(n_per_prompt), "--seed", str(seed),
                                "--prompts", prompts, "--prompt_data", data, "--grid_rows", "0"])
    label_sets = generate.data_label_sets(data) if prompts == "data" else None
    jobs = generate.image_jobs(args, generate.disease_prompts(FINDINGS), label_sets)
    rows = {"train": [], "valid": []}
    rng = np.random.default_rng([seed, 99])
    for k, job in enumerate(jobs):
        projection = ("PA", "AP")[int(rng.integers(2))]
        image = render({f: f in job["labels"] for f in FINDINGS}, projection, rng, 256)
        path = f"{ARCHIVE}/{job['split']}/patient{k + 1:05d}/study1/view1_frontal.jpg"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((64, 64), Image.LANCZOS).save(out / path, quality=JPEG_QUALITY)
        rows[job["split"]].append({"Path": path, "Frontal/Lateral": "Frontal", **generate.label_cells(job["labels"])})
    for split, split_rows in rows.items():
        write_csv(out / ARCHIVE / f"{split}.csv", CHEXPERT_COLUMNS, split_rows)
    return f"chexpert:{out / ARCHIVE}"


def prompt_auc(data: str, classifier_run: str) -> dict[str, float]:
    """Per finding: AUC of the real-trained classifier's score between that prompt's images and
    the no-finding prompt's images of a generated set."""
    from sklearn.metrics import roc_auc_score

    from harness.classifier import classifier_from_run, predict
    from harness.data import CachedImages, DataSpec, ImageDataset, load_table
    from harness.data.prompts import NO_FINDING
    from harness.pathologies import FINDINGS

    model = classifier_from_run(classifier_run)
    table = load_table(DataSpec.parse(data), "train", views="all", labels=FINDINGS + [NO_FINDING])
    loader = torch.utils.data.DataLoader(CachedImages(ImageDataset(table, FINDINGS, resolution=64, channels=1)),
                                         batch_size=128)
    scores, _ = predict(model, loader)
    negatives = table[NO_FINDING].to_numpy() == 1.0
    out = {}
    for j, finding in enumerate(FINDINGS):
        positives = table[finding].to_numpy() == 1.0
        if not positives.any() or not negatives.any():  # data prompts may never draw a finding
            out[finding] = float("nan")
            continue
        y = np.r_[np.ones(positives.sum()), np.zeros(negatives.sum())]
        out[finding] = float(roc_auc_score(y, np.r_[scores[positives, j], scores[negatives, j]]))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", default="dreambooth")
    p.add_argument("--oracle", action="store_true", help="the phantom renderer as the generator")
    p.add_argument("--checkpoint", default="", help="generate from this pipeline instead of fine-tuning")
    p.add_argument("--pretrained_model", default="base")
    p.add_argument("--data", default="phantom")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--n_per_prompt", type=int, default=200)
    p.add_argument("--prompts", default="data", choices=["disease", "data"], help="as generate's --prompts")
    p.add_argument("--num_inference_steps", type=int, default=6)  # the pipeline's defaults
    p.add_argument("--guidance_scale", type=float, default=10.0)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--finetune_args", default="", help="extra finetune arguments, space-separated")
    p.add_argument("--keep", default="", help="directory for the runs and data (default: a temporary one)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    import mlflow
    from mlflow.tracking import MlflowClient

    from harness import classify, finetune, generate
    from harness.pretrained import resolve

    pretrained = resolve(a.pretrained_model) if not (a.oracle or a.checkpoint) else a.pretrained_model
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep or tmp).absolute()
        root.mkdir(parents=True, exist_ok=True)
        store = f"sqlite:///{root / 'bench.db'}"  # keep the bench's runs out of the project store
        os.environ["MLFLOW_TRACKING_URI"] = store
        mlflow.set_tracking_uri(store)
        client = MlflowClient()
        threads = ["--threads", str(a.threads)] if a.threads else []
        common = ["--test", a.data, "--epochs", str(a.epochs), "--seed", str(a.seed), "--experiment", "ratio", *threads]
        timings = {}
        t = time.perf_counter()
        real_run = classify.main(["--train", a.data, *common])
        timings["classify_real_s"] = time.perf_counter() - t
        real = client.get_run(real_run).data.metrics["auc_macro"]

        t = time.perf_counter()
        if a.oracle:
            synthetic = oracle_data(root / "oracle", a.n_per_prompt, a.seed, a.prompts, a.data)
        else:
            checkpoint = a.checkpoint
            if not checkpoint:
                run = finetune.main(["--arm", a.arm, "--data", a.data, "--pretrained_model", pretrained,
                                     "--steps", str(a.steps), "--learning_rate", str(a.learning_rate),
                                     "--batch_size", str(a.batch_size), "--seed", str(a.seed),
                                     "--checkpoint_every", str(a.steps), "--output_dir", str(root / a.arm),
                                     "--experiment", "ratio", *a.finetune_args.split()])
                checkpoint = str(root / a.arm / "checkpoints" / f"step_{a.steps:06d}" / "pipeline")
                timings["finetune_s"] = time.perf_counter() - t
                t = time.perf_counter()
            gen = generate.main(["--checkpoint", checkpoint, "--n_per_prompt", str(a.n_per_prompt),
                                 "--prompts", a.prompts, "--prompt_data", a.data,
                                 "--num_inference_steps", str(a.num_inference_steps),
                                 "--guidance_scale", str(a.guidance_scale), "--seed", str(a.seed),
                                 "--output_dir", str(root / "generated"), "--experiment", "ratio", *threads])
            synthetic = client.get_run(gen).data.tags["harness.generated_data"]
        timings["generate_s"] = time.perf_counter() - t
        prompts = prompt_auc(synthetic, real_run)
        t = time.perf_counter()
        synth_run = classify.main(["--train", synthetic, *common])
        timings["classify_synthetic_s"] = time.perf_counter() - t
        metrics = client.get_run(synth_run).data.metrics
    result = {"source": "oracle" if a.oracle else (a.checkpoint or a.arm), "prompts": a.prompts,
              "n_per_prompt": a.n_per_prompt,
              "real_macro_auc": real, "synthetic_macro_auc": metrics["auc_macro"],
              "ratio": metrics["auc_macro"] / real,
              "synthetic_auc": {k[4:]: v for k, v in metrics.items()
                                if k.startswith("auc_") and not k.endswith(("_high", "_low")) and k != "auc_macro"},
              "prompt_auc": prompts, "prompt_auc_mean": float(np.nanmean(list(prompts.values()))), **timings}
    print(json.dumps(result, indent=2))
    print(f"synthetic/real macro AUC: {result['synthetic_macro_auc']:.3f} / {real:.3f} = {result['ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
