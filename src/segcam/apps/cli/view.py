"""``segcam view``: a local web viewer (no input: the demo CT)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

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
    given_model_options,
    intensity,
    model_from_args,
    output_spec,
    refuse_nnunet_only,
    resolve_nnunet_folder,
    sliding_window_of,
)
from segcam.apps.specs import apply_intensity, file_sha256, label_map
from segcam.errors import InputFileError, MissingExtraError
from segcam.io.files import InputFile, read_input
from segcam.io.medical import is_dicom_folder, ras_affine

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Declare ``segcam view``."""
    parser = commands.add_parser(
        "view",
        help="a local web viewer: paint the pixel set, see the maps (no input: the demo CT)",
    )
    parser.add_argument("input", nargs="?", type=Path, metavar="INPUT", help="an image or volume")
    add_model_options(parser)
    add_intensity_options(parser)
    add_classes_option(parser)
    parser.add_argument(
        "--layer", action="append", default=[], metavar="NAME", help="layers offered (repeatable)"
    )
    add_output_option(parser)
    parser.add_argument(
        "--ground-truth",
        type=Path,
        metavar="FILE",
        help="reference labels on the input's grid (NIfTI, .npy, PNG, ...), shown as an outline",
    )
    parser.add_argument(
        "--demo",
        choices=["3d", "2d", "nnunet"],
        default="3d",
        help="which demo network (nnunet: the held-out slab with the demo nnU-Net model)",
    )
    add_sliding_window_option(
        parser, "explain the sliding-window prediction (inputs larger than the model's window)"
    )
    add_nnunet_options(parser, save_seg=False)
    add_bundle_option(
        parser,
        "a MONAI bundle folder: view INPUT through the bundle's own pipeline (its "
        "segmentation, maps on the image's grid)",
    )
    add_memory_format_option(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Serve the viewer until interrupted."""
    try:
        from segcam.apps.viewer.serve import demo_session, file_session, serve
    except ImportError as error:  # pragma: no cover - the extra is part of dev
        raise MissingExtraError(
            f"the viewer needs the 'viewer' extra: pip install 'segcam[viewer]' ({error})"
        ) from None
    _check_port(args.host, args.port)  # before minutes of model loading
    resolve_nnunet_folder(args)
    args.sliding_window = sliding_window_of(args)
    if args.nnunet is None:
        refuse_nnunet_only(args)
    if args.nnunet is not None:
        session = _nnunet_session(args)
    elif args.bundle is not None:
        session = _bundle_session(args)
    elif args.input is None:
        if args.ground_truth is not None:
            raise UsageError("--ground-truth needs an INPUT (the demo shows its own labels)")
        if args.model:
            raise UsageError("--model needs an INPUT to view (without both: the demo CT)")
        session = demo_session(args.demo, args.sliding_window, args.memory_format)
    else:
        if not (args.input.is_file() or is_dicom_folder(args.input)):
            raise UsageError(f"{args.input}: no such file (or a folder without DICOM files)")
        truth = _ground_truth(args.ground_truth)  # before the model loads: a bad file is quick
        model = model_from_args(args)
        data = read_input(args.input)
        array = apply_intensity(data.array, **intensity(args))
        if truth is not None and tuple(truth.shape) != tuple(array.shape[1:]):
            raise UsageError(
                f"--ground-truth {args.ground_truth}: shape {tuple(truth.shape)}, but the input's "
                f"grid is {tuple(array.shape[1:])}"
            )
        session = file_session(
            model,
            array,
            class_names=args.classes,
            layers=args.layer,
            affine=_affine_of(data),
            title=args.input.name,
            output=output_spec(args.output, args.logits_from),
            sliding_window=args.sliding_window,
            intensity=data.array,
            ground_truth=truth,
            provenance={
                "source": str(args.input.resolve()),
                "source_sha256": file_sha256(args.input) if args.input.is_file() else None,
                "model": args.model,
                "model_kwargs": args.model_kwargs,
                "weights": str(args.weights.resolve()) if args.weights else None,
                "weights_sha256": file_sha256(args.weights) if args.weights else None,
            },
            memory_format=args.memory_format,
        )
    try:
        serve(session, host=args.host, port=args.port, browser=not args.no_browser)
    except KeyboardInterrupt:
        # a request may still compute in a worker thread: leave now, with one line
        print("segcam: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    return 0


def _affine_of(data: InputFile) -> np.ndarray | None:
    """Where the volume's voxels lie (RAS): a NIfTI's affine, or NRRD/MetaImage/DICOM geometry.

    With it the viewer shows every volume format in radiological orientation.
    """
    if data.nifti_affine is not None:
        return np.asarray(data.nifti_affine)
    return ras_affine(data.medical) if data.medical is not None else None


def _ground_truth(path: Path | None) -> np.ndarray | None:
    """Reference labels as integers (*S); one usage line when unreadable or not labels."""
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"--ground-truth {path}: no such file")
    labels = read_input(path).array
    labels = labels[0] if labels.shape[0] == 1 else labels
    try:
        return label_map(labels, f"--ground-truth {path}")
    except InputFileError as error:
        raise UsageError(str(error)) from None


WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def _check_port(host: str, port: int) -> None:
    """Refuse a port that is in use (or a bad one) with one line, before loading anything."""
    import socket

    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port}: a port is 0 (a free one) to 65535")
    if host in WILDCARDS:
        raise UsageError(
            f"--host {host} listens on every interface, but the viewer answers only requests "
            f"whose Host is the address it serves: give this machine's own address (e.g. --host "
            f"192.168.1.20), or leave --host out for this machine only"
        )
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UsageError(
                f"cannot listen on {host}:{port} ({error.strerror or error}): choose another "
                f"--port, or leave it out for a free one"
            ) from None


def _nnunet_session(args: argparse.Namespace) -> Any:
    """``--nnunet MODEL_FOLDER CASE_0000.nii.gz``: the case's other channels lie beside it."""
    from segcam.apps.batch.nnunet_cases import folder_facts
    from segcam.apps.viewer.nnunet_session import nnunet_session
    from segcam.nnunet.files import channel_files

    if args.input is None:
        raise UsageError("--nnunet needs a case to view: its _0000 file")
    given = given_model_options(args)
    if given:
        raise UsageError(
            f"--nnunet: {', '.join(given)} do not apply (nnU-Net's plans give the model, its "
            f"preprocessing and its windows)"
        )
    facts = folder_facts(args.nnunet)
    files = channel_files(args.input, facts["file_ending"], facts["channels"])
    return nnunet_session(
        str(args.nnunet),
        [str(f) for f in files],
        folds="all" if args.folds is None else tuple(args.folds),
        checkpoint=args.checkpoint,
        step_size=0.5 if args.step_size is None else args.step_size,
        mirroring=not args.disable_tta,
        trust_checkpoint=args.trust_checkpoint,
        layers=args.layer or None,
        ground_truth=None if args.ground_truth is None else str(args.ground_truth),
        memory_format=args.memory_format,
    )


def _bundle_session(args: argparse.Namespace) -> Any:
    """``--bundle FOLDER IMAGE``: the image through the bundle's preprocessing and inferer."""
    from segcam.apps.viewer.bundle_session import bundle_session

    if args.input is None:
        raise UsageError("--bundle needs an image to view: the file its LoadImaged reads")
    given = given_model_options(args)
    if given:
        raise UsageError(
            f"--bundle: {', '.join(given)} do not apply (the bundle's config gives the model, "
            f"its preprocessing and its inferer)"
        )
    if not args.bundle.is_dir():
        what = "a file, not a bundle folder" if args.bundle.exists() else "no such bundle folder"
        raise UsageError(f"--bundle {args.bundle}: {what}")
    if not args.input.exists():
        raise UsageError(f"{args.input}: no such file")
    if args.ground_truth is not None and not args.ground_truth.is_file():
        raise UsageError(f"--ground-truth {args.ground_truth}: no such file")
    session = bundle_session(
        args.bundle,
        args.input,
        layers=args.layer or None,
        ground_truth=args.ground_truth,
        memory_format=args.memory_format,
    )
    if args.classes:
        if len(args.classes) != max(session.classes, 2):
            raise UsageError(
                f"--classes: {len(args.classes)} names for the bundle's {session.classes} outputs"
            )
        session.class_names = list(args.classes)
    return session
