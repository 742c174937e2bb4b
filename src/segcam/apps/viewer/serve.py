"""Start the viewer: build a session from command-line options (or the demo CT) and serve it."""

from __future__ import annotations

import socket
import sys
import threading
import time
import webbrowser
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segcam.apps.viewer.session import ViewerSession
from segcam.errors import OptionError, SegCamError
from segcam.memory_format import MemoryFormat

__all__ = [
    "RunningViewer",
    "demo_session",
    "file_session",
    "free_port",
    "serve",
    "serve_in_thread",
]

LOCAL = "127.0.0.1"


def demo_session(
    which: str = "3d",
    sliding_window: dict[str, Any] | None = None,
    memory_format: MemoryFormat = "auto",
) -> ViewerSession:
    """The demo CT (held-out slice 68 in 2D, the whole volume in 3D) with its trained network.

    ``nnunet``: the held-out slab (axial slices 56-79) as an nnU-Net case with the committed
    nnU-Net model (the ``[nnunet]`` extra), its labels as the ground truth.
    """
    from segcam.apps.demo import data as liver
    from segcam.apps.demo.models import DEMO_LAYERS, load_liver_model

    case = liver.load_case()
    if which == "nnunet":
        return _nnunet_demo(case, memory_format)
    windowed = liver.window(case.image)
    model = load_liver_model(which)
    if which == "2d":
        image = windowed[:, :, 68]
        inputs = torch.from_numpy(np.ascontiguousarray(image))[None]
        title = "demo CT, axial slice 68 (held out), 2D UNet"
        hounsfield, labels = case.image[:, :, 68], case.labels[:, :, 68]
        affine = (
            case.affine
        )  # the slice's axes are the volume's first two: shown as its axial plane
    else:
        inputs = torch.from_numpy(windowed)[None]
        title = "demo CT volume, 3D UNet"
        hounsfield, labels = case.image, case.labels
        affine = case.affine
    return ViewerSession(
        model=model,
        inputs=inputs,
        display=inputs[0].numpy(),
        class_names=list(liver.CLASS_NAMES),
        layers=list(DEMO_LAYERS.values()),
        default_layer=DEMO_LAYERS["last decoder"],
        layer_labels={name: depth for depth, name in DEMO_LAYERS.items()},
        affine=affine,
        title=title,
        sliding_window=sliding_window,
        intensity=np.ascontiguousarray(hounsfield, dtype=np.float32),
        intensity_unit="HU",
        ground_truth=np.ascontiguousarray(labels, dtype=np.uint8),
        memory_format=memory_format,
    )


def _nnunet_demo(case: Any, memory_format: MemoryFormat = "auto") -> ViewerSession:
    import tempfile
    from pathlib import Path

    from segcam.apps.demo.models import NNUNET_MODEL
    from segcam.apps.demo.nnunet_case import write_heldout_case
    from segcam.apps.viewer.nnunet_session import nnunet_session

    with tempfile.TemporaryDirectory(prefix="segcam-demo-") as folder:  # read at start only
        image, truth = write_heldout_case(case, Path(folder), labels=True)
        session = nnunet_session(
            str(NNUNET_MODEL), [str(image)], ground_truth=str(truth), memory_format=memory_format
        )
    session.title = "demo CT, held-out slab (axial slices 56-79), nnU-Net 3d_fullres"
    return session


def file_session(
    model: torch.nn.Module,
    array: np.ndarray,
    *,
    class_names: list[str],
    layers: list[str],
    affine: np.ndarray | None,
    title: str,
    output: Any = None,
    sliding_window: dict[str, Any] | None = None,
    intensity: np.ndarray | None = None,
    ground_truth: np.ndarray | None = None,
    provenance: dict[str, Any] | None = None,
    memory_format: MemoryFormat = "auto",
) -> ViewerSession:
    """A session for one input array (C, *S) read and intensity-processed by the CLI.

    ``intensity``: the values as read, before intensity processing (the crosshair reads them
    out; a CT's are recognised as HU by their range); ``ground_truth``: reference labels (*S).
    """
    inputs = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    unit = ""
    if intensity is not None:
        intensity = np.asarray(intensity, dtype=np.float32)
        if intensity.ndim == inputs.ndim:
            intensity = intensity.mean(0)
        if intensity.ndim == 3 and intensity.min() >= -1100 and intensity.max() > 300:
            unit = "HU"  # a CT volume in Hounsfield units: offer the CT window presets
    return ViewerSession(
        model=model.eval(),
        inputs=inputs,
        intensity=intensity,
        intensity_unit=unit,
        ground_truth=ground_truth,
        class_names=class_names,
        layers=layers,
        default_layer=layers[-1] if layers else None,
        affine=affine,
        title=title,
        output=output,
        sliding_window=sliding_window,
        provenance=provenance or {},
        memory_format=memory_format,
    )


def free_port(host: str = LOCAL) -> int:
    """A port the operating system reports free on ``host`` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def serve(
    session: ViewerSession,
    *,
    host: str = LOCAL,
    port: int = 0,
    browser: bool = True,
    ready: threading.Event | None = None,
) -> None:
    """Serve ``session`` until interrupted; print the address and open it unless told not to."""
    import uvicorn

    from segcam.apps.viewer.app import allowed_hosts, create_app, new_token

    if host in ("0.0.0.0", "::", "[::]", ""):
        raise OptionError(
            f"host {host!r} listens on every interface, but the viewer answers only requests "
            f"whose Host is the address it serves: give this machine's own address"
        )
    if host not in (LOCAL, "localhost", "::1"):
        shown_host = f"[{host}]" if ":" in host else host
        print(
            f"segcam: warning: serving on {host}: anyone who can reach {shown_host} and has the "
            f"address with its token can use the viewer and its model (requests must name "
            f"{shown_host} as their Host); the default is {LOCAL}",
            file=sys.stderr,
        )
    port = port or free_port(host)
    token = new_token()
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{port}/?token={token}"
    app = create_app(session, token=token, hosts=allowed_hosts(port, host))
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)

    def announce() -> None:  # once the socket listens
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            print(f"segcam viewer: {address}  (Ctrl+C stops it)", flush=True)
            if browser:
                webbrowser.open(address)
            if ready is not None:
                ready.set()

    threading.Thread(target=announce, daemon=True).start()
    # The server runs in a daemon thread, so that Ctrl+C reaches this thread at once even while
    # a request computes (uvicorn would wait for it), and leaves within a second.
    thread = threading.Thread(target=server.run, daemon=True, name="segcam-viewer")
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        # Leave at once: a request may still compute with the session's kept graphs, so they are
        # not freed under it (the process ends); the server thread gets a second to stop.
        server.should_exit = True
        thread.join(1.0)
        raise
    session.close()


@dataclass
class RunningViewer:
    """A viewer served from a daemon thread: its address (with the token), and :meth:`stop`."""

    url: str
    server: Any
    thread: threading.Thread
    token: str = ""

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to exit and wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)


def serve_in_thread(session: ViewerSession, timeout: float = 20.0) -> RunningViewer:
    """Serve ``session`` on a free loopback port from a daemon thread (tests, scripts).

    Returns once the socket listens.
    """
    import uvicorn

    from segcam.apps.viewer.app import allowed_hosts, create_app, new_token

    port = free_port()
    token = new_token()
    app = create_app(session, token=token, hosts=allowed_hosts(port))
    server = uvicorn.Server(uvicorn.Config(app, host=LOCAL, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SegCamError("the viewer did not start")
        time.sleep(0.02)
    return RunningViewer(f"http://{LOCAL}:{port}/?token={token}", server, thread, token)
