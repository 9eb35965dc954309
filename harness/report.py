"""The study's report, built from the MLflow registry and runs alone.

    python -m harness.report                      # every cxr-sd-* registered model -> reports/
    mlflow run . -e report --env-manager local
    MLFLOW_TRACKING_URI=http://server:5000 python -m harness.report   # from a laptop

It trains nothing and loads no weights: the figures are the tags of the registered versions
(``registry.register``), the metrics of the runs behind them and their logged images; the one it
computes, the arms' paired macro-AUC differences, comes from their classify runs' logged
predictions (a bootstrap, seconds). It writes to
``reports/`` (Markdown, HTML with the plots embedded, CSV) and logs the same files as the artifacts
of a ``report`` run:

- the write-up's table: real images and each arm x checkpoint; per-disease AUC [95% CI], macro
  AUC, accuracy and balanced accuracy, the best value per column in bold;
- the first arm's macro AUC minus each other arm's at the same step, paired on the same test
  images, with its 95% bootstrap CI;
- the checks the write-up did by eye (view fraction, memorization, Frechet distance) and prompt
  adherence with its phantom ceiling, with the training time and throughput;
- the champion and its promotion history;
- plots: per-disease AUC bars with CIs, macro AUC against steps per arm, loss curves, sample grids;
- for each Optuna study (``harness.tune``): its trials with their parameters, validation AUC and
  state, the best trial and its test AUC, and AUC against learning rate and against steps.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from harness import tracking  # noqa: E402
from harness.config import StepConfig, param, parse  # noqa: E402
from harness.compare import difference_table  # noqa: E402
from harness.metrics import CHECK_COLUMNS, SUMMARY_COLUMNS, checks_row, classify_row  # noqa: E402
from harness.pathologies import FINDINGS  # noqa: E402
from registry.promote import ALIAS, history  # noqa: E402
from registry.register import MODEL_PREFIX, value  # noqa: E402

REAL = "real images"
DIFFERENCES_TITLE = "Macro AUC differences between arms (paired on the same test images, 95% bootstrap CI)"
ARM_ORDER = ("dreambooth", "text_encoder", "unet_text_encoder")


@dataclass
class ReportConfig(StepConfig):
    name: str = param("", f"registered model(s), comma-separated (default: every {MODEL_PREFIX}-*)", project=True)
    output_dir: str = param("reports", project=True, key=False)
    log: bool = param(True, "also log the report as the artifacts of a 'report' run", key=False)
    screenshot: str = param("", "also render report.html to this PNG with headless Chromium", key=False)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)


def parse_args(argv=None) -> ReportConfig:
    return parse(ReportConfig, argv, prog="python -m harness.report")


# ------------------------------------------------------------------------------------ collect
def model_names(client: MlflowClient, names: str) -> list[str]:
    if names:
        return [n.strip() for n in names.split(",") if n.strip()]
    return sorted(m.name for m in client.search_registered_models()
                  if m.tags.get("harness.kind") == "synthetic-data-generator")


def collect(client: MlflowClient, name: str) -> dict:
    """One registered model's versions (newest per arm x step) and the real baseline behind them."""
    latest: dict[tuple[str, int], object] = {}
    for v in client.search_model_versions(f"name = '{name}'"):
        if value(v, "auc_macro") is None and "classify_run_id" not in v.tags:
            continue  # registered by hand, never evaluated
        key = (v.tags.get("arm", "?"), int(v.tags.get("step", -1)))
        if key not in latest or int(v.version) > int(latest[key].version):
            latest[key] = v
    order = {arm: i for i, arm in enumerate(ARM_ORDER)}
    versions = [latest[k] for k in sorted(latest, key=lambda k: (order.get(k[0], len(order)), k[0], k[1]))]
    labels = {str(v.version): _label(v) for v in versions}
    try:
        holder = client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        holder = None
    champion = str(holder.version) if holder is not None else None
    if holder is not None and champion not in labels:  # an older run of the same arm @ step kept the alias
        at = next((i + 1 for i, v in enumerate(versions) if _label(v) == _label(holder)), len(versions))
        versions.insert(at, holder)
        labels[champion] = f"{_label(holder)} (v{champion}, champion)"
    baselines = {}
    for v in versions:
        run = _run(client, v.tags.get("classify_run_id"))
        if run is not None and run.data.params.get("baseline_run"):
            baselines.setdefault(run.data.params["baseline_run"], 0)
            baselines[run.data.params["baseline_run"]] += 1
    baseline = _run(client, max(baselines, key=baselines.get)) if baselines else None
    runs = [baseline] + [_run(client, v.tags.get("classify_run_id")) for v in versions]
    # the data's labels, as classify logged them (any data set: not only the five findings)
    findings = next((json.loads(r.data.params["label_names"]) for r in runs
                     if r is not None and "label_names" in r.data.params), FINDINGS)
    return {"name": name, "versions": versions, "labels": labels, "baseline": baseline, "findings": findings,
            "champion": champion, "history": history(name, client=client)}


def _run(client: MlflowClient, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _label(v) -> str:
    return f"{v.tags.get('arm', '?')} @ {v.tags.get('step', '?')}"


def auc_table(model: dict) -> pd.DataFrame:
    """Numbers of the write-up's table: per-disease AUC with CI bounds, macro AUC, accuracy,
    balanced accuracy."""
    rows = {}
    if model["baseline"] is not None:
        rows[REAL] = classify_row(model["baseline"].data.metrics.get, model["findings"], cis=True)
    for v in model["versions"]:
        rows[model["labels"][str(v.version)]] = classify_row(lambda k, v=v: value(v, k), model["findings"], cis=True)
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "training data"
    return table


def table_labels(table: pd.DataFrame) -> list[str]:
    """The labels of an ``auc_table``: the columns that have CI columns."""
    return [c[: -len("_ci_low")] for c in table.columns if c.endswith("_ci_low")]


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def arm_differences(model: dict) -> pd.DataFrame:
    """The first arm's macro AUC minus each other arm's at each step both have a version, paired
    on the same test images (``harness.compare.difference_table`` of their classify runs, seed 0 as the
    pipeline's default)."""
    at = {}
    for v in model["versions"]:  # the newest version of an arm @ step comes first
        at.setdefault((v.tags.get("arm", "?"), v.tags.get("step", "?")), v)
    first = next(iter(at), ("?", "?"))[0]
    pairs = {f"{first} - {arm} @ {step}": (at[(first, step)].tags["classify_run_id"], v.tags["classify_run_id"])
             for (arm, step), v in at.items()
             if arm != first and (first, step) in at  # registered by hand: maybe no classify run
             and "classify_run_id" in v.tags and "classify_run_id" in at[(first, step)].tags}
    return difference_table(pairs, skip_incomparable=True)


def checks_table(client: MlflowClient, model: dict) -> pd.DataFrame:
    rows = {}
    for v in model["versions"]:
        row = checks_row(lambda k, v=v: value(v, k))
        run = _run(client, v.tags.get("finetune_run_id"))
        if run is not None and run.info.end_time:
            row["training time (s)"] = (run.info.end_time - run.info.start_time) / 1000
            row["throughput (img/s)"] = _num(run.data.metrics.get("throughput_images_per_s"))
        rows[model["labels"][str(v.version)]] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "training data"
    return table


def history_table(model: dict) -> pd.DataFrame:
    table = pd.DataFrame(model["history"])
    if not table.empty:
        table["champion now"] = table["version"] == model["champion"]
    return table


def tuning_tables(experiment_ids: list[str]) -> dict[str, dict]:
    """Per Optuna study (``harness.tune``): its trials (params, validation AUC, state) and the
    figures its workers' study runs logged. From ``mlflow.search_runs`` DataFrames."""
    runs = mlflow.search_runs(experiment_ids, "tags.`harness.tune.study` != ''", output_format="pandas")
    if runs.empty:
        return {}
    studies = {}
    for name, group in runs.groupby("tags.harness.tune.study"):
        trials = group[group["tags.harness.tune.trial"].notna()] if "tags.harness.tune.trial" in group \
            else group.iloc[0:0]
        table = pd.DataFrame({
            "trial": pd.to_numeric(trials["tags.harness.tune.trial"]).astype(int),
            "learning_rate": pd.to_numeric(trials.get("params.learning_rate")),
            "steps": pd.to_numeric(trials.get("params.steps")),
            "valid macro AUC": trials.get("metrics.valid_auc_macro"),
            "prompt adherence": trials.get("metrics.adherence_mean"),  # the value with --objective adherence
            # Optuna's state where its callback recorded one, else how the trial's run ended.
            "state": trials.get("tags.state", pd.Series(index=trials.index, dtype=str)).fillna(trials["status"]),
            "run": trials["run_id"].str[:8],
        }).sort_values("trial").reset_index(drop=True) if not trials.empty else pd.DataFrame()
        if "prompt adherence" in table and table["prompt adherence"].isna().all():
            table = table.drop(columns="prompt adherence")  # a study of the default objective
        workers = group[group["tags.harness.entry_point"] == "tune"] if "tags.harness.entry_point" in group \
            else group.iloc[0:0]
        latest = workers.sort_values("start_time").iloc[-1] if not workers.empty else None
        summary = {}
        if latest is not None:
            for key in ("metrics.best_valid_auc_macro", "metrics.best_adherence_mean", "metrics.test_auc_macro", "params.best_learning_rate",
                        "params.best_steps", "params.best_trial", "tags.harness.tune.registered"):
                if key in latest and pd.notna(latest[key]):
                    summary[key.split(".", 1)[1].replace("harness.tune.", "")] = latest[key]
            summary["workers"] = len(workers)
            summary["trials per hour (sum over workers)"] = workers.get("metrics.trials_per_hour",
                                                                        pd.Series(dtype=float)).sum()
            summary["pruning saved (s)"] = latest.get("metrics.pruning_saved_seconds", math.nan)
        studies[name] = {"trials": table, "summary": summary}
    return studies


TUNING_VALUES = {"valid macro AUC": "macro AUC on the real valid split",
                 "prompt adherence": "mean prompt adherence"}  # a study's objective -> axis label


def plot_tuning(trials: pd.DataFrame, path: Path, column: str = "valid macro AUC") -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for state, group in trials.groupby("state"):
        axes[0].scatter(group["learning_rate"], group[column], label=state)
        axes[1].scatter(group["steps"], group[column], label=state)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("learning rate")
    axes[1].set_xlabel("fine-tuning steps")
    axes[0].set_ylabel(TUNING_VALUES[column])
    axes[1].legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------------------------ format
def _bold_best(values: pd.Series, lower_is_better: bool = False) -> pd.Series:
    """True where a value is the column's best (ties all marked; nan never)."""
    finite = values.dropna()
    if finite.empty:
        return pd.Series(False, index=values.index)
    best = finite.min() if lower_is_better else finite.max()
    return values == best


def display_auc(table: pd.DataFrame, bold) -> pd.DataFrame:
    """'0.812 [0.751, 0.866]' cells; ``bold(text)`` marks the best per column."""
    out = pd.DataFrame(index=table.index)
    findings = table_labels(table)
    for column in findings + list(SUMMARY_COLUMNS):
        best = _bold_best(table[column])
        cells = []
        for row in table.index:
            text = _fmt(table.at[row, column])
            if column in findings and not math.isnan(table.at[row, f"{column}_ci_low"]):
                text += f" [{_fmt(table.at[row, f'{column}_ci_low'])}, {_fmt(table.at[row, f'{column}_ci_high'])}]"
            cells.append(bold(text) if best[row] else text)
        out[column] = cells
    return out


def display_checks(table: pd.DataFrame, bold) -> pd.DataFrame:
    out = pd.DataFrame(index=table.index)
    lower = {column: low for column, (_, low) in CHECK_COLUMNS.items()}
    for column in table.columns:
        best = _bold_best(table[column], lower.get(column, False)) if column in lower else \
            pd.Series(False, index=table.index)
        spec = ".1f" if column.startswith(("training", "throughput")) else ".3g" if "distance" in column else ".3f"
        out[column] = [bold(_fmt(x, spec)) if best[r] else _fmt(x, spec) for r, x in table[column].items()]
    return out


def _fmt(x, spec: str = ".3f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# ------------------------------------------------------------------------------------- plots
def plot_auc_bars(table: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(10, 4.5))
    findings = table_labels(table)
    columns = findings + ["macro AUC"]
    width = 0.8 / max(len(table), 1)
    for i, (row, r) in enumerate(table.iterrows()):
        xs = [j + (i - (len(table) - 1) / 2) * width for j in range(len(columns))]
        ys = [r[c] for c in columns]
        low = [r[c] - r[f"{c}_ci_low"] if c in findings else 0 for c in columns]
        high = [r[f"{c}_ci_high"] - r[c] if c in findings else 0 for c in columns]
        ax.bar(xs, ys, width, label=row, yerr=[_nan0(low), _nan0(high)], capsize=2)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(columns)), columns, rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUC on the real test split")
    ax.set_title("Per-disease AUC of classifiers trained on each data source (95% bootstrap CI)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return _save(fig, path)


def _nan0(xs):
    return [0 if (x is None or math.isnan(x)) else max(x, 0) for x in xs]


def plot_auc_vs_steps(table: pd.DataFrame, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    arms = {}
    for row in table.index:
        if row != REAL:
            arm, step = row.split(" @ ")
            arms.setdefault(arm, []).append((int(step.split()[0]), table.at[row, "macro AUC"]))
    for arm, points in arms.items():
        points.sort()
        ax.plot([s for s, _ in points], [a for _, a in points], marker="o", label=arm)
    if REAL in table.index:
        ax.axhline(table.at[REAL, "macro AUC"], color="black", ls="--", label=REAL)
    ax.set_xlabel("fine-tuning steps")
    ax.set_ylabel("macro AUC (synthetic-trained, real test)")
    if ax.lines:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_losses(client: MlflowClient, model: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    seen = set()
    for v in model["versions"]:
        run_id = v.tags.get("finetune_run_id")
        if run_id in seen:
            continue
        seen.add(run_id)
        points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        if points:
            ys = pd.Series([y for _, y in points]).rolling(max(1, len(points) // 20), min_periods=1).mean()
            ax.plot([s for s, _ in points], ys, label=f"{v.tags.get('arm')} ({run_id[:8]})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss history logged", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sample_grids(client: MlflowClient, model: dict, folder: Path) -> dict[str, Path]:
    """The disease-prompt grid each fine-tuning run logged at each registered checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for v in model["versions"]:
        run_id, step = v.tags.get("finetune_run_id"), int(v.tags.get("step", -1))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"grids/step_{step:06d}.png",
                                                            dst_path=tmp)
            except (MlflowException, OSError):
                continue  # a run without grids (e.g. logged by hand)
            target = folder / f"{v.tags.get('arm')}_step_{step:06d}_v{v.version}.png"
            shutil.copy(local, target)
            out[model["labels"][str(v.version)]] = target
    return out


# ------------------------------------------------------------------------------------- write
# The report is a list of blocks, rendered once as Markdown and once as HTML: one text, two formats.
@dataclass
class Block:
    kind: str  # "h2", "h3", "p", "table", "image"
    text: str = ""  # a heading, a paragraph (`code` spans allowed), an image's title
    table: object = None  # a DataFrame, or bold -> DataFrame for tables that mark the best cells
    float_format: str | None = None
    index: bool = True
    path: Path | None = None  # an image
    link: str = ""  # an image's path relative to the report


def _markdown(blocks: list[Block]) -> str:
    md = ["# Synthetic chest X-rays as training data", ""]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            md += [f"{'#' * int(b.kind[1])} {b.text}", ""]
        elif b.kind == "p":
            md += [b.text, ""]
        elif b.kind == "table":
            frame = b.table(lambda t: f"**{t}**") if callable(b.table) else b.table
            md += [frame.to_markdown(index=b.index, **({"floatfmt": b.float_format} if b.float_format else {})), ""]
        else:
            md += [f"![{b.text}]({b.link})", ""]
    return "\n".join(md)


def _html(blocks: list[Block]) -> str:
    body = []
    for b in blocks:
        if b.kind in ("h2", "h3"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            body.append("<p>" + re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(b.text)) + "</p>")
        elif b.kind == "table":
            frame = b.table(lambda t: f"<b>{t}</b>") if callable(b.table) else b.table
            fmt = (lambda x, spec=b.float_format: f"{x:{spec}}") if b.float_format else None
            body.append(frame.to_html(escape=not callable(b.table), index=b.index, index_names=False, float_format=fmt))
        else:
            body.append(_img(b.path))
    return HTML.format(body="\n".join(body))


def model_blocks(client: MlflowClient, name: str, out: Path) -> tuple[list[Block], list[Path], list[str]]:
    """One registered model's section: its tables (also written as CSVs), plots and sample grids;
    the files written; the summary lines printed."""
    model = collect(client, name)
    if not model["versions"]:
        raise ValueError(f"registered model {name!r} has no evaluated versions")
    auc, checks, hist = auc_table(model), checks_table(client, model), history_table(model)
    differences = arm_differences(model)
    written = []
    for frame, stem in ((auc, "auc"), (differences, "arm_differences"), (checks, "checks"),
                        (hist, "champion_history")):
        path = out / f"{name}_{stem}.csv"
        frame.to_csv(path, index=stem != "champion_history")
        written.append(path)
    plots = {"Per-disease AUC": plot_auc_bars(auc, out / f"{name}_auc_bars.png"),
             "Macro AUC against training steps": plot_auc_vs_steps(auc, out / f"{name}_auc_vs_steps.png"),
             "Loss curves": plot_losses(client, model, out / f"{name}_loss.png")}
    grids = sample_grids(client, model, out / f"{name}_grids")
    written += list(plots.values()) + list(grids.values())

    champion = model["champion"]
    champ_text = (f"`models:/{name}@{ALIAS}` = version {champion} ({model['labels'][champion].split(' (')[0]})"
                  if champion else f"no champion yet (run `python -m harness promote --name {name}`)")
    baseline = model["baseline"]
    blocks = [Block("h2", name), Block("p", f"Champion: {champ_text}."),
              Block("p", f"Real baseline: classify run `{baseline.info.run_id}`." if baseline is not None else
                    "No real baseline is linked to these classify runs (`--baseline_run`)."),
              Block("h3", "AUC on the real test split (95% bootstrap CI; best per column in bold)"),
              Block("table", table=lambda bold: display_auc(auc, bold))]
    if not differences.empty:
        blocks += [Block("h3", DIFFERENCES_TITLE), Block("table", table=differences, float_format=".3f")]
    blocks += [Block("h3", "Checks, training time and throughput"),
               Block("table", table=lambda bold: display_checks(checks, bold)),
               Block("h3", "Champion history"),
               Block("table", table=hist, index=False) if not hist.empty else Block("p", "no promotion yet")]
    for title, path in plots.items():
        blocks += [Block("h3", title), Block("image", title, path=path, link=path.name)]
    for label, path in grids.items():
        blocks += [Block("h3", f"Samples: {label}"),
                   Block("image", f"Samples: {label}", path=path, link=f"{path.parent.name}/{path.name}")]
    summary = [f"{name}: champion {champ_text.replace('`', '')}", display_auc(auc, lambda t: t).to_string(), ""]
    return blocks, written, summary


def tuning_blocks(studies: dict, out: Path) -> tuple[list[Block], list[Path]]:
    """Each Optuna study's trials (also a CSV) and its objective against learning rate and steps."""
    blocks, written = ([Block("h2", "Tuning (Optuna)")] if studies else []), []
    for study_name, study in studies.items():
        trials = study["trials"]
        slug = "tuning_" + "".join(c if c.isalnum() or c in "-_" else "-" for c in study_name)
        trials.to_csv(out / f"{slug}_trials.csv", index=False)
        written.append(out / f"{slug}_trials.csv")
        facts = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in study["summary"].items())
        blocks += [Block("h3", f"Study {study_name}"), Block("p", facts),
                   Block("table", table=trials, index=False, float_format=".4g")]
        column = next((c for c in TUNING_VALUES if c in trials and trials[c].notna().any()), None)
        if column is not None:
            plot = plot_tuning(trials, out / f"{slug}.png", column)
            written.append(plot)
            blocks.append(Block("image", f"{column} against learning rate and steps", path=plot, link=plot.name))
    return blocks, written


def build(client: MlflowClient, names: list[str], out: Path) -> dict:
    studies = tuning_tables([e.experiment_id for e in client.search_experiments()])
    if not names and not studies:
        raise ValueError("the registry holds no evaluated checkpoints (no model tagged by registry.register) "
                         "and there is no tuning study; run the pipeline first, e.g. "
                         "`mlflow run . -e pipeline --env-manager local`")
    out.mkdir(parents=True, exist_ok=True)
    blocks, written, summary = [], [], []
    for name in names:
        b, w, s = model_blocks(client, name, out)
        blocks, written, summary = blocks + b, written + w, summary + s
    b, w = tuning_blocks(studies, out)
    blocks, written = blocks + b, written + w
    (out / "report.md").write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks))
    return {"markdown": out / "report.md", "html": out / "report.html", "files": written, "summary": summary}


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Synthetic chest X-rays as training data</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f2f2f2; }}
img {{ max-width: 100%; border: 1px solid #eee; }}
</style></head><body>
<h1>Synthetic chest X-rays as training data</h1>
{body}
</body></html>
"""


def screenshot(page: Path, png: Path, width: int = 1280, height: int = 3200) -> Path:
    """Render an HTML file as a person sees it (Debian's ``chromium`` package, headless)."""
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise RuntimeError("no Chromium found for --screenshot; install it (apt-get install chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot of {page}")
    return png


def run(config: ReportConfig) -> dict:
    """Build the report (logged as a ``report`` run's artifacts unless ``--log false``), print its
    tables; returns the files written (``markdown``, ``html``, ``files``), and ``run_id`` when logged."""
    tracking.setup(config.experiment)
    client = MlflowClient()
    names = model_names(client, config.name)
    out = Path(config.output_dir)
    if not config.log:
        result = build(client, names, out)
        if config.screenshot:
            result["screenshot"] = screenshot(result["html"], Path(config.screenshot))
        return result
    with tracking.tracked_run("report", config.experiment, tags={"harness.entry_point": "report"}) as active:
        result = build(client, names, out)
        if config.screenshot:
            result["screenshot"] = screenshot(result["html"], Path(config.screenshot))
            result["files"].append(result["screenshot"])
        mlflow.log_param("models", ",".join(names))
        for path in [result["markdown"], result["html"], *result["files"]]:
            mlflow.log_artifact(str(path), "report" if path.parent == out else f"report/{path.parent.name}")
        result["run_id"] = active.info.run_id
    # The entry point ends the study's run of commands: its table and champion, then where the report is.
    print("\n".join(result["summary"]))
    print(f"[report] {result['markdown']} and {result['html']}")
    return result


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
