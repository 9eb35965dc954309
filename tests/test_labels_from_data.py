"""Labels come from the data (issue 13 §5): a 2-label ``folder:`` set that is no chest X-ray
(fundus-style RG / NRG, no views) goes through finetune -> generate -> classify -> register ->
report on the tiny pipeline, and every step names its labels, none of the five findings."""

from __future__ import annotations

import csv

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from harness import classify, finetune, generate
from harness.data import DataSpec, load_table
from harness.pathologies import FINDINGS

LABELS = ["RG", "NRG"]  # the write-up's fundus labels: referable glaucoma or not, one-hot
TEMPLATE = "a fundus photograph showing {findings}"


pytestmark = pytest.mark.usefixtures("one_thread")


def fundus_folder(root, n_train: int = 12, n_test: int = 8, size: int = 32):
    """``root/labels.csv`` (path, split, RG, NRG; no view column) and drawn images: a disc on a
    dark field, large for RG, small for NRG, with noise."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_train + n_test):
        rg = i % 2 == 0
        image = Image.new("L", (size, size), 20)
        r = size * (0.35 if rg else 0.15)
        cx, cy = size / 2 + rng.uniform(-3, 3), size / 2 + rng.uniform(-3, 3)
        ImageDraw.Draw(image).ellipse([cx - r, cy - r, cx + r, cy + r], fill=200)
        noisy = np.clip(np.asarray(image, np.float32) + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(root / "images" / f"{i:03d}.png")
        rows.append({"path": f"images/{i:03d}.png", "split": "train" if i < n_train else "test",
                     "RG": int(rg), "NRG": int(not rg)})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return f"folder:{root}"


@pytest.mark.slow
def test_a_two_label_folder_set_goes_end_to_end(mlflow_store, tiny_pipeline_dir, tmp_path):
    from harness import register
    from harness import report

    real = fundus_folder(tmp_path / "fundus")
    assert load_table(real, "train", views="all").attrs["labels"] == LABELS

    # finetune: the data's labels and prompts, no views
    tuned = finetune.main(["--data", real, "--pretrained_model", str(tiny_pipeline_dir), "--steps", "2",
                           "--batch_size", "4", "--checkpoint_every", "2", "--grid_steps", "2", "--grid_seeds", "1",
                           "--log_every", "2", "--views", "all", "--template", TEMPLATE,
                           "--output_dir", str(tmp_path / "ft")], arm="dreambooth")

    # generate: labelled with RG / NRG in the folder layout, prompted with the fine-tune's template
    out = tmp_path / "gen"
    gen = generate.main(["--run_id", tuned, "--n_per_prompt", "4", "--batch_size", "8", "--num_inference_steps", "2",
                         "--output_dir", str(out)])
    spec = generate.generated_spec(gen)
    assert spec == f"folder:runs:/{gen}/{generate.DATA_ARTIFACT}"
    assert MlflowClient().get_run(gen).data.tags[generate.GENERATED_DATA_TAG] == f"folder:{out}"
    with open(out / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "split", *LABELS]  # no view column: the data has none
    assert len(rows) == 2 * 4 and {r["split"] for r in rows} == {"train", "valid"}
    for split in ("train", "valid"):
        table = load_table(DataSpec.parse(f"folder:{out}"), split, views="all")
        assert table.attrs["labels"] == LABELS
        assert (table[LABELS].sum(axis=1) == 1).all()  # one-hot, as the data: no "no finding" images
    with open(out / "prompts.csv") as fh:
        prompts = {row["labels"]: row["prompt"] for row in csv.DictReader(fh)}
    assert prompts == {"RG": "a fundus photograph showing rg", "NRG": "a fundus photograph showing nrg"}
    assert generate.generated_source(f"folder:{out}")["generate_run"] == gen

    # classify: trained on the generated set (read by URI), tested on the real one
    judged = classify.main(["--train", spec, "--test", real, "--views", "all", "--model", "small_cnn",
                            "--epochs", "1", "--resolution", "32", "--n_resamples", "20", "--threads", "1"])
    run = MlflowClient().get_run(judged)
    assert {"auc_rg", "auc_nrg", "auc_macro"} <= set(run.data.metrics)
    assert not any(k.startswith(f"auc_{f.lower()}") for k in run.data.metrics for f in FINDINGS)
    assert run.data.tags["harness.generate_run"] == gen and run.data.tags["harness.arm"] == "dreambooth"

    # register: the version carries the labels' figures
    version = register.main(["--finetune_run", tuned, "--step", "2", "--classify_run", judged,
                             "--generate_run", gen])
    assert {"auc_rg", "auc_nrg", "auc_rg_ci_low", "acc_rg", "bal_acc_nrg"} <= set(version.tags)
    assert float(version.tags["auc_rg"]) == pytest.approx(run.data.metrics["auc_rg"])

    # report: its table's label columns are the data's
    result = report.main(["--name", version.name, "--output_dir", str(tmp_path / "reports"), "--log", "false"])
    table = pd.read_csv(tmp_path / "reports" / f"{version.name}_auc.csv", index_col=0)
    assert report.table_labels(table) == LABELS
    assert table.loc["dreambooth @ 2", "RG"] == pytest.approx(run.data.metrics["auc_rg"])
    header = next(l for l in result["markdown"].read_text().splitlines() if "macro AUC" in l and l.startswith("|"))
    assert [c.strip() for c in header.split("|")][2:4] == LABELS


def test_chexpert_labels_keep_the_chexpert_layout_and_the_five_findings():
    data = generate.DataLabels("phantom", list(FINDINGS))
    assert data.layout == "chexpert" and data.written_labels() == FINDINGS + ["No Finding"]
    assert generate.DataLabels("folder:/x", LABELS, has_views=False).layout == "folder"
    args = generate.parse_args(["--checkpoint", "base"])
    assert list(generate.finding_prompts(data, args)) == FINDINGS + ["No Finding"]


def test_data_without_views_needs_a_template_without_view():
    args = generate.parse_args(["--checkpoint", "base"])
    with pytest.raises(ValueError, match="has no views; pass a --template"):
        generate.finding_prompts(generate.DataLabels("folder:/x", LABELS, has_views=False, no_finding=False), args)
    args = generate.parse_args(["--checkpoint", "base", "--template", TEMPLATE,
                                "--no_finding_template", "a healthy fundus photograph"])
    prompts = generate.finding_prompts(generate.DataLabels("folder:/x", LABELS, has_views=False), args)
    assert prompts == {"RG": "a fundus photograph showing rg", "NRG": "a fundus photograph showing nrg",
                       "No Finding": "a healthy fundus photograph"}


def test_adherence_ceiling_is_nan_for_labels_the_phantom_cannot_draw(tiny_phantom, monkeypatch):
    """Prompt adherence of labels the phantom renderer cannot draw: no ceiling (and no crash)."""
    from harness import checks

    table = pd.DataFrame({"view": ["frontal"] * 4, "RG": [1.0, 0.0, 1.0, 0.0], "Edema": [1.0, 1.0, 0.0, 0.0]})
    scores = {"RG": 0.75, "Edema": 0.6}
    monkeypatch.setattr(checks, "prompt_adherence", lambda model, table, images=None: dict(scores))
    monkeypatch.setattr(checks, "phantom_renders", lambda *a, **k: None)
    monkeypatch.setattr(checks, "_trained_resolution", lambda model: 32)
    adherence, ceiling = checks.adherence_and_ceiling(None, table, f"chexpert:{tiny_phantom}")
    assert adherence == scores and ceiling["Edema"] == 0.6 and np.isnan(ceiling["RG"])
    scores.pop("Edema")
    assert checks.adherence_and_ceiling(None, table, f"chexpert:{tiny_phantom}")[1] is None
    assert "draws none of the labels" in checks._no_ceiling(f"chexpert:{tiny_phantom}", ["RG"])


def test_generated_table_of_a_folder_set_reads_its_splits(tmp_path):
    from harness import checks

    real = fundus_folder(tmp_path / "fundus", n_train=4, n_test=2)
    table = checks.generated_table(real, LABELS)
    assert len(table) == 6 and table.attrs["splits"] == ["train", "test"]


def test_finetune_prompts_images_without_a_positive_label_by_its_no_finding_template(mlflow_store, tiny_pipeline_dir,
                                                                                    tmp_path):
    real = fundus_folder(tmp_path / "fundus")
    labels = tmp_path / "fundus" / "labels.csv"
    table = pd.read_csv(labels)
    table.loc[:3, LABELS] = 0  # four images with neither label
    table.to_csv(labels, index=False)
    argv = ["--data", real, "--pretrained_model", str(tiny_pipeline_dir), "--steps", "1", "--batch_size", "4",
            "--checkpoint_every", "1", "--grid_steps", "1", "--grid_seeds", "1", "--views", "all",
            "--template", TEMPLATE]
    with pytest.raises(ValueError, match="no view but prompt template"):  # the chest X-ray one names a view
        finetune.main([*argv, "--output_dir", str(tmp_path / "a")], arm="dreambooth")
    run_id = finetune.main([*argv, "--no_finding_template", "a normal fundus photograph",
                            "--output_dir", str(tmp_path / "b")], arm="dreambooth")
    prompts = mlflow.artifacts.load_dict(f"runs:/{run_id}/grids/prompts.json")["prompts"]
    assert prompts["No Finding"] == "a normal fundus photograph" and prompts["RG"] == "a fundus photograph showing rg"
