"""The 7 emotion classes in the paper's order (Table 1); the position is the class index everywhere in kemo."""

from __future__ import annotations

import unicodedata
from typing import NamedTuple


class Emotion(NamedTuple):
    index: int
    name: str  # English, used in reports and label files
    korean: str  # as written in the AI-Hub corpus (NFC)


EMOTIONS: tuple[Emotion, ...] = (
    Emotion(0, "happy", "기쁨"),
    Emotion(1, "angry", "분노"),
    Emotion(2, "sad", "슬픔"),
    Emotion(3, "anxious", "불안"),
    Emotion(4, "embarrassed", "당황"),
    Emotion(5, "hurt", "상처"),
    Emotion(6, "neutral", "중립"),
)
NUM_CLASSES = len(EMOTIONS)
CLASS_NAMES: tuple[str, ...] = tuple(e.name for e in EMOTIONS)
KOREAN_NAMES: tuple[str, ...] = tuple(e.korean for e in EMOTIONS)

UNKNOWN = -1  # label of an image whose annotators gave no majority; never a training target
UNKNOWN_KOREAN = "알수없음"  # an annotator's "cannot tell" answer

_LOOKUP = {e.korean: e.index for e in EMOTIONS} | {e.name: e.index for e in EMOTIONS}


def class_index(text: object) -> int:
    """Class index of a Korean or English emotion name; ``UNKNOWN`` for 알수없음, blanks and anything else."""
    if not isinstance(text, str):
        return UNKNOWN
    key = unicodedata.normalize("NFC", text).strip()
    return _LOOKUP.get(key, _LOOKUP.get(key.lower(), UNKNOWN))
