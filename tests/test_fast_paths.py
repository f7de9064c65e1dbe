"""The performance paths keep the numerics: folded attack twin, bf16/inference-mode teachers, the
trainer's step against the authors'-style reference loop (robustedge/reference.py), auto batch size, worker pools."""

import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustedge import RobustEdgeError
from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
from robustedge.reference import ReferenceStep
from robustedge.teachers import FrozenTeacher, teacher_dtype
from robustedge.config import AttackConfig, TeacherConfig, TrainConfig
from robustedge.models import build_model, fold_batchnorm
from robustedge.runtime import parallel_plan, run_jobs
from robustedge.training_parts import build_parts

@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv2", "preact_resnet18", "wideresnet-10-2"])
def test_linked_twin_follows_the_training_model(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10, 3, width=0.25).to(memory_format=torch.channels_last)
    model.set_normalization([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    twin = fold_batchnorm(model, linked=True)
    assert not any(p.requires_grad for p in twin.parameters())
    assert not any(k.startswith("_source") for k in twin.state_dict())  # a reference, not a submodule
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.rand(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    for _ in range(3):  # weights and BN statistics move
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(8)).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            expected = model(x)
            stale = twin(x)
            fresh = twin.refresh()(x)
        scale = expected.abs().max()
        assert (fresh - expected).abs().max() <= 1e-5 * scale
        assert (stale - expected).abs().max() > 1e-4 * scale  # refresh is what keeps it right
    assert model.training is False  # refresh does not touch the model's mode
    with pytest.raises(RuntimeError, match="linked=True"):
        fold_batchnorm(model).refresh()


def test_frozen_teacher_outputs_can_be_used_as_loss_targets():
    teacher = FrozenTeacher(build_model("resnet20", 10, 3, width=0.25), "bf16")
    assert teacher.dtype == torch.bfloat16 and teacher.training is False
    x = torch.rand(4, 3, 16, 16)
    target = F.softmax(teacher(x), dim=1)
    assert target.dtype == torch.float32 and not target.is_inference()
    student = build_model("resnet20", 10, 3, width=0.25)
    F.kl_div(F.log_softmax(student(x), 1), target, reduction="batchmean").backward()  # saves the target
    assert not any(p.grad is not None for p in teacher.parameters())
    assert teacher_dtype("fp32") == torch.float32
    assert teacher_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(RobustEdgeError, match="valid: auto, fp32"):
        teacher_dtype("int4")


# ---- our step against the authors'-style reference (what bench/train_step.py times) -----------

@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for seed, (role, arch) in enumerate({"robust": "wideresnet-10-1", "clean": "resnet20"}.items()):
        torch.manual_seed(seed)
        model = build_model(arch, 10, 3, width=0.5 if arch == "resnet20" else 1.0)
        with torch.no_grad():  # confident teachers, as trained ones are: the loss check means something
            model.fc.weight.mul_(20) if hasattr(model, "fc") else model.linear.weight.mul_(20)
        spec = ModelSpec(arch, 10, 3, 0.5 if arch == "resnet20" else 1.0, 16)
        paths[role] = str(save_model(folder / f"{role}.safetensors", model, ModelMeta(spec, dataset="synthetic")))
    return paths


def _ours(method, teacher_files, fast: bool):
    cfg = TrainConfig(method=method, seed=0, attack=AttackConfig(eps=8 / 255, steps=3, step_size=2 / 255))
    cfg.model.arch, cfg.model.width = "resnet20", 0.5
    from robustedge.methods import get_method

    cfg.teachers = {r: TeacherConfig(checkpoint=teacher_files[r], precision="bf16" if fast else "fp32")
                    for r in get_method(method).teacher_roles}
    cfg.channels_last = cfg.fold_attack = fast
    cfg.amp = "off"
    return build_parts(cfg, ModelSpec("resnet20", 10, 3, 0.5, 16), torch.device("cpu"))


@pytest.mark.parametrize("method", ["natural", "pgd_at", "trades", "ard", "rslad", "mtard", "bmtard"])
def test_trainer_step_matches_the_reference_loop(method, teacher_files):
    from robustedge.weights import load_model
    from robustedge.runtime import seed_everything

    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    seed_everything(0)
    student = ModelSpec("resnet20", 10, 3, 0.5, 16).build()
    teachers = {r: load_model(p)[0] for r, p in teacher_files.items()}
    step = ReferenceStep(method, student, teachers, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4), 8 / 255, 2 / 255,
                         3, {})
    exact, fast = _ours(method, teacher_files, False), _ours(method, teacher_files, True)
    losses = {}
    for name, run in (("reference", lambda: step(x, y)), ("exact", lambda: exact.step(exact.model, x, y)[0]["loss"]),
                      ("fast", lambda: fast.step(fast.model, x, y)[0]["loss"])):
        torch.manual_seed(1234)  # the same random attack start everywhere
        losses[name] = float(run())
    assert losses["reference"] > 0
    assert losses["exact"] == pytest.approx(losses["reference"], rel=1e-5)
    # folded twin + channels_last + bf16 teachers: float rounding, never a different objective
    assert losses["fast"] == pytest.approx(losses["reference"], rel=2e-2)


def test_bmtard_reference_and_ours_keep_the_same_balance_state(teacher_files):
    from robustedge.weights import load_model
    from robustedge.runtime import seed_everything

    parts = _ours("bmtard", teacher_files, False)
    seed_everything(0)
    student = ModelSpec("resnet20", 10, 3, 0.5, 16).build()
    teachers = {r: load_model(p)[0] for r, p in teacher_files.items()}
    ref = ReferenceStep("bmtard", student, teachers, torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4), 8 / 255,
                        2 / 255, 3, {})
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.rand(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        torch.manual_seed(7)
        ref(x, y)
        torch.manual_seed(7)
        parts.step(parts.model, x, y)
    state = parts.method.state_dict()
    for key in ("w_adv", "w_nat", "tau_adv", "tau_nat"):
        assert float(state[key]) == pytest.approx(getattr(ref, key), abs=1e-5), key


# ---- evaluation batch size, worker pool ------------------------------------------------------

def test_auto_batch_size_fits_memory_and_does_not_change_results(digits_model, digits):
    from robustedge.suite import attack_bytes_per_example, auto_batch_size, evaluate

    x, y = digits.test.take(64).float_images(), digits.test.take(64).labels
    per_example = attack_bytes_per_example(digits_model, x[:1])
    assert per_example > x[:1].numel() * 4  # at least the activations of one example
    batch = auto_batch_size(digits_model, x[:1], cap=256)
    assert 1 <= batch <= 256 and batch & (batch - 1) == 0
    assert auto_batch_size(digits_model, x[:1], cap=8) <= 8
    auto = evaluate(digits_model, x, y, attacks=["clean", "pgd20"], eps=0.1, batch_size="auto", show_progress=False)
    fixed = evaluate(digits_model, x, y, attacks=["clean", "pgd20"], eps=0.1, batch_size=7, show_progress=False)
    assert auto.info["batch_size"] >= 64 and auto.accuracy == fixed.accuracy
    with pytest.raises(RobustEdgeError, match="'auto'"):
        evaluate(digits_model, x, y, attacks=["clean"], eps=0.1, batch_size=0)


def test_parallel_plan_and_worker_pool():
    assert parallel_plan(torch.device("cuda"), 2)[0] == 1
    assert parallel_plan(torch.device("cpu"), 1)[0] == 1
    workers, threads = parallel_plan(torch.device("cpu"), 2)
    assert workers * threads <= max(2, torch.get_num_threads() * 2) and workers >= 1
    assert run_jobs(math.factorial, [3, 4, 5], 2, 1) == [6, 24, 120]  # order kept across processes
    with pytest.raises(ValueError):
        run_jobs(math.factorial, [3, -1], 2, 1)  # a worker's exception reaches the caller


def test_a_worker_pool_serves_several_rounds_of_jobs():
    """The quickstart starts its workers once for all its phases: later rounds run in the same processes."""
    import os

    from helpers.jobs import worker_pid

    from robustedge.runtime import worker_pool

    with worker_pool(2, 1) as pool:
        assert len(pool._processes) == 2  # started on entry, where an interruption is held back
        first = set(run_jobs(worker_pid, list(range(6)), 2, 1, pool))
        assert os.getpid() not in first and 1 <= len(first) <= 2
        assert set(run_jobs(worker_pid, list(range(6)), 2, 1, pool)) <= set(pool._processes)
        assert set(pool._processes) >= first  # the first round's workers are still there
    with worker_pool(1, 1) as none:  # one worker: jobs run in this process
        assert none is None and run_jobs(worker_pid, [0], 1, 1, none) == [os.getpid()]


def test_an_interrupted_worker_pool_stops_its_workers_instead_of_waiting_for_them():
    """Ctrl-C during a quickstart phase must not wait for minutes of training in the workers (nor hang
    if pressed twice while the executor's shutdown waits)."""
    import time

    from robustedge.runtime import worker_pool

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with worker_pool(2, 1) as pool:
            workers = list(pool._processes.values())
            jobs = [pool.submit(time.sleep, 300) for _ in range(3)]  # two running, one queued
            time.sleep(0.5)
            raise KeyboardInterrupt
    assert time.perf_counter() - start < 120
    assert not any(worker.is_alive() for worker in workers)
    assert all(job.done() for job in jobs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_worker_whose_parent_died_before_it_started_exits():
    """A quickstart killed while its workers start: they would wait for jobs forever under init."""
    import subprocess

    code = "import os; from robustedge.runtime import _die_with_parent; _die_with_parent({}); print('alive')"
    orphan = subprocess.run([sys.executable, "-c", code.format(0)], capture_output=True, text=True, timeout=120)
    assert orphan.returncode == 1 and "alive" not in orphan.stdout
    child = subprocess.run([sys.executable, "-c", code.replace("{}", "os.getppid()")], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "alive", child.stderr


def test_an_interruption_acts_once_the_workers_are_started():
    """A SIGTERM that arrives while worker_pool starts its processes acts after, through the handler
    that was in place (raised half-way through a start it left a child with a truncated pickle)."""
    import os
    import signal
    import time

    from robustedge.runtime import _interrupts_deferred

    seen = []

    def on_term(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # delivered here: it must not act yet
                seen.append("block finished")
        assert seen == ["block finished", signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is on_term
        with _interrupts_deferred():  # nothing caught: nothing raised
            seen.append("quiet block")
        assert seen[-1] == "quiet block"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_int8_activation_types(tmp_path):
    import onnx
    from onnx import numpy_helper

    from robustedge.edge.convert import export_onnx, quantize_int8

    torch.manual_seed(0)
    model = build_model("resnet20", 10, 1, width=0.25).eval()
    src = export_onnx(model, (1, 8, 8), tmp_path / "m.onnx")
    calib = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)

    def activation_zero_points(path):
        graph = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        return [inits[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]

    uint8 = activation_zero_points(quantize_int8(src, tmp_path / "u.onnx", calib))
    assert uint8 and all(z.dtype == np.uint8 for z in uint8)
    symmetric = activation_zero_points(quantize_int8(src, tmp_path / "s.onnx", calib, activations="int8-symmetric"))
    assert symmetric and all(z.dtype == np.int8 and not z.any() for z in symmetric)  # TensorRT needs 0
    with pytest.raises(RobustEdgeError, match="int8-symmetric"):
        quantize_int8(src, tmp_path / "x.onnx", calib, activations="fp8")
