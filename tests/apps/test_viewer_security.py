"""The served viewer answers only the user's own page: Host, token, content type, origin."""

from __future__ import annotations

import http.client
import io
import json
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from segcam.apps.viewer import ViewerSession
from segcam.apps.viewer.serve import serve_in_thread
from segcam.testing import tiny_segnet

pytestmark = pytest.mark.filterwarnings("ignore::segcam.errors.SegCamWarning")


@pytest.fixture(scope="module")
def viewer():
    generator = torch.Generator().manual_seed(0)
    session = ViewerSession(
        model=tiny_segnet(3), inputs=torch.randn((1, 6, 12, 10), generator=generator)
    )
    running = serve_in_thread(session)
    yield running
    running.stop()


def request(viewer, method, path, *, body=None, headers=None, token=True, host=None):
    parts = urlsplit(viewer.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    sent = {"Host": host or parts.netloc}
    if token:
        sent["X-Segcam-Token"] = viewer.token
    sent.update(headers or {})
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def test_the_own_page_is_served_with_locked_down_headers(viewer):
    status, headers, data = request(viewer, "GET", "/api/info")
    assert status == 200 and "classes" in json.loads(data)
    assert headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self';" in headers["content-security-policy"]  # no inline script
    assert "unsafe-inline" not in headers["content-security-policy"].split("style-src")[0]
    status, _, page = request(viewer, "GET", f"/?token={viewer.token}", token=False)
    assert status == 200 and b'<script src="viewer.js"></script>' in page
    assert page.count(b"<script") == 1  # the page holds no script of its own
    status, headers, script = request(viewer, "GET", "/viewer.js", token=False)
    assert status == 200 and b"X-Segcam-Token" in script  # no token needed: it holds no data
    assert headers["content-type"].startswith("text/javascript")
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    status, _, _ = request(viewer, "GET", "/viewer.js", token=False, headers={"Host": "evil:80"})
    assert status == 421  # but the Host check, as everywhere
    body = json.dumps({"class": 1, "target": {"kind": "predicted"}, "axis": 0, "index": 0})
    status, _, data = request(viewer, "POST", "/api/explain", body=body,
                              headers={"Content-Type": "application/json",
                                       "Origin": viewer.url.split("/?")[0],
                                       "Sec-Fetch-Site": "same-origin"})  # fmt: skip
    assert status == 200, data


def test_dns_rebinding_is_refused(viewer):
    status, _, data = request(viewer, "GET", "/api/info", host="evil.example.com")
    assert status == 421 and b"Host" in data
    port = urlsplit(viewer.url).port
    status, _, _ = request(viewer, "GET", "/api/info", host=f"evil.example.com:{port}")
    assert status == 421
    assert request(viewer, "GET", "/api/info", host=f"localhost:{port}")[0] == 200


def test_requests_without_the_token_are_refused(viewer):
    status, _, data = request(viewer, "GET", "/api/info", token=False)
    assert status == 403 and b"access token" in data
    assert request(viewer, "GET", "/", token=False)[0] == 403
    other = {"X-Segcam-Token": "x"}
    assert request(viewer, "GET", "/api/info", token=False, headers=other)[0] == 403
    body = json.dumps({"format": "npz", "method": "seg-grad-cam", "class": 1})
    wrong = {"Content-Type": "application/json", "X-Segcam-Token": "wrong"}
    status, _, _ = request(viewer, "POST", "/api/export", body=body, headers=wrong, token=False)
    assert status == 403


def test_cross_site_posts_are_refused(viewer):
    body = json.dumps({"class": 1})
    status, _, data = request(viewer, "POST", "/api/explain", body=body,
                              headers={"Content-Type": "text/plain"})  # fmt: skip
    assert status == 415 and b"application/json" in data
    status, _, _ = request(viewer, "POST", "/api/explain", body=body,
                           headers={"Content-Type": "application/json",
                                    "Origin": "http://evil.example.com"})  # fmt: skip
    assert status == 403
    status, _, _ = request(viewer, "POST", "/api/explain", body=body,
                           headers={"Content-Type": "application/json",
                                    "Sec-Fetch-Site": "cross-site"})  # fmt: skip
    assert status == 403
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, _ = request(viewer, "POST", "/api/upload", body=b"\x93NUMPY", headers=form)
    assert status == 415


def test_bombs_and_odd_bodies_are_400_before_any_allocation(viewer):
    import io

    import numpy as np

    octet = {"Content-Type": "application/octet-stream"}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f8", "fortran_order": False, "shape": (2**40, 2**20)}
    )
    bomb = b"\x93NUMPY\x01\x00" + header.getvalue()[8:]
    status, _, data = request(viewer, "POST", "/api/upload", body=bomb, headers=octet)
    assert status == 400 and b"has shape (1099511627776, 1048576)" in data
    from PIL import Image

    png = io.BytesIO()
    Image.new("1", (20000, 8000)).save(png, format="PNG")  # 160 megapixels, a few kB
    status, _, data = request(viewer, "POST", "/api/upload", body=png.getvalue(), headers=octet)
    assert status == 400 and b"has shape (8000, 20000)" in data
    json_type = {"Content-Type": "application/json"}
    nested = b"[" * 100_000 + b"]" * 100_000
    assert request(viewer, "POST", "/api/explain", body=nested, headers=json_type)[0] == 400
    body = json.dumps({"class": 1, "methods": [["a"]]})
    status, _, data = request(viewer, "POST", "/api/explain", body=body, headers=json_type)
    assert status == 400 and b"unknown method" in data


def test_segcam_view_bad_input_is_one_line_before_loading(tmp_path, capsys):
    import socket

    import numpy as np
    from PIL import Image

    from segcam.apps.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["view", "--port", str(port), "--no-browser"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(png)
    code = main(["view", str(png), "--model", "segcam.apps.demo.models:build_liver_model",
                 "--model-kwargs", '{"which": "3d"}', "--no-browser"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "does not fit the model" in err and "Conv3d" in err
    assert len(err.strip().splitlines()) == 1


def test_segcam_view_ground_truth_is_checked_before_serving(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from segcam.apps.cli import main

    png = tmp_path / "slice.png"
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8)).save(png)
    model = ["--model", "segcam.apps.demo.models:build_liver_model", "--model-kwargs",
             '{"which": "2d"}', "--no-browser"]  # fmt: skip
    fractions = tmp_path / "fractions.npy"
    np.save(fractions, np.full((64, 64), 0.5, dtype=np.float32))
    wrong = tmp_path / "wrong.png"
    Image.fromarray(np.zeros((32, 64), dtype=np.uint8)).save(wrong)
    cases = [
        (["view", "--ground-truth", str(png), "--no-browser"], "needs an INPUT"),
        (["view", str(png), *model, "--ground-truth", str(tmp_path / "none.png")], "no such file"),
        (["view", str(png), *model, "--ground-truth", str(fractions)], "not labels"),
        (["view", str(png), *model, "--ground-truth", str(wrong)], "shape (32, 64)"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_bodies_are_400_with_the_reason_and_every_answer_has_the_headers(viewer):
    # these answered 500 (issue 23)
    json_type = {"Content-Type": "application/json"}
    for body, reason in (
        (b'{"class": "\xff\xfe"}', "not UTF-8 text"),
        (b'{"class": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"[" * 100_000, "nested too deeply"),
    ):
        status, headers, data = request(
            viewer, "POST", "/api/explain", body=body, headers=json_type
        )
        assert status == 400 and reason in json.loads(data)["error"], data[:200]
    octet = {"Content-Type": "application/octet-stream"}
    for array, reason in (
        (np.full((6, 12, 10), np.nan + 1j), "not real numbers"),
        (np.zeros((6, 12, 10), np.uint8), "is empty"),
    ):
        stream = io.BytesIO()
        np.save(stream, array)
        status, _, data = request(viewer, "POST", "/api/upload", body=stream.getvalue(),
                                  headers=octet)  # fmt: skip
        assert status == 400 and reason in json.loads(data)["error"]
    for method, path in (("GET", "/no/such/page"), ("GET", "/api/explain"), ("PUT", "/")):
        status, headers, _ = request(viewer, method, path)
        assert status in (404, 405)
        assert headers["x-frame-options"] == "DENY" and "content-security-policy" in headers
        assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_a_wildcard_host_is_refused_saying_why(host, capsys):
    # it said "anyone can use the viewer" while every request got 421 (issue 23)
    from segcam.apps.cli import main

    assert main(["view", "--host", host, "--no-browser"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--host {host} listens on every interface" in err
    assert "give this machine's own address" in err
