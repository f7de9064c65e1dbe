"""Nothing half-written, nothing piled up, nothing of anybody else's touched."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from robustedge import RobustEdgeError
from robustedge.files import (OutputKind, atomic_write_text, check_output_folder, clean_stale_temps,
                              temp_name, writer_identity)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporaries_of_dead_writers_are_removed_and_nothing_else(tmp_path):
    me = writer_identity()
    dead = _dead_pid()
    dead_file = tmp_path / f".last.safetensors.tmp-{me['host']}-{dead}-{me['start']}-0123abcd"
    dead_dir = tmp_path / f".bundle.tmp-{me['host']}-{dead}-{me['start']}-0123abcd"
    live = tmp_path / temp_name("last.safetensors")  # this process: alive
    other_host = tmp_path / f".last.safetensors.tmp-ffffffff-{dead}-1-0123abcd"
    reused_pid = tmp_path / f".x.tmp-{me['host']}-{os.getpid()}-{me['start'] + 1}-0123abcd"  # same pid, other start
    old_style = tmp_path / ".last.safetensors.k2j3h4.tmp"  # earlier versions' names: owner unknown, kept
    users = tmp_path / "notes.tmp"
    for path in (dead_file, live, other_host, reused_pid, old_style, users):
        path.write_bytes(b"x" * 1000)
    dead_dir.mkdir()
    (dead_dir / "model.onnx").write_bytes(b"y")
    removed = clean_stale_temps(tmp_path)
    assert sorted(removed) == sorted([dead_file, dead_dir] + ([reused_pid] if me["start"] else []))
    for kept in (live, other_host, old_style, users):
        assert kept.exists()


def test_a_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    target = tmp_path / "last.safetensors"
    target.write_text("the previous complete file")
    writer = ("import sys, time\n"
              "from robustedge.files import atomic_path\n"
              f"with atomic_path({str(target)!r}) as tmp:\n"
              "    tmp.write_bytes(b'0' * 1_000_000)\n"
              "    print('writing', flush=True)\n"
              "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".last.safetensors.tmp-")]
    assert len(leftovers) == 1 and target.read_text() == "the previous complete file"
    atomic_write_text(target, "new")  # the next writer in the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"] and target.read_text() == "new"


KIND = OutputKind("test folder", "marker.json", "test/1")


def test_output_folders_are_replaced_only_when_ours(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "marker.json").write_text(json.dumps({"format": "test/1"}))
    check_output_folder(ours, KIND, replace=True)
    with pytest.raises(RobustEdgeError, match="already holds a RobustEdge test folder; pass --force"):
        check_output_folder(ours, KIND, replace=False)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "marker.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(RobustEdgeError, match="is not empty and is not a RobustEdge test folder"):
        check_output_folder(theirs, KIND, replace=True)
    input_file = ours / "model.safetensors"
    input_file.write_text("w")
    for folder in (ours, tmp_path):  # the input is inside, or the folder is its ancestor
        with pytest.raises(RobustEdgeError, match="an input of this command"):
            check_output_folder(folder, KIND, replace=True, protect=[input_file])
    check_output_folder(tmp_path / "new", KIND, replace=False)
    (tmp_path / "empty").mkdir()
    check_output_folder(tmp_path / "empty", KIND, replace=False)


def test_two_exports_racing_to_the_same_new_folder(digits_checkpoint, tmp_path):
    """The second export finishes while the first is still working: the first loses with one line,
    the winner's bundle is kept whole and the loser leaves nothing behind."""
    from robustedge.edge.bundle import ExportOptions, export_bundle
    from robustedge.verifier import read_bundle

    out = tmp_path / "bundle"
    opts = dict(formats=["onnx"], n=16, calibration_n=16, transfer_attacks=("pgd20",), square_n=0)
    raced = []

    def progress(message: str) -> None:
        if message.startswith("crafting") and not raced:
            raced.append(True)
            export_bundle(digits_checkpoint, out, ExportOptions(**opts), progress=lambda m: None)

    with pytest.raises(RobustEdgeError, match="was created by another process while this export bundle was "
                                              "written; that one is kept"):
        export_bundle(digits_checkpoint, out, ExportOptions(**opts), progress=progress)
    read_bundle(out)  # the winner's bundle, complete and matching its hashes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_quickstart_marker_never_claims_running_for_a_dead_process(tmp_path):
    from robustedge.quickstart import _check_out, read_marker

    out = tmp_path / "qs"
    out.mkdir()
    me = writer_identity()
    (out / "quickstart.json").write_text(json.dumps({"format": "robustedge-quickstart/1", "status": "running",
                                                     "writer": me | {"pid": _dead_pid()}}))
    assert read_marker(out)["status"] == "interrupted"
    _check_out(out)  # an interrupted quickstart may be replaced
    (out / "quickstart.json").write_text(json.dumps({"format": "robustedge-quickstart/1", "status": "running",
                                                     "writer": me}))
    with pytest.raises(RobustEdgeError, match="still running"):
        _check_out(out)


def test_a_terminated_quickstart_says_so(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.Popen([sys.executable, "-m", "robustedge.cli", "quickstart", "--out", str(out), "--epochs", "1",
                             "--teacher-epochs", "1", "--n", "8", "--no-export", "--device", "cpu", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "quickstart.json").exists():
        time.sleep(0.2)
    assert json.loads((out / "quickstart.json").read_text())["status"] == "running"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert json.loads((out / "quickstart.json").read_text())["status"] == "interrupted"
    assert proc.stderr.read().strip().splitlines()[-1] == "robustedge: interrupted"
