"""Explain many files: one job, local processes or a Ray cluster, resumable and atomic.

A :class:`BatchJob` is plain data (model spec, weights path, targets, layers, methods, options),
so it travels to worker processes and Ray actors; each worker builds the model once
(:meth:`BatchJob.build`) and explains its inputs with :func:`explain_file`, which writes every
file under a temporary name and renames it, ``manifest.json`` last. An input whose manifest
matches the job's settings and the input's SHA-256 is skipped. Backends:

- ``"local"``: this process (``num_workers=1``) or a pool of ``num_workers`` processes;
- ``"ray"``: an actor pool of ``num_workers`` actors on a Ray cluster (``address``: ``None``
  starts a local one, ``"auto"`` joins a running one, ``"ray://host:10001"`` a remote one),
  ``gpus_per_worker`` GPUs each. Workers write the outputs, so ``out`` must be on a file system
  every node sees.

One failing input never stops the others: it is reported with its error.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segcam
from segcam.apps.specs import (
    apply_intensity,
    file_sha256,
    load_callable,
    load_model,
    parse_target,
)
from segcam.errors import InputFileError, OptionError, OutputFileError, SegCamError
from segcam.io.files import (
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    InputFile,
    read_input,
    write_nifti,
)
from segcam.io.medical import MAP_FORMATS, MEDICAL_SUFFIXES, is_dicom_folder, write_like
from segcam.io.writing import atomic_write, make_dir
from segcam.layers import resolve_layers
from segcam.methods import get_method, resolve_methods
from segcam.outputs import FromProbabilities

try:  # the output folder's lock; without fcntl (Windows) runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BACKENDS",
    "BatchJob",
    "BatchResult",
    "OutputFolderError",
    "explain_file",
    "explain_files",
    "output_folder",
    "output_name",
]

SUPPORTED = (*IMAGE_SUFFIXES, *NIFTI_SUFFIXES, *MEDICAL_SUFFIXES, ".npy")
BACKENDS = ("local", "ray")
WRITER_THREADS = 4  # files of one input written at once


@dataclass(frozen=True)
class BatchJob:
    """What to explain, as plain data (it is sent to worker processes and Ray actors).

    Attributes:
        model: ``package.module:factory`` or ``monai:NetName`` (see ``segcam explain``).
        weights: a state_dict file (or ``None``).
        targets: target specifications (``predicted:1``, ``box:liver:...``, ...).
        layers: layer names.
        methods: registered method names.
        classes: class names for the targets and outputs.
        model_kwargs, trust_pickle, weights_key: as for ``--model-kwargs``, ``--trust-pickle``
            and ``--weights-key``.
        method_options: method name -> options.
        intensity: ``window``, ``zscore``, ``minmax``.
        explain: ``relu``, ``upsample``, ``normalize``, ``output``, ``logits_from``
            (``"probabilities"``: :class:`segcam.FromProbabilities`).
        sliding_window: ``{"roi_size", "overlap"}`` or ``None``.
        preprocess: ``package.module:function`` or ``None``.
        device: where the model runs (``cpu``, ``cuda``, ...).
        map_format: 3D maps as ``"auto"`` (the input's own format; NIfTI for DICOM),
            ``"nifti"``, ``"nrrd"`` or ``"mha"``.
        series_uid: the DICOM series to read from a folder holding several.
        nnunet: an nnU-Net model instead of ``model``: ``folder``, ``folds`` (or ``"all"``),
            ``checkpoint``, ``step_size``, ``mirroring``, ``save_seg``, ``trust_checkpoint``;
            inputs are then cases (:mod:`segcam.apps.nnunet_cases`).
    """

    model: str | None
    weights: str | None
    targets: tuple[str, ...]
    layers: tuple[str, ...]
    methods: tuple[str, ...] = ("seg-hires-grad-cam",)
    classes: tuple[str, ...] = ()
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False
    weights_key: str | None = None
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    intensity: dict[str, Any] = field(default_factory=dict)
    explain: dict[str, Any] = field(default_factory=dict)
    sliding_window: dict[str, Any] | None = None
    preprocess: str | None = None
    device: str = "cpu"
    map_format: str = "auto"
    series_uid: str | None = None
    nnunet: dict[str, Any] | None = None

    def expand(self, inputs: Sequence[Path], exclude: Path | None = None) -> list[Path]:
        """The job's inputs: files (and folders' files), or nnU-Net cases."""
        if self.nnunet is not None:
            from segcam.apps.nnunet_cases import expand_cases

            return expand_cases(inputs, self.nnunet, exclude)
        return expand_inputs(inputs, exclude=exclude)

    def settings(self) -> dict[str, Any]:
        """What the manifest records, and what a rerun must match to skip an input."""
        weights = Path(self.weights) if self.weights else None
        settings = {
            "segcam": segcam.__version__,
            "torch": torch.__version__,
            "model": self.model,
            "model_kwargs": self.model_kwargs,
            "weights": str(weights) if weights else None,
            "weights_sha256": file_sha256(weights) if weights else None,
            "weights_key": self.weights_key,
            "methods": list(self.methods),
            "method_options": self.method_options,
            "layers": list(self.layers),
            "targets": list(self.targets),
            "classes": list(self.classes),
            "options": {
                **self.intensity,
                **self.explain,
                "preprocess": self.preprocess,
                "sliding_window": self.sliding_window,
                "map_format": self.map_format,
                "series_uid": self.series_uid,
            },
        }
        if self.nnunet is not None:
            from segcam.apps.nnunet_cases import spec_settings

            settings["nnunet"] = spec_settings(self.nnunet)
        result: dict[str, Any] = json.loads(json.dumps(settings))  # as the manifest reads back
        return result

    def build(self) -> _Job:
        """Load the model and parse the targets: what a worker needs, built once per worker."""
        if self.nnunet is not None:
            return self._build_nnunet()
        model = load_model(
            self.model,
            Path(self.weights) if self.weights else None,
            self.model_kwargs,
            trust_pickle=self.trust_pickle,
            weights_key=self.weights_key,
        )
        device = torch.device(self.device)
        model.to(device)
        return _Job(
            model=model,
            targets=[parse_target(spec, list(self.classes)) for spec in self.targets],
            target_specs=list(self.targets),
            layers=list(self.layers),
            methods=list(self.methods),
            options={
                "intensity": dict(self.intensity),
                "explain": _explain_options(self.explain),
                "sliding_window": self.sliding_window,
                "map_format": self.map_format,
                "series_uid": self.series_uid,
            },
            method_options=self.method_options,
            settings=self.settings(),
            device=device,
            preprocess=load_callable(self.preprocess, "--preprocess") if self.preprocess else None,
        )

    def _build_nnunet(self) -> _Job:
        from segcam.apps.nnunet_cases import folder_facts, load_spec, parse_case_target
        from segcam.nnunet.files import reverses_axes

        assert self.nnunet is not None
        device = torch.device(self.device)
        facts = folder_facts(self.nnunet["folder"])
        reverse = reverses_axes(facts["reader"])
        model = load_spec(self.nnunet, device)
        resolve_layers(model.networks[0], list(self.layers))  # an unknown layer: before any case
        return _Job(
            model=None,
            targets=[parse_case_target(s, facts["classes"], reverse) for s in self.targets],
            target_specs=list(self.targets),
            layers=list(self.layers),
            methods=list(self.methods),
            options={"explain": _explain_options(self.explain)},
            method_options=self.method_options,
            settings=self.settings(),
            device=device,
            preprocess=None,
            nnunet=model,
            nnunet_spec=dict(self.nnunet),
        )


def _explain_options(explain: dict[str, Any]) -> dict[str, Any]:
    """The job's explain options as keyword arguments of ``segcam.explain_methods``."""
    options = dict(explain)
    if options.pop("logits_from", "logits") == "probabilities":
        options["output"] = FromProbabilities(options.get("output"))
    return options


def expand_inputs(inputs: Sequence[Path], exclude: Path | None = None) -> list[Path]:
    """Files, and the supported files inside folders (recursively, sorted).

    A folder holding DICOM files is one input (a series), not one input per slice. Files under
    ``exclude`` (the output folder, when it lies inside an input folder) are left out, so a rerun
    never reads its own outputs as inputs.
    """
    skip = exclude.resolve() if exclude is not None else None
    files: list[Path] = []
    for path in inputs:
        if path.is_dir() and not is_dicom_folder(path):
            found = []
            for folder, names, filenames in os.walk(path):
                here = Path(folder)
                names[:] = sorted(n for n in names if not n.startswith("."))
                if skip is not None and here.resolve().is_relative_to(skip):
                    names[:] = []
                    continue
                if is_dicom_folder(here) and here != path:
                    found.append(here)
                    names[:] = []
                    continue
                found.extend(
                    here / name
                    for name in filenames
                    if name.lower().endswith(SUPPORTED)
                    and not name.lower().endswith(".dcm")
                    and not name.startswith(".")
                )
            if not found:
                raise InputFileError(
                    f"{path}: no supported files (PNG/JPEG/TIFF, NIfTI, NRRD, MetaImage, DICOM "
                    f"series, .npy) inside"
                )
            files.extend(sorted(found))
        else:
            files.append(path)
    return files


def input_name(path: Path, settings: dict[str, Any]) -> str:
    """The output folder name of an input under a job's settings (a case id for nnU-Net)."""
    if settings.get("nnunet"):
        from segcam.apps.nnunet_cases import case_name

        return case_name(path, settings["nnunet"])
    return output_name(path)


def input_sha256(path: Path, settings: dict[str, Any]) -> str:
    """The input's digest under a job's settings (all channel files of an nnU-Net case)."""
    if settings.get("nnunet"):
        from segcam.apps.nnunet_cases import case_digest

        return case_digest(path, settings["nnunet"])
    return file_sha256(path)


def output_name(path: Path) -> str:
    """The output folder name of an input: its file name without the suffix, made safe.

    Characters other than letters, digits, ``-``, ``_`` and ``.`` become ``_``, and a name that
    is empty or starts with a dot gets a leading ``_``: the folder always lies inside ``--out``.
    """
    name = path.name
    for suffix in (".nii.gz", *SUPPORTED):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = path.name if path.is_dir() else path.stem
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return safe if safe and not safe.startswith(".") else f"_{safe}"


@dataclass
class _Job:
    model: torch.nn.Module | None
    targets: list[segcam.Target]
    target_specs: list[str]
    layers: list[str]
    methods: list[str]
    options: dict[str, Any]
    method_options: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    device: torch.device
    preprocess: Any
    nnunet: Any = None  # a segcam.nnunet.NnUNetModel
    nnunet_spec: dict[str, Any] | None = None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "root"


def _overlay_png(path: Path, image: np.ndarray, heat: np.ndarray) -> Path:
    from PIL import Image

    from segcam.viz import overlay

    with atomic_write(path) as stream:
        Image.fromarray(overlay(image, heat)).save(stream, format="PNG")
    return path


def explain_file(
    path: Path, job: _Job, out: Path, progress: Callable[[int, int], None] | None = None
) -> list[Path]:
    """Explain one input with a built job; write its maps, images and manifest (last).

    ``progress`` follows the work within the input: (windows or targets done, total).
    """
    started = time.perf_counter()
    if job.nnunet is not None:
        from segcam.apps.nnunet_cases import case_name, explain_case

        assert job.nnunet_spec is not None
        _clear_previous(out / case_name(path, job.nnunet_spec))
        written, record = explain_case(path, job, out, progress, _write_case_outputs(job))
        return _finish_input(written, record, job, out / case_name(path, job.nnunet_spec), started)
    assert job.model is not None
    data: InputFile = read_input(path, series_uid=job.options["series_uid"])
    array = apply_intensity(data.array, preprocess=job.preprocess, **job.options["intensity"])
    x = torch.from_numpy(array)[None].to(job.device)
    target_dir = out / output_name(path)
    _clear_previous(target_dir)
    sliding = job.options["sliding_window"]
    method_options = {m: job.method_options[m] for m in job.methods if m in job.method_options}
    if sliding:  # every method from each window's one forward and backward passes
        explanations = segcam.explain_sliding_window_methods(
            job.model,
            x,
            job.targets,
            job.layers,
            methods=job.methods,
            **sliding,
            **job.options["explain"],
            method_options=method_options,
            progress=progress,
        )
    else:  # every method from one forward and one backward pass per target
        explanations = segcam.explain_methods(
            job.model,
            x,
            job.targets,
            job.layers,
            job.methods,
            **job.options["explain"],
            method_options=method_options,
            progress=progress,
        )
    # The files are independent: compress and write them on a few threads (zlib and the
    # tensor-to-bytes copies release the GIL). The manifest comes last, after all of them.
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
        pending = []
        for method, expl in explanations.items():
            pending.append(pool.submit(expl.save, target_dir / f"{method}.npz"))
            for layer, maps in expl.layer_maps.items():
                for t, spec in enumerate(job.target_specs):
                    heat = maps[0, t].detach().float().cpu().numpy()
                    if heat.shape != array.shape[1:]:
                        continue  # not up-sampled: the raw maps are in the .npz
                    stem = _stem(method, layer, t, spec)
                    if data.spatial_dims == 2:
                        destination = target_dir / f"{stem}.png"
                        pending.append(
                            pool.submit(_overlay_png, destination, array.mean(axis=0), heat)
                        )
                    else:
                        pending.append(pool.submit(_write_map, target_dir, stem, heat, data, job))
        written = [future.result() for future in pending]
    record = {"path": str(path), "sha256": file_sha256(path), "shape": list(array.shape)}
    return _finish_input(written, record, job, target_dir, started)


def _stem(method: str, layer: str, t: int, spec: str) -> str:
    kind, _, rest = spec.partition(":")
    return f"{method}__{_safe(layer)}__t{t}-{kind}-{_safe(rest.partition(':')[0])}"


def _write_case_outputs(job: _Job) -> Callable[..., list[Path]]:
    """The writer of an nnU-Net case's files: .npz per method, a map per target and layer."""

    def write(
        explanations: dict[str, segcam.Explanation],
        target_dir: Path,
        shape: tuple[int, ...],
        map_writer: Callable[[Path, str, np.ndarray], Path],
        extra: list[tuple[Callable[..., Path], tuple[Any, ...]]],
    ) -> list[Path]:
        make_dir(target_dir)
        with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
            pending = [pool.submit(function, *arguments) for function, arguments in extra]
            for method, expl in explanations.items():
                pending.append(pool.submit(expl.save, target_dir / f"{method}.npz"))
                for layer, maps in expl.layer_maps.items():
                    for t, spec in enumerate(job.target_specs):
                        heat = maps[0, t].detach().float().cpu().numpy()
                        if heat.shape == tuple(shape):  # maps on the original grid
                            stem = _stem(method, layer, t, spec)
                            pending.append(pool.submit(map_writer, target_dir, stem, heat))
            return [future.result() for future in pending]

    return write


def _finish_input(
    written: list[Path], record: dict[str, Any], job: _Job, target_dir: Path, started: float
) -> list[Path]:
    """Write the input's manifest, last: the input counts as done only once it is there."""
    manifest = {
        **job.settings,
        "input": record,
        "outputs": [p.name for p in written],
        "files": {p.name: file_sha256(p) for p in written},
        "seconds": round(time.perf_counter() - started, 3),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_write(target_dir / "manifest.json", "w") as stream:
        json.dump(manifest, stream, indent=1)
    return written


def _write_map(folder: Path, stem: str, heat: np.ndarray, data: InputFile, job: _Job) -> Path:
    """A 3D map in the input's geometry: its own format, or ``--map-format``'s.

    NIfTI inputs keep their affine and header (nibabel); DICOM, NRRD and MetaImage inputs keep
    their spacing, origin and direction (SimpleITK); a DICOM input gets NIfTI unless told.
    """
    chosen = job.options["map_format"]
    if data.medical is not None:
        own = {"dicom": "nifti"}.get(data.medical.format, data.medical.format)
        suffix = MAP_FORMATS[own if chosen == "auto" else chosen]
        return write_like(folder / f"{stem}{suffix}", heat, data.medical)
    affine = data.nifti_affine if data.nifti_affine is not None else np.eye(4)
    if chosen in ("auto", "nifti"):
        return write_nifti(folder / f"{stem}.nii.gz", heat, affine, data.nifti_header)
    raise OptionError(f"--map-format {chosen} needs a DICOM, NRRD or MetaImage input")


def finished(out: Path, path: Path, settings: dict[str, Any]) -> bool:
    """Whether ``out`` holds a manifest of ``path`` made with these settings."""
    manifest = out / input_name(path, settings) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        saved = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    same = all(saved.get(key) == value for key, value in settings.items())
    if not same or saved.get("input", {}).get("sha256") != input_sha256(path, settings):
        return False
    files = saved.get("files")
    if not isinstance(files, dict) or not files:
        return False
    folder = manifest.parent
    # every output listed is there, unaltered: otherwise the input is done again
    return all(
        (folder / name).is_file() and file_sha256(folder / name) == digest
        for name, digest in files.items()
    )


def _clear_previous(folder: Path) -> None:
    """Remove an input's previous outputs (manifest first) and stale temporary files.

    Runs under the output folder's lock, so no other run is writing here. The manifest goes
    first: if this run is killed, the input has no manifest and is done again.
    """
    manifest = folder / "manifest.json"
    listed: list[str] = []
    if manifest.is_file():
        try:
            listed = list(json.loads(manifest.read_text(encoding="utf-8")).get("outputs", []))
        except (OSError, json.JSONDecodeError, AttributeError):
            listed = []
        manifest.unlink()
    for name in listed:
        candidate = folder / Path(str(name)).name  # a name, never a path out of the folder
        candidate.unlink(missing_ok=True)
    for stale in folder.glob(".*.part*"):  # left by a run that was killed mid-write
        stale.unlink(missing_ok=True)


RUN_FILE = ".segcam-run.json"
LOCK_FILE = ".segcam.lock"


class OutputFolderError(SegCamError, RuntimeError):
    """The output folder is in use by another run, or holds results made with other settings."""


def _differences(recorded: dict[str, Any], settings: dict[str, Any]) -> str:
    keys = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
    return "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in keys[:4])


@contextmanager
def output_folder(out: Path, settings: dict[str, Any], *, overwrite: bool) -> Iterator[None]:
    """Hold ``out`` for one run: a lock, and one set of settings per folder.

    - A second run into the same folder while this one holds it is refused
      (:class:`OutputFolderError`): the lock is an OS file lock on ``out/.segcam.lock``, released
      when the process ends, even when killed.
    - ``out/.segcam-run.json`` records the settings of the results in the folder. A run with
      other settings (targets, methods, layers, model, weights, options) is refused, so results
      of different settings never overwrite or mix with each other; ``overwrite`` replaces them
      (each input's previous files are removed before its new ones are written).
    - Temporary files left by killed runs are removed: under the lock none is in flight.
    """
    make_dir(out)
    try:
        lock = (out / LOCK_FILE).open("a+")
    except OSError as error:
        raise OutputFileError(f"cannot create {out / LOCK_FILE}: {error.strerror}") from error
    try:
        if fcntl is not None:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputFolderError(
                    f"{out} is being written by another segcam run; wait for it to finish or "
                    f"choose another --out"
                ) from None
        run_file = out / RUN_FILE
        recorded: dict[str, Any] | None = None
        if run_file.is_file():
            try:
                recorded = json.loads(run_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                recorded = None
        if recorded is not None and recorded != settings and not overwrite:
            differences = _differences(recorded, settings)
            raise OutputFolderError(
                f"{out} holds results made with other settings ({differences}); choose another "
                f"--out, or --overwrite to replace them"
            )
        if recorded != settings:
            with atomic_write(run_file, "w") as stream:
                json.dump(settings, stream, indent=1)
        for stale in [*out.glob(".*.part*"), *out.glob("*/.*.part*")]:
            stale.unlink(missing_ok=True)
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()


@dataclass
class BatchResult:
    """What a batch did: inputs done, skipped (already finished) and failed (with the error)."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


Progress = Callable[[str], None]


def _run_one(
    job: _Job, path: Path, out: Path, within: Callable[[int, int], None] | None = None
) -> tuple[bool, str, int, float]:
    started = time.perf_counter()
    try:
        written = explain_file(path, job, out, within)
    except SegCamError as error:
        return False, str(error), 0, time.perf_counter() - started
    except Exception as error:  # any failure of one input is reported; the others go on
        message = f"{type(error).__name__}: {error}"
        return False, message, 0, time.perf_counter() - started
    return True, "", len(written), time.perf_counter() - started


def explain_files(
    inputs: Sequence[Path | str],
    job: BatchJob,
    out: Path | str,
    *,
    backend: str = "local",
    num_workers: int = 1,
    overwrite: bool = False,
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    progress: Progress | None = None,
    within: Callable[[int, int], None] | None = None,
) -> BatchResult:
    """Explain every input (files or folders) into ``out/<input name>/``.

    Args:
        inputs: files and folders (searched recursively for PNG/JPEG/TIFF, NIfTI, .npy).
        job: what to explain.
        out: the output folder (shared by all workers).
        backend: ``"local"`` or ``"ray"`` (needs the ``ray`` extra).
        num_workers: processes (local) or actors (Ray).
        overwrite: redo inputs that are already finished.
        address: the Ray cluster (``None``: a local one; ``"auto"``; ``"ray://host:port"``).
        gpus_per_worker: GPUs per Ray actor (fractions share a GPU).
        progress: called with one line per input (default: nothing).
        within: called with (done, total) within each input: windows or targets (this process
            only; workers of the other backends do not report within an input).

    Returns:
        The inputs done, skipped and failed.
    """
    if backend not in BACKENDS:
        raise OptionError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise OptionError(f"num_workers must be a positive int; got {num_workers!r}")
    files = job.expand([Path(p) for p in inputs], exclude=Path(out))
    settings = job.settings()
    names = [input_name(p, settings) for p in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputFileError(f"several inputs would write to the same folder: {duplicates}")
    for path in files:
        if not path.exists():
            raise InputFileError(f"{path}: no such file")
    resolve_methods(job.methods, job.method_options)
    if job.sliding_window:
        for method in job.methods:
            get_method(method).require_sliding_window()
    out = Path(out)
    say = progress or (lambda line: None)
    with output_folder(out, settings, overwrite=overwrite):
        return _explain_files(
            files,
            job,
            out,
            settings,
            backend,
            num_workers,
            overwrite,
            address,
            gpus_per_worker,
            say,
            within,
        )


def _explain_files(
    files: list[Path],
    job: BatchJob,
    out: Path,
    settings: dict[str, Any],
    backend: str,
    num_workers: int,
    overwrite: bool,
    address: str | None,
    gpus_per_worker: float,
    say: Progress,
    within: Callable[[int, int], None] | None = None,
) -> BatchResult:
    result = BatchResult()
    todo = []
    total = len(files)
    for index, path in enumerate(files, start=1):
        if not overwrite and finished(out, path, settings):
            say(f"[{index}/{total}] {path}: already done, skipped")
            result.skipped.append(path)
        else:
            todo.append((index, path))
    if not todo:
        return result
    if backend == "ray":
        outcomes = _run_ray(job, todo, out, num_workers, address, gpus_per_worker)
    elif num_workers > 1:
        outcomes = _run_processes(job, todo, out, num_workers)
    else:
        built = job.build()
        outcomes = ((index, path, *_run_one(built, path, out, within)) for index, path in todo)
    for index, path, ok, message, count, seconds in outcomes:
        prefix = f"[{index}/{total}] {path}"
        if ok:
            result.done.append(path)
            say(f"{prefix}: {count} files in {seconds:.1f}s")
        else:
            result.failed.append((path, message))
            say(f"{prefix}: FAILED: {message}")
    return result


Outcome = tuple[int, Path, bool, str, int, float]

_WORKER_JOB: _Job | None = None


def _init_worker(job: BatchJob) -> None:
    global _WORKER_JOB
    torch.set_num_threads(1)
    _WORKER_JOB = job.build()


def _work(path: str, out: str) -> tuple[bool, str, int, float]:
    assert _WORKER_JOB is not None
    return _run_one(_WORKER_JOB, Path(path), Path(out))


def _run_processes(
    job: BatchJob, todo: list[tuple[int, Path]], out: Path, workers: int
) -> Iterator[Outcome]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(job,)
    ) as pool:
        futures = {pool.submit(_work, str(path), str(out)): (index, path) for index, path in todo}
        for future in as_completed(futures):
            index, path = futures[future]
            try:
                ok, message, count, seconds = future.result()
            except Exception as error:  # a worker that died: reported, the others go on
                ok, message, count, seconds = False, f"worker failed: {error}", 0, 0.0
            yield index, path, ok, message, count, seconds


def _run_ray(
    job: BatchJob,
    todo: list[tuple[int, Path]],
    out: Path,
    workers: int,
    address: str | None,
    gpus: float,
) -> Iterator[Outcome]:
    try:
        import ray
    except ImportError:
        raise SegCamError("the ray backend needs Ray: pip install 'segcam[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    try:

        @ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=2, max_task_retries=2)
        class Worker:
            def __init__(self, spec: BatchJob) -> None:
                torch.set_num_threads(1)
                self.job = spec.build()

            def run(self, index: int, path: str, where: str) -> Outcome:
                return (index, Path(path), *_run_one(self.job, Path(path), Path(where)))

        remote: Any = Worker
        actors = [remote.remote(job) for _ in range(min(workers, len(todo)))]
        queue = list(todo)
        running: dict[Any, tuple[Any, int, Path]] = {}

        def submit(actor: Any) -> None:
            if queue:
                index, path = queue.pop(0)
                running[actor.run.remote(index, str(path), str(out))] = (actor, index, path)

        for actor in actors:
            submit(actor)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, index, path = running.pop(ref)
            try:
                outcome: Outcome = ray.get(ref)
            except ray.exceptions.RayError as error:  # failed even after its retries
                outcome = (index, path, False, f"worker failed: {type(error).__name__}", 0, 0.0)
            yield outcome
            submit(actor)
    finally:
        if started_here:
            ray.shutdown()
