"""A bundle replayed on another processor's builds of its runtimes, under user-mode emulation.

A bundle's table is measured on this machine's kernels (ONNX Runtime's x86 INT8 paths, say). Phones
and Jetsons run the arm64 builds of the same runtimes, whose kernels round differently in places. So
``--emulate arm64`` runs the bundle's own ``verify.py`` (the very file a device runs) inside an arm64
environment on this machine (:mod:`robustedge.edge.emulated_env`: Debian's arm64 Python and the
aarch64 wheels of numpy and ONNX Runtime, executed by qemu's user-mode emulator). It compares every
logit with the same file's replay on this machine under the same ONNX Runtime release (its x86 wheel,
kept in the environment: the comparison is the processors', not the releases'), and the emulated rows,
named ``<format>@<isa>``, join the table the gate checks (docs/design/export.md, "Export, bundles and
verification"). Latency under emulation times the emulator, not the processor: emulated rows have none.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from robustedge.edge.emulated_env import RUNTIMES, WITHOUT, Environment, prepare
from robustedge.errors import RobustEdgeError
from robustedge.verifier import FORMATS, MANIFEST_FILE, VERIFIER_FILE


REPLAY_TIMEOUT = 4 * 3600  # a hung emulator is an error, not a wait without end
HOST_ONLY = ("twin_agreement", "twin_max_logit_diff")  # measured against this machine's runtime at export
COMPARISON_FLAGS = ("blackbox_below_whitebox", "transfer_below_whitebox")  # recomputed from each replay


def check_verifier(bundle: Path) -> None:
    """The bundle's ``verify.py`` writes what a comparison needs (``--logits``); refused before any replay."""
    if "--logits" not in (Path(bundle) / VERIFIER_FILE).read_text(encoding="utf-8"):
        raise RobustEdgeError(f"{Path(bundle).name}'s verify.py predates replays on other processors; export the "
                              f"bundle again with this RobustEdge to replay it under emulation (or --emulate none)")


def run_verifier(bundle: Path, formats: list[str], out: Path, env: Environment | None = None,
                 timeout: float = REPLAY_TIMEOUT, host_env: dict | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The bundle's own ``verify.py`` on ``formats``, under ``env`` (None: this machine's Python, with
    ``host_env`` as its environment), without latency: (its JSON report, its logits). Exit 1 (a failed
    gate) is a result; anything else is an error."""
    bundle = Path(bundle).resolve()
    check_verifier(bundle)
    report, logits = out / "report.json", out / "logits.npz"
    args = [str(bundle), "--formats", ",".join(formats), "--no-latency", "--json", str(report), "--logits", str(logits)]
    where = f"the {env.isa.name} replay" if env else "the replay on this machine"
    if env is None:
        cmd, run_env = [sys.executable, "-s", "-B", str(bundle / VERIFIER_FILE), *args], host_env
    else:
        cmd, run_env = env.python(str(bundle / VERIFIER_FILE), *args), env.env()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=run_env)
    except subprocess.TimeoutExpired:
        raise RobustEdgeError(f"{where} gave no answer after {timeout:.0f} s") from None
    if done.returncode not in (0, 1) or not report.is_file() or not logits.is_file():
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise RobustEdgeError(f"{where} failed (exit {done.returncode}): "
                              f"{lines[-1].strip() if lines else 'no message'}")
    with np.load(logits, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    result = json.loads(report.read_text(encoding="utf-8"))
    missing = {f: why for f, why in result["skipped"].items() if f in formats}
    if missing:  # the environment was made for these runtimes: one that fails to import is a broken cache
        fmt, why = next(iter(missing.items()))
        raise RobustEdgeError(f"{where} could not run {fmt}: {why}" + (
            f"; the environment in {env.folder} is damaged: delete it to prepare it again" if env else ""))
    return result, arrays


def compare_logits(host: dict[str, np.ndarray], other: dict[str, np.ndarray], fmt: str) -> dict:
    """Top-1 agreement and max |logit difference| of one format's replays on two processors, over every
    input both replayed (clean, transfer, white-box, Square)."""
    keys = sorted(k for k in host if k.startswith(f"{fmt}/") and k in other)
    if not keys:
        raise RobustEdgeError(f"{fmt}: no replay to compare between the two processors")
    a = np.concatenate([host[k] for k in keys])
    b = np.concatenate([other[k] for k in keys])
    return {"isa_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "isa_max_logit_diff": float(np.abs(a - b).max()), "isa_compared": int(len(a))}


def runnable(formats: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the formats an emulated environment can replay, {format: why not})."""
    ok = [f for f in formats if FORMATS[f].runtime in RUNTIMES]
    return ok, {f: WITHOUT.get(FORMATS[f].runtime, f"no {FORMATS[f].runtime} build runs under emulation")
                for f in formats if f not in ok}


def prepare_for(bundle: Path, isas: tuple[str, ...], progress=print, cache: Path | None = None) -> None:
    """Everything an emulated replay of ``bundle`` needs, checked (and prepared) before the long work starts:
    a verifier that writes logits, and each ISA's environment when any file can run there."""
    check_verifier(bundle)
    manifest = json.loads((Path(bundle) / MANIFEST_FILE).read_text(encoding="utf-8"))
    if runnable(list(manifest["files"]))[0]:
        for isa in isas:
            prepare(isa, cache, progress)


def emulated_rows(bundle: Path, isas: tuple[str, ...], progress=print, cache: Path | None = None,
                  formats: list[str] | None = None) -> dict:
    """Every format of ``bundle`` replayed on each emulated ISA beside this machine: ``{"table": {"<fmt>@<isa>":
    row}, "flags": {...}, "platforms": {...}, "skipped": {...}, "seconds": {...}}``. Each row is what the
    bundle's verifier measured there (its comparison flags recomputed there; the twin's figures and the
    gradient checks were measured on this machine and stay on the format's own row), plus its agreement
    with the same file's replay here under the same ONNX Runtime release."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text(encoding="utf-8"))
    formats, skipped = runnable(formats or list(manifest["files"]))
    result = {"isas": list(isas), "table": {}, "flags": {}, "platforms": {}, "seconds": {},
              "skipped": {f"{fmt}@{isa}": why for fmt, why in skipped.items() for isa in isas}}
    if not formats:
        return result
    with tempfile.TemporaryDirectory(prefix="robustedge-emulate-") as scratch:
        scratch = Path(scratch)
        for isa in isas:
            start = time.perf_counter()
            env = prepare(isa, cache, progress)
            result["seconds"][f"{isa}_setup"] = round(time.perf_counter() - start, 1)
            (scratch / f"{isa}-host").mkdir()
            (scratch / isa).mkdir()
            progress(f"replaying {', '.join(formats)} on this machine with onnxruntime "
                     f"{env.runtimes()['onnxruntime']} (the reference for {isa})")
            host_report, host_logits = run_verifier(bundle, formats, scratch / f"{isa}-host", host_env=env.host_env())
            progress(f"replaying {', '.join(formats)} on {isa} (emulated: {env.facts['qemu_version']}, "
                     f"cpu {env.isa.cpu}); no latency")
            start = time.perf_counter()
            report, logits = run_verifier(bundle, formats, scratch / isa, env)
            result["seconds"][f"{isa}_replay"] = round(time.perf_counter() - start, 1)
            if report["platform"]["isa"] != env.isa.machine:
                raise RobustEdgeError(f"the {isa} replay reported processor {report['platform']['isa']!r}, "
                                      f"not {env.isa.machine!r}")
            result["platforms"][f"{isa}_reference"] = host_report["platform"]
            result["platforms"][isa] = report["platform"] | {"emulator": env.facts["qemu_version"],
                                                             "cpu": env.isa.cpu, "debian": env.facts["debian"]}
            for fmt in formats:
                row = {k: v for k, v in report["table"][fmt].items() if k not in HOST_ONLY}
                result["table"][f"{fmt}@{isa}"] = row | compare_logits(host_logits, logits, fmt)
                result["flags"][f"{fmt}@{isa}"] = [f for f in report["flags"].get(fmt, [])
                                                   if f["check"] in COMPARISON_FLAGS]
    return result


def add_emulated_rows(report: dict, emulated: dict, gate) -> None:
    """The rows of an emulated replay (``<format>@<isa>``) into a manifest or verify report, each after its
    format's row, and the gate applied again to the whole table."""
    table = {}
    for name, row in report["table"].items():
        table[name] = row
        table |= {k: v for k, v in emulated["table"].items() if k.split("@")[0] == name}
    report["table"] = table
    report["flags"] = report.get("flags", {}) | emulated["flags"]
    report["emulated"] = {"isas": sorted({k.split("@")[1] for k in emulated["table"]} | set(emulated["isas"])),
                          "platforms": emulated["platforms"], "skipped": emulated["skipped"],
                          "seconds": emulated["seconds"]}
    report["gate_failures"] = gate.check(report["table"], report["flags"])
