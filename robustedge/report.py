"""``robustedge report RUN_DIR [RUN_DIR...]``: one page to pick a model for a device.

For every training run found under the given folders (a run holds ``metrics.csv`` and
``best.safetensors``; a quickstart folder holds several): training curves (loss, clean and
PGD-20 validation accuracy, B-MTARD's temperatures and loss weights), the robustness table
(``eval.json`` from the quickstart or ``robustedge eval``), accuracy against eps (PGD-20 on the
first test examples, measured once by robustedge/run_measures.py and cached as ``eps_curve.json``), the
export verification table of any bundle beside it (``manifest.json``), and one scatter of
accuracy, robustness and latency across the runs. Written as ``report.html`` (self-contained:
figures inlined) and ``report.md`` (figures in ``report_files/``), each atomically, plus
``report.json``, the marker that lets a later report replace this one (and nothing else).

A malformed ``metrics.csv``, ``eval.json``, ``manifest.json`` or ``eps_curve.json`` never stops the
report: the file is skipped with a warning naming it, printed and listed on the page.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from robustedge.loading import load
from robustedge.errors import RobustEdgeError, first_line
from robustedge.files import (OutputKind, atomic_write_bytes, atomic_write_json, atomic_write_text,
                              check_output_folder)
from robustedge.run_measures import eps_curve, torch_latency_ms
from robustedge.verifier import PERCENT_COLUMNS, check_manifest, is_number

REPORT_FORMAT = "robustedge-report/1"


def _legacy_report(folder: Path) -> bool:  # report folders written before report.json existed
    try:
        return "<title>RobustEdge report:" in (folder / "report.html").read_text(encoding="utf-8")[:4096]
    except (OSError, UnicodeDecodeError):
        return False


REPORT = OutputKind("report folder", "report.json", REPORT_FORMAT, legacy=_legacy_report)


@dataclass
class RunInfo:
    name: str
    folder: Path
    history: list[dict]
    method: str = ""
    arch: str = ""
    eps: float | None = None
    evaluation: dict | None = None
    curve: dict | None = None
    bundle: dict | None = None
    latency_ms: float | None = None  # torch eager, batch 1, measured here
    latency_threads: int | None = None  # torch's threads during that measurement
    panels: dict | None = None  # the method's figure panels (Method.panels)
    skipped: list[str] = field(default_factory=list)  # warnings raised while reading this run


def find_runs(folders: list[Path]) -> list[Path]:
    """Training runs in the given folders: the folder itself, or its direct sub-folders."""
    runs: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise RobustEdgeError(f"{folder} is not a folder")
        if (folder / "metrics.csv").exists():
            runs.append(folder)
        else:
            runs += sorted(p for p in folder.iterdir() if (p / "metrics.csv").exists())
    if not runs:
        raise RobustEdgeError(f"no training runs (folders with metrics.csv) in {', '.join(map(str, folders))}")
    return list(dict.fromkeys(runs))


class Warnings(list):
    """Files skipped while reading runs: printed as they happen and listed on the page."""

    def __init__(self, progress) -> None:
        super().__init__()
        self.progress = progress

    def skip(self, path: Path, why: str) -> None:
        message = f"warning: skipped {path}: {why}"
        self.append(message)
        self.progress(message)


def _read_json(path: Path, warnings: Warnings) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        warnings.skip(path, f"not readable JSON ({type(exc).__name__})")
        return None


def _read_history(path: Path, warnings: Warnings) -> list[dict]:
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                values = {k: float(v) for k, v in row.items() if k is not None and v not in ("", None)}
                if "epoch" not in values or not all(np.isfinite(list(values.values()))):
                    raise ValueError("a row without an epoch or with a non-finite value")
                rows.append(values)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, csv.Error) as exc:
        warnings.skip(path, f"not a RobustEdge metrics.csv ({first_line(exc)})")
        return []
    return rows


def _read_evaluation(path: Path, warnings: Warnings) -> dict | None:
    data = _read_json(path, warnings)
    if data is None:
        return None
    acc = data.get("accuracy") if isinstance(data, dict) else None
    if not (isinstance(acc, dict) and "clean" in acc and all(is_number(v) and 0 <= v <= 1 for v in acc.values())):
        warnings.skip(path, "no accuracy table of numbers in [0, 1] with a 'clean' entry")
        return None
    if data.get("complete") is False:  # saved while it ran and never finished: not a result
        warnings.skip(path, "an unfinished evaluation (`robustedge eval ... --resume` finishes it)")
        return None
    return data


def _bundle_for(run: Path, warnings: Warnings) -> dict | None:
    for candidate in (run.parent / f"{run.name}_export", run / "export"):
        path = candidate / "manifest.json"
        if path.exists():
            manifest = _read_json(path, warnings)
            if manifest is None:
                return None
            try:
                check_manifest(manifest)
            except RobustEdgeError as exc:
                warnings.skip(path, str(exc))
                return None
            return manifest | {"folder": str(candidate)}
    return None


def collect(run: Path, curve_n: int, data_root: str | None = None, warnings: Warnings | None = None,
            device: torch.device | str = "cpu") -> RunInfo:
    """A run's figures and tables; its eps curve is computed on ``device``, its torch latency on the CPU
    (batch 1, the deployment question the report answers)."""
    warnings = warnings if warnings is not None else Warnings(lambda m: None)
    before = len(warnings)
    info = RunInfo(run.name, run, _read_history(run / "metrics.csv", warnings))
    best = run / "best.safetensors"
    if best.exists():
        try:
            model, meta = load(best, device="cpu")
        except RobustEdgeError as exc:
            warnings.skip(best, str(exc))
        else:
            info.method, info.arch, info.eps = meta.method or "", meta.spec.arch, meta.eps
            info.panels = _panels(meta.method)
            info.latency_ms = torch_latency_ms(model, meta.spec.input_shape)
            info.latency_threads = torch.get_num_threads()
            if curve_n > 0:
                info.curve = eps_curve(run, model, meta, curve_n, data_root, warnings, device)
    for candidate in (run / "eval.json", run / "best-eval" / "eval.json"):
        if candidate.exists():
            info.evaluation = _read_evaluation(candidate, warnings)
            break
    info.bundle = _bundle_for(run, warnings)
    info.skipped = list(warnings[before:])
    return info


def _panels(method: str | None) -> dict:
    """The method's own figure panels (B-MTARD: temperatures and loss weights), from its registry entry."""
    from robustedge.methods import METHODS, method_names

    method_names()  # loads the registry
    return dict(METHODS[method].panels) if method in METHODS else {}


# ---- figures -------------------------------------------------------------------------------

def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def training_figure(info: RunInfo) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = info.history
    panels = [("loss", ["loss"]), ("accuracy (%)", ["train_acc", "val_clean", "val_pgd20"])]
    panels += [(title, list(keys)) for title, keys in (info.panels or {}).items() if any(k in r for r in h for k in keys)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.1))
    for ax, (title, keys) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        for key in keys:
            points = [(r["epoch"], r[key]) for r in h if key in r]
            if points:
                xs, ys = zip(*points)
                scale = 100 if title.startswith("accuracy") else 1
                ax.plot(xs, [v * scale for v in ys], marker="o", markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def curve_figure(runs: list[RunInfo]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_curves = [r for r in runs if r.curve]
    if not with_curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in with_curves:
        ax.plot([e * 255 for e in r.curve["eps"]], [100 * a for a in r.curve["accuracy"]], marker="o", label=r.name)
    ax.set_xlabel("eps (x 1/255)")
    ax.set_ylabel("PGD-20 accuracy (%)")
    ax.set_title(f"accuracy against eps (first {with_curves[0].curve['n']} test examples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _robust_metric(info: RunInfo) -> tuple[str, float, float] | None:
    """(attack name, clean, robust) from the evaluation, else from the last validation."""
    if info.evaluation:
        acc = info.evaluation["accuracy"]
        if is_number(info.evaluation.get("worst")):
            return "worst case", acc["clean"], info.evaluation["worst"]
        attack = next((a for a in ("autoattack", "pgd20", "cw", "fgsm") if a in acc), None)
        if attack:
            return attack, acc["clean"], acc[attack]
    last = next((r for r in reversed(info.history) if "val_pgd20" in r), None)
    return ("val PGD-20", last["val_clean"], last["val_pgd20"]) if last else None


def scatter_figure(runs: list[RunInfo]) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = []  # (label, latency, clean, robust, exported?)
    for r in runs:
        metric = _robust_metric(r)
        if not (r.latency_ms and metric):
            continue
        points.append((f"{r.name} [{metric[0]}]", r.latency_ms, metric[1], metric[2], False))
        for fmt, row in (r.bundle or {}).get("table", {}).items():
            robust = row.get("worst", row.get("transfer_autoattack", row.get("transfer_pgd20")))
            if fmt != "torch" and row.get("latency_b1_ms") and robust is not None:
                points.append((f"{r.name} [{fmt}]", row["latency_b1_ms"], row["clean"], robust, True))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    cmap = plt.get_cmap("viridis")
    for i, (label, latency, clean, robust, exported) in enumerate(points, 1):
        ax.scatter(latency, 100 * robust, s=60 + 400 * clean, color=cmap(clean), edgecolor="black", alpha=0.85,
                   marker="s" if exported else "o", label=f"{i}: {label}, clean {100 * clean:.1f}%")
        ax.annotate(str(i), (latency, 100 * robust), fontsize=8, ha="center", va="center", weight="bold")
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)
    for handle in legend.legend_handles:
        handle.set_sizes([30])
    ax.set_xscale("log")
    ax.set_xlabel("latency, batch 1, this machine (ms, log): circles torch eager, squares exported runtimes")
    ax.set_ylabel("robust accuracy (%): worst case over the attacks run")
    ax.set_title("accuracy (marker size, colour) - robustness - latency")
    ax.grid(alpha=0.3)
    return _png(fig)


# ---- tables ----------------------------------------------------------------------------------

def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}"


def robustness_table(runs: list[RunInfo]) -> list[list[str]]:
    from robustedge.eval_report import DEFAULT_ATTACKS

    found = {a for r in runs if r.evaluation for a in r.evaluation["accuracy"]}
    attacks = [a for a in DEFAULT_ATTACKS if a in found] + sorted(found - set(DEFAULT_ATTACKS))
    if not attacks:
        return []
    rows = [["run", "method", "n"] + attacks + ["worst"] + (["W-Robust (AA)"] if "autoattack" in attacks else [])
            + ["attack-failure flags"]]
    for r in runs:
        if not r.evaluation:
            continue
        acc = r.evaluation["accuracy"]
        row = [r.name, r.method, str(r.evaluation.get("n", ""))] + [_pct(acc.get(a)) for a in attacks]
        worst = r.evaluation.get("worst")
        row.append(_pct(worst) if is_number(worst) else "")
        if "autoattack" in attacks:
            row.append(_pct((acc["clean"] + acc["autoattack"]) / 2) if "autoattack" in acc else "")
        rows.append(row + [_flag_cell(r.evaluation.get("flags"))])
    return rows


def _flag_cell(flags) -> str:
    """The flags that fired, as 'check (examples/of)'; 'not checked' when the checks did not run."""
    if not isinstance(flags, list):
        return "not checked"
    return ", ".join(f"{f.get('check')} ({f.get('examples')}/{f.get('of')})" for f in flags if isinstance(f, dict)) \
        or "none"


def export_table(info: RunInfo) -> list[list[str]]:
    table = info.bundle.get("table", {}) if info.bundle else {}
    if not table:
        return []
    columns = [c for c in PERCENT_COLUMNS if any(c in row for row in table.values())]
    flags = info.bundle.get("flags", {})
    rows = [["format"] + [c.replace("_", " ") + " (%)" for c in columns] + ["size (MB)", "b1 (ms)", "b64 (ms)",
                                                                            "attack-failure flags"]]
    for fmt, row in table.items():
        rows.append([fmt] + [_pct(row.get(c)) for c in columns]
                    + [f"{row.get('size_mb', 0):.3f}", f"{row.get('latency_b1_ms', 0):.2f}",
                       f"{row.get('latency_b64_ms', 0):.2f}", _flag_cell(flags.get(fmt) if flags else None)])
    return rows


def _md_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out) + "\n"


def _html_table(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---- the page --------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:0.6em 0 1.4em}th,td{border:1px solid #ccc;padding:4px 9px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f2f4f7}img{max-width:100%;margin:0.4em 0}
h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.6em}.note{color:#666;font-size:0.9em}"""


def _threads(n: int | None) -> str:
    return "threads unknown" if n is None else f"{n} thread{'s' if n != 1 else ''}"


def build_report(folders: list[Path], out: Path, curve_n: int = 100, data_root: str | None = None,
                 progress=print, collected: list[RunInfo] | None = None,
                 device: torch.device | str = "auto") -> Path:
    """Write ``out/report.html``, ``out/report.md`` and ``out/report_files/*.png``; return the HTML path.
    Eps curves not cached yet are computed on ``device`` (``auto``: CUDA when present).

    ``out`` must be new, empty or a previous report, and must not hold one of the runs. ``collected``:
    runs already read by :func:`collect` with the same ``curve_n`` and ``data_root`` (the quickstart reads
    each in the worker that has just finished with it, where a QAT run's prepared graph is at hand); a
    run of ``folders`` not among them is read here."""
    from robustedge.runtime import resolve_device

    device = device if isinstance(device, torch.device) else resolve_device(str(device))
    found = find_runs(folders)
    check_output_folder(out, REPORT, replace=True, protect=found)
    runs, warnings = [], Warnings(progress)
    ready = {info.folder.resolve(): info for info in collected or []}
    for run in found:
        info = ready.get(run.resolve())
        if info is not None:
            for message in info.skipped:
                warnings.append(message)
                progress(message)
            runs.append(info)
            continue
        progress(f"reading {run}" + (" (computing the eps curve)" if curve_n and not (run / "eps_curve.json").exists()
                                     else ""))
        runs.append(collect(run, curve_n, data_root, warnings, device))
    figures: dict[str, bytes] = {}
    sections: list[tuple[str, list[tuple[str, str | list[list[str]]]]]] = []
    summary = [("table", robustness_table(runs))]
    for key, maker in (("scatter", scatter_figure), ("eps_curves", curve_figure)):
        png = maker(runs)
        if png:
            figures[key] = png
            summary.append(("figure", key))
    latency_notes = [f"{r.name}: {r.latency_ms:.2f} ms ({_threads(r.latency_threads)})" for r in runs if r.latency_ms]
    if latency_notes:
        summary.append(("note", "Latency, torch eager at batch 1 on this machine: " + "; ".join(latency_notes)))
    if warnings:
        summary.append(("note", "Skipped while reading the runs: " + "; ".join(warnings)))
    sections.append(("Summary", summary))
    for r in runs:
        key = f"training_{r.name}"
        figures[key] = training_figure(r)
        items: list[tuple[str, str | list[list[str]]]] = [("figure", key)]
        if r.history:
            last = r.history[-1]
            items.append(("note", f"{len(r.history)} epochs, {sum(h.get('seconds', 0) for h in r.history):.0f} s of "
                                  f"training, {last.get('img_per_s', 0):.0f} img/s in the last epoch"))
        if r.bundle:
            items.append(("note", f"Export bundle {r.bundle['folder']}, verified through each runtime:"))
            items.append(("table", export_table(r)))
        sections.append((f"{r.name} ({r.method} {r.arch})", items))

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", {"format": REPORT_FORMAT, "runs": [str(r.folder) for r in runs],
                                            "warnings": list(warnings)})
    for key, png in figures.items():
        atomic_write_bytes(out / "report_files" / f"{key}.png", png)
    title = "RobustEdge report: " + ", ".join(str(f) for f in folders)
    md = [f"# {title}\n"]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, items in sections:
        md.append(f"## {heading}\n")
        body.append(f"<h2>{html.escape(heading)}</h2>")
        for kind, value in items:
            if kind == "table":
                md.append(_md_table(value))  # type: ignore[arg-type]
                body.append(_html_table(value))  # type: ignore[arg-type]
            elif kind == "figure":
                md.append(f"![{value}](report_files/{value}.png)\n")
                data = base64.b64encode(figures[value]).decode()  # type: ignore[index]
                body.append(f'<img alt="{value}" src="data:image/png;base64,{data}">')
            else:
                md.append(f"{value}\n")
                body.append(f'<p class="note">{html.escape(str(value))}</p>')
    atomic_write_text(out / "report.md", "\n".join(md))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"
