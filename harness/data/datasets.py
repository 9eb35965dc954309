"""Data sets named ``FORMAT:PATH``, read into one table layout, and served as image tensors.

Every entry point names its data the same way::

    chexpert:/data/CheXpert-v1.0-small   official train.csv / valid.csv (/ test.csv)
    mimic:/data/mimic-cxr-jpg/2.0.0      MIMIC-CXR-JPG: metadata, chexpert and split csv.gz + files/
    folder:/data/fundus                  labels.csv: ``path`` [, ``split``, ``view``] + label columns
    phantom | phantom:DIR                the embedded phantom set (CheXpert layout)

``load_table`` turns any of them into one table: ``path`` (absolute), ``patient``, ``study``,
``view`` ("frontal"/"lateral"), ``projection`` (PA/AP/LATERAL/LL/""), then one float32 column
per label holding 1.0 (positive), 0.0 (negative) or NaN (unknown).

Label conventions for chexpert, mimic and phantom (the CheXpert labeler's output):

* a blank cell ("not mentioned") is **negative (0.0)**, as in the CheXpert paper's baselines.
  (torchxrayvision keeps blanks as NaN; we do not.)
* on rows with ``No Finding == 1`` every other requested label except ``Support Devices`` is 0:
  the labeler sets No Finding when no pathology is positive or uncertain, devices aside.
* ``-1`` (uncertain) follows the ``uncertain`` policy: ``ignore`` -> NaN (U-Ignore),
  ``zeros`` -> 0 (U-Zeros), ``ones`` -> 1 (U-Ones).

Views: CheXpert's Frontal/Lateral column; MIMIC's ViewPosition (PA/AP frontal, LATERAL/LL
lateral; other positions such as AP AXIAL or LAO are dropped, even for ``views="all"``); a folder
set's optional ``view`` column, free text (without it only ``views="all"`` is allowed).
Every image of every patient is kept (no one-image-per-patient subsampling).

For ``folder`` data sets a blank cell is unknown (NaN) - we know nothing about the labels'
meaning there - and there is no No-Finding rule; ``-1`` follows the same ``uncertain`` policy.

Checks: CSV columns and label values when reading, image existence in ``load_table`` (cheap),
decodability in ``ImageDataset`` when an image is loaded (``ImageDataset.verify`` decodes all
up front).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from harness.pathologies import CHEXPERT_LABELS, FINDINGS

FORMATS = ("chexpert", "mimic", "folder", "phantom")
SPLITS = ("train", "valid", "test")
VIEWS = ("frontal", "lateral", "all")
UNCERTAIN = ("ignore", "zeros", "ones")
META_COLUMNS = ["path", "patient", "study", "view", "projection"]

# Prefixes of the Path column in the official CheXpert csvs (archive folder names).
CHEXPERT_PREFIXES = ("CheXpert-v1.0-small/", "CheXpert-v1.0/")
MIMIC_FILES = {
    "metadata": "mimic-cxr-2.0.0-metadata.csv.gz",
    "labels": "mimic-cxr-2.0.0-chexpert.csv.gz",
    "split": "mimic-cxr-2.0.0-split.csv.gz",
}
MIMIC_SPLITS = {"train": "train", "valid": "validate", "test": "test"}
MIMIC_VIEWS = {"PA": "frontal", "AP": "frontal", "LATERAL": "lateral", "LL": "lateral"}
# Columns of a folder data set's labels.csv that are metadata, not labels.
FOLDER_META = ("path", "split", "view", "patient", "study")


# --------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class DataSpec:
    """A data set named ``FORMAT:PATH`` (``phantom`` alone needs no path)."""

    format: str
    path: Path | None = None

    @classmethod
    def parse(cls, text: str | DataSpec) -> DataSpec:
        if isinstance(text, DataSpec):
            return text
        fmt, sep, path = str(text).partition(":")
        fmt = fmt.strip()
        if fmt not in FORMATS:
            if not sep:
                raise ValueError(
                    f"data set {text!r} has no format: write FORMAT:PATH with FORMAT one of "
                    f"{', '.join(FORMATS)} (or just 'phantom')"
                )
            raise ValueError(f"unknown data format {fmt!r} in {text!r}; valid formats: {', '.join(FORMATS)}")
        if not path.strip():
            if fmt == "phantom":
                return cls("phantom", None)
            raise ValueError(f"data set {text!r} has no path: write {fmt}:DIR")
        return cls(fmt, Path(path.strip()).expanduser())

    def resolve(self) -> DataSpec:
        """The spec to load: ``phantom`` becomes ``chexpert`` at the phantom dir (built if needed)."""
        if self.format != "phantom":
            return self
        if self.path is not None:
            return DataSpec("chexpert", self.path)
        from harness.data.phantom import ensure_phantom  # lazy: only when loading

        return DataSpec("chexpert", Path(ensure_phantom()))

    def __str__(self) -> str:
        return self.format if self.path is None else f"{self.format}:{self.path}"


# --------------------------------------------------------------------------------------- table


def load_table(
    spec: str | DataSpec,
    split: str = "train",
    views: str = "frontal",
    uncertain: str = "ignore",
    labels: list[str] | None = None,
    skip_bad: bool = False,
) -> pd.DataFrame:
    """Read one split of a data set into the common table (see module docstring).

    ``labels=None`` means FINDINGS for chexpert/mimic/phantom and every label column for folder.
    ``views`` is ``frontal``, ``lateral`` or ``all``. Missing image files raise, or with
    ``skip_bad=True`` are dropped and listed in ``table.attrs["skipped"]``.
    """
    spec = DataSpec.parse(spec)
    _check_choice("split", split, SPLITS)
    _check_choice("views", views, VIEWS)
    _check_choice("uncertain", uncertain, UNCERTAIN)
    resolved = spec.resolve()
    root = resolved.path
    if not root.is_dir():
        raise FileNotFoundError(f"{spec}: directory {root} does not exist")
    root = Path(os.path.abspath(root))

    loader = {"chexpert": _load_chexpert, "mimic": _load_mimic, "folder": _load_folder}[resolved.format]
    table, labels, source = loader(root, split, labels)
    before = ", ".join(f"{k or 'other'}: {v}" for k, v in table["view"].value_counts().items()) or "none"
    if views != "all":
        if table.attrs.get("no_view_column"):
            raise ValueError(f"{source} has no 'view' column, so views={views!r} selects nothing; pass views='all'")
        table = table[table["view"] == views]
    if len(table) == 0:
        raise ValueError(f"no rows in {spec} for split={split!r}, views={views!r} (views in that split of {source}: {before})")

    for label in labels:
        table[label] = _apply_uncertain(table[label], uncertain)

    skipped = []
    exists = table["path"].map(os.path.isfile)
    if not exists.all():
        missing = table.loc[~exists, "path"].tolist()
        if not skip_bad:
            raise FileNotFoundError(
                f"{len(missing)} image file(s) listed in {source} do not exist, e.g. {missing[0]} "
                "(pass skip_bad=True to skip them)"
            )
        skipped = missing
        table = table[exists]
        if len(table) == 0:
            raise ValueError(f"no rows left in {spec} for split={split!r}, views={views!r}: all {len(missing)} image files are missing")

    table = table[META_COLUMNS + labels].reset_index(drop=True)
    table.attrs = {
        "labels": list(labels),
        "spec": str(spec),
        "split": split,
        "views": views,
        "uncertain": uncertain,
        "skipped": skipped,
    }
    return table


def _load_chexpert(root: Path, split: str, labels: list[str] | None):
    # Parsed with pandas, not xrv.datasets.CheX_Dataset, because CheX_Dataset does not fit:
    # it raises NotImplementedError for test.csv, raises KeyError for valid.csv when the
    # directory path contains "train" (it tests `'train' in csvpath` on the whole path), turns -1
    # into NaN in .labels (we need -1 for U-Zeros/U-Ones) and resets numpy's global RNG to seed 0.
    # We keep its conventions: view from Frontal/Lateral (+AP/PA), the No-Finding rule without
    # Support Devices, and its path rule (strip the archive prefix, join with the directory).
    csv = root / f"{split}.csv"
    if not csv.is_file():
        raise FileNotFoundError(f"chexpert: {csv} does not exist (split {split!r} reads {split}.csv)")
    labels = _check_labels(FINDINGS if labels is None else labels, CHEXPERT_LABELS, "CheXpert")
    df = pd.read_csv(csv)
    _require_columns(df, ["Path", "Frontal/Lateral", "AP/PA"] + labels, csv)

    rel = df["Path"].astype(str)
    for prefix in CHEXPERT_PREFIXES:
        rel = rel.str.removeprefix(prefix)
    # Equal to DIR.parent / Path for prefixed paths when DIR is the archive folder itself, and still
    # right when DIR was renamed; unprefixed paths are relative to DIR.
    paths = [os.path.join(root, p) for p in rel]

    ids = rel.str.extract(r"(patient\d+)/(study\d+)/")
    if ids.isna().any().any():
        bad = df.loc[ids.isna().any(axis=1), "Path"].iloc[0]
        raise ValueError(f"{csv}: column 'Path' has a value without patientNNN/studyN/: {bad!r}")

    side = df["Frontal/Lateral"].fillna("").astype(str)
    bad_side = sorted(set(side) - {"Frontal", "Lateral"})
    if bad_side:
        raise ValueError(f"{csv}: column 'Frontal/Lateral' has values {bad_side}; expected Frontal or Lateral")
    appa = df["AP/PA"].fillna("").astype(str)
    # CheXpert records no projection for laterals, and a handful of frontals say LL/RL: keep AP/PA/LL.
    projection = appa.where(appa.isin(["PA", "AP", "LL"]), "")

    table = pd.DataFrame(
        {
            "path": paths,
            "patient": ids[0],
            "study": ids[0] + "/" + ids[1],
            "view": side.str.lower(),
            "projection": projection,
        }
    )
    no_finding = _label_values(df, "No Finding", csv) if "No Finding" in df.columns else None
    for label in labels:
        table[label] = _chexpert_convention(_label_values(df, label, csv), label, no_finding)
    return table, labels, str(csv)


def _load_mimic(root: Path, split: str, labels: list[str] | None):
    # xrv.datasets.MIMIC_Dataset fits for joining the label csv with the DICOM metadata on
    # (subject_id, study_id) and taking the view from ViewPosition. We override its defaults
    # (views=["PA"] would drop AP and laterals, unique_patients=True would keep one image per
    # patient), read its .csv (which keeps raw -1 and blanks; its .labels has -1 -> NaN), restore
    # numpy's global RNG (it calls np.random.seed(0)), and restore Support Devices, which it
    # zeroes on No-Finding rows. It knows nothing of the split csv: we merge that on dicom_id.
    files = {k: root / name for k, name in MIMIC_FILES.items()}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"mimic: {path} does not exist")
    labels = _check_labels(FINDINGS if labels is None else labels, CHEXPERT_LABELS, "MIMIC-CXR (CheXpert labeler)")
    _require_columns(_header(files["metadata"]), ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"], files["metadata"])
    label_header = _header(files["labels"])
    _require_columns(label_header, ["subject_id", "study_id"] + labels, files["labels"])
    split_csv = pd.read_csv(files["split"])
    _require_columns(split_csv, ["dicom_id", "split"], files["split"])

    import torchxrayvision as xrv  # lazy: slow to import, only needed here

    state = np.random.get_state()
    try:
        ds = xrv.datasets.MIMIC_Dataset(
            imgpath=str(root / "files"),
            csvpath=str(files["labels"]),
            metacsvpath=str(files["metadata"]),
            views=["*"],
            unique_patients=False,
        )
    finally:
        np.random.set_state(state)
    df = ds.csv
    # Labeled studies with no image in the metadata come out of xrv's left join without a dicom_id.
    df = df[df["dicom_id"].notna()].reset_index(drop=True)
    if "Support Devices" in labels:
        raw = pd.read_csv(files["labels"], usecols=["subject_id", "study_id", "Support Devices"])
        df = df.drop(columns="Support Devices").merge(raw, on=["subject_id", "study_id"], how="left")

    df = df.merge(split_csv[["dicom_id", "split"]], on="dicom_id", how="left")
    if df["split"].isna().any():
        missing = df.loc[df["split"].isna(), "dicom_id"]
        raise ValueError(f"{files['split']}: {len(missing)} image(s) have no split row, e.g. dicom_id {missing.iloc[0]!r}")
    bad_split = sorted(set(df["split"]) - set(MIMIC_SPLITS.values()))
    if bad_split:
        raise ValueError(f"{files['split']}: column 'split' has values {bad_split}; expected {sorted(MIMIC_SPLITS.values())}")
    df = df[df["split"] == MIMIC_SPLITS[split]].reset_index(drop=True)

    subject = df["subject_id"].astype("int64").astype(str)
    study = df["study_id"].astype("int64").astype(str)
    dicom = df["dicom_id"].astype(str)
    position = df["ViewPosition"].fillna("").astype(str)
    table = pd.DataFrame(
        {
            "path": [os.path.join(root, "files", f"p{p[:2]}", f"p{p}", f"s{s}", f"{d}.jpg") for p, s, d in zip(subject, study, dicom)],
            "patient": subject,
            "study": study,
            "view": position.map(MIMIC_VIEWS),
            "projection": position.where(position.isin(list(MIMIC_VIEWS)), ""),
        }
    )
    no_finding = _label_values(df, "No Finding", files["labels"]) if "No Finding" in df.columns else None
    for label in labels:
        table[label] = _chexpert_convention(_label_values(df, label, files["labels"]), label, no_finding)
    # Other positions (AP AXIAL, LAO, SWIMMERS, blank, ...) are neither frontal nor lateral: we
    # drop them here, so even views="all" means PA/AP/LATERAL/LL only.
    return table[table["view"].notna()].reset_index(drop=True), labels, str(files["labels"])


def _load_folder(root: Path, split: str, labels: list[str] | None):
    # Plain pandas: a generic labels.csv, no torchxrayvision class describes it.
    csv = root / "labels.csv"
    if not csv.is_file():
        raise FileNotFoundError(f"folder: {csv} does not exist")
    df = pd.read_csv(csv)
    _require_columns(df, ["path"], csv)
    available = [c for c in df.columns if c not in FOLDER_META]
    if not available:
        raise ValueError(f"{csv} has no label columns (every column besides {', '.join(FOLDER_META)} is a label)")
    labels = _check_labels(available if labels is None else labels, available, str(csv))

    if "split" in df.columns:
        splits = df["split"].fillna("").astype(str)
        bad = sorted(set(splits) - set(SPLITS))
        if bad:
            raise ValueError(f"{csv}: column 'split' has values {bad}; expected {', '.join(SPLITS)}")
    elif split != "train":
        raise ValueError(f"{csv} has no 'split' column, so every row is split 'train'; split={split!r} selects nothing")
    else:
        splits = pd.Series("train", index=df.index)
    df = df[splits == split].reset_index(drop=True)

    rel = df["path"].astype(str)
    patient = df["patient"].astype(str) if "patient" in df.columns else rel
    table = pd.DataFrame(
        {
            "path": [os.path.join(root, p) for p in rel],  # absolute values stay as they are
            "patient": patient,
            "study": df["study"].astype(str) if "study" in df.columns else patient,
            "view": df["view"].fillna("").astype(str) if "view" in df.columns else "",
            "projection": "",
        }
    )
    for label in labels:
        table[label] = _label_values(df, label, csv)  # blank stays NaN (unknown) here
    table.attrs["no_view_column"] = "view" not in df.columns
    return table, labels, str(csv)


# --------------------------------------------------------------------------------------- helpers


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_labels(labels, valid, where: str) -> list[str]:
    labels = list(labels)
    unknown = [l for l in labels if l not in valid]
    if unknown:
        hints = []
        for l in unknown:
            close = difflib.get_close_matches(l, valid, n=1) or [v for v in valid if l.lower() in v.lower()][:1]
            hints.append(f"{l!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown label(s) {', '.join(hints)} for {where}; valid labels: {', '.join(valid)}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels {labels} name a label twice")
    return labels


def _header(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, nrows=0)


def _require_columns(df: pd.DataFrame, columns, csv) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{csv} is missing column(s) {missing}; it has {list(df.columns)}")


def _label_values(df: pd.DataFrame, label: str, csv) -> pd.Series:
    """A label column as float: 1, 0, -1 or NaN (blank); anything else is an error."""
    raw = df[label]
    values = pd.to_numeric(raw, errors="coerce")
    bad = (raw.notna() & values.isna()) | (values.notna() & ~values.isin([1, 0, -1]))
    if bad.any():
        examples = sorted({str(v) for v in raw[bad]})[:5]
        raise ValueError(f"{csv}: column {label!r} has values {examples}; expected 1, 0, -1 or blank")
    return values.astype("float64")


def _chexpert_convention(values: pd.Series, label: str, no_finding: pd.Series | None) -> pd.Series:
    values = values.copy()
    if no_finding is not None and label not in ("No Finding", "Support Devices"):
        values[no_finding == 1] = 0.0
    return values.fillna(0.0)  # blank = not mentioned = negative


def _apply_uncertain(values: pd.Series, policy: str) -> pd.Series:
    replacement = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}[policy]
    return values.mask(values == -1, replacement).astype("float32")


# --------------------------------------------------------------------------------------- summary


def summarize(table: pd.DataFrame) -> dict:
    """Counts for logging: images, patients, studies, views, and per label positive/negative/unknown."""
    labels = table.attrs.get("labels") or [c for c in table.columns if c not in META_COLUMNS]
    summary = {
        "n_images": int(len(table)),
        "n_patients": int(table["patient"].nunique()),
        "n_studies": int(table["study"].nunique()),
        "views": {str(k or "unknown"): int(v) for k, v in table["view"].value_counts().sort_index().items()},
        "labels": {
            label: {
                "positive": int((table[label] == 1).sum()),
                "negative": int((table[label] == 0).sum()),
                "unknown": int(table[label].isna().sum()),
            }
            for label in labels
        },
        "n_skipped": len(table.attrs.get("skipped", [])),
    }
    for key in ("spec", "split", "views", "uncertain"):
        if key in table.attrs:
            summary[key if key != "views" else "views_filter"] = table.attrs[key]
    return summary


# --------------------------------------------------------------------------------------- images


def image_tensor(img: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """[channels, resolution, resolution] in [-1, 1] from a grey (L) or RGB image, as ``ImageDataset``
    serves it: resized on the short side and center-cropped (bicubic)."""
    img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:  # grey -> 3 channels
        arr = np.repeat(arr, channels, axis=2)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


class ImageDataset(torch.utils.data.Dataset):
    """Images of a ``load_table`` table as ``{"pixel_values", "labels", "index"}``.

    ``pixel_values``: FloatTensor[channels, resolution, resolution] in [-1, 1] - grayscale is
    replicated to ``channels`` (3 for Stable Diffusion, 1 for classifiers), colour is converted
    to grey for ``channels=1``; non-square images are resized on the short side and center-cropped.
    ``labels``: FloatTensor[L] with NaN kept. ``index``: the table row the item came from.

    An undecodable image raises, or with ``skip_bad=True`` is recorded in ``skipped`` and the
    next readable row is returned instead. With DataLoader workers ``skipped`` fills in the worker
    processes, not here: call ``verify()`` first for an exact count (it decodes every image).
    """

    def __init__(self, table: pd.DataFrame, labels: list[str] | None = None, resolution: int = 64, channels: int = 3, skip_bad: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels={channels} is not 1 or 3")
        if resolution <= 0:
            raise ValueError(f"resolution={resolution} must be positive")
        labels = list(table.attrs.get("labels", []) if labels is None else labels)
        missing = [l for l in labels if l not in table.columns]
        if missing:
            raise ValueError(f"label column(s) {missing} are not in the table; it has {list(table.columns)}")
        if "path" not in table.columns:
            raise ValueError(f"the table has no 'path' column; it has {list(table.columns)}")
        self.paths = table["path"].astype(str).tolist()
        self.rows = list(range(len(table)))  # table rows still served (verify() can drop some)
        self.labels = list(labels)
        self.targets = torch.tensor(table[labels].to_numpy(dtype=np.float32)) if labels else torch.zeros(len(table), 0)
        self.resolution = resolution
        self.channels = channels
        self.skip_bad = skip_bad
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        for step in range(len(self.rows)):
            row = self.rows[(i + step) % len(self.rows)]
            try:
                pixels = self.load_image(self.paths[row])
            except (OSError, ValueError):
                if not self.skip_bad:
                    raise
                if self.paths[row] not in self.skipped:
                    self.skipped.append(self.paths[row])
                continue
            return {"pixel_values": pixels, "labels": self.targets[row], "index": row}
        raise RuntimeError(f"none of the {len(self.rows)} images could be read; skipped: {self.skipped[:3]} ...")

    def verify(self) -> list[str]:
        """Decode every image now; drop unreadable ones (skip_bad=True) or raise. Returns them."""
        bad = []
        for row in self.rows:
            try:
                self._open(self.paths[row])
            except (OSError, ValueError):
                if not self.skip_bad:
                    raise
                bad.append(self.paths[row])
        bad_set = set(bad)
        self.rows = [r for r in self.rows if self.paths[r] not in bad_set]
        self.skipped.extend(p for p in bad if p not in self.skipped)
        if not self.rows:
            raise ValueError(f"all {len(bad)} images are unreadable, e.g. {bad[0]}")
        return bad

    def load_image(self, path: str) -> torch.Tensor:
        return image_tensor(self._open(path), self.resolution, self.channels)

    def _open(self, path: str) -> Image.Image:
        try:
            with Image.open(path) as img:
                img.load()
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {path} does not exist") from None
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise OSError(f"cannot decode image {path}: {err}") from err
        if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # 16-bit / float grey -> 8-bit
            arr = np.asarray(img, dtype=np.float32)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
        if self.channels == 1 or img.mode in ("L", "LA", "1"):
            return img.convert("L")
        return img.convert("RGB")


class CachedImages(torch.utils.data.Dataset):
    """An ``ImageDataset`` whose decoded items stay in memory up to ``cache_bytes`` (the embedded
    phantom fits whole at training resolutions), so epochs after the first skip JPEG decoding."""

    def __init__(self, images: ImageDataset, cache_bytes: int = 2 << 30):
        self.images, self.cache, self.cache_left = images, {}, cache_bytes

    @property
    def skipped(self) -> list[str]:
        return self.images.skipped

    def preload(self) -> bool:
        """Decode every image now if all fit, so no training step waits on decoding."""
        if not len(self):
            return False
        size = self[0]["pixel_values"].nbytes
        if size * (len(self) - 1) > self.cache_left:
            return False
        for i in range(len(self)):
            self[i]
        return True

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        if i in self.cache:
            return self.cache[i]
        item = self.images[i]
        size = item["pixel_values"].nbytes
        if size <= self.cache_left:
            self.cache[i], self.cache_left = item, self.cache_left - size
        return item


def write_csv(path, header: list[str], rows: list[dict]) -> None:
    """Write rows as a CSV the loaders read (the CheXpert split files are written this way)."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
