"""Post-training INT8 by the maintained PTQ libraries against the export's own, judged by white-box attacks.

    pip install nncf aimet-onnx   # not dependencies of RobustEdge: this benchmark decides whether they should be
    python bench/ptq_libraries.py runs/qat26/bmtard_s0 runs/qat26/bmtard_s0_ptq --out runs/ptq_libraries

Issue 26 asked whether bias correction or AdaRound from a maintained library (NNCF, AIMET) makes post-training
INT8 keep the float model's robustness. Each variant quantises the bundle's float ``model.onnx`` from the
export's own calibration images (the same ``--calibration-n`` and seed) and is attacked like the export
attacks an INT8 file: PGD-20 and AutoAttack on its twin (robustedge.edge.twin, checked against ONNX Runtime),
with AutoAttack's Square stage querying ONNX Runtime. The export's own file (``model.int8.onnx`` of the
bundle) is attacked alike. docs/results/qat.md quotes the table.

Variants: ``nncf`` (nncf.quantize, preset MIXED, no bias correction), ``nncf-fbc`` (with its fast bias
correction), ``aimet`` (aimet_onnx QuantizationSimModel, min-max, per-channel weights), ``aimet-adaround``
(the same after apply_adaround), ``export`` (the bundle's onnxruntime file). NNCF's full bias correction is
not offered: with ONNX Runtime 1.32 it fails inside its sub-graph extraction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

VARIANTS = ("export", "nncf", "nncf-fbc", "aimet", "aimet-adaround")


def _nncf(source: Path, dst: Path, calibration: np.ndarray, fast_bias_correction: bool) -> None:
    import nncf
    import onnx
    from onnxruntime.quantization import quant_pre_process

    prepared = dst.with_name(dst.stem + ".pre.onnx")  # shape inference and folding, as the export does first
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    model = onnx.load(str(prepared))
    name = model.graph.input[0].name
    options = {} if fast_bias_correction else {
        "advanced_parameters": nncf.AdvancedQuantizationParameters(disable_bias_correction=True)}
    quantised = nncf.quantize(model, nncf.Dataset(list(calibration[:, None]), lambda a: {name: a}),
                              subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED, **options)
    onnx.save(quantised, str(dst))
    prepared.unlink()


def _aimet(source: Path, dst: Path, calibration: np.ndarray, adaround_iterations: int) -> None:
    import aimet_onnx
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround

    model = onnx.load(str(source))
    name = model.graph.input[0].name
    config = Path(aimet_onnx.__file__).parent / "common/quantsim_config/default_config_per_channel.json"
    batches = [{name: calibration[i:i + 64]} for i in range(0, len(calibration), 64)]
    sim = QuantizationSimModel(model, param_type="int8", activation_type="int8", quant_scheme="min_max",
                               config_file=str(config))
    if adaround_iterations:
        apply_adaround(sim, batches, num_iterations=adaround_iterations)
    sim.compute_encodings(batches)
    # int8 weights with int32 biases and uint8 activations: the layout onnxruntime's quantizer writes
    onnx.save(sim.to_onnx_qdq(export_int32_bias=True, prequantize_constants=True), str(dst))


def quantise(variant: str, bundle: Path, out: Path, calibration: np.ndarray, adaround_iterations: int) -> Path:
    if variant == "export":
        return bundle / "model.int8.onnx"
    dst = out / f"{variant}.onnx"
    if dst.exists():
        return dst
    source = bundle / "model.onnx"
    if variant.startswith("nncf"):
        _nncf(source, dst, calibration, fast_bias_correction=variant == "nncf-fbc")
    else:
        _aimet(source, dst, calibration, adaround_iterations if variant == "aimet-adaround" else 0)
    return dst


def attack_file(path: Path, float_model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                attacks: list[str], seed: int) -> dict:
    from robustedge.edge.twin import OnnxTwin, agreement
    from robustedge.edge.verify import verification_attack
    from robustedge.runners import RunnerModule
    from robustedge.verifier import OrtRunner

    twin, runner = OnnxTwin(path).eval(), OrtRunner(path)
    correct = runner(x.numpy()).argmax(1) == y.numpy()
    row = {"clean": 100 * float(correct.mean()), "twin_agreement": agreement(twin, runner, x.numpy())["agreement"]}
    for name in attacks:
        start = time.perf_counter()
        adv = verification_attack(name, twin, x, y, eps, seed, reference=float_model,
                                  runtime=RunnerModule(runner, "onnx-int8"))
        adv = adv.numpy().astype(np.float32)
        held = runner(adv).argmax(1) == y.numpy()
        correct &= held
        row[name] = 100 * float(held.mean())
        row[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        row["twin_agreement"] = min(row["twin_agreement"], agreement(twin, runner, adv)["agreement"])
    row["worst"] = 100 * float(correct.mean())
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the float run's folder (its best.safetensors)")
    parser.add_argument("bundle", type=Path, help="its onnx-int8 export bundle (model.onnx, model.int8.onnx, "
                                                  "verify.npz with the test images)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the quantised files and results.json")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--attacks", default="pgd20,autoattack", help="white-box attacks on each twin")
    parser.add_argument("--calibration-n", type=int, default=512, help="calibration images, as the export's")
    parser.add_argument("--adaround-iterations", type=int, default=10_000, help="AdaRound steps a layer")
    parser.add_argument("--seed", type=int, default=0, help="calibration draw and attack seed, as the export's")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    for need, module in (("nncf", "nncf"), ("aimet", "aimet_onnx")):
        if any(v.startswith(need) for v in variants):
            try:
                __import__(module)
            except ImportError:
                parser.error(f"the {need} variants need {module} (pip install {module.replace('_', '-')})")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    for path in (args.run / "best.safetensors", args.bundle / "model.onnx", args.bundle / "verify.npz"):
        if not path.is_file():
            parser.error(f"no such file {path}")

    from robustedge.data import calibration_images, split_for_model
    from robustedge.weights import load_model

    model, meta = load_model(args.run / "best.safetensors")
    model.eval()
    train = split_for_model(meta, None, None, "train", None)
    calibration = calibration_images(train, args.calibration_n, args.seed).numpy().astype(np.float32)
    samples = np.load(args.bundle / "verify.npz")
    x, y = torch.from_numpy(samples["x"]), torch.from_numpy(samples["y"])
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for variant in variants:
        start = time.perf_counter()
        path = quantise(variant, args.bundle, args.out, calibration, args.adaround_iterations)
        seconds = time.perf_counter() - start
        results[variant] = {"quantise_seconds": round(seconds, 1),
                            **attack_file(path, model, x, y, meta.eps, args.attacks.split(","), args.seed)}
        print(variant, json.dumps(results[variant]), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\n{len(x)} test images, eps {meta.eps}, %:\n")
    attacks = args.attacks.split(",")
    print("| file | clean | " + " | ".join(f"white-box {a}" for a in attacks) + " | worst | twin agreement |")
    print("|---|---:|" + "---:|" * len(attacks) + "---:|---:|")
    for variant, row in results.items():
        print(f"| {variant} | {row['clean']:.1f} | " + " | ".join(f"{row[a]:.1f}" for a in attacks)
              + f" | {row['worst']:.1f} | {100 * row['twin_agreement']:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
