"""Training-step throughput: our trainer's step against the authors'-style reference loop.

    python bench/train_step.py --small                      # a 2-core CPU: batch 32
    python bench/train_step.py --device cuda                # batch 128, the papers' setting
    python bench/train_step.py --small --methods bmtard --students resnet18 --repeats 3

Students ResNet-18 and MobileNetV2 on 32x32 CIFAR-shaped synthetic data (uint8 images, 10
classes); teachers WRN-34-10 (robust) and ResNet-56 (clean) with random weights (last layer scaled
up so that their predictions are as confident as trained teachers'), saved as model
files and loaded the way each side loads them. Every measurement runs in a fresh process
(peak memory is that process's high-water mark), ours and the reference alternate, and the
table gives medians over ``--repeats`` and the ratio of the medians.

- *reference*: robustedge/reference.py — per-sample DataLoader + torchvision transforms, fp32,
  unfolded models, one forward pass per use, teachers in fp32 under no_grad.
- *ours*: robustedge.training_parts.build_parts + TrainingParts.step, the trainer's own code, with a
  config's defaults: on-device data and augmentation (DeviceLoader), channels_last, the attack on
  a conv+BN-folded twin of the student, teachers folded and in bf16 where the hardware has it,
  AMP bf16 on CUDA, no host syncs in the loop (``--compile`` adds torch.compile).

Loss check: on the same first batch, from the same weights and the same random start, the
reference's loss is compared with ours in its exact configuration (fp32 teachers, no folding,
no channels_last, no AMP: must agree to 1e-4 relative) and in the fast configuration that is
timed (reported; bf16 teachers and folding move it by float rounding only).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

METHODS = ["natural", "pgd_at", "trades", "ard", "rslad", "mtard", "bmtard"]
TEACHERS = {"robust": "wrn34_10", "clean": "resnet56"}
EXACT_TOLERANCE = 1e-4


def profile_sort_key(events, cuda: bool) -> str:
    """The profiler's self-time column: the device's on a GPU (named ``self_device_time_total`` in newer
    torch, ``self_cuda_time_total`` in older), the CPU's otherwise."""
    if not cuda:
        return "self_cpu_time_total"
    sample = next(iter(events), None)
    for key in ("self_device_time_total", "self_cuda_time_total"):
        if sample is None or hasattr(sample, key):
            return key
    return "self_cpu_time_total"


def _config(method: str, arch: str, batch: int, device: str, teachers: dict[str, str], fast: bool,
            compile_: bool, amp: str = "auto"):
    from robustedge.config import AttackConfig, TeacherConfig, TrainConfig

    cfg = TrainConfig(name="bench", method=method, batch_size=batch, device=device, seed=0,
                      attack=AttackConfig(eps=8 / 255, steps=10, step_size=2 / 255))
    cfg.model.arch = arch
    cfg.teachers = {role: TeacherConfig(checkpoint=path, precision="auto" if fast else "fp32")
                    for role, path in teachers.items()}
    if not fast:
        cfg.channels_last = cfg.fold_attack = False
        cfg.amp = "off"
    cfg.compile = compile_ and fast
    if fast:
        cfg.amp = amp
    return cfg


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=gen))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(job: dict) -> dict:
    """One (implementation, method, student) measurement; runs in its own process."""
    from robustedge.checkpoint import ModelSpec
    from robustedge.weights import load_model
    from robustedge.data import DeviceLoader, Split
    from robustedge.methods import get_method
    from robustedge.runtime import resolve_device, seed_everything
    from robustedge.training_parts import build_parts

    device = resolve_device(job["device"])
    method, arch, batch = job["method"], job["arch"], job["batch"]
    roles = get_method(method).teacher_roles
    teachers = {r: job["teachers"][r] for r in roles}
    images, labels = _data(batch * (job["warmup"] + job["steps"]))
    check_x = images[:batch].float().div(255).to(device)
    check_y = labels[:batch].to(device)
    spec = ModelSpec(arch, 10)

    def check(step) -> float:
        torch.manual_seed(1234)  # the same gaussian attack start on both sides
        return float(step(check_x, check_y))

    if job["impl"] == "reference":
        from robustedge.reference import ReferenceStep, reference_loader

        seed_everything(0)
        student = spec.build().to(device)
        models = {r: load_model(p, device)[0].eval() for r, p in teachers.items()}
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        step = ReferenceStep(method, student, models, optimizer, 8 / 255, 2 / 255, 10, {})
        result = {"loss_check": check(step)}
        loader = reference_loader(images, labels, batch)

        def run_steps():
            for i, (x, y) in enumerate(loader):
                if i == job["warmup"]:
                    _sync(device)
                    start = time.perf_counter()
                step(x.to(device), y.to(device))
            _sync(device)
            return start
    else:
        def parts_for(fast: bool):
            cfg = _config(method, arch, batch, job["device"], teachers, fast, job["compile"], job["amp"])
            return build_parts(cfg, spec, device)

        if job["impl"] == "exact":  # the loss check only, in its own process so it does not inflate peaks
            exact = parts_for(False)
            return {"loss_check": check(lambda x, y: exact.step(exact.model, x, y)[0]["loss"])}
        parts = parts_for(True)
        student = parts.wrap()
        student.train()
        result = {"loss_check": check(lambda x, y: parts.step(student, x, y)[0]["loss"])}
        loader = DeviceLoader(Split(images, labels), batch, device=device, shuffle=True, augment=True, padding=4,
                              flip=True, seed=0)

        def run_steps():
            total = torch.zeros((), device=device)
            for i, (x, y) in enumerate(loader):
                if i == job["warmup"]:
                    _sync(device)
                    start = time.perf_counter()
                total += parts.step(student, x, y)[0]["loss"]
            float(total)  # the one host sync, as the trainer's log point
            return start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if job.get("profile"):  # one more step under the profiler: where the time of a step goes
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        x0, y0 = images[:batch].float().div(255).to(device), labels[:batch].to(device)
        with profile(activities=activities) as prof:
            if job["impl"] == "reference":
                step(x0, y0)
            else:
                float(parts.step(student, x0, y0)[0]["loss"])

        events = prof.key_averages()
        result["profile_table"] = events.table(sort_by=profile_sort_key(events, device.type == "cuda"), row_limit=12,
                                               max_name_column_width=40)
    start = run_steps()
    seconds = time.perf_counter() - start
    result.update(job, img_s=job["steps"] * batch / seconds, step_s=seconds / job["steps"], peak_mb=_peak_mb(device),
                  threads=torch.get_num_threads())
    return result


def make_teachers(folder: Path, device: str) -> dict[str, str]:
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model

    paths = {}
    for i, (role, arch) in enumerate(TEACHERS.items()):
        torch.manual_seed(100 + i)
        spec = ModelSpec(arch, 10)
        model = spec.build()
        with torch.no_grad():  # confident predictions like a trained teacher's, so the loss check means something
            model.fc.weight.mul_(20)
        path = folder / f"teacher_{role}.safetensors"
        save_model(path, model, ModelMeta(spec, dataset="synthetic", eps=8 / 255, method="random"))
        paths[role] = str(path)
    return paths


def format_table(rows: list[dict]) -> str:
    lines = ["| student | method | reference img/s | ours img/s | speed-up | ref peak MB | ours peak MB | "
             "loss ref | loss ours exact | loss ours fast |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['method']} | {r['ref_img_s']:.1f} | {r['ours_img_s']:.1f} | "
                     f"**{r['speedup']:.2f}x** | {r['ref_peak_mb']:.0f} | {r['ours_peak_mb']:.0f} | "
                     f"{r['loss_ref']:.6f} | {r['loss_exact']:.6f} | {r['loss_fast']:.6f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="batch 32 (fits a 2-core CPU) instead of 128")
    p.add_argument("--batch", type=int, help="batch size (overrides --small)")
    p.add_argument("--students", default="resnet18,mobilenetv2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=1, help="measurements per side (medians are reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile our student and attack twin")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="our AMP setting (auto: bf16 on CUDA, off on CPU, as the trainer)")
    p.add_argument("--json", help="write the rows here too")
    p.add_argument("--profile", action="store_true", help="print the top operators of one step of each side")
    args = p.parse_args(argv)

    batch = args.batch or (32 if args.small else 128)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; valid: {METHODS}")
    rows = []
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        teachers = make_teachers(Path(tmp), args.device)
        for arch in args.students.split(","):
            for method in methods:
                samples: dict[str, list[dict]] = {"reference": [], "ours": [], "exact": []}
                for repeat in range(args.repeats):
                    for impl in ("reference", "ours", "exact")[: 3 if repeat == 0 else 2]:
                        job = dict(impl=impl, method=method, arch=arch, batch=batch, steps=args.steps,
                                   warmup=args.warmup, device=args.device, teachers=teachers, compile=args.compile,
                                   amp=args.amp, profile=args.profile and repeat == 0 and impl != "exact")
                        with ProcessPoolExecutor(1, mp_context=context) as pool:
                            samples[impl].append(pool.submit(measure, job).result())
                ref, ours = samples["reference"], samples["ours"]
                row = {"arch": arch, "method": method, "batch": batch, "device": args.device,
                       "ref_img_s": statistics.median(r["img_s"] for r in ref),
                       "ours_img_s": statistics.median(r["img_s"] for r in ours),
                       "ref_peak_mb": statistics.median(r["peak_mb"] for r in ref),
                       "ours_peak_mb": statistics.median(r["peak_mb"] for r in ours),
                       "loss_ref": ref[0]["loss_check"], "loss_exact": samples["exact"][0]["loss_check"],
                       "loss_fast": ours[0]["loss_check"], "threads": ours[0]["threads"], "repeats": args.repeats}
                row["speedup"] = row["ours_img_s"] / row["ref_img_s"]
                row["exact_rel_diff"] = abs(row["loss_exact"] - row["loss_ref"]) / max(abs(row["loss_ref"]), 1e-12)
                row["fast_rel_diff"] = abs(row["loss_fast"] - row["loss_ref"]) / max(abs(row["loss_ref"]), 1e-12)
                rows.append(row)
                for side, runs in (("reference", ref), ("ours", ours)):
                    if runs[0].get("profile_table"):
                        print(f"--- {arch} {method} {side}: one step, top operators by self time\n{runs[0]['profile_table']}")
                print(f"{arch} {method}: reference {row['ref_img_s']:.1f} img/s, ours {row['ours_img_s']:.1f} img/s "
                      f"({row['speedup']:.2f}x); loss ref {row['loss_ref']:.6f} exact {row['loss_exact']:.6f} "
                      f"(rel {row['exact_rel_diff']:.1e}) fast {row['loss_fast']:.6f} (rel {row['fast_rel_diff']:.1e})",
                      flush=True)
    print()
    print(f"batch {batch}, 32x32, device {args.device}, {rows[0]['threads'] if rows else '?'} threads, "
          f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats}")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    bad = [r for r in rows if r["exact_rel_diff"] > EXACT_TOLERANCE]
    if bad:
        print("LOSS MISMATCH (exact configuration vs reference): "
              + ", ".join(f"{r['arch']}/{r['method']} {r['exact_rel_diff']:.1e}" for r in bad))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
