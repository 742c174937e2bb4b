"""The layout's rules: the library never imports an application; one error contract."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import segcam
from segcam import errors

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "segcam"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """import-linter with the project's contracts on the package under ``tree``/src."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=120,
    )


def test_both_import_contracts_hold_on_the_tree_as_it_is(tmp_path):
    shutil.copytree(SRC, tmp_path / "src" / "segcam", ignore=shutil.ignore_patterns("*.pt"))
    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "3 kept, 0 broken" in kept.stdout


@pytest.mark.parametrize(
    ("module", "imported", "contract"),
    [
        ("core.py", "segcam.apps.batch.run", "layers"),  # the library importing an application
        ("targets.py", "segcam.core", "layers"),  # a part below importing a driver
        ("explanation.py", "segcam.metrics", "layers"),  # `|` siblings: a circle begins there
        ("fusion.py", "segcam.explanation", "layers"),  # the circle that was (fusion below)
        ("nnunet/windows.py", "segcam.nnunet.predict", "nnU-Net stages"),  # a stage reaching up
        ("apps/batch/run.py", "segcam.recording", "public API"),  # an app off the public API
        ("apps/viewer/session.py", "segcam.core", "public API"),
    ],
)
def test_each_import_contract_breaks_when_its_rule_is_broken(tmp_path, module, imported, contract):
    shutil.copytree(SRC, tmp_path / "src" / "segcam", ignore=shutil.ignore_patterns("*.pt"))
    source = tmp_path / "src" / "segcam" / module
    source.write_text(source.read_text(encoding="utf-8") + f"\nimport {imported}  # noqa\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0
    importer = "segcam." + module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {imported}" in broken.stdout
    name = {
        "layers": "library layers (docs/architecture.md)",
        "public API": "applications use the public API only",
        "nnU-Net stages": "nnU-Net by stage (docs/architecture.md)",
    }[contract]
    assert f"{name} BROKEN" in broken.stdout


def test_import_contract_fails_for_an_unlisted_library_module(tmp_path):
    shutil.copytree(SRC, tmp_path / "src" / "segcam", ignore=shutil.ignore_patterns("*.pt"))
    (tmp_path / "src" / "segcam" / "newmodule.py").write_text('"""A new module."""\n')
    result = _lint_imports(tmp_path)
    assert result.returncode != 0 and "newmodule" in result.stdout + result.stderr


def test_importing_segcam_loads_no_application():
    code = "import segcam, sys; print(sorted(m for m in sys.modules if m.startswith('segcam.')))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "segcam.core" in loaded and "segcam.apps" not in loaded


def _all_modules() -> list[str]:
    return [
        info.name
        for info in pkgutil.walk_packages(segcam.__path__, "segcam.")
        if not info.name.endswith("__main__")
    ]


def test_every_exception_segcam_defines_is_a_segcam_error():
    defined = {}
    for name in _all_modules():
        module = importlib.import_module(name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if value.__module__.startswith("segcam") and issubclass(value, BaseException):
                defined[f"{value.__module__}.{value.__qualname__}"] = value
    exceptions = {k: v for k, v in defined.items() if not issubclass(v, Warning)}
    assert len(exceptions) >= 20, sorted(exceptions)  # the walk found the package's errors
    outside = sorted(k for k, v in exceptions.items() if not issubclass(v, errors.SegCamError))
    # the viewer's size guard never leaves the app: it is turned into a 413 response
    assert outside == ["segcam.apps.viewer.app._TooLargeError"]
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, BaseException):
            assert issubclass(value, (errors.SegCamError, Warning)), name


BUILT_IN_RAISES = {"ValueError", "RuntimeError", "TypeError", "KeyError", "IndexError"}


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_bare_built_in_error_is_raised(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bare = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
            called = node.exc.func
            if isinstance(called, ast.Name) and called.id in BUILT_IN_RAISES:
                bare.append(f"line {node.lineno}: raise {called.id}")
    assert not bare, bare


def test_no_module_takes_part_in_an_import_circle():
    import grimp

    graph = grimp.build_graph("segcam")
    circles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None:
                circles.append((importer, *back))
    assert circles == []
