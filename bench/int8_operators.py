"""What ONNX Runtime runs for each INT8 file of one model, and how fast: onnxruntime's PTQ file against the
PT2E files of each QAT scheme (the QAT file of zero epochs: same quantisers, calibrated, not trained).

    python bench/int8_operators.py --arch mobilenetv2 --width 1 --size 32 --channels 3

For each file: the operators of ONNX Runtime's optimised graph (float ``Conv``/``FusedConv``/``Add`` in an
INT8 file are convolutions or adds it could not run in integers) and the median batch-1 latency over
``--runs`` runs on one thread. The weights are random (the graph and its cost do not depend on them);
calibration is on uniform random images. docs/design/qat.md, section 10, quotes its figures.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def optimised_operators(path: Path) -> tuple[dict[str, int], "object"]:
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.optimized_model_filepath = str(path.with_suffix(".optimised.onnx"))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return dict(collections.Counter(n.op_type for n in graph.node).most_common()), session


def median_ms(session, x: np.ndarray, runs: int) -> float:
    name = session.get_inputs()[0].name
    for _ in range(5):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    from robustedge.checkpoint import ModelSpec
    from robustedge.edge.convert import export_onnx, quantize_int8
    from robustedge.edge.qat_onnx import to_qdq_onnx
    from robustedge.qat import ACTIVATIONS, LEGACY_PATTERNS, PATTERNS, calibrate, convert, prepare_qat

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="mobilenetv2")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--schemes", default="uint8", help=f"QAT schemes to build, of {', '.join(ACTIVATIONS)} "
                                                            f"(int8 needs the mobile extra)")
    args = parser.parse_args(argv)
    unknown = set(args.schemes.split(",")) - set(ACTIVATIONS)
    if unknown:
        parser.error(f"unknown --schemes {', '.join(sorted(unknown))}; valid: {', '.join(ACTIVATIONS)}")
    spec = ModelSpec(args.arch, 10, args.channels, args.width, args.size)
    shape = spec.input_shape
    images = torch.rand(64, *shape)
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        torch.manual_seed(0)
        model = spec.build().eval()
        files["float (fp32)"] = export_onnx(model, shape, out / "fp32.onnx")
        files["PTQ, onnxruntime quantizer"] = quantize_int8(files["float (fp32)"], out / "ptq.onnx", images.numpy())
        for scheme in args.schemes.split(","):
            for patterns in dict.fromkeys((PATTERNS[scheme], LEGACY_PATTERNS[scheme])):
                torch.manual_seed(0)  # the float file's weights
                student = prepare_qat(spec.build().eval(), shape, scheme, patterns)
                calibrate(student, images)
                label = f"PT2E {scheme}, {patterns} patterns"
                files[label] = to_qdq_onnx(convert(student), shape, out / f"{scheme}_{patterns}.onnx")
        print(f"{args.arch} width {args.width}, {args.size}x{args.size}x{args.channels}, batch 1, one thread, "
              f"median of {args.runs} runs\n")
        print("| file | ms | ONNX Runtime's optimised graph |\n|---|---:|---|")
        for label, path in files.items():
            operators, session = optimised_operators(path)
            ms = median_ms(session, images[:1].numpy(), args.runs)
            print(f"| {label} | {ms:.2f} | {', '.join(f'{k} {v}' for k, v in operators.items())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
