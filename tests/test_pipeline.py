"""The pipeline entry point on a tiny budget: every step runs, the table comes out, each judged
checkpoint is registered, a re-run reuses, and the report shows what MLflow holds."""

from __future__ import annotations

import math
import os

import pytest

from mlflow.tracking import MlflowClient

import pandas as pd

from harness import classify, pipeline, report
from harness.classify import snake
from harness.pathologies import FINDINGS
from registry.register import model_name


def _runs():
    client = MlflowClient()
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_pipeline_runs_every_step_then_reuses_them(mlflow_store, tiny_phantom, tiny_pipeline_dir):
    argv = ["--data", f"chexpert:{tiny_phantom}", "--pretrained_model", str(tiny_pipeline_dir),
            "--arms", "dreambooth,text_encoder", "--steps", "2", "--eval_steps", "1,2", "--n_per_prompt", "3",
            "--num_inference_steps", "2", "--epochs", "1", "--batch_size", "4"]
    table = pipeline.main([*argv, "--jobs", "2"])
    assert list(table.index) == ["real images", "dreambooth @ 1", "dreambooth @ 2", "text_encoder @ 1",
                                 "text_encoder @ 2"]
    assert list(table.columns) == FINDINGS + ["macro AUC", "accuracy", "balanced accuracy", "frontal fraction",
                                              "memorized fraction", "Frechet distance", "prompt adherence",
                                              "adherence ceiling"]
    assert table.loc["dreambooth @ 2", "frontal fraction"] >= 0
    runs = _runs()
    # 1 pipeline + 1 real classify + 2 arms x (1 finetune + 2 x (generate + classify + checks))
    assert len(runs) == 1 + 1 + 2 * 7 and {r.info.status for r in runs} == {"FINISHED"}
    parent = next(r for r in runs if r.data.tags.get("harness.entry_point") == "pipeline")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 15
    # --jobs 2: the steps ran in two worker processes, not in this one
    assert len({r.data.tags["harness.pid"] for r in children}) == 2
    assert str(os.getpid()) not in {r.data.tags["harness.pid"] for r in children}
    baseline = next(r for r in children if r.data.params.get("train") == f"chexpert:{tiny_phantom}")
    assert math.isclose(table.loc["real images", "macro AUC"], baseline.data.metrics["auc_macro"], rel_tol=1e-9) \
        or math.isnan(baseline.data.metrics["auc_macro"])

    again = pipeline.main([*argv, "--jobs", "1"])  # same parameters, code and data: nothing is recomputed
    assert len(_runs()) == len(runs) + 1
    assert again.equals(table)

    # Registry: one version per judged checkpoint, tagged with its runs and figures.
    client = MlflowClient()
    name = model_name(f"chexpert:{tiny_phantom}")
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted((v.tags["arm"], v.tags["step"]) for v in versions) == [
        ("dreambooth", "1"), ("dreambooth", "2"), ("text_encoder", "1"), ("text_encoder", "2")]
    for v in versions:
        judged = client.get_run(v.tags["classify_run_id"]).data.metrics
        assert v.tags["auc_macro"] == repr(judged["auc_macro"])
        assert client.get_run(v.tags["checks_run_id"]).data.metrics["view_frontal_fraction"] == \
            float(v.tags["view_frontal_fraction"])

    # The arms compared on the same test images: dreambooth - text_encoder at each judged step.
    classify_runs = {(v.tags["arm"], int(v.tags["step"])): v.tags["classify_run_id"] for v in versions}
    differences = {}
    for step in (1, 2):
        differences[step] = classify.macro_auc_difference(classify_runs["dreambooth", step],
                                                          classify_runs["text_encoder", step])
        metric = f"macro_auc_diff_dreambooth_minus_text_encoder_{step}"
        logged = [parent.data.metrics[f"{metric}{suffix}"] for suffix in ("", "_ci_low", "_ci_high")]
        assert all(_same(x, y) for x, y in zip(logged, differences[step]))
    assert "arm_differences.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # Report: the table holds the logged values; every plot is a non-empty PNG; it is logged too.
    result = report.main(["--output_dir", "reports"])
    auc = pd.read_csv(f"reports/{name}_auc.csv", index_col=0)
    assert list(auc.index) == list(table.index)
    for v in versions:
        judged = client.get_run(v.tags["classify_run_id"]).data.metrics
        row = f"{v.tags['arm']} @ {v.tags['step']}"
        for label in FINDINGS:
            assert _same(auc.at[row, label], judged[f"auc_{snake(label)}"])
        assert _same(auc.at[row, "macro AUC"], judged["auc_macro"])
    assert _same(auc.at["real images", "macro AUC"], baseline.data.metrics["auc_macro"])
    assert list(auc.columns[-2:]) == ["accuracy", "balanced accuracy"]
    diffs = pd.read_csv(f"reports/{name}_arm_differences.csv", index_col=0)
    for step in (1, 2):
        assert _same(diffs.at[f"dreambooth - text_encoder @ {step}", "macro AUC difference"], differences[step][0])
    checks_csv = pd.read_csv(f"reports/{name}_checks.csv", index_col=0)
    assert {"prompt adherence", "adherence ceiling"} <= set(checks_csv.columns)
    pngs = [p for p in result["files"] if str(p).endswith(".png")]
    assert len(pngs) == 3 + 4 and all(p.stat().st_size > 1000 for p in pngs)  # 3 plots + 4 sample grids
    html = result["html"].read_text()
    assert html.count("data:image/png;base64,") == 7 and "champion" in html
    logged = [r for r in _runs() if r.data.tags.get("harness.entry_point") == "report"]
    assert len(logged) == 1 and logged[0].info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(logged[0].info.run_id, "report")}
    assert {"report/report.md", "report/report.html", f"report/{name}_auc.csv"} <= artifacts


def test_a_step_failing_in_a_worker_fails_the_pipeline_and_leaves_no_run_running(mlflow_store, tiny_phantom,
                                                                                 tmp_path):
    argv = ["--data", f"chexpert:{tiny_phantom}", "--pretrained_model", str(tmp_path / "no-such-model"),
            "--arms", "dreambooth", "--steps", "1", "--eval_steps", "1", "--n_per_prompt", "1", "--epochs", "1",
            "--jobs", "2"]
    with pytest.raises(ValueError, match="could not load pretrained_model"):
        pipeline.main(argv)
    runs = _runs()
    assert {r.info.status for r in runs} <= {"FAILED", "FINISHED"}
    parent = next(r for r in runs if r.data.tags.get("harness.entry_point") == "pipeline")
    assert parent.info.status == "FAILED" and "could not load pretrained_model" in parent.data.tags["harness.error"]
    assert not MlflowClient().search_registered_models()  # nothing registered


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9)
