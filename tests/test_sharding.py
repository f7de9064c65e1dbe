"""Evaluation over processes: two CPU processes under torchrun give per-example results identical to one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

HELPER = Path(__file__).parent / "helpers" / "sharded_eval.py"


def _torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from robustedge.data import load_dataset

    sys.path.insert(0, str(HELPER.parent))
    try:
        from sharded_eval import tiny
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    model = tiny()
    train = load_dataset("digits", image_size=8, channels=1).train
    x, y = train.float_images(), train.labels
    opt = torch.optim.Adam(model.parameters(), 0.01)
    for _ in range(300):
        idx = torch.randint(0, len(y), (128,))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def test_two_processes_give_the_per_example_results_of_one(tmp_path, tiny_weights):
    """Clean, PGD-20 and AutoAttack through the API, 30 digits in blocks of 10 (three blocks: one rank gets two): one process vs two."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    subprocess.run([sys.executable, str(HELPER), str(tiny_weights), str(one), "30", "10"], check=True,
                   capture_output=True, timeout=300)
    _torchrun(2, str(HELPER), str(tiny_weights), str(two), "30", "10")
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["processes"], b["processes"]) == (1, 2)
    assert set(a["correct"]) == {"clean", "pgd20", "autoattack"}
    assert all(len(v) == 30 for v in a["correct"].values())
    assert a["correct"] == b["correct"] and a["accuracy"] == b["accuracy"]
    assert "0" in a["correct"]["pgd20"] and "1" in a["correct"]["autoattack"]  # the attacks did something, not all


def test_the_eval_command_under_torchrun_writes_one_report_equal_to_one_process(tmp_path, digits_checkpoint):
    from robustedge.cli import main

    common = ["--attacks", "clean,fgsm,pgd20", "--num-examples", "48", "--batch-size", "16", "--no-flags", "--no-progress"]
    assert main(["eval", str(digits_checkpoint), "--out", str(tmp_path / "one"), *common]) == 0
    _torchrun(2, "-m", "robustedge.cli", "eval", str(digits_checkpoint), "--out", str(tmp_path / "two"), *common)
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    assert b["info"]["processes"] == 2 and a["info"]["processes"] == 1
    assert a["correct"] == b["correct"] and a["accuracy"] == b["accuracy"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["eval.json", "eval.md"]
