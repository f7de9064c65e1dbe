"""The CUDA and torchrun paths, checked on the CPU where a CPU can express them: devices follow the
model, the caller's module is never moved or switched, one rank downloads while the others wait, an
evaluation alone on one rank of a user's own process group does not wait for the others, and QAT never
trains under autocast."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from robustedge import RobustEdgeError


class DeviceRecorder(nn.Module):
    """Records the device of every input; answers with CPU logits (the device can be 'meta')."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.device] = []

    def forward(self, x):
        self.seen.append(x.device)
        return torch.zeros(len(x), 10)


def test_the_torch_runner_feeds_the_models_device_and_returns_host_arrays():
    from robustedge.runners import TorchRunner, model_device

    model = DeviceRecorder()
    out = TorchRunner(model, device="meta")(np.zeros((2, 1, 8, 8), np.float32))
    assert model.seen == [torch.device("meta")] and isinstance(out, np.ndarray) and out.shape == (2, 10)
    linear = nn.Linear(3, 2).to("meta")
    assert model_device(linear) == torch.device("meta")  # the default: where the model's tensors are
    assert model_device(nn.ReLU()) == torch.device("cpu")


def _digits_net() -> nn.Module:
    from robustedge.models import build_model

    torch.manual_seed(0)
    return build_model("resnet20", 10, 1, width=0.25, image_size=16)  # digits at 16x16


def test_load_evaluate_and_export_leave_the_callers_module_as_it_was(tmp_path):
    from robustedge import api

    module = _digits_net().train()
    before = copy.deepcopy(module.state_dict())
    model, _ = api.load(module, dataset="digits", eps=0.1, device="cpu")
    assert model is not module and module.training  # a copy was put in eval mode, not the caller's
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    api.evaluate(module, x, y, attacks=["clean", "fgsm"], eps=0.1, flags=False, show_progress=False)
    assert module.training
    from robustedge.flags import FlagSettings

    api.export(module, tmp_path / "bundle", formats="onnx", dataset="digits", eps=0.1, n=16, calibration_n=16,
               transfer_attacks=("pgd20",), whitebox_attacks=(), square_n=0, device="cpu",
               flags=FlagSettings(n=8, steps=10, restarts=1, square_queries=10))
    assert module.training and all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_the_api_defaults_are_the_clis():
    import inspect

    from robustedge import api
    from robustedge.loading import load

    assert inspect.signature(api.load).parameters["device"].default == "auto"
    assert inspect.signature(load).parameters["device"].default == "auto"
    assert inspect.signature(api.export).parameters["device"].default == "auto"
    assert inspect.signature(api.evaluate).parameters["distributed"].default is False
    # the whole split unless told otherwise (issue 24), and AutoAttack's fixed block, in both
    from robustedge.cli import build_parser
    from robustedge.options import AUTOATTACK_BLOCK

    parsed = build_parser().parse_args(["eval", "model.safetensors"])
    assert parsed.n == 0 and inspect.signature(api.evaluate).parameters["n"].default is None
    assert parsed.aa_batch_size == AUTOATTACK_BLOCK == inspect.signature(api.evaluate).parameters["aa_batch_size"].default


def test_qat_never_trains_under_autocast():
    from robustedge.config import TrainConfig, validate_config
    from robustedge.training_parts import _amp_settings

    cfg = TrainConfig(method="natural")
    cfg.data.name = "digits"
    cfg.qat.enabled = True
    assert _amp_settings(cfg, torch.device("cuda")) == (None, False)  # auto: off for QAT even on a GPU
    cfg.amp = "bf16"
    with pytest.raises(RobustEdgeError, match="quantization-aware training runs in fp32"):
        validate_config(cfg)


def _two_ranks(rank: int, folder: str, results) -> None:
    """Rank 0 'downloads' slowly into ``folder``; rank 1 reads what it wrote. Then rank 0 evaluates alone
    with the API's defaults while rank 1 does nothing collective."""
    import time

    from robustedge import api
    from robustedge.sharding import World, rank_zero_first

    # a file rendezvous: no port to pick here and bind later, which a parallel test could take in between
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'store')}", rank=rank, world_size=2)
    world = World.current()
    path = os.path.join(folder, "data.bin")
    with rank_zero_first(world):
        if rank == 0:
            time.sleep(1.0)  # a download takes a while
            with open(path + ".part", "wb") as f:
                f.write(b"x" * 1000)
            os.replace(path + ".part", path)
        else:
            assert os.path.exists(path), "rank 1 ran before rank 0 finished"
    if rank == 0:
        model = _digits_net()
        report = api.evaluate(model, torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), attacks=["clean"],
                              eps=0.1, flags=False, show_progress=False)
        results[0] = report.info["processes"]
    dist.barrier()
    dist.destroy_process_group()


def test_one_rank_downloads_while_the_others_wait_and_a_lone_evaluation_does_not_wait(tmp_path):
    results = mp.Manager().dict()
    ctx = mp.spawn(_two_ranks, args=(str(tmp_path), results), nprocs=2, join=False)
    for process in ctx.processes:
        process.join(120)
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        p.terminate()
    assert not alive, "a rank hung (a collective waited for a rank that never came)"
    assert all(p.exitcode == 0 for p in ctx.processes)
    assert results[0] == 1  # rank 0 evaluated alone


def test_tensorrt_buffers_are_allocated_when_a_batch_grows_not_at_every_call():
    """The engine runner's device buffers through a stand-in for cuda-python's runtime module."""
    import types

    from robustedge.verifier import DeviceBuffers

    log = []
    memory: dict[int, bytearray] = {}

    def malloc(nbytes):
        pointer = len(log) + 1
        memory[pointer] = bytearray(nbytes)
        log.append(("malloc", nbytes))
        return 0, pointer

    def memcpy(dst, src, nbytes, kind):
        import ctypes

        if kind == "h2d":
            memory[dst][:nbytes] = ctypes.string_at(src, nbytes)
        else:
            ctypes.memmove(dst, bytes(memory[src][:nbytes]), nbytes)
        return (0,)

    cudart = types.SimpleNamespace(cudaMalloc=malloc, cudaFree=lambda p: log.append(("free", p)) or (0,),
                                   cudaMemcpy=memcpy, cudaStreamSynchronize=lambda s: (0,),
                                   cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice="h2d",
                                                                        cudaMemcpyDeviceToHost="d2h"))

    class Engine:  # doubles its input: the output buffer holds 2 x the input
        def output_shape(self, shape):
            return shape

        def execute(self, d_in, d_out, stream):
            data = np.frombuffer(bytes(memory[d_in]), dtype=np.float32)
            memory[d_out][:data.nbytes] = (2 * data).tobytes()

    buffers, engine = DeviceBuffers(cudart), Engine()
    for batch in (4, 4, 2, 4, 8, 8, 1):
        x = np.arange(batch * 3, dtype=np.float32).reshape(batch, 3)
        assert np.array_equal(buffers.run(x, engine)[:batch], 2 * x)
    allocations = [size for kind, size in log if kind == "malloc"]
    assert allocations == [48, 48, 96, 96]  # at the first call and when the batch grew, never otherwise
    buffers.release()
    assert sum(1 for kind, _ in log if kind == "free") == 4


@pytest.mark.gpu
def test_an_evaluation_on_cuda_runs_every_attack_and_the_flags():
    """The failure a first GPU user would meet: the attack-failure checks query the model through the
    torch runner (numpy in and out), which must feed the GPU and bring the logits back."""
    from robustedge import api
    from robustedge.flags import FlagSettings

    model = _digits_net().cuda().eval()
    x, y = torch.rand(16, 1, 16, 16, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    report = api.evaluate(model, x, y, attacks=["clean", "pgd20", "autoattack"], eps=0.1, show_progress=False,
                          flags=FlagSettings(n=16, steps=10, restarts=1, square_queries=20))
    assert set(report.accuracy) == {"clean", "pgd20", "autoattack"} and "square_accuracy" in report.checks
    assert next(model.parameters()).is_cuda


@pytest.mark.gpu
def test_a_training_step_on_cuda_under_amp_keeps_the_fp32_loss_of_the_reference(tmp_path):
    """One B-MTARD step on the GPU (bf16 autocast, channels_last, folded twin) against the same step in fp32."""
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
    from robustedge.config import AttackConfig, TeacherConfig, TrainConfig
    from robustedge.training_parts import build_parts

    spec = ModelSpec("resnet20", 10, 3, 0.5, 32)
    files = {}
    for seed, role in enumerate(("robust", "clean")):
        torch.manual_seed(seed)
        files[role] = str(save_model(tmp_path / f"{role}.safetensors", spec.build(), ModelMeta(spec, dataset="x")))
    losses = {}
    for amp in ("off", "auto"):
        cfg = TrainConfig(method="bmtard", seed=0, device="cuda", amp=amp,
                          attack=AttackConfig(eps=8 / 255, steps=3, step_size=2 / 255),
                          teachers={r: TeacherConfig(checkpoint=p, precision="fp32") for r, p in files.items()})
        parts = build_parts(cfg, spec, torch.device("cuda"))
        gen = torch.Generator().manual_seed(1)
        x, y = torch.rand(32, 3, 32, 32, generator=gen).cuda(), torch.randint(0, 10, (32,), generator=gen).cuda()
        torch.manual_seed(5)
        losses[amp] = float(parts.step(parts.model, x, y)[0]["loss"])
    assert losses["auto"] == pytest.approx(losses["off"], rel=3e-2)


def test_the_attack_reaches_the_plain_student_inside_compile_and_ddp(tmp_path):
    """The trainer compiles the DDP-wrapped student; the training attack must not run through DDP."""
    from robustedge.methods.base import attack_view

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.Linear(4, 2)
        ddp = nn.parallel.DistributedDataParallel(model)
        assert attack_view(ddp) is model
        assert attack_view(torch.compile(ddp)) is model  # compile(DDP(model)): no compilation happens here
        compiled = torch.compile(model)
        assert attack_view(compiled) is compiled and attack_view(model) is model
    finally:
        dist.destroy_process_group()


def test_train_eval_and_export_run_without_torchao(tmp_path):
    """The GPU machine has no torchao: every path but QAT must import and run without it."""
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["torchao"] = None  # import torchao now fails
from robustedge.cli import main
runs = {str(tmp_path)!r}
common = ["--dataset", "digits", "--device", "cpu", "--out-dir", runs, "--epochs", "1", "--no-progress",
          "--arch", "resnet20", "--width", "0.25", "--set", "data.image_size=8", "--set", "eval_n=16",
          "--set", "attack.steps=1", "--set", "data.val_fraction=0.875"]
assert main(["train", *common, "--method", "pgd_at", "--name", "s"]) == 0
model = runs + "/s/best.safetensors"
assert main(["eval", model, "--n", "8", "--attacks", "clean,pgd20", "--no-flags", "--no-progress",
             "--out", runs + "/e"]) == 0
assert main(["export", model, "--formats", "onnx,onnx-int8", "--n", "8", "--calibration-n", "16",
             "--transfer-attacks", "pgd20", "--whitebox-attacks", "pgd20", "--square-n", "0", "--flags-n", "4",
             "--max-drop", "1", "--min-agreement", "0", "--out", runs + "/b"]) in (0, 1)
assert "torchao" not in [m for m in sys.modules if sys.modules[m] is not None]
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
