"""The classify step's model: both architectures build, masked BCE ignores NaN targets, and the
small CNN learns from a tiny phantom set (loss goes down, best-validation epoch is kept)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.classifier import build_classifier, masked_bce, predict, train_classifier
from harness.data import phantom
from harness.pathologies import FINDINGS

torch.set_num_threads(2)


def test_build_classifiers():
    x = torch.randn(2, 1, 64, 64)
    assert build_classifier("small_cnn", 5)(x).shape == (2, 5)
    assert build_classifier("small_cnn", 3, in_channels=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    dense = build_classifier("densenet", 5, in_channels=1)  # random init: nothing downloaded
    assert dense(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match="resnet"):
        build_classifier("resnet", 5)


def test_masked_bce_ignores_nan():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan")], [0.0, float("nan")]])
    loss = masked_bce(logits, targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets[:, 0])
    assert loss.item() == pytest.approx(expected.item())
    loss.backward()
    assert torch.all(logits.grad[:, 1] == 0)
    assert masked_bce(logits, torch.full((2, 2), float("nan"))).item() == 0.0


def _phantom_batches(n: int, seed: int, size: int = 32):
    """Images rendered straight from the phantom: Cardiomegaly and Pleural Effusion, half positive each."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(n):
        f = {"Cardiomegaly": bool(i % 2), "Pleural Effusion": bool((i // 2) % 2)}
        img = phantom.render(f, "PA", rng, size=size, difficulty=0.0)
        xs.append(torch.from_numpy(img).float().div(127.5).sub(1)[None])
        ys.append([float(f["Cardiomegaly"]), float(f["Pleural Effusion"]) if i % 5 else float("nan")])
    return torch.stack(xs), torch.tensor(ys)


def _loader(x, y, batch_size, shuffle):
    ds = torch.utils.data.StackDataset(pixel_values=x, labels=y)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def test_small_cnn_learns_the_phantom():
    x, y = _phantom_batches(64, seed=0)
    xv, yv = _phantom_batches(32, seed=1)
    train, valid = _loader(x, y, 16, True), _loader(xv, yv, 32, False)
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 2)
    model, history = train_classifier(model, train, valid, epochs=4, lr=3e-3, seed=0,
                                      labels=["Cardiomegaly", "Pleural Effusion"], progress=False)
    assert len(history) == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 0.9
    best = max(history, key=lambda h: h["valid_macro_auc"])
    scores, targets = predict(model, valid)
    assert scores.shape == targets.shape == (32, 2) and np.isnan(targets).any()
    assert ((scores >= 0) & (scores <= 1)).all()
    # the returned weights are the best epoch's: predicting again reproduces its validation AUC
    from harness.metrics import macro_auc, per_label_auc

    assert macro_auc(per_label_auc(targets, scores, ["a", "b"])) == pytest.approx(best["valid_macro_auc"])


def test_one_class_validation_falls_back_to_loss():
    x, y = _phantom_batches(16, seed=2, size=16)
    yv = torch.zeros(8, 2)
    model = build_classifier("small_cnn", 2)
    with pytest.warns(RuntimeWarning):
        model, history = train_classifier(model, _loader(x, y, 8, True), _loader(x[:8], yv, 8, False),
                                          epochs=2, lr=1e-3, progress=False)
    assert all(math.isnan(h["valid_macro_auc"]) for h in history)
