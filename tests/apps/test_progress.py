"""Progress: bars on a terminal, a line per input in a log, nothing with --quiet (issue 14)."""

from __future__ import annotations

import io

import numpy as np
import torch

import segcam
from segcam.apps.cli import main
from segcam.apps.cli.progress import ProgressDisplay
from segcam.testing import tiny_segnet
from segcam.testing.synthetic import shapes_scene

MODEL = ["--model", "segcam.testing:tiny_segnet", "--model-kwargs", '{"spatial_dims": 2}']
ARGS = [*MODEL, "--target", "all:1", "--target", "all:2", "--layer", "body.3"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_library_reports_targets_and_windows():
    calls = []
    x = torch.rand(1, 1, 16, 16)
    targets = [segcam.AllPixels(0), segcam.AllPixels(1), segcam.AllPixels(2)]

    def record(done, total):
        calls.append((done, total))

    segcam.explain_methods(tiny_segnet(2), x, targets, "body.3", ["seg-grad-cam"], progress=record)
    assert calls == [(1, 3), (2, 3), (3, 3)]
    calls.clear()
    x = torch.rand(1, 1, 16, 24)
    segcam.explain_sliding_window(
        tiny_segnet(2), x, segcam.AllPixels(1), "body.3", 8, overlap=0.0, sw_batch_size=2,
        progress=record,
    )  # fmt: skip
    assert calls == [(1, 3), (2, 3), (3, 3)]  # 6 windows in groups of 2


def test_bars_on_a_terminal():
    stream = Terminal()
    with ProgressDisplay(2, stream=stream) as display:
        assert display.bars
        for index in (1, 2):
            for done in (1, 2, 3):
                display.within(done, 3)
            display.line(f"[{index}/2] input {index}: 3 files in 0.1s")
    text = stream.getvalue()
    assert "inputs: 100%" in text and "2/2" in text and "[2/2] input 2" in text


def test_lines_in_a_log_and_nothing_when_quiet():
    log = io.StringIO()
    with ProgressDisplay(2, stream=log) as display:
        assert not display.bars
        display.within(1, 3)  # nothing within an input in a log
        display.line("[1/2] a: 3 files in 0.1s")
    assert log.getvalue() == "[1/2] a: 3 files in 0.1s\n"
    quiet = Terminal()
    with ProgressDisplay(2, quiet=True, stream=quiet) as display:
        display.line("[1/2] a: 3 files in 0.1s")
    assert quiet.getvalue() == ""


def test_quiet_on_the_command_line(tmp_path, capsys):
    for seed in (1, 2):
        image, _ = shapes_scene(1_000_060 + seed)
        np.save(tmp_path / f"s{seed}.npy", image[0][:16, :16])
    assert main(["explain", str(tmp_path), *ARGS, "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err.count("files in") == 2  # a log: one line per input
    assert main(["explain", str(tmp_path), *ARGS, "--quiet", "--overwrite",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    assert capsys.readouterr().err == ""
