"""Text prompts built from labels.

A prompt names the view and the positive findings, lower-case and joined as in English::

    a frontal chest x-ray showing cardiomegaly
    a frontal chest x-ray showing cardiomegaly and pleural effusion
    a lateral chest x-ray showing edema, consolidation and atelectasis
    a frontal chest x-ray with no finding

Templates are ``str.format`` strings. ``template`` must use ``{findings}`` and may use ``{view}``;
``no_finding_template`` (used when no label is positive) may use ``{view}``. Any other
placeholder is an error. For a non-CXR folder data set pass your own, e.g.
``template="a fundus photograph showing {findings}"``, and ``names={"RG": "referable glaucoma"}``
to say a label differently from its lower-cased name.

"No finding" means: none of the labels in use is positive. With the default FINDINGS that is
"none of the five findings", not CheXpert's "No Finding" column (a row with only pneumonia gets
the no-finding prompt). Load with ``labels=CHEXPERT_LABELS`` when that matters.
"""

from __future__ import annotations

import string

import pandas as pd

from harness.pathologies import FINDINGS

DEFAULT_TEMPLATE = "a {view} chest x-ray showing {findings}"
NO_FINDING_TEMPLATE = "a {view} chest x-ray with no finding"
NO_FINDING = "No Finding"


def join_findings(phrases: list[str]) -> str:
    """``a`` / ``a and b`` / ``a, b and c``."""
    if not phrases:
        raise ValueError("join_findings needs at least one finding")
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def check_template(template: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> None:
    """Raise if ``template`` uses a placeholder outside ``allowed`` or lacks a ``required`` one."""
    fields = _fields(template)
    unknown = [f for f in fields if f not in allowed]
    if unknown:
        shown = ", ".join("{" + f + "}" for f in unknown)
        raise ValueError(
            f"prompt template {template!r} uses unknown placeholder(s) {shown}; allowed: "
            + ", ".join("{" + a + "}" for a in allowed)
        )
    for name in required:
        if name not in fields:
            raise ValueError(f"prompt template {template!r} must contain {{{name}}}")


def _fields(template: str) -> list[str]:
    try:
        return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ValueError(f"prompt template {template!r} is not a valid format string: {err}") from None


def make_prompt(
    positives: list[str],
    view: str,
    template: str = DEFAULT_TEMPLATE,
    no_finding_template: str = NO_FINDING_TEMPLATE,
    names: dict[str, str] | None = None,
) -> str:
    """The prompt for an image whose positive labels are ``positives`` (in the order given).

    ``[]`` or ``["No Finding"]`` gives the no-finding prompt. Each label is said as
    ``names[label]`` if given, else lower-cased.
    """
    check_template(template, ("view", "findings"), required=("findings",))
    check_template(no_finding_template, ("view",))
    positives = list(positives)
    if len(set(positives)) != len(positives):
        raise ValueError(f"positives {positives} name a label twice")
    if NO_FINDING in positives:
        if len(positives) > 1:
            raise ValueError(f"positives {positives} contain {NO_FINDING!r} together with findings")
        positives = []
    chosen = template if positives else no_finding_template
    if "view" in _fields(chosen) and not view:
        raise ValueError(f"the image has no view but prompt template {chosen!r} uses {{view}}")
    if not positives:
        return no_finding_template.format(view=view)
    names = names or {}
    return template.format(view=view, findings=join_findings([names.get(p, p.lower()) for p in positives]))


def prompts_for_table(
    table: pd.DataFrame,
    labels: list[str] | None = None,
    template: str = DEFAULT_TEMPLATE,
    no_finding_template: str = NO_FINDING_TEMPLATE,
    names: dict[str, str] | None = None,
) -> list[str]:
    """One prompt per row of a ``load_table`` table: positive means the label is exactly 1.0
    (after the uncertain policy; NaN and 0 are not positive). ``labels`` defaults to the
    table's ``attrs["labels"]``; a ``No Finding`` column is not said as a finding.
    """
    labels = list(table.attrs.get("labels", []) if labels is None else labels)
    if not labels:
        raise ValueError("no labels to build prompts from: pass labels=... or a table from load_table")
    missing = [l for l in labels + ["view"] if l not in table.columns]
    if missing:
        raise ValueError(f"the table is missing column(s) {missing} needed for prompts; it has {list(table.columns)}")
    findings = [l for l in labels if l != NO_FINDING]
    positive = table[findings].to_numpy() == 1.0
    views = table["view"].fillna("").astype(str).tolist()
    return [
        make_prompt([f for f, p in zip(findings, row) if p], view, template, no_finding_template, names)
        for row, view in zip(positive, views)
    ]


def disease_prompts(
    labels: list[str] = FINDINGS,
    view: str = "frontal",
    template: str = DEFAULT_TEMPLATE,
    no_finding_template: str = NO_FINDING_TEMPLATE,
    names: dict[str, str] | None = None,
) -> dict[str, str]:
    """For generation: one single-finding prompt per label, plus ``"No Finding"``."""
    prompts = {label: make_prompt([label], view, template, no_finding_template, names) for label in labels if label != NO_FINDING}
    prompts[NO_FINDING] = make_prompt([], view, template, no_finding_template, names)
    return prompts
