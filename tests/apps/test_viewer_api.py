"""The viewer's JSON API: maps equal segcam.explain, bad requests refused, server unharmed."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import torch
from starlette.testclient import TestClient

import segcam
from segcam.apps.demo.models import WEIGHTS_DIR, load_demo_model
from segcam.apps.viewer import ViewerSession
from segcam.apps.viewer.app import create_app
from segcam.testing import tiny_segnet
from segcam.testing.synthetic import shapes_scene

pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")
LAYER = "model.1.submodule.2"
OCTET = {"Content-Type": "application/octet-stream"}
JSON_TYPE = {"Content-Type": "application/json"}


def session_2d():
    image, _ = shapes_scene(1_000_009)
    inputs = torch.from_numpy(image.astype(np.float32))
    return ViewerSession(
        model=load_demo_model(),
        inputs=inputs,
        class_names=["background", "disk", "square"],
        layers=["model.1.submodule", LAYER],
        default_layer=LAYER,
    )


def session_3d():
    generator = torch.Generator().manual_seed(0)
    return ViewerSession(
        model=tiny_segnet(3), inputs=torch.randn((1, 6, 12, 10), generator=generator)
    )


@pytest.fixture
def client_2d():
    session = session_2d()
    with TestClient(create_app(session)) as client:
        yield client, session


def maps_of(response):
    shape = response["shape"]
    return {
        entry["method"]: np.frombuffer(base64.b64decode(entry["data"]), "<f4").reshape(shape)
        for entry in response["maps"]
    }


def test_page_and_info(client_2d):
    client, _ = client_2d
    page = client.get("/")
    assert page.status_code == 200 and "segcam" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside
    info = client.get("/api/info").json()
    assert info["dims"] == 2 and info["shape"] == [64, 64]
    assert info["classes"] == ["background", "disk", "square"]
    assert [layer["name"] for layer in info["layers"]] == ["model.1.submodule", LAYER]
    assert info["default_methods"] == ["seg-grad-cam", "seg-hires-grad-cam"]
    assert {m["name"] for m in info["methods"]} == set(segcam.list_methods())


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ({"kind": "predicted"}, segcam.Predicted(2)),
        ({"kind": "box", "start": [10, 20], "stop": [30, 41]}, segcam.Box(2, [(10, 30), (20, 41)])),
        ({"kind": "pixel", "index": [33, 7]}, segcam.Pixel(2, (33, 7))),
    ],
)
def test_maps_equal_explain(client_2d, spec, target):
    client, session = client_2d
    body = {
        "class": 2,
        "target": spec,
        "layer": LAYER,
        "methods": ["seg-grad-cam", "seg-hires-grad-cam"],
    }
    response = client.post("/api/explain", json=body)
    assert response.status_code == 200, response.text
    shown = maps_of(response.json())
    for method in body["methods"]:
        expected = segcam.explain(session.model, session.inputs[None], target, LAYER, method)
        np.testing.assert_allclose(shown[method], expected.maps[0, 0].numpy(), rtol=1e-5, atol=1e-6)
        entry = next(e for e in response.json()["maps"] if e["method"] == method)
        assert entry["max"] == pytest.approx(float(expected.maps.max()), rel=1e-6)


def test_painted_mask_and_upload(client_2d):
    client, session = client_2d
    painted = np.zeros((64, 64), dtype=np.uint8)
    painted[5:15, 40:60] = 1
    data = base64.b64encode(painted.tobytes()).decode()
    shown = client.post(
        "/api/explain", json={"class": 1, "target": {"kind": "mask", "data": data}}
    ).json()
    expected = segcam.explain(
        session.model,
        session.inputs[None],
        segcam.Mask(1, painted.astype(bool)),
        LAYER,
        "seg-hires-grad-cam",
    )
    np.testing.assert_allclose(
        maps_of(shown)["seg-hires-grad-cam"], expected.maps[0, 0], rtol=1e-5, atol=1e-6
    )
    assert shown["pixels"] == 200
    stream = io.BytesIO()
    np.save(stream, painted)
    assert client.post("/api/upload", content=stream.getvalue(), headers=OCTET).json() == {
        "pixels": 200,
        "extent": [[5, 14], [40, 59]],
    }
    uploaded = client.post("/api/explain", json={"class": 1, "target": {"kind": "uploaded"}}).json()
    np.testing.assert_array_equal(
        maps_of(uploaded)["seg-hires-grad-cam"], maps_of(shown)["seg-hires-grad-cam"]
    )


def test_bad_requests_are_refused_and_the_server_goes_on(client_2d):
    client, session = client_2d
    bad = [
        ({"class": 3}, "class 3 is out of range"),
        ({"class": -1}, "class -1 is out of range"),
        ({"class": "1"}, "class must be an integer"),
        ({"class": 1, "layer": "model.9"}, "unknown layer 'model.9'"),
        ({"class": 1, "methods": ["grad-cam"]}, "unknown method 'grad-cam'"),
        ({"class": 1, "target": {"kind": "pixel", "index": [64, 0]}}, "outside the image"),
        ({"class": 1, "target": {"kind": "pixel", "index": [1]}}, "list of 2 integers"),
        (
            {"class": 1, "target": {"kind": "box", "start": [0, 0], "stop": [65, 3]}},
            "outside the image",
        ),
        (
            {"class": 1, "target": {"kind": "box", "start": [5, 5], "stop": [5, 9]}},
            "the box is empty",
        ),
        ({"class": 1, "target": {"kind": "mask", "data": "AAAA"}}, "the painted mask has 3 pixels"),
        ({"class": 1, "target": {"kind": "uploaded"}}, "no mask was uploaded"),
        ({"class": 1, "target": {"kind": "lasso"}}, "unknown target kind 'lasso'"),
    ]
    for body, message in bad:
        response = client.post("/api/explain", json=body)
        assert response.status_code == 400, body
        assert message in response.json()["error"], (body, response.json())
    assert client.post("/api/explain", content=b"{not json", headers=JSON_TYPE).status_code == 400
    assert (
        client.post("/api/explain", content=b"[1, 2]", headers=JSON_TYPE)
        .json()["error"]
        .startswith("the request")
    )
    refused = client.post("/api/export", json={"format": "png", "method": "x"}).json()
    assert "unknown method 'x'" in refused["error"]
    # oversized and wrong-type uploads
    session.max_upload_bytes = 1000
    response = client.post("/api/upload", content=b"\x93NUMPY" + b"0" * 2000, headers=OCTET)
    assert response.status_code == 413 and "over the limit of 1000" in response.json()["error"]
    assert (
        "a .npy array, a PNG image or a NIfTI volume"
        in client.post("/api/upload", content=b"GIF89a...", headers=OCTET).json()["error"]
    )
    stream = io.BytesIO()
    np.save(stream, np.zeros((3, 3)))
    assert (
        "has shape (3, 3)"
        in client.post("/api/upload", content=stream.getvalue(), headers=OCTET).json()["error"]
    )
    # still serving
    assert client.post("/api/explain", json={"class": 1}).status_code == 200


def test_export_formats(client_2d):
    """Exports name what they are of: computed from the request, not the server's last result."""
    client, session = client_2d
    shown = {"class": 2, "target": {"kind": "predicted"}, "layer": LAYER}
    client.post("/api/explain", json={"class": 1, "target": {"kind": "predicted"}})  # another tab
    png = client.post(
        "/api/export", json={**shown, "format": "png", "method": "seg-hires-grad-cam"}
    )
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    picture = Image.open(io.BytesIO(png.content))
    assert picture.size[0] > 64 and picture.size[1] == 64  # the overlay and its colour bar
    response = client.post("/api/export", json={**shown, "format": "npz", "method": "seg-grad-cam"})
    assert "square" in response.headers["content-disposition"]
    arrays = np.load(io.BytesIO(response.content))
    expected = segcam.explain(
        session.model, session.inputs[None], segcam.Predicted(2), LAYER, "seg-grad-cam"
    )
    np.testing.assert_allclose(arrays["map"], expected.maps[0, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(arrays["pixel_set"], expected.pixel_sets[0, 0])
    metadata = json.loads(str(arrays["metadata"]))
    assert metadata["class"] == "square" and metadata["method"] == "seg-grad-cam"
    assert metadata["layer"] == LAYER and metadata["target"] == {"kind": "predicted",
                                                                  "class_index": 2}  # fmt: skip
    sidecar = client.post("/api/export", json={**shown, "format": "json", "method": "seg-grad-cam"})
    assert sidecar.json()["pixels"] == int(expected.pixel_sets[0, 0].sum())
    nifti = client.post("/api/export", json={**shown, "format": "nifti", "method": "seg-grad-cam"})
    assert "3D volumes" in nifti.json()["error"]


def test_3d_slices_and_nifti():
    session = session_3d()
    with TestClient(create_app(session)) as client:
        info = client.get("/api/info").json()
        assert info["dims"] == 3 and len(info["axes"]) == 3
        for axis, size in enumerate((6, 12, 10)):
            cut = client.post("/api/slice", json={"axis": axis, "index": size - 1}).json()
            assert cut["shape"] == [s for a, s in enumerate((6, 12, 10)) if a != axis]
        assert (
            "out of range"
            in client.post("/api/slice", json={"axis": 1, "index": 12}).json()["error"]
        )
        assert (
            "axis 3 is out of range"
            in client.post("/api/slice", json={"axis": 3, "index": 0}).json()["error"]
        )
        box = {"kind": "box", "start": [1, 2, 3], "stop": [4, 9, 8]}
        full = (
            segcam.explain(
                session.model,
                session.inputs[None],
                segcam.Box(1, [(1, 4), (2, 9), (3, 8)]),
                session.default_layer,
                "seg-hires-grad-cam",
            )
            .maps[0, 0]
            .numpy()
        )
        for axis in range(3):
            response = client.post(
                "/api/explain", json={"class": 1, "target": box, "axis": axis, "index": 2}
            ).json()
            np.testing.assert_allclose(
                maps_of(response)["seg-hires-grad-cam"],
                np.take(full, 2, axis=axis),
                rtol=1e-5,
                atol=1e-6,
            )
        response = client.post(
            "/api/export",
            json={"class": 1, "target": box, "format": "nifti", "method": "seg-hires-grad-cam"},
        )
        assert response.headers["content-disposition"].endswith('.nii.gz"')
        import gzip

        import nibabel

        image = nibabel.Nifti1Image.from_bytes(gzip.decompress(response.content))
        np.testing.assert_allclose(np.asarray(image.dataobj), full, rtol=1e-6)
        description = image.header["descrip"].item().decode()
        assert description.startswith("segcam seg-hires-grad-cam class=class 1 layer=")
        assert description.endswith("target=box")
        # a brush stroke on a slice
        painted = np.zeros((6, 10), dtype=np.uint8)
        painted[2:4, 3:7] = 1
        data = base64.b64encode(painted.tobytes()).decode()
        response = client.post(
            "/api/explain",
            json={
                "class": 2,
                "axis": 1,
                "index": 5,
                "target": {"kind": "mask", "data": data, "axis": 1, "index": 5},
            },
        ).json()
        mask = np.zeros((6, 12, 10), dtype=bool)
        mask[:, 5, :] = painted.astype(bool)
        expected = segcam.explain(
            session.model,
            session.inputs[None],
            segcam.Mask(2, mask),
            session.default_layer,
            "seg-grad-cam",
        )
        np.testing.assert_allclose(
            maps_of(response)["seg-grad-cam"],
            expected.maps[0, 0, :, 5].numpy(),
            rtol=1e-5,
            atol=1e-6,
        )
        assert response["pixels"] == 8


def test_segcam_view_serves_a_file_and_stops(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    image, _ = shapes_scene(1_000_008)
    path = tmp_path / "scene.npy"
    np.save(path, image[0])
    weights = WEIGHTS_DIR / "synthetic_unet2d.pt"
    command = [
        sys.executable,
        "-m",
        "segcam.apps.cli",
        "view",
        str(path),
        "--model",
        "segcam.apps.demo.models:build_demo_model",
        "--weights",
        str(weights),
        "--classes",
        "bg,disk,square",
        "--layer",
        LAYER,
        "--no-browser",
        "--host",
        "localhost",
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("segcam viewer: http://localhost:"), line
        address = line.split()[2]
        base, _, token = address.partition("/?token=")
        assert len(token) >= 32  # the session's access token, printed once
        with urllib.request.urlopen(f"{base}/api/info?token={token}", timeout=30) as response:
            info = json.loads(response.read())
        assert info["classes"] == ["bg", "disk", "square"] and info["shape"] == [64, 64]
        assert info["title"] == "scene.npy"
        asked = json.dumps({"class": 1, "method": "seg-grad-cam", "format": "json"}).encode()
        exported = urllib.request.Request(
            f"{base}/api/export", data=asked, method="POST",
            headers={"Content-Type": "application/json", "X-Segcam-Token": token},
        )  # fmt: skip
        with urllib.request.urlopen(exported, timeout=60) as response:
            provenance = json.loads(response.read())["provenance"]
        from segcam.apps.specs import file_sha256

        assert provenance["source"] == str(path.resolve())  # every export names its source
        assert provenance["weights_sha256"] == file_sha256(weights)
        assert provenance["model"] == "segcam.apps.demo.models:build_demo_model"
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a hang is a bug to find: every thread's stack
            process.send_signal(signal.SIGABRT)  # faulthandler prints them
            _, stacks = process.communicate(timeout=30)
            raise AssertionError(f"segcam view did not stop on SIGINT:\n{stacks}") from None
    assert process.returncode == 130
    assert process.stderr is not None and process.stderr.read() == "segcam: interrupted\n"
    # a missing input is one clear line
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "segcam.apps.cli",
            "view",
            str(tmp_path / "nope.npy"),
            "--no-browser",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "nope.npy: no such file" in run.stderr


def test_sliding_window_session():
    image, _ = shapes_scene(1_000_010)
    inputs = torch.from_numpy(image.astype(np.float32))
    window = {"roi_size": 32, "overlap": 0.5}
    session = ViewerSession(
        model=load_demo_model(), inputs=inputs, layers=[LAYER], sliding_window=window
    )
    with TestClient(create_app(session)) as client:
        info = client.get("/api/info").json()
        assert info["sliding_window"] == window and info["layers"][0]["shape"] == [1, 16, 16, 16]
        body = {"class": 1, "target": {"kind": "box", "start": [3, 5], "stop": [20, 30]}}
        shown = maps_of(client.post("/api/explain", json=body).json())
        for method in ("seg-grad-cam", "seg-hires-grad-cam"):
            expected = segcam.explain_sliding_window(
                session.model,
                inputs[None],
                segcam.Box(1, [(3, 20), (5, 30)]),
                LAYER,
                method=method,
                **window,
            )
            np.testing.assert_allclose(shown[method], expected.maps[0, 0], rtol=1e-5, atol=1e-6)
        refused = client.post("/api/explain", json={**body, "methods": ["seg-score-cam"]})
        assert refused.status_code == 400 and "gradient-free" in refused.json()["error"]


def test_offered_layers_skip_norms_dropouts_and_activations():
    from monai.networks.nets import UNet

    model = UNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1,
                 dropout=0.1).eval()  # fmt: skip
    session = ViewerSession(model=model, inputs=torch.zeros((1, 32, 32)))
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    offered = [entry["name"] for entry in session.info()["layers"]]
    assert offered and session.default_layer in offered
    assert not [n for n in offered if kinds[n] in ("InstanceNorm2d", "Dropout", "PReLU", "ADN")]
    # a wrapper's child returning the very same tensor is not offered twice
    assert "model.0.conv.unit0" not in offered and "model.0.conv" in offered
    labels = {entry["name"]: entry["label"] for entry in session.info()["layers"]}
    assert labels["model.0"] == "encoder 1 #4" and labels["model.1"] == "decoder 1 #5"
    assert labels["model.1.submodule.1"].startswith("bottleneck")
    # the default is the last decoder block at the finest decoder grid
    assert session.default_layer == "model.1"
    hidden = {e["name"]: e["hidden"] for e in session.info()["all_layers"]}
    assert hidden["model.0.conv.unit0.adn.N"] is True


def test_the_demo_session_labels_its_layers_by_depth():
    from segcam.apps.demo.models import DEMO_LAYERS
    from segcam.apps.viewer.serve import demo_session

    labels = {e["name"]: e["label"] for e in demo_session("2d").info()["layers"]}
    assert labels == {name: depth for depth, name in DEMO_LAYERS.items()}


def test_ctrl_c_stops_the_viewer_at_once_during_a_long_request():
    """Ctrl+C during a minute-long 3D Score-CAM: exit 130 within a second, one line."""
    import contextlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    import urllib.request

    process = subprocess.Popen(
        [sys.executable, "-m", "segcam.apps.cli", "view", "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert process.stdout is not None and process.stderr is not None
        base, _, token = process.stdout.readline().split()[2].partition("/?token=")
        with urllib.request.urlopen(f"{base}/api/info?token={token}", timeout=60) as response:
            info = json.loads(response.read())
        bottleneck = info["layers"][0]["name"]
        body = json.dumps({"class": 1, "target": {"kind": "predicted"}, "axis": 2, "index": 64,
                           "layer": bottleneck, "methods": ["seg-score-cam"]})  # fmt: skip
        headers = {"Content-Type": "application/json", "X-Segcam-Token": token}
        request = urllib.request.Request(f"{base}/api/explain", body.encode(), headers)

        def post():
            with contextlib.suppress(OSError):  # the server goes away mid-request
                urllib.request.urlopen(request, timeout=300).read()

        threading.Thread(target=post, daemon=True).start()
        time.sleep(2)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
        assert time.monotonic() - started < 1.5
        assert process.stderr.read() == "segcam: interrupted\n"
    finally:
        process.kill()
        process.wait()


def test_an_export_of_a_class_named_outside_ascii_downloads(tmp_path):
    # the file name reaches an HTTP header: it is ASCII whatever the class is called
    image, _ = shapes_scene(1_000_009)
    session = ViewerSession(
        model=load_demo_model(),
        inputs=torch.from_numpy(image.astype(np.float32)),
        class_names=["bg", "肝臓", "Tümör<b>/x"],
        layers=[LAYER],
        default_layer=LAYER,
    )
    with TestClient(create_app(session)) as client:
        for c in (1, 2):
            shown = {"class": c, "target": {"kind": "predicted"}, "layer": LAYER}
            response = client.post(
                "/api/export", json={**shown, "format": "json", "method": "seg-grad-cam"}
            )
            assert response.status_code == 200
            disposition = response.headers["content-disposition"]
            assert disposition.isascii() and "/" not in disposition.split("filename=")[1]
            assert response.json()["class"] == session.class_names[c]  # the real name kept


def test_an_uploaded_label_map_gives_each_class_its_own_pixels(client_2d):
    # a ground truth uploaded once: each request's class takes its label's pixels (issue 22)
    client, _ = client_2d
    labels = np.zeros((64, 64), dtype=np.uint8)
    labels[5:15, 40:60] = 1
    labels[30:34, 10:12] = 2
    stream = io.BytesIO()
    np.save(stream, labels)
    answer = client.post("/api/upload", content=stream.getvalue(), headers=OCTET).json()
    assert answer["pixels"] == 200 + 8  # every labelled pixel lies in the upload
    for c, count in ((1, 200), (2, 8)):
        shown = client.post("/api/explain", json={"class": c, "target": {"kind": "uploaded"}})
        assert shown.json()["pixels"] == count


def _npy(array):
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def test_each_page_keeps_its_own_upload_and_maps_follow_the_content(client_2d):
    # tabs shared one upload, and cached maps were keyed by id() of the array (issue 23)
    client, _ = client_2d
    a = np.zeros((64, 64), np.uint8)
    a[5:15, 40:60] = 1
    b = np.zeros((64, 64), np.uint8)
    b[30:34, 10:12] = 1
    for page, mask in (("tab-a", a), ("tab-b", b)):
        answer = client.post(f"/api/upload?client={page}", content=_npy(mask), headers=OCTET)
        assert answer.status_code == 200, answer.text
    asked = {"class": 1, "target": {"kind": "uploaded"}}
    shown_a = client.post("/api/explain", json={**asked, "client": "tab-a"}).json()
    shown_b = client.post("/api/explain", json={**asked, "client": "tab-b"}).json()
    assert (shown_a["pixels"], shown_b["pixels"]) == (200, 8)  # B's upload did not replace A's
    nobody = client.post("/api/explain", json={**asked, "client": "tab-c"})
    assert nobody.status_code == 400 and "no mask was uploaded from this page" in nobody.text
    for _ in range(3):  # new content under one page: new maps each time, never a cached old one
        for mask, count in ((b, 8), (a, 200)):
            client.post("/api/upload?client=tab-a", content=_npy(mask.copy()), headers=OCTET)
            again = client.post("/api/explain", json={**asked, "client": "tab-a"}).json()
            assert again["pixels"] == count
    exported = client.post("/api/export", json={**asked, "client": "tab-b", "format": "npz",
                                                "method": "seg-hires-grad-cam"})  # fmt: skip
    assert exported.status_code == 200
    with np.load(io.BytesIO(exported.content)) as arrays:
        assert int(arrays["pixel_set"].sum()) == 8  # tab B's own set, whatever A uploaded
