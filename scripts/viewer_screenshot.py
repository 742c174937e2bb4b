"""The README's screenshot of the viewer: the 2D demo, predicted tumour, default methods.

.venv/bin/python scripts/viewer_screenshot.py [docs/viewer.png]
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from segcam.viewer.app import create_app
from segcam.viewer.serve import demo_session, free_port


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/viewer.png")
    session = demo_session("2d")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(session), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    args = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=args)
        page = browser.new_page(viewport={"width": 1360, "height": 560})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_function("() => segcamViewer.timings.length > 0")
        before = page.evaluate("() => segcamViewer.timings.length")
        page.select_option("#class", "2")
        page.wait_for_function(
            "n => segcamViewer.timings.length > n && !segcamViewer.busy", arg=before
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    server.should_exit = True
    thread.join(10)
    print(f"written {out}")


if __name__ == "__main__":
    main()
