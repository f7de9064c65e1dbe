"""``robustedge export`` and ``robustedge verify``: build and check a deployment bundle.

A bundle folder holds the model files, ``manifest.json`` (sha256 of every file, input shape and
range, classes, eps, the measured table and the gate), ``verify.npz`` (clean and adversarial samples
with labels and torch's predictions) and ``verify.py``, a copy of the torch-free
:mod:`robustedge.verify_core` that replays the samples on the target with numpy and the runtime
only. The bundle is assembled in a temporary folder beside ``--out`` and renamed into place at the
end, so a failure never leaves a half-written bundle; ``--force`` replaces only a folder that is a
RobustEdge bundle and does not hold the source checkpoint (docs/design.md, "Files").
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustedge import __version__, verify_core
from robustedge.checkpoint import load_model
from robustedge.errors import RobustEdgeError
from robustedge.export import convert
from robustedge.export.verify import (TRANSFER_ATTACKS, WHITEBOX_ATTACKS, check_transfer_attacks,
                                      check_whitebox_attacks, craft_samples, square_examples, torch_row,
                                      verify_artifact)
from robustedge.flags import FlagSettings
from robustedge.files import (OutputKind, atomic_write_json, atomic_write_text, check_output_folder, make_temp_dir,
                              replace_folder)
from robustedge.verify_core import (BUNDLE_FORMAT, FORMATS, MANIFEST_FILE, SAMPLES_FILE, VERIFIER_FILE, Gate,
                                    accuracy_row, artifact_row, bundle_flags, check_finite, format_flags,
                                    format_table, predict, read_bundle, sha256, square_key, whitebox_key)

BUNDLE = OutputKind("export bundle", MANIFEST_FILE, BUNDLE_FORMAT)


@dataclass
class ExportOptions:
    formats: list[str] = field(default_factory=lambda: ["onnx", "onnx-fp16", "onnx-int8"])
    n: int = 500  # verification examples (first n of the test split)
    calibration_n: int = 512
    calibration_method: str = "minmax"
    calibrate_adversarial: bool = False
    int8_activations: str = "uint8"  # the ONNX INT8 file's; TensorRT INT8 always uses int8-symmetric
    transfer_attacks: tuple[str, ...] = TRANSFER_ATTACKS
    whitebox_attacks: tuple[str, ...] = WHITEBOX_ATTACKS  # on the twin of every INT8 artifact (empty: none)
    square_n: int = 100
    square_queries: int = 5000
    flags: FlagSettings = field(default_factory=FlagSettings)
    parity_tol: float = 1e-3  # max |logit difference| of fp32 ONNX vs torch
    seed: int = 0
    data_root: str | None = None
    gate: Gate = field(default_factory=Gate)

    def validate(self) -> "ExportOptions":
        """Every option checked before anything is read or written."""
        self.formats = parse_formats(self.formats)
        for name, minimum in (("n", 1), ("calibration_n", 1), ("square_n", 0), ("square_queries", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise RobustEdgeError(f"{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        if self.calibration_method not in convert.CALIBRATION_METHODS:
            raise RobustEdgeError(f"unknown calibration method '{self.calibration_method}'; valid: "
                                  f"{', '.join(convert.CALIBRATION_METHODS)}")
        if self.int8_activations not in convert.INT8_ACTIVATIONS:
            raise RobustEdgeError(f"INT8 activations must be one of {', '.join(convert.INT8_ACTIVATIONS)}, "
                                  f"got '{self.int8_activations}'")
        self.transfer_attacks = check_transfer_attacks(tuple(self.transfer_attacks))
        self.whitebox_attacks = check_whitebox_attacks(tuple(self.whitebox_attacks))
        self.flags.validate()
        if not (isinstance(self.parity_tol, (int, float)) and math.isfinite(self.parity_tol) and self.parity_tol > 0):
            raise RobustEdgeError(f"parity tolerance must be a positive number, got {self.parity_tol!r}")
        if not isinstance(self.gate, Gate):
            raise RobustEdgeError("gate must be a Gate")
        return self


def parse_formats(text: str | list[str]) -> list[str]:
    names = [f.strip() for f in (text.split(",") if isinstance(text, str) else text) if f.strip()]
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise RobustEdgeError(f"unknown export format '{(bad or [''])[0]}'; valid formats: {', '.join(FORMATS)}")
    return ["onnx"] + [f for f in dict.fromkeys(names) if f != "onnx"]  # fp32 ONNX is the source of the rest


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
    """Max |logit difference| of the fp32 ONNX file against torch on test and random inputs."""
    from robustedge.export.runners import TorchRunner
    from robustedge.verify_core import OrtRunner, predict

    runner, reference = OrtRunner(onnx_path), TorchRunner(model)
    rand = np.random.default_rng(seed).random((64, *x.shape[1:]), dtype=np.float32)
    worst = 0.0
    for batch in (x[:256], rand):
        ref = predict(reference, batch, what="the torch model")
        got = predict(runner, batch, what="the fp32 ONNX file")
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def _build_formats(model, meta, formats: list[str], tmp: Path, opts: ExportOptions, progress) -> dict[str, str]:
    """Write every requested model file into ``tmp``; return {format: why} for those skipped."""
    skipped: dict[str, str] = {}
    if "onnx-fp16" in formats:
        convert.convert_fp16(tmp / FORMATS["onnx"][0], tmp / FORMATS["onnx-fp16"][0])
    calibration = None
    if "onnx-int8" in formats or "trt-int8" in formats:
        progress(f"INT8: {opts.calibration_method} calibration on {opts.calibration_n} training images"
                 + (" (half PGD-20 adversarial)" if opts.calibrate_adversarial else ""))
        calibration = _calibration(meta, opts, model)
    if "onnx-int8" in formats:
        convert.quantize_int8(tmp / FORMATS["onnx"][0], tmp / FORMATS["onnx-int8"][0], calibration,
                              opts.calibration_method, activations=opts.int8_activations)
    for fmt in [f for f in formats if f.startswith("trt")]:
        ok, why = convert.tensorrt_available()
        if not ok:
            skipped[fmt] = why
            progress(f"skipping {fmt}: {why}")
            continue
        source = tmp / FORMATS["onnx"][0]
        if fmt == "trt-int8":  # TensorRT takes zero points of 0 only: a symmetric QDQ file of its own
            source = convert.quantize_int8(source, tmp / "trt-source.int8.onnx", calibration,
                                           opts.calibration_method, activations="int8-symmetric")
        convert.build_tensorrt(source, tmp / FORMATS[fmt][0], fmt.split("-")[1], meta.spec.input_shape)
        if fmt == "trt-int8":
            source.unlink()
    return skipped


def export_bundle(checkpoint: str | Path, out: str | Path, opts: ExportOptions, progress=print,
                  precomputed_adv: dict[str, torch.Tensor] | None = None, force: bool = False
                  ) -> tuple[dict, list[str]]:
    """Build the bundle at ``out``; returns (manifest, gate failures).

    ``force`` replaces an existing bundle at ``out`` (never anything else, and never a folder that
    holds ``checkpoint``).
    """
    from robustedge.data import split_for_model

    out, checkpoint = Path(out), Path(checkpoint)
    opts.validate()
    check_output_folder(out, BUNDLE, replace=force, protect=[checkpoint])
    model, meta = load_model(checkpoint, "cpu")
    if meta.eps is None:
        raise RobustEdgeError(f"{checkpoint} records no eps; it is needed for the robustness checks")
    split = split_for_model(meta, None, opts.data_root, "test", opts.n)
    x, y = split.float_images(), split.labels
    with torch.no_grad():
        check_finite(model(x[:256]).numpy(), f"{checkpoint.name}")
    tmp = make_temp_dir(out)
    timings, t0 = {}, time.perf_counter()
    try:
        progress(f"exporting {checkpoint.name} ({meta.spec.arch}) to ONNX opset {convert.OPSET}")
        convert.export_onnx(model, meta.spec.input_shape, tmp / FORMATS["onnx"][0])
        diff = _parity(model, tmp / FORMATS["onnx"][0], x.numpy(), opts.seed)
        if diff > opts.parity_tol:
            raise RobustEdgeError(f"fp32 ONNX logits differ from torch by {diff:.2e} (> {opts.parity_tol:.0e})")
        skipped = _build_formats(model, meta, opts.formats, tmp, opts, progress)

        timings["convert"] = time.perf_counter() - t0
        progress(f"crafting {', '.join(opts.transfer_attacks)} examples on the torch model ({len(y)} test images)")
        t0 = time.perf_counter()
        samples = craft_samples(model, x, y, meta.eps, opts.transfer_attacks, opts.seed, precomputed_adv)
        timings["transfer_examples"] = time.perf_counter() - t0
        common = dict(square_n=min(opts.square_n, len(y)), square_queries=opts.square_queries, seed=opts.seed,
                      flag_settings=opts.flags, gate=opts.gate)
        table, flags, checks = {}, {}, {}
        table["torch"], flags["torch"], checks["torch"] = torch_row(model, samples, checkpoint.stat().st_size,
                                                                    meta.eps, **common)
        built = [f for f in opts.formats if (tmp / FORMATS[f][0]).exists()]
        for fmt in built:
            progress(f"verifying {fmt} through its runtime")
            table[fmt], flags[fmt], checks[fmt] = verify_artifact(
                tmp / FORMATS[fmt][0], fmt, samples, meta.eps, float_model=model, whitebox=opts.whitebox_attacks,
                progress=progress, **common)
        table["onnx"]["max_abs_logit_diff"] = diff
        failures = opts.gate.check(table, flags)
        np.savez_compressed(tmp / SAMPLES_FILE, **samples)
        shutil.copyfile(verify_core.__file__, tmp / VERIFIER_FILE)
        manifest = _manifest(checkpoint, out, meta, opts, tmp, built, samples, skipped, table, failures)
        manifest |= {"flags": flags, "checks": checks, "seconds": timings}
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        atomic_write_text(tmp / "verify.md", format_table(table) + "\n" + format_flags(flags))
        replace_folder(tmp, out, BUNDLE, replace=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest, failures


def _manifest(checkpoint: Path, out: Path, meta, opts: ExportOptions, tmp: Path, built: list[str],
              samples: dict, skipped: dict, table: dict, failures: list[str]) -> dict:
    return {
        "format": BUNDLE_FORMAT, "robustedge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": {"checkpoint": checkpoint.name, "sha256": sha256(checkpoint), "arch": meta.spec.arch,
                   "relative_path": os.path.relpath(checkpoint.resolve(), out.resolve()),
                   "method": meta.method, "dataset": meta.dataset},
        "input": {"name": convert.INPUT_NAME, "shape": list(meta.spec.input_shape), "dtype": "float32",
                  "range": [0.0, 1.0], "layout": "NCHW", "dynamic_batch": True},
        "output": {"name": convert.OUTPUT_NAME, "classes": meta.classes},
        "eps": meta.eps, "opset": convert.OPSET,
        "files": {f: {"file": FORMATS[f][0], "sha256": sha256(tmp / FORMATS[f][0]),
                      "bytes": (tmp / FORMATS[f][0]).stat().st_size} for f in built},
        "samples": {"file": SAMPLES_FILE, "sha256": sha256(tmp / SAMPLES_FILE), "n": int(len(samples["y"])),
                    "attacks": list(opts.transfer_attacks),
                    "whitebox": {f: [a for a in opts.whitebox_attacks if whitebox_key(f, a) in samples] for f in built
                                 if any(whitebox_key(f, a) in samples for a in opts.whitebox_attacks)},
                    "square": {r: int(len(samples[square_key(r)])) for r in ["torch"] + built
                               if square_key(r) in samples}},
        "verifier": {"file": VERIFIER_FILE, "sha256": sha256(tmp / VERIFIER_FILE)},
        "skipped": skipped, "table": table, "gate": opts.gate.to_dict(), "gate_failures": failures,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("gate", "flags")} | {"flags": opts.flags.to_dict()},
    }


def verify_bundle(bundle: str | Path, gate: Gate | None = None, square_n: int | None = None,
                  progress=print) -> tuple[dict, list[str]]:
    """Re-run a bundle's checks through each runtime: replays of every stored example set (the same
    as the bundle's own ``verify.py``), the comparison flags recomputed, the gradient checks as recorded
    at export. ``square_n`` > 0 runs a fresh Square attack on each runtime instead of replaying the
    stored one; the torch row comes from the manifest."""
    bundle = Path(bundle)
    manifest, samples = read_bundle(bundle)
    options = manifest["options"]
    gate = gate or Gate.from_dict(manifest["gate"])
    if square_n is not None and (not isinstance(square_n, int) or square_n < 0):
        raise RobustEdgeError(f"square-n must be an integer >= 0, got {square_n!r}")
    table = {"torch": manifest["table"]["torch"]}
    flags = {"torch": manifest.get("flags", {}).get("torch", [])}
    for fmt, entry in manifest["files"].items():
        if FORMATS[fmt][1] == "tensorrt":
            ok, why = convert.tensorrt_available()
            if not ok:
                progress(f"skipping {fmt}: {why}")
                continue
        progress(f"verifying {fmt} through its runtime")
        row, results, runner = artifact_row(bundle / entry["file"], fmt, samples)
        if square_n is not None:
            results.pop("square", None)
            if square_n > 0:
                fresh = square_examples(runner, samples, manifest["eps"], min(square_n, len(samples["y"])),
                                        options["square_queries"], options["seed"], what=fmt)
                results["square"] = predict(runner, fresh, what=fmt).argmax(1) == samples["y"][:len(fresh)]
            row = {k: v for k, v in row.items() if k not in ("square", "worst")} | accuracy_row(results)
        for key in ("twin_agreement", "twin_max_logit_diff", "max_abs_logit_diff"):
            if key in manifest["table"].get(fmt, {}):
                row[key] = manifest["table"][fmt][key]
        table[fmt] = row
        flags[fmt] = bundle_flags(manifest, fmt, results, gate.flag_tolerance)
    failures = gate.check(table, flags)
    report = {"table": table, "flags": flags, "gate": gate.to_dict(), "gate_failures": failures,
              "verified": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_json(bundle / "verify.json", report)
    atomic_write_text(bundle / "verify.md", format_table(table) + "\n" + format_flags(flags))
    return report, failures
