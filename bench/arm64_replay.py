"""Bundles replayed on arm64 builds of their runtimes (qemu user-mode emulation) beside this machine.

    python bench/arm64_replay.py runs/quickstart/student_bmtard_export runs/mnv2_32_export --out runs/arm64 --fresh

For each bundle, ``robustedge verify BUNDLE --emulate arm64``'s own code (robustedge/edge/emulation.py):
every file's replays (clean, transfer, white-box, Square) on this machine and on arm64, with the arm64
rows' top-1 agreement and max |logit difference| against this machine. ``--fresh`` prepares the arm64
environment in a new cache under ``--out`` first, so the first-run setup time is measured too.

Where a file's logits differ between the two, it says why, in two steps:
1. the same replay on this machine with the arm64 environment's ONNX Runtime release (its x86 wheel,
   kept in the environment): the difference that remains is the processor's kernels, not the release;
2. the first operator whose output differs: ONNX Runtime's optimised graph (extended level, the
   operators both builds have) with every intermediate tensor made an output, run on the input with the
   largest logit difference on both processors.
Results go to ``<out>/arm64.md`` and ``arm64.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# run on both processors: every intermediate output of an optimised graph, for one input
INTERMEDIATES = r'''
import sys
import numpy as np
import onnxruntime as ort
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
options.intra_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])
outputs = session.run(None, {session.get_inputs()[0].name: x})
np.savez(sys.argv[3], **{o.name.replace("/", "|"): v for o, v in zip(session.get_outputs(), outputs)})
'''


def exposed_graph(path: Path, out: Path) -> list[tuple[str, str, str]]:
    """ONNX Runtime's optimised graph of ``path`` (extended level: fusions into operators every CPU build
    has, no layout of one processor's kernels) with every node's output a graph output; returns the nodes
    in order as (name, op type, first output)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(out))
    known = {o.name for o in model.graph.output}
    nodes = []
    for node in model.graph.node:
        for name in node.output:
            if name and name not in known:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                known.add(name)
        nodes.append((node.name, node.op_type, node.output[0]))
    onnx.save(model, str(out))
    return nodes


def first_divergence(path: Path, x: np.ndarray, env, scratch: Path, host_python: list[str]) -> dict:
    """The first operator of the optimised graph whose output differs between this machine and ``env``."""
    model = scratch / "exposed.onnx"
    nodes = exposed_graph(path, model)
    (scratch / "intermediates.py").write_text(INTERMEDIATES)
    np.save(scratch / "x.npy", x.astype(np.float32))
    results = {}
    for side, cmd, run_env in (("host", host_python, None), ("arm64", env.python(), env.env())):
        target = scratch / f"{side}.npz"
        subprocess.run(cmd + [str(scratch / "intermediates.py"), str(model), str(scratch / "x.npy"), str(target)],
                       check=True, env=run_env, capture_output=True, timeout=1800)
        with np.load(target) as data:
            results[side] = {k.replace("|", "/"): data[k] for k in data.files}
    for name, op, output in nodes:
        a, b = results["host"].get(output), results["arm64"].get(output)
        if a is None or b is None or a.shape != b.shape:
            continue
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        if diff.max() > 0:
            return {"node": name, "op": op, "dtype": str(a.dtype), "elements_differing": int((diff > 0).sum()),
                    "of": int(diff.size), "max_difference": float(diff.max()),
                    "nodes_before": sum(1 for n in nodes[:nodes.index((name, op, output))])}
    return {"node": None, "op": None, "note": "no intermediate output differs at the extended optimisation level "
                                              "(the difference comes from the kernels the full level selects)"}


def main(argv: list[str] | None = None) -> int:
    from robustedge.edge.reverify import verify_bundle
    from robustedge.edge.emulated_env import prepare
    from robustedge.edge.emulation import compare_logits, run_verifier
    from robustedge.files import atomic_write_json, atomic_write_text
    from robustedge.verifier import FORMATS, load_manifest, load_samples

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fresh", action="store_true", help="prepare the arm64 environment anew under --out (timed)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        os.environ["ROBUSTEDGE_CACHE"] = str((args.out / "cache").resolve())
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    env = prepare("arm64", progress=say)
    setup = time.perf_counter() - start
    results = {"setup_seconds": round(setup, 1), "environment": env.facts, "bundles": {}}
    lines = [f"arm64 environment: {env.facts['qemu_version']}, cpu {env.isa.cpu}, Python {env.facts['python']}, "
             f"onnxruntime {env.runtimes()['onnxruntime']}; prepared in {setup:.0f} s"
             + (" (fresh)" if args.fresh else " (cached)"), ""]
    for bundle in args.bundles:
        say(f"== {bundle}")
        start = time.perf_counter()
        report, failures = verify_bundle(bundle, square_n=None, progress=say, out=args.out / f"{bundle.name}-verify",
                                         emulate=("arm64",))
        total = time.perf_counter() - start
        manifest = load_manifest(bundle)
        entry = {"table": report["table"], "emulated": report["emulated"], "gate_failures": failures,
                 "seconds_total": round(total, 1), "explained": {}}
        lines += [f"**{bundle.name}** ({manifest['samples']['n']} test images; arm64 replay "
                  f"{report['emulated']['seconds'].get('arm64_replay', 0):.0f} s, whole verify {total:.0f} s):", "",
                  "| format | clean x86 / arm64 (%) | worst x86 / arm64 (%) | top-1 arm64 vs x86 (%) | "
                  "max logit diff | inputs compared |", "|---|---:|---:|---:|---:|---:|"]
        for fmt in manifest["files"]:
            row, arm = report["table"].get(fmt), report["table"].get(f"{fmt}@arm64")
            if row is None or arm is None:
                lines.append(f"| {fmt} | not replayed: "
                             f"{report['emulated']['skipped'].get(f'{fmt}@arm64', 'no runtime here')} | | | | |")
                continue
            lines.append(f"| {fmt} | {100 * row['clean']:.1f} / {100 * arm['clean']:.1f} | "
                         f"{100 * row['worst']:.1f} / {100 * arm['worst']:.1f} | {100 * arm['isa_agreement']:.2f} | "
                         f"{arm['isa_max_logit_diff']:.2g} | {arm['isa_compared']} |")
        lines.append("")
        differing = [f for f in manifest["files"] if report["table"].get(f"{f}@arm64", {}).get("isa_max_logit_diff", 0)
                     > 1e-4 and FORMATS[f].runtime == "onnxruntime"]
        if differing:
            with tempfile.TemporaryDirectory() as scratch:
                scratch = Path(scratch)
                (scratch / "h").mkdir(), (scratch / "a").mkdir(), (scratch / "r").mkdir()
                _, host = run_verifier(bundle, differing, scratch / "h")
                _, arm = run_verifier(bundle, differing, scratch / "a", env)
                version = env.runtimes()["onnxruntime"]
                # the environment keeps this machine's wheel of its release: the reference of every comparison
                _, same_release = run_verifier(bundle, differing, scratch / "r", host_env=env.host_env())
                samples = load_samples(bundle, manifest)
                for fmt in differing:
                    release = compare_logits(same_release, arm, fmt)
                    versions = compare_logits(host, same_release, fmt)
                    worst_key, worst_index, worst = None, 0, -1.0
                    for key in (k for k in arm if k.startswith(fmt + "/")):
                        diff = np.abs(arm[key] - same_release[key]).max(axis=1)
                        if diff.max() > worst:
                            worst_key, worst_index, worst = key, int(diff.argmax()), float(diff.max())
                    column = worst_key.split("/", 1)[1]
                    inputs = {"clean": "x"} | {f"transfer_{a}": f"adv_{a}" for a in manifest["samples"]["attacks"]}
                    source = inputs.get(column) or (f"wb.{fmt}.{column[len('whitebox_'):]}" if column.startswith(
                        "whitebox_") else f"sq.{fmt}")
                    x = samples[source][worst_index:worst_index + 1]
                    (scratch / "d").mkdir(exist_ok=True)
                    node = first_divergence(bundle / manifest["files"][fmt]["file"], x, env, scratch / "d",
                                            [sys.executable, "-s", "-B"]) if fmt.startswith("onnx") else {}
                    entry["explained"][fmt] = {"same_release_x86_vs_arm64": release,
                                               "x86_releases": {"from": report["platform"]["runtimes"].get(
                                                   "onnxruntime"), "to": version} | versions,
                                               "input": {"set": source, "index": worst_index, "max_diff": worst},
                                               "first_divergence": node}
                    lines.append(f"- {fmt}: with onnxruntime {version} on both processors, top-1 "
                                 f"{100 * release['isa_agreement']:.2f}%, max logit diff "
                                 f"{release['isa_max_logit_diff']:.2g} (x86 {report['platform']['runtimes'].get('onnxruntime')}"
                                 f" vs x86 {version}: {versions['isa_max_logit_diff']:.2g}). Largest on "
                                 f"{source}[{worst_index}]"
                                 + (f"; first differing operator: {node['op']} `{node['node']}` "
                                    f"({node['elements_differing']} of {node['of']} {node['dtype']} values, up to "
                                    f"{node['max_difference']:.3g}, after {node['nodes_before']} identical nodes)"
                                    if node.get("op") else (f"; {node['note']}" if node else "")))
            lines.append("")
        results["bundles"][str(bundle)] = entry
    atomic_write_json(args.out / "arm64.json", results)
    atomic_write_text(args.out / "arm64.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
