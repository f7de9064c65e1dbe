#!/usr/bin/env python3
"""Replay a RobustEdge bundle's verification samples on the target device. Needs only numpy and
onnxruntime (phones, Raspberry Pi, any CPU) or tensorrt (Jetson): no torch, no RobustEdge.

    python verify_on_device.py BUNDLE [--formats onnx,onnx-int8] [--max-drop 0.05] [--min-agreement 0.95]

It checks every file against the sha256 in manifest.json (exit 2 on a mismatch), runs the clean
and adversarial samples of verify.npz through each model on this device, prints clean accuracy,
top-1 agreement with the torch model and transfer robust accuracy next to the numbers measured at
export time, and applies the same gate as `robustedge verify` (exit 1 when it fails).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def onnx_runner(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def trt_runner(path: Path):  # pragma: no cover - runs on a device with TensorRT
    import tensorrt as trt

    try:
        from cuda import cudart  # cuda-python, shipped with JetPack / tensorrt installs
    except ImportError:  # pragma: no cover
        sys.exit("TensorRT verification needs cuda-python (pip install cuda-python)")
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        sys.exit(f"{path.name}: engine was built for another GPU/TensorRT; rebuild it on this device (README.md)")
    context = engine.create_execution_context()
    inp, out = engine.get_tensor_name(0), engine.get_tensor_name(1)

    def run(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        context.set_input_shape(inp, x.shape)
        y = np.empty(tuple(context.get_tensor_shape(out)), dtype=np.float32)
        _, d_in = cudart.cudaMalloc(x.nbytes)
        _, d_out = cudart.cudaMalloc(y.nbytes)
        cudart.cudaMemcpy(d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)
        context.set_tensor_address(inp, d_in)
        context.set_tensor_address(out, d_out)
        context.execute_async_v3(0)
        cudart.cudaMemcpy(y.ctypes.data, d_out, y.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)
        cudart.cudaFree(d_in)
        cudart.cudaFree(d_out)
        return y

    return run


def predict(run, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)]).argmax(1)


def latency_ms(run, x: np.ndarray, repeats: int = 30) -> float:
    for _ in range(5):
        run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--formats", default=None, help="comma-separated formats to check (default: all runnable)")
    p.add_argument("--max-drop", type=float, default=None, help="gate override (fraction)")
    p.add_argument("--min-agreement", type=float, default=None, help="gate override (fraction)")
    args = p.parse_args(argv)

    manifest_path = args.bundle / "manifest.json"
    if not manifest_path.is_file():
        print(f"error: {args.bundle} has no manifest.json", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text())
    for entry in list(manifest["files"].values()) + [manifest["samples"]]:
        file = args.bundle / entry["file"]
        if not file.is_file() or sha256(file) != entry["sha256"]:
            print(f"error: {entry['file']} is missing or does not match its manifest sha256", file=sys.stderr)
            return 2
    gate = manifest["gate"]
    max_drop = gate["max_robust_drop"] if args.max_drop is None else args.max_drop
    min_agreement = gate["min_agreement"] if args.min_agreement is None else args.min_agreement
    with np.load(args.bundle / "verify.npz") as data:
        samples = {k: data[k] for k in data.files}
    reference = manifest["table"]["torch"]
    wanted = args.formats.split(",") if args.formats else list(manifest["files"])
    adv_keys = sorted(k for k in samples if k.startswith("adv_"))
    header = ["format", "clean %", "agreement %"] + [f"transfer {k[4:]} %" for k in adv_keys] + ["b1 ms"]
    print(" | ".join(header))
    print(" | ".join(["torch (export)", f"{100 * reference['clean']:.1f}", "100.0"]
                     + [f"{100 * reference['transfer_' + k[4:]]:.1f}" for k in adv_keys] + ["-"]))
    failures = []
    for fmt in wanted:
        if fmt not in manifest["files"]:
            print(f"error: the bundle has no format '{fmt}'; it has {', '.join(manifest['files'])}", file=sys.stderr)
            return 2
        path = args.bundle / manifest["files"][fmt]["file"]
        try:
            run = trt_runner(path) if fmt.startswith("trt") else onnx_runner(path)
        except ImportError as exc:
            print(f"skipping {fmt}: {exc}", file=sys.stderr)
            continue
        pred = predict(run, samples["x"])
        row = {"clean": float((pred == samples["y"]).mean()),
               "agreement": float((pred == samples["torch_pred"]).mean())}
        for key in adv_keys:
            row["transfer_" + key[4:]] = float((predict(run, samples[key]) == samples["y"]).mean())
        print(" | ".join([fmt, f"{100 * row['clean']:.1f}", f"{100 * row['agreement']:.1f}"]
                         + [f"{100 * row['transfer_' + k[4:]]:.1f}" for k in adv_keys]
                         + [f"{latency_ms(run, samples['x'][:1]):.2f}"]))
        if row["agreement"] < min_agreement:
            failures.append(f"{fmt}: agreement {100 * row['agreement']:.1f}% < {100 * min_agreement:.1f}%")
        for key, value in row.items():
            if key != "agreement" and reference[key] - value > max_drop + 1e-9:
                failures.append(f"{fmt}: {key} drops {100 * (reference[key] - value):.1f} points")
    if failures:
        print("GATE FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("gate passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
