"""The one canonical list of findings and CheXpert's official columns.

Everything that names a disease imports it from here (as torchxrayvision does with
``default_pathologies``), so label order is the same in data, prompts, classifiers and reports.
"""

# The five findings of the study (seed write-up), in the write-up's table order.
FINDINGS = ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]

# CheXpert's 14 observation columns, as in the official train.csv / valid.csv.
CHEXPERT_LABELS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]

# The official CheXpert CSV header: metadata columns, then the observations.
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_LABELS
