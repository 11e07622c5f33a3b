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


def test_a_page_gives_its_thumbnails_back_by_file_version_and_box_and_a_new_page_cuts_only_the_others():
    row = {"uri": "s3://b/a.jpg", "size": 10, "mtime_ns": None, "etag": '"e1"'}
    key = gallery.tile_key(row, [1.0, 2.0, 3.0, 4.0])
    assert key != gallery.tile_key({**row, "etag": '"e2"'}, [1.0, 2.0, 3.0, 4.0])  # another version
    assert key != gallery.tile_key(row, None) and gallery.tile_key({"uri": "x"}, None) is None
    old = gallery.Tile(caption="a", title='a "quoted" <name>', thumb=b"\xff\xd8jpeg", key=key)
    page = gallery.page("t", [], [gallery.Section("s", [old, gallery.Tile(caption="b", title="b", key="00")], 2)])
    assert gallery.known_thumbs(page) == {key: b"\xff\xd8jpeg"}  # a tile without a picture gives none
    made = []
    again = gallery.Tile(caption="a", title="a", make=lambda: made.append("a") or b"new", key=key)
    other = gallery.Tile(caption="c", title="c", make=lambda: made.append("c") or b"cut", key="11")
    gallery.thumbnails([gallery.Section("s", [again, other], 2)], gallery.known_thumbs(page))
    assert (again.thumb, other.thumb, made) == (b"\xff\xd8jpeg", b"cut", ["c"])
