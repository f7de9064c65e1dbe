import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
from robustedge.weights import load_model
from robustedge.training_state import load_training_state
from robustedge.config import (RECIPES, AttackConfig, DataConfig, ModelConfig, OptimConfig, TeacherConfig,
                               TrainConfig, config_to_dict, load_config)
from robustedge.trainer import state_digest, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two small teachers as RobustEdge files (untrained: the trainer only needs their logits)."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for role, seed in (("robust", 1), ("clean", 2)):
        torch.manual_seed(seed)
        spec = ModelSpec("resnet20", 10, 1, 0.25, 16)
        paths[role] = str(save_model(folder / f"{role}.safetensors", spec.build(), ModelMeta(spec, dataset="digits")))
    return paths


def tiny_config(tmp_path, name="run", method="bmtard", teachers=None, epochs=3, **kw) -> TrainConfig:
    cfg = TrainConfig(
        name=name, method=method,
        data=DataConfig(name="digits", image_size=16, channels=1, padding=2, flip=False),
        model=ModelConfig(arch="resnet20", width=0.25),
        teachers={r: TeacherConfig(checkpoint=p) for r, p in (teachers or {}).items()},
        attack=AttackConfig(eps=0.1, steps=2, step_size=0.05),
        optim=OptimConfig(lr=0.05, milestones=[2]), epochs=epochs, batch_size=128, eval_every=1, eval_n=48,
        device="cpu", out_dir=str(tmp_path), log_every=3, progress=False)
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_is_bitwise_identical(tmp_path, teachers):
    full = train(tiny_config(tmp_path, "full", teachers=teachers))

    def stop_after_first(epoch, row):
        if epoch == 0:
            raise Interrupt()

    with pytest.raises(Interrupt):
        train(tiny_config(tmp_path, "cut", teachers=teachers), callbacks=[stop_after_first])
    _, _, state = load_training_state(tmp_path / "cut" / "last.safetensors")
    assert state["epoch"] == 0 and set(state["method"]) >= {"tau_adv", "w_adv", "l0_adv"}
    resumed = train(tiny_config(tmp_path, "cut", teachers=teachers), resume=True)

    a, _ = load_model(full.last_path)
    b, _ = load_model(resumed.last_path)
    assert state_digest(a) == state_digest(b)
    _, _, end_full = load_training_state(full.last_path)
    _, _, end_cut = load_training_state(resumed.last_path)
    for key, value in end_full["method"].items():
        assert torch.equal(value, end_cut["method"][key]), key
    assert [r["loss"] for r in end_full["history"]] == [r["loss"] for r in end_cut["history"]]
    csv_rows = (tmp_path / "cut" / "metrics.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 3 and "tau_adv" in csv_rows[0] and "val_wrobust" in csv_rows[0]
    # B-MTARD moved its state, and g/eta decayed at the milestone (epoch 2)
    assert end_full["method"]["w_adv"].item() != 0.5
    # best is a plain model file carrying its validation metrics
    _, meta = load_model(full.best_path)
    assert meta.method == "bmtard" and "val_wrobust" in meta.metrics


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, "nan", method="natural", epochs=3)

    def explode(epoch, row):
        cfg.optim.lr = float("inf") if epoch == 0 else cfg.optim.lr

    with pytest.raises(RobustEdgeError, match="loss became nan in epoch 2.*last good checkpoint"):
        train(cfg, callbacks=[explode])
    model, _ = load_model(tmp_path / "nan" / "last.safetensors")
    _, _, state = load_training_state(tmp_path / "nan" / "last.safetensors")
    assert state["epoch"] == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_in_the_first_epoch_names_no_checkpoint_that_does_not_exist(tmp_path):
    cfg = tiny_config(tmp_path, "nan1", method="natural", epochs=2)
    cfg.optim.lr = 1e30
    with pytest.raises(RobustEdgeError, match="in epoch 1 .*No checkpoint was written yet") as info:
        train(cfg)
    assert "last.safetensors" not in str(info.value)
    assert not (tmp_path / "nan1" / "last.safetensors").exists()


def test_without_validation_no_best_checkpoint_is_named(tmp_path, capsys):
    from robustedge.cli import main

    assert main(["train", "--config", "digits_teacher_clean", "--epochs", "1", "--out-dir", str(tmp_path), "--name",
                 "noval", "--device", "cpu", "--no-progress", "--set", "eval_n=0", "--set", "model.width=0.25"]) == 0
    result = json.loads((tmp_path / "noval" / "result.json").read_text())
    assert result["best"] is None and result["best_score"] is None
    assert not (tmp_path / "noval" / "best.safetensors").exists() and (tmp_path / "noval" / "last.safetensors").exists()
    assert "best: none (validation off: eval_n = 0)" in capsys.readouterr().out


def test_refuses_to_overwrite_a_run_and_to_resume_nothing(tmp_path):
    cfg = tiny_config(tmp_path, "once", method="natural", epochs=1)
    train(cfg)
    with pytest.raises(RobustEdgeError, match="already holds a run"):
        train(cfg)
    with pytest.raises(RobustEdgeError, match="already finished epoch 1/1"):
        train(cfg, resume=True)
    with pytest.raises(RobustEdgeError, match="nothing to resume"):
        train(tiny_config(tmp_path, "never", method="natural"), resume=True)


@pytest.mark.parametrize("change, message", [
    ({"train_n": None}, "trained with data.train_n 128, this config has None"),
    ({"train_n": 64}, "trained with data.train_n 128, this config has 64"),
    ({"seed": 3}, "trained with data.seed 0, this config has 3"),
    ({"val_fraction": 0.2}, "trained with data.val_fraction 0.1, this config has 0.2"),
])
def test_a_resume_on_other_training_images_is_refused(tmp_path, change, message):
    """A resumed run must go on with the images it started on: ``--resume`` rebuilds the config from flags,
    so a forgotten ``--set data.train_n=...`` would otherwise train the remaining epochs on all of them."""
    cfg = tiny_config(tmp_path, "part", method="natural", epochs=1)
    cfg.data.train_n = 128
    train(cfg)
    cfg.epochs = 2
    for key, value in change.items():
        setattr(cfg.data, key, value)
    with pytest.raises(RobustEdgeError, match=re.escape(message)):
        train(cfg, resume=True)
    assert load_config(tmp_path / "part" / "config.yaml").epochs == 1  # the run's own config is untouched


def test_distillation_without_its_teachers_is_a_clear_error(tmp_path, teachers):
    with pytest.raises(RobustEdgeError, match="needs a robust teacher"):
        train(tiny_config(tmp_path, "lonely", method="rslad"))
    cfg = tiny_config(tmp_path, "bad", method="rslad", teachers={"robust": teachers["robust"]})
    cfg.data.channels = 3
    with pytest.raises(RobustEdgeError, match="data has 10 and 3"):
        train(cfg)


@pytest.mark.parametrize("command,method,arch", [
    ("distill", "mtard", "resnet20"),
    # the TRADES WideResNet keeps a sub_block1 forward never uses: DDP must not wait for its gradients;
    # ARD attacks the student in train mode (through the module DDP wraps)
    ("train", "trades", "wideresnet-10-1"),
    ("distill", "ard", "resnet20"),
])
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path, teachers, command, method, arch):
    roles = {"mtard": ("robust", "clean"), "ard": ("robust",), "trades": ()}[method]
    # --standalone: the rendezvous store binds port 0 and the OS picks a free one; a port chosen here and
    # bound later by torchrun could be taken by a parallel test in between
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "robustedge.cli", command, "--method", method,
           "--arch", arch, "--width", "0.25", "--dataset", "digits", "--epochs", "1", "--batch-size", "128",
           "--eps", "0.1", "--step-size", "0.05", "--device", "cpu", "--out-dir", str(tmp_path), "--name", "ddp",
           "--no-progress", "--set", "attack.steps=2", "--set", "eval_n=32", "--set", "data.flip=false"]
    for role in roles:
        cmd += [f"--{role}-teacher", teachers[role]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["world_size"] == 2 and result["ranks_identical"] is True
    assert proc.stdout.count("epoch 1/1") == 1  # logs from rank 0 only
    # rank 0 alone held the run folder's lock (another rank taking it would have been refused), and let it go
    assert not (tmp_path / "ddp" / ".robustedge.lock").exists()


def test_cli_train_overrides_and_errors(tmp_path, capsys):
    from robustedge.cli import main

    code = main(["train", "--config", "digits_teacher_clean", "--epochs", "1",
                 "--out-dir", str(tmp_path), "--name", "cli", "--device", "cpu", "--no-progress",
                 "--set", "optim.lr=0.01", "--set", "model.width=0.25"])
    assert code == 0, capsys.readouterr().err
    saved = load_config(tmp_path / "cli" / "config.yaml")
    assert saved.optim.lr == 0.01 and saved.model.width == 0.25 and saved.epochs == 1
    capsys.readouterr()
    for argv, message in (
            (["train", "--method", "bmtard"], "invalid choice: 'bmtard'"),
            (["distill", "--set", "method=trades", "--out-dir", str(tmp_path)], "not a `robustedge distill` method"),
            (["train", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
            (["train", "--config", str(tmp_path / "none.yaml")], "config file not found"),
            (["train", "--set", "nonsense"], "must look like key.sub=value")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err


def test_every_shipped_config_loads_and_digits_ones_match_the_quickstart():
    from robustedge.quickstart import QuickstartSettings, quickstart_configs

    files = sorted(RECIPES.glob("*.yaml"))
    assert len(files) >= 12
    for path in files:
        load_config(path)
    paper = load_config("cifar10_resnet18_bmtard")
    assert (paper.optim.lr, paper.optim.momentum, paper.optim.weight_decay, paper.batch_size, paper.epochs) == \
        (0.1, 0.9, 2e-4, 128, 300)
    assert paper.optim.milestones == [215, 260, 285] and paper.attack.eps == pytest.approx(8 / 255)
    assert paper.attack.step_size == pytest.approx(2 / 255) and paper.attack.steps == 10
    assert paper.teachers["robust"].arch == "wrn34_10" and paper.teachers["clean"].arch == "resnet56"
    for name, cfg in quickstart_configs(QuickstartSettings()).items():
        assert config_to_dict(load_config(RECIPES / f"digits_{name}.yaml")) == config_to_dict(cfg), name
    from robustedge.quickstart import DIGITS_LR

    for name in ("student_bmtard", "student_pgd_at"):  # bench/replicate_digits.py's table: the same rates
        cfg = load_config(RECIPES / f"digits_{name}.yaml")
        assert cfg.optim.lr == DIGITS_LR[cfg.method], name


def test_the_quickstart_flags_set_what_scales_with_them(tmp_path):
    from robustedge.quickstart import QuickstartSettings, quickstart_configs

    runs = quickstart_configs(QuickstartSettings(out=tmp_path, epochs=8, teacher_epochs=4, eps=0.05, seed=3,
                                                 qat=True, qat_epochs=2))
    student, teacher, qat = runs["student_bmtard"], runs["teacher_clean"], runs["student_bmtard_qat"]
    assert (student.epochs, student.optim.milestones, student.eval_every) == (8, [6, 7], 1)
    assert (teacher.epochs, teacher.optim.milestones) == (4, [3, 3])
    assert (qat.epochs, qat.eval_every, qat.optim.milestones) == (2, 2, [1])
    assert (student.attack.eps, student.attack.step_size, student.seed) == (0.05, 0.0125, 3)
    assert student.teachers["robust"].checkpoint == str(tmp_path / "teacher_robust" / "best.safetensors")
    assert qat.qat.from_checkpoint == str(tmp_path / "student_bmtard" / "best.safetensors")
    assert student.optim.lr == 0.8  # the recipe's own, whatever the flags
    # the QAT run is the student's config under the QAT recipe (robustedge/qat_recipe.py), --qat-epochs aside
    assert (qat.optim.lr, qat.optim.schedule, qat.method, qat.attack.eps) == (0.08, "cosine", "bmtard", 0.05)
    assert (qat.qat.freeze_epochs, qat.qat.carry_method_state, qat.qat.float_teacher) == (1, True, 1.0)
    recipe = quickstart_configs(QuickstartSettings(out=tmp_path, epochs=10, qat=True))["student_bmtard_qat"]
    assert (recipe.epochs, recipe.eval_every, recipe.qat.freeze_epochs) == (3, 3, 2)


def _bundle(transfer: list[str], whitebox: list[str], row: dict) -> dict:
    torch_row = {"clean": 0.9, "worst": 0.6, "size_mb": 1.0, "latency_b1_ms": 1.0}
    table = {"torch": torch_row | ({"transfer_autoattack": 0.7} if "autoattack" in transfer else {}), "onnx-int8": row}
    return {"options": {"transfer_attacks": transfer, "whitebox_attacks": whitebox}, "table": table}


_INT8 = {"clean": 0.9, "worst": 0.5, "size_mb": 0.3, "latency_b1_ms": 0.1}


@pytest.mark.parametrize("ptq,qat,cells", [
    (_bundle(["pgd20", "autoattack"], ["pgd20", "autoattack", "diva"], _INT8 | {"whitebox_autoattack": 0.55}),
     _bundle(["pgd20", "autoattack"], ["pgd20", "autoattack", "diva"], _INT8 | {"whitebox_autoattack": 0.58}),
     ["70.0", "55.0", "58.0"]),
    (_bundle(["pgd20", "autoattack"], ["pgd20", "autoattack", "diva"], _INT8),  # the PTQ file's twin refused
     _bundle(["pgd20", "autoattack"], ["pgd20", "autoattack", "diva"], _INT8 | {"whitebox_autoattack": 0.58}),
     ["70.0", "n/a (twin refused)", "58.0"]),
    (_bundle(["pgd20"], ["pgd20", "diva"], _INT8), _bundle(["pgd20"], ["pgd20", "diva"], _INT8),  # --attacks lacks it
     ["not run (--attacks)"] * 3),
])
def test_the_int8_comparison_says_why_an_autoattack_cell_is_empty(ptq, qat, cells):
    """An empty AutoAttack cell once read "twin refused" when AutoAttack was simply not asked for."""
    from robustedge.quickstart import int8_comparison

    rows = int8_comparison(ptq, qat).splitlines()[2:]
    assert [row.split(" | ")[2] for row in rows] == cells


def test_quickstart_end_to_end_small_with_qat(tmp_path, capsys):
    """The whole quickstart on 256 training digits, QAT included (one run covers both paths: it is the suite's
    longest test), then its refusal of a folder it did not make. The students train 4 epochs (16 steps):
    a QAT fine-tune from a student of 4 steps, whose batch-norm statistics are still near their initial
    values, diverged in its first step."""
    from robustedge.cli import main

    out = tmp_path / "qs"
    code = main(["quickstart", "--out", str(out), "--epochs", "4", "--teacher-epochs", "1", "--n", "16",
                 "--attacks", "clean,fgsm,pgd20", "--device", "cpu", "--no-progress", "--qat", "--qat-epochs", "1",
                 "--train-n", "256"])
    text = capsys.readouterr().out
    for run in ("teacher_clean", "teacher_robust", "student_bmtard", "student_pgd_at", "student_bmtard_qat"):
        assert load_config(out / run / "config.yaml").data.train_n == 256  # the fine-tune inherits it too
    assert "| pgd20 |" in text and str(out.resolve()) in text and "quickstart finished in" in text
    summary = json.loads((out / "quickstart.json").read_text())
    assert summary["train_n"] == 256  # a quick check's figures say so
    # one-epoch students may fail a gate: the exit status says so, as `robustedge export`'s does
    failed = bool(summary["export_gate_failures"] or summary["qat_gate_failures"])
    assert code == (1 if failed else 0) and ("gate: FAILED" in text) == failed
    assert summary["status"] == "done" and set(summary["results"]) == {"student_bmtard", "student_pgd_at"}
    for run in ("teacher_clean", "teacher_robust", "student_bmtard", "student_pgd_at"):
        assert (out / run / "best.safetensors").is_file() and (out / run / "metrics.csv").is_file()
    manifest = json.loads((out / "student_bmtard_export" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"onnx", "onnx-fp16", "onnx-int8"}
    # the PGD-20 examples of the evaluation were reused as transfer examples, not crafted again
    reused = summary["results"]["student_bmtard"]["accuracy"]["pgd20"]  # eval attacked the BN-folded twin
    assert manifest["table"]["torch"]["transfer_pgd20"] == pytest.approx(reused, abs=1.01 / 16)
    assert "exported B-MTARD student" in text
    assert "float, post-training INT8 and quantization-aware INT8" in text
    for label in ("float (torch)", "PTQ INT8 (onnx-int8)", "QAT INT8 (onnx-int8)"):
        assert label in text and label in (out / "quickstart.md").read_text()
    assert text.count("| not run (--attacks) |") == 3  # AutoAttack is not among --attacks
    qat = json.loads((out / "student_bmtard_qat_export" / "manifest.json").read_text())
    assert set(qat["files"]) == {"onnx-int8"} and qat["source"]["qat"]["activations"] == "uint8"
    assert qat["source"]["checkpoint"] == "last.safetensors" and (out / "student_bmtard_qat" / "metrics.csv").is_file()
    # the QAT file was attacked white-box through its twin, like the PTQ one, unless the twin was refused
    # (these one-epoch students are near chance, so adversarial inputs sit on near-tied logits)
    row = qat["table"]["onnx-int8"]
    accepted = row["twin_agreement"] >= qat["gate"]["min_twin_agreement"]
    # with --attacks clean,fgsm,pgd20 the white-box attacks are the evaluation's with a white-box form, and DIVA
    assert (qat["samples"].get("whitebox") == {"onnx-int8": ["pgd20", "diva"]}) == accepted
    assert ("whitebox_pgd20" in row) == accepted and "whitebox_autoattack" not in row and "worst" in row
    assert {"qat_train", "qat_export", "export"} <= set(summary["timings"])
    # the workers read the five runs for the report (eps curves, latencies); the report holds them all
    report = (out / "report" / "report.md").read_text()
    for name in ("teacher_clean", "teacher_robust", "student_bmtard", "student_pgd_at", "student_bmtard_qat"):
        assert (out / name / "eps_curve.json").is_file() and f"## {name} (" in report and f"{name}: " in report
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    assert main(["quickstart", "--out", str(tmp_path / "mine"), "--epochs", "1"]) == 2
    assert (tmp_path / "mine" / "thesis.tex").exists()
