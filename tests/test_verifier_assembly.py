"""The bundle's ``verify.py`` is the verifier package assembled into one file: it runs without torch or
RobustEdge, holds every definition of the package verbatim and nothing else, and says what the library
says. The bundle here is written by hand (a one-layer ONNX classifier), so no export runs."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from robustedge.verifier import Gate, sha256
from robustedge.verifier.assemble import MODULES, assemble

PACKAGE = Path(__file__).resolve().parents[1] / "robustedge" / "verifier"
HIDE = "import runpy, sys; sys.modules['torch'] = None; sys.modules['robustedge'] = None; "


def _tiny_onnx(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(path))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A bundle of one ONNX file (a linear classifier on 1x4x4 images), its samples and manifest."""
    out = tmp_path_factory.mktemp("tiny") / "bundle"
    out.mkdir()
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(16, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    _tiny_onnx(out / "model.onnx", weight, bias)
    x = rng.random((32, 1, 4, 4), dtype=np.float32)
    adv = np.clip(x + rng.uniform(-0.1, 0.1, x.shape).astype(np.float32), 0, 1)
    logits = lambda images: images.reshape(len(images), -1) @ weight + bias  # noqa: E731
    pred = logits(x).argmax(1).astype(np.int64)
    y = np.where(np.arange(32) % 4 == 0, (pred + 1) % 3, pred).astype(np.int64)  # 75% clean accuracy
    np.savez_compressed(out / "verify.npz", x=x, y=y, torch_pred=pred, adv_pgd20=adv)
    (out / "verify.py").write_text(assemble(), encoding="utf-8")
    torch_row = {"clean": float((pred == y).mean()), "agreement": 1.0,
                 "transfer_pgd20": float((logits(adv).argmax(1) == y).mean())}
    torch_row["worst"] = float(((pred == y) & (logits(adv).argmax(1) == y)).mean())
    manifest = {
        "format": "robustedge-bundle/1", "input": {"name": "input", "shape": [1, 4, 4]},
        "output": {"name": "logits", "classes": ["a", "b", "c"]}, "eps": 0.1,
        "files": {"onnx": {"file": "model.onnx", "sha256": sha256(out / "model.onnx"),
                           "bytes": (out / "model.onnx").stat().st_size}},
        "samples": {"file": "verify.npz", "sha256": sha256(out / "verify.npz"), "n": 32, "attacks": ["pgd20"]},
        "verifier": {"file": "verify.py", "sha256": sha256(out / "verify.py")},
        "table": {"torch": torch_row}, "gate": Gate().to_dict(),
        "options": {"square_n": 0, "square_queries": 1, "seed": 0},
    }
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return out


def _run_bundle_verifier(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """``python verify.py BUNDLE ARGS`` with torch and RobustEdge unimportable."""
    code = HIDE + (f"sys.argv = ['verify.py', *{list(args)!r}]; "
                   f"runpy.run_path({str(bundle / 'verify.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=bundle.parent)


def _without_latency(text: str) -> list[str]:
    """The output's lines, the table's latency cells left out (they are measured each run)."""
    return [" | ".join(line.split(" | ")[:-2]) if line.startswith("|") else line for line in text.splitlines()]


def _library(argv: list[str]) -> tuple[int, str, str]:
    from robustedge.verifier.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # --help
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def test_the_assembled_verifier_runs_without_torch_and_says_what_the_library_says(bundle):
    proc = _run_bundle_verifier(bundle)  # the default bundle: the folder verify.py is in
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("torch = the numbers measured at export time") and lines[-1] == "gate passed"
    assert next(line for line in lines if line.startswith("| onnx |")).split(" | ")[1:3] == ["75.0", "100.0"]
    code, out, err = _library([str(bundle)])
    assert (code, _without_latency(out), err) == (0, _without_latency(proc.stdout), proc.stderr)

    strict = _run_bundle_verifier(bundle, str(bundle), "--max-drop", "0", "--min-agreement", "1")
    assert strict.returncode == _library([str(bundle), "--max-drop", "0", "--min-agreement", "1"])[0]


def test_the_assembled_verifier_help_and_refusals_match_the_library(bundle, tmp_path):
    proc = _run_bundle_verifier(bundle, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: verify.py")
    code, out, _ = _library(["--help"])
    assert code == 0 and out.split("\n\n", 1)[1] == proc.stdout.split("\n\n", 1)[1]  # the same text past the usage
    assert "python verify.py [BUNDLE]" in proc.stdout

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes() + b"\0")
    for argv in ([str(broken)], [str(bundle), "--formats", "ort"], [str(bundle), "--max-drop", "2"]):
        proc = _run_bundle_verifier(bundle, *argv)
        code, out, err = _library(argv)
        assert proc.returncode == code == 2 and proc.stderr == err and proc.stderr.count("\n") == 1, proc.stderr


def _statements(tree: ast.Module, text: str) -> list[tuple[str, str]]:
    """(ast dump, source) of each top-level statement but the docstring, the imports and the footer."""
    found = []
    for index, node in enumerate(tree.body):
        if index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'":
            continue
        found.append((ast.dump(node), ast.get_source_segment(text, node)))
    return found


def test_the_bundle_verifier_is_the_package_verbatim_and_nothing_else():
    text = assemble()
    tree = ast.parse(text)
    package_statements, package_imports = [], set()
    for module in MODULES:
        source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        module_tree = ast.parse(source)
        package_statements += _statements(module_tree, source)
        for node in module_tree.body:
            if isinstance(node, ast.Import):
                package_imports |= {(a.name, None, a.asname) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.module.startswith("robustedge"):
                package_imports |= {(node.module, a.name, a.asname) for a in node.names}
    # every definition of every module, in dependency order, with its source to the character
    assert _statements(tree, text) == package_statements
    # besides them: the usage docstring (cli's, which --help prints), the hoisted imports and the footer
    assert ast.get_docstring(tree) == ast.get_docstring(ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8")))
    imports = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imports |= {(a.name, None, a.asname) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imports |= {(node.module, a.name, a.asname) for a in node.names}
    assert imports == package_imports
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and "robustedge" in ((n.module or "") if isinstance(n, ast.ImportFrom) else n.names[0].name)]
    assert text.startswith("#!/usr/bin/env python3\n") and text.endswith('if __name__ == "__main__":\n'
                                                                          '    sys.exit(main())\n')
    assert sum(isinstance(n, ast.If) for n in tree.body) == 1
    # every module of the package is assembled but the assembler itself and the package's re-exports
    assert set(MODULES) == {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "assemble"}


def test_every_public_name_of_the_verifier_modules_is_exported_by_the_package():
    import robustedge.verifier as verifier

    for path in PACKAGE.glob("*.py"):  # the package stands alone: it imports nothing else of RobustEdge
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            assert all(n.startswith("robustedge.verifier.") for n in names if n.split(".")[0] == "robustedge"), path

    public = set()
    for module in MODULES:
        for node in ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8")).body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            public |= {n for n in names if not n.startswith("_")}
    assert public == set(verifier.__all__) and all(hasattr(verifier, n) for n in public)


def test_the_format_table_gives_what_the_export_hard_coded_before():
    """One row per format; what was spread over the export side is derived from it, unchanged."""
    from robustedge.edge import formats
    from robustedge.verifier import FORMATS

    assert list(FORMATS) == ["onnx", "onnx-fp16", "onnx-int8", "ort", "ort-int8", "executorch", "executorch-int8",
                             "trt-fp16", "trt-int8"]
    assert {f: (r.file, r.runtime) for f, r in FORMATS.items()} == {
        "onnx": ("model.onnx", "onnxruntime"), "onnx-fp16": ("model.fp16.onnx", "onnxruntime"),
        "onnx-int8": ("model.int8.onnx", "onnxruntime"), "ort": ("model.ort", "onnxruntime"),
        "ort-int8": ("model.int8.ort", "onnxruntime"), "executorch": ("model.pte", "executorch"),
        "executorch-int8": ("model.int8.pte", "executorch"), "trt-fp16": ("model.fp16.engine", "tensorrt"),
        "trt-int8": ("model.int8.engine", "tensorrt")}
    assert formats.QAT_FORMATS == ("onnx-int8", "ort-int8", "trt-int8", "executorch-int8")
    assert formats.QAT_SCHEME == {
        "trt-int8": ("int8-symmetric", "TensorRT takes zero points of 0 only"),
        "executorch-int8": ("int8", "the XNNPACK delegate runs its own int8 scheme end to end (an x86-scheme "
                                    "student leaves convolutions outside it)")}
    assert formats.ORT_SOURCES == {"ort": "onnx", "ort-int8": "onnx-int8"}
    for fmt in FORMATS:
        assert formats.twin_source(fmt) == formats.ORT_SOURCES.get(fmt, fmt)
        assert formats.twin_source(fmt, qat=True) == ("onnx-int8" if fmt == "executorch-int8"
                                                      else formats.ORT_SOURCES.get(fmt, fmt))
    assert formats.formats_help() == (
        "comma-separated: onnx, onnx-fp16, onnx-int8, ort, ort-int8, executorch, executorch-int8, trt-fp16, "
        "trt-int8 (ort/ort-int8: ORT format for ONNX Runtime Mobile, with the reduced-operator config of a "
        "minimal build; ort-int8 also builds onnx-int8, its source and its twin's graph)")
    for fmt, row in FORMATS.items():  # every builder and availability check resolves
        assert callable(formats.builder(fmt)) and (row.qat_builder is None or callable(formats.builder(fmt, True)))
        assert row.needs in (None, *formats.AVAILABILITY)
        assert row.source in (None, *FORMATS) and row.qat_source in (None, *FORMATS)
    assert all(formats.available(f) == (True, "") for f in FORMATS if FORMATS[f].needs is None)
    assert formats.EXPORT_FORMATS.names() == list(FORMATS)
    with pytest.raises(Exception, match="unknown export format 'tflite'"):
        formats.EXPORT_FORMATS.get("tflite")


def test_planning_follows_the_table():
    from robustedge.edge.bundle import plan_formats

    assert plan_formats(["ort-int8"], None) == (["onnx", "onnx-int8", "ort-int8"], {})
    assert plan_formats(["onnx-fp16", "ort", "trt-int8"], None) == (["onnx", "onnx-fp16", "ort", "trt-int8"], {})
    formats, skipped = plan_formats(["executorch-int8", "ort-int8", "onnx"], {"activations": "int8"})
    assert formats == ["executorch-int8", "onnx-int8", "ort-int8"] and list(skipped) == ["onnx"]
    formats, skipped = plan_formats(["executorch-int8", "trt-int8"], {"activations": "int8-symmetric"})
    assert formats == ["onnx-int8", "trt-int8"] and "--qat-activations int8" in skipped["executorch-int8"]
    with pytest.raises(Exception, match="a QAT student exports to onnx-int8, ort-int8, trt-int8, executorch-int8"):
        plan_formats(["onnx", "onnx-fp16"], {"activations": "uint8"})
