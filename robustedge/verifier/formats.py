"""The export formats: one row per format, the one table both the export and the verifier read.

The on-device verifier needs a row's file name and runtime (which runner opens it); the export side
(:mod:`robustedge.edge.formats`) derives the rest from the same rows: what a format is converted from
and by which function, what it needs beyond the base install, which formats a QAT student exports and
under which activation scheme, and which ONNX graph its differentiable twin reads. A new format is one
row here plus its builder. Builders are named, not imported (``"module:function"`` inside
:mod:`robustedge.edge`), so this table stays torch-free and ships in every bundle's ``verify.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportFormat:
    """One export format (a row of :data:`FORMAT_TABLE`)."""

    name: str
    file: str  # the file's name inside the bundle
    runtime: str  # the runtime that executes it: the verifier's runner (RUNNERS)
    source: str | None  # the format a float student's file is converted from; None: the torch model itself
    builder: str  # the function writing a float student's file: "module:function" inside robustedge.edge
    needs: str | None = None  # beyond the base install: "mobile" (the extra: ExecuTorch), "gpu" (TensorRT, a GPU)
    int8: bool = False
    calibrated: bool = False  # a float student's file needs INT8 calibration images
    precision: str | None = None  # a TensorRT engine's precision
    activations: str | None = None  # the INT8 activation scheme its runtime needs (None: any)
    activations_why: str = ""  # why, as said to the user
    qat_builder: str | None = None  # the function writing a QAT student's own INT8 function; None: no QAT file
    qat_source: str | None = None  # the format a QAT student's file is converted from; None: the QAT model
    twin: str | None = None  # the ONNX format whose graph is this one's function (its twin's source); None: none
    qat_twin: str | None = None  # the same for a QAT student's file, where it differs
    note: str = ""  # said in the --formats help, once for the rows that share it

    def twin_source(self, qat: bool = False) -> str:
        """The format whose ONNX graph is this one's function (this format itself when none is named)."""
        return (self.qat_twin if qat and self.qat_twin else self.twin) or self.name


_ORT_NOTE = ("ORT format for ONNX Runtime Mobile, with the reduced-operator config of a minimal build; ort-int8 "
             "also builds onnx-int8, its source and its twin's graph")
_XNNPACK = ("the XNNPACK delegate runs its own int8 scheme end to end (an x86-scheme student leaves convolutions "
            "outside it)")

FORMAT_TABLE = (
    ExportFormat("onnx", "model.onnx", "onnxruntime", None, "convert:export_onnx", twin="onnx"),
    ExportFormat("onnx-fp16", "model.fp16.onnx", "onnxruntime", "onnx", "convert:convert_fp16", twin="onnx-fp16"),
    ExportFormat("onnx-int8", "model.int8.onnx", "onnxruntime", "onnx", "convert:quantize_int8", int8=True,
                 calibrated=True, qat_builder="qat_onnx:to_qdq_onnx", twin="onnx-int8"),
    # ORT format, as ONNX Runtime Mobile loads it
    ExportFormat("ort", "model.ort", "onnxruntime", "onnx", "convert:convert_to_ort", twin="onnx", note=_ORT_NOTE),
    ExportFormat("ort-int8", "model.int8.ort", "onnxruntime", "onnx-int8", "convert:convert_to_ort", int8=True,
                 qat_builder="convert:convert_to_ort", qat_source="onnx-int8", twin="onnx-int8", note=_ORT_NOTE),
    # ExecuTorch program, XNNPACK delegate, batch 1
    ExportFormat("executorch", "model.pte", "executorch", None, "executorch:export_program", needs="mobile"),
    ExportFormat("executorch-int8", "model.int8.pte", "executorch", None, "executorch:quantize_program",
                 needs="mobile", int8=True, calibrated=True, activations="int8", activations_why=_XNNPACK,
                 qat_builder="executorch:qat_program", qat_twin="onnx-int8"),
    ExportFormat("trt-fp16", "model.fp16.engine", "tensorrt", "onnx", "convert:build_tensorrt", needs="gpu",
                 precision="fp16"),
    ExportFormat("trt-int8", "model.int8.engine", "tensorrt", "onnx", "convert:build_tensorrt", needs="gpu",
                 int8=True, calibrated=True, precision="int8", activations="int8-symmetric",
                 activations_why="TensorRT takes zero points of 0 only", qat_builder="convert:build_tensorrt",
                 qat_source="onnx-int8"),
)

FORMATS = {row.name: row for row in FORMAT_TABLE}  # format -> its row, in the table's order
