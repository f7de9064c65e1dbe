"""A bundle on disk: the manifest schema, plain file names inside the bundle, hashes, and the samples.

Everything here refuses (``RobustEdgeError``, one line) rather than reads on: a manifest that does not
follow the schema, a file entry that is not a plain name inside the bundle, a file whose sha256 differs
from the manifest, a ``verify.npz`` with missing, extra, mistyped or misshapen arrays.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from robustedge.verifier.base import RobustEdgeError, exception_line, first_line, is_fraction, is_number, sha256
from robustedge.verifier.flags import FLAG_CHECKS
from robustedge.verifier.formats import FORMATS
from robustedge.verifier.gate import Gate

BUNDLE_FORMAT = "robustedge-bundle/1"
MANIFEST_FILE = "manifest.json"
SAMPLES_FILE = "verify.npz"
VERIFIER_FILE = "verify.py"
ORT_OPERATORS_FILE = "ort.required_operators.config"  # ops a minimal ONNX Runtime Mobile build must hold


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
    _get(manifest, "eps", "", is_fraction, "a number in [0, 1]")
    files = _get(manifest, "files", "", lambda v: isinstance(v, dict) and len(v) > 0, "a non-empty object")
    for fmt, entry in files.items():
        if fmt not in FORMATS:
            raise RobustEdgeError(f"manifest.json: unknown format '{fmt}' in 'files'; known formats: "
                                    f"{', '.join(FORMATS)}")
        if not isinstance(entry, dict):
            raise _fail(f"files.{fmt}", "an object", entry)
        name = plain_name(entry.get("file"), f"files.{fmt}.file")
        if name != FORMATS[fmt].file:
            raise RobustEdgeError(f"manifest.json: 'files.{fmt}.file' must be {FORMATS[fmt].file}, got {name!r}")
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
    emulated = _get(manifest, "emulated", "", _mapping, "an object", required=False)
    if emulated is not None:
        _get(emulated, "isas", "emulated.", lambda v: isinstance(v, list) and all(isinstance(i, str) and i for i in v),
             "a list of processor families")
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
        raise RobustEdgeError(f"{path} is not valid JSON: {first_line(exc)}") from None
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
                                f"({exception_line(exc)})") from None
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
