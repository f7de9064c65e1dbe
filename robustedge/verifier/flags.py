"""Attack-failure flags that need only replays: the checks, and the comparisons a bundle recomputes.

The gradient checks, which need torch, live in :mod:`robustedge.flags`; their flags have the same
form (:func:`make_flag`), are recorded in the manifest at export and reported here as recorded.
"""

from __future__ import annotations

import numpy as np

FLAG_CHECKS = {
    "blackbox_below_whitebox": "the black-box Square attack broke examples that every white-box attack left correct",
    "transfer_below_whitebox": "examples crafted on the float model broke examples the artifact's own white-box "
                               "attacks left correct",
    "large_radius": "accuracy at a large radius is not near zero",
    "zero_gradients": "the input gradient is exactly zero",
    "flat_loss": "the attack did not increase the loss",
    "more_steps": "more attack steps and restarts lowered accuracy by more than a point (and one example)",
}


def make_flag(check: str, examples: int, of: int, detail: str) -> dict:
    return {"check": check, "examples": int(examples), "of": int(of), "detail": detail}


def describe_flag(flag: dict) -> str:
    return f"{flag['check']} on {flag['examples']} of {flag['of']} examples ({flag['detail']})"


# The iterative white-box attacks whose numbers are reported as robustness: what the flags judge. FGSM (one
# step) is weak by design, and a stronger attack beating it is ordinary, not a sign of masking.
ITERATIVE_ATTACKS = ("pgd20", "pgd20_trades", "cw", "autoattack", "diva")


def iterative_columns(results: dict, prefix: str | None = None) -> list[str]:
    """The ``whitebox_*``/``transfer_*`` columns of ``results`` whose attack is iterative (``prefix``: one kind)."""
    kinds = (prefix,) if prefix else ("whitebox_", "transfer_")
    return [k for k in results for p in kinds if k.startswith(p) and k[len(p):] in ITERATIVE_ATTACKS]


def reported_worst(results: dict) -> np.ndarray | None:
    """Per example: correct under every reported iterative attack (the artifact's own white-box ones where
    it has them, else those crafted on the torch model), or None when none ran. Never the flags' own
    Square, nor FGSM: the flags compare a stronger attack with what the evaluation reports."""
    columns = iterative_columns(results, "whitebox_") or iterative_columns(results, "transfer_")
    if not columns:
        return None
    return np.logical_and.reduce([np.asarray(results[k], dtype=bool) for k in columns])


def comparison_flags(results: dict, tolerance: float = 0.005) -> list[dict]:
    """Attack-failure flags that need only replays (Carlini et al. 2019; Pintor et al. 2022): a weaker
    attack must not succeed where the stronger, white-box ones failed. The white-box reference is the
    artifact's own iterative attacks (``whitebox_*``) where it has a twin, else the torch model's
    (``transfer_*``); with no iterative white-box attack there is nothing to judge (FGSM is weak by design)."""
    own = iterative_columns(results, "whitebox_")
    transfer = [k for k in results if k.startswith("transfer_")]
    reference = own or iterative_columns(results, "transfer_")
    if not reference:
        return []
    robust = np.logical_and.reduce([results["clean"]] + [results[k] for k in reference])
    flags = []
    if "square" in results:
        m = len(results["square"])
        count = int((robust[:m] & ~results["square"]).sum())
        if count > tolerance * m:
            flags.append(make_flag("blackbox_below_whitebox", count, m,
                                   f"Square broke {count} examples that {', '.join(reference)} left correct"))
    if own and transfer:
        broken = ~np.logical_and.reduce([results[k] for k in transfer])
        count = int((robust & broken).sum())
        if count > tolerance * len(robust):
            flags.append(make_flag("transfer_below_whitebox", count, len(robust),
                                   f"{', '.join(transfer)} broke {count} examples that {', '.join(own)} left correct"))
    return flags


def bundle_flags(manifest: dict, fmt: str, results: dict, tolerance: float) -> list[dict]:
    """A format's flags: the comparison flags recomputed from this replay, plus the gradient checks
    recorded at export (they need the torch side to recompute)."""
    recorded = [f for f in manifest.get("flags", {}).get(fmt, []) if f["check"] not in
                ("blackbox_below_whitebox", "transfer_below_whitebox")]
    return comparison_flags(results, tolerance) + recorded
