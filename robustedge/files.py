"""Files on disk: atomic writes, temp files that name their writer, and who owns an output folder.

Five rules keep a user's data safe (docs/design/files.md, "Files"):

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
4. Only RobustEdge's own writer creates files: a third-party writer that makes temporaries of its
   own (safetensors >= 0.8 writes ``.tmpXXXXXX`` beside its target) is given bytes to hand to
   :func:`atomic_write_bytes` instead (:func:`save_safetensors`), because a temporary whose name
   does not say who wrote it can never be proven abandoned and so could never be cleaned up.
5. A folder that one process writes for a long time (a training run) is held by a lock file naming
   its writer (:func:`lock_folder`); a second writer is refused, and a lock whose writer is dead is
   taken over.
"""

from __future__ import annotations

import contextlib
import errno
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

from robustedge.errors import RobustEdgeError, exception_line

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
def atomic_path(path: str | os.PathLike, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it to ``path`` only if the block succeeds.

    Readers never see a half-written file and a crash leaves the old file intact; the temporaries
    of writers that died earlier in the same folder are removed first. With ``exclusive`` the file
    is never put over an existing one, even one that appeared while this one was written (two
    writers racing past an exists-check): the last step is a hard link, which the kernel refuses
    if ``path`` exists, and that raises :class:`FileExistsError` with nothing else changed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent)
    tmp = path.with_name(temp_name(path.name))
    try:
        yield tmp
        if exclusive:
            _link_new(tmp, path)
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _link_new(src: Path, dst: Path) -> None:
    """Create ``dst`` with ``src``'s content, failing with FileExistsError if ``dst`` exists.

    A hard link does this atomically (readers see the whole file or none). On a filesystem without
    hard links the name is claimed with ``O_CREAT | O_EXCL`` and the content copied into it: still
    never over another file, only briefly visible before it is complete.
    """
    try:
        os.link(src, dst)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
    out = open(dst, "xb")  # O_CREAT | O_EXCL: FileExistsError if the name is taken
    try:
        with out, open(src, "rb") as fh:
            shutil.copyfileobj(fh, out)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(dst)
        raise


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> Path:
    """``data`` to ``path`` through a temporary of ours, flushed to disk (fsync) before it is renamed
    into place, so that even a power cut leaves the old file or the new one, never a torn one.
    ``exclusive``: never over an existing file (FileExistsError), see :func:`atomic_path`."""
    path = Path(path)
    with atomic_path(path, exclusive=exclusive) as tmp:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    _fsync_folder(path.parent)
    return path


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None, *,
                     exclusive: bool = False) -> Path:
    """Every safetensors file RobustEdge writes goes through here (rule 4 of the module docstring).

    ``safetensors.torch.save_file`` writes its own ``.tmpXXXXXX`` beside the target: a SIGKILL during
    a save leaves it behind (as large as the model) under a name that says nothing of its writer, so
    no cleanup could ever prove it abandoned. Serialising to bytes here and writing them with
    :func:`atomic_write_bytes` leaves at most one of our own temporaries, which the next writer in
    the folder removes once its writer is dead. Tensors must be contiguous CPU tensors.
    """
    from safetensors.torch import save

    return atomic_write_bytes(path, save(tensors, metadata=metadata), exclusive=exclusive)


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
    except RecursionError:
        raise RobustEdgeError(f"{path} is not a readable JSON file (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RobustEdgeError(f"{path} is not a readable JSON file ({exception_line(exc)})") from None


# --------------------------------------------------------------------------------------------
# Folder locks: one writer at a time in a long-lived output folder
# --------------------------------------------------------------------------------------------

LOCK_FILE = ".robustedge.lock"
LOCK_FORMAT = "robustedge-lock/1"


@dataclass
class FolderLock:
    """A lock taken by :func:`lock_folder`; :meth:`release` gives it up (also as a context manager)."""

    folder: Path
    path: Path
    body: bytes  # what this holder wrote: only a lock file with exactly this content is removed
    created: list[Path]  # the folders taking the lock made, deepest first

    def release(self) -> None:
        """Remove the lock file if it is still this one, then the folders taking it made if they are
        still empty (a run refused before it wrote anything leaves no empty run folder behind)."""
        with contextlib.suppress(OSError):
            if self.path.read_bytes() == self.body:
                self.path.unlink()
        _remove_empty(self.created)

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    for path in folders:
        with contextlib.suppress(OSError):
            path.rmdir()  # fails, harmlessly, on a folder that is not empty


def _lock_writer(body: bytes) -> tuple[str, int, int] | None:
    """(host, pid, start) of a lock file's writer, or None if it is not a RobustEdge lock."""
    try:
        data = json.loads(body.decode("utf-8"))
        writer = data["writer"]
        host, pid, start = writer["host"], writer["pid"], writer["start"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError):
        return None
    if data.get("format") != LOCK_FORMAT or not isinstance(host, str) or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (pid, start)):
        return None
    return host, pid, start


@contextlib.contextmanager
def _folder_mutex(folder: Path) -> Iterator[None]:
    """Serialise lock taking in ``folder`` among the processes of this host (an ``flock`` on the folder).

    Judging a lock stale and replacing it are two steps; without this, two runs could judge the same
    stale lock and the slower one remove the lock the faster one had just made. The kernel drops an
    ``flock`` when its process dies, so this mutex can never go stale itself; it is held only while a
    lock is taken. Where ``fcntl`` is missing (Windows) the steps run unserialised.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def lock_folder(folder: str | os.PathLike, *, what: str = "run folder",
                advice: str = "wait for it to finish or choose another --name/--out-dir") -> FolderLock:
    """Take ``folder``'s lock (creating the folder if needed) or refuse in one line.

    Two processes writing the same folder (two ``train`` runs with the same ``--name``) would each
    replace the other's files and both report success. The lock is a file, created only if absent
    (a hard link of a complete temporary, so no reader ever sees it half-written), holding its
    writer's identity (:func:`writer_identity`). A lock whose writer is provably dead (same host, no
    such process: a SIGKILL or a power cut) is stale and taken over; a live writer's, another
    host's, or a file that is not a RobustEdge lock is a refusal (:class:`RobustEdgeError`).
    Release it with :meth:`FolderLock.release`, also on errors.
    """
    folder = Path(folder)
    created = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(created)
        raise RobustEdgeError(f"cannot create {what} {folder} ({exc.strerror or type(exc).__name__})") from None
    lock = folder / LOCK_FILE
    body = (json.dumps({"format": LOCK_FORMAT, "writer": writer_identity(), "token": secrets.token_hex(8)},
                       sort_keys=True) + "\n").encode()
    tmp = folder / temp_name(LOCK_FILE)
    try:
        try:
            tmp.write_bytes(body)
        except OSError as exc:
            raise RobustEdgeError(f"cannot write in {what} {folder} ({exc.strerror or type(exc).__name__})") from None
        with _folder_mutex(folder):
            for _ in range(3):
                try:
                    _link_new(tmp, lock)
                    return FolderLock(folder, lock, body, created)
                except FileExistsError:
                    pass
                try:
                    held = lock.read_bytes()
                except FileNotFoundError:
                    continue  # its holder released it meanwhile (releasing needs no mutex): try again
                writer = _lock_writer(held)
                if writer is None:
                    raise RobustEdgeError(f"{what} {folder} is locked by {lock}, which is not a RobustEdge lock "
                                          f"file; if no run is using the folder, delete that file")
                host, pid, start = writer
                if writer_alive(host, pid, start):
                    elsewhere = "" if host == _HOST else " on another host"
                    raise RobustEdgeError(f"{what} {folder} is in use by another run (pid {pid}{elsewhere}); "
                                          f"{advice}")
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()  # stale: its writer died without releasing it
        raise RobustEdgeError(f"{what} {folder}: could not take its lock {lock}; try again")
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _remove_empty(created)  # a refused run leaves no folder it made
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


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
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == fmt


def check_writable_folder(folder: Path, flag: str) -> None:
    """A folder that a command creates things inside (train's --out-dir) must not be a file."""
    if folder.exists() and not folder.is_dir():
        raise RobustEdgeError(f"{flag} {folder} is an existing file, not a folder; choose a folder path")
