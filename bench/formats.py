"""Size and latency of every export format, per model, side by side in one run.

    python bench/formats.py runs/quickstart/student_bmtard/best.safetensors runs/mnv2_32/best.safetensors \
        --out runs/formats

Each checkpoint is exported to every format this machine can build (ONNX fp32/fp16/INT8, ORT Mobile
fp32/INT8, ExecuTorch fp32/INT8 with the ``mobile`` extra) through ``robustedge export``'s own code,
so every figure comes from the bundle's verification table: file size, median batch-1 latency through
the format's own runtime (30 runs after 5 warm-up), clean accuracy and top-1 agreement with torch on
``--n`` test images. Robustness columns are off here (``--whitebox-attacks none``, no Square):
``robustedge export`` measures those.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FORMATS = ["onnx", "onnx-fp16", "onnx-int8", "ort", "ort-int8", "executorch", "executorch-int8"]


def main(argv: list[str] | None = None) -> int:
    from robustedge.edge.bundle import ExportOptions, export_bundle
    from robustedge.files import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", required=True, help="folder for the bundles and formats.md")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["| model | format | size (MB) | b1 latency (ms) | clean (%) | agreement (%) |",
             "|---|---|---:|---:|---:|---:|"]
    for checkpoint in map(Path, args.checkpoints):
        bundle = out / f"{checkpoint.parent.name}_formats"
        manifest, _ = export_bundle(checkpoint, bundle, ExportOptions(
            formats=FORMATS, n=args.n, transfer_attacks=("pgd20",), whitebox_attacks=(), square_n=0),
            progress=lambda m: print(m, flush=True), force=bundle.exists())
        for fmt, row in manifest["table"].items():
            lines.append(f"| {checkpoint.parent.name} | {fmt} | {row['size_mb']:.3f} | {row['latency_b1_ms']:.3f} | "
                         f"{100 * row['clean']:.1f} | {100 * row['agreement']:.1f} |")
        for fmt, why in manifest["skipped"].items():
            lines.append(f"| {checkpoint.parent.name} | {fmt} | not built: {why} | | | |")
        (out / f"{checkpoint.parent.name}.json").write_text(json.dumps(manifest["table"], indent=1))
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "formats.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
