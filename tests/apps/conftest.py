"""Fixtures shared by the application tests."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update"]


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Chromium is missing: run `make browser` (apt-get install chromium)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        outside = []
        page.on(
            "request",
            lambda request: (
                outside.append(request.url)
                if not request.url.startswith("http://127.0.0.1")
                else None
            ),
        )
        yield page
        browser.close()
        assert outside == []  # the page never reaches beyond its own server
