"""The documentation's runnable parts: the how-to examples run as written; its pages exist."""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


@pytest.mark.parametrize(
    ("example", "expected"),
    [
        ("custom_method.py", ["refused before the forward pass", "registered: seg-power-cam"]),
        ("custom_target.py", ["map equals (y - b) on the ring", "4 of 9 took a backward pass"]),
    ],
)
def test_how_to_example_runs(example, expected):
    # a fresh process: the example registers a method, which must not leak into other tests
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", str(EXAMPLES / example)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for line in expected:
        assert line in result.stdout


def test_every_page_in_the_nav_exists_and_every_snippet_too():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = re.findall(r":\s*([\w/-]+\.md)\s*$", config, flags=re.M)
    assert len(pages) >= 20
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), page
    for page in (ROOT / "docs").rglob("*.md"):
        for snippet in re.findall(r'--8<-- "([^"]+)"', page.read_text(encoding="utf-8")):
            assert (EXAMPLES / snippet).is_file(), (page, snippet)


@pytest.mark.parametrize(
    ("page", "example"),
    [("custom-method", "custom_method.py"), ("custom-target", "custom_target.py")],
)
def test_the_built_how_to_pages_show_their_example_code(built_site, page, example):
    # a formatter once rewrote the snippet lines, and the pages showed `--8 < --"..."` instead
    page_html = (built_site / "how-to" / page / "index.html").read_text(encoding="utf-8")
    text = html.unescape(re.sub(r"<[^>]+>", "", page_html))
    assert "--8" not in text
    code = (EXAMPLES / example).read_text(encoding="utf-8").splitlines()
    missing = [line for line in code if line.strip() and line not in text]
    assert not missing, missing[:5]
    assert len(code) > 20


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return site
