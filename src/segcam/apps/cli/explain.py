"""``segcam explain``: explain inputs (files or folders) into an output folder.

All methods of one run share each input's forward pass and its backward passes (one per target).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from segcam.apps.batch import BACKENDS, BatchJob, explain_files
from segcam.apps.cli.options import (
    UsageError,
    add_bundle_option,
    add_classes_option,
    add_intensity_options,
    add_memory_format_option,
    add_model_options,
    add_nnunet_options,
    add_output_option,
    add_sliding_window_option,
    check_device,
    given_model_options,
    intensity,
    non_negative_float,
    parse_method_options,
    positive_int,
    refuse_nnunet_only,
    resolve_nnunet_folder,
    sliding_window_of,
)
from segcam.apps.cli.progress import ProgressDisplay
from segcam.apps.naming import printable
from segcam.apps.specs import parse_target
from segcam.errors import MethodNotSupportedError
from segcam.methods import REGISTRY, get_method
from segcam.postprocess import NORMALIZATIONS

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Declare ``segcam explain`` and its options."""
    parser = commands.add_parser("explain", help="explain inputs (files or folders)")
    parser.add_argument("inputs", nargs="*", type=Path, metavar="INPUT")
    parser.add_argument(
        "-i",
        dest="more_inputs",
        action="append",
        type=Path,
        default=[],
        metavar="INPUT",
        help="an input (file or folder), as nnUNetv2_predict -i; beside or instead of INPUT",
    )
    add_model_options(parser)
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="SPEC",
        help="predicted:C, probability:C[:T], all:C, mask:C:FILE, "
        "region:C[:FILE], pixel:C:I,J[,K], box:C:I0,J0,I1,J1 (repeatable)",
    )
    add_classes_option(parser)
    parser.add_argument(
        "--layer",
        action="append",
        required=True,
        metavar="NAME",
        help="layer name (repeatable; see `segcam layers`)",
    )
    parser.add_argument(
        "--method",
        action="append",
        choices=list(REGISTRY),
        metavar="NAME",
        help=f"one of {', '.join(REGISTRY)} (repeatable; default seg-hires-grad-cam; several "
        f"methods share the forward and backward passes)",
    )
    parser.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="a method's option, e.g. seg-xres-cam:pool_size=4 or seg-score-cam:max_channels=64 "
        "(repeatable; `segcam methods` lists them)",
    )
    parser.add_argument(
        "--out", "-o", type=Path, required=True, help="output folder (-o as nnUNetv2_predict)"
    )
    add_intensity_options(parser)
    parser.add_argument(
        "--preprocess",
        metavar="package.module:function",
        help="a function (C, *S) array -> array, applied last",
    )
    parser.add_argument("--no-relu", action="store_true", help="keep negative evidence")
    parser.add_argument("--no-upsample", action="store_true", help="maps at layer resolution")
    parser.add_argument("--normalize", choices=["none", *NORMALIZATIONS], default="none")
    add_output_option(parser)
    parser.add_argument(
        "--device", "-device", default="cpu", help="cpu, cuda, cuda:1, mps ... (-device too)"
    )
    add_memory_format_option(parser)
    parser.add_argument("--overwrite", action="store_true", help="redo finished inputs")
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress (bars on a terminal, else a line per input); errors still print",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local (this machine) or ray (a Ray cluster; pip install 'segcam[ray]')",
    )
    parser.add_argument(
        "--num-workers",
        type=positive_int,
        default=1,
        help="processes (local) or Ray actors (default 1)",
    )
    parser.add_argument(
        "--address", default=None, help="Ray cluster: auto, ray://host:10001 (default: start one)"
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=non_negative_float,
        default=0.0,
        help="GPUs per Ray actor (e.g. 0.5)",
    )
    parser.add_argument(
        "--map-format",
        choices=["auto", "nifti", "nrrd", "mha", "dicom"],
        default="auto",
        help="3D maps: auto = the input's own format with its geometry (for a DICOM series: "
        "DICOM Parametric Maps referencing it, and the pixel sets as a DICOM Segmentation), or "
        "nifti/nrrd/mha/dicom",
    )
    parser.add_argument(
        "--series", metavar="UID", help="the DICOM series to read when a folder holds several"
    )
    add_nnunet_options(parser)
    add_bundle_option(
        parser,
        "a MONAI bundle folder (the Model Zoo's layout): explain its prediction through its own "
        "preprocessing, inferer and Invertd, maps on the original image (inputs: the images "
        "its LoadImaged reads; classes from its metadata.json)",
    )
    add_sliding_window_option(
        parser,
        "explain the sliding-window prediction (MONAI-style Gaussian blending): window "
        "size 96 or 96x96x64, optional overlap (default 0.25), e.g. 96x96x64,0.5",
    )
    parser.set_defaults(run=run)


def _nnunet_job(args: argparse.Namespace, methods: list[str], method_options: Any) -> BatchJob:
    """``--nnunet``: the options nnU-Net does not take are refused; targets use its classes."""
    from segcam.apps.batch.nnunet_cases import folder_facts, parse_case_target

    given = given_model_options(args)
    for flag, value in (("--classes", args.classes), ("--series", args.series)):
        if value:
            given.append(flag)
    if args.map_format != "auto":
        given.append("--map-format")
    if given:
        raise UsageError(
            f"--nnunet: {', '.join(given)} do not apply (nnU-Net's plans give the model, its "
            f"preprocessing, windows and classes; maps take the case's own format)"
        )
    facts = folder_facts(args.nnunet)
    for spec in args.target:
        parse_case_target(spec, facts["classes"], reverse=False)
    check_device(args.device)
    return BatchJob(
        model=None,
        weights=None,
        targets=tuple(args.target),
        layers=tuple(args.layer),
        methods=tuple(methods),
        classes=tuple(facts["classes"]),
        method_options=method_options,
        explain={
            "relu": not args.no_relu,
            "memory_format": args.memory_format,
            "upsample": not args.no_upsample,
            "normalize": None if args.normalize == "none" else args.normalize,
        },
        device=args.device,
        nnunet={
            "folder": str(args.nnunet),
            "folds": "all" if args.folds is None else list(args.folds),
            "checkpoint": args.checkpoint,
            "step_size": 0.5 if args.step_size is None else args.step_size,
            "mirroring": not args.disable_tta,
            "save_seg": args.save_seg,
            "per_fold": args.per_fold,
            "trust_checkpoint": args.trust_checkpoint,
        },
    )


def _require_gradient_methods(methods: list[str], flag: str) -> None:
    """Windows take gradient methods only: another is one line naming ``flag``, no traceback."""
    for method in methods:
        try:
            get_method(method).require_sliding_window()
        except MethodNotSupportedError as error:
            raise UsageError(f"{flag}: {error}") from None


def _bundle_job(args: argparse.Namespace, methods: list[str], method_options: Any) -> BatchJob:
    """``--bundle``: the bundle's config gives the model, its pipeline and its windows."""
    from segcam.apps.batch.bundle_inputs import bundle_classes

    given = given_model_options(args)
    if args.nnunet is not None:
        given.insert(0, "--nnunet")
    if args.no_upsample:
        given.append("--no-upsample")
    if given:
        raise UsageError(
            f"--bundle: {', '.join(given)} do not apply (the bundle's config gives the model, its "
            f"preprocessing and its inferer; maps lie on the original image)"
        )
    refuse_nnunet_only(args, allowed=("save_seg",))
    if not args.bundle.is_dir():
        what = "a file, not a bundle folder" if args.bundle.exists() else "no such bundle folder"
        raise UsageError(f"--bundle {args.bundle}: {what}")
    classes = list(args.classes) or list(bundle_classes(args.bundle))
    for spec in args.target:
        parse_target(spec, classes)
    _require_gradient_methods(methods, "--bundle")
    check_device(args.device)
    return BatchJob(
        model=None,
        weights=None,
        targets=tuple(args.target),
        layers=tuple(args.layer),
        methods=tuple(methods),
        classes=tuple(classes),
        method_options=method_options,
        explain={
            "relu": not args.no_relu,
            "memory_format": args.memory_format,
            "normalize": None if args.normalize == "none" else args.normalize,
        },
        device=args.device,
        map_format=args.map_format,
        series_uid=args.series,
        bundle={
            "folder": str(args.bundle.resolve()),
            "checkpoint": "models/model.pt",
            "save_seg": args.save_seg,
        },
    )


def job_from_args(args: argparse.Namespace) -> BatchJob:
    """The batch job the options describe, checked before any model is loaded."""
    methods = list(dict.fromkeys(args.method or ["seg-hires-grad-cam"]))
    method_options = parse_method_options(args.method_option, methods)
    resolve_nnunet_folder(args)
    args.sliding_window = sliding_window_of(args)
    if args.nnunet is not None:
        return _nnunet_job(args, methods, method_options)
    if args.bundle is not None:
        return _bundle_job(args, methods, method_options)
    refuse_nnunet_only(args)
    if args.sliding_window:
        _require_gradient_methods(methods, "--sliding-window")
    for spec in args.target:  # parse once here: a bad target is one clear line, before any work
        parse_target(spec, args.classes)
    check_device(args.device)
    return BatchJob(
        model=args.model,
        weights=str(args.weights) if args.weights else None,
        targets=tuple(args.target),
        layers=tuple(args.layer),
        methods=tuple(methods),
        classes=tuple(args.classes),
        model_kwargs=args.model_kwargs,
        trust_pickle=args.trust_pickle,
        weights_key=args.weights_key,
        method_options=method_options,
        intensity=intensity(args),
        explain={
            "relu": not args.no_relu,
            "memory_format": args.memory_format,
            "upsample": not args.no_upsample,
            "normalize": None if args.normalize == "none" else args.normalize,
            "output": args.output,
            "logits_from": args.logits_from,
        },
        sliding_window=args.sliding_window,
        preprocess=args.preprocess,
        device=args.device,
        map_format=args.map_format,
        series_uid=args.series,
    )


def run(args: argparse.Namespace) -> int:
    """Explain every input; 0 when all succeed, 1 when some failed.

    One input and many go the same way (:func:`segcam.apps.batch.explain_files`); a single
    input explained here raises its error, which is then the command's (one line, exit 2).
    """
    args.inputs = [*args.inputs, *args.more_inputs]
    if not args.inputs:
        raise UsageError("give the inputs: INPUT ... (files or folders), or -i FOLDER")
    job = job_from_args(args)
    files = job.expand(args.inputs, exclude=args.out)
    with ProgressDisplay(len(files), quiet=args.quiet) as display:
        result = explain_files(
            files,
            job,
            args.out,
            backend=args.backend,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
            address=args.address,
            gpus_per_worker=args.gpus_per_worker,
            progress=display.line,
            within=display.within,
            raise_errors=len(files) == 1 and args.backend == "local" and args.num_workers == 1,
        )
    if Path(args.out).is_dir():  # a run that made its folder and produced nothing removed it
        print(f"outputs in {args.out}")
    if result.failed:
        total = len(result.done) + len(result.skipped) + len(result.failed)
        print(f"{len(result.failed)} of {total} inputs failed:", file=sys.stderr)
        for path, message in result.failed:
            print(f"  {printable(path)}: {printable(message)}", file=sys.stderr)
        return 1
    return 0
