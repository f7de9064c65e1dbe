"""The GPU check rehearsed on the CPU (bench/gpu_check.py --rehearse): every stage of the one prepared
GPU call runs here at toy sizes, so that on the device only CUDA is new. The stages run in order, in
groups (each a test, sharing one output folder), because later stages use earlier ones' runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
GROUPS = ["env,tests,train,distill", "torchrun", "qat", "eval,export,report", "step,autoattack,profile"]


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check, tmp_path_factory.mktemp("gpu_check")


@pytest.mark.parametrize("stages", GROUPS)
def test_the_gpu_check_rehearses_on_the_cpu(rehearsal, stages):
    gpu_check, out = rehearsal
    code = gpu_check.main(["--out", str(out), "--rehearse", "--stages", stages])
    results = json.loads((out / "gpu_check.json").read_text())
    failed = {name: results["stages"][name].get("error") for name in stages.split(",")
              if results["stages"][name]["status"] != "ok"}
    assert code == 0 and not failed, failed
    if stages.startswith("step"):
        row = next(iter(results["stages"]["step"]["result"].values()))
        assert row["exact_rel_diff"] <= 1e-4 and row["gflop_per_image"] > 0 and row["tflop_s"] > 0
        assert results["stages"]["autoattack"]["result"]["folded"]["images_per_s"] > 0
        assert (out / "profile.txt").read_text().strip()
    if stages.startswith("eval"):
        assert results["stages"]["export"]["result"]["table"]["onnx-int8"]["clean"] > 0
        assert (out / "gpu_check.log").read_text().count("=====") >= 2 * len(GROUPS)
