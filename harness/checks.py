"""Checks of a generated data set that the write-up did by eye or not at all, logged as metrics.

1. **Views** - ``train_view_classifier`` fits the small CNN of ``harness.classifier`` to tell
   frontal from lateral on REAL images (every view of the real train split, target "lateral";
   model selection on the real valid split), cached per data set and parameters under
   ``outputs/checks/``; ``view_fraction`` says which share of the generated images it calls frontal.
   The write-up saw that most DreamBooth images were laterals although the prompts said frontal.
2. **Memorization** - ``memorization``: each generated image's nearest neighbour in the
   fine-tuning set by cosine similarity, and the share above a threshold (0.95). A near-copy of a
   training radiograph leaks a patient. ``closest_pairs_figure`` shows the closest pairs.
3. **Distribution distance** - ``frechet_distance``: torchmetrics' FrechetInceptionDistance with a
   custom feature extractor; by default the real-trained classifier's globally pooled last conv
   features (``ClassifierFeatures``).
4. **Prompt adherence** - ``prompt_adherence``: per finding, the AUC of the REAL-trained disease
   classifier's score between the generated images whose prompt named the finding and the rest
   (0.5: the prompt changes nothing that classifier sees). Its ceiling, ``phantom_renders``: the
   same figure for the phantom renderer drawing the same prompts (defined for phantom data only).

The entry point runs all three and logs ``view_frontal_fraction``, ``view_lateral_fraction``,
``memorization_fraction``, ``memorization_max_similarity``, ``memorization_mean_similarity``,
``memorization_reference_max_similarity`` / ``_fraction`` (the same check for the real valid
split: what new patients score - calibrate the threshold with it),
``memorization_fraction_above_reference`` (share of generated images closer to a training image
than any new patient is), ``frechet_distance``, the image ``memorization/closest_pairs.png``, the
pairs as ``memorization/pairs.json`` and the view classifier as ``classifier/model.pt``. With
``--classifier_run`` also ``adherence_<label>`` and ``adherence_mean``, and when ``--real`` is a
phantom data set ``adherence_ceiling_<label>`` and ``adherence_ceiling_mean`` (else a
``harness.adherence_ceiling`` tag says why not)::

    python -m harness.checks --generated chexpert:outputs/generated/<run>/CheXpert-v1.0-small --real phantom
    mlflow run . -e checks -P generated=chexpert:<dir> --env-manager local

``--classifier_run RUN_ID`` takes the FID features and the adherence scores from a run that logged
``classifier/model.pt`` (``log_classifier``), e.g. a disease classifier trained on the real data
(the pipeline passes its real baseline); without it the view classifier's features are used (they
know anatomy and projection, little about disease) and adherence is skipped (tag
``harness.adherence``).

Images are compared as the classifiers see them: ``ImageDataset`` grey tensors in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps
from sklearn.neighbors import NearestNeighbors
from torchmetrics.image.fid import FrechetInceptionDistance

from harness import tracking
from harness.artifacts import resolved
from harness.classifier import (CLASSIFIER_ARTIFACT, build_classifier, load_classifier, predict, save_classifier,
                                train_classifier)
from harness.classify import classifier_from_run, log_classifier
from harness.metrics import snake
from harness.config import ConfigError, StepConfig, param, parse
from harness.data import CachedImages, DataSpec, ImageDataset, load_table
from harness.data.datasets import SPLITS, image_tensor
from harness.data.phantom import phantom_params
from harness.generate import generated_source, judged, source_tags
from harness.metrics import nan_mean, per_label_auc
from harness.pathologies import FINDINGS as PHANTOM_FINDINGS  # what the phantom renderer can draw

VIEW_LABEL = "lateral"  # the view classifier's one output: P(lateral)
CACHE_VERSION = 1  # bump when a cached view classifier would no longer be what the code trains


# ---------------------------------------------------------------------------------------- images


@dataclass
class Images:
    """Images in memory: ``pixels`` [N, C, H, W] in [-1, 1] and the file each came from."""

    pixels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def load_images(images, resolution: int = 64) -> Images:
    """Images from a ``load_table`` table, an ``ImageDataset``, a tensor [N, C, H, W] or ``Images``.

    Tables are read as 1-channel grey at ``resolution``; tensors get paths ``#0``, ``#1``, ...
    """
    if isinstance(images, Images):
        return images
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"image tensor has shape {tuple(images.shape)}; expected [N, C, H, W]")
        return Images(images.float(), [f"#{i}" for i in range(len(images))])
    if isinstance(images, pd.DataFrame):
        images = ImageDataset(images, labels=[], resolution=resolution, channels=1)
    if not isinstance(images, ImageDataset):
        raise TypeError(f"cannot read images from a {type(images).__name__}; pass a table, ImageDataset or tensor")
    if len(images) == 0:
        raise ValueError("no images to check")
    items = [images[i] for i in range(len(images))]
    return Images(torch.stack([it["pixel_values"] for it in items]), [images.paths[it["index"]] for it in items])


def _batches(pixels: torch.Tensor, batch_size: int):
    for start in range(0, len(pixels), batch_size):
        yield pixels[start:start + batch_size]


def generated_table(spec: str | DataSpec, labels=()) -> pd.DataFrame:
    """Every image of a generated data set, all views: each split a chexpert folder has a csv for
    (harness.generate writes train.csv and valid.csv), each split a folder set's labels.csv names
    (harness.generate writes train and valid rows for labels other than CheXpert's), every split of
    other formats; with the ``labels`` columns (the prompts' labels)."""
    spec = DataSpec.parse(spec)
    resolved = spec.resolve()
    splits = [s for s in SPLITS if resolved.format != "chexpert" or (resolved.path / f"{s}.csv").is_file()]
    if resolved.format == "folder" and not resolved.option("holdout"):
        splits = _folder_splits(resolved)
    if not splits:
        raise FileNotFoundError(f"generated data {spec}: no train.csv, valid.csv or test.csv in {resolved.path}")
    labels = list(labels)
    table = pd.concat([load_table(spec, s, views="all", labels=labels) for s in splits], ignore_index=True)
    table.attrs = {"spec": str(spec), "splits": splits, "labels": labels}
    return table


def _folder_splits(spec: DataSpec) -> list[str]:
    """The splits a folder set's label CSV has rows of: without a hold-out, no others load."""
    csv = spec.path / spec.option("file", "labels.csv")
    if not csv.is_file():
        return ["train"]  # load_table says what is missing
    column = pd.read_csv(csv, dtype=str, usecols=lambda c: c == "split")
    if "split" not in column:
        return ["train"]
    named = set(column["split"].fillna("").str.strip())
    return [s for s in SPLITS if s in named]


# ------------------------------------------------------------------------------ saved classifiers


def _digest(table: pd.DataFrame) -> str:
    text = "\n".join(f"{p}\t{v}" for p, v in zip(table["path"], table["view"]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _view_table(spec, split: str) -> pd.DataFrame:
    table = load_table(spec, split, views="all", labels=[])
    attrs = table.attrs
    table = table.assign(**{VIEW_LABEL: (table["view"] == "lateral").astype(np.float32)})
    table.attrs = attrs
    return table


def train_view_classifier(real_spec, resolution: int = 64, epochs: int = 4, seed: int = 0, lr: float = 1e-3,
                          batch_size: int = 32, device: str = "cpu", cache_dir=None) -> nn.Module:
    """A frontal-vs-lateral small CNN (one logit: P(lateral)) trained on ``real_spec``'s train
    split, every view; the epoch with the best valid-split AUC is kept.

    Cached: saved under ``cache_dir`` (default ``$HARNESS_OUTPUT_DIR/checks`` or ``outputs/checks``)
    keyed by the image lists of both splits and the parameters, and loaded from there next time.
    The returned model's ``harness_meta`` holds ``valid_auc``, ``valid_accuracy``, ``cache_path``
    and ``cached`` (True when it was loaded, not trained).
    """
    train, valid = _view_table(real_spec, "train"), _view_table(real_spec, "valid")
    counts = train["view"].value_counts()
    if counts.get("frontal", 0) == 0 or counts.get("lateral", 0) == 0:
        raise ValueError(f"real data {real_spec}: a view classifier needs frontal and lateral images in the train "
                         f"split; it has {dict(counts)}")
    params = {"version": CACHE_VERSION, "architecture": "small_cnn", "resolution": resolution, "epochs": epochs,
              "seed": seed, "lr": lr, "batch_size": batch_size, "train": _digest(train), "valid": _digest(valid)}
    cache = Path(cache_dir or Path(os.environ.get("HARNESS_OUTPUT_DIR", "outputs")) / "checks")
    path = cache / f"view-{tracking.params_key(params)}.pt"
    if path.is_file():
        model = load_classifier(path)
        model.harness_meta = {**model.harness_meta, "cache_path": str(path), "cached": True}
        return model

    def loader(table, shuffle):
        images = CachedImages(ImageDataset(table, [VIEW_LABEL], resolution=resolution, channels=1))
        gen = torch.Generator().manual_seed(seed) if shuffle else None
        return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=shuffle, generator=gen)

    torch.manual_seed(seed)
    model = build_classifier("small_cnn", 1, in_channels=1)
    valid_loader = loader(valid, False)
    model, history = train_classifier(model, loader(train, True), valid_loader, epochs=epochs, lr=lr, seed=seed,
                                      device=device, labels=[VIEW_LABEL], progress=False)
    scores, targets = predict(model, valid_loader, device)
    meta = {**params, "n_labels": 1, "in_channels": 1, "labels": [VIEW_LABEL], "task": "view", "real": str(real_spec),
            "valid_auc": per_label_auc(targets, scores, [VIEW_LABEL])[VIEW_LABEL],
            "valid_accuracy": float(((scores >= 0.5) == (targets == 1)).mean())}
    save_classifier(model.cpu(), path, **meta)
    model.harness_meta = {**meta, "cache_path": str(path), "cached": False}
    return model.eval()


@torch.no_grad()
def _scores(model: nn.Module, pixels: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """A classifier's sigmoid scores [N, L] (on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat([torch.sigmoid(model(b.to(device))).float().cpu() for b in _batches(pixels, batch_size)]).numpy()


def view_fraction(model: nn.Module, images, resolution: int = 64, batch_size: int = 64,
                  threshold: float = 0.5) -> dict:
    """Shares of ``images`` the view classifier calls frontal / lateral (P(lateral) >= threshold)."""
    images = load_images(images, resolution)
    p = _scores(model, images.pixels, batch_size)[:, 0]
    lateral = float((p >= threshold).mean())
    return {"frontal_fraction": 1.0 - lateral, "lateral_fraction": lateral, "n_images": len(images)}


# ---------------------------------------------------------------------------------- memorization


def pixel_embedding(pixels: torch.Tensor, size: int = 32) -> torch.Tensor:
    """[N, size*size]: grey, area-downsampled to ``size`` px, each image standardised (zero mean,
    unit variance over its pixels).

    Why this embedding: it is fixed (no training, no weights, nothing to leak or download), it
    measures what privacy is about - a radiograph that *looks* like one patient's, not one that
    shares abstract features - and standardising removes exposure and contrast, which a generator
    changes freely. Downsampling forgives noise, JPEG and sub-pixel jitter. It is not invariant to
    shifts, rotations or flips: a mirrored copy is missed (a learned embedding is the remedy).
    """
    x = F.adaptive_avg_pool2d(pixels.float().mean(1, keepdim=True), size).flatten(1)
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)


@torch.no_grad()
def _embed(images: Images, embed, batch_size: int = 256) -> np.ndarray:
    if embed is None:
        return pixel_embedding(images.pixels).numpy()
    embed.eval()
    device = next(embed.parameters(), torch.empty(0)).device
    out = [embed(b.to(device)).flatten(1).float().cpu() for b in _batches(images.pixels, batch_size)]
    return torch.cat(out).numpy()


def memorization(generated, train, threshold: float = 0.95, k: int = 16, embed: nn.Module | None = None,
                 resolution: int = 64) -> dict:
    """Nearest-neighbour cosine similarity of each generated image to the fine-tuning images.

    Both sets are embedded (``pixel_embedding``, or ``embed``: a feature module such as
    ``ClassifierFeatures``), the training set's mean embedding - the average chest X-ray - is
    subtracted from both, so similarity is about what is particular to an image (an unrelated
    radiograph scores ~0, an exact copy 1); then sklearn's ``NearestNeighbors`` (cosine).

    Returns ``fraction_above`` (share of generated images with similarity >= ``threshold``),
    ``max_similarity``, ``mean_nn_similarity``, ``similarities`` (one per generated image, in
    order) and ``pairs``: the ``k`` closest ``(generated path, training path, similarity)``,
    most similar first.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold={threshold} is not a cosine similarity in [-1, 1]")
    gen, ref = load_images(generated, resolution), load_images(train, resolution)
    ref_emb = _embed(ref, embed)
    mean = ref_emb.mean(0, keepdims=True)
    nn_index = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(ref_emb - mean)
    dist, idx = nn_index.kneighbors(_embed(gen, embed) - mean)
    sim, idx = 1.0 - dist[:, 0], idx[:, 0]
    order = np.argsort(-sim, kind="stable")[:k]
    return {"fraction_above": float((sim >= threshold).mean()), "max_similarity": float(sim.max()),
            "mean_nn_similarity": float(sim.mean()), "similarities": sim.tolist(), "threshold": threshold,
            "pairs": [(gen.paths[i], ref.paths[idx[i]], float(sim[i])) for i in order]}


def closest_pairs_figure(pairs, n: int = 8, size: int = 128) -> Image.Image:
    """Rows of generated | nearest training image, with the similarity under each row."""
    pairs = list(pairs)[:n]
    if not pairs:
        raise ValueError("closest_pairs_figure: no pairs")
    caption, gap = 14, 4
    fig = Image.new("L", (2 * size + gap, len(pairs) * (size + caption)), 255)
    draw = ImageDraw.Draw(fig)
    for row, (gen_path, train_path, sim) in enumerate(pairs):
        y = row * (size + caption)
        for col, path in enumerate((gen_path, train_path)):
            try:
                with Image.open(path) as im:
                    tile = ImageOps.fit(im.convert("L"), (size, size))
            except (OSError, ValueError) as err:
                raise ValueError(f"closest_pairs_figure: cannot read {path}: {err}") from err
            fig.paste(tile, (col * (size + gap), y))
        draw.text((2, y + size + 1), f"{sim:.3f}  {Path(gen_path).parent.parent.name} | "
                                     f"{Path(train_path).parent.parent.name}", fill=0)
    return fig


# ------------------------------------------------------------------------------------ Frechet


class ClassifierFeatures(nn.Module):
    """A harness classifier's penultimate features: its conv trunk (``model.features``; both
    SmallCNN and torchxrayvision's DenseNet have one), ReLU, global average pool -> [N, channels]
    (128 for small_cnn). Frozen and always in eval mode (BatchNorm keeps its trained statistics).

    Globally pooled, as Inception's 2048 FID features are, rather than SmallCNN's 4x4 x 128 = 2048
    head input: the Fréchet distance needs a covariance estimate, and 128 dimensions are estimable
    from a few hundred images where 2048 need thousands.
    """

    def __init__(self, model: nn.Module, in_channels: int = 1, size: int = 64):
        super().__init__()
        if not hasattr(model, "features"):
            raise TypeError(f"{type(model).__name__} has no .features conv trunk")
        self.model = model.eval().requires_grad_(False)
        with torch.no_grad():
            self.num_features = int(self(torch.zeros(1, in_channels, size, size)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.model.features(x)), 1).flatten(1)

    def train(self, mode: bool = True):  # noqa: ARG002 - like torchmetrics' NoTrainInceptionV3
        return super().train(False)


@torch.no_grad()
def frechet_distance(real_images, generated_images, feature_extractor: nn.Module, resolution: int = 64,
                     batch_size: int = 64) -> float:
    """Fréchet distance between the feature Gaussians of two image sets (torchmetrics' FID with
    ``feature=feature_extractor``; statistics in float64).

    ``feature_extractor`` maps [B, 1, H, W] images in [-1, 1] to [B, d]: ``ClassifierFeatures``
    of the real-trained classifier here. With weights available locally the same function takes
    them through a small adapter module, e.g. torchxrayvision's DenseNet
    (``xrv.models.DenseNet(weights=...)``: ``lambda x: model.features2(resize(x, 224) * 1024)``)
    or torchmetrics' ``NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
    feature_extractor_weights_path=PATH)`` fed ``((x + 1) * 127.5).byte().repeat(1, 3, 1, 1)``.
    Values are only comparable with the same extractor (and similar set sizes: FID is biased
    upwards for small sets).
    """
    real, gen = load_images(real_images, resolution), load_images(generated_images, resolution)
    if len(real) < 2 or len(gen) < 2:
        raise ValueError(f"Fréchet distance needs 2+ images per set; got {len(real)} real, {len(gen)} generated")
    feature_extractor.eval()
    fid = FrechetInceptionDistance(feature=feature_extractor, normalize=True,
                                   input_img_size=tuple(real.pixels.shape[1:]))
    device = next(feature_extractor.parameters(), torch.empty(0)).device
    fid = fid.to(device)
    for images, is_real in ((real, True), (gen, False)):
        for batch in _batches(images.pixels, batch_size):
            fid.update(batch.to(device), real=is_real)
    return float(fid.compute().clamp_min(0.0))


# ------------------------------------------------------------------------------ prompt adherence


def classifier_labels(model: nn.Module) -> list[str]:
    """The label names a harness classifier was trained on (``log_classifier(..., labels=...)``)."""
    labels = getattr(model, "harness_meta", {}).get("labels")
    if not labels:
        raise ValueError("the classifier has no label names (harness_meta['labels']); classify runs log them")
    return list(labels)


def _trained_resolution(model: nn.Module) -> int:
    return int(model.harness_meta.get("resolution", 64))  # classify runs that did not log it trained at 64


def prompt_adherence(model: nn.Module, generated, images=None, batch_size: int = 64) -> dict[str, float]:
    """Per label of ``model`` (a classifier trained on REAL images): the AUC of its score for the
    label between the generated images whose prompt named the label and those whose prompt did
    not. 0.5 means the prompt changes nothing that classifier sees; nan (with a warning) for a
    label that the prompts always or never name.

    It is the standard per-label AUC - positives against every image without the finding, other
    findings included - so it reads like the classifier's per-label AUC on real data, and an
    image prompted with edema that looks like effusion counts against it. (Against the no-finding images only
    would be easier: it does not ask whether the findings are told apart.)

    ``generated``: a data set spec, or a ``generated_table(spec, labels)`` table, whose label
    columns are the prompts' labels. ``images``: what to score instead of the table's files, one
    per row, in anything ``load_images`` takes (``phantom_renders`` for the ceiling). Images are
    scored at the resolution the classifier was trained at.
    """
    labels = classifier_labels(model)
    table = generated if isinstance(generated, pd.DataFrame) else generated_table(generated, labels)
    images = load_images(table if images is None else images, _trained_resolution(model))
    if len(images) != len(table):
        raise ValueError(f"{len(images)} images for {len(table)} prompts")
    return per_label_auc(table[labels].to_numpy(np.float64), _scores(model, images.pixels, batch_size), labels)


def phantom_renders(table: pd.DataFrame, params: dict, resolution: int, seed: int = 0) -> torch.Tensor:
    """The phantom renderer drawing a new patient for each row's prompt: its positive findings,
    frontal rows as PA or AP at random, lateral rows as laterals; [N, 1, resolution, resolution]
    in [-1, 1], seeded. ``params`` are the phantom's (``phantom_params``): rendered with its
    difficulty at its stored size, then resized as the loader resizes its files, so a classifier
    sees them as it saw the real phantom (noise drawn at the classifier's size is not averaged down)."""
    from harness.data.phantom import DEFAULT_DIFFICULTY, DEFAULT_SIZE, render

    rng = np.random.default_rng(seed)
    size, difficulty = params.get("size", DEFAULT_SIZE), params.get("difficulty", DEFAULT_DIFFICULTY)
    drawn = [f for f in PHANTOM_FINDINGS if f in table.columns]
    out = []
    for row in table[["view", *drawn]].itertuples(index=False):
        view = "LATERAL" if row[0] == "lateral" else ("PA", "AP")[int(rng.integers(2))]
        image = render({f: v == 1.0 for f, v in zip(drawn, row[1:])}, view, rng, size, difficulty)
        out.append(image_tensor(Image.fromarray(image), resolution, 1))
    return torch.stack(out)


def adherence_and_ceiling(model: nn.Module, table: pd.DataFrame, real, seed: int = 0) -> tuple[dict, dict | None]:
    """``prompt_adherence`` of a ``generated_table`` and, when ``real`` is a phantom data set, the
    same for the phantom renderer drawing its prompts (the ceiling; None for other data, or for
    labels the phantom draws none of); nan for a label the phantom cannot draw."""
    adherence = prompt_adherence(model, table)
    if _no_ceiling(real, list(adherence)):
        return adherence, None
    params = phantom_params(DataSpec.parse(real).resolve().path)
    ceiling = prompt_adherence(model, table, phantom_renders(table, params, _trained_resolution(model), seed))
    return adherence, {label: v if label in PHANTOM_FINDINGS else math.nan for label, v in ceiling.items()}


def _no_ceiling(real, labels: list[str]) -> str | None:
    """Why the phantom renderer gives no adherence ceiling for ``labels`` of ``real``; None if it does."""
    if phantom_params(DataSpec.parse(real).resolve().path) is None:
        return f"{real} is not a phantom data set"
    if not set(labels) & set(PHANTOM_FINDINGS):
        return f"the phantom draws none of the labels {labels}"
    return None


def _adherence(args, model: nn.Module) -> dict[str, float]:
    """``adherence_*`` of the generated set; ``adherence_ceiling_*`` when --real is the phantom."""
    def named(prefix, per_label):
        return {f"{prefix}_{snake(l)}": v for l, v in per_label.items()} | {f"{prefix}_mean": nan_mean(per_label)}

    try:
        table = generated_table(args.generated, classifier_labels(model))
    except ValueError as err:  # not a disease classifier of the generated set's labels, e.g. a view classifier
        mlflow.set_tag("harness.adherence", f"skipped: {err}"[:5000])
        return {}
    adherence, ceiling = adherence_and_ceiling(model, table, args.real, args.seed)
    if ceiling is None:
        mlflow.set_tag("harness.adherence_ceiling", f"skipped: {_no_ceiling(args.real, list(adherence))}")
        return named("adherence", adherence)
    return named("adherence", adherence) | named("adherence_ceiling", ceiling)


# ------------------------------------------------------------------------------------ entry point


@dataclass
class ChecksConfig(StepConfig):
    generated: str = param(dataclasses.MISSING, "generated data set, e.g. chexpert:<dir>/CheXpert-v1.0-small or "
                           "chexpert:runs:/<generate run>/synthetic", project=True)
    real: str = param("phantom", "the real data set the model was fine-tuned on", project=True)
    views: str = param("frontal", "views of the real train split that were fine-tuned on (memorization and FID "
                       "reference)", choices=["frontal", "lateral", "all"], project=True)
    classifier_run: str = param("", "run whose classifier/model.pt (trained on real images) gives the FID "
                                "features and scores prompt adherence", project=True)
    resolution: int = param(64, project=True)
    view_epochs: int = param(4, project=True)
    batch_size: int = param(32, project=True)
    lr: float = param(1e-3)
    seed: int = param(0, project=True)
    threshold: float = param(0.95, "cosine similarity that counts as a near-copy", project=True)
    n_pairs: int = param(8, "closest pairs shown in the figure", key=False)
    device: str = param("auto", "auto = cuda when available, else cpu", key=False)
    threads: int = param(0, "torch CPU threads (0 = torch's default)", key=False)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)

    def check(self) -> None:
        self.at_least(16, "resolution")
        self.at_least(1, "view_epochs", "batch_size", "n_pairs")
        self.not_negative("threads")
        for flag in ("generated", "real"):  # an unknown format fails here, before any training
            try:
                DataSpec.parse(getattr(self, flag))
            except ValueError as err:
                raise ConfigError(f"--{flag}: {err}") from None


def parse_args(argv=None) -> ChecksConfig:
    return parse(ChecksConfig, argv, prog="python -m harness.checks")


def run(config: ChecksConfig) -> tracking.StepResult:
    """Run the checks on one generated data set; the result holds their metrics."""
    local = resolved(config, "generated", "real")  # artifact URIs -> local folders; params keep the URIs
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or threads)
    source = generated_source(local.generated)  # which checkpoint's images: the run's name and tags
    name = f"checks · {judged(source)}" if source is not None else "checks"
    try:
        with tracking.tracked_run(name, config.experiment,
                                  tags={"harness.entry_point": "checks", **source_tags(source)}) as active:
            tracking.log_params({k: v for k, v in config.params().items() if k != "experiment"})
            run_checks(local)
    finally:
        torch.set_num_threads(threads)
    return result(active.info.run_id)


def result(run_id: str) -> tracking.StepResult:
    return tracking.StepResult.of(run_id)


def main(argv=None) -> str:
    """The command line's entry: returns the MLflow run id."""
    return run(parse_args(argv)).run_id


def run_checks(args) -> dict[str, float]:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    res = args.resolution
    extractor_model = classifier_from_run(args.classifier_run) if args.classifier_run else None  # fail early
    gen = load_images(generated_table(args.generated), res)
    train = load_images(load_table(args.real, "train", views=args.views, labels=[]), res)
    held_out = load_images(load_table(args.real, "valid", views=args.views, labels=[]), res)
    mlflow.log_params({"n_generated_images": len(gen), "n_real_train_images": len(train)})

    view_model = train_view_classifier(args.real, res, args.view_epochs, args.seed, args.lr, args.batch_size, device)
    meta = view_model.harness_meta
    mlflow.set_tag("harness.view_classifier", f"{meta['cache_path']} ({'cached' if meta['cached'] else 'trained'})")
    log_classifier(view_model, **{k: v for k, v in meta.items() if k not in ("cache_path", "cached")})
    views = view_fraction(view_model.to(device), gen)

    mem = memorization(gen, train, args.threshold, k=args.n_pairs)
    reference = memorization(held_out, train, args.threshold, k=0)
    mlflow.log_dict({k: v for k, v in mem.items() if k != "similarities"}
                    | {"generated": gen.paths, "nn_similarity": mem["similarities"]}, "memorization/pairs.json")
    mlflow.log_image(closest_pairs_figure(mem["pairs"], args.n_pairs), "memorization/closest_pairs.png")

    adherence = {}
    if extractor_model is not None:
        mlflow.set_tag("harness.feature_extractor", f"run {args.classifier_run} {CLASSIFIER_ARTIFACT}")
        adherence = _adherence(args, extractor_model.to(device))
    else:
        mlflow.set_tag("harness.adherence", "skipped: no --classifier_run")
        extractor_model = view_model
        mlflow.set_tag("harness.feature_extractor", "view classifier")
    features = ClassifierFeatures(extractor_model.cpu(), size=res).to(device)
    fd = frechet_distance(train, gen, features, res)

    metrics = {"view_frontal_fraction": views["frontal_fraction"], "view_lateral_fraction": views["lateral_fraction"],
               "view_classifier_valid_auc": meta["valid_auc"], "view_classifier_valid_accuracy": meta["valid_accuracy"],
               "memorization_fraction": mem["fraction_above"], "memorization_max_similarity": mem["max_similarity"],
               "memorization_mean_similarity": mem["mean_nn_similarity"],
               "memorization_reference_max_similarity": reference["max_similarity"],
               "memorization_reference_fraction": reference["fraction_above"],
               "memorization_fraction_above_reference": float(np.mean(np.array(mem["similarities"])
                                                                      > reference["max_similarity"])),
               "frechet_distance": fd, **adherence}
    mlflow.log_metrics(metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
