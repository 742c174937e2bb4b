"""The ``segcam`` command line: explain, layers, methods, demo.

Every command calls the public API only. Errors print one line and exit with status 2 (1 when some
inputs of a batch failed); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import segcam
from segcam.batch import (
    BACKENDS,
    BatchJob,
    expand_inputs,
    explain_file,
    explain_files,
    finished,
)
from segcam.errors import SegCamError
from segcam.io.files import (
    InputFileError,
    read_input,
)
from segcam.methods import REGISTRY, get_method, resolve_options
from segcam.postprocess import NORMALIZATIONS
from segcam.recording import describe_layers
from segcam.specs import (
    SpecError,
    apply_intensity,
    load_model,
    parse_target,
)

__all__ = ["main"]


class CliError(Exception):
    """A problem to report in one line."""


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"spatial_dims\": 2}'")
    return value


def _sliding_window(text: str) -> dict[str, Any]:
    """``ROI[,OVERLAP]``: 96, 96x96x64, 96,0.5 -> {"roi_size": ..., "overlap": ...}."""
    roi_text, _, overlap_text = text.partition(",")
    try:
        sizes = [int(part) for part in roi_text.lower().split("x")]
        overlap = float(overlap_text) if overlap_text else 0.25
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ROI[,OVERLAP], e.g. 96 or 96x96x64,0.5"
        ) from None
    if any(size < 1 for size in sizes) or not 0 <= overlap < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: window sizes must be positive and the overlap in [0, 1)"
        )
    return {"roi_size": sizes[0] if len(sizes) == 1 else sizes, "overlap": overlap}


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="package.module:factory or monai:NetName")
    parser.add_argument(
        "--model-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="keyword arguments for the factory",
    )
    parser.add_argument("--weights", type=Path, help="state_dict (.pt/.pth, or .safetensors)")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow --weights to be a pickled whole model (runs code from it)",
    )


def _add_intensity_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--window",
        type=_pair,
        metavar="LOW,HIGH",
        help="clip intensities to [LOW, HIGH] and scale to [0, 1]",
    )
    parser.add_argument("--zscore", action="store_true", help="subtract mean, divide by std")
    parser.add_argument("--minmax", action="store_true", help="scale intensities to [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; method choices come from the registry."""
    parser = argparse.ArgumentParser(prog="segcam", description=segcam.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"segcam {segcam.__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    explain = commands.add_parser("explain", help="explain inputs (files or folders)")
    explain.add_argument("inputs", nargs="+", type=Path, metavar="INPUT")
    _add_model_options(explain)
    explain.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="SPEC",
        help="predicted:C, probability:C[:T], all:C, mask:C:FILE, "
        "region:C[:FILE], pixel:C:I,J[,K], box:C:I0,J0,I1,J1 (repeatable)",
    )
    explain.add_argument(
        "--classes",
        type=lambda s: s.split(","),
        default=[],
        help="class names in order, e.g. background,liver,tumour",
    )
    explain.add_argument(
        "--layer",
        action="append",
        required=True,
        metavar="NAME",
        help="layer name (repeatable; see `segcam layers`)",
    )
    explain.add_argument(
        "--method",
        action="append",
        choices=list(REGISTRY),
        metavar="NAME",
        help=f"one of {', '.join(REGISTRY)} (repeatable; default seg-hires-grad-cam)",
    )
    explain.add_argument(
        "--method-option",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="a method's option, e.g. seg-xres-cam:pool_size=4 or seg-score-cam:max_channels=64 "
        "(repeatable; `segcam methods` lists them)",
    )
    explain.add_argument("--out", type=Path, required=True, help="output folder")
    _add_intensity_options(explain)
    explain.add_argument(
        "--preprocess",
        metavar="package.module:function",
        help="a function (C, *S) array -> array, applied last",
    )
    explain.add_argument("--no-relu", action="store_true", help="keep negative evidence")
    explain.add_argument("--no-upsample", action="store_true", help="maps at layer resolution")
    explain.add_argument("--normalize", choices=["none", *NORMALIZATIONS], default="none")
    explain.add_argument("--output", help="key or index of the logits in the model's output")
    explain.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    explain.add_argument("--overwrite", action="store_true", help="redo finished inputs")
    explain.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local (this machine) or ray (a Ray cluster; pip install 'segcam[ray]')",
    )
    explain.add_argument(
        "--num-workers", type=int, default=1, help="processes (local) or Ray actors (default 1)"
    )
    explain.add_argument(
        "--address", default=None, help="Ray cluster: auto, ray://host:10001 (default: start one)"
    )
    explain.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor (e.g. 0.5)"
    )
    explain.add_argument(
        "--sliding-window",
        type=_sliding_window,
        metavar="ROI[,OVERLAP]",
        help="explain the sliding-window prediction (MONAI-style Gaussian blending): window "
        "size 96 or 96x96x64, optional overlap (default 0.25), e.g. 96x96x64,0.5",
    )

    layers = commands.add_parser("layers", help="list layers with output shapes")
    _add_model_options(layers)
    layers.add_argument(
        "--input-shape",
        default=None,
        metavar="N,C,...",
        help="example input shape (default 1,1,128,128 or 1,1,64,64,64)",
    )
    layers.add_argument("--all", action="store_true", help="also list layers off the path")

    commands.add_parser("methods", help="list the registered methods")

    view = commands.add_parser(
        "view",
        help="a local web viewer: paint the pixel set, see the maps (no input: the demo CT)",
    )
    view.add_argument("input", nargs="?", type=Path, metavar="INPUT", help="an image or volume")
    _add_model_options(view)
    _add_intensity_options(view)
    view.add_argument("--classes", type=lambda s: s.split(","), default=[], help="class names")
    view.add_argument(
        "--layer", action="append", default=[], metavar="NAME", help="layers offered (repeatable)"
    )
    view.add_argument("--output", help="key or index of the logits in the model's output")
    view.add_argument("--demo", choices=["3d", "2d"], default="3d", help="which demo network")
    view.add_argument(
        "--sliding-window",
        type=_sliding_window,
        metavar="ROI[,OVERLAP]",
        help="explain the sliding-window prediction (inputs larger than the model's window)",
    )
    view.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    view.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    view.add_argument("--no-browser", action="store_true", help="do not open a browser")

    evaluate = commands.add_parser(
        "evaluate", help="score the methods on the built-in benchmarks (tables, plots)"
    )
    evaluate.add_argument(
        "--data",
        action="append",
        metavar="NAME|FOLDER",
        help="built-in benchmark: evidence (known evidence), ct (held-out CT "
        "slices), randomisation (cascading parameter randomisation); or a "
        "folder of inputs scored against --labels",
    )
    evaluate.add_argument(
        "--labels",
        type=Path,
        metavar="FOLDER",
        help="ground-truth label maps, same file names as the --data inputs",
    )
    _add_model_options(evaluate)
    evaluate.add_argument("--layer", action="append", metavar="NAME", help="(folder mode)")
    evaluate.add_argument(
        "--classes",
        type=lambda s: s.split(","),
        default=[],
        help="class names in order (folder mode; classes 1.. are scored)",
    )
    _add_intensity_options(evaluate)
    evaluate.add_argument("--methods", nargs="+", choices=list(REGISTRY), default=list(REGISTRY))
    evaluate.add_argument("--count", type=int, default=100, help="evidence scenes (default 100)")
    evaluate.add_argument("--out", type=Path, default=Path("reports"))

    demo = commands.add_parser("demo", help="the CT liver-tumour demo (report.html, NIfTI)")
    demo.add_argument("--out", type=Path, default=Path("demo-out"))
    demo.add_argument("--fetch", action="store_true", help="download the demo CT if missing")
    return parser


# ---------------------------------------------------------------- explain


def _command_explain(args: argparse.Namespace) -> int:
    methods = args.method or ["seg-hires-grad-cam"]
    method_options = parse_method_options(args.method_option, methods)
    if args.sliding_window:
        free = [m for m in methods if not get_method(m).needs_gradient]
        if free:
            raise CliError(
                f"--sliding-window explains gradient methods only; {', '.join(free)} is "
                f"gradient-free"
            )
    output: Any = args.output
    if output is not None and output.lstrip("-").isdigit():
        output = int(output)
    for spec in args.target:  # parse once here: a bad target is one clear line, before any work
        parse_target(spec, args.classes)
    job = BatchJob(
        model=args.model,
        weights=str(args.weights) if args.weights else None,
        targets=tuple(args.target),
        layers=tuple(args.layer),
        methods=tuple(methods),
        classes=tuple(args.classes),
        model_kwargs=args.model_kwargs,
        trust_pickle=args.trust_pickle,
        method_options=method_options,
        intensity={"window": args.window, "zscore": args.zscore, "minmax": args.minmax},
        explain={
            "relu": not args.no_relu,
            "upsample": not args.no_upsample,
            "normalize": None if args.normalize == "none" else args.normalize,
            "output": output,
        },
        sliding_window=args.sliding_window,
        preprocess=args.preprocess,
        device=args.device,
    )
    files = expand_inputs(args.inputs)
    if len(files) == 1 and args.backend == "local":  # one input: its error is the command's
        job.settings()
        built = job.build()
        if args.overwrite or not finished(args.out, files[0], job.settings()):
            started = time.perf_counter()
            written = explain_file(files[0], built, args.out)
            seconds = time.perf_counter() - started
            print(f"[1/1] {files[0]}: {len(written)} files in {seconds:.1f}s", file=sys.stderr)
        else:
            print(f"[1/1] {files[0]}: already done, skipped", file=sys.stderr)
        print(f"outputs in {args.out}")
        return 0
    result = explain_files(
        files,
        job,
        args.out,
        backend=args.backend,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        address=args.address,
        gpus_per_worker=args.gpus_per_worker,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"outputs in {args.out}")
    if result.failed:
        total = len(result.done) + len(result.skipped) + len(result.failed)
        print(f"{len(result.failed)} of {total} inputs failed:", file=sys.stderr)
        for path, message in result.failed:
            print(f"  {path}: {message}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- layers, methods


def _command_layers(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.weights, args.model_kwargs, trust_pickle=args.trust_pickle)
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise CliError(
                f"--input-shape {args.input_shape!r}: expected N,C,H,W or N,C,D,H,W"
            ) from None
    else:
        dims = getattr(model, "dimensions", None) or getattr(model, "spatial_dims", None) or 2
        in_channels = getattr(model, "in_channels", None) or 1
        shape = (1, int(in_channels), *([128] * 2 if int(dims) == 2 else [64] * 3))
    table = describe_layers(model, torch.zeros(shape))
    print(f"{'layer':60s} {'type':24s} {'output shape':22s} on path")
    for info in table:
        if not (info.on_path or args.all):
            continue
        shape_text = str(info.shape) if info.shape is not None else "(not a tensor)"
        calls = f" (runs {info.calls}x)" if info.calls > 1 else ""
        name = info.name or "(model)"
        print(
            f"{name:60s} {info.type_name:24s} {shape_text:22s} {'yes' if info.on_path else 'no'}"
            f"{calls}"
        )
    return 0


def _command_methods(args: argparse.Namespace) -> int:
    width = max(len(name) for name in REGISTRY)
    for name, method in REGISTRY.items():
        print(f"{name:{width}s}  {method.summary}")
        print(f"{'':{width}s}  {method.reference}")
        kind = {
            "gradient": "gradient: one backward pass per target",
            "activation": "gradient-free: activations only",
            "model": "gradient-free: forward passes on masked inputs",
        }[method.kind]
        options = ", ".join(f"{key}={value!r}" for key, value in method.options.items())
        print(f"{'':{width}s}  {kind}" + (f"; options: {options}" if options else ""))
    return 0


def _command_view(args: argparse.Namespace) -> int:
    try:
        from segcam.viewer.serve import demo_session, file_session, serve
    except ImportError as error:  # pragma: no cover - the extra is part of dev
        raise CliError(
            f"the viewer needs the 'viewer' extra: pip install 'segcam[viewer]' ({error})"
        ) from None
    if args.input is None:
        if args.model:
            raise CliError("--model needs an INPUT to view (without both: the demo CT)")
        session = demo_session(args.demo, args.sliding_window)
    else:
        if not args.input.is_file():
            raise CliError(f"{args.input}: no such file")
        model = load_model(
            args.model, args.weights, args.model_kwargs, trust_pickle=args.trust_pickle
        )
        data = read_input(args.input)
        array = apply_intensity(
            data.array, window=args.window, zscore=args.zscore, minmax=args.minmax
        )
        output: Any = args.output
        if output is not None and output.lstrip("-").isdigit():
            output = int(output)
        try:
            session = file_session(
                model,
                array,
                class_names=args.classes,
                layers=args.layer,
                affine=data.nifti_affine,
                title=args.input.name,
                output=output,
                sliding_window=args.sliding_window,
            )
        except ValueError as error:
            raise CliError(str(error)) from None
    serve(session, host=args.host, port=args.port, browser=not args.no_browser)
    return 0


def _option_value(text: str) -> Any:
    """An option's value: none, an int, a float, ints separated by commas, or the text."""
    if text.lower() == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if "," in text:
        try:
            return [int(part) for part in text.split(",")]
        except ValueError:
            pass
    return text


def parse_method_options(specs: list[str], methods: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD:KEY=VALUE`` strings as {method: {key: value}}, checked against the registry."""
    result: dict[str, dict[str, Any]] = {}
    for spec in specs:
        method, colon, assignment = spec.partition(":")
        key, equals, value = assignment.partition("=")
        if not colon or not equals or not key:
            raise CliError(f"--method-option {spec!r}: expected METHOD:KEY=VALUE")
        if method not in methods:
            raise CliError(
                f"--method-option {spec!r}: method {method!r} is not among --method "
                f"({', '.join(methods)})"
            )
        result.setdefault(method, {})[key] = _option_value(value)
    for method, options in result.items():
        try:
            resolve_options(get_method(method), options)
        except ValueError as error:
            raise CliError(f"--method-option: {error}") from None
    return result


def _command_evaluate(args: argparse.Namespace) -> int:
    from segcam.evaluation import run_evaluation, score_against_truth, write_outputs

    built_in = {"evidence", "ct", "randomisation"}
    data = args.data or sorted(built_in)
    written = run_evaluation([d for d in data if d in built_in], args.methods, args.out, args.count)
    for folder in (Path(d) for d in data if d not in built_in):
        if not folder.is_dir():
            raise CliError(f"--data {folder}: neither a built-in benchmark nor a folder")
        if args.labels is None or args.model is None or not args.layer:
            raise CliError("--data FOLDER needs --labels FOLDER, --model and --layer")
        model = load_model(
            args.model, args.weights, args.model_kwargs, trust_pickle=args.trust_pickle
        )
        intensity = {"window": args.window, "zscore": args.zscore, "minmax": args.minmax}
        records: list[dict[str, Any]] = []
        files = expand_inputs([folder])
        for index, path in enumerate(files, start=1):
            label_path = args.labels / path.name
            if not label_path.is_file():
                raise CliError(f"{path}: no label map {label_path}")
            image = apply_intensity(read_input(path).array, **intensity)
            truth = torch.from_numpy(read_input(label_path).array[0].round().astype(np.int64))
            classes = {
                (args.classes[c] if c < len(args.classes) else str(c)): c
                for c in range(1, int(truth.max()) + 1)
            }
            records += score_against_truth(
                model,
                torch.from_numpy(image)[None],
                truth[None],
                args.methods,
                {name: name for name in args.layer},
                classes,
                dataset=folder.name,
                sample_names=[path.name],
            )
            print(f"[{index}/{len(files)}] {path}", file=sys.stderr)
        written += write_outputs(folder.name, records, args.out)
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from segcam.demo_report import run_demo

    return run_demo(args.out, fetch=args.fetch)


COMMANDS = {
    "explain": _command_explain,
    "layers": _command_layers,
    "methods": _command_methods,
    "view": _command_view,
    "demo": _command_demo,
    "evaluate": _command_evaluate,
}


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """One line per warning on the command line, without Python's file and source line."""
    print(f"segcam: warning: {message}", file=sys.stderr)


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--window -200,300`` -> ``--window=-200,300``: argparse would read -200,300 as an option."""
    joined: list[str] = []
    index = 0
    while index < len(argv):
        if argv[index] == "--window" and index + 1 < len(argv):
            joined.append(f"--window={argv[index + 1]}")
            index += 2
        else:
            joined.append(argv[index])
            index += 1
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segcam`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    previous, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("segcam: interrupted", file=sys.stderr)
        return 130
    except (CliError, SegCamError, InputFileError, SpecError, OSError) as error:
        if args.debug:
            raise
        print(f"segcam: error: {error}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
