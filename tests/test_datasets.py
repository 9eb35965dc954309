"""harness.data.datasets on tiny CheXpert, MIMIC-CXR-JPG and folder data sets written in tmp_path."""

import importlib.util
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from harness.data import HOLDOUT_FRACTION, DataSpec, ImageDataset, load_table, summarize
from harness.pathologies import CHEXPERT_COLUMNS, CHEXPERT_LABELS, FINDINGS

# ------------------------------------------------------------------------------------ builders


def write_image(path, size=(20, 16), mode="L", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, format="JPEG")


# (split, patient, study, file, Frontal/Lateral, AP/PA, labels)
CHEXPERT_ROWS = [
    ("train", 1, 1, "view1_frontal.jpg", "Frontal", "PA", {"Cardiomegaly": 1, "Edema": -1}),
    ("train", 1, 1, "view2_lateral.jpg", "Lateral", None, {"Cardiomegaly": 1, "Edema": -1}),
    ("train", 1, 2, "view1_frontal.jpg", "Frontal", "AP", {"No Finding": 1, "Edema": -1, "Support Devices": 1}),
    ("train", 2, 1, "view1_frontal.jpg", "Frontal", "AP", {"Pleural Effusion": 1, "Atelectasis": -1, "Edema": 0}),
    ("valid", 3, 1, "view1_frontal.jpg", "Frontal", "PA", {label: 0 for label in CHEXPERT_LABELS}),
    ("test", 4, 1, "view1_frontal.jpg", "Frontal", "AP", {"Consolidation": 1}),
]


def write_chexpert(root, prefix="CheXpert-v1.0-small/", rows=CHEXPERT_ROWS, drop_columns=()):
    """CheXpert layout at root: {split}.csv + {split}/patientNNNNN/studyN/viewN_*.jpg."""
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid", "test"):
        records = []
        for s, patient, study, name, side, appa, labels in rows:
            if s != split:
                continue
            rel = f"{split}/patient{patient:05d}/study{study}/{name}"
            write_image(root / rel)
            record = dict.fromkeys(CHEXPERT_COLUMNS)
            record.update({"Path": prefix + rel, "Sex": "Female", "Age": 60, "Frontal/Lateral": side, "AP/PA": appa})
            record.update(labels)
            records.append(record)
        df = pd.DataFrame(records, columns=CHEXPERT_COLUMNS).drop(columns=list(drop_columns))
        df.to_csv(root / f"{split}.csv", index=False)
    return root


# (subject_id, study_id, [(dicom_id, ViewPosition)], split, labels or None for "no label row")
MIMIC_STUDIES = [
    (10000032, 50414267, [("d1", "PA"), ("d2", "LATERAL")], "train", {"Cardiomegaly": 1, "Edema": -1}),
    (10000032, 53189527, [("d3", "AP")], "train", {"No Finding": 1, "Support Devices": 1, "Edema": -1}),
    (10000764, 57375967, [("d4", "AP"), ("d5", "LL"), ("d6", "AP AXIAL")], "validate", {"Pleural Effusion": 1}),
    (10000898, 50771383, [("d7", "PA")], "test", {}),
    (10000935, 51178377, [("d8", "PA")], "train", None),  # images without a label row
]
MIMIC_LABELS = sorted(CHEXPERT_LABELS)  # the official chexpert.csv.gz has them in alphabetical order


def write_mimic(root, studies=MIMIC_STUDIES, drop_metadata_columns=()):
    """MIMIC-CXR-JPG layout: the three csv.gz files and files/pXX/pNNNNNNNN/sNNNNNNNN/<dicom>.jpg."""
    meta, labels, split = [], [], []
    for subject, study, images, s, study_labels in studies:
        for dicom, position in images:
            write_image(root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
            meta.append(
                {
                    "dicom_id": dicom, "subject_id": subject, "study_id": study,
                    "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": position,
                    "Rows": 16, "Columns": 20, "StudyDate": 21800506, "StudyTime": 213014.531,
                }
            )
            split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": s})
        if study_labels is not None:
            labels.append({"subject_id": subject, "study_id": study, **dict.fromkeys(MIMIC_LABELS), **study_labels})
    pd.DataFrame(meta).drop(columns=list(drop_metadata_columns)).to_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    pd.DataFrame(labels, columns=["subject_id", "study_id"] + MIMIC_LABELS).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv.gz", index=False)
    return root


def write_folder(root, with_split=True, with_view=False):
    """A fundus-like folder: RGB images and labels.csv with RG/NRG (blank = unknown)."""
    rows = [
        ("img/a.jpg", "train", "macula", 1, 0),
        ("img/b.jpg", "train", "disc", 0, 1),
        ("img/c.jpg", "train", "macula", -1, None),
        ("img/d.jpg", "test", "macula", 0, 1),
    ]
    for rel, *_ in rows:
        write_image(root / rel, size=(12, 12), mode="RGB", value=(200, 30, 10))
    df = pd.DataFrame(rows, columns=["path", "split", "view", "RG", "NRG"])
    if not with_split:
        df = df.drop(columns="split")
    if not with_view:
        df = df.drop(columns="view")
    df.to_csv(root / "labels.csv", index=False)
    return root


def row(table, fragment):
    hits = table[table["path"].str.contains(fragment, regex=False)]
    assert len(hits) == 1, f"{fragment} matched {len(hits)} rows"
    return hits.iloc[0]


# ------------------------------------------------------------------------------------ DataSpec


def test_parse_formats(tmp_path):
    assert DataSpec.parse(f"chexpert:{tmp_path}") == DataSpec("chexpert", tmp_path)
    assert DataSpec.parse("mimic:/data/mimic") == DataSpec("mimic", Path("/data/mimic"))
    assert DataSpec.parse("folder:~/fundus").path.is_absolute()
    # bare phantom parses without building anything; phantom:DIR resolves to chexpert at DIR
    assert DataSpec.parse("phantom") == DataSpec("phantom", None)
    assert DataSpec.parse(f"phantom:{tmp_path}").resolve() == DataSpec("chexpert", tmp_path)
    assert str(DataSpec.parse(f"chexpert:{tmp_path}")) == f"chexpert:{tmp_path}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("dicom:/data", "unknown data format 'dicom'"),
        ("/data/chexpert", "has no format"),
        ("chexpert", "has no path"),
        ("mimic:", "has no path"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message) as err:
        DataSpec.parse(text)
    if "format" in message:
        assert "chexpert, mimic, folder, csv, imagefolder, phantom" in str(err.value)


# ------------------------------------------------------------------------------------ chexpert


@pytest.mark.parametrize("prefix", ["CheXpert-v1.0-small/", "CheXpert-v1.0/", ""])
@pytest.mark.parametrize("dirname", ["CheXpert-v1.0-small", "renamed"])
def test_chexpert_paths_with_and_without_prefix(tmp_path, prefix, dirname):
    root = write_chexpert(tmp_path / dirname, prefix=prefix)
    table = load_table(f"chexpert:{root}", views="all")
    assert list(table.columns[:5]) == ["path", "patient", "study", "view", "projection"]
    assert all(p.startswith(str(root)) and os.path.isfile(p) for p in table["path"])
    assert row(table, "patient00001/study1/view1")["path"] == str(root / "train/patient00001/study1/view1_frontal.jpg")
    if prefix == "CheXpert-v1.0-small/" and dirname == "CheXpert-v1.0-small":  # the official rule
        assert row(table, "patient00002")["path"] == str(tmp_path / (prefix + "train/patient00002/study1/view1_frontal.jpg"))


def test_chexpert_views_keep_ap_and_every_image_per_patient(tmp_path):
    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    frontal = load_table(f"chexpert:{root}")
    assert len(frontal) == 3 and set(frontal["view"]) == {"frontal"}
    assert sorted(frontal["projection"]) == ["AP", "AP", "PA"]
    assert (frontal["patient"] == "patient00001").sum() == 2  # two studies of one patient, both kept
    assert frontal["study"].nunique() == 3 and "patient00001/study2" in set(frontal["study"])

    lateral = load_table(f"chexpert:{root}", views="lateral")
    assert len(lateral) == 1 and lateral["view"].iloc[0] == "lateral" and lateral["projection"].iloc[0] == ""
    assert len(load_table(f"chexpert:{root}", views="all")) == 4


@pytest.mark.parametrize("policy, uncertain_value", [("ignore", None), ("zeros", 0.0), ("ones", 1.0)])
def test_chexpert_uncertain_policies(tmp_path, policy, uncertain_value):
    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    table = load_table(f"chexpert:{root}", uncertain=policy, labels=FINDINGS + ["Support Devices"])
    assert table.attrs["labels"] == FINDINGS + ["Support Devices"]
    assert all(table[label].dtype == np.float32 for label in table.attrs["labels"])
    first = row(table, "patient00001/study1/view1")
    assert first["Cardiomegaly"] == 1.0
    assert first["Consolidation"] == 0.0  # blank = not mentioned = negative
    edema = first["Edema"]
    assert math.isnan(edema) if uncertain_value is None else edema == uncertain_value
    healthy = row(table, "patient00001/study2")
    assert healthy["Edema"] == 0.0  # No Finding == 1 zeroes the findings, even an uncertain one
    assert healthy["Support Devices"] == 1.0  # ... but not Support Devices
    atel = row(table, "patient00002")["Atelectasis"]
    assert math.isnan(atel) if uncertain_value is None else atel == uncertain_value


def test_chexpert_valid_and_test_splits_in_a_dir_named_train(tmp_path):
    # torchxrayvision's CheX_Dataset breaks on valid.csv under a path containing "train".
    root = write_chexpert(tmp_path / "pretrained_data" / "CheXpert-v1.0-small")
    valid = load_table(f"chexpert:{root}", split="valid", labels=CHEXPERT_LABELS)
    assert list(valid["patient"]) == ["patient00003"]
    assert (valid[CHEXPERT_LABELS].to_numpy() == 0).all()
    test = load_table(f"chexpert:{root}", split="test")
    assert list(test["patient"]) == ["patient00004"] and test["Consolidation"].iloc[0] == 1.0


def test_phantom_spec_loads_like_chexpert(tmp_path):
    if importlib.util.find_spec("harness.data.phantom") is None:
        pytest.skip("harness/data/phantom.py is not written yet")
    from harness.data.phantom import write_phantom

    root = write_phantom(tmp_path / "phantom", n_patients=4)
    for split in ("train", "valid", "test"):
        table = load_table(f"phantom:{root}", split=split, views="all")
        assert len(table) > 0 and table.attrs["labels"] == FINDINGS
        assert all(os.path.isfile(p) for p in table["path"])
    item = ImageDataset(table, resolution=16)[0]
    assert item["pixel_values"].shape == (3, 16, 16)


def test_bare_phantom_resolves_when_loading(tmp_path, monkeypatch):
    if importlib.util.find_spec("harness.data.phantom") is None:
        pytest.skip("harness/data/phantom.py is not written yet")
    import harness.data.phantom as phantom

    calls = []
    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    monkeypatch.setattr(phantom, "ensure_phantom", lambda: calls.append(1) or root)
    spec = DataSpec.parse("phantom")
    assert calls == []  # parsing builds nothing
    assert len(load_table(spec)) == 3 and calls == [1]


# ------------------------------------------------------------------------------------ mimic


def test_mimic_views_splits_and_labels(tmp_path):
    root = write_mimic(tmp_path)
    np.random.seed(5)
    expected = np.random.RandomState(5).rand()
    train = load_table(f"mimic:{root}", labels=FINDINGS + ["Support Devices"])
    assert np.random.rand() == expected  # torchxrayvision's np.random.seed(0) did not leak

    assert sorted(train["path"]) == [
        str(root / "files/p10/p10000032/s50414267/d1.jpg"),
        str(root / "files/p10/p10000032/s53189527/d3.jpg"),
    ]
    assert set(train["patient"]) == {"10000032"}  # two images of one patient, both kept
    assert dict(zip(train["projection"], train["view"])) == {"PA": "frontal", "AP": "frontal"}
    assert math.isnan(row(train, "d1")["Edema"])
    healthy = row(train, "d3")
    assert healthy["Edema"] == 0.0 and healthy["Support Devices"] == 1.0  # xrv zeroes devices; we do not
    assert healthy["Cardiomegaly"] == 0.0

    all_train = load_table(f"mimic:{root}", views="all", uncertain="ones")
    assert sorted(all_train["path"].str[-6:]) == ["d1.jpg", "d2.jpg", "d3.jpg"]  # d8 has no labels
    assert row(all_train, "d2")["view"] == "lateral" and row(all_train, "d1")["Edema"] == 1.0

    valid = load_table(f"mimic:{root}", split="valid", views="all")  # our "valid" = official "validate"
    assert sorted(zip(valid["path"].str[-6:], valid["projection"])) == [("d4.jpg", "AP"), ("d5.jpg", "LL")]  # not AP AXIAL
    assert row(valid, "d4")["Pleural Effusion"] == 1.0
    test = load_table(f"mimic:{root}", split="test", uncertain="zeros")
    assert list(test["study"]) == ["50771383"] and (test[FINDINGS].to_numpy() == 0).all()


def test_mimic_missing_metadata_column(tmp_path):
    root = write_mimic(tmp_path, drop_metadata_columns=["ViewPosition"])
    with pytest.raises(ValueError, match=r"mimic-cxr-2.0.0-metadata.csv.gz is missing column\(s\) \['ViewPosition'\]"):
        load_table(f"mimic:{root}")


# ------------------------------------------------------------------------------------ folder


def test_folder_labels_come_from_the_data(tmp_path):
    root = write_folder(tmp_path)
    table = load_table(f"folder:{root}", views="all", uncertain="ones")
    assert table.attrs["labels"] == ["RG", "NRG"]
    assert list(table.columns) == ["path", "patient", "study", "view", "projection", "RG", "NRG"]
    assert len(table) == 3  # train rows only
    c = row(table, "c.jpg")
    assert c["RG"] == 1.0 and math.isnan(c["NRG"])  # -1 -> ones; blank stays unknown in a folder set
    assert list(load_table(f"folder:{root}", split="test", views="all")["path"].str[-5:]) == ["d.jpg"]
    assert list(load_table(f"folder:{root}", views="all", labels=["NRG"]).columns)[-1] == "NRG"


def test_folder_view_column_and_missing_view_column(tmp_path):
    with_view = write_folder(tmp_path / "a", with_view=True)
    assert len(load_table(f"folder:{with_view}", views="all")) == 3
    without = write_folder(tmp_path / "b")
    with pytest.raises(ValueError, match=r"labels.csv has no 'view' column.*pass views='all'"):
        load_table(f"folder:{without}")


def test_folder_without_split_column_is_all_train(tmp_path):
    root = write_folder(tmp_path, with_split=False)
    assert len(load_table(f"folder:{root}", views="all")) == 4
    with pytest.raises(ValueError, match=r"no 'split' column.*split='valid'"):
        load_table(f"folder:{root}", split="valid", views="all")


# ------------------------------------------------------------------------------------ as shipped


def write_chexpert_small(root, n_patients=20, n_valid=3):
    """CheXpert-v1.0-small as it ships: train.csv and valid.csv only, some train patients with
    two studies and a lateral, valid patients numbered after the train ones (as in the archive)."""
    rows = []
    for p in range(1, n_patients + 1):
        rows.append(("train", p, 1, "view1_frontal.jpg", "Frontal", "PA", {"Edema": p % 2}))
        if p % 3 == 0:
            rows.append(("train", p, 1, "view2_lateral.jpg", "Lateral", None, {"Edema": p % 2}))
            rows.append(("train", p, 2, "view1_frontal.jpg", "Frontal", "AP", {"Cardiomegaly": 1}))
    for p in range(n_patients + 1, n_patients + n_valid + 1):
        rows.append(("valid", p, 1, "view1_frontal.jpg", "Frontal", "AP", {"Edema": 1}))
    write_chexpert(root, rows=rows)
    (root / "test.csv").unlink()
    return root


def test_chexpert_small_scores_valid_csv_as_test_and_holds_out_train_patients(tmp_path):
    root = write_chexpert_small(tmp_path / "CheXpert-v1.0-small")
    spec = f"chexpert:{root}"
    train, valid, test = (load_table(spec, s, views="all") for s in ("train", "valid", "test"))
    official = pd.read_csv(root / "valid.csv")
    assert sorted(test["path"]) == sorted(str(root / p.removeprefix("CheXpert-v1.0-small/")) for p in official["Path"])
    # valid: a patient-wise hold-out of train.csv, HOLDOUT_FRACTION of its patients; train loses them
    everything = load_table(f"{spec}?holdout=0", "train", views="all")
    assert sorted(train["path"].tolist() + valid["path"].tolist()) == sorted(everything["path"])
    assert set(train["patient"]).isdisjoint(valid["patient"]) and set(test["patient"]).isdisjoint(train["patient"])
    assert valid["patient"].nunique() == round(HOLDOUT_FRACTION * everything["patient"].nunique()) == 2
    # a held-out patient takes all their images along, whatever the views filter
    assert set(load_table(spec, "valid")["patient"]) == set(valid["patient"])
    # the hold-out is visible in the table and in what is logged
    for table in (train, valid):
        assert table.attrs["holdout"] == summarize(table)["holdout"]
        assert table.attrs["holdout"]["fraction"] == HOLDOUT_FRACTION and table.attrs["holdout"]["seed"] == 0
    assert "hold-out (10% of the patients, seed 0) of train.csv" in summarize(valid)["split_source"]
    assert summarize(test)["split_source"].startswith("valid.csv")


def test_chexpert_holdout_is_seeded_and_deterministic(tmp_path):
    root = write_chexpert_small(tmp_path / "a" / "CheXpert-v1.0-small", n_patients=40)
    held = lambda spec: sorted(load_table(spec, "valid", views="all")["patient"].unique())
    first = held(f"chexpert:{root}")
    assert held(f"chexpert:{root}") == first and len(first) == 4
    # the same patients when the archive lies elsewhere or train.csv lists its rows in another order
    moved = tmp_path / "b" / "CheXpert-v1.0-small"
    shutil.copytree(root, moved)
    pd.read_csv(moved / "train.csv").iloc[::-1].to_csv(moved / "train.csv", index=False)
    assert held(f"chexpert:{moved}") == first
    # the seed and the fraction are options of the spec
    assert held(f"chexpert:{root}?seed=1") != first
    assert len(held(f"chexpert:{root}?holdout=0.2")) == 8
    assert set(first) < set(pd.read_csv(root / "train.csv")["Path"].str.extract(r"(patient\d+)")[0])


def test_chexpert_with_test_csv_or_generated_keeps_its_valid_csv(tmp_path):
    official = write_chexpert(tmp_path / "full")
    assert load_table(f"chexpert:{official}", "valid")["patient"].tolist() == ["patient00003"]
    with pytest.raises(ValueError, match=r"holdout applies to a chexpert folder without test.csv, and .* has one"):
        load_table(f"chexpert:{official}?holdout=0.1", "valid")
    # harness.generate's folders (generate.json beside them) wrote valid.csv for model selection
    generated = write_chexpert_small(tmp_path / "gen" / "CheXpert-v1.0-small")
    (generated.parent / "generate.json").write_text("{}\n")
    valid = load_table(f"chexpert:{generated}", "valid", views="all")
    assert valid["patient"].tolist() == ["patient00021", "patient00022", "patient00023"]
    assert len(load_table(f"chexpert:{generated}", "train", views="all")) == len(pd.read_csv(generated / "train.csv"))
    with pytest.raises(FileNotFoundError, match="test.csv does not exist"):
        load_table(f"chexpert:{generated}", "test")


def test_spec_options_round_trip_and_are_checked(tmp_path):
    text = f"csv:{tmp_path}?file=train_labels.csv&path=challenge_id&label=class&suffix=.jpg&find=1"
    spec = DataSpec.parse(text)
    assert spec.path == tmp_path and spec.option("label") == "class" and spec.option("find") is True
    assert DataSpec.parse(str(spec)) == spec
    assert DataSpec.parse(f"folder:{tmp_path}?label=Pleural%20Effusion").option("label") == "Pleural Effusion"
    assert DataSpec.parse("phantom?holdout=0").option("holdout") == 0.0
    for bad, message in [
        (f"csv:{tmp_path}?colour=red", "unknown option 'colour'; csv takes file, path, label"),
        (f"mimic:{tmp_path}?holdout=0.1", "mimic takes no options"),
        (f"chexpert:{tmp_path}?holdout=0.7", r"holdout='0.7' is not a fraction in \[0, 0.5\)"),
        (f"chexpert:{tmp_path}?seed=x", "seed='x' is not an integer"),
        (f"csv:{tmp_path}?find=maybe", "find='maybe' is not 1, 0, true or false"),
        (f"csv:{tmp_path}?path=a&path=b", "option 'path' is given twice"),
        (f"csv:{tmp_path}?path", "key=value"),
    ]:
        with pytest.raises(ValueError, match=message):
            DataSpec.parse(bad)


def write_airogs(root, n=20):
    """The AIROGS layout: train_labels.csv (challenge_id,class with RG/NRG) and the images in
    numbered folders 0/, 1/, ... under their challenge ids."""
    rows = []
    for i in range(n):
        write_image(root / str(i // 8) / f"TRAIN{i:06d}.jpg", size=(12, 12), mode="RGB")
        rows.append({"challenge_id": f"TRAIN{i:06d}", "class": "RG" if i % 4 == 0 else "NRG"})
    pd.DataFrame(rows).to_csv(root / "train_labels.csv", index=False)
    return root


AIROGS = "?file=train_labels.csv&path=challenge_id&label=class&suffix=.jpg&find=1"


def test_airogs_layout_reads_as_shipped(tmp_path):
    root = write_airogs(tmp_path / "airogs")
    spec = f"csv:{root}{AIROGS}"
    tables = {s: load_table(spec, s, views="all") for s in ("train", "valid", "test")}
    assert tables["train"].attrs["labels"] == ["NRG", "RG"]  # one one-hot label per class value
    for table in tables.values():
        ids = table["path"].map(lambda p: Path(p).stem)
        number = ids.str[-6:].astype(int)
        assert (table["RG"] == (number % 4 == 0)).all() and (table["NRG"] == 1 - table["RG"]).all()
        assert all(Path(p).parent.name == str(n // 8) for p, n in zip(table["path"], number))  # found in 0/, 1/, 2/
    # no split column: valid and test are two disjoint seeded hold-outs, train is the rest
    paths = [set(t["path"]) for t in tables.values()]
    assert sum(map(len, paths)) == 20 and len(set.union(*paths)) == 20
    assert len(paths[1]) == len(paths[2]) == 2
    assert tables["test"].attrs["holdout"]["splits"] == ["valid", "test"]
    assert load_table(spec, "valid", views="all", labels=["RG"]).columns[-1] == "RG"
    # the same images are held out wherever the folder lies (ids, not absolute paths, are hashed)
    moved = shutil.copytree(root, tmp_path / "elsewhere")
    held = lambda r: sorted(Path(p).name for p in load_table(f"csv:{r}{AIROGS}", "test", views="all")["path"])
    assert held(moved) == held(root)
    # without find=1 the bare ids are not where the CSV says, and the error says what to add
    with pytest.raises(FileNotFoundError, match="add find=1"):
        load_table(f"csv:{root}?file=train_labels.csv&path=challenge_id&label=class&suffix=.jpg", views="all")
    with pytest.raises(ValueError, match=r"train_labels.csv: column 'class' has values \['NRG', 'RG'\]"):
        load_table(f"csv:{root}?file=train_labels.csv&path=challenge_id&suffix=.jpg&find=1", views="all")


def test_label_csv_holds_out_whole_patients_and_blank_classes_are_unknown(tmp_path):
    rows = []
    for p in range(12):
        for eye in ("left", "right"):
            write_image(tmp_path / f"{p}_{eye}.png", mode="L")
            rows.append({"image": f"{p}_{eye}.png", "subject": f"s{p}", "grade": "" if p == 0 else "ab"[p % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "grades.csv", index=False)
    spec = f"csv:{tmp_path}?file=grades.csv&path=image&label=grade&patient=subject"
    tables = [load_table(spec, s, views="all") for s in ("train", "valid", "test")]
    patients = [set(t["patient"]) for t in tables]
    assert len(set.union(*patients)) == 12 and sum(map(len, patients)) == 12  # disjoint by patient
    assert all((t.groupby("patient").size() == 2).all() for t in tables)  # both eyes on one side
    both = pd.concat(tables)
    assert both.loc[both["patient"] == "s0", ["a", "b"]].isna().all().all()
    with pytest.raises(ValueError, match=r"is missing column\(s\) \['subject_id'\]"):
        load_table(f"csv:{tmp_path}?file=grades.csv&path=image&label=grade&patient=subject_id", views="all")


def test_label_csv_paths_stay_inside_the_data_folder(tmp_path):
    root = tmp_path / "data"
    write_image(root / "in.jpg")
    write_image(tmp_path / "outside.jpg")
    for value, message in [("../outside.jpg", r"column 'path' has '../outside.jpg', which is outside"),
                           ("img/../../outside.jpg", "which is outside"),
                           (str(tmp_path / "outside.jpg"), "has an absolute path .*add absolute=1")]:
        pd.DataFrame({"path": ["in.jpg", value], "RG": [1, 0]}).to_csv(root / "labels.csv", index=False)
        with pytest.raises(ValueError, match=message):
            load_table(f"folder:{root}", views="all")
    # an absolute path the user allows
    table = load_table(f"folder:{root}?absolute=1", views="all")
    assert table["path"].tolist() == [str(root / "in.jpg"), str(tmp_path / "outside.jpg")]
    # the label CSV itself, and metadata.csv paths of an imagefolder, are held to the same rule
    (root / "sub").mkdir()
    with pytest.raises(ValueError, match=r"file='../labels.csv' is outside"):
        load_table(f"csv:{root / 'sub'}?file=../labels.csv", views="all")
    (root / "labels.csv").unlink()
    pd.DataFrame({"file_name": ["in.jpg", "../outside.jpg"], "RG": [1, 0]}).to_csv(root / "metadata.csv", index=False)
    with pytest.raises(ValueError, match=r"metadata.csv: column 'file_name' has '../outside.jpg', which is outside"):
        load_table(f"imagefolder:{root}", views="all")


def test_find_refuses_a_file_name_found_twice(tmp_path):
    write_airogs(tmp_path)
    write_image(tmp_path / "9" / "TRAIN000003.jpg")
    with pytest.raises(ValueError, match=r"find=1: 'TRAIN000003.jpg' is in 2 places"):
        load_table(f"csv:{tmp_path}{AIROGS}", views="all")


def test_folder_holds_out_only_when_asked(tmp_path):
    root = write_folder(tmp_path, with_split=False)
    assert load_table(f"folder:{root}", views="all").attrs["split_source"] == "labels.csv"
    with pytest.raises(ValueError, match=r"4 patient\(s\) are too few for 2 hold-out\(s\) of 49%"):
        load_table(f"folder:{root}?holdout=0.49", "valid", views="all")  # 2 + 2 would leave no train
    more = write_airogs(tmp_path / "more")
    pd.read_csv(more / "train_labels.csv").rename(columns={"challenge_id": "path"}).assign(
        path=lambda d: [f"{i // 8}/{c}.jpg" for i, c in enumerate(d["path"])]).to_csv(more / "labels.csv", index=False)
    spec = f"folder:{more}?label=class&holdout=0.1"
    assert len(load_table(spec, "test", views="all")) == 2 and len(load_table(spec, views="all")) == 16


def test_hf_imagefolder_metadata_and_split_folders(tmp_path):
    for split, n in [("train", 10), ("test", 3)]:
        rows = []
        for i in range(n):
            write_image(tmp_path / split / "images" / f"{i}.png", mode="L")
            rows.append({"file_name": f"images/{i}.png", "Edema": i % 2, "text": "a caption",
                         "finding": "edema" if i % 2 else "none"})
        pd.DataFrame(rows).to_csv(tmp_path / split / "metadata.csv", index=False)
    # numeric label columns, other columns named as labels or not: text is not a 1/0 label
    with pytest.raises(ValueError, match=r"column 'text' has values \['a caption'\]"):
        load_table(f"imagefolder:{tmp_path}", views="all")
    train = load_table(f"imagefolder:{tmp_path}", views="all", labels=["Edema"])
    test = load_table(f"imagefolder:{tmp_path}", "test", views="all", labels=["Edema"])
    valid = load_table(f"imagefolder:{tmp_path}", "valid", views="all", labels=["Edema"])
    assert len(test) == 3 and all("/test/images/" in p for p in test["path"])
    # no validation/ folder: valid is a hold-out of train/, which train then loses
    assert len(train) == 9 and len(valid) == 1 and set(train["path"]).isdisjoint(valid["path"])
    assert valid.attrs["holdout"]["splits"] == ["valid"]
    assert train["Edema"].tolist() == [float(Path(p).stem) % 2 for p in train["path"]]
    cat = load_table(f"imagefolder:{tmp_path}?label=finding", "test", views="all")
    assert cat.attrs["labels"] == ["edema", "none"] and cat["edema"].tolist() == [0.0, 1.0, 0.0]


def test_torchvision_imagefolder_class_folders(tmp_path):
    flat = tmp_path / "flat"
    for cls, n in [("glaucoma", 4), ("healthy", 8)]:
        for i in range(n):
            write_image(flat / cls / f"{i}.jpg", mode="RGB")
    (flat / "healthy" / "notes.txt").write_text("not an image\n")
    tables = [load_table(f"imagefolder:{flat}", s, views="all") for s in ("train", "valid", "test")]
    assert tables[0].attrs["labels"] == ["glaucoma", "healthy"]
    assert [len(t) for t in tables] == [10, 1, 1]
    both = pd.concat(tables)
    assert (both["glaucoma"] == both["path"].str.contains("/glaucoma/")).all() and (both["healthy"] == 1 - both["glaucoma"]).all()
    # train/ and val/ trees, as torchvision users keep them: val/ is valid, test is held out of train/
    tree = tmp_path / "tree"
    for split in ("train", "val"):
        for cls in ("glaucoma", "healthy"):
            for i in range(5):
                write_image(tree / split / cls / f"{i}.jpg", mode="RGB")
    valid = load_table(f"imagefolder:{tree}", "valid", views="all")
    test = load_table(f"imagefolder:{tree}", "test", views="all")
    assert len(valid) == 10 and all("/val/" in p for p in valid["path"])
    assert len(test) == 1 and "/train/" in test["path"].iloc[0]
    assert test["path"].iloc[0] not in set(load_table(f"imagefolder:{tree}", views="all")["path"])
    with pytest.raises(FileNotFoundError, match="neither a metadata.csv nor class folders"):
        load_table(f"imagefolder:{tmp_path / 'flat' / 'healthy'}", views="all")


# ------------------------------------------------------------------------------------ bad data


def test_missing_image_raises_or_is_skipped(tmp_path):
    root = write_chexpert(tmp_path / "CheXpert-v1.0-small")
    gone = root / "train/patient00002/study1/view1_frontal.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) listed in .*train.csv do not exist") as err:
        load_table(f"chexpert:{root}")
    assert str(gone) in str(err.value)
    table = load_table(f"chexpert:{root}", skip_bad=True)
    assert len(table) == 2 and table.attrs["skipped"] == [str(gone)]
    assert summarize(table)["n_skipped"] == 1


def test_missing_columns_name_the_csv_and_columns(tmp_path):
    root = write_chexpert(tmp_path / "CheXpert-v1.0-small", drop_columns=["AP/PA", "Edema"])
    with pytest.raises(ValueError, match=r"train.csv is missing column\(s\) \['AP/PA', 'Edema'\]"):
        load_table(f"chexpert:{root}")
    (tmp_path / "f").mkdir()
    pd.DataFrame({"file": ["a.jpg"], "RG": [1]}).to_csv(tmp_path / "f/labels.csv", index=False)
    with pytest.raises(ValueError, match=r"labels.csv is missing column\(s\) \['path'\]"):
        load_table(f"folder:{tmp_path / 'f'}", views="all")


def test_empty_selection_says_which_filters(tmp_path):
    root = write_chexpert(tmp_path / "c", rows=[r for r in CHEXPERT_ROWS if r[4] == "Frontal"])
    with pytest.raises(ValueError, match=r"no rows in chexpert:.* for split='train', views='lateral'.*frontal: 3"):
        load_table(f"chexpert:{root}", views="lateral")


def test_unknown_labels_and_bad_label_values(tmp_path):
    root = write_chexpert(tmp_path / "c")
    with pytest.raises(ValueError, match=r"unknown label\(s\) 'Effusion' \(did you mean 'Pleural Effusion'\?\)"):
        load_table(f"chexpert:{root}", labels=["Effusion"])
    folder = write_folder(tmp_path / "f")
    with pytest.raises(ValueError, match=r"unknown label\(s\) 'Glaucoma'.*valid labels: RG, NRG"):
        load_table(f"folder:{folder}", views="all", labels=["Glaucoma"])
    df = pd.read_csv(folder / "labels.csv")
    df["RG"] = df["RG"].astype(object)
    df.loc[0, "RG"], df.loc[1, "RG"] = 2, "yes"
    df.to_csv(folder / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"labels.csv: column 'RG' has values \['2', 'yes'\]; expected 1, 0, -1 or blank"):
        load_table(f"folder:{folder}", views="all")


def test_bad_arguments_and_missing_dir(tmp_path):
    with pytest.raises(ValueError, match="views='side' is not one of frontal, lateral, all"):
        load_table(f"chexpert:{tmp_path}", views="side")
    with pytest.raises(ValueError, match="uncertain='maybe'"):
        load_table(f"chexpert:{tmp_path}", uncertain="maybe")
    with pytest.raises(ValueError, match="split='validate'"):
        load_table(f"chexpert:{tmp_path}", split="validate")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_table(f"chexpert:{tmp_path / 'nope'}")
    # without test.csv the valid split is a hold-out of train.csv, so that is the file it needs
    with pytest.raises(FileNotFoundError, match=r"train.csv does not exist \(split 'valid' reads train.csv"):
        load_table(f"chexpert:{tmp_path}", split="valid")
    with pytest.raises(FileNotFoundError, match=r"valid.csv does not exist"):
        load_table(f"chexpert:{tmp_path}?holdout=0", split="valid")


# ------------------------------------------------------------------------------------ images


def test_image_dataset_tensors(tmp_path):
    root = write_chexpert(tmp_path / "c")
    table = load_table(f"chexpert:{root}", views="all")
    white = row(table, "patient00002")["path"]
    # 30x10, white only in the middle third: resize to 8 high and center-crop keeps only white
    img = np.zeros((10, 30), np.uint8)
    img[:, 10:20] = 255
    Image.fromarray(img).save(white, format="PNG")  # PIL reads by content, not extension

    ds = ImageDataset(table, resolution=8)
    i = int(table.index[table["path"] == white][0])
    item = ds[i]
    assert item["index"] == i
    assert item["pixel_values"].shape == (3, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() > 0.9  # only the white middle survived the crop
    assert item["labels"].shape == (5,) and math.isnan(item["labels"][FINDINGS.index("Atelectasis")])
    assert item["labels"][FINDINGS.index("Pleural Effusion")] == 1.0

    grey = ds[0]["pixel_values"]  # solid 128 JPEG
    assert grey.min() >= -1 and grey.max() <= 1 and abs(float(grey.mean()) - (128 / 127.5 - 1)) < 0.02
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()  # grey replicated
    assert ImageDataset(table, resolution=8, channels=1)[0]["pixel_values"].shape == (1, 8, 8)


def test_image_dataset_rgb_folder(tmp_path):
    table = load_table(f"folder:{write_folder(tmp_path)}", views="all")
    item = ImageDataset(table, resolution=6)[0]
    red, green, _ = item["pixel_values"].mean(dim=(1, 2))
    assert red > 0.4 and green < -0.5  # colour kept for channels=3
    assert item["labels"].tolist() == [1.0, 0.0]
    assert ImageDataset(table, resolution=6, channels=1)[0]["pixel_values"].shape == (1, 6, 6)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_raises_or_is_skipped(tmp_path, damage):
    root = write_chexpert(tmp_path / "c")
    table = load_table(f"chexpert:{root}")
    bad = table["path"].iloc[1]
    Image.effect_noise((64, 64), 50).convert("L").save(bad, format="JPEG")
    data = open(bad, "rb").read()
    open(bad, "wb").write(b"not an image" if damage == "garbage" else data[: len(data) // 2])

    with pytest.raises(OSError, match=f"cannot decode image {bad}"):
        ImageDataset(table)[1]
    ds = ImageDataset(table, resolution=8, skip_bad=True)
    assert ds[1]["index"] == 2 and ds.skipped == [bad]  # the next readable row stands in
    ds = ImageDataset(table, resolution=8, skip_bad=True)
    assert ds.verify() == [bad] and len(ds) == 2 and ds.skipped == [bad]
    assert [ds[i]["index"] for i in range(len(ds))] == [0, 2]
    with pytest.raises(OSError, match="cannot decode"):
        ImageDataset(table).verify()


def test_summarize(tmp_path):
    table = load_table(f"chexpert:{write_chexpert(tmp_path / 'c')}", views="all")
    s = summarize(table)
    assert (s["n_images"], s["n_patients"], s["n_studies"]) == (4, 2, 3)
    assert s["views"] == {"frontal": 3, "lateral": 1}
    assert s["labels"]["Edema"] == {"positive": 0, "negative": 2, "unknown": 2}
    assert s["labels"]["Cardiomegaly"] == {"positive": 2, "negative": 2, "unknown": 0}
    assert s["split"] == "train" and s["n_skipped"] == 0

