"""What the command-line tests share: the demo's synthetic network as a model, one call."""

from __future__ import annotations

from segcam.apps.cli import main
from segcam.apps.demo.models import WEIGHTS_DIR

WEIGHTS = WEIGHTS_DIR / "synthetic_unet2d.pt"
MODEL = ["--model", "segcam.apps.demo.models:build_demo_model", "--weights", str(WEIGHTS)]
LAYER = "model.1.submodule.2"
EXPLAIN = [*MODEL, "--target", "all:1", "--layer", LAYER]


def run(*args):
    return main([str(a) for a in args])


def one_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("segcam: error:"), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err
