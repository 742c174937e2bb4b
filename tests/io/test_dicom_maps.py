"""DICOM Parametric Maps and Segmentations referencing their series, read back by pydicom and
highdicom: geometry, references and values as written (issue 24)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

pytest.importorskip("highdicom")

import highdicom as hd

from medical_volumes import VOLUME, write_series
from segcam.errors import InputFileError
from segcam.io.dicom_maps import PixelSet, dicom_refusal, write_parametric_map, write_segmentation
from segcam.io.medical import read_medical

UID = "1.2.826.0.1.3680043.2.1125.700"


@pytest.fixture
def series(tmp_path):
    write_series(tmp_path / "ct", VOLUME, UID)
    return read_medical(tmp_path / "ct")


def _sources(volume):
    return [pydicom.dcmread(name, stop_before_pixels=True) for name in volume.files]


def _frame_sources(dataset, sources):
    """For each frame of a multi-frame object: the index k of the source slice it derives from."""
    uids = [s.SOPInstanceUID for s in sources]
    result = []
    for frame in dataset.PerFrameFunctionalGroupsSequence:
        derived = frame.DerivationImageSequence[0].SourceImageSequence[0]
        result.append(uids.index(derived.ReferencedSOPInstanceUID))
    return result


def test_a_parametric_map_references_its_series_frame_by_frame(series, tmp_path):
    rng = np.random.default_rng(0)
    volume = rng.normal(size=series.array.shape[1:]).astype(np.float32)  # (i, j, k) = (12, 10, 6)
    path = write_parametric_map(
        tmp_path / "map.dcm", volume, series, description="segcam seg-hires-grad-cam body.3 t0"
    )
    dataset = pydicom.dcmread(path)
    sources = _sources(series)
    assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert dataset.FrameOfReferenceUID == sources[0].FrameOfReferenceUID == f"{UID}.0"
    assert dataset.StudyInstanceUID == sources[0].StudyInstanceUID
    assert dataset.ReferencedSeriesSequence[0].SeriesInstanceUID == UID
    assert dataset.SeriesDescription == "segcam seg-hires-grad-cam body.3 t0"
    assert dataset.NumberOfFrames == len(sources) == 6
    pixels = dataset.pixel_array
    assert pixels.dtype == np.float32
    for f, k in enumerate(_frame_sources(dataset, sources)):
        frame = dataset.PerFrameFunctionalGroupsSequence[f]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[k].ImagePositionPatient])
        np.testing.assert_array_equal(pixels[f], volume[:, :, k].T)  # rows j, columns i
    shared = dataset.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in sources[0].ImageOrientationPatient],
    )
    mapping = shared.RealWorldValueMappingSequence[0]
    assert float(mapping.RealWorldValueSlope) == 1 and float(mapping.RealWorldValueIntercept) == 0
    last = float(mapping.DoubleFloatRealWorldValueLastValueMapped)
    assert last == pytest.approx(float(volume.max()))
    back = hd.pm.ParametricMap.from_dataset(dataset)  # highdicom reads it as its own IOD
    assert back.SeriesInstanceUID != UID


def test_a_segmentation_of_the_pixel_sets_round_trips(series, tmp_path):
    shape = series.array.shape[1:]
    box = np.zeros(shape, dtype=bool)
    box[2:9, 1:7, 1:5] = True
    predicted = np.zeros(shape, dtype=bool)
    predicted[5:, 4:, 3:] = True
    empty = np.zeros(shape, dtype=bool)
    sets = [
        PixelSet("t0 box liver", box, False),
        PixelSet("t1 empty", empty, False),
        PixelSet("t2 predicted tumour", predicted, True),
    ]
    path = write_segmentation(tmp_path / "sets.dcm", sets, series)
    segmentation = hd.seg.segread(path)
    assert segmentation.FrameOfReferenceUID == f"{UID}.0"
    labels = [d.SegmentLabel for d in segmentation.SegmentSequence]
    assert labels == ["t0 box liver", "t2 predicted tumour"]  # the empty set has no segment
    sources = _sources(series)
    uids = [s.SOPInstanceUID for s in sources]
    pixels = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2]
    )  # (slices k, rows j, columns i, segments)
    np.testing.assert_array_equal(pixels[..., 0], np.transpose(box, (2, 1, 0)))
    np.testing.assert_array_equal(pixels[..., 1], np.transpose(predicted, (2, 1, 0)))
    algorithm = segmentation.SegmentSequence[1].SegmentAlgorithmType
    assert algorithm == "AUTOMATIC" and segmentation.SegmentSequence[0].SegmentAlgorithmType == (
        "MANUAL"
    )
    assert write_segmentation(tmp_path / "none.dcm", [sets[1]], series) is None


def test_a_series_without_a_frame_of_reference_is_refused_in_one_line(tmp_path):
    write_series(tmp_path / "ct", VOLUME, UID, frame_of_reference=False)
    volume = read_medical(tmp_path / "ct")
    assert "no Frame of Reference UID" in dicom_refusal(volume)
    with pytest.raises(InputFileError, match=r"no Frame of Reference UID.*--map-format nifti"):
        write_parametric_map(tmp_path / "m.dcm", np.zeros(volume.array.shape[1:]), volume,
                             description="x")  # fmt: skip
    with pytest.raises(InputFileError, match="not on the series' grid"):
        write_series(tmp_path / "ok", VOLUME, UID + ".1")
        write_parametric_map(tmp_path / "m.dcm", np.zeros((3, 3, 3)), read_medical(tmp_path / "ok"),
                             description="x")  # fmt: skip


def test_names_in_any_script_and_long_descriptions_keep_what_tells_maps_apart(series, tmp_path):
    from segcam.apps.batch.outputs import clear_previous
    from segcam.io.dicom_maps import _lo

    long = "segcam seg-hires-grad-cam encoder.stages.5.0.convs.1.all_modules.0 t3-predicted-liver"
    assert len(_lo(long)) <= 64 and _lo(long).endswith("t3-predicted-liver")
    assert _lo("a\nb\\c") == "a b/c"
    volume = np.zeros(series.array.shape[1:], dtype=np.float32)  # an all-zero map
    path = write_parametric_map(tmp_path / "m.dcm", volume, series, description="Leber é 肝臓")
    dataset = pydicom.dcmread(path)
    assert dataset.SpecificCharacterSet == "ISO_IR 192"  # UTF-8, declared
    assert dataset.SeriesDescription == "Leber é 肝臓"
    voi = dataset.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    assert voi.VOILUTFunction == "LINEAR_EXACT" and float(voi.WindowWidth) > 0
    # a rerun without a readable manifest removes the Segmentation of earlier settings too
    folder = tmp_path / "out"
    folder.mkdir()
    sets = [PixelSet("t0 box 肝臓", np.ones(series.array.shape[1:], bool), False)]
    write_segmentation(folder / "pixel_sets.dcm", sets, series)
    assert hd.seg.segread(folder / "pixel_sets.dcm").SegmentSequence[0].SegmentLabel == (
        "t0 box 肝臓"
    )
    clear_previous(folder)
    assert not (folder / "pixel_sets.dcm").exists()
