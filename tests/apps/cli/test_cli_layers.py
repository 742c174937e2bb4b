"""segcam layers: the layer table, and an --input-shape checked before anything is allocated."""

from __future__ import annotations

import pytest
from cli_runs import one_line, run

TINY = ["--model", "segcam.testing:tiny_segnet", "--model-kwargs", '{"spatial_dims": 2}']


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ("1,1,-5,64", "of positive sizes"),  # was a RuntimeError from torch.zeros
        ("1,1,0,4", "of positive sizes"),
        ("1,1,64", "expected N,C,H,W or N,C,D,H,W"),
        ("1,1,1000000,1000000", "the example input alone would take 3.73e+03 GiB"),  # was OOM
    ],
)
def test_an_input_shape_that_cannot_be_made_is_one_line(capsys, shape, fragment):
    assert run("layers", *TINY, "--input-shape", shape) == 2
    one_line(capsys, fragment)


def test_the_layer_table_of_a_given_input_shape(capsys):
    assert run("layers", *TINY, "--input-shape", "1,1,32,32") == 0
    table = capsys.readouterr().out
    assert "body.3" in table and "(1, 3, 32, 32)" in table


def test_an_empty_input_shape_is_refused_not_the_default(capsys):
    assert run("layers", *TINY, "--input-shape", "") == 2
    one_line(capsys, "--input-shape '': expected N,C,H,W")
