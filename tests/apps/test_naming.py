"""segcam.apps.naming: one name scheme for every map file (CLI, batch, nnU-Net, demo, viewer)."""

from __future__ import annotations

import numpy as np

from segcam.apps.cli import main
from segcam.apps.naming import MAX_PART, folder_name, map_stem, spec_class_name


def test_map_stem_names_method_layer_target_kind_and_class():
    assert map_stem("seg-hires-grad-cam", "decoder.stages.4", 0, "predicted", "liver") == (
        "seg-hires-grad-cam__decoder.stages.4__t0-predicted-liver"
    )
    # anything but letters, digits, -_. becomes _; an empty part is never empty
    assert map_stem("m", "a/b c", 12, "box", "") == "m__a_b_c__t12-box-root"


def test_names_are_ascii_short_and_never_hidden():
    # a download's file name must be ASCII (HTTP headers); a part stays far below 255 bytes
    assert map_stem("m", "body", 0, "predicted", "肝臓 Tümör") == "m__body__t0-predicted-___T_m_r"
    long = map_stem("m", "body", 0, "all", "x" * 260)
    cut = long.rsplit("-", 1)[1]
    assert len(cut) == MAX_PART and cut.startswith("x" * 51 + "~")
    assert map_stem("m", "body", 0, "all", "x" * 259) != long  # the hash keeps them apart
    assert map_stem("../evil", "body", 0, "all", "1").startswith("_.._evil__")  # not hidden
    assert map_stem("seg-grad-cam++", "body", 0, "all", "1").startswith("seg-grad-cam++__")


def test_the_class_name_is_used_where_one_is_known():
    classes = ["background", "liver", "tumour"]
    assert spec_class_name("predicted:1", classes) == ("predicted", "liver")
    assert spec_class_name("box:tumour:0,0,4,4", classes) == ("box", "tumour")
    assert spec_class_name("predicted:1", []) == ("predicted", "1")
    assert spec_class_name("all:7", classes) == ("all", "7")  # no such class: the index stays
    assert spec_class_name("all:1", ["a", "", "b"]) == ("all", "1")  # an empty name: the index


def test_folder_names_stay_inside_the_output_folder():
    assert folder_name("..") == "_.."
    assert folder_name("") == "_"
    assert folder_name("case 1/x") == "case_1_x"


def test_the_command_line_names_maps_with_the_class_names_it_was_given(tmp_path):
    volume = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    np.save(tmp_path / "volume.npy", volume)
    out = tmp_path / "out"
    code = main(
        [
            "explain", str(tmp_path / "volume.npy"), "--model", "segcam.testing:tiny_segnet",
            "--model-kwargs", '{"spatial_dims": 3}', "--classes", "background,liver",
            "--target", "all:1", "--target", "predicted:0", "--layer", "body.3",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    maps = sorted(p.name for p in (out / "volume").glob("*.nii.gz"))
    assert maps == [
        "seg-hires-grad-cam__body.3__t0-all-liver.nii.gz",
        "seg-hires-grad-cam__body.3__t1-predicted-background.nii.gz",
    ]
