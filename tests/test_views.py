"""kemo.views and kemo.gallery alone: what a spreadsheet or a browser is given of text kemo did not write."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.csv as pacsv

from kemo import gallery
from kemo.views import labels_csv


def test_labels_csv_shows_every_cell_that_starts_like_a_formula_as_text():
    hostile = ["=cmd|' /C calc'!A0", "+1", "-2", "@SUM(A1)", "\tx", "\rx", "photo.jpg", None]
    table = pa.table({"uri": hostile, "label_name": ["=HYPERLINK(x)"] * 8, "face": pa.array(range(-4, 4), pa.int16()),
                      "probs": [[0.25, 0.75]] * 8})
    options = pacsv.ConvertOptions(column_types={"uri": pa.string()}, strings_can_be_null=True)
    back = pacsv.read_csv(io.BytesIO(labels_csv(table, ["=a", "b"])), convert_options=options)
    assert back.column("uri").to_pylist() == [f"'{v}" for v in hostile[:6]] + ["photo.jpg", None]
    assert set(back.column("label_name").to_pylist()) == {"'=HYPERLINK(x)"}
    assert back.column("face").to_pylist() == list(range(-4, 4))  # numbers stay numbers, negative ones too
    assert back.column_names == ["uri", "label_name", "face", "p_=a", "p_b"]  # a header starts with p_: text


def test_the_gallery_shows_bidirectional_controls_escaped():
    name = "photo\u202egpj.exe"  # shown raw, it reads photoexe.jpg
    page = gallery.page(name, [name], [gallery.Section(name, [gallery.Tile(caption=name, title=name, note=name)], 1,
                                                       pictures=False)]).decode()
    assert "\u202e" not in page and page.count("photo\\u202egpj.exe") == 8
    assert gallery.escape("<b>\u2066x\u2069") == "&lt;b&gt;\\u2066x\\u2069"
