"""One temp-file rule: every safetensors file is written by RobustEdge's own writer (so the only temporary a
kill can leave is one whose name says who wrote it), such temporaries of dead writers are removed wherever
outputs are written, and `import`'s exclusive save never replaces a file."""

import os
import subprocess
import sys

import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
from robustedge.files import make_temp_dir, writer_identity
from robustedge.training_state import save_training_state

SPEC = ModelSpec("resnet20", 10, 1, 0.25, 16)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _model():
    torch.manual_seed(0)
    return SPEC.build()


WRITERS = {
    "save_model": lambda path: save_model(path, _model(), ModelMeta(SPEC)),
    "save_training_state": lambda path: save_training_state(path, _model(), ModelMeta(SPEC), {"epoch": 0}),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_safetensors_files_are_written_by_our_writer_alone(tmp_path, monkeypatch, writer):
    """safetensors' save_file makes its own `.tmpXXXXXX` (no writer in its name: never cleanable); it must not
    be used. While the bytes are flushed, the only temporary in the folder is ours."""
    import safetensors.torch

    import robustedge.files as files

    def forbidden(*args, **kwargs):
        raise AssertionError("safetensors.torch.save_file called: its temporary would escape our cleanup")

    monkeypatch.setattr(safetensors.torch, "save_file", forbidden)
    seen, fsync = [], os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: seen.append(sorted(os.listdir(tmp_path))) or fsync(fd))
    target = tmp_path / "last.safetensors"
    WRITERS[writer](target)
    me = writer_identity()
    assert len(seen[0]) == 1 and seen[0][0].startswith(f".last.safetensors.tmp-{me['host']}-{os.getpid()}-")
    assert os.listdir(tmp_path) == ["last.safetensors"]
    from robustedge.checkpoint import read_meta

    assert read_meta(target).spec == SPEC


def _plant(folder):
    """A dead writer's temporary and five files that must be kept: a live writer's, another host's, and names
    that merely look like ours (safetensors' own temp style, a wrong random part, no leading dot)."""
    me, dead = writer_identity(), _dead_pid()
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / f".last.safetensors.tmp-{me['host']}-{dead}-{me['start']}-0123abcd"
    kept = [folder / f".last.safetensors.tmp-{me['host']}-{os.getpid()}-{me['start']}-0123abcd",
            folder / f".last.safetensors.tmp-ffffffff-{dead}-{me['start']}-0123abcd",
            folder / ".tmpAb12Cd",
            folder / f".last.safetensors.tmp-{me['host']}-{dead}-{me['start']}-notours!",
            folder / f"last.safetensors.tmp-{me['host']}-{dead}-{me['start']}-0123abcd"]
    for path in [stale, *kept]:
        path.write_bytes(b"x" * 100)
    return stale, kept


def _train_start(tmp_path):
    from robustedge.config import DataConfig, ModelConfig, TrainConfig
    from robustedge.trainer import Trainer

    cfg = TrainConfig(name="run", method="natural", data=DataConfig(name="digits"), model=ModelConfig(arch="resnet20"),
                      device="cpu", out_dir=str(tmp_path))
    Trainer(cfg)._lock_run_dir().release()


WHERE = {  # (the folder planted, what writes there next)
    "run folder, at a run's start": ("run", _train_start),
    "import output, at the save": ("imported", lambda tmp: save_model(tmp / "imported" / "m.safetensors", _model(),
                                                                      ModelMeta(SPEC), exclusive=True)),
    "beside an export bundle, at its start": ("exports", lambda tmp: make_temp_dir(tmp / "exports" / "bundle")),
    "run folder, at a checkpoint": ("ckpt", lambda tmp: WRITERS["save_training_state"](tmp / "ckpt" / "last.st")),
}


@pytest.mark.parametrize("where", list(WHERE))
def test_dead_writers_temporaries_are_removed_where_outputs_are_written_and_nothing_else(tmp_path, where):
    folder, write = WHERE[where]
    stale, kept = _plant(tmp_path / folder)
    write(tmp_path)
    assert not stale.exists()
    assert all(path.read_bytes() == b"x" * 100 for path in kept)


@pytest.mark.parametrize("when", ["before the save", "while the save writes"])
def test_an_exclusive_save_never_replaces_a_file(tmp_path, monkeypatch, when):
    import robustedge.files as files

    out = tmp_path / "imported.safetensors"
    theirs = b"another import's file"
    if when == "before the save":
        out.write_bytes(theirs)
    else:  # two imports raced past cli's exists-check: the other one's file appears mid-write
        fsync = os.fsync
        monkeypatch.setattr(files.os, "fsync", lambda fd: (out.exists() or out.write_bytes(theirs)) and fsync(fd))
    with pytest.raises(RobustEdgeError, match=rf"^{out} exists; choose another --out \(import never overwrites\)$"):
        save_model(out, _model(), ModelMeta(SPEC), exclusive=True)
    assert out.read_bytes() == theirs and os.listdir(tmp_path) == [out.name]
    monkeypatch.undo()
    save_model(tmp_path / "new.safetensors", _model(), ModelMeta(SPEC), exclusive=True)  # a new name is written
    assert sorted(os.listdir(tmp_path)) == [out.name, "new.safetensors"]
