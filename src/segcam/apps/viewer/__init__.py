"""``segcam view``: a local web viewer to paint a pixel set and see its explanations.

:class:`ViewerSession` holds the model, the input and one re-targeting
:class:`segcam.Explainer` per layer (a new pixel set needs no new forward pass);
:func:`create_app` serves one static page and a small JSON API on top of it. Nothing is loaded
from the internet and no path from the browser is ever opened.
"""

from segcam.apps.viewer.session import RequestError, ViewerSession

__all__ = ["RequestError", "ViewerSession", "create_app"]


def create_app(session: ViewerSession) -> object:
    """The Starlette application serving ``session`` (needs the ``viewer`` extra)."""
    from segcam.apps.viewer.app import create_app as create

    return create(session)
