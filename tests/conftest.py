"""The suite's fixtures and settings (references: references.py; peers: harness.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, settings

# Under pytest-xdist each worker gets one core; more torch threads than cores thrash.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile(
    "segcam", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
# CI runs the same examples every time: a red build then always means a real regression.
settings.register_profile("segcam-ci", parent=settings.get_profile("segcam"), derandomize=True)
# Many more examples, for a hunt: pytest --hypothesis-profile=segcam-stress
settings.register_profile("segcam-stress", parent=settings.get_profile("segcam"), max_examples=400)
settings.load_profile("segcam-ci" if os.environ.get("CI") else "segcam")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


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
