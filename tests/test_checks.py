"""The checks on generated data, on a small phantom: the view classifier tells frontal from lateral
on held-out real images and is reused from its cache, memorization flags a re-encoded copy of a
training image and not another patient, the Fréchet distance is 0 for a set against itself and
grows with a shift, prompt adherence is high for a finding the images show and 0.5 for one they
ignore, and the entry point logs all of it in a FINISHED run."""

from __future__ import annotations

import csv
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageEnhance
from scipy import linalg
from sklearn.metrics import roc_auc_score

from harness import checks, classify
from harness.classifier import build_classifier, train_classifier
from harness.data import load_table
from harness.data.phantom import write_phantom
from harness.generate import label_cells
from harness.metrics import snake
from harness.pathologies import CHEXPERT_COLUMNS, FINDINGS

RES = 32  # the checks at 32 px: the phantom's views and copies are plain at that size, and it is 4x faster
FAST = ["--resolution", str(RES), "--view_epochs", "4", "--batch_size", "8", "--threads", "1"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """60 patients: 94 train images (23 lateral), 12 valid (3), 28 test (8) - larger than tiny_phantom,
    whose splits have too few laterals to select and measure a view classifier."""
    return write_phantom(tmp_path_factory.mktemp("phantom60"), n_patients=60, seed=5, size=64)


@pytest.fixture(scope="module")
def view_model(phantom, tmp_path_factory):
    torch.manual_seed(0)
    return checks.train_view_classifier(f"chexpert:{phantom}", resolution=RES, epochs=4, batch_size=8,
                                        cache_dir=tmp_path_factory.mktemp("view_cache"))


def _table(phantom, split, views):
    return load_table(f"chexpert:{phantom}", split, views=views, labels=[])


def _copy(src, dst, brightness=1.0):
    """A re-encoded (and optionally brightened) copy of an image, as a generator's near-copy would be."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(src) as im:
        ImageEnhance.Brightness(im.convert("L")).enhance(brightness).save(dst, quality=75)
    return str(dst)


def _fake_generated(root, sources) -> str:
    """A CheXpert-layout folder (as harness.generate writes) holding copies of ``sources`` (paths)."""
    archive = root / "CheXpert-v1.0-small"
    rows = {"train": [], "valid": []}
    for i, src in enumerate(sources):
        split = "valid" if i % 4 == 3 else "train"
        lateral = src.endswith("lateral.jpg")
        rel = f"{split}/patient{90000 + i:05d}/study1/{'view2_lateral' if lateral else 'view1_frontal'}.jpg"
        _copy(src, archive / rel)
        rows[split].append({c: "" for c in CHEXPERT_COLUMNS} | {"Path": f"CheXpert-v1.0-small/{rel}",
                                                               "Frontal/Lateral": "Frontal"})
    for split, split_rows in rows.items():
        with open(archive / f"{split}.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CHEXPERT_COLUMNS)
            writer.writeheader()
            writer.writerows(split_rows)
    (root / "generate.json").write_text("{}\n")  # as generate writes it: its valid.csv is its own split
    return f"chexpert:{archive}"


# ------------------------------------------------------------------------------------------ views


def test_view_classifier_separates_held_out_views(phantom, view_model):
    test = _table(phantom, "test", "all")
    frontal = checks.view_fraction(view_model, test[test["view"] == "frontal"], resolution=RES)
    lateral = checks.view_fraction(view_model, test[test["view"] == "lateral"], resolution=RES)
    assert frontal["n_images"] >= 15 and lateral["n_images"] >= 5
    # majority-class guessing would score 0.74 overall; per view it would be 1 and 0
    assert frontal["frontal_fraction"] >= 0.9 and lateral["lateral_fraction"] >= 0.8
    assert frontal["frontal_fraction"] + frontal["lateral_fraction"] == pytest.approx(1.0)


def test_view_classifier_is_cached_per_data_and_parameters(phantom, view_model, tmp_path, monkeypatch):
    meta = view_model.harness_meta
    assert meta["cached"] is False and meta["valid_accuracy"] >= 0.9 and meta["valid_auc"] >= 0.9
    monkeypatch.setattr(checks, "train_classifier", lambda *a, **k: pytest.fail("retrained a cached classifier"))
    again = checks.train_view_classifier(f"chexpert:{phantom}", resolution=RES, epochs=4, batch_size=8,
                                         cache_dir=meta["cache_path"].rsplit("/", 1)[0])
    assert again.harness_meta["cached"] is True and again.harness_meta["cache_path"] == meta["cache_path"]
    for a, b in zip(view_model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(pytest.fail.Exception, match="retrained"):  # another seed is another classifier
        checks.train_view_classifier(f"chexpert:{phantom}", resolution=RES, epochs=4, batch_size=8, seed=1,
                                     cache_dir=meta["cache_path"].rsplit("/", 1)[0])


def test_view_classifier_needs_both_views(tiny_phantom, tmp_path):
    lateral_free = tmp_path / "frontal_only"
    lateral_free.mkdir()
    for split in ("train", "valid"):
        table = pd.read_csv(tiny_phantom / f"{split}.csv")
        table[table["Frontal/Lateral"] == "Frontal"].to_csv(lateral_free / f"{split}.csv", index=False)
        (lateral_free / split).symlink_to(tiny_phantom / split)
    with pytest.raises(ValueError, match="frontal and lateral"):
        checks.train_view_classifier(f"chexpert:{lateral_free}", resolution=RES, cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------- memorization


def test_memorization_flags_a_copy_not_another_patient(phantom, tmp_path):
    train = _table(phantom, "train", "frontal")
    source = train["path"].iloc[3]
    copy = _copy(source, tmp_path / "gen" / "copy.jpg", brightness=1.15)
    other = _table(phantom, "test", "frontal")["path"].iloc[0]  # a patient the model never saw
    generated = load_table(_fake_generated(tmp_path / "g", [copy, other]), "train", views="all", labels=[])
    result = checks.memorization(generated, train, threshold=0.95, k=5)
    sims = result["similarities"]
    assert sims[0] > 0.98 and sims[1] < 0.9
    assert result["fraction_above"] == 0.5 and result["max_similarity"] == pytest.approx(sims[0])
    assert result["mean_nn_similarity"] == pytest.approx(np.mean(sims))
    (gen0, nearest, sim), second = result["pairs"][0], result["pairs"][1]
    assert nearest == source and gen0 == generated["path"].iloc[0] and sim == pytest.approx(sims[0])
    assert second[2] == pytest.approx(sims[1]) and len(result["pairs"]) == 2
    figure = checks.closest_pairs_figure(result["pairs"], n=8, size=64)
    assert figure.size == (2 * 64 + 4, 2 * (64 + 14))
    left = np.asarray(figure)[:64, :64].astype(float)
    assert np.corrcoef(left.ravel(), np.asarray(figure)[:64, 68:].astype(float).ravel())[0, 1] > 0.95


# --------------------------------------------------------------------------------------- Frechet


def test_frechet_distance_is_zero_for_a_set_and_grows_with_a_shift(phantom, view_model):
    features = checks.ClassifierFeatures(view_model, size=RES)
    real = checks.load_images(_table(phantom, "train", "frontal"), RES)
    assert checks.frechet_distance(real, real, features) == pytest.approx(0.0, abs=1e-3)
    held_out = checks.frechet_distance(real, _table(phantom, "test", "frontal"), features, RES)
    small = checks.frechet_distance(real, checks.Images((real.pixels + 0.1).clamp(-1, 1), real.paths), features)
    large = checks.frechet_distance(real, checks.Images((real.pixels + 0.4).clamp(-1, 1), real.paths), features)
    assert 0 < held_out < large and 0 < small < large
    # torchmetrics with our extractor = the Fréchet formula on our features
    with torch.no_grad():
        a, b = features(real.pixels).double().numpy(), features((real.pixels + 0.4).clamp(-1, 1)).double().numpy()
    covmean = linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False)
                                                                 - 2 * covmean)
    assert large == pytest.approx(expected, rel=1e-3)
    assert not any(p.requires_grad for p in features.parameters()) and not features.train().training


# ------------------------------------------------------------------------------ prompt adherence

TEXTBOOK = {"difficulty": 0.0, "size": 64}  # phantom_params of a phantom with plain signs


def _prompts(label_sets) -> pd.DataFrame:
    """A generated set's prompt table (as generated_table reads it), without files."""
    return pd.DataFrame([{"path": f"#{i}", "view": "frontal", **{f: float(f in s) for f in FINDINGS}}
                         for i, s in enumerate(label_sets)])


@pytest.fixture(scope="module")
def disease_model():
    """A small CNN trained on textbook phantom renders of random label sets: a stand-in for the
    real-trained classifier that sees every finding."""
    rng = np.random.default_rng(0)
    table = _prompts([[f for f in FINDINGS if rng.random() < 0.3] for _ in range(400)])
    items = [{"pixel_values": x, "labels": torch.tensor(y, dtype=torch.float32)}
             for x, y in zip(checks.phantom_renders(table, TEXTBOOK, RES, seed=1), table[FINDINGS].to_numpy())]
    torch.manual_seed(0)
    train = torch.utils.data.DataLoader(items[:320], batch_size=32, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    model, _ = train_classifier(build_classifier("small_cnn", len(FINDINGS), in_channels=1), train,
                                torch.utils.data.DataLoader(items[320:], batch_size=64), epochs=6, lr=3e-3,
                                labels=FINDINGS, progress=False)
    model.harness_meta = {"labels": FINDINGS, "resolution": RES}
    return model


def test_adherence_is_high_for_a_drawn_finding_and_chance_for_an_ignored_one(disease_model):
    prompted = _prompts([["Cardiomegaly"]] * 20 + [["Edema"]] * 20 + [[]] * 20)
    drawn = prompted.assign(Edema=0.0)  # a generator that ignores "edema"
    images = checks.phantom_renders(drawn, TEXTBOOK, RES, seed=2)
    with pytest.warns(RuntimeWarning, match="Consolidation"):  # never prompted: one class
        adherence = checks.prompt_adherence(disease_model, prompted, images)
    assert adherence["Cardiomegaly"] > 0.9
    assert 0.3 < adherence["Edema"] < 0.7
    assert all(np.isnan(adherence[f]) for f in ("Consolidation", "Atelectasis", "Pleural Effusion"))
    # the standard per-label AUC: prompted with the finding against every image prompted without it
    scores = checks._scores(disease_model, images)
    assert adherence["Cardiomegaly"] == pytest.approx(roc_auc_score(prompted["Cardiomegaly"], scores[:, 0]))
    # the ceiling: the renderer drawing the prompts as given
    with pytest.warns(RuntimeWarning):
        ceiling = checks.prompt_adherence(disease_model, prompted, checks.phantom_renders(prompted, TEXTBOOK, RES))
    assert ceiling["Cardiomegaly"] > 0.9 and ceiling["Edema"] > 0.9


def test_phantom_renders_are_seeded_and_shaped_like_loaded_images():
    table = _prompts([["Cardiomegaly"], [], ["Edema", "Pleural Effusion"]])
    renders = checks.phantom_renders(table, TEXTBOOK, RES, seed=4)
    assert renders.shape == (3, 1, RES, RES) and -1 <= renders.min() < renders.max() <= 1
    assert torch.equal(renders, checks.phantom_renders(table, TEXTBOOK, RES, seed=4))
    assert not torch.equal(renders, checks.phantom_renders(table, TEXTBOOK, RES, seed=5))


def _rendered_generated(root, label_sets) -> str:
    """A CheXpert-layout generated set (as harness.generate writes) of phantom renders of its prompts."""
    archive = root / "CheXpert-v1.0-small"
    renders = checks.phantom_renders(_prompts(label_sets), TEXTBOOK, 64)
    rows = {"train": [], "valid": []}
    for i, (labels, pixels) in enumerate(zip(label_sets, renders)):
        split = "valid" if i % 5 == 4 else "train"
        rel = f"{split}/patient{i + 1:05d}/study1/view1_frontal.jpg"
        (archive / rel).parent.mkdir(parents=True)
        Image.fromarray(((pixels[0] + 1) * 127.5).round().byte().numpy()).save(archive / rel, quality=92)
        rows[split].append({c: "" for c in CHEXPERT_COLUMNS} | {"Path": f"CheXpert-v1.0-small/{rel}",
                                                               "Frontal/Lateral": "Frontal", **label_cells(labels)})
    for split, split_rows in rows.items():
        pd.DataFrame(split_rows, columns=CHEXPERT_COLUMNS).to_csv(archive / f"{split}.csv", index=False)
    return f"chexpert:{archive}"


@pytest.mark.slow
def test_entry_point_logs_adherence_and_its_ceiling(mlflow_store, phantom, tmp_path, monkeypatch):
    real = f"chexpert:{phantom}"
    classifier_run = classify.main(["--train", real, "--test", real, "--resolution", str(RES), "--epochs", "1",
                                    "--batch_size", "8", "--n_resamples", "10", "--threads", "1"])
    generated = _rendered_generated(tmp_path / "gen", [[f] for f in FINDINGS for _ in range(4)] + [[]] * 4)
    run = mlflow.get_run(checks.main(["--generated", generated, "--real", real, *FAST,
                                      "--classifier_run", classifier_run]))
    m = run.data.metrics
    names = [snake(f) for f in FINDINGS]
    for prefix in ("adherence", "adherence_ceiling"):
        values = [m[f"{prefix}_{n}"] for n in names]
        assert all(0 <= v <= 1 for v in values)  # every finding was prompted
        assert m[f"{prefix}_mean"] == pytest.approx(np.mean(values))
    assert "harness.adherence" not in run.data.tags

    monkeypatch.setattr(checks, "phantom_params", lambda path: None)  # real data: no renderer, no ceiling
    run = mlflow.get_run(checks.main(["--generated", generated, "--real", real, *FAST,
                                      "--classifier_run", classifier_run]))
    assert "adherence_mean" in run.data.metrics and "adherence_ceiling_mean" not in run.data.metrics
    assert "not a phantom" in run.data.tags["harness.adherence_ceiling"]


# ----------------------------------------------------------------------------------- entry point


def test_entry_point_logs_the_checks(mlflow_store, phantom, tmp_path):
    train = _table(phantom, "train", "frontal")["path"].tolist()
    test = _table(phantom, "test", "all")
    sources = (train[:3] + test.loc[test["view"] == "lateral", "path"].tolist()[:3]
               + test.loc[test["view"] == "frontal", "path"].tolist()[:3])
    generated = _fake_generated(tmp_path / "gen", sources)
    run_id = checks.main(["--generated", generated, "--real", f"chexpert:{phantom}", *FAST])
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["memorization_fraction"] == pytest.approx(3 / 9) and m["memorization_max_similarity"] > 0.98
    assert m["memorization_reference_fraction"] == 0 and m["memorization_reference_max_similarity"] < 0.95
    assert m["memorization_fraction_above_reference"] >= 3 / 9
    assert m["view_lateral_fraction"] == pytest.approx(3 / 9) and m["view_frontal_fraction"] == pytest.approx(6 / 9)
    assert m["frechet_distance"] > 0 and m["view_classifier_valid_accuracy"] >= 0.9
    assert run.data.params["n_generated_images"] == "9" and "trained" in run.data.tags["harness.view_classifier"]
    assert "no --classifier_run" in run.data.tags["harness.adherence"] and "adherence_mean" not in m
    client = mlflow.MlflowClient()
    artifacts = {a.path for d in ("memorization", "classifier") for a in client.list_artifacts(run_id, d)}
    assert artifacts == {"memorization/closest_pairs.png", "memorization/pairs.json", "classifier/model.pt"}
    pairs = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/memorization/pairs.json"))
    assert {p[1] for p in pairs["pairs"][:3]} == set(train[:3]) and len(pairs["nn_similarity"]) == 9

    # again with the first run's logged classifier as FID features: the cached view classifier,
    # the same features, the same distance
    again = mlflow.get_run(checks.main(["--generated", generated, "--real", f"chexpert:{phantom}", *FAST,
                                        "--classifier_run", run_id]))
    assert "cached" in again.data.tags["harness.view_classifier"]
    assert run_id in again.data.tags["harness.feature_extractor"]
    assert again.data.metrics["frechet_distance"] == pytest.approx(m["frechet_distance"], rel=1e-6)
    assert "lateral" in again.data.tags["harness.adherence"]  # a view classifier scores no findings


def test_entry_point_errors_name_the_bad_input(mlflow_store, phantom, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train.csv"):
        checks.main(["--generated", f"chexpert:{tmp_path / 'empty'}", "--real", f"chexpert:{phantom}", *FAST])
    with pytest.raises(ValueError, match="has no classifier/model.pt"):
        checks.main(["--generated", f"chexpert:{phantom}", "--real", f"chexpert:{phantom}", *FAST,
                     "--classifier_run", "0" * 32])
    runs = mlflow.search_runs(search_all_experiments=True)
    assert set(runs["status"]) == {"FAILED"} and len(runs) == 2


@pytest.mark.parametrize("flag", ["--generated", "--real"])
def test_unknown_data_format_is_refused_by_the_arguments(flag, capsys):
    argv = {"--generated": "chexpert:/g", "--real": "phantom"} | {flag: "dicom:/data"}
    with pytest.raises(SystemExit):
        checks.parse_args([x for kv in argv.items() for x in kv])
    assert f"{flag}: unknown data format 'dicom'" in capsys.readouterr().err
