#!/usr/bin/env python3
"""Verify a RobustEdge export bundle on this device: numpy + the artifact's runtime, nothing else.

    python verify.py [BUNDLE] [--formats onnx,onnx-int8] [--max-drop 0.05] [--min-agreement 0.95]

This file is the single source of every bundle check. RobustEdge imports it as
``robustedge.verify_core`` and copies it, byte for byte, into every bundle as ``verify.py``, so a
phone-class CPU or a Jetson (numpy + onnxruntime for ``.onnx``/``.ort``, + tensorrt for engines,
+ executorch for ``.pte``) runs exactly the checks and messages of ``robustedge verify``. It needs
neither RobustEdge nor torch (ExecuTorch's Python runtime imports torch itself, and only a ``.pte``
loads it).

It refuses (exit 2, one line) a manifest that does not follow the bundle schema, a file entry that
is not a plain name inside the bundle, an unknown format or gate key, a file whose sha256 differs
from the manifest, and a ``verify.npz`` with missing, extra, mistyped or misshapen arrays. It then
replays the clean and adversarial samples through each model on this device, prints clean
accuracy, top-1 agreement with the torch model and transfer robust accuracy next to the numbers
measured at export time, and applies the bundle's gate (exit 1 when it fails). Non-finite logits are
an error, never a result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

BUNDLE_FORMAT = "robustedge-bundle/1"
MANIFEST_FILE = "manifest.json"
SAMPLES_FILE = "verify.npz"
VERIFIER_FILE = "verify.py"
ORT_OPERATORS_FILE = "ort.required_operators.config"  # ops a minimal ONNX Runtime Mobile build must hold

# format -> (file name inside the bundle, runtime that executes it): a new format is one row
FORMATS = {
    "onnx": ("model.onnx", "onnxruntime"),
    "onnx-fp16": ("model.fp16.onnx", "onnxruntime"),
    "onnx-int8": ("model.int8.onnx", "onnxruntime"),
    "ort": ("model.ort", "onnxruntime"),  # ORT format, as ONNX Runtime Mobile loads it
    "ort-int8": ("model.int8.ort", "onnxruntime"),
    "executorch": ("model.pte", "executorch"),  # ExecuTorch program, XNNPACK delegate, batch 1
    "executorch-int8": ("model.int8.pte", "executorch"),
    "trt-fp16": ("model.fp16.engine", "tensorrt"),
    "trt-int8": ("model.int8.engine", "tensorrt"),
}


class RobustEdgeError(Exception):
    """Something the user can fix (a file, a flag, a bundle); the message is one complete line.

    RobustEdge's one user-facing exception type lives here, in the torch-free core, so that the
    library and the on-device verifier raise (and the CLI reports) the very same errors.
    """


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------
# The manifest schema
# --------------------------------------------------------------------------------------------

def _fail(where: str, what: str, value: object) -> RobustEdgeError:
    shown = repr(value)
    return RobustEdgeError(f"manifest.json: '{where}' must be {what}, got {shown[:60]}")


def _get(obj: dict, key: str, where: str, check, what: str, required: bool = True):
    if key not in obj:
        if required:
            raise RobustEdgeError(f"manifest.json: missing required key '{where}{key}'")
        return None
    value = obj[key]
    if not check(value):
        raise _fail(where + key, what, value)
    return value


def _mapping(v: object) -> bool:
    return isinstance(v, dict)


def _string(v: object) -> bool:
    return isinstance(v, str)


def _count(v: object, minimum: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _fraction(v: object) -> bool:
    return is_number(v) and 0.0 <= v <= 1.0


def plain_name(name: object, where: str) -> str:
    """A file name with no folder part: entries must live directly inside the bundle."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name:
        raise RobustEdgeError(f"manifest.json: '{where}' must be a plain file name inside the bundle, got {name!r}")
    return name


def check_manifest(manifest: object) -> dict:
    """Raise RobustEdgeError unless ``manifest`` follows the bundle schema; return it."""
    if not isinstance(manifest, dict):
        raise RobustEdgeError("manifest.json: must be a JSON object")
    if manifest.get("format") != BUNDLE_FORMAT:
        raise RobustEdgeError(f"manifest.json: not a RobustEdge bundle manifest (format must be '{BUNDLE_FORMAT}')")
    inp = _get(manifest, "input", "", _mapping, "an object")
    _get(inp, "shape", "input.", lambda v: isinstance(v, list) and len(v) == 3 and all(_count(d, 1) for d in v),
         "a list of 3 positive integers (C, H, W)")
    _get(inp, "name", "input.", _string, "a string")
    out = _get(manifest, "output", "", _mapping, "an object")
    _get(out, "classes", "output.", lambda v: v is None or (isinstance(v, list) and len(v) >= 2
                                                           and all(isinstance(c, str) for c in v)),
         "null or a list of at least 2 class names", required=False)
    _get(manifest, "eps", "", _fraction, "a number in [0, 1]")
    files = _get(manifest, "files", "", lambda v: isinstance(v, dict) and len(v) > 0, "a non-empty object")
    for fmt, entry in files.items():
        if fmt not in FORMATS:
            raise RobustEdgeError(f"manifest.json: unknown format '{fmt}' in 'files'; known formats: "
                                    f"{', '.join(FORMATS)}")
        if not isinstance(entry, dict):
            raise _fail(f"files.{fmt}", "an object", entry)
        name = plain_name(entry.get("file"), f"files.{fmt}.file")
        if name != FORMATS[fmt][0]:
            raise RobustEdgeError(f"manifest.json: 'files.{fmt}.file' must be {FORMATS[fmt][0]}, got {name!r}")
        _get(entry, "sha256", f"files.{fmt}.", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest")
        _get(entry, "bytes", f"files.{fmt}.", _count, "a byte count")
    samples = _get(manifest, "samples", "", _mapping, "an object")
    if plain_name(samples.get("file"), "samples.file") != SAMPLES_FILE:
        raise RobustEdgeError(f"manifest.json: 'samples.file' must be {SAMPLES_FILE}")
    _get(samples, "sha256", "samples.", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest")
    _get(samples, "n", "samples.", lambda v: _count(v, 1), "an integer >= 1")
    _get(samples, "attacks", "samples.", lambda v: isinstance(v, list) and all(isinstance(a, str) and a for a in v),
         "a list of attack names")
    whitebox = _get(samples, "whitebox", "samples.", _mapping, "an object", required=False) or {}
    for fmt, attacks in whitebox.items():
        if fmt not in files or not (isinstance(attacks, list) and all(isinstance(a, str) and a for a in attacks)):
            raise _fail(f"samples.whitebox.{fmt}", "a list of attack names of a format in 'files'", attacks)
    square = _get(samples, "square", "samples.", _mapping, "an object", required=False) or {}
    for fmt, count in square.items():
        if fmt not in files and fmt != "torch" or not _count(count, 1) or count > samples["n"]:
            raise _fail(f"samples.square.{fmt}", "a count in [1, samples.n] for torch or a format in 'files'", count)
    flags = _get(manifest, "flags", "", _mapping, "an object", required=False) or {}
    for row_name, row_flags in flags.items():
        if not isinstance(row_flags, list):
            raise _fail(f"flags.{row_name}", "a list", row_flags)
        for flag in row_flags:
            if not (isinstance(flag, dict) and flag.get("check") in FLAG_CHECKS and _count(flag.get("examples"))
                    and _count(flag.get("of"), 1) and isinstance(flag.get("detail"), str)):
                raise _fail(f"flags.{row_name}", "a list of {check, examples, of, detail} objects", flag)
    operators = _get(manifest, "ort_operators", "", _mapping, "an object", required=False)
    if operators is not None:
        if plain_name(operators.get("file"), "ort_operators.file") != ORT_OPERATORS_FILE:
            raise RobustEdgeError(f"manifest.json: 'ort_operators.file' must be {ORT_OPERATORS_FILE}")
        _get(operators, "sha256", "ort_operators.", lambda v: isinstance(v, str) and len(v) == 64,
             "a sha256 hex digest")
    verifier = _get(manifest, "verifier", "", _mapping, "an object", required=False)
    if verifier is not None:
        if plain_name(verifier.get("file"), "verifier.file") != VERIFIER_FILE:
            raise RobustEdgeError(f"manifest.json: 'verifier.file' must be {VERIFIER_FILE}")
        _get(verifier, "sha256", "verifier.", lambda v: isinstance(v, str) and len(v) == 64, "a sha256 hex digest")
    table = _get(manifest, "table", "", lambda v: isinstance(v, dict) and isinstance(v.get("torch"), dict),
                 "an object with a 'torch' row")
    for row_name, row in table.items():
        if not isinstance(row, dict):
            raise _fail(f"table.{row_name}", "an object", row)
        for key, value in row.items():
            if value is not None and not is_number(value):
                raise _fail(f"table.{row_name}.{key}", "a finite number or null", value)
    Gate.from_dict(_get(manifest, "gate", "", _mapping, "an object"))
    options = _get(manifest, "options", "", _mapping, "an object")
    _get(options, "square_n", "options.", _count, "an integer >= 0")
    _get(options, "square_queries", "options.", lambda v: _count(v, 1), "an integer >= 1")
    _get(options, "seed", "options.", lambda v: _count(v, -2**63), "an integer")
    _get(manifest, "skipped", "", _mapping, "an object", required=False)
    return manifest


def bundle_path(bundle: Path, name: str) -> Path:
    """``bundle / name``, refusing a path that leaves the bundle (through a symlink, say)."""
    path = bundle / name
    root = bundle.resolve()
    resolved = path.resolve()
    if resolved.parent != root:
        raise RobustEdgeError(f"{name} points outside the bundle ({resolved}); refusing to read it")
    return path


def _refuse_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name}")


def load_manifest(bundle: Path) -> dict:
    if not bundle.is_dir():
        raise RobustEdgeError(f"{bundle} is not an export bundle (not a folder)")
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise RobustEdgeError(f"{bundle} is not an export bundle (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RobustEdgeError(f"{path} is not valid JSON: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # nested deeper than the parser's stack: no manifest is
        raise RobustEdgeError(f"{path} is not a manifest: nested too deeply to read") from None
    return check_manifest(manifest)


def check_hashes(bundle: Path, manifest: dict) -> None:
    """Every file the manifest lists exists inside the bundle and matches its sha256."""
    entries = list(manifest["files"].values()) + [manifest["samples"]]
    entries += [manifest[key] for key in ("verifier", "ort_operators") if manifest.get(key)]
    for entry in entries:
        file = bundle_path(bundle, entry["file"])
        if not file.is_file():
            raise RobustEdgeError(f"bundle file missing: {file}")
        if sha256(file) != entry["sha256"]:
            raise RobustEdgeError(f"{file.name} does not match its manifest sha256 (corrupted or replaced); "
                                    f"refusing to verify it")


def whitebox_key(fmt: str, attack: str) -> str:
    """verify.npz name of the white-box examples crafted on ``fmt``'s twin."""
    return f"wb.{fmt}.{attack}"


def square_key(row: str) -> str:
    """verify.npz name of the black-box Square examples found against ``row`` (a format or torch)."""
    return f"sq.{row}"


def sample_keys(manifest: dict) -> set[str]:
    samples = manifest["samples"]
    return ({"x", "y", "torch_pred"} | {f"adv_{a}" for a in samples["attacks"]}
            | {whitebox_key(f, a) for f, attacks in samples.get("whitebox", {}).items() for a in attacks}
            | {square_key(f) for f in samples.get("square", {})})


def load_samples(bundle: Path, manifest: dict) -> dict[str, np.ndarray]:
    """The arrays of verify.npz, checked against the manifest: names, dtypes, shapes, ranges."""
    path = bundle_path(bundle, SAMPLES_FILE)
    try:
        with np.load(path, allow_pickle=False) as data:
            samples = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise RobustEdgeError(f"{SAMPLES_FILE} is not a readable numpy archive without objects "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    expected = sample_keys(manifest)
    missing, extra = sorted(expected - set(samples)), sorted(set(samples) - expected)
    if missing or extra:
        raise RobustEdgeError(f"{SAMPLES_FILE} does not match the manifest: "
                                + "; ".join(([f"missing {', '.join(missing)}"] if missing else [])
                                            + ([f"unexpected {', '.join(extra)}"] if extra else [])))
    n = manifest["samples"]["n"]
    rows = {square_key(f): count for f, count in manifest["samples"].get("square", {}).items()}
    classes = manifest["output"].get("classes")
    for key, array in samples.items():
        if key in ("y", "torch_pred"):
            ok = array.dtype == np.int64 and array.shape == (n,) and (array >= 0).all() and \
                (classes is None or (array < len(classes)).all())
            want = f"int64 class indices of shape ({n},)"
        else:
            shape = (rows.get(key, n), *manifest["input"]["shape"])
            ok = array.dtype == np.float32 and array.shape == shape and np.isfinite(array).all() and \
                (array >= 0).all() and (array <= 1).all()
            want = f"float32 images in [0, 1] of shape {shape}"
        if not ok:
            raise RobustEdgeError(f"{SAMPLES_FILE}: '{key}' must be {want}, got {array.dtype} {array.shape}")
    eps = manifest["eps"]
    for key in expected - {"x", "y", "torch_pred"}:
        clean = samples["x"][:len(samples[key])]
        if np.abs(samples[key] - clean).max(initial=0.0) > eps + 1e-5:
            raise RobustEdgeError(f"{SAMPLES_FILE}: '{key}' leaves the eps = {eps} ball around 'x'")
    return samples


def read_bundle(bundle: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The checked manifest and samples of a bundle whose every file matches its hash."""
    bundle = Path(bundle)
    manifest = load_manifest(bundle)
    check_hashes(bundle, manifest)
    return manifest, load_samples(bundle, manifest)


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------

def distinct_percents(value: float, limit: float) -> tuple[str, str]:
    """Two fractions as percentages with as many decimals (1 to 4) as it takes for them to differ, so that
    a failed threshold never reads "99.0% < 99.0%"."""
    for decimals in range(1, 5):
        a, b = f"{100 * value:.{decimals}f}", f"{100 * limit:.{decimals}f}"
        if a != b:
            return a, b
    return a, b


@dataclass
class Gate:
    """Thresholds that turn a regression of an artifact against the torch model, or an attack that
    shows signs of failure, into a failed gate (exit 1)."""

    max_robust_drop: float = 0.05  # accuracy (fraction) an artifact may lose vs torch: clean, transfer, worst case
    min_agreement: float = 0.95  # top-1 agreement with torch on clean inputs
    min_twin_agreement: float = 0.99  # white-box numbers need a twin this close to the runtime (top-1)
    flag_tolerance: float = 0.005  # a comparison flag fires above this fraction of the examples compared
    allow_flags: bool = False  # report attack-failure flags without failing the gate

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allow_flags":
                if not isinstance(value, bool):
                    raise RobustEdgeError(f"gate 'allow_flags' must be true or false, got {value!r}")
            elif not _fraction(value):
                raise RobustEdgeError(f"gate '{f.name}' must be a fraction in [0, 1], got {value!r}")

    @classmethod
    def from_dict(cls, raw: dict) -> "Gate":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RobustEdgeError(f"unknown gate key '{unknown[0]}'; known keys: {', '.join(sorted(known))}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, max_drop: float | None = None, min_agreement: float | None = None,
                 allow_flags: bool | None = None) -> "Gate":
        """This gate with the thresholds a command line gave (None keeps the bundle's)."""
        changes = {k: v for k, v in (("max_robust_drop", max_drop), ("min_agreement", min_agreement),
                                     ("allow_flags", allow_flags)) if v is not None}
        return Gate(**(self.to_dict() | changes))

    def check(self, table: dict, flags: dict | None = None) -> list[str]:
        ref = table["torch"]
        failures = []
        for fmt, row in table.items():
            if fmt != "torch":
                if row["agreement"] < self.min_agreement:
                    value, limit = distinct_percents(row["agreement"], self.min_agreement)
                    failures.append(f"{fmt}: agreement {value}% < {limit}%")
                if row.get("twin_agreement") is not None and row["twin_agreement"] < self.min_twin_agreement:
                    value, limit = distinct_percents(row["twin_agreement"], self.min_twin_agreement)
                    failures.append(f"{fmt}: its twin agrees with the runtime on {value}% "
                                    f"(< {limit}%); white-box numbers refused")
                for key in [k for k in row if k in ("clean", "worst") or k.startswith("transfer_")]:
                    if ref.get(key) is None or row[key] is None:
                        continue
                    drop = ref[key] - row[key]
                    if drop > self.max_robust_drop + 1e-9:
                        value, limit = distinct_percents(drop, self.max_robust_drop)
                        failures.append(f"{fmt}: {key} drops {value} points (> {limit})")
            if not self.allow_flags:
                failures += [f"{fmt}: attack-failure flag {describe_flag(flag)}" for flag in (flags or {}).get(fmt, [])]
        return failures


# --------------------------------------------------------------------------------------------
# Runtimes
# --------------------------------------------------------------------------------------------

def check_finite(logits: np.ndarray, what: str) -> np.ndarray:
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=-1).sum()) if logits.ndim > 1 else 1
        raise RobustEdgeError(f"{what} gave non-finite logits (NaN/Inf) for {bad} of {len(logits)} inputs; "
                                f"refusing to report accuracy on them")
    return logits


class OrtRunner:
    """An ONNX Runtime session on the CPU: float32 NCHW in, float32 logits out."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise RobustEdgeError(f"onnxruntime cannot load {Path(path).name}: "
                                    f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                    ) from None
        self.input = self.session.get_inputs()[0]
        self.input_name = self.input.name
        self.input_shape = tuple(self.input.shape)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0].astype(
            np.float32)


class DeviceBuffers:
    """Input and output buffers on the GPU for an engine, grown when a batch needs more and kept between
    calls: Square and AutoAttack's Square stage make thousands of small queries, and a cudaMalloc and
    cudaFree per query cost more than the inference. ``cudart`` is cuda-python's runtime module."""

    def __init__(self, cudart) -> None:
        self.cudart = cudart
        self.pointers: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def _check(self, err, what: str) -> None:
        if int(err) != 0:
            raise RobustEdgeError(f"CUDA {what} failed (error {int(err)})")

    def get(self, which: str, nbytes: int) -> int:
        if nbytes > self.sizes.get(which, 0):
            self.release(which)
            err, pointer = self.cudart.cudaMalloc(nbytes)
            self._check(err, f"allocation of {nbytes} bytes")
            self.pointers[which], self.sizes[which] = pointer, nbytes
        return self.pointers[which]

    def release(self, which: str | None = None) -> None:
        for name in ([which] if which else list(self.pointers)):
            if name in self.pointers:
                self.cudart.cudaFree(self.pointers.pop(name))
                self.sizes.pop(name, None)

    def run(self, x: np.ndarray, runner) -> np.ndarray:
        cudart = self.cudart
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.empty(runner.output_shape(x.shape), dtype=np.float32)
        d_in, d_out = self.get("in", x.nbytes), self.get("out", y.nbytes)
        self._check(cudart.cudaMemcpy(d_in, x.ctypes.data, x.nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice)[0],
                    "copy to the device")
        runner.execute(d_in, d_out, 0)
        self._check(cudart.cudaStreamSynchronize(0)[0], "synchronisation")
        self._check(cudart.cudaMemcpy(y.ctypes.data, d_out, y.nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost)[0],
                    "copy from the device")
        return y


def _cuda_copies():  # pragma: no cover - needs a GPU
    """A ``call(x, runner)`` that runs an engine on host arrays through buffers kept on the GPU: through
    cuda-python, or torch where that is what the device has."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            cudart = None
    if cudart is not None:
        return DeviceBuffers(cudart).run
    try:
        import torch
    except ImportError:
        raise RobustEdgeError("TensorRT verification needs cuda-python (pip install cuda-python) or torch") from None
    kept: dict[str, "torch.Tensor"] = {}

    def buffer(which: str, numel: int) -> "torch.Tensor":
        if which not in kept or kept[which].numel() < numel:
            kept[which] = torch.empty(numel, device="cuda")
        return kept[which][:numel]

    def call_torch(x: np.ndarray, run) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        shape = run.output_shape(x.shape)
        inp = buffer("in", x.size).view(x.shape)
        inp.copy_(torch.from_numpy(x))
        out = buffer("out", int(np.prod(shape))).view(shape)
        stream = torch.cuda.current_stream()
        run.execute(inp.data_ptr(), out.data_ptr(), stream.cuda_stream)
        stream.synchronize()
        return out.cpu().numpy()
    return call_torch


class TrtRunner:  # pragma: no cover - needs a GPU and tensorrt; exercised by tests marked gpu
    """A serialized TensorRT engine (built on this GPU) with a dynamic batch axis."""

    def __init__(self, path: Path) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise RobustEdgeError("the 'tensorrt' package is not installed here") from None
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise RobustEdgeError(f"{Path(path).name}: the engine was built for another GPU or TensorRT version; "
                                    f"rebuild it on this device (export/README.md)")
        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.input_shape = tuple(engine.get_tensor_shape(self.input_name))
        self._call = _cuda_copies()

    def output_shape(self, input_shape: tuple) -> tuple:
        self.context.set_input_shape(self.input_name, tuple(input_shape))
        return tuple(self.context.get_tensor_shape(self.output_name))

    def execute(self, d_in: int, d_out: int, stream: int) -> None:
        self.context.set_tensor_address(self.input_name, int(d_in))
        self.context.set_tensor_address(self.output_name, int(d_out))
        self.context.execute_async_v3(stream)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._call(x, self)


class ExecuTorchRunner:
    """An ExecuTorch program through ExecuTorch's Python runtime (the XNNPACK delegate the phone runs).

    Its pybindings take torch tensors, so torch is imported here and only here: a device verifying
    ONNX files never needs it. Programs are exported for batch 1, the phone's case; a batch runs as
    that many calls (so ``latency_b64_ms`` is 64 sequential calls).
    """

    def __init__(self, path: Path) -> None:
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError:
            raise ImportError("the 'executorch' package is not installed here (pip install executorch)") from None
        self.torch = torch
        try:
            self.method = Runtime.get().load_program(str(path)).load_method("forward")
        except Exception as exc:  # the runtime raises RuntimeError with an error code
            raise RobustEdgeError(f"executorch cannot load {Path(path).name}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                                  ) from None
        sizes = self.method.metadata.input_tensor_meta(0).sizes() if hasattr(self.method, "metadata") else None
        self.input_shape = tuple(sizes) if sizes else (1, None, None, None)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = self.torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        rows = [self.method.execute([x[i:i + 1]])[0] for i in range(len(x))]
        return self.torch.cat(rows).numpy().astype(np.float32) if rows else np.zeros((0, 0), np.float32)


RUNNERS = {"onnxruntime": OrtRunner, "tensorrt": TrtRunner, "executorch": ExecuTorchRunner}


def open_runner(path: Path, fmt: str):
    if fmt not in FORMATS:
        raise RobustEdgeError(f"unknown format '{fmt}'; known formats: {', '.join(FORMATS)}")
    return RUNNERS[FORMATS[fmt][1]](path)


def check_input_shape(runner, shape: tuple) -> None:
    """The samples' (C, H, W) must fit the artifact's declared input."""
    expected = tuple(runner.input_shape[1:])
    if len(expected) != len(shape) - 1 or any(isinstance(e, int) and e > 0 and e != s
                                               for e, s in zip(expected, shape[1:])):
        raise RobustEdgeError(f"input shape {tuple(shape[1:])} does not fit the model's {expected}")


def predict(runner, x: np.ndarray, batch_size: int = 256, what: str = "the model") -> np.ndarray:
    """Logits for every row of ``x`` in batches, refusing non-finite values."""
    logits = np.concatenate([runner(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return check_finite(logits, what)


def median_latency_ms(runner, sample: np.ndarray, batch: int, repeats: int = 30, warmup: int = 5) -> float:
    x = np.repeat(sample[:1], batch, axis=0) if len(sample) < batch else sample[:batch]
    for _ in range(warmup):
        runner(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def replay(runner, samples: dict, row_name: str, what: str = "the model") -> tuple[dict, dict]:
    """Every stored set of examples through ``runner``: (row of accuracies, per-example correctness).

    Columns: ``clean``, ``agreement`` (top-1 with torch), ``transfer_<attack>`` (crafted on the torch
    model), ``whitebox_<attack>`` (crafted on this artifact's twin), ``square`` (black-box examples found
    against this artifact, on the first rows) and ``worst``: an example counts as robust only if every
    attack left it correct, as AutoAttack itself reports.
    """
    y = samples["y"]

    def correct(x: np.ndarray) -> np.ndarray:
        return predict(runner, x, what=what).argmax(1) == y[:len(x)]

    pred = predict(runner, samples["x"], what=what).argmax(1)
    results = {"clean": pred == y}
    for key in sorted(k for k in samples if k.startswith("adv_")):
        results[f"transfer_{key[4:]}"] = correct(samples[key])
    prefix = whitebox_key(row_name, "")
    for key in sorted(k for k in samples if k.startswith(prefix)):
        results[f"whitebox_{key[len(prefix):]}"] = correct(samples[key])
    if square_key(row_name) in samples:
        results["square"] = correct(samples[square_key(row_name)])
    row = {"agreement": float((pred == samples["torch_pred"]).mean())}
    row.update(accuracy_row(results))
    return row, results


def worst_case(results: dict) -> np.ndarray:
    """Per example: correct under every attack (a shorter array, such as Square's, covers a prefix)."""
    worst = np.ones(len(results["clean"]), dtype=bool)
    for correct in results.values():
        worst[:len(correct)] &= correct
    return worst


def accuracy_row(results: dict) -> dict:
    """Accuracy per column and the per-example worst case over all of them."""
    row = {key: float(np.mean(correct)) for key, correct in results.items()}
    row["worst"] = float(worst_case(results).mean())
    return row


FLAG_CHECKS = {
    "blackbox_below_whitebox": "the black-box Square attack broke examples that every white-box attack left correct",
    "transfer_below_whitebox": "examples crafted on the float model broke examples the artifact's own white-box "
                               "attacks left correct",
    "large_radius": "accuracy at a large radius is not near zero",
    "zero_gradients": "the input gradient is exactly zero",
    "flat_loss": "the attack did not increase the loss",
    "more_steps": "more attack steps and restarts lowered accuracy by more than a point (and one example)",
}


def make_flag(check: str, examples: int, of: int, detail: str) -> dict:
    return {"check": check, "examples": int(examples), "of": int(of), "detail": detail}


def describe_flag(flag: dict) -> str:
    return f"{flag['check']} on {flag['examples']} of {flag['of']} examples ({flag['detail']})"


# The iterative white-box attacks whose numbers are reported as robustness: what the flags judge. FGSM (one
# step) is weak by design, and a stronger attack beating it is ordinary, not a sign of masking.
ITERATIVE_ATTACKS = ("pgd20", "pgd20_trades", "cw", "autoattack", "diva")


def iterative_columns(results: dict, prefix: str | None = None) -> list[str]:
    """The ``whitebox_*``/``transfer_*`` columns of ``results`` whose attack is iterative (``prefix``: one kind)."""
    kinds = (prefix,) if prefix else ("whitebox_", "transfer_")
    return [k for k in results for p in kinds if k.startswith(p) and k[len(p):] in ITERATIVE_ATTACKS]


def reported_worst(results: dict) -> np.ndarray | None:
    """Per example: correct under every reported iterative attack (the artifact's own white-box ones where
    it has them, else those crafted on the torch model), or None when none ran. Never the flags' own
    Square, nor FGSM: the flags compare a stronger attack with what the evaluation reports."""
    columns = iterative_columns(results, "whitebox_") or iterative_columns(results, "transfer_")
    if not columns:
        return None
    return np.logical_and.reduce([np.asarray(results[k], dtype=bool) for k in columns])


def comparison_flags(results: dict, tolerance: float = 0.005) -> list[dict]:
    """Attack-failure flags that need only replays (Carlini et al. 2019; Pintor et al. 2022): a weaker
    attack must not succeed where the stronger, white-box ones failed. The white-box reference is the
    artifact's own iterative attacks (``whitebox_*``) where it has a twin, else the torch model's
    (``transfer_*``); with no iterative white-box attack there is nothing to judge (FGSM is weak by design)."""
    own = iterative_columns(results, "whitebox_")
    transfer = [k for k in results if k.startswith("transfer_")]
    reference = own or iterative_columns(results, "transfer_")
    if not reference:
        return []
    robust = np.logical_and.reduce([results["clean"]] + [results[k] for k in reference])
    flags = []
    if "square" in results:
        m = len(results["square"])
        count = int((robust[:m] & ~results["square"]).sum())
        if count > tolerance * m:
            flags.append(make_flag("blackbox_below_whitebox", count, m,
                                   f"Square broke {count} examples that {', '.join(reference)} left correct"))
    if own and transfer:
        broken = ~np.logical_and.reduce([results[k] for k in transfer])
        count = int((robust & broken).sum())
        if count > tolerance * len(robust):
            flags.append(make_flag("transfer_below_whitebox", count, len(robust),
                                   f"{', '.join(transfer)} broke {count} examples that {', '.join(own)} left correct"))
    return flags


def artifact_row(path: Path, fmt: str, samples: dict, latency: bool = True) -> tuple[dict, dict, object]:
    """One artifact through its own runtime: (row, per-example correctness, runner)."""
    runner = open_runner(path, fmt)
    check_input_shape(runner, samples["x"].shape)
    row, results = replay(runner, samples, fmt, what=f"{fmt} ({Path(path).name})")
    row["size_mb"] = Path(path).stat().st_size / 2**20
    if latency:
        row["latency_b1_ms"] = median_latency_ms(runner, samples["x"], 1)
        row["latency_b64_ms"] = median_latency_ms(runner, samples["x"], 64)
    return row, results, runner


def bundle_flags(manifest: dict, fmt: str, results: dict, tolerance: float) -> list[dict]:
    """A format's flags: the comparison flags recomputed from this replay, plus the gradient checks
    recorded at export (they need the torch side to recompute)."""
    recorded = [f for f in manifest.get("flags", {}).get(fmt, []) if f["check"] not in
                ("blackbox_below_whitebox", "transfer_below_whitebox")]
    return comparison_flags(results, tolerance) + recorded


PERCENT_COLUMNS = ("clean", "agreement", "transfer_pgd20", "transfer_autoattack", "whitebox_pgd20", "whitebox_cw",
                   "whitebox_autoattack", "whitebox_diva", "square", "worst")
UNIT_COLUMNS = (("size_mb", "size (MB)", 3), ("latency_b1_ms", "latency b1 (ms)", 2),
                ("latency_b64_ms", "latency b64 (ms)", 2))


def format_table(table: dict) -> str:
    """The verification table as Markdown (accuracies in %)."""
    rows = list(table.values())
    keys = [k for k in PERCENT_COLUMNS if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith(("transfer_", "whitebox_")) and k not in keys})
    units = [u for u in UNIT_COLUMNS if any(u[0] in r for r in rows)]
    head = ["format"] + [k.replace("_", " ") + " (%)" for k in keys] + [u[1] for u in units]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for fmt, row in table.items():
        cells = [f"{100 * row[k]:.1f}" if row.get(k) is not None else "" for k in keys]
        cells += [f"{row[u[0]]:.{u[2]}f}" if row.get(u[0]) is not None else "" for u in units]
        lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_flags(flags: dict) -> str:
    lines = [f"attack-failure flag, {row}: {describe_flag(flag)}" for row, row_flags in flags.items()
             for flag in row_flags]
    return "".join(line + "\n" for line in lines) if lines else "attack-failure flags: none\n"


# --------------------------------------------------------------------------------------------
# On the device
# --------------------------------------------------------------------------------------------

def _fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not _fraction(value):
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as every RobustEdge command
        self.exit(2, f"error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", type=Path, default=Path(__file__).resolve().parent,
                        help="the bundle folder (default: the folder this file is in)")
    parser.add_argument("--formats", default=None, help="comma-separated formats to check (default: all runnable)")
    parser.add_argument("--max-drop", type=_fraction_arg, default=None, help="gate override (fraction)")
    parser.add_argument("--min-agreement", type=_fraction_arg, default=None, help="gate override (fraction)")
    parser.add_argument("--allow-flags", action="store_true", help="report attack-failure flags without failing")
    args = parser.parse_args(argv)
    try:
        manifest, samples = read_bundle(args.bundle)
        gate = Gate.from_dict(manifest["gate"]).override(args.max_drop, args.min_agreement, args.allow_flags or None)
        wanted = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else list(manifest["files"])
        for fmt in wanted:
            if fmt not in manifest["files"]:
                raise RobustEdgeError(f"the bundle has no format '{fmt}'; it has {', '.join(manifest['files'])}")
        table = {"torch": {k: v for k, v in manifest["table"]["torch"].items() if not k.startswith("latency")}}
        flags = {"torch": manifest.get("flags", {}).get("torch", [])}
        for fmt in wanted:
            try:
                table[fmt], results, _ = artifact_row(args.bundle / manifest["files"][fmt]["file"], fmt, samples)
            except ImportError as exc:  # this device lacks that runtime
                print(f"skipping {fmt}: {exc}", file=sys.stderr)
                continue
            for key in ("twin_agreement", "twin_max_logit_diff"):
                if key in manifest["table"].get(fmt, {}):
                    table[fmt][key] = manifest["table"][fmt][key]
            flags[fmt] = bundle_flags(manifest, fmt, results, gate.flag_tolerance)
    except RobustEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("torch = the numbers measured at export time; the others were measured now, on this device")
    print(format_table(table), end="")
    print(format_flags(flags), end="")
    failures = gate.check(table, flags)
    if failures:
        print("GATE FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("gate passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
