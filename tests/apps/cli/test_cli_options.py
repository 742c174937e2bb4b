"""segcam.apps.cli.options and the parser: class names each once, a usage error as one line."""

from __future__ import annotations

import pytest
from cli_runs import LAYER, MODEL, run


@pytest.mark.parametrize(
    ("classes", "fragment"),
    [
        ("bg,disk,disk", "'disk' named more than once"),
        ("bg,,square", "an empty class name"),
        ("bg, disk ,disk", "'disk' named more than once"),  # spaces around a name are dropped
    ],
)
def test_class_names_are_each_given_once(tmp_path, capsys, classes, fragment, scene):
    with pytest.raises(SystemExit) as stopped:
        run("explain", scene, *MODEL, "--classes", classes, "--target", "predicted:disk",
            "--layer", LAYER, "--out", tmp_path / "out")  # fmt: skip
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("segcam explain: error: argument --classes:") and fragment in err
    assert "(see segcam explain --help)" in err and "usage:" not in err
    assert not (tmp_path / "out").exists()


def test_spaces_around_class_names_are_dropped(tmp_path, capsys, scene):
    code = run("explain", scene, *MODEL, "--classes", "bg, disk, square", "--target",
               "predicted:disk", "--layer", LAYER, "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert list((tmp_path / "out" / "scene").glob("*predicted-disk.png"))


def test_a_usage_error_is_one_line(capsys):
    for argv in (["explian"], ["explain"], ["layers", "--input-shape"]):
        with pytest.raises(SystemExit) as stopped:
            run(*argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.count("\n") == 1, err
        assert "error:" in err and "--help)" in err
