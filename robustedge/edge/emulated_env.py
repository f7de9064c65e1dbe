"""The emulated environment a bundle is replayed in: another processor's Python and runtime builds.

Prepared once per cache folder (``$ROBUSTEDGE_CACHE``, else ``$XDG_CACHE_HOME/robustedge``, else
``~/.cache/robustedge``), by one process at a time, with the real
tools, never a re-implementation: ``apt-get`` with a private state folder (the host's package state is
never touched) downloads and verifies Debian's signed packages, ``dpkg-deb`` unpacks them, and
``pip install --target --platform`` fetches the wheels. qemu comes from the system
(``qemu-user-static``) or, where the system has apt but not qemu, from its package unpacked into
the cache. ONNX Runtime is the newest release whose build for the processor runs a probe model under
this qemu (measured: 1.28 and newer crash at import under Debian's qemu 7.2), found by bisection and
recorded in ``environment.json``; ``$ROBUSTEDGE_EMULATE_ONNXRUNTIME`` pins one release instead. The
environment is built in a temporary folder and renamed into place, so a killed setup leaves nothing
half-made behind.

ExecuTorch is not among the runtimes (:data:`WITHOUT` says why, as measured): ``.pte`` files are
reported as not replayed, with that reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from robustedge.errors import RobustEdgeError
from robustedge.files import atomic_write_json, clean_stale_temps, make_temp_dir


@dataclass(frozen=True)
class EmulatedIsa:
    """One processor family a bundle can be replayed on: its emulator and where its builds come from."""

    name: str  # as the CLI names it
    machine: str  # what platform.machine() reports inside (the proof that the replay ran there)
    qemu: str  # the user-mode emulator's executable
    debian_arch: str  # Debian's name for the architecture
    wheel_platforms: tuple[str, ...]  # pip platform tags of its wheels, most specific first
    cpu: str = "max"  # qemu's CPU model: every extension the emulator knows (dot product, i8mm, SVE)


ISAS = {
    "arm64": EmulatedIsa("arm64", "aarch64", "qemu-aarch64-static", "arm64",
                         ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")),
}
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"  # its python3.11 is the Python the wheels are chosen for
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
DEBIAN_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgomp1")
PYTHON_VERSION = "3.11"
ONNXRUNTIME_FLOOR = (1, 20)  # the oldest release tried: opset 18 and the QDQ operators the bundles use
PIN_VARIABLE = "ROBUSTEDGE_EMULATE_ONNXRUNTIME"  # one release to take instead of the bisection (e.g. 1.27.0)
ENVIRONMENT_FILE = "environment.json"
# runtimes an environment cannot hold, and why (measured with executorch 1.5.1 under qemu 7.2.22: its aarch64
# Python runtime links the libtorch it was built against and imports in about two minutes with torch 2.10.0's
# CPU wheel, but then fails at execution, "tensor does not have a device"; torch 2.9.1 lacks one of its symbols;
# and PyPI's torch 2.11.0 for aarch64 is a CUDA build that needs the CUDA libraries to import)
RUNTIMES = ("onnxruntime",)  # what an environment holds
WITHOUT = {"executorch": "ExecuTorch's aarch64 Python runtime needs the exact torch build it links, which PyPI has "
                         "only with CUDA for aarch64 (run the bundle's verify.py on the device itself)"}
SETUP_TIMEOUT = 900
PROBE_TIMEOUT = 180


def parse_isas(value) -> tuple[str, ...]:
    """``arm64`` / ``["arm64"]`` / ``none`` / ``()``: the processor families named, each known; anything else
    (an empty name, a number) is refused in one line."""
    if isinstance(value, str):
        names = [v.strip() for v in value.split(",")]
        if value.strip().lower() == "none":
            return ()
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        names = [v.strip() for v in value]
    else:
        raise RobustEdgeError(f"emulate must name processor families (arm64) or none, got {value!r}")
    if any(not v for v in names):
        raise RobustEdgeError(f"emulate must name processor families (arm64) or none, got {value!r}")
    for name in names:
        if name not in ISAS:
            raise RobustEdgeError(f"unknown emulated processor '{name}'; known: {', '.join(ISAS)}")
    return tuple(dict.fromkeys(names))


def cache_folder() -> Path:
    """Where prepared environments live: ``$ROBUSTEDGE_CACHE``, else ``$XDG_CACHE_HOME/robustedge``; refused
    (one line) when it is not a folder, before anything runs."""
    if os.environ.get("ROBUSTEDGE_CACHE"):
        folder = Path(os.environ["ROBUSTEDGE_CACHE"])
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robustedge"
    folder = folder.absolute()
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise RobustEdgeError(f"the cache folder {folder} ($ROBUSTEDGE_CACHE) is not a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RobustEdgeError(f"the cache folder {folder} ($ROBUSTEDGE_CACHE) cannot be written: {existing} is not "
                              f"writable by this process")
    return folder


@dataclass
class Environment:
    """A prepared emulated environment: its folder and what it holds (``environment.json``)."""

    folder: Path
    facts: dict

    @property
    def isa(self) -> EmulatedIsa:
        return ISAS[self.facts["isa"]]

    def runtimes(self) -> dict[str, str]:
        return self.facts["runtimes"]

    def complete(self) -> bool:
        """Everything ``environment.json`` lists is there (a cache someone pruned is prepared again)."""
        return (Path(self.facts["qemu"]).is_file() and (self.folder / "root/usr/bin/python3.11").is_file()
                and all((self.folder / site).is_dir() for site in self.facts["sites"])
                and (self.folder / self.facts["host_site"]).is_dir())

    def host_env(self) -> dict[str, str]:
        """This machine's Python with the x86 wheel of the emulated environment's ONNX Runtime release: the
        reference an emulated replay is compared with, so the comparison is the processors', not the releases'."""
        return os.environ | {"PYTHONPATH": str(self.folder / self.facts["host_site"]), "PYTHONNOUSERSITE": "1"}

    def python(self, *args: str) -> list[str]:
        """The emulated Python's command line (``-s -B``: no user site, no bytecode written)."""
        root = self.folder / "root"
        return [self.facts["qemu"], "-cpu", self.isa.cpu, "-L", str(root), str(root / "usr/bin/python3.11"), "-s",
                "-B", *args]

    def env(self) -> dict[str, str]:
        sites = [str(self.folder / site) for site in self.facts["sites"]]
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": os.pathsep.join(sites),
                "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "HOME": str(self.folder),
                "LANG": "C.UTF-8"}


def _run(cmd: list[str], what: str, timeout: float = SETUP_TIMEOUT, **kwargs) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except FileNotFoundError:
        raise RobustEdgeError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise RobustEdgeError(f"{what}: no answer after {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()
                 and not line.startswith(("W:", "WARNING:"))]
        raise RobustEdgeError(f"{what} failed: {lines[-1].strip() if lines else f'exit {done.returncode}'}")
    return done


def _apt_options(apt: Path, arch: str | None) -> list[str]:
    """apt-get reading and writing only ``apt``: its own sources list, package state and cache."""
    options = {"Dir::Etc::SourceList": apt / "sources.list", "Dir::Etc::SourceParts": "/dev/null",
               "Dir::Etc::Preferences": "/dev/null", "Dir::Etc::PreferencesParts": "/dev/null",
               "Dir::State": apt / "state", "Dir::State::status": apt / "state/status", "Dir::Cache": apt / "cache",
               "Debug::NoLocking": "1", "APT::Sandbox::User": "root" if os.geteuid() == 0 else ""}
    if arch:
        options |= {"APT::Architecture": arch, "APT::Architectures": arch}
    return [arg for key, value in options.items() if value != "" for arg in ("-o", f"{key}={value}")]


def _debian_packages(folder: Path, arch: str, packages: tuple[str, ...], progress) -> list[Path]:
    """Debian's signed packages (and what they depend on) for ``arch``, downloaded into ``folder``."""
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RobustEdgeError("preparing an emulated environment needs apt-get and dpkg-deb (Debian or Ubuntu)")
    if not DEBIAN_KEYRING.is_file():
        raise RobustEdgeError(f"Debian's archive keyring is missing ({DEBIAN_KEYRING}): "
                              f"install the package debian-archive-keyring")
    apt = folder / "apt"
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "state/status").touch()
    (apt / "sources.list").write_text(
        f"deb [arch={arch} signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
        f"deb [arch={arch} signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR}-security {DEBIAN_SUITE}-security main\n")
    options = _apt_options(apt, arch)
    progress(f"  Debian {DEBIAN_SUITE} {arch} package lists (apt-get, private state)")
    _run(["apt-get", *options, "update"], "apt-get update")
    progress(f"  downloading {', '.join(packages)} and their dependencies")
    _run(["apt-get", *options, "-y", "--download-only", "--no-install-recommends", "install", *packages],
         "apt-get install --download-only")
    return sorted((apt / "cache/archives").glob("*.deb"))


def _unpack(debs: list[Path], root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")


def find_qemu(isa: EmulatedIsa, cache: Path, progress) -> Path:
    """The system's user-mode emulator, or Debian's package of it unpacked into the cache."""
    found = shutil.which(isa.qemu)
    if found:
        return Path(found)
    own = cache / "qemu" / "usr/bin" / isa.qemu
    if own.is_file():
        return own
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RobustEdgeError(f"{isa.qemu} not found: install qemu-user-static from your system's packages "
                              f"(Debian/Ubuntu: apt-get install qemu-user-static; Fedora: dnf install qemu-user-static)")
    progress(f"{isa.qemu} is not installed: unpacking the system's qemu-user-static package into {cache / 'qemu'}")
    cache.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(cache)
    tmp = make_temp_dir(cache / "qemu")
    try:
        try:
            _run(["apt-get", "download", "qemu-user-static"], "apt-get download qemu-user-static", cwd=tmp)
        except RobustEdgeError as exc:
            raise RobustEdgeError(f"{isa.qemu} not found and {exc}; install qemu-user-static from your system's "
                                  f"packages (Debian/Ubuntu: apt-get install qemu-user-static)") from None
        _unpack(sorted(tmp.glob("*.deb")), tmp / "unpacked")
        if not (tmp / "unpacked/usr/bin" / isa.qemu).is_file():
            raise RobustEdgeError(f"Debian's qemu-user-static has no {isa.qemu}")
        try:
            (tmp / "unpacked").rename(cache / "qemu")
        except OSError:  # another process unpacked it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return own


def _pip_target(target: Path, isa: EmulatedIsa, requirements: list[str]) -> None:
    """Wheels built for ``isa`` into ``target`` (pip resolves and downloads; nothing runs on this machine)."""
    platforms = [arg for tag in isa.wheel_platforms for arg in ("--platform", tag)]
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
          "--target", str(target), "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp",
          *platforms, "--no-deps", *requirements], f"pip install {' '.join(requirements)}")


def _released(package: str, isa: EmulatedIsa) -> list[str]:
    """Every release of ``package`` with a wheel for ``isa`` and this Python, newest first."""
    platforms = [arg for tag in isa.wheel_platforms for arg in ("--platform", tag)]
    done = _run([sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check",
                 "--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms],
                f"pip index versions {package}", timeout=120)
    for line in done.stdout.splitlines():
        if line.strip().startswith("Available versions:"):
            return [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
    raise RobustEdgeError(f"pip lists no {package} release for {isa.name}")


def _release_key(version: str) -> tuple[int, ...]:
    parts = [int(part) if part.isdigit() else -1 for part in version.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))  # 1.27 is 1.27.0


PROBE = r'''
import sys
import numpy as np
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 12)
got = session.run(None, {"x": x})[0]
want = np.maximum(x @ np.load(sys.argv[2]), 0)
assert np.allclose(got, want, atol=1e-5), "wrong result"
print(ort.__version__)
'''


def _probe_model(folder: Path) -> tuple[Path, Path]:
    """A one-MatMul ONNX model (opset 18) and its weights: what an ONNX Runtime build must run correctly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                              "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 5])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "probe.onnx")
    np.save(folder / "probe_w.npy", w)
    return folder / "probe.onnx", folder / "probe_w.npy"


def _try_onnxruntime(folder: Path, facts: dict, version: str, probe: tuple[Path, Path]) -> str | None:
    """None when ONNX Runtime ``version`` runs the probe under emulation; else why not (one line)."""
    site = folder / f"site-onnxruntime-{version}"
    _pip_target(site, ISAS[facts["isa"]], [f"onnxruntime=={version}"])  # a download that fails is an error
    env = Environment(folder, facts | {"sites": ["site", site.name]})
    script = folder / "probe.py"
    script.write_text(PROBE)
    try:
        done = subprocess.run(env.python(str(script), str(probe[0]), str(probe[1])), capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT, env=env.env())
    except subprocess.TimeoutExpired:  # a slow machine, not a verdict on the release
        shutil.rmtree(site, ignore_errors=True)
        raise RobustEdgeError(f"onnxruntime {version} gave no answer under the emulator after {PROBE_TIMEOUT} s; "
                              f"try again on a less loaded machine") from None
    else:
        answer = done.stdout.strip().split()[-1] if done.stdout.strip() else ""
        if done.returncode == 0 and _release_key(answer) == _release_key(version):
            return None
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit {done.returncode}"
        if done.returncode < 0 or "signal" in why:
            why = f"crashed ({why})"
    shutil.rmtree(site, ignore_errors=True)
    return why


def _choose_onnxruntime(folder: Path, facts: dict, progress) -> str:
    """The newest ONNX Runtime release whose build for the ISA runs the probe under this emulator (bisection
    over the releases since :data:`ONNXRUNTIME_FLOOR`, assuming a release that runs follows one that runs)."""
    isa = ISAS[facts["isa"]]
    pinned = os.environ.get(PIN_VARIABLE, "").strip()
    if pinned:
        probe = _probe_model(folder)
        progress(f"  onnxruntime {pinned} (${PIN_VARIABLE}) under the emulator")
        why = _try_onnxruntime(folder, facts, pinned, probe)
        if why:
            raise RobustEdgeError(f"onnxruntime {pinned} (${PIN_VARIABLE}) does not run under the {isa.name} "
                                  f"emulator: {why}")
        return pinned
    releases = sorted((v for v in _released("onnxruntime", isa) if _release_key(v) >= ONNXRUNTIME_FLOOR
                       and all(p.isdigit() for p in v.split("."))), key=_release_key)
    if not releases:
        raise RobustEdgeError(f"no ONNX Runtime release >= {'.'.join(map(str, ONNXRUNTIME_FLOOR))} for {isa.name}")
    probe = _probe_model(folder)
    rejected = facts.setdefault("rejected", {})

    def runs(version: str) -> bool:
        progress(f"  trying onnxruntime {version} ({isa.name} wheel) under the emulator")
        why = _try_onnxruntime(folder, facts, version, probe)
        if why:
            rejected[f"onnxruntime {version}"] = why
            progress(f"    onnxruntime {version}: {why}")
        return why is None

    if runs(releases[-1]):
        return releases[-1]
    if not runs(releases[0]):
        raise RobustEdgeError(f"no ONNX Runtime build for {isa.name} runs under {facts['qemu']}: "
                              f"{rejected[f'onnxruntime {releases[0]}']}")
    good, bad = 0, len(releases) - 1
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if runs(releases[middle]) else (good, middle)
    for version in releases[:good]:  # none left behind but the chosen one
        shutil.rmtree(folder / f"site-onnxruntime-{version}", ignore_errors=True)
    return releases[good]


def _qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


@contextlib.contextmanager
def _preparing(folder: Path):
    """One process prepares an environment at a time (``<folder>.lock``); a second waits, then finds it made."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = open(folder.with_name(folder.name + ".lock"), "a")
    except OSError as exc:
        raise RobustEdgeError(f"cannot prepare {folder}: {exc.strerror or exc}") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _cached(folder: Path) -> Environment | None:
    try:
        env = Environment(folder, json.loads((folder / ENVIRONMENT_FILE).read_text(encoding="utf-8")))
        return env if env.complete() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(isa: str = "arm64", cache: Path | None = None, progress=print) -> Environment:
    """The emulated environment for ``isa``, prepared once per cache folder (minutes; about 200 MB, and the
    qemu package's 370 MB where the system has no qemu)."""
    names = parse_isas(isa)
    if len(names) != 1:
        raise RobustEdgeError(f"prepare one emulated processor at a time, got {isa!r}")
    spec = ISAS[names[0]]
    cache = Path(cache).absolute() if cache is not None else cache_folder()
    folder = cache / "emulate" / spec.name
    env = _cached(folder)
    if env is not None:
        return env
    with _preparing(folder):
        env = _cached(folder)  # another process may have made it while this one waited
        if env is not None:
            return env
        if folder.exists():
            progress(f"the {spec.name} environment in {folder} is incomplete; preparing it again")
        try:
            return _prepare(spec, cache, folder, progress)
        except OSError as exc:
            raise RobustEdgeError(f"preparing the {spec.name} environment in {folder} failed: "
                                  f"{exc.strerror or exc}") from None


def _prepare(spec: EmulatedIsa, cache: Path, folder: Path, progress) -> Environment:
    qemu = find_qemu(spec, cache, progress)
    progress(f"preparing the {spec.name} environment in {folder} (once; later runs reuse it)")
    clean_stale_temps(folder.parent)
    tmp = make_temp_dir(folder)
    start = time.perf_counter()
    try:
        debs = _debian_packages(tmp, spec.debian_arch, DEBIAN_PACKAGES, progress)
        _unpack(debs, tmp / "root")
        shutil.rmtree(tmp / "apt")
        facts = {"isa": spec.name, "qemu": str(qemu), "qemu_version": _qemu_version(str(qemu)), "cpu": spec.cpu,
                 "debian": f"{DEBIAN_SUITE} ({len(debs)} packages)", "sites": ["site"], "runtimes": {}}
        progress(f"  numpy ({spec.name} wheel)")
        _pip_target(tmp / "site", spec, ["numpy"])
        version = _choose_onnxruntime(tmp, facts, progress)
        facts["sites"].append(f"site-onnxruntime-{version}")
        facts["runtimes"]["onnxruntime"] = version
        progress(f"  onnxruntime {version} for this machine too (the reference of the comparison)")
        facts["host_site"] = f"host-onnxruntime-{version}"
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target",
              str(tmp / facts["host_site"]), "--only-binary=:all:", "--no-deps", f"onnxruntime=={version}"],
             f"pip install onnxruntime=={version} (this machine's wheel)")
        for name in ("probe.onnx", "probe_w.npy", "probe.py"):
            (tmp / name).unlink(missing_ok=True)
        staged = Environment(tmp, facts)
        facts["python"] = _run(staged.python("-c", "import platform; print(platform.python_version())"),
                               "the emulated Python", env=staged.env()).stdout.strip()
        facts["setup_seconds"] = round(time.perf_counter() - start, 1)
        atomic_write_json(tmp / ENVIRONMENT_FILE, facts)
        if folder.exists():  # incomplete (checked under the lock): ours replaces it
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress(f"prepared in {facts['setup_seconds']:.0f} s: Python {facts['python']}, onnxruntime {version}")
    return Environment(folder, facts)
