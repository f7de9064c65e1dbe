"""Files on disk: atomic writes, temp files that name their writer, and who owns an output folder.

Three rules keep a user's data safe (docs/design.md, "Files"):

1. Every file is written to a temporary name beside its target and renamed over it, so a reader
   never sees half a file and a crash leaves the old one intact.
2. A temporary name says who wrote it: ``.<target>.tmp-<host>-<pid>-<start>-<random>``, where
   ``start`` is the writer's process start time. A later writer in the same folder removes the
   temporaries of writers that are provably dead (same host, and no process with that pid and
   start time), so killed runs do not pile up hundreds of MB; a live writer's file, another
   host's, or a name we did not make is never touched.
3. A command replaces or writes into an output folder only if RobustEdge made it (its marker file
   says so) and the folder does not hold the command's own input: anything else is a one-line
   refusal, before any byte is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from robustedge.errors import RobustEdgeError

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TEMP = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}$")


# --------------------------------------------------------------------------------------------
# Writers and their temporaries
# --------------------------------------------------------------------------------------------

def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), 0 where unknown, None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return int(fields[19])  # field 22 of stat(5); fields[0] is field 3
    except FileNotFoundError:
        return None
    except (OSError, IndexError, ValueError):  # not Linux: fall back to "exists"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
        return 0


_OWN_START = _start_time(os.getpid()) or 0


def temp_name(target: str) -> str:
    """A hidden name beside ``target`` that identifies this process as its writer."""
    return f".{target}.tmp-{_HOST}-{os.getpid()}-{_OWN_START}-{secrets.token_hex(4)}"


def writer_identity() -> dict:
    """This process as a writer: what a marker records so a reader can tell whether it still runs."""
    return {"host": _HOST, "pid": os.getpid(), "start": _OWN_START}


def writer_alive(host: str, pid: int, start: int) -> bool:
    """Whether the writer of a temporary may still be running (always True for other hosts)."""
    if host != _HOST:
        return True
    now = _start_time(pid)
    return now is not None and (start == 0 or now in (0, start))


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries (files or folders) of dead RobustEdge writers in ``folder``; return them."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if not match or writer_alive(match["host"], int(match["pid"]), int(match["start"])):
            continue
        path = Path(entry.path)
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    Readers never see a half-written file and a crash leaves the old file intact; the temporaries
    of writers that died earlier in the same folder are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp = path.with_name(temp_name(path.name))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def make_temp_dir(beside: Path) -> Path:
    """A new hidden folder next to ``beside`` (for outputs assembled and then renamed into place)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(beside.parent)
    tmp = beside.with_name(temp_name(beside.name))
    tmp.mkdir()
    return tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
                             + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    """JSON from a file, or a one-line error naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RobustEdgeError(f"{path} is not a readable JSON file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


# --------------------------------------------------------------------------------------------
# Output folders: what a command may replace
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputKind:
    """A kind of folder RobustEdge writes, recognised by a marker file inside it."""

    name: str  # "export bundle", "quickstart folder", ...
    marker: str  # the file that says RobustEdge made the folder
    format: str  # the marker's "format" value
    legacy: Callable[[Path], bool] | None = None  # folders written before the marker had a format key

    def owns(self, folder: Path) -> bool:
        marker = folder / self.marker
        if not marker.is_file():
            return False
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        if isinstance(data, dict) and data.get("format") == self.format:
            return True
        return bool(self.legacy and self.legacy(folder))


def _inside_or_same(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_output_folder(out: Path, kind: OutputKind, *, replace: bool, protect: Sequence[Path] = (),
                        flag: str = "--out") -> None:
    """Refuse (one line) unless ``out`` may be created, or replaced as a whole by a new ``kind``.

    ``out`` may be new or an empty folder. A non-empty folder may be replaced only when ``replace``
    is set and RobustEdge made it as ``kind``; never when it contains or is one of the ``protect``
    paths (the command's inputs).
    """
    if out.exists() and not out.is_dir():
        raise RobustEdgeError(f"{flag} {out} is an existing file, not a folder; choose a folder path")
    for path in protect:
        if _inside_or_same(path, out):
            raise RobustEdgeError(f"{flag} {out} contains {path}, an input of this command; choose another {flag}")
    if out.is_dir() and any(out.iterdir()):
        if not kind.owns(out):
            raise RobustEdgeError(f"{flag} {out} is not empty and is not a RobustEdge {kind.name} (no {kind.marker} "
                                  f"made by RobustEdge); refusing to touch it, choose another {flag}")
        if not replace:
            raise RobustEdgeError(f"{flag} {out} already holds a RobustEdge {kind.name}; pass --force to replace it")


def replace_folder(tmp: Path, out: Path, kind: OutputKind, replace: bool) -> None:
    """Move the finished folder ``tmp`` to ``out``; with ``replace``, over a previous ``kind`` there.

    The old folder is first renamed aside and removed only after the new one is in place. If another
    writer created ``out`` while this one worked (two exports racing to the same new folder), this
    one loses with a one-line error and the other's folder is kept.
    """
    old = None
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif replace and kind.owns(out):
            old = out.with_name(temp_name(out.name))
            os.replace(out, old)
        else:
            raise RobustEdgeError(f"{out} was created by another process while this {kind.name} was written; "
                                  f"that one is kept and nothing was written")
    try:
        os.rename(tmp, out)  # fails if out reappeared (another writer won the race)
    except OSError:
        if old is not None:
            with contextlib.suppress(OSError):
                os.rename(old, out)
        raise RobustEdgeError(f"{out} was created by another process while this {kind.name} was written; "
                              f"that one is kept and nothing was written") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output_files(folder: Path, owned: dict[str, Callable[[Path], bool]], flag: str = "--out") -> None:
    """For commands that write a few named files into a folder: refuse to overwrite any of them
    unless RobustEdge wrote it (``owned[name](path)``), and refuse a folder path that is a file."""
    if folder.exists() and not folder.is_dir():
        raise RobustEdgeError(f"{flag} {folder} is an existing file, not a folder; choose a folder path")
    for name, is_ours in owned.items():
        path = folder / name
        if path.exists() and (not path.is_file() or not is_ours(path)):
            raise RobustEdgeError(f"{path} exists and was not written by RobustEdge; refusing to overwrite it, "
                                  f"choose another {flag}")


def json_has_format(path: Path, fmt: str) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == fmt


def check_writable_folder(folder: Path, flag: str) -> None:
    """A folder that a command creates things inside (train's --out-dir) must not be a file."""
    if folder.exists() and not folder.is_dir():
        raise RobustEdgeError(f"{flag} {folder} is an existing file, not a folder; choose a folder path")
