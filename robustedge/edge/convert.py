"""torch -> ONNX (fp32), ONNX fp16, ONNX INT8 (static QDQ), ORT format for ONNX Runtime Mobile and TensorRT engines.

Opset 18: the lowest the dynamo-based ``torch.onnx.export`` emits, supported by ONNX Runtime
(including Mobile builds) and TensorRT 10. The exported graph is the conv+BN-folded model (the same
function to ~1e-6) so every runtime sees the same simple graph; the exporter's optimiser then
folds constants and removes dead nodes, which is the simplification that is always safe.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from robustedge.errors import RobustEdgeError

OPSET = 18
INPUT_NAME, OUTPUT_NAME = "input", "logits"
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
logger = logging.getLogger("robustedge.edge")


def onnx_proto(model: torch.nn.Module, input_shape: tuple[int, int, int], what: str = "this model"):
    """``model`` through the dynamo exporter with a dynamic batch axis, as an in-memory ModelProto.

    The exporter's per-node stack traces and names are dropped: they made up a third or more of small
    files and say nothing a runtime uses (the logits are unchanged)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.random.fork_rng(devices=[]):  # the example must not move the caller's RNG
        example = torch.rand(2, *input_shape)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), dynamo=True, opset_version=OPSET, optimize=True,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={"x": {0: batch}}, verbose=False)
    except Exception as exc:  # the exporter raises many types; name the op it could not handle
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RobustEdgeError(f"cannot export {what} to ONNX: {first[:300]}") from None
    proto = program.model_proto
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return proto


def save_checked(proto, path: Path) -> Path:
    """Write an ONNX model and check the file with ``onnx.checker`` (full check, shapes included)."""
    import onnx

    onnx.save(proto, str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    """The conv+BN-folded model as fp32 ONNX with a dynamic batch axis, checked."""
    from robustedge.models import fold_if_possible

    return save_checked(onnx_proto(fold_if_possible(model), input_shape), path)


def convert_fp16(src: Path, dst: Path) -> Path:
    """Weights and activations in fp16; the graph's input and output stay fp32 for the caller."""
    import onnx
    from onnxconverter_common import float16

    with warnings.catch_warnings():  # it warns once per tiny weight it rounds to fp16's smallest value
        warnings.simplefilter("ignore")
        model = float16.convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return dst


class _Batches:
    """onnxruntime's CalibrationDataReader over an in-memory (N, C, H, W) float32 array."""

    def __init__(self, images: np.ndarray, batch_size: int = 64) -> None:
        self._batches = [{INPUT_NAME: images[i:i + batch_size]} for i in range(0, len(images), batch_size)]
        self._iter: Iterator[dict] = iter(self._batches)

    def get_next(self) -> dict | None:
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = iter(self._batches)


INT8_ACTIVATIONS = ("uint8", "int8", "int8-symmetric")
# layers a post-training INT8 file keeps in float: the first convolution sees the raw image (quantising its
# input costs the most relative precision there) and the last layer gives the logits the attacks read
FLOAT_LAYERS = ("none", "first", "last", "first-last")
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, method: str = "minmax",
                  per_channel: bool = True, activations: str = "uint8", float_layers: str = "none") -> Path:
    """Static INT8 quantisation in QDQ format: symmetric int8 weights per output channel, and
    activations as

    - ``uint8`` (asymmetric, U8S8): the pairing ONNX Runtime's x86 integer kernels are built around
      (unsigned activations x signed weights). The default. On this machine's AVX512-VNNI CPU,
      S8S8 runs at the same speed (MobileNetV2 batch 1: 0.64 vs 0.65 ms; bench/RESULTS.md).
    - ``int8`` (asymmetric, S8S8);
    - ``int8-symmetric``: zero points 0, which TensorRT's explicit quantisation requires.

    ``quant_pre_process`` runs first (shape inference + ORT's graph optimisations) as onnxruntime
    recommends. ``calibration`` is float32 in [0, 1], drawn from training data. ``float_layers``: the first
    and/or last weighted layer (convolution or matrix product, in graph order) left in float through
    onnxruntime's ``nodes_to_exclude``, mixed precision every ONNX Runtime build runs.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    if method not in CALIBRATION_METHODS:
        raise RobustEdgeError(f"unknown calibration method '{method}'; valid: {', '.join(CALIBRATION_METHODS)}")
    if activations not in INT8_ACTIVATIONS:
        raise RobustEdgeError(f"INT8 activations must be one of {', '.join(INT8_ACTIVATIONS)}, got '{activations}'")
    if float_layers not in FLOAT_LAYERS:
        raise RobustEdgeError(f"unknown INT8 float layers '{float_layers}'; valid: {', '.join(FLOAT_LAYERS)}")
    if calibration is None or len(calibration) == 0:
        raise RobustEdgeError("INT8 quantisation needs calibration images (none were given)")
    prepared = dst.with_name(dst.stem + ".pre.onnx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                     "percentile": CalibrationMethod.Percentile}[method]
            quantize_static(str(prepared), str(dst), _Batches(calibration.astype(np.float32)),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                            weight_type=QuantType.QInt8, calibrate_method=calib,
                            extra_options={"ActivationSymmetric": activations == "int8-symmetric",
                                           "WeightSymmetric": True},
                            nodes_to_exclude=_float_nodes(prepared, float_layers, src.name))
    finally:
        prepared.unlink(missing_ok=True)
    return dst


def _float_nodes(model_path: Path, float_layers: str, source_name: str) -> list[str]:
    """The names of the nodes ``float_layers`` keeps in float: the first and/or last layer with a constant
    weight (a convolution or a matrix product, in graph order), and the bias ``Add`` that follows a
    ``MatMul``, so that its output, the logits, is float too. Nodes without a name get one, written back,
    since onnxruntime's quantizer excludes nodes by name."""
    if float_layers == "none":
        return []
    import onnx

    model = onnx.load(str(model_path))
    constants = {t.name for t in model.graph.initializer}
    weighted = [node for node in model.graph.node
                if node.op_type in _WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in constants]
    if not weighted:
        raise RobustEdgeError(f"{source_name} has no convolution or matrix product with a constant weight to keep "
                              f"in float")
    chosen = {"first": weighted[:1], "last": weighted[-1:], "first-last": [weighted[0], weighted[-1]]}[float_layers]
    for node in list(chosen):
        if node.op_type == "MatMul":
            readers = [n for n in model.graph.node if node.output[0] in n.input]
            if len(readers) == 1 and readers[0].op_type == "Add" and any(i in constants for i in readers[0].input):
                chosen.append(readers[0])
    if any(not node.name for node in chosen):
        taken = {node.name for node in model.graph.node}
        for index, node in enumerate(model.graph.node):
            if not node.name:
                node.name = f"_robustedge_float_{index}"
                while node.name in taken:
                    node.name += "_"
                taken.add(node.name)
        onnx.save(model, str(model_path))
    return list(dict.fromkeys(node.name for node in chosen))


def convert_to_ort(sources: dict[Path, Path], config: Path) -> Path:
    """ONNX files to ORT format (``{onnx: .ort}``) with onnxruntime's own converter, as for a phone.

    The converter's fixed optimisation style at level ``all`` for an ARM target (no x86-only NCHWc
    layout; int8 QDQ fusions allowed), the mode ONNX Runtime Mobile documents for a minimal build; the
    same file runs on this machine's onnxruntime, so what is verified is what ships. ``config`` gets
    the reduced-operator configuration of every converted file together: the input of ONNX Runtime's
    ``build.py --minimal_build --include_ops_by_config`` for an app holding only these models.
    """
    import onnxruntime.tools.ort_format_model.utils  # noqa: F401  (sets its logger to DEBUG when imported)

    converted: list[Path] = []
    quiet = logging.getLogger("ort_format_model.utils")  # the converter logs each step at INFO
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        _convert_each(sources, config, converted)
    finally:
        quiet.setLevel(level)
    # the header names the files it was made from: the bundle's names, not this machine's temporary paths
    lines = [f"# - {Path(line[4:]).name}" if line.startswith("# - ") else line
             for line in config.read_text().splitlines()]
    config.write_text("\n".join(lines) + "\n")
    return config


def _convert_each(sources: dict[Path, Path], config: Path, converted: list[Path]) -> None:
    import shutil
    import tempfile

    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    with tempfile.TemporaryDirectory(dir=config.parent, prefix=".ort-") as work:
        for index, (src, dst) in enumerate(sources.items()):
            folder = Path(work) / str(index)
            folder.mkdir()
            shutil.copyfile(src, folder / "model.onnx")
            try:
                with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    convert_onnx_models_to_ort(folder / "model.onnx", output_dir=folder / "out",
                                               optimization_styles=[OptimizationStyle.Fixed], target_platform="arm")
            except Exception as exc:  # onnxruntime raises its own types
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise RobustEdgeError(f"cannot convert {src.name} to ORT format: {first[:200]}") from None
            shutil.move(str(folder / "out" / "model.ort"), dst)
            converted.append(dst)
        with contextlib.redirect_stdout(io.StringIO()):
            create_config_from_models(converted, config, False)


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT engines can be built here, and if not, why (said to the user)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, ("the 'tensorrt' package is not installed (pip install 'robustedge[trt]' on a machine with an "
                       "NVIDIA GPU, or build on the target: see export/README.md)")
    if not torch.cuda.is_available():
        return False, "no CUDA GPU here; TensorRT engines must be built on the GPU that runs them (export/README.md)"
    return True, ""


def build_tensorrt(onnx_path: Path, dst: Path, precision: str, input_shape: tuple[int, int, int],
                   max_batch: int = 256) -> Path:
    """Build a serialized engine (fp16, or int8 from the QDQ model's own scales) for this GPU.

    INT8 needs a QDQ model with symmetric int8 activations (``quantize_int8(...,
    activations='int8-symmetric')``): TensorRT accepts zero points of 0 only.
    """
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RobustEdgeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # scales come from the QDQ nodes (explicit quantisation)
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *input_shape), (64, *input_shape), (max_batch, *input_shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RobustEdgeError(f"TensorRT failed to build the {precision} engine from {onnx_path.name}")
    dst.write_bytes(bytes(engine))
    return dst
