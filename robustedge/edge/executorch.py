"""ExecuTorch programs (``.pte``) for phones: ``torch.export``, then lowering to the XNNPACK backend.

``executorch``: the float student (XNNPACK folds conv+BN). ``executorch-int8``: the PT2E flow with
ExecuTorch's ``XNNPACKQuantizer`` (per-channel symmetric int8 weights, int8 activations, what the
XNNPACK delegate runs), calibrated on the same training images as ``onnx-int8``. Programs are exported
for batch 1, the phone's case (a bounded dynamic batch made the runtime refuse batches above the
example's size in executorch 1.5.1).

ExecuTorch is the optional ``mobile`` extra (``pip install "robustedge[mobile]"``); without it these
formats are skipped with that instruction. A QAT student trained with ``--qat-activations int8``
(XNNPACK's own scheme) is lowered from its learned scales (:func:`qat_program`). The x86 schemes are
not: XNNPACK's compiler refuses uint8 convolutions with per-channel weights, and the x86 quantizer
leaves each convolution before a residual add without an output quantiser, so those run outside the
delegate in float, which the portable runtime cannot (measured with executorch 1.5.1; docs/design/export.md,
section 5).
"""

from __future__ import annotations

import copy
import io
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch

from robustedge.errors import RobustEdgeError

INSTALL = 'ExecuTorch is not installed: pip install "robustedge[mobile]" (the executorch package)'


def available() -> tuple[bool, str]:
    try:
        import executorch  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except ImportError:
        return False, INSTALL
    return True, ""


def _lower(model: torch.nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = torch.rand(1, *input_shape)
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (example,))
            buffer = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    except Exception as exc:  # torch.export and the lowering raise many types
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RobustEdgeError(f"cannot lower this model to ExecuTorch (XNNPACK): {first[:300]}") from None
    path.write_bytes(buffer)  # inside the bundle's temporary folder, renamed into place as a whole
    return path


def export_program(model: torch.nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    """The float student as an ExecuTorch program delegated to XNNPACK, which folds batch norm itself.
    (Our folded copy is a graph module whose tensors the emitter stores in the deprecated constant
    buffer, which executorch 1.5.1's runtime refuses to load.)"""
    return _lower(copy.deepcopy(model).eval(), input_shape, path)


def quantize_program(model: torch.nn.Module, input_shape: tuple[int, int, int], calibration: np.ndarray,
                     path: Path) -> Path:
    """Static INT8 through PT2E with the XNNPACK quantizer, calibrated on ``calibration`` ([0, 1] float32)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration is None or len(calibration) == 0:
        raise RobustEdgeError("INT8 quantisation needs calibration images (none were given)")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    batch = torch.export.Dim("batch", min=1, max=4096)  # calibrate in batches; lowered for batch 1 below
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        graph = torch.export.export(copy.deepcopy(model).eval(), (torch.rand(2, *input_shape),),
                                    dynamic_shapes={"x": {0: batch}}).module()
        prepared = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for batch in torch.from_numpy(calibration).split(64):
                prepared(batch)
        converted = convert_pt2e(prepared)
    return _lower(converted, input_shape, path)


def qat_program(converted: torch.nn.Module, input_shape: tuple[int, int, int], path: Path) -> Path:
    """A QAT student's INT8 function (:func:`robustedge.qat.convert`: its learned scales, no calibration)
    lowered to XNNPACK: the same function as its ONNX INT8 file, on the phone runtime. Only a student
    trained under XNNPACK's own scheme lowers completely; export's plan refuses the others before this."""
    return _lower(converted, input_shape, path)
