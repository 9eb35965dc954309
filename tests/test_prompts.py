"""harness.data.prompts: prompts from labels, templates and their errors."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.data import DEFAULT_TEMPLATE, disease_prompts, load_table, make_prompt, prompts_for_table
from harness.pathologies import FINDINGS


@pytest.mark.parametrize(
    "positives, view, expected",
    [
        (["Cardiomegaly"], "frontal", "a frontal chest x-ray showing cardiomegaly"),
        (["Cardiomegaly", "Pleural Effusion"], "frontal", "a frontal chest x-ray showing cardiomegaly and pleural effusion"),
        (["Edema", "Consolidation", "Atelectasis"], "lateral", "a lateral chest x-ray showing edema, consolidation and atelectasis"),
        ([], "frontal", "a frontal chest x-ray with no finding"),
        (["No Finding"], "lateral", "a lateral chest x-ray with no finding"),
    ],
)
def test_make_prompt(positives, view, expected):
    assert make_prompt(positives, view) == expected


def test_custom_templates_and_names():
    fundus = "a fundus photograph showing {findings}"
    assert make_prompt(["RG"], "", template=fundus, names={"RG": "referable glaucoma"}) == "a fundus photograph showing referable glaucoma"
    assert make_prompt([], "", template=fundus, no_finding_template="a healthy fundus photograph") == "a healthy fundus photograph"
    assert make_prompt(["Edema"], "frontal", template="{findings}, {view} radiograph") == "edema, frontal radiograph"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"template": "a {modality} showing {findings}"}, r"unknown placeholder\(s\) \{modality\}; allowed: \{view\}, \{findings\}"),
        ({"template": "a chest x-ray showing {}"}, r"unknown placeholder\(s\) \{\}"),
        ({"template": "a {view} chest x-ray"}, r"must contain \{findings\}"),
        ({"template": "a {view chest x-ray {findings}"}, "not a valid format string"),
        ({"no_finding_template": "a {view} x-ray without {findings}"}, r"unknown placeholder\(s\) \{findings\}; allowed: \{view\}"),
    ],
)
def test_template_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_prompt(["Edema"], "frontal", **kwargs)


def test_positives_errors():
    with pytest.raises(ValueError, match="'No Finding' together with findings"):
        make_prompt(["No Finding", "Edema"], "frontal")
    with pytest.raises(ValueError, match="name a label twice"):
        make_prompt(["Edema", "Edema"], "frontal")
    with pytest.raises(ValueError, match=r"no view but prompt template .* uses \{view\}"):
        make_prompt(["Edema"], "")


def test_prompts_for_table_uses_exact_positives_and_row_views():
    table = pd.DataFrame(
        {
            "view": ["frontal", "lateral", "frontal", "frontal"],
            "Cardiomegaly": np.array([1.0, 0.0, np.nan, 0.0], np.float32),
            "Edema": np.array([1.0, np.nan, 0.0, 0.0], np.float32),
            "Pleural Effusion": np.array([1.0, 1.0, np.nan, 0.0], np.float32),
        }
    )
    table.attrs["labels"] = ["Cardiomegaly", "Edema", "Pleural Effusion"]
    assert prompts_for_table(table) == [
        "a frontal chest x-ray showing cardiomegaly, edema and pleural effusion",
        "a lateral chest x-ray showing pleural effusion",
        "a frontal chest x-ray with no finding",  # unknown (NaN) is not positive
        "a frontal chest x-ray with no finding",
    ]
    assert prompts_for_table(table, labels=["Edema"])[0] == "a frontal chest x-ray showing edema"
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Atelectasis'\]"):
        prompts_for_table(table, labels=["Atelectasis"])


def test_prompts_follow_the_uncertain_policy(tmp_path):
    for name, value in [("a.jpg", 0), ("b.jpg", 255)]:
        Image.new("L", (8, 8), value).save(tmp_path / name)
    pd.DataFrame({"path": ["a.jpg", "b.jpg"], "view": ["frontal", "lateral"], "Edema": [-1, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    spec = f"folder:{tmp_path}"
    assert prompts_for_table(load_table(spec, views="all", uncertain="ones")) == [
        "a frontal chest x-ray showing edema",
        "a lateral chest x-ray showing edema",
    ]
    assert prompts_for_table(load_table(spec, views="all", uncertain="ignore"))[0] == "a frontal chest x-ray with no finding"


def test_disease_prompts():
    prompts = disease_prompts()
    assert list(prompts) == FINDINGS + ["No Finding"]
    assert prompts["Pleural Effusion"] == "a frontal chest x-ray showing pleural effusion"
    assert prompts["No Finding"] == "a frontal chest x-ray with no finding"
    lateral = disease_prompts(["Edema", "No Finding"], view="lateral", template=DEFAULT_TEMPLATE)
    assert lateral == {"Edema": "a lateral chest x-ray showing edema", "No Finding": "a lateral chest x-ray with no finding"}
    fundus = disease_prompts(["RG", "NRG"], view="", template="a fundus photograph showing {findings}",
                             no_finding_template="a fundus photograph", names={"RG": "referable glaucoma", "NRG": "no referable glaucoma"})
    assert fundus["NRG"] == "a fundus photograph showing no referable glaucoma"
