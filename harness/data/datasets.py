"""Data sets named ``FORMAT:PATH``, read into one table layout, and served as image tensors.

Every entry point names its data the same way::

    chexpert:/data/CheXpert-v1.0-small   official train.csv / valid.csv (/ test.csv)
    mimic:/data/mimic-cxr-jpg/2.0.0      MIMIC-CXR-JPG: metadata, chexpert and split csv.gz + files/
    folder:/data/fundus                  labels.csv: ``path`` [, ``split``, ``view``] + label columns
    csv:/data/airogs?file=train_labels.csv&path=challenge_id&label=class&suffix=.jpg&find=1
                                         any label CSV, its columns named by options (DataSpec)
    imagefolder:/data/set                Hugging Face imagefolder (metadata.csv with ``file_name``)
                                         or torchvision ImageFolder (one folder per class)
    phantom | phantom:DIR                the embedded phantom set (CheXpert layout)
    chexpert:runs:/<run id>/synthetic    PATH as an MLflow artifact URI (runs:/, mlflow-artifacts:/),
                                         e.g. a generate run's data set: the entry points download it
                                         once into a local cache (harness.artifacts) and load that

Splits a data set does not ship are seeded, patient-wise hold-outs (``HOLDOUT_FRACTION`` of the
patients each, chosen by a hash of ``HOLDOUT_SEED`` and the patient id; the spec's ``holdout`` and
``seed`` options change them), and the train split loses those patients, so the fine-tune, the
generator's data prompts and the classifiers, which all read "train", never see them:

* a ``chexpert`` folder without test.csv (CheXpert-v1.0-small as shipped): the official,
  radiologist-labelled valid.csv is the **test** split and "valid" is a hold-out of train.csv.
  Folders written by ``harness.generate`` (``generate.json`` beside them) keep their valid.csv.
* ``csv`` and ``imagefolder``: "valid" and "test", when there is no split column (or split
  folder) for them, are two disjoint hold-outs of the train rows; without a patient column every
  image is its own patient. ``folder`` holds nothing out unless asked (``holdout=``): a
  labels.csv without a split column is all train, as it always was.

Paths in a label CSV (or metadata.csv) are relative to its data folder and must stay inside it;
absolute paths need ``absolute=1``. A categorical label column (``label=class`` holding RG/NRG)
becomes one one-hot label per value (``RG``, ``NRG``); a blank cell is unknown in all of them.

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

For ``folder``, ``csv`` and ``imagefolder`` data sets a blank cell is unknown (NaN) - we know
nothing about the labels' meaning there - and there is no No-Finding rule; ``-1`` follows the same
``uncertain`` policy.

Checks: CSV columns and label values when reading, image existence in ``load_table`` (cheap),
decodability in ``ImageDataset`` when an image is loaded (``ImageDataset.verify`` decodes all
up front).
"""

from __future__ import annotations

import difflib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps

from harness.pathologies import CHEXPERT_LABELS, FINDINGS

FORMATS = ("chexpert", "mimic", "folder", "csv", "imagefolder", "phantom")
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
# Columns of a label CSV that are metadata, not labels (besides the path column).
FOLDER_META = ("path", "split", "view", "patient", "study")

# The seeded, patient-wise hold-out that stands in for a split a data set does not ship: each
# held-out split gets this fraction of the train patients (chosen by HOLDOUT_SEED), and the train
# split loses them, so no fine-tune, prompt or classifier trained on "train" ever sees them.
HOLDOUT_FRACTION = 0.1
HOLDOUT_SEED = 0
# harness.generate writes this beside the CheXpert-layout folder it makes: such a folder's
# valid.csv is its model-selection split, written on purpose, not an official test set.
GENERATED_MARKER = "generate.json"
# A spec's PATH may be an MLflow artifact URI: the entry points download it into a local cache
# (harness.artifacts.local_spec) and hand this module the local folder; this module never talks to MLflow.
ARTIFACT_URI_SCHEMES = ("runs:/", "mlflow-artifacts:")
# The options each format takes after ``?`` in its spec (see DataSpec).
LABEL_CSV_OPTIONS = ("file", "path", "label", "suffix", "find", "patient", "absolute", "holdout", "seed")
OPTIONS = {
    "chexpert": ("holdout", "seed"),
    "phantom": ("holdout", "seed"),
    "mimic": (),
    "csv": LABEL_CSV_OPTIONS,
    "folder": LABEL_CSV_OPTIONS,
    "imagefolder": ("label", "holdout", "seed"),
}
FLAG_OPTIONS = ("find", "absolute")
# torchvision's ImageFolder extensions: the files a class folder's images are.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Split folder names of a Hugging Face imagefolder (and of the usual torchvision train/val trees).
SPLIT_DIRS = {"train": ("train",), "valid": ("valid", "validation", "val", "dev"), "test": ("test",)}


# --------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class DataSpec:
    """A data set named ``FORMAT:PATH`` (``phantom`` alone needs no path), optionally followed by
    ``?key=value&key=value`` options (URL-encoded; a ``?`` in PATH is not supported)::

        chexpert:DIR?holdout=0.2&seed=1
        csv:DIR?file=train_labels.csv&path=challenge_id&label=class&suffix=.jpg&find=1

    chexpert / phantom: ``holdout`` (fraction of train patients held out for the valid split of a
    folder without test.csv, default HOLDOUT_FRACTION; 0 = valid.csv is the valid split and there
    is no test split), ``seed`` (default HOLDOUT_SEED).
    csv / folder (a label CSV): ``file`` (the CSV inside DIR, default labels.csv), ``path`` (its
    image path column, default ``path``), ``label`` (a categorical column: one one-hot label per
    value; without it every other column is a 1/0/-1/blank label), ``suffix`` (appended to each
    path, e.g. ``.jpg``), ``find=1`` (look each image up by file name in DIR's subfolders),
    ``patient`` (patient column, default ``patient`` if present), ``absolute=1`` (allow absolute
    paths), ``holdout`` / ``seed`` (the hold-out of splits the CSV does not have; ``folder``
    defaults to holdout=0: without a split column every row is train).
    imagefolder: ``label`` (categorical column of metadata.csv), ``holdout``, ``seed``.
    mimic takes none.
    """

    format: str
    path: Path | None = None
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str | DataSpec) -> DataSpec:
        if isinstance(text, DataSpec):
            return text
        head, _, query = str(text).partition("?")
        fmt, sep, path = head.partition(":")
        fmt = fmt.strip()
        if fmt not in FORMATS:
            if not sep:
                raise ValueError(
                    f"data set {text!r} has no format: write FORMAT:PATH with FORMAT one of "
                    f"{', '.join(FORMATS)} (or just 'phantom')"
                )
            raise ValueError(f"unknown data format {fmt!r} in {text!r}; valid formats: {', '.join(FORMATS)}")
        options = _parse_options(fmt, query, text)
        if not path.strip():
            if fmt == "phantom":
                return cls("phantom", None, options)
            raise ValueError(f"data set {text!r} has no path: write {fmt}:DIR")
        return cls(fmt, Path(path.strip()).expanduser(), options)

    def option(self, key: str, default=None):
        """An option's value: a float for holdout, an int for seed, a bool for flags, else text."""
        value = dict(self.options).get(key)
        if value is None:
            return default
        return _option_value(key, value)

    def resolve(self) -> DataSpec:
        """The spec to load: ``phantom`` becomes ``chexpert`` at the phantom dir (built if needed);
        a ``chexpert`` folder with no split csv of its own but the archive folder inside it
        (``CheXpert-v1.0-small/``, as the zip unpacks and as ``harness.generate`` logs its data
        set) is read as that archive folder."""
        if self.format not in ("phantom", "chexpert"):
            return self
        if self.path is not None:
            return DataSpec("chexpert", chexpert_root(self.path), self.options)
        from harness.data.phantom import ensure_phantom  # lazy: only when loading

        return DataSpec("chexpert", Path(ensure_phantom()), self.options)

    def __str__(self) -> str:
        text = self.format if self.path is None else f"{self.format}:{self.path}"
        if self.options:
            text += "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in self.options)
        return text


def chexpert_root(path: Path) -> Path:
    """``path``, or the CheXpert archive folder inside it when ``path`` has no split csv itself."""
    if any((path / f"{split}.csv").is_file() for split in SPLITS):
        return path
    for prefix in CHEXPERT_PREFIXES:
        inner = path / prefix.rstrip("/")
        if any((inner / f"{split}.csv").is_file() for split in SPLITS):
            return inner
    return path


def is_artifact_uri(path) -> bool:
    """Whether a spec's PATH is an MLflow artifact URI (``runs:/...``, ``mlflow-artifacts:/...``),
    which the entry points download before loading (``harness.artifacts.local_spec``)."""
    return str(path).startswith(ARTIFACT_URI_SCHEMES)


def _parse_options(fmt: str, query: str, text) -> tuple[tuple[str, str], ...]:
    if not query:
        return ()
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(f"data set {text!r}: options after '?' must read key=value&key=value") from None
    keys = [k for k, _ in pairs]
    allowed = OPTIONS[fmt]
    for key, value in pairs:
        if key not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no options"
            raise ValueError(f"data set {text!r}: unknown option {key!r}; {fmt} {takes}")
        if keys.count(key) > 1:
            raise ValueError(f"data set {text!r}: option {key!r} is given twice")
        if not value:
            raise ValueError(f"data set {text!r}: option {key!r} has no value")
        try:
            _option_value(key, value)
        except ValueError as err:
            raise ValueError(f"data set {text!r}: {err}") from None
    return tuple(sorted(pairs))


def _option_value(key: str, value: str):
    if key == "holdout":
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        # Below one half, so that two hold-outs (valid and test) still leave patients to train on.
        if not 0.0 <= fraction < 0.5:
            raise ValueError(f"option holdout={value!r} is not a fraction in [0, 0.5)")
        return fraction
    if key == "seed":
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"option seed={value!r} is not an integer") from None
    if key in FLAG_OPTIONS:
        if value.lower() not in ("1", "0", "true", "false"):
            raise ValueError(f"option {key}={value!r} is not 1, 0, true or false")
        return value.lower() in ("1", "true")
    return value


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

    ``labels=None`` means FINDINGS for chexpert/mimic/phantom and every label of the others.
    A split the data set does not ship is a seeded hold-out (see the module docstring);
    ``table.attrs["split_source"]`` says where the rows came from, ``attrs["holdout"]`` the
    hold-out's fraction and seed (both in ``summarize``).
    ``views`` is ``frontal``, ``lateral`` or ``all``. Missing image files raise, or with
    ``skip_bad=True`` are dropped and listed in ``table.attrs["skipped"]``.
    """
    spec = DataSpec.parse(spec)
    _check_choice("split", split, SPLITS)
    _check_choice("views", views, VIEWS)
    _check_choice("uncertain", uncertain, UNCERTAIN)
    if spec.path is not None and is_artifact_uri(spec.path):
        raise FileNotFoundError(f"{spec}: {spec.path} is an MLflow artifact URI; download it first "
                                "(harness.artifacts.local_spec, as every entry point does)")
    resolved = spec.resolve()
    root = resolved.path
    if not root.is_dir():
        raise FileNotFoundError(f"{spec}: directory {root} does not exist")
    root = Path(os.path.abspath(root))

    loaders = {"chexpert": _load_chexpert, "mimic": _load_mimic, "folder": _load_folder, "csv": _load_csv,
               "imagefolder": _load_imagefolder}
    table, labels, source = loaders[resolved.format](root, split, labels, resolved)
    provenance = {k: table.attrs[k] for k in ("split_source", "holdout") if k in table.attrs}
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
            find = resolved.format in ("csv", "folder") and not resolved.option("find", False)
            raise FileNotFoundError(
                f"{len(missing)} image file(s) listed in {source} do not exist, e.g. {missing[0]} "
                "(pass skip_bad=True to skip them" + ("; add find=1 to the spec if the CSV lists images by "
                                                     "file name in subfolders)" if find else ")")
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
        **provenance,
    }
    return table


def _load_chexpert(root: Path, split: str, labels: list[str] | None, spec: DataSpec):
    labels = _check_labels(FINDINGS if labels is None else labels, CHEXPERT_LABELS, "CheXpert")
    fraction = _chexpert_holdout(root, spec)
    if not fraction:
        csv = root / f"{split}.csv"
        if not csv.is_file():
            raise FileNotFoundError(f"chexpert: {csv} does not exist (split {split!r} reads {split}.csv)")
        table = _read_chexpert(csv, labels)
        table.attrs["split_source"] = csv.name
        return table, labels, str(csv)
    # No test.csv (CheXpert-v1.0-small as shipped): the radiologist-labelled valid.csv is the test
    # split, and model selection gets a hold-out of train.csv instead.
    csv = root / ("valid.csv" if split == "test" else "train.csv")
    if not csv.is_file():
        raise FileNotFoundError(f"chexpert: {csv} does not exist (split {split!r} reads {csv.name}, "
                                f"as {root} has no test.csv)")
    table = _read_chexpert(csv, labels)
    if split == "test":
        table.attrs["split_source"] = "valid.csv (the official validation set; there is no test.csv)"
        return table, labels, str(csv)
    seed = spec.option("seed", HOLDOUT_SEED)
    return _holdout(table, split, ["valid"], fraction, seed, csv), labels, str(csv)


def _chexpert_holdout(root: Path, spec: DataSpec) -> float:
    """The valid hold-out fraction: HOLDOUT_FRACTION for a folder without test.csv, 0 otherwise
    (and for harness.generate's folders, whose valid.csv is written for model selection)."""
    has_test = (root / "test.csv").is_file()
    given = spec.option("holdout")
    if given is None:
        return 0.0 if has_test or (root.parent / GENERATED_MARKER).is_file() else HOLDOUT_FRACTION
    if given and has_test:
        raise ValueError(f"{spec}: holdout applies to a chexpert folder without test.csv, and {root} has one")
    return given


def _read_chexpert(csv: Path, labels: list[str]) -> pd.DataFrame:
    # Parsed with pandas, not xrv.datasets.CheX_Dataset, because CheX_Dataset does not fit:
    # it raises NotImplementedError for test.csv, raises KeyError for valid.csv when the
    # directory path contains "train" (it tests `'train' in csvpath` on the whole path), turns -1
    # into NaN in .labels (we need -1 for U-Zeros/U-Ones) and resets numpy's global RNG to seed 0.
    # We keep its conventions: view from Frontal/Lateral (+AP/PA), the No-Finding rule without
    # Support Devices, and its path rule (strip the archive prefix, join with the directory).
    root = csv.parent
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
    return table


def _load_mimic(root: Path, split: str, labels: list[str] | None, spec: DataSpec):
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


def _load_folder(root: Path, split: str, labels: list[str] | None, spec: DataSpec):
    # A csv data set whose hold-out is off unless asked for: folder's rule has always been that a
    # labels.csv without a split column is all train.
    return _load_label_csv(root, split, labels, spec, default_holdout=0.0)


def _load_csv(root: Path, split: str, labels: list[str] | None, spec: DataSpec):
    return _load_label_csv(root, split, labels, spec, default_holdout=HOLDOUT_FRACTION)


def _load_label_csv(root: Path, split: str, labels: list[str] | None, spec: DataSpec, default_holdout: float):
    # Plain pandas: a generic label CSV, no torchxrayvision class describes it.
    name = spec.option("file", "labels.csv")
    csv = Path(os.path.normpath(root / name))
    if not _is_inside(csv, root):
        raise ValueError(f"{spec}: file={name!r} is outside {root}")
    if not csv.is_file():
        raise FileNotFoundError(f"{spec.format}: {csv} does not exist")
    how = _LabelCsv.from_spec(spec)
    df = _read_str_csv(csv)
    _require_columns(df, [how.path], csv)
    ids = df[how.path].str.strip()
    df[how.path] = _image_paths(df[how.path], root, csv, how)
    splits = _split_column(df, csv)
    table, labels = _labelled_table(df, how, labels, csv, ids)
    fraction = spec.option("holdout", default_holdout)
    return _pick_split(table, splits, split, fraction, spec.option("seed", HOLDOUT_SEED), csv), labels, str(csv)


def _load_imagefolder(root: Path, split: str, labels: list[str] | None, spec: DataSpec):
    # Hugging Face's imagefolder: split folders (train/, validation/, test/) or none, each with a
    # metadata.csv (file_name + label columns) or one folder per class (torchvision's ImageFolder).
    roots = {s: d for s in SPLITS for d in [_split_dir(root, s)] if d is not None} or {"train": root}
    frames = [_imagefolder_frame(base, spec).assign(split=s) for s, base in roots.items()]
    modes = {bool(frame.attrs["metadata"]) for frame in frames}
    if len(modes) > 1:
        raise ValueError(f"imagefolder {root}: some split folders have a metadata.csv and some do not; "
                         "give every split folder one, or none")
    df = pd.concat(frames, ignore_index=True)
    how = _LabelCsv(path="file_name", label=spec.option("label") if modes == {True} else "label")
    one_root = roots == {"train": root}
    source = root / "metadata.csv" if one_root and modes == {True} else root
    ids = pd.Series([os.path.relpath(p, root) for p in df["file_name"]])
    table, labels = _labelled_table(df, how, labels, source, ids)
    fraction, seed = spec.option("holdout", HOLDOUT_FRACTION), spec.option("seed", HOLDOUT_SEED)
    return _pick_split(table, None if one_root else df["split"], split, fraction, seed, source), labels, str(source)


def _split_dir(root: Path, split: str) -> Path | None:
    found = [root / n for n in SPLIT_DIRS[split] if (root / n).is_dir()]
    if len(found) > 1:
        raise ValueError(f"imagefolder {root}: {', '.join(p.name for p in found)} are all split {split!r}; keep one")
    return found[0] if found else None


def _imagefolder_frame(base: Path, spec: DataSpec) -> pd.DataFrame:
    """One split folder as rows: its metadata.csv (paths made absolute and checked) or its class
    folders (``file_name``, ``label`` = the class folder's name)."""
    metadata = base / "metadata.csv"
    if metadata.is_file():
        df = _read_str_csv(metadata)
        _require_columns(df, ["file_name"], metadata)
        df["file_name"] = _image_paths(df["file_name"], base, metadata, _LabelCsv(path="file_name"))
        df.attrs["metadata"] = True
        return df
    if spec.option("label") is not None:
        raise ValueError(f"{spec}: option label names a metadata.csv column, and {base} has no metadata.csv")
    rows = [(os.path.join(folder, f), cls.name)
            for cls in sorted(p for p in base.iterdir() if p.is_dir())
            for folder, _, files in sorted(os.walk(cls)) for f in sorted(files)
            if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not rows:
        raise FileNotFoundError(f"imagefolder: {base} has neither a metadata.csv nor class folders with images "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
    df = pd.DataFrame(rows, columns=["file_name", "label"])
    df.attrs["metadata"] = False
    return df


@dataclass(frozen=True)
class _LabelCsv:
    """How a label CSV's columns are read (the csv / folder options, see DataSpec)."""

    path: str = "path"
    label: str | None = None
    suffix: str = ""
    find: bool = False
    patient: str | None = None
    absolute: bool = False

    @classmethod
    def from_spec(cls, spec: DataSpec) -> _LabelCsv:
        return cls(path=spec.option("path", "path"), label=spec.option("label"), suffix=spec.option("suffix", ""),
                   find=spec.option("find", False), patient=spec.option("patient"),
                   absolute=spec.option("absolute", False))


def _read_str_csv(csv: Path) -> pd.DataFrame:
    # Every cell as text (blank = NaN): ids such as 00042 and class names stay as written.
    return pd.read_csv(csv, dtype=str)


def _is_inside(path, root) -> bool:
    return os.path.commonpath([os.path.normpath(path), os.path.normpath(root)]) == os.path.normpath(root)


def _image_paths(values: pd.Series, base: Path, csv: Path, how: _LabelCsv) -> list[str]:
    """A CSV's image path column as absolute paths; a path that leaves ``base`` is refused, and an
    absolute one unless ``absolute=1``."""
    if values.isna().any():
        raise ValueError(f"{csv}: column {how.path!r} has a blank cell (line {_first_blank_line(values)})")
    index = _file_index(base) if how.find else None
    paths = []
    for value in values:
        name = value.strip() + how.suffix
        if os.path.isabs(name):
            if not how.absolute:
                raise ValueError(f"{csv}: column {how.path!r} has an absolute path {name!r}; "
                                 "add absolute=1 to the data spec to allow paths outside the data folder")
            paths.append(os.path.normpath(name))
            continue
        path = os.path.normpath(os.path.join(base, name))
        if not _is_inside(path, base):
            raise ValueError(f"{csv}: column {how.path!r} has {name!r}, which is outside {base}")
        if index is not None and not os.path.isfile(path):
            path = _find(index, os.path.basename(name), base, path)
        paths.append(path)
    return paths


def _first_blank_line(values: pd.Series) -> int:
    return int(values.isna().to_numpy().argmax()) + 2  # the CSV's line: after the header, from 1


def _file_index(base: Path) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for folder, _, files in os.walk(base):
        for f in files:
            index.setdefault(f, []).append(os.path.join(folder, f))
    return index


def _find(index: dict[str, list[str]], name: str, base: Path, fallback: str) -> str:
    hits = sorted(index.get(name, []))
    if len(hits) > 1:
        raise ValueError(f"find=1: {name!r} is in {len(hits)} places under {base} ({hits[0]}, {hits[1]}); "
                         "file names must be unique")
    return hits[0] if hits else fallback  # not found: reported with the other missing images


def _split_column(df: pd.DataFrame, csv: Path) -> pd.Series | None:
    if "split" not in df.columns:
        return None
    splits = df["split"].fillna("").str.strip()
    bad = sorted(set(splits) - set(SPLITS))
    if bad:
        raise ValueError(f"{csv}: column 'split' has values {bad}; expected {', '.join(SPLITS)}")
    return splits


def _labelled_table(df: pd.DataFrame, how: _LabelCsv, labels: list[str] | None, csv,
                    ids: pd.Series) -> tuple[pd.DataFrame, list[str]]:
    """The common table of a label CSV's rows (paths already absolute): a categorical ``label``
    column becomes one one-hot label per value, else every non-meta column is a 1/0/-1 label.
    Without a patient column each image is its own patient, named by ``ids`` (its path as
    written), so that a hold-out does not depend on where the data folder lies."""
    _require_columns(df, [c for c in (how.label, how.patient) if c], csv)
    if how.label:
        values = _one_hot(df[how.label], how.label, csv)
    else:
        meta = {*FOLDER_META, how.path, how.patient}
        values = {c: None for c in df.columns if c not in meta}  # read below, only those asked for
    available = list(values)
    if not available:
        raise ValueError(f"{csv} has no label columns (every column besides {', '.join(FOLDER_META)} is a label; "
                         "or name a categorical one with label=COLUMN)")
    clash = [l for l in available if l in META_COLUMNS]
    if clash:
        raise ValueError(f"{csv}: label(s) {clash} are named like the table's own columns {META_COLUMNS}")
    labels = _check_labels(available if labels is None else labels, available, str(csv))

    patient_column = how.patient or ("patient" if "patient" in df.columns else None)
    path = df[how.path]
    if patient_column and df[patient_column].isna().any():
        line = _first_blank_line(df[patient_column])
        raise ValueError(f"{csv}: column {patient_column!r} has a blank cell (line {line})")
    patient = df[patient_column].str.strip() if patient_column else ids
    table = pd.DataFrame(
        {
            "path": path,
            "patient": patient,
            "study": df["study"].fillna("") if "study" in df.columns else patient,
            "view": df["view"].fillna("").str.strip() if "view" in df.columns else "",
            "projection": "",
        }
    )
    for label in labels:
        # blank stays NaN (unknown) here: we know nothing about the labels' meaning
        table[label] = values[label] if how.label else _label_values(df, label, csv)
    table.attrs["no_view_column"] = "view" not in df.columns
    return table, labels


def _one_hot(column: pd.Series, name: str, csv) -> dict[str, pd.Series]:
    """A categorical column as ``{value: 1.0 where it is that value, 0.0 elsewhere, NaN where blank}``."""
    text = column.str.strip().replace("", np.nan)
    classes = sorted(text.dropna().unique())
    if not classes:
        raise ValueError(f"{csv}: column {name!r} (label=) is blank in every row")
    return {c: (text == c).astype("float64").where(text.notna()) for c in classes}


def _pick_split(table, splits, split: str, fraction: float, seed: int, source) -> pd.DataFrame:
    """The rows of ``split``: those the data set marks (``splits``: a split column or split
    folders; None: all rows are train); a split it does not mark is, with holdout > 0, a seeded
    patient-wise hold-out of the train rows, which the train split then loses."""
    name = Path(source).name
    if splits is None:
        if not fraction and split != "train":
            raise ValueError(f"{source} has no 'split' column, so every row is split 'train'; split={split!r} "
                             "selects nothing (add holdout=FRACTION to the data spec to hold some out)")
        splits, where = pd.Series("train", index=table.index), name
    else:
        where = f"split {split!r} of {name}"
    held = [s for s in ("valid", "test") if s not in set(splits)] if fraction else []
    rows = table[(splits == ("train" if split in held else split)).to_numpy()]
    rows.attrs = {**table.attrs, "split_source": where}
    if split not in held and not (split == "train" and held):
        return rows
    if rows.empty:
        raise ValueError(f"{source} has no train rows to hold split {split!r} out of")
    return _holdout(rows, split, held, fraction, seed, source)


def _holdout(pool: pd.DataFrame, split: str, held: list[str], fraction: float, seed: int, source) -> pd.DataFrame:
    """``split``'s rows of ``pool`` (the train rows): one of the ``held`` hold-outs, or for
    ``train`` what is left."""
    parts = dict(zip(held, holdout_patients(pool["patient"], fraction, seed, len(held), source)))
    out = set().union(*parts.values())
    rows = pool[~pool["patient"].isin(out)] if split == "train" else pool[pool["patient"].isin(parts[split])]
    name = Path(source).name
    what = f"seeded patient-wise hold-out ({fraction:.0%} of the patients, seed {seed}) of {name}"
    rows.attrs = {
        **pool.attrs,
        "split_source": f"{name} without the {' and '.join(held)} hold-out" if split == "train" else what,
        "holdout": {"fraction": fraction, "seed": seed, "of": name, "splits": held,
                    "n_patients": {s: len(p) for s, p in parts.items()}},
    }
    return rows


def holdout_patients(patients, fraction: float, seed: int, parts: int = 1, source="data") -> list[set[str]]:
    """``parts`` disjoint sets of ``round(fraction * n)`` patients each (at least one), chosen by a
    hash of (seed, patient id): the same for the same ids whatever the row order, and a patient
    keeps its side when other patients are added."""
    unique = sorted(set(patients))
    size = max(1, int(round(fraction * len(unique))))
    if parts * size >= len(unique):
        raise ValueError(f"{source}: {len(unique)} patient(s) are too few for {parts} hold-out(s) of "
                         f"{fraction:.0%} with some left to train on")
    ranked = sorted(unique, key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    return [set(ranked[i * size:(i + 1) * size]) for i in range(parts)]


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
    """Counts for logging: images, patients, studies, views, and per label positive/negative/unknown;
    where the split's rows came from (``split_source``) and any hold-out's fraction and seed."""
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
    for key in ("spec", "split", "views", "uncertain", "split_source", "holdout"):
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
