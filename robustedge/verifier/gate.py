"""The gate: thresholds that turn a regression against the torch model, or a fired flag, into exit 1."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from robustedge.verifier.base import RobustEdgeError, is_fraction
from robustedge.verifier.flags import describe_flag


def distinct_percents(value: float, limit: float) -> tuple[str, str]:
    """Two fractions as percentages with as many decimals (1 to 4) as it takes for them to differ, so that
    a failed threshold never reads "99.0% < 99.0%"."""
    for decimals in range(1, 5):
        a, b = f"{100 * value:.{decimals}f}", f"{100 * limit:.{decimals}f}"
        if a != b:
            return a, b
    return a, b


@dataclass
class Gate:
    """Thresholds that turn a regression of an artifact against the torch model, or an attack that
    shows signs of failure, into a failed gate (exit 1)."""

    max_robust_drop: float = 0.05  # accuracy (fraction) an artifact may lose vs torch: clean, transfer, worst case
    min_agreement: float = 0.95  # top-1 agreement with torch on clean inputs
    min_twin_agreement: float = 0.99  # white-box numbers need a twin this close to the runtime (top-1)
    flag_tolerance: float = 0.005  # a comparison flag fires above this fraction of the examples compared
    # an emulated replay (a row "<format>@<isa>") must give the top-1 of the same file on this machine this often
    min_isa_agreement: float = 0.99
    allow_flags: bool = False  # report attack-failure flags without failing the gate

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "allow_flags":
                if not isinstance(value, bool):
                    raise RobustEdgeError(f"gate 'allow_flags' must be true or false, got {value!r}")
            elif not is_fraction(value):
                raise RobustEdgeError(f"gate '{f.name}' must be a fraction in [0, 1], got {value!r}")

    @classmethod
    def from_dict(cls, raw: dict) -> "Gate":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise RobustEdgeError(f"unknown gate key '{unknown[0]}'; known keys: {', '.join(sorted(known))}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, max_drop: float | None = None, min_agreement: float | None = None,
                 allow_flags: bool | None = None) -> "Gate":
        """This gate with the thresholds a command line gave (None keeps the bundle's)."""
        changes = {k: v for k, v in (("max_robust_drop", max_drop), ("min_agreement", min_agreement),
                                     ("allow_flags", allow_flags)) if v is not None}
        return Gate(**(self.to_dict() | changes))

    def check(self, table: dict, flags: dict | None = None) -> list[str]:
        ref = table["torch"]
        failures = []
        for fmt, row in table.items():
            if fmt != "torch":
                if row["agreement"] < self.min_agreement:
                    value, limit = distinct_percents(row["agreement"], self.min_agreement)
                    failures.append(f"{fmt}: agreement {value}% < {limit}%")
                if row.get("isa_agreement") is not None and row["isa_agreement"] < self.min_isa_agreement:
                    value, limit = distinct_percents(row["isa_agreement"], self.min_isa_agreement)
                    failures.append(f"{fmt}: agrees with the same file on this machine on {value}% of the "
                                    f"inputs (< {limit}%)")
                if row.get("twin_agreement") is not None and row["twin_agreement"] < self.min_twin_agreement:
                    value, limit = distinct_percents(row["twin_agreement"], self.min_twin_agreement)
                    failures.append(f"{fmt}: its twin agrees with the runtime on {value}% "
                                    f"(< {limit}%); white-box numbers refused")
                for key in [k for k in row if k in ("clean", "worst") or k.startswith("transfer_")]:
                    if ref.get(key) is None or row[key] is None:
                        continue
                    drop = ref[key] - row[key]
                    if drop > self.max_robust_drop + 1e-9:
                        value, limit = distinct_percents(drop, self.max_robust_drop)
                        failures.append(f"{fmt}: {key} drops {value} points (> {limit})")
            if not self.allow_flags:
                failures += [f"{fmt}: attack-failure flag {describe_flag(flag)}" for flag in (flags or {}).get(fmt, [])]
        return failures
