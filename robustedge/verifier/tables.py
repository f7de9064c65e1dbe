"""The verification table and the flags as text (Markdown; accuracies in %)."""

from __future__ import annotations

from robustedge.verifier.flags import describe_flag

PERCENT_COLUMNS = ("clean", "agreement", "isa_agreement", "transfer_pgd20", "transfer_autoattack", "whitebox_pgd20", "whitebox_cw",
                   "whitebox_autoattack", "whitebox_diva", "square", "worst")
UNIT_COLUMNS = (("size_mb", "size (MB)", ".3f"), ("latency_b1_ms", "latency b1 (ms)", ".2f"),
                ("latency_b64_ms", "latency b64 (ms)", ".2f"), ("isa_max_logit_diff", "max logit diff vs host", ".2g"))

_HEADERS = {"isa_agreement": "agreement with host"}  # an emulated row's top-1 agreement with this machine's replay


def format_table(table: dict) -> str:
    """The verification table as Markdown (accuracies in %)."""
    rows = list(table.values())
    keys = [k for k in PERCENT_COLUMNS if any(k in r for r in rows)]
    keys += sorted({k for r in rows for k in r if k.startswith(("transfer_", "whitebox_")) and k not in keys})
    units = [u for u in UNIT_COLUMNS if any(u[0] in r for r in rows)]
    head = ["format"] + [_HEADERS.get(k, k.replace("_", " ")) + " (%)" for k in keys] + [u[1] for u in units]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for fmt, row in table.items():
        cells = [f"{100 * row[k]:.1f}" if row.get(k) is not None else "" for k in keys]
        cells += [f"{row[u[0]]:{u[2]}}" if row.get(u[0]) is not None else "" for u in units]
        lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_flags(flags: dict) -> str:
    lines = [f"attack-failure flag, {row}: {describe_flag(flag)}" for row, row_flags in flags.items()
             for flag in row_flags]
    return "".join(line + "\n" for line in lines) if lines else "attack-failure flags: none\n"
