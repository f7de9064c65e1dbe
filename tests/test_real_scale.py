"""Real-scale paths: the papers' teacher files, RobustBench, 64x64 stems, dry-run, the report."""

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.teachers import load_teacher
from robustedge.cli import main
from robustedge.config import TeacherConfig
from robustedge.models import build_model, stem_stride

ROOT = Path(__file__).resolve().parents[1]


# ---- teacher files in the layouts the papers publish -----------------------------------------

@pytest.mark.parametrize("arch, width, layout", [
    ("wrn34_10", 0.125, "trades"),      # TRADES model_cifar_wrn.pt: a bare state dict
    ("resnet56", 1.0, "chenyaofo"),     # chenyaofo/pytorch-cifar-models: a bare state dict
    ("resnet18", 0.25, "kuangliu"),     # kuangliu/pytorch-cifar ckpt.pth: {'net': DataParallel dict, 'acc', 'epoch'}
    ("mobilenetv2", 0.5, "kuangliu"),
])
def test_paper_teacher_files_load_strictly_and_give_the_same_logits(tmp_path, arch, width, layout):
    torch.manual_seed(0)
    source = build_model(arch, 10, 3, width).eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding is really exercised
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    state = source.state_dict()
    if layout == "kuangliu":
        payload = {"net": {f"module.{k}": v for k, v in state.items()}, "acc": 95.1, "epoch": 199}
    else:
        payload = state
    path = tmp_path / f"{layout}_{arch}.pt"
    torch.save(payload, path)
    teacher = load_teacher(TeacherConfig(checkpoint=str(path), arch=arch, width=width, precision="fp32"), 10, 3, 32)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), source(x), atol=1e-4)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(RobustEdgeError, match="missing"):
        load_teacher(TeacherConfig(checkpoint=str(tmp_path / "bad.pt"), arch=arch, width=width), 10, 3, 32)


def test_robustbench_teacher_needs_the_zoo_extra_or_uses_its_loader(monkeypatch):
    cfg = TeacherConfig(checkpoint="robustbench:Carmon2019Unlabeled", precision="fp32")
    monkeypatch.setitem(sys.modules, "robustbench", None)  # not installed
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    with pytest.raises(RobustEdgeError, match=r"pip install 'robustedge\[zoo\]'"):
        load_teacher(cfg, 10, 3, 32, dataset="cifar10")

    calls = {}

    def fake_load_model(model_name, dataset, threat_model, model_dir):
        calls.update(model_name=model_name, dataset=dataset, threat_model=threat_model)
        torch.manual_seed(0)
        return build_model("resnet20", 10, 3, 0.25)

    utils = types.ModuleType("robustbench.utils")
    utils.load_model = fake_load_model
    package = types.ModuleType("robustbench")
    package.utils = utils
    monkeypatch.setitem(sys.modules, "robustbench", package)
    monkeypatch.setitem(sys.modules, "robustbench.utils", utils)
    teacher = load_teacher(cfg, 10, 3, 32, dataset="cifar10")
    assert calls == {"model_name": "Carmon2019Unlabeled", "dataset": "cifar10", "threat_model": "Linf"}
    assert teacher(torch.rand(2, 3, 32, 32)).shape == (2, 10) and teacher.training is False
    with pytest.raises(RobustEdgeError, match="predicts 10 classes; the data has 100"):
        load_teacher(cfg, 100, 3, 32, dataset="cifar100")
    with pytest.raises(RobustEdgeError, match="no L-inf models for dataset 'digits'"):
        load_teacher(cfg, 10, 3, 32, dataset="digits")


# ---- Tiny-ImageNet: 64x64 stems ----------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "mobilenetv2", "wideresnet-16-2", "resnet20"])
def test_stems_adapt_to_64x64_and_weights_still_load(arch):
    assert (stem_stride(8), stem_stride(32), stem_stride(64)) == (1, 1, 2)
    small, large = build_model(arch, 200, 3, 0.25, image_size=32), build_model(arch, 200, 3, 0.25, image_size=64)
    assert large.conv1.stride == (2, 2) and small.conv1.stride == (1, 1)
    large.load_state_dict(small.state_dict(), strict=True)  # CIFAR weights fit the 64x64 model
    seen = {}
    large.conv1.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    assert large.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 200)
    assert seen["shape"][-2:] == (32, 32)  # the first stage works on CIFAR's grid


def test_tiny_imagenet_folder_trains_a_64x64_model(tmp_path):
    import numpy as np
    from PIL import Image

    from robustedge.config import TrainConfig
    from robustedge.trainer import train

    rng = np.random.default_rng(0)
    classes = ["n01443537", "n01629819", "n01641577"]
    lines = []
    for c in classes:
        folder = tmp_path / "tiny" / "train" / c / "images"
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{c}_{i}.JPEG")
    (tmp_path / "tiny" / "val" / "images").mkdir(parents=True)
    for i, c in enumerate(classes * 2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / "tiny" / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{c}\t0\t0\t63\t63")
    (tmp_path / "tiny" / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(name="tiny", method="pgd_at", epochs=1, batch_size=8, eval_n=6, device="cpu",
                      out_dir=str(tmp_path / "runs"), progress=False)
    cfg.data.name, cfg.data.root, cfg.data.val_fraction = "imagefolder", str(tmp_path / "tiny"), 0.2
    cfg.model.arch, cfg.model.width = "mobilenetv2", 0.25
    cfg.attack.steps = 2
    result = train(cfg)
    from robustedge.weights import load_model

    model, meta = load_model(result.best_path)
    assert meta.spec.image_size == 64 and meta.spec.num_classes == 3 and model.conv1.stride == (2, 2)


# ---- distill --dry-run ---------------------------------------------------------------------------

def test_distill_dry_run_prints_config_parameters_and_epoch_time(digits_checkpoint, tmp_path, capsys):
    code = main(["distill", "--config", "digits_student_bmtard", "--dry-run", "--batch-size", "16",
                 "--out-dir", str(tmp_path),
                 "--robust-teacher", str(digits_checkpoint),
                 "--set", f"teachers.clean.checkpoint={tmp_path / 'missing.pt'}", "--set", "teachers.clean.arch=resnet20"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "method: bmtard" in out and "batch_size: 16" in out  # the resolved config
    assert "student: mobilenetv2 (width 0.25):" in out and "parameters" in out
    assert "missing.pt not found: random weights for the timing" in out
    assert "estimated time per epoch:" in out and "img/s" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    code = main(["distill", "--config", "digits_student_bmtard", "--dry-run",
                 "--set", f"teachers.robust.checkpoint={tmp_path / 'nothing.pt'}"])
    assert code == 2 and "not found, and no 'arch'" in capsys.readouterr().err


# ---- the report ----------------------------------------------------------------------------------

@pytest.fixture
def report_runs(models_folder, digits_model, digits, tmp_path):
    """A folder of runs: the demo's checkpoint with a B-MTARD-like history, an evaluation and the
    export bundle beside it (as the quickstart lays them out)."""
    from robustedge.suite import evaluate

    root = tmp_path / "runs"
    shutil.copytree(models_folder / "natural", root / "student")
    shutil.copytree(models_folder / "natural_export", root / "student_export")
    rows = ["epoch,lr,loss,train_acc,val_clean,val_pgd20,val_wrobust,img_per_s,seconds,tau_adv,tau_nat,w_adv,w_nat"]
    for e in range(1, 6):
        rows.append(f"{e},0.1,{2 / e:.3f},{0.5 + e / 20:.3f},{0.8 + e / 50:.3f},{0.2 + e / 30:.3f},0.6,300,4,"
                    f"{1 + e / 1000:.4f},1.0,{0.5 + e / 100:.3f},{0.5 - e / 100:.3f}")
    (root / "student" / "metrics.csv").write_text("\n".join(rows) + "\n")
    x, y = digits.test.take(40).float_images(), digits.test.take(40).labels
    evaluate(digits_model, x, y, attacks=["clean", "fgsm", "pgd20"], eps=0.1, show_progress=False).save(
        root / "student" / "eval.json")
    return root


def test_report_renders_every_section_and_caches_the_eps_curve(report_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(report_runs), "--out", str(out), "--curve-n", "32"]) == 0
    page = (out / "report.html").read_text()
    for text in ("Summary", "student (natural wideresnet-10-1)", "pgd20", "fgsm",
                 "onnx-int8", "transfer pgd20 (%)", "data:image/png;base64,"):
        assert text in page, text
    assert page.count("<img") == 3  # scatter, eps curves, training curves
    md = (out / "report.md").read_text()
    for name in ("scatter", "eps_curves", "training_student"):
        assert f"report_files/{name}.png" in md and (out / "report_files" / f"{name}.png").stat().st_size > 5000
    curve = json.loads((report_runs / "student" / "eps_curve.json").read_text())
    assert curve["n"] == 32 and curve["eps"][0] == 0 and curve["accuracy"][0] >= curve["accuracy"][-1]
    assert curve["accuracy"][0] > 0.8 and curve["accuracy"][-1] < curve["accuracy"][0]  # a non-robust model breaks
    assert main(["report"]) == 2
    assert "the following arguments are required: runs" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing_here")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_report_in_headless_chromium(report_runs, tmp_path, chrome, keep_screenshot):
    from robustedge.report import build_report

    page = build_report([report_runs], tmp_path / "report", curve_n=32, progress=lambda m: None)
    driver = chrome("1300,2200")
    driver.get(page.resolve().as_uri())
    images = driver.find_elements("tag name", "img")
    assert len(images) == 3
    assert all(driver.execute_script("return arguments[0].naturalWidth", img) > 300 for img in images)
    assert "onnx-int8" in driver.find_element("tag name", "body").text
    shot = tmp_path / "report.png"
    driver.save_screenshot(str(shot))
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size[0] >= 1000 and sum(1 for count in image.histogram() if count) > 50  # a rendered page, not a blank one
    keep_screenshot(shot, "report.png")


@pytest.mark.parametrize("name,content", [
    ("student/metrics.csv", "epoch,loss\nabc,1\n"),
    ("student/eval.json", "{broken"),
    ("student/eval.json", '{"accuracy": {"clean": "high"}}'),
    ("student_export/manifest.json", '{"format": "robustedge-bundle/1"}'),
    ("student/eps_curve.json", '{"n": "x"}'),
])
def test_report_skips_a_malformed_file_with_a_warning_naming_it(report_runs, tmp_path, capsys, name, content):
    (report_runs / name).write_text(content)
    out = tmp_path / "report"
    assert main(["report", str(report_runs), "--out", str(out), "--curve-n", "8"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped {report_runs / name}" in err
    assert f"skipped {report_runs / name}" in (out / "report.html").read_text()
    assert (report_runs / name).read_text() == content  # a file that may not be ours is never rewritten
    assert main(["report", str(report_runs), "--out", str(out), "--curve-n", "8"]) == 0  # replaces its own report


def test_a_report_from_runs_read_elsewhere_is_the_report_read_here(report_runs, tmp_path):
    """The quickstart reads its runs in its workers (report.collect) and hands them to build_report: the
    page must be the one build_report gives reading them itself, warnings included, and the run is
    not read again (its eps curve is not recomputed)."""
    from robustedge.report import build_report, collect

    (report_runs / "student" / "eval.json").write_text("{broken")
    build_report([report_runs], tmp_path / "here", curve_n=16, progress=lambda m: None)
    (report_runs / "student" / "eps_curve.json").unlink()
    info = collect(report_runs / "student", 16)
    assert info.skipped and "eval.json" in info.skipped[0] and info.latency_threads == torch.get_num_threads()
    info.curve = dict(info.curve, accuracy=[0.5] * len(info.curve["accuracy"]))  # tells which curve was drawn
    (report_runs / "student" / "eps_curve.json").unlink()  # collect cached it; a second reading would again
    messages = []
    elsewhere = build_report([report_runs], tmp_path / "elsewhere", curve_n=16, progress=messages.append,
                             collected=[info])
    assert messages == info.skipped  # the run's warnings are still printed, once
    assert json.loads((tmp_path / "elsewhere" / "report.json").read_text())["warnings"] == info.skipped
    assert json.loads((tmp_path / "here" / "report.json").read_text())["warnings"] == info.skipped
    assert "(computing the eps curve)" not in " ".join(messages)
    def text(folder):  # the page's words and tables; latency is measured again on each reading
        return [line for line in (folder / "report.md").read_text().splitlines() if "Latency" not in line]

    assert text(tmp_path / "here") == text(tmp_path / "elsewhere") and "eval.json" in elsewhere.read_text()
    figure = "report_files/eps_curves.png"  # drawn from the handed-in curve, not from a fresh reading
    assert (tmp_path / "here" / figure).read_bytes() != (tmp_path / "elsewhere" / figure).read_bytes()
    assert not (report_runs / "student" / "eps_curve.json").exists()  # the run was not read again
