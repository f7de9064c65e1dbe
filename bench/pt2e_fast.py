"""QAT preparation and conversion: torchao as is vs RobustEdge's fast paths (robustedge/pt2e_fast.py).

    python bench/pt2e_fast.py --repeats 3

Each measurement is a fresh process (the first prepare and convert of a process are what a QAT run,
its export and a report each pay), alternating the two variants, with one thread. Prints the median
seconds of ``prepare_qat`` and of ``convert`` per architecture and variant, and stops unless both
variants give the same prepared code and bit-identical converted outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CASES = {  # name: (arch, width, input shape)
    "mobilenetv2-digits": ("mobilenetv2", 0.25, (1, 8, 8)),
    "resnet18-32x32": ("resnet18", 0.5, (3, 32, 32)),
}

CHILD = r"""
import hashlib, json, sys, time, warnings
import torch
warnings.simplefilter("ignore")
torch.set_num_threads(1)
from robustedge import qat
from robustedge.models import build_model
arch, width, shape = sys.argv[1], float(sys.argv[2]), tuple(json.loads(sys.argv[3]))
torch.manual_seed(0)
model = build_model(arch, num_classes=10, in_channels=shape[0], width=width, image_size=shape[1])
t0 = time.perf_counter()
student = qat.prepare_qat(model, shape)
prepare = time.perf_counter() - t0
qat.calibrate(student, torch.rand(64, *shape, generator=torch.Generator().manual_seed(1)))
student.train(False)
t0 = time.perf_counter()
converted = qat.convert(student)
convert = time.perf_counter() - t0
out = converted(torch.rand(16, *shape, generator=torch.Generator().manual_seed(2)))
print(json.dumps({"prepare": prepare, "convert": convert,
                  "code": hashlib.sha256(student.graph.code.encode()).hexdigest(),
                  "outputs": hashlib.sha256(out.detach().numpy().tobytes()).hexdigest()}))
"""


def measure(case: tuple, fast: bool) -> dict:
    arch, width, shape = case
    env = dict(os.environ, ROBUSTEDGE_PT2E_FAST="1" if fast else "0", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", CHILD, arch, str(width), json.dumps(shape)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    rows = []
    for name in args.cases:
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeats):
            for fast in (False, True):
                runs[fast].append(measure(CASES[name], fast))
        fingerprints = {(r["code"], r["outputs"]) for rs in runs.values() for r in rs}
        if len(fingerprints) != 1:
            sys.exit(f"{name}: the fast paths changed the prepared graph or the converted outputs")
        medians = {fast: {k: statistics.median(r[k] for r in rs) for k in ("prepare", "convert")}
                   for fast, rs in runs.items()}
        rows.append((name, medians))
    print("| model | step | torchao (s) | fast paths (s) | speed-up |\n|---|---|---:|---:|---:|")
    for name, medians in rows:
        for step in ("prepare", "convert"):
            slow, fast = medians[False][step], medians[True][step]
            print(f"| {name} | {step} | {slow:.1f} | {fast:.1f} | {slow / fast:.1f}x |")
    print("identical prepared code and converted outputs in every run")


if __name__ == "__main__":
    main()
