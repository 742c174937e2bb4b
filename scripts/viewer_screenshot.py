"""The documentation's screenshot of the viewer: the 3D demo CT at axial slice 68, the predicted
tumour, Seg-Grad CAM signed (left) beside Seg-HiRes-Grad CAM (right).

.venv/bin/python scripts/viewer_screenshot.py docs/viewer.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from segcam.apps.viewer.serve import demo_session, serve_in_thread


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: scripts/viewer_screenshot.py OUT.png")
    out = Path(sys.argv[1])
    session = demo_session("3d")
    viewer = serve_in_thread(session)
    args = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=args)
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        page.goto(viewer.url)
        page.wait_for_function("() => segcamViewer.timings.length > 0 && !segcamViewer.busy")
        for selector, value in (("#class", "2"), ("#show0", "signed")):
            before = page.evaluate("() => segcamViewer.timings.length")
            page.select_option(selector, value)
            page.wait_for_function(
                "n => segcamViewer.timings.length > n && !segcamViewer.busy", arg=before
            )
        page.evaluate("() => setSlice(68)")
        page.wait_for_function("() => segcamViewer.sliceIndex === 68 && !segcamViewer.busy")
        box = page.locator("#view1").bounding_box()  # the read-out of a voxel in the tumour
        page.mouse.move(box["x"] + box["width"] * 0.42, box["y"] + box["height"] * 0.33)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()
    viewer.stop()
    print(f"written {out}")


if __name__ == "__main__":
    main()
