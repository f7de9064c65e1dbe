"""Robustness of the exported artifacts, measured on their own runtimes (the torch side).

What every artifact gets (docs/design/export.md, "Export, bundles and verification"):

- replays through its runtime of the clean inputs and of the adversarial examples crafted on the
  torch model (``transfer_*``);
- white-box attacks on the artifact itself where it is a quantised ONNX file: PGD-20, CW-inf,
  AutoAttack (pyautoattack, standard) and a DIVA-style float-vs-INT8 disagreement attack, all run on
  its exact differentiable twin (:mod:`robustedge.edge.twin`) and then replayed on the runtime: the
  runtime's accuracy on them is what is reported (``whitebox_*``). The twin serves gradients only:
  AutoAttack's query-only Square stage asks the runtime itself
  (:class:`~robustedge.runners.QueriedTwin`). When the twin disagrees with the runtime beyond
  the gate's tolerance, these numbers are refused, not printed;
- black-box Square examples found by querying the runtime itself (``square``);
- ``worst``: per example, robust only if every attack left it correct;
- attack-failure flags: the comparisons of :mod:`robustedge.verifier` and the gradient checks of
  :mod:`robustedge.flags` (on the twin, measured on the runtime).

Every adversarial example lands in ``verify.npz``, so the bundle's torch-free ``verify.py`` replays
exactly these numbers on the target device.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from robustedge.edge.formats import twin_source
from robustedge.errors import RobustEdgeError
from robustedge.runners import QueriedTwin, RunnerModule, TorchRunner, model_device
from robustedge.flags import FlagSettings, gradient_flags, model_correct, square_examples
from robustedge.verifier import (FORMATS, Gate, artifact_row, comparison_flags, median_latency_ms, open_runner, predict,
                                 replay, reported_worst, square_key, whitebox_key)

TRANSFER_ATTACKS = ("pgd20", "autoattack")
WHITEBOX_ATTACKS = ("pgd20", "cw", "autoattack", "diva")
CRAFTABLE = ("pgd20", "autoattack", "fgsm", "cw", "pgd20_trades")


def check_transfer_attacks(attacks: tuple[str, ...]) -> tuple[str, ...]:
    for name in attacks:
        if name not in CRAFTABLE:
            raise RobustEdgeError(f"unknown transfer attack '{name}'; valid: {', '.join(CRAFTABLE)}")
    return tuple(dict.fromkeys(attacks))


def check_whitebox_attacks(attacks: tuple[str, ...]) -> tuple[str, ...]:
    for name in attacks:
        if name not in WHITEBOX_ATTACKS:
            raise RobustEdgeError(f"unknown white-box attack '{name}'; valid: {', '.join(WHITEBOX_ATTACKS)}")
    return tuple(dict.fromkeys(attacks))


def verification_attack(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int,
            reference: torch.nn.Module | None = None, runtime: torch.nn.Module | None = None) -> torch.Tensor:
    """One suite attack, exactly as `robustedge eval` runs it, or DIVA against ``reference``, on ``model``.

    ``runtime``: when ``model`` is an artifact's twin, the artifact's runtime as a module; AutoAttack's
    query-only stage (Square) then queries it instead of the twin (:class:`QueriedTwin`: the runtime is
    the function being measured, and it answers 5,000 queries per example far faster than the twin)."""
    from robustedge.attack_table import ATTACKS
    from robustedge.attacks import disagreement
    from robustedge.suite import run_attack

    if name == "autoattack" and runtime is not None:
        model = QueriedTwin(model, runtime)
    if name == "diva":
        gen = torch.Generator(device=x.device).manual_seed(seed)
        diva = ATTACKS["diva"]
        return torch.cat([disagreement(reference, model, xb, yb, eps=eps, step_size=diva.step_size(eps),
                                       steps=diva.steps, generator=gen)
                          for xb, yb in zip(x.split(256), y.split(256))])
    return run_attack(name, model, x, y, eps, 256, seed)[1]


def craft_samples(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  attacks: tuple[str, ...] = TRANSFER_ATTACKS, seed: int = 0,
                  precomputed: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """Clean inputs, labels, torch predictions and adversarial examples crafted on the torch model."""
    check_transfer_attacks(attacks)
    model = model.eval()
    samples = {"x": x.cpu().numpy().astype(np.float32), "y": y.cpu().numpy().astype(np.int64)}
    samples["torch_pred"] = predict(TorchRunner(model), samples["x"], what="the torch model").argmax(1).astype(np.int64)
    for name in attacks:
        adv = precomputed[name] if precomputed and name in precomputed \
            else verification_attack(name, model, x, y, eps, seed)
        samples[f"adv_{name}"] = adv.detach().cpu().numpy().astype(np.float32)
    return samples


def runtime_correct(runner, what: str):
    """Correctness measured on a runtime (for the gradient checks run on an artifact's twin)."""
    def correct(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
        return predict(runner, x.detach().cpu().numpy().astype(np.float32), what=what).argmax(1) == y.cpu().numpy()
    return correct


def torch_row(model: torch.nn.Module, samples: dict[str, np.ndarray], size_bytes: int, eps: float, *,
              square_n: int, square_queries: int, seed: int, flag_settings: FlagSettings,
              gate: Gate) -> tuple[dict, list[dict], dict]:
    """The reference row: the torch model on its own white-box examples (``transfer_*`` are white-box
    for it), Square on it, and its flags."""
    run = TorchRunner(model)
    seconds = {}
    if square_n > 0:
        start = time.perf_counter()
        samples[square_key("torch")] = square_examples(run, samples, eps, square_n, square_queries, seed,
                                                       what="the torch model")
        seconds["square"] = time.perf_counter() - start
    row, results = replay(run, samples, "torch", what="the torch model")
    row.update(size_mb=size_bytes / 2**20, latency_b1_ms=median_latency_ms(run, samples["x"], 1),
               latency_b64_ms=median_latency_ms(run, samples["x"], 64))
    device = model_device(model)
    x, y = torch.from_numpy(samples["x"]).to(device), torch.from_numpy(samples["y"]).to(device)
    pgd20 = torch.from_numpy(samples["adv_pgd20"]).to(device) if "adv_pgd20" in samples else None
    start = time.perf_counter()
    grad_flags, info = gradient_flags(model, x, y, eps, model_correct(model), flag_settings, seed, pgd20,
                                      reported_worst(results))
    seconds["gradient_checks"] = time.perf_counter() - start
    return row, comparison_flags(results, gate.flag_tolerance) + grad_flags, {"gradient_checks": info,
                                                                              "seconds": seconds}


def quantized_twin(path: Path, fmt: str, qat: bool = False):
    """The differentiable twin of an INT8 artifact read from the QDQ ONNX graph of its function
    (:func:`robustedge.edge.formats.twin_source`), or None for formats without one."""
    from robustedge.edge.twin import OnnxTwin

    source = path.with_name(FORMATS[twin_source(fmt, qat)].file)
    if not source.name.endswith(".onnx") or not source.is_file():
        return None
    twin = OnnxTwin(source).eval()
    return twin if twin.is_quantized else None


def verify_artifact(path: Path, fmt: str, samples: dict[str, np.ndarray], eps: float, *,
                    float_model: torch.nn.Module, whitebox: tuple[str, ...], square_n: int, square_queries: int,
                    seed: int, flag_settings: FlagSettings, gate: Gate, qat: bool = False,
                    progress=print) -> tuple[dict, list[dict], dict]:
    """One artifact's row, flags and diagnostics; adds its adversarial examples to ``samples``.
    ``qat``: the artifact is a QAT student's, whose ExecuTorch program shares its ONNX file's twin."""
    from robustedge.edge.twin import agreement

    runner = open_runner(path, fmt)
    device = model_device(float_model)  # the twin is attacked where the torch model runs (a GPU if there)
    twin = quantized_twin(path, fmt, qat) if whitebox else None
    twin = twin.to(device) if twin is not None else None
    source = twin_source(fmt, qat)
    info, twin_stats, accepted, seconds = {}, {}, False, {}
    if twin is not None:
        progress(f"white-box attacks on the twin of {fmt}: {', '.join(whitebox)}")
        x, y = torch.from_numpy(samples["x"]).to(device), torch.from_numpy(samples["y"]).to(device)
        crafted = {}
        for name in whitebox:
            reused = whitebox_key(source, name)
            if source != fmt and reused in samples:  # the same twin was attacked already
                crafted[name] = samples[reused]
                continue
            start = time.perf_counter()
            crafted[name] = verification_attack(name, twin, x, y, eps, seed, reference=float_model,
                                    runtime=RunnerModule(runner, fmt)).cpu().numpy().astype(np.float32)
            seconds[f"whitebox_{name}"] = time.perf_counter() - start
        clean = agreement(twin, runner, samples["x"])
        adversarial = agreement(twin, runner, np.concatenate(list(crafted.values())))
        twin_stats = {"twin_agreement": min(clean["agreement"], adversarial["agreement"]),
                      "twin_max_logit_diff": max(clean["max_abs_logit_diff"], adversarial["max_abs_logit_diff"])}
        info["twin"] = {"clean": clean, "adversarial": adversarial}
        accepted = twin_stats["twin_agreement"] >= gate.min_twin_agreement
        if accepted:
            samples.update({whitebox_key(fmt, name): adv for name, adv in crafted.items()})
        else:
            progress(f"{fmt}: the twin agrees with the runtime on {100 * twin_stats['twin_agreement']:.1f}% only; "
                     f"white-box numbers refused")
    if square_n > 0:
        start = time.perf_counter()
        samples[square_key(fmt)] = square_examples(runner, samples, eps, square_n, square_queries, seed, what=fmt)
        seconds["square"] = time.perf_counter() - start
    start = time.perf_counter()
    row, results, runner = artifact_row(path, fmt, samples)
    seconds["replay_and_latency"] = time.perf_counter() - start
    row.update(twin_stats)
    flags = comparison_flags(results, gate.flag_tolerance)
    if accepted:
        start = time.perf_counter()
        x, y = torch.from_numpy(samples["x"]).to(device), torch.from_numpy(samples["y"]).to(device)
        pgd20 = torch.from_numpy(samples[whitebox_key(fmt, "pgd20")]).to(device) if "pgd20" in whitebox else None
        grad_flags, info["gradient_checks"] = gradient_flags(twin, x, y, eps, runtime_correct(runner, fmt),
                                                             flag_settings, seed, pgd20, reported_worst(results))
        flags += grad_flags
        seconds["gradient_checks"] = time.perf_counter() - start
    info["seconds"] = seconds
    return row, flags, info
