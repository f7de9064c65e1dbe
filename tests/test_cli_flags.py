"""train/distill flags are read off the config dataclasses (robustedge/cli/training.py): every flag names a
real config key, lands there, and the flags nobody gives leave the recipe as it is."""

import dataclasses

import pytest

from robustedge.cli import build_parser
from robustedge.cli.training import config_field, config_flags, resolve_train_config
from robustedge.config import config_to_dict, load_config


def _at(raw: dict, key: str):
    for part in key.split("."):
        raw = raw[part]
    return raw


def test_every_flag_names_a_config_field_and_takes_its_type():
    for flag in config_flags():
        field, hint = config_field(flag.key)
        assert isinstance(field, dataclasses.Field)
        assert hint in (bool, int, float, str), (flag.key, hint)
        assert flag.flag.startswith("--") and flag.dest == flag.flag[2:].replace("-", "_")
    with pytest.raises(KeyError):
        config_field("model.nope")


def test_all_distill_flags_at_once_set_their_keys(tmp_path):
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model

    student = tmp_path / "student.safetensors"
    student.write_bytes(b"")  # only its existence is checked here
    # the float run's state --qat-carry-method-state reads (only its recorded method is checked here)
    spec = ModelSpec("resnet20", 10, 1, 0.5, 8)
    save_model(tmp_path / "last.safetensors", spec.build(), ModelMeta(spec, extra={"config": {"method": "ard"}}))
    argv = ["distill", "--config", "digits_student_bmtard", "--method", "ard", "--arch", "resnet20", "--width", "0.5",
            "--dataset", "digits", "--data-root", str(tmp_path), "--download", "--epochs", "3", "--batch-size", "7",
            "--lr", "1/100", "--eps", "4/255", "--step-size", "1/255", "--amp", "off", "--no-compile",
            "--no-channels-last", "--no-fold-attack", "--teacher-precision", "fp16", "--sync-bn", "--qat-from",
            str(student), "--qat-activations", "int8-symmetric", "--qat-freeze-epochs", "1", "--qat-carry-method-state",
            "--qat-float-teacher", "0.5", "--qat-disagreement", "0.25",
            "--device", "cpu", "--seed", "5", "--name", "x",
            "--out-dir", str(tmp_path / "runs"), "--robust-teacher", "r.safetensors", "--clean-teacher",
            "c.safetensors", "--no-progress"]
    cfg = config_to_dict(resolve_train_config(build_parser().parse_args(argv)))
    expected = {"method": "ard", "model.arch": "resnet20", "model.width": 0.5, "data.name": "digits",
                "data.root": str(tmp_path), "data.download": True, "epochs": 3, "batch_size": 7, "optim.lr": 0.01,
                "attack.eps": 4 / 255, "attack.step_size": 1 / 255, "amp": "off", "compile": False,
                "channels_last": False, "fold_attack": False, "sync_bn": True, "qat.enabled": True,
                "qat.from_checkpoint": str(student), "qat.activations": "int8-symmetric", "qat.freeze_epochs": 1,
                "qat.carry_method_state": True, "qat.float_teacher": 0.5, "qat.disagreement": 0.25,
                "device": "cpu",
                "seed": 5, "name": "x", "out_dir": str(tmp_path / "runs"),
                "teachers.robust.checkpoint": "r.safetensors", "teachers.clean.checkpoint": "c.safetensors",
                "teachers.robust.precision": "fp16", "teachers.clean.precision": "fp16", "progress": False}
    assert {key: _at(cfg, key) for key in expected} == pytest.approx(expected)
    # --qat-float-control: the same fine-tune in float (no --qat implied, so nothing frozen)
    at = argv.index("--qat-freeze-epochs")
    control = argv[:at] + ["--qat-float-control"] + argv[at + 2:]
    at = control.index("--qat-disagreement")  # there is no INT8 function in a float run to disagree with
    control = control[:at] + control[at + 2:]
    cfg = config_to_dict(resolve_train_config(build_parser().parse_args(control)))
    expected |= {"qat.enabled": False, "qat.float_control": True, "qat.freeze_epochs": 0, "qat.disagreement": 0.0}
    assert {key: _at(cfg, key) for key in expected} == pytest.approx(expected)
    keys = {f.key for f in config_flags()} - {"teachers.*.precision"}
    assert keys <= set(expected)


def test_flags_not_given_leave_the_recipe_alone():
    parsed = build_parser().parse_args(["distill", "--config", "digits_student_bmtard"])
    assert config_to_dict(resolve_train_config(parsed)) == config_to_dict(load_config("digits_student_bmtard"))
