"""The first GPU run, prepared on the CPU: one call that shows what the GPU path does and how fast.

    python bench/gpu_check.py --out gpu_out                       # on the GPU machine (docs/design/gpu.md, "The GPU check")
    python bench/gpu_check.py --out /tmp/rehearsal --rehearse     # the same sequence on the CPU, toy sizes
    python bench/gpu_check.py --out gpu_out --stages step,profile # some stages only

Every stage is timed; one that fails is logged with its traceback and the run goes on, so one call
shows every failure. Stages, in order:

  env         torch, CUDA, the device, the packages the rest needs
  tests       the gpu-marked tests (pytest -m gpu)
  train       robustedge train: a TRADES and a natural teacher, 1 epoch each, CIFAR-shaped data
              (the embedded digits at 3x32x32: nothing to download)
  distill     robustedge distill: B-MTARD, 1 epoch (amp auto), then again with --compile (not rehearsed:
              inductor takes minutes on a CPU)
  qat         robustedge distill --qat-from the student, 1 epoch (needs torchao)
  eval        robustedge eval --device cuda: clean, PGD-20, AutoAttack, attack-failure flags on
  export      robustedge export --device cuda: onnx, onnx-int8, white-box PGD-20, CW and DIVA on the INT8 twin
  report      robustedge report --device cuda
  torchrun    torchrun --standalone --nproc_per_node 1 -m robustedge.cli distill (the launcher's path)
  step        the B-MTARD training step against the reference loop (bench/train_step.py): ResNet-18 and
              MobileNetV2 students, WRN-34-10 + ResNet-56 teachers, batch 128: the same loss (exact
              configuration to 1e-4 relative), medians, FLOPs per image counted by torch's
              FlopCounterMode, achieved TFLOP/s, projected 300-epoch CIFAR-10 time
  autoattack  AutoAttack images/s on a CIFAR ResNet-18 (pyautoattack's model_test.pt), as given and folded
  profile     the top kernels of one B-MTARD step (ResNet-18 student)

Writes OUT/gpu_check.log (everything printed), OUT/gpu_check.json (every figure and each stage's
status and seconds) and OUT/profile.txt; the runs under OUT/runs. Exit status 1 when a stage failed.
``--rehearse`` runs the same code on the CPU with tiny models and batches, so that on the GPU only CUDA
is new (its eval and export leave AutoAttack out: see ``Sizes.eval_attacks``); tests/test_gpu_check.py runs it in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "train", "distill", "qat", "eval", "export", "report", "torchrun", "step", "autoattack",
          "profile")
CIFAR10_TRAIN = 45_000  # CIFAR-10's 50,000 training images less the recipes' 10% validation split


@dataclass
class Sizes:
    """What each stage runs: the GPU's (the papers' scale where it matters) or the rehearsal's."""

    device: str = "cuda"
    image_size: int = 32
    channels: int = 3
    teacher_robust: str = "wideresnet-16-4"
    teacher_clean: str = "resnet56"
    student: str = "resnet18"
    width: float = 1.0
    batch: int = 128
    val_fraction: float = 0.1  # the rehearsal holds most digits out, so that its epochs (QAT's above all) are short
    eval_n: int = 200
    # The rehearsal's 1-epoch students are near-constant functions, which AutoAttack cannot break: it then
    # runs all four attacks to the end (38 s for 16 digits on the CPU). Its eval and export leave it out;
    # the autoattack stage and the suite's AutoAttack tests run it on the CPU.
    eval_attacks: str = "clean,pgd20,autoattack"
    transfer_attacks: str = "pgd20,autoattack"
    export_n: int = 64
    flags_n: int = 100
    step_students: tuple[str, ...] = ("resnet18", "mobilenetv2")
    step_teachers: tuple[str, str] = ("wrn34_10", "resnet56")
    step_batch: int = 128
    step_warmup: int = 3
    step_steps: int = 10
    step_repeats: int = 3
    aa_n: int = 1000
    compile: bool = True  # distill once more with --compile (inductor; minutes of compilation on a CPU)


REHEARSAL = Sizes(device="cpu", image_size=8, channels=1, teacher_robust="wideresnet-10-1", teacher_clean="resnet20",
                  student="resnet20", width=0.25, batch=64, val_fraction=0.875, eval_n=16, eval_attacks="clean,pgd20",
                  transfer_attacks="pgd20", export_n=16, flags_n=8,
                  step_students=("resnet20",), step_teachers=("wideresnet-10-1", "resnet20"), step_batch=8,
                  step_warmup=1, step_steps=1, step_repeats=1, aa_n=2, compile=False)


class Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


class Check:
    """The run's state: sizes, folders, and the JSON of figures (merged with an earlier call's)."""

    def __init__(self, out: Path, sizes: Sizes, rehearse: bool) -> None:
        self.out, self.sizes, self.rehearse = out, sizes, rehearse
        self.runs = out / "runs"
        self.json_path = out / "gpu_check.json"
        self.results = json.loads(self.json_path.read_text()) if self.json_path.exists() else {"stages": {}}
        self.results["sizes"], self.results["rehearse"] = asdict(sizes), rehearse

    def cli(self, *argv: str) -> int:
        from robustedge.cli import main

        print("$ robustedge " + " ".join(argv), flush=True)
        return main(list(argv))

    def common(self) -> list[str]:
        s = self.sizes
        return ["--dataset", "digits", "--device", s.device, "--out-dir", str(self.runs), "--epochs", "1",
                "--batch-size", str(s.batch), "--no-progress", "--set", f"data.image_size={s.image_size}",
                "--set", f"data.channels={s.channels}", "--set", f"data.val_fraction={s.val_fraction}",
                "--set", "eval_n=64", "--eps", "8/255",
                "--step-size", "2/255"]

    def save(self) -> None:
        self.json_path.write_text(json.dumps(self.results, indent=1, default=str))


def _ok(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"{what} exited with {code}")


# ---- stages -----------------------------------------------------------------------------------

def stage_env(c: Check) -> dict:
    import importlib.metadata as md

    import torch

    info = {"torch": torch.__version__, "python": sys.version.split()[0], "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported())
    for name in ("torchvision", "onnx", "onnxruntime", "onnxscript", "pyautoattack", "torchao", "safetensors",
                 "scikit-learn", "numpy"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    if c.sizes.device == "cuda" and not info["cuda_available"]:
        raise RuntimeError("no CUDA device visible")
    return info


def stage_tests(c: Check) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "tests/test_gpu_path.py", "tests/test_export.py"]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(done.stdout[-6000:] + done.stderr[-3000:])
    summary = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode not in (0, 5):  # 5: nothing collected (no gpu-marked test selected)
        raise RuntimeError(f"gpu-marked tests failed: {summary}")
    return {"summary": summary}


def stage_train(c: Check) -> dict:
    s = c.sizes
    _ok(c.cli("train", *c.common(), "--method", "trades", "--arch", s.teacher_robust, "--name", "teacher_robust"),
        "train trades")
    _ok(c.cli("train", *c.common(), "--method", "natural", "--arch", s.teacher_clean, "--name", "teacher_clean"),
        "train natural")
    return {"teachers": [str(c.runs / n / "best.safetensors") for n in ("teacher_robust", "teacher_clean")]}


def _distill(c: Check, name: str, *extra: str) -> int:
    s = c.sizes
    return c.cli("distill", *c.common(), "--method", "bmtard", "--arch", s.student, "--width", str(s.width),
                 "--name", name, "--robust-teacher", str(c.runs / "teacher_robust" / "best.safetensors"),
                 "--clean-teacher", str(c.runs / "teacher_clean" / "best.safetensors"), *extra)


def stage_distill(c: Check) -> dict:
    start = time.perf_counter()
    _ok(_distill(c, "student"), "distill")
    plain = time.perf_counter() - start
    compiled = None
    if c.sizes.compile:
        start = time.perf_counter()
        _ok(_distill(c, "student_compiled", "--compile"), "distill --compile")
        compiled = time.perf_counter() - start
    result = json.loads((c.runs / "student" / "result.json").read_text())
    return {"seconds_plain": plain, "seconds_compiled": compiled, "epoch": result["history"][-1]}


def stage_qat(c: Check) -> dict:
    _ok(_distill(c, "student_qat", "--qat-from", str(c.runs / "student" / "best.safetensors"), "--lr", "0.002"),
        "distill --qat-from")
    return json.loads((c.runs / "student_qat" / "result.json").read_text())["history"][-1]


def stage_eval(c: Check) -> dict:
    s = c.sizes
    code = c.cli("eval", str(c.runs / "student" / "best.safetensors"), "--device", s.device, "--n", str(s.eval_n),
                 "--attacks", s.eval_attacks, "--flags-n", str(s.flags_n), "--no-progress",
                 "--out", str(c.out / "eval"))
    if code not in (0, 1):  # 1: a flag fired; the evaluation itself ran
        raise RuntimeError(f"eval exited with {code}")
    report = json.loads((c.out / "eval" / "eval.json").read_text())
    return {"accuracy": report["accuracy"], "seconds": report["seconds"], "flags": report.get("flags"),
            "exit": code}


def stage_export(c: Check) -> dict:
    s = c.sizes
    code = c.cli("export", str(c.runs / "student" / "best.safetensors"), "--device", s.device, "--formats",
                 "onnx,onnx-int8", "--n", str(s.export_n), "--calibration-n", "64", "--square-n", "8",
                 "--transfer-attacks", s.transfer_attacks,
                 # gradient attacks on the twin; its AutoAttack (Square through the interpreted twin) is slow
                 "--whitebox-attacks", "pgd20,cw,diva",
                 "--square-queries", "100", "--flags-n", str(s.flags_n), "--out", str(c.out / "bundle"))
    if code not in (0, 1):  # 1: the gate failed; the export itself ran
        raise RuntimeError(f"export exited with {code}")
    manifest = json.loads((c.out / "bundle" / "manifest.json").read_text())
    return {"table": manifest["table"], "seconds": manifest["seconds"], "exit": code}


def stage_report(c: Check) -> dict:
    _ok(c.cli("report", str(c.runs), "--device", c.sizes.device, "--curve-n", "32", "--out", str(c.out / "report")),
        "report")
    return {"page": str(c.out / "report" / "report.html")}


def stage_torchrun(c: Check) -> dict:
    s = c.sizes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
           "robustedge.cli", "distill", *c.common(), "--method", "bmtard", "--arch", s.student, "--width", str(s.width),
           "--name", "student_torchrun", "--robust-teacher", str(c.runs / "teacher_robust" / "best.safetensors"),
           "--clean-teacher", str(c.runs / "teacher_clean" / "best.safetensors")]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                               **({"OMP_NUM_THREADS": "1"} if c.rehearse else {})})  # two cores: no oversubscription
    print(done.stdout[-3000:] + done.stderr[-3000:])
    _ok(done.returncode, "torchrun distill")
    return {"world_size": json.loads((c.runs / "student_torchrun" / "result.json").read_text())["world_size"]}


def _bench_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import train_step
    finally:
        sys.path.pop(0)
    return train_step


def _teachers(c: Check) -> dict[str, str]:
    """WRN-34-10 and ResNet-56 (random weights, confident last layers) saved once for the step stages."""
    import torch

    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model

    folder = c.out / "step_teachers"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (role, arch) in enumerate(zip(("robust", "clean"), c.sizes.step_teachers)):
        path = folder / f"{role}.safetensors"
        if not path.exists():
            torch.manual_seed(100 + i)
            spec = ModelSpec(arch, 10)
            model = spec.build()
            with torch.no_grad():
                model.fc.weight.mul_(20)
            save_model(path, model, ModelMeta(spec, dataset="synthetic", eps=8 / 255, method="random"))
        paths[role] = str(path)
    return paths


def _step_flops(arch: str, teachers: dict[str, str], c: Check) -> float:
    """FLOPs of one of our B-MTARD steps (forward and backward, every attack step, both teachers) per image,
    counted by torch's FlopCounterMode on the step the trainer runs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from robustedge.checkpoint import ModelSpec
    from robustedge.training_parts import build_parts

    bench = _bench_module()
    batch = min(c.sizes.step_batch, 16)
    cfg = bench._config("bmtard", arch, batch, c.sizes.device, teachers, True, False)
    cfg.fold_attack = False  # count the network as trained; the folded twin only removes BN's elementwise work
    parts = build_parts(cfg, ModelSpec(arch, 10), torch.device(c.sizes.device))
    x = torch.rand(batch, 3, 32, 32, device=c.sizes.device)
    y = torch.randint(0, 10, (batch,), device=c.sizes.device)
    counter = FlopCounterMode(display=False)
    # Its per-module tracker hooks every module's backward, and from torch 2.15 those hooks raise inside the
    # attack's torch.autograd.grad(loss, x) ("A leaf node was passed to _will_engine_execute_node"). Only the
    # global total is read here, so the tracker is swapped for one that always reports "Global" as the parent.
    counter.mod_tracker = _GlobalOnlyTracker()
    with counter:
        parts.step(parts.model, x, y)
    return counter.get_total_flops() / batch


class _GlobalOnlyTracker(contextlib.nullcontext):
    """Stands in for torch's ModuleTracker inside FlopCounterMode: every FLOP is counted under "Global"."""

    parents = frozenset({"Global"})


def stage_step(c: Check) -> dict:
    bench = _bench_module()
    s = c.sizes
    teachers = _teachers(c)
    rows = {}
    for arch in s.step_students:
        samples: dict[str, list[dict]] = {"reference": [], "ours": []}
        exact = None
        for repeat in range(s.step_repeats):
            for impl in ("reference", "ours"):
                job = dict(impl=impl, method="bmtard", arch=arch, batch=s.step_batch, steps=s.step_steps,
                           warmup=s.step_warmup, device=s.device, teachers=teachers, compile=False, amp="auto")
                samples[impl].append(bench.measure(job))
            if exact is None:
                exact = bench.measure(dict(job, impl="exact"))["loss_check"]
        ref, ours = samples["reference"], samples["ours"]
        row = {"ref_img_s": statistics.median(r["img_s"] for r in ref),
               "ours_img_s": statistics.median(r["img_s"] for r in ours),
               "ours_step_s": statistics.median(r["step_s"] for r in ours),
               "ref_peak_mb": statistics.median(r["peak_mb"] for r in ref),
               "ours_peak_mb": statistics.median(r["peak_mb"] for r in ours),
               "loss_ref": ref[0]["loss_check"], "loss_exact": exact, "loss_fast": ours[0]["loss_check"]}
        row["speedup"] = row["ours_img_s"] / row["ref_img_s"]
        row["exact_rel_diff"] = abs(exact - row["loss_ref"]) / max(abs(row["loss_ref"]), 1e-12)
        row["gflop_per_image"] = _step_flops(arch, teachers, c) / 1e9
        row["tflop_s"] = row["gflop_per_image"] * row["ours_img_s"] / 1e3
        epoch_s = math.ceil(CIFAR10_TRAIN / s.step_batch) * s.step_batch / row["ours_img_s"]
        row["cifar10_epoch_s"], row["cifar10_300_epochs_h"] = epoch_s, 300 * epoch_s / 3600
        print(f"{arch}: reference {row['ref_img_s']:.1f} img/s, ours {row['ours_img_s']:.1f} img/s "
              f"({row['speedup']:.2f}x); {row['gflop_per_image']:.1f} GFLOP/image, {row['tflop_s']:.2f} TFLOP/s; "
              f"CIFAR-10 epoch {epoch_s:.1f} s, 300 epochs {row['cifar10_300_epochs_h']:.2f} h; loss ref "
              f"{row['loss_ref']:.6f} exact {exact:.6f} (rel {row['exact_rel_diff']:.1e}) fast {row['loss_fast']:.6f}",
              flush=True)
        if row["exact_rel_diff"] > bench.EXACT_TOLERANCE:
            raise RuntimeError(f"{arch}: the exact configuration's loss differs from the reference's by "
                               f"{row['exact_rel_diff']:.1e} (> {bench.EXACT_TOLERANCE:.0e})")
        rows[arch] = row
    return rows


def stage_autoattack(c: Check) -> dict:
    import importlib.resources

    import torch

    from robustedge.suite import evaluate
    from robustedge.models import build_model

    model = build_model("resnet18")
    state = torch.load(str(importlib.resources.files("pyautoattack") / "examples" / "model_test.pt"),
                       map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model = model.to(c.sizes.device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(c.sizes.aa_n, 3, 32, 32, generator=gen).to(c.sizes.device)
    with torch.no_grad():
        y = torch.cat([model(b).argmax(1) for b in x.split(500)])  # clean accuracy 100%: AutoAttack attacks all
    result = {"n": c.sizes.aa_n, "note": "random images labelled by the model (no CIFAR here): a non-robust case, "
                                         "where APGD ends early; an upper bound on a robust model's images/s"}
    for fold in (False, True):
        start = time.perf_counter()
        report = evaluate(model, x, y, attacks=["autoattack"], eps=8 / 255, batch_size=500, show_progress=False,
                          fold_bn=fold)
        seconds = time.perf_counter() - start
        key = "folded" if fold else "as_given"
        result[key] = {"images_per_s": c.sizes.aa_n / seconds, "seconds": seconds,
                       "robust_accuracy": report.accuracy["autoattack"]}
        print(f"AutoAttack, ResNet-18 {key}: {c.sizes.aa_n / seconds:.1f} images/s ({seconds:.1f} s)", flush=True)
    return result


def stage_profile(c: Check) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from robustedge.checkpoint import ModelSpec
    from robustedge.training_parts import build_parts

    bench = _bench_module()
    s = c.sizes
    arch = s.step_students[0]
    cfg = bench._config("bmtard", arch, s.step_batch, s.device, _teachers(c), True, False)
    parts = build_parts(cfg, ModelSpec(arch, 10), torch.device(s.device))
    student = parts.wrap()
    student.train()
    x = torch.rand(s.step_batch, 3, 32, 32, device=s.device)
    y = torch.randint(0, 10, (s.step_batch,), device=s.device)
    for _ in range(2):  # warm-up (cuDNN's algorithm search)
        float(parts.step(student, x, y)[0]["loss"])
    cuda = s.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        float(parts.step(student, x, y)[0]["loss"])
    events = prof.key_averages()
    sort = _bench_module().profile_sort_key(events, cuda)
    table = events.table(sort_by=sort, row_limit=20, max_name_column_width=60)
    (c.out / "profile.txt").write_text(table)
    print(table)
    ranked = sorted(events, key=lambda e: getattr(e, sort), reverse=True)
    top = [{"name": e.key, "self_ms": getattr(e, sort) / 1e3, "calls": e.count} for e in ranked[:10]]
    return {"student": arch, "batch": s.step_batch, "sorted_by": sort, "top": top}


RUNNERS = {name: globals()[f"stage_{name}"] for name in STAGES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the log, the figures and the runs")
    p.add_argument("--rehearse", action="store_true", help="the same sequence on the CPU at toy sizes")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, in order (default all: {','.join(STAGES)})")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in RUNNERS]
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ROBUSTEDGE_NO_PROGRESS", "1")
    check = Check(out, REHEARSAL if args.rehearse else Sizes(), args.rehearse)
    failed = []
    with open(out / "gpu_check.log", "a", encoding="utf-8") as log, \
            contextlib.redirect_stdout(Tee(sys.stdout, log)), contextlib.redirect_stderr(Tee(sys.stderr, log)):
        for name in stages:
            print(f"\n===== {name} =====", flush=True)
            start = time.perf_counter()
            try:
                value = RUNNERS[name](check)
                status = {"status": "ok", "result": value}
            except BaseException as exc:  # noqa: BLE001 - a failed stage is reported, the next one still runs
                if isinstance(exc, KeyboardInterrupt):
                    raise
                traceback.print_exc()
                status = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                failed.append(name)
            status["seconds"] = time.perf_counter() - start
            check.results["stages"][name] = status
            check.save()
            print(f"===== {name}: {status['status']} in {status['seconds']:.1f} s", flush=True)
        print(f"\nstages failed: {', '.join(failed) or 'none'}; figures in {check.json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
