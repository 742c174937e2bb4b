"""Post-processing and Explanation files."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

import segcam
from segcam import errors
from segcam.postprocess import normalize, relu, upsample
from segcam.testing import HeadNet, tiny_segnet


def test_normalize_values():
    maps = torch.tensor([[[[-2.0, 1.0], [0.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(
        normalize(maps, "max")[0, 0], torch.tensor([[-0.5, 0.25], [0.0, 1.0]])
    )
    torch.testing.assert_close(
        normalize(maps, "minmax")[0, 0], torch.tensor([[0.0, 0.5], [1 / 3, 1.0]])
    )
    for mode in ("max", "minmax"):
        assert torch.equal(normalize(maps, mode)[1], torch.zeros(1, 2, 2))  # zero stays zero
    constant = torch.full((1, 1, 3, 3), 2.0)
    assert torch.equal(normalize(constant, "minmax"), torch.zeros_like(constant))


def test_relu_and_upsample():
    maps = torch.tensor([[[[-1.0, 3.0], [2.0, -4.0]]]])
    torch.testing.assert_close(relu(maps), torch.tensor([[[[0.0, 3.0], [2.0, 0.0]]]]))
    up = upsample(maps, (4, 4))
    # half-pixel centres: the top-left output pixel sits a quarter pixel inside the first value
    assert up.shape == (1, 1, 4, 4) and up[0, 0, 0, 0] == -1.0
    assert up[0, 0, 0, 1] == pytest.approx(0.75 * -1.0 + 0.25 * 3.0)
    volume = upsample(torch.ones(2, 3, 2, 2, 2), (4, 6, 8))
    assert volume.shape == (2, 3, 4, 6, 8) and torch.allclose(volume, torch.ones(()))


def test_explain_postprocessing_order():
    model = tiny_segnet(2)
    x = torch.randn(2, 1, 8, 8)
    target = segcam.Predicted(2)
    raw = segcam.explain(model, x, target, "body.1", relu=False, upsample=False).maps
    full = segcam.explain(model, x, target, "body.1", normalize="minmax").maps
    torch.testing.assert_close(full, normalize(upsample(relu(raw), (8, 8)), "minmax"))
    assert raw.shape == (2, 1, 4, 4) and full.shape == (2, 1, 8, 8)
    assert full.min() >= 0 and full.max() <= 1


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_save_and_load_round_trip(tmp_path, suffix):
    model = tiny_segnet(3)
    x = torch.randn(2, 1, 2, 6, 6)
    targets = [
        segcam.AllPixels(1),
        segcam.Box(2, [(0, 1), (1, 4), slice(0, 6)]),
        segcam.Probability(0, 0.3),
    ]
    expl = segcam.explain(model, x, targets, ["body.1", "head"], "seg-grad-cam", upsample=False)
    path = expl.save(tmp_path / f"explanation{suffix}")
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    loaded = segcam.load(path)
    assert loaded.layers == ("body.1", "head")
    for name in loaded.layers:
        assert torch.equal(loaded.layer_maps[name], expl.layer_maps[name])
    assert torch.equal(loaded.logits, expl.logits)
    assert torch.equal(loaded.pixel_sets, expl.pixel_sets)
    assert loaded.method == "seg-grad-cam" and loaded.relu and not loaded.upsampled
    assert loaded.layer_shapes == expl.layer_shapes
    described = [t.describe() for t in loaded.targets]
    assert described[1] == {"type": "Box", "class_index": 2, "slices": [[0, 1], [1, 4], [0, 6]]}
    assert described[2]["threshold"] == 0.3
    # A loaded target carries its pixel set: explaining again gives the same maps.
    again = segcam.explain(
        model, x, loaded.targets, ["body.1", "head"], "seg-grad-cam", upsample=False
    )
    for name in loaded.layers:
        torch.testing.assert_close(again.layer_maps[name], expl.layer_maps[name])


def test_explanation_is_frozen_and_prints_briefly():
    expl = segcam.explain(tiny_segnet(2), torch.randn(1, 1, 4, 4), segcam.AllPixels(0), "body")
    assert repr(expl) == (
        "Explanation(method='seg-hires-grad-cam', layers={'body': (1, 1, 4, 4)}, "
        "targets=[AllPixels(class_index=0)], postprocess=['relu', 'upsampled'])"
    )
    with pytest.raises(AttributeError):
        expl.method = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        expl.layer_maps["x"] = torch.zeros(1)  # type: ignore[index]


def test_bad_files(tmp_path):
    expl = segcam.explain(tiny_segnet(2), torch.randn(1, 1, 4, 4), segcam.AllPixels(0), "body")
    with pytest.raises(errors.ExplanationFileError, match=r"\.npz or \.safetensors"):
        expl.save(tmp_path / "maps.png")
    (tmp_path / "in-the-way").write_text("a file", encoding="utf-8")
    with pytest.raises(
        errors.OutputFileError, match=r"cannot create the output folder .*in-the-way"
    ):
        expl.save(tmp_path / "in-the-way" / "maps.npz")  # a missing folder is made (io.writing)
    with pytest.raises(errors.ExplanationFileError, match="no such file"):
        segcam.load(tmp_path / "absent.npz")
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(errors.ExplanationFileError, match="cannot read"):
        segcam.load(damaged)
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, metadata=np.array('{"format": "other"}'))
    with pytest.raises(errors.ExplanationFileError, match="not a segcam explanation"):
        segcam.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    with pytest.raises(errors.ExplanationFileError, match="cannot read"):
        segcam.load(garbage)
    # An existing file is replaced whole, never half-written.
    path = expl.save(tmp_path / "keep.npz")
    before = path.read_bytes()
    with pytest.raises(errors.ExplanationFileError):
        expl.save(tmp_path / "keep.txt")
    assert path.read_bytes() == before


def test_list_methods_is_the_registry():
    from segcam.methods import REGISTRY

    assert segcam.list_methods() == list(REGISTRY)
    assert segcam.list_methods()[:2] == ["seg-hires-grad-cam", "seg-grad-cam"]
    for method in REGISTRY.values():
        assert method.compute.__doc__ and "L =" in method.compute.__doc__
        assert any(
            venue in method.reference
            for venue in ("MELBA", "AAAI", "TIP", "BMVC", "WACV", "CVPR", "IJCNN")
        )


def test_load_reads_only_the_members_it_needs(tmp_path):
    expl = segcam.explain(HeadNet(2), torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "body.3")
    path = expl.save(tmp_path / "maps.npz")
    with (
        zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open("extra.npy", "w", force_zip64=True) as member,
    ):
        np.lib.format.write_array(member, np.zeros(64 << 20, dtype=np.float32))
    assert path.stat().st_size < 1 << 20  # a small file that would decompress to 256 MiB
    tracemalloc.start()
    loaded = segcam.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    torch.testing.assert_close(loaded.maps, expl.maps)
    assert peak < 16 << 20


def test_load_checks_shapes_against_the_metadata(tmp_path):
    expl = segcam.explain(HeadNet(2), torch.rand(1, 1, 8, 8), segcam.AllPixels(1), "body.3")
    path = expl.save(tmp_path / "maps.npz")
    with np.load(path) as archive:
        members = {key: archive[key] for key in archive.files}
    members["map_0"] = np.zeros(7, dtype=np.float32)
    np.savez(tmp_path / "bad.npz", **members)
    with pytest.raises(errors.ExplanationFileError, match=r"'map_0' has shape \(7,\)"):
        segcam.load(tmp_path / "bad.npz")


def test_save_and_load_say_what_they_take(tmp_path):
    import io

    model = tiny_segnet(spatial_dims=2).eval()
    explanation = segcam.explain(model, torch.randn(1, 1, 16, 16), segcam.AllPixels(1), "body.3")
    for where in (io.BytesIO(), None):
        with pytest.raises(errors.ExplanationFileError, match="save takes a file path"):
            explanation.save(where)  # type: ignore[arg-type]
    with pytest.raises(errors.ExplanationFileError, match="a folder, not a saved explanation"):
        segcam.load(tmp_path)
