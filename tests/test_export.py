import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.edge.bundle import ExportOptions, export_bundle, parse_formats
from robustedge.edge.reverify import verify_bundle
from robustedge.edge.convert import export_onnx
from robustedge.verifier import Gate, OrtRunner, check_input_shape, read_bundle, sha256
OPTS = dict(n=64, calibration_n=128, transfer_attacks=("pgd20",), square_n=8, square_queries=50)


@pytest.fixture(scope="module")
def bundle(digits_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    manifest, failures = export_bundle(digits_checkpoint, out, ExportOptions(**OPTS), progress=lambda m: None)
    return out, manifest, failures


def test_fp32_onnx_matches_torch_on_digits_and_random_inputs(digits, digits_model, tmp_path):
    path = export_onnx(digits_model, (1, 16, 16), tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    runner = OrtRunner(path)
    for x in (digits.test.float_images()[:100], torch.rand(7, 1, 16, 16)):  # dynamic batch: 100 and 7
        with torch.no_grad():
            ref = digits_model.eval()(x).numpy()
        assert np.abs(runner(x.numpy()) - ref).max() < 1e-4


def test_bundle_has_every_format_a_manifest_and_a_verified_table(bundle):
    out, manifest, failures = bundle
    assert set(manifest["files"]) == {"onnx", "onnx-fp16", "onnx-int8"}
    for fmt, entry in manifest["files"].items():
        assert (out / entry["file"]).stat().st_size == entry["bytes"]
    table = manifest["table"]
    assert set(table) == {"torch", "onnx", "onnx-fp16", "onnx-int8"}
    assert table["onnx"]["max_abs_logit_diff"] < 1e-4
    assert table["onnx"]["agreement"] == 1.0 and table["onnx"]["clean"] == table["torch"]["clean"]
    assert table["onnx"]["transfer_pgd20"] == table["torch"]["transfer_pgd20"]
    for row in table.values():
        assert 0.0 <= row["square"] <= row["clean"] and row["latency_b1_ms"] > 0
    assert table["torch"]["transfer_pgd20"] < table["torch"]["clean"]  # the attack did something
    assert manifest["input"] == {"name": "input", "shape": [1, 16, 16], "dtype": "float32", "range": [0.0, 1.0],
                                 "layout": "NCHW", "dynamic_batch": True}
    with np.load(out / "verify.npz") as data:
        whitebox = {f"wb.onnx-int8.{a}" for a in ("pgd20", "cw", "autoattack", "diva")}
        square = {f"sq.{row}" for row in ("torch", "onnx", "onnx-fp16", "onnx-int8")}
        assert set(data.files) == {"x", "y", "torch_pred", "adv_pgd20"} | whitebox | square
        assert len(data["y"]) == 64 and all(len(data[k]) == 8 for k in square)
        for key in ["adv_pgd20"] + sorted(whitebox):
            assert np.abs(data[key] - data["x"]).max() <= manifest["eps"] + 1e-6
    assert manifest["samples"]["whitebox"] == {"onnx-int8": ["pgd20", "cw", "autoattack", "diva"]}
    assert "| onnx-int8 |" in (out / "verify.md").read_text()
    assert not list(out.parent.glob(".bundle.*"))  # no temporary folder left behind
    assert manifest["gate_failures"] == failures
    from robustedge.verifier.assemble import assemble  # the verifier package as one file, byte for byte

    assert (out / "verify.py").read_bytes() == assemble().encode("utf-8")
    assert manifest["verifier"] == {"file": "verify.py", "sha256": sha256(out / "verify.py")}


def test_int8_model_is_really_quantized_and_smaller(bundle):
    out, manifest, _ = bundle
    model = onnx.load(str(out / "model.int8.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "conv weights should be stored as int8"
    assert manifest["files"]["onnx-int8"]["bytes"] < 0.5 * manifest["files"]["onnx"]["bytes"]


def test_fp16_model_keeps_fp32_inputs_and_outputs(bundle):
    out, _, _ = bundle
    model = onnx.load(str(out / "model.fp16.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_verify_recomputes_the_table_and_refuses_a_corrupted_bundle(bundle, tmp_path):
    import shutil

    out, manifest, _ = bundle
    report, failures = verify_bundle(out, square_n=0, progress=lambda m: None)
    assert report["table"]["onnx"]["clean"] == manifest["table"]["onnx"]["clean"]
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    data = bytearray((broken / "model.int8.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.int8.onnx").write_bytes(bytes(data))
    with pytest.raises(RobustEdgeError, match="model.int8.onnx does not match its manifest sha256"):
        read_bundle(broken)
    proc = subprocess.run([sys.executable, str(broken / "verify.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not match its manifest sha256" in proc.stderr


def test_on_device_verifier_runs_without_torch(bundle):
    out, manifest, _ = bundle
    hide_torch = ("import sys, runpy; sys.modules['torch'] = None; sys.modules['robustedge'] = None; "
                  "sys.argv = ['verify.py']; "
                  f"runpy.run_path({str(out / 'verify.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", hide_torch], capture_output=True, text=True, timeout=120,
                          cwd=out.parent)
    expected_exit = 1 if manifest["gate_failures"] else 0
    assert proc.returncode == expected_exit, proc.stderr
    lines = proc.stdout.splitlines()
    row = next(line for line in lines if line.startswith("| onnx |"))
    assert row.split(" | ")[1] == f"{100 * manifest['table']['onnx']['clean']:.1f}"
    assert any(line.startswith("| onnx-int8 |") for line in lines)


def test_gate_turns_a_regression_into_failures():
    table = {"torch": {"clean": 0.9, "agreement": 1.0, "transfer_pgd20": 0.5},
             "onnx-int8": {"clean": 0.88, "agreement": 0.93, "transfer_pgd20": 0.40}}
    failures = Gate(max_robust_drop=0.05, min_agreement=0.95).check(table)
    assert failures == ["onnx-int8: agreement 93.0% < 95.0%", "onnx-int8: transfer_pgd20 drops 10.0 points (> 5.0)"]
    assert Gate(max_robust_drop=0.2, min_agreement=0.9).check(table) == []
    # a miss by less than the printed precision still reads as a miss
    near = {"torch": {"clean": 0.9, "agreement": 1.0, "worst": 0.5},
            "onnx-int8": {"clean": 0.9, "agreement": 0.9496, "worst": 0.4496, "twin_agreement": 190 / 192}}
    assert Gate(max_robust_drop=0.05, min_agreement=0.95).check(near) == [
        "onnx-int8: agreement 94.96% < 95.00%", "onnx-int8: its twin agrees with the runtime on 98.96% (< 99.00%); "
        "white-box numbers refused", "onnx-int8: worst drops 5.04 points (> 5.00)"]


def test_cli_export_verify_and_bad_inputs(digits_checkpoint, bundle, tmp_path, capsys):
    from robustedge.cli import main

    out, _, _ = bundle
    assert main(["verify", str(out), "--square-n", "0", "--max-drop", "1", "--min-agreement", "0"]) == 0
    assert "gate passed" in capsys.readouterr().out
    # a reference the artifacts cannot reach: the gate fails with exit 1
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["table"]["torch"]["clean"] = 1.5
    strict = tmp_path / "strict"
    import shutil

    shutil.copytree(out, strict)
    (strict / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(strict), "--square-n", "0"]) == 1
    assert "GATE FAILED" in capsys.readouterr().err
    for argv, message in (
            (["export", str(digits_checkpoint), "--out", str(tmp_path / "x"), "--formats", "onnx,tflite"],
             "unknown export format 'tflite'"),
            (["export", str(digits_checkpoint), "--out", str(out)], "already holds a RobustEdge export bundle"),
            (["export", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "y")], "checkpoint not found"),
            (["verify", str(tmp_path)], "not an export bundle"),
            (["verify", str(out), "--max-drop", "5"], "--max-drop must be in [0, 1], got 5")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_wrong_input_shape_and_missing_calibration_are_clear_errors(bundle):
    from robustedge.edge.convert import quantize_int8

    out, _, _ = bundle
    runner = OrtRunner(out / "model.onnx")
    with pytest.raises(RobustEdgeError, match=r"input shape \(3, 16, 16\) does not fit"):
        check_input_shape(runner, (1, 3, 16, 16))
    with pytest.raises(RobustEdgeError, match="needs calibration images"):
        quantize_int8(out / "model.onnx", out.parent / "q.onnx", np.zeros((0, 1, 16, 16), np.float32))
    assert parse_formats("onnx-int8,onnx-int8") == ["onnx-int8"]


@pytest.mark.parametrize("float_layers", ["first", "last", "first-last"])
def test_int8_float_layers_keep_exactly_those_layers_in_float(bundle, digits, tmp_path, float_layers):
    """--int8-float-layers: the first / last weighted node of the INT8 file reads its float weight (no
    DequantizeLinear before it), every other one stays INT8, and the twin still computes the file."""
    from robustedge.edge.convert import quantize_int8
    from robustedge.edge.twin import OnnxTwin, agreement

    out, _, _ = bundle
    x = digits.test.float_images()[:64].numpy()
    path = quantize_int8(out / "model.onnx", tmp_path / "q.onnx", x, float_layers=float_layers)
    graph = onnx.load(str(path)).graph
    producers = {o: node.op_type for node in graph.node for o in node.output}
    weighted = [node for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    in_float = [producers.get(node.input[1]) != "DequantizeLinear" for node in weighted]
    expected = [False] * len(weighted)
    if float_layers in ("first", "first-last"):
        expected[0] = True
    if float_layers in ("last", "first-last"):
        expected[-1] = True
    assert in_float == expected and len(weighted) > 2
    twin = agreement(OnnxTwin(path), OrtRunner(path), x)  # as close as for a wholly INT8 file (rounding steps)
    assert twin["agreement"] >= 0.99 and twin["max_abs_logit_diff"] < 0.1
    with pytest.raises(RobustEdgeError, match="unknown INT8 float layers 'middle'; valid: none, first, last"):
        quantize_int8(out / "model.onnx", tmp_path / "r.onnx", x, float_layers="middle")


def test_the_export_quantises_with_its_float_layers(digits_checkpoint, tmp_path, monkeypatch):
    """ExportOptions.int8_float_layers reaches onnxruntime's quantizer (the manifest records the option: the
    file must then be what it says); a failure there leaves nothing behind."""
    from robustedge.edge import convert

    seen = []

    class Stop(Exception):
        pass

    def spy(*args, float_layers="none", **kwargs):
        seen.append(float_layers)
        raise Stop

    monkeypatch.setattr(convert, "quantize_int8", spy)
    with pytest.raises(Stop):
        export_bundle(digits_checkpoint, tmp_path / "b", ExportOptions(formats=["onnx-int8"],
                                                                       int8_float_layers="first-last", **OPTS),
                      progress=lambda m: None)
    assert seen == ["first-last"] and list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_tensorrt_engines_build_and_verify(digits_checkpoint, tmp_path):
    pytest.importorskip("tensorrt")
    manifest, _ = export_bundle(digits_checkpoint, tmp_path / "trt",
                                ExportOptions(formats=["onnx", "onnx-int8", "trt-fp16", "trt-int8"], **OPTS),
                                progress=lambda m: None)
    assert {"trt-fp16", "trt-int8"} <= set(manifest["files"])
    assert manifest["table"]["trt-fp16"]["agreement"] > 0.95


@pytest.fixture(scope="module")
def mobile_bundle(digits_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("mobile") / "bundle"
    opts = ExportOptions(**(OPTS | dict(formats=["ort", "ort-int8"], whitebox_attacks=("pgd20",))))
    manifest, _ = export_bundle(digits_checkpoint, out, opts, progress=lambda m: None)
    return out, manifest


def test_ort_mobile_files_match_their_onnx_sources_and_int8_is_really_quantized(mobile_bundle, digits):
    out, manifest = mobile_bundle
    # ort-int8 brings its source (and its twin's graph), onnx-int8; the float path always builds onnx
    assert set(manifest["files"]) == {"onnx", "onnx-int8", "ort", "ort-int8"}
    x = np.concatenate([digits.test.float_images()[:128].numpy(),
                        np.random.default_rng(0).random((32, 1, 16, 16), dtype=np.float32)])
    for ort_file, onnx_file, tolerance in (("model.ort", "model.onnx", 1e-5), ("model.int8.ort", "model.int8.onnx", 1e-5)):
        got, ref = OrtRunner(out / ort_file)(x), OrtRunner(out / onnx_file)(x)
        print(f"{ort_file} vs {onnx_file}: max |logit difference| {np.abs(got - ref).max():.2e}")
        assert np.abs(got - ref).max() <= tolerance and (got.argmax(1) == ref.argmax(1)).all()
    operators = (out / "ort.required_operators.config").read_text()
    assert "QLinearConv" in operators and "model.int8.ort" in operators and "/tmp" not in operators
    assert manifest["ort_operators"]["file"] == "ort.required_operators.config"
    assert manifest["files"]["ort-int8"]["bytes"] < 0.6 * manifest["files"]["ort"]["bytes"]
    table = manifest["table"]
    assert table["ort"]["clean"] == table["onnx"]["clean"] and table["ort-int8"]["twin_agreement"] >= 0.99
    with np.load(out / "verify.npz") as data:  # the twin is the same function: its examples were reused
        assert np.array_equal(data["wb.ort-int8.pgd20"], data["wb.onnx-int8.pgd20"])
    assert "whitebox_pgd20" in table["ort-int8"] and "worst" in table["ort-int8"]


@pytest.mark.parametrize("damage, message", [
    ("flip", "model.int8.ort does not match its manifest sha256"),
    ("garbage with its hash", "onnxruntime cannot load model.int8.ort"),
    ("operators", "ort.required_operators.config does not match its manifest sha256"),
])
def _refused_by_both_verifiers(bundle: Path, tmp_path: Path, file: str, fmt: str, damage: str, message: str) -> None:
    """Damage one file of a copy of ``bundle`` (flip a byte, or replace it by garbage and fix its hash so
    the runtime has to refuse it); both verifiers must refuse with ``message``, one line, exit 2."""
    import hashlib
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    data = bytearray((broken / file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    if damage == "garbage with its hash":
        data = bytearray(b"not a model file" * 64)
        manifest = json.loads((broken / "manifest.json").read_text())
        manifest["files"][fmt]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
        (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / file).write_bytes(bytes(data))
    with pytest.raises(RobustEdgeError, match=message):
        verify_bundle(broken, square_n=0, progress=lambda m: None)
    proc = subprocess.run([sys.executable, str(broken / "verify.py")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("file, damage, message", [
    ("model.int8.ort", "flip", "model.int8.ort does not match its manifest sha256"),
    ("model.int8.ort", "garbage with its hash", "onnxruntime cannot load model.int8.ort"),
    ("ort.required_operators.config", "flip", "ort.required_operators.config does not match its manifest sha256"),
])
def test_a_corrupted_ort_file_is_refused_by_both_verifiers(mobile_bundle, tmp_path, file, damage, message):
    _refused_by_both_verifiers(mobile_bundle[0], tmp_path, file, "ort-int8", damage, message)


@pytest.fixture(scope="module")
def phone_checkpoint(tmp_path_factory, fit_natural):
    """A MobileNetV2 (the phone student) on 8x8 digits. (ExecuTorch's XNNPACK quantizer broke the
    pre-activation WRN-10-1 of the other tests: its own converted torch graph agreed with the float
    model on 55.5% of digits, which the bundle's agreement column and gate report; docs/design/export.md.)"""
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
    from robustedge.data import load_dataset

    spec = ModelSpec("mobilenetv2", 10, 1, 0.25, 8)
    torch.manual_seed(0)
    model = fit_natural(spec.build(), load_dataset("digits", image_size=8, channels=1).train, epochs=6)
    return save_model(tmp_path_factory.mktemp("phone") / "mnv2.safetensors", model,
                      ModelMeta(spec, dataset="digits", eps=0.1, method="natural", classes=[str(i) for i in range(10)],
                                extra={"data": {"seed": 0, "val_fraction": 0.1}}))


@pytest.fixture(scope="module")
def executorch_bundle(phone_checkpoint, tmp_path_factory):
    pytest.importorskip("executorch", reason="the mobile extra (executorch) is not installed")
    out = tmp_path_factory.mktemp("executorch") / "bundle"
    opts = ExportOptions(**(OPTS | dict(formats=["executorch", "executorch-int8"], whitebox_attacks=())))
    manifest, _ = export_bundle(phone_checkpoint, out, opts, progress=lambda m: None)
    return out, manifest


def test_executorch_programs_match_the_float_onnx_model_and_int8_is_really_quantized(executorch_bundle):
    from robustedge.verifier import ExecuTorchRunner

    out, manifest = executorch_bundle
    assert set(manifest["files"]) == {"onnx", "executorch", "executorch-int8"}
    from robustedge.data import load_dataset

    x = load_dataset("digits", image_size=8, channels=1).test.float_images()[:200].numpy()
    ref = OrtRunner(out / "model.onnx")(x)
    fp32, int8 = ExecuTorchRunner(out / "model.pte")(x), ExecuTorchRunner(out / "model.int8.pte")(x)
    print(f"model.pte vs model.onnx: max |logit difference| {np.abs(fp32 - ref).max():.2e}; model.int8.pte: "
          f"{np.abs(int8 - ref).max():.3f}, top-1 agreement {100 * (int8.argmax(1) == ref.argmax(1)).mean():.1f}%")
    assert np.abs(fp32 - ref).max() < 1e-4  # XNNPACK fp32 against ONNX Runtime fp32
    assert (int8.argmax(1) == ref.argmax(1)).mean() >= 0.95 and np.abs(int8 - ref).max() > 1e-3  # INT8 differs
    assert manifest["files"]["executorch-int8"]["bytes"] < 0.6 * manifest["files"]["executorch"]["bytes"]
    assert ExecuTorchRunner(out / "model.pte").input_shape == (1, 1, 8, 8)
    table = manifest["table"]
    assert table["executorch"]["clean"] == table["onnx"]["clean"] and "square" in table["executorch-int8"]


@pytest.mark.parametrize("damage, message", [
    ("flip", "model.int8.pte does not match its manifest sha256"),  # a flipped byte still loads and runs
    ("garbage with its hash", "executorch cannot load model.int8.pte"),
])
def test_a_corrupted_pte_is_refused_by_both_verifiers(executorch_bundle, tmp_path, damage, message):
    _refused_by_both_verifiers(executorch_bundle[0], tmp_path, "model.int8.pte", "executorch-int8", damage, message)


def test_executorch_formats_are_skipped_with_the_install_line_without_the_extra(digits_checkpoint, tmp_path,
                                                                                 monkeypatch):
    from robustedge.edge import executorch

    monkeypatch.setattr(executorch, "available", lambda: (False, executorch.INSTALL))
    opts = ExportOptions(**(OPTS | dict(formats=["executorch"], whitebox_attacks=(), square_n=0)))
    manifest, _ = export_bundle(digits_checkpoint, tmp_path / "bundle", opts, progress=lambda m: None)
    assert set(manifest["files"]) == {"onnx"} and "robustedge[mobile]" in manifest["skipped"]["executorch"]


# --- replays on other processors (robustedge/edge/emulation.py) ---------------------------------------------

def test_the_verifier_writes_its_table_platform_and_every_logit_as_the_library_replays_them(bundle, tmp_path):
    from robustedge.verifier import artifact_row

    out, manifest, _ = bundle
    proc = subprocess.run([sys.executable, str(out / "verify.py"), str(out), "--formats", "onnx,onnx-int8",
                           "--no-latency", "--json", str(tmp_path / "r.json"), "--logits", str(tmp_path / "l.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["platform"]["isa"] == __import__("platform").machine()
    assert "onnxruntime" in report["platform"]["runtimes"]
    assert not any(k.startswith("latency") for k in report["table"]["onnx-int8"])  # --no-latency
    assert report["gate_failures"] == ([] if proc.returncode == 0 else report["gate_failures"])
    _, samples = read_bundle(out)
    with np.load(tmp_path / "l.npz") as data:
        logits = {k: data[k] for k in data.files}
    for fmt in ("onnx", "onnx-int8"):
        mine: dict = {}
        row, _, _ = artifact_row(out / manifest["files"][fmt]["file"], fmt, samples, latency=False, logits=mine)
        assert set(mine) == {k.split("/", 1)[1] for k in logits if k.startswith(fmt + "/")}
        for column, values in mine.items():
            np.testing.assert_array_equal(logits[f"{fmt}/{column}"], values)
        assert report["table"][fmt]["clean"] == row["clean"] == (mine["clean"].argmax(1) == samples["y"]).mean()
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left beside
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    for args, message in (([str(out / "verify.npz")], "is inside the bundle"),
                          ([str(tmp_path / "same"), "--json", str(tmp_path / "same")], "name the same file")):
        proc = subprocess.run([sys.executable, str(out / "verify.py"), str(out), "--formats", "onnx", "--no-latency",
                               "--logits", *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # the bundle is untouched


def test_emulated_rows_compare_logits_sit_under_their_format_and_face_the_gate():
    from robustedge.edge.emulated_env import parse_isas
    from robustedge.edge.emulation import add_emulated_rows, compare_logits

    host = {"onnx/clean": np.array([[1.0, 0.0], [0.0, 1.0]]), "onnx/transfer_pgd20": np.array([[2.0, 1.0]])}
    other = {"onnx/clean": np.array([[1.0, 0.5], [0.6, 0.5]]), "onnx/transfer_pgd20": np.array([[2.0, 1.0]])}
    assert compare_logits(host, other, "onnx") == {"isa_agreement": 2 / 3, "isa_max_logit_diff": 0.6,
                                                   "isa_compared": 3}
    with pytest.raises(RobustEdgeError, match="no replay to compare"):
        compare_logits(host, other, "onnx-int8")
    report = {"table": {"torch": {"clean": 0.9, "agreement": 1.0}, "onnx": {"clean": 0.9, "agreement": 1.0},
                        "onnx-int8": {"clean": 0.9, "agreement": 1.0}}, "flags": {}}
    emulated = {"isas": ["arm64"], "table": {"onnx-int8@arm64": {"clean": 0.9, "agreement": 1.0, "isa_agreement": 0.98},
                                            "onnx@arm64": {"clean": 0.9, "agreement": 1.0, "isa_agreement": 1.0}},
                "flags": {"onnx@arm64": [], "onnx-int8@arm64": []}, "platforms": {}, "skipped": {}, "seconds": {}}
    add_emulated_rows(report, emulated, Gate())
    assert list(report["table"]) == ["torch", "onnx", "onnx@arm64", "onnx-int8", "onnx-int8@arm64"]
    assert report["gate_failures"] == ["onnx-int8@arm64: agrees with the same file on this machine on 98.0% of the "
                                       "inputs (< 99.0%)"]
    assert report["emulated"]["isas"] == ["arm64"]
    assert parse_isas("arm64,arm64") == ("arm64",) and parse_isas("none") == () and parse_isas(()) == ()
    with pytest.raises(RobustEdgeError, match="unknown emulated processor 'riscv'; known: arm64"):
        parse_isas("riscv")
    for bad in ("", " ", ",", 5, {"arm64": 1}, ["arm64", ""]):
        with pytest.raises(RobustEdgeError, match="emulate must name processor families"):
            parse_isas(bad)
    from robustedge.edge.emulated_env import _release_key

    assert _release_key("1.27") == _release_key("1.27.0") < _release_key("1.28.0")  # a pin may omit the .0


def test_the_platform_lines_name_each_processor_once_and_skip_the_reference(capsys):
    """export and verify print where each row was measured after the bundle is written: the x86 reference
    of a replay (``<isa>_reference``, no emulator) is no row's processor and once crashed these lines."""
    from robustedge.cli.export import print_platforms
    from robustedge.edge.emulation import add_emulated_rows

    here = {"isa": "x86_64", "system": "Linux", "python": "3.11.7", "runtimes": {"onnxruntime": "1.32.0"}}
    arm = {"isa": "aarch64", "system": "Linux", "python": "3.11.2", "runtimes": {"onnxruntime": "1.27.0"},
           "emulator": "qemu-aarch64 version 7.2.22", "cpu": "neoverse-n1", "debian": "bookworm"}
    report = {"platform": here, "table": {"torch": {"clean": 0.9, "agreement": 1.0},
                                        "onnx": {"clean": 0.9, "agreement": 1.0}}, "flags": {}}
    emulated = {"isas": ["arm64"], "table": {"onnx@arm64": {"clean": 0.9, "agreement": 1.0, "isa_agreement": 1.0}},
                "flags": {"onnx@arm64": []}, "seconds": {},
                "platforms": {"arm64_reference": here | {"runtimes": {"onnxruntime": "1.27.0"}}, "arm64": arm},
                "skipped": {"executorch@arm64": "no arm64 ExecuTorch runtime runs under emulation"}}
    add_emulated_rows(report, emulated, Gate())
    print_platforms(report)
    assert capsys.readouterr().out.splitlines() == [
        "measured on x86_64 (onnxruntime 1.32.0), emulated rows as below",
        "<format>@arm64: aarch64 under qemu-aarch64 version 7.2.22 (cpu neoverse-n1), Python 3.11.2, "
        "onnxruntime 1.27.0; no latency under emulation",
        "executorch@arm64 not replayed: no arm64 ExecuTorch runtime runs under emulation"]
    print_platforms({"platform": here | {"runtimes": {}}, "table": {}})  # no replay; a bundle without runtimes
    assert capsys.readouterr().out.splitlines() == ["measured on x86_64 (no runtime)"]


def test_an_old_verifier_is_refused_for_emulated_replays(bundle, tmp_path):
    from robustedge.edge.emulation import run_verifier

    old = tmp_path / "old"
    old.mkdir()
    (old / "verify.py").write_text("print('a verifier of an older release')\n")
    with pytest.raises(RobustEdgeError, match="predates replays on other processors; export the bundle again"):
        run_verifier(old, ["onnx"], tmp_path)


def _emulation_ready() -> str | None:
    """Why the arm64 replay cannot run here, or None: it needs qemu-user-static (or Debian's apt to fetch it)
    and the network for the first preparation, unless the cache holds a prepared environment."""
    import shutil

    from robustedge.edge.emulated_env import ENVIRONMENT_FILE, cache_folder

    try:
        if (cache_folder() / "emulate/arm64" / ENVIRONMENT_FILE).is_file():
            return None
    except RobustEdgeError as exc:
        return str(exc)
    if shutil.which("qemu-aarch64-static"):
        return None
    return ("no arm64 environment prepared and qemu-user-static is not installed "
            "(apt-get install qemu-user-static, then this test prepares the environment once)")


@pytest.mark.emulation
@pytest.mark.skipif(_emulation_ready() is not None, reason=str(_emulation_ready()))
def test_a_bundle_replayed_on_arm64_agrees_with_this_machine(mobile_bundle):
    from robustedge.edge.emulation import emulated_rows

    out, manifest = mobile_bundle
    result = emulated_rows(out, ("arm64",), progress=lambda m: None, formats=["ort-int8"])  # one file: seconds
    row = result["table"]["ort-int8@arm64"]
    assert row["isa_agreement"] >= 0.99 and row["isa_compared"] >= manifest["samples"]["n"]
    assert not any(k.startswith("latency") for k in row)  # the emulator's time is no processor's
    assert abs(row["clean"] - manifest["table"]["ort-int8"]["clean"]) <= 0.02
    arm = result["platforms"]["arm64"]
    assert arm["isa"] == "aarch64" and "onnxruntime" in arm["runtimes"] and "qemu" in arm["emulator"]
    reference = result["platforms"]["arm64_reference"]  # this machine, with the same onnxruntime release
    assert reference["isa"] == __import__("platform").machine()
    assert reference["runtimes"]["onnxruntime"] == arm["runtimes"]["onnxruntime"]
