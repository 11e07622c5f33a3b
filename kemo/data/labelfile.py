"""An AI-Hub label file's text: JSON in UTF-8 (with or without BOM), UTF-16 with BOM or cp949, every string
NFC-normalised, nesting bounded so that a hostile file is refused rather than parsed into a ``RecursionError``."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

MAX_JSON_DEPTH = 32  # an AI-Hub label file nests 5 deep (list → record → annotator → boxes → value)


def nfc(value: Any) -> Any:
    """NFC-normalise every string (and dict key) in a JSON value. Keys are matched case-insensitively later."""
    if isinstance(value, str):
        return unicodedata.normalize("NFC", value)
    if isinstance(value, list):
        return [nfc(v) for v in value]
    if isinstance(value, dict):
        return {nfc(k): nfc(v) for k, v in value.items()}
    return value


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, depth + 1)
            stack.extend((x, depth + 1) for x in v)
    return deepest


def decode_json(data: bytes) -> tuple[Any, str]:
    """(parsed JSON with NFC strings, encoding used): UTF-8 with or without BOM, UTF-16 with BOM, or cp949.
    Nesting deeper than ``MAX_JSON_DEPTH`` is refused (ValueError), not parsed into a ``RecursionError``."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        candidates = ("utf-16",)
    else:
        candidates = ("utf-8-sig", "cp949")
    for enc in candidates:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        used = "utf-8-sig" if enc == "utf-8-sig" and data[:3] == b"\xef\xbb\xbf" else enc.replace("-sig", "")
        try:
            value = json.loads(text)
        except RecursionError:  # the C parser gives up on deep nesting this way
            raise ValueError(f"JSON nested deeper than Python can parse (over {MAX_JSON_DEPTH} levels)") from None
        if json_depth(value) > MAX_JSON_DEPTH:
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels: not an AI-Hub label file")
        return nfc(value), used
    raise ValueError("not UTF-8, UTF-16 or cp949 text")
