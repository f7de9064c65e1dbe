"""The export formats on the export side: the rows of :mod:`robustedge.verifier.formats` in a registry,
and everything the export derives from them.

The rows live in the torch-free verifier (every bundle's ``verify.py`` reads file names and runtimes
from them); here they are the ``export format`` :class:`~robustedge.registry.Registry` (listing, the
unknown-name error), and the export's questions are answered from them: which formats a QAT student
exports and under which activation scheme (:data:`QAT_FORMATS`, :data:`QAT_SCHEME`), what an ORT file
is converted from (:data:`ORT_SOURCES`), which ONNX graph a twin reads (:func:`twin_source`), which
function builds a file (:func:`builder`), whether this machine can build and run it (:func:`available`)
and the ``--formats`` help (:func:`formats_help`).
"""

from __future__ import annotations

import importlib
from typing import Callable

from robustedge.registry import Registry
from robustedge.verifier.formats import FORMAT_TABLE, FORMATS, ExportFormat

EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format", FORMATS)

FLOAT_FIRST = "onnx"  # a float student's first file: the source of its other files
QAT_FIRST = "onnx-int8"  # a QAT student's first file, with its learned scales: the source of its other files

# a QAT student's own INT8 function, written as: the ONNX graph's family first (one QDQ graph), then ExecuTorch's
QAT_FORMATS = tuple(f.name for f in sorted((f for f in FORMAT_TABLE if f.qat_builder),
                                            key=lambda f: f.runtime == "executorch"))
# QAT formats whose runtime needs one activation scheme: (--qat-activations, why)
QAT_SCHEME = {f.name: (f.activations, f.activations_why) for f in FORMAT_TABLE if f.qat_builder and f.activations}
# ORT-format file -> the ONNX file it is converted from
ORT_SOURCES = {f.name: f.source for f in FORMAT_TABLE if f.builder == "convert:convert_to_ort"}
# what a row's ``needs`` asks of this machine -> the function that says whether it is there, and if not, why
AVAILABILITY = {"gpu": "convert:tensorrt_available", "mobile": "executorch:available"}


def _resolve(name: str) -> Callable:
    """``"module:function"`` inside :mod:`robustedge.edge`, imported now (torch-heavy modules load only when used)."""
    module, function = name.split(":")
    return getattr(importlib.import_module(f"robustedge.edge.{module}"), function)


def builder(fmt: str, qat: bool = False) -> Callable:
    """The function that writes ``fmt``'s file for a float student, or for a QAT student (``qat``)."""
    row = EXPORT_FORMATS.get(fmt)
    name = row.qat_builder if qat else row.builder
    if name is None:
        raise ValueError(f"a QAT student is not exported to {fmt}")
    return _resolve(name)


def source_format(fmt: str, qat: bool = False) -> str | None:
    """The format ``fmt``'s file is converted from (None: the model itself)."""
    row = EXPORT_FORMATS.get(fmt)
    return row.qat_source if qat else row.source


def available(fmt: str) -> tuple[bool, str]:
    """Whether ``fmt`` can be built and run here, and if not, why (said to the user)."""
    needs = EXPORT_FORMATS.get(fmt).needs
    return _resolve(AVAILABILITY[needs])() if needs else (True, "")


def twin_source(fmt: str, qat: bool = False) -> str:
    """The format whose ONNX graph is ``fmt``'s function: itself, the file an ORT-format one came from,
    or, for a QAT student's ExecuTorch program, its QDQ ONNX file (both are ``convert_pt2e`` of the same
    fake-quantised graph; the twin must still agree with the ``.pte`` runtime to be used)."""
    return FORMATS[fmt].twin_source(qat) if fmt in FORMATS else fmt


def formats_help() -> str:
    """The ``--formats`` help: every format, in the table's order, and the notes rows carry."""
    notes: dict[str, list[str]] = {}
    for row in FORMAT_TABLE:
        if row.note:
            notes.setdefault(row.note, []).append(row.name)
    return f"comma-separated: {', '.join(FORMATS)}" + "".join(f" ({'/'.join(names)}: {note})"
                                                              for note, names in notes.items())
