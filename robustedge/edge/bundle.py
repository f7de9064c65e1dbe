"""``robustedge export``: build a deployment bundle and verify every file in it through its own runtime.

A bundle folder holds the model files, ``manifest.json`` (sha256 of every file, input shape and
range, classes, eps, the measured table and the gate), ``verify.npz`` (clean and adversarial samples
with labels and torch's predictions) and ``verify.py``, the torch-free :mod:`robustedge.verifier`
assembled into one file, that replays the samples on the target with numpy and the runtime only. What
each format is (file, runtime, source, builder, needs) is its row in :mod:`robustedge.verifier.formats`,
read through :mod:`robustedge.edge.formats`. The bundle is assembled in a temporary folder beside
``--out`` and renamed into place at the end, so a failure never leaves a half-written bundle;
``--force`` replaces only a folder that is a RobustEdge bundle and does not hold the source checkpoint
(docs/design/files.md, "Files").
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustedge._version import __version__
from robustedge.errors import RobustEdgeError
from robustedge.edge import convert
from robustedge.edge.formats import (EXPORT_FORMATS, FLOAT_FIRST, ORT_SOURCES, QAT_FIRST, QAT_FORMATS, QAT_SCHEME,
                                     available, builder, source_format)
from robustedge.edge.verify import (TRANSFER_ATTACKS, WHITEBOX_ATTACKS, check_transfer_attacks,
                                      check_whitebox_attacks, craft_samples, torch_row,
                                      verify_artifact)
from robustedge.flags import FlagSettings
from robustedge.files import (OutputKind, atomic_write_bytes, atomic_write_json, atomic_write_text,
                              check_output_folder, make_temp_dir, replace_folder)
from robustedge.verifier import (BUNDLE_FORMAT, FORMAT_TABLE, FORMATS, MANIFEST_FILE, ORT_OPERATORS_FILE, SAMPLES_FILE,
                                 VERIFIER_FILE, Gate, check_finite, format_flags, format_table, platform_facts, sha256,
                                 square_key, whitebox_key)
from robustedge.verifier.assemble import assemble

BUNDLE = OutputKind("export bundle", MANIFEST_FILE, BUNDLE_FORMAT)


INT8_QUANTIZERS = ("onnxruntime", "pt2e")


@dataclass
class ExportOptions:
    formats: list[str] = field(default_factory=lambda: ["onnx", "onnx-fp16", "onnx-int8"])
    n: int = 500  # verification examples (first n of the test split)
    calibration_n: int = 512
    calibration_method: str = "minmax"
    calibrate_adversarial: bool = False
    int8_activations: str = "uint8"  # the ONNX INT8 file's; TensorRT INT8 always uses int8-symmetric
    # who quantises the float student's onnx-int8 file: onnxruntime's static quantizer, or pt2e: torchao's PT2E
    # quantizer that QAT trains under, calibrated and converted with no training (a QAT run of zero epochs)
    int8_quantizer: str = "onnxruntime"
    # onnxruntime's INT8 files (onnx-int8, ort-int8, trt-int8) with these layers in float (convert.FLOAT_LAYERS)
    int8_float_layers: str = "none"
    transfer_attacks: tuple[str, ...] = TRANSFER_ATTACKS
    whitebox_attacks: tuple[str, ...] = WHITEBOX_ATTACKS  # on the twin of every INT8 artifact (empty: none)
    square_n: int = 100
    square_queries: int = 5000
    flags: FlagSettings = field(default_factory=FlagSettings)
    parity_tol: float = 1e-3  # max |logit difference| of fp32 ONNX vs torch
    seed: int = 0
    data_root: str | None = None
    gate: Gate = field(default_factory=Gate)
    # processors whose builds of the runtimes replay the bundle too, under emulation (robustedge/edge/emulation.py);
    # their rows join the gated table
    emulate: tuple[str, ...] = ()

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
        if self.int8_quantizer not in INT8_QUANTIZERS:
            raise RobustEdgeError(f"unknown INT8 quantizer '{self.int8_quantizer}'; valid: {', '.join(INT8_QUANTIZERS)}")
        if self.int8_quantizer == "pt2e" and self.calibration_method != "minmax":
            raise RobustEdgeError("the pt2e quantizer calibrates by min-max, as QAT's observers do; "
                                  f"--calibration-method {self.calibration_method} is onnxruntime's")
        if self.int8_float_layers not in convert.FLOAT_LAYERS:
            raise RobustEdgeError(f"unknown INT8 float layers '{self.int8_float_layers}'; valid: "
                                  f"{', '.join(convert.FLOAT_LAYERS)}")
        if self.int8_quantizer == "pt2e" and self.int8_float_layers != "none":
            raise RobustEdgeError("the pt2e quantizer quantises every layer QAT trains quantised; --int8-float-layers "
                                  "is onnxruntime's")
        if self.int8_activations not in convert.INT8_ACTIVATIONS:
            raise RobustEdgeError(f"INT8 activations must be one of {', '.join(convert.INT8_ACTIVATIONS)}, "
                                  f"got '{self.int8_activations}'")
        self.transfer_attacks = check_transfer_attacks(_names_arg(self.transfer_attacks, "transfer_attacks"))
        self.whitebox_attacks = check_whitebox_attacks(_names_arg(self.whitebox_attacks, "whitebox_attacks"))
        from robustedge.flags import FlagSettings

        if not isinstance(self.flags, FlagSettings):
            raise RobustEdgeError(f"flags must be a FlagSettings, got {self.flags!r}")
        self.flags.validate()
        if not (isinstance(self.parity_tol, (int, float)) and math.isfinite(self.parity_tol) and self.parity_tol > 0):
            raise RobustEdgeError(f"parity tolerance must be a positive number, got {self.parity_tol!r}")
        if not isinstance(self.gate, Gate):
            raise RobustEdgeError("gate must be a Gate")
        from robustedge.edge.emulated_env import cache_folder, parse_isas

        self.emulate = parse_isas(self.emulate)
        if self.emulate:
            cache_folder()  # a cache that cannot be made is refused before the export starts
        return self


def _names_arg(value, name: str) -> tuple[str, ...]:
    """A list of names from a comma-separated string or a list/tuple of strings (the API's and the CLI's forms)."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(v.strip() for v in value if v.strip())
    raise RobustEdgeError(f"{name} must be a comma-separated string or a list of names, got {value!r}")


def parse_formats(text: str | list[str]) -> list[str]:
    names = list(_names_arg(text, "formats"))
    bad = [f for f in names if f not in EXPORT_FORMATS]
    if bad or not names:
        raise RobustEdgeError(f"unknown export format '{(bad or [''])[0]}'; valid formats: {', '.join(FORMATS)}")
    return list(dict.fromkeys(names))


def _check_float_layers(opts: ExportOptions, formats: list[str], qat: bool) -> None:
    """--int8-float-layers changes onnxruntime's post-training INT8 files only: refused where it would change
    nothing (the manifest records the option, so it would claim mixed precision the files do not have)."""
    if opts.int8_float_layers == "none":
        return
    if qat:
        raise RobustEdgeError("a QAT student's INT8 files are the function it trained as; --int8-float-layers is for "
                              "post-training INT8 of a float student")
    if not any(FORMATS[f].int8 and FORMATS[f].runtime in ("onnxruntime", "tensorrt") for f in formats):
        raise RobustEdgeError("--int8-float-layers changes onnxruntime's INT8 files (onnx-int8, ort-int8, trt-int8); "
                              f"--formats asked for none of them ({', '.join(opts.formats)})")


def plan_formats(requested: list[str], qat: dict | None) -> tuple[list[str], dict[str, str]]:
    """(formats to build, {format: why not}): a float student always builds fp32 ONNX first (the source
    of the rest); a QAT student builds only its INT8 formats, straight from its learned scales."""
    requested = list(requested)
    for fmt in list(requested):  # a format converted from another brings it (ort-int8: its source, and its twin's)
        made_from = EXPORT_FORMATS.get(fmt).source
        if made_from not in (None, FLOAT_FIRST) and made_from not in requested:
            requested.insert(requested.index(fmt), made_from)
    if not qat:
        return [FLOAT_FIRST] + [f for f in requested if f != FLOAT_FIRST], {}
    why = "a QAT student is exported as INT8 only: its float weights are not the function it was trained as"
    skipped = {f: why for f in requested if f not in QAT_FORMATS}
    formats = [f for f in requested if f in QAT_FORMATS]
    if not formats:
        raise RobustEdgeError(f"a QAT student exports to {', '.join(QAT_FORMATS)}; --formats asked for none of them")
    for fmt in [f for f in formats if f in QAT_SCHEME and QAT_SCHEME[f][0] != qat.get("activations")]:
        formats.remove(fmt)
        skipped[fmt] = f"{QAT_SCHEME[fmt][1]}: train the QAT student with --qat-activations {QAT_SCHEME[fmt][0]}"
        if not formats:
            raise RobustEdgeError(skipped[fmt] if len(requested) == 1 else
                                  f"none of {', '.join(requested)} can be built from this QAT student "
                                  f"(activations {qat.get('activations')}): {skipped[fmt]}")
    if QAT_FIRST not in formats:  # always written first: the source of the rest, and their twin
        formats.insert(0, QAT_FIRST)
    return formats, skipped


def _calibration(meta, opts: ExportOptions, model: torch.nn.Module) -> np.ndarray:
    from robustedge.data import calibration_images, calibration_indices, split_for_model

    train = split_for_model(meta, None, opts.data_root, "train", None)
    if len(train) == 0:
        raise RobustEdgeError("no training images to calibrate INT8 with")
    x = calibration_images(train, opts.calibration_n, opts.seed)
    if opts.calibrate_adversarial:  # half clean, half PGD-20 examples of the float model
        from robustedge.suite import run_attack

        half = len(x) // 2
        y = train.labels[calibration_indices(train, opts.calibration_n, opts.seed)][half:]
        x[half:] = run_attack("pgd20", model, x[half:], y, meta.eps, 256, opts.seed)[1]
    return x.numpy().astype(np.float32)


def _parity(model: torch.nn.Module, onnx_path: Path, x: np.ndarray, seed: int) -> dict:
    """Max |logit difference| of an ONNX file against torch on test and random inputs, and top-1 agreement
    on the test inputs (random noise has near-tied logits, whose order a rounding step flips: it would
    measure the noise, not the file)."""
    from robustedge.runners import TorchRunner
    from robustedge.verifier import OrtRunner, predict

    runner, reference = OrtRunner(onnx_path), TorchRunner(model)
    rand = np.random.default_rng(seed).random((64, *x.shape[1:]), dtype=np.float32)
    refs, gots = [], []
    for batch in (x[:256], rand):
        refs.append(predict(reference, batch, what="the torch model"))
        gots.append(predict(runner, batch, what=onnx_path.name))
    ref, got = np.concatenate(refs), np.concatenate(gots)
    real = slice(0, len(refs[0]))
    return {"max_abs_logit_diff": float(np.abs(got - ref).max()),
            "agreement": float((got[real].argmax(1) == ref[real].argmax(1)).mean()), "n": int(len(ref)),
            "n_agreement": int(len(refs[0]))}


def _torch_row_bytes(source: Path | None, model: torch.nn.Module) -> int:
    """The torch row's size: the weights file the model ships as (a run's ``last.safetensors`` also holds
    the optimizer's buffers, which no one ships), the file itself for foreign checkpoints, and the
    weights' bytes for a model passed in memory."""
    from robustedge.checkpoint import weights_file_bytes

    if source is None:
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        return weights_file_bytes(source)
    except RobustEdgeError:  # not a safetensors file: a foreign checkpoint, loaded weights-only
        return source.stat().st_size


def _file(tmp: Path, fmt: str) -> Path:
    return tmp / FORMATS[fmt].file


TRT_INT8_SOURCE = "trt-source.int8.onnx"  # a float student's QDQ file in TensorRT's scheme; deleted once built


def _convert(model, meta, formats: list[str], tmp: Path, opts: ExportOptions, x: torch.Tensor,
             progress) -> tuple[dict[str, str], dict]:
    """Write the model files; return ({format: why skipped}, the parity check of the first file).

    The first file is the float student's fp32 ONNX, or a QAT student's INT8 QDQ file with its learned
    scales; the ORT-format and TensorRT files derive from either the same way. What writes each file,
    from what, is its format's row (:mod:`robustedge.edge.formats`)."""
    if meta.extra.get("qat"):
        from robustedge import qat

        progress("QAT student: its INT8 function to QDQ ONNX with the learned scales (no calibration)")
        converted = qat.convert(model)
        first = builder(QAT_FIRST, qat=True)(converted, meta.spec.input_shape, _file(tmp, QAT_FIRST))
        # checked like any artifact (the table's agreement with the fake-quantised model, the gate), not by a
        # bound here: the file's int32 biases are a rounding PT2E cannot simulate (measured 99.5-100% top-1)
        parity = _parity(model, first, x.numpy(), opts.seed) | {"format": QAT_FIRST,
                                                                   "reference": "the fake-quantised torch model"}
        trt_sources = {f: _file(tmp, source_format(f, qat=True)) for f in formats if FORMATS[f].runtime == "tensorrt"}
        skipped = _executorch([f for f in formats if FORMATS[f].runtime == "executorch"], converted, meta, None, tmp,
                              progress)
    else:
        progress(f"exporting to ONNX opset {convert.OPSET}")
        first = builder(FLOAT_FIRST)(model, meta.spec.input_shape, _file(tmp, FLOAT_FIRST))
        parity = _parity(model, first, x.numpy(), opts.seed) | {"format": FLOAT_FIRST, "reference": "the torch model"}
        if parity["max_abs_logit_diff"] > opts.parity_tol:
            raise RobustEdgeError(f"fp32 ONNX logits differ from torch by {parity['max_abs_logit_diff']:.2e} "
                                  f"(> {opts.parity_tol:.0e})")
        trt_sources, skipped = _float_formats(model, meta, formats, tmp, opts, progress)
    _ort([f for f in formats if f in ORT_SOURCES], tmp, progress)
    skipped.update(_tensorrt([f for f in formats if FORMATS[f].runtime == "tensorrt"], trt_sources, meta, tmp,
                             progress))
    (tmp / TRT_INT8_SOURCE).unlink(missing_ok=True)
    return skipped, parity


def _float_formats(model, meta, formats: list[str], tmp: Path, opts: ExportOptions,
                   progress) -> tuple[dict[str, Path], dict[str, str]]:
    """The float student's fp16, INT8 and ExecuTorch files; returns (TensorRT sources, {format: why skipped})."""
    for fmt in [f for f in formats if FORMATS[f].builder == "convert:convert_fp16"]:
        builder(fmt)(_file(tmp, source_format(fmt)), _file(tmp, fmt))
    calibration = None
    if any(FORMATS[f].calibrated for f in formats):
        progress(f"INT8: {opts.calibration_method} calibration on {opts.calibration_n} training images"
                 + (" (half PGD-20 adversarial)" if opts.calibrate_adversarial else ""))
        calibration = _calibration(meta, opts, model)
    for fmt in [f for f in formats if FORMATS[f].builder == "convert:quantize_int8"]:
        if opts.int8_quantizer == "pt2e":
            _pt2e_ptq(model, meta, calibration, opts.int8_activations, _file(tmp, fmt), progress)
        else:
            builder(fmt)(_file(tmp, source_format(fmt)), _file(tmp, fmt), calibration, opts.calibration_method,
                         activations=opts.int8_activations, float_layers=opts.int8_float_layers)
    skipped = _executorch([f for f in formats if FORMATS[f].runtime == "executorch"], model, meta, calibration, tmp,
                          progress)
    sources = {}
    for fmt in [f for f in formats if FORMATS[f].runtime == "tensorrt"]:
        row = FORMATS[fmt]
        if not row.int8:
            sources[fmt] = _file(tmp, row.source)
        elif available(fmt)[0]:  # TensorRT INT8: a QDQ file of its own, in the scheme it takes (zero points of 0)
            sources[fmt] = convert.quantize_int8(_file(tmp, row.source), tmp / TRT_INT8_SOURCE, calibration,
                                                 opts.calibration_method, activations=row.activations,
                                                 float_layers=opts.int8_float_layers)
    return sources, skipped


def _pt2e_ptq(model, meta, calibration: np.ndarray, activations: str, path: Path, progress) -> Path:
    """The float student quantised by the quantizer QAT trains under (torchao PT2E), calibrated on the same
    images and written by the same converter as a QAT student's file: the QAT file of a run of zero epochs,
    so PTQ and QAT compare with the same tensors quantised (bench/qat_compare.py)."""
    from robustedge import qat
    from robustedge.edge.qat_onnx import to_qdq_onnx

    progress(f"INT8 by PT2E ({activations} activations): the QAT quantizer, calibrated, no training")
    student = qat.prepare_qat(model, meta.spec.input_shape, activations)
    qat.calibrate(student, torch.from_numpy(calibration))
    return to_qdq_onnx(qat.convert(student), meta.spec.input_shape, path)


def _ort(formats: list[str], tmp: Path, progress) -> None:
    """ORT-format files for ONNX Runtime Mobile, and the reduced-operator config of the bundle."""
    if formats:
        progress(f"converting to ORT format for ONNX Runtime Mobile: {', '.join(formats)}")
        builder(formats[0])({_file(tmp, ORT_SOURCES[f]): _file(tmp, f) for f in formats}, tmp / ORT_OPERATORS_FILE)


def _executorch(formats: list[str], model, meta, calibration, tmp: Path, progress) -> dict[str, str]:
    """ExecuTorch programs (XNNPACK) where the ``mobile`` extra is installed; {format: why} otherwise.
    ``model``: the float student, or a QAT student's converted INT8 graph."""
    if not formats:
        return {}
    ok, why = available(formats[0])
    if not ok:
        progress(f"skipping {', '.join(formats)}: {why}")
        return {f: why for f in formats}
    progress(f"lowering to ExecuTorch (XNNPACK): {', '.join(formats)}")
    qat = bool(meta.extra.get("qat"))
    for row in [r for r in FORMAT_TABLE if r.name in formats]:
        if row.calibrated and not qat:
            builder(row.name)(model, meta.spec.input_shape, calibration, _file(tmp, row.name))
        else:
            builder(row.name, qat)(model, meta.spec.input_shape, _file(tmp, row.name))
    return {}


def _tensorrt(formats: list[str], sources: dict[str, Path], meta, tmp: Path, progress) -> dict[str, str]:
    """TensorRT engines from their ONNX sources where TensorRT and a GPU exist; {format: why} otherwise."""
    skipped = {}
    for fmt in formats:
        ok, why = available(fmt)
        if not ok:
            skipped[fmt] = why
            progress(f"skipping {fmt}: {why}")
            continue
        builder(fmt)(sources[fmt], _file(tmp, fmt), FORMATS[fmt].precision, meta.spec.input_shape)
    return skipped


def export_bundle(checkpoint, out: str | Path, opts: ExportOptions, progress=print,
                  precomputed_adv: dict[str, torch.Tensor] | None = None, force: bool = False,
                  facts=None, device: torch.device | str = "auto") -> tuple[dict, list[str]]:
    """Build the bundle at ``out``; returns (manifest, gate failures).

    ``checkpoint``: any source :func:`robustedge.loading.load` takes (a RobustEdge checkpoint, a state
    dict with ``facts.arch``, ``robustbench:<name>``, an ``nn.Module``, which is copied, never moved or
    switched to eval mode). ``force`` replaces an existing bundle at ``out`` (never anything else, and
    never a folder that holds the source file). ``device`` runs the torch side (the transfer attacks, the
    twins' white-box attacks, the gradient checks; ``auto``: CUDA when present); the files are built from
    a CPU copy, and the runtimes run where they run.
    """
    from robustedge.data import split_for_model
    from robustedge.loading import load
    from robustedge.runtime import resolve_device

    out = Path(out)
    opts.validate()
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    source = Path(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) and Path(checkpoint).is_file() else None
    check_output_folder(out, BUNDLE, replace=force, protect=[source] if source else [])
    model, meta = load(checkpoint, facts=facts, device=device)
    name = source.name if source else meta.spec.arch
    formats, skipped = plan_formats(opts.formats, meta.extra.get("qat"))
    _check_float_layers(opts, formats, bool(meta.extra.get("qat")))
    if meta.eps is None:
        raise RobustEdgeError(f"{name} records no eps; it is needed for the robustness checks (pass --eps)")
    if opts.emulate:  # a processor that cannot be emulated here is refused before minutes of export
        from robustedge.edge.emulated_env import prepare
        from robustedge.edge.emulation import runnable

        if runnable(formats)[0]:
            for isa in opts.emulate:
                prepare(isa, progress=progress)
    split = split_for_model(meta, None, opts.data_root, "test", opts.n)
    x, y = split.float_images(device), split.labels.to(device)
    with torch.no_grad():
        check_finite(model(x[:256]).cpu().numpy(), name)
    host_model = model if device.type == "cpu" else copy.deepcopy(model).cpu()  # what the converters read
    tmp = make_temp_dir(out)
    timings, t0 = {}, time.perf_counter()
    try:
        progress(f"exporting {name} ({meta.spec.arch})")
        built_skipped, parity = _convert(host_model, meta, formats, tmp, opts, x.cpu(), progress)
        skipped.update(built_skipped)

        timings["convert"] = time.perf_counter() - t0
        progress(f"crafting {', '.join(opts.transfer_attacks)} examples on the torch model ({len(y)} test images"
                 f"{split.shortfall(opts.n)})")
        t0 = time.perf_counter()
        samples = craft_samples(model, x, y, meta.eps, opts.transfer_attacks, opts.seed, precomputed_adv)
        timings["transfer_examples"] = time.perf_counter() - t0
        common = dict(square_n=min(opts.square_n, len(y)), square_queries=opts.square_queries, seed=opts.seed,
                      flag_settings=opts.flags, gate=opts.gate)
        table, flags, checks = {}, {}, {}
        size = _torch_row_bytes(source, model)
        table["torch"], flags["torch"], checks["torch"] = torch_row(model, samples, size, meta.eps, **common)
        built = [f for f in FORMATS if f in formats and _file(tmp, f).exists()]  # sources first
        for fmt in built:
            progress(f"verifying {fmt} through its runtime")
            table[fmt], flags[fmt], checks[fmt] = verify_artifact(
                _file(tmp, fmt), fmt, samples, meta.eps, float_model=model, whitebox=opts.whitebox_attacks,
                qat=bool(meta.extra.get("qat")), progress=progress, **common)
        table[parity["format"]]["max_abs_logit_diff"] = parity["max_abs_logit_diff"]
        failures = opts.gate.check(table, flags)
        np.savez_compressed(tmp / SAMPLES_FILE, **samples)
        atomic_write_bytes(tmp / VERIFIER_FILE, assemble().encode("utf-8"))  # the verifier package as one file
        manifest = _manifest(source, out, meta, opts, tmp, built, samples, skipped, table, failures)
        manifest |= {"flags": flags, "checks": checks, "seconds": timings, "parity": parity,
                     "platform": platform_facts()}
        atomic_write_json(tmp / MANIFEST_FILE, manifest)
        if opts.emulate:  # the finished bundle (its verify.py reads the manifest) replayed on each emulated ISA
            from robustedge.edge.emulation import add_emulated_rows, emulated_rows

            add_emulated_rows(manifest, emulated_rows(tmp, opts.emulate, progress=progress), opts.gate)
            atomic_write_json(tmp / MANIFEST_FILE, manifest)
            table, flags, failures = manifest["table"], manifest["flags"], manifest["gate_failures"]
        atomic_write_text(tmp / "verify.md", format_table(table) + "\n" + format_flags(flags))
        replace_folder(tmp, out, BUNDLE, replace=force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest, failures


def _manifest(checkpoint: Path | None, out: Path, meta, opts: ExportOptions, tmp: Path, built: list[str],
              samples: dict, skipped: dict, table: dict, failures: list[str]) -> dict:
    return {
        "format": BUNDLE_FORMAT, "robustedge_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "source": {"checkpoint": checkpoint.name if checkpoint else None,
                   "sha256": sha256(checkpoint) if checkpoint else None, "arch": meta.spec.arch,
                   "relative_path": os.path.relpath(checkpoint.resolve(), out.resolve()) if checkpoint else None,
                   "method": meta.method, "dataset": meta.dataset, "qat": meta.extra.get("qat"),
                   "origin": meta.extra.get("source")},
        "input": {"name": convert.INPUT_NAME, "shape": list(meta.spec.input_shape), "dtype": "float32",
                  "range": [0.0, 1.0], "layout": "NCHW", "dynamic_batch": True},
        "output": {"name": convert.OUTPUT_NAME, "classes": meta.classes},
        "eps": meta.eps, "opset": convert.OPSET,
        "files": {f: {"file": FORMATS[f].file, "sha256": sha256(_file(tmp, f)),
                      "bytes": _file(tmp, f).stat().st_size} for f in built},
        "samples": {"file": SAMPLES_FILE, "sha256": sha256(tmp / SAMPLES_FILE), "n": int(len(samples["y"])),
                    "attacks": list(opts.transfer_attacks),
                    "whitebox": {f: [a for a in opts.whitebox_attacks if whitebox_key(f, a) in samples] for f in built
                                 if any(whitebox_key(f, a) in samples for a in opts.whitebox_attacks)},
                    "square": {r: int(len(samples[square_key(r)])) for r in ["torch"] + built
                               if square_key(r) in samples}},
        "verifier": {"file": VERIFIER_FILE, "sha256": sha256(tmp / VERIFIER_FILE)},
        **({"ort_operators": {"file": ORT_OPERATORS_FILE, "sha256": sha256(tmp / ORT_OPERATORS_FILE)}}
           if (tmp / ORT_OPERATORS_FILE).exists() else {}),
        "skipped": skipped, "table": table, "gate": opts.gate.to_dict(), "gate_failures": failures,
        "options": {k: v for k, v in asdict(opts).items() if k not in ("gate", "flags")} | {"flags": opts.flags.to_dict()},
    }
