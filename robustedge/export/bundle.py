"""``robustedge export`` and ``robustedge verify``: build and check a deployment bundle.

A bundle folder holds the model files, ``manifest.json`` (sha256 of every file, input shape and
range, classes, eps, the measured table and the gate) and ``verify.npz`` (clean and adversarial
samples with labels and torch's predictions), which ``export/verify_on_device.py`` replays on the
target without torch. The bundle is assembled in a temporary folder beside ``--out`` and renamed
into place at the end, so a failure never leaves a half-written bundle.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustedge import __version__
from robustedge.checkpoint import atomic_write_json, atomic_write_text, load_model
from robustedge.errors import RobustEdgeError
from robustedge.export import convert
from robustedge.export.verify import (TRANSFER_ATTACKS, Gate, craft_samples, format_table, square_for_torch,
                                      torch_row, verify_artifact)

FILES = {"onnx": "model.onnx", "onnx-fp16": "model.fp16.onnx", "onnx-int8": "model.int8.onnx",
         "trt-fp16": "model.fp16.engine", "trt-int8": "model.int8.engine"}
BUNDLE_FORMAT = "robustedge-bundle/1"


@dataclass
class ExportOptions:
    formats: list[str] = field(default_factory=lambda: ["onnx", "onnx-fp16", "onnx-int8"])
    n: int = 500  # verification examples (first n of the test split)
    calibration_n: int = 512
    calibration_method: str = "minmax"
    calibrate_adversarial: bool = False
    int8_activations: str = "uint8"  # the ONNX INT8 file's; TensorRT INT8 always uses int8-symmetric
    transfer_attacks: tuple[str, ...] = TRANSFER_ATTACKS
    square_n: int = 100
    square_queries: int = 5000
    parity_tol: float = 1e-3  # max |logit difference| of fp32 ONNX vs torch
    seed: int = 0
    data_root: str | None = None
    gate: Gate = field(default_factory=Gate)


def parse_formats(text: str | list[str]) -> list[str]:
    names = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    bad = [f for f in names if f not in FILES]
    if bad or not names:
        raise RobustEdgeError(f"unknown export format '{(bad or [''])[0]}'; valid formats: {', '.join(FILES)}")
    return ["onnx"] + [f for f in dict.fromkeys(names) if f != "onnx"]  # fp32 ONNX is the source of the rest


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _calibration(meta, opts: ExportOptions, model: torch.nn.Module) -> np.ndarray:
    from robustedge.data import split_for_model

    train = split_for_model(meta, None, opts.data_root, "train", None)
    if len(train) == 0:
        raise RobustEdgeError("no training images to calibrate INT8 with")
    gen = torch.Generator().manual_seed(opts.seed)
    idx = torch.randperm(len(train), generator=gen)[:opts.calibration_n]
    x = train.images[idx].float() / 255.0
    if opts.calibrate_adversarial:  # half clean, half PGD-20 examples of the float model
        from robustedge.evaluate import SUITE

        half = len(x) // 2
        y = train.labels[idx][half:]
        x[half:] = SUITE["pgd20"].run(model, x[half:], y, meta.eps, torch.Generator().manual_seed(opts.seed))
    return x.numpy().astype(np.float32)


def _parity(model: torch.nn.Module, onnx_path: Path, x: np.ndarray, seed: int) -> float:
    from robustedge.export.runners import OrtRunner

    runner = OrtRunner(onnx_path)
    rand = np.random.default_rng(seed).random((64, *x.shape[1:]), dtype=np.float32)
    worst = 0.0
    for batch in (x[:256], rand):
        with torch.no_grad():
            ref = model(torch.from_numpy(batch)).numpy()
        worst = max(worst, float(np.abs(runner(batch) - ref).max()))
    return worst


def export_bundle(checkpoint: str | Path, out: str | Path, opts: ExportOptions, progress=print,
                  precomputed_adv: dict[str, torch.Tensor] | None = None) -> tuple[dict, list[str]]:
    """Build the bundle at ``out``; returns (manifest, gate failures)."""
    from robustedge.data import split_for_model

    out, checkpoint = Path(out), Path(checkpoint)
    formats = parse_formats(opts.formats)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RobustEdgeError(f"{out} exists and is not empty; choose a new --out (or --force to replace it)")
    model, meta = load_model(checkpoint, "cpu")
    if meta.eps is None:
        raise RobustEdgeError(f"{checkpoint} records no eps; it is needed for the robustness checks")
    split = split_for_model(meta, None, opts.data_root, "test", opts.n)
    x, y = split.float_images(), split.labels
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        table, skipped, timings = {}, {}, {}
        t0 = time.perf_counter()
        progress(f"exporting {checkpoint.name} ({meta.spec.arch}) to ONNX opset {convert.OPSET}")
        convert.export_onnx(model, meta.spec.input_shape, tmp / FILES["onnx"])
        diff = _parity(model, tmp / FILES["onnx"], x.numpy(), opts.seed)
        if diff > opts.parity_tol:
            raise RobustEdgeError(f"fp32 ONNX logits differ from torch by {diff:.2e} (> {opts.parity_tol:.0e})")
        timings["onnx"] = time.perf_counter() - t0
        if "onnx-fp16" in formats:
            convert.convert_fp16(tmp / FILES["onnx"], tmp / FILES["onnx-fp16"])
        if "onnx-int8" in formats or "trt-int8" in formats:
            progress(f"INT8: {opts.calibration_method} calibration on {opts.calibration_n} training images"
                     + (" (half PGD-20 adversarial)" if opts.calibrate_adversarial else ""))
            calibration = _calibration(meta, opts, model)
            convert.quantize_int8(tmp / FILES["onnx"], tmp / FILES["onnx-int8"], calibration,
                                  opts.calibration_method, activations=opts.int8_activations)
        trt_formats = [f for f in formats if f.startswith("trt")]
        if trt_formats:
            ok, why = convert.tensorrt_available()
            for fmt in trt_formats:
                if not ok:
                    skipped[fmt] = why
                    progress(f"skipping {fmt}: {why}")
                    continue
                source = tmp / FILES["onnx"]
                if fmt == "trt-int8":
                    source = convert.quantize_int8(source, tmp / "trt-source.int8.onnx", calibration,
                                                   opts.calibration_method, activations="int8-symmetric")
                convert.build_tensorrt(source, tmp / FILES[fmt], fmt.split("-")[1], meta.spec.input_shape)
                if fmt == "trt-int8":
                    source.unlink()
        if "onnx-int8" not in formats and (tmp / FILES["onnx-int8"]).exists():
            (tmp / FILES["onnx-int8"]).unlink()

        progress(f"crafting {', '.join(opts.transfer_attacks)} examples on the torch model ({len(y)} test images)")
        samples = craft_samples(model, x, y, meta.eps, tuple(opts.transfer_attacks), opts.seed, precomputed_adv)
        table["torch"] = torch_row(model, samples, checkpoint.stat().st_size)
        if opts.square_n > 0:
            table["torch"]["square"] = square_for_torch(model, samples, meta.eps, opts.square_n, opts.square_queries,
                                                        opts.seed)
        built = [f for f in formats if (tmp / FILES[f]).exists()]
        for fmt in built:
            progress(f"verifying {fmt} through its runtime")
            table[fmt] = verify_artifact(tmp / FILES[fmt], fmt, samples, meta.eps, opts.square_n, opts.square_queries,
                                         opts.seed)
        table["onnx"]["max_abs_logit_diff"] = diff
        failures = opts.gate.check(table)
        np.savez_compressed(tmp / "verify.npz", **samples)
        manifest = {
            "format": BUNDLE_FORMAT, "robustedge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "source": {"checkpoint": checkpoint.name, "sha256": sha256(checkpoint), "arch": meta.spec.arch,
                       "relative_path": os.path.relpath(checkpoint.resolve(), out.resolve()),
                       "method": meta.method, "dataset": meta.dataset},
            "input": {"name": convert.INPUT_NAME, "shape": list(meta.spec.input_shape), "dtype": "float32",
                      "range": [0.0, 1.0], "layout": "NCHW", "dynamic_batch": True},
            "output": {"name": convert.OUTPUT_NAME, "classes": meta.classes},
            "eps": meta.eps, "opset": convert.OPSET,
            "files": {f: {"file": FILES[f], "sha256": sha256(tmp / FILES[f]), "bytes": (tmp / FILES[f]).stat().st_size}
                      for f in built},
            "samples": {"file": "verify.npz", "sha256": sha256(tmp / "verify.npz"), "n": int(len(y)),
                        "attacks": list(opts.transfer_attacks)},
            "skipped": skipped, "table": table, "gate": asdict(opts.gate), "gate_failures": failures,
            "options": {k: v for k, v in asdict(opts).items() if k != "gate"},
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        atomic_write_text(tmp / "verify.md", format_table(table))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest, failures


def read_bundle(bundle: str | Path) -> tuple[Path, dict]:
    """The manifest of a bundle whose files all match their sha256 (refused otherwise)."""
    bundle = Path(bundle)
    path = bundle / "manifest.json"
    if not path.is_file():
        raise RobustEdgeError(f"{bundle} is not an export bundle (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise RobustEdgeError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise RobustEdgeError(f"{path} is not a RobustEdge bundle manifest")
    entries = list(manifest["files"].values()) + [manifest["samples"]]
    for entry in entries:
        file = bundle / entry["file"]
        if not file.is_file():
            raise RobustEdgeError(f"bundle file missing: {file}")
        if sha256(file) != entry["sha256"]:
            raise RobustEdgeError(f"{file.name} does not match its manifest sha256 (corrupted or replaced); "
                                  f"refusing to verify it")
    return bundle, manifest


def verify_bundle(bundle: str | Path, gate: Gate | None = None, square_n: int | None = None,
                  progress=print) -> tuple[dict, list[str]]:
    """Re-run the checks on a bundle's artifacts; the torch row comes from the manifest."""
    from robustedge.export.verify import verify_artifact

    bundle, manifest = read_bundle(bundle)
    with np.load(bundle / "verify.npz") as data:
        samples = {k: data[k] for k in data.files}
    options = manifest["options"]
    square_n = options["square_n"] if square_n is None else square_n
    table = {"torch": manifest["table"]["torch"]}
    for fmt, entry in manifest["files"].items():
        if fmt.startswith("trt"):
            ok, why = convert.tensorrt_available()
            if not ok:
                progress(f"skipping {fmt}: {why}")
                continue
        progress(f"verifying {fmt} through its runtime")
        table[fmt] = verify_artifact(bundle / entry["file"], fmt, samples, manifest["eps"], square_n,
                                     options["square_queries"], options["seed"])
    gate = gate or Gate(**manifest["gate"])
    failures = gate.check(table)
    report = {"table": table, "gate": asdict(gate), "gate_failures": failures,
              "verified": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(bundle / "verify.json", report)
    atomic_write_text(bundle / "verify.md", format_table(table))
    return report, failures
