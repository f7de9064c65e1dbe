"""A killed evaluation continues where it stopped (`robustedge eval --resume`), with the same per-example
results as a run that was never interrupted, and refuses to continue another run's file."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from robustedge.errors import RobustEdgeError
from robustedge.eval_report import EvalReport
from robustedge.suite import evaluate

ATTACKS = ["clean", "fgsm", "autoattack"]  # at eps 0.08 AutoAttack breaks all 12 fast (no Square queries)


class Killed(Exception):
    pass


def _first(digits, n):
    return digits.test.float_images()[:n], digits.test.labels[:n]


def test_a_crash_inside_autoattack_resumes_from_its_last_block(digits, digits_model, monkeypatch):
    ev = importlib.import_module("robustedge.suite")

    x, y = _first(digits, 12)
    common = dict(attacks=ATTACKS, eps=0.08, seed=3, aa_batch_size=4, show_progress=False)
    full = evaluate(digits_model, x, y, batch_size=4, **common)
    saved = []

    def crash_after_one_block(report):
        saved.append(json.loads(json.dumps(report.to_dict())))  # what eval.json holds
        if report.partial and report.partial["attack"] == "autoattack":
            raise Killed

    with pytest.raises(Killed):
        evaluate(digits_model, x, y, batch_size=4, on_update=crash_after_one_block, save_every=0, **common)
    last = EvalReport.from_dict(saved[-1])
    assert not last.complete and list(last.accuracy) == ["clean", "fgsm"]
    assert last.partial["attack"] == "autoattack" and len(last.partial["correct"]) == 4

    calls = []
    real = ev.run_attack

    def recording(name, *args, **kwargs):
        calls.append((name, kwargs.get("first", 0)))
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ev, "run_attack", recording)
    resumed = evaluate(digits_model, x, y, batch_size=3, resume=last, **common)  # another batch size: same run
    assert calls == [("autoattack", 4)]  # FGSM and AutoAttack's first block were not run again
    assert resumed.complete and resumed.partial is None
    assert resumed.correct == full.correct and resumed.accuracy == full.accuracy and resumed.worst == full.worst
    assert 0 < full.accuracy["fgsm"] < full.accuracy["clean"]  # non-trivial results to compare


@pytest.mark.parametrize("change,message", [
    (dict(seed=4), "seed 3 -> 4"),
    (dict(eps=0.06), "eps 0.05 -> 0.06"),
    (dict(attacks=["clean", "fgsm"]), "attacks"),
    (dict(aa_batch_size=8), "aa_batch_size 4 -> 8"),
    (dict(n=10), "data_sha256"),
])
def test_resume_refuses_another_run(digits, digits_model, change, message):
    x, y = _first(digits, 12)
    settings = dict(attacks=["clean", "pgd20"], eps=0.05, seed=3, aa_batch_size=4)
    saved = []

    def crash(report):
        saved.append(report.to_dict())
        raise Killed

    with pytest.raises(Killed):
        evaluate(digits_model, x, y, show_progress=False, on_update=crash, **settings)
    n = change.pop("n", len(y))
    with pytest.raises(RobustEdgeError, match="cannot resume: the saved evaluation was another run") as info:
        evaluate(digits_model, x[:n], y[:n], show_progress=False, resume=EvalReport.from_dict(saved[-1]),
                 **(settings | change))
    assert message in str(info.value)


def _eval_cli(checkpoint, out, *extra):
    return [sys.executable, "-m", "robustedge.cli", "eval", str(checkpoint), "--n", "32", "--eps", "0.1",
            "--attacks", ",".join(ATTACKS), "--batch-size", "4", "--aa-batch-size", "8", "--seed", "1",
            "--no-flags", "--no-progress", "--device", "cpu", "--out", str(out), *extra]


def test_eval_killed_by_sigkill_resumes_with_the_same_results(digits_checkpoint, tmp_path):
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # the same kernels in every process: bit-identical logits
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_eval_cli(digits_checkpoint, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    saved, deadline = None, time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            saved = json.loads((killed / "eval.json").read_text())
        except (OSError, ValueError):
            time.sleep(0.02)
            continue
        os.kill(proc.pid, signal.SIGKILL)  # at its first save: the attacks are still to run
        break
    proc.wait()
    assert saved is not None and proc.returncode == -signal.SIGKILL, proc.stderr.read()
    assert saved["complete"] is False and "clean" in saved["accuracy"] and "autoattack" not in saved["accuracy"]
    assert [p.name for p in killed.iterdir()] and not [p for p in killed.iterdir() if p.name.startswith(".")]

    resumed = subprocess.run(_eval_cli(digits_checkpoint, killed, "--resume"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    from robustedge import api

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels of the one-thread processes above: bit-identical logits
    try:
        whole = api.evaluate(str(digits_checkpoint), n=32, eps=0.1, attacks=ATTACKS, batch_size=4, aa_batch_size=8,
                             seed=1, flags=False, show_progress=False, device="cpu")
    finally:
        torch.set_num_threads(threads)
    a = json.loads((killed / "eval.json").read_text())
    assert a["complete"] and a["correct"] == whole.correct and a["accuracy"] == whole.accuracy

    again = subprocess.run(_eval_cli(digits_checkpoint, tmp_path / "none", "--resume"), env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "nothing to resume" in again.stderr
    assert not (tmp_path / "none").exists()


def _saved(digits, digits_model):
    x, y = _first(digits, 12)
    saved = []

    def crash(report):
        saved.append(json.loads(json.dumps(report.to_dict())))
        if report.partial and report.partial["attack"] == "autoattack":
            raise Killed

    with pytest.raises(Killed):
        evaluate(digits_model, x, y, attacks=["clean", "fgsm", "autoattack"], eps=0.08, seed=3, aa_batch_size=4,
                 show_progress=False, on_update=crash, save_every=0)
    return saved[-1], x, y


def _set(path, value):
    def edit(raw):
        node = raw
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set(["partial"], "autoattack"), "'partial' must be {attack, correct: 0/1 string, seconds}"),
    (lambda r: r["partial"].pop("attack"), "'partial' must be"),
    (_set(["partial", "correct"], 12345678), "'partial' must be"),
    (_set(["partial", "correct"], "xyz1"), "'partial' must be"),
    (_set(["partial", "seconds"], "abc"), "'partial' must be"),
    (_set(["info"], []), "'info' is not an object"),
    (_set(["correct"], ["clean"]), "'correct' is not an object"),
    (_set(["accuracy"], 5), "'accuracy' is not an object"),
    (_set(["correct", "fgsm"], "x" * 12), "'correct' must map attacks to strings of 0 and 1"),
    (_set(["correct", "fgsm"], "1" * 13), "does not fit this run (fgsm"),
    (_set(["partial", "correct"], "1" * 20), "does not fit this run (partial autoattack"),
    (_set(["partial", "correct"], "10101"), "does not fit this run (partial autoattack"),  # not a block's end
    (_set(["n"], 11), "does not fit this run"),
])
def test_a_damaged_saved_evaluation_is_one_line_never_a_wrong_number(digits, digits_model, edit, message):
    from robustedge.eval_report import resumable_report

    raw, x, y = _saved(digits, digits_model)
    edit(raw)
    digits_model.eval()  # a shared fixture: another test on this worker may have left it training
    with pytest.raises(RobustEdgeError, match="resume") as info:
        evaluate(digits_model, x, y, attacks=["clean", "fgsm", "autoattack"], eps=0.08, seed=3, aa_batch_size=4,
                 show_progress=False, resume=resumable_report(raw))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not digits_model.training  # the caller's mode (eval here) is as it was


def test_clean_comes_first_whatever_the_order_given():
    from robustedge.eval_report import parse_attacks

    assert parse_attacks("pgd20,clean,fgsm") == ["clean", "pgd20", "fgsm"]
    assert parse_attacks(["fgsm"]) == ["clean", "fgsm"]
