"""gallery.html read back: its sections by title, each with its figures' images, titles and texts, and its list
rows."""

from __future__ import annotations

import base64
import html.parser

import cv2
import numpy as np

from kemo import gallery


class Page(html.parser.HTMLParser):
    """The gallery's sections (by their h2 id), each with its figures' images, titles (the full names) and texts
    (caption and note), and its list rows."""

    def __init__(self):
        super().__init__()
        self.sections, self.current, self.in_h2, self.in_figure = {}, None, False, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self.current, self.in_h2 = {"title": "", "figures": [], "titles": [], "texts": [], "rows": 0}, True
            self.sections[attrs["id"]] = self.current
        elif tag == "figure":
            self.current["figures"].append([])
            self.current["titles"].append(attrs.get("title"))
            self.current["texts"].append("")
            self.in_figure = True
        elif tag == "img":
            self.current["figures"][-1].append(attrs["src"])
        elif tag == "tr" and self.current is not None:
            self.current["rows"] += 1

    def handle_endtag(self, tag):
        if tag == "h2":
            self.in_h2 = False
        elif tag == "figure":
            self.in_figure = False

    def handle_data(self, data):
        if self.in_h2:
            self.current["title"] += data
        elif self.in_figure:
            self.current["texts"][-1] += data


def parse_gallery(path: str) -> dict[str, dict]:
    page = Page()
    page.feed(open(path, encoding="utf-8").read())
    return {s["title"].split(" (")[0].strip(): s for s in page.sections.values()}


def decoded_thumb(src: str) -> np.ndarray:
    assert src.startswith("data:image/jpeg;base64,")
    image = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and max(image.shape[:2]) == gallery.THUMB
    return image
