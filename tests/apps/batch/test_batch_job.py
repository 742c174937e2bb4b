"""segcam.apps.batch.job: the settings name everything a result depends on (issue 22)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_runs import run

TINY = ["--model", "segcam.testing:tiny_segnet", "--model-kwargs", '{"spatial_dims": 2}']


def test_a_changed_mask_file_is_not_already_done(tmp_path, capsys):
    np.save(tmp_path / "a.npy", np.random.default_rng(0).random((16, 16), np.float32))
    mask = tmp_path / "m.npy"
    np.save(mask, np.eye(16, dtype=np.uint8))
    arguments = ["explain", tmp_path / "a.npy", *TINY, "--layer", "body.3",
                 "--target", f"mask:1:{mask}", "--out", tmp_path / "out"]  # fmt: skip
    assert run(*arguments) == 0
    assert run(*arguments) == 0 and "already done, skipped" in capsys.readouterr().err
    np.save(mask, np.fliplr(np.eye(16, dtype=np.uint8)))  # the same name, another set
    assert run(*arguments) == 2
    # the differing setting named to its leaf: the mask file's own digest
    assert (
        f"holds results of 1 input made with other settings (depends_on.{mask}: '"
        in capsys.readouterr().err
    )
    assert run(*arguments, "--overwrite") == 0
    saved = json.loads((tmp_path / "out" / "a" / "manifest.json").read_text(encoding="utf-8"))
    assert str(mask) in saved["depends_on"]


def test_an_input_changed_while_it_is_explained_is_not_recorded(tmp_path, capsys, monkeypatch):
    source = tmp_path / "a.npy"
    np.save(source, np.random.default_rng(0).random((16, 16), np.float32))
    monkeypatch.setenv("SEGCAM_TEST_CHANGING", str(source))
    code = run("explain", source, *TINY, "--layer", "body.3", "--target", "all:1",
               "--preprocess", "changing_input:rewrite", "--out", tmp_path / "out")  # fmt: skip
    assert code == 2
    assert "a.npy: changed while it was explained" in capsys.readouterr().err
    folder = tmp_path / "out" / "a"
    assert not (folder / "manifest.json").exists()  # so the next run does it again
    assert not folder.exists() or not any(folder.iterdir())  # its outputs were removed


def test_a_worker_refuses_a_mask_file_changed_since_the_run_started(tmp_path):
    from segcam.apps.batch import BatchJob
    from segcam.errors import InputFileError

    mask = tmp_path / "m.npy"
    np.save(mask, np.eye(16, dtype=np.uint8))
    job = BatchJob(model="segcam.testing:tiny_segnet", weights=None, targets=(f"mask:1:{mask}",),
                   layers=("body.3",), model_kwargs={"spatial_dims": 2}).for_run()  # fmt: skip
    job.build()  # the file the run digested: fine
    np.save(mask, np.fliplr(np.eye(16, dtype=np.uint8)))  # swapped while workers start
    with pytest.raises(InputFileError, match=r"m\.npy changed since the run started"):
        job.build()
    assert job.settings() == job.recorded  # every worker records the run's settings
