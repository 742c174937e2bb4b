"""The viewer's volume features through its API: orientation from the affine, 3D pixel sets
(painted slices, slab boxes, uploaded NIfTI masks), where a set lies, costs, superseding and the
fast channels-last forward."""

from __future__ import annotations

import base64
import gzip
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from starlette.testclient import TestClient
from torch import nn

import segcam
from segcam.apps.viewer import ViewerSession
from segcam.apps.viewer.app import create_app
from segcam.apps.viewer.planes import planes
from segcam.apps.viewer.session import SupersededError
from segcam.testing import tiny_segnet

pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")
OCTET = {"Content-Type": "application/octet-stream"}
SHAPE = (6, 12, 10)
# voxel axis 0 runs toward the patient's left (-x), axis 1 toward posterior (-y), axis 2 toward
# superior: DICOM's LPS order; 0.8 x 0.8 x 4 mm
LPS = np.diag([-0.8, -0.8, 4.0, 1.0])


def session_3d(affine=LPS, **kwargs):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn((1, *SHAPE), generator=generator)
    return ViewerSession(model=tiny_segnet(3), inputs=inputs, affine=affine, **kwargs)


def b64(array):
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def unb64(text, dtype, shape):
    return np.frombuffer(base64.b64decode(text), dtype).reshape(shape)


def test_planes_follow_the_affine_radiologically():
    shown, oblique = planes(LPS)
    assert not oblique
    axial = shown[2]
    assert axial.name == "axial" and (axial.rows, axial.cols) == (1, 0)
    assert axial.labels == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    # axis 1 already runs A->P and axis 0 R->L: no flips in LPS order
    assert (axial.flip_rows, axial.flip_cols) == (False, False)
    sagittal, coronal = shown[0], shown[1]
    assert sagittal.name == "sagittal" and (sagittal.rows, sagittal.cols) == (2, 1)
    assert sagittal.flip_rows and not sagittal.flip_cols  # superior (high index) at the top
    assert sagittal.spacing == (4.0, 0.8)  # the physical aspect: 4 mm rows, 0.8 mm columns
    assert coronal.labels == {"top": "S", "bottom": "I", "left": "R", "right": "L"}
    # RAS order flips both in-plane axes of the axial view
    ras, _ = planes(np.diag([0.8, 0.8, 4.0, 1.0]))
    assert (ras[2].flip_rows, ras[2].flip_cols) == (True, True)


def test_a_voxel_lands_where_its_patient_direction_says():
    """A marker at the patient's right-anterior corner is drawn top-left in the axial view."""
    volume = np.zeros(SHAPE)
    for affine in (LPS, np.diag([0.8, 0.8, 4.0, 1.0]), np.diag([-0.8, 0.8, 4.0, 1.0])):
        world = affine[:3, :3] @ np.indices(SHAPE).reshape(3, -1)
        right_anterior = np.argmax(world[0] + world[1])  # most right (+x) and anterior (+y)
        voxel = np.unravel_index(right_anterior, SHAPE)
        volume[...] = 0
        volume[voxel] = 1
        axial = planes(affine)[0][2]
        cut = axial.cut(volume, voxel[2])
        assert cut[0, 0] == 1 and cut.shape == (SHAPE[1], SHAPE[0])
        back = np.zeros(SHAPE)
        axial.place(cut, back, voxel[2])
        assert back[voxel] == 1 and back.sum() == 1


def test_oblique_volumes_are_shown_along_the_nearest_axes_and_say_so():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                         [0, 0, 1]])  # fmt: skip
    affine = np.eye(4)
    affine[:3, :3] = rotation
    shown, oblique = planes(affine)
    assert oblique and [p.name for p in shown] == ["sagittal", "coronal", "axial"]


def test_slices_are_sent_in_display_order_with_intensities_and_ground_truth():
    intensity = np.random.default_rng(1).normal(40, 300, SHAPE).astype(np.float32)
    truth = (intensity > 100).astype(np.uint8)
    session = session_3d(intensity=intensity, intensity_unit="HU", ground_truth=truth)
    info = session.info()
    assert info["oriented"] and info["default_axis"] == 2
    assert info["planes"][2]["labels"]["left"] == "R"
    assert [p["name"] for p in info["intensity"]["presets"]][2:4] == ["soft tissue", "liver"]
    assert info["intensity"]["default"] == 2  # a CT opens in the soft-tissue window
    assert session_3d().info()["intensity"]["default"] == 0  # other values: their 1-99 % range
    shown = session.slice({"axis": 1, "index": 4})
    plane = session.plane(1)
    expected = plane.cut(intensity, 4)
    np.testing.assert_array_equal(unb64(shown["intensity"], "<f4", expected.shape), expected)
    np.testing.assert_array_equal(
        unb64(shown["ground_truth"], np.uint8, expected.shape), plane.cut(truth, 4)
    )
    assert shown["shape"] == [SHAPE[2], SHAPE[0]]  # coronal: rows S->I, columns R->L
    with pytest.raises(segcam.errors.InputError, match="ground_truth has shape"):
        session_3d(ground_truth=np.zeros((2, 2, 2)))


def test_brush_strokes_on_several_slices_make_one_3d_mask():
    session = session_3d()
    painted = {}
    slices = []
    for axis, index, rows, cols in (
        (2, 3, slice(2, 6), slice(1, 4)),
        (0, 1, slice(0, 3), slice(5, 9)),
    ):
        plane = session.plane(axis)
        shape = plane.cut(np.zeros(SHAPE), index).shape
        stroke = np.zeros(shape, np.uint8)
        stroke[rows, cols] = 1
        slices.append({"axis": axis, "index": index, "data": b64(stroke)})
        volume = np.zeros(SHAPE, bool)
        plane.place(stroke.astype(bool), volume, index)
        painted[axis] = volume
    mask = painted[2] | painted[0]
    with TestClient(create_app(session)) as client:
        shown = client.post("/api/explain", json={
            "class": 1, "target": {"kind": "mask", "slices": slices}, "axis": 2, "index": 3,
            "layer": session.default_layer, "methods": ["seg-hires-grad-cam"]}).json()  # fmt: skip
    expected = segcam.explain(
        session.model, session.inputs[None], segcam.Mask(1, torch.from_numpy(mask)),
        session.default_layer, "seg-hires-grad-cam",
    )  # fmt: skip
    assert shown["pixels"] == int(mask.sum())
    cut = session.plane(2).cut(expected.maps[0, 0].numpy(), 3)
    got = unb64(shown["maps"][0]["data"], "<f4", cut.shape)
    np.testing.assert_allclose(got, cut, rtol=1e-5, atol=1e-6)
    lo = [
        int(np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0])
        for a in range(3)
    ]
    assert [first for first, _ in shown["extent"]] == lo


def test_a_slab_box_spans_slices_and_its_maps_equal_explain():
    session = session_3d()
    start, stop = [1, 3, 2], [4, 9, 7]  # four slices deep along axis 0, six along axis 2
    body = {"class": 2, "target": {"kind": "box", "start": start, "stop": stop},
            "axis": 2, "index": 4, "layer": session.default_layer,
            "methods": ["seg-grad-cam", "seg-hires-grad-cam"],
            "planes": [{"axis": 0, "index": 2}, {"axis": 1, "index": 5}]}  # fmt: skip
    with TestClient(create_app(session)) as client:
        shown = client.post("/api/explain", json=body).json()
    box = segcam.Box(2, list(zip(start, stop, strict=True)))
    assert shown["extent"] == [[1, 3], [3, 8], [2, 6]]
    assert shown["pixels"] == 3 * 6 * 5
    for method, entry in zip(body["methods"], shown["maps"], strict=True):
        expected = (
            segcam.explain(session.model, session.inputs[None], box, session.default_layer, method)
            .maps[0, 0]
            .numpy()
        )
        for plane_result in [{"axis": 2, "index": 4, **shown}, *shown["planes"]]:
            plane = session.plane(plane_result["axis"])
            cut = plane.cut(expected, plane_result["index"])
            data = next(m for m in plane_result["maps"] if m["method"] == method)["data"]
            np.testing.assert_allclose(unb64(data, "<f4", cut.shape), cut, rtol=1e-5, atol=1e-6)
        assert entry["max"] == pytest.approx(float(expected.max()), rel=1e-5)


def nifti(mask, affine, compress=True):
    image = nib.Nifti1Image(mask.astype(np.uint8), affine)
    raw = image.to_bytes()
    return gzip.compress(raw) if compress else raw


def test_nifti_masks_upload_on_the_volumes_grid_and_bad_ones_are_refused():
    session = session_3d()
    mask = np.zeros(SHAPE, bool)
    mask[2:4, 5:9, 3:6] = True
    with TestClient(create_app(session)) as client:
        for compress in (True, False):
            answer = client.post("/api/upload", content=nifti(mask, LPS, compress), headers=OCTET)
            assert answer.json() == {"pixels": 24, "extent": [[2, 3], [5, 8], [3, 5]]}
        np.testing.assert_array_equal(session.uploaded("").values, mask)

        def refused(content):
            answer = client.post("/api/upload", content=content, headers=OCTET)
            assert answer.status_code == 400
            return answer.json()["error"]

        assert "another grid" in refused(nifti(mask, np.diag([1.0, 1.0, 1.0, 1.0])))
        assert "shape (7, 12, 10)" in refused(nifti(np.zeros((7, 12, 10)), LPS))
        # a bomb: a header declaring 2^31 voxels, then megabytes of zeros that inflate forever
        header = nib.Nifti1Header()
        header.set_data_shape((2048, 1024, 1024))
        header.set_data_dtype(np.uint8)
        bomb = gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 2**24)
        assert "shape (2048, 1024, 1024)" in refused(bomb)
        cut_short = nifti(mask, LPS, compress=False)[:-10]
        assert "cut short" in refused(cut_short)
        assert "cannot read the .nii.gz" in refused(b"\x1f\x8b" + b"garbage" * 20)
        # the shape refused as a shape, not as an unreadable header (issue 23)
        assert "cannot read the NIfTI upload's header" not in refused(
            nifti(np.zeros((7, 12, 10)), LPS)
        )
        assert "cut short: 200 of its 348 header bytes" in refused(nifti(mask, LPS, False)[:200])


def test_a_nifti_upload_whose_vox_offset_is_huge_is_refused_without_inflating_it():
    # 1.56 MiB upload with vox_offset 1.5 GiB: the server inflated 1.5 GiB (+3 GiB resident)
    import resource

    session = session_3d()
    image = nib.Nifti1Image(np.zeros(SHAPE, np.uint8), LPS)
    image.header.set_data_offset(3 * 2**29)
    bomb = gzip.compress(image.header.binaryblock + b"\0" * 4 + b"\0" * 2**26)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with TestClient(create_app(session)) as client:
        answer = client.post("/api/upload", content=bomb, headers=OCTET)
    assert answer.status_code == 400, answer.text
    assert "voxels start at byte 1610612736 (vox_offset)" in answer.json()["error"]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # kB on Linux
    assert grown < 64 * 2**20


def test_the_cost_of_gradient_free_methods_is_estimated_before_they_run():
    session = session_3d()
    channels = session.menu.shapes[session.default_layer][1]
    estimate = session.estimate(
        {"layer": session.default_layer, "methods": ["seg-score-cam", "seg-grad-cam"]}
    )
    rows = {row["method"]: row for row in estimate["methods"]}
    assert rows["seg-score-cam"]["masked_inputs"] == channels
    assert rows["seg-score-cam"]["seconds"] == pytest.approx(channels * session.forward_seconds)
    assert rows["seg-grad-cam"]["masked_inputs"] == 0 and rows["seg-grad-cam"]["seconds"] == 0
    assert not estimate["confirm"]  # a tiny network: milliseconds
    session.forward_seconds = 2.0  # as a large volume's forward pass takes
    estimate = session.estimate({"layer": session.default_layer, "methods": ["seg-score-cam"]})
    assert estimate["confirm"] and estimate["seconds"] == pytest.approx(2.0 * channels)
    with pytest.raises(segcam.errors.SegCamError, match="registered method names"):
        session.estimate({"layer": session.default_layer, "methods": ["nope"]})


class Slow(nn.Module):
    """A network whose forward pass takes ``delay`` seconds."""

    def __init__(self, delay):
        super().__init__()
        self.net, self.delay = tiny_segnet(3), delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)


def test_a_newer_request_of_the_same_page_supersedes_a_computing_one():
    generator = torch.Generator().manual_seed(0)
    session = ViewerSession(
        model=Slow(0.0), inputs=torch.randn((1, *SHAPE), generator=generator),
        layers=["net.body.2"],
    )  # fmt: skip
    session.model.delay = 0.4  # Score-CAM: 4 channels in batches of 1, 0.4 s each: 2 s in all
    base = {"class": 1, "target": {"kind": "predicted"}, "axis": 2, "index": 3,
            "layer": "net.body.2", "client": "tab-a"}  # fmt: skip
    outcome = {}

    def slow_request():
        started = time.perf_counter()
        try:
            session.explain({**base, "methods": ["seg-score-cam"]})
            outcome["first"] = "finished"
        except SupersededError:
            outcome["first"] = "superseded"
        outcome["seconds"] = time.perf_counter() - started

    # batch_size 1: one forward per channel, so the request checks between channels
    from segcam.methods import get_method

    options = get_method("seg-score-cam").options
    original = dict(options)
    try:
        object.__setattr__(get_method("seg-score-cam"), "options", {**original, "batch_size": 1})
        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.5)
        # meanwhile slices and information are answered at once
        with TestClient(create_app(session)) as client:
            asked = time.perf_counter()
            assert client.post("/api/slice", json={"axis": 2, "index": 3}).status_code == 200
            assert client.get("/api/info").status_code == 200
            assert time.perf_counter() - asked < 0.3
        assert thread.is_alive()  # still computing
        newer = session.explain({**base, "methods": ["seg-grad-cam"]})
        thread.join(10)
    finally:
        object.__setattr__(get_method("seg-score-cam"), "options", original)
    assert outcome["first"] == "superseded" and outcome["seconds"] < 1.6
    assert newer["maps"][0]["method"] == "seg-grad-cam"
    # another page is not superseded by this one; a cancel answers 409 in the page's own
    with TestClient(create_app(session)) as client:
        other = client.post(
            "/api/explain", json={**base, "client": "tab-b", "methods": ["seg-grad-cam"]}
        )
        assert other.status_code == 200
        assert client.post("/api/cancel", json={"client": "tab-b"}).json() == {"cancelled": True}
    assert not any(m._forward_pre_hooks for m in session.model.modules())


def test_a_slice_change_waits_for_the_computing_maps_instead_of_cancelling_them():
    # every scroll superseded the running computation: nnU-Net's maps never came (issue 23)
    generator = torch.Generator().manual_seed(0)
    session = ViewerSession(
        model=Slow(0.0), inputs=torch.randn((1, *SHAPE), generator=generator),
        layers=["net.body.2"],
    )  # fmt: skip
    session.model.delay = 0.3  # Score-CAM, 4 channels one at a time: 1.2 s
    base = {"class": 1, "target": {"kind": "predicted"}, "axis": 2, "layer": "net.body.2",
            "client": "tab-a", "methods": ["seg-score-cam"]}  # fmt: skip
    from segcam.methods import get_method

    original = dict(get_method("seg-score-cam").options)
    answers, forwards = {}, []
    session.model.register_forward_pre_hook(lambda *_: forwards.append(1))

    def request(index):
        try:
            answers[index] = session.explain({**base, "index": index})
        except SupersededError:
            answers[index] = "superseded"

    try:
        object.__setattr__(get_method("seg-score-cam"), "options", {**original, "batch_size": 1})
        first = threading.Thread(target=request, args=(3,))
        first.start()
        time.sleep(0.4)
        scrolls = [threading.Thread(target=request, args=(k,)) for k in (4, 5)]
        for thread in scrolls:
            thread.start()
            time.sleep(0.1)
        for thread in [first, *scrolls]:
            thread.join(20)
    finally:
        object.__setattr__(get_method("seg-score-cam"), "options", original)
    assert all(isinstance(answers[k], dict) for k in (3, 4, 5)), answers
    assert len(forwards) <= 2 + 4 + 1  # the prediction, one Score-CAM run, one kept forward
    heat = session._cache["net.body.2", ("predicted", 1), "seg-score-cam"]["map"]
    for k in (3, 4, 5):
        shown = np.frombuffer(base64.b64decode(answers[k]["maps"][0]["data"]), "<f4")
        np.testing.assert_array_equal(
            shown.reshape(answers[k]["shape"]), session.grid.cut(heat, (2, k))
        )
    # a different request still supersedes
    other = threading.Thread(target=request, args=(6,))
    object.__setattr__(get_method("seg-score-cam"), "options", {**original, "batch_size": 1})
    try:
        session._cache.clear()
        other.start()
        time.sleep(0.4)
        newer = session.explain({**base, "index": 6, "methods": ["seg-grad-cam"]})
        other.join(20)
    finally:
        object.__setattr__(get_method("seg-score-cam"), "options", original)
    assert answers[6] == "superseded" and newer["maps"][0]["method"] == "seg-grad-cam"


def test_another_page_superseding_its_own_waiting_request_never_cancels_this_one():
    # a waiting request's check ran inside the running one's forwards: tab B's superseded
    # request cancelled tab A's (issue 23's review)
    generator = torch.Generator().manual_seed(0)
    session = ViewerSession(
        model=Slow(0.0), inputs=torch.randn((1, *SHAPE), generator=generator),
        layers=["net.body.2"],
    )  # fmt: skip
    session.model.delay = 0.3
    base = {"class": 1, "target": {"kind": "predicted"}, "axis": 2, "index": 3,
            "layer": "net.body.2"}  # fmt: skip
    from segcam.methods import get_method

    original = dict(get_method("seg-score-cam").options)
    outcome = {}

    def request(name, payload):
        try:
            session.explain(payload)
            outcome[name] = "answered"
        except SupersededError:
            outcome[name] = "superseded"

    try:
        object.__setattr__(get_method("seg-score-cam"), "options", {**original, "batch_size": 1})
        a = threading.Thread(
            target=request, args=("a", {**base, "client": "tab-a", "methods": ["seg-score-cam"]})
        )
        a.start()
        time.sleep(0.4)
        b1 = threading.Thread(
            target=request, args=("b1", {**base, "client": "tab-b", "methods": ["seg-grad-cam"]})
        )
        b1.start()
        time.sleep(0.1)
        b2 = threading.Thread(
            target=request,
            args=("b2", {**base, "client": "tab-b", "methods": ["seg-hires-grad-cam"]}),
        )
        b2.start()
        for thread in (a, b1, b2):
            thread.join(20)
    finally:
        object.__setattr__(get_method("seg-score-cam"), "options", original)
    assert outcome == {"a": "answered", "b1": "superseded", "b2": "answered"}


class Flattening(nn.Module):
    """A 3D network that calls .view on a convolution's output (needs contiguous tensors)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        features = self.conv(x)
        flat = features.view(features.shape[0], 4, -1)  # fails on channels-last tensors
        return self.head(flat.view_as(features))


@pytest.mark.parametrize("make", [lambda: tiny_segnet(3), Flattening])
def test_the_fast_forward_gives_explains_maps_and_leaves_the_model_as_it_was(make):
    torch.manual_seed(0)
    model = make().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randn((1, 8, 12, 10))
    layer = "body.2" if isinstance(model, type(tiny_segnet(3))) else "conv"
    session = ViewerSession(model=model, inputs=inputs, layers=[layer])
    shown = session.explain({"class": 1, "target": {"kind": "box", "start": [1, 2, 3],
                             "stop": [5, 8, 9]}, "axis": 0, "index": 3, "layer": layer,
                             "methods": ["seg-hires-grad-cam"]})  # fmt: skip
    expected = segcam.explain(model, inputs[None], segcam.Box(1, [(1, 5), (2, 8), (3, 9)]),
                              layer, "seg-hires-grad-cam").maps[0, 0].numpy()  # fmt: skip
    cut = session.plane(0).cut(expected, 3)
    np.testing.assert_allclose(unb64(shown["maps"][0]["data"], "<f4", cut.shape), cut,
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_an_export_records_the_shown_slice_and_its_plane():
    import json

    session = session_3d()
    box = {"kind": "box", "start": [1, 2, 3], "stop": [4, 6, 8]}
    body = {"class": 1, "target": box, "layer": session.default_layer,
            "method": "seg-grad-cam", "axis": 0, "index": 2}  # fmt: skip
    with TestClient(create_app(session)) as client:
        sidecar = json.loads(client.post("/api/export", json={**body, "format": "json"}).content)
        archive = client.post("/api/export", json={**body, "format": "nifti"})
    assert sidecar["view"] == {"axis": 0, "index": 2, "plane": "sagittal"}
    assert sidecar["target"] == {"kind": "box", "class_index": 1, "box": [[1, 4], [2, 6], [3, 8]]}
    image = nib.Nifti1Image.from_bytes(gzip.decompress(archive.content))
    np.testing.assert_allclose(image.affine, LPS)
    expected = segcam.explain(session.model, session.inputs[None],
                              segcam.Box(1, [(1, 4), (2, 6), (3, 8)]), session.default_layer,
                              "seg-grad-cam").maps[0, 0].numpy()  # fmt: skip
    np.testing.assert_allclose(np.asarray(image.dataobj), expected, rtol=1e-5, atol=1e-6)


def test_an_export_names_its_source_and_says_its_units_and_whole_words():
    import json

    from segcam.apps.viewer.exports import _description

    session = session_3d()
    session.provenance = {"source": "/data/case.nii.gz", "weights_sha256": "ab" * 32}
    layer = session.default_layer
    body = {"class": 1, "target": {"kind": "predicted"}, "layer": layer, "method": "seg-grad-cam"}
    with TestClient(create_app(session)) as client:
        sidecar = json.loads(client.post("/api/export", json={**body, "format": "json"}).content)
        archive = client.post("/api/export", json={**body, "format": "nifti"})
    assert sidecar["provenance"] == {"source": "/data/case.nii.gz", "weights_sha256": "ab" * 32}
    header = nib.Nifti1Image.from_bytes(gzip.decompress(archive.content)).header
    assert header.get_xyzt_units() == ("mm", "sec")  # was unset ("unknown")
    long = {"method": "seg-hires-grad-cam", "class": "left kidney", "target": {"kind": "uploaded"},
            "layer": "model.1.submodule.1.submodule.1.submodule.2.conv"}  # fmt: skip
    text = _description(long)
    assert len(text) <= 79 and text.endswith("...")
    kept = text[:-3]
    full = f"segcam seg-hires-grad-cam class=left kidney layer={long['layer']} target=uploaded"
    assert full.startswith(kept) and full[len(kept)] == " "  # cut between words, not in one


class _ColdFirst(nn.Module):
    """A network whose first forward is slow (a cold start), the next ones fast."""

    def __init__(self):
        super().__init__()
        self.body = tiny_segnet(3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.5 if self.calls == 1 else 0.0)
        return self.body(x)


def test_the_cost_estimate_uses_a_warm_forward():
    # the first, cold forward made Score-CAM's estimate 4x too high (issue 23)
    generator = torch.Generator().manual_seed(0)
    session = ViewerSession(
        model=_ColdFirst(), inputs=torch.randn((1, 6, 12, 10), generator=generator)
    )
    assert session.forward_seconds < 0.25  # the second forward's time, not the cold 0.5 s


# ---------------------------------------------------------------- signed maps, panels, statistics


def _panel_request(**extra):
    return {"class": 1, "target": {"kind": "box", "start": [1, 2, 3], "stop": [4, 8, 7]},
            "axis": 2, "index": 4, "client": "a", **extra}  # fmt: skip


def test_signed_maps_beside_the_relu_ones_and_a_panel_of_its_own_layer_and_class():
    session = session_3d()
    layers = session.menu.offered
    bounds = [(1, 4), (2, 8), (3, 7)]
    box = segcam.Box(1, bounds)
    panels = [
        {"method": "seg-grad-cam", "signed": True},
        {"method": "seg-hires-grad-cam", "layer": layers[0], "class": 2, "signed": True},
    ]
    answer = session.explain(_panel_request(layer=session.default_layer, panels=panels))
    shape = answer["shape"]
    inputs = session.inputs[None]
    expected = [
        (session.default_layer, box, "seg-grad-cam"),
        (layers[0], segcam.Box(2, bounds), "seg-hires-grad-cam"),
    ]
    for entry, (layer, target, method) in zip(answer["maps"], expected, strict=True):
        assert (entry["method"], entry["layer"]) == (method, layer)
        relu = segcam.explain(session.model, inputs, target, layer, method).maps[0, 0].numpy()
        raw = segcam.explain(session.model, inputs, target, layer, method, relu=False)
        signed = raw.maps[0, 0].numpy()  # up-sampled, no ReLU
        cut = session.plane(2).cut
        np.testing.assert_allclose(unb64(entry["data"], "<f4", shape), cut(relu, 4), atol=1e-6)
        np.testing.assert_allclose(unb64(entry["signed"], "<f4", shape), cut(signed, 4), atol=1e-6)
        assert entry["max"] == pytest.approx(float(relu.max()), rel=1e-6)
        layer_raw = segcam.explain(
            session.model, inputs, target, layer, method, relu=False, upsample=False
        ).maps  # at the layer's resolution: the up-sampled values lie between its extremes
        assert entry["min"] == pytest.approx(float(layer_raw.min()), rel=1e-6)
        assert entry["signed_max"] == pytest.approx(float(layer_raw.max()), rel=1e-6)
        assert layer_raw.min() <= signed.min() and signed.max() <= layer_raw.max()
        assert entry["slice_min"] == pytest.approx(float(cut(signed, 4).min()), rel=1e-6)
        assert entry["zero_share"] == pytest.approx(float((relu <= 0).mean()))
        assert entry["argmax"] == list(np.unravel_index(int(relu.argmax()), relu.shape))
        inside = float(relu[1:4, 2:8, 3:7].sum() / relu.sum())
        assert entry["inside"] == pytest.approx(inside, rel=1e-5)
    assert answer["maps"][1]["class"] == 2 and answer["maps"][0]["class"] == 1
    # unsigned panels carry no signed cut; the pixel set's statistics and per-slice profile
    plain = session.explain(_panel_request(methods=["seg-grad-cam"]))
    assert "signed" not in plain["maps"][0]
    volume_ml = 3 * 6 * 4 * (0.8 * 0.8 * 4.0) / 1000  # voxels x mm3 per voxel, in ml
    assert plain["stats"]["voxels"] == 3 * 6 * 4
    assert plain["stats"]["ml"] == pytest.approx(volume_ml)
    intensity = session.intensity[1:4, 2:8, 3:7].mean()
    assert plain["stats"]["mean_intensity"] == pytest.approx(float(intensity), rel=1e-5)
    profile = plain["profile"]
    assert profile["axis"] == 2 and profile["set"] == [0, 0, 0, 18, 18, 18, 18, 0, 0, 0]
    relu = segcam.explain(session.model, inputs, box, session.default_layer, "seg-grad-cam")
    np.testing.assert_allclose(profile["maps"][0], relu.maps[0, 0].sum(dim=(0, 1)), rtol=1e-5)


@pytest.mark.parametrize(
    "panels",
    [
        "x",
        [],
        [{"method": "nope"}],
        [{"method": "seg-grad-cam", "layer": 3}],
        [{"method": "seg-grad-cam", "layer": "no.such.layer"}],
        [{"method": "seg-grad-cam", "class": 9}],
        [{"method": "seg-grad-cam", "class": True}],
        [{"method": "seg-grad-cam", "signed": "yes"}],
        [{"method": "seg-grad-cam"}] * 3,
        [{"method": "seg-grad-cam", "colour": "red"}],
    ],
)
def test_bad_panels_are_refused_with_the_reason(panels):
    session = session_3d()
    with TestClient(create_app(session)) as client:
        answer = client.post("/api/explain", json=_panel_request(panels=panels))
        assert answer.status_code == 400 and answer.json()["error"]
        for odd in ({"with_slice": 1}, {"with_slice": "yes"}, {"signed": [1, 2]}):
            answer = client.post("/api/explain", json=_panel_request(**odd))
            assert answer.status_code == 400 and answer.json()["error"], odd


def test_a_signed_export_and_the_arrays_hold_the_signed_map():
    import io
    import json

    session = session_3d()
    request = _panel_request(method="seg-grad-cam", layer=session.default_layer)
    target = segcam.Box(1, [(1, 4), (2, 8), (3, 7)])
    raw = segcam.explain(
        session.model, session.inputs[None], target, session.default_layer, "seg-grad-cam",
        relu=False,
    ).maps[0, 0].numpy()  # fmt: skip
    with TestClient(create_app(session)) as client:
        nifti = client.post("/api/export", json={**request, "format": "nifti", "signed": True})
        arrays = client.post("/api/export", json={**request, "format": "npz"})
        sidecar = client.post("/api/export", json={**request, "format": "json", "signed": True})
        refused = client.post("/api/export", json={**request, "format": "nifti", "signed": 1})
    image = nib.Nifti1Image.from_bytes(gzip.decompress(nifti.content))
    np.testing.assert_allclose(np.asarray(image.dataobj), raw, atol=1e-6)
    # never the ReLU'd map's name or description: two downloads do not collide
    assert "__signed.nii.gz" in nifti.headers["content-disposition"]
    assert b"seg-grad-cam signed" in image.header["descrip"].tobytes()
    stored = np.load(io.BytesIO(arrays.content))
    np.testing.assert_allclose(stored["signed_map"], raw, atol=1e-6)
    np.testing.assert_allclose(stored["map"], np.maximum(stored["map"], 0))
    assert json.loads(sidecar.content)["map"] == "signed (no ReLU)"
    assert refused.status_code == 400


def test_the_pixel_set_exports_as_nifti_on_the_volume_s_grid():
    session = session_3d()
    request = _panel_request(method="seg-grad-cam", format="pixel_set")
    with TestClient(create_app(session)) as client:
        answer = client.post("/api/export", json=request)
    assert answer.status_code == 200
    assert "pixel_set__t0-box-class_1.nii.gz" in answer.headers["content-disposition"]
    image = nib.Nifti1Image.from_bytes(gzip.decompress(answer.content))
    expected = np.zeros(SHAPE)
    expected[1:4, 2:8, 3:7] = 1
    np.testing.assert_array_equal(np.asarray(image.dataobj), expected)
    np.testing.assert_allclose(image.affine, LPS)
