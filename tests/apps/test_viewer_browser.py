"""The viewer in a real browser: Playwright driving Debian's Chromium, headless (make browser)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from test_viewer_api import LAYER, session_2d, session_3d

import segcam
from segcam.apps.demo.models import load_demo_model
from segcam.apps.viewer.serve import serve_in_thread
from segcam.apps.viewer.session import ViewerSession
from segcam.testing.synthetic import shapes_scene

pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")


@contextmanager
def _opened(page, session):
    """``session`` served and opened in ``page``, its first maps shown; stopped afterwards."""
    viewer = serve_in_thread(session)
    try:
        page.goto(viewer.url)
        page.wait_for_function("() => segcamViewer.timings.length > 0 && !segcamViewer.busy")
        yield viewer
    finally:
        viewer.stop()


def _updates(page):
    return page.evaluate("() => segcamViewer.timings.length")


def _wait(page, before):
    page.wait_for_function("n => segcamViewer.timings.length > n && !segcamViewer.busy", arg=before)


def _shown(page):
    return page.evaluate(
        """() => ({request: segcamViewer.request, zoom: segcamViewer.zoom,
                   shape: segcamViewer.result.shape,
                   status: document.getElementById('status').textContent,
                   maps: Object.fromEntries(Object.entries(segcamViewer.maps)
                         .map(([k, v]) => [k, Array.from(v)]))})"""
    )


def _explained(session, target, layer, method):
    return segcam.explain(session.model, session.inputs[None], target, layer, method).maps[0, 0]


def test_2d_box_layer_and_method(browser_page, tmp_path):
    session = session_2d()
    viewer = serve_in_thread(session)
    page = browser_page
    try:
        page.goto(viewer.url)
        page.wait_for_function("() => segcamViewer.timings.length > 0")
        assert "pixels in the set" in page.text_content("#status")
        before = _updates(page)
        page.select_option("#class", "2")
        _wait(page, before)
        page.select_option("#mode", "box")
        box = page.locator("#view0").bounding_box()
        zoom = page.evaluate("() => segcamViewer.zoom")
        # drag from pixel (row 10, col 20) to (row 29, col 40)
        before = _updates(page)
        page.mouse.move(box["x"] + 20.5 * zoom, box["y"] + 10.5 * zoom)
        page.mouse.down()
        page.mouse.move(box["x"] + 30 * zoom, box["y"] + 20 * zoom, steps=4)
        page.mouse.move(box["x"] + 40.5 * zoom, box["y"] + 29.5 * zoom, steps=4)
        page.mouse.up()
        _wait(page, before)
        shown = _shown(page)
        assert shown["request"]["target"] == {"kind": "box", "start": [10, 20], "stop": [30, 41]}
        assert shown["request"]["class"] == 2
        target = segcam.Box(2, [(10, 30), (20, 41)])
        for method in ("seg-grad-cam", "seg-hires-grad-cam"):
            expected = _explained(session, target, LAYER, method).numpy()
            np.testing.assert_allclose(
                np.reshape(shown["maps"][method], (64, 64)), expected, rtol=1e-5, atol=1e-6
            )
        # another layer, another method on the right
        before = _updates(page)
        page.select_option("#layer", "model.1.submodule")
        _wait(page, before)
        before = _updates(page)
        page.select_option("#method1", "seg-layer-cam")
        _wait(page, before)
        shown = _shown(page)
        assert shown["request"]["layer"] == "model.1.submodule"
        assert shown["request"]["methods"] == ["seg-grad-cam", "seg-layer-cam"]
        for method in shown["request"]["methods"]:
            expected = _explained(session, target, "model.1.submodule", method).numpy()
            np.testing.assert_allclose(
                np.reshape(shown["maps"][method], (64, 64)), expected, rtol=1e-5, atol=1e-6
            )
        # an unreadable upload: the error is shown in the page, and the page goes on
        bad = tmp_path / "mask.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        page.set_input_files("#upload", str(bad))
        page.wait_for_function("() => document.getElementById('status').className === 'error'")
        assert "cannot read the PNG upload" in page.text_content("#status")
        before = _updates(page)
        page.select_option("#mode", "predicted")
        _wait(page, before)
        assert page.get_attribute("#status", "class") == ""
        page.screenshot(path=str(tmp_path / "viewer.png"))
        assert (tmp_path / "viewer.png").stat().st_size > 10_000
    finally:
        viewer.stop()


def test_3d_slice_slider_and_axis(browser_page):
    session = session_3d()
    page = browser_page
    with _opened(page, session):
        assert page.is_visible("#slice")
        full = _explained(session, segcam.Predicted(1), session.default_layer, "seg-hires-grad-cam")
        for index in (0, 4, 9):
            before = _updates(page)
            page.locator("#slice").fill(str(index))
            _wait(page, before)
            shown = _shown(page)
            assert shown["request"]["axis"] == 2 and shown["request"]["index"] == index
            np.testing.assert_allclose(
                np.reshape(shown["maps"]["seg-hires-grad-cam"], shown["shape"]),
                full[:, :, index].numpy(),
                rtol=1e-5,
                atol=1e-6,
            )
        before = _updates(page)
        page.select_option("#axis", "0")
        _wait(page, before)
        shown = _shown(page)
        assert shown["shape"] == [12, 10] and shown["request"]["index"] == 3
        np.testing.assert_allclose(
            np.reshape(shown["maps"]["seg-hires-grad-cam"], (12, 10)),
            full[3].numpy(),
            rtol=1e-5,
            atol=1e-6,
        )
        assert page.text_content("#sliceLabel") == "3 / 5"


def test_export_buttons_download_what_the_page_shows(browser_page, tmp_path):
    import io
    import json

    session = session_2d()
    page = browser_page
    with _opened(page, session):
        before = _updates(page)
        page.select_option("#class", "2")
        _wait(page, before)
        with page.expect_download() as download_info:
            page.click("button[data-export=npz]")
        download = download_info.value
        assert download.suggested_filename.endswith(".npz")
        path = tmp_path / download.suggested_filename
        download.save_as(path)
        arrays = np.load(io.BytesIO(path.read_bytes()))
        metadata = json.loads(str(arrays["metadata"]))
        method = page.evaluate("() => document.getElementById('method0').value")
        assert metadata["class_index"] == 2 and metadata["method"] == method
        expected = _explained(session, segcam.Predicted(2), metadata["layer"], method)
        np.testing.assert_allclose(arrays["map"], expected, rtol=1e-5, atol=1e-6)
        with page.expect_download() as download_info:
            page.click("button[data-export=image]")
        assert download_info.value.suggested_filename.endswith(".png")


def test_colour_scale_per_slice_and_a_note_for_a_zero_slice(browser_page):
    session = session_3d()
    page = browser_page
    with _opened(page, session):
        whole = page.text_content("#max0")
        assert whole.endswith("(whole input)")
        page.select_option("#scale", "slice")
        shown = page.evaluate(
            """() => { const m = segcamViewer.maps[document.getElementById('method0').value];
                       return Math.max(0, ...Array.from(m)); }"""
        )
        text = page.text_content("#max0")
        assert text.endswith("(this slice)") and float(text.split()[0]) == pytest.approx(
            shown, rel=1e-2
        )
        assert page.text_content("#note0") == ""
        # a slice where the map is 0: the page says so instead of showing an empty overlay
        page.evaluate("() => { segcamViewer.panelMaps[0].data.fill(0); render(); }")
        assert "the map is 0 on this slice" in page.text_content("#note0")


def test_a_slice_change_redraws_at_once_in_every_mode(browser_page):
    session = session_3d()
    viewer = serve_in_thread(session)
    page = browser_page
    drawn = "() => document.getElementById('view-prediction').toDataURL()"
    slices = []
    page.on("request", lambda r: slices.append(r.url) if r.url.endswith("/api/slice") else None)
    try:
        page.goto(viewer.url)
        page.wait_for_function("() => segcamViewer.timings.length > 0")
        slices.clear()
        for mode in ("box", "pixel", "brush"):
            page.select_option("#mode", mode)
            before = page.evaluate(drawn)
            index = int(page.input_value("#slice"))
            page.fill("#slice", str((index + 3) % 10))
            page.dispatch_event("#slice", "input")
            page.wait_for_function(f"() => document.getElementById('view-prediction')"
                                   f".toDataURL() !== {before!r}")  # fmt: skip
            label = page.text_content("#sliceLabel")
            assert label.startswith(f"{(index + 3) % 10} /"), (mode, label)
            # fill and the input event both report the move: the slice is fetched once
            page.wait_for_timeout(200)
            assert len(slices) == 1, slices
            slices.clear()
            # without a pixel set in this mode, no stale maps of another slice are shown
            assert page.evaluate("() => Object.keys(segcamViewer.maps).length") == 0
    finally:
        viewer.stop()


def test_markup_in_a_class_name_is_text_and_runs_nothing(browser_page):
    # a model folder's dataset.json may name a label so (issue 23): it ran script and read the token
    image, _ = shapes_scene(1_000_009)
    hostile = '<img src=x onerror="window.__ran = document.title">'
    session = ViewerSession(
        model=load_demo_model(),
        inputs=torch.from_numpy(image.astype(np.float32)),
        class_names=["background", hostile, "<script>window.__ran = 1</script>"],
        layers=[LAYER],
    )
    page = browser_page
    with _opened(page, session):
        legend = page.evaluate("() => document.getElementById('legend').textContent")
        assert hostile in legend and "<script>" in legend
        assert "pixel set" in legend and "truth" not in legend  # the lines, and no truth here
        assert (
            page.evaluate("() => document.querySelectorAll('#legend img, #legend script').length")
            == 0
        )
        assert page.evaluate("() => window.__ran") is None
        assert page.evaluate("() => [...document.querySelectorAll('#class option')][1].text") == (
            f"1: {hostile}"
        )


def test_truth_outlines_show_every_border_in_each_class_s_colour(browser_page):
    # the outline showed only where a label met 0: a tumour inside the liver had none (issue 23)
    image, _ = shapes_scene(1_000_009)
    truth = np.zeros((64, 64), np.uint8)
    truth[8:48, 8:48] = 1  # "liver"
    truth[20:30, 20:30] = 2  # "tumour", inside it
    session = ViewerSession(
        model=load_demo_model(), inputs=torch.from_numpy(image.astype(np.float32)),
        class_names=["background", "liver", "tumour"], layers=[LAYER], ground_truth=truth,
    )  # fmt: skip
    page = browser_page
    with _opened(page, session):
        colour = page.evaluate(
            """([row, col]) => {
                 const canvas = document.getElementById('view0'), z = segcamViewer.zoom;
                 const d = canvas.getContext('2d').getImageData(
                   Math.floor((col + 0.5) * z), Math.floor((row + 0.5) * z), 1, 1).data;
                 return [d[0], d[1], d[2]]; }"""
        , [20, 25])  # fmt: skip
        inner = page.evaluate("() => truthColour(2)")
        assert colour == inner  # the tumour's top border, inside the liver, in the tumour's colour
        outer = page.evaluate(
            """() => { const canvas = document.getElementById('view0'), z = segcamViewer.zoom;
                 const d = canvas.getContext('2d').getImageData(
                   Math.floor(25.5 * z), Math.floor(8.5 * z), 1, 1).data;
                 return [d[0], d[1], d[2]]; }"""
        )
        assert outer == page.evaluate("() => truthColour(1)")  # the liver's own border
        legend = page.evaluate("() => document.getElementById('legend').textContent")
        assert "pixel set" in legend and "truth (class colour, light)" in legend


# per kind of comparison (tp, fp, fn, tn), the canvas colour of one pixel inside its kind, away
# from every outline (truth, pixel set)
INNER_PIXELS_BY_KIND = """() => {
  const s = segcamViewer.slice, [h, w] = s.shape;
  const c = Number(document.getElementById('class').value);
  const kind = (p) => comparison(s.prediction[p] === c, s.truth[p] === c);
  const canvas = document.getElementById('view-prediction'), z = segcamViewer.zoom;
  const same = (p, q) => kind(q) === kind(p) && s.truth[q] === s.truth[p]
    && s.prediction[q] === s.prediction[p];
  const out = {};
  for (let i = 2; i < h - 2; i++) for (let j = 2; j < w - 2; j++) {
    const p = i * w + j, k = kind(p), steps = [-2, -1, 0, 1, 2];
    const around = steps.flatMap((di) => steps.map((dj) => (i + di) * w + j + dj));
    if (out[k] || !around.every((q) => same(p, q))) continue;
    const x = Math.floor((j + 0.5) * z), y = Math.floor((i + 0.5) * z);
    const d = canvas.getContext('2d').getImageData(x, y, 1, 1).data;
    out[k] = [d[0], d[1], d[2]];
  }
  return out;
}"""


def test_compare_with_truth_colours_true_and_false_positives_and_negatives(browser_page):
    image, labels = shapes_scene(1_000_009)
    truth = np.roll(labels.astype(np.uint8), 7, axis=1)  # the truth beside the prediction
    session = ViewerSession(
        model=load_demo_model(), inputs=torch.from_numpy(image.astype(np.float32)),
        class_names=["background", "disk", "square"], layers=[LAYER], ground_truth=truth,
    )  # fmt: skip
    page = browser_page
    with _opened(page, session):
        page.check("#compare")
        found = page.evaluate(INNER_PIXELS_BY_KIND)
        assert {"tp", "fp", "fn"} <= set(found), found
        r, g, b = found["tp"]
        assert r > b + 40 and g > b + 40  # yellow
        r, g, b = found["fp"]
        assert r > g + 40 and r > b + 40  # red
        r, g, b = found["fn"]
        assert b > r + 40 and b > g + 20  # blue
        legend = page.evaluate("() => document.getElementById('legend').textContent")
        assert "false negative (compare)" in legend


def test_a_new_mode_without_its_pixel_set_shows_no_maps_of_the_previous_one(browser_page):
    # "clicked pixel" kept showing the brush's maps until a click (issue 23)
    session = session_2d()
    page = browser_page
    with _opened(page, session):
        assert page.evaluate("() => Object.keys(segcamViewer.maps).length") == 2  # predicted
        page.select_option("#mode", "pixel")
        assert page.evaluate("() => Object.keys(segcamViewer.maps).length") == 0
        assert "no pixel set yet" in page.text_content("#name0")
        before = _updates(page)
        box = page.locator("#view0").bounding_box()
        zoom = page.evaluate("() => segcamViewer.zoom")
        page.mouse.click(box["x"] + 20.5 * zoom, box["y"] + 10.5 * zoom)
        _wait(page, before)
        assert page.evaluate("() => segcamViewer.request.target.kind") == "pixel"
        assert page.text_content("#name0") == page.evaluate("() => segcamViewer.request.methods[0]")


def test_a_long_note_does_not_move_the_next_panel(browser_page):
    # a note widened its panel and the next one jumped (issue 23)
    session = session_2d()
    page = browser_page
    with _opened(page, session):
        where = page.locator("#view1").bounding_box()
        long = "the map is 0 on this slice (its maximum, 1.23, lies elsewhere) " * 3
        page.evaluate("text => { document.getElementById('note0').textContent = text; }", long)
        assert page.locator("#view1").bounding_box()["x"] == where["x"]


CANVAS_PIXELS = """(ids) => ids.map((id) => {
  const c = document.getElementById(id), g = c.getContext('2d');
  return {w: c.width, h: c.height, data: Array.from(g.getImageData(0, 0, c.width, c.height).data)};
})"""


def test_save_view_is_what_the_screen_shows(browser_page, tmp_path):
    # the PNG export was the 128-px map alone, without window, opacity or outlines (issue 23)
    from PIL import Image

    session = session_2d()
    page = browser_page
    with _opened(page, session):
        with page.expect_download() as download:
            page.click("#saveView")
        saved = tmp_path / "view.png"
        download.value.save_as(saved)
        assert download.value.suggested_filename.startswith("segcam-view-")
        picture = np.asarray(Image.open(saved).convert("RGB")).astype(np.int64)
        shown = page.evaluate(CANVAS_PIXELS, ["view-prediction", "view0", "view1"])
        pad, title = 8, 20
        assert picture.shape[1] == pad + sum(c["w"] + pad for c in shown)
        x = pad
        for canvas in shown:  # each panel's pixels, exactly as on screen
            rgba = np.asarray(canvas["data"], np.int64).reshape(canvas["h"], canvas["w"], 4)
            crop = picture[title : title + canvas["h"], x : x + canvas["w"]]
            middle = (slice(30, canvas["h"] - 30), slice(30, canvas["w"] - 30))  # no labels there
            np.testing.assert_array_equal(crop[middle], rgba[..., :3][middle])
            x += canvas["w"] + pad
