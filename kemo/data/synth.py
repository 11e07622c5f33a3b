"""Generated AI-Hub-shaped corpora (``python -m kemo.data.synth --out DIR --per-class 20``), so every stage runs end to
end where the real corpus cannot: the AI-Hub layout with label lists in UTF-8, UTF-8 with BOM or cp949, and JPEG
selfies whose drawn expression encodes the class, with distractor faces, EXIF orientations 1–8, three annotators'
jittered boxes and disagreeing labels. ``_synth/truth.parquet`` records what was drawn; a seed fixes every byte.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kemo.classes import EMOTIONS, NUM_CLASSES, UNKNOWN, UNKNOWN_KOREAN
from kemo.config import parse
from kemo.exif import undo_orientation, with_orientation

log = logging.getLogger(__name__)

BACKGROUNDS = (
    "숙박 및 거주공간", "공공시설&종교&의료시설", "상업시설&점포&시장", "학교&교육기관", "자연환경",
    "도심 환경", "문화&예술&공연장", "운동&스포츠시설", "교통&통신&운송", "실내 & 카페",
)
# Share of each folder's photos whose drawn expression is the folder's emotion. The real corpus ranges from 97.5%
# (기쁨) to 37.8% (불안); we keep the low end higher so that small balanced samples do not run short.
PURITY = (0.97, 0.85, 0.80, 0.60, 0.70, 0.65, 0.90)
# What an actor or an annotator mistakes each expression for.
CONFUSIONS = {0: (6, 4), 1: (4, 2, 3), 2: (5, 3, 6), 3: (4, 5, 2), 4: (3, 0, 5), 5: (2, 3, 1), 6: (0, 2, 3)}
ORIENTATION_P = {1: 0.68, 3: 0.18, 6: 0.05, 8: 0.04, 2: 0.015, 4: 0.015, 5: 0.01, 7: 0.01}
P_ANNOT_UNKNOWN = 0.03  # an annotator answers 알수없음
P_ANNOT_WRONG = 0.12  # an annotator picks a confusable class
P_EMPTY_BOX = 0.015  # an annotator's box has zero area
P_EDGE = 0.06  # the face touches an edge: annotators' boxes go slightly negative or beyond the frame
P_DISTRACTOR = 0.3
P_JPEG_EXT = 0.015
ENCODINGS = ("utf-8", "utf-8-sig", "cp949")


@dataclass
class SynthConfig:
    """Generate an AI-Hub-shaped corpus of JPEG selfies and JSON label lists."""

    out: str = field(metadata={"help": "corpus root to create (local path)"})
    per_class: int = field(default=20, metadata={"help": "photos per emotion folder"})
    seed: int = field(default=0, metadata={"help": "everything is a function of the seed"})
    size: str = field(default="2000x1500", metadata={"help": "upright photo size WxH"})
    persons: int = field(default=0, metadata={"help": "number of people; 0 = max(10, per_class)"})
    encoding: str = field(default="mixed", metadata={"help": "JSON encoding: utf-8, utf-8-sig, cp949 or mixed"})
    annot_keys: str = field(default="mixed", metadata={"help": "annotator keys: annot, faceBB or mixed"})
    nfd: bool = field(default=False, metadata={"help": "NFD file and folder names, as archives unpacked on macOS"})
    orphans: int = field(default=0, metadata={"help": "photos written without a JSON record"})
    missing: int = field(default=0, metadata={"help": "JSON records whose photo is not written"})
    valid_share: float = field(default=0.1, metadata={"help": "share of each folder in Validation/"})
    quality: int = field(default=90, metadata={"help": "JPEG quality"})
    texture: bool = field(default=False, metadata={
        "help": "sensor grain and textured surfaces: photos that cost what real ones do to store and decode "
                "(2000x1500: ~0.66 MB instead of ~0.29 MB)"})
    crowd: bool = field(default=False, metadata={"help": "passers-by, some small, some partly hidden "
                                                         "(kemo.data.crowd); their boxes join distractor_boxes"})
    jobs: int = field(default=0, metadata={"help": "worker processes; 0 = all cores"})

    @property
    def wh(self) -> tuple[int, int]:
        w, h = self.size.lower().split("x")
        return int(w), int(h)


# --------------------------------------------------------------------------------------------------- drawing


def _person(seed: int, p: int) -> dict[str, Any]:
    rng = np.random.default_rng([seed, 7, p])
    tone = rng.uniform(0.75, 1.0)
    return {
        "id": hashlib.sha256(f"kemo-synth:{seed}:{p}".encode()).hexdigest(),
        "gender": "여" if rng.random() < 0.55 else "남",
        "age": int(rng.integers(18, 70)),
        "prof": rng.random() < 0.15,
        "skin": tuple(int(c * tone) for c in (242, 205, 175)),
        "hair": tuple(int(v) for v in rng.integers(10, 90, 3)),
        "aspect": float(rng.uniform(0.74, 0.84)),  # face box width / height
        "fringe": float(rng.uniform(0.12, 0.3)),
        "glasses": rng.random() < 0.2,
    }


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x)), int(round(y))


def _curve(img, cx, cy, half_w, bend, thick, color, wave=0.0):
    """A mouth or brow-like curve: ``bend`` > 0 puts the middle lower than the ends (a smile)."""
    xs = np.linspace(-1.0, 1.0, 17)
    ys = cy + bend * (1 - xs**2) + wave * np.sin(xs * 3 * math.pi)
    pts = np.stack([cx + xs * half_w, ys], axis=1).round().astype(np.int32)
    cv2.polylines(img, [pts], False, color, thick, cv2.LINE_AA)


@dataclass
class _Expression:
    """How a drawn face shows an emotion, in units of the face size; the defaults are neutral."""

    openness: float = 1.0
    gaze: float = 0.0
    brow_in: float = 0.0
    brow_out: float = 0.0
    brow_lift: float = 0.0
    brow_wave: float = 0.0
    mouth_bend: float = 0.0
    mouth_wave: float = 0.0
    mouth_open: float = 0.0
    blush: bool = False
    tears: bool = False


def _expression(expr: int, rng: np.random.Generator) -> _Expression:
    k = rng.uniform(0.75, 1.25)  # how strongly this photo shows the expression
    if expr == 0:  # happy: smile, squinting eyes
        return _Expression(mouth_bend=0.07 * k, openness=0.55)
    if expr == 1:  # angry: brows pulled down to the middle, narrowed eyes, tight mouth
        return _Expression(brow_in=0.06 * k, brow_out=-0.03 * k, openness=0.6, mouth_bend=-0.015)
    if expr == 2:  # sad: inner brows up, frown
        return _Expression(brow_in=-0.06 * k, brow_out=0.02 * k, mouth_bend=-0.06 * k)
    if expr == 3:  # anxious: raised wavy brows, wide eyes, wavy mouth
        return _Expression(brow_lift=-0.05 * k, brow_wave=0.012, openness=1.45, mouth_wave=0.018 * k)
    if expr == 4:  # embarrassed: blush, eyes looking aside, slight smile
        return _Expression(blush=True, gaze=rng.choice([-1, 1]) * 0.55, mouth_bend=0.025 * k)
    if expr == 5:  # hurt: inner brows up, tears, open frowning mouth
        return _Expression(brow_in=-0.05 * k, tears=True, mouth_open=0.045 * k, mouth_bend=-0.035 * k)
    return _Expression()


def _eye(img: np.ndarray, box: tuple[float, float, float, float], s: int, e: _Expression, look: dict[str, Any],
         t: int) -> None:
    """One eye (``s`` = -1 left, 1 right) with its brow, and its cheek's blush and tears."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2
    dark, white = (35, 25, 25), (250, 250, 250)
    eye_y, eye_dx, eye_w, eye_h = y1 + 0.46 * h, 0.19 * w, 0.075 * w, 0.035 * h * e.openness
    ex = cx + s * eye_dx
    cv2.ellipse(img, _pt(ex, eye_y), _pt(eye_w, max(eye_h, 1)), 0, 0, 360, white, -1, cv2.LINE_AA)
    pr = max(2, int(0.032 * w * (0.8 if e.openness > 1.2 else 1.0)))
    cv2.circle(img, _pt(ex + e.gaze * eye_w, eye_y), min(pr, int(max(eye_h, 2))), dark, -1, cv2.LINE_AA)
    if look["glasses"]:
        cv2.ellipse(img, _pt(ex, eye_y), _pt(eye_w * 1.35, 0.06 * h), 0, 0, 360, (30, 30, 30), max(1, t // 2))
    # brow: outer end and inner end, y grows downward
    by = y1 + 0.36 * h + e.brow_lift * h
    outer = (ex + s * 0.09 * w, by + e.brow_out * h)
    inner = (cx + s * 0.07 * w, by + e.brow_in * h)
    if e.brow_wave:
        _curve(img, (outer[0] + inner[0]) / 2, by, abs(outer[0] - inner[0]) / 2, 0, t, look["hair"],
               wave=e.brow_wave * h)
    else:
        cv2.line(img, _pt(*outer), _pt(*inner), look["hair"], t + 1, cv2.LINE_AA)
    if e.blush:
        cheek = (ex + s * 0.02 * w, y1 + 0.6 * h)
        cv2.ellipse(img, _pt(*cheek), _pt(0.08 * w, 0.035 * h), 0, 0, 360, (235, 120, 130), -1, cv2.LINE_AA)
    if e.tears:
        for j in range(2):
            ty = eye_y + (0.07 + 0.06 * j) * h
            cv2.ellipse(img, _pt(ex + s * 0.03 * w, ty), _pt(0.012 * w, 0.022 * h), 0, 0, 360,
                        (90, 150, 235), -1, cv2.LINE_AA)


def draw_face(img: np.ndarray, box: tuple[float, float, float, float], expr: int, look: dict[str, Any],
              rng: np.random.Generator) -> None:
    """Draw a frontal face filling ``box`` (x1, y1, x2, y2) whose features encode the emotion ``expr``."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    t = max(2, int(round(0.024 * w)))  # feature stroke: thin enough to vanish when the whole photo is shrunk
    e = _expression(expr, rng)

    cv2.ellipse(img, _pt(cx, y1 + 0.45 * h), _pt(0.56 * w, 0.5 * h), 0, 180, 360, look["hair"], -1, cv2.LINE_AA)
    cv2.ellipse(img, _pt(cx, cy), _pt(w / 2, h / 2), 0, 0, 360, look["skin"], -1, cv2.LINE_AA)
    cv2.ellipse(img, _pt(cx, y1 + 0.08 * h), _pt(0.46 * w, look["fringe"] * h), 0, 180, 360, look["hair"], -1)
    cv2.ellipse(img, _pt(cx, y1 + 0.08 * h), _pt(0.46 * w, look["fringe"] * h * 0.6), 0, 0, 180, look["hair"], -1)
    for s in (-1, 1):
        _eye(img, box, s, e, look, t)
    cv2.polylines(img, [np.array([_pt(cx, y1 + 0.5 * h), _pt(cx - 0.04 * w, y1 + 0.62 * h),
                                  _pt(cx + 0.02 * w, y1 + 0.63 * h)], np.int32)], False, (150, 100, 90), t)
    mouth_y, mouth_hw = y1 + 0.75 * h - e.mouth_bend * h / 2, 0.15 * w
    if e.mouth_open:
        cv2.ellipse(img, _pt(cx, mouth_y + 0.02 * h), _pt(mouth_hw * 0.6, e.mouth_open * h), 0, 0, 360,
                    (110, 30, 40), -1, cv2.LINE_AA)
    _curve(img, cx, mouth_y, mouth_hw, e.mouth_bend * h, t + 1, (150, 40, 50), wave=e.mouth_wave * h)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Clutter drawn at quarter size and upscaled, then fine full-size strokes that look like facial features."""
    sw, sh = max(8, w // 4), max(8, h // 4)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    ramp = np.linspace(0.0, 1.0, sh, dtype=np.float32)[:, None, None]
    small = np.ascontiguousarray(np.broadcast_to(c0 * (1 - ramp) + c1 * ramp, (sh, sw, 3)).astype(np.uint8))
    for _ in range(int(rng.integers(25, 45))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 4)
        p = (int(rng.integers(0, sw)), int(rng.integers(0, sh)))
        size = int(rng.integers(max(2, sw // 40), max(3, sw // 5)))
        if kind == 0:
            cv2.rectangle(small, p, (p[0] + size, p[1] + int(size * rng.uniform(0.3, 2))), color, -1)
        elif kind == 1:
            cv2.circle(small, p, size // 2, color, -1, cv2.LINE_AA)
        elif kind == 2:
            q = (int(rng.integers(0, sw)), int(rng.integers(0, sh)))
            cv2.line(small, p, q, color, int(rng.integers(1, 4)), cv2.LINE_AA)
        else:
            pts = rng.integers(0, [sw, sh], size=(int(rng.integers(3, 6)), 2)).astype(np.int32)
            cv2.fillPoly(small, [pts], color, cv2.LINE_AA)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    for _ in range(int(rng.integers(15, 30))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        _curve(img, cx, cy, rng.uniform(0.01, 0.05) * w, rng.uniform(-0.02, 0.02) * w, max(2, int(0.004 * w)),
               color, wave=rng.choice([0.0, 0.005 * w]))
    return img


_NOISE: np.ndarray | None = None


def _add_noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor-like noise (±4) from a fixed bank at a random offset: real photos' JPEG size and decode cost."""
    global _NOISE
    if _NOISE is None:
        _NOISE = np.random.default_rng(1234).integers(0, 5, size=(2, 1024, 1024, 3), dtype=np.uint8)
    h, w = img.shape[:2]
    reps = (math.ceil(h / 1024) + 1, math.ceil(w / 1024) + 1, 1)
    oy, ox = int(rng.integers(0, 1024)), int(rng.integers(0, 1024))
    pos = np.tile(_NOISE[0], reps)[oy:oy + h, ox:ox + w] if reps[:2] != (2, 2) else _NOISE[0][:h, :w]
    neg = np.tile(_NOISE[1], reps)[oy:oy + h, ox:ox + w] if reps[:2] != (2, 2) else _NOISE[1][:h, :w]
    return cv2.subtract(cv2.add(img, np.ascontiguousarray(pos)), np.ascontiguousarray(neg))


def _texture(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Grain and surface texture: Gaussian fields at 1, 3 and 12 pixels (colour, colour, brightness; σ 4, 8 and 16
    levels) added to the photo. A plain generated photo is flat between its shapes, so its JPEG is small and cheap to
    decode; this brings a 2000x1500 photo to ~0.66 MB, what a real face composited on a real background of that
    size weighs."""
    h, w = img.shape[:2]
    out = img.astype(np.float32)
    for scale, sigma, channels in ((1, 4.0, 3), (3, 8.0, 3), (12, 16.0, 1)):
        grain = rng.normal(0.0, sigma, (h // scale + 1, w // scale + 1, channels)).astype(np.float32)
        grain = cv2.resize(grain, (w, h), interpolation=cv2.INTER_LINEAR)
        out += grain if grain.ndim == 3 else grain[..., None]
    return np.clip(out, 0, 255).astype(np.uint8)


def _place(rng: np.random.Generator, w: int, h: int, aspect: float, frac: float) -> list[float]:
    fh = min(math.sqrt(frac * w * h / aspect), 0.95 * h, 0.95 * w / aspect)
    fw = fh * aspect
    if rng.random() < P_EDGE:  # face touching (and slightly beyond) one edge of the frame
        x1, y1 = rng.uniform(0, w - fw), rng.uniform(0, h - fh)
        edge, over = int(rng.integers(0, 4)), rng.uniform(0, 0.05)
        if edge == 0:
            x1 = -over * fw
        elif edge == 1:
            y1 = -over * fh
        elif edge == 2:
            x1 = w - fw + over * fw
        else:
            y1 = h - fh + over * fh
    else:
        x1 = rng.uniform(0.1, 0.9) * (w - fw)
        y1 = rng.uniform(0.05, 0.7) * (h - fh)
    return [x1, y1, x1 + fw, y1 + fh]


def render(seed: int, index: int, expr: int, look: dict[str, Any], size: tuple[int, int],
           texture: bool = False, crowd: bool = False) -> dict[str, Any]:
    """Render one upright photo (with ``texture``, :func:`_texture`'s grain on top). Returns the RGB array, the
    subject's face box and any distractor boxes."""
    rng = np.random.default_rng([seed, 11, index])
    w, h = size
    img = _background(rng, w, h)
    box = _place(rng, w, h, look["aspect"], rng.uniform(0.10, 0.40))
    bw, bh = box[2] - box[0], box[3] - box[1]
    # shoulders below the face
    torso = tuple(int(v) for v in rng.integers(20, 230, 3))
    cv2.ellipse(img, _pt((box[0] + box[2]) / 2, box[3] + 0.75 * bh), _pt(1.1 * bw, 0.8 * bh), 0, 180, 360, torso, -1)
    distractors = []
    if rng.random() < P_DISTRACTOR:
        s = rng.uniform(0.25, 0.5)
        dw, dh = bw * s, bh * s
        # the side of the frame with more room, away from the subject
        room_left, room_right = box[0], w - box[2]
        x = rng.uniform(0, max(1.0, room_left - dw)) if room_left > room_right else \
            rng.uniform(box[2], max(box[2] + 1, w - dw))
        y = rng.uniform(0, max(1.0, h - dh))
        dbox = [x, y, x + dw, y + dh]
        if rng.random() < 0.5:  # a poster: a framed rectangle behind the face
            pad = 0.25 * dw
            corners = _pt(x - pad, y - pad), _pt(x + dw + pad, y + dh + pad)
            cv2.rectangle(img, *corners, tuple(int(v) for v in rng.integers(150, 256, 3)), -1)
            cv2.rectangle(img, *corners, (20, 20, 20), max(2, int(0.03 * dw)))
        draw_face(img, dbox, int(rng.integers(0, NUM_CLASSES)), _person(seed + 1, int(rng.integers(0, 10**6))), rng)
        distractors.append([float(v) for v in np.clip(dbox, 0, [w, h, w, h])])
    if crowd:  # behind the subject, from the crowd's own generator: without it, not one draw differs
        from kemo.data.crowd import draw_crowd
        distractors += draw_crowd(img, box, distractors, seed, index)
    draw_face(img, tuple(box), expr, look, rng)
    img = _add_noise(img, rng)
    if texture:  # its own generator: the photo under the texture is the plain one, pixel for pixel
        img = _texture(np.random.default_rng([seed, 17, index]), img)
    face_box = [float(v) for v in np.clip(box, 0, [w, h, w, h])]
    return {"image": img, "face_box": face_box, "distractors": distractors}


# --------------------------------------------------------------------------------------------------- one photo


def _choose(rng: np.random.Generator, options: dict[int, float]) -> int:
    keys = list(options)
    p = np.array([options[k] for k in keys], dtype=np.float64)
    return int(keys[rng.choice(len(keys), p=p / p.sum())])


def _annotate(rng: np.random.Generator, expr: int, face_box: list[float]) -> tuple[list[int], list[list[float]]]:
    """Three annotators: a label each (-1 for 알수없음) and a jittered box each, in the upright frame."""
    votes, boxes = [], []
    fw, fh = face_box[2] - face_box[0], face_box[3] - face_box[1]
    for _ in range(3):
        r = rng.random()
        if r < P_ANNOT_UNKNOWN:
            votes.append(UNKNOWN)
        elif r < P_ANNOT_UNKNOWN + P_ANNOT_WRONG:
            votes.append(int(rng.choice(CONFUSIONS[expr])))
        else:
            votes.append(expr)
        jitter = np.clip(rng.normal(0, 0.012, 4), -0.024, 0.024) * [fw, fh, fw, fh]
        b = [float(v) for v in np.asarray(face_box) + jitter]
        if rng.random() < P_EMPTY_BOX:
            b = [b[0], b[1], b[0], b[1]]
        boxes.append(b)
    return votes, boxes


def _plan(cfg: SynthConfig) -> list[dict[str, Any]]:
    """What every photo is (folder, person, file name): cheap, so done once in the parent process."""
    n_persons = cfg.persons or max(10, cfg.per_class)
    n_valid = int(round(cfg.per_class * cfg.valid_share))
    plan = []
    for c, emo in enumerate(EMOTIONS):
        for k in range(cfg.per_class):
            index = c * cfg.per_class + k
            rng = np.random.default_rng([cfg.seed, 3, index])
            valid = k >= cfg.per_class - n_valid
            source, tag = ("Validation", "VALID") if valid else ("Training", "TRAIN")
            part = 1 if valid else 1 + k % 4
            p = (k + 3 * c) % n_persons
            stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(1_600_000_000 + 97 * index))
            plan.append({"index": index, "folder": c, "person": p, "source": source, "tag": tag, "part": part,
                         "background": BACKGROUNDS[int(rng.integers(0, len(BACKGROUNDS)))], "stamp": stamp,
                         "ext": "jpeg" if rng.random() < P_JPEG_EXT else "jpg", "korean": emo.korean})
    extra = np.random.default_rng([cfg.seed, 5]).permutation(len(plan))[: cfg.orphans + cfg.missing]
    for j, i in enumerate(extra):
        plan[int(i)]["defect"] = "orphan" if j < cfg.orphans else "missing"
    return plan


def _disk_name(name: str, nfd: bool) -> str:
    return unicodedata.normalize("NFD", name) if nfd else name


def make_photo(job: dict[str, Any]) -> dict[str, Any]:
    """Render, orient, encode and write one photo; return its JSON record and its ground truth."""
    cfg = SynthConfig(**job["cfg"])
    item = job["item"]
    rng = np.random.default_rng([cfg.seed, 13, item["index"]])
    look = _person(cfg.seed, item["person"])
    folder = item["folder"]
    expr = folder if rng.random() < PURITY[folder] else int(rng.choice(CONFUSIONS[folder]))
    age = look["age"]
    filename = (f"{look['id']}_{look['gender']}_{age}_{item['korean']}_{item['background']}_{item['stamp']}"
                f".{item['ext']}")
    image_dir = f"{item['source']}/[원천]EMOIMG_{item['korean']}_{item['tag']}_{item['part']:02d}"
    image_id = f"{image_dir}/{filename}"

    drawn = render(cfg.seed, item["index"], expr, look, cfg.wh, cfg.texture, cfg.crowd)
    orientation = _choose(rng, ORIENTATION_P)
    votes, boxes = _annotate(rng, expr, drawn["face_box"])
    written = item.get("defect") != "missing"
    if written:
        stored = undo_orientation(drawn["image"], orientation)
        ok, enc = cv2.imencode(".jpg", cv2.cvtColor(stored, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, cfg.quality])
        assert ok
        data = enc.tobytes()
        if orientation != 1 or rng.random() < 0.5:  # many phones write orientation 1 explicitly
            data = with_orientation(data, orientation)
        path = os.path.join(cfg.out, _disk_name(image_dir, cfg.nfd), _disk_name(filename, cfg.nfd))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    names = [UNKNOWN_KOREAN if v == UNKNOWN else EMOTIONS[v].korean for v in votes]
    annotators = []
    for name, b in zip(names, boxes):
        annotators.append({"boxes": {"maxX": round(b[2], 4), "maxY": round(b[3], 4), "minX": round(b[0], 4),
                                     "minY": round(b[1], 4)}, "faceExp": name, "bg": item["background"]})
    record = {"filename": filename, "gender": look["gender"], "age": str(age) if rng.random() < 0.3 else age,
              "isProf": "전문인" if look["prof"] else "일반인", "faceExp_uploader": item["korean"],
              "bg_uploader": item["background"], "annotators": annotators}
    truth = {"index": item["index"], "image_id": image_id, "filename": filename, "person_id": look["id"],
             "source": item["source"],
             "folder_label": folder, "expression": expr, "votes": votes, "face_box": drawn["face_box"],
             "annot_boxes": [[round(v, 4) for v in b] for b in boxes], "distractor_boxes": drawn["distractors"],
             "orientation": orientation, "width": cfg.wh[0], "height": cfg.wh[1],
             "written": written, "has_record": item.get("defect") != "orphan"}
    return {"item": item, "record": record, "truth": truth}


def _init_worker() -> None:
    cv2.setNumThreads(1)


# --------------------------------------------------------------------------------------------------- corpus


def _label_file(source: str, korean: str) -> str:
    tag, kind = ("VALID", "validation") if source == "Validation" else ("TRAIN", "training")
    return f"{source}/[라벨]EMOIMG_{korean}_{tag}/img_emotion_{kind}_data({korean}).json"


def generate(cfg: SynthConfig) -> dict[str, Any]:
    """Write the corpus under ``cfg.out``; returns a summary. The same config always writes the same bytes."""
    if cfg.encoding not in (*ENCODINGS, "mixed") or cfg.annot_keys not in ("annot", "faceBB", "mixed"):
        raise ValueError(f"unknown encoding {cfg.encoding!r} or annotator keys {cfg.annot_keys!r}")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        raise FileExistsError(f"{cfg.out} is not empty: generate into a new directory")
    t0 = time.perf_counter()
    plan = _plan(cfg)
    jobs = [{"cfg": dataclasses.asdict(cfg), "item": item} for item in plan]
    n_proc = cfg.jobs or os.cpu_count() or 1
    if n_proc == 1 or len(jobs) < 8:
        _init_worker()
        results = [make_photo(j) for j in jobs]
    else:
        with mp.get_context("spawn").Pool(n_proc, initializer=_init_worker) as pool:
            results = pool.map(make_photo, jobs, chunksize=max(1, len(jobs) // (8 * n_proc)))

    files: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        if r["item"].get("defect") != "orphan":
            files.setdefault(_label_file(r["item"]["source"], r["item"]["korean"]), []).append(r)
    for n, (rel, rows) in enumerate(sorted(files.items())):
        encoding = ENCODINGS[n % 3] if cfg.encoding == "mixed" else cfg.encoding
        style = ("annot" if n % 2 == 0 else "faceBB") if cfg.annot_keys == "mixed" else cfg.annot_keys
        records = []
        for r in rows:
            rec = {k: v for k, v in r["record"].items() if k != "annotators"}
            for letter, a in zip("ABC", r["record"]["annotators"]):
                rec[f"{style}_{letter}"] = a
            records.append(rec)
        text = json.dumps(records, ensure_ascii=False, indent=1)
        path = os.path.join(cfg.out, _disk_name(rel, cfg.nfd))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(text.encode(encoding))

    truth = pa.Table.from_pylist([r["truth"] for r in results])
    os.makedirs(os.path.join(cfg.out, "_synth"), exist_ok=True)
    pq.write_table(truth, os.path.join(cfg.out, "_synth", "truth.parquet"))
    summary = {"photos": sum(r["truth"]["written"] for r in results), "records": sum(len(v) for v in files.values()),
               "label_files": len(files), "seconds": round(time.perf_counter() - t0, 1),
               "config": dataclasses.asdict(cfg)}
    with open(os.path.join(cfg.out, "_synth", "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)
    return summary


def read_truth(root: str) -> pa.Table:
    """The generator's ground truth for a corpus it wrote."""
    return pq.read_table(os.path.join(root, "_synth", "truth.parquet"))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = parse(SynthConfig, argv)
    s = generate(cfg)
    print(f"wrote {s['photos']} photos, {s['records']} records in {s['label_files']} label files "
          f"to {cfg.out} in {s['seconds']} s")


if __name__ == "__main__":
    main()
