"""The documentation's screenshot of the viewer: the 2D demo, predicted tumour, default methods.

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
    session = demo_session("2d")
    viewer = serve_in_thread(session)
    args = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=args)
        page = browser.new_page(viewport={"width": 1360, "height": 560})
        page.goto(viewer.url)
        page.wait_for_function("() => segcamViewer.timings.length > 0")
        before = page.evaluate("() => segcamViewer.timings.length")
        page.select_option("#class", "2")
        page.wait_for_function(
            "n => segcamViewer.timings.length > n && !segcamViewer.busy", arg=before
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    viewer.stop()
    print(f"written {out}")


if __name__ == "__main__":
    main()
