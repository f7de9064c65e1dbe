import json
import subprocess
import sys

import pytest
import torch

from robustedge.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def one_thread():
    """AutoAttack on tiny batches is bound by per-call overhead: one thread is as fast, and cannot
    oversubscribe the cores when other jobs share the machine (two threads spin-waiting on a busy
    2-core machine made this test take 868 s once)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_eval_autoattack_matches_pyautoattack_directly(digits, digits_model, digits_checkpoint, tmp_path, capsys,
                                                       one_thread):
    from pyautoattack import AutoAttack

    n, eps, seed = 16, 0.05, 3  # 16 digits, a few of which survive APGD: Square's 5000 queries stay short
    # attack batches of 4: AutoAttack still runs on its own fixed block (250, so all 16 at once), which is
    # what makes its per-example results those of the package run on the same 16 in one call
    code, out, err = run_cli(capsys, "eval", digits_checkpoint, "--attacks", "clean,pgd20,autoattack", "--n", n,
                             "--eps", eps, "--batch-size", 4, "--seed", seed, "--device", "cpu",
                             "--out", tmp_path / "ev", "--no-progress")
    assert code == 0, err
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert "| autoattack |" in (tmp_path / "ev" / "eval.md").read_text()
    assert "autoattack" in out and "W-Robust" in out

    x, y = digits.test.float_images()[:n], digits.test.labels[:n]
    adversary = AutoAttack(digits_model.eval(), norm="Linf", eps=eps, version="standard", device="cpu", seed=seed)
    _, y_adv = adversary.run_standard_evaluation(x, y, batch_size=16)
    direct = (y_adv == y).float().mean().item()
    assert result["accuracy"]["autoattack"] == direct
    assert result["correct"]["autoattack"] == "".join("1" if c else "0" for c in (y_adv == y).tolist())
    assert result["info"]["batch_size"] == 4 and result["info"]["aa_batch_size"] == 250
    assert "AutoAttack blocks of 250" in out
    assert 0 < direct < result["accuracy"]["clean"]  # non-trivial: some points survive, some do not
    assert result["accuracy"]["autoattack"] <= result["accuracy"]["pgd20"]
    assert result["w_robust"]["autoattack"] == pytest.approx((result["accuracy"]["clean"] + direct) / 2)


def test_eval_says_when_n_is_more_than_the_split_holds(digits, digits_checkpoint, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", digits_checkpoint, "--attacks", "clean", "--n", 100000, "--no-flags",
                             "--device", "cpu", "--out", tmp_path / "ev", "--no-progress")
    assert code == 0, err
    whole = len(digits.test)
    assert f"on {whole} digits test examples (all of them: 100000 were asked for)" in out
    assert len(json.loads((tmp_path / "ev" / "eval.json").read_text())["correct"]["clean"]) == whole


@pytest.mark.parametrize("argv,message", [
    (["--attacks", "clean,pgd7"], "unknown attack 'pgd7'; valid attacks: all, autoattack, clean, cw"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'; valid datasets:"),
    (["--dataset", "cifar10"], "needs --data-root"),
    (["--eps", "2"], "--eps must be in [0, 1], got 2"),
    (["--eps", "-0.1"], "--eps must be in [0, 1], got -0.1"),
    (["--n", "-3"], "--n must be an integer >= 0, got -3"),
])
def test_eval_bad_options_are_one_line_errors(digits_checkpoint, tmp_path, capsys, argv, message):
    code, _, err = run_cli(capsys, "eval", digits_checkpoint, "--out", tmp_path, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_asked_for_but_absent(digits_checkpoint, capsys):
    code, _, err = run_cli(capsys, "eval", digits_checkpoint, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_bad_checkpoint_files(tmp_path, digits_checkpoint, capsys):
    code, _, err = run_cli(capsys, "eval", tmp_path / "missing.safetensors")
    assert code == 2 and "checkpoint not found" in err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(digits_checkpoint.read_bytes()[:300])
    code, _, err = run_cli(capsys, "eval", cut)
    assert code == 2 and "truncated or corrupt" in err
    torch.save({"not": "a model"}, tmp_path / "junk.safetensors")
    code, _, err = run_cli(capsys, "eval", tmp_path / "junk.safetensors")
    assert code == 2 and "safetensors" in err


def test_class_count_mismatch_between_checkpoint_and_dataset(tmp_path, capsys):
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model

    spec = ModelSpec("resnet20", 7, 1, 0.25, 16)
    path = save_model(tmp_path / "seven.safetensors", spec.build(), ModelMeta(spec, dataset="digits", eps=0.1))
    code, _, err = run_cli(capsys, "eval", path)
    assert code == 2 and "has 10 classes but the checkpoint's resnet20 has 7 outputs" in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "robustedge.cli", "eval", str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"robustedge: error: checkpoint not found: {tmp_path / 'x.safetensors'}"
    help_text = subprocess.run([sys.executable, "-m", "robustedge.cli", "eval", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--attacks" in help_text and "PGD_TRADES" in help_text
