"""Synthetic faces: the embedded default's data.

A procedural renderer draws a cartoon face whose expression is set by facial action parameters (loosely after
FACS action units), with jitter in pose, face shape, colours, stroke widths and pixel noise. Because the labels
and the action parameters of every image are known, every stage is verifiable, and a rule-based oracle teacher
can explain each face from its parameters (`synthetic_actions.jsonl`, read by `load_action_params`).

`write_synthetic_datasets` writes RAF-DB, FERPlus, AffectNet and SFEW 2.0 look-alikes in their original layouts
(see the layouts agreed with `unifer_ray.data.sources`), each with its own label set.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unifer_ray.labels import AFFECTNET, DATASETS, RAFDB, canonical, dataset_spec
from unifer_ray.records import ErrorRecord

ACTIONS_FILE = "synthetic_actions.jsonl"


class ActionParams(BaseModel):
    """Facial actions of one face; the defaults are the relaxed, neutral face."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    brow_raise: float = Field(0.0, ge=0.0, le=1.0, description="both brows up, forehead wrinkles (AU1+2)")
    brow_lower: float = Field(0.0, ge=0.0, le=1.0, description="brows down and drawn together, furrow (AU4)")
    brow_slant: float = Field(0.0, ge=-1.0, le=1.0, description="inner brow ends up (+, AU1) or down (-, anger's V)")
    eye_open: float = Field(0.5, ge=0.0, le=1.0,
                            description="0 closed, 0.5 relaxed, 1 wide with white above the iris (AU5)")
    lid_tighten: float = Field(0.0, ge=0.0, le=1.0, description="lower lids raised, creases under the eyes (AU6/AU7)")
    mouth_corner: float = Field(0.0, ge=-1.0, le=1.0, description="lip corners up (+, AU12) or down (-, AU15)")
    mouth_open: float = Field(0.0, ge=0.0, le=1.0, description="lips parted and jaw dropped (AU25/26/27)")
    lip_press: float = Field(0.0, ge=0.0, le=1.0, description="lips pressed thin and narrow (AU23/24)")
    lip_stretch: float = Field(0.0, ge=0.0, le=1.0, description="lips stretched sideways (AU20)")
    nose_wrinkle: float = Field(0.0, ge=0.0, le=1.0, description="nose wrinkled, upper lip raised (AU9/10)")
    mouth_asym: float = Field(0.0, ge=0.0, le=1.0,
                              description="one lip corner (the image's right) raised and dimpled (unilateral AU12/14)")


def param_range(name: str) -> tuple[float, float]:
    """The documented (low, high) range of one ActionParams field."""
    metadata = ActionParams.model_fields[name].metadata
    low = next(m.ge for m in metadata if hasattr(m, "ge"))
    high = next(m.le for m in metadata if hasattr(m, "le"))
    return float(low), float(high)


# One prototype per canonical emotion; fields not named keep ActionParams' neutral defaults.
PROTOTYPES: dict[str, dict[str, float]] = {
    "neutral": {},
    "happiness": {"mouth_corner": 0.95, "lid_tighten": 0.5, "mouth_open": 0.3, "eye_open": 0.4},  # AU6+12
    "sadness": {"brow_slant": 0.9, "brow_lower": 0.3, "mouth_corner": -0.85, "eye_open": 0.35},  # AU1+4+15
    "surprise": {"brow_raise": 1.0, "eye_open": 1.0, "mouth_open": 0.9},  # AU1+2+5+26
    "fear": {"brow_raise": 0.6, "brow_lower": 0.4, "brow_slant": 0.7, "eye_open": 1.0,
             "lip_stretch": 0.9, "mouth_open": 0.45},  # AU1+2+4+5+20+26
    "disgust": {"nose_wrinkle": 1.0, "mouth_corner": -0.5, "brow_lower": 0.4, "lid_tighten": 0.4,
                "mouth_open": 0.2},  # AU9+15+16
    "anger": {"brow_lower": 1.0, "brow_slant": -1.0, "eye_open": 0.75, "lid_tighten": 0.5,
              "lip_press": 1.0},  # AU4+5+7+23
    "contempt": {"mouth_asym": 1.0, "eye_open": 0.45},  # unilateral AU12/14
}


def sample_params(emotion: str, rng: np.random.Generator, intensity_noise: float = 0.08) -> ActionParams:
    """The prototype of `emotion` (any dataset's label name) plus Gaussian noise on every parameter, clipped.

    The noise's standard deviation is `intensity_noise` times each parameter's range.
    """
    if intensity_noise < 0:
        raise ValueError(f"intensity_noise must be >= 0, got {intensity_noise}")
    prototype = PROTOTYPES[canonical(emotion)]
    values = {}
    for name, field in ActionParams.model_fields.items():
        low, high = param_range(name)
        value = prototype.get(name, field.default) + rng.normal(0.0, intensity_noise * (high - low))
        values[name] = float(np.clip(value, low, high))
    return ActionParams(**values)


# ----------------------------------------------------------------------------------------------- rendering

SKIN_TONES = ((255, 224, 196), (241, 194, 150), (224, 172, 120), (198, 140, 90), (150, 100, 65), (110, 75, 55))
HAIR_COLOURS = ((30, 22, 18), (70, 45, 30), (120, 80, 45), (200, 160, 90), (150, 150, 150), (100, 30, 20))
IRIS_COLOURS = ((70, 45, 25), (40, 30, 25), (60, 100, 150), (70, 110, 70))
SCLERA = (245, 245, 240)
TEETH = (240, 238, 225)
MOUTH_INSIDE = (70, 20, 30)
Colour = tuple[int, int, int]


@dataclass(frozen=True)
class Look:
    """Everything about one image that is not the expression: pose, face shape, colours, strokes, noise."""

    shift: tuple[float, float]  # face centre offset, as a fraction of the image size
    scale: float  # face half-height, as a fraction of the image size
    angle: float  # in-plane rotation, radians
    face_width: float  # face half-width in face units (the face half-height is 1)
    eye_dx: float  # eye centre distance from the midline
    eye_y: float
    mouth_y: float
    mouth_width: float
    hairline: float  # y of the hair fringe
    gaze: float  # iris offset from the eye centre
    skin: Colour
    hair: Colour
    iris: Colour
    background: Colour
    stroke: float  # multiplier on every line width
    contrast: float
    brightness: float
    noise: float  # pixel noise standard deviation, 0-255 scale


def _clip_colour(values) -> Colour:
    return tuple(min(255, max(0, int(v))) for v in values)


def _jitter(rng: np.random.Generator, colour: Colour, amount: int) -> Colour:
    return _clip_colour(np.add(colour, rng.integers(-amount, amount + 1, size=3)))


def sample_look(rng: np.random.Generator) -> Look:
    return Look(
        # Pose jitter of aligned face crops: small, so that the expression is the largest change between images.
        shift=(float(rng.uniform(-0.025, 0.025)), float(rng.uniform(-0.025, 0.025))),
        scale=float(rng.uniform(0.39, 0.45)),
        angle=float(np.radians(rng.uniform(-5, 5))),
        face_width=float(rng.uniform(0.70, 0.82)),
        eye_dx=float(rng.uniform(0.28, 0.33)),
        eye_y=float(rng.uniform(-0.12, -0.06)),
        mouth_y=float(rng.uniform(0.48, 0.56)),
        mouth_width=float(rng.uniform(0.26, 0.30)),
        hairline=float(rng.uniform(-0.85, -0.76)),
        gaze=float(rng.uniform(-0.03, 0.03)),
        skin=_jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 12),
        hair=_jitter(rng, HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 15),
        iris=_jitter(rng, IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))], 15),
        background=tuple(int(c) for c in rng.integers(40, 230, size=3)),
        stroke=float(rng.uniform(0.85, 1.2)),
        contrast=float(rng.uniform(0.85, 1.15)),
        brightness=float(rng.uniform(-20, 20)),
        noise=float(rng.uniform(0.0, 8.0)),
    )


def _shade(colour: Colour, factor: float) -> Colour:
    return _clip_colour(c * factor for c in colour)


def _mix(a: Colour, b: Colour, t: float) -> Colour:
    return tuple(int(round(x * (1 - t) + y * t)) for x, y in zip(a, b))


class Pen:
    """Draws in face coordinates (face centre at 0,0, y down, face half-height 1) on a square pixel canvas."""

    def __init__(self, draw: ImageDraw.ImageDraw, canvas: int, look: Look):
        self.draw = draw
        self.centre = (canvas * (0.5 + look.shift[0]), canvas * (0.5 + look.shift[1]))
        self.unit = canvas * look.scale  # pixels per face unit
        self.cos, self.sin = np.cos(look.angle), np.sin(look.angle)
        self.stroke_scale = look.stroke

    def points(self, xs, ys) -> list[tuple[float, float]]:
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        px = self.centre[0] + self.unit * (self.cos * xs - self.sin * ys)
        py = self.centre[1] + self.unit * (self.sin * xs + self.cos * ys)
        return list(zip(px.tolist(), py.tolist()))

    def fill(self, xs, ys, colour: Colour) -> None:
        self.draw.polygon(self.points(xs, ys), fill=colour)

    def band(self, xs, top, bottom, colour: Colour) -> None:
        """The region between two curves sampled at the same xs."""
        self.fill(np.concatenate([xs, xs[::-1]]), np.concatenate([top, bottom[::-1]]), colour)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, colour: Colour) -> None:
        a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        self.fill(cx + rx * np.cos(a), cy + ry * np.sin(a), colour)

    def line(self, xs, ys, width: float, colour: Colour) -> None:
        """A polyline `width` face units wide (times the look's stroke multiplier), with round caps."""
        pixels = max(1.0, width * self.stroke_scale * self.unit)
        points = self.points(xs, ys)
        self.draw.line(points, fill=colour, width=int(round(pixels)), joint="curve")
        r = pixels / 2
        for x, y in (points[0], points[-1]):
            self.draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)


def _draw_head(pen: Pen, look: Look) -> None:
    w = look.face_width
    pen.fill([-0.22, 0.22, 0.3, -0.3], [0.6, 0.6, 1.6, 1.6], _shade(look.skin, 0.85))  # neck
    pen.ellipse(0.0, -0.1, w * 1.1, 1.02, look.hair)  # back of the hair, framing the face
    for side in (-1, 1):
        pen.ellipse(side * w * 0.98, -0.02, 0.12, 0.2, _shade(look.skin, 0.92))  # ears
    pen.ellipse(0.0, 0.0, w, 1.0, look.skin)
    # Fringe: the top of the face down to a wavy hairline.
    xs = np.linspace(-w, w, 40)
    top = -np.sqrt(1 - (xs / w) ** 2) - 0.02
    hairline = np.maximum(top, look.hairline + 0.05 * np.cos(xs * 9))
    pen.band(xs, top, hairline, look.hair)


def _draw_brows(pen: Pen, p: ActionParams, look: Look) -> None:
    colour = _shade(look.hair, 0.6) if sum(look.hair) > 200 else look.hair
    crease = _shade(look.skin, 0.6)
    base = -0.31 - 0.17 * p.brow_raise + 0.09 * p.brow_lower
    inner_x = 0.11 - 0.05 * p.brow_lower
    t = np.linspace(0, 1, 16)  # 0 at the inner end, 1 at the outer end
    for side in (-1, 1):
        xs = side * (inner_x + (0.50 - inner_x) * t)
        centre = base - 0.12 * p.brow_slant * (1 - t) + 0.03 * p.brow_slant * t - 0.05 * np.sin(np.pi * t)
        half = 0.042 * (1 - 0.35 * t) * look.stroke
        pen.band(xs, centre - half, centre + half, colour)
    if p.brow_lower > 0.2:  # vertical furrow lines between the brows
        for x in (-0.04, 0.04):
            pen.line([x, x * 0.7], [base - 0.06, base + 0.1], 0.022 * p.brow_lower, crease)
    if p.brow_raise > 0.2 or p.brow_slant > 0.4:  # forehead wrinkles; only in the middle when just the inner ends rise
        reach = 0.38 if p.brow_raise > 0.2 else 0.18
        strength = max(p.brow_raise, p.brow_slant - 0.2)
        xs = np.linspace(-reach, reach, 12)
        for dy in (0.15, 0.24, 0.33):
            pen.line(xs, base - dy - 0.03 * np.cos(xs * 3), 0.02 * strength, crease)


def _draw_eyes(pen: Pen, p: ActionParams, look: Look) -> None:
    line = _shade(look.skin, 0.25)
    crease = _shade(look.skin, 0.65)
    half_width = 0.15
    up = 0.02 + 0.13 * p.eye_open - 0.03 * p.lid_tighten
    down = (0.02 + 0.05 * p.eye_open) * (1 - 0.8 * p.lid_tighten)
    t = np.linspace(-1, 1, 25)
    profile = (1 - t**2) ** 0.6
    for side in (-1, 1):
        cx, cy = side * look.eye_dx, look.eye_y
        xs = cx + half_width * t
        top, bottom = cy - up * profile, cy + down * profile
        pen.line(xs[4:-4], top[4:-4] - 0.05, 0.012, crease)  # upper lid fold
        pen.band(xs, top, bottom, SCLERA)
        for radius, colour in ((0.075, look.iris), (0.035, (15, 10, 10))):  # iris and pupil, clipped by the lids
            a = np.linspace(0, 2 * np.pi, 32, endpoint=False)
            ix = cx + look.gaze + radius * np.cos(a)
            iy = cy - 0.01 + radius * np.sin(a)
            inside = (1 - np.clip((ix - cx) / half_width, -1, 1) ** 2) ** 0.6
            pen.fill(ix, np.clip(iy, cy - up * inside, cy + down * inside), colour)
        pen.line(xs, top, 0.03, line)
        pen.line(xs, bottom, 0.012, line)
        if p.lid_tighten > 0.2:  # raised cheeks push creases under the eyes
            pen.line(xs[3:-3], cy + 0.07 + down * profile[3:-3], 0.018 * p.lid_tighten, crease)


def _draw_nose(pen: Pen, p: ActionParams, look: Look) -> None:
    crease = _shade(look.skin, 0.6)
    lift = 0.03 * p.nose_wrinkle
    pen.line([0.04, 0.06, 0.05], [-0.02, 0.15, 0.22 - lift], 0.015, _shade(look.skin, 0.8))  # bridge shadow
    xs = np.linspace(-0.11, 0.11, 15)
    pen.line(xs, 0.29 - lift - 0.03 * np.cos(xs * 14), 0.02, crease)
    nostril = 0.022 + 0.012 * p.nose_wrinkle
    for side in (-1, 1):
        pen.ellipse(side * 0.055, 0.28 - lift, nostril * 1.3, nostril, _shade(look.skin, 0.35))
    if p.nose_wrinkle > 0.2:  # wrinkles across the bridge
        for y in (0.04, 0.1, 0.16):
            for side in (-1, 1):
                pen.line([side * 0.03, side * 0.11], [y, y - 0.04], 0.02 * p.nose_wrinkle, crease)


def _draw_mouth(pen: Pen, p: ActionParams, look: Look) -> None:
    line = _shade(look.skin, 0.3)
    crease = _shade(look.skin, 0.6)
    lips = _mix(look.skin, (180, 60, 70), 0.45)
    y0 = look.mouth_y
    width = look.mouth_width * (1 + 0.4 * p.lip_stretch + 0.15 * max(p.mouth_corner, 0)
                                - 0.2 * p.lip_press - 0.2 * p.mouth_open * (1 - p.lip_stretch))
    gap = 0.3 * p.mouth_open
    t = np.linspace(-1, 1, 31)  # -1 at the image's left corner, +1 at the right one
    right = t > 0
    corner_rise = 0.16 * p.mouth_corner + np.where(right, 0.22 * p.mouth_asym, 0.0)
    half = width * (1 + np.where(right, 0.15 * p.mouth_asym, 0.0))
    xs = half * t
    corner_y = y0 + 0.02 * p.lip_stretch - corner_rise
    centre_up = y0 - 0.3 * gap - 0.05 * p.nose_wrinkle  # the upper lip rises with the nose wrinkle (AU10)
    centre_down = y0 + 0.7 * gap
    upper = centre_up + (corner_y - centre_up) * t**2
    lower = centre_down + (corner_y - centre_down) * np.abs(t) ** 1.5
    thickness = (1 - 0.85 * p.lip_press) * np.sqrt(1 - t**2)
    pen.band(xs, upper - 0.05 * thickness - 0.008, lower + 0.065 * thickness + 0.008, lips)
    if gap > 0.015:
        pen.band(xs, upper, lower, MOUTH_INSIDE)
        teeth = np.minimum(lower, upper + 0.06)  # upper teeth show when the lips part
        pen.band(xs[3:-3], upper[3:-3], teeth[3:-3], TEETH)
        pen.line(xs, lower, 0.012, line)
    pen.line(xs, upper, 0.02, line)
    # Nasolabial folds deepen with a smile, a nose wrinkle or stretched lips.
    fold = 0.5 * max(p.mouth_corner, 0) + 0.8 * p.nose_wrinkle + 0.4 * p.lip_stretch
    if fold > 0.15:
        for side, corner in ((-1, 0), (1, -1)):  # from beside the nostril to just outside the lip corner
            start_x, end_x = side * 0.14, xs[corner] + side * 0.06
            start_y, end_y = 0.25, corner_y[corner] + 0.06
            pen.line([start_x, (start_x + end_x) / 2 + side * 0.03, end_x], [start_y, (start_y + end_y) / 2, end_y],
                     0.018 * min(fold, 1.0), crease)
    if p.mouth_asym > 0.2:  # dimple beside the raised corner (AU14)
        cx, cy = xs[-1] + 0.04, corner_y[-1]
        pen.line([cx - 0.01, cx + 0.02, cx], [cy - 0.05, cy, cy + 0.05], 0.03 * p.mouth_asym, crease)


def render_face(params: ActionParams, rng: np.random.Generator, size: int, grayscale: bool = False) -> Image.Image:
    """A size×size face showing `params`, with pose, shape, colour and noise jitter drawn from `rng`."""
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    look = sample_look(rng)
    factor = max(2, -(-192 // size))  # draw large, then downsample: antialiased strokes at every output size
    canvas = size * factor
    image = Image.new("RGB", (canvas, canvas), look.background)
    pen = Pen(ImageDraw.Draw(image), canvas, look)
    _draw_head(pen, look)
    _draw_brows(pen, params, look)
    _draw_eyes(pen, params, look)
    _draw_nose(pen, params, look)
    _draw_mouth(pen, params, look)
    image = image.reduce(factor)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = (pixels - 128.0) * look.contrast + 128.0 + look.brightness
    pixels += look.noise * rng.standard_normal(pixels.shape, dtype=np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image.convert("L") if grayscale else image


# ----------------------------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class ImageFormat:
    size: int
    grayscale: bool
    encoding: str  # PIL format name


IMAGE_FORMATS: dict[str, ImageFormat] = {
    "rafdb": ImageFormat(100, False, "JPEG"),  # RAF-DB's aligned faces are 100×100 colour JPEGs
    "ferplus": ImageFormat(48, True, "PNG"),  # FER2013/FERPlus faces are 48×48 grayscale
    "affectnet": ImageFormat(224, False, "JPEG"),
    "sfew": ImageFormat(160, False, "PNG"),  # SFEW's aligned faces are about 143×181 colour PNGs
}
AFFECTNET_FOLDERS = {"train": "training", "test": "validation"}
SFEW_FOLDERS = {"train": "Train/Train_Aligned_Faces", "test": "Val/Val_Aligned_Faces"}


def image_rel_path(key: str, split: str, index: int, number: int, label: str, seed: int) -> str:
    """Where an image goes below its dataset root; `index` counts within its split, `number` within the dataset."""
    if key == "rafdb":
        name = f"train_{index + 1:05d}" if split == "train" else f"test_{index + 1:04d}"
        return f"aligned/{name}_aligned.jpg"
    if key == "ferplus":  # one numbering across the splits, like FER2013's rows
        return f"{split}/{label}/fer{number:07d}.png"
    if key == "affectnet":  # <subdir>/<56 hex chars>.jpg, like subDirectory_filePath
        digest = hashlib.sha224(f"synthetic/{seed}/{split}/{index}".encode()).hexdigest()
        return f"Manually_Annotated/{AFFECTNET_FOLDERS[split]}/{1 + int(digest[:6], 16) % 1000}/{digest}.jpg"
    if key == "sfew":
        return f"{SFEW_FOLDERS[split]}/{label.capitalize()}/Synthetic_{number:09d}_{index:08d}.png"
    raise ValueError(f"no synthetic layout for dataset {key!r}")


SPLITS = ("train", "test")

# Typical (valence, arousal) per emotion, for AffectNet's CSV columns.
VALENCE_AROUSAL = {
    "neutral": (0.0, 0.0), "happiness": (0.75, 0.4), "sadness": (-0.65, -0.3), "surprise": (0.2, 0.75),
    "fear": (-0.6, 0.7), "disgust": (-0.65, 0.35), "anger": (-0.6, 0.65), "contempt": (-0.45, 0.2),
}
AFFECTNET_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "facial_landmarks", "expression", "valence", "arousal")


@dataclass(frozen=True)
class SyntheticImage:
    rel_path: str  # below the dataset root, '/'-separated
    split: str
    label: str  # the dataset's own label name
    params: ActionParams

    def action_record(self) -> dict:
        return {"rel_path": self.rel_path, "split": self.split, "label": self.label,
                "emotion": canonical(self.label), "params": self.params.model_dump()}


def _encode(image: Image.Image, encoding: str) -> bytes:
    buffer = io.BytesIO()
    options = {"quality": 95} if encoding == "JPEG" else {"compress_level": 1}  # noisy pixels barely compress
    image.save(buffer, format=encoding, **options)
    return buffer.getvalue()


def _write_text(path: Path, text: str) -> None:
    """Write then rename, so that a label file is either complete or absent."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _rafdb_label_files(images: list[SyntheticImage], size: int) -> dict[str, str]:
    lines = [f"{Path(im.rel_path).name.replace('_aligned.jpg', '.jpg')} {RAFDB.labels.index(im.label) + 1}\n"
             for im in images]
    return {"EmoLabel/list_patition_label.txt": "".join(lines)}


def _affectnet_label_files(images: list[SyntheticImage], size: int) -> dict[str, str]:
    # The faces fill the whole image: the box is the image and the 68 landmarks sit on its inscribed ellipse.
    angles = np.linspace(0, 2 * np.pi, 68, endpoint=False)
    landmarks = ";".join(f"{size / 2 * (1 + 0.8 * np.cos(a)):.2f};{size / 2 * (1 + 0.9 * np.sin(a)):.2f}"
                         for a in angles)
    files = {}
    for split, folder in AFFECTNET_FOLDERS.items():
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(AFFECTNET_COLUMNS)
        prefix = f"Manually_Annotated/{folder}/"
        for im in images:
            if im.split == split:
                valence, arousal = VALENCE_AROUSAL[canonical(im.label)]
                writer.writerow([im.rel_path.removeprefix(prefix), 0, 0, size, size, landmarks,
                                 AFFECTNET.labels.index(im.label), valence, arousal])
        files[f"{folder}.csv"] = buffer.getvalue()
    return files


# Datasets whose labels live in files; FERPlus and SFEW label by folder.
LABEL_FILES: dict[str, Callable[[list[SyntheticImage], int], dict[str, str]]] = {
    "rafdb": _rafdb_label_files,
    "affectnet": _affectnet_label_files,
}


def _split_labels(labels: tuple[str, ...], per_class: int, rng: np.random.Generator) -> list[str]:
    """`per_class` of every label, shuffled so that file order does not give the label away."""
    order = [label for label in labels for _ in range(per_class)]
    return [order[i] for i in rng.permutation(len(order))]


def _write_dataset(target: Path, key: str, train_per_class: int, test_per_class: int,
                   seed: int) -> list[SyntheticImage]:
    spec, fmt = dataset_spec(key), IMAGE_FORMATS[key]
    dataset_number = list(DATASETS).index(key)
    images: list[SyntheticImage] = []
    folders: set[Path] = set()
    for split_number, (split, per_class) in enumerate(zip(SPLITS, (train_per_class, test_per_class))):
        labels = _split_labels(spec.labels, per_class, np.random.default_rng([seed, dataset_number, split_number]))
        for index, label in enumerate(labels):
            # One generator per image: any image can be regenerated alone, whatever the order.
            rng = np.random.default_rng([seed, dataset_number, split_number, index])
            params = sample_params(label, rng)
            image = render_face(params, rng, fmt.size, grayscale=fmt.grayscale)
            rel_path = image_rel_path(key, split, index, len(images), label, seed)
            path = target / rel_path
            if path.parent not in folders:
                path.parent.mkdir(parents=True, exist_ok=True)
                folders.add(path.parent)
            path.write_bytes(_encode(image, fmt.encoding))
            images.append(SyntheticImage(rel_path, split, label, params))
    # Label files last: a dataset with label files is a dataset whose images are all there.
    label_files = LABEL_FILES[key](images, fmt.size) if key in LABEL_FILES else {}
    for name, text in label_files.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        _write_text(target / name, text)
    _write_text(target / ACTIONS_FILE, "".join(json.dumps(im.action_record()) + "\n" for im in images))
    return images


def write_synthetic_datasets(
    root: str | Path,
    *,
    train_per_class: int,
    test_per_class: int,
    seed: int = 0,
    datasets: tuple[str, ...] | list[str] = ("rafdb", "ferplus", "affectnet", "sfew"),
) -> dict:
    """Write synthetic look-alikes of `datasets` below `root`, each in its original layout and label set.

    Each dataset is built in a staging directory and renamed into place, so `<root>/<name>` is either a complete
    dataset or absent. An existing synthetic dataset (one holding `synthetic_actions.jsonl`) is replaced; any
    other existing directory is refused. Same arguments, same bytes.
    """
    if train_per_class < 0 or test_per_class < 0:
        raise ValueError(f"train_per_class and test_per_class must be >= 0, got {train_per_class}, {test_per_class}")
    root = Path(root)
    specs = [dataset_spec(key) for key in datasets]
    for spec in specs:
        target = root / spec.name
        if target.exists() and not (target / ACTIONS_FILE).exists():
            raise FileExistsError(f"{target} exists and is not a synthetic dataset (it has no {ACTIONS_FILE}); "
                                  "not replacing it")
    stagings = [root / f".{spec.name}.partial" for spec in specs]
    for staging in stagings:
        shutil.rmtree(staging, ignore_errors=True)  # left over from an interrupted run
        staging.mkdir(parents=True)
    # Every image has its own seed, so the datasets render apart, one process per core (spawned: the caller may hold
    # threads), with the same bytes as one after the other; one dataset or one core renders here.
    jobs = (stagings, [spec.key for spec in specs], repeat(train_per_class), repeat(test_per_class), repeat(seed))
    workers = min(len(specs), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            written = list(pool.map(_write_dataset, *jobs))
    else:
        written = list(map(_write_dataset, *jobs))
    summary: dict = {"root": str(root), "seed": seed, "datasets": {}}
    for spec, staging, images in zip(specs, stagings, written):
        target = root / spec.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
        summary["datasets"][spec.key] = {
            "root": str(target),
            "actions": str(target / ACTIONS_FILE),
            "labels": list(spec.labels),
            "counts": {split: sum(im.split == split for im in images) for split in SPLITS},
        }
    return summary


def load_action_params(dataset_root: str | Path, errors: list[dict] | None = None) -> dict[str, dict]:
    """Action parameters of every synthetic image of one dataset, keyed by its path below the dataset root.

    A bad line raises ValueError naming the file and line, unless `errors` is given: then it is appended there
    as {"source", "row", "reason"} and the good lines are still returned.
    """
    path = Path(dataset_root) / ACTIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; is {dataset_root} a synthetic dataset?")
    params: dict[str, dict] = {}
    with path.open(encoding="utf-8") as lines:
        for row, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("rel_path"), str):
                    raise ValueError("not an object with a string 'rel_path'")
                params[record["rel_path"]] = ActionParams.model_validate(record.get("params")).model_dump()
            except (ValueError, ValidationError) as exc:  # JSONDecodeError is a ValueError
                reason = str(exc).replace("\n", " ")
                if errors is None:
                    raise ValueError(f"{path} line {row}: {reason}") from None
                errors.append(ErrorRecord(str(path), reason, row=row).to_dict())
    return params
