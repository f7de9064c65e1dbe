"""White-box robustness of the INT8 artifact through its exact twin, and attack-failure flags."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.attacks import pgd
from robustedge.evaluate import evaluate
from robustedge.export.convert import export_onnx, quantize_int8
from robustedge.export.twin import OnnxTwin, agreement
from robustedge.flags import FlagSettings
from robustedge.verify_core import OrtRunner, comparison_flags, worst_case


@pytest.fixture(scope="module")
def student(fit_natural):
    """The quickstart's student architecture (MobileNetV2 width 0.25, digits at 8x8, 1 channel)."""
    from robustedge.data import load_dataset
    from robustedge.models import build_model

    data = load_dataset("digits", image_size=8, channels=1)
    torch.manual_seed(0)
    model = build_model("mobilenetv2", 10, 1, width=0.25, image_size=8)
    return fit_natural(model, data.train, epochs=8), data


@pytest.fixture(scope="module")
def int8_file(student, tmp_path_factory):
    model, data = student
    folder = tmp_path_factory.mktemp("twin")
    fp32 = export_onnx(model, (1, 8, 8), folder / "model.onnx")
    calibration = data.train.float_images()[:256].numpy()
    return fp32, quantize_int8(fp32, folder / "model.int8.onnx", calibration)


def test_the_twin_of_the_int8_student_agrees_with_onnx_runtime_on_clean_and_adversarial_inputs(student, int8_file):
    model, data = student
    _, int8 = int8_file
    twin, runner = OnnxTwin(int8), OrtRunner(int8)
    x, y = data.test.float_images()[:300], data.test.labels[:300]
    adversarial = pgd(twin, x, y, eps=0.1, step_size=0.025, steps=20, generator=torch.Generator().manual_seed(0))
    for inputs in (x, adversarial):
        result = agreement(twin, runner, inputs.numpy())
        assert result["agreement"] >= 0.995, result
        # one quantisation step of the logits where a value lands on a rounding boundary, never more
        assert result["max_abs_logit_diff"] < 0.5, result
    assert (twin(adversarial).argmax(1) == y).float().mean() < (twin(x).argmax(1) == y).float().mean()  # it attacks
    inputs = x[:8].clone().requires_grad_(True)
    grad = torch.autograd.grad(torch.nn.functional.cross_entropy(twin(inputs), y[:8]), inputs)[0]
    assert grad.abs().sum() > 0  # straight-through gradients flow


def test_the_twin_reads_everything_from_the_file(student, int8_file):
    model, data = student
    fp32, int8 = int8_file
    x = data.test.float_images()[:64]
    with torch.no_grad():
        assert (OnnxTwin(fp32)(x) - model.eval()(x)).abs().max() < 1e-4  # the float graph: the same function
    twin = OnnxTwin(int8)
    assert twin.is_quantized and twin.op_counts["FakeQuantize"] > 10  # activation Q -> DQ pairs, fused
    graph = onnx.load(str(int8)).graph
    assert any(i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4 for i in graph.initializer)


def test_the_twin_refuses_what_it_cannot_reproduce(tmp_path):
    from onnx import TensorProto, helper

    node = helper.make_node("Softplus", ["input"], ["logits"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(RobustEdgeError, match="no rule for ONNX op 'Softplus'"):
        OnnxTwin(tmp_path / "m.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(RobustEdgeError, match="not a readable ONNX file"):
        OnnxTwin(tmp_path / "junk.onnx")


class InputQuantizer(torch.nn.Module):
    """Gradient masking by a non-differentiable input quantiser (Athalye et al.'s shattered gradients)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


class Saturated(torch.nn.Module):
    """Gradient masking by saturated logits: the loss is exactly 0 on confident examples."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 1e4


@pytest.mark.parametrize("wrapper,expected", [
    (None, set()),
    (InputQuantizer, {"zero_gradients", "large_radius", "blackbox_below_whitebox"}),
    (Saturated, {"zero_gradients", "flat_loss", "large_radius", "blackbox_below_whitebox"}),
])
def test_gradient_masking_is_flagged_and_an_ordinary_model_is_not(digits, digits_model, wrapper, expected):
    model = wrapper(digits_model) if wrapper else digits_model
    x, y = digits.test.float_images()[:64], digits.test.labels[:64]
    report = evaluate(model, x, y, attacks=["clean", "pgd20"], eps=0.1, show_progress=False,
                      flags=FlagSettings(n=64, square_queries=300))
    fired = {f["check"] for f in report.flags}
    assert expected <= fired and (fired == set() if wrapper is None else True), report.flags
    for flag in report.flags:
        assert 0 < flag["examples"] <= flag["of"] <= 64 and flag["detail"]
    assert "attack-failure flag: zero_gradients" in report.to_text() or wrapper is None


def test_comparison_flags_and_the_worst_case_are_per_example():
    results = {"clean": np.array([1, 1, 1, 1, 0], bool), "whitebox_pgd20": np.array([1, 1, 0, 1, 0], bool),
               "transfer_pgd20": np.array([0, 1, 0, 1, 0], bool), "square": np.array([1, 0, 1], bool)}
    worst = worst_case(results)
    assert worst.tolist() == [False, False, False, True, False]
    flags = {f["check"]: f for f in comparison_flags(results, tolerance=0.0)}
    assert flags["blackbox_below_whitebox"]["examples"] == 1 and flags["blackbox_below_whitebox"]["of"] == 3
    assert flags["transfer_below_whitebox"]["examples"] == 1 and flags["transfer_below_whitebox"]["of"] == 5
    assert comparison_flags(results, tolerance=0.5) == []


def test_more_steps_needs_more_than_a_point_and_more_than_one_example():
    from robustedge.flags import more_steps_fires

    settings = FlagSettings()
    reported = np.ones(64, bool)
    one, two = reported.copy(), reported.copy()
    one[0] = False  # 1.6 points, one example: what a stronger attack finds on an ordinary model
    two[:2] = False
    assert not more_steps_fires(reported, one, settings)
    assert more_steps_fires(reported, two, settings)
    many = np.ones(1000, bool)
    weaker = many.copy()
    weaker[:5] = False  # five examples but half a point
    assert not more_steps_fires(many, weaker, settings)
    assert more_steps_fires(reported, one, FlagSettings(more_steps_examples=1))


@pytest.fixture(scope="module")
def student_bundle(student, tmp_path_factory):
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
    from robustedge.export.bundle import ExportOptions, export_bundle

    model, data = student
    folder = tmp_path_factory.mktemp("wb_bundle")
    ckpt = save_model(folder / "student.safetensors", model,
                      ModelMeta(ModelSpec("mobilenetv2", 10, 1, 0.25, 8), dataset="digits", eps=0.1, method="natural",
                                classes=[str(i) for i in range(10)], extra={"data": {"seed": 0, "val_fraction": 0.1}}))
    manifest, failures = export_bundle(ckpt, folder / "bundle", ExportOptions(
        formats=["onnx", "onnx-int8"], n=100, calibration_n=256, transfer_attacks=("pgd20", "autoattack"),
        square_n=50, square_queries=300, flags=FlagSettings(n=50, square_queries=300)), progress=lambda m: None)
    return folder / "bundle", manifest, failures


def test_white_box_accuracy_of_the_artifact_is_never_above_any_other_attack(student_bundle):
    out, manifest, _ = student_bundle
    row = manifest["table"]["onnx-int8"]
    columns = [k for k in row if k.startswith(("whitebox_", "transfer_")) or k in ("clean", "square")]
    assert {"whitebox_pgd20", "whitebox_cw", "whitebox_autoattack", "whitebox_diva", "square"} <= set(columns)
    for key in columns:
        assert row["worst"] <= row[key] + 1e-12, key
    assert row["twin_agreement"] >= 0.99 and row["twin_max_logit_diff"] < 0.5
    torch_row = manifest["table"]["torch"]
    assert torch_row["worst"] <= min(torch_row[k] for k in ("clean", "transfer_pgd20", "transfer_autoattack"))
    assert row["whitebox_autoattack"] < row["clean"]  # the attack on the artifact did something
    assert set(manifest["flags"]) == {"torch", "onnx", "onnx-int8"}


def test_the_bundle_verifier_replays_the_white_box_numbers(student_bundle):
    out, manifest, _ = student_bundle
    proc = subprocess.run([sys.executable, str(out / "verify.py"), "--allow-flags"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| format |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("| onnx-int8 |"))
    cells = dict(zip(columns, [c.strip() for c in line.strip("|").split("|")]))
    row = manifest["table"]["onnx-int8"]
    for key in ("whitebox pgd20 (%)", "whitebox autoattack (%)", "whitebox diva (%)", "square (%)", "worst (%)"):
        assert cells[key] == f"{100 * row[key.split(' (')[0].replace(' ', '_')]:.1f}", key
    assert "attack-failure flag" in proc.stdout


def test_a_flagged_bundle_fails_the_gate_unless_flags_are_allowed(student_bundle, tmp_path):
    import shutil

    from robustedge.export.bundle import verify_bundle
    from robustedge.verify_core import Gate

    out, manifest, _ = student_bundle
    flagged = tmp_path / "flagged"
    shutil.copytree(out, flagged)
    manifest = json.loads((flagged / "manifest.json").read_text())
    manifest["flags"]["onnx-int8"] = [{"check": "large_radius", "examples": 40, "of": 50, "detail": "planted"}]
    (flagged / "manifest.json").write_text(json.dumps(manifest))
    _, failures = verify_bundle(flagged, Gate(max_robust_drop=1, min_agreement=0), progress=lambda m: None)
    assert any("onnx-int8: attack-failure flag large_radius on 40 of 50 examples (planted)" in f for f in failures)
    _, failures = verify_bundle(flagged, Gate(max_robust_drop=1, min_agreement=0, allow_flags=True),
                                progress=lambda m: None)
    assert not any("attack-failure" in f for f in failures)
