"""How long a new pixel set takes to reach the screen in the viewer, on the demo CT.

    .venv/bin/python benchmarks/bench_viewer.py [--count 40] [--only 2d,3d,nnunet]

Starts the viewer (2D: held-out axial slice 68, 128 x 128, 2D UNet; 3D: the 128^3 volume, 3D
UNet; nnunet: the held-out slab, 128 x 128 x 24, through the demo nnU-Net model's windows and
mirrorings, when nnunetv2 is installed), drives it in headless Chromium, and draws random boxes
of the tumour/liver classes at
the default layer (last decoder) with the two default methods side by side; in 3D the boxes are
slabs 1 to 8 slices deep through the shown slice. The time of an
update is the page's own: from sending the request to the end of drawing both maps (fetch,
decode, colour, draw), as ``segcamViewer.timings`` records it; the server's share is reported
too. Also the first update after switching the layer (a new forward pass), and for nnU-Net
the start-up (session built: model loaded, case read and predicted) and the first map.
Writes benchmarks/results/viewer.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import random
import shutil
import statistics
import time
import warnings
from pathlib import Path

import torch

from segcam.apps.demo.models import DEMO_LAYERS
from segcam.apps.viewer.serve import demo_session, serve_in_thread

RESULTS = Path(__file__).resolve().parent / "results"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


SWITCH_TO = {"2d": DEMO_LAYERS["middle decoder"], "3d": DEMO_LAYERS["middle decoder"],
             "nnunet": "decoder.stages.1"}  # fmt: skip


def measure(which, count, page_factory):
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nnU-Net's notes on CPU devices
        session = demo_session(which)
    startup = time.perf_counter() - started
    viewer = serve_in_thread(session)
    page = page_factory()
    try:
        page.goto(viewer.url)
        page.wait_for_function("() => segcamViewer.timings.length > 0", timeout=300_000)
        first_map = page.evaluate("() => segcamViewer.timings[0]")
        page.select_option("#mode", "box")
        rng = random.Random(0)
        shape = session.spatial
        screen, server_ms = [], []
        for k in range(count):
            start = [rng.randrange(0, s - 16) for s in shape]
            stop = [a + rng.randrange(4, 16) for a in start]
            if which != "2d":  # a slab box through the shown axial slice, 1 to 8 slices deep
                index = int(page.evaluate("() => Number(document.getElementById('slice').value)"))
                depth = rng.randrange(1, 9)
                start[2], stop[2] = index - depth // 2, index - depth // 2 + depth
            before = page.evaluate("() => segcamViewer.timings.length")
            page.evaluate(
                "([box, c]) => { segcamViewer.box = box; "
                "document.getElementById('class').value = c; explain(); }",
                [[start, stop], 1 + k % 2],
            )
            page.wait_for_function(
                "n => segcamViewer.timings.length > n && !segcamViewer.busy", arg=before
            )
            screen.append(page.evaluate("() => segcamViewer.timings.at(-1)"))
            server_ms.append(page.evaluate("() => segcamViewer.result.milliseconds"))
        before = page.evaluate("() => segcamViewer.timings.length")
        page.select_option("#layer", SWITCH_TO[which])
        page.wait_for_function(
            "n => segcamViewer.timings.length > n && !segcamViewer.busy",
            arg=before,
            timeout=300_000,
        )
        switch = page.evaluate("() => segcamViewer.timings.at(-1)")
    finally:
        page.close()
        viewer.stop()
        session.close()
    row = {
        "case": f"demo {which}: {'x'.join(map(str, session.spatial))}",
        "updates": count,
        "screen_ms_p50": statistics.median(screen),
        "screen_ms_p95": percentile(screen, 0.95),
        "server_ms_p50": statistics.median(server_ms),
        "server_ms_p95": percentile(server_ms, 0.95),
        "layer_switch_ms": switch,
        "startup_s": startup,
        "first_map_ms": first_map,
    }
    print(
        f"{row['case']:26s} new pixel set on screen: p50 {row['screen_ms_p50']:7.1f} ms, "
        f"p95 {row['screen_ms_p95']:7.1f} ms (server p50 {row['server_ms_p50']:.1f} ms); "
        f"layer switch (new forward) {switch:.0f} ms; start-up {startup:.1f} s, "
        f"first map {first_map:.0f} ms",
        flush=True,
    )
    return row


def main():
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--only", default="2d,3d,nnunet", help="which cases, comma-separated")
    args = parser.parse_args()
    cases = args.only.split(",")
    if "nnunet" in cases and importlib.util.find_spec("nnunetv2") is None:
        print("nnunetv2 is not installed: the nnU-Net case is left out")
        cases.remove("nnunet")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=ARGS)

        def page_factory():
            return browser.new_page(viewport={"width": 1500, "height": 900})

        counts = {"2d": args.count, "3d": args.count // 2, "nnunet": args.count // 2}
        rows = [measure(which, counts[which], page_factory) for which in cases]
        browser.close()
    RESULTS.mkdir(exist_ok=True)
    result = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "rows": rows,
    }
    (RESULTS / "viewer.json").write_text(json.dumps(result, indent=1))
    print(f"written {RESULTS / 'viewer.json'}")


if __name__ == "__main__":
    main()
