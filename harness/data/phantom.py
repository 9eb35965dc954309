"""Phantom chest radiographs: a procedural CheXpert with known ground truth.

Each image is an attenuation map built from smooth shapes - body, lungs (air), heart, mediastinum,
spine, ribs, clavicles, diaphragm - mapped to grey levels with a random exposure, small rotation
and noise (air dark, bone bright). The five FINDINGS are drawn with their radiological signs:

    Cardiomegaly      cardiothoracic ratio (CTR) > 0.5, normal hearts below (AP films magnify 10%)
    Edema             bilateral perihilar haze + Kerley-like basal septal lines
    Consolidation     a dense patchy opacity confined to one lobe (sharp at its fissure)
    Atelectasis       plate-like linear opacity + volume loss (raised hemidiaphragm, shift)
    Pleural Effusion  basal fluid with a meniscus rising laterally, blunted costophrenic angle

A lateral view shows the same study (one lung ovoid, heart anterior, spine posterior).
Anatomy is drawn per patient, signs per study, exposure/pose/noise per image, so one patient's
studies share anatomy. ``difficulty`` (0 = textbook, 1 = signs near the noise floor) scales
the signs down (and squeezes the CTRs of both classes towards 0.5) and the noise up.

``write_phantom`` writes the real CheXpert-v1.0-small layout (train/valid/test.csv + JPEGs) and
``phantom_truth.csv`` with the true labels, CTR and severities of every image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from harness.config import StepConfig, param, parse
from harness.data.layout import write_csv
from harness.pathologies import CHEXPERT_COLUMNS, CHEXPERT_LABELS, FINDINGS

GENERATOR_VERSION = 2  # bump when the output for given parameters changes: it keys ensure_phantom's cache
DEFAULT_SIZE = 256  # stored px: 4x the 64 px training resolution; ~8 ms per image incl. JPEG
DEFAULT_PATIENTS = 1200  # enough test images for per-finding AUC CIs of a few hundredths
# Calibrated with `python -m bench.calibrate_phantom`: hard enough that a real-trained classifier
# is clearly below a perfect score on every finding (README: the quality section's real AUC).
DEFAULT_DIFFICULTY = 0.8
VIEWS = ("PA", "AP", "LATERAL")
SPLIT_FRACTIONS = (("train", 0.7), ("valid", 0.1), ("test", 0.2))  # by patient, in this order of patient ids
ARCHIVE = "CheXpert-v1.0-small"
TRUTH_CSV = "phantom_truth.csv"
JPEG_QUALITY = 92  # near CheXpert-small's look; deterministic for a given pixel array


# ------------------------------------------------------------------------------- small helpers


def _inside(d, edge):
    """Soft indicator of d < 0 (d a signed distance), edge ~ the blur width."""
    return 0.5 * (1.0 - np.tanh(d / edge))


def _ellipse(x, y, cx, cy, ax, ay):
    """Approximate signed distance to an ellipse (negative inside)."""
    return (np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2) - 1.0) * min(ax, ay)


def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _band(y, yc, half):
    """Flat-topped band of half-width `half` around the curve yc (bone / plate-like profile)."""
    z = ((y - yc) / half) ** 2
    z = z * z
    return 1.0 / (1.0 + z * z)


def _segments(x, y, segs, dx=0.0, dy=0.0):
    """Soft lines along segments (x0, y0, x1, y1, width, weight), shifted by (dx, dy); max over them.

    Each segment is drawn only in its bounding box: ~20x cheaper than on the whole grid."""
    res = x.shape[1]
    out = np.zeros((res, res), np.float32)
    to_px = lambda v: (v + 1) * res / 2 - 0.5  # noqa: E731
    for x0, y0, x1, y1, w, a in segs:
        x0, y0, x1, y1 = x0 + dx, y0 + dy, x1 + dx, y1 + dy
        m = 3 * w
        c0, c1 = int(max(0, np.floor(to_px(min(x0, x1) - m)))), int(min(res, np.ceil(to_px(max(x0, x1) + m)) + 1))
        r0, r1 = int(max(0, np.floor(to_px(min(y0, y1) - m)))), int(min(res, np.ceil(to_px(max(y0, y1) + m)) + 1))
        if c0 >= c1 or r0 >= r1:
            continue
        xs, ys = x[:, c0:c1], y[r0:r1, :]
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * vx + (ys - y0) * vy) / (vx * vx + vy * vy + 1e-9), 0, 1)
        d2 = (xs - x0 - t * vx) ** 2 + (ys - y0 - t * vy) ** 2
        np.maximum(out[r0:r1, c0:c1], a * np.exp(-d2 / (w * w)), out=out[r0:r1, c0:c1])
    return out


def _tree(rng, angles, length, depth=3):
    """A branching vessel tree from (0, 0): each branch splits in two, thinner and shorter."""
    segs = []

    def grow(x0, y0, ang, L, w, level):
        x1, y1 = x0 + L * np.cos(ang), y0 + L * np.sin(ang)
        segs.append((x0, y0, x1, y1, w, 0.4 + 0.6 * w / 0.016))
        if level < depth:
            for sign in (-1, 1):
                grow(x1, y1, ang + sign * rng.uniform(0.25, 0.6), L * rng.uniform(0.6, 0.85), w * 0.7, level + 1)

    for a in angles:
        grow(0.0, 0.0, a + rng.normal(0, 0.15), length * rng.uniform(0.8, 1.2), 0.016, 1)
    return [tuple(float(v) for v in s) for s in segs]


def _strength(difficulty: float) -> float:
    """Sign amplitude multiplier: 1 at difficulty 0, 0.15 at difficulty 1."""
    return 1.0 - 0.85 * float(np.clip(difficulty, 0.0, 1.0))


def _grid(res: int):
    lin = ((np.arange(res) + 0.5) / res * 2 - 1).astype(np.float32)
    return lin[None, :], lin[:, None]  # x across (patient's right on image left), y down


# ------------------------------------------------------------------------------- sampling


def sample_anatomy(rng: np.random.Generator, female: bool = False) -> dict:
    """Patient-level anatomy (shared by all of a patient's studies and views)."""
    n = [float(v) for v in rng.standard_normal(14)]
    return {
        "body_w": 0.90 + 0.04 * n[0],  # soft-tissue half-width (habitus)
        "tissue": 1.0 + 0.05 * n[1],  # soft-tissue thickness
        "thorax": 0.66 + 0.03 * n[2],  # inner rib-cage half-width = CTR denominator / 2
        "apex": -0.72 + 0.03 * n[3],  # lung apex height
        "dome": 0.40 + 0.04 * n[4],  # right hemidiaphragm peak (the left one is lower)
        "heart_y": 0.34 + 0.03 * n[5],
        "rib_y0": -0.80 + 0.02 * n[6],  # first posterior rib at the spine
        "rib_step": 0.125 + 0.006 * n[7],
        "rib_curve": 1.0 + 0.10 * n[8],
        "spine_w": 0.075 + 0.006 * n[9],
        "clav_y": -0.66 + 0.03 * n[10],
        "bubble": float(np.clip(0.6 + 0.4 * n[11], 0.0, 1.2)),  # gastric air bubble size
        "breast": (0.7 + 0.15 * n[12]) if female else 0.0,
        "air": 0.56 + 0.03 * n[13],  # lung air (depth of inspiration)
        "vessels_right": _tree(rng, (-2.0, np.pi, 2.1), 0.20),
        "vessels_left": _tree(rng, (-1.14, 0.0, 1.0), 0.20),
        "vessels_lat": _tree(rng, (-1.8, -2.6, 2.4, 1.2), 0.20),
    }


def sample_signs(findings: dict, rng: np.random.Generator, difficulty: float = DEFAULT_DIFFICULTY) -> dict:
    """Study-level signs: which findings, how severe, where. Always draws the same numbers."""
    unknown = sorted(set(findings) - set(FINDINGS))
    if unknown:
        raise ValueError(f"unknown finding(s) {unknown}; the phantom draws {FINDINGS}")
    on = {f: bool(findings.get(f, False)) for f in FINDINGS}
    s = _strength(difficulty)
    u = [float(v) for v in rng.random(16)]
    severity = {f: u[i] for i, f in enumerate(FINDINGS)}  # 0 = faintest, 1 = textbook
    # CTR: positives above 0.5, negatives below, both classes dense up to 0.5 (borderline hearts
    # exist); difficulty squeezes them towards 0.5.
    spread = 0.02 + 0.13 * s
    ctr = 0.5 + spread * max(severity["Cardiomegaly"], 0.02) if on["Cardiomegaly"] else 0.5 - spread * max(u[5], 0.02)
    return {
        "on": on,
        "strength": s,
        "severity": severity,
        "ctr": ctr,
        "lobe": ("RUL", "RML", "RLL", "LUL", "LLL")[int(u[6] * 5)],
        "atel_side": -1 if u[7] < 0.5 else 1,  # -1 = patient's right = image left
        "eff_sides": (-1, 1) if u[8] < 0.4 else ((-1,) if u[9] < 0.5 else (1,)),
        "blob": u[10:16],  # consolidation / plate positions
    }


# Per-finding sign gain, balancing how learnable each sign is at 64 px (haze and heart size are
# easy, a lobar patch or a thin plate hard), so their AUCs come out alike at any difficulty.
GAIN = {"Cardiomegaly": 1.0, "Edema": 0.75, "Consolidation": 1.5, "Atelectasis": 1.35, "Pleural Effusion": 0.85}


def _amp(sg: dict, finding: str, lo: float = 0.35) -> float:
    """Sign amplitude of a finding (0 when absent): gain x strength x (lo .. 1 by severity)."""
    if not sg["on"][finding]:
        return 0.0
    return GAIN[finding] * sg["strength"] * (lo + (1 - lo) * sg["severity"][finding])


def _blob(x, y, b, cx, cy, sx, sy):
    """An irregular patch: three overlapping Gaussians jittered by b, thresholded softly."""
    g = sum(_gauss(x, y, cx + 0.14 * (b[(3 + j) % 6] - 0.5), cy + 0.12 * (b[(4 + j) % 6] - 0.5), sx, sy) for j in range(3))
    return np.clip(1.6 * g - 0.5, 0, 1)


# ------------------------------------------------------------------------------- frontal view


def _frontal(an: dict, sg: dict, ap: bool, res: int) -> np.ndarray:
    """Attenuation map of a PA (or AP) view; image left = patient's right: the body, the lungs
    with their opacities and markings, the soft-tissue shadows, then the bones."""
    x, y = _grid(res)
    e = 2.0 / res  # edge blur ~1 px
    T = an["thorax"]
    shift, dome = _diaphragm(an, sg, ap)
    body, A = _body(x, y, an)
    lung, dome_y = _lungs(x, y, an, sg, T, dome, e, res)
    heart, covered = _heart_and_mediastinum(x, y, an, sg, ap, T, shift, e)
    lung = lung * (1 - covered)
    A = A + 0.06 * heart
    hila = {-1: (shift - 0.16, -0.06), 1: (shift + 0.16, -0.04)}
    opac, fluid = _opacities(x, y, sg, T, dome, dome_y, hila, e, res)

    # vessels and hila: soft-tissue markings inside the aerated lung
    marks = 0.35 * np.maximum(_segments(x, y, an["vessels_right"], *hila[-1]), _segments(x, y, an["vessels_left"], *hila[1]))
    for hx_, hy_ in hila.values():
        marks += 0.30 * _gauss(x, y, hx_, hy_, 0.05, 0.07)
    profile = 0.8 + 0.2 * np.clip(1 - ((y + 0.05) / 0.75) ** 2, 0, 1)  # apices and bases less dark
    A = A - an["air"] * lung * profile * (1 - np.clip(opac + marks, 0, 1)) + 0.06 * fluid

    # trachea, gastric bubble, breast shadows
    A = A - 0.20 * _inside(np.abs(x - shift * 0.6) - 0.032, e) * _inside(y + 0.30, e) * body
    A = A - 0.35 * an["bubble"] * _inside(_ellipse(x, y, 0.32, dome[1] + 0.12, 0.09, 0.05), e)
    if an["breast"]:
        for side in (-1, 1):
            A = A + 0.10 * an["breast"] * _inside(_ellipse(x, y, side * 0.50, 0.36, 0.32, 0.22), 0.04)
    return _bones(A, x, y, an, ap, T, body, e, res)


def _diaphragm(an: dict, sg: dict, ap: bool):
    """The mediastinal shift and each hemidiaphragm's dome height: atelectasis's volume loss
    raises its side's dome and pulls the mediastinum over; a supine AP film has lower volumes."""
    a_at, side_at = _amp(sg, "Atelectasis"), sg["atel_side"]
    shift = 0.05 * a_at * side_at
    dome = {-1: an["dome"], 1: an["dome"] + 0.04}
    dome[side_at] -= 0.18 * a_at
    if ap:
        dome = {k: v - 0.05 for k, v in dome.items()}
    return shift, dome


def _body(x, y, an: dict):
    """The body's outline (neck and sloping shoulders on top) and its soft tissue, thicker in the middle."""
    w = an["body_w"] * (1 - 0.04 * (y - 0.1) ** 2)
    w = 0.26 + (w + 0.04 - 0.26) * np.sqrt(np.clip((y + 1.02) / 0.36, 0, 1))
    body = _inside(np.abs(x) - w, 0.03)
    return body, body * an["tissue"] * (0.45 + 0.55 * np.sqrt(np.clip(1 - (x / (w + 0.03)) ** 2, 0, 1)))


def _lungs(x, y, an: dict, sg: dict, T: float, dome: dict, e: float, res: int):
    """The lungs' air (thinning towards their edges), cut by the diaphragm domes; the domes' curves."""
    a_at, side_at = _amp(sg, "Atelectasis"), sg["atel_side"]
    lung = np.zeros((res, res), np.float32)
    dome_y = {}
    for side in (-1, 1):
        ay = 0.10 - an["apex"] - (0.10 * a_at if side == side_at else 0.0)
        dome_y[side] = dome[side] + 1.4 * (x - side * 0.30) ** 2
        d = _ellipse(x, y, side * T * 0.52, 0.10, T * 0.48, ay)
        depth = 0.55 + 0.45 * np.sqrt(np.clip(-d / 0.12, 0, 1))  # air thins towards the lung edge
        lung += _inside(d, e) * depth * _inside(y - dome_y[side], e) * (x * side > 0)
    return lung, dome_y


def _heart_and_mediastinum(x, y, an: dict, sg: dict, ap: bool, T: float, shift: float, e: float):
    """The heart (two half-ellipses: 36% right of midline, 64% left, apex lower) and what it,
    the mediastinum and the aortic knob cover of the lungs."""
    W = sg["ctr"] * 2 * T * (1.10 if ap else 1.0)  # AP magnifies the heart
    hx, hy, hh = shift, an["heart_y"], 0.34
    left = x >= hx
    d = np.sqrt(((x - hx) / np.where(left, 0.64 * W, 0.36 * W)) ** 2 + ((y - hy - 0.04 * left) / hh) ** 2) - 1
    heart = _inside(d * 0.3 * W, e)
    med = _inside(np.abs(x - shift) - 0.085 - 0.02 * (y > -0.5), e) * _inside(y - hy, 0.05)
    knob = _inside(_ellipse(x, y, shift + 0.10, -0.38, 0.07, 0.06), e)  # aortic knob
    return heart, np.maximum(np.maximum(heart, med), knob)


def _opacities(x, y, sg: dict, T: float, dome: dict, dome_y: dict, hila: dict, e: float, res: int):
    """The fraction of lung air each finding replaces (0 = aerated, 1 = soft-tissue dense), and the
    pleural fluid on its own (it also adds density outside the air)."""
    on, sev, side_at = sg["on"], sg["severity"], sg["atel_side"]
    opac = np.zeros((res, res), np.float32)
    if on["Edema"]:
        a = _amp(sg, "Edema")
        for hx_, hy_ in hila.values():  # bat-wing perihilar haze
            opac += 0.55 * a * _gauss(x, y, hx_, hy_ + 0.06, 0.20, 0.26)
        rim = np.clip(1 - (T - np.abs(x)) / 0.15, 0, 1) * _inside(-(y - 0.05), 0.03)
        opac += 0.8 * a * rim * (np.cos(2 * np.pi * y / 0.05) > 0.6)  # Kerley B lines at the bases
    if on["Consolidation"]:
        opac += _consolidation_frontal(x, y, sg, T, dome, e)
    if on["Atelectasis"]:
        a_at, b = _amp(sg, "Atelectasis"), sg["blob"]
        yc = dome[side_at] - 0.12 - 0.08 * b[0] + 0.10 * (np.abs(x) - 0.35) * (b[1] - 0.5)
        in_x = _inside(np.abs(np.abs(x) - 0.36) - 0.20, 0.03) * (x * side_at > 0)
        opac += 0.95 * min(1.0, 1.4 * a_at) * _band(y, yc, 0.016 + 0.012 * sev["Atelectasis"]) * in_x
    fluid = np.zeros((res, res), np.float32)
    if on["Pleural Effusion"]:
        f = _amp(sg, "Pleural Effusion", 0.4)
        t = np.clip((np.abs(x) - 0.1) / (T - 0.1), 0, 1)
        for side in sg["eff_sides"]:
            level = dome[side] + 0.16 - 0.42 * f  # fluid top at the lateral chest wall
            meniscus = level + 0.16 * (1 - t) ** 1.5  # curving up laterally
            fluid += (_inside(meniscus - y, 0.03) * (x * side > 0) * _inside(np.abs(x) - T - 0.02, e)
                      * _inside(y - dome_y[side] - 0.05, 0.03))
        fluid = np.clip(fluid, 0, 1)
        opac += fluid
    return opac, fluid


def _bones(A, x, y, an: dict, ap: bool, T: float, body, e: float, res: int):
    """Spine with pedicles, posterior + anterior ribs, clavicles, humeral heads (+ scapulae on AP)."""
    sw, step, y0 = an["spine_w"], an["rib_step"], an["rib_y0"]
    disc = 0.5 + 0.5 * np.cos(2 * np.pi * (y - y0 - step / 2) / step)
    A = A + 0.06 * _inside(np.abs(x) - sw, e) * (1 - 0.4 * disc ** 6)
    ax_ = np.abs(x)
    t = np.clip((ax_ - 0.05) / T, 0, 0.985)
    arc = 1 - np.sqrt(1 - t * t)  # posterior ribs: flat at the spine, turning down at the wall
    slope = np.sqrt(1 + ((-0.22 + 0.9 * t + 0.12 * t / np.sqrt(1 - t * t)) / T) ** 2)  # keeps the rib width along the curve
    ta_raw = (ax_ - 0.2) / (T - 0.2)
    ta = np.clip(ta_raw, 0, 1)
    in_post = _inside((ax_ - 0.05) / T - 1.0, 0.02) * _inside(0.05 - ax_, 0.02)
    in_ant = _inside(0.2 - ax_, 0.03) * _inside(ta_raw - 1.0, 0.03)
    ribs = np.zeros((res, res), np.float32)
    for i in range(10):
        k = an["rib_curve"] * (1.2 - 0.04 * i)
        yc = y0 + i * step + (-0.22 * t + 0.45 * t * t + 0.12 * arc) * k
        ribs = np.maximum(ribs, _band(y, yc, (0.026 + 0.001 * i) * slope) * in_post)
        yca = y0 + i * step + 0.25 * k + 0.28 * (1 - ta) ** 1.2  # anterior ribs: down towards the sternum
        ribs = np.maximum(ribs, 0.45 * _band(y, yca, 0.032) * in_ant)
    A = A + 0.09 * ribs * body
    tc = (ax_ - 0.05) / 0.58
    cy = an["clav_y"] - (0.07 if ap else 0.0)  # AP: clavicles project higher
    A = A + 0.20 * _band(y, cy + 0.06 - 0.20 * tc + 0.03 * np.sin(2 * np.pi * tc), 0.026) * _inside(np.abs(tc - 0.5) - 0.5, 0.02)
    for side in (-1, 1):
        A = A + 0.20 * _inside(_ellipse(x, y, side * (an["body_w"] + 0.04), -0.86, 0.16, 0.17), 0.02)
        if ap:  # scapula's medial border over the lung
            A = A + 0.05 * _band(x, side * (T - 0.02 + 0.1 * (y + 0.7)), 0.03) * _inside(np.abs(y + 0.35) - 0.35, 0.03)
    return A


def _consolidation_frontal(x, y, sg, T, dome, e):
    lobe, b, a = sg["lobe"], sg["blob"], _amp(sg, "Consolidation", 0.5)
    side = -1 if lobe.startswith("R") else 1
    if lobe == "RUL":  # sharp lower edge at the horizontal fissure
        cy, region = -0.35, _inside(y + 0.08, e)
    elif lobe == "LUL":
        cy, region = -0.30, _inside(y - 0.05, 0.06)
    elif lobe == "RML":  # silhouettes the right heart border
        cy, region = 0.15, _inside(-(y + 0.08), e) * _inside(np.abs(x + 0.22) - 0.25, 0.04)
    else:
        cy, region = dome[side] - 0.15, _inside(-(y + 0.05), 0.06)
    cx = side * (0.32 + 0.25 * T * (b[2] - 0.5))
    return 0.95 * min(1.0, 1.3 * a) * _blob(x, y, b, cx, cy, 0.14, 0.12) * region * (x * side > 0)


# ------------------------------------------------------------------------------- lateral view


def _lateral(an: dict, sg: dict, res: int) -> np.ndarray:
    """Attenuation map of a lateral view: patient facing left (anterior at image left)."""
    x, y = _grid(res)
    e = 2.0 / res
    on, sev = sg["on"], sg["severity"]

    a_at = _amp(sg, "Atelectasis")
    body = _inside(_ellipse(x, y, 0.04, 0.15, 0.80 + 0.5 * (an["body_w"] - 0.9), 1.35), 0.03)
    A = body * an["tissue"] * 1.1 + 0.22 * _inside(y + 0.45, 0.10) * body  # arms over the upper chest
    domes = [an["dome"], an["dome"] + 0.05]  # right, left hemidiaphragm
    domes[0 if sg["atel_side"] < 0 else 1] -= 0.18 * a_at
    yd = [d + 0.9 * np.clip(x + 0.1, 0, None) ** 2 + 0.2 * np.clip(-x - 0.1, 0, None) ** 2 for d in domes]
    lung = _inside(_ellipse(x, y, 0.0, 0.10, 0.58, 0.10 - an["apex"]), e)
    lung = lung * 0.5 * (_inside(y - yd[0], e) + _inside(y - yd[1], e))
    W = 0.50 * sg["ctr"] / 0.44  # heart depth grows with the CTR
    heart = _inside(_ellipse(x, y, -0.57 + W / 2, an["heart_y"] + 0.04, W / 2, 0.34), e)
    lung = lung * (1 - heart)

    opac = np.zeros((res, res), np.float32)
    if on["Edema"]:
        a = _amp(sg, "Edema")
        opac += 0.6 * a * _gauss(x, y, 0.05, 0.0, 0.26, 0.26)  # perihilar haze
        opac += 0.6 * a * _band(y, -0.05 + 0.05 * x, 0.012) * _inside(np.abs(x + 0.25) - 0.3, 0.03)  # thick fissure
        opac += 0.6 * a * (np.cos(2 * np.pi * y / 0.05) > 0.6) * _inside(np.abs(x + 0.45) - 0.1, 0.03) * (y > 0.1)
    if on["Consolidation"]:
        a, b, lobe = _amp(sg, "Consolidation", 0.5), sg["blob"], sg["lobe"]
        oblique = y - (0.05 - 0.95 * x)  # oblique fissure: > 0 below / behind it
        if lobe in ("RLL", "LLL"):
            cx, cy, region = 0.30, 0.28, _inside(-oblique, e)
        elif lobe == "RML":
            cx, cy, region = -0.30, 0.20, _inside(oblique, e) * _inside(-(y + 0.02), e)
        else:
            cx, cy, region = -0.15, -0.40, _inside(oblique, e)
        opac += 0.95 * min(1.0, 1.3 * a) * _blob(x, y, b, cx, cy, 0.15, 0.13) * region
    if on["Atelectasis"]:
        b = sg["blob"]
        yc = min(domes) - 0.14 - 0.06 * b[0] + 0.15 * (x - 0.1) * (b[1] - 0.3)
        opac += 0.95 * min(1.0, 1.4 * a_at) * _band(y, yc, 0.018 + 0.012 * sev["Atelectasis"]) * _inside(np.abs(x - 0.1) - 0.3, 0.03)
    fluid = np.zeros((res, res), np.float32)
    if on["Pleural Effusion"]:
        f = _amp(sg, "Pleural Effusion", 0.4) * (1.2 if len(sg["eff_sides"]) == 2 else 1.0)
        level = max(domes) + 0.40 - 0.50 * f  # fluid top at the posterior chest wall
        meniscus = level + 0.35 * np.clip((0.58 - x) / 1.0, 0, 1) ** 1.5  # rising posteriorly
        fluid = _inside(meniscus - y, 0.03) * _inside(_ellipse(x, y, 0.0, 0.05, 0.60, 1.0), e)
        opac += fluid
    opac = np.clip(opac, 0, 1)

    marks = 0.35 * _segments(x, y, an["vessels_lat"], 0.05, -0.05) + 0.35 * _gauss(x, y, 0.05, -0.05, 0.08, 0.09)
    A = A - an["air"] * 1.05 * lung * (1 - np.clip(opac + marks, 0, 1)) + 0.05 * heart + 0.06 * fluid
    A = A - 0.20 * _band(x, -0.05 + 0.1 * (y + 1), 0.03) * _inside(y + 0.15, e)  # trachea
    A = A - 0.35 * an["bubble"] * _inside(_ellipse(x, y, -0.2, domes[1] + 0.14, 0.09, 0.05), e)

    # spine (vertebral bodies with discs + posterior elements), sternum, posterior ribs
    step, y0 = an["rib_step"], an["rib_y0"]
    xs = 0.60 + 0.06 * y ** 2
    disc = 0.5 + 0.5 * np.cos(2 * np.pi * (y - y0 - step / 2) / step)
    A = A + 0.16 * _inside(np.abs(x - xs) - 0.10, e) * (1 - 0.5 * disc ** 8)
    A = A + 0.08 * _inside(np.abs(x - xs - 0.19) - 0.05, e) * body
    A = A + 0.12 * _band(x, -0.70 + 0.08 * (y + 0.6), 0.025) * _inside(np.abs(y + 0.15) - 0.42, e)
    for i in range(10):
        yc = y0 + i * step + 0.2 + 0.5 * (0.55 - x)
        A = A + 0.04 * _band(y, yc, 0.022) * _inside(np.abs(x - 0.25) - 0.3, 0.05)
    return A


# ------------------------------------------------------------------------------- rendering

INTERNAL_RES = 128  # attenuation maps are drawn at <= this and resampled: 4x cheaper than 256


def draw(anatomy: dict, signs: dict, view: str, rng: np.random.Generator, size: int = DEFAULT_SIZE,
         difficulty: float = DEFAULT_DIFFICULTY) -> np.ndarray:
    """One image of a given patient/study: pose, exposure and noise come from rng."""
    if view not in VIEWS:
        raise ValueError(f"view {view!r} is not one of {VIEWS}")
    if size < 16:
        raise ValueError(f"size={size} is too small (need >= 16 px)")
    n = [float(v) for v in rng.standard_normal(8)]
    res = min(size, INTERNAL_RES)
    A = _lateral(anatomy, signs, res) if view == "LATERAL" else _frontal(anatomy, signs, view == "AP", res)

    # pose: small rotation, shift and zoom about the centre, resampled to `size`
    angle = np.deg2rad(np.clip(2.5 * n[0], -6, 6))
    zoom = 1.0 + 0.04 * n[1]
    mat = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * (res / size / zoom)
    offset = (res - 1) / 2.0 - mat @ np.full(2, (size - 1) / 2.0) + res * 0.015 * np.array(n[2:4])
    A = ndimage.affine_transform(A.astype(np.float32), mat, offset=offset, output_shape=(size, size), order=1, mode="nearest")
    A = ndimage.gaussian_filter(A, sigma=size / 256 * (0.6 + 0.3 * abs(n[4])))

    # exposure: window + gamma; AP portables are flatter and noisier, laterals denser
    lo, hi = -0.02 + 0.04 * n[5], 1.28 + 0.05 * n[6]
    if view == "AP":
        lo, hi = lo - 0.06, hi + 0.06
    elif view == "LATERAL":
        lo, hi = lo + 0.10, hi + 0.10
    gamma = 1.3 * float(np.exp(0.10 * n[7]))
    img = np.clip((A - lo) / (hi - lo), 0, 1) ** gamma
    sigma = (0.012 + 0.05 * float(np.clip(difficulty, 0, 1))) * (1.3 if view == "AP" else 1.0)
    img = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def render(findings: dict, view: str, rng: np.random.Generator, size: int = DEFAULT_SIZE,
           difficulty: float = DEFAULT_DIFFICULTY) -> np.ndarray:
    """A random patient with the given findings (FINDINGS names -> bool) as a uint8 HxW image.

    Draws anatomy, then signs, then pose/noise from rng, always the same number of draws, so
    two calls with equal rng states differing only in `findings` show the same patient.
    """
    anatomy = sample_anatomy(rng, female=bool(rng.random() < 0.5))
    signs = sample_signs(findings, rng, difficulty)
    return draw(anatomy, signs, view, rng, size, difficulty)


# ------------------------------------------------------------------------------- data set


def _study_findings(rng: np.random.Generator, hf: bool) -> dict:
    """Findings of one study: heart failure raises cardiomegaly, edema and effusion together."""
    u = rng.random(5)
    card = u[0] < (0.55 if hf else 0.07)
    edema = u[1] < (0.45 if hf else 0.04)
    eff = u[2] < (0.50 if hf else 0.10)
    cons = u[3] < 0.13
    atel = u[4] < (0.30 if eff else 0.13)  # compressive atelectasis next to fluid
    return dict(zip(FINDINGS, (card, edema, cons, atel, eff)))


def _label_cells(split: str, truth: dict, signs: dict, rng: np.random.Generator) -> dict:
    """The CheXpert observation cells of one image as strings ("1.0", "0.0", "-1.0", "")."""
    u = rng.random(2 * len(FINDINGS))
    if split != "train":  # valid/test: radiologist consensus, every cell 0/1 like CheXpert's valid.csv
        cells = {label: "0.0" for label in CHEXPERT_LABELS}
        for f in FINDINGS:
            cells[f] = "1.0" if truth[f] else "0.0"
        cells["No Finding"] = "0.0" if any(truth.values()) else "1.0"
        return cells
    cells = {label: "" for label in CHEXPERT_LABELS}
    for i, f in enumerate(FINDINGS):
        borderline = abs(signs["ctr"] - 0.5) < 0.012 if f == "Cardiomegaly" else (truth[f] and signs["severity"][f] < 0.2)
        if borderline and u[i] < 0.5:
            cells[f] = "-1.0"  # "possible ...": the labeler's uncertain
        elif truth[f]:
            cells[f] = "1.0"
        elif u[len(FINDINGS) + i] < 0.25:
            cells[f] = "0.0"  # explicitly negated; otherwise not mentioned (blank)
    if not any(cells[f] for f in FINDINGS if cells[f] in ("1.0", "-1.0")):
        cells["No Finding"] = "1.0"
    return cells


def _split_sizes(n_patients: int) -> list[int]:
    if n_patients < 3:
        raise ValueError(f"n_patients={n_patients}: need at least 3 (one per split)")
    valid = max(1, round(n_patients * SPLIT_FRACTIONS[1][1]))
    test = max(1, round(n_patients * SPLIT_FRACTIONS[2][1]))
    return [n_patients - valid - test, valid, test]


def _write_patient(out: Path, split: str, pid: int, rng: np.random.Generator, difficulty: float, size: int):
    """Render one patient's studies into out/<split>/patientNNNNN; yield (csv row, truth row)."""
    female = bool(rng.random() < 0.5)
    age = int(np.clip(rng.normal(62, 17), 18, 90))
    hf = bool(rng.random() < 0.10 + 0.25 * (age > 65))  # latent heart failure, commoner when old
    anatomy = sample_anatomy(rng, female)
    n_studies = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    patient = f"patient{pid:05d}"
    for k in range(1, n_studies + 1):
        truth = _study_findings(rng, hf)
        signs = sample_signs(truth, rng, difficulty)
        ap = bool(rng.random() < (0.70 if hf else 0.40))  # sicker patients get portable AP films
        lateral = bool(rng.random() < 0.3)
        views = [("view1_frontal.jpg", "AP" if ap else "PA")] + ([("view2_lateral.jpg", "LATERAL")] if lateral else [])
        cells = _label_cells(split, truth, signs, rng)  # one report per study: its views share labels
        study_dir = out / split / patient / f"study{k}"
        study_dir.mkdir(parents=True, exist_ok=True)
        for name, view in views:
            img = draw(anatomy, signs, view, rng, size, difficulty)
            Image.fromarray(img, mode="L").save(study_dir / name, quality=JPEG_QUALITY)
            path = f"{ARCHIVE}/{split}/{patient}/study{k}/{name}"
            row = {"Path": path, "Sex": "Female" if female else "Male", "Age": str(age),
                   "Frontal/Lateral": "Lateral" if view == "LATERAL" else "Frontal",
                   "AP/PA": "" if view == "LATERAL" else view, **cells}
            truth_row = {"Path": path, "split": split, "view": view, "heart_failure": int(hf),
                         "ctr": f"{signs['ctr']:.4f}", **{f: int(truth[f]) for f in FINDINGS},
                         **{f"severity_{f}": f"{signs['severity'][f]:.4f}" for f in FINDINGS}}
            yield row, truth_row


def write_phantom(root, n_patients: int = DEFAULT_PATIENTS, seed: int = 0, difficulty: float = DEFAULT_DIFFICULTY,
                  size: int = DEFAULT_SIZE) -> Path:
    """Write a phantom CheXpert under root; returns root/CheXpert-v1.0-small.

    Built in a temporary folder next to root and renamed into place, so a killed run leaves
    no half-written data set. Refuses to overwrite an existing root/CheXpert-v1.0-small.
    """
    root = Path(root).expanduser().absolute()
    final = root / ARCHIVE
    if final.exists():
        raise FileExistsError(f"{final} already exists; remove it or choose another root")
    if not 0.0 <= difficulty <= 1.0:
        raise ValueError(f"difficulty={difficulty} must be in [0, 1]")
    sizes = _split_sizes(n_patients)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        out = tmp / ARCHIVE
        out.mkdir()
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_patients)]
        split_of = [name for (name, _), n in zip(SPLIT_FRACTIONS, sizes) for _ in range(n)]
        rows = {name: [] for name, _ in SPLIT_FRACTIONS}
        truth = []
        for i in tqdm(range(n_patients), desc=f"phantom {out.name}", unit="patient"):
            for row, truth_row in _write_patient(out, split_of[i], i + 1, rngs[i], difficulty, size):
                rows[split_of[i]].append(row)
                truth.append(truth_row)
        for name, split_rows in rows.items():
            write_csv(out / f"{name}.csv", CHEXPERT_COLUMNS, split_rows)
        write_csv(out / TRUTH_CSV, list(truth[0]), truth)
        params = {"generator_version": GENERATOR_VERSION, "n_patients": n_patients, "seed": seed,
                  "difficulty": difficulty, "size": size}
        (out / "phantom.json").write_text(json.dumps(params, indent=2) + "\n")
        if root.exists():
            os.rename(out, final)  # raises if another writer got there first
        else:
            os.rename(tmp, root)
            return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def phantom_params(archive) -> dict | None:
    """The parameters a phantom archive dir was written with (its ``phantom.json``: seed,
    difficulty, size, ...); None for a data set the phantom did not write."""
    path = Path(archive) / "phantom.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _data_dir(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HARNESS_DATA_DIR"):
        return Path(os.environ["HARNESS_DATA_DIR"]).expanduser()
    return Path(__file__).resolve().parents[2] / "data"  # <repo root>/data


def ensure_phantom(n_patients: int = DEFAULT_PATIENTS, seed: int = 0, difficulty: float = DEFAULT_DIFFICULTY,
                   size: int = DEFAULT_SIZE, cache_dir=None) -> Path:
    """The cached phantom for these parameters (written on first use); returns its archive dir."""
    params = {"generator_version": GENERATOR_VERSION, "n_patients": int(n_patients), "seed": int(seed),
              "difficulty": float(difficulty), "size": int(size)}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = _data_dir(cache_dir) / f"phantom-{key}"
    final = root / ARCHIVE
    if (final / "test.csv").is_file():
        return final
    try:
        return write_phantom(root, n_patients, seed, difficulty, size)
    except (FileExistsError, OSError):
        if (final / "test.csv").is_file():  # a concurrent writer finished first
            return final
        raise


@dataclass
class PhantomConfig(StepConfig):
    out: str | None = param(None, "root folder to write (default: the ensure_phantom cache)", key=False)
    patients: int = param(DEFAULT_PATIENTS, project=True)
    seed: int = param(0, project=True)
    difficulty: float = param(DEFAULT_DIFFICULTY, "0 = textbook signs, 1 = near the noise floor")
    size: int = param(DEFAULT_SIZE, "stored image size in px")

    def check(self) -> None:
        self.at_least(3, "patients")  # one patient per split
        self.not_negative("seed")
        self.within("difficulty", 0.0, 1.0)
        self.at_least(16, "size")


def run(config: PhantomConfig) -> Path:
    """Write (or find in the cache) the phantom; returns and prints its archive dir."""
    if config.out:
        path = write_phantom(config.out, config.patients, config.seed, config.difficulty, config.size)
    else:
        path = ensure_phantom(config.patients, config.seed, config.difficulty, config.size)
    print(path)
    return path


def main(argv=None) -> Path:
    return run(parse(PhantomConfig, argv, prog="python -m harness.data.phantom"))


if __name__ == "__main__":
    main()
