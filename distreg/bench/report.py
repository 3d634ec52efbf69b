"""Text tables of suite runs and comparisons."""
from __future__ import annotations

import math


def format_table(header: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x: float | None, signed: bool = True) -> str | None:
    if x is None or math.isnan(x):
        return None
    return f"{x:+.1%}" if signed else f"{x:.1%}"


def format_rows(result) -> str:
    """The comparison table: change is signed so that + is better."""
    n = len(result.baseline_ids)
    rows = [[r.key, r.better or "?", r.base, r.value, _pct(r.change), _pct(-r.allowed) if r.allowed is not None else None,
             _pct(r.band, signed=False) if r.band else None, r.verdict] for r in result.rows]
    return format_table(["metric", "better", f"baseline (median of {n})", "latest", "change (+ better)",
                         "limit", "noise band", "verdict"], rows)
