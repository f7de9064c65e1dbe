"""Wall time of ``robustedge export`` with the default white-box attacks on an INT8 file (issue 24, item 4).

    python bench/export_time.py --quickstart runs/quickstart/student_bmtard/best.safetensors --repeats 3
    git worktree add /tmp/before <commit>     # another checkout, timed side by side with this one:
    python bench/export_time.py --code before=/tmp/before --code after=. --threads 1 ...

Two models, each exported with ``--formats onnx,onnx-int8 --n N`` and every other option at its
default (transfer PGD-20 + AutoAttack on torch; white-box PGD-20, CW, AutoAttack and DIVA on the INT8
file's twin; Square, 5,000 queries, on each runtime; the gradient checks):

- ``quickstart``: the quickstart's digits student (MobileNetV2 width 0.25, 8x8, one channel). It is
  robust on most digits, so AutoAttack goes all the way to its Square stage (5,000 queries per
  surviving example), the case where the twin answered every query and the export did not finish
  (issue 24). ``--quickstart`` names its checkpoint; without one, ``runs/quickstart/student_bmtard``
  of the checkout is used, or the quickstart's PGD-AT recipe is trained into ``--work`` (about a minute).
- ``mobilenetv2``: a full-width MobileNetV2 on 32x32 three-channel input (the digits upscaled: the only
  dataset that needs no download), trained naturally (SGD, lr 0.05, momentum 0.9) for ``--mnv2-epochs``
  epochs from a seeded initialisation so that it classifies the digits (a random one gets ~10% and leaves
  the attacks nothing to do). Bigger activations, fewer examples left for Square: the gradient passes on
  the twin (white-box attacks and the gradient checks) weigh more here.

Each export is a fresh process (``python -m robustedge.cli export``) run from a ``--code`` checkout with
``PYTHONPATH`` pointing there, so a clean checkout of another commit can be timed without touching the
working tree. With several ``--code``, their runs alternate (A, B, A, B, ...) so that a machine whose
load drifts slows both alike. ``--threads`` sets ``OMP_NUM_THREADS`` for the exports: on a small machine
shared with other jobs, two-thread torch processes spin against each other and run up to ten times
slower (tests/conftest.py), one thread each is stable. A run past ``--timeout`` is killed and reported
as not finished (and that checkout's later repeats of the case are skipped). Prints per run the wall time
and the stage times the manifest records, then the median per case and checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quickstart_checkpoint(args) -> Path:
    if args.quickstart:
        return Path(args.quickstart)
    found = Path(args.code) / "runs" / "quickstart" / "student_bmtard" / "best.safetensors"
    if found.is_file():
        return found
    trained = Path(args.work) / "student_pgd_at" / "best.safetensors"
    if not trained.is_file():
        from robustedge.api import train

        print("no quickstart student: training the quickstart's PGD-AT student (digits_student_pgd_at)", flush=True)
        train("digits_student_pgd_at", out_dir=str(args.work), device="cpu", progress=False)
    return trained


def mobilenetv2_checkpoint(args) -> Path:
    """A full-width MobileNetV2 for 32x32x3 digits, seeded and trained naturally."""
    path = Path(args.work) / f"mobilenetv2_32_sgd_e{args.mnv2_epochs}.safetensors"
    if path.is_file():
        return path
    import torch
    import torch.nn.functional as F

    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
    from robustedge.data import DeviceLoader, load_dataset

    spec = ModelSpec("mobilenetv2", 10, 3, 1.0, 32)
    data = load_dataset("digits", image_size=32, channels=3)
    torch.manual_seed(0)
    model = spec.build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DeviceLoader(data.train, 64, seed=0)
    model.train()
    for epoch in range(args.mnv2_epochs):
        start = time.perf_counter()
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"mobilenetv2 32x32: epoch {epoch + 1}/{args.mnv2_epochs} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    model.eval()
    with torch.no_grad():
        x, y = data.test.float_images()[:200], data.test.labels[:200]
        accuracy = float((model(x).argmax(1) == y).float().mean())
    print(f"mobilenetv2 32x32: clean accuracy {100 * accuracy:.1f}% on 200 test digits", flush=True)
    save_model(path, model, ModelMeta(spec, dataset="digits", eps=0.1, method="natural",
                                      classes=[str(i) for i in range(10)],
                                      extra={"data": {"seed": 0, "val_fraction": 0.1}}))
    return path


def export_once(args, code: str, checkpoint: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "robustedge.cli", "export", str(checkpoint), "--formats", "onnx,onnx-int8",
               "--n", str(args.n), "--out", str(out), "--force", "--device", "cpu", "--allow-flags"]
    env = dict(os.environ, PYTHONPATH=code, ROBUSTEDGE_NO_PROGRESS="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "finished": False, "command": " ".join(command[1:])}
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "finished": proc.returncode in (0, 1), "rc": proc.returncode,
              "command": " ".join(command[1:])}
    if not result["finished"]:
        result["stderr"] = proc.stderr[-2000:]
        return result
    manifest = json.loads((out / "manifest.json").read_text())
    result["stages"] = dict(manifest["seconds"])
    for fmt, checks in manifest["checks"].items():
        for stage, value in checks.get("seconds", {}).items():
            result["stages"][f"{fmt}:{stage}"] = value
    row = manifest["table"].get("onnx-int8", {})
    result["int8"] = {k: row[k] for k in ("clean", "whitebox_autoattack", "square", "worst", "twin_agreement")
                      if k in row}
    return result


def describe(result: dict, timeout: float) -> str:
    if result["finished"]:
        return f"{result['seconds']:.1f} s"
    return f"did not finish in {timeout:.0f} s" if result["seconds"] is None else f"failed (rc {result['rc']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", action="append", metavar="LABEL=DIR",
                        help="a checkout whose robustedge is timed, repeatable (default: this one)")
    parser.add_argument("--work", default="/tmp/export_time", help="checkpoints and bundles")
    parser.add_argument("--cases", default="quickstart,mobilenetv2")
    parser.add_argument("--quickstart", help="the quickstart student's checkpoint")
    parser.add_argument("--mnv2-epochs", type=int, default=6)
    parser.add_argument("--n", type=int, default=20, help="export --n")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the exports (default: unset)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args(argv)
    codes = dict(c.split("=", 1) if "=" in c else (Path(c).name, c) for c in (args.code or [f"current={REPO}"]))
    codes = {label: str(Path(path).resolve()) for label, path in codes.items()}
    args.code = next(iter(codes.values()))  # where quickstart_checkpoint looks for runs/quickstart
    Path(args.work).mkdir(parents=True, exist_ok=True)
    checkpoints = {"quickstart": quickstart_checkpoint, "mobilenetv2": mobilenetv2_checkpoint}
    runs: dict[str, dict[str, list[dict]]] = {}
    for case in args.cases.split(","):
        checkpoint = checkpoints[case](args)
        runs[case] = {label: [] for label in codes}
        for repeat in range(args.repeats):
            for label, code in codes.items():
                if any(not r["finished"] for r in runs[case][label]):
                    continue  # killed or failed once: not repeated
                result = export_once(args, code, checkpoint, Path(args.work) / f"bundle_{case}_{label}")
                runs[case][label].append(result)
                print(f"{case} / {label} run {repeat + 1}: {describe(result, args.timeout)}", flush=True)
                if result.get("stages"):
                    print("  stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["stages"].items()),
                          flush=True)
                    print(f"  onnx-int8: {result['int8']}", flush=True)
                if result.get("stderr"):
                    print(result["stderr"], flush=True)
        if any(runs[case].values()):
            print(f"  command: {next(r for r in runs[case].values() if r)[0]['command']}", flush=True)
    print("\n| case | checkout | runs (s) | median (s) |\n|---|---|---|---:|")
    for case, by_code in runs.items():
        for label, results in by_code.items():
            done = [r["seconds"] for r in results if r["finished"]]
            if not results:
                continue
            median = f"{statistics.median(done):.1f}" if len(done) == len(results) else \
                describe(results[-1], args.timeout)
            print(f"| {case} | {label} | {', '.join(describe(r, args.timeout) for r in results)} | {median} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
