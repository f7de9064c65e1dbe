"""The bundle verifier: every check a bundle gets, torch-free (numpy + the artifact's runtime).

One job per module, lowest first: :mod:`~robustedge.verifier.formats` (the export-format table),
:mod:`~robustedge.verifier.base` (the exception type, hashing, number checks),
:mod:`~robustedge.verifier.flags` (attack-failure flags from replays), :mod:`~robustedge.verifier.gate`,
:mod:`~robustedge.verifier.schema` (the manifest, file names, hashes, samples),
:mod:`~robustedge.verifier.runners` (the runtimes), :mod:`~robustedge.verifier.replays`,
:mod:`~robustedge.verifier.tables` and :mod:`~robustedge.verifier.cli` (``python verify.py``).

``robustedge verify`` imports these modules; every bundle carries them as one file, ``verify.py``,
which :func:`robustedge.verifier.assemble.assemble` writes from them (each module's code verbatim, in
this order), so the library and the device run the same code. The package imports nothing else of
RobustEdge, and the modules import each other with absolute ``from robustedge.verifier.<module> import``
lines only (the lines the assembly drops).
"""

from robustedge.verifier.base import (RobustEdgeError, exception_line, first_line, is_fraction, is_number, sha256,
                                      write_atomically)
from robustedge.verifier.cli import main
from robustedge.verifier.flags import (FLAG_CHECKS, ITERATIVE_ATTACKS, bundle_flags, comparison_flags, describe_flag,
                                       iterative_columns, make_flag, reported_worst)
from robustedge.verifier.formats import FORMAT_TABLE, FORMATS, ExportFormat
from robustedge.verifier.gate import Gate, distinct_percents
from robustedge.verifier.replays import accuracy_row, artifact_row, replay, worst_case
from robustedge.verifier.runners import (RUNNERS, DeviceBuffers, ExecuTorchRunner, OrtRunner, TrtRunner, check_finite,
                                         check_input_shape, median_latency_ms, open_runner, platform_facts, predict)
from robustedge.verifier.schema import (BUNDLE_FORMAT, MANIFEST_FILE, ORT_OPERATORS_FILE, SAMPLES_FILE, VERIFIER_FILE,
                                        bundle_path, check_hashes, check_manifest, load_manifest, load_samples,
                                        plain_name, read_bundle, sample_keys, square_key, whitebox_key)
from robustedge.verifier.tables import PERCENT_COLUMNS, UNIT_COLUMNS, format_flags, format_table

__all__ = [
    "BUNDLE_FORMAT", "DeviceBuffers", "ExecuTorchRunner", "ExportFormat", "FLAG_CHECKS", "FORMATS", "FORMAT_TABLE",
    "Gate", "ITERATIVE_ATTACKS", "MANIFEST_FILE", "ORT_OPERATORS_FILE", "OrtRunner", "PERCENT_COLUMNS", "RUNNERS",
    "RobustEdgeError", "SAMPLES_FILE", "TrtRunner", "UNIT_COLUMNS", "VERIFIER_FILE", "accuracy_row", "artifact_row",
    "exception_line", "first_line",
    "bundle_flags", "bundle_path", "check_finite", "check_hashes", "check_input_shape", "check_manifest",
    "comparison_flags", "describe_flag", "distinct_percents", "format_flags", "format_table", "is_fraction",
    "is_number", "iterative_columns", "load_manifest", "load_samples", "main", "make_flag", "median_latency_ms",
    "open_runner", "plain_name", "platform_facts", "predict", "read_bundle", "replay", "reported_worst", "sample_keys", "sha256",
    "square_key", "whitebox_key", "worst_case", "write_atomically",
]
