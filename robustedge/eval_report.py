"""What an evaluation is and what it leaves behind: the suite's rows (from the one attack table), the
report (accuracy, per-example results, W-Robust, flags, timings) and its ``eval.json``, and the checks that
let a saved, interrupted evaluation be resumed as the same run (docs/design/evaluation.md, "Resumable")."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from robustedge.attack_table import ATTACKS, SUITE_ATTACKS
from robustedge.attacks import run_table_attack
from robustedge.errors import RobustEdgeError, unknown_name
from robustedge.files import atomic_write_json, atomic_write_text, json_has_format

EVAL_FORMAT = "robustedge-eval/1"
MD_HEADER = "Robustness on "


def _is_eval_json(path: Path) -> bool:
    """An eval.json RobustEdge wrote (with its format key, or the layout of versions before it)."""
    if json_has_format(path, EVAL_FORMAT):
        return True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and {"n", "eps", "accuracy", "seconds", "info"} <= set(data)


def _is_eval_md(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8").startswith(MD_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


EVAL_OUTPUTS = {"eval.json": _is_eval_json, "eval.md": _is_eval_md}  # what `robustedge eval` may overwrite
# the last argument: U[0, 1) draws shaped like x, each example's own (robustedge/sharding.py, example_uniform)
WhiteBox = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, torch.Tensor], torch.Tensor]


def _autoattack_passes(clean: float, robust: float) -> float:
    """pyautoattack's standard run per example: APGD-CE (100 steps) on what is correct, then APGD-T and FAB-T
    (9 targets x 100 steps each) and Square (5,000 forward queries) on what is still robust."""
    return 100 * clean + (900 + 900 + 5000 / 3) * robust


@dataclass(frozen=True)
class SuiteAttack:
    name: str
    description: str
    run: WhiteBox | None  # None: clean accuracy or AutoAttack (batched by pyautoattack itself)
    iterative: bool  # reported as robustness and judged by the attack-failure checks (FGSM is weak by design)
    passes: Callable[[float, float], float]  # model passes per example (clean, this attack's accuracy) -> cost


def _table_run(name: str) -> WhiteBox:
    return lambda m, x, y, e, u: run_table_attack(name, m, x, y, e, noise=u)


def _gradient_passes(steps: int) -> Callable[[float, float], float]:
    return lambda c, r: steps + 1 / 3


# the suite's rows, in order, from the one attack table (robustedge/attack_table.py); clean and AutoAttack
# (batched by pyautoattack itself) have no per-block runner
SUITE: dict[str, SuiteAttack] = {name: SuiteAttack(
    name, ATTACKS[name].description,
    None if ATTACKS[name].loss in ("none", "autoattack") else _table_run(name),
    ATTACKS[name].iterative,
    {"none": lambda c, r: 1 / 3, "autoattack": _autoattack_passes}.get(ATTACKS[name].loss,
                                                                       _gradient_passes(ATTACKS[name].steps)))
    for name in SUITE_ATTACKS}
DEFAULT_ATTACKS = list(SUITE)


def parse_attacks(text: str | list[str]) -> list[str]:
    names = [a.strip().lower() for a in (text.split(",") if isinstance(text, str) else text) if a.strip()]
    if names == ["all"]:
        return DEFAULT_ATTACKS
    for name in names:
        if name not in SUITE:
            raise unknown_name("attack", name, DEFAULT_ATTACKS + ["all"])
    if not names:
        raise RobustEdgeError("no attacks given")
    # clean first, always: W-Robust needs clean accuracy, from the first saved report on
    return list(dict.fromkeys(["clean"] + names))


@dataclass
class EvalReport:
    n: int
    eps: float
    accuracy: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    worst: float | None = None  # per example, correct under every attack run (with at least two attacks)
    flags: list[dict] | None = None  # attack-failure flags that fired (None: the checks did not run)
    checks: dict = field(default_factory=dict)  # what the checks measured
    correct: dict[str, str] = field(default_factory=dict)  # attack -> '1'/'0' per example, in index order
    notes: list[str] = field(default_factory=list)  # what a reader must know that is not a failure (a weak attack)
    complete: bool = True  # False while it runs (a saved unfinished evaluation: `robustedge eval --resume`)
    partial: dict | None = None  # the attack under way: {"attack", "correct" (its finished prefix), "seconds"}

    def w_robust(self, attack: str) -> float:
        """Weighted Robust Accuracy = (clean + robust) / 2."""
        return (self.accuracy["clean"] + self.accuracy[attack]) / 2

    def rows(self) -> list[tuple[str, float, float | None, float]]:
        rows = [(name, acc, None if name == "clean" else self.w_robust(name), self.seconds.get(name, 0.0))
                for name, acc in self.accuracy.items()]
        if self.worst is not None:  # per example over every attack: what AutoAttack reports, over the whole suite
            rows.append(("worst", self.worst, (self.accuracy["clean"] + self.worst) / 2, 0.0))
        return rows

    def flag_lines(self) -> list[str]:
        from robustedge.verifier import describe_flag

        notes = [f"note: {note}" for note in self.notes]
        if self.flags is None:
            reason = self.checks.get("skipped")
            return notes + ["attack-failure checks: not run" + (f" ({reason})" if reason else "")]
        cost = []
        if "n" in self.checks and "flags" in self.seconds:
            suite = sum(v for k, v in self.seconds.items() if k != "flags")
            cost = [f"attack-failure checks: {self.checks['n']} examples, {self.seconds['flags']:.1f} s"
                    + (f" ({100 * self.seconds['flags'] / suite:.0f}% of the suite's {suite:.1f} s)" if suite > 0
                       else "")]
        return notes + cost + ([f"attack-failure flag: {describe_flag(f)}" for f in self.flags]
                               or ["attack-failure flags: none"])

    def status_lines(self) -> list[str]:
        if self.complete:
            return self.flag_lines()
        under_way = f"; {self.partial['attack']} on {len(self.partial['correct'])} of {self.n} examples" \
            if self.partial else ""
        return [f"unfinished: {', '.join(self.accuracy) or 'nothing'} done{under_way} "
                f"(`robustedge eval ... --resume` continues it)"]

    def suite_passes(self) -> float:
        """Model passes the suite's attacks cost (their :attr:`SuiteAttack.passes`), the budget of the checks."""
        clean = self.accuracy.get("clean", 1.0)
        return self.n * sum(SUITE[name].passes(clean, acc) for name, acc in self.accuracy.items() if name in SUITE)

    @classmethod
    def from_dict(cls, raw: dict) -> "EvalReport":
        """The inverse of :meth:`to_dict` (derived keys dropped)."""
        return cls(**{k: raw[k] for k in ("n", "eps", "accuracy", "seconds", "info", "worst", "flags", "checks",
                                          "correct", "notes", "complete", "partial") if k in raw})

    def to_dict(self) -> dict:
        out = {"format": EVAL_FORMAT} | asdict(self)
        out["w_robust"] = {name: self.w_robust(name) for name in self.accuracy if name != "clean"}
        return out

    def to_markdown(self) -> str:
        lines = [f"{MD_HEADER}{self.n} examples, L-inf eps = {self.eps:.4f} ({self.eps * 255:.1f}/255)", "",
                 "| attack | accuracy (%) | W-Robust (%) | time (s) |", "|---|---:|---:|---:|"]
        for name, acc, wr, sec in self.rows():
            lines.append(f"| {name} | {100 * acc:.2f} | {'' if wr is None else f'{100 * wr:.2f}'} | {sec:.1f} |")
        return "\n".join(lines + [""] + self.status_lines()) + "\n"

    def to_text(self) -> str:
        lines = [f"{'attack':<14}{'accuracy %':>12}{'W-Robust %':>12}{'time s':>9}"]
        for name, acc, wr, sec in self.rows():
            lines.append(f"{name:<14}{100 * acc:>12.2f}{'' if wr is None else f'{100 * wr:.2f}':>12}{sec:>9.1f}")
        return "\n".join(lines + self.status_lines())

    def save(self, json_path: str | Path, md_path: str | Path | None = None) -> None:
        atomic_write_json(json_path, self.to_dict())
        if md_path is not None:
            atomic_write_text(md_path, self.to_markdown())


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, str]:
    """SHA-256 of the model's state (names, dtypes, shapes, values) and of the examples: what must be the same
    for a resumed evaluation to be the same evaluation."""
    import hashlib

    weights = hashlib.sha256()
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            weights.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
            weights.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    data = hashlib.sha256()
    for tensor in (x, y):
        t = tensor.detach().cpu().contiguous()
        data.update(f"{t.dtype}:{tuple(t.shape)}".encode())
        data.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return {"model_sha256": weights.hexdigest(), "data_sha256": data.hexdigest()}


def resumable_report(raw, where: str = "the saved evaluation") -> EvalReport:
    """An :class:`EvalReport` from a saved ``eval.json`` whose every field a resume reads has the right type
    (a hand-edited or damaged file is one line, never a traceback or a silently wrong number)."""
    def bad(why: str) -> RobustEdgeError:
        return RobustEdgeError(f"{where} is not an evaluation RobustEdge can resume ({why}); run without --resume")

    if not isinstance(raw, dict):
        raise bad("not a JSON object")
    for key in ("accuracy", "seconds", "correct", "info"):
        if not isinstance(raw.get(key, {}), dict):
            raise bad(f"'{key}' is not an object")
    if not isinstance(raw.get("info", {}).get("run"), dict):
        raise bad("it records no run settings: written before resumable evaluations")
    if not all(isinstance(v, str) and set(v) <= {"0", "1"} for v in raw.get("correct", {}).values()):
        raise bad("'correct' must map attacks to strings of 0 and 1")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for key in ("accuracy", "seconds") for v in raw.get(key, {}).values()):
        raise bad("'accuracy' and 'seconds' must hold finite numbers")
    partial = raw.get("partial")
    if partial is not None and not (
            isinstance(partial, dict) and isinstance(partial.get("attack"), str)
            and isinstance(partial.get("correct"), str) and set(partial["correct"]) <= {"0", "1"}
            and isinstance(partial.get("seconds", 0.0), (int, float)) and math.isfinite(partial.get("seconds", 0.0))):
        raise bad("'partial' must be {attack, correct: 0/1 string, seconds}")
    if not isinstance(raw.get("complete", True), bool) or not isinstance(raw.get("n"), int):
        raise bad("'complete' must be true or false and 'n' an integer")
    try:
        return EvalReport.from_dict(raw)
    except TypeError as exc:
        raise bad(str(exc)) from None


def check_resumable(saved: EvalReport, run: dict) -> None:
    """A saved (partial) evaluation may be continued only by the same run: the same model, examples, attacks,
    eps, seed, AutoAttack block and device type (the batch size and the number of processes change no
    number), and only from what that run could have saved: finished results of length n, a prefix of the
    attack under way that ends on one of its blocks."""
    before = saved.info.get("run")
    if not isinstance(before, dict):
        raise RobustEdgeError("the saved evaluation records no run settings (written before resumable evaluations); "
                              "run it again without --resume")
    differ = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in run.items() if before.get(key) != value]
    if differ:
        raise RobustEdgeError("cannot resume: the saved evaluation was another run (" + "; ".join(differ)
                              + "); run without --resume to start over, or with its settings")
    n, attacks = run["n"], run["attacks"]
    wrong = [a for a, bits in saved.correct.items() if a not in attacks or len(bits) != n]
    wrong += [a for a in saved.accuracy if a not in saved.correct]
    if saved.partial:
        name, done = saved.partial["attack"], len(saved.partial["correct"])
        block = run["aa_batch_size"] if name == "autoattack" else 1
        if name not in attacks or name in saved.correct or done > n or done % block and done != n:
            wrong.append(f"partial {name}")
    if saved.n != n or wrong:
        raise RobustEdgeError(f"cannot resume: the saved evaluation does not fit this run ({', '.join(wrong) or 'n'}: "
                              f"not {n} results, or a prefix that is not a finished block); run without --resume")


def to_bits(correct: torch.Tensor) -> str:
    return "".join("1" if c else "0" for c in correct.tolist())


def from_bits(bits: str, device: torch.device) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool, device=device)
