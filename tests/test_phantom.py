"""The phantom data set: layout exactly CheXpert's, determinism, splits, atomic writes, and that
every finding changes the image where its radiological sign lives."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data import phantom
from harness.pathologies import CHEXPERT_COLUMNS, FINDINGS

PATIENTS = 12
SIZE = 64


def _rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return phantom.write_phantom(tmp_path_factory.mktemp("ph") / "root", n_patients=PATIENTS, seed=3, size=SIZE)


def test_layout_is_chexpert(small):
    assert small.name == "CheXpert-v1.0-small"
    pattern = re.compile(r"^CheXpert-v1\.0-small/(train|valid|test)/patient\d{5}/study\d+/view(1_frontal|2_lateral)\.jpg$")
    for split in ("train", "valid", "test"):
        with open(small / f"{split}.csv", newline="") as fh:
            header = next(csv.reader(fh))
        assert header == CHEXPERT_COLUMNS
        for row in _rows(small / f"{split}.csv"):
            assert pattern.match(row["Path"]), row["Path"]
            assert row["Path"].split("/")[1] == split
            img = Image.open(small.parent / row["Path"])
            assert img.mode == "L" and img.size == (SIZE, SIZE) and img.format == "JPEG"
            if row["Frontal/Lateral"] == "Lateral":
                assert row["AP/PA"] == "" and row["Path"].endswith("view2_lateral.jpg")
            else:
                assert row["Frontal/Lateral"] == "Frontal" and row["AP/PA"] in ("AP", "PA")
            assert row["Sex"] in ("Male", "Female") and 18 <= int(row["Age"]) <= 90
            for label in CHEXPERT_COLUMNS[5:]:
                assert row[label] in ("", "1.0", "0.0", "-1.0")
            if split != "train":  # like CheXpert's valid.csv: every cell 0/1
                assert all(row[label] in ("0.0", "1.0") for label in CHEXPERT_COLUMNS[5:])


def test_labels_follow_truth(small):
    truth = {r["Path"]: r for r in _rows(small / phantom.TRUTH_CSV)}
    rows = [r for s in ("train", "valid", "test") for r in _rows(small / f"{s}.csv")]
    assert len(truth) == len(rows)
    for row in rows:
        t = truth[row["Path"]]
        assert (float(t["ctr"]) > 0.5) == bool(int(t["Cardiomegaly"]))
        for f in FINDINGS:
            if row[f] == "1.0":
                assert t[f] == "1"
            if row[f] in ("0.0", ""):
                assert t[f] == "0"
        no_finding = not any(int(t[f]) for f in FINDINGS)
        assert (row["No Finding"] == "1.0") <= no_finding


def test_splits_disjoint_by_patient(small):
    patients = {}
    for split in ("train", "valid", "test"):
        patients[split] = {r["Path"].split("/")[2] for r in _rows(small / f"{split}.csv")}
        assert patients[split], split
    assert not patients["train"] & patients["valid"]
    assert not patients["train"] & patients["test"]
    assert not patients["valid"] & patients["test"]
    assert sum(len(p) for p in patients.values()) == PATIENTS


def test_deterministic_by_seed(small, tmp_path):
    again = phantom.write_phantom(tmp_path / "again", n_patients=PATIENTS, seed=3, size=SIZE)
    for name in ("train.csv", "valid.csv", "test.csv", phantom.TRUTH_CSV):
        assert (again / name).read_bytes() == (small / name).read_bytes()
    for row in _rows(small / "train.csv")[:5]:
        a = np.asarray(Image.open(small.parent / row["Path"]))
        b = np.asarray(Image.open(again.parent / row["Path"]))
        assert np.array_equal(a, b)
    other = phantom.write_phantom(tmp_path / "other", n_patients=PATIENTS, seed=4, size=SIZE)
    assert (other / "train.csv").read_bytes() != (small / "train.csv").read_bytes()
    for view in phantom.VIEWS:
        x = phantom.render({"Edema": True}, view, np.random.default_rng(7), size=48)
        y = phantom.render({"Edema": True}, view, np.random.default_rng(7), size=48)
        assert x.dtype == np.uint8 and x.shape == (48, 48) and np.array_equal(x, y)


def test_atomic_write(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = phantom.draw

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt  # like a Ctrl-C half way
        return real(*args, **kwargs)

    monkeypatch.setattr(phantom, "draw", dies)
    with pytest.raises(KeyboardInterrupt):
        phantom.write_phantom(tmp_path / "root", n_patients=6, size=32)
    assert os.listdir(tmp_path) == []  # neither the data set nor its temporary folder is left
    monkeypatch.setattr(phantom, "draw", real)
    (tmp_path / "existing").mkdir()
    out = phantom.write_phantom(tmp_path / "existing", n_patients=4, size=32)
    assert out == tmp_path / "existing" / "CheXpert-v1.0-small" and (out / "test.csv").is_file()
    assert os.listdir(tmp_path / "existing") == ["CheXpert-v1.0-small"]
    with pytest.raises(FileExistsError, match="CheXpert-v1.0-small"):
        phantom.write_phantom(tmp_path / "existing", n_patients=4, size=32)


def test_ensure_phantom_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path))
    a = phantom.ensure_phantom(n_patients=4, size=32)
    stamp = (a / "train.csv").stat().st_mtime_ns
    b = phantom.ensure_phantom(n_patients=4, size=32)
    assert a == b and (b / "train.csv").stat().st_mtime_ns == stamp and a.parent.parent == tmp_path
    c = phantom.ensure_phantom(n_patients=4, size=32, seed=1)
    assert c != a
    assert phantom.main(["--patients", "4", "--size", "32"]) == a


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="Pneumonia"):
        phantom.render({"Pneumonia": True}, "PA", np.random.default_rng(0))
    with pytest.raises(ValueError, match="OBLIQUE"):
        phantom.render({}, "OBLIQUE", np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_patients"):
        phantom.write_phantom("/nonexistent/never", n_patients=2)


# ---------------------------------------------------------------- each sign where it belongs

N = 24  # patients per comparison; the same rng state renders one patient with and without a finding
R = 128


def _pair(finding: str, view: str = "PA", difficulty: float = 0.3):  # clear signs: tests where, not how faint
    """Mean (with - without) image over N patients, in [0, 1] grey levels; and the per-patient diffs."""
    diffs = []
    for seed in range(N):
        on = phantom.render({finding: True}, view, np.random.default_rng(seed), size=R, difficulty=difficulty)
        off = phantom.render({}, view, np.random.default_rng(seed), size=R, difficulty=difficulty)
        diffs.append((on.astype(np.float32) - off.astype(np.float32)) / 255)
    return np.mean(diffs, 0), np.array(diffs)


def _box(img, x0, x1, y0, y1):
    """Mean over a box given in [-1, 1] image coordinates (x right, y down)."""
    c = lambda v: int(round((v + 1) / 2 * R))  # noqa: E731
    return float(img[c(y0):c(y1), c(x0):c(x1)].mean())


def test_cardiomegaly_widens_the_heart():
    rng = np.random.default_rng(0)
    assert all(phantom.sample_signs({"Cardiomegaly": True}, rng)["ctr"] > 0.5 for _ in range(50))
    assert all(phantom.sample_signs({}, rng)["ctr"] < 0.5 for _ in range(50))
    mean, diffs = _pair("Cardiomegaly")
    # the heart's left border moves out into the left lower lung (image right), above the dome
    border = _box(mean, 0.25, 0.55, 0.05, 0.35)
    assert border > 0.03, border
    assert abs(_box(mean, -0.6, -0.3, -0.6, -0.2)) < 0.005  # right upper lung untouched
    assert (diffs[:, 70:100, 80:110].mean((1, 2)) > 0).mean() > 0.8


def test_edema_is_bilateral_perihilar():
    mean, _ = _pair("Edema")
    right, left = _box(mean, -0.40, -0.15, -0.25, 0.1), _box(mean, 0.15, 0.40, -0.25, 0.1)
    assert right > 0.02 and left > 0.02, (right, left)
    assert _box(mean, -0.9, -0.8, -0.6, 0.6) < 0.005  # soft tissue outside the chest untouched


def test_consolidation_is_one_sided_and_dense():
    _, diffs = _pair("Consolidation")
    for d in diffs:
        right, left = d[:, : R // 2].clip(0).sum(), d[:, R // 2:].clip(0).sum()
        assert max(right, left) > 3 * min(right, left) + 1e-6  # one lung
        assert d.max() > 0.08  # dense, not a haze


def test_atelectasis_raises_a_hemidiaphragm():
    rng = np.random.default_rng(0)
    an = phantom.sample_anatomy(rng)
    for side in (-1, 1):
        sg = phantom.sample_signs({"Atelectasis": True}, np.random.default_rng(1), difficulty=0.0)
        sg["atel_side"] = side
        sg0 = dict(sg, on={f: False for f in FINDINGS})
        a = phantom._frontal(an, sg, False, R)
        b = phantom._frontal(an, sg0, False, R)
        x = slice(R // 2 + side * R // 4 - 6, R // 2 + side * R // 4 + 6)  # mid-hemithorax on that side
        xo = slice(R // 2 - side * R // 4 - 6, R // 2 - side * R // 4 + 6)
        rows = slice(int(0.55 * R), int(0.72 * R))  # just above the normal dome: now diaphragm / plate
        assert (a[rows, x] - b[rows, x]).mean() > 0.02
        assert abs((a[rows, xo] - b[rows, xo]).mean()) < 0.01  # the other side keeps its volume


def test_effusion_fills_the_costophrenic_angle():
    mean, diffs = _pair("Pleural Effusion")
    bases = max(_box(mean, -0.7, -0.45, 0.35, 0.6), _box(mean, 0.45, 0.7, 0.35, 0.6))
    assert bases > 0.03, bases
    assert _box(mean, -0.5, 0.5, -0.7, -0.3) < 0.005  # apices untouched


def test_lateral_view_shows_the_findings():
    for finding in FINDINGS:
        mean, _ = _pair(finding, "LATERAL")
        assert mean.max() > 0.05, finding
