"""Any model in: a kuangliu-layout .pt, a RobustBench stand-in and a live nn.Module give the numbers of the
equivalent RobustEdge checkpoint, through the CLI and the Python API; `robustedge import` keeps one."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

import robustedge
from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
from robustedge.weights import load_model
from robustedge.cli import main

EVAL = ["--attacks", "clean,fgsm,pgd20", "--n", "24", "--batch-size", "8", "--no-flags", "--no-progress"]


def _correct(folder) -> dict:
    report = json.loads((folder / "eval.json").read_text())
    return {"correct": report["correct"], "accuracy": report["accuracy"]}


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """A ResNet-18 for 16x16 digits as a RobustEdge checkpoint and as kuangliu's pytorch-cifar saves one
    ({'net': DataParallel state dict, 'acc', 'epoch'})."""
    root = tmp_path_factory.mktemp("resnet18")
    spec = ModelSpec("resnet18", 10, 1, 1.0, 16)
    torch.manual_seed(0)
    model = spec.build().eval()
    ckpt = save_model(root / "resnet18.safetensors", model,
                      ModelMeta(spec, dataset="digits", eps=0.1, extra={"data": {"seed": 0, "val_fraction": 0.1}}))
    torch.save({"net": {f"module.{k}": v for k, v in model.state_dict().items()}, "acc": 91.5, "epoch": 199},
               root / "ckpt.pth")
    return ckpt, root / "ckpt.pth"


def test_a_kuangliu_checkpoint_evaluates_like_the_robustedge_one(tmp_path, resnet18_files):
    ckpt, pth = resnet18_files
    assert main(["eval", str(ckpt), "--out", str(tmp_path / "ours"), *EVAL]) == 0
    assert main(["eval", str(pth), "--arch", "resnet18", "--dataset", "digits", "--out", str(tmp_path / "pth"),
                 *EVAL]) == 0
    assert _correct(tmp_path / "ours") == _correct(tmp_path / "pth")
    # import keeps it as a self-describing checkpoint with the same weights and metadata
    out = tmp_path / "imported.safetensors"
    assert main(["import", str(pth), "--arch", "resnet18", "--dataset", "digits", "--out", str(out)]) == 0
    model, meta = load_model(out)
    reference, _ = load_model(ckpt)
    assert (meta.spec.arch, meta.dataset, meta.eps, meta.spec.image_size) == ("resnet18", "digits", 0.1, 16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert meta.extra["source"]["kind"] == "state dict"
    assert main(["import", str(pth), "--arch", "resnet18", "--dataset", "digits", "--out", str(out)]) == 2  # exists


def test_a_robustbench_model_and_a_live_module_give_the_checkpoints_numbers(monkeypatch, digits_checkpoint, digits):
    """RobustBench stand-in: the package's load_model(model_name, dataset, threat_model, model_dir) returns a
    module taking [0, 1] images; here it returns the digits model, on digits images given to the API."""
    model, meta = load_model(digits_checkpoint)
    asked = {}

    def load_model_stand_in(model_name, dataset, threat_model, model_dir):
        asked.update(name=model_name, dataset=dataset, threat_model=threat_model, model_dir=model_dir)
        return load_model(digits_checkpoint)[0]

    package, utils = types.ModuleType("robustbench"), types.ModuleType("robustbench.utils")
    utils.load_model = load_model_stand_in
    package.utils = utils
    monkeypatch.setitem(sys.modules, "robustbench", package)
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    monkeypatch.setenv("ROBUSTEDGE_CACHE", str(digits_checkpoint.parent / "cache"))
    test = digits.test.take(24)
    kwargs = dict(attacks="clean,fgsm,pgd20", eps=0.1, batch_size=8, flags=False, show_progress=False)
    ours = robustedge.evaluate(model, test.images, test.labels, **kwargs)
    live = robustedge.evaluate(load_model(digits_checkpoint)[0], test.float_images().numpy(), test.labels.numpy(),
                               **kwargs)
    bench_model, bench_meta = robustedge.load("robustbench:Stand_In", dataset="cifar10", num_classes=10,
                                              in_channels=1, image_size=16)
    bench = robustedge.evaluate(bench_model, test.images, test.labels, **kwargs)
    assert ours.correct == live.correct == bench.correct and ours.accuracy == bench.accuracy
    assert asked == {"name": "Stand_In", "dataset": "cifar10", "threat_model": "Linf",
                     "model_dir": str(digits_checkpoint.parent / "cache" / "robustbench")}
    assert bench_meta.spec.arch == "robustbench:Stand_In" and bench_meta.eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("source, facts, message", [
    ("missing.pth", {"arch": "resnet18"}, "checkpoint not found"),
    ("{txt}", {"arch": "resnet18"}, "not a weights-only torch checkpoint"),
    ("{pth}", {}, "pass --arch"),
    ("{pth}", {"arch": "resnet34"}, "does not fit architecture 'resnet34'"),
    ("{pth}", {"arch": "resnet18", "dataset": "imagefolder"}, "no standard shape"),
    ("{pth}", {"arch": "resnet18", "mean": [0.5]}, "^mean and std must be given together"),
    ("{pth}", {"arch": "nosuchnet"}, "unknown model"),
])
def test_a_foreign_model_that_cannot_load_says_why_in_one_line(tmp_path, resnet18_files, source, facts, message):
    (tmp_path / "weights.txt").write_text("not weights")
    source = source.format(pth=resnet18_files[1], txt=tmp_path / "weights.txt") if "{" in source else \
        str(tmp_path / source)
    with pytest.raises(robustedge.RobustEdgeError, match=message) as info:
        robustedge.load(source, **facts)
    assert "\n" not in str(info.value)


def test_a_module_that_is_not_a_classifier_of_the_data_is_refused():
    with pytest.raises(robustedge.RobustEdgeError, match=r"expected logits of shape \(1, 10\)"):
        robustedge.load(torch.nn.Flatten(), dataset="digits")


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's Python block, run as written, against a quickstart-shaped checkpoint."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"### Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    spec = ModelSpec("mobilenetv2", 10, 1, 0.25, 8)
    torch.manual_seed(0)
    (tmp_path / "runs/quickstart/student_bmtard").mkdir(parents=True)
    save_model(tmp_path / "runs/quickstart/student_bmtard/best.safetensors", spec.build().eval(),
               ModelMeta(spec, dataset="digits", eps=0.1, extra={"data": {"seed": 0, "val_fraction": 0.1}}))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert set(scope["report"].accuracy) == {"clean", "pgd20"} and scope["report"].n == 100
