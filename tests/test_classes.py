"""The class list: the paper's order (Table 1), Korean and English names, and lookups."""

import unicodedata

import pytest

from kemo.classes import CLASS_NAMES, EMOTIONS, KOREAN_NAMES, NUM_CLASSES, UNKNOWN, UNKNOWN_KOREAN, class_index


def test_paper_order():
    assert NUM_CLASSES == 7
    assert CLASS_NAMES == ("happy", "angry", "sad", "anxious", "embarrassed", "hurt", "neutral")
    assert KOREAN_NAMES == ("기쁨", "분노", "슬픔", "불안", "당황", "상처", "중립")
    assert [e.index for e in EMOTIONS] == list(range(7))


@pytest.mark.parametrize("text, index", [
    ("기쁨", 0), ("중립", 6), (" 불안 ", 3), ("Hurt", 5), ("sad", 2),
    (unicodedata.normalize("NFD", "당황"), 4),
    (UNKNOWN_KOREAN, UNKNOWN), ("", UNKNOWN), (None, UNKNOWN), (3, UNKNOWN), ("놀람", UNKNOWN),
])
def test_class_index(text, index):
    assert class_index(text) == index
