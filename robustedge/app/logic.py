"""The logic behind the Streamlit demo (``robustedge/app/page.py``), kept free of Streamlit so it is testable.

Security: the app only ever opens files found by scanning its models folder, and the foreign sources
its operator named on the command line (``robustedge app --model SRC``, passed to the page as
``ROBUSTEDGE_SOURCES``); names shown to the user are paths relative to that folder or those sources as
given, and every folder path is resolved and checked to stay inside it (no ``..`` or symlink escapes).
A page visitor can only pick from that list. Test images come only from the embedded digits, the
models folder, or the ``--data-root`` the operator passed (:func:`choose_test_data`): a data folder
that a checkpoint records is metadata inside a file, not the operator's choice, so one pointing
elsewhere is ignored with a note. Uploads are size-limited and decoded by PIL with its
decompression-bomb guard; any failure to decode one is a one-line message (:func:`prepare_upload`).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustedge.attack_table import ATTACKS as ATTACK_ROWS
from robustedge.errors import RobustEdgeError, exception_line

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096
ATTACKS = ("FGSM", "PGD", "CW-inf", "APGD-CE")
ONNX_ATTACKS = ("Transfer PGD (from source checkpoint)", "Square (query-only)")
SQUARE_QUERIES = ATTACK_ROWS["square_demo"].queries  # an interactive budget; `robustedge export` uses AutoAttack's 5000
# the demo's names for rows of the one attack table (robustedge/attack_table.py); the visitor picks the steps
TABLE_ROWS = {"FGSM": "fgsm", "PGD": "pgd20", "CW-inf": "cw", "APGD-CE": "apgd_ce"}
# what `robustedge app` hands the page (Streamlit passes no arguments to a page)
MODELS_ENV = "ROBUSTEDGE_MODELS"  # the models folder; empty: none
SOURCES_ENV = "ROBUSTEDGE_SOURCES"  # JSON list of the models named with --model (see foreign_sources)
DATA_ROOT_ENV = "ROBUSTEDGE_DATA_ROOT"  # test images for models that do not record where theirs are


@dataclass
class ModelEntry:
    name: str  # path relative to the models folder: what the user sees and picks
    path: Path
    kind: str  # "torch" or "onnx"
    info: dict = field(default_factory=dict)
    source: Path | None = None  # for ONNX: the checkpoint it was exported from, when inside the folder
    # for a foreign model named with --model: what robustedge.loading.load takes (origin = file or robustbench:)
    origin: str | None = None
    facts: dict | None = None

    @property
    def label(self) -> str:
        bits = [self.info.get("arch"), self.info.get("method"), self.info.get("dataset")]
        robust = self.info.get("robustness")
        return f"{self.name} ({', '.join(b for b in bits if b)}{'; ' + robust if robust else ''})"


def _inside(folder: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _read_json_dict(path: Path, warnings: list[str]) -> dict | None:
    """A JSON object from ``path``; a malformed file is skipped with a warning naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        warnings.append(f"skipped {path.name} in {path.parent}: not readable JSON ({type(exc).__name__})")
        return None
    if not isinstance(data, dict):
        warnings.append(f"skipped {path.name} in {path.parent}: not a JSON object")
        return None
    return data


def _flag_lines(flags) -> list[str]:
    from robustedge.verifier import FLAG_CHECKS, describe_flag

    if not isinstance(flags, list):
        return []
    return [describe_flag(f) for f in flags if isinstance(f, dict) and f.get("check") in FLAG_CHECKS
            and {"examples", "of", "detail"} <= set(f)]


def _robustness_label(path: Path, meta, warnings: list[str], info: dict) -> str | None:
    eval_json = path.with_name("eval.json")
    if eval_json.is_file() and path.name == "best.safetensors":
        data = _read_json_dict(eval_json, warnings)
        acc = data.get("accuracy") if data else None
        if data is not None:
            info["flags"] = _flag_lines(data.get("flags"))
        if isinstance(acc, dict) and all(isinstance(acc.get(k), (int, float)) for k in ("clean", "autoattack")):
            return f"clean {100 * acc['clean']:.0f}%, AA {100 * acc['autoattack']:.0f}%"
        if data is not None and not isinstance(acc, dict):
            warnings.append(f"skipped {eval_json}: no accuracy table")
    metrics = meta.metrics if isinstance(meta.metrics, dict) else {}
    if all(isinstance(metrics.get(k), (int, float)) for k in ("val_clean", "val_pgd20")):
        return f"val clean {100 * metrics['val_clean']:.0f}%, PGD-20 {100 * metrics['val_pgd20']:.0f}%"
    return None


def foreign_sources(sources: list[tuple[str, str]], facts) -> str:
    """The ``ROBUSTEDGE_SOURCES`` value for ``robustedge app --model``: (name shown, loader source) pairs
    sharing one :class:`~robustedge.loading.ModelFacts` (the command line gives one set, as for ``eval``).
    Each source is loaded once here, so a bad one is refused in one line before the server starts, and
    its label comes from what the loader found rather than from a second reading of the flags."""
    from robustedge.loading import load

    items = []
    for name, origin in sources:
        _, meta = load(origin, facts=facts, device="cpu")
        items.append({"name": name, "origin": origin, "facts": asdict(facts),
                      "info": {"arch": meta.spec.arch, "method": meta.method or "foreign", "dataset": meta.dataset,
                               "eps": meta.eps}})
    return json.dumps(items)


def _foreign_entries(text: str | None) -> list[ModelEntry]:
    """The entries of a ``ROBUSTEDGE_SOURCES`` value (what :func:`foreign_sources` wrote)."""
    if not text:
        return []
    try:
        return [ModelEntry(str(i["name"]), Path(i["origin"]), "torch", dict(i["info"]), origin=str(i["origin"]),
                           facts=dict(i["facts"])) for i in json.loads(text)]
    except (ValueError, TypeError, KeyError) as exc:
        raise RobustEdgeError(f"{SOURCES_ENV} is not a list of model sources ({type(exc).__name__}); "
                              f"start the page with `robustedge app --model ...`") from None


def scan_models(folder: str | Path | None, sources: str | None = None) -> tuple[list[ModelEntry], list[str]]:
    """Every RobustEdge checkpoint and exported ONNX model under ``folder`` (``None``: no folder), then the
    foreign models of ``sources`` (a ``ROBUSTEDGE_SOURCES`` value), and warnings about the files that were
    skipped (a malformed eval.json or manifest.json never breaks the page)."""
    foreign = _foreign_entries(sources)
    if folder is None:
        return foreign, []
    entries, warnings = _scan_folder(Path(folder))
    taken = {e.name for e in entries}
    for entry in foreign:  # a named file must never pass for the folder's file of the same relative name
        if entry.name in taken:
            entry.name = entry.origin
    return entries + foreign, warnings


def _scan_folder(folder: Path) -> tuple[list[ModelEntry], list[str]]:
    from robustedge.checkpoint import is_robustedge_file, read_meta

    if not folder.is_dir():
        raise RobustEdgeError(f"models folder {folder} does not exist; run `robustedge quickstart` or pass --models")
    entries, warnings = [], []
    for path in sorted(folder.rglob("*.safetensors")):
        if not _inside(folder, path) or path.name.startswith("."):
            continue
        if not is_robustedge_file(path):
            warnings.append(f"skipped {path.relative_to(folder)}: a safetensors file without RobustEdge metadata; "
                            f"name it with `robustedge app --model FILE --arch ARCH`")
            continue
        try:
            meta = read_meta(path)
        except RobustEdgeError:
            continue
        info = {"arch": meta.spec.arch, "method": meta.method, "dataset": meta.dataset, "eps": meta.eps}
        info["robustness"] = _robustness_label(path, meta, warnings, info)
        entries.append(ModelEntry(str(path.relative_to(folder)), path, "torch", info))
    for path in sorted(folder.rglob("*.onnx")):
        if not _inside(folder, path) or path.name.startswith("."):
            continue
        manifest_path = path.with_name("manifest.json")
        info, source = {"arch": "onnx"}, None
        manifest = _read_json_dict(manifest_path, warnings) if manifest_path.is_file() else None
        if manifest is not None:
            src = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
            eps = manifest.get("eps")
            info = {"arch": f"{src.get('arch')} ({path.stem.replace('model', 'onnx').replace('.', ' ')})",
                    "method": src.get("method"), "dataset": src.get("dataset"),
                    "eps": eps if isinstance(eps, (int, float)) and 0 <= eps <= 1 else None}
            fmt = next((f for f, entry in (manifest.get("files") or {}).items()
                        if isinstance(entry, dict) and entry.get("file") == path.name), None)
            row = (manifest.get("table") or {}).get(fmt) if fmt else None
            if isinstance(row, dict) and isinstance(row.get("worst"), (int, float)):
                info["robustness"] = f"clean {100 * row.get('clean', 0):.0f}%, worst case {100 * row['worst']:.0f}%"
            info["flags"] = _flag_lines((manifest.get("flags") or {}).get(fmt)) if fmt else []
            relative = src.get("relative_path")
            candidate = (path.parent / relative).resolve() if isinstance(relative, str) and relative else None
            if candidate is not None and candidate.is_file() and _inside(folder, candidate):
                source = candidate
        entries.append(ModelEntry(str(path.relative_to(folder)), path, "onnx", info, source))
    return entries, warnings


def list_models(folder: str | Path | None, sources: str | None = None) -> list[ModelEntry]:
    """:func:`scan_models` without the warnings."""
    return scan_models(folder, sources)[0]


def query_value(params, key: str, parse, default, low=None, high=None) -> tuple[object, str | None]:
    """A query parameter parsed and range-checked, or ``default`` with a warning saying why."""
    if key not in params:
        return default, None
    raw = params.get(key)
    try:
        value = parse(raw)
    except (TypeError, ValueError):
        return default, f"query parameter {key}={raw!r} is not valid; using {default}"
    if isinstance(value, float) and not math.isfinite(value) or \
            low is not None and value < low or high is not None and value > high:
        return default, f"query parameter {key}={raw!r} is outside [{low}, {high}]; using {default}"
    return value, None


def resolve_entry(folder: str | Path | None, name: str, sources: str | None = None) -> ModelEntry:
    """The entry called ``name``; anything not found by the scan (folder + named sources) is refused."""
    for entry in list_models(folder, sources):
        if entry.name == name:
            return entry
    raise RobustEdgeError(f"no model named {name!r} in the models folder")


@dataclass
class DataChoice:
    """Where the page may take a model's test images from, and why not from where it records."""

    dataset: str
    root: str | None  # a folder the page may read (None: the embedded digits, or no test data)
    seed: int = 0
    val_fraction: float = 0.1
    notes: list[str] = field(default_factory=list)  # one line each, shown on the page


def choose_test_data(meta, info: dict | None, models_folder: str | Path | None,
                     data_root: str | None) -> DataChoice:
    """The test data the page loads for a model: its dataset and a data folder it is allowed to read.

    ``meta`` is the model's :class:`~robustedge.checkpoint.ModelMeta` (None for an ONNX file without
    its source), ``info`` the scan's facts, ``models_folder`` the app's folder and ``data_root`` the
    ``--data-root`` of ``robustedge app`` (``ROBUSTEDGE_DATA_ROOT``). The folder a checkpoint records
    (``extra.data.root``) is only a hint written into a file: anyone who can drop a checkpoint into the
    models folder could point it at any folder on the server and the page would show its images. So
    it is used only when it lies inside the models folder or ``data_root``; otherwise it is ignored
    with a one-line note and ``data_root`` (or nothing) is used. Digits are embedded and read nothing.
    Malformed split settings fall back to the defaults with a note rather than breaking the page.
    """
    info = info or {}
    dataset = (meta.dataset if meta else info.get("dataset")) or "digits"
    recorded_data = meta.extra.get("data") if meta is not None else None
    data = recorded_data if isinstance(recorded_data, dict) else {}
    out = DataChoice(str(dataset), None)
    seed, fraction = data.get("seed", 0), data.get("val_fraction", 0.1)
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**31:
        out.seed = seed
    else:
        out.notes.append(f"the model records data seed {seed!r}, not an integer in [0, 2^31); using 0")
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction < 1:
        out.val_fraction = float(fraction)
    else:
        out.notes.append(f"the model records val_fraction {fraction!r}, not a number in [0, 1); using 0.1")
    if out.dataset == "digits":
        return out  # embedded in scikit-learn: no folder is read
    given = data_root or None
    recorded = data.get("root")
    if recorded in (None, ""):
        out.root = given
        return out
    allowed = [Path(f) for f in (models_folder, given) if f]
    if isinstance(recorded, str):
        try:
            place = Path(recorded).expanduser().resolve()
        except (OSError, RuntimeError, ValueError):
            place = None
        if place is not None and any(_inside(folder, place) for folder in allowed):
            out.root = str(place)
            return out
    instead = f"using --data-root {given}" if given else "start the app with --data-root to show its test images"
    out.notes.append(f"the model's recorded data folder {recorded!r} is outside the models folder and --data-root, "
                     f"so it is not read; {instead}")
    out.root = given
    return out


class Predictor:
    """A torch model or an ONNX Runtime session behind one call: [0, 1] images -> probabilities."""

    def __init__(self, entry: ModelEntry) -> None:
        from robustedge.loading import ModelFacts, load

        self.entry = entry
        self.torch_model = None
        self.runner = None
        if entry.kind == "torch":
            self.torch_model, meta = load(entry.origin or entry.path, facts=ModelFacts(**(entry.facts or {})),
                                            device="cpu")  # the demo attacks on the CPU
            self.input_shape = meta.spec.input_shape
            self.classes = meta.classes or [str(i) for i in range(meta.spec.num_classes)]
            self.meta = meta
        else:
            from robustedge.verifier import OrtRunner

            self.runner = OrtRunner(entry.path)
            shape = self.runner.input.shape[1:]
            if not all(isinstance(s, int) for s in shape):
                raise RobustEdgeError(f"{entry.name} has no fixed input shape")
            self.input_shape = tuple(shape)
            manifest = _read_json_dict(entry.path.with_name("manifest.json"), []) \
                if entry.path.with_name("manifest.json").is_file() else None
            output = manifest.get("output") if manifest else None
            classes = output.get("classes") if isinstance(output, dict) else None
            if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
                classes = None
            self.meta = None
            self.classes = classes or [str(i) for i in range(len(self.logits(torch.zeros(1, *shape))[0]))]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, refusing NaN/Inf (a broken model must not show a prediction)."""
        from robustedge.verifier import check_finite

        if self.torch_model is not None:
            with torch.no_grad():
                out = self.torch_model(x).float()
        else:
            out = torch.from_numpy(self.runner(x.numpy()))
        check_finite(out.numpy(), self.entry.name)
        return out

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x).float(), dim=1)

    def module(self) -> torch.nn.Module:
        if self.torch_model is not None:
            return self.torch_model
        from robustedge.runners import RunnerModule

        return RunnerModule(self.runner)


def prepare_upload(data: bytes, shape: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
    """An uploaded image as a (1, C, H, W) tensor in [0, 1] for the model, and what was done to it."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > MAX_UPLOAD_BYTES:
        raise RobustEdgeError(f"the upload is {len(data) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES // 2**20} MB")
    Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS
    channels, height, width = shape
    try:
        with warnings.catch_warnings():
            # PIL only warns between one and two times its limit; the size check below refuses instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_UPLOAD_PIXELS:
                    raise RobustEdgeError(f"the image is {img.width}x{img.height}; at most {MAX_UPLOAD_PIXELS} "
                                          f"pixels")
                original = f"{img.width}x{img.height} {img.mode}"
                img = img.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
                array = np.asarray(img, dtype=np.float32).reshape(height, width, channels) / 255.0
    except RobustEdgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - see below
        # The bytes are a stranger's, and PIL's decoders fail in many ways on them: OSError (truncated),
        # UnidentifiedImageError, DecompressionBombError, SyntaxError, ValueError ("Decompressed Data Too
        # Large" from a text or ICC chunk past PngImagePlugin.MAX_TEXT_CHUNK), struct.error, EOFError,
        # and whatever a plugin raises next. Every one means the same to the visitor: not an image we can
        # read. Listing types fixed one example at a time; the class is "the decoder failed".
        detail = "no image format PIL knows" if isinstance(exc, UnidentifiedImageError) else exception_line(exc, limit=160)
        raise RobustEdgeError(f"the upload is not a readable image ({detail})") from None
    note = f"{original} -> {width}x{height} {'grey' if channels == 1 else 'RGB'}, scaled to [0, 1]"
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous(), note


def attack(predictor: Predictor, x: torch.Tensor, y: torch.Tensor, name: str, eps: float, steps: int,
           source: Predictor | None = None, seed: int = 0) -> torch.Tensor:
    """Adversarial example(s) for ``predictor``. White-box attacks need a torch model; ONNX models get
    transfer from their source checkpoint or the query-only Square attack."""
    from robustedge.attacks import autoattack, check_eps, run_table_attack

    eps = check_eps(eps)
    if eps == 0:
        return x.clone()
    gen = torch.Generator().manual_seed(seed)
    if name == "Square (query-only)":
        x_adv, _ = autoattack(predictor.module(), x, y, eps=eps, version="custom", attacks=["square"], seed=seed,
                              batch_size=len(x), device="cpu", square_queries=SQUARE_QUERIES)
        return x_adv
    if name.startswith("Transfer"):
        if source is None or source.torch_model is None:
            raise RobustEdgeError("no source checkpoint for this ONNX model inside the models folder; use Square")
        name, target = "PGD", source.torch_model
    else:
        if predictor.torch_model is None:
            raise RobustEdgeError(f"{name} needs gradients; for an ONNX model use transfer or Square")
        target = predictor.torch_model
    if name in ("FGSM", "PGD", "CW-inf"):
        row = TABLE_ROWS[name]
        return run_table_attack(row, target, x, y, eps, steps=None if name == "FGSM" else steps, generator=gen)
    if name == "APGD-CE":  # pyautoattack's APGD-CE, one restart of `steps` iterations (interactive budget)
        x_adv, _ = autoattack(target, x, y, eps=eps, version="custom", attacks=["apgd-ce"], seed=seed,
                              batch_size=len(x), device="cpu", apgd_iters=max(steps, 2),
                              apgd_restarts=ATTACK_ROWS["apgd_ce"].restarts)
        return x_adv
    raise RobustEdgeError(f"unknown attack {name!r}; valid: {', '.join(ATTACKS + ONNX_ATTACKS)}")


def robust_curve(predictor: Predictor, x: torch.Tensor, y: torch.Tensor, attack_name: str, eps_values: list[float],
                 steps: int, source: Predictor | None = None) -> list[float]:
    """Robust accuracy of a small batch over a range of eps (the same attack at each eps)."""
    out = []
    for eps in eps_values:
        x_adv = attack(predictor, x, y, attack_name, eps, steps, source)
        out.append(float((predictor.logits(x_adv).argmax(1) == y).float().mean()))
    return out


def amplify(delta: torch.Tensor) -> np.ndarray:
    """A perturbation mapped to [0, 1] around grey so that +-eps is visible."""
    scale = float(delta.abs().max()) or 1.0
    return (0.5 + 0.5 * delta / scale).clamp(0, 1).squeeze(0).permute(1, 2, 0).numpy()


def to_image(x: torch.Tensor) -> np.ndarray:
    img = x.squeeze(0).permute(1, 2, 0).clamp(0, 1).numpy()
    return img[:, :, 0] if img.shape[2] == 1 else img
