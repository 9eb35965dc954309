"""The study's quality number for one arm, end to end: synthetic-trained / real-trained macro AUC.

Fine-tunes one arm from the base, generates images with generate's ``--prompts`` (``data``: 6 x
``n_per_prompt`` images prompted with real label sets; ``disease``: ``n_per_prompt`` per disease
prompt + no finding), trains the classify step's classifier on them and on the real train split,
and scores both on the real test split. Also prints the generated set's prompt adherence (the
REAL-trained classifier's per-finding AUC on the generated images against their prompts' labels,
``harness.checks.prompt_adherence``; 0.5 = the prompt changes nothing that classifier sees) and its
ceiling (the same figure for the phantom renderer drawing the same prompts), which need no second
classifier; CPU minutes; and with ``--compare DIR`` (an earlier ``--keep`` directory) the paired
bootstrap CI of the macro-AUC difference on the same real test images.

``--oracle`` replaces fine-tuning + generation by the phantom renderer itself drawing new patients
for each prompt: a perfect generator. Its ratio is the ceiling that the prompts, their number and
the classifier budget put on every arm, whatever the model (measured figures: README).

    python -m bench.synthetic_ratio --arm dreambooth --steps 600 --n_per_prompt 200
    python -m bench.synthetic_ratio --oracle --n_per_prompt 200 [--prompts disease]
    python -m bench.synthetic_ratio --checkpoint outputs/dreambooth-.../checkpoints/step_000600/pipeline

Runs go to a temporary MLflow store unless ``--keep`` names a directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from registry.pyfunc import DEFAULT_GUIDANCE


def oracle_data(out: Path, n_per_prompt: int, seed: int, prompts: str = "disease", data: str = "phantom") -> str:
    """A CheXpert-layout set drawn by the phantom renderer for generate's prompts (same label
    sets, splits and sizes as ``generate --prompts <prompts>`` would make)."""
    from PIL import Image

    from harness import generate
    from harness.data.layout import write_csv
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
    return f"chexpert:{out / ARCHIVE}?holdout=0"  # its valid.csv is the generated valid split, as generate writes it


def adherence(data: str, classifier_run: str, real: str, seed: int = 0) -> tuple[dict, dict]:
    """Prompt adherence of a generated set under the real-trained classifier (``harness.checks``),
    and the same figure for the phantom renderer drawing the same prompts (the ceiling)."""
    from harness.checks import adherence_and_ceiling, classifier_labels, generated_table
    from harness.classify import classifier_from_run

    model = classifier_from_run(classifier_run)
    adherence, ceiling = adherence_and_ceiling(model, generated_table(data, classifier_labels(model)), real, seed)
    return adherence, ceiling or {}


def cpu_minutes() -> float:
    """CPU time of this process and its finished children (user + system), in minutes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime) / 60


def compare(predictions, earlier: Path) -> dict:
    """Macro AUC of these synthetic-trained predictions minus an earlier bench run's, paired on the
    same real test images, with its bootstrap CI."""
    import pandas as pd

    from harness.compare import PREDICTIONS
    from harness.evaluate import paired_macro_difference

    other = pd.read_csv(earlier / PREDICTIONS).set_index("path").loc[predictions["path"]]
    names = [c.removeprefix("score_") for c in predictions.columns if c.startswith("score_")]
    targets = predictions[[f"target_{n}" for n in names]].to_numpy(dtype=np.float64)
    if not np.array_equal(targets, other[[f"target_{n}" for n in names]].to_numpy(dtype=np.float64), equal_nan=True):
        raise ValueError(f"{earlier} was scored on other test targets: not comparable")
    diff, low, high = paired_macro_difference(targets, predictions[[f"score_{n}" for n in names]].to_numpy(np.float64),
                                              other[[f"score_{n}" for n in names]].to_numpy(np.float64), names)
    return {"against": str(earlier), "macro_auc_diff": diff, "ci_low": low, "ci_high": high}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", default="dreambooth")
    p.add_argument("--oracle", action="store_true", help="the phantom renderer as the generator")
    p.add_argument("--checkpoint", default="", help="generate from this pipeline instead of fine-tuning")
    p.add_argument("--pretrained_model", default="base")
    p.add_argument("--data", default="phantom")
    p.add_argument("--steps", type=int, default=1200)  # the pipeline's defaults
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--n_per_prompt", type=int, default=200)
    p.add_argument("--prompts", default="data", choices=["disease", "data"], help="as generate's --prompts")
    p.add_argument("--num_inference_steps", type=int, default=6)  # the pipeline's defaults
    p.add_argument("--guidance_scale", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--finetune_args", default="", help="extra finetune arguments, space-separated")
    p.add_argument("--generate_args", default="", help="extra generate arguments, space-separated")
    p.add_argument("--keep", default="", help="directory for the runs and data (default: a temporary one)")
    p.add_argument("--compare", default="",
                   help="a --keep directory of an earlier run: the paired bootstrap CI of the macro-AUC difference "
                        "(this - that) on the same real test images")
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
                                 "--output_dir", str(root / "generated"), "--experiment", "ratio", *threads,
                                 *a.generate_args.split()])
            synthetic = client.get_run(gen).data.tags["harness.generated_data"]
        timings["generate_s"] = time.perf_counter() - t
        prompts, ceiling = adherence(synthetic, real_run, a.data, a.seed)
        t = time.perf_counter()
        synth_run = classify.main(["--train", synthetic, *common])
        timings["classify_synthetic_s"] = time.perf_counter() - t
        metrics = client.get_run(synth_run).data.metrics
        from harness.compare import PREDICTIONS, load_predictions

        predictions = load_predictions(synth_run)
        if a.keep:  # what a later --compare pairs with
            predictions.to_csv(root / PREDICTIONS, index=False)
    result = {"source": "oracle" if a.oracle else (a.checkpoint or a.arm), "prompts": a.prompts,
              "n_per_prompt": a.n_per_prompt,
              "real_macro_auc": real, "synthetic_macro_auc": metrics["auc_macro"],
              "ratio": metrics["auc_macro"] / real,
              "synthetic_auc": {k[4:]: v for k, v in metrics.items()
                                if k.startswith("auc_") and not k.endswith(("_high", "_low")) and k != "auc_macro"},
              "adherence": prompts, "adherence_mean": float(np.nanmean(list(prompts.values()))),
              "adherence_ceiling_mean": float(np.nanmean(list(ceiling.values()))) if ceiling else float("nan"),
              **timings,
              "cpu_minutes": cpu_minutes()}
    if a.compare:
        result["vs_compare"] = compare(predictions, Path(a.compare))
    if a.keep:
        (Path(a.keep) / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"synthetic/real macro AUC: {result['synthetic_macro_auc']:.3f} / {real:.3f} = {result['ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
