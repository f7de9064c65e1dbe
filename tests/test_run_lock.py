"""One run per run folder: a second `train` with the same --name is refused before it writes anything,
a lock left by a killed run is taken over, and the lock goes when the run ends, also on an error."""

import json
import os
import subprocess
import sys
import threading

import pytest

from robustedge import RobustEdgeError
from robustedge.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from robustedge.files import LOCK_FILE, LOCK_FORMAT, lock_folder, writer_identity
from robustedge.trainer import Trainer, train


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _config(tmp_path, name="run", epochs=1) -> TrainConfig:
    return TrainConfig(name=name, method="natural", data=DataConfig(name="digits", image_size=16, channels=1),
                       model=ModelConfig(arch="resnet20", width=0.25), optim=OptimConfig(lr=0.05), epochs=epochs,
                       batch_size=256, eval_n=0, device="cpu", out_dir=str(tmp_path), progress=False)


def _lock_body(**writer) -> str:
    return json.dumps({"format": LOCK_FORMAT, "writer": writer_identity() | writer, "token": "0"})


def test_a_second_run_in_a_held_run_folder_is_refused_in_one_line_before_writing(tmp_path, capsys):
    from robustedge.cli import main

    run_dir = tmp_path / "same"
    with lock_folder(run_dir):  # the first run, still training
        before = sorted(os.listdir(run_dir))
        with pytest.raises(RobustEdgeError, match=rf"^run folder {run_dir} is in use by another run "
                                                  rf"\(pid {os.getpid()}\); wait for it"):
            train(_config(tmp_path, "same"))
        assert main(["train", "--config", "digits_teacher_clean", "--epochs", "1", "--out-dir", str(tmp_path),
                     "--name", "same", "--device", "cpu", "--no-progress", "--seed", "7"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another run (pid {os.getpid()})" in err[0]
        assert sorted(os.listdir(run_dir)) == before == [LOCK_FILE]
    assert not run_dir.exists()  # the first "run" made the folder and wrote nothing into it


@pytest.mark.parametrize("body,message", [
    ("not json", "which is not a RobustEdge lock file"),
    (json.dumps({"format": "someone-else/1", "writer": {"host": "x", "pid": 1, "start": 0}}), "not a RobustEdge lock"),
    (_lock_body(host="ffffffff"), "in use by another run (pid {pid} on another host)"),  # never judged dead
])
def test_locks_that_cannot_be_judged_dead_are_refusals_and_kept(tmp_path, body, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(body)
    with pytest.raises(RobustEdgeError, match=message.format(pid=os.getpid()).replace("(", r"\(").replace(")", r"\)")):
        lock_folder(run_dir)
    assert (run_dir / LOCK_FILE).read_text() == body and os.listdir(run_dir) == [LOCK_FILE]


def test_a_dead_runs_lock_is_taken_over_by_exactly_one_of_several(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(_lock_body(pid=_dead_pid()))
    held, refused = [], []

    def take() -> None:
        try:
            held.append(lock_folder(run_dir))
        except RobustEdgeError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=take) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(held) == 1 and len(refused) == 5 and all("in use by another run" in r for r in refused)
    assert json.loads((run_dir / LOCK_FILE).read_text())["writer"] == writer_identity()
    held[0].release()
    assert os.listdir(run_dir) == []  # the folder was there before: kept, without the lock


def test_the_lock_goes_when_the_run_ends_also_on_an_error(tmp_path):
    class Stop(Exception):
        pass

    def stop(epoch, row):
        assert (tmp_path / "cut" / LOCK_FILE).is_file()  # held while training
        raise Stop()

    with pytest.raises(Stop):
        train(_config(tmp_path, "cut"), callbacks=[stop])
    assert not (tmp_path / "cut" / LOCK_FILE).exists() and (tmp_path / "cut" / "last.safetensors").is_file()
    with pytest.raises(RobustEdgeError, match="nothing to resume"):  # refused under the lock: no folder is left
        train(_config(tmp_path, "never"), resume=True)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("env,locks", [
    ({}, True),
    ({"WORLD_SIZE": "2", "RANK": "0"}, True),
    ({"WORLD_SIZE": "2", "RANK": "1"}, False),  # the other ranks of a DDP run are the same run
])
def test_only_rank_zero_takes_the_lock(tmp_path, monkeypatch, env, locks):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    lock = Trainer(_config(tmp_path, "ddp"))._lock_run_dir()
    assert (lock is not None) == locks == (tmp_path / "ddp" / LOCK_FILE).exists()
    if lock is not None:
        lock.release()


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(RobustEdgeError, match=r"^cannot create run folder .*file/out/run \(Not a directory\)$"):
        train(_config(tmp_path / "file" / "out"))
    assert os.listdir(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "mine"
