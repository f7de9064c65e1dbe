"""``robustedge verify``: a bundle's checks run again through each runtime, the report beside the bundle.

The same replays as the bundle's own ``verify.py`` (the torch-free :mod:`robustedge.verifier`), plus
what needs the library: a fresh Square attack on each runtime (``square_n``), the comparison flags
recomputed, and replays on other processors under emulation (:mod:`robustedge.edge.emulation`). The
report goes to ``<bundle>-verify`` (or ``--out``), never into the bundle, whose files its manifest
hashes and which a device may hold read-only.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from robustedge.edge.formats import available
from robustedge.errors import RobustEdgeError
from robustedge.files import atomic_write_json, atomic_write_text
from robustedge.flags import square_examples
from robustedge.verifier import (Gate, accuracy_row, artifact_row, bundle_flags, format_flags,
                                 format_table, platform_facts, predict, read_bundle)


def verify_out(bundle: str | Path, out: str | Path | None = None, flag: str = "--out") -> Path:
    """Where `robustedge verify` writes its report: ``out``, by default ``<bundle>-verify`` beside the bundle;
    never inside the bundle, whose files its manifest hashes and which a device may hold read-only."""
    absolute = Path(os.path.abspath(bundle))  # `verify .` is named for the folder itself; a link keeps its name
    if out is not None and not str(out).strip():
        raise RobustEdgeError(f"{flag} must be a folder path, got an empty one")
    folder = Path(out) if out is not None else absolute.parent / f"{absolute.name}-verify"
    inside = folder.resolve()
    if inside == absolute.resolve() or absolute.resolve() in inside.parents:
        raise RobustEdgeError(f"{flag} {folder} is inside the bundle {bundle}; verify never writes into a bundle, "
                              f"choose a folder outside it")
    from robustedge.files import check_output_files

    check_output_files(folder, VERIFY_OUTPUTS, flag)
    parent = next(p for p in [folder.absolute(), *folder.absolute().parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RobustEdgeError(f"{flag} {folder}: {parent} is not a folder this process can write into")
    return folder


def _is_verify_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"table", "flags", "gate", "gate_failures", "verified"} <= set(data)


def _is_verify_md(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8").startswith("| format |")
    except (OSError, UnicodeDecodeError):
        return False


VERIFY_OUTPUTS = {"verify.json": _is_verify_json, "verify.md": _is_verify_md}  # what verify may overwrite


def verify_bundle(bundle: str | Path, gate: Gate | None = None, square_n: int | None = None,
                  progress=print, out: str | Path | None = None, out_flag: str = "--out",
                  emulate: tuple[str, ...] | str | None = None) -> tuple[dict, list[str]]:
    """Re-run a bundle's checks through each runtime: replays of every stored example set (the same
    as the bundle's own ``verify.py``), the comparison flags recomputed, the gradient checks as recorded
    at export. ``square_n`` > 0 runs a fresh Square attack on each runtime instead of replaying the
    stored one; the torch row comes from the manifest. The report goes to :func:`verify_out` (``out``,
    default ``<bundle>-verify`` beside the bundle), never into the bundle. ``emulate``: processors to replay
    on as well, under emulation (None: those the export replayed on; ``()``: none)."""
    from robustedge.edge.emulated_env import parse_isas

    bundle = Path(bundle)
    manifest, samples = read_bundle(bundle)
    folder = verify_out(bundle, out, out_flag)
    isas = parse_isas(manifest.get("emulated", {}).get("isas", []) if emulate is None else emulate)
    if isas:  # an old verifier, or a processor that cannot be emulated here, refused before the replays
        from robustedge.edge.emulation import prepare_for

        prepare_for(bundle, isas, progress)  # checks the cache folder too
    options = manifest["options"]
    gate = gate or Gate.from_dict(manifest["gate"])
    if square_n is not None and (not isinstance(square_n, int) or square_n < 0):
        raise RobustEdgeError(f"square-n must be an integer >= 0, got {square_n!r}")
    table = {"torch": manifest["table"]["torch"]}
    flags = {"torch": manifest.get("flags", {}).get("torch", [])}
    for fmt, entry in manifest["files"].items():
        ok, why = available(fmt)  # the runtime its row needs
        if not ok:
            progress(f"skipping {fmt}: {why}")
            continue
        progress(f"verifying {fmt} through its runtime")
        row, results, runner = artifact_row(bundle / entry["file"], fmt, samples)
        if square_n is not None:
            results.pop("square", None)
            if square_n > 0:
                fresh = square_examples(runner, samples, manifest["eps"], min(square_n, len(samples["y"])),
                                        options["square_queries"], options["seed"], what=fmt)
                results["square"] = predict(runner, fresh, what=fmt).argmax(1) == samples["y"][:len(fresh)]
            row = {k: v for k, v in row.items() if k not in ("square", "worst")} | accuracy_row(results)
        for key in ("twin_agreement", "twin_max_logit_diff", "max_abs_logit_diff"):
            if key in manifest["table"].get(fmt, {}):
                row[key] = manifest["table"][fmt][key]
        table[fmt] = row
        flags[fmt] = bundle_flags(manifest, fmt, results, gate.flag_tolerance)
    report = {"table": table, "flags": flags, "gate": gate.to_dict(), "gate_failures": gate.check(table, flags),
              "verified": time.strftime("%Y-%m-%dT%H:%M:%S"), "platform": platform_facts()}
    if isas:
        from robustedge.edge.emulation import add_emulated_rows, emulated_rows

        add_emulated_rows(report, emulated_rows(bundle, isas, progress=progress), gate)
    failures = report["gate_failures"]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobustEdgeError(f"cannot create {folder}: {exc.strerror or exc}") from None
    atomic_write_json(folder / "verify.json", report)
    atomic_write_text(folder / "verify.md", format_table(report["table"]) + "\n" + format_flags(report["flags"]))
    report["out"] = str(folder)
    return report, failures
