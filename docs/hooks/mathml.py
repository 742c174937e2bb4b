r"""MkDocs hook: formulas to MathML at build time, and Sphinx roles to plain code.

``pymdownx.arithmatex`` (generic mode) marks formulas as ``\(...\)`` and ``\[...\]`` inside
``arithmatex`` spans and divs; this hook converts each to MathML with ``latex2mathml``, which
browsers render natively: the site needs no JavaScript and nothing from the network, at build
time or when read. Docstrings written for Sphinx keep roles such as
``:class:`segcam.Explanation```; they are shown as the code they name.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

_INLINE = re.compile(r'<span class="arithmatex">\\\((.+?)\\\)</span>', re.S)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.+?)\\\]</div>', re.S)
_ROLE = re.compile(r":(?:class|func|meth|mod|attr|exc|data|obj):<code>~?([^<]+)</code>")


def _math(match: re.Match[str], display: str) -> str:
    latex = html.unescape(match.group(1)).strip()
    return convert(latex, display=display)


def on_page_content(content: str, **_: Any) -> str:
    """Replace the marked formulas by MathML and drop Sphinx roles."""
    content = _BLOCK.sub(lambda m: f'<div class="math">{_math(m, "block")}</div>', content)
    content = _INLINE.sub(lambda m: _math(m, "inline"), content)
    return _ROLE.sub(r"<code>\1</code>", content)
