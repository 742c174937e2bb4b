"""The viewer's volume features in Chromium: radiological display, 3D targeting, window/level,
navigation, overlays, uploads, costs and cancelling (Playwright, headless; make browser)."""

from __future__ import annotations

import gzip
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

import segcam
from segcam.apps.viewer import ViewerSession
from segcam.apps.viewer.serve import serve_in_thread
from segcam.testing import tiny_segnet

pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")
SHAPE = (16, 20, 12)
LPS = np.diag([-0.8, -0.8, 4.0, 1.0])  # voxel axes toward L, P, S; 0.8 x 0.8 x 4 mm


def volume_session(model=None, shape=SHAPE, **kwargs):
    rng = np.random.default_rng(3)
    hounsfield = rng.normal(40, 200, shape).astype(np.float32)
    truth = (np.indices(shape)[0] < 5).astype(np.uint8)
    inputs = torch.from_numpy(hounsfield / 200)[None]
    return ViewerSession(
        model=model or tiny_segnet(3), inputs=inputs, affine=LPS, intensity=hounsfield,
        intensity_unit="HU", ground_truth=truth, **kwargs,
    )  # fmt: skip


def start(page, session):
    viewer = serve_in_thread(session)
    page.goto(viewer.url)
    page.wait_for_function("() => segcamViewer.timings.length > 0 && !segcamViewer.busy")
    return viewer


def updates(page):
    return page.evaluate("() => segcamViewer.timings.length")


def choose(page, selector, value):
    """Select ``value`` in ``selector`` and wait for the maps that follow."""
    before = updates(page)
    page.select_option(selector, value)
    wait(page, before)


def wait(page, before):
    page.wait_for_function("n => segcamViewer.timings.length > n && !segcamViewer.busy", arg=before)


def pixel_at(page, canvas, row, col):
    """The page coordinates of a shown pixel's centre on a canvas."""
    box = page.locator(canvas).bounding_box()
    s = page.evaluate(
        """(id) => { const c = document.getElementById(id), a = Number(c.dataset.axis);
           const d = id.startsWith('tri') ? segcamViewer.tri[a].slice : segcamViewer.slice;
           return {...scales(a, ...d.shape), pan: segcamViewer.pan}; }""",
        canvas.lstrip("#"),
    )
    return box["x"] + 1 + s["pan"]["x"] + (col + 0.5) * s["x"], box["y"] + 1 + s["pan"]["y"] + (
        row + 0.5
    ) * s["y"]


def shown_map(page, method):
    return np.array(page.evaluate(f"() => Array.from(segcamViewer.maps[{method!r}])"))


def explained(session, target, method="seg-hires-grad-cam"):
    return (
        segcam.explain(session.model, session.inputs[None], target, session.default_layer, method)
        .maps[0, 0]
        .numpy()
    )


def test_orientation_labels_physical_aspect_and_the_crosshair_read_out(browser_page):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        labels = page.evaluate(
            """() => Object.fromEntries(Array.from(document.querySelectorAll('#view0 ~ .dir'))
                   .map((e) => [e.classList[1], e.textContent]))"""
        )
        assert labels == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
        page.select_option("#axis", "0")  # sagittal: rows 10 slices of 4 mm, columns 20 x 0.8
        page.wait_for_function("() => segcamViewer.slice.shape[0] === 12")
        size = page.evaluate("() => [view0.width, view0.height]")
        assert size[1] / size[0] == pytest.approx((12 * 4.0) / (20 * 0.8), rel=0.02)
        labels = page.evaluate(
            """() => Array.from(document.querySelectorAll('#view0 ~ .dir'))
                   .map((e) => e.textContent)"""
        )
        assert sorted(labels) == ["A", "I", "P", "S"]
        # three planes: a click on the axial plane moves the crosshair; the read-out is the array's
        choose(page, "#layout", "three")
        before = updates(page)
        x, y = pixel_at(page, "#tri2", 3, 7)  # axial: row 3 -> axis 1 = 3; col 7 -> axis 0 = 7
        page.mouse.click(x, y)
        wait(page, before)
        readout = page.evaluate("() => segcamViewer.readout")
        voxel = tuple(readout["index"])
        assert voxel[:2] == (7, 3)
        assert readout["intensity"] == pytest.approx(float(session.intensity[voxel]), rel=1e-6)
        assert readout["truth"] == int(session.ground_truth[voxel])
        expected = explained(session, segcam.Predicted(1))
        assert readout["maps"]["seg-hires-grad-cam"] == pytest.approx(
            float(expected[voxel]), rel=1e-4, abs=1e-6
        )
        assert f"{readout['intensity']:.5g}"[:5] in page.text_content("#readout")
    finally:
        viewer.stop()


def test_brush_strokes_persist_across_slices_and_are_smooth(browser_page):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        page.select_option("#mode", "brush")
        page.fill("#radius", "1")
        page.dispatch_event("#radius", "input")
        painted = {}
        for index, row in ((4, 5), (7, 12)):
            page.fill("#slice", str(index))
            page.dispatch_event("#slice", "input")
            page.wait_for_function(
                f"() => document.getElementById('sliceLabel').textContent.startsWith('{index} /')"
            )
            page.wait_for_function("() => !segcamViewer.busy")  # the slice's own update
            before = updates(page)
            page.mouse.move(*pixel_at(page, "#view-prediction", row, 0))
            page.mouse.down()
            page.mouse.move(*pixel_at(page, "#view-prediction", row, 15), steps=1)  # one fast jump
            page.mouse.up()
            wait(page, before)
            painted[index] = row
        request = page.evaluate("() => segcamViewer.request.target")
        assert request["kind"] == "mask" and len(request["slices"]) == 2
        # the strokes are continuous lines: every column 0..15 on the row, and its neighbours
        mask = np.zeros(SHAPE, bool)
        for index, row in painted.items():
            plane = np.zeros((20, 16), bool)  # axial: rows axis 1, columns axis 0
            for col in range(16):
                for dr, dc in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                    if 0 <= col + dc < 16:
                        plane[row + dr, col + dc] = True
            session.plane(2).place(plane, mask, index)
        assert page.evaluate("() => segcamViewer.result.pixels") == int(mask.sum())
        expected = explained(session, segcam.Mask(1, torch.from_numpy(mask)))
        np.testing.assert_allclose(
            shown_map(page, "seg-hires-grad-cam").reshape(20, 16),
            session.plane(2).cut(expected, 7), rtol=1e-4, atol=1e-6,
        )  # fmt: skip
        # back on slice 4 its stroke is still there (drawn and in the set's outline)
        before = updates(page)
        page.fill("#slice", "4")
        page.dispatch_event("#slice", "input")
        wait(page, before)
        outline = np.array(page.evaluate("() => Array.from(segcamViewer.result.setSlice)"))
        assert outline.reshape(20, 16)[5].sum() == 16
    finally:
        viewer.stop()


def test_a_slab_box_its_extent_and_going_to_the_set(browser_page):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        page.select_option("#mode", "box")
        page.fill("#depth", "3")
        page.fill("#slice", "8")
        page.dispatch_event("#slice", "input")
        page.wait_for_function(
            "() => document.getElementById('sliceLabel').textContent.startsWith('8 /')"
        )
        before = updates(page)
        page.mouse.move(*pixel_at(page, "#view0", 2, 3))
        page.mouse.down()
        page.mouse.move(*pixel_at(page, "#view0", 9, 11), steps=3)
        page.mouse.up()
        wait(page, before)
        target = page.evaluate("() => segcamViewer.request.target")
        # axial rows are axis 1, columns axis 0 (no flips in LPS order); depth 3 around slice 8
        assert target == {"kind": "box", "start": [3, 2, 7], "stop": [12, 10, 10]}
        box = segcam.Box(1, [(3, 12), (2, 10), (7, 10)])
        expected = explained(session, box)
        np.testing.assert_allclose(
            shown_map(page, "seg-hires-grad-cam").reshape(20, 16),
            session.plane(2).cut(expected, 8), rtol=1e-4, atol=1e-6,
        )  # fmt: skip
        assert "axial slices 7–9" in page.text_content("#setinfo")
        page.fill("#slice", "1")
        page.dispatch_event("#slice", "input")
        page.wait_for_function(
            "() => document.getElementById('setinfo').textContent.includes('not on this slice')"
        )
        page.click("#goto")
        page.wait_for_function("() => document.getElementById('slice').value === '8'")
    finally:
        viewer.stop()


def test_window_level_navigation_zoom_and_overlays(browser_page):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    drawn = "() => document.getElementById('view-prediction').toDataURL()"
    try:
        first = page.evaluate(drawn)
        page.select_option("#preset", label="bone (L 400, W 1800)")
        assert page.input_value("#level") == "400" and page.input_value("#width") == "1800"
        assert page.evaluate(drawn) != first
        # a grey value is the window's: intensity -> (v - (L - W/2)) / W
        # right drag: window/level follow the mouse
        page.mouse.move(*pixel_at(page, "#view0", 5, 5))
        page.mouse.down(button="right")
        page.mouse.move(*pixel_at(page, "#view0", 8, 9), steps=2)
        page.mouse.up(button="right")
        assert page.input_value("#level") != "400" and page.input_value("#width") != "1800"
        # wheel and keys move the slice
        index = int(page.input_value("#slice"))
        page.mouse.move(*pixel_at(page, "#view0", 5, 5))
        page.mouse.wheel(0, 100)
        page.wait_for_function(f"() => document.getElementById('slice').value === '{index + 1}'")
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowDown")
        page.wait_for_function(f"() => document.getElementById('slice').value === '{index - 1}'")
        # zoom in: a clicked pixel is still the pixel under the mouse
        page.keyboard.press("+")
        page.keyboard.press("+")
        assert page.evaluate("() => segcamViewer.magnify") == pytest.approx(1.5625)
        page.select_option("#mode", "pixel")
        before = updates(page)
        page.mouse.click(*pixel_at(page, "#view0", 6, 4))
        wait(page, before)
        assert page.evaluate("() => segcamViewer.request.target.index") == [4, 6, index - 1]
        # overlays: the prediction and the ground truth can be hidden
        with_prediction = page.evaluate(drawn)
        page.uncheck("#showPrediction")
        assert page.evaluate(drawn) != with_prediction
        without = page.evaluate(drawn)
        page.uncheck("#showTruth")
        assert page.evaluate(drawn) != without
        page.uncheck("#showMap")
        assert page.evaluate("() => document.getElementById('view0').toDataURL()") == page.evaluate(
            "() => document.getElementById('view1').toDataURL()"
        )
        # all layers: norm/activation and wrapped modules can be chosen too
        offered = page.evaluate("() => document.getElementById('layer').options.length")
        page.check("#allLayers")
        assert page.evaluate("() => document.getElementById('layer').options.length") > offered
    finally:
        viewer.stop()


def test_a_nifti_mask_upload_from_the_page(browser_page, tmp_path):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        mask = np.zeros(SHAPE, np.uint8)
        mask[4:9, 6:12, 2:5] = 1
        path = tmp_path / "mask.nii.gz"
        path.write_bytes(gzip.compress(nib.Nifti1Image(mask, LPS).to_bytes()))
        before = updates(page)
        page.set_input_files("#upload", str(path))
        wait(page, before)
        assert page.evaluate("() => segcamViewer.request.target") == {"kind": "uploaded"}
        assert page.evaluate("() => segcamViewer.result.pixels") == int(mask.sum())
    finally:
        viewer.stop()


class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.net, self.delay = tiny_segnet(3), 0.0

    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)


def test_a_costly_request_asks_first_shows_busy_and_cancels(browser_page):
    page, session = browser_page, volume_session(Slow(), layers=["net.body.2"])
    session.forward_seconds = 3.0  # as a large volume's forward pass takes
    session.model.delay = 0.5
    viewer = start(page, session)
    try:
        asked = []

        def answer(dialog):
            asked.append(dialog.message)
            dialog.dismiss() if len(asked) == 1 else dialog.accept()

        page.on("dialog", answer)
        page.select_option("#method1", "seg-score-cam")
        page.wait_for_function(
            "() => document.getElementById('status').textContent.startsWith('not run')"
        )
        assert "seg-score-cam: 4 forward passes" in asked[0] and "about 12 s" in asked[0]
        page.select_option("#class", "2")  # asks again, accepted: it runs
        page.wait_for_selector("#busy.on")
        started = time.monotonic()
        page.click("#cancel")
        cancelled = "document.getElementById('status').textContent === 'cancelled'"
        page.wait_for_function(f"() => !segcamViewer.busy && {cancelled}")
        assert time.monotonic() - started < 1.5 and len(asked) == 2
        # a new request supersedes the cancelled one and is answered
        choose(page, "#method1", "seg-grad-cam")
        assert page.evaluate("() => segcamViewer.request.methods") == [
            "seg-grad-cam",
            "seg-grad-cam",
        ]
    finally:
        viewer.stop()


def test_each_view_keeps_its_slice(browser_page):
    # leaving a view and coming back reset its slice to the middle (issue 23)
    page = browser_page
    viewer = start(page, volume_session())
    try:
        axes = page.evaluate("() => [...document.getElementById('axis').options].map(o => o.value)")
        first, other = axes[0], axes[1]
        page.select_option("#axis", first)
        page.evaluate("() => { const s = document.getElementById('slice'); s.value = 2; "
                      "s.dispatchEvent(new Event('input')); }")  # fmt: skip
        page.wait_for_function("() => document.getElementById('slice').value === '2'")
        page.select_option("#axis", other)
        middle = page.evaluate("() => Number(document.getElementById('slice').value)")
        page.select_option("#axis", first)
        assert page.evaluate("() => document.getElementById('slice').value") == "2"
        page.select_option("#axis", other)
        assert page.evaluate("() => Number(document.getElementById('slice').value)") == middle
    finally:
        viewer.stop()


def test_ctrl_wheel_zooms_about_the_pointer(browser_page):
    # the zoom was anchored at the top-left corner (issue 23)
    page = browser_page
    viewer = start(page, volume_session())
    try:
        canvas = page.locator("#view-prediction")
        box = canvas.bounding_box()
        x, y = box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.6
        page.mouse.move(x, y)
        under = page.evaluate("() => segcamViewer.readout && segcamViewer.readout.index")
        assert under is not None
        page.keyboard.down("Control")
        page.mouse.wheel(0, -100)
        page.mouse.wheel(0, -100)
        page.keyboard.up("Control")
        assert page.evaluate("() => segcamViewer.magnify") > 1.5
        page.mouse.move(x + 1, y)  # the read-out follows the mouse: the same voxel under it
        page.mouse.move(x, y)
        assert page.evaluate("() => segcamViewer.readout && segcamViewer.readout.index") == under
    finally:
        viewer.stop()


def test_the_read_out_follows_a_scroll_under_a_still_mouse(browser_page):
    # it kept the previous slice's voxel and values until the mouse moved (issue 23)
    page = browser_page
    session = volume_session()
    viewer = start(page, session)
    try:
        box = page.locator("#view-prediction").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.4, box["y"] + box["height"] * 0.5)
        before = page.evaluate("() => segcamViewer.readout.index")
        axis = page.evaluate("() => Number(document.getElementById('axis').value)")
        page.mouse.wheel(0, 100)  # one slice on, the mouse still
        page.wait_for_function(
            "([a, i]) => segcamViewer.readout && segcamViewer.readout.index[a] === i",
            arg=[axis, before[axis] + 1],
        )
        after = page.evaluate("() => segcamViewer.readout")
        expected = list(before)
        expected[axis] += 1
        assert after["index"] == expected
        assert after["intensity"] == pytest.approx(
            float(session.intensity[tuple(expected)]), rel=1e-5
        )
    finally:
        viewer.stop()


def test_no_blank_frame_while_scrolling(browser_page):
    # the page cleared the maps on every slice: they blanked on 46 of 229 frames (issue 23)
    page = browser_page
    viewer = start(page, volume_session(shape=(16, 20, 40)))
    try:
        box = page.locator("#view-prediction").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.evaluate("() => setSlice(5)")
        page.wait_for_function("() => segcamViewer.sliceIndex === 5 && !segcamViewer.busy")
        page.evaluate(
            """() => { const v = segcamViewer, frames = v.frames = [];
                 (function sample() {
                   const name = document.getElementById('name0').textContent;
                   frames.push({maps: Object.keys(v.maps).length, request: v.request.index,
                                slice: v.sliceIndex, computing: name.includes('computing')});
                   if (!v.stopFrames) requestAnimationFrame(sample);
                 })(); }"""
        )
        for _ in range(25):
            page.mouse.wheel(0, 100)
            page.wait_for_timeout(30)
        last = 30
        page.wait_for_function(
            "i => { const v = segcamViewer; "
            "return v.sliceIndex === i && v.request.index === i && !v.busy; }",
            arg=last,
        )
        frames = page.evaluate(
            "() => { segcamViewer.stopFrames = true; return segcamViewer.frames; }"
        )
        assert len(frames) > 25
        assert all(f["maps"] == 2 and not f["computing"] for f in frames), frames
        # the maps drawn are always the drawn slice's
        assert all(f["request"] == f["slice"] for f in frames)
        assert len({f["slice"] for f in frames}) > 5  # slices were shown on the way
    finally:
        viewer.stop()


def test_a_ct_opens_in_the_soft_tissue_window(browser_page):
    page = browser_page
    viewer = start(page, volume_session())  # intensities in HU
    try:
        assert page.evaluate("() => segcamViewer.window") == {"level": 40, "width": 400}
        chosen = page.evaluate("() => document.getElementById('preset').selectedOptions[0].text")
        assert chosen == "soft tissue (L 40, W 400)"
    finally:
        viewer.stop()


def canvas_rgb(page, canvas, row, col):
    """The drawn colour at a shown pixel's centre (canvas pixels, not CSS)."""
    return page.evaluate(
        """([id, row, col]) => { const c = document.getElementById(id), a = Number(c.dataset.axis);
           const d = id.startsWith('tri') ? segcamViewer.tri[a].slice : segcamViewer.slice;
           const s = scales(a, ...d.shape), x = Math.floor(segcamViewer.pan.x + (col + 0.5) * s.x),
                 y = Math.floor(segcamViewer.pan.y + (row + 0.5) * s.y);
           return Array.from(c.getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3)); }""",
        [canvas.lstrip("#"), int(row), int(col)],
    )


def test_a_signed_map_on_a_diverging_scale_and_why_a_relu_map_is_zero(browser_page):
    # at the default layer the ReLU'd Seg-Grad CAM was 0 almost everywhere, silently (issue 23)
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        choose(page, "#show0", "signed")
        panel = page.evaluate(
            """() => { const v = panelView(0, segcamViewer);
                       return {signed: v.signed, scale: v.scale, data: Array.from(v.data),
                               title: document.getElementById('name0').textContent,
                               ticks: ['low0', 'mid0', 'high0'].map((id) =>
                                 document.getElementById(id).textContent)}; }"""
        )
        request = page.evaluate("() => segcamViewer.request")
        target = segcam.Predicted(request["class"])
        raw = segcam.explain(
            session.model, session.inputs[None], target, session.default_layer,
            request["methods"][0], relu=False,
        ).maps[0, 0].numpy()  # fmt: skip
        shown = session.plane(request["axis"]).cut(raw, request["index"])
        np.testing.assert_allclose(np.array(panel["data"]).reshape(shown.shape), shown, atol=1e-6)
        assert panel["signed"] and "signed" in panel["title"]
        layer_raw = segcam.explain(
            session.model, session.inputs[None], target, session.default_layer,
            request["methods"][0], relu=False, upsample=False,
        ).maps  # fmt: skip
        scale = max(abs(float(layer_raw.min())), abs(float(layer_raw.max())))  # the raw extremes
        assert panel["scale"] == pytest.approx(scale, rel=1e-5)
        low, mid, high = panel["ticks"]
        assert mid == "0" and float(high) == pytest.approx(scale, rel=1e-2) and float(low) < 0
        # negative evidence is drawn blue, positive red (the diverging scale), none near 0
        flat = shown.ravel()
        worst, best = (
            np.unravel_index(flat.argmin(), shown.shape),
            np.unravel_index(flat.argmax(), shown.shape),
        )
        blue, red = canvas_rgb(page, "#view0", *worst), canvas_rgb(page, "#view0", *best)
        if raw.min() < 0 and shown.min() < -0.5 * scale:
            assert blue[2] > blue[0]
        if shown.max() > 0.5 * scale:
            assert red[0] > red[2]
        # back to ReLU on a slice where it is negative: the note says why it is 0
        choose(page, "#show0", "relu")
        page.evaluate(
            """() => { const m = segcamViewer.panelMaps[0];
                       m.data.fill(0); m.entry.slice_min = -1.5; render(); }"""
        )
        assert "because its evidence is negative here" in page.text_content("#note0")
    finally:
        viewer.stop()


def test_difference_of_two_maps_and_a_right_panel_at_its_own_layer_and_class(browser_page):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        choose(page, "#show1", "difference")
        panel = page.evaluate(
            """() => { const v = panelView(1, segcamViewer), m = segcamViewer.panelMaps;
                       return {d: Array.from(v.data), a: Array.from(m[0].data),
                               b: Array.from(m[1].data), ma: m[0].entry.max, mb: m[1].entry.max,
                               title: document.getElementById('name1').textContent}; }"""
        )
        # each map divided by its own maximum: methods' scales differ by orders of magnitude
        scales = [panel["ma"] or 1.0, panel["mb"] or 1.0]  # a map that is 0 everywhere: 1
        expected = np.array(panel["a"]) / scales[0] - np.array(panel["b"]) / scales[1]
        np.testing.assert_allclose(panel["d"], expected, atol=1e-6)
        assert panel["title"].startswith("difference: left − right")
        # the right panel at another layer and class: its own request entry, named in its title
        other = session.menu.offered[0]
        choose(page, "#show1", "relu")
        choose(page, "#layer1", other)
        choose(page, "#class1", "2")
        entry = page.evaluate("() => segcamViewer.panelMaps[1].entry")
        assert entry["layer"] == other and entry["class"] == 2
        title = page.text_content("#name1")
        label = next(entry["label"] for entry in page.evaluate("() => segcamViewer.info.layers")
                     if entry["name"] == other) or other  # fmt: skip
        assert label in title and "class" in title
        request = page.evaluate("() => segcamViewer.request")
        expected = segcam.explain(
            session.model, session.inputs[None], segcam.Predicted(2), other, request["methods"][1]
        ).maps[0, 0].numpy()  # fmt: skip
        data = np.array(page.evaluate("() => Array.from(segcamViewer.panelMaps[1].data)"))
        shown = session.plane(request["axis"]).cut(expected, request["index"])
        np.testing.assert_allclose(data.reshape(shown.shape), shown, rtol=1e-5, atol=1e-6)
    finally:
        viewer.stop()


def test_where_the_explanation_lies_maximum_strip_threshold_and_millimetres(browser_page):
    page, session = browser_page, volume_session(shape=(16, 20, 30))
    viewer = start(page, session)
    try:
        # m: the slice of the left map's maximum
        entry = page.evaluate("() => segcamViewer.panelMaps[0].entry")
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("m")
        axis = int(page.input_value("#axis"))
        page.wait_for_function(
            "i => segcamViewer.sliceIndex === i && !segcamViewer.busy", arg=entry["argmax"][axis]
        )
        data = np.array(page.evaluate("() => Array.from(segcamViewer.panelMaps[0].data)"))
        assert data.max() == pytest.approx(entry["max"], rel=1e-5)  # the maximum is on screen
        # the strip along the slider: one column per slice, the set's slices in cyan
        profile = page.evaluate("() => segcamViewer.result.profile")
        assert profile["axis"] == axis and len(profile["set"]) == session.spatial[axis]
        strip = page.evaluate(
            """() => { const c = document.getElementById('strip'), g = c.getContext('2d');
                       const n = segcamViewer.result.profile.set.length, w = c.width / n;
                       const at = (i) => g.getImageData(Math.floor(i * w + w / 4), 2, 1, 1);
                       return Array.from({length: n}, (_, i) =>
                         Array.from(at(i).data.slice(0, 3))); }"""
        )
        for count, colour in zip(profile["set"], strip, strict=True):
            assert (colour[2] > 150) == (count > 0)  # cyan where the set has voxels
        # a threshold hides the map below that share of its scale
        page.evaluate("() => { document.getElementById('threshold').value = 60; render(); }")
        hidden = page.evaluate(
            """() => { const paint = mapPaint(new Float32Array([0.5, 0.9]), 1, 1, false);
                       return [paint(0, 100), paint(1, 100)]; }"""
        )
        assert hidden[0] == [100, 100, 100] and hidden[1] != [100, 100, 100]
        # the read-out in world millimetres (RAS) and the slice position
        box = page.locator("#view-prediction").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.6)
        readout = page.evaluate("() => segcamViewer.readout")
        voxel = np.array([*readout["index"], 1.0])
        np.testing.assert_allclose(readout["world"], (LPS @ voxel)[:3], atol=1e-6)  # the affine
        assert "mm" in page.text_content("#readout") and "mm" in page.text_content("#sliceLabel")
    finally:
        viewer.stop()


def test_keyboard_shortcuts_toggle_overlays_and_choose_window_presets(browser_page):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        page.locator("body").click(position={"x": 5, "y": 5})
        for key, box in (
            ("h", "showMap"),
            ("p", "showPrediction"),
            ("t", "showTruth"),
            ("c", "compare"),
        ):
            was = page.is_checked(f"#{box}")
            page.keyboard.press(key)
            assert page.is_checked(f"#{box}") != was
        presets = page.evaluate("() => segcamViewer.info.intensity.presets")
        page.keyboard.press("4")
        assert page.evaluate("() => segcamViewer.window") == {
            "level": presets[3]["level"],
            "width": presets[3]["width"],
        }
    finally:
        viewer.stop()


def test_three_planes_show_prediction_both_maps_colour_bar_and_their_own_sliders(browser_page):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        page.select_option("#layout", "three")
        page.wait_for_function(
            "() => segcamViewer.tri[0] && segcamViewer.tri[2].panelMaps && !segcamViewer.busy"
        )
        assert page.text_content("#triHigh") != ""  # the colour bar's ticks
        # the prediction is filled in (class colours) under the map
        page.uncheck("#showMap")
        axial = 2
        pred = page.evaluate(f"() => Array.from(segcamViewer.tri[{axial}].slice.prediction)")
        shape = page.evaluate(f"() => segcamViewer.tri[{axial}].slice.shape")
        labelled = [i for i, v in enumerate(pred) if v]
        if labelled:
            r, c = divmod(labelled[0], shape[1])
            grey = canvas_rgb(page, "#tri2", r, c)
            assert len(set(grey)) > 1  # coloured, not grey
        page.check("#showMap")
        # the right map on the three planes
        page.select_option("#triMap", "1")
        method = page.evaluate("() => document.getElementById('method1').value")
        assert method in page.text_content("#triName2")
        # each plane's own slider moves its slice
        page.evaluate(
            "() => { const s = document.getElementById('triSlice0'); s.value = 3; "
            "s.dispatchEvent(new Event('input')); }"
        )
        page.wait_for_function("() => segcamViewer.cursor[0] === 3 && !segcamViewer.busy")
        # arrow keys move the slice of the plane under the pointer
        box = page.locator("#tri1").bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        page.evaluate("() => document.activeElement.blur()")  # the select kept the keys
        before = page.evaluate("() => segcamViewer.cursor[1]")
        page.keyboard.press("ArrowUp")
        page.wait_for_function(f"() => segcamViewer.cursor[1] === {before + 1}")
        assert page.evaluate("() => segcamViewer.cursor[0]") == 3
    finally:
        viewer.stop()


def test_the_pointer_is_mirrored_on_every_panel(browser_page):
    page, session = browser_page, volume_session()
    viewer = start(page, session)
    try:
        page.mouse.move(*pixel_at(page, "#view0", 8, 6))
        page.wait_for_timeout(100)  # one animation frame
        for canvas in ("#view-prediction", "#view1"):
            s = page.evaluate("() => scales(axisNow(), ...segcamViewer.slice.shape)")
            x = int(page.evaluate("() => segcamViewer.pan.x") + 6.5 * s["x"]) - 4
            y = int(page.evaluate("() => segcamViewer.pan.y") + 8.5 * s["y"])  # the line's row
            rgb = page.evaluate(
                "([id, x, y]) => Array.from(document.getElementById(id).getContext('2d')"
                ".getImageData(x, y, 1, 1).data.slice(0, 3))",
                [canvas.lstrip("#"), x, y],
            )
            assert min(rgb) > 200, (canvas, rgb)  # the white cross beside the pointer's pixel
    finally:
        viewer.stop()


def test_no_blank_frame_while_moving_through_three_planes(browser_page):
    # each crosshair or slider move cleared the maps: 68 of 204 frames blank (issue 23's review)
    page = browser_page
    viewer = start(page, volume_session(shape=(16, 20, 40)))
    try:
        choose(page, "#layout", "three")
        page.wait_for_function("() => segcamViewer.tri[2] && segcamViewer.tri[2].panelMaps")
        page.evaluate(
            """() => { const v = segcamViewer, frames = v.frames = [];
                 (function sample() {
                   frames.push([0, 1, 2].map((a) => Boolean(v.tri[a] && v.tri[a].panelMaps)));
                   if (!v.stopFrames) requestAnimationFrame(sample);
                 })(); }"""
        )
        for index in range(5, 30):
            page.evaluate(
                "i => { const s = document.getElementById('triSlice2'); s.value = i; "
                "s.dispatchEvent(new Event('input')); }",
                index,
            )
            page.wait_for_timeout(20)
        page.wait_for_function("() => segcamViewer.cursor[2] === 29 && !segcamViewer.busy")
        page.wait_for_timeout(100)
        frames = page.evaluate(
            "() => { segcamViewer.stopFrames = true; return segcamViewer.frames; }"
        )
        assert len(frames) > 20 and all(all(f) for f in frames)
        # the shown slice is the crosshair's, and its maps are that slice's
        request = page.evaluate("() => segcamViewer.request")
        assert request["index"] == 29 or any(
            p["axis"] == 2 and p["index"] == 29 for p in request.get("planes", [])
        )
    finally:
        viewer.stop()
