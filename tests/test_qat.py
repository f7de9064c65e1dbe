"""Quantization-aware robust training: the student trains, and is attacked, as its INT8 function."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustedge import RobustEdgeError
from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
from robustedge.weights import load_model
from robustedge.config import (AttackConfig, DataConfig, ModelConfig, OptimConfig, QATConfig, TeacherConfig,
                               TrainConfig)
from robustedge.qat import QATStudent, prepare_qat
from robustedge.trainer import state_digest, train
from robustedge.training_parts import build_parts

SPEC = ModelSpec("mobilenetv2", 10, 1, 0.25, 8)


def qat_config(tmp_path, name, method="pgd_at", epochs=2, **qat) -> TrainConfig:
    return TrainConfig(
        name=name, method=method,
        data=DataConfig(name="digits", image_size=8, channels=1, padding=1, flip=False),
        model=ModelConfig(arch="mobilenetv2", width=0.25),
        attack=AttackConfig(eps=0.1, steps=2, step_size=0.05),
        optim=OptimConfig(lr=0.002, milestones=[1]), qat=QATConfig(enabled=True, **qat), epochs=epochs,
        batch_size=128, eval_every=1, eval_n=48, device="cpu", out_dir=str(tmp_path), log_every=3, progress=False)


@pytest.fixture(scope="module")
def float_student(tmp_path_factory, fit_natural):
    from robustedge.data import load_dataset

    data = load_dataset("digits", image_size=8, channels=1)
    torch.manual_seed(0)
    model = fit_natural(SPEC.build(), data.train, epochs=4)
    path = tmp_path_factory.mktemp("float") / "student.safetensors"
    return save_model(path, model, ModelMeta(SPEC, dataset="digits", eps=0.1, method="natural",
                                             classes=[str(i) for i in range(10)],
                                             extra={"data": {"seed": 0, "val_fraction": 0.1}}))


def test_the_qat_step_is_the_methods_loss_on_the_fake_quantised_student(tmp_path):
    torch.manual_seed(0)
    teachers = {}
    for role in ("robust", "clean"):
        teacher_spec = ModelSpec("resnet20", 10, 1, 0.25, 8)
        teachers[role] = str(save_model(tmp_path / f"{role}.safetensors", teacher_spec.build(),
                                        ModelMeta(teacher_spec, dataset="digits")))
    for method in ("pgd_at", "bmtard"):
        cfg = qat_config(tmp_path, method, method=method)
        cfg.teachers = {r: TeacherConfig(checkpoint=p, precision="fp32") for r, p in teachers.items()} \
            if method == "bmtard" else {}
        parts = build_parts(cfg, SPEC, torch.device("cpu"))
        assert isinstance(parts.model, QATStudent) and parts.method.attack_twin is None
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        # the attack runs in the method's released mode: train for PGD-AT (Madry et al.), eval for B-MTARD
        reference = copy.deepcopy(parts.model).train(parts.method.attack_mode == "train")
        torch.manual_seed(5)
        from robustedge.attacks import pgd

        x_adv = pgd(reference, x, y, eps=0.1, step_size=0.05, steps=2, start=parts.method.attack_start,
                    init_std=0.001)
        reference.train()
        if method == "pgd_at":
            expected = F.cross_entropy(reference(x_adv), y)
        else:
            teacher = {r: parts.method.teachers[r] for r in ("robust", "clean")}
            s_adv, s_nat = reference(x_adv), reference(x)
            # the released kl_loss averaged over batch x classes (tests/test_released_code.py)
            kl = lambda s, t: torch.mean(-F.log_softmax(s, 1) * F.softmax(t, 1)  # noqa: E731
                                         + torch.log(F.softmax(t, 1) + 1e-5) * F.softmax(t, 1))
            expected = 0.5 * kl(s_adv, teacher["robust"](x_adv)) + 0.5 * kl(s_nat, teacher["clean"](x))
        torch.manual_seed(5)
        logs, _ = parts.step(parts.model, x, y)
        # equal to float rounding: the step attacked the fake-quantised student in the method's attack mode
        # and took the method's loss on the training-mode one, exactly as computed here
        assert float(logs["loss"]) == pytest.approx(float(expected), rel=1e-5), method


def test_a_reused_prepared_graph_is_the_graph_a_fresh_prepare_gives(monkeypatch):
    """prepare_qat keeps the freshly prepared graph of a structure for later models of that structure; the
    copy with the new model's tensors must be exactly what preparing that model gives (every state entry,
    outputs in both modes). A model tensor the graph does not hold (WideResNet's unused sub_block1) is
    compared by value: when it differs, the graph is prepared afresh."""
    from robustedge import qat

    torch.manual_seed(0)
    first = ModelSpec("wideresnet-10-1", 10, 1, 1.0, 8).build()
    second = copy.deepcopy(first)  # other weights, other batch-norm statistics, other normalisation
    with torch.no_grad():
        for name, tensor in second.named_parameters():
            if not name.startswith("sub_block1"):
                tensor.add_(0.05 * torch.randn_like(tensor))
        for name, m in second.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d) and not name.startswith("sub_block1"):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    unused_differs = copy.deepcopy(second)
    with torch.no_grad():
        unused_differs.sub_block1.layer[0].conv1.weight.add_(1.0)
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))

    def prepared(model, cache):
        monkeypatch.setattr(qat, "_PREPARED", cache)
        torch.manual_seed(5)  # the provisional ranges come from a random example drawn from the global RNG
        return qat.prepare_qat(model, (1, 8, 8))

    for model, hits in ((second, 1), (unused_differs, 0)):
        cache = qat._Prepared()
        prepared(first, cache)
        reused, fresh = prepared(model, cache), prepared(model, qat._Prepared())
        assert cache.hits == hits
        for mode in (False, True):  # eval, then a training forward that moves observers and BN statistics
            reused.train(mode), fresh.train(mode)
            assert torch.equal(reused(x), fresh(x))
            a, b = reused.state_dict(), fresh.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_fast_pt2e_paths_compute_what_torchao_computes(monkeypatch):
    """robustedge/pt2e_fast.py replaces torchao's Cartesian-product partition search and skips the conv-bn
    folds of conv kinds the graph lacks. Against torchao's own functions: the same partitions in the same
    order for the x86 quantizer's patterns, the same prepared graph, and a converted model with the same
    code and bit-identical outputs (a residual network: conv-bn-add-ReLU patterns and a Linear head)."""
    import operator

    from torchao.quantization.pt2e import graph_utils, qat_utils
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer

    from robustedge import pt2e_fast, qat

    torch.manual_seed(0)
    model = ModelSpec("resnet20", 10, 1, 0.5, 8).build().train()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    graph = torch.export.export(copy.deepcopy(model), (x[:2],)).module()
    nn_ = torch.nn
    patterns = [[nn_.Conv2d, nn_.BatchNorm2d, operator.add, nn_.ReLU], [nn_.Conv2d, nn_.BatchNorm2d, nn_.ReLU],
                [nn_.Conv2d, nn_.BatchNorm2d], [nn_.Conv2d, operator.add, nn_.ReLU], [nn_.Linear, nn_.ReLU],
                [nn_.Conv2d], []]

    def nodes(found):
        return [tuple(tuple(p.nodes) for p in candidate) for candidate in found]

    for types in patterns:
        assert nodes(pt2e_fast.sequential_partitions(graph, types)) == \
            nodes(graph_utils.find_sequential_partitions(graph, types)), types
    # nine residual blocks, two of them also through their projection shortcut
    assert len(pt2e_fast.sequential_partitions(graph, patterns[0])) == 11
    with pytest.raises(ValueError):
        pt2e_fast.sequential_partitions(graph, [nn_.Conv2d, nn_.Conv2d])

    def prepare_and_convert(fast: bool):
        monkeypatch.setenv(pt2e_fast.SWITCH, "1" if fast else "0")
        monkeypatch.setattr(qat, "_PREPARED", qat._Prepared())
        with pt2e_fast.faster_pt2e() as applied:
            assert applied == fast
            assert (x86_inductor_quantizer.find_sequential_partitions is pt2e_fast.sequential_partitions) == fast
        torch.manual_seed(5)
        student = qat.prepare_qat(model, (1, 8, 8))
        qat.calibrate(student, torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(4)))
        student.train(False)
        converted = qat.convert(student)
        return student.graph.code, converted.code, converted(x)

    slow, fast = prepare_and_convert(False), prepare_and_convert(True)
    assert slow[0] == fast[0] and slow[1] == fast[1] and torch.equal(slow[2], fast[2])
    # torchao's functions are back after each block
    assert x86_inductor_quantizer.find_sequential_partitions is graph_utils.find_sequential_partitions
    assert not getattr(qat_utils._fold_conv_bn_qat_helper, "robustedge_fast", False)


def test_the_fast_pt2e_paths_leave_an_unproven_torchao_alone(monkeypatch):
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer

    from robustedge import pt2e_fast

    monkeypatch.setattr(pt2e_fast, "torchao_version", lambda: "0.19.0")
    before = (x86_inductor_quantizer.find_sequential_partitions, qat_utils._fold_conv_bn_qat_helper)
    with pt2e_fast.faster_pt2e() as applied:
        assert not applied
        assert (x86_inductor_quantizer.find_sequential_partitions, qat_utils._fold_conv_bn_qat_helper) == before


def test_eval_mode_never_moves_the_learned_ranges(float_student):
    from robustedge.attacks import pgd

    model, _ = load_model(float_student)
    student = prepare_qat(model, SPEC.input_shape)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    student(x)  # a training forward: the observers have seen data
    student.eval()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    pgd(student, x, y, eps=0.1, step_size=0.025, steps=5)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())
    student.train()
    student(x + 0.05)
    assert any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())  # training does


def test_an_evaluation_under_inference_mode_does_not_poison_later_calls(float_student):
    # the quickstart's report hit this: the eval-mode graph, first built inside torch.inference_mode by an
    # evaluation, held inference tensors that the next ordinary forward could not update in place
    model, _ = load_model(float_student)
    student = prepare_qat(model, SPEC.input_shape).eval()
    object.__setattr__(student, "_eval_graph", None)  # built lazily, on the next call
    x = torch.rand(8, 1, 8, 8)
    with torch.inference_mode():
        first = student(x)
    with torch.no_grad():
        assert torch.equal(student(x), first)
    assert student(x).requires_grad or not any(p.requires_grad for p in student.parameters())


def test_a_qat_checkpoint_resumes_bitwise(tmp_path, float_student, monkeypatch):
    """Stopped after its first epoch and resumed, a QAT run ends bitwise where the uninterrupted one does
    (learned ranges, observers, optimiser and RNG state; a quarter of the digits keeps it short), its last
    epoch frozen as the schedule says (qat.freeze_epochs: 1) in both."""
    class Stop(Exception):
        pass

    def config(name):
        cfg = qat_config(tmp_path, name, epochs=2, from_checkpoint=str(float_student), calibration_n=128,
                         freeze_epochs=1)
        cfg.data.val_fraction = 0.75
        return cfg

    events, freeze = [], QATStudent.freeze
    monkeypatch.setattr(QATStudent, "freeze", lambda self: (events.append("freeze"), freeze(self))[1])
    full = train(config("full"), callbacks=[lambda epoch, row: events.append(epoch)])
    assert events == [0, "freeze", 1]  # the first epoch trains the ranges, the last one is frozen

    def stop(epoch, row):
        if epoch == 0:
            raise Stop()

    with pytest.raises(Stop):
        train(config("cut"), callbacks=[stop])
    resumed = train(config("cut"), resume=True)
    a, meta = load_model(full.last_path)
    b, _ = load_model(resumed.last_path)
    assert isinstance(a, QATStudent) and meta.extra["qat"]["activations"] == "uint8"
    assert state_digest(a) == state_digest(b)
    assert "torchao" in meta.extra["qat"]["library"]


def test_qat_fine_tuning_starts_from_the_ptq_model(float_student, digits):
    from robustedge.data import calibration_images, load_dataset
    from robustedge.qat import calibrate

    model, _ = load_model(float_student)
    data = load_dataset("digits", image_size=8, channels=1)
    x, y = data.test.float_images(), data.test.labels
    student = prepare_qat(model, SPEC.input_shape)
    calibrate(student, calibration_images(data.train, 256, 0))
    student.eval()
    with torch.no_grad():
        float_acc = (model(x).argmax(1) == y).float().mean()
        qat_acc = (student(x).argmax(1) == y).float().mean()
    assert abs(float(float_acc - qat_acc)) < 0.03  # calibrated fake quantisation ~ the float model


@pytest.fixture(scope="module")
def qat_bundle(tmp_path_factory, float_student):
    from robustedge.edge.bundle import ExportOptions, export_bundle
    from robustedge.flags import FlagSettings

    root = tmp_path_factory.mktemp("qat")
    result = train(qat_config(root, "qat", epochs=1, from_checkpoint=str(float_student), calibration_n=256))
    manifest, failures = export_bundle(result.last_path, root / "bundle", ExportOptions(
        formats=["onnx", "onnx-int8", "trt-int8", "executorch-int8"], n=64, transfer_attacks=("pgd20",), square_n=16,
        square_queries=100, flags=FlagSettings(n=32, square_queries=100)), progress=lambda m: None)
    return root / "bundle", manifest


def test_the_exported_qat_model_matches_its_fake_quantised_torch_model(qat_bundle):
    out, manifest = qat_bundle
    parity = manifest["parity"]
    assert parity["format"] == "onnx-int8" and parity["reference"] == "the fake-quantised torch model"
    assert parity["agreement"] >= 0.95 and parity["max_abs_logit_diff"] < 1.5, parity
    print(f"QAT file vs fake-quantised torch: top-1 {100 * parity['agreement']:.1f}%, max |logit difference| "
          f"{parity['max_abs_logit_diff']:.3f}")
    assert set(manifest["files"]) == {"onnx-int8"}  # no float ONNX, no calibration
    assert "QAT student is exported as INT8 only" in manifest["skipped"]["onnx"]
    assert "int8-symmetric" in manifest["skipped"]["trt-int8"]
    assert "--qat-activations int8" in manifest["skipped"]["executorch-int8"]
    assert manifest["source"]["qat"]["activations"] == "uint8"
    assert not (out / "model.onnx").exists()


def test_the_twin_accepts_the_qat_artifact(qat_bundle):
    _, manifest = qat_bundle
    row = manifest["table"]["onnx-int8"]
    assert row["twin_agreement"] >= 0.99
    assert {"whitebox_pgd20", "whitebox_autoattack", "whitebox_diva", "worst"} <= set(row)
    assert row["worst"] <= min(row[k] for k in row if k.startswith(("whitebox_", "transfer_")))


def test_symmetric_qat_gives_zero_points_tensorrt_accepts(tmp_path, float_student):
    import onnx
    from onnx import numpy_helper

    from robustedge.edge.qat_onnx import to_qdq_onnx
    from robustedge.qat import convert

    model, _ = load_model(float_student)
    student = prepare_qat(model, SPEC.input_shape, "int8-symmetric")
    student(torch.rand(64, 1, 8, 8))
    path = to_qdq_onnx(convert(student), SPEC.input_shape, tmp_path / "s.onnx")
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    zero_points = [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
                   and n.input[2] in inits]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


def test_a_student_under_the_xnnpack_scheme_ships_as_a_pte_attacked_through_its_twin(tmp_path, float_student):
    """``--qat-activations int8``: the ExecuTorch program is the student's INT8 function (its own scales,
    no calibration at export), runs wholly in the XNNPACK delegate (the runtime refuses anything else
    without the quantized kernels), and is attacked white-box through its ONNX file's twin.
    (A QAT checkpoint made the way `train` makes one, from the PTQ start, to keep the test short.)"""
    pytest.importorskip("executorch", reason="the mobile extra (executorch) is not installed")
    from robustedge.data import calibration_images, load_dataset
    from robustedge.edge.bundle import ExportOptions, export_bundle
    from robustedge.flags import FlagSettings
    from robustedge.qat import calibrate, library_version
    from robustedge.verifier import open_runner, predict

    digits = load_dataset("digits", image_size=8, channels=1)
    model, meta = load_model(float_student)
    student = prepare_qat(model, SPEC.input_shape, "int8")
    calibrate(student, calibration_images(digits.train, 256, 0, "cpu"))
    meta.extra["qat"] = {"activations": "int8", "library": library_version(), "from_checkpoint": str(float_student)}
    checkpoint = save_model(tmp_path / "phone.safetensors", student.eval(), meta)
    out = tmp_path / "bundle"
    manifest, _ = export_bundle(checkpoint, out, ExportOptions(
        formats=["executorch-int8"], n=32, transfer_attacks=("pgd20",), whitebox_attacks=("pgd20",), square_n=0,
        flags=FlagSettings(n=10, square_queries=50)), progress=lambda m: None)
    assert set(manifest["files"]) == {"onnx-int8", "executorch-int8"}  # the ONNX file: the source and the twin
    row = manifest["table"]["executorch-int8"]
    assert row["agreement"] >= 0.95 and row["twin_agreement"] >= 0.99, row
    assert "whitebox_pgd20" in row and row["worst"] <= row["whitebox_pgd20"]
    x = digits.test.float_images()[:64].numpy()
    pte = predict(open_runner(out / "model.int8.pte", "executorch-int8"), x, what="pte")
    onnx = predict(open_runner(out / "model.int8.onnx", "onnx-int8"), x, what="onnx")
    print(f"QAT .pte vs QAT .onnx: top-1 {100 * (pte.argmax(1) == onnx.argmax(1)).mean():.1f}%, "
          f"max |logit difference| {np.abs(pte - onnx).max():.3f}")
    assert (pte.argmax(1) == onnx.argmax(1)).mean() >= 0.98  # one function, two integer runtimes


def test_qat_refuses_what_it_cannot_do(tmp_path, float_student):
    from robustedge.config import validate_config

    cfg = qat_config(tmp_path, "x", from_checkpoint=str(tmp_path / "missing.safetensors"))
    with pytest.raises(RobustEdgeError, match="qat.from_checkpoint': no such file"):
        validate_config(cfg)
    cfg = qat_config(tmp_path, "y", from_checkpoint=str(float_student))
    cfg.model.width = 0.5
    with pytest.raises(RobustEdgeError, match="width 0.25.*the config trains mobilenetv2 \\(width 0.5"):
        train(cfg)


def test_a_diverging_qat_run_stops_with_a_readable_error(tmp_path, float_student, capsys):
    """Exploded weights reach torchao's observers as a NaN range, which they assert on before the loss is
    ever NaN: the run stops with one line saying so, and with data.train_n it trains on that many images."""
    cfg = qat_config(tmp_path, "diverges", epochs=1, from_checkpoint=str(float_student))
    cfg.optim.lr, cfg.data.train_n, cfg.batch_size = 1e6, 256, 32
    with pytest.raises(RobustEdgeError, match=r"activations became NaN in epoch 1 \(step \d\): training diverged; "
                                              r"stopped\. No checkpoint was written yet.*lower optim\.lr"):
        train(cfg)
    assert "diverges: training on 256 of the 1294 training images (data.train_n)" in capsys.readouterr().out


def test_a_frozen_student_trains_against_fixed_scales_and_bn_statistics(float_student):
    """After freeze() the observers (the scales the export ships) and the batch-norm running statistics no
    longer move under training steps; the weights still learn, and the function stays the eval graph's."""
    from robustedge.data import load_dataset
    from robustedge.qat import calibrate, prepare_qat

    digits = load_dataset("digits", image_size=8, channels=1)

    student = prepare_qat(load_model(float_student)[0], SPEC.input_shape)
    calibrate(student, digits.train.float_images()[:256])
    x, y = digits.train.float_images()[:64], digits.train.labels[:64]
    optimizer = torch.optim.SGD(student.parameters(), lr=0.05)

    def step() -> None:
        student.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(student(x), y).backward()
        optimizer.step()

    def quantiser_and_bn_state() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in student.state_dict().items()
                if k.rsplit(".", 1)[-1] in ("min_val", "max_val", "scale", "zero_point", "running_mean", "running_var")}

    before = quantiser_and_bn_state()
    step()
    assert any(not torch.equal(before[k], v) for k, v in quantiser_and_bn_state().items())  # unfrozen: they move
    student.freeze()
    frozen, weights = quantiser_and_bn_state(), {k: v.clone() for k, v in student.named_parameters()}
    step()
    after = quantiser_and_bn_state()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(not torch.equal(weights[k], v) for k, v in student.named_parameters())
    student.train()
    with torch.no_grad():
        trained_view = student(x)
    assert torch.equal(trained_view, student.eval()(x))  # training mode now computes the shipped function


def test_the_fine_tune_carries_the_float_runs_method_state(tmp_path, float_student):
    """carry_method_state: the QAT run's method starts from the state in the float run's last.safetensors."""
    import shutil

    from robustedge.trainer import float_method_state
    from robustedge.training_state import save_training_state
    from robustedge.weights import load_model

    run = tmp_path / "float_run"
    run.mkdir()
    checkpoint = Path(shutil.copy(float_student, run / "best.safetensors"))
    carried = {"w_adv": torch.tensor(0.61), "w_nat": torch.tensor(0.39), "tau_adv": torch.tensor(1.0),
               "tau_nat": torch.tensor(1.32), "l0_adv": torch.tensor(0.8), "l0_nat": torch.tensor(0.3)}
    model, meta = load_model(checkpoint)
    meta.extra["config"] = {"method": "bmtard"}
    save_training_state(run / "last.safetensors", model, meta, {"config": {"method": "bmtard"}, "method": carried})
    state = float_method_state(checkpoint, "bmtard")
    assert set(state) == set(carried) and all(torch.equal(state[k], carried[k]) for k in carried)
    from robustedge.config import validate_config

    with pytest.raises(RobustEdgeError, match="was trained with method 'bmtard', this run with 'pgd_at'"):
        validate_config(qat_config(tmp_path, "other", from_checkpoint=str(checkpoint), carry_method_state=True))
    with pytest.raises(RobustEdgeError, match="trained with method 'bmtard', this run with 'mtard'"):
        float_method_state(checkpoint, "mtard")
    (run / "last.safetensors").unlink()
    with pytest.raises(RobustEdgeError, match="needs the float run's training state"):
        float_method_state(checkpoint, "bmtard")


def test_the_float_student_teaches_its_fake_quantised_copy_on_x_and_x_adv(tmp_path, float_student):
    """qat.float_teacher: the step's loss is the method's plus W * (KL(F(x') || Q(x')) + KL(F(x) || Q(x))),
    with F the float student QAT started from, Q the fake-quantised student, x' the method's own attack."""
    from robustedge.attacks import pgd
    from robustedge.methods.losses import kl_div_mean

    weight = 3.0
    cfg = qat_config(tmp_path, "ft", from_checkpoint=str(float_student), float_teacher=weight)
    parts = build_parts(cfg, SPEC, torch.device("cpu"))
    teacher, _ = load_model(float_student)
    teacher.eval()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    reference = copy.deepcopy(parts.model).train()  # PGD-AT attacks in train mode (Madry et al.)
    torch.manual_seed(5)
    x_adv = pgd(reference, x, y, eps=0.1, step_size=0.05, steps=2, start=parts.method.attack_start, init_std=0.001)
    # the same forwards in the same order: the observers move with each training-mode forward
    method_loss = F.cross_entropy(reference(x_adv), y)
    with torch.no_grad():
        targets = [F.softmax(teacher(v), 1) for v in (x_adv, x)]
    term = (kl_div_mean(reference(x_adv), targets[0]) + kl_div_mean(reference(x), targets[1])).detach()
    torch.manual_seed(5)
    logs, _ = parts.step(parts.model, x, y)
    assert float(term) > 1e-4  # the fake-quantised student differs from the float one: the term is not trivially 0
    assert float(logs["loss_float_teacher"]) == pytest.approx(float(term), rel=1e-5)
    assert float(logs["loss"]) == pytest.approx(float(method_loss + weight * term), rel=1e-5)
    with pytest.raises(RobustEdgeError, match="qat.float_teacher' needs qat.from_checkpoint"):
        from robustedge.config import validate_config

        validate_config(qat_config(tmp_path, "ft2", float_teacher=1.0))


def test_the_disagreement_term_teaches_q_the_float_answer_on_diva_examples_of_its_eval_function(tmp_path,
                                                                                                float_student):
    """qat.disagreement: the step's loss is the method's plus W * KL(F(x_d) || Q(x_d)), with x_d the DIVA examples
    (float-vs-INT8 disagreement, the training attack's budget) crafted against Q in eval mode, the function the
    export ships, and Q(x_d) a training-mode forward like the method's own."""
    from robustedge.attacks import disagreement, pgd
    from robustedge.config import validate_config
    from robustedge.methods.losses import kl_div_mean

    weight = 2.0
    cfg = qat_config(tmp_path, "diva", from_checkpoint=str(float_student), disagreement=weight)
    parts = build_parts(validate_config(cfg), SPEC, torch.device("cpu"))
    assert parts.float_teacher is not None  # kept for the attack although the float-teacher term is off
    teacher, _ = load_model(float_student)
    teacher.eval()
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    reference = copy.deepcopy(parts.model).train()
    torch.manual_seed(5)
    x_adv = pgd(reference, x, y, eps=0.1, step_size=0.05, steps=2, start=parts.method.attack_start, init_std=0.001)
    method_loss = F.cross_entropy(reference(x_adv), y).detach()
    x_d = disagreement(teacher, reference.eval(), x, y, eps=0.1, step_size=0.05, steps=2)
    reference.train()
    with torch.no_grad():
        target = F.softmax(teacher(x_d), 1)
    term = kl_div_mean(reference(x_d), target).detach()
    with torch.no_grad():  # the attack did its job: Q is less right than F on x_d, by more than on x
        gap = [float((F.softmax(teacher(v), 1) - F.softmax(reference.eval()(v), 1)).gather(1, y[:, None]).sum())
               for v in (x, x_d)]
    assert gap[1] > gap[0]
    torch.manual_seed(5)
    logs, _ = parts.step(parts.model, x, y)
    assert parts.model.training  # the attack's eval view handed the student back in training mode
    assert "loss_float_teacher" not in logs
    assert float(term) > 1e-4
    assert float(logs["loss_disagreement"]) == pytest.approx(float(term), rel=1e-5)
    assert float(logs["loss"]) == pytest.approx(float(method_loss + weight * term), rel=1e-5)
    for change, message in (({"from_checkpoint": None}, "'qat.disagreement' needs qat.from_checkpoint and "
                                                        "qat.enabled: true"),
                            ({"enabled": False, "float_control": True}, "'qat.disagreement' needs"),
                            ({"disagreement": float("nan")}, "'qat.disagreement' must be a finite number")):
        bad = copy.deepcopy(cfg)
        for key, value in change.items():
            setattr(bad.qat, key, value)
        with pytest.raises(RobustEdgeError, match=message):
            validate_config(bad)
    for method, steps in (("natural", 2), ("pgd_at", 0)):  # no training attack, no budget to craft x_d with
        bad = dataclasses.replace(copy.deepcopy(cfg), method=method)
        bad.attack.steps = steps
        with pytest.raises(RobustEdgeError, match=f"method '{method}' with attack.steps {steps} has no training"):
            validate_config(bad)


def test_the_float_control_is_the_same_fine_tune_without_fake_quantisers(tmp_path, float_student, monkeypatch):
    """qat.float_control: the fine-tune of qat.from_checkpoint (its weights, the carried method state, the float
    teacher) in float, the control that tells QAT's gain from more training; it ships as a float model."""
    import shutil

    import robustedge.trainer as trainer_module
    from robustedge.checkpoint import read_meta
    from robustedge.config import validate_config
    from robustedge.training_state import save_training_state

    run = tmp_path / "float_run"
    run.mkdir()
    checkpoint = Path(shutil.copy(float_student, run / "best.safetensors"))
    start, meta = load_model(checkpoint)
    meta.extra["config"] = {"method": "pgd_at"}
    save_training_state(run / "last.safetensors", start, meta, {"config": {"method": "pgd_at"}, "method": {}})
    cfg = qat_config(tmp_path, "control", epochs=1, from_checkpoint=str(checkpoint), float_teacher=1.0,
                     carry_method_state=True, float_control=True)
    cfg.qat.enabled = False
    parts = build_parts(validate_config(copy.deepcopy(cfg)), SPEC, torch.device("cpu"))
    assert not isinstance(parts.model, QATStudent) and parts.float_teacher is not None
    assert parts.model.state_dict().keys() == start.state_dict().keys()
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in parts.model.state_dict().items())
    gen = torch.Generator().manual_seed(2)
    x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    logs, _ = parts.step(parts.model, x, y)
    assert float(logs["loss_float_teacher"]) > 0  # the float student teaches its float copy (train-mode BN differs)
    carried = []
    monkeypatch.setattr(trainer_module, "float_method_state",
                        lambda file, method: carried.append((file, method)) or {})
    result = train(validate_config(cfg))
    assert carried == [(str(checkpoint), "pgd_at")]
    from robustedge.qat_recipe import float_run_config

    with pytest.raises(RobustEdgeError, match="is the float control of a fine-tune of .*; fine-tune from that float"):
        float_run_config(result.last_path)  # the recipe would shrink an already shortened run again
    assert "qat" not in read_meta(result.last_path).extra  # a float model: the export quantises it after training
    trained, _ = load_model(result.last_path)
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in trained.state_dict().items())
    for change, message in (({"enabled": True}, "'qat.float_control' runs the fine-tune of qat.from_checkpoint in "
                                                "float: it needs qat.from_checkpoint and qat.enabled: false"),
                            ({"float_control": False}, "'qat.from_checkpoint' needs qat.enabled: true"),
                            ({"from_checkpoint": None, "float_teacher": 0.0, "carry_method_state": False},
                             "'qat.float_control' runs the fine-tune")):
        bad = copy.deepcopy(cfg)
        for key, value in change.items():
            setattr(bad.qat, key, value)
        with pytest.raises(RobustEdgeError, match=message):
            validate_config(bad)


def test_qat_from_alone_fine_tunes_the_float_runs_own_config_under_the_recipe(tmp_path, float_student, capsys,
                                                                                monkeypatch):
    """`train/distill --qat-from FILE` without --config, and `robustedge.train(qat_from=FILE)`: the config FILE
    records under the QAT recipe (robustedge/qat_recipe.py), beside the float run, flags and overrides on top."""
    import yaml

    import robustedge
    from robustedge.cli import main
    from robustedge.config import config_to_dict

    float_cfg = qat_config(tmp_path, "float", epochs=10)
    float_cfg.qat, float_cfg.optim.lr, float_cfg.out_dir = QATConfig(), 0.5, "elsewhere"
    model, meta = load_model(float_student)
    meta.extra["config"] = config_to_dict(float_cfg)
    checkpoint = str(save_model(tmp_path / "runs" / "float" / "best.safetensors", model, meta))
    assert main(["train", "--qat-from", checkpoint, "--dry-run", "--timing-steps", "0", "--seed", "7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out.split("\n\n")[0])
    assert (printed["name"], printed["method"], printed["epochs"], printed["eval_every"]) == ("float_qat", "pgd_at", 3, 3)
    assert (printed["optim"]["lr"], printed["optim"]["schedule"], printed["seed"]) == (0.05, "cosine", 7)
    assert printed["out_dir"] == str((tmp_path / "runs").resolve())  # beside the float run, wherever it was
    assert printed["qat"] == {"enabled": True, "activations": "uint8", "from_checkpoint": checkpoint,
                              "calibration_n": 512, "freeze_epochs": 2, "float_teacher": 1.0, "disagreement": 0.0,
                              "carry_method_state": False, "float_control": False}  # no last.safetensors beside it
    # a short float run's fine-tune still ends with a frozen epoch (without one QAT lost 4.5 points)
    from robustedge.qat_recipe import fine_tune_config

    short_run = fine_tune_config(dataclasses.replace(float_cfg, epochs=4), checkpoint)
    assert (short_run.epochs, short_run.qat.freeze_epochs) == (2, 1)
    # --epochs sets the fine-tune's length, and what depends on it follows
    assert main(["train", "--qat-from", checkpoint, "--dry-run", "--timing-steps", "0", "--epochs", "1"]) == 0
    short = yaml.safe_load(capsys.readouterr().out.split("\n\n")[0])
    assert (short["epochs"], short["eval_every"], short["qat"]["freeze_epochs"]) == (1, 1, 0)
    seen = {}
    monkeypatch.setattr("robustedge.trainer.train", lambda cfg, resume=False: seen.setdefault("cfg", cfg))
    robustedge.train(qat_from=checkpoint, seed=7)
    assert config_to_dict(seen["cfg"]) | {"progress": printed["progress"]} == printed  # the API builds the same run
    # --qat-float-control: the same fine-tune in float, in a run of its own; the API the same
    assert main(["train", "--qat-from", checkpoint, "--qat-float-control", "--dry-run", "--timing-steps", "0",
                 "--seed", "7"]) == 0
    control = yaml.safe_load(capsys.readouterr().out.split("\n\n")[0])
    assert control == printed | {"name": "float_float_control",
                                 "qat": printed["qat"] | {"enabled": False, "float_control": True, "freeze_epochs": 0}}
    seen.clear()
    robustedge.train(qat_from=checkpoint, seed=7, qat__float_control=True)
    assert config_to_dict(seen["cfg"]) | {"progress": control["progress"]} == control
    meta.extra["qat"] = {"activations": "uint8"}
    qat_file = save_model(tmp_path / "qat.safetensors", model, meta)
    with pytest.raises(RobustEdgeError, match="is already a QAT student"):
        robustedge.train(qat_from=qat_file)


def _ort_operators(path: Path) -> dict[str, int]:
    """The operators of ONNX Runtime's optimised graph of ``path`` (what it runs), counted."""
    import collections

    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".optimised.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return dict(collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))


def test_the_uint8_qat_file_runs_the_ptq_files_integer_operators_on_onnx_runtime(tmp_path, float_student):
    """The uint8 scheme quantises each residual add's inputs as onnxruntime's quantizer does, so ONNX Runtime
    runs the QAT file with the PTQ file's integer operators (QLinearConv, QLinearAdd), none in float. Under
    the x86 quantizer's own patterns (what older students were trained under, and still load as) the
    convolutions before the adds stay float."""
    from robustedge.data import calibration_images, load_dataset
    from robustedge.edge.convert import export_onnx, quantize_int8
    from robustedge.edge.qat_onnx import to_qdq_onnx
    from robustedge.qat import LEGACY_PATTERNS, calibrate, convert, library_version

    images = calibration_images(load_dataset("digits", image_size=8, channels=1).train, 128, 0, "cpu")
    model, meta = load_model(float_student)
    quantize_int8(export_onnx(model, SPEC.input_shape, tmp_path / "fp32.onnx"), tmp_path / "ptq.onnx", images.numpy())
    ptq = _ort_operators(tmp_path / "ptq.onnx")
    assert ptq.get("QLinearAdd") and ptq.get("QLinearConv") and "Conv" not in ptq and "Add" not in ptq
    students = {}
    for patterns in ("onnxruntime", LEGACY_PATTERNS["uint8"]):
        student = prepare_qat(load_model(float_student)[0], SPEC.input_shape, "uint8", patterns)
        calibrate(student, images)
        students[patterns] = student
        to_qdq_onnx(convert(student), SPEC.input_shape, tmp_path / f"{patterns}.onnx")
    ours = _ort_operators(tmp_path / "onnxruntime.onnx")
    kinds = ("QLinearConv", "QLinearAdd", "Conv", "FusedConv", "Add")
    assert {k: ours.get(k) for k in kinds} == {k: ptq.get(k) for k in kinds}, (ours, ptq)
    old_patterns = _ort_operators(tmp_path / "x86-inductor.onnx")  # float convolutions before each add
    assert old_patterns.get("QLinearConv", 0) < ptq["QLinearConv"] and "QLinearAdd" not in old_patterns
    # a student saved without the patterns key (before it existed) loads under its scheme's old patterns
    meta.extra["qat"] = {"activations": "uint8", "library": library_version()}
    old = save_model(tmp_path / "old.safetensors", students["x86-inductor"].eval(), meta)
    loaded, _ = load_model(old)
    x = images[:32]
    assert loaded.patterns == "x86-inductor" and torch.equal(loaded(x), students["x86-inductor"].eval()(x))


def test_a_qat_run_of_the_old_patterns_is_not_resumed_under_the_new_ones(tmp_path, float_student):
    """Resuming a uint8 QAT run saved before the patterns were recorded (x86 patterns) is refused in one line
    before anything is written: its quantisers sit elsewhere than this version's."""
    cfg = qat_config(tmp_path, "old", from_checkpoint=str(float_student))
    model, meta = load_model(float_student)
    meta.extra["qat"] = {"activations": "uint8"}  # no patterns key: an older student
    cfg.run_dir.mkdir(parents=True)
    last = save_model(cfg.run_dir / "last.safetensors", model, meta)
    before = last.read_bytes()
    with pytest.raises(RobustEdgeError, match="'x86-inductor' places .* cannot resume it"):
        train(cfg, resume=True)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["last.safetensors"] and last.read_bytes() == before


def test_pt2e_ptq_is_the_qat_file_of_zero_epochs(tmp_path, float_student):
    """--int8-quantizer pt2e: the float student quantised by the quantizer QAT trains under, calibrated on the
    export's calibration images and converted, computes exactly what the QAT student of zero epochs (prepared and
    calibrated as the trainer does, on the same images) exports to: the fair PTQ baseline of issue 26."""
    import onnxruntime as ort

    from robustedge.data import calibration_images, load_dataset, split_for_model
    from robustedge.edge.bundle import ExportOptions, export_bundle
    from robustedge.edge.qat_onnx import to_qdq_onnx
    from robustedge.flags import FlagSettings
    from robustedge.qat import calibrate, convert

    light = dict(formats=["onnx-int8"], n=16, transfer_attacks=("pgd20",), whitebox_attacks=(), square_n=0,
                 calibration_n=128, flags=FlagSettings(n=10, steps=5, restarts=1, square_queries=10))
    export_bundle(float_student, tmp_path / "ptq", ExportOptions(int8_quantizer="pt2e", **light),
                  progress=lambda m: None)
    model, meta = load_model(float_student)
    zero_epochs = prepare_qat(model, SPEC.input_shape)
    calibrate(zero_epochs, calibration_images(split_for_model(meta, None, None, "train", None), 128, 0))
    # what a QAT student's bundle writes (robustedge/edge/bundle.py, the QAT branch of _convert)
    qat_file = to_qdq_onnx(convert(zero_epochs), SPEC.input_shape, tmp_path / "qat0.onnx")
    x = load_dataset("digits", image_size=8, channels=1).test.float_images().numpy()
    sessions = [ort.InferenceSession(str(path)) for path in (tmp_path / "ptq" / "model.int8.onnx", qat_file)]
    logits = [s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions]
    assert np.array_equal(*logits)
    with pytest.raises(RobustEdgeError, match="calibrates by min-max"):
        ExportOptions(int8_quantizer="pt2e", calibration_method="entropy").validate()
