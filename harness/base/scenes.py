"""Captioned natural-ish images for the base model: drawn shape scenes + skimage's bundled photos.

The base plays the part of SD's natural-image prior, so it learns from generic captioned pictures,
never radiographs. Scenes are drawn procedurally (shapes, colours, sizes, positions, counts,
backgrounds and textures) with captions that say what is drawn; about one in five items is instead
a random crop of a sample photo that scikit-image ships on disk (no download). Everything is
deterministic in (seed, index).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 220, 30),
    "orange": (245, 140, 20), "purple": (140, 40, 180), "pink": (250, 140, 190),
    "cyan": (40, 210, 220), "white": (245, 245, 245), "black": (15, 15, 15),
    "gray": (128, 128, 128), "brown": (120, 70, 30),
}
SHAPES = ["circle", "square", "triangle", "ring", "diamond", "cross", "stripe"]
PLURAL = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
SIZES = {"small": 0.14, "medium": 0.22, "large": 0.33}  # shape radius as a fraction of the side
# Position name -> centre (x, y) as fractions of the side.
POSITIONS = {
    "on the left": (0.27, 0.5), "on the right": (0.73, 0.5), "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73), "in the center": (0.5, 0.5), "in the top left": (0.27, 0.27),
    "in the top right": (0.73, 0.27), "in the bottom left": (0.27, 0.73),
    "in the bottom right": (0.73, 0.73),
}
BACKGROUNDS = ["plain", "gradient", "striped", "checkered", "noisy", "dotted"]
# Plain backgrounds half the time: textures make the base's few-minute training much harder.
BACKGROUND_P = [0.5, 0.1, 0.1, 0.1, 0.1, 0.1]
COUNTS = {1: "a", 2: "two", 3: "three", 4: "four"}

# skimage sample images that live in the installed package (checked: no pooch/network needed).
PHOTOS = {
    "astronaut": "a photo of an astronaut", "coffee": "a photo of a cup of coffee",
    "chelsea": "a photo of a cat", "camera": "a black and white photo of a man with a camera",
    "rocket": "a photo of a rocket", "coins": "a black and white photo of coins",
    "moon": "a black and white photo of the moon surface", "brick": "a photo of a brick wall",
    "grass": "a photo of grass", "gravel": "a photo of gravel", "text": "a photo of printed text",
    "page": "a photo of a page of text", "hubble_deep_field": "a photo of galaxies in space",
    "retina": "a photo of a retina", "immunohistochemistry": "a microscope image of cells",
    "cell": "a microscope image of a cell", "colorwheel": "a color wheel",
    "horse": "a black and white silhouette of a horse",
}

_SS = 4  # supersampling factor for anti-aliased shapes


@functools.lru_cache(maxsize=1)
def _photos() -> dict[str, np.ndarray]:
    """Bundled skimage photos as RGB uint8, downsized so their short side is <= 256 px."""
    import skimage.data

    out = {}
    for name in PHOTOS:
        try:
            img = np.asarray(getattr(skimage.data, name)())
        except Exception:  # a photo this skimage version does not ship on disk: skip it
            continue
        if img.dtype == bool:
            img = np.where(img, 255, 0).astype(np.uint8)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        pil = Image.fromarray(img[..., :3].astype(np.uint8))
        s = 256 / min(pil.size)
        if s < 1:
            pil = pil.resize((round(pil.width * s), round(pil.height * s)), Image.LANCZOS)
        out[name] = np.asarray(pil)
    return out


def _background(rng: np.random.Generator, n: int, color, color2) -> tuple[Image.Image, str]:
    kind = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=BACKGROUND_P)]
    c1, c2 = np.array(color, float), np.array(color2, float)
    if kind == "plain":
        arr = np.broadcast_to(c1, (n, n, 3))
    elif kind == "gradient":
        t = np.linspace(0, 1, n)[:, None, None]
        arr = c1 * (1 - t) + c2 * t
        arr = arr.repeat(n, 1) if rng.random() < 0.5 else arr.repeat(n, 1).transpose(1, 0, 2)
    elif kind == "striped":
        period = n // rng.integers(4, 9)
        band = (np.arange(n) // (period // 2)) % 2
        arr = np.where(band[:, None, None] == 1, c1, c2).repeat(n, 1)
        arr = arr if rng.random() < 0.5 else arr.transpose(1, 0, 2)
    elif kind == "checkered":
        cell = n // rng.integers(3, 7)
        ij = np.arange(n) // cell
        arr = np.where(((ij[:, None] + ij[None, :]) % 2 == 1)[..., None], c1, c2)
    elif kind == "noisy":
        k = 2 * _SS  # noise grains of 2 output pixels
        arr = c1 + rng.normal(0, 30, (n // k, n // k, 1)).repeat(k, 0).repeat(k, 1)
    else:  # dotted
        arr = np.broadcast_to(c1, (n, n, 3)).copy()
        step = n // rng.integers(5, 9)
        yy, xx = np.mgrid[:n, :n]
        arr[((yy % step - step / 2) ** 2 + (xx % step - step / 2) ** 2) < (step / 5) ** 2] = c2
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), kind


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill, angle: float):
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy + 0.15 * r, 1.1 * r), 3, fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(1, int(0.35 * r)))
    elif shape == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "stripe":  # a long bar through the centre, at a random angle
        d = np.array([np.cos(angle), np.sin(angle)]) * 1.6 * r
        draw.line([(cx - d[0], cy - d[1]), (cx + d[0], cy + d[1])], fill=fill, width=max(1, int(0.5 * r)))


def _pick_color(rng, exclude=()) -> str:
    names = [c for c in COLORS if c not in exclude]
    return names[rng.integers(len(names))]


def render_scene(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, str]:
    """One drawn scene: (uint8 HxWx3, caption)."""
    n = resolution * _SS
    bg_color = _pick_color(rng)
    img, bg_kind = _background(rng, n, COLORS[bg_color], COLORS[_pick_color(rng, exclude=(bg_color,))])
    draw = ImageDraw.Draw(img)
    bg_words = {"plain": f"a {bg_color} background", "gradient": f"a {bg_color} gradient background",
                "striped": "a striped background", "checkered": "a checkered background",
                "noisy": f"a noisy {bg_color} background", "dotted": f"a dotted {bg_color} background"}

    phrases = []
    if rng.random() < 0.3:  # a scattered group of 2-4 equal shapes
        shape, color = SHAPES[rng.integers(len(SHAPES))], _pick_color(rng, exclude=(bg_color,))
        count = int(rng.integers(2, 5))
        for _ in range(count):
            cx, cy = rng.uniform(0.15, 0.85, 2) * n
            _draw_shape(draw, shape, cx, cy, 0.12 * n, COLORS[color], rng.uniform(0, np.pi))
        phrases.append(f"{COUNTS[count]} {color} {PLURAL[shape]}")
    else:  # one or two single shapes at named positions
        free = list(POSITIONS)
        for _ in range(1 if rng.random() < 0.6 else 2):
            shape, color = SHAPES[rng.integers(len(SHAPES))], _pick_color(rng, exclude=(bg_color,))
            size = list(SIZES)[rng.integers(len(SIZES))]
            pos = free[rng.integers(len(free))]
            # keep the whole shape in frame: a large shape "on the left" touches the left edge
            cx, cy = np.clip(POSITIONS[pos], SIZES[size], 1 - SIZES[size])
            _draw_shape(draw, shape, cx * n, cy * n, SIZES[size] * n, COLORS[color], rng.uniform(0, np.pi))
            phrases.append(f"a {size} {color} {shape} {pos}")
            # the second shape goes somewhere clearly apart from the first
            free = [p for p in free if max(abs(POSITIONS[p][0] - cx), abs(POSITIONS[p][1] - cy)) > 0.4]
            if not free:
                break
    caption = " and ".join(phrases) + " on " + bg_words[bg_kind]
    out = img.resize((resolution, resolution), Image.LANCZOS)
    if rng.random() < 0.15:  # some black-and-white pictures, like most of the downstream domain
        out = out.convert("L").convert("RGB")
        caption = "a black and white image of " + _gray_words(caption)
    return np.asarray(out), caption


def _gray_words(caption: str) -> str:
    """Swap colour names for how they look in black and white (dark / gray / light)."""
    for c, rgb in COLORS.items():
        lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
        caption = caption.replace(f" {c} ", " dark " if lum < 80 else " light " if lum > 170 else " gray ")
    return caption


def render_photo(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, str]:
    """A random square crop (40-100% of the short side, maybe flipped) of a bundled photo."""
    photos = _photos()
    name = list(photos)[rng.integers(len(photos))]
    img = photos[name]
    h, w = img.shape[:2]
    side = int(min(h, w) * rng.uniform(0.4, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(img[y:y + side, x:x + side]).resize((resolution, resolution), Image.LANCZOS)
    if rng.random() < 0.5 and name not in ("text", "page"):
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    caption = PHOTOS[name]
    if side < 0.6 * min(h, w):
        caption = caption.replace("a photo of", "a close-up photo of").replace("a black and white photo", "a black and white close-up photo")
    return np.asarray(crop), caption


def render(seed: int, index: int, resolution: int, photo_fraction: float = 0.2) -> tuple[np.ndarray, str]:
    """Item ``index`` of the stream for ``seed``: a drawn scene or (photo_fraction) a photo crop."""
    rng = np.random.default_rng([seed, index])
    if rng.random() < photo_fraction and _photos():
        return render_photo(rng, resolution)
    return render_scene(rng, resolution)


class SceneDataset(torch.utils.data.Dataset):
    """``n`` captioned images: {"pixel_values": float [3,H,W] in [-1,1], "caption": str}."""

    def __init__(self, n: int, resolution: int = 64, seed: int = 0, photo_fraction: float = 0.2):
        self.n, self.resolution, self.seed, self.photo_fraction = n, resolution, seed, photo_fraction

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        img, caption = render(self.seed, i, self.resolution, self.photo_fraction)
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 127.5 - 1
        return {"pixel_values": x, "caption": caption}


def caption_corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """Text for the tokenizer: every word the scenes and photos can say, plus ``n`` sampled captions."""
    rng = np.random.default_rng(seed)
    lines = list(PHOTOS.values()) + ["a close-up photo", "a black and white close-up photo"]
    lines += [f"a {s} {c} {sh} {p}" for s in SIZES for c in COLORS for sh in SHAPES for p in POSITIONS][::7]
    lines += [f"{w} {c} {PLURAL[sh]}" for w in COUNTS.values() for c in COLORS for sh in SHAPES]
    lines += [f"on a {k} {c} background" for k in ("", "gradient", "noisy", "dotted") for c in COLORS]
    lines += ["dark", "light", "on a striped background", "on a checkered background", "a black and white image of"]
    lines += [render_scene(rng, 8)[1] for _ in range(n)]
    return lines
