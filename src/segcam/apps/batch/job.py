"""A batch job: what to explain, as plain data that travels to worker processes and Ray actors.

Also the protocol every kind of input implements (:class:`InputKind`: find, name, digest,
settings, build) and the registry of kinds (:func:`register_input_kind`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

import segcam
from segcam.apps.specs import file_sha256
from segcam.errors import InputFileError

if TYPE_CHECKING:
    from segcam.apps.batch.outputs import RunClaim

__all__ = ["BatchJob", "InputExplainer", "InputKind", "Progress", "register_input_kind"]


Progress = Callable[[int, int], None]
"""Called with (done, total) within one input: windows or targets."""


class InputExplainer(Protocol):
    """What a worker builds once: explains one input into ``out`` and writes its files."""

    def explain(
        self,
        path: Path,
        out: Path,
        progress: Progress | None = None,
        run: RunClaim | None = None,
    ) -> list[Path]:
        """Explain ``path`` into ``out/<name>/``, its manifest last; return the files written.

        The manifest is committed only while ``run`` holds ``out`` (when given).
        """
        ...

    def prepare(
        self,
        path: Path,
        out: Path,
        progress: Progress | None = None,
        run: RunClaim | None = None,
    ) -> Callable[[], list[Path]]:
        """Read and explain ``path``; return the step that writes its files (manifest last).

        ``explain`` is ``prepare(...)()``; a caller may run the step while the next input
        computes (:func:`segcam.apps.batch.backends.run_here`). Nothing is written before it.
        """
        ...


class InputKind(Protocol):
    """One kind of input of a batch: plain files, or nnU-Net cases."""

    def expand(self, inputs: Sequence[Path], exclude: Path | None) -> list[Path]:
        """The inputs among ``inputs`` (files, folders), none under ``exclude``."""
        ...

    def name(self, path: Path) -> str:
        """The name of the input's output folder (safe: inside ``out``)."""
        ...

    def digest(self, path: Path) -> str:
        """The input's SHA-256, as its manifest records it."""
        ...

    def settings(self) -> dict[str, Any]:
        """What this kind adds to the job's settings (recorded, compared on a rerun)."""
        ...

    def build(self, job: BatchJob) -> InputExplainer:
        """The explainer a worker keeps: the model loaded, the targets parsed."""
        ...


_INPUT_KINDS: dict[str, Callable[[BatchJob], InputKind]] = {}


def register_input_kind(name: str, factory: Callable[[BatchJob], InputKind]) -> None:
    """Make ``factory(job)`` the input kind of jobs of kind ``name`` (``files``, ``nnunet``).

    The kinds register themselves when :mod:`segcam.apps.batch` is imported.
    """
    _INPUT_KINDS[name] = factory


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
            inputs are then cases (:mod:`segcam.apps.batch.nnunet_cases`).
        bundle: a MONAI bundle instead of ``model``: ``folder``, ``checkpoint``, ``save_seg``;
            inputs are then images through its pipeline (:mod:`segcam.apps.batch.bundle_inputs`).
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
    bundle: dict[str, Any] | None = None
    recorded: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def kind(self) -> InputKind:
        """The job's kind of input: plain files, nnU-Net cases or images through a bundle."""
        kind = "nnunet" if self.nnunet is not None else "bundle" if self.bundle else "files"
        return _INPUT_KINDS[kind](self)

    def expand(self, inputs: Sequence[Path], exclude: Path | None = None) -> list[Path]:
        """The job's inputs: files (and folders' files), or nnU-Net cases."""
        return self.kind().expand(inputs, exclude)

    def settings(self) -> dict[str, Any]:
        """What the manifest records, and what a rerun must match to skip an input.

        Taken once per run (:meth:`for_run`): the workers record the run's settings, not their
        own reading of the files, which may have changed since.
        """
        if self.recorded is not None:
            return self.recorded
        return self._settings()

    def for_run(self) -> BatchJob:
        """The job with its settings taken now, as every worker of the run records them."""
        return replace(self, recorded=self._settings())

    def _settings(self) -> dict[str, Any]:
        weights = Path(self.weights).resolve() if self.weights else None  # one file, one name
        if weights is not None and not weights.is_file():
            what = "a folder, not a weights file" if weights.is_dir() else "no such file"
            raise InputFileError(f"--weights {self.weights}: {what}")
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
            "depends_on": _dependencies(self.targets, self.model, self.preprocess),
            **self.kind().settings(),
        }
        result: dict[str, Any] = json.loads(json.dumps(settings))  # as the manifest reads back
        return result

    def build(self) -> InputExplainer:
        """Load the model and parse the targets: what a worker needs, built once per worker.

        Raises:
            InputFileError: a file the run's settings name (a mask, the model's module) changed
                since the run took them: this worker read another version.
        """
        built = self.kind().build(self)
        if self.recorded is not None:
            now = _dependencies(self.targets, self.model, self.preprocess)
            recorded = self.recorded.get("depends_on", {})
            changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
            if changed:
                raise InputFileError(
                    f"{changed[0]} changed since the run started; run again to explain with the "
                    f"new file"
                )
        return built


def _dependencies(
    targets: Sequence[str], model: str | None, preprocess: str | None
) -> dict[str, str]:
    """SHA-256 of the files a result depends on besides the input and the weights.

    The mask and region files of the targets, and the Python files of a ``package.module:name``
    model factory and ``--preprocess`` function: a rerun after one of them changed is not an
    "already done" (the folder's settings differ, and it says which).
    """
    from segcam.apps.specs import mask_file

    files: dict[str, str] = {}
    for spec in targets:
        path = mask_file(spec)
        if path is not None and path.is_file():
            files[str(path.resolve())] = file_sha256(path)
    for callable_spec in (model, preprocess):
        text = callable_spec or ""
        module = text.partition(":")[0] if ":" in text else ""
        if module and module != "monai":
            source = _module_file(module)
            if source is not None:
                files[str(source)] = file_sha256(source)
    return files


def _module_file(module: str) -> Path | None:
    """The source file of an importable module (None: not found, or not a file)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(found, "origin", None)
    return Path(origin) if origin and Path(origin).is_file() else None
