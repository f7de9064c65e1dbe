"""Inference latency and size of the students: torch eager fp32, ONNX Runtime fp32 / fp16 / INT8
(and TensorRT where tensorrt and a GPU exist) on this machine.

    python bench/inference.py                                  # MobileNetV2 + ResNet-18, 32x32
    python bench/inference.py --students mobilenetv2 --repeats 5

Each student (random weights: latency does not depend on their values) is exported with the
library's own path (robustedge.edge.convert): ONNX opset 18 of the conv+BN-folded model, fp16
with fp32 I/O, static INT8 QDQ per-channel calibrated on 256 synthetic images, in both activation
types (int8 = S8S8, what `robustedge export` writes, and uint8 = U8S8). Latency: median over
``--iters`` calls after warm-up, taken ``--repeats`` times round-robin across formats so that
machine noise hits every format alike; the table gives the median of the repeats and each
format's speed-up over torch eager fp32 (the same model as exported: BN folded, eval mode,
inference mode, channels_last off, all threads).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    from robustedge.edge.convert import convert_fp16, export_onnx, quantize_int8, tensorrt_available
    from robustedge.runners import TorchRunner
    from robustedge.verifier import OrtRunner, median_latency_ms
    from robustedge.models import build_model, fold_batchnorm

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--students", default="mobilenetv2,resnet18")
    p.add_argument("--size", type=int, default=32, help="input height/width")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--iters", type=int, default=50, help="timed calls per measurement")
    p.add_argument("--repeats", type=int, default=3, help="round-robin measurements (median reported)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    rows = []
    trt_ok, trt_why = tensorrt_available()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.students.split(","):
            torch.manual_seed(0)
            model = build_model(arch, 10).eval()
            shape = (3, args.size, args.size)
            folder = Path(tmp) / arch
            folder.mkdir()
            fp32 = export_onnx(model, shape, folder / "model.onnx")
            calib = rng.random((256, *shape), dtype=np.float32)
            files = {"onnx fp32": fp32, "onnx fp16": convert_fp16(fp32, folder / "fp16.onnx"),
                     "onnx int8 (S8S8)": quantize_int8(fp32, folder / "int8.onnx", calib),
                     "onnx int8 (U8S8)": quantize_int8(fp32, folder / "int8u.onnx", calib, activations="uint8")}
            runners = {name: OrtRunner(path) for name, path in files.items()}
            if trt_ok:  # pragma: no cover - GPU only
                from robustedge.edge.convert import build_tensorrt
                from robustedge.verifier import TrtRunner

                for precision in ("fp16", "int8"):
                    engine = build_tensorrt(fp32, folder / f"{precision}.engine", precision, shape, calib)
                    runners[f"tensorrt {precision}"] = TrtRunner(engine)
            eager = TorchRunner(fold_batchnorm(model))
            sizes = {"torch fp32": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20}
            sizes |= {name: path.stat().st_size / 2**20 for name, path in files.items()}
            for batch in batches:
                x = rng.random((batch, *shape), dtype=np.float32)
                samples: dict[str, list[float]] = {}
                for _ in range(args.repeats):
                    samples.setdefault("torch fp32", []).append(median_latency_ms(eager, x, batch, repeats=args.iters))
                    for name, runner in runners.items():
                        samples.setdefault(name, []).append(median_latency_ms(runner, x, batch, repeats=args.iters))
                base = statistics.median(samples["torch fp32"])
                for name, values in samples.items():
                    ms = statistics.median(values)
                    rows.append((arch, batch, name, ms, base / ms, sizes.get(name, float("nan"))))
                    print(f"{arch} b{batch} {name}: {ms:.3f} ms ({base / ms:.2f}x torch)", flush=True)
    print(f"\n{args.size}x{args.size} inputs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} x {args.iters} calls" + ("" if trt_ok else f"; TensorRT: {trt_why}"))
    print("| student | batch | format | latency (ms) | speed-up vs torch eager | size (MB) |")
    print("|---|---:|---|---:|---:|---:|")
    for arch, batch, name, ms, speedup, size in rows:
        print(f"| {arch} | {batch} | {name} | {ms:.3f} | {speedup:.2f}x | {size:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
