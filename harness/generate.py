"""Generate a synthetic data set from a checkpoint, labelled with the labels of the data it was
fine-tuned on.

The labels come from the data: the fine-tuning run's ``--labels`` if it set them, else the label
columns of its ``--data`` (``load_table(...).attrs["labels"]``; the five findings for chexpert,
mimic and phantom data, their default). Chest X-ray labels (CheXpert's) give the CheXpert layout
below; any other labels (a fundus ``folder:`` set's RG / NRG, say) give the ``folder`` layout,
``<out>/labels.csv`` with ``path``, ``split`` (train / valid), ``view`` (when the data has views)
and one 1/0 column per label, read back as ``folder:<out>``. The checkpoint's fine-tuning prompt
template is used unless ``--template`` is given (so a ``--template 'a fundus photograph showing
{findings}'`` fine-tune is sampled with its own prompts); "no finding" is prompted only where the
data has images with no positive label, or for chest X-rays.

Two ways to choose the prompts (``--prompts``):

- ``disease`` (the write-up's): N images for each single-finding prompt (the five findings by
  default) and "no finding".
- ``data``: each image's prompt is built from the label set of a row drawn at random from a real
  data set's train split (``--prompt_data``; default the data the checkpoint was fine-tuned on),
  the prompts the model was fine-tuned with. The synthetic set then has the real one's findings
  and their co-occurrence (cardiomegaly with edema and effusion...), which single-finding prompts
  never show a classifier; with the phantom renderer as a perfect generator they train a better
  classifier than disease prompts (`python -m bench.synthetic_ratio --oracle`; README).

Images are drawn in batches (many prompts per pipeline call) and written as
``<out>/CheXpert-v1.0-small/{train,valid}.csv`` (or ``<out>/labels.csv``) + grayscale JPEGs,
labelled by the prompt that made them, so every loader reads them back like real data::

    load_table("chexpert:<out>/CheXpert-v1.0-small", split="train")
    load_table("folder:<out>", split="train", views="all")       # other labels

The folder is also logged as the run's artifact ``synthetic``, so a step on a machine that shares
only the tracking server reads it by URI (tag ``harness.generated_uri``, with the layout's format;
``harness.artifacts``)::

    python -m harness.classify --train chexpert:runs:/<generate run>/synthetic

Each image has its own seed, derived from ``(--seed, prompt index, image index)``: the same seed
gives the same images, and image i does not depend on ``--batch_size`` or the number of images
(``prompts.csv`` records every image's prompt, labels and seed). The last ~10% of each prompt's
images (of all images, with data prompts) go to ``valid.csv`` for model selection.

    python -m harness.generate --run_id <finetune run> --n_per_prompt 200
    python -m harness.generate --checkpoint models:/m-... --scheduler ddim --num_inference_steps 50
    mlflow run . -e generate -P run_id=<finetune run> --env-manager local
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import psutil
import torch
from mlflow.exceptions import MlflowException
from tqdm.auto import tqdm

from harness import tracking
from harness.artifacts import local_spec, log_folder
from harness.data import DataSpec, disease_prompts, load_table, summarize
from harness.data.layout import write_csv
from harness.data.phantom import ARCHIVE, JPEG_QUALITY
from harness.data.prompts import DEFAULT_TEMPLATE, NO_FINDING, NO_FINDING_TEMPLATE, make_prompt
from harness.grids import labelled_grid
from harness.config import ConfigError, StepConfig, param, parse
from harness.pathologies import CHEXPERT_COLUMNS, CHEXPERT_LABELS, FINDINGS
from registry.pyfunc import DEFAULT_GUIDANCE, DEFAULT_STEPS

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "harness.checkpoint."
SCHEDULERS = {  # name -> diffusers class, built with from_config(pipe.scheduler.config)
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass
class GenerateConfig(StepConfig):
    checkpoint: str = param("", "models:/ or runs:/ URI, a diffusers directory, 'base' or a Hub id", project=True)
    run_id: str = param("", "a fine-tuning run: use its checkpoint at --step", project=True)
    step: int = param(-1, "checkpoint step of --run_id; -1 = its last", project=True)
    prompts: str = param("disease", "disease = the five single-finding prompts + no finding; data = label sets "
                         "drawn from --prompt_data's train split", choices=["disease", "data"], project=True)
    prompt_data: str = param("", "data set whose label sets make the data prompts (default: the fine-tuning "
                             "run's --data with --run_id, else 'phantom')", project=True)
    n_per_prompt: int = param(100, "images per disease prompt; data prompts make as many images in all (x6)",
                              project=True)
    batch_size: int = param(16, "images per pipeline call", project=True)
    seed: int = param(0, project=True)
    scheduler: str = param("dpm", "native = the checkpoint's own scheduler", choices=["native", *SCHEDULERS],
                           project=True)
    num_inference_steps: int = param(DEFAULT_STEPS, project=True)
    guidance_scale: float = param(DEFAULT_GUIDANCE, "classifier-free guidance scale, not negative; 1 or less "
                                  "disables guidance (diffusers guides only above 1)", project=True)
    resolution: int = param(0, "0 = the checkpoint's native size", project=True)
    view: str = param("frontal", choices=["frontal", "lateral"], project=True)
    template: str = param(DEFAULT_TEMPLATE, "prompt template with {findings} (and {view}); left at the default, "
                          "a fine-tuning run's own --template is used", project=True)
    no_finding_template: str = param(NO_FINDING_TEMPLATE)
    valid_fraction: float = param(0.1, "share of each prompt's images in valid.csv")
    mixed_precision: str = param("auto", "auto = fp16 on a GPU, else full precision",
                                 choices=["auto", "no", "fp16", "bf16"], project=True)
    threads: int = param(0, "torch CPU threads (0 = torch's default; 1 is much faster on a busy shared CPU)",
                         key=False)
    grid_rows: int = param(4, "images per prompt in the sample grid", key=False)
    output_dir: str = param("", "default: $HARNESS_OUTPUT_DIR/generated/<run id> (HARNESS_OUTPUT_DIR defaults "
                            "to outputs)", project=True, key=False)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)

    def check(self) -> None:
        if bool(self.checkpoint) == bool(self.run_id):
            raise ConfigError("pass exactly one of --checkpoint and --run_id")
        if self.step >= 0 and not self.run_id:
            raise ConfigError("--step needs --run_id")
        self.at_least(1, "n_per_prompt", "batch_size", "num_inference_steps", "grid_rows")
        self.not_negative("seed", "resolution", "threads")
        self.within("valid_fraction", 0.0, 1.0, high_open=True)
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ConfigError(f"--guidance_scale {self.guidance_scale} must be a number >= 0 (1 or less disables "
                              "guidance)")
        if self.prompt_data:
            try:
                DataSpec.parse(self.prompt_data)  # an unknown format fails here, before the model loads
            except ValueError as err:
                raise ConfigError(f"--prompt_data: {err}") from None


def parse_args(argv=None) -> GenerateConfig:
    return parse(GenerateConfig, argv, prog="python -m harness.generate")


def run(config: GenerateConfig) -> tracking.StepResult:
    """Generate one data set; the result names it as ``data`` (a data spec the next step reads)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    with tracking.tracked_run("generate", config.experiment) as active:
        tracking.log_params({k: tracking.redact_url(v) if isinstance(v, str) else v  # a checkpoint URL's password
                             for k, v in config.params().items() if k != "experiment"})
        generate(config, active.info.run_id)
    return result(active.info.run_id)


def result(run_id: str) -> tracking.StepResult:
    """A generate run's result: its metrics, and its data set's spec as ``data``."""
    return dataclasses.replace(tracking.StepResult.of(run_id), artifacts={"data": generated_spec(run_id)})


def main(argv=None) -> str:
    """The command line's entry: returns the MLflow run id."""
    return run(parse_args(argv)).run_id


# ---------------------------------------------------------------------------------------------
def checkpoint_uri(run_id: str, step: int = -1) -> str:
    """The ``models:/`` URI a fine-tuning run logged for ``step`` (-1 = its last checkpoint)."""
    return _checkpoint(run_id, step)[1]


def _checkpoint(run_id: str, step: int = -1) -> tuple[int, str]:
    tags = mlflow.tracking.MlflowClient().get_run(run_id).data.tags
    steps = {int(k[len(CHECKPOINT_TAG):]): v for k, v in tags.items() if k.startswith(CHECKPOINT_TAG)}
    if not steps:
        raise LookupError(f"run {run_id} has no checkpoints (no {CHECKPOINT_TAG}<step> tag)")
    if step < 0:
        step = max(steps)
    if step not in steps:
        raise LookupError(f"run {run_id} has no checkpoint at step {step}; it has steps {sorted(steps)}")
    return step, steps[step]


# Where a generate run's data set is: the local folder it was written to, and the URI of the same
# folder logged as the run's artifact DATA_ARTIFACT, which any machine that reaches the tracking
# server can read (harness.artifacts); steps hand each other the URI (generated_spec).
GENERATED_DATA_TAG = "harness.generated_data"
GENERATED_URI_TAG = "harness.generated_uri"
DATA_ARTIFACT = "synthetic"


def generated_spec(run_id: str) -> str:
    """The data spec of a generate run's data set, for the next step: its artifact URI with its
    layout's format (``chexpert:runs:/<run>/synthetic``, ``folder:runs:/<run>/synthetic`` for
    labels other than CheXpert's), read in place on the host that still has the folder; the local
    folder for a run logged before data sets were artifacts."""
    tags = mlflow.tracking.MlflowClient().get_run(run_id).data.tags
    return tags.get(GENERATED_URI_TAG) or tags[GENERATED_DATA_TAG]


# What a generated set (and so a classify or checks run of it) is about, as tags the MLflow UI
# groups and filters by; the same keys on generate, classify and checks runs.
SOURCE_TAGS = {"arm": "harness.arm", "step": "harness.step", "source_run": "harness.source_run",
               "generate_run": "harness.generate_run"}


def checkpoint_source(args) -> dict:
    """Which checkpoint ``args`` samples: ``arm``, ``step`` and ``source_run`` (the fine-tuning
    run) where known: from ``--run_id``, from a registered version's tags (``registry.register``),
    or ``arm`` "base" for the embedded base."""
    client = mlflow.tracking.MlflowClient()
    if args.run_id:
        run = client.get_run(args.run_id)
        step, _ = _checkpoint(args.run_id, args.step)
        return {"arm": run.data.params.get("arm") or run.data.tags.get("harness.arm", ""), "step": step,
                "source_run": args.run_id}
    if args.checkpoint == "base":
        return {"arm": "base"}
    found = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@(.+))", args.checkpoint)
    if found:
        name, version, alias = found.groups()
        try:
            tags = (client.get_model_version(name, version) if version
                    else client.get_model_version_by_alias(name, alias)).tags
        except MlflowException:
            return {}  # load() reports a checkpoint that does not exist
        out = {"arm": tags.get("arm"), "step": int(tags["step"]) if tags.get("step", "").isdigit() else None,
               "source_run": tags.get("finetune_run_id")}
        return {k: v for k, v in out.items() if v}
    return {}


def judged(source: dict | None) -> str:
    """A short name for what a generated set shows: 'dreambooth @ 600', 'base', or 'generated'."""
    if not source or not source.get("arm"):
        return "generated"
    return source["arm"] + (f" @ {source['step']}" if source.get("step") is not None else "")


def source_tags(source: dict | None) -> dict:
    return {tag: str(source[key]) for key, tag in SOURCE_TAGS.items() if source and source.get(key) is not None}


def generated_source(spec) -> dict | None:
    """The ``source`` a data set written by ``generate`` records in its ``generate.json`` (arm,
    step, source_run, generate_run); None for any other data set."""
    try:
        spec = DataSpec.parse(spec)
    except ValueError:
        return None
    if spec.format not in ("chexpert", "folder") or spec.path is None:
        return None
    root = spec.resolve().path  # the CheXpert archive folder inside the output folder, or the folder itself
    meta = (root.parent if spec.format == "chexpert" else root) / "generate.json"
    if not meta.is_file():
        return None
    return json.loads(meta.read_text()).get("source")


def image_seed(seed: int, prompt_index: int, i: int) -> int:
    """The seed of image ``i`` of prompt ``prompt_index``: independent of batch size and N."""
    return int(np.random.SeedSequence([seed, prompt_index, i]).generate_state(1)[0])


def load(args):
    """The pipeline to sample from (dtype, device, scheduler set) and its source URI/path."""
    from harness.pretrained import current_base_uri, load_pipeline

    source = checkpoint_uri(args.run_id, args.step) if args.run_id else args.checkpoint
    if source == "base":
        source = current_base_uri()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = args.mixed_precision
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "no"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    try:
        pipe = load_pipeline(source, dtype=dtype)
    except (ValueError, OSError, MlflowException) as exc:
        raise ValueError(f"checkpoint {source!r} is not a loadable Stable Diffusion pipeline: {exc}") from exc
    if args.scheduler != "native":
        import diffusers

        # PNDM as Stable Diffusion configures it: PLMS steps only (PRK steps fail at few steps)
        extra = {"skip_prk_steps": True} if args.scheduler == "pndm" else {}
        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), source


def sample(pipe, prompts: list[str], seeds: list[int], batch_size: int, num_inference_steps: int,
           guidance_scale: float, resolution: int):
    """Yield ``(start, images)`` per pipeline call of ``batch_size`` prompts; image k is drawn
    from its own generator seeded with ``seeds[k]``, so it does not depend on the batching."""
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        out = pipe(prompts[start:stop], generator=[torch.Generator().manual_seed(s) for s in seeds[start:stop]],
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   height=resolution, width=resolution)
        yield start, out.images


def output_root() -> Path:
    """Where generated sets go by default: ``$HARNESS_OUTPUT_DIR/generated`` (``outputs/generated``)."""
    return Path(os.environ.get("HARNESS_OUTPUT_DIR", "outputs")) / "generated"


def generate(args, run_id: str) -> Path:
    out = Path(args.output_dir or output_root() / run_id).expanduser().absolute()
    if out.exists():
        raise FileExistsError(f"output_dir {out} already exists; remove it or pass another --output_dir")
    source_info = {**checkpoint_source(args), "generate_run": run_id}
    mlflow.set_tags(source_tags(source_info))
    if judged(source_info) != "generated":
        mlflow.tracking.MlflowClient().update_run(run_id, name=f"generate · {judged(source_info)}")
    data = data_labels(args, source_info.get("source_run"))
    args = _tuned_template(args, source_info.get("source_run"))
    by_finding = finding_prompts(data, args)
    label_sets = None
    if args.prompts == "data":
        mlflow.log_param("prompt_data_used", data.spec)
        label_sets = data_label_sets(data.spec, data.views(args.view), data.labels)
    jobs = image_jobs(args, by_finding, label_sets)

    pipe, source = load(args)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    mlflow.set_tags({"harness.source_checkpoint": tracking.redact_url(source),
                     **({"harness.source_run": args.run_id} if args.run_id else {})})
    mlflow.log_params({"resolution_px": resolution, "device": str(pipe.device),
                       "dtype": str(pipe.dtype).removeprefix("torch."),
                       "scheduler_class": type(pipe.scheduler).__name__})

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_tmp_owner()}", dir=out.parent))
    try:
        rows, grid = _write(pipe, jobs, args, resolution, tmp, source_info, data)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # MLflow: where the data set is, what is in it, what it looks like, how fast it came
    fmt, root = data.layout, out / ARCHIVE if data.layout == "chexpert" else out
    spec = f"{fmt}:{root}"
    mlflow.set_tag(GENERATED_DATA_TAG, spec)
    mlflow.log_param("label_names", json.dumps(data.labels))
    for split in ("train", "valid"):
        if any(j["split"] == split for j in jobs):  # (grid-only jobs have no split)
            table = load_table(DataSpec.parse(spec), split=split, views="all", labels=data.written_labels())
            tracking.log_input(mlflow.data.from_pandas(table, source=str(root), name=f"generated-{split}"),
                             context="generated")
            mlflow.log_dict(summarize(table), f"data/summary_{split}.json")
    mlflow.log_artifact(str(out / "prompts.csv"), "data")
    # The data set itself, images and csvs: later steps on any machine read it by this URI
    mlflow.set_tag(GENERATED_URI_TAG, f"{fmt}:{log_folder(out, DATA_ARTIFACT)}")
    mlflow.log_metrics(rows)
    if grid:
        columns = list(by_finding)
        mlflow.log_image(labelled_grid(grid, columns), "grids/samples.png")
        mlflow.log_dict({"columns": columns, "prompts": by_finding}, "grids/samples.json")
    print(f"{rows['n_images']} images at {rows['throughput_images_per_s']:.2f} images/s -> {spec} "
          f"(artifact {fmt}:runs:/{run_id}/{DATA_ARTIFACT})")
    return out


# A temporary output folder names its owner: .<out>.tmp-<host>.<pid>.<random>, so that the next
# generate into the same parent folder can tell one that a killed process left behind.
_TMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[^.]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", socket.gethostname())


def _tmp_owner() -> str:
    return f".tmp-{_host()}.{os.getpid()}."


def remove_stale_tmp(parent: Path) -> list[Path]:
    """Remove the temporary output folders in ``parent`` whose generate process, on this host, is
    gone (killed before it could clean up); returns them. Another host's are left alone."""
    removed = []
    for path in parent.iterdir():
        found = _TMP.match(path.name)
        if not found or found["host"] != _host() or not path.is_dir():
            continue
        pid = int(found["pid"])
        try:
            # the owner made the folder before its last change: a process started later is not it
            alive = psutil.Process(pid).create_time() <= path.stat().st_mtime
        except psutil.NoSuchProcess:
            alive = False
        except (psutil.AccessDenied, FileNotFoundError):
            continue
        if not alive:
            log.warning("removing %s: left by generate process %d, which is gone", path, pid)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _n_valid(n: int, fraction: float) -> int:
    """How many of ``n`` images go to valid: ~``fraction``, at least one, never all."""
    return min(n - 1, max(1, round(n * fraction))) if fraction > 0 else 0


def image_jobs(args, by_finding: dict[str, str], label_sets: list[list[str]] | None = None) -> list[dict]:
    """One job per image: prompt, positive labels, seed, split (None: drawn for the grid only) and
    grid cell (row, column) or None. The grid is always the disease prompts x ``--grid_rows``.
    Data prompts are drawn from ``label_sets`` (``data_label_sets``)."""
    def job(labels, prompt, seed, split, cell=None):
        return {"labels": labels, "prompt": prompt, "seed": seed, "split": split, "grid": cell}

    n, rows = args.n_per_prompt, min(args.grid_rows, args.n_per_prompt)
    single = [[] if finding == NO_FINDING else [finding] for finding in by_finding]
    if args.prompts == "disease":
        n_valid = _n_valid(n, args.valid_fraction)
        return [job(single[p], prompt, image_seed(args.seed, p, i), "valid" if i >= n - n_valid else "train",
                    (i, p) if i < rows else None)
                for p, prompt in enumerate(by_finding.values()) for i in range(n)]
    if not label_sets:
        raise ValueError("data prompts need the real label sets to draw from (data_label_sets)")
    total = n * len(by_finding)
    picks = np.random.default_rng([args.seed, len(by_finding)]).integers(len(label_sets), size=total)
    n_valid = _n_valid(total, args.valid_fraction)
    jobs = [job(label_sets[r], make_prompt(label_sets[r], args.view, args.template, args.no_finding_template),
                image_seed(args.seed, len(by_finding), j), "valid" if j >= total - n_valid else "train")
            for j, r in enumerate(picks)]
    return jobs + [job(single[p], prompt, image_seed(args.seed, p, i), None, (i, p))
                   for p, prompt in enumerate(by_finding.values()) for i in range(rows)]


def prompt_data(args, source_run: str | None = None) -> str:
    """The data set whose labels (and label sets, for data prompts) the generated set takes:
    ``--prompt_data``, else the fine-tuning run's ``--data`` (``--run_id``, or ``source_run``: the
    run behind a registered checkpoint), else the phantom."""
    if args.prompt_data:
        return args.prompt_data
    if args.run_id:
        return mlflow.tracking.MlflowClient().get_run(args.run_id).data.params.get("data") or "phantom"
    if source_run:
        try:
            return mlflow.tracking.MlflowClient().get_run(source_run).data.params.get("data") or "phantom"
        except MlflowException:  # a registered version whose fine-tuning run is gone
            log.warning("fine-tuning run %s of the checkpoint is not in the store: labels from the phantom", source_run)
    return "phantom"


# Formats whose loader defaults to FINDINGS: their labels need no reading of the data.
CXR_FORMATS = ("chexpert", "mimic", "phantom")


@dataclass(frozen=True)
class DataLabels:
    """What a generated set is labelled with: the labels of ``spec`` (the data the checkpoint was
    fine-tuned on) without "No Finding", and the layout they are written in: ``chexpert`` for
    CheXpert labels (as the study always wrote), else ``folder`` (``<out>/labels.csv``).
    ``has_views``: the data names its images' views (a folder set may not); ``no_finding``: the
    no-finding prompt is one to draw (always for chest X-rays; elsewhere when some image of the data
    has no positive label: one-hot labels such as RG / NRG have none)."""

    spec: str
    labels: list[str]
    has_views: bool = True
    no_finding: bool = True

    @property
    def layout(self) -> str:
        return "chexpert" if set(self.labels) <= set(CHEXPERT_LABELS) else "folder"

    def views(self, view: str) -> str:
        """The ``load_table`` views that data prompts are drawn from."""
        return view if self.has_views else "all"

    def written_labels(self) -> list[str]:
        """The label columns the generated set is read back with."""
        return self.labels + [NO_FINDING] if self.layout == "chexpert" else list(self.labels)


def _finetune_param(run_id: str | None, name: str) -> str | None:
    """A fine-tuning run's logged parameter; None when unset (logged as ``None`` or empty)."""
    if not run_id:
        return None
    try:
        value = mlflow.tracking.MlflowClient().get_run(run_id).data.params.get(name)
    except MlflowException:  # as prompt_data: a registered version whose fine-tuning run is gone
        return None
    return None if value in (None, "", "None") else value


def data_labels(args, source_run: str | None = None) -> DataLabels:
    """The labels of the data the checkpoint was fine-tuned on (``prompt_data``): the fine-tuning
    run's ``--labels`` if it set them, else the data's own (``load_table``'s ``attrs["labels"]``;
    FINDINGS for chexpert, mimic and phantom data, read without loading it)."""
    spec = prompt_data(args, source_run)
    given = _finetune_param(args.run_id or source_run, "labels")
    labels = [l.strip() for l in given.split(",") if l.strip()] if given else None
    if DataSpec.parse(spec).format in CXR_FORMATS:
        labels = [l for l in (labels or FINDINGS) if l != NO_FINDING]
        if set(labels) <= set(CHEXPERT_LABELS):
            return DataLabels(spec, labels)
    # Any other data is read: its label names, whether it has views, whether it has no-finding images.
    table = load_table(DataSpec.parse(local_spec(spec)), split="train", views="all", labels=labels)
    labels = [l for l in table.attrs["labels"] if l != NO_FINDING]
    if not labels:
        raise ValueError(f"data set {spec} has no labels to prompt for")
    return DataLabels(spec, labels, has_views=bool(table["view"].astype(str).str.strip().ne("").any()),
                      no_finding=bool((table[labels].to_numpy() != 1.0).all(axis=1).any()))


def finding_prompts(data: DataLabels, args) -> dict[str, str]:
    """The single-finding prompts per label, and ``NO_FINDING``'s where the data has such images
    (``DataLabels.no_finding``), with the data's view (none for data without views)."""
    view = args.view if data.has_views else ""
    try:
        if data.no_finding:
            return disease_prompts(data.labels, view, args.template, args.no_finding_template)
        return {label: make_prompt([label], view, args.template, args.no_finding_template) for label in data.labels}
    except ValueError as err:
        if view:
            raise
        raise ValueError(f"{err}: data set {data.spec} has no views; pass a --template (and "
                         "--no_finding_template) without {view}, e.g. 'a fundus photograph showing "
                         "{findings}'") from None


def _tuned_template(args, source_run: str | None):
    """``args``, its template the fine-tuning run's ``--template`` when ``--template`` is left at
    the default: a checkpoint is sampled with the prompts it was fine-tuned on."""
    tuned = _finetune_param(args.run_id or source_run, "template")
    if not tuned or args.template != DEFAULT_TEMPLATE or tuned == args.template:
        return args
    log.info("using the fine-tuning run's prompt template %r", tuned)
    mlflow.log_param("template_used", tuned)
    return args.replace(template=tuned)


def data_label_sets(spec: str, view: str = "frontal", labels: list[str] | None = None) -> list[list[str]]:
    """The positive labels (default FINDINGS) of every ``view`` image in the train split of
    ``spec`` (a local path or an MLflow artifact URI)."""
    labels = list(FINDINGS if labels is None else labels)
    table = load_table(DataSpec.parse(local_spec(spec)), split="train", views=view, labels=labels)  # raises if empty
    positive = table[labels].to_numpy() == 1.0  # as prompts_for_table: NaN (uncertain, unmentioned) is not
    return [[f for f, on in zip(labels, row) if on] for row in positive]


def _write(pipe, jobs: list[dict], args, resolution: int, root: Path, source: dict | None = None,
           data: DataLabels | None = None):
    """Sample every job into root (the data's layout + prompts.csv); returns metrics and the grid rows."""
    data = data or DataLabels("phantom", list(FINDINGS))
    archive = root / ARCHIVE
    name = "view1_frontal.jpg" if args.view == "frontal" else "view2_lateral.jpg"
    cells = [j["grid"] for j in jobs if j["grid"] is not None]
    grid = [[None] * (1 + max(c for _, c in cells)) for _ in range(1 + max(r for r, _ in cells))] if cells else []
    csv_rows, written = {"train": [], "valid": []}, []
    batches = sample(pipe, [j["prompt"] for j in jobs], [j["seed"] for j in jobs], args.batch_size,
                     args.num_inference_steps, args.guidance_scale, resolution)
    progress = tqdm(total=len(jobs), desc="generate", unit="img")
    generating, started = 0.0, time.perf_counter()
    t0 = started
    for start, images in batches:
        generating += time.perf_counter() - t0  # the pipeline calls only, not the JPEG writing
        for job, image in zip(jobs[start:], images):
            image = image.convert("L")
            if job["grid"] is not None:
                grid[job["grid"][0]][job["grid"][1]] = image
            if job["split"] is None:
                continue
            written.append(job)
            if data.layout == "chexpert":
                path = f"{ARCHIVE}/{job['split']}/patient{len(written):05d}/study1/{name}"
                row = {"Path": path, "Frontal/Lateral": args.view.capitalize(),
                       **label_cells(job["labels"], data.labels)}
            else:
                path = f"images/{job['split']}/{len(written):05d}.jpg"
                row = {"path": path, "split": job["split"], **({"view": args.view} if data.has_views else {}),
                       **{label: "1" if label in job["labels"] else "0" for label in data.labels}}
            job["path"] = path
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / path, quality=JPEG_QUALITY)
            csv_rows[job["split"]].append(row)
        progress.update(len(images))
        t0 = time.perf_counter()
    progress.close()
    if data.layout == "chexpert":
        for split, split_rows in csv_rows.items():
            write_csv(archive / f"{split}.csv", CHEXPERT_COLUMNS, split_rows)
    else:  # one labels.csv, its split column train / valid: folder:<out> reads it (no hold-out)
        write_csv(root / "labels.csv", ["path", "split", *(["view"] if data.has_views else []), *data.labels],
                  csv_rows["train"] + csv_rows["valid"])
    write_csv(root / "prompts.csv", ["path", "split", "labels", "prompt", "seed"],
              [{**{k: j[k] for k in ("path", "split", "prompt", "seed")},
                "labels": "|".join(j["labels"]) or NO_FINDING} for j in written])
    (root / "generate.json").write_text(json.dumps(
        {k: v for k, v in vars(args).items() if k != "experiment"} | {"resolution_px": resolution, "source": source},
        indent=2) + "\n")
    metrics = {"n_images": len(written), "generation_seconds": generating,
               "throughput_images_per_s": len(jobs) / generating, "total_seconds": time.perf_counter() - started}
    return metrics, grid


def label_cells(positives: list[str], findings: list[str] = FINDINGS) -> dict:
    """CheXpert cells for an image of a prompt naming ``positives``: 1.0 for them, 0.0 for the
    other ``findings`` (No Finding is 1.0 when there are none), blank for observations the prompts
    do not speak of."""
    unknown = sorted(set(positives) - set(findings))
    if unknown:
        raise ValueError(f"label(s) {unknown} are not among the findings {findings}")
    cells = {label: "" for label in CHEXPERT_LABELS}
    for label in findings:
        cells[label] = "1.0" if label in positives else "0.0"
    cells[NO_FINDING] = "0.0" if positives else "1.0"
    return cells


if __name__ == "__main__":
    main()
