"""Replays: every stored set of examples through an artifact's runtime, and the accuracy row it gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from robustedge.verifier.runners import check_input_shape, median_latency_ms, open_runner, predict
from robustedge.verifier.schema import square_key, whitebox_key


def replay(runner, samples: dict, row_name: str, what: str = "the model",
           logits: dict | None = None) -> tuple[dict, dict]:
    """Every stored set of examples through ``runner``: (row of accuracies, per-example correctness).

    Columns: ``clean``, ``agreement`` (top-1 with torch), ``transfer_<attack>`` (crafted on the torch
    model), ``whitebox_<attack>`` (crafted on this artifact's twin), ``square`` (black-box examples found
    against this artifact, on the first rows) and ``worst``: an example counts as robust only if every
    attack left it correct, as AutoAttack itself reports.

    ``logits``, when given, receives the raw logits of every column (the same keys): what two builds of
    a runtime, on two processors, are compared by (``verify.py --logits``).
    """
    y = samples["y"]

    def outputs(column: str, x: np.ndarray) -> np.ndarray:
        out = predict(runner, x, what=what)
        if logits is not None:
            logits[column] = out
        return out

    def correct(column: str, x: np.ndarray) -> np.ndarray:
        return outputs(column, x).argmax(1) == y[:len(x)]

    pred = outputs("clean", samples["x"]).argmax(1)
    results = {"clean": pred == y}
    for key in sorted(k for k in samples if k.startswith("adv_")):
        results[f"transfer_{key[4:]}"] = correct(f"transfer_{key[4:]}", samples[key])
    prefix = whitebox_key(row_name, "")
    for key in sorted(k for k in samples if k.startswith(prefix)):
        results[f"whitebox_{key[len(prefix):]}"] = correct(f"whitebox_{key[len(prefix):]}", samples[key])
    if square_key(row_name) in samples:
        results["square"] = correct("square", samples[square_key(row_name)])
    row = {"agreement": float((pred == samples["torch_pred"]).mean())}
    row.update(accuracy_row(results))
    return row, results


def worst_case(results: dict) -> np.ndarray:
    """Per example: correct under every attack (a shorter array, such as Square's, covers a prefix)."""
    worst = np.ones(len(results["clean"]), dtype=bool)
    for correct in results.values():
        worst[:len(correct)] &= correct
    return worst


def accuracy_row(results: dict) -> dict:
    """Accuracy per column and the per-example worst case over all of them."""
    row = {key: float(np.mean(correct)) for key, correct in results.items()}
    row["worst"] = float(worst_case(results).mean())
    return row


def artifact_row(path: Path, fmt: str, samples: dict, latency: bool = True,
                 logits: dict | None = None) -> tuple[dict, dict, object]:
    """One artifact through its own runtime: (row, per-example correctness, runner). ``latency=False``
    leaves the latency columns out (under emulation they time the emulator, not the processor)."""
    runner = open_runner(path, fmt)
    check_input_shape(runner, samples["x"].shape)
    row, results = replay(runner, samples, fmt, what=f"{fmt} ({Path(path).name})", logits=logits)
    row["size_mb"] = Path(path).stat().st_size / 2**20
    if latency:
        row["latency_b1_ms"] = median_latency_ms(runner, samples["x"], 1)
        row["latency_b64_ms"] = median_latency_ms(runner, samples["x"], 64)
    return row, results, runner
