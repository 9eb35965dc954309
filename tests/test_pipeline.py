"""The pipeline entry point on a tiny budget: every step runs, the table comes out, a re-run reuses."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from harness import pipeline
from harness.pathologies import FINDINGS


def _runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_pipeline_runs_every_step_then_reuses_them(mlflow_store, tiny_phantom, tiny_pipeline_dir):
    argv = ["--data", f"chexpert:{tiny_phantom}", "--pretrained_model", str(tiny_pipeline_dir),
            "--arms", "dreambooth,text_encoder", "--steps", "2", "--eval_steps", "1,2", "--n_per_prompt", "3",
            "--num_inference_steps", "2", "--epochs", "1", "--batch_size", "4"]
    table = pipeline.main(argv)
    assert list(table.index) == ["real images", "dreambooth @ 1", "dreambooth @ 2", "text_encoder @ 1",
                                 "text_encoder @ 2"]
    assert list(table.columns) == FINDINGS + ["macro AUC", "accuracy", "frontal fraction", "memorized fraction",
                                              "Frechet distance"]
    assert table.loc["dreambooth @ 2", "frontal fraction"] >= 0
    runs = _runs()
    # 1 pipeline + 1 real classify + 2 arms x (1 finetune + 2 x (generate + classify + checks))
    assert len(runs) == 1 + 1 + 2 * 7 and {r.info.status for r in runs} == {"FINISHED"}
    parent = next(r for r in runs if r.data.tags.get("harness.entry_point") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 15
    baseline = next(r for r in children if r.data.params.get("train") == f"chexpert:{tiny_phantom}")
    assert math.isclose(table.loc["real images", "macro AUC"], baseline.data.metrics["auc_macro"], rel_tol=1e-9) \
        or math.isnan(baseline.data.metrics["auc_macro"])

    again = pipeline.main(argv)  # identical parameters, code and data: nothing is recomputed
    assert len(_runs()) == len(runs) + 1
    assert again.equals(table)
