"""The "classify" step's model: a multi-label CXR classifier, trained with masked BCE.

``small_cnn`` is a few conv blocks (fast on CPU; the default for the embedded phantom set);
``densenet`` is torchxrayvision's DenseNet-121, randomly initialised (no weights are fetched).
Loaders yield ``{"pixel_values": [B, C, H, W] in [-1, 1], "labels": [B, L] with NaN = unknown}``.
Model selection uses the validation macro AUC only - the test split is never looked at here.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.metrics import macro_auc, per_label_auc

CLASSIFIERS = ("small_cnn", "densenet")


class SmallCNN(nn.Module):
    """A 3x3 conv stem, then 3 blocks of two 3x3 convs (32-64-128 ch), each halving the size,
    then a 4x4 spatial head.

    The head keeps coarse position (flatten of a 4x4 map, not a global average): signs such as
    heart width or a raised hemidiaphragm are about where edges are, not only what they look like.
    """

    # width 16: ~45 MMAC per 64 px image, an epoch of ~1300 phantom images in ~10-20 s on 2 cores
    def __init__(self, n_labels: int, in_channels: int = 1, width: int = 16, dropout: float = 0.2):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                  nn.MaxPool2d(2)]
        c = width
        for k in range(1, 4):
            out = width * 2 ** k
            layers += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(4)  # any input size >= 16 px
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c * 16, n_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def build_classifier(name: str, n_labels: int, in_channels: int = 1) -> nn.Module:
    """A randomly initialised classifier emitting n_labels logits."""
    if n_labels < 1:
        raise ValueError(f"n_labels={n_labels} must be >= 1")
    if name == "small_cnn":
        return SmallCNN(n_labels, in_channels)
    if name == "densenet":
        import torchxrayvision as xrv  # lazy: slow import

        # weights=None: random init, nothing is downloaded; num_classes replaces xrv's 18 targets.
        model = xrv.models.DenseNet(weights=None, num_classes=n_labels, in_channels=in_channels)
        model.op_threshs = None
        return model
    raise ValueError(f"unknown classifier {name!r}; choose one of {', '.join(CLASSIFIERS)}")


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy averaged over the known (non-NaN) targets only."""
    known = ~torch.isnan(targets)
    if not known.any():
        return logits.sum() * 0.0  # no signal in this batch, but keep the graph
    loss = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(targets), reduction="none")
    return (loss * known).sum() / known.sum()


@torch.no_grad()
def predict(model: nn.Module, loader, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores [N, L] and targets [N, L] (NaN kept) over a whole loader (on the model's device)."""
    device = device or next(model.parameters()).device
    model.eval()
    scores, targets = [], []
    for batch in loader:
        scores.append(torch.sigmoid(model(batch["pixel_values"].to(device))).float().cpu())
        targets.append(batch["labels"].float())
    if not scores:
        raise ValueError("predict: the loader yielded no batches")
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


def train_classifier(model: nn.Module, train_loader, valid_loader, epochs: int = 8, lr: float = 1e-3, seed: int = 0,
                     device: str = "cpu", labels: list[str] | None = None, progress: bool = True):
    """Train with AdamW + masked BCE; keep the epoch with the best validation macro AUC.

    Returns (model with the best weights, history: one dict per epoch). When no epoch has a
    defined validation AUC (e.g. a one-class validation set) the lowest validation loss decides.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    torch.manual_seed(seed)  # also seeds a DataLoader's shuffling when it has no generator of its own
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, len(train_loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    history, best, best_key = [], None, (-math.inf, -math.inf)
    bar = tqdm(total=steps, desc="classifier", unit="step", disable=not progress)
    for epoch in range(1, epochs + 1):
        model.train()
        total, n = 0.0, 0
        for batch in train_loader:
            x, y = batch["pixel_values"].to(device), batch["labels"].to(device).float()
            loss = masked_bce(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(x), n + len(x)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        scores, targets = predict(model, valid_loader, device)
        names = labels or [f"label_{j}" for j in range(targets.shape[1])]
        aucs = per_label_auc(targets, scores, names)
        valid_loss = masked_bce(torch.logit(torch.from_numpy(scores).double(), eps=1e-7), torch.from_numpy(targets).double()).item()
        record = {"epoch": epoch, "train_loss": total / max(n, 1), "valid_loss": valid_loss,
                  "valid_macro_auc": macro_auc(aucs), **{f"valid_auc/{k}": v for k, v in aucs.items()}}
        history.append(record)
        key = (-math.inf if math.isnan(record["valid_macro_auc"]) else record["valid_macro_auc"], -valid_loss)
        if key > best_key:
            best_key, best = key, copy.deepcopy(model.state_dict())
        if progress:
            bar.write(f"epoch {epoch}: train loss {record['train_loss']:.4f}, valid loss {valid_loss:.4f}, "
                      f"valid macro AUC {record['valid_macro_auc']:.4f}")
    bar.close()
    model.load_state_dict(best)
    return model, history


# ------------------------------------------------------------------------- saving and loading

CLASSIFIER_ARTIFACT = "classifier/model.pt"


# Not mlflow.pytorch.log_model: that pickles the module's class (code); this file is a state
# dict and plain meta, loaded with weights_only=True, so loading one runs no code.
def save_classifier(model: nn.Module, path, **meta) -> Path:
    """Save a harness classifier with what rebuilds it (``meta`` needs ``architecture`` - a
    ``build_classifier`` name -, ``n_labels``, ``in_channels``; plain values only). Atomic."""
    missing = [k for k in ("architecture", "n_labels", "in_channels") if k not in meta]
    if missing:
        raise ValueError(f"save_classifier: meta lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"meta": meta, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load_classifier(path) -> nn.Module:
    """A classifier written by ``save_classifier``, in eval mode, its meta as ``harness_meta``."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    meta = saved["meta"]
    model = build_classifier(meta["architecture"], meta["n_labels"], meta["in_channels"])
    model.load_state_dict(saved["state_dict"])
    model.harness_meta = meta
    return model.eval()


# ------------------------------------------------------------------------------------------ views
